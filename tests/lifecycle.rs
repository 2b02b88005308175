//! Key lifecycle through the keyring: rotate, decrypt old versions, the
//! minimum decryption version, cryptoperiods (refuse and rotate-first),
//! failed rotations, disable, destroy (crypto-shredding), and the events
//! each one leaves. Every case that needs only lifecycle verbs runs against
//! the in-memory user-style provider and the local keystore; cases that need
//! fault injection (a failing rotation, a back-dated version) run against
//! the in-memory provider.

mod conformance;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use conformance::{ctx, MemoryKms};
use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::keyring::{KeyPolicy, KeyringBuilder, OnExpired};
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::{
    BoxFuture, KeyInfo, KeyProvider, KeyState, KeyVersionInfo, ProviderErrorKind, Unwrapped,
};
use phi_envelope::{Caller, EncryptionContext, Envelope, Error, KeyRef, Keyring};

/// A provider under test with one key, `key`, at version 1.
struct Fixture {
    provider: Arc<dyn KeyProvider>,
    key: KeyRef,
    /// The in-memory provider's knobs, when that is the provider.
    memory: Option<Arc<MemoryKms>>,
    _dir: Option<tempfile::TempDir>,
}

fn memory_fixture() -> Fixture {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    Fixture {
        provider: kms.clone(),
        key,
        memory: Some(kms),
        _dir: None,
    }
}

fn local_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    Fixture {
        provider: Arc::new(store),
        key,
        memory: None,
        _dir: Some(dir),
    }
}

impl Fixture {
    fn builder(&self) -> KeyringBuilder {
        Keyring::builder()
            .provider(self.provider.clone())
            .recipient(self.key.clone())
    }

    fn envelope(&self, builder: KeyringBuilder) -> Envelope {
        Envelope::new(builder.build().unwrap()).as_caller("lab-service", "store-result")
    }

    fn memory(&self) -> &MemoryKms {
        self.memory.as_deref().expect("an in-memory provider case")
    }
}

fn operator() -> Caller {
    Caller::new("alice", "key-management")
}

fn version_of(message: &[u8]) -> u32 {
    phi_envelope::envelope::inspect(message)
        .unwrap()
        .header
        .recipients()[0]
        .key_version
}

fn provider_kind(e: &Error) -> Option<ProviderErrorKind> {
    match e {
        Error::Provider(p) => Some(p.kind()),
        _ => None,
    }
}

/// Runs each case against the in-memory provider and the local keystore.
macro_rules! both_providers {
    ($($case:ident),* $(,)?) => {
        mod memory_provider {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::memory_fixture()).await
                }
            )*
        }
        mod local_keystore {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::local_fixture()).await
                }
            )*
        }
    };
}

both_providers!(
    rotate_keeps_old_versions_decryptable,
    min_decrypt_version_refuses_before_any_provider_call,
    cryptoperiod_refuses_an_expired_primary,
    cryptoperiod_rotates_first_when_configured,
    disable_blocks_decryption_reversibly,
    destroy_shreds_one_version_only,
    destroy_is_not_served_from_the_decryption_cache,
    set_state_cannot_destroy,
    lifecycle_verbs_leave_events,
    rotation_flushes_the_encryption_cache,
);

