//! The committed audit-log vector (tests/vectors/audit-log-v1.json,
//! docs/AUDIT-LOG.md section 10), made by the library's own line encoder
//! from fixed events and times, and checked against the file: the file is
//! what this code makes, byte for byte. The expected outcome of every case
//! (tampered and edge-case logs) is what the library's verifier says. With
//! `PHI_ENVELOPE_WRITE_AUDIT_LOG_VECTORS=1` the file is written first (then
//! checked like any other run).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::line::{self, Body, Header, Mac};
use super::{Anchor, AuditKey, Verifier, VerifyError};
use crate::events::{Event, Operation, Outcome, Uses};
use crate::provider::KeyState;

fn vector_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/audit-log-v1.json")
}

/// The keyed log's audit key: the 32 bytes 0x40, 0x41, ..., 0x5f.
fn keyed_key_bytes() -> Vec<u8> {
    (0x40u8..0x60).collect()
}

/// Another key, for the wrong-key case: 0x60 ..= 0x7f.
fn other_key_bytes() -> Vec<u8> {
    (0x60u8..0x80).collect()
}

/// A time given as RFC 3339 (the form the log writes).
fn t(s: &str) -> SystemTime {
    crate::json::parse_timestamp(s).expect("a valid vector time")
}

fn header(mac: &Mac, segment: u32, prev_file: Option<&str>, time: &str) -> Body {
    Body::Header(Header {
        mac: mac.name().to_owned(),
        key_id: mac.key_id().map(str::to_owned),
        segment,
        prev_file: prev_file.map(str::to_owned),
        time: t(time),
    })
}

fn gap(lost: u64, reason: &str, time: &str) -> Body {
    Body::Gap {
        lost,
        reason: reason.to_owned(),
        time: t(time),
    }
}

fn event(op: Operation, provider: &str, outcome: Outcome, time: &str) -> Event {
    Event::new(op, provider, outcome).with_timestamp(t(time))
}

const FP: &str = "6f1c0e8a4b2d9e7f0a1b2c3d4e5f6a7b";

