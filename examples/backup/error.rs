//! Errors and exit codes: [`CliError`], the one line an operator reads
//! and the exit code a script reads, and how every library error maps to
//! them (docs/CLI.md, "Exit codes").

use std::io;
use std::path::Path;

use phi_envelope::provider::ProviderErrorKind;

use crate::{interrupt, output};

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
    /// `audit monitor`: the rules raised alerts.
    pub const ALERTS: u8 = 7;
    /// A bug.
    pub const INTERNAL: u8 = 70;
    /// Stdout was closed by its reader (`| head -1`) before the command
    /// wrote all of its output: 128 + SIGPIPE, what a shell reports for a
    /// command that a closed pipe killed, and never success (an output cut
    /// short is not complete). Nothing is printed.
    pub const STDOUT_CLOSED: u8 = 141;
    /// Interrupted by SIGINT, SIGTERM, SIGHUP or SIGQUIT (a second signal
    /// exits at once, with 128 + its number).
    pub const INTERRUPTED: u8 = 130;
}

pub const EXIT_CODES: &str = "\
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
  7  audit monitor: alerts fired
  130 interrupted (Ctrl-C); nothing is left under the output name
  141 stdout closed by its reader (| head) before the output was complete; nothing printed

Environment:
  PHI_ENVELOPE_KEYSTORE     keystore file (default $XDG_DATA_HOME/phi-envelope/keystore.json)
  PHI_ENVELOPE_PASSPHRASE   keystore passphrase (else --passphrase-file, else a prompt)
  PHI_ENVELOPE_NEW_PASSPHRASE  new passphrase of `keys passwd` (else --new-passphrase-file, else a prompt)
  PHI_ENVELOPE_KEYSTORE_GENERATION_FILE  rollback mark of the keystore (as --keystore-generation-file)
  PHI_ENVELOPE_AUDIT_LOG    audit log (JSON Lines, hash-chained)
  PHI_ENVELOPE_ACTOR        who runs the command, for the audit log (default: the OS user, else uid:N)
  PHI_ENVELOPE_CUSTODIANS   dual control: custodians and threshold for destroy/disable/enable (as --custodians)
  PHI_ENVELOPE_ALERTS       key-access alerts of every command, JSON Lines (as --alerts)

See docs/CLI.md for everything else.";

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

    /// Stdout was closed by its reader before the command wrote all of its
    /// output: the one way every command ends then, whether the write was
    /// a `println!` ([`print_stdout`]) or a stream's (a restore to `-`).
    /// Quiet (whoever reads stdout has gone; the exit code says it was cut
    /// short), and never success.
    pub fn stdout_closed() -> CliError {
        CliError::new(exit::STDOUT_CLOSED, String::new())
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
        if interrupt::interrupted() {
            return CliError::interrupted();
        }
        let p = output::shown(path, "standard input/output");
        match e {
            // Only stdout, of what this command writes, is a pipe (outputs
            // are files created beside their final name).
            E::Io(io)
                if io.kind() == io::ErrorKind::BrokenPipe
                    && (p == "stdout" || p == "standard input/output") =>
            {
                CliError::stdout_closed()
            }
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

/// The payload `main` catches when a `println!` found stdout closed by its
/// reader ([`CliError::stdout_closed`]).
pub struct StdoutClosed;

/// What this binary's `println!` does (examples/backup.rs): prints as
/// std's does, but a stdout closed by its reader unwinds to `main` with
/// [`StdoutClosed`] (without the panic hook: no message), which exits
/// like every other write to a closed stdout. Any other failure to print
/// is a bug, as with std's.
pub fn print_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::panic::resume_unwind(Box::new(StdoutClosed));
        }
        panic!("failed printing to stdout: {e}");
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
