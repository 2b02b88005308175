//! Per-record associated data (docs/FORMAT.md section 5.4) through the
//! envelope: it binds the body only. It never reaches a provider, an event
//! or a cache key, so records that differ only in it share a cached DEK; it
//! is needed to open, in every decoder (records, streams, seeking, the file
//! engine, async), and never to rewrap. The KMS form of the service-scale
//! case (10,000 records) is `aws_kms::per_record_associated_data_costs_one_
//! generate_per_cache_window`.

mod conformance;

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use conformance::{bytes, MemoryKms};
use phi_envelope::cache::{CacheConfig, CacheLimits};
use phi_envelope::events::MemorySink;
use phi_envelope::file::FileOptions;
use phi_envelope::{Caller, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring};

/// A record id that must never show up anywhere but in the caller's hands.
const RECORD: &str = "MRN-0042-Jane-Roe";

fn record_id(i: usize) -> Vec<u8> {
    format!("{RECORD}/lab-results/{i:04}").into_bytes()
}

fn tenant() -> EncryptionContext {
    EncryptionContext::new().with("tenant", "st-mary").unwrap()
}

struct Fixture {
    kms: Arc<MemoryKms>,
    key: KeyRef,
    sink: Arc<MemorySink>,
    env: Envelope,
}

fn fixture(cache: Option<CacheConfig>) -> Fixture {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let sink = Arc::new(MemorySink::new());
    let mut b = Keyring::builder()
        .provider(kms.clone())
        .recipient(key.clone())
        .event_sink(sink.clone());
    if let Some(c) = cache {
        b = b.data_key_cache(c);
    }
    let env = Envelope::new(b.build().unwrap()).as_caller("lab-service", "store-result");
    Fixture {
        kms,
        key,
        sink,
        env,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The cache key does not include the associated data: 200 records bound
/// to 200 ids cost one generate and one unwrap; the same records with the
/// id in the encryption context cost one generate each.
#[tokio::test]
async fn associated_data_does_not_partition_the_cache() {
    let f = fixture(Some(CacheConfig::new()));
    let ctx = tenant();
    let mut sealed = Vec::new();
    for i in 0..200 {
        sealed.push(
            f.env
                .seal_with(&bytes(40, i as u8), &ctx, &record_id(i))
                .await
                .unwrap(),
        );
    }
    for (i, m) in sealed.iter().enumerate() {
        assert_eq!(
            f.env.open_with(m, &ctx, &record_id(i)).await.unwrap(),
            bytes(40, i as u8)
        );
    }
    let stats = f.env.keyring().cache_stats();
    assert_eq!(stats.provider_calls, 2, "{stats:?}");
    assert_eq!((stats.encrypt_misses, stats.encrypt_hits), (1, 199));
    assert_eq!((stats.decrypt_misses, stats.decrypt_hits), (1, 199));
    assert_eq!(f.kms.calls.load(Ordering::SeqCst), 2);

    // The same 200 records with the id in the key context: a cache entry
    // each, since the provider binds the context to the wrapped key.
    let g = fixture(Some(CacheConfig::new()));
    for i in 0..200 {
        let id = String::from_utf8(record_id(i)).unwrap();
        let c = tenant().with("record_id", id).unwrap();
        g.env.seal(b"x", &c).await.unwrap();
    }
    assert_eq!(g.env.keyring().cache_stats().encrypt_misses, 200);
}

/// Every record opens under its own id only: not under another id, not
/// without associated data, and its id does not open another record; the
/// failures are the opaque `Decrypt`, whose text names nothing.
#[tokio::test]
async fn every_record_refuses_another_id() {
    let f = fixture(Some(CacheConfig::new()));
    let ctx = tenant();
    let n = 50;
    let mut sealed = Vec::new();
    for i in 0..n {
        sealed.push(
            f.env
                .seal_with(&bytes(100, 7), &ctx, &record_id(i))
                .await
                .unwrap(),
        );
    }
    for (i, m) in sealed.iter().enumerate() {
        for j in (0..n).filter(|&j| j != i) {
            let e = f.env.open_with(m, &ctx, &record_id(j)).await.unwrap_err();
            assert!(e.is_decrypt(), "{e:?}");
        }
        let e = f.env.open(m, &ctx).await.unwrap_err();
        assert!(e.is_decrypt());
        assert!(!format!("{e} {e:?}").contains(RECORD));
    }
    // A record sealed without associated data opens only without it.
    let plain = f.env.seal(b"no id", &ctx).await.unwrap();
    assert_eq!(f.env.open_with(&plain, &ctx, b"").await.unwrap(), b"no id");
    assert!(f
        .env
        .open_with(&plain, &ctx, &record_id(0))
        .await
        .unwrap_err()
        .is_decrypt());
    // The key context still binds: another tenant is refused.
    let other = EncryptionContext::new().with("tenant", "st-john").unwrap();
    assert!(f
        .env
        .open_with(&sealed[0], &other, &record_id(0))
        .await
        .unwrap_err()
        .is_decrypt());
}

/// The associated data reaches no provider (they see the tenant-only
/// context), no event (every event has the tenant-only fingerprint, and no
/// event text names the id), and no message byte.
#[tokio::test]
async fn associated_data_reaches_no_provider_no_event_no_message_byte() {
    let f = fixture(None);
    let ctx = tenant();
    let mut sealed = Vec::new();
    for i in 0..5 {
        let m = f
            .env
            .seal_with(b"potassium 4.1", &ctx, &record_id(i))
            .await
            .unwrap();
        assert!(!contains(&m, RECORD.as_bytes()));
        f.env.open_with(&m, &ctx, &record_id(i)).await.unwrap();
        let _ = f.env.open_with(&m, &ctx, &record_id(i + 1)).await;
        sealed.push(m);
    }
    let seen = f.kms.contexts.lock().unwrap().clone();
    assert_eq!(seen.len(), 15, "one wrap and two unwraps per record");
    assert!(seen.iter().all(|c| *c == ctx.canonical_pairs()));
    let fp = f.env.keyring().context_fingerprint(&ctx);
    let events = f.sink.events();
    assert!(events.len() >= 15);
    for e in &events {
        assert_eq!(e.context_fingerprint.as_deref(), Some(fp.as_str()), "{e:?}");
        let text = format!("{} {e:?}", e.to_json());
        assert!(!text.contains(RECORD), "{text}");
    }
}

/// Streams, seeking, the file engine and the async adapters take the same
/// associated data; each refuses another.
#[tokio::test]
async fn streams_files_and_async_bind_associated_data() {
    use std::io::Write;
    let f = fixture(None);
    let ctx = tenant();
    let ad = record_id(1);
    let other = record_id(2);
    let pt = bytes(3 * 16384 + 77, 5);

    // Sync streams and seeking.
    let mut enc = f.env.encryptor_with(Vec::new(), &ctx, &ad).await.unwrap();
    enc.write_all(&pt).unwrap();
    let m = enc.finish().unwrap();
    assert_eq!(f.env.open_with(&m, &ctx, &ad).await.unwrap(), pt);
    let mut out = Vec::new();
    f.env
        .decryptor_with(&m[..], &ctx, &ad)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, pt);
    let mut s = f
        .env
        .seekable_decryptor_with(Cursor::new(&m), &ctx, &ad)
        .await
        .unwrap();
    s.seek(SeekFrom::Start(20_000)).unwrap();
    let mut tail = Vec::new();
    s.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, pt[20_000..]);
    for wrong in [&other[..], b""] {
        assert!(f
            .env
            .decryptor_with(&m[..], &ctx, wrong)
            .await
            .unwrap_err()
            .is_decrypt());
        assert!(f
            .env
            .seekable_decryptor_with(Cursor::new(&m), &ctx, wrong)
            .await
            .unwrap_err()
            .is_decrypt());
    }

    // The file engine, through FileOptions.
    let dir = tempfile::tempdir().unwrap();
    let (input, sealed, opened) = (
        dir.path().join("in"),
        dir.path().join("in.phi"),
        dir.path().join("out"),
    );
    std::fs::write(&input, &pt).unwrap();
    let with_ad = FileOptions::new().threads(2).associated_data(ad.clone());
    assert!(!format!("{with_ad:?}").contains(RECORD));
    f.env
        .encrypt_file(&input, &sealed, &ctx, &with_ad)
        .await
        .unwrap();
    let wrong = FileOptions::new().threads(2).associated_data(other.clone());
    for opts in [&wrong, &FileOptions::new()] {
        let e = f
            .env
            .decrypt_file(&sealed, &opened, &ctx, opts)
            .await
            .unwrap_err();
        assert!(e.is_decrypt(), "{e:?}");
        assert!(!opened.exists());
    }
    f.env
        .decrypt_file(&sealed, &opened, &ctx, &with_ad)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&opened).unwrap(), pt);
    let file_bytes = std::fs::read(&sealed).unwrap();
    assert_eq!(f.env.open_with(&file_bytes, &ctx, &ad).await.unwrap(), pt);

    // Async.
    #[cfg(feature = "tokio")]
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut w = f
            .env
            .async_encryptor_with(Vec::new(), &ctx, &ad)
            .await
            .unwrap();
        w.write_all(&pt).await.unwrap();
        w.shutdown().await.unwrap();
        let am = w.into_inner();
        assert_eq!(f.env.open_with(&am, &ctx, &ad).await.unwrap(), pt);
        let mut r = f
            .env
            .async_decryptor_with(&am[..], &ctx, &ad)
            .await
            .unwrap();
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, pt);
        assert!(f
            .env
            .async_decryptor_with(&am[..], &ctx, &other)
            .await
            .unwrap_err()
            .is_decrypt());
    }
}

