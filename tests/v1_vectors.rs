//! The committed v1 known-answer vectors (tests/vectors/phi-envelope-v1.json)
//! through every decoder of the public API: `message::open`, the streaming
//! `Decryptor` and the `SeekableDecryptor`; their headers through
//! `Header::parse` and `Header::read_from`; and the failures a wrong DEK or a
//! wrong encryption context must give.

mod common;

use std::io::{Cursor, Read, Seek, SeekFrom};

use common::{open_all, open_streaming, v1_vectors, V1Vector};
use phi_envelope::message::{self, MessageInfo, OpeningKey, DEFAULT_SUITE};
use phi_envelope::{cobblestone, format, Dek, EncryptionContext, Error, Header};

#[test]
fn every_vector_opens_to_its_plaintext() {
    for v in v1_vectors() {
        let pt = message::open(&v.message, &v.dek(), &v.context())
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(pt, v.plaintext, "{}", v.name);
    }
}

#[test]
fn every_vector_opens_through_all_decoders() {
    for v in v1_vectors() {
        for (i, r) in open_all(&v.message, &v.dek(), &v.context())
            .into_iter()
            .enumerate()
        {
            let pt = r.unwrap_or_else(|e| panic!("{} decoder {i}: {e}", v.name));
            assert_eq!(pt, v.plaintext, "{} decoder {i}", v.name);
        }
        for buf_len in [1, 7, 16384, 65536] {
            let s = open_streaming(&v.message, &v.dek(), &v.context(), buf_len);
            assert!(s.result.is_ok(), "{} buf {buf_len}", v.name);
            assert_eq!(s.released, v.plaintext, "{} buf {buf_len}", v.name);
        }
    }
}

#[test]
fn seeking_into_every_vector() {
    for v in v1_vectors() {
        let (header, used) = Header::parse(&v.message).unwrap();
        let key = OpeningKey::new(&v.dek(), &header).unwrap();
        let mut cur = Cursor::new(&v.message);
        cur.seek(SeekFrom::Start(used as u64)).unwrap();
        let mut dec = key.seekable_decryptor(cur, &v.context()).unwrap();
        let n = v.plaintext.len() as u64;
        assert_eq!(dec.plaintext_len(), n, "{}", v.name);
        for at in [0, 1, n / 2, n.saturating_sub(1), n, n + 10] {
            dec.seek(SeekFrom::Start(at)).unwrap();
            let mut rest = Vec::new();
            dec.read_to_end(&mut rest).unwrap();
            let from = (at as usize).min(v.plaintext.len());
            assert_eq!(rest, v.plaintext[from..], "{} from {at}", v.name);
        }
    }
}

#[test]
fn headers_match_the_json_recipients() {
    for v in v1_vectors() {
        let (header, used) = Header::parse(&v.message).unwrap();
        assert_eq!(header.recipients(), &v.recipients[..], "{}", v.name);
        assert_eq!(header.version(), format::VERSION);
        assert_eq!(header.suite(), DEFAULT_SUITE);
        assert_eq!(header.suite().id(), 0x01);
        assert_eq!(header.len(), used);
        assert_eq!(header.as_bytes(), &v.message[..used]);
        assert!(used <= format::MAX_HEADER_LEN);
        // The body after it has the Cobblestone length of the plaintext, and
        // starts with the vector's salt.
        let body = &v.message[used..];
        assert_eq!(
            body.len() as u64,
            cobblestone::body_len(v.plaintext.len() as u64),
            "{}",
            v.name
        );
        assert_eq!(&body[..cobblestone::SALT_LEN], &v.salt[..], "{}", v.name);

        // The reader form consumes exactly the header.
        let mut reader = &v.message[..];
        let read = Header::read_from(&mut reader).unwrap();
        assert_eq!(read, header);
        assert_eq!(reader, body);

        let info = MessageInfo::new(header, Some(body.len() as u64)).unwrap();
        assert_eq!(info.plaintext_len, Some(v.plaintext.len() as u64));
        assert_eq!(
            info.chunks,
            Some(v.plaintext.len() as u64 / cobblestone::CHUNK_SIZE as u64 + 1)
        );
    }
}

