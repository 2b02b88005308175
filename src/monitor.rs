//! Key-access monitoring: rules over the event stream that raise alerts.
//!
//! A [`Monitor`] is an [`EventSink`]: put it beside the audit trail
//! (`FanOut(vec![audit_log, monitor])`) and every event the keyring makes
//! goes through its [`Rule`]s; each alert goes to an [`AlertSink`] (a JSON
//! Lines file, [`JsonLinesAlerts`]; `tracing`, [`TracingAlerts`] with the
//! feature `tracing`; memory, [`MemoryAlerts`]). A monitor never refuses
//! an event: alerting is not the audit trail, and a rule cannot stop a key
//! use.
//!
//! Shipped rules, each named in its alerts' `rule`:
//!
//! | rule | fires on |
//! | --- | --- |
//! | [`NewActor`] (`new-actor`) | a key used by an actor never seen with that key (after what it was taught) |
//! | [`ActorRate`] (`actor-rate`) | an actor with more than `max` events within `window` |
//! | [`OutsideHours`] (`outside-hours`) | an event whose UTC hour is outside the allowed hours |
//! | [`DenialBurst`] (`denial-burst`) | more than `max` denied, rejected or failed events within `window` |
//! | [`KeyManagement`] (`key-management`) | any create-key, rotate, set-state (disable, enable, decrypt-only) or destroy |
//!
//! Rules read the events' own timestamps, never the clock, so a trail can
//! be replayed through them ([`Monitor::replay`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::events::{Event, EventSink, Operation, Outcome, SinkError};
use crate::json::{format_timestamp, push_key, push_str};

/// An alert raised by a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Alert {
    /// The rule's name (`new-actor`, `actor-rate`, ...).
    pub rule: &'static str,
    /// What happened, for a person.
    pub message: String,
    /// The event that raised it.
    pub event: Event,
}

impl Alert {
    fn new(rule: &'static str, message: String, event: &Event) -> Alert {
        Alert {
            rule,
            message,
            event: event.clone(),
        }
    }

    /// One JSON object: `{"rule":…,"message":…,"time":…,"event":{…}}`
    /// (the event in the event schema).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(512);
        out.push('{');
        push_key(&mut out, "rule", true);
        push_str(&mut out, self.rule);
        push_key(&mut out, "message", false);
        push_str(&mut out, &self.message);
        push_key(&mut out, "time", false);
        push_str(&mut out, &format_timestamp(self.event.timestamp));
        push_key(&mut out, "event", false);
        out.push_str(&self.event.to_json());
        out.push('}');
        out
    }
}

/// Where alerts go.
pub trait AlertSink: Send + Sync + fmt::Debug {
    /// Delivers one alert. Errors are the sink's to report; the monitor
    /// goes on.
    fn alert(&self, alert: &Alert);
}

/// Alerts kept in memory, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct MemoryAlerts(Mutex<Vec<Alert>>);

impl MemoryAlerts {
    /// An empty sink.
    pub fn new() -> MemoryAlerts {
        MemoryAlerts::default()
    }

    /// The alerts so far.
    pub fn alerts(&self) -> Vec<Alert> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl AlertSink for MemoryAlerts {
    fn alert(&self, alert: &Alert) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(alert.clone());
    }
}

/// Alerts appended to a JSON Lines file ([`Alert::to_json`], one per line,
/// flushed each).
#[derive(Debug)]
pub struct JsonLinesAlerts(Mutex<File>);

impl JsonLinesAlerts {
    /// Opens (creating it, mode 0600 on Unix) the file at `path` for
    /// appending.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<JsonLinesAlerts> {
        let mut o = OpenOptions::new();
        o.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        Ok(JsonLinesAlerts(Mutex::new(o.open(path)?)))
    }
}

impl AlertSink for JsonLinesAlerts {
    fn alert(&self, alert: &Alert) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{}", alert.to_json()).and_then(|()| f.flush());
    }
}

/// Alerts as `tracing` events (target `phi_envelope::alert`, level WARN).
#[cfg(feature = "tracing")]
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAlerts;

#[cfg(feature = "tracing")]
impl AlertSink for TracingAlerts {
    fn alert(&self, alert: &Alert) {
        tracing::warn!(
            target: "phi_envelope::alert",
            rule = alert.rule,
            message = %alert.message,
            operation = alert.event.operation.as_str(),
            key_ref = alert.event.key_ref.as_deref().unwrap_or(""),
            actor = alert.event.actor.as_deref().unwrap_or(""),
            "key-access alert"
        );
    }
}

/// A rule over the event stream.
pub trait Rule: Send + fmt::Debug {
    /// Looks at the next event; returns an alert if it should raise one.
    fn check(&mut self, event: &Event) -> Option<Alert>;
}

fn who(e: &Event) -> &str {
    e.actor.as_deref().unwrap_or("(no actor)")
}

fn key(e: &Event) -> &str {
    e.key_ref.as_deref().unwrap_or("(no key)")
}

/// `new-actor`: a key used by an actor not seen with it before. Teach it
/// the usual pairs first ([`learn`](Self::learn), e.g. from last month's
/// trail); every later new pair alerts once.
#[derive(Debug, Default)]
pub struct NewActor {
    seen: BTreeSet<(String, String)>,
}

impl NewActor {
    /// A rule that knows no pair yet.
    pub fn new() -> NewActor {
        NewActor::default()
    }

    /// Learns the (key, actor) pairs of `events` without alerting.
    pub fn learn<'a>(mut self, events: impl IntoIterator<Item = &'a Event>) -> NewActor {
        for e in events {
            self.seen.insert((key(e).to_owned(), who(e).to_owned()));
        }
        self
    }
}

