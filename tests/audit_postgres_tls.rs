//! The PostgreSQL audit trail over TLS (rustls on ring), against the real
//! PostgreSQL server that `scripts/test.sh` starts (scripts/postgres.sh):
//! `ssl=on` with a throwaway CA (`PHI_PG_TLS_CA`) whose server certificate
//! names `localhost` only (`PHI_PG_TLS_NAME`), another CA that signed
//! nothing (`PHI_PG_TLS_OTHER_CA`), and the role `phi_test_tls_only` whose
//! members may log in over TCP with TLS only. Without those variables every
//! test fails: none is skipped.
//!
//! The login roles here (`phi_tls_writer`, `phi_tls_verifier`) are members
//! of `phi_test_tls_only`: every append and verification that succeeds
//! below was made over TLS, or the server would have refused the login.
#![cfg(feature = "postgres")]

mod cli_support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phi_envelope::audit::postgres::{self, PgAuditLog, PgError};
use phi_envelope::audit::{AuditKey, Verifier};
use phi_envelope::events::{Event, EventSink, Operation, Outcome};

/// Role and database creation, one at a time.
static DDL: Mutex<()> = Mutex::new(());

/// In every URL: it must never come back in an error.
const PASSWORD: &str = "hunter2-not-in-errors";

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

/// A path as a URL parameter value (the paths here are mktemp's).
fn path_param(name: &str) -> String {
    let p = env(name);
    assert!(
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b)),
        "{p}"
    );
    p
}

/// `user` to `db` at `host` (the TCP address is always 127.0.0.1, so that
/// only the name checked against the certificate changes), with `params`.
fn tls_url(user: &str, host: &str, db: &str, params: &str) -> String {
    format!(
        "postgresql://{user}:{PASSWORD}@{host}:{}/{db}?hostaddr=127.0.0.1&{params}",
        env("PHI_PG_PORT")
    )
}

fn verify_full(user: &str, db: &str) -> String {
    tls_url(
        user,
        &env("PHI_PG_TLS_NAME"),
        db,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            path_param("PHI_PG_TLS_CA")
        ),
    )
}

/// Runs SQL as the superuser, in plaintext over loopback (as the other
/// PostgreSQL tests do): the first column of the rows returned, as
/// numbers; `Err` is the error's text.
fn sql(db: &str, stmts: &str) -> Result<Vec<i64>, String> {
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{db}",
        env("PHI_PG_PORT")
    );
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
            let msgs = client
                .simple_query(&stmts)
                .await
                .map_err(|e| e.to_string())?;
            Ok(msgs
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        r.get(0).and_then(|v| v.parse().ok())
                    }
                    _ => None,
                })
                .collect())
        })
    })
    .join()
    .unwrap()
}

fn rows_in(db: &str) -> i64 {
    sql(db, "SELECT count(*) FROM phi_audit.entries").unwrap()[0]
}

/// A fresh database `db` with the migration (run over TLS as the
/// superuser) and the TLS-only login roles; returns (writer, verifier)
/// verify-full URLs.
fn setup(db: &str) -> (String, String) {
    let _ddl = DDL.lock().unwrap_or_else(|p| p.into_inner());
    sql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .unwrap();
    sql("postgres", &format!("CREATE DATABASE {db}")).unwrap();
    postgres::init_db(&verify_full("postgres", db)).unwrap();
    sql(
        "postgres",
        "DO $$ BEGIN
           BEGIN CREATE ROLE phi_test_tls_only NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
           BEGIN CREATE ROLE phi_tls_writer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
           BEGIN CREATE ROLE phi_tls_verifier LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
           GRANT phi_test_tls_only TO phi_tls_writer, phi_tls_verifier;
           GRANT phi_audit_writer TO phi_tls_writer;
           GRANT phi_audit_verifier TO phi_tls_verifier;
         END $$",
    )
    .unwrap();
    (
        verify_full("phi_tls_writer", db),
        verify_full("phi_tls_verifier", db),
    )
}

