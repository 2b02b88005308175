//! Record open through the envelope API with an in-memory provider on
//! arbitrary bytes: `Envelope::open`, `decryptor`, `seekable_decryptor` and
//! `rewrap` agree, whatever the header names (unknown providers, keys,
//! versions, a provider that is down, tampered wrapped keys).
//!
//! Input: one selector byte (which encryption context), then the message.
#![no_main]

use std::io::{Cursor, Read};

use libfuzzer_sys::fuzz_target;
use phi_envelope::Header;
use phi_envelope_fuzz::io::{drain, Pieces, Schedule};
use phi_envelope_fuzz::kind;
use phi_envelope_fuzz::kms::{block_on, contexts, envelope};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let env = envelope();
    let ctxs = contexts();
    let ctx = &ctxs[sel as usize % ctxs.len()];

    let opened = block_on(env.open(msg, ctx));
    if let Err(e) = &opened {
        let _ = format!("{e} {e:?}");
        if let Ok((h, _)) = Header::parse(msg) {
            // Header-level failures name no secret: only refs and versions.
            if let phi_envelope::Error::NoMatchingKey(s) = e {
                for r in h.recipients() {
                    assert!(s.contains(&r.key_ref));
                }
            }
        }
    }

    // Streaming agrees with the one-shot result.
    let streamed = block_on(env.decryptor(Pieces::new(msg, &[sel, 1, 0]), ctx));
    match (&opened, streamed) {
        (Ok(pt), Ok(mut d)) => {
            let (out, err) = drain(&mut d, &mut Schedule::new(&[sel.rotate_left(1)]));
            assert!(err.is_none(), "stream failed where open succeeded: {err:?}");
            assert_eq!(&out, pt);
        }
        (Ok(_), Err(e)) => panic!("decryptor failed where open succeeded: {e:?}"),
        (Err(_), Ok(mut d)) => {
            let (_, err) = drain(&mut d, &mut Schedule::new(&[sel]));
            assert!(err.is_some(), "stream succeeded where open failed");
        }
        (Err(e0), Err(e)) => {
            // Failures before the body are the same failure.
            if !matches!(kind(e0), "decrypt" | "truncated") {
                assert_eq!(kind(&e), kind(e0), "{e:?} vs {e0:?}");
            }
        }
    }

    // Seeking agrees too.
    match (
        &opened,
        block_on(env.seekable_decryptor(Cursor::new(msg), ctx)),
    ) {
        (Ok(pt), Ok(mut s)) => {
            assert_eq!(s.plaintext_len(), pt.len() as u64);
            let mut out = Vec::new();
            s.read_to_end(&mut out)
                .expect("seekable read where open succeeded");
            assert_eq!(&out, pt);
        }
        (Ok(_), Err(e)) => panic!("seekable failed where open succeeded: {e:?}"),
        (Err(_), Ok(mut s)) => {
            let mut out = Vec::new();
            assert!(
                s.read_to_end(&mut out).is_err(),
                "seekable read a bad message"
            );
        }
        (Err(_), Err(_)) => {}
    }

    // Rewrap keeps the body and the outcome.
    if let Ok(rewrapped) = block_on(env.rewrap(msg, ctx)) {
        let (_, used) = Header::parse(msg).expect("rewrap parsed it");
        let (_, used2) = Header::parse(&rewrapped).expect("rewrap output parses");
        assert_eq!(&rewrapped[used2..], &msg[used..], "rewrap touched the body");
        match (&opened, block_on(env.open(&rewrapped, ctx))) {
            (Ok(a), Ok(b)) => assert_eq!(a, &b),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("open before rewrap {a:?}, after {b:?}"),
        }
    }
});
