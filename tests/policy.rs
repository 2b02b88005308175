//! The policy hook: segregation of duties, closure policies and their
//! combination; a denial is a clear error and an event, and the provider is
//! never called.

mod conformance;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use conformance::{ctx, MemoryKms};
use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::policy::{
    AllOf, Decision, FnPolicy, Policy, PolicyRequest, Role, SegregationOfDuties,
};
use phi_envelope::provider::KeyState;
use phi_envelope::{Caller, Envelope, Error, KeyRef, Keyring};

fn sod() -> SegregationOfDuties {
    SegregationOfDuties::new()
        .custodian("kms-admin")
        .data_user("lab-service")
}

fn req(op: Operation, actor: Option<&str>) -> PolicyRequest {
    let r = PolicyRequest::new(op, "local").with_key("local:records", Some(1));
    match actor {
        Some(a) => r.with_actor(a).with_purpose("test"),
        None => r,
    }
}

#[test]
fn segregation_of_duties_matrix() {
    let p = sod();
    let management = [
        Operation::CreateKey,
        Operation::Rotate,
        Operation::SetState,
        Operation::Destroy,
    ];
    let encrypt = [
        Operation::Generate,
        Operation::Wrap,
        Operation::CacheHitEncrypt,
        Operation::Rewrap,
    ];
    let decrypt = [Operation::Unwrap, Operation::CacheHitDecrypt];
    for op in management {
        assert!(p.check(&req(op, Some("kms-admin"))).is_allow(), "{op}");
        assert!(!p.check(&req(op, Some("lab-service"))).is_allow(), "{op}");
    }
    for op in encrypt.iter().chain(&decrypt) {
        assert!(p.check(&req(*op, Some("lab-service"))).is_allow(), "{op}");
        assert!(!p.check(&req(*op, Some("kms-admin"))).is_allow(), "{op}");
    }
    // Describing a key (metadata only) is open to both roles.
    assert!(p
        .check(&req(Operation::Describe, Some("kms-admin")))
        .is_allow());
    assert!(p
        .check(&req(Operation::Describe, Some("lab-service")))
        .is_allow());
    // Every operation is classified: nothing falls through to "allow".
    for op in Operation::ALL {
        for actor in [None, Some("stranger")] {
            assert!(!p.check(&req(*op, actor)).is_allow(), "{op} by {actor:?}");
        }
    }
    // The reasons say who, what and why.
    match p.check(&req(Operation::Unwrap, Some("kms-admin"))) {
        Decision::Deny(r) => {
            assert!(
                r.contains("kms-admin") && r.contains("key custodian") && r.contains("unwrap"),
                "{r}"
            )
        }
        Decision::Allow => unreachable!(),
    }
    match p.check(&req(Operation::Destroy, Some("lab-service"))) {
        Decision::Deny(r) => assert!(r.contains("data user") && r.contains("destroy"), "{r}"),
        Decision::Allow => unreachable!(),
    }
    match p.check(&req(Operation::Unwrap, None)) {
        Decision::Deny(r) => assert!(r.contains("without an actor"), "{r}"),
        Decision::Allow => unreachable!(),
    }
}

#[test]
fn unknown_actors_and_double_roles() {
    let lenient = sod().unknown_actors(Some(Role::DataUser));
    assert!(lenient
        .check(&req(Operation::Unwrap, Some("stranger")))
        .is_allow());
    assert!(lenient.check(&req(Operation::Unwrap, None)).is_allow());
    assert!(!lenient
        .check(&req(Operation::Rotate, Some("stranger")))
        .is_allow());
    // Named roles still win over the default for unknown actors.
    assert!(!lenient
        .check(&req(Operation::Unwrap, Some("kms-admin")))
        .is_allow());

    let both = sod().data_user("kms-admin");
    assert_eq!(both.role_of(Some("kms-admin")), None);
    for op in Operation::ALL {
        match both.check(&req(*op, Some("kms-admin"))) {
            Decision::Deny(r) => assert!(r.contains("both"), "{r}"),
            Decision::Allow => panic!("{op} allowed to an actor with both roles"),
        }
    }
    assert_eq!(sod().role_of(Some("lab-service")), Some(Role::DataUser));
    assert_eq!(sod().role_of(Some("kms-admin")), Some(Role::KeyCustodian));
    assert_eq!(sod().role_of(None), None);
}