/// Associated data over 65536 bytes is refused before any key is used or
/// any file is created, in every API; 65536 bytes are allowed.
#[tokio::test]
async fn oversized_associated_data_is_refused_before_any_key_use() {
    let f = fixture(None);
    let ctx = tenant();
    let big = vec![b'Q'; 65537];
    let is_invalid = |r: Result<(), Error>| match r {
        Err(e @ Error::InvalidAssociatedData(_)) => {
            assert!(!format!("{e} {e:?}").contains("QQQQ"));
        }
        other => panic!("{other:?}"),
    };
    is_invalid(f.env.seal_with(b"x", &ctx, &big).await.map(drop));
    is_invalid(f.env.encryptor_with(Vec::new(), &ctx, &big).await.map(drop));
    #[cfg(feature = "tokio")]
    is_invalid(
        f.env
            .async_encryptor_with(Vec::new(), &ctx, &big)
            .await
            .map(drop),
    );
    let ok = f.env.seal_with(b"x", &ctx, &big[..65536]).await.unwrap();
    let calls = f.kms.calls.load(Ordering::SeqCst);
    is_invalid(f.env.open_with(&ok, &ctx, &big).await.map(drop));
    is_invalid(f.env.decryptor_with(&ok[..], &ctx, &big).await.map(drop));
    is_invalid(
        f.env
            .seekable_decryptor_with(Cursor::new(&ok), &ctx, &big)
            .await
            .map(drop),
    );
    #[cfg(feature = "tokio")]
    is_invalid(
        f.env
            .async_decryptor_with(&ok[..], &ctx, &big)
            .await
            .map(drop),
    );
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&input, &ok).unwrap();
    let opts = FileOptions::new().associated_data(big.clone());
    is_invalid(
        f.env
            .encrypt_file(&input, &output, &ctx, &opts)
            .await
            .map(drop),
    );
    is_invalid(
        f.env
            .decrypt_file(&input, &output, &ctx, &opts)
            .await
            .map(drop),
    );
    assert!(!output.exists());
    assert_eq!(
        f.kms.calls.load(Ordering::SeqCst),
        calls,
        "no provider call"
    );
    assert_eq!(
        f.env.open_with(&ok, &ctx, &big[..65536]).await.unwrap(),
        b"x"
    );
}

