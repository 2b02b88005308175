//! The HashiCorp Vault / OpenBao Transit provider (feature `vault`): KEKs
//! are Transit keys (`aes256-gcm96`, derived, non-exportable), reached over
//! the Transit HTTP API that Vault and OpenBao share.
//!
//! # Setup
//!
//! ```no_run
//! # async fn demo(context_key: &[u8]) -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use phi_envelope::provider::vault::{VaultConfig, VaultTransitProvider};
//! use phi_envelope::{Envelope, Keyring, KeyRef};
//!
//! // VAULT_ADDR, VAULT_TOKEN, VAULT_NAMESPACE, VAULT_CACERT, ...
//! let transit = VaultTransitProvider::new(VaultConfig::from_env(context_key)?)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(transit))
//!     .recipient("vault-transit:transit/phi-records".parse::<KeyRef>()?)
//!     .build()?;
//! let envelope = Envelope::new(keyring);
//! # Ok(()) }
//! ```
//!
//! Every method is an async HTTP call on the caller's tokio runtime; there is
//! no test-only code path (the tests reach a real `bao server -dev` through
//! `VAULT_ADDR` as production does).
//!
//! # Transit calls per operation
//!
//! | phi-envelope | Transit |
//! | --- | --- |
//! | new message (`generate`), extra recipient (`wrap`) | `POST MOUNT/encrypt/KEY` of a DEK drawn locally |
//! | open (`unwrap`) | `POST MOUNT/decrypt/KEY` (one more per previous context key, only when the current one is rejected) |
//! | rewrap to the same key (`rewrap`) | `POST MOUNT/rewrap/KEY`: the DEK is not sent again |
//! | many rewraps ([`VaultTransitProvider::rewrap_batch`]) | `POST MOUNT/rewrap/KEY` with `batch_input` |
//! | key check before first use, `describe` | `GET MOUNT/keys/KEY` (cached for [`VaultConfig::key_check_ttl`]) |
//! | `create_key` | `POST MOUNT/keys/KEY` (`aes256-gcm96`, `derived`, not exportable) |
//! | `rotate` | `POST MOUNT/keys/KEY/rotate` |
//! | `set_state` | `POST MOUNT/keys/KEY/config` (`min_decryption_version`) |
//! | `destroy` | `POST MOUNT/keys/KEY/config` then `POST MOUNT/keys/KEY/trim` |
//! | [`VaultTransitProvider::delete_key`] | `DELETE MOUNT/keys/KEY` (only where `deletion_allowed`) |
//!
//! # Why `encrypt` of a local DEK, and why a derived key's `context`
//!
//! - The DEK is drawn from the same CSPRNG as every other provider's and
//!   then encrypted: one round trip like `datakey/plaintext`, one capability
//!   (`encrypt`) for both `generate` and `wrap`, and the plaintext DEK
//!   crosses the (TLS) connection once either way.
//! - The context is bound through Transit's key derivation (`derived=true`,
//!   `context`), not `associated_data`: Transit's `rewrap` accepts a
//!   `context` but applies no associated data (checked on OpenBao 2.7.2: an
//!   AAD-bound ciphertext fails rewrap), so AAD would rule out rewrap and
//!   batch rewrap. A non-derived key silently ignores `context`; the
//!   provider therefore reads the key's settings before using it and refuses
//!   a key that is not a derived `aes256-gcm96` key (also refusing to let
//!   `encrypt` create a missing key on the fly, which Transit does for a
//!   token with the `create` capability).
//! - What is sent as `context` is a keyed digest of the whole encryption
//!   context ([`VaultConfig`]), never a context value: the server's audit
//!   devices see no PHI from it.
//!
//! # Versions
//!
//! A Transit ciphertext is `vault:vN:BASE64`. The header entry records `N`
//! as the key version and the decoded bytes as the wrapped key; `unwrap`
//! rebuilds the ciphertext from them, so the version is bound (a changed
//! version number names another key version and fails). The version that
//! `encrypt` and `rewrap` answer in `key_version` must equal the prefix's;
//! an answer where they differ is discarded.
//!
//! # Lifecycle mapping
//!
//! Transit always encrypts under the latest version (`latest_version`), so
//! that one is the primary and `Enabled`; versions from
//! `min_decryption_version` up to it are `DecryptOnly`; versions below
//! `min_decryption_version` are `Disabled`; versions below
//! `min_available_version` are trimmed: `Destroyed`. Because Transit's
//! bounds are minimums, states change only at the low end: `disable` and
//! `destroy` take the oldest version still in the state before, and
//! `set_state(DecryptOnly)` re-enables the newest disabled one. Making an
//! older version primary again or the primary decrypt-only is not
//! expressible (`Unsupported`): rotate instead.
//!
//! # Plaintext keys in memory
//!
//! The DEK of a request travels base64-encoded in a JSON body that hyper
//! frees without wiping; the answer of a decrypt is read into a zeroizing
//! buffer and parsed in place, and the decoded DEK moved into a [`Dek`]. The
//! token is a [`VaultToken`] (zeroized, never printed) but the header value
//! hyper sends is an ordinary allocation, marked sensitive.

