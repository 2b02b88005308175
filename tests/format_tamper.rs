//! Tampering with whole v1 messages, opened with the right DEK and context
//! through all three decoders: every single-bit flip of a two-recipient
//! header, every bit of the salt and commitment and sampled bits of every
//! chunk are rejected, authentication failures as the opaque
//! `Error::Decrypt` (a failing final chunk after full chunks that
//! authenticated is `Error::TruncatedChunk`, docs/FORMAT.md section 7.4). Then rewrap: a rewrapped header opens the old body; a
//! header tagged under another DEK, or a header in front of a body it was
//! not sealed with, does not.

mod common;

use common::{
    describe, entry, header_layout, one_recipient, open_all, open_streaming, sealing_key,
    test_bytes, test_context, two_recipients, HeaderField,
};
use phi_envelope::message::{self, SealingKey};
use phi_envelope::{cobblestone, Dek, EncryptionContext, Error, Header};

const CHUNK: usize = cobblestone::CHUNK_SIZE;
const CT_CHUNK: usize = cobblestone::CHUNK_CT_SIZE;

/// What a flip of one header bit must give, from the field it falls in.
fn header_flip_ok(field: HeaderField, flipped: u8, e: &Error, key_ref_ok: bool) -> bool {
    use HeaderField::*;
    match field {
        Magic => matches!(e, Error::NotEnvelope),
        Version => matches!(e, Error::UnsupportedVersion(v) if *v == flipped),
        Suite => matches!(e, Error::UnsupportedSuite(s) if *s == flipped),
        // A changed count or length shifts every later field: the parse
        // fails somewhere, or lands on a header whose tag is wrong.
        Count | ProviderLen | KeyRefLen | WrappedLen => {
            matches!(e, Error::Malformed(_) | Error::Truncated | Error::Decrypt)
        }
        Provider => {
            if flipped.is_ascii_lowercase() || flipped.is_ascii_digit() || flipped == b'-' {
                matches!(e, Error::Decrypt)
            } else {
                matches!(e, Error::Malformed(_))
            }
        }
        KeyRef => {
            if key_ref_ok {
                matches!(e, Error::Decrypt)
            } else {
                matches!(e, Error::Malformed(_))
            }
        }
        KeyVersion | Wrapped | Tag => matches!(e, Error::Decrypt),
    }
}

/// The key reference bytes that contain `index`, with that byte replaced,
/// are still a valid key reference.
fn key_ref_valid_after(header: &[u8], layout: &[HeaderField], index: usize, flipped: u8) -> bool {
    let mut start = index;
    while start > 0 && layout[start - 1] == HeaderField::KeyRef {
        start -= 1;
    }
    let mut end = index;
    while end < layout.len() && layout[end] == HeaderField::KeyRef {
        end += 1;
    }
    let mut bytes = header[start..end].to_vec();
    bytes[index - start] = flipped;
    std::str::from_utf8(&bytes).is_ok_and(|s| !s.chars().any(char::is_control))
}

#[test]
fn every_header_bit_flip_is_rejected() {
    let recipients = two_recipients();
    let (dek, key) = sealing_key(recipients.clone());
    let ctx = test_context();
    let pt = test_bytes(CHUNK + 10, 1);
    let msg = key.seal(&pt, &ctx).unwrap();
    let header = key.header().as_bytes().to_vec();
    let layout = header_layout(&recipients);
    assert_eq!(
        layout.len(),
        header.len(),
        "layout helper matches the header"
    );

    let mut flips = 0;
    for (i, &field) in layout.iter().enumerate() {
        for bit in 0..8 {
            let mut m = msg.clone();
            m[i] ^= 1 << bit;
            let flipped = m[i];
            let key_ref_ok =
                field == HeaderField::KeyRef && key_ref_valid_after(&header, &layout, i, flipped);
            for (d, r) in open_all(&m, &dek, &ctx).iter().enumerate() {
                let ok = match r {
                    Ok(_) => false,
                    Err(e) => header_flip_ok(field, flipped, e, key_ref_ok),
                };
                assert!(
                    ok,
                    "byte {i} ({field:?}) bit {bit}: decoder {d} gave {}",
                    describe(r)
                );
            }
            // Nothing is released for a header failure.
            assert!(open_streaming(&m, &dek, &ctx, 64).released.is_empty());
            flips += 1;
        }
    }
    assert_eq!(flips, 8 * header.len());
    assert!(
        header.len() > 200,
        "a two-recipient header: {} bytes",
        header.len()
    );
}

