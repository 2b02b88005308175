//! One audit log, several processes: writers in different processes (two
//! cron jobs, a verify during a backup) continue one chain, a writer that
//! finds the chain forked or cut refuses (fail closed) and says how to
//! start a new log, and a verify that runs during appends never mistakes an
//! append in progress for tampering.
//!
//! The writers are real processes: this test binary re-executes itself with
//! `PHI_AUDIT_MP_CHILD` set, and the test named in the command then runs
//! the child's part instead of the parent's.

mod conformance;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use conformance::{ctx, MemoryKms};
use phi_envelope::audit::{self, AuditKey, AuditLog, FsyncPolicy, OpenError, Problem, Verifier};
use phi_envelope::events::{Event, Operation, Outcome};
use phi_envelope::{Envelope, Error, Keyring};

const CHILD_ENV: &str = "PHI_AUDIT_MP_CHILD";

fn key() -> AuditKey {
    AuditKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

/// Event `i` of writer `id`, padded with `pad` bytes of purpose (so that a
/// line spans several pages and its write is not one page copy).
fn ev(id: &str, i: u64, pad: usize) -> Event {
    let purpose = if pad == 0 {
        "treatment".to_owned()
    } else {
        "p".repeat(pad)
    };
    Event::new(Operation::Unwrap, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller(id, purpose)
        .with_duration(Duration::from_micros(i))
}

/// What a child does, from `PHI_AUDIT_MP_CHILD`:
/// `LOG|ID|COUNT|MAX_FILE_BYTES|FSYNC|PAD|GO`. It opens the log (all
/// children at once: they race to create it), says it is ready (creates
/// `GO.ready-ID`), waits for the file `GO`, then appends `COUNT` events
/// through the public API: `append` on its own thread, or, for an `ID`
/// starting with `queued`, `submit` (the writer thread, in groups). A
/// failed append panics: a non-zero exit.
fn child_main(spec: &str) {
    let p: Vec<&str> = spec.split('|').collect();
    let [log, id, count, max, fsync, pad, go] = p[..] else {
        panic!("bad child spec {spec:?}");
    };
    let count: u64 = count.parse().unwrap();
    let max: u64 = max.parse().unwrap();
    let pad: usize = pad.parse().unwrap();
    let fsync = match fsync {
        "never" => FsyncPolicy::Never,
        "every" => FsyncPolicy::EveryEntry,
        n => FsyncPolicy::EveryN(n.parse().unwrap()),
    };
    let mut b = AuditLog::builder().audit_key(key()).fsync(fsync);
    if max > 0 {
        b = b.max_file_bytes(max);
    }
    let log = b
        .open(log)
        .unwrap_or_else(|e| panic!("child {id}: open: {e}"));
    let go = PathBuf::from(go);
    fs::write(ready_file(&go, id), b"").unwrap();
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    if id.starts_with("queued") {
        // Through the writer thread, 25 receipts in flight at a time.
        use phi_envelope::events::EventSink;
        let mut i = 0;
        while i < count {
            let n = (count - i).min(25);
            let receipts: Vec<_> = (i..i + n).map(|k| log.submit(&ev(id, k, pad))).collect();
            for (k, r) in receipts.into_iter().enumerate() {
                r.wait()
                    .unwrap_or_else(|e| panic!("child {id}: submit {}: {e}", i + k as u64));
            }
            i += n;
        }
        return;
    }
    for i in 0..count {
        log.append(&ev(id, i, pad))
            .unwrap_or_else(|e| panic!("child {id}: append {i}: {e}"));
    }
}

fn ready_file(go: &Path, id: &str) -> PathBuf {
    let mut name = go.file_name().unwrap().to_os_string();
    name.push(format!(".ready-{id}"));
    go.with_file_name(name)
}

/// Kills the child if the test fails before waiting for it.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Reap {
    /// Waits for the child; panics with its stderr unless it exited 0.
    fn wait_ok(mut self, what: &str) {
        let out = self.0.take().unwrap().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn running(&mut self) -> bool {
        matches!(self.0.as_mut().unwrap().try_wait(), Ok(None))
    }
}

struct Spec<'a> {
    log: &'a Path,
    count: u64,
    max_file_bytes: u64,
    fsync: &'a str,
    pad: usize,
    go: &'a Path,
}

/// Starts child `id` running the test `test` in child mode.
fn spawn(test: &str, id: &str, s: &Spec<'_>) -> Reap {
    let spec = format!(
        "{}|{id}|{}|{}|{}|{}|{}",
        s.log.display(),
        s.count,
        s.max_file_bytes,
        s.fsync,
        s.pad,
        s.go.display()
    );
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Reap(Some(child))
}

/// Starts `n` children, waits until each has opened the log, then lets them
/// all append at once.
fn start_writers(test: &str, n: usize, s: &Spec<'_>) -> Vec<Reap> {
    let ids: Vec<String> = (0..n).map(|k| format!("writer-{k}")).collect();
    start_named_writers(test, &ids, s)
}

/// [`start_writers`] with the children's ids given.
fn start_named_writers(test: &str, ids: &[String], s: &Spec<'_>) -> Vec<Reap> {
    let mut children: Vec<(String, Reap)> = ids
        .iter()
        .map(|id| (id.clone(), spawn(test, id, s)))
        .collect();
    for (id, c) in &mut children {
        while !ready_file(s.go, id).exists() {
            if !c.running() {
                // It exited before it was ready: show why.
                let c = std::mem::replace(c, Reap(None));
                c.wait_ok(id);
                panic!("{id} exited before it opened the log");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    fs::write(s.go, b"").unwrap();
    children.into_iter().map(|(_, c)| c).collect()
}

/// Every event line of the log, in chain order: (actor, duration_us).
fn events_in(log: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for file in audit::log_files(log).unwrap() {
        for line in fs::read_to_string(&file).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["type"] == "event" {
                out.push((
                    v["event"]["actor"].as_str().unwrap().to_owned(),
                    v["event"]["duration_us"].as_u64().unwrap(),
                ));
            }
        }
    }
    out
}

/// 8 processes x 200 appends to one log at once (created by whichever
/// child comes first, rotated across files by whichever child fills one):
/// one chain of 1,600 events that verifies, each writer's events once and
/// in its order.
#[test]
fn eight_processes_append_one_chain() {
    const TEST: &str = "eight_processes_append_one_chain";
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child_main(&spec);
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let go = dir.path().join("go");
    let spec = Spec {
        log: &log,
        count: 200,
        // About 170 events a file: the children rotate it several times.
        max_file_bytes: 64 << 10,
        fsync: "8",
        pad: 0,
        go: &go,
    };
    for (k, c) in start_writers(TEST, 8, &spec).into_iter().enumerate() {
        c.wait_ok(&format!("writer-{k}"));
    }

    let report = Verifier::new()
        .key(key())
        .verify(&log)
        .unwrap_or_else(|e| panic!("the chain of 8 writers does not verify: {e}"));
    assert_eq!(report.entries, 1600, "{report:?}");
    assert!(report.gaps.is_empty(), "{:?}", report.gaps);
    assert!(report.files.len() > 1, "the log was rotated: {report:?}");
    assert_eq!(report.lines, 1600 + report.files.len() as u64);
    let mut per_writer: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (actor, i) in events_in(&log) {
        per_writer.entry(actor).or_default().push(i);
    }
    assert_eq!(per_writer.len(), 8);
    for (actor, seen) in per_writer {
        assert_eq!(seen, (0..200).collect::<Vec<_>>(), "{actor}");
    }
}

/// The same with half of the processes appending through the log's writer
/// thread (group commit under the same lock, fsync every entry): one chain
/// of 1,600 events that verifies, each writer's events once and in order.
#[test]
fn processes_appending_through_the_writer_thread_keep_one_chain() {
    const TEST: &str = "processes_appending_through_the_writer_thread_keep_one_chain";
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child_main(&spec);
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let go = dir.path().join("go");
    let spec = Spec {
        log: &log,
        count: 200,
        max_file_bytes: 64 << 10,
        fsync: "every",
        pad: 0,
        go: &go,
    };
    let ids: Vec<String> = (0..8)
        .map(|k| {
            if k % 2 == 0 {
                format!("writer-{k}")
            } else {
                format!("queued-{k}")
            }
        })
        .collect();
    for (id, c) in ids.iter().zip(start_named_writers(TEST, &ids, &spec)) {
        c.wait_ok(id);
    }
    let report = Verifier::new()
        .key(key())
        .verify(&log)
        .unwrap_or_else(|e| panic!("the chain of 8 writers does not verify: {e}"));
    assert_eq!(report.entries, 1600, "{report:?}");
    assert!(report.gaps.is_empty(), "{:?}", report.gaps);
    assert!(report.files.len() > 1, "the log was rotated: {report:?}");
    let mut per_writer: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (actor, i) in events_in(&log) {
        per_writer.entry(actor).or_default().push(i);
    }
    assert_eq!(per_writer.len(), 8);
    for (actor, seen) in per_writer {
        assert_eq!(seen, (0..200).collect::<Vec<_>>(), "{actor}");
    }
}

/// A verify that runs while another process appends (large lines that
/// span pages, rotations) always finds the chain intact: it never reads an
/// append in progress (a line not yet complete, a new file without its
/// header yet) as damage.
#[test]
fn a_verify_during_appends_never_reports_tampering() {
    const TEST: &str = "a_verify_during_appends_never_reports_tampering";
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child_main(&spec);
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let go = dir.path().join("go");
    drop(AuditLog::builder().audit_key(key()).open(&log).unwrap());
    let spec = Spec {
        log: &log,
        count: 300,
        max_file_bytes: 1 << 20,
        fsync: "never",
        // Lines of about 9 KiB: each spans pages.
        pad: 9 << 10,
        go: &go,
    };
    let mut writers = start_writers(TEST, 2, &spec);
    let mut verifies = 0u64;
    let mut last = 0u64;
    while writers.iter_mut().any(Reap::running) {
        match Verifier::new().key(key()).verify(&log) {
            Ok(report) => {
                assert!(report.entries >= last, "the log shrank: {report:?}");
                last = report.entries;
                verifies += 1;
            }
            Err(e) => panic!("verify #{} during appends: {e}", verifies + 1),
        }
    }
    for (k, c) in writers.into_iter().enumerate() {
        c.wait_ok(&format!("writer-{k}"));
    }
    let report = Verifier::new().key(key()).verify(&log).unwrap();
    assert_eq!(report.entries, 600);
    assert!(verifies > 0);
}

/// Whether some process waits for a `flock` on `path` (Linux: a blocked
/// request is listed in /proc/locks with `->`).
fn someone_waits_for_a_lock_on(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{}", fs::metadata(path).unwrap().ino());
    fs::read_to_string("/proc/locks").unwrap().lines().any(|l| {
        l.contains("->") && l.contains("FLOCK") && l.split_whitespace().any(|t| t.ends_with(&ino))
    })
}

/// The same, step by step: a writer holds the log's lock (an exclusive
/// `flock` on its first file, as documented) and has written half of a
/// line. A verify started then waits for the lock instead of reporting the
/// half line as damage, and then verifies the completed line.
#[test]
fn a_verify_waits_for_the_append_in_progress() {
    assert!(
        Path::new("/proc/locks").exists(),
        "this test needs Linux /proc/locks"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    for i in 0..3 {
        log.append(&ev("this-writer", i, 0)).unwrap();
    }
    drop(log);
    // The line the next append will write, made on a copy of the log.
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("audit.jsonl");
    fs::copy(&path, &copy).unwrap();
    let c = AuditLog::builder().audit_key(key()).open(&copy).unwrap();
    c.append(&ev("this-writer", 3, 0)).unwrap();
    drop(c);
    let line = last_line(&copy);
    let (first, second) = line.as_bytes().split_at(line.len() / 2);

    let lock = fs::File::open(&path).unwrap();
    lock.lock().unwrap();
    append_raw(&path, first);
    let verifier = {
        let path = path.clone();
        std::thread::spawn(move || Verifier::new().key(key()).verify(&path))
    };
    while !verifier.is_finished() && !someone_waits_for_a_lock_on(&path) {
        std::thread::sleep(Duration::from_millis(1));
    }
    append_raw(&path, second);
    lock.unlock().unwrap();
    let report = verifier
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("a verify during an append: {e}"));
    assert_eq!(report.entries, 4);
}

/// The last line of `path`, newline included.
fn last_line(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    text.split_inclusive('\n').next_back().unwrap().to_owned()
}

/// The line a writer that resumed from a log holding `content` would
/// append for event `i` of `id` (written in a copy, never in the log).
fn line_another_writer_appends(content: &[u8], id: &str, i: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("audit.jsonl");
    fs::write(&copy, content).unwrap();
    let w = AuditLog::builder().audit_key(key()).open(&copy).unwrap();
    w.append(&ev(id, i, 0)).unwrap();
    drop(w);
    last_line(&copy)
}

fn append_raw(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// What the error of a writer that refuses a broken chain must tell the
/// operator: which log, and how to start a new one.
fn assert_says_how_to_rotate(msg: &str, log: &Path) {
    assert!(msg.contains(&log.display().to_string()), "{msg}");
    assert!(
        msg.contains("audit verify") && msg.contains("move") && msg.contains("new log"),
        "the error says how to rotate to a new log: {msg}"
    );
}

/// A second writer that did not take the lock (an older version, a copy of
/// the file written back) forks the chain: the writer that finds the fork
/// refuses the entry, so the keyring refuses the key use (`Error::Audit`),
/// and so does every later open, with an error that says how to start a
/// new log. Following those steps gives a working log again.
#[tokio::test]
async fn a_writer_refuses_a_forked_chain_and_says_how_to_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::builder().audit_key(key()).open(&path).unwrap());
    let kms = Arc::new(MemoryKms::new("kms"));
    let k = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(k.clone())
            .event_sink(log.clone())
            .build()
            .unwrap(),
    )
    .as_caller("lab-service", "treatment");
    let c = ctx("1");
    let sealed = env.seal(b"potassium 4.1", &c).await.unwrap();
    let before = fs::read(&path).unwrap();
    log.append(&ev("this-writer", 1, 0)).unwrap();

    // The other writer resumed from the same tail and appended its own
    // entry with the same sequence number.
    append_raw(
        &path,
        line_another_writer_appends(&before, "other-writer", 1).as_bytes(),
    );

    // The fork is what verify reports...
    let bad = Verifier::new().key(key()).verify(&path).unwrap_err();
    let bad = bad.bad_line().unwrap();
    assert!(
        matches!(bad.problem, Problem::SeqMismatch { .. }),
        "{bad:?}"
    );

    // ... and the writer does not append after it: the key use is refused.
    let e = env.open(&sealed, &c).await.unwrap_err();
    assert!(matches!(e, Error::Audit(_)), "{e:?}");
    assert_says_how_to_rotate(&e.to_string(), &path);
    let e = log.append(&ev("this-writer", 2, 0)).unwrap_err();
    assert_says_how_to_rotate(&e.to_string(), &path);
    drop(env);
    drop(log);
    let after_refusal = fs::read(&path).unwrap();

    // A later run (a new process) refuses to resume it too.
    let e = AuditLog::builder()
        .audit_key(key())
        .open(&path)
        .unwrap_err();
    // (The writer that found the fork left the marker, which says so first.)
    assert!(matches!(e, OpenError::Broken(_)), "{e:?}");
    assert_says_how_to_rotate(&e.to_string(), &path);
    assert_eq!(fs::read(&path).unwrap(), after_refusal, "nothing appended");

    // The documented way out: keep the old files as evidence, start a new
    // log at the same path.
    let evidence = dir.path().join("evidence");
    fs::create_dir(&evidence).unwrap();
    for f in audit::log_files(&path).unwrap() {
        fs::rename(&f, evidence.join(f.file_name().unwrap())).unwrap();
    }
    fs::rename(
        dir.path().join("audit.jsonl.broken"),
        evidence.join("audit.jsonl.broken"),
    )
    .unwrap();
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    log.append(&ev("this-writer", 3, 0)).unwrap();
    drop(log);
    assert_eq!(Verifier::new().key(key()).verify(&path).unwrap().entries, 1);
}

/// Lines removed from the end behind a writer's back (a restore of an
/// older copy, a rollback by hand): the tail no longer follows from what
/// the writer last wrote, and it refuses instead of chaining to a line
/// that is gone.
#[test]
fn a_writer_refuses_a_tail_cut_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    for i in 0..3 {
        log.append(&ev("this-writer", i, 0)).unwrap();
    }
    let before = fs::read(&path).unwrap();
    log.append(&ev("this-writer", 3, 0)).unwrap();
    log.append(&ev("this-writer", 4, 0)).unwrap();
    fs::write(&path, &before).unwrap();

    let e = log.append(&ev("this-writer", 5, 0)).unwrap_err();
    assert_says_how_to_rotate(&e.to_string(), &path);
    assert_eq!(fs::read(&path).unwrap(), before, "nothing appended");
    // Still refused on the next try: what is on disk is not what it wrote.
    assert!(log.append(&ev("this-writer", 6, 0)).is_err());
}

