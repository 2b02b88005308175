//! The audit trail: its HMAC key (`--audit-key-file`), opening the file log
//! (`--audit-log`) and the PostgreSQL trail (`--audit-db`) as the keyring's
//! event sinks, and the `audit` commands (`backup audit verify`,
//! `backup audit init-db`).
//!
//! Why one file of this size: every `backup audit` verb (verify, report,
//! init-db, checkpoints) with its grammar; each verb is short.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use std::sync::Arc;

use phi_envelope::audit::checkpoint::{self, CheckpointKey};
use phi_envelope::audit::sealed::SecretKind as SealedKind;
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
        /// Also check the trail against these signed checkpoints (a file of
        /// checkpoint lines); without --audit-key-file, only against them
        /// (no secret needed)
        #[arg(long, value_name = "FILE", requires = "checkpoint_public_key")]
        checkpoints: Option<PathBuf>,
        /// The checkpoints' Ed25519 public key (64 hex digits)
        #[arg(long, value_name = "HEX", requires = "checkpoints")]
        checkpoint_public_key: Option<String>,
    },
    /// Summarise a trail (LOG, or the table of --audit-db) by day, key,
    /// actor, purpose, operation and outcome: who used which key when
    /// (reads the lines as they are; verify first for evidence)
    Report {
        /// The log's first file (or none, with --audit-db)
        #[arg(value_name = "LOG")]
        log: Option<PathBuf>,
        /// JSON Lines on stdout, one object per row
        #[arg(long)]
        json: bool,
    },
    /// Make a trail's audit key (the HMAC key of its chain), sealed to
    /// --audit-key-ref, into FILE (default: the sealed audit key's path);
    /// for a PostgreSQL trail, whose writers share one key
    Keygen {
        /// Where to write it (never overwritten)
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Run the key-access rules over a trail (LOG, or the table of
    /// --audit-db) and write their alerts as JSON Lines to --alerts (default
    /// stdout); exit 7 when any fired
    Monitor(crate::monitor::MonitorArgs),
    /// Make an Ed25519 checkpoint signing key: its seed sealed to
    /// --seal-to (or bare, --unsealed) into FILE (never overwritten);
    /// prints the public key to give auditors
    CheckpointKeygen {
        /// Where to write the sealed seed
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The key that seals the seed: a keystore, HSM, KMS or Transit key
        /// that only the signer may use (not the audit key's)
        #[arg(
            long,
            value_name = "REF",
            conflicts_with = "unsealed",
            required_unless_present = "unsealed"
        )]
        seal_to: Option<String>,
        /// Write the bare seed (64 hex digits, mode 0600) instead, for a
        /// signer kept offline
        #[arg(long)]
        unsealed: bool,
    },
    /// Sign a checkpoint of the trail (LOG, or the table of --audit-db) as
    /// it is now, and append it to --out (or print it)
    Checkpoint {
        /// The log's first file (or none, with --audit-db)
        #[arg(value_name = "LOG")]
        log: Option<PathBuf>,
        /// The signing key (checkpoint-keygen): a sealed seed, or a bare one
        #[arg(long, value_name = "FILE")]
        signing_key: PathBuf,
        /// The checkpoints file to append to
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
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
            checkpoints: Some(file),
            checkpoint_public_key: Some(pk),
        } => {
            let trail = trail(log.as_deref(), g)?;
            verify_checkpoints(&trail, &file, &pk, json)?;
            if g.audit_key_file.is_none() {
                return Ok(());
            }
            match trail {
                Trail::File(log) => {
                    verify(g, &log, anchor.as_deref(), start_after.as_deref(), json)
                }
                Trail::Db(url) => {
                    verify_db(g, &url, anchor.as_deref(), start_after.as_deref(), json)
                }
            }
        }
        AuditCmd::Verify {
            log,
            anchor,
            start_after,
            json,
            ..
        } => match (log, &g.audit_db) {
            (Some(log), _) => verify(g, &log, anchor.as_deref(), start_after.as_deref(), json),
            (None, Some(url)) => verify_db(g, url, anchor.as_deref(), start_after.as_deref(), json),
            (None, None) => Err(CliError::new(
                exit::USAGE,
                "audit verify needs a LOG file or --audit-db URL".into(),
            )),
        },
        AuditCmd::Keygen { out } => crate::auditkey::keygen(g, out.as_deref()),
        AuditCmd::CheckpointKeygen {
            out,
            seal_to,
            unsealed,
        } => checkpoint_keygen(g, &out, seal_to.as_deref(), unsealed),
        AuditCmd::Monitor(args) => crate::monitor::run(g, args),
        AuditCmd::Report { log, json } => {
            let trail = trail(log.as_deref(), g)?;
            report(&trail, json)
        }
        AuditCmd::Checkpoint {
            log,
            signing_key,
            out,
        } => {
            let trail = trail(log.as_deref(), g)?;
            checkpoint(g, &trail, &signing_key, out.as_deref())
        }
        AuditCmd::InitDb { url } => match url.as_ref().or(g.audit_db.as_ref()) {
            Some(url) => init_db(url),
            None => Err(CliError::new(
                exit::USAGE,
                "audit init-db needs a URL (or --audit-db)".into(),
            )),
        },
    }
}

