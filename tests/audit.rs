//! The audit trail: event schema, the hash-chained JSON Lines log (rotation,
//! resume, fsync policies, concurrency), the verifier against every kind of
//! tampering, fail-closed keyrings, and one event per key access of the
//! conformance workload.

mod conformance;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use conformance::{ctx, MemoryKms};
use phi_envelope::audit::{
    self, Anchor, AuditKey, AuditLog, FsyncPolicy, OpenError, Problem, Verifier, VerifyError,
};
use phi_envelope::events::{
    Event, EventSink, FanOut, MemorySink, NoopSink, Operation, Outcome, SinkError,
};
use phi_envelope::policy::{Decision, FnPolicy};
use phi_envelope::provider::KeyState;
use phi_envelope::{Caller, Envelope, Error, Keyring};

fn key() -> AuditKey {
    AuditKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

fn other_key() -> AuditKey {
    AuditKey::new(b"fedcba9876543210fedcba9876543210").unwrap()
}

fn ev(i: u64) -> Event {
    Event::new(Operation::Unwrap, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller(format!("actor-{i}"), "treatment")
        .with_context_fingerprint("00112233445566778899aabbccddeeff")
        .with_duration(Duration::from_micros(i))
}

fn read_lines(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap();
    text.split_inclusive('\n').map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.concat()).unwrap();
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line.trim_end()).unwrap()
}

/// A log of `n` events (seq 1..=n after the header at seq 0).
fn log_with(dir: &Path, n: u64, audit_key: Option<AuditKey>) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let mut b = AuditLog::builder().fsync(FsyncPolicy::Never);
    if let Some(k) = audit_key {
        b = b.audit_key(k);
    }
    let log = b.open(&path).unwrap();
    for i in 0..n {
        log.append(&ev(i)).unwrap();
    }
    path
}

fn bad(r: Result<audit::VerifyReport, VerifyError>) -> audit::BadLine {
    match r {
        Err(VerifyError::BadLine(b)) => b,
        other => panic!("expected a bad line, got {other:?}"),
    }
}

/// The unkeyed hash of a line body, as documented, computed independently
/// (RustCrypto SHA-256).
fn sha256_line(prev_hex: &str, body: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"phi-envelope-audit/1\0");
    h.update(hex::decode(prev_hex).unwrap());
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

/// The keyed hash, computed independently (RustCrypto HMAC).
fn hmac_line(key: &[u8], prev_hex: &str, body: &str) -> String {
    use hmac::{Mac, SimpleHmac};
    let mut m = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(b"phi-envelope-audit/1\0");
    m.update(&hex::decode(prev_hex).unwrap());
    m.update(body.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Splits a line into its hashed body and its hash.
fn split_line(line: &str) -> (&str, &str) {
    let line = line.trim_end_matches('\n');
    let at = line.rfind(",\"hash\":\"").unwrap();
    (&line[..at], &line[at + 9..line.len() - 2])
}

// ---------------------------------------------------------------- schema

#[test]
fn event_json_has_the_documented_schema() {
    let e = ev(7).with_timestamp(UNIX_EPOCH + Duration::from_nanos(1_795_604_461_123_456_789));
    let text = e.to_json();
    assert_eq!(
        text,
        "{\"timestamp\":\"2026-11-25T11:01:01.123456Z\",\"operation\":\"unwrap\",\"provider\":\"local\",\
         \"key_ref\":\"local:records\",\"key_version\":1,\"actor\":\"actor-7\",\"purpose\":\"treatment\",\
         \"context_fingerprint\":\"00112233445566778899aabbccddeeff\",\"outcome\":\"success\",\"duration_us\":7}"
    );
    let back = Event::from_json(&text).unwrap();
    assert_eq!(back.to_json(), text);
    assert_eq!(
        back.timestamp,
        UNIX_EPOCH + Duration::from_micros(1_795_604_461_123_456),
        "sub-microsecond digits are truncated"
    );
    // Absent values are explicit nulls; every operation and outcome round-trips.
    for op in Operation::ALL {
        for outcome in [
            Outcome::Success,
            Outcome::Denied,
            Outcome::Rejected,
            Outcome::Failed("key-destroyed".into()),
        ] {
            let e = Event::new(*op, "aws-kms", outcome.clone());
            let j = e.to_json();
            let v = json(&j);
            assert_eq!(v["key_ref"], serde_json::Value::Null);
            assert_eq!(v["operation"], op.as_str());
            assert_eq!(v["outcome"], outcome.as_string());
            assert_eq!(Event::from_json(&j).unwrap().to_json(), j);
        }
    }
    let keys: Vec<String> = json(&text).as_object().unwrap().keys().cloned().collect();
    let mut expected = vec![
        "timestamp",
        "operation",
        "provider",
        "key_ref",
        "key_version",
        "actor",
        "purpose",
        "context_fingerprint",
        "outcome",
        "duration_us",
    ];
    expected.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, expected);
    assert!(Event::from_json("{\"timestamp\":\"yesterday\"}").is_err());
}

#[test]
fn anchors_print_and_parse() {
    let a = Anchor {
        seq: 42,
        hash: "ab".repeat(32),
    };
    assert_eq!(a.to_string().parse::<Anchor>().unwrap(), a);
    assert!("42".parse::<Anchor>().is_err());
    assert!("x:00".parse::<Anchor>().is_err());
    assert!(AuditKey::new(&[0; 31]).is_err());
    assert!(!format!("{:?}", key()).contains("0123456789abcdef0123"));
    assert_ne!(key().key_id(), other_key().key_id());
}

// ---------------------------------------------------------------- the log

#[test]
fn lines_chain_and_hash_as_documented() {
    for keyed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 5, keyed.then(key));
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 6);
        let mut prev = "0".repeat(64);
        for (i, line) in lines.iter().enumerate() {
            let v = json(line);
            assert_eq!(v["seq"], i as u64);
            assert_eq!(v["prev"], prev.as_str());
            let (body, hash) = split_line(line);
            let expected = if keyed {
                hmac_line(b"0123456789abcdef0123456789abcdef", &prev, body)
            } else {
                sha256_line(&prev, body)
            };
            assert_eq!(hash, expected, "line {i}");
            assert_eq!(v["hash"], hash);
            prev = hash.to_owned();
        }
        let h = json(&lines[0]);
        assert_eq!(h["type"], "header");
        assert_eq!(h["format"], "phi-envelope-audit/1");
        assert_eq!(h["segment"], 1);
        assert_eq!(h["prev_file"], serde_json::Value::Null);
        if keyed {
            assert_eq!(h["mac"], "hmac-sha256");
            assert_eq!(h["key_id"], key().key_id());
        } else {
            assert_eq!(h["mac"], "sha256");
            assert_eq!(h["key_id"], serde_json::Value::Null);
        }
        let e = json(&lines[3]);
        assert_eq!(e["type"], "event");
        assert_eq!(e["event"]["actor"], "actor-2");
        assert_eq!(
            Event::from_json(&e["event"].to_string())
                .unwrap()
                .actor
                .as_deref(),
            Some("actor-2")
        );

        let v = Verifier::new();
        let v = if keyed { v.key(key()) } else { v };
        let report = v.verify(&path).unwrap();
        assert_eq!(report.entries, 5);
        assert_eq!(report.lines, 6);
        assert_eq!(report.keyed, keyed);
        assert_eq!(report.last.seq, 5);
        assert_eq!(report.last.hash, prev);
        assert!(report.gaps.is_empty());
    }
}

