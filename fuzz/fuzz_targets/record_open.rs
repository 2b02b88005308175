//! Record open with a fixed DEK on arbitrary bytes: `message::open`, the
//! streaming and the seeking decoders of `OpeningKey` agree with each other
//! and with the reference decoder on everything after the header.
//!
//! Input: one selector byte (which v1 vector's DEK and context), then the
//! message.
#![no_main]

use std::io::{Cursor, Read};

use libfuzzer_sys::fuzz_target;
use phi_envelope::message::{self, OpeningKey};
use phi_envelope::{Dek, Header};
use phi_envelope_fuzz::io::{drain, Pieces, Schedule};
use phi_envelope_fuzz::reference::Reference;
use phi_envelope_fuzz::{io_kind, kind, vectors};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let cases = vectors::v1();
    let case = &cases[sel as usize % cases.len()];
    let dek = Dek::from_slice(&case.dek).unwrap();
    let one_shot = message::open(msg, &dek, &case.context);

    let (header, used) = match Header::parse(msg) {
        Ok(h) => h,
        Err(e) => {
            let e0 = one_shot.expect_err("open succeeded on a header that does not parse");
            assert_eq!(e.to_string(), e0.to_string());
            return;
        }
    };
    let key = match OpeningKey::new(&dek, &header) {
        Ok(k) => k,
        Err(e) => {
            assert!(e.is_decrypt(), "header tag failure must be opaque: {e:?}");
            assert!(one_shot
                .expect_err("open with a bad header tag")
                .is_decrypt());
            return;
        }
    };
    let body = &msg[used..];
    let reference = Reference::new(&case.dek, &case.body_context, body);

    // One-shot.
    match (&one_shot, reference.one_shot()) {
        (Ok(pt), Ok(want)) => assert_eq!(pt, &want),
        (Err(e), Err(f)) => assert_eq!(kind(e), f.name(), "one-shot error kind"),
        (a, b) => panic!("open {a:?} but reference {b:?}"),
    }
    assert_eq!(
        key.open(body, &case.context).ok(),
        one_shot.as_ref().ok().cloned()
    );

    // Streaming, with inner short reads and caller read sizes from `sel`.
    let streamed = reference.stream();
    let codes = [sel, sel.rotate_left(3), 0];
    match key.decryptor(Pieces::new(body, &codes), &case.context) {
        Ok(mut d) => {
            assert!(
                streamed.opens.is_ok(),
                "decryptor opened, reference did not"
            );
            let (out, err) = drain(&mut d, &mut Schedule::new(&[sel.rotate_right(2)]));
            assert_eq!(out, streamed.released, "stream released other bytes");
            match (err, streamed.end) {
                (None, Ok(())) => {}
                (Some(e), Err(f)) => assert_eq!(io_kind(e), f.name()),
                (a, b) => panic!("stream ended {a:?}, reference {b:?}"),
            }
        }
        Err(e) => assert_eq!(Some(kind(&e)), streamed.opens.err().map(|f| f.name())),
    }

    // Seeking: opens iff layout, commitment and final chunk are good; a
    // whole read gives the plaintext or fails.
    match key.seekable_decryptor(Cursor::new(body), &case.context) {
        Ok(mut s) => {
            reference
                .seekable_opens()
                .expect("seekable opened, reference did not");
            assert_eq!(s.plaintext_len(), reference.plaintext_len());
            let mut out = Vec::new();
            match (s.read_to_end(&mut out), reference.plaintext()) {
                (Ok(_), Some(want)) => assert_eq!(out, want),
                (Err(_), None) => {}
                (a, b) => panic!("seekable read {a:?}, reference {:?}", b.map(|b| b.len())),
            }
        }
        Err(e) => assert_eq!(
            Some(kind(&e)),
            reference.seekable_opens().err().map(|f| f.name())
        ),
    }
});
