//! Random access on arbitrary bytes: `cobblestone::SeekableDecryptor` on
//! bodies and `OpeningKey::seekable_decryptor` on whole v1 messages, driven
//! by arbitrary seek and read operations, against a model built on the
//! reference decoder: it opens only when the layout, the commitment and the
//! final chunk are good; a read returns the authenticated plaintext at the
//! position or fails (and every later read fails); seeks move as `Seek`
//! says.
//!
//! Input: selector byte (keying; bit 7 on a v1 keying: whole message), `n`,
//! `n % 32` operations of 5 bytes, then the data.
#![no_main]

use std::io::{Read, Seek, SeekFrom};

use libfuzzer_sys::fuzz_target;
use phi_envelope::cobblestone::{SeekableDecryptor, CHUNK_SIZE};
use phi_envelope::message::OpeningKey;
use phi_envelope::{Dek, Header};
use phi_envelope_fuzz::io::{size_of, Pieces};
use phi_envelope_fuzz::reference::Reference;
use phi_envelope_fuzz::{kind, vectors};

fn run<R: Read + Seek>(
    opened: phi_envelope::Result<SeekableDecryptor<R>>,
    reference: &Reference,
    ops: &[u8],
) {
    let mut s = match (opened, reference.seekable_opens()) {
        (Ok(s), Ok(())) => s,
        (Err(e), Err(f)) => {
            assert_eq!(kind(&e), f.name());
            return;
        }
        (Ok(_), Err(f)) => panic!("seekable opened, reference says {f:?}"),
        (Err(e), Ok(())) => panic!("seekable failed ({e:?}), reference opens"),
    };
    let len = reference.plaintext_len();
    assert_eq!(s.plaintext_len(), len);
    let mut pos: u64 = 0;
    let mut failed = false;
    let mut buf = vec![0u8; 3 * CHUNK_SIZE];
    for op in ops.chunks_exact(5) {
        let arg = u32::from_le_bytes([op[1], op[2], op[3], op[4]]);
        match op[0] % 6 {
            0 => {
                let p = u64::from(arg) % (len + 100);
                assert_eq!(s.seek(SeekFrom::Start(p)).unwrap(), p);
                pos = p;
            }
            1 | 2 => {
                let d = i64::from(arg as i32) % (2 * len as i64 + 100);
                let (from, base) = if op[0] % 6 == 1 {
                    (SeekFrom::End(d), len)
                } else {
                    (SeekFrom::Current(d), pos)
                };
                match base.checked_add_signed(d) {
                    Some(p) => {
                        assert_eq!(s.seek(from).unwrap(), p);
                        pos = p;
                    }
                    None => assert!(s.seek(from).is_err(), "seek before 0 accepted"),
                }
            }
            3 | 4 => {
                let want = if op[0] % 6 == 4 {
                    0
                } else {
                    size_of(op[1]).min(buf.len())
                };
                let r = s.read(&mut buf[..want]);
                if failed {
                    assert!(r.is_err(), "read after a failure succeeded");
                    continue;
                }
                if want == 0 || pos >= len {
                    assert_eq!(r.unwrap(), 0);
                    continue;
                }
                let index = (pos / CHUNK_SIZE as u64) as usize;
                let off = (pos % CHUNK_SIZE as u64) as usize;
                match (r, reference.chunk(index)) {
                    (Ok(n), Some(chunk)) => {
                        assert_eq!(n, (chunk.len() - off).min(want), "read length");
                        assert_eq!(&buf[..n], &chunk[off..off + n], "read bytes");
                        pos += n as u64;
                    }
                    (Err(e), None) => {
                        assert_eq!(phi_envelope_fuzz::io_kind(e), "decrypt");
                        failed = true;
                    }
                    (a, b) => panic!("read {a:?}, reference chunk {index}: {:?}", b.is_some()),
                }
            }
            _ => {
                assert_eq!(s.stream_position().unwrap(), pos);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [sel, n, rest @ ..] = data else {
        return;
    };
    let nops = (*n as usize % 32).min(rest.len() / 5);
    let (ops, input) = rest.split_at(nops * 5);
    let keyings = vectors::keyings();
    let k = &keyings[(sel & 0x7f) as usize % keyings.len()];
    let codes = [*n, sel.rotate_left(4)];
    match k.v1 {
        Some(i) if sel & 0x80 != 0 => {
            let case = &vectors::v1()[i];
            let mut r = Pieces::new(input, &codes);
            let Ok(header) = Header::read_from(&mut r) else {
                return;
            };
            let dek = Dek::from_slice(&k.key).unwrap();
            let Ok(key) = OpeningKey::new(&dek, &header) else {
                return;
            };
            let reference = Reference::new(&k.key, &k.context, &input[header.len()..]);
            run(key.seekable_decryptor(r, &case.context), &reference, ops);
        }
        _ => {
            let reference = Reference::new(&k.key, &k.context, input);
            let r = Pieces::new(input, &codes);
            run(
                SeekableDecryptor::new(&k.key, &k.context, r),
                &reference,
                ops,
            );
        }
    }
});
