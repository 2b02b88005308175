//! A key provider written the way an application would add Vault or GCP KMS
//! outside the crate: only phi-envelope's public API, its own crypto
//! (RustCrypto AES-256-GCM), keys in memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use phi_envelope::provider::{
    BoxFuture, KeyIdentity, KeyInfo, KeyProvider, KeyRefKind, KeyState, KeyVersionInfo,
    ProviderError, ProviderErrorKind, Unwrapped,
};
use phi_envelope::{Dek, EncryptionContext, KeyRef, Result, WrappedKey};
use zeroize::Zeroizing;

/// One KEK version: bytes and state.
struct Version {
    key: Zeroizing<[u8; 32]>,
    state: KeyState,
    created_at: SystemTime,
}

/// An in-memory provider with id `id` and keys `ID:NAME`.
#[derive(Default)]
pub struct MemoryKms {
    id: String,
    keys: Mutex<BTreeMap<String, Vec<Version>>>,
    /// When set, every call fails as if the service were down.
    pub down: AtomicBool,
    /// Number of provider calls made (wrap, unwrap, generate).
    pub calls: AtomicUsize,
    /// When non-zero: the service goes down once `calls` exceeds it (a
    /// failure midway through a multi-call operation).
    pub down_after_calls: AtomicUsize,
    /// When set, `rotate` fails (and changes nothing).
    pub fail_rotate: AtomicBool,
    /// The canonical encoding of every encryption context that `wrap` and
    /// `unwrap` were given: all that a provider learns of a message's
    /// bindings.
    pub contexts: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for MemoryKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryKms")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MemoryKms {
    pub fn new(id: &str) -> Self {
        MemoryKms {
            id: id.to_owned(),
            ..Default::default()
        }
    }

    /// Adds a key with version 1 enabled and returns its reference.
    pub fn add_key(&self, name: &str) -> KeyRef {
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(Dek::generate().unwrap().expose_secret());
        self.keys.lock().unwrap().insert(
            name.to_owned(),
            vec![Version {
                key,
                state: KeyState::Enabled,
                created_at: SystemTime::now(),
            }],
        );
        format!("{}:{name}", self.id).parse().unwrap()
    }

    /// Makes `version` of key `name` look `age` old (its creation time
    /// moved back), to test cryptoperiods without waiting.
    pub fn backdate(&self, name: &str, version: u32, age: Duration) {
        let mut keys = self.keys.lock().unwrap();
        let v = &mut keys.get_mut(name).unwrap()[version as usize - 1];
        v.created_at = SystemTime::now() - age;
    }

    fn not_found(&self) -> phi_envelope::Error {
        ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "no such key").into()
    }

    fn name_of(&self, key: &KeyRef) -> Option<String> {
        match key.kind() {
            KeyRefKind::Custom { scheme, rest } if scheme == &self.id => Some(rest.clone()),
            _ => None,
        }
    }

    fn check_up(&self) -> Result<()> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let limit = self.down_after_calls.load(Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) || (limit != 0 && n > limit) {
            return Err(ProviderError::new(
                &self.id,
                ProviderErrorKind::Unavailable,
                "service unreachable (simulated)",
            )
            .into());
        }
        Ok(())
    }

    fn aad(key: &KeyRef, version: u32, ctx: &EncryptionContext) -> Vec<u8> {
        let mut aad = key.as_str().as_bytes().to_vec();
        aad.push(0);
        aad.extend_from_slice(&version.to_be_bytes());
        aad.extend_from_slice(&ctx.canonical_pairs());
        aad
    }
}

impl KeyProvider for MemoryKms {
    fn id(&self) -> &str {
        &self.id
    }