/// Contexts that differ from `v`'s in one way each: a pair added, removed,
/// a value changed, a key renamed, a value moved to another key.
fn wrong_contexts(v: &V1Vector) -> Vec<EncryptionContext> {
    let mut out = Vec::new();
    let mut added = v.context.clone();
    added.push(("zz".into(), String::new()));
    out.push(added);
    for i in 0..v.context.len() {
        let mut removed = v.context.clone();
        removed.remove(i);
        out.push(removed);
        let mut changed = v.context.clone();
        changed[i].1.push('x');
        out.push(changed);
        let mut renamed = v.context.clone();
        renamed[i].0.push('x');
        out.push(renamed);
        // "ab" = "c" against "a" = "bc": the encoding is injective.
        let mut shifted = v.context.clone();
        if let Some(c) = shifted[i].1.chars().next() {
            shifted[i].0.push(c);
            shifted[i].1.remove(0);
            out.push(shifted);
        }
    }
    out.into_iter()
        .map(|pairs| EncryptionContext::from_pairs(pairs).unwrap())
        .collect()
}

#[test]
fn wrong_context_is_decrypt_in_every_decoder() {
    for v in v1_vectors() {
        let contexts = wrong_contexts(&v);
        assert!(!contexts.is_empty());
        for ctx in contexts {
            assert_ne!(ctx, v.context());
            for (i, r) in open_all(&v.message, &v.dek(), &ctx).into_iter().enumerate() {
                assert!(
                    matches!(r, Err(Error::Decrypt)),
                    "{} decoder {i} with {ctx:?}: {r:?}",
                    v.name
                );
            }
            // It fails at the commitment: the streaming decoder releases
            // nothing.
            let s = open_streaming(&v.message, &v.dek(), &ctx, 1);
            assert!(s.released.is_empty());
        }
    }
}

#[test]
fn different_dek_is_decrypt_in_every_decoder() {
    for v in v1_vectors() {
        let mut flipped = v.dek.clone();
        flipped[31] ^= 1;
        for dek in [Dek::generate().unwrap(), Dek::from_slice(&flipped).unwrap()] {
            for (i, r) in open_all(&v.message, &dek, &v.context())
                .into_iter()
                .enumerate()
            {
                assert!(
                    matches!(r, Err(Error::Decrypt)),
                    "{} decoder {i}: {r:?}",
                    v.name
                );
            }
            // It fails at the header tag, before any body work.
            let (header, _) = Header::parse(&v.message).unwrap();
            assert!(matches!(
                OpeningKey::new(&dek, &header),
                Err(Error::Decrypt)
            ));
            assert!(matches!(
                message::rewrap_header(&header, &dek, v.recipients.clone()),
                Err(Error::Decrypt)
            ));
        }
    }
}

#[test]
fn vectors_reseal_to_messages_that_open() {
    // With a fresh salt the output differs from the vector but has the same
    // header and length, and opens the same way.
    for v in v1_vectors() {
        let key = message::SealingKey::new(&v.dek(), v.recipients.clone()).unwrap();
        let sealed = key.seal(&v.plaintext, &v.context()).unwrap();
        let (header, used) = Header::parse(&v.message).unwrap();
        assert_eq!(key.header(), &header);
        assert_eq!(sealed.len(), v.message.len());
        assert_eq!(sealed[..used], v.message[..used]);
        assert_ne!(sealed[used..], v.message[used..]);
        assert_eq!(
            message::open(&sealed, &v.dek(), &v.context()).unwrap(),
            v.plaintext
        );
    }
}

// ---------------------------------------------------------------------------
// Negative vectors (docs/FORMAT.md section 13): every decoder refuses each
// with its error.
// ---------------------------------------------------------------------------

