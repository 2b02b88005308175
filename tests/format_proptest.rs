//! Property tests of the v1 format:
//!
//! - arbitrary plaintexts (0..70_000 bytes, biased to chunk boundaries),
//!   contexts and recipient sets round-trip through the one-shot and the
//!   streaming paths, the encryptor written in arbitrary slices and the
//!   decryptor read with arbitrary buffers;
//! - any mutation of a valid message (bit flips, insertions, deletions,
//!   truncations, in any combination) is rejected unless it is a no-op;
//! - the header parser never panics, never consumes more than
//!   `MAX_HEADER_LEN`, and the context encoding is injective and
//!   independent of insertion order.
//!
//! Case counts are kept small so the file runs in seconds in debug builds.

mod common;

use std::collections::BTreeMap;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::{select, Index};

use common::{open_streaming, test_bytes, write_in_slices};
use phi_envelope::format::MAX_HEADER_LEN;
use phi_envelope::message::{self, SealingKey};
use phi_envelope::{Dek, EncryptionContext, Error, Header, WrappedKey};

const CHUNK: usize = phi_envelope::cobblestone::CHUNK_SIZE;

fn plaintext() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        3 => 0..300usize,
        2 => 0..70_000usize,
        2 => select(vec![
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK - 1,
            2 * CHUNK,
            2 * CHUNK + 1,
            4 * CHUNK,
        ]),
    ];
    (len, any::<u64>()).prop_map(|(n, seed)| test_bytes(n, seed))
}

/// Valid context pairs: keys 1..=24 characters, values 0..=32, any
/// non-control Unicode in both.
fn pairs() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map("[a-z_]{1,12}|\\PC{1,24}", "\\PC{0,32}", 0..6)
}

fn context_of(pairs: &BTreeMap<String, String>, reverse: bool) -> EncryptionContext {
    let mut v: Vec<_> = pairs.iter().collect();
    if reverse {
        v.reverse();
    }
    EncryptionContext::from_pairs(v.into_iter().map(|(k, v)| (k.clone(), v.clone()))).unwrap()
}

fn wrapped_key() -> impl Strategy<Value = WrappedKey> {
    (
        "[a-z0-9-]{1,32}",
        "[^\\p{Cc}]{1,40}",
        any::<u32>(),
        prop_oneof![vec(any::<u8>(), 1..200), vec(any::<u8>(), 2000..=2048)],
    )
        .prop_map(|(provider, key_ref, key_version, wrapped)| WrappedKey {
            provider,
            key_ref,
            key_version,
            wrapped,
        })
}

fn recipients() -> impl Strategy<Value = Vec<WrappedKey>> {
    vec(wrapped_key(), 1..=8)
}

/// Seals `pt` through the message encryptor, written in slices of the
/// given sizes.
fn seal_in_slices(
    key: &SealingKey,
    ctx: &EncryptionContext,
    pt: &[u8],
    slices: &[usize],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = key.encryptor(&mut out, ctx).unwrap();
    write_in_slices(&mut enc, pt, slices);
    enc.finish().unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip_one_shot_and_streaming(
        dek in any::<[u8; 32]>(),
        pt in plaintext(),
        pairs in pairs(),
        recipients in recipients(),
        slices in vec(1..20_000usize, 1..6),
        read_len in prop_oneof![1..64usize, 1..70_000usize],
    ) {
        let dek = Dek::from_slice(&dek).unwrap();
        let key = SealingKey::new(&dek, recipients.clone()).unwrap();
        let ctx = context_of(&pairs, false);
        // The same pairs given in another order are the same context.
        let ctx_rev = context_of(&pairs, true);
        prop_assert_eq!(&ctx, &ctx_rev);

        let sealed = key.seal(&pt, &ctx).unwrap();
        let streamed = seal_in_slices(&key, &ctx, &pt, &slices);
        prop_assert_eq!(sealed.len(), streamed.len());
        let h = key.header().len();
        prop_assert_eq!(&sealed[..h], &streamed[..h]);

        for msg in [&sealed, &streamed] {
            let (header, used) = Header::parse(msg).unwrap();
            prop_assert_eq!(used, h);
            prop_assert_eq!(header.recipients(), &recipients[..]);
            prop_assert_eq!(message::open(msg, &dek, &ctx_rev).unwrap(), pt.clone());
            let s = open_streaming(msg, &dek, &ctx, read_len);
            prop_assert!(s.result.is_ok(), "{:?}", s.result);
            prop_assert!(s.released == pt);
        }
    }

    #[test]
    fn context_encoding_is_injective_and_order_free(a in pairs(), b in pairs()) {
        let (ca, cb) = (context_of(&a, false), context_of(&b, true));
        prop_assert_eq!(ca.canonical_pairs(), context_of(&a, true).canonical_pairs());
        prop_assert_eq!(a == b, ca.canonical_pairs() == cb.canonical_pairs());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_small_plaintexts_round_trip(
        pt in vec(any::<u8>(), 0..2000),
        pairs in pairs(),
        slices in vec(1..700usize, 1..4),
    ) {
        let dek = Dek::generate().unwrap();
        let key = SealingKey::new(&dek, common::one_recipient()).unwrap();
        let ctx = context_of(&pairs, false);
        let msg = seal_in_slices(&key, &ctx, &pt, &slices);
        prop_assert_eq!(message::open(&msg, &dek, &ctx).unwrap(), pt);
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
    /// Copies a run of bytes from one place over another.
    Overwrite(Index, Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<Index>().prop_map(Mutation::Delete),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), 1..64usize)
            .prop_map(|(a, b, n)| Mutation::Overwrite(a, b, n)),
    ]
}