async fn rotate_keeps_old_versions_decryptable(f: Fixture) {
    let env = f.envelope(f.builder());
    let c = ctx("1");
    let v1 = env.seal(b"under v1", &c).await.unwrap();
    let info = env.keyring().rotate(&f.key, &operator()).await.unwrap();
    assert_eq!(info.primary_version, Some(2));
    assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    assert_eq!(info.version(2).unwrap().state, KeyState::Enabled);
    let v2 = env.seal(b"under v2", &c).await.unwrap();
    assert_eq!((version_of(&v1), version_of(&v2)), (1, 2));
    assert_eq!(env.open(&v1, &c).await.unwrap(), b"under v1");
    assert_eq!(env.open(&v2, &c).await.unwrap(), b"under v2");

    // A second rotation: two decrypt-only versions, both still open.
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let v3 = env.seal(b"under v3", &c).await.unwrap();
    assert_eq!(version_of(&v3), 3);
    for (m, pt) in [
        (&v1, &b"under v1"[..]),
        (&v2, b"under v2"),
        (&v3, b"under v3"),
    ] {
        assert_eq!(env.open(m, &c).await.unwrap(), pt);
    }
    let info = env.keyring().describe(&f.key, &operator()).await.unwrap();
    let states: Vec<_> = info.versions.iter().map(|v| v.state).collect();
    assert_eq!(
        states,
        [
            KeyState::DecryptOnly,
            KeyState::DecryptOnly,
            KeyState::Enabled
        ]
    );
}

async fn min_decrypt_version_refuses_before_any_provider_call(f: Fixture) {
    let writer = f.envelope(f.builder());
    let c = ctx("1");
    let v1 = writer.seal(b"old", &c).await.unwrap();
    writer.keyring().rotate(&f.key, &operator()).await.unwrap();
    let v2 = writer.seal(b"new", &c).await.unwrap();

    let sink = Arc::new(MemorySink::new());
    let reader = f.envelope(
        f.builder()
            .event_sink(sink.clone())
            .key_policy(f.key.clone(), KeyPolicy::new().min_decrypt_version(2)),
    );
    let memory_calls = f.memory.as_ref().map(|m| m.calls.load(Ordering::SeqCst));
    let e = reader.open(&v1, &c).await.unwrap_err();
    match &e {
        Error::KeyLifecycle(m) => {
            assert!(m.contains("below the minimum decryption version 2"), "{m}");
            assert!(m.contains("version 1"), "{m}");
        }
        other => panic!("expected KeyLifecycle, got {other:?}"),
    }
    assert_eq!(reader.keyring().provider_calls(), 0, "no provider call");
    if let (Some(m), Some(before)) = (&f.memory, memory_calls) {
        assert_eq!(m.calls.load(Ordering::SeqCst), before);
    }
    let events = sink.take();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].operation, Operation::Unwrap);
    assert_eq!(events[0].key_version, Some(1));
    assert_eq!(events[0].outcome, Outcome::Failed("key-lifecycle".into()));
    assert_eq!(events[0].actor.as_deref(), Some("lab-service"));

    // Streams and rewraps are refused the same way.
    assert!(matches!(
        reader.decryptor(&v1[..], &c).await.unwrap_err(),
        Error::KeyLifecycle(_)
    ));
    assert!(matches!(
        reader.rewrap(&v1, &c).await.unwrap_err(),
        Error::KeyLifecycle(_)
    ));
    // The current version opens.
    assert_eq!(reader.open(&v2, &c).await.unwrap(), b"new");
}

async fn cryptoperiod_refuses_an_expired_primary(f: Fixture) {
    let c = ctx("1");
    let old = f.envelope(f.builder()).seal(b"before", &c).await.unwrap();
    // The memory provider's version 1 is back-dated past a one-day period;
    // the local keystore's (created now) is past a zero period.
    let period = match &f.memory {
        Some(m) => {
            m.backdate("records", 1, Duration::from_secs(2 * 86_400));
            Duration::from_secs(86_400)
        }
        None => Duration::ZERO,
    };
    let sink = Arc::new(MemorySink::new());
    let env = f.envelope(
        f.builder()
            .event_sink(sink.clone())
            .key_policy(f.key.clone(), KeyPolicy::new().cryptoperiod(period)),
    );
    let e = env.seal(b"x", &c).await.unwrap_err();
    match &e {
        Error::KeyLifecycle(m) => {
            assert!(m.contains("past its cryptoperiod"), "{m}");
            assert!(m.contains("rotate"), "{m}");
        }
        other => panic!("expected KeyLifecycle, got {other:?}"),
    }
    // Streams are refused too, and nothing was generated.
    assert!(matches!(
        env.encryptor(Vec::new(), &c).await.unwrap_err(),
        Error::KeyLifecycle(_)
    ));
    let events = sink.events();
    assert!(!events
        .iter()
        .any(|e| e.operation == Operation::Generate && e.outcome == Outcome::Success));
    assert!(events.iter().any(|e| e.operation == Operation::Generate
        && e.outcome == Outcome::Failed("key-lifecycle".into())
        && e.key_version == Some(1)));
    // Decryption is not affected by the cryptoperiod.
    assert_eq!(env.open(&old, &c).await.unwrap(), b"before");
    // After a rotation encryption resumes (for the memory provider the new
    // version is fresh; for the zero period it is served once, uncached).
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    if f.memory.is_some() {
        let m = env.seal(b"after", &c).await.unwrap();
        assert_eq!(version_of(&m), 2);
        assert_eq!(env.open(&m, &c).await.unwrap(), b"after");
    }
}

