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
//! device nodes, FIFOs and other special files, and trailing data.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::ProgressBar;
use serde_json::json;
use tar::{Archive, Builder, EntryType, Header};

use crate::util::check_interrupt;
use crate::{exit, CliError};

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
            crate::util::human_bytes(self.bytes)
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

fn marker_json(root: &fs::Metadata) -> Vec<u8> {
    let doc = json!({
        "format": MARKER_FORMAT,
        "version": LAYOUT_VERSION,
        "kind": "directory",
        "root_mode": root.mode() & MODE_MASK,
        "root_mtime": root.mtime(),
        "created": crate::util::rfc3339(SystemTime::now()),
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
    fn check_parents(&mut self, rel: &Path) -> Result<(), String> {
        let mut cur = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            cur.push(c);
            match self.nodes.get(&cur) {
                None => {
                    self.nodes.insert(cur.clone(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(Node::Symlink(_)) => {
                    return Err(format!("it goes through the symbolic link {}", q(&cur)))
                }
                Some(Node::File) => return Err(format!("{} is not a directory", q(&cur))),
            }
        }
        Ok(())
    }

    /// Resolves `target` from the directory `from` (both inside the tree)
    /// through the archive's own symbolic links, like the kernel would once
    /// the tree is restored. A path that does not exist resolves lexically.
    fn resolve(&self, from: &Path, target: &Path) -> Result<PathBuf, Escape> {
        let mut stack: Vec<OsString> = from.iter().map(|c| c.to_os_string()).collect();
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
                continue;
            }
            stack.push(comp);
            let here: PathBuf = stack.iter().collect();
            if let Some(Node::Symlink(t)) = self.nodes.get(&here) {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(Escape::Loop);
                }
                stack.pop();
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
        Ok(stack.iter().collect())
    }

    /// Whether the symbolic link `rel -> target` stays inside the tree.
    fn check_symlink(&self, rel: &Path, target: &Path) -> Result<(), String> {
        if target.as_os_str().is_empty() {
            return Err("it has an empty target".into());
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

/// A path for messages: quoted, escaped.
fn q(p: &Path) -> String {
    format!("{:?}", p.as_os_str())
}

fn refused(path: &Path, why: &str) -> CliError {
    CliError::integrity(format!(
        "unsafe archive, refusing to restore: entry {} is rejected because {why}; nothing was restored",
        q(path)
    ))
}

/// The relative, normalised path of an entry; refuses absolute paths and
/// `..`.
fn entry_path(raw: &Path) -> Result<PathBuf, CliError> {
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
    Ok(out)
}

// ---------------------------------------------------------------------------
// Writing.

/// Options of [`write`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// Skip (with a warning) symbolic links that a restore would refuse,
    /// instead of failing.
    pub skip_outside_links: bool,
    pub quiet: bool,
}

/// The total size of the regular files under `root` (for the progress
/// bar); errors count as zero, the real walk reports them.
pub fn total_size(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    total
}

/// Archives the directory `root` into `out`: the marker, then every entry
/// in a stable order (names sorted bytewise, parents before children).
pub fn write<W: Write>(
    root: &Path,
    out: W,
    opts: WriteOptions,
    bar: &ProgressBar,
) -> Result<Stats, CliError> {
    let root_md = fs::metadata(root).map_err(|e| CliError::from_io(e, root))?;
    let mut b = Builder::new(BufWriter::with_capacity(1 << 20, out));
    let marker = marker_json(&root_md);
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(marker.len() as u64);
    h.set_mode(0o600);
    h.set_mtime(now_secs());
    b.append_data(&mut h, MARKER_NAME, &marker[..])
        .map_err(CliError::pipe)?;

    let mut w = Walker {
        b,
        tree: Tree::default(),
        stats: Stats::default(),
        opts,
        bar,
    };
    w.walk(root, Path::new(""))?;
    w.tree.check_all_symlinks().map_err(|e| {
        CliError::usage(format!(
            "{}; remove the link, or pass --skip-outside-links",
            e.message
                .replace("refusing to restore", "a restore would refuse it")
        ))
    })?;
    let stats = w.stats;
    let mut inner = w.b.into_inner().map_err(CliError::pipe)?;
    inner.flush().map_err(CliError::pipe)?;
    Ok(stats)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Walker<'a, W: Write> {
    b: Builder<BufWriter<W>>,
    tree: Tree,
    stats: Stats,
    opts: WriteOptions,
    bar: &'a ProgressBar,
}

impl<W: Write> Walker<'_, W> {
    fn header(md: &fs::Metadata, ty: EntryType, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(size);
        h.set_mode(md.mode() & 0o7777);
        h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
        h.set_uid(u64::from(md.uid()));
        h.set_gid(u64::from(md.gid()));
        h
    }

    fn warn(&self, msg: String) {
        if !self.opts.quiet {
            self.bar.suspend(|| eprintln!("backup: warning: {msg}"));
        }
    }

    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<(), CliError> {
        let mut entries = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| CliError::from_io(e, dir))? {
            entries.push(e.map_err(|e| CliError::from_io(e, dir))?);
        }
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            check_interrupt().map_err(CliError::pipe)?;
            let abs = e.path();
            let rel = rel.join(e.file_name());
            let md = abs
                .symlink_metadata()
                .map_err(|e| CliError::from_io(e, &abs))?;
            let ft = md.file_type();
            if ft.is_dir() {
                self.tree.nodes.insert(rel.clone(), Node::Dir);
                let mut h = Self::header(&md, EntryType::Directory, 0);
                self.b
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(CliError::pipe)?;
                self.stats.dirs += 1;
                self.walk(&abs, &rel)?;
            } else if ft.is_file() {
                let file = File::open(&abs).map_err(|e| CliError::from_io(e, &abs))?;
                let mut h = Self::header(&md, EntryType::Regular, md.len());
                let mut data = Exact {
                    inner: file,
                    left: md.len(),
                    path: &abs,
                    bar: self.bar,
                };
                self.b
                    .append_data(&mut h, &rel, &mut data)
                    .map_err(|e| CliError::from_io(e, &abs))?;
                self.tree.nodes.insert(rel, Node::File);
                self.stats.files += 1;
                self.stats.bytes += md.len();
            } else if ft.is_symlink() {
                let target = fs::read_link(&abs).map_err(|e| CliError::from_io(e, &abs))?;
                if let Err(why) = self.tree.check_symlink(&rel, &target) {
                    if self.opts.skip_outside_links {
                        self.warn(format!("skipping symbolic link {}: {why}", abs.display()));
                        self.stats.skipped += 1;
                        continue;
                    }
                    return Err(CliError::usage(format!(
                        "symbolic link {}: {why}, so a restore would refuse it; remove it, or pass \
                         --skip-outside-links to leave such links out of the backup",
                        abs.display()
                    )));
                }
                let mut h = Self::header(&md, EntryType::Symlink, 0);
                self.b
                    .append_link(&mut h, &rel, &target)
                    .map_err(CliError::pipe)?;
                self.tree.nodes.insert(rel.clone(), Node::Symlink(target));
                self.tree.links.push(rel);
                self.stats.symlinks += 1;
            } else {
                self.warn(format!(
                    "skipping {}: sockets, FIFOs and device nodes are not backed up",
                    abs.display()
                ));
                self.stats.skipped += 1;
            }
        }
        Ok(())
    }
}

/// Exactly `left` bytes of a file: a file that shrinks while it is read is
/// an error (the archive would be inconsistent); growth is cut off at the
/// size the header announced.
struct Exact<'a> {
    inner: File,
    left: u64,
    path: &'a Path,
    bar: &'a ProgressBar,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        check_interrupt()?;
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} shrank while it was being backed up; stop the program writing it (or back up a snapshot) and run the backup again",
                    self.path.display()
                ),
            ));
        }
        self.left -= n as u64;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Reading: restore into a directory, or only check.

