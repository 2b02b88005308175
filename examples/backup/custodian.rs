//! Dual control in the CLI: `custodian keygen`, `keys approve`, the
//! custodians file (`--custodians` / `PHI_ENVELOPE_CUSTODIANS`) that
//! registers the custodians and the threshold, and the `--approval FILE`
//! files of the guarded verbs. Formats: docs/APPROVALS.md.

use std::fs;

use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

use phi_envelope::approval::{
    Approval, Custodian, CustodianKey, DualControl, GuardedOperation, MAX_APPROVAL_JSON_LEN,
};

use crate::streams::write_new;
use crate::{exit, CliError, Global};

/// The longest custodians file read.
const MAX_CUSTODIANS_FILE: u64 = 64 * 1024;
/// The spent-approvals file's name beside the keystore (unless the
/// custodians file says `spent-file PATH`).
pub const SPENT_FILE_NAME: &str = "spent-approvals";
/// The default validity of `keys approve`.
pub const DEFAULT_EXPIRES_IN: &str = "1h";

/// `backup custodian ...`.
#[derive(Subcommand, Debug)]
pub enum CustodianCmd {
    /// Generate a custodian's Ed25519 signing key (mode 0600) and print
    /// the line to register in the custodians file
    Keygen {
        /// The custodian's id, as events will name them (letters, digits,
        /// . _ @ -)
        #[arg(long, value_name = "ID")]
        id: String,
        /// The private key file to create
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// `--approval FILE ...` of the guarded verbs.
#[derive(Args, Debug)]
pub struct Approvals {
    /// An approval file from `keys approve` (repeat for each custodian)
    /// when the verb is under dual control (--custodians)
    #[arg(long = "approval", value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// `backup keys approve ...`.
#[derive(Args, Debug)]
pub struct ApproveCmd {
    /// The key, spelled exactly as the verb will be run with it
    #[arg(long = "key", value_name = "REF")]
    key: String,
    #[arg(long, value_name = "N")]
    version: u32,
    /// destroy, disable, enable or decrypt-only
    #[arg(long, value_name = "OP")]
    operation: String,
    /// How long the approval is valid (30m, 1h, 2d)
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_EXPIRES_IN)]
    expires_in: String,
    /// The custodian's private key file (from `custodian keygen`)
    #[arg(long, value_name = "FILE")]
    custodian_key: PathBuf,
    /// Where to write the approval (a new file)
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Runs a `custodian` command.
pub fn run(cmd: CustodianCmd) -> Result<(), CliError> {
    match cmd {
        CustodianCmd::Keygen { id, out } => keygen(&id, &out),
    }
}

/// `backup custodian keygen --id ID --out FILE`: a new Ed25519 custodian
/// key in FILE (mode 0600, never overwritten); prints the line to register.
fn keygen(id: &str, out: &Path) -> Result<(), CliError> {
    let key = CustodianKey::generate(id)?;
    write_new(out, key.to_file_text().as_bytes(), 0o600)?;
    eprintln!(
        "backup: wrote the private key of custodian {id} to {} (mode 0600: keep it offline, only you use it); \
         register the line below in the custodians file (--custodians / PHI_ENVELOPE_CUSTODIANS)",
        out.display()
    );
    println!("custodian {}", key.custodian());
    Ok(())
}

/// Reads a custodian's key file.
fn read_key(path: &Path) -> Result<CustodianKey, CliError> {
    let meta = fs::metadata(path).map_err(|e| CliError::from_io(e, path))?;
    if meta.len() > 4096 {
        return Err(CliError::usage(format!(
            "{} is not a custodian key file (too large)",
            path.display()
        )));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "backup: warning: the custodian key {} can be read by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    let bytes = zeroize::Zeroizing::new(fs::read(path).map_err(|e| CliError::from_io(e, path))?);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| CliError::usage(format!("{} is not a custodian key file", path.display())))?;
    CustodianKey::from_file_text(text)
        .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// `30s`, `15m`, `1h`, `2d` (or plain seconds).
fn parse_duration(text: &str) -> Result<Duration, CliError> {
    let bad = || {
        CliError::usage(format!(
            "--expires-in {text:?}: give a duration such as 30m, 1h or 2d"
        ))
    };
    let (num, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => Some(n),
        'm' => n.checked_mul(60),
        'h' => n.checked_mul(3600),
        'd' => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    if secs == 0 {
        return Err(bad());
    }
    // An approval is for one operation soon; keyrings refuse one valid for
    // longer than their max-validity (24 h unless configured) anyway.
    const MAX_SECS: u64 = 30 * 86_400;
    if secs > MAX_SECS {
        return Err(CliError::usage(format!(
            "--expires-in {text:?} is longer than 30 days: an approval is for one operation, soon"
        )));
    }
    Ok(Duration::from_secs(secs))
}

/// `backup keys approve`: signs one approval with the custodian's key and
/// writes it to a new file. Needs neither the keystore nor the registry.
pub fn approve(a: &ApproveCmd) -> Result<(), CliError> {
    let key = crate::connect::key_ref(&a.key)?;
    let operation: GuardedOperation = a.operation.parse().map_err(CliError::from)?;
    let valid_for = parse_duration(&a.expires_in)?;
    let custodian = read_key(&a.custodian_key)?;
    let approval = custodian.approve(operation, &key, a.version, valid_for)?;
    let mut json = approval.to_json();
    json.push('\n');
    write_new(&a.out, json.as_bytes(), 0o600)?;
    println!(
        "custodian {} approved {operation} of {key} version {} until {} (unix {}); approval in {}",
        custodian.id(),
        a.version,
        crate::output::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(approval.expires_at)),
        approval.expires_at,
        a.out.display()
    );
    Ok(())
}

/// Reads the `--approval` files.
pub fn read_approvals(files: &[PathBuf]) -> Result<Vec<Approval>, CliError> {
    files
        .iter()
        .map(|f| {
            let meta = fs::metadata(f).map_err(|e| CliError::from_io(e, f))?;
            if meta.len() > MAX_APPROVAL_JSON_LEN as u64 {
                return Err(CliError::usage(format!(
                    "{}: not an approval (larger than {MAX_APPROVAL_JSON_LEN} bytes)",
                    f.display()
                )));
            }
            let text = fs::read_to_string(f).map_err(|e| CliError::from_io(e, f))?;
            Approval::from_json(text.trim_end())
                .map_err(|e| CliError::usage(format!("{}: {e}", f.display())))
        })
        .collect()
}

/// The dual control of `--custodians FILE` (or `PHI_ENVELOPE_CUSTODIANS`),
/// if one is configured (docs/APPROVALS.md, section 3).
pub fn dual_control(g: &Global) -> Result<Option<DualControl>, CliError> {
    let Some(path) = &g.custodians else {
        return Ok(None);
    };
    // Line 0: about the file as a whole.
    let bad = |line: usize, what: String| {
        let at = if line == 0 {
            String::new()
        } else {
            format!(" line {line}")
        };
        CliError::new(
            exit::KEY,
            format!(
                "custodians file {}{at}: {what}; no key was used",
                path.display()
            ),
        )
    };
    // The library's text without its "invalid argument: " prefix.
    let lib_text = |e: phi_envelope::Error| match e {
        phi_envelope::Error::InvalidArgument(t) => t,
        other => other.to_string(),
    };
    let meta = fs::metadata(path).map_err(|e| CliError::from_io(e, path))?;
    if meta.len() > MAX_CUSTODIANS_FILE {
        return Err(bad(0, "larger than 64 KiB".into()));
    }
    let text = fs::read_to_string(path).map_err(|e| CliError::from_io(e, path))?;
    let mut threshold = None;
    let mut custodians = Vec::new();
    let mut guard: Option<Vec<GuardedOperation>> = None;
    let mut max_validity = None;
    let mut spent_file = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match word {
            "threshold" => {
                let k: usize = rest
                    .parse()
                    .map_err(|_| bad(n, format!("threshold {rest:?} is not a number")))?;
                if threshold.replace(k).is_some() {
                    return Err(bad(n, "a second threshold line".into()));
                }
            }
            "custodian" => {
                custodians.push(rest.parse::<Custodian>().map_err(|e| bad(n, lib_text(e)))?)
            }
            "guard" => {
                let ops = rest
                    .split_whitespace()
                    .map(str::parse::<GuardedOperation>)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(n, lib_text(e)))?;
                guard = Some(ops);
            }
            "max-validity" => {
                let s: u64 = rest.parse().map_err(|_| {
                    bad(
                        n,
                        format!("max-validity {rest:?} is not a number of seconds"),
                    )
                })?;
                max_validity = Some(Duration::from_secs(s));
            }
            "spent-file" if !rest.is_empty() => spent_file = Some(PathBuf::from(rest)),
            other => {
                return Err(bad(
                    n,
                    format!(
                        "unknown statement {other:?} (threshold, custodian, guard, max-validity, spent-file PATH)"
                    ),
                ))
            }
        }
    }
    let threshold = threshold.ok_or_else(|| bad(0, "no `threshold K` line".into()))?;
    let mut dc = DualControl::new(custodians, threshold).map_err(|e| bad(0, lib_text(e)))?;
    if let Some(ops) = guard {
        dc = dc.guard(ops);
    }
    if let Some(max) = max_validity {
        dc = dc.max_validity(max);
    }
    // Replay protection across runs: every command is a new process.
    let spent_file = match spent_file {
        Some(f) => f,
        None => {
            crate::streams::parent_dir(&crate::connect::keystore_path(g)?).join(SPENT_FILE_NAME)
        }
    };
    dc = dc.spent_file(spent_file);
    Ok(Some(dc))
}
