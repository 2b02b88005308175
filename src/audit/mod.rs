//! The audit trail: a tamper-evident, append-only JSON Lines log of key
//! accesses, its verifier, and (feature `tracing`) a `tracing` sink.
//!
//! [`AuditLog`] is an [`EventSink`](crate::events::EventSink): give it to
//! [`KeyringBuilder::event_sink`](crate::keyring::KeyringBuilder::event_sink)
//! and every key access the keyring makes is written, hash-chained and
//! (by default) fsynced before the operation's result is released. If the
//! log cannot be written, the keyring refuses the operation
//! ([`Error::Audit`](crate::Error::Audit)) unless it was built with
//! `fail_closed(false)`.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use phi_envelope::audit::{self, AuditKey, AuditLog, FsyncPolicy, Verifier};
//! use phi_envelope::events::{Event, EventSink, Operation, Outcome};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("audit.jsonl");
//! let key = AuditKey::new(&[7u8; 32])?; // in production: from a secret store
//! let log = Arc::new(
//!     AuditLog::builder()
//!         .audit_key(key.clone())
//!         .fsync(FsyncPolicy::EveryEntry)
//!         .max_file_bytes(64 << 20)
//!         .open(&path)?,
//! );
//! // Normally: Keyring::builder().event_sink(log.clone()) ...
//! log.record(&Event::new(Operation::Unwrap, "local", Outcome::Success))?;
//! let anchor = log.anchor(); // keep it somewhere the log's writer cannot reach
//!
//! let report = Verifier::new().key(key).anchor(anchor).verify(&path)?;
//! assert_eq!(report.entries, 1);
//! # Ok(()) }
//! ```
//!
//! # Line format
//!
//! Every line of every file is one JSON object, in a canonical encoding
//! (fixed member order, no spaces, one escaping rule; the verifier re-encodes
//! each line and rejects any other spelling). Members, in order:
//!
//! - `seq`: the line's position in the whole chain, from 0, contiguous across
//!   rotated files;
//! - `type`: `header`, `event` or `gap`, followed by the members of the type:
//!   - `header` (the first line of every file): `format`
//!     (`"phi-envelope-audit/1"`), `mac` (`"hmac-sha256"` or `"sha256"`),
//!     `key_id` (16 hex digits identifying the audit key, or `null`),
//!     `segment` (the file's number, 1, 2, ...), `prev_file` (the name of the
//!     file this one continues, or `null` for the first), `time`;
//!   - `event`: `event`, the event object of the
//!     [event schema](crate::events#json-schema);
//!   - `gap`: `lost` (how many events could not be written) and `reason`
//!     (`write-failed` or `torn-tail`), `time`: written at the first
//!     successful append after failures, so that a loss is never silent;
//! - `prev`: the `hash` of the line before it (64 hex digits; all zeros for
//!   line 0);
//! - `hash`: 64 hex digits, always the last member.
//!
//! ```text
//! {"seq":0,"type":"header","format":"phi-envelope-audit/1","mac":"hmac-sha256","key_id":"9c3e5b1d0a4f2e6b","segment":1,"prev_file":null,"time":"2026-11-25T10:11:01.000012Z","prev":"0000…0000","hash":"5e0f…"}
//! {"seq":1,"type":"event","event":{"timestamp":"2026-11-25T10:11:01.120044Z","operation":"generate",…,"duration_us":388},"prev":"5e0f…","hash":"a41c…"}
//! ```
//!
//! # Chain construction
//!
//! Let `body` be the bytes of a line up to, not including, `,"hash":"`
//! (that is, the line without its hash member, closing brace and newline),
//! and `prev` the previous line's hash as 32 raw bytes. Then
//!
//! ```text
//! hash = HMAC-SHA-256(audit key, "phi-envelope-audit/1\0" || prev || body)   (keyed)
//! hash = SHA-256("phi-envelope-audit/1\0" || prev || body)                   (unkeyed)
//! ```
//!
//! `body` contains `seq` and `prev`, so each hash commits to the line's
//! position and to the whole chain before it. The `key_id` in the headers is
//! the first 8 bytes of `HMAC-SHA-256(audit key, "phi-envelope-audit/1
//! key-id\0")`: it tells a verifier which key to use, and that it was given
//! the wrong one, without revealing the key.
//!
//! Rotation (when a file would exceed
//! [`max_file_bytes`](AuditLogBuilder::max_file_bytes)) starts a new file
//! `NAME.000002`, `NAME.000003`, ... next to `NAME`, whose first line is a
//! header naming the previous file in `prev_file` and chaining to its last
//! line through `prev`: the chain runs unbroken through every file. Files
//! are never renamed, so archived files keep their names.
//!
//! # What the chain protects against, and what it does not
//!
//! With an audit key, nobody without the key can edit, delete, insert or
//! reorder a line without [`verify`] naming the first line where the
//! chain breaks. Keep the key out of reach of whoever can write the log
//! (a secret store, a different account); the verifier needs it too.
//!
//! **Without an audit key the chain is only a checksum.** It detects
//! accidental damage and a naive edit, but anyone who can rewrite the files
//! can recompute every hash after a change (or write a new log from
//! scratch), and the verifier will accept the result. Use the unkeyed mode
//! only where the log is protected by other means (append-only storage,
//! shipping to a separate system).
//!
//! In both modes, removing lines **from the end** (or whole rotated files
//! from the end) leaves a shorter chain that is still valid. It can only be
//! detected against an external anchor: record [`AuditLog::anchor`] (last
//! `seq` and `hash`) somewhere else from time to time (another system, a
//! ticket, a WORM bucket) and verify with
//! [`verify_with_anchor`] / [`Verifier::anchor`]. The same anchor, when kept
//! off-site, also defeats a rewrite of an unkeyed log up to that point.
//! Similarly, deleting the oldest files is detected (the log no longer
//! starts with the genesis header) unless a
//! [start anchor](Verifier::start_after) is given on purpose.
//!
//! A crash in the middle of a write leaves an incomplete last line; the
//! operation it recorded was not completed (the event is written before the
//! keyring releases a result). [`AuditLog::open`] refuses such a log unless
//! [`repair_torn_tail`](AuditLogBuilder::repair_torn_tail) is set, in which
//! case it cuts the incomplete line off and records a `gap` line saying so.

