//! The audit trail in PostgreSQL (feature `postgres`): one hash chain that
//! many processes on many machines append to, with the line format, the
//! chain and the fail-closed semantics of the file log.
//!
//! [`PgAuditLog`] is an [`EventSink`]: give it to
//! [`KeyringBuilder::event_sink`](crate::keyring::KeyringBuilder::event_sink).
//! Its writer thread takes every event queued meanwhile as one group and
//! appends it in one transaction; each receipt is answered once that
//! transaction is **committed** (with `synchronous_commit = on`, so on the
//! server's stable storage), or with an error, and the keyring refuses the
//! key use whose event was not committed.
//!
//! # The chain across writers
//!
//! One chain, serialised in the database: every writer's transaction calls
//! `phi_audit.lock_head()`, which takes a transaction-scoped advisory lock
//! (`pg_advisory_xact_lock(8099839573455365225)`, the bytes `phi-audi`)
//! and returns the last row; the writer checks that row's hash under its
//! audit key, chains its lines to it and inserts them; the commit releases
//! the lock. Commits are therefore in `seq` order, every snapshot sees a
//! prefix of the chain, and a writer killed mid-transaction (`SIGKILL`, a
//! lost connection, a database restart) leaves nothing: its transaction is
//! rolled back and its lock released by the server. An event whose commit
//! could not be confirmed is refused (the key use fails); if the commit did
//! in fact happen, the entry is in the chain like any other.
//!
//! Every row's `line` is a line of the file format (module
//! [`audit`](crate::audit#line-format)) without its newline: `seq` 0 is the
//! genesis header (segment 1, `prev_file` null), written by the first
//! writer; every other row is an `event` or a `gap` line. The schema, the
//! roles and the verification are specified in `docs/AUDIT-DB.md`.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use phi_envelope::audit::{postgres::{self, PgAuditLog}, AuditKey, Verifier};
//!
//! let admin = "postgresql://postgres@127.0.0.1/audit";
//! postgres::init_db(admin)?; // once, as a DBA
//! let key = AuditKey::new(&[7u8; 32])?; // in production: sealed in a keystore
//! let log = Arc::new(
//!     PgAuditLog::builder()
//!         .audit_key(key.clone())
//!         .open("postgresql://app_writer@127.0.0.1/audit")?,
//! );
//! // Keyring::builder().event_sink(log.clone()) ...
//! let report = postgres::verify(&Verifier::new().key(key), "postgresql://auditor@127.0.0.1/audit")?;
//! println!("{} entries", report.entries);
//! # Ok(()) }
//! ```
//!
//! # TLS
//!
//! Over TCP to anything but loopback the connection is TLS (rustls on
//! `ring`), with libpq's words in the connection string:
//! `sslmode=verify-full` (the default off the machine: the certificate's
//! chain and the host name checked) or `verify-ca` (the chain only), and
//! `sslrootcert=PATH` (PEM) or `sslrootcert=system` for the roots to trust;
//! `sslcert` and `sslkey` for a client certificate; SCRAM binds to the TLS
//! channel (`tls-server-end-point`). Plaintext is used for
//! a Unix socket or loopback without TLS settings, or where the string says
//! `sslmode=disable`; `prefer`, `allow` and `require` (which in libpq does
//! not check the server) are refused as [`PgError::Invalid`] before any
//! connection, and a server that declines TLS ends the connection before
//! anything is sent. The rules and the messages are in docs/AUDIT-DB.md,
//! "TLS".
//!
//! ```text
//! postgresql://app_writer@audit-db.internal/audit?sslmode=verify-full&sslrootcert=/etc/phi/audit-db-ca.pem
//! ```
//!
//! Why one file of this size: the schema, its migration, the writer with its
//! reconnects and the verifier of the table change together whenever the
//! table changes; its SQL is a third of it.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, NoTls};

use super::pg_tls::{self, Connector};

use super::line::{self, Body, Header, Mac, Problem};
use super::queue::Queue;
use super::verify::{BadLine, GapRecord, Verifier, VerifyError, VerifyReport};
use super::{Anchor, AuditKey};
use crate::events::{Event, EventSink, Receipt, SinkError};

/// The schema every object lives in.
pub const SCHEMA: &str = "phi_audit";

/// The advisory lock every writer takes (through `phi_audit.lock_head()`)
/// for the rest of its transaction: the bytes `phi-audi` as a big-endian
/// `bigint`.
pub const LOCK_KEY: i64 = 8_099_839_573_455_365_225;

/// The name a verification report gives the table (in [`BadLine::file`]).
pub const TABLE: &str = "phi_audit.entries";

/// The most entries one group takes.
const MAX_GROUP: usize = 1024;

