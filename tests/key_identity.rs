//! One key, many spellings (issue 14, item 2): the data-key caches, key
//! policies and lifecycle verbs act on a key's identity, never on the text
//! that names it, for a provider written outside the crate (which may or
//! may not report identities) and for the local keystore.
//!
//! `Aliasing` below is a provider with aliases, the way Vault or a cloud
//! KMS has them: `alias-kms:alias-NAME` names the same key as
//! `alias-kms:key-NAME`, and headers record the `key-` form. Built only on
//! the public API (over the conformance suite's in-memory provider).

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::{ctx, MemoryKms};
use phi_envelope::cache::CacheConfig;
use phi_envelope::keyring::KeyPolicy;
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::{
    BoxFuture, KeyIdentity, KeyInfo, KeyProvider, KeyRefKind, KeyState, ProviderErrorKind,
    Unwrapped,
};
use phi_envelope::{
    Caller, Dek, EncryptionContext, Envelope, Error, KeyRef, Keyring, Result, WrappedKey,
};

const ID: &str = "alias-kms";

/// A provider with aliases. With `reports_identity` it answers
/// `KeyProvider::identity`; without, it relies on the trait's default.
#[derive(Debug)]
struct Aliasing {
    inner: MemoryKms,
    reports_identity: bool,
}

impl Aliasing {
    fn new(reports_identity: bool) -> Arc<Aliasing> {
        Arc::new(Aliasing {
            inner: MemoryKms::new(ID),
            reports_identity,
        })
    }

    /// Creates key `key-NAME`; returns (alias spelling, key spelling).
    fn add(&self, name: &str) -> (KeyRef, KeyRef) {
        let key = self.inner.add_key(&format!("key-{name}"));
        (format!("{ID}:alias-{name}").parse().unwrap(), key)
    }

    /// The `key-` spelling of an alias, any other reference as is.
    fn canonical(key: &KeyRef) -> KeyRef {
        match key.kind() {
            KeyRefKind::Custom { rest, .. } if rest.starts_with("alias-") => {
                format!("{ID}:key-{}", &rest["alias-".len()..])
                    .parse()
                    .unwrap()
            }
            _ => key.clone(),
        }
    }
}

impl KeyProvider for Aliasing {
    fn id(&self) -> &str {
        ID
    }
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move { self.inner.wrap(&Self::canonical(key), dek, context).await })
    }
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        self.inner.unwrap(entry, context)
    }
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.inner.describe(&Self::canonical(key)).await })
    }
    /// Fails for a name containing `unreachable` (a provider that cannot
    /// resolve it now).
    fn identity<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        let id = self
            .reports_identity
            .then(|| KeyIdentity::new(ID, Self::canonical(key).as_str()));
        let fails = key.as_str().contains("unreachable");
        Box::pin(async move {
            if fails {
                return Err(phi_envelope::provider::ProviderError::new(
                    ID,
                    ProviderErrorKind::Unavailable,
                    "cannot resolve (simulated)",
                )
                .into());
            }
            Ok(id)
        })
    }
    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.inner.rotate(&Self::canonical(key)).await })
    }
    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            self.inner
                .set_state(&Self::canonical(key), version, state)
                .await
        })
    }
    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.inner.destroy(&Self::canonical(key), version).await })
    }
}

fn operator() -> Caller {
    Caller::new("identity-test", "lifecycle")
}

fn kind(e: &Error) -> ProviderErrorKind {
    match e {
        Error::Provider(p) => p.kind(),
        other => panic!("expected a provider error, got {other:?}"),
    }
}

fn cached(provider: Arc<dyn KeyProvider>, recipient: &KeyRef) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(provider)
            .recipient(recipient.clone())
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    )
    .as_caller("identity-test", "test")
}

/// What a lifecycle verb does to a key, through one spelling.
#[derive(Clone, Copy, Debug)]
enum Verb {
    Destroy,
    Disable,
}

