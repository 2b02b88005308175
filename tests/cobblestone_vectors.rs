//! All 35 Wycheproof Cobblestone-256 vectors through the three body decoders:
//! one-shot, streaming and seeking.

mod common;

use std::io::{Cursor, Read, Seek, SeekFrom};

use common::{cobblestone_vectors, sha512};
use phi_envelope::{cobblestone, Error};

#[test]
fn one_shot_decoder() {
    for v in cobblestone_vectors() {
        let r = cobblestone::decrypt(&v.key, &v.ctx, &v.ct);
        if v.valid {
            let pt = r.unwrap_or_else(|e| panic!("tcId {} ({}): {e}", v.id, v.comment));
            assert_eq!(pt.len() as u64, v.msg_len.unwrap(), "tcId {}", v.id);
            assert_eq!(sha512(&pt), v.msg_sha512.clone().unwrap(), "tcId {}", v.id);
        } else {
            assert!(r.is_err(), "tcId {} ({}) must fail", v.id, v.comment);
        }
    }
}

/// Reads in odd-sized pieces, returning the bytes released and the first
/// error, then checks that every later read fails too.
fn drain<R: Read>(mut r: R) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 7000];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                for _ in 0..3 {
                    assert!(
                        r.read(&mut buf).is_err(),
                        "a failed reader must keep failing"
                    );
                }
                return (out, Some(e));
            }
        }
    }
}

#[test]
fn streaming_decoder() {
    for v in cobblestone_vectors() {
        let dec = cobblestone::Decryptor::new(&v.key, &v.ctx, &v.ct[..]);
        if v.has("HeaderFailure") {
            assert!(dec.is_err(), "tcId {}: must fail before any chunk", v.id);
            continue;
        }
        let dec = match dec {
            Ok(d) => d,
            Err(e) => {
                assert!(!v.valid, "tcId {} ({}): {e}", v.id, v.comment);
                continue;
            }
        };
        let (out, err) = drain(dec);
        if v.valid {
            assert!(err.is_none(), "tcId {} ({}): {err:?}", v.id, v.comment);
            assert_eq!(sha512(&out), v.msg_sha512.clone().unwrap(), "tcId {}", v.id);
        } else {
            assert!(err.is_some(), "tcId {} ({}) must fail", v.id, v.comment);
            if v.has("PartialPlaintext") {
                let max = v.msg_len.unwrap() as usize;
                assert!(
                    out.len() <= max,
                    "tcId {}: released {} > {max}",
                    v.id,
                    out.len()
                );
                if out.len() == max {
                    assert_eq!(sha512(&out), v.msg_sha512.clone().unwrap(), "tcId {}", v.id);
                }
            } else {
                assert!(
                    out.is_empty(),
                    "tcId {}: released unauthenticated bytes",
                    v.id
                );
            }
        }
    }
}

#[test]
fn seeking_decoder() {
    for v in cobblestone_vectors() {
        let dec = cobblestone::SeekableDecryptor::new(&v.key, &v.ctx, Cursor::new(&v.ct));
        if v.valid {
            let mut dec = dec.unwrap_or_else(|e| panic!("tcId {}: {e}", v.id));
            let len = v.msg_len.unwrap();
            assert_eq!(dec.plaintext_len(), len);
            // Seek from the end first, then read everything from the start.
            let tail = len.min(100);
            dec.seek(SeekFrom::End(-(tail as i64))).unwrap();
            let mut end = Vec::new();
            dec.read_to_end(&mut end).unwrap();
            assert_eq!(end.len() as u64, tail);
            dec.seek(SeekFrom::Start(0)).unwrap();
            let mut all = Vec::new();
            dec.read_to_end(&mut all).unwrap();
            assert_eq!(sha512(&all), v.msg_sha512.clone().unwrap(), "tcId {}", v.id);
            assert_eq!(&all[all.len() - tail as usize..], &end[..]);
        } else if v.has("ValidFinalChunk") {
            // The length authenticates, but reading the whole message fails.
            let dec = dec.unwrap_or_else(|e| panic!("tcId {}: final chunk is valid: {e}", v.id));
            let (_, err) = drain(dec);
            assert!(err.is_some(), "tcId {} must fail", v.id);
        } else {
            assert!(
                dec.is_err(),
                "tcId {} ({}): final-chunk check must fail",
                v.id,
                v.comment
            );
        }
    }
}

#[test]
fn error_kinds_are_opaque_for_authentication() {
    for v in cobblestone_vectors() {
        let e = match cobblestone::decrypt(&v.key, &v.ctx, &v.ct) {
            Ok(_) => continue,
            Err(e) => e,
        };
        if v.has("WrongKey") || v.has("WrongContext") {
            assert!(matches!(e, Error::Decrypt), "tcId {}: {e:?}", v.id);
        }
        if v.has("ModifiedCiphertext") {
            // A modified final chunk after at least one full chunk reads as
            // a copy cut inside it (docs/FORMAT.md section 7.4); every
            // other modification is the opaque error.
            let has_full_chunk = v.ct.len() >= cobblestone::PREFIX_LEN + cobblestone::CHUNK_CT_SIZE;
            assert!(
                matches!(e, Error::Decrypt)
                    || (has_full_chunk && matches!(e, Error::TruncatedChunk)),
                "tcId {}: {e:?}",
                v.id
            );
        }
        // The streaming decoder agrees on the kind (section 7.3).
        let streamed = cobblestone::Decryptor::new(&v.key, &v.ctx, &v.ct[..]).and_then(|mut d| {
            let mut out = Vec::new();
            d.read_to_end(&mut out).map_err(Error::from)
        });
        let streamed = streamed.expect_err("the one-shot decoder failed");
        assert_eq!(
            std::mem::discriminant(&streamed),
            std::mem::discriminant(&e),
            "tcId {}: one-shot {e:?}, streaming {streamed:?}",
            v.id
        );
        if v.has("InvalidKeySize") {
            assert!(
                matches!(e, Error::InvalidKeyLength { .. }),
                "tcId {}: {e:?}",
                v.id
            );
        }
    }
}
