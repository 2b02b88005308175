//! Cobblestone-256: c2sp.org/chunked-encryption instantiated with
//! AEAD_AES_256_GCM and HKDF-Expand-SHA-512, byte for byte.
//!
//! This is the body of every phi-envelope message, and a standard in its own
//! right: the Wycheproof chunked-encryption vectors run through every decoder
//! here. A body is `salt (24) || commitment (32) || chunks`, each chunk 16 KiB
//! of plaintext sealed with AES-256-GCM under `base nonce XOR chunk index`
//! and empty AAD, the last chunk always shorter than 16 KiB (possibly empty).
//!
//! - The commitment is compared in constant time before any chunk is
//!   decrypted: a wrong key or wrong context fails there.
//! - No plaintext of a chunk is released before its tag has verified.
//! - A body that ends without its short final chunk is
//!   [`Error::Truncated`], never a short read; a final chunk that fails
//!   after full chunks authenticated (a copy cut inside a chunk) is
//!   [`Error::TruncatedChunk`]; a decryptor that failed keeps failing on
//!   every later read.
//! - Every decoder reports the first defect in stream order, whether or not
//!   it knows the length in advance (docs/FORMAT.md section 7.3).
//!
//! ```
//! use std::io::{Read, Write};
//! use phi_envelope::cobblestone;
//!
//! let key = [7u8; 32];
//! let mut enc = cobblestone::Encryptor::new(&key, b"context", Vec::new())?;
//! enc.write_all(&vec![0x42; 40_000])?;
//! let body = enc.finish()?;
//! assert_eq!(body.len() as u64, cobblestone::body_len(40_000));
//!
//! let mut dec = cobblestone::Decryptor::new(&key, b"context", &body[..])?;
//! let mut out = Vec::new();
//! dec.read_to_end(&mut out)?;
//! assert_eq!(out, vec![0x42; 40_000]);
//! assert!(cobblestone::decrypt(&key, b"other context", &body).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Why one file of this size: the Cobblestone-256 construction in full
//! (derivation, encryptor, decryptor, seeking) is under 800 lines; the rest
//! are its tests.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use ring::hkdf::Prk;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::format::read_full;
use crate::primitives::{
    ct_eq, fill_random, hkdf_expand_sha512, hkdf_prk_sha512, Aes256Gcm, SecretBytes,
};

/// Length of the random salt that opens a body.
pub const SALT_LEN: usize = 24;
/// Length of the key commitment that follows the salt.
pub const COMMITMENT_LEN: usize = 32;
/// Length of the body prefix: salt and commitment.
pub const PREFIX_LEN: usize = SALT_LEN + COMMITMENT_LEN;
/// Plaintext bytes in every chunk but the last.
pub const CHUNK_SIZE: usize = 16 * 1024;
/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Encrypted length of a full chunk.
pub const CHUNK_CT_SIZE: usize = CHUNK_SIZE + TAG_LEN;
/// A body has fewer than this many chunks (4 PiB of plaintext).
pub const MAX_CHUNKS: u64 = 1 << 38;
/// Length of the input key (AES-256).
pub const KEY_LEN: usize = 32;

const LABEL: &[u8] = b"c2sp.org/chunked-encryption@v1+";
const AEAD_NAME: &[u8] = b"AEAD_AES_256_GCM";
const NONCE_LEN: usize = 12;
/// key || base nonce || commitment
const OKM_LEN: usize = KEY_LEN + NONCE_LEN + COMMITMENT_LEN;

/// The encrypted length of a body carrying `plaintext_len` bytes.
pub const fn body_len(plaintext_len: u64) -> u64 {
    PREFIX_LEN as u64 + plaintext_len + (plaintext_len / CHUNK_SIZE as u64 + 1) * TAG_LEN as u64
}

/// The plaintext length of a body of `body_len` bytes, or the error a
/// decoder must give for that length: shorter than the prefix, or a final
/// chunk shorter than a tag (which includes a missing final chunk), is
/// [`Error::Truncated`].
pub fn plaintext_len(body_len: u64) -> Result<u64> {
    let (full, rem) = chunk_layout(body_len)?;
    Ok(full * CHUNK_SIZE as u64 + (rem - TAG_LEN) as u64)
}

