//! Encrypt then decrypt through every API with arbitrary plaintext,
//! context, recipients and write/read slicing: `SealingKey::seal` and
//! `encryptor`, `message::open`, `OpeningKey` streaming and seeking,
//! `cobblestone` directly and the envelope with an in-memory provider all
//! give back the plaintext; lengths are as specified; another context
//! fails opaquely. The same with associated data (`seal_with`,
//! `encryptor_with`, `open_with`, the `_with` readers): the header does not
//! change, empty associated data is none, and other associated data fails
//! opaquely.
#![no_main]

use std::io::{Cursor, Read, Seek, SeekFrom, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phi_envelope::cobblestone::{self, body_len};
use phi_envelope::envelope::inspect;
use phi_envelope::format::MAX_RECIPIENTS;
use phi_envelope::message::{self, OpeningKey, SealingKey};
use phi_envelope::{Dek, EncryptionContext, Header, WrappedKey};
use phi_envelope_fuzz::io::{drain, Pieces, Schedule};
use phi_envelope_fuzz::kms::{block_on, envelope};

#[derive(Arbitrary, Debug)]
struct Input {
    dek: [u8; 32],
    pairs: Vec<(String, String)>,
    plaintext: Vec<u8>,
    /// Extra pseudo-random plaintext bytes: `extend % 12000 * 4`, up to
    /// three chunks (more costs speed and finds nothing new: every chunk
    /// after the first is alike).
    extend: u16,
    writes: Vec<u8>,
    reads: Vec<u8>,
    recipients: Vec<(String, String, u32, Vec<u8>)>,
    seeks: Vec<u32>,
    via_envelope: bool,
    /// Associated data bound to the body (docs/FORMAT.md, section 5.4).
    ad: Vec<u8>,
}

fn write_sliced<W: Write>(w: &mut W, pt: &[u8], codes: &[u8]) {
    let mut s = Schedule::new(codes);
    let mut rest = pt;
    while !rest.is_empty() {
        let code = s.next_code();
        if code == Some(0) {
            // Empty writes and flushes in between change nothing.
            assert_eq!(w.write(&[]).unwrap(), 0);
            w.flush().unwrap();
        }
        let n = code
            .map_or(rest.len(), phi_envelope_fuzz::io::size_of)
            .min(rest.len());
        w.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
}

fuzz_target!(|input: Input| {
    let mut ctx = EncryptionContext::new();
    for (k, v) in input.pairs.iter().take(70) {
        let _ = ctx.insert(k.clone(), v.clone());
    }
    let mut pt = input.plaintext.clone();
    let mut x = u64::from(input.extend) | 1;
    for _ in 0..usize::from(input.extend) % 12_000 * 4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pt.push(x as u8);
    }

    // The DEK and the recipients, as the caller gave them.
    let dek = Dek::from_slice(&input.dek).unwrap();
    let entries: Vec<WrappedKey> = input
        .recipients
        .iter()
        .take(10)
        .map(|(p, r, v, w)| WrappedKey {
            provider: p.clone(),
            key_ref: r.clone(),
            key_version: *v,
            wrapped: w.clone(),
        })
        .collect();
    let valid = (1..=MAX_RECIPIENTS).contains(&entries.len())
        && entries.iter().all(|e| e.validate().is_ok());
    let key = match SealingKey::new(&dek, entries.clone()) {
        Ok(k) => {
            assert!(valid, "SealingKey accepted invalid recipients");
            assert_eq!(k.header().recipients(), &entries[..]);
            k
        }
        Err(_) => {
            assert!(!valid, "SealingKey refused valid recipients");
            SealingKey::new(
                &dek,
                vec![WrappedKey {
                    provider: "local".into(),
                    key_ref: "local:fuzz".into(),
                    key_version: 1,
                    wrapped: vec![0xAA; 60],
                }],
            )
            .unwrap()
        }
    };
    let hlen = key.header().len();
    let want_len = hlen as u64 + body_len(pt.len() as u64);

    // Sealed in one go and streamed in slices.
    let sealed = key.seal(&pt, &ctx).unwrap();
    assert_eq!(sealed.len() as u64, want_len);
    let mut w = key.encryptor(Vec::new(), &ctx).unwrap();
    write_sliced(&mut w, &pt, &input.writes);
    assert_eq!(w.plaintext_written(), pt.len() as u64);
    let streamed = w.finish().unwrap();
    assert_eq!(streamed.len() as u64, want_len);
    assert_ne!(sealed, streamed, "two seals share a salt");

    for m in [&sealed, &streamed] {
        assert_eq!(message::open(m, &dek, &ctx).unwrap(), pt);
        let info = inspect(m).unwrap();
        assert_eq!(info.plaintext_len, Some(pt.len() as u64));
        let (header, used) = Header::parse(m).unwrap();
        assert_eq!(&header, key.header());
        let ok = OpeningKey::new(&dek, &header).unwrap();
        let body = &m[used..];
        let mut d = ok
            .decryptor(Pieces::new(body, &input.writes), &ctx)
            .unwrap();
        let (out, err) = drain(&mut d, &mut Schedule::new(&input.reads));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(out, pt);
        let mut s = ok.seekable_decryptor(Cursor::new(body), &ctx).unwrap();
        assert_eq!(s.plaintext_len(), pt.len() as u64);
        for &p in input.seeks.iter().take(8) {
            let pos = u64::from(p) % (pt.len() as u64 + 1);
            s.seek(SeekFrom::Start(pos)).unwrap();
            let mut buf = vec![0u8; (p as usize >> 16) % 40_000 + 1];
            let n = s.read(&mut buf).unwrap();
            let pos = pos as usize;
            assert_eq!(&buf[..n], &pt[pos..pos + n]);
            assert!(n > 0 || pos == pt.len());
        }
    }

    // Another context fails, opaquely.
    let mut other = ctx.clone();
    if other.insert("fuzz-other", "x").is_ok() {
        let e = message::open(&sealed, &dek, &other).unwrap_err();
        assert!(e.is_decrypt(), "{e:?}");
    }

    // Associated data binds the body only: same header, same length.
    let ad = &input.ad;
    let with_ad = key.seal_with(&pt, &ctx, ad).unwrap();
    assert_eq!(with_ad.len() as u64, want_len);
    assert_eq!(&with_ad[..hlen], key.header().as_bytes());
    let mut w = key.encryptor_with(Vec::new(), &ctx, ad).unwrap();
    write_sliced(&mut w, &pt, &input.writes);
    let streamed_ad = w.finish().unwrap();
    for m in [&with_ad, &streamed_ad] {
        assert_eq!(message::open_with(m, &dek, &ctx, ad).unwrap(), pt);
        let (header, used) = Header::parse(m).unwrap();
        let ok = OpeningKey::new(&dek, &header).unwrap();
        let mut d = ok
            .decryptor_with(Pieces::new(&m[used..], &input.writes), &ctx, ad)
            .unwrap();
        let (out, err) = drain(&mut d, &mut Schedule::new(&input.reads));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(out, pt);
        let mut s = ok
            .seekable_decryptor_with(Cursor::new(&m[used..]), &ctx, ad)
            .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(all, pt);
        // Without it (unless it is empty, which is none) or with other
        // associated data, it fails opaquely.
        let plain = message::open(m, &dek, &ctx);
        if ad.is_empty() {
            assert_eq!(plain.unwrap(), pt);
        } else {
            assert!(plain.unwrap_err().is_decrypt());
        }
        let mut other_ad = ad.clone();
        other_ad.push(0);
        let e = message::open_with(m, &dek, &ctx, &other_ad).unwrap_err();
        assert!(e.is_decrypt(), "{e:?}");
    }

    // The body format on its own.
    let raw_ctx = ctx.canonical_pairs();
    let body = cobblestone::encrypt(&input.dek, &raw_ctx, &pt).unwrap();
    assert_eq!(body.len() as u64, body_len(pt.len() as u64));
    assert_eq!(
        cobblestone::plaintext_len(body.len() as u64).unwrap(),
        pt.len() as u64
    );
    assert_eq!(
        cobblestone::decrypt(&input.dek, &raw_ctx, &body).unwrap(),
        pt
    );

    // Through the envelope and a provider.
    if input.via_envelope && pt.len() <= 70_000 {
        let env = envelope();
        let sealed = block_on(env.seal(&pt, &ctx)).unwrap();
        assert_eq!(block_on(env.open(&sealed, &ctx)).unwrap(), pt);
        let mut w = block_on(env.encryptor(Vec::new(), &ctx)).unwrap();
        write_sliced(&mut w, &pt, &input.writes);
        let streamed = w.finish().unwrap();
        let mut d = block_on(env.decryptor(&streamed[..], &ctx)).unwrap();
        let (out, err) = drain(&mut d, &mut Schedule::new(&input.reads));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(out, pt);
        if other.len() != ctx.len() {
            assert!(block_on(env.open(&sealed, &other))
                .unwrap_err()
                .is_decrypt());
        }
    }
});
