//! The audit trail: its HMAC key (`--audit-key-file`), opening the file log
//! (`--audit-log`) and the PostgreSQL trail (`--audit-db`) as the keyring's
//! event sinks, and the `audit` commands (`backup audit verify`,
//! `backup audit init-db`).

use std::fs;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use std::sync::Arc;

use phi_envelope::audit::{AuditKey, AuditLog, Verifier, VerifyReport};
use phi_envelope::events::{EventSink, FanOut};

use crate::output::json_str;
use crate::{exit, CliError, Global};

// The grammar of `backup audit ...` (docs/CLI.md).
#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Verify an audit trail's hash chain: a file log (and its rotated
    /// files), or the PostgreSQL trail of --audit-db; names the first bad
    /// entry
    Verify {
        /// The log's first file (or none, with --audit-db)
        #[arg(value_name = "LOG")]
        log: Option<PathBuf>,
        /// Also require this entry (SEQ:HASH, printed by the last verify)
        /// to be present: detects lines removed from the end
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<String>,
        /// The log's earlier files were archived on purpose: the first file
        /// continues from this entry
        #[arg(long, value_name = "SEQ:HASH")]
        start_after: Option<String>,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Create the PostgreSQL trail's schema, table, functions and roles
    /// (phi_audit_owner, phi_audit_writer, phi_audit_verifier) in the
    /// database at URL, connected as a superuser; running it again changes
    /// nothing (docs/AUDIT-DB.md)
    InitDb {
        /// The database, as a superuser (default: --audit-db)
        #[arg(value_name = "URL")]
        url: Option<String>,
    },
}

/// Runs an `audit` command.
pub fn run(g: &Global, cmd: AuditCmd) -> Result<(), CliError> {
    match cmd {
        AuditCmd::Verify {
            log,
            anchor,
            start_after,
            json,
        } => match (log, &g.audit_db) {
            (Some(log), _) => verify(g, &log, anchor.as_deref(), start_after.as_deref(), json),
            (None, Some(url)) => verify_db(g, url, anchor.as_deref(), start_after.as_deref(), json),
            (None, None) => Err(CliError::new(
                exit::USAGE,
                "audit verify needs a LOG file or --audit-db URL".into(),
            )),
        },
        AuditCmd::InitDb { url } => match url.as_ref().or(g.audit_db.as_ref()) {
            Some(url) => init_db(url),
            None => Err(CliError::new(
                exit::USAGE,
                "audit init-db needs a URL (or --audit-db)".into(),
            )),
        },
    }
}

/// The audit key from `--audit-key-file`: 64+ hex digits, or 32+ raw bytes.
fn audit_key(g: &Global) -> Result<Option<AuditKey>, CliError> {
    let Some(file) = &g.audit_key_file else {
        return Ok(None);
    };
    let bytes = zeroize::Zeroizing::new(fs::read(file).map_err(|e| {
        CliError::new(
            exit::AUDIT,
            format!("cannot read the audit key file {}: {e}", file.display()),
        )
    })?);
    let text = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
    let key = if text.len() >= 64
        && text.len().is_multiple_of(2)
        && text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        let raw: zeroize::Zeroizing<Vec<u8>> = zeroize::Zeroizing::new(
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap_or(0))
                .collect(),
        );
        AuditKey::new(&raw)
    } else {
        AuditKey::new(&bytes)
    };
    key.map(Some).map_err(|_| {
        CliError::new(
            exit::AUDIT,
            format!(
                "the audit key file {} must hold at least 32 bytes (or 64 hex digits)",
                file.display()
            ),
        )
    })
}

/// The keyring's event sink: the audit log of `--audit-log`, the
/// PostgreSQL trail of `--audit-db`, both (every event to each; a key use
/// is refused unless both recorded it), or none.
pub fn open_sink(g: &Global) -> Result<Option<Arc<dyn EventSink>>, CliError> {
    let log = open_log(g)?.map(|l| l as Arc<dyn EventSink>);
    let db = open_db(g)?;
    Ok(match (log, db) {
        (Some(l), Some(d)) => Some(Arc::new(FanOut(vec![l, d]))),
        (l, d) => l.or(d),
    })
}