/// Number of full chunks and the length of the encrypted final chunk.
fn chunk_layout(body_len: u64) -> Result<(u64, usize)> {
    let ct = body_len
        .checked_sub(PREFIX_LEN as u64)
        .ok_or(Error::Truncated)?;
    let full = ct / CHUNK_CT_SIZE as u64;
    let rem = (ct % CHUNK_CT_SIZE as u64) as usize;
    if rem < TAG_LEN {
        return Err(Error::Truncated);
    }
    if full >= MAX_CHUNKS {
        return Err(Error::MessageTooLong);
    }
    Ok((full, rem))
}

/// The input key's HKDF state, checked for length.
pub(crate) fn input_key(key: &[u8]) -> Result<Prk> {
    if key.len() != KEY_LEN {
        return Err(Error::InvalidKeyLength { expected: KEY_LEN });
    }
    Ok(hkdf_prk_sha512(key))
}

/// The per-message AES key and base nonce.
pub(crate) struct BodyKeys {
    aead: Aes256Gcm,
    base_nonce: [u8; NONCE_LEN],
}

impl Drop for BodyKeys {
    fn drop(&mut self) {
        self.base_nonce.zeroize();
    }
}

impl BodyKeys {
    /// Derives key, base nonce and commitment from the input key, salt and
    /// context.
    fn derive(
        prk: &Prk,
        salt: &[u8; SALT_LEN],
        context: &[u8],
    ) -> (BodyKeys, [u8; COMMITMENT_LEN]) {
        let mut okm: SecretBytes<OKM_LEN> = Zeroizing::new([0u8; OKM_LEN]);
        hkdf_expand_sha512(
            prk,
            &[LABEL, AEAD_NAME, &[0u8], salt, context],
            &mut okm[..],
        )
        .expect("76 bytes is far below the HKDF-Expand limit");
        let aead = Aes256Gcm::new(&okm[..KEY_LEN]).expect("AES-256 key length is fixed");
        let mut base_nonce = [0u8; NONCE_LEN];
        base_nonce.copy_from_slice(&okm[KEY_LEN..KEY_LEN + NONCE_LEN]);
        let mut commitment = [0u8; COMMITMENT_LEN];
        commitment.copy_from_slice(&okm[KEY_LEN + NONCE_LEN..]);
        (BodyKeys { aead, base_nonce }, commitment)
    }

    /// Reads the prefix, derives the keys and checks the commitment in
    /// constant time.
    pub(crate) fn from_prefix(
        prk: &Prk,
        context: &[u8],
        prefix: &[u8; PREFIX_LEN],
    ) -> Result<BodyKeys> {
        let salt: &[u8; SALT_LEN] = prefix[..SALT_LEN].try_into().expect("fixed split");
        let (keys, commitment) = BodyKeys::derive(prk, salt, context);
        if !ct_eq(&commitment, &prefix[SALT_LEN..]) {
            return Err(Error::Decrypt);
        }
        Ok(keys)
    }

    fn nonce(&self, counter: u64) -> [u8; NONCE_LEN] {
        let mut n = self.base_nonce;
        for (b, c) in n[NONCE_LEN - 8..].iter_mut().zip(counter.to_be_bytes()) {
            *b ^= c;
        }
        n
    }

    /// Seals `chunk` in place and returns its tag.
    pub(crate) fn seal(&self, counter: u64, chunk: &mut [u8]) -> [u8; TAG_LEN] {
        self.aead.seal_in_place(self.nonce(counter), &[], chunk)
    }

    /// Opens `chunk` (ciphertext and tag) in place; returns the plaintext
    /// length. On failure the chunk is zeroized.
    pub(crate) fn open(&self, counter: u64, chunk: &mut [u8]) -> Result<usize> {
        self.aead.open_in_place(self.nonce(counter), &[], chunk)
    }

    /// [`open`](Self::open) for chunk `counter`, where `final_chunk` says
    /// that the input ends with it (it is shorter than a full chunk). Every
    /// decoder calls this after all chunks before `counter` authenticated,
    /// so a final chunk that fails after at least one full chunk is
    /// [`Error::TruncatedChunk`]: the copy was cut inside it, or its end was
    /// damaged (docs/FORMAT.md, section 7.4). Any other failure is the
    /// opaque [`Error::Decrypt`].
    pub(crate) fn open_chunk(
        &self,
        counter: u64,
        chunk: &mut [u8],
        final_chunk: bool,
    ) -> Result<usize> {
        self.open(counter, chunk).map_err(|e| match e {
            Error::Decrypt if final_chunk && counter > 0 => Error::TruncatedChunk,
            other => other,
        })
    }
}

