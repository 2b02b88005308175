//! The file audit log's committed vector (tests/vectors/audit-log-v1.json,
//! docs/AUDIT-LOG.md) through the public API, and the independent verifier
//! written from docs/AUDIT-LOG.md alone (tests/independent/audit_log_verify.py,
//! Python's standard library): both accept every vector log and give every
//! case its expected outcome; the Python verifier accepts a log written now
//! by the library (keyed, rotated, an aggregated cache-hit event, a gap);
//! both reject a tampered copy of it at the same line; and both give one
//! verdict on hundreds of mutated copies of the vector.

mod conformance;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use conformance::{ctx, MemoryKms};
use phi_envelope::audit::{self, Anchor, AuditKey, AuditLog, Verifier, VerifyError};
use phi_envelope::cache::CacheConfig;
use phi_envelope::events::{CacheHitEvents, Event, Operation, Outcome};
use phi_envelope::{Envelope, Keyring};
use serde_json::{json, Value};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vector_path() -> PathBuf {
    manifest().join("tests/vectors/audit-log-v1.json")
}

fn vector() -> Value {
    serde_json::from_str(&fs::read_to_string(vector_path()).unwrap()).unwrap()
}

fn key_of(v: &Value) -> Option<AuditKey> {
    v.as_str()
        .map(|h| AuditKey::new(&hex::decode(h).unwrap()).unwrap())
}

/// Writes a vector's files into `dir`; returns their paths in order.
fn write_files(dir: &Path, files: &Value) -> Vec<PathBuf> {
    files
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let p = dir.join(f["name"].as_str().unwrap());
            fs::write(&p, f["content"].as_str().unwrap()).unwrap();
            p
        })
        .collect()
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_owned()
}

/// The library's verdict in the form the vector and the Python verifier use.
fn outcome(r: Result<audit::VerifyReport, VerifyError>) -> Value {
    match r {
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
            "file": file_name(&b.file),
            "line": b.line,
            "seq": b.seq,
        }),
        Err(VerifyError::KeyRequired { file, .. }) => json!({
            "ok": false,
            "problem": "key-required",
            "file": file_name(&file),
            "line": 1,
            "seq": null,
        }),
        Err(e) => panic!("{e}"),
    }
}

