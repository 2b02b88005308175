//! The committed associated-data vectors
//! (tests/vectors/phi-envelope-v1-ad.json, docs/FORMAT.md sections 5.4 and
//! 13.2) through every decoder of the public API, each given the associated
//! data through its `_with` form (the file engine through
//! `FileOptions::associated_data`): the positive vectors open, and open
//! nowhere without their associated data or with another; the negative
//! vectors fail with their error everywhere.

mod common;
mod decoders;

use common::{ad_vectors, v1_vectors};
use phi_envelope::message::{self, SealingKey};
use phi_envelope::{EncryptionContext, Error, Header};

#[test]
fn every_ad_vector_opens_through_every_decoder() {
    for v in ad_vectors() {
        let results =
            decoders::open_every_way_ad(&v.message, &v.dek, &v.context(), &v.associated_data);
        assert!(results.len() >= 9, "{}", v.name);
        for (decoder, r) in results {
            let pt = r.unwrap_or_else(|e| panic!("{}: {decoder}: {e:?}", v.name));
            assert_eq!(pt, v.plaintext, "{}: {decoder}", v.name);
        }
    }
}

/// Without its associated data, with one byte more or less, or one byte
/// changed, a vector is the opaque `Decrypt` in every decoder (the forms
/// without associated data included), and nothing is released.
#[test]
fn every_ad_vector_refuses_other_associated_data() {
    for v in ad_vectors() {
        let ad = &v.associated_data;
        let mut changed = ad.clone();
        changed[0] ^= 0x80;
        let others: Vec<Vec<u8>> = vec![
            Vec::new(),
            ad[..ad.len() - 1].to_vec(),
            [&ad[..], b"\0"].concat(),
            changed,
        ];
        for other in others {
            let results = decoders::open_every_way_ad(&v.message, &v.dek, &v.context(), &other);
            for (decoder, r) in results {
                match r {
                    Err(Error::InvalidAssociatedData(_)) if other.len() > 65536 => {}
                    Err(Error::Decrypt) => {}
                    other_result => panic!(
                        "{} with {} bytes of other associated data: {decoder} gave {:?}",
                        v.name,
                        other.len(),
                        other_result.map(|p| p.len())
                    ),
                }
            }
        }
    }
}

/// The first two vectors are the first two v1 vectors with associated data
/// added: the header is the same byte for byte (the header tag does not
/// cover the associated data), the body differs from the commitment on.
#[test]
fn associated_data_leaves_the_header_alone() {
    let (ad, v1) = (ad_vectors(), v1_vectors());
    for (a, b) in ad.iter().zip(&v1).take(2) {
        let (ha, used) = Header::parse(&a.message).unwrap();
        let (hb, _) = Header::parse(&b.message).unwrap();
        assert_eq!(ha, hb, "{}", a.name);
        assert_eq!(a.message.len(), b.message.len(), "{}", a.name);
        // Same salt, other commitment.
        assert_eq!(a.message[..used + 24], b.message[..used + 24]);
        assert_ne!(
            a.message[used + 24..used + 56],
            b.message[used + 24..used + 56]
        );
        // And each opens only as itself.
        assert!(message::open(&a.message, &a.dek(), &a.context()).is_err());
        assert!(
            message::open_with(&b.message, &b.dek(), &b.context(), &a.associated_data)
                .unwrap_err()
                .is_decrypt()
        );
    }
}

/// With a fresh salt the library reseals each vector to a message of the
/// same header and length that opens the same way.
#[test]
fn ad_vectors_reseal_to_messages_that_open() {
    for v in ad_vectors() {
        let key = SealingKey::new(&v.dek(), v.recipients.clone()).unwrap();
        let sealed = key
            .seal_with(&v.plaintext, &v.context(), &v.associated_data)
            .unwrap();
        assert_eq!(sealed.len(), v.message.len(), "{}", v.name);
        assert_eq!(
            message::open_with(&sealed, &v.dek(), &v.context(), &v.associated_data).unwrap(),
            v.plaintext
        );
        let mut streamed = Vec::new();
        let mut enc = key
            .encryptor_with(&mut streamed, &v.context(), &v.associated_data)
            .unwrap();
        common::write_in_slices(&mut enc, &v.plaintext, &[1, 16385, 7, 4096]);
        enc.finish().unwrap();
        assert_eq!(
            message::open_with(&streamed, &v.dek(), &v.context(), &v.associated_data).unwrap(),
            v.plaintext,
            "{}",
            v.name
        );
    }
}