/// Rewrap needs the key context, never the associated data: one record,
/// and a batch of current and stale records sealed with their own ids; the
/// bodies are untouched and open with their ids under the new version.
#[tokio::test]
async fn rewrap_needs_no_associated_data() {
    let f = fixture(None);
    let ctx = tenant();
    let operator = Caller::new("key-custodian", "rotation");
    let mut items = Vec::new();
    for i in 0..4 {
        items.push(
            f.env
                .seal_with(&bytes(30, i as u8), &ctx, &record_id(i))
                .await
                .unwrap(),
        );
    }
    f.env.keyring().rotate(&f.key, &operator).await.unwrap();
    for i in 4..8 {
        items.push(
            f.env
                .seal_with(&bytes(30, i as u8), &ctx, &record_id(i))
                .await
                .unwrap(),
        );
    }
    let one = f.env.rewrap(&items[0], &ctx).await.unwrap();
    let body_at = |m: &[u8]| Header::parse(m).unwrap().1;
    assert_eq!(one[body_at(&one)..], items[0][body_at(&items[0])..]);
    assert_eq!(
        f.env.open_with(&one, &ctx, &record_id(0)).await.unwrap(),
        bytes(30, 0)
    );

    let calls = f.kms.calls.load(Ordering::SeqCst);
    let refs: Vec<(&[u8], &EncryptionContext)> =
        items.iter().map(|m| (m.as_slice(), &ctx)).collect();
    let results = f.env.rewrap_batch(&refs).await;
    // Four stale records, four current ones (no provider call for those).
    assert_eq!(f.kms.calls.load(Ordering::SeqCst) - calls, 2 * 4);
    for (i, r) in results.iter().enumerate() {
        let new = if i < 4 {
            r.rewrapped().expect("stale: rewrapped")
        } else {
            assert!(r.is_unchanged(), "{r:?}");
            &items[i]
        };
        assert_eq!(Header::parse(new).unwrap().0.recipients()[0].key_version, 2);
        assert_eq!(
            f.env.open_with(new, &ctx, &record_id(i)).await.unwrap(),
            bytes(30, i as u8)
        );
        assert!(f.env.open(new, &ctx).await.unwrap_err().is_decrypt());
    }
}

