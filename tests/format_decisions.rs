//! The decisions of docs/FORMAT.md that an independent decoder would
//! otherwise have to guess, as behaviour of every public decoder (see
//! `tests/decoders/mod.rs` for the list):
//!
//! - a short input is judged field by field (section 4.4);
//! - errors come in stream order: the first defect met reading the message
//!   front to back is the one reported, whether or not the decoder knows the
//!   length up front (section 7.3);
//! - a copy cut short is `Truncated` at a chunk boundary, and
//!   `TruncatedChunk` inside a chunk once a full chunk authenticated
//!   (section 7.4).

mod common;
mod decoders;

use common::{one_recipient, sealing_key, test_bytes, test_context};
use decoders::{assert_every_decoder_fails, kind, open_every_way};
use phi_envelope::{cobblestone, EncryptionContext, Error, Header};

const CHUNK: usize = cobblestone::CHUNK_SIZE;
const CT_CHUNK: usize = cobblestone::CHUNK_CT_SIZE;
const PREFIX: usize = cobblestone::PREFIX_LEN;

struct Sealed {
    dek: Vec<u8>,
    h: usize,
    pt: Vec<u8>,
    msg: Vec<u8>,
}

fn sealed(n: usize) -> Sealed {
    let (dek, key) = sealing_key(one_recipient());
    let pt = test_bytes(n, n as u64 + 3);
    let msg = key.seal(&pt, &test_context()).unwrap();
    Sealed {
        dek: dek.expose_secret().to_vec(),
        h: key.header().len(),
        pt,
        msg,
    }
}

impl Sealed {
    /// Offset of chunk `i` in the message.
    fn chunk(&self, i: usize) -> usize {
        self.h + PREFIX + i * CT_CHUNK
    }
}

// ---------------------------------------------------------------------------
// Section 4.4: short inputs, field by field.
// ---------------------------------------------------------------------------

#[test]
fn short_inputs_are_judged_field_by_field() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "Truncated"),
        (b"P", "Truncated"),
        (b"PHIEN", "Truncated"),
        (b"PHIENV", "Truncated"),
        (b"X", "NotEnvelope"),
        (b"PHX", "NotEnvelope"),
        // The version byte is present: an unknown one is reported at once,
        // since a later version may define everything after it.
        (b"PHIENV\x02", "UnsupportedVersion(2)"),
        (b"PHIENV\x00\x01", "UnsupportedVersion(0)"),
        (b"PHIENV\xff\x01", "UnsupportedVersion(255)"),
        (b"PHIENV\x01", "Truncated"),
        // Version 1 and the suite byte present: an unknown suite likewise.
        (b"PHIENV\x01\x09", "UnsupportedSuite(9)"),
        (b"PHIENV\x01\x01", "Truncated"),
        // Nine bytes: the count is checked.
        (b"PHIENV\x01\x01\x00", "Malformed"),
        (b"PHIENV\x01\x01\x01", "Truncated"),
    ];
    for (input, want) in cases {
        let got = Header::parse(input).unwrap_err();
        assert_eq!(kind(&got), *want, "Header::parse({input:?}): {got:?}");
        let mut r = *input;
        let got = Header::read_from(&mut r).unwrap_err();
        assert_eq!(kind(&got), *want, "Header::read_from({input:?}): {got:?}");
        assert_every_decoder_fails(
            input,
            &[7; 32],
            &EncryptionContext::new(),
            want,
            &format!("{input:?}"),
        );
    }
}

// ---------------------------------------------------------------------------
// Section 7.4: copies cut short (`head -c`), through every decoder.
// ---------------------------------------------------------------------------

