//! The PKCS#11 HSM provider (feature `pkcs11`), on the `cryptoki` crate.
//!
//! Key-encryption keys (KEKs) are AES-256 secret-key objects on a PKCS#11
//! token (an HSM, or SoftHSM2 in tests); they never leave it. Data keys
//! (DEKs) are encrypted and decrypted on the token.
//!
//! ```no_run
//! # async fn demo() -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use phi_envelope::provider::pkcs11::{Pin, Pkcs11Config, Pkcs11Provider};
//! use phi_envelope::{Caller, Envelope, Keyring, KeyRef};
//!
//! let config = Pkcs11Config::new(
//!     "/usr/lib/softhsm/libsofthsm2.so",
//!     "phi-prod",
//!     Pin::from_file("/run/secrets/hsm-pin")?,
//! )
//! .pool_size(8);
//! let hsm = Pkcs11Provider::connect(config).await?; // checks the PIN now
//! let key: KeyRef = "pkcs11:token=phi-prod;object=records-kek".parse()?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(hsm))
//!     .recipient(key.clone())
//!     .build()?;
//! keyring.create_key(&key, &Caller::new("alice@ops", "setup")).await?; // once
//! let envelope = Envelope::new(keyring);
//! # Ok(()) }
//! ```
//!
//! # Mechanisms
//!
//! - KEK generation: `CKM_AES_KEY_GEN`, 32 bytes, with `CKA_TOKEN`,
//!   `CKA_PRIVATE`, `CKA_SENSITIVE` true and `CKA_EXTRACTABLE` false (so the
//!   token also reports `CKA_ALWAYS_SENSITIVE` and `CKA_NEVER_EXTRACTABLE`);
//!   `CKA_ENCRYPT` and `CKA_DECRYPT` true; `CKA_WRAP`, `CKA_UNWRAP`,
//!   `CKA_SIGN`, `CKA_VERIFY`, `CKA_DERIVE` false.
//! - DEK wrapping: `CKM_AES_GCM` through `C_Encrypt` / `C_Decrypt` with a
//!   96-bit IV and a 128-bit tag. (SoftHSM2 offers AES-GCM for
//!   encrypt/decrypt only, not for `C_WrapKey`; a DEK is not a token object
//!   anyway.) The IV comes from the token's RNG (`C_GenerateRandom`), fresh
//!   for every wrap. The wrapped form is `IV (12) || ciphertext (32) || tag
//!   (16)`, [`WRAPPED_LEN`] = 60 bytes.
//! - The AAD binds the key reference, the key version and the encryption
//!   context: `"phi-envelope/v1 pkcs11 wrap\0" || u16 length of the key
//!   reference || key reference (canonical text) || u32 version ||
//!   EncryptionContext::canonical_pairs()`, integers big-endian. A wrapped
//!   DEK moved to another key, version or context does not authenticate.
//!
//! # The invocation limit (NIST SP 800-38D, section 8.3)
//!
//! With random 96-bit IVs, one key may perform at most 2^32 GCM encryptions
//! ([`GCM_RANDOM_IV_LIMIT`]). The provider counts them per key version and
//! refuses to wrap past the limit with
//! [`LimitReached`](crate::provider::ProviderErrorKind::LimitReached):
//! rotate the key. The count is persisted on the token, in the version's
//! metadata object (below), by reservation: a process reserves a block of
//! encryptions (1,024 at first, doubling up to 65,536 per reservation) by
//! raising the persisted count, then uses the block from memory. So the
//! persisted count is an upper bound of the encryptions performed: blocks
//! left unused when a process exits are counted as used (at most 65,536 per
//! process lifetime and version, out of 2^32). The trade-off: a token write
//! every block instead of every wrap. Two processes reserving at the very
//! same moment can both read the same count and under-count by one block;
//! encryptions made with the key outside phi-envelope are not counted.
//! [`Pkcs11Provider::encryptions_reserved`] reads the count for monitoring.
//!
//! # Keys, versions and token objects
//!
//! A key reference is an RFC 7512 URI naming the token and the key:
//! `pkcs11:token=TOKEN;object=LABEL`, optionally with `id=`
//! (percent-encoded bytes), or with `id=` alone. It names the key with all
//! its versions. Version `N` is one AES secret-key object with:
//!
//! | attribute | value |
//! | --- | --- |
//! | `CKA_LABEL` | the URI's `object` (absent when the URI has none) |
//! | `CKA_ID` | the URI's `id` bytes (empty without `id=`) `|| ":v" ||` N in decimal, e.g. `:v1`, `:v2` |
//!
//! Objects whose `CKA_ID` does not have that form are ignored, so a key can
//! be created outside phi-envelope too, e.g. `pkcs11-tool --keygen
//! --key-type AES:32 --label records-kek --id 3a7631 --sensitive
//! --private` for version 1 (`3a7631` is `:v1`).
//!
//! Next to each version's key object lives a small **metadata data object**
//! (`CKO_DATA`, private, on the token; `CKA_APPLICATION`
//! `"phi-envelope/v1 kek-meta"`, `CKA_LABEL` `"phi-envelope kek-meta
//! o=<hex label> i=<hex id> v=<N>"`) holding the creation time, the
//! reserved encryption count and, once destroyed, the destruction time.
//! SoftHSM2 does not let a data object's `CKA_VALUE` change, so an update
//! writes a new object and then destroys the old one; readers merge any
//! leftovers (earliest creation, highest count, any destruction), so a
//! crash between the two steps loses nothing.
//!
//! **The primary version** (the one new DEKs are wrapped under) is the
//! highest version whose object has `CKA_ENCRYPT` and `CKA_DECRYPT` true.
//!
//! # States
//!
//! | state | token representation |
//! | --- | --- |
//! | enabled | `CKA_ENCRYPT` true, `CKA_DECRYPT` true, and the highest such version (the primary) |
//! | decrypt-only | `CKA_DECRYPT` true and either `CKA_ENCRYPT` false or not the primary |
//! | disabled | `CKA_DECRYPT` false (rotation also clears `CKA_ENCRYPT`) |
//! | destroyed | no key object; the metadata object remains as a tombstone |
//!
//! The token enforces the attributes itself (`CKR_KEY_FUNCTION_NOT_PERMITTED`,
//! reported as [`KeyDisabled`](crate::provider::ProviderErrorKind::KeyDisabled)).
//! SoftHSM2 2.6.1 lets `C_SetAttributeValue` change both (checked by the
//! tests).
//!
//! Verbs: [`create_key`](KeyProvider::create_key) makes version 1 (refused
//! if anything of the key exists). [`rotate`](KeyProvider::rotate)
//! generates version highest+1 (a number is never reused, not even a
//! destroyed one) and then clears `CKA_ENCRYPT` on the older ones; if
//! generating the key or its metadata fails, nothing changes and the old
//! primary stays primary. [`set_state`](KeyProvider::set_state) sets the
//! attributes; `Enabled` makes the version the primary (every other
//! version loses `CKA_ENCRYPT`, i.e. becomes decrypt-only), and a destroyed
//! version cannot change state.
//! [`destroy`](KeyProvider::destroy) refuses the primary (rotate, or make
//! it decrypt-only or disabled first), writes the tombstone, then
//! `C_DestroyObject`s the key object; destroying a destroyed version again
//! succeeds. Afterwards every unwrap under that version fails with
//! [`KeyDestroyed`](crate::provider::ProviderErrorKind::KeyDestroyed) and
//! the other versions keep working. A version whose key object is missing
//! also counts as destroyed when it has a metadata record or a newer
//! version exists (destroyed outside phi-envelope); otherwise it is
//! [`KeyNotFound`](crate::provider::ProviderErrorKind::KeyNotFound).
//!
//! Crypto-shredding holds as far as the token's destruction does: SoftHSM2
//! deletes the object's file; an HSM's own backups or replicas of the key
//! must be destroyed too.
//!
//! Token-changing operations (lifecycle verbs, counter reservations) hold a
//! per-module lock exclusively, across all providers of the process; wraps,
//! unwraps and describes hold it shared and run in parallel. The changes are
//! read-modify-write sequences, and SoftHSM2 2.6.1 fails object creation
//! that runs concurrently with other calls in the same process now and then
//! with `CKR_GENERAL_ERROR` (upstream issue #573; reproduced here: about one
//! creation in a few thousand with eight threads, none with the lock).
//! Lifecycle verbs are meant to run from one place at a time; if two
//! processes rotate the same key at the same instant, both may create the
//! same version number: both objects then work (unwrap tries each object of
//! a version), and destroy removes both.
//!
//! # Sessions and their loss
//!
//! A PKCS#11 module can be initialized once per process, so one context per
//! module path is shared by every provider of the process (initialized with
//! `CKF_OS_LOCKING_OK`; one that someone else initialized is used as is).
//! Each provider keeps a pool of logged-in read/write sessions, at most
//! [`Pkcs11Config::pool_size`] in use at once (a semaphore queues the other
//! tasks); a `cryptoki` `Session` is `Send` but not `Sync`, so each call
//! checks one out. Every PKCS#11 call runs on `tokio::task::spawn_blocking`
//! (never `block_on`), so the provider works from any tokio runtime,
//! current-thread included; it needs a tokio runtime. A caller that drops
//! the future does not cut a call short: the blocking task finishes and
//! returns its session to the pool.
//!
//! When a call fails because the session, the login, the token or the
//! library was lost, the provider recovers and retries the operation once:
//!
//! | PKCS#11 answer | recovery |
//! | --- | --- |
//! | `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED` | forget the session, keep the idle ones that still answer, open a new one, log in |
//! | `CKR_USER_NOT_LOGGED_IN`, or nothing found on a session that turns out to be logged out (`C_Logout` on any session logs out all) | log in again on the same session |
//! | `CKR_TOKEN_NOT_PRESENT`, `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_RECOGNIZED`, `CKR_SLOT_ID_INVALID`, `CKR_DEVICE_ERROR` | forget every session, find the token's slot again by label, open a new session |
//! | `CKR_CRYPTOKI_NOT_INITIALIZED` (someone called `C_Finalize`) | `C_Initialize` again (once for all providers of the module), forget every session, open a new one |
//!
//! A session lost with its library is forgotten, never closed: after
//! `C_Finalize` its handle number may already belong to a new session.
//! (`C_Finalize` while calls are in flight is undefined behaviour in PKCS#11
//! and crashes SoftHSM2; what is recovered is a finalization between calls.
//! Code that finalizes the module and initializes it again behind the
//! provider's back, and then opens sessions of its own before the provider
//! notices, may have one of them picked up by a stale handle: don't.) If
//! the retry fails too, the error is
//! [`Unavailable`](crate::provider::ProviderErrorKind::Unavailable) and says
//! so; the next operation tries again from scratch. A failed call that
//! changes the token (generate, destroy, set attributes) is not retried,
//! because it may have half-happened: describe the key, then retry.
//!
//! # Decryption failures and `CKR_GENERAL_ERROR`
//!
//! `CKR_ENCRYPTED_DATA_INVALID`, `CKR_ENCRYPTED_DATA_LEN_RANGE`,
//! `CKR_DATA_LEN_RANGE` and `CKR_DATA_INVALID` from `C_Decrypt`, a wrapped
//! form that is not 60 bytes, and a plaintext that is not 32 bytes are
//! [`Unwrapped::Rejected`]: the keyring reports them only as the opaque
//! [`Error::Decrypt`](crate::Error::Decrypt).
//!
//! SoftHSM2 2.6.1 answers a GCM tag mismatch (tampered wrapped key, wrong
//! context, wrong version) with `CKR_GENERAL_ERROR` from `C_Decrypt`, which
//! a failing device could also answer. The decision: a `CKR_GENERAL_ERROR`
//! from `C_Decrypt` (not from `C_DecryptInit`) is a rejection when, right
//! after it, the same session still answers `C_GetSessionInfo` logged in
//! and the token answers `C_GetTokenInfo` without its error-state flag;
//! otherwise it is an operational failure (recovered as above, else
//! [`Unavailable`](crate::provider::ProviderErrorKind::Unavailable)). A
//! device that fails only inside `C_Decrypt` while answering everything
//! else would thus look like a wrong key: the caller sees
//! [`Error::Decrypt`](crate::Error::Decrypt), and the event records a
//! rejection.
//!
//! Other errors say what to do: `CKR_PIN_INCORRECT` / `CKR_PIN_LOCKED` are
//! [`AccessDenied`](crate::provider::ProviderErrorKind::AccessDenied) ("check
//! the PIN"), a missing token is `Unavailable`, a missing object
//! `KeyNotFound` or `KeyDestroyed`, `CKR_KEY_FUNCTION_NOT_PERMITTED`
//! `KeyDisabled`, `CKR_SESSION_COUNT` `Throttled`, a missing mechanism
//! `Unsupported`.
//!
//! # The PIN
//!
//! The user PIN is a [`Pin`] (a `secrecy::SecretString`) read from an
//! environment variable ([`Pin::from_env`]) or a file ([`Pin::from_file`];
//! keep it mode 0600), or from the key URI's `pin-source` in
//! [`Pkcs11Config::from_uri`]. A URI with `pin-value` is refused. The PIN
//! appears in no `Debug` output, log or error. It is presented at
//! [`Pkcs11Provider::connect`] (so a wrong PIN fails there) and again only
//! to re-establish a lost login. PKCS#11 login state belongs to the process:
//! when the process is already logged in to the token (another provider, or
//! another library using the same module), the token answers
//! `CKR_USER_ALREADY_LOGGED_IN` without checking the PIN, and `connect`
//! succeeds whatever the PIN. Once the token refuses it
//! (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, ...), the provider never presents
//! it again and answers `AccessDenied`: repeated attempts with a wrong PIN
//! would lock the token's user for everyone.
//!
//! # Which entries are this provider's
//!
//! [`unwrap`](KeyProvider::unwrap) answers [`Unwrapped::NotMine`] for
//! entries of another provider id, with an unparsable reference, or whose
//! URI names another token (`token`, `serial`, `model`, `manufacturer`
//! compared with the connected token; an absent attribute matches).
//! `slot-id` and the query attributes (`module-path`, ...) are not
//! compared: slot numbers change, and module paths differ between hosts.
//!
//! For the same reason they are not part of a key's identity
//! ([`KeyProvider::identity`]): every URI of this token naming the same
//! `object` and `id` is one key to the keyring's caches, key policies and
//! lifecycle verbs, reported as `pkcs11:token=LABEL;serial=SERIAL;object=...;id=...`
//! of the connected token. (The wrapped DEK itself stays bound to the exact
//! URI text in its header entry, as the AAD above says.)

