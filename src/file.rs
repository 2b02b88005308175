//! Files and streams on every core: the parallel engine behind
//! [`Envelope::encrypt_file`], [`Envelope::decrypt_file`] and their stream
//! forms [`Envelope::encrypt_stream_parallel`] and
//! [`Envelope::decrypt_stream_parallel`].
//!
//! # Design
//!
//! A Cobblestone-256 body is a sequence of 16 KiB chunks, and chunk `k` is
//! sealed under `base nonce XOR k`: it depends on nothing but its index, the
//! body keys and its own plaintext. The engine uses this directly:
//!
//! - **Batches.** The input is cut into batches of [`BATCH_CHUNKS`] chunks
//!   (1 MiB of plaintext). A batch is one work item, which amortises the
//!   hand-off between threads over 64 AEAD calls.
//! - **Workers that take turns.** Each of the `threads` workers (the calling
//!   thread is one of them) takes the reader in turn and reads the next
//!   batch into its own buffer, seals (or opens) it in place on its own
//!   core while the others read theirs, and writes it out as soon as every
//!   earlier batch has been written. There is no reader or writer thread:
//!   a batch never crosses a core between being read and being sealed, and
//!   the only hand-offs are two locks and a wake-up per batch. An input
//!   that fits in one batch never starts a thread.
//! - **Bounded memory.** Every worker owns one buffer of about 1 MiB,
//!   allocated on its first batch and reused for the next ones, so memory
//!   is one batch per worker whatever the size of the input.
//! - **Zero extra copies.** Plaintext is read straight into its slot of the
//!   ciphertext layout (a vectored read), sealed in place with its tag
//!   written behind it, and written out in one call per batch; decryption
//!   opens the chunks in place and writes the plaintext slices with one
//!   vectored write.
//! - **Byte-identical output.** Since chunk `k` depends only on `k`, the
//!   output is the same for every thread count, and the same as
//!   [`crate::cobblestone::Encryptor`]'s, given the same DEK and salt.
//!
//! With `threads == 1` the same batch code runs inline on the calling thread,
//! with no thread, queue or lock.
//!
//! # Decryption and what reaches the output
//!
//! Every chunk is authenticated before any of its plaintext is written.
//! [`Envelope::decrypt_file`] writes to a temporary file beside the target
//! and renames it only after the whole message authenticated and its final
//! chunk was seen: a bad chunk anywhere, a truncated file or trailing data is
//! an error and leaves nothing under the final name (and no temporary
//! file). [`Envelope::decrypt_stream_parallel`], writing to an arbitrary
//! [`Write`], cannot take back what it wrote: it releases the plaintext of
//! authenticated chunks in order, so when it fails the writer may have
//! received a prefix of the plaintext (every byte of it authenticated), and
//! the call still returns the error. Treat the output as unusable unless
//! the call returned `Ok`.
//!
//! # Blocking
//!
//! The `Envelope` methods are `async` because unwrapping or generating the
//! DEK may call a key provider; the bulk of the work that follows is blocking
//! file I/O and CPU work on OS threads, and the calling thread blocks until
//! it is done. Call them from a binary's `block_on`, or from a thread of
//! your own; in a service, keep them off the async worker threads (e.g.
//! `tokio::task::spawn_blocking` with a handle's `block_on`). With the DEK in
//! hand, [`encrypt_with_key`] and [`decrypt_with_key`] are the synchronous
//! forms.
//!
//! ```no_run
//! # async fn demo(envelope: &phi_envelope::Envelope) -> phi_envelope::Result<()> {
//! use std::path::Path;
//! use phi_envelope::EncryptionContext;
//! use phi_envelope::file::FileOptions;
//!
//! // `envelope` is built once at start-up over the keyring (see `Envelope`).
//! let ctx = EncryptionContext::new().with("backup", "2026-11-25")?;
//! let opts = FileOptions::new(); // all cores, refuse to overwrite
//! envelope
//!     .encrypt_file(Path::new("export.csv"), Path::new("export.csv.phi"), &ctx, &opts)
//!     .await?;
//! let report = envelope
//!     .decrypt_file(Path::new("export.csv.phi"), Path::new("restored.csv"), &ctx, &opts)
//!     .await?;
//! println!("{} bytes in {} chunks", report.plaintext_len, report.chunks);
//! # Ok(()) }
//! ```
//!
//! Why one file of this size: the engine's workers, its error order and its
//! memory bound are one mechanism that a reviewer has to read together; about
//! 370 lines are its unit tests (byte-identical output for every thread
//! count, stopped workers, short reads).

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use zeroize::Zeroize;

use crate::atomic::AtomicFile;
use crate::cobblestone::{self, BodyKeys, CHUNK_CT_SIZE, CHUNK_SIZE, MAX_CHUNKS, TAG_LEN};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::format::{check_associated_data, EncryptionContext};
use crate::message::{OpeningKey, SealingKey};

/// Chunks per work item: 64 chunks, 1 MiB of plaintext.
pub const BATCH_CHUNKS: usize = 64;
/// Plaintext bytes in a full batch.
const BATCH_PT: usize = BATCH_CHUNKS * CHUNK_SIZE;
/// Encrypted bytes in a full batch, and the size of every buffer.
const BATCH_CT: usize = BATCH_CHUNKS * CHUNK_CT_SIZE;

/// How a file or stream is processed.
///
/// ```
/// use phi_envelope::file::FileOptions;
/// let opts = FileOptions::new().threads(2).overwrite(true);
/// assert_eq!(opts.thread_count(), 2);
/// ```
#[derive(Clone, Default)]
pub struct FileOptions {
    threads: Option<NonZeroUsize>,
    overwrite: bool,
    associated_data: Option<Arc<[u8]>>,
}

/// Shows the settings, and of the associated data only its length: it may
/// be PHI.
impl fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileOptions")
            .field("threads", &self.threads)
            .field("overwrite", &self.overwrite)
            .field("associated_data_len", &self.associated_data_bytes().len())
            .finish()
    }
}

impl FileOptions {
    /// All available cores; refuse to overwrite an existing output file.
    pub fn new() -> FileOptions {
        FileOptions::default()
    }

