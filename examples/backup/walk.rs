//! Writing a directory backup: walking a tree by descriptor.
//!
//! Whoever can write inside the tree can swap any entry for a symbolic
//! link at any moment. So nothing below the root is ever opened by path:
//! every entry is looked at (`fstatat`, no follow) and opened (`openat`
//! with `O_NOFOLLOW`, directories with `O_DIRECTORY`) relative to its
//! parent's descriptor, then checked (`fstat`: same device, inode and type
//! as the listing saw). Directories are listed from their descriptors.
//! An entry that fails the check was replaced while the backup ran: it is
//! skipped with a warning (counted with the skipped special files), the
//! rest of the tree is backed up; docs/CLI.md says why skipping, not
//! failing, is the rule.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::ProgressBar;
use rustix::fs::{fstat, openat, readlinkat, statat, AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use tar::{Builder, EntryType, Header};
use zeroize::Zeroizing;

use super::{marker_json, over_limits, raise_fd_limit, sys, Node, Stats, Tree, BLOCK, MARKER_NAME};
use crate::interrupt::check_interrupt;
use crate::CliError;

/// Options of [`write`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// Skip (with a warning) symbolic links that a restore would refuse,
    /// instead of failing.
    pub skip_outside_links: bool,
    pub quiet: bool,
}

/// The size of the buffers that hold plaintext on its way into the tar
/// stream (zeroized when dropped).
const COPY_BUF: usize = 256 * 1024;
const OUT_BUF: usize = 1 << 20;

/// The total size of the regular files under `root` (for the progress
/// bar); errors count as zero, the real walk reports them. Only sizes are
/// read here, never contents.
pub fn total_size(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
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
/// The root itself is opened by path (following a link there is the
/// operator's choice); nothing below it is.
pub fn write<W: Write>(
    root: &Path,
    out: W,
    opts: WriteOptions,
    bar: &ProgressBar,
) -> Result<Stats, CliError> {
    raise_fd_limit();
    let root_fd = openat(
        rustix::fs::CWD,
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys(e, root))?;
    let root_st = fstat(&root_fd).map_err(|e| sys(e, root))?;
    let mut b = Builder::new(ZeroizingBuf::new(out));
    let marker = Zeroizing::new(marker_json(root_st.st_mode, root_st.st_mtime));
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
        buf: Zeroizing::new(vec![0u8; COPY_BUF]),
    };
    w.walk(root_fd, root)?;
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

/// A buffered writer whose buffer is zeroized when dropped (`BufWriter`'s
/// is not): it holds the plaintext tar stream.
struct ZeroizingBuf<W: Write> {
    inner: W,
    buf: Zeroizing<Vec<u8>>,
}

impl<W: Write> ZeroizingBuf<W> {
    fn new(inner: W) -> ZeroizingBuf<W> {
        ZeroizingBuf {
            inner,
            buf: Zeroizing::new(Vec::with_capacity(OUT_BUF)),
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
            // Vec::clear keeps the bytes: overwrite them first.
            zeroize::Zeroize::zeroize(&mut *self.buf);
        }
        Ok(())
    }
}

impl<W: Write> Write for ZeroizingBuf<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > OUT_BUF {
            self.drain()?;
        }
        if data.len() >= OUT_BUF {
            return self.inner.write(data);
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        self.inner.flush()
    }
}

/// How an entry looked when it was listed, and what opening it found.
enum Seen {
    /// Opened and checked: the entry the listing saw.
    Same(OwnedFd, Stat),
    /// Not there any more, or something else now (a link, another file):
    /// it changed while the backup ran.
    Changed,
}

/// A directory being walked: its descriptor, its paths, the names not yet
/// archived.
struct Frame {
    fd: OwnedFd,
    abs: PathBuf,
    rel: PathBuf,
    names: std::vec::IntoIter<OsString>,
}

/// True when `a` and `b` are the same file: device, inode and type.
fn same(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev
        && a.st_ino == b.st_ino
        && FileType::from_raw_mode(a.st_mode) == FileType::from_raw_mode(b.st_mode)
}