/// A trail: a file log, or the PostgreSQL table.
enum Trail {
    File(PathBuf),
    Db(String),
}

fn trail(log: Option<&Path>, g: &Global) -> Result<Trail, CliError> {
    match (log, &g.audit_db) {
        (Some(l), _) => Ok(Trail::File(l.to_path_buf())),
        (None, Some(u)) => Ok(Trail::Db(u.clone())),
        (None, None) => Err(CliError::new(
            exit::USAGE,
            "name the trail: a LOG file or --audit-db URL".into(),
        )),
    }
}

fn audit_err(e: impl std::fmt::Display) -> CliError {
    CliError::new(exit::AUDIT, e.to_string())
}

/// `backup audit report [LOG] [--json]`.
fn report(trail: &Trail, json: bool) -> Result<(), CliError> {
    let r = match trail {
        Trail::File(log) => phi_envelope::audit::report::report_log(log).map_err(audit_err)?,
        Trail::Db(url) => db_report(url)?,
    };
    if json {
        for (k, n) in &r.rows {
            println!(
                "{{\"day\":{},\"key_ref\":{},\"actor\":{},\"purpose\":{},\"operation\":{},\"outcome\":{},\"count\":{n}}}",
                json_str(&k.day),
                json_str(&k.key_ref),
                json_str(&k.actor),
                json_str(&k.purpose),
                json_str(&k.operation),
                json_str(&k.outcome)
            );
        }
        return Ok(());
    }
    println!("day\tkey\tactor\tpurpose\toperation\toutcome\tcount");
    for (k, n) in &r.rows {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{n}",
            k.day, k.key_ref, k.actor, k.purpose, k.operation, k.outcome
        );
    }
    println!(
        "{} event line(s){}{} (not verified: run audit verify for evidence)",
        r.events,
        if r.lost > 0 {
            format!(", {} event(s) recorded as lost (gap lines)", r.lost)
        } else {
            String::new()
        },
        if r.unreadable > 0 {
            format!(", {} unreadable line(s) skipped", r.unreadable)
        } else {
            String::new()
        }
    );
    Ok(())
}

#[cfg(feature = "postgres")]
fn db_report(url: &str) -> Result<phi_envelope::audit::report::Report, CliError> {
    phi_envelope::audit::postgres::report(url).map_err(audit_err)
}

#[cfg(not(feature = "postgres"))]
fn db_report(_url: &str) -> Result<phi_envelope::audit::report::Report, CliError> {
    Err(no_postgres())
}

