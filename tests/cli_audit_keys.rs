//! The CLI's audit chain is keyed by default, with its key sealed in the
//! keystore (docs/AUDIT-KEYS.md): made on the first use of a new log,
//! unsealed by every writer and verifier, recoverable by an independent
//! decoder from the keystore and its passphrase alone, never silently
//! replaced, and a bare checksum chain only when asked. The checkpoint
//! signing key is sealed the same way.

mod cli_support;

use std::fs;
use std::process::Command;

use cli_support::{stdout, Env, PASSPHRASE};

fn first_line(path: &std::path::Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// A keyring made with a log: the sealed key beside the keystore, an
/// HMAC chain under it, and `audit verify` using it with no key file.
fn keyed_env() -> Env {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&["--audit-log", "audit.jsonl", "keys", "init"]);
    e.ok(&["--audit-log", "audit.jsonl", "encrypt", "-o", "f.phi", "f"]);
    e
}

#[test]
fn the_chain_is_keyed_by_default_with_its_key_sealed_beside_the_keystore() {
    let e = keyed_env();
    let header = first_line(&e.path("audit.jsonl"));
    assert_eq!(header["mac"], "hmac-sha256", "{header}");
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    let bytes = fs::read(&sealed).unwrap();
    assert!(bytes.starts_with(b"PHIENV"), "not a sealed message");
    // The sealing key is a keystore key like any other.
    let list = stdout(&e.ok(&["keys", "list"]));
    assert!(list.contains("local:audit"), "{list}");
    let out = stdout(&e.ok(&["audit", "verify", "audit.jsonl"]));
    assert!(out.contains("hmac-sha256"), "{out}");
    assert!(out.contains(header["key_id"].as_str().unwrap()), "{out}");
    // The unseal is a key use, recorded in the trail it keys.
    let log = fs::read_to_string(e.path("audit.jsonl")).unwrap();
    assert!(
        log.contains(r#""operation":"unwrap","provider":"local","key_ref":"local:audit""#),
        "{log}"
    );
}

/// Whoever can write the log but has no key cannot rewrite it as a
/// checksum chain: the verifier takes the sealed key whatever the log says
/// of itself.
#[test]
fn a_log_rewritten_as_an_unkeyed_chain_is_refused() {
    let e = keyed_env();
    let other = Env::new();
    fs::write(other.path("f"), b"phi").unwrap();
    other.ok(&[
        "--audit-log",
        "forged.jsonl",
        "--audit-unkeyed",
        "keys",
        "init",
    ]);
    fs::copy(other.path("forged.jsonl"), e.path("audit.jsonl")).unwrap();
    let err = e.fails(&["audit", "verify", "audit.jsonl"], 2);
    assert!(err.contains("unkeyed"), "{err}");
    // Asked for on purpose, a checksum chain is checked as one.
    let out = stdout(&e.ok(&["--audit-unkeyed", "audit", "verify", "audit.jsonl"]));
    assert!(out.contains("a checksum only"), "{out}");
}

#[test]
fn a_log_whose_sealed_key_is_missing_is_never_continued_under_a_new_key() {
    let e = keyed_env();
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    fs::rename(&sealed, e.path("moved.phienv")).unwrap();
    let before = fs::read(e.path("audit.jsonl")).unwrap();
    let err = e.fails(
        &["--audit-log", "audit.jsonl", "encrypt", "-o", "g.phi", "f"],
        6,
    );
    let key_id = first_line(&e.path("audit.jsonl"))["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.contains(&key_id) && err.contains("--audit-key-sealed"),
        "{err}"
    );
    assert_eq!(fs::read(e.path("audit.jsonl")).unwrap(), before);
    assert!(!sealed.exists(), "a new key was made");
    assert!(!e.path("g.phi").exists());
    // Pointed at the moved copy, it goes on.
    e.ok(&[
        "--audit-log",
        "audit.jsonl",
        "--audit-key-sealed",
        "moved.phienv",
        "encrypt",
        "-o",
        "g.phi",
        "f",
    ]);
    e.ok(&[
        "--audit-key-sealed",
        "moved.phienv",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
}

#[test]
fn an_unkeyed_log_goes_on_only_when_asked() {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&[
        "--audit-log",
        "old.jsonl",
        "--audit-unkeyed",
        "keys",
        "init",
    ]);
    assert_eq!(first_line(&e.path("old.jsonl"))["mac"], "sha256");
    let err = e.fails(
        &["--audit-log", "old.jsonl", "encrypt", "-o", "f.phi", "f"],
        6,
    );
    assert!(err.contains("--audit-unkeyed"), "{err}");
    assert!(!e.path("f.phi").exists());
    e.ok(&[
        "--audit-log",
        "old.jsonl",
        "--audit-unkeyed",
        "encrypt",
        "-o",
        "f.phi",
        "f",
    ]);
}

#[test]
fn a_sealed_key_of_another_keystore_is_refused_and_no_key_is_used() {
    let a = keyed_env();
    let b = Env::new();
    fs::write(b.path("f"), b"phi").unwrap();
    b.ok(&["keys", "init"]);
    b.ok(&["keys", "create", "local:audit"]);
    fs::copy(
        a.keystore.parent().unwrap().join("audit-key.phienv"),
        b.path("a.phienv"),
    )
    .unwrap();
    let err = b.fails(
        &[
            "--audit-log",
            "audit.jsonl",
            "--audit-key-sealed",
            "a.phienv",
            "encrypt",
            "-o",
            "f.phi",
            "f",
        ],
        6,
    );
    assert!(err.contains("cannot open the sealed key"), "{err}");
    assert!(!b.path("f.phi").exists());
    assert!(!b.path("audit.jsonl").exists());
}

/// Recoverable without this crate: the independent keystore decoder
/// (written from docs/KEYSTORE.md and docs/FORMAT.md) opens the sealed
/// audit key with the keystore and its passphrase alone; its key id is the
/// one in the log's header, and the raw key verifies the chain.
#[test]
fn the_independent_decoder_recovers_the_audit_key_from_the_keystore() {
    let e = keyed_env();
    fs::write(e.path("pass"), PASSPHRASE).unwrap();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/independent/keystore_recover.py"
        ))
        .arg("--keystore")
        .arg(&e.keystore)
        .arg("--passphrase-file")
        .arg(e.path("pass"))
        .arg("--message")
        .arg(e.keystore.parent().unwrap().join("audit-key.phienv"))
        .args(["--context", "phi-envelope-secret=audit-key/1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key_hex = v["plaintext"].as_str().unwrap();
    assert_eq!(key_hex.len(), 64);
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let id = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw),
        b"phi-envelope-audit/1 key-id\0",
    );
    let id_hex: String = id.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(first_line(&e.path("audit.jsonl"))["key_id"], id_hex);
    fs::write(e.path("raw.key"), key_hex).unwrap();
    // Without the keystore at all.
    fs::remove_file(&e.keystore).unwrap();
    e.ok(&[
        "--audit-key-file",
        "raw.key",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
}

#[test]
fn the_checkpoint_signing_key_is_sealed_by_default() {
    let e = keyed_env();
    let out = stdout(&e.ok(&["audit", "checkpoint-keygen", "--out", "cp.key"]));
    let pk = out.split_whitespace().nth(3).unwrap().to_owned();
    assert_eq!(pk.len(), 64, "{out}");
    assert!(fs::read(e.path("cp.key")).unwrap().starts_with(b"PHIENV"));
    e.ok(&[
        "audit",
        "checkpoint",
        "audit.jsonl",
        "--signing-key",
        "cp.key",
        "--out",
        "cps",
    ]);
    e.ok(&[
        "audit",
        "verify",
        "audit.jsonl",
        "--checkpoints",
        "cps",
        "--checkpoint-public-key",
        &pk,
    ]);
    // The audit key is not a signing key, though both are sealed alike.
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    let sealed = sealed.to_str().unwrap();
    let err = e.fails(
        &[
            "audit",
            "checkpoint",
            "audit.jsonl",
            "--signing-key",
            sealed,
        ],
        6,
    );
    assert!(err.contains("cannot open the sealed key"), "{err}");
    // A bare seed only when asked.
    e.ok(&[
        "audit",
        "checkpoint-keygen",
        "--unsealed",
        "--out",
        "bare.seed",
    ]);
    let bare = fs::read_to_string(e.path("bare.seed")).unwrap();
    assert_eq!(bare.trim().len(), 64);
}
