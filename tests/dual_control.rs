//! Dual control on the local keystore: destroy, disable, enable and
//! decrypt-only need signed approvals from K distinct registered
//! custodians; every way an approval can be wrong is refused before any
//! provider call, with an error saying what is missing; the events name
//! the approvers; and the signed encoding matches its committed vector.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use phi_envelope::approval::{
    approval_message, Approval, Custodian, CustodianKey, DualControl, GuardedOperation,
};
use phi_envelope::events::{Event, MemorySink, Operation, Outcome};
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::{KeyState, ProviderErrorKind};
use phi_envelope::{Caller, EncryptionContext, Envelope, Error, KeyRef, Keyring};

/// The injected clock's start: 2026-12-03T18:00:00Z.
const T0: u64 = 1_796_320_800;
const HOUR: u64 = 3600;

struct Setup {
    _dir: tempfile::TempDir,
    key: KeyRef,
    alice: CustodianKey,
    bob: CustodianKey,
    carol: CustodianKey,
    now: Arc<AtomicU64>,
    sink: Arc<MemorySink>,
    envelope: Envelope,
    /// A record sealed under version 1 (decrypt-only after the rotation).
    old: Vec<u8>,
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("tenant", "st-mary").unwrap()
}

fn operator() -> Caller {
    Caller::new("dave", "retention-end")
}

/// Three custodians, threshold 2, every guardable verb guarded; key
/// `local:records` with v1 decrypt-only (a record under it) and v2 primary.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let (alice, bob, carol) = (
        CustodianKey::generate("alice").unwrap(),
        CustodianKey::generate("bob").unwrap(),
        CustodianKey::generate("carol").unwrap(),
    );
    let now = Arc::new(AtomicU64::new(T0));
    let clock = {
        let now = now.clone();
        Arc::new(move || UNIX_EPOCH + Duration::from_secs(now.load(Ordering::SeqCst)))
    };
    let dual = DualControl::new(
        vec![alice.custodian(), bob.custodian(), carol.custodian()],
        2,
    )
    .unwrap()
    .clock(clock);
    let sink = Arc::new(MemorySink::new());
    let keyring = Keyring::builder()
        .provider(Arc::new(store))
        .recipient(key.clone())
        .event_sink(sink.clone())
        .dual_control(dual)
        .build()
        .unwrap();
    let envelope = Envelope::new(keyring).as_caller("lab", "treatment");
    let old = envelope.seal(b"under v1", &ctx()).await.unwrap();
    envelope.keyring().rotate(&key, &operator()).await.unwrap();
    sink.take();
    Setup {
        _dir: dir,
        key,
        alice,
        bob,
        carol,
        now,
        sink,
        envelope,
        old,
    }
}

impl Setup {
    fn keyring(&self) -> &Keyring {
        self.envelope.keyring()
    }

    /// An approval by `who` of `op` on `version` of the key, expiring in an
    /// hour of the injected clock.
    fn approve(&self, who: &CustodianKey, op: GuardedOperation, version: u32) -> Approval {
        let expires = self.now.load(Ordering::SeqCst) + HOUR;
        who.approve_with(op, &self.key, version, expires, random_nonce())
            .unwrap()
    }

    async fn destroy(&self, approvals: &[Approval]) -> phi_envelope::Result<()> {
        self.keyring()
            .destroy_approved(&self.key, 1, &operator(), approvals)
            .await
            .map(drop)
    }

    /// The keyring made no provider call since `calls`, and version 1 is
    /// still there: the old record opens. Returns the new call count (the
    /// open is one).
    async fn v1_untouched(&self, calls: u64) -> u64 {
        assert_eq!(
            self.keyring().provider_calls(),
            calls,
            "a provider was called"
        );
        assert_eq!(
            self.envelope.open(&self.old, &ctx()).await.unwrap(),
            b"under v1"
        );
        self.keyring().provider_calls()
    }
}

fn random_nonce() -> Vec<u8> {
    let mut n = vec![0u8; 16];
    phi_envelope::primitives::fill_random(&mut n).unwrap();
    n
}

