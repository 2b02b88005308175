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

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ring::hmac;

use crate::error::{Error, Result};
use crate::events::{Event, EventSink, NoopSink, Operation, Outcome};
use crate::format::{EncryptionContext, Header, WrappedKey, MAX_RECIPIENTS};
use crate::message::{OpeningKey, SealingKey};
use crate::policy::{AllowAll, Decision, Policy, PolicyRequest};
use crate::primitives::{fill_random, Dek};
use crate::provider::{KeyInfo, KeyProvider, KeyRef, KeyState, ProviderError, Unwrapped};

/// Who performs an operation and why: supplied by the caller, recorded in
/// every event, shown to the policy hook.
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
}

/// Builds a [`Keyring`].
pub struct KeyringBuilder {
    providers: Vec<Arc<dyn KeyProvider>>,
    recipients: Vec<KeyRef>,
    sink: Arc<dyn EventSink>,
    fail_closed: bool,
    policy: Arc<dyn Policy>,
    fingerprint_key: Option<Vec<u8>>,
}

impl fmt::Debug for KeyringBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyringBuilder")
            .field("providers", &self.providers)
            .field("recipients", &self.recipients)
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
        self
    }

    /// The secret key of context fingerprints (at least 32 bytes). Configure
    /// the same key everywhere to make fingerprints comparable across
    /// processes; by default each keyring draws a random one.
    pub fn context_fingerprint_key(mut self, key: &[u8]) -> Self {
        self.fingerprint_key = Some(key.to_vec());
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
        let mut fp = zeroize::Zeroizing::new(vec![0u8; 32]);
        match self.fingerprint_key {
            Some(k) if k.len() >= 32 => fp.copy_from_slice(&k[..32]),
            Some(_) => {
                return Err(Error::InvalidArgument(
                    "the context fingerprint key must be at least 32 bytes".into(),
                ))
            }
            None => fill_random(&mut fp)?,
        }
        Ok(Keyring {
            providers: self.providers,
            recipients,
            sink: self.sink,
            fail_closed: self.fail_closed,
            policy: self.policy,
            fingerprint_key: hmac::Key::new(hmac::HMAC_SHA256, &fp),
        })
    }
}

