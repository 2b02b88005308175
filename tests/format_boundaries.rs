//! Stream boundaries of whole v1 messages through the three decoders
//! (one-shot `OpeningKey::open`, streaming `OpeningKey::decryptor`, seeking
//! `OpeningKey::seekable_decryptor`): sizes around the 16 KiB chunk, many
//! chunks, truncation at every boundary, chunk reordering and splicing,
//! unfinished encryptors, and hostile headers that must fail with their
//! specific structural error without reading or allocating past the bound.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};

use common::{
    describe, drain_with, one_recipient, open_all, open_seeking, open_streaming, sealing_key,
    test_bytes, test_context, write_in_slices,
};
use phi_envelope::format::{MAX_HEADER_LEN, MAX_WRAPPED_KEY_LEN};
use phi_envelope::message::{self, OpeningKey, SealingKey};
use phi_envelope::{cobblestone, Dek, EncryptionContext, Error, Header};

const CHUNK: usize = cobblestone::CHUNK_SIZE;
const CT_CHUNK: usize = cobblestone::CHUNK_CT_SIZE;
const PREFIX: usize = cobblestone::PREFIX_LEN;

const SIZES: [usize; 8] = [
    0,
    1,
    CHUNK - 1,
    CHUNK,
    CHUNK + 1,
    2 * CHUNK,
    2 * CHUNK + 1,
    70 * CHUNK + 1234,
];

/// A sealing key, its DEK, a context, and helpers to seal and locate chunks.
struct Fixture {
    dek: Dek,
    key: SealingKey,
    ctx: EncryptionContext,
}

impl Fixture {
    fn new() -> Fixture {
        let (dek, key) = sealing_key(one_recipient());
        Fixture {
            dek,
            key,
            ctx: test_context(),
        }
    }

    fn header_len(&self) -> usize {
        self.key.header().len()
    }

    fn seal(&self, pt: &[u8]) -> Vec<u8> {
        self.key.seal(pt, &self.ctx).unwrap()
    }

    /// The message through the `Encryptor`, written in odd slices.
    fn seal_streaming(&self, pt: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = self.key.encryptor(&mut out, &self.ctx).unwrap();
        write_in_slices(&mut enc, pt, &[1, 7, 16385, 4096, 3, 16383, 9999]);
        enc.finish().unwrap();
        out
    }

    /// Byte range of chunk `i` in a message of `len` bytes.
    fn chunk(&self, len: usize, i: usize) -> std::ops::Range<usize> {
        let start = self.header_len() + PREFIX + i * CT_CHUNK;
        start..(start + CT_CHUNK).min(len)
    }

    fn open_all(&self, msg: &[u8]) -> [Result<Vec<u8>, Error>; 3] {
        open_all(msg, &self.dek, &self.ctx)
    }

    fn opening_key(&self) -> OpeningKey {
        OpeningKey::new(&self.dek, self.key.header()).unwrap()
    }
}

/// All three decoders reject `msg` with exactly `want`.
fn assert_all_fail(f: &Fixture, msg: &[u8], want: Want, what: &str) {
    for (i, r) in f.open_all(msg).iter().enumerate() {
        assert!(
            matches!(r, Err(e) if want(e)),
            "{what}: decoder {i} gave {}",
            describe(r)
        );
    }
}

/// Which errors a case accepts.
type Want = fn(&Error) -> bool;

fn is_truncated(e: &Error) -> bool {
    matches!(e, Error::Truncated)
}

fn is_decrypt(e: &Error) -> bool {
    matches!(e, Error::Decrypt)
}

fn is_truncated_chunk(e: &Error) -> bool {
    matches!(e, Error::TruncatedChunk)
}

fn is_auth_or_truncated(e: &Error) -> bool {
    matches!(e, Error::Decrypt | Error::Truncated | Error::TruncatedChunk)
}

// ---------------------------------------------------------------------------
// Round trips.
// ---------------------------------------------------------------------------