/// Starts a body: a fresh salt, the derived keys, and the 56-byte prefix.
pub(crate) fn start_body(
    prk: &Prk,
    context: &[u8],
    salt: Option<&[u8; SALT_LEN]>,
) -> Result<(BodyKeys, [u8; PREFIX_LEN])> {
    let mut prefix = [0u8; PREFIX_LEN];
    match salt {
        Some(s) => prefix[..SALT_LEN].copy_from_slice(s),
        None => fill_random(&mut prefix[..SALT_LEN])?,
    }
    let salt: [u8; SALT_LEN] = prefix[..SALT_LEN].try_into().expect("fixed split");
    let (keys, commitment) = BodyKeys::derive(prk, &salt, context);
    prefix[SALT_LEN..].copy_from_slice(&commitment);
    Ok((keys, prefix))
}

/// Encrypts a whole body, appending it to `out`. `salt` is `None` in every
/// non-test caller: the salt then comes from the OS CSPRNG.
pub(crate) fn encrypt_into(
    prk: &Prk,
    context: &[u8],
    salt: Option<&[u8; SALT_LEN]>,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let full = plaintext.len() / CHUNK_SIZE;
    if full as u64 >= MAX_CHUNKS {
        return Err(Error::MessageTooLong);
    }
    let (keys, prefix) = start_body(prk, context, salt)?;
    out.reserve(body_len(plaintext.len() as u64) as usize);
    out.extend_from_slice(&prefix);
    for (i, chunk) in plaintext.chunks(CHUNK_SIZE).enumerate() {
        seal_append(&keys, i as u64, chunk, out);
    }
    if plaintext.len().is_multiple_of(CHUNK_SIZE) {
        // The final chunk is always shorter than a full chunk: here, empty.
        seal_append(&keys, full as u64, &[], out);
    }
    Ok(())
}

fn seal_append(keys: &BodyKeys, counter: u64, chunk: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(chunk);
    let tag = keys.seal(counter, &mut out[start..]);
    out.extend_from_slice(&tag);
}

/// The layout of a body of `body_len` bytes as a decoder that knows the
/// length sees it, for reporting errors in stream order (docs/FORMAT.md,
/// section 7.3): the number of full chunks, the encrypted length of the
/// final chunk, or `None` for it when the body ends without room for one
/// (the error is then [`Error::Truncated`], once the full chunks before
/// the end authenticated). A body shorter than its prefix, and the chunk
/// limit, are errors at once.
pub(crate) fn stream_layout(body_len: u64) -> Result<(u64, Option<usize>)> {
    match chunk_layout(body_len) {
        Ok((full, rem)) => Ok((full, Some(rem))),
        Err(Error::Truncated) if body_len >= PREFIX_LEN as u64 => {
            Ok(((body_len - PREFIX_LEN as u64) / CHUNK_CT_SIZE as u64, None))
        }
        Err(e) => Err(e),
    }
}

/// Decrypts a whole body held in memory. Nothing is returned unless every
/// chunk authenticated. Errors are those a streaming decoder would give for
/// the same bytes, in stream order: a body too short for its prefix, the
/// commitment, each chunk in turn, and only then a missing final chunk.
pub(crate) fn decrypt_slice(prk: &Prk, context: &[u8], body: &[u8]) -> Result<Vec<u8>> {
    let (full, final_len) = stream_layout(body.len() as u64)?;
    let prefix: &[u8; PREFIX_LEN] = body[..PREFIX_LEN].try_into().expect("length checked");
    let keys = BodyKeys::from_prefix(prk, context, prefix)?;
    let full = full as usize;
    let mut out = Vec::with_capacity(full * CHUNK_SIZE + final_len.unwrap_or(TAG_LEN));
    let chunks = &body[PREFIX_LEN..];
    let last = final_len.map(|n| (full, n));
    for (i, len) in (0..full).map(|i| (i, CHUNK_CT_SIZE)).chain(last) {
        let start = out.len();
        out.extend_from_slice(&chunks[i * CHUNK_CT_SIZE..i * CHUNK_CT_SIZE + len]);
        match keys.open_chunk(i as u64, &mut out[start..], i == full) {
            Ok(n) => out.truncate(start + n),
            Err(e) => {
                out.zeroize();
                return Err(e);
            }
        }
    }
    if final_len.is_none() {
        out.zeroize();
        return Err(Error::Truncated);
    }
    Ok(out)
}