async fn cryptoperiod_rotates_first_when_configured(f: Fixture) {
    let c = ctx("1");
    let old = f.envelope(f.builder()).seal(b"before", &c).await.unwrap();
    let period = match &f.memory {
        Some(m) => {
            m.backdate("records", 1, Duration::from_secs(2 * 86_400));
            Duration::from_secs(86_400)
        }
        None => Duration::ZERO,
    };
    let sink = Arc::new(MemorySink::new());
    let env = f.envelope(
        f.builder().event_sink(sink.clone()).key_policy(
            f.key.clone(),
            KeyPolicy::new()
                .cryptoperiod(period)
                .on_expired(OnExpired::RotateFirst),
        ),
    );
    let m = env.seal(b"after", &c).await.unwrap();
    assert_eq!(version_of(&m), 2, "sealed under the new primary");
    let rotations: Vec<_> = sink
        .events()
        .into_iter()
        .filter(|e| e.operation == Operation::Rotate)
        .collect();
    assert_eq!(rotations.len(), 1);
    assert_eq!(rotations[0].outcome, Outcome::Success);
    assert_eq!(rotations[0].actor.as_deref(), Some("lab-service"));
    let info = env.keyring().describe(&f.key, &operator()).await.unwrap();
    assert_eq!(info.primary_version, Some(2));
    assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    assert_eq!(env.open(&old, &c).await.unwrap(), b"before");
    assert_eq!(env.open(&m, &c).await.unwrap(), b"after");
    if f.memory.is_some() {
        // The new primary is within its period: no further rotation, even
        // with many tasks encrypting at once.
        let mut tasks = Vec::new();
        for i in 0..32 {
            let env = env.clone();
            tasks.push(tokio::spawn(async move {
                env.seal(b"x", &ctx(&i.to_string())).await.unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(version_of(&t.await.unwrap()), 2);
        }
        let n = sink
            .events()
            .iter()
            .filter(|e| e.operation == Operation::Rotate)
            .count();
        assert_eq!(n, 1, "one rotation in all");
    }
}

async fn disable_blocks_decryption_reversibly(f: Fixture) {
    let env = f.envelope(f.builder());
    let c = ctx("1");
    let v1 = env.seal(b"under v1", &c).await.unwrap();
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let v2 = env.seal(b"under v2", &c).await.unwrap();

    let info = env.keyring().disable(&f.key, 1, &operator()).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Disabled);
    let e = env.open(&v1, &c).await.unwrap_err();
    assert_eq!(
        provider_kind(&e),
        Some(ProviderErrorKind::KeyDisabled),
        "{e:?}"
    );
    assert_eq!(env.open(&v2, &c).await.unwrap(), b"under v2");

    env.keyring()
        .set_state(&f.key, 1, KeyState::DecryptOnly, &operator())
        .await
        .unwrap();
    assert_eq!(env.open(&v1, &c).await.unwrap(), b"under v1");

    // Disabling the primary stops encryption (no cached key serves it).
    env.keyring().disable(&f.key, 2, &operator()).await.unwrap();
    let e = env.seal(b"x", &c).await.unwrap_err();
    assert!(
        matches!(
            provider_kind(&e),
            Some(ProviderErrorKind::KeyDisabled | ProviderErrorKind::KeyNotFound)
        ),
        "{e:?}"
    );
}

async fn destroy_shreds_one_version_only(f: Fixture) {
    let env = f.envelope(f.builder());
    let c = ctx("1");
    let v1 = env.seal(b"under v1", &c).await.unwrap();
    let mut v1_stream = env.encryptor(Vec::new(), &c).await.unwrap();
    std::io::Write::write_all(&mut v1_stream, &[7u8; 40_000]).unwrap();
    let v1_stream = v1_stream.finish().unwrap();
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let v2 = env.seal(b"under v2", &c).await.unwrap();

    env.keyring().disable(&f.key, 1, &operator()).await.unwrap();
    let info = env.keyring().destroy(&f.key, 1, &operator()).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);

    for m in [&v1, &v1_stream] {
        let e = env.open(m, &c).await.unwrap_err();
        assert_eq!(
            provider_kind(&e),
            Some(ProviderErrorKind::KeyDestroyed),
            "{e:?}"
        );
        assert!(!e.is_decrypt());
    }
    assert_eq!(
        provider_kind(&env.decryptor(&v1[..], &c).await.unwrap_err()),
        Some(ProviderErrorKind::KeyDestroyed)
    );
    assert_eq!(env.open(&v2, &c).await.unwrap(), b"under v2");
    // Nothing leaves destroyed.
    for state in [KeyState::Enabled, KeyState::DecryptOnly, KeyState::Disabled] {
        let e = env
            .keyring()
            .set_state(&f.key, 1, state, &operator())
            .await
            .unwrap_err();
        assert_eq!(
            provider_kind(&e),
            Some(ProviderErrorKind::KeyDestroyed),
            "{e:?}"
        );
    }
    // A fresh keyring over the same provider agrees.
    let again = f.envelope(f.builder());
    assert_eq!(
        provider_kind(&again.open(&v1, &c).await.unwrap_err()),
        Some(ProviderErrorKind::KeyDestroyed)
    );
    assert_eq!(again.open(&v2, &c).await.unwrap(), b"under v2");
}

async fn destroy_is_not_served_from_the_decryption_cache(f: Fixture) {
    use phi_envelope::cache::CacheConfig;
    let env = f.envelope(f.builder().data_key_cache(CacheConfig::new()));
    let c = ctx("1");
    let v1 = env.seal(b"under v1", &c).await.unwrap();
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    for _ in 0..3 {
        assert_eq!(env.open(&v1, &c).await.unwrap(), b"under v1");
    }
    assert_eq!(env.keyring().cache_stats().decrypt_hits, 2);
    env.keyring().disable(&f.key, 1, &operator()).await.unwrap();
    env.keyring().destroy(&f.key, 1, &operator()).await.unwrap();
    let e = env.open(&v1, &c).await.unwrap_err();
    assert_eq!(
        provider_kind(&e),
        Some(ProviderErrorKind::KeyDestroyed),
        "{e:?}"
    );
    let stats = env.keyring().cache_stats();
    assert_eq!(stats.decrypt_hits, 2, "no hit after the destroy");
    assert_eq!(
        stats.keys_released, stats.keys_cached,
        "flushed keys are released"
    );
}

async fn set_state_cannot_destroy(f: Fixture) {
    let env = f.envelope(f.builder());
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let e = env
        .keyring()
        .set_state(&f.key, 1, KeyState::Destroyed, &operator())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::KeyLifecycle(m) if m.contains("use destroy")),
        "{e:?}"
    );
    let info = env.keyring().describe(&f.key, &operator()).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
}

