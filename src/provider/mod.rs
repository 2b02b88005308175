//! Key providers: where key-encryption keys (KEKs) live.
//!
//! A provider generates data-encryption keys (DEKs) and wraps and unwraps
//! them under a named, versioned KEK that never leaves it. phi-envelope ships
//! the local keystore (`local`, default feature `local`), a PKCS#11 HSM provider
//! (feature `pkcs11`), an AWS KMS provider (feature `aws-kms`) and a
//! Vault / OpenBao Transit provider (feature `vault`), an offline recovery
//! recipient (feature `recovery`);
//! applications add their own (Vault, GCP, Azure) by implementing
//! [`KeyProvider`] outside the crate.
//!
//! The trait is object-safe and held as `Arc<dyn KeyProvider>`. Its methods
//! are async and return boxed `Send` futures; phi-envelope never owns a
//! runtime and never blocks on a future. Capabilities beyond wrap and unwrap
//! (rotation, state changes, destruction) are defaulted methods that answer
//! [`ProviderErrorKind::Unsupported`], so adding one never breaks a provider.
//!
//! Every call receives the caller's [`EncryptionContext`]; a provider binds
//! it to the wrapped key (as GCM AAD in the local keystore and the HSM, as the
//! KMS encryption context in AWS KMS) so that a wrapped DEK unwraps only
//! under the context it was made for.

#[cfg(feature = "aws-kms")]
pub mod aws_kms;
mod keyref;
#[cfg(feature = "local")]
pub mod local;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "recovery")]
pub mod recovery;
#[cfg(feature = "vault")]
pub mod vault;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

pub use keyref::{KeyRef, KeyRefKind, Pkcs11Uri};

use crate::error::{Error, Result};
use crate::format::{EncryptionContext, WrappedKey};
use crate::primitives::Dek;

/// A boxed, `Send` future: what every provider method returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A fresh DEK and its wrapped form under one KEK.
#[derive(Debug)]
pub struct GeneratedDek {
    /// The plaintext DEK (zeroized on drop).
    pub dek: Dek,
    /// The DEK wrapped under the KEK's primary version.
    pub wrapped: WrappedKey,
}

/// The answer of [`KeyProvider::unwrap`]: not my key, my key but it failed,
/// or the key.
#[derive(Debug)]
#[non_exhaustive]
pub enum Unwrapped {
    /// The entry names a key this provider does not hold.
    NotMine,
    /// The entry is for one of this provider's keys, but the wrapped DEK did
    /// not authenticate (wrong context, tampered or foreign wrapped key). The
    /// caller reports this only as the opaque [`Error::Decrypt`].
    Rejected,
    /// The unwrapped DEK.
    Key(Dek),
}

/// The lifecycle state of one KEK version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum KeyState {
    /// Usable for encryption and decryption; the primary version is enabled.
    Enabled,
    /// Usable for decryption only (a version that rotation superseded).
    DecryptOnly,
    /// Usable for nothing until re-enabled; the key material still exists.
    Disabled,
    /// The key material is gone: everything wrapped under this version is
    /// unreadable for good (crypto-shredding).
    Destroyed,
}

impl KeyState {
    /// A stable lowercase name (`enabled`, `decrypt-only`, `disabled`,
    /// `destroyed`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// True when a DEK wrapped under this version may be unwrapped.
    pub fn can_decrypt(self) -> bool {
        matches!(self, KeyState::Enabled | KeyState::DecryptOnly)
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One version of a KEK.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyVersionInfo {
    /// The version number (1, 2, ...).
    pub version: u32,
    /// Its state.
    pub state: KeyState,
    /// When it was created, where the provider knows.
    pub created_at: Option<SystemTime>,
}

impl KeyVersionInfo {
    /// Describes a version.
    pub fn new(version: u32, state: KeyState, created_at: Option<SystemTime>) -> Self {
        KeyVersionInfo {
            version,
            state,
            created_at,
        }
    }
}

/// What a provider knows of a KEK: its versions and which one is primary.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The key's canonical reference.
    pub key_ref: KeyRef,
    /// The version new DEKs are wrapped under, if any is enabled.
    pub primary_version: Option<u32>,
    /// Every version, ascending.
    pub versions: Vec<KeyVersionInfo>,
}

impl KeyInfo {
    /// Describes a key.
    pub fn new(
        key_ref: KeyRef,
        primary_version: Option<u32>,
        versions: Vec<KeyVersionInfo>,
    ) -> Self {
        KeyInfo {
            key_ref,
            primary_version,
            versions,
        }
    }