/// The migration: roles, schema, table, functions and grants. Idempotent;
/// run by [`init_db`] as one transaction (docs/AUDIT-DB.md explains each
/// statement).
pub const MIGRATION: &str = r#"
DO $roles$
BEGIN
  BEGIN CREATE ROLE phi_audit_owner NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
  BEGIN CREATE ROLE phi_audit_writer NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
  BEGIN CREATE ROLE phi_audit_verifier NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
END
$roles$;
CREATE SCHEMA IF NOT EXISTS phi_audit AUTHORIZATION phi_audit_owner;
REVOKE ALL ON SCHEMA phi_audit FROM PUBLIC;
CREATE TABLE IF NOT EXISTS phi_audit.entries (
  seq bigint PRIMARY KEY CHECK (seq >= 0),
  line text NOT NULL CHECK (octet_length(line) <= 65536)
);
ALTER TABLE phi_audit.entries OWNER TO phi_audit_owner;
REVOKE ALL ON phi_audit.entries FROM PUBLIC;
CREATE OR REPLACE FUNCTION phi_audit.refuse_change() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  RAISE EXCEPTION 'phi_audit.entries is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$f$;
ALTER FUNCTION phi_audit.refuse_change() OWNER TO phi_audit_owner;
DROP TRIGGER IF EXISTS entries_append_only ON phi_audit.entries;
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON phi_audit.entries
  FOR EACH ROW EXECUTE FUNCTION phi_audit.refuse_change();
DROP TRIGGER IF EXISTS entries_no_truncate ON phi_audit.entries;
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON phi_audit.entries
  FOR EACH STATEMENT EXECUTE FUNCTION phi_audit.refuse_change();
CREATE OR REPLACE FUNCTION phi_audit.lock_head() RETURNS TABLE (seq bigint, line text)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock(8099839573455365225);
  RETURN QUERY SELECT e.seq, e.line FROM phi_audit.entries e ORDER BY e.seq DESC LIMIT 1;
END
$f$;
CREATE OR REPLACE FUNCTION phi_audit.genesis() RETURNS text
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
  SELECT e.line FROM phi_audit.entries e WHERE e.seq = 0
$f$;
ALTER FUNCTION phi_audit.lock_head() OWNER TO phi_audit_owner;
ALTER FUNCTION phi_audit.genesis() OWNER TO phi_audit_owner;
REVOKE ALL ON FUNCTION phi_audit.lock_head() FROM PUBLIC;
REVOKE ALL ON FUNCTION phi_audit.genesis() FROM PUBLIC;
REVOKE ALL ON FUNCTION phi_audit.refuse_change() FROM PUBLIC;
GRANT USAGE ON SCHEMA phi_audit TO phi_audit_writer, phi_audit_verifier;
GRANT INSERT ON phi_audit.entries TO phi_audit_writer;
GRANT EXECUTE ON FUNCTION phi_audit.lock_head() TO phi_audit_writer;
GRANT EXECUTE ON FUNCTION phi_audit.genesis() TO phi_audit_writer;
GRANT SELECT ON phi_audit.entries TO phi_audit_verifier;
ALTER SCHEMA phi_audit OWNER TO phi_audit_owner;
ALTER ROLE phi_audit_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD NULL;
ALTER ROLE phi_audit_writer NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE phi_audit_verifier NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
DO $check$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
             JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
             JOIN pg_catalog.pg_roles u ON u.oid = m.member
             WHERE r.rolname = 'phi_audit_owner' AND u.rolname <> current_user) THEN
    RAISE EXCEPTION 'role phi_audit_owner has members: whoever is one can rewrite the trail; revoke them and run init-db again';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite w WHERE w.ev_class = 'phi_audit.entries'::regclass) THEN
    RAISE EXCEPTION 'phi_audit.entries has rules: they can swallow or redirect entries; drop them and run init-db again';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid = 'phi_audit.entries'::regclass AND NOT t.tgisinternal
               AND t.tgname NOT IN ('entries_append_only', 'entries_no_truncate')) THEN
    RAISE EXCEPTION 'phi_audit.entries has triggers that init-db did not create; drop them and run init-db again';
  END IF;
  IF (SELECT c.relrowsecurity FROM pg_catalog.pg_class c WHERE c.oid = 'phi_audit.entries'::regclass) THEN
    RAISE EXCEPTION 'phi_audit.entries has row-level security enabled; disable it and run init-db again';
  END IF;
END
$check$;
"#;

/// What went wrong talking to the database, or with what it holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The database could not be reached, or refused a statement.
    #[error("PostgreSQL audit trail: {0}")]
    Database(String),
    /// The trail does not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A setting is wrong (a malformed URL, no audit key, an unsupported
    /// option).
    #[error("PostgreSQL audit trail: {0}")]
    Invalid(String),
}