/// `backup audit checkpoint-keygen --out FILE [--seal-to REF | --unsealed]`.
fn checkpoint_keygen(
    g: &Global,
    out: &Path,
    seal_to: Option<&str>,
    unsealed: bool,
) -> Result<(), CliError> {
    let key = if unsealed {
        write_bare_seed(out)?
    } else {
        if out.symlink_metadata().is_ok() {
            return Err(CliError::new(
                exit::IO,
                format!(
                    "cannot create {} (never overwritten): it exists",
                    out.display()
                ),
            ));
        }
        // Required by the grammar unless --unsealed.
        let key_ref = crate::connect::key_ref(seal_to.unwrap_or_default())?;
        if crate::auditkey::is_audit_sealing_key(g, &key_ref)? {
            eprintln!(
                "backup: warning: {key_ref} also seals the audit key, which every writer of the trail unwraps: \
                 a checkpoint key sealed to it can be used on the log's host; seal it to a key only the signer may use"
            );
        }
        // Through the command's keyring: the key uses that make the seed
        // go into the configured trail like any other.
        let keys = crate::connect::connect(
            g,
            &crate::connect::schemes_of([&key_ref]),
            crate::connect::Local::Require,
        )?;
        let (seed, message) = crate::auditkey::make_with(
            g,
            &keys.rt,
            keys.local.as_deref(),
            &keys.keystore_path,
            &keys.keyring,
            &keys.caller,
            &key_ref,
            SealedKind::CheckpointSeed,
        )?;
        crate::auditkey::write_new(out, &message)?;
        CheckpointKey::from_seed(&seed).map_err(CliError::from)?
    };
    println!(
        "checkpoint public key {} (id {}): give it to the auditors; keep {} away from the log's host",
        hex_of(&key.public_key()),
        key.id(),
        out.display()
    );
    Ok(())
}

/// The bare seed of a new signing key into `out` (0600, never
/// overwritten).
fn write_bare_seed(out: &Path) -> Result<CheckpointKey, CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (key, seed) = CheckpointKey::generate().map_err(CliError::from)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            CliError::new(
                exit::IO,
                format!("cannot create {} (never overwritten): {e}", out.display()),
            )
        })?;
    let text = zeroize::Zeroizing::new(format!("{}\n", hex_of(&seed[..])));
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::new(exit::IO, format!("cannot write {}: {e}", out.display())))?;
    Ok(key)
}

