//! The provider conformance suite, written once and run against every
//! provider: the local keystore, the PKCS#11 token, the KMS endpoint, and a
//! provider written outside the crate.
//!
//! Use from a test binary:
//! ```ignore
//! mod conformance;
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn conformance() {
//!     conformance::run(conformance::Subject { provider, key, other_key }).await;
//! }
//! ```
#![allow(dead_code)]

pub mod memory;

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::{EncryptionContext, Envelope, Error, Header, KeyProvider, KeyRef, Keyring};

pub use memory::MemoryKms;

/// The provider under test and two keys it holds (both usable for
/// encryption).
pub struct Subject {
    pub provider: Arc<dyn KeyProvider>,
    pub key: KeyRef,
    pub other_key: KeyRef,
}

/// Runs every case; panics with the case name on the first failure.
pub async fn run(s: Subject) {
    let s = Arc::new(s);
    records_round_trip(&s).await;
    streams_round_trip(&s).await;
    seekable_reads(&s).await;
    wrong_context_is_opaque(&s).await;
    wrong_key(&s).await;
    multi_recipient_with_a_provider_missing(&s).await;
    concurrent_use(&s).await;
    bad_input_through_the_public_api(&s).await;
    rewrap_keeps_the_body(&s).await;
    events_for_every_access(&s).await;
    associated_data_binds_the_body_only(&s).await;
}

fn envelope(s: &Subject, key: &KeyRef) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(s.provider.clone())
            .recipient(key.clone())
            .build()
            .unwrap(),
    )
    .as_caller("conformance", "test")
}

pub fn ctx(record: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", record)
        .unwrap()
}

pub fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn records_round_trip(s: &Subject) {
    let env = envelope(s, &s.key);
    for len in [0usize, 1, 1000, 16383, 16384, 16385, 40_000] {
        let pt = bytes(len, 7);
        let sealed = env.seal(&pt, &ctx("r1")).await.expect("seal");
        assert_eq!(
            env.open(&sealed, &ctx("r1")).await.expect("open"),
            pt,
            "records: len {len}"
        );
        let info = phi_envelope::envelope::inspect(&sealed).unwrap();
        assert_eq!(info.plaintext_len, Some(len as u64));
        assert_eq!(info.header.recipients().len(), 1);
        assert_eq!(info.header.recipients()[0].provider, s.provider.id());
    }
    // Two seals of the same record differ (fresh DEK and salt).
    let a = env.seal(b"same", &ctx("r1")).await.unwrap();
    let b = env.seal(b"same", &ctx("r1")).await.unwrap();
    assert_ne!(a, b, "records: two seals must differ");
}

async fn streams_round_trip(s: &Subject) {
    let env = envelope(s, &s.key);
    let pt = bytes(100_000, 3);
    let mut w = env
        .encryptor(Vec::new(), &ctx("s1"))
        .await
        .expect("encryptor");
    for piece in pt.chunks(999) {
        w.write_all(piece).unwrap();
    }
    let sealed = w.finish().unwrap();
    let mut r = env
        .decryptor(&sealed[..], &ctx("s1"))
        .await
        .expect("decryptor");
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert_eq!(out, pt, "streams: round trip");
    // A record sealed in one go reads as a stream and vice versa.
    assert_eq!(env.open(&sealed, &ctx("s1")).await.unwrap(), pt);
    // A stream dropped without finish does not decrypt.
    let unfinished = {
        let mut v = Vec::new();
        let mut w = env.encryptor(&mut v, &ctx("s1")).await.unwrap();
        w.write_all(&pt).unwrap();
        drop(w);
        v
    };
    assert!(
        env.open(&unfinished, &ctx("s1")).await.is_err(),
        "streams: unfinished must fail"
    );
}

