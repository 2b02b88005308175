//! The audit key of the CLI's trails. The chain is keyed by default: with
//! `--audit-key-file` (the raw key), else with the sealed audit key (a
//! phi-envelope message holding the key, sealed to `--audit-key-ref`,
//! `local:audit` by default, and kept beside the keystore as
//! `audit-key.phienv`). A new file log makes its sealed key on first use;
//! a PostgreSQL trail, shared by a fleet, takes one made by `audit keygen`
//! and copied to every writer. A bare checksum chain is only written when
//! asked (`--audit-unkeyed`). docs/AUDIT-KEYS.md has the design.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phi_envelope::audit::sealed::{self, SecretKind};
use phi_envelope::audit::AuditKey;
use phi_envelope::events::{Event, EventSink, MemorySink};
use phi_envelope::{Caller, Envelope, KeyRef};
use zeroize::Zeroizing;

use crate::connect::{keystore_path, Opened};
use crate::{exit, CliError, Global};

/// The default key that seals a new audit key.
pub const DEFAULT_SEAL_KEY: &str = "local:audit";

/// The largest sealed secret file read (a 32-byte secret sealed to a few
/// recipients is well under 4 KiB).
const MAX_SEALED: u64 = 64 << 10;

/// The sealed audit key's file: `--audit-key-sealed`, else
/// `audit-key.phienv` in the keystore's directory.
pub fn sealed_path(g: &Global) -> Result<PathBuf, CliError> {
    if let Some(p) = &g.audit_key_sealed {
        return Ok(p.clone());
    }
    Ok(crate::streams::parent_dir(&keystore_path(g)?).join("audit-key.phienv"))
}

/// The key that seals a new audit key (`--audit-key-ref`).
fn seal_ref(g: &Global, explicit: Option<&str>) -> Result<KeyRef, CliError> {
    let text = explicit
        .or(g.audit_key_ref.as_deref())
        .unwrap_or(DEFAULT_SEAL_KEY);
    crate::connect::key_ref(text)
}

/// A trail is configured and keyed by a sealed key (not a key file, not
/// `--audit-unkeyed`).
fn sealed_in_use(g: &Global) -> bool {
    (g.audit_log.is_some() || g.audit_db.is_some())
        && g.audit_key_file.is_none()
        && !g.audit_unkeyed
}

/// The provider ids a writer needs to open (or make) the sealed audit key:
/// those of the sealed file's recipients, or of the sealing key when the
/// file is to be made. Empty when no sealed key is in use.
pub fn writer_schemes(g: &Global) -> Result<BTreeSet<String>, CliError> {
    if !sealed_in_use(g) {
        return Ok(BTreeSet::new());
    }
    let path = sealed_path(g)?;
    if path.symlink_metadata().is_ok() {
        return recipients_schemes(&read_sealed(&path)?, &path);
    }
    Ok(BTreeSet::from([seal_ref(g, None)?.scheme().to_owned()]))
}

fn recipients_schemes(message: &[u8], path: &Path) -> Result<BTreeSet<String>, CliError> {
    let info = phi_envelope::envelope::inspect(message).map_err(|e| {
        CliError::new(
            exit::AUDIT,
            format!(
                "{} is not a sealed key (a phi-envelope message): {e}",
                path.display()
            ),
        )
    })?;
    Ok(info
        .header
        .recipients()
        .iter()
        .map(|r| r.provider.clone())
        .collect())
}

/// Reads a sealed secret file: a regular file, not followed through a
/// symbolic link, at most 64 KiB.
pub fn read_sealed(path: &Path) -> Result<Vec<u8>, CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| {
        CliError::new(
            exit::AUDIT,
            format!("cannot read the sealed key {}: {e}", path.display()),
        )
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_nofollow())
        .open(path)
        .map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    if !meta.is_file() || meta.len() > MAX_SEALED {
        return Err(CliError::new(
            exit::AUDIT,
            format!(
                "{} is not a sealed key (not a regular file of at most 64 KiB)",
                path.display()
            ),
        ));
    }
    let mut out = Vec::new();
    f.take(MAX_SEALED).read_to_end(&mut out).map_err(err)?;
    Ok(out)
}

fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The raw audit key of `--audit-key-file`: 64+ hex digits, or 32+ bytes.
pub fn from_file(g: &Global) -> Result<Option<AuditKey>, CliError> {
    let Some(file) = &g.audit_key_file else {
        return Ok(None);
    };
    let bytes = Zeroizing::new(fs::read(file).map_err(|e| {
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
        let raw: Zeroizing<Vec<u8>> = Zeroizing::new(
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

/// The `mac` and `key_id` of a file log's first line, if it has one.
fn log_header(path: &Path) -> Option<(String, Option<String>)> {
    let f = fs::File::open(path).ok()?;
    let mut line = Vec::new();
    BufReader::new(f.take(64 << 10))
        .read_until(b'\n', &mut line)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(line.strip_suffix(b"\n")?).ok()?;
    let mac = v.get("mac")?.as_str()?.to_owned();
    let key_id = v.get("key_id").and_then(|k| k.as_str()).map(str::to_owned);
    Some((mac, key_id))
}

/// The writer's audit key, and the events of the key uses that unsealing
/// (or making) it took, for the caller to record in the trail first.
pub fn for_writer(
    g: &Global,
    opened: &Opened,
    caller: &Caller,
) -> Result<(Option<AuditKey>, Vec<Event>), CliError> {
    if g.audit_log.is_none() && g.audit_db.is_none() {
        return Ok((None, Vec::new()));
    }
    if let Some(k) = from_file(g)? {
        return Ok((Some(k), Vec::new()));
    }
    if g.audit_unkeyed {
        if g.audit_db.is_some() {
            return Err(CliError::new(
                exit::USAGE,
                "the PostgreSQL audit trail is always keyed: drop --audit-unkeyed".into(),
            ));
        }
        return Ok((None, Vec::new()));
    }
    let path = sealed_path(g)?;
    if path.symlink_metadata().is_ok() {
        let (secret, events) = unseal(opened, caller, &path, SecretKind::AuditKey)?;
        return Ok((Some(audit_key(&secret)?), events));
    }
    if g.audit_db.is_some() {
        return Err(CliError::new(
            exit::AUDIT,
            format!(
                "no sealed audit key at {}: the PostgreSQL trail's writers share one key; make it once with \
                 `backup audit keygen --out FILE` and give each writer a copy (--audit-key-sealed FILE), \
                 or pass --audit-key-file FILE (docs/AUDIT-KEYS.md); no key was used",
                path.display()
            ),
        ));
    }
    if let Some(log) = &g.audit_log {
        refuse_existing_log(log, &path)?;
    }
    let (secret, message, events) = make(g, opened, caller, None, SecretKind::AuditKey)?;
    let key = audit_key(&secret)?;
    write_new(&path, &message)?;
    if !g.quiet {
        eprintln!(
            "backup: created the audit key (key id {}) sealed to {} at {}: keep it with the keystore; \
             without it the log's chain cannot be verified with its key",
            key.key_id(),
            seal_ref(g, None)?,
            path.display()
        );
    }
    Ok((Some(key), events))
}

/// A file log that already has lines was written with a key that is not
/// here (or with none): never start a new key under it.
fn refuse_existing_log(log: &Path, sealed: &Path) -> Result<(), CliError> {
    let Some((mac, key_id)) = log_header(log) else {
        return Ok(()); // missing or empty: a new log
    };
    let why = if mac == "sha256" {
        format!(
            "the audit log {} is an unkeyed checksum chain: pass --audit-unkeyed to go on with it as it is, \
             or start a keyed log under a new path",
            log.display()
        )
    } else {
        format!(
            "the audit log {} is keyed (key id {}), but its sealed key is not at {}: pass \
             --audit-key-sealed FILE or --audit-key-file FILE with that key",
            log.display(),
            key_id.unwrap_or_else(|| "?".into()),
            sealed.display()
        )
    };
    Err(CliError::new(
        exit::AUDIT,
        format!("{why}; no key was used"),
    ))
}

fn audit_key(secret: &[u8; 32]) -> Result<AuditKey, CliError> {
    AuditKey::new(&secret[..]).map_err(CliError::from)
}

/// Opens the sealed secret at `path` through a keyring of `opened`'s
/// providers that records into memory.
pub fn unseal(
    opened: &Opened,
    caller: &Caller,
    path: &Path,
    kind: SecretKind,
) -> Result<(Zeroizing<[u8; 32]>, Vec<Event>), CliError> {
    let message = read_sealed(path)?;
    let memory = Arc::new(MemorySink::new());
    let keyring = opened
        .builder(Some(memory.clone() as Arc<dyn EventSink>))
        .build()?;
    let envelope = Envelope::new(keyring).as_caller(actor(caller), purpose(kind));
    let secret = opened
        .rt
        .block_on(sealed::unseal(&envelope, kind, &message))
        .map_err(|e| {
            let hint = match e {
                phi_envelope::Error::NoMatchingKey(_) => {
                    " (its key is not here: a local key needs the keystore that sealed it)"
                }
                phi_envelope::Error::Decrypt => {
                    " (sealed under another keystore's key, or not this kind of secret)"
                }
                _ => "",
            };
            CliError::new(
                exit::AUDIT,
                format!(
                    "cannot open the sealed key {}: {e}{hint}; no key was used",
                    path.display()
                ),
            )
        })?;
    Ok((secret, memory.take()))
}

fn actor(caller: &Caller) -> String {
    caller.actor.clone().unwrap_or_default()
}

fn purpose(kind: SecretKind) -> &'static str {
    match kind {
        SecretKind::AuditKey => "audit-key",
        _ => "checkpoint-key",
    }
}

/// A new sealed secret: the secret, its message, and the events of the
/// key uses that made it.
pub type Made = (Zeroizing<[u8; 32]>, Vec<u8>, Vec<Event>);

/// Draws a new secret of `kind` and seals it to `seal_to` (else
/// `--audit-key-ref`, else `local:audit`), creating a missing local
/// sealing key in the keystore. Returns the secret, the message and the
/// events of the key uses.
pub fn make(
    g: &Global,
    opened: &Opened,
    caller: &Caller,
    seal_to: Option<&str>,
    kind: SecretKind,
) -> Result<Made, CliError> {
    let key = seal_ref(g, seal_to)?;
    let memory = Arc::new(MemorySink::new());
    let keyring = opened
        .builder(Some(memory.clone() as Arc<dyn EventSink>))
        .build()?;
    if key.scheme() == "local" {
        let Some(ks) = &opened.local else {
            return Err(CliError::new(
                exit::KEY,
                format!(
                    "{key} needs the keystore at {} (missing): restore it, or seal to another key with --audit-key-ref",
                    opened.keystore_path.display()
                ),
            ));
        };
        if !ks.keys().iter().any(|k| k.key_ref == key) {
            let manager = Caller::new(actor(caller), "key-management");
            let info = opened.rt.block_on(keyring.create_key(&key, &manager))?;
            if !g.quiet {
                eprintln!(
                    "backup: created key {} (version {}, enabled) to seal the trail's keys",
                    info.key_ref,
                    info.primary_version.unwrap_or(1)
                );
            }
        }
    }
    let envelope = Envelope::new(keyring)
        .as_caller(actor(caller), purpose(kind))
        .to_recipients([key]);
    let (secret, message) = opened
        .rt
        .block_on(sealed::seal_new(&envelope, kind))
        .map_err(CliError::from)?;
    Ok((secret, message, memory.take()))
}

/// Writes a new sealed file: complete or not at all, never over an
/// existing one.
pub fn write_new(path: &Path, message: &[u8]) -> Result<(), CliError> {
    use std::io::Write;
    let fail = |e: phi_envelope::Error| {
        CliError::new(
            exit::AUDIT,
            format!(
                "cannot write the sealed key {} (never overwritten): {e}",
                path.display()
            ),
        )
    };
    let mut f = phi_envelope::atomic::AtomicFile::create(path, false).map_err(fail)?;
    f.write_all(message)
        .map_err(|e| fail(phi_envelope::Error::Io(e)))?;
    f.commit().map_err(fail)
}

/// The verifier's audit key: `--audit-key-file`, else (unless
/// `--audit-unkeyed`) the sealed audit key when there is one, opened with
/// the providers its recipients need. Never chosen from what the trail
/// says of itself: a log rewritten as an unkeyed chain by someone without
/// the key must fail, not pass as a checksum. Unsealing to verify is not
/// recorded in any trail (the verifier reads the trail; it does not write
/// it).
pub fn for_verifier(g: &Global) -> Result<Option<AuditKey>, CliError> {
    if let Some(k) = from_file(g)? {
        return Ok(Some(k));
    }
    if g.audit_unkeyed {
        return Ok(None);
    }
    let path = sealed_path(g)?;
    if path.symlink_metadata().is_err() {
        return Ok(None); // the verifier then says a keyed trail needs its key
    }
    let secret = open_sealed(g, &path, SecretKind::AuditKey)?;
    Ok(Some(audit_key(&secret)?))
}

/// Opens the sealed secret at `path` with the providers its recipients
/// need, outside any trail (for verifying and for signing checkpoints,
/// which read a trail and do not write it).
pub fn open_sealed(
    g: &Global,
    path: &Path,
    kind: SecretKind,
) -> Result<Zeroizing<[u8; 32]>, CliError> {
    let schemes = recipients_schemes(&read_sealed(path)?, path)?;
    let local = if schemes.contains("local") {
        crate::connect::Local::Require
    } else {
        crate::connect::Local::Open
    };
    let opened = crate::connect::open_providers(g, &schemes, local)?;
    let caller = Caller::new(crate::connect::actor(g), "audit");
    Ok(unseal(&opened, &caller, path, kind)?.0)
}

/// `backup audit keygen [--seal-to REF] [--out FILE]`: makes a trail's
/// audit key, sealed, for the writers of a PostgreSQL trail (or a file log
/// to be). Its key uses go into the configured trail when there is one.
pub fn keygen(g: &Global, seal_to: Option<&str>, out: Option<&Path>) -> Result<(), CliError> {
    let path = match out {
        Some(p) => p.to_path_buf(),
        None => sealed_path(g)?,
    };
    if path.symlink_metadata().is_ok() {
        return Err(CliError::new(
            exit::IO,
            format!(
                "{} exists and is never overwritten: every trail keyed with it needs it",
                path.display()
            ),
        ));
    }
    let schemes = BTreeSet::from([seal_ref(g, seal_to)?.scheme().to_owned()]);
    let opened = crate::connect::open_providers(g, &schemes, crate::connect::Local::Require)?;
    let caller = Caller::new(crate::connect::actor(g), "backup");
    let (secret, message, events) = make(g, &opened, &caller, seal_to, SecretKind::AuditKey)?;
    let key = audit_key(&secret)?;
    // A configured trail is opened with the new key before anything is
    // written: one keyed with another key refuses it, and the key uses
    // that made it are the trail's first record.
    let sink = if g.audit_log.is_some() || g.audit_db.is_some() {
        crate::audit::open_sink(g, Some(key.clone()))?
    } else {
        None
    };
    write_new(&path, &message)?;
    if let Some(sink) = sink {
        for event in &events {
            sink.record(event)
                .map_err(|e| CliError::new(exit::AUDIT, e.to_string()))?;
        }
    }
    println!(
        "audit key {} sealed to {} at {}: give each writer of the trail a copy (--audit-key-sealed)",
        key.key_id(),
        seal_ref(g, seal_to)?,
        path.display()
    );
    Ok(())
}
