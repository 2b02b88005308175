//! Fault injection through the public API: providers that are down, slow,
//! hung or answering errors; writers that fail mid-stream, a full disk,
//! `/dev/full`; a thousand concurrent tasks across two providers; a process
//! killed while encrypting.
//!
//! What each test proves is in its doc comment. The HSM session-loss case
//! lives with the PKCS#11 provider's tests, the CLI kill case with the CLI's.
//!
//! Two tests re-execute this test binary as a child process (the child's
//! work is selected by the `PHI_FAULT_INJECTION_CHILD` variable and runs
//! inside `atomic_stream_output_appears_only_on_commit`, which is an
//! ordinary test when the variable is not set).

mod conformance;

use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conformance::MemoryKms;
use phi_envelope::atomic::AtomicFile;
use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::{
    BoxFuture, KeyInfo, KeyProvider, ProviderError, ProviderErrorKind, Unwrapped,
};
use phi_envelope::{Dek, EncryptionContext, Envelope, Error, KeyRef, Keyring, WrappedKey};

fn ctx(record: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", record)
        .unwrap()
}

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn envelope_over(providers: &[Arc<dyn KeyProvider>], recipients: &[KeyRef]) -> Envelope {
    let mut b = Keyring::builder();
    for p in providers {
        b = b.provider(p.clone());
    }
    for r in recipients {
        b = b.recipient(r.clone());
    }
    Envelope::new(b.build().unwrap()).as_caller("fault-injection", "test")
}

fn provider_kind(e: &Error) -> Option<ProviderErrorKind> {
    match e {
        Error::Provider(p) => Some(p.kind()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// A provider wrapper that injects faults.
// ---------------------------------------------------------------------------

/// What [`Faulty`] does to each call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Pass the call on.
    None,
    /// Wait this long first (the wait is cancelled with the call).
    Delay(Duration),
    /// Never answer.
    Hang,
    /// Answer this operational error (a provider's own timeout, throttling).
    Error(ProviderErrorKind),
}

/// Wraps a provider; counts calls in flight with a guard that lives inside
/// the call's future, so a future dropped by a caller's timeout shows up as
/// "no longer in flight" and a detached task would not.
struct Faulty {
    inner: Arc<dyn KeyProvider>,
    fault: Mutex<Fault>,
    in_flight: Arc<AtomicUsize>,
    started: AtomicUsize,
}

impl std::fmt::Debug for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty")
            .field("inner", &self.inner)
            .finish()
    }
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Faulty {
    fn new(inner: Arc<dyn KeyProvider>) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner,
            fault: Mutex::new(Fault::None),
            in_flight: Arc::new(AtomicUsize::new(0)),
            started: AtomicUsize::new(0),
        })
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Runs the fault, then `call`, holding an in-flight guard throughout.
    fn run<'a, T: Send + 'a>(
        &'a self,
        call: BoxFuture<'a, phi_envelope::Result<T>>,
    ) -> BoxFuture<'a, phi_envelope::Result<T>> {
        let fault = *self.fault.lock().unwrap();
        Box::pin(async move {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            self.started.fetch_add(1, Ordering::SeqCst);
            let _guard = InFlight(self.in_flight.clone());
            match fault {
                Fault::None => {}
                Fault::Delay(d) => tokio::time::sleep(d).await,
                Fault::Hang => std::future::pending::<()>().await,
                Fault::Error(kind) => {
                    return Err(ProviderError::new(
                        self.inner.id(),
                        kind,
                        format!("injected {}: retry later", kind.as_str()),
                    )
                    .into())
                }
            }
            call.await
        })
    }
}

impl KeyProvider for Faulty {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<WrappedKey>> {
        self.run(self.inner.wrap(key, dek, context))
    }
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Unwrapped>> {
        self.run(self.inner.unwrap(entry, context))
    }
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        self.inner.describe(key)
    }
    fn generate<'a>(
        &'a self,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<phi_envelope::provider::GeneratedDek>> {
        self.run(self.inner.generate(key, context))
    }
}

// ---------------------------------------------------------------------------
// Providers down, slow, hung, erroring.
// ---------------------------------------------------------------------------