/// A database error's text, without the connection string (which may hold
/// a password): the server's message, or tokio-postgres's with its causes
/// (an I/O error, an authentication failure).
fn db_err(what: &str, e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{what}: {} ({})", d.message(), d.code().code()),
        None => {
            let mut text = format!("{what}: {e}");
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// Reads a connection string and its TLS settings (module
/// [`pg_tls`]), reading no file.
fn parse_url(url: &str) -> Result<pg_tls::Parsed, PgError> {
    pg_tls::parse(url)
}

/// What to connect with: the configuration and, for TLS, the connector
/// (the CA file and any client certificate read now).
fn connector(url: &str) -> Result<Connector, PgError> {
    parse_url(url)?.connector()
}

/// Runs `f` on a thread of its own with a current-thread runtime (so that
/// it works from async code too) and returns its result.
fn on_own_runtime<T: Send + 'static>(
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<T, PgError> + Send + 'static,
) -> Result<T, PgError> {
    let h = std::thread::Builder::new()
        .name("phi-envelope-pg".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| PgError::Database(format!("cannot start a runtime: {e}")))?;
            f(&rt)
        })
        .map_err(|e| PgError::Database(format!("cannot start a thread: {e}")))?;
    h.join()
        .unwrap_or_else(|_| Err(PgError::Database("the database thread panicked".into())))
}

/// Connects (over TLS where the connection string says so: never in
/// clear instead), spawning the connection's task on the runtime.
async fn connect(c: &Connector, timeout: Duration) -> Result<Client, String> {
    let target = describe(&c.cfg);
    let failed = |e: tokio_postgres::Error| {
        pg_tls::connect_error(&target, c.mode(), &e)
            .unwrap_or_else(|| db_err(&format!("cannot connect to {target}"), &e))
    };
    let attempt = match &c.tls {
        None => spawned(timeout, c.cfg.connect(NoTls)).await,
        Some(tls) => spawned(timeout, c.cfg.connect(tls.clone())).await,
    };
    match attempt {
        Some(Ok(client)) => Ok(client),
        Some(Err(e)) => Err(failed(e)),
        None => Err(format!("cannot connect to {target} within {timeout:?}")),
    }
}

/// Awaits a connection attempt for at most `timeout` (`None` when it took
/// longer) and spawns the connection's task on the runtime.
async fn spawned<S, T>(
    timeout: Duration,
    attempt: impl std::future::Future<
        Output = Result<(Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
    >,
) -> Option<Result<Client, tokio_postgres::Error>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Some(Err(e)),
        Err(_) => return None,
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(Ok(client))
}

/// Creates (or brings up to date) the schema `phi_audit`, its table, its
/// functions and the roles `phi_audit_owner`, `phi_audit_writer` and
/// `phi_audit_verifier`, in one transaction, connected as `url` (a
/// superuser, or a role with `CREATEROLE` that may create schemas in the
/// database). Running it again changes nothing. Grant the roles to login
/// roles afterwards (docs/AUDIT-DB.md).
pub fn init_db(url: &str) -> Result<(), PgError> {
    let conn = connector(url)?;
    on_own_runtime(move |rt| {
        rt.block_on(async move {
            let mut client = connect(&conn, Duration::from_secs(30))
                .await
                .map_err(PgError::Database)?;
            // Roles are the cluster's, not the database's: two migrations
            // at once (two databases, or two deploy jobs) can race to
            // create or alter one, and the loser's transaction fails. The
            // migration is idempotent, so it is run again.
            let mut attempt = 0u32;
            loop {
                match migrate(&mut client).await {
                    Ok(()) => return Ok(()),
                    Err(e) if attempt < 5 && lost_a_race(&e) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                    }
                    Err(e) => return Err(PgError::Database(db_err("the migration failed", &e))),
                }
            }
        })
    })
}

/// [`MIGRATION`] in one transaction.
async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(MIGRATION).await?;
    tx.commit().await
}

/// A failure that a concurrent migration causes: a role (or schema)
/// created by the other one first, a catalogue row it updated first, a
/// deadlock between the two.
fn lost_a_race(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => true,
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => true,
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => true,
        Some(c) if *c == SqlState::INTERNAL_ERROR => e
            .as_db_error()
            .is_some_and(|d| d.message().contains("concurrently")),
        _ => false,
    }
}

/// Verifies the trail in the database at `url` (a role with `SELECT` on
/// `phi_audit.entries`, such as a member of `phi_audit_verifier`), with
/// the key and end anchor of `verifier`, in one read-only snapshot: row
/// `seq` 0 is the genesis header, every row's line is canonical, its `seq`
/// is the row's and follows the one before, its `prev` is the previous
/// line's hash and its hash verifies. The first bad entry is reported as a
/// [`BadLine`] whose `file` is [`TABLE`], `line` the 1-based row number and
/// `seq` the row's `seq` column. A start anchor
/// ([`Verifier::start_after`]) is refused: the table keeps its genesis.
pub fn verify(verifier: &Verifier, url: &str) -> Result<VerifyReport, PgError> {
    parse_url(url)?;
    let (key, end, start) = verifier.parts();
    if start.is_some() {
        return Err(PgError::Invalid(
            "a start anchor does not apply to a database trail (it keeps its genesis)".into(),
        ));
    }
    let (key, end) = (key.cloned(), end.cloned());
    let run = scan(url, ChainCheck::new(key, end), |run, seq, text| {
        run.row(seq, text).map_err(PgError::from)
    })?;
    Ok(run.finish()?)
}

