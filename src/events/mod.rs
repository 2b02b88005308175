//! Key-access events and the sinks that receive them.
//!
//! Every generate, wrap, unwrap, rotate, rewrap, state change, destroy,
//! policy change, policy denial, provider failure and cache use produces
//! an [`Event`]. An
//! event names the operation, the provider, the key reference and version,
//! the caller's actor and purpose, a keyed fingerprint of the encryption
//! context, the outcome and the duration. It never carries key material,
//! plaintext or context values.
//!
//! Sinks are opt-in: a [`crate::Keyring`] without one uses [`NoopSink`].
//! The crate also ships [`MemorySink`] (tests, diagnostics), [`FanOut`]
//! (several sinks at once), the tamper-evident JSON Lines
//! [`AuditLog`](crate::audit::AuditLog) and, with the `tracing` feature, a
//! `TracingSink` in [`crate::audit`].
//!
//! # JSON schema
//!
//! [`Event::to_json`] writes one canonical JSON object (the audit log embeds
//! it as the `event` member of each line; docs/AUDIT-LOG.md, section 5,
//! specifies it byte for byte, with vectors). Fields, always present and always
//! in this order; absent values are `null`, except `key_state`,
//! `approvers` and the three members of an aggregated event (`uses`,
//! `first_use`, `last_use`), which are written only when the event has
//! them:
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `timestamp` | string | when the operation finished, RFC 3339 UTC with microseconds: `2026-11-25T10:11:01.123456Z` |
//! | `operation` | string | [`Operation::as_str`]: `generate`, `wrap`, `unwrap`, `rewrap`, `create-key`, `rotate`, `set-state`, `destroy`, `describe`, `cache-hit-encrypt`, `cache-hit-decrypt`, `set-policy` |
//! | `provider` | string | the provider id (`local`, `pkcs11`, `aws-kms`, ...) |
//! | `key_ref` | string or null | the key reference (`local:records`, `aws-kms:arn:...`) |
//! | `key_version` | integer or null | the KEK version |
//! | `key_state` | string, **only when present** | the state the operation moves `key_version` to: `enabled`, `decrypt-only`, `disabled`, `destroyed` (see below) |
//! | `approvers` | array of strings, **only when non-empty** | the custodians whose approvals a verb under [dual control](crate::approval) was given (sorted ids; see below) |
//! | `uses` | integer ≥ 1, **only in an aggregated event** | how many cache hits the event stands for (see below) |
//! | `first_use` | string, **only in an aggregated event** | when the first of them happened (same form as `timestamp`) |
//! | `last_use` | string, **only in an aggregated event** | when the last of them happened; never before `first_use` |
//! | `actor` | string or null | who asked, as the caller supplied it |
//! | `purpose` | string or null | why, as the caller supplied it |
//! | `context_fingerprint` | string or null | 32 hex digits: keyed HMAC-SHA-256 of the canonical encryption context |
//! | `outcome` | string | [`Outcome::as_string`]: `success`, `denied`, `rejected`, `failed:<kind>` |
//! | `duration_us` | integer | how long the provider call took, in microseconds |
//!
//! ```text
//! {"timestamp":"2026-11-25T10:11:01.123456Z","operation":"unwrap","provider":"local","key_ref":"local:records","key_version":2,"actor":"lab-service","purpose":"treatment","context_fingerprint":"6f1c0e8a4b2d9e7f0a1b2c3d4e5f6a7b","outcome":"success","duration_us":412}
//! ```
//!
//! `key_state` is the **target** state of a lifecycle verb, recorded
//! whatever the outcome (a refused or failed change records what was asked
//! for): `set-state` (and `disable`) the state asked for, `destroy`
//! `destroyed`, `rotate` and `create-key` `enabled` (the new primary; its
//! number is `key_version` once the verb succeeded). Every other operation
//! has none, and its line is byte for byte what it was before the field
//! existed, so audit logs written by earlier versions still verify. A
//! decoder re-encoding a line writes the member only when it is present,
//! between `key_version` and `actor`:
//!
//! ```text
//! {"timestamp":"2026-11-25T10:15:42.000917Z","operation":"set-state","provider":"local","key_ref":"local:records","key_version":1,"key_state":"disabled","actor":"alice@ops","purpose":"retire-v1","context_fingerprint":null,"outcome":"success","duration_us":2210}
//! ```
//!
//! `approvers` lists, for `destroy` and `set-state` under dual control,
//! the ids of the custodians whose approvals the keyring accepted, sorted
//! by byte value, each once; a refusal by dual control (outcome
//! `failed:approval`) lists those that were valid before it found the
//! problem (possibly none, and then no member). Like `key_state` it is
//! written only when non-empty, between `key_state` (or `key_version`) and
//! `actor`, so lines of events without approvers, including every line
//! written before the field existed, are byte for byte as before:
//!
//! ```text
//! {"timestamp":"2026-12-03T18:40:00.000311Z","operation":"destroy","provider":"local","key_ref":"local:records","key_version":1,"key_state":"destroyed","approvers":["alice","bob"],"actor":"carol","purpose":"retention-end","context_fingerprint":null,"outcome":"success","duration_us":1980}
//! ```
//!
//! `uses`, `first_use` and `last_use` are written together or not at all,
//! in this order, between `approvers` (or `key_state`, or `key_version`)
//! and `actor`, only by a keyring configured with
//! [`CacheHitEvents::Aggregated`]: one `cache-hit-encrypt` or
//! `cache-hit-decrypt` event then stands for every hit of one cached data
//! key by one caller (actor and purpose) and context fingerprint within a
//! flush interval. Its `timestamp` is when it was recorded (flushed), its
//! `outcome` is `success` (a hit the policy denied is recorded at once, as
//! a `denied` event of its own) and its `duration_us` is 0. The aggregates
//! held are recorded before the event of any lifecycle verb (rotate, state
//! change, destroy) of the same keyring, so the uses before a change come
//! before it in the trail; `first_use` and `last_use` say when they were.
//! Every other
//! event, and every event of a keyring with the default
//! [`CacheHitEvents::EachUse`], has none of the three, and its line is
//! byte for byte as before they existed:
//!
//! ```text
//! {"timestamp":"2026-12-04T01:00:05.000120Z","operation":"cache-hit-encrypt","provider":"local","key_ref":"local:records","key_version":2,"uses":4096,"first_use":"2026-12-04T01:00:04.000007Z","last_use":"2026-12-04T01:00:04.999871Z","actor":"lab-service","purpose":"treatment","context_fingerprint":"6f1c0e8a4b2d9e7f0a1b2c3d4e5f6a7b","outcome":"success","duration_us":0}
//! ```
//!
//! `set-policy` is the event of
//! [`Keyring::replace_policy`](crate::Keyring::replace_policy): the
//! keyring's policy hook replaced at run time, whatever the outcome (a
//! refusal records what was asked for). No provider and no key are
//! involved: its `provider` is `keyring`, its `key_ref`, `key_version`
//! and `context_fingerprint` are `null`, its `duration_us` is 0, and it
//! has none of the optional members; `actor` and `purpose` are who asked
//! and why (`null` only in the refusal of a caller without an actor,
//! outcome `failed:no-actor`). Its outcome is `success`, `denied` (the
//! policy in force refused the change), `failed:no-actor`,
//! `failed:not-replaceable` (the keyring was not built with
//! [`KeyringBuilder::policy_replaceable`](crate::keyring::KeyringBuilder::policy_replaceable)),
//! or `failed:concurrent` (another change was under way).
//! The value is new: lines of every other operation are byte for byte as
//! before it existed, and a reader that predates it refuses the line as an
//! unknown operation rather than misreading it:
//!
//! ```text
//! {"timestamp":"2026-12-04T04:10:00.000042Z","operation":"set-policy","provider":"keyring","key_ref":null,"key_version":null,"actor":"kms-admin","purpose":"offboard-lab","context_fingerprint":null,"outcome":"success","duration_us":0}
//! ```
//!
//! What is deliberately absent: key bytes (DEK or KEK, plain or wrapped),
//! plaintext, and encryption-context keys and values (identifiers can be
//! PHI). The fingerprint is keyed with a secret the keyring holds, so values
//! cannot be confirmed by guessing and hashing them. `actor`, `purpose` and
//! `key_ref` are written as given: do not put PHI in them.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::provider::KeyState;

