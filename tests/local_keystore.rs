//! The local keystore provider: file format and its failure modes,
//! permissions, wrap/unwrap, the lifecycle verbs, crypto-shredding,
//! concurrent writers, a crash mid-write, and end-to-end use.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use phi_envelope::provider::local::{LocalKeystore, SecretString, WRAPPED_KEY_LEN};
use phi_envelope::provider::{KeyInfo, KeyProvider, KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{Caller, Dek, EncryptionContext, Envelope, Error, KeyRef, Keyring, WrappedKey};

mod conformance;

const PASSPHRASE: &str = "correct horse battery staple";
const CRASH_ENV: &str = "PHI_ENVELOPE_TEST_LOCAL_CRASH_CHILD";

fn pass() -> SecretString {
    SecretString::from(PASSPHRASE)
}

fn key(name: &str) -> KeyRef {
    format!("local:{name}").parse().unwrap()
}

fn ctx(id: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", id)
        .unwrap()
}

/// The reason of an `Error::Keystore`, or a panic.
#[track_caller]
fn keystore_reason<T: std::fmt::Debug>(r: phi_envelope::Result<T>) -> String {
    match r {
        Err(Error::Keystore { reason, .. }) => reason,
        other => panic!("expected a keystore error, got {other:?}"),
    }
}

/// The kind and message of a provider error, or a panic.
#[track_caller]
fn provider_error<T: std::fmt::Debug>(r: phi_envelope::Result<T>) -> (ProviderErrorKind, String) {
    match r {
        Err(Error::Provider(e)) => {
            assert_eq!(e.provider(), "local");
            (e.kind(), e.message().to_owned())
        }
        other => panic!("expected a provider error, got {other:?}"),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes `bytes` as a new file of mode 0600 (so that only the content is
/// under test).
fn write_0600(path: &Path, bytes: &[u8]) {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// The hex key bytes stored in an unprotected keystore, by (name, version).
fn clear_keys(path: &Path) -> Vec<(String, u64, String)> {
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    let table: serde_json::Value = serde_json::from_str(doc["table"].as_str().unwrap()).unwrap();
    let mut out = Vec::new();
    for k in table["keys"].as_array().unwrap() {
        for v in k["versions"].as_array().unwrap() {
            if let Some(hex) = v["key"].as_str() {
                out.push((
                    k["name"].as_str().unwrap().to_owned(),
                    v["version"].as_u64().unwrap(),
                    hex.to_owned(),
                ));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every key: versions 1..=n, exactly the last one enabled (primary), the
/// others decrypt-only.
#[track_caller]
fn assert_rotated_consistently(infos: &[KeyInfo]) {
    for info in infos {
        let n = info.versions.len() as u32;
        assert!(n >= 1);
        for (i, v) in info.versions.iter().enumerate() {
            assert_eq!(
                v.version,
                i as u32 + 1,
                "{}: versions contiguous",
                info.key_ref
            );
            let want = if v.version == n {
                KeyState::Enabled
            } else {
                KeyState::DecryptOnly
            };
            assert_eq!(v.state, want, "{} v{}", info.key_ref, v.version);
        }
        assert_eq!(info.primary_version, Some(n));
    }
}

fn unprotected(dir: &Path) -> (PathBuf, LocalKeystore) {
    let path = dir.join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    (path, store)
}

async fn unwrap_dek(store: &LocalKeystore, w: &WrappedKey, c: &EncryptionContext) -> Dek {
    match store.unwrap(w, c).await.unwrap() {
        Unwrapped::Key(dek) => dek,
        other => panic!("expected a key, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Create, open, passphrase
// ---------------------------------------------------------------------------

#[tokio::test]
async fn protected_create_open_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create(&path, pass()).unwrap();
    assert_eq!(mode(&path), 0o600, "new keystores are 0600");
    assert_eq!(mode(&dir.path().join("keys.json.lock")), 0o600);
    assert_eq!(store.path(), path);
    let k = key("records");
    let info = store.add_key(&k).unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(info.version(1).unwrap().state, KeyState::Enabled);
    assert!(info.version(1).unwrap().created_at.is_some());
    let dek = Dek::generate().unwrap();
    let w = store.wrap(&k, &dek, &ctx("1")).await.unwrap();

    let text = fs::read_to_string(&path).unwrap();
    assert!(text.starts_with(
        r#"{"format":"phi-envelope-keystore","version":2,"kdf":{"alg":"argon2id","m_kib":65536,"t":3,"p":4,"salt":""#
    ));
    assert!(
        !text.contains("records"),
        "key names are inside the sealed table"
    );

    let again = LocalKeystore::open(&path, pass()).unwrap();
    assert_eq!(again.keys(), store.keys());
    assert_eq!(again.describe(&k).await.unwrap(), info);
    let back = unwrap_dek(&again, &w, &ctx("1")).await;
    assert_eq!(back.expose_secret(), dek.expose_secret());

    let reason = keystore_reason(LocalKeystore::create(&path, pass()));
    assert!(reason.contains("already exists"), "{reason}");
    let reason = keystore_reason(LocalKeystore::create_unprotected_for_tests(&path));
    assert!(reason.contains("already exists"), "{reason}");
    let reason = keystore_reason(LocalKeystore::create(
        dir.path().join("b.json"),
        SecretString::from(""),
    ));
    assert!(reason.contains("passphrase must not be empty"), "{reason}");
    let reason = keystore_reason(LocalKeystore::open(dir.path().join("missing.json"), pass()));
    assert!(reason.contains("no such file"), "{reason}");

    let (kind, msg) = provider_error(store.add_key(&k));
    assert_eq!(kind, ProviderErrorKind::InvalidState);
    assert!(msg.contains("already exists"), "{msg}");
    assert!(matches!(
        store.add_key(&"aws-kms:alias/x".parse().unwrap()),
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn wrong_passphrase_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    LocalKeystore::create(&path, pass())
        .unwrap()
        .add_key(&key("k"))
        .unwrap();
    let before = fs::read(&path).unwrap();
    let reason = keystore_reason(LocalKeystore::open(
        &path,
        SecretString::from("Correct horse battery staple"),
    ));
    assert_eq!(reason, "wrong passphrase or the keystore file was modified");
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn protected_and_unprotected_openers_refuse_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (clear, _) = unprotected(dir.path());
    let reason = keystore_reason(LocalKeystore::open(&clear, pass()));
    assert!(
        reason.contains("UNPROTECTED") && reason.contains("open_unprotected_for_tests"),
        "{reason}"
    );

    let sealed = dir.path().join("sealed.json");
    LocalKeystore::create(&sealed, pass()).unwrap();
    let reason = keystore_reason(LocalKeystore::open_unprotected_for_tests(&sealed));
    assert!(
        reason.contains("protected by a passphrase") && reason.contains("LocalKeystore::open"),
        "{reason}"
    );

    // A protected instance whose file was swapped for an unprotected one.
    let store = LocalKeystore::open(&sealed, pass()).unwrap();
    fs::copy(&clear, &sealed).unwrap();
    chmod(&sealed, 0o600);
    let reason = keystore_reason(store.add_key(&key("k")));
    assert!(reason.contains("UNPROTECTED"), "{reason}");
}

// ---------------------------------------------------------------------------
// Corrupt, truncated, foreign files: a clear error, never overwritten
// ---------------------------------------------------------------------------

/// The phrases a reader of the error can act on.
const CLEAR_REASONS: &[&str] = &[
    "wrong passphrase or the keystore file was modified",
    "the keystore file was modified",
    "the keystore file is malformed",
    "the keystore file is corrupted",
    "the keystore file is truncated",
    "not a phi-envelope keystore",
    "unsupported keystore format version",
    "refusing to run the KDF",
    "unknown key-derivation algorithm",
    "salt or KDF parameters changed",
];

#[track_caller]
fn assert_clear(reason: &str) {
    assert!(
        CLEAR_REASONS.iter().any(|p| reason.contains(p)),
        "unclear reason: {reason}"
    );
}

#[tokio::test]
async fn protected_file_with_a_flipped_byte_is_refused_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create(&path, pass()).unwrap();
    store.add_key(&key("k")).unwrap();
    let good = fs::read(&path).unwrap();
    let n = good.len();
    // A sample across the header, the KDF parameters, the nonce, the
    // ciphertext and the final newline.
    let mut positions: Vec<usize> = (0..9).map(|i| i * (n - 1) / 8).collect();
    let text = std::str::from_utf8(&good).unwrap();
    for field in [
        "\"m_kib\":",
        "\"salt\":\"",
        "\"nonce\":\"",
        "\"ciphertext\":\"",
    ] {
        positions.push(text.find(field).unwrap() + field.len() + 1);
    }
    for i in positions {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        assert_clear(&keystore_reason(LocalKeystore::open(&path, pass())));
        // An instance opened before the damage refuses to write over it.
        assert_clear(&keystore_reason(store.rotate(&key("k")).await));
        assert_clear(&keystore_reason(store.describe(&key("k")).await));
        assert_eq!(
            fs::read(&path).unwrap(),
            bad,
            "byte {i}: a damaged keystore was overwritten"
        );
        assert!(temp_files(dir.path()).is_empty());
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(
        store.rotate(&key("k")).await.unwrap().primary_version,
        Some(2)
    );
}

#[tokio::test]
async fn unprotected_file_with_any_flipped_byte_is_refused_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = unprotected(dir.path());
    store.add_key(&key("k")).unwrap();
    let good = fs::read(&path).unwrap();
    for i in 0..good.len() {
        for flip in [0x01, 0x20, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= flip;
            fs::write(&path, &bad).unwrap();
            let reason = keystore_reason(LocalKeystore::open_unprotected_for_tests(&path));
            assert!(
                CLEAR_REASONS.iter().any(|p| reason.contains(p))
                    || reason.contains("integrity check failed"),
                "byte {i} ^ {flip:#x}: {reason}"
            );
            assert!(store.rotate(&key("k")).await.is_err());
            assert_eq!(fs::read(&path).unwrap(), bad);
        }
    }
}

#[test]
fn truncated_keystore_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    LocalKeystore::create(&path, pass())
        .unwrap()
        .add_key(&key("k"))
        .unwrap();
    let good = fs::read(&path).unwrap();
    for len in [1, 20, 40, good.len() / 2, good.len() - 3, good.len() - 2] {
        fs::write(&path, &good[..len]).unwrap();
        let reason = keystore_reason(LocalKeystore::open(&path, pass()));
        assert!(reason.contains("truncated"), "cut at {len}: {reason}");
    }
    // Without the final newline the JSON is complete but not ours.
    fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert_clear(&keystore_reason(LocalKeystore::open(&path, pass())));
    fs::write(&path, b"").unwrap();
    let reason = keystore_reason(LocalKeystore::open(&path, pass()));
    assert!(reason.contains("empty"), "{reason}");
}

#[test]
fn foreign_files_are_not_keystores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let cases: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not a phi-envelope keystore"),
        (b"", "the file is empty"),
        (b"{\"hello\":\"world\"}", "not a phi-envelope keystore"),
        (b"[1,2,3]", "not a phi-envelope keystore"),
        (b"{\"format\":\"age-keystore\",\"version\":1}", "not a phi-envelope keystore"),
        (b"hello, world\n", "not a phi-envelope keystore"),
        (
            b"{\"format\":\"phi-envelope-keystore\",\"version\":3,\"kdf\":{\"alg\":\"scrypt\"}}\n",
            "unsupported keystore format version 3",
        ),
        (
            b"{\"format\":\"phi-envelope-keystore\",\"version\":1,\"kdf\":{\"alg\":\"scrypt\"},\"nonce\":\"000000000000000000000000\",\"ciphertext\":\"00000000000000000000000000000000\"}\n",
            "unknown key-derivation algorithm",
        ),
        (
            b"{\"format\":\"phi-envelope-keystore\",\"version\":1,\"kdf\":{\"alg\":\"argon2id\",\"m_kib\":4194304,\"t\":3,\"p\":1,\"salt\":\"00000000000000000000000000000000\"},\"nonce\":\"000000000000000000000000\",\"ciphertext\":\"00000000000000000000000000000000\"}\n",
            "refusing to run the KDF",
        ),
        (
            b"{\"format\": \"phi-envelope-keystore\", \"version\": 1}",
            "malformed",
        ),
    ];
    for (bytes, want) in cases {
        write_0600(&path, bytes);
        let reason = keystore_reason(LocalKeystore::open(&path, pass()));
        assert!(
            reason.contains(want),
            "{:?}: {reason}",
            String::from_utf8_lossy(bytes)
        );
        let reason = keystore_reason(LocalKeystore::open_unprotected_for_tests(&path));
        assert!(reason.contains(want), "{reason}");
        assert_eq!(&fs::read(&path).unwrap(), bytes);
    }
    // Larger than 16 MiB: refused before it is read.
    write_0600(&path, b"");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let reason = keystore_reason(LocalKeystore::open(&path, pass()));
    assert!(reason.contains("larger than 16 MiB"), "{reason}");
    // Not a regular file; a symbolic link.
    let reason = keystore_reason(LocalKeystore::open(dir.path(), pass()));
    assert!(reason.contains("not a regular file"), "{reason}");
    let (real, _) = unprotected(&dir.path().join("sub").tap_mkdir());
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let reason = keystore_reason(LocalKeystore::open_unprotected_for_tests(&link));
    assert!(reason.contains("symbolic link"), "{reason}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        fs::create_dir_all(&self).unwrap();
        self
    }
}

// ---------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn files_that_others_can_access_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create(&path, pass()).unwrap();
    store.add_key(&key("k")).unwrap();
    let before = fs::read(&path).unwrap();
    for bad in [0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o1604] {
        chmod(&path, bad);
        let reason = keystore_reason(LocalKeystore::open(&path, pass()));
        assert!(reason.contains(&format!("{bad:04o}")), "{reason}");
        assert!(reason.contains("chmod 600"), "{reason}");
        // An open instance refuses too, and writes nothing.
        assert!(reason.contains("chmod 600"));
        let reason = keystore_reason(store.rotate(&key("k")).await);
        assert!(reason.contains("chmod 600"), "{reason}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }
    for good in [0o600, 0o400] {
        chmod(&path, good);
        LocalKeystore::open(&path, pass()).unwrap();
    }
    chmod(&path, 0o600);
    store.rotate(&key("k")).await.unwrap();
    assert_eq!(mode(&path), 0o600, "a rewritten keystore stays 0600");
}

// ---------------------------------------------------------------------------
// Wrap and unwrap
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrap_unwrap_round_trip_bound_to_context() {
    let dir = tempfile::tempdir().unwrap();
    let (_, store) = unprotected(dir.path());
    let k = key("records");
    store.add_key(&k).unwrap();
    store.add_key(&key("other")).unwrap();
    let dek = Dek::generate().unwrap();
    let c = ctx("42");
    let w = store.wrap(&k, &dek, &c).await.unwrap();
    assert_eq!(
        (w.provider.as_str(), w.key_ref.as_str(), w.key_version),
        ("local", "local:records", 1)
    );
    assert_eq!(w.wrapped.len(), WRAPPED_KEY_LEN);
    assert_eq!(WRAPPED_KEY_LEN, 60);
    assert_eq!(
        unwrap_dek(&store, &w, &c).await.expose_secret(),
        dek.expose_secret()
    );
    let w2 = store.wrap(&k, &dek, &c).await.unwrap();
    assert_ne!(w.wrapped, w2.wrapped, "fresh nonce per wrap");

    // Generate (the trait's default) wraps under the primary.
    let g = store.generate(&k, &c).await.unwrap();
    assert_eq!(
        unwrap_dek(&store, &g.wrapped, &c).await.expose_secret(),
        g.dek.expose_secret()
    );

    let rejected = |u: Unwrapped| matches!(u, Unwrapped::Rejected);
    let not_mine = |u: Unwrapped| matches!(u, Unwrapped::NotMine);
    // Another context, an empty context.
    assert!(rejected(store.unwrap(&w, &ctx("43")).await.unwrap()));
    assert!(rejected(
        store.unwrap(&w, &EncryptionContext::new()).await.unwrap()
    ));
    // Any modified byte, any other length.
    for i in 0..w.wrapped.len() {
        let mut bad = w.clone();
        bad.wrapped[i] ^= 0x80;
        assert!(rejected(store.unwrap(&bad, &c).await.unwrap()), "byte {i}");
    }
    for len in [0, 1, 59, 61, 2048] {
        let mut bad = w.clone();
        bad.wrapped.resize(len, 0);
        assert!(rejected(store.unwrap(&bad, &c).await.unwrap()), "len {len}");
    }
    // Another key of this keystore: its key, but it does not authenticate.
    let mut moved = w.clone();
    moved.key_ref = "local:other".into();
    assert!(rejected(store.unwrap(&moved, &c).await.unwrap()));
    // Not this keystore's: unknown name, other provider, other scheme.
    let mut e = w.clone();
    e.key_ref = "local:absent".into();
    assert!(not_mine(store.unwrap(&e, &c).await.unwrap()));
    let mut e = w.clone();
    e.provider = "pkcs11".into();
    assert!(not_mine(store.unwrap(&e, &c).await.unwrap()));
    let mut e = w.clone();
    e.key_ref = "aws-kms:alias/records".into();
    assert!(not_mine(store.unwrap(&e, &c).await.unwrap()));
    let mut e = w.clone();
    e.key_ref = "not a key ref".into();
    assert!(not_mine(store.unwrap(&e, &c).await.unwrap()));
    // Its key, a version it does not have.
    let mut e = w.clone();
    e.key_version = 9;
    let (kind, msg) = provider_error(store.unwrap(&e, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyNotFound);
    assert!(msg.contains("no version 9"), "{msg}");

    let (kind, _) = provider_error(store.wrap(&key("absent"), &dek, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyNotFound);
    let (kind, _) = provider_error(store.describe(&key("absent")).await);
    assert_eq!(kind, ProviderErrorKind::KeyNotFound);
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rotation_keeps_old_versions_decryptable() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = unprotected(dir.path());
    let k = key("k");
    store.add_key(&k).unwrap();
    let c = ctx("1");
    let old_dek = Dek::generate().unwrap();
    let old = store.wrap(&k, &old_dek, &c).await.unwrap();
    let info = store.rotate(&k).await.unwrap();
    assert_eq!(info.primary_version, Some(2));
    assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    assert_eq!(info.version(2).unwrap().state, KeyState::Enabled);
    assert_eq!(info, store.describe(&k).await.unwrap());

    let new = store.wrap(&k, &old_dek, &c).await.unwrap();
    assert_eq!(new.key_version, 2);
    assert_eq!(
        unwrap_dek(&store, &old, &c).await.expose_secret(),
        old_dek.expose_secret()
    );
    assert_eq!(
        unwrap_dek(&store, &new, &c).await.expose_secret(),
        old_dek.expose_secret()
    );
    // Two versions, two different keys: the v1 entry relabelled as v2 fails.
    let mut relabelled = old.clone();
    relabelled.key_version = 2;
    assert!(matches!(
        store.unwrap(&relabelled, &c).await.unwrap(),
        Unwrapped::Rejected
    ));

    // Persisted, and seen by a fresh instance.
    let again = LocalKeystore::open_unprotected_for_tests(&path).unwrap();
    assert_eq!(again.keys(), store.keys());
    assert_rotated_consistently(&again.keys());
    let (kind, _) = provider_error(store.rotate(&key("absent")).await);
    assert_eq!(kind, ProviderErrorKind::KeyNotFound);
}

#[tokio::test]
async fn state_changes_check_their_preconditions() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = unprotected(dir.path());
    let k = key("k");
    store.add_key(&k).unwrap();
    let c = ctx("1");
    let dek = Dek::generate().unwrap();
    let w1 = store.wrap(&k, &dek, &c).await.unwrap();
    store.rotate(&k).await.unwrap();

    // Disabled: unwrap is a clear error, not a rejection.
    store.set_state(&k, 1, KeyState::Disabled).await.unwrap();
    let (kind, msg) = provider_error(store.unwrap(&w1, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyDisabled);
    assert_eq!(
        msg,
        "key local:k version 1 is disabled; set it decrypt-only to decrypt with it again"
    );
    // Back to decrypt-only: it works again.
    store.set_state(&k, 1, KeyState::DecryptOnly).await.unwrap();
    unwrap_dek(&store, &w1, &c).await;

    // Setting the state a version is in writes nothing.
    let before = fs::read(&path).unwrap();
    store.set_state(&k, 1, KeyState::DecryptOnly).await.unwrap();
    assert_eq!(fs::read(&path).unwrap(), before);

    // Enabling an older version makes it the primary.
    let info = store.set_state(&k, 1, KeyState::Enabled).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(info.version(2).unwrap().state, KeyState::DecryptOnly);
    assert_eq!(store.wrap(&k, &dek, &c).await.unwrap().key_version, 1);

    // Demoting or disabling the primary leaves no primary: wrap refuses.
    for state in [KeyState::DecryptOnly, KeyState::Disabled] {
        store.set_state(&k, 1, KeyState::Enabled).await.unwrap();
        let info = store.set_state(&k, 1, state).await.unwrap();
        assert_eq!(info.primary_version, None);
        let (kind, msg) = provider_error(store.wrap(&k, &dek, &c).await);
        assert_eq!(kind, ProviderErrorKind::KeyDisabled);
        assert!(msg.contains("no enabled (primary) version"), "{msg}");
    }
    // Rotation gives it a primary again.
    assert_eq!(store.rotate(&k).await.unwrap().primary_version, Some(3));

    // Destroyed is not a state to set; unknown versions are named.
    let (kind, msg) = provider_error(store.set_state(&k, 2, KeyState::Destroyed).await);
    assert_eq!(kind, ProviderErrorKind::InvalidState);
    assert!(msg.contains("use destroy"), "{msg}");
    let (kind, _) = provider_error(store.set_state(&k, 7, KeyState::Disabled).await);
    assert_eq!(kind, ProviderErrorKind::KeyNotFound);

    // The primary cannot be destroyed; nothing leaves destroyed.
    let (kind, msg) = provider_error(store.destroy(&k, 3).await);
    assert_eq!(kind, ProviderErrorKind::InvalidState);
    assert!(msg.contains("primary"), "{msg}");
    store.destroy(&k, 2).await.unwrap();
    for state in [KeyState::Enabled, KeyState::DecryptOnly, KeyState::Disabled] {
        let (kind, _) = provider_error(store.set_state(&k, 2, state).await);
        assert_eq!(kind, ProviderErrorKind::KeyDestroyed);
    }
    // Destroying again is a no-op.
    let before = fs::read(&path).unwrap();
    store.destroy(&k, 2).await.unwrap();
    assert_eq!(fs::read(&path).unwrap(), before);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn destroy_erases_the_key_bytes_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = unprotected(dir.path());
    let k = key("k");
    store.add_key(&k).unwrap();
    let c = ctx("1");
    let dek1 = Dek::generate().unwrap();
    let w1 = store.wrap(&k, &dek1, &c).await.unwrap();
    store.rotate(&k).await.unwrap();
    let dek2 = Dek::generate().unwrap();
    let w2 = store.wrap(&k, &dek2, &c).await.unwrap();

    let keys = clear_keys(&path);
    let v1_hex = keys.iter().find(|(_, v, _)| *v == 1).unwrap().2.clone();
    let v2_hex = keys.iter().find(|(_, v, _)| *v == 2).unwrap().2.clone();
    let v1_raw = hex::decode(&v1_hex).unwrap();
    let before = fs::read(&path).unwrap();
    assert!(
        contains(&before, v1_hex.as_bytes()),
        "the test reads the clear table"
    );

    let info = store.destroy(&k, 1).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);
    assert!(
        info.version(1).unwrap().created_at.is_some(),
        "the tombstone keeps its metadata"
    );

    let after = fs::read(&path).unwrap();
    for needle in [
        v1_hex.as_bytes().to_vec(),
        v1_hex.to_uppercase().into_bytes(),
        v1_raw.clone(),
    ] {
        assert!(
            !contains(&after, &needle),
            "destroyed key bytes still in the file"
        );
    }
    assert!(
        contains(&after, v2_hex.as_bytes()),
        "other versions are kept"
    );
    assert!(temp_files(dir.path()).is_empty());

    let (kind, msg) = provider_error(store.unwrap(&w1, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyDestroyed);
    assert_eq!(
        msg,
        "key local:k version 1 was destroyed; data wrapped under it cannot be recovered"
    );
    assert_eq!(
        unwrap_dek(&store, &w2, &c).await.expose_secret(),
        dek2.expose_secret()
    );

    // A fresh instance sees the tombstone.
    let again = LocalKeystore::open_unprotected_for_tests(&path).unwrap();
    assert_eq!(again.keys(), store.keys());
    let (kind, _) = provider_error(again.unwrap(&w1, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyDestroyed);
}

#[tokio::test]
async fn destroy_in_a_protected_keystore_replaces_the_whole_sealed_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create(&path, pass()).unwrap();
    let k = key("k");
    store.add_key(&k).unwrap();
    let c = ctx("1");
    let w1 = store.wrap(&k, &Dek::generate().unwrap(), &c).await.unwrap();
    store.rotate(&k).await.unwrap();
    let field = |bytes: &[u8], name: &str| -> String {
        let doc: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        doc[name].as_str().unwrap().to_owned()
    };
    let before = fs::read(&path).unwrap();
    let old_ct = field(&before, "ciphertext");
    store.destroy(&k, 1).await.unwrap();
    let after = fs::read(&path).unwrap();
    assert!(
        !contains(&after, old_ct.as_bytes()),
        "the old sealed table is gone"
    );
    assert!(
        !contains(&after, &old_ct.as_bytes()[..64]),
        "no piece of it is left"
    );
    assert_ne!(
        field(&before, "nonce"),
        field(&after, "nonce"),
        "fresh nonce on every write"
    );

    let again = LocalKeystore::open(&path, pass()).unwrap();
    assert_eq!(
        again.describe(&k).await.unwrap().version(1).unwrap().state,
        KeyState::Destroyed
    );
    let (kind, _) = provider_error(again.unwrap(&w1, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyDestroyed);
}

#[tokio::test]
async fn another_instance_sees_changes_at_its_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let (path, a) = unprotected(dir.path());
    let k = key("k");
    a.add_key(&k).unwrap();
    let b = LocalKeystore::open_unprotected_for_tests(&path).unwrap();
    let c = ctx("1");
    let w1 = b.wrap(&k, &Dek::generate().unwrap(), &c).await.unwrap();
    a.rotate(&k).await.unwrap();
    assert_eq!(
        b.wrap(&k, &Dek::generate().unwrap(), &c)
            .await
            .unwrap()
            .key_version,
        2
    );
    a.destroy(&k, 1).await.unwrap();
    // b had v1 in memory; it is not served after the destruction.
    let (kind, _) = provider_error(b.unwrap(&w1, &c).await);
    assert_eq!(kind, ProviderErrorKind::KeyDestroyed);
    assert_eq!(b.keys(), a.keys());
}

#[test]
fn two_instances_rotating_concurrently_lose_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let first = LocalKeystore::create(&path, pass()).unwrap();
    let k = key("k");
    first.add_key(&k).unwrap();
    drop(first);
    let stores: Vec<Arc<LocalKeystore>> = (0..2)
        .map(|_| Arc::new(LocalKeystore::open(&path, pass()).unwrap()))
        .collect();
    const EACH: u32 = 15;
    let threads: Vec<_> = stores
        .iter()
        .map(|s| {
            let s = s.clone();
            let k = k.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                for _ in 0..EACH {
                    rt.block_on(s.rotate(&k)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let keys = LocalKeystore::open(&path, pass()).unwrap().keys();
    assert_eq!(keys[0].versions.len() as u32, 1 + 2 * EACH);
    assert_rotated_consistently(&keys);
    assert_eq!(stores[0].keys(), keys);
    assert_eq!(stores[1].keys(), keys);
    assert!(temp_files(dir.path()).is_empty());
}

// ---------------------------------------------------------------------------
// Crash mid-write
// ---------------------------------------------------------------------------

/// Not a test on its own: the child process of the crash test. It rotates
/// forever until it is killed; in a normal run it returns at once.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CRASH_ENV) else {
        return;
    };
    let parent = std::os::unix::process::parent_id();
    let store = LocalKeystore::open(&path, pass()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // Straight to the file descriptor: libtest may capture `println!`.
    let mut out = std::io::stdout();
    std::io::Write::write_all(&mut out, b"\nCRASH-CHILD-READY\n").unwrap();
    std::io::Write::flush(&mut out).unwrap();
    // Until killed, or orphaned (the test run was interrupted).
    while std::os::unix::process::parent_id() == parent {
        // Rotate the newest key; start a new one every 50 versions.
        let keys = store.keys();
        let newest = key(&format!("crash-{}", keys.len() - 1));
        let versions = keys
            .iter()
            .find(|i| i.key_ref == newest)
            .unwrap()
            .versions
            .len();
        if versions < 50 {
            rt.block_on(store.rotate(&newest)).unwrap();
        } else {
            store
                .add_key(&key(&format!("crash-{}", keys.len())))
                .unwrap();
        }
    }
}

/// Kills the child process if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_crash_mid_write_leaves_a_consistent_keystore() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create(&path, pass()).unwrap();
    let k0 = key("crash-0");
    store.add_key(&k0).unwrap();
    let c = ctx("1");
    let dek = Dek::generate().unwrap();
    let w = store.wrap(&k0, &dek, &c).await.unwrap();
    let mut leftovers = 0;
    let mut last_count = 1;
    for delay_ms in [0, 3, 10, 30, 90] {
        let mut child = KillOnDrop(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
                .env(CRASH_ENV, &path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .expect("the child exited before it was ready")
                .unwrap();
            if line == "CRASH-CHILD-READY" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.0.kill().unwrap(); // SIGKILL
        let status = child.0.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "the child died on its own: {status:?}"
        );

        leftovers += temp_files(dir.path()).len();
        let after = LocalKeystore::open(&path, pass()).expect("the keystore opens after a crash");
        let keys = after.keys();
        assert_rotated_consistently(&keys);
        let count: usize = keys.iter().map(|i| i.versions.len()).sum();
        assert!(count >= last_count);
        last_count = count;
        assert_eq!(
            unwrap_dek(&after, &w, &c).await.expose_secret(),
            dek.expose_secret()
        );
    }
    assert!(last_count > 1, "the child never rotated");
    eprintln!(
        "crash test: {last_count} versions written, {leftovers} temporary files found after kills"
    );

    // A leftover temporary file (one is planted, so the check does not
    // depend on timing) does not confuse a reader and the next write
    // removes it.
    let planted = dir.path().join(".keys.json.00112233aabbccdd.tmp");
    write_0600(&planted, b"{\"format\":\"phi-envelope-keystore\",\"ver");
    let store = LocalKeystore::open(&path, pass()).unwrap();
    store.rotate(&k0).await.unwrap();
    assert!(
        temp_files(dir.path()).is_empty(),
        "{:?}",
        temp_files(dir.path())
    );
    assert_rotated_consistently(&store.keys());
}

// ---------------------------------------------------------------------------
// Debug, end to end
// ---------------------------------------------------------------------------

#[tokio::test]
async fn debug_shows_metadata_never_key_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = unprotected(dir.path());
    let k = key("records");
    store.add_key(&k).unwrap();
    store.rotate(&k).await.unwrap();
    let s = format!("{store:?}");
    assert!(s.contains("keys.json") && s.contains("UNPROTECTED"), "{s}");
    assert!(
        s.contains("local:records [v1 decrypt-only, v2 enabled]"),
        "{s}"
    );
    for (_, _, hex) in clear_keys(&path) {
        assert!(
            !s.contains(&hex) && !s.to_lowercase().contains(&hex[..16]),
            "{s}"
        );
        let raw = hex::decode(&hex).unwrap();
        assert!(!s.contains(&format!("{:?}", &raw[..4])), "{s}");
    }
}

#[tokio::test]
async fn seal_open_rotate_rewrap_and_shred_through_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = Arc::new(LocalKeystore::create(&path, pass()).unwrap());
    let k = key("records");
    store.add_key(&k).unwrap();
    let keyring = Keyring::builder()
        .provider(store.clone())
        .recipient(k.clone())
        .build()
        .unwrap();
    let env = Envelope::new(keyring).as_caller("lab-service", "store-result");
    let ops = Caller::new("key-admin", "rotation");
    let c = ctx("42");

    let m1 = env.seal(b"potassium 4.1 mmol/L", &c).await.unwrap();
    assert_eq!(env.open(&m1, &c).await.unwrap(), b"potassium 4.1 mmol/L");
    assert!(env.open(&m1, &ctx("43")).await.unwrap_err().is_decrypt());

    env.keyring().rotate(&k, &ops).await.unwrap();
    let m2 = env.seal(b"sodium 140 mmol/L", &c).await.unwrap();
    let version = |m: &[u8]| {
        phi_envelope::envelope::inspect(m)
            .unwrap()
            .header
            .recipients()[0]
            .key_version
    };
    assert_eq!((version(&m1), version(&m2)), (1, 2));
    let m1_rewrapped = env.rewrap(&m1, &c).await.unwrap();
    assert_eq!(version(&m1_rewrapped), 2);

    env.keyring().destroy(&k, 1, &ops).await.unwrap();
    match env.open(&m1, &c).await {
        Err(Error::Provider(e)) => {
            assert_eq!(e.kind(), ProviderErrorKind::KeyDestroyed);
            assert!(e.to_string().contains("was destroyed"), "{e}");
        }
        other => panic!("expected key-destroyed, got {other:?}"),
    }
    assert_eq!(
        env.open(&m1_rewrapped, &c).await.unwrap(),
        b"potassium 4.1 mmol/L"
    );
    assert_eq!(env.open(&m2, &c).await.unwrap(), b"sodium 140 mmol/L");

    // Another process opening the keystore later: the same answers.
    let reopened = Arc::new(LocalKeystore::open(&path, pass()).unwrap());
    let env2 = Envelope::new(Keyring::builder().provider(reopened).build().unwrap());
    assert!(matches!(env2.open(&m1, &c).await, Err(Error::Provider(_))));
    assert_eq!(env2.open(&m2, &c).await.unwrap(), b"sodium 140 mmol/L");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_keystore_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create(dir.path().join("keys.json"), pass()).unwrap();
    let (k, other) = (key("records"), key("archive"));
    store.add_key(&k).unwrap();
    store.add_key(&other).unwrap();
    conformance::run(conformance::Subject {
        provider: Arc::new(store),
        key: k,
        other_key: other,
    })
    .await;
}