    /// `ID:NAME` is the only spelling of a key: its identity.
    fn identity<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        let id = self
            .name_of(key)
            .map(|_| KeyIdentity::new(&self.id, key.as_str()));
        Box::pin(async move { Ok(id) })
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move {
            self.contexts
                .lock()
                .unwrap()
                .push(context.canonical_pairs());
            self.check_up()?;
            let name = self.name_of(key).ok_or_else(|| {
                ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "not my key")
            })?;
            let keys = self.keys.lock().unwrap();
            let versions = keys.get(&name).ok_or_else(|| {
                ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "no such key")
            })?;
            let (i, v) = versions
                .iter()
                .enumerate()
                .rev()
                .find(|(_, v)| v.state == KeyState::Enabled)
                .ok_or_else(|| {
                    ProviderError::new(
                        &self.id,
                        ProviderErrorKind::KeyDisabled,
                        "no enabled version",
                    )
                })?;
            let version = i as u32 + 1;
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&Dek::generate().unwrap().expose_secret()[..12]);
            let cipher = Aes256Gcm::new_from_slice(&v.key[..]).unwrap();
            let aad = Self::aad(key, version, context);
            let ct = cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: dek.expose_secret(),
                        aad: &aad,
                    },
                )
                .unwrap();
            Ok(WrappedKey {
                provider: self.id.clone(),
                key_ref: key.to_string(),
                key_version: version,
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
            self.contexts
                .lock()
                .unwrap()
                .push(context.canonical_pairs());
            let Ok(key) = entry.key_ref.parse::<KeyRef>() else {
                return Ok(Unwrapped::NotMine);
            };
            let Some(name) = self.name_of(&key) else {
                return Ok(Unwrapped::NotMine);
            };
            self.check_up()?;
            let keys = self.keys.lock().unwrap();
            let Some(v) = keys
                .get(&name)
                .and_then(|vs| vs.get((entry.key_version as usize).wrapping_sub(1)))
            else {
                return Ok(Unwrapped::NotMine);
            };
            if v.state == KeyState::Destroyed {
                return Err(ProviderError::new(
                    &self.id,
                    ProviderErrorKind::KeyDestroyed,
                    "destroyed",
                )
                .into());
            }
            if v.state == KeyState::Disabled {
                return Err(ProviderError::new(
                    &self.id,
                    ProviderErrorKind::KeyDisabled,
                    "disabled",
                )
                .into());
            }
            if entry.wrapped.len() != 12 + 48 {
                return Ok(Unwrapped::Rejected);
            }
            let cipher = Aes256Gcm::new_from_slice(&v.key[..]).unwrap();
            let aad = Self::aad(&key, entry.key_version, context);
            match cipher.decrypt(
                Nonce::from_slice(&entry.wrapped[..12]),
                Payload {
                    msg: &entry.wrapped[12..],
                    aad: &aad,
                },
            ) {
                Ok(pt) => {
                    let pt = Zeroizing::new(pt);
                    Ok(Unwrapped::Key(Dek::from_slice(&pt)?))
                }
                Err(_) => Ok(Unwrapped::Rejected),
            }
        })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = self.name_of(key).ok_or_else(|| {
                ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "not my key")
            })?;
            let keys = self.keys.lock().unwrap();
            let versions = keys.get(&name).ok_or_else(|| {
                ProviderError::new(&self.id, ProviderErrorKind::KeyNotFound, "no such key")
            })?;
            let infos: Vec<KeyVersionInfo> = versions
                .iter()
                .enumerate()
                .map(|(i, v)| KeyVersionInfo::new(i as u32 + 1, v.state, Some(v.created_at)))
                .collect();
            let primary = infos
                .iter()
                .rev()
                .find(|v| v.state == KeyState::Enabled)
                .map(|v| v.version);
            Ok(KeyInfo::new(key.clone(), primary, infos))
        })
    }

    fn create_key<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = self.name_of(key).ok_or_else(|| self.not_found())?;
            if self.keys.lock().unwrap().contains_key(&name) {
                return Err(ProviderError::new(
                    &self.id,
                    ProviderErrorKind::InvalidState,
                    "key exists",
                )
                .into());
            }
            self.add_key(&name);
            self.describe(key).await
        })
    }

    /// Same rules as the local keystore: a new enabled version, the old
    /// primary decrypt-only; `fail_rotate` makes it fail with no change.
    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            if self.fail_rotate.load(Ordering::SeqCst) {
                return Err(ProviderError::new(
                    &self.id,
                    ProviderErrorKind::Unavailable,
                    "rotation failed (simulated)",
                )
                .into());
            }
            {
                let name = self.name_of(key).ok_or_else(|| self.not_found())?;
                let mut keys = self.keys.lock().unwrap();
                let versions = keys.get_mut(&name).ok_or_else(|| self.not_found())?;
                for v in versions.iter_mut() {
                    if v.state == KeyState::Enabled {
                        v.state = KeyState::DecryptOnly;
                    }
                }
                let mut bytes = Zeroizing::new([0u8; 32]);
                bytes.copy_from_slice(Dek::generate().unwrap().expose_secret());
                versions.push(Version {
                    key: bytes,
                    state: KeyState::Enabled,
                    created_at: SystemTime::now(),
                });
            }
            self.describe(key).await
        })
    }

    /// Same rules as the local keystore: nothing leaves destroyed,
    /// `Destroyed` only through `destroy`, enabling makes the primary.
    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            {
                let name = self.name_of(key).ok_or_else(|| self.not_found())?;
                let mut keys = self.keys.lock().unwrap();
                let versions = keys.get_mut(&name).ok_or_else(|| self.not_found())?;
                let idx = (version as usize)
                    .checked_sub(1)
                    .filter(|i| *i < versions.len())
                    .ok_or_else(|| self.not_found())?;
                if state == KeyState::Destroyed {
                    return Err(ProviderError::new(
                        &self.id,
                        ProviderErrorKind::InvalidState,
                        "use destroy",
                    )
                    .into());
                }
                if versions[idx].state == KeyState::Destroyed {
                    return Err(ProviderError::new(
                        &self.id,
                        ProviderErrorKind::KeyDestroyed,
                        "destroyed",
                    )
                    .into());
                }
                if state == KeyState::Enabled {
                    for v in versions.iter_mut() {
                        if v.state == KeyState::Enabled {
                            v.state = KeyState::DecryptOnly;
                        }
                    }
                }
                versions[idx].state = state;
            }
            self.describe(key).await
        })
    }

    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            {
                let name = self.name_of(key).unwrap();
                let mut keys = self.keys.lock().unwrap();
                let v = &mut keys.get_mut(&name).unwrap()[version as usize - 1];
                v.key = Zeroizing::new([0; 32]);
                v.state = KeyState::Destroyed;
            }
            self.describe(key).await
        })
    }
}