/// A provider that is down: sealing, opening and starting a stream fail
/// with `Provider(Unavailable)` (not the opaque decryption error, not "no
/// matching key"), with a message that names the provider; a stream writes
/// nothing at all to its output; the failure is an event; and everything
/// works again once the provider is back (no state stuck).
#[tokio::test]
async fn provider_down_is_a_clear_error_with_no_output() {
    let kms = Arc::new(MemoryKms::new("vault-a"));
    let key = kms.add_key("records");
    let sink = Arc::new(MemorySink::new());
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key)
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    );
    let sealed = env.seal(b"lab result", &ctx("1")).await.unwrap();
    let stream_sealed = {
        let mut w = env.encryptor(Vec::new(), &ctx("2")).await.unwrap();
        w.write_all(&bytes(40_000, 1)).unwrap();
        w.finish().unwrap()
    };

    kms.down.store(true, Ordering::SeqCst);
    let e = env.seal(b"x", &ctx("1")).await.unwrap_err();
    assert_eq!(
        provider_kind(&e),
        Some(ProviderErrorKind::Unavailable),
        "{e:?}"
    );
    assert!(e.to_string().contains("vault-a"), "{e}");
    let mut out = Vec::new();
    let e = env.encryptor(&mut out, &ctx("1")).await.unwrap_err();
    assert_eq!(provider_kind(&e), Some(ProviderErrorKind::Unavailable));
    assert!(
        out.is_empty(),
        "a stream whose key could not be made wrote {} bytes",
        out.len()
    );
    let e = env.open(&sealed, &ctx("1")).await.unwrap_err();
    assert_eq!(
        provider_kind(&e),
        Some(ProviderErrorKind::Unavailable),
        "{e:?}"
    );
    let e = env
        .decryptor(&stream_sealed[..], &ctx("2"))
        .await
        .unwrap_err();
    assert_eq!(provider_kind(&e), Some(ProviderErrorKind::Unavailable));
    assert!(sink
        .events()
        .iter()
        .any(|ev| ev.outcome == Outcome::Failed("unavailable".into())));

    kms.down.store(false, Ordering::SeqCst);
    assert_eq!(env.open(&sealed, &ctx("1")).await.unwrap(), b"lab result");
    let mut r = env.decryptor(&stream_sealed[..], &ctx("2")).await.unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    assert_eq!(back, bytes(40_000, 1));
}

/// Two providers, a message wrapped to both: with either one down (or
/// answering a timeout or throttling error of its own), opening succeeds
/// through the other; sealing needs every recipient and produces nothing
/// when one fails.
#[tokio::test]
async fn multi_recipient_survives_one_provider_down_or_erroring() {
    let a_inner = Arc::new(MemoryKms::new("vault-a"));
    let b_inner = Arc::new(MemoryKms::new("vault-b"));
    let (ka, kb) = (a_inner.add_key("records"), b_inner.add_key("dr"));
    let a = Faulty::new(a_inner.clone());
    let b = Faulty::new(b_inner.clone());
    let env = envelope_over(&[a.clone(), b.clone()], &[ka, kb]);
    let sealed = env.seal(b"two recipients", &ctx("m")).await.unwrap();

    for fault in [
        Fault::Error(ProviderErrorKind::Unavailable),
        Fault::Error(ProviderErrorKind::Throttled),
        Fault::Error(ProviderErrorKind::AccessDenied),
    ] {
        for (down, up) in [(&a, &b), (&b, &a)] {
            down.set(fault);
            up.set(Fault::None);
            assert_eq!(
                env.open(&sealed, &ctx("m")).await.unwrap(),
                b"two recipients",
                "{fault:?} on {}",
                down.id()
            );
            let mut out = Vec::new();
            let e = env.encryptor(&mut out, &ctx("m")).await.unwrap_err();
            assert!(provider_kind(&e).is_some(), "{e:?}");
            assert!(out.is_empty());
            assert!(env.seal(b"x", &ctx("m")).await.is_err());
        }
    }
    // Both failing: the operational error, not the opaque one.
    a.set(Fault::Error(ProviderErrorKind::Unavailable));
    b.set(Fault::Error(ProviderErrorKind::Unavailable));
    let e = env.open(&sealed, &ctx("m")).await.unwrap_err();
    assert_eq!(provider_kind(&e), Some(ProviderErrorKind::Unavailable));
}