mod config;
mod error;
mod http;

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine as _;
use hyper::Method;
use serde::Deserialize;
use zeroize::Zeroizing;

pub use config::{VaultConfig, VaultToken, MAX_PREVIOUS_CONTEXT_KEYS, MIN_CONTEXT_KEY_LEN};

use self::error::{classify, provider_error, Call, Failure};
use self::http::{Answer, Http};
use super::{
    BoxFuture, KeyInfo, KeyProvider, KeyRef, KeyRefKind, KeyState, KeyVersionInfo,
    ProviderErrorKind, Unwrapped,
};
use crate::error::{Error, Result};
use crate::format::{EncryptionContext, WrappedKey, MAX_WRAPPED_KEY_LEN};
use crate::primitives::Dek;

/// The provider id, the scheme of its key references.
pub const PROVIDER_ID: &str = "vault-transit";

/// Most items sent in one `batch_input` request by
/// [`VaultTransitProvider::rewrap_batch`]. Each item costs four JSON strings
/// and the server's listener refuses a body of more than 1000 strings by
/// default (`max_request_json_strings`; checked on OpenBao 2.7.2: 256 items
/// are refused as "high complexity").
pub const MAX_BATCH: usize = 200;

/// Most keys whose checked settings are remembered at once.
const KEY_CACHE_MAX: usize = 256;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A Transit key: mount and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TransitKey {
    mount: String,
    name: String,
}

impl TransitKey {
    fn path(&self, what: &str) -> String {
        format!("{}/{what}/{}", self.mount, self.name)
    }
    fn key_ref(&self) -> String {
        format!("{PROVIDER_ID}:{}/{}", self.mount, self.name)
    }
}

/// The settings of a Transit key (`GET MOUNT/keys/KEY`), as far as used.
#[derive(Debug, Deserialize)]
struct KeySettings {
    #[serde(rename = "type")]
    key_type: String,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    deletion_allowed: bool,
    latest_version: u32,
    #[serde(default)]
    min_available_version: u32,
    #[serde(default)]
    min_decryption_version: u32,
    #[serde(default)]
    min_encryption_version: u32,
    /// Version -> creation time (Unix seconds) for the versions still held.
    #[serde(default)]
    keys: HashMap<String, serde_json::Value>,
}

impl KeySettings {
    /// The lowest version not trimmed.
    fn lowest_available(&self) -> u32 {
        self.min_available_version.max(1)
    }
    /// The lowest version that decrypts.
    fn lowest_decryptable(&self) -> u32 {
        self.min_decryption_version.max(self.lowest_available())
    }
    fn state(&self, version: u32) -> KeyState {
        if version < self.lowest_available() {
            KeyState::Destroyed
        } else if version < self.lowest_decryptable() {
            KeyState::Disabled
        } else if version == self.latest_version {
            KeyState::Enabled
        } else {
            KeyState::DecryptOnly
        }
    }
}

#[derive(Deserialize)]
struct Data<T> {
    data: T,
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct CipherAnswer {
    ciphertext: String,
    key_version: Option<u32>,
}

#[derive(Deserialize)]
struct PlainAnswer<'a> {
    #[serde(borrow)]
    plaintext: &'a str,
}

#[derive(Deserialize)]
struct BatchAnswer {
    batch_results: Vec<BatchItem>,
}

#[derive(Deserialize)]
struct BatchItem {
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    key_version: Option<u32>,
    #[serde(default)]
    error: Option<String>,
}

/// A key provider backed by a Vault or OpenBao Transit engine.
///
/// See the [module docs](self) for the API calls, the context binding, the
/// version and lifecycle mapping, and docs/TRANSIT.md for the policy a
/// token needs. Cheap to share: hold it as `Arc<dyn KeyProvider>`.
pub struct VaultTransitProvider {
    http: Http,
    config: VaultConfig,
    checked: Mutex<HashMap<TransitKey, Instant>>,
}

impl fmt::Debug for VaultTransitProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultTransitProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn other(message: impl Into<String>) -> Error {
    provider_error(ProviderErrorKind::Other, message)
}

