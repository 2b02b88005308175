//! The keyring: which providers and keys a message is wrapped to, the policy
//! hook, the event sinks, and the single path through which every key access
//! goes.
//!
//! Every provider call made by phi-envelope passes through [`Keyring`]: the
//! policy hook is asked first (a denial stops it before the provider is
//! touched), the call is timed, and an [`Event`](crate::events::Event) is recorded before the
//! result is released. When the sink cannot record the event and the keyring
//! fails closed (the default), the result is dropped (a DEK is zeroized) and
//! the operation fails with [`Error::Audit`]. The keyring awaits the sink's
//! [receipt](crate::events::Receipt) rather than calling it inline, so a
//! sink that writes in the background (the durable
//! [`AuditLog`](crate::audit::AuditLog)) holds no thread of the caller's
//! runtime meanwhile. Cache hits are one event each too, unless the keyring
//! is built to aggregate them
//! ([`KeyringBuilder::cache_hit_events`], with its trade-off).
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
//! - the [data-key cache](crate::cache);
//! - the policy hook, fixed when built unless built
//!   [replaceable](KeyringBuilder::policy_replaceable): then
//!   [`replace_policy`](Keyring::replace_policy) swaps it, as a verb of
//!   its own (an actor, the policy in force asked, an event `set-policy`).
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

mod builder;
mod call;
mod cryptoperiod;
mod identity;
mod lifecycle;
mod open;
mod policy_change;
mod rewrap;
mod seal;

pub use builder::KeyringBuilder;
pub use call::Caller;
pub use cryptoperiod::{KeyPolicy, OnExpired};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ring::hmac;

use crate::approval::ApprovalChecker;
use crate::cache::{CacheStats, DataKeyCache, Flights};
use crate::error::{Error, Result};
use crate::events::aggregate::HitAggregator;
use crate::events::EventSink;
use crate::format::EncryptionContext;
use crate::policy::Policy;
use crate::provider::{KeyIdentity, KeyInfo, KeyProvider, KeyRef};

/// Providers, default recipients, policy and event sinks, key policies and
/// the data-key cache.
pub struct Keyring {
    providers: Vec<Arc<dyn KeyProvider>>,
    recipients: Vec<KeyRef>,
    sink: Arc<dyn EventSink>,
    /// False with the default no-op sink: events are not even built.
    records_events: bool,
    /// False with the default allow-all policy (until one replaces it):
    /// requests are not built.
    checks_policy: AtomicBool,
    /// Events the sink failed to record while failing open.
    dropped_events: Arc<AtomicU64>,
    /// Aggregated cache-hit events, when so configured.
    hit_events: Option<Arc<HitAggregator>>,
    fail_closed: bool,
    /// The policy hook; replaced only by [`Keyring::replace_policy`], and
    /// only when built [replaceable](KeyringBuilder::policy_replaceable).
    policy: RwLock<Arc<dyn Policy>>,
    policy_replaceable: bool,
    /// A policy change is under way: changes take turns.
    policy_changing: AtomicBool,
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

impl Keyring {
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

    pub(super) fn provider_for(&self, key: &KeyRef) -> Result<&Arc<dyn KeyProvider>> {
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

    /// The fingerprint's 16 bytes, for events and policy requests (the
    /// data-key cache compares the canonical pairs themselves).
    pub(super) fn fingerprint_bytes(&self, context: &EncryptionContext) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.fingerprint_key);
        ctx.update(FINGERPRINT_LABEL);
        ctx.update(&zeroize::Zeroizing::new(context.canonical_pairs()));
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }
}

/// A provider's identity answer and when it was given.
type IdentityAnswer = (Option<KeyIdentity>, Instant);

/// A primary version as described: (version, creation time).
pub(super) type PrimaryId = (u32, Option<SystemTime>);

/// Lowercase hex.
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The provider id of a key reference's text: the part before the first
/// colon (references are `scheme:rest`).
pub(super) fn provider_of(key_ref: &str) -> &str {
    key_ref.split(':').next().unwrap_or(key_ref)
}