async fn seekable_reads(s: &Subject) {
    let env = envelope(s, &s.key);
    let pt = bytes(70_000, 9);
    let sealed = env.seal(&pt, &ctx("k")).await.unwrap();
    let mut r = env
        .seekable_decryptor(Cursor::new(&sealed), &ctx("k"))
        .await
        .expect("seekable");
    assert_eq!(r.plaintext_len(), 70_000);
    for &(off, len) in &[
        (0u64, 10usize),
        (16380, 10),
        (65_000, 5000),
        (69_999, 1),
        (32_768, 16_384),
    ] {
        r.seek(SeekFrom::Start(off)).unwrap();
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(buf, pt[off as usize..off as usize + len], "seek to {off}");
    }
    r.seek(SeekFrom::End(-3)).unwrap();
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, pt[pt.len() - 3..]);
}

async fn wrong_context_is_opaque(s: &Subject) {
    let env = envelope(s, &s.key);
    let sealed = env.seal(b"phi", &ctx("a")).await.unwrap();
    for wrong in [
        ctx("b"),
        EncryptionContext::new(),
        ctx("a").with("extra", "1").unwrap(),
    ] {
        let e = env.open(&sealed, &wrong).await.unwrap_err();
        assert!(
            e.is_decrypt(),
            "wrong context must be the opaque error, got {e:?}"
        );
        let e = env.decryptor(&sealed[..], &wrong).await.unwrap_err();
        assert!(
            e.is_decrypt(),
            "wrong context (stream) must be opaque, got {e:?}"
        );
    }
}

async fn wrong_key(s: &Subject) {
    let env = envelope(s, &s.key);
    let sealed = env.seal(b"phi", &ctx("a")).await.unwrap();
    // A keyring without the provider cannot open it, and says so.
    let dr = Arc::new(MemoryKms::new("conformance-dr"));
    let dr_key = dr.add_key("k");
    let other = Envelope::new(
        Keyring::builder()
            .provider(dr.clone())
            .recipient(dr_key)
            .build()
            .unwrap(),
    );
    assert!(matches!(
        other.open(&sealed, &ctx("a")).await,
        Err(Error::NoMatchingKey(_))
    ));
    // A wrapped DEK from a message under the other key, spliced into this
    // message's header slot, is rejected opaquely.
    let env2 = envelope(s, &s.other_key);
    let sealed2 = env2.seal(b"phi", &ctx("a")).await.unwrap();
    let (h1, _) = Header::parse(&sealed).unwrap();
    let (h2, _) = Header::parse(&sealed2).unwrap();
    let w1 = &h1.recipients()[0].wrapped;
    let w2 = &h2.recipients()[0].wrapped;
    if w1.len() == w2.len() {
        let mut spliced = sealed.clone();
        let pos = find(&spliced, w1).unwrap();
        spliced[pos..pos + w1.len()].copy_from_slice(w2);
        let e = env.open(&spliced, &ctx("a")).await.unwrap_err();
        assert!(
            e.is_decrypt(),
            "spliced wrapped key must be opaque, got {e:?}"
        );
    }
    // A flipped bit in the wrapped DEK is opaque too.
    let mut flipped = sealed.clone();
    let pos = find(&flipped, w1).unwrap() + w1.len() / 2;
    flipped[pos] ^= 0x10;
    let e = env.open(&flipped, &ctx("a")).await.unwrap_err();
    assert!(
        e.is_decrypt(),
        "tampered wrapped key must be opaque, got {e:?}"
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn multi_recipient_with_a_provider_missing(s: &Subject) {
    let dr = Arc::new(MemoryKms::new("conformance-dr"));
    let dr_key = dr.add_key("disaster-recovery");
    let both = Envelope::new(
        Keyring::builder()
            .provider(s.provider.clone())
            .provider(dr.clone())
            .recipient(s.key.clone())
            .recipient(dr_key.clone())
            .build()
            .unwrap(),
    );
    let sealed = both.seal(b"two recipients", &ctx("m")).await.unwrap();
    let info = phi_envelope::envelope::inspect(&sealed).unwrap();
    assert_eq!(info.header.recipients().len(), 2);
    assert_eq!(
        both.open(&sealed, &ctx("m")).await.unwrap(),
        b"two recipients"
    );
    // Only the disaster-recovery provider configured: opens.
    let dr_only = Envelope::new(Keyring::builder().provider(dr.clone()).build().unwrap());
    assert_eq!(
        dr_only.open(&sealed, &ctx("m")).await.unwrap(),
        b"two recipients"
    );
    // Only the subject configured: opens.
    let subject_only = envelope(s, &s.key);
    assert_eq!(
        subject_only.open(&sealed, &ctx("m")).await.unwrap(),
        b"two recipients"
    );
    // The DR provider down: the subject still opens it.
    dr.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        both.open(&sealed, &ctx("m")).await.unwrap(),
        b"two recipients"
    );
    // Sealing needs every recipient: with one down, nothing is produced.
    let e = both.seal(b"x", &ctx("m")).await.unwrap_err();
    assert!(
        matches!(e, Error::Provider(_)),
        "seal with a recipient down: {e:?}"
    );
}

async fn concurrent_use(s: &Subject) {
    let env = envelope(s, &s.key);
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5u32 {
                let c = ctx(&format!("{t}-{i}"));
                let pt = bytes(100 + (t * 7 + i) as usize, t as u8);
                let sealed = env.seal(&pt, &c).await.unwrap();
                assert_eq!(env.open(&sealed, &c).await.unwrap(), pt);
            }
        }));
    }
    for t in tasks {
        t.await.expect("concurrent task");
    }
}

