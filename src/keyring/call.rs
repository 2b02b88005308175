//! The one path every key access takes, in one place to review: the
//! [`Caller`] and the facts of a call, the actor check of key management,
//! the policy hook ([`authorize`](Keyring::authorize)), the provider call
//! itself ([`call`](Keyring::call), [`guarded`](Keyring::guarded),
//! [`timed`](Keyring::timed)), its event and the sink's receipt
//! ([`record`](Keyring::record)), the guard that records a call cancelled
//! mid-way, and cache hits, which are asked of the policy and recorded
//! like calls. Every provider call of the keyring goes through
//! [`call`](Keyring::call); nothing else in `keyring/` calls a provider's
//! key methods, except the identity lookups of `identity.rs`, which are not
//! key accesses.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};
use crate::events::aggregate::dek_id;
use crate::events::{Event, Operation, Outcome};
use crate::format::EncryptionContext;
use crate::policy::{Decision, PolicyRequest};
use crate::provider::{KeyRef, KeyState, ProviderError};

use super::{hex, provider_of, Keyring};

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
/// [`RotateFirst`](crate::keyring::OnExpired::RotateFirst) policy makes on behalf of a
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

/// Facts about one provider call, for its policy request and event.
pub(super) struct Call<'a> {
    pub(super) operation: Operation,
    pub(super) provider: &'a str,
    pub(super) key_ref: Option<&'a str>,
    pub(super) key_version: Option<u32>,
    /// The target state of a lifecycle verb (see [`Event::key_state`]).
    pub(super) key_state: Option<KeyState>,
    /// The custodians who approved a verb under dual control.
    pub(super) approvers: &'a [String],
    pub(super) caller: &'a Caller,
    pub(super) fingerprint: Option<String>,
}

impl Keyring {
    /// Records an event and awaits the sink's receipt (for the durable
    /// audit log: until the entry is on stable storage, without holding
    /// the thread); `Err` when the sink failed and the keyring fails
    /// closed.
    pub(super) async fn record(
        &self,
        call: &Call<'_>,
        version: Option<u32>,
        outcome: Outcome,
        duration: Duration,
    ) -> Result<()> {
        let Some(receipt) = self.submit(call, version, outcome, duration) else {
            return Ok(());
        };
        match receipt.await {
            Ok(()) => Ok(()),
            Err(e) if self.fail_closed => Err(Error::Audit(e.0)),
            Err(_e) => {
                // Failing open: the operation goes on, but the loss is
                // counted (and logged with the `tracing` feature), never
                // silent.
                self.dropped_events.fetch_add(1, Ordering::Relaxed);
                #[cfg(feature = "tracing")]
                tracing::warn!(target: "phi_envelope::audit", "event not recorded: {_e}");
                Ok(())
            }
        }
    }

    /// Builds the event of `call` and hands it to the sink; `None` with
    /// the default no-op sink (no event is built).
    pub(super) fn submit(
        &self,
        call: &Call<'_>,
        version: Option<u32>,
        outcome: Outcome,
        duration: Duration,
    ) -> Option<crate::events::Receipt> {
        if !self.records_events {
            return None;
        }
        Some(
            self.sink
                .submit(&self.event(call, version, outcome, duration)),
        )
    }

    /// The event of `call`.
    fn event(
        &self,
        call: &Call<'_>,
        version: Option<u32>,
        outcome: Outcome,
        duration: Duration,
    ) -> Event {
        Event {
            timestamp: SystemTime::now(),
            operation: call.operation,
            provider: call.provider.to_owned(),
            key_ref: call.key_ref.map(str::to_owned),
            key_version: version.or(call.key_version),
            key_state: call.key_state,
            approvers: call.approvers.to_vec(),
            uses: None,
            actor: call.caller.actor.clone(),
            purpose: call.caller.purpose.clone(),
            context_fingerprint: call.fingerprint.clone(),
            outcome,
            duration,
        }
    }

    /// How many events the sink failed to record while the keyring was
    /// configured to fail open ([`KeyringBuilder::fail_closed`](crate::keyring::KeyringBuilder::fail_closed)`(false)`).
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
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
    pub(super) fn note_caller(&self, operation: Operation, caller: &Caller) {
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
    pub(super) async fn require_actor(
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
        )
        .await?;
        Err(Error::InvalidArgument(format!(
            "{operation} of {key} refused: key management needs an actor, who is doing it, for the audit trail; pass Caller::new(actor, purpose) (the backup CLI: --actor or PHI_ENVELOPE_ACTOR)"
        )))
    }