/// The lines of the table in `seq` order (one read-only snapshot), as a
/// member of `phi_audit_verifier`, all in memory (for the checkpoint
/// verifier, which takes them as one sequence).
fn read_lines(url: &str) -> Result<Vec<String>, PgError> {
    scan(url, Vec::new(), |lines, _, text| {
        lines.push(text.to_owned());
        Ok(())
    })
}

/// Reads the table's rows in `seq` order in one read-only, repeatable-read
/// snapshot, 4,096 rows at a time (memory stays bounded whatever its
/// size), handing each row's `seq` and line to `f` with `state`; returns
/// `state`.
fn scan<S: Send + 'static>(
    url: &str,
    state: S,
    mut f: impl FnMut(&mut S, i64, &str) -> Result<(), PgError> + Send + 'static,
) -> Result<S, PgError> {
    let conn = connector(url)?;
    on_own_runtime(move |rt| {
        rt.block_on(async move {
            let mut state = state;
            let mut client = connect(&conn, Duration::from_secs(30))
                .await
                .map_err(PgError::Database)?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| PgError::Database(db_err("cannot begin", &e)))?;
            let read =
                |e: tokio_postgres::Error| PgError::Database(db_err("cannot read the trail", &e));
            let stmt = tx
                .prepare("SELECT seq, line FROM phi_audit.entries ORDER BY seq")
                .await
                .map_err(read)?;
            let portal = tx.bind(&stmt, &[]).await.map_err(read)?;
            loop {
                let rows = tx.query_portal(&portal, 4096).await.map_err(read)?;
                if rows.is_empty() {
                    return Ok(state);
                }
                for row in rows {
                    f(&mut state, row.get(0), row.get(1))?;
                }
            }
        })
    })
}

/// The report of the trail at `url` ([`report`](super::report)); needs
/// only `SELECT`.
pub fn report(url: &str) -> Result<super::report::Report, PgError> {
    scan(url, super::report::Report::default(), |r, _, line| {
        r.add_line(line.as_bytes());
        Ok(())
    })
}

/// Runs the trail at `url` through `monitor`, in `seq` order, as
/// [`Monitor::replay_log`](crate::monitor::Monitor::replay_log) does a
/// file log (the lines as they are, unverified); needs only `SELECT`.
pub fn replay(
    url: &str,
    monitor: std::sync::Arc<crate::monitor::Monitor>,
) -> Result<crate::monitor::ReplayStats, PgError> {
    let start = (crate::monitor::ReplayStats::default(), monitor);
    let (stats, _) = scan(url, start, |(stats, monitor), _, line| {
        stats.add_line(monitor, line.as_bytes());
        Ok(())
    })?;
    Ok(stats)
}

/// Signs a checkpoint of the trail at `url` as it is now (see
/// [`checkpoint`](super::checkpoint)); needs only `SELECT`.
pub fn checkpoint(
    url: &str,
    key: &super::checkpoint::CheckpointKey,
) -> Result<super::checkpoint::Checkpoint, PgError> {
    let state = scan(url, super::checkpoint::TrailDigest::new(), |d, _, line| {
        d.update(line.as_bytes())
            .map_err(|e| PgError::Invalid(e.to_string()))
    })?;
    key.sign(&state, SystemTime::now())
        .ok_or_else(|| PgError::Invalid("the trail is empty".into()))
}

/// Checks the trail at `url` against signed checkpoints, with their
/// public key only ([`checkpoint::verify_lines`](super::checkpoint::verify_lines)).
pub fn verify_checkpoints(
    url: &str,
    checkpoints: &[super::checkpoint::Checkpoint],
    public_key: &[u8; 32],
) -> Result<super::checkpoint::CheckpointReport, super::checkpoint::CheckpointError> {
    let lines =
        read_lines(url).map_err(|e| super::checkpoint::CheckpointError::Io(e.to_string()))?;
    super::checkpoint::verify_lines(lines.into_iter().map(Ok), checkpoints, public_key)
}

/// The table verifier's verdict on `lines` as rows 0, 1, ... (the
/// boundary tests of `limit_tests`): `None` if they verify.
#[cfg(test)]
pub(crate) fn limit_test_verdict(lines: &[String]) -> Option<Problem> {
    let mut check = ChainCheck::new(None, None);
    for (seq, text) in lines.iter().enumerate() {
        match check.row(seq as i64, text) {
            Ok(()) => {}
            Err(VerifyError::BadLine(b)) => return Some(b.problem),
            Err(other) => panic!("not a line problem: {other}"),
        }
    }
    None
}

