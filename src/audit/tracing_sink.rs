//! An event sink that emits `tracing` events (feature `tracing`).

use crate::events::{Event, EventSink, Outcome, SinkError};

use crate::json::{duration_us, format_timestamp};

/// Emits one `tracing` event per key-access [`Event`], with target
/// `phi_envelope::audit` and structured fields `timestamp`, `operation`,
/// `provider`, `key_ref`, `key_version`, `key_state`, `approvers`, `uses`,
/// `first_use`, `last_use`, `actor`, `purpose`,
/// `context_fingerprint`, `outcome` and `duration_us` (absent values are
/// left out). Successes are logged at `INFO`, denials, rejections and
/// failures at `WARN`.
///
/// It never fails: whether the subscriber keeps the event is the
/// subscriber's business. For an audit trail that must not lose entries,
/// use [`AuditLog`](super::AuditLog) (both at once with
/// [`FanOut`](crate::events::FanOut)).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingSink;

impl TracingSink {
    /// The sink.
    pub fn new() -> TracingSink {
        TracingSink
    }
}

macro_rules! emit {
    ($level:expr, $e:expr, $ts:expr, $outcome:expr) => {
        tracing::event!(
            target: "phi_envelope::audit",
            $level,
            timestamp = %$ts,
            operation = $e.operation.as_str(),
            provider = %$e.provider,
            key_ref = $e.key_ref.as_deref(),
            key_version = $e.key_version,
            key_state = $e.key_state.map(|s| s.as_str()),
            approvers = ?$e.approvers,
            uses = $e.uses.map(|u| u.count),
            first_use = $e.uses.map(|u| format_timestamp(u.first)).as_deref(),
            last_use = $e.uses.map(|u| format_timestamp(u.last)).as_deref(),
            actor = $e.actor.as_deref(),
            purpose = $e.purpose.as_deref(),
            context_fingerprint = $e.context_fingerprint.as_deref(),
            outcome = %$outcome,
            duration_us = duration_us($e.duration),
            "key access"
        )
    };
}

impl EventSink for TracingSink {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        let ts = format_timestamp(event.timestamp);
        let outcome = event.outcome.as_string();
        if event.outcome == Outcome::Success {
            emit!(tracing::Level::INFO, event, ts, outcome);
        } else {
            emit!(tracing::Level::WARN, event, ts, outcome);
        }
        Ok(())
    }
}
