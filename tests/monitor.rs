//! Key-access monitoring (`phi_envelope::monitor`): each shipped rule fires
//! on a workload made to trigger it, and only that rule, and every rule
//! stays silent on the conformance workload (the usual traffic of a
//! service, replayed a day later).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod conformance;

use conformance::{ctx, MemoryKms};
use phi_envelope::audit::{AuditLog, FsyncPolicy, Verifier};
use phi_envelope::events::{Event, EventSink, FanOut, MemorySink, Operation, Outcome, Uses};
use phi_envelope::monitor::{
    ActorRate, AlertSink, DenialBurst, JsonLinesAlerts, KeyManagement, MemoryAlerts, Monitor,
    NewActor, OutsideHours,
};
use phi_envelope::policy::SegregationOfDuties;
use phi_envelope::{Caller, Envelope, Error, Keyring};

/// 2027-01-15T00:00:00Z.
fn day(n: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_863_993_600 + n * 86_400)
}

fn at(d: u64, hour: u64, secs: u64) -> SystemTime {
    day(d) + Duration::from_secs(hour * 3600 + secs)
}

fn ev(t: SystemTime, op: Operation, actor: &str, outcome: Outcome) -> Event {
    Event::new(op, "local", outcome)
        .with_key("local:records", Some(1))
        .with_caller(actor, "treatment")
        .with_timestamp(t)
}

/// The usual traffic of day `d`: two services, unwraps and generates every
/// few minutes between 09h and 17h UTC, all successful.
fn conformance(d: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for i in 0..200u64 {
        let t = at(d, 9, i * 137);
        let (actor, op) = if i % 3 == 0 {
            ("billing", Operation::Generate)
        } else {
            ("lab-service", Operation::Unwrap)
        };
        out.push(ev(t, op, actor, Outcome::Success));
    }
    out
}

/// The shipped rules, configured for that traffic, taught day 0.
fn monitor(alerts: Arc<dyn AlertSink>) -> Monitor {
    Monitor::new(alerts)
        .rule(NewActor::new().learn(&conformance(0)))
        .rule(ActorRate::new(20, Duration::from_secs(60)))
        .rule(OutsideHours::new(8, 18))
        .rule(DenialBurst::new(3, Duration::from_secs(60)))
        .rule(KeyManagement)
}

/// The rules that fired on `workload` (after day 1's usual traffic).
fn fired(workload: &[Event]) -> BTreeSet<&'static str> {
    let alerts = Arc::new(MemoryAlerts::new());
    let m = monitor(alerts.clone());
    m.replay(&conformance(1));
    assert!(alerts.alerts().is_empty(), "{:?}", alerts.alerts());
    m.replay(workload);
    alerts.alerts().iter().map(|a| a.rule).collect()
}

#[test]
fn silent_on_the_conformance_workload() {
    let alerts = Arc::new(MemoryAlerts::new());
    let m = monitor(alerts.clone());
    for d in 1..4 {
        assert_eq!(m.replay(&conformance(d)), 0);
    }
    assert!(alerts.alerts().is_empty(), "{:?}", alerts.alerts());
}

#[test]
fn new_actor_fires_on_a_key_used_by_someone_new() {
    let w = [ev(
        at(2, 10, 0),
        Operation::Unwrap,
        "mallory",
        Outcome::Success,
    )];
    assert_eq!(fired(&w), BTreeSet::from(["new-actor"]));
}

#[test]
fn actor_rate_fires_above_its_bound() {
    let w: Vec<Event> = (0..25)
        .map(|i| {
            ev(
                at(2, 10, i),
                Operation::Unwrap,
                "lab-service",
                Outcome::Success,
            )
        })
        .collect();
    assert_eq!(fired(&w), BTreeSet::from(["actor-rate"]));
}

#[test]
fn outside_hours_fires_at_night() {
    let w = [ev(
        at(2, 3, 0),
        Operation::Unwrap,
        "lab-service",
        Outcome::Success,
    )];
    assert_eq!(fired(&w), BTreeSet::from(["outside-hours"]));
}

#[test]
fn denial_burst_fires_on_refused_unwraps() {
    let w: Vec<Event> = (0..5)
        .map(|i| {
            let outcome = if i % 2 == 0 {
                Outcome::Denied
            } else {
                Outcome::Rejected
            };
            ev(at(2, 11, i * 5), Operation::Unwrap, "billing", outcome)
        })
        .collect();
    assert_eq!(fired(&w), BTreeSet::from(["denial-burst"]));
}