mod errors;
mod objects;
mod session;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::session::{Session, SessionState};
use secrecy::SecretString;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use self::errors::{provider_error, rv};
use self::objects::{is_handle_invalid, KeyName};
use self::session::{lock, Fail, Inner};
use crate::error::Result;
use crate::format::{EncryptionContext, WrappedKey};
use crate::primitives::{Dek, DEK_LEN};
use crate::provider::{
    BoxFuture, KeyInfo, KeyProvider, KeyRef, KeyRefKind, KeyState, Pkcs11Uri,
    ProviderErrorKind as K, Unwrapped,
};

/// The provider id, which is also the scheme of its key references.
pub const PROVIDER_ID: &str = "pkcs11";

/// Length of a wrapped DEK: IV (12) || ciphertext (32) || tag (16).
pub const WRAPPED_LEN: usize = IV_LEN + DEK_LEN + TAG_LEN;

/// Length of the GCM IV in bytes (96 bits).
pub const IV_LEN: usize = 12;

const TAG_LEN: usize = 16;

/// The most GCM encryptions one key may perform with random 96-bit IVs
/// (NIST SP 800-38D, section 8.3): 2^32.
pub const GCM_RANDOM_IV_LIMIT: u64 = 1 << 32;

/// The default number of sessions per provider.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// The most sessions a provider may be configured with.
pub const MAX_POOL_SIZE: usize = 1024;

