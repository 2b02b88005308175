//! The verifier: checks a whole log, across its rotated files, and names the
//! first line where it is wrong.

use std::fmt;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::line::{self, Body, Framed, Mac};
use super::{segments, Anchor, AuditKey};

// What is wrong with a line is part of the line format (below this module);
// re-exported here, where the verifier reports it.
pub use super::line::Problem;

/// The first bad line of a log: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line number in that file (for a missing tail: the line
    /// after the last one).
    pub line: u64,
    /// The line's sequence number, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
}

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} line {}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Why a log did not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A file could not be read (or does not exist).
    #[error("cannot read audit log {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// No files were given.
    #[error("no audit log files to verify")]
    NoFiles,
    /// The log is keyed and no key was given.
    #[error("audit log {} is keyed (HMAC-SHA-256, key id {key_id}): verify it with its audit key", file.display())]
    KeyRequired {
        /// The file whose header says so.
        file: PathBuf,
        /// The key id in the header.
        key_id: String,
    },
    /// The first line that is wrong.
    #[error("audit log does not verify: {0}")]
    BadLine(BadLine),
}

impl VerifyError {
    /// The first bad line, when the log was read and found wrong.
    pub fn bad_line(&self) -> Option<&BadLine> {
        match self {
            VerifyError::BadLine(b) => Some(b),
            _ => None,
        }
    }
}

/// One verified file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSummary {
    /// The file.
    pub path: PathBuf,
    /// Its segment number.
    pub segment: u32,
    /// Its number of lines.
    pub lines: u64,
    /// The sequence numbers of its first and last lines.
    pub seqs: (u64, u64),
}

/// A `gap` line: events that could not be written at the time.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GapRecord {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line number.
    pub line: u64,
    /// Its sequence number.
    pub seq: u64,
    /// How many events were lost.
    pub lost: u64,
    /// Why (`write-failed`, `torn-tail`).
    pub reason: String,
}

/// What a successful verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The files, in chain order.
    pub files: Vec<FileSummary>,
    /// Every line, headers and gaps included.
    pub lines: u64,
    /// The event lines.
    pub entries: u64,
    /// The `gap` lines: events that were not recorded (the log says so, and
    /// the application should investigate).
    pub gaps: Vec<GapRecord>,
    /// The log's MAC and key id: `hmac-sha256 (key id …)` or `sha256`.
    pub mac: String,
    /// True for an HMAC-keyed log.
    pub keyed: bool,
    /// The end of the chain: keep it as the anchor of the next
    /// verification.
    pub last: Anchor,
}

impl VerifyReport {
    /// A report of nothing verified yet: the start of every verification.
    pub(super) fn empty() -> VerifyReport {
        VerifyReport {
            files: Vec::new(),
            lines: 0,
            entries: 0,
            gaps: Vec::new(),
            mac: String::new(),
            keyed: false,
            last: Anchor {
                seq: 0,
                hash: line::hex(&[0; 32]),
            },
        }
    }

    /// The number of events the gap lines say were lost.
    pub fn lost_events(&self) -> u64 {
        self.gaps.iter().map(|g| g.lost).sum()
    }
}

/// Verifies the log whose first file is `path`, with its rotated files
/// (`path.000002`, ...): every line is canonical, in sequence, chained to
/// the one before, and its hash verifies. Returns the first bad line
/// otherwise.
///
/// An unkeyed log only; a keyed log needs [`Verifier::key`]. A tail removed
/// from the end cannot be detected this way: see [`verify_with_anchor`].
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport, VerifyError> {
    Verifier::new().verify(path)
}

/// [`verify`], and also checks that the log contains the entry the
/// `anchor` names (its `seq` with its `hash`): lines removed from the end
/// (or a rewrite up to the anchor) are then detected. The log may have
/// grown past the anchor.
pub fn verify_with_anchor(
    path: impl AsRef<Path>,
    anchor: &Anchor,
) -> Result<VerifyReport, VerifyError> {
    Verifier::new().anchor(anchor.clone()).verify(path)
}