#[test]
fn key_management_fires_on_each_lifecycle_verb() {
    for op in [
        Operation::Rotate,
        Operation::SetState,
        Operation::Destroy,
        Operation::CreateKey,
        Operation::SetPolicy,
    ] {
        let w = [ev(at(2, 12, 0), op, "lab-service", Outcome::Success)];
        assert_eq!(fired(&w), BTreeSet::from(["key-management"]), "{op:?}");
    }
}

#[test]
fn alerts_as_json_lines_through_the_event_sink() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.jsonl");
    let m = monitor(Arc::new(JsonLinesAlerts::open(&path).unwrap()));
    m.record(&ev(
        at(2, 12, 0),
        Operation::Destroy,
        "carol",
        Outcome::Success,
    ))
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let rules: BTreeSet<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["event"]["actor"], "carol");
            v["rule"].as_str().unwrap().to_owned()
        })
        .collect();
    // carol is new to the key, and destroyed a version.
    assert_eq!(
        rules,
        BTreeSet::from(["key-management".to_owned(), "new-actor".to_owned()])
    );
}

// Aggregated cache-hit events: one event stands for `uses` hits between
// `first_use` and `last_use`, recorded (its `timestamp`) when flushed.

fn agg(actor: &str, count: u64, first: SystemTime, last: SystemTime, flushed: SystemTime) -> Event {
    Event::new(Operation::CacheHitDecrypt, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller(actor, "treatment")
        .with_uses(Uses { count, first, last })
        .with_timestamp(flushed)
}

/// Day `d`'s usual traffic as a keyring aggregating its cache hits
/// records it: every 137 s, an event standing for 3 hits of lab-service
/// over 2 s, flushed 1 s after the last.
fn conformance_aggregated(d: u64) -> Vec<Event> {
    (0..200u64)
        .map(|i| {
            let first = at(d, 9, i * 137);
            let last = first + Duration::from_secs(2);
            agg("lab-service", 3, first, last, last + Duration::from_secs(1))
        })
        .collect()
}

#[test]
fn silent_on_the_conformance_workload_aggregated() {
    let alerts = Arc::new(MemoryAlerts::new());
    let m = monitor(alerts.clone());
    for d in 1..4 {
        assert_eq!(m.replay(&conformance_aggregated(d)), 0);
    }
    assert!(alerts.alerts().is_empty(), "{:?}", alerts.alerts());
}

#[test]
fn actor_rate_counts_the_uses_of_an_aggregated_event() {
    // One event, 25 uses within 10 s: above 20 per minute.
    let first = at(2, 10, 0);
    let w = [agg(
        "lab-service",
        25,
        first,
        first + Duration::from_secs(10),
        first + Duration::from_secs(11),
    )];
    assert_eq!(fired(&w), BTreeSet::from(["actor-rate"]));
    // 20 uses are within the bound, and so are 20 more a minute later.
    let w = [
        agg(
            "lab-service",
            20,
            first,
            first,
            first + Duration::from_secs(1),
        ),
        agg(
            "lab-service",
            20,
            first + Duration::from_secs(61),
            first + Duration::from_secs(61),
            first + Duration::from_secs(62),
        ),
    ];
    assert_eq!(fired(&w), BTreeSet::new());
    // Single events and an aggregated one together: 15 + 10 in 20 s.
    let mut w: Vec<Event> = (0..15)
        .map(|i| {
            ev(
                at(2, 10, i),
                Operation::Unwrap,
                "lab-service",
                Outcome::Success,
            )
        })
        .collect();
    w.push(agg(
        "lab-service",
        10,
        at(2, 10, 15),
        at(2, 10, 20),
        at(2, 10, 21),
    ));
    assert_eq!(fired(&w), BTreeSet::from(["actor-rate"]));
}

#[test]
fn actor_rate_judges_a_late_aggregated_event_by_its_uses() {
    // 15 single unwraps at 10:00:30..10:00:44, then the aggregate of 10
    // hits at 10:00:00..10:00:10, flushed (recorded) after them: the 25
    // uses were within one minute.
    let mut w: Vec<Event> = (30..45)
        .map(|i| {
            ev(
                at(2, 10, i),
                Operation::Unwrap,
                "lab-service",
                Outcome::Success,
            )
        })
        .collect();
    w.push(agg(
        "lab-service",
        10,
        at(2, 10, 0),
        at(2, 10, 10),
        at(2, 10, 45),
    ));
    assert_eq!(fired(&w), BTreeSet::from(["actor-rate"]));
}

#[test]
fn outside_hours_judges_an_aggregated_event_by_its_uses() {
    // Hits at 07:59, recorded at 08:00:10 (allowed from 08h): outside.
    let w = [agg(
        "lab-service",
        3,
        at(2, 7, 3570),
        at(2, 7, 3590),
        at(2, 8, 10),
    )];
    assert_eq!(fired(&w), BTreeSet::from(["outside-hours"]));
    // Hits at 17:59, recorded at 18:00:05 (allowed until 18h): inside.
    let w = [agg(
        "lab-service",
        3,
        at(2, 17, 3590),
        at(2, 17, 3595),
        at(2, 18, 5),
    )];
    assert_eq!(fired(&w), BTreeSet::new());
    // A span that straddles 18h: some of its hits may have been after it,
    // so it alerts (an alert rather than a miss).
    let w = [agg(
        "lab-service",
        2,
        at(2, 17, 3590),
        at(2, 18, 30),
        at(2, 18, 31),
    )];
    assert_eq!(fired(&w), BTreeSet::from(["outside-hours"]));
    // Both ends inside the hours, the night between them: alerts too.
    let w = [agg(
        "lab-service",
        2,
        at(2, 17, 0),
        at(3, 9, 0),
        at(3, 9, 1),
    )];
    assert_eq!(fired(&w), BTreeSet::from(["outside-hours"]));
}

#[test]
fn alerts_name_the_time_of_the_uses_not_of_the_flush() {
    let alerts = Arc::new(MemoryAlerts::new());
    let m = monitor(alerts.clone());
    let first = at(2, 7, 3000);
    let last = at(2, 7, 3500);
    m.observe(&agg("mallory", 30, first, last, at(2, 8, 30)));
    let got: Vec<(&str, SystemTime)> = alerts.alerts().iter().map(|a| (a.rule, a.time)).collect();
    assert_eq!(
        got,
        [
            ("new-actor", first),
            ("actor-rate", last),
            ("outside-hours", first)
        ]
    );
    for a in alerts.alerts() {
        let v: serde_json::Value = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(
            v["time"],
            v["event"][if a.rule == "actor-rate" {
                "last_use"
            } else {
                "first_use"
            }],
            "{v}"
        );
        assert!(a.message.contains("30 "), "{}", a.message);
    }
}

// A policy change: `Keyring::replace_policy`, an event of its own
// (`set-policy`), asked of the policy in force, and watched by the
// key-management rule.

#[tokio::test]
async fn a_policy_change_is_recorded_checked_and_alerted() {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let events = Arc::new(MemorySink::new());
    let alerts = Arc::new(MemoryAlerts::new());
    let monitor = Arc::new(Monitor::new(alerts.clone()).rule(KeyManagement));
    let sod = || SegregationOfDuties::new().custodian("kms-admin");
    let keyring = Arc::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .event_sink(Arc::new(FanOut(vec![events.clone(), monitor.clone()])))
            .policy(Arc::new(sod().data_user("lab-service")))
            .policy_replaceable(true)
            .build()
            .unwrap(),
    );
    let lab = Envelope::from_shared(keyring.clone()).as_caller("lab-service", "treatment");
    let seal = || async { lab.seal(b"record", &ctx("r1")).await };
    seal().await.unwrap();
    // The new policy no longer lets lab-service use keys.
    let tighter = || Arc::new(sod());

    // Without an actor: refused before the policy is asked.
    match keyring.replace_policy(tighter(), &Caller::default()).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("actor"), "{m}"),
        other => panic!("{other:?}"),
    }
    seal().await.unwrap();
    // A data user may not change the policy (segregation of duties).
    match keyring
        .replace_policy(tighter(), &Caller::new("lab-service", "self-service"))
        .await
    {
        Err(Error::PolicyDenied(m)) => assert!(m.contains("lab-service"), "{m}"),
        other => panic!("{other:?}"),
    }
    seal().await.unwrap();
    // A custodian may; the new policy applies at once.
    keyring
        .replace_policy(tighter(), &Caller::new("kms-admin", "offboard-lab"))
        .await
        .unwrap();
    assert!(matches!(seal().await, Err(Error::PolicyDenied(_))));

    let changes: Vec<Event> = events
        .events()
        .into_iter()
        .filter(|e| e.operation == Operation::SetPolicy)
        .collect();
    let seen: Vec<(Option<&str>, String)> = changes
        .iter()
        .map(|e| (e.actor.as_deref(), e.outcome.as_string()))
        .collect();
    assert_eq!(
        seen,
        [
            (None, "failed:no-actor".to_owned()),
            (Some("lab-service"), "denied".to_owned()),
            (Some("kms-admin"), "success".to_owned()),
        ]
    );
    for e in &changes {
        assert_eq!(
            (e.provider.as_str(), e.key_ref.as_deref()),
            ("keyring", None)
        );
        let j = e.to_json();
        assert!(
            j.contains(r#""operation":"set-policy","provider":"keyring","key_ref":null,"key_version":null,"actor""#),
            "{j}"
        );
        assert_eq!(Event::from_json(&j).unwrap().to_json(), j);
    }
    let rules: Vec<(&str, Operation)> = alerts
        .alerts()
        .iter()
        .map(|a| (a.rule, a.event.operation))
        .collect();
    assert_eq!(rules, [("key-management", Operation::SetPolicy); 3]);

    // The trail of all this, as an audit log: it verifies, and replaying
    // it raises the same alerts.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let log = AuditLog::builder()
            .fsync(FsyncPolicy::Never)
            .open(&path)
            .unwrap();
        for e in events.events() {
            log.record(&e).unwrap();
        }
    }
    let report = Verifier::new().verify(&path).unwrap();
    assert_eq!(report.entries, events.events().len() as u64);
    let again = Arc::new(MemoryAlerts::new());
    let stats = Monitor::new(again.clone())
        .rule(KeyManagement)
        .replay_log(&path)
        .unwrap();
    assert_eq!((stats.events, stats.alerts), (report.entries, 3));
    // The same events, as the log has them (to the microsecond).
    let replayed: Vec<String> = again.alerts().iter().map(|a| a.event.to_json()).collect();
    let recorded: Vec<String> = changes.iter().map(Event::to_json).collect();
    assert_eq!(replayed, recorded);
}