async fn bad_input_through_the_public_api(s: &Subject) {
    let env = envelope(s, &s.key);
    let pt = bytes(40_000, 1);
    let sealed = env.seal(&pt, &ctx("b")).await.unwrap();
    let (header, hlen) = Header::parse(&sealed).unwrap();
    assert_eq!(header.len(), hlen);
    // Truncations: inside the header, at the body start, at and around
    // every chunk boundary, the last byte.
    let body = hlen + 56;
    let mut cuts = vec![0, 1, 5, hlen - 1, hlen, hlen + 10, body, sealed.len() - 1];
    for k in 1..=2 {
        let b = body + k * 16400;
        cuts.extend([b - 1, b, b + 1]);
    }
    for cut in cuts {
        let r = env.open(&sealed[..cut], &ctx("b")).await;
        assert!(r.is_err(), "truncated at {cut} must fail");
        if let Ok(mut d) = env.decryptor(&sealed[..cut], &ctx("b")).await {
            let mut out = Vec::new();
            assert!(
                d.read_to_end(&mut out).is_err(),
                "stream truncated at {cut} must fail"
            );
        }
    }
    // Flips in the header, body prefix, chunks and tags.
    for pos in [
        0,
        6,
        7,
        9,
        hlen - 1,
        hlen,
        hlen + 30,
        body,
        body + 16399,
        sealed.len() - 1,
    ] {
        let mut m = sealed.clone();
        m[pos] ^= 0x01;
        assert!(
            env.open(&m, &ctx("b")).await.is_err(),
            "flip at {pos} must fail"
        );
    }
    // Appended data, foreign input, empty input.
    let mut longer = sealed.clone();
    longer.extend_from_slice(&[0u8; 17]);
    assert!(env.open(&longer, &ctx("b")).await.is_err());
    assert!(matches!(
        env.open(b"", &ctx("b")).await,
        Err(Error::Truncated)
    ));
    assert!(matches!(
        env.open(b"\x89PNG\r\n\x1a\n0000000000", &ctx("b")).await,
        Err(Error::NotEnvelope)
    ));
}