/// The text of an `Error::Approval`, or a panic.
#[track_caller]
fn refusal<T: std::fmt::Debug>(r: phi_envelope::Result<T>) -> String {
    match r {
        Err(Error::Approval(text)) => text,
        other => panic!("expected a dual-control refusal, got {other:?}"),
    }
}

/// The single event of `operation`.
fn only(events: &[Event], operation: Operation) -> Event {
    let found: Vec<&Event> = events.iter().filter(|e| e.operation == operation).collect();
    assert_eq!(found.len(), 1, "{operation}: {events:?}");
    found[0].clone()
}

#[tokio::test]
async fn destroy_is_refused_with_one_approval_and_done_with_two_distinct_custodians() {
    let s = setup().await;
    let calls = s.keyring().provider_calls();

    // No approval at all: the plain verb is refused too.
    let text = refusal(s.keyring().destroy(&s.key, 1, &operator()).await);
    assert!(
        text.contains("needs approvals from 2 distinct custodians, got 0; missing 2"),
        "{text}"
    );
    let refused = only(&s.sink.take(), Operation::Destroy);
    assert!(refused.approvers.is_empty());
    assert!(!refused.to_json().contains("approvers"));
    let one = [s.approve(&s.alice, GuardedOperation::Destroy, 1)];
    let text = refusal(s.destroy(&one).await);
    assert!(
        text.contains("destroy of local:records version 1 needs approvals from 2 distinct custodians, got 1 (alice); missing 1"),
        "{text}"
    );
    s.v1_untouched(calls).await;
    let refused = only(&s.sink.take(), Operation::Destroy);
    assert_eq!(refused.outcome, Outcome::Failed("approval".into()));
    assert_eq!(refused.approvers, ["alice"]);

    // A refused approval was not spent: alice's counts with bob's now.
    let two = [
        one[0].clone(),
        s.approve(&s.bob, GuardedOperation::Destroy, 1),
    ];
    s.destroy(&two).await.unwrap();
    match s.envelope.open(&s.old, &ctx()).await {
        Err(Error::Provider(e)) => assert_eq!(e.kind(), ProviderErrorKind::KeyDestroyed),
        other => panic!("{other:?}"),
    }
    let info = s.keyring().describe(&s.key, &operator()).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);
}