/// The verification of rows in `seq` order.
struct ChainCheck {
    key: Option<AuditKey>,
    end: Option<Anchor>,
    mac: Option<Mac>,
    expected: u64,
    prev: [u8; 32],
    rows: u64,
    anchor_seen: bool,
    report: VerifyReport,
}

impl ChainCheck {
    fn new(key: Option<AuditKey>, end: Option<Anchor>) -> ChainCheck {
        ChainCheck {
            key,
            end,
            mac: None,
            expected: 0,
            prev: [0; 32],
            rows: 0,
            anchor_seen: false,
            report: VerifyReport::empty(),
        }
    }

    fn bad(&self, seq: Option<u64>, problem: Problem) -> VerifyError {
        VerifyError::BadLine(BadLine {
            file: PathBuf::from(TABLE),
            line: self.rows,
            seq,
            problem,
        })
    }

    fn row(&mut self, row_seq: i64, text: &str) -> Result<(), VerifyError> {
        self.rows += 1;
        let col = u64::try_from(row_seq).ok();
        // Refuses a line over `line::MAX_LINE` bytes, as every reader does.
        let (entry, body) = line::decode(text.as_bytes()).map_err(|p| self.bad(col, p))?;
        let seq = Some(entry.seq);
        match (&entry.body, self.rows) {
            (Body::Header(h), 1) => {
                if h.segment != 1 || entry.seq != 0 {
                    return Err(self.bad(seq, Problem::NotGenesis { segment: h.segment }));
                }
                let found = Mac::describe(&h.mac, h.key_id.as_deref());
                let mac = match (h.mac.as_str(), &self.key) {
                    ("sha256", None) => Mac::Sha256,
                    ("sha256", Some(_)) => return Err(self.bad(seq, Problem::Unkeyed)),
                    (_, None) => {
                        return Err(VerifyError::KeyRequired {
                            file: PathBuf::from(TABLE),
                            key_id: h.key_id.clone().unwrap_or_default(),
                        })
                    }
                    (_, Some(key)) => {
                        if h.key_id.as_deref() != Some(key.key_id()) {
                            return Err(self.bad(
                                seq,
                                Problem::WrongKey {
                                    expected: key.key_id().to_owned(),
                                    found: h.key_id.clone().unwrap_or_default(),
                                },
                            ));
                        }
                        Mac::Hmac(key.clone())
                    }
                };
                self.report.mac = found;
                self.report.keyed = matches!(mac, Mac::Hmac(_));
                self.mac = Some(mac);
            }
            (Body::Header(_), _) => return Err(self.bad(seq, Problem::UnexpectedHeader)),
            (_, 1) => return Err(self.bad(seq, Problem::HeaderExpected)),
            (Body::Event(_), _) => self.report.entries += 1,
            (Body::Gap { lost, reason, .. }, _) => self.report.gaps.push(GapRecord {
                file: PathBuf::from(TABLE),
                line: self.rows,
                seq: entry.seq,
                lost: *lost,
                reason: reason.clone(),
            }),
        }
        if entry.seq != self.expected {
            return Err(self.bad(
                seq,
                Problem::SeqMismatch {
                    expected: self.expected,
                    found: entry.seq,
                },
            ));
        }
        if col != Some(entry.seq) {
            return Err(self.bad(
                col,
                Problem::Malformed(format!(
                    "the row's seq column is {row_seq} but its line says {}",
                    entry.seq
                )),
            ));
        }
        if entry.prev != self.prev {
            return Err(self.bad(seq, Problem::PrevMismatch));
        }
        let Some(mac) = self.mac.as_ref() else {
            return Err(self.bad(seq, Problem::HeaderExpected));
        };
        if !mac.matches(&entry.prev, body, &entry.hash) {
            return Err(self.bad(seq, Problem::HashMismatch));
        }
        if let Some(anchor) = &self.end {
            if anchor.seq == entry.seq {
                if line::unhex32(&anchor.hash) != Some(entry.hash) {
                    return Err(self.bad(seq, Problem::AnchorMismatch { seq: anchor.seq }));
                }
                self.anchor_seen = true;
            }
        }
        self.prev = entry.hash;
        self.expected += 1;
        self.report.lines += 1;
        self.report.last = Anchor {
            seq: entry.seq,
            hash: line::hex(&entry.hash),
        };
        Ok(())
    }

    fn finish(mut self) -> Result<VerifyReport, VerifyError> {
        if self.rows == 0 {
            self.rows = 1;
            return Err(self.bad(None, Problem::EmptyFile));
        }
        if let Some(anchor) = &self.end {
            if !self.anchor_seen {
                let problem = Problem::MissingTail {
                    last_seq: self.expected.checked_sub(1),
                    anchor_seq: anchor.seq,
                };
                self.rows += 1;
                return Err(self.bad(None, problem));
            }
        }
        Ok(self.report)
    }
}

