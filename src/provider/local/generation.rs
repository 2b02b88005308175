//! Rollback protection: the highest generation this process has seen of
//! each keystore file, and the operator's generation file, which keeps that
//! mark across processes somewhere the keystore's directory does not reach.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::fsio::{self, keystore_error};
use crate::error::{Error, Result};

/// Highest generation seen, by canonical keystore path.
static SEEN: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());

fn seen_map() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, u64>> {
    SEEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key under which a keystore's mark is kept: its directory resolved
/// (symbolic links, `..`) joined with its file name, so that two spellings
/// of one path share a mark.
pub(super) fn canonical(path: &Path) -> PathBuf {
    let Some(name) = path.file_name() else {
        return path.to_owned();
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).map_or_else(|_| path.to_owned(), |d| d.join(name))
}

/// The error for a file older than a generation already seen.
pub(super) fn rolled_back(path: &Path, found: u64, seen: u64, by: &str, remedy: &str) -> Error {
    keystore_error(
        path,
        format!(
            "the keystore file was rolled back: it has generation {found}, but {by} has seen generation {seen}. \
             An older copy was put in place of the current file; it may hold key versions destroyed since \
             (and would make them usable again), so it is refused. Put the current keystore file back; if \
             restoring this older copy is intended (the current file is lost), {remedy}"
        ),
    )
}

/// Refuses `generation` if this process has seen a higher one of the
/// keystore `key`; otherwise raises the mark to it.
pub(super) fn check_and_raise(path: &Path, key: &Path, generation: u64) -> Result<()> {
    let mut seen = seen_map();
    let mark = seen.entry(key.to_owned()).or_insert(0);
    if generation < *mark {
        return Err(rolled_back(
            path,
            generation,
            *mark,
            "this process",
            "open it in a new process (and lower its generation file, if one is used)",
        ));
    }
    *mark = generation;
    Ok(())
}

/// Raises this process's mark of `key` to `generation` (a higher mark
/// stays).
pub(super) fn raise(key: &Path, generation: u64) {
    let mut seen = seen_map();
    let mark = seen.entry(key.to_owned()).or_insert(0);
    *mark = (*mark).max(generation);
}

/// Forgets every mark: fuzzing only, so that each input is loaded as a new
/// process would load it.
#[cfg(fuzzing)]
pub(super) fn forget_all() {
    seen_map().clear();
}

/// Sets this process's mark of `key` to `generation`: a keystore was
/// created at that path, on purpose.
pub(super) fn reset(key: &Path, generation: u64) {
    seen_map().insert(key.to_owned(), generation);
}

const NOT_OURS: &str =
    "not a keystore generation file (expected a decimal number and a newline, e.g. \"12\\n\"); \
     give the path of the file that phi-envelope keeps, or a path where none exists yet";

/// Reads a generation file: `None` if it does not exist. The same checks
/// as the keystore itself (no symbolic link, a regular file of ours, mode
/// 0600), then exactly `DIGITS "\n"`.
pub(super) fn read_file(path: &Path) -> Result<Option<u64>> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(keystore_error(
                path,
                format!("cannot read the keystore generation file: {e}"),
            ))
        }
        Ok(_) => {}
    }
    let (bytes, _) = fsio::read(path)?;
    let digits = bytes
        .strip_suffix(b"\n")
        .filter(|d| !d.is_empty() && d.len() <= 20 && d.iter().all(u8::is_ascii_digit))
        .ok_or_else(|| keystore_error(path, NOT_OURS))?;
    let text = std::str::from_utf8(digits).map_err(|_| keystore_error(path, NOT_OURS))?;
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| keystore_error(path, NOT_OURS))
}

/// Writes `generation` to the generation file, atomically (mode 0600).
pub(super) fn write_file(path: &Path, generation: u64) -> Result<()> {
    fsio::write_atomic(path, format!("{generation}\n").as_bytes(), false, None).map(|_| ())
}
