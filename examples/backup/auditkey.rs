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
fn seal_ref(g: &Global) -> Result<KeyRef, CliError> {
    crate::connect::key_ref(g.audit_key_ref.as_deref().unwrap_or(DEFAULT_SEAL_KEY))
}

/// The sealed audit key's file, when it is sealed under `key` version
/// `version` (a destroy of that version would shred it).
pub fn sealed_under(g: &Global, key: &KeyRef, version: u32) -> Option<PathBuf> {
    let path = sealed_path(g).ok()?;
    let message = read_sealed(&path).ok()?;
    let info = phi_envelope::envelope::inspect(&message).ok()?;
    let want = key.to_string();
    info.header
        .recipients()
        .iter()
        .any(|r| r.key_ref == want && r.key_version == version)
        .then_some(path)
}

/// `key` is the audit sealing key (`--audit-key-ref`, default
/// `local:audit`).
pub fn is_audit_sealing_key(g: &Global, key: &KeyRef) -> Result<bool, CliError> {
    Ok(seal_ref(g)?.to_string() == key.to_string())
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
    Ok(BTreeSet::from([seal_ref(g)?.scheme().to_owned()]))
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
    read_regular(path, MAX_SEALED)
        .map(|z| z.to_vec())
        .map_err(|e| {
            CliError::new(
                exit::AUDIT,
                format!("cannot read the sealed key {}: {e}", path.display()),
            )
        })
}

/// Opens a regular file to read: not through a symbolic link (unless
/// `follow`), and without blocking (a FIFO or a device is refused, never
/// waited on).
fn open_regular(path: &Path, follow: bool) -> std::io::Result<(fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = rustix::fs::OFlags::NONBLOCK;
    if !follow {
        flags |= rustix::fs::OFlags::NOFOLLOW;
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((f, meta.len()))
}

/// The bytes of a regular file of at most `max` bytes (see
/// [`open_regular`]), read within the bound.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Zeroizing<Vec<u8>>> {
    read_bounded(path, max, false)
}

/// [`read_regular`], following a symbolic link when `follow` (a key file
/// mounted by an orchestrator is often one).
fn read_bounded(path: &Path, max: u64, follow: bool) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let too_big = || std::io::Error::other(format!("larger than {max} bytes"));
    let (f, len) = open_regular(path, follow)?;
    if len > max {
        return Err(too_big());
    }
    let mut out = Zeroizing::new(Vec::new());
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(too_big());
    }
    Ok(out)
}

/// The first line of a regular file, without its newline, if it has one
/// within 64 KiB.
fn first_line(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let (f, _) = open_regular(path, false)?;
    let mut line = Vec::new();
    BufReader::new(f.take(64 << 10)).read_until(b'\n', &mut line)?;
    Ok(line.strip_suffix(b"\n").map(<[u8]>::to_vec))
}

/// The raw audit key of `--audit-key-file`: 64+ hex digits, or 32+ bytes.
pub fn from_file(g: &Global) -> Result<Option<AuditKey>, CliError> {
    let Some(file) = &g.audit_key_file else {
        return Ok(None);
    };
    let bytes = read_bounded(file, 64 << 10, true).map_err(|e| {
        CliError::new(
            exit::AUDIT,
            format!("cannot read the audit key file {}: {e}", file.display()),
        )
    })?;
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

/// What a file log already is, as far as keying it goes.
enum LogState {
    /// No file, or only empty ones: a new log.
    New,
    /// Lines under the audit key of this id.
    Keyed(String),
    /// Lines under a bare checksum chain.
    Unkeyed,
}

/// Reads the log's first header. Anything that is not clearly a new log
/// or a readable header is refused: a new key is never made for a log
/// whose lines may be under another one.
fn log_state(log: &Path) -> Result<LogState, CliError> {
    let refuse = |why: String| {
        CliError::new(
            exit::AUDIT,
            format!(
                "{why}: cannot tell which audit key it is under, so no new one is made; verify it \
                 (backup audit verify), and start a new log under a new path if it is damaged; no key was used"
            ),
        )
    };
    let files = match phi_envelope::audit::log_files(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LogState::New),
        Err(e) => {
            return Err(refuse(format!(
                "cannot list the audit log {}: {e}",
                log.display()
            )))
        }
    };
    let first = match fs::symlink_metadata(log) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(refuse(format!("{}: {e}", log.display()))),
    };
    let first_empty = first.as_ref().is_none_or(|m| m.is_file() && m.len() == 0);
    if first_empty {
        let others: Vec<_> = files.iter().filter(|f| f.as_path() != log).collect();
        if others.is_empty() {
            return Ok(LogState::New);
        }
        return Err(refuse(format!(
            "the audit log {} has rotated files (such as {}) but its first file is missing or empty",
            log.display(),
            others[0].display()
        )));
    }
    let line = first_line(log).map_err(|e| refuse(format!("{}: {e}", log.display())))?;
    let header: Option<(String, Option<String>)> = line
        .and_then(|l| serde_json::from_slice::<serde_json::Value>(&l).ok())
        .and_then(|v| {
            (v.get("type")?.as_str()? == "header").then_some(())?;
            let mac = v.get("mac")?.as_str()?.to_owned();
            Some((
                mac,
                v.get("key_id").and_then(|k| k.as_str()).map(str::to_owned),
            ))
        });
    match header {
        Some((mac, _)) if mac == "sha256" => Ok(LogState::Unkeyed),
        Some((_, Some(id))) => Ok(LogState::Keyed(id)),
        _ => Err(refuse(format!(
            "the first line of the audit log {} is not an audit header",
            log.display()
        ))),
    }
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
        let (secret, events) =
            unseal(g, opened, caller, &path, SecretKind::AuditKey, Role::Writer)?;
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
    let memory = Arc::new(MemorySink::new());
    let keyring = Arc::new(
        opened
            .builder(Some(memory.clone() as Arc<dyn EventSink>))
            .build()?,
    );
    let key_ref = seal_ref(g)?;
    let (secret, message) = make_on(g, opened, &keyring, caller, &key_ref, SecretKind::AuditKey)?;
    let mut events = memory.take();
    let secret = match write_new(&path, &message) {
        Ok(()) => {
            if !g.quiet {
                eprintln!(
                    "backup: created the audit key (key id {}) sealed to {key_ref} at {}: keep it with the keystore; \
                     without it the log's chain cannot be verified with its key",
                    audit_key(&secret)?.key_id(),
                    path.display()
                );
            }
            secret
        }
        // Another first run made it meanwhile: use that one (this run's
        // key uses are recorded all the same).
        Err(_) if path.symlink_metadata().is_ok() => {
            let (theirs, more) =
                unseal(g, opened, caller, &path, SecretKind::AuditKey, Role::Writer)?;
            events.extend(more);
            theirs
        }
        Err(e) => return Err(e),
    };
    Ok((Some(audit_key(&secret)?), events))
}