/// The keyed log: three files, every line type, eight of the eleven
/// operations, an aggregated cache-hit event, a null-heavy event, strings
/// that need escaping.
fn keyed_files() -> Vec<Vec<Body>> {
    let mac = Mac::Hmac(AuditKey::new(&keyed_key_bytes()).unwrap());
    let ev = |e: Event| Body::Event(e);
    vec![
        vec![
            header(&mac, 1, None, "2026-12-04T03:00:00.000000Z"),
            ev(event(
                Operation::CreateKey,
                "local",
                Outcome::Success,
                "2026-12-04T03:00:00.120044Z",
            )
            .with_key("local:records", Some(1))
            .with_key_state(KeyState::Enabled)
            .with_caller("alice@ops", "setup")
            .with_duration(Duration::from_micros(1830))),
            ev(event(
                Operation::Generate,
                "local",
                Outcome::Success,
                "2026-12-04T03:00:01.000388Z",
            )
            .with_key("local:records", Some(1))
            .with_caller("lab-service", "treatment")
            .with_context_fingerprint(FP)
            .with_duration(Duration::from_micros(388))),
            ev(event(
                Operation::Unwrap,
                "aws-kms",
                Outcome::Failed("unavailable".into()),
                "2026-12-04T03:00:31.000002Z",
            )
            .with_key(
                "aws-kms:arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                Some(3),
            )
            .with_caller("lab-service", "treatment")
            .with_context_fingerprint(FP)
            .with_duration(Duration::from_secs(30))),
        ],
        vec![
            header(&mac, 2, Some("audit.jsonl"), "2026-12-04T03:01:00.000017Z"),
            ev(event(
                Operation::CacheHitEncrypt,
                "local",
                Outcome::Success,
                "2026-12-04T03:01:05.000120Z",
            )
            .with_key("local:records", Some(1))
            .with_uses(Uses {
                count: 4096,
                first: t("2026-12-04T03:01:04.000007Z"),
                last: t("2026-12-04T03:01:04.999871Z"),
            })
            .with_caller("lab-service", "treatment")
            .with_context_fingerprint(FP)),
            gap(2, "write-failed", "2026-12-04T03:02:00.500000Z"),
            ev(event(
                Operation::Destroy,
                "local",
                Outcome::Success,
                "2026-12-04T03:02:00.500311Z",
            )
            .with_key("local:records", Some(1))
            .with_key_state(KeyState::Destroyed)
            .with_approvers(["alice", "bob"])
            .with_caller("carol", "retention-end")
            .with_duration(Duration::from_micros(1980))),
        ],
        vec![
            header(
                &mac,
                3,
                Some("audit.jsonl.000002"),
                "2026-12-04T03:03:00.000000Z",
            ),
            // Null-heavy: no key, no caller, no fingerprint.
            ev(event(
                Operation::Describe,
                "pkcs11",
                Outcome::Denied,
                "2026-12-04T03:03:00.000001Z",
            )),
            ev(event(
                Operation::SetState,
                "local",
                Outcome::Failed("approval".into()),
                "2026-12-04T03:03:10.999999Z",
            )
            .with_key("local:records", Some(2))
            .with_key_state(KeyState::DecryptOnly)
            .with_approvers(["alice"])
            .with_caller(
                "o\"brien\\ops\n\t\r\u{8}\u{c}\u{1}\u{1f}\u{7f}é€\u{2028}😀",
                "retire-v1 / ünïcode",
            )
            .with_duration(Duration::from_micros(2210))),
            gap(1, "torn-tail", "2026-12-04T03:04:00.000000Z"),
            ev(event(
                Operation::CacheHitDecrypt,
                "local",
                Outcome::Success,
                "2026-12-04T03:04:00.000450Z",
            )
            .with_key("local:records", Some(2))
            .with_caller("lab-service", "treatment")
            .with_context_fingerprint(FP)),
        ],
    ]
}

/// The unkeyed log: one file, the other three operations.
fn unkeyed_files() -> Vec<Vec<Body>> {
    let mac = Mac::Sha256;
    let ev = |e: Event| Body::Event(e);
    vec![vec![
        header(&mac, 1, None, "2026-12-04T04:00:00.000000Z"),
        ev(event(
            Operation::Wrap,
            "vault",
            Outcome::Success,
            "2026-12-04T04:00:00.250000Z",
        )
        .with_key("vault:transit/phi", Some(2))
        .with_caller("dr-job", "recovery-drill")
        .with_duration(Duration::from_micros(9051))),
        ev(event(
            Operation::Rotate,
            "vault",
            Outcome::Success,
            "2026-12-04T04:00:01.000000Z",
        )
        .with_key("vault:transit/phi", Some(3))
        .with_key_state(KeyState::Enabled)
        .with_caller("alice@ops", "quarterly")
        .with_duration(Duration::from_micros(15000))),
        ev(event(
            Operation::Rewrap,
            "vault",
            Outcome::Success,
            "2026-12-04T04:00:02.000001Z",
        )
        .with_key("vault:transit/phi", Some(3))
        .with_caller("alice@ops", "quarterly")),
        ev(event(
            Operation::Unwrap,
            "vault",
            Outcome::Rejected,
            "2026-12-04T04:00:03.123456Z",
        )
        .with_key("vault:transit/phi", Some(2))
        .with_caller("lab-service", "treatment")
        .with_context_fingerprint("00112233445566778899aabbccddeeff")
        .with_duration(Duration::from_micros(700))),
    ]]
}

/// The file names of a log named `audit.jsonl`.
fn file_name(index: usize) -> String {
    if index == 0 {
        "audit.jsonl".to_owned()
    } else {
        format!("audit.jsonl.{:06}", index + 1)
    }
}