/// What a copy of `s` cut to `cut` bytes must give: section 7.4.
fn expected_for_cut(s: &Sealed, cut: usize) -> &'static str {
    if cut < s.h + PREFIX {
        return "Truncated";
    }
    let c = cut - s.h - PREFIX;
    let (full, rem) = (c / CT_CHUNK, c % CT_CHUNK);
    if rem < cobblestone::TAG_LEN {
        "Truncated"
    } else if full == 0 {
        // Only the commitment authenticated: a record-sized message keeps
        // the one opaque error (section 7.4).
        "Decrypt"
    } else {
        "TruncatedChunk"
    }
}

#[test]
fn a_copy_cut_short_says_truncated_in_every_decoder() {
    let s = sealed(3 * CHUNK + 500);
    let ctx = test_context();
    let mut cuts = vec![
        0,
        5,
        9,
        s.h / 2,
        s.h - 1,
        s.h,
        s.h + 30,
        s.h + PREFIX - 1,
        // At chunk boundaries: the final chunk is missing.
        s.chunk(0),
        s.chunk(1),
        s.chunk(2),
        s.chunk(3),
        // Inside a chunk, less than a tag left of it.
        s.chunk(1) + 1,
        s.chunk(2) + 15,
        // Inside a chunk, more than a tag of it left.
        s.chunk(0) + 16,
        s.chunk(0) + 8000,
        s.chunk(1) + 16,
        s.chunk(1) + 8000,
        s.chunk(2) + CT_CHUNK - 1,
        s.chunk(3) + 100,
        s.msg.len() - 1,
    ];
    cuts.sort_unstable();
    for cut in cuts {
        let want = expected_for_cut(&s, cut);
        assert_every_decoder_fails(&s.msg[..cut], &s.dek, &ctx, want, &format!("cut at {cut}"));
    }
    // The whole copy opens everywhere.
    for (name, r) in open_every_way(&s.msg, &s.dek, &ctx) {
        assert!(r.unwrap() == s.pt, "{name}");
    }
}

