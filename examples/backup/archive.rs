//! Directory backups: a tar stream inside the envelope, written from a
//! directory tree and restored, or only checked, with the rules of
//! docs/CLI.md ("Directory backups").
//!
//! The plaintext of a directory backup is a tar archive (GNU headers)
//! whose first entry is the marker file `.phi-envelope-backup`: a small
//! JSON document naming the format and carrying the root directory's mode
//! and mtime. The marker is how `decrypt` and `verify` tell a directory
//! backup from a file backup; it is inside the authenticated plaintext, so
//! it is as trustworthy as the data, and it is not part of the encryption
//! context (which therefore stays exactly what the operator typed).
//!
//! Restoring refuses, before anything is released: absolute paths, `..`
//! components, entries that go through a symbolic link, symbolic links
//! whose target leaves the restored tree (checked by resolving every link
//! through the links of the archive itself, and again on disk), hard links
//! to anything but a regular file restored earlier, duplicate entries,
//! device nodes, FIFOs and other special files, and trailing data; and,
//! before any tree work, paths and link targets longer than
//! [`MAX_PATH_LEN`] bytes and paths deeper than [`MAX_DEPTH`].
//!
//! Both directions work on descriptors, never on paths below the root:
//! the walker ([`walk`]) opens every entry relative to its parent's
//! descriptor without following links and checks it is what the listing
//! saw; the restorer ([`restore`]) creates every entry relative to the
//! restore directory's descriptor. A link swapped in anywhere, in the
//! tree being backed up or around the directory being restored, is never
//! followed.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use serde_json::json;

use crate::{exit, CliError};

#[path = "restore.rs"]
mod restore;
#[path = "walk.rs"]
mod walk;

pub use restore::read;
pub use walk::{total_size, write, WriteOptions};

/// The name of the marker entry, first in every directory backup.
pub const MARKER_NAME: &str = ".phi-envelope-backup";
/// The `format` member of the marker.
pub const MARKER_FORMAT: &str = "phi-envelope-backup";
/// The version of the directory-backup layout this tool writes and reads.
pub const LAYOUT_VERSION: u64 = 1;
/// The largest marker accepted.
const MAX_MARKER_LEN: u64 = 64 * 1024;
/// How many symbolic links one path may go through.
const MAX_LINK_HOPS: usize = 40;
/// Permission bits restored: rwx for all, and the sticky bit. Set-user-ID
/// and set-group-ID bits are never restored.
const MODE_MASK: u32 = 0o1777;
/// The size of the tar block.
const BLOCK: usize = 512;
/// The longest path (relative to the root of the tree) and the longest
/// symbolic-link target accepted, in bytes: `PATH_MAX` (4096) less its
/// terminating NUL, the most a link can hold on Linux. GNU long names are
/// otherwise unbounded, and every byte costs tree work.
pub const MAX_PATH_LEN: usize = 4095;
/// The deepest path accepted, in components (`a/b/c` is 3): real trees are
/// far shallower, and both directions hold one descriptor per level.
pub const MAX_DEPTH: usize = 1024;

/// What an archive holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of regular-file data.
    pub bytes: u64,
    /// Special files skipped while archiving.
    pub skipped: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} files, {} directories, {}",
            self.files + self.hardlinks,
            self.dirs,
            crate::output::human_bytes(self.bytes)
        );
        if self.symlinks > 0 {
            s.push_str(&format!(", {} symlinks", self.symlinks));
        }
        s
    }
}

/// True when `first` (the first 512 bytes of a plaintext) is the header of
/// the marker entry of a directory backup: name, type, magic and checksum.
pub fn is_directory_backup(first: &[u8]) -> bool {
    if first.len() < BLOCK {
        return false;
    }
    let h = &first[..BLOCK];
    let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    if &h[..name_end] != MARKER_NAME.as_bytes() {
        return false;
    }
    if !matches!(h[156], b'0' | 0) {
        return false;
    }
    if &h[257..262] != b"ustar" {
        return false;
    }
    let stored = std::str::from_utf8(&h[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let computed: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    stored == Some(computed)
}

/// The marker's content.
#[derive(Clone, Debug)]
pub struct Marker {
    pub root_mode: u32,
    pub root_mtime: i64,
}

/// The marker of a tree whose root has `mode` and `mtime`.
fn marker_json(mode: u32, mtime: i64) -> Vec<u8> {
    let doc = json!({
        "format": MARKER_FORMAT,
        "version": LAYOUT_VERSION,
        "kind": "directory",
        "root_mode": mode & MODE_MASK,
        "root_mtime": mtime,
        "created": crate::output::rfc3339(SystemTime::now()),
        "tool": concat!("phi-envelope backup ", env!("CARGO_PKG_VERSION")),
    });
    let mut out = doc.to_string().into_bytes();
    out.push(b'\n');
    out
}

fn parse_marker(bytes: &[u8]) -> Result<Marker, CliError> {
    let bad = |why: &str| {
        CliError::integrity(format!(
            "the directory backup's marker is invalid ({why}); restore with `decrypt --raw` to get the tar stream as is"
        ))
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| bad("not JSON"))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(MARKER_FORMAT) {
        return Err(bad("unknown format"));
    }
    match v.get("version").and_then(|f| f.as_u64()) {
        Some(LAYOUT_VERSION) => {}
        Some(other) => {
            return Err(CliError::integrity(format!(
                "this directory backup uses layout version {other}, which this tool does not know; \
                 use a newer phi-envelope backup, or `decrypt --raw` to get the tar stream"
            )))
        }
        None => return Err(bad("no version")),
    }
    let root_mode = v
        .get("root_mode")
        .and_then(|m| m.as_u64())
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| bad("no root_mode"))?;
    let root_mtime = v
        .get("root_mtime")
        .and_then(|m| m.as_i64())
        .ok_or_else(|| bad("no root_mtime"))?;
    Ok(Marker {
        root_mode: root_mode & MODE_MASK,
        root_mtime,
    })
}

// ---------------------------------------------------------------------------
// The tree as the archive describes it.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File,
    Symlink(PathBuf),
}

