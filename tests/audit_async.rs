//! The durable audit log under async load: key uses await their event's
//! durability without holding a runtime thread, so a `current_thread`
//! runtime keeps running while the log is stalled; entries queued by many
//! tasks share one fsync (group commit).

mod conformance;

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use conformance::{ctx, MemoryKms};
use phi_envelope::audit::{AuditKey, AuditLog, FsyncPolicy, Verifier};
use phi_envelope::cache::CacheConfig;
use phi_envelope::events::{
    CacheHitEvents, Event, EventSink, MemorySink, Operation, Outcome, Receipt, SinkError, Uses,
};
use phi_envelope::{Envelope, Error, Keyring};

fn key() -> AuditKey {
    AuditKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

const SEALERS: usize = 64;

/// Generous: only a hang reaches it.
const HANG: Duration = Duration::from_secs(120);

/// 64 tasks seal on a `current_thread` runtime with the durable log on,
/// while the test holds the log's lock (as another process appending
/// would): no event can be written until the lock is released, and only
/// a task of the same runtime, the ticker, releases it. If an event's I/O
/// ran on the runtime's one thread, the first sealer would block in the
/// lock, the ticker would never run again, and the runtime would hang.
#[test]
fn a_current_thread_runtime_keeps_running_while_the_audit_log_is_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(key())
            .fsync(FsyncPolicy::EveryEntry)
            .open(&path)
            .unwrap(),
    );
    let kms = Arc::new(MemoryKms::new("kms"));
    let records = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(records)
            .event_sink(log.clone())
            .build()
            .unwrap(),
    )
    .as_caller("lab-service", "treatment");

    // Another holder of the log's lock.
    let holder = File::open(&path).unwrap();
    holder.lock().unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let runtime_kms = kms.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let order = rt.block_on(async move {
            let order = Arc::new(Mutex::new(Vec::<String>::new()));
            let env = Arc::new(env);
            let mut sealers = Vec::new();
            for i in 0..SEALERS {
                let (env, order) = (env.clone(), order.clone());
                sealers.push(tokio::spawn(async move {
                    let c = ctx(&i.to_string());
                    let sealed = env.seal(format!("potassium {i}").as_bytes(), &c).await;
                    order.lock().unwrap().push(format!("sealed {i}"));
                    sealed.unwrap()
                }));
            }
            let ticker_order = order.clone();
            let ticker = tokio::spawn(async move {
                // Tick until every sealer has reached its provider call
                // (each then waits for its event), and at least 100 times.
                let mut ticks = 0u64;
                while ticks < 100 || runtime_kms.calls.load(Ordering::SeqCst) < SEALERS {
                    tokio::task::yield_now().await;
                    ticks += 1;
                    assert!(ticks < 10_000_000, "the sealers made no progress");
                }
                ticker_order
                    .lock()
                    .unwrap()
                    .push(format!("released after {ticks} ticks"));
                holder.unlock().unwrap();
                ticks
            });
            let ticks = ticker.await.unwrap();
            for s in sealers {
                assert!(!s.await.unwrap().is_empty());
            }
            (ticks, Arc::try_unwrap(order).unwrap().into_inner().unwrap())
        });
        let _ = tx.send(order);
    });
    let (ticks, order) = rx.recv_timeout(HANG).unwrap_or_else(|_| {
        panic!("the current_thread runtime hung: an event's I/O blocked its only thread")
    });
    assert!(ticks >= 100);
    // Every tick came before any seal finished: no seal was released
    // before its event was written, and none blocked the runtime.
    assert!(order[0].starts_with("released after"), "{order:?}");
    assert_eq!(order.len(), SEALERS + 1);
    assert!(order[1..].iter().all(|o| o.starts_with("sealed ")));

    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, SEALERS as u64);

    // Group commit: all 64 events were queued while the lock was held, so
    // the writer took them in at most two groups (the one it had started
    // when it met the lock, and the rest), each made durable by one fsync.
    let stats = log.stats();
    assert_eq!(stats.entries, SEALERS as u64, "{stats:?}");
    assert_eq!(stats.grouped_entries, SEALERS as u64, "{stats:?}");
    assert!(stats.fsyncs <= 2, "{stats:?}");
    assert!(stats.largest_group >= SEALERS as u64 / 2, "{stats:?}");
}

