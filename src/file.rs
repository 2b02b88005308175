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
//! - **Pipeline.** The calling thread reads batches, `threads` workers seal
//!   (or open) them, and one writer thread writes them out strictly in input
//!   order, holding early finishers in a small reorder buffer.
//! - **Bounded memory.** Every batch lives in a buffer from a fixed pool of
//!   `threads + 2` buffers (about 1 MiB each), allocated on first use and
//!   recycled by the writer; the queues can never hold more than the pool. So
//!   memory is a few batches per worker, whatever the size of the input.
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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};

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
    /// thread. The output does not depend on it.
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
    /// Worker threads used.
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
        self.encrypt_file_via(input, output, context, options, None)
            .await
    }

    /// [`encrypt_file`](Self::encrypt_file); with `fail_after`, writing the
    /// output fails after that many bytes (a test seam).
    async fn encrypt_file_via(
        &self,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
        fail_after: Option<u64>,
    ) -> Result<FileReport> {
        check_associated_data(options.associated_data_bytes())?;
        let reader = open_input(input)?;
        let len = reader.metadata().map_err(|e| with_path(e, input))?.len();
        let mut out = AtomicFile::create(output, options.overwrite)?;
        let threads = options.thread_count().min(batches(len));
        let mut writer = Counting::new(out.file());
        writer.fail_after = fail_after;
        let enc = self
            .encryptor_with(writer, context, options.associated_data_bytes())
            .await
            .map_err(|e| tag(e, Side::Write))?;
        let report = seal_body(enc, reader, threads)?;
        out.commit()?;
        Ok(report)
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
        self.decrypt_file_via(input, output, context, options, None)
            .await
    }

    /// [`decrypt_file`](Self::decrypt_file); with `fail_after`, writing the
    /// output fails after that many bytes (a test seam).
    async fn decrypt_file_via(
        &self,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
        fail_after: Option<u64>,
    ) -> Result<FileReport> {
        check_associated_data(options.associated_data_bytes())?;
        let file = open_input(input)?;
        let len = file.metadata().map_err(|e| with_path(e, input))?.len();
        let mut out = AtomicFile::create(output, options.overwrite)?;
        let mut reader = Counting::new(file);
        let (_, keys) = self
            .decryptor_with(&mut reader, context, options.associated_data_bytes())
            .await
            .map_err(|e| tag(e, Side::Read))?
            .into_keys()?;
        // The length alone can show truncation. Then nothing is written,
        // but the chunks are still read and opened, so that the error is
        // the one a streaming decoder gives for the same bytes (a bad chunk
        // before the end comes first: docs/FORMAT.md, section 7.3).
        let body_len = (len - reader.count.min(len)) + cobblestone::PREFIX_LEN as u64;
        let plaintext = match cobblestone::plaintext_len(body_len) {
            Ok(n) => n,
            Err(Error::Truncated) => {
                let threads = options.thread_count().min(batches(body_len));
                let sink = Counting::new(io::sink());
                return Err(match open_body(&keys, reader, sink, threads) {
                    Err(e) => e,
                    Ok(_) => Error::Truncated,
                });
            }
            Err(e) => return Err(e),
        };
        let threads = options.thread_count().min(batches(plaintext));
        let mut writer = Counting::new(out.file());
        writer.fail_after = fail_after;
        let report = open_body(&keys, reader, writer, threads)?;
        out.commit()?;
        Ok(report)
    }

    /// Encrypts everything `reader` yields into `writer` (header and body)
    /// with a fresh DEK, on [`FileOptions::threads`] cores: for stdin,
    /// pipes, sockets and tar streams. The writer is flushed at the end.
    ///
    /// On an error the writer holds an incomplete message, which no decoder
    /// accepts. `writer` must be `Send`: it is driven from a writer thread
    /// (pass `&mut w` to keep ownership). Blocks the calling thread for the
    /// I/O (see the [module docs](crate::file#blocking)).
    pub async fn encrypt_stream_parallel<R: Read, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        let enc = self
            .encryptor_with(
                Counting::new(writer),
                context,
                options.associated_data_bytes(),
            )
            .await
            .map_err(|e| tag(e, Side::Write))?;
        seal_body(enc, reader, options.thread_count())
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
    pub async fn decrypt_stream_parallel<R: Read, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        let mut reader = Counting::new(reader);
        let (_, keys) = self
            .decryptor_with(&mut reader, context, options.associated_data_bytes())
            .await
            .map_err(|e| tag(e, Side::Read))?
            .into_keys()?;
        open_body(&keys, reader, Counting::new(writer), options.thread_count())
    }
}

