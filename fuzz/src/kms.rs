//! A deterministic in-memory key provider for fuzzing through the envelope
//! API, and a `block_on` for the futures it returns (always ready: no
//! runtime needed).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use phi_envelope::provider::{
    BoxFuture, KeyInfo, KeyProvider, KeyRefKind, KeyState, KeyVersionInfo, ProviderError,
    ProviderErrorKind, Unwrapped,
};
use phi_envelope::{Dek, EncryptionContext, Envelope, KeyRef, Keyring, Result, WrappedKey};
use sha2::Sha256;

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Keys `ID:a` and `ID:b` with versions 1 and 2 (2 primary), and `ID:down`,
/// which always fails as unavailable. Wrapped DEKs are `nonce || AES-256-GCM`
/// under a KEK derived from the id, name and version, with the key
/// reference, version and canonical context as AAD.
#[derive(Debug)]
pub struct FuzzKms {
    id: String,
}

impl FuzzKms {
    pub fn new(id: &str) -> FuzzKms {
        FuzzKms { id: id.to_owned() }
    }

    fn kek(&self, name: &str, version: u32) -> Option<[u8; 32]> {
        if !matches!(name, "a" | "b") || !(1..=2).contains(&version) {
            return None;
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"phi-envelope fuzz kek").unwrap();
        mac.update(self.id.as_bytes());
        mac.update(&[0]);
        mac.update(name.as_bytes());
        mac.update(&version.to_be_bytes());
        Some(mac.finalize().into_bytes().into())
    }

    fn name_of<'k>(&self, key: &'k KeyRef) -> Option<&'k str> {
        match key.kind() {
            KeyRefKind::Custom { scheme, rest } if *scheme == self.id => Some(rest),
            _ => None,
        }
    }

    fn down(&self) -> phi_envelope::Error {
        ProviderError::new(&self.id, ProviderErrorKind::Unavailable, "down (simulated)").into()
    }

    fn aad(key_ref: &str, version: u32, context: &EncryptionContext) -> Vec<u8> {
        [
            key_ref.as_bytes(),
            &[0],
            &version.to_be_bytes(),
            &context.canonical_pairs(),
        ]
        .concat()
    }
}

impl KeyProvider for FuzzKms {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move {
            let name = self.name_of(key).ok_or_else(|| {
                ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "not mine")
            })?;
            if name == "down" {
                return Err(self.down());
            }
            let kek = self.kek(name, 2).ok_or_else(|| {
                ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "no such key")
            })?;
            let mut nonce = [0u8; 12];
            phi_envelope::primitives::fill_random(&mut nonce)?;
            let ct = Aes256Gcm::new_from_slice(&kek)
                .unwrap()
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: dek.expose_secret(),
                        aad: &Self::aad(key.as_str(), 2, context),
                    },
                )
                .unwrap();
            Ok(WrappedKey {
                provider: self.id.clone(),
                key_ref: key.to_string(),
                key_version: 2,
                wrapped: [&nonce[..], &ct].concat(),
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move {
            if entry.provider != self.id {
                return Ok(Unwrapped::NotMine);
            }
            let Ok(key) = KeyRef::parse(&entry.key_ref) else {
                return Ok(Unwrapped::NotMine);
            };
            let Some(name) = self.name_of(&key) else {
                return Ok(Unwrapped::NotMine);
            };
            if name == "down" {
                return Err(self.down());
            }
            let Some(kek) = self.kek(name, entry.key_version) else {
                return Ok(Unwrapped::NotMine);
            };
            if entry.wrapped.len() != 12 + 32 + 16 {
                return Ok(Unwrapped::Rejected);
            }
            let pt = Aes256Gcm::new_from_slice(&kek).unwrap().decrypt(
                Nonce::from_slice(&entry.wrapped[..12]),
                Payload {
                    msg: &entry.wrapped[12..],
                    aad: &Self::aad(&entry.key_ref, entry.key_version, context),
                },
            );
            match pt {
                Ok(pt) => {
                    let pt = zeroize_vec(pt);
                    Ok(Unwrapped::Key(Dek::from_slice(&pt.0)?))
                }
                Err(_) => Ok(Unwrapped::Rejected),
            }
        })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            Ok(KeyInfo::new(
                key.clone(),
                Some(2),
                vec![
                    KeyVersionInfo::new(1, KeyState::DecryptOnly, None),
                    KeyVersionInfo::new(2, KeyState::Enabled, None),
                ],
            ))
        })
    }
}

/// A buffer zeroed on drop (the fuzz crate has no zeroize dependency of its
/// own; this is enough for test keys).
struct Wiped(Vec<u8>);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

fn zeroize_vec(v: Vec<u8>) -> Wiped {
    Wiped(v)
}

/// The envelope the targets use: providers `fuzz` and `fuzz-dr`, sealing
/// to `fuzz:a` and `fuzz-dr:b`.
pub fn envelope() -> &'static Envelope {
    static E: std::sync::OnceLock<Envelope> = std::sync::OnceLock::new();
    E.get_or_init(|| {
        let keyring = Keyring::builder()
            .provider(Arc::new(FuzzKms::new("fuzz")))
            .provider(Arc::new(FuzzKms::new("fuzz-dr")))
            .recipient("fuzz:a".parse().unwrap())
            .recipient("fuzz-dr:b".parse().unwrap())
            .context_fingerprint_key(&[7u8; 32])
            .build()
            .expect("keyring");
        Envelope::new(keyring).as_caller("fuzzer", "fuzzing")
    })
}

/// The encryption contexts the targets choose from by a selector byte.
pub fn contexts() -> &'static [EncryptionContext] {
    static C: std::sync::OnceLock<Vec<EncryptionContext>> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        vec![
            EncryptionContext::new(),
            EncryptionContext::from_pairs([("tenant", "st-mary"), ("record_id", "42")]).unwrap(),
            EncryptionContext::from_pairs([("backup", "2026-11-25")]).unwrap(),
            EncryptionContext::from_pairs([("a", ""), ("b", "x=y;z")]).unwrap(),
        ]
    })
}
