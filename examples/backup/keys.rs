//! The `keys` commands, their grammar and what they do: init, list,
//! create, show, rotate, disable, enable, decrypt-only, destroy, approve
//! (dual control, in `custodian`) and passwd.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use phi_envelope::provider::{KeyInfo, KeyState};
use phi_envelope::KeyRef;

use crate::connect::{connect, key_ref, keystore_path, schemes_of, Local, DEFAULT_KEY};
use crate::output::{json_str, rfc3339};
use crate::passphrase::new_passphrase;
use crate::{CliError, Global};

// The grammar of `backup keys ...` (docs/CLI.md).
#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create the keystore (asking for a new passphrase) and a first key
    Init {
        /// The key's name: local:NAME
        #[arg(long, default_value = "backups", value_name = "NAME")]
        name: String,
    },
    /// List the keystore's keys, versions, states and creation times
    List {
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Create another key (local:NAME, or an HSM/KMS key)
    Create {
        #[arg(value_name = "REF")]
        key: String,
    },
    /// Show one key's versions (any provider)
    Show {
        #[arg(value_name = "REF")]
        key: String,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Make a new version primary; older versions stay decrypt-only
    Rotate {
        #[arg(value_name = "REF")]
        key: String,
    },
    /// Disable a version: backups under it cannot be decrypted until it is
    /// enabled again
    Disable(GuardedVersion),
    /// Enable a version again (it becomes primary)
    Enable(GuardedVersion),
    /// Make a version decrypt-only
    DecryptOnly(GuardedVersion),
    /// Destroy a version for good: every backup wrapped only under it
    /// becomes unreadable (crypto-shredding)
    Destroy {
        #[arg(value_name = "REF")]
        key: String,
        #[arg(long, value_name = "N")]
        version: u32,
        /// Do not ask for confirmation on the terminal
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        approvals: crate::custodian::Approvals,
    },
    /// Sign a custodian's approval of one destroy, disable, enable or
    /// decrypt-only of one key version (dual control)
    Approve(crate::custodian::ApproveCmd),
    /// Change the keystore's passphrase (and raise its Argon2id
    /// parameters), atomically; the keys do not change
    Passwd {
        /// Read the new passphrase from this file (else
        /// PHI_ENVELOPE_NEW_PASSPHRASE, else a prompt asked twice)
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Argon2id memory in MiB (default: the current value, at least 64)
        #[arg(long, value_name = "MIB")]
        kdf_memory_mib: Option<u32>,
        /// Argon2id passes (default: the current value, at least 3)
        #[arg(long, value_name = "N")]
        kdf_passes: Option<u32>,
        /// Argon2id lanes (default: the current value, at least 4)
        #[arg(long, value_name = "N")]
        kdf_lanes: Option<u32>,
    },
}

// The key version a guarded state change names, and its approvals.
#[derive(Args, Debug)]
pub struct GuardedVersion {
    #[arg(value_name = "REF")]
    key: String,
    #[arg(long, value_name = "N")]
    version: u32,
    #[command(flatten)]
    approvals: crate::custodian::Approvals,
}

/// Runs a `keys` command.
pub fn run(g: &Global, cmd: KeysCmd) -> Result<(), CliError> {
    match cmd {
        KeysCmd::Init { name } => init(g, &name),
        KeysCmd::List { json } => list(g, json),
        KeysCmd::Create { key } => create(g, &key),
        KeysCmd::Show { key, json } => show(g, &key, json),
        KeysCmd::Rotate { key } => rotate(g, &key),
        KeysCmd::Disable(v) => set_state(g, &v, KeyState::Disabled),
        KeysCmd::Enable(v) => set_state(g, &v, KeyState::Enabled),
        KeysCmd::DecryptOnly(v) => set_state(g, &v, KeyState::DecryptOnly),
        KeysCmd::Destroy {
            key,
            version,
            yes,
            approvals,
        } => destroy(g, &key, version, yes, &approvals.files),
        KeysCmd::Approve(a) => crate::custodian::approve(&a),
        KeysCmd::Passwd {
            new_passphrase_file,
            kdf_memory_mib,
            kdf_passes,
            kdf_lanes,
        } => passwd(
            g,
            new_passphrase_file.as_deref(),
            &KdfArgs {
                memory_mib: kdf_memory_mib,
                passes: kdf_passes,
                lanes: kdf_lanes,
            },
        ),
    }
}

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

/// `keys disable|enable|decrypt-only REF --version N`.
fn set_state(g: &Global, v: &GuardedVersion, state: KeyState) -> Result<(), CliError> {
    let (key, version) = (key_ref(&v.key)?, v.version);
    let approvals = crate::custodian::read_approvals(&v.approvals.files)?;
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
    if let Some(sealed) = crate::auditkey::sealed_under(g, &key, version) {
        eprintln!(
            "backup: warning: {key} version {version} seals the audit key at {}: destroying it shreds that key too, \
             and the trails keyed with it can then be checked only against their checkpoints; rewrap it first \
             (docs/AUDIT-KEYS.md, section 5)",
            sealed.display()
        );
    }
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
