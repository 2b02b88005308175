//! Records per second through `Envelope::seal` (1 KiB records, data-key
//! cache on, so every seal is a cache hit and one event) with the durable
//! audit log on and off, for 1 and 64 concurrent tasks on a tokio
//! `current_thread` runtime, and how many entries each fsync made durable.
//! The figures of docs/PERFORMANCE.md ("Audit").
//!
//! ```sh
//! cargo run --release --example audit_throughput
//! PHI_AUDIT_DIR=/var/tmp PHI_AUDIT_RECORDS=5000 cargo run --release --example audit_throughput
//! ```
//!
//! The log is written under `PHI_AUDIT_DIR` (default: the system's
//! temporary directory): put it on the disk you mean to measure, not on a
//! tmpfs, where an fsync costs nothing. `PHI_AUDIT_RECORDS` is the number
//! of records of each durable run (default 3000); the runs without fsyncs
//! per use seal 100 times as many.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_envelope::audit::{AuditLog, FsyncPolicy, Verifier};
use phi_envelope::cache::CacheConfig;
use phi_envelope::events::{CacheHitEvents, EventSink, SinkError};
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::{EncryptionContext, Envelope, KeyRef, Keyring};

/// The audit configurations measured.
#[derive(Clone, Copy, PartialEq)]
enum Audit {
    Off,
    /// The log's `record` on the caller's thread, as the keyring called
    /// every sink before receipts: the previous behaviour.
    Inline,
    EachUse,
    Aggregated,
}

/// A sink that only implements `record` (so `submit` is the default:
/// inline), forwarding to the log.
#[derive(Debug)]
struct InlineOnly(Arc<AuditLog>);

impl EventSink for InlineOnly {
    fn record(&self, event: &phi_envelope::events::Event) -> Result<(), SinkError> {
        self.0.record(event)
    }
}

impl Audit {
    fn name(self) -> &'static str {
        match self {
            Audit::Off => "audit off",
            Audit::Inline => "AuditLog, fsync every entry, written inline (before this change)",
            Audit::EachUse => "AuditLog, fsync every entry, one event per use",
            Audit::Aggregated => "AuditLog, fsync every entry, aggregated hits (1 s)",
        }
    }
}

#[derive(Clone, Copy)]
struct Run {
    records_per_s: f64,
    entries: u64,
    fsyncs: u64,
}

fn run(dir: &std::path::Path, audit: Audit, tasks: usize, records: usize) -> Run {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let store =
        LocalKeystore::create_unprotected_for_tests(dir.join(format!("keys-{n}.json"))).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let log_path = dir.join(format!("audit-{n}.jsonl"));
    let log = (audit != Audit::Off).then(|| {
        Arc::new(
            AuditLog::builder()
                .fsync(FsyncPolicy::EveryEntry)
                .open(&log_path)
                .unwrap(),
        )
    });
    let mut builder = Keyring::builder()
        .provider(Arc::new(store))
        .recipient(key)
        .data_key_cache(CacheConfig::new());
    if let Some(log) = &log {
        builder = builder.event_sink(if audit == Audit::Inline {
            Arc::new(InlineOnly(log.clone())) as Arc<dyn EventSink>
        } else {
            log.clone() as Arc<dyn EventSink>
        });
    }
    if audit == Audit::Aggregated {
        builder = builder.cache_hit_events(CacheHitEvents::aggregated(Duration::from_secs(1)));
    }
    let env = Arc::new(Envelope::new(builder.build().unwrap()).as_caller("lab-service", "bench"));
    let ctx = EncryptionContext::new().with("tenant", "st-mary").unwrap();
    let record = vec![0x5au8; 1024];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let elapsed = rt.block_on(async {
        // Warm-up: the cache entry, the writer thread, the file.
        env.seal(&record, &ctx).await.unwrap();
        let start = Instant::now();
        let per_task = records / tasks;
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (env, ctx, record) = (env.clone(), ctx.clone(), record.clone());
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        std::hint::black_box(env.seal(&record, &ctx).await.unwrap());
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let elapsed = start.elapsed();
        env.keyring().flush_events().await.unwrap();
        elapsed
    });
    let done = (records / tasks) * tasks;
    let stats = log.as_ref().map(|l| l.stats()).unwrap_or_default();
    drop(env);
    drop(log);
    if audit != Audit::Off {
        // Every event is in the log, and the chain verifies.
        let report = Verifier::new().verify(&log_path).unwrap();
        assert!(report.entries >= 1);
    }
    Run {
        records_per_s: done as f64 / elapsed.as_secs_f64(),
        entries: stats.entries,
        fsyncs: stats.fsyncs,
    }
}

fn main() {
    let records: usize = std::env::var("PHI_AUDIT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let base = std::env::var_os("PHI_AUDIT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).unwrap();
    println!(
        "1 KiB records, Envelope::seal with the data-key cache, tokio current_thread; log in {}",
        dir.path().display()
    );
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "| audit | tasks | records/s | ratio to audit off | entries | fsyncs | entries per fsync |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    // Warm-up (discarded): the first run of a process is slower.
    run(dir.path(), Audit::Off, 1, records * 100);
    // The median of three runs of each.
    let median = |audit: Audit, tasks: usize, n: usize| {
        let mut runs: Vec<Run> = (0..3).map(|_| run(dir.path(), audit, tasks, n)).collect();
        runs.sort_by(|a, b| a.records_per_s.total_cmp(&b.records_per_s));
        runs[1]
    };
    for tasks in [1usize, 64] {
        let off = median(Audit::Off, tasks, records * 100);
        for audit in [Audit::Off, Audit::Inline, Audit::EachUse, Audit::Aggregated] {
            let r = match audit {
                Audit::Off => off,
                Audit::Inline | Audit::EachUse => median(audit, tasks, records),
                Audit::Aggregated => median(audit, tasks, records * 100),
            };
            let per_fsync = if r.fsyncs == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", r.entries as f64 / r.fsyncs as f64)
            };
            println!(
                "| {} | {tasks} | {:.0} | {:.4} | {} | {} | {per_fsync} |",
                audit.name(),
                r.records_per_s,
                r.records_per_s / off.records_per_s,
                r.entries,
                r.fsyncs,
            );
        }
    }
}
