//! `backup`: the operator's tool for encrypted backups of files and
//! directories holding PHI, on the public API of phi-envelope only.
//!
//! ```text
//! cargo run --release --example backup -- --help
//! backup encrypt --key local:backups -o db-2026-11-25.phi /srv/dumps/db.sql
//! backup decrypt -o /restore/db.sql db-2026-11-25.phi
//! backup verify /backups/*.phi
//! ```
//!
//! The full grammar, the environment, the exit codes and the guarantees
//! are in docs/CLI.md.

// The example's modules live in examples/backup/ (a crate root's modules
// are looked up beside it, hence the paths).
#[path = "backup/archive.rs"]
mod archive;
#[path = "backup/custodian.rs"]
mod custodian;
#[path = "backup/keys.rs"]
mod keys;
#[cfg(any(feature = "pkcs11", feature = "aws-kms", feature = "vault"))]
#[path = "backup/providers.rs"]
mod providers;
#[cfg(feature = "recovery")]
#[path = "backup/recovery.rs"]
mod recovery;
#[path = "backup/run.rs"]
mod run;
#[path = "backup/util.rs"]
mod util;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use phi_envelope::provider::{KeyState, ProviderErrorKind};

/// Exit codes (docs/CLI.md, "Exit codes").
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Bad usage: arguments, context pairs, key references, missing
    /// passphrase, refused confirmation.
    pub const USAGE: u8 = 1;
    /// The backup is not authentic or not usable: authentication failed
    /// (wrong key, wrong context, modified), truncated, not a backup, an
    /// input of another size than `--expect-size`,
    /// unsafe archive, tampered audit log.
    pub const INTEGRITY: u8 = 2;
    /// A key or provider problem: keystore missing or wrong passphrase, no
    /// key for this backup, key disabled or destroyed, provider down,
    /// policy denial.
    pub const KEY: u8 = 3;
    /// An I/O error: file not found, permission denied, disk full.
    pub const IO: u8 = 4;
    /// The output exists and `--force` was not given.
    pub const EXISTS: u8 = 5;
    /// The audit log cannot be opened or written; no key was used.
    pub const AUDIT: u8 = 6;
    /// A bug.
    pub const INTERNAL: u8 = 70;
    /// Interrupted by SIGINT (SIGTERM exits with 143).
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  usage error (arguments, --context, key reference, no passphrase)
  2  integrity: authentication failed (wrong key, wrong --context, or modified),
     truncated, not a backup, unsafe archive, tampered audit log,
     input size other than --expect-size
  3  key or provider problem (keystore, passphrase, key disabled/destroyed, no key for the backup,
     dual control: too few or invalid approvals)
  4  I/O error (not found, permission denied, disk full)
  5  output exists: refusing to overwrite without --force
  6  audit log cannot be opened or written (no key was used)
  130 interrupted (Ctrl-C); nothing is left under the output name

Environment:
  PHI_ENVELOPE_KEYSTORE     keystore file (default $XDG_DATA_HOME/phi-envelope/keystore.json)
  PHI_ENVELOPE_PASSPHRASE   keystore passphrase (else --passphrase-file, else a prompt)
  PHI_ENVELOPE_NEW_PASSPHRASE  new passphrase of `keys passwd` (else --new-passphrase-file, else a prompt)
  PHI_ENVELOPE_KEYSTORE_GENERATION_FILE  rollback mark of the keystore (as --keystore-generation-file)
  PHI_ENVELOPE_AUDIT_LOG    audit log (JSON Lines, hash-chained)
  PHI_ENVELOPE_ACTOR        who runs the command, for the audit log (default: the OS user, else uid:N)
  PHI_ENVELOPE_CUSTODIANS   dual control: custodians and threshold for destroy/disable/enable (as --custodians)

See docs/CLI.md for everything else.";