struct Negative {
    name: String,
    dek: Vec<u8>,
    context: Vec<(String, String)>,
    ad: Vec<u8>,
    message: Vec<u8>,
    error: String,
    released: usize,
}

fn negative_vectors() -> Vec<Negative> {
    let doc = common::vector_file("phi-envelope-v1-ad.json");
    let s = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
    let out: Vec<Negative> = doc["negative_vectors"]
        .as_array()
        .expect("negative_vectors")
        .iter()
        .map(|v| Negative {
            name: s(&v["name"]),
            dek: hex::decode(s(&v["dek"])).unwrap(),
            context: v["context"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (s(&p[0]), s(&p[1])))
                .collect(),
            ad: hex::decode(s(&v["associated_data"])).unwrap(),
            message: hex::decode(s(&v["message"])).unwrap(),
            error: s(&v["error"]),
            released: usize::try_from(v["released"].as_u64().unwrap()).unwrap(),
        })
        .collect();
    assert!(out.len() >= 10, "{} negative vectors", out.len());
    let kinds: std::collections::BTreeSet<&str> = out.iter().map(|n| n.error.as_str()).collect();
    for want in ["Decrypt", "TruncatedChunk", "InvalidAssociatedData"] {
        assert!(kinds.contains(want), "no negative vector for {want}");
    }
    out
}

#[test]
fn every_ad_negative_vector_fails_with_its_error_in_every_decoder() {
    for n in negative_vectors() {
        let ctx = EncryptionContext::from_pairs(n.context.iter().cloned()).unwrap();
        let results = decoders::open_every_way_ad(&n.message, &n.dek, &ctx, &n.ad);
        assert!(results.len() >= 9);
        for (decoder, r) in results {
            match r {
                Ok(pt) => panic!("{}: {decoder} opened it ({} bytes)", n.name, pt.len()),
                Err(e) => assert_eq!(
                    decoders::kind(&e),
                    n.error,
                    "{}: {decoder} gave {e:?}",
                    n.name
                ),
            }
        }
        // The streaming decoder releases exactly the authenticated full
        // chunks before the failure (none when the associated data is
        // refused before any key is used).
        let (header, used) = match Header::parse(&n.message) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{}: {e:?}", n.name),
        };
        let key =
            message::OpeningKey::new(&phi_envelope::Dek::from_slice(&n.dek).unwrap(), &header)
                .unwrap();
        let released = match key.decryptor_with(&n.message[used..], &ctx, &n.ad) {
            Err(e) => {
                assert_eq!(decoders::kind(&e), n.error, "{}", n.name);
                0
            }
            Ok(r) => {
                let (out, err) = common::drain_with(r, 1000);
                assert!(err.is_some(), "{}", n.name);
                out.len()
            }
        };
        assert_eq!(released, n.released, "{}", n.name);
    }
}

/// Associated data over the limit is refused before the message is even
/// parsed: garbage bytes give `InvalidAssociatedData`, not `NotEnvelope`.
#[test]
fn oversized_associated_data_is_refused_before_anything_else() {
    let too_long = vec![0u8; 65537];
    let dek = phi_envelope::Dek::from_slice(&[7; 32]).unwrap();
    let err = message::open_with(b"not a message", &dek, &EncryptionContext::new(), &too_long)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAssociatedData(_)), "{err:?}");
    // The limit itself is allowed.
    let key = SealingKey::new(&dek, vec![common::entry("local", "local:k", 1, &[1])]).unwrap();
    let ok = key
        .seal_with(b"x", &EncryptionContext::new(), &too_long[..65536])
        .unwrap();
    assert_eq!(
        message::open_with(&ok, &dek, &EncryptionContext::new(), &too_long[..65536]).unwrap(),
        b"x"
    );
    assert!(matches!(
        key.seal_with(b"x", &EncryptionContext::new(), &too_long),
        Err(Error::InvalidAssociatedData(_))
    ));
    // Its text says what is wrong and never repeats the data.
    let secret = vec![b'Q'; 65537];
    let e = message::open_with(&ok, &dek, &EncryptionContext::new(), &secret).unwrap_err();
    assert!(!format!("{e} {e:?}").contains("QQQQ"));
}