#[tokio::test]
async fn the_destroy_event_names_the_approvers_and_its_audit_line_reads_back() {
    let s = setup().await;
    let two = [
        s.approve(&s.bob, GuardedOperation::Destroy, 1),
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
    ];
    s.destroy(&two).await.unwrap();
    let e = only(&s.sink.take(), Operation::Destroy);
    assert_eq!(e.outcome, Outcome::Success);
    assert_eq!(e.approvers, ["alice", "bob"], "sorted, each once");
    assert_eq!(e.actor.as_deref(), Some("dave"));
    let json = e.to_json();
    assert!(
        json.contains(r#""key_state":"destroyed","approvers":["alice","bob"],"actor":"dave""#),
        "{json}"
    );
    let back = Event::from_json(&json).unwrap();
    assert_eq!(back.approvers, e.approvers);
    assert_eq!(back.to_json(), json);
}

#[tokio::test]
async fn an_audit_log_with_approvers_verifies_and_old_lines_encode_as_before() {
    use phi_envelope::audit::{AuditKey, AuditLog, Verifier};
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit_key = AuditKey::new(&[9u8; 32]).unwrap();
    let log = AuditLog::builder()
        .audit_key(audit_key.clone())
        .open(&path)
        .unwrap();
    use phi_envelope::events::EventSink;
    let two = [
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
        s.approve(&s.carol, GuardedOperation::Destroy, 1),
    ];
    s.destroy(&two).await.unwrap();
    for e in s.sink.take() {
        log.record(&e).unwrap();
    }
    drop(log);
    let report = Verifier::new().key(audit_key).verify(&path).unwrap();
    assert_eq!(report.entries, 1, "{report:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(r#""approvers":["alice","carol"]"#), "{text}");

    // A line without approvers (every line written before the field
    // existed) parses and re-encodes to the same bytes.
    let old = r#"{"timestamp":"2026-11-25T10:11:01.123456Z","operation":"destroy","provider":"local","key_ref":"local:records","key_version":1,"key_state":"destroyed","actor":"alice","purpose":"retire","context_fingerprint":null,"outcome":"success","duration_us":412}"#;
    let e = Event::from_json(old).unwrap();
    assert!(e.approvers.is_empty());
    assert_eq!(e.to_json(), old);
}

#[tokio::test]
async fn two_approvals_by_one_custodian_count_once() {
    let s = setup().await;
    let calls = s.keyring().provider_calls();
    let twice = [
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
    ];
    let text = refusal(s.destroy(&twice).await);
    assert!(
        text.contains("got 1 (alice) (approvals by one custodian count once); missing 1"),
        "{text}"
    );
    // However many: and a flood is refused before any signature check.
    let many = vec![twice[0].clone(); 64];
    let text = refusal(s.destroy(&many).await);
    assert!(
        text.contains("got 1 (alice) (approvals by one custodian count once)"),
        "{text}"
    );
    let flood = vec![twice[0].clone(); 65];
    let text = refusal(s.destroy(&flood).await);
    assert!(
        text.contains("65 approvals given, at most 64 are read"),
        "{text}"
    );
    s.v1_untouched(calls).await;
}

#[tokio::test]
async fn an_expired_approval_is_refused() {
    let s = setup().await;
    let mut calls = s.keyring().provider_calls();
    let two = [
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
        s.approve(&s.bob, GuardedOperation::Destroy, 1),
    ];
    // One second past the expiry (the expiry itself is already refused).
    s.now.fetch_add(HOUR, Ordering::SeqCst);
    let text = refusal(s.destroy(&two).await);
    assert!(
        text.contains("approval 1 (custodian alice) expired 0 s ago; ask alice for a new one"),
        "{text}"
    );
    s.now.fetch_add(1, Ordering::SeqCst);
    let text = refusal(s.destroy(&two).await);
    assert!(text.contains("expired 1 s ago"), "{text}");
    calls = s.v1_untouched(calls).await;

    // An expiry further away than the maximum validity (24 h) is refused.
    let far = T0 + 3 * 24 * HOUR;
    let long = [
        s.alice
            .approve_with(GuardedOperation::Destroy, &s.key, 1, far, random_nonce())
            .unwrap(),
        s.approve(&s.bob, GuardedOperation::Destroy, 1),
    ];
    let text = refusal(s.destroy(&long).await);
    assert!(
        text.contains("more than the 86400 s an approval may be valid for"),
        "{text}"
    );
    s.v1_untouched(calls).await;
}

#[tokio::test]
async fn a_replayed_approval_is_refused() {
    let s = setup().await;
    let disable = [
        s.approve(&s.alice, GuardedOperation::Disable, 1),
        s.approve(&s.bob, GuardedOperation::Disable, 1),
    ];
    s.keyring()
        .set_state_approved(&s.key, 1, KeyState::Disabled, &operator(), &disable)
        .await
        .unwrap();
    assert_eq!(
        only(&s.sink.take(), Operation::SetState).approvers,
        ["alice", "bob"]
    );
    let back = [
        s.approve(&s.alice, GuardedOperation::DecryptOnly, 1),
        s.approve(&s.carol, GuardedOperation::DecryptOnly, 1),
    ];
    s.keyring()
        .set_state_approved(&s.key, 1, KeyState::DecryptOnly, &operator(), &back)
        .await
        .unwrap();
    let e = only(&s.sink.take(), Operation::SetState);
    assert_eq!(e.approvers, ["alice", "carol"]);

    // The same disable approvals again, well within their expiry.
    let mut calls = s.keyring().provider_calls();
    let text = refusal(
        s.keyring()
            .set_state_approved(&s.key, 1, KeyState::Disabled, &operator(), &disable)
            .await,
    );
    assert!(
        text.contains("approval 1 (custodian alice) was already used (an approval is good for one operation); ask alice for a new one"),
        "{text}"
    );
    calls = s.v1_untouched(calls).await;
    // One replayed approval among fresh ones refuses the call as well.
    let mixed = [
        s.approve(&s.carol, GuardedOperation::Disable, 1),
        disable[1].clone(),
    ];
    let text = refusal(
        s.keyring()
            .set_state_approved(&s.key, 1, KeyState::Disabled, &operator(), &mixed)
            .await,
    );
    assert!(
        text.contains("approval 2 (custodian bob) was already used"),
        "{text}"
    );
    s.v1_untouched(calls).await;
}

#[tokio::test]
async fn an_unknown_custodian_is_refused() {
    let s = setup().await;
    let calls = s.keyring().provider_calls();
    let mallory = CustodianKey::generate("mallory").unwrap();
    let two = [
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
        s.approve(&mallory, GuardedOperation::Destroy, 1),
    ];
    let text = refusal(s.destroy(&two).await);
    assert!(
        text.contains("approval 2 is by \"mallory\", who is not a registered custodian"),
        "{text}"
    );
    // A key that claims a registered id but is not its registered key.
    let fake_bob = CustodianKey::generate("bob").unwrap();
    let two = [
        s.approve(&s.alice, GuardedOperation::Destroy, 1),
        s.approve(&fake_bob, GuardedOperation::Destroy, 1),
    ];
    let text = refusal(s.destroy(&two).await);
    assert!(
        text.contains(
            "the signature of approval 2 does not verify under custodian bob's registered key"
        ),
        "{text}"
    );
    s.v1_untouched(calls).await;
}

#[tokio::test]
async fn an_approval_for_another_key_version_or_operation_is_refused() {
    let s = setup().await;
    let calls = s.keyring().provider_calls();
    let other_key: KeyRef = "local:other".parse().unwrap();
    let expires = T0 + HOUR;
    let wrong = [
        (
            s.bob
                .approve_with(
                    GuardedOperation::Destroy,
                    &other_key,
                    1,
                    expires,
                    random_nonce(),
                )
                .unwrap(),
            "is for destroy of local:other version 1, not for this operation",
        ),
        (
            s.approve(&s.bob, GuardedOperation::Destroy, 2),
            "is for destroy of local:records version 2, not for this operation",
        ),
        (
            s.approve(&s.bob, GuardedOperation::Disable, 1),
            "is for disable of local:records version 1, not for this operation",
        ),
    ];
    for (approval, expected) in wrong {
        let two = [s.approve(&s.alice, GuardedOperation::Destroy, 1), approval];
        let text = refusal(s.destroy(&two).await);
        assert!(
            text.contains(&format!("approval 2 (custodian bob) {expected}")),
            "{text}"
        );
    }
    // An approval of set_state to another state than the one asked for.
    let enable = [
        s.approve(&s.alice, GuardedOperation::Enable, 1),
        s.approve(&s.bob, GuardedOperation::Enable, 1),
    ];
    let text = refusal(
        s.keyring()
            .set_state_approved(&s.key, 1, KeyState::Disabled, &operator(), &enable)
            .await,
    );
    assert!(
        text.contains("is for enable of local:records version 1"),
        "{text}"
    );
    s.v1_untouched(calls).await;
}

#[tokio::test]
async fn a_tampered_approval_is_refused() {
    let s = setup().await;
    let calls = s.keyring().provider_calls();
    let alice = s.approve(&s.alice, GuardedOperation::Destroy, 1);
    let bob = s.approve(&s.bob, GuardedOperation::Destroy, 1);

    let mut flipped = bob.clone();
    flipped.signature[10] ^= 0x01;
    // Fields moved after signing: the signature no longer covers them.
    let mut later = bob.clone();
    later.expires_at += 60;
    let mut renonced = bob.clone();
    renonced.nonce[0] ^= 0x80;
    // Bob's signature presented as carol's.
    let mut relabelled = bob.clone();
    relabelled.custodian = "carol".into();
    for (tampered, who) in [
        (flipped, "bob"),
        (later, "bob"),
        (renonced, "bob"),
        (relabelled, "carol"),
    ] {
        let text = refusal(s.destroy(&[alice.clone(), tampered]).await);
        assert!(
            text.contains(&format!(
                "the signature of approval 2 does not verify under custodian {who}'s registered key"
            )),
            "{text}"
        );
    }
    // Through the approval file: a changed version byte is caught.
    let json = bob.to_json().replace("\"version\":1", "\"version\":3");
    let parsed = Approval::from_json(&json).unwrap();
    let text = refusal(s.destroy(&[alice.clone(), parsed]).await);
    assert!(
        text.contains("is for destroy of local:records version 3"),
        "{text}"
    );
    s.v1_untouched(calls).await;
    // The genuine pair still works: nothing was spent by the refusals.
    s.destroy(&[alice, bob]).await.unwrap();
}

#[tokio::test]
async fn unguarded_verbs_and_keyrings_without_dual_control() {
    // Only destroy guarded: disable needs nothing.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let alice = CustodianKey::generate("alice").unwrap();
    let bob = CustodianKey::generate("bob").unwrap();
    let keyring = Keyring::builder()
        .provider(Arc::new(store))
        .dual_control(
            DualControl::new(vec![alice.custodian(), bob.custodian()], 2)
                .unwrap()
                .guard([GuardedOperation::Destroy]),
        )
        .build()
        .unwrap();
    keyring.rotate(&key, &operator()).await.unwrap();
    keyring.disable(&key, 1, &operator()).await.unwrap();
    let text = refusal(keyring.destroy(&key, 1, &operator()).await);
    assert!(text.contains("missing 2"), "{text}");

    // A keyring without dual control refuses approvals rather than
    // ignoring them: whoever passes them expects them to matter.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap();
    store.add_key(&key).unwrap();
    let plain = Keyring::builder()
        .provider(Arc::new(store))
        .build()
        .unwrap();
    plain.rotate(&key, &operator()).await.unwrap();
    let a = alice
        .approve(GuardedOperation::Destroy, &key, 1, Duration::from_secs(60))
        .unwrap();
    match plain.destroy_approved(&key, 1, &operator(), &[a]).await {
        Err(Error::InvalidArgument(text)) => {
            assert!(text.contains("has no dual control"), "{text}")
        }
        other => panic!("{other:?}"),
    }
    plain.destroy(&key, 1, &operator()).await.unwrap();
}

#[test]
fn dual_control_configuration_is_checked() {
    let a = CustodianKey::generate("alice").unwrap().custodian();
    let b = CustodianKey::generate("bob").unwrap().custodian();
    let err = |r: phi_envelope::Result<DualControl>| match r {
        Err(Error::InvalidArgument(t)) => t,
        other => panic!("{other:?}"),
    };
    assert!(err(DualControl::new(vec![a.clone()], 2)).contains("only 1 custodian(s)"));
    assert!(err(DualControl::new(vec![a.clone()], 0)).contains("at least 1"));
    assert!(err(DualControl::new(vec![a.clone(), a.clone()], 2)).contains("share the id"));
    let same_key = Custodian::new("bob", *a.public_key()).unwrap();
    assert!(err(DualControl::new(vec![a.clone(), same_key], 2)).contains("share one public key"));
    let ok = DualControl::new(vec![a.clone(), b.clone()], 2).unwrap();
    assert_eq!(ok.threshold(), 2);

    // The registry line round-trips; bad ids and keys are refused.
    let line = b.to_string();
    assert!(line.starts_with("bob ed25519:"), "{line}");
    assert_eq!(line.parse::<Custodian>().unwrap(), b);
    for bad in [
        "bob",
        "bob ed25519:00",
        "bob 0011",
        "b o b ed25519:00",
        "bad id ed25519:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    ] {
        assert!(bad.parse::<Custodian>().is_err(), "{bad}");
    }
}

#[test]
fn key_files_and_approval_files_round_trip_without_showing_the_seed() {
    let k = CustodianKey::generate("alice").unwrap();
    let text = k.to_file_text();
    let back = CustodianKey::from_file_text(&text).unwrap();
    assert_eq!(back.custodian(), k.custodian());
    let seed_hex = text.lines().nth(2).unwrap().strip_prefix("seed ").unwrap();
    assert!(!format!("{k:?}").contains(seed_hex), "{k:?}");
    assert!(CustodianKey::from_file_text(
        "phi-envelope-custodian-key/1\ncustodian alice\nseed 00\n"
    )
    .is_err());

    let key: KeyRef = "local:records".parse().unwrap();
    let a = k
        .approve(GuardedOperation::Destroy, &key, 4, Duration::from_secs(600))
        .unwrap();
    let json = a.to_json();
    assert_eq!(Approval::from_json(&json).unwrap(), a);
    assert!(Approval::from_json(&json.replace("approval/1", "approval/2")).is_err());
    assert!(Approval::from_json(&json.replace("\"destroy\"", "\"rotate\"")).is_err());
    assert!(Approval::from_json(&" ".repeat(5000)).is_err());
}

#[test]
fn the_signed_message_matches_the_committed_vector() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/approval-v1.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let seed: [u8; 32] = hex::decode(v["seed"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let id = v["custodian"].as_str().unwrap();
    let key = CustodianKey::from_seed(id, &seed).unwrap();
    let custodian = key.custodian();
    assert_eq!(
        hex::encode(custodian.public_key()),
        v["public_key"].as_str().unwrap()
    );
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 2);
    for case in cases {
        let op: GuardedOperation = case["operation"].as_str().unwrap().parse().unwrap();
        let key_ref: KeyRef = case["key_ref"].as_str().unwrap().parse().unwrap();
        let version = u32::try_from(case["version"].as_u64().unwrap()).unwrap();
        let expires = case["expires_at"].as_u64().unwrap();
        let nonce = hex::decode(case["nonce"].as_str().unwrap()).unwrap();
        let message = approval_message(op, key_ref.as_str(), version, expires, &nonce);
        assert_eq!(
            hex::encode(&message),
            case["message"].as_str().unwrap(),
            "{case}"
        );
        let approval = key
            .approve_with(op, &key_ref, version, expires, nonce)
            .unwrap();
        assert_eq!(approval.message(), message);
        assert_eq!(
            hex::encode(approval.signature),
            case["signature"].as_str().unwrap(),
            "{case}"
        );
    }
    // The layout, spelled out for the first case (docs/APPROVALS.md).
    let first = hex::decode(cases[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(&first[..4], &24u32.to_be_bytes());
    assert_eq!(&first[4..28], b"phi-envelope/v1 approval");
    assert_eq!(&first[28..32], &7u32.to_be_bytes());
    assert_eq!(&first[32..39], b"destroy");
}

/// A keyring over its own keystore (key `local:records`, v1 decrypt-only,
/// v2 primary) under dual control by `custodians` (threshold 2), recording
/// spent approvals in `spent`: another process, as far as replay goes.
async fn keyring_sharing(
    dir: &std::path::Path,
    name: &str,
    custodians: &[&CustodianKey],
    spent: &std::path::Path,
) -> Keyring {
    let store = LocalKeystore::create_unprotected_for_tests(dir.join(name)).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    let dual = DualControl::new(custodians.iter().map(|c| c.custodian()).collect(), 2)
        .unwrap()
        .spent_file(spent);
    let keyring = Keyring::builder()
        .provider(Arc::new(store))
        .dual_control(dual)
        .build()
        .unwrap();
    keyring.rotate(&key, &operator()).await.unwrap();
    keyring
}

#[tokio::test]
async fn a_shared_spent_file_refuses_replays_across_keyrings() {
    let dir = tempfile::tempdir().unwrap();
    let spent = dir.path().join("spent-approvals");
    let alice = CustodianKey::generate("alice").unwrap();
    let bob = CustodianKey::generate("bob").unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    let ttl = Duration::from_secs(600);
    let disable = [
        alice
            .approve(GuardedOperation::Disable, &key, 1, ttl)
            .unwrap(),
        bob.approve(GuardedOperation::Disable, &key, 1, ttl)
            .unwrap(),
    ];
    let first = keyring_sharing(dir.path(), "a.json", &[&alice, &bob], &spent).await;
    first
        .set_state_approved(&key, 1, KeyState::Disabled, &operator(), &disable)
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&spent).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&spent).unwrap().lines().count(), 2);

    // A second keyring (another process, a restart) shares the file.
    let second = keyring_sharing(dir.path(), "b.json", &[&alice, &bob], &spent).await;
    let calls = second.provider_calls();
    let text = refusal(
        second
            .set_state_approved(&key, 1, KeyState::Disabled, &operator(), &disable)
            .await,
    );
    assert!(
        text.contains("approval 1 (custodian alice) was already used (recorded in"),
        "{text}"
    );
    assert_eq!(second.provider_calls(), calls, "a provider was called");

    // A write cut short (no final newline) is ignored and cut off under the
    // lock; fresh approvals go through.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&spent)
        .unwrap();
    std::io::Write::write_all(&mut f, b"spent carol 0011").unwrap();
    drop(f);
    let fresh = [
        alice
            .approve(GuardedOperation::Disable, &key, 1, ttl)
            .unwrap(),
        bob.approve(GuardedOperation::Disable, &key, 1, ttl)
            .unwrap(),
    ];
    second
        .set_state_approved(&key, 1, KeyState::Disabled, &operator(), &fresh)
        .await
        .unwrap();
    // The torn line was cut off, not completed into a line that would
    // refuse every later verb: every line is whole.
    let text = std::fs::read_to_string(&spent).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(!text.contains("carol"), "{text}");
    assert!(text.ends_with('\n'));
    assert!(text.lines().all(|l| l.split(' ').count() == 4), "{text}");

    // A damaged file refuses the verb (fail closed) and says where.
    std::fs::write(&spent, "spent alice not-hex 1\n").unwrap();
    let again = [
        alice
            .approve(GuardedOperation::DecryptOnly, &key, 1, ttl)
            .unwrap(),
        bob.approve(GuardedOperation::DecryptOnly, &key, 1, ttl)
            .unwrap(),
    ];
    let text = refusal(
        second
            .set_state_approved(&key, 1, KeyState::DecryptOnly, &operator(), &again)
            .await,
    );
    assert!(
        text.contains("cannot be recorded as used in") && text.contains("line 1 is not"),
        "{text}"
    );
}

/// Runs the independent checker (tests/independent/approval_verify.py,
/// written from docs/APPROVALS.md); fails loudly when Python or
/// `cryptography` is missing (scripts/install-deps.sh installs them).
fn independent(args: &[&std::ffi::OsStr]) -> (bool, serde_json::Value) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/independent/approval_verify.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (run scripts/install-deps.sh): {e}"));
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "the independent checker failed (needs `cryptography`: scripts/install-deps.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), json)
}

