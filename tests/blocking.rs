//! The blocking facade without a runtime (the local keystore), and its
//! refusals: a keyring whose providers need a runtime, a `current_thread`
//! runtime's handle, a call from inside a tokio runtime. The facade with a
//! runtime handle on a provider that needs one is tested on the KMS
//! endpoint (tests/aws_kms.rs, `blocking_facade_with_a_runtime_handle`).

#![cfg(feature = "local")]

use std::io::{Read, Write};
use std::sync::Arc;

use phi_envelope::blocking::BlockingEnvelope;
use phi_envelope::cache::{CacheConfig, CacheLimits};
use phi_envelope::file::FileOptions;
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::{BoxFuture, KeyInfo, Unwrapped};
use phi_envelope::{
    Dek, EncryptionContext, Envelope, Error, KeyProvider, KeyRef, Keyring, WrappedKey,
};

fn local_envelope(dir: &std::path::Path, cache: bool) -> (Envelope, KeyRef, Arc<LocalKeystore>) {
    let store =
        Arc::new(LocalKeystore::create_unprotected_for_tests(dir.join("keys.json")).unwrap());
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let mut builder = Keyring::builder()
        .provider(store.clone())
        .recipient(key.clone());
    if cache {
        builder = builder.data_key_cache(
            CacheConfig::new()
                .encrypt(CacheLimits::default())
                .decrypt(CacheLimits::default()),
        );
    }
    let env = Envelope::new(builder.build().unwrap()).as_caller("batch", "nightly");
    (env, key, store)
}

/// The output of a future that is ready on its first poll, which is what
/// `needs_runtime() == false` promises for the local keystore's futures.
fn first_poll<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a local keystore future was pending"),
    }
}

fn ctx(tenant: &str) -> EncryptionContext {
    EncryptionContext::new().with("tenant", tenant).unwrap()
}

/// No runtime exists anywhere in this test: records, associated data,
/// streams, files and rewrap through the local keystore.
#[test]
fn every_operation_without_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (env, key, store) = local_envelope(dir.path(), false);
    let facade = BlockingEnvelope::new(env).unwrap();
    let c = ctx("st-mary");

    let sealed = facade.seal(b"potassium 4.1 mmol/L", &c).unwrap();
    assert_eq!(facade.open(&sealed, &c).unwrap(), b"potassium 4.1 mmol/L");
    assert!(facade
        .open(&sealed, &ctx("st-john"))
        .unwrap_err()
        .is_decrypt());

    let bound = facade.seal_with(b"sodium 140", &c, b"record 42").unwrap();
    assert_eq!(
        facade.open_with(&bound, &c, b"record 42").unwrap(),
        b"sodium 140"
    );
    assert!(facade
        .open_with(&bound, &c, b"record 43")
        .unwrap_err()
        .is_decrypt());
    assert!(facade.open(&bound, &c).unwrap_err().is_decrypt());

    // Streams: one byte over a chunk, with associated data.
    let plain: Vec<u8> = (0..16 * 1024 + 1).map(|i| i as u8).collect();
    let mut stream = Vec::new();
    let mut w = facade.encryptor_with(&mut stream, &c, b"export 9").unwrap();
    w.write_all(&plain).unwrap();
    w.finish().unwrap();
    let mut back = Vec::new();
    facade
        .decryptor_with(&stream[..], &c, b"export 9")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, plain);
    let mut seekable = facade
        .seekable_decryptor_with(std::io::Cursor::new(&stream), &c, b"export 9")
        .unwrap();
    let mut all = Vec::new();
    seekable.read_to_end(&mut all).unwrap();
    assert_eq!(all, plain);

    // Files, on two threads.
    let (input, sealed_file, restored) = (
        dir.path().join("plain"),
        dir.path().join("sealed"),
        dir.path().join("restored"),
    );
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&input, &big).unwrap();
    let opts = FileOptions::new().threads(2);
    facade
        .encrypt_file(&input, &sealed_file, &c, &opts)
        .unwrap();
    facade
        .decrypt_file(&sealed_file, &restored, &c, &opts)
        .unwrap();
    assert_eq!(std::fs::read(&restored).unwrap(), big);

    // Rewrap after a rotation: records, a batch, a file.
    assert!(!store.needs_runtime());
    first_poll(store.rotate(&key)).unwrap();
    let rewrapped = facade.rewrap(&sealed, &c).unwrap();
    assert_eq!(
        facade.open(&rewrapped, &c).unwrap(),
        b"potassium 4.1 mmol/L"
    );
    let batch = facade
        .rewrap_batch(&[(&sealed[..], &c), (&rewrapped[..], &c)])
        .unwrap();
    assert!(batch[0].is_rewrapped() && batch[1].is_unchanged());
    let report = facade.rewrap_file(&sealed_file, &c).unwrap();
    assert!(report.changed);
    facade
        .decrypt_file(&sealed_file, &restored, &c, &opts.clone().overwrite(true))
        .unwrap();
    assert_eq!(std::fs::read(&restored).unwrap(), big);
}