/// Splits `vault:vN:BASE64` into the version and the decoded bytes.
fn split_ciphertext(ciphertext: &str) -> Option<(u32, Vec<u8>)> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (version, b64) = rest.split_once(':')?;
    if version.is_empty() || version.len() > 10 || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let version: u32 = version.parse().ok().filter(|v| *v > 0)?;
    let bytes = B64.decode(b64).ok()?;
    (!bytes.is_empty() && bytes.len() <= MAX_WRAPPED_KEY_LEN).then_some((version, bytes))
}

fn join_ciphertext(version: u32, wrapped: &[u8]) -> String {
    format!("vault:v{version}:{}", B64.encode(wrapped))
}

/// A JSON body in a zeroizing buffer.
fn json_body(value: &serde_json::Value) -> Zeroizing<Vec<u8>> {
    // Serialising a Value into a Vec cannot fail.
    Zeroizing::new(serde_json::to_vec(value).unwrap_or_default())
}

impl VaultTransitProvider {
    /// A provider for the server and credentials of `config`. Reads the CA
    /// and client certificate files; makes no request.
    ///
    /// Fails with [`ProviderErrorKind::Misconfigured`] when no token is
    /// configured, or with [`Error::InvalidArgument`] for unusable TLS files.
    pub fn new(config: VaultConfig) -> Result<VaultTransitProvider> {
        if config.token.is_none() {
            return Err(provider_error(
                ProviderErrorKind::Misconfigured,
                "no Vault token: set VAULT_TOKEN (or BAO_TOKEN), or call VaultConfig::token_file",
            ));
        }
        Ok(VaultTransitProvider {
            http: Http::new(&config)?,
            config,
            checked: Mutex::new(HashMap::new()),
        })
    }

    /// The server address (`https://HOST:PORT`).
    pub fn address(&self) -> &str {
        self.http.address()
    }

    /// Exactly the Transit `context` this provider sends for `context`
    /// (base64 of the keyed digest): for matching audit-device entries to
    /// messages, with the context key.
    pub fn transit_context(&self, context: &EncryptionContext) -> String {
        self.config.transit_context(context, 0)
    }

    fn transit_key(&self, key: &KeyRef) -> Result<TransitKey> {
        match key.kind() {
            KeyRefKind::VaultTransit { mount, name } => Ok(TransitKey {
                mount: mount.clone(),
                name: name.clone(),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "{key} is not a vault-transit: reference; the vault-transit provider holds only \
                 Transit keys"
            ))),
        }
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Answer> {
        self.http
            .call(method, path, body.as_ref().map(json_body))
            .await
    }

    /// An error answer, classified.
    fn failure(answer: &Answer, path: &str, key: &TransitKey, call: Call) -> Failure {
        let errors = serde_json::from_slice::<Errors>(&answer.body)
            .map(|e| e.errors)
            .unwrap_or_default();
        classify(path, &key.key_ref(), call, answer.status, &errors)
    }

    fn fail(answer: &Answer, path: &str, key: &TransitKey, call: Call) -> Error {
        match Self::failure(answer, path, key, call) {
            Failure::Error(e) | Failure::TooOld(e) => e,
            Failure::Rejected => Error::Decrypt,
        }
    }

    fn parse<'a, T: Deserialize<'a>>(answer: &'a Answer, path: &str) -> Result<T> {
        serde_json::from_slice::<Data<T>>(&answer.body)
            .map(|d| d.data)
            .map_err(|_| {
                other(format!(
                    "Transit answered {path} with a body phi-envelope cannot read (HTTP {}); \
                     check that VAULT_ADDR points at Vault or OpenBao",
                    answer.status
                ))
            })
    }

    /// `GET MOUNT/keys/KEY`.
    async fn settings(&self, key: &TransitKey) -> Result<KeySettings> {
        let path = key.path("keys");
        let answer = self.request(Method::GET, &path, None).await?;
        if answer.status != 200 {
            return Err(Self::fail(&answer, &path, key, Call::Read));
        }
        Self::parse(&answer, &path)
    }

