//! What operators and services need of the local keystore: changing the
//! passphrase and the Argon2id parameters atomically, `open_or_create`,
//! and changes made by another process seen without re-reading the file on
//! every call.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use phi_envelope::provider::local::{Argon2idParams, LocalKeystore, SecretString};
use phi_envelope::provider::{KeyProvider, KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{Dek, EncryptionContext, Error, KeyRef};

const CHILD_ENV: &str = "PHI_ENVELOPE_TEST_OPS_CHILD";

fn key(name: &str) -> KeyRef {
    format!("local:{name}").parse().unwrap()
}

fn fast() -> Argon2idParams {
    Argon2idParams::new(8 * 1024, 1, 1).unwrap()
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

#[track_caller]
fn keystore_reason<T: std::fmt::Debug>(r: phi_envelope::Result<T>) -> String {
    match r {
        Err(Error::Keystore { reason, .. }) => reason,
        other => panic!("expected a keystore error, got {other:?}"),
    }
}

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn change_passphrase_and_raise_the_kdf_parameters() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_with_params(&path, secret("old one"), fast()).unwrap();
    let k = key("records");
    store.add_key(&k).unwrap();
    let c = EncryptionContext::new().with("tenant", "a").unwrap();
    let dek = Dek::generate().unwrap();
    let w = block_on(store.wrap(&k, &dek, &c)).unwrap();
    let other = LocalKeystore::open(&path, secret("old one")).unwrap();
    let before_keys = store.keys();
    let before_gen = store.generation();
    let old_file = fs::read(&path).unwrap();

    let stronger = Argon2idParams::new(16 * 1024, 2, 2).unwrap();
    store
        .change_passphrase(secret("new passphrase"), stronger)
        .unwrap();
    assert_eq!(store.kdf_params(), Some(stronger));
    assert_eq!(store.generation(), before_gen + 1);
    assert_eq!(store.keys(), before_keys);
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(r#""kdf":{"alg":"argon2id","m_kib":16384,"t":2,"p":2,"salt":""#),
        "{text}"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The same value goes on working; the old passphrase no longer opens it.
    match block_on(store.unwrap(&w, &c)).unwrap() {
        Unwrapped::Key(d) => assert_eq!(d.expose_secret(), dek.expose_secret()),
        other => panic!("{other:?}"),
    }
    let why = keystore_reason(LocalKeystore::open(&path, secret("old one")));
    assert!(why.contains("wrong passphrase"), "{why}");
    let again = LocalKeystore::open(&path, secret("new passphrase")).unwrap();
    assert_eq!(again.keys(), before_keys);
    assert!(matches!(
        block_on(again.unwrap(&w, &c)),
        Ok(Unwrapped::Key(_))
    ));
    // A value opened with the old passphrase must be opened again.
    let why = keystore_reason(block_on(other.describe(&k)));
    assert!(why.contains("open it again"), "{why}");
    // The salt changed, so the old file's derived key is useless for the new.
    assert_ne!(old_file, fs::read(&path).unwrap());

    // Refusals change nothing.
    let now = fs::read(&path).unwrap();
    let why = keystore_reason(store.change_passphrase(secret(""), fast()));
    assert!(why.contains("must not be empty"), "{why}");
    let bad = Argon2idParams {
        m_kib: 1024,
        t: 1,
        p: 1,
    };
    assert!(Argon2idParams::new(1024, 1, 1).is_err());
    assert!(matches!(
        store.change_passphrase(secret("x"), bad),
        Err(Error::InvalidArgument(m)) if m.contains("outside the accepted range")
    ));
    assert_eq!(fs::read(&path).unwrap(), now);

    let clear = dir.path().join("clear.json");
    let u = LocalKeystore::create_unprotected_for_tests(&clear).unwrap();
    let why = keystore_reason(u.change_passphrase(secret("x"), fast()));
    assert!(why.contains("unprotected"), "{why}");
}

#[test]
fn open_or_create_creates_once_then_opens() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let a = LocalKeystore::open_or_create(&path, secret("pass")).unwrap();
    assert!(a.keys().is_empty());
    a.add_key(&key("k")).unwrap();
    let b = LocalKeystore::open_or_create(&path, secret("pass")).unwrap();
    assert_eq!(b.keys(), a.keys());
    // An existing file that does not open is an error, and stays as it was.
    let before = fs::read(&path).unwrap();
    let why = keystore_reason(LocalKeystore::open_or_create(&path, secret("wrong")));
    assert!(why.contains("wrong passphrase"), "{why}");
    assert_eq!(fs::read(&path).unwrap(), before);
}

/// Not a test on its own: the other process of the next test. Applies one
/// change to the keystore named in the environment.
#[test]
fn ops_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (path, action) = spec.split_once('|').unwrap();
    let store = LocalKeystore::open_unprotected_for_tests(path).unwrap();
    match action {
        "rotate" => {
            block_on(store.rotate(&key("k"))).unwrap();
        }
        "destroy-1" => {
            block_on(store.destroy(&key("k"), 1)).unwrap();
        }
        other => panic!("unknown action {other}"),
    }
}

fn in_child(path: &Path, action: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["ops_child", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{action}", path.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_change_by_another_process_is_seen_at_the_next_call() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let k = key("k");
    store.add_key(&k).unwrap();
    let c = EncryptionContext::new();
    let dek = Dek::generate().unwrap();
    let w1 = block_on(store.wrap(&k, &dek, &c)).unwrap();
    let g = store.generation();

    in_child(&path, "rotate");
    let w2 = block_on(store.wrap(&k, &dek, &c)).unwrap();
    assert_eq!(
        w2.key_version, 2,
        "the rotation in the other process applies"
    );
    assert_eq!(store.generation(), g + 1);

    in_child(&path, "destroy-1");
    // v1 was in memory here; it is not served after the other process
    // destroyed it.
    match block_on(store.unwrap(&w1, &c)) {
        Err(Error::Provider(e)) => assert_eq!(e.kind(), ProviderErrorKind::KeyDestroyed),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.keys()[0].version(1).unwrap().state,
        KeyState::Destroyed
    );
}