#[test]
fn reopening_resumes_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let anchor = {
        let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
        for i in 0..3 {
            log.append(&ev(i)).unwrap();
        }
        log.anchor()
    };
    assert_eq!(anchor.seq, 3);
    {
        let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
        assert_eq!(log.anchor(), anchor);
        assert_eq!(log.append(&ev(3)).unwrap(), 4);
    }
    let report = Verifier::new()
        .key(key())
        .anchor(anchor)
        .verify(&path)
        .unwrap();
    assert_eq!(report.entries, 4);
    assert_eq!(read_lines(&path).len(), 5, "no second header on resume");

    // The wrong key, no key, or a key for an unkeyed log: refused at open.
    for b in [
        AuditLog::builder().audit_key(other_key()),
        AuditLog::builder(),
    ] {
        match b.open(&path) {
            Err(OpenError::KeyMismatch {
                expected, found, ..
            }) => {
                assert!(found.contains(key().key_id()), "{found}");
                assert_ne!(expected, found);
            }
            other => panic!("expected KeyMismatch, got {other:?}"),
        }
    }
    // Two writers in one process would fork the chain.
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    assert!(matches!(
        AuditLog::builder().audit_key(key()).open(&path),
        Err(OpenError::InUse(_))
    ));
    drop(log);
    AuditLog::builder().audit_key(key()).open(&path).unwrap();
}

#[test]
fn open_refuses_a_damaged_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 4, Some(key()));
    let good = read_lines(&path);

    // The last entry edited: the chain cannot be resumed from it.
    let mut lines = good.clone();
    lines[4] = lines[4].replace("actor-3", "actor-X");
    write_lines(&path, &lines);
    match AuditLog::builder().audit_key(key()).open(&path) {
        Err(OpenError::Damaged(b)) => {
            assert_eq!(b.line, 5);
            assert_eq!(b.problem, Problem::HashMismatch);
        }
        other => panic!("expected Damaged, got {other:?}"),
    }

    // A torn last write: refused by default...
    let mut lines = good.clone();
    let half = lines[4].len() / 2;
    lines[4].truncate(half);
    write_lines(&path, &lines);
    match AuditLog::builder().audit_key(key()).open(&path) {
        Err(OpenError::Damaged(b)) => {
            assert_eq!(b.line, 5);
            assert_eq!(b.problem, Problem::Incomplete);
            assert!(b.to_string().contains("line 5"), "{b}");
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
    // ...and repaired on request: the partial line is cut and a gap line
    // says so; the chain continues from the last complete line.
    {
        let log = AuditLog::builder()
            .audit_key(key())
            .repair_torn_tail(true)
            .open(&path)
            .unwrap();
        log.append(&ev(9)).unwrap();
    }
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 4);
    assert_eq!(report.lost_events(), 1);
    assert_eq!(report.gaps[0].reason, "torn-tail");
    assert_eq!(report.gaps[0].line, 5);
}