#[tokio::test]
async fn a_keyring_not_built_replaceable_refuses_a_policy_change() {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let events = Arc::new(MemorySink::new());
    let keyring = Arc::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .event_sink(events.clone())
            .build()
            .unwrap(),
    );
    let admin = Caller::new("kms-admin", "tighten");
    match keyring
        .replace_policy(Arc::new(SegregationOfDuties::new()), &admin)
        .await
    {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("policy_replaceable"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Still allow-all: the refused change changed nothing, and is an event.
    Envelope::from_shared(keyring.clone())
        .as_caller("lab-service", "treatment")
        .seal(b"record", &ctx("r1"))
        .await
        .unwrap();
    let e = events
        .events()
        .into_iter()
        .find(|e| e.operation == Operation::SetPolicy)
        .unwrap();
    assert_eq!(e.outcome, Outcome::Failed("not-replaceable".into()));
    assert_eq!(e.actor.as_deref(), Some("kms-admin"));
}

#[test]
fn alert_from_teaches_the_rules_with_what_came_before() {
    // Day 1 is history: mallory used the key then, and lab-service made a
    // burst at its end. Alerts start on day 2.
    let mut history = conformance(1);
    history.push(ev(
        at(1, 10, 0),
        Operation::Unwrap,
        "mallory",
        Outcome::Success,
    ));
    let half = |n: u64| Duration::from_millis(500 * n);
    history.extend((1..=15).map(|i| {
        ev(
            day(2) - half(i),
            Operation::Unwrap,
            "lab-service",
            Outcome::Success,
        )
    }));
    let alerts = Arc::new(MemoryAlerts::new());
    let m = Monitor::new(alerts.clone())
        .rule(NewActor::new())
        .rule(ActorRate::new(20, Duration::from_secs(60)))
        .alert_from(day(2));
    assert_eq!(m.replay(&history), 0);
    assert!(alerts.alerts().is_empty());
    // mallory is not new any more; the burst goes on past midnight: its
    // day-2 part alerts, knowing the day-1 part.
    let today: Vec<Event> = (0..10)
        .map(|i| {
            ev(
                day(2) + half(i),
                Operation::Unwrap,
                "lab-service",
                Outcome::Success,
            )
        })
        .chain([ev(
            at(2, 10, 0),
            Operation::Unwrap,
            "mallory",
            Outcome::Success,
        )])
        .collect();
    m.replay(&today);
    let got: BTreeSet<(&str, String)> = alerts
        .alerts()
        .iter()
        .map(|a| (a.rule, a.event.actor.clone().unwrap()))
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([("actor-rate", "lab-service".to_owned())])
    );
    // An aggregated event whose last use is on day 2 is judged, not taught.
    let m = Monitor::new(alerts.clone())
        .rule(NewActor::new())
        .alert_from(day(2));
    let before = alerts.alerts().len();
    m.observe(&agg("eve", 2, at(1, 23, 3599), at(2, 0, 1), at(2, 0, 2)));
    assert_eq!(alerts.alerts().len(), before + 1);
}

