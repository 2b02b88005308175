//! The offline recovery recipient (feature `recovery`, docs/RECOVERY.md):
//! the shared provider conformance suite, a backup sealed to a local
//! keystore key and a recovery key restored from 3 of 5 shares after the
//! keystore is gone, the refusals of shares (too few, a mistyped
//! character, two keys, two splits), context binding, secrets kept out of
//! `Debug`, and the independent implementation
//! (tests/independent/recovery_check.py) over the committed vectors and
//! over a key split and a DEK wrapped now.

#![cfg(all(feature = "recovery", feature = "local"))]

mod conformance;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::recovery::{
    RecoveryPrivateKey, RecoveryProvider, RecoveryPublicKey, RecoveryShare, WRAPPED_KEY_LEN,
};
use phi_envelope::provider::{KeyProvider, KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{Dek, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring};

fn ctx(id: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("backup_id", id)
        .unwrap()
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vectors() -> serde_json::Value {
    let text = std::fs::read_to_string(manifest().join("tests/vectors/recovery-v1.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn texts(shares: &[RecoveryShare]) -> Vec<String> {
    shares.iter().map(|s| s.to_text().to_string()).collect()
}

fn parse_all(texts: &[&String]) -> Vec<RecoveryShare> {
    texts
        .iter()
        .map(|t| RecoveryShare::parse(t).unwrap())
        .collect()
}

/// The message of an `Error::RecoveryShare`, or a panic.
#[track_caller]
fn share_error<T: std::fmt::Debug>(r: phi_envelope::Result<T>) -> String {
    match r {
        Err(Error::RecoveryShare(reason)) => reason,
        other => panic!("expected a recovery share error, got {other:?}"),
    }
}

fn opening(key: RecoveryPrivateKey) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(Arc::new(RecoveryProvider::new().with_private_key(key)))
            .build()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_provider_passes_the_conformance_suite() {
    let a = RecoveryPrivateKey::generate().unwrap();
    let b = RecoveryPrivateKey::generate().unwrap();
    let (key, other_key) = (a.public_key().key_ref(), b.public_key().key_ref());
    let provider = RecoveryProvider::new()
        .with_private_key(a)
        .with_private_key(b);
    conformance::run(conformance::Subject {
        provider: Arc::new(provider),
        key,
        other_key,
    })
    .await;
}

/// The case: a backup wrapped to another provider (the local
/// keystore) and to the recovery recipient; the keystore file is deleted;
/// any 3 of the 5 shares restore the backup, every 2 fail and say how many
/// more are needed.
#[tokio::test]
async fn a_backup_restores_from_3_of_5_shares_after_the_keystore_is_deleted_and_not_from_2() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("keys.json");
    let store = Arc::new(LocalKeystore::create_unprotected_for_tests(&store_path).unwrap());
    let local: KeyRef = "local:backups".parse().unwrap();
    store.add_key(&local).unwrap();

    // The custodians' ceremony: the key is made, split, and dropped; only
    // the public key goes online.
    let key = RecoveryPrivateKey::generate().unwrap();
    let public = key.public_key().clone();
    let shares = texts(&key.split(3, 5).unwrap());
    drop(key);

    let online = Envelope::new(
        Keyring::builder()
            .provider(store.clone())
            .provider(Arc::new(
                RecoveryProvider::new().with_public_key(public.clone()),
            ))
            .recipient(local.clone())
            .recipient(public.key_ref())
            .build()
            .unwrap(),
    );
    let backup: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let c = ctx("nightly-2026-12-03");
    let mut w = online.encryptor(Vec::new(), &c).await.unwrap();
    w.write_all(&backup).unwrap();
    let sealed = w.finish().unwrap();
    let (header, _) = Header::parse(&sealed).unwrap();
    let entries = header.recipients();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].provider, "hpke-recovery");
    assert_eq!(entries[1].key_ref, public.key_ref().as_str());
    assert_eq!(entries[1].key_version, 1);
    assert_eq!(entries[1].wrapped.len(), WRAPPED_KEY_LEN);
    // Normally the local key opens it.
    assert_eq!(online.open(&sealed, &c).await.unwrap(), backup);

    // Disaster: the keystore is gone.
    drop(online);
    drop(store);
    std::fs::remove_file(&store_path).unwrap();
    assert!(LocalKeystore::open_unprotected_for_tests(&store_path).is_err());

    // The online recovery provider holds only the public key: a clear
    // error, not a rejection.
    let public_only = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(
                RecoveryProvider::new().with_public_key(public.clone()),
            ))
            .build()
            .unwrap(),
    );
    match public_only.open(&sealed, &c).await {
        Err(Error::Provider(p)) => {
            assert_eq!(p.kind(), ProviderErrorKind::Unsupported);
            assert!(p.message().contains("private key is offline"), "{p}");
            assert!(p.message().contains("--recovery-share"), "{p}");
        }
        other => panic!("expected the public-only error, got {other:?}"),
    }

    // Every 3 of the 5 restore it, as a record and as a stream.
    let mut restored = 0;
    for a in 0..5 {
        for b in a + 1..5 {
            for d in b + 1..5 {
                let three = parse_all(&[&shares[a], &shares[b], &shares[d]]);
                let key = RecoveryPrivateKey::combine(&three).unwrap();
                assert_eq!(key.public_key(), &public);
                let env = opening(key);
                assert_eq!(env.open(&sealed, &c).await.unwrap(), backup);
                let mut out = Vec::new();
                env.decryptor(&sealed[..], &c)
                    .await
                    .unwrap()
                    .read_to_end(&mut out)
                    .unwrap();
                assert_eq!(out, backup);
                restored += 1;
            }
        }
    }
    assert_eq!(restored, 10);
    // The restored key needs the context too.
    let key =
        RecoveryPrivateKey::combine(&parse_all(&[&shares[0], &shares[1], &shares[2]])).unwrap();
    assert!(opening(key)
        .open(&sealed, &ctx("another backup"))
        .await
        .unwrap_err()
        .is_decrypt());

    // No 2 of the 5 do, and the error says how many more are needed.
    for a in 0..5 {
        for b in a + 1..5 {
            let two = parse_all(&[&shares[a], &shares[b]]);
            let reason = share_error(RecoveryPrivateKey::combine(&two));
            assert!(reason.contains("needs 3 of its 5 shares"), "{reason}");
            assert!(reason.contains("1 more needed"), "{reason}");
            assert!(reason.contains(&public.fingerprint()), "{reason}");
        }
    }
    let one = parse_all(&[&shares[3]]);
    assert!(share_error(RecoveryPrivateKey::combine(&one)).contains("2 more needed"));
    assert!(share_error(RecoveryPrivateKey::combine(&[])).contains("no shares"));
}