async fn apply(env: &Envelope, verb: Verb, key: &KeyRef) {
    match verb {
        Verb::Destroy => env.keyring().destroy(key, 1, &operator()).await,
        Verb::Disable => env.keyring().disable(key, 1, &operator()).await,
    }
    .unwrap();
}

/// Seals under `recipient`, warms both caches, applies `verb` through
/// `target`: neither cache may serve the key afterwards.
async fn verb_flushes_both_caches(reports_identity: bool, verb: Verb, by_alias: bool) {
    let p = Aliasing::new(reports_identity);
    let (alias, key) = p.add("records");
    let (recipient, target) = if by_alias {
        (key.clone(), alias.clone())
    } else {
        (alias.clone(), key.clone())
    };
    let env = cached(p.clone(), &recipient);
    let c = ctx("1");
    let m = env.seal(b"record", &c).await.unwrap();
    env.seal(b"record", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    let s = env.keyring().cache_stats();
    assert_eq!((s.encrypt_hits, s.decrypt_hits), (1, 1), "caches warm");

    apply(&env, verb, &target).await;

    let what =
        format!("{verb:?} through {target}, sealed to {recipient}, identity {reports_identity}");
    let sealed = env.seal(b"after", &c).await;
    let e = env
        .open(&m, &c)
        .await
        .expect_err(&format!("{what}: the decryption cache served the key"));
    let s = env.keyring().cache_stats();
    assert_eq!(
        (s.encrypt_hits, s.decrypt_hits),
        (1, 1),
        "{what}: a cache served the key"
    );
    let expected = match verb {
        Verb::Destroy => ProviderErrorKind::KeyDestroyed,
        Verb::Disable => ProviderErrorKind::KeyDisabled,
    };
    assert_eq!(kind(&e), expected, "{what}: {e}");
    // No enabled version is left: sealing must fail, not reuse the DEK.
    let e = sealed.expect_err(&format!("{what}: sealed with a cached data key"));
    assert_eq!(kind(&e), ProviderErrorKind::KeyDisabled, "{what}: {e}");
}

#[tokio::test]
async fn without_reported_identity_every_spelling_flushes_both_caches() {
    for verb in [Verb::Destroy, Verb::Disable] {
        for by_alias in [false, true] {
            verb_flushes_both_caches(false, verb, by_alias).await;
        }
    }
}

#[tokio::test]
async fn with_reported_identity_every_spelling_flushes_both_caches() {
    for verb in [Verb::Destroy, Verb::Disable] {
        for by_alias in [false, true] {
            verb_flushes_both_caches(true, verb, by_alias).await;
        }
    }
}

/// With identities reported, a verb flushes that key only: another key of
/// the same provider keeps its cached data keys. Without identities the
/// whole provider is flushed (safe, at the cost of provider calls).
#[tokio::test]
async fn a_reported_identity_flushes_that_key_only() {
    for reports_identity in [true, false] {
        let p = Aliasing::new(reports_identity);
        let (alias, key) = p.add("records");
        let (other_alias, _) = p.add("archive");
        let env = cached(p.clone(), &alias);
        let other = env.to_recipients([other_alias.clone()]);
        let c = ctx("1");
        other.seal(b"o", &c).await.unwrap();
        env.seal(b"r", &c).await.unwrap();
        env.seal(b"r", &c).await.unwrap();
        env.keyring().rotate(&key, &operator()).await.unwrap();

        let s = env.keyring().cache_stats();
        env.seal(b"r", &c).await.unwrap();
        assert_eq!(
            env.keyring().cache_stats().encrypt_hits,
            s.encrypt_hits,
            "rotated key served from the cache (identity {reports_identity})"
        );
        other.seal(b"o", &c).await.unwrap();
        let kept = env.keyring().cache_stats().encrypt_hits == s.encrypt_hits + 1;
        assert_eq!(
            kept, reports_identity,
            "another key's cached data key (identity {reports_identity})"
        );
    }
}

/// The local keystore: `local:NAME` is the only spelling; every verb
/// flushes both caches.
#[tokio::test]
async fn local_keystore_verbs_flush_both_caches() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let env = cached(Arc::new(store), &key);
    let c = ctx("1");
    let m = env.seal(b"v1", &c).await.unwrap();
    env.seal(b"v1", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    env.open(&m, &c).await.unwrap();

    env.keyring().rotate(&key, &operator()).await.unwrap();
    let m2 = env.seal(b"v2", &c).await.unwrap();
    let v = phi_envelope::envelope::inspect(&m2)
        .unwrap()
        .header
        .recipients()[0]
        .key_version;
    assert_eq!(v, 2, "sealed under the rotated-away version from the cache");

    env.keyring().disable(&key, 1, &operator()).await.unwrap();
    let e = env.open(&m, &c).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::KeyDisabled, "{e}");
    env.keyring().destroy(&key, 1, &operator()).await.unwrap();
    let e = env.open(&m, &c).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::KeyDestroyed, "{e}");
    assert_eq!(env.open(&m2, &c).await.unwrap(), b"v2");
    let s = env.keyring().cache_stats();
    assert_eq!((s.encrypt_hits, s.decrypt_hits), (1, 1));
}