/// A slow provider under a caller's `tokio::time::timeout`: the timeout
/// fires on time; the provider call is cancelled, not left running (its
/// in-flight guard is dropped); no output was written; no reference to the
/// keyring or the provider is left behind; no success was recorded for the
/// cancelled call; and the next call, once the provider is fast again,
/// works.
#[tokio::test]
async fn slow_provider_is_cut_off_by_a_caller_timeout_and_nothing_leaks() {
    let inner = Arc::new(MemoryKms::new("vault-slow"));
    let key = inner.add_key("records");
    let slow = Faulty::new(inner.clone());
    let sink = Arc::new(MemorySink::new());
    let keyring = Arc::new(
        Keyring::builder()
            .provider(slow.clone())
            .recipient(key)
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    );
    let env = Envelope::from_shared(keyring.clone());
    let sealed = env.seal(b"before", &ctx("1")).await.unwrap();
    sink.take();
    let (keyring_refs, provider_refs) = (Arc::strong_count(&keyring), Arc::strong_count(&slow));
    let started = slow.started.load(Ordering::SeqCst);

    slow.set(Fault::Delay(Duration::from_secs(30)));
    let limit = Duration::from_millis(200);
    let t = Instant::now();
    let r = tokio::time::timeout(limit, env.seal(b"x", &ctx("1"))).await;
    assert!(r.is_err(), "seal finished under a 30 s provider delay");
    let mut out = Vec::new();
    let r = tokio::time::timeout(limit, env.encryptor(&mut out, &ctx("1"))).await;
    assert!(r.is_err());
    let r = tokio::time::timeout(limit, env.open(&sealed, &ctx("1"))).await;
    assert!(r.is_err());
    let r = tokio::time::timeout(limit, env.decryptor(&sealed[..], &ctx("1"))).await;
    assert!(r.is_err());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "timeouts took {:?}",
        t.elapsed()
    );

    assert_eq!(
        slow.started.load(Ordering::SeqCst) - started,
        4,
        "each call reached the provider"
    );
    assert_eq!(
        slow.in_flight(),
        0,
        "a cancelled provider call is still running"
    );
    assert!(
        out.is_empty(),
        "a cancelled stream wrote {} bytes",
        out.len()
    );
    assert_eq!(
        Arc::strong_count(&keyring),
        keyring_refs,
        "a keyring reference leaked"
    );
    assert_eq!(
        Arc::strong_count(&slow),
        provider_refs,
        "a provider reference leaked"
    );
    assert!(
        !sink.events().iter().any(|e| e.outcome == Outcome::Success),
        "a cancelled call was recorded as a success"
    );

    slow.set(Fault::None);
    assert_eq!(env.open(&sealed, &ctx("1")).await.unwrap(), b"before");
    assert!(env.seal(b"after", &ctx("1")).await.is_ok());
}

/// A provider that never answers: without a timeout of its own, a call to
/// it never returns (the keyring tries entries in header order and has no
/// per-provider deadline; providers bound their own calls: the SDK's
/// timeouts for KMS, `Pkcs11Config::timeout` for the HSM). A caller's
/// timeout gets control back; the hung call is dropped; a message whose
/// first entry belongs to another provider opens without touching the hung
/// one; and a provider answering its own timeout error lets the keyring
/// fall back to the next entry.
#[tokio::test]
async fn hung_provider_needs_a_deadline_and_a_timeout_error_falls_back() {
    let a_inner = Arc::new(MemoryKms::new("vault-a"));
    let b_inner = Arc::new(MemoryKms::new("vault-b"));
    let (ka, kb) = (a_inner.add_key("records"), b_inner.add_key("dr"));
    let a = Faulty::new(a_inner.clone());
    let b = Faulty::new(b_inner.clone());
    let a_first = envelope_over(&[a.clone(), b.clone()], &[ka.clone(), kb.clone()]);
    let b_first = envelope_over(&[a.clone(), b.clone()], &[kb, ka]);
    let sealed_a_first = a_first.seal(b"a first", &ctx("h")).await.unwrap();
    let sealed_b_first = b_first.seal(b"b first", &ctx("h")).await.unwrap();

    a.set(Fault::Hang);
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        a_first.open(&sealed_a_first, &ctx("h")),
    )
    .await;
    assert!(r.is_err(), "an open through a hung provider returned");
    assert_eq!(a.in_flight(), 0, "the hung call was not dropped");
    let started = a.started.load(Ordering::SeqCst);
    assert_eq!(
        b_first.open(&sealed_b_first, &ctx("h")).await.unwrap(),
        b"b first"
    );
    assert_eq!(
        a.started.load(Ordering::SeqCst),
        started,
        "the hung provider was called"
    );

    // The provider's own deadline, reported as an error: the next entry.
    a.set(Fault::Error(ProviderErrorKind::Unavailable));
    assert_eq!(
        a_first.open(&sealed_a_first, &ctx("h")).await.unwrap(),
        b"a first"
    );
}