/// The first block of encryptions a process reserves per key version.
const FIRST_BLOCK: u64 = 1024;
/// The largest block of encryptions reserved at once.
const MAX_BLOCK: u64 = 65_536;

/// The AAD label of a wrapped DEK.
const WRAP_AAD_LABEL: &[u8] = b"phi-envelope/v1 pkcs11 wrap\0";

/// A token's user PIN. Never printed: `Debug` shows `Pin(<redacted>)`.
pub struct Pin(SecretString);

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

impl Pin {
    /// A PIN from a secret string.
    pub fn new(pin: SecretString) -> Pin {
        Pin(pin)
    }

    /// Reads the PIN from the environment variable `var`.
    ///
    /// The error names the variable, never its value.
    pub fn from_env(var: &str) -> Result<Pin> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Pin(SecretString::from(v))),
            Ok(_) => Err(provider_error(
                K::Misconfigured,
                format!("the PIN variable {var} is empty: set it to the token's user PIN"),
            )),
            Err(std::env::VarError::NotPresent) => Err(provider_error(
                K::Misconfigured,
                format!("the PIN variable {var} is not set: set it to the token's user PIN"),
            )),
            Err(std::env::VarError::NotUnicode(_)) => Err(provider_error(
                K::Misconfigured,
                format!("the PIN variable {var} is not valid UTF-8"),
            )),
        }
    }

    /// Reads the PIN from a file (one trailing `\n` or `\r\n` is removed).
    /// Keep the file readable by the service only (mode 0600).
    ///
    /// The error names the file, never its content.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Pin> {
        let path = path.as_ref();
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
            crate::provider::ProviderError::new(
                PROVIDER_ID,
                K::Misconfigured,
                format!("cannot read the PIN file {}: {}", path.display(), e.kind()),
            )
            .with_source(e)
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            provider_error(
                K::Misconfigured,
                format!("the PIN file {} is not UTF-8", path.display()),
            )
        })?;
        let pin = match text.strip_suffix('\n') {
            Some(t) => t.strip_suffix('\r').unwrap_or(t),
            None => text,
        };
        if pin.is_empty() {
            return Err(provider_error(
                K::Misconfigured,
                format!("the PIN file {} is empty", path.display()),
            ));
        }
        Ok(Pin(SecretString::from(pin.to_owned())))
    }
}