async fn lifecycle_verbs_leave_events(f: Fixture) {
    let sink = Arc::new(MemorySink::new());
    let env = f.envelope(f.builder().event_sink(sink.clone()));
    let k = env.keyring();
    k.rotate(&f.key, &operator()).await.unwrap();
    k.disable(&f.key, 1, &operator()).await.unwrap();
    k.destroy(&f.key, 1, &operator()).await.unwrap();
    // A refused verb is recorded as a failure.
    let _ = k
        .set_state(&f.key, 1, KeyState::Enabled, &operator())
        .await
        .unwrap_err();
    let events = sink.events();
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.operation, e.key_version, e.outcome.as_string()))
        .collect();
    assert_eq!(
        seen,
        [
            (Operation::Rotate, Some(2), "success".to_string()),
            (Operation::SetState, Some(1), "success".to_string()),
            (Operation::Destroy, Some(1), "success".to_string()),
            (
                Operation::SetState,
                Some(1),
                "failed:key-destroyed".to_string()
            ),
        ]
    );
    for e in &events {
        assert_eq!(e.actor.as_deref(), Some("alice"));
        assert_eq!(e.purpose.as_deref(), Some("key-management"));
        assert_eq!(e.key_ref.as_deref(), Some(f.key.as_str()));
        assert_eq!(e.provider, f.provider.id());
    }
}