/// The gap line that records a torn last line counts exactly the events
/// the torn write took with it: none for a file's header (written alone),
/// one for an event line, and for a gap line cut short, the events it was
/// recording (and the event written with it, for `write-failed`).
#[test]
fn a_torn_tail_gap_counts_exactly_the_events_the_torn_line_held() {
    let dir = tempfile::tempdir().unwrap();
    let torn_after_three = |name: &str, torn: &str| -> PathBuf {
        let sub = dir.path().join(name);
        fs::create_dir(&sub).unwrap();
        let path = log_with(&sub, 3, Some(key()));
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(torn);
        fs::write(&path, text).unwrap();
        path
    };
    let cases: Vec<(&str, PathBuf, u64)> = vec![
        (
            "the header of a rotated file",
            {
                let sub = dir.path().join("rotated");
                fs::create_dir(&sub).unwrap();
                let path = log_with(&sub, 3, Some(key()));
                fs::write(sub.join("audit.jsonl.000002"), "{\"seq\":4,\"type\":\"hea").unwrap();
                path
            },
            0,
        ),
        (
            "the genesis header",
            {
                let sub = dir.path().join("genesis");
                fs::create_dir(&sub).unwrap();
                let path = sub.join("audit.jsonl");
                fs::write(&path, "{\"seq\":0,\"type\":\"header\",\"format\":\"phi-en").unwrap();
                path
            },
            0,
        ),
        (
            "an event line",
            torn_after_three("event", "{\"seq\":4,\"type\":\"event\",\"event\":{\"timest"),
            1,
        ),
        (
            "a line cut before its type",
            torn_after_three("short", "{\"seq\":4,"),
            1,
        ),
        (
            "a write-failed gap line and its event",
            torn_after_three(
                "write-failed",
                "{\"seq\":4,\"type\":\"gap\",\"lost\":2,\"reason\":\"write-failed\",\"time\":\"2026-",
            ),
            3,
        ),
        (
            "a torn-tail gap line",
            torn_after_three(
                "torn-tail",
                "{\"seq\":4,\"type\":\"gap\",\"lost\":1,\"reason\":\"torn-tail\",\"ti",
            ),
            1,
        ),
    ];
    for (what, path, lost) in cases {
        {
            let log = AuditLog::builder()
                .audit_key(key())
                .repair_torn_tail(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            log.append(&ev(9)).unwrap();
        }
        let report = Verifier::new().key(key()).verify(&path).unwrap();
        assert_eq!(report.gaps.len(), 1, "{what}: {:?}", report.gaps);
        assert_eq!(report.gaps[0].reason, "torn-tail", "{what}");
        assert_eq!(report.lost_events(), lost, "{what}: {:?}", report.gaps);
    }
}

/// Bytes after the last newline longer than any line are no torn write of
/// a writer: the repair refuses them (too long) and cuts nothing.
#[test]
fn a_tail_longer_than_any_line_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [70_000usize, 300_000] {
        let path = log_with(dir.path(), 3, Some(key()));
        let mut text = fs::read(&path).unwrap();
        text.extend(std::iter::repeat_n(b'x', extra));
        fs::write(&path, &text).unwrap();
        match AuditLog::builder()
            .audit_key(key())
            .repair_torn_tail(true)
            .open(&path)
        {
            Err(OpenError::Damaged(b)) => {
                assert_eq!(b.problem, Problem::TooLong, "{extra}: {b}");
                assert_eq!(b.line, 5, "{extra}: {b}");
            }
            other => panic!("{extra}: expected Damaged, got {other:?}"),
        }
        assert_eq!(fs::read(&path).unwrap(), text, "{extra}: nothing cut");
        fs::remove_file(&path).unwrap();
    }
}

#[test]
fn rotation_keeps_one_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let open = || {
        AuditLog::builder()
            .audit_key(key())
            .max_file_bytes(2_000)
            .open(&path)
            .unwrap()
    };
    {
        let log = open();
        for i in 0..20 {
            log.append(&ev(i)).unwrap();
        }
        assert_ne!(log.current_file(), path);
    }
    {
        // Resumes in the last file.
        let log = open();
        for i in 20..30 {
            log.append(&ev(i)).unwrap();
        }
    }
    let files = audit::log_files(&path).unwrap();
    assert!(files.len() >= 5, "{files:?}");
    assert_eq!(files[0], path);
    assert_eq!(files[1], dir.path().join("audit.jsonl.000002"));
    for (i, f) in files.iter().enumerate() {
        assert!(fs::metadata(f).unwrap().len() <= 2_000, "{f:?}");
        let lines = read_lines(f);
        let h = json(&lines[0]);
        assert_eq!(h["type"], "header");
        assert_eq!(h["segment"], i as u64 + 1);
        if i > 0 {
            // The header names the previous file and chains to its last line.
            let prev_lines = read_lines(&files[i - 1]);
            let last = json(prev_lines.last().unwrap());
            assert_eq!(
                h["prev_file"],
                files[i - 1].file_name().unwrap().to_str().unwrap()
            );
            assert_eq!(h["prev"], last["hash"]);
            assert_eq!(
                h["seq"].as_u64().unwrap(),
                last["seq"].as_u64().unwrap() + 1
            );
        }
    }
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 30);
    assert_eq!(report.files.len(), files.len());

    // Tampering in a rotated file is named in that file.
    let f2 = &files[1];
    let good2 = read_lines(f2);
    let mut lines = good2.clone();
    lines[2] = lines[2].replace("treatment", "treatmenT");
    write_lines(f2, &lines);
    let b = bad(Verifier::new().key(key()).verify(&path));
    assert_eq!((b.file.as_path(), b.line), (f2.as_path(), 3));
    assert_eq!(b.problem, Problem::HashMismatch);
    write_lines(f2, &good2);

    // A middle file deleted: the next file's header is out of sequence.
    let moved = dir.path().join("aside");
    fs::rename(f2, &moved).unwrap();
    let b = bad(Verifier::new().key(key()).verify(&path));
    assert_eq!((b.file.as_path(), b.line), (files[2].as_path(), 1));
    assert_eq!(
        b.problem,
        Problem::SegmentMismatch {
            expected: 2,
            found: 3
        }
    );
    fs::rename(&moved, f2).unwrap();

    // The last file deleted: only an anchor shows it.
    let anchor = report.last.clone();
    let last = files.last().unwrap();
    fs::rename(last, &moved).unwrap();
    let shorter = Verifier::new().key(key()).verify(&path).unwrap();
    assert!(shorter.entries < 30);
    let b = bad(Verifier::new()
        .key(key())
        .anchor(anchor.clone())
        .verify(&path));
    assert!(
        matches!(b.problem, Problem::MissingTail { anchor_seq, .. } if anchor_seq == anchor.seq)
    );
    assert_eq!(b.file, files[files.len() - 2]);
    fs::rename(&moved, last).unwrap();

    // The first file archived away: not the start of the log, unless a
    // start anchor (the archived file's last seq and hash) is given.
    let first_end = report.files[0].seqs.1;
    let first_hash = json(read_lines(&files[0]).last().unwrap())["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = bad(Verifier::new().key(key()).verify_files(&files[1..]));
    assert_eq!((b.file.as_path(), b.line), (files[1].as_path(), 1));
    assert_eq!(b.problem, Problem::NotGenesis { segment: 2 });
    let partial = Verifier::new()
        .key(key())
        .start_after(Anchor {
            seq: first_end,
            hash: first_hash,
        })
        .verify_files(&files[1..])
        .unwrap();
    assert_eq!(partial.last, report.last);

    // Files given out of order.
    let mut swapped = files.clone();
    swapped.swap(1, 2);
    let b = bad(Verifier::new().key(key()).verify_files(&swapped));
    assert_eq!((b.file.as_path(), b.line), (files[2].as_path(), 1));
}