/// Receipts of entries still queued when the log is dropped are answered
/// after those entries are written: none is lost, none waits forever.
#[test]
fn dropping_the_log_writes_what_was_queued_and_answers_every_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::builder().audit_key(key()).open(&path).unwrap();
    let receipts: Vec<Receipt> = (0..300u64).map(|i| log.submit(&ev(i))).collect();
    drop(log);
    for r in receipts {
        r.wait().unwrap();
    }
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 300);
    // In submission order.
    let purposes: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event"]["purpose"].as_str().map(str::to_owned)
        })
        .collect();
    assert_eq!(
        purposes,
        (0..300).map(|i| format!("n-{i}")).collect::<Vec<_>>()
    );
}

/// Synchronous appends (on the caller's thread) and submitted entries
/// (through the writer thread) at once: one chain, every entry exactly
/// once, each writer's entries in its order, every receipt `Ok` only
/// after its entry is in the file.
#[test]
fn inline_and_background_appends_share_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(key())
            .max_file_bytes(16 * 1024)
            .open(&path)
            .unwrap(),
    );
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let e = ev(i).with_caller(format!("t{t}"), format!("n-{i}"));
                    if t % 2 == 0 {
                        log.record(&e).unwrap();
                    } else {
                        log.submit(&e).wait().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = log.stats();
    drop(log);
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 400);
    assert!(report.files.len() > 1, "rotated");
    assert_eq!(stats.entries, 400);
    assert_eq!(stats.grouped_entries, 200);
    let mut seen = vec![Vec::new(); 8];
    for f in phi_envelope::audit::log_files(&path).unwrap() {
        for l in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(actor) = v["event"]["actor"].as_str() {
                let t: usize = actor[1..].parse().unwrap();
                let i: u64 = v["event"]["purpose"].as_str().unwrap()[2..]
                    .parse()
                    .unwrap();
                seen[t].push(i);
            }
        }
    }
    for s in seen {
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}

fn ev(i: u64) -> Event {
    Event::new(Operation::Unwrap, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller("lab-service", format!("n-{i}"))
        .with_context_fingerprint("00112233445566778899aabbccddeeff")
}

// ------------------------------------------------- aggregated cache hits

fn cached_env(
    kms: &Arc<MemoryKms>,
    sink: Arc<dyn EventSink>,
    mode: CacheHitEvents,
    fail_closed: bool,
) -> Envelope {
    let records = kms.add_key("records");
    Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(records)
            .event_sink(sink)
            .fail_closed(fail_closed)
            .data_key_cache(CacheConfig::new())
            .cache_hit_events(mode)
            .build()
            .unwrap(),
    )
    .as_caller("lab-service", "treatment")
}

fn events_in(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "event")
        .map(|v| v["event"].clone())
        .collect()
}

