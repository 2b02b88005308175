//! Lifecycle verbs and who asked for them: the events of state changes name
//! the state a version is moved to, key management without an actor is
//! refused before anything changes, and key use without one is counted
//! where the application can see it.

mod conformance;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use conformance::{ctx, MemoryKms};
use phi_envelope::events::{Event, MemorySink, Operation, Outcome};
use phi_envelope::provider::KeyState;
use phi_envelope::{Caller, Envelope, Error, KeyRef, Keyring};

struct Setup {
    kms: Arc<MemoryKms>,
    key: KeyRef,
    sink: Arc<MemorySink>,
    keyring: Arc<Keyring>,
}

fn setup() -> Setup {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let sink = Arc::new(MemorySink::new());
    let keyring = Arc::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    );
    Setup {
        kms,
        key,
        sink,
        keyring,
    }
}

fn operator() -> Caller {
    Caller::new("alice", "retire-v1")
}

/// The single event of `operation` in `events`.
fn only(events: &[Event], operation: Operation) -> Event {
    let found: Vec<&Event> = events.iter().filter(|e| e.operation == operation).collect();
    assert_eq!(found.len(), 1, "{operation}: {events:?}");
    found[0].clone()
}

#[tokio::test]
async fn state_change_events_record_the_target_state() {
    let s = setup();
    let k = &s.keyring;
    k.rotate(&s.key, &operator()).await.unwrap();
    s.sink.take();

    let cases: [(KeyState, &str); 3] = [
        (KeyState::Disabled, "disabled"),
        (KeyState::DecryptOnly, "decrypt-only"),
        (KeyState::Enabled, "enabled"),
    ];
    for (state, name) in cases {
        k.set_state(&s.key, 1, state, &operator()).await.unwrap();
        let e = only(&s.sink.take(), Operation::SetState);
        assert_eq!(e.key_version, Some(1));
        assert_eq!(e.key_state, Some(state), "{e:?}");
        assert!(
            e.to_json()
                .contains(&format!(r#""key_version":1,"key_state":"{name}","actor""#)),
            "{}",
            e.to_json()
        );
        let back = Event::from_json(&e.to_json()).unwrap();
        assert_eq!(back.key_state, Some(state));
        assert_eq!(back.to_json(), e.to_json());
    }
    // disable is set_state(Disabled); v1 is primary again after the
    // rollback above, so rotate first.
    k.rotate(&s.key, &operator()).await.unwrap();
    let e = only(&s.sink.take(), Operation::Rotate);
    assert_eq!(
        (e.key_version, e.key_state),
        (Some(3), Some(KeyState::Enabled))
    );
    k.disable(&s.key, 1, &operator()).await.unwrap();
    let e = only(&s.sink.take(), Operation::SetState);
    assert_eq!(e.key_state, Some(KeyState::Disabled));
    k.destroy(&s.key, 1, &operator()).await.unwrap();
    let e = only(&s.sink.take(), Operation::Destroy);
    assert_eq!(
        (e.key_version, e.key_state),
        (Some(1), Some(KeyState::Destroyed))
    );
    assert!(e.to_json().contains(r#""key_state":"destroyed""#));

    // A refused transition still records what was asked for.
    let err = k
        .set_state(&s.key, 1, KeyState::DecryptOnly, &operator())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Provider(_)), "{err:?}");
    let e = only(&s.sink.take(), Operation::SetState);
    assert_eq!(e.key_state, Some(KeyState::DecryptOnly));
    assert!(matches!(e.outcome, Outcome::Failed(_)), "{e:?}");

    // Key use and describe name no state: their lines are as before.
    let env = Envelope::from_shared(s.keyring.clone()).as_caller("lab", "treatment");
    env.seal(b"x", &ctx("1")).await.unwrap();
    k.describe(&s.key, &operator()).await.unwrap();
    for e in s.sink.take() {
        assert_eq!(e.key_state, None, "{e:?}");
        assert!(!e.to_json().contains("key_state"), "{}", e.to_json());
    }
}

#[test]
fn event_lines_without_a_state_are_encoded_as_before() {
    // A line written before key_state existed parses and re-encodes to the
    // same bytes, so an existing audit log still verifies.
    let old = r#"{"timestamp":"2026-11-25T10:11:01.123456Z","operation":"set-state","provider":"local","key_ref":"local:records","key_version":2,"actor":"alice","purpose":"retire","context_fingerprint":null,"outcome":"success","duration_us":412}"#;
    let e = Event::from_json(old).unwrap();
    assert_eq!(e.key_state, None);
    assert_eq!(e.to_json(), old);
}

fn anonymous_callers() -> Vec<Caller> {
    vec![
        Caller::default(),
        Caller {
            actor: Some(String::new()),
            purpose: Some("rotation".into()),
        },
        Caller {
            actor: Some(" \t".into()),
            purpose: None,
        },
    ]
}

#[tokio::test]
async fn key_management_without_an_actor_is_refused_before_any_change() {
    let s = setup();
    let k = &s.keyring;
    let new_key: KeyRef = "mem:new".parse().unwrap();
    k.rotate(&s.key, &operator()).await.unwrap();
    let before = k.describe(&s.key, &operator()).await.unwrap();
    s.sink.take();
    for caller in anonymous_callers() {
        let calls = k.provider_calls();
        let memory_calls = s.kms.calls.load(Ordering::SeqCst);
        let results = [
            ("create-key", k.create_key(&new_key, &caller).await),
            ("rotate", k.rotate(&s.key, &caller).await),
            (
                "set-state",
                k.set_state(&s.key, 1, KeyState::Disabled, &caller).await,
            ),
            ("disable", k.disable(&s.key, 1, &caller).await),
            ("destroy", k.destroy(&s.key, 1, &caller).await),
        ];
        for (verb, r) in results {
            match r {
                Err(Error::InvalidArgument(m)) => {
                    assert!(m.contains("actor"), "{verb}: {m}");
                    assert!(m.contains("Caller::new"), "{verb}: {m}");
                }
                other => panic!("{verb} with {caller:?}: {other:?}"),
            }
        }
        assert_eq!(k.provider_calls(), calls, "no provider call");
        assert_eq!(s.kms.calls.load(Ordering::SeqCst), memory_calls);
        // Each refusal is an event, naming no actor.
        let events = s.sink.take();
        assert_eq!(events.len(), 5, "{events:?}");
        for e in &events {
            assert!(e.operation.is_key_management(), "{e:?}");
            assert_eq!(e.outcome, Outcome::Failed("no-actor".into()), "{e:?}");
        }
    }
    // Nothing changed.
    assert_eq!(k.describe(&s.key, &operator()).await.unwrap(), before);
    assert!(k.describe(&new_key, &operator()).await.is_err());
}

#[tokio::test]
async fn key_use_without_an_actor_is_counted_not_refused() {
    let s = setup();
    let anonymous = Envelope::from_shared(s.keyring.clone());
    let named = anonymous.as_caller("lab-service", "treatment");
    let c = ctx("1");

    let sealed = named.seal(b"x", &c).await.unwrap();
    named.open(&sealed, &c).await.unwrap();
    assert_eq!(s.keyring.calls_without_actor(), 0);

    let sealed = anonymous.seal(b"y", &c).await.unwrap(); // generate
    assert_eq!(anonymous.open(&sealed, &c).await.unwrap(), b"y"); // unwrap
    s.keyring
        .describe(&s.key, &Caller::default())
        .await
        .unwrap();
    assert_eq!(s.keyring.calls_without_actor(), 3);
    // The events say so: no actor.
    let events = s.sink.take();
    let anonymous_events: Vec<_> = events.iter().filter(|e| e.actor.is_none()).collect();
    assert_eq!(anonymous_events.len(), 3, "{events:?}");
}

#[tokio::test]
async fn an_audit_log_with_state_changes_verifies_and_reads_back() {
    use phi_envelope::audit::{AuditKey, AuditLog, Verifier};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key = AuditKey::new(&[7u8; 32]).unwrap();
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(key.clone())
            .open(&path)
            .unwrap(),
    );
    let kms = Arc::new(MemoryKms::new("mem"));
    let records = kms.add_key("records");
    let keyring = Keyring::builder()
        .provider(kms.clone())
        .recipient(records.clone())
        .event_sink(log.clone())
        .build()
        .unwrap();
    let env = Envelope::new(keyring).as_caller("lab", "treatment");
    env.seal(b"x", &ctx("1")).await.unwrap();
    env.keyring().rotate(&records, &operator()).await.unwrap();
    env.keyring()
        .disable(&records, 1, &operator())
        .await
        .unwrap();
    env.keyring()
        .destroy(&records, 1, &operator())
        .await
        .unwrap();
    drop(env);
    drop(log);
    let report = Verifier::new().key(key).verify(&path).unwrap();
    assert_eq!(report.entries, 4, "{report:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    let states: Vec<Option<String>> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["type"] == "event").then(|| v["event"]["key_state"].as_str().map(str::to_owned))
        })
        .collect();
    assert_eq!(
        states,
        [
            None,
            Some("enabled".to_owned()),
            Some("disabled".to_owned()),
            Some("destroyed".to_owned())
        ]
    );
}

