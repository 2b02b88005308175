//! The append-only, hash-chained JSON Lines audit log.
//!
//! Why one file of this size: the append path (chain, multi-process lock,
//! catch-up, rotation, torn tails, the broken-log marker) and the writer
//! thread with group commit all change one state under one lock; splitting
//! them would spread that invariant over several files. Splitting out
//! rotation and the writer thread is the next step when this file grows.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::line::{self, Body, Header, Line, Mac, MAX_LINE};
use super::queue::{Job, Queue};
use super::verify::{BadLine, Problem};
use super::{segment_path, segments, Anchor, AuditKey};
use crate::events::{Completion, Event, EventSink, Receipt, SinkError};

/// When the log forces its writes to stable storage (`fdatasync`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// After every entry, before the keyring releases the operation's
    /// result: an acknowledged key access is on disk. The default.
    #[default]
    EveryEntry,
    /// After every `n` entries (and on rotation, [`AuditLog::sync`] and
    /// drop): up to `n - 1` acknowledged entries can be lost in a power
    /// failure. `EveryN(0)` and `EveryN(1)` mean every entry.
    EveryN(u32),
    /// Never explicitly: the operating system writes back when it likes. A
    /// crash of the process loses nothing (every entry is written to the
    /// kernel at once); a power failure or kernel crash can.
    Never,
}

/// Why an audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A file or its directory could not be read, created or written.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The log is already open in this process; two writers would break
    /// the chain.
    #[error("audit log {} is already open in this process: share one AuditLog (it is thread-safe) instead of opening it twice", .0.display())]
    InUse(PathBuf),
    /// The end of the log does not verify (an edited or incomplete last
    /// line, or a fork: the last line does not follow from the one before
    /// it), so the chain cannot be resumed. Nothing was written. The message
    /// says what to do: for an incomplete last line, open with
    /// [`repair_torn_tail`](AuditLogBuilder::repair_torn_tail); otherwise
    /// start a new log (see the [module documentation](super#when-the-chain-is-broken-starting-a-new-log)).
    #[error("cannot resume the audit log: {0}; nothing was written. {advice}", advice = damaged_advice(.0))]
    Damaged(BadLine),
    /// The log was written with another audit key (or with none, or with
    /// one where this log is configured without).
    #[error("audit log {} is {found}, but this AuditLog is configured with {expected}: configure the key the log was written with, or start a new log", path.display())]
    KeyMismatch {
        /// The file whose header was read.
        path: PathBuf,
        /// The configured MAC (and key id).
        expected: String,
        /// The MAC (and key id) in the file's header.
        found: String,
    },
    /// A writer found the chain broken and left the marker `LOG.broken`
    /// beside it: no process appends to this log any more. The message
    /// says how to start a new log.
    #[error("cannot resume the audit log: {0}; nothing was written")]
    Broken(String),
    /// The configuration is invalid (e.g. a path without a file name).
    #[error("invalid audit log configuration: {0}")]
    Invalid(String),
}

/// Builds an [`AuditLog`]: audit key, fsync policy, rotation.
#[derive(Clone, Debug, Default)]
pub struct AuditLogBuilder {
    key: Option<AuditKey>,
    fsync: FsyncPolicy,
    max_file_bytes: Option<u64>,
    repair_torn_tail: bool,
}

impl AuditLogBuilder {
    /// Keys the chain with HMAC-SHA-256 under `key` (recommended; see the
    /// [module documentation](super) for what an unkeyed chain does not
    /// protect against).
    pub fn audit_key(mut self, key: AuditKey) -> Self {
        self.key = Some(key);
        self
    }

    /// When to fsync (default [`FsyncPolicy::EveryEntry`]).
    pub fn fsync(mut self, policy: FsyncPolicy) -> Self {
        self.fsync = policy;
        self
    }

    /// Starts a new file (`NAME.000002`, ...) before a write would make the
    /// current one larger than `bytes` (default: never rotate). A file always
    /// takes at least one entry after its header, however small `bytes` is.
    pub fn max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = Some(bytes);
        self
    }

    /// Whether [`open`](Self::open) may cut off an incomplete last line (a
    /// write torn by a crash) and record a `gap` line in its place (default
    /// `false`: such a log is refused with [`OpenError::Damaged`]). The
    /// same holds later, for an incomplete line that a writer of another
    /// process left when it died in the middle of an append: found under
    /// the lock at the next append, it is cut off and recorded, or (by
    /// default) the append is refused until the log is reopened with this
    /// set.
    ///
    /// The cut line is usually an event whose operation never completed
    /// (the keyring releases a result only after its event is written);
    /// the gap line counts exactly the events it held: 1 for an event, 0
    /// for a file's header, the events a gap line cut short was recording
    /// (docs/AUDIT-LOG.md section 7).
    pub fn repair_torn_tail(mut self, yes: bool) -> Self {
        self.repair_torn_tail = yes;
        self
    }

    /// Opens the log whose first file is `path`, creating it if no file of
    /// it exists, or resuming its chain: under the log's lock, the last
    /// file's header is checked against the configured key, and its last
    /// line is verified along with its link to the line before it. The whole
    /// chain is not re-verified (see [`verify`](super::verify)).
    pub fn open(self, path: impl AsRef<Path>) -> Result<AuditLog, OpenError> {
        AuditLog::open_with(self, path.as_ref())
    }
}

/// An append-only JSON Lines audit log whose lines are hash-chained (see
/// the [module documentation](super) for the format and its guarantees).
///
/// Thread-safe: one mutex covers an append (sequence number, chain, hash,
/// write), so concurrent tasks never lose an entry or interleave the chain.
/// The fsync happens after that mutex is released, as a group commit: an
/// append returns once an fsync that started after its write has finished,
/// and one fsync covers every entry written before it, so concurrent
/// appends share fsyncs instead of queueing one behind the other.
///
/// Two ways in. [`append`](Self::append) (and [`EventSink::record`])
/// writes on the calling thread and returns once the entry is on stable
/// storage: for code that is not async. [`EventSink::submit`], which the
/// [keyring](crate::Keyring) uses, hands the entry to the log's writer
/// thread (started at the first submit) and returns a [`Receipt`] at once:
/// the writer takes every entry queued meanwhile as one **group**, appends
/// them in queue order and makes them durable with one fsync, then answers
/// their receipts. An async task awaiting its receipt holds no runtime
/// thread while the file is locked, written and synced, and the
/// guarantees are those of `append`: a receipt resolves `Ok` only once its
/// entry, and every line before it, is on stable storage (as the
/// [`FsyncPolicy`] says), chain order is durable order, and an entry that
/// could not be written or synced is answered with the error (a failed
/// fsync fails every entry of its group). [`stats`](Self::stats) counts
/// entries, groups and fsyncs.
///
/// Files are opened with `O_APPEND` and created with mode 0600. A failed
/// write is rolled back (the file is cut back to its last complete line)
/// and reported as a [`SinkError`]; a failed fsync, or a failed rollback,
/// makes the log refuse every later entry until it is reopened, since what
/// reached the disk is then unknown. Events that could not be written are
/// counted and recorded by a `gap` line at the next successful append.
///
/// Only one `AuditLog` per log may be open in a process (a second
/// [`open`](AuditLog::open) fails with [`OpenError::InUse`]: share it).
/// Several processes may write the same log: each append holds an
/// exclusive lock on the log's first file and continues the chain from
/// the end of the log on disk; a writer that finds it broken refuses (see
/// [several processes](super#several-processes-one-log)).
pub struct AuditLog {
    inner: Arc<Inner>,
    /// The writer thread of [`EventSink::submit`], started at the first
    /// submit; stopped (after it has written what was queued) on drop.
    writer: Mutex<Option<Writer>>,
}