/// Every single-character change of a share, anywhere in it, is refused
/// when the share is read; whitespace and upper case are not changes.
#[test]
fn a_share_with_one_altered_character_is_refused_by_its_checksum() {
    let key = RecoveryPrivateKey::generate().unwrap();
    let share = key.split(2, 3).unwrap().remove(1);
    let text = share.to_text().to_string();
    assert!(RecoveryShare::parse(&text).is_ok());
    let tag_len = "phi-recovery-share-v1".len();
    let mut refused = 0;
    for (pos, c) in text.char_indices() {
        for replacement in ['0', '7', 'a', 'f', 'z', ':', '-'] {
            if replacement == c || replacement.eq_ignore_ascii_case(&c) {
                continue;
            }
            let mut altered = text.clone();
            altered.replace_range(pos..pos + 1, &replacement.to_string());
            let reason = share_error(RecoveryShare::parse(&altered));
            if pos > tag_len {
                assert!(
                    reason.contains("checksum"),
                    "position {pos} {c:?} -> {replacement:?}: {reason}"
                );
            }
            refused += 1;
        }
        // A character left out, or one more, is a change too.
        let mut shorter = text.clone();
        shorter.remove(pos);
        assert!(RecoveryShare::parse(&shorter).is_err(), "{pos} removed");
        let mut longer = text.clone();
        longer.insert(pos, if c == '1' { '2' } else { '1' });
        assert!(RecoveryShare::parse(&longer).is_err(), "{pos} doubled");
    }
    assert!(refused > 6 * text.len() - 50, "{refused}");
    // Printed in groups over several lines, typed in upper case: the same
    // share.
    let grouped: String = text
        .to_uppercase()
        .as_bytes()
        .chunks(16)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(" \n");
    let again = RecoveryShare::parse(&grouped).unwrap();
    assert_eq!(again.to_text().as_str(), text);
    assert_eq!((again.index(), again.threshold(), again.count()), (2, 2, 3));
    assert_eq!(again.fingerprint(), key.public_key().fingerprint());
    // Not a share at all; another version.
    assert!(
        share_error(RecoveryShare::parse("hello")).contains("not a phi-envelope recovery share")
    );
    let v9 = text.replacen("share-v1:", "share-v9:", 1);
    assert!(share_error(RecoveryShare::parse(&v9)).contains("version \"9\""));
    assert!(share_error(RecoveryShare::parse(&"0".repeat(500))).contains("too long"));
}