/// How a [`PgAuditLog`] is opened.
#[derive(Debug, Default)]
pub struct PgAuditLogBuilder {
    key: Option<AuditKey>,
    unkeyed: bool,
    timeout: Option<Duration>,
}

impl PgAuditLogBuilder {
    /// Chains with HMAC-SHA-256 under `key` (the trail must be keyed with
    /// it, or empty).
    pub fn audit_key(mut self, key: AuditKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Chains with bare SHA-256, a checksum that whoever can write the
    /// table can recompute. Refused unless asked for: without a key (or
    /// this), [`open`](Self::open) fails.
    pub fn unkeyed(mut self, yes: bool) -> Self {
        self.unkeyed = yes;
        self
    }

    /// How long a connection attempt, or one group's transaction, may take
    /// before its events are refused (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Connects to `url` as a member of `phi_audit_writer`, checks that the
    /// trail's genesis header (if any) names this log's MAC and key, and
    /// starts the writer thread. Fails if the database cannot be reached or
    /// has no `phi_audit` schema ([`init_db`]).
    pub fn open(self, url: &str) -> Result<PgAuditLog, PgError> {
        let mac = match (self.key, self.unkeyed) {
            (Some(k), _) => Mac::Hmac(k),
            (None, true) => Mac::Sha256,
            (None, false) => {
                return Err(PgError::Invalid(
                    "no audit key: a database trail is keyed unless unkeyed(true) is asked for"
                        .into(),
                ))
            }
        };
        let conn = connector(url)?;
        let target = describe(&conn.cfg);
        let timeout = self.timeout.unwrap_or(Duration::from_secs(30));
        let queue = Arc::new(Queue::default());
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), PgError>>();
        let mut writer = Writer {
            conn,
            mac,
            timeout,
            target: target.clone(),
            client: None,
            genesis_checked: false,
            lost: 0,
            broken: None,
            counters: counters.clone(),
        };
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("phi-envelope-pg-audit".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(PgError::Database(format!(
                            "cannot start a runtime: {e}"
                        ))));
                        return;
                    }
                };
                let first = rt.block_on(writer.first_check());
                let ok = first.is_ok();
                let _ = ready_tx.send(first);
                if ok {
                    writer.run(&rt, &q);
                }
            })
            .map_err(|e| PgError::Database(format!("cannot start the writer thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(PgError::Database("the writer thread stopped".into()));
            }
        }
        Ok(PgAuditLog {
            queue,
            thread: Mutex::new(Some(thread)),
            counters,
            target,
        })
    }
}

/// `user@host:port/db` of a connection string, for messages and reports:
/// never its password (or any other setting).
pub fn describe_url(url: &str) -> Result<String, PgError> {
    parse_url(url).map(|p| describe(&p.cfg))
}

/// `user@host:port/db`, for messages (never a password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        cfg.get_user().unwrap_or("?"),
        cfg.get_dbname().unwrap_or("?")
    )
}

/// A hash-chained audit trail in PostgreSQL, shared by every process that
/// appends to it. See the [module documentation](self).
///
/// `submit` queues the event and returns a [`Receipt`] answered once the
/// transaction holding it is committed; `record` waits for it on the
/// calling thread. Dropping the log lets the writer finish what was
/// queued.
pub struct PgAuditLog {
    queue: Arc<Queue>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: Arc<Counters>,
    target: String,
}

impl fmt::Debug for PgAuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgAuditLog")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// What a [`PgAuditLog`] did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStats {
    /// Event entries committed.
    pub entries: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Events refused (not committed, or not confirmed).
    pub refused: u64,
    /// Connections opened (the first one included).
    pub connections: u64,
}