/// The log's state, shared with its writer thread.
struct Inner {
    cfg: Config,
    state: Mutex<State>,
    /// Lock order: `state` before `durable` wherever both are held.
    durable: Mutex<Durable>,
    /// `next_seq` as of the last completed write: every line below it is
    /// in the file.
    written: AtomicU64,
    counters: Counters,
    _registration: Registration,
}

/// What [`AuditLog::stats`] reports.
#[derive(Default)]
struct Counters {
    entries: AtomicU64,
    fsyncs: AtomicU64,
    groups: AtomicU64,
    grouped_entries: AtomicU64,
    largest_group: AtomicU64,
}

/// Counters of an [`AuditLog`] since it was opened (this process's writes
/// only), to see group commit at work: with [`FsyncPolicy::EveryEntry`],
/// `entries / fsyncs` is the mean number of entries each fsync made
/// durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditStats {
    /// Event entries appended (by [`AuditLog::append`] and by the writer
    /// thread; `gap` and header lines not counted).
    pub entries: u64,
    /// Commit fsyncs: those that acknowledged entries (one per group, or
    /// one shared by concurrent `append`s). The fsyncs of a rotation and
    /// of opening are not counted.
    pub fsyncs: u64,
    /// Groups the writer thread committed.
    pub groups: u64,
    /// Entries the writer thread took in those groups.
    pub grouped_entries: u64,
    /// The most entries one group held.
    pub largest_group: u64,
}

/// The queue between [`EventSink::submit`] and the writer thread.
struct Writer {
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What writing one entry gave: its `seq` and whether it needs an fsync.
type Written = Result<(u64, bool), SinkError>;

/// The most entries one group takes (the rest wait for the next group).
const MAX_GROUP: usize = 4096;

/// What is known to be on stable storage.
struct Durable {
    /// A second handle to the current file, to fsync it without `state`.
    file: File,
    /// Every line below this sequence number is on stable storage.
    synced: u64,
    /// An fsync failed: nothing written since can be trusted to be there.
    failed: Option<String>,
}

/// What does not change while the log is open.
struct Config {
    base: PathBuf,
    mac: Mac,
    fsync: FsyncPolicy,
    max_file_bytes: Option<u64>,
    repair_torn_tail: bool,
    /// A handle to the log's first file, whose exclusive `flock` every
    /// writer (in any process) holds while it reads the tail and appends.
    lock: File,
}

/// This process's claim on a log path, released on drop.
struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&OPEN_LOGS).retain(|p| p != &self.0);
    }
}

struct State {
    file: File,
    path: PathBuf,
    segment: u32,
    bytes: u64,
    lines_in_file: u64,
    next_seq: u64,
    prev: [u8; 32],
    unsynced: u32,
    lost: u64,
    broken: Option<String>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cfg = &self.inner.cfg;
        f.debug_struct("AuditLog")
            .field("path", &cfg.base)
            .field("mac", &Mac::describe(cfg.mac.name(), cfg.mac.key_id()))
            .field("fsync", &cfg.fsync)
            .field("max_file_bytes", &cfg.max_file_bytes)
            .finish_non_exhaustive()
    }
}

/// The logs open in this process (canonical paths).
static OPEN_LOGS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn missing_first_file(base: &Path, first: &Path) -> OpenError {
    OpenError::Invalid(format!(
        "{} is missing but later files of the log exist ({}): restore it, or open the log under a new name",
        base.display(),
        first.display()
    ))
}

fn create_new(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.append(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    open_file(&mut opts, path)
}

/// Opens a file of the log with `opts`, never following a symbolic link
/// in the last component (`O_NOFOLLOW`) and never blocking on a FIFO or a
/// device (`O_NONBLOCK`, harmless on a regular file), and refuses anything
/// but a regular file: whoever can plant a link or a FIFO next to the log
/// cannot redirect its writes, its lock or its reads to another file, nor
/// hang a writer.
fn open_file(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32);
    }
    let file = opts.open(path).map_err(|e| {
        if is_symlink_refused(&e) {
            io::Error::new(
                e.kind(),
                "a symbolic link: refusing to follow it (it could redirect the audit log or its lock to another file); give the path of the file itself",
            )
        } else {
            e
        }
    })?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// [`open_file`] for reading.
pub(super) fn open_read(path: &Path) -> io::Result<File> {
    open_file(OpenOptions::new().read(true), path)
}

/// Whether an open failed because `O_NOFOLLOW` met a symbolic link.
#[cfg(unix)]
fn is_symlink_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
}

#[cfg(not(unix))]
fn is_symlink_refused(_: &io::Error) -> bool {
    false
}