#[test]
fn a_rotation_cut_short_by_a_crash_is_completed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 3, Some(key()));
    // The next file was created, then the process died before its header.
    let next = dir.path().join("audit.jsonl.000002");
    fs::write(&next, b"").unwrap();
    {
        let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
        assert_eq!(log.current_file(), next);
        log.append(&ev(3)).unwrap();
    }
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 4);
    assert_eq!(report.files.len(), 2);
    assert_eq!(json(&read_lines(&next)[0])["prev_file"], "audit.jsonl");
}

/// A writer killed between creating the next file and writing its header
/// leaves an empty last file: a state the next writer completes (above),
/// not damage. The verifier accepts it (it holds no line) and does not
/// list it; an empty file before the last one is still damage.
#[test]
fn an_empty_last_file_left_by_a_rotation_cut_short_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 3, Some(key()));
    let before = Verifier::new().key(key()).verify(&path).unwrap();
    let next = dir.path().join("audit.jsonl.000002");
    fs::write(&next, b"").unwrap();
    for report in [
        Verifier::new().key(key()).verify(&path).unwrap(),
        Verifier::new()
            .key(key())
            .anchor(before.last.clone())
            .verify_files(&[path.clone(), next.clone()])
            .unwrap(),
    ] {
        assert_eq!(report.entries, 3);
        assert_eq!(report.last, before.last);
        assert_eq!(report.files, before.files, "the empty file is not listed");
    }
    // An empty file followed by another is a file emptied: named there.
    let third = dir.path().join("audit.jsonl.000003");
    fs::write(&third, b"").unwrap();
    let b = bad(Verifier::new().key(key()).verify(&path));
    assert_eq!((b.file.as_path(), b.line), (next.as_path(), 1));
    assert_eq!(b.problem, Problem::EmptyFile);
}

#[test]
fn fsync_policies_all_write_every_entry() {
    for policy in [
        FsyncPolicy::EveryEntry,
        FsyncPolicy::EveryN(100),
        FsyncPolicy::EveryN(0),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::builder().fsync(policy).open(&path).unwrap();
        for i in 0..250 {
            log.append(&ev(i)).unwrap();
        }
        log.sync().unwrap();
        // Written to the file at once, whatever the fsync policy.
        assert_eq!(audit::verify(&path).unwrap().entries, 250, "{policy:?}");
        drop(log);
        assert_eq!(audit::verify(&path).unwrap().entries, 250, "{policy:?}");
    }
}

#[test]
fn open_fails_cleanly_where_nothing_can_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    // The parent of the log is a file: no log (tests run as root, so
    // permission bits would not stop a write; this does).
    match AuditLog::open(file.join("audit.jsonl")) {
        Err(OpenError::Io { .. }) => {}
        other => panic!("expected Io, got {other:?}"),
    }
    // A device is not a log file.
    assert!(AuditLog::open("/dev/full").is_err());
}

// ---------------------------------------------------------------- verifier