async fn rewrap_keeps_the_body(s: &Subject) {
    let env = envelope(s, &s.key);
    let sealed = env.seal(b"rewrap me", &ctx("w")).await.unwrap();
    let (_, hlen) = Header::parse(&sealed).unwrap();
    let to_other = envelope(s, &s.other_key);
    let rewrapped = to_other.rewrap(&sealed, &ctx("w")).await.expect("rewrap");
    let (h2, hlen2) = Header::parse(&rewrapped).unwrap();
    assert_eq!(
        &rewrapped[hlen2..],
        &sealed[hlen..],
        "rewrap must not touch the body"
    );
    assert_eq!(h2.recipients()[0].provider, s.provider.id());
    if !s.other_key.as_str().contains("alias/") {
        // (A KMS alias is recorded as the key ARN it resolves to.)
        assert_eq!(h2.recipients()[0].key_ref, s.other_key.as_str());
    }
    assert_eq!(
        to_other.open(&rewrapped, &ctx("w")).await.unwrap(),
        b"rewrap me"
    );
    // The context is still required.
    assert!(to_other
        .rewrap(&sealed, &ctx("other"))
        .await
        .unwrap_err()
        .is_decrypt());
}

async fn events_for_every_access(s: &Subject) {
    let sink = Arc::new(MemorySink::new());
    let env = Envelope::new(
        Keyring::builder()
            .provider(s.provider.clone())
            .recipient(s.key.clone())
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    )
    .as_caller("alice", "treatment");
    let secret_value = "MRN-000123-Jane-Roe";
    let c = EncryptionContext::new()
        .with("patient", secret_value)
        .unwrap();
    let sealed = env.seal(b"x", &c).await.unwrap();
    env.open(&sealed, &c).await.unwrap();
    let _ = env.open(&sealed, &ctx("wrong")).await;
    let events = sink.events();
    assert!(events
        .iter()
        .any(|e| e.operation == Operation::Generate && e.outcome == Outcome::Success));
    assert!(events
        .iter()
        .any(|e| e.operation == Operation::Unwrap && e.outcome == Outcome::Success));
    for e in &events {
        assert_eq!(e.actor.as_deref(), Some("alice"));
        assert_eq!(e.purpose.as_deref(), Some("treatment"));
        assert_eq!(e.provider, s.provider.id());
        assert!(e.context_fingerprint.is_some());
        let text = format!("{e:?}");
        assert!(
            !text.contains(secret_value),
            "event leaks a context value: {text}"
        );
    }
}

/// Records of one context bound to their own associated data (record ids)
/// share one cached DEK through this provider, open only with their own
/// associated data, and rewrap with the context alone.
async fn associated_data_binds_the_body_only(s: &Subject) {
    use phi_envelope::cache::CacheConfig;
    let env = Envelope::new(
        Keyring::builder()
            .provider(s.provider.clone())
            .recipient(s.key.clone())
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    )
    .as_caller("conformance", "test");
    let c = EncryptionContext::new().with("tenant", "st-mary").unwrap();
    let id = |i: usize| format!("record-{i}").into_bytes();
    let mut sealed = Vec::new();
    for i in 0..20 {
        sealed.push(
            env.seal_with(&bytes(50, i as u8), &c, &id(i))
                .await
                .expect("seal_with"),
        );
    }
    for (i, m) in sealed.iter().enumerate() {
        assert_eq!(
            env.open_with(m, &c, &id(i)).await.expect("open_with"),
            bytes(50, i as u8)
        );
        let other = env.open_with(m, &c, &id(i + 1)).await.unwrap_err();
        assert!(
            other.is_decrypt(),
            "associated data: another id gave {other:?}"
        );
        assert!(env.open(m, &c).await.unwrap_err().is_decrypt());
    }
    let stats = env.keyring().cache_stats();
    assert_eq!(
        (stats.encrypt_misses, stats.decrypt_misses),
        (1, 1),
        "associated data: one DEK for 20 records, {stats:?}"
    );
    let to_other = Envelope::new(
        Keyring::builder()
            .provider(s.provider.clone())
            .recipient(s.other_key.clone())
            .build()
            .unwrap(),
    )
    .as_caller("conformance", "test");
    let moved = to_other.rewrap(&sealed[3], &c).await.expect("rewrap");
    assert_eq!(
        to_other.open_with(&moved, &c, &id(3)).await.unwrap(),
        bytes(50, 3)
    );
    assert!(to_other.open(&moved, &c).await.unwrap_err().is_decrypt());
}
