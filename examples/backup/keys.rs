//! Where the keys come from: the keystore path, the passphrase, the
//! providers, the keyring with its audit log; and the `keys` and `audit`
//! commands.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phi_envelope::audit::{AuditKey, AuditLog, Verifier};
use phi_envelope::provider::local::{LocalKeystore, SecretString};
use phi_envelope::provider::{KeyInfo, KeyState};
use phi_envelope::{Caller, Envelope, KeyProvider, KeyRef, Keyring};
use secrecy::ExposeSecret;

use crate::util::{json_str, rfc3339};
use crate::{exit, CliError, Global};

/// The environment variable holding the keystore passphrase.
pub const PASSPHRASE_ENV: &str = "PHI_ENVELOPE_PASSPHRASE";
/// The default key of `keys init` and `encrypt`.
pub const DEFAULT_KEY: &str = "local:backups";

/// The keystore file: `--keystore`, `PHI_ENVELOPE_KEYSTORE`, or
/// `$XDG_DATA_HOME/phi-envelope/keystore.json`
/// (`~/.local/share/phi-envelope/keystore.json`).
pub fn keystore_path(g: &Global) -> Result<PathBuf, CliError> {
    if let Some(p) = &g.keystore {
        return Ok(p.clone());
    }
    let base = match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() && Path::new(&d).is_absolute() => PathBuf::from(d),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h).join(".local/share"),
            _ => {
                return Err(CliError::usage(
                    "no keystore path: pass --keystore PATH or set PHI_ENVELOPE_KEYSTORE (HOME is not set)"
                        .into(),
                ))
            }
        },
    };
    Ok(base.join("phi-envelope").join("keystore.json"))
}

