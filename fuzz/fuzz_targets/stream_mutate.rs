//! Mutations of valid messages (bit flips, byte edits, truncation,
//! insertion, deletion, chunk swap, duplication, removal, appending and
//! splicing from another message): whatever any decoder releases is a
//! prefix of the original plaintext (the seeking decoder: the original
//! plaintext at the position read), and a decoder succeeds only on the
//! unmodified message.
#![no_main]

use std::io::{Read, Seek, SeekFrom};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phi_envelope::message::{self, OpeningKey};
use phi_envelope::{cobblestone, Dek, Header};
use phi_envelope_fuzz::io::{drain, Pieces, Schedule};
use phi_envelope_fuzz::vectors;

const PREFIX: usize = 56;
const CT: usize = 16400;

#[derive(Arbitrary, Debug)]
enum Mutation {
    Flip { pos: u32, bit: u8 },
    Set { pos: u32, value: u8 },
    Truncate { len: u32 },
    Insert { pos: u32, bytes: Vec<u8> },
    Delete { pos: u32, len: u16 },
    SwapChunks { a: u8, b: u8 },
    DuplicateChunk { from: u8, to: u8 },
    RemoveChunk { index: u8 },
    AppendChunk { from: u8 },
    SpliceChunk { other: u8, from: u8, to: u8 },
    SwapPrefix { other: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: u8,
    whole: bool,
    mutations: Vec<Mutation>,
    inner: Vec<u8>,
    reads: Vec<u8>,
    seeks: Vec<u32>,
}

/// A valid message or body with what opens it.
struct Base {
    key: [u8; 32],
    context: Vec<u8>,
    /// v1 vector index when `data` is a whole message.
    v1: Option<usize>,
    data: Vec<u8>,
    plaintext: Vec<u8>,
}

fn bases() -> &'static [Base] {
    static B: std::sync::OnceLock<Vec<Base>> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let mut out = Vec::new();
        for (i, v) in vectors::v1().iter().enumerate() {
            out.push(Base {
                key: v.dek,
                context: v.body_context.clone(),
                v1: Some(i),
                data: v.message.clone(),
                plaintext: v.plaintext.clone(),
            });
            out.push(Base {
                key: v.dek,
                context: v.body_context.clone(),
                v1: None,
                data: v.message[v.header_len..].to_vec(),
                plaintext: v.plaintext.clone(),
            });
        }
        for b in vectors::wycheproof(100_000) {
            if let Some(pt) = &b.plaintext {
                out.push(Base {
                    key: b.key,
                    context: b.context.clone(),
                    v1: None,
                    data: b.body.clone(),
                    plaintext: pt.clone(),
                });
            }
        }
        out
    })
}

/// Byte range of chunk `i` in `data` (`body_at`: where the body starts).
fn chunk(data: &[u8], body_at: usize, i: usize) -> Option<std::ops::Range<usize>> {
    let start = body_at + PREFIX + i * CT;
    (start < data.len()).then(|| start..(start + CT).min(data.len()))
}

fn chunks(data: &[u8], body_at: usize) -> usize {
    data.len().saturating_sub(body_at + PREFIX).div_ceil(CT)
}