pub(crate) mod aggregate;
pub(crate) mod codec;
mod receipt;

pub use receipt::{Completion, Receipt};

/// What was done with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// A provider generated a DEK under a KEK.
    Generate,
    /// A provider wrapped an existing DEK (extra recipient, rewrap).
    Wrap,
    /// A provider unwrapped a DEK.
    Unwrap,
    /// A message header was rewrapped to new recipients.
    Rewrap,
    /// A key was created.
    CreateKey,
    /// A key was rotated to a new primary version.
    Rotate,
    /// A key version changed state (enabled, decrypt-only, disabled).
    SetState,
    /// A key version was destroyed.
    Destroy,
    /// A key was described (versions and states read).
    Describe,
    /// A cached data key served an encryption.
    CacheHitEncrypt,
    /// A cached data key served a decryption.
    CacheHitDecrypt,
    /// The keyring's policy hook was replaced
    /// ([`Keyring::replace_policy`](crate::Keyring::replace_policy)).
    SetPolicy,
}

impl Operation {
    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Generate => "generate",
            Operation::Wrap => "wrap",
            Operation::Unwrap => "unwrap",
            Operation::Rewrap => "rewrap",
            Operation::CreateKey => "create-key",
            Operation::Rotate => "rotate",
            Operation::SetState => "set-state",
            Operation::Destroy => "destroy",
            Operation::Describe => "describe",
            Operation::CacheHitEncrypt => "cache-hit-encrypt",
            Operation::CacheHitDecrypt => "cache-hit-decrypt",
            Operation::SetPolicy => "set-policy",
        }
    }

    /// True for the verbs that manage keys, or the keyring's control of
    /// them, rather than use them: create-key, rotate, set-state, destroy
    /// and set-policy.
    pub fn is_key_management(self) -> bool {
        matches!(
            self,
            Operation::CreateKey
                | Operation::Rotate
                | Operation::SetState
                | Operation::Destroy
                | Operation::SetPolicy
        )
    }

    /// True for the verbs that release a DEK for decryption.
    pub fn is_decryption(self) -> bool {
        matches!(self, Operation::Unwrap | Operation::CacheHitDecrypt)
    }
}