/// The PostgreSQL trail of `--audit-db`, when one is configured.
#[cfg(feature = "postgres")]
fn open_db(g: &Global) -> Result<Option<Arc<dyn EventSink>>, CliError> {
    use phi_envelope::audit::postgres::PgAuditLog;
    let Some(url) = &g.audit_db else {
        return Ok(None);
    };
    let Some(key) = audit_key(g)? else {
        return Err(CliError::new(
            exit::AUDIT,
            "the PostgreSQL audit trail is keyed: pass --audit-key-file FILE (or PHI_ENVELOPE_AUDIT_KEY_FILE); no key was used".into(),
        ));
    };
    let log = PgAuditLog::builder()
        .audit_key(key)
        .open(url)
        .map_err(|e| CliError::new(exit::AUDIT, format!("{e}; no key was used")))?;
    Ok(Some(Arc::new(log)))
}

#[cfg(not(feature = "postgres"))]
fn open_db(g: &Global) -> Result<Option<Arc<dyn EventSink>>, CliError> {
    match &g.audit_db {
        None => Ok(None),
        Some(_) => Err(no_postgres()),
    }
}

#[cfg(not(feature = "postgres"))]
fn no_postgres() -> CliError {
    CliError::new(
        exit::USAGE,
        "this build has no PostgreSQL audit trail (build with --features postgres)".into(),
    )
}

/// `backup audit init-db URL`.
#[cfg(feature = "postgres")]
fn init_db(url: &str) -> Result<(), CliError> {
    use phi_envelope::audit::postgres;
    let target =
        postgres::describe_url(url).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    postgres::init_db(url).map_err(|e| CliError::new(exit::AUDIT, e.to_string()))?;
    println!(
        "OK {target}: schema phi_audit ready; grant phi_audit_writer to the services' login roles and phi_audit_verifier to the auditors' (docs/AUDIT-DB.md)"
    );
    Ok(())
}

#[cfg(not(feature = "postgres"))]
fn init_db(_url: &str) -> Result<(), CliError> {
    Err(no_postgres())
}

/// `backup audit verify --audit-db URL`.
#[cfg(feature = "postgres")]
fn verify_db(
    g: &Global,
    url: &str,
    anchor: Option<&str>,
    start_after: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    use phi_envelope::audit::postgres::{self, PgError};
    if start_after.is_some() {
        return Err(CliError::new(
            exit::USAGE,
            "--start-after applies to file logs only (a database trail keeps its genesis)".into(),
        ));
    }
    let target = format!(
        "postgresql {}",
        postgres::describe_url(url).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?
    );
    let v = verifier(g, anchor, None)?;
    match postgres::verify(&v, url) {
        Ok(report) => {
            print_ok(&target, &report, json);
            Ok(())
        }
        Err(PgError::Verify(e)) => Err(verify_failed(&target, e, json)),
        Err(e) => {
            let code = match e {
                PgError::Invalid(_) => exit::USAGE,
                _ => exit::IO,
            };
            Err(CliError::new(code, e.to_string()))
        }
    }
}

#[cfg(not(feature = "postgres"))]
fn verify_db(
    _g: &Global,
    _url: &str,
    _anchor: Option<&str>,
    _start_after: Option<&str>,
    _json: bool,
) -> Result<(), CliError> {
    Err(no_postgres())
}