/// Errors that mean "the name is not what it was" rather than "the file
/// system failed": a link (`ELOOP` under `O_NOFOLLOW`), not a directory
/// any more, gone.
fn changed_errno(e: Errno) -> bool {
    e == Errno::LOOP || e == Errno::NOTDIR || e == Errno::NOENT || e == Errno::INVAL
}

struct Walker<'a, W: Write> {
    b: Builder<ZeroizingBuf<W>>,
    tree: Tree,
    stats: Stats,
    opts: WriteOptions,
    bar: &'a ProgressBar,
    /// File data on its way from a file into the archive.
    buf: Zeroizing<Vec<u8>>,
}

impl<W: Write> Walker<'_, W> {
    fn header(st: &Stat, ty: EntryType, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(size);
        h.set_mode(st.st_mode & 0o7777);
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        h.set_uid(u64::from(st.st_uid));
        h.set_gid(u64::from(st.st_gid));
        h
    }

    fn warn(&self, msg: String) {
        if !self.opts.quiet {
            self.bar.suspend(|| eprintln!("backup: warning: {msg}"));
        }
    }

    fn skip_changed(&mut self, abs: &Path) {
        self.warn(format!(
            "skipping {}: it was replaced or removed while it was being backed up \
             (nothing of what replaced it was read); run the backup again to include it",
            abs.display()
        ));
        self.stats.skipped += 1;
    }

    /// Opens `name` in `dir` with `flags` (plus `O_NOFOLLOW`) and checks
    /// that it is the file `listed` describes.
    fn open_checked(
        dir: &OwnedFd,
        name: &OsStr,
        flags: OFlags,
        listed: &Stat,
        abs: &Path,
    ) -> Result<Seen, CliError> {
        let fd = match openat(
            dir,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) if changed_errno(e) => return Ok(Seen::Changed),
            Err(e) => return Err(sys(e, abs)),
        };
        let st = fstat(&fd).map_err(|e| sys(e, abs))?;
        Ok(if same(listed, &st) {
            Seen::Same(fd, st)
        } else {
            Seen::Changed
        })
    }

    /// The names in `dir` (read from its descriptor), sorted bytewise.
    fn list(dir: &OwnedFd, abs: &Path) -> Result<Vec<OsString>, CliError> {
        let mut entries = Vec::new();
        for e in Dir::read_from(dir).map_err(|e| sys(e, abs))? {
            let e = e.map_err(|e| sys(e, abs))?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            entries.push(OsString::from_vec(name.to_vec()));
        }
        entries.sort();
        Ok(entries)
    }

    /// Walks the tree below `root` depth first, with an explicit stack
    /// (a tree [`MAX_DEPTH`](super::MAX_DEPTH) deep must not overflow the
    /// thread's stack): one open directory per level.
    fn walk(&mut self, root: OwnedFd, root_abs: &Path) -> Result<(), CliError> {
        let names = Self::list(&root, root_abs)?;
        let mut stack = vec![Frame {
            fd: root,
            abs: root_abs.to_path_buf(),
            rel: PathBuf::new(),
            names: names.into_iter(),
        }];
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.next() else {
                stack.pop();
                continue;
            };
            check_interrupt().map_err(CliError::pipe)?;
            if let Some(child) = self.entry(&top.fd, &top.abs, &top.rel, &name)? {
                stack.push(child);
            }
        }
        Ok(())
    }

    /// Archives the entry `name` of the directory `dir`; a directory is
    /// returned, opened and listed, for the walk to go into.
    fn entry(
        &mut self,
        dir: &OwnedFd,
        abs_dir: &Path,
        rel_dir: &Path,
        name: &OsStr,
    ) -> Result<Option<Frame>, CliError> {
        {
            let abs = abs_dir.join(name);
            let rel = rel_dir.join(name);
            // What the listing saw: the entry as it is now, links not
            // followed. (The inode the directory listing gave is not
            // compared: on overlay and some network file systems it
            // legitimately differs from what stat reports.)
            let listed = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) if changed_errno(e) => {
                    self.skip_changed(&abs);
                    return Ok(None);
                }
                Err(e) => return Err(sys(e, &abs)),
            };
            if let Some(why) = over_limits(&rel) {
                return Err(CliError::usage(format!(
                    "{}: {why}, so a restore would refuse it; move it higher up, or back up a \
                     directory further down",
                    abs.display()
                )));
            }
            match FileType::from_raw_mode(listed.st_mode) {
                FileType::Directory => {
                    let flags = OFlags::RDONLY | OFlags::DIRECTORY;
                    let Seen::Same(fd, st) = Self::open_checked(dir, name, flags, &listed, &abs)?
                    else {
                        self.skip_changed(&abs);
                        return Ok(None);
                    };
                    self.tree.nodes.insert(rel.clone(), Node::Dir);
                    let mut h = Self::header(&st, EntryType::Directory, 0);
                    self.b
                        .append_data(&mut h, &rel, io::empty())
                        .map_err(CliError::pipe)?;
                    self.stats.dirs += 1;
                    let names = Self::list(&fd, &abs)?.into_iter();
                    return Ok(Some(Frame {
                        fd,
                        abs,
                        rel,
                        names,
                    }));
                }
                FileType::RegularFile => {
                    // O_NONBLOCK: a FIFO swapped in must not block the
                    // open (it then fails the check).
                    let flags = OFlags::RDONLY | OFlags::NONBLOCK;
                    let Seen::Same(fd, st) = Self::open_checked(dir, name, flags, &listed, &abs)?
                    else {
                        self.skip_changed(&abs);
                        return Ok(None);
                    };
                    self.file(fd, &st, &abs, rel)?;
                }
                FileType::Symlink => {
                    let target = match readlinkat(dir, name, Vec::new()) {
                        Ok(t) => PathBuf::from(OsString::from_vec(t.into_bytes())),
                        Err(e) if changed_errno(e) => {
                            self.skip_changed(&abs);
                            return Ok(None);
                        }
                        Err(e) => return Err(sys(e, &abs)),
                    };
                    self.symlink(&listed, &abs, rel, target)?;
                }
                _ => {
                    self.warn(format!(
                        "skipping {}: sockets, FIFOs and device nodes are not backed up",
                        abs.display()
                    ));
                    self.stats.skipped += 1;
                }
            }
        }
        Ok(None)
    }

    /// A regular file, from its checked descriptor: the header (through
    /// the builder, which writes long names), then exactly the announced
    /// size through the zeroizing buffer, then the padding.
    fn file(&mut self, fd: OwnedFd, st: &Stat, abs: &Path, rel: PathBuf) -> Result<(), CliError> {
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut h = Self::header(st, EntryType::Regular, size);
        self.b
            .append_data(&mut h, &rel, io::empty())
            .map_err(CliError::pipe)?;
        let mut data = Exact {
            inner: File::from(fd),
            left: size,
            path: abs,
            bar: self.bar,
        };
        let out = self.b.get_mut();
        loop {
            let n = data
                .read(&mut self.buf)
                .map_err(|e| CliError::from_io(e, abs))?;
            if n == 0 {
                break;
            }
            out.write_all(&self.buf[..n]).map_err(CliError::pipe)?;
        }
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        out.write_all(&[0u8; BLOCK][..pad])
            .map_err(CliError::pipe)?;
        self.tree.nodes.insert(rel, Node::File);
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(())
    }

    fn symlink(
        &mut self,
        st: &Stat,
        abs: &Path,
        rel: PathBuf,
        target: PathBuf,
    ) -> Result<(), CliError> {
        if let Err(why) = self.tree.check_symlink(&rel, &target) {
            if self.opts.skip_outside_links {
                self.warn(format!("skipping symbolic link {}: {why}", abs.display()));
                self.stats.skipped += 1;
                return Ok(());
            }
            return Err(CliError::usage(format!(
                "symbolic link {}: {why}, so a restore would refuse it; remove it, or pass \
                 --skip-outside-links to leave such links out of the backup",
                abs.display()
            )));
        }
        let mut h = Self::header(st, EntryType::Symlink, 0);
        self.b
            .append_link(&mut h, &rel, &target)
            .map_err(CliError::pipe)?;
        self.tree.nodes.insert(rel.clone(), Node::Symlink(target));
        self.tree.links.push(rel);
        self.stats.symlinks += 1;
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
        let n = loop {
            match self.inner.read(&mut buf[..max]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
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