#[derive(Default)]
struct Counters {
    entries: AtomicU64,
    commits: AtomicU64,
    refused: AtomicU64,
    connections: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer thread's state: the connection and where the chain is.
struct Writer {
    conn: Connector,
    mac: Mac,
    timeout: Duration,
    target: String,
    client: Option<Client>,
    genesis_checked: bool,
    /// Events refused since the last commit: recorded as a `gap` line by
    /// the next one.
    lost: u64,
    /// The chain was found broken, or keyed with another key: sticky.
    broken: Option<String>,
    counters: Arc<Counters>,
}

/// Why a group was not committed.
enum Failure {
    /// The connection, a statement or the commit failed: retry with a new
    /// connection at the next group.
    Transient(String),
    /// What the table holds cannot be continued: refuse from now on.
    Broken(String),
}

impl Writer {
    async fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let c = connect(&self.conn, self.timeout).await?;
            c.batch_execute(
                "SET synchronous_commit = on; SET application_name = 'phi-envelope-audit'",
            )
            .await
            .map_err(|e| db_err("cannot set up the session", &e))?;
            self.counters.connections.fetch_add(1, Ordering::Relaxed);
            self.genesis_checked = false;
            self.client = Some(c);
        }
        self.client.as_mut().ok_or_else(|| "no connection".into())
    }

    /// At open: connects and checks the genesis header, if there is one.
    async fn first_check(&mut self) -> Result<(), PgError> {
        let timeout = self.timeout;
        let r = tokio::time::timeout(timeout, async {
            let mac = self.mac.clone();
            let client = self.client().await.map_err(PgError::Database)?;
            let row = client
                .query_one("SELECT phi_audit.genesis()", &[])
                .await
                .map_err(|e| PgError::Database(db_err("cannot read the trail's genesis", &e)))?;
            let genesis: Option<String> = row.get(0);
            if let Some(g) = genesis {
                check_genesis(&mac, &g).map_err(PgError::Invalid)?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => {
                self.genesis_checked = true;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PgError::Database(format!(
                "{}: no answer within {timeout:?}",
                self.target
            ))),
        }
    }

    fn run(&mut self, rt: &tokio::runtime::Runtime, queue: &Queue) {
        let _closing = queue.closed_on_unwind();
        while let Some(group) = queue.take_group(MAX_GROUP) {
            let n = group.len() as u64;
            let result = match &self.broken {
                Some(why) => Err(why.clone()),
                None => {
                    let jsons: Vec<&str> = group.iter().map(|j| j.event_json.as_str()).collect();
                    let timeout = self.timeout;
                    let r = rt.block_on(async {
                        match tokio::time::timeout(timeout, self.append(&jsons)).await {
                            Ok(r) => r,
                            Err(_) => {
                                Err(Failure::Transient(format!("no commit within {timeout:?}")))
                            }
                        }
                    });
                    match r {
                        Ok(()) => Ok(()),
                        Err(Failure::Transient(why)) => {
                            // A new connection next time: the server rolls
                            // back whatever this one left open.
                            self.client = None;
                            Err(format!(
                                "audit trail {} refuses the entry: {why}; the event was not committed (or its commit was not confirmed)",
                                self.target
                            ))
                        }
                        Err(Failure::Broken(why)) => {
                            let msg = format!(
                                "audit trail {} refuses every entry: {why}. Verify it (backup audit verify --audit-db URL) and see docs/AUDIT-DB.md, \"When the chain is broken\"",
                                self.target
                            );
                            self.broken = Some(msg.clone());
                            self.client = None;
                            Err(msg)
                        }
                    }
                }
            };
            match &result {
                Ok(()) => {
                    self.counters.entries.fetch_add(n, Ordering::Relaxed);
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.lost = self.lost.saturating_add(n);
                    self.counters.refused.fetch_add(n, Ordering::Relaxed);
                }
            }
            for job in group {
                job.done.complete(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(SinkError(e.clone())),
                });
            }
        }
    }

    /// One transaction: lock the head, check it, chain the group's lines
    /// to it, insert them, commit.
    async fn append(&mut self, jsons: &[&str]) -> Result<(), Failure> {
        let mac = self.mac.clone();
        let lost = self.lost;
        let check_genesis_now = !self.genesis_checked;
        let client = self.client().await.map_err(Failure::Transient)?;
        let transient = |what: &str, e: tokio_postgres::Error| Failure::Transient(db_err(what, &e));
        let tx = client
            .transaction()
            .await
            .map_err(|e| transient("cannot begin", e))?;
        let head = tx
            .query_opt("SELECT seq, line FROM phi_audit.lock_head()", &[])
            .await
            .map_err(|e| transient("cannot lock the trail's head", e))?;
        let mut seqs: Vec<i64> = Vec::with_capacity(jsons.len() + 2);
        let mut lines: Vec<String> = Vec::with_capacity(jsons.len() + 2);
        let now = SystemTime::now();
        let (mut seq, mut prev) = match head {
            None => {
                let header = Body::Header(Header {
                    mac: mac.name().to_owned(),
                    key_id: mac.key_id().map(str::to_owned),
                    segment: 1,
                    prev_file: None,
                    time: now,
                });
                let (mut text, hash) = line::make_line(&mac, 0, &header, &[0; 32]);
                text.pop(); // the newline
                seqs.push(0);
                lines.push(text);
                (1u64, hash)
            }
            Some(row) => {
                let row_seq: i64 = row.get(0);
                let text: &str = row.get(1);
                let hash = check_head(&mac, row_seq, text).map_err(Failure::Broken)?;
                if check_genesis_now {
                    let g: Option<String> = tx
                        .query_one("SELECT phi_audit.genesis()", &[])
                        .await
                        .map_err(|e| transient("cannot read the trail's genesis", e))?
                        .get(0);
                    match g {
                        Some(g) => check_genesis(&mac, &g).map_err(Failure::Broken)?,
                        None => {
                            return Err(Failure::Broken(
                                "the trail has entries but no genesis header (seq 0)".into(),
                            ))
                        }
                    }
                }
                ((row_seq as u64) + 1, hash)
            }
        };
        let mut push = |seq: &mut u64, prev: &mut [u8; 32], mut text: String| {
            let hash = mac.compute(prev, text.as_bytes());
            line::finish_line(&mut text, &hash);
            text.pop();
            seqs.push(*seq as i64);
            lines.push(text);
            *prev = hash;
            *seq += 1;
        };
        if lost > 0 {
            let body = line::encode_body(
                seq,
                &Body::Gap {
                    lost,
                    reason: "write-failed".into(),
                    time: now,
                },
                &prev,
            );
            push(&mut seq, &mut prev, body);
        }
        for json in jsons {
            let body = line::event_body(seq, json, &prev);
            push(&mut seq, &mut prev, body);
        }
        let stored = tx
            .execute(
                "INSERT INTO phi_audit.entries (seq, line) SELECT * FROM unnest($1::int8[], $2::text[])",
                &[&seqs, &lines],
            )
            .await
            .map_err(|e| transient("cannot insert", e))?;
        if stored != seqs.len() as u64 {
            // A rule or trigger that someone added swallowed lines: the
            // commit would confirm key uses that are not in the trail.
            return Err(Failure::Broken(format!(
                "the table stored {stored} of {} lines (a rule or trigger on phi_audit.entries?)",
                seqs.len()
            )));
        }
        tx.commit()
            .await
            .map_err(|e| transient("cannot commit", e))?;
        self.genesis_checked = true;
        self.lost = 0;
        Ok(())
    }
}