/// How to reach a token: the module, the token label, the user PIN, and the
/// session pool. `Debug` never shows the PIN.
#[derive(Debug)]
pub struct Pkcs11Config {
    module: PathBuf,
    token: String,
    pin: Pin,
    pool_size: usize,
    max_encryptions: u64,
    timeout: Option<Duration>,
}

impl Pkcs11Config {
    /// A configuration for the token labelled `token` in the PKCS#11
    /// library at `module` (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub fn new(module: impl Into<PathBuf>, token: impl Into<String>, pin: Pin) -> Pkcs11Config {
        Pkcs11Config {
            module: module.into(),
            token: token.into(),
            pin,
            pool_size: DEFAULT_POOL_SIZE,
            max_encryptions: GCM_RANDOM_IV_LIMIT,
            timeout: None,
        }
    }

    /// A configuration from a key's `pkcs11:` URI: the token from `token=`,
    /// the module from `?module-path=`, and the PIN from `pin` or else from
    /// `?pin-source=` (a file path, or a `file:` URI).
    pub fn from_uri(uri: &str, pin: Option<Pin>) -> Result<Pkcs11Config> {
        let key = KeyRef::parse(uri)?;
        let KeyRefKind::Pkcs11(u) = key.kind() else {
            return Err(provider_error(
                K::Misconfigured,
                format!("{key} is not a pkcs11: URI"),
            ));
        };
        let token = u.token.clone().ok_or_else(|| {
            provider_error(
                K::Misconfigured,
                format!("{key} has no token=: name the token label"),
            )
        })?;
        let module = u.module_path.clone().ok_or_else(|| {
            provider_error(
                K::Misconfigured,
                format!("{key} has no ?module-path=: name the PKCS#11 library"),
            )
        })?;
        let pin = match (pin, &u.pin_source) {
            (Some(p), _) => p,
            (None, Some(src)) => Pin::from_file(src.strip_prefix("file:").unwrap_or(src))?,
            (None, None) => {
                return Err(provider_error(
                    K::Misconfigured,
                    format!("{key} has no ?pin-source= and no PIN was given"),
                ))
            }
        };
        Ok(Pkcs11Config::new(module, token, pin))
    }

    /// How many sessions may be in use at once (default
    /// [`DEFAULT_POOL_SIZE`], at least 1, at most [`MAX_POOL_SIZE`]). More
    /// concurrent operations wait for a session.
    pub fn pool_size(mut self, sessions: usize) -> Pkcs11Config {
        self.pool_size = sessions.clamp(1, MAX_POOL_SIZE);
        self
    }

    /// The most GCM encryptions per key version (default and maximum
    /// [`GCM_RANDOM_IV_LIMIT`]; at least 1). A lower limit makes rotation
    /// due sooner.
    pub fn max_encryptions_per_version(mut self, limit: u64) -> Pkcs11Config {
        self.max_encryptions = limit.clamp(1, GCM_RANDOM_IV_LIMIT);
        self
    }

    /// Gives up waiting for the token after `timeout` per operation with
    /// [`Unavailable`](crate::provider::ProviderErrorKind::Unavailable) (the
    /// blocked call itself finishes in the background). Off by default;
    /// needs a tokio runtime with timers enabled.
    pub fn timeout(mut self, timeout: Duration) -> Pkcs11Config {
        self.timeout = Some(timeout);
        self
    }

    /// The PKCS#11 library path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The token label.
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// A block of reserved encryptions of one key version.
#[derive(Debug)]
struct Block {
    next: u64,
    end: u64,
    step: u64,
}