pub(crate) mod json;
mod line;
mod log;
#[cfg(feature = "tracing")]
mod tracing_sink;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};

use ring::hmac;
use zeroize::Zeroizing;

pub use log::{AuditLog, AuditLogBuilder, FsyncPolicy, OpenError};
#[cfg(feature = "tracing")]
pub use tracing_sink::TracingSink;
pub use verify::{
    verify, verify_with_anchor, BadLine, FileSummary, GapRecord, Problem, Verifier, VerifyError,
    VerifyReport,
};

/// The secret key of a keyed audit log: at least 32 bytes, held only as an
/// HMAC key. `Debug` shows its key id, never the key.
#[derive(Clone)]
pub struct AuditKey {
    key: hmac::Key,
    id: String,
}

impl AuditKey {
    /// An audit key from its bytes (at least 32; use 32 random bytes kept
    /// in a secret store, apart from the log).
    pub fn new(bytes: &[u8]) -> crate::Result<AuditKey> {
        if bytes.len() < 32 {
            return Err(crate::Error::InvalidArgument(
                "an audit key must be at least 32 bytes".into(),
            ));
        }
        let copy = Zeroizing::new(bytes.to_vec());
        let key = hmac::Key::new(hmac::HMAC_SHA256, &copy);
        let tag = hmac::sign(&key, line::KEY_ID_DOMAIN);
        let id = line::hex(&tag.as_ref()[..8]);
        Ok(AuditKey { key, id })
    }

    /// The key id written in the log's headers: 16 hex digits that name
    /// the key without revealing it.
    pub fn key_id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A point in a log's chain: a line's `seq` and `hash`. Kept outside the
/// log, it lets [`verify_with_anchor`] detect lines removed from the end.
///
/// Written and parsed as `SEQ:HASH` (e.g. for a command line).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Anchor {
    /// The line's sequence number.
    pub seq: u64,
    /// The line's hash, 64 lowercase hex digits.
    pub hash: String,
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Anchor {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Anchor> {
        let bad =
            || crate::Error::InvalidArgument(format!("not an audit anchor (SEQ:HASH): {s:?}"));
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        if line::unhex32(hash).is_none() {
            return Err(bad());
        }
        Ok(Anchor {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// The files of the log whose first file is `path`, in chain order: `path`
/// itself, then `path.000002`, `path.000003`, ... as far as they exist
/// (gaps included: the verifier reports a missing file at the right place).
pub fn log_files(path: impl AsRef<Path>) -> std::io::Result<Vec<PathBuf>> {
    Ok(segments(path.as_ref())?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

/// The path of segment `n` of the log whose first file is `base`.
pub(crate) fn segment_path(base: &Path, n: u32) -> PathBuf {
    if n <= 1 {
        return base.to_path_buf();
    }
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n:06}"));
    base.with_file_name(name)
}

/// The existing segments of the log at `base`, ascending: `(number, path)`.
pub(crate) fn segments(base: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let name = base
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: not a file name in UTF-8", base.display()),
            )
        })?
        .to_owned();
    let dir = match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut found = Vec::new();
    let prefix = format!("{name}.");
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if file == name {
            found.push((1, base.to_path_buf()));
        } else if let Some(rest) = file.strip_prefix(&prefix) {
            if rest.len() >= 6 && rest.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(n) = rest.parse::<u32>() {
                    if n >= 2 && rest == format!("{n:06}") {
                        found.push((n, segment_path(base, n)));
                    }
                }
            }
        }
    }
    found.sort();
    Ok(found)
}