#[test]
fn truncated_errors_say_a_complete_copy_is_needed() {
    let s = sealed(2 * CHUNK + 10);
    let ctx = test_context();
    for cut in [s.h - 3, s.chunk(1), s.chunk(1) + 5000] {
        for (name, r) in open_every_way(&s.msg[..cut], &s.dek, &ctx) {
            let text = r.unwrap_err().to_string();
            assert!(
                text.contains("truncated") && text.contains("complete copy"),
                "cut {cut}, {name}: {text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Section 7.3: the first defect in stream order wins, in every decoder.
// ---------------------------------------------------------------------------

#[test]
fn a_bad_chunk_before_a_missing_final_chunk_is_decrypt_everywhere() {
    let s = sealed(3 * CHUNK + 500);
    let ctx = test_context();
    for (bad, cut) in [(0, 3), (1, 3), (0, 1), (2, 3)] {
        let mut m = s.msg[..s.chunk(cut)].to_vec();
        m[s.chunk(bad) + 100] ^= 1;
        assert_every_decoder_fails(
            &m,
            &s.dek,
            &ctx,
            "Decrypt",
            &format!("chunk {bad} bad, cut at chunk {cut}"),
        );
        // A bad chunk before a final chunk cut inside it.
        let mut m = s.msg[..s.chunk(cut) + 300].to_vec();
        m[s.chunk(bad) + 100] ^= 1;
        assert_every_decoder_fails(
            &m,
            &s.dek,
            &ctx,
            "Decrypt",
            &format!("chunk {bad} bad, cut inside chunk {cut}"),
        );
    }
}

#[test]
fn a_bad_chunk_in_the_last_batch_before_a_missing_final_chunk_is_decrypt() {
    // More than one batch of the file engine (64 chunks): the bad chunk and
    // the cut both fall in the second batch.
    let s = sealed(70 * CHUNK + 10);
    let ctx = test_context();
    let mut m = s.msg[..s.chunk(70)].to_vec();
    m[s.chunk(66) + 3] ^= 0x80;
    assert_every_decoder_fails(&m, &s.dek, &ctx, "Decrypt", "chunk 66 bad, cut at chunk 70");
    let mut m = s.msg[..s.chunk(68) + 9].to_vec();
    m[s.chunk(65) + 3] ^= 0x80;
    assert_every_decoder_fails(
        &m,
        &s.dek,
        &ctx,
        "Decrypt",
        "chunk 65 bad, cut in the tag area of chunk 68",
    );
}

#[test]
fn a_wrong_context_or_key_before_a_bad_length_is_decrypt_everywhere() {
    let s = sealed(2 * CHUNK + 500);
    let other = EncryptionContext::from_pairs([("tenant", "other")]).unwrap();
    let mut wrong_dek = s.dek.clone();
    wrong_dek[0] ^= 1;
    for cut in [
        s.h + 20,
        s.chunk(0) + 3,
        s.chunk(1),
        s.chunk(2) + 5,
        s.chunk(1) + 4000,
    ] {
        let m = &s.msg[..cut];
        // The commitment fails before the body length is looked at... unless
        // the body is too short to hold one.
        let want = if cut < s.h + PREFIX {
            "Truncated"
        } else {
            "Decrypt"
        };
        assert_every_decoder_fails(
            m,
            &s.dek,
            &other,
            want,
            &format!("wrong context, cut at {cut}"),
        );
        // The header tag fails before anything in the body.
        assert_every_decoder_fails(
            m,
            &wrong_dek,
            &test_context(),
            "Decrypt",
            &format!("wrong DEK, cut at {cut}"),
        );
    }
}

#[test]
fn damage_to_the_final_chunk_after_full_chunks_is_truncated_chunk() {
    // A flipped bit or bytes appended in the final chunk: the same as a
    // copy cut inside it, once a full chunk authenticated.
    let s = sealed(2 * CHUNK + 500);
    let ctx = test_context();
    let mut m = s.msg.clone();
    let last = m.len() - 1;
    m[last] ^= 1;
    assert_every_decoder_fails(&m, &s.dek, &ctx, "TruncatedChunk", "final chunk flipped");
    let m = [&s.msg[..], &[0u8; 40]].concat();
    assert_every_decoder_fails(&m, &s.dek, &ctx, "TruncatedChunk", "40 bytes appended");
    // A record (one chunk): the opaque error, as for every other failure.
    let r = sealed(100);
    let mut m = r.msg.clone();
    let last = m.len() - 1;
    m[last] ^= 1;
    assert_every_decoder_fails(&m, &r.dek, &ctx, "Decrypt", "record flipped");
    let _ = Error::Decrypt;
}

// ---------------------------------------------------------------------------
// Section 7.2: mixed unwrap outcomes; section 4.2: provider id and scheme.
// ---------------------------------------------------------------------------

mod scripted {
    use phi_envelope::provider::{
        BoxFuture, KeyInfo, KeyProvider, KeyRef, ProviderError, ProviderErrorKind, Unwrapped,
    };
    use phi_envelope::{Dek, EncryptionContext, Error, Result, WrappedKey};

    /// Answers by key version: 1 down, 2 rejected, 3 the DEK, 4 a DEK that
    /// does not verify the header tag, anything else not mine.
    #[derive(Debug)]
    pub struct Scripted {
        pub dek: [u8; 32],
    }

    impl KeyProvider for Scripted {
        fn id(&self) -> &str {
            "scripted"
        }
        fn wrap<'a>(
            &'a self,
            _: &'a KeyRef,
            _: &'a Dek,
            _: &'a EncryptionContext,
        ) -> BoxFuture<'a, Result<WrappedKey>> {
            Box::pin(async { Err(phi_envelope::provider::unsupported("scripted", "wrap")) })
        }
        fn unwrap<'a>(
            &'a self,
            entry: &'a WrappedKey,
            _: &'a EncryptionContext,
        ) -> BoxFuture<'a, Result<Unwrapped>> {
            Box::pin(async move {
                Ok(match entry.key_version {
                    1 => {
                        return Err(Error::Provider(ProviderError::new(
                            "scripted",
                            ProviderErrorKind::Unavailable,
                            "down for the test",
                        )))
                    }
                    2 => Unwrapped::Rejected,
                    3 => Unwrapped::Key(Dek::from_slice(&self.dek)?),
                    4 => Unwrapped::Key(Dek::generate()?),
                    _ => Unwrapped::NotMine,
                })
            })
        }
        fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
            Box::pin(async move { Ok(KeyInfo::new(key.clone(), None, Vec::new())) })
        }
    }
}

