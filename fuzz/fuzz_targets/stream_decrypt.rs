//! Streaming decryption of arbitrary bytes with arbitrary read sizes:
//! `cobblestone::Decryptor` on bodies and `OpeningKey::decryptor` on whole
//! v1 messages release exactly the plaintext of the chunks that
//! authenticated, in order, and nothing of the first chunk that did not;
//! they end as the reference decoder says, and keep failing after.
//!
//! Input: selector byte (keying; bit 7 on a v1 keying: a whole message
//! through the header path), `n`, `n % 17` read-size codes, then the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_envelope::cobblestone::Decryptor;
use phi_envelope::message::OpeningKey;
use phi_envelope::{Dek, Header};
use phi_envelope_fuzz::io::{drain, Pieces, Schedule};
use phi_envelope_fuzz::reference::Reference;
use phi_envelope_fuzz::{io_kind, kind, vectors};

fn check<R: std::io::Read>(
    opened: phi_envelope::Result<R>,
    reference: &Reference,
    reads: &mut Schedule,
) {
    let want = reference.stream();
    match opened {
        Ok(mut d) => {
            assert!(want.opens.is_ok(), "decryptor opened, reference did not");
            let (out, err) = drain(&mut d, reads);
            assert!(
                out.len() <= want.released.len(),
                "released more than authenticated"
            );
            assert_eq!(
                out, want.released,
                "released other bytes than authenticated"
            );
            match (err, want.end) {
                (None, Ok(())) => {}
                (Some(e), Err(f)) => assert_eq!(io_kind(e), f.name()),
                (a, b) => panic!("stream ended {a:?}, reference {b:?}"),
            }
        }
        Err(e) => assert_eq!(Some(kind(&e)), want.opens.err().map(|f| f.name())),
    }
}

fuzz_target!(|data: &[u8]| {
    let [sel, n, rest @ ..] = data else {
        return;
    };
    let n = (*n as usize % 17).min(rest.len());
    let (codes, input) = rest.split_at(n);
    let keyings = vectors::keyings();
    let k = &keyings[(sel & 0x7f) as usize % keyings.len()];
    let mut reads = Schedule::new(&codes.iter().rev().map(|c| c ^ 0x55).collect::<Vec<_>>());

    match k.v1 {
        Some(i) if sel & 0x80 != 0 => {
            let case = &vectors::v1()[i];
            let mut r = Pieces::new(input, codes);
            let Ok(header) = Header::read_from(&mut r) else {
                return;
            };
            let start = r.position();
            assert_eq!(start, header.len());
            let dek = Dek::from_slice(&k.key).unwrap();
            let key = match OpeningKey::new(&dek, &header) {
                Ok(key) => key,
                Err(e) => {
                    assert!(e.is_decrypt(), "{e:?}");
                    return;
                }
            };
            let reference = Reference::new(&k.key, &k.context, &input[start..]);
            check(key.decryptor(r, &case.context), &reference, &mut reads);
        }
        _ => {
            let reference = Reference::new(&k.key, &k.context, input);
            let d = Decryptor::new(&k.key, &k.context, Pieces::new(input, codes));
            check(d, &reference, &mut reads);
        }
    }
});
