//! PKCS#11 cases that disturb the whole module of the process or write to
//! the token behind the provider's back: a wrong PIN (PKCS#11 login state is
//! per process, so the token checks a PIN only while nobody is logged in), a
//! PIN changed under a running provider, a logout, `C_Finalize` by someone
//! else, the token unreachable (multi-recipient with the local keystore
//! then), objects created or destroyed with the token's own tools.
//!
//! They run one at a time (a process-wide lock) in this binary's own
//! process and token; `pkcs11.rs` holds the cases that can share.
#![cfg(feature = "pkcs11")]

mod pkcs11_support;

use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::types::AuthPin;
use phi_envelope::provider::pkcs11::{Pin, Pkcs11Config, Pkcs11Provider};
use phi_envelope::provider::{KeyProvider, ProviderErrorKind as K, Unwrapped};
use phi_envelope::{Dek, EncryptionContext, Envelope, KeyRef, Keyring};
use pkcs11_support::{key, key_objects, kind, provider, session, token};

/// One case at a time.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    token();
    // A previous case may have left the library finalized.
    match token()
        .ctx
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
    {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("initializing the module: {e}"),
    }
    guard
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn ctx(record: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", record)
        .unwrap()
}

/// Logs the process out of the token (C_Logout on any session logs out
/// every session of the process).
fn logout_everyone() {
    let s = session();
    match s.logout() {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
        Err(e) => panic!("logout: {e}"),
    }
}

async fn round_trip(p: &Pkcs11Provider, k: &KeyRef) {
    let dek = Dek::generate().unwrap();
    let w = p.wrap(k, &dek, &ctx("rt")).await.expect("wrap");
    match p.unwrap(&w, &ctx("rt")).await.expect("unwrap") {
        Unwrapped::Key(d) => assert_eq!(d.expose_secret(), dek.expose_secret()),
        other => panic!("expected the key, got {other:?}"),
    }
}

#[test]
fn wrong_pin_is_access_denied_and_never_shown() {
    let _g = exclusive();
    runtime().block_on(async {
        logout_everyone();
        let t = token();
        let wrong = "wrong-pin-98765";
        let config = Pkcs11Config::new(&t.module, &t.label, Pin::new(wrong.to_owned().into()));
        assert!(!format!("{config:?}").contains(wrong));
        let e = Pkcs11Provider::connect(config).await.unwrap_err();
        assert_eq!(kind(&e), K::AccessDenied);
        let text = format!("{e} {e:?}");
        assert!(text.contains("check the PIN"), "{text}");
        assert!(!text.contains(wrong), "the PIN leaked: {text}");
        // The right PIN works (one wrong attempt locked nothing).
        let p = provider().await;
        let pin = std::env::var("PHI_PKCS11_PIN").unwrap();
        assert!(!format!("{p:?}").contains(&pin));
        let k = key("after-wrong-pin");
        p.create_key(&k).await.unwrap();
        round_trip(&p, &k).await;
    });
}

/// Puts the user PIN back, even when the case fails.
struct RestorePin {
    new: &'static str,
    old: String,
}

impl Drop for RestorePin {
    fn drop(&mut self) {
        let t = token();
        let s = t
            .ctx
            .open_rw_session(pkcs11_support::find_slot(&t.ctx, &t.label))
            .unwrap();
        match s.login(
            cryptoki::session::UserType::User,
            Some(&AuthPin::new(self.new.into())),
        ) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("restoring the PIN: {e}"),
        }
        s.set_pin(
            &AuthPin::new(self.new.into()),
            &AuthPin::new(self.old.clone().into()),
        )
        .unwrap();
        s.logout().unwrap();
    }
}

#[test]
fn a_pin_changed_under_a_running_provider_is_tried_once_then_refused() {
    let _g = exclusive();
    runtime().block_on(async {
        let p = provider().await;
        let k = key("pin-change");
        p.create_key(&k).await.unwrap();
        round_trip(&p, &k).await;
        let old = std::env::var("PHI_PKCS11_PIN").unwrap();
        let new = "changed-pin-4321";
        let s = session();
        s.set_pin(&AuthPin::new(old.clone().into()), &AuthPin::new(new.into()))
            .unwrap();
        let restore = RestorePin {
            new,
            old: old.clone(),
        };
        s.logout().unwrap();
        // The provider notices the lost login, presents its (now wrong) PIN
        // once, and then refuses without presenting it again.
        let e = p
            .wrap(&k, &Dek::generate().unwrap(), &ctx("1"))
            .await
            .unwrap_err();
        assert_eq!(kind(&e), K::AccessDenied, "{e}");
        assert!(e.to_string().contains("check the PIN"), "{e}");
        let e = p
            .wrap(&k, &Dek::generate().unwrap(), &ctx("1"))
            .await
            .unwrap_err();
        assert_eq!(kind(&e), K::AccessDenied, "{e}");
        assert!(e.to_string().contains("does not present it again"), "{e}");
        drop(s);
        drop(restore);
        let q = provider().await;
        round_trip(&q, &k).await;
    });
}

#[test]
fn recovers_after_a_logout() {
    let _g = exclusive();
    runtime().block_on(async {
        let p = provider().await;
        let k = key("logout");
        p.create_key(&k).await.unwrap();
        round_trip(&p, &k).await;
        logout_everyone();
        // Nothing private is visible to a logged-out session: the provider
        // sees the logout, logs in again and retries.
        round_trip(&p, &k).await;
        logout_everyone();
        assert_eq!(p.describe(&k).await.unwrap().primary_version, Some(1));
    });
}

