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
//! | [`KeyManagement`] (`key-management`) | any create-key, rotate, set-state (disable, enable, decrypt-only), destroy or policy change (`set-policy`, [`Keyring::replace_policy`](crate::Keyring::replace_policy)) |
//!
//! Rules read the events' own times, never the clock, so a trail can be
//! replayed through them ([`Monitor::replay`], [`Monitor::replay_log`], and
//! for the PostgreSQL trail `audit::postgres::replay`).
//!
//! # Aggregated cache-hit events
//!
//! An aggregated event ([`CacheHitEvents::Aggregated`](crate::events::CacheHitEvents::Aggregated))
//! stands for `uses` cache hits between `first_use` and `last_use`, and is
//! recorded (its `timestamp`) when it is flushed, later. The rules count it
//! as its uses and judge it by their times, never by the flush:
//!
//! - [`NewActor`]: the pair is new at the first use (the alert's
//!   [`time`](Alert::time) is `first_use`).
//! - [`ActorRate`]: the event counts as `uses` accesses, the first at
//!   `first_use` and all the others at `last_use`: the densest the hits can
//!   have been, so a burst inside the span is never missed. The price: a
//!   span longer than the window whose hits were in fact spread out can
//!   alert where single events would not have (an alert rather than a
//!   miss). Events that arrive late (an aggregate flushed after later
//!   single events) are judged in the windows of their uses' times.
//! - [`OutsideHours`]: the event alerts if any instant from `first_use` to
//!   `last_use` is outside the allowed hours: the hits between the two ends
//!   are not known, so a span that straddles the end of the allowed hours,
//!   or a night, alerts even if both ends are inside (an alert rather than
//!   a miss). The alert's time is the first instant outside.
//!
//! Denials are never aggregated (each is an event of its own), so
//! [`DenialBurst`] counts events; [`KeyManagement`] sees no cache hits.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::audit::line::{self, Body};
use crate::events::{Event, EventSink, SinkError};
use crate::json::{format_timestamp, push_key, push_str};

mod rules;

pub use rules::{ActorRate, DenialBurst, KeyManagement, NewActor, OutsideHours, Rule};

use rules::uses_of;

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
    /// When what the alert is about happened: the event's `timestamp`, or
    /// for an aggregated event the time of the uses the rule judged (see
    /// the [module documentation](self#aggregated-cache-hit-events)).
    pub time: SystemTime,
}

impl Alert {
    fn new(rule: &'static str, message: String, event: &Event, time: SystemTime) -> Alert {
        Alert {
            rule,
            message,
            event: event.clone(),
            time,
        }
    }

    /// One JSON object: `{"rule":…,"message":…,"time":…,"event":{…}}`:
    /// `time` is [`Alert::time`] (RFC 3339 UTC with microseconds), `event`
    /// the event in the [event schema](crate::events#json-schema).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(512);
        out.push('{');
        push_key(&mut out, "rule", true);
        push_str(&mut out, self.rule);
        push_key(&mut out, "message", false);
        push_str(&mut out, &self.message);
        push_key(&mut out, "time", false);
        push_str(&mut out, &format_timestamp(self.time));
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
pub struct JsonLinesAlerts {
    file: Mutex<File>,
    failed: std::sync::atomic::AtomicU64,
}

impl JsonLinesAlerts {
    /// Opens (creating it, mode 0600 on Unix) the file at `path` for
    /// appending. It must be a regular file: a symbolic link is not
    /// followed, and a FIFO or a device is refused rather than waited on
    /// (an alert must never hold up a key use).
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<JsonLinesAlerts> {
        let not_regular = || std::io::Error::other("an alerts file must be a regular file");
        if let Ok(m) = std::fs::symlink_metadata(path.as_ref()) {
            if !m.is_file() {
                return Err(not_regular());
            }
        }
        let mut o = OpenOptions::new();
        o.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600).custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            );
        }
        let file = o.open(path)?;
        if !file.metadata()?.is_file() {
            return Err(not_regular());
        }
        Ok(JsonLinesAlerts {
            file: Mutex::new(file),
            failed: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many alerts could not be written.
    pub fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AlertSink for JsonLinesAlerts {
    fn alert(&self, alert: &Alert) {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if writeln!(f, "{}", alert.to_json())
            .and_then(|()| f.flush())
            .is_err()
        {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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

/// Rules over the event stream, raising alerts into a sink. An
/// [`EventSink`] that never refuses.
pub struct Monitor {
    rules: Mutex<Vec<Box<dyn Rule>>>,
    alerts: std::sync::Arc<dyn AlertSink>,
    /// Events whose uses all ended before this teach the rules only.
    from: Option<SystemTime>,
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
            from: None,
        }
    }

    /// Alerts only about events whose last use is at or after `t`: the
    /// events before it still go through every rule, silently, so that
    /// the rules know them (the pairs [`NewActor`] has seen, the accesses
    /// within a window that reaches past `t`). For a replay of a whole
    /// trail that alerts about the last day only.
    pub fn alert_from(mut self, t: SystemTime) -> Monitor {
        self.from = Some(t);
        self
    }

    /// Adds a rule.
    pub fn rule(self, rule: impl Rule + 'static) -> Monitor {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(rule));
        self
    }

    /// Runs one event through every rule; returns how many alerts it raised
    /// (none for an event before [`alert_from`](Self::alert_from)).
    pub fn observe(&self, event: &Event) -> usize {
        let quiet = self.from.is_some_and(|from| uses_of(event).2 < from);
        let mut raised = 0;
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for r in rules.iter_mut() {
            if let Some(a) = r.check(event) {
                if !quiet {
                    self.alerts.alert(&a);
                    raised += 1;
                }
            }
        }
        raised
    }

    /// Runs a recorded trail's events through the rules, in order.
    pub fn replay<'a>(&self, events: impl IntoIterator<Item = &'a Event>) -> usize {
        events.into_iter().map(|e| self.observe(e)).sum()
    }

    /// Runs the events of the file log whose first file is `path` (and its
    /// rotated files) through the rules, in order. Reads the lines as they
    /// are, like the [report](crate::audit::report): it does not verify
    /// the chain (verify first when the alerts are evidence).
    pub fn replay_log(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<ReplayStats, crate::audit::checkpoint::CheckpointError> {
        let mut stats = ReplayStats::default();
        for l in crate::audit::checkpoint::log_lines(path.as_ref())? {
            stats.add_line(self, &l);
        }
        Ok(stats)
    }
}

/// What a replay of a trail read ([`Monitor::replay_log`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayStats {
    /// Event lines run through the rules.
    pub events: u64,
    /// Alerts they raised.
    pub alerts: u64,
    /// Events the trail's `gap` lines say were lost (the rules never saw
    /// them).
    pub lost: u64,
    /// Lines that are not audit entries (skipped; verify says why).
    pub unreadable: u64,
}

impl ReplayStats {
    /// Runs one line of a trail (without its newline) through `monitor`.
    pub fn add_line(&mut self, monitor: &Monitor, raw: &[u8]) {
        match line::decode(raw) {
            Ok((l, _)) => match l.body {
                Body::Event(e) => {
                    self.events += 1;
                    self.alerts += monitor.observe(&e) as u64;
                }
                Body::Gap { lost, .. } => self.lost += lost,
                Body::Header(_) => {}
            },
            Err(_) => self.unreadable += 1,
        }
    }
}

impl EventSink for Monitor {
    fn record(&self, event: &Event) -> Result<(), SinkError> {
        self.observe(event);
        Ok(())
    }
}