/// Encrypts `plaintext` into a Cobblestone-256 body under `key` (32 bytes)
/// and `context`, with a fresh random salt.
pub fn encrypt(key: &[u8], context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let prk = input_key(key)?;
    let mut out = Vec::new();
    encrypt_into(&prk, context, None, plaintext, &mut out)?;
    Ok(out)
}

/// Decrypts a whole Cobblestone-256 body held in memory. Returns the
/// plaintext only if every chunk authenticated.
pub fn decrypt(key: &[u8], context: &[u8], body: &[u8]) -> Result<Vec<u8>> {
    decrypt_slice(&input_key(key)?, context, body)
}

/// The failure a decryptor keeps returning after its first error.
#[derive(Clone, Copy, Debug)]
enum Sticky {
    Decrypt,
    Truncated,
    TruncatedChunk,
    TooLong,
    Io(io::ErrorKind),
    Poisoned,
}

impl Sticky {
    fn of(e: &Error) -> Sticky {
        match e {
            Error::Decrypt => Sticky::Decrypt,
            Error::Truncated => Sticky::Truncated,
            Error::TruncatedChunk => Sticky::TruncatedChunk,
            Error::MessageTooLong => Sticky::TooLong,
            Error::Io(io) => Sticky::Io(io.kind()),
            _ => Sticky::Poisoned,
        }
    }

    fn error(self) -> Error {
        match self {
            Sticky::Decrypt => Error::Decrypt,
            Sticky::Truncated => Error::Truncated,
            Sticky::TruncatedChunk => Error::TruncatedChunk,
            Sticky::TooLong => Error::MessageTooLong,
            Sticky::Io(kind) => Error::Io(io::Error::new(
                kind,
                "an earlier I/O error stopped this stream",
            )),
            Sticky::Poisoned => Error::Io(io::Error::other("an earlier error stopped this stream")),
        }
    }
}

/// A chunk buffer that is zeroized when dropped.
fn chunk_buffer() -> Zeroizing<Vec<u8>> {
    Zeroizing::new(vec![0u8; CHUNK_CT_SIZE])
}

/// An encrypting writer: writes the body prefix at once, then one sealed
/// chunk for every 16 KiB written. [`finish`](Encryptor::finish) writes the
/// short final chunk and hands back the inner writer.
///
/// Dropping an `Encryptor` without `finish` leaves a body with no final
/// chunk, which every decoder rejects as truncated.
pub struct Encryptor<W: Write> {
    inner: W,
    keys: BodyKeys,
    buf: Zeroizing<Vec<u8>>,
    len: usize,
    counter: u64,
    poisoned: bool,
}