/// Refuses a path of the log that is not a regular file (a symbolic link
/// is not followed), with a clear error; `Ok(false)` if it does not exist.
fn check_regular(path: &Path) -> Result<bool, OpenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(OpenError::Invalid(format!(
            "{} is a symbolic link: the files of an audit log must be the files themselves (a link could redirect the log or its lock to another file); open the log by the path of the file it points to",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(OpenError::Invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(true)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The end of one file, as found on disk.
struct Tail {
    len: u64,
    /// Offset and length of an incomplete last line, if any.
    torn: Option<(u64, u64)>,
    /// The first bytes of that line ([`TORN_HEAD`] at most): enough to
    /// tell what it was ([`torn_lost`]).
    torn_head: Vec<u8>,
    /// The last complete line (without its newline) and its offset; empty
    /// if it is longer than any line the log writes.
    last: Option<(u64, Vec<u8>)>,
    /// The complete line before it, the same way.
    before: Option<(u64, Vec<u8>)>,
}

/// The most [`read_tail`] reads: an incomplete line, the last line and the
/// one before it, each at most `MAX_LINE` bytes with its newline.
const MAX_TAIL_WINDOW: u64 = 3 * (MAX_LINE as u64 + 1);

/// Reads the end of `path` (its last two complete lines and an incomplete
/// line after them) without reading the whole file: a small window from
/// the end first, a larger one only when the lines are long.
fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut f = open_read(path)?;
    let len = f.metadata()?.len();
    let mut window = len.min(16 << 10);
    let mut buf = Vec::new();
    loop {
        f.seek(SeekFrom::Start(len - window))?;
        buf.clear();
        (&mut f).take(window).read_to_end(&mut buf)?;
        // Enough when the window holds the newline before the line before
        // the last one, or starts at the beginning of the file.
        let newlines = buf.iter().rev().filter(|&&b| b == b'\n').take(3).count();
        if newlines == 3 || window >= len || window >= MAX_TAIL_WINDOW {
            break;
        }
        window = (window * 4).min(len).min(MAX_TAIL_WINDOW);
    }
    let start = len - buf.len() as u64;
    // Everything after the last newline is an incomplete line.
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn =
        (complete < buf.len()).then(|| (start + complete as u64, (buf.len() - complete) as u64));
    let torn_head = buf[complete..buf.len().min(complete + TORN_HEAD)].to_vec();
    // The complete line ending just before `end` (an index of `buf` just
    // past a newline), with its offset; empty when it starts before the
    // window (longer than any line the log writes).
    let line_before = |end: usize| -> Option<(usize, Vec<u8>)> {
        if end == 0 {
            return None;
        }
        let body = &buf[..end - 1];
        let from = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if from == 0 && start > 0 {
            Some((from, Vec::new()))
        } else {
            Some((from, body[from..].to_vec()))
        }
    };
    let last = line_before(complete);
    let before = match &last {
        Some((from, raw)) if !raw.is_empty() => line_before(*from),
        _ => None,
    };
    let at = |l: Option<(usize, Vec<u8>)>| l.map(|(from, raw)| (start + from as u64, raw));
    Ok(Tail {
        len,
        torn,
        torn_head,
        last: at(last),
        before: at(before),
    })
}

/// How much of a torn line [`read_tail`] keeps: `{"seq":`, 20 digits,
/// `,"type":"gap","lost":`, 20 digits, `,"reason":"` and one more byte.
const TORN_HEAD: usize = 128;

/// How many events the torn last line of a file, starting at `offset`
/// with `head`, took with it (docs/AUDIT-LOG.md section 7):
///
/// - none when it is the file's first line: a header, which is always
///   written alone (a new log, a rotation, a rotation cut short and
///   completed);
/// - for a gap line cut short, the events it was recording (as far as its
///   `lost` was written), and the event a `write-failed` gap line is
///   written with; a `torn-tail` gap line is written alone;
/// - otherwise 1: an event line (alone or after a complete gap line), or a
///   line cut before it says what it is (most lines a writer starts are
///   an append's event).
fn torn_lost(offset: u64, head: &[u8]) -> u64 {
    if offset == 0 {
        return 0;
    }
    let digits = |b: &[u8]| b.iter().take_while(|c| c.is_ascii_digit()).count();
    let Some(rest) = head.strip_prefix(b"{\"seq\":") else {
        return 1;
    };
    let Some(rest) = rest[digits(rest)..].strip_prefix(b",\"type\":\"gap\",\"lost\":") else {
        return 1;
    };
    let n = digits(rest);
    let lost = rest[..n].iter().fold(0u64, |acc, d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    match rest[n..].strip_prefix(b",\"reason\":\"") {
        Some(reason) if reason.starts_with(b"w") => lost.saturating_add(1),
        _ => lost,
    }
}

/// Reads the first line of `path` (without its newline), at most
/// `MAX_LINE` bytes and its newline read; a longer one comes back longer
/// than `MAX_LINE`, which `line::decode` refuses.
fn read_first_line(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    line::read_line(
        &mut io::BufReader::with_capacity(8 << 10, open_read(path)?),
        &mut buf,
    )?;
    Ok(buf)
}

/// The log whose first file is `path` is `path` with a segment suffix
/// (`.000002`, ...) removed.
fn base_of(path: &Path) -> PathBuf {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return path.to_path_buf();
    };
    match name.rsplit_once('.') {
        Some((stem, n))
            if !stem.is_empty() && n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            path.with_file_name(stem)
        }
        _ => path.to_path_buf(),
    }
}

/// How to start a new log after the chain of `base` broke.
pub(crate) fn new_log_steps(base: &Path) -> String {
    let b = base.display();
    format!(
        "To rotate to a new log: stop every process that writes {b}; run `backup audit verify {b}` (audit::verify) and keep its report; move {b}, its rotated files ({b}.000002, ...) and {b}.broken if present to an evidence directory, unchanged (they remain the record up to the first bad line); then the next open of {b} starts a new log (or configure a new path). See SECURITY.md, \"Audit log\""
    )
}

/// The marker a writer leaves beside a log whose chain it found broken, so
/// that every other writer, and every later process, refuses it too:
/// `BASE.broken`, holding the refusal (UTF-8 text).
pub(crate) fn broken_marker(base: &Path) -> PathBuf {
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(".broken");
    base.with_file_name(name)
}

/// Most bytes of a marker's text shown in a refusal.
const MAX_MARKER_SHOWN: u64 = 2048;

/// The refusal recorded in `base`'s marker, if there is one. A marker that
/// cannot be read (a link, a directory, a FIFO) still refuses.
fn marked_broken(base: &Path) -> Option<String> {
    let marker = broken_marker(base);
    match std::fs::symlink_metadata(&marker) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(format!(
            "its marker {} cannot be checked: {e}",
            marker.display()
        )),
        Ok(_) => {
            let text = open_read(&marker).ok().and_then(|f| {
                let mut buf = String::new();
                use std::io::Read as _;
                f.take(MAX_MARKER_SHOWN).read_to_string(&mut buf).ok()?;
                Some(buf)
            });
            Some(match text {
                Some(t) => format!(
                    "{} says the chain was found broken: {}",
                    marker.display(),
                    t.trim()
                ),
                None => format!("{} marks the chain as broken", marker.display()),
            })
        }
    }
}

/// The sequence number after `seq`, read from `path`: an entry numbered
/// `u64::MAX` cannot be followed.
fn next_seq(path: &Path, seq: u64) -> Result<u64, OpenError> {
    seq.checked_add(1).ok_or_else(|| {
        OpenError::Invalid(format!(
            "{}: its last entry has the largest sequence number; the log is damaged",
            path.display()
        ))
    })
}

/// What to do about a log that cannot be resumed.
fn damaged_advice(bad: &BadLine) -> String {
    let base = base_of(&bad.file);
    if bad.problem == Problem::Incomplete {
        format!(
            "The last line is incomplete (a writer died in the middle of an append): open the log with repair_torn_tail(true) to cut it off and record a gap line. {}",
            new_log_steps(&base)
        )
    } else {
        format!(
            "Do not append to it: its chain is broken (edited, cut, or forked by a writer that did not hold the log's lock). {}",
            new_log_steps(&base)
        )
    }
}

/// How a path stopped naming the file a writer holds open.
enum Gone {
    /// Another file is there now.
    Replaced,
    /// Nothing is there (moved away or removed).
    Removed,
}

/// Whether `path` still names `held` (same device and inode), and if not,
/// how; one `fstat` and one `lstat`. Always "yes" where there are no
/// inodes to compare (not unix).
fn path_still_names(path: &Path, held: &File) -> Result<Option<Gone>, SinkError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let fail = |e: io::Error| SinkError(format!("audit log {}: {e}", path.display()));
        let held = held.metadata().map_err(fail)?;
        match std::fs::symlink_metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => Ok(None),
            Ok(_) => Ok(Some(Gone::Replaced)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(Gone::Removed)),
            Err(e) => Err(fail(e)),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, held);
        Ok(None)
    }
}

