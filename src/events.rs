//! Key-access events and the sinks that receive them.
//!
//! Every generate, wrap, unwrap, rotate, rewrap, state change, destroy,
//! policy denial, provider failure and cache use produces an [`Event`]. An
//! event names the operation, the provider, the key reference and version,
//! the caller's actor and purpose, a keyed fingerprint of the encryption
//! context, the outcome and the duration. It never carries key material,
//! plaintext or context values.
//!
//! Sinks are opt-in: a [`crate::Keyring`] without one uses [`NoopSink`].

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

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
        }
    }

    /// True for the verbs that manage keys rather than use them.
    pub fn is_key_management(self) -> bool {
        matches!(
            self,
            Operation::CreateKey
                | Operation::Rotate
                | Operation::SetState
                | Operation::Destroy
        )
    }

    /// True for the verbs that release a DEK for decryption.
    pub fn is_decryption(self) -> bool {
        matches!(self, Operation::Unwrap | Operation::CacheHitDecrypt)
    }
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

/// Receives events. Implementations must be fast and must not block for
/// long: they run inline, before the operation's result is returned.
///
/// Returning an error marks the event as not recorded; a keyring configured
/// to fail closed (the default) then refuses the operation.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// Records one event.
    fn record(&self, event: &Event) -> Result<(), SinkError>;
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
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
}