#[test]
fn round_trip_one_shot_and_streaming_at_every_size() {
    let f = Fixture::new();
    let opening = f.opening_key();
    for (i, &n) in SIZES.iter().enumerate() {
        let pt = test_bytes(n, i as u64);
        let sealed = f.seal(&pt);
        let streamed = f.seal_streaming(&pt);
        let h = f.header_len();
        let want_len = h + cobblestone::body_len(n as u64) as usize;
        assert_eq!(sealed.len(), want_len, "size {n}");
        assert_eq!(streamed.len(), want_len, "size {n}");
        assert_eq!(sealed[..h], streamed[..h], "one header per sealing key");
        assert_ne!(sealed[h..h + 24], streamed[h..h + 24], "fresh salt");

        for msg in [&sealed, &streamed] {
            assert_eq!(opening.open(&msg[h..], &f.ctx).unwrap(), pt, "size {n}");
            assert_eq!(message::open(msg, &f.dek, &f.ctx).unwrap(), pt);
            for buf_len in [1, 7, CHUNK, 65536] {
                if buf_len == 1 && n > 3 * CHUNK {
                    continue; // byte-by-byte over 1 MiB is slow in debug builds
                }
                let s = open_streaming(msg, &f.dek, &f.ctx, buf_len);
                assert!(s.result.is_ok(), "size {n} buf {buf_len}: {:?}", s.result);
                assert!(s.released == pt, "size {n} buf {buf_len}");
            }
            assert_eq!(open_seeking(msg, &f.dek, &f.ctx).unwrap(), pt);
        }
    }
}

/// Reads `len` bytes (or up to the end) from the current position.
fn read_n<R: Read>(r: &mut R, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    r.take(len as u64).read_to_end(&mut out).unwrap();
    out
}

#[test]
fn seeking_at_every_size() {
    let f = Fixture::new();
    let opening = f.opening_key();
    for (i, &n) in SIZES.iter().enumerate() {
        let pt = test_bytes(n, 50 + i as u64);
        let msg = f.seal(&pt);
        let mut cur = Cursor::new(&msg);
        cur.set_position(f.header_len() as u64);
        let mut dec = opening.seekable_decryptor(cur, &f.ctx).unwrap();
        assert_eq!(dec.plaintext_len(), n as u64);
        let len = n as i64;

        // Fixed positions around every interesting boundary.
        let mut targets: Vec<SeekFrom> = vec![
            SeekFrom::Start(0),
            SeekFrom::End(0),
            SeekFrom::End(-(len.min(1))),
            SeekFrom::End(-(len.min(CHUNK as i64 + 1))),
            SeekFrom::End(-len),
            SeekFrom::Start(n as u64 + 1),
            SeekFrom::Start(n as u64 + 10 * CHUNK as u64),
        ];
        for k in 1..=(n / CHUNK).min(4) {
            for d in [-1i64, 0, 1] {
                targets.push(SeekFrom::Start((k as i64 * CHUNK as i64 + d) as u64));
            }
        }
        // And random ones, relative to the start, the end and the cursor.
        let rnd = test_bytes(64 * 8, 99 + i as u64);
        for w in rnd.chunks(8) {
            let x = u64::from_le_bytes(w.try_into().unwrap());
            let p = x % (n as u64 + 100);
            targets.push(match x % 3 {
                0 => SeekFrom::Start(p),
                1 => SeekFrom::End(-((p % (n as u64 + 1)) as i64)),
                _ => SeekFrom::Current(0),
            });
        }

        for (j, t) in targets.into_iter().enumerate() {
            let pos = dec.seek(t).unwrap_or_else(|e| {
                panic!("size {n} seek {t:?} from {:?}: {e}", dec.stream_position())
            });
            let expect_pos = match t {
                SeekFrom::Start(p) => p,
                SeekFrom::End(d) => (len + d) as u64,
                SeekFrom::Current(_) => pos,
            };
            assert_eq!(pos, expect_pos, "size {n} seek {t:?}");
            // Reads that cross chunk boundaries: up to 2.5 chunks.
            let want = [0usize, 1, 100, CHUNK, CHUNK + 1, 5 * CHUNK / 2][j % 6];
            let got = read_n(&mut dec, want);
            let from = (pos as usize).min(n);
            let to = (from + want).min(n);
            assert!(got == pt[from..to], "size {n} at {pos} read {want}");
            assert_eq!(dec.stream_position().unwrap(), pos + got.len() as u64);
        }

        // Past the end: reads return 0, not an error.
        dec.seek(SeekFrom::Start(n as u64 + 5)).unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(dec.read(&mut buf).unwrap(), 0);
        // Seeking before the start is an error and does not move.
        dec.seek(SeekFrom::Start(0)).unwrap();
        assert!(dec.seek(SeekFrom::End(-len - 1)).is_err());
        assert!(dec.seek(SeekFrom::Current(-1)).is_err());
        assert_eq!(read_n(&mut dec, 3), pt[..n.min(3)]);
    }
}