    /// Checks (at most once per TTL) that `key` exists and is a derived
    /// `aes256-gcm96` key, so that `context` binds and `encrypt` never
    /// creates a key on the fly.
    async fn check_key(&self, key: &TransitKey) -> Result<()> {
        let ttl = self.config.key_check_ttl;
        if let Some(at) = self.lock_checked().get(key) {
            if at.elapsed() < ttl {
                return Ok(());
            }
        }
        let settings = self.settings(key).await?;
        if settings.key_type != "aes256-gcm96" || !settings.derived {
            return Err(provider_error(
                ProviderErrorKind::Misconfigured,
                format!(
                    "the Transit key {} is a {}{} key: phi-envelope binds the encryption context \
                     through key derivation and needs a derived aes256-gcm96 key (Transit ignores \
                     the context of a non-derived key); create one with create_key",
                    key.key_ref(),
                    if settings.derived {
                        "derived "
                    } else {
                        "non-derived "
                    },
                    settings.key_type
                ),
            ));
        }
        if !ttl.is_zero() {
            let mut cache = self.lock_checked();
            if cache.len() >= KEY_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key.clone(), Instant::now());
        }
        Ok(())
    }

    fn lock_checked(&self) -> std::sync::MutexGuard<'_, HashMap<TransitKey, Instant>> {
        // The map holds no invariant a panic could break.
        self.checked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a ciphertext answer and makes the header entry.
    fn entry_from(key: &TransitKey, answer: CipherAnswer, path: &str) -> Result<WrappedKey> {
        let (version, wrapped) = split_ciphertext(&answer.ciphertext).ok_or_else(|| {
            other(format!(
                "Transit answered {path} with a ciphertext that is not vault:vN:BASE64 of 1 to \
                 {MAX_WRAPPED_KEY_LEN} bytes"
            ))
        })?;
        if answer.key_version.is_some_and(|v| v != version) {
            return Err(other(format!(
                "Transit answered {path} with key_version {} but a ciphertext of version \
                 {version}; the answer was discarded",
                answer.key_version.unwrap_or(0)
            )));
        }
        Ok(WrappedKey {
            provider: PROVIDER_ID.to_owned(),
            key_ref: key.key_ref(),
            key_version: version,
            wrapped,
        })
    }

    async fn wrap_dek(
        &self,
        key: &KeyRef,
        dek: &Dek,
        context: &EncryptionContext,
    ) -> Result<WrappedKey> {
        let target = self.transit_key(key)?;
        self.check_key(&target).await?;
        let path = target.path("encrypt");
        let plaintext = Zeroizing::new(B64.encode(dek.expose_secret()));
        let body = serde_json::json!({
            "plaintext": plaintext.as_str(),
            "context": self.config.transit_context(context, 0),
        });
        let answer = self
            .http
            .call(Method::POST, &path, Some(json_body(&body)))
            .await;
        let _ = body_zeroize(body);
        let answer = answer?;
        if answer.status != 200 {
            return Err(Self::fail(&answer, &path, &target, Call::Encrypt));
        }
        let data: CipherAnswer = Self::parse(&answer, &path)?;
        Self::entry_from(&target, data, &path)
    }

    /// The Transit key of a header entry; `None` when the entry is not one
    /// of this provider's.
    fn entry_key(&self, entry: &WrappedKey) -> Option<TransitKey> {
        if entry.provider != PROVIDER_ID {
            return None;
        }
        let key_ref = KeyRef::parse(&entry.key_ref).ok()?;
        self.transit_key(&key_ref).ok()
    }

    async fn unwrap_entry(
        &self,
        entry: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<Unwrapped> {
        let Some(key) = self.entry_key(entry) else {
            return Ok(Unwrapped::NotMine);
        };
        if entry.key_version == 0
            || entry.wrapped.is_empty()
            || entry.wrapped.len() > MAX_WRAPPED_KEY_LEN
        {
            return Ok(Unwrapped::Rejected);
        }
        self.check_key(&key).await?;
        let path = key.path("decrypt");
        let ciphertext = join_ciphertext(entry.key_version, &entry.wrapped);
        for index in 0..self.config.context_key_count() {
            let body = serde_json::json!({
                "ciphertext": ciphertext,
                "context": self.config.transit_context(context, index),
            });
            let answer = self.request(Method::POST, &path, Some(body)).await?;
            if answer.status != 200 {
                match Self::failure(&answer, &path, &key, Call::Decrypt) {
                    Failure::Rejected => continue,
                    Failure::TooOld(e) => {
                        return Err(self.too_old(&key, entry.key_version, e).await)
                    }
                    Failure::Error(e) => return Err(e),
                }
            }
            let data: PlainAnswer<'_> = Self::parse(&answer, &path)?;
            let bytes = Zeroizing::new(B64.decode(data.plaintext).unwrap_or_default());
            // A plaintext of another length is not a DEK of ours: opaque,
            // like any other foreign wrapped key.
            return Ok(Dek::from_slice(&bytes).map_or(Unwrapped::Rejected, Unwrapped::Key));
        }
        Ok(Unwrapped::Rejected)
    }

    /// A version refused as too old: destroyed (trimmed) or disabled?
    async fn too_old(&self, key: &TransitKey, version: u32, disabled: Error) -> Error {
        match self.settings(key).await {
            Ok(s) if s.state(version) == KeyState::Destroyed => provider_error(
                ProviderErrorKind::KeyDestroyed,
                format!(
                    "version {version} of {} was destroyed (trimmed below \
                     min_available_version {}): everything wrapped under it is unreadable for \
                     good",
                    key.key_ref(),
                    s.min_available_version
                ),
            ),
            _ => disabled,
        }
    }

    async fn rewrap_entry(
        &self,
        entry: &WrappedKey,
        key: &KeyRef,
        context: &EncryptionContext,
    ) -> Result<Option<WrappedKey>> {
        let Some(source) = self.entry_key(entry) else {
            return Ok(None);
        };
        let target = self.transit_key(key)?;
        // Transit rewraps within one key only.
        if source != target || entry.key_version == 0 || entry.wrapped.is_empty() {
            return Ok(None);
        }
        self.check_key(&target).await?;
        let path = target.path("rewrap");
        let body = serde_json::json!({
            "ciphertext": join_ciphertext(entry.key_version, &entry.wrapped),
            "context": self.config.transit_context(context, 0),
        });
        let answer = self.request(Method::POST, &path, Some(body)).await?;
        if answer.status != 200 {
            return match Self::failure(&answer, &path, &target, Call::Decrypt) {
                // Under a previous context key (rewrap cannot change the
                // context), or refused for the source version's sake: the
                // keyring holds the DEK and encrypts it under the current
                // digest, which reports any problem of the key itself.
                Failure::Rejected | Failure::TooOld(_) => Ok(None),
                Failure::Error(Error::Provider(p))
                    if p.kind() == ProviderErrorKind::AccessDenied =>
                {
                    Ok(None)
                }
                Failure::Error(e) => Err(e),
            };
        }
        let data: CipherAnswer = Self::parse(&answer, &path)?;
        Self::entry_from(&target, data, &path).map(Some)
    }

    /// Rewraps many entries of one key to its latest version with Transit's
    /// `batch_input` ([`MAX_BATCH`] per request): what a store of millions of
    /// wrapped keys needs after a rotation, without the DEKs leaving the
    /// server. Each item is an entry and the context it was made under; the
    /// answer has one result per item, in order: the new entry, the opaque
    /// [`Error::Decrypt`] for an entry that does not decrypt under its
    /// context, or an error for an entry of another key or provider. A
    /// failure of the request itself (server down, sealed, denied) fails the
    /// whole call.
    ///
    /// A header holds more than the wrapped key (its tag is keyed by the
    /// DEK), so this serves stores of wrapped keys; whole messages are
    /// rewrapped with [`Envelope::rewrap`](crate::Envelope::rewrap).
    pub async fn rewrap_batch(
        &self,
        key: &KeyRef,
        items: &[(&WrappedKey, &EncryptionContext)],
    ) -> Result<Vec<Result<WrappedKey>>> {
        let target = self.transit_key(key)?;
        self.check_key(&target).await?;
        let path = target.path("rewrap");
        let mut out: Vec<Result<WrappedKey>> = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_BATCH) {
            let mut input = Vec::with_capacity(chunk.len());
            let mut sent = Vec::with_capacity(chunk.len());
            let mut results: Vec<Option<Result<WrappedKey>>> = Vec::with_capacity(chunk.len());
            for (i, (entry, context)) in chunk.iter().enumerate() {
                if self.entry_key(entry).as_ref() != Some(&target) || entry.key_version == 0 {
                    results.push(Some(Err(Error::InvalidArgument(format!(
                        "batch item {i} is not an entry of {key}: Transit rewraps within one key"
                    )))));
                    continue;
                }
                results.push(None);
                sent.push(i);
                input.push(serde_json::json!({
                    "ciphertext": join_ciphertext(entry.key_version, &entry.wrapped),
                    "context": self.config.transit_context(context, 0),
                }));
            }
            if !input.is_empty() {
                let body = serde_json::json!({ "batch_input": input });
                let answer = self.request(Method::POST, &path, Some(body)).await?;
                // Transit answers 400 when every item failed, with the items'
                // errors in batch_results.
                let parsed = serde_json::from_slice::<Data<BatchAnswer>>(&answer.body)
                    .ok()
                    .map(|d| d.data.batch_results)
                    .filter(|r| r.len() == sent.len());
                let Some(batch) = parsed else {
                    return Err(Self::fail(&answer, &path, &target, Call::Decrypt));
                };
                for (slot, item) in sent.iter().zip(batch) {
                    let result = match (item.error, item.ciphertext) {
                        (None, Some(ciphertext)) => Self::entry_from(
                            &target,
                            CipherAnswer {
                                ciphertext,
                                key_version: item.key_version,
                            },
                            &path,
                        ),
                        (error, _) => {
                            let errors: Vec<String> = error.into_iter().collect();
                            match classify(&path, &target.key_ref(), Call::Decrypt, 400, &errors) {
                                Failure::Rejected => Err(Error::Decrypt),
                                Failure::Error(e) | Failure::TooOld(e) => Err(e),
                            }
                        }
                    };
                    results[*slot] = Some(result);
                }
            }
            out.extend(
                results.into_iter().map(|r| {
                    r.unwrap_or_else(|| Err(other("Transit left a batch item unanswered")))
                }),
            );
        }
        Ok(out)
    }

    fn info(key: &TransitKey, s: &KeySettings) -> Result<KeyInfo> {
        let versions = (1..=s.latest_version)
            .map(|v| {
                let created = s
                    .keys
                    .get(&v.to_string())
                    .and_then(serde_json::Value::as_u64)
                    .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
                KeyVersionInfo::new(v, s.state(v), created)
            })
            .collect();
        let primary = (s.latest_version > 0).then_some(s.latest_version);
        Ok(KeyInfo::new(
            KeyRef::parse(&key.key_ref())?,
            primary,
            versions,
        ))
    }

    async fn describe_key(&self, key: &KeyRef) -> Result<KeyInfo> {
        let target = self.transit_key(key)?;
        let settings = self.settings(&target).await?;
        Self::info(&target, &settings)
    }

    async fn manage(&self, key: &TransitKey, what: &str, body: serde_json::Value) -> Result<()> {
        let path = key.path("keys");
        let path = if what.is_empty() {
            path
        } else {
            format!("{path}/{what}")
        };
        let answer = self.request(Method::POST, &path, Some(body)).await?;
        if !matches!(answer.status, 200 | 204) {
            return Err(Self::fail(&answer, &path, key, Call::Manage));
        }
        Ok(())
    }

    async fn create(&self, key: &KeyRef) -> Result<KeyInfo> {
        let target = self.transit_key(key)?;
        match self.settings(&target).await {
            Ok(_) => {
                return Err(provider_error(
                    ProviderErrorKind::InvalidState,
                    format!("the Transit key {key} already exists"),
                ))
            }
            Err(Error::Provider(p)) if p.kind() == ProviderErrorKind::KeyNotFound => {}
            Err(e) => return Err(e),
        }
        let mut body = serde_json::json!({
            "type": "aes256-gcm96",
            "derived": true,
            "exportable": false,
            "allow_plaintext_backup": false,
        });
        if let Some(period) = self.config.auto_rotate_period {
            body["auto_rotate_period"] = format!("{}s", period.as_secs()).into();
        }
        self.manage(&target, "", body).await?;
        self.describe_key(key).await
    }

    async fn rotate_key(&self, key: &KeyRef) -> Result<KeyInfo> {
        let target = self.transit_key(key)?;
        self.manage(&target, "rotate", serde_json::json!({}))
            .await?;
        self.describe_key(key).await
    }

    fn refuse(kind: ProviderErrorKind, message: String) -> Error {
        provider_error(kind, message)
    }

    async fn change_state(&self, key: &KeyRef, version: u32, state: KeyState) -> Result<KeyInfo> {
        use ProviderErrorKind as K;
        let target = self.transit_key(key)?;
        let s = self.settings(&target).await?;
        if version == 0 || version > s.latest_version {
            return Err(Self::refuse(
                K::KeyNotFound,
                format!(
                    "{key} has no version {version} (latest {})",
                    s.latest_version
                ),
            ));
        }
        let current = s.state(version);
        if current == state {
            return Self::info(&target, &s);
        }
        if current == KeyState::Destroyed {
            return Err(Self::refuse(
                K::KeyDestroyed,
                format!("version {version} of {key} is destroyed (trimmed)"),
            ));
        }
        let min_decryption = match state {
            KeyState::Disabled if version == s.latest_version => {
                return Err(Self::refuse(
                    K::InvalidState,
                    format!(
                        "version {version} is the primary of {key}: Transit encrypts under the \
                         latest version, so rotate first, then disable it"
                    ),
                ))
            }
            KeyState::Disabled if version == s.lowest_decryptable() => version + 1,
            KeyState::Disabled => {
                return Err(Self::refuse(
                    K::InvalidState,
                    format!(
                        "Transit disables versions from the oldest up (min_decryption_version): \
                         disable version {} of {key} first",
                        s.lowest_decryptable()
                    ),
                ))
            }
            KeyState::DecryptOnly if version == s.latest_version => {
                return Err(Self::refuse(
                    K::Unsupported,
                    format!(
                        "Transit always encrypts under the latest version of {key}: it cannot \
                         be made decrypt-only; rotate instead"
                    ),
                ))
            }
            KeyState::DecryptOnly if version + 1 == s.lowest_decryptable() => version,
            KeyState::DecryptOnly => {
                return Err(Self::refuse(
                    K::InvalidState,
                    format!(
                        "Transit re-enables versions from the newest disabled one down: set \
                         version {} of {key} decrypt-only first",
                        s.lowest_decryptable() - 1
                    ),
                ))
            }
            KeyState::Enabled => {
                return Err(Self::refuse(
                    K::Unsupported,
                    format!(
                        "Transit always encrypts under the latest version of {key}: an older \
                         version cannot become primary again; rotate instead"
                    ),
                ))
            }
            _ => {
                return Err(Self::refuse(
                    K::InvalidState,
                    format!("use destroy to destroy a version of {key}"),
                ))
            }
        };
        self.manage(
            &target,
            "config",
            serde_json::json!({ "min_decryption_version": min_decryption }),
        )
        .await?;
        self.describe_key(key).await
    }

    async fn destroy_version(&self, key: &KeyRef, version: u32) -> Result<KeyInfo> {
        use ProviderErrorKind as K;
        let target = self.transit_key(key)?;
        let s = self.settings(&target).await?;
        if version == 0 || version > s.latest_version {
            return Err(Self::refuse(
                K::KeyNotFound,
                format!(
                    "{key} has no version {version} (latest {})",
                    s.latest_version
                ),
            ));
        }
        match s.state(version) {
            KeyState::Destroyed => return Self::info(&target, &s),
            KeyState::Enabled => {
                return Err(Self::refuse(
                    K::InvalidState,
                    format!(
                        "version {version} is the primary of {key}: rotate first, then destroy it"
                    ),
                ))
            }
            _ => {}
        }
        if version != s.lowest_available() {
            return Err(Self::refuse(
                K::InvalidState,
                format!(
                    "Transit destroys versions from the oldest up (trim): destroy version {} of \
                     {key} first",
                    s.lowest_available()
                ),
            ));
        }
        // trim needs min_available_version <= min_decryption_version and
        // <= min_encryption_version; phi-envelope never asks for an explicit
        // encryption version, so raising min_encryption_version changes
        // nothing else.
        let next = version + 1;
        self.manage(
            &target,
            "config",
            serde_json::json!({
                "min_decryption_version": s.min_decryption_version.max(next),
                "min_encryption_version": s.min_encryption_version.max(next),
            }),
        )
        .await?;
        self.manage(
            &target,
            "trim",
            serde_json::json!({ "min_available_version": next }),
        )
        .await?;
        self.describe_key(key).await
    }

    /// Renews the token (`POST auth/token/renew-self`), asking for
    /// `increment` more time (the server's default TTL when `None`), and
    /// returns the lease the server granted. Call it on a schedule shorter
    /// than the token's TTL (half of it is customary) for a token from
    /// `VAULT_TOKEN`; a token file renewed by a Vault Agent needs nothing.
    /// A token that cannot be renewed (root or other non-renewable tokens,
    /// or past its maximum TTL) is [`ProviderErrorKind::InvalidState`].
    pub async fn renew_token(&self, increment: Option<Duration>) -> Result<Duration> {
        #[derive(Deserialize)]
        struct Renewed {
            auth: Option<Lease>,
        }
        #[derive(Deserialize)]
        struct Lease {
            lease_duration: u64,
            #[serde(default)]
            renewable: bool,
        }
        let body = match increment {
            Some(d) => serde_json::json!({ "increment": format!("{}s", d.as_secs()) }),
            None => serde_json::json!({}),
        };
        let path = "auth/token/renew-self";
        let answer = self.request(Method::POST, path, Some(body)).await?;
        let shown = "the provider's token";
        if answer.status != 200 {
            let errors = serde_json::from_slice::<Errors>(&answer.body)
                .map(|e| e.errors)
                .unwrap_or_default();
            return Err(
                match classify(path, shown, Call::Manage, answer.status, &errors) {
                    Failure::Error(e) | Failure::TooOld(e) => e,
                    Failure::Rejected => other("token renewal failed"),
                },
            );
        }
        let lease = serde_json::from_slice::<Renewed>(&answer.body)
            .ok()
            .and_then(|r| r.auth)
            .ok_or_else(|| other("Vault answered the token renewal without an auth block"))?;
        if !lease.renewable || lease.lease_duration == 0 {
            return Err(provider_error(
                ProviderErrorKind::InvalidState,
                "the provider's token is not renewable (a root or periodic-less token, or at \
                 its maximum TTL): log in again for a new token",
            ));
        }
        Ok(Duration::from_secs(lease.lease_duration))
    }

    /// Deletes the whole key from Transit (`DELETE MOUNT/keys/KEY`): every
    /// version and everything wrapped under any of them is unreadable for
    /// good. Transit refuses unless the key's `deletion_allowed` was set
    /// (by an administrator, on purpose): that refusal is
    /// [`ProviderErrorKind::InvalidState`]. Not part of the
    /// [`KeyProvider`] trait, so it passes no keyring policy: gate it in the
    /// application.
    pub async fn delete_key(&self, key: &KeyRef) -> Result<()> {
        let target = self.transit_key(key)?;
        let s = self.settings(&target).await?;
        if !s.deletion_allowed {
            return Err(provider_error(
                ProviderErrorKind::InvalidState,
                format!(
                    "the Transit key {key} does not allow deletion: an administrator must set \
                     deletion_allowed on it first (POST {}/config)",
                    target.path("keys")
                ),
            ));
        }
        let path = target.path("keys");
        let answer = self.request(Method::DELETE, &path, None).await?;
        if !matches!(answer.status, 200 | 204) {
            return Err(Self::fail(&answer, &path, &target, Call::Manage));
        }
        self.lock_checked().remove(&target);
        Ok(())
    }
}