/// Every path of an archive and what it is: the restored tree, without
/// touching the disk. Used to refuse anything that would escape it.
#[derive(Default)]
struct Tree {
    nodes: HashMap<PathBuf, Node>,
    /// Symbolic links, in archive order.
    links: Vec<PathBuf>,
}

#[derive(Debug)]
enum Escape {
    Absolute,
    Outside,
    Loop,
}

impl Tree {
    /// The parents of `rel` must be directories (or absent: then they will
    /// be created as directories); never a symbolic link or a file.
    ///
    /// Linear in the length of `rel`: every directory in `nodes` has only
    /// directories above it (this function is what puts them there), so
    /// the walk up stops at the first one known, and a deep path costs
    /// each of its new levels once.
    fn check_parents(&mut self, rel: &Path) -> Result<(), String> {
        let mut missing = Vec::new();
        let mut cur = rel.parent();
        while let Some(p) = cur.filter(|p| !p.as_os_str().is_empty()) {
            match self.nodes.get(p) {
                Some(Node::Dir) => break,
                Some(Node::Symlink(_)) => {
                    return Err(format!("it goes through the symbolic link {}", q(p)))
                }
                Some(Node::File) => return Err(format!("{} is not a directory", q(p))),
                None => missing.push(p),
            }
            cur = p.parent();
        }
        for p in missing {
            self.nodes.insert(p.to_path_buf(), Node::Dir);
        }
        Ok(())
    }

    /// Like [`check_parents`](Self::check_parents) without adding
    /// anything: every parent of `rel` is a directory of the archive.
    fn parents_are_dirs(&self, rel: &Path) -> bool {
        rel.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .is_none_or(|p| self.nodes.get(p) == Some(&Node::Dir))
    }

    /// Resolves `target` from the directory `from` (both inside the tree)
    /// through the archive's own symbolic links, like the kernel would once
    /// the tree is restored. A path that does not exist resolves lexically.
    ///
    /// Each component costs one step (the path so far is kept, not rebuilt)
    /// and one lookup of at most [`MAX_PATH_LEN`] bytes (no node has a
    /// longer path), so with targets bounded in length and at most
    /// [`MAX_LINK_HOPS`] links followed, the work is bounded too.
    fn resolve(&self, from: &Path, target: &Path) -> Result<PathBuf, Escape> {
        let mut stack: Vec<OsString> = from.iter().map(|c| c.to_os_string()).collect();
        let mut here: PathBuf = from.to_path_buf();
        let mut queue: VecDeque<Component<'_>> = target.components().collect();
        // Owned components of the links followed so far (the queue borrows
        // from them).
        let mut hops = 0;
        let mut pending: VecDeque<OsString> = VecDeque::new();
        loop {
            let comp: Option<OsString> = if let Some(p) = pending.pop_front() {
                Some(p)
            } else {
                match queue.pop_front() {
                    None => None,
                    Some(Component::RootDir | Component::Prefix(_)) => {
                        return Err(Escape::Absolute)
                    }
                    Some(Component::CurDir) => continue,
                    Some(Component::ParentDir) => Some(OsString::from("..")),
                    Some(Component::Normal(n)) => Some(n.to_os_string()),
                }
            };
            let Some(comp) = comp else { break };
            if comp == "." {
                continue;
            }
            if comp == ".." {
                if stack.pop().is_none() {
                    return Err(Escape::Outside);
                }
                here.pop();
                continue;
            }
            here.push(&comp);
            stack.push(comp);
            let node = if here.as_os_str().len() <= MAX_PATH_LEN {
                self.nodes.get(&here)
            } else {
                None
            };
            if let Some(Node::Symlink(t)) = node {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(Escape::Loop);
                }
                stack.pop();
                here.pop();
                let mut expanded: VecDeque<OsString> = VecDeque::new();
                for c in t.components() {
                    match c {
                        Component::RootDir | Component::Prefix(_) => return Err(Escape::Absolute),
                        Component::CurDir => {}
                        Component::ParentDir => expanded.push_back("..".into()),
                        Component::Normal(n) => expanded.push_back(n.to_os_string()),
                    }
                }
                // The link's target comes before what is left of the path.
                expanded.extend(pending.drain(..));
                pending = expanded;
            }
        }
        Ok(here)
    }

    /// Whether the symbolic link `rel -> target` stays inside the tree.
    fn check_symlink(&self, rel: &Path, target: &Path) -> Result<(), String> {
        if target.as_os_str().is_empty() {
            return Err("it has an empty target".into());
        }
        if target.as_os_str().len() > MAX_PATH_LEN {
            return Err(format!(
                "its target is longer than {MAX_PATH_LEN} bytes ({} bytes)",
                target.as_os_str().len()
            ));
        }
        let from = rel.parent().unwrap_or(Path::new(""));
        match self.resolve(from, target) {
            Ok(_) => Ok(()),
            Err(Escape::Absolute) => Err(format!(
                "its target {} is absolute (or goes through an absolute link)",
                q(target)
            )),
            Err(Escape::Outside) => Err(format!(
                "its target {} points outside the restored directory",
                q(target)
            )),
            Err(Escape::Loop) => Err(format!(
                "its target {} goes through too many symbolic links",
                q(target)
            )),
        }
    }

    /// Every link again, now that all of them are known (a later link can
    /// change where an earlier one leads).
    fn check_all_symlinks(&self) -> Result<(), CliError> {
        for link in &self.links {
            if let Some(Node::Symlink(t)) = self.nodes.get(link) {
                self.check_symlink(link, t)
                    .map_err(|why| refused(link, &why))?;
            }
        }
        Ok(())
    }
}