#[test]
fn sampled_body_bit_flips_are_rejected() {
    let (dek, key) = sealing_key(one_recipient());
    let ctx = test_context();
    let n = 2 * CHUNK + 500;
    let pt = test_bytes(n, 2);
    let msg = key.seal(&pt, &ctx).unwrap();
    let h = key.header().len();
    let body0 = h + cobblestone::PREFIX_LEN;

    // (byte index, plaintext bytes a streaming decoder may release first)
    let mut positions: Vec<(usize, usize)> = (h..body0).map(|i| (i, 0)).collect();
    for c in 0..3 {
        let start = body0 + c * CT_CHUNK;
        let end = (start + CT_CHUNK).min(msg.len());
        let tag = end - cobblestone::TAG_LEN;
        for i in [
            start,
            start + 1,
            (start + tag) / 2,
            tag - 1,
            tag,
            tag + 7,
            end - 1,
        ] {
            positions.push((i, c * CHUNK));
        }
    }
    let mut flips = 0;
    for (i, released) in positions {
        for bit in 0..8 {
            let mut m = msg.clone();
            m[i] ^= 1 << bit;
            // A flip in the final chunk, after two full chunks that
            // authenticate, reads as a copy cut inside it (docs/FORMAT.md
            // section 7.4); every other flip is the opaque error.
            let in_final = i >= body0 + 2 * CT_CHUNK;
            for (d, r) in open_all(&m, &dek, &ctx).iter().enumerate() {
                assert!(
                    if in_final {
                        matches!(r, Err(Error::TruncatedChunk))
                    } else {
                        matches!(r, Err(Error::Decrypt))
                    },
                    "body byte {} bit {bit}: decoder {d} gave {}",
                    i - h,
                    describe(r)
                );
            }
            let s = open_streaming(&m, &dek, &ctx, 1000);
            assert!(
                s.released == pt[..released],
                "body byte {} bit {bit}: released {} bytes",
                i - h,
                s.released.len()
            );
            flips += 1;
        }
    }
    assert_eq!(flips, 8 * (56 + 3 * 7));
}

#[test]
fn the_wrong_dek_or_context_is_the_same_opaque_error_as_tampering() {
    let (dek, key) = sealing_key(one_recipient());
    let ctx = test_context();
    let msg = key.seal(b"payload", &ctx).unwrap();
    let other = Dek::generate().unwrap();
    let results = [
        open_all(&msg, &other, &ctx),
        open_all(&msg, &dek, &EncryptionContext::new()),
        open_all(
            &[&msg[..msg.len() - 1], &[msg[msg.len() - 1] ^ 1]].concat(),
            &dek,
            &ctx,
        ),
    ];
    let messages: Vec<String> = results
        .iter()
        .flatten()
        .map(|r| r.as_ref().unwrap_err().to_string())
        .collect();
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");
    assert!(results
        .iter()
        .flatten()
        .all(|r| matches!(r, Err(Error::Decrypt))));
}

// ---------------------------------------------------------------------------
// Rewrap.
// ---------------------------------------------------------------------------

#[test]
fn rewrapped_header_opens_the_old_body() {
    let (dek, key) = sealing_key(one_recipient());
    let ctx = test_context();
    let pt = test_bytes(3 * CHUNK + 77, 3);
    let msg = key.seal(&pt, &ctx).unwrap();
    let (old, used) = Header::parse(&msg).unwrap();
    let body = &msg[used..];

    let eight: Vec<_> = (0..8)
        .map(|i| {
            entry(
                "aws-kms",
                &format!("aws-kms:alias/dr-{i}"),
                i,
                &[i as u8 + 1; 184],
            )
        })
        .collect();
    for new_recipients in [two_recipients(), one_recipient(), eight] {
        let new = message::rewrap_header(&old, &dek, new_recipients.clone()).unwrap();
        assert_eq!(new.recipients(), &new_recipients[..]);
        assert_eq!(new.suite(), old.suite());
        let rewrapped = [new.as_bytes(), body].concat();
        for (d, r) in open_all(&rewrapped, &dek, &ctx).into_iter().enumerate() {
            assert_eq!(r.unwrap(), pt, "decoder {d}");
        }
        // The tag is recomputed: the new header is exactly what a sealing
        // key for the new recipients writes.
        let fresh = SealingKey::new(&dek, new_recipients).unwrap();
        assert_eq!(fresh.header(), &new);
        // Rewrap of the rewrapped header works too (rotation after rotation).
        let again = message::rewrap_header(&new, &dek, one_recipient()).unwrap();
        assert_eq!(again, old);
    }
}

