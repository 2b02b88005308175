//! The parallel file engine (`file::encrypt_with_key` /
//! `file::decrypt_with_key`) on messages of up to a few MiB (several 1 MiB
//! batches), with 1 to 3 threads each way, inputs read in fuzzer-chosen
//! pieces, and structured damage to the body: the output of encryption is a
//! message the sequential decoder opens; decryption succeeds only on the
//! undamaged body, and whatever it wrote before failing is a prefix of the
//! plaintext.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phi_envelope::file::{decrypt_with_key, encrypt_with_key, FileOptions};
use phi_envelope::message::{self, OpeningKey, SealingKey};
use phi_envelope::{Dek, Header, WrappedKey};
use phi_envelope_fuzz::io::Pieces;
use phi_envelope_fuzz::vectors;

const PREFIX: usize = 56;
const CT: usize = 16400;

#[derive(Arbitrary, Debug)]
enum Damage {
    Flip { pos: u32, bit: u8 },
    Truncate { len: u32 },
    SwapChunks { a: u16, b: u16 },
    RemoveChunk { index: u16 },
    DuplicateChunk { from: u16, to: u16 },
    Append { bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    sel: u8,
    /// Plaintext length: `kib % 2200` KiB (up to three 1 MiB batches) plus
    /// `extra % 16384` bytes.
    kib: u16,
    extra: u16,
    enc_threads: u8,
    dec_threads: u8,
    damage: Vec<Damage>,
    reads: Vec<u8>,
}

/// 2.2 MiB + 32 KiB of pseudo-random bytes, made once; plaintexts are
/// slices of it.
fn pool() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..(2200 + 32) * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

fn chunk(body: &[u8], i: usize) -> std::ops::Range<usize> {
    let s = PREFIX + i * CT;
    s..(s + CT).min(body.len())
}

fn damage(body: &mut Vec<u8>, d: &Damage) {
    let n = body.len().saturating_sub(PREFIX).div_ceil(CT);
    match *d {
        Damage::Flip { pos, bit } if !body.is_empty() => {
            let p = pos as usize % body.len();
            body[p] ^= 1 << (bit % 8);
        }
        Damage::Truncate { len } => body.truncate(len as usize % (body.len() + 1)),
        Damage::SwapChunks { a, b } if n >= 2 => {
            let (a, b) = (a as usize % n, b as usize % n);
            let (lo, hi) = (a.min(b), a.max(b));
            let (rl, rh) = (chunk(body, lo), chunk(body, hi));
            let (cl, ch) = (body[rl.clone()].to_vec(), body[rh.clone()].to_vec());
            body.splice(rh, cl);
            body.splice(rl, ch);
        }
        Damage::RemoveChunk { index } if n >= 1 => {
            let r = chunk(body, index as usize % n);
            body.drain(r);
        }
        Damage::DuplicateChunk { from, to } if n >= 1 => {
            let c = body[chunk(body, from as usize % n)].to_vec();
            let at = chunk(body, to as usize % n).start;
            body.splice(at..at, c);
        }
        Damage::Append { ref bytes } => body.extend(bytes.iter().take(64)),
        _ => {}
    }
}

fuzz_target!(|input: Input| {
    let cases = vectors::v1();
    let case = &cases[input.sel as usize % cases.len()];
    let dek = Dek::from_slice(&case.dek).unwrap();
    let len = (input.kib as usize % 2200) * 1024 + input.extra as usize % 16384;
    let start = input.sel as usize * 61;
    let pt = &pool()[start..start + len];
    let key = SealingKey::new(
        &dek,
        vec![WrappedKey {
            provider: "local".into(),
            key_ref: "local:files".into(),
            key_version: 1,
            wrapped: vec![0xAB; 60],
        }],
    )
    .unwrap();

    // Reads of at least 64 bytes (0 stays an `Interrupted` error): byte-wise
    // reads of megabytes only make units slow.
    let reads: Vec<u8> = input
        .reads
        .iter()
        .map(|&c| if c == 0 { 0 } else { c | 0x40 })
        .collect();
    let enc_opts = FileOptions::new().threads(1 + input.enc_threads as usize % 3);
    let mut sealed = Vec::new();
    let report = encrypt_with_key(
        &key,
        Pieces::new(pt, &reads),
        &mut sealed,
        &case.context,
        &enc_opts,
    )
    .expect("encrypting from memory into memory");
    assert_eq!(report.plaintext_len, len as u64);
    assert_eq!(report.ciphertext_len, sealed.len() as u64);
    assert_eq!(report.chunks, (len / 16384 + 1) as u64);
    assert_eq!(
        message::open(&sealed, &dek, &case.context).expect("the engine's output opens"),
        pt
    );

    let (header, used) = Header::parse(&sealed).unwrap();
    let opening = OpeningKey::new(&dek, &header).unwrap();
    let original = sealed[used..].to_vec();
    let mut body = original.clone();
    for d in input.damage.iter().take(4) {
        damage(&mut body, d);
    }
    let unchanged = body == original;

    let dec_opts = FileOptions::new().threads(1 + input.dec_threads as usize % 3);
    let mut written = Vec::new();
    let codes: Vec<u8> = reads.iter().rev().copied().collect();
    let r = decrypt_with_key(
        &opening,
        Pieces::new(&body, &codes),
        &mut written,
        &case.context,
        &dec_opts,
    );
    assert!(
        written.len() <= pt.len() && written == pt[..written.len()],
        "the engine wrote bytes that are not the plaintext"
    );
    match r {
        Ok(report) => {
            assert!(unchanged, "a damaged body decrypted");
            assert_eq!(written, pt);
            assert_eq!(report.plaintext_len, len as u64);
        }
        Err(e) => {
            assert!(!unchanged, "the undamaged body failed: {e:?}");
            let _ = format!("{e} {e:?}");
        }
    }
});
