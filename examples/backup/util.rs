//! Small pieces shared by the commands: interruption, progress, standard
//! streams as files, formatting.

use std::fs::File;
use std::io::{self, IoSliceMut, IsTerminal, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use zeroize::Zeroizing;

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on, SIGINT and SIGTERM set a flag instead of killing the
/// process: the readers of the pipelines see it and fail, so every
/// temporary file or directory is removed on the way out and the process
/// exits with 130. A second signal exits at once (leaving at most a
/// temporary file beside the target, never the final name).
///
/// Installed only once the passphrase prompts are over, so that Ctrl-C at
/// a prompt behaves as usual.
pub fn install_signal_handlers() {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for (signal, status) in [
        (signal_hook::consts::SIGINT, 130),
        (signal_hook::consts::SIGTERM, 143),
        // A dropped terminal or ssh session, and Ctrl-\: the same, so that
        // no temporary file is left and no short input is committed.
        (signal_hook::consts::SIGHUP, 129),
        (signal_hook::consts::SIGQUIT, 131),
    ] {
        // Order matters: the conditional shutdown sees the flag set by the
        // first signal only when a second one arrives.
        let _ = signal_hook::flag::register_conditional_shutdown(signal, status, flag.clone());
        let _ = signal_hook::flag::register(signal, flag.clone());
    }
}

/// True once SIGINT, SIGTERM, SIGHUP or SIGQUIT arrived.
pub fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|flag| flag.load(Ordering::Relaxed))
}

/// An error when a signal asked us to stop.
pub fn check_interrupt() -> io::Result<()> {
    if interrupted() {
        Err(io::Error::other("interrupted by a signal"))
    } else {
        Ok(())
    }
}

/// A progress bar on stderr with bytes and rate, or a hidden one when
/// stderr is not a terminal (or `--quiet`).
pub fn progress(total: Option<u64>, message: &str, quiet: bool) -> ProgressBar {
    if quiet || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
    } else {
        "{msg} {spinner} {bytes} {binary_bytes_per_sec} {elapsed}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_owned());
    bar
}

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

/// A path as shown to the operator (`-` shown as `stdin`/`stdout`).
pub fn shown(path: &Path, std_name: &str) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else if is_std(path) {
        std_name.to_owned()
    } else {
        path.display().to_string()
    }
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

/// `1.5 GiB`, `12 KiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `2.3 s` or `120 ms`, with a rate when `bytes` is given.
pub fn human_duration(d: Duration) -> String {
    if d.as_secs() >= 1 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Bytes per second, as `1.2 GiB/s`.
pub fn human_rate(bytes: u64, d: Duration) -> String {
    let secs = d.as_secs_f64().max(1e-6);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

/// RFC 3339 UTC, seconds: `2026-11-25T10:11:01Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The JSON string literal of `s`.
pub fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_764_065_461);
        assert_eq!(rfc3339(t), "2025-11-25T10:11:01Z");
    }
}