    /// The entry for `version`.
    pub fn version(&self, version: u32) -> Option<&KeyVersionInfo> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The primary version's entry.
    pub fn primary(&self) -> Option<&KeyVersionInfo> {
        self.primary_version.and_then(|v| self.version(v))
    }
}

/// What a key *is*, whatever it is called: the canonical name of one key
/// (all its versions) in one provider.
///
/// A key can have many spellings: an AWS KMS key is named by its key id,
/// key ARN, alias or alias ARN; a PKCS#11 key by URIs with or without
/// `module-path`, `slot-id` or `type`. The keyring's data-key caches, its
/// key policies and its lifecycle verbs act on the identity, never on the
/// spelling: destroying a key by its ARN flushes what was cached for its
/// alias, and a key policy set on an alias applies to headers that record
/// the ARN. Providers report identities through
/// [`KeyProvider::identity`].
///
/// Two identities are the same key exactly when they are equal. The text
/// is the provider's canonical form (for AWS KMS the key ARN); it names a
/// key, never holds a secret, and may appear in logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyIdentity {
    provider: String,
    canonical: String,
}

impl KeyIdentity {
    /// The identity `canonical` of a key of the provider with id
    /// `provider`.
    pub fn new(provider: impl Into<String>, canonical: impl Into<String>) -> KeyIdentity {
        KeyIdentity {
            provider: provider.into(),
            canonical: canonical.into(),
        }
    }

    /// The id of the provider that holds the key.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The canonical name of the key.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }
}

impl fmt::Debug for KeyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyIdentity({}: {})", self.provider, self.canonical)
    }
}

impl fmt::Display for KeyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

// The provider error types sit in `crate::error`, below both the providers
// and the primitives; their public path stays here.
pub use crate::error::{ProviderError, ProviderErrorKind};

/// Shorthand for an [`Unsupported`](ProviderErrorKind::Unsupported) error.
pub fn unsupported(provider: &str, operation: &str) -> Error {
    ProviderError::new(
        provider,
        ProviderErrorKind::Unsupported,
        format!("this provider does not support {operation}"),
    )
    .into()
}