fn mutate(
    data: &mut Vec<u8>,
    body_at: usize,
    m: &Mutation,
    all: &[Base],
    base_keying: (&[u8; 32], &[u8]),
) {
    let len = data.len();
    match *m {
        Mutation::Flip { pos, bit } if len > 0 => data[pos as usize % len] ^= 1 << (bit % 8),
        Mutation::Set { pos, value } if len > 0 => data[pos as usize % len] = value,
        Mutation::Truncate { len: l } => data.truncate(l as usize % (len + 1)),
        Mutation::Insert { pos, ref bytes } => {
            let p = pos as usize % (len + 1);
            data.splice(p..p, bytes.iter().copied().take(64));
        }
        Mutation::Delete { pos, len: l } if len > 0 => {
            let p = pos as usize % len;
            let e = (p + l as usize).min(len);
            data.drain(p..e);
        }
        Mutation::SwapChunks { a, b } => {
            let n = chunks(data, body_at);
            if n >= 2 {
                let (ra, rb) = (
                    chunk(data, body_at, a as usize % n).unwrap(),
                    chunk(data, body_at, b as usize % n).unwrap(),
                );
                let (ca, cb) = (data[ra.clone()].to_vec(), data[rb.clone()].to_vec());
                let (first, second, c1, c2) = if ra.start < rb.start {
                    (ra, rb, cb, ca)
                } else {
                    (rb, ra, ca, cb)
                };
                // Replace the later range first so the earlier stays valid.
                data.splice(second, c2);
                data.splice(first, c1);
            }
        }
        Mutation::DuplicateChunk { from, to } => {
            let n = chunks(data, body_at);
            if n >= 1 {
                let c = data[chunk(data, body_at, from as usize % n).unwrap()].to_vec();
                let at = chunk(data, body_at, to as usize % n).unwrap().start;
                data.splice(at..at, c);
            }
        }
        Mutation::RemoveChunk { index } => {
            let n = chunks(data, body_at);
            if n >= 1 {
                let r = chunk(data, body_at, index as usize % n).unwrap();
                data.drain(r);
            }
        }
        Mutation::AppendChunk { from } => {
            let n = chunks(data, body_at);
            if n >= 1 {
                let c = data[chunk(data, body_at, from as usize % n).unwrap()].to_vec();
                data.extend_from_slice(&c);
            }
        }
        Mutation::SpliceChunk { other, from, to } => {
            let o = &all[other as usize % all.len()];
            let o_at = o.v1.map_or(0, |i| vectors::v1()[i].header_len);
            let (on, n) = (chunks(&o.data, o_at), chunks(data, body_at));
            if on >= 1 && n >= 1 {
                let c = &o.data[chunk(&o.data, o_at, from as usize % on).unwrap()];
                let r = chunk(data, body_at, to as usize % n).unwrap();
                data.splice(r, c.iter().copied());
            }
        }
        Mutation::SwapPrefix { other } => {
            let o = &all[other as usize % all.len()];
            // A donor under the same key and context would bring a valid
            // prefix of its own: with its chunks spliced in too, the result
            // is the donor's message, not a forgery. Donors of the same
            // keying give their chunks only (SpliceChunk).
            if &o.key == base_keying.0 && o.context == base_keying.1 {
                return;
            }
            let o_at = o.v1.map_or(0, |i| vectors::v1()[i].header_len);
            if o.data.len() >= o_at + PREFIX && data.len() >= body_at + PREFIX {
                data[body_at..body_at + PREFIX].copy_from_slice(&o.data[o_at..o_at + PREFIX]);
            }
        }
        _ => {}
    }
}

fn is_prefix(out: &[u8], of: &[u8]) -> bool {
    out.len() <= of.len() && out == &of[..out.len()]
}

