//! Aggregated cache-hit events ([`CacheHitEvents::Aggregated`]): the uses
//! of one cached data key by one caller, counted in memory and recorded as
//! one event per bounded interval.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use super::{CacheHitEvents, Event, EventSink, Operation, Outcome, Receipt, SinkError, Uses};

/// The shortest flush interval: a shorter one is raised to it.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The most aggregates held at once: one more flushes them all at once.
const MAX_OPEN: usize = 10_000;

/// What one aggregate is: the event's fields but its times, and the data
/// key it counts (a hash of its message header).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    dek: u64,
    operation: Operation,
    provider: String,
    key_ref: Option<String>,
    key_version: Option<u32>,
    actor: Option<String>,
    purpose: Option<String>,
    context_fingerprint: Option<String>,
}

/// The uses counted so far.
struct Span {
    count: u64,
    first: SystemTime,
    last: SystemTime,
}

/// Counts cache hits and records them, per data key and caller, at most
/// one interval after the first use counted (and on
/// [`flush`](Self::flush) and drop).
pub(crate) struct HitAggregator {
    sink: Arc<dyn EventSink>,
    fail_closed: bool,
    /// The keyring's count of events lost while failing open.
    dropped: Arc<AtomicU64>,
    open: Mutex<HashMap<Key, Span>>,
    /// Why a flush failed, while failing closed: every later hit is
    /// refused.
    failed: Arc<Mutex<Option<String>>>,
    /// Set on drop: stops the flusher thread.
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl std::fmt::Debug for HitAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HitAggregator")
            .field("open", &lock(&self.open).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The data-key identity of an aggregate: a hash of the message header the
/// cached key belongs to (one header per data key).
pub(crate) fn dek_id(header: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    header.hash(&mut h);
    h.finish()
}

impl HitAggregator {
    /// An aggregator for `config`, or `None` for one event per use. Starts
    /// the thread that flushes every interval.
    pub(crate) fn new(
        config: CacheHitEvents,
        sink: Arc<dyn EventSink>,
        fail_closed: bool,
        dropped: Arc<AtomicU64>,
    ) -> std::io::Result<Option<Arc<HitAggregator>>> {
        let interval = match config {
            CacheHitEvents::EachUse => return Ok(None),
            CacheHitEvents::Aggregated { flush_every } => flush_every.max(MIN_INTERVAL),
        };
        let agg = Arc::new(HitAggregator {
            sink,
            fail_closed,
            dropped,
            open: Mutex::new(HashMap::new()),
            failed: Arc::new(Mutex::new(None)),
            stop: Arc::new((Mutex::new(false), Condvar::new())),
        });
        let weak: Weak<HitAggregator> = Arc::downgrade(&agg);
        let stop = agg.stop.clone();
        std::thread::Builder::new()
            .name("phi-envelope-hits".into())
            .spawn(move || loop {
                {
                    let (stopped, cv) = &*stop;
                    let g = lock(stopped);
                    let (g, _) = cv
                        .wait_timeout(g, interval)
                        .unwrap_or_else(|p| p.into_inner());
                    if *g {
                        return;
                    }
                }
                match weak.upgrade() {
                    // The answer is handled by the flush itself.
                    Some(agg) => drop(agg.flush()),
                    None => return,
                }
            })?;
        Ok(Some(agg))
    }

    /// Counts one use (`event` is what one event per use would record);
    /// `Err` when an earlier flush failed and the keyring fails closed.
    pub(crate) fn add(&self, event: Event, dek: u64) -> Result<(), SinkError> {
        if let Some(why) = &*lock(&self.failed) {
            return Err(SinkError(format!(
                "aggregated cache-hit events could not be recorded ({why}); cache hits are refused"
            )));
        }
        let key = Key {
            dek,
            operation: event.operation,
            provider: event.provider,
            key_ref: event.key_ref,
            key_version: event.key_version,
            actor: event.actor,
            purpose: event.purpose,
            context_fingerprint: event.context_fingerprint,
        };
        let at = event.timestamp;
        let full = {
            let mut open = lock(&self.open);
            let span = open.entry(key).or_insert(Span {
                count: 0,
                first: at,
                last: at,
            });
            span.count += 1;
            span.last = span.last.max(at);
            open.len() > MAX_OPEN
        };
        if full {
            drop(self.flush());
        }
        Ok(())
    }

    /// Records every aggregate now, one event each, and empties them; the
    /// receipt answers once all are recorded. A failure refuses every
    /// later hit (failing closed) or is counted (failing open) whether or
    /// not the receipt is awaited.
    pub(crate) fn flush(&self) -> Receipt {
        let taken: Vec<(Key, Span)> = lock(&self.open).drain().collect();
        if taken.is_empty() {
            return Receipt::ready(Ok(()));
        }
        let now = SystemTime::now();
        let receipts = taken
            .into_iter()
            .map(|(k, span)| {
                let event = Event {
                    timestamp: now,
                    operation: k.operation,
                    provider: k.provider,
                    key_ref: k.key_ref,
                    key_version: k.key_version,
                    key_state: None,
                    approvers: Vec::new(),
                    uses: Some(Uses {
                        count: span.count,
                        first: span.first,
                        last: span.last,
                    }),
                    actor: k.actor,
                    purpose: k.purpose,
                    context_fingerprint: k.context_fingerprint,
                    outcome: Outcome::Success,
                    duration: Duration::ZERO,
                };
                // Each answer is handled here, awaited or not.
                let (receipt, done) = Receipt::pending();
                let (failed, dropped, fail_closed) =
                    (self.failed.clone(), self.dropped.clone(), self.fail_closed);
                self.sink.submit(&event).on_complete(move |result| {
                    if let Err(e) = &result {
                        if fail_closed {
                            lock(&failed).get_or_insert_with(|| e.0.clone());
                        } else {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.complete(result);
                });
                receipt
            })
            .collect();
        Receipt::all(receipts)
    }
}

impl Drop for HitAggregator {
    fn drop(&mut self) {
        let (stopped, cv) = &*self.stop;
        *lock(stopped) = true;
        cv.notify_all();
        // Handed to the sink; a background sink still writes them.
        drop(self.flush());
    }
}
