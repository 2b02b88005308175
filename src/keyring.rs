//! The keyring: which providers and keys a message is wrapped to, the policy
//! hook, the event sinks, and the single path through which every key access
//! goes.
//!
//! Every provider call made by phi-envelope passes through [`Keyring`]: the
//! policy hook is asked first (a denial stops it before the provider is
//! touched), the call is timed, and an [`Event`] is recorded before the
//! result is released. When the sink cannot record the event and the keyring
//! fails closed (the default), the result is dropped (a DEK is zeroized) and
//! the operation fails with [`Error::Audit`].
//!
//! The keyring also owns the key lifecycle as the application sees it:
//!
//! - the lifecycle verbs ([`create_key`](Keyring::create_key),
//!   [`rotate`](Keyring::rotate), [`set_state`](Keyring::set_state),
//!   [`disable`](Keyring::disable), [`destroy`](Keyring::destroy),
//!   [`describe`](Keyring::describe)), each checked by the provider against
//!   the state machine of `docs/KEY-LIFECYCLE.md`, recorded as an event, and
//!   flushing the [data-key cache](crate::cache) of the key they change;
//! - a [`KeyPolicy`] per key, applied by key identity (any spelling of the
//!   key: see [`KeyIdentity`]): a minimum decryption version
//!   (older entries are refused before any provider call) and a
//!   cryptoperiod (encrypting under a primary version older than it is
//!   refused, or rotates first);
//! - the [data-key cache](crate::cache).
//!
//! ```
//! # async fn demo() -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use phi_envelope::keyring::{KeyPolicy, OnExpired};
//! use phi_envelope::provider::local::LocalKeystore;
//! use phi_envelope::{Caller, EncryptionContext, Envelope, KeyRef, Keyring};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
//! let key: KeyRef = "local:records".parse()?;
//! store.add_key(&key)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(store))
//!     .recipient(key.clone())
//!     .key_policy(
//!         key.clone(),
//!         KeyPolicy::new()
//!             .cryptoperiod(Duration::from_secs(90 * 24 * 3600)) // 90 days
//!             .on_expired(OnExpired::RotateFirst),
//!     )
//!     .build()?;
//! let envelope = Envelope::new(keyring).as_caller("ops", "key-rotation");
//! let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
//! let old = envelope.seal(b"under version 1", &ctx).await?;
//!
//! // Rotation: version 2 becomes primary, version 1 decrypt-only.
//! let operator = Caller::new("alice", "quarterly-rotation");
//! let info = envelope.keyring().rotate(&key, &operator).await?;
//! assert_eq!(info.primary_version, Some(2));
//! assert_eq!(envelope.open(&old, &ctx).await?, b"under version 1");
//!
//! // Rewrap the old record to version 2, then retire and destroy version 1.
//! let old = envelope.rewrap(&old, &ctx).await?;
//! envelope.keyring().disable(&key, 1, &operator).await?;
//! envelope.keyring().destroy(&key, 1, &operator).await?;
//! assert_eq!(envelope.open(&old, &ctx).await?, b"under version 1");
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ring::hmac;

use crate::approval::{Approval, ApprovalChecker, DualControl, GuardedOperation};
use crate::cache::{
    CacheConfig, CacheStats, DataKeyCache, Flights, FlushTarget, Join, KeyTag, KeyUse,
};
use crate::error::{Error, Result};
use crate::events::{Event, EventSink, NoopSink, Operation, Outcome};
use crate::format::{EncryptionContext, Header, WrappedKey, MAX_RECIPIENTS};
use crate::message::{OpeningKey, SealingKey};
use crate::policy::{AllowAll, Decision, Policy, PolicyRequest};
use crate::primitives::{fill_random, Dek};
use crate::provider::{
    KeyIdentity, KeyInfo, KeyProvider, KeyRef, KeyState, ProviderError, Unwrapped,
};

/// Who performs an operation and why: supplied by the caller, recorded in
/// every event, shown to the policy hook.
///
/// An actor is required for key management: [`Keyring::create_key`],
/// [`rotate`](Keyring::rotate), [`set_state`](Keyring::set_state),
/// [`disable`](Keyring::disable) and [`destroy`](Keyring::destroy) refuse a
/// caller whose actor is unset, empty or only whitespace (the
/// [`Default`] caller, and an [`Envelope`](crate::Envelope) not given one
/// with [`as_caller`](crate::Envelope::as_caller)), with
/// [`Error::InvalidArgument`] and an event with outcome `failed:no-actor`,
/// before the policy hook or any provider is asked. Key use (seal, open,
/// rewrap, describe, and the rotation a
/// [`RotateFirst`](OnExpired::RotateFirst) policy makes on behalf of a
/// seal) goes on without one, but is counted in
/// [`Keyring::calls_without_actor`], logged once per keyring as a
/// `tracing` warning (feature `tracing`), and its events carry
/// `"actor":null`. No placeholder such as `unknown` is ever recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The actor (a service, a user, an operator).
    pub actor: Option<String>,
    /// The purpose (e.g. `treatment`, `backup`, `key-rotation`).
    pub purpose: Option<String>,
}

impl Caller {
    /// A caller with an actor and a purpose.
    pub fn new(actor: impl Into<String>, purpose: impl Into<String>) -> Caller {
        Caller {
            actor: Some(actor.into()),
            purpose: Some(purpose.into()),
        }
    }

    /// True when the actor is set and not empty or only whitespace.
    pub fn has_actor(&self) -> bool {
        self.actor.as_deref().is_some_and(|a| !a.trim().is_empty())
    }
}

/// What encrypting does when the primary version of a key is older than
/// its [cryptoperiod](KeyPolicy::cryptoperiod).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnExpired {
    /// Refuse with [`Error::KeyLifecycle`]: an operator rotates the key
    /// (`backup keys rotate REF`) and encryption resumes.
    #[default]
    Refuse,
    /// Rotate the key first (one rotation, however many tasks are
    /// encrypting), then encrypt under the new primary. If the rotation
    /// fails, nothing is encrypted and the error is
    /// [`Error::KeyLifecycle`]; the old primary stays in place, so messages
    /// already written still open.
    RotateFirst,
}

/// The lifecycle rules of one key reference, enforced by the keyring for
/// every provider (see [`KeyringBuilder::key_policy`]).
///
/// ```
/// use std::time::Duration;
/// use phi_envelope::keyring::{KeyPolicy, OnExpired};
///
/// let policy = KeyPolicy::new()
///     .min_decrypt_version(3)
///     .cryptoperiod(Duration::from_secs(365 * 24 * 3600))
///     .on_expired(OnExpired::Refuse);
/// assert_eq!(policy.min_decrypt_version, Some(3));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyPolicy {
    /// Header entries under an older version of this key are refused with
    /// [`Error::KeyLifecycle`] (and an event) before any provider call or
    /// cache lookup. Raise it once every message under the old versions has
    /// been rewrapped; it is the keyring-side guard that a version is
    /// retired, before it is disabled or destroyed in the provider.
    pub min_decrypt_version: Option<u32>,
    /// The maximum age of the primary version for encryption (NIST SP
    /// 800-57's originator-usage period), measured from the creation time
    /// the provider reports in [`describe`](Keyring::describe). A provider
    /// that reports no creation time cannot have a cryptoperiod enforced:
    /// encryption is then refused rather than let through unchecked.
    pub cryptoperiod: Option<Duration>,
    /// What happens when the primary is older than the cryptoperiod.
    pub on_expired: OnExpired,
}

impl KeyPolicy {
    /// No rules.
    pub fn new() -> KeyPolicy {
        KeyPolicy::default()
    }

    /// Sets [`min_decrypt_version`](Self::min_decrypt_version).
    pub fn min_decrypt_version(mut self, version: u32) -> KeyPolicy {
        self.min_decrypt_version = Some(version);
        self
    }

    /// Sets [`cryptoperiod`](Self::cryptoperiod).
    pub fn cryptoperiod(mut self, period: Duration) -> KeyPolicy {
        self.cryptoperiod = Some(period);
        self
    }

    /// Sets [`on_expired`](Self::on_expired).
    pub fn on_expired(mut self, on_expired: OnExpired) -> KeyPolicy {
        self.on_expired = on_expired;
        self
    }
}

/// Builds a [`Keyring`].
pub struct KeyringBuilder {
    providers: Vec<Arc<dyn KeyProvider>>,
    recipients: Vec<KeyRef>,
    sink: Arc<dyn EventSink>,
    fail_closed: bool,
    policy: Arc<dyn Policy>,
    fingerprint_key: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// Whether `event_sink` / `policy` were called (else the no-op
    /// defaults, which the keyring skips outright).
    sink_set: bool,
    policy_set: bool,
    key_policies: Vec<(KeyRef, KeyPolicy)>,
    describe_ttl: Duration,
    cache: Option<CacheConfig>,
    dual_control: Option<DualControl>,
}

impl fmt::Debug for KeyringBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyringBuilder")
            .field("providers", &self.providers)
            .field("recipients", &self.recipients)
            .field("key_policies", &self.key_policies)
            .field("cache", &self.cache)
            .field("dual_control", &self.dual_control)
            .finish_non_exhaustive()
    }
}

impl KeyringBuilder {
    /// Adds a provider. Its [`id`](KeyProvider::id) must be unique.
    pub fn provider(mut self, provider: Arc<dyn KeyProvider>) -> Self {
        self.providers.push(provider);
        self
    }

    /// Adds a default recipient: new messages are wrapped to every default
    /// recipient (e.g. an HSM key and a KMS key for disaster recovery), and
    /// open with any one of them.
    pub fn recipient(mut self, key: KeyRef) -> Self {
        self.recipients.push(key);
        self
    }