impl std::str::FromStr for Operation {
    type Err = EventParseError;

    /// Parses the name [`as_str`](Operation::as_str) gives.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Operation::ALL
            .iter()
            .copied()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| EventParseError(format!("unknown operation {s:?}")))
    }
}

impl Operation {
    /// Every operation, in declaration order.
    pub const ALL: &'static [Operation] = &[
        Operation::Generate,
        Operation::Wrap,
        Operation::Unwrap,
        Operation::Rewrap,
        Operation::CreateKey,
        Operation::Rotate,
        Operation::SetState,
        Operation::Destroy,
        Operation::Describe,
        Operation::CacheHitEncrypt,
        Operation::CacheHitDecrypt,
        Operation::SetPolicy,
    ];
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// The policy hook denied it before any provider call.
    Denied,
    /// The provider answered that the wrapped key did not authenticate.
    Rejected,
    /// It failed; the string is a stable error kind (e.g. `unavailable`,
    /// `key-destroyed`), never a message with data in it.
    Failed(String),
}

impl Outcome {
    /// A stable lowercase name (`success`, `denied`, `rejected`, or the
    /// failure kind prefixed with `failed:`).
    pub fn as_string(&self) -> String {
        match self {
            Outcome::Success => "success".into(),
            Outcome::Denied => "denied".into(),
            Outcome::Rejected => "rejected".into(),
            Outcome::Failed(kind) => format!("failed:{kind}"),
        }
    }

    /// Parses what [`as_string`](Outcome::as_string) writes.
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "success" => Some(Outcome::Success),
            "denied" => Some(Outcome::Denied),
            "rejected" => Some(Outcome::Rejected),
            _ => s
                .strip_prefix("failed:")
                .map(|kind| Outcome::Failed(kind.to_owned())),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_string())
    }
}

