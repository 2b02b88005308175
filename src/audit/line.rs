//! One line of the audit log: its canonical encoding, decoding and hash.

use std::time::SystemTime;

use ring::{digest, hmac};
use serde_json::Value;

use super::AuditKey;
use crate::events::codec::{event_from_value, push_event};
use crate::events::Event;
use crate::json::{format_timestamp, opt_str, parse_timestamp, push_key, push_str, req_str};

/// The `format` of the headers this version writes.
pub(crate) const FORMAT: &str = "phi-envelope-audit/1";
/// Prefix of every hashed message.
const DOMAIN: &[u8] = b"phi-envelope-audit/1\0";
/// The message whose HMAC names a key.
pub(crate) const KEY_ID_DOMAIN: &[u8] = b"phi-envelope-audit/1 key-id\0";
/// The longest line, **newline excluded**: a line of exactly this many
/// bytes is an entry, one byte more is [`Problem::TooLong`], for every
/// reader ([`decode`] refuses it, [`read_line`] frames it). A writer
/// refuses an event whose JSON, plus 240 bytes for the rest of its line,
/// is longer. Events are a few hundred bytes; the bound keeps a hostile
/// file from making the verifier allocate without limit.
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = 9 + 64 + 2;

/// How lines are hashed.
#[derive(Clone, Debug)]
pub(crate) enum Mac {
    /// SHA-256: detects accidents, not a rewrite of the whole file.
    Sha256,
    /// HMAC-SHA-256 under an audit key.
    Hmac(AuditKey),
}

impl Mac {
    /// The header's `mac` member.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Mac::Sha256 => "sha256",
            Mac::Hmac(_) => "hmac-sha256",
        }
    }

    /// The header's `key_id` member.
    pub(crate) fn key_id(&self) -> Option<&str> {
        match self {
            Mac::Sha256 => None,
            Mac::Hmac(k) => Some(k.key_id()),
        }
    }

    /// `name` and key id, for messages: `hmac-sha256 (key id …)`.
    pub(crate) fn describe(name: &str, key_id: Option<&str>) -> String {
        match key_id {
            Some(id) => format!("{name} (key id {id})"),
            None => name.to_owned(),
        }
    }

    /// The hash of a line: MAC(domain || prev || body).
    pub(crate) fn compute(&self, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        match self {
            Mac::Sha256 => {
                let mut ctx = digest::Context::new(&digest::SHA256);
                ctx.update(DOMAIN);
                ctx.update(prev);
                ctx.update(body);
                out.copy_from_slice(ctx.finish().as_ref());
            }
            Mac::Hmac(k) => {
                let mut ctx = hmac::Context::with_key(&k.key);
                ctx.update(DOMAIN);
                ctx.update(prev);
                ctx.update(body);
                out.copy_from_slice(ctx.sign().as_ref());
            }
        }
        out
    }

    /// Constant-time comparison of a computed and a stored hash (the stored
    /// one is public, but a keyed MAC is compared the careful way anyway).
    pub(crate) fn matches(&self, prev: &[u8; 32], body: &[u8], stored: &[u8; 32]) -> bool {
        let computed = self.compute(prev, body);
        bool::from(subtle::ConstantTimeEq::ct_eq(&computed[..], &stored[..]))
    }
}

/// The first line of every file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) mac: String,
    pub(crate) key_id: Option<String>,
    pub(crate) segment: u32,
    pub(crate) prev_file: Option<String>,
    pub(crate) time: SystemTime,
}

/// What a line records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    Header(Header),
    Event(Event),
    Gap {
        lost: u64,
        reason: String,
        time: SystemTime,
    },
}

/// A decoded line.
#[derive(Clone, Debug)]
pub(crate) struct Line {
    pub(crate) seq: u64,
    pub(crate) body: Body,
    pub(crate) prev: [u8; 32],
    pub(crate) hash: [u8; 32],
}