/// An exclusive advisory lock (`flock`) on a log's first file, released
/// on drop, on every path.
struct Exclusive<'a>(&'a File);

impl Exclusive<'_> {
    fn take(file: &File) -> io::Result<Exclusive<'_>> {
        file.lock()?;
        Ok(Exclusive(file))
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The 1-based number of the line starting at `offset` (counted only when
/// an error is reported).
fn line_number_at(path: &Path, offset: u64) -> u64 {
    let mut n = 1;
    if let Ok(f) = open_read(path) {
        let mut r = io::BufReader::new(f.take(offset));
        let mut buf = [0u8; 64 * 1024];
        while let Ok(k) = r.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    n
}

impl AuditLog {
    /// Opens (or creates) the log whose first file is `path` with the
    /// defaults: unkeyed, fsync every entry, no rotation. See
    /// [`builder`](Self::builder).
    pub fn open(path: impl AsRef<Path>) -> Result<AuditLog, OpenError> {
        AuditLog::builder().open(path)
    }

    /// A builder: audit key, fsync policy, rotation.
    pub fn builder() -> AuditLogBuilder {
        AuditLogBuilder::default()
    }

    fn open_with(opts: AuditLogBuilder, base: &Path) -> Result<AuditLog, OpenError> {
        let name = base
            .file_name()
            .filter(|n| n.to_str().is_some())
            .ok_or_else(|| {
                OpenError::Invalid(format!("{}: not a UTF-8 file name", base.display()))
            })?;
        let dir = match base.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let registered = dir.canonicalize().map_err(io_err(dir))?.join(name);
        let registration = {
            let mut open = lock(&OPEN_LOGS);
            if open.contains(&registered) {
                return Err(OpenError::InUse(base.to_path_buf()));
            }
            open.push(registered.clone());
            Registration(registered)
        };
        // The first file carries the lock, so it exists before anything is
        // read: created empty here if the log is new (several processes may
        // do so at once; the first to hold the lock writes the header).
        let found = segments(base).map_err(io_err(base))?;
        if let Some((n, first)) = found.first() {
            if *n != 1 {
                return Err(missing_first_file(base, first));
            }
        }
        // Also refuses a symbolic link that `segments` does not list (a
        // dangling one): the open below would refuse it less clearly.
        let exists = check_regular(base)?;
        let lock_file = if !exists {
            let mut opts = OpenOptions::new();
            opts.read(true).append(true).create(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            open_file(&mut opts, base)
        } else {
            open_read(base)
        }
        .map_err(io_err(base))?;
        let cfg = Config {
            base: base.to_path_buf(),
            mac: match opts.key {
                Some(k) => Mac::Hmac(k),
                None => Mac::Sha256,
            },
            fsync: opts.fsync,
            max_file_bytes: opts.max_file_bytes,
            repair_torn_tail: opts.repair_torn_tail,
            lock: lock_file,
        };
        // On error, `registration` is dropped and releases the path, and
        // the lock is released.
        let state = {
            let _locked = Exclusive::take(&cfg.lock).map_err(|e| OpenError::Io {
                path: base.to_path_buf(),
                source: io::Error::new(e.kind(), format!("cannot lock the log: {e}")),
            })?;
            let state = cfg.resume()?;
            if cfg.fsync != FsyncPolicy::Never {
                // Whatever an earlier process left in the page cache.
                state.file.sync_data().map_err(io_err(&state.path))?;
            }
            state
        };
        let durable = Durable {
            file: state.file.try_clone().map_err(io_err(&state.path))?,
            synced: state.next_seq,
            failed: None,
        };
        Ok(AuditLog {
            inner: Arc::new(Inner {
                cfg,
                written: AtomicU64::new(state.next_seq),
                durable: Mutex::new(durable),
                state: Mutex::new(state),
                counters: Counters::default(),
                _registration: registration,
            }),
            writer: Mutex::new(None),
        })
    }
}

impl Config {
    /// Finds the end of the chain on disk and returns the writer state.
    /// Call with the lock held. A new (empty) first file gets the genesis
    /// header; an incomplete last line is cut off (and recorded by a `gap`
    /// line) if `repair_torn_tail` is set, and refused otherwise.
    fn resume(&self) -> Result<State, OpenError> {
        if let Some(reason) = marked_broken(&self.base) {
            return Err(OpenError::Broken(format!(
                "{reason}. Do not append to it. {}",
                new_log_steps(&self.base)
            )));
        }
        let repair = self.repair_torn_tail;
        let found = segments(&self.base).map_err(io_err(&self.base))?;
        let Some(&(last_n, ref last_path)) = found.last() else {
            // Removed since it was opened: never start a new chain silently.
            return Err(OpenError::Invalid(format!(
                "{} was removed while the log was open: no entry was written. {}",
                self.base.display(),
                new_log_steps(&self.base)
            )));
        };
        if found[0].0 != 1 {
            return Err(missing_first_file(&self.base, &found[0].1));
        }
        if !check_regular(last_path)? {
            return Err(io_err(last_path)(io::Error::new(
                io::ErrorKind::NotFound,
                "removed while it was being opened",
            )));
        }
        let mut tail = read_tail(last_path).map_err(io_err(last_path))?;
        let mut repaired = None;
        if let Some((offset, torn_len)) = tail.torn {
            if torn_len > MAX_LINE as u64 {
                // Longer than any line: no write of a writer was torn
                // here, and nothing is cut (the verifier says the same).
                return Err(OpenError::Damaged(BadLine {
                    file: last_path.clone(),
                    line: line_number_at(last_path, offset),
                    seq: None,
                    problem: Problem::TooLong,
                }));
            }
            if !repair {
                return Err(OpenError::Damaged(BadLine {
                    file: last_path.clone(),
                    line: line_number_at(last_path, offset),
                    seq: None,
                    problem: Problem::Incomplete,
                }));
            }
            let f =
                open_file(OpenOptions::new().write(true), last_path).map_err(io_err(last_path))?;
            f.set_len(offset).map_err(io_err(last_path))?;
            f.sync_all().map_err(io_err(last_path))?;
            repaired = Some(torn_lost(offset, &tail.torn_head));
            tail = read_tail(last_path).map_err(io_err(last_path))?;
        }
        let file =
            open_file(OpenOptions::new().append(true), last_path).map_err(io_err(last_path))?;
        let mut st = if tail.len == 0 {
            // A file created by a rotation (or a new log) that crashed
            // before its header was written: write it now.
            let (seq, prev) = if last_n == 1 {
                (0, [0; 32])
            } else {
                let prev_path = segment_path(&self.base, last_n - 1);
                self.check_header(&prev_path, last_n - 1)?;
                let prev_tail = read_tail(&prev_path).map_err(io_err(&prev_path))?;
                let line = self.check_last_line(&prev_path, &prev_tail)?;
                (next_seq(&prev_path, line.seq)?, line.hash)
            };
            let mut st = self.fresh_state(file, last_path.clone(), last_n, seq, prev);
            let prev_file = (last_n > 1).then(|| file_name(&segment_path(&self.base, last_n - 1)));
            self.write_header(&mut st, prev_file)
                .map_err(io_err(last_path))?;
            st
        } else {
            self.check_header(last_path, last_n)?;
            let line = self.check_last_line(last_path, &tail)?;
            let mut st = self.fresh_state(
                file,
                last_path.clone(),
                last_n,
                next_seq(last_path, line.seq)?,
                line.hash,
            );
            st.bytes = tail.len;
            // The exact count is not needed (nor read): only whether the
            // file holds more than its header, which rotation asks.
            st.lines_in_file = if matches!(line.body, Body::Header(_)) {
                1
            } else {
                2
            };
            st
        };
        if let Some(lost) = repaired {
            st.lost = lost;
            self.write_gap(&mut st, "torn-tail")
                .map_err(io_err(last_path))?;
        }
        Ok(st)
    }

    fn fresh_state(
        &self,
        file: File,
        path: PathBuf,
        segment: u32,
        seq: u64,
        prev: [u8; 32],
    ) -> State {
        State {
            file,
            path,
            segment,
            bytes: 0,
            lines_in_file: 0,
            next_seq: seq,
            prev,
            unsynced: 0,
            lost: 0,
            broken: None,
        }
    }

    /// Checks that the header of `path` is segment `n` of a log with the
    /// configured MAC and key.
    fn check_header(&self, path: &Path, n: u32) -> Result<(), OpenError> {
        let raw = read_first_line(path).map_err(io_err(path))?;
        let bad = |problem| {
            OpenError::Damaged(BadLine {
                file: path.to_path_buf(),
                line: 1,
                seq: None,
                problem,
            })
        };
        let (line, _) = line::decode(&raw).map_err(bad)?;
        let Body::Header(h) = line.body else {
            return Err(bad(Problem::HeaderExpected));
        };
        if h.mac != self.mac.name() || h.key_id.as_deref() != self.mac.key_id() {
            return Err(OpenError::KeyMismatch {
                path: path.to_path_buf(),
                expected: Mac::describe(self.mac.name(), self.mac.key_id()),
                found: Mac::describe(&h.mac, h.key_id.as_deref()),
            });
        }
        if h.segment != n {
            return Err(bad(Problem::SegmentMismatch {
                expected: n,
                found: h.segment,
            }));
        }
        Ok(())
    }

    /// Decodes and verifies the last complete line of a file, and that it
    /// follows from the line before it (in sequence and chained to it): a
    /// fork at the end of the log (two lines with one sequence number,
    /// written by writers that did not share the lock) is not resumed.
    fn check_last_line(&self, path: &Path, tail: &Tail) -> Result<Line, OpenError> {
        let bad = |offset: u64, seq: Option<u64>, problem| {
            OpenError::Damaged(BadLine {
                file: path.to_path_buf(),
                line: line_number_at(path, offset),
                seq,
                problem,
            })
        };
        let Some((offset, raw)) = &tail.last else {
            return Err(bad(tail.len, None, Problem::EmptyFile));
        };
        let line = self.verified_line(raw).map_err(|p| bad(*offset, None, p))?;
        let seq = Some(line.seq);
        match (&tail.before, &line.body) {
            (None, _) => {}
            (Some(_), Body::Header(_)) => return Err(bad(*offset, seq, Problem::UnexpectedHeader)),
            (Some((before_offset, before_raw)), _) => {
                let before = self
                    .verified_line(before_raw)
                    .map_err(|p| bad(*before_offset, None, p))?;
                if line.seq != before.seq.wrapping_add(1) {
                    return Err(bad(
                        *offset,
                        seq,
                        Problem::SeqMismatch {
                            expected: before.seq.wrapping_add(1),
                            found: line.seq,
                        },
                    ));
                }
                if line.prev != before.hash {
                    return Err(bad(*offset, seq, Problem::PrevMismatch));
                }
            }
        }
        Ok(line)
    }

    /// Decodes one line and checks its hash.
    fn verified_line(&self, raw: &[u8]) -> Result<Line, Problem> {
        if raw.is_empty() {
            return Err(Problem::TooLong);
        }
        // Refuses a line over `MAX_LINE` bytes, as every reader does.
        let (line, body) = line::decode(raw)?;
        if !self.mac.matches(&line.prev, body, &line.hash) {
            return Err(Problem::HashMismatch);
        }
        Ok(line)
    }

    /// Writes the header of the file `st` points at (segment `st.segment`).
    fn write_header(&self, st: &mut State, prev_file: Option<String>) -> io::Result<()> {
        let header = Body::Header(Header {
            mac: self.mac.name().to_owned(),
            key_id: self.mac.key_id().map(str::to_owned),
            segment: st.segment,
            prev_file,
            time: SystemTime::now(),
        });
        let (text, hash) = line::make_line(&self.mac, st.next_seq, &header, &st.prev);
        st.file.write_all(text.as_bytes())?;
        if self.fsync != FsyncPolicy::Never {
            st.file.sync_data()?;
            sync_dir(&st.path)?;
        }
        st.bytes += text.len() as u64;
        st.lines_in_file += 1;
        st.next_seq += 1;
        st.prev = hash;
        Ok(())
    }

    /// Writes a gap line for `st.lost` events at once (used on open).
    fn write_gap(&self, st: &mut State, reason: &str) -> io::Result<()> {
        let gap = Body::Gap {
            lost: st.lost,
            reason: reason.to_owned(),
            time: SystemTime::now(),
        };
        let (text, hash) = line::make_line(&self.mac, st.next_seq, &gap, &st.prev);
        st.file.write_all(text.as_bytes())?;
        if self.fsync != FsyncPolicy::Never {
            st.file.sync_data()?;
        }
        st.bytes += text.len() as u64;
        st.lines_in_file += 1;
        st.next_seq += 1;
        st.prev = hash;
        st.lost = 0;
        Ok(())
    }
}

impl Config {
    /// Writes one event (and a gap line first if events were lost);
    /// returns its `seq` and whether the caller must now fsync.
    fn append_locked(
        &self,
        st: &mut State,
        durable: &Mutex<Durable>,
        event_json: &str,
    ) -> Result<(u64, bool), SinkError> {
        let fail = |what: &str, e: &dyn std::fmt::Display, path: &Path| {
            SinkError(format!("audit log {}: {what}: {e}", path.display()))
        };
        if st.broken.is_none() {
            st.broken = lock(durable).failed.clone();
        }
        if let Some(reason) = &st.broken {
            return Err(SinkError(format!(
                "audit log {} refuses entries after an earlier failure ({reason}); reopen it",
                self.base.display()
            )));
        }
        // seq (20 digits), prev and hash (64 each) and the framing.
        let estimate = event_json.len() as u64 + 240;
        if estimate > MAX_LINE as u64 {
            return Err(SinkError(format!(
                "audit log {}: event too large ({} bytes of JSON; the limit is {MAX_LINE})",
                self.base.display(),
                event_json.len()
            )));
        }
        // Every writer of this log, in any process, appends under this
        // lock, and continues the chain from what is on disk under it, not
        // from what it wrote last. Released on return, on every path.
        let _locked = Exclusive::take(&self.lock).map_err(|e| {
            SinkError(format!(
                "audit log {}: cannot lock it: {e}",
                self.base.display()
            ))
        })?;
        self.catch_up(st, durable)?;
        if let Some(max) = self.max_file_bytes {
            let gap = if st.lost > 0 { 240 } else { 0 };
            if st.lines_in_file > 1 && st.bytes + estimate + gap > max {
                self.rotate(st, durable)?;
            }
        }
        let mut text = String::with_capacity(event_json.len() + 512);
        let mut seq = st.next_seq;
        let mut prev = st.prev;
        let mut lines = 0;
        if st.lost > 0 {
            let gap = Body::Gap {
                lost: st.lost,
                reason: "write-failed".into(),
                time: SystemTime::now(),
            };
            let (gap_text, hash) = line::make_line(&self.mac, seq, &gap, &prev);
            text.push_str(&gap_text);
            seq += 1;
            prev = hash;
            lines += 1;
        }
        let event_seq = seq;
        let mut body = line::event_body(seq, event_json, &prev);
        let hash = self.mac.compute(&prev, body.as_bytes());
        line::finish_line(&mut body, &hash);
        text.push_str(&body);
        lines += 1;

        if let Err(e) = st.file.write_all(text.as_bytes()) {
            // Cut the file back to its last complete line, so the chain on
            // disk stays intact for the next attempt.
            if let Err(e2) = st.file.set_len(st.bytes) {
                st.broken = Some(format!(
                    "write failed ({e}) and could not be rolled back ({e2})"
                ));
            }
            return Err(fail("write failed", &e, &st.path));
        }
        st.bytes += text.len() as u64;
        st.lines_in_file += lines;
        st.next_seq = event_seq + 1;
        st.prev = hash;
        st.lost = 0;
        st.unsynced += 1;
        let every = match self.fsync {
            FsyncPolicy::EveryEntry => Some(1),
            FsyncPolicy::EveryN(n) => Some(n.max(1)),
            FsyncPolicy::Never => None,
        };
        let sync = every.is_some_and(|n| st.unsynced >= n);
        if sync {
            st.unsynced = 0;
        }
        Ok((event_seq, sync))
    }

    /// With the lock held: brings `st` to the end of the chain on disk, so
    /// that the next line continues it whoever wrote last. Cheap when this
    /// writer wrote last (one `fstat` and one `stat`); otherwise the end of
    /// the last file is read from its end (two lines) and checked. Refuses
    /// (and refuses every later entry, until reopened) when the chain on
    /// disk does not verify or does not contain what this writer wrote.
    fn catch_up(&self, st: &mut State, durable: &Mutex<Durable>) -> Result<(), SinkError> {
        if let Some(what) = self.replaced()? {
            let msg = format!(
                "audit log {} refuses the entry: {what} while this writer had it open, so its lock no longer excludes the log's other writers and its entries would not go to the log; nothing was written. Reopen the log (restart this process)",
                self.base.display()
            );
            st.broken = Some(msg.clone());
            return Err(SinkError(msg));
        }
        if self.current_file_moved(st)? {
            let msg = format!(
                "audit log {} refuses the entry: {} was renamed, replaced or removed while this writer had it open, so its entries would not go to the log; nothing was written. Do not append to it. {}",
                self.base.display(),
                st.path.display(),
                new_log_steps(&self.base)
            );
            self.mark_broken(&msg);
            st.broken = Some(msg.clone());
            return Err(SinkError(msg));
        }
        let next_segment = st.segment.checked_add(1).ok_or_else(|| {
            SinkError(format!(
                "audit log {}: the file number {} cannot grow: the log is damaged",
                self.base.display(),
                st.segment
            ))
        })?;
        let next = segment_path(&self.base, next_segment);
        let rotated = match std::fs::symlink_metadata(&next) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(SinkError(format!("audit log {}: {e}", next.display()))),
        };
        if !rotated {
            let len = st
                .file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| SinkError(format!("audit log {}: {e}", st.path.display())))?;
            if len == st.bytes {
                // Nobody wrote since this writer did.
                return Ok(());
            }
        }
        let fresh = match self.resume() {
            Ok(fresh) => fresh,
            Err(OpenError::Damaged(bad)) if bad.problem == Problem::Incomplete => {
                // A writer died in the middle of an append. Not sticky:
                // reopening with repair_torn_tail fixes it for everyone.
                return Err(SinkError(format!(
                    "audit log {} refuses the entry: {bad}. {}",
                    self.base.display(),
                    damaged_advice(&bad)
                )));
            }
            Err(OpenError::Damaged(bad)) => {
                let reason = format!("the chain on disk is broken: {bad}");
                let msg = format!(
                    "audit log {} refuses the entry: {reason}. {}",
                    self.base.display(),
                    damaged_advice(&bad)
                );
                self.mark_broken(&msg);
                st.broken = Some(msg.clone());
                return Err(SinkError(msg));
            }
            Err(OpenError::Broken(reason)) => {
                let msg = format!(
                    "audit log {} refuses the entry: {reason}",
                    self.base.display()
                );
                st.broken = Some(msg.clone());
                return Err(SinkError(msg));
            }
            Err(e) => {
                return Err(SinkError(format!(
                    "audit log {}: cannot read the end of the chain: {e}",
                    self.base.display()
                )))
            }
        };
        // What this writer wrote last must still be the end of the chain or
        // before it: a shorter chain, or another line with the same number,
        // means lines were removed or the chain was forked.
        let mine = st.next_seq.saturating_sub(1);
        let found = fresh.next_seq.saturating_sub(1);
        if found < mine || (found == mine && fresh.prev != st.prev) {
            let what = if found < mine {
                format!("the log ends at entry {found} but this writer last wrote entry {mine}: lines were removed from its end, or an older copy was put back")
            } else {
                format!("entry {found} on disk is not the one this writer wrote: another writer forked the chain, or it was rewritten")
            };
            let msg = format!(
                "audit log {} refuses the entry: {what}. Do not append to it. {}",
                self.base.display(),
                new_log_steps(&self.base)
            );
            self.mark_broken(&msg);
            st.broken = Some(msg.clone());
            return Err(SinkError(msg));
        }
        if fresh.segment == st.segment {
            st.bytes = fresh.bytes;
            st.lines_in_file = fresh.lines_in_file;
            st.next_seq = fresh.next_seq;
            st.prev = fresh.prev;
            return Ok(());
        }
        // Another writer started a newer file. What this writer left in its
        // file goes to stable storage first, as on a rotation of its own:
        // the group commit only syncs the current file.
        if self.fsync != FsyncPolicy::Never {
            if let Err(e) = st.file.sync_data() {
                let reason = format!("fsync failed: {e}");
                lock(durable).failed = Some(reason.clone());
                st.broken = Some(reason);
                return Err(SinkError(format!(
                    "audit log {}: fsync failed: {e}",
                    st.path.display()
                )));
            }
            st.unsynced = 0;
        }
        let handle = fresh
            .file
            .try_clone()
            .map_err(|e| SinkError(format!("audit log {}: {e}", fresh.path.display())))?;
        let old_next = st.next_seq;
        let (lost, unsynced) = (st.lost, st.unsynced);
        *st = fresh;
        st.lost = lost;
        st.unsynced = unsynced;
        let mut d = lock(durable);
        d.file = handle;
        if self.fsync != FsyncPolicy::Never {
            d.synced = d.synced.max(old_next);
        }
        Ok(())
    }

    /// Leaves the broken-chain marker (best effort: the refusal stands in
    /// this writer either way). Never follows a link; an existing marker
    /// is kept.
    fn mark_broken(&self, msg: &str) {
        let marker = broken_marker(&self.base);
        if let Ok(mut f) = create_new(&marker) {
            use std::io::Write as _;
            let _ = f.write_all(msg.as_bytes()).and_then(|()| f.sync_all());
            let _ = sync_dir(&marker);
        }
    }

    /// With the lock held: whether the file this writer appends to is
    /// still the one its path names (not renamed, replaced or removed).
    fn current_file_moved(&self, st: &State) -> Result<bool, SinkError> {
        Ok(path_still_names(&st.path, &st.file)?.is_some())
    }

    /// With the lock held: whether the log's first file is no longer the
    /// file whose lock this writer holds (moved away, e.g. to an evidence
    /// directory, or replaced), and how.
    fn replaced(&self) -> Result<Option<&'static str>, SinkError> {
        Ok(
            path_still_names(&self.base, &self.lock)?.map(|how| match how {
                Gone::Replaced => "its first file was replaced",
                Gone::Removed => "its first file was moved away or removed",
            }),
        )
    }

    /// Starts the next file, whose header chains to the current last line.
    fn rotate(&self, st: &mut State, durable: &Mutex<Durable>) -> Result<(), SinkError> {
        if self.fsync != FsyncPolicy::Never {
            // The old file is left complete and on disk.
            if let Err(e) = st.file.sync_data() {
                let reason = format!("fsync failed: {e}");
                lock(durable).failed = Some(reason.clone());
                st.broken = Some(reason);
                return Err(SinkError(format!(
                    "audit log {}: fsync failed: {e}",
                    st.path.display()
                )));
            }
            st.unsynced = 0;
        }
        let n = st.segment.checked_add(1).ok_or_else(|| {
            SinkError(format!(
                "audit log {}: the file number {} cannot grow: the log is damaged",
                self.base.display(),
                st.segment
            ))
        })?;
        let path = segment_path(&self.base, n);
        let file = create_new(&path).map_err(|e| {
            SinkError(format!(
                "audit log {}: cannot start the next file: {e}",
                path.display()
            ))
        })?;
        let mut next = self.fresh_state(file, path.clone(), n, st.next_seq, st.prev);
        next.lost = st.lost;
        let started = self
            .write_header(&mut next, Some(file_name(&st.path)))
            .and_then(|()| next.file.try_clone());
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                // Leave no half-written file behind: the next attempt (or the
                // next open) would take it for the end of the chain.
                if std::fs::remove_file(&path).is_err() {
                    st.broken = Some(format!(
                        "could not write the header of {} ({e}) nor remove it",
                        path.display()
                    ));
                }
                return Err(SinkError(format!(
                    "audit log {}: cannot start the next file: {e}",
                    path.display()
                )));
            }
        };
        *st = next;
        let mut d = lock(durable);
        d.file = handle;
        if self.fsync != FsyncPolicy::Never {
            // The old file and the new header were synced above.
            d.synced = st.next_seq;
        }
        Ok(())
    }
}