/// One key access.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// When the operation finished.
    pub timestamp: SystemTime,
    /// What was done.
    pub operation: Operation,
    /// The provider's id (`local`, `pkcs11`, `aws-kms`, ...).
    pub provider: String,
    /// The key reference, when one applies.
    pub key_ref: Option<String>,
    /// The KEK version, when known.
    pub key_version: Option<u32>,
    /// For a lifecycle verb, the state it moves `key_version` to (the
    /// target, not the state before), whatever the outcome; `None` for
    /// every other operation.
    pub key_state: Option<KeyState>,
    /// For a verb under [dual control](crate::approval), the ids of the
    /// custodians whose approvals the keyring accepted, sorted (on a
    /// refusal: those that were valid); empty for every other event.
    pub approvers: Vec<String>,
    /// For an aggregated cache-hit event ([`CacheHitEvents::Aggregated`]),
    /// the uses it stands for; `None` for every other event.
    pub uses: Option<Uses>,
    /// Who asked (supplied by the caller).
    pub actor: Option<String>,
    /// Why (supplied by the caller).
    pub purpose: Option<String>,
    /// Keyed fingerprint of the encryption context (hex), when one applies.
    pub context_fingerprint: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub duration: Duration,
}

impl Event {
    /// An event that happens now, with no key, caller, fingerprint or
    /// duration: fill those in with the `with_*` methods. For sinks' and
    /// policies' own tests, and for applications that record their own
    /// events into the same sinks; the keyring builds its events itself.
    pub fn new(operation: Operation, provider: impl Into<String>, outcome: Outcome) -> Event {
        Event {
            timestamp: SystemTime::now(),
            operation,
            provider: provider.into(),
            key_ref: None,
            key_version: None,
            key_state: None,
            approvers: Vec::new(),
            uses: None,
            actor: None,
            purpose: None,
            context_fingerprint: None,
            outcome,
            duration: Duration::ZERO,
        }
    }

    /// Sets the key reference and version.
    pub fn with_key(mut self, key_ref: impl Into<String>, version: Option<u32>) -> Event {
        self.key_ref = Some(key_ref.into());
        self.key_version = version;
        self
    }

    /// Sets the target state of a lifecycle verb.
    pub fn with_key_state(mut self, state: KeyState) -> Event {
        self.key_state = Some(state);
        self
    }

    /// Sets the custodians who approved (dual control).
    pub fn with_approvers<I, S>(mut self, approvers: I) -> Event
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.approvers = approvers.into_iter().map(Into::into).collect();
        self
    }

    /// Makes this an aggregated event standing for `uses`.
    pub fn with_uses(mut self, uses: Uses) -> Event {
        self.uses = Some(uses);
        self
    }

    /// Sets the actor and the purpose.
    pub fn with_caller(mut self, actor: impl Into<String>, purpose: impl Into<String>) -> Event {
        self.actor = Some(actor.into());
        self.purpose = Some(purpose.into());
        self
    }

    /// Sets the context fingerprint (hex).
    pub fn with_context_fingerprint(mut self, fingerprint: impl Into<String>) -> Event {
        self.context_fingerprint = Some(fingerprint.into());
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp: SystemTime) -> Event {
        self.timestamp = timestamp;
        self
    }

    /// Sets the duration.
    pub fn with_duration(mut self, duration: Duration) -> Event {
        self.duration = duration;
        self
    }

    /// The canonical JSON object of this event (see the
    /// [module documentation](self) for the schema). One line, no trailing
    /// newline; the timestamp is truncated to microseconds and the duration
    /// to whole microseconds.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(320);
        codec::push_event(&mut out, self);
        out
    }

    /// Parses an event from its JSON object (as [`to_json`](Self::to_json)
    /// writes it; unknown fields are ignored).
    pub fn from_json(json: &str) -> Result<Event, EventParseError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| EventParseError(e.to_string()))?;
        codec::event_from_value(&value).map_err(EventParseError)
    }
}

/// The cache hits an aggregated event stands for (see
/// [`CacheHitEvents::Aggregated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uses {
    /// How many (at least 1).
    pub count: u64,
    /// When the first happened.
    pub first: SystemTime,
    /// When the last happened (not before `first`).
    pub last: SystemTime,
}