/// Encrypted backups of files and directories with phi-envelope.
///
/// Every backup gets its own data key, wrapped by the keys you name
/// (`local:NAME` in the passphrase-protected keystore, or HSM/KMS keys when
/// built with those features). Outputs appear under their final name only
/// when complete; restores only once the whole backup authenticated.
#[derive(Parser, Debug)]
#[command(name = "backup", version, after_help = EXIT_CODES, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Global {
    /// The keystore file [env: PHI_ENVELOPE_KEYSTORE; default
    /// $XDG_DATA_HOME/phi-envelope/keystore.json]
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "PHI_ENVELOPE_KEYSTORE",
        hide_env = true
    )]
    pub keystore: Option<PathBuf>,
    /// Append every key access to this hash-chained JSON Lines audit log
    /// [env: PHI_ENVELOPE_AUDIT_LOG]
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "PHI_ENVELOPE_AUDIT_LOG",
        hide_env = true
    )]
    pub audit_log: Option<PathBuf>,
    /// The audit log's HMAC key: a file of 64+ hex digits or 32+ bytes
    /// [env: PHI_ENVELOPE_AUDIT_KEY_FILE]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "PHI_ENVELOPE_AUDIT_KEY_FILE",
        hide_env = true
    )]
    pub audit_key_file: Option<PathBuf>,
    /// Who runs the command, recorded in audit events [env:
    /// PHI_ENVELOPE_ACTOR; default: the OS user's login name, else uid:N]
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "PHI_ENVELOPE_ACTOR",
        hide_env = true
    )]
    pub actor: Option<String>,
    /// Keep the keystore's rollback high-water mark in this file too, and
    /// refuse an older keystore file (put it where whoever can replace the
    /// keystore cannot write) [env: PHI_ENVELOPE_KEYSTORE_GENERATION_FILE]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "PHI_ENVELOPE_KEYSTORE_GENERATION_FILE",
        hide_env = true
    )]
    pub keystore_generation_file: Option<PathBuf>,
    /// Dual control: the custodians who approve destroy, disable, enable
    /// and decrypt-only, and how many must (docs/APPROVALS.md) [env:
    /// PHI_ENVELOPE_CUSTODIANS]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "PHI_ENVELOPE_CUSTODIANS",
        hide_env = true
    )]
    pub custodians: Option<PathBuf>,
    /// Read the keystore passphrase from this file (else
    /// PHI_ENVELOPE_PASSPHRASE, else a prompt on the terminal)
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Worker threads for encryption and decryption (default: all cores)
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// No progress bars and no summaries on stderr (errors still)
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, rotate, disable, enable and destroy keys
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Encrypt a file, a directory (as a tar archive) or stdin (-)
    Encrypt {
        /// A key to wrap the backup's data key to; repeat for several (any
        /// one restores). Default local:backups
        #[arg(long = "key", value_name = "REF")]
        keys: Vec<String>,
        /// An encryption-context pair bound to the backup; the same pairs
        /// are needed to restore it. Repeatable
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// The encrypted file, or - for stdout
        #[arg(short, long, value_name = "OUTPUT")]
        output: PathBuf,
        /// Replace OUTPUT if it exists (only once the new one is complete)
        #[arg(long)]
        force: bool,
        /// Leave out (with a warning) symbolic links that point outside the
        /// directory, instead of refusing to back it up
        #[arg(long)]
        skip_outside_links: bool,
        /// Refuse (exit 2, nothing committed) unless the input is exactly
        /// BYTES long: for scripts that know the size of what a producer
        /// sends, since a producer that dies looks like the end of its
        /// output (files and stdin, not directories)
        #[arg(long, value_name = "BYTES")]
        expect_size: Option<u64>,
        /// A file, a directory, or - for stdin
        #[arg(value_name = "INPUT")]
        input: PathBuf,
    },
    /// Restore a backup: a file, or a directory for a directory backup
    Decrypt {
        /// The encryption-context pairs given to encrypt. Repeatable
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// Replace OUTPUT if it exists (only once the restore authenticated)
        #[arg(long)]
        force: bool,
        /// Write the plaintext as is (a directory backup's tar stream)
        /// instead of restoring the directory
        #[arg(long)]
        raw: bool,
        /// The restored file or directory, or - for stdout
        #[arg(short, long, value_name = "OUTPUT")]
        output: PathBuf,
        /// Restore with the offline recovery key, from M of its share
        /// files (one per option); no keystore, HSM or KMS is used
        #[cfg(feature = "recovery")]
        #[arg(long = "recovery-share", value_name = "FILE")]
        recovery_shares: Vec<PathBuf>,
        /// The backup, or - for stdin
        #[arg(value_name = "INPUT")]
        input: PathBuf,
    },
    /// Check that backups decrypt and are intact, without writing anything
    Verify {
        /// The encryption-context pairs given to encrypt. Repeatable
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// One JSON document on stdout
        #[arg(long)]
        json: bool,
        /// Backups (- for stdin, once)
        #[arg(value_name = "INPUT", required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Show a backup's header (format, keys, sizes); needs no key
    Inspect {
        /// JSON on stdout
        #[arg(long)]
        json: bool,
        /// The backup, or - for stdin
        #[arg(value_name = "INPUT")]
        input: PathBuf,
    },
    /// Re-wrap backups in place to the current key versions (or to other
    /// keys) without re-encrypting the data; atomic
    Rewrap {
        /// The keys to wrap to (default: the keys the backup is wrapped to,
        /// at their current primary version). Repeatable
        #[arg(long = "key", value_name = "REF")]
        keys: Vec<String>,
        /// The encryption-context pairs given to encrypt. Repeatable
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// Backup files
        #[arg(value_name = "INPUT", required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Check audit logs
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The offline recovery key: make it and its M-of-N shares
    #[cfg(feature = "recovery")]
    #[command(subcommand)]
    Recovery(recovery::RecoveryCmd),
    /// Custodians of dual control: their signing keys
    #[command(subcommand)]
    Custodian(custodian::CustodianCmd),
    /// Remove temporary files and directories (.NAME.<hex>.tmp) left in
    /// DIRs by a killed backup
    Clean {
        /// Only list them
        #[arg(long)]
        dry_run: bool,
        /// Directories to clean
        #[arg(value_name = "DIR", required = true)]
        dirs: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
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
    Disable {
        #[arg(value_name = "REF")]
        key: String,
        #[arg(long, value_name = "N")]
        version: u32,
        #[command(flatten)]
        approvals: custodian::Approvals,
    },
    /// Enable a version again (it becomes primary)
    Enable {
        #[arg(value_name = "REF")]
        key: String,
        #[arg(long, value_name = "N")]
        version: u32,
        #[command(flatten)]
        approvals: custodian::Approvals,
    },
    /// Make a version decrypt-only
    DecryptOnly {
        #[arg(value_name = "REF")]
        key: String,
        #[arg(long, value_name = "N")]
        version: u32,
        #[command(flatten)]
        approvals: custodian::Approvals,
    },
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
        approvals: custodian::Approvals,
    },
    /// Sign a custodian's approval of one destroy, disable, enable or
    /// decrypt-only of one key version (dual control)
    Approve(custodian::ApproveCmd),
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

#[derive(Subcommand, Debug)]
enum AuditCmd {
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

// ---------------------------------------------------------------------------
// Errors

/// A failure as the operator sees it: one line saying what happened and
/// what to do, and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: String) -> CliError {
        CliError { code, message }
    }

    pub fn usage(message: String) -> CliError {
        CliError::new(exit::USAGE, message)
    }

    pub fn integrity(message: String) -> CliError {
        CliError::new(exit::INTEGRITY, message)
    }

    pub fn interrupted() -> CliError {
        CliError::new(
            exit::INTERRUPTED,
            "interrupted; the temporary output was removed and nothing was written under the output name (on stdout, what was already written stays with its reader)".into(),
        )
    }

    /// The failure was already reported (per input); only the exit code
    /// is left.
    pub fn reported(code: u8) -> CliError {
        CliError::new(code, String::new())
    }

    /// An I/O error about `path`.
    pub fn from_io(e: io::Error, path: &Path) -> CliError {
        CliError::from_lib(phi_envelope::Error::from(e), path)
    }

    /// An error of the encryption or decryption engine: an I/O error is
    /// about `output` when writing failed, about `input` otherwise; any
    /// other error is about the input. An empty path adds no prefix.
    pub fn from_engine(e: phi_envelope::Error, input: &Path, output: &Path) -> CliError {
        match &e {
            phi_envelope::Error::Io(io) if io.to_string().starts_with("writing") => {
                CliError::from_lib(e, output)
            }
            _ => CliError::from_lib(e, input),
        }
    }

    /// A library error, about `path` where it helps (`-` is shown as
    /// `stdin`/`stdout`; an empty path adds no prefix).
    pub fn from_lib(e: phi_envelope::Error, path: &Path) -> CliError {
        use phi_envelope::Error as E;
        if util::interrupted() {
            return CliError::interrupted();
        }
        let p = util::shown(path, "standard input/output");
        match e {
            E::Io(io) => {
                let msg = io.to_string();
                let p = if p.is_empty() {
                    "I/O error".to_owned()
                } else {
                    p
                };
                let (code, text) = match io.kind() {
                    io::ErrorKind::AlreadyExists => (
                        exit::EXISTS,
                        format!("{p} already exists; refusing to overwrite it (pass --force to replace it)"),
                    ),
                    io::ErrorKind::StorageFull => (exit::IO, no_space(&p, &msg)),
                    io::ErrorKind::NotFound => (exit::IO, format!("{p}: not found ({msg})")),
                    io::ErrorKind::PermissionDenied => {
                        (exit::IO, format!("{p}: permission denied ({msg})"))
                    }
                    io::ErrorKind::BrokenPipe => (
                        exit::IO,
                        format!("{p}: the output was closed before the end ({msg})"),
                    ),
                    _ if msg.contains("No space left") => (exit::IO, no_space(&p, &msg)),
                    _ => (exit::IO, format!("{p}: {msg}")),
                };
                CliError::new(code, text)
            }
            other => CliError::from(other).with_path(&p),
        }
    }

    fn with_path(mut self, p: &str) -> CliError {
        if !p.is_empty() && self.code == exit::INTEGRITY && !self.message.starts_with(p) {
            self.message = format!("{p}: {}", self.message);
        }
        self
    }
}

fn no_space(p: &str, msg: &str) -> String {
    if p == "stdout" {
        format!("stdout: no space left on the device ({msg}); what was written is incomplete: discard it")
    } else {
        format!("{p}: no space left on the device ({msg}); nothing was written under the output name: free space or write elsewhere")
    }
}

impl From<phi_envelope::Error> for CliError {
    fn from(e: phi_envelope::Error) -> CliError {
        use phi_envelope::Error as E;
        let text = e.to_string();
        match e {
            E::Decrypt => CliError::integrity(
                "authentication failed: wrong key, wrong --context, or the backup was modified; \
                 give exactly the --context pairs used to encrypt it, and restore a damaged file from another copy"
                    .into(),
            ),
            E::Truncated => CliError::integrity(
                "the backup is truncated: it ends before its final chunk (an incomplete copy, e.g. a full disk \
                 or an interrupted transfer); a complete copy is needed: use another copy"
                    .into(),
            ),
            E::TruncatedChunk => CliError::integrity(
                "the backup is truncated: it ends inside a chunk; everything before that chunk authenticated \
                 (so the key and --context are right), the last chunk did not: the copy was cut short \
                 (a full disk, an interrupted transfer) or its end was damaged; a complete copy is needed: \
                 use another copy"
                    .into(),
            ),
            E::NotEnvelope => CliError::integrity(
                "not a phi-envelope backup (unknown magic bytes)".into(),
            ),
            E::UnsupportedVersion(_) | E::UnsupportedSuite(_) | E::Malformed(_) => {
                CliError::integrity(text)
            }
            E::InvalidContext(_) | E::InvalidKeyRef { .. } | E::InvalidArgument(_)
            | E::InvalidKeyLength { .. } | E::MessageTooLong => CliError::usage(text),
            E::NoMatchingKey(_) => CliError::new(
                exit::KEY,
                format!(
                    "{text} (use the keystore that holds them: --keystore or PHI_ENVELOPE_KEYSTORE)"
                ),
            ),
            E::Provider(p) => CliError::new(exit::KEY, provider_message(&p)),
            E::Keystore { .. }
            | E::PolicyDenied(_)
            | E::KeyLifecycle(_)
            | E::RecoveryShare(_)
            | E::Approval(_) => {
                CliError::new(exit::KEY, text)
            }
            E::Audit(_) => CliError::new(
                exit::AUDIT,
                format!("{text}; no key was used ({AUDIT_LOG_SETTING})"),
            ),
            E::Io(io) => CliError::from_io(io, Path::new("")),
            E::Rng => CliError::new(exit::IO, text),
            _ => CliError::new(exit::USAGE, text),
        }
    }
}

/// Where the CLI's audit log is configured: what an operator changes to
/// start a new log at another path.
pub const AUDIT_LOG_SETTING: &str =
    "the audit log's path is --audit-log or PHI_ENVELOPE_AUDIT_LOG: set a new path to start a new log there";

/// A provider's refusal in the CLI's words: what the provider says is
/// wrong, without the advice it gives a library caller (which names
/// library functions such as `create_key` or `set_state`, and may say to
/// enable a version), followed by the `backup` command that helps. A
/// retired (disabled) version is never to be enabled again: that makes it
/// the primary and undoes the rotation; decrypt-only is the fix.
fn provider_message(p: &phi_envelope::provider::ProviderError) -> String {
    // Only the local keystore's advice names library calls; another
    // provider's message is kept whole: it carries the operator's next step
    // (a KMS key pending deletion can still be recovered, the denied
    // principal, the token's own reason).
    let fact = if p.provider() == "local" {
        provider_fact(p.message())
    } else {
        p.message().to_owned()
    };
    let (key, version) = key_and_version(&fact);
    let key = key.unwrap_or_else(|| "REF".into());
    let hint = match (p.kind(), version) {
        (ProviderErrorKind::KeyDestroyed, _) if p.provider() == "local" => {
            " (the key version was destroyed: backups wrapped only under it are gone for good; \
             restore from a copy wrapped to another key, if there is one)"
                .to_owned()
        }
        (ProviderErrorKind::KeyDestroyed, _) => {
            " (unless the provider can still recover the key, as its message says when it can, \
             backups wrapped only under it are gone: restore from a copy wrapped to another key)"
                .to_owned()
        }
        (ProviderErrorKind::KeyDisabled, Some(v)) => format!(
            " (to read backups under this retired version, make it decrypt-only: \
             `backup keys decrypt-only {key} --version {v}`; new backups stay under the current version)"
        ),
        (ProviderErrorKind::KeyDisabled, None) => format!(
            " (there is no primary version to encrypt under: make a new one with `backup keys rotate {key}`)"
        ),
        (ProviderErrorKind::KeyNotFound, _) if p.provider() == "hpke-recovery" => {
            " (set PHI_ENVELOPE_RECOVERY_PUBLIC_KEY to the public key that `backup recovery keygen` printed)"
                .to_owned()
        }
        (ProviderErrorKind::KeyNotFound, _) => format!(
            " (check the reference with `backup keys list`, or create the key with `backup keys create {key}`)"
        ),
        (ProviderErrorKind::InvalidState, Some(_)) if fact.contains("primary") => format!(
            " (make another version primary first with `backup keys rotate {key}`, \
             or set this one decrypt-only or disabled)"
        ),
        _ => String::new(),
    };
    format!("key provider {}: {fact}{hint}", p.provider())
}

/// The statement in a provider's message, without its advice: the text
/// before the first "; " (where the advice starts), and no parenthesis
/// naming a library function.
fn provider_fact(message: &str) -> String {
    let fact = message.split("; ").next().unwrap_or(message);
    let mut out = String::new();
    let mut rest = fact;
    while let Some(open) = rest.find(" (") {
        let Some(len) = rest[open..].find(')') else {
            break;
        };
        let inner = &rest[open + 2..open + len];
        out.push_str(&rest[..open]);
        if !names_library_call(inner) {
            out.push_str(&rest[open..=open + len]);
        }
        rest = &rest[open + len + 1..];
    }
    out.push_str(rest);
    out.trim_end_matches([',', ':', ' ']).to_owned()
}

/// True when `text` names a function of the library or of a provider's API
/// (`create_key`, `LocalKeystore::add_key`, `set_state(Enabled)`,
/// `EnableKey`), which mean nothing to an operator of the CLI.
fn names_library_call(text: &str) -> bool {
    text.contains("::")
        || text.contains("Enable")
        || text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w.contains('_') && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
}

/// The key reference and version a provider's message is about: "key REF
/// version N ..." or "key REF ...".
fn key_and_version(fact: &str) -> (Option<String>, Option<u32>) {
    let words: Vec<&str> = fact.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        let w = w.trim_end_matches([',', ':', ';']);
        if phi_envelope::KeyRef::parse(w).is_err() || !w.contains(':') {
            continue;
        }
        let version = match (words.get(i + 1), words.get(i + 2)) {
            (Some(&"version"), Some(n)) => n.trim_end_matches([',', ':', ';']).parse().ok(),
            _ => None,
        };
        return (Some(w.to_owned()), version);
    }
    (None, None)
}

