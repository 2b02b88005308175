//! File-system side of the keystore: permission checks, bounded reads, the
//! advisory lock, atomic replacement.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::file::MAX_FILE_LEN;
use super::hex;
use crate::error::{Error, Result};
use crate::primitives::fill_random;

pub(super) fn keystore_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Keystore {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io_error(path: &Path, what: &str, e: &io::Error) -> Error {
    keystore_error(path, format!("{what}: {e}"))
}

/// `PATH.lock`: the sidecar that writers lock. It is never deleted
/// (deleting a lock file lets two writers lock two different files).
pub(super) fn lock_path(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn options_0600() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

/// Takes the exclusive advisory lock of the keystore at `path` (blocking);
/// released when the returned file is dropped, or by the kernel when the
/// process dies.
pub(super) fn lock(path: &Path) -> Result<File> {
    let lp = lock_path(path);
    let f = options_0600()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lp)
        .map_err(|e| io_error(&lp, "cannot open the keystore lock file", &e))?;
    // flock(2) on Linux: held per open file description, so two values in
    // one process exclude each other like two processes do.
    f.lock()
        .map_err(|e| io_error(&lp, "cannot lock the keystore lock file", &e))?;
    Ok(f)
}

/// Refuses anything but a regular file that only its owner may access.
fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<()> {
    if !meta.is_file() {
        return Err(keystore_error(path, "not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(keystore_error(
                path,
                format!(
                    "its permissions {mode:04o} let group or others access it; the keystore must be readable by its owner only: run `chmod 600 {}`",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Reads the keystore file: no symbolic link, a regular file of mode 0600
/// (checked on the open handle), at most [`MAX_FILE_LEN`] bytes.
pub(super) fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(keystore_error(
                path,
                "is a symbolic link; give the path of the keystore file itself",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(keystore_error(
                path,
                "no such file; create a keystore with LocalKeystore::create",
            ))
        }
        Err(e) => return Err(io_error(path, "cannot read the keystore", &e)),
    }
    let f = File::open(path).map_err(|e| io_error(path, "cannot open the keystore", &e))?;
    let meta = f
        .metadata()
        .map_err(|e| io_error(path, "cannot read the keystore", &e))?;
    check_metadata(path, &meta)?;
    if meta.len() > MAX_FILE_LEN {
        return Err(keystore_error(
            path,
            "the file is larger than 16 MiB: not a phi-envelope keystore",
        ));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    f.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_error(path, "cannot read the keystore", &e))?;
    Ok(buf)
}

fn parent_and_name(path: &Path) -> Result<(PathBuf, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| keystore_error(path, "the keystore path must name a file"))?
        .to_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Is `entry` a temporary file of the keystore named `name`:
/// `.NAME.<16 hex digits>.tmp`?
fn is_temp_of(entry: &std::ffi::OsStr, name: &std::ffi::OsStr) -> bool {
    let (Some(entry), Some(name)) = (entry.to_str(), name.to_str()) else {
        return false;
    };
    entry
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(name))
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(".tmp"))
        .is_some_and(|id| id.len() == 16 && hex::decode(id).is_some())
}

/// Removes temporary files that a writer killed mid-write left behind.
/// Called with the lock held, so no live writer owns one.
pub(super) fn remove_stale_temps(path: &Path) {
    let Ok((dir, name)) = parent_and_name(path) else {
        return;
    };
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        if is_temp_of(&entry.file_name(), &name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory (unpredictable name, mode 0600, `O_EXCL`), fsync, then rename
/// over `path` (or, with `create`, a hard link that fails if `path`
/// exists), then fsync of the directory. On failure the temporary file is
/// removed and `path` is as it was.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], create: bool) -> Result<()> {
    let (dir, name) = parent_and_name(path)?;
    let mut id = [0u8; 8];
    fill_random(&mut id)?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(".{}.tmp", hex::encode(&id)));
    let tmp = dir.join(tmp_name);
    let mut f = options_0600()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            io_error(
                path,
                "cannot create a temporary file next to the keystore",
                &e,
            )
        })?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| {
        io_error(
            path,
            "cannot write the new keystore (the old one is intact)",
            &e,
        )
    });
    drop(f);
    let placed = written.and_then(|()| {
        if create {
            // A hard link never replaces an existing file. Where the file
            // system has no hard links, fall back to a rename: the caller
            // holds the lock and checked that `path` does not exist.
            match fs::hard_link(&tmp, path) {
                Ok(()) => {
                    let _ = fs::remove_file(&tmp);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(keystore_error(
                    path,
                    "already exists; open it instead of creating it (a keystore is never overwritten)",
                )),
                Err(_) if fs::symlink_metadata(path).is_err() => fs::rename(&tmp, path)
                    .map_err(|e| io_error(path, "cannot create the keystore", &e)),
                Err(e) => Err(io_error(path, "cannot create the keystore", &e)),
            }
        } else {
            fs::rename(&tmp, path).map_err(|e| {
                io_error(
                    path,
                    "cannot replace the keystore (the old one is intact)",
                    &e,
                )
            })
        }
    });
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&dir).map_err(|e| {
        io_error(
            path,
            "the keystore was written but its directory could not be synced, so the change may not survive a power failure",
            &e,
        )
    })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        let name = std::ffi::OsStr::new("keys.json");
        assert!(is_temp_of(".keys.json.0123456789abcdef.tmp".as_ref(), name));
        for other in [
            "keys.json",
            ".keys.json.tmp",
            ".keys.json.0123456789ABCDEF.tmp",
            ".keys.json.0123456789abcde.tmp",
            ".other.json.0123456789abcdef.tmp",
            ".keys.json.0123456789abcdef.tmp.bak",
        ] {
            assert!(!is_temp_of(other.as_ref(), name), "{other}");
        }
    }
}