/// How a keyring records the uses of a cached data key
/// ([`KeyringBuilder::cache_hit_events`](crate::keyring::KeyringBuilder::cache_hit_events)).
/// Provider calls, denials and failures are always one event each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheHitEvents {
    /// One event per cache hit, recorded (for the durable audit log: on
    /// stable storage) before the key is used, like a provider call. The
    /// default.
    #[default]
    EachUse,
    /// One event per cached data key, caller (actor and purpose) and
    /// context fingerprint, counting its hits (`uses`, `first_use`,
    /// `last_use`: see the [schema](self#json-schema)), recorded at most
    /// `flush_every` after the first hit it counts (raised to 1 ms if
    /// shorter), and on
    /// [`Keyring::flush_events`](crate::Keyring::flush_events) and when the
    /// keyring is dropped.
    ///
    /// The trade-off: the policy is still asked before every hit, but a
    /// hit no longer waits for its event, so hits within the last interval
    /// before a crash (or a `SIGKILL`) are lost from the trail, where with
    /// [`EachUse`](Self::EachUse) none is. If a flush cannot be recorded
    /// and the keyring fails closed, every later cache hit is refused
    /// ([`Error::Audit`](crate::Error::Audit)); failing open, the lost
    /// events are counted in
    /// [`Keyring::dropped_events`](crate::Keyring::dropped_events).
    Aggregated {
        /// The longest a hit waits in memory before its event is recorded.
        flush_every: Duration,
    },
}

impl CacheHitEvents {
    /// [`Aggregated`](Self::Aggregated), flushed every `flush_every`.
    pub fn aggregated(flush_every: Duration) -> CacheHitEvents {
        CacheHitEvents::Aggregated { flush_every }
    }
}

/// An event's JSON could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event JSON: {0}")]
pub struct EventParseError(pub String);

/// Receives events.
///
/// A sink records in one of two ways:
///
/// - **inline**, in [`record`](Self::record), before the operation's
///   result is returned (the default; [`MemorySink`], a `TracingSink`).
///   Such a sink must be fast and must not block: the keyring calls it on
///   the caller's thread, an async worker thread included.
/// - **in the background**, by overriding [`submit`](Self::submit) to hand
///   the event to a writer of its own and return a pending [`Receipt`]
///   (the durable [`AuditLog`](crate::audit::AuditLog) does: a writer
///   thread, one fsync per group of entries). The keyring awaits the
///   receipt, so a key use still waits for its event to be recorded, but
///   without holding the thread it runs on.
///
/// Returning an error (or a receipt answered with one) marks the event as
/// not recorded; a keyring configured to fail closed (the default) then
/// refuses the operation.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// Records one event, inline. A background sink blocks here until the
    /// event is recorded (for code that is not async).
    fn record(&self, event: &Event) -> Result<(), SinkError>;

    /// Hands one event to the sink and returns a [`Receipt`] that resolves
    /// once it is recorded. The keyring calls this and awaits the receipt.
    /// The default records inline ([`record`](Self::record)) and returns
    /// the answer at once, so existing sinks keep working unchanged.
    fn submit(&self, event: &Event) -> Receipt {
        Receipt::ready(self.record(event))
    }
}

/// A sink could not record an event.
#[derive(Debug, thiserror::Error)]
#[error("event sink failed: {0}")]
pub struct SinkError(pub String);

/// A sink that drops every event: the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSink;

impl EventSink for NoopSink {
    fn record(&self, _event: &Event) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A sink that keeps every event in memory, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<Event>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Removes and returns the events recorded so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl EventSink for MemorySink {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
        Ok(())
    }
}

/// Sends every event to several sinks; fails if any fails.
#[derive(Debug)]
pub struct FanOut(pub Vec<std::sync::Arc<dyn EventSink>>);

impl EventSink for FanOut {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        let mut first_err = None;
        for s in &self.0 {
            if let Err(e) = s.record(event) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Submits to every sink; the receipt resolves once all have
    /// answered, with the first error in sink order.
    fn submit(&self, event: &Event) -> Receipt {
        Receipt::all(self.0.iter().map(|s| s.submit(event)).collect())
    }
}
