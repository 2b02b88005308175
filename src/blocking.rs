//! A blocking facade over [`Envelope`], for code that is not async: batch
//! jobs, command-line tools, FFI.
//!
//! [`BlockingEnvelope`] offers the envelope's operations (records with and
//! without associated data, streams, files, rewrap) as plain functions. How
//! it waits for the keyring's futures depends on the providers:
//!
//! - **No runtime** ([`BlockingEnvelope::new`]): for a keyring whose
//!   providers all answer [`KeyProvider::needs_runtime`] with false (the
//!   local keystore, the recovery recipient). Their futures complete on
//!   their first poll; the facade polls them on the calling thread and, if
//!   one ever returns `Pending` (a data-key cache miss that another thread
//!   is already serving), parks the thread until the future's waker wakes
//!   it. It never spins. A keyring with any other provider (AWS KMS, Vault,
//!   PKCS#11, a provider written outside the crate that keeps the default)
//!   is refused at construction with [`Error::Blocking`]: its futures need
//!   a reactor or a blocking pool, and parked without one they would never
//!   be woken.
//! - **A tokio runtime** ([`BlockingEnvelope::with_runtime`], with any of
//!   the features that bring tokio: `tokio`, `aws-kms`, `pkcs11`, `vault`):
//!   every call runs on the calling thread through the runtime's
//!   [`Handle::block_on`](tokio::runtime::Handle::block_on), while the
//!   runtime's worker threads drive its I/O and timers. The runtime must be
//!   multi-threaded: a `current_thread` runtime drives its I/O only inside
//!   its own `block_on`, so it is refused.
//!
//! A blocking call never runs inside async code. Where tokio is compiled in,
//! every call first checks whether the calling thread is inside a tokio
//! runtime (a worker, a `block_on`, a `spawn_blocking` closure) and, if it
//! is, returns [`Error::Blocking`] without touching any key: blocking there
//! would stall the worker, or deadlock when the runtime is the one the
//! facade waits on. Async code uses [`Envelope`] itself. Without tokio
//! compiled in nothing can tell which executor called; the runtime-free
//! facade then holds the calling thread for the CPU time of the call, as
//! any synchronous function does, and never waits on anything that thread
//! would have to drive.
//!
//! ```
//! use std::sync::Arc;
//! use phi_envelope::blocking::BlockingEnvelope;
//! use phi_envelope::provider::local::LocalKeystore;
//! use phi_envelope::{EncryptionContext, Envelope, KeyRef, Keyring};
//!
//! # fn main() -> phi_envelope::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
//! let key: KeyRef = "local:records".parse()?;
//! store.add_key(&key)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(store))
//!     .recipient(key)
//!     .build()?;
//! // No runtime anywhere: the local keystore needs none.
//! let envelope = BlockingEnvelope::new(Envelope::new(keyring).as_caller("batch", "nightly"))?;
//!
//! let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
//! let sealed = envelope.seal_with(b"potassium 4.1 mmol/L", &ctx, b"record 42")?;
//! assert_eq!(envelope.open_with(&sealed, &ctx, b"record 42")?, b"potassium 4.1 mmol/L");
//! assert!(envelope.open_with(&sealed, &ctx, b"record 43").unwrap_err().is_decrypt());
//! # Ok(()) }
//! ```
//!
//! With a provider that needs a runtime, hand the facade a multi-threaded
//! runtime's handle (`aws-kms` feature):
//!
//! ```no_run
//! # #[cfg(feature = "aws-kms")]
//! # fn demo(keyring: phi_envelope::Keyring) -> phi_envelope::Result<()> {
//! use phi_envelope::blocking::BlockingEnvelope;
//! use phi_envelope::{EncryptionContext, Envelope};
//!
//! let runtime = tokio::runtime::Runtime::new()?; // multi-threaded
//! let envelope = BlockingEnvelope::with_runtime(Envelope::new(keyring), runtime.handle().clone())?;
//! let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
//! let sealed = envelope.seal(b"record", &ctx)?;
//! # Ok(()) }
//! ```
//!
//! [`KeyProvider::needs_runtime`]: crate::provider::KeyProvider::needs_runtime

use std::future::Future;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use crate::cobblestone::{Decryptor, Encryptor, SeekableDecryptor};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::file::{FileOptions, FileReport};
use crate::format::{EncryptionContext, Header};
use crate::rewrap::{PreparedFileRewrap, RecordRewrap, RewrapFileReport};

/// How the facade waits for a future.
#[derive(Clone, Debug)]
enum Executor {
    /// Poll on the calling thread, park between polls.
    Park,
    /// A multi-threaded tokio runtime's `block_on`.
    #[cfg(any(
        feature = "tokio",
        feature = "aws-kms",
        feature = "pkcs11",
        feature = "vault"
    ))]
    Tokio(tokio::runtime::Handle),
}

/// The operations of an [`Envelope`] as blocking functions; see the
/// [module docs](self) for when it needs a runtime and what it refuses.
///
/// Cheap to clone, `Send + Sync`, like the envelope it holds.
#[derive(Clone, Debug)]
pub struct BlockingEnvelope {
    envelope: Envelope,
    executor: Executor,
}