    /// Asks the policy; a denial is recorded and returned as an error.
    pub(super) async fn authorize(&self, call: &Call<'_>) -> Result<()> {
        if !self.checks_policy.load(Ordering::Acquire) {
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
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match policy.check(&request) {
            Decision::Allow => Ok(()),
            Decision::Deny(reason) => {
                self.record(call, None, Outcome::Denied, Duration::ZERO)
                    .await?;
                Err(Error::PolicyDenied(reason))
            }
        }
    }

    /// The one path of every provider call: policy, the call, the event.
    pub(super) async fn call<T, F>(
        &self,
        call: Call<'_>,
        fut: F,
        outcome_of: impl FnOnce(&T) -> (Outcome, Option<u32>),
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.note_caller(call.operation, call.caller);
        self.authorize(&call).await?;
        self.provider_calls.fetch_add(1, Ordering::Relaxed);
        self.timed(call, fut, outcome_of).await
    }

    /// Policy, then `fut` timed and recorded as one event: the path of
    /// operations that are not themselves provider calls (a rewrap as a
    /// whole), which [`call`](Self::call) shares.
    pub(super) async fn guarded<T, F>(
        &self,
        call: Call<'_>,
        fut: F,
        outcome_of: impl FnOnce(&T) -> (Outcome, Option<u32>),
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.note_caller(call.operation, call.caller);
        self.authorize(&call).await?;
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
                self.record(&call, version, outcome, elapsed).await?;
                Ok(value)
            }
            Err(e) => {
                self.record(&call, None, Outcome::Failed(error_kind(&e).into()), elapsed)
                    .await?;
                Err(e)
            }
        }
    }

    /// A cache hit: the policy is asked exactly as for a provider call, and
    /// an event is recorded.
    pub(super) async fn record_cache_hit(
        &self,
        operation: Operation,
        key_ref: &str,
        version: u32,
        caller: &Caller,
        context: &EncryptionContext,
        header: &[u8],
    ) -> Result<()> {
        self.note_caller(operation, caller);
        if !self.records_events && !self.checks_policy.load(Ordering::Acquire) {
            return Ok(());
        }
        // Only now: a hit that neither records nor asks pays no digest.
        let fingerprint = self.fingerprint_bytes(context);
        let call = Call {
            operation,
            provider: provider_of(key_ref),
            key_ref: Some(key_ref),
            key_version: Some(version),
            key_state: None,
            approvers: &[],
            caller,
            fingerprint: Some(hex(&fingerprint)),
        };
        self.authorize(&call).await?;
        if let (Some(agg), true) = (&self.hit_events, self.records_events) {
            let event = self.event(&call, None, Outcome::Success, Duration::ZERO);
            return agg
                .add(event, dek_id(header))
                .map_err(|e| Error::Audit(e.0));
        }
        self.record(&call, None, Outcome::Success, Duration::ZERO)
            .await
    }

    /// Records the aggregated cache-hit events held so far now
    /// ([`CacheHitEvents::Aggregated`](crate::events::CacheHitEvents::Aggregated)) and waits until the sink has
    /// recorded them; at once with one event per use. Call it before a
    /// planned shutdown (dropping the keyring hands them to the sink
    /// without waiting). Failing closed, an event that could not be
    /// recorded is [`Error::Audit`] (and refuses every later cache hit).
    pub async fn flush_events(&self) -> Result<()> {
        let Some(agg) = &self.hit_events else {
            return Ok(());
        };
        match agg.flush().await {
            Err(e) if self.fail_closed => Err(Error::Audit(e.0)),
            _ => Ok(()),
        }
    }

    /// A refusal by a [`KeyPolicy`]: recorded, returned as
    /// [`Error::KeyLifecycle`]. No provider is called.
    pub(super) async fn lifecycle_refusal(&self, call: &Call<'_>, message: String) -> Error {
        match self
            .record(
                call,
                None,
                Outcome::Failed("key-lifecycle".into()),
                Duration::ZERO,
            )
            .await
        {
            Ok(()) => Error::KeyLifecycle(message),
            Err(audit) => audit,
        }
    }
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
            // The receipt cannot be awaited here: its answer is counted
            // when the sink gives it.
            let receipt = self.keyring.submit(
                self.call,
                None,
                Outcome::Failed("cancelled".into()),
                self.start.elapsed(),
            );
            if let Some(receipt) = receipt {
                let dropped = self.keyring.dropped_events.clone();
                receipt.on_complete(move |r| {
                    if r.is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }
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
