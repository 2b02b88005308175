//! The keystore vectors (tests/vectors/keystore-v1.json, keystore-v2.json)
//! through the public API: the committed keystore file opens with its
//! passphrase, unwraps the committed DEK and decrypts the committed message;
//! a version-1 file is upgraded by its first write. And the independent
//! decoder written from docs/KEYSTORE.md and docs/FORMAT.md alone
//! (tests/independent/keystore_recover.py) recovers the DEK and the
//! plaintext from each vector and from a keystore and message made now.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use phi_envelope::provider::local::{Argon2idParams, LocalKeystore, SecretString};
use phi_envelope::provider::{KeyProvider, KeyState, Unwrapped};
use phi_envelope::{EncryptionContext, Envelope, KeyRef, Keyring, WrappedKey};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vector(version: u32) -> (PathBuf, serde_json::Value) {
    let path = manifest().join(format!("tests/vectors/keystore-v{version}.json"));
    let v = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    (path, v)
}

fn unhex(v: &serde_json::Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn context_of(v: &serde_json::Value) -> EncryptionContext {
    EncryptionContext::from_pairs(
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())),
    )
    .unwrap()
}

fn write_0600(path: &Path, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

async fn open_message(store: &Arc<LocalKeystore>, msg: &[u8], ctx: &EncryptionContext) -> Vec<u8> {
    let keyring = Keyring::builder().provider(store.clone()).build().unwrap();
    Envelope::new(keyring)
        .as_caller("vector-test", "check")
        .open(msg, ctx)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_keystore_vector_opens_unwraps_and_decrypts_through_the_library() {
    for format_version in [1u32, 2] {
        let (_, v) = vector(format_version);
        let dir = private_dir();
        let path = dir.path().join("keystore.json");
        write_0600(&path, v["keystore_file"].as_str().unwrap().as_bytes());
        let pass = SecretString::from(v["passphrase"].as_str().unwrap().to_owned());
        let store = Arc::new(LocalKeystore::open(&path, pass.clone()).unwrap());
        let table: serde_json::Value =
            serde_json::from_str(v["table_plaintext"].as_str().unwrap()).unwrap();
        assert_eq!(
            store.generation(),
            table["generation"].as_u64().unwrap_or(0),
            "v{format_version}"
        );
        let info = &store.keys()[0];
        assert_eq!(info.key_ref.as_str(), "local:records");
        assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);
        assert_eq!(info.version(2).unwrap().state, KeyState::Enabled);

        let m = &v["message"];
        let ctx = context_of(&m["context"]);
        let entry = WrappedKey {
            provider: "local".into(),
            key_ref: m["key_ref"].as_str().unwrap().into(),
            key_version: m["key_version"].as_u64().unwrap() as u32,
            wrapped: unhex(&m["wrapped_dek_hex"]),
        };
        match store.unwrap(&entry, &ctx).await.unwrap() {
            Unwrapped::Key(d) => assert_eq!(d.expose_secret()[..], unhex(&m["dek_hex"])[..]),
            other => panic!("v{format_version}: {other:?}"),
        }
        let msg = unhex(&m["message_hex"]);
        assert_eq!(
            open_message(&store, &msg, &ctx).await,
            unhex(&m["plaintext_hex"])
        );

        if format_version == 1 {
            // The first write upgrades the file to version 2, generation 1.
            store
                .add_key(&"local:more".parse::<KeyRef>().unwrap())
                .unwrap();
            let text = fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with(r#"{"format":"phi-envelope-keystore","version":2,"#),
                "{text}"
            );
            let again = Arc::new(LocalKeystore::open(&path, pass).unwrap());
            assert_eq!(again.generation(), 1);
            assert_eq!(
                open_message(&again, &msg, &ctx).await,
                unhex(&m["plaintext_hex"])
            );
        }
    }
}

/// Runs the independent decoder; fails loudly when Python or its two
/// packages are missing (scripts/install-deps.sh installs them).
fn recover(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let script = manifest().join("tests/independent/keystore_recover.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (run scripts/install-deps.sh): {e}"));
    assert!(
        out.status.success(),
        "the independent decoder failed (needs `cryptography` and `argon2-cffi`: scripts/install-deps.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_independent_decoder_recovers_every_vector() {
    for format_version in [1u32, 2] {
        let (path, v) = vector(format_version);
        let got = recover(&["--vector".as_ref(), path.as_os_str()]);
        assert_eq!(got["ok"], true);
        assert_eq!(got["dek"], v["message"]["dek_hex"]);
        assert_eq!(got["plaintext"], v["message"]["plaintext_hex"]);
    }
}

#[tokio::test]
async fn the_independent_decoder_recovers_a_keystore_and_message_made_now() {
    let dir = private_dir();
    let path = dir.path().join("keystore.json");
    // A passphrase that is not ASCII, read from a file with a CRLF ending as
    // the CLI reads it.
    let passphrase = "Grüße, ünïcödé pässphrase";
    let store = Arc::new(
        LocalKeystore::create_with_params(
            &path,
            SecretString::from(passphrase),
            Argon2idParams::new(16 * 1024, 2, 2).unwrap(),
        )
        .unwrap(),
    );
    let k: KeyRef = "local:lab.results-2026".parse().unwrap();
    store.add_key(&k).unwrap();
    store.rotate(&k).await.unwrap();
    store
        .add_key(&"local:other".parse::<KeyRef>().unwrap())
        .unwrap();
    let ctx = EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", "ü-42")
        .unwrap()
        .with("a", "")
        .unwrap();
    let keyring = Keyring::builder()
        .provider(store.clone())
        .recipient(k.clone())
        .build()
        .unwrap();
    // Two full chunks and a short one.
    let plaintext: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let msg = Envelope::new(keyring)
        .as_caller("t", "t")
        .seal(&plaintext, &ctx)
        .await
        .unwrap();
    let msg_path = dir.path().join("record.phi");
    fs::write(&msg_path, &msg).unwrap();
    let pass_path = dir.path().join("passphrase");
    fs::write(&pass_path, format!("{passphrase}\r\n")).unwrap();

    let mut args: Vec<std::ffi::OsString> = vec![
        "--keystore".into(),
        path.into(),
        "--passphrase-file".into(),
        pass_path.into(),
        "--message".into(),
        msg_path.into(),
    ];
    for (k, v) in ctx.iter() {
        args.push("--context".into());
        args.push(format!("{k}={v}").into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let got = recover(&refs);
    assert_eq!(got["key_ref"], "local:lab.results-2026");
    assert_eq!(got["key_version"], 2);
    assert_eq!(got["plaintext"], hex::encode(&plaintext));
    let entry = phi_envelope::envelope::inspect(&msg)
        .unwrap()
        .header
        .recipients()[0]
        .clone();
    match store.unwrap(&entry, &ctx).await.unwrap() {
        Unwrapped::Key(d) => assert_eq!(got["dek"], hex::encode(d.expose_secret())),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_worked_example_in_keystore_md_is_the_committed_vector() {
    let doc = fs::read_to_string(manifest().join("docs/KEYSTORE.md")).unwrap();
    let (_, v) = vector(2);
    let m = &v["message"];
    let wrapped = m["wrapped_dek_hex"].as_str().unwrap();
    for (what, value) in [
        (
            "keystore file",
            v["keystore_file"].as_str().unwrap().trim_end(),
        ),
        ("table", v["table_plaintext"].as_str().unwrap()),
        ("derived key", v["kdf_key_hex"].as_str().unwrap()),
        ("KEK", m["kek_hex"].as_str().unwrap()),
        ("DEK", m["dek_hex"].as_str().unwrap()),
        ("wrap nonce", &wrapped[..24]),
        ("wrap ciphertext", &wrapped[24..88]),
        ("wrap tag", &wrapped[88..]),
        ("plaintext", m["plaintext"].as_str().unwrap()),
    ] {
        assert!(
            doc.contains(value),
            "docs/KEYSTORE.md lacks the vector's {what}: {value}"
        );
    }
    let header = String::from_utf8(unhex(&v["header_aad_hex"])).unwrap();
    assert!(
        doc.contains(&header),
        "docs/KEYSTORE.md lacks the header AAD"
    );
}