/// Checks the last row: canonical, its `seq` the row's, its hash verifies
/// under `mac`. Returns its hash.
fn check_head(mac: &Mac, row_seq: i64, text: &str) -> Result<[u8; 32], String> {
    let (entry, body) = line::decode(text.as_bytes())
        .map_err(|p| format!("the last entry (seq {row_seq}) is not an audit line: {p}"))?;
    if i64::try_from(entry.seq).ok() != Some(row_seq) {
        return Err(format!(
            "the last row (seq {row_seq}) holds the line of seq {}",
            entry.seq
        ));
    }
    if !mac.matches(&entry.prev, body, &entry.hash) {
        return Err(format!(
            "the last entry (seq {row_seq}) does not verify under {}",
            Mac::describe(mac.name(), mac.key_id())
        ));
    }
    Ok(entry.hash)
}

/// Checks that the genesis header names `mac` and its key.
fn check_genesis(mac: &Mac, text: &str) -> Result<(), String> {
    let (entry, body) = line::decode(text.as_bytes())
        .map_err(|p| format!("the genesis entry is not an audit line: {p}"))?;
    let Body::Header(h) = &entry.body else {
        return Err("the genesis entry (seq 0) is not a header".into());
    };
    let ours = Mac::describe(mac.name(), mac.key_id());
    let theirs = Mac::describe(&h.mac, h.key_id.as_deref());
    if ours != theirs {
        return Err(format!(
            "the trail is chained with {theirs}, this writer with {ours}"
        ));
    }
    if !mac.matches(&entry.prev, body, &entry.hash) {
        return Err(format!("the genesis entry does not verify under {ours}"));
    }
    Ok(())
}

impl PgAuditLog {
    /// How a log is opened.
    pub fn builder() -> PgAuditLogBuilder {
        PgAuditLogBuilder::default()
    }

    /// Entries, commits, refusals and connections so far.
    pub fn stats(&self) -> PgStats {
        let c = &self.counters;
        PgStats {
            entries: c.entries.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
        }
    }
}

impl EventSink for PgAuditLog {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        self.submit(event).wait()
    }

    /// Queues the entry for the writer thread; the receipt resolves once
    /// the transaction holding it is committed, or with the reason it was
    /// not.
    fn submit(&self, event: &Event) -> Receipt {
        let event_json = event.to_json();
        // The row's CHECK would refuse it, and with it the whole group of
        // other callers' events: refuse this one alone, as the file log
        // does (the same estimate of the line around the event).
        if event_json.len() as u64 + 240 > line::MAX_LINE as u64 {
            return Receipt::ready(Err(SinkError(format!(
                "audit trail {}: event too large ({} bytes of JSON; the limit is {})",
                self.target,
                event_json.len(),
                line::MAX_LINE
            ))));
        }
        let (receipt, done) = Receipt::pending();
        match self.queue.push(event_json, done) {
            Ok(()) => receipt,
            Err(()) => Receipt::ready(Err(SinkError(format!(
                "audit trail {} is closed",
                self.target
            )))),
        }
    }
}

impl Drop for PgAuditLog {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}