/// The verifier of `--audit-key-file`, `--anchor` and `--start-after`.
fn verifier(
    g: &Global,
    anchor: Option<&str>,
    start_after: Option<&str>,
) -> Result<Verifier, CliError> {
    let mut v = Verifier::new();
    if let Some(k) = audit_key(g)? {
        v = v.key(k);
    }
    if let Some(a) = anchor {
        v = v.anchor(a.parse().map_err(CliError::from)?);
    }
    if let Some(a) = start_after {
        v = v.start_after(a.parse().map_err(CliError::from)?);
    }
    Ok(v)
}

/// The audit log of `--audit-log`, when one is configured.
pub fn open_log(g: &Global) -> Result<Option<Arc<AuditLog>>, CliError> {
    let Some(path) = &g.audit_log else {
        return Ok(None);
    };
    // A torn last line can only be a run that died mid-append (the log's
    // lock excludes live writers while it is examined): cut it off and
    // record a `torn-tail` gap line rather than stop every later run.
    let mut b = AuditLog::builder().repair_torn_tail(true);
    if let Some(k) = audit_key(g)? {
        b = b.audit_key(k);
    }
    let log = b.open(path).map_err(|e| {
        CliError::new(
            exit::AUDIT,
            format!(
                "{e}; no key was used (the operation needs its audit log; {})",
                crate::AUDIT_LOG_SETTING
            ),
        )
    })?;
    Ok(Some(Arc::new(log)))
}

/// `backup audit verify LOG`: checks the hash chain (and its rotated
/// files), and names the first bad line.
pub fn verify(
    g: &Global,
    log: &Path,
    anchor: Option<&str>,
    start_after: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    let v = verifier(g, anchor, start_after)?;
    let target = log.display().to_string();
    match v.verify(log) {
        Ok(report) => {
            print_ok(&target, &report, json);
            Ok(())
        }
        Err(e) => Err(verify_failed(&target, e, json)),
    }
}

/// What a successful verification prints.
fn print_ok(target: &str, report: &VerifyReport, json: bool) {
    if json {
        println!(
            "{{\"ok\":true,\"log\":{},\"files\":{},\"lines\":{},\"entries\":{},\"lost_events\":{},\"mac\":{},\"keyed\":{},\"anchor\":{}}}",
            json_str(target),
            report.files.len(),
            report.lines,
            report.entries,
            report.lost_events(),
            json_str(&report.mac),
            report.keyed,
            json_str(&report.last.to_string())
        );
    } else {
        let place = if report.files.is_empty() {
            "the table".to_owned()
        } else {
            format!("{} file(s)", report.files.len())
        };
        println!(
            "OK {target}: {} entries in {place}, chain intact ({}{})",
            report.entries,
            report.mac,
            if report.keyed {
                ""
            } else {
                ", unkeyed: a checksum only"
            }
        );
        if report.lost_events() > 0 {
            println!(
                "warning: the log records {} event(s) that could not be written at the time (gap lines)",
                report.lost_events()
            );
        }
        println!(
            "anchor {} (keep it elsewhere; pass it as --anchor next time)",
            report.last
        );
    }
}

/// The error (and, with `--json`, the line on stdout) of a failed
/// verification.
fn verify_failed(target: &str, e: phi_envelope::audit::VerifyError, json: bool) -> CliError {
    let code = match &e {
        phi_envelope::audit::VerifyError::BadLine(_) => exit::INTEGRITY,
        phi_envelope::audit::VerifyError::Io { .. } => exit::IO,
        _ => exit::USAGE,
    };
    let msg = match e.bad_line() {
        Some(b) => format!("audit log TAMPERED or damaged: first bad line is {b}"),
        None => match &e {
            phi_envelope::audit::VerifyError::KeyRequired { .. } => {
                format!("{e} (pass --audit-key-file FILE)")
            }
            _ => e.to_string(),
        },
    };
    if json {
        println!(
            "{{\"ok\":false,\"log\":{},\"error\":{},\"line\":{}}}",
            json_str(target),
            json_str(&msg),
            e.bad_line().map_or("null".into(), |b| b.line.to_string())
        );
    }
    CliError::new(code, msg)
}