/// A single-flight leader (data-key cache) cancelled by its caller's
/// timeout releases the tasks waiting on it: they go on and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_cache_leader_does_not_strand_its_waiters() {
    use phi_envelope::cache::{CacheConfig, CacheLimits};
    let inner = Arc::new(MemoryKms::new("vault-c"));
    let key = inner.add_key("records");
    let slow = Faulty::new(inner.clone());
    let env = Envelope::new(
        Keyring::builder()
            .provider(slow.clone())
            .recipient(key)
            .data_key_cache(
                CacheConfig::new()
                    .encrypt(CacheLimits::new(Duration::from_secs(60), 1000, 1 << 30))
                    .decrypt(CacheLimits::new(Duration::from_secs(60), 1000, 1 << 30)),
            )
            .build()
            .unwrap(),
    );
    slow.set(Fault::Delay(Duration::from_millis(600)));
    let leader = {
        let env = env.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(100), env.seal(b"l", &ctx("c"))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let waiters: Vec<_> = (0..8)
        .map(|i| {
            let env = env.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    env.seal(format!("w{i}").as_bytes(), &ctx("c")),
                )
                .await
            })
        })
        .collect();
    assert!(
        leader.await.unwrap().is_err(),
        "the leader was not cancelled"
    );
    for w in waiters {
        let sealed = w
            .await
            .unwrap()
            .expect("a waiter was stranded by its cancelled leader")
            .unwrap();
        slow.set(Fault::None);
        assert!(env.open(&sealed, &ctx("c")).await.is_ok());
    }
}

/// A provider call cancelled by the caller's timeout is still an access the
/// provider may have performed (a KMS `GenerateDataKey` or `Decrypt` that
/// completed server-side, an HSM unwrap on a blocking thread): the audit
/// trail must show it, as DESIGN.md requires an event for "every generate,
/// wrap, unwrap ... and provider failure". Found by this test (the keyring
/// used to record only after the provider's future completed, so a cancelled
/// call left no trace); now recorded as `failed:cancelled`.
#[tokio::test]
async fn a_cancelled_provider_call_is_recorded() {
    let inner = Arc::new(MemoryKms::new("vault-slow"));
    let key = inner.add_key("records");
    let slow = Faulty::new(inner.clone());
    let sink = Arc::new(MemorySink::new());
    let env = Envelope::new(
        Keyring::builder()
            .provider(slow.clone())
            .recipient(key)
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    );
    let sealed = env.seal(b"x", &ctx("1")).await.unwrap();
    sink.take();
    slow.set(Fault::Delay(Duration::from_secs(30)));
    let _ = tokio::time::timeout(Duration::from_millis(100), env.seal(b"x", &ctx("1"))).await;
    let _ = tokio::time::timeout(Duration::from_millis(100), env.open(&sealed, &ctx("1"))).await;
    assert_eq!(
        slow.started.load(Ordering::SeqCst),
        3,
        "both calls reached the provider"
    );
    let events = sink.events();
    for op in [Operation::Generate, Operation::Unwrap] {
        assert!(
            events
                .iter()
                .any(|e| e.operation == op && e.outcome == Outcome::Failed("cancelled".into())),
            "a {op} call that reached the provider and was cancelled left no event (events: {events:?})"
        );
    }
}

// ---------------------------------------------------------------------------
// Write errors and a full disk.
// ---------------------------------------------------------------------------

/// A writer that accepts `limit` bytes, then fails every write (or, with
/// `zero`, reports writing nothing). `Interrupted` errors are injected
/// every `interrupt_every` calls when set.
#[derive(Debug)]
struct FailAfter<W> {
    inner: W,
    limit: u64,
    written: Arc<AtomicU64>,
    zero: bool,
    calls: u64,
    interrupt_every: u64,
    fail_flush: bool,
}

impl<W: Write> FailAfter<W> {
    fn new(inner: W, limit: u64) -> Self {
        FailAfter {
            inner,
            limit,
            written: Arc::new(AtomicU64::new(0)),
            zero: false,
            calls: 0,
            interrupt_every: 0,
            fail_flush: false,
        }
    }
}

impl<W: Write> Write for FailAfter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.interrupt_every > 0 && self.calls.is_multiple_of(self.interrupt_every) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "signal"));
        }
        let done = self.written.load(Ordering::SeqCst);
        if done >= self.limit {
            if self.zero {
                return Ok(0);
            }
            return Err(io::Error::other(format!(
                "injected write failure after {done} bytes"
            )));
        }
        let n = buf.len().min((self.limit - done) as usize);
        let n = self.inner.write(&buf[..n])?;
        self.written.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.fail_flush {
            return Err(io::Error::other("injected flush failure"));
        }
        self.inner.flush()
    }
}

async fn local_env(dir: &Path) -> (Envelope, PathBuf) {
    let path = dir.join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let key: KeyRef = "local:backups".parse().unwrap();
    store.add_key(&key).unwrap();
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(store))
            .recipient(key)
            .build()
            .unwrap(),
    )
    .as_caller("backup", "nightly");
    (env, path)
}

