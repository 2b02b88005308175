//! The offline recovery recipient in the CLI (feature `recovery`,
//! docs/RECOVERY.md):
//!
//! - `backup recovery keygen --shares N --threshold M --out DIR` makes a
//!   recovery key on the custodians' (offline) machine, writes its N shares
//!   and its public key to DIR, and prints the key reference and the public
//!   key;
//! - `backup encrypt --key local:backups --key hpke-recovery:FP` wraps to
//!   it, with the public key in `PHI_ENVELOPE_RECOVERY_PUBLIC_KEY` (the
//!   `phi-recovery-public-v1:...` text, several separated by whitespace) or
//!   the file named by `PHI_ENVELOPE_RECOVERY_PUBLIC_KEY_FILE`;
//! - `backup decrypt --recovery-share FILE ...` restores a backup from M
//!   shares, without the keystore, the HSM or the KMS.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use clap::Subcommand;
use phi_envelope::provider::recovery::{
    RecoveryPrivateKey, RecoveryProvider, RecoveryPublicKey, RecoveryShare, PROVIDER_ID,
};
use phi_envelope::KeyProvider;
use zeroize::Zeroizing;

use crate::streams::write_new;
use crate::{exit, CliError, Global};

/// `backup recovery ...`.
#[derive(Subcommand, Debug)]
pub enum RecoveryCmd {
    /// Make an offline recovery key: write its N shares (any M restore it)
    /// and its public key to DIR, and print its key reference. Run it on
    /// an offline machine and hand each share to one custodian
    Keygen {
        /// How many shares to make (N, at most 255)
        #[arg(long, value_name = "N")]
        shares: u8,
        /// How many shares restore the key (M, 2 ..= N)
        #[arg(long, value_name = "M")]
        threshold: u8,
        /// The directory to write the shares and the public key to
        /// (created mode 0700 if missing; existing files are never
        /// overwritten)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// The share files of `decrypt --recovery-share`, for the whole run.
static SHARE_FILES: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Called by `decrypt` with its `--recovery-share` files (none: nothing
/// changes).
pub fn use_shares(files: Vec<PathBuf>) {
    if !files.is_empty() {
        let _ = SHARE_FILES.set(files);
    }
}

/// With `--recovery-share`, the backup is opened by the recovery key
/// alone: no keystore, HSM or KMS is asked (or needed). Refuses a backup
/// that is not wrapped to a recovery key.
pub fn restrict(schemes: BTreeSet<String>) -> Result<BTreeSet<String>, CliError> {
    if SHARE_FILES.get().is_none() {
        return Ok(schemes);
    }
    if !schemes.contains(PROVIDER_ID) {
        let list: Vec<&str> = schemes.iter().map(String::as_str).collect();
        return Err(CliError::new(
            exit::KEY,
            format!(
                "--recovery-share: this backup is not wrapped to a recovery key (only to {} keys); restore it with those keys",
                list.join(", ")
            ),
        ));
    }
    Ok([PROVIDER_ID.to_owned()].into_iter().collect())
}

/// The recovery provider for this run: the key restored from the
/// `--recovery-share` files, or else the public keys of the environment
/// (none configured: a provider with no keys, which answers "not mine").
pub fn provider(g: &Global) -> Result<Arc<dyn KeyProvider>, CliError> {
    if let Some(files) = SHARE_FILES.get() {
        let key = restore(files)?;
        if !g.quiet {
            eprintln!(
                "restored recovery key {} from {} shares",
                key.public_key().key_ref(),
                files.len()
            );
        }
        return Ok(Arc::new(RecoveryProvider::new().with_private_key(key)));
    }
    let mut p = RecoveryProvider::new();
    for key in public_keys()? {
        p = p.with_public_key(key);
    }
    Ok(Arc::new(p))
}

/// Reads and checks every share file, then combines them.
fn restore(files: &[PathBuf]) -> Result<RecoveryPrivateKey, CliError> {
    let mut shares = Vec::with_capacity(files.len());
    for f in files {
        let bytes = read_small(f, "share")?;
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            CliError::new(
                exit::KEY,
                format!("{}: not a recovery share (not text)", f.display()),
            )
        })?;
        let share = RecoveryShare::parse(text)
            .map_err(|e| CliError::new(exit::KEY, format!("{}: {e}", f.display())))?;
        shares.push(share);
    }
    RecoveryPrivateKey::combine(&shares).map_err(|e| CliError::new(exit::KEY, e.to_string()))
}

/// A file of at most 64 KiB (a share, a public key), read into a zeroizing
/// buffer: opened once without following a link or waiting on a FIFO,
/// checked as it is open, read up to the limit only.
fn read_small(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    use std::io::Read as _;
    const LIMIT: u64 = 64 * 1024;
    let not_ours = || {
        CliError::usage(format!(
            "{}: not a {what} file (a regular file of at most 64 KiB)",
            path.display()
        ))
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                not_ours()
            } else {
                CliError::from_io(e, path)
            }
        })?;
    let md = f.metadata().map_err(|e| CliError::from_io(e, path))?;
    if !md.is_file() || md.len() > LIMIT {
        return Err(not_ours());
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(LIMIT as usize + 1));
    f.take(LIMIT + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CliError::from_io(e, path))?;
    if buf.len() as u64 > LIMIT {
        return Err(not_ours());
    }
    Ok(buf)
}