#[test]
fn recovers_after_the_library_is_finalized() {
    let _g = exclusive();
    runtime().block_on(async {
        let p = Arc::new(provider().await);
        let second = Arc::new(provider().await); // another provider on the module
        let k = key("finalized");
        p.create_key(&k).await.unwrap();
        round_trip(&p, &k).await;
        round_trip(&second, &k).await;
        // Someone in the process calls C_Finalize between our calls (while
        // calls are in flight it is undefined behaviour in PKCS#11, and
        // SoftHSM2 crashes): every session is gone, the library is down.
        token().ctx.clone().finalize().unwrap();
        // Sixteen tasks notice at once; the library is initialized again
        // once, every one of them recovers and succeeds.
        let mut tasks = Vec::new();
        for t in 0..16u32 {
            let (p, k) = (
                if t % 2 == 0 {
                    p.clone()
                } else {
                    second.clone()
                },
                k.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    round_trip(&p, &k).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(p.describe(&k).await.unwrap().primary_version, Some(1));
    });
}

#[test]
fn recovers_when_someone_else_finalizes_and_initializes_again() {
    let _g = exclusive();
    runtime().block_on(async {
        let p = provider().await;
        let k = key("reinitialized");
        p.create_key(&k).await.unwrap();
        round_trip(&p, &k).await;
        // The library comes back before the provider notices: its session
        // handles are stale (CKR_SESSION_HANDLE_INVALID), not the library.
        let ctx = &token().ctx;
        ctx.clone().finalize().unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        round_trip(&p, &k).await;
        assert_eq!(p.describe(&k).await.unwrap().primary_version, Some(1));
    });
}

#[test]
fn token_unreachable_multi_recipient_opens_with_the_local_keystore() {
    use phi_envelope::provider::local::LocalKeystore;
    let _g = exclusive();
    runtime().block_on(async {
        let hsm = Arc::new(provider().await);
        let hsm_key = key("unreachable");
        hsm.create_key(&hsm_key).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys")).unwrap();
        let local_key: KeyRef = "local:dr".parse().unwrap();
        store.add_key(&local_key).unwrap();
        let hsm_dyn: Arc<dyn KeyProvider> = hsm.clone();
        let both = Envelope::new(
            Keyring::builder()
                .provider(hsm_dyn)
                .provider(Arc::new(store))
                .recipient(hsm_key.clone())
                .recipient(local_key)
                .build()
                .unwrap(),
        );
        let sealed = both.seal(b"dr copy", &ctx("1")).await.unwrap();

        // The token becomes unreachable: the library is finalized and
        // cannot be initialized again (its configuration is gone).
        let conf = std::env::var("SOFTHSM2_CONF").unwrap();
        std::env::set_var("SOFTHSM2_CONF", "/nonexistent/softhsm2.conf");
        token().ctx.clone().finalize().unwrap();
        let e = hsm
            .wrap(&hsm_key, &Dek::generate().unwrap(), &ctx("1"))
            .await
            .unwrap_err();
        assert_eq!(kind(&e), K::Unavailable, "{e}");
        assert!(e.to_string().contains("retry"), "{e}");
        // The HSM entry comes first and fails; the local one opens it.
        assert_eq!(both.open(&sealed, &ctx("1")).await.unwrap(), b"dr copy");
        // Sealing needs every recipient.
        assert_eq!(
            kind(&both.seal(b"x", &ctx("1")).await.unwrap_err()),
            K::Unavailable
        );

        // The token is back: the provider recovers by itself.
        std::env::set_var("SOFTHSM2_CONF", conf);
        round_trip(&hsm, &hsm_key).await;
        assert_eq!(both.open(&sealed, &ctx("1")).await.unwrap(), b"dr copy");
    });
}

#[test]
fn a_version_deleted_with_token_tools_reads_as_destroyed() {
    let _g = exclusive();
    runtime().block_on(async {
        let p = provider().await;
        let k = key("deleted-outside");
        p.create_key(&k).await.unwrap();
        let w1 = p
            .wrap(&k, &Dek::generate().unwrap(), &ctx("1"))
            .await
            .unwrap();
        p.rotate(&k).await.unwrap();
        let s = session();
        let (h, _) = key_objects(&s, "deleted-outside")
            .into_iter()
            .find(|(_, id)| id == b":v1")
            .unwrap();
        s.destroy_object(h).unwrap();
        let e = p.unwrap(&w1, &ctx("1")).await.unwrap_err();
        assert_eq!(kind(&e), K::KeyDestroyed, "{e}");
        assert!(e.to_string().contains("outside phi-envelope"), "{e}");
    });
}

#[test]
fn a_key_created_with_token_tools_is_used() {
    let _g = exclusive();
    runtime().block_on(async {
        // As an operator would with pkcs11-tool: a label, CKA_ID ":v1", no
        // metadata object.
        let s = session();
        s.generate_key(
            &cryptoki::mechanism::Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(b"made-by-hand".to_vec()),
                Attribute::Id(b":v1".to_vec()),
            ],
        )
        .unwrap();
        let p = provider().await;
        let k = key("made-by-hand");
        let info = p.describe(&k).await.unwrap();
        assert_eq!(info.primary_version, Some(1));
        assert_eq!(info.versions[0].created_at, None);
        round_trip(&p, &k).await;
        assert_eq!(p.rotate(&k).await.unwrap().primary_version, Some(2));
        round_trip(&p, &k).await;
    });
}