/// A writer of another process died in the middle of an append (SIGKILL,
/// power failure): the log ends in a line without its newline. The next
/// append, under the lock, does not write after it: by default it refuses
/// and says how to repair; with `repair_torn_tail` it cuts the line off
/// and records a `torn-tail` gap, and the chain goes on.
#[test]
fn a_line_torn_by_another_writer_is_refused_or_repaired() {
    for repair in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::builder()
            .audit_key(key())
            .repair_torn_tail(repair)
            .open(&path)
            .unwrap();
        log.append(&ev("this-writer", 0, 0)).unwrap();
        // What the other writer would have written next, cut in half.
        let line = line_another_writer_appends(&fs::read(&path).unwrap(), "killed-writer", 0);
        append_raw(&path, &line.as_bytes()[..line.len() / 2]);
        let torn = fs::read(&path).unwrap();

        let r = log.append(&ev("this-writer", 1, 0));
        if !repair {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("incomplete") && e.contains("repair_torn_tail"),
                "{e}"
            );
            assert_eq!(fs::read(&path).unwrap(), torn, "nothing appended");
            continue;
        }
        r.unwrap();
        log.append(&ev("this-writer", 2, 0)).unwrap();
        drop(log);
        let report = Verifier::new().key(key()).verify(&path).unwrap();
        assert_eq!(report.entries, 3);
        assert_eq!(report.gaps.len(), 1);
        assert_eq!(report.gaps[0].reason, "torn-tail");
    }
}