/// A path for messages: quoted, escaped, and cut after 200 bytes (a
/// hostile name can be any length).
fn q(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    if bytes.len() <= 200 {
        return format!("{:?}", p.as_os_str());
    }
    let head = std::ffi::OsStr::from_bytes(&bytes[..200]);
    format!("{head:?}... ({} bytes)", bytes.len())
}

/// Why `rel` (relative to the root, normalised) is too long or too deep
/// for a directory backup, if it is.
fn over_limits(rel: &Path) -> Option<String> {
    let len = rel.as_os_str().len();
    if len > MAX_PATH_LEN {
        return Some(format!(
            "its path is longer than {MAX_PATH_LEN} bytes ({len} bytes)"
        ));
    }
    let depth = rel.components().count();
    if depth > MAX_DEPTH {
        return Some(format!(
            "its path is deeper than {MAX_DEPTH} levels ({depth} levels)"
        ));
    }
    None
}

fn refused(path: &Path, why: &str) -> CliError {
    CliError::integrity(format!(
        "unsafe archive, refusing to restore: entry {} is rejected because {why}; nothing was restored",
        q(path)
    ))
}

/// The relative, normalised path of an entry; refuses absolute paths,
/// `..`, and paths over the limits (the length first, before anything
/// else is done with the path).
fn entry_path(raw: &Path) -> Result<PathBuf, CliError> {
    let len = raw.as_os_str().len();
    if len > MAX_PATH_LEN {
        return Err(refused(
            raw,
            &format!("its path is longer than {MAX_PATH_LEN} bytes ({len} bytes)"),
        ));
    }
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(raw, "it contains `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(raw, "its path is absolute"))
            }
        }
    }
    if let Some(why) = over_limits(&out) {
        return Err(refused(raw, &why));
    }
    Ok(out)
}

/// Makes sure this process may hold a descriptor per level of the
/// deepest tree accepted (plus what the pipeline needs): raises the soft
/// limit on open files towards the hard one when it is lower.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    const WANT: u64 = 4 * MAX_DEPTH as u64;
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|cur| cur < WANT) {
        lim.current = Some(lim.maximum.map_or(WANT, |max| max.min(WANT)));
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// A rustix error as an I/O error about `path`.
fn sys(e: rustix::io::Errno, path: &Path) -> CliError {
    CliError::from_io(io::Error::from(e), path)
}

impl CliError {
    /// An error reading the tar stream: a damaged archive (the envelope
    /// authenticated it, so it was written that way), or a signal.
    fn archive(e: io::Error) -> CliError {
        if crate::interrupt::interrupted() {
            return CliError::interrupted();
        }
        CliError::integrity(format!(
            "the directory archive inside the backup is damaged: {e}"
        ))
    }

    /// An error writing the tar stream into the pipeline.
    pub fn pipe(e: io::Error) -> CliError {
        if crate::interrupt::interrupted() {
            return CliError::interrupted();
        }
        CliError::new(exit::IO, format!("archiving failed: {e}"))
    }
}