impl BlockingEnvelope {
    /// A facade that needs no runtime, for a keyring whose providers all
    /// complete without waiting ([`KeyProvider::needs_runtime`] false: the
    /// local keystore, the recovery recipient).
    ///
    /// A keyring with any provider that may need a runtime is refused with
    /// [`Error::Blocking`]; use [`with_runtime`](Self::with_runtime) for it.
    ///
    /// [`KeyProvider::needs_runtime`]: crate::provider::KeyProvider::needs_runtime
    pub fn new(envelope: Envelope) -> Result<BlockingEnvelope> {
        if envelope.keyring().needs_runtime() {
            return Err(Error::Blocking(
                "a provider of this keyring needs an async runtime (network I/O, a blocking pool or timers): build the facade with BlockingEnvelope::with_runtime and a multi-threaded tokio runtime's handle".into(),
            ));
        }
        Ok(BlockingEnvelope {
            envelope,
            executor: Executor::Park,
        })
    }

    /// A facade that runs every call through `handle`, the handle of a
    /// multi-threaded tokio runtime that outlives the calls (its workers
    /// drive the providers' I/O and timers while the calling thread waits).
    /// Any keyring is accepted.
    ///
    /// A `current_thread` runtime's handle is refused with
    /// [`Error::Blocking`]: such a runtime drives I/O only inside its own
    /// `block_on`, so a call waiting on a provider would never finish.
    #[cfg(any(
        feature = "tokio",
        feature = "aws-kms",
        feature = "pkcs11",
        feature = "vault"
    ))]
    pub fn with_runtime(
        envelope: Envelope,
        handle: tokio::runtime::Handle,
    ) -> Result<BlockingEnvelope> {
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            return Err(Error::Blocking(
                "a current_thread runtime drives its I/O only inside its own block_on, so a blocking call on its handle could wait forever: give a multi-threaded runtime's handle (tokio::runtime::Runtime::new())".into(),
            ));
        }
        Ok(BlockingEnvelope {
            envelope,
            executor: Executor::Tokio(handle),
        })
    }

    /// The envelope underneath (for its settings; async code calls it
    /// directly).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Waits for `f` on the calling thread, or refuses when that thread is
    /// inside a tokio runtime.
    fn run<F: Future>(&self, f: F) -> Result<F::Output> {
        refuse_inside_runtime()?;
        match &self.executor {
            Executor::Park => Ok(park_on(f)),
            #[cfg(any(
                feature = "tokio",
                feature = "aws-kms",
                feature = "pkcs11",
                feature = "vault"
            ))]
            Executor::Tokio(handle) => Ok(handle.block_on(f)),
        }
    }

    /// [`Envelope::seal`], blocking.
    pub fn seal(&self, plaintext: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.run(self.envelope.seal(plaintext, context))?
    }

    /// [`Envelope::seal_with`] (associated data `ad` bound to the body),
    /// blocking.
    pub fn seal_with(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Vec<u8>> {
        self.run(self.envelope.seal_with(plaintext, context, ad))?
    }

    /// [`Envelope::open`], blocking.
    pub fn open(&self, message: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.run(self.envelope.open(message, context))?
    }

    /// [`Envelope::open_with`], blocking.
    pub fn open_with(
        &self,
        message: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Vec<u8>> {
        self.run(self.envelope.open_with(message, context, ad))?
    }

    /// [`Envelope::encryptor`], blocking. The writer it returns is
    /// synchronous; call [`Encryptor::finish`] at the end.
    pub fn encryptor<W: Write>(
        &self,
        inner: W,
        context: &EncryptionContext,
    ) -> Result<Encryptor<W>> {
        self.run(self.envelope.encryptor(inner, context))?
    }

    /// [`Envelope::encryptor_with`], blocking.
    pub fn encryptor_with<W: Write>(
        &self,
        inner: W,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Encryptor<W>> {
        self.run(self.envelope.encryptor_with(inner, context, ad))?
    }

    /// [`Envelope::decryptor`], blocking.
    pub fn decryptor<R: Read>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<Decryptor<R>> {
        self.run(self.envelope.decryptor(inner, context))?
    }

    /// [`Envelope::decryptor_with`], blocking.
    pub fn decryptor_with<R: Read>(
        &self,
        inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Decryptor<R>> {
        self.run(self.envelope.decryptor_with(inner, context, ad))?
    }

    /// [`Envelope::seekable_decryptor`], blocking.
    pub fn seekable_decryptor<R: Read + Seek>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<SeekableDecryptor<R>> {
        self.run(self.envelope.seekable_decryptor(inner, context))?
    }

    /// [`Envelope::seekable_decryptor_with`], blocking.
    pub fn seekable_decryptor_with<R: Read + Seek>(
        &self,
        inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<SeekableDecryptor<R>> {
        self.run(self.envelope.seekable_decryptor_with(inner, context, ad))?
    }

    /// [`Envelope::encrypt_file`], blocking.
    pub fn encrypt_file(
        &self,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.run(self.envelope.encrypt_file(input, output, context, options))?
    }

    /// [`Envelope::decrypt_file`], blocking.
    pub fn decrypt_file(
        &self,
        input: &Path,
        output: &Path,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.run(self.envelope.decrypt_file(input, output, context, options))?
    }

    /// [`Envelope::encrypt_stream_parallel`], blocking.
    pub fn encrypt_stream_parallel<R: Read + Send, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.run(
            self.envelope
                .encrypt_stream_parallel(reader, writer, context, options),
        )?
    }

    /// [`Envelope::decrypt_stream_parallel`], blocking.
    pub fn decrypt_stream_parallel<R: Read + Send, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
        context: &EncryptionContext,
        options: &FileOptions,
    ) -> Result<FileReport> {
        self.run(
            self.envelope
                .decrypt_stream_parallel(reader, writer, context, options),
        )?
    }

    /// [`Envelope::rewrap_header`], blocking.
    pub fn rewrap_header(&self, header: &Header, context: &EncryptionContext) -> Result<Header> {
        self.run(self.envelope.rewrap_header(header, context))?
    }

    /// [`Envelope::rewrap`], blocking.
    pub fn rewrap(&self, message: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.run(self.envelope.rewrap(message, context))?
    }

    /// [`Envelope::rewrap_batch`], blocking. The outer `Result` is only the
    /// facade's refusal ([`Error::Blocking`]); each record's own outcome is
    /// in its [`RecordRewrap`].
    pub fn rewrap_batch(&self, items: &[(&[u8], &EncryptionContext)]) -> Result<Vec<RecordRewrap>> {
        self.run(self.envelope.rewrap_batch(items))
    }

    /// [`Envelope::rewrap_batch_with`], blocking (see
    /// [`rewrap_batch`](Self::rewrap_batch) for the outer `Result`).
    pub fn rewrap_batch_with(
        &self,
        items: &[(&[u8], &EncryptionContext)],
        max_in_flight: usize,
    ) -> Result<Vec<RecordRewrap>> {
        self.run(self.envelope.rewrap_batch_with(items, max_in_flight))
    }

    /// [`Envelope::rewrap_file`], blocking.
    pub fn rewrap_file(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
    ) -> Result<RewrapFileReport> {
        self.run(self.envelope.rewrap_file(path, context))?
    }

    /// [`Envelope::rewrap_file_with`], blocking.
    pub fn rewrap_file_with(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<RewrapFileReport> {
        self.run(self.envelope.rewrap_file_with(path, context, ad))?
    }

    /// [`Envelope::prepare_rewrap_file`], blocking; commit the result with
    /// [`PreparedFileRewrap::commit`].
    pub fn prepare_rewrap_file(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
    ) -> Result<PreparedFileRewrap> {
        self.run(self.envelope.prepare_rewrap_file(path, context))?
    }

    /// [`Envelope::prepare_rewrap_file_with`], blocking.
    pub fn prepare_rewrap_file_with(
        &self,
        path: impl AsRef<Path>,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<PreparedFileRewrap> {
        self.run(self.envelope.prepare_rewrap_file_with(path, context, ad))?
    }
}

/// [`Error::Blocking`] when the calling thread is inside a tokio runtime.
#[cfg(any(
    feature = "tokio",
    feature = "aws-kms",
    feature = "pkcs11",
    feature = "vault"
))]
fn refuse_inside_runtime() -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Blocking(
            "called from inside a tokio runtime, where blocking would stall a worker thread (or deadlock on the runtime it waits for); nothing was done: in async code call the async Envelope (envelope() gives it)".into(),
        ));
    }
    Ok(())
}