/// A log made from `files`: its files (name, content) and its hashes.
struct Made {
    files: Vec<(String, String)>,
    hashes: Vec<String>,
    /// `domain || prev || body` of line 0, the worked example.
    first_message: Vec<u8>,
}

fn make(mac: &Mac, files: &[Vec<Body>]) -> Made {
    let mut prev = [0u8; 32];
    let mut seq = 0u64;
    let mut out = Made {
        files: Vec::new(),
        hashes: Vec::new(),
        first_message: Vec::new(),
    };
    for (i, bodies) in files.iter().enumerate() {
        let mut content = String::new();
        for body in bodies {
            if seq == 0 {
                let text = line::encode_body(seq, body, &prev);
                out.first_message =
                    [b"phi-envelope-audit/1\0".as_slice(), &prev, text.as_bytes()].concat();
            }
            let (text, hash) = line::make_line(mac, seq, body, &prev);
            content.push_str(&text);
            out.hashes.push(line::hex(&hash));
            prev = hash;
            seq += 1;
        }
        out.files.push((file_name(i), content));
    }
    out
}

fn files_json(files: &[(String, String)]) -> Value {
    Value::Array(
        files
            .iter()
            .map(|(name, content)| json!({"name": name, "content": content}))
            .collect(),
    )
}

/// One case: files (in chain order) and the verifier's options.
struct Case {
    name: &'static str,
    files: Vec<(String, String)>,
    key: Option<Vec<u8>>,
    anchor: Option<String>,
    start_after: Option<String>,
}

/// What the library's verifier says about `case`.
fn expect(case: &Case) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = case
        .files
        .iter()
        .map(|(name, content)| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        })
        .collect();
    let mut v = Verifier::new();
    if let Some(k) = &case.key {
        v = v.key(AuditKey::new(k).unwrap());
    }
    if let Some(a) = &case.anchor {
        v = v.anchor(a.parse::<Anchor>().unwrap());
    }
    if let Some(a) = &case.start_after {
        v = v.start_after(a.parse::<Anchor>().unwrap());
    }
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
    match v.verify_files(&paths) {
        Ok(r) => json!({
            "ok": true,
            "files": r.files.len(),
            "lines": r.lines,
            "entries": r.entries,
            "gaps": r.gaps.iter().map(|g| json!({"seq": g.seq, "lost": g.lost, "reason": g.reason})).collect::<Vec<_>>(),
            "last": r.last.to_string(),
        }),
        Err(VerifyError::BadLine(b)) => json!({
            "ok": false,
            "problem": b.problem.name(),
            "file": name(&b.file),
            "line": b.line,
            "seq": b.seq,
        }),
        Err(VerifyError::KeyRequired { file, .. }) => json!({
            "ok": false,
            "problem": "key-required",
            "file": name(&file),
            "line": 1,
            "seq": null,
        }),
        Err(e) => panic!("{}: {e}", case.name),
    }
}

/// Line `n` (0-based) of a file's content, newline included.
fn lines_of(content: &str) -> Vec<String> {
    content.split_inclusive('\n').map(str::to_owned).collect()
}

fn edit_line(
    files: &[(String, String)],
    file: usize,
    f: impl FnOnce(&mut Vec<String>),
) -> Vec<(String, String)> {
    let mut out = files.to_vec();
    let mut lines = lines_of(&out[file].1);
    f(&mut lines);
    out[file].1 = lines.concat();
    out
}