async fn rotation_flushes_the_encryption_cache(f: Fixture) {
    use phi_envelope::cache::CacheConfig;
    let env = f.envelope(f.builder().data_key_cache(CacheConfig::new()));
    let c = ctx("1");
    let a = env.seal(b"a", &c).await.unwrap();
    let b = env.seal(b"b", &c).await.unwrap();
    assert_eq!((version_of(&a), version_of(&b)), (1, 1));
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let after = env.seal(b"c", &c).await.unwrap();
    assert_eq!(version_of(&after), 2, "not served from the cache");
    assert_eq!(env.open(&a, &c).await.unwrap(), b"a");
}

// ---------------------------------------------------------------------------
// Fault injection: the in-memory provider only.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn failed_rotation_leaves_the_old_primary_working() {
    let f = memory_fixture();
    let sink = Arc::new(MemorySink::new());
    let env = f.envelope(f.builder().event_sink(sink.clone()));
    let c = ctx("1");
    let before = env.seal(b"before", &c).await.unwrap();
    f.memory().fail_rotate.store(true, Ordering::SeqCst);
    let e = env.keyring().rotate(&f.key, &operator()).await.unwrap_err();
    assert_eq!(provider_kind(&e), Some(ProviderErrorKind::Unavailable));
    assert!(sink
        .events()
        .iter()
        .any(|e| e.operation == Operation::Rotate
            && e.outcome == Outcome::Failed("unavailable".into())));
    // Still version 1, still encrypting and decrypting.
    let info = env.keyring().describe(&f.key, &operator()).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    let after = env.seal(b"after", &c).await.unwrap();
    assert_eq!(version_of(&after), 1);
    assert_eq!(env.open(&before, &c).await.unwrap(), b"before");
    assert_eq!(env.open(&after, &c).await.unwrap(), b"after");
    // Once the provider recovers, the rotation goes through.
    f.memory().fail_rotate.store(false, Ordering::SeqCst);
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    assert_eq!(version_of(&env.seal(b"x", &c).await.unwrap()), 2);
}

#[tokio::test]
async fn rotate_first_that_fails_encrypts_nothing_and_keeps_the_old_primary() {
    let f = memory_fixture();
    let c = ctx("1");
    let before = f.envelope(f.builder()).seal(b"before", &c).await.unwrap();
    f.memory()
        .backdate("records", 1, Duration::from_secs(2 * 86_400));
    f.memory().fail_rotate.store(true, Ordering::SeqCst);
    let env = f.envelope(
        f.builder().key_policy(
            f.key.clone(),
            KeyPolicy::new()
                .cryptoperiod(Duration::from_secs(86_400))
                .on_expired(OnExpired::RotateFirst),
        ),
    );
    let calls = f.memory().calls.load(Ordering::SeqCst);
    let e = env.seal(b"x", &c).await.unwrap_err();
    match &e {
        Error::KeyLifecycle(m) => {
            assert!(m.contains("rotating it first failed"), "{m}");
            assert!(m.contains("rotation failed (simulated)"), "{m}");
        }
        other => panic!("expected KeyLifecycle, got {other:?}"),
    }
    assert_eq!(
        f.memory().calls.load(Ordering::SeqCst),
        calls,
        "nothing generated"
    );
    assert_eq!(env.open(&before, &c).await.unwrap(), b"before");
    let info = env.keyring().describe(&f.key, &operator()).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
}

