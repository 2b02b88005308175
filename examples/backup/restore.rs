//! Reading a directory backup: checking every entry against the rules of
//! the module above, and restoring by descriptor.
//!
//! The restore directory is opened once (`O_DIRECTORY|O_NOFOLLOW`, and it
//! must be the new, empty, private directory the caller just made); every
//! entry is then created relative to that descriptor, one level at a time:
//! directories with `mkdirat` and opened with `O_NOFOLLOW`, files with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, links with `symlinkat` and `linkat` (which
//! never follows), modes and times through descriptors (`fchmod`,
//! `futimens`). Renaming the temporary directory, or replacing it or one
//! of its parents with a link, cannot redirect a single write: the writes
//! follow the directory, not its name.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    fchmod, fstat, fsync, futimens, linkat, mkdirat, openat, statat, symlinkat, utimensat, AtFlags,
    Dir, FileType, Mode, OFlags, Timespec, Timestamps,
};
use rustix::io::Errno;
use tar::{Archive, EntryType};
use zeroize::Zeroizing;

use super::{
    entry_path, parse_marker, q, raise_fd_limit, refused, sys, Marker, Node, Stats, Tree,
    MARKER_NAME, MAX_MARKER_LEN, MAX_PATH_LEN, MODE_MASK,
};
use crate::interrupt::check_interrupt;
use crate::CliError;

