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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::audit::line::{self, Body};
use crate::events::{Event, EventSink, Outcome, SinkError};
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

/// The uses an event stands for: how many, the first's time and the
/// last's (an aggregated event's `uses`, else one at its timestamp).
fn uses_of(e: &Event) -> (u64, SystemTime, SystemTime) {
    match &e.uses {
        Some(u) => (u.count.max(1), u.first.min(u.last), u.last.max(u.first)),
        None => (1, e.timestamp, e.timestamp),
    }
}

/// For an aggregated event, what it stands for (appended to messages).
fn aggregated(e: &Event) -> String {
    match &e.uses {
        Some(u) => format!(
            " ({} cache hits from {} to {}, recorded as one event)",
            u.count,
            format_timestamp(u.first),
            format_timestamp(u.last)
        ),
        None => String::new(),
    }
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
            let (_, first, _) = uses_of(e);
            return Some(Alert::new(
                "new-actor",
                format!(
                    "{} used {} for the first time{}",
                    who(e),
                    key(e),
                    aggregated(e)
                ),
                e,
                first,
            ));
        }
        None
    }
}

/// Uses at points in time, sorted, for the rules that count within a
/// window. Points older than two windows before the newest are dropped.
#[derive(Debug, Default)]
struct Window {
    points: VecDeque<(SystemTime, u64)>,
}

impl Window {
    /// Adds `n` uses at `t` (in time order, wherever `t` falls).
    fn add(&mut self, t: SystemTime, n: u64) {
        let i = self.points.partition_point(|(p, _)| *p <= t);
        self.points.insert(i, (t, n));
    }

    /// The most uses within one `window` (from a point, up to but not
    /// including `window` after it) that contains `t`.
    fn densest_around(&self, t: SystemTime, window: Duration) -> u64 {
        let within = |a: SystemTime, b: SystemTime| b.duration_since(a).is_ok_and(|d| d < window);
        let p = &self.points;
        // Points at or before `t - window` start no window that holds `t`.
        let from = t
            .checked_sub(window)
            .map_or(0, |edge| p.partition_point(|(q, _)| *q <= edge));
        let (mut best, mut sum, mut end) = (0u64, 0u64, from);
        for i in from..p.len() {
            let start = p[i].0;
            if start > t {
                break;
            }
            if !within(start, t) {
                continue;
            }
            if end < i {
                end = i;
                sum = 0;
            }
            while end < p.len() && within(start, p[end].0) {
                sum = sum.saturating_add(p[end].1);
                end += 1;
            }
            best = best.max(sum);
            if end > i {
                sum -= p[i].1;
            }
        }
        best
    }

    /// Drops the points older than two windows before the newest.
    fn prune(&mut self, window: Duration) {
        let Some(&(newest, _)) = self.points.back() else {
            return;
        };
        let keep = window.saturating_mul(2);
        while let Some(&(t, _)) = self.points.front() {
            match newest.duration_since(t) {
                Ok(d) if d >= keep => {
                    self.points.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Adds an event's uses (the first at its first time, the others at
    /// its last) and returns the most within one `window` around them.
    fn push(&mut self, e: &Event, window: Duration) -> u64 {
        let (n, first, last) = uses_of(e);
        self.add(first, 1);
        if n > 1 {
            self.add(last, n - 1);
        }
        let most = self
            .densest_around(first, window)
            .max(self.densest_around(last, window));
        self.prune(window);
        most
    }
}

/// `actor-rate`: an actor with more than `max` key accesses within
/// `window` (alerts at each event past the bound). An aggregated event
/// counts as its uses (see the
/// [module documentation](self#aggregated-cache-hit-events)).
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
            .push(e, self.window);
        (n > self.max as u64).then(|| {
            Alert::new(
                "actor-rate",
                format!(
                    "{} made {n} key accesses within {:?} (bound {}){}",
                    who(e),
                    self.window,
                    self.max,
                    aggregated(e)
                ),
                e,
                uses_of(e).2,
            )
        })
    }
}

/// `outside-hours`: an event whose UTC hour is not in `start..end` (a range
/// that may wrap midnight: 22..6 allows the night). An aggregated event
/// alerts if any instant of its span is outside (see the
/// [module documentation](self#aggregated-cache-hit-events)).
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

impl OutsideHours {
    fn allows(&self, hour: u8) -> bool {
        if self.start <= self.end {
            (self.start..self.end).contains(&hour)
        } else {
            hour >= self.start || hour < self.end
        }
    }

    /// The first instant from `first` to `last` outside the allowed hours,
    /// and its UTC hour.
    fn first_outside(&self, first: SystemTime, last: SystemTime) -> Option<(SystemTime, u8)> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let (from, to) = (secs(first), secs(last));
        let mut bucket = from - from % 3600;
        // A day of hours covers every hour a longer span could reach.
        for _ in 0..=25 {
            if bucket > to {
                break;
            }
            let hour = ((bucket / 3600) % 24) as u8;
            if !self.allows(hour) {
                let at = if bucket <= from {
                    first
                } else {
                    SystemTime::UNIX_EPOCH + Duration::from_secs(bucket)
                };
                return Some((at, hour));
            }
            bucket += 3600;
        }
        None
    }
}

impl Rule for OutsideHours {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        let (_, first, last) = uses_of(e);
        let (at, hour) = self.first_outside(first, last)?;
        Some(Alert::new(
            "outside-hours",
            format!(
                "{} used {} at {hour:02}h UTC, outside {:02}-{:02}h{}",
                who(e),
                key(e),
                self.start,
                self.end,
                aggregated(e)
            ),
            e,
            at,
        ))
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
        let n = self.recent.push(e, self.window);
        (n > self.max as u64).then(|| {
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
                e.timestamp,
            )
        })
    }
}

/// `key-management`: any create-key, rotate, set-state, destroy or
/// set-policy ([`Operation::is_key_management`](crate::events::Operation::is_key_management)),
/// whatever its outcome: a refused or failed attempt alerts too.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyManagement;

impl Rule for KeyManagement {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        e.operation.is_key_management().then(|| {
            let target = match &e.key_ref {
                Some(k) => format!(" of {k}"),
                None => String::new(),
            };
            Alert::new(
                "key-management",
                format!(
                    "{} asked for {}{target} ({})",
                    who(e),
                    e.operation.as_str(),
                    e.outcome.as_string()
                ),
                e,
                e.timestamp,
            )
        })
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
