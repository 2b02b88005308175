//! The PostgreSQL audit trail against a real PostgreSQL server, started by
//! `scripts/test.sh` (scripts/postgres.sh), which exports `PHI_PG_URL` (a
//! superuser), `PHI_PG_HOST`, `PHI_PG_PORT` and, for the restart test,
//! `PHI_PG_SCRIPT` and `PHI_PG_STATE_DIR`. Without them every test fails:
//! none is skipped.
//!
//! Each test works in a database of its own (created fresh), with the
//! migration of `init_db`, the login roles `phi_test_writer` (a member of
//! `phi_audit_writer`) and `phi_test_verifier` (of `phi_audit_verifier`).
//! Writers in other processes are this test binary re-executed with
//! `PHI_PG_CHILD` set.
#![cfg(feature = "postgres")]

mod conformance;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use conformance::{ctx, MemoryKms};
use phi_envelope::audit::postgres::{self, PgAuditLog, PgError};
use phi_envelope::audit::{AuditKey, Problem, Verifier, VerifyError};
use phi_envelope::events::{Event, EventSink, Operation, Outcome};
use phi_envelope::{Envelope, Error, Keyring};

const CHILD_ENV: &str = "PHI_PG_CHILD";

/// Every test holds this for reading; the restart test for writing (a
/// restart breaks every connection of the server).
static SERVER: RwLock<()> = RwLock::new(());
/// Role and database creation, one at a time (catalog updates of one
/// cluster).
static DDL: Mutex<()> = Mutex::new(());

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run these tests through scripts/test.sh, which starts PostgreSQL"
        )
    })
}

fn key() -> AuditKey {
    AuditKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

fn other_key() -> AuditKey {
    AuditKey::new(b"fedcba9876543210fedcba9876543210").unwrap()
}

fn url(user: &str, db: &str) -> String {
    format!(
        "postgresql://{user}@{}:{}/{db}",
        env("PHI_PG_HOST"),
        env("PHI_PG_PORT")
    )
}

/// Runs SQL as `url`; `Err` is the SQLSTATE (or the error's text).
fn sql(url: &str, stmts: &str) -> Result<(), String> {
    let url = url.to_owned();
    let stmts = stmts.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client.batch_execute(&stmts).await.map_err(|e| {
                e.as_db_error()
                    .map(|d| d.code().code().to_owned())
                    .unwrap_or_else(|| e.to_string())
            })
        })
    })
    .join()
    .unwrap()
}

/// The rows of a query's first two columns (`bigint`, `text`), as `url`.
fn rows(url: &str, query: &str) -> Vec<(i64, String)> {
    let url = url.to_owned();
    let query = query.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .query(&query, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        })
    })
    .join()
    .unwrap()
}

/// A fresh database `db` with the migration and the test's login roles;
/// returns (superuser, writer, verifier) URLs.
fn setup(db: &str) -> (String, String, String) {
    let admin = env("PHI_PG_URL");
    {
        let _ddl = DDL.lock().unwrap_or_else(|p| p.into_inner());
        sql(
            &admin,
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        )
        .unwrap();
        sql(&admin, &format!("CREATE DATABASE {db}")).unwrap();
        let su = url("postgres", db);
        postgres::init_db(&su).unwrap();
        // Running it twice changes nothing.
        postgres::init_db(&su).unwrap();
        sql(
            &admin,
            "DO $$ BEGIN
               BEGIN CREATE ROLE phi_test_writer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
               BEGIN CREATE ROLE phi_test_verifier LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
             END $$;
             GRANT phi_audit_writer TO phi_test_writer;
             GRANT phi_audit_verifier TO phi_test_verifier;",
        )
        .unwrap();
    }
    (
        url("postgres", db),
        url("phi_test_writer", db),
        url("phi_test_verifier", db),
    )
}

