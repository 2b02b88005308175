//! Signed checkpoints of an audit trail (docs/AUDIT-CHECKPOINT.md): the
//! committed vector, made independently of the crate; a file log checked
//! with the public key only; a history rewritten by someone who holds the
//! audit key (which the HMAC chain cannot tell) found at the checkpoint; a
//! trail cut short; a checkpoint signed under another key refused.

use std::fs;
use std::time::{Duration, SystemTime};

use phi_envelope::audit::checkpoint::{
    self, parse_checkpoints, Checkpoint, CheckpointError, CheckpointKey, TrailDigest,
};
use phi_envelope::audit::{AuditKey, AuditLog, Verifier};
use phi_envelope::events::{Event, Operation, Outcome};

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    hex::decode(s).unwrap().try_into().unwrap()
}

#[test]
fn the_committed_vector() {
    let v: serde_json::Value = serde_json::from_str(
        &fs::read_to_string("tests/vectors/audit-checkpoint-v1.json").unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    // The lines are a trail the verifier accepts.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    fs::write(
        &path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    assert_eq!(Verifier::new().verify(&path).unwrap().entries, 2);
    // The digest after each line.
    let mut d = TrailDigest::new();
    for (l, want) in lines.iter().zip(v["digests"].as_array().unwrap()) {
        d.update(l.as_bytes()).unwrap();
        assert_eq!(d.digest_hex(), want.as_str().unwrap());
    }
    // The same key, the same checkpoint, byte for byte (Ed25519 is
    // deterministic).
    let key = CheckpointKey::from_seed(&unhex::<32>(v["seed"].as_str().unwrap())).unwrap();
    let pk: [u8; 32] = unhex(v["public_key"].as_str().unwrap());
    assert_eq!(key.public_key(), pk);
    assert_eq!(key.id(), v["signer"].as_str().unwrap());
    let want = v["checkpoint"].as_str().unwrap();
    let parsed = Checkpoint::parse(want).unwrap();
    assert_eq!(
        hex::encode(parsed.message()),
        v["message"].as_str().unwrap()
    );
    let mine = key.sign(&d, parsed.time).unwrap();
    assert_eq!(mine.to_line(), want);
    let report =
        checkpoint::verify_lines(lines.iter().map(|l| Ok(l.as_bytes())), &[parsed], &pk).unwrap();
    assert_eq!((report.lines, report.covered_through), (3, Some(2)));
    // Any other spelling is refused.
    assert!(Checkpoint::parse(&want.replace("\"seq\":2", "\"seq\": 2")).is_err());
}

fn key() -> AuditKey {
    AuditKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

fn ev(actor: &str) -> Event {
    Event::new(Operation::Unwrap, "local", Outcome::Success)
        .with_key("local:records", Some(1))
        .with_caller(actor, "treatment")
        .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
}

fn write_log(path: &std::path::Path, actors: &[&str]) {
    let log = AuditLog::builder().audit_key(key()).open(path).unwrap();
    for a in actors {
        log.append(&ev(a)).unwrap();
    }
}

#[test]
fn a_rewritten_history_is_found_with_the_public_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, &["alice", "bob", "carol"]);
    let (signer, _seed) = CheckpointKey::generate().unwrap();
    let pk = signer.public_key();
    let cp = checkpoint::sign_log(&path, &signer).unwrap();
    assert_eq!(cp.seq, 3);
    // The auditor's copy, as text.
    let kept = parse_checkpoints(&format!("{}\n", cp.to_line())).unwrap();
    let r = checkpoint::verify_log(&path, &kept, &pk).unwrap();
    assert_eq!(r.covered_through, Some(3));

    // More entries after the checkpoint: still fine.
    write_log(&path, &["dave"]);
    let r = checkpoint::verify_log(&path, &kept, &pk).unwrap();
    assert_eq!((r.lines, r.covered_through), (5, Some(3)));

    // The log's host, holding the audit key, writes the history anew
    // without bob: the HMAC chain verifies, the checkpoint does not.
    let forged = dir.path().join("forged.jsonl");
    write_log(&forged, &["alice", "mallory", "carol", "dave"]);
    fs::rename(&forged, &path).unwrap();
    Verifier::new().key(key()).verify(&path).unwrap();
    let e = checkpoint::verify_log(&path, &kept, &pk).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Mismatch { seq: 3, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("REWRITTEN"), "{e}");
}

#[test]
fn a_trail_cut_short_of_a_checkpoint_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, &["alice", "bob", "carol"]);
    let (signer, _) = CheckpointKey::generate().unwrap();
    let cp = checkpoint::sign_log(&path, &signer).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let keep: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    fs::write(&path, keep).unwrap();
    // The chain alone cannot tell.
    Verifier::new().key(key()).verify(&path).unwrap();
    let e = checkpoint::verify_log(&path, &[cp], &signer.public_key()).unwrap_err();
    assert_eq!(
        e,
        CheckpointError::Truncated {
            seq: 3,
            last: Some(1)
        }
    );
}

#[test]
fn a_checkpoint_signed_under_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, &["alice"]);
    let (auditors, _) = CheckpointKey::generate().unwrap();
    let (other, _) = CheckpointKey::generate().unwrap();
    let cp = checkpoint::sign_log(&path, &other).unwrap();
    let e = checkpoint::verify_log(&path, std::slice::from_ref(&cp), &auditors.public_key())
        .unwrap_err();
    assert!(matches!(e, CheckpointError::WrongSigner { .. }), "{e:?}");
    // The same, claiming to be the auditor's key.
    let forged = cp.to_line().replace(&other.id(), &auditors.id());
    let forged = Checkpoint::parse(&forged).unwrap();
    let e = checkpoint::verify_log(&path, &[forged], &auditors.public_key()).unwrap_err();
    assert!(matches!(e, CheckpointError::BadSignature { .. }), "{e:?}");
    // A signature over another head is refused too.
    let good = checkpoint::sign_log(&path, &auditors).unwrap();
    let line = good.to_line();
    let head = good.head_hex();
    let flipped = format!(
        "{}{}",
        &head[..63],
        if head.ends_with('0') { "1" } else { "0" }
    );
    let tampered = Checkpoint::parse(&line.replace(&head, &flipped)).unwrap();
    let e = tampered
        .verify_signature(&auditors.public_key())
        .unwrap_err();
    assert!(matches!(e, CheckpointError::BadSignature { .. }), "{e:?}");
}