// ---------------------------------------------------------------------------
// Truncation.
// ---------------------------------------------------------------------------

/// The error a decoder must give for a message cut to `cut` bytes, and how
/// many plaintext bytes a streaming decoder may release before it.
fn expected_cut(header_len: usize, cut: usize) -> (Want, usize) {
    if cut < header_len + PREFIX {
        return (is_truncated, 0);
    }
    let c = cut - header_len - PREFIX;
    let (full, rem) = (c / CT_CHUNK, c % CT_CHUNK);
    // Section 7.4: a cut inside a chunk, with at least a tag of it left,
    // is `TruncatedChunk` once a full chunk authenticated before it, and
    // the opaque `Decrypt` when only the commitment did.
    let want: Want = if rem < cobblestone::TAG_LEN {
        is_truncated
    } else if full == 0 {
        is_decrypt
    } else {
        is_truncated_chunk
    };
    (want, full * CHUNK)
}

#[test]
fn truncation_anywhere_is_rejected_by_every_decoder() {
    let f = Fixture::new();
    let h = f.header_len();
    for n in [0, 100, CHUNK, 3 * CHUNK, 5 * CHUNK + 100] {
        let pt = test_bytes(n, n as u64);
        let msg = f.seal(&pt);
        let mut cuts: Vec<usize> = (0..h + PREFIX + 1).collect();
        let chunks = n / CHUNK + 1;
        for i in 0..chunks {
            let r = f.chunk(msg.len(), i);
            for d in [0, 1, 15, 16, 17, 8200, CHUNK - 1, CT_CHUNK - 1] {
                cuts.push(r.start + d);
            }
            if i == chunks - 1 {
                cuts.extend(r.clone());
            }
        }
        cuts.retain(|&c| c < msg.len());
        cuts.sort_unstable();
        cuts.dedup();
        assert!(cuts.len() > h + PREFIX + 8 * chunks);
        for cut in cuts {
            let m = &msg[..cut];
            let (want, released) = expected_cut(h, cut);
            assert_all_fail(&f, m, want, &format!("size {n} cut at {cut}"));
            let s = open_streaming(m, &f.dek, &f.ctx, 4096);
            assert!(
                s.released == pt[..released],
                "size {n} cut {cut}: released {} bytes, want the first {released}",
                s.released.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Reordering and splicing.
// ---------------------------------------------------------------------------

#[test]
fn chunk_swap_duplication_removal_and_appending_are_rejected() {
    let f = Fixture::new();
    let n = 4 * CHUNK + 500;
    let pt = test_bytes(n, 7);
    let msg = f.seal(&pt);
    let c = |i| f.chunk(msg.len(), i);
    let splice = |parts: &[std::ops::Range<usize>]| -> Vec<u8> {
        parts.iter().flat_map(|r| msg[r.clone()].to_vec()).collect()
    };
    let head = 0..c(0).start;
    let end = msg.len();

    let cases: Vec<(&str, Vec<u8>, Want, usize)> = vec![
        (
            "swap chunks 0 and 1",
            splice(&[head.clone(), c(1), c(0), c(2).start..end]),
            is_decrypt,
            0,
        ),
        (
            "swap chunks 2 and 3",
            splice(&[head.clone(), c(0).start..c(2).start, c(3), c(2), c(4)]),
            is_decrypt,
            2 * CHUNK,
        ),
        (
            "duplicate chunk 1",
            splice(&[head.clone(), c(0), c(1), c(1), c(2).start..end]),
            is_decrypt,
            2 * CHUNK,
        ),
        (
            "drop chunk 2",
            splice(&[head.clone(), c(0).start..c(2).start, c(3).start..end]),
            is_decrypt,
            2 * CHUNK,
        ),
        (
            "final chunk moved before the last full one",
            splice(&[head.clone(), c(0).start..c(3).start, c(4), c(3)]),
            is_decrypt,
            3 * CHUNK,
        ),
        (
            "remove the final chunk",
            splice(&[head.clone(), c(0).start..c(4).start]),
            is_truncated,
            4 * CHUNK,
        ),
    ];
    for (what, m, want, released) in cases {
        assert_all_fail(&f, &m, want, what);
        let s = open_streaming(&m, &f.dek, &f.ctx, 1000);
        assert!(
            s.released == pt[..released],
            "{what}: released {}",
            s.released.len()
        );
    }
}

#[test]
fn anything_appended_is_rejected() {
    let f = Fixture::new();
    for n in [0, 100, CHUNK, 2 * CHUNK + 500] {
        let pt = test_bytes(n, 11);
        let msg = f.seal(&pt);
        let other = f.seal(&test_bytes(n, 12));
        let h = f.header_len();
        let first_chunk = f.chunk(msg.len(), 0);
        let mut appendices: Vec<(String, Vec<u8>)> = vec![
            ("a copy of chunk 0".into(), msg[first_chunk].to_vec()),
            ("a second body".into(), msg[h..].to_vec()),
            ("another message's body".into(), other[h..].to_vec()),
            ("another whole message".into(), other.clone()),
            ("the final chunk again".into(), {
                let last = f.chunk(msg.len(), n / CHUNK);
                msg[last].to_vec()
            }),
        ];
        for g in [
            1usize,
            15,
            16,
            17,
            100,
            CT_CHUNK - 1,
            CT_CHUNK,
            CT_CHUNK + 16,
        ] {
            appendices.push((format!("{g} garbage bytes"), test_bytes(g, g as u64)));
            appendices.push((format!("{g} zero bytes"), vec![0; g]));
        }
        for (what, tail) in appendices {
            let m = [&msg[..], &tail[..]].concat();
            assert_all_fail(&f, &m, is_auth_or_truncated, &format!("size {n} + {what}"));
            // Nothing beyond the authenticated full chunks is released.
            let s = open_streaming(&m, &f.dek, &f.ctx, 333);
            assert!(s.result.is_err());
            assert!(s.released.len() <= n / CHUNK * CHUNK, "size {n} + {what}");
            assert!(s.released == pt[..s.released.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// Failing chunks: nothing released, sticky errors.
// ---------------------------------------------------------------------------

#[test]
fn streaming_never_releases_a_failed_chunk_and_stays_failed() {
    let f = Fixture::new();
    let n = 5 * CHUNK + 100;
    let pt = test_bytes(n, 21);
    let msg = f.seal(&pt);
    for bad in 0..=5 {
        let r = f.chunk(msg.len(), bad);
        for at in [r.start, r.start + (r.len() - 16) / 2, r.end - 1] {
            let mut m = msg.clone();
            m[at] ^= 0x20;
            for buf_len in [1, 7, CHUNK, 65536] {
                let mut reader = &m[..];
                let header = Header::read_from(&mut reader).unwrap();
                let key = OpeningKey::new(&f.dek, &header).unwrap();
                let mut dec = key.decryptor(reader, &f.ctx).unwrap();
                let (released, err) = drain_with(&mut dec, buf_len);
                // The final chunk (5), after full chunks that authenticated,
                // reads as a copy cut inside it (FORMAT.md section 7.4).
                let want = |e: &Error| {
                    if bad == 5 {
                        matches!(e, Error::TruncatedChunk)
                    } else {
                        matches!(e, Error::Decrypt)
                    }
                };
                assert!(err.as_ref().is_some_and(want), "chunk {bad}: {err:?}");
                assert!(
                    released == pt[..bad * CHUNK],
                    "chunk {bad} buf {buf_len}: released {}",
                    released.len()
                );
                // Every later read gives the same opaque error.
                for _ in 0..3 {
                    let e = dec.read(&mut [0u8; 64]).unwrap_err();
                    assert!(want(&Error::from(e)));
                }
            }
        }
    }
}

#[test]
fn seeking_decoder_fails_on_a_bad_chunk_and_stays_failed() {
    let f = Fixture::new();
    let n = 5 * CHUNK + 100;
    let pt = test_bytes(n, 22);
    let msg = f.seal(&pt);
    let key = f.opening_key();
    let h = f.header_len();
    for bad in 0..5 {
        let mut m = msg.clone();
        m[f.chunk(msg.len(), bad).start + 10] ^= 1;
        let mut cur = Cursor::new(&m);
        cur.set_position(h as u64);
        // The final chunk is intact, so opening succeeds...
        let mut dec = key.seekable_decryptor(cur, &f.ctx).unwrap();
        // ...and a good chunk reads,
        let good = if bad == 0 { 1 } else { 0 };
        dec.seek(SeekFrom::Start((good * CHUNK) as u64)).unwrap();
        assert_eq!(read_n(&mut dec, 10), pt[good * CHUNK..good * CHUNK + 10]);
        // but the bad one fails, releases nothing,
        dec.seek(SeekFrom::Start((bad * CHUNK + 5) as u64)).unwrap();
        let mut buf = vec![0xEEu8; 100];
        let e = dec.read(&mut buf).unwrap_err();
        assert!(matches!(Error::from(e), Error::Decrypt));
        assert!(buf.iter().all(|&b| b == 0xEE));
        // and every later read fails, even of a good chunk.
        dec.seek(SeekFrom::Start((good * CHUNK) as u64)).unwrap();
        assert!(dec.read(&mut buf).is_err());
        assert!(dec.read(&mut buf).is_err());
    }
    // A bad final chunk fails at open: the length is authenticated first.
    // The full chunks before it authenticate, so it reads as a copy cut
    // inside the final chunk (FORMAT.md section 7.4)...
    let mut m = msg.clone();
    let last = msg.len() - 1;
    m[last] ^= 1;
    let mut cur = Cursor::new(&m);
    cur.set_position(h as u64);
    assert!(matches!(
        key.seekable_decryptor(cur, &f.ctx),
        Err(Error::TruncatedChunk)
    ));
    // ...unless a full chunk before it fails too: the first failure in
    // stream order is reported, as by the streaming decoder (section 7.3).
    m[f.chunk(msg.len(), 3).start + 10] ^= 1;
    let mut cur = Cursor::new(&m);
    cur.set_position(h as u64);
    assert!(matches!(
        key.seekable_decryptor(cur, &f.ctx),
        Err(Error::Decrypt)
    ));
}

// ---------------------------------------------------------------------------
// An encryptor dropped without finish.
// ---------------------------------------------------------------------------

#[test]
fn unfinished_encryptor_output_is_rejected() {
    let f = Fixture::new();
    for n in [0, 100, CHUNK - 1, CHUNK, 40_000, 3 * CHUNK] {
        let pt = test_bytes(n, 31);
        let mut out = Vec::new();
        {
            let mut enc = f.key.encryptor(&mut out, &f.ctx).unwrap();
            enc.write_all(&pt).unwrap();
            enc.flush().unwrap();
            assert_eq!(enc.plaintext_written(), n as u64);
            // Dropped here without finish().
        }
        // Only the full chunks were written: the body ends at a boundary.
        let full = n / CHUNK;
        assert_eq!(out.len(), f.header_len() + PREFIX + full * CT_CHUNK);
        assert_all_fail(&f, &out, is_truncated, &format!("unfinished, size {n}"));
        let s = open_streaming(&out, &f.dek, &f.ctx, 4096);
        assert!(s.released == pt[..full * CHUNK]);
    }
}

// ---------------------------------------------------------------------------
// Hostile headers.
// ---------------------------------------------------------------------------

/// A header prefix: magic, version 1, suite 1, `count`.
fn prefix(count: u8) -> Vec<u8> {
    [&b"PHIENV\x01\x01"[..], &[count]].concat()
}

/// An entry with raw length fields, for crafting hostile headers.
fn raw_entry(
    plen: u8,
    provider: &[u8],
    rlen: u16,
    key_ref: &[u8],
    wlen: u16,
    wrapped: &[u8],
) -> Vec<u8> {
    let mut e = vec![plen];
    e.extend_from_slice(provider);
    e.extend_from_slice(&rlen.to_be_bytes());
    e.extend_from_slice(key_ref);
    e.extend_from_slice(&7u32.to_be_bytes());
    e.extend_from_slice(&wlen.to_be_bytes());
    e.extend_from_slice(wrapped);
    e
}

fn good_entry() -> Vec<u8> {
    raw_entry(5, b"local", 7, b"local:k", 1, &[1])
}

/// `Header::parse`, `Header::read_from` and `message::open` all fail on
/// `input` with an error `want` accepts.
fn assert_header_error(input: &[u8], want: impl Fn(&Error) -> bool, what: &str) {
    let dek = Dek::generate().unwrap();
    let ctx = EncryptionContext::new();
    let a = Header::parse(input).map(|_| ());
    let b = Header::read_from(&mut &input[..]).map(|_| ());
    let c = message::open(input, &dek, &ctx).map(|_| ());
    for (i, r) in [a, b, c].into_iter().enumerate() {
        assert!(
            matches!(&r, Err(e) if want(e)),
            "{what}: path {i} gave {r:?}"
        );
    }
}

#[test]
fn hostile_headers_give_their_structural_error() {
    let body = vec![0x5Au8; 200];
    let with_body = |h: Vec<u8>| [h, body.clone()].concat();
    let malformed = |e: &Error| matches!(e, Error::Malformed(_));

    // Recipient counts outside 1..=8, including 255.
    for count in [0u8, 9, 255] {
        let mut h = prefix(count);
        for _ in 0..10 {
            h.extend(good_entry());
        }
        assert_header_error(&with_body(h), malformed, &format!("count {count}"));
    }
    // Provider id length 0, 33, 255 and a bad alphabet.
    for plen in [0u8, 33, 255] {
        let h = [
            prefix(1),
            raw_entry(plen, &[b'a'; 255][..plen as usize], 1, b"k", 1, &[1]),
        ]
        .concat();
        assert_header_error(&with_body(h), malformed, &format!("plen {plen}"));
    }
    for provider in [
        &b"Local"[..],
        b"lo cal",
        b"l_cal",
        b"loc\xc3\xa9",
        b"local\0",
    ] {
        let h = [
            prefix(1),
            raw_entry(provider.len() as u8, provider, 1, b"k", 1, &[1]),
        ]
        .concat();
        assert_header_error(&with_body(h), malformed, &format!("provider {provider:?}"));
    }
    // Key reference length 0, 1025, 0xFFFF; bad UTF-8; control characters.
    for rlen in [0u16, 1025, 0xFFFF] {
        let h = [prefix(1), raw_entry(5, b"local", rlen, &[], 1, &[1])].concat();
        assert_header_error(&with_body(h), malformed, &format!("rlen {rlen}"));
    }
    for key_ref in [
        &b"a\nb"[..],
        b"\x00",
        b"a\x7f",
        "a\u{85}".as_bytes(),
        b"\xff\xfe",
        b"\xc3",
    ] {
        let h = [
            prefix(1),
            raw_entry(5, b"local", key_ref.len() as u16, key_ref, 1, &[1]),
        ]
        .concat();
        assert_header_error(&with_body(h), malformed, &format!("key ref {key_ref:?}"));
    }
    // Wrapped key length 0, 2049, 0xFFFF.
    for wlen in [0u16, 2049, 0xFFFF] {
        let h = [prefix(1), raw_entry(5, b"local", 1, b"k", wlen, &[])].concat();
        assert_header_error(&with_body(h), malformed, &format!("wlen {wlen}"));
    }
    // A bad second entry after a good one.
    let h = [
        prefix(2),
        good_entry(),
        raw_entry(5, b"local", 0xFFFF, &[], 1, &[1]),
    ]
    .concat();
    assert_header_error(&with_body(h), malformed, "second entry rlen 0xFFFF");

    // Unknown versions and suites, with their values.
    for v in [0u8, 2, 0xFF] {
        let h = [&b"PHIENV"[..], &[v, 1, 1], &good_entry()].concat();
        assert_header_error(
            &with_body(h),
            |e| matches!(e, Error::UnsupportedVersion(x) if *x == v),
            &format!("version {v}"),
        );
    }
    for s in [0u8, 2, 0x80, 0xFF] {
        let h = [&b"PHIENV\x01"[..], &[s, 1], &good_entry()].concat();
        assert_header_error(
            &with_body(h),
            |e| matches!(e, Error::UnsupportedSuite(x) if *x == s),
            &format!("suite {s}"),
        );
    }
    // The version is checked before the suite: version 2 with suite 9.
    assert_header_error(
        b"PHIENV\x02\x09\x01rest of some future format",
        |e| matches!(e, Error::UnsupportedVersion(2)),
        "version before suite",
    );

    // Bad magic, foreign formats.
    for input in [
        &b"PHIENW\x01\x01\x01"[..],
        b"phienv\x01\x01\x01",
        b"age-encryption.org/v1\n-> X25519",
        &[0u8; 100],
        &[0xFF; 100],
        b"X",
        b"PX",
        b"PHIENX",
    ] {
        assert_header_error(
            input,
            |e| matches!(e, Error::NotEnvelope),
            &format!("{input:?}"),
        );
    }
    // Too short to tell: the start of the magic, or the fixed prefix cut.
    for input in [
        &b""[..],
        b"P",
        b"PHI",
        b"PHIENV",
        b"PHIENV\x01",
        b"PHIENV\x01\x01",
    ] {
        assert_header_error(input, is_truncated, &format!("{input:?}"));
    }
    // Short, but the version byte is there: an unknown version is reported
    // at once (section 4.4), whatever follows; likewise an unknown suite.
    assert_header_error(
        b"PHIENV\x02\x01",
        |e| matches!(e, Error::UnsupportedVersion(2)),
        "8 bytes, version 2",
    );
    assert_header_error(
        b"PHIENV\x01\x07",
        |e| matches!(e, Error::UnsupportedSuite(7)),
        "8 bytes, suite 7",
    );
    // Cut inside an entry or the tag.
    let full = [prefix(1), good_entry(), vec![0xAB; 32]].concat();
    for cut in 9..full.len() {
        assert_header_error(&full[..cut], is_truncated, &format!("header cut at {cut}"));
    }
    // The whole header present: now only the tag can fail.
    assert!(Header::parse(&full).is_ok());
    assert!(matches!(
        message::open(
            &with_body(full),
            &Dek::generate().unwrap(),
            &EncryptionContext::new()
        ),
        Err(Error::Decrypt)
    ));
}

/// A reader over an endless source that counts the bytes it delivers and
/// the largest single read it is asked for.
struct Counting<R> {
    inner: R,
    delivered: usize,
    largest_request: usize,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.largest_request = self.largest_request.max(buf.len());
        let n = self.inner.read(buf)?;
        self.delivered += n;
        Ok(n)
    }
}

fn counting<R: Read>(inner: R) -> Counting<R> {
    Counting {
        inner,
        delivered: 0,
        largest_request: 0,
    }
}

/// An endless stream of maximal entries: every bound at its maximum.
fn maximal_entries() -> impl Read {
    let entry = raw_entry(32, &[b'z'; 32], 1024, &[b'r'; 1024], 2048, &[0xFF; 2048]);
    let mut one = entry.clone();
    for _ in 0..20 {
        one.extend_from_slice(&entry);
    }
    Cursor::new(one).chain(io::repeat(0xFF))
}

#[test]
fn endless_hostile_input_stops_within_the_header_bound() {
    // Endless 0xFF: not an envelope, after the fixed prefix at most.
    let mut r = counting(io::repeat(0xFF));
    assert!(matches!(Header::read_from(&mut r), Err(Error::NotEnvelope)));
    assert!(r.delivered <= 9);

    // A valid prefix, then endless 0xFF: a provider id length of 255.
    let mut r = counting(Cursor::new(prefix(8)).chain(io::repeat(0xFF)));
    assert!(matches!(
        Header::read_from(&mut r),
        Err(Error::Malformed(_))
    ));
    assert!(r.delivered <= 10);

    // A valid prefix, then endless 0x00: a provider id length of 0.
    let mut r = counting(Cursor::new(prefix(8)).chain(io::repeat(0)));
    assert!(matches!(
        Header::read_from(&mut r),
        Err(Error::Malformed(_))
    ));
    assert!(r.delivered <= 10);

    // Eight maximal entries and a tag out of an endless source: the largest
    // header there is. The parser stops after exactly MAX_HEADER_LEN bytes
    // and never asks for more than one wrapped key at a time.
    let mut r = counting(Cursor::new(prefix(8)).chain(maximal_entries()));
    let header = Header::read_from(&mut r).unwrap();
    assert_eq!(r.delivered, MAX_HEADER_LEN);
    assert_eq!(header.len(), MAX_HEADER_LEN);
    assert!(r.largest_request <= MAX_WRAPPED_KEY_LEN);
    assert_eq!(header.recipients().len(), 8);
    // Its tag is garbage.
    assert!(matches!(
        OpeningKey::new(&Dek::generate().unwrap(), &header),
        Err(Error::Decrypt)
    ));

    // Seven maximal entries, then one claiming a 0xFFFF key reference.
    let mut src = prefix(8);
    for _ in 0..7 {
        src.extend(raw_entry(
            32,
            &[b'z'; 32],
            1024,
            &[b'r'; 1024],
            2048,
            &[0xFF; 2048],
        ));
    }
    src.extend([5, b'l', b'o', b'c', b'a', b'l', 0xFF, 0xFF]);
    let mut r = counting(Cursor::new(src).chain(io::repeat(b'r')));
    assert!(matches!(
        Header::read_from(&mut r),
        Err(Error::Malformed(_))
    ));
    assert!(r.delivered < MAX_HEADER_LEN);
    assert!(r.largest_request <= MAX_WRAPPED_KEY_LEN);
}

// ---------------------------------------------------------------------------
// Allocation bound, measured with a per-thread tracking allocator.
// ---------------------------------------------------------------------------

/// Passes every call to the system allocator; on a thread that turned
/// tracking on, it records the largest single allocation and the peak of
/// bytes live since tracking started.
struct Tracking;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(grow: usize, shrink: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            LARGEST.with(|l| l.set(l.get().max(grow)));
            LIVE.with(|live| {
                let now = live.get() + grow as isize - shrink as isize;
                live.set(now);
                PEAK.with(|p| p.set(p.get().max(now)));
            });
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping touches only `const`-initialised thread-locals,
// which never allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size, layout.size());
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` with tracking on; returns (largest single allocation, peak
/// bytes live) during it.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.with(|l| l.set(0));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    ON.with(|on| on.set(true));
    let out = f();
    ON.with(|on| on.set(false));
    (
        out,
        LARGEST.with(Cell::get),
        PEAK.with(Cell::get).max(0) as usize,
    )
}

fn maximal_header_source() -> impl Read {
    Cursor::new(prefix(8)).chain(maximal_entries())
}

/// The total heap a hostile header can make the parser hold is bounded by
/// a small multiple of `MAX_HEADER_LEN`, whatever the input claims.
#[test]
fn header_parsing_heap_is_bounded() {
    for (what, mut src) in [
        (
            "maximal header",
            Box::new(maximal_header_source()) as Box<dyn Read>,
        ),
        (
            "endless 0xFF",
            Box::new(Cursor::new(prefix(8)).chain(io::repeat(0xFF))),
        ),
        (
            "count 255",
            Box::new(Cursor::new(prefix(255)).chain(io::repeat(0x20))),
        ),
    ] {
        let (r, largest, peak) = measure(|| Header::read_from(&mut src).map(|h| h.len()));
        eprintln!("{what}: {r:?}, largest allocation {largest}, peak live {peak}");
        assert!(
            peak <= 3 * MAX_HEADER_LEN,
            "{what}: {peak} bytes live at peak, largest allocation {largest}"
        );
    }
}

/// Stricter: no single allocation while parsing exceeds `MAX_HEADER_LEN`.
/// (Plain amortized doubling of the header record used to reach 34176 bytes
/// for a maximal 24945-byte header; growth is now capped.)
#[test]
fn header_parsing_never_allocates_beyond_max_header_len() {
    let mut src = maximal_header_source();
    let (r, largest, peak) = measure(|| Header::read_from(&mut src).map(|h| h.len()));
    assert_eq!(r.unwrap(), MAX_HEADER_LEN);
    assert!(
        largest <= MAX_HEADER_LEN,
        "largest single allocation {largest} > MAX_HEADER_LEN {MAX_HEADER_LEN} (peak live {peak})"
    );
}
