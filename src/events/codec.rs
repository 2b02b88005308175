//! The canonical JSON encoding of an [`Event`] (the schema is in the
//! [module documentation](super#json-schema)): events own it, and the audit
//! log embeds it as the `event` member of its lines.

use std::time::Duration;

use serde_json::Value;

use super::{Event, Operation, Outcome, Uses};
use crate::json::{
    duration_us, format_timestamp, opt_str, opt_u64, parse_timestamp, push_key, push_opt_str,
    push_str, req_str,
};
use crate::provider::KeyState;

/// Appends the canonical JSON object of `event`.
pub(crate) fn push_event(out: &mut String, e: &Event) {
    out.push('{');
    push_key(out, "timestamp", true);
    push_str(out, &format_timestamp(e.timestamp));
    push_key(out, "operation", false);
    push_str(out, e.operation.as_str());
    push_key(out, "provider", false);
    push_str(out, &e.provider);
    push_key(out, "key_ref", false);
    push_opt_str(out, e.key_ref.as_deref());
    push_key(out, "key_version", false);
    match e.key_version {
        Some(v) => out.push_str(&v.to_string()),
        None => out.push_str("null"),
    }
    // Only when present: lines without it keep their old encoding.
    if let Some(state) = e.key_state {
        push_key(out, "key_state", false);
        push_str(out, state.as_str());
    }
    // Likewise only when there are approvers (dual control).
    if !e.approvers.is_empty() {
        push_key(out, "approvers", false);
        out.push('[');
        for (i, a) in e.approvers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_str(out, a);
        }
        out.push(']');
    }
    // Likewise only in an aggregated cache-hit event.
    if let Some(uses) = &e.uses {
        push_key(out, "uses", false);
        out.push_str(&uses.count.to_string());
        push_key(out, "first_use", false);
        push_str(out, &format_timestamp(uses.first));
        push_key(out, "last_use", false);
        push_str(out, &format_timestamp(uses.last));
    }
    push_key(out, "actor", false);
    push_opt_str(out, e.actor.as_deref());
    push_key(out, "purpose", false);
    push_opt_str(out, e.purpose.as_deref());
    push_key(out, "context_fingerprint", false);
    push_opt_str(out, e.context_fingerprint.as_deref());
    push_key(out, "outcome", false);
    push_str(out, &e.outcome.as_string());
    push_key(out, "duration_us", false);
    out.push_str(&duration_us(e.duration).to_string());
    out.push('}');
}

/// Reads an event from a parsed JSON object. Unknown fields are ignored
/// (the audit-log verifier rejects them separately, by re-encoding).
pub(crate) fn event_from_value(v: &Value) -> Result<Event, String> {
    let obj = v.as_object().ok_or("an event must be a JSON object")?;
    let timestamp = req_str(obj, "timestamp")?;
    let timestamp = parse_timestamp(timestamp).ok_or_else(|| {
        "timestamp is not RFC 3339 UTC with microseconds (YYYY-MM-DDTHH:MM:SS.ffffffZ)".to_owned()
    })?;
    let op = req_str(obj, "operation")?;
    let operation = op
        .parse::<Operation>()
        .map_err(|_| format!("unknown operation {op:?}"))?;
    let provider = req_str(obj, "provider")?.to_owned();
    let key_ref = opt_str(obj, "key_ref")?;
    let key_version = match opt_u64(obj, "key_version")? {
        Some(v) => Some(u32::try_from(v).map_err(|_| "key_version exceeds u32")?),
        None => None,
    };
    let key_state = match obj.get("key_state") {
        None => None,
        Some(Value::String(s)) => {
            Some(parse_key_state(s).ok_or_else(|| format!("unknown key_state {s:?}"))?)
        }
        Some(_) => return Err("field \"key_state\" must be a string when present".into()),
    };
    let approvers = match obj.get("approvers") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .ok_or("field \"approvers\" must be an array of strings")?,
        Some(_) => return Err("field \"approvers\" must be an array when present".into()),
    };
    let uses = match (obj.get("uses"), obj.get("first_use"), obj.get("last_use")) {
        (None, None, None) => None,
        (Some(_), Some(_), Some(_)) => {
            let count = opt_u64(obj, "uses")?
                .filter(|&n| n >= 1)
                .ok_or("field \"uses\" must be an integer of at least 1")?;
            let time = |key: &str| {
                parse_timestamp(req_str(obj, key)?).ok_or_else(|| {
                    format!(
                        "{key} is not RFC 3339 UTC with microseconds (YYYY-MM-DDTHH:MM:SS.ffffffZ)"
                    )
                })
            };
            let (first, last) = (time("first_use")?, time("last_use")?);
            if last < first {
                return Err("last_use is before first_use".into());
            }
            Some(Uses { count, first, last })
        }
        _ => return Err("fields \"uses\", \"first_use\" and \"last_use\" go together".into()),
    };
    let actor = opt_str(obj, "actor")?;
    let purpose = opt_str(obj, "purpose")?;
    let context_fingerprint = opt_str(obj, "context_fingerprint")?;
    let outcome = req_str(obj, "outcome")?;
    let outcome = Outcome::parse(outcome).ok_or_else(|| format!("unknown outcome {outcome:?}"))?;
    let duration =
        Duration::from_micros(opt_u64(obj, "duration_us")?.ok_or("missing field \"duration_us\"")?);
    Ok(Event {
        timestamp,
        operation,
        provider,
        key_ref,
        key_version,
        key_state,
        approvers,
        uses,
        actor,
        purpose,
        context_fingerprint,
        outcome,
        duration,
    })
}

/// The state named by [`KeyState::as_str`].
fn parse_key_state(s: &str) -> Option<KeyState> {
    [
        KeyState::Enabled,
        KeyState::DecryptOnly,
        KeyState::Disabled,
        KeyState::Destroyed,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}
