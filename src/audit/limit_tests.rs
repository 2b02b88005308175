//! The longest line, at its boundary: a line of exactly [`MAX_LINE`] bytes
//! (its newline excluded) is accepted by every reader of a trail, one
//! byte more is refused by every one, with the same verdict from the file
//! verifier, the writer resuming the log, the checkpoint digest (signing
//! and verifying) and the table verifier.

use std::path::Path;
use std::time::SystemTime;

use super::checkpoint::{self, CheckpointError, CheckpointKey, TrailDigest};
use super::line::{self, Body, Header, Mac, Problem, MAX_LINE};
use super::{AuditLog, Verifier, VerifyError};

/// An unkeyed trail: its genesis header, then a gap line of exactly `len`
/// bytes without its newline (its `reason` padded). Each line without its
/// newline.
fn trail_with_line_of(len: usize) -> Vec<String> {
    let mac = Mac::Sha256;
    let header = Body::Header(Header {
        mac: mac.name().to_owned(),
        key_id: None,
        segment: 1,
        prev_file: None,
        time: SystemTime::UNIX_EPOCH,
    });
    let (mut first, hash) = line::make_line(&mac, 0, &header, &[0; 32]);
    first.pop();
    let gap = |reason: String| Body::Gap {
        lost: 1,
        reason,
        time: SystemTime::UNIX_EPOCH,
    };
    let (probe, _) = line::make_line(&mac, 1, &gap(String::new()), &hash);
    let pad = len - (probe.len() - 1);
    let (mut second, _) = line::make_line(&mac, 1, &gap("x".repeat(pad)), &hash);
    second.pop();
    assert_eq!(second.len(), len);
    vec![first, second]
}

fn write_log(path: &Path, lines: &[String]) {
    let mut text = String::new();
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Every reader's verdict on the trail: `None` if it accepts it, the
/// problem it names otherwise.
fn verdicts(lines: &[String]) -> Vec<(&'static str, Option<Problem>)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, lines);
    let mut out = Vec::new();

    let bad = |e: VerifyError| match e {
        VerifyError::BadLine(b) => Some(b.problem),
        other => panic!("not a line problem: {other}"),
    };
    out.push((
        "file verifier",
        Verifier::new().verify(&path).err().and_then(bad),
    ));

    let resumed = AuditLog::builder().open(&path);
    out.push((
        "writer resuming the log",
        match resumed {
            Ok(_) => None,
            Err(super::OpenError::Damaged(b)) => Some(b.problem),
            Err(other) => panic!("not a line problem: {other}"),
        },
    ));

    let cp = |e: CheckpointError| match e {
        CheckpointError::BadLine { problem, .. } => Some(problem),
        other => panic!("not a line problem: {other}"),
    };
    let mut digest = TrailDigest::new();
    out.push((
        "checkpoint digest",
        lines
            .iter()
            .try_for_each(|l| digest.update(l.as_bytes()))
            .err()
            .and_then(cp),
    ));
    let key = CheckpointKey::from_seed(&[7; 32]).unwrap();
    out.push((
        "checkpoint of the file log",
        checkpoint::sign_log(&path, &key).err().and_then(cp),
    ));
    // A checkpoint of the header alone, checked against the whole file.
    let mut first = TrailDigest::new();
    first.update(lines[0].as_bytes()).unwrap();
    let signed = key.sign(&first, SystemTime::now()).unwrap();
    out.push((
        "checkpoint verification of the file log",
        checkpoint::verify_log(&path, &[signed], &key.public_key())
            .err()
            .and_then(cp),
    ));

    #[cfg(feature = "postgres")]
    out.push(("table verifier", super::postgres::limit_test_verdict(lines)));
    out
}

#[test]
fn a_line_of_the_limit_is_accepted_everywhere_and_one_byte_more_nowhere() {
    for len in [MAX_LINE - 1, MAX_LINE, MAX_LINE + 1] {
        let lines = trail_with_line_of(len);
        for (reader, verdict) in verdicts(&lines) {
            if len <= MAX_LINE {
                assert_eq!(verdict, None, "{reader} refuses a line of {len} bytes");
            } else {
                assert_eq!(
                    verdict,
                    Some(Problem::TooLong),
                    "{reader} on a line of {len} bytes"
                );
            }
        }
    }
}

/// A line over the limit in the middle of a file is not taken for the
/// end of the trail: what follows it is not silently left out of a
/// checkpoint.
#[test]
fn a_long_line_before_others_is_refused_not_taken_for_the_end() {
    let mut lines = trail_with_line_of(MAX_LINE + 1);
    lines.push(lines[0].clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, &lines);
    let key = CheckpointKey::from_seed(&[7; 32]).unwrap();
    match checkpoint::sign_log(&path, &key) {
        Err(CheckpointError::BadLine { index, problem, .. }) => {
            assert_eq!((index, problem), (1, Problem::TooLong));
        }
        other => panic!("signed a trail with a line too long: {other:?}"),
    }
}