    /// Where events go (default: nowhere).
    pub fn event_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self.sink_set = true;
        self
    }

    /// Whether an event that cannot be recorded refuses the operation
    /// (default `true`: fail closed).
    pub fn fail_closed(mut self, yes: bool) -> Self {
        self.fail_closed = yes;
        self
    }

    /// The policy hook (default: allow everything).
    pub fn policy(mut self, policy: Arc<dyn Policy>) -> Self {
        self.policy = policy;
        self.policy_set = true;
        self
    }

    /// The secret key of context fingerprints (at least 32 bytes, all of
    /// them used as the HMAC key). Set it in production: with the default (a
    /// random key per keyring) fingerprints in the audit log cannot be
    /// correlated across restarts or processes.
    pub fn context_fingerprint_key(mut self, key: &[u8]) -> Self {
        self.fingerprint_key = Some(zeroize::Zeroizing::new(key.to_vec()));
        self
    }

    /// Sets the lifecycle rules of `key` (a minimum decryption version, a
    /// cryptoperiod). Any spelling of the key works (for AWS KMS its alias,
    /// alias ARN, key ARN or key id): the rules apply by key identity (see
    /// [`KeyIdentity`]), to recipients and header entries however they
    /// name the key, as far as the provider reports identities (all the
    /// built-in ones do; for a provider that reports none, give the
    /// reference exactly as message headers record it: `backup inspect`
    /// shows it). An alias is followed to the key it names now (resolved
    /// again after the describe TTL). Setting it twice for the same
    /// spelling keeps the last; set one policy per key (with policies on
    /// two spellings of one key, the exact spelling's wins, else the first
    /// spelling in text order).
    pub fn key_policy(mut self, key: KeyRef, policy: KeyPolicy) -> Self {
        self.key_policies.retain(|(k, _)| k != &key);
        self.key_policies.push((key, policy));
        self
    }

    /// How long a [`describe`](Keyring::describe) answer is reused to check
    /// cryptoperiods (default one minute). Keys are described only when a
    /// cryptoperiod is configured for them, and the lifecycle verbs of this
    /// keyring refresh the answer at once; the TTL bounds how long a change
    /// made elsewhere (another process, the provider's console) goes unseen.
    pub fn describe_ttl(mut self, ttl: Duration) -> Self {
        self.describe_ttl = ttl;
        self
    }

    /// Puts the destructive lifecycle verbs under [dual control](crate::approval):
    /// destroy, disable, enable and decrypt-only (or those
    /// [`DualControl::guard`] names) then need approvals from the
    /// threshold of distinct registered custodians, passed with
    /// [`Keyring::destroy_approved`] and [`Keyring::set_state_approved`];
    /// [`Keyring::destroy`], [`Keyring::set_state`] and
    /// [`Keyring::disable`] (no approvals) are refused for the guarded
    /// verbs.
    pub fn dual_control(mut self, config: DualControl) -> Self {
        self.dual_control = Some(config);
        self
    }

    /// Turns on the [data-key cache](crate::cache) with `config`.
    pub fn data_key_cache(mut self, config: CacheConfig) -> Self {
        self.cache = Some(config);
        self
    }

    /// Checks the configuration and builds the keyring.
    pub fn build(self) -> Result<Keyring> {
        for (i, p) in self.providers.iter().enumerate() {
            if self.providers[..i].iter().any(|q| q.id() == p.id()) {
                return Err(Error::InvalidArgument(format!(
                    "two providers share the id {:?}",
                    p.id()
                )));
            }
        }
        let mut recipients: Vec<KeyRef> = Vec::new();
        for r in self.recipients {
            if !self.providers.iter().any(|p| p.id() == r.scheme()) {
                return Err(Error::InvalidArgument(format!(
                    "recipient {r} needs a provider with id {:?}",
                    r.scheme()
                )));
            }
            if !recipients.contains(&r) {
                recipients.push(r);
            }
        }
        if recipients.len() > MAX_RECIPIENTS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_RECIPIENTS} recipients"
            )));
        }
        let fp = match self.fingerprint_key {
            Some(k) if k.len() >= 32 => k,
            Some(_) => {
                return Err(Error::InvalidArgument(
                    "the context fingerprint key must be at least 32 bytes".into(),
                ))
            }
            None => {
                let mut k = zeroize::Zeroizing::new(vec![0u8; 32]);
                fill_random(&mut k)?;
                k
            }
        };
        let mut key_policies = HashMap::new();
        for (key, policy) in self.key_policies {
            if !self.providers.iter().any(|p| p.id() == key.scheme()) {
                return Err(Error::InvalidArgument(format!(
                    "a key policy is set for {key}, but no provider with id {:?} is configured",
                    key.scheme()
                )));
            }
            key_policies.insert(key.as_str().to_owned(), policy);
        }
        let cache = self.cache.as_ref().map(DataKeyCache::new).transpose()?;
        Ok(Keyring {
            providers: self.providers,
            recipients,
            sink: self.sink,
            records_events: self.sink_set,
            checks_policy: self.policy_set,
            dropped_events: std::sync::atomic::AtomicU64::new(0),
            fail_closed: self.fail_closed,
            policy: self.policy,
            fingerprint_key: hmac::Key::new(hmac::HMAC_SHA256, &fp),
            key_policies,
            describe_ttl: self.describe_ttl,
            described: Mutex::new(HashMap::new()),
            identities: Mutex::new(HashMap::new()),
            cache,
            flights: Flights::default(),
            provider_calls: AtomicU64::new(0),
            calls_without_actor: AtomicU64::new(0),
            warned_without_actor: AtomicBool::new(false),
            rotated_away: Mutex::new(HashMap::new()),
            approvals: self.dual_control.map(ApprovalChecker::new),
        })
    }
}

/// Providers, default recipients, policy and event sinks, key policies and
/// the data-key cache.
pub struct Keyring {
    providers: Vec<Arc<dyn KeyProvider>>,
    recipients: Vec<KeyRef>,
    sink: Arc<dyn EventSink>,
    /// False with the default no-op sink: events are not even built.
    records_events: bool,
    /// False with the default allow-all policy: requests are not built.
    checks_policy: bool,
    /// Events the sink failed to record while failing open.
    dropped_events: std::sync::atomic::AtomicU64,
    fail_closed: bool,
    policy: Arc<dyn Policy>,
    fingerprint_key: hmac::Key,
    key_policies: HashMap<String, KeyPolicy>,
    describe_ttl: Duration,
    /// Recent `describe` answers, by key reference, for cryptoperiod checks.
    described: Mutex<HashMap<String, (Arc<KeyInfo>, Instant)>>,
    /// Recent identity answers (see [`KeyIdentity`]), by reference text and
    /// whether it came from a header entry, for the describe TTL.
    identities: Mutex<HashMap<(bool, String), IdentityAnswer>>,
    cache: Option<DataKeyCache>,
    /// Single flight for cache misses, describes and rotate-first.
    flights: Flights,
    provider_calls: AtomicU64,
    /// Key uses (provider calls, cache hits) made for a caller without an
    /// actor, and whether that was logged already.
    calls_without_actor: AtomicU64,
    warned_without_actor: AtomicBool,
    /// By key reference: the primary (version, creation time) that the last
    /// successful rotation through this keyring rotated away from.
    rotated_away: Mutex<HashMap<String, PrimaryId>>,
    /// Dual control, with the nonces it accepted.
    approvals: Option<ApprovalChecker>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("providers", &self.providers)
            .field("recipients", &self.recipients)
            .field("sink", &self.sink)
            .field("fail_closed", &self.fail_closed)
            .field("policy", &self.policy)
            .field("key_policies", &self.key_policies)
            .field("cache", &self.cache)
            .field("dual_control", &self.approvals)
            .finish_non_exhaustive()
    }
}

/// The label of context fingerprints.
const FINGERPRINT_LABEL: &[u8] = b"phi-envelope/v1 context fingerprint\x00";

/// Facts about one provider call, for its policy request and event.
struct Call<'a> {
    operation: Operation,
    provider: &'a str,
    key_ref: Option<&'a str>,
    key_version: Option<u32>,
    /// The target state of a lifecycle verb (see [`Event::key_state`]).
    key_state: Option<KeyState>,
    /// The custodians who approved a verb under dual control.
    approvers: &'a [String],
    caller: &'a Caller,
    fingerprint: Option<String>,
}

impl Keyring {
    /// A builder with no providers, no recipients, no sink, allow-all policy.
    pub fn builder() -> KeyringBuilder {
        KeyringBuilder {
            providers: Vec::new(),
            recipients: Vec::new(),
            sink: Arc::new(NoopSink),
            fail_closed: true,
            policy: Arc::new(AllowAll),
            fingerprint_key: None,
            sink_set: false,
            policy_set: false,
            key_policies: Vec::new(),
            describe_ttl: Duration::from_secs(60),
            cache: None,
            dual_control: None,
        }
    }

    /// The lifecycle rules set for exactly this spelling of `key`, if any.
    /// (Encryption and decryption apply them by key identity: to every
    /// spelling of the key.)
    pub fn key_policy(&self, key: &KeyRef) -> Option<&KeyPolicy> {
        self.key_policies.get(key.as_str())
    }

    /// Provider calls made so far and the counters of the data-key cache
    /// (all zero but `provider_calls` when no cache is configured).
    pub fn cache_stats(&self) -> CacheStats {
        let mut stats = self
            .cache
            .as_ref()
            .map(DataKeyCache::stats)
            .unwrap_or_default();
        stats.provider_calls = self.provider_calls();
        stats
    }

    /// Every provider call this keyring has made (generate, wrap, unwrap,
    /// describe, lifecycle verbs): what the data-key cache saves.
    pub fn provider_calls(&self) -> u64 {
        self.provider_calls.load(Ordering::Relaxed)
    }

    /// Drops every cached data key (both caches). Keys unwrapped by calls
    /// already under way are not cached afterwards.
    pub fn flush_cache(&self) {
        if let Some(c) = &self.cache {
            c.flush_all();
        }
    }

    /// Drops every cached data key that involves `key` (any version, any
    /// spelling of the same key), and forgets its cached description. The
    /// lifecycle verbs do this themselves; call it after changing the key
    /// elsewhere (another process, the provider's console).
    ///
    /// This makes no provider call: where the identity of `key` is not
    /// known yet (this keyring has not seen the spelling within the
    /// describe TTL) or the provider reports none, every cached data key of
    /// the provider is dropped.
    pub fn flush_cache_for(&self, key: &KeyRef) {
        let identity = self.cached_identity(false, key.as_str());
        self.flush_identity(key, identity.as_ref());
    }