#[tokio::test]
async fn a_cryptoperiod_costs_one_describe_per_ttl_not_per_message() {
    let f = memory_fixture();
    let sink = Arc::new(MemorySink::new());
    let env = f.envelope(f.builder().event_sink(sink.clone()).key_policy(
        f.key.clone(),
        KeyPolicy::new().cryptoperiod(Duration::from_secs(86_400)),
    ));
    for i in 0..200 {
        env.seal(b"x", &ctx(&i.to_string())).await.unwrap();
    }
    let describes = sink
        .events()
        .iter()
        .filter(|e| e.operation == Operation::Describe)
        .count();
    assert_eq!(describes, 1);
    // Without a cryptoperiod, no describe at all.
    let sink = Arc::new(MemorySink::new());
    let env = f.envelope(f.builder().event_sink(sink.clone()));
    for i in 0..10 {
        env.seal(b"x", &ctx(&i.to_string())).await.unwrap();
    }
    assert!(!sink
        .events()
        .iter()
        .any(|e| e.operation == Operation::Describe));
}

/// The in-memory provider seen through a provider that reports no creation
/// times (`no_times`), or that rotates like AWS KMS: new material inside the
/// same version, whose creation time stays the key's (`kms_like`).
#[derive(Debug)]
struct Quirky {
    inner: Arc<MemoryKms>,
    no_times: bool,
    kms_like: bool,
    rotations: std::sync::atomic::AtomicUsize,
}

impl Quirky {
    fn new(inner: Arc<MemoryKms>, no_times: bool, kms_like: bool) -> Quirky {
        Quirky {
            inner,
            no_times,
            kms_like,
            rotations: Default::default(),
        }
    }
}

impl KeyProvider for Quirky {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a phi_envelope::Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<phi_envelope::WrappedKey>> {
        self.inner.wrap(key, dek, context)
    }
    fn unwrap<'a>(
        &'a self,
        entry: &'a phi_envelope::WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Unwrapped>> {
        self.inner.unwrap(entry, context)
    }
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        Box::pin(async move {
            let info = self.inner.describe(key).await?;
            if !self.no_times {
                return Ok(info);
            }
            let versions = info
                .versions
                .iter()
                .map(|v| KeyVersionInfo::new(v.version, v.state, None))
                .collect();
            Ok(KeyInfo::new(
                info.key_ref.clone(),
                info.primary_version,
                versions,
            ))
        })
    }
    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        Box::pin(async move {
            self.rotations.fetch_add(1, Ordering::SeqCst);
            if self.kms_like {
                self.describe(key).await
            } else {
                self.inner.rotate(key).await
            }
        })
    }
}