/// Through the data-key cache, from several threads at once: a miss that
/// another thread is serving leaves the waiter `Pending`, and the facade
/// parks it until the leader wakes it (it neither spins nor hangs).
#[test]
fn cache_waiters_park_and_are_woken() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _, _) = local_envelope(dir.path(), true);
    let facade = BlockingEnvelope::new(env.clone()).unwrap();
    let c = ctx("st-mary");
    let sealed: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (facade, c) = (&facade, &c);
                s.spawn(move || {
                    (0..50)
                        .map(|j| {
                            facade
                                .seal_with(b"row", c, format!("{i}/{j}").as_bytes())
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(sealed.len(), 400);
    // One generate for all 400 records: every thread waited for the one
    // that missed, or hit.
    assert_eq!(env.keyring().provider_calls(), 1);
    assert_eq!(facade.open_with(&sealed[399], &c, b"7/49").unwrap(), b"row");
}

/// A provider that keeps the default `needs_runtime` (true), as one written
/// outside the crate does.
#[derive(Debug)]
struct NetworkLike;

impl KeyProvider for NetworkLike {
    fn id(&self) -> &str {
        "net"
    }
    fn wrap<'a>(
        &'a self,
        _: &'a KeyRef,
        _: &'a Dek,
        _: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<WrappedKey>> {
        Box::pin(std::future::pending())
    }
    fn unwrap<'a>(
        &'a self,
        _: &'a WrappedKey,
        _: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Unwrapped>> {
        Box::pin(std::future::pending())
    }
    fn describe<'a>(&'a self, _: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        Box::pin(std::future::pending())
    }
}

#[test]
fn a_provider_that_may_need_a_runtime_is_refused_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let (local, key, store) = local_envelope(dir.path(), false);
    assert!(BlockingEnvelope::new(local).is_ok());
    // The same local keystore beside one provider that may need a runtime:
    // refused at construction, before anything could wait forever.
    let keyring = Keyring::builder()
        .provider(store)
        .provider(Arc::new(NetworkLike))
        .recipient(key)
        .build()
        .unwrap();
    let err = BlockingEnvelope::new(Envelope::new(keyring)).unwrap_err();
    assert!(matches!(err, Error::Blocking(_)), "{err}");
    assert!(err.to_string().contains("with_runtime"), "{err}");
}

#[test]
#[cfg(any(
    feature = "tokio",
    feature = "aws-kms",
    feature = "pkcs11",
    feature = "vault"
))]
fn a_current_thread_runtime_handle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _, _) = local_envelope(dir.path(), false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = BlockingEnvelope::with_runtime(env, rt.handle().clone()).unwrap_err();
    assert!(matches!(err, Error::Blocking(_)), "{err}");
    assert!(err.to_string().contains("current_thread"), "{err}");
}

/// From inside a tokio runtime, on a worker or in its `block_on`, every
/// call is refused with a clear error, whichever executor the facade has,
/// and no key is used.
#[test]
#[cfg(any(
    feature = "tokio",
    feature = "aws-kms",
    feature = "pkcs11",
    feature = "vault"
))]
fn a_call_from_inside_a_runtime_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _, _) = local_envelope(dir.path(), false);
    let c = ctx("st-mary");
    let parked = BlockingEnvelope::new(env.clone()).unwrap();
    let sealed = parked.seal(b"x", &c).unwrap();
    let calls = env.keyring().provider_calls();

    let current = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let err = current
        .block_on(async { parked.seal(b"x", &c) })
        .unwrap_err();
    assert!(matches!(err, Error::Blocking(_)), "{err}");
    assert!(err.to_string().contains("inside a tokio runtime"), "{err}");

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let handled = BlockingEnvelope::with_runtime(env.clone(), multi.handle().clone()).unwrap();
    for facade in [parked, handled] {
        let (sealed, c) = (sealed.clone(), c.clone());
        let err = multi
            .block_on(multi.spawn(async move { facade.open(&sealed, &c) }))
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::Blocking(_)), "{err}");
    }
    assert_eq!(env.keyring().provider_calls(), calls);
}

/// The recovery recipient needs no runtime either: a keyring of the local
/// keystore and a recovery public key seals without one, and the restored
/// private key opens without one.
#[test]
#[cfg(feature = "recovery")]
fn the_recovery_recipient_needs_no_runtime() {
    use phi_envelope::provider::recovery::{RecoveryPrivateKey, RecoveryProvider};

    let dir = tempfile::tempdir().unwrap();
    let (_, key, store) = local_envelope(dir.path(), false);
    let recovery = RecoveryPrivateKey::generate().unwrap();
    let public = recovery.public_key().clone();
    let sealing = BlockingEnvelope::new(Envelope::new(
        Keyring::builder()
            .provider(store)
            .provider(Arc::new(
                RecoveryProvider::new().with_public_key(public.clone()),
            ))
            .recipient(key)
            .recipient(public.key_ref())
            .build()
            .unwrap(),
    ))
    .unwrap();
    let c = ctx("st-mary");
    let sealed = sealing.seal(b"PHI", &c).unwrap();
    let opening = BlockingEnvelope::new(Envelope::new(
        Keyring::builder()
            .provider(Arc::new(RecoveryProvider::new().with_private_key(recovery)))
            .build()
            .unwrap(),
    ))
    .unwrap();
    assert_eq!(opening.open(&sealed, &c).unwrap(), b"PHI");
}
