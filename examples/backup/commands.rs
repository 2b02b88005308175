//! What the data commands (encrypt, decrypt, verify, inspect, rewrap,
//! clean) share: `--context` pairs, the engine's options, the refusal of
//! an existing output, the kind of a backup, opening an input and reading
//! its header before any key is touched, the names shown for `-`, and the
//! removal of a temporary tree.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::thread::JoinHandle;

use phi_envelope::envelope::inspect_reader;
use phi_envelope::file::FileOptions;
use phi_envelope::{EncryptionContext, Header};

use crate::streams::{is_std, stdin_file};
use crate::{exit, CliError, Global};

/// Parses `--context k=v` pairs.
pub fn context(pairs: &[String]) -> Result<EncryptionContext, CliError> {
    let mut ctx = EncryptionContext::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("--context {p:?} is not KEY=VALUE")))?;
        ctx.insert(k, v)
            .map_err(|e| CliError::usage(format!("--context {k:?}: {e}")))?;
    }
    Ok(ctx)
}

pub fn file_options(g: &Global, force: bool) -> FileOptions {
    FileOptions::new()
        .threads(g.threads.unwrap_or(0))
        .overwrite(force)
}

/// An existing output is refused before any key is touched (exit 5).
pub fn refuse_existing(output: &Path, force: bool) -> Result<(), CliError> {
    if !force && !is_std(output) && output.symlink_metadata().is_ok() {
        return Err(CliError::new(
            exit::EXISTS,
            format!(
                "{} already exists; refusing to overwrite it (pass --force to replace it once the new one is complete)",
                output.display()
            ),
        ));
    }
    Ok(())
}

/// The kind of a backup's plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Directory => "directory",
        }
    }
}

pub fn join<T>(h: JoinHandle<Result<T, CliError>>) -> Result<T, CliError> {
    h.join().unwrap_or_else(|_| {
        Err(CliError::new(
            exit::INTERNAL,
            "internal error: a worker thread panicked (this is a bug; please report it)".into(),
        ))
    })
}

/// Removes a temporary restore directory (never follows links; makes
/// read-only directories writable first).
pub fn remove_tree(p: &Path) {
    if fs::remove_dir_all(p).is_ok() {
        return;
    }
    fn unlock(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = p.symlink_metadata() {
            if md.is_dir() {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
                if let Ok(rd) = fs::read_dir(p) {
                    for e in rd.flatten() {
                        unlock(&e.path());
                    }
                }
            }
        }
    }
    unlock(p);
    let _ = fs::remove_dir_all(p);
}

/// Opens an input and checks its header before any key is touched. A
/// seekable file is checked whole (length and header); stdin only by its
/// header, when read.
pub fn open_input(input: &Path) -> Result<(File, Option<u64>, Option<Header>), CliError> {
    if is_std(input) {
        return Ok((
            stdin_file().map_err(|e| CliError::from_io(e, input))?,
            None,
            None,
        ));
    }
    let mut f = File::open(input).map_err(|e| CliError::from_io(e, input))?;
    let md = f.metadata().map_err(|e| CliError::from_io(e, input))?;
    if md.is_dir() {
        return Err(CliError::usage(format!(
            "{} is a directory, not a backup file",
            input.display()
        )));
    }
    if md.len() == 0 {
        return Err(CliError::integrity(format!(
            "{} is empty: not a phi-envelope backup",
            input.display()
        )));
    }
    let info = inspect_reader(&mut f).map_err(|e| CliError::from_lib(e, input))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| CliError::from_io(e, input))?;
    Ok((f, Some(md.len()), Some(info.header)))
}

/// Refuses an `s3://` path in a build without the `s3` feature (with it,
/// the callers handle those paths before they get here).
pub fn no_s3(path: &Path) -> Result<(), CliError> {
    if path.to_str().is_some_and(|p| p.starts_with("s3://")) {
        return Err(CliError::usage(format!(
            "{}: this build has no object-storage support (build the CLI with --features s3)",
            path.display()
        )));
    }
    Ok(())
}

/// The header and size of a backup in object storage, read with ranged
/// GETs of the header only; `None` for a local path.
pub fn remote_header(input: &Path) -> Result<Option<(Header, u64)>, CliError> {
    #[cfg(feature = "s3")]
    if let Some(loc) = crate::s3::parse(input, false) {
        let (h, size, _) = crate::s3::Store::connect()?.header(&loc?)?;
        return Ok(Some((h, size)));
    }
    no_s3(input)?;
    Ok(None)
}

/// Plaintext never goes to or comes from object storage: an `s3://` path
/// where plaintext is read or written (the input of `encrypt`, the output
/// of `decrypt`) is refused before anything is done.
pub fn refuse_plaintext_in_s3(path: &Path, what: &str) -> Result<(), CliError> {
    if path.to_str().is_some_and(|p| p.starts_with("s3://")) {
        return Err(CliError::usage(format!(
            "{}: the {what} is plaintext, which stays on this machine; s3:// is for backups \
             (the -o of encrypt, the input of decrypt, verify, inspect and rewrap)",
            path.display()
        )));
    }
    Ok(())
}

/// An input the engine reads: a file, stdin, or an object in S3.
pub type Input = Box<dyn std::io::Read + Send>;

/// [`open_input`] for any backup path: a file, `-`, or `s3://BUCKET/KEY`
/// (its header read with a ranged GET before any key is touched).
pub fn open_any(input: &Path) -> Result<(Input, Option<u64>, Option<Header>), CliError> {
    #[cfg(feature = "s3")]
    if let Some(loc) = crate::s3::parse(input, false) {
        let loc = loc?;
        let store = crate::s3::Store::connect()?;
        let (header, size, etag) = store.header(&loc)?;
        let reader = store.download(&loc, size, &etag, store.tuning.part_size);
        return Ok((Box::new(reader), Some(size), Some(header)));
    }
    no_s3(input)?;
    let (f, len, h) = open_input(input)?;
    Ok((Box::new(f), len, h))
}

pub fn schemes_of_header(h: &Header) -> BTreeSet<String> {
    h.recipients().iter().map(|r| r.provider.clone()).collect()
}

/// The keys `h` wraps the data key to, as `REF vN`, in the header's order.
pub fn wrapped_to(h: &Header) -> Vec<String> {
    h.recipients()
        .iter()
        .map(|r| format!("{} v{}", r.key_ref, r.key_version))
        .collect()
}
