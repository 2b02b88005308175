//! Readers, writers and files between the engine and the world: standard
//! input and output as files, the reader that counts progress and sees
//! interruption, the `--expect-size` reader, the bounded plaintext pipe
//! between threads, hidden sibling names for temporary outputs, and new
//! files written once.

use std::fs::{self, File};
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::ProgressBar;
use zeroize::Zeroizing;

use crate::interrupt::check_interrupt;
use crate::CliError;

/// A reader that counts into a progress bar and stops when a signal
/// arrived.
pub struct Watch<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R> Watch<R> {
    pub fn new(inner: R, bar: ProgressBar) -> Watch<R> {
        Watch { inner, bar }
    }
}

impl<R> Watch<R> {
    /// After a read of `n` bytes: an end of input that follows a signal is
    /// the signal's doing (Ctrl-C in `producer | backup encrypt -`
    /// kills the producer too, and its death closes the pipe), not the
    /// end of the data.
    fn after(&self, n: usize) -> io::Result<usize> {
        if n == 0 {
            check_interrupt()?;
        }
        self.bar.inc(n as u64);
        Ok(n)
    }
}

impl<R: Read> Read for Watch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        check_interrupt()?;
        let n = self.inner.read(buf)?;
        self.after(n)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        check_interrupt()?;
        let n = self.inner.read_vectored(bufs)?;
        self.after(n)
    }
}

/// What `--expect-size` found: the announced size and the bytes read, once
/// they differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeMismatch {
    pub expected: u64,
    /// The bytes read; when the input was longer, the count at which
    /// reading stopped (more than `expected`).
    pub read: u64,
}

/// A reader that fails once its input proves longer than `expected`, and
/// at the end of input when it was shorter: the engine then never writes
/// the final chunk, so neither a file nor a stream on stdout can pass for
/// a complete backup. The mismatch is kept in `found` for the error
/// message. Without an expected size it only passes the data through.
pub struct ExpectSize<R> {
    inner: R,
    expected: Option<u64>,
    read: u64,
    found: Arc<OnceLock<SizeMismatch>>,
}

impl<R> ExpectSize<R> {
    pub fn new(
        inner: R,
        expected: Option<u64>,
        found: Arc<OnceLock<SizeMismatch>>,
    ) -> ExpectSize<R> {
        ExpectSize {
            inner,
            expected,
            read: 0,
            found,
        }
    }

    fn after(&mut self, n: usize) -> io::Result<usize> {
        self.read += n as u64;
        let Some(expected) = self.expected else {
            return Ok(n);
        };
        if self.read > expected || (n == 0 && self.read != expected) {
            let m = SizeMismatch {
                expected,
                read: self.read,
            };
            let _ = self.found.set(m);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the input's size differs from --expect-size",
            ));
        }
        Ok(n)
    }
}

impl<R: Read> Read for ExpectSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.after(n)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = self.inner.read_vectored(bufs)?;
        self.after(n)
    }
}

/// The size of the chunks a [`channel`] carries.
const CHANNEL_CHUNK: usize = 1 << 20;

/// How many chunks a [`channel`] holds at most: its memory bound.
const CHANNEL_DEPTH: usize = 4;

/// A chunk of plaintext in flight: wiped when it is dropped, so that the
/// plaintext of a backup or a restore does not linger in freed memory.
type Chunk = Zeroizing<Vec<u8>>;

/// An in-process pipe between two threads that carries 1 MiB chunks (a
/// kernel pipe moves 64 KiB at a time, with a system call and a copy each
/// way): the tar stream between the archiver and the encryption engine,
/// and between the decryption engine and the restorer. At most
/// `CHANNEL_DEPTH` chunks are in flight, each wiped once consumed (the
/// buffers never grow, so no copy is left behind by a reallocation).
/// Dropping the reader makes writes fail with a broken pipe; dropping the
/// writer (after a flush) is the end of the stream.
pub fn channel() -> (ChannelReader, ChannelWriter) {
    let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_DEPTH);
    (
        ChannelReader {
            rx,
            chunk: Zeroizing::new(Vec::new()),
            pos: 0,
        },
        ChannelWriter {
            tx,
            buf: Zeroizing::new(Vec::new()),
        },
    )
}

pub struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Chunk>,
    chunk: Chunk,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

pub struct ChannelWriter {
    tx: std::sync::mpsc::SyncSender<Chunk>,
    buf: Chunk,
}

impl ChannelWriter {
    fn send(&mut self, chunk: Chunk) -> io::Result<()> {
        // A chunk the reader never takes (it is gone) is dropped, and so
        // wiped, by the failed send.
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "Broken pipe"))
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= CHANNEL_CHUNK {
            self.send(Zeroizing::new(data.to_vec()))?;
            return Ok(data.len());
        }
        if self.buf.is_empty() && self.buf.capacity() < CHANNEL_CHUNK {
            // Reserved while empty: growing it later would leave copies of
            // plaintext in freed memory.
            self.buf.reserve_exact(CHANNEL_CHUNK);
        }
        let n = data.len().min(CHANNEL_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHANNEL_CHUNK {
            let full = std::mem::replace(&mut self.buf, Zeroizing::new(Vec::new()));
            self.send(full)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let part = std::mem::replace(&mut self.buf, Zeroizing::new(Vec::new()));
            self.send(part)?;
        }
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = io::Write::flush(self);
    }
}

/// Standard input as a `File` on the same descriptor: unbuffered, `Send`.
pub fn stdin_file() -> io::Result<File> {
    Ok(File::from(io::stdin().as_fd().try_clone_to_owned()?))
}

/// Standard output as a `File` on the same descriptor: unbuffered (no line
/// buffering of binary data), `Send`.
pub fn stdout_file() -> io::Result<File> {
    Ok(File::from(io::stdout().as_fd().try_clone_to_owned()?))
}

/// `-` means the standard stream.
pub fn is_std(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// 16 random hex digits for temporary names.
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    if phi_envelope::primitives::fill_random(&mut b).is_err() {
        // The OS RNG failed; names only need to be unlikely to collide
        // (creation is exclusive anyway).
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = (t as u64 ^ u64::from(std::process::id()) << 32).to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The hidden sibling `.NAME.<hex>.<suffix>` of `target`, the naming used
/// by the library's atomic files (`tmp`) and by directory restores.
pub fn sibling(target: &Path, suffix: &str) -> PathBuf {
    let name = target.file_name().unwrap_or_default();
    let mut s = std::ffi::OsString::from(".");
    s.push(name);
    s.push(format!(".{}.{suffix}", random_hex()));
    parent_dir(target).join(s)
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to a new file `path` with `mode`, and syncs it; never
/// replaces a file.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CliError::from_io(e, path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::from_io(e, path))
}

/// The name an error shows for `path`: `std_name` for `-`, else the path.
pub fn named(path: &Path, std_name: &str) -> PathBuf {
    if is_std(path) {
        PathBuf::from(std_name)
    } else {
        path.to_path_buf()
    }
}