#[test]
fn combinators() {
    let needs_purpose = FnPolicy::new(|r: &PolicyRequest| match r.purpose.as_deref() {
        Some(_) => Decision::Allow,
        None => Decision::Deny("a purpose is required".into()),
    });
    let all = AllOf::new()
        .and(Arc::new(sod()))
        .and(Arc::new(needs_purpose));
    assert!(all
        .check(&req(Operation::Unwrap, Some("lab-service")))
        .is_allow());
    let no_purpose = PolicyRequest::new(Operation::Unwrap, "local").with_actor("lab-service");
    assert_eq!(
        all.check(&no_purpose),
        Decision::Deny("a purpose is required".into())
    );
    // The first denial in order is the answer.
    match all.check(&PolicyRequest::new(Operation::Unwrap, "local").with_actor("kms-admin")) {
        Decision::Deny(r) => assert!(r.contains("segregation"), "{r}"),
        Decision::Allow => unreachable!(),
    }
    assert!(AllOf::new().check(&no_purpose).is_allow());
    assert_eq!(
        format!("{:?}", FnPolicy::new(|_: &PolicyRequest| Decision::Allow)),
        "FnPolicy"
    );
}

struct Setup {
    kms: Arc<MemoryKms>,
    key: KeyRef,
    sink: Arc<MemorySink>,
    keyring: Arc<Keyring>,
}

