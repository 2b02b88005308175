//! Signed checkpoints: an Ed25519 signature over a trail's length, its
//! chain's head and a public digest of every line up to it, so that anyone
//! holding only the **public** key can check a trail (a file log or the
//! PostgreSQL table) and detect a rewritten history, without the audit key.
//!
//! A checkpoint is made by whoever holds the signing key (a job that reads
//! the trail, `backup audit checkpoint`), from time to time, and kept where
//! the log's host cannot rewrite it (the auditor's own store). Verifying a
//! trail against its checkpoints ([`verify_lines`], [`verify_log`],
//! [`postgres::verify_checkpoints`](super::postgres::verify_checkpoints))
//! recomputes the digest from the lines and compares it at each
//! checkpoint: any line edited, removed, inserted or reordered before a
//! checkpoint, or a trail cut short of one, is found, even where the whole
//! HMAC chain was recomputed by someone who holds the audit key.
//!
//! The format is specified byte for byte in `docs/AUDIT-CHECKPOINT.md`,
//! with a committed vector (`tests/vectors/audit-checkpoint-v1.json`).

use std::fmt;
use std::io::BufReader;
use std::path::Path;
use std::time::SystemTime;

use ring::digest;
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::Value;
use zeroize::Zeroizing;

use super::line;
use crate::json::{format_timestamp, parse_timestamp, push_key, push_str};

/// The `format` member of every checkpoint.
pub const FORMAT: &str = "phi-envelope-audit-checkpoint/1";
/// The prefix of every signed message (`FORMAT` and a zero byte).
const SIGN_DOMAIN: &[u8] = b"phi-envelope-audit-checkpoint/1\0";
/// The prefix of every step of the trail digest.
const DIGEST_DOMAIN: &[u8] = b"phi-envelope-audit-digest/1\0";

/// Why a checkpoint, or a trail checked against checkpoints, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The trail could not be read.
    #[error("cannot read the audit trail: {0}")]
    Io(String),
    /// Not a checkpoint line, or not in its canonical encoding.
    #[error("not an audit checkpoint: {0}")]
    Malformed(String),
    /// The checkpoint names another signer than the public key given.
    #[error("checkpoint at seq {seq} is signed by {found}, not by the key given ({expected})")]
    WrongSigner {
        /// The checkpoint's sequence number.
        seq: u64,
        /// The id of the public key given.
        expected: String,
        /// The id the checkpoint names.
        found: String,
    },
    /// The signature does not verify under the public key given.
    #[error("checkpoint at seq {seq}: the signature does not verify under the key given")]
    BadSignature {
        /// The checkpoint's sequence number.
        seq: u64,
    },
    /// A line of the trail is not a well-formed entry, or does not follow
    /// the one before (its `seq` or `prev`).
    #[error("audit trail entry {index} (seq {seq:?}): {problem}")]
    BadLine {
        /// The 0-based position of the line in the trail.
        index: u64,
        /// Its `seq`, when it could be read.
        seq: Option<u64>,
        /// What is wrong.
        problem: line::Problem,
    },
    /// The trail up to a checkpoint is not what was signed: its history was
    /// rewritten.
    #[error("audit trail REWRITTEN: up to seq {seq} it is not what the checkpoint of {time} signed ({what})")]
    Mismatch {
        /// The checkpoint's sequence number.
        seq: u64,
        /// The checkpoint's time.
        time: String,
        /// `digest` or `head`.
        what: &'static str,
    },
    /// The trail ends before a checkpoint: entries were removed from its end.
    #[error("audit trail cut short: it ends at seq {last:?}, a checkpoint signed seq {seq}")]
    Truncated {
        /// The checkpoint's sequence number.
        seq: u64,
        /// The trail's last `seq`.
        last: Option<u64>,
    },
}