fn ev(actor: &str) -> Event {
    Event::new(Operation::Unwrap, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller(actor, "treatment")
}

fn open(url: &str) -> Result<PgAuditLog, PgError> {
    PgAuditLog::builder()
        .audit_key(key())
        .timeout(Duration::from_secs(20))
        .open(url)
}

fn message(e: PgError) -> String {
    let m = e.to_string();
    assert!(!m.contains(PASSWORD), "the password leaked: {m}");
    m
}

#[test]
fn appends_and_verifies_over_verify_full() {
    let db = "phi_tls_ok";
    let (writer, verifier) = setup(db);
    let log = open(&writer).unwrap();
    for i in 0..20 {
        log.record(&ev(&format!("tls-{i}"))).unwrap();
    }
    assert_eq!(log.stats().entries, 20);
    drop(log);
    let report = postgres::verify(&Verifier::new().key(key()), &verifier).unwrap();
    assert_eq!(report.entries, 20);
    assert_eq!(rows_in(db), 21); // the genesis header and the events
    assert_eq!(postgres::report(&verifier).unwrap().events, 20);

    // The same in key=value form, and verify-ca, which checks the chain
    // but not the name: 127.0.0.1 is not in the certificate.
    let pairs = format!(
        "host=127.0.0.1 port={} user=phi_tls_writer dbname={db} \
         sslmode=verify-ca sslrootcert='{}'",
        env("PHI_PG_PORT"),
        path_param("PHI_PG_TLS_CA")
    );
    let log = open(&pairs).unwrap();
    log.record(&ev("verify-ca")).unwrap();
    drop(log);
    assert_eq!(rows_in(db), 22);

    // The server's rule bites: the same role in plaintext is turned away,
    // so the logins above were TLS.
    let plain = tls_url("phi_tls_writer", "localhost", db, "sslmode=disable");
    let m = message(open(&plain).unwrap_err());
    assert!(m.contains("no encryption"), "{m}");
    assert_eq!(rows_in(db), 22);
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_nothing_is_written() {
    let db = "phi_tls_wrong_ca";
    let (writer, _verifier) = setup(db);
    let other = tls_url(
        "phi_tls_writer",
        &env("PHI_PG_TLS_NAME"),
        db,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            path_param("PHI_PG_TLS_OTHER_CA")
        ),
    );
    let m = message(open(&other).unwrap_err());
    assert!(m.contains("unknown CA"), "{m}");
    assert!(m.contains("localhost"), "{m}");
    assert!(m.contains(&path_param("PHI_PG_TLS_OTHER_CA")), "{m}");
    assert_eq!(rows_in(db), 0);
    // verify-ca checks the chain too.
    let m = message(
        open(&format!(
            "{}&channel_binding=require",
            other.replace("verify-full", "verify-ca")
        ))
        .unwrap_err(),
    );
    assert!(m.contains("unknown CA"), "{m}");
    // Without channel binding, verify-ca with a password is refused before
    // connecting: a server it does not name could ask for the password.
    let m = message(open(&other.replace("verify-full", "verify-ca")).unwrap_err());
    assert!(m.contains("needs channel_binding=require"), "{m}");
    assert!(!m.contains(PASSWORD), "{m}");
    // So do the verifier and the migration.
    let m = message(postgres::verify(&Verifier::new().key(key()), &other).unwrap_err());
    assert!(m.contains("unknown CA"), "{m}");
    let m = message(postgres::init_db(&other.replace("phi_tls_writer", "postgres")).unwrap_err());
    assert!(m.contains("unknown CA"), "{m}");
    // The right CA then writes (the database was reachable all along).
    open(&writer).unwrap().record(&ev("after")).unwrap();
    assert_eq!(rows_in(db), 2);
}

#[test]
fn a_name_not_in_the_certificate_is_refused_under_verify_full() {
    let db = "phi_tls_name";
    let (_writer, verifier) = setup(db);
    // The certificate names localhost only; the address is the same.
    let by_ip = tls_url(
        "phi_tls_writer",
        "127.0.0.1",
        db,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            path_param("PHI_PG_TLS_CA")
        ),
    );
    let m = message(open(&by_ip).unwrap_err());
    assert!(m.contains("name mismatch"), "{m}");
    assert!(m.contains("not valid for the name 127.0.0.1"), "{m}");
    assert_eq!(rows_in(db), 0);
    // With no sslmode but an sslrootcert, verify-full is meant.
    let implied = by_ip.replace("sslmode=verify-full&", "");
    let m = message(open(&implied).unwrap_err());
    assert!(m.contains("name mismatch"), "{m}");
    let m = message(
        postgres::verify(
            &Verifier::new().key(key()),
            &verifier.replace("@localhost:", "@127.0.0.1:"),
        )
        .unwrap_err(),
    );
    assert!(m.contains("name mismatch"), "{m}");
}