/// The canonical body of a line (everything before `,"hash":"`), with the
/// event already encoded as `event_json` when the body is an event.
pub(crate) fn encode_body(seq: u64, body: &Body, prev: &[u8; 32]) -> String {
    let mut out = String::with_capacity(512);
    out.push('{');
    push_key(&mut out, "seq", true);
    out.push_str(&seq.to_string());
    push_key(&mut out, "type", false);
    match body {
        Body::Header(h) => {
            push_str(&mut out, "header");
            push_key(&mut out, "format", false);
            push_str(&mut out, FORMAT);
            push_key(&mut out, "mac", false);
            push_str(&mut out, &h.mac);
            push_key(&mut out, "key_id", false);
            match &h.key_id {
                Some(id) => push_str(&mut out, id),
                None => out.push_str("null"),
            }
            push_key(&mut out, "segment", false);
            out.push_str(&h.segment.to_string());
            push_key(&mut out, "prev_file", false);
            match &h.prev_file {
                Some(f) => push_str(&mut out, f),
                None => out.push_str("null"),
            }
            push_key(&mut out, "time", false);
            push_str(&mut out, &format_timestamp(h.time));
        }
        Body::Event(e) => {
            push_str(&mut out, "event");
            push_key(&mut out, "event", false);
            push_event(&mut out, e);
        }
        Body::Gap { lost, reason, time } => {
            push_str(&mut out, "gap");
            push_key(&mut out, "lost", false);
            out.push_str(&lost.to_string());
            push_key(&mut out, "reason", false);
            push_str(&mut out, reason);
            push_key(&mut out, "time", false);
            push_str(&mut out, &format_timestamp(*time));
        }
    }
    push_key(&mut out, "prev", false);
    push_str(&mut out, &hex(prev));
    out
}

/// The body of an event line from the event's canonical JSON
/// ([`Event::to_json`], computed before the log's lock is taken); the same
/// bytes as [`encode_body`] with [`Body::Event`].
pub(crate) fn event_body(seq: u64, event_json: &str, prev: &[u8; 32]) -> String {
    let mut out = String::with_capacity(event_json.len() + 128);
    out.push('{');
    push_key(&mut out, "seq", true);
    out.push_str(&seq.to_string());
    push_key(&mut out, "type", false);
    push_str(&mut out, "event");
    push_key(&mut out, "event", false);
    out.push_str(event_json);
    push_key(&mut out, "prev", false);
    push_str(&mut out, &hex(prev));
    out
}

/// Appends the hash member, the closing brace and the newline.
pub(crate) fn finish_line(body: &mut String, hash: &[u8; 32]) {
    body.push_str(",\"hash\":\"");
    body.push_str(&hex(hash));
    body.push_str("\"}\n");
}

/// Builds a complete line and returns it with its hash.
pub(crate) fn make_line(mac: &Mac, seq: u64, body: &Body, prev: &[u8; 32]) -> (String, [u8; 32]) {
    let mut text = encode_body(seq, body, prev);
    let hash = mac.compute(prev, text.as_bytes());
    finish_line(&mut text, &hash);
    (text, hash)
}