    // -----------------------------------------------------------------------
    // Key identity
    // -----------------------------------------------------------------------

    /// Most identity answers kept at once (references can come from
    /// headers).
    const IDENTITY_CACHE_MAX: usize = 4096;

    /// A fresh cached identity answer; `None` when unknown or not cached.
    fn cached_identity(&self, entry: bool, text: &str) -> Option<KeyIdentity> {
        lock(&self.identities)
            .get(&(entry, text.to_owned()))
            .filter(|(_, at)| at.elapsed() < self.describe_ttl)
            .and_then(|(id, _)| id.clone())
    }

    fn remember_identity(&self, entry: bool, text: &str, identity: &Option<KeyIdentity>) {
        if self.describe_ttl.is_zero() {
            return;
        }
        let mut map = lock(&self.identities);
        if map.len() >= Self::IDENTITY_CACHE_MAX {
            map.clear();
        }
        map.insert((entry, text.to_owned()), (identity.clone(), Instant::now()));
    }

    /// The identity of `key` as its provider reports it (reused for the
    /// describe TTL). Not a key access: no policy request, no event (for
    /// AWS KMS it is the DescribeKey that resolving an alias makes anyway).
    async fn identity_of(&self, key: &KeyRef) -> Result<Option<KeyIdentity>> {
        let known = lock(&self.identities)
            .get(&(false, key.as_str().to_owned()))
            .filter(|(_, at)| at.elapsed() < self.describe_ttl)
            .map(|(id, _)| id.clone());
        if let Some(known) = known {
            return Ok(known);
        }
        let Some(provider) = self.provider(key.scheme()) else {
            return Ok(None);
        };
        let identity = provider
            .identity(key)
            .await?
            .filter(|i| i.provider() == provider.id());
        self.remember_identity(false, key.as_str(), &identity);
        Ok(identity)
    }

    /// The identity of the key a header entry names
    /// ([`KeyProvider::entry_identity`]), reused for the describe TTL.
    async fn entry_identity_of(&self, entry: &WrappedKey) -> Result<Option<KeyIdentity>> {
        let text = format!("{}\x00{}", entry.provider, entry.key_ref);
        let known = lock(&self.identities)
            .get(&(true, text.clone()))
            .filter(|(_, at)| at.elapsed() < self.describe_ttl)
            .map(|(id, _)| id.clone());
        if let Some(known) = known {
            return Ok(known);
        }
        let Some(provider) = self.provider(&entry.provider) else {
            return Ok(None);
        };
        let identity = provider
            .entry_identity(entry)
            .await?
            .filter(|i| i.provider() == provider.id());
        self.remember_identity(true, &text, &identity);
        Ok(identity)
    }

    /// Drops cached data keys and descriptions of the key `key` names,
    /// whose identity is `identity` (`None`: unknown, so every key of its
    /// provider).
    fn flush_identity(&self, key: &KeyRef, identity: Option<&KeyIdentity>) {
        let target = FlushTarget {
            provider: key.scheme(),
            text: key.as_str(),
            identity,
        };
        if let Some(c) = &self.cache {
            c.flush_key(&target);
        }
        let described: Vec<String> = lock(&self.described).keys().cloned().collect();
        let stale: Vec<String> = described
            .into_iter()
            .filter(|text| {
                KeyTag {
                    provider: provider_of(text).to_owned(),
                    text: text.clone(),
                    identity: self.cached_identity(false, text),
                }
                .hit_by(&target)
            })
            .collect();
        let mut map = lock(&self.described);
        for text in stale {
            map.remove(&text);
        }
    }

    /// Resolves the identity of `key` (an unknown one, or a failure to
    /// resolve it, flushes every key of the provider) and flushes it: the
    /// first step of a lifecycle verb, once the policy allowed it.
    async fn flush_key_identity(&self, key: &KeyRef) {
        let identity = self.identity_of(key).await.ok().flatten();
        self.flush_identity(key, identity.as_ref());
    }

    /// Runs a lifecycle verb's provider call after flushing what is cached
    /// of its key, by identity (see [`flush_key_identity`](Self::flush_key_identity)).
    async fn flushed_first<T>(
        &self,
        key: &KeyRef,
        changes: bool,
        verb: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if changes {
            self.flush_key_identity(key).await;
        }
        verb.await
    }

    /// The key policy that applies to `key` (a recipient): the one set for
    /// this spelling, else the one set for another spelling of the same key
    /// by identity. Fails closed when an identity cannot be resolved: it
    /// is then unknown whether a policy applies.
    async fn policy_for_key(&self, key: &KeyRef) -> Result<Option<&KeyPolicy>> {
        if let Some(p) = self.key_policies.get(key.as_str()) {
            return Ok(Some(p));
        }
        if !self.has_policies_for(key.scheme()) {
            return Ok(None);
        }
        let identity = self.identity_of(key).await?;
        self.policy_by_identity(key.scheme(), identity).await
    }

    /// [`policy_for_key`](Self::policy_for_key) for a header entry.
    async fn policy_for_entry(&self, entry: &WrappedKey) -> Result<Option<&KeyPolicy>> {
        if let Some(p) = self.key_policies.get(&entry.key_ref) {
            return Ok(Some(p));
        }
        if !self.has_policies_for(&entry.provider) {
            return Ok(None);
        }
        let identity = self.entry_identity_of(entry).await?;
        self.policy_by_identity(&entry.provider, identity).await
    }

    fn has_policies_for(&self, provider: &str) -> bool {
        self.key_policies
            .keys()
            .any(|text| provider_of(text) == provider)
    }

    async fn policy_by_identity(
        &self,
        provider: &str,
        identity: Option<KeyIdentity>,
    ) -> Result<Option<&KeyPolicy>> {
        let Some(identity) = identity else {
            return Ok(None);
        };
        // In the order of their spellings, so that the answer does not
        // depend on hashing when two spellings of one key both have a
        // policy (set one per key).
        let mut candidates: Vec<(&String, &KeyPolicy)> = self
            .key_policies
            .iter()
            .filter(|(text, _)| provider_of(text) == provider)
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        for (text, policy) in candidates {
            let Ok(key) = KeyRef::parse(text) else {
                continue;
            };
            let theirs = self.identity_of(&key).await.map_err(|e| {
                Error::KeyLifecycle(format!(
                    "cannot tell whether the key policy set for {key} applies to {identity}: the identity of {key} could not be resolved, so nothing was done. Cause: {e}"
                ))
            })?;
            if theirs.as_ref() == Some(&identity) {
                return Ok(Some(policy));
            }
        }
        Ok(None)
    }

    /// The default recipients of new messages.
    pub fn recipients(&self) -> &[KeyRef] {
        &self.recipients
    }

    /// The provider with id `id`. Not public: a provider reached past the
    /// keyring would skip its actor check, approvals, policy, events and
    /// audit log (an application that needs a provider's own methods keeps
    /// its own `Arc` to it).
    pub(crate) fn provider(&self, id: &str) -> Option<&Arc<dyn KeyProvider>> {
        self.providers.iter().find(|p| p.id() == id)
    }

    /// True when any provider's futures may need a runtime
    /// ([`KeyProvider::needs_runtime`]).
    pub(crate) fn needs_runtime(&self) -> bool {
        self.providers.iter().any(|p| p.needs_runtime())
    }