/// Nothing to detect when tokio is not compiled in (see the module docs).
#[cfg(not(any(
    feature = "tokio",
    feature = "aws-kms",
    feature = "pkcs11",
    feature = "vault"
)))]
fn refuse_inside_runtime() -> Result<()> {
    Ok(())
}

/// Wakes a parked thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `f` on this thread; between polls the thread parks until `f`'s
/// waker unparks it (a spurious wake-up only costs one more poll). For
/// futures that need no reactor: one that waits on I/O a runtime would
/// drive is never woken, which is why [`BlockingEnvelope::new`] refuses
/// keyrings whose providers need a runtime.
fn park_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A future that is pending until another thread sets its flag and
    /// wakes it, as a cache waiter is until the leader finishes.
    #[test]
    fn park_on_sleeps_until_woken_by_another_thread() {
        let ready = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (r, p) = (ready.clone(), polls.clone());
        let fut = std::future::poll_fn(move |cx| {
            p.fetch_add(1, Ordering::SeqCst);
            if r.load(Ordering::SeqCst) {
                return Poll::Ready(7);
            }
            let waker = cx.waker().clone();
            let r = r.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                r.store(true, Ordering::SeqCst);
                waker.wake();
            });
            Poll::Pending
        });
        assert_eq!(park_on(fut), 7);
        // Parked, not spinning: woken once (a spurious wake-up may add one).
        assert!(polls.load(Ordering::SeqCst) <= 3);
        assert!(ready.load(Ordering::SeqCst));
    }
}
