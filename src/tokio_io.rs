//! tokio `AsyncWrite` / `AsyncRead` adapters for streams (feature `tokio`).
//!
//! The same format and guarantees as the sync [`Encryptor`] and
//! [`Decryptor`]: the writer seals each full 16 KiB chunk as it fills and
//! writes the short final chunk on `shutdown()` (a writer dropped without
//! `shutdown` leaves a stream that every decoder rejects as truncated); the
//! reader authenticates every chunk before releasing a byte of it, treats a
//! missing final chunk as an error and keeps failing after its first error.
//!
//! ```
//! # async fn demo(envelope: phi_envelope::Envelope) -> phi_envelope::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! let ctx = phi_envelope::EncryptionContext::new().with("upload", "7")?;
//! let mut w = envelope.async_encryptor(Vec::new(), &ctx).await?;
//! w.write_all(b"scan.dcm bytes").await?;
//! w.shutdown().await?; // writes the final chunk
//! let sealed = w.into_inner();
//! let mut r = envelope.async_decryptor(&sealed[..], &ctx).await?;
//! let mut plain = Vec::new();
//! r.read_to_end(&mut plain).await?;
//! assert_eq!(plain, b"scan.dcm bytes");
//! # Ok(()) }
//! ```
//!
//! [`Encryptor`]: crate::cobblestone::Encryptor
//! [`Decryptor`]: crate::cobblestone::Decryptor

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use zeroize::Zeroizing;

use crate::cobblestone::{BodyKeys, CHUNK_CT_SIZE, CHUNK_SIZE, MAX_CHUNKS, PREFIX_LEN, TAG_LEN};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::format::{check_associated_data, EncryptionContext, Header, MAX_HEADER_LEN};

/// An encrypting `AsyncWrite`: see the [module docs](self).
pub struct AsyncEncryptor<W> {
    inner: W,
    keys: BodyKeys,
    /// Plaintext of the chunk being filled.
    buf: Zeroizing<Vec<u8>>,
    len: usize,
    counter: u64,
    /// Bytes sealed (or the header and prefix) not yet written to `inner`.
    pending: Vec<u8>,
    pending_pos: usize,
    finished: bool,
    failed: bool,
}

impl<W> fmt::Debug for AsyncEncryptor<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncEncryptor")
            .field("chunks_sealed", &self.counter)
            .field("finished", &self.finished)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> AsyncEncryptor<W> {
    /// Writes what is pending to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_pos < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.pending_pos..]))
                    .inspect_err(|_| self.failed = true)?;
            if n == 0 {
                self.failed = true;
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_pos += n;
        }
        self.pending.clear();
        self.pending_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals the buffered plaintext as the next chunk into `pending`.
    fn seal(&mut self, final_chunk: bool) -> io::Result<()> {
        let limit = if final_chunk {
            MAX_CHUNKS
        } else {
            MAX_CHUNKS - 1
        };
        if self.counter >= limit {
            self.failed = true;
            return Err(Error::MessageTooLong.into());
        }
        let n = self.len;
        let tag = self.keys.seal(self.counter, &mut self.buf[..n]);
        self.pending.extend_from_slice(&self.buf[..n]);
        self.pending.extend_from_slice(&tag);
        self.counter += 1;
        self.len = 0;
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.failed {
            Err(io::Error::other("an earlier error stopped this stream"))
        } else if self.finished {
            Err(io::Error::other("the stream was already shut down"))
        } else {
            Ok(())
        }
    }

    /// The inner writer (after `shutdown`, the whole message is in it).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for AsyncEncryptor<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        ready!(this.poll_drain(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = (CHUNK_SIZE - this.len).min(data.len());
        this.buf[this.len..this.len + n].copy_from_slice(&data[..n]);
        this.len += n;
        // A full chunk is never the final one: seal it now; it is written
        // by the next call.
        if this.len == CHUNK_SIZE {
            this.seal(false)?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// Seals and writes the final chunk, then shuts the inner writer down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(io::Error::other(
                "an earlier error stopped this stream",
            )));
        }
        if !this.finished {
            ready!(this.poll_drain(cx))?;
            this.seal(true)?;
            this.finished = true;
        }
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A decrypting `AsyncRead`: see the [module docs](self).
pub struct AsyncDecryptor<R> {
    inner: R,
    keys: BodyKeys,
    buf: Zeroizing<Vec<u8>>,
    /// Encrypted bytes of the next chunk read so far.
    filled: usize,
    /// Plaintext window of the current chunk.
    pos: usize,
    end: usize,
    counter: u64,
    eof: bool,
    done: bool,
    failed: Option<io::ErrorKind>,
}