/// Encrypts everything `reader` yields into `writer` (header and body) with
/// a [`SealingKey`] already in hand, on [`FileOptions::threads`] cores: the
/// synchronous form of [`Envelope::encrypt_stream_parallel`]. The writer is
/// flushed at the end.
pub fn encrypt_with_key<R: Read, W: Write + Send>(
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
pub fn decrypt_with_key<R: Read, W: Write + Send>(
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
    open_body(&keys, reader, Counting::new(writer), options.thread_count())
}

/// Seals the chunks behind an [`Encryptor`](cobblestone::Encryptor) that has
/// written the header and the body prefix, then flushes.
fn seal_body<R: Read, W: Write + Send>(
    enc: cobblestone::Encryptor<Counting<W>>,
    mut reader: R,
    threads: usize,
) -> Result<FileReport> {
    let (mut writer, keys) = enc.into_keys()?;
    let counts = run(Mode::Seal, &keys, &mut reader, &mut writer, threads)?;
    writer.flush().map_err(|e| tag_io(e, Side::Write))?;
    Ok(FileReport {
        plaintext_len: counts.plaintext,
        ciphertext_len: writer.count,
        chunks: counts.chunks,
        threads,
    })
}

/// Opens the chunks after the body prefix (already read from `reader`),
/// then flushes.
fn open_body<R: Read, W: Write + Send>(
    keys: &BodyKeys,
    mut reader: Counting<R>,
    mut writer: Counting<W>,
    threads: usize,
) -> Result<FileReport> {
    let counts = run(Mode::Open, keys, &mut reader, &mut writer, threads)?;
    writer.flush().map_err(|e| tag_io(e, Side::Write))?;
    Ok(FileReport {
        plaintext_len: counts.plaintext,
        ciphertext_len: reader.count,
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
fn run<R: Read, W: Write + Send>(
    mode: Mode,
    keys: &BodyKeys,
    reader: &mut R,
    writer: &mut W,
    threads: usize,
) -> Result<Counts> {
    if threads <= 1 {
        run_inline(mode, keys, reader, writer)
    } else {
        run_parallel(mode, keys, reader, writer, threads)
    }
}

/// The engine on the calling thread alone.
fn run_inline<R: Read, W: Write>(
    mode: Mode,
    keys: &BodyKeys,
    reader: &mut R,
    writer: &mut W,
) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut buf = new_buffer();
    for seq in 0.. {
        let mut batch = read_batch(reader, mode, buf, seq, counts.chunks);
        process(keys, mode, &mut batch);
        if let Some(e) = batch.error.take() {
            return Err(e);
        }
        write_batch(writer, mode, &batch).map_err(|e| tag_io(e, Side::Write))?;
        counts.add(&batch, mode);
        if batch.last {
            break;
        }
        buf = batch.buf;
    }
    Ok(counts)
}

impl Counts {
    fn add(&mut self, batch: &Batch, mode: Mode) {
        let (pt, ct) = batch.sizes(mode);
        self.plaintext += pt;
        self.ciphertext += ct;
        self.chunks += batch.layout(mode).0 as u64;
    }
}

/// The pipelined engine: this thread reads, `threads` workers seal or open,
/// a writer thread writes in order and recycles the buffers.
fn run_parallel<R: Read, W: Write + Send>(
    mode: Mode,
    keys: &BodyKeys,
    reader: &mut R,
    writer: &mut W,
    threads: usize,
) -> Result<Counts> {
    let pool = threads + 2;
    // Every queue is as long as the pool, so no send ever blocks: the only
    // waits are for a free buffer, for work, and for the next batch.
    let (free_tx, free_rx) = sync_channel::<Buffer>(pool);
    let (work_tx, work_rx) = sync_channel::<Batch>(pool);
    let (done_tx, done_rx) = sync_channel::<Batch>(pool);
    let work_rx = Mutex::new(work_rx);
    let abort = AtomicBool::new(false);

    std::thread::scope(|s| {
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            s.spawn(move || worker(keys, mode, work_rx, done_tx));
        }
        drop(done_tx);
        let abort_ref = &abort;
        let write = s.spawn(move || write_loop(mode, writer, done_rx, free_tx, abort_ref));
        read_loop(mode, reader, free_rx, work_tx, pool, &abort);
        match write.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn read_loop<R: Read>(
    mode: Mode,
    reader: &mut R,
    free: Receiver<Buffer>,
    work: SyncSender<Batch>,
    pool: usize,
    abort: &AtomicBool,
) {
    let mut allocated = 0;
    let mut first_chunk = 0u64;
    for seq in 0.. {
        if abort.load(Ordering::Relaxed) {
            return;
        }
        // Buffers are allocated on first need, so a small input costs one.
        let buf = match free.try_recv() {
            Ok(buf) => buf,
            Err(TryRecvError::Empty) if allocated < pool => {
                allocated += 1;
                new_buffer()
            }
            Err(TryRecvError::Empty) => match free.recv() {
                Ok(buf) => buf,
                Err(_) => return,
            },
            Err(TryRecvError::Disconnected) => return,
        };
        let batch = read_batch(reader, mode, buf, seq, first_chunk);
        first_chunk += batch.layout(mode).0 as u64;
        let last = batch.last;
        if work.send(batch).is_err() || last {
            return;
        }
    }
}

fn worker(keys: &BodyKeys, mode: Mode, work: &Mutex<Receiver<Batch>>, done: SyncSender<Batch>) {
    loop {
        // The lock is held only while waiting for the next item.
        let next = match work.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut batch) = next else { return };
        process(keys, mode, &mut batch);
        if done.send(batch).is_err() {
            return;
        }
    }
}

fn write_loop<W: Write>(
    mode: Mode,
    writer: &mut W,
    done: Receiver<Batch>,
    free: SyncSender<Buffer>,
    abort: &AtomicBool,
) -> Result<Counts> {
    let result = write_in_order(mode, writer, &done, &free);
    if result.is_err() {
        // Stop the reader; dropping `done` and `free` unblocks everyone.
        abort.store(true, Ordering::Relaxed);
    }
    result
}

fn write_in_order<W: Write>(
    mode: Mode,
    writer: &mut W,
    done: &Receiver<Batch>,
    free: &SyncSender<Buffer>,
) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut pending: BTreeMap<u64, Batch> = BTreeMap::new();
    let mut next = 0u64;
    while let Ok(batch) = done.recv() {
        pending.insert(batch.seq, batch);
        while let Some(mut batch) = pending.remove(&next) {
            if let Some(e) = batch.error.take() {
                return Err(e);
            }
            write_batch(writer, mode, &batch).map_err(|e| tag_io(e, Side::Write))?;
            counts.add(&batch, mode);
            if batch.last {
                return Ok(counts);
            }
            next += 1;
            // The reader may have finished; a refused buffer is dropped.
            let _ = free.send(batch.buf);
        }
    }
    // Every batch up to the last one reaches the writer unless a thread
    // died, which `scope` reports as a panic.
    Err(Error::Io(io::Error::other(
        "the file engine stopped before the final chunk",
    )))
}

/// [`encrypt_with_key`] with a fixed salt: the seam that lets tests compare
/// the engine's output with the sequential encryptor's, byte for byte.
#[cfg(test)]
fn encrypt_with_key_and_salt<R: Read, W: Write + Send>(
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
                let e = block_on(env.encrypt_file_via(
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
                let e =
                    block_on(env.decrypt_file_via(&sealed, &out, &ctx(), &opts, Some(fail_after)))
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