/// How an operation holds the module's object lock.
#[derive(Clone, Copy, Debug)]
enum Access {
    /// Reads the token's objects (wrap, unwrap, describe).
    Shared,
    /// Changes them (lifecycle verbs, counter reservations).
    Exclusive,
}

/// A held object lock.
enum Guard<'a> {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>),
}

/// One round of a wrap.
enum WrapStep {
    Wrapped(WrappedKey),
    /// The primary's block of reserved encryptions is used up.
    NeedBlock(u32),
}

/// Everything the blocking tasks share.
struct State {
    inner: Inner,
    serial: String,
    model: String,
    manufacturer: String,
    limit: u64,
    counters: Mutex<HashMap<(KeyName, u32), Block>>,
}

/// The PKCS#11 key provider (id `pkcs11`). See the [module docs](self).
pub struct Pkcs11Provider {
    state: Arc<State>,
    permits: Arc<Semaphore>,
    pool_size: usize,
    timeout: Option<Duration>,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("module", &self.state.inner.module)
            .field("token", &self.state.inner.token)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// The AAD of a wrapped DEK (see the module docs).
fn wrap_aad(key_ref: &str, version: u32, pairs: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_LABEL.len() + 2 + key_ref.len() + 4 + pairs.len());
    aad.extend_from_slice(WRAP_AAD_LABEL);
    // Key references are at most 1024 bytes (checked by KeyRef::parse and
    // the header), so the length fits.
    aad.extend_from_slice(&(key_ref.len() as u16).to_be_bytes());
    aad.extend_from_slice(key_ref.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(pairs);
    aad
}

impl Pkcs11Provider {
    /// Loads the module (once per process), finds the token by label, opens
    /// a session and logs in: a wrong PIN, a missing token or a wrong module
    /// path fails here.
    pub async fn connect(config: Pkcs11Config) -> Result<Pkcs11Provider> {
        let Pkcs11Config {
            module,
            token,
            pin,
            pool_size,
            max_encryptions,
            timeout,
        } = config;
        let state = tokio::task::spawn_blocking(move || -> Result<State> {
            let module = session::module(&module)?;
            let inner = Inner::connect(module, token, pin.0)?;
            let info = inner.token_info()?;
            Ok(State {
                serial: info.serial_number().trim().to_owned(),
                model: info.model().trim().to_owned(),
                manufacturer: info.manufacturer_id().trim().to_owned(),
                inner,
                limit: max_encryptions,
                counters: Mutex::new(HashMap::new()),
            })
        })
        .await
        .map_err(|e| provider_error(K::Other, format!("the PKCS#11 worker failed: {e}")))??;
        Ok(Pkcs11Provider {
            state: Arc::new(state),
            permits: Arc::new(Semaphore::new(pool_size)),
            pool_size,
            timeout,
        })
    }

    /// The label of the token this provider serves.
    pub fn token(&self) -> &str {
        &self.state.inner.token
    }

    /// How many GCM encryptions under `version` of `key` have been
    /// reserved on the token so far (an upper bound of those performed; see
    /// the module docs). Rotate well before [`GCM_RANDOM_IV_LIMIT`].
    pub async fn encryptions_reserved(&self, key: &KeyRef, version: u32) -> Result<u64> {
        let name = KeyName::from_uri(self.my_uri(key)?);
        self.exec(
            format!("reading the encryption count of {key} version {version}"),
            Access::Shared,
            move |_, s| Ok(objects::read_meta(s, &name, version)?.map_or(0, |r| r.meta.reserved)),
        )
        .await
    }