impl<R> fmt::Debug for AsyncDecryptor<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncDecryptor")
            .field("chunks_read", &self.counter)
            .field("done", &self.done)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> AsyncDecryptor<R> {
    /// Fills the chunk buffer to a full chunk or the end of the input, then
    /// opens the chunk.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        while !self.eof && self.filled < CHUNK_CT_SIZE {
            let mut rb = ReadBuf::new(&mut self.buf[self.filled..]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.eof = true;
            }
            self.filled += n;
        }
        let n = self.filled;
        if n < TAG_LEN {
            return Poll::Ready(Err(Error::Truncated));
        }
        let final_chunk = n < CHUNK_CT_SIZE;
        let limit = if final_chunk {
            MAX_CHUNKS
        } else {
            MAX_CHUNKS - 1
        };
        if self.counter >= limit {
            return Poll::Ready(Err(Error::MessageTooLong));
        }
        let len = self
            .keys
            .open_chunk(self.counter, &mut self.buf[..n], final_chunk)?;
        self.counter += 1;
        self.filled = 0;
        self.pos = 0;
        self.end = len;
        self.done = final_chunk;
        Poll::Ready(Ok(()))
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for AsyncDecryptor<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(kind) = this.failed {
                return Poll::Ready(Err(io::Error::new(
                    kind,
                    "an earlier error stopped this stream",
                )));
            }
            if this.pos < this.end {
                let n = (this.end - this.pos).min(out.remaining());
                out.put_slice(&this.buf[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.done || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = ready!(this.poll_chunk(cx)) {
                let e: io::Error = e.into();
                this.failed = Some(e.kind());
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl Envelope {
    /// Starts an encrypted stream into an `AsyncWrite`: the header and body
    /// prefix are written with the first bytes. Call `shutdown()` at the end
    /// (it writes the final chunk).
    pub async fn async_encryptor<W: AsyncWrite + Unpin>(
        &self,
        inner: W,
        context: &EncryptionContext,
    ) -> Result<AsyncEncryptor<W>> {
        self.async_encryptor_with(inner, context, &[]).await
    }

    /// [`async_encryptor`](Self::async_encryptor) for a stream whose body is
    /// bound to the associated data `ad` as well (see
    /// [`Envelope::seal_with`]).
    pub async fn async_encryptor_with<W: AsyncWrite + Unpin>(
        &self,
        inner: W,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<AsyncEncryptor<W>> {
        check_associated_data(ad)?;
        let key = self.sealing_key(context).await?;
        let (keys, prefix) = key.start_body(context, ad)?;
        let mut pending = Vec::with_capacity(key.header().len() + PREFIX_LEN + CHUNK_CT_SIZE);
        pending.extend_from_slice(key.header().as_bytes());
        pending.extend_from_slice(&prefix);
        Ok(AsyncEncryptor {
            inner,
            keys,
            buf: Zeroizing::new(vec![0u8; CHUNK_CT_SIZE]),
            len: 0,
            counter: 0,
            pending,
            pending_pos: 0,
            finished: false,
            failed: false,
        })
    }

    /// Reads the header and body prefix from an `AsyncRead`, unwraps the DEK
    /// and checks the commitment; returns a reader of the plaintext.
    pub async fn async_decryptor<R: AsyncRead + Unpin>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<AsyncDecryptor<R>> {
        self.async_decryptor_with(inner, context, &[]).await
    }

    /// [`async_decryptor`](Self::async_decryptor) for a stream whose body is
    /// bound to the associated data `ad` as well (see
    /// [`Envelope::open_with`]).
    pub async fn async_decryptor_with<R: AsyncRead + Unpin>(
        &self,
        mut inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<AsyncDecryptor<R>> {
        check_associated_data(ad)?;
        // Read until the header parses; every length in it is bounded, so
        // this never reads more than MAX_HEADER_LEN plus one step.
        let mut head: Vec<u8> = Vec::with_capacity(1024);
        let mut step = [0u8; 1024];
        let (header, used) = loop {
            match Header::parse(&head) {
                Ok(parsed) => break parsed,
                Err(Error::Truncated) if head.len() <= MAX_HEADER_LEN => {}
                Err(e) => return Err(e),
            }
            let n = inner.read(&mut step).await?;
            if n == 0 {
                return Err(Error::Truncated);
            }
            head.extend_from_slice(&step[..n]);
        };
        let mut rest = head.split_off(used);
        // The DEK is unwrapped before the body prefix is required, as in the
        // sync decoders: errors come in stream order (docs/FORMAT.md,
        // section 7.3), so a header that does not authenticate is
        // `Decrypt` even when the body is cut short.
        let (_, key) = self
            .keyring()
            .unwrap_header(&header, context, self.caller())
            .await?;
        while rest.len() < PREFIX_LEN {
            let n = inner.read(&mut step).await?;
            if n == 0 {
                return Err(Error::Truncated);
            }
            rest.extend_from_slice(&step[..n]);
        }
        let prefix: [u8; PREFIX_LEN] = rest[..PREFIX_LEN].try_into().expect("length checked");
        let keys = key.body_keys(&prefix, context, ad)?;
        let mut buf = Zeroizing::new(vec![0u8; CHUNK_CT_SIZE]);
        let leftover = &rest[PREFIX_LEN..];
        buf[..leftover.len()].copy_from_slice(leftover);
        Ok(AsyncDecryptor {
            inner,
            keys,
            buf,
            filled: leftover.len(),
            pos: 0,
            end: 0,
            counter: 0,
            eof: false,
            done: false,
            failed: None,
        })
    }
}