/// A write error at any point of a stream (inside the header, the body
/// prefix, a chunk, exactly at a chunk boundary, the final chunk, the final
/// flush) is returned with its original kind and message; the encryptor then
/// refuses every further write and `finish`; and whatever reached the output
/// never decrypts. Retried `Interrupted` errors are not failures.
#[tokio::test]
async fn write_errors_mid_stream_are_clear_and_final() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = local_env(dir.path()).await;
    let pt = bytes(3 * 16384 + 700, 5);
    let header_len = {
        let mut w = env.encryptor(Vec::new(), &ctx("w")).await.unwrap();
        w.write_all(&pt).unwrap();
        let m = w.finish().unwrap();
        phi_envelope::Header::parse(&m).unwrap().1
    };
    let body = header_len as u64 + 56;
    let chunk = 16384 + 16;
    let cuts = [
        0,
        10,
        header_len as u64 - 1,
        header_len as u64,
        body - 1,
        body,
        body + 100,
        body + chunk - 1,
        body + chunk,
        body + 3 * chunk,
        body + 3 * chunk + 10,
    ];
    for cut in cuts {
        let mut sink = Vec::new();
        let w = FailAfter::new(&mut sink, cut);
        let mut enc = match env.encryptor(w, &ctx("w")).await {
            Ok(enc) => enc,
            Err(e) => {
                assert!(
                    cut < body,
                    "the encryptor failed to start with {cut} bytes allowed"
                );
                assert!(
                    matches!(&e, Error::Io(io) if io.to_string().contains("injected")),
                    "{e:?}"
                );
                continue;
            }
        };
        let mut failed = None;
        for piece in pt.chunks(5000) {
            if let Err(e) = enc.write_all(piece) {
                failed = Some(e);
                break;
            }
        }
        match failed {
            Some(e) => {
                assert!(
                    e.to_string().contains("injected write failure"),
                    "cut {cut}: {e}"
                );
                let again = enc.write(b"more").unwrap_err();
                assert!(again.to_string().contains("earlier"), "cut {cut}: {again}");
                assert!(
                    enc.finish().is_err(),
                    "cut {cut}: finish after a failed write"
                );
            }
            None => {
                let e = enc.finish().unwrap_err();
                assert!(
                    e.to_string().contains("injected write failure"),
                    "cut {cut}: {e}"
                );
            }
        }
        assert!(
            env.open(&sink, &ctx("w")).await.is_err(),
            "cut {cut}: a failed stream decrypts"
        );
    }

    // The final flush fails: finish reports it.
    let mut w = FailAfter::new(Vec::new(), u64::MAX);
    w.fail_flush = true;
    let mut enc = env.encryptor(w, &ctx("w")).await.unwrap();
    enc.write_all(&pt).unwrap_or(());
    assert!(enc.finish().unwrap_err().to_string().contains("flush"));

    // A writer that stops accepting bytes: WriteZero, not a hang.
    let mut w = FailAfter::new(Vec::new(), body + 10);
    w.zero = true;
    let mut enc = env.encryptor(w, &ctx("w")).await.unwrap();
    let e = enc.write_all(&pt).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WriteZero);

    // Interrupted writes are retried: the stream is whole.
    let mut out = Vec::new();
    let mut w = FailAfter::new(&mut out, u64::MAX);
    w.interrupt_every = 2;
    let mut enc = env.encryptor(w, &ctx("w")).await.unwrap();
    enc.write_all(&pt).unwrap();
    enc.finish().unwrap();
    assert_eq!(env.open(&out, &ctx("w")).await.unwrap(), pt);
}

/// `/dev/full` (every write fails with ENOSPC): starting the stream fails
/// with the operating system's "no space" error, kind `StorageFull`.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn dev_full_gives_a_storage_full_error() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = local_env(dir.path()).await;
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let e = env.encryptor(full, &ctx("f")).await.unwrap_err();
    match &e {
        Error::Io(io) => assert_eq!(io.kind(), io::ErrorKind::StorageFull, "{io}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    // Buffered in front of /dev/full: the failure surfaces at a chunk write
    // or at finish, never as success.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut enc = env
        .encryptor(io::BufWriter::with_capacity(1 << 20, full), &ctx("f"))
        .await
        .unwrap();
    let res = enc.write_all(&bytes(100_000, 3)).map_err(Error::from);
    let res = res.and_then(|()| enc.finish().map(|_| ()));
    let e = res.expect_err("a stream into /dev/full succeeded");
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::StorageFull),
        "{e:?}"
    );
}