/// The passphrase: `--passphrase-file`, `PHI_ENVELOPE_PASSPHRASE`, or a
/// prompt on the terminal (asked twice when `confirm`). Never from the
/// command line.
pub fn passphrase(g: &Global, keystore: &Path, confirm: bool) -> Result<SecretString, CliError> {
    if let Some(file) = &g.passphrase_file {
        let bytes = zeroize::Zeroizing::new(fs::read(file).map_err(|e| {
            CliError::usage(format!(
                "cannot read the passphrase file {}: {e}",
                file.display()
            ))
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            CliError::usage(format!(
                "the passphrase file {} is not UTF-8",
                file.display()
            ))
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        if text.is_empty() {
            return Err(CliError::usage(format!(
                "the passphrase file {} is empty",
                file.display()
            )));
        }
        return Ok(SecretString::from(text.to_owned()));
    }
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        if !p.is_empty() {
            return Ok(SecretString::from(p));
        }
    }
    let no_tty = || {
        CliError::usage(format!(
            "the keystore {} needs its passphrase and there is no terminal to ask on: \
             set {PASSPHRASE_ENV} or pass --passphrase-file FILE",
            keystore.display()
        ))
    };
    if !io::stdin().is_terminal() && !io::stderr().is_terminal() {
        return Err(no_tty());
    }
    let prompt = if confirm {
        format!("New passphrase for keystore {}: ", keystore.display())
    } else {
        format!("Passphrase for keystore {}: ", keystore.display())
    };
    let first = rpassword::prompt_password(prompt).map_err(|_| no_tty())?;
    let first = SecretString::from(first);
    if first.expose_secret().is_empty() {
        return Err(CliError::usage("the passphrase must not be empty".into()));
    }
    if confirm {
        let again = SecretString::from(
            rpassword::prompt_password("Repeat the passphrase: ").map_err(|_| no_tty())?,
        );
        if again.expose_secret() != first.expose_secret() {
            return Err(CliError::usage(
                "the two passphrases differ; nothing was created, run the command again".into(),
            ));
        }
        if first.expose_secret().chars().count() < 12 {
            eprintln!(
                "backup: warning: a passphrase under 12 characters is weak for a keystore that protects PHI"
            );
        }
    }
    Ok(first)
}

/// An open keyring and what it was built from.
pub struct Keys {
    pub rt: tokio::runtime::Runtime,
    pub keyring: Arc<Keyring>,
    pub local: Option<Arc<LocalKeystore>>,
    pub keystore_path: PathBuf,
    pub caller: Caller,
}

impl Keys {
    /// An envelope acting for the operator with `purpose`.
    pub fn envelope(&self, purpose: &str) -> Envelope {
        Envelope::from_shared(self.keyring.clone()).as_caller(self.actor(), purpose)
    }

    /// The caller for key management.
    pub fn manager(&self, purpose: &str) -> Caller {
        Caller::new(self.actor(), purpose)
    }

    /// The operator's name: [`connect`] always sets one.
    fn actor(&self) -> String {
        self.caller.actor.clone().unwrap_or_default()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// What to do about the local keystore. Only `keys init` ever creates
/// one: a mistyped path must fail, not start a keystore (and a key) that
/// nobody will find again.
#[derive(Clone, Debug)]
pub enum Local {
    /// Open it; it must exist, except that a backup also wrapped to an
    /// HSM or KMS key is opened without it when it is missing (disaster
    /// recovery: decrypt, verify, rewrap).
    Open,
    /// Open it; it must exist (encrypt: every recipient must be usable).
    Require,
    /// `keys init`: open it, or create it with these keys if it does not
    /// exist.
    Init(Vec<KeyRef>),
}

/// The operator's name for events: `--actor` or `PHI_ENVELOPE_ACTOR`, else
/// the OS user running the process: its login name from the user database,
/// else `uid:N`. Never empty and never a placeholder such as "unknown": the
/// library refuses key management without an actor, and an audit trail
/// needs a name it can be held to. (`$USER` is not used: any process can
/// set it to anything.)
fn actor(g: &Global) -> String {
    if let Some(a) = g.actor.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        return a.to_owned();
    }
    let uid = rustix::process::getuid().as_raw();
    login_name(uid).unwrap_or_else(|| format!("uid:{uid}"))
}

/// The login name of `uid` in /etc/passwd (NAME:PASSWORD:UID:...), if any.
fn login_name(uid: u32) -> Option<String> {
    let db = fs::read_to_string("/etc/passwd").ok()?;
    db.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let id: u32 = f.next()?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(exit::IO, format!("cannot start the async runtime: {e}")))
}

/// Creates the keystore's directory (mode 0700) if needed.
fn make_keystore_dir(path: &Path) -> Result<(), CliError> {
    let dir = crate::util::parent_dir(path);
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| CliError::from_io(e, &dir))?;
    }
    Ok(())
}

/// Opens the providers for `schemes` (provider ids) and builds the keyring,
/// with the audit log as its event sink when one is configured.
/// The provider ids this build can use.
pub fn supported(scheme: &str) -> bool {
    scheme == "local"
        || (scheme == "pkcs11" && cfg!(feature = "pkcs11"))
        || (scheme == "aws-kms" && cfg!(feature = "aws-kms"))
        || (scheme == "vault-transit" && cfg!(feature = "vault"))
        || (scheme == "hpke-recovery" && cfg!(feature = "recovery"))
}

fn unsupported_hint(scheme: &str) -> String {
    match scheme {
        "pkcs11" | "aws-kms" | "vault-transit" | "hpke-recovery" => format!(
            "this build of backup has no {scheme} provider; build it with `cargo build --release --example backup --features {}`",
            match scheme { "vault-transit" => "vault", "hpke-recovery" => "recovery", s => s }
        ),
        other => format!(
            "no provider for {other:?} keys: backup knows local:NAME, pkcs11: URIs, aws-kms: and vault-transit: keys"
        ),
    }
}