/// The log's first file moved away (to an evidence directory, as the
/// rotation steps say) while a writer still has it open: that writer's
/// lock no longer excludes the writers of the new log, and its entries
/// would land in the evidence file. It refuses, for good, and writes
/// nothing to the moved file; a new log at the path works.
#[test]
fn a_writer_refuses_a_log_moved_away_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    log.append(&ev("this-writer", 0, 0)).unwrap();
    let moved = dir.path().join("evidence.jsonl");
    fs::rename(&path, &moved).unwrap();
    let evidence = fs::read(&moved).unwrap();

    let e = log
        .append(&ev("this-writer", 1, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("moved away") && e.contains("Reopen"), "{e}");
    assert_eq!(fs::read(&moved).unwrap(), evidence, "nothing appended");
    // A new first file at the path (another writer started a new log) is
    // not this writer's either.
    fs::write(&path, b"").unwrap();
    let e = log
        .append(&ev("this-writer", 2, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refuses"), "{e}");
    assert_eq!(fs::read(&path).unwrap(), b"", "nothing appended");
    drop(log);
    fs::remove_file(&path).unwrap();

    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    log.append(&ev("this-writer", 3, 0)).unwrap();
    drop(log);
    assert_eq!(Verifier::new().key(key()).verify(&path).unwrap().entries, 1);
    assert_eq!(
        Verifier::new().key(key()).verify(&moved).unwrap().entries,
        1
    );
}

/// Whoever can write the log's directory plants a symbolic link under the
/// log's name (pointing at a file of the victim's, or at nothing) or under
/// the name of its next rotated file: the writer follows none of them. It
/// refuses with an error that names the link, and the target is neither
/// created nor written nor locked.
#[test]
fn a_symbolic_link_in_place_of_a_log_file_is_refused() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let victim = elsewhere.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();

    // The first file: a link to an existing file, then a dangling one.
    let path = dir.path().join("audit.jsonl");
    symlink(&victim, &path).unwrap();
    let e = AuditLog::builder()
        .audit_key(key())
        .open(&path)
        .unwrap_err();
    assert!(matches!(e, OpenError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    fs::remove_file(&path).unwrap();
    let absent = elsewhere.path().join("absent");
    symlink(&absent, &path).unwrap();
    let e = AuditLog::builder()
        .audit_key(key())
        .open(&path)
        .unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(!absent.exists(), "the link's target was created");
    fs::remove_file(&path).unwrap();

    // A rotated file: a link planted as the log's next file.
    let log = AuditLog::builder()
        .audit_key(key())
        .max_file_bytes(2 << 10)
        .open(&path)
        .unwrap();
    log.append(&ev("this-writer", 0, 0)).unwrap();
    let next = dir.path().join("audit.jsonl.000002");
    symlink(&victim, &next).unwrap();
    // Found by the open writer under the lock, at its next append...
    let e = log.append(&ev("this-writer", 1, 0)).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    drop(log);
    // ... and by the next open.
    let e = AuditLog::builder()
        .audit_key(key())
        .max_file_bytes(2 << 10)
        .open(&path)
        .unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
}

/// A later file of the log renamed away and copied back (an operator
/// restoring it, a local user who can write the directory) while a writer
/// appends to it: the writer would go on writing to the renamed file,
/// outside the log and its lock. It refuses instead, leaves the marker,
/// and every later open refuses the log too.
#[test]
fn a_later_file_renamed_and_copied_back_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder()
        .audit_key(key())
        .max_file_bytes(600)
        .open(&path)
        .unwrap();
    let mut i = 0;
    while !log.current_file().ends_with("audit.jsonl.000002") {
        log.append(&ev("this-writer", i, 0)).unwrap();
        i += 1;
        assert!(i < 100, "never rotated");
    }
    let second = log.current_file();
    let moved = dir.path().join("moved-away");
    fs::rename(&second, &moved).unwrap();
    fs::copy(&moved, &second).unwrap();
    let before = fs::read(&moved).unwrap();

    let e = log.append(&ev("this-writer", i, 0)).unwrap_err();
    assert!(
        e.to_string().contains("renamed, replaced or removed"),
        "{e}"
    );
    assert_says_how_to_rotate(&e.to_string(), &path);
    assert_eq!(
        fs::read(&moved).unwrap(),
        before,
        "nothing written outside the log"
    );
    assert_eq!(
        fs::read(&second).unwrap(),
        before,
        "nothing written to the copy"
    );
    assert!(dir.path().join("audit.jsonl.broken").exists());
    drop(log);
    match AuditLog::builder().audit_key(key()).open(&path) {
        Err(OpenError::Broken(m)) => assert_says_how_to_rotate(&m, &path),
        other => panic!("a later open resumed a broken log: {other:?}"),
    }
}

/// What one writer found broken, every process refuses: the marker left
/// beside the log makes a later open (another process, a restart) refuse
/// a chain whose cut end verifies on its own. Moving the files and the
/// marker away, as the refusal says, gives a new log.
#[test]
fn a_cut_chain_found_by_one_writer_is_refused_by_every_later_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    for i in 0..3 {
        log.append(&ev("this-writer", i, 0)).unwrap();
    }
    let before = fs::read(&path).unwrap();
    log.append(&ev("this-writer", 3, 0)).unwrap();
    fs::write(&path, &before).unwrap();
    assert!(log.append(&ev("this-writer", 4, 0)).is_err());
    drop(log);
    // The cut chain verifies on its own: only the marker tells.
    Verifier::new().key(key()).verify(&path).unwrap();
    match AuditLog::builder().audit_key(key()).open(&path) {
        Err(OpenError::Broken(m)) => {
            assert!(m.contains("audit.jsonl.broken"), "{m}");
            assert_says_how_to_rotate(&m, &path);
        }
        other => panic!("a later open resumed a cut log: {other:?}"),
    }
    assert_eq!(fs::read(&path).unwrap(), before, "nothing appended");
    let evidence = dir.path().join("evidence");
    fs::create_dir(&evidence).unwrap();
    for name in ["audit.jsonl", "audit.jsonl.broken"] {
        fs::rename(dir.path().join(name), evidence.join(name)).unwrap();
    }
    let fresh = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    assert_eq!(fresh.append(&ev("this-writer", 0, 0)).unwrap(), 1);
}

/// A FIFO planted as a rotated file of the log: verify reports it and
/// returns (it used to wait on the FIFO for ever), and never follows a
/// symbolic link planted as one.
#[test]
fn verify_neither_waits_on_a_fifo_nor_follows_a_link() {
    for planted in ["fifo", "link"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
        log.append(&ev("this-writer", 0, 0)).unwrap();
        drop(log);
        let second = dir.path().join("audit.jsonl.000002");
        if planted == "fifo" {
            let ok = Command::new("mkfifo").arg(&second).status().unwrap();
            assert!(ok.success());
        } else {
            let outside = dir.path().join("outside");
            fs::copy(&path, &outside).unwrap();
            std::os::unix::fs::symlink(&outside, &second).unwrap();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Verifier::new().key(key()).verify(&p).map(|_| ()));
        });
        // A hang guard only: verify answers at once.
        let answer = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("verify waits on a planted {planted}"));
        assert!(answer.is_err(), "a planted {planted} verified");
    }
}