// ---------------------------------------------------------------------------

fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    match cli.command {
        Command::Keys(k) => match k {
            KeysCmd::Init { name } => keys::init(g, &name),
            KeysCmd::List { json } => keys::list(g, json),
            KeysCmd::Create { key } => keys::create(g, &key),
            KeysCmd::Show { key, json } => keys::show(g, &key, json),
            KeysCmd::Rotate { key } => keys::rotate(g, &key),
            KeysCmd::Disable {
                key,
                version,
                approvals,
            } => keys::set_state(g, &key, version, KeyState::Disabled, &approvals.files),
            KeysCmd::Enable {
                key,
                version,
                approvals,
            } => keys::set_state(g, &key, version, KeyState::Enabled, &approvals.files),
            KeysCmd::DecryptOnly {
                key,
                version,
                approvals,
            } => keys::set_state(g, &key, version, KeyState::DecryptOnly, &approvals.files),
            KeysCmd::Destroy {
                key,
                version,
                yes,
                approvals,
            } => keys::destroy(g, &key, version, yes, &approvals.files),
            KeysCmd::Approve(a) => custodian::approve(&a),
            KeysCmd::Passwd {
                new_passphrase_file,
                kdf_memory_mib,
                kdf_passes,
                kdf_lanes,
            } => keys::passwd(
                g,
                new_passphrase_file.as_deref(),
                &keys::KdfArgs {
                    memory_mib: kdf_memory_mib,
                    passes: kdf_passes,
                    lanes: kdf_lanes,
                },
            ),
        },
        Command::Encrypt {
            keys,
            context,
            output,
            force,
            skip_outside_links,
            expect_size,
            input,
        } => run::encrypt(
            g,
            run::EncryptArgs {
                keys,
                context,
                output,
                input,
                force,
                skip_outside_links,
                expect_size,
            },
        ),
        Command::Decrypt {
            context,
            force,
            raw,
            output,
            #[cfg(feature = "recovery")]
            recovery_shares,
            input,
        } => {
            #[cfg(feature = "recovery")]
            recovery::use_shares(recovery_shares);
            run::decrypt(
                g,
                run::DecryptArgs {
                    context,
                    output,
                    input,
                    force,
                    raw,
                },
            )
        }
        Command::Verify {
            context,
            json,
            inputs,
        } => run::verify(
            g,
            run::VerifyArgs {
                context,
                inputs,
                json,
            },
        ),
        Command::Inspect { json, input } => run::inspect(g, &input, json),
        Command::Rewrap {
            keys,
            context,
            inputs,
        } => run::rewrap(g, &keys, &context, &inputs),
        Command::Audit(AuditCmd::Verify {
            log,
            anchor,
            start_after,
            json,
        }) => keys::audit_verify(g, &log, anchor.as_deref(), start_after.as_deref(), json),
        Command::Clean { dry_run, dirs } => run::clean(&dirs, dry_run),
        #[cfg(feature = "recovery")]
        Command::Recovery(recovery::RecoveryCmd::Keygen {
            shares,
            threshold,
            out,
        }) => recovery::keygen(g, shares, threshold, &out),
        Command::Custodian(c) => custodian::run(c),
    }
}

fn main() -> ExitCode {
    // A bug must not print a backtrace at an operator: one line, exit 70.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("backup: internal error: {what} (this is a bug; please report it)");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::from(exit::OK)
                }
                _ => ExitCode::from(exit::USAGE),
            };
        }
    };
    match std::panic::catch_unwind(move || dispatch(cli)) {
        Ok(Ok(())) => ExitCode::from(exit::OK),
        Ok(Err(e)) => {
            if !e.message.is_empty() {
                eprintln!("backup: {}", e.message);
            }
            ExitCode::from(e.code)
        }
        Err(_) => ExitCode::from(exit::INTERNAL),
    }
}
