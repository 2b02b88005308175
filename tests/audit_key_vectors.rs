//! The committed vector of the trail's sealed secrets
//! (`tests/vectors/audit-keys-v1.json`, docs/AUDIT-KEYS.md): the library
//! opens each with its kind and no other, and gets the secret, the audit
//! key id and the checkpoint public key the independent decoder got.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use phi_envelope::audit::checkpoint::CheckpointKey;
use phi_envelope::audit::sealed::{self, SecretKind};
use phi_envelope::audit::AuditKey;
use phi_envelope::provider::local::{LocalKeystore, SecretString};
use phi_envelope::{Envelope, Keyring};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vector() -> serde_json::Value {
    let text = fs::read_to_string(manifest().join("tests/vectors/audit-keys-v1.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The vector's keystore in a private directory.
fn keystore(v: &serde_json::Value) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let path = dir.path().join("keystore.json");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, v["keystore"].as_str().unwrap().as_bytes()).unwrap();
    (dir, path)
}

fn kind_of(name: &str) -> SecretKind {
    match name {
        "audit-key" => SecretKind::AuditKey,
        "checkpoint-seed" => SecretKind::CheckpointSeed,
        other => panic!("unknown kind {other}"),
    }
}

#[tokio::test]
async fn every_sealed_secret_opens_with_its_kind_only_and_matches_the_vector() {
    let v = vector();
    let (_dir, path) = keystore(&v);
    let pass = SecretString::from(v["passphrase"].as_str().unwrap().to_owned());
    let store = Arc::new(LocalKeystore::open(&path, pass).unwrap());
    let envelope = Envelope::new(Keyring::builder().provider(store).build().unwrap())
        .as_caller("vector-test", "check");
    let secrets = v["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 2);
    for s in secrets {
        let kind = kind_of(s["kind"].as_str().unwrap());
        assert_eq!(s["context"]["phi-envelope-secret"], kind.label());
        let msg = unhex(s["message_hex"].as_str().unwrap());
        let secret = sealed::unseal(&envelope, kind, &msg).await.unwrap();
        assert_eq!(hex(&secret[..]), s["secret_hex"].as_str().unwrap());
        match kind {
            SecretKind::AuditKey => {
                assert_eq!(
                    AuditKey::new(&secret[..]).unwrap().key_id(),
                    s["key_id"].as_str().unwrap()
                );
            }
            _ => {
                let key = CheckpointKey::from_seed(&secret).unwrap();
                assert_eq!(
                    hex(&key.public_key()),
                    s["public_key_hex"].as_str().unwrap()
                );
            }
        }
        let other = match kind {
            SecretKind::AuditKey => SecretKind::CheckpointSeed,
            _ => SecretKind::AuditKey,
        };
        assert!(
            matches!(
                sealed::unseal(&envelope, other, &msg).await,
                Err(phi_envelope::Error::Decrypt)
            ),
            "a {} opened as a {}",
            kind.label(),
            other.label()
        );
    }
}

#[test]
fn the_independent_decoder_recovers_every_sealed_secret() {
    let v = vector();
    let (dir, path) = keystore(&v);
    let pass = dir.path().join("pass");
    fs::write(&pass, v["passphrase"].as_str().unwrap()).unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    for s in v["secrets"].as_array().unwrap() {
        let msg = dir.path().join("msg");
        fs::write(&msg, unhex(s["message_hex"].as_str().unwrap())).unwrap();
        let ctx = format!(
            "phi-envelope-secret={}",
            s["context"]["phi-envelope-secret"].as_str().unwrap()
        );
        let out = Command::new(&python)
            .arg(manifest().join("tests/independent/keystore_recover.py"))
            .arg("--keystore")
            .arg(&path)
            .arg("--passphrase-file")
            .arg(&pass)
            .arg("--message")
            .arg(&msg)
            .args(["--context", &ctx])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python} (scripts/install-deps.sh): {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["plaintext"], s["secret_hex"]);
        assert_eq!(got["key_ref"], s["key_ref"]);
    }
}