#[tokio::test]
async fn rotate_first_on_behalf_of_an_anonymous_seal_is_not_refused() {
    // The rotation a RotateFirst policy makes is part of a key use (the
    // seal), configured by whoever built the keyring: it follows the rule of
    // key use (counted, not refused), so an expired cryptoperiod never turns
    // into an outage for a service that sets no actor.
    use phi_envelope::keyring::{KeyPolicy, OnExpired};
    use std::time::Duration;
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    kms.backdate("records", 1, Duration::from_secs(100 * 24 * 3600));
    let sink = Arc::new(MemorySink::new());
    let keyring = Keyring::builder()
        .provider(kms.clone())
        .recipient(key.clone())
        .event_sink(sink.clone())
        .key_policy(
            key.clone(),
            KeyPolicy::new()
                .cryptoperiod(Duration::from_secs(90 * 24 * 3600))
                .on_expired(OnExpired::RotateFirst),
        )
        .build()
        .unwrap();
    let env = Envelope::new(keyring);
    let sealed = env.seal(b"x", &ctx("1")).await.unwrap();
    let info = phi_envelope::envelope::inspect(&sealed).unwrap();
    assert_eq!(info.header.recipients()[0].key_version, 2);
    let rotate = only(&sink.events(), Operation::Rotate);
    assert_eq!(rotate.outcome, Outcome::Success);
    assert_eq!(rotate.actor, None);
    // describe, rotate, describe, generate: all without an actor.
    assert!(env.keyring().calls_without_actor() >= 3);
}