/// An Ed25519 checkpoint signing key. The seed is zeroized after use;
/// `Debug` shows the key id only.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl CheckpointKey {
    /// The key from its 32-byte Ed25519 seed (RFC 8032).
    pub fn from_seed(seed: &[u8; 32]) -> crate::Result<CheckpointKey> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| crate::Error::InvalidArgument("not an Ed25519 seed".into()))?;
        Ok(CheckpointKey { pair })
    }

    /// A new random key; returns it with its seed (to be stored sealed).
    pub fn generate() -> crate::Result<(CheckpointKey, Zeroizing<[u8; 32]>)> {
        let mut seed = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed[..])
            .map_err(|_| crate::Error::InvalidArgument("no randomness".into()))?;
        let key = CheckpointKey::from_seed(&seed)?;
        Ok((key, seed))
    }

    /// The 32-byte public key: what an auditor needs.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The key id written in checkpoints: [`signer_id`] of the public key.
    pub fn id(&self) -> String {
        signer_id(&self.public_key())
    }

    /// Signs a checkpoint of the trail whose state `digest` holds, at
    /// `time`.
    pub fn sign(&self, state: &TrailDigest, time: SystemTime) -> Option<Checkpoint> {
        let seq = state.last_seq?;
        let mut c = Checkpoint {
            seq,
            time: round_micros(time),
            head: state.head,
            digest: state.digest,
            signer: self.id(),
            sig: [0; 64],
        };
        let sig = self.pair.sign(&c.message());
        c.sig.copy_from_slice(sig.as_ref());
        Some(c)
    }
}

/// The id of a checkpoint public key: the first 8 bytes of its SHA-256, as
/// 16 lowercase hex digits.
pub fn signer_id(public_key: &[u8; 32]) -> String {
    line::hex(&digest::digest(&digest::SHA256, public_key).as_ref()[..8])
}

fn round_micros(t: SystemTime) -> SystemTime {
    parse_timestamp(&format_timestamp(t)).unwrap_or(t)
}