/// A file log that already has lines was written with a key that is not
/// here (or with none), or cannot be read: never start a new key under
/// it. Nor for a log whose directory does not exist: the key would be made
/// for a log that cannot be.
fn refuse_existing_log(log: &Path, sealed: &Path) -> Result<(), CliError> {
    let dir = crate::streams::parent_dir(log);
    if !dir.is_dir() {
        return Err(CliError::new(
            exit::AUDIT,
            format!(
                "the audit log's directory {} does not exist; no key was used ({})",
                dir.display(),
                crate::AUDIT_LOG_SETTING
            ),
        ));
    }
    let why = match log_state(log)? {
        LogState::New => return Ok(()),
        LogState::Unkeyed => format!(
            "the audit log {} is an unkeyed checksum chain: pass --audit-unkeyed to go on with it as it is, \
             or start a keyed log under a new path",
            log.display()
        ),
        LogState::Keyed(key_id) => format!(
            "the audit log {} is keyed (key id {key_id}), but its sealed key is not at {}: pass \
             --audit-key-sealed FILE or --audit-key-file FILE with that key",
            log.display(),
            sealed.display()
        ),
    };
    Err(CliError::new(
        exit::AUDIT,
        format!("{why}; no key was used"),
    ))
}

fn audit_key(secret: &[u8; 32]) -> Result<AuditKey, CliError> {
    AuditKey::new(&secret[..]).map_err(CliError::from)
}

/// Who opens a sealed key: the wording of its errors.
#[derive(Clone, Copy, PartialEq)]
pub enum Role {
    /// A command about to write a trail: nothing used.
    Writer,
    /// A verifier or signer: nothing verified or signed.
    Reader,
}

impl Role {
    fn outcome(self) -> &'static str {
        match self {
            Role::Writer => "no key was used",
            Role::Reader => "nothing was verified or signed",
        }
    }
}

/// Opens the sealed secret at `path` through a keyring of `opened`'s
/// providers that records into memory. An audit key must be sealed to the
/// audit sealing key (`--audit-key-ref`, default `local:audit`): one
/// sealed to another key (anyone's backup key, say) is not taken as the
/// trail's key.
pub fn unseal(
    g: &Global,
    opened: &Opened,
    caller: &Caller,
    path: &Path,
    kind: SecretKind,
    role: Role,
) -> Result<(Zeroizing<[u8; 32]>, Vec<Event>), CliError> {
    let message = read_sealed(path)?;
    if kind == SecretKind::AuditKey {
        check_sealed_to(g, &message, path, role)?;
    }
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
                    "cannot open the sealed key {}: {e}{hint}; {}",
                    path.display(),
                    role.outcome()
                ),
            )
        })?;
    Ok((secret, memory.take()))
}