/// Verifies audit logs, with options: the audit key, an end anchor, a start
/// anchor.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    key: Option<AuditKey>,
    end: Option<Anchor>,
    start: Option<Anchor>,
}

impl Verifier {
    /// A verifier for unkeyed logs, without anchors.
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// Verifies with `key`; the log must then be keyed with it (an unkeyed
    /// log is reported as [`Problem::Unkeyed`]).
    pub fn key(mut self, key: AuditKey) -> Verifier {
        self.key = Some(key);
        self
    }

    /// Requires the entry `anchor.seq` to be in the log with `anchor.hash`
    /// (detects a truncated tail; see [`verify_with_anchor`]).
    pub fn anchor(mut self, anchor: Anchor) -> Verifier {
        self.end = Some(anchor);
        self
    }

    /// Verifies a log whose earlier files were archived or removed on
    /// purpose: the first file given must continue from `anchor` (its
    /// header's `seq` is `anchor.seq + 1` and its `prev` is `anchor.hash`)
    /// instead of starting with the genesis header.
    pub fn start_after(mut self, anchor: Anchor) -> Verifier {
        self.start = Some(anchor);
        self
    }

    /// The key and the end and start anchors (for the PostgreSQL verifier).
    #[cfg(feature = "postgres")]
    pub(crate) fn parts(&self) -> (Option<&AuditKey>, Option<&Anchor>, Option<&Anchor>) {
        (self.key.as_ref(), self.end.as_ref(), self.start.as_ref())
    }