/// Runs the independent verifier; fails loudly when Python is missing.
fn python(args: &[&std::ffi::OsStr]) -> (i32, Value) {
    let script = manifest().join("tests/independent/audit_log_verify.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let code = out.status.code().expect("the verifier exited");
    assert!(
        code == 0 || code == 1,
        "the independent verifier failed ({code}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the independent verifier printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (code, v)
}

// ------------------------------------------------------------ (a) the library

#[test]
fn the_library_accepts_every_vector_log_and_reproduces_its_bytes() {
    let v = vector();
    for log in v["logs"].as_array().unwrap() {
        let name = log["name"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = write_files(dir.path(), &log["files"]);
        let key = key_of(&log["audit_key"]);
        assert_eq!(
            key.as_ref().map(|k| k.key_id().to_owned()),
            log["key_id"].as_str().map(str::to_owned),
            "{name}: key id"
        );
        let mut verifier = Verifier::new();
        if let Some(k) = key.clone() {
            verifier = verifier.key(k);
        }
        // Found from the first file, as a writer names them.
        assert_eq!(audit::log_files(&files[0]).unwrap(), files, "{name}");
        let report = verifier.verify(&files[0]).unwrap();
        assert_eq!(report.lines, log["lines"].as_u64().unwrap(), "{name}");
        assert_eq!(report.entries, log["entries"].as_u64().unwrap(), "{name}");
        assert_eq!(report.last.to_string(), log["last"].as_str().unwrap());
        assert_eq!(report.keyed, key.is_some());
        assert_eq!(report.files.len(), files.len());
        // The verifier accepted each line's hash: the library computes the
        // hashes of the vector. They are also the lines' hash members, and
        // the event objects are what the library's encoder writes.
        let mut hashes = Vec::new();
        for path in &files {
            for line in fs::read_to_string(path).unwrap().lines() {
                let at = line.rfind(",\"hash\":\"").unwrap();
                hashes.push(line[at + 9..line.len() - 2].to_owned());
                if let Some(start) = line.find(",\"event\":") {
                    let end = line.rfind(",\"prev\":\"").unwrap();
                    let event = &line[start + 9..end];
                    assert_eq!(Event::from_json(event).unwrap().to_json(), event);
                }
            }
        }
        let want: Vec<String> = log["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(hashes, want, "{name}");
        // The anchor of the vector verifies.
        let anchor: Anchor = log["last"].as_str().unwrap().parse().unwrap();
        verifier.anchor(anchor).verify(&files[0]).unwrap();
    }
}

#[test]
fn the_library_gives_every_vector_case_its_expected_outcome() {
    let v = vector();
    for case in v["cases"].as_array().unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_files(dir.path(), &case["files"]);
        let mut verifier = Verifier::new();
        if let Some(k) = key_of(&case["audit_key"]) {
            verifier = verifier.key(k);
        }
        if let Some(a) = case["anchor"].as_str() {
            verifier = verifier.anchor(a.parse().unwrap());
        }
        if let Some(a) = case["start_after"].as_str() {
            verifier = verifier.start_after(a.parse().unwrap());
        }
        assert_eq!(
            outcome(verifier.verify_files(&files)),
            case["expect"],
            "{}",
            case["name"]
        );
    }
}

#[test]
fn the_worked_example_in_audit_log_md_is_the_committed_vector() {
    let doc = fs::read_to_string(manifest().join("docs/AUDIT-LOG.md")).unwrap();
    let v = vector();
    let keyed = &v["logs"][0];
    let first = keyed["files"][0]["content"].as_str().unwrap();
    for (what, value) in [
        ("audit key", keyed["audit_key"].as_str().unwrap()),
        ("key id", keyed["key_id"].as_str().unwrap()),
        ("key-id message", v["key_id_message_hex"].as_str().unwrap()),
        ("first line", first.lines().next().unwrap()),
        ("second line", first.lines().nth(1).unwrap()),
        ("last anchor", keyed["last"].as_str().unwrap()),
        (
            "unkeyed header",
            v["logs"][1]["files"][0]["content"]
                .as_str()
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        ),
    ] {
        assert!(
            doc.contains(value),
            "docs/AUDIT-LOG.md lacks the vector's {what}: {value}"
        );
    }
}

// ------------------------------------------------------------ (b) the independent verifier

#[test]
fn the_independent_verifier_checks_every_vector_log_and_case() {
    let v = vector();
    let (code, out) = python(&[std::ffi::OsStr::new("--vector"), vector_path().as_os_str()]);
    assert_eq!((code, &out["failures"]), (0, &json!([])), "{out}");
    assert_eq!(out["logs"], v["logs"].as_array().unwrap().len());
    assert_eq!(out["cases"], v["cases"].as_array().unwrap().len());
}

// ------------------------------------------------------------ (c) a log written now

fn key() -> AuditKey {
    AuditKey::new(&KEY).unwrap()
}

const KEY: [u8; 32] = *b"an audit key of thirty-two bytes";

/// The next file of the log after `current` (`audit.jsonl.00000N`).
fn next_file(base: &Path, current: &Path) -> PathBuf {
    let n = if current == base {
        2
    } else {
        let name = file_name(current);
        name.rsplit_once('.').unwrap().1.parse::<u32>().unwrap() + 1
    };
    base.with_file_name(format!("{}.{n:06}", file_name(base)))
}

/// A keyed log written by the library: a keyring with a data-key cache and
/// aggregated cache-hit events, rotated every ~1.5 kB, with two events lost
/// (and recorded by a gap line) while the next file's name was taken.
async fn fresh_log(dir: &Path) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(key())
            .max_file_bytes(1500)
            .open(&path)
            .unwrap(),
    );
    let kms = Arc::new(MemoryKms::new("kms"));
    let records = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(records)
            .event_sink(log.clone())
            .data_key_cache(CacheConfig::new())
            .cache_hit_events(CacheHitEvents::aggregated(Duration::from_secs(3600)))
            .build()
            .unwrap(),
    )
    .as_caller("lab-service", "treatment");
    let c = ctx("tenant-1");
    let mut sealed = Vec::new();
    for i in 0..6 {
        sealed.push(env.seal(format!("k {i}").as_bytes(), &c).await.unwrap());
    }
    for s in &sealed {
        env.open(s, &c).await.unwrap();
    }
    env.keyring().flush_events().await.unwrap();

    // The next file's name is taken: two events cannot be written.
    let blocker = next_file(&path, &log.current_file());
    fs::create_dir(&blocker).unwrap();
    let odd = |op| {
        Event::new(op, "local", Outcome::Failed("unavailable".into()))
            .with_caller("o\"brien\\\n\u{1}é€😀", "ünïcode")
    };
    assert!(log.append(&odd(Operation::Unwrap)).is_err());
    assert!(log.append(&odd(Operation::Wrap)).is_err());
    fs::remove_dir(&blocker).unwrap();
    for op in [Operation::SetPolicy, Operation::Unwrap, Operation::Rewrap] {
        log.append(&odd(op)).unwrap();
    }
    path
}