/// What is wrong with a line.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The line has no newline at the end of the file: a write torn by a
    /// crash, or a file cut short.
    Incomplete,
    /// The line is longer than any entry the log writes.
    TooLong,
    /// The line is not an audit entry (not JSON, a member missing or of the
    /// wrong type, an unknown format).
    Malformed(String),
    /// The line is valid JSON but not in the canonical encoding the log
    /// writes (spacing, member order, escaping, an extra member): it was
    /// edited.
    NotCanonical,
    /// The first line of a file is not a header.
    HeaderExpected,
    /// A header in the middle of a file.
    UnexpectedHeader,
    /// The file is empty: the first file, or a rotated file that is not the
    /// last one (an empty last rotated file is a rotation cut short before
    /// its header, which the next writer completes, and is accepted).
    EmptyFile,
    /// The log does not start with its genesis header (segment 1, seq 0):
    /// its first lines or files are missing.
    NotGenesis {
        /// The segment the first file says it is.
        segment: u32,
    },
    /// A file's header has the wrong segment number: a rotated file is
    /// missing, duplicated or out of order.
    SegmentMismatch {
        /// The segment expected here.
        expected: u32,
        /// The segment the header names.
        found: u32,
    },
    /// A header names another MAC or key than the log's first header.
    MacChanged {
        /// The log's MAC and key id.
        expected: String,
        /// This header's.
        found: String,
    },
    /// An audit key was given but the log is unkeyed: anyone who could
    /// rewrite it could have recomputed its chain.
    Unkeyed,
    /// The log is keyed with another key than the one given.
    WrongKey {
        /// The key id of the key given.
        expected: String,
        /// The key id in the log.
        found: String,
    },
    /// The sequence number is not the next one: lines before this one were
    /// deleted, or lines were inserted, duplicated or reordered.
    SeqMismatch {
        /// The sequence number expected here.
        expected: u64,
        /// The one the line carries.
        found: u64,
    },
    /// The line's `prev` is not the hash of the line before it: the line
    /// before was edited (and rehashed) or replaced, or this one was moved
    /// or inserted.
    PrevMismatch,
    /// The line's hash does not verify: the line was edited (or, on line 1,
    /// the key is wrong).
    HashMismatch,
    /// The line at the anchor's `seq` has another hash than the anchor: the
    /// log was rewritten up to here.
    AnchorMismatch {
        /// The anchor's sequence number.
        seq: u64,
    },
    /// The log ends before the anchor's `seq`: lines (or whole files) were
    /// removed from its end.
    MissingTail {
        /// The last sequence number in the log, if any.
        last_seq: Option<u64>,
        /// The anchor's sequence number.
        anchor_seq: u64,
    },
}

impl Problem {
    /// The problem's stable name, as docs/AUDIT-LOG.md (section 9) and the
    /// vectors spell it: `hash-mismatch`, `seq-mismatch`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Problem::Incomplete => "incomplete",
            Problem::TooLong => "too-long",
            Problem::Malformed(_) => "malformed",
            Problem::NotCanonical => "not-canonical",
            Problem::HeaderExpected => "header-expected",
            Problem::UnexpectedHeader => "unexpected-header",
            Problem::EmptyFile => "empty-file",
            Problem::NotGenesis { .. } => "not-genesis",
            Problem::SegmentMismatch { .. } => "segment-mismatch",
            Problem::MacChanged { .. } => "mac-changed",
            Problem::Unkeyed => "unkeyed",
            Problem::WrongKey { .. } => "wrong-key",
            Problem::SeqMismatch { .. } => "seq-mismatch",
            Problem::PrevMismatch => "prev-mismatch",
            Problem::HashMismatch => "hash-mismatch",
            Problem::AnchorMismatch { .. } => "anchor-mismatch",
            Problem::MissingTail { .. } => "missing-tail",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Incomplete => f.write_str(
                "incomplete line (no newline at the end of the file): a write torn by a crash, or the file was cut short",
            ),
            Problem::TooLong => write!(f, "line longer than {MAX_LINE} bytes: not an audit entry"),
            Problem::Malformed(why) => write!(f, "not a valid audit entry: {why}"),
            Problem::NotCanonical => f.write_str(
                "the entry is not in the canonical form the log writes: it was edited",
            ),
            Problem::HeaderExpected => f.write_str("the first line of a file must be a header"),
            Problem::UnexpectedHeader => f.write_str("a header in the middle of a file"),
            Problem::EmptyFile => f.write_str("the file is empty"),
            Problem::NotGenesis { segment } => write!(
                f,
                "the log does not start at its beginning (this file is segment {segment}): earlier files or lines are missing; give them too, or a start anchor"
            ),
            Problem::SegmentMismatch { expected, found } => write!(
                f,
                "expected the header of segment {expected}, found segment {found}: a rotated file is missing, duplicated or out of order"
            ),
            Problem::MacChanged { expected, found } => write!(
                f,
                "this file is {found} but the log is {expected}: files of different logs were mixed, or the header was edited"
            ),
            Problem::Unkeyed => f.write_str(
                "an audit key was given but the log is unkeyed (sha256): anyone able to rewrite the files could have recomputed its chain",
            ),
            Problem::WrongKey { expected, found } => write!(
                f,
                "the log is keyed with key id {found}, not with the given key (key id {expected})"
            ),
            Problem::SeqMismatch { expected, found } => {
                if found > expected {
                    write!(
                        f,
                        "sequence number {found}, expected {expected}: {} entr{} missing before this line (deleted), or lines were reordered",
                        found - expected,
                        if found - expected == 1 { "y is" } else { "ies are" }
                    )
                } else {
                    write!(
                        f,
                        "sequence number {found}, expected {expected}: this line was inserted, duplicated or moved"
                    )
                }
            }
            Problem::PrevMismatch => f.write_str(
                "does not chain to the line before it (prev is not that line's hash): the line before was edited or replaced, or this line was inserted or moved",
            ),
            Problem::HashMismatch => f.write_str(
                "the hash does not verify: this line was edited (or the audit key is wrong)",
            ),
            Problem::AnchorMismatch { seq } => write!(
                f,
                "the anchor says entry {seq} has another hash: the log was rewritten up to here"
            ),
            Problem::MissingTail {
                last_seq,
                anchor_seq,
            } => match last_seq {
                Some(last) => write!(
                    f,
                    "the log ends at entry {last} but the anchor expects entry {anchor_seq}: {} entr{} removed from the end",
                    anchor_seq - last,
                    if anchor_seq - last == 1 { "y was" } else { "ies were" }
                ),
                None => write!(
                    f,
                    "the log has no entries but the anchor expects entry {anchor_seq}"
                ),
            },
        }
    }
}