    /// Verifies the log whose first file is `path` and its rotated files.
    ///
    /// Safe while writers (in this or other processes) append: the files
    /// and the length of the last one are taken under a shared lock on the
    /// first file (the lock every writer holds, exclusively, across an
    /// append and a rotation), so the log is verified as it was at that
    /// moment, between two appends, and lines appended later are not read.
    /// An append in progress is never mistaken for an incomplete line or a
    /// new file without its header. The lock is held only while the files
    /// are listed, not during the verification. Where the file system has
    /// no locks, the files are read as they are.
    pub fn verify(&self, path: impl AsRef<Path>) -> Result<VerifyReport, VerifyError> {
        let path = path.as_ref();
        let list = || {
            segments(path).map_err(|source| VerifyError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        // `None` if the first file cannot be opened (or is not a regular
        // file; no writer writes through a link or to a FIFO): it is then
        // read without the lock, and reported where it is read.
        let first = super::log::open_read(path).ok();
        let locked = first.as_ref().is_some_and(|f| f.lock_shared().is_ok());
        let listed = list().and_then(|files| {
            let last_len = match files.last() {
                Some((_, last)) if locked => Some(
                    std::fs::symlink_metadata(last)
                        .map_err(|source| VerifyError::Io {
                            path: last.clone(),
                            source,
                        })?
                        .len(),
                ),
                _ => None,
            };
            Ok((files, last_len))
        });
        if let (Some(f), true) = (&first, locked) {
            let _ = f.unlock();
        }
        let (mut files, last_len) = listed?;
        if files.first().is_none_or(|(n, _)| *n != 1) {
            // `path` itself is missing: let opening it report that.
            files.insert(0, (1, path.to_path_buf()));
        }
        let files: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
        self.verify_upto(&files, last_len)
    }

    /// Verifies the given files, in this order, as one chain, as they are
    /// (no lock is taken: for a log that is being written, use
    /// [`verify`](Self::verify), which reads a consistent snapshot).
    pub fn verify_files<P: AsRef<Path>>(&self, files: &[P]) -> Result<VerifyReport, VerifyError> {
        self.verify_upto(files, None)
    }

    /// [`verify_files`](Self::verify_files), reading at most `last_len`
    /// bytes of the last file.
    fn verify_upto<P: AsRef<Path>>(
        &self,
        files: &[P],
        last_len: Option<u64>,
    ) -> Result<VerifyReport, VerifyError> {
        if files.is_empty() {
            return Err(VerifyError::NoFiles);
        }
        let mut run = Run {
            verifier: self,
            mac: None,
            mac_name: String::new(),
            expected_seq: self.start.as_ref().map_or(0, |a| a.seq + 1),
            prev: match &self.start {
                Some(a) => line::unhex32(&a.hash).unwrap_or([0xff; 32]),
                None => [0; 32],
            },
            segment: 0,
            anchor_seen: false,
            report: VerifyReport::empty(),
        };
        let mut last_line = (files[0].as_ref().to_path_buf(), 0u64);
        for (index, path) in files.iter().enumerate() {
            let path = path.as_ref();
            let is_last = index + 1 == files.len();
            let limit = if is_last { last_len } else { None };
            // An empty last file after the first: a rotation whose writer
            // died between creating the file and writing its header. It
            // holds no line, and the next writer writes that header (the
            // state is one the writer resumes, not damage).
            let n = run.file(index, path, limit, is_last && index > 0)?;
            if n > 0 {
                last_line = (path.to_path_buf(), n);
            }
        }
        if let Some(anchor) = &self.end {
            if !run.anchor_seen {
                let last_seq = run.expected_seq.checked_sub(1);
                return Err(VerifyError::BadLine(BadLine {
                    file: last_line.0,
                    line: last_line.1 + 1,
                    seq: None,
                    problem: Problem::MissingTail {
                        last_seq,
                        anchor_seq: anchor.seq,
                    },
                }));
            }
        }
        run.report.mac = run.mac_name.clone();
        run.report.keyed = matches!(run.mac, Some(Mac::Hmac(_)));
        Ok(run.report)
    }
}

/// Why a header stops the verification.
enum HeaderFail {
    Bad(Problem),
    KeyRequired(String),
}

/// The state of one verification.
struct Run<'a> {
    verifier: &'a Verifier,
    mac: Option<Mac>,
    mac_name: String,
    expected_seq: u64,
    prev: [u8; 32],
    segment: u32,
    anchor_seen: bool,
    report: VerifyReport,
}

impl Run<'_> {
    /// Verifies one file (its first `limit` bytes, if given); returns its
    /// number of lines. An empty file is damage unless `may_be_empty`
    /// (then it is not listed in the report).
    fn file(
        &mut self,
        index: usize,
        path: &Path,
        limit: Option<u64>,
        may_be_empty: bool,
    ) -> Result<u64, VerifyError> {
        let io_err = |source| VerifyError::Io {
            path: path.to_path_buf(),
            source,
        };
        // As a writer opens it: no symbolic link followed, no FIFO waited
        // on, a regular file only.
        let file = super::log::open_read(path).map_err(io_err)?;
        let mut reader = BufReader::with_capacity(64 * 1024, file.take(limit.unwrap_or(u64::MAX)));
        let mut buf = Vec::with_capacity(1024);
        let mut line_no = 0u64;
        let first_seq = self.expected_seq;
        loop {
            let framed = line::read_line(&mut reader, &mut buf).map_err(io_err)?;
            if framed == Framed::End {
                break;
            }
            line_no += 1;
            let bad = |seq, problem| {
                VerifyError::BadLine(BadLine {
                    file: path.to_path_buf(),
                    line: line_no,
                    seq,
                    problem,
                })
            };
            match framed {
                Framed::TooLong => return Err(bad(None, Problem::TooLong)),
                Framed::Incomplete => return Err(bad(None, Problem::Incomplete)),
                Framed::End | Framed::Line => {}
            }
            let raw = &buf[..];
            let (entry, body) = line::decode(raw).map_err(|p| bad(None, p))?;
            let seq = Some(entry.seq);
            match (&entry.body, line_no) {
                (Body::Header(h), 1) => {
                    self.header(index, h, entry.seq)
                        .map_err(|fail| match fail {
                            HeaderFail::Bad(p) => bad(seq, p),
                            HeaderFail::KeyRequired(key_id) => VerifyError::KeyRequired {
                                file: path.to_path_buf(),
                                key_id,
                            },
                        })?;
                }
                (Body::Header(_), _) => return Err(bad(seq, Problem::UnexpectedHeader)),
                (_, 1) => return Err(bad(seq, Problem::HeaderExpected)),
                (Body::Event(_), _) => self.report.entries += 1,
                (Body::Gap { lost, reason, .. }, _) => self.report.gaps.push(GapRecord {
                    file: path.to_path_buf(),
                    line: line_no,
                    seq: entry.seq,
                    lost: *lost,
                    reason: reason.clone(),
                }),
            }
            if entry.seq != self.expected_seq {
                return Err(bad(
                    seq,
                    Problem::SeqMismatch {
                        expected: self.expected_seq,
                        found: entry.seq,
                    },
                ));
            }
            if entry.prev != self.prev {
                return Err(bad(seq, Problem::PrevMismatch));
            }
            let mac = self.mac.as_ref().expect("set by the first header");
            if !mac.matches(&entry.prev, body, &entry.hash) {
                return Err(bad(seq, Problem::HashMismatch));
            }
            if let Some(anchor) = &self.verifier.end {
                if anchor.seq == entry.seq {
                    if line::unhex32(&anchor.hash) != Some(entry.hash) {
                        return Err(bad(seq, Problem::AnchorMismatch { seq: anchor.seq }));
                    }
                    self.anchor_seen = true;
                }
            }
            self.prev = entry.hash;
            self.expected_seq += 1;
            self.report.lines += 1;
            self.report.last = Anchor {
                seq: entry.seq,
                hash: line::hex(&entry.hash),
            };
        }
        if line_no == 0 && may_be_empty {
            return Ok(0);
        }
        if line_no == 0 {
            return Err(VerifyError::BadLine(BadLine {
                file: path.to_path_buf(),
                line: 1,
                seq: None,
                problem: Problem::EmptyFile,
            }));
        }
        self.report.files.push(FileSummary {
            path: path.to_path_buf(),
            segment: self.segment,
            lines: line_no,
            seqs: (first_seq, self.expected_seq - 1),
        });
        Ok(line_no)
    }