/// The signing key of `audit checkpoint --signing-key FILE`: a sealed seed
/// (a phi-envelope message, opened with the providers it names), or a bare
/// one (64 hex digits).
fn signing_key(g: &Global, file: &Path) -> Result<CheckpointKey, CliError> {
    let bytes = zeroize::Zeroizing::new(fs::read(file).map_err(|e| {
        CliError::new(
            exit::IO,
            format!("cannot read the signing key {}: {e}", file.display()),
        )
    })?);
    let seed = if bytes.starts_with(&phi_envelope::format::MAGIC) {
        crate::auditkey::open_sealed(g, file, SealedKind::CheckpointSeed)?
    } else {
        unhex32(
            std::str::from_utf8(&bytes).unwrap_or(""),
            "the signing key file",
        )?
    };
    CheckpointKey::from_seed(&seed).map_err(CliError::from)
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 64 hex digits into 32 bytes.
fn unhex32(s: &str, what: &str) -> Result<zeroize::Zeroizing<[u8; 32]>, CliError> {
    let s = s.trim();
    let bad = || CliError::new(exit::USAGE, format!("{what} must be 64 hex digits"));
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// `backup audit checkpoint [LOG] --signing-key FILE [--out FILE]`.
fn checkpoint(
    g: &Global,
    trail: &Trail,
    signing_key: &Path,
    out: Option<&Path>,
) -> Result<(), CliError> {
    // A checkpoint vouches for the history it signs to anyone with the
    // public key alone: sign only a chain that verifies, with the audit key
    // where the trail is keyed, so that a line inserted by someone without
    // the audit key is never signed into the record.
    verify_before_signing(g, trail)?;
    let key = self::signing_key(g, signing_key)?;
    let cp = match trail {
        Trail::File(log) => checkpoint::sign_log(log, &key).map_err(audit_err)?,
        Trail::Db(url) => db_checkpoint(url, &key)?,
    };
    let line = cp.to_line();
    match out {
        Some(path) => {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| CliError::new(exit::IO, format!("{}: {e}", path.display())))?;
            f.write_all(format!("{line}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| CliError::new(exit::IO, format!("{}: {e}", path.display())))?;
            println!(
                "checkpoint of seq {} appended to {} (signer {})",
                cp.seq,
                path.display(),
                cp.signer
            );
        }
        None => println!("{line}"),
    }
    Ok(())
}

/// The chain of `trail` verifies (with `--audit-key-file` if given).
fn verify_before_signing(g: &Global, trail: &Trail) -> Result<(), CliError> {
    let v = verifier(g, None, None)?;
    match trail {
        Trail::File(log) => {
            let target = log.display().to_string();
            let report = v.verify(log).map_err(|e| not_signed(&target, e))?;
            unkeyed_only_if_asked(g, &target, &report, false).map_err(|e| {
                CliError::new(e.code, format!("{}; no checkpoint was signed", e.message))
            })
        }
        Trail::Db(url) => verify_db_chain(&v, url),
    }
}

/// A chain that does not verify, and the checkpoint it kept from being
/// signed.
fn not_signed(target: &str, e: phi_envelope::audit::VerifyError) -> CliError {
    let inner = verify_failed(target, e, false);
    CliError::new(
        inner.code,
        format!("{}; no checkpoint was signed", inner.message),
    )
}

#[cfg(feature = "postgres")]
fn verify_db_chain(v: &Verifier, url: &str) -> Result<(), CliError> {
    use phi_envelope::audit::postgres::{self, PgError};
    // The URL may hold a password: errors name the database without it.
    let target = format!(
        "postgresql {}",
        postgres::describe_url(url).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?
    );
    match postgres::verify(v, url) {
        Ok(_) => Ok(()),
        Err(PgError::Verify(e)) => Err(not_signed(&target, e)),
        Err(e) => Err(CliError::new(exit::IO, e.to_string())),
    }
}

#[cfg(not(feature = "postgres"))]
fn verify_db_chain(_v: &Verifier, _url: &str) -> Result<(), CliError> {
    Err(no_postgres())
}

#[cfg(feature = "postgres")]
fn db_checkpoint(url: &str, key: &CheckpointKey) -> Result<checkpoint::Checkpoint, CliError> {
    phi_envelope::audit::postgres::checkpoint(url, key).map_err(audit_err)
}

#[cfg(not(feature = "postgres"))]
fn db_checkpoint(_url: &str, _key: &CheckpointKey) -> Result<checkpoint::Checkpoint, CliError> {
    Err(no_postgres())
}

/// `audit verify --checkpoints FILE --checkpoint-public-key HEX`.
fn verify_checkpoints(trail: &Trail, file: &Path, pk: &str, json: bool) -> Result<(), CliError> {
    let pk = *unhex32(pk, "--checkpoint-public-key")?;
    let text = fs::read_to_string(file)
        .map_err(|e| CliError::new(exit::IO, format!("{}: {e}", file.display())))?;
    let cps = checkpoint::parse_checkpoints(&text)
        .map_err(|e| CliError::new(exit::USAGE, format!("{}: {e}", file.display())))?;
    let result = match trail {
        Trail::File(log) => checkpoint::verify_log(log, &cps, &pk),
        Trail::Db(url) => db_verify_checkpoints(url, &cps, &pk)?,
    };
    match result {
        Ok(r) => {
            let through = r.covered_through.map_or("none".into(), |s| s.to_string());
            if json {
                println!(
                    "{{\"ok\":true,\"checkpoints\":{},\"lines\":{},\"covered_through\":{}}}",
                    r.checkpoints,
                    r.lines,
                    r.covered_through.map_or("null".into(), |s| s.to_string())
                );
            } else {
                println!(
                    "OK checkpoints: {} checkpoint(s) signed by {} verify; the trail ({} lines) is what they signed through seq {through}",
                    r.checkpoints,
                    checkpoint::signer_id(&pk),
                    r.lines
                );
            }
            Ok(())
        }
        Err(e) => {
            let code = match e {
                checkpoint::CheckpointError::Io(_) => exit::IO,
                _ => exit::INTEGRITY,
            };
            if json {
                println!("{{\"ok\":false,\"error\":{}}}", json_str(&e.to_string()));
            }
            Err(CliError::new(code, format!("audit trail checkpoints: {e}")))
        }
    }
}

#[cfg(feature = "postgres")]
fn db_verify_checkpoints(
    url: &str,
    cps: &[checkpoint::Checkpoint],
    pk: &[u8; 32],
) -> Result<Result<checkpoint::CheckpointReport, checkpoint::CheckpointError>, CliError> {
    Ok(phi_envelope::audit::postgres::verify_checkpoints(
        url, cps, pk,
    ))
}

#[cfg(not(feature = "postgres"))]
fn db_verify_checkpoints(
    _url: &str,
    _cps: &[checkpoint::Checkpoint],
    _pk: &[u8; 32],
) -> Result<Result<checkpoint::CheckpointReport, checkpoint::CheckpointError>, CliError> {
    Err(no_postgres())
}

/// The keyring's event sink: the audit log of `--audit-log`, the
/// PostgreSQL trail of `--audit-db`, both (every event to each; a key use
/// is refused unless both recorded it), or none.
pub fn open_sink(
    g: &Global,
    key: Option<AuditKey>,
) -> Result<Option<Arc<dyn EventSink>>, CliError> {
    let log = open_log(g, key.clone())?.map(|l| l as Arc<dyn EventSink>);
    let db = open_db(g, key)?;
    Ok(match (log, db) {
        (Some(l), Some(d)) => Some(Arc::new(FanOut(vec![l, d]))),
        (l, d) => l.or(d),
    })
}

/// The PostgreSQL trail of `--audit-db`, when one is configured.
#[cfg(feature = "postgres")]
fn open_db(g: &Global, key: Option<AuditKey>) -> Result<Option<Arc<dyn EventSink>>, CliError> {
    use phi_envelope::audit::postgres::PgAuditLog;
    let Some(url) = &g.audit_db else {
        return Ok(None);
    };
    let Some(key) = key else {
        return Err(CliError::new(
            exit::AUDIT,
            "the PostgreSQL audit trail is keyed: give it its audit key (the sealed key of `audit keygen`, or --audit-key-file FILE); no key was used".into(),
        ));
    };
    let log = PgAuditLog::builder()
        .audit_key(key)
        .open(url)
        .map_err(|e| CliError::new(exit::AUDIT, format!("{e}; no key was used")))?;
    Ok(Some(Arc::new(log)))
}

#[cfg(not(feature = "postgres"))]
fn open_db(g: &Global, _key: Option<AuditKey>) -> Result<Option<Arc<dyn EventSink>>, CliError> {
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
    if let Some(k) = crate::auditkey::for_verifier(g)? {
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
pub fn open_log(g: &Global, key: Option<AuditKey>) -> Result<Option<Arc<AuditLog>>, CliError> {
    let Some(path) = &g.audit_log else {
        return Ok(None);
    };
    // A torn last line can only be a run that died mid-append (the log's
    // lock excludes live writers while it is examined): cut it off and
    // record a `torn-tail` gap line rather than stop every later run.
    let mut b = AuditLog::builder().repair_torn_tail(true);
    if let Some(k) = key {
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
            unkeyed_only_if_asked(g, &target, &report, json)?;
            print_ok(&target, &report, json);
            Ok(())
        }
        Err(e) => Err(verify_failed(&target, e, json)),
    }
}

/// An unkeyed chain passes only with `--audit-unkeyed`: whoever can write
/// the log could have rewritten it as one (with the sealed key gone too),
/// so its checksum alone is no evidence unless that was the choice.
fn unkeyed_only_if_asked(
    g: &Global,
    target: &str,
    report: &VerifyReport,
    json: bool,
) -> Result<(), CliError> {
    if report.keyed || g.audit_unkeyed {
        return Ok(());
    }
    let why = format!(
        "audit log {target} is an unkeyed checksum chain: anyone able to rewrite the files could have \
         recomputed it, and no audit key was given to check it with; pass --audit-unkeyed to check it \
         as a checksum only, or the trail's key (--audit-key-sealed or --audit-key-file)"
    );
    if json {
        println!("{{\"ok\":false,\"error\":{}}}", json_str(&why));
    }
    Err(CliError::new(exit::INTEGRITY, why))
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