    /// Runs `f` with a pooled session on the blocking pool, holding the
    /// module's object lock as `access` says.
    async fn exec<T, F>(&self, what: String, access: Access, mut f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&State, &Session) -> std::result::Result<T, Fail> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| provider_error(K::Unavailable, "the provider is shutting down"))?;
        let state = self.state.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let lock = &state.inner.module.objects;
            let _guard = match access {
                Access::Shared => Guard::Shared(lock.read().unwrap_or_else(|p| p.into_inner())),
                Access::Exclusive => {
                    Guard::Exclusive(lock.write().unwrap_or_else(|p| p.into_inner()))
                }
            };
            state.inner.run(&what, |s| f(&state, s))
        });
        let joined = match self.timeout {
            Some(t) => tokio::time::timeout(t, task).await.map_err(|_| {
                provider_error(
                    K::Unavailable,
                    format!(
                        "token {:?} did not answer within {t:?}: check the HSM and retry",
                        self.token()
                    ),
                )
            })?,
            None => task.await,
        };
        joined.map_err(|e| provider_error(K::Other, format!("the PKCS#11 worker failed: {e}")))?
    }

    /// True when `uri` may name a key of the connected token.
    fn is_mine(&self, uri: &Pkcs11Uri) -> bool {
        let st = &self.state;
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&uri.token, &st.inner.token)
            && eq(&uri.serial, &st.serial)
            && eq(&uri.model, &st.model)
            && eq(&uri.manufacturer, &st.manufacturer)
    }

    /// The URI of `key`, which must be a `pkcs11:` key of this token.
    fn my_uri<'k>(&self, key: &'k KeyRef) -> Result<&'k Pkcs11Uri> {
        match key.kind() {
            KeyRefKind::Pkcs11(uri) if self.is_mine(uri) => Ok(uri),
            KeyRefKind::Pkcs11(_) => Err(provider_error(
                K::Misconfigured,
                format!(
                    "{key} names another token; this provider serves token {:?}",
                    self.token()
                ),
            )),
            _ => Err(provider_error(
                K::Misconfigured,
                format!("{key} is not a pkcs11: key reference"),
            )),
        }
    }

    /// Runs a lifecycle verb, holding the module's object lock exclusively.
    async fn manage(
        &self,
        key: &KeyRef,
        what: String,
        verb: impl Fn(&Session, &KeyRef, &KeyName, &str) -> std::result::Result<KeyInfo, Fail>
            + Send
            + 'static,
    ) -> Result<KeyInfo> {
        let name = KeyName::from_uri(self.my_uri(key)?);
        let key = key.clone();
        self.exec(what, Access::Exclusive, move |st, s| {
            verb(s, &key, &name, &st.inner.token)
        })
        .await
    }
}

impl State {
    /// Takes one encryption from the version's reserved block; `false` when
    /// there is none left (reserve a new block first).
    fn take(&self, name: &KeyName, version: u32) -> bool {
        match lock(&self.counters).get_mut(&(name.clone(), version)) {
            Some(b) if b.next < b.end => {
                b.next += 1;
                true
            }
            _ => false,
        }
    }

    /// Reserves a new block of encryptions of `version` on the token (under
    /// the exclusive object lock), unless another task just did.
    fn reserve_block(
        &self,
        s: &Session,
        key_ref: &str,
        name: &KeyName,
        version: u32,
    ) -> std::result::Result<(), Fail> {
        let id = (name.clone(), version);
        if lock(&self.counters)
            .get(&id)
            .is_some_and(|b| b.next < b.end)
        {
            return Ok(());
        }
        let rec = objects::read_meta(s, name, version)?;
        let (handles, mut meta) = rec.map(|r| (r.handles, r.meta)).unwrap_or_default();
        if meta.reserved >= self.limit {
            return Err(Fail::Done(provider_error(
                K::LimitReached,
                format!(
                    "{key_ref} version {version} has reached its limit of {} AES-GCM \
                     encryptions with random IVs (NIST SP 800-38D): rotate the key",
                    self.limit
                ),
            )));
        }
        let step = lock(&self.counters)
            .get(&id)
            .map_or(FIRST_BLOCK, |b| (b.step * 2).min(MAX_BLOCK));
        let start = meta.reserved;
        let end = start.saturating_add(step).min(self.limit);
        meta.reserved = end;
        objects::write_meta(s, name, version, meta, &handles)?;
        lock(&self.counters).insert(
            id,
            Block {
                next: start,
                end,
                step,
            },
        );
        Ok(())
    }