/// `PHI_ENVELOPE_RECOVERY_PUBLIC_KEY`, else the file named by
/// `PHI_ENVELOPE_RECOVERY_PUBLIC_KEY_FILE`: public key texts separated by
/// whitespace.
fn public_keys() -> Result<Vec<RecoveryPublicKey>, CliError> {
    const VAR: &str = "PHI_ENVELOPE_RECOVERY_PUBLIC_KEY";
    let text = match std::env::var(VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => match std::env::var_os(format!("{VAR}_FILE")) {
            Some(f) => String::from_utf8(read_small(Path::new(&f), "public key")?.to_vec())
                .map_err(|_| CliError::usage(format!("{VAR}_FILE: the file is not text")))?,
            None => return Ok(Vec::new()),
        },
    };
    text.split_whitespace()
        .map(|t| RecoveryPublicKey::parse(t).map_err(|e| CliError::usage(format!("{VAR}: {e}"))))
        .collect()
}

/// `backup recovery keygen`.
pub fn keygen(g: &Global, shares: u8, threshold: u8, out: &Path) -> Result<(), CliError> {
    if threshold < 2 || threshold > shares {
        return Err(CliError::usage(format!(
            "--threshold must be 2 ..= --shares (got --threshold {threshold}, --shares {shares}): \
             one share alone must never be the key"
        )));
    }
    // The shares are written into `out` together: it must be this user's
    // alone. Created here (mode 0700, its parent must exist), or an
    // existing directory that is not a link, is owned by this user and
    // that nobody else can enter.
    match fs::DirBuilder::new().mode(0o700).create(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            use std::os::unix::fs::MetadataExt as _;
            let md = out
                .symlink_metadata()
                .map_err(|e| CliError::from_io(e, out))?;
            let me = rustix::process::getuid().as_raw();
            if !md.is_dir() || md.uid() != me || md.mode() & 0o077 != 0 {
                return Err(CliError::usage(format!(
                    "{}: the shares' directory must be a directory (not a link) owned by you \
                     with mode 0700 (nobody else may enter it); choose a new --out path and \
                     it is created so",
                    out.display()
                )));
            }
        }
        Err(e) => return Err(CliError::from_io(e, out)),
    }
    let width = shares.to_string().len();
    let share_path = |i: u8| out.join(format!("share-{i:0width$}-of-{shares}.txt"));
    let public_path = out.join("recovery-public.txt");
    // Refuse before anything is made, so no partial set is left.
    for p in (1..=shares).map(share_path).chain([public_path.clone()]) {
        if p.symlink_metadata().is_ok() {
            return Err(CliError::new(
                exit::EXISTS,
                format!(
                    "{} already exists; refusing to overwrite it (choose another --out directory)",
                    p.display()
                ),
            ));
        }
    }
    let key = RecoveryPrivateKey::generate()?;
    let public = key.public_key().clone();
    let split = key.split(threshold, shares)?;
    drop(key);
    for s in &split {
        let text = s.to_text();
        let mut line = Zeroizing::new(String::with_capacity(text.len() + 1));
        line.push_str(&text);
        line.push('\n');
        write_new(&share_path(s.index()), line.as_bytes(), 0o600)?;
    }
    write_new(
        &public_path,
        format!("{}\n", public.to_text()).as_bytes(),
        0o644,
    )?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", public.key_ref())
        .and_then(|_| writeln!(stdout, "{}", public.to_text()))
        .map_err(|e| CliError::from_io(e, Path::new("-")))?;
    if !g.quiet {
        eprintln!(
            "wrote {shares} shares of recovery key {} (any {threshold} restore it) to {}, and its public key to {}",
            public.key_ref(),
            out.display(),
            public_path.display()
        );
        eprintln!(
            "give each share to one custodian and delete it here; encrypt with --key {} and \
             PHI_ENVELOPE_RECOVERY_PUBLIC_KEY set to the public key; restore with \
             `backup decrypt --recovery-share FILE ...` ({threshold} files)",
            public.key_ref()
        );
    }
    Ok(())
}