#[test]
fn shares_of_two_keys_or_two_splits_are_refused_before_they_are_combined() {
    let a = RecoveryPrivateKey::generate().unwrap();
    let b = RecoveryPrivateKey::generate().unwrap();
    let sa = texts(&a.split(2, 3).unwrap());
    let sb = texts(&b.split(2, 3).unwrap());
    let mixed = parse_all(&[&sa[0], &sb[1]]);
    let reason = share_error(RecoveryPrivateKey::combine(&mixed));
    assert!(reason.contains("different recovery keys"), "{reason}");
    assert!(reason.contains(&a.public_key().fingerprint()), "{reason}");
    assert!(reason.contains(&b.public_key().fingerprint()), "{reason}");

    // Two splits of one key: same fingerprint, different set.
    let again = texts(&a.split(2, 3).unwrap());
    let first = RecoveryShare::parse(&sa[0]).unwrap();
    let second = RecoveryShare::parse(&again[1]).unwrap();
    assert_eq!(first.fingerprint(), second.fingerprint());
    assert_ne!(first.set_id(), second.set_id());
    let reason = share_error(RecoveryPrivateKey::combine(&[first, second]));
    assert!(reason.contains("different splits"), "{reason}");

    // One share twice is not two shares.
    let twice = parse_all(&[&sa[2], &sa[2]]);
    assert!(share_error(RecoveryPrivateKey::combine(&twice)).contains("given twice"));
    // All shares of one split restore the key; so do the other split's.
    let all = parse_all(&sa.iter().collect::<Vec<_>>());
    assert_eq!(
        RecoveryPrivateKey::combine(&all).unwrap().public_key(),
        a.public_key()
    );
    let other = parse_all(&[&again[0], &again[2]]);
    assert_eq!(
        RecoveryPrivateKey::combine(&other).unwrap().public_key(),
        a.public_key()
    );
}

#[test]
fn split_parameters_are_checked() {
    let key = RecoveryPrivateKey::generate().unwrap();
    for (m, n) in [(0, 0), (1, 1), (1, 5), (6, 5), (0, 255)] {
        match key.split(m, n) {
            Err(Error::InvalidArgument(reason)) => {
                assert!(reason.contains("2 <= threshold"), "{reason}")
            }
            other => panic!("split({m}, {n}): {other:?}"),
        }
    }
    // The largest split: 255 shares, threshold 255.
    let shares = key.split(255, 255).unwrap();
    assert_eq!(shares.len(), 255);
    let text = shares[254].to_text();
    assert!(text.contains(":255:255:255:"), "{}", text.as_str());
    assert_eq!(
        RecoveryPrivateKey::combine(&shares).unwrap().public_key(),
        key.public_key()
    );
    assert!(share_error(RecoveryPrivateKey::combine(&shares[1..])).contains("1 more needed"));
}