fn setup(policy: Arc<dyn Policy>) -> Setup {
    let kms = Arc::new(MemoryKms::new("kms"));
    let key = kms.add_key("records");
    let sink = Arc::new(MemorySink::new());
    let keyring = Arc::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .event_sink(sink.clone())
            .policy(policy)
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

fn calls(s: &Setup) -> usize {
    s.kms.calls.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_denial_stops_the_provider_call_and_is_an_event() {
    let s = setup(Arc::new(sod()));
    let lab = Envelope::from_shared(s.keyring.clone()).as_caller("lab-service", "treatment");
    let admin = Envelope::from_shared(s.keyring.clone()).as_caller("kms-admin", "maintenance");
    let stranger = Envelope::from_shared(s.keyring.clone()).as_caller("stranger", "curiosity");
    let c = ctx("1");
    let sealed = lab.seal(b"potassium 4.1", &c).await.unwrap();
    assert_eq!(lab.open(&sealed, &c).await.unwrap(), b"potassium 4.1");
    s.sink.take();

    // A custodian cannot decrypt (record or stream) nor encrypt.
    let before = calls(&s);
    for e in [
        admin.open(&sealed, &c).await.unwrap_err(),
        admin.decryptor(&sealed[..], &c).await.err().unwrap(),
        admin.seal(b"x", &c).await.unwrap_err(),
        admin.rewrap(&sealed, &c).await.unwrap_err(),
        stranger.open(&sealed, &c).await.unwrap_err(),
    ] {
        match &e {
            Error::PolicyDenied(reason) => assert!(reason.contains("segregation of duties")),
            other => panic!("expected PolicyDenied, got {other:?}"),
        }
        assert!(e.to_string().starts_with("denied by policy: "), "{e}");
    }
    assert_eq!(
        calls(&s),
        before,
        "the provider was called despite the denial"
    );
    let events = s.sink.take();
    assert_eq!(events.len(), 5);
    for e in &events {
        assert_eq!(e.outcome, Outcome::Denied);
        assert!(e.context_fingerprint.is_some());
        assert_eq!(e.provider, "kms");
        assert_eq!(e.key_ref.as_deref(), Some(s.key.as_str()));
    }
    assert_eq!(events[0].operation, Operation::Unwrap);
    assert_eq!(events[0].actor.as_deref(), Some("kms-admin"));
    assert_eq!(events[2].operation, Operation::Generate);
    assert_eq!(events[4].actor.as_deref(), Some("stranger"));

    // A data user cannot manage keys: destroy is refused before the
    // provider destroys anything (the data still opens afterwards).
    let lab_caller = Caller::new("lab-service", "cleanup");
    for e in [
        s.keyring.destroy(&s.key, 1, &lab_caller).await.unwrap_err(),
        s.keyring.rotate(&s.key, &lab_caller).await.unwrap_err(),
        s.keyring
            .set_state(&s.key, 1, KeyState::Disabled, &lab_caller)
            .await
            .unwrap_err(),
        s.keyring.create_key(&s.key, &lab_caller).await.unwrap_err(),
    ] {
        assert!(matches!(e, Error::PolicyDenied(_)), "{e:?}");
    }
    let events = s.sink.take();
    assert_eq!(
        events.iter().map(|e| e.operation).collect::<Vec<_>>(),
        [
            Operation::Destroy,
            Operation::Rotate,
            Operation::SetState,
            Operation::CreateKey
        ]
    );
    assert!(events.iter().all(|e| e.outcome == Outcome::Denied));
    assert_eq!(lab.open(&sealed, &c).await.unwrap(), b"potassium 4.1");

    // The custodian may destroy; then nobody can read the record.
    let admin_caller = Caller::new("kms-admin", "retention-expiry");
    s.keyring.destroy(&s.key, 1, &admin_caller).await.unwrap();
    assert!(lab.open(&sealed, &c).await.is_err());
}

#[tokio::test]
async fn the_policy_sees_the_request_before_the_provider_and_no_context_values() {
    let seen: Arc<Mutex<Vec<(PolicyRequest, usize)>>> = Arc::default();
    let counter: Arc<AtomicUsize> = Arc::default();
    let kms_slot: Arc<Mutex<Option<Arc<MemoryKms>>>> = Arc::default();
    let (seen2, kms_slot2) = (seen.clone(), kms_slot.clone());
    let policy = FnPolicy::new(move |r: &PolicyRequest| {
        let calls = kms_slot2
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |k| k.calls.load(Ordering::SeqCst));
        seen2.lock().unwrap().push((r.clone(), calls));
        Decision::Allow
    });
    let s = setup(Arc::new(policy));
    *kms_slot.lock().unwrap() = Some(s.kms.clone());
    let env = Envelope::from_shared(s.keyring.clone()).as_caller("lab-service", "treatment");
    let secret = "MRN-5550123-Jane-Roe";
    let c = ctx("1").with("patient", secret).unwrap();
    let sealed = env.seal(b"x", &c).await.unwrap();
    counter.store(calls(&s), Ordering::SeqCst);
    env.open(&sealed, &c).await.unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let (gen, calls_at_gen) = &seen[0];
    let (unwrap, calls_at_unwrap) = &seen[1];
    assert_eq!(gen.operation, Operation::Generate);
    assert_eq!(*calls_at_gen, 0, "asked before the provider's first call");
    assert_eq!(unwrap.operation, Operation::Unwrap);
    assert_eq!(*calls_at_unwrap, counter.load(Ordering::SeqCst));
    for (r, _) in seen.iter() {
        assert_eq!(r.actor.as_deref(), Some("lab-service"));
        assert_eq!(r.purpose.as_deref(), Some("treatment"));
        assert_eq!(r.key_ref.as_deref(), Some(s.key.as_str()));
        assert_eq!(
            r.context_fingerprint.as_deref(),
            Some(s.keyring.context_fingerprint(&c).as_str())
        );
        assert!(!format!("{r:?}").contains(secret));
    }
    assert_eq!(unwrap.key_version, Some(1));
}

#[tokio::test]
async fn a_denial_that_cannot_be_recorded_fails_closed() {
    #[derive(Debug)]
    struct Broken;
    impl phi_envelope::events::EventSink for Broken {
        fn record(
            &self,
            _: &phi_envelope::events::Event,
        ) -> Result<(), phi_envelope::events::SinkError> {
            Err(phi_envelope::events::SinkError("no space".into()))
        }
    }
    let kms = Arc::new(MemoryKms::new("kms"));
    let key = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key)
            .event_sink(Arc::new(Broken))
            .policy(Arc::new(SegregationOfDuties::new()))
            .build()
            .unwrap(),
    );
    // Still refused (and the provider still not called); the error says
    // the audit trail is down, the more urgent of the two problems.
    let e = env.seal(b"x", &ctx("1")).await.unwrap_err();
    assert!(matches!(e, Error::Audit(_)), "{e:?}");
    assert_eq!(kms.calls.load(Ordering::SeqCst), 0);
}
