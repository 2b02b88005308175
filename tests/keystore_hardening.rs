//! The local keystore against an attacker who can replace its file or write
//! its directory: a rolled-back keystore file is refused (in the process
//! that saw the newer one, and with a generation file in a new process);
//! the lock file never follows a symbolic link; a directory that others can
//! write is refused.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use phi_envelope::provider::local::{LocalKeystore, SecretString};
use phi_envelope::provider::{KeyProvider, KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{Dek, EncryptionContext, Error, KeyRef};

const CHILD_ENV: &str = "PHI_ENVELOPE_TEST_ROLLBACK_CHILD";
const CHILD_GEN_ENV: &str = "PHI_ENVELOPE_TEST_ROLLBACK_CHILD_GEN";

fn key(name: &str) -> KeyRef {
    format!("local:{name}").parse().unwrap()
}

fn pass() -> SecretString {
    SecretString::from("correct horse battery staple")
}

#[track_caller]
fn keystore_reason<T: std::fmt::Debug>(r: phi_envelope::Result<T>) -> String {
    match r {
        Err(Error::Keystore { reason, .. }) => reason,
        other => panic!("expected a keystore error, got {other:?}"),
    }
}

/// Puts `bytes` in place of the keystore the way an attacker (or a careless
/// restore) would: a new file of mode 0600 renamed over it.
fn put_back(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("attacker");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    drop(f);
    fs::rename(&tmp, path).unwrap();
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

// ---------------------------------------------------------------------------
// Rollback
// ---------------------------------------------------------------------------

#[test]
fn a_rolled_back_keystore_is_refused_in_the_same_process() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create(&path, pass()).unwrap();
    let k = key("records");
    store.add_key(&k).unwrap();
    let c = EncryptionContext::new().with("tenant", "st-mary").unwrap();
    let dek = Dek::generate().unwrap();
    let w1 = block_on(store.wrap(&k, &dek, &c)).unwrap();
    block_on(store.rotate(&k)).unwrap();
    let old = fs::read(&path).unwrap();

    block_on(store.destroy(&k, 1)).unwrap();
    put_back(&path, &old);

    // The running instance does not reload the old copy...
    let why = keystore_reason(block_on(store.unwrap(&w1, &c)));
    assert!(why.contains("rolled back"), "{why}");
    let why = keystore_reason(block_on(store.describe(&k)));
    assert!(why.contains("rolled back"), "{why}");
    // ...and does not write over it either.
    let why = keystore_reason(block_on(store.rotate(&k)));
    assert!(why.contains("rolled back"), "{why}");
    assert_eq!(fs::read(&path).unwrap(), old);
    // keys() keeps answering from what this instance last trusted.
    assert_eq!(
        store.keys()[0].version(1).unwrap().state,
        KeyState::Destroyed
    );

    // A new instance in the same process refuses it too.
    let why = keystore_reason(LocalKeystore::open(&path, pass()));
    assert!(why.contains("rolled back"), "{why}");
}

#[test]
fn a_rolled_back_unprotected_keystore_is_refused_too() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let k = key("k");
    store.add_key(&k).unwrap();
    block_on(store.rotate(&k)).unwrap();
    let old = fs::read(&path).unwrap();
    block_on(store.set_state(&k, 1, KeyState::Disabled)).unwrap();
    block_on(store.destroy(&k, 1)).unwrap();
    put_back(&path, &old);
    let why = keystore_reason(block_on(store.describe(&k)));
    assert!(why.contains("rolled back"), "{why}");
    let why = keystore_reason(LocalKeystore::open_unprotected_for_tests(&path));
    assert!(why.contains("rolled back"), "{why}");
}

/// Not a test on its own: the "new process" of the next test. Opens the
/// keystore named in the environment, with the generation file if one is
/// named, and prints the outcome.
#[test]
fn rollback_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let opened =
        LocalKeystore::open_unprotected_for_tests(&path).and_then(|s| {
            match std::env::var(CHILD_GEN_ENV) {
                Ok(g) => s.with_generation_file(g),
                Err(_) => Ok(s),
            }
        });
    let line = match opened {
        Ok(s) => {
            let v1 = s.keys()[0].version(1).map(|v| v.state);
            format!("\nCHILD-OPENED {v1:?}\n")
        }
        Err(Error::Keystore { reason, .. }) => format!("\nCHILD-REFUSED {reason}\n"),
        Err(e) => format!("\nCHILD-ERROR {e}\n"),
    };
    let mut out = std::io::stdout();
    std::io::Write::write_all(&mut out, line.as_bytes()).unwrap();
    std::io::Write::flush(&mut out).unwrap();
}

fn run_child(path: &Path, generation_file: Option<&Path>) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "rollback_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, path)
    .env_remove(CHILD_GEN_ENV);
    if let Some(g) = generation_file {
        cmd.env(CHILD_GEN_ENV, g);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("CHILD-"))
        .unwrap_or_else(|| panic!("the child printed no outcome"))
        .to_owned()
}