impl<W: Write> fmt::Debug for Encryptor<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encryptor")
            .field("chunks_written", &self.counter)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Encryptor<W> {
    /// Starts a body under `key` (32 bytes) and `context` with a fresh random
    /// salt, writing the 56-byte prefix to `inner`.
    pub fn new(key: &[u8], context: &[u8], inner: W) -> Result<Self> {
        Self::with_prk(&input_key(key)?, context, None, inner)
    }

    pub(crate) fn with_prk(
        prk: &Prk,
        context: &[u8],
        salt: Option<&[u8; SALT_LEN]>,
        mut inner: W,
    ) -> Result<Self> {
        let (keys, prefix) = start_body(prk, context, salt)?;
        inner.write_all(&prefix)?;
        Ok(Encryptor {
            inner,
            keys,
            buf: chunk_buffer(),
            len: 0,
            counter: 0,
            poisoned: false,
        })
    }

    /// Seals the buffered `len` bytes as chunk `counter` and writes it.
    fn emit(&mut self, final_chunk: bool) -> Result<()> {
        let limit = if final_chunk {
            MAX_CHUNKS
        } else {
            MAX_CHUNKS - 1
        };
        if self.counter >= limit {
            return Err(Error::MessageTooLong);
        }
        let n = self.len;
        let tag = self.keys.seal(self.counter, &mut self.buf[..n]);
        self.buf[n..n + TAG_LEN].copy_from_slice(&tag);
        self.inner.write_all(&self.buf[..n + TAG_LEN])?;
        self.counter += 1;
        self.len = 0;
        Ok(())
    }

    fn write_inner(&mut self, data: &[u8]) -> Result<()> {
        let mut data = data;
        while !data.is_empty() {
            let n = (CHUNK_SIZE - self.len).min(data.len());
            self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            // A full chunk is never the final one, so it can go out now.
            if self.len == CHUNK_SIZE {
                self.emit(false)?;
            }
        }
        Ok(())
    }

    /// Writes the short final chunk (possibly empty), flushes, and returns
    /// the inner writer.
    pub fn finish(mut self) -> Result<W> {
        if self.poisoned {
            return Err(Sticky::Poisoned.error());
        }
        self.emit(true)?;
        self.inner.flush()?;
        // Move the writer out; the buffer and keys are dropped (zeroized).
        let Encryptor { inner, .. } = self;
        Ok(inner)
    }

    /// Hands back the inner writer (with the prefix already written) and the
    /// body keys, for an engine that seals the chunks itself from chunk 0
    /// (the parallel file engine). Only valid before any plaintext was
    /// written.
    pub(crate) fn into_keys(self) -> Result<(W, BodyKeys)> {
        if self.poisoned || self.counter != 0 || self.len != 0 {
            return Err(Error::InvalidArgument(
                "into_keys after plaintext was written".into(),
            ));
        }
        let Encryptor { inner, keys, .. } = self;
        Ok((inner, keys))
    }

    /// Plaintext bytes accepted so far.
    pub fn plaintext_written(&self) -> u64 {
        self.counter * CHUNK_SIZE as u64 + self.len as u64
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(Sticky::Poisoned.error().into());
        }
        match self.write_inner(data) {
            Ok(()) => Ok(data.len()),
            Err(e) => {
                self.poisoned = true;
                Err(e.into())
            }
        }
    }

    /// Flushes the inner writer. Buffered plaintext of a partial chunk stays
    /// buffered: a chunk is only written once it is full or final.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A decrypting reader over a body. The prefix is read and the commitment
/// checked in [`new`](Decryptor::new); each chunk is authenticated before any
/// of its bytes are returned. A missing final chunk or trailing data is an
/// error, and after the first error every read fails.
pub struct Decryptor<R: Read> {
    inner: R,
    keys: BodyKeys,
    buf: Zeroizing<Vec<u8>>,
    pos: usize,
    end: usize,
    counter: u64,
    done: bool,
    failed: Option<Sticky>,
}

impl<R: Read> fmt::Debug for Decryptor<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decryptor")
            .field("chunks_read", &self.counter)
            .field("done", &self.done)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Decryptor<R> {
    /// Reads the body prefix from `inner` and checks the commitment for `key`
    /// (32 bytes) and `context`.
    pub fn new(key: &[u8], context: &[u8], inner: R) -> Result<Self> {
        Self::with_prk(&input_key(key)?, context, inner)
    }

    pub(crate) fn with_prk(prk: &Prk, context: &[u8], mut inner: R) -> Result<Self> {
        let mut prefix = [0u8; PREFIX_LEN];
        if read_full(&mut inner, &mut prefix)? < PREFIX_LEN {
            return Err(Error::Truncated);
        }
        let keys = BodyKeys::from_prefix(prk, context, &prefix)?;
        Ok(Decryptor {
            inner,
            keys,
            buf: chunk_buffer(),
            pos: 0,
            end: 0,
            counter: 0,
            done: false,
            failed: None,
        })
    }

    /// Reads and authenticates the next chunk into the buffer.
    fn next_chunk(&mut self) -> Result<()> {
        let n = read_full(&mut self.inner, &mut self.buf[..])?;
        if n < TAG_LEN {
            // Includes n == 0 after a full chunk: the final chunk is missing.
            return Err(Error::Truncated);
        }
        let final_chunk = n < CHUNK_CT_SIZE;
        let limit = if final_chunk {
            MAX_CHUNKS
        } else {
            MAX_CHUNKS - 1
        };
        if self.counter >= limit {
            return Err(Error::MessageTooLong);
        }
        // A short read means the reader reached its end, so a final chunk
        // here cannot be followed by trailing data.
        let len = self
            .keys
            .open_chunk(self.counter, &mut self.buf[..n], final_chunk)?;
        self.counter += 1;
        self.pos = 0;
        self.end = len;
        self.done = final_chunk;
        Ok(())
    }

    /// Hands back the inner reader, positioned at chunk 0 (the prefix has
    /// been read and the commitment checked), and the body keys, for an
    /// engine that opens the chunks itself (the parallel file engine). Only
    /// valid before any read.
    pub(crate) fn into_keys(self) -> Result<(R, BodyKeys)> {
        if self.counter != 0 || self.failed.is_some() {
            return Err(Error::InvalidArgument(
                "into_keys after the body was read".into(),
            ));
        }
        let Decryptor { inner, keys, .. } = self;
        Ok((inner, keys))
    }

    /// Returns the inner reader.
    pub fn into_inner(self) -> R {
        let Decryptor { inner, .. } = self;
        inner
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(s) = self.failed {
                return Err(s.error().into());
            }
            if self.pos < self.end {
                let n = (self.end - self.pos).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            if let Err(e) = self.next_chunk() {
                self.failed = Some(Sticky::of(&e));
                return Err(e.into());
            }
        }
    }
}