fn library_verdict(path: &Path) -> Value {
    outcome(Verifier::new().key(key()).verify(path))
}

fn python_verdict(path: &Path) -> Value {
    let key_hex = hex::encode(KEY);
    let (code, out) = python(&["--key-hex".as_ref(), key_hex.as_ref(), path.as_os_str()]);
    assert_eq!(code, if out["ok"] == true { 0 } else { 1 }, "{out}");
    out
}

#[tokio::test]
async fn the_independent_verifier_accepts_a_log_written_now() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh_log(dir.path()).await;
    let lib = library_verdict(&path);
    assert_eq!(lib["ok"], true, "{lib}");
    assert!(lib["files"].as_u64().unwrap() >= 3, "rotated: {lib}");
    assert_eq!(
        lib["gaps"],
        json!([{"seq": lib["gaps"][0]["seq"], "lost": 2, "reason": "write-failed"}])
    );
    let text: String = audit::log_files(&path)
        .unwrap()
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    assert!(
        text.contains("\"operation\":\"cache-hit-encrypt\",\"provider\":\"kms\"")
            && text.contains("\"uses\":5,\"first_use\":\""),
        "an aggregated cache-hit event: {text}"
    );
    let mut py = python_verdict(&path);
    assert!(py.as_object_mut().unwrap().remove("mac").is_some());
    assert_eq!(py, lib);
}

// ------------------------------------------------------------ (d) tampering

/// A copy of the log's files in a new directory, with `edit` applied to the
/// lines of file `index`.
fn tampered(
    src: &Path,
    index: usize,
    edit: impl FnOnce(&mut Vec<String>),
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let files = audit::log_files(src).unwrap();
    let mut edit = Some(edit);
    for (i, f) in files.iter().enumerate() {
        let text = fs::read_to_string(f).unwrap();
        let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
        if i == index {
            if let Some(edit) = edit.take() {
                edit(&mut lines);
            }
        }
        fs::write(dir.path().join(file_name(f)), lines.concat()).unwrap();
    }
    let path = dir.path().join(file_name(src));
    (dir, path)
}