#[test]
fn an_independent_checker_verifies_the_vector_and_approvals_made_now() {
    let vector =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/approval-v1.json");
    let (ok, v) = independent(&["--vector".as_ref(), vector.as_os_str()]);
    assert!(ok, "{v}");

    let dir = tempfile::tempdir().unwrap();
    let custodian = CustodianKey::generate("alice").unwrap();
    let public = hex::encode(custodian.custodian().public_key());
    let key: KeyRef = "aws-kms:alias/phi-backups".parse().unwrap();
    let approval = custodian
        .approve(
            GuardedOperation::DecryptOnly,
            &key,
            70_000,
            Duration::from_secs(900),
        )
        .unwrap();
    let file = dir.path().join("approval.json");
    std::fs::write(&file, approval.to_json()).unwrap();
    let (ok, v) = independent(&[
        "--approval".as_ref(),
        file.as_os_str(),
        "--public-key".as_ref(),
        public.as_ref(),
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["message"], hex::encode(approval.message()));

    let tampered = approval
        .to_json()
        .replace("\"version\":70000", "\"version\":70001");
    std::fs::write(&file, tampered).unwrap();
    let (ok, v) = independent(&[
        "--approval".as_ref(),
        file.as_os_str(),
        "--public-key".as_ref(),
        public.as_ref(),
    ]);
    assert!(!ok, "{v}");
}