pub fn connect(g: &Global, schemes: &BTreeSet<String>, local: Local) -> Result<Keys, CliError> {
    if !schemes.is_empty() && schemes.iter().all(|s| !supported(s)) {
        let list: Vec<&str> = schemes.iter().map(String::as_str).collect();
        return Err(CliError::new(
            exit::KEY,
            format!(
                "the backup is wrapped only to {} keys: {}",
                list.join(", "),
                unsupported_hint(list[0])
            ),
        ));
    }
    let rt = runtime()?;
    let path = keystore_path(g)?;
    let mut builder = Keyring::builder();
    let mut store = None;
    let mut created: Vec<KeyRef> = Vec::new();
    let exists = path.symlink_metadata().is_ok();
    // A backup also wrapped to an HSM or KMS key restores without the
    // local keystore (disaster recovery): only a missing keystore is
    // skipped, never one that fails to open.
    let others = schemes.iter().any(|s| s != "local" && supported(s));
    let want_local =
        schemes.contains("local") && (exists || !(matches!(local, Local::Open) && others));
    if want_local {
        let ks = match (&local, exists) {
            (_, true) => LocalKeystore::open(&path, passphrase(g, &path, false)?)?,
            (Local::Init(keys), false) => {
                make_keystore_dir(&path)?;
                let pass = passphrase(g, &path, true)?;
                let ks = LocalKeystore::create(&path, pass)?;
                if !g.quiet {
                    eprintln!(
                        "backup: created a new keystore at {} (keep it and its passphrase: without them the backups cannot be restored)",
                        path.display()
                    );
                }
                created = keys.iter().filter(|k| k.scheme() == "local").cloned().collect();
                ks
            }
            _ => {
                return Err(CliError::new(
                    exit::KEY,
                    format!(
                        "no keystore at {}; nothing was created: check --keystore or PHI_ENVELOPE_KEYSTORE \
                         (a typo?) and point it at the keystore that holds the keys, or create one with \
                         `backup keys init` (only `keys init` creates a keystore)",
                        path.display()
                    ),
                ))
            }
        };
        let ks = match &g.keystore_generation_file {
            Some(f) => ks.with_generation_file(f)?,
            None => ks,
        };
        let ks = Arc::new(ks);
        builder = builder.provider(ks.clone() as Arc<dyn KeyProvider>);
        store = Some(ks);
    }
    for scheme in schemes {
        match scheme.as_str() {
            "local" => {}
            #[cfg(feature = "pkcs11")]
            "pkcs11" => builder = builder.provider(crate::providers::pkcs11(&rt)?),
            #[cfg(feature = "aws-kms")]
            "aws-kms" => builder = builder.provider(crate::providers::aws_kms(&rt)?),
            #[cfg(feature = "vault")]
            "vault-transit" => builder = builder.provider(crate::providers::vault()?),
            #[cfg(feature = "recovery")]
            "hpke-recovery" => builder = builder.provider(crate::recovery::provider(g)?),
            _ => {} // reported per message as "no provider holds a key"
        }
    }
    if let Some(log) = open_audit_log(g)? {
        builder = builder.event_sink(log);
    }
    if let Some(dual) = crate::custodian::dual_control(g)? {
        builder = builder.dual_control(dual);
    }
    let keyring = Arc::new(builder.build()?);
    let keys = Keys {
        rt,
        keyring,
        local: store,
        keystore_path: path,
        caller: Caller::new(actor(g), "backup"),
    };
    let manager = keys.manager("key-management");
    for k in created {
        let info = keys.block_on(keys.keyring.create_key(&k, &manager))?;
        if !g.quiet {
            eprintln!(
                "backup: created key {} (version {}, enabled)",
                info.key_ref,
                info.primary_version.unwrap_or(1)
            );
        }
    }
    Ok(keys)
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

fn open_audit_log(g: &Global) -> Result<Option<Arc<AuditLog>>, CliError> {
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

/// Parses a key reference; `NAME` alone means `local:NAME`.
pub fn key_ref(text: &str) -> Result<KeyRef, CliError> {
    let full = if text.contains(':') {
        text.to_owned()
    } else {
        format!("local:{text}")
    };
    let k = KeyRef::parse(&full).map_err(CliError::from)?;
    if !supported(k.scheme()) {
        return Err(CliError::usage(format!(
            "{k}: {}",
            unsupported_hint(k.scheme())
        )));
    }
    Ok(k)
}

fn schemes_of<'a>(refs: impl IntoIterator<Item = &'a KeyRef>) -> BTreeSet<String> {
    refs.into_iter().map(|k| k.scheme().to_owned()).collect()
}

// ---------------------------------------------------------------------------
// `keys ...`

pub fn init(g: &Global, name: &str) -> Result<(), CliError> {
    let key = key_ref(name)?;
    if key.scheme() != "local" {
        return Err(CliError::usage(format!(
            "keys init creates a local keystore key; {key} is not local:NAME (use `keys create` for other providers)"
        )));
    }
    let path = keystore_path(g)?;
    let existed = path.symlink_metadata().is_ok();
    let keys = connect(g, &schemes_of([&key]), Local::Init(vec![key.clone()]))?;
    if existed {
        let store = keys.local.as_ref().expect("local keystore is open");
        if store.keys().iter().any(|k| k.key_ref == key) {
            return Err(CliError::usage(format!(
                "the keystore {} already has the key {key}; list it with `backup keys list`, \
                 or give another name with --name",
                path.display()
            )));
        }
        let info = keys.block_on(
            keys.keyring
                .create_key(&key, &keys.manager("key-management")),
        )?;
        println!("created key {} in {}", info.key_ref, path.display());
    } else {
        println!("created keystore {} with key {key}", path.display());
    }
    Ok(())
}

pub fn create(g: &Global, key: &str) -> Result<(), CliError> {
    let key = key_ref(key)?;
    let keys = connect(g, &schemes_of([&key]), Local::Open)?;
    let info = keys.block_on(
        keys.keyring
            .create_key(&key, &keys.manager("key-management")),
    )?;
    print_info(&info, false);
    Ok(())
}

pub fn list(g: &Global, json: bool) -> Result<(), CliError> {
    let keys = connect(g, &schemes_of([&key_ref(DEFAULT_KEY)?]), Local::Open)?;
    let store = keys.local.as_ref().expect("local keystore is open");
    let infos = store.keys();
    if json {
        let items: Vec<String> = infos.iter().map(info_json).collect();
        println!(
            "{{\"keystore\":{},\"keys\":[{}]}}",
            json_str(&keys.keystore_path.display().to_string()),
            items.join(",")
        );
        return Ok(());
    }
    println!("keystore {}", keys.keystore_path.display());
    if infos.is_empty() {
        println!(
            "  (no keys: create one with `backup keys init` or `backup keys create local:NAME`)"
        );
    }
    for info in &infos {
        print_info(info, true);
    }
    Ok(())
}

pub fn show(g: &Global, key: &str, json: bool) -> Result<(), CliError> {
    let key = key_ref(key)?;
    let keys = connect(g, &schemes_of([&key]), Local::Open)?;
    let info = keys.block_on(keys.keyring.describe(&key, &keys.manager("key-management")))?;
    if json {
        println!("{}", info_json(&info));
    } else {
        print_info(&info, false);
    }
    Ok(())
}

pub fn rotate(g: &Global, key: &str) -> Result<(), CliError> {
    let key = key_ref(key)?;
    let keys = connect(g, &schemes_of([&key]), Local::Open)?;
    let info = keys.block_on(keys.keyring.rotate(&key, &keys.manager("key-rotation")))?;
    println!(
        "rotated {}: version {} is now primary; older versions stay decrypt-only",
        info.key_ref,
        info.primary_version.map_or("?".into(), |v| v.to_string())
    );
    print_info(&info, false);
    Ok(())
}

pub fn set_state(
    g: &Global,
    key: &str,
    version: u32,
    state: KeyState,
    approval_files: &[PathBuf],
) -> Result<(), CliError> {
    let key = key_ref(key)?;
    let approvals = crate::custodian::read_approvals(approval_files)?;
    let keys = connect(g, &schemes_of([&key]), Local::Open)?;
    let info = keys.block_on(keys.keyring.set_state_approved(
        &key,
        version,
        state,
        &keys.manager("key-management"),
        &approvals,
    ))?;
    println!("{key} version {version} is now {state}");
    print_info(&info, false);
    Ok(())
}

pub fn destroy(
    g: &Global,
    key: &str,
    version: u32,
    yes: bool,
    approval_files: &[PathBuf],
) -> Result<(), CliError> {
    let key = key_ref(key)?;
    let approvals = crate::custodian::read_approvals(approval_files)?;
    let terminal = io::stdin().is_terminal() && io::stderr().is_terminal();
    if !yes && !terminal {
        // A script, a cron job, a pipe: nobody can confirm, and silence
        // is not consent to crypto-shredding.
        return Err(CliError::usage(format!(
            "refusing to destroy {key} version {version} without confirmation: there is no terminal to ask on; \
             add --yes to destroy it from a script (nothing was destroyed)"
        )));
    }
    if !yes {
        eprint!(
            "Destroying {key} version {version} makes every backup wrapped only under it unreadable, \
             for good.\nType the key reference to confirm: "
        );
        let _ = io::stderr().flush();
        let mut line = String::new();
        io::stdin()
            .read_line(&mut line)
            .map_err(|e| CliError::usage(format!("no confirmation: {e}")))?;
        if line.trim() != key.as_str() {
            return Err(CliError::usage(
                "not confirmed; nothing was destroyed".into(),
            ));
        }
    }
    let keys = connect(g, &schemes_of([&key]), Local::Open)?;
    let info = keys.block_on(keys.keyring.destroy_approved(
        &key,
        version,
        &keys.manager("key-destruction"),
        &approvals,
    ))?;
    println!("{key} version {version} is destroyed: backups wrapped only under it can no longer be decrypted");
    print_info(&info, false);
    println!("note: {}", copies_note(&key, version, &keys.keystore_path));
    Ok(())
}

/// What `destroy` cannot reach: the copies of the key that outlive it
/// (docs/KEY-LIFECYCLE.md, 5.5).
fn copies_note(key: &KeyRef, version: u32, keystore: &Path) -> String {
    match key.scheme() {
        "local" => format!(
            "copies of the keystore file made before now (backups of {}, snapshots, replicas) still hold \
             {key} version {version}: crypto-shredding is complete only once they are destroyed too",
            keystore.display()
        ),
        "pkcs11" => format!(
            "the HSM's backups, replicas and cloned partitions may still hold {key} version {version}: \
             destroy it there too (vendor procedure)"
        ),
        "aws-kms" => format!(
            "KMS deletes {key} only when its waiting period ends; until then an administrator can cancel \
             the deletion (CancelKeyDeletion) and the key material still exists"
        ),
        _ => format!("copies of {key} version {version} held elsewhere are not destroyed by this command"),
    }
}

fn print_info(info: &KeyInfo, indent: bool) {
    let pad = if indent { "  " } else { "" };
    println!("{pad}{}", info.key_ref);
    for v in &info.versions {
        let primary = if Some(v.version) == info.primary_version {
            " (primary)"
        } else {
            ""
        };
        let created = v.created_at.map(rfc3339).unwrap_or_else(|| "-".into());
        println!(
            "{pad}  v{:<4} {:<13} created {created}{primary}",
            v.version,
            v.state.as_str()
        );
    }
}

fn info_json(info: &KeyInfo) -> String {
    let versions: Vec<String> = info
        .versions
        .iter()
        .map(|v| {
            format!(
                "{{\"version\":{},\"state\":{},\"created_at\":{},\"primary\":{}}}",
                v.version,
                json_str(v.state.as_str()),
                v.created_at
                    .map(|t| json_str(&rfc3339(t)))
                    .unwrap_or_else(|| "null".into()),
                Some(v.version) == info.primary_version
            )
        })
        .collect();
    format!(
        "{{\"ref\":{},\"primary_version\":{},\"versions\":[{}]}}",
        json_str(info.key_ref.as_str()),
        info.primary_version
            .map_or("null".into(), |v| v.to_string()),
        versions.join(",")
    )
}

// ---------------------------------------------------------------------------
// `keys passwd`

/// The environment variable holding the new passphrase of `keys passwd`.
pub const NEW_PASSPHRASE_ENV: &str = "PHI_ENVELOPE_NEW_PASSPHRASE";

/// The new passphrase: `--new-passphrase-file` (the rules of
/// `--passphrase-file`: UTF-8, one trailing `\n` or `\r\n` removed, nothing
/// else changed), `PHI_ENVELOPE_NEW_PASSPHRASE`, or a prompt asked twice.
fn new_passphrase(file: Option<&Path>, keystore: &Path) -> Result<SecretString, CliError> {
    if let Some(file) = file {
        let bytes = zeroize::Zeroizing::new(fs::read(file).map_err(|e| {
            CliError::usage(format!(
                "cannot read the new passphrase file {}: {e}",
                file.display()
            ))
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            CliError::usage(format!(
                "the new passphrase file {} is not UTF-8",
                file.display()
            ))
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        if text.is_empty() {
            return Err(CliError::usage(format!(
                "the new passphrase file {} is empty",
                file.display()
            )));
        }
        return Ok(SecretString::from(text.to_owned()));
    }
    if let Ok(p) = std::env::var(NEW_PASSPHRASE_ENV) {
        if !p.is_empty() {
            return Ok(SecretString::from(p));
        }
    }
    let no_tty = || {
        CliError::usage(format!(
            "keys passwd needs the new passphrase and there is no terminal to ask on: \
             set {NEW_PASSPHRASE_ENV} or pass --new-passphrase-file FILE"
        ))
    };
    if !io::stdin().is_terminal() && !io::stderr().is_terminal() {
        return Err(no_tty());
    }
    let first = SecretString::from(
        rpassword::prompt_password(format!(
            "New passphrase for keystore {}: ",
            keystore.display()
        ))
        .map_err(|_| no_tty())?,
    );
    let again = SecretString::from(
        rpassword::prompt_password("Repeat the new passphrase: ").map_err(|_| no_tty())?,
    );
    if first.expose_secret().is_empty() {
        return Err(CliError::usage("the passphrase must not be empty".into()));
    }
    if again.expose_secret() != first.expose_secret() {
        return Err(CliError::usage(
            "the two passphrases differ; the passphrase was not changed".into(),
        ));
    }
    Ok(first)
}

/// The Argon2id parameters asked for: each one given, else the larger of
/// the keystore's current value and the default (RFC 9106, 64 MiB, t=3,
/// p=4), so that `keys passwd` never weakens the KDF unasked.
pub struct KdfArgs {
    pub memory_mib: Option<u32>,
    pub passes: Option<u32>,
    pub lanes: Option<u32>,
}

/// `keys passwd`: a new passphrase (and Argon2id parameters) for the local
/// keystore, atomically; the keys do not change.
pub fn passwd(g: &Global, new_file: Option<&Path>, kdf: &KdfArgs) -> Result<(), CliError> {
    use phi_envelope::provider::local::Argon2idParams;
    let keys = connect(g, &schemes_of([&key_ref(DEFAULT_KEY)?]), Local::Open)?;
    let store = keys.local.as_ref().expect("local keystore is open");
    let current = store.kdf_params().ok_or_else(|| {
        CliError::usage("the keystore is unprotected (tests only): it has no passphrase".into())
    })?;
    let default = Argon2idParams::RFC_9106_SECOND;
    let m_kib = match kdf.memory_mib {
        Some(mib) => mib
            .checked_mul(1024)
            .ok_or_else(|| CliError::usage(format!("--kdf-memory-mib {mib} is too large")))?,
        None => current.m_kib.max(default.m_kib),
    };
    let params = Argon2idParams::new(
        m_kib,
        kdf.passes.unwrap_or(current.t.max(default.t)),
        kdf.lanes.unwrap_or(current.p.max(default.p)),
    )
    .map_err(CliError::from)?;
    let new = new_passphrase(new_file, &keys.keystore_path)?;
    store.change_passphrase(new, params)?;
    println!(
        "changed the passphrase of keystore {} (argon2id m={} MiB, t={}, p={}); its keys are unchanged.",
        keys.keystore_path.display(),
        params.m_kib / 1024,
        params.t,
        params.p
    );
    println!(
        "Copies of the keystore made before still open with the OLD passphrase: replace or destroy them \
         (and keep the old passphrase as long as you keep such a copy)."
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// `audit verify LOG`

pub fn audit_verify(
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