mod decoders;

struct Negative {
    name: String,
    dek: Vec<u8>,
    context: Vec<(String, String)>,
    providers: Option<Vec<String>>,
    message: Vec<u8>,
    error: String,
    value: Option<u8>,
    field: Option<String>,
    released: usize,
}

fn negative_vectors() -> Vec<Negative> {
    let doc = common::vector_file("phi-envelope-v1.json");
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
            providers: v
                .get("providers")
                .map(|p| p.as_array().unwrap().iter().map(s).collect()),
            message: hex::decode(s(&v["message"])).unwrap(),
            error: s(&v["error"]),
            value: v
                .get("value")
                .map(|x| u8::try_from(x.as_u64().unwrap()).unwrap()),
            field: v.get("field").map(s),
            released: usize::try_from(v["released"].as_u64().unwrap()).unwrap(),
        })
        .collect();
    assert!(out.len() >= 50, "{} negative vectors", out.len());
    out
}

/// The error as the vector file names it: kind, value, field.
fn described(e: &Error) -> (String, Option<u8>, Option<String>) {
    let debug = format!("{e:?}");
    let kind = debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap()
        .to_owned();
    let value = match e {
        Error::UnsupportedVersion(v) | Error::UnsupportedSuite(v) => Some(*v),
        _ => None,
    };
    (kind, value, e.malformed_field().map(str::to_owned))
}

#[test]
fn every_error_kind_has_a_negative_vector() {
    let kinds: std::collections::BTreeSet<String> =
        negative_vectors().into_iter().map(|n| n.error).collect();
    for want in [
        "Decrypt",
        "Truncated",
        "TruncatedChunk",
        "NotEnvelope",
        "UnsupportedVersion",
        "UnsupportedSuite",
        "Malformed",
        "InvalidContext",
        "NoMatchingKey",
    ] {
        assert!(kinds.contains(want), "no negative vector for {want}");
    }
    let fields: std::collections::BTreeSet<String> = negative_vectors()
        .into_iter()
        .filter_map(|n| n.field)
        .collect();
    for want in [
        "count",
        "plen",
        "provider id",
        "rlen",
        "key reference",
        "wlen",
    ] {
        assert!(fields.contains(want), "no Malformed vector for {want}");
    }
}

#[test]
fn every_negative_vector_fails_with_its_error_in_every_decoder() {
    for n in negative_vectors() {
        let want = (n.error.clone(), n.value, n.field.clone());
        let ctx = match EncryptionContext::from_pairs(n.context.iter().cloned()) {
            Ok(ctx) => ctx,
            Err(e) => {
                // Refused before any decoder, any key, any provider.
                assert_eq!(described(&e), want, "{}: {e:?}", n.name);
                continue;
            }
        };
        assert_ne!(
            n.error, "InvalidContext",
            "{}: the context was accepted",
            n.name
        );
        let results = match &n.providers {
            // Key selection: only the decoders that select an entry apply.
            Some(ids) => {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                decoders::open_every_way_with(&n.message, &n.dek, &ctx, &ids, false)
            }
            None => decoders::open_every_way(&n.message, &n.dek, &ctx),
        };
        assert!(results.len() >= 5);
        for (decoder, r) in results {
            match r {
                Ok(pt) => panic!("{}: {decoder} opened it ({} bytes)", n.name, pt.len()),
                Err(e) => assert_eq!(described(&e), want, "{}: {decoder} gave {e:?}", n.name),
            }
        }
        if n.providers.is_none() {
            // The streaming decoder releases exactly the authenticated
            // full chunks before the failure.
            for buf_len in [1000, 16384, 65536] {
                let s =
                    open_streaming(&n.message, &Dek::from_slice(&n.dek).unwrap(), &ctx, buf_len);
                assert!(s.result.is_err(), "{}", n.name);
                assert_eq!(s.released.len(), n.released, "{} buf {buf_len}", n.name);
            }
        }
    }
}