fuzz_target!(|input: Input| {
    if std::env::var_os("PHI_FUZZ_DEBUG").is_some() {
        eprintln!("{input:#?}");
    }
    let all = bases();
    let mut base = &all[input.base as usize % all.len()];
    if input.whole && base.v1.is_none() {
        // Prefer the whole-message form when asked.
        if let Some(b) = all.iter().find(|b| b.v1.is_some() && b.key == base.key) {
            base = b;
        }
    }
    let body_at = base.v1.map_or(0, |i| vectors::v1()[i].header_len);
    let mut data = base.data.clone();
    for m in input.mutations.iter().take(8) {
        mutate(&mut data, body_at, m, all, (&base.key, &base.context));
    }
    let unchanged = data == base.data;
    if std::env::var_os("PHI_FUZZ_DEBUG").is_some() {
        eprintln!(
            "base {} (v1 {:?}, {} bytes, plaintext {}), mutated to {} bytes, unchanged {unchanged}",
            input.base as usize % all.len(),
            base.v1,
            base.data.len(),
            base.plaintext.len(),
            data.len()
        );
    }
    let pt = &base.plaintext;

    match base.v1 {
        Some(i) => {
            let case = &vectors::v1()[i];
            let dek = Dek::from_slice(&base.key).unwrap();
            match message::open(&data, &dek, &case.context) {
                Ok(out) => {
                    assert!(unchanged, "a modified message opened");
                    assert_eq!(&out, pt);
                }
                Err(e) => assert!(!unchanged, "the original failed: {e:?}"),
            }
            let mut r = Pieces::new(&data, &input.inner);
            let Ok(header) = Header::read_from(&mut r) else {
                assert!(!unchanged);
                return;
            };
            let Ok(key) = OpeningKey::new(&dek, &header) else {
                assert!(!unchanged);
                return;
            };
            if let Ok(mut d) = key.decryptor(r, &case.context) {
                let (out, err) = drain(&mut d, &mut Schedule::new(&input.reads));
                assert!(
                    is_prefix(&out, pt),
                    "stream released bytes not in the plaintext"
                );
                assert_eq!(err.is_none(), unchanged, "stream outcome: {err:?}");
            } else {
                assert!(!unchanged);
            }
            let mut c = std::io::Cursor::new(&data[..]);
            c.set_position(header.len() as u64);
            if let Ok(s) = key.seekable_decryptor(c, &case.context) {
                check_seekable(s, pt, unchanged, &input.seeks);
            } else {
                assert!(!unchanged);
            }
        }
        None => {
            match cobblestone::decrypt(&base.key, &base.context, &data) {
                Ok(out) => {
                    assert!(unchanged, "a modified body decrypted");
                    assert_eq!(&out, pt);
                }
                Err(e) => assert!(!unchanged, "the original failed: {e:?}"),
            }
            let r = Pieces::new(&data, &input.inner);
            if let Ok(mut d) = cobblestone::Decryptor::new(&base.key, &base.context, r) {
                let (out, err) = drain(&mut d, &mut Schedule::new(&input.reads));
                assert!(
                    is_prefix(&out, pt),
                    "stream released bytes not in the plaintext"
                );
                assert_eq!(err.is_none(), unchanged, "stream outcome: {err:?}");
            } else {
                assert!(!unchanged);
            }
            let c = std::io::Cursor::new(&data[..]);
            if let Ok(s) = cobblestone::SeekableDecryptor::new(&base.key, &base.context, c) {
                check_seekable(s, pt, unchanged, &input.seeks);
            } else {
                assert!(!unchanged);
            }
        }
    }
});

/// Every byte a seeking decoder returns is the original plaintext at that
/// position; the unmodified message reads back whole.
fn check_seekable<R: Read + Seek>(
    mut s: cobblestone::SeekableDecryptor<R>,
    pt: &[u8],
    unchanged: bool,
    seeks: &[u32],
) {
    // Its authenticated length can only be the original's: the final chunk
    // authenticated under its index, which fixes the chunk count.
    assert_eq!(s.plaintext_len(), pt.len() as u64, "seekable length");
    let mut buf = vec![0u8; 20_000];
    for &p in seeks.iter().take(16) {
        let pos = u64::from(p) % (pt.len() as u64 + 2);
        s.seek(SeekFrom::Start(pos)).unwrap();
        let want = (p as usize >> 8) % buf.len() + 1;
        match s.read(&mut buf[..want]) {
            Ok(n) => {
                let start = (pos as usize).min(pt.len());
                assert_eq!(&buf[..n], &pt[start..start + n], "seekable bytes at {pos}");
            }
            Err(_) => {
                assert!(!unchanged, "the original failed a seekable read");
                return;
            }
        }
    }
    s.seek(SeekFrom::Start(0)).unwrap();
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    assert!(is_prefix(&out, pt));
    if unchanged {
        r.expect("the original reads back");
        assert_eq!(out, pt);
    }
}