/// A source of key-encryption keys.
///
/// Implement `id`, `wrap`, `unwrap` and `describe`; `generate` defaults to a
/// fresh random DEK wrapped with `wrap`; the lifecycle verbs default to
/// [`ProviderErrorKind::Unsupported`].
///
/// Rules every implementation follows:
/// - Bind `context` to the wrapped key; an unwrap under another context is
///   [`Unwrapped::Rejected`], never a key.
/// - Copy plaintext key bytes into a [`Dek`] at once and zeroize any other
///   buffer that held them.
/// - Never put key bytes, PINs or context values into errors or logs.
/// - Never block the calling thread for long: run slow blocking calls
///   (an HSM, a network client without async support) on a blocking pool
///   (e.g. `tokio::task::spawn_blocking`) inside the returned future. Quick
///   local work (the local keystore's small file reads and writes) may run
///   inline.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// The provider's id: the scheme of its key references and the provider
    /// field of the header entries it writes (`local`, `pkcs11`, `aws-kms`).
    fn id(&self) -> &str;

    /// Wraps `dek` under the primary version of `key`, bound to `context`.
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>>;

    /// Unwraps a header entry, bound to `context`.
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>>;

    /// Describes `key`: versions, states, primary version.
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>>;

    /// Generates a fresh DEK wrapped under the primary version of `key`.
    fn generate<'a>(
        &'a self,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<GeneratedDek>> {
        Box::pin(async move {
            let dek = Dek::generate()?;
            let wrapped = self.wrap(key, &dek, context).await?;
            Ok(GeneratedDek { dek, wrapped })
        })
    }

    /// The identity of `key`: the one name of the key however `key` spells
    /// it (see [`KeyIdentity`]), or `Ok(None)` when the provider cannot tell.
    ///
    /// The keyring asks it for recipients, for header entries and for the
    /// targets of lifecycle verbs and key policies, and keeps answers for
    /// its describe TTL. What an unknown identity means: a lifecycle verb on
    /// any key of this provider flushes every cached data key of the
    /// provider, and a key policy applies only to the exact spelling it was
    /// set for. The default answers `Ok(None)`, which is always safe; a
    /// provider whose keys have one spelling only can answer
    /// `KeyIdentity::new(self.id(), key.as_str())`, and a provider with
    /// aliases resolves them (AWS KMS: DescribeKey).
    ///
    /// Answer from local information where possible, and run every local
    /// check of the reference (is it this provider's? an allowed account?)
    /// before any request. An error is treated like `Ok(None)`.
    fn identity<'a>(&'a self, _key: &'a KeyRef) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        Box::pin(async { Ok(None) })
    }

    /// The identity of the key a header entry of this provider names, for
    /// key policies and the decryption cache. The default parses
    /// `entry.key_ref` and asks [`identity`](Self::identity).
    ///
    /// Header entries come from messages, that is from whoever wrote them:
    /// override this where resolving a reference could reach someone else
    /// (AWS KMS answers `None` for an alias in a header, which it never
    /// writes, rather than ask the alias's owner). No request may be made
    /// for an entry that [`unwrap`](Self::unwrap) would not use.
    fn entry_identity<'a>(
        &'a self,
        entry: &'a WrappedKey,
    ) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        Box::pin(async move {
            match KeyRef::parse(&entry.key_ref) {
                Ok(key) if entry.provider == self.id() => self.identity(&key).await,
                _ => Ok(None),
            }
        })
    }

    /// False when this provider wraps to the key that `entry` (one of its
    /// own) names but, by design, cannot unwrap it here: the recovery
    /// recipient holding only a public key, whose private key is offline.
    /// The check of a rewrapped file's header, which unwraps every new
    /// entry, then skips that entry instead of failing (another entry must
    /// still verify). Decryption still asks [`unwrap`](Self::unwrap), whose
    /// error says what to do. The default is true.
    fn can_unwrap(&self, _entry: &WrappedKey) -> bool {
        true
    }

    /// True when this provider's futures may need an async runtime to
    /// complete: a reactor for network I/O (AWS KMS, Vault), a blocking
    /// pool (PKCS#11's `spawn_blocking`), timers. False only for a provider
    /// whose futures always complete on their first poll, without waiting
    /// for anything (the local keystore, the recovery recipient): the
    /// [blocking facade](crate::blocking) then runs them on the calling
    /// thread with no runtime at all, and refuses a keyring holding any
    /// provider that answers true unless it is given a runtime. The default
    /// is true, which is always safe.
    fn needs_runtime(&self) -> bool {
        true
    }

    /// True when [`rewrap`](Self::rewrap) is implemented.
    fn supports_rewrap(&self) -> bool {
        false
    }

    /// Re-wraps an entry of this provider under the primary version of
    /// `key` inside the provider (AWS KMS ReEncrypt), so the plaintext DEK is
    /// not sent to it again. Called only when
    /// [`supports_rewrap`](Self::supports_rewrap) is true; `Ok(None)` means
    /// "not for this entry": the keyring then wraps the DEK itself. (The
    /// keyring still unwraps the DEK once: it keys the header tag.)
    fn rewrap<'a>(
        &'a self,
        _entry: &'a WrappedKey,
        _key: &'a KeyRef,
        _context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Option<WrappedKey>>> {
        Box::pin(async { Ok(None) })
    }

    /// Creates a new key with version 1 enabled and primary.
    fn create_key<'a>(&'a self, _key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { Err(unsupported(self.id(), "creating keys")) })
    }

    /// Makes a new version primary; the old primary becomes decrypt-only. A
    /// failure leaves the old primary in place.
    fn rotate<'a>(&'a self, _key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { Err(unsupported(self.id(), "rotation")) })
    }

    /// Moves `version` to `state`: `Enabled` makes that version the primary
    /// (the old primary becomes decrypt-only), `DecryptOnly` and `Disabled`
    /// as named; `Destroyed` is only reached through
    /// [`destroy`](Self::destroy). Providers document which transitions they
    /// allow and refuse the others with
    /// [`ProviderErrorKind::InvalidState`].
    fn set_state<'a>(
        &'a self,
        _key: &'a KeyRef,
        _version: u32,
        _state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { Err(unsupported(self.id(), "key state changes")) })
    }

    /// Destroys `version` for good: everything wrapped under it becomes
    /// unreadable.
    fn destroy<'a>(&'a self, _key: &'a KeyRef, _version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { Err(unsupported(self.id(), "key destruction")) })
    }
}