#[test]
fn the_set_policy_line_of_the_schema_decodes_and_reencodes_byte_for_byte() {
    // The example of the event schema (src/events/mod.rs).
    let line = r#"{"timestamp":"2026-12-04T04:10:00.000042Z","operation":"set-policy","provider":"keyring","key_ref":null,"key_version":null,"actor":"kms-admin","purpose":"offboard-lab","context_fingerprint":null,"outcome":"success","duration_us":0}"#;
    let e = Event::from_json(line).unwrap();
    assert_eq!(e.operation, Operation::SetPolicy);
    assert_eq!(e.operation.as_str(), "set-policy");
    assert!(e.operation.is_key_management());
    assert_eq!(e.to_json(), line);
    let built = Event::new(Operation::SetPolicy, "keyring", Outcome::Success)
        .with_caller("kms-admin", "offboard-lab")
        .with_timestamp(e.timestamp);
    assert_eq!(built.to_json(), line);
}

/// One event dated far in the future (a forged line, a writer's clock
/// ahead) must not blind the counting rules to the events of now.
#[test]
fn an_event_dated_in_the_future_does_not_blind_the_counting_rules() {
    let future = SystemTime::UNIX_EPOCH + Duration::from_secs(4_070_908_800); // 2099
    let mut w = vec![
        ev(future, Operation::Unwrap, "billing", Outcome::Denied),
        ev(future, Operation::Unwrap, "lab-service", Outcome::Success),
    ];
    for i in 0..30u64 {
        w.push(ev(
            at(2, 11, i),
            Operation::Unwrap,
            "lab-service",
            Outcome::Success,
        ));
    }
    for i in 0..5u64 {
        w.push(ev(
            at(2, 12, i),
            Operation::Unwrap,
            "billing",
            Outcome::Denied,
        ));
    }
    let rules = fired(&w);
    assert!(rules.contains("actor-rate"), "{rules:?}");
    assert!(rules.contains("denial-burst"), "{rules:?}");
}