#[test]
fn every_kind_of_tampering_is_named_at_its_line() {
    // Lines: 1 = header (seq 0), k + 1 = event seq k, 11 lines in all.
    type Edit = fn(&mut Vec<String>);
    type Check = fn(&Problem) -> bool;
    let cases: Vec<(&str, Edit, u64, Check)> = vec![
        (
            "edited entry",
            |l| l[4] = l[4].replace("actor-3", "actor-9"),
            5,
            |p| *p == Problem::HashMismatch,
        ),
        (
            "edited duration",
            |l| l[6] = l[6].replace("\"duration_us\":5", "\"duration_us\":6"),
            7,
            |p| *p == Problem::HashMismatch,
        ),
        (
            "reformatted entry",
            |l| l[4] = l[4].replacen("\"seq\":4", "\"seq\": 4", 1),
            5,
            |p| *p == Problem::NotCanonical,
        ),
        (
            "extra member",
            |l| l[4] = l[4].replacen("\"type\":\"event\"", "\"type\":\"event\",\"x\":1", 1),
            5,
            |p| *p == Problem::NotCanonical,
        ),
        (
            "deleted entry",
            |l| {
                l.remove(4);
            },
            5,
            |p| {
                *p == Problem::SeqMismatch {
                    expected: 4,
                    found: 5,
                }
            },
        ),
        (
            "deleted header",
            |l| {
                l.remove(0);
            },
            1,
            |p| *p == Problem::HeaderExpected,
        ),
        (
            "duplicated entry",
            |l| {
                let copy = l[2].clone();
                l.insert(7, copy);
            },
            8,
            |p| {
                *p == Problem::SeqMismatch {
                    expected: 7,
                    found: 2,
                }
            },
        ),
        (
            "forged entry inserted",
            |l| {
                // The right seq and prev, a made-up hash; later lines renumbered.
                let prev = json(&l[6])["hash"].as_str().unwrap().to_owned();
                let forged = ev(99).to_json();
                let line = format!(
                    "{{\"seq\":7,\"type\":\"event\",\"event\":{forged},\"prev\":\"{prev}\",\"hash\":\"{}\"}}\n",
                    "ab".repeat(32)
                );
                l.insert(7, line);
            },
            8,
            |p| *p == Problem::HashMismatch,
        ),
        (
            "reordered entries",
            |l| l.swap(3, 4),
            4,
            |p| {
                *p == Problem::SeqMismatch {
                    expected: 3,
                    found: 4,
                }
            },
        ),
        (
            "truncated last line",
            |l| {
                let n = l.len() - 1;
                let half = l[n].len() / 2;
                l[n].truncate(half);
            },
            11,
            |p| *p == Problem::Incomplete,
        ),
        (
            "garbage line",
            |l| l[5] = "not json at all\n".into(),
            6,
            |p| matches!(p, Problem::Malformed(_)),
        ),
        (
            "second header",
            |l| {
                let h = l[0].clone();
                l.insert(3, h);
            },
            4,
            |p| *p == Problem::UnexpectedHeader,
        ),
        (
            "header claims an unkeyed log",
            |l| l[0] = l[0].replace("\"hmac-sha256\"", "\"sha256\""),
            1,
            |p| *p == Problem::Unkeyed,
        ),
        ("empty file", |l| l.clear(), 1, |p| *p == Problem::EmptyFile),
    ];
    for (name, edit, line, check) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 10, Some(key()));
        let mut lines = read_lines(&path);
        edit(&mut lines);
        write_lines(&path, &lines);
        let b = bad(Verifier::new().key(key()).verify(&path));
        assert_eq!(b.file, path, "{name}");
        assert_eq!(b.line, line, "{name}: {b}");
        assert!(check(&b.problem), "{name}: {b}");
        // The message names the file and the line.
        let msg = VerifyError::BadLine(b).to_string();
        assert!(msg.contains(&format!("audit.jsonl line {line}")), "{msg}");
    }
}

#[test]
fn a_missing_tail_needs_an_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 10, Some(key()));
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    let anchor = report.last.clone();
    let mid = Anchor {
        seq: 5,
        hash: json(&read_lines(&path)[5])["hash"].as_str().unwrap().into(),
    };
    let mut lines = read_lines(&path);
    lines.truncate(9); // entries 9 and 10 removed cleanly, at a line boundary
    write_lines(&path, &lines);
    // Without an anchor, a shorter chain is a valid chain.
    assert_eq!(Verifier::new().key(key()).verify(&path).unwrap().entries, 8);
    // With one, the loss is named: after line 9.
    let b = bad(Verifier::new()
        .key(key())
        .anchor(anchor.clone())
        .verify(&path));
    assert_eq!(b.line, 10);
    assert_eq!(
        b.problem,
        Problem::MissingTail {
            last_seq: Some(8),
            anchor_seq: 10
        }
    );
    assert!(b.to_string().contains("2 entries were removed"), "{b}");
    // An older anchor still verifies (the log may grow past an anchor).
    Verifier::new()
        .key(key())
        .anchor(mid.clone())
        .verify(&path)
        .unwrap();
    // A wrong hash at the anchor's seq is named there.
    let wrong = Anchor {
        seq: 5,
        hash: "00".repeat(32),
    };
    let b = bad(Verifier::new().key(key()).anchor(wrong).verify(&path));
    assert_eq!(b.line, 6);
    assert_eq!(b.problem, Problem::AnchorMismatch { seq: 5 });
}

#[test]
fn keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = log_with(dir.path(), 3, Some(key()));
    match audit::verify(&keyed) {
        Err(VerifyError::KeyRequired { key_id, .. }) => assert_eq!(key_id, key().key_id()),
        other => panic!("expected KeyRequired, got {other:?}"),
    }
    let b = bad(Verifier::new().key(other_key()).verify(&keyed));
    assert_eq!(b.line, 1);
    assert!(matches!(b.problem, Problem::WrongKey { .. }));

    let dir = tempfile::tempdir().unwrap();
    let unkeyed = log_with(dir.path(), 3, None);
    let b = bad(Verifier::new().key(key()).verify(&unkeyed));
    assert_eq!((b.line, b.problem), (1, Problem::Unkeyed));
    assert!(matches!(
        audit::verify(dir.path().join("nope.jsonl")),
        Err(VerifyError::Io { .. })
    ));
}

#[test]
fn an_unkeyed_chain_can_be_recomputed_and_only_an_anchor_catches_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 10, None);
    let anchor = audit::verify(&path).unwrap().last;
    let mut lines = read_lines(&path);

    // A naive edit with its own hash recomputed: the next line breaks.
    let (body, _) = split_line(&lines[4]);
    let body = body.replace("actor-3", "actor-9");
    let prev = json(&lines[3])["hash"].as_str().unwrap().to_owned();
    lines[4] = format!("{body},\"hash\":\"{}\"}}\n", sha256_line(&prev, &body));
    write_lines(&path, &lines);
    let b = bad(audit::verify(&path));
    assert_eq!((b.line, b.problem), (6, Problem::PrevMismatch));

    // Rewriting everything after it too: the chain verifies. This is the
    // documented limit of the unkeyed mode...
    let mut prev = json(&lines[4])["hash"].as_str().unwrap().to_owned();
    for line in lines.iter_mut().skip(5) {
        let (body, _) = split_line(line);
        let old_prev = json(line)["prev"].as_str().unwrap().to_owned();
        let body = body.replace(&old_prev, &prev);
        let hash = sha256_line(&prev, &body);
        *line = format!("{body},\"hash\":\"{hash}\"}}\n");
        prev = hash;
    }
    write_lines(&path, &lines);
    assert_eq!(audit::verify(&path).unwrap().entries, 10);
    // ...which an anchor kept elsewhere defeats.
    let b = bad(audit::verify_with_anchor(&path, &anchor));
    assert_eq!(
        (b.line, b.problem),
        (11, Problem::AnchorMismatch { seq: 10 })
    );
}