impl Rule for NewActor {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        e.key_ref.as_ref()?;
        if self.seen.insert((key(e).to_owned(), who(e).to_owned())) {
            return Some(Alert::new(
                "new-actor",
                format!("{} used {} for the first time", who(e), key(e)),
                e,
            ));
        }
        None
    }
}

/// Events per `window` ending at each event, kept as timestamps.
#[derive(Debug, Default)]
struct Window {
    times: VecDeque<SystemTime>,
}

impl Window {
    fn push(&mut self, t: SystemTime, window: Duration) -> usize {
        self.times.push_back(t);
        while let Some(first) = self.times.front() {
            match t.duration_since(*first) {
                Ok(d) if d >= window => {
                    self.times.pop_front();
                }
                _ => break,
            }
        }
        self.times.len()
    }
}

/// `actor-rate`: an actor with more than `max` events within `window`
/// (alerts at each event past the bound).
#[derive(Debug)]
pub struct ActorRate {
    max: usize,
    window: Duration,
    actors: HashMap<String, Window>,
}

impl ActorRate {
    /// At most `max` events per actor within any `window`.
    pub fn new(max: usize, window: Duration) -> ActorRate {
        ActorRate {
            max,
            window,
            actors: HashMap::new(),
        }
    }
}

impl Rule for ActorRate {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        let n = self
            .actors
            .entry(who(e).to_owned())
            .or_default()
            .push(e.timestamp, self.window);
        (n > self.max).then(|| {
            Alert::new(
                "actor-rate",
                format!(
                    "{} made {n} key accesses within {:?} (bound {})",
                    who(e),
                    self.window,
                    self.max
                ),
                e,
            )
        })
    }
}

/// `outside-hours`: an event whose UTC hour is not in `start..end` (a range
/// that may wrap midnight: 22..6 allows the night).
#[derive(Debug, Clone, Copy)]
pub struct OutsideHours {
    start: u8,
    end: u8,
}

impl OutsideHours {
    /// Allowed UTC hours `start..end` (0-24; `start == end` allows none).
    pub fn new(start: u8, end: u8) -> OutsideHours {
        OutsideHours {
            start: start.min(24),
            end: end.min(24),
        }
    }
}

impl Rule for OutsideHours {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        let secs = e
            .timestamp
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let hour = ((secs / 3600) % 24) as u8;
        let allowed = if self.start <= self.end {
            (self.start..self.end).contains(&hour)
        } else {
            hour >= self.start || hour < self.end
        };
        (!allowed).then(|| {
            Alert::new(
                "outside-hours",
                format!(
                    "{} used {} at {hour:02}h UTC, outside {:02}-{:02}h",
                    who(e),
                    key(e),
                    self.start,
                    self.end
                ),
                e,
            )
        })
    }
}

/// `denial-burst`: more than `max` denied, rejected or failed events (a
/// policy denial, an unwrap the provider rejected) within `window`, across
/// all actors.
#[derive(Debug)]
pub struct DenialBurst {
    max: usize,
    window: Duration,
    recent: Window,
}

impl DenialBurst {
    /// At most `max` refusals within any `window`.
    pub fn new(max: usize, window: Duration) -> DenialBurst {
        DenialBurst {
            max,
            window,
            recent: Window::default(),
        }
    }
}

impl Rule for DenialBurst {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        if matches!(e.outcome, Outcome::Success) {
            return None;
        }
        let n = self.recent.push(e.timestamp, self.window);
        (n > self.max).then(|| {
            Alert::new(
                "denial-burst",
                format!(
                    "{n} refused key accesses within {:?} (bound {}), the last by {} on {}: {}",
                    self.window,
                    self.max,
                    who(e),
                    key(e),
                    e.outcome.as_string()
                ),
                e,
            )
        })
    }
}

/// `key-management`: any create-key, rotate, set-state or destroy,
/// whatever its outcome.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyManagement;

impl Rule for KeyManagement {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        matches!(
            e.operation,
            Operation::CreateKey | Operation::Rotate | Operation::SetState | Operation::Destroy
        )
        .then(|| {
            Alert::new(
                "key-management",
                format!(
                    "{} asked for {} of {} ({})",
                    who(e),
                    e.operation.as_str(),
                    key(e),
                    e.outcome.as_string()
                ),
                e,
            )
        })
    }
}

/// Rules over the event stream, raising alerts into a sink. An
/// [`EventSink`] that never refuses.
pub struct Monitor {
    rules: Mutex<Vec<Box<dyn Rule>>>,
    alerts: std::sync::Arc<dyn AlertSink>,
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor")
            .field("alerts", &self.alerts)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// A monitor with no rule yet, alerting into `alerts`.
    pub fn new(alerts: std::sync::Arc<dyn AlertSink>) -> Monitor {
        Monitor {
            rules: Mutex::new(Vec::new()),
            alerts,
        }
    }

    /// Adds a rule.
    pub fn rule(self, rule: impl Rule + 'static) -> Monitor {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(rule));
        self
    }

    /// Runs one event through every rule; returns how many alerts it raised.
    pub fn observe(&self, event: &Event) -> usize {
        let mut raised = 0;
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for r in rules.iter_mut() {
            if let Some(a) = r.check(event) {
                self.alerts.alert(&a);
                raised += 1;
            }
        }
        raised
    }

    /// Runs a recorded trail's events through the rules, in order.
    pub fn replay<'a>(&self, events: impl IntoIterator<Item = &'a Event>) -> usize {
        events.into_iter().map(|e| self.observe(e)).sum()
    }
}

impl EventSink for Monitor {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        self.observe(event);
        Ok(())
    }
}
