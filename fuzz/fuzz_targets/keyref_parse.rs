//! Key reference parsing on arbitrary text: never panics; a parsed
//! reference's canonical text parses again to the same reference, fits a
//! header entry, starts with its scheme, and never carries a PIN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_envelope::format::MAX_KEY_REF_LEN;
use phi_envelope::provider::{KeyRef, KeyRefKind};
use phi_envelope::WrappedKey;

fn check(text: &str) {
    let parsed = KeyRef::parse(text);
    let via_from_str = text.parse::<KeyRef>();
    assert_eq!(parsed.is_ok(), via_from_str.is_ok());
    let r = match parsed {
        Ok(r) => r,
        Err(e) => {
            // Errors echo (parts of) the input: never without bound.
            let shown = format!("{e} {e:?}");
            assert!(
                shown.len() <= 16 * 1024,
                "error message of {} bytes",
                shown.len()
            );
            return;
        }
    };
    assert_eq!(Ok(&r), via_from_str.as_ref().map_err(|_| ()));
    let canonical = r.as_str();
    assert_eq!(r.to_string(), canonical);
    assert_eq!(format!("{r:?}"), format!("KeyRef({canonical})"));
    assert!(canonical.starts_with(&format!("{}:", r.scheme())));
    match r.kind() {
        // (vault-transit: gains its default mount, `transit/`.)
        KeyRefKind::Pkcs11(_) | KeyRefKind::VaultTransit { .. } => {}
        // (hpke-recovery: its fingerprint in lower case.)
        KeyRefKind::HpkeRecovery { .. } => assert_eq!(canonical, text.to_ascii_lowercase()),
        _ => assert_eq!(
            canonical, text,
            "only pkcs11, vault-transit and hpke-recovery references are rewritten"
        ),
    }
    if let KeyRefKind::Pkcs11(_) = r.kind() {
        // No attribute of a pkcs11 reference carries a PIN.
        assert!(!canonical.contains("pin-value="), "{canonical}");
    }

    // Checked first: a canonical form longer than the bound cannot be
    // parsed again nor written into a header (finding 1, see
    // tests/fuzz_regressions.rs).
    assert!(
        canonical.len() <= MAX_KEY_REF_LEN,
        "canonical form of {} bytes (from {} bytes of input) exceeds MAX_KEY_REF_LEN",
        canonical.len(),
        text.len()
    );
    let again = KeyRef::parse(canonical)
        .unwrap_or_else(|e| panic!("canonical form {canonical:?} of {text:?} does not parse: {e}"));
    assert_eq!(again, r, "canonical form parses to another reference");
    assert_eq!(
        again.as_str(),
        canonical,
        "canonical form is not a fixed point"
    );
    WrappedKey {
        provider: r.scheme().to_owned(),
        key_ref: canonical.to_owned(),
        key_version: 1,
        wrapped: vec![0; 60],
    }
    .validate()
    .expect("a parsed reference fits a header entry");
}

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(s) => check(s),
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});