/// Providers, default recipients, policy and event sinks.
pub struct Keyring {
    providers: Vec<Arc<dyn KeyProvider>>,
    recipients: Vec<KeyRef>,
    sink: Arc<dyn EventSink>,
    fail_closed: bool,
    policy: Arc<dyn Policy>,
    fingerprint_key: hmac::Key,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("providers", &self.providers)
            .field("recipients", &self.recipients)
            .field("sink", &self.sink)
            .field("fail_closed", &self.fail_closed)
            .field("policy", &self.policy)
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
        }
    }

    /// The default recipients of new messages.
    pub fn recipients(&self) -> &[KeyRef] {
        &self.recipients
    }

    /// The provider with id `id`.
    pub fn provider(&self, id: &str) -> Option<&Arc<dyn KeyProvider>> {
        self.providers.iter().find(|p| p.id() == id)
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
        let mut ctx = hmac::Context::with_key(&self.fingerprint_key);
        ctx.update(FINGERPRINT_LABEL);
        ctx.update(&context.canonical_pairs());
        let tag = ctx.sign();
        tag.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Records an event; `Err` when the sink failed and the keyring fails
    /// closed.
    fn record(&self, call: &Call<'_>, version: Option<u32>, outcome: Outcome, duration: Duration) -> Result<()> {
        let event = Event {
            timestamp: SystemTime::now(),
            operation: call.operation,
            provider: call.provider.to_owned(),
            key_ref: call.key_ref.map(str::to_owned),
            key_version: version.or(call.key_version),
            actor: call.caller.actor.clone(),
            purpose: call.caller.purpose.clone(),
            context_fingerprint: call.fingerprint.clone(),
            outcome,
            duration,
        };
        match self.sink.record(&event) {
            Ok(()) => Ok(()),
            Err(e) if self.fail_closed => Err(Error::Audit(e.0)),
            Err(_) => Ok(()),
        }
    }

    /// Asks the policy; a denial is recorded and returned as an error.
    fn authorize(&self, call: &Call<'_>) -> Result<()> {
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
        self.authorize(&call)?;
        let start = Instant::now();
        let result = fut.await;
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

    /// Records a cache hit (used by the data-key cache).
    #[allow(dead_code)]
    pub(crate) fn record_cache_hit(
        &self,
        operation: Operation,
        key: &KeyRef,
        caller: &Caller,
        context: &EncryptionContext,
    ) -> Result<()> {
        let call = Call {
            operation,
            provider: key.scheme(),
            key_ref: Some(key.as_str()),
            key_version: None,
            caller,
            fingerprint: Some(self.context_fingerprint(context)),
        };
        self.authorize(&call)?;
        self.record(&call, None, Outcome::Success, Duration::ZERO)
    }

    /// A fresh DEK wrapped to every key in `recipients` (the first generates
    /// it, the others wrap it), ready to seal.
    pub(crate) async fn new_sealing_key(
        &self,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<SealingKey> {
        let (first, rest) = recipients
            .split_first()
            .ok_or_else(|| Error::InvalidArgument("no recipients: add a key to encrypt to".into()))?;
        if recipients.len() > MAX_RECIPIENTS {
            return Err(Error::InvalidArgument(format!("at most {MAX_RECIPIENTS} recipients")));
        }
        let fingerprint = self.context_fingerprint(context);
        let provider = self.provider_for(first)?;
        let generated = self
            .call(
                Call {
                    operation: Operation::Generate,
                    provider: provider.id(),
                    key_ref: Some(first.as_str()),
                    key_version: None,
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
            entries.push(self.wrap_one(key, &dek, context, caller, &fingerprint).await?);
        }
        SealingKey::new(&dek, entries)
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
                caller,
                fingerprint: Some(fingerprint.to_owned()),
            },
            provider.rewrap(entry, key, context),
            |w| (Outcome::Success, w.as_ref().map(|w| w.key_version)),
        )
        .await
    }

    /// Unwraps the DEK of `header` with the first entry that a configured
    /// provider can unwrap and whose DEK verifies the header tag.
    ///
    /// Entries are tried in order (at most [`MAX_RECIPIENTS`]). If none
    /// succeeds: an operational failure (provider down, key destroyed,
    /// policy denial) is returned as is, so the operator can act; otherwise
    /// a rejected entry gives the opaque [`Error::Decrypt`] without saying
    /// which entry or why; and a message for which no provider holds a key
    /// gives [`Error::NoMatchingKey`].
    pub(crate) async fn unwrap_header(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(Dek, OpeningKey)> {
        let fingerprint = self.context_fingerprint(context);
        let mut operational: Option<Error> = None;
        let mut rejected = false;
        for entry in header.recipients().iter().take(MAX_RECIPIENTS) {
            let Some(provider) = self.provider(&entry.provider) else {
                continue;
            };
            let result = self
                .call(
                    Call {
                        operation: Operation::Unwrap,
                        provider: provider.id(),
                        key_ref: Some(&entry.key_ref),
                        key_version: Some(entry.key_version),
                        caller,
                        fingerprint: Some(fingerprint.clone()),
                    },
                    provider.unwrap(entry, context),
                    |u| match u {
                        Unwrapped::Key(_) => (Outcome::Success, None),
                        Unwrapped::Rejected => (Outcome::Rejected, None),
                        Unwrapped::NotMine => (Outcome::Failed("not-mine".into()), None),
                    },
                )
                .await;
            match result {
                Ok(Unwrapped::Key(dek)) => match OpeningKey::new(&dek, header) {
                    Ok(key) => return Ok((dek, key)),
                    Err(_) => rejected = true,
                },
                Ok(Unwrapped::Rejected) => rejected = true,
                Ok(Unwrapped::NotMine) => {}
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

    /// Re-wraps the DEK of `header` to `recipients` and re-tags the header;
    /// the body is untouched. The context is required: providers bind it.
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
        let (dek, _) = self.unwrap_header(header, context, caller).await?;
        let start = Instant::now();
        let mut entries = Vec::with_capacity(recipients.len());
        for key in recipients {
            // Where the provider can re-encrypt an old entry itself (AWS KMS
            // ReEncrypt), the plaintext DEK is not sent to it again.
            let old = header.recipients().iter().find(|e| e.provider == key.scheme());
            let reused = match old {
                Some(entry) if self.provider_for(key)?.supports_rewrap() => {
                    self.rewrap_one(entry, key, context, caller, &fingerprint).await?
                }
                _ => None,
            };
            let entry = match reused {
                Some(e) => e,
                None => self.wrap_one(key, &dek, context, caller, &fingerprint).await?,
            };
            entries.push(entry);
        }
        let new_header = crate::message::rewrap_header(header, &dek, entries)?;
        let first = &recipients[0];
        self.record(
            &Call {
                operation: Operation::Rewrap,
                provider: first.scheme(),
                key_ref: Some(first.as_str()),
                key_version: new_header.recipients().first().map(|r| r.key_version),
                caller,
                fingerprint: Some(fingerprint),
            },
            None,
            Outcome::Success,
            start.elapsed(),
        )?;
        Ok(new_header)
    }

    async fn manage<'a>(
        &'a self,
        operation: Operation,
        key: &'a KeyRef,
        version: Option<u32>,
        caller: &'a Caller,
        fut: impl FnOnce(&'a Arc<dyn KeyProvider>) -> crate::provider::BoxFuture<'a, Result<KeyInfo>>,
    ) -> Result<KeyInfo> {
        let provider = self.provider_for(key)?;
        self.call(
            Call {
                operation,
                provider: provider.id(),
                key_ref: Some(key.as_str()),
                key_version: version,
                caller,
                fingerprint: None,
            },
            fut(provider),
            |info| (Outcome::Success, version.or(info.primary_version)),
        )
        .await
    }

    /// Describes `key`: its versions, their states, the primary version.
    pub async fn describe(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(Operation::Describe, key, None, caller, |p| p.describe(key))
            .await
    }

    /// Creates `key` with version 1 enabled and primary.
    pub async fn create_key(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(Operation::CreateKey, key, None, caller, |p| p.create_key(key))
            .await
    }

    /// Rotates `key`: a new primary version; the old one becomes
    /// decrypt-only. A failed rotation leaves the old primary working.
    pub async fn rotate(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(Operation::Rotate, key, None, caller, |p| p.rotate(key))
            .await
    }

    /// Moves `version` of `key` to `state` (decrypt-only, disabled, or back
    /// to enabled where the provider allows).
    pub async fn set_state(
        &self,
        key: &KeyRef,
        version: u32,
        state: KeyState,
        caller: &Caller,
    ) -> Result<KeyInfo> {
        self.manage(Operation::SetState, key, Some(version), caller, |p| {
            p.set_state(key, version, state)
        })
        .await
    }

    /// Destroys `version` of `key`: everything wrapped under it becomes
    /// unreadable (crypto-shredding).
    pub async fn destroy(&self, key: &KeyRef, version: u32, caller: &Caller) -> Result<KeyInfo> {
        self.manage(Operation::Destroy, key, Some(version), caller, |p| {
            p.destroy(key, version)
        })
        .await
    }
}

/// A stable, data-free name for an error, for events.
pub(crate) fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Decrypt => "decrypt",
        Error::Provider(p) => ProviderError::kind(p).as_str(),
        Error::PolicyDenied(_) => "policy-denied",
        Error::Audit(_) => "audit",
        Error::NoMatchingKey(_) => "no-matching-key",
        Error::KeyLifecycle(_) => "key-lifecycle",
        Error::Io(_) => "io",
        Error::Rng => "rng",
        _ => "other",
    }
}