#[tokio::test]
async fn both_verifiers_reject_a_tampered_log_at_the_same_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh_log(dir.path()).await;
    let files = audit::log_files(&path).unwrap();
    let last = files.len() - 1;
    type Edit = Box<dyn FnOnce(&mut Vec<String>)>;
    let cases: Vec<(&str, usize, Edit, &str)> = vec![
        (
            "an event edited",
            1,
            Box::new(|l: &mut Vec<String>| l[1] = l[1].replacen("\"success\"", "\"denied\"", 1)),
            "hash-mismatch",
        ),
        (
            "a line deleted",
            0,
            Box::new(|l: &mut Vec<String>| {
                l.remove(1);
            }),
            "seq-mismatch",
        ),
        (
            "two lines swapped",
            last,
            Box::new(|l: &mut Vec<String>| {
                let n = l.len();
                l.swap(n - 2, n - 1);
            }),
            "seq-mismatch",
        ),
        (
            "a line too long",
            last,
            Box::new(|l: &mut Vec<String>| {
                let n = l.len() - 1;
                l[n] = format!("{}\n", "x".repeat(70_000));
            }),
            "too-long",
        ),
        (
            "a key member reordered",
            1,
            Box::new(|l: &mut Vec<String>| {
                l[1] = l[1].replacen("{\"seq\":", "{\"type\":\"event\",\"seq\":", 1)
            }),
            "not-canonical",
        ),
        (
            "a number written -0",
            1,
            Box::new(|l: &mut Vec<String>| {
                let at = l[1].find("\"duration_us\":").unwrap() + 14;
                let end = at + l[1][at..].find('}').unwrap();
                l[1].replace_range(at..end, "-0");
            }),
            "malformed",
        ),
        (
            "a slash escaped",
            1,
            Box::new(|l: &mut Vec<String>| {
                l[1] = l[1].replacen("\"provider\":\"kms\"", "\"provider\":\"k\\/ms\"", 1)
            }),
            "not-canonical",
        ),
    ];
    for (name, index, edit, problem) in cases {
        let (_copy, copy_path) = tampered(&path, index, edit);
        let lib = library_verdict(&copy_path);
        let py = python_verdict(&copy_path);
        assert_eq!(lib["ok"], false, "{name}: {lib}");
        assert_eq!(lib["problem"], problem, "{name}: {lib}");
        assert_eq!(lib["file"], file_name(&files[index]), "{name}: {lib}");
        assert_eq!(py, lib, "{name}");
    }
}

// ------------------------------------------------------------ differential

/// A small deterministic generator (xorshift64*), so that a failure names
/// a case that can be run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Both verifiers give the same verdict (problem, file, line, seq, or the
/// same report) on hundreds of copies of the keyed vector log with one or
/// two characters replaced, inserted or deleted: the document leaves no
/// room for two readings.
#[test]
fn both_verifiers_agree_on_mutated_copies_of_the_vector() {
    let v = vector();
    let keyed = &v["logs"][0];
    let files: Vec<(String, String)> = keyed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    const CHARS: &[char] = &[
        '"', '\\', '{', '}', '[', ']', ',', ':', ' ', '\n', '0', '1', '9', '-', '+', '.', 'e', 'E',
        'a', 'f', 'g', 'n', 'u', 'l', 't', 'é', '\u{1}', '\u{7f}',
    ];
    let mut rng = Rng(0x5eed_a0d1_7000_0001);
    let mut cases = Vec::new();
    let mut refused = 0;
    for i in 0..400 {
        let mut mutated = files.clone();
        for _ in 0..1 + rng.below(2) {
            let f = rng.below(mutated.len());
            let mut chars: Vec<char> = mutated[f].1.chars().collect();
            let at = rng.below(chars.len());
            let c = CHARS[rng.below(CHARS.len())];
            match rng.below(3) {
                0 => chars[at] = c,
                1 => chars.insert(at, c),
                _ => {
                    chars.remove(at);
                }
            }
            mutated[f].1 = chars.into_iter().collect();
        }
        if mutated == files {
            continue; // a character replaced by itself
        }
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = mutated
            .iter()
            .map(|(name, content)| {
                let p = dir.path().join(name);
                fs::write(&p, content).unwrap();
                p
            })
            .collect();
        let verifier = Verifier::new().key(key_of(&keyed["audit_key"]).unwrap());
        let expect = outcome(verifier.verify_files(&paths));
        if expect["ok"] == false {
            refused += 1;
        }
        cases.push(json!({
            "name": format!("mutation {i}"),
            "files": mutated.iter().map(|(n, c)| json!({"name": n, "content": c})).collect::<Vec<_>>(),
            "audit_key": keyed["audit_key"],
            "anchor": null,
            "start_after": null,
            "expect": expect,
        }));
    }
    // Every byte of a keyed log is covered by a hash, its framing by the
    // grammar: no change verifies.
    assert!(cases.len() > 350, "{}", cases.len());
    assert_eq!(refused, cases.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutations.json");
    fs::write(
        &path,
        serde_json::to_string(&json!({
            "key_id_message_hex": v["key_id_message_hex"],
            "logs": [],
            "cases": cases,
        }))
        .unwrap(),
    )
    .unwrap();
    let (code, out) = python(&["--vector".as_ref(), path.as_os_str()]);
    assert_eq!((code, &out["failures"]), (0, &json!([])), "{out}");
}