/// Atomic output and a write error mid-stream: the application drops the
/// encryptor and the `AtomicFile` without committing; nothing exists under
/// the final name and the temporary file is gone.
#[tokio::test]
async fn write_error_into_atomic_file_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = local_env(dir.path()).await;
    let target = dir.path().join("export.phi");
    for cut in [100u64, 20_000, 70_000] {
        let file = AtomicFile::create(&target, false).unwrap();
        let temp = file.temp_path().to_path_buf();
        assert!(temp.exists(), "the temporary file is written to");
        // Below the header's length the failure comes from starting the
        // stream; then from a chunk write.
        let enc = match env.encryptor(FailAfter::new(file, cut), &ctx("a")).await {
            Ok(mut enc) => {
                assert!(enc.write_all(&bytes(200_000, 7)).is_err(), "cut {cut}");
                assert!(
                    !target.exists(),
                    "cut {cut}: output under the final name before commit"
                );
                Some(enc)
            }
            Err(e) => {
                assert!(e.to_string().contains("injected"), "cut {cut}: {e}");
                None
            }
        };
        drop(enc);
        assert!(!target.exists(), "cut {cut}: output under the final name");
        assert!(
            !temp.exists(),
            "cut {cut}: the temporary file was left behind"
        );
    }
    assert!(
        temps_of(dir.path(), "export.phi").is_empty(),
        "a temporary file was left behind"
    );
}

// ---------------------------------------------------------------------------
// A thousand tasks.
// ---------------------------------------------------------------------------

/// 1000 concurrent tasks seal records to two providers at once (MemoryKms
/// and a second MemoryKms: multi-recipient) and open them again, some as
/// streams, on a multi-threaded runtime. Nothing is lost: every record
/// opens to its own plaintext through either provider alone, no two
/// messages share a header, and the event count is exact (one generate and
/// one wrap per seal, one unwrap per uncached open).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tasks_across_two_providers_lose_nothing() {
    const TASKS: usize = 1000;
    let a = Arc::new(MemoryKms::new("vault-a"));
    let b = Arc::new(MemoryKms::new("vault-b"));
    let (ka, kb) = (a.add_key("records"), b.add_key("dr"));
    let sink = Arc::new(MemorySink::new());
    let both = Envelope::new(
        Keyring::builder()
            .provider(a.clone())
            .provider(b.clone())
            .recipient(ka)
            .recipient(kb)
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    );
    let only_a = Envelope::new(Keyring::builder().provider(a.clone()).build().unwrap());
    let only_b = Envelope::new(Keyring::builder().provider(b.clone()).build().unwrap());

    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let (both, start) = (both.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let c = ctx(&format!("task-{t}"));
            let pt = bytes(1 + (t * 37) % 3000, t as u64);
            let sealed = if t % 10 == 0 {
                let mut w = both.encryptor(Vec::new(), &c).await.unwrap();
                w.write_all(&pt).unwrap();
                w.finish().unwrap()
            } else {
                both.seal(&pt, &c).await.unwrap()
            };
            let opened = if t % 10 == 5 {
                let mut r = both.decryptor(Cursor::new(&sealed), &c).await.unwrap();
                let mut out = Vec::new();
                r.read_to_end(&mut out).unwrap();
                out
            } else {
                both.open(&sealed, &c).await.unwrap()
            };
            assert_eq!(opened, pt, "task {t}");
            (t, pt, sealed)
        }));
    }
    let mut results = Vec::with_capacity(TASKS);
    for task in tasks {
        results.push(task.await.expect("a task panicked"));
    }
    assert_eq!(results.len(), TASKS);

    let mut headers = std::collections::HashSet::new();
    for (t, pt, sealed) in &results {
        let (h, _) = phi_envelope::Header::parse(sealed).unwrap();
        assert_eq!(h.recipients().len(), 2);
        assert!(
            headers.insert(h.as_bytes().to_vec()),
            "task {t}: a header repeats"
        );
        let c = ctx(&format!("task-{t}"));
        assert_eq!(
            &only_a.open(sealed, &c).await.unwrap(),
            pt,
            "task {t} via A"
        );
        assert_eq!(
            &only_b.open(sealed, &c).await.unwrap(),
            pt,
            "task {t} via B"
        );
    }
    let events = sink.events();
    let count = |op: Operation| {
        events
            .iter()
            .filter(|e| e.operation == op && e.outcome == Outcome::Success)
            .count()
    };
    assert_eq!(count(Operation::Generate), TASKS, "generate events");
    assert_eq!(count(Operation::Wrap), TASKS, "wrap events");
    assert_eq!(count(Operation::Unwrap), TASKS, "unwrap events");
    assert_eq!(events.len(), 3 * TASKS, "no other event, none lost");
}