/// A server that reads the client's first message and, if it is an
/// SSLRequest, answers `N` as PostgreSQL with `ssl = off` does; then
/// records every byte the client sends until it closes. Returns the port
/// and, per connection, (was an SSLRequest, bytes after it or the
/// startup message read).
#[allow(clippy::type_complexity)]
fn declining_server() -> (
    u16,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Vec<(bool, Vec<u8>)>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stopped.load(Ordering::SeqCst) {
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            s.set_nonblocking(false).unwrap();
            let mut first = [0u8; 8];
            s.read_exact(&mut first).unwrap();
            // Length 8, code 80877103: the SSLRequest.
            let ssl_request = first == [0, 0, 0, 8, 4, 210, 22, 47];
            let mut rest = Vec::new();
            if ssl_request {
                s.write_all(b"N").unwrap();
                // Until the client closes: whatever it sends now is in clear.
                s.read_to_end(&mut rest).unwrap();
            } else {
                // A startup message: its length, then the rest of it.
                let len = u32::from_be_bytes(first[..4].try_into().unwrap()) as usize;
                rest.extend_from_slice(&first[4..]);
                let mut more = vec![0u8; len.saturating_sub(8)];
                s.read_exact(&mut more).unwrap();
                rest.extend_from_slice(&more);
            }
            seen.push((ssl_request, rest));
        }
        seen
    });
    (port, stop, h)
}

#[test]
fn no_plaintext_when_tls_is_required_and_the_server_declines_it() {
    let (port, stop, server) = declining_server();
    let url = |params: &str| {
        format!(
            "postgresql://phi_tls_writer:{PASSWORD}@localhost:{port}/phi_tls_n?hostaddr=127.0.0.1&{params}"
        )
    };
    let tls = url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        path_param("PHI_PG_TLS_CA")
    ));
    let m = message(open(&tls).unwrap_err());
    assert!(m.contains("the server refused TLS"), "{m}");
    assert!(m.contains("nothing was sent in clear"), "{m}");
    assert!(m.contains(&format!("localhost:{port}")), "{m}");
    let m = message(postgres::verify(&Verifier::new().key(key()), &tls).unwrap_err());
    assert!(m.contains("the server refused TLS"), "{m}");
    // The control: in plaintext the same server does see the startup
    // message, user name included.
    let m = message(open(&url("sslmode=disable")).unwrap_err());
    assert!(!m.contains("TLS"), "{m}");
    assert!(
        m.contains(&format!(
            "cannot connect to phi_tls_writer@localhost:{port}"
        )),
        "{m}"
    );
    stop.store(true, Ordering::SeqCst);
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (ssl_request, after) in &seen[..2] {
        assert!(ssl_request);
        assert!(
            after.is_empty(),
            "sent in clear after the refusal: {after:?}"
        );
    }
    let (ssl_request, startup) = &seen[2];
    assert!(!ssl_request);
    assert!(
        startup
            .windows(b"phi_tls_writer".len())
            .any(|w| w == b"phi_tls_writer"),
        "{startup:?}"
    );
}