/// How [`read_line`] found the next line of a file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framed {
    /// The end of the file.
    End,
    /// A complete line, now in the buffer without its newline: at most
    /// [`MAX_LINE`] bytes.
    Line,
    /// More than `MAX_LINE` bytes without a newline.
    TooLong,
    /// The end of the file without a newline: a torn last line.
    Incomplete,
}

/// Reads the next line of a file into `buf` (cleared first), reading at
/// most `MAX_LINE` bytes and its newline, so that every reader of the file
/// log frames lines the same way at the boundary.
pub(crate) fn read_line<R: std::io::BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Framed> {
    use std::io::{BufRead as _, Read as _};
    buf.clear();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    Ok(if n == 0 {
        Framed::End
    } else if buf.last() == Some(&b'\n') {
        buf.pop();
        Framed::Line
    } else if buf.len() > MAX_LINE {
        Framed::TooLong
    } else {
        Framed::Incomplete
    })
}

/// Decodes one line (without its newline). Returns the line and its body
/// bytes (what the hash covers). Checks structure and canonical form, not
/// the hash or the chain.
pub(crate) fn decode(line: &[u8]) -> Result<(Line, &[u8]), Problem> {
    let malformed = |why: &str| Problem::Malformed(why.to_owned());
    if line.len() > MAX_LINE {
        return Err(Problem::TooLong);
    }
    if line.len() < SUFFIX_LEN + 2 {
        return Err(malformed("too short to be an audit entry"));
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    let hash = suffix
        .strip_prefix(b",\"hash\":\"")
        .and_then(|s| s.strip_suffix(b"\"}"))
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(unhex32)
        .ok_or_else(|| malformed("the line does not end with its \"hash\" member"))?;
    let body_str = std::str::from_utf8(body).map_err(|_| malformed("not UTF-8"))?;
    let mut json = String::with_capacity(body_str.len() + 1);
    json.push_str(body_str);
    json.push('}');
    let value: Value =
        serde_json::from_str(&json).map_err(|e| Problem::Malformed(format!("not JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| malformed("not a JSON object"))?;
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("no unsigned integer \"seq\""))?;
    let prev = unhex32(req_str(obj, "prev").map_err(Problem::Malformed)?)
        .ok_or_else(|| malformed("\"prev\" is not 64 hex digits"))?;
    let time = |obj: &serde_json::Map<String, Value>| -> Result<SystemTime, Problem> {
        parse_timestamp(req_str(obj, "time").map_err(Problem::Malformed)?)
            .ok_or_else(|| malformed("\"time\" is not an RFC 3339 UTC timestamp"))
    };
    let kind = req_str(obj, "type").map_err(Problem::Malformed)?;
    let parsed = match kind {
        "header" => {
            let format = req_str(obj, "format").map_err(Problem::Malformed)?;
            if format != FORMAT {
                return Err(Problem::Malformed(format!(
                    "unknown log format {format:?} (this build reads {FORMAT:?})"
                )));
            }
            let mac = req_str(obj, "mac").map_err(Problem::Malformed)?.to_owned();
            if mac != "sha256" && mac != "hmac-sha256" {
                return Err(Problem::Malformed(format!("unknown mac {mac:?}")));
            }
            let segment = obj
                .get("segment")
                .and_then(Value::as_u64)
                .and_then(|s| u32::try_from(s).ok())
                .filter(|&s| s >= 1)
                .ok_or_else(|| malformed("no valid \"segment\""))?;
            Body::Header(Header {
                mac,
                key_id: opt_str(obj, "key_id").map_err(Problem::Malformed)?,
                segment,
                prev_file: opt_str(obj, "prev_file").map_err(Problem::Malformed)?,
                time: time(obj)?,
            })
        }
        "event" => Body::Event(
            event_from_value(obj.get("event").ok_or_else(|| malformed("no \"event\""))?)
                .map_err(Problem::Malformed)?,
        ),
        "gap" => Body::Gap {
            lost: obj
                .get("lost")
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed("no unsigned integer \"lost\""))?,
            reason: req_str(obj, "reason")
                .map_err(Problem::Malformed)?
                .to_owned(),
            time: time(obj)?,
        },
        other => return Err(Problem::Malformed(format!("unknown line type {other:?}"))),
    };
    if encode_body(seq, &parsed, &prev).as_bytes() != body {
        return Err(Problem::NotCanonical);
    }
    Ok((
        Line {
            seq,
            body: parsed,
            prev,
            hash,
        },
        body,
    ))
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// 64 lowercase hex digits to 32 bytes.
pub(crate) fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Operation, Outcome};

    #[test]
    fn lines_round_trip_and_reject_other_spellings() {
        let mac = Mac::Sha256;
        let e = Event::new(Operation::Unwrap, "local", Outcome::Failed("x\"y".into()))
            .with_key("local:k", Some(3))
            .with_caller("al\u{1}ice", "tréatment");
        let (text, hash) = make_line(&mac, 5, &Body::Event(e.clone()), &[9; 32]);
        let raw = text.trim_end_matches('\n').as_bytes();
        let (line, body) = decode(raw).unwrap();
        assert_eq!(line.seq, 5);
        assert_eq!(line.hash, hash);
        assert_eq!(line.prev, [9; 32]);
        assert_eq!(
            event_body(5, &e.to_json(), &[9; 32]).as_bytes(),
            body,
            "event_body and encode_body agree"
        );
        assert!(mac.matches(&line.prev, body, &line.hash));
        match line.body {
            Body::Event(back) => {
                assert_eq!(back.to_json(), e.to_json());
                assert_eq!(back.actor.as_deref(), Some("al\u{1}ice"));
            }
            other => panic!("{other:?}"),
        }
        // A space, a reordered member, an escaped é: same JSON value, other bytes.
        for edit in [
            text.replacen("\"seq\":5", "\"seq\": 5", 1),
            text.replacen("é", "\\u00e9", 1),
            text.replacen(
                "{\"seq\":5,\"type\":\"event\"",
                "{\"type\":\"event\",\"seq\":5",
                1,
            ),
        ] {
            assert_ne!(edit, text);
            assert_eq!(
                decode(edit.trim_end_matches('\n').as_bytes()).unwrap_err(),
                Problem::NotCanonical
            );
        }
    }
}