    fn wrap_on(
        &self,
        s: &Session,
        key_ref: &str,
        name: &KeyName,
        pairs: &[u8],
        dek: &[u8; DEK_LEN],
    ) -> std::result::Result<WrapStep, Fail> {
        let versions = objects::find_versions(s, name)?;
        let Some(primary) = objects::primary(&versions).copied() else {
            if versions.is_empty() {
                return Err(Fail::NotFound(provider_error(
                    K::KeyNotFound,
                    format!(
                        "{key_ref} has no version on token {:?}: create the key (create_key), or \
                         rotate it if every version was destroyed",
                        self.inner.token
                    ),
                )));
            }
            return Err(Fail::Done(provider_error(
                K::KeyDisabled,
                format!(
                    "{key_ref} has no enabled version to encrypt under: rotate it, or enable \
                     its newest version"
                ),
            )));
        };
        if !self.take(name, primary.version) {
            return Ok(WrapStep::NeedBlock(primary.version));
        }
        let mut iv = [0u8; IV_LEN];
        s.generate_random_slice(&mut iv)?;
        let aad = wrap_aad(key_ref, primary.version, pairs);
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, &aad, ((TAG_LEN * 8) as u64).into())?;
        let ct = match s.encrypt(&Mechanism::AesGcm(params), primary.handle, dek) {
            Ok(ct) => ct,
            Err(e) if rv(&e) == Some(RvError::KeyFunctionNotPermitted) => {
                return Err(Fail::Done(provider_error(
                    K::KeyDisabled,
                    format!(
                        "{key_ref} version {} no longer allows encryption (its state changed): \
                         retry",
                        primary.version
                    ),
                )))
            }
            Err(e) if is_handle_invalid(&e) => {
                return Err(Fail::NotFound(provider_error(
                    K::KeyNotFound,
                    format!(
                        "{key_ref} version {} disappeared from the token while in use: retry",
                        primary.version
                    ),
                )))
            }
            Err(e) => return Err(e.into()),
        };
        if ct.len() != DEK_LEN + TAG_LEN {
            return Err(Fail::Done(provider_error(
                K::Other,
                format!(
                    "token {:?} returned {} bytes of AES-GCM output instead of {}",
                    self.inner.token,
                    ct.len(),
                    DEK_LEN + TAG_LEN
                ),
            )));
        }
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.extend_from_slice(&iv);
        wrapped.extend_from_slice(&ct);
        Ok(WrapStep::Wrapped(WrappedKey {
            provider: PROVIDER_ID.to_owned(),
            key_ref: key_ref.to_owned(),
            key_version: primary.version,
            wrapped,
        }))
    }

    /// After `CKR_GENERAL_ERROR` from `C_Decrypt`: `Ok` when the session is
    /// still logged in and the token reports no error state (so the failure
    /// was the tag check), otherwise the failure that shows it is not.
    fn check_healthy(&self, s: &Session) -> std::result::Result<(), Fail> {
        let info = s.get_session_info()?;
        if !matches!(
            info.session_state(),
            SessionState::RwUser | SessionState::RoUser
        ) {
            return Err(Fail::Ck(CkError::Pkcs11(
                RvError::UserNotLoggedIn,
                Function::GetSessionInfo,
            )));
        }
        let token = self.inner.module.ctx.get_token_info(info.slot_id())?;
        if token.error_state() {
            return Err(Fail::Ck(CkError::Pkcs11(
                RvError::DeviceError,
                Function::GetTokenInfo,
            )));
        }
        Ok(())
    }

    fn unwrap_on(
        &self,
        s: &Session,
        key_ref: &str,
        name: &KeyName,
        version: u32,
        wrapped: &[u8],
        pairs: &[u8],
    ) -> std::result::Result<Unwrapped, Fail> {
        let token = &self.inner.token;
        let handles = objects::find_version(s, name, version)?;
        if handles.is_empty() {
            return Err(Fail::NotFound(objects::missing_version(
                s, key_ref, name, version, token,
            )?));
        }
        let aad = wrap_aad(key_ref, version, pairs);
        let (iv, ct) = wrapped.split_at(IV_LEN);
        let (mut disabled, mut gone) = (false, 0);
        for &h in &handles {
            let mut iv_param: [u8; IV_LEN] = iv.try_into().expect("checked length");
            let params = GcmParams::new(&mut iv_param, &aad, ((TAG_LEN * 8) as u64).into())?;
            match s.decrypt(&Mechanism::AesGcm(params), h, ct) {
                Ok(pt) => {
                    let pt = Zeroizing::new(pt);
                    if pt.len() == DEK_LEN {
                        return Dek::from_slice(&pt).map(Unwrapped::Key).map_err(Fail::Done);
                    }
                }
                Err(e) => match rv(&e) {
                    Some(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::DataLenRange
                        | RvError::DataInvalid,
                    ) => {}
                    Some(RvError::GeneralError)
                        if matches!(e, CkError::Pkcs11(_, Function::Decrypt)) =>
                    {
                        self.check_healthy(s)?
                    }
                    Some(RvError::KeyFunctionNotPermitted) => disabled = true,
                    _ if is_handle_invalid(&e) => gone += 1,
                    _ => return Err(e.into()),
                },
            }
        }
        if gone == handles.len() {
            return Err(Fail::NotFound(objects::missing_version(
                s, key_ref, name, version, token,
            )?));
        }
        if disabled {
            return Err(Fail::Done(provider_error(
                K::KeyDisabled,
                format!(
                    "{key_ref} version {version} is disabled: make it decrypt-only (set_state) to \
                     read messages wrapped under it"
                ),
            )));
        }
        Ok(Unwrapped::Rejected)
    }
}