    fn provider_for(&self, key: &KeyRef) -> Result<&Arc<dyn KeyProvider>> {
        self.provider(key.scheme()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no provider with id {:?} is configured for {key}",
                key.scheme()
            ))
        })
    }

    /// The keyed fingerprint of a context: the first 16 bytes of
    /// HMAC-SHA-256(fingerprint key, label || canonical pairs), in hex.
    /// Without the key, values cannot be guessed from it.
    pub fn context_fingerprint(&self, context: &EncryptionContext) -> String {
        hex(&self.fingerprint_bytes(context))
    }

    /// The fingerprint's 16 bytes. Also the context's identity in the
    /// data-key cache: keyed, so collisions cannot be searched for.
    fn fingerprint_bytes(&self, context: &EncryptionContext) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.fingerprint_key);
        ctx.update(FINGERPRINT_LABEL);
        ctx.update(&context.canonical_pairs());
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }

    /// Records an event; `Err` when the sink failed and the keyring fails
    /// closed.
    fn record(
        &self,
        call: &Call<'_>,
        version: Option<u32>,
        outcome: Outcome,
        duration: Duration,
    ) -> Result<()> {
        if !self.records_events {
            return Ok(());
        }
        let event = Event {
            timestamp: SystemTime::now(),
            operation: call.operation,
            provider: call.provider.to_owned(),
            key_ref: call.key_ref.map(str::to_owned),
            key_version: version.or(call.key_version),
            key_state: call.key_state,
            approvers: call.approvers.to_vec(),
            actor: call.caller.actor.clone(),
            purpose: call.caller.purpose.clone(),
            context_fingerprint: call.fingerprint.clone(),
            outcome,
            duration,
        };
        match self.sink.record(&event) {
            Ok(()) => Ok(()),
            Err(e) if self.fail_closed => Err(Error::Audit(e.0)),
            Err(_e) => {
                // Failing open: the operation goes on, but the loss is
                // counted (and logged with the `tracing` feature), never
                // silent.
                self.dropped_events
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                #[cfg(feature = "tracing")]
                tracing::warn!(target: "phi_envelope::audit", "event not recorded: {_e}");
                Ok(())
            }
        }
    }

    /// How many events the sink failed to record while the keyring was
    /// configured to fail open ([`KeyringBuilder::fail_closed`]`(false)`).
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many key uses (provider calls and cache hits) this keyring made
    /// for a caller without an actor (see [`Caller`]). Anything but zero in
    /// production means some code path does not say who it acts for: its
    /// events read `"actor":null`.
    pub fn calls_without_actor(&self) -> u64 {
        self.calls_without_actor.load(Ordering::Relaxed)
    }

    /// Counts a key use without an actor (and logs the first one).
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    fn note_caller(&self, operation: Operation, caller: &Caller) {
        if caller.has_actor() {
            return;
        }
        self.calls_without_actor.fetch_add(1, Ordering::Relaxed);
        if !self.warned_without_actor.swap(true, Ordering::Relaxed) {
            #[cfg(feature = "tracing")]
            tracing::warn!(
                target: "phi_envelope::audit",
                operation = operation.as_str(),
                "a key is used without an actor: events record no one; give the caller one (Envelope::as_caller, Caller::new). Logged once; Keyring::calls_without_actor counts them all"
            );
        }
    }

    /// Refuses a key-management verb for a caller without an actor, before
    /// the policy hook or any provider is asked; the refusal is an event
    /// (outcome `failed:no-actor`).
    fn require_actor(
        &self,
        operation: Operation,
        key: &KeyRef,
        version: Option<u32>,
        target: Option<KeyState>,
        caller: &Caller,
    ) -> Result<()> {
        if caller.has_actor() {
            return Ok(());
        }
        self.record(
            &Call {
                operation,
                provider: key.scheme(),
                key_ref: Some(key.as_str()),
                key_version: version,
                key_state: target,
                approvers: &[],
                caller,
                fingerprint: None,
            },
            None,
            Outcome::Failed("no-actor".into()),
            Duration::ZERO,
        )?;
        Err(Error::InvalidArgument(format!(
            "{operation} of {key} refused: key management needs an actor, who is doing it, for the audit trail; pass Caller::new(actor, purpose) (the backup CLI: --actor or PHI_ENVELOPE_ACTOR)"
        )))
    }

    /// Dual control: the approvers of a guarded verb, or its refusal
    /// (recorded, outcome `failed:approval`), before the policy hook or any
    /// provider is asked.
    fn check_approvals(
        &self,
        operation: Operation,
        key: &KeyRef,
        version: u32,
        target: KeyState,
        caller: &Caller,
        approvals: &[Approval],
    ) -> Result<Vec<String>> {
        let guarded = GuardedOperation::for_state(target);
        let Some(checker) = &self.approvals else {
            if approvals.is_empty() {
                return Ok(Vec::new());
            }
            return Err(Error::InvalidArgument(format!(
                "approvals were given for {guarded} of {key} version {version}, but this keyring has no dual control (no custodians are registered); nothing was done"
            )));
        };
        if !checker.guards(guarded) {
            return Ok(Vec::new());
        }
        match checker.check(guarded, key, version, approvals) {
            Ok(approvers) => Ok(approvers),
            Err(refusal) => {
                self.record(
                    &Call {
                        operation,
                        provider: key.scheme(),
                        key_ref: Some(key.as_str()),
                        key_version: Some(version),
                        key_state: Some(target),
                        approvers: &refusal.approvers,
                        caller,
                        fingerprint: None,
                    },
                    None,
                    Outcome::Failed("approval".into()),
                    Duration::ZERO,
                )?;
                Err(Error::Approval(refusal.message))
            }
        }
    }

    /// Asks the policy; a denial is recorded and returned as an error.
    fn authorize(&self, call: &Call<'_>) -> Result<()> {
        if !self.checks_policy {
            return Ok(());
        }
        let request = PolicyRequest {
            operation: call.operation,
            provider: call.provider.to_owned(),
            key_ref: call.key_ref.map(str::to_owned),
            key_version: call.key_version,
            actor: call.caller.actor.clone(),
            purpose: call.caller.purpose.clone(),
            context_fingerprint: call.fingerprint.clone(),
        };
        match self.policy.check(&request) {
            Decision::Allow => Ok(()),
            Decision::Deny(reason) => {
                self.record(call, None, Outcome::Denied, Duration::ZERO)?;
                Err(Error::PolicyDenied(reason))
            }
        }
    }

    /// The one path of every provider call: policy, the call, the event.
    async fn call<T, F>(
        &self,
        call: Call<'_>,
        fut: F,
        outcome_of: impl FnOnce(&T) -> (Outcome, Option<u32>),
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.note_caller(call.operation, call.caller);
        self.authorize(&call)?;
        self.provider_calls.fetch_add(1, Ordering::Relaxed);
        self.timed(call, fut, outcome_of).await
    }

    /// Policy, then `fut` timed and recorded as one event: the path of
    /// operations that are not themselves provider calls (a rewrap as a
    /// whole), which [`call`](Self::call) shares.
    async fn guarded<T, F>(
        &self,
        call: Call<'_>,
        fut: F,
        outcome_of: impl FnOnce(&T) -> (Outcome, Option<u32>),
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.note_caller(call.operation, call.caller);
        self.authorize(&call)?;
        self.timed(call, fut, outcome_of).await
    }

    async fn timed<T, F>(
        &self,
        call: Call<'_>,
        fut: F,
        outcome_of: impl FnOnce(&T) -> (Outcome, Option<u32>),
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        // If the caller drops this future mid-call (a timeout, a cancelled
        // task), the provider may still have done the work (a KMS call that
        // completed server-side, an HSM call on a blocking thread): the
        // guard records the access as cancelled.
        let mut guard = CancelGuard {
            keyring: self,
            call: &call,
            start,
            armed: true,
        };
        let result = fut.await;
        guard.armed = false;
        let elapsed = start.elapsed();
        match result {
            Ok(value) => {
                let (outcome, version) = outcome_of(&value);
                // On a sink failure `value` is dropped here: a DEK in it is
                // zeroized and never reaches the caller.
                self.record(&call, version, outcome, elapsed)?;
                Ok(value)
            }
            Err(e) => {
                self.record(&call, None, Outcome::Failed(error_kind(&e).into()), elapsed)?;
                Err(e)
            }
        }
    }

    /// A cache hit: the policy is asked exactly as for a provider call, and
    /// an event is recorded.
    fn record_cache_hit(
        &self,
        operation: Operation,
        key_ref: &str,
        version: u32,
        caller: &Caller,
        fingerprint: &[u8; 16],
    ) -> Result<()> {
        self.note_caller(operation, caller);
        if !self.records_events && !self.checks_policy {
            return Ok(());
        }
        let call = Call {
            operation,
            provider: provider_of(key_ref),
            key_ref: Some(key_ref),
            key_version: Some(version),
            key_state: None,
            approvers: &[],
            caller,
            fingerprint: Some(hex(fingerprint)),
        };
        self.authorize(&call)?;
        self.record(&call, None, Outcome::Success, Duration::ZERO)
    }

    /// A refusal by a [`KeyPolicy`]: recorded, returned as
    /// [`Error::KeyLifecycle`]. No provider is called.
    fn lifecycle_refusal(&self, call: &Call<'_>, message: String) -> Error {
        match self.record(
            call,
            None,
            Outcome::Failed("key-lifecycle".into()),
            Duration::ZERO,
        ) {
            Ok(()) => Error::KeyLifecycle(message),
            Err(audit) => audit,
        }
    }

    // -----------------------------------------------------------------------
    // Encryption
    // -----------------------------------------------------------------------

    /// A fresh DEK wrapped to every key in `recipients` (the first generates
    /// it, the others wrap it), ready to seal. Cryptoperiods are checked
    /// first (refused or rotated, as configured).
    pub(crate) async fn new_sealing_key(
        &self,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<SealingKey> {
        Ok(self.fresh_sealing_key(recipients, context, caller).await?.0)
    }

    /// [`new_sealing_key`](Self::new_sealing_key), and the earliest end of
    /// the recipients' cryptoperiods (for the cache).
    async fn fresh_sealing_key(
        &self,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(SealingKey, Option<SystemTime>)> {
        let (first, rest) = recipients.split_first().ok_or_else(|| {
            Error::InvalidArgument("no recipients: add a key to encrypt to".into())
        })?;
        if recipients.len() > MAX_RECIPIENTS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_RECIPIENTS} recipients"
            )));
        }
        let fingerprint = self.context_fingerprint(context);
        let deadline = self
            .check_cryptoperiods(recipients, caller, &fingerprint)
            .await?;
        let provider = self.provider_for(first)?;
        let generated = self
            .call(
                Call {
                    operation: Operation::Generate,
                    provider: provider.id(),
                    key_ref: Some(first.as_str()),
                    key_version: None,
                    key_state: None,
                    approvers: &[],
                    caller,
                    fingerprint: Some(fingerprint.clone()),
                },
                provider.generate(first, context),
                |g| (Outcome::Success, Some(g.wrapped.key_version)),
            )
            .await?;
        let dek = generated.dek;
        let mut entries = vec![generated.wrapped];
        for key in rest {
            entries.push(
                self.wrap_one(key, &dek, context, caller, &fingerprint)
                    .await?,
            );
        }
        Ok((SealingKey::new(&dek, entries)?, deadline))
    }

    /// The sealing key for one record of `len` bytes: from the data-key
    /// cache when one is configured and an entry of the same partition is
    /// within its limits (policy asked, event recorded), otherwise fresh (and
    /// then cached). Concurrent misses of one partition make one provider
    /// call.
    pub(crate) async fn record_sealing_key(
        &self,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
        partition: Option<&str>,
        len: u64,
    ) -> Result<KeyUse<SealingKey>> {
        let cache = match &self.cache {
            Some(c) if c.encrypt_enabled() && !recipients.is_empty() => c,
            _ => {
                return Ok(KeyUse::Fresh(
                    self.new_sealing_key(recipients, context, caller).await?,
                ))
            }
        };
        let fingerprint = self.fingerprint_bytes(context);
        let id = cache.seal_id(recipients, caller.actor.as_deref(), partition, &fingerprint);
        let hit = |key: Arc<crate::cache::CachedKey<SealingKey>>| -> Result<KeyUse<SealingKey>> {
            let version = key.header().recipients()[0].key_version;
            self.record_cache_hit(
                Operation::CacheHitEncrypt,
                recipients[0].as_str(),
                version,
                caller,
                &fingerprint,
            )?;
            Ok(KeyUse::Cached(key))
        };
        loop {
            if let Some(key) = cache.take_sealing(&id, len) {
                return hit(key);
            }
            match self.flights.join(&id) {
                Join::Leader(_flight) => {
                    // Another leader may have finished just before we joined.
                    if let Some(key) = cache.take_sealing(&id, len) {
                        return hit(key);
                    }
                    let epoch = cache.epoch();
                    let (key, deadline) =
                        self.fresh_sealing_key(recipients, context, caller).await?;
                    let keys = self.seal_tags(recipients, key.header()).await;
                    return Ok(cache.put_sealing(id, key, deadline, keys, len, epoch));
                }
                Join::Waiter(wait) => wait.await,
            }
        }
    }

    /// What a sealing-cache entry involves: each recipient and the header
    /// entry it wrote, with the identity of that entry's key (unknown where
    /// the provider reports none).
    async fn seal_tags(&self, recipients: &[KeyRef], header: &Header) -> Vec<KeyTag> {
        let mut tags = Vec::with_capacity(recipients.len() * 2);
        for (recipient, entry) in recipients.iter().zip(header.recipients()) {
            let identity = self.entry_identity_of(entry).await.ok().flatten();
            tags.push(KeyTag {
                provider: recipient.scheme().to_owned(),
                text: recipient.as_str().to_owned(),
                identity: identity.clone(),
            });
            tags.push(KeyTag {
                provider: entry.provider.clone(),
                text: entry.key_ref.clone(),
                identity,
            });
        }
        tags
    }

    /// What an opening-cache entry involves: every header entry; the
    /// identity of the one that unwrapped (`used`) where its provider
    /// reports it, the others unknown (so that no other entry of a header,
    /// which anyone may have written, costs a lookup; a verb on any key of
    /// their provider flushes the entry).
    async fn open_tags(&self, header: &Header, used: usize) -> Vec<KeyTag> {
        let mut tags = Vec::with_capacity(header.recipients().len());
        for (i, entry) in header.recipients().iter().enumerate() {
            let identity = if i == used {
                self.entry_identity_of(entry).await.ok().flatten()
            } else {
                None
            };
            tags.push(KeyTag {
                provider: entry.provider.clone(),
                text: entry.key_ref.clone(),
                identity,
            });
        }
        tags
    }

    /// Checks the cryptoperiod of every recipient that has one: refuses or
    /// rotates first, as configured. Returns the earliest end of the
    /// recipients' cryptoperiods. Describes a key only when a cryptoperiod
    /// is configured for it, and reuses the answer for the describe TTL.
    async fn check_cryptoperiods(
        &self,
        recipients: &[KeyRef],
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Option<SystemTime>> {
        let mut earliest: Option<SystemTime> = None;
        for key in recipients {
            let Some(policy) = self.policy_for_key(key).await? else {
                continue;
            };
            let Some(period) = policy.cryptoperiod else {
                continue;
            };
            if let Some(end) = self
                .primary_period_end(key, policy, period, caller, fingerprint)
                .await?
            {
                earliest = Some(earliest.map_or(end, |e| e.min(end)));
            }
        }
        Ok(earliest)
    }

    async fn primary_period_end(
        &self,
        key: &KeyRef,
        policy: &KeyPolicy,
        period: Duration,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Option<SystemTime>> {
        // The primary that this call rotated away from.
        let mut rotated_from: Option<PrimaryId> = None;
        loop {
            let info = self.described(key, caller).await?;
            // No primary: the provider refuses the wrap itself, clearly.
            let Some(primary) = info.primary() else {
                return Ok(None);
            };
            let refusal = |message: String| {
                self.lifecycle_refusal(
                    &Call {
                        operation: Operation::Generate,
                        provider: key.scheme(),
                        key_ref: Some(key.as_str()),
                        key_version: Some(primary.version),
                        key_state: None,
                        approvers: &[],
                        caller,
                        fingerprint: Some(fingerprint.to_owned()),
                    },
                    message,
                )
            };
            let Some(created) = primary.created_at else {
                return Err(refusal(format!(
                    "a cryptoperiod is set for {key}, but its provider does not report when version {} was created, so the period cannot be enforced; remove the cryptoperiod for this key or use a provider that reports creation times",
                    primary.version
                )));
            };
            // A period too long to represent never ends.
            let Some(end) = created.checked_add(period) else {
                return Ok(None);
            };
            let now = SystemTime::now();
            if now < end {
                return Ok(Some(end));
            }
            let age = now.duration_since(created).unwrap_or_default();
            let current = (primary.version, primary.created_at);
            if rotated_from == Some(current) || self.was_rotated_away(key, current) {
                // AWS KMS, for one, rotates key material inside one version
                // and keeps reporting the key's creation time.
                return Err(refusal(format!(
                    "{key} was rotated, but its provider still reports the same primary version {} created {}s ago, past the cryptoperiod of {}s: it rotates key material inside one version (AWS KMS does), so the keyring cannot tell the new material's age; rely on the provider's own rotation schedule (e.g. KMS automatic key rotation) and remove the cryptoperiod from this key's policy",
                    primary.version,
                    age.as_secs(),
                    period.as_secs()
                )));
            }
            if rotated_from.is_some() {
                // Just rotated to this version: use it for this message even
                // if the period is shorter than the time since; `now` keeps
                // it out of the cache.
                return Ok(Some(now));
            }
            let age = now.duration_since(created).unwrap_or_default();
            match policy.on_expired {
                OnExpired::Refuse => {
                    return Err(refusal(format!(
                        "the primary version {} of {key} is {}s old, past its cryptoperiod of {}s; rotate the key (backup keys rotate {key}) and encrypt again",
                        primary.version,
                        age.as_secs(),
                        period.as_secs()
                    )));
                }
                OnExpired::RotateFirst => {
                    let expired = (primary.version, primary.created_at);
                    if let Err(e) = self.rotate_once(key, expired, caller).await {
                        return Err(Error::KeyLifecycle(format!(
                            "the primary version {} of {key} is past its cryptoperiod of {}s and rotating it first failed, so nothing was encrypted; version {} stays primary and existing messages still open. Cause: {e}",
                            primary.version,
                            period.as_secs(),
                            primary.version
                        )));
                    }
                    rotated_from = Some(expired);
                }
            }
        }
    }

    /// Rotates `key` once for every task that found its primary `expired`
    /// at the same time: one task rotates, the others wait for it; if it
    /// fails, the next one tries.
    async fn rotate_once(&self, key: &KeyRef, expired: PrimaryId, caller: &Caller) -> Result<()> {
        let mut id = b"rotate\x00".to_vec();
        id.extend_from_slice(key.as_str().as_bytes());
        loop {
            let done = |info: &KeyInfo| {
                self.was_rotated_away(key, expired)
                    || info
                        .primary()
                        .is_none_or(|p| (p.version, p.created_at) != expired)
            };
            match self.flights.join(&id) {
                Join::Leader(_flight) => {
                    if done(&*self.described(key, caller).await?) {
                        return Ok(());
                    }
                    self.rotate_unchecked(key, caller).await?;
                    return Ok(());
                }
                Join::Waiter(wait) => {
                    wait.await;
                    if done(&*self.described(key, caller).await?) {
                        return Ok(());
                    }
                    // The leader failed: try ourselves.
                }
            }
        }
    }

    /// Whether a rotation through this keyring already moved `key` away
    /// from the primary `id`.
    fn was_rotated_away(&self, key: &KeyRef, id: PrimaryId) -> bool {
        let slots = self.rotation_slots(key);
        let away = lock(&self.rotated_away);
        slots.iter().any(|slot| away.get(slot) == Some(&id))
    }

    /// Where a rotation of `key` is remembered: its spelling, and its
    /// identity where known, so that a rotation through one spelling counts
    /// for the others.
    fn rotation_slots(&self, key: &KeyRef) -> Vec<String> {
        let mut slots = vec![key.as_str().to_owned()];
        if let Some(identity) = self.cached_identity(false, key.as_str()) {
            slots.push(format!("{}\x00{}", identity.provider(), identity.as_str()));
        }
        slots
    }

    /// `describe(key)`, reused for the describe TTL; one call however many
    /// tasks ask at once.
    async fn described(&self, key: &KeyRef, caller: &Caller) -> Result<Arc<KeyInfo>> {
        let fresh = || -> Option<Arc<KeyInfo>> {
            let map = lock(&self.described);
            map.get(key.as_str())
                .filter(|(_, at)| at.elapsed() < self.describe_ttl)
                .map(|(info, _)| info.clone())
        };
        let mut id = b"describe\x00".to_vec();
        id.extend_from_slice(key.as_str().as_bytes());
        loop {
            if let Some(info) = fresh() {
                return Ok(info);
            }
            match self.flights.join(&id) {
                Join::Leader(_flight) => {
                    if let Some(info) = fresh() {
                        return Ok(info);
                    }
                    let info = self.describe(key, caller).await?;
                    return Ok(Arc::new(info));
                }
                Join::Waiter(wait) => wait.await,
            }
        }
    }

    fn remember(&self, key: &KeyRef, info: &KeyInfo) {
        lock(&self.described).insert(
            key.as_str().to_owned(),
            (Arc::new(info.clone()), Instant::now()),
        );
    }

    async fn wrap_one(
        &self,
        key: &KeyRef,
        dek: &Dek,
        context: &EncryptionContext,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<WrappedKey> {
        let provider = self.provider_for(key)?;
        self.call(
            Call {
                operation: Operation::Wrap,
                provider: provider.id(),
                key_ref: Some(key.as_str()),
                key_version: None,
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.to_owned()),
            },
            provider.wrap(key, dek, context),
            |w| (Outcome::Success, Some(w.key_version)),
        )
        .await
    }

    async fn rewrap_one(
        &self,
        entry: &WrappedKey,
        key: &KeyRef,
        context: &EncryptionContext,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Option<WrappedKey>> {
        let provider = self.provider_for(key)?;
        self.call(
            Call {
                operation: Operation::Wrap,
                provider: provider.id(),
                key_ref: Some(key.as_str()),
                key_version: None,
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.to_owned()),
            },
            provider.rewrap(entry, key, context),
            |w| (Outcome::Success, w.as_ref().map(|w| w.key_version)),
        )
        .await
    }

    // -----------------------------------------------------------------------
    // Decryption
    // -----------------------------------------------------------------------

    /// The minimum decryption version that refuses `entry`, if any (the
    /// policy of its key by identity, whatever spelling it was set for).
    async fn refused_version(&self, entry: &WrappedKey) -> Result<Option<u32>> {
        Ok(self
            .policy_for_entry(entry)
            .await?
            .and_then(|p| p.min_decrypt_version)
            .filter(|min| entry.key_version < *min))
    }

    /// Unwraps the DEK of `header` with the first entry that a configured
    /// provider can unwrap and whose DEK verifies the header tag.
    ///
    /// Entries are tried in order (at most [`MAX_RECIPIENTS`]). An entry
    /// below its key's [minimum decryption
    /// version](KeyPolicy::min_decrypt_version) is refused before any
    /// provider call (an event records it). If no entry succeeds: an
    /// operational failure (provider down, key destroyed, policy denial, a
    /// lifecycle refusal) is returned as is, so the operator can act;
    /// otherwise a rejected entry gives the opaque [`Error::Decrypt`]
    /// without saying which entry or why; and a message for which no
    /// provider holds a key gives [`Error::NoMatchingKey`].
    pub(crate) async fn unwrap_header(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(Dek, OpeningKey)> {
        let (dek, key, _) = self.unwrap_header_entry(header, context, caller).await?;
        Ok((dek, key))
    }

    /// [`unwrap_header`](Self::unwrap_header), and the index of the entry
    /// that worked.
    async fn unwrap_header_entry(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(Dek, OpeningKey, usize)> {
        let fingerprint = self.context_fingerprint(context);
        let mut operational: Option<Error> = None;
        let mut rejected = false;
        for (index, entry) in header.recipients().iter().enumerate().take(MAX_RECIPIENTS) {
            let Some(provider) = self.provider(&entry.provider) else {
                continue;
            };
            let call = Call {
                operation: Operation::Unwrap,
                provider: provider.id(),
                key_ref: Some(&entry.key_ref),
                key_version: Some(entry.key_version),
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.clone()),
            };
            let refused = match self.refused_version(entry).await {
                Ok(refused) => refused,
                Err(e) => {
                    operational.get_or_insert(e);
                    continue;
                }
            };
            if let Some(min) = refused {
                let e = self.lifecycle_refusal(
                    &call,
                    format!(
                        "the message is wrapped under {} version {}, below the minimum decryption version {min} set for this key; it was not rewrapped after a rotation (or is a copy kept from before one)",
                        entry.key_ref, entry.key_version
                    ),
                );
                if matches!(e, Error::Audit(_)) {
                    return Err(e);
                }
                operational.get_or_insert(e);
                continue;
            }
            let result = self
                .call(
                    call,
                    verified_unwrap(&**provider, entry, header, context),
                    |u| u.outcome(),
                )
                .await;
            match result {
                Ok(Verified::Key(found)) => {
                    let (dek, key) = *found;
                    return Ok((dek, key, index));
                }
                Ok(Verified::Rejected) => rejected = true,
                Ok(Verified::NotMine) => {}
                Err(e @ Error::Audit(_)) => return Err(e),
                Err(e) => {
                    operational.get_or_insert(e);
                }
            }
        }
        if let Some(e) = operational {
            return Err(e);
        }
        if rejected {
            return Err(Error::Decrypt);
        }
        let refs: Vec<String> = header
            .recipients()
            .iter()
            .map(|r| format!("{} v{}", r.key_ref, r.key_version))
            .collect();
        Err(Error::NoMatchingKey(refs.join(", ")))
    }

    /// The opening key for one record whose body is `len` bytes: from the
    /// decryption cache when one is configured and holds a key made for
    /// these exact header bytes and this context (policy asked, event
    /// recorded), otherwise unwrapped (and then cached).
    pub(crate) async fn record_opening_key(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
        len: u64,
    ) -> Result<KeyUse<OpeningKey>> {
        let cache = match &self.cache {
            Some(c) if c.decrypt_enabled() => c,
            _ => {
                let (_, key) = self.unwrap_header(header, context, caller).await?;
                return Ok(KeyUse::Fresh(key));
            }
        };
        let fingerprint = self.fingerprint_bytes(context);
        let id = cache.open_id(header.as_bytes(), &fingerprint);
        let hit =
            |(key, (key_ref, version)): crate::cache::OpeningHit| -> Result<KeyUse<OpeningKey>> {
                self.record_cache_hit(
                    Operation::CacheHitDecrypt,
                    &key_ref,
                    version,
                    caller,
                    &fingerprint,
                )?;
                Ok(KeyUse::Cached(key))
            };
        loop {
            if let Some(found) = cache.take_opening(&id, len) {
                return hit(found);
            }
            match self.flights.join(&id) {
                Join::Leader(_flight) => {
                    if let Some(found) = cache.take_opening(&id, len) {
                        return hit(found);
                    }
                    let epoch = cache.epoch();
                    let (dek, key, index) =
                        self.unwrap_header_entry(header, context, caller).await?;
                    drop(dek);
                    let used = &header.recipients()[index];
                    let keys = self.open_tags(header, index).await;
                    return Ok(cache.put_opening(
                        id,
                        key,
                        (used.key_ref.clone(), used.key_version),
                        keys,
                        len,
                        epoch,
                    ));
                }
                Join::Waiter(wait) => wait.await,
            }
        }
    }

    /// Unwraps every entry of `header` that a configured provider can
    /// answer for and checks that each gives the DEK that verifies the
    /// header tag; returns the opening key. Used to verify a rewrapped
    /// header before it replaces the old one: a recipient that could not
    /// open it (e.g. a disaster-recovery key) is found now, not in a
    /// disaster. An entry whose provider cannot unwrap it here by design
    /// ([`KeyProvider::can_unwrap`]: an offline recovery key) is skipped.
    /// Fails if no entry could be checked.
    pub(crate) async fn verify_header(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<OpeningKey> {
        let fingerprint = self.context_fingerprint(context);
        let mut opening = None;
        for entry in header.recipients() {
            let Some(provider) = self.provider(&entry.provider) else {
                continue;
            };
            if !provider.can_unwrap(entry) {
                // An offline recovery key: it cannot be checked here.
                continue;
            }
            let unwrapped = self
                .call(
                    Call {
                        operation: Operation::Unwrap,
                        provider: provider.id(),
                        key_ref: Some(&entry.key_ref),
                        key_version: Some(entry.key_version),
                        key_state: None,
                        approvers: &[],
                        caller,
                        fingerprint: Some(fingerprint.clone()),
                    },
                    verified_unwrap(&**provider, entry, header, context),
                    |u| u.outcome(),
                )
                .await?;
            match unwrapped {
                Verified::Key(found) => {
                    opening.get_or_insert(found.1);
                }
                Verified::Rejected => return Err(Error::Decrypt),
                Verified::NotMine => {
                    return Err(Error::NoMatchingKey(format!(
                        "{} v{} (its provider does not hold it)",
                        entry.key_ref, entry.key_version
                    )))
                }
            }
        }
        opening.ok_or_else(|| {
            Error::NoMatchingKey(
                header
                    .recipients()
                    .iter()
                    .map(|r| format!("{} v{}", r.key_ref, r.key_version))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
    }

    // -----------------------------------------------------------------------
    // Rewrap
    // -----------------------------------------------------------------------

    /// Re-wraps the DEK of `header` to `recipients` and re-tags it; the body
    /// is untouched. The context is required: providers bind it. Only the
    /// entry whose DEK verified the header tag is re-encrypted by a provider;
    /// the new header is checked (`check_rewrapped`) before it is returned.
    pub(crate) async fn rewrap_header(
        &self,
        header: &Header,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<Header> {
        if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
            return Err(Error::InvalidArgument(format!(
                "rewrap needs 1..={MAX_RECIPIENTS} recipients"
            )));
        }
        let fingerprint = self.context_fingerprint(context);
        let first = &recipients[0];
        // The rewrap as a whole is asked of the policy (before any provider
        // call) and recorded, failed or not; its unwrap and wraps are asked
        // and recorded as well.
        self.guarded(
            Call {
                operation: Operation::Rewrap,
                provider: first.scheme(),
                key_ref: Some(first.as_str()),
                key_version: None,
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.clone()),
            },
            self.rewrap_header_inner(header, recipients, context, caller, &fingerprint),
            |h| {
                (
                    Outcome::Success,
                    h.recipients().first().map(|r| r.key_version),
                )
            },
        )
        .await
    }

    async fn rewrap_header_inner(
        &self,
        header: &Header,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Header> {
        // A refused cryptoperiod costs no unwrap.
        self.check_cryptoperiods(recipients, caller, fingerprint)
            .await?;
        let (dek, _, index) = self.unwrap_header_entry(header, context, caller).await?;
        // The one entry known to hold this message's DEK: the one whose DEK
        // verified the header tag. Another entry of the same provider may
        // hold anything (a crafted message can carry a valid wrapped key
        // that is not this message's), so no other entry is ever handed to
        // a provider's re-encryption.
        let verified = &header.recipients()[index];
        let mut entries = Vec::with_capacity(recipients.len());
        for key in recipients {
            let provider = self.provider_for(key)?;
            // Where the provider can re-encrypt the entry itself (AWS KMS
            // ReEncrypt), the plaintext DEK is not sent to it again.
            let reencrypted = if verified.provider == key.scheme() && provider.supports_rewrap() {
                self.rewrap_one(verified, key, context, caller, fingerprint)
                    .await?
            } else {
                None
            };
            let entry = match reencrypted {
                Some(e) => e,
                None => {
                    self.wrap_one(key, &dek, context, caller, fingerprint)
                        .await?
                }
            };
            if entry.provider != key.scheme() {
                return Err(ProviderError::new(
                    provider.id(),
                    crate::provider::ProviderErrorKind::Other,
                    format!(
                        "asked to wrap to {key}, the provider returned an entry of provider {:?}; nothing was rewrapped",
                        entry.provider
                    ),
                )
                .into());
            }
            entries.push(entry);
        }
        let new = crate::message::rewrap_header(header, &dek, entries)?;
        check_rewrapped(&new, &dek, recipients)?;
        Ok(new)
    }

    /// A rewrap that reused the new header of an identical one in the same
    /// batch (same header bytes, same context): no provider call, but the
    /// policy is asked and an event recorded, as for a cache hit.
    pub(crate) fn record_rewrap_reuse(
        &self,
        new_header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<()> {
        let first = &new_header.recipients()[0];
        let call = Call {
            operation: Operation::Rewrap,
            provider: provider_of(&first.key_ref),
            key_ref: Some(&first.key_ref),
            key_version: Some(first.key_version),
            key_state: None,
            approvers: &[],
            caller,
            fingerprint: Some(self.context_fingerprint(context)),
        };
        self.note_caller(call.operation, caller);
        self.authorize(&call)?;
        self.record(&call, None, Outcome::Success, Duration::ZERO)
    }

    /// The primary version of every key in `keys`, from the (TTL-cached)
    /// descriptions; `None` if one is unknown.
    pub(crate) async fn primary_versions(
        &self,
        keys: &[KeyRef],
        caller: &Caller,
    ) -> Option<Vec<u32>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.described(key, caller).await.ok()?.primary_version?);
        }
        Some(out)
    }

    /// True when `header` is wrapped, in order, to exactly `recipients` at
    /// the versions `primaries` gives them. An entry matches its recipient
    /// when it names the same key by the same text, or when both name one
    /// key by identity ([`KeyProvider::identity`]: an AWS KMS alias
    /// recipient and the key ARN its headers record); unknown identities
    /// do not match. Not a key access: no event, no policy request.
    pub(crate) async fn header_is_current(
        &self,
        header: &Header,
        recipients: &[KeyRef],
        primaries: &[u32],
    ) -> bool {
        let entries = header.recipients();
        if entries.len() != recipients.len() || primaries.len() != recipients.len() {
            return false;
        }
        for ((entry, key), &version) in entries.iter().zip(recipients).zip(primaries) {
            if entry.provider != key.scheme() || entry.key_version != version {
                return false;
            }
            if entry.key_ref == key.as_str() {
                continue;
            }
            let (Ok(Some(ours)), Ok(Some(theirs))) = (
                self.identity_of(key).await,
                self.entry_identity_of(entry).await,
            ) else {
                return false;
            };
            if ours != theirs {
                return false;
            }
        }
        true
    }

    // -----------------------------------------------------------------------
    // Lifecycle verbs
    // -----------------------------------------------------------------------

    /// One lifecycle verb through [`call`](Self::call). `change.target`
    /// is the state the verb moves the version to (recorded in its event
    /// whatever the outcome); the public verbs check the actor first
    /// ([`require_actor`](Self::require_actor)), and dual control for the
    /// verbs it guards.
    async fn manage<'a>(
        &'a self,
        operation: Operation,
        key: &'a KeyRef,
        change: Change<'a>,
        caller: &'a Caller,
        fut: impl FnOnce(&'a Arc<dyn KeyProvider>) -> crate::provider::BoxFuture<'a, Result<KeyInfo>>,
    ) -> Result<KeyInfo> {
        let Change {
            version,
            target,
            approvers,
        } = change;
        let provider = self.provider_for(key)?;
        let changes = operation != Operation::Describe;
        // The primary a rotation moves away from, as last described.
        let rotated_away = if operation == Operation::Rotate {
            lock(&self.described)
                .get(key.as_str())
                .and_then(|(info, _)| info.primary().map(|p| (p.version, p.created_at)))
        } else {
            None
        };
        let result = self
            .call(
                Call {
                    operation,
                    provider: provider.id(),
                    key_ref: Some(key.as_str()),
                    key_version: version,
                    key_state: target,
                    approvers,
                    caller,
                    fingerprint: None,
                },
                // Once the policy allowed the verb: what is cached of the
                // key (by identity, any spelling) is flushed, and keys
                // fetched by calls under way are not cached after this.
                self.flushed_first(key, changes, fut(provider)),
                |info| (Outcome::Success, version.or(info.primary_version)),
            )
            .await;
        if changes {
            // Whatever the outcome: nothing cached survives a state change.
            self.flush_cache_for(key);
        }
        if let Ok(info) = &result {
            self.remember(key, info);
            let slots = self.rotation_slots(key);
            let mut away = lock(&self.rotated_away);
            match rotated_away {
                Some(old) => {
                    for slot in slots {
                        away.insert(slot, old);
                    }
                }
                // A state change (e.g. a rollback that re-enables the old
                // primary) means the operator took over.
                None if changes => {
                    for slot in &slots {
                        away.remove(slot);
                    }
                }
                None => {}
            }
        }
        result
    }

    /// Describes `key`: its versions, their states and creation times, the
    /// primary version.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::KeyState;
    /// # use phi_envelope::{Caller, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).build()?;
    /// let key: KeyRef = "local:records".parse()?;
    /// let operator = Caller::new("alice", "key-inventory");
    /// keyring.create_key(&key, &operator).await?;
    /// let info = keyring.describe(&key, &operator).await?;
    /// assert_eq!(info.primary_version, Some(1));
    /// assert_eq!(info.version(1).unwrap().state, KeyState::Enabled);
    /// assert!(info.version(1).unwrap().created_at.is_some());
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn describe(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(Operation::Describe, key, Change::NONE, caller, |p| {
            p.describe(key)
        })
        .await
    }

    /// Creates `key` with version 1 enabled and primary.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::{Caller, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).build()?;
    /// let key: KeyRef = "local:backups".parse()?;
    /// let info = keyring.create_key(&key, &Caller::new("alice", "setup")).await?;
    /// assert_eq!(info.primary_version, Some(1));
    /// // Creating it again is refused: rotate it instead.
    /// assert!(keyring.create_key(&key, &Caller::new("alice", "setup")).await.is_err());
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn create_key(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        let target = Some(KeyState::Enabled);
        self.require_actor(Operation::CreateKey, key, None, target, caller)?;
        let change = Change {
            target,
            ..Change::NONE
        };
        self.manage(Operation::CreateKey, key, change, caller, |p| {
            p.create_key(key)
        })
        .await
    }

    /// Rotates `key`: a new primary version; the old one becomes
    /// decrypt-only, so everything already written still opens. A failed
    /// rotation leaves the old primary working. Cached data keys of `key`
    /// are flushed either way, so the next record is sealed under the new
    /// primary.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::KeyState;
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?;
    /// let envelope = Envelope::new(keyring);
    /// let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
    /// let before = envelope.seal(b"v1 record", &ctx).await?;
    ///
    /// let info = envelope.keyring().rotate(&key, &Caller::new("alice", "scheduled")).await?;
    /// assert_eq!(info.primary_version, Some(2));
    /// assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    ///
    /// let after = envelope.seal(b"v2 record", &ctx).await?;
    /// let inspect = |m: &[u8]| phi_envelope::envelope::inspect(m).unwrap().header.recipients()[0].key_version;
    /// assert_eq!((inspect(&before), inspect(&after)), (1, 2));
    /// assert_eq!(envelope.open(&before, &ctx).await?, b"v1 record");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn rotate(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.require_actor(
            Operation::Rotate,
            key,
            None,
            Some(KeyState::Enabled),
            caller,
        )?;
        self.rotate_unchecked(key, caller).await
    }

    /// [`rotate`](Self::rotate) without the actor check: the rotation that
    /// a [`OnExpired::RotateFirst`] policy makes on behalf of a key use,
    /// which follows the rule of key use (warned, counted, not refused).
    async fn rotate_unchecked(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(
            Operation::Rotate,
            key,
            Change {
                target: Some(KeyState::Enabled),
                ..Change::NONE
            },
            caller,
            |p| p.rotate(key),
        )
        .await
    }

    /// Moves `version` of `key` to `state`: decrypt-only, disabled, or
    /// (where the provider allows) back to enabled, which makes it the
    /// primary. [`KeyState::Destroyed`] is refused: use
    /// [`destroy`](Self::destroy), which erases the key. The provider checks
    /// the state machine (`docs/KEY-LIFECYCLE.md`) and refuses a transition
    /// it does not allow with [`ProviderErrorKind::InvalidState`] or
    /// [`ProviderErrorKind::KeyDestroyed`]. Cached data keys of `key` are
    /// flushed.
    /// Under [dual control](crate::approval) the changes it guards are
    /// refused without approvals: use
    /// [`set_state_approved`](Self::set_state_approved).
    ///
    /// [`ProviderErrorKind::InvalidState`]: crate::provider::ProviderErrorKind::InvalidState
    /// [`ProviderErrorKind::KeyDestroyed`]: crate::provider::ProviderErrorKind::KeyDestroyed
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::{Caller, KeyRef, Keyring};
    /// use phi_envelope::provider::KeyState;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).build()?;
    /// let operator = Caller::new("alice", "rollback");
    /// keyring.rotate(&key, &operator).await?; // v2 primary, v1 decrypt-only
    /// // Roll the rotation back: v1 primary again, v2 decrypt-only.
    /// let info = keyring.set_state(&key, 1, KeyState::Enabled, &operator).await?;
    /// assert_eq!(info.primary_version, Some(1));
    /// assert_eq!(info.version(2).unwrap().state, KeyState::DecryptOnly);
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn set_state(
        &self,
        key: &KeyRef,
        version: u32,
        state: KeyState,
        caller: &Caller,
    ) -> Result<KeyInfo> {
        self.set_state_approved(key, version, state, caller, &[])
            .await
    }

    /// [`set_state`](Self::set_state) with the custodians' approvals of a
    /// keyring under [dual control](crate::approval)
    /// ([`KeyringBuilder::dual_control`]): moving a version to disabled,
    /// enabled or decrypt-only is refused with [`Error::Approval`] (and an
    /// event, outcome `failed:approval`) unless `approvals` hold valid ones
    /// of that exact change (operation `disable`, `enable` or
    /// `decrypt-only`, this `key` spelled as here, this `version`) from the
    /// threshold of distinct registered custodians. Checked after the actor
    /// and before the policy hook or any provider call; the approvals are
    /// spent once accepted, whatever the provider answers. A verb the dual
    /// control does not guard ignores `approvals`; a keyring without dual
    /// control refuses any.
    pub async fn set_state_approved(
        &self,
        key: &KeyRef,
        version: u32,
        state: KeyState,
        caller: &Caller,
        approvals: &[Approval],
    ) -> Result<KeyInfo> {
        if state == KeyState::Destroyed {
            return Err(Error::KeyLifecycle(format!(
                "set_state cannot destroy {key} version {version}: use destroy, which erases the key material (backup keys destroy {key} --version {version})"
            )));
        }
        self.require_actor(Operation::SetState, key, Some(version), Some(state), caller)?;
        let approvers =
            self.check_approvals(Operation::SetState, key, version, state, caller, approvals)?;
        self.manage(
            Operation::SetState,
            key,
            Change {
                version: Some(version),
                target: Some(state),
                approvers: &approvers,
            },
            caller,
            |p| p.set_state(key, version, state),
        )
        .await
    }

    /// Disables `version` of `key`: nothing can be unwrapped under it until
    /// it is enabled or set decrypt-only again (reversible, unlike
    /// [`destroy`](Self::destroy)). The step before destroying a version:
    /// disable it, watch for failures (events with outcome
    /// `failed:key-disabled`) for as long as your retention rules ask, then
    /// destroy it.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::{KeyState, ProviderErrorKind};
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, Error, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?;
    /// # let envelope = Envelope::new(keyring);
    /// # let ctx = EncryptionContext::new();
    /// let old = envelope.seal(b"under v1", &ctx).await?;
    /// let operator = Caller::new("alice", "retire-v1");
    /// envelope.keyring().rotate(&key, &operator).await?;
    /// envelope.keyring().disable(&key, 1, &operator).await?;
    /// match envelope.open(&old, &ctx).await {
    ///     Err(Error::Provider(e)) => assert_eq!(e.kind(), ProviderErrorKind::KeyDisabled),
    ///     other => panic!("{other:?}"),
    /// }
    /// // Reversible: set it decrypt-only again.
    /// envelope.keyring().set_state(&key, 1, KeyState::DecryptOnly, &operator).await?;
    /// assert_eq!(envelope.open(&old, &ctx).await?, b"under v1");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn disable(&self, key: &KeyRef, version: u32, caller: &Caller) -> Result<KeyInfo> {
        self.set_state(key, version, KeyState::Disabled, caller)
            .await
    }

    /// Destroys `version` of `key`: everything wrapped under it becomes
    /// unreadable for good (crypto-shredding); opening such a message fails
    /// with [`ProviderErrorKind::KeyDestroyed`]. Messages under other
    /// versions are unaffected. Cached data keys of `key` are flushed first
    /// and again after, so a destroyed key is never served from the cache.
    /// What "destroyed" means per provider (erased bytes, a destroyed HSM
    /// object, a KMS deletion window) is in `docs/KEY-LIFECYCLE.md`.
    /// Under [dual control](crate::approval) this passes no approvals and
    /// is refused with [`Error::Approval`]: use
    /// [`destroy_approved`](Self::destroy_approved).
    ///
    /// [`ProviderErrorKind::KeyDestroyed`]: crate::provider::ProviderErrorKind::KeyDestroyed
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::ProviderErrorKind;
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, Error, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:contract-acme".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?;
    /// # let envelope = Envelope::new(keyring);
    /// # let ctx = EncryptionContext::new();
    /// let v1 = envelope.seal(b"end of retention", &ctx).await?;
    /// let operator = Caller::new("alice", "retention-end");
    /// envelope.keyring().rotate(&key, &operator).await?;
    /// let v2 = envelope.seal(b"still retained", &ctx).await?;
    ///
    /// envelope.keyring().disable(&key, 1, &operator).await?;
    /// envelope.keyring().destroy(&key, 1, &operator).await?;
    /// match envelope.open(&v1, &ctx).await {
    ///     Err(Error::Provider(e)) => assert_eq!(e.kind(), ProviderErrorKind::KeyDestroyed),
    ///     other => panic!("{other:?}"),
    /// }
    /// assert_eq!(envelope.open(&v2, &ctx).await?, b"still retained");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn destroy(&self, key: &KeyRef, version: u32, caller: &Caller) -> Result<KeyInfo> {
        self.destroy_approved(key, version, caller, &[]).await
    }

    /// [`destroy`](Self::destroy) with the custodians' approvals of a
    /// keyring under [dual control](crate::approval)
    /// ([`KeyringBuilder::dual_control`]): refused with [`Error::Approval`]
    /// (and an event, outcome `failed:approval`) unless `approvals` hold
    /// valid approvals of operation `destroy` of this `key` (spelled as
    /// here) and `version` from the threshold of distinct registered
    /// custodians. Checked after the actor and before the policy hook or
    /// any provider call, so a refused destroy changes nothing; the
    /// approvals are spent once accepted, whatever the provider answers.
    /// The event of the destroy names the approvers
    /// ([`Event::approvers`]).
    pub async fn destroy_approved(
        &self,
        key: &KeyRef,
        version: u32,
        caller: &Caller,
        approvals: &[Approval],
    ) -> Result<KeyInfo> {
        let target = Some(KeyState::Destroyed);
        self.require_actor(Operation::Destroy, key, Some(version), target, caller)?;
        let approvers = self.check_approvals(
            Operation::Destroy,
            key,
            version,
            KeyState::Destroyed,
            caller,
            approvals,
        )?;
        self.manage(
            Operation::Destroy,
            key,
            Change {
                version: Some(version),
                target,
                approvers: &approvers,
            },
            caller,
            |p| p.destroy(key, version),
        )
        .await
    }
}