impl Inner {
    /// Writes one event under the log's locks (no fsync); returns its
    /// `seq` and whether the caller must now fsync ([`sync_through`](Self::sync_through)).
    fn write_entry(&self, event_json: &str) -> Result<(u64, bool), SinkError> {
        let mut st = lock(&self.state);
        match self.cfg.append_locked(&mut st, &self.durable, event_json) {
            Ok(done) => {
                self.written.store(st.next_seq, Ordering::SeqCst);
                self.counters.entries.fetch_add(1, Ordering::Relaxed);
                Ok(done)
            }
            Err(e) => {
                st.lost = st.lost.saturating_add(1);
                Err(e)
            }
        }
    }

    /// Group commit: returns once every line below `target` is on stable
    /// storage, by an fsync of its own or one that another append started
    /// after `target` was written.
    fn sync_through(&self, target: u64) -> Result<(), SinkError> {
        let mut d = lock(&self.durable);
        if let Some(reason) = &d.failed {
            return Err(SinkError(format!(
                "audit log {}: not on stable storage ({reason}); reopen it",
                self.cfg.base.display()
            )));
        }
        if d.synced >= target {
            return Ok(());
        }
        // Everything written before this load is covered by the fsync below
        // (a rotation, which would change the file, needs this lock).
        let upto = self.written.load(Ordering::SeqCst);
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = d.file.sync_data() {
            d.failed = Some(format!("fsync failed: {e}"));
            return Err(SinkError(format!(
                "audit log {}: fsync failed: {e}",
                self.cfg.base.display()
            )));
        }
        d.synced = d.synced.max(upto);
        Ok(())
    }