impl KeyProvider for Pkcs11Provider {
    fn id(&self) -> &str {
        PROVIDER_ID
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move {
            let name = KeyName::from_uri(self.my_uri(key)?);
            let key_ref = key.as_str().to_owned();
            let pairs = context.canonical_pairs();
            // The blocking tasks need their own copy; zeroized on drop.
            let dek = Arc::new(Zeroizing::new(*dek.expose_secret()));
            // At most a few rounds: a new block is reserved when the primary's
            // is used up (or the primary changed in between).
            for _ in 0..4 {
                let (r, n, p, d) = (key_ref.clone(), name.clone(), pairs.clone(), dek.clone());
                let step = self
                    .exec(
                        format!("wrapping a data key under {key}"),
                        Access::Shared,
                        move |st, s| st.wrap_on(s, &r, &n, &p, &d),
                    )
                    .await?;
                let version = match step {
                    WrapStep::Wrapped(w) => return Ok(w),
                    WrapStep::NeedBlock(version) => version,
                };
                let (r, n) = (key_ref.clone(), name.clone());
                self.exec(
                    format!("reserving GCM encryptions of {key} version {version}"),
                    Access::Exclusive,
                    move |st, s| st.reserve_block(s, &r, &n, version),
                )
                .await?;
            }
            Err(provider_error(
                K::Other,
                format!("wrapping under {key}: the primary version kept changing; retry"),
            ))
        })
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move {
            if entry.provider != PROVIDER_ID {
                return Ok(Unwrapped::NotMine);
            }
            let Ok(key) = KeyRef::parse(&entry.key_ref) else {
                return Ok(Unwrapped::NotMine);
            };
            let KeyRefKind::Pkcs11(uri) = key.kind() else {
                return Ok(Unwrapped::NotMine);
            };
            if !self.is_mine(uri) {
                return Ok(Unwrapped::NotMine);
            }
            if entry.wrapped.len() != WRAPPED_LEN {
                return Ok(Unwrapped::Rejected);
            }
            let name = KeyName::from_uri(uri);
            let key_ref = entry.key_ref.clone();
            let version = entry.key_version;
            let wrapped = entry.wrapped.clone();
            let pairs = context.canonical_pairs();
            self.exec(
                format!("unwrapping a data key under {key} version {version}"),
                Access::Shared,
                move |st, s| st.unwrap_on(s, &key_ref, &name, version, &wrapped, &pairs),
            )
            .await
        })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = KeyName::from_uri(self.my_uri(key)?);
            let k = key.clone();
            self.exec(format!("describing {key}"), Access::Shared, move |st, s| {
                objects::describe(s, &k, &name, &st.inner.token)
            })
            .await
        })
    }

    /// The connected token (label and serial) and the key's objects
    /// (`object` label and `id`): `module-path`, `module-name`,
    /// `pin-source`, `slot-id`, `type` and token attributes that match the
    /// connected token do not change which key a URI names. A URI for
    /// another token has no identity here.
    fn identity<'a>(
        &'a self,
        key: &'a KeyRef,
    ) -> BoxFuture<'a, Result<Option<crate::provider::KeyIdentity>>> {
        let id = match key.kind() {
            KeyRefKind::Pkcs11(uri) if self.is_mine(uri) => {
                let canonical = Pkcs11Uri {
                    token: Some(self.state.inner.token.clone()),
                    serial: Some(self.state.serial.clone()),
                    object: uri.object.clone(),
                    // KeyName treats a missing id as the empty one.
                    id: Some(uri.id.clone().unwrap_or_default()),
                    ..Pkcs11Uri::default()
                };
                Some(crate::provider::KeyIdentity::new(
                    PROVIDER_ID,
                    canonical.to_uri(),
                ))
            }
            _ => None,
        };
        Box::pin(async move { Ok(id) })
    }

    fn create_key<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.manage(key, format!("creating {key}"), objects::create_key))
    }

    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.manage(key, format!("rotating {key}"), objects::rotate))
    }

    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.manage(
            key,
            format!("setting {key} version {version} {state}"),
            move |s, k, n, t| objects::set_state(s, k, n, t, version, state),
        ))
    }

    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.manage(
            key,
            format!("destroying {key} version {version}"),
            move |s, k, n, t| objects::destroy(s, k, n, t, version),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_is_injective_in_ref_and_version() {
        let a = wrap_aad("pkcs11:object=ab", 1, &[0, 0]);
        let b = wrap_aad("pkcs11:object=a", 1, &[0, 0]);
        assert_ne!(a, b);
        assert_ne!(wrap_aad("r", 1, &[0, 0]), wrap_aad("r", 2, &[0, 0]));
        assert!(a.starts_with(WRAP_AAD_LABEL));
        assert_eq!(&a[WRAP_AAD_LABEL.len()..WRAP_AAD_LABEL.len() + 2], &[0, 16]);
        assert_eq!(WRAPPED_LEN, 60);
    }

    #[test]
    fn pin_is_redacted_and_read_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "s3cret-PIN\r\n").unwrap();
        let pin = Pin::from_file(&path).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(pin.0.expose_secret(), "s3cret-PIN");
        let config = Pkcs11Config::new("/m.so", "t", pin);
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("Pin(<redacted>)"));
        std::fs::write(&path, "\n").unwrap();
        assert!(Pin::from_file(&path).is_err());
        let err = Pin::from_file(dir.path().join("missing")).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the PIN file"),
            "{err}"
        );
    }

    #[test]
    fn pin_from_env_names_the_variable_only() {
        let err = Pin::from_env("PHI_PKCS11_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert!(err
            .to_string()
            .contains("PHI_PKCS11_TEST_SURELY_UNSET_VAR is not set"));
    }

    #[test]
    fn config_from_uri() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n").unwrap();
        let uri = format!(
            "pkcs11:token=phi;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:{}",
            path.display()
        );
        let c = Pkcs11Config::from_uri(&uri, None).unwrap().pool_size(0);
        assert_eq!(c.token(), "phi");
        assert_eq!(c.module(), Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(c.pool_size, 1);
        assert!(Pkcs11Config::from_uri("pkcs11:object=k?module-path=/m.so", None).is_err());
        assert!(Pkcs11Config::from_uri("pkcs11:token=t;object=k", None).is_err());
        assert!(Pkcs11Config::from_uri("local:k", None).is_err());
    }
}
