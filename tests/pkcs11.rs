//! The PKCS#11 provider on a real SoftHSM2 token: the shared conformance
//! suite and the HSM cases (wrong PIN, missing objects, lifecycle,
//! crypto-shredding, the GCM invocation limit, key attributes, multi-
//! recipient with the local keystore, concurrency, any runtime).
//!
//! This binary creates its own token (see `pkcs11_support`). The cases that
//! disturb the whole module (logout, `C_Finalize`, the token unreachable,
//! a wrong PIN, objects changed behind the provider's back) are in
//! `pkcs11_exclusive.rs`, which runs them one at a time in its own process.
#![cfg(feature = "pkcs11")]

mod conformance;
mod pkcs11_support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use phi_envelope::format::WrappedKey;
use phi_envelope::provider::pkcs11::{Pin, Pkcs11Config, Pkcs11Provider, WRAPPED_LEN};
use phi_envelope::provider::{KeyProvider, KeyState, ProviderErrorKind as K, Unwrapped};
use phi_envelope::{Caller, Dek, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring};
use pkcs11_support::{bool_attr, key, key_objects, kind, provider, provider_with, session, token};

fn ctx(record: &str) -> EncryptionContext {
    conformance::ctx(record)
}

fn envelope(p: Arc<dyn KeyProvider>, key: &KeyRef) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(p)
            .recipient(key.clone())
            .build()
            .unwrap(),
    )
    .as_caller("pkcs11-test", "test")
}

fn entry(sealed: &[u8]) -> WrappedKey {
    Header::parse(sealed).unwrap().0.recipients()[0].clone()
}

async fn created(p: &Pkcs11Provider, label: &str) -> KeyRef {
    let k = key(label);
    let info = p.create_key(&k).await.expect("create_key");
    assert_eq!(info.primary_version, Some(1));
    k
}