#[tokio::test]
async fn aggregated_cache_hits_are_one_event_per_key_and_caller_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::builder().audit_key(key()).open(&path).unwrap());
    let kms = Arc::new(MemoryKms::new("kms"));
    // An interval no test run reaches: only flush_events writes them.
    let env = cached_env(
        &kms,
        log.clone(),
        CacheHitEvents::aggregated(Duration::from_secs(3600)),
        true,
    );
    let billing = env.as_caller("billing", "payment");
    let c = ctx("tenant-1");
    let mut sealed = Vec::new();
    for i in 0..50 {
        sealed.push(env.seal(format!("k {i}").as_bytes(), &c).await.unwrap());
    }
    for i in 0..10 {
        billing.seal(format!("b {i}").as_bytes(), &c).await.unwrap();
    }
    for (i, s) in sealed.iter().enumerate() {
        assert_eq!(env.open(s, &c).await.unwrap(), format!("k {i}").as_bytes());
    }
    // Provider calls only, so far: two generates (one per actor's cache
    // entry) and one unwrap.
    let ops: Vec<String> = events_in(&path)
        .iter()
        .map(|e| e["operation"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ops, ["generate", "generate", "unwrap"]);

    env.keyring().flush_events().await.unwrap();
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 6);
    let mut hits: Vec<(String, String, u64)> = events_in(&path)
        .iter()
        .filter(|e| e["uses"].is_u64())
        .map(|e| {
            assert!(e["first_use"].as_str().unwrap() <= e["last_use"].as_str().unwrap());
            assert_eq!(e["outcome"], "success");
            assert!(e["context_fingerprint"].is_string());
            (
                e["operation"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
                e["uses"].as_u64().unwrap(),
            )
        })
        .collect();
    hits.sort();
    assert_eq!(
        hits,
        [
            ("cache-hit-decrypt".to_owned(), "lab-service".to_owned(), 49),
            ("cache-hit-encrypt".to_owned(), "billing".to_owned(), 9),
            ("cache-hit-encrypt".to_owned(), "lab-service".to_owned(), 49),
        ]
    );
    // Nothing left to flush.
    env.keyring().flush_events().await.unwrap();
    assert_eq!(Verifier::new().key(key()).verify(&path).unwrap().entries, 6);
}

#[tokio::test]
async fn aggregated_cache_hits_are_recorded_within_their_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::builder().audit_key(key()).open(&path).unwrap());
    let kms = Arc::new(MemoryKms::new("kms"));
    let env = cached_env(
        &kms,
        log.clone(),
        CacheHitEvents::aggregated(Duration::from_millis(20)),
        true,
    );
    let c = ctx("tenant-1");
    for i in 0..5 {
        env.seal(format!("k {i}").as_bytes(), &c).await.unwrap();
    }
    // No flush_events: the keyring's flusher writes it on its own.
    let mut waited = Duration::ZERO;
    loop {
        let uses: u64 = events_in(&path)
            .iter()
            .filter_map(|e| e["uses"].as_u64())
            .sum();
        if uses == 4 {
            break;
        }
        assert!(waited < HANG, "the aggregated event was never recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    Verifier::new().key(key()).verify(&path).unwrap();
}

/// Fails every aggregated event; records the others in memory.
#[derive(Debug, Default)]
struct RefusesAggregates(MemorySink);

impl EventSink for RefusesAggregates {
    fn record(&self, e: &Event) -> Result<(), SinkError> {
        if e.uses.is_some() {
            return Err(SinkError("aggregates refused".into()));
        }
        self.0.record(e)
    }
}

#[tokio::test]
async fn an_aggregate_that_cannot_be_recorded_refuses_later_hits_or_is_counted() {
    let c = ctx("tenant-1");
    let mode = CacheHitEvents::aggregated(Duration::from_secs(3600));
    // Failing closed: the flush fails, and every later hit is refused.
    let kms = Arc::new(MemoryKms::new("kms"));
    let env = cached_env(&kms, Arc::new(RefusesAggregates::default()), mode, true);
    for _ in 0..3 {
        env.seal(b"a", &c).await.unwrap();
    }
    assert!(matches!(
        env.keyring().flush_events().await,
        Err(Error::Audit(m)) if m.contains("aggregates refused")
    ));
    assert!(matches!(
        env.seal(b"b", &c).await,
        Err(Error::Audit(m)) if m.contains("cache hits are refused")
    ));
    // Failing open: counted, and the hits go on.
    let kms = Arc::new(MemoryKms::new("kms"));
    let env = cached_env(&kms, Arc::new(RefusesAggregates::default()), mode, false);
    for _ in 0..3 {
        env.seal(b"a", &c).await.unwrap();
    }
    env.keyring().flush_events().await.unwrap();
    assert_eq!(env.keyring().dropped_events(), 1);
    env.seal(b"b", &c).await.unwrap();
}

#[test]
fn aggregated_events_have_the_documented_encoding() {
    let at = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
    let e = Event::new(Operation::CacheHitEncrypt, "local", Outcome::Success)
        .with_key("local:records", Some(2))
        .with_uses(Uses {
            count: 4096,
            first: at(1_796_346_004_000_007),
            last: at(1_796_346_004_999_871),
        })
        .with_caller("lab-service", "treatment")
        .with_context_fingerprint("6f1c0e8a4b2d9e7f0a1b2c3d4e5f6a7b")
        .with_timestamp(at(1_796_346_005_000_120));
    let text = e.to_json();
    // The example of the schema in the events module documentation.
    assert_eq!(
        text,
        "{\"timestamp\":\"2026-12-04T01:00:05.000120Z\",\"operation\":\"cache-hit-encrypt\",\
         \"provider\":\"local\",\"key_ref\":\"local:records\",\"key_version\":2,\"uses\":4096,\
         \"first_use\":\"2026-12-04T01:00:04.000007Z\",\"last_use\":\"2026-12-04T01:00:04.999871Z\",\
         \"actor\":\"lab-service\",\"purpose\":\"treatment\",\
         \"context_fingerprint\":\"6f1c0e8a4b2d9e7f0a1b2c3d4e5f6a7b\",\"outcome\":\"success\",\
         \"duration_us\":0}"
    );
    assert_eq!(Event::from_json(&text).unwrap(), e);
    // The three members go together, count at least 1, in time order.
    for bad in [
        text.replace(",\"last_use\":\"2026-12-04T01:00:04.999871Z\"", ""),
        text.replace("\"uses\":4096", "\"uses\":0"),
        text.replace("04.999871Z", "03.999871Z"),
        text.replace("\"uses\":4096", "\"uses\":\"4096\""),
    ] {
        assert!(Event::from_json(&bad).is_err(), "{bad}");
    }
}

/// A receipt's `on_complete` function runs on the writer thread. One that
/// panics must not take the writer down with it: before, the thread died,
/// the queue kept taking entries nobody wrote, and every later key use
/// waited for its event for ever.
#[test]
fn a_panicking_completion_function_does_not_stop_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::builder().audit_key(key()).open(&path).unwrap());
    log.submit(&ev(0))
        .on_complete(|_| panic!("a careless completion function"));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        let results: Vec<_> = (1..4u64).map(|i| l.submit(&ev(i)).wait()).collect();
        let _ = tx.send(results);
    });
    let results = rx
        .recv_timeout(HANG)
        .expect("the writer stopped: later entries were never answered");
    for r in results {
        r.unwrap();
    }
    drop(log);
    let report = Verifier::new().key(key()).verify(&path).unwrap();
    assert_eq!(report.entries, 4);
}