fn micros(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The public digest of a trail, line by line: `D = SHA-256(
/// "phi-envelope-audit-digest/1\0" || D_prev || line)` (32 zero bytes
/// before the first line; `line` without its newline), and the structure
/// anyone can check without the audit key: each line canonical, its `seq`
/// one more than the one before (0 first), its `prev` the previous line's
/// `hash`.
#[derive(Clone, Debug, Default)]
pub struct TrailDigest {
    digest: [u8; 32],
    head: [u8; 32],
    last_seq: Option<u64>,
    index: u64,
}

impl TrailDigest {
    /// The digest of an empty trail.
    pub fn new() -> TrailDigest {
        TrailDigest::default()
    }

    /// Adds the next line (without its newline).
    pub fn update(&mut self, raw: &[u8]) -> Result<(), CheckpointError> {
        let index = self.index;
        let bad = |seq, problem| CheckpointError::BadLine {
            index,
            seq,
            problem,
        };
        // Refuses a line over `line::MAX_LINE` bytes, as every reader does.
        let (entry, _) = line::decode(raw).map_err(|p| bad(None, p))?;
        let expected = self.last_seq.map_or(0, |s| s + 1);
        if entry.seq != expected {
            return Err(bad(
                Some(entry.seq),
                line::Problem::SeqMismatch {
                    expected,
                    found: entry.seq,
                },
            ));
        }
        let prev = if self.last_seq.is_some() {
            self.head
        } else {
            [0; 32]
        };
        if entry.prev != prev {
            return Err(bad(Some(entry.seq), line::Problem::PrevMismatch));
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(DIGEST_DOMAIN);
        ctx.update(&self.digest);
        ctx.update(raw);
        self.digest.copy_from_slice(ctx.finish().as_ref());
        self.head = entry.hash;
        self.last_seq = Some(entry.seq);
        self.index += 1;
        Ok(())
    }

    /// The last line's `seq`, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The digest so far (64 hex digits; zeros for an empty trail).
    pub fn digest_hex(&self) -> String {
        line::hex(&self.digest)
    }
}

/// A signed checkpoint: the trail up to `seq` has this `digest` and its
/// chain ends with `head`, says the holder of the key `signer` at `time`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last line covered.
    pub seq: u64,
    /// When it was signed (microseconds).
    pub time: SystemTime,
    head: [u8; 32],
    digest: [u8; 32],
    /// The signer's key id ([`signer_id`]).
    pub signer: String,
    sig: [u8; 64],
}

impl Checkpoint {
    /// The signed message: `"phi-envelope-audit-checkpoint/1\0"`, `seq`
    /// (8 bytes big-endian), time (microseconds since the Unix epoch, 8
    /// bytes big-endian, two's complement), `head` (32), `digest` (32).
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGN_DOMAIN.len() + 80);
        m.extend_from_slice(SIGN_DOMAIN);
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&micros(self.time).to_be_bytes());
        m.extend_from_slice(&self.head);
        m.extend_from_slice(&self.digest);
        m
    }

    /// The chain's `hash` at `seq` (64 hex digits).
    pub fn head_hex(&self) -> String {
        line::hex(&self.head)
    }

    /// The trail digest at `seq` (64 hex digits).
    pub fn digest_hex(&self) -> String {
        line::hex(&self.digest)
    }

    /// The canonical line (without newline): `{"format":…,"seq":N,
    /// "time":"…","head":"…","digest":"…","signer":"…","sig":"…"}`.
    pub fn to_line(&self) -> String {
        let mut out = String::with_capacity(400);
        out.push('{');
        push_key(&mut out, "format", true);
        push_str(&mut out, FORMAT);
        push_key(&mut out, "seq", false);
        out.push_str(&self.seq.to_string());
        push_key(&mut out, "time", false);
        push_str(&mut out, &format_timestamp(self.time));
        push_key(&mut out, "head", false);
        push_str(&mut out, &line::hex(&self.head));
        push_key(&mut out, "digest", false);
        push_str(&mut out, &line::hex(&self.digest));
        push_key(&mut out, "signer", false);
        push_str(&mut out, &self.signer);
        push_key(&mut out, "sig", false);
        push_str(&mut out, &line::hex(&self.sig));
        out.push('}');
        out
    }

    /// Parses a checkpoint line; refuses anything but the canonical
    /// encoding. Does not check the signature.
    pub fn parse(text: &str) -> Result<Checkpoint, CheckpointError> {
        let bad = |why: &str| CheckpointError::Malformed(why.to_owned());
        let v: Value = serde_json::from_str(text.trim_end_matches('\n'))
            .map_err(|e| CheckpointError::Malformed(format!("not JSON: {e}")))?;
        let o = v.as_object().ok_or_else(|| bad("not an object"))?;
        let s = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| CheckpointError::Malformed(format!("no string {k:?}")))
        };
        if s("format")? != FORMAT {
            return Err(bad("unknown format"));
        }
        let seq = o
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no unsigned integer \"seq\""))?;
        let time =
            parse_timestamp(s("time")?).ok_or_else(|| bad("\"time\" is not RFC 3339 UTC"))?;
        let head = line::unhex32(s("head")?).ok_or_else(|| bad("\"head\" is not 64 hex digits"))?;
        let dig =
            line::unhex32(s("digest")?).ok_or_else(|| bad("\"digest\" is not 64 hex digits"))?;
        let signer = s("signer")?.to_owned();
        let sig_hex = s("sig")?;
        let mut sig = [0u8; 64];
        if sig_hex.len() != 128 {
            return Err(bad("\"sig\" is not 128 hex digits"));
        }
        for (i, b) in sig.iter_mut().enumerate() {
            *b = u8::from_str_radix(&sig_hex[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("\"sig\" is not 128 hex digits"))?;
        }
        let c = Checkpoint {
            seq,
            time,
            head,
            digest: dig,
            signer,
            sig,
        };
        if c.to_line() != text.trim_end_matches('\n') {
            return Err(bad("not in the canonical encoding"));
        }
        Ok(c)
    }

    /// Checks the signature under `public_key` (and that the checkpoint
    /// names that key).
    pub fn verify_signature(&self, public_key: &[u8; 32]) -> Result<(), CheckpointError> {
        let expected = signer_id(public_key);
        if self.signer != expected {
            return Err(CheckpointError::WrongSigner {
                seq: self.seq,
                expected,
                found: self.signer.clone(),
            });
        }
        UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(&self.message(), &self.sig)
            .map_err(|_| CheckpointError::BadSignature { seq: self.seq })
    }
}