#[tokio::test]
async fn wrong_context_and_foreign_bytes_are_rejected_not_errors() {
    let key = RecoveryPrivateKey::generate().unwrap();
    let r = key.public_key().key_ref();
    let provider = RecoveryProvider::new().with_private_key(key);
    let dek = Dek::generate().unwrap();
    let wrapped = provider.wrap(&r, &dek, &ctx("a")).await.unwrap();
    assert_eq!(wrapped.wrapped.len(), WRAPPED_KEY_LEN);
    match provider.unwrap(&wrapped, &ctx("a")).await.unwrap() {
        Unwrapped::Key(got) => assert_eq!(got.expose_secret(), dek.expose_secret()),
        other => panic!("{other:?}"),
    }
    for wrong in [
        ctx("b"),
        EncryptionContext::new(),
        ctx("a").with("x", "1").unwrap(),
    ] {
        assert!(matches!(
            provider.unwrap(&wrapped, &wrong).await.unwrap(),
            Unwrapped::Rejected
        ));
    }
    // Every flipped bit, a short or long wrapped key, an all-zero enc.
    for i in 0..WRAPPED_KEY_LEN * 8 {
        let mut bad = wrapped.clone();
        bad.wrapped[i / 8] ^= 1 << (i % 8);
        assert!(
            matches!(
                provider.unwrap(&bad, &ctx("a")).await.unwrap(),
                Unwrapped::Rejected
            ),
            "bit {i}"
        );
    }
    for len in [0usize, 79, 81] {
        let mut bad = wrapped.clone();
        bad.wrapped.resize(len, 0);
        assert!(matches!(
            provider.unwrap(&bad, &ctx("a")).await.unwrap(),
            Unwrapped::Rejected
        ));
    }
    let mut zero_enc = wrapped.clone();
    zero_enc.wrapped[..32].fill(0);
    assert!(matches!(
        provider.unwrap(&zero_enc, &ctx("a")).await.unwrap(),
        Unwrapped::Rejected
    ));
    // Through the envelope: the opaque Error::Decrypt.
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(provider))
            .recipient(r.clone())
            .build()
            .unwrap(),
    );
    let sealed = env.seal(b"phi", &ctx("a")).await.unwrap();
    assert!(matches!(
        env.open(&sealed, &ctx("b")).await,
        Err(Error::Decrypt)
    ));
}

#[tokio::test]
async fn keys_references_and_what_the_provider_answers() {
    let key = RecoveryPrivateKey::generate().unwrap();
    let public = key.public_key().clone();
    let r = public.key_ref();
    assert_eq!(r.scheme(), "hpke-recovery");
    assert_eq!(
        r.as_str(),
        format!("hpke-recovery:{}", public.fingerprint())
    );
    assert_eq!(RecoveryPublicKey::parse(&public.to_text()).unwrap(), public);
    assert_eq!(
        RecoveryPublicKey::parse(&format!(
            "  {}\n",
            public
                .to_text()
                .to_uppercase()
                .replace("PHI-RECOVERY-PUBLIC-V1", "phi-recovery-public-v1")
        ))
        .unwrap(),
        public
    );
    for bad in [
        "",
        "phi-recovery-public-v1:00",
        "phi-recovery-public-v2:",
        &format!("phi-recovery-public-v1:{}", "0".repeat(64)),
    ] {
        assert!(
            matches!(
                RecoveryPublicKey::parse(bad),
                Err(Error::InvalidArgument(_))
            ),
            "{bad}"
        );
    }

    let provider = RecoveryProvider::new().with_public_key(public.clone());
    assert_eq!(provider.key_refs(), vec![r.clone()]);
    let info = provider.describe(&r).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(info.versions.len(), 1);
    assert_eq!(info.versions[0].state, KeyState::Enabled);
    let identity = provider.identity(&r).await.unwrap().unwrap();
    assert_eq!(identity.as_str(), r.as_str());

    // A key it does not hold: named in the error; another provider's
    // entry: not mine.
    let stranger = RecoveryPrivateKey::generate()
        .unwrap()
        .public_key()
        .key_ref();
    let dek = Dek::generate().unwrap();
    match provider.wrap(&stranger, &dek, &ctx("a")).await {
        Err(Error::Provider(p)) => {
            assert_eq!(p.kind(), ProviderErrorKind::KeyNotFound);
            assert!(p.message().contains(stranger.as_str()));
        }
        other => panic!("{other:?}"),
    }
    let local: KeyRef = "local:x".parse().unwrap();
    assert!(matches!(
        provider.wrap(&local, &dek, &ctx("a")).await,
        Err(Error::InvalidArgument(_))
    ));
    let mut entry = provider.wrap(&r, &dek, &ctx("a")).await.unwrap();
    // The public key alone wraps but does not unwrap: a clear error.
    match provider.unwrap(&entry, &ctx("a")).await {
        Err(Error::Provider(p)) => {
            assert_eq!(p.kind(), ProviderErrorKind::Unsupported);
            assert!(p.message().contains(r.as_str()), "{p}");
        }
        other => panic!("{other:?}"),
    }
    // With the private key added, it does.
    let provider = provider.with_private_key(key);
    assert_eq!(provider.key_refs(), vec![r.clone()]);
    assert!(matches!(
        provider.unwrap(&entry, &ctx("a")).await.unwrap(),
        Unwrapped::Key(_)
    ));
    entry.provider = "local".into();
    assert!(matches!(
        provider.unwrap(&entry, &ctx("a")).await.unwrap(),
        Unwrapped::NotMine
    ));
    entry.provider = "hpke-recovery".into();
    entry.key_ref = stranger.as_str().into();
    assert!(matches!(
        provider.unwrap(&entry, &ctx("a")).await.unwrap(),
        Unwrapped::NotMine
    ));
}