fn provider_kind(r: Result<impl std::fmt::Debug, Error>) -> K {
    kind(&r.expect_err("expected an error"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_on_softhsm2() {
    let p = provider().await;
    let k = created(&p, "conformance-records").await;
    let other = created(&p, "conformance-archive").await;
    conformance::run(conformance::Subject {
        provider: Arc::new(p),
        key: k,
        other_key: other,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wraps_on_the_token_and_binds_key_version_and_context() {
    let p = provider().await;
    let k = created(&p, "wrap-basics").await;
    let dek = Dek::generate().unwrap();
    let w = p.wrap(&k, &dek, &ctx("1")).await.unwrap();
    assert_eq!(w.provider, "pkcs11");
    assert_eq!(w.key_ref, k.as_str());
    assert_eq!(w.key_version, 1);
    assert_eq!(w.wrapped.len(), WRAPPED_LEN);
    let again = p.wrap(&k, &dek, &ctx("1")).await.unwrap();
    assert_ne!(w.wrapped[..12], again.wrapped[..12], "fresh IV per wrap");

    match p.unwrap(&w, &ctx("1")).await.unwrap() {
        Unwrapped::Key(d) => assert_eq!(d.expose_secret(), dek.expose_secret()),
        other => panic!("expected the key, got {other:?}"),
    }
    // Wrong context, tampered IV / ciphertext / tag, truncated: rejected.
    assert!(matches!(
        p.unwrap(&w, &ctx("2")).await.unwrap(),
        Unwrapped::Rejected
    ));
    assert!(matches!(
        p.unwrap(&w, &EncryptionContext::new()).await.unwrap(),
        Unwrapped::Rejected
    ));
    for pos in [0, 11, 12, 30, 43, 44, 59] {
        let mut t = w.clone();
        t.wrapped[pos] ^= 0x01;
        assert!(
            matches!(p.unwrap(&t, &ctx("1")).await.unwrap(), Unwrapped::Rejected),
            "flip at {pos}"
        );
    }
    for len in [0, 12, 59, 61] {
        let mut t = w.clone();
        t.wrapped.resize(len, 0);
        assert!(matches!(
            p.unwrap(&t, &ctx("1")).await.unwrap(),
            Unwrapped::Rejected
        ));
    }
    // The same ciphertext claimed for another version, or another key of
    // the token, does not authenticate.
    p.rotate(&k).await.unwrap();
    let mut v2 = w.clone();
    v2.key_version = 2;
    assert!(matches!(
        p.unwrap(&v2, &ctx("1")).await.unwrap(),
        Unwrapped::Rejected
    ));
    let other = created(&p, "wrap-basics-other").await;
    let mut moved = w.clone();
    moved.key_ref = other.as_str().to_owned();
    assert!(matches!(
        p.unwrap(&moved, &ctx("1")).await.unwrap(),
        Unwrapped::Rejected
    ));
    // The session survived all those failures.
    assert!(matches!(
        p.unwrap(&w, &ctx("1")).await.unwrap(),
        Unwrapped::Key(_)
    ));
}

#[tokio::test]
async fn entries_of_other_providers_and_tokens_are_not_mine() {
    let p = provider().await;
    let k = created(&p, "not-mine").await;
    let w = p
        .wrap(&k, &Dek::generate().unwrap(), &ctx("1"))
        .await
        .unwrap();
    let mut other_provider = w.clone();
    other_provider.provider = "local".into();
    let mut other_token = w.clone();
    other_token.key_ref = "pkcs11:token=another-token;object=not-mine".into();
    let mut other_serial = w.clone();
    other_serial.key_ref = format!("pkcs11:token={};serial=0000;object=not-mine", token().label);
    let mut garbage = w.clone();
    garbage.key_ref = "pkcs11:nonsense".into();
    let mut local_ref = w.clone();
    local_ref.key_ref = "local:not-mine".into();
    for e in [
        other_provider,
        other_token,
        other_serial,
        garbage,
        local_ref,
    ] {
        assert!(
            matches!(p.unwrap(&e, &ctx("1")).await.unwrap(), Unwrapped::NotMine),
            "{e:?}"
        );
    }
    // A reference without token= matches any token (RFC 7512).
    let mut no_token = w.clone();
    no_token.key_ref = "pkcs11:object=not-mine".into();
    assert!(matches!(
        p.unwrap(&no_token, &ctx("1")).await.unwrap(),
        Unwrapped::Rejected // the AAD binds the reference text
    ));
    // Wrapping to another token's key is a configuration error.
    let foreign: KeyRef = "pkcs11:token=another-token;object=k".parse().unwrap();
    let e = p
        .wrap(&foreign, &Dek::generate().unwrap(), &ctx("1"))
        .await
        .unwrap_err();
    assert_eq!(kind(&e), K::Misconfigured);
    assert!(e.to_string().contains("another token"), "{e}");
}

#[tokio::test]
async fn missing_token_or_module_is_a_clear_configuration_error() {
    let t = token();
    let pin = || Pin::from_env("PHI_PKCS11_PIN").unwrap();
    let e = Pkcs11Provider::connect(Pkcs11Config::new(&t.module, "no-such-token", pin()))
        .await
        .unwrap_err();
    assert_eq!(kind(&e), K::Misconfigured);
    assert!(e.to_string().contains("no-such-token"), "{e}");
    let e = Pkcs11Provider::connect(Pkcs11Config::new(
        "/nonexistent/libpkcs11.so",
        &t.label,
        pin(),
    ))
    .await
    .unwrap_err();
    assert_eq!(kind(&e), K::Misconfigured);
    assert!(e.to_string().contains("module path"), "{e}");
    let e = Pin::from_env("PHI_PKCS11_NO_SUCH_PIN_VAR").unwrap_err();
    assert_eq!(kind(&e), K::Misconfigured);
}

#[tokio::test]
async fn missing_objects_are_key_not_found() {
    let p = provider().await;
    let k = key("never-created");
    let dek = Dek::generate().unwrap();
    assert_eq!(
        provider_kind(p.wrap(&k, &dek, &ctx("1")).await),
        K::KeyNotFound
    );
    assert_eq!(provider_kind(p.describe(&k).await), K::KeyNotFound);
    assert_eq!(provider_kind(p.rotate(&k).await), K::KeyNotFound);
    assert_eq!(
        provider_kind(p.set_state(&k, 1, KeyState::Disabled).await),
        K::KeyNotFound
    );
    assert_eq!(provider_kind(p.destroy(&k, 1).await), K::KeyNotFound);
    let entry = WrappedKey {
        provider: "pkcs11".into(),
        key_ref: k.as_str().into(),
        key_version: 1,
        wrapped: vec![0; WRAPPED_LEN],
    };
    let e = p.unwrap(&entry, &ctx("1")).await.unwrap_err();
    assert_eq!(kind(&e), K::KeyNotFound);
    assert!(e.to_string().contains("never-created"), "{e}");
    // A version that was never made.
    let k = created(&p, "has-one-version").await;
    let mut e9 = entry.clone();
    e9.key_ref = k.as_str().into();
    e9.key_version = 9;
    assert_eq!(
        provider_kind(p.unwrap(&e9, &ctx("1")).await),
        K::KeyNotFound
    );
    // Through the envelope: a header naming a key the token does not hold
    // gives KeyNotFound (an operational error), not the opaque Decrypt.
    let env = envelope(Arc::new(p), &k);
    let sealed = env.seal(b"x", &ctx("1")).await.unwrap();
    let needle = b"object=has-one-version";
    let pos = sealed
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut renamed = sealed.clone();
    renamed[pos + needle.len() - 1] = b'X';
    let e = env.open(&renamed, &ctx("1")).await.unwrap_err();
    assert_eq!(kind(&e), K::KeyNotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_rotate_decrypt_old_disable_enable() {
    let p = Arc::new(provider().await);
    let k = key("lifecycle");
    let kr = envelope(p.clone(), &k);
    let caller = Caller::new("ops", "key-rotation");
    let before = SystemTime::now() - Duration::from_secs(2);
    let info = kr.keyring().create_key(&k, &caller).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(info.versions.len(), 1);
    assert_eq!(info.versions[0].state, KeyState::Enabled);
    let created_at = info.versions[0].created_at.expect("creation time");
    assert!(created_at >= before && created_at <= SystemTime::now() + Duration::from_secs(2));
    assert_eq!(
        provider_kind(kr.keyring().create_key(&k, &caller).await),
        K::InvalidState
    );

    let m1 = kr.seal(b"one", &ctx("1")).await.unwrap();
    assert_eq!(entry(&m1).key_version, 1);
    let info = kr.keyring().rotate(&k, &caller).await.unwrap();
    assert_eq!(info.primary_version, Some(2));
    assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    assert_eq!(info.version(2).unwrap().state, KeyState::Enabled);
    // On the token: v1 lost CKA_ENCRYPT, v2 has both.
    let s = session();
    let objs = key_objects(&s, "lifecycle");
    let v1 = objs.iter().find(|(_, id)| id == b":v1").unwrap().0;
    let v2 = objs.iter().find(|(_, id)| id == b":v2").unwrap().0;
    assert!(!bool_attr(&s, v1, AttributeType::Encrypt));
    assert!(bool_attr(&s, v1, AttributeType::Decrypt));
    assert!(bool_attr(&s, v2, AttributeType::Encrypt));

    let m2 = kr.seal(b"two", &ctx("2")).await.unwrap();
    assert_eq!(entry(&m2).key_version, 2);
    assert_eq!(kr.open(&m1, &ctx("1")).await.unwrap(), b"one");
    assert_eq!(kr.open(&m2, &ctx("2")).await.unwrap(), b"two");

    // Disabled: the token refuses to decrypt under v1.
    let info = kr
        .keyring()
        .set_state(&k, 1, KeyState::Disabled, &caller)
        .await
        .unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Disabled);
    assert!(!bool_attr(&s, v1, AttributeType::Decrypt));
    let e = kr.open(&m1, &ctx("1")).await.unwrap_err();
    assert_eq!(kind(&e), K::KeyDisabled, "{e}");
    assert_eq!(kr.open(&m2, &ctx("2")).await.unwrap(), b"two");
    kr.keyring()
        .set_state(&k, 1, KeyState::DecryptOnly, &caller)
        .await
        .unwrap();
    assert_eq!(kr.open(&m1, &ctx("1")).await.unwrap(), b"one");

    // No primary: sealing says so; enabling the newest makes it primary.
    let info = kr
        .keyring()
        .set_state(&k, 2, KeyState::DecryptOnly, &caller)
        .await
        .unwrap();
    assert_eq!(info.primary_version, None);
    let e = kr.seal(b"x", &ctx("3")).await.unwrap_err();
    assert_eq!(kind(&e), K::KeyDisabled, "{e}");
    assert_eq!(kr.open(&m2, &ctx("2")).await.unwrap(), b"two");
    // Enabling an older version makes it the primary; the newer one
    // becomes decrypt-only.
    let info = kr
        .keyring()
        .set_state(&k, 1, KeyState::Enabled, &caller)
        .await
        .unwrap();
    assert_eq!(info.primary_version, Some(1));
    let info = kr
        .keyring()
        .set_state(&k, 2, KeyState::Enabled, &caller)
        .await
        .unwrap();
    assert_eq!(info.primary_version, Some(2));
    assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    assert!(!bool_attr(&s, v1, AttributeType::Encrypt));
    let m3 = kr.seal(b"three", &ctx("3")).await.unwrap();
    assert_eq!(entry(&m3).key_version, 2);
    // (Directly: the keyring may refuse it before the provider sees it.)
    assert_eq!(
        provider_kind(p.set_state(&k, 2, KeyState::Destroyed).await),
        K::InvalidState
    );
    assert_eq!(
        provider_kind(
            kr.keyring()
                .set_state(&k, 7, KeyState::Disabled, &caller)
                .await
        ),
        K::KeyNotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_is_crypto_shredding() {
    let p = Arc::new(provider().await);
    let k = created(&p, "shred").await;
    let kr = envelope(p.clone(), &k);
    let caller = Caller::new("hsm-test-operator", "crypto-shredding");
    let m1 = kr.seal(b"under v1", &ctx("1")).await.unwrap();
    p.rotate(&k).await.unwrap();
    let m2 = kr.seal(b"under v2", &ctx("2")).await.unwrap();
    p.rotate(&k).await.unwrap();
    let m3 = kr.seal(b"under v3", &ctx("3")).await.unwrap();

    // The primary cannot be destroyed.
    assert_eq!(
        provider_kind(kr.keyring().destroy(&k, 3, &caller).await),
        K::InvalidState
    );
    let info = kr.keyring().destroy(&k, 1, &caller).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);
    assert_eq!(info.primary_version, Some(3));

    // The object is gone from the token.
    let s = session();
    let ids: Vec<Vec<u8>> = key_objects(&s, "shred")
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert!(!ids.contains(&b":v1".to_vec()), "{ids:?}");
    assert_eq!(ids.len(), 2);

    let e = kr.open(&m1, &ctx("1")).await.unwrap_err();
    assert_eq!(kind(&e), K::KeyDestroyed, "{e}");
    assert!(e.to_string().contains("destroyed"), "{e}");
    assert_eq!(kr.open(&m2, &ctx("2")).await.unwrap(), b"under v2");
    assert_eq!(kr.open(&m3, &ctx("3")).await.unwrap(), b"under v3");

    // Idempotent; no way back.
    kr.keyring().destroy(&k, 1, &caller).await.unwrap();
    assert_eq!(
        provider_kind(p.set_state(&k, 1, KeyState::DecryptOnly).await),
        K::KeyDestroyed
    );
    // Another provider instance (another process) knows it too: the
    // tombstone is on the token.
    let fresh = provider().await;
    assert_eq!(
        kind(&fresh.unwrap(&entry(&m1), &ctx("1")).await.unwrap_err()),
        K::KeyDestroyed
    );
    assert_eq!(
        fresh.describe(&k).await.unwrap().version(1).unwrap().state,
        KeyState::Destroyed
    );
    // Version numbers are never reused.
    let info = p.rotate(&k).await.unwrap();
    assert_eq!(info.primary_version, Some(4));
    kr.keyring().destroy(&k, 2, &caller).await.unwrap();
    assert_eq!(
        kind(&kr.open(&m2, &ctx("2")).await.unwrap_err()),
        K::KeyDestroyed
    );
    assert_eq!(kr.open(&m3, &ctx("3")).await.unwrap(), b"under v3");
    let states: Vec<(u32, KeyState)> = p
        .describe(&k)
        .await
        .unwrap()
        .versions
        .iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(
        states,
        [
            (1, KeyState::Destroyed),
            (2, KeyState::Destroyed),
            (3, KeyState::DecryptOnly),
            (4, KeyState::Enabled)
        ]
    );
}

#[tokio::test]
async fn kek_attributes_sensitive_non_extractable_value_unreadable() {
    let p = provider().await;
    created(&p, "attributes").await;
    let s = session();
    let objs = key_objects(&s, "attributes");
    assert_eq!(objs.len(), 1);
    let (h, id) = &objs[0];
    assert_eq!(id, b":v1");
    for (ty, want) in [
        (AttributeType::Sensitive, true),
        (AttributeType::AlwaysSensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::NeverExtractable, true),
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Encrypt, true),
        (AttributeType::Decrypt, true),
        (AttributeType::Wrap, false),
        (AttributeType::Unwrap, false),
    ] {
        assert_eq!(bool_attr(&s, *h, ty), want, "{ty:?}");
    }
    let attrs = s
        .get_attributes(*h, &[AttributeType::KeyType, AttributeType::ValueLen])
        .unwrap();
    assert!(attrs.contains(&Attribute::KeyType(KeyType::AES)));
    assert!(attrs.contains(&Attribute::ValueLen(32.into())));
    // CKA_VALUE cannot be read, and the attributes cannot be weakened.
    assert!(matches!(
        s.get_attribute_info(*h, &[AttributeType::Value]).unwrap()[0],
        AttributeInfo::Sensitive
    ));
    assert!(s
        .get_attributes(*h, &[AttributeType::Value])
        .unwrap()
        .is_empty());
    assert!(s
        .update_attributes(*h, &[Attribute::Extractable(true)])
        .is_err());
    assert!(s
        .update_attributes(*h, &[Attribute::Sensitive(false)])
        .is_err());
    // The metadata object is private too.
    let meta = s
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(b"phi-envelope/v1 kek-meta".to_vec()),
        ])
        .unwrap();
    assert!(!meta.is_empty());
    for m in meta {
        assert!(bool_attr(&s, m, AttributeType::Private));
    }
}

#[tokio::test]
async fn gcm_invocation_limit_is_counted_on_the_token() {
    let limited = || provider_with(pkcs11_support::config().max_encryptions_per_version(3));
    let p = limited().await;
    let k = created(&p, "limit").await;
    let dek = Dek::generate().unwrap();
    let mut wrapped = Vec::new();
    for _ in 0..3 {
        wrapped.push(p.wrap(&k, &dek, &ctx("1")).await.unwrap());
    }
    let e = p.wrap(&k, &dek, &ctx("1")).await.unwrap_err();
    assert_eq!(kind(&e), K::LimitReached);
    assert!(e.to_string().contains("rotate the key"), "{e}");
    assert_eq!(p.encryptions_reserved(&k, 1).await.unwrap(), 3);
    // The count is on the token: a new provider (a restart) refuses too.
    let q = limited().await;
    assert_eq!(
        provider_kind(q.wrap(&k, &dek, &ctx("1")).await),
        K::LimitReached
    );
    // Decryption is not limited; rotation gives a fresh budget.
    assert!(matches!(
        q.unwrap(&wrapped[0], &ctx("1")).await.unwrap(),
        Unwrapped::Key(_)
    ));
    q.rotate(&k).await.unwrap();
    assert_eq!(q.wrap(&k, &dek, &ctx("1")).await.unwrap().key_version, 2);

    // With the default limit a process reserves a block at a time.
    let d = provider().await;
    let k = created(&d, "limit-default").await;
    d.wrap(&k, &dek, &ctx("1")).await.unwrap();
    assert_eq!(d.encryptions_reserved(&k, 1).await.unwrap(), 1024);
    for _ in 0..5 {
        d.wrap(&k, &dek, &ctx("1")).await.unwrap();
    }
    assert_eq!(d.encryptions_reserved(&k, 1).await.unwrap(), 1024);
}

#[tokio::test]
async fn id_only_and_label_plus_id_references() {
    let p = provider().await;
    let t = &token().label;
    for (uri, label, id) in [
        (
            format!("pkcs11:token={t};id=%01%02"),
            None,
            b"\x01\x02:v1".to_vec(),
        ),
        (
            format!("pkcs11:token={t};object=both;id=%aa"),
            Some("both"),
            b"\xaa:v1".to_vec(),
        ),
    ] {
        let k: KeyRef = uri.parse().unwrap();
        p.create_key(&k).await.unwrap();
        let dek = Dek::generate().unwrap();
        let w = p.wrap(&k, &dek, &ctx("1")).await.unwrap();
        assert!(matches!(
            p.unwrap(&w, &ctx("1")).await.unwrap(),
            Unwrapped::Key(_)
        ));
        let s = session();
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(id.clone()),
        ];
        if let Some(l) = label {
            template.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        assert_eq!(s.find_objects(&template).unwrap().len(), 1, "{uri}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_recipient_with_the_local_keystore_when_the_hsm_is_absent() {
    use phi_envelope::provider::local::LocalKeystore;
    let p: Arc<dyn KeyProvider> = Arc::new(provider().await);
    let hsm_key = key("multi-recipient");
    p.create_key(&hsm_key).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys")).unwrap();
    let local_key: KeyRef = "local:dr".parse().unwrap();
    store.add_key(&local_key).unwrap();
    let local: Arc<dyn KeyProvider> = Arc::new(store);

    let both = Envelope::new(
        Keyring::builder()
            .provider(p.clone())
            .provider(local.clone())
            .recipient(hsm_key.clone())
            .recipient(local_key.clone())
            .build()
            .unwrap(),
    );
    let sealed = both.seal(b"to both", &ctx("1")).await.unwrap();
    let h = Header::parse(&sealed).unwrap().0;
    let providers: Vec<&str> = h.recipients().iter().map(|r| r.provider.as_str()).collect();
    assert_eq!(providers, ["pkcs11", "local"]);
    // A site without the HSM (the provider not configured) opens it with
    // the local key.
    let local_only = Envelope::new(Keyring::builder().provider(local).build().unwrap());
    assert_eq!(
        local_only.open(&sealed, &ctx("1")).await.unwrap(),
        b"to both"
    );
    // And the HSM alone opens it too.
    let hsm_only = Envelope::new(Keyring::builder().provider(p.clone()).build().unwrap());
    assert_eq!(hsm_only.open(&sealed, &ctx("1")).await.unwrap(), b"to both");
    // With the HSM version destroyed, the local recipient still opens it.
    p.rotate(&hsm_key).await.unwrap();
    p.destroy(&hsm_key, 1).await.unwrap();
    assert_eq!(both.open(&sealed, &ctx("1")).await.unwrap(), b"to both");
    assert_eq!(
        kind(&hsm_only.open(&sealed, &ctx("1")).await.unwrap_err()),
        K::KeyDestroyed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn sixty_four_concurrent_tasks_share_a_small_pool() {
    let p = Arc::new(provider_with(pkcs11_support::config().pool_size(4)).await);
    let k = created(&p, "concurrent").await;
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let (p, k) = (p.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..8u32 {
                let c = ctx(&format!("{t}-{i}"));
                let dek = Dek::generate().unwrap();
                let w = p.wrap(&k, &dek, &c).await.unwrap();
                match p.unwrap(&w, &c).await.unwrap() {
                    Unwrapped::Key(d) => assert_eq!(d.expose_secret(), dek.expose_secret()),
                    other => panic!("{other:?}"),
                }
                if i == 0 {
                    assert!(matches!(
                        p.unwrap(&w, &ctx("wrong")).await.unwrap(),
                        Unwrapped::Rejected
                    ));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The pool never held more than its size.
    let t = token();
    let slot = pkcs11_support::find_slot(&t.ctx, &t.label);
    if let Some(n) = t.ctx.get_token_info(slot).unwrap().session_count() {
        // Other tests of this binary run at the same time; a loose bound.
        assert!(n <= 64, "{n} sessions open");
    }
}

#[test]
fn works_on_a_current_thread_runtime_without_timers() {
    // No `enable_time`, no `enable_io`: the provider needs only
    // spawn_blocking, and never blocks the runtime's one thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let p = provider().await;
        let k = created(&p, "current-thread").await;
        let env = envelope(Arc::new(p), &k);
        let sealed = env.seal(b"single thread", &ctx("1")).await.unwrap();
        assert_eq!(
            env.open(&sealed, &ctx("1")).await.unwrap(),
            b"single thread"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latency_against_the_token() {
    // Prints numbers; asserts nothing about time.
    let p = Arc::new(provider_with(pkcs11_support::config().pool_size(8)).await);
    let k = created(&p, "latency").await;
    let dek = Dek::generate().unwrap();
    let c = ctx("latency");
    for _ in 0..20 {
        p.wrap(&k, &dek, &c).await.unwrap(); // warm up
    }
    let n = 500;
    let mut wrap_t = Vec::with_capacity(n);
    let mut unwrap_t = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        let t0 = Instant::now();
        let w = p.wrap(&k, &dek, &c).await.unwrap();
        wrap_t.push(t0.elapsed());
        let t0 = Instant::now();
        assert!(matches!(p.unwrap(&w, &c).await.unwrap(), Unwrapped::Key(_)));
        unwrap_t.push(t0.elapsed());
        last = Some(w);
    }
    let mut rejected_t = Vec::new();
    let mut bad = last.unwrap();
    bad.wrapped[59] ^= 1;
    for _ in 0..50 {
        let t0 = Instant::now();
        assert!(matches!(
            p.unwrap(&bad, &c).await.unwrap(),
            Unwrapped::Rejected
        ));
        rejected_t.push(t0.elapsed());
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        format!("p50 {:?}  p90 {:?}  p99 {:?}", at(0.5), at(0.9), at(0.99))
    };
    // Throughput with 8 concurrent tasks (the pool size).
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (p, k) = (p.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let dek = Dek::generate().unwrap();
            let c = ctx("throughput");
            for _ in 0..100 {
                let w = p.wrap(&k, &dek, &c).await.unwrap();
                p.unwrap(&w, &c).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pairs_per_s = 800.0 / t0.elapsed().as_secs_f64();
    println!(
        "pkcs11 latency on SoftHSM2 ({} build, {n} sequential ops):\n  wrap     {}\n  unwrap   {}\n  rejected {}\n  8 tasks: {pairs_per_s:.0} wrap+unwrap pairs/s",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        stats(&mut wrap_t),
        stats(&mut unwrap_t),
        stats(&mut rejected_t),
    );
}