/// The sealed audit key names the audit sealing key among its recipients.
fn check_sealed_to(g: &Global, message: &[u8], path: &Path, role: Role) -> Result<(), CliError> {
    let want = seal_ref(g)?.to_string();
    let info = phi_envelope::envelope::inspect(message).map_err(|e| {
        CliError::new(
            exit::AUDIT,
            format!(
                "{} is not a sealed key: {e}; {}",
                path.display(),
                role.outcome()
            ),
        )
    })?;
    if info.header.recipients().iter().any(|r| r.key_ref == want) {
        return Ok(());
    }
    let names: Vec<&str> = info
        .header
        .recipients()
        .iter()
        .map(|r| r.key_ref.as_str())
        .collect();
    Err(CliError::new(
        exit::AUDIT,
        format!(
            "{} is sealed to {}, not to the audit sealing key {want}: if that key is the one to trust \
             for the trail's key, pass --audit-key-ref with it; {}",
            path.display(),
            names.join(", "),
            role.outcome()
        ),
    ))
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

/// Draws a new secret of `kind` and seals it to `key` through `keyring`
/// (whose event sink records the key uses), creating a missing local
/// sealing key in the keystore first. Returns the secret and the message.
pub fn make_on(
    g: &Global,
    opened_local: &Opened,
    keyring: &Arc<phi_envelope::Keyring>,
    caller: &Caller,
    key: &KeyRef,
    kind: SecretKind,
) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), CliError> {
    make_with(
        g,
        &opened_local.rt,
        opened_local.local.as_deref(),
        &opened_local.keystore_path,
        keyring,
        caller,
        key,
        kind,
    )
}

/// [`make_on`] from its parts (for a command that holds a `Keys`).
#[allow(clippy::too_many_arguments)]
pub fn make_with(
    g: &Global,
    rt: &tokio::runtime::Runtime,
    local: Option<&phi_envelope::provider::local::LocalKeystore>,
    keystore_path: &Path,
    keyring: &Arc<phi_envelope::Keyring>,
    caller: &Caller,
    key: &KeyRef,
    kind: SecretKind,
) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), CliError> {
    if key.scheme() == "local" {
        let Some(ks) = local else {
            return Err(CliError::new(
                exit::KEY,
                format!(
                    "{key} needs the keystore at {} (missing): restore it, or seal to another key with --audit-key-ref",
                    keystore_path.display()
                ),
            ));
        };
        if !ks.keys().iter().any(|k| &k.key_ref == key) {
            let manager = Caller::new(actor(caller), "key-management");
            match rt.block_on(keyring.create_key(key, &manager)) {
                Ok(info) if !g.quiet => eprintln!(
                    "backup: created key {} (version {}, enabled) to seal the trail's keys",
                    info.key_ref,
                    info.primary_version.unwrap_or(1)
                ),
                Ok(_) => {}
                // Made by a concurrent run meanwhile: seal to it.
                Err(_) if ks.keys().iter().any(|k| &k.key_ref == key) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let envelope = phi_envelope::Envelope::from_shared(keyring.clone())
        .as_caller(actor(caller), purpose(kind))
        .to_recipients([key.clone()]);
    rt.block_on(sealed::seal_new(&envelope, kind))
        .map_err(CliError::from)
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
    Ok(unseal(g, &opened, &caller, path, kind, Role::Reader)?.0)
}

/// `backup audit keygen [--out FILE]`: makes a trail's audit key, sealed
/// to `--audit-key-ref`, for the writers of a PostgreSQL trail (or a file
/// log to be). With a trail configured, its key uses go into that trail,
/// under the new key, before the file is written.
pub fn keygen(g: &Global, out: Option<&Path>) -> Result<(), CliError> {
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
    let key_ref = seal_ref(g)?;
    let schemes = BTreeSet::from([key_ref.scheme().to_owned()]);
    let opened = crate::connect::open_providers(g, &schemes, crate::connect::Local::Require)?;
    let caller = Caller::new(crate::connect::actor(g), "backup");
    let memory = Arc::new(MemorySink::new());
    let keyring = Arc::new(
        opened
            .builder(Some(memory.clone() as Arc<dyn EventSink>))
            .build()?,
    );
    let (secret, message) = make_on(
        g,
        &opened,
        &keyring,
        &caller,
        &key_ref,
        SecretKind::AuditKey,
    )?;
    let key = audit_key(&secret)?;
    if g.audit_log.is_some() || g.audit_db.is_some() {
        if let Some(log) = &g.audit_log {
            refuse_existing_log(log, &path)?;
        }
        if let Some(sink) = crate::audit::open_sink(g, Some(key.clone()))? {
            for event in memory.take() {
                sink.record(&event).map_err(|e| {
                    CliError::new(exit::AUDIT, format!("{e}; the key was not written"))
                })?;
            }
        }
    }
    write_new(&path, &message)?;
    println!(
        "audit key {} sealed to {key_ref} at {}: give each writer of the trail a copy (--audit-key-sealed), \
         and --audit-key-ref {key_ref}",
        key.key_id(),
        path.display()
    );
    Ok(())
}
