//! Atomic file output: write to a temporary file beside the target, fsync,
//! rename over the target, fsync the directory. Until [`AtomicFile::commit`]
//! succeeds nothing exists under the final name; if the writer is dropped
//! or any step fails, the temporary file is removed.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::primitives::fill_random;

/// A file being written that appears under its final name only on
/// [`commit`](Self::commit).
pub struct AtomicFile {
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    overwrite: bool,
}

impl fmt::Debug for AtomicFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicFile")
            .field("target", &self.target)
            .field("temp", &self.temp)
            .finish()
    }
}

impl AtomicFile {
    /// Starts writing `target`. The temporary file is created beside it with
    /// an unpredictable name, mode 0600 (on Unix), refusing to follow or
    /// reuse an existing file. With `overwrite` false, an existing target is
    /// refused now and again at commit time.
    pub fn create(target: impl AsRef<Path>, overwrite: bool) -> Result<AtomicFile> {
        let target = target.as_ref().to_path_buf();
        if !overwrite && target.symlink_metadata().is_ok() {
            return Err(exists(&target));
        }
        let dir = parent_dir(&target);
        let name = target.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("{} is not a file path", target.display()))
        })?;
        let mut rnd = [0u8; 8];
        fill_random(&mut rnd)?;
        let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{suffix}.tmp"));
        let temp = dir.join(temp_name);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&temp)?;
        Ok(AtomicFile {
            file: Some(file),
            temp,
            target,
            overwrite,
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is present until commit")
    }

    /// Fsyncs the data, renames it over the target and fsyncs the
    /// directory. Only after this returns `Ok` does the target exist with
    /// the new contents.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("file is present until commit");
        file.sync_all()?;
        drop(file);
        if self.overwrite {
            fs::rename(&self.temp, &self.target)?;
            // The rename is done: the temp name no longer exists.
            self.temp = PathBuf::new();
        } else {
            // A hard link fails atomically if the target exists, so a file
            // created meanwhile by someone else is never clobbered.
            fs::hard_link(&self.temp, &self.target).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    exists(&self.target)
                } else {
                    Error::Io(e)
                }
            })?;
            // The data is durable under the final name; drop the temp name
            // (Drop removes it).
        }
        sync_dir(&parent_dir(&self.target))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

fn exists(target: &Path) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{} already exists (refusing to overwrite)",
            target.display()
        ),
    ))
}

fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fsyncs a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_under_the_final_name_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&target, false).unwrap();
        f.write_all(b"partial").unwrap();
        assert!(!target.exists());
        let temp = f.temp_path().to_path_buf();
        assert!(temp.exists());
        drop(f);
        assert!(!temp.exists() && !target.exists(), "dropped: temp removed");

        let mut f = AtomicFile::create(&target, false).unwrap();
        f.write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"whole");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        fs::write(&target, b"old").unwrap();
        assert!(AtomicFile::create(&target, false).is_err());
        let mut f = AtomicFile::create(&target, true).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn target_created_meanwhile_is_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&target, false).unwrap();
        f.write_all(b"mine").unwrap();
        fs::write(&target, b"theirs").unwrap();
        assert!(f.commit().is_err());
        assert_eq!(fs::read(&target).unwrap(), b"theirs");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temp removed");
    }
}