/// No secret reaches `Debug` or an error: the private key (known here,
/// from the vectors), the share values.
#[test]
fn no_secret_in_debug_or_errors() {
    let doc = vectors();
    let v = &doc["vectors"][0];
    let private_hex = v["private_key"].as_str().unwrap();
    let share_texts: Vec<String> = v["split"]["share_texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    let values: Vec<String> = share_texts
        .iter()
        .map(|t| t.split(':').nth(6).unwrap().to_owned())
        .collect();
    let shares = parse_all(&share_texts.iter().collect::<Vec<_>>());
    let key = RecoveryPrivateKey::combine(&shares[..3]).unwrap();
    let provider = RecoveryProvider::new()
        .with_private_key(RecoveryPrivateKey::combine(&shares[1..4]).unwrap());
    let mut printed = vec![
        format!("{key:?}"),
        format!("{provider:?}"),
        format!("{:?}", key.public_key()),
    ];
    printed.extend(shares.iter().map(|s| format!("{s:?}")));
    printed.push(share_error(RecoveryPrivateKey::combine(&shares[..2])));
    let forged = {
        let mut t = share_texts[2].clone();
        let pos = t.len() - 20;
        t.replace_range(pos..pos + 1, "0");
        t
    };
    printed.push(share_error(RecoveryShare::parse(&forged)));
    for p in &printed {
        for secret in std::iter::once(private_hex).chain(values.iter().map(String::as_str)) {
            for w in 0..secret.len() - 8 {
                assert!(!p.contains(&secret[w..w + 8]), "{p:?} shows a secret");
            }
        }
    }
    assert!(printed[0].contains("<redacted>"), "{}", printed[0]);
    assert!(printed[0].contains(v["key_ref"].as_str().unwrap()));
    assert!(printed[1].contains("private key held"), "{}", printed[1]);
    assert!(printed[3].contains("value <redacted>"), "{}", printed[3]);
}

fn independent(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let script = manifest().join("tests/independent/recovery_check.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (run scripts/install-deps.sh): {e}"));
    assert!(
        out.status.success(),
        "the independent implementation failed (needs `cryptography`: scripts/install-deps.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_independent_implementation_checks_the_committed_vectors() {
    let path = manifest().join("tests/vectors/recovery-v1.json");
    let got = independent(&["--vector".as_ref(), path.as_os_str()]);
    assert_eq!(got["ok"], true);
    assert_eq!(got["vectors"], 2);
    assert_eq!(got["invalid"], doc_invalid_count());
    // And it regenerates them byte for byte.
    let out = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(manifest().join("tests/independent/recovery_check.py"))
        .arg("--generate")
        .output()
        .unwrap();
    assert!(out.status.success());
    let committed = std::fs::read(&path).unwrap();
    assert_eq!(
        out.stdout, committed,
        "recovery-v1.json is what the generator makes"
    );
}

fn doc_invalid_count() -> usize {
    vectors()["invalid_shares"].as_array().unwrap().len()
}

/// A key split and a DEK wrapped by this crate now are restored and
/// opened by the independent implementation.
#[tokio::test]
async fn the_independent_implementation_restores_a_key_and_opens_a_dek_wrapped_now() {
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryPrivateKey::generate().unwrap();
    let r = key.public_key().key_ref();
    let fingerprint = key.public_key().fingerprint();
    let shares = key.split(3, 5).unwrap();
    let mut files = Vec::new();
    for s in [&shares[4], &shares[0], &shares[2]] {
        let path = dir.path().join(format!("share-{}.txt", s.index()));
        std::fs::write(&path, format!("{}\n", s.to_text().as_str())).unwrap();
        files.push(path);
    }
    let provider = RecoveryProvider::new().with_private_key(key);
    let dek = Dek::generate().unwrap();
    let c = EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("data_class", "backup")
        .unwrap();
    let entry = provider.wrap(&r, &dek, &c).await.unwrap();
    let wrapped_hex: String = entry.wrapped.iter().map(|b| format!("{b:02x}")).collect();
    let mut args: Vec<std::ffi::OsString> = vec!["--restore".into()];
    args.extend(files.iter().map(|f| f.clone().into_os_string()));
    for a in [
        "--wrapped",
        &wrapped_hex,
        "--key-ref",
        r.as_str(),
        "--context",
        "tenant=st-mary",
        "--context",
        "data_class=backup",
    ] {
        args.push(a.into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let got = independent(&refs);
    assert_eq!(got["fingerprint"], fingerprint);
    let dek_hex: String = dek
        .expose_secret()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got["dek"], dek_hex);
}

/// Rotating the online key and rewrapping a backup file keeps the recovery
/// entry: the online configuration, which holds only the recovery public
/// key, rewraps (the recovery entry cannot be checked without its private
/// key, the other entries are), and the shares still restore the result.
#[tokio::test]
async fn a_file_rewrap_with_only_the_recovery_public_key_online_keeps_it_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap(),
    );
    let local: KeyRef = "local:backups".parse().unwrap();
    store.add_key(&local).unwrap();
    let key = RecoveryPrivateKey::generate().unwrap();
    let public = key.public_key().clone();
    let shares = key.split(2, 3).unwrap();
    drop(key);
    let env = Envelope::new(
        Keyring::builder()
            .provider(store.clone())
            .provider(Arc::new(
                RecoveryProvider::new().with_public_key(public.clone()),
            ))
            .recipient(local.clone())
            .recipient(public.key_ref())
            .build()
            .unwrap(),
    );
    let c = ctx("rewrap");
    let path = dir.path().join("db.phi");
    std::fs::write(&path, env.seal(b"backup", &c).await.unwrap()).unwrap();
    store.rotate(&local).await.unwrap();
    let report = env
        .rewrap_file(&path, &c)
        .await
        .expect("rewrap with the recovery public key online");
    assert!(report.changed, "{report:?}");
    let rewrapped = std::fs::read(&path).unwrap();
    let (header, _) = Header::parse(&rewrapped).unwrap();
    assert_eq!(header.recipients()[0].key_version, 2);
    assert_eq!(header.recipients()[1].provider, "hpke-recovery");
    let restored = RecoveryPrivateKey::combine(&shares[1..]).unwrap();
    assert_eq!(
        opening(restored).open(&rewrapped, &c).await.unwrap(),
        b"backup"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any text is read without a panic: a share or a clear error.
        #[test]
        fn any_text_is_read_without_panic(text in "(phi-recovery-share-v1:)?[0-9a-fA-F: \n-]{0,220}|\\PC{0,300}") {
            if let Err(e) = RecoveryShare::parse(&text) {
                prop_assert!(matches!(e, Error::RecoveryShare(_)));
            }
        }

        /// Any M of N shares, in any order, restore the key; any M - 1
        /// say how many more are needed.
        #[test]
        fn any_threshold_of_any_split_restores(m in 2u8..=7, extra in 0u8..=5, seed in any::<u64>()) {
            let n = m + extra;
            let key = RecoveryPrivateKey::generate().unwrap();
            let shares = texts(&key.split(m, n).unwrap());
            // A pseudo-random permutation of the indices from `seed`.
            let mut order: Vec<usize> = (0..n as usize).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let pick: Vec<&String> = order[..m as usize].iter().map(|&i| &shares[i]).collect();
            let restored = RecoveryPrivateKey::combine(&parse_all(&pick)).unwrap();
            prop_assert_eq!(restored.public_key(), key.public_key());
            let reason = share_error(RecoveryPrivateKey::combine(&parse_all(&pick[..m as usize - 1])));
            prop_assert!(reason.contains("1 more needed"), "{}", reason);
        }
    }
}