/// Reads a directory backup's tar stream from `input`. With `dest`, the
/// tree is restored into that (new, empty, private) directory, modes and
/// mtimes applied at the end; without, every rule is checked and the data
/// read and discarded.
pub fn read<R: Read>(input: R, dest: Option<&Path>) -> Result<Stats, CliError> {
    let mut archive = Archive::new(input);
    let mut tree = Tree::default();
    let mut stats = Stats::default();
    let mut dirs: Vec<(PathBuf, u32, i64)> = Vec::new();
    let mut marker: Option<Marker> = None;
    let mut buf = vec![0u8; 256 * 1024];
    {
        let entries = archive.entries().map_err(CliError::archive)?;
        for entry in entries {
            let mut entry = entry.map_err(CliError::archive)?;
            let ty = entry.header().entry_type();
            let raw = entry.path().map_err(CliError::archive)?.into_owned();
            if marker.is_none() {
                if raw.as_os_str() != MARKER_NAME || !ty.is_file() || entry.size() > MAX_MARKER_LEN
                {
                    return Err(CliError::integrity(
                        "not a directory backup: the archive does not start with its marker".into(),
                    ));
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(CliError::archive)?;
                marker = Some(parse_marker(&bytes)?);
                continue;
            }
            if ty == EntryType::XGlobalHeader {
                continue;
            }
            let rel = entry_path(&raw)?;
            if rel.as_os_str().is_empty() {
                if ty.is_dir() {
                    continue; // "./": the root, described by the marker
                }
                return Err(refused(&raw, "its path is empty"));
            }
            tree.check_parents(&rel)
                .map_err(|why| refused(&raw, &why))?;
            let mode = entry.header().mode().map_err(CliError::archive)? & MODE_MASK;
            let mtime = entry.header().mtime().map_err(CliError::archive)?;
            let mtime = i64::try_from(mtime).unwrap_or(i64::MAX);
            let existing = tree.nodes.get(&rel).cloned();
            if ty.is_dir() {
                match existing {
                    None | Some(Node::Dir) => {}
                    Some(_) => return Err(refused(&raw, "it appears twice in the archive")),
                }
            } else if existing.is_some() {
                return Err(refused(&raw, "it appears twice in the archive"));
            }
            let target = dest.map(|d| d.join(&rel));
            match ty {
                EntryType::Directory => {
                    tree.nodes.insert(rel.clone(), Node::Dir);
                    if let Some(d) = dest {
                        make_dirs(d, &rel)?;
                    }
                    if existing.is_none() {
                        stats.dirs += 1;
                    }
                    dirs.push((rel, mode, mtime));
                }
                EntryType::Regular | EntryType::Continuous => {
                    tree.nodes.insert(rel.clone(), Node::File);
                    let size = entry.size();
                    if let (Some(d), Some(t)) = (dest, &target) {
                        if let Some(parent) = rel.parent() {
                            make_dirs(d, parent)?;
                        }
                        let mut f = OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            // O_EXCL: never through an existing name,
                            // symbolic links included.
                            .mode(0o600)
                            .open(t)
                            .map_err(|e| CliError::from_io(e, t))?;
                        let copied = copy(&mut entry, &mut f, &mut buf)
                            .map_err(|e| CliError::from_io(e, t))?;
                        if copied != size {
                            return Err(CliError::integrity(format!(
                                "the archive ends inside {}",
                                q(&raw)
                            )));
                        }
                        f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
                            .map_err(|e| CliError::from_io(e, t))?;
                        f.set_modified(time_of(mtime))
                            .map_err(|e| CliError::from_io(e, t))?;
                        f.sync_all().map_err(|e| CliError::from_io(e, t))?;
                    } else {
                        let copied = copy(&mut entry, &mut io::sink(), &mut buf)
                            .map_err(CliError::archive)?;
                        if copied != size {
                            return Err(CliError::integrity(format!(
                                "the archive ends inside {}",
                                q(&raw)
                            )));
                        }
                    }
                    stats.files += 1;
                    stats.bytes += size;
                }
                EntryType::Symlink => {
                    let link = entry
                        .link_name()
                        .map_err(CliError::archive)?
                        .ok_or_else(|| refused(&raw, "it has no target"))?
                        .into_owned();
                    tree.check_symlink(&rel, &link)
                        .map_err(|why| refused(&raw, &why))?;
                    tree.nodes.insert(rel.clone(), Node::Symlink(link.clone()));
                    tree.links.push(rel.clone());
                    if let (Some(d), Some(t)) = (dest, &target) {
                        if let Some(parent) = rel.parent() {
                            make_dirs(d, parent)?;
                        }
                        std::os::unix::fs::symlink(&link, t)
                            .map_err(|e| CliError::from_io(e, t))?;
                        let ft = filetime::FileTime::from_unix_time(mtime, 0);
                        filetime::set_symlink_file_times(t, ft, ft)
                            .map_err(|e| CliError::from_io(e, t))?;
                    }
                    stats.symlinks += 1;
                }
                EntryType::Link => {
                    let link = entry
                        .link_name()
                        .map_err(CliError::archive)?
                        .ok_or_else(|| refused(&raw, "it has no target"))?
                        .into_owned();
                    let src = entry_path(&link).map_err(|_| {
                        refused(
                            &raw,
                            &format!(
                                "its hard-link target {} is absolute or contains `..`",
                                q(&link)
                            ),
                        )
                    })?;
                    if !tree.check_parents_readonly(&src)
                        || tree.nodes.get(&src) != Some(&Node::File)
                    {
                        return Err(refused(
                            &raw,
                            &format!(
                                "its hard-link target {} is not a regular file restored before it",
                                q(&link)
                            ),
                        ));
                    }
                    tree.nodes.insert(rel.clone(), Node::File);
                    if let (Some(d), Some(t)) = (dest, &target) {
                        if let Some(parent) = rel.parent() {
                            make_dirs(d, parent)?;
                        }
                        let s = d.join(&src);
                        let md = s.symlink_metadata().map_err(|e| CliError::from_io(e, &s))?;
                        if !md.is_file() {
                            return Err(refused(
                                &raw,
                                "its hard-link target is not a regular file",
                            ));
                        }
                        fs::hard_link(&s, t).map_err(|e| CliError::from_io(e, t))?;
                    }
                    stats.hardlinks += 1;
                }
                EntryType::Char | EntryType::Block => {
                    return Err(refused(&raw, "it is a device node"));
                }
                EntryType::Fifo => return Err(refused(&raw, "it is a FIFO")),
                other => {
                    return Err(refused(
                        &raw,
                        &format!(
                            "its entry type {:?} is not supported",
                            other.as_byte() as char
                        ),
                    ))
                }
            }
        }
    }
    let Some(marker) = marker else {
        return Err(CliError::integrity(
            "not a directory backup: the archive is empty".into(),
        ));
    };
    // What follows the end-of-archive block must be zero padding.
    let mut rest = archive.into_inner();
    loop {
        let n = rest.read(&mut buf).map_err(CliError::archive)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(CliError::integrity(
                "unsafe archive, refusing to restore: unexpected data after the end of the archive; nothing was restored".into(),
            ));
        }
    }
    tree.check_all_symlinks()?;
    if let Some(d) = dest {
        check_links_on_disk(d, &tree)?;
        finish_dirs(d, dirs, &marker)?;
    }
    Ok(stats)
}