fn ev(actor: &str) -> Event {
    Event::new(Operation::Unwrap, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller(actor, "treatment")
}

fn open(writer: &str) -> PgAuditLog {
    PgAuditLog::builder()
        .audit_key(key())
        .timeout(Duration::from_secs(20))
        .open(writer)
        .unwrap()
}

/// The actors of the event lines in the table, in `seq` order.
fn actors(su: &str) -> Vec<String> {
    rows(su, "SELECT seq, line FROM phi_audit.entries ORDER BY seq")
        .into_iter()
        .filter_map(|(_, line)| {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            v["event"]["actor"].as_str().map(str::to_owned)
        })
        .collect()
}

fn verify(verifier: &str) -> Result<phi_envelope::audit::VerifyReport, PgError> {
    postgres::verify(&Verifier::new().key(key()), verifier)
}

fn bad(e: PgError) -> (Option<u64>, Problem) {
    match e {
        PgError::Verify(VerifyError::BadLine(b)) => (b.seq, b.problem),
        other => panic!("expected a bad entry, got {other:?}"),
    }
}

// --- child processes -------------------------------------------------------

/// What a child does, from `PHI_PG_CHILD`: `URL|ID|COUNT|THREADS`. It
/// appends `COUNT` events (actor `ID-i`) from `THREADS` threads through
/// one [`PgAuditLog`], printing `ACK ID-i` once each is committed. A
/// refused append is retried (it is not acknowledged); COUNT 0 means
/// forever.
fn child_main(spec: &str) {
    let p: Vec<&str> = spec.split('|').collect();
    let [url, id, count, threads] = p[..] else {
        panic!("bad child spec {spec:?}");
    };
    let count: u64 = count.parse().unwrap();
    let threads: u64 = threads.parse().unwrap();
    let log = Arc::new(open(url));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (log, out, id) = (log.clone(), out.clone(), id.to_owned());
            std::thread::spawn(move || {
                let mut i = t;
                while count == 0 || i < count {
                    let actor = format!("{id}-{i}");
                    if log.record(&ev(&actor)).is_ok() {
                        let mut o = out.lock().unwrap();
                        writeln!(o, "ACK {actor}").unwrap();
                        o.flush().unwrap();
                        i += threads;
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

/// Runs the child's part when this process is a child.
fn as_child() -> bool {
    match std::env::var(CHILD_ENV) {
        Ok(spec) => {
            child_main(&spec);
            true
        }
        Err(_) => false,
    }
}

struct Child {
    child: std::process::Child,
    acks: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Child {
    fn spawn(test: &str, spec: &str) -> Child {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let a = acks.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The harness prints `test NAME ... ` before the test runs,
                // without a newline: the first ack may follow it.
                if let Some(at) = line.find("ACK ") {
                    a.lock().unwrap().push(line[at + 4..].to_owned());
                }
            }
        });
        Child {
            child,
            acks,
            reader: Some(reader),
        }
    }

    fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Waits for the child to exit (successfully) and returns its acks.
    fn finish(mut self) -> Vec<String> {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
        self.take_acks()
    }

    /// SIGKILLs the child and returns what it acknowledged before.
    fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        let _ = self.child.wait();
        self.take_acks()
    }

    fn take_acks(&mut self) -> Vec<String> {
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        std::mem::take(&mut *self.acks.lock().unwrap())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// --- tests -----------------------------------------------------------------

/// Eight processes append 1,000 events each at once: one chain that
/// verifies, with every event exactly once.
#[test]
fn eight_processes_append_one_chain() {
    if as_child() {
        return;
    }
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let (su, writer, verifier) = setup("phi_t_eight");
    let children: Vec<Child> = (0..8)
        .map(|k| {
            Child::spawn(
                "eight_processes_append_one_chain",
                &format!("{writer}|p{k}|1000|4"),
            )
        })
        .collect();
    let mut acked = BTreeSet::new();
    for c in children {
        let acks = c.finish();
        assert_eq!(acks.len(), 1000);
        acked.extend(acks);
    }
    let report = verify(&verifier).unwrap();
    assert_eq!(report.entries, 8000);
    assert!(report.keyed);
    let found = actors(&su);
    assert_eq!(found.len(), 8000);
    let found_set: BTreeSet<String> = found.into_iter().collect();
    assert_eq!(found_set, acked, "every event once, none other");
}

/// Writers SIGKILLed in the middle of appending: every entry they
/// acknowledged is there, the chain verifies, and the survivors (and a new
/// writer) go on appending to it.
#[test]
fn sigkill_of_writers_loses_no_acknowledged_entry() {
    if as_child() {
        return;
    }
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let (su, writer, verifier) = setup("phi_t_sigkill");
    let test = "sigkill_of_writers_loses_no_acknowledged_entry";
    let victims: Vec<Child> = (0..3)
        .map(|k| Child::spawn(test, &format!("{writer}|victim{k}|0|4")))
        .collect();
    let survivor = Child::spawn(test, &format!("{writer}|survivor|600|2"));
    wait_until("the victims to append", || {
        victims.iter().all(|c| c.acked() >= 100)
    });
    let mut acked = BTreeSet::new();
    for v in victims {
        acked.extend(v.kill());
    }
    acked.extend(survivor.finish());
    let after = Child::spawn(test, &format!("{writer}|after|50|1"));
    acked.extend(after.finish());

    let report = verify(&verifier).unwrap();
    let found: BTreeSet<String> = actors(&su).into_iter().collect();
    assert!(
        acked.is_subset(&found),
        "acknowledged but missing: {:?}",
        acked.difference(&found).take(5).collect::<Vec<_>>()
    );
    // Entries committed but not acknowledged (a kill between the commit
    // and the print) are in the chain too, and nothing else is.
    assert!(found
        .iter()
        .all(|a| a.starts_with("victim") || a.starts_with("survivor") || a.starts_with("after")));
    assert_eq!(report.entries as usize, found.len());
}

/// `pg_ctl restart` while four writers append: every acknowledged entry
/// survives, the writers reconnect, the chain verifies (the events refused
/// meanwhile are recorded as gap lines).
#[test]
fn database_restart_mid_load() {
    let _s = SERVER.write().unwrap_or_else(|p| p.into_inner());
    let (su, writer, verifier) = setup("phi_t_restart");
    let logs: Vec<Arc<PgAuditLog>> = (0..4).map(|_| Arc::new(open(&writer))).collect();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hs: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(k, log)| {
            let (log, acked, restarted) = (log.clone(), acked.clone(), restarted.clone());
            std::thread::spawn(move || {
                let mut after_restart = 0;
                let mut i = 0u64;
                while after_restart < 100 {
                    let actor = format!("w{k}-{i}");
                    if log.record(&ev(&actor)).is_ok() {
                        acked.lock().unwrap().push(actor);
                        if restarted.load(std::sync::atomic::Ordering::SeqCst) {
                            after_restart += 1;
                        }
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    wait_until("appends before the restart", || {
        acked.lock().unwrap().len() >= 200
    });
    let status = Command::new("bash")
        .arg(env("PHI_PG_SCRIPT"))
        .arg("restart-db")
        .env("PHI_TEST_SERVICES_DIR", env("PHI_PG_STATE_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctl restart failed");
    restarted.store(true, std::sync::atomic::Ordering::SeqCst);
    for h in hs {
        h.join().unwrap();
    }
    for log in &logs {
        assert!(
            log.stats().connections >= 2,
            "the writer reconnected after the restart: {:?}",
            log.stats()
        );
    }
    let report = verify(&verifier).unwrap();
    let found: BTreeSet<String> = actors(&su).into_iter().collect();
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(acked.is_subset(&found), "an acknowledged entry was lost");
    assert_eq!(report.entries as usize, found.len());
}

/// The writer role can insert, and call the head function, nothing else:
/// no UPDATE, DELETE, TRUNCATE or even SELECT; the verifier role can only
/// SELECT. The trigger refuses UPDATE and DELETE even to a superuser who
/// has not disabled it.
#[test]
fn the_writer_role_can_only_insert() {
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let (su, writer, verifier) = setup("phi_t_roles");
    let log = open(&writer);
    for i in 0..3 {
        log.record(&ev(&format!("a-{i}"))).unwrap();
    }
    drop(log);
    let denied = Err("42501".to_owned());
    assert_eq!(
        sql(
            &writer,
            "UPDATE phi_audit.entries SET line = 'x' WHERE seq = 1"
        ),
        denied
    );
    assert_eq!(
        sql(&writer, "DELETE FROM phi_audit.entries WHERE seq = 1"),
        denied
    );
    assert_eq!(sql(&writer, "TRUNCATE phi_audit.entries"), denied);
    assert_eq!(sql(&writer, "SELECT * FROM phi_audit.entries"), denied);
    assert_eq!(
        sql(&verifier, "INSERT INTO phi_audit.entries VALUES (99, 'x')"),
        denied
    );
    assert_eq!(
        sql(&verifier, "DELETE FROM phi_audit.entries WHERE seq = 1"),
        denied
    );
    assert_eq!(sql(&verifier, "SELECT phi_audit.lock_head()"), denied);
    assert_eq!(sql(&verifier, "SELECT * FROM phi_audit.entries"), Ok(()));
    // The append-only trigger, for anyone who has not turned it off.
    assert_eq!(
        sql(&su, "UPDATE phi_audit.entries SET line = 'x' WHERE seq = 1"),
        denied
    );
    assert_eq!(sql(&su, "DELETE FROM phi_audit.entries"), denied);
    assert_eq!(sql(&su, "TRUNCATE phi_audit.entries"), denied);
    let report = verify(&verifier).unwrap();
    assert_eq!((report.lines, report.entries), (4, 3));
}

/// Ten entries, then a superuser (with the trigger off) tampers.
fn tampered(db: &str, tamper: &str) -> (Option<u64>, Problem) {
    let (su, writer, verifier) = setup(db);
    let log = open(&writer);
    for i in 1..=10 {
        log.record(&ev(&format!("w-{i}"))).unwrap();
    }
    drop(log);
    verify(&verifier).unwrap();
    sql(
        &su,
        &format!("SET session_replication_role = replica; {tamper}"),
    )
    .unwrap();
    bad(verify(&verifier).unwrap_err())
}

/// An UPDATE, a DELETE and a reordering by a superuser are each found at
/// the entry they touched.
#[test]
fn superuser_tampering_is_detected_at_the_right_entry() {
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    // Entry 5 names another actor (still canonical JSON).
    let (seq, problem) = tampered(
        "phi_t_update",
        r#"UPDATE phi_audit.entries SET line = replace(line, '"actor":"w-5"', '"actor":"mallory"') WHERE seq = 5"#,
    );
    assert_eq!((seq, problem), (Some(5), Problem::HashMismatch));

    let (seq, problem) = tampered(
        "phi_t_delete",
        "DELETE FROM phi_audit.entries WHERE seq = 5",
    );
    assert_eq!(
        (seq, problem),
        (
            Some(6),
            Problem::SeqMismatch {
                expected: 5,
                found: 6
            }
        )
    );

    // Entries 4 and 5 swapped.
    let (seq, problem) = tampered(
        "phi_t_reorder",
        "UPDATE phi_audit.entries e SET line = o.line FROM phi_audit.entries o
         WHERE (e.seq, o.seq) IN ((4, 5), (5, 4))",
    );
    assert_eq!(
        (seq, problem),
        (
            Some(5),
            Problem::SeqMismatch {
                expected: 4,
                found: 5
            }
        )
    );

    // The last entries removed: only an anchor tells.
    let (su, writer, verifier) = setup("phi_t_tail");
    let log = open(&writer);
    for i in 1..=5 {
        log.record(&ev(&format!("w-{i}"))).unwrap();
    }
    drop(log);
    let anchor = verify(&verifier).unwrap().last;
    sql(
        &su,
        "SET session_replication_role = replica; DELETE FROM phi_audit.entries WHERE seq >= 4",
    )
    .unwrap();
    verify(&verifier).unwrap();
    let e = postgres::verify(&Verifier::new().key(key()).anchor(anchor), &verifier).unwrap_err();
    assert!(
        matches!(bad(e).1, Problem::MissingTail { .. }),
        "the anchor finds the cut"
    );
}

/// A writer that finds the last entry rewritten refuses every entry (and
/// so the keyring refuses the key use), with a message that says what to
/// do.
#[test]
fn a_writer_refuses_a_rewritten_head_and_the_keyring_fails_closed() {
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(a_writer_refuses_a_rewritten_head_and_the_keyring_fails_closed_async());
}

async fn a_writer_refuses_a_rewritten_head_and_the_keyring_fails_closed_async() {
    let (su, writer, _verifier) = setup("phi_t_head");
    let log = Arc::new(open(&writer));
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
    env.open(&sealed, &c).await.unwrap();
    let su2 = su.clone();
    tokio::task::spawn_blocking(move || {
        sql(
            &su2,
            r#"SET session_replication_role = replica;
               UPDATE phi_audit.entries SET line = replace(line, '"lab-service"', '"mallory"')
               WHERE seq = (SELECT max(seq) FROM phi_audit.entries)"#,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let e = env.open(&sealed, &c).await.unwrap_err();
    assert!(matches!(e, Error::Audit(_)), "{e:?}");
    assert!(e.to_string().contains("does not verify"), "{e}");
    assert!(e.to_string().contains("docs/AUDIT-DB.md"), "{e}");
}

/// A database that stops answering: the key use is refused; once it is
/// back, the writer reconnects and a gap line records what was refused.
#[test]
fn an_unreachable_database_fails_closed_and_the_gap_is_recorded() {
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(an_unreachable_database_fails_closed_and_the_gap_is_recorded_async());
}

async fn an_unreachable_database_fails_closed_and_the_gap_is_recorded_async() {
    let (su, writer, verifier) = setup("phi_t_down");
    let log = Arc::new(open(&writer));
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
    let admin = env_admin();
    let down = "ALTER DATABASE phi_t_down ALLOW_CONNECTIONS false;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'phi_t_down' AND pid <> pg_backend_pid()";
    let a = admin.clone();
    tokio::task::spawn_blocking(move || sql(&a, down))
        .await
        .unwrap()
        .unwrap();
    let e = env.open(&sealed, &c).await.unwrap_err();
    assert!(matches!(e, Error::Audit(_)), "{e:?}");
    let a = admin.clone();
    tokio::task::spawn_blocking(move || {
        sql(&a, "ALTER DATABASE phi_t_down ALLOW_CONNECTIONS true")
    })
    .await
    .unwrap()
    .unwrap();
    env.open(&sealed, &c).await.unwrap();
    let v = verifier.clone();
    let report = tokio::task::spawn_blocking(move || verify(&v))
        .await
        .unwrap()
        .unwrap();
    assert!(report.lost_events() >= 1, "{report:?}");
    assert_eq!(report.gaps[0].reason, "write-failed");
    drop(su);
}

fn env_admin() -> String {
    env("PHI_PG_URL")
}

/// A trail keyed with one key is refused to a writer with another, and a
/// writer without a key is refused unless it asks for a bare checksum.
#[test]
fn keys_are_checked_and_unkeyed_must_be_asked_for() {
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let (_su, writer, verifier) = setup("phi_t_keys");
    let e = PgAuditLog::builder().open(&writer).unwrap_err();
    assert!(matches!(e, PgError::Invalid(_)), "{e:?}");
    let log = open(&writer);
    log.record(&ev("a")).unwrap();
    drop(log);
    let e = PgAuditLog::builder()
        .audit_key(other_key())
        .open(&writer)
        .unwrap_err();
    assert!(e.to_string().contains("chained with hmac-sha256"), "{e}");
    let e = PgAuditLog::builder()
        .unkeyed(true)
        .open(&writer)
        .unwrap_err();
    assert!(e.to_string().contains("chained with"), "{e}");
    // The verifier needs the key, and the right one.
    let e = postgres::verify(&Verifier::new(), &verifier).unwrap_err();
    assert!(
        matches!(e, PgError::Verify(VerifyError::KeyRequired { .. })),
        "{e:?}"
    );
    let e = postgres::verify(&Verifier::new().key(other_key()), &verifier).unwrap_err();
    assert!(matches!(bad(e).1, Problem::WrongKey { .. }));
    // An unreachable server is an error at open, never a silent sink.
    let e = PgAuditLog::builder()
        .audit_key(key())
        .timeout(Duration::from_secs(5))
        .open("postgresql://nobody@127.0.0.1:1/none")
        .unwrap_err();
    assert!(matches!(e, PgError::Database(_)), "{e:?}");
    // sslmode=require (libpq's: encrypted but the server unchecked) is
    // refused before connecting, never sent in clear (TLS itself:
    // tests/audit_postgres_tls.rs).
    let e = PgAuditLog::builder()
        .audit_key(key())
        .open(&format!("{writer}?sslmode=require"))
        .unwrap_err();
    assert!(matches!(e, PgError::Invalid(_)), "{e:?}");
}

/// Appends/s and p99 latency of `record` for 1, 8 and 64 writers, each
/// with its own connection (as separate processes or machines would be),
/// and for 64 threads of one process sharing one log (its group commit),
/// printed for docs/PERFORMANCE.md; the chain verifies after each run.
#[test]
fn throughput_for_1_8_and_64_writers() {
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    for (writers, each, shared) in [
        (1usize, 2000usize, false),
        (8, 500, false),
        (64, 100, false),
        (64, 100, true),
    ] {
        let db = format!("phi_t_perf{writers}{}", if shared { "s" } else { "" });
        let (_su, writer, verifier) = setup(&db);
        let logs: Vec<Arc<PgAuditLog>> = if shared {
            vec![Arc::new(open(&writer))]
        } else {
            (0..writers).map(|_| Arc::new(open(&writer))).collect()
        };
        let start = Instant::now();
        let hs: Vec<_> = (0..writers)
            .map(|k| {
                let log = logs[k % logs.len()].clone();
                std::thread::spawn(move || {
                    (0..each)
                        .map(|i| {
                            let t = Instant::now();
                            log.record(&ev(&format!("w{k}-{i}"))).unwrap();
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut lat: Vec<Duration> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let elapsed = start.elapsed();
        lat.sort();
        let n = lat.len();
        let p50 = lat[n / 2];
        let p99 = lat[(n * 99 / 100).min(n - 1)];
        let commits: u64 = logs.iter().map(|l| l.stats().commits).sum();
        println!(
            "pg-audit writers={writers} connections={} appends={n} appends/s={:.0} p50={:.2}ms p99={:.2}ms entries/commit={:.1}",
            logs.len(),
            n as f64 / elapsed.as_secs_f64(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            n as f64 / commits as f64
        );
        drop(logs);
        assert_eq!(verify(&verifier).unwrap().entries as usize, n);
    }
}

/// A checkpoint of the table, made and checked by the verifier role with
/// the public key only, finds a history rewritten by a superuser who also
/// holds the audit key (the HMAC chain then verifies), and refuses a
/// checkpoint signed under another key.
#[test]
fn checkpoints_find_a_rewritten_table() {
    use phi_envelope::audit::checkpoint::{CheckpointError, CheckpointKey};
    let _s = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let (su, writer, verifier) = setup("phi_t_checkpoint");
    let log = open(&writer);
    for a in ["alice", "bob", "carol"] {
        log.record(&ev(a)).unwrap();
    }
    drop(log);
    let (signer, _) = CheckpointKey::generate().unwrap();
    let pk = signer.public_key();
    let cp = postgres::checkpoint(&verifier, &signer).unwrap();
    assert_eq!(cp.seq, 3);
    postgres::verify_checkpoints(&verifier, std::slice::from_ref(&cp), &pk).unwrap();
    let (other, _) = CheckpointKey::generate().unwrap();
    let foreign = postgres::checkpoint(&verifier, &other).unwrap();
    let e = postgres::verify_checkpoints(&verifier, &[foreign], &pk).unwrap_err();
    assert!(matches!(e, CheckpointError::WrongSigner { .. }), "{e:?}");

    // Everything deleted and written anew, without bob, with the key.
    sql(
        &su,
        "SET session_replication_role = replica; DELETE FROM phi_audit.entries",
    )
    .unwrap();
    let log = open(&writer);
    for a in ["alice", "mallory", "carol"] {
        log.record(&ev(a)).unwrap();
    }
    drop(log);
    verify(&verifier).unwrap();
    let e = postgres::verify_checkpoints(&verifier, &[cp], &pk).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Mismatch { seq: 3, .. }),
        "{e:?}"
    );
}

/// Roles are the cluster's: one made beforehand under the owner's name
/// (able to log in, say) must not become the owner of the trail as it is,
/// and an owner role with members is refused (they could rewrite it).
#[test]
fn init_db_takes_no_pre_existing_owner_role_as_it_is() {
    let (su, _writer, _verifier) = setup("phi_audit_roles");
    let _ddl = DDL.lock().unwrap_or_else(|p| p.into_inner());
    sql(
        &su,
        "ALTER ROLE phi_audit_owner LOGIN PASSWORD 'taken-over'",
    )
    .unwrap();
    postgres::init_db(&su).unwrap();
    let can_login = rows(
        &su,
        "SELECT 0::bigint, rolcanlogin::text FROM pg_roles WHERE rolname = 'phi_audit_owner'",
    );
    assert_eq!(can_login, [(0, "false".to_owned())]);
    sql(
        &su,
        "DO $$ BEGIN CREATE ROLE phi_test_intruder LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT phi_audit_owner TO phi_test_intruder;",
    )
    .unwrap();
    let refused = postgres::init_db(&su);
    sql(&su, "REVOKE phi_audit_owner FROM phi_test_intruder").unwrap();
    let e = refused.expect_err("an owner role with members was accepted");
    assert!(e.to_string().contains("has members"), "{e}");
    postgres::init_db(&su).unwrap();
}

/// A rule (or trigger) that swallows inserts must not let a commit confirm
/// key uses that are not in the table: init-db refuses such a table, and a
/// writer that stores fewer lines than it sent refuses the event.
#[test]
fn entries_that_the_table_did_not_store_are_never_confirmed() {
    let (su, writer, _verifier) = setup("phi_audit_swallow");
    let log = open(&writer);
    log.record(&ev("before")).unwrap();
    sql(
        &su,
        "CREATE RULE swallow AS ON INSERT TO phi_audit.entries DO INSTEAD NOTHING",
    )
    .unwrap();
    let e = log
        .record(&ev("swallowed"))
        .expect_err("an entry the table did not store was confirmed");
    assert!(e.0.contains("stored 0 of"), "{}", e.0);
    drop(log);
    let refused = {
        let _ddl = DDL.lock().unwrap_or_else(|p| p.into_inner());
        postgres::init_db(&su)
    };
    let e = refused.expect_err("init-db accepted a table with a rule");
    assert!(e.to_string().contains("has rules"), "{e}");
    sql(&su, "DROP RULE swallow ON phi_audit.entries").unwrap();
}

/// An event too large for a row is refused alone: the other events queued
/// with it are recorded (before, the row's CHECK failed the whole group).
#[test]
fn an_oversized_event_is_refused_alone() {
    let (_su, writer, verifier) = setup("phi_audit_oversized");
    let log = open(&writer);
    let big = log.submit(&ev(&"x".repeat(70_000)));
    let small: Vec<_> = (0..20)
        .map(|i| log.submit(&ev(&format!("small-{i}"))))
        .collect();
    let e = big.wait().expect_err("an oversized event was accepted");
    assert!(e.0.contains("too large"), "{}", e.0);
    for r in small {
        r.wait().unwrap();
    }
    drop(log);
    assert_eq!(verify(&verifier).unwrap().entries, 20);
}