/// A cache window is a cache window with associated data too: with a limit
/// of 25 messages per DEK, 100 records cost 4 generates.
#[tokio::test]
async fn one_generate_per_cache_window() {
    let limits = CacheLimits::new(std::time::Duration::from_secs(3600), 25, 1 << 30);
    let f = fixture(Some(CacheConfig::new().encrypt(limits)));
    let ctx = tenant();
    for i in 0..100 {
        f.env.seal_with(b"x", &ctx, &record_id(i)).await.unwrap();
    }
    assert_eq!(f.kms.calls.load(Ordering::SeqCst), 4);
}

/// A file rewrap checks the rewritten copy's body commitment before it
/// replaces the original, and that commitment binds the associated data:
/// a file sealed with associated data is rewrapped with
/// `rewrap_file_with`, given it. Without it (or with another) the rewrap
/// fails opaquely and the file is left as it was.
#[tokio::test]
async fn file_rewrap_checks_the_body_with_its_associated_data() {
    let f = fixture(None);
    let ctx = tenant();
    let ad = record_id(9);
    let dir = tempfile::tempdir().unwrap();
    let (input, sealed) = (dir.path().join("in"), dir.path().join("in.phi"));
    let pt = bytes(20_000, 4);
    std::fs::write(&input, &pt).unwrap();
    let opts = FileOptions::new().associated_data(ad.clone());
    f.env
        .encrypt_file(&input, &sealed, &ctx, &opts)
        .await
        .unwrap();
    f.env
        .keyring()
        .rotate(&f.key, &Caller::new("key-custodian", "rotation"))
        .await
        .unwrap();
    let before = std::fs::read(&sealed).unwrap();
    for wrong in [&b""[..], &record_id(8)] {
        let e = f
            .env
            .rewrap_file_with(&sealed, &ctx, wrong)
            .await
            .unwrap_err();
        assert!(e.is_decrypt(), "{e:?}");
        assert_eq!(std::fs::read(&sealed).unwrap(), before);
    }
    let e = f.env.rewrap_file(&sealed, &ctx).await.unwrap_err();
    assert!(e.is_decrypt(), "{e:?}");
    let report = f.env.rewrap_file_with(&sealed, &ctx, &ad).await.unwrap();
    assert!(report.changed);
    assert_eq!(report.new_header.recipients()[0].key_version, 2);
    let after = std::fs::read(&sealed).unwrap();
    assert_eq!(
        after[report.new_header.len()..],
        before[report.old_header.len()..]
    );
    assert_eq!(f.env.open_with(&after, &ctx, &ad).await.unwrap(), pt);
    // Current now: left alone, whatever associated data is given.
    assert!(
        !f.env
            .rewrap_file_with(&sealed, &ctx, &ad)
            .await
            .unwrap()
            .changed
    );
}