fn apply(msg: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut m = msg.to_vec();
    for mu in mutations {
        if m.is_empty() {
            m.push(0);
            continue;
        }
        match mu {
            Mutation::Flip(i, x) => {
                let i = i.index(m.len());
                m[i] ^= x;
            }
            Mutation::Insert(i, b) => {
                let i = i.index(m.len() + 1);
                m.insert(i, *b);
            }
            Mutation::Delete(i) => {
                let i = i.index(m.len());
                m.remove(i);
            }
            Mutation::Truncate(i) => {
                let i = i.index(m.len());
                m.truncate(i);
            }
            Mutation::Overwrite(from, to, n) => {
                let (from, to) = (from.index(m.len()), to.index(m.len()));
                let n = (*n).min(m.len() - from).min(m.len() - to);
                let run = m[from..from + n].to_vec();
                m[to..to + n].copy_from_slice(&run);
            }
        }
    }
    m
}

/// A mutated message must not open, by either path; the streaming path may
/// release only a prefix of the true plaintext.
fn check_rejected(
    original: &[u8],
    mutated: &[u8],
    dek: &Dek,
    ctx: &EncryptionContext,
    pt: &[u8],
) -> Result<(), TestCaseError> {
    if mutated == original {
        return Ok(()); // a no-op
    }
    let r = message::open(mutated, dek, ctx);
    prop_assert!(r.is_err(), "a mutated message opened");
    let e = r.unwrap_err();
    prop_assert!(
        matches!(
            e,
            Error::Decrypt
                | Error::Truncated
                | Error::TruncatedChunk
                | Error::NotEnvelope
                | Error::UnsupportedVersion(_)
                | Error::UnsupportedSuite(_)
                | Error::Malformed(_)
        ),
        "unexpected error kind {:?}",
        e
    );
    let s = open_streaming(mutated, dek, ctx, 777);
    prop_assert!(s.result.is_err(), "a mutated message streamed to its end");
    // One rule for every decoder (docs/FORMAT.md section 7.3): the
    // streaming decoder reports the same kind of error as the one-shot one.
    let streamed = s.result.as_ref().unwrap_err();
    prop_assert!(
        std::mem::discriminant(streamed) == std::mem::discriminant(&e),
        "one-shot gave {:?}, streaming {:?}",
        e,
        streamed
    );
    prop_assert!(s.released.len() <= pt.len());
    prop_assert!(s.released == pt[..s.released.len()]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_mutation_of_a_small_message_is_rejected(
        pt in vec(any::<u8>(), 0..100),
        pairs in pairs(),
        two in any::<bool>(),
        mutations in vec(mutation(), 1..4),
    ) {
        let dek = Dek::generate().unwrap();
        let recipients = if two { common::two_recipients() } else { common::one_recipient() };
        let key = SealingKey::new(&dek, recipients).unwrap();
        let ctx = context_of(&pairs, false);
        let msg = key.seal(&pt, &ctx).unwrap();
        let mutated = apply(&msg, &mutations);
        check_rejected(&msg, &mutated, &dek, &ctx, &pt)?;
    }

    #[test]
    fn header_parser_is_total_and_bounded(
        prefix in select(vec![&b""[..], b"PHIENV", b"PHIENV\x01\x01", b"PHIENV\x01\x01\x01"]),
        rest in vec(any::<u8>(), 0..600),
    ) {
        let input = [prefix, &rest[..]].concat();
        if let Ok((header, used)) = Header::parse(&input) {
            prop_assert!(used <= input.len() && used <= MAX_HEADER_LEN);
            prop_assert_eq!(header.as_bytes(), &input[..used]);
            let (again, used_again) = Header::parse(header.as_bytes()).unwrap();
            prop_assert_eq!(used_again, used);
            prop_assert_eq!(again, header);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn any_mutation_of_a_multi_chunk_message_is_rejected(
        seed in any::<u64>(),
        len in select(vec![CHUNK, CHUNK + 1, 2 * CHUNK + 300]),
        mutations in vec(mutation(), 1..3),
    ) {
        let dek = Dek::generate().unwrap();
        let key = SealingKey::new(&dek, common::one_recipient()).unwrap();
        let ctx = common::test_context();
        let pt = test_bytes(len, seed);
        let msg = key.seal(&pt, &ctx).unwrap();
        let mutated = apply(&msg, &mutations);
        check_rejected(&msg, &mutated, &dek, &ctx, &pt)?;
    }
}