#[test]
fn rewrap_checks_the_old_tag_and_the_new_bounds() {
    let (dek, key) = sealing_key(two_recipients());
    let old = key.header().clone();
    assert!(matches!(
        message::rewrap_header(&old, &Dek::generate().unwrap(), one_recipient()),
        Err(Error::Decrypt)
    ));
    // A header whose bytes were changed (here: the key version of entry 1)
    // cannot be rewrapped.
    let mut bytes = old.as_bytes().to_vec();
    let layout = header_layout(&two_recipients());
    let at = layout
        .iter()
        .rposition(|f| *f == HeaderField::KeyVersion)
        .unwrap();
    bytes[at] ^= 1;
    let (tampered, _) = Header::parse(&bytes).unwrap();
    assert!(matches!(
        message::rewrap_header(&tampered, &dek, one_recipient()),
        Err(Error::Decrypt)
    ));
    // New entries obey the same bounds as parsed ones.
    let nine: Vec<_> = (0..9).map(|i| entry("local", "local:k", i, &[1])).collect();
    for bad in [
        vec![],
        nine,
        vec![entry("Local", "local:k", 1, &[1])],
        vec![entry("local", "", 1, &[1])],
        vec![entry("local", "local:\n", 1, &[1])],
        vec![entry("local", "local:k", 1, &[])],
        vec![entry("local", "local:k", 1, &[0; 2049])],
        vec![entry(&"a".repeat(33), "local:k", 1, &[1])],
        vec![entry("local", &"k".repeat(1025), 1, &[1])],
    ] {
        assert!(
            matches!(
                message::rewrap_header(&old, &dek, bad.clone()),
                Err(Error::Malformed(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn header_retagged_under_another_dek_fails() {
    let (dek, key) = sealing_key(one_recipient());
    let ctx = test_context();
    let pt = test_bytes(1000, 4);
    let msg = key.seal(&pt, &ctx).unwrap();
    let body = &msg[key.header().len()..];

    // Same recipients, tagged under another DEK, in front of the old body.
    let other = Dek::generate().unwrap();
    let other_key = SealingKey::new(&other, one_recipient()).unwrap();
    let spliced = [other_key.header().as_bytes(), body].concat();
    // With the old DEK the header tag fails; with the new one, the commitment.
    for d in [&dek, &other] {
        for (i, r) in open_all(&spliced, d, &ctx).iter().enumerate() {
            assert!(
                matches!(r, Err(Error::Decrypt)),
                "decoder {i}: {}",
                describe(r)
            );
        }
    }
}

#[test]
fn header_in_front_of_another_messages_body_fails() {
    // Same DEK, different recipients and different contexts.
    let dek = Dek::generate().unwrap();
    let key_a = SealingKey::new(&dek, one_recipient()).unwrap();
    let key_b = SealingKey::new(&dek, two_recipients()).unwrap();
    let ctx_a = test_context();
    let ctx_b =
        EncryptionContext::from_pairs([("tenant", "st-mary"), ("record_type", "x")]).unwrap();
    let pt_b = test_bytes(20_000, 5);
    let msg_a = key_a.seal(b"message a", &ctx_a).unwrap();
    let msg_b = key_b.seal(&pt_b, &ctx_b).unwrap();
    let header_a = &msg_a[..key_a.header().len()];
    let body_b = &msg_b[key_b.header().len()..];
    let spliced = [header_a, body_b].concat();

    // Opened as message a (its header, its context): the body is not a's.
    for (i, r) in open_all(&spliced, &dek, &ctx_a).iter().enumerate() {
        assert!(
            matches!(r, Err(Error::Decrypt)),
            "decoder {i}: {}",
            describe(r)
        );
    }
    // Same sealing key, different contexts: a's header is b's header, and
    // only the context tells the bodies apart.
    let msg_c = key_a.seal(&pt_b, &ctx_b).unwrap();
    let spliced = [header_a, &msg_c[header_a.len()..]].concat();
    assert_eq!(spliced, msg_c);
    for (i, r) in open_all(&spliced, &dek, &ctx_a).iter().enumerate() {
        assert!(
            matches!(r, Err(Error::Decrypt)),
            "decoder {i}: {}",
            describe(r)
        );
    }
    // Bodies of two messages swapped under another DEK fail under both.
    let (dek2, key2) = sealing_key(one_recipient());
    let msg_d = key2.seal(b"message d", &ctx_a).unwrap();
    let spliced = [header_a, &msg_d[key2.header().len()..]].concat();
    for d in [&dek, &dek2] {
        for (i, r) in open_all(&spliced, d, &ctx_a).iter().enumerate() {
            assert!(
                matches!(r, Err(Error::Decrypt)),
                "decoder {i}: {}",
                describe(r)
            );
        }
    }
}

/// By design (docs/FORMAT.md section 10): a header is bound to its DEK, not
/// to one body. Any valid header for the DEK in front of any body under that
/// DEK opens with that body's context. This is what lets rewrap leave the
/// body alone; it also means rewrap is not revocation.
#[test]
fn header_is_bound_to_the_dek_not_to_one_body() {
    let dek = Dek::generate().unwrap();
    let key_a = SealingKey::new(&dek, one_recipient()).unwrap();
    let key_b = SealingKey::new(&dek, two_recipients()).unwrap();
    let ctx_b = EncryptionContext::from_pairs([("record_id", "b")]).unwrap();
    let pt_b = test_bytes(100, 6);
    let msg_b = key_b.seal(&pt_b, &ctx_b).unwrap();
    let spliced = [key_a.header().as_bytes(), &msg_b[key_b.header().len()..]].concat();
    for (i, r) in open_all(&spliced, &dek, &ctx_b).into_iter().enumerate() {
        assert_eq!(r.unwrap(), pt_b, "decoder {i}");
    }
}