/// Counting is bounded per event whatever the rate: a busy actor's 200,000
/// uses in one minute are judged, and the alerts say so (no timing
/// threshold: the test only has to finish).
#[test]
fn a_busy_actor_is_counted_without_rescanning_its_window() {
    let alerts = Arc::new(MemoryAlerts::new());
    let m = Monitor::new(alerts.clone()).rule(ActorRate::new(600, Duration::from_secs(60)));
    let start = at(3, 10, 0);
    for i in 0..200_000u64 {
        let t = start + Duration::from_micros(i * 300);
        m.observe(&ev(t, Operation::Unwrap, "lab-service", Outcome::Success));
    }
    let n = alerts
        .alerts()
        .iter()
        .filter(|a| a.rule == "actor-rate")
        .count();
    assert!(n > 100_000, "{n}");
}

/// The alerts file is a regular file or nothing: a FIFO would block every
/// key use behind an alert, a symbolic link would write where it points.
#[test]
fn an_alerts_file_that_is_a_fifo_or_a_link_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = JsonLinesAlerts::open(&fifo).unwrap_err();
    assert!(e.to_string().contains("regular file"), "{e}");
    let target = dir.path().join("target.txt");
    std::fs::write(&target, b"").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(JsonLinesAlerts::open(&link).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"");
    let ok = JsonLinesAlerts::open(dir.path().join("alerts.jsonl")).unwrap();
    assert_eq!(ok.failed(), 0);
}