impl Tree {
    /// Like [`check_parents`](Self::check_parents) without adding anything.
    fn check_parents_readonly(&self, rel: &Path) -> bool {
        let mut cur = PathBuf::new();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            cur.push(c);
            if self.nodes.get(&cur) != Some(&Node::Dir) {
                return false;
            }
        }
        true
    }
}

/// Creates `rel` and its parents under `root` as real directories (mode
/// 0700 until the end); an existing symbolic link anywhere is refused.
fn make_dirs(root: &Path, rel: &Path) -> Result<(), CliError> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match cur.symlink_metadata() {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(refused(
                    rel,
                    &format!("{} exists and is not a directory", cur.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&cur)
                    .map_err(|e| CliError::from_io(e, &cur))?;
            }
            Err(e) => return Err(CliError::from_io(e, &cur)),
        }
    }
    Ok(())
}

fn copy<R: Read, W: Write>(r: &mut R, w: &mut W, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        check_interrupt()?;
        let n = match r.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn time_of(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Every restored symbolic link, resolved by the kernel as far as it
/// exists, must stay under `root` (defence in depth behind the tree
/// check).
fn check_links_on_disk(root: &Path, tree: &Tree) -> Result<(), CliError> {
    let canon_root = fs::canonicalize(root).map_err(|e| CliError::from_io(e, root))?;
    for link in &tree.links {
        let abs = root.join(link);
        // The longest existing prefix of where the link leads.
        let Some(Node::Symlink(t)) = tree.nodes.get(link) else {
            continue;
        };
        let mut p = abs.parent().unwrap_or(root).join(t);
        let mut inside = None;
        for _ in 0..4096 {
            match fs::canonicalize(&p) {
                Ok(c) => {
                    inside = Some(c.starts_with(&canon_root));
                    break;
                }
                Err(_) => match p.parent() {
                    Some(parent) => p = parent.to_path_buf(),
                    None => break,
                },
            }
        }
        if inside != Some(true) {
            return Err(refused(
                link,
                "its target resolves outside the restored directory",
            ));
        }
    }
    Ok(())
}

/// Applies directory modes and mtimes, deepest first (a read-only
/// directory is made read-only after its contents are in place), fsyncs
/// every directory, then the root.
fn finish_dirs(
    root: &Path,
    mut dirs: Vec<(PathBuf, u32, i64)>,
    marker: &Marker,
) -> Result<(), CliError> {
    dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    // A directory listed twice keeps its last mode; applying both in
    // reverse order would apply the first: dedupe keeping the last.
    let mut seen = std::collections::HashSet::new();
    let mut ordered = Vec::new();
    for (p, m, t) in dirs.into_iter().rev() {
        if seen.insert(p.clone()) {
            ordered.push((p, m, t));
        }
    }
    ordered.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (rel, mode, mtime) in ordered {
        let p = root.join(&rel);
        finish_dir(&p, mode, mtime)?;
    }
    finish_dir(root, marker.root_mode, marker.root_mtime)
}

fn finish_dir(p: &Path, mode: u32, mtime: i64) -> Result<(), CliError> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .map_err(|e| CliError::from_io(e, p))?;
    let ft = filetime::FileTime::from_unix_time(mtime, 0);
    filetime::set_symlink_file_times(p, ft, ft).map_err(|e| CliError::from_io(e, p))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(|e| CliError::from_io(e, p))?;
    Ok(())
}

impl CliError {
    /// An error reading the tar stream: a damaged archive (the envelope
    /// authenticated it, so it was written that way), or a signal.
    fn archive(e: io::Error) -> CliError {
        if crate::util::interrupted() {
            return CliError::interrupted();
        }
        CliError::integrity(format!(
            "the directory archive inside the backup is damaged: {e}"
        ))
    }

    /// An error writing the tar stream into the pipeline.
    pub fn pipe(e: io::Error) -> CliError {
        if crate::util::interrupted() {
            return CliError::interrupted();
        }
        CliError::new(exit::IO, format!("archiving failed: {e}"))
    }
}