/// A random-access decrypting reader over a body in a `Read + Seek` source.
///
/// [`new`](SeekableDecryptor::new) checks the commitment and authenticates
/// the final chunk, so the plaintext length (and every seek relative to the
/// end) is authenticated before any byte is returned. Each read decrypts and
/// authenticates the chunk it touches.
pub struct SeekableDecryptor<R: Read + Seek> {
    inner: R,
    keys: BodyKeys,
    start: u64,
    full_chunks: u64,
    final_len: usize,
    plaintext_len: u64,
    pos: u64,
    buf: Zeroizing<Vec<u8>>,
    cached: Option<(u64, usize)>,
    failed: Option<Sticky>,
}

impl<R: Read + Seek> fmt::Debug for SeekableDecryptor<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeekableDecryptor")
            .field("plaintext_len", &self.plaintext_len)
            .field("pos", &self.pos)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<R: Read + Seek> SeekableDecryptor<R> {
    /// Opens the body that starts at `inner`'s current position and runs to
    /// its end.
    pub fn new(key: &[u8], context: &[u8], inner: R) -> Result<Self> {
        Self::with_prk(&input_key(key)?, context, inner)
    }

    pub(crate) fn with_prk(prk: &Prk, context: &[u8], mut inner: R) -> Result<Self> {
        let start = inner.stream_position()?;
        let end = inner.seek(SeekFrom::End(0))?;
        let body_len = end.checked_sub(start).ok_or(Error::Truncated)?;
        let (full_chunks, final_len) = stream_layout(body_len)?;
        inner.seek(SeekFrom::Start(start))?;
        let mut prefix = [0u8; PREFIX_LEN];
        if read_full(&mut inner, &mut prefix)? < PREFIX_LEN {
            return Err(Error::Truncated);
        }
        let keys = BodyKeys::from_prefix(prk, context, &prefix)?;
        let mut this = SeekableDecryptor {
            inner,
            keys,
            start,
            full_chunks,
            final_len: final_len.unwrap_or(TAG_LEN),
            plaintext_len: full_chunks * CHUNK_SIZE as u64
                + final_len.map_or(0, |n| (n - TAG_LEN) as u64),
            pos: 0,
            buf: chunk_buffer(),
            cached: None,
            failed: None,
        };
        // Authenticate the length: decrypt the final chunk now. When the
        // body has no final chunk, or it fails, the error is the one a
        // streaming decoder would give: that of the first full chunk that
        // fails, if any (docs/FORMAT.md, section 7.3). Only this error path
        // reads every chunk.
        let end_error = match final_len {
            None => Error::Truncated,
            Some(_) => match this.load(full_chunks) {
                Ok(_) => return Ok(this),
                Err(e @ (Error::Decrypt | Error::TruncatedChunk)) => e,
                Err(e) => return Err(e),
            },
        };
        for index in 0..full_chunks {
            this.load(index)?;
        }
        Err(end_error)
    }

    /// The authenticated plaintext length.
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Decrypts chunk `index` into the buffer unless it is already there.
    fn load(&mut self, index: u64) -> Result<usize> {
        if let Some((i, len)) = self.cached {
            if i == index {
                return Ok(len);
            }
        }
        self.cached = None;
        let ct_len = if index == self.full_chunks {
            self.final_len
        } else {
            CHUNK_CT_SIZE
        };
        let offset = self.start + PREFIX_LEN as u64 + index * CHUNK_CT_SIZE as u64;
        self.inner.seek(SeekFrom::Start(offset))?;
        if read_full(&mut self.inner, &mut self.buf[..ct_len])? < ct_len {
            // The source shrank after it was opened.
            return Err(Error::Truncated);
        }
        let len =
            self.keys
                .open_chunk(index, &mut self.buf[..ct_len], index == self.full_chunks)?;
        self.cached = Some((index, len));
        Ok(len)
    }
}