#[test]
fn plaintext_to_a_remote_host_is_refused_before_connecting() {
    // TEST-NET-1 (RFC 5737): nothing answers there; every refusal below
    // comes from the connection string alone.
    let remote = format!("postgresql://w:{PASSWORD}@192.0.2.10:5432/audit");
    for (url, says) in [
        (remote.clone(), "sslmode=verify-full needs the roots"),
        (
            format!("{remote}?sslmode=require"),
            "sslmode=require is refused",
        ),
        (
            format!("{remote}?sslmode=prefer"),
            "sslmode=prefer is refused",
        ),
        (
            format!("{remote}?sslmode=verify-full"),
            "sslmode=verify-full needs the roots",
        ),
        (
            format!("{remote}?sslmode=disable&sslrootcert=/ca.pem"),
            "sslmode=disable with",
        ),
        (
            format!("{remote}?sslrootcert=/nonexistent/ca.pem"),
            "sslrootcert /nonexistent/ca.pem: cannot open it",
        ),
    ] {
        let m = message(open(&url).unwrap_err());
        assert!(m.contains(says), "{url}: {m}");
        let m = message(postgres::verify(&Verifier::new().key(key()), &url).unwrap_err());
        assert!(m.contains(says), "{url}: {m}");
    }
    // Refused by policy, before any connection: an invalid setting, not a
    // database error, and describe_url (the CLI's) says so too.
    let e = open(&remote).unwrap_err();
    assert!(matches!(e, PgError::Invalid(_)), "{e:?}");
    assert!(postgres::describe_url(&format!("{remote}?sslmode=require")).is_err());
    // A TLS setting on a Unix socket is refused too.
    let m = message(
        open(&format!(
            "host={} port={} user=phi_tls_writer sslmode=verify-full sslrootcert=/ca.pem",
            env("PHI_PG_SOCKET_DIR"),
            env("PHI_PG_PORT")
        ))
        .unwrap_err(),
    );
    assert!(m.contains("TLS over TCP only"), "{m}");
    // Explicit plaintext to a remote host is allowed: it is attempted
    // (and fails here as a connection error, not as a refused setting).
    let e = PgAuditLog::builder()
        .audit_key(key())
        .timeout(Duration::from_secs(2))
        .open(&format!("{remote}?sslmode=disable"))
        .unwrap_err();
    assert!(matches!(e, PgError::Database(_)), "{e:?}");
}

