//! Opening the keys: the keystore's path, the providers a command needs
//! (the local keystore, and the HSM, KMS, Transit and recovery providers
//! of builds with them), the keyring with its audit log and dual control,
//! the operator's name, and key references.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phi_envelope::events::EventSink;
use phi_envelope::keyring::KeyringBuilder;
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::{Caller, Envelope, KeyProvider, KeyRef, Keyring};

use crate::passphrase::passphrase;
use crate::{exit, CliError, Global};

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
pub fn actor(g: &Global) -> String {
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
    let dir = crate::streams::parent_dir(path);
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| CliError::from_io(e, &dir))?;
    }
    Ok(())
}

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

/// The providers a command opened, before any keyring is built from them.
pub struct Opened {
    pub rt: tokio::runtime::Runtime,
    pub providers: Vec<Arc<dyn KeyProvider>>,
    pub local: Option<Arc<LocalKeystore>>,
    pub keystore_path: PathBuf,
    /// `keys init`: the local keys to create once the keyring exists.
    created: Vec<KeyRef>,
}

impl Opened {
    /// A keyring builder over these providers, with `sink` as its event
    /// sink.
    pub fn builder(&self, sink: Option<Arc<dyn EventSink>>) -> KeyringBuilder {
        let mut builder = Keyring::builder();
        for p in &self.providers {
            builder = builder.provider(p.clone());
        }
        match sink {
            Some(sink) => builder.event_sink(sink),
            None => builder,
        }
    }
}

/// Opens the providers for `schemes` (provider ids) and builds the keyring,
/// with the audit trail as its event sink when one is configured (and the
/// providers that unseal its audit key, when the chain is keyed with a
/// sealed key: see `auditkey`).
pub fn connect(g: &Global, schemes: &BTreeSet<String>, local: Local) -> Result<Keys, CliError> {
    let audit_schemes = crate::auditkey::writer_schemes(g)?;
    let mut all = schemes.clone();
    all.extend(audit_schemes.iter().cloned());
    let local = match local {
        // The audit key is sealed to a local key only: the keystore must
        // open, though the command itself could go on without it.
        Local::Open if audit_schemes.len() == 1 && audit_schemes.contains("local") => {
            let path = keystore_path(g)?;
            if path.symlink_metadata().is_err() {
                return Err(CliError::new(
                    exit::KEY,
                    format!(
                        "the audit trail's key is sealed to a keystore key, and there is no keystore at {}: \
                         this command could go on without it, its audit trail cannot. Pass --audit-key-file FILE \
                         (the raw audit key, recovered from a copy of the keystore), or for this run \
                         --audit-unkeyed with a new --audit-log path (docs/AUDIT-KEYS.md, \"Disaster recovery\"); \
                         no key was used",
                        path.display()
                    ),
                ));
            }
            Local::Require
        }
        l => l,
    };
    let opened = open_providers(g, &all, local)?;
    let caller = Caller::new(actor(g), "backup");
    let (audit_key, bootstrap_events) = crate::auditkey::for_writer(g, &opened, &caller)?;
    let sink = crate::audit::open_sink(g, audit_key)?;
    if let Some(sink) = &sink {
        // What unsealing (or making) the audit key did goes into the trail
        // it keys, first: no key use is left out of it.
        for event in &bootstrap_events {
            sink.record(event).map_err(|e| {
                CliError::new(exit::AUDIT, format!("{e}; no key was used for the command"))
            })?;
        }
    }
    let sink = crate::monitor::live_sink(g, sink)?;
    let mut builder = opened.builder(sink);
    if let Some(dual) = crate::custodian::dual_control(g)? {
        builder = builder.dual_control(dual);
    }
    let keyring = Arc::new(builder.build()?);
    let Opened {
        rt,
        local: store,
        keystore_path,
        created,
        ..
    } = opened;
    let keys = Keys {
        rt,
        keyring,
        local: store,
        keystore_path,
        caller,
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

/// Opens the local keystore (as `local` says) and the providers of
/// `schemes`.
pub fn open_providers(
    g: &Global,
    schemes: &BTreeSet<String>,
    local: Local,
) -> Result<Opened, CliError> {
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
    let mut providers: Vec<Arc<dyn KeyProvider>> = Vec::new();
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
        providers.push(ks.clone() as Arc<dyn KeyProvider>);
        store = Some(ks);
    }
    for scheme in schemes {
        match scheme.as_str() {
            "local" => {}
            #[cfg(feature = "pkcs11")]
            "pkcs11" => providers.push(crate::providers::pkcs11(&rt)?),
            #[cfg(feature = "aws-kms")]
            "aws-kms" => providers.push(crate::providers::aws_kms(&rt)?),
            #[cfg(feature = "vault")]
            "vault-transit" => providers.push(crate::providers::vault()?),
            #[cfg(feature = "recovery")]
            "hpke-recovery" => providers.push(crate::recovery::provider(g)?),
            _ => {} // reported per message as "no provider holds a key"
        }
    }
    Ok(Opened {
        rt,
        providers,
        local: store,
        keystore_path: path,
        created,
    })
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

pub fn schemes_of<'a>(refs: impl IntoIterator<Item = &'a KeyRef>) -> BTreeSet<String> {
    refs.into_iter().map(|k| k.scheme().to_owned()).collect()
}