/// Uses held in an aggregate are recorded before a later change of the
/// key: an auditor reading the trail in order never sees uses of a key
/// after the event that rotated or disabled it when they happened before.
#[tokio::test]
async fn aggregated_uses_are_recorded_before_a_later_change_of_the_key() {
    let sink = Arc::new(MemorySink::new());
    let kms = Arc::new(MemoryKms::new("kms"));
    let records = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(records.clone())
            .event_sink(sink.clone())
            .data_key_cache(CacheConfig::new())
            .cache_hit_events(CacheHitEvents::aggregated(Duration::from_secs(3600)))
            .build()
            .unwrap(),
    )
    .as_caller("lab-service", "treatment");
    let c = ctx("tenant-1");
    for i in 0..5 {
        env.seal(format!("r {i}").as_bytes(), &c).await.unwrap();
    }
    let ops = |sink: &MemorySink| -> Vec<String> {
        sink.events()
            .iter()
            .map(|e| e.operation.as_str().to_owned())
            .collect()
    };
    assert_eq!(ops(&sink), ["generate"]);
    env.keyring()
        .rotate(
            &records,
            &phi_envelope::Caller::new("key-admin", "rotation"),
        )
        .await
        .unwrap();
    assert_eq!(ops(&sink), ["generate", "cache-hit-encrypt", "rotate"]);
    assert_eq!(sink.events()[1].uses.map(|u| u.count), Some(4));
}