    /// Number of worker threads doing the AEAD work; `0` means one per
    /// available core (the default). `1` runs everything on the calling
    /// thread. The output does not depend on it. At most [`MAX_THREADS`]
    /// workers run, and an input of one batch (1 MiB) never starts a thread.
    pub fn threads(mut self, threads: usize) -> FileOptions {
        self.threads = NonZeroUsize::new(threads);
        self
    }

    /// Whether an existing output file may be replaced (default `false`:
    /// an existing file is an error and is left untouched). Even with
    /// `true`, the old file is replaced only once the new one is complete.
    pub fn overwrite(mut self, yes: bool) -> FileOptions {
        self.overwrite = yes;
        self
    }

    /// The number of worker threads these options ask for.
    pub fn thread_count(&self) -> usize {
        match self.threads {
            Some(n) => n.get(),
            None => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        }
    }

    /// Whether an existing output file may be replaced.
    pub fn overwrites(&self) -> bool {
        self.overwrite
    }

    /// Associated data the body is bound to, apart from the encryption
    /// context (see [`Envelope::seal_with`]): encrypting writes a body
    /// bound to it, decrypting needs the same bytes. Default: none (empty is
    /// none). Over 65536 bytes is
    /// [`Error::InvalidAssociatedData`], refused before any key is used or
    /// any output is created.
    pub fn associated_data(mut self, ad: impl Into<Vec<u8>>) -> FileOptions {
        let ad: Vec<u8> = ad.into();
        self.associated_data = (!ad.is_empty()).then(|| Arc::from(ad));
        self
    }

    /// The associated data these options bind (empty when none).
    pub fn associated_data_bytes(&self) -> &[u8] {
        self.associated_data.as_deref().unwrap_or(&[])
    }
}

/// What a file or stream operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileReport {
    /// Plaintext bytes read (encryption) or written (decryption).
    pub plaintext_len: u64,
    /// Encrypted bytes written (encryption) or read (decryption) by this
    /// call: the whole message, header included, except for
    /// [`decrypt_with_key`], whose reader starts after the header.
    pub ciphertext_len: u64,
    /// Chunks sealed or opened (the final, short chunk included).
    pub chunks: u64,
    /// Worker threads asked for (at most [`MAX_THREADS`] run).
    pub threads: usize,
}

impl Envelope {
    /// Encrypts the file `input` into `output` with a fresh DEK wrapped to
    /// this envelope's recipients, on [`FileOptions::threads`] cores.
    ///
    /// `output` appears only once it is complete and synced; on any error
    /// nothing is left under that name. An existing `output` is refused
    /// unless [`FileOptions::overwrite`] is set, and that is checked before
    /// any key provider is called. Blocks the calling thread for the I/O
    /// (see the [module docs](crate::file#blocking)).
    pub async fn encrypt_file(
        &self,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.file_via(Mode::Seal, input, output, context, options, None)
            .await
    }

    /// Decrypts the file `input` into `output`, on [`FileOptions::threads`]
    /// cores.
    ///
    /// The plaintext goes to a temporary file beside `output`, which is
    /// renamed to `output` only after every chunk authenticated and the
    /// final chunk was seen. A modified, truncated or extended file, a
    /// wrong key or a wrong context is an error (authentication failures are
    /// the opaque [`Error::Decrypt`]; a copy cut short is
    /// [`Error::Truncated`] or [`Error::TruncatedChunk`]) and leaves neither
    /// `output` nor a temporary file. The error is the one every other
    /// decoder gives for the same bytes (docs/FORMAT.md section 7.3). An existing `output` is refused unless
    /// [`FileOptions::overwrite`] is set. Blocks the calling thread for the
    /// I/O (see the [module docs](crate::file#blocking)).
    pub async fn decrypt_file(
        &self,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.file_via(Mode::Open, input, output, context, options, None)
            .await
    }