// ---------------------------------------------------------------- concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_tasks_lose_no_entry_and_keep_the_chain() {
    for rotate in [None, Some(64 * 1024)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // Without rotation: fsync every entry (group commit); with it:
        // every 50 entries.
        let mut b = AuditLog::builder().audit_key(key());
        if let Some(bytes) = rotate {
            b = b.max_file_bytes(bytes).fsync(FsyncPolicy::EveryN(50));
        }
        let log: Arc<dyn EventSink> = Arc::new(b.open(&path).unwrap());
        let mut tasks = Vec::new();
        for t in 0..16u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    let e = Event::new(Operation::Generate, "local", Outcome::Success)
                        .with_caller(format!("task-{t}"), format!("n-{i}"));
                    log.record(&e).unwrap();
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(log);
        let report = Verifier::new().key(key()).verify(&path).unwrap();
        assert_eq!(report.entries, 3200, "rotate {rotate:?}");
        if rotate.is_some() {
            assert!(report.files.len() > 3, "{:?}", report.files.len());
        }
        // Every (task, i) exactly once, each task's events in its order.
        let mut seen = vec![Vec::new(); 16];
        for f in audit::log_files(&path).unwrap() {
            for line in read_lines(&f) {
                let v = json(&line);
                if v["type"] != "event" {
                    continue;
                }
                let t: usize = v["event"]["actor"].as_str().unwrap()[5..].parse().unwrap();
                let i: u32 = v["event"]["purpose"].as_str().unwrap()[2..]
                    .parse()
                    .unwrap();
                seen[t].push(i);
            }
        }
        for (t, s) in seen.iter().enumerate() {
            assert_eq!(*s, (0..200).collect::<Vec<_>>(), "task {t}");
        }
    }
}

// ---------------------------------------------------------------- keyring

fn keyring_with(
    kms: &Arc<MemoryKms>,
    key: &phi_envelope::KeyRef,
    sink: Arc<dyn EventSink>,
    fail_closed: bool,
) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .event_sink(sink)
            .fail_closed(fail_closed)
            .build()
            .unwrap(),
    )
    .as_caller("lab-service", "treatment")
}

#[derive(Debug)]
struct BrokenSink;

impl EventSink for BrokenSink {
    fn record(&self, _: &Event) -> Result<(), SinkError> {
        Err(SinkError("disk on fire".into()))
    }
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_key_operations() {
    let kms = Arc::new(MemoryKms::new("kms"));
    let k = kms.add_key("records");
    let dir = tempfile::tempdir().unwrap();
    let logdir = dir.path().join("logs");
    fs::create_dir(&logdir).unwrap();
    let path = logdir.join("audit.jsonl");
    // Rotate before every entry, so every entry needs a new file.
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(key())
            .max_file_bytes(1)
            .open(&path)
            .unwrap(),
    );
    let env = keyring_with(&kms, &k, log.clone(), true);
    let c = ctx("1");
    let sealed = env.seal(b"potassium 4.1", &c).await.unwrap();
    assert_eq!(env.open(&sealed, &c).await.unwrap(), b"potassium 4.1");

    // The log's directory disappears (a volume unmounted, a cleanup job).
    fs::remove_dir_all(&logdir).unwrap();
    let e = env.seal(b"potassium 4.2", &c).await.unwrap_err();
    assert!(matches!(e, Error::Audit(_)), "{e:?}");
    assert!(
        e.to_string().contains("audit log unavailable") && e.to_string().contains("audit.jsonl"),
        "{e}"
    );
    // The caller gets no plaintext: the DEK was unwrapped by the provider
    // but dropped (zeroized) when its event could not be written.
    let calls = kms.calls.load(Ordering::SeqCst);
    let e = env.open(&sealed, &c).await.unwrap_err();
    assert!(matches!(e, Error::Audit(_)), "{e:?}");
    assert_eq!(kms.calls.load(Ordering::SeqCst), calls + 1);
    assert!(matches!(
        env.decryptor(&sealed[..], &c).await.err(),
        Some(Error::Audit(_))
    ));
    assert!(matches!(
        env.rewrap(&sealed, &c).await.unwrap_err(),
        Error::Audit(_)
    ));

    // Configured to log and continue: the operations go ahead.
    let lenient = keyring_with(&kms, &k, log.clone(), false);
    let sealed2 = lenient.seal(b"potassium 4.3", &c).await.unwrap();
    assert_eq!(lenient.open(&sealed2, &c).await.unwrap(), b"potassium 4.3");

    // Any sink failure, same story.
    let env = keyring_with(&kms, &k, Arc::new(BrokenSink), true);
    assert!(matches!(
        env.open(&sealed, &c).await.unwrap_err(),
        Error::Audit(m) if m.contains("disk on fire")
    ));
    let env = keyring_with(&kms, &k, Arc::new(BrokenSink), false);
    assert_eq!(env.open(&sealed, &c).await.unwrap(), b"potassium 4.1");
}