/// Drops a request body's JSON value (the plaintext DEK inside it is an
/// ordinary `String` in `serde_json::Value`; overwrite it first).
fn body_zeroize(mut body: serde_json::Value) -> serde_json::Value {
    if let Some(serde_json::Value::String(s)) = body.get_mut("plaintext") {
        zeroize::Zeroize::zeroize(s);
    }
    body
}

impl KeyProvider for VaultTransitProvider {
    fn id(&self) -> &str {
        PROVIDER_ID
    }

    /// `encrypt` of the DEK under the key's latest version.
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(self.wrap_dek(key, dek, context))
    }

    /// `decrypt` of the ciphertext rebuilt from the entry.
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(self.unwrap_entry(entry, context))
    }

    /// `GET MOUNT/keys/KEY`: every version with its state; the latest is
    /// primary.
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.describe_key(key))
    }

    fn supports_rewrap(&self) -> bool {
        true
    }

    /// `rewrap` to the key's latest version, for an entry of the same key;
    /// `Ok(None)` otherwise (the keyring then wraps the DEK itself).
    fn rewrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Option<WrappedKey>>> {
        Box::pin(self.rewrap_entry(entry, key, context))
    }

    /// A derived, non-exportable `aes256-gcm96` key.
    fn create_key<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.create(key))
    }

    /// `rotate`: a new latest version, the old one decrypt-only.
    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.rotate_key(key))
    }

    /// `min_decryption_version` moved by one: disable the oldest
    /// decryptable version, or re-enable the newest disabled one.
    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.change_state(key, version, state))
    }

    /// `trim` of the oldest remaining version (not the primary).
    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.destroy_version(key, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertexts_split_and_join() {
        let bytes = vec![7u8; 60];
        let text = join_ciphertext(3, &bytes);
        assert!(text.starts_with("vault:v3:"));
        assert_eq!(split_ciphertext(&text), Some((3, bytes)));
        for bad in [
            "vault:v0:AAAA",
            "vault:v:AAAA",
            "vault:v1:",
            "vault:v1:!!",
            "vault:vx:AAAA",
            "vault:v+1:AAAA",
            "vault:v99999999999:AAAA",
            "v1:AAAA",
        ] {
            assert_eq!(split_ciphertext(bad), None, "{bad}");
        }
    }

    #[test]
    fn states_from_settings() {
        let s = KeySettings {
            key_type: "aes256-gcm96".into(),
            derived: true,
            deletion_allowed: false,
            latest_version: 5,
            min_available_version: 2,
            min_decryption_version: 3,
            min_encryption_version: 3,
            keys: HashMap::new(),
        };
        use KeyState::*;
        let states: Vec<_> = (1..=5).map(|v| s.state(v)).collect();
        assert_eq!(
            states,
            [Destroyed, Disabled, DecryptOnly, DecryptOnly, Enabled]
        );
    }
}