/// Reads a directory backup's tar stream from `input`. With `dest`, the
/// tree is restored into that (new, empty, private) directory, modes and
/// mtimes applied at the end; without, every rule is checked and the data
/// read and discarded.
pub fn read<R: Read>(input: R, dest: Option<&Path>) -> Result<Stats, CliError> {
    let mut out = match dest {
        Some(d) => Some(Restorer::open(d)?),
        None => None,
    };
    let mut archive = Archive::new(input);
    let mut tree = Tree::default();
    let mut stats = Stats::default();
    let mut dirs: Vec<(PathBuf, u32, i64)> = Vec::new();
    let mut marker: Option<Marker> = None;
    // Plaintext file data passes through here: zeroized when dropped.
    let mut buf = Zeroizing::new(vec![0u8; 256 * 1024]);
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
                let mut bytes = Zeroizing::new(Vec::new());
                entry.read_to_end(&mut bytes).map_err(CliError::archive)?;
                marker = Some(parse_marker(&bytes)?);
                continue;
            }
            if ty == EntryType::XGlobalHeader {
                continue;
            }
            // Length and depth are bounded here, before any tree work.
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
            match ty {
                EntryType::Directory => {
                    tree.nodes.insert(rel.clone(), Node::Dir);
                    if let Some(r) = &mut out {
                        r.dir(&rel, true)?;
                    }
                    if existing.is_none() {
                        stats.dirs += 1;
                    }
                    dirs.push((rel, mode, mtime));
                }
                EntryType::Regular | EntryType::Continuous => {
                    tree.nodes.insert(rel.clone(), Node::File);
                    let size = entry.size();
                    let copied = match &mut out {
                        Some(r) => r.file(&rel, &mut entry, &mut buf, mode, mtime)?,
                        None => copy(&mut entry, &mut io::sink(), &mut buf)
                            .map_err(CliError::archive)?,
                    };
                    if copied != size {
                        return Err(CliError::integrity(format!(
                            "the archive ends inside {}",
                            q(&raw)
                        )));
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
                    if let Some(r) = &mut out {
                        r.symlink(&rel, &link, mtime)?;
                    }
                    stats.symlinks += 1;
                }
                EntryType::Link => {
                    let link = entry
                        .link_name()
                        .map_err(CliError::archive)?
                        .ok_or_else(|| refused(&raw, "it has no target"))?
                        .into_owned();
                    let not_file = || {
                        refused(
                            &raw,
                            &format!(
                                "its hard-link target {} is not a regular file restored before it",
                                q(&link)
                            ),
                        )
                    };
                    if link.as_os_str().len() > MAX_PATH_LEN {
                        return Err(not_file());
                    }
                    let src = entry_path(&link).map_err(|_| {
                        refused(
                            &raw,
                            &format!(
                                "its hard-link target {} is absolute or contains `..`",
                                q(&link)
                            ),
                        )
                    })?;
                    if !tree.parents_are_dirs(&src) || tree.nodes.get(&src) != Some(&Node::File) {
                        return Err(not_file());
                    }
                    tree.nodes.insert(rel.clone(), Node::File);
                    if let Some(r) = &mut out {
                        r.hard_link(&rel, &src, &raw)?;
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
    if let (Some(mut r), Some(d)) = (out, dest) {
        check_links_on_disk(d, &tree)?;
        r.finish(dirs, &marker)?;
        r.still_in_place()?;
    }
    Ok(stats)
}

/// The restore directory's descriptor, and the descriptors of the
/// directories from it down to the one used last (entries of a tar stream
/// come grouped by directory, so most lookups reuse them; at most one per
/// level is open).
struct Restorer {
    root: OwnedFd,
    path: PathBuf,
    open: Vec<(Box<OsStr>, OwnedFd)>,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// `rel` split into its parent and its last component.
fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().unwrap_or_default(),
    )
}

impl Restorer {
    /// Opens `dest`, which must be a real directory (not a link), owned by
    /// this user, private, and empty: the one the caller just created.
    fn open(dest: &Path) -> Result<Restorer, CliError> {
        raise_fd_limit();
        let root =
            openat(rustix::fs::CWD, dest, DIR_FLAGS, Mode::empty()).map_err(|e| sys(e, dest))?;
        let st = fstat(&root).map_err(|e| sys(e, dest))?;
        let mut entries = Dir::read_from(&root).map_err(|e| sys(e, dest))?;
        let empty =
            entries.all(|e| e.is_ok_and(|e| matches!(e.file_name().to_bytes(), b"." | b"..")));
        if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 || !empty {
            return Err(CliError::new(
                crate::exit::IO,
                format!(
                    "{}: the temporary restore directory was replaced while restoring; nothing was restored",
                    dest.display()
                ),
            ));
        }
        Ok(Restorer {
            root,
            path: dest.to_path_buf(),
            open: Vec::new(),
        })
    }

    /// The restore directory is still under its name: someone who can
    /// write beside it may have moved it and put something else there,
    /// which the caller would then release under the final name. (No
    /// write went astray either way: they all went through descriptors.)
    fn still_in_place(&self) -> Result<(), CliError> {
        let here = fstat(&self.root).map_err(|e| sys(e, &self.path))?;
        let named =
            openat(rustix::fs::CWD, &self.path, DIR_FLAGS, Mode::empty()).and_then(|fd| fstat(&fd));
        match named {
            Ok(st) if st.st_dev == here.st_dev && st.st_ino == here.st_ino => Ok(()),
            _ => Err(Self::replaced(&self.path)),
        }
    }

    fn replaced(dest: &Path) -> CliError {
        CliError::new(
            crate::exit::IO,
            format!(
                "{}: the temporary restore directory was moved or replaced while restoring \
                 (is someone else writing in its parent directory?); nothing was restored",
                dest.display()
            ),
        )
    }

    fn err(&self, e: Errno, rel: &Path) -> CliError {
        sys(e, &self.path.join(rel))
    }

    /// The descriptor of the directory `rel` under the root, every level
    /// opened with `O_NOFOLLOW` relative to the one above; with `create`,
    /// missing levels are made (mode 0700 until the end). Anything but a
    /// directory on the way is refused.
    fn dir(&mut self, rel: &Path, create: bool) -> Result<BorrowedFd<'_>, CliError> {
        let comps: Vec<&OsStr> = rel.iter().collect();
        let keep = self
            .open
            .iter()
            .zip(&comps)
            .take_while(|((name, _), c)| &**name == **c)
            .count();
        self.open.truncate(keep);
        for (i, c) in comps.iter().enumerate().skip(keep) {
            let parent = self
                .open
                .last()
                .map_or(self.root.as_fd(), |(_, fd)| fd.as_fd());
            if create {
                match mkdirat(parent, *c, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.err(e, rel)),
                }
            }
            let fd = match openat(parent, *c, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let here: PathBuf = comps[..=i].iter().collect();
                    return Err(refused(
                        rel,
                        &format!("{} exists and is not a directory", q(&here)),
                    ));
                }
                Err(e) => return Err(self.err(e, rel)),
            };
            self.open.push((Box::from(*c), fd));
        }
        Ok(self
            .open
            .last()
            .map_or(self.root.as_fd(), |(_, fd)| fd.as_fd()))
    }

    /// A regular file: created exclusively (never through an existing
    /// name, links included), filled, its mode and mtime set, synced.
    /// Returns how many bytes the archive held for it.
    fn file<R: Read>(
        &mut self,
        rel: &Path,
        data: &mut R,
        buf: &mut [u8],
        mode: u32,
        mtime: i64,
    ) -> Result<u64, CliError> {
        let (parent, name) = split(rel);
        let path = self.path.join(rel);
        let dir = self.dir(parent, true)?;
        let fd = openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| sys(e, &path))?;
        let mut f = File::from(fd);
        let copied = copy(data, &mut f, buf).map_err(|e| CliError::from_io(e, &path))?;
        fchmod(&f, Mode::from_raw_mode(mode & 0o777)).map_err(|e| sys(e, &path))?;
        futimens(&f, &times(mtime)).map_err(|e| sys(e, &path))?;
        f.sync_all().map_err(|e| CliError::from_io(e, &path))?;
        Ok(copied)
    }

    fn symlink(&mut self, rel: &Path, target: &Path, mtime: i64) -> Result<(), CliError> {
        let (parent, name) = split(rel);
        let path = self.path.join(rel);
        let dir = self.dir(parent, true)?;
        symlinkat(target, dir, name).map_err(|e| sys(e, &path))?;
        utimensat(dir, name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| sys(e, &path))?;
        Ok(())
    }

    /// A hard link to `src`, a regular file restored earlier (checked on
    /// disk too; `linkat` without `AT_SYMLINK_FOLLOW` never follows).
    fn hard_link(&mut self, rel: &Path, src: &Path, raw: &Path) -> Result<(), CliError> {
        let (src_parent, src_name) = split(src);
        let (parent, name) = split(rel);
        let path = self.path.join(rel);
        let src_dir = self.dir(src_parent, false)?.try_clone_to_owned();
        let src_dir = src_dir.map_err(|e| CliError::from_io(e, &path))?;
        let st = statat(&src_dir, src_name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| sys(e, &self.path.join(src)))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(refused(raw, "its hard-link target is not a regular file"));
        }
        let dir = self.dir(parent, true)?;
        linkat(&src_dir, src_name, dir, name, AtFlags::empty()).map_err(|e| sys(e, &path))?;
        Ok(())
    }

    /// Applies directory modes and mtimes, deepest first (a read-only
    /// directory is made read-only after its contents are in place, and
    /// every directory is reached before any above it changes), syncs
    /// every directory, then the root.
    fn finish(&mut self, dirs: Vec<(PathBuf, u32, i64)>, marker: &Marker) -> Result<(), CliError> {
        // A directory listed twice keeps its last mode.
        let mut last = std::collections::HashMap::new();
        for (p, m, t) in dirs {
            last.insert(p, (m, t));
        }
        let mut ordered: Vec<_> = last.into_iter().collect();
        ordered.sort_by(|(a, _), (b, _)| {
            b.components()
                .count()
                .cmp(&a.components().count())
                .then_with(|| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()))
        });
        for (rel, (mode, mtime)) in ordered {
            let path = self.path.join(&rel);
            let fd = self.dir(&rel, false)?;
            finish_dir(fd, mode, mtime).map_err(|e| sys(e, &path))?;
        }
        self.open.clear();
        finish_dir(self.root.as_fd(), marker.root_mode, marker.root_mtime)
            .map_err(|e| sys(e, &self.path))
    }
}

fn finish_dir(fd: BorrowedFd<'_>, mode: u32, mtime: i64) -> Result<(), Errno> {
    fsync(fd)?;
    futimens(fd, &times(mtime))?;
    fchmod(fd, Mode::from_raw_mode(mode))
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

/// Every restored symbolic link, resolved by the kernel as far as it
/// exists, must stay under `root` (defence in depth behind the tree
/// check; it only reads).
fn check_links_on_disk(root: &Path, tree: &Tree) -> Result<(), CliError> {
    let canon_root = std::fs::canonicalize(root).map_err(|e| CliError::from_io(e, root))?;
    for link in &tree.links {
        let abs = root.join(link);
        // The longest existing prefix of where the link leads.
        let Some(Node::Symlink(t)) = tree.nodes.get(link) else {
            continue;
        };
        let mut p = abs.parent().unwrap_or(root).join(t);
        let mut inside = None;
        for _ in 0..4096 {
            match std::fs::canonicalize(&p) {
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