    /// The writer thread: takes every queued entry as one group, commits
    /// it, answers its receipts; until the queue is closed and empty.
    fn run_writer(&self, queue: &Queue) {
        let _closing = queue.closed_on_unwind();
        while let Some(group) = queue.take_group(MAX_GROUP) {
            self.commit_group(group);
        }
    }

    /// Appends the entries of `group` in order, then one fsync through the
    /// last of them if any needs one, then answers each: `Ok` once its
    /// line is as durable as the policy says, its own error if it could
    /// not be written, the fsync's error (for every written entry of the
    /// group) if that failed.
    fn commit_group(&self, group: Vec<Job>) {
        let c = &self.counters;
        c.groups.fetch_add(1, Ordering::Relaxed);
        c.grouped_entries
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        c.largest_group
            .fetch_max(group.len() as u64, Ordering::Relaxed);
        let written: Vec<(Completion, Written)> = group
            .into_iter()
            .map(|job| {
                let result = self.write_entry(&job.event_json);
                (job.done, result)
            })
            .collect();
        let needs_sync = written.iter().any(|(_, r)| matches!(r, Ok((_, true))));
        let target = written
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|(seq, _)| seq + 1))
            .max()
            .filter(|_| needs_sync);
        let synced = match target {
            Some(t) => self.sync_through(t).map_err(|e| e.0),
            None => Ok(()),
        };
        for (done, result) in written {
            done.complete(match (result, &synced) {
                (Err(e), _) => Err(e),
                (Ok(_), Ok(())) => Ok(()),
                (Ok(_), Err(why)) => Err(SinkError(why.clone())),
            });
        }
    }
}

