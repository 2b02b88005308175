//! The shipped rules ([`NewActor`], [`ActorRate`], [`OutsideHours`],
//! [`DenialBurst`], [`KeyManagement`]), the [`Rule`] trait they implement,
//! and the windows the counting rules keep. How each judges an aggregated
//! event is in the [module documentation](super#aggregated-cache-hit-events).

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// How many buckets one window is counted in.
const BUCKETS: u64 = 60;

/// Uses counted in time buckets of a sixtieth of the window (at least a
/// millisecond), for the rules that count within a window. The count
/// around a point reads at most `2 × BUCKETS + 1` buckets, whatever the
/// rate, and over-approximates a window by at most one bucket (an alert
/// rather than a miss). Buckets more than two windows before the event
/// being judged are dropped: an event dated far ahead (a forged line, a
/// clock that is wrong) stays in its own bucket and hides nothing.
#[derive(Debug, Default)]
struct Window {
    buckets: BTreeMap<u64, u64>,
}

/// Milliseconds since the epoch (0 before it).
fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Window {
    fn width(window: Duration) -> u64 {
        (u64::try_from(window.as_millis()).unwrap_or(u64::MAX) / BUCKETS).max(1)
    }

    /// Adds `n` uses at `t`.
    fn add(&mut self, t: SystemTime, n: u64, window: Duration) {
        let b = millis(t) / Self::width(window);
        let c = self.buckets.entry(b).or_insert(0);
        *c = c.saturating_add(n);
    }

    /// The most uses within one window (`BUCKETS + 1` consecutive buckets)
    /// that holds `t`.
    fn densest_around(&self, t: SystemTime, window: Duration) -> u64 {
        let c = millis(t) / Self::width(window);
        let lo = c.saturating_sub(BUCKETS);
        let hi = c.saturating_add(BUCKETS);
        let len = usize::try_from(hi - lo + 1).unwrap_or(0);
        let mut counts = vec![0u64; len];
        for (&b, &n) in self.buckets.range(lo..=hi) {
            counts[usize::try_from(b - lo).unwrap_or(0)] = n;
        }
        // Windows starting at lo..=c, each BUCKETS + 1 buckets long.
        let span = usize::try_from(BUCKETS + 1).unwrap_or(usize::MAX).min(len);
        let mut sum: u64 = counts[..span]
            .iter()
            .fold(0u64, |a, &n| a.saturating_add(n));
        let mut best = sum;
        let starts = usize::try_from(c - lo).unwrap_or(0);
        for s in 1..=starts {
            if s + span > len {
                break;
            }
            sum = sum
                .saturating_sub(counts[s - 1])
                .saturating_add(counts[s + span - 1]);
            best = best.max(sum);
        }
        best
    }

    /// Drops the buckets more than two windows before `t`.
    fn prune(&mut self, t: SystemTime, window: Duration) {
        let edge = (millis(t) / Self::width(window)).saturating_sub(2 * BUCKETS + 1);
        while let Some((&b, _)) = self.buckets.first_key_value() {
            if b >= edge {
                break;
            }
            self.buckets.pop_first();
        }
    }

    /// Nothing counted any more.
    fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Adds an event's uses (the first at its first time, the others at
    /// its last) and returns the most within one `window` around them.
    fn push(&mut self, e: &Event, window: Duration) -> u64 {
        let (n, first, last) = uses_of(e);
        self.add(first, 1, window);
        if n > 1 {
            self.add(last, n - 1, window);
        }
        let most = self
            .densest_around(first, window)
            .max(self.densest_around(last, window));
        self.prune(first, window);
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
    checked: u64,
}

/// How often (in events) [`ActorRate`] forgets the actors it has counted
/// nothing for within two windows of the event at hand.
const SWEEP_EVERY: u64 = 4096;

impl ActorRate {
    /// At most `max` events per actor within any `window`.
    pub fn new(max: usize, window: Duration) -> ActorRate {
        ActorRate {
            max,
            window,
            actors: HashMap::new(),
            checked: 0,
        }
    }
}

impl Rule for ActorRate {
    fn check(&mut self, e: &Event) -> Option<Alert> {
        self.checked += 1;
        if self.checked.is_multiple_of(SWEEP_EVERY) {
            let (_, first, _) = uses_of(e);
            let window = self.window;
            self.actors.retain(|_, w| {
                w.prune(first, window);
                !w.is_empty()
            });
        }
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