impl<R: Read + Seek> Read for SeekableDecryptor<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(s) = self.failed {
            return Err(s.error().into());
        }
        if out.is_empty() || self.pos >= self.plaintext_len {
            return Ok(0);
        }
        let index = self.pos / CHUNK_SIZE as u64;
        let offset = (self.pos % CHUNK_SIZE as u64) as usize;
        let len = match self.load(index) {
            Ok(len) => len,
            Err(e) => {
                self.failed = Some(Sticky::of(&e));
                return Err(e.into());
            }
        };
        let n = (len - offset).min(out.len());
        out[..n].copy_from_slice(&self.buf[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for SeekableDecryptor<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.plaintext_len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for n in [0u64, 1, 16383, 16384, 16385, 32768, 100_000] {
            assert_eq!(plaintext_len(body_len(n)).unwrap(), n);
        }
        assert!(matches!(plaintext_len(55), Err(Error::Truncated)));
        assert!(matches!(plaintext_len(56 + 15), Err(Error::Truncated)));
        assert!(matches!(plaintext_len(56 + 16400), Err(Error::Truncated)));
        assert!(matches!(
            plaintext_len(56 + 16400 + 15),
            Err(Error::Truncated)
        ));
    }

    #[test]
    fn nonce_xors_big_endian_counter() {
        let prk = input_key(&[1; 32]).unwrap();
        let (keys, _) = BodyKeys::derive(&prk, &[0; 24], b"");
        let base = keys.base_nonce;
        let n = keys.nonce(0x01_0203_0405);
        let mut expect = base;
        expect[7] ^= 0x01;
        expect[8] ^= 0x02;
        expect[9] ^= 0x03;
        expect[10] ^= 0x04;
        expect[11] ^= 0x05;
        assert_eq!(n, expect);
    }

    /// The derivation step on its own: Wycheproof gives `aeadKey` and
    /// `baseNonce` for every vector that gets past the header.
    #[test]
    fn wycheproof_derivation() {
        use std::io::Read as _;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/wycheproof/c2sp_chunked_encryption_aes_256_gcm_test.json"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let hex = |v: &serde_json::Value| ::hex::decode(v.as_str().unwrap()).unwrap();
        let mut checked = 0;
        for t in doc["testGroups"][0]["tests"].as_array().unwrap() {
            let Some(aead_key) = t.get("aeadKey") else {
                continue;
            };
            let mut ct = Vec::new();
            flate2::read::ZlibDecoder::new(&hex(&t["ct"])[..])
                .read_to_end(&mut ct)
                .unwrap();
            let salt: [u8; SALT_LEN] = ct[..SALT_LEN].try_into().unwrap();
            let prk = input_key(&hex(&t["key"])).unwrap();
            let mut okm = [0u8; OKM_LEN];
            hkdf_expand_sha512(
                &prk,
                &[LABEL, AEAD_NAME, &[0], &salt, &hex(&t["ctx"])],
                &mut okm,
            )
            .unwrap();
            assert_eq!(okm[..KEY_LEN], hex(aead_key)[..], "tcId {}", t["tcId"]);
            let (keys, _) = BodyKeys::derive(&prk, &salt, &hex(&t["ctx"]));
            assert_eq!(
                keys.base_nonce[..],
                hex(&t["baseNonce"])[..],
                "tcId {}",
                t["tcId"]
            );
            checked += 1;
        }
        assert!(
            checked >= 25,
            "only {checked} vectors carried derived values"
        );
    }

    #[test]
    fn fixed_salt_is_deterministic() {
        let prk = input_key(&[9; 32]).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        encrypt_into(&prk, b"c", Some(&[3; 24]), b"hello", &mut a).unwrap();
        encrypt_into(&prk, b"c", Some(&[3; 24]), b"hello", &mut b).unwrap();
        assert_eq!(a, b);
        let mut w = Encryptor::with_prk(&prk, b"c", Some(&[3; 24]), Vec::new()).unwrap();
        w.write_all(b"hello").unwrap();
        assert_eq!(w.finish().unwrap(), a);
    }
}