    /// The driver of [`encrypt_file`](Self::encrypt_file) and
    /// [`decrypt_file`](Self::decrypt_file): `input` through `mode` into
    /// an [`AtomicFile`] at `output`, committed once the whole body is
    /// done; with `fail_after`, writing the output fails after that many
    /// bytes (a test seam).
    async fn file_via(
        &self,
        mode: Mode,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
        fail_after: Option<u64>,
    ) -> Result<FileReport> {
        let ad = options.associated_data_bytes();
        check_associated_data(ad)?;
        let file = open_input(input)?;
        let len = file.metadata().map_err(|e| with_path(e, input))?.len();
        let mut out = AtomicFile::create(output, options.overwrite)?;
        let mut reader = Counting::new(file);
        let mut writer = Counting::new(out.file());
        writer.fail_after = fail_after;
        let (keys, writer) = self
            .start_body(mode, &mut reader, writer, context, ad)
            .await?;
        let plaintext = match mode {
            Mode::Seal => len,
            Mode::Open => {
                // The length alone can show truncation. Then nothing is
                // written, but the chunks are still read and opened, so
                // that the error is the one a streaming decoder gives for
                // the same bytes (a bad chunk before the end comes first:
                // docs/FORMAT.md, section 7.3).
                let body_len = (len - reader.count.min(len)) + cobblestone::PREFIX_LEN as u64;
                match cobblestone::plaintext_len(body_len) {
                    Ok(n) => n,
                    Err(Error::Truncated) => {
                        let threads = options.thread_count().min(batches(body_len));
                        let sink = Counting::new(io::sink());
                        return Err(match run_body(mode, &keys, reader, sink, threads) {
                            Err(e) => e,
                            Ok(_) => Error::Truncated,
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let threads = options.thread_count().min(batches(plaintext));
        let report = run_body(mode, &keys, reader, writer, threads)?;
        out.commit()?;
        Ok(report)
    }

    /// Encrypts everything `reader` yields into `writer` (header and body)
    /// with a fresh DEK, on [`FileOptions::threads`] cores: for stdin,
    /// pipes, sockets and tar streams. The writer is flushed at the end.
    ///
    /// On an error the writer holds an incomplete message, which no decoder
    /// accepts. `reader` and `writer` must be `Send`: the workers take turns
    /// with them (pass `&mut r` or `&mut w` to keep ownership). Blocks the calling thread for the
    /// I/O (see the [module docs](crate::file#blocking)).
    pub async fn encrypt_stream_parallel<R: Read + Send, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.stream_via(Mode::Seal, reader, writer, context, options)
            .await
    }

    /// Decrypts the message `reader` yields into `writer`, on
    /// [`FileOptions::threads`] cores.
    ///
    /// Plaintext is released to `writer` in order and only for chunks that
    /// authenticated, but a later failure (a modified chunk, truncation,
    /// trailing data) cannot take back what was written: the writer may
    /// hold a prefix of the plaintext, every byte of it authenticated, and
    /// the call returns the error. Use [`decrypt_file`](Self::decrypt_file)
    /// when the output must appear only if the whole message is authentic.
    /// Blocks the calling thread for the I/O (see the
    /// [module docs](crate::file#blocking)).
    pub async fn decrypt_stream_parallel<R: Read + Send, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.stream_via(Mode::Open, reader, writer, context, options)
            .await
    }

    /// The driver of [`encrypt_stream_parallel`](Self::encrypt_stream_parallel)
    /// and [`decrypt_stream_parallel`](Self::decrypt_stream_parallel):
    /// `reader` through `mode` into `writer`.
    async fn stream_via<R: Read + Send, W: Write + Send>(
        &self,
        mode: Mode,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        let mut reader = Counting::new(reader);
        let ad = options.associated_data_bytes();
        let (keys, writer) = self
            .start_body(mode, &mut reader, Counting::new(writer), context, ad)
            .await?;
        run_body(mode, &keys, reader, writer, options.thread_count())
    }

    /// The header and body prefix of a message through this envelope's
    /// keyring: sealing, written to `writer` under a fresh data key;
    /// opening, read from `reader` and its data key unwrapped. Returns the
    /// body keys and `writer`, both ends positioned at chunk 0.
    async fn start_body<R: Read, W: Write>(
        &self,
        mode: Mode,
        reader: &mut Counting<R>,
        writer: Counting<W>,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<(BodyKeys, Counting<W>)> {
        match mode {
            Mode::Seal => {
                let enc = self
                    .encryptor_with(writer, context, ad)
                    .await
                    .map_err(|e| tag(e, Side::Write))?;
                let (writer, keys) = enc.into_keys()?;
                Ok((keys, writer))
            }
            Mode::Open => {
                let (_, keys) = self
                    .decryptor_with(reader, context, ad)
                    .await
                    .map_err(|e| tag(e, Side::Read))?
                    .into_keys()?;
                Ok((keys, writer))
            }
        }
    }
}

/// Encrypts everything `reader` yields into `writer` (header and body) with
/// a [`SealingKey`] already in hand, on [`FileOptions::threads`] cores: the
/// synchronous form of [`Envelope::encrypt_stream_parallel`]. The writer is
/// flushed at the end.
pub fn encrypt_with_key<R: Read + Send, W: Write + Send>(
    key: &SealingKey,
    reader: R,
    writer: W,
    context: &EncryptionContext,
    options: &FileOptions,
) -> Result<FileReport> {
    let enc = key
        .encryptor_with(
            Counting::new(writer),
            context,
            options.associated_data_bytes(),
        )
        .map_err(|e| tag(e, Side::Write))?;
    seal_body(enc, reader, options.thread_count())
}

/// Decrypts a body with an [`OpeningKey`] already in hand (its header was
/// parsed and verified): `reader` starts just after the header. The
/// synchronous form of [`Envelope::decrypt_stream_parallel`], with the same
/// rule for what reaches `writer` when it fails.
pub fn decrypt_with_key<R: Read + Send, W: Write + Send>(
    key: &OpeningKey,
    reader: R,
    writer: W,
    context: &EncryptionContext,
    options: &FileOptions,
) -> Result<FileReport> {
    let mut reader = Counting::new(reader);
    let (_, keys) = key
        .decryptor_with(&mut reader, context, options.associated_data_bytes())
        .map_err(|e| tag(e, Side::Read))?
        .into_keys()?;
    run_body(
        Mode::Open,
        &keys,
        reader,
        Counting::new(writer),
        options.thread_count(),
    )
}

/// Seals the chunks behind an [`Encryptor`](cobblestone::Encryptor) that has
/// written the header and the body prefix, then flushes.
fn seal_body<R: Read + Send, W: Write + Send>(
    enc: cobblestone::Encryptor<Counting<W>>,
    reader: R,
    threads: usize,
) -> Result<FileReport> {
    let (writer, keys) = enc.into_keys()?;
    run_body(Mode::Seal, &keys, Counting::new(reader), writer, threads)
}

/// Runs the chunks of a body through the engine in `mode`, both ends past
/// the body prefix, then flushes `writer`. The ciphertext side (`writer`
/// when sealing, `reader` when opening) has counted the header and prefix
/// too.
fn run_body<R: Read + Send, W: Write + Send>(
    mode: Mode,
    keys: &BodyKeys,
    mut reader: Counting<R>,
    mut writer: Counting<W>,
    threads: usize,
) -> Result<FileReport> {
    let counts = run(mode, keys, &mut reader, &mut writer, threads)?;
    writer.flush().map_err(|e| tag_io(e, Side::Write))?;
    let ciphertext_len = match mode {
        Mode::Seal => writer.count,
        Mode::Open => reader.count,
    };
    Ok(FileReport {
        plaintext_len: counts.plaintext,
        ciphertext_len,
        chunks: counts.chunks,
        threads,
    })
}

/// The number of batches a plaintext of `len` bytes makes (at least one).
fn batches(len: u64) -> usize {
    usize::try_from(len / BATCH_PT as u64 + 1).unwrap_or(usize::MAX)
}

fn open_input(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::Io(with_path(e, path)))
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Which end of the pipeline an I/O error came from.
#[derive(Clone, Copy)]
enum Side {
    Read,
    Write,
}

/// Says which side failed, keeping the kind; our own errors pass through.
fn tag_io(e: io::Error, side: Side) -> Error {
    tag(Error::from(e), side)
}

/// [`tag_io`] for an [`Error`]: only I/O errors are tagged.
fn tag(e: Error, side: Side) -> Error {
    match e {
        Error::Io(e) => {
            let what = match side {
                Side::Read => "reading the input",
                Side::Write => "writing the output",
            };
            Error::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
        }
        other => other,
    }
}

/// A reader or writer that counts the bytes through it; as a writer it can
/// be told to fail after `fail_after` bytes (a test seam; `None` in every
/// non-test caller).
struct Counting<T> {
    inner: T,
    count: u64,
    fail_after: Option<u64>,
}

impl<T> Counting<T> {
    fn new(inner: T) -> Counting<T> {
        Counting {
            inner,
            count: 0,
            fail_after: None,
        }
    }

    /// Clamps a write of `len` bytes to what the failure seam allows.
    fn allowed(&self, len: usize) -> io::Result<usize> {
        match self.fail_after {
            None => Ok(len),
            Some(limit) if self.count >= limit => Err(io::Error::other("injected write failure")),
            Some(limit) => Ok(len.min((limit - self.count) as usize)),
        }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = self.inner.read_vectored(bufs)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = self.allowed(buf.len())?;
        let n = self.inner.write(&buf[..len])?;
        self.count += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.fail_after.is_some() {
            // The seam is for tests: keep it simple.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.write(first);
        }
        let n = self.inner.write_vectored(bufs)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Seal plaintext into a body, or open a body into plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Seal,
    Open,
}

/// Byte and chunk counts of a body's chunks.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    plaintext: u64,
    ciphertext: u64,
    chunks: u64,
}

/// One work item: up to [`BATCH_CHUNKS`] consecutive chunks.
///
/// The buffer has the ciphertext layout: chunk `i` of the batch occupies
/// `buf[i * CHUNK_CT_SIZE..]`, its data followed by its tag.
struct Batch {
    /// Position in the stream, from 0.
    seq: u64,
    /// Index of the batch's first chunk.
    first_chunk: u64,
    buf: Buffer,
    /// Data bytes read: plaintext (sealing, in the chunk slots) or
    /// ciphertext (opening, contiguous).
    len: usize,
    /// Holds the body's final chunk, or its end.
    last: bool,
    /// The body ends in this batch without room for a final chunk: once
    /// its full chunks authenticated, the batch fails with
    /// [`Error::Truncated`] (errors come in stream order).
    cut: bool,
    /// Why this batch cannot be written; errors travel in stream order.
    error: Option<Error>,
}

impl Batch {
    /// Number of chunks and the data length of the final one (plaintext
    /// length when sealing, ciphertext length with tag when opening).
    fn layout(&self, mode: Mode) -> (usize, usize) {
        let unit = match mode {
            Mode::Seal => CHUNK_SIZE,
            Mode::Open => CHUNK_CT_SIZE,
        };
        let (full, rem) = (self.len / unit, self.len % unit);
        if self.last && !self.cut {
            (full + 1, rem)
        } else {
            (full, unit)
        }
    }

    /// Plaintext and ciphertext bytes of the batch.
    fn sizes(&self, mode: Mode) -> (u64, u64) {
        let (chunks, final_len) = self.layout(mode);
        let full = (chunks - 1) as u64;
        let (pt_final, ct_final) = match mode {
            Mode::Seal => (final_len, final_len + TAG_LEN),
            Mode::Open => (final_len - TAG_LEN, final_len),
        };
        (
            full * CHUNK_SIZE as u64 + pt_final as u64,
            full * CHUNK_CT_SIZE as u64 + ct_final as u64,
        )
    }
}

/// A batch buffer: zeroized on drop up to the furthest byte ever written,
/// so that pages a small input never touched are not faulted in just to be
/// cleared.
struct Buffer {
    data: Vec<u8>,
    touched: usize,
}

impl Buffer {
    /// Records that `buf[..end]` may hold data.
    fn touch(&mut self, end: usize) {
        self.touched = self.touched.max(end.min(self.data.len()));
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.data[..self.touched].zeroize();
    }
}

fn new_buffer() -> Buffer {
    // Zeroed memory from the allocator: fresh pages cost nothing until
    // touched.
    Buffer {
        data: vec![0u8; BATCH_CT],
        touched: 0,
    }
}

/// Reads the next batch into `buf`. Errors (I/O, truncation, the chunk
/// limit) are carried in the batch, which is then the last one.
fn read_batch<R: Read>(
    reader: &mut R,
    mode: Mode,
    buf: Buffer,
    seq: u64,
    first_chunk: u64,
) -> Batch {
    let mut batch = Batch {
        seq,
        first_chunk,
        buf,
        len: 0,
        last: false,
        cut: false,
        error: None,
    };
    let read = match mode {
        Mode::Seal => read_slots(reader, &mut batch.buf),
        Mode::Open => read_full(reader, &mut batch.buf[..BATCH_CT]),
    };
    match read {
        Ok(n) => {
            batch.len = n;
            // The data read, and the tags the chunks will carry.
            batch.buf.touch(match mode {
                Mode::Seal => (n / CHUNK_SIZE + 1) * CHUNK_CT_SIZE,
                Mode::Open => n,
            });
        }
        Err(e) => {
            // A failed read may have filled any part of the buffer.
            batch.buf.touch(BATCH_CT);
            batch.last = true;
            batch.error = Some(tag_io(e, Side::Read));
            return batch;
        }
    }
    let full = match mode {
        Mode::Seal => BATCH_PT,
        Mode::Open => BATCH_CT,
    };
    batch.last = batch.len < full;
    if mode == Mode::Open && batch.last && batch.len % CHUNK_CT_SIZE < TAG_LEN {
        // Includes an empty read after full chunks: the final chunk is
        // missing. The full chunks before the end are still opened first,
        // so that a bad one is reported as it would be by a streaming
        // decoder.
        batch.cut = true;
    }
    let (chunks, _) = batch.layout(mode);
    // Non-final chunks have indexes below MAX_CHUNKS - 1, the final one
    // below MAX_CHUNKS, as in the sequential decoders.
    let limit = if batch.last {
        MAX_CHUNKS
    } else {
        MAX_CHUNKS - 1
    };
    if first_chunk + chunks as u64 > limit {
        batch.error = Some(Error::MessageTooLong);
        batch.last = true;
    }
    batch
}

/// Reads plaintext into the chunk slots of `buf` (`CHUNK_SIZE` bytes at
/// every `CHUNK_CT_SIZE`), with vectored reads, until the batch is full or
/// the reader is at its end. Returns the plaintext bytes read.
fn read_slots<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < BATCH_PT {
        let (slot, offset) = (n / CHUNK_SIZE, n % CHUNK_SIZE);
        let mut slices: Vec<IoSliceMut<'_>> = buf
            .chunks_mut(CHUNK_CT_SIZE)
            .skip(slot)
            .enumerate()
            .map(|(i, c)| {
                let start = if i == 0 { offset } else { 0 };
                IoSliceMut::new(&mut c[start..CHUNK_SIZE])
            })
            .collect();
        match reader.read_vectored(&mut slices) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads until `buf` is full or the reader is at its end.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Seals or opens every chunk of the batch in place. An authentication
/// failure zeroizes that chunk and marks the batch.
fn process(keys: &BodyKeys, mode: Mode, batch: &mut Batch) {
    if batch.error.is_some() {
        return;
    }
    let (chunks, final_len) = batch.layout(mode);
    let has_final = batch.last && !batch.cut;
    for i in 0..chunks {
        let counter = batch.first_chunk + i as u64;
        let start = i * CHUNK_CT_SIZE;
        let data_len = if i + 1 == chunks {
            final_len
        } else {
            full_len(mode)
        };
        match mode {
            Mode::Seal => {
                let tag = keys.seal(counter, &mut batch.buf[start..start + data_len]);
                batch.buf[start + data_len..start + data_len + TAG_LEN].copy_from_slice(&tag);
            }
            Mode::Open => {
                let final_chunk = has_final && i + 1 == chunks;
                let chunk = &mut batch.buf[start..start + data_len];
                if let Err(e) = keys.open_chunk(counter, chunk, final_chunk) {
                    batch.error = Some(e);
                    return;
                }
            }
        }
    }
    if batch.cut {
        batch.error = Some(Error::Truncated);
    }
}

/// Data length of a non-final chunk in the batch buffer.
fn full_len(mode: Mode) -> usize {
    match mode {
        Mode::Seal => CHUNK_SIZE,
        Mode::Open => CHUNK_CT_SIZE,
    }
}

/// Writes a processed batch: the ciphertext is contiguous; the plaintext
/// of opened chunks goes out with one vectored write.
fn write_batch<W: Write>(writer: &mut W, mode: Mode, batch: &Batch) -> io::Result<()> {
    let (chunks, final_len) = batch.layout(mode);
    match mode {
        Mode::Seal => {
            let end = (chunks - 1) * CHUNK_CT_SIZE + final_len + TAG_LEN;
            writer.write_all(&batch.buf[..end])
        }
        Mode::Open => {
            let mut slices: Vec<IoSlice<'_>> = (0..chunks)
                .map(|i| {
                    let start = i * CHUNK_CT_SIZE;
                    let len = if i + 1 == chunks {
                        final_len - TAG_LEN
                    } else {
                        CHUNK_SIZE
                    };
                    IoSlice::new(&batch.buf[start..start + len])
                })
                .collect();
            write_all_vectored(writer, &mut slices)
        }
    }
}

fn write_all_vectored<W: Write>(writer: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match writer.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the output accepted no more data",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs a body's chunks through the engine: `reader` is positioned at
/// chunk 0, `writer` receives the output of every chunk in order.
///
/// The first batch is read on the calling thread; an input that fits in one
/// batch is done there, without starting a thread.
fn run<R: Read + Send, W: Write + Send>(
    mode: Mode,
    keys: &BodyKeys,
    reader: &mut R,
    writer: &mut W,
    threads: usize,
) -> Result<Counts> {
    let first = read_batch(reader, mode, new_buffer(), 0, 0);
    if threads <= 1 || first.last {
        run_inline(mode, keys, reader, writer, first)
    } else {
        run_parallel(mode, keys, reader, writer, threads, first)
    }
}

/// The engine on the calling thread alone, from `batch` (already read) on.
fn run_inline<R: Read, W: Write>(
    mode: Mode,
    keys: &BodyKeys,
    reader: &mut R,
    writer: &mut W,
    mut batch: Batch,
) -> Result<Counts> {
    let mut counts = Counts::default();
    loop {
        process(keys, mode, &mut batch);
        if let Some(e) = batch.error.take() {
            return Err(e);
        }
        write_batch(writer, mode, &batch).map_err(|e| tag_io(e, Side::Write))?;
        counts.add(&batch, mode);
        if batch.last {
            return Ok(counts);
        }
        let seq = batch.seq + 1;
        batch = read_batch(reader, mode, batch.buf, seq, counts.chunks);
    }
}

impl Counts {
    fn add(&mut self, batch: &Batch, mode: Mode) {
        let (pt, ct) = batch.sizes(mode);
        self.plaintext += pt;
        self.ciphertext += ct;
        self.chunks += batch.layout(mode).0 as u64;
    }
}

/// The parallel engine: `threads` workers (the calling thread and
/// `threads - 1` others), each of which in turn takes the reader and reads
/// the next batch into its own buffer, seals or opens it in place on its own
/// core, and writes it when every earlier batch has been written.
///
/// There is no reader or writer thread, so no batch crosses a core between
/// being read and being sealed, the thread count is the number of workers,
/// and memory is one buffer per worker. Only the reads (under the input
/// lock) and the writes (in stream order, under the output lock) are
/// serial.
fn run_parallel<R: Read + Send, W: Write + Send>(
    mode: Mode,
    keys: &BodyKeys,
    reader: &mut R,
    writer: &mut W,
    threads: usize,
    first: Batch,
) -> Result<Counts> {
    let shared = Shared {
        input: Mutex::new(Input {
            reader,
            seq: first.seq + 1,
            first_chunk: first.layout(mode).0 as u64,
            done: false,
        }),
        output: Mutex::new(Output {
            writer,
            next: first.seq,
            counts: Counts::default(),
            state: State::Running,
        }),
        turn: Condvar::new(),
        stopped: AtomicBool::new(false),
    };
    std::thread::scope(|s| {
        // The calling thread holds batch 0, which every other worker waits
        // for: if anything below unwinds before it is written, the guard
        // stops the others instead of leaving them waiting for ever.
        let _guard = StopOnPanic(&shared);
        for _ in 1..threads.min(MAX_THREADS) {
            // A thread that cannot be started (a process or container
            // limit) leaves fewer workers; the output is the same.
            if spawn_worker(s, || work(keys, mode, &shared, None)).is_err() {
                break;
            }
        }
        work(keys, mode, &shared, Some(first));
    });
    let out = shared
        .output
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    match out.state {
        State::Finished => Ok(out.counts),
        State::Failed(e) => Err(e),
        // Every batch up to the last one is written unless a worker
        // panicked, which `scope` has already re-raised.
        State::Running => Err(Error::Io(io::Error::other(
            "the file engine stopped before the final chunk",
        ))),
    }
}

/// The most worker threads one call starts, whatever it asks for: memory is
/// one batch buffer (about 1 MiB) per worker.
pub const MAX_THREADS: usize = 64;

/// Starts one more worker.
fn spawn_worker<'scope, F>(s: &'scope std::thread::Scope<'scope, '_>, f: F) -> io::Result<()>
where
    F: FnOnce() + Send + 'scope,
{
    #[cfg(test)]
    if let Some(left) = tests::SPAWNS_LEFT.with(std::cell::Cell::get) {
        if left == 0 {
            return Err(io::Error::other("no thread for this test"));
        }
        tests::SPAWNS_LEFT.with(|l| l.set(Some(left - 1)));
    }
    std::thread::Builder::new()
        .name("phi-envelope-file".into())
        .spawn_scoped(s, f)
        .map(drop)
}

/// What the workers share.
struct Shared<'r, 'w, R, W> {
    input: Mutex<Input<'r, R>>,
    output: Mutex<Output<'w, W>>,
    /// Signalled whenever a batch was written or the engine stopped.
    turn: Condvar,
    /// Set once the output failed or finished: no more batches are read.
    stopped: AtomicBool,
}

/// The reader and where the stream stands.
struct Input<'r, R> {
    reader: &'r mut R,
    /// Sequence number and first chunk index of the next batch.
    seq: u64,
    first_chunk: u64,
    /// The last batch has been read.
    done: bool,
}

/// The writer and what has been written.
struct Output<'w, W> {
    writer: &'w mut W,
    /// Sequence number of the batch whose turn it is.
    next: u64,
    counts: Counts,
    state: State,
}

/// Where the output stands.
enum State {
    Running,
    /// The final chunk was written.
    Finished,
    /// The first error in stream order; nothing after it was written.
    Failed(Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One worker: read, process, write in turn, until the input is done or the
/// engine stopped. `batch` is a batch already read for it.
fn work<R: Read, W: Write>(
    keys: &BodyKeys,
    mode: Mode,
    shared: &Shared<'_, '_, R, W>,
    mut batch: Option<Batch>,
) {
    let _guard = StopOnPanic(shared);
    let mut spare = None;
    loop {
        let mut b = match batch.take() {
            Some(b) => b,
            None => match shared.next_batch(mode, spare.take()) {
                Some(b) => b,
                None => return,
            },
        };
        process(keys, mode, &mut b);
        match shared.write_in_turn(mode, b) {
            Some(buf) => spare = Some(buf),
            None => return,
        }
    }
}

impl<R: Read, W: Write> Shared<'_, '_, R, W> {
    /// Reads the next batch into `spare` (or a new buffer); `None` once the
    /// input is done or the engine stopped.
    fn next_batch(&self, mode: Mode, spare: Option<Buffer>) -> Option<Batch> {
        let mut input = lock(&self.input);
        if input.done || self.stopped.load(Ordering::Acquire) {
            return None;
        }
        let buf = spare.unwrap_or_else(new_buffer);
        let (seq, first_chunk) = (input.seq, input.first_chunk);
        let batch = read_batch(&mut *input.reader, mode, buf, seq, first_chunk);
        input.seq += 1;
        input.first_chunk += batch.layout(mode).0 as u64;
        input.done = batch.last;
        Some(batch)
    }

    /// Waits until every earlier batch was written, then writes `batch` (or
    /// records its error). Returns its buffer for the next batch, or `None`
    /// when the worker should stop.
    fn write_in_turn(&self, mode: Mode, mut batch: Batch) -> Option<Buffer> {
        let mut out = lock(&self.output);
        while out.next != batch.seq && matches!(out.state, State::Running) {
            out = self.turn.wait(out).unwrap_or_else(PoisonError::into_inner);
        }
        if !matches!(out.state, State::Running) {
            // An earlier batch failed (or a worker died): this one is
            // dropped unwritten, its buffer zeroized.
            return None;
        }
        let written = match batch.error.take() {
            Some(e) => Err(e),
            None => write_batch(&mut *out.writer, mode, &batch).map_err(|e| tag_io(e, Side::Write)),
        };
        match written {
            Err(e) => out.state = State::Failed(e),
            Ok(()) => {
                out.counts.add(&batch, mode);
                out.next += 1;
                if batch.last {
                    out.state = State::Finished;
                }
            }
        }
        let running = matches!(out.state, State::Running);
        if !running {
            self.stopped.store(true, Ordering::Release);
        }
        drop(out);
        self.turn.notify_all();
        running.then_some(batch.buf)
    }
}

/// Stops the engine if its worker unwinds, so that no other worker waits
/// for a turn that will never come; `scope` then re-raises the panic.
struct StopOnPanic<'s, 'r, 'w, R, W>(&'s Shared<'r, 'w, R, W>);

impl<R, W> Drop for StopOnPanic<'_, '_, '_, R, W> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let shared = self.0;
            shared.stopped.store(true, Ordering::Release);
            let mut out = lock(&shared.output);
            if matches!(out.state, State::Running) {
                out.state = State::Failed(Error::Io(io::Error::other(
                    "a worker of the file engine panicked",
                )));
            }
            drop(out);
            shared.turn.notify_all();
        }
    }
}

/// [`encrypt_with_key`] with a fixed salt: the seam that lets tests compare
/// the engine's output with the sequential encryptor's, byte for byte.
#[cfg(test)]
fn encrypt_with_key_and_salt<R: Read + Send, W: Write + Send>(
    key: &SealingKey,
    salt: &[u8; cobblestone::SALT_LEN],
    reader: R,
    writer: W,
    context: &EncryptionContext,
    threads: usize,
) -> Result<FileReport> {
    let enc = key
        .encryptor_with_salt(Counting::new(writer), context, &[], Some(salt))
        .map_err(|e| tag(e, Side::Write))?;
    seal_body(enc, reader, threads)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::format::{Header, WrappedKey};
    use crate::provider::{BoxFuture, KeyInfo, KeyProvider, KeyRef, Unwrapped};
    use crate::{Dek, Keyring};

    const SIZES: &[usize] = &[
        0,
        1,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        BATCH_PT - 1,
        BATCH_PT,
        BATCH_PT + 1,
        3 * BATCH_PT + 5 * CHUNK_SIZE + 17,
    ];

    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn ctx() -> EncryptionContext {
        EncryptionContext::new().with("backup", "b-7").unwrap()
    }

    fn sealing_key() -> (Dek, SealingKey) {
        let dek = Dek::from_slice(&[0x42; 32]).unwrap();
        let entry = WrappedKey {
            provider: "test".into(),
            key_ref: "test:k".into(),
            key_version: 1,
            wrapped: vec![1, 2, 3],
        };
        let key = SealingKey::new(&dek, vec![entry]).unwrap();
        (dek, key)
    }

    /// The sequential reference: the streaming `Encryptor` with the same
    /// DEK and salt.
    fn sequential(key: &SealingKey, salt: &[u8; 24], pt: &[u8]) -> Vec<u8> {
        let mut enc = key
            .encryptor_with_salt(Vec::new(), &ctx(), &[], Some(salt))
            .unwrap();
        enc.write_all(pt).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn output_is_the_sequential_output_for_every_thread_count() {
        let (dek, key) = sealing_key();
        let salt = [0x5a; 24];
        for &len in SIZES {
            let pt = data(len);
            let want = sequential(&key, &salt, &pt);
            for threads in [1, 2, 4, 8] {
                let mut got = Vec::new();
                let report =
                    encrypt_with_key_and_salt(&key, &salt, &pt[..], &mut got, &ctx(), threads)
                        .unwrap();
                assert!(got == want, "len {len}, {threads} threads: output differs");
                assert_eq!(report.plaintext_len, len as u64);
                assert_eq!(report.ciphertext_len, want.len() as u64);
                assert_eq!(report.chunks, (len / CHUNK_SIZE + 1) as u64);

                let (header, used) = Header::parse(&got).unwrap();
                let opening = OpeningKey::new(&dek, &header).unwrap();
                let mut back = Vec::new();
                let opts = FileOptions::new().threads(threads);
                let r = decrypt_with_key(&opening, &got[used..], &mut back, &ctx(), &opts).unwrap();
                assert!(back == pt, "len {len}, {threads} threads: round trip");
                assert_eq!(r.plaintext_len, len as u64);
                assert_eq!(r.ciphertext_len, (got.len() - used) as u64);
            }
        }
    }

    /// A reader that hands out at most `max` bytes per call, in odd sizes.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            self.1 = self.1 % 5000 + 777;
            Ok(n)
        }
    }

    #[test]
    fn short_reads_do_not_change_the_output() {
        let (_, key) = sealing_key();
        let salt = [7; 24];
        let pt = data(2 * BATCH_PT + 12345);
        let want = sequential(&key, &salt, &pt);
        for threads in [1, 3] {
            let mut got = Vec::new();
            encrypt_with_key_and_salt(&key, &salt, Dribble(&pt, 1), &mut got, &ctx(), threads)
                .unwrap();
            assert!(got == want, "{threads} threads");
        }
    }

    /// A reader or writer that records which threads used it.
    struct Threads<T> {
        inner: T,
        seen: Arc<Mutex<Vec<std::thread::ThreadId>>>,
    }

    impl<T> Threads<T> {
        fn new(inner: T) -> (Self, Arc<Mutex<Vec<std::thread::ThreadId>>>) {
            let seen = Arc::new(Mutex::new(Vec::new()));
            (
                Threads {
                    inner,
                    seen: seen.clone(),
                },
                seen,
            )
        }
        fn note(&self) {
            self.seen.lock().unwrap().push(std::thread::current().id());
        }
    }

    impl<R: Read> Read for Threads<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.note();
            self.inner.read(buf)
        }
    }

    impl<W: Write> Write for Threads<W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.note();
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn an_input_of_one_batch_starts_no_thread() {
        let (_, key) = sealing_key();
        let me = std::thread::current().id();
        for len in [0, 1000, BATCH_PT - 1] {
            let pt = data(len);
            let (reader, reads) = Threads::new(&pt[..]);
            let (writer, writes) = Threads::new(Vec::new());
            let opts = FileOptions::new().threads(8);
            encrypt_with_key(&key, reader, writer, &ctx(), &opts).unwrap();
            let (reads, writes) = (reads.lock().unwrap(), writes.lock().unwrap());
            assert!(!reads.is_empty() && !writes.is_empty());
            assert!(
                reads.iter().chain(writes.iter()).all(|t| *t == me),
                "len {len}: another thread read or wrote"
            );
        }
    }

    #[test]
    fn workers_take_turns_with_the_reader_and_the_writer_in_order() {
        // With several batches and workers, reads and writes happen on the
        // workers' threads, and the output is still the sequential one.
        let (_, key) = sealing_key();
        let salt = [3; 24];
        let pt = data(9 * BATCH_PT + 4321);
        let want = sequential(&key, &salt, &pt);
        let (reader, reads) = Threads::new(Dribble(&pt, 1));
        let (writer, writes) = Threads::new(Vec::new());
        let mut writer = writer;
        encrypt_with_key_and_salt(&key, &salt, reader, &mut writer, &ctx(), 3).unwrap();
        assert!(writer.inner == want);
        let distinct = |v: &[std::thread::ThreadId]| {
            let mut v = v.to_vec();
            v.sort_by_key(|t| format!("{t:?}"));
            v.dedup();
            v.len()
        };
        let (reads, writes) = (reads.lock().unwrap(), writes.lock().unwrap());
        assert!(distinct(&reads) <= 3 && distinct(&writes) <= 3);
    }

    thread_local! {
        /// How many more worker threads may start (`None`: no limit), for
        /// calls made on this thread.
        pub(super) static SPAWNS_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    #[test]
    fn workers_that_cannot_start_leave_the_calling_thread_to_do_the_work() {
        // Before, a spawn that failed panicked on the calling thread while
        // it held batch 0, and the workers already started waited for its
        // turn for ever.
        let (dek, key) = sealing_key();
        let salt = [9; 24];
        let pt = data(5 * BATCH_PT + 77);
        let want = sequential(&key, &salt, &pt);
        // One worker starts and waits for batch 0; the next cannot start.
        SPAWNS_LEFT.with(|l| l.set(Some(1)));
        let mut got = Vec::new();
        let sealed = encrypt_with_key_and_salt(&key, &salt, &pt[..], &mut got, &ctx(), 4);
        SPAWNS_LEFT.with(|l| l.set(Some(1)));
        let (header, used) = Header::parse(&want).unwrap();
        let opening = OpeningKey::new(&dek, &header).unwrap();
        let mut back = Vec::new();
        let opts = FileOptions::new().threads(4);
        let opened = decrypt_with_key(&opening, &want[used..], &mut back, &ctx(), &opts);
        SPAWNS_LEFT.with(|l| l.set(None));
        sealed.unwrap();
        opened.unwrap();
        assert!(got == want && back == pt);
    }

    /// A writer that panics on its `n`th write.
    struct PanicAt(usize);

    impl Write for PanicAt {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 -= 1;
            assert!(self.0 > 0, "the writer gives up");
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_worker_that_panics_stops_the_others_and_the_panic_reaches_the_caller() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (_, key) = sealing_key();
            let pt = data(12 * BATCH_PT);
            for threads in [2, 4] {
                let r = std::panic::catch_unwind(|| {
                    let opts = FileOptions::new().threads(threads);
                    encrypt_with_key(&key, &pt[..], PanicAt(4), &ctx(), &opts)
                });
                done_tx.send(r.is_err()).unwrap();
            }
        });
        for _ in 0..2 {
            // Generous: a hang, not a speed, is what this detects.
            let panicked = done_rx
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("the engine hung after a worker panicked");
            assert!(panicked, "the panic did not reach the caller");
        }
    }

    /// A provider for these tests only: the "wrapped" key is the DEK itself.
    #[derive(Debug)]
    struct PlainProvider;

    impl KeyProvider for PlainProvider {
        fn id(&self) -> &str {
            "plain"
        }
        fn wrap<'a>(
            &'a self,
            key: &'a KeyRef,
            dek: &'a Dek,
            _: &'a EncryptionContext,
        ) -> BoxFuture<'a, Result<WrappedKey>> {
            Box::pin(async move {
                Ok(WrappedKey {
                    provider: "plain".into(),
                    key_ref: key.as_str().into(),
                    key_version: 1,
                    wrapped: dek.expose_secret().to_vec(),
                })
            })
        }
        fn unwrap<'a>(
            &'a self,
            entry: &'a WrappedKey,
            _: &'a EncryptionContext,
        ) -> BoxFuture<'a, Result<Unwrapped>> {
            Box::pin(async move { Ok(Unwrapped::Key(Dek::from_slice(&entry.wrapped)?)) })
        }
        fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
            Box::pin(async move { Ok(KeyInfo::new(key.clone(), None, Vec::new())) })
        }
    }

    fn envelope() -> Envelope {
        let keyring = Keyring::builder()
            .provider(Arc::new(PlainProvider))
            .recipient("plain:k".parse().unwrap())
            .build()
            .unwrap();
        Envelope::new(keyring)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_failing_output_leaves_no_file_under_the_final_name() {
        let env = envelope();
        let dir = tempfile::tempdir().unwrap();
        let (plain, sealed, out) = (
            dir.path().join("plain"),
            dir.path().join("sealed"),
            dir.path().join("out"),
        );
        let pt = data(3 * BATCH_PT + 99);
        std::fs::write(&plain, &pt).unwrap();
        for threads in [1, 2] {
            let opts = FileOptions::new().threads(threads);
            for fail_after in [0, 100, BATCH_CT as u64 + 3] {
                let e = block_on(env.file_via(
                    Mode::Seal,
                    &plain,
                    &sealed,
                    &ctx(),
                    &opts,
                    Some(fail_after),
                ))
                .unwrap_err();
                assert!(e.to_string().contains("writing the output"), "{e}");
                assert_eq!(names(dir.path()), ["plain"]);
            }
            block_on(env.encrypt_file(&plain, &sealed, &ctx(), &opts)).unwrap();
            for fail_after in [0, 100, BATCH_PT as u64 + 3] {
                let e = block_on(env.file_via(
                    Mode::Open,
                    &sealed,
                    &out,
                    &ctx(),
                    &opts,
                    Some(fail_after),
                ))
                .unwrap_err();
                assert!(e.to_string().contains("writing the output"), "{e}");
                assert_eq!(names(dir.path()), ["plain", "sealed"]);
            }
            block_on(env.decrypt_file(&sealed, &out, &ctx(), &opts)).unwrap();
            assert!(std::fs::read(&out).unwrap() == pt);
            std::fs::remove_file(&sealed).unwrap();
            std::fs::remove_file(&out).unwrap();
        }
    }
}
