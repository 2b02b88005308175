//! RFC 9180's published test vectors for DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, AES-256-GCM in base mode (tests/vectors/hpke/), and the
//! recovery vectors of docs/RECOVERY.md (tests/vectors/recovery-v1.json).

use x25519_dalek::{PublicKey, StaticSecret};

use super::share::split_with;
use super::*;

fn load(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn h(v: &serde_json::Value) -> Vec<u8> {
    ::hex::decode(v.as_str().unwrap()).unwrap()
}

fn h32(v: &serde_json::Value) -> [u8; 32] {
    h(v).try_into().unwrap()
}

#[test]
fn rfc9180_x25519_sha256_aes256gcm_base() {
    let doc = load("hpke/rfc9180-x25519-sha256-aes256gcm-base.json");
    let vectors = doc.as_array().unwrap();
    assert_eq!(vectors.len(), 1, "one vector for this suite and mode");
    let mut encryptions = 0;
    let mut exports = 0;
    for v in vectors {
        assert_eq!(
            (&v["mode"], &v["kem_id"], &v["kdf_id"], &v["aead_id"]),
            (&0.into(), &32.into(), &1.into(), &2.into())
        );
        let sk_r = StaticSecret::from(h32(&v["skRm"]));
        let sk_e = StaticSecret::from(h32(&v["skEm"]));
        assert_eq!(PublicKey::from(&sk_r).to_bytes(), h32(&v["pkRm"]));
        assert_eq!(PublicKey::from(&sk_e).to_bytes(), h32(&v["pkEm"]));
        let pk_r = PublicKey::from(h32(&v["pkRm"]));

        // Encap with the given ephemeral key, and Decap.
        let (enc, shared) = hpke::encap_with(&sk_e, &pk_r).unwrap();
        assert_eq!(enc.to_vec(), h(&v["enc"]), "enc");
        assert_eq!(shared.to_vec(), h(&v["shared_secret"]), "shared_secret");
        let decapped = hpke::decap(&enc, &sk_r).unwrap().unwrap();
        assert_eq!(*decapped, *shared);

        // The key schedule.
        let info = h(&v["info"]);
        let (mut sender, ksc, secret) = hpke::Context::schedule(&shared, &info).unwrap();
        assert_eq!(ksc.to_vec(), h(&v["key_schedule_context"]));
        assert_eq!(secret.to_vec(), h(&v["secret"]));
        assert_eq!(sender.key().to_vec(), h(&v["key"]));
        assert_eq!(sender.base_nonce().to_vec(), h(&v["base_nonce"]));
        assert_eq!(sender.exporter_secret().to_vec(), h(&v["exporter_secret"]));
        let (mut receiver, _, _) = hpke::Context::schedule(&decapped, &info).unwrap();

        // Every encryption, in sequence: seal gives the ciphertext, open the
        // plaintext; a flipped tag bit is refused and does not advance.
        for e in v["encryptions"].as_array().unwrap() {
            let (aad, pt, ct) = (h(&e["aad"]), h(&e["pt"]), h(&e["ct"]));
            assert_eq!(
                sender.nonce().to_vec(),
                h(&e["nonce"]),
                "nonce #{encryptions}"
            );
            assert_eq!(sender.seal(&aad, &pt).unwrap(), ct, "seal #{encryptions}");
            let mut bad = ct.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(matches!(receiver.open(&aad, &bad), Err(Error::Decrypt)));
            assert_eq!(
                *receiver.open(&aad, &ct).unwrap(),
                pt,
                "open #{encryptions}"
            );
            encryptions += 1;
        }
        for x in v["exports"].as_array().unwrap() {
            let len = x["L"].as_u64().unwrap() as usize;
            let got = sender.export(&h(&x["exporter_context"]), len).unwrap();
            assert_eq!(got.to_vec(), h(&x["exported_value"]));
            exports += 1;
        }

        // Single-shot, as the provider uses it: the first encryption.
        let e0 = &v["encryptions"][0];
        let (enc1, ct1) =
            hpke::seal_base_with(&sk_e, &pk_r, &info, &h(&e0["aad"]), &h(&e0["pt"])).unwrap();
        assert_eq!(enc1, enc);
        assert_eq!(ct1, h(&e0["ct"]));
        let pt = hpke::open_base(&enc1, &sk_r, &info, &h(&e0["aad"]), &ct1).unwrap();
        assert_eq!(*pt, h(&e0["pt"]));
    }
    assert_eq!((encryptions, exports), (257, 3));
}

#[test]
fn a_public_key_has_one_encoding() {
    let key = RecoveryPrivateKey::generate().unwrap();
    let mut bytes = key.public_key().to_bytes();
    assert_eq!(bytes[31] & 0x80, 0);
    bytes[31] |= 0x80;
    let e = RecoveryPublicKey::from_bytes(bytes).unwrap_err();
    assert!(e.to_string().contains("top bit"), "{e}");
    // u = p + 9 is the base point (u = 9) written unreduced.
    let mut unreduced = [0xffu8; 32];
    unreduced[0] = 0xed + 9;
    unreduced[31] = 0x7f;
    let e = RecoveryPublicKey::from_bytes(unreduced).unwrap_err();
    assert!(e.to_string().contains("not reduced"), "{e}");
    let mut base = [0u8; 32];
    base[0] = 9;
    assert!(RecoveryPublicKey::from_bytes(base).is_ok());
}

#[test]
fn generated_keys_are_clamped() {
    for _ in 0..8 {
        let b = RecoveryPrivateKey::generate().unwrap().secret_bytes();
        assert_eq!(b[0] & 7, 0);
        assert_eq!(b[31] & 0xc0, 0x40);
    }
}

#[test]
fn small_order_points_are_refused() {
    // The all-zero point and the point of order 8 from RFC 7748's list.
    let zero = [0u8; 32];
    let mut one = [0u8; 32];
    one[0] = 1;
    for bad in [zero, one] {
        assert!(!hpke::is_valid_public_key(&bad));
        assert!(RecoveryPublicKey::from_bytes(bad).is_err());
        let sk = StaticSecret::from([7u8; 32]);
        assert!(hpke::encap_with(&sk, &PublicKey::from(bad)).is_err());
        assert!(hpke::decap(&bad, &sk).unwrap().is_none());
    }
}

fn context_of(v: &serde_json::Value) -> EncryptionContext {
    let pairs = v.as_object().unwrap();
    EncryptionContext::from_pairs(
        pairs
            .iter()
            .map(|(k, val)| (k.clone(), val.as_str().unwrap().to_owned())),
    )
    .unwrap()
}

/// tests/vectors/recovery-v1.json: every output is recomputed from the
/// inputs and compared, and every share text is read back.
#[test]
fn recovery_v1_vectors() {
    let doc = load("recovery-v1.json");
    assert_eq!(doc["format"], "phi-envelope-recovery-v1");
    let mut cases = 0;
    for v in doc["vectors"].as_array().unwrap() {
        cases += 1;
        let name = v["name"].as_str().unwrap();
        let key = RecoveryPrivateKey::from_secret_bytes(&h32(&v["private_key"])).unwrap();
        let public = key.public_key();
        assert_eq!(public.to_bytes().to_vec(), h(&v["public_key"]), "{name}");
        assert_eq!(
            public.to_text(),
            v["public_key_text"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            public.fingerprint(),
            v["fingerprint"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            public.key_ref().as_str(),
            v["key_ref"].as_str().unwrap(),
            "{name}"
        );

        // Shares from the given set id and coefficients.
        let split = &v["split"];
        let threshold = split["threshold"].as_u64().unwrap() as u8;
        let count = split["shares"].as_u64().unwrap() as u8;
        let set_id: [u8; 4] = h(&split["set_id"]).try_into().unwrap();
        let coefficients: Vec<shamir::Bytes32> = split["coefficients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Zeroizing::new(h32(c)))
            .collect();
        let shares = split_with(&key, threshold, count, set_id, &coefficients).unwrap();
        let texts: Vec<&str> = split["share_texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(shares.len(), texts.len());
        for (s, t) in shares.iter().zip(&texts) {
            assert_eq!(s.to_text().as_str(), *t, "{name}");
            assert_eq!(RecoveryShare::parse(t).unwrap().to_text().as_str(), *t);
        }
        // The first `threshold` shares, and the last, restore the key.
        for pick in [
            &texts[..threshold as usize],
            &texts[texts.len() - threshold as usize..],
        ] {
            let parsed: Vec<RecoveryShare> = pick
                .iter()
                .map(|t| RecoveryShare::parse(t).unwrap())
                .collect();
            let restored = RecoveryPrivateKey::combine(&parsed).unwrap();
            assert_eq!(*restored.secret_bytes(), h32(&v["private_key"]), "{name}");
        }

        // The wrapped DEK, from the given ephemeral key.
        let wrap = &v["wrap"];
        let context = context_of(&wrap["context"]);
        assert_eq!(
            wrap_aad(public.key_ref().as_str(), 1, &context),
            h(&wrap["aad"]),
            "{name}"
        );
        assert_eq!(INFO, wrap["info"].as_str().unwrap().as_bytes());
        let dek = Dek::from_slice(&h(&wrap["dek"])).unwrap();
        let sk_e = StaticSecret::from(h32(&wrap["ephemeral_private_key"]));
        let wrapped = wrap_with(&sk_e, public, &dek, &context).unwrap();
        assert_eq!(wrapped, h(&wrap["wrapped"]), "{name}");
        let opened = unwrap_with(&key, &public.key_ref(), &wrapped, &context)
            .unwrap()
            .expect("the vector opens");
        assert_eq!(opened.expose_secret().to_vec(), h(&wrap["dek"]));
        // Under another context it does not.
        let other = context.clone().with("extra", "1").unwrap();
        assert!(unwrap_with(&key, &public.key_ref(), &wrapped, &other)
            .unwrap()
            .is_none());
    }
    assert!(cases >= 1);
}

/// Every `invalid_shares` entry of tests/vectors/recovery-v1.json is
/// refused at the step it names, with an error that says why.
#[test]
fn recovery_v1_invalid_shares() {
    let doc = load("recovery-v1.json");
    let cases = doc["invalid_shares"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let word = case["error"].as_str().unwrap();
        let texts: Vec<&str> = case["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let parsed: Result<Vec<RecoveryShare>> =
            texts.iter().map(|t| RecoveryShare::parse(t)).collect();
        let e = match (case["refused_at"].as_str().unwrap(), parsed) {
            ("read", Err(e)) => e,
            ("combine", Ok(shares)) => RecoveryPrivateKey::combine(&shares).unwrap_err(),
            (step, other) => panic!("{name}: expected a refusal at {step}, got {other:?}"),
        };
        let text = e.to_string();
        assert!(matches!(e, Error::RecoveryShare(_)), "{name}: {e:?}");
        assert!(text.contains(word), "{name}: {text:?} should say {word:?}");
    }
}
