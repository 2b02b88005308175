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

/// `println!` for every module below: std's, except that stdout closed by
/// its reader (`| head -1`, `| true`) is no panic and no "internal error"
/// but exit 141, quietly, as for every write to a closed stdout
/// ([`error::print_stdout`], [`CliError::stdout_closed`]).
macro_rules! println {
    () => {
        $crate::error::print_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::error::print_stdout(format_args!($($arg)*))
    };
}

// The example's modules live in examples/backup/ (a crate root's modules
// are looked up beside it, hence the paths).
#[path = "backup/archive.rs"]
mod archive;
#[path = "backup/audit.rs"]
mod audit;
#[path = "backup/auditkey.rs"]
mod auditkey;
#[path = "backup/clean.rs"]
mod clean;
#[path = "backup/commands.rs"]
mod commands;
#[path = "backup/connect.rs"]
mod connect;
#[path = "backup/custodian.rs"]
mod custodian;
#[path = "backup/decrypt.rs"]
mod decrypt;
#[path = "backup/encrypt.rs"]
mod encrypt;
#[path = "backup/error.rs"]
mod error;
#[path = "backup/interrupt.rs"]
mod interrupt;
#[path = "backup/keys.rs"]
mod keys;
#[path = "backup/monitor.rs"]
mod monitor;
#[path = "backup/output.rs"]
mod output;
#[path = "backup/passphrase.rs"]
mod passphrase;
#[cfg(any(feature = "pkcs11", feature = "aws-kms", feature = "vault"))]
#[path = "backup/providers.rs"]
mod providers;
#[cfg(feature = "recovery")]
#[path = "backup/recovery.rs"]
mod recovery;
#[path = "backup/rewrap.rs"]
mod rewrap;
#[cfg(feature = "s3")]
#[path = "backup/s3.rs"]
mod s3;
#[path = "backup/s3cmd.rs"]
mod s3cmd;
#[path = "backup/streams.rs"]
mod streams;
#[path = "backup/verify.rs"]
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use error::EXIT_CODES;
use error::{exit, CliError, AUDIT_LOG_SETTING};

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
    /// Append every key access to the PostgreSQL audit trail at this URL
    /// (postgresql://USER@HOST:PORT/DB; see docs/AUDIT-DB.md)
    /// [env: PHI_ENVELOPE_AUDIT_DB]
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "PHI_ENVELOPE_AUDIT_DB",
        hide_env = true
    )]
    pub audit_db: Option<String>,
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
    /// The audit key, sealed (the default way to key the chain): a
    /// phi-envelope message made by `audit keygen`, or on the first use of a
    /// new --audit-log [env: PHI_ENVELOPE_AUDIT_KEY_SEALED; default
    /// audit-key.phienv beside the keystore]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "PHI_ENVELOPE_AUDIT_KEY_SEALED",
        hide_env = true,
        conflicts_with = "audit_key_file"
    )]
    pub audit_key_sealed: Option<PathBuf>,
    /// The key that seals a new audit key [env: PHI_ENVELOPE_AUDIT_KEY_REF;
    /// default local:audit, created in the keystore if missing]
    #[arg(
        long,
        global = true,
        value_name = "REF",
        env = "PHI_ENVELOPE_AUDIT_KEY_REF",
        hide_env = true
    )]
    pub audit_key_ref: Option<String>,
    /// Write (and verify) an unkeyed audit log: a bare SHA-256 checksum
    /// chain that anyone who can write the file can recompute. Only where
    /// the log is protected by other means
    #[arg(long, global = true, conflicts_with_all = ["audit_key_file", "audit_key_sealed"])]
    pub audit_unkeyed: bool,
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
    /// Run the key-access rules over every key access of the command and
    /// append their alerts to FILE (JSON Lines); for `audit monitor`, where
    /// its alerts go (default, or -: stdout) [env: PHI_ENVELOPE_ALERTS]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "PHI_ENVELOPE_ALERTS",
        hide_env = true
    )]
    pub alerts: Option<PathBuf>,
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
    Keys(keys::KeysCmd),
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
        /// Object-lock retention of an s3:// output until DATE (YYYY-MM-DD,
        /// UTC, or RFC 3339), where the bucket has object lock enabled
        #[arg(long, value_name = "DATE")]
        retain_until: Option<String>,
        /// The object-lock mode of --retain-until: governance (users with
        /// s3:BypassGovernanceRetention can lift it) or compliance (nobody
        /// can, not even the account's root user)
        #[arg(long, value_name = "MODE", default_value = "governance", value_parser = ["governance", "compliance"])]
        retain_mode: String,
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
    /// List the backups under s3://BUCKET/PREFIX: size, keys and key
    /// versions from their headers (no key needed)
    Ls {
        /// One JSON document on stdout
        #[arg(long)]
        json: bool,
        /// s3://BUCKET/ or s3://BUCKET/PREFIX
        #[arg(value_name = "URL")]
        prefix: PathBuf,
    },
    /// Check audit trails (a file or PostgreSQL), and set up the database
    #[command(subcommand)]
    Audit(audit::AuditCmd),
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

/// Runs the command parsed.
fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    match cli.command {
        Command::Keys(k) => keys::run(g, k),
        Command::Encrypt {
            keys,
            context,
            output,
            force,
            skip_outside_links,
            expect_size,
            retain_until,
            retain_mode,
            input,
        } => encrypt::encrypt(
            g,
            encrypt::EncryptArgs {
                keys,
                context,
                output,
                input,
                force,
                skip_outside_links,
                expect_size,
                retain_until,
                retain_mode,
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
            decrypt::decrypt(
                g,
                decrypt::DecryptArgs {
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
        } => verify::verify(
            g,
            verify::VerifyArgs {
                context,
                inputs,
                json,
            },
        ),
        Command::Inspect { json, input } => verify::inspect(g, &input, json),
        Command::Rewrap {
            keys,
            context,
            inputs,
        } => rewrap::rewrap(g, &keys, &context, &inputs),
        Command::Ls { json, prefix } => s3cmd::ls(&prefix, json),
        Command::Audit(a) => audit::run(g, a),
        Command::Clean { dry_run, dirs } => clean::clean(&dirs, dry_run),
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
        // A task of the S3 runtime that panics is reported by whoever
        // waits for it, as a failed call in one error line
        // (s3::spawn_reporting): not a second line here.
        #[cfg(feature = "s3")]
        if std::thread::current().name() == Some("s3") {
            return;
        }
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
        Err(payload) if payload.is::<error::StdoutClosed>() => {
            ExitCode::from(CliError::stdout_closed().code)
        }
        Err(_) => ExitCode::from(exit::INTERNAL),
    }
}