#[tokio::test]
async fn events_lost_while_the_log_was_failing_are_recorded_as_a_gap() {
    let kms = Arc::new(MemoryKms::new("kms"));
    let k = kms.add_key("records");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(key())
            .max_file_bytes(1)
            .open(&path)
            .unwrap(),
    );
    let c = ctx("1");
    let env = keyring_with(&kms, &k, log.clone(), false);
    env.seal(b"a", &c).await.unwrap();
    // Something occupies the name of the next file: rotation fails.
    let blocker = dir.path().join("audit.jsonl.000002");
    fs::create_dir(&blocker).unwrap();
    for _ in 0..3 {
        env.seal(b"b", &c).await.unwrap(); // fail-open: goes ahead
    }
    assert!(log.record(&ev(0)).is_err());
    fs::remove_dir(&blocker).unwrap();
    env.seal(b"c", &c).await.unwrap();
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 2);
    assert_eq!(report.lost_events(), 4, "{:?}", report.gaps);
    assert_eq!(report.gaps[0].reason, "write-failed");
}

/// Runs the conformance workload's kinds of access through a keyring with
/// a memory sink and an audit log, and returns what was recorded.
async fn workload(log: Arc<AuditLog>) -> (Vec<Event>, Arc<MemoryKms>) {
    let kms = Arc::new(MemoryKms::new("kms"));
    let dr = Arc::new(MemoryKms::new("dr"));
    let records = kms.add_key("records");
    let archive = kms.add_key("archive");
    let dr_key = dr.add_key("offsite");
    let memory = Arc::new(MemorySink::new());
    let sink = Arc::new(FanOut(vec![memory.clone(), log]));
    let deny_marker = "denied-by-test";
    let keyring = Keyring::builder()
        .provider(kms.clone())
        .provider(dr.clone())
        .recipient(records.clone())
        .event_sink(sink)
        .policy(Arc::new(FnPolicy::new(move |r| {
            if r.purpose.as_deref() == Some(deny_marker) {
                Decision::Deny("test denial".into())
            } else {
                Decision::Allow
            }
        })))
        .build()
        .unwrap();
    let env = Envelope::new(keyring).as_caller("lab-service", "treatment");
    let c = ctx("42");
    let sealed = env.seal(b"record", &c).await.unwrap();
    env.open(&sealed, &c).await.unwrap();
    assert!(env
        .open(&sealed, &ctx("43"))
        .await
        .unwrap_err()
        .is_decrypt());
    let both = env.to_recipients([records.clone(), dr_key.clone()]);
    let sealed2 = both.seal(b"two", &c).await.unwrap();
    let mut w = env.encryptor(Vec::new(), &c).await.unwrap();
    std::io::Write::write_all(&mut w, &[7u8; 40_000]).unwrap();
    let stream = w.finish().unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut env.decryptor(&stream[..], &c).await.unwrap(), &mut out)
        .unwrap();
    env.to_recipients([archive.clone()])
        .rewrap(&sealed, &c)
        .await
        .unwrap();
    let kr = env.keyring();
    let caller = Caller::new("kms-admin", "maintenance");
    kr.describe(&records, &caller).await.unwrap();
    // Lifecycle verbs on a key the rest of the workload does not read.
    // (Whether MemoryKms supports them or answers "unsupported", the
    // attempt is an event either way.)
    let fresh: phi_envelope::KeyRef = "kms:fresh".parse().unwrap();
    let _ = kr.create_key(&fresh, &caller).await;
    let _ = kr.rotate(&archive, &caller).await;
    let _ = kr.set_state(&archive, 1, KeyState::Disabled, &caller).await;
    let denied = env.as_caller("lab-service", deny_marker);
    assert!(matches!(
        denied.open(&sealed, &c).await,
        Err(Error::PolicyDenied(_))
    ));
    dr.down.store(true, Ordering::SeqCst);
    assert!(both.seal(b"x", &c).await.is_err());
    dr.down.store(false, Ordering::SeqCst);
    kr.destroy(&records, 1, &caller).await.unwrap();
    assert!(
        env.open(&sealed2, &c).await.is_ok(),
        "opens with the DR key"
    );
    assert!(env
        .to_recipients([records.clone()])
        .open(&sealed, &c)
        .await
        .is_err());
    (memory.events(), kms)
}

#[tokio::test]
async fn every_key_access_of_the_workload_is_an_event_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::builder().audit_key(key()).open(&path).unwrap());
    let (events, _kms) = workload(log.clone()).await;
    let anchor = log.anchor();
    drop(log);

    let has = |op: Operation, outcome: &Outcome| {
        events
            .iter()
            .any(|e| e.operation == op && &e.outcome == outcome)
    };
    let ok = Outcome::Success;
    for op in [
        Operation::Generate,
        Operation::Wrap,
        Operation::Unwrap,
        Operation::Rewrap,
        Operation::Describe,
        Operation::Destroy,
    ] {
        assert!(has(op, &ok), "no successful {op} event");
    }
    assert!(has(Operation::Unwrap, &Outcome::Rejected), "wrong context");
    assert!(has(Operation::Unwrap, &Outcome::Denied), "policy denial");
    assert!(
        has(Operation::Wrap, &Outcome::Failed("unavailable".into())),
        "provider down"
    );
    assert!(has(
        Operation::Unwrap,
        &Outcome::Failed("key-destroyed".into())
    ));
    for op in [Operation::CreateKey, Operation::Rotate, Operation::SetState] {
        assert!(events.iter().any(|e| e.operation == op), "no {op} event");
    }
    for e in &events {
        assert!(e.actor.is_some() && e.purpose.is_some(), "{e:?}");
        if !e.operation.is_key_management() && e.operation != Operation::Describe {
            assert!(e.context_fingerprint.is_some(), "{e:?}");
        }
    }

    // The log holds exactly these events, in order, and verifies.
    let report = Verifier::new()
        .key(key())
        .anchor(anchor)
        .verify(&path)
        .unwrap();
    assert_eq!(report.entries as usize, events.len());
    let logged: Vec<String> = read_lines(&path)
        .iter()
        .map(|l| json(l))
        .filter(|v| v["type"] == "event")
        .map(|v| v["event"].to_string())
        .collect();
    let expected: Vec<String> = events
        .iter()
        .map(|e| json(&e.to_json()).to_string())
        .collect();
    assert_eq!(logged, expected);
}

