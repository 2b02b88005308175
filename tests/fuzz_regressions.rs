//! Every finding of the fuzz targets (fuzz/, run with scripts/fuzz.sh),
//! kept as a plain test so that it runs on every `cargo test`, without a
//! nightly toolchain or a fuzzer.
//!
//! Each test names the target that found it and the invariant it broke.
//! The crashing inputs themselves are minimised and written out here in
//! readable form; the fuzz corpora under fuzz/corpus/ also keep them.

use phi_envelope::format::MAX_KEY_REF_LEN;
use phi_envelope::provider::KeyRefKind;
use phi_envelope::{KeyRef, WrappedKey};

/// The invariant of the `keyref_parse` target: a reference that parses has
/// a canonical text that fits a header entry and parses again to the same
/// reference. Either refusing the input or keeping its canonical form
/// within the bound satisfies it.
fn assert_canonical_round_trip(input: &str) {
    let Ok(r) = KeyRef::parse(input) else {
        return;
    };
    let canonical = r.as_str();
    assert!(
        canonical.len() <= MAX_KEY_REF_LEN,
        "a {}-byte reference ({:?}...) parses, but its canonical form is {} bytes, over \
         MAX_KEY_REF_LEN ({MAX_KEY_REF_LEN}): it cannot be parsed again nor written into a header",
        input.len(),
        input.chars().take(24).collect::<String>(),
        canonical.len()
    );
    let again = KeyRef::parse(canonical).expect("the canonical form parses");
    assert_eq!(again, r);
    WrappedKey {
        provider: r.scheme().to_owned(),
        key_ref: canonical.to_owned(),
        key_version: 1,
        wrapped: vec![0; 60],
    }
    .validate()
    .expect("a parsed reference fits a header entry");
}

/// Finding 1 (`keyref_parse`, first seconds of the first run): a `pkcs11:`
/// reference is accepted when its input is at most 1024 bytes, but its
/// canonical form percent-encodes every byte of `id` (and every byte outside
/// `[A-Za-z0-9._~-]` of the other attributes), up to three times longer. A
/// 410-byte reference then has a 1210-byte canonical form that
/// `KeyRef::parse` refuses ("length must be 1..=1024 bytes") and that
/// `Header::build` refuses (`Malformed`): a provider configured with it
/// could never seal, and a message naming it could not be parsed back.
/// Fixed in 6fdc800: the bound now applies to the canonical form.
#[test]
fn pkcs11_id_canonical_form_exceeds_the_key_ref_bound() {
    let input = format!("pkcs11:id={}", "a".repeat(400));
    assert!(input.len() <= MAX_KEY_REF_LEN);
    let r = KeyRef::parse(&input);
    if let Ok(r) = &r {
        assert!(matches!(r.kind(), KeyRefKind::Pkcs11(_)));
    }
    assert_canonical_round_trip(&input);
}

/// Finding 1, second shape: attribute values whose bytes are legal in the
/// input but percent-encoded in the canonical form (here `:`), and UTF-8
/// text (each byte of a multi-byte character becomes `%xx`).
#[test]
fn pkcs11_object_canonical_form_exceeds_the_key_ref_bound() {
    assert_canonical_round_trip(&format!("pkcs11:object={}", ":".repeat(340)));
    assert_canonical_round_trip(&format!("pkcs11:token=t;object={}", "\u{fffd}".repeat(120)));
    assert_canonical_round_trip(&format!(
        "pkcs11:object=k?module-path={}",
        "/lib%20x".repeat(120)
    ));
}

/// The bound itself is fine where the canonical form does not grow.
#[test]
fn canonical_forms_within_the_bound_round_trip() {
    for input in [
        format!("pkcs11:object={}", "k".repeat(1000)),
        format!("local:{}", "a".repeat(64)),
        format!("vault:{}", "x".repeat(1018)),
        "pkcs11:token=My%20Token;object=kek;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so"
            .to_owned(),
    ] {
        assert!(KeyRef::parse(&input).is_ok(), "{input}");
        assert_canonical_round_trip(&input);
    }
}
