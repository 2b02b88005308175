//! Keystore file loading on arbitrary file contents: `LocalKeystore::open`
//! (with a passphrase) and `open_unprotected_for_tests` never panic, and a
//! keystore that loads works: every key's primary version wraps a DEK that
//! unwraps to itself, under its context only.
#![no_main]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phi_envelope::provider::local::{LocalKeystore, SecretString};
use phi_envelope::provider::{KeyProvider, Unwrapped};
use phi_envelope::EncryptionContext;
use phi_envelope_fuzz::kms::block_on;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("phi-fuzz-keystore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("keys.json")
    })
}

fn exercise(store: &LocalKeystore) {
    let _ = format!("{store:?}");
    let ctx = EncryptionContext::from_pairs([("tenant", "fuzz")]).unwrap();
    let other = EncryptionContext::new();
    for info in store.keys().iter().take(4) {
        if info.primary_version.is_none() {
            continue;
        }
        let key = info.key_ref.clone();
        let Ok(g) = block_on(store.generate(&key, &ctx)) else {
            continue;
        };
        assert_eq!(Some(g.wrapped.key_version), info.primary_version);
        match block_on(store.unwrap(&g.wrapped, &ctx)) {
            Ok(Unwrapped::Key(d)) => assert_eq!(d.expose_secret(), g.dek.expose_secret()),
            other => panic!("a fresh wrap did not unwrap: {other:?}"),
        }
        assert!(
            matches!(
                block_on(store.unwrap(&g.wrapped, &other)),
                Ok(Unwrapped::Rejected)
            ),
            "unwrapped under another context"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // Each input as a new process sees it: a generation seen in an earlier
    // input must not make this one a "rollback".
    phi_envelope::provider::local::forget_seen_generations_for_fuzzing();
    let p = path();
    let _ = std::fs::remove_file(p);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .unwrap();
    f.write_all(data).unwrap();
    drop(f);

    match LocalKeystore::open_unprotected_for_tests(p) {
        Ok(store) => exercise(&store),
        Err(e) => {
            let _ = format!("{e} {e:?}");
        }
    }
    match LocalKeystore::open(p, SecretString::from("fuzz passphrase")) {
        Ok(store) => exercise(&store),
        Err(e) => {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("fuzz passphrase"), "passphrase in an error");
        }
    }
});
