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
//! The keyring does not write on its caller's thread: it hands each event
//! to the log's writer thread ([`EventSink::submit`](crate::events::EventSink::submit))
//! and awaits the receipt, so an async task waits for its entry's
//! durability without holding a runtime thread, and entries queued by
//! concurrent tasks share one fsync (group commit; see [`AuditLog`] and
//! [`AuditLog::stats`]). [`AuditLog::append`] (and `record`) write on the
//! calling thread, for code that is not async; both go into one chain.
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
//! # Format
//!
//! The bytes are specified in docs/AUDIT-LOG.md (format
//! `phi-envelope-audit/1`), with committed vectors
//! (tests/vectors/audit-log-v1.json) and an independent verifier; what
//! follows is a summary. Every line of every file is one JSON object in a
//! canonical encoding (fixed member order, no spaces, one escaping rule,
//! timestamps with six fractional digits; the verifier re-encodes each line
//! and rejects any other spelling), then a newline. Members, in order:
//!
//! - `seq`: the line's position in the whole chain, from 0, contiguous across
//!   rotated files;
//! - `type`: `header`, `event` or `gap`, followed by the members of the type:
//!   - `header` (the first line of every file, and only there): `format`
//!     (`"phi-envelope-audit/1"`), `mac` (`"hmac-sha256"` or `"sha256"`),
//!     `key_id` (16 hex digits identifying the audit key, or `null`),
//!     `segment` (the file's number, 1, 2, ...), `prev_file` (the name of the
//!     file this one continues, or `null` for the first), `time`;
//!   - `event`: `event`, the event object of the
//!     [event schema](crate::events#json-schema);
//!   - `gap`: `lost` (how many events were not recorded), `reason`
//!     (`write-failed`: written before the next event a writer appends after
//!     failed appends; `torn-tail`: written when an incomplete last line was
//!     cut off) and `time`, so that a loss is never silent;
//! - `prev`: the `hash` of the line before it (64 hex digits; all zeros for
//!   line 0);
//! - `hash`: 64 hex digits, always the last member.
//!
//! ```text
//! {"seq":0,"type":"header","format":"phi-envelope-audit/1","mac":"hmac-sha256","key_id":"4893081180cd4645","segment":1,"prev_file":null,"time":"2026-12-04T03:00:00.000000Z","prev":"0000…0000","hash":"5df4…29e4"}
//! {"seq":1,"type":"event","event":{"timestamp":"2026-12-04T03:00:00.120044Z","operation":"create-key",…,"duration_us":1830},"prev":"5df4…29e4","hash":"cc81…577f"}
//! ```
//!
//! Let `body` be the bytes of a line up to, not including, `,"hash":"`,
//! and `prev` the previous line's hash as 32 raw bytes. Then
//!
//! ```text
//! hash = HMAC-SHA-256(audit key, "phi-envelope-audit/1\0" || prev || body)   (keyed)
//! hash = SHA-256("phi-envelope-audit/1\0" || prev || body)                   (unkeyed)
//! ```
//!
//! The `key_id` in the headers is the first 8 bytes of
//! `HMAC-SHA-256(audit key, "phi-envelope-audit/1 key-id\0")`, in hex.
//!
//! Rotation (before an append that could make a file exceed
//! [`max_file_bytes`](AuditLogBuilder::max_file_bytes)) starts a new file
//! `NAME.000002`, `NAME.000003`, ... next to `NAME`, whose header names the
//! previous file in `prev_file` and chains to its last line through `prev`.
//! Files are never renamed, so archived files keep their names. A writer
//! killed between creating a file and writing its header leaves it empty:
//! the next writer writes the header, and [`verify`] accepts such an empty
//! last file.
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
//! A crash in the middle of a write (a `SIGKILL`, a power failure) can
//! leave an incomplete last line, without its newline; the operation it
//! recorded was not completed (the event is written before the keyring
//! releases a result). A writer never continues after it: [`AuditLog::open`]
//! refuses such a log, and so does a writer of another process that finds
//! it at its next append, unless
//! [`repair_torn_tail`](AuditLogBuilder::repair_torn_tail) is set, in which
//! case the incomplete line is cut off and a `gap` line (`torn-tail`) says
//! so. [`verify`] reports it as [`Problem::Incomplete`].
//!
//! # Several processes, one log
//!
//! Several processes may write one log at once (two cron jobs, a verify
//! during a backup, a fleet of workers on one host): their entries form
//! one chain. Every writer holds an exclusive advisory lock on the log's
//! first file (`flock(2)`, through `std::fs::File::lock`) across each
//! append, a rotation included, and under the lock continues the chain
//! from the end of the log on disk, not from what it wrote last: if the
//! file did not change since its own last append (one `fstat` and one
//! `stat` tell), it continues at once; otherwise it reads the last file's
//! last two lines from its end (never the whole file) and checks them. The
//! lock is released before the fsync (whose group commit is unchanged: an
//! entry is on stable storage before it is acknowledged) and on every
//! error path.
//!
//! A writer refuses the entry (and so the keyring refuses the key use,
//! [`Error::Audit`](crate::Error::Audit)) when what it finds is not a
//! chain it can continue: the last line does not verify, or does not
//! follow from the line before it (two lines with one `seq`: a fork by a
//! writer that did not take the lock, such as an older version or a copy
//! of the file written back), or the log no longer holds what this writer
//! wrote last (lines removed from the end, an older copy restored), or the
//! file it appends to is no longer the one its path names (renamed,
//! replaced or removed: its entries would go outside the log). The refusal
//! is sticky for that [`AuditLog`], and the writer leaves a marker beside
//! the log, `LOG.broken` (created exclusively, mode 0600, never through a
//! link; UTF-8 text of the refusal, for the operator only, never parsed):
//! while it exists every writer and every later open refuse the log
//! ([`OpenError::Broken`]; a fork at the end is also found at open,
//! [`OpenError::Damaged`]). The error says how to start a new log (below).
//! These checks look at the end of the log only; [`verify`] checks all of
//! it, and ignores the marker.
//!
//! [`Verifier::verify`] takes a shared lock on the same file while it
//! lists the files and notes the length of the last one, then verifies
//! that snapshot without the lock: it never reads an append in progress
//! (half a line, a new file without its header yet) as damage, and writers
//! wait only for that listing. [`Verifier::verify_files`] reads the files
//! it is given as they are (for copies and archives). Any other tool that
//! reads a live log should do the same: `flock(LOCK_SH)` on the first file,
//! note the lengths, unlock, read up to them.
//!
//! The lock is advisory: it excludes only writers that take it (this
//! crate's). It is held on the file, not on its name, so moving the first
//! file away (to an evidence directory, say) or replacing it while writers
//! run would let a writer that still has the old file open and one that
//! opens the new one each hold "the" lock: under the lock, every append
//! checks that the path still names the file it locks, and that the path
//! of the file it appends to still names that file (one `fstat` and one
//! `lstat` each); a writer that finds either moved or replaced refuses
//! every later entry (the second also leaves the marker described above). Locks are per host unless the file system shares them
//! (NFS does, through its lock manager).
//!
//! The writer opens every file of the log with `O_NOFOLLOW` and
//! `O_NONBLOCK` and accepts only regular files: a symbolic link (or a
//! FIFO) planted in the log's directory, under the log's name or a rotated
//! file's, is refused with an error, never followed, so it cannot redirect
//! the log's writes or its lock to another file.
//!
//! # When the chain is broken: starting a new log
//!
//! A log that does not verify is never appended to again (an entry after a
//! fork or a cut would hide where the chain broke). To rotate to a new log:
//!
//! 1. Stop every process that writes the log (the next ones would be
//!    refused anyway).
//! 2. Run [`verify`] on it (`backup audit verify LOG`) and keep its report:
//!    it names the first bad line. Keep the last anchor you stored, too.
//! 3. Move the log's files, `LOG`, its rotated files `LOG.000002`, ... and
//!    the marker `LOG.broken` (left by the writer that found the break, so
//!    that every other writer and later process refuses the log too),
//!    unchanged, to an evidence directory: up to the first bad line they
//!    remain the verified record, and what follows is for the
//!    investigation.
//! 4. Start the writers again: the first open of `LOG` creates a new log
//!    (a new genesis header at `seq` 0), or configure a new path. Record in
//!    your ticket which old log and anchor the new one follows.

pub mod checkpoint;
#[cfg(test)]
mod limit_tests;
pub(crate) mod line;
mod log;
#[cfg(feature = "postgres")]
mod pg_tls;
#[cfg(feature = "postgres")]
pub mod postgres;
mod queue;
pub mod report;
pub mod sealed;
#[cfg(feature = "tracing")]
mod tracing_sink;
#[cfg(test)]
mod vector_tests;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};

use ring::hmac;
use zeroize::Zeroizing;

pub use log::{AuditLog, AuditLogBuilder, AuditStats, FsyncPolicy, OpenError};
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