#[test]
fn a_client_certificate_is_presented_with_sslcert_and_sslkey() {
    let db = "phi_tls_cert";
    let _ = setup(db);
    sql(
        "postgres",
        "DO $$ BEGIN
           BEGIN CREATE ROLE phi_tls_cert_user LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
           GRANT phi_test_tls_only TO phi_tls_cert_user;
           GRANT phi_audit_writer TO phi_tls_cert_user;
         END $$",
    )
    .unwrap();
    // pg_hba.conf: this role logs in with a certificate whose CN is its
    // name, over TLS only.
    let bare = verify_full("phi_tls_cert_user", db);
    let m = message(open(&bare).unwrap_err());
    assert!(m.contains("certificate"), "{m}");
    let with_cert = format!(
        "{bare}&sslcert={}&sslkey={}",
        path_param("PHI_PG_TLS_CLIENT_CERT"),
        path_param("PHI_PG_TLS_CLIENT_KEY")
    );
    let log = open(&with_cert).unwrap();
    log.record(&ev("cert")).unwrap();
    drop(log);
    assert_eq!(rows_in(db), 2);
    // A key file that others can read is refused, as libpq refuses it.
    let dir = tempfile::tempdir().unwrap();
    let open_key = dir.path().join("open.key");
    std::fs::copy(env("PHI_PG_TLS_CLIENT_KEY"), &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let m = message(
        open(&format!(
            "{bare}&sslcert={}&sslkey={}",
            path_param("PHI_PG_TLS_CLIENT_CERT"),
            open_key.display()
        ))
        .unwrap_err(),
    );
    assert!(m.contains("can be read by group or others"), "{m}");
    // A key file that is not a key: refused at open, the file named, its
    // content not quoted.
    let not_key = dir.path().join("not.key");
    std::fs::copy(env("PHI_PG_TLS_CLIENT_CERT"), &not_key).unwrap();
    std::fs::set_permissions(&not_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bad_key = format!(
        "{bare}&sslcert={}&sslkey={}",
        path_param("PHI_PG_TLS_CLIENT_CERT"),
        not_key.display()
    );
    let m = message(open(&bad_key).unwrap_err());
    assert!(
        m.contains(&format!(
            "cannot read a PEM private key from sslkey {}",
            not_key.display()
        )),
        "{m}"
    );
    assert_eq!(rows_in(db), 2);
}

/// The CLI takes a TLS connection string in `--audit-db` as it is: the
/// settings are the library's.
#[test]
fn the_cli_takes_a_tls_url_in_audit_db() {
    use cli_support::{stdout, Env};
    let db = "phi_tls_cli";
    let (writer, verifier) = setup(db);
    let e = Env::new();
    let out = stdout(&e.ok(&["audit", "init-db", &verify_full("postgres", db)]));
    assert!(out.contains("schema phi_audit ready"), "{out}");
    std::fs::write(e.path("audit.key"), "ab".repeat(32)).unwrap();
    e.ok(&[
        "--audit-db",
        &writer,
        "--audit-key-file",
        "audit.key",
        "keys",
        "init",
    ]);
    std::fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&[
        "--audit-db",
        &writer,
        "--audit-key-file",
        "audit.key",
        "encrypt",
        "-o",
        "f.phi",
        "f",
    ]);
    let rows = rows_in(db);
    assert!(rows >= 3, "{rows}");
    let out = stdout(&e.ok(&[
        "--audit-db",
        &verifier,
        "--audit-key-file",
        "audit.key",
        "audit",
        "verify",
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["ok"], true, "{out}");
    assert!(!out.contains(PASSWORD), "{out}");
    // A certificate from another CA: no key is used, nothing is written.
    let other = writer.replace(
        &path_param("PHI_PG_TLS_CA"),
        &path_param("PHI_PG_TLS_OTHER_CA"),
    );
    let err = e.fails(
        &[
            "--audit-db",
            &other,
            "--audit-key-file",
            "audit.key",
            "encrypt",
            "-o",
            "g.phi",
            "f",
        ],
        6,
    );
    assert!(!e.path("g.phi").exists());
    assert!(err.contains("unknown CA"), "{err}");
    assert!(err.contains("no key was used"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
    assert_eq!(rows_in(db), rows);
    // sslmode=require is a usage error for the verifier.
    let weak = verifier.replace("sslmode=verify-full", "sslmode=require");
    let err = e.fails(
        &[
            "--audit-db",
            &weak,
            "--audit-key-file",
            "audit.key",
            "audit",
            "verify",
        ],
        1,
    );
    assert!(err.contains("sslmode=require is refused"), "{err}");
}

/// SCRAM-SHA-256 with a password over TLS, channel binding required: the
/// server checks the `tls-server-end-point` hash the client sends against
/// its own certificate's.
#[test]
fn scram_with_channel_binding_over_tls() {
    let db = "phi_tls_scram";
    let _ = setup(db);
    sql(
        "postgres",
        &format!(
            "DO $$ BEGIN
               BEGIN CREATE ROLE phi_tls_scram_user LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
               SET LOCAL password_encryption = 'scram-sha-256';
               ALTER ROLE phi_tls_scram_user PASSWORD '{PASSWORD}';
               GRANT phi_test_tls_only TO phi_tls_scram_user;
               GRANT phi_audit_writer TO phi_tls_scram_user;
             END $$"
        ),
    )
    .unwrap();
    let url = format!(
        "{}&channel_binding=require",
        verify_full("phi_tls_scram_user", db)
    );
    let log = open(&url).unwrap();
    log.record(&ev("scram")).unwrap();
    drop(log);
    assert_eq!(rows_in(db), 2);
    // The wrong password is refused, and not quoted.
    let wrong = url.replace(PASSWORD, "not-the-password");
    let m = message(open(&wrong).unwrap_err());
    assert!(m.contains("password authentication failed"), "{m}");
    assert!(!m.contains("not-the-password"), "{m}");
}