    /// Checks a file's header against the log so far; the first one sets
    /// the MAC.
    fn header(&mut self, index: usize, h: &line::Header, seq: u64) -> Result<(), HeaderFail> {
        let found = Mac::describe(&h.mac, h.key_id.as_deref());
        if index == 0 {
            if self.verifier.start.is_none() && (h.segment != 1 || seq != 0) {
                return Err(HeaderFail::Bad(Problem::NotGenesis { segment: h.segment }));
            }
            let mac = match (h.mac.as_str(), &self.verifier.key) {
                ("sha256", None) => Mac::Sha256,
                ("sha256", Some(_)) => return Err(HeaderFail::Bad(Problem::Unkeyed)),
                (_, None) => {
                    return Err(HeaderFail::KeyRequired(
                        h.key_id.clone().unwrap_or_default(),
                    ))
                }
                (_, Some(key)) => {
                    if h.key_id.as_deref() != Some(key.key_id()) {
                        return Err(HeaderFail::Bad(Problem::WrongKey {
                            expected: key.key_id().to_owned(),
                            found: h.key_id.clone().unwrap_or_default(),
                        }));
                    }
                    Mac::Hmac(key.clone())
                }
            };
            self.mac = Some(mac);
            self.mac_name = found;
        } else {
            if found != self.mac_name {
                return Err(HeaderFail::Bad(Problem::MacChanged {
                    expected: self.mac_name.clone(),
                    found,
                }));
            }
            if h.segment != self.segment + 1 {
                return Err(HeaderFail::Bad(Problem::SegmentMismatch {
                    expected: self.segment + 1,
                    found: h.segment,
                }));
            }
        }
        self.segment = h.segment;
        Ok(())
    }
}