impl AuditLog {
    /// Appends one event on the calling thread and returns its `seq`, once
    /// it is as durable as the [`FsyncPolicy`] says. This is what
    /// [`EventSink::record`] does; async code should use
    /// [`EventSink::submit`] instead (see the [type documentation](Self)).
    pub fn append(&self, event: &Event) -> Result<u64, SinkError> {
        // Encode outside the lock; only seq, prev and the hash need it.
        let event_json = event.to_json();
        let (seq, sync) = self.inner.write_entry(&event_json)?;
        if sync {
            self.inner.sync_through(seq + 1)?;
        }
        Ok(seq)
    }

    /// The end of the chain as of this writer's last append (or open):
    /// that line's `seq` and `hash` (other processes may have appended
    /// since). Store it outside the log's reach to detect a truncated tail
    /// later ([`verify_with_anchor`](super::verify_with_anchor)).
    pub fn anchor(&self) -> Anchor {
        let st = lock(&self.inner.state);
        Anchor {
            seq: st.next_seq.saturating_sub(1),
            hash: line::hex(&st.prev),
        }
    }

    /// Forces the entries written so far to stable storage now (useful with
    /// [`FsyncPolicy::EveryN`], e.g. at shutdown). With
    /// [`FsyncPolicy::Never`], only the current file is synced: rotation
    /// does not sync the files it leaves.
    pub fn sync(&self) -> Result<(), SinkError> {
        if lock(&self.inner.state).broken.is_some() {
            return Err(SinkError(format!(
                "audit log {} is unusable after an earlier failure; reopen it",
                self.inner.cfg.base.display()
            )));
        }
        self.inner
            .sync_through(self.inner.written.load(Ordering::SeqCst))
    }