/// What a trail checked against its checkpoints gave.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointReport {
    /// Lines read.
    pub lines: u64,
    /// Checkpoints verified.
    pub checkpoints: usize,
    /// The highest `seq` a checkpoint covers (lines after it are checked
    /// for structure only).
    pub covered_through: Option<u64>,
}

/// Checks `lines` (a trail in order, each without its newline) against
/// `checkpoints`, all of which must be signed under `public_key`: every
/// signature, the structure of every line, and at each checkpoint's `seq`
/// the digest and the head.
pub fn verify_lines<I, L>(
    lines: I,
    checkpoints: &[Checkpoint],
    public_key: &[u8; 32],
) -> Result<CheckpointReport, CheckpointError>
where
    I: IntoIterator<Item = Result<L, CheckpointError>>,
    L: AsRef<[u8]>,
{
    for c in checkpoints {
        c.verify_signature(public_key)?;
    }
    let mut sorted: Vec<&Checkpoint> = checkpoints.iter().collect();
    sorted.sort_by_key(|c| c.seq);
    let mut next = 0;
    let mut state = TrailDigest::new();
    for l in lines {
        state.update(l?.as_ref())?;
        let seq = state.last_seq;
        while let Some(c) = sorted.get(next) {
            if Some(c.seq) != seq {
                break;
            }
            let what = if c.digest != state.digest {
                Some("digest")
            } else if c.head != state.head {
                Some("head")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(CheckpointError::Mismatch {
                    seq: c.seq,
                    time: format_timestamp(c.time),
                    what,
                });
            }
            next += 1;
        }
    }
    if let Some(c) = sorted.get(next) {
        return Err(CheckpointError::Truncated {
            seq: c.seq,
            last: state.last_seq,
        });
    }
    Ok(CheckpointReport {
        lines: state.index,
        checkpoints: checkpoints.len(),
        covered_through: sorted.last().map(|c| c.seq),
    })
}

/// The lines of the file log whose first file is `path` (and its rotated
/// files), without newlines; an incomplete last line is left out (it is
/// no entry). A line over `line::MAX_LINE` bytes is refused, wherever it
/// is: it is not taken for the end of the trail.
pub(crate) fn log_lines(path: &Path) -> Result<Vec<Vec<u8>>, CheckpointError> {
    let io = |e: std::io::Error| CheckpointError::Io(format!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for file in super::log_files(path).map_err(io)? {
        let f = super::log::open_read(&file).map_err(io)?;
        let mut r = BufReader::new(f);
        loop {
            let mut buf = Vec::new();
            match line::read_line(&mut r, &mut buf).map_err(io)? {
                line::Framed::Line => out.push(buf),
                line::Framed::End | line::Framed::Incomplete => break,
                line::Framed::TooLong => {
                    return Err(CheckpointError::BadLine {
                        index: out.len() as u64,
                        seq: None,
                        problem: line::Problem::TooLong,
                    })
                }
            }
        }
    }
    Ok(out)
}

/// Signs a checkpoint of the file log at `path` as it is now.
pub fn sign_log(
    path: impl AsRef<Path>,
    key: &CheckpointKey,
) -> Result<Checkpoint, CheckpointError> {
    let mut state = TrailDigest::new();
    for l in log_lines(path.as_ref())? {
        state.update(&l)?;
    }
    key.sign(&state, SystemTime::now())
        .ok_or_else(|| CheckpointError::Io("the audit log is empty".into()))
}

/// Checks the file log at `path` against `checkpoints` ([`verify_lines`]).
pub fn verify_log(
    path: impl AsRef<Path>,
    checkpoints: &[Checkpoint],
    public_key: &[u8; 32],
) -> Result<CheckpointReport, CheckpointError> {
    verify_lines(
        log_lines(path.as_ref())?.into_iter().map(Ok),
        checkpoints,
        public_key,
    )
}

/// Parses a checkpoints file: one checkpoint line per line, blank lines
/// ignored.
pub fn parse_checkpoints(text: &str) -> Result<Vec<Checkpoint>, CheckpointError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(Checkpoint::parse)
        .collect()
}