/// A policy set on one spelling applies to the other: the keyring cannot
/// know two spellings are one key unless the provider says so.
#[tokio::test]
async fn key_policies_apply_by_reported_identity() {
    let p = Aliasing::new(true);
    let (alias, key) = p.add("records");
    let c = ctx("1");
    let sealed = cached(p.clone(), &alias).seal(b"v1", &c).await.unwrap();
    // Minimum decryption version on the alias; the header records key-.
    let env = Envelope::new(
        Keyring::builder()
            .provider(p.clone())
            .recipient(alias.clone())
            .key_policy(alias.clone(), KeyPolicy::new().min_decrypt_version(2))
            .build()
            .unwrap(),
    );
    match env.open(&sealed, &c).await {
        Err(Error::KeyLifecycle(m)) => assert!(m.contains("minimum decryption version"), "{m}"),
        other => panic!("the alias's policy did not apply to the header: {other:?}"),
    }
    // A cryptoperiod on the key- spelling applies to the alias recipient.
    p.inner
        .backdate("key-records", 1, Duration::from_secs(3600));
    let env = Envelope::new(
        Keyring::builder()
            .provider(p.clone())
            .recipient(alias.clone())
            .key_policy(
                key.clone(),
                KeyPolicy::new().cryptoperiod(Duration::from_secs(60)),
            )
            .build()
            .unwrap(),
    );
    match env.seal(b"x", &c).await {
        Err(Error::KeyLifecycle(m)) => assert!(m.contains("cryptoperiod"), "{m}"),
        other => panic!("the key's cryptoperiod did not apply to its alias: {other:?}"),
    }
}

/// When the identity of a policy's key cannot be resolved, it is unknown
/// whether the policy applies: the keyring refuses rather than guess.
#[tokio::test]
async fn an_unresolvable_policy_key_fails_closed() {
    let p = Aliasing::new(true);
    let (alias, _) = p.add("records");
    let c = ctx("1");
    let sealed = cached(p.clone(), &alias).seal(b"v1", &c).await.unwrap();
    let unreachable: KeyRef = format!("{ID}:alias-unreachable").parse().unwrap();
    let env = Envelope::new(
        Keyring::builder()
            .provider(p.clone())
            .recipient(alias.clone())
            .key_policy(unreachable, KeyPolicy::new().min_decrypt_version(2))
            .build()
            .unwrap(),
    );
    match env.open(&sealed, &c).await {
        Err(Error::KeyLifecycle(m)) => assert!(m.contains("cannot tell whether"), "{m}"),
        other => panic!("opened although a policy might apply: {other:?}"),
    }
    match env.seal(b"x", &c).await {
        Err(Error::KeyLifecycle(m)) => assert!(m.contains("cannot tell whether"), "{m}"),
        other => panic!("sealed although a policy might apply: {other:?}"),
    }
}
