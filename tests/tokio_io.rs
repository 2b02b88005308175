//! The tokio AsyncWrite/AsyncRead adapters: same bytes, same guarantees as
//! the sync stream API.
#![cfg(feature = "tokio")]

mod conformance;

use std::sync::Arc;

use conformance::{bytes, ctx, MemoryKms};
use phi_envelope::{Envelope, Keyring};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn envelope() -> Envelope {
    let kms = Arc::new(MemoryKms::new("kms"));
    let key = kms.add_key("records");
    Envelope::new(
        Keyring::builder()
            .provider(kms)
            .recipient(key)
            .build()
            .unwrap(),
    )
}

async fn seal_async(env: &Envelope, pt: &[u8], piece: usize) -> Vec<u8> {
    let mut w = env.async_encryptor(Vec::new(), &ctx("a")).await.unwrap();
    for p in pt.chunks(piece.max(1)) {
        w.write_all(p).await.unwrap();
    }
    w.shutdown().await.unwrap();
    w.into_inner()
}

#[tokio::test]
async fn round_trips_and_interoperates_with_the_sync_api() {
    let env = envelope();
    for len in [0usize, 1, 16_383, 16_384, 16_385, 100_000] {
        let pt = bytes(len, 3);
        let sealed = seal_async(&env, &pt, 777).await;
        // Async-sealed opens with the sync API, and vice versa.
        assert_eq!(env.open(&sealed, &ctx("a")).await.unwrap(), pt, "len {len}");
        let sync_sealed = env.seal(&pt, &ctx("a")).await.unwrap();
        for message in [&sealed, &sync_sealed] {
            let mut r = env.async_decryptor(&message[..], &ctx("a")).await.unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, pt, "len {len}");
        }
    }
}

#[tokio::test]
async fn works_through_a_narrow_pipe() {
    // A 61-byte duplex forces partial writes and reads at every step.
    let env = envelope();
    let pt = bytes(50_000, 9);
    let (a, b) = tokio::io::duplex(61);
    let writer = {
        let env = env.clone();
        let pt = pt.clone();
        tokio::spawn(async move {
            let mut w = env.async_encryptor(a, &ctx("p")).await.unwrap();
            w.write_all(&pt).await.unwrap();
            w.shutdown().await.unwrap();
        })
    };
    let mut r = env.async_decryptor(b, &ctx("p")).await.unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    writer.await.unwrap();
    assert_eq!(out, pt);
}

#[tokio::test]
async fn unfinished_truncated_or_tampered_streams_fail_and_keep_failing() {
    let env = envelope();
    let pt = bytes(40_000, 1);
    // Dropped without shutdown: no final chunk.
    let mut w = env.async_encryptor(Vec::new(), &ctx("a")).await.unwrap();
    w.write_all(&pt).await.unwrap();
    w.flush().await.unwrap();
    let unfinished = w.into_inner();
    assert!(env.open(&unfinished, &ctx("a")).await.is_err());

    let sealed = seal_async(&env, &pt, 4096).await;
    let (_, hlen) = phi_envelope::Header::parse(&sealed).unwrap();
    let body = hlen + 56;
    for cut in [body + 16_400, body + 16_399, sealed.len() - 1] {
        let mut r = env
            .async_decryptor(&sealed[..cut], &ctx("a"))
            .await
            .unwrap();
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).await.is_err(), "cut at {cut}");
        assert!(
            out.len() <= 16_384 * 2,
            "only authenticated chunks released"
        );
        let mut more = [0u8; 10];
        assert!(r.read(&mut more).await.is_err(), "sticky error");
    }
    // A flipped bit in the second chunk: the first chunk (authenticated)
    // may be released, nothing of the second.
    let mut bad = sealed.clone();
    bad[body + 16_400 + 5] ^= 1;
    let mut r = env.async_decryptor(&bad[..], &ctx("a")).await.unwrap();
    let mut out = Vec::new();
    let e = r.read_to_end(&mut out).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(out, pt[..16_384]);
    // Header truncated, wrong context.
    assert!(env
        .async_decryptor(&sealed[..hlen - 1], &ctx("a"))
        .await
        .is_err());
    assert!(env
        .async_decryptor(&sealed[..], &ctx("b"))
        .await
        .unwrap_err()
        .is_decrypt());
}
