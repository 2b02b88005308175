//! One PKCS#11 key, many URIs (issue 14, item 2): with or without
//! `module-path`, `slot-id`, `type` or `token`, a URI names the same key, and
//! the data-key caches, key policies and lifecycle verbs treat it so. On a
//! real SoftHSM2 token (see `pkcs11_support`).
#![cfg(feature = "pkcs11")]

mod conformance;
mod pkcs11_support;

use std::sync::Arc;

use phi_envelope::cache::CacheConfig;
use phi_envelope::keyring::KeyPolicy;
use phi_envelope::provider::{KeyProvider, KeyState, ProviderErrorKind as K};
use phi_envelope::{Caller, Envelope, Error, KeyRef, Keyring};
use pkcs11_support::{find_slot, key, kind, provider, token};

fn version_of(sealed: &[u8]) -> u32 {
    phi_envelope::envelope::inspect(sealed)
        .unwrap()
        .header
        .recipients()[0]
        .key_version
}

/// The spellings of the key labelled `label` on the test token.
fn spellings(label: &str) -> Vec<KeyRef> {
    let t = token();
    let slot = find_slot(&t.ctx, &t.label).id();
    [
        format!(
            "pkcs11:token={};object={label}?module-path={}",
            t.label, t.module
        ),
        format!("pkcs11:object={label};slot-id={slot}"),
        format!("pkcs11:token={};object={label};type=secret-key", t.label),
        format!(
            "pkcs11:object={label}?module-path={}&module-name=softhsm2",
            t.module
        ),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_uri_spelling_reaches_both_caches() {
    let p: Arc<dyn KeyProvider> = Arc::new(provider().await);
    let base = key("identity-records");
    p.create_key(&base).await.unwrap();
    let s = spellings("identity-records");
    let (recipient, rotate_as, disable_as, destroy_as) = (&s[0], &s[1], &s[2], &s[3]);
    let env = Envelope::new(
        Keyring::builder()
            .provider(p.clone())
            .recipient(recipient.clone())
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    )
    .as_caller("pkcs11-identity", "test");
    let op = Caller::new("pkcs11-identity", "lifecycle");
    let c = conformance::ctx("1");
    let m = env.seal(b"v1", &c).await.unwrap();
    env.seal(b"v1", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    let st = env.keyring().cache_stats();
    assert_eq!((st.encrypt_hits, st.decrypt_hits), (1, 1), "caches warm");

    // Rotated through another URI: the next record is sealed under v2.
    env.keyring().rotate(rotate_as, &op).await.unwrap();
    let m2 = env.seal(b"v2", &c).await.unwrap();
    assert_eq!(
        version_of(&m2),
        2,
        "sealed under the rotated-away version from the cache (rotated as {rotate_as})"
    );
    // Disabled through a third: the v1 message is not opened from the cache.
    env.keyring().disable(disable_as, 1, &op).await.unwrap();
    let e = env
        .open(&m, &c)
        .await
        .expect_err("opened from the cache under a disabled version");
    assert_eq!(kind(&e), K::KeyDisabled, "{e}");
    env.keyring()
        .set_state(disable_as, 1, KeyState::DecryptOnly, &op)
        .await
        .unwrap();
    assert_eq!(env.open(&m, &c).await.unwrap(), b"v1");
    env.open(&m, &c).await.unwrap();
    let hits = env.keyring().cache_stats().decrypt_hits;
    // Destroyed through a fourth.
    env.keyring().destroy(destroy_as, 1, &op).await.unwrap();
    let e = env
        .open(&m, &c)
        .await
        .expect_err("opened from the cache under a destroyed version");
    assert_eq!(kind(&e), K::KeyDestroyed, "{e}");
    assert_eq!(env.keyring().cache_stats().decrypt_hits, hits);
    assert_eq!(env.open(&m2, &c).await.unwrap(), b"v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_policy_on_one_uri_applies_to_headers_with_another() {
    let p: Arc<dyn KeyProvider> = Arc::new(provider().await);
    let base = key("identity-policy");
    p.create_key(&base).await.unwrap();
    let s = spellings("identity-policy");
    let c = conformance::ctx("1");
    let sealed = Envelope::new(
        Keyring::builder()
            .provider(p.clone())
            .recipient(s[0].clone())
            .build()
            .unwrap(),
    )
    .seal(b"v1", &c)
    .await
    .unwrap();
    for policy_key in [&base, &s[1], &s[2]] {
        let env = Envelope::new(
            Keyring::builder()
                .provider(p.clone())
                .key_policy(policy_key.clone(), KeyPolicy::new().min_decrypt_version(2))
                .build()
                .unwrap(),
        );
        match env.open(&sealed, &c).await {
            Err(Error::KeyLifecycle(m)) => assert!(m.contains("minimum decryption version"), "{m}"),
            other => panic!(
                "the policy on {policy_key} missed the header's {}: {other:?}",
                s[0]
            ),
        }
    }
}