/// A sink that holds the receipts of successful `set-policy` events until
/// released, and fails `set-policy` events when told to; other events are
/// recorded at once.
#[derive(Debug, Default)]
struct GatedSink {
    held: std::sync::Mutex<Vec<phi_envelope::events::Completion>>,
    fail: std::sync::atomic::AtomicBool,
    hold: std::sync::atomic::AtomicBool,
    seen: std::sync::Mutex<Vec<Event>>,
}

impl EventSink for GatedSink {
    fn record(&self, event: &Event) -> Result<(), phi_envelope::events::SinkError> {
        self.seen.lock().unwrap().push(event.clone());
        Ok(())
    }
    fn submit(&self, event: &Event) -> phi_envelope::events::Receipt {
        use std::sync::atomic::Ordering::SeqCst;
        self.seen.lock().unwrap().push(event.clone());
        if event.operation != Operation::SetPolicy {
            return phi_envelope::events::Receipt::ready(Ok(()));
        }
        if self.fail.load(SeqCst) {
            return phi_envelope::events::Receipt::ready(Err(phi_envelope::events::SinkError(
                "the trail is down".into(),
            )));
        }
        if self.hold.load(SeqCst) && event.outcome == Outcome::Success {
            let (r, c) = phi_envelope::events::Receipt::pending();
            self.held.lock().unwrap().push(c);
            return r;
        }
        phi_envelope::events::Receipt::ready(Ok(()))
    }
}

/// A policy change whose event is not confirmed is not in force, even on
/// a keyring that fails open; two changes at once take turns (the second
/// is refused and recorded), so the trail's order is the order in force.
#[tokio::test]
async fn a_policy_change_is_in_force_only_with_its_event_and_changes_take_turns() {
    use std::sync::atomic::Ordering::SeqCst;
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let sink = Arc::new(GatedSink::default());
    let sod = || SegregationOfDuties::new().custodian("kms-admin");
    let keyring = Arc::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .event_sink(sink.clone())
            .fail_closed(false)
            .policy(Arc::new(sod().data_user("lab-service")))
            .policy_replaceable(true)
            .build()
            .unwrap(),
    );
    let lab = Envelope::from_shared(keyring.clone()).as_caller("lab-service", "treatment");
    let admin = Caller::new("kms-admin", "offboard-lab");
    // The trail refuses the event: the change is refused, the old policy
    // stays (lab-service may still seal), although the keyring fails open.
    sink.fail.store(true, SeqCst);
    match keyring.replace_policy(Arc::new(sod()), &admin).await {
        Err(Error::Audit(m)) => assert!(m.contains("down"), "{m}"),
        other => panic!("{other:?}"),
    }
    lab.seal(b"r", &ctx("r1")).await.unwrap();
    sink.fail.store(false, SeqCst);
    // A change awaiting its receipt holds the turn: a second is refused.
    sink.hold.store(true, SeqCst);
    let k2 = keyring.clone();
    let first = tokio::spawn(async move {
        k2.replace_policy(Arc::new(sod()), &Caller::new("kms-admin", "offboard-lab"))
            .await
    });
    while sink.held.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    match keyring.replace_policy(Arc::new(sod()), &admin).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("under way"), "{m}"),
        other => panic!("{other:?}"),
    }
    for c in sink.held.lock().unwrap().drain(..) {
        c.complete(Ok(()));
    }
    first.await.unwrap().unwrap();
    // In force now: lab-service is no data user any more.
    assert!(matches!(
        lab.seal(b"r", &ctx("r2")).await,
        Err(Error::PolicyDenied(_))
    ));
    let outcomes: Vec<String> = sink
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.operation == Operation::SetPolicy)
        .map(|e| e.outcome.to_string())
        .collect();
    // In the order offered: the attempt the trail refused, the change
    // held at its receipt, the concurrent one refused meanwhile.
    assert_eq!(outcomes, ["success", "success", "failed:concurrent"]);
}