/// What a lifecycle verb changes: the version, the state it moves it to,
/// and the custodians who approved it (dual control).
struct Change<'a> {
    version: Option<u32>,
    target: Option<KeyState>,
    approvers: &'a [String],
}

impl Change<'_> {
    const NONE: Change<'static> = Change {
        version: None,
        target: None,
        approvers: &[],
    };
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// A provider's identity answer and when it was given.
type IdentityAnswer = (Option<KeyIdentity>, Instant);

/// A primary version as described: (version, creation time).
type PrimaryId = (u32, Option<SystemTime>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The provider id of a key reference's text: the part before the first
/// colon (references are `scheme:rest`).
fn provider_of(key_ref: &str) -> &str {
    key_ref.split(':').next().unwrap_or(key_ref)
}

/// Records a provider call whose future was dropped before it finished.
struct CancelGuard<'a> {
    keyring: &'a Keyring,
    call: &'a Call<'a>,
    start: Instant,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Nothing can be returned from a drop: a sink failure here is
            // counted like any failing-open loss.
            let recorded = self.keyring.record(
                self.call,
                None,
                Outcome::Failed("cancelled".into()),
                self.start.elapsed(),
            );
            if recorded.is_err() {
                self.keyring
                    .dropped_events
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// An unwrap whose DEK has also verified the header tag.
enum Verified {
    NotMine,
    Rejected,
    Key(Box<(Dek, OpeningKey)>),
}

impl Verified {
    /// The event outcome: a DEK that does not verify the header tag is a
    /// rejection, not a success.
    fn outcome(&self) -> (Outcome, Option<u32>) {
        match self {
            Verified::Key(..) => (Outcome::Success, None),
            Verified::Rejected => (Outcome::Rejected, None),
            Verified::NotMine => (Outcome::Failed("not-mine".into()), None),
        }
    }
}

/// Unwraps `entry` and checks the DEK against the header tag.
async fn verified_unwrap(
    provider: &dyn KeyProvider,
    entry: &WrappedKey,
    header: &Header,
    context: &EncryptionContext,
) -> Result<Verified> {
    Ok(match provider.unwrap(entry, context).await? {
        Unwrapped::Key(dek) => match OpeningKey::new(&dek, header) {
            Ok(key) => Verified::Key(Box::new((dek, key))),
            Err(_) => Verified::Rejected,
        },
        Unwrapped::Rejected => Verified::Rejected,
        Unwrapped::NotMine => Verified::NotMine,
    })
}

/// The check of every rewrapped header before it is returned, with no
/// provider call: it reads back as built, has one entry per recipient, each
/// of the recipient's provider, and its tag verifies under the DEK that
/// verified the old header (the entries themselves were made from that DEK:
/// wrapped from it, or re-encrypted by the provider from the entry it came
/// from). [`Envelope::rewrap_file`](crate::Envelope::rewrap_file)
/// additionally unwraps every new entry before it commits.
fn check_rewrapped(new: &Header, dek: &Dek, recipients: &[KeyRef]) -> Result<()> {
    let refused = |what: &str| {
        Err(Error::Io(std::io::Error::other(format!(
            "the rewrapped header failed its check ({what}); nothing was rewrapped, the message is unchanged"
        ))))
    };
    let (parsed, used) = Header::parse(new.as_bytes())?;
    if used != new.len() || parsed.as_bytes() != new.as_bytes() {
        return refused("it does not read back as built");
    }
    if parsed.recipients().len() != recipients.len()
        || parsed
            .recipients()
            .iter()
            .zip(recipients)
            .any(|(e, r)| e.provider != r.scheme())
    {
        return refused("its entries are not the recipients asked for");
    }
    if OpeningKey::new(dek, &parsed).is_err() {
        return refused("its tag does not verify under the message's data key");
    }
    Ok(())
}

/// A stable, data-free name for an error, for events.
pub(crate) fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Decrypt => "decrypt",
        Error::Provider(p) => ProviderError::kind(p).as_str(),
        Error::PolicyDenied(_) => "policy-denied",
        Error::Approval(_) => "approval",
        Error::Audit(_) => "audit",
        Error::NoMatchingKey(_) => "no-matching-key",
        Error::KeyLifecycle(_) => "key-lifecycle",
        Error::Keystore { .. } => "keystore",
        Error::Truncated
        | Error::TruncatedChunk
        | Error::NotEnvelope
        | Error::UnsupportedVersion(_)
        | Error::UnsupportedSuite(_)
        | Error::Malformed(_) => "malformed",
        Error::Io(_) => "io",
        Error::Rng => "rng",
        _ => "other",
    }
}