#[tokio::test]
async fn every_provider_call_has_its_event() {
    // One event per provider call: count MemoryKms's calls against the
    // events of the operations that reach it.
    let kms = Arc::new(MemoryKms::new("kms"));
    let k = kms.add_key("records");
    let other = kms.add_key("archive");
    let memory = Arc::new(MemorySink::new());
    let env = keyring_with(&kms, &k, memory.clone(), true);
    for i in 0..20 {
        let c = ctx(&i.to_string());
        let s = env.seal(&[i as u8; 100], &c).await.unwrap();
        env.open(&s, &c).await.unwrap();
        if i % 3 == 0 {
            let _ = env.open(&s, &ctx("wrong")).await;
        }
        if i % 5 == 0 {
            env.to_recipients([other.clone()])
                .rewrap(&s, &c)
                .await
                .unwrap();
        }
    }
    let provider_events = memory
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e.operation,
                Operation::Generate | Operation::Wrap | Operation::Unwrap
            ) && e.outcome != Outcome::Denied
        })
        .count();
    assert_eq!(provider_events, kms.calls.load(Ordering::SeqCst));
}

// ---------------------------------------------------------------- cost

/// The cost of auditing per sealed record, with every sink and fsync
/// policy on the same workload. Speed is printed, never asserted; what is
/// asserted is that each log holds every event and its chain verifies. In
/// CI it runs a short workload; for the figures in the closing notes run
/// `PHI_AUDIT_COST_RECORDS=10000 cargo test --release --test audit -- --nocapture audit_cost`.
#[tokio::test]
async fn audit_cost_per_sealed_record() {
    let n: usize = std::env::var("PHI_AUDIT_COST_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let warm_up: usize = if n >= 1000 { 200 } else { 10 };
    let group_total: usize = (4 * n).clamp(64, 1600);
    let kms = Arc::new(MemoryKms::new("kms"));
    let k = kms.add_key("records");
    let dir = tempfile::tempdir().unwrap();
    let c = ctx("1");
    let mut results = Vec::new();
    let configs: Vec<(&str, Option<(FsyncPolicy, bool)>)> = vec![
        ("NoopSink", None),
        ("AuditLog, no fsync", Some((FsyncPolicy::Never, false))),
        (
            "AuditLog, fsync every 100",
            Some((FsyncPolicy::EveryN(100), false)),
        ),
        (
            "AuditLog, fsync every entry",
            Some((FsyncPolicy::EveryEntry, false)),
        ),
        (
            "AuditLog keyed, fsync every entry",
            Some((FsyncPolicy::EveryEntry, true)),
        ),
    ];
    for (name, cfg) in configs {
        let sink: Arc<dyn EventSink> = match cfg {
            None => Arc::new(NoopSink),
            Some((fsync, keyed)) => {
                let mut b = AuditLog::builder().fsync(fsync);
                if keyed {
                    b = b.audit_key(key());
                }
                Arc::new(
                    b.open(dir.path().join(format!("{}.jsonl", results.len())))
                        .unwrap(),
                )
            }
        };
        let env = keyring_with(&kms, &k, sink, true);
        for _ in 0..warm_up {
            env.seal(b"warm-up", &c).await.unwrap();
        }
        let start = Instant::now();
        for i in 0..n {
            env.seal(format!("potassium {i}").as_bytes(), &c)
                .await
                .unwrap();
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        if cfg.is_some() {
            // Every seal (one generate event each) is in the log, chained.
            let path = dir.path().join(format!("{}.jsonl", results.len()));
            let report = match cfg {
                Some((_, true)) => Verifier::new().key(key()).verify(&path),
                _ => Verifier::new().verify(&path),
            }
            .unwrap();
            assert_eq!(report.entries, (warm_up + n) as u64, "{name}");
        }
        results.push((name, per));
    }
    let base = results[0].1;
    println!("\nseal of a short record, {n} records, one event each:");
    for (name, per) in &results {
        println!(
            "  {name:<36} {per:>9.2} µs/record   audit cost {:>9.2} µs/record",
            per - base
        );
    }

    // Concurrent appends share fsyncs (group commit).
    for tasks in [1usize, 4, 16] {
        let log = Arc::new(
            AuditLog::builder()
                .audit_key(key())
                .open(dir.path().join(format!("group-{tasks}.jsonl")))
                .unwrap(),
        );
        let per_task = group_total / tasks;
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..per_task {
                        log.append(&ev(i as u64)).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "  fsync every entry, {tasks:>2} threads       {:>9.0} entries/s ({:.0} µs/entry)",
            group_total as f64 / secs,
            secs * 1e6 / group_total as f64
        );
    }

    // The log alone: append cost without the seal around it.
    for (name, fsync) in [
        ("append, no fsync", FsyncPolicy::Never),
        ("append, fsync every 100", FsyncPolicy::EveryN(100)),
        ("append, fsync every entry", FsyncPolicy::EveryEntry),
    ] {
        let log = AuditLog::builder()
            .audit_key(key())
            .fsync(fsync)
            .open(dir.path().join(format!("append-{}.jsonl", name.len())))
            .unwrap();
        let e = ev(1);
        let start = Instant::now();
        for _ in 0..n {
            log.append(&e).unwrap();
        }
        println!(
            "  {name:<36} {:>9.2} µs/entry",
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