#[test]
fn a_generation_file_refuses_a_rolled_back_keystore_in_a_new_process() {
    let dir = private_dir();
    let elsewhere = private_dir();
    let path = dir.path().join("keys.json");
    let generation = elsewhere.path().join("keys.generation");
    let store = LocalKeystore::create_unprotected_for_tests(&path)
        .unwrap()
        .with_generation_file(&generation)
        .unwrap();
    let k = key("k");
    store.add_key(&k).unwrap();
    block_on(store.rotate(&k)).unwrap();
    let old = fs::read(&path).unwrap();
    block_on(store.destroy(&k, 1)).unwrap();
    let now = store.generation();
    assert_eq!(
        fs::read_to_string(&generation).unwrap(),
        format!("{now}\n"),
        "the generation file follows every write"
    );

    // The current file opens in a new process, with or without the mark.
    assert_eq!(
        run_child(&path, Some(&generation)),
        "CHILD-OPENED Some(Destroyed)"
    );

    put_back(&path, &old);
    // Without the generation file a new process cannot know (documented):
    assert_eq!(run_child(&path, None), "CHILD-OPENED Some(DecryptOnly)");
    // with it, the old copy is refused.
    let out = run_child(&path, Some(&generation));
    assert!(
        out.starts_with("CHILD-REFUSED") && out.contains("rolled back"),
        "{out}"
    );
    // The generation file is untouched by the refusal.
    assert_eq!(fs::read_to_string(&generation).unwrap(), format!("{now}\n"));
}

#[test]
fn generation_rises_on_every_write_and_survives_reopen() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let g0 = store.generation();
    let k = key("k");
    store.add_key(&k).unwrap();
    assert_eq!(store.generation(), g0 + 1);
    block_on(store.rotate(&k)).unwrap();
    assert_eq!(store.generation(), g0 + 2);
    // A state change that changes nothing writes nothing.
    block_on(store.set_state(&k, 2, KeyState::Enabled)).unwrap();
    assert_eq!(store.generation(), g0 + 2);
    let again = LocalKeystore::open_unprotected_for_tests(&path).unwrap();
    assert_eq!(again.generation(), g0 + 2);
}

#[test]
fn a_damaged_generation_file_is_a_clear_error() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let generation = dir.path().join("gen");
    LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&generation)
        .unwrap();
    std::io::Write::write_all(&mut f, b"twelve\n").unwrap();
    drop(f);
    let r = LocalKeystore::open_unprotected_for_tests(&path)
        .and_then(|s| s.with_generation_file(&generation));
    let why = keystore_reason(r);
    assert!(why.contains("not a keystore generation file"), "{why}");
}

// ---------------------------------------------------------------------------
// The lock file and the directory
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_symlinked_lock_file_is_refused_and_its_target_untouched() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let lock = dir.path().join("keys.json.lock");
    fs::remove_file(&lock).unwrap();

    // A link to a file that does not exist: following it would create it.
    let target = dir.path().join("created-by-the-victim");
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let why = keystore_reason(store.add_key(&key("k")));
    assert!(why.contains("lock"), "{why}");
    assert!(
        fs::symlink_metadata(&target).is_err(),
        "the lock was taken through the link"
    );

    // A link to an existing file: neither its contents nor its mode change.
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&victim, &lock).unwrap();
    let why = keystore_reason(store.rotate(&key("k")).await);
    assert!(why.contains("lock"), "{why}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(
        fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // Creating a keystore next to a planted link is refused as well.
    let other = dir.path().join("other.json");
    std::os::unix::fs::symlink(&target, dir.path().join("other.json.lock")).unwrap();
    let why = keystore_reason(LocalKeystore::create_unprotected_for_tests(&other));
    assert!(why.contains("lock"), "{why}");
    assert!(fs::symlink_metadata(&target).is_err());
    assert!(fs::symlink_metadata(&other).is_err(), "nothing was created");
}

#[test]
fn a_lock_file_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = private_dir();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let lock = dir.path().join("keys.json.lock");
    fs::remove_file(&lock).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&lock)
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
    // Opening a FIFO for reading and writing does not block on Linux, but
    // one for reading only would; either way it is not a lock file.
    let why = keystore_reason(store.add_key(&key("k")));
    assert!(why.contains("not a regular file"), "{why}");
}

#[test]
fn a_directory_that_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    for mode in [0o777, 0o775, 0o733] {
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        let why = keystore_reason(LocalKeystore::create_unprotected_for_tests(&path));
        assert!(why.contains("others can write"), "{mode:o}: {why}");
        assert!(fs::symlink_metadata(&path).is_err(), "nothing was created");
    }

    // A keystore made in a private directory that later becomes writable by
    // others is refused on open and on write.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let why = keystore_reason(LocalKeystore::open_unprotected_for_tests(&path));
    assert!(why.contains("others can write"), "{why}");
    let why = keystore_reason(store.add_key(&key("k")));
    assert!(why.contains("others can write"), "{why}");

    // Sticky (like /tmp) with our own files is accepted.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let store = LocalKeystore::open_unprotected_for_tests(&path).unwrap();
    store.add_key(&key("k")).unwrap();
    let (kind, _) = match block_on(store.describe(&key("nope"))) {
        Err(Error::Provider(e)) => (e.kind(), e.message().to_owned()),
        other => panic!("{other:?}"),
    };
    assert_eq!(kind, ProviderErrorKind::KeyNotFound);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let dek = Dek::generate().unwrap();
    let c = EncryptionContext::new();
    let w = block_on(store.wrap(&key("k"), &dek, &c)).unwrap();
    assert!(matches!(
        block_on(store.unwrap(&w, &c)),
        Ok(Unwrapped::Key(_))
    ));
}
