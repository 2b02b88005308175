//! Key-access monitoring (`phi_envelope::monitor`): each shipped rule fires
//! on a workload made to trigger it, and only that rule, and every rule
//! stays silent on the conformance workload (the usual traffic of a
//! service, replayed a day later).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use phi_envelope::events::{Event, EventSink, Operation, Outcome};
use phi_envelope::monitor::{
    ActorRate, AlertSink, DenialBurst, JsonLinesAlerts, KeyManagement, MemoryAlerts, Monitor,
    NewActor, OutsideHours,
};

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
