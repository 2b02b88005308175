//! The audit log: its HMAC key (`--audit-key-file`), opening it as the
//! keyring's event sink, and the `audit` commands (`backup audit verify`).

use std::fs;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use std::sync::Arc;

use phi_envelope::audit::{AuditKey, AuditLog, Verifier};

use crate::output::json_str;
use crate::{exit, CliError, Global};

// The grammar of `backup audit ...` (docs/CLI.md).
#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Verify an audit log's hash chain (and its rotated files); names the
    /// first bad line
    Verify {
        /// The log's first file
        #[arg(value_name = "LOG")]
        log: PathBuf,
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
}

/// Runs an `audit` command.
pub fn run(g: &Global, cmd: AuditCmd) -> Result<(), CliError> {
    match cmd {
        AuditCmd::Verify {
            log,
            anchor,
            start_after,
            json,
        } => verify(g, &log, anchor.as_deref(), start_after.as_deref(), json),
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
    match v.verify(log) {
        Ok(report) => {
            if json {
                println!(
                    "{{\"ok\":true,\"log\":{},\"files\":{},\"lines\":{},\"entries\":{},\"lost_events\":{},\"mac\":{},\"keyed\":{},\"anchor\":{}}}",
                    json_str(&log.display().to_string()),
                    report.files.len(),
                    report.lines,
                    report.entries,
                    report.lost_events(),
                    json_str(&report.mac),
                    report.keyed,
                    json_str(&report.last.to_string())
                );
            } else {
                println!(
                    "OK {}: {} entries in {} file(s), chain intact ({}{})",
                    log.display(),
                    report.entries,
                    report.files.len(),
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
            Ok(())
        }
        Err(e) => {
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
                    json_str(&log.display().to_string()),
                    json_str(&msg),
                    e.bad_line().map_or("null".into(), |b| b.line.to_string())
                );
            }
            Err(CliError::new(code, msg))
        }
    }
}