fn cases(keyed: &Made, unkeyed: &Made) -> Vec<Case> {
    let k = || Some(keyed_key_bytes());
    let kf = &keyed.files;
    let last = format!(
        "{}:{}",
        keyed.hashes.len() - 1,
        keyed.hashes.last().unwrap()
    );
    let case = |name, files, key| Case {
        name,
        files,
        key,
        anchor: None,
        start_after: None,
    };
    let mut with_empty = kf.clone();
    with_empty.push(("audit.jsonl.000004".into(), String::new()));
    vec![
        case(
            "an event edited (bob becomes eve)",
            edit_line(kf, 1, |l| l[3] = l[3].replace("\"bob\"", "\"eve\"")),
            k(),
        ),
        case(
            "a line deleted (seq 2)",
            edit_line(kf, 0, |l| {
                l.remove(2);
            }),
            k(),
        ),
        case(
            "two lines swapped (seq 9 and 10)",
            edit_line(kf, 2, |l| l.swap(1, 2)),
            k(),
        ),
        case(
            "a space after a colon",
            edit_line(kf, 0, |l| {
                l[1] = l[1].replacen("\"seq\":1,", "\"seq\": 1,", 1)
            }),
            k(),
        ),
        case(
            "a non-ASCII character escaped",
            edit_line(kf, 2, |l| l[2] = l[2].replacen('é', "\\u00e9", 1)),
            k(),
        ),
        case(
            "an extra member",
            edit_line(kf, 1, |l| {
                l[1] = l[1].replacen("\"type\":\"event\",", "\"type\":\"event\",\"x\":1,", 1)
            }),
            k(),
        ),
        case(
            "a header in the middle of a file",
            edit_line(kf, 0, |l| {
                let h = l[0].clone();
                l.insert(2, h);
            }),
            k(),
        ),
        case(
            "a rotated header naming another MAC",
            edit_line(kf, 1, |l| {
                let id = AuditKey::new(&keyed_key_bytes())
                    .unwrap()
                    .key_id()
                    .to_owned();
                l[0] = l[0].replacen(
                    &format!("\"mac\":\"hmac-sha256\",\"key_id\":\"{id}\""),
                    "\"mac\":\"sha256\",\"key_id\":null",
                    1,
                )
            }),
            k(),
        ),
        case(
            "the middle file missing",
            vec![kf[0].clone(), kf[2].clone()],
            k(),
        ),
        case("the first file missing", kf[1..].to_vec(), k()),
        Case {
            start_after: Some(format!("3:{}", keyed.hashes[3])),
            ..case(
                "the first file archived, with a start anchor",
                kf[1..].to_vec(),
                k(),
            )
        },
        case(
            "a torn last line",
            edit_line(kf, 2, |l| {
                let n = l.len() - 1;
                let half = l[n].len() / 2;
                l[n].truncate(half);
            }),
            k(),
        ),
        case(
            "an empty last rotated file (a rotation cut short)",
            with_empty,
            k(),
        ),
        case(
            "an empty rotated file before the last",
            vec![
                kf[0].clone(),
                ("audit.jsonl.000002".into(), String::new()),
                kf[2].clone(),
            ],
            k(),
        ),
        Case {
            anchor: Some(last.clone()),
            ..case(
                "the last line removed, with an anchor",
                edit_line(kf, 2, |l| {
                    l.pop();
                }),
                k(),
            )
        },
        Case {
            anchor: Some(format!("5:{}", "0".repeat(64))),
            ..case("an anchor with another hash", kf.clone(), k())
        },
        Case {
            anchor: Some(last),
            ..case("the whole log, with its anchor", kf.clone(), k())
        },
        case(
            "verified with another key",
            kf.clone(),
            Some(other_key_bytes()),
        ),
        case("a keyed log verified without a key", kf.clone(), None),
        case(
            "an unkeyed log verified with a key",
            unkeyed.files.clone(),
            k(),
        ),
        case(
            "a line that is not JSON",
            edit_line(kf, 0, |l| l[2] = "not an audit entry\n".into()),
            k(),
        ),
        case(
            "an unkeyed line chained to another prev and rehashed",
            edit_line(&unkeyed.files, 0, |l| {
                let body = &unkeyed_files()[0][2];
                l[2] = line::make_line(&Mac::Sha256, 2, body, &[0; 32]).0;
            }),
            None,
        ),
        case(
            "an unkeyed line edited",
            edit_line(&unkeyed.files, 0, |l| {
                l[1] = l[1].replace("recovery-drill", "recovery-drilL")
            }),
            None,
        ),
    ]
}