#[test]
fn mixed_unwrap_outcomes_follow_the_documented_precedence() {
    use phi_envelope::message::SealingKey;
    use phi_envelope::provider::ProviderErrorKind;
    use phi_envelope::{Dek, Envelope, Keyring};
    use std::sync::Arc;

    let dek = Dek::generate().unwrap();
    let env = Envelope::new(
        Keyring::builder()
            .provider(Arc::new(scripted::Scripted {
                dek: *dek.expose_secret(),
            }))
            .build()
            .unwrap(),
    );
    let ctx = test_context();
    let open = |versions: &[u32], provider: &str| {
        let entries = versions
            .iter()
            .map(|&v| common::entry(provider, "scripted:k", v, &[1]))
            .collect();
        let msg = SealingKey::new(&dek, entries)
            .unwrap()
            .seal(b"x", &ctx)
            .unwrap();
        decoders::block_on(env.open(&msg, &ctx))
    };
    // A success anywhere wins, whatever failed before it.
    for order in [[1, 2, 3], [2, 1, 3], [3, 1, 2], [4, 1, 3], [5, 2, 3]] {
        assert_eq!(open(&order, "scripted").unwrap(), b"x", "{order:?}");
    }
    // Then an operational failure, wherever it is.
    for order in [&[1, 2][..], &[2, 1], &[4, 1, 5], &[1]] {
        match open(order, "scripted") {
            Err(Error::Provider(p)) => assert_eq!(p.kind(), ProviderErrorKind::Unavailable),
            other => panic!("{order:?}: {other:?}"),
        }
    }
    // Then a rejection (by the provider, or a DEK that fails the tag).
    for order in [&[2][..], &[4], &[5, 2], &[4, 5, 2]] {
        assert!(
            matches!(open(order, "scripted"), Err(Error::Decrypt)),
            "{order:?}"
        );
    }
    // Then nobody's key.
    assert!(matches!(
        open(&[5, 6], "scripted"),
        Err(Error::NoMatchingKey(_))
    ));
    assert!(matches!(open(&[3], "other"), Err(Error::NoMatchingKey(_))));
}

#[test]
fn a_key_reference_of_another_scheme_is_well_formed() {
    // Provider `local` with an `aws-kms:` reference: not Malformed (4.2).
    let (dek, key) = sealing_key(vec![common::entry("local", "aws-kms:alias/x", 1, &[1])]);
    let msg = key.seal(b"x", &test_context()).unwrap();
    let (h, _) = Header::parse(&msg).unwrap();
    assert_eq!(h.recipients()[0].key_ref, "aws-kms:alias/x");
    assert_eq!(
        phi_envelope::message::open(&msg, &dek, &test_context()).unwrap(),
        b"x"
    );
}

#[test]
fn suite_and_malformed_names_are_the_documented_ones() {
    use phi_envelope::format::Suite;
    assert_eq!(Suite::Aes256GcmHkdfSha512.name(), "Aes256GcmHkdfSha512");
    assert_eq!(
        format!("{:?}", Suite::Aes256GcmHkdfSha512),
        "Aes256GcmHkdfSha512"
    );
    assert_eq!(Suite::from_id(1).unwrap().id(), 1);
    let e = Header::parse(b"PHIENV\x01\x01\x09").unwrap_err();
    assert_eq!(e.malformed_field(), Some("count"));
    assert_eq!(e.to_string(), "malformed header: count: out of range 1..=8");
}
