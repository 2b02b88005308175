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

/// Options that never follow a symbolic link in the last component
/// (`O_NOFOLLOW`: the open fails with `ELOOP`) and never block on a FIFO or
/// a device (`O_NONBLOCK`; harmless on a regular file).
fn no_follow(mut o: OpenOptions) -> OpenOptions {
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32);
    }
    o
}

#[cfg(unix)]
fn is_symlink_loop(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
}

#[cfg(not(unix))]
fn is_symlink_loop(_: &io::Error) -> bool {
    false
}

/// What identifies one version of the keystore file without reading it:
/// device, inode, size, modification and change times (nanoseconds). Every
/// write replaces the file (a new inode) and sets a modification time later
/// than the replaced file's, so two versions written by phi-envelope never
/// share an identity; any other change of the file changes its change time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Identity {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Identity {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or((0, 0), |d| {
                    (d.as_secs() as i64, i64::from(d.subsec_nanos()))
                });
            Identity {
                dev: 0,
                ino: 0,
                size: meta.len(),
                mtime,
                ctime: mtime,
            }
        }
    }

    /// The modification time as a `SystemTime`.
    fn modified(self) -> std::time::SystemTime {
        let (s, ns) = self.mtime;
        let base = if s >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s as u64)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(s.unsigned_abs())
        };
        base + std::time::Duration::from_nanos(ns.clamp(0, 999_999_999) as u64)
    }
}

#[cfg(unix)]
fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Refuses a keystore directory that anyone but its user (and root) can
/// change: owned by another user, or writable by group or others without
/// the sticky bit. In a sticky directory (like `/tmp`) others cannot
/// rename or delete our files; that the files are ours is checked on each
/// of them.
pub(super) fn check_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (dir, _) = parent_and_name(path)?;
        let meta = fs::metadata(&dir).map_err(|e| {
            io_error(
                path,
                &format!("cannot check the keystore's directory {}", dir.display()),
                &e,
            )
        })?;
        let me = euid();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(keystore_error(
                path,
                format!(
                    "its directory {} belongs to another user (uid {}), who could replace the keystore; \
                     keep the keystore in a directory of your own (mode 0700)",
                    dir.display(),
                    meta.uid()
                ),
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(keystore_error(
                path,
                format!(
                    "its directory {} has mode {mode:04o}: others can write it, and so replace the keystore \
                     or plant its lock file; run `chmod go-w {}` or keep the keystore in a directory of your \
                     own (mode 0700)",
                    dir.display(),
                    dir.display()
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Takes the exclusive advisory lock of the keystore at `path` (blocking);
/// released when the returned file is dropped, or by the kernel when the
/// process dies. The lock file is opened without following a symbolic
/// link and without blocking, and must be a regular file of our own:
/// whoever can plant a link there cannot make us create or lock a file
/// elsewhere.
pub(super) fn lock(path: &Path) -> Result<File> {
    check_dir(path)?;
    let lp = lock_path(path);
    let mut o = options_0600();
    o.read(true).write(true).create(true).truncate(false);
    let f = no_follow(o).open(&lp).map_err(|e| {
        if is_symlink_loop(&e) {
            keystore_error(
                &lp,
                "the keystore lock file is a symbolic link; refusing to follow it (someone may be trying \
                 to make you create or lock another file): remove it",
            )
        } else {
            io_error(&lp, "cannot open the keystore lock file", &e)
        }
    })?;
    let meta = f
        .metadata()
        .map_err(|e| io_error(&lp, "cannot check the keystore lock file", &e))?;
    if !meta.is_file() {
        return Err(keystore_error(
            &lp,
            "the keystore lock file is not a regular file; remove it",
        ));
    }
    check_owner(&lp, &meta, "the keystore lock file")?;
    // flock(2) on Linux: held per open file description, so two values in
    // one process exclude each other like two processes do.
    f.lock()
        .map_err(|e| io_error(&lp, "cannot lock the keystore lock file", &e))?;
    Ok(f)
}

fn check_owner(path: &Path, meta: &fs::Metadata, what: &str) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != euid() {
            return Err(keystore_error(
                path,
                format!(
                    "{what} belongs to another user (uid {}, we are uid {}); refusing to use it",
                    meta.uid(),
                    euid()
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, meta, what);
    Ok(())
}

/// Refuses anything but a regular file of our own that only its owner may
/// access.
fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<()> {
    if meta.file_type().is_symlink() {
        return Err(keystore_error(
            path,
            "is a symbolic link; give the path of the keystore file itself",
        ));
    }
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
    check_owner(path, meta, "the file")
}

fn not_found(path: &Path) -> Error {
    keystore_error(
        path,
        "no such file; create a keystore with LocalKeystore::create",
    )
}

/// The identity of the file at `path` now (one `lstat`), with the checks
/// of [`read`]: a regular file of ours, mode 0600, no symbolic link.
pub(super) fn identity(path: &Path) -> Result<Identity> {
    let meta = fs::symlink_metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            not_found(path)
        } else {
            io_error(path, "cannot read the keystore", &e)
        }
    })?;
    check_metadata(path, &meta)?;
    Ok(Identity::of(&meta))
}

/// Reads the keystore file: opened without following a symbolic link and
/// without blocking, a regular file of ours of mode 0600 (checked on the
/// open handle), at most [`MAX_FILE_LEN`] bytes. Returns the bytes and the
/// identity of the file they were read from.
pub(super) fn read(path: &Path) -> Result<(Zeroizing<Vec<u8>>, Identity)> {
    let mut o = OpenOptions::new();
    o.read(true);
    let f = no_follow(o).open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            not_found(path)
        } else if is_symlink_loop(&e) {
            keystore_error(
                path,
                "is a symbolic link; give the path of the keystore file itself",
            )
        } else {
            io_error(path, "cannot open the keystore", &e)
        }
    })?;
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
    Ok((buf, Identity::of(&meta)))
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
///
/// The new file's modification time is set later than `replaced` (the
/// identity of the file it replaces), so that no two versions share an
/// [`Identity`]. Returns the identity of the new file, or `None` when
/// another change slipped in right after the rename (the caller then
/// reloads at its next use).
pub(super) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    create: bool,
    replaced: Option<Identity>,
) -> Result<Option<Identity>> {
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
    let written = f
        .write_all(bytes)
        .map(|()| {
            // Best effort: where times cannot be set, the change time and
            // the inode still tell versions apart in practice.
            let _ = later_than(&f, replaced);
        })
        .and_then(|()| f.sync_all())
        .map_err(|e| {
            io_error(
                path,
                "cannot write the new keystore (the old one is intact)",
                &e,
            )
        });
    let written_ino = f.metadata().ok().map(|m| Identity::of(&m).ino);
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
    })?;
    let now = fs::symlink_metadata(path).ok().map(|m| Identity::of(&m));
    Ok(now.filter(|id| Some(id.ino) == written_ino))
}

/// Sets the modification time of the new file `f` later than that of the
/// file it replaces: now, or 1 ms after it when the clock is behind; 1 s
/// after it on a file system whose timestamps are coarser.
fn later_than(f: &File, replaced: Option<Identity>) -> io::Result<()> {
    let Some(old) = replaced else {
        return Ok(());
    };
    let old_time = old.modified();
    let now = std::time::SystemTime::now();
    let min = old_time + std::time::Duration::from_millis(1);
    f.set_modified(now.max(min))?;
    if Identity::of(&f.metadata()?).mtime <= old.mtime {
        f.set_modified(old_time + std::time::Duration::from_secs(1))?;
    }
    Ok(())
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