/// The same thousand tasks with the data-key cache on and one shared
/// context: concurrent misses coalesce, every record still opens, and the
/// cache's counters add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tasks_through_the_cache_lose_nothing() {
    use phi_envelope::cache::{CacheConfig, CacheLimits};
    const TASKS: usize = 1000;
    let a = Arc::new(MemoryKms::new("vault-a"));
    let b = Arc::new(MemoryKms::new("vault-b"));
    let (ka, kb) = (a.add_key("records"), b.add_key("dr"));
    let env = Envelope::new(
        Keyring::builder()
            .provider(a.clone())
            .provider(b.clone())
            .recipient(ka)
            .recipient(kb)
            .data_key_cache(
                CacheConfig::new()
                    .encrypt(CacheLimits::new(Duration::from_secs(600), 100, 1 << 30))
                    .decrypt(CacheLimits::new(Duration::from_secs(600), 100, 1 << 30)),
            )
            .build()
            .unwrap(),
    );
    let c = ctx("shared");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (env, c) = (env.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let pt = bytes(10 + t % 500, t as u64);
            let sealed = env.seal(&pt, &c).await.unwrap();
            assert_eq!(env.open(&sealed, &c).await.unwrap(), pt);
            sealed
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("a task panicked"));
    }
    let fresh = Envelope::new(
        Keyring::builder()
            .provider(a.clone())
            .provider(b.clone())
            .build()
            .unwrap(),
    );
    for (t, sealed) in all.iter().enumerate() {
        assert_eq!(
            fresh.open(sealed, &c).await.unwrap(),
            bytes(10 + t % 500, t as u64)
        );
    }
    let stats = env.keyring().cache_stats();
    assert_eq!(
        stats.encrypt_hits + stats.encrypt_misses,
        TASKS as u64,
        "{stats:?}"
    );
    assert!(stats.encrypt_misses >= (TASKS / 100) as u64, "{stats:?}");
}

// ---------------------------------------------------------------------------
// Killed processes and a full disk, in a child process.
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "PHI_FAULT_INJECTION_CHILD";
const CHILD_TEST: &str = "atomic_stream_output_appears_only_on_commit";

/// What the child does, from `PHI_FAULT_INJECTION_CHILD=MODE|KEYSTORE|TARGET`.
fn child_main(spec: &str) {
    let mut parts = spec.splitn(3, '|');
    let (mode, keystore, target) = (
        parts.next().unwrap(),
        PathBuf::from(parts.next().unwrap()),
        PathBuf::from(parts.next().unwrap()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = LocalKeystore::open_unprotected_for_tests(&keystore).unwrap();
    let key: KeyRef = "local:backups".parse().unwrap();
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(store))
            .recipient(key)
            .build()
            .unwrap(),
    );
    let file = AtomicFile::create(&target, false).unwrap();
    let temp = file.temp_path().to_path_buf();
    let mut enc = rt.block_on(env.encryptor(file, &ctx("big"))).unwrap();
    let piece = bytes(1 << 20, 9);
    match mode {
        // Encrypt "forever" (capped at 512 MiB) and wait to be killed.
        "kill" => {
            for _ in 0..512 {
                enc.write_all(&piece).unwrap();
            }
            std::thread::sleep(Duration::from_secs(600));
            panic!("the child was not killed");
        }
        // Under `ulimit -f`: the write fails with EFBIG; dropping the
        // encryptor and the AtomicFile must leave nothing behind.
        "full" => {
            let e = (0..64)
                .find_map(|_| enc.write_all(&piece).err())
                .expect("no write failed under ulimit -f");
            assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
            drop(enc);
            assert!(!target.exists(), "output under the final name");
            assert!(!temp.exists(), "the temporary file was left behind");
            println!("CHILD-OK");
        }
        other => panic!("unknown child mode {other}"),
    }
}

/// In a child process (`PHI_FAULT_INJECTION_CHILD` set): the work of the
/// two tests below. Otherwise an ordinary test of the same path: a stream
/// into an `AtomicFile` is invisible under the final name until `finish`
/// and `commit`, then decrypts.
#[tokio::test]
async fn atomic_stream_output_appears_only_on_commit() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        // Leave the async context: the child builds its own runtime.
        std::thread::spawn(move || child_main(&spec))
            .join()
            .unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = local_env(dir.path()).await;
    let target = dir.path().join("backup.phi");
    let file = AtomicFile::create(&target, false).unwrap();
    let mut enc = env.encryptor(file, &ctx("big")).await.unwrap();
    enc.write_all(&bytes(300_000, 9)).unwrap();
    assert!(!target.exists());
    let file = enc.finish().unwrap();
    assert!(!target.exists(), "visible before commit");
    file.commit().unwrap();
    let sealed = std::fs::read(&target).unwrap();
    assert_eq!(
        env.open(&sealed, &ctx("big")).await.unwrap(),
        bytes(300_000, 9)
    );
}

