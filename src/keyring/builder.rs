//! [`KeyringBuilder`]: the configuration of a [`Keyring`] (providers,
//! default recipients, sink, policy hook, key policies, cache, dual
//! control) and the checks [`build`](KeyringBuilder::build) makes of it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::hmac;

use crate::approval::{ApprovalChecker, DualControl};
use crate::cache::{CacheConfig, DataKeyCache, Flights};
use crate::error::{Error, Result};
use crate::events::aggregate::HitAggregator;
use crate::events::{CacheHitEvents, EventSink, NoopSink};
use crate::format::MAX_RECIPIENTS;
use crate::policy::{AllowAll, Policy};
use crate::primitives::fill_random;
use crate::provider::{KeyProvider, KeyRef};

use super::{KeyPolicy, Keyring};

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
    policy_replaceable: bool,
    key_policies: Vec<(KeyRef, KeyPolicy)>,
    describe_ttl: Duration,
    cache: Option<CacheConfig>,
    cache_hit_events: CacheHitEvents,
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

    /// Whether [`Keyring::replace_policy`] may replace the policy hook at
    /// run time (default `false`: the policy is fixed for the keyring's
    /// life, and a replacement is refused and recorded). Off by default
    /// because a policy written before the verb existed may allow it
    /// without meaning to (a closure that allows what it does not name):
    /// turn it on only with a policy that decides on
    /// [`Operation::SetPolicy`](crate::events::Operation::SetPolicy)
    /// ([`SegregationOfDuties`](crate::policy::SegregationOfDuties) leaves
    /// it to key custodians). Dual control, key policies and the event
    /// sink are never replaceable.
    pub fn policy_replaceable(mut self, yes: bool) -> Self {
        self.policy_replaceable = yes;
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
    /// [`KeyIdentity`](crate::provider::KeyIdentity)), to recipients and header entries however they
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

    /// How cache hits are recorded (default
    /// [`CacheHitEvents::EachUse`]: one event per hit, awaited like a
    /// provider call's). [`CacheHitEvents::Aggregated`] records one event
    /// per cached data key and caller per interval instead; read its
    /// trade-off first.
    pub fn cache_hit_events(mut self, mode: CacheHitEvents) -> Self {
        self.cache_hit_events = mode;
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
        let dropped_events = Arc::new(AtomicU64::new(0));
        // Only a keyring with a cache has hits to aggregate.
        let hit_events = if self.sink_set && cache.is_some() {
            HitAggregator::new(
                self.cache_hit_events,
                self.sink.clone(),
                self.fail_closed,
                dropped_events.clone(),
            )
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot start the thread that flushes aggregated cache-hit events: {e}"
                ))
            })?
        } else {
            None
        };
        Ok(Keyring {
            providers: self.providers,
            recipients,
            sink: self.sink,
            records_events: self.sink_set,
            checks_policy: AtomicBool::new(self.policy_set),
            dropped_events,
            hit_events,
            fail_closed: self.fail_closed,
            policy: std::sync::RwLock::new(self.policy),
            policy_replaceable: self.policy_replaceable,
            policy_changing: AtomicBool::new(false),
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
            policy_replaceable: false,
            key_policies: Vec::new(),
            describe_ttl: Duration::from_secs(60),
            cache: None,
            cache_hit_events: CacheHitEvents::EachUse,
            dual_control: None,
        }
    }
}