fn log_json(name: &str, mac: &Mac, key: Option<&[u8]>, made: &Made, gaps: Value) -> Value {
    let entries = made
        .files
        .iter()
        .flat_map(|(_, c)| lines_of(c))
        .filter(|l| l.contains("\"type\":\"event\""))
        .count();
    json!({
        "name": name,
        "mac": mac.name(),
        "audit_key": key.map(hex::encode),
        "key_id": mac.key_id(),
        "files": files_json(&made.files),
        "hashes": made.hashes,
        "first_line_message_hex": hex::encode(&made.first_message),
        "lines": made.hashes.len(),
        "entries": entries,
        "gaps": gaps,
        "last": format!("{}:{}", made.hashes.len() - 1, made.hashes.last().unwrap()),
    })
}

fn vector() -> Value {
    let key = AuditKey::new(&keyed_key_bytes()).unwrap();
    let keyed_mac = Mac::Hmac(key.clone());
    let keyed = make(&keyed_mac, &keyed_files());
    let unkeyed = make(&Mac::Sha256, &unkeyed_files());
    let cases: Vec<Value> = cases(&keyed, &unkeyed)
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "files": files_json(&c.files),
                "audit_key": c.key.as_deref().map(hex::encode),
                "anchor": c.anchor,
                "start_after": c.start_after,
                "expect": expect(c),
            })
        })
        .collect();
    json!({
        "description": "phi-envelope file audit log, format phi-envelope-audit/1 (docs/AUDIT-LOG.md): a keyed log of three files (rotation) with every line type, an aggregated cache-hit event, a null-heavy event and strings that need escaping; an unkeyed log; and cases (tampered and edge-case logs) with what a verifier must say about each. Made by src/audit/vector_tests.rs from fixed events and times (PHI_ENVELOPE_WRITE_AUDIT_LOG_VECTORS=1 cargo test --all-features --lib audit::vector_tests).",
        "format": line::FORMAT,
        "key_id_message_hex": hex::encode(line::KEY_ID_DOMAIN),
        "logs": [
            log_json("keyed", &keyed_mac, Some(&keyed_key_bytes()), &keyed, json!([
                {"seq": 6, "lost": 2, "reason": "write-failed"},
                {"seq": 11, "lost": 1, "reason": "torn-tail"},
            ])),
            log_json("unkeyed", &Mac::Sha256, None, &unkeyed, json!([])),
        ],
        "cases": cases,
    })
}

#[test]
fn the_committed_audit_log_vector_is_what_the_library_writes() {
    let made = vector();
    if std::env::var_os("PHI_ENVELOPE_WRITE_AUDIT_LOG_VECTORS").is_some() {
        let mut text = serde_json::to_string_pretty(&made).unwrap();
        text.push('\n');
        std::fs::write(vector_path(), text).unwrap();
    }
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(vector_path()).unwrap()).unwrap();
    assert_eq!(
        committed, made,
        "tests/vectors/audit-log-v1.json differs from what the library makes now"
    );
    // Every log verifies as made, and the gaps listed are its gap lines.
    for log in made["logs"].as_array().unwrap() {
        let case = Case {
            name: "log",
            files: log["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    (
                        f["name"].as_str().unwrap().to_owned(),
                        f["content"].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
            key: log["audit_key"].as_str().map(|k| hex::decode(k).unwrap()),
            anchor: None,
            start_after: None,
        };
        let r = expect(&case);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["last"], log["last"]);
        assert_eq!(r["lines"], log["lines"]);
        assert_eq!(r["entries"], log["entries"]);
        assert_eq!(r["gaps"], log["gaps"]);
    }
}