fn temps_of(dir: &Path, name: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(&format!(".{name}.")) && n.ends_with(".tmp")
        })
        .collect()
}

fn child_command(spec: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null());
    c
}

/// A process SIGKILLed while encrypting a large stream into an
/// `AtomicFile`: nothing exists under the final name. The temporary file
/// (`.NAME.<random>.tmp`, mode 0600, beside the target) remains, because
/// SIGKILL runs no destructor; it holds only ciphertext and does not
/// decrypt (it has no final chunk). The keystore is intact: it opens and
/// still opens a record sealed before. A new write to the same target
/// works and is not disturbed by the stale temporary file.
#[tokio::test]
async fn a_process_killed_while_encrypting_leaves_nothing_under_the_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let (env, keystore) = local_env(dir.path()).await;
    let before = env
        .seal(b"sealed before the crash", &ctx("b"))
        .await
        .unwrap();
    let target = dir.path().join("backup.phi");

    let mut child = child_command(&format!("kill|{}|{}", keystore.display(), target.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the child is well into the stream.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let big = temps_of(dir.path(), "backup.phi")
            .iter()
            .any(|t| std::fs::metadata(t).is_ok_and(|m| m.len() >= 8 << 20));
        if big {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the child exited early ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "the child wrote nothing in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
    }
    assert!(!status.success());

    assert!(
        !target.exists(),
        "a killed encryption left a file under the final name"
    );
    let temps = temps_of(dir.path(), "backup.phi");
    assert_eq!(
        temps.len(),
        1,
        "the killed writer's temporary file: {temps:?}"
    );
    let partial = File::open(&temps[0]).unwrap();
    let mut released = Vec::new();
    let outcome = match env.decryptor(partial, &ctx("big")).await {
        Ok(mut r) => r
            .read_to_end(&mut released)
            .map(|_| ())
            .map_err(Error::from),
        Err(e) => Err(e),
    };
    // What was released before the failure is the plaintext the child
    // wrote, whole chunks of it.
    let piece = bytes(1 << 20, 9);
    assert_eq!(released.len() % 16384, 0);
    for (i, b) in released.iter().enumerate() {
        assert_eq!(
            *b,
            piece[i % piece.len()],
            "released byte {i} is not plaintext"
        );
    }
    // Cut at a chunk boundary it is truncated; cut inside a chunk, the
    // partial chunk reads as a final chunk whose tag fails: TruncatedChunk
    // after full chunks authenticated, Decrypt when it is chunk 0
    // (FORMAT.md 7.4).
    assert!(
        matches!(
            outcome,
            Err(Error::Truncated | Error::TruncatedChunk | Error::Decrypt)
        ),
        "the partial file must not decrypt: {outcome:?}"
    );

    // The keystore is intact.
    let store = LocalKeystore::open_unprotected_for_tests(&keystore).unwrap();
    let reopened = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(store))
            .build()
            .unwrap(),
    );
    assert_eq!(
        reopened.open(&before, &ctx("b")).await.unwrap(),
        b"sealed before the crash"
    );
    // The target can be written again.
    let mut file = AtomicFile::create(&target, false).unwrap();
    file.write_all(b"next run").unwrap();
    file.commit().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"next run");
}

/// The disk fills up mid-stream (simulated with `ulimit -f`, which makes
/// the kernel refuse writes past 1 MiB with EFBIG, in a child process):
/// the write fails with `FileTooLarge`, and once the application drops the
/// encryptor, nothing exists under the final name and no temporary file is
/// left.
#[cfg(unix)]
#[tokio::test]
async fn a_full_disk_mid_stream_leaves_nothing_under_the_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_env, keystore) = local_env(dir.path()).await;
    let target = dir.path().join("backup.phi");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        // SIGXFSZ would kill the child: ignore it (kept across exec), so
        // the write returns EFBIG instead. 2048 blocks is 1 or 2 MiB
        // depending on the shell's block size.
        .arg("trap '' XFSZ; ulimit -f 2048 && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!("full|{}|{}", keystore.display(), target.display()),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists());
    assert!(temps_of(dir.path(), "backup.phi").is_empty());
    assert!(LocalKeystore::open_unprotected_for_tests(&keystore).is_ok());
}
