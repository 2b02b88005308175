//! The shipped rules ([`NewActor`], [`ActorRate`], [`OutsideHours`],
//! [`DenialBurst`], [`KeyManagement`]), the [`Rule`] trait they implement,
//! and the windows the counting rules keep. How each judges an aggregated
//! event is in the [module documentation](super#aggregated-cache-hit-events).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, SystemTime};

use super::Alert;
use crate::events::{Event, Outcome};
use crate::json::format_timestamp;

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
pub(super) fn uses_of(e: &Event) -> (u64, SystemTime, SystemTime) {
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
/// [module documentation](super#aggregated-cache-hit-events)).
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
/// [module documentation](super#aggregated-cache-hit-events)).
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