#[tokio::test]
async fn a_provider_without_creation_times_cannot_have_a_cryptoperiod() {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(Quirky::new(kms, true, false)))
            .recipient(key.clone())
            .key_policy(key, KeyPolicy::new().cryptoperiod(Duration::from_secs(60)))
            .build()
            .unwrap(),
    );
    let e = env.seal(b"x", &ctx("1")).await.unwrap_err();
    assert!(
        matches!(&e, Error::KeyLifecycle(m) if m.contains("does not report when version 1 was created")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_first_on_a_provider_that_rotates_inside_one_version_stops_after_one_rotation() {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    kms.backdate("records", 1, Duration::from_secs(2 * 86_400));
    let quirky = Arc::new(Quirky::new(kms, false, true));
    let env = Envelope::new(
        Keyring::builder()
            .provider(quirky.clone())
            .recipient(key.clone())
            .key_policy(
                key,
                KeyPolicy::new()
                    .cryptoperiod(Duration::from_secs(86_400))
                    .on_expired(OnExpired::RotateFirst),
            )
            .build()
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..16 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            env.seal(b"x", &ctx(&i.to_string())).await
        }));
    }
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::KeyLifecycle(m) if m.contains("cannot tell the new material's age")),
            "{e:?}"
        );
    }
    assert_eq!(
        quirky.rotations.load(Ordering::SeqCst),
        1,
        "one rotation, no loop"
    );
}

#[tokio::test]
async fn min_decrypt_version_lets_another_recipient_open() {
    // A message wrapped to the records key (v1, now below the minimum) and
    // to a disaster-recovery key opens through the latter.
    let f = memory_fixture();
    let dr = Arc::new(MemoryKms::new("dr"));
    let dr_key = dr.add_key("offsite");
    let both = Envelope::new(
        f.builder()
            .provider(dr.clone())
            .recipient(dr_key.clone())
            .build()
            .unwrap(),
    );
    let c = ctx("1");
    let m = both.seal(b"two recipients", &c).await.unwrap();
    let strict = Envelope::new(
        f.builder()
            .provider(dr.clone())
            .key_policy(f.key.clone(), KeyPolicy::new().min_decrypt_version(2))
            .build()
            .unwrap(),
    );
    let before = f.memory().calls.load(Ordering::SeqCst);
    assert_eq!(strict.open(&m, &c).await.unwrap(), b"two recipients");
    assert_eq!(
        f.memory().calls.load(Ordering::SeqCst),
        before,
        "v1 entry never sent"
    );
}

#[tokio::test]
async fn a_key_policy_needs_its_provider() {
    let e = Keyring::builder()
        .key_policy("local:nowhere".parse().unwrap(), KeyPolicy::new())
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
}

#[tokio::test]
async fn the_local_keystore_file_agrees_after_destroy() {
    // The destroy is durable: a new LocalKeystore over the same file
    // reports the version destroyed and cannot open messages under it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(store))
            .recipient(key.clone())
            .build()
            .unwrap(),
    );
    let c = ctx("1");
    let v1 = env.seal(b"under v1", &c).await.unwrap();
    env.keyring().rotate(&key, &operator()).await.unwrap();
    env.keyring().destroy(&key, 1, &operator()).await.unwrap();

    let reopened = LocalKeystore::open_unprotected_for_tests(&path).unwrap();
    assert_eq!(
        reopened.keys()[0].version(1).unwrap().state,
        KeyState::Destroyed
    );
    let env2 = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(reopened))
            .recipient(key)
            .build()
            .unwrap(),
    );
    assert_eq!(
        provider_kind(&env2.open(&v1, &c).await.unwrap_err()),
        Some(ProviderErrorKind::KeyDestroyed)
    );
}

#[tokio::test]
async fn refuse_after_a_rotation_that_the_provider_does_not_reflect_says_why() {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    kms.backdate("records", 1, Duration::from_secs(2 * 86_400));
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(Quirky::new(kms, false, true)))
            .recipient(key.clone())
            .key_policy(
                key.clone(),
                KeyPolicy::new().cryptoperiod(Duration::from_secs(86_400)),
            )
            .build()
            .unwrap(),
    );
    let e = env.seal(b"x", &ctx("1")).await.unwrap_err();
    assert!(
        matches!(&e, Error::KeyLifecycle(m) if m.contains("rotate the key")),
        "{e:?}"
    );
    env.keyring().rotate(&key, &operator()).await.unwrap();
    let e = env.seal(b"x", &ctx("1")).await.unwrap_err();
    assert!(
        matches!(&e, Error::KeyLifecycle(m) if m.contains("inside one version")),
        "{e:?}"
    );
}