    /// The log's first file (the path it was opened with).
    pub fn path(&self) -> &Path {
        &self.inner.cfg.base
    }

    /// The file entries are currently appended to.
    pub fn current_file(&self) -> PathBuf {
        lock(&self.inner.state).path.clone()
    }

    /// Entries, groups and fsyncs so far (see [`AuditStats`]).
    pub fn stats(&self) -> AuditStats {
        let c = &self.inner.counters;
        AuditStats {
            entries: c.entries.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            groups: c.groups.load(Ordering::Relaxed),
            grouped_entries: c.grouped_entries.load(Ordering::Relaxed),
            largest_group: c.largest_group.load(Ordering::Relaxed),
        }
    }

    /// Queues one entry for the writer thread (started here the first
    /// time); `Err` if the thread cannot be started.
    fn enqueue(&self, event_json: String, done: Completion) -> Result<(), SinkError> {
        let mut writer = lock(&self.writer);
        if writer.is_none() {
            let queue = Arc::new(Queue::default());
            let (inner, q) = (self.inner.clone(), queue.clone());
            let thread = std::thread::Builder::new()
                .name("phi-envelope-audit".into())
                .spawn(move || inner.run_writer(&q))
                .map_err(|e| {
                    SinkError(format!(
                        "audit log {}: cannot start its writer thread: {e}",
                        self.inner.cfg.base.display()
                    ))
                })?;
            *writer = Some(Writer {
                queue,
                thread: Some(thread),
            });
        }
        let Some(w) = writer.as_ref() else {
            return Err(SinkError("audit log writer missing".into()));
        };
        w.queue.push(event_json, done).map_err(|()| {
            SinkError(format!(
                "audit log {}: its writer thread stopped; reopen the log",
                self.inner.cfg.base.display()
            ))
        })
    }
}

impl EventSink for AuditLog {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        self.append(event).map(|_| ())
    }

    /// Queues the entry for the writer thread; the receipt resolves once
    /// it is written and (as the [`FsyncPolicy`] says) on stable storage,
    /// with the entries queued alongside it sharing one fsync.
    fn submit(&self, event: &Event) -> Receipt {
        let (receipt, done) = Receipt::pending();
        // A failed enqueue drops `done`, which answers the receipt with an
        // error; say which.
        if let Err(e) = self.enqueue(event.to_json(), done) {
            return Receipt::ready(Err(e));
        }
        receipt
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // The writer finishes what was queued, then stops.
        let writer = self.writer.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = writer.as_mut() {
            w.queue.close();
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let written = *self.written.get_mut();
        let d = self.durable.get_mut().unwrap_or_else(|p| p.into_inner());
        if d.failed.is_none() && d.synced < written && self.cfg.fsync != FsyncPolicy::Never {
            let _ = d.file.sync_data();
        }
    }
}
