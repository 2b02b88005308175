//! The data-key cache, proven by counting provider calls: with the cache,
//! 10,000 records cost one call; every limit (age, messages, bytes,
//! capacity) and every partition (recipients, actor, caller partition,
//! context) forces a new DEK; the decryption cache reuses a key only for the
//! exact header and context it verified; the policy hook sees every hit;
//! evicted keys are released; concurrency still makes one call.

mod conformance;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conformance::{ctx, MemoryKms};
use phi_envelope::cache::{CacheConfig, CacheLimits};
use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::policy::{Decision, Policy, PolicyRequest};
use phi_envelope::provider::ProviderErrorKind;
use phi_envelope::{Caller, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring};

const HOUR: Duration = Duration::from_secs(3600);

struct Setup {
    kms: Arc<MemoryKms>,
    key: KeyRef,
    other: KeyRef,
}

fn setup() -> Setup {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let other = kms.add_key("archive");
    Setup { kms, key, other }
}

impl Setup {
    fn calls(&self) -> usize {
        self.kms.calls.load(Ordering::SeqCst)
    }

    fn envelope(&self, cache: Option<CacheConfig>) -> Envelope {
        let mut b = Keyring::builder()
            .provider(self.kms.clone())
            .recipient(self.key.clone());
        if let Some(c) = cache {
            b = b.data_key_cache(c);
        }
        Envelope::new(b.build().unwrap()).as_caller("lab-service", "store-result")
    }
}

fn limits(max_age: Duration, messages: u64, bytes: u64) -> CacheConfig {
    CacheConfig::new()
        .encrypt(CacheLimits::new(max_age, messages, bytes))
        .decrypt(CacheLimits::new(max_age, messages, bytes))
}

fn header_of(m: &[u8]) -> Vec<u8> {
    let (h, _) = Header::parse(m).unwrap();
    h.as_bytes().to_vec()
}

#[tokio::test]
async fn ten_thousand_records_cost_one_provider_call_with_the_cache() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("batch");
    let mut sealed = Vec::with_capacity(10_000);
    for i in 0..10_000u32 {
        sealed.push(env.seal(&i.to_be_bytes(), &c).await.unwrap());
    }
    assert_eq!(s.calls(), 1, "one generate for 10,000 records");
    let stats = env.keyring().cache_stats();
    assert_eq!(stats.provider_calls, 1);
    assert_eq!(stats.encrypt_misses, 1);
    assert_eq!(stats.encrypt_hits, 9_999);
    // One DEK, so one header; but every record has its own salt.
    assert!(sealed.iter().all(|m| header_of(m) == header_of(&sealed[0])));
    let (_, hlen) = Header::parse(&sealed[0]).unwrap();
    let salts: std::collections::HashSet<_> =
        sealed.iter().map(|m| m[hlen..hlen + 24].to_vec()).collect();
    assert_eq!(salts.len(), 10_000);
    // Opening them all: one unwrap.
    for (i, m) in sealed.iter().enumerate() {
        assert_eq!(env.open(m, &c).await.unwrap(), (i as u32).to_be_bytes());
    }
    assert_eq!(s.calls(), 2);
    assert_eq!(env.keyring().cache_stats().decrypt_hits, 9_999);
}

#[tokio::test]
async fn ten_thousand_records_cost_ten_thousand_calls_without_it() {
    let s = setup();
    let env = s.envelope(None);
    let c = ctx("batch");
    for i in 0..10_000u32 {
        env.seal(&i.to_be_bytes(), &c).await.unwrap();
    }
    assert_eq!(s.calls(), 10_000);
    assert_eq!(env.keyring().provider_calls(), 10_000);
}

#[tokio::test]
async fn the_message_limit_retires_a_dek() {
    let s = setup();
    let env = s.envelope(Some(limits(HOUR, 100, u64::MAX)));
    let c = ctx("1");
    for _ in 0..1000 {
        env.seal(b"x", &c).await.unwrap();
    }
    assert_eq!(s.calls(), 10);
    let m = env.seal(b"x", &c).await.unwrap();
    for _ in 0..250 {
        env.open(&m, &c).await.unwrap();
    }
    assert_eq!(
        s.calls(),
        11 + 3,
        "250 opens at 100 uses per key: 3 unwraps"
    );
}

#[tokio::test]
async fn the_byte_limit_retires_a_dek() {
    let s = setup();
    let env = s.envelope(Some(limits(HOUR, u64::MAX, 10_000)));
    let c = ctx("1");
    for _ in 0..100 {
        env.seal(&[0u8; 1000], &c).await.unwrap();
    }
    assert_eq!(s.calls(), 10, "10 records of 1000 bytes per DEK");
    // A record larger than the limit gets a DEK of its own, never cached.
    env.seal(&[0u8; 10_001], &c).await.unwrap();
    env.seal(&[0u8; 10_001], &c).await.unwrap();
    assert_eq!(s.calls(), 12);
}

#[tokio::test]
async fn the_age_limit_retires_a_dek() {
    let s = setup();
    let c = ctx("1");
    // Zero: never reused.
    let env = s.envelope(Some(limits(Duration::ZERO, u64::MAX, u64::MAX)));
    for _ in 0..5 {
        let m = env.seal(b"x", &c).await.unwrap();
        env.open(&m, &c).await.unwrap();
    }
    assert_eq!(s.calls(), 10);
    assert_eq!(env.keyring().cache_stats().entries, 0);
    // 50 ms: reused at once, not after 60 ms.
    let env = s.envelope(Some(limits(Duration::from_millis(50), u64::MAX, u64::MAX)));
    let before = s.calls();
    env.seal(b"x", &c).await.unwrap();
    env.seal(b"x", &c).await.unwrap();
    assert_eq!(s.calls() - before, 1);
    tokio::time::sleep(Duration::from_millis(60)).await;
    env.seal(b"x", &c).await.unwrap();
    assert_eq!(s.calls() - before, 2);
}

#[tokio::test]
async fn recipients_partition_the_cache() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("1");
    let one = env.clone();
    let two = env.to_recipients([s.key.clone(), s.other.clone()]);
    let other = env.to_recipients([s.other.clone()]);
    let reversed = env.to_recipients([s.other.clone(), s.key.clone()]);
    let mut headers = Vec::new();
    let mut sealed = Vec::new();
    for e in [&one, &two, &other, &reversed] {
        let a = e.seal(b"x", &c).await.unwrap();
        let b = e.seal(b"y", &c).await.unwrap();
        assert_eq!(header_of(&a), header_of(&b), "reused within a partition");
        headers.push(header_of(&a));
        sealed.push((e, a));
    }
    // one: 1 generate; two: generate + wrap; other: 1; reversed: 2.
    assert_eq!(s.calls(), 6);
    for (e, a) in sealed {
        assert_eq!(e.open(&a, &c).await.unwrap(), b"x");
    }
    for i in 0..headers.len() {
        for j in 0..i {
            assert_ne!(headers[i], headers[j], "partitions {i} and {j} share a DEK");
        }
    }
}

#[tokio::test]
async fn actors_never_share_a_dek() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("1");
    let alice = env.as_caller("alice", "treatment");
    let bob = env.as_caller("bob", "treatment");
    let alice_billing = env.as_caller("alice", "billing");
    let a = alice.seal(b"x", &c).await.unwrap();
    let b = bob.seal(b"x", &c).await.unwrap();
    let a2 = alice_billing.seal(b"x", &c).await.unwrap();
    assert_ne!(header_of(&a), header_of(&b));
    assert_eq!(
        header_of(&a),
        header_of(&a2),
        "same actor, another purpose: shared"
    );
    assert_eq!(s.calls(), 2);
}

#[tokio::test]
async fn a_caller_chosen_partition_separates_dek_use() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("1");
    let t1 = env.with_cache_partition("tenant-1");
    let t2 = env.with_cache_partition("tenant-2");
    let h: Vec<_> = [
        t1.seal(b"x", &c).await.unwrap(),
        t1.seal(b"x", &c).await.unwrap(),
        t2.seal(b"x", &c).await.unwrap(),
        env.seal(b"x", &c).await.unwrap(),
    ]
    .iter()
    .map(|m| header_of(m))
    .collect();
    assert_eq!(h[0], h[1]);
    assert_ne!(h[0], h[2]);
    assert_ne!(h[0], h[3]);
    assert_ne!(h[2], h[3]);
    assert_eq!(s.calls(), 3);
}

#[tokio::test]
async fn contexts_never_share_a_dek_and_each_opens() {
    // Providers bind the context to the wrapped DEK, so a DEK wrapped for
    // one context must not serve another: it would not even unwrap.
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let a = env.seal(b"a", &ctx("a")).await.unwrap();
    let b = env.seal(b"b", &ctx("b")).await.unwrap();
    assert_ne!(header_of(&a), header_of(&b));
    let fresh = s.envelope(None);
    assert_eq!(fresh.open(&a, &ctx("a")).await.unwrap(), b"a");
    assert_eq!(fresh.open(&b, &ctx("b")).await.unwrap(), b"b");
}

#[tokio::test]
async fn the_decryption_cache_is_keyed_on_the_exact_header_and_context() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("1");
    let m = env.seal(b"record", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    let calls = s.calls();
    // A different context: not served from the cache (and opaque).
    assert!(env.open(&m, &ctx("2")).await.unwrap_err().is_decrypt());
    assert_eq!(s.calls(), calls + 1, "went to the provider");
    // The same header with one bit of its tag flipped: not served either;
    // the provider unwraps and the tag check fails, opaquely.
    let (_, hlen) = Header::parse(&m).unwrap();
    let mut tampered = m.clone();
    tampered[hlen - 1] ^= 1;
    assert!(env.open(&tampered, &c).await.unwrap_err().is_decrypt());
    assert_eq!(s.calls(), calls + 2);
    // And a tampered body under the cached header fails at the body.
    let mut body = m.clone();
    *body.last_mut().unwrap() ^= 1;
    assert!(env.open(&body, &c).await.unwrap_err().is_decrypt());
    assert_eq!(
        s.calls(),
        calls + 2,
        "served from the cache, rejected by the body"
    );
    assert_eq!(env.open(&m, &c).await.unwrap(), b"record");
}

/// Counts requests by operation and denies cache hits once `deny` is set.
#[derive(Debug, Default)]
struct Counting {
    hits_encrypt: AtomicUsize,
    hits_decrypt: AtomicUsize,
    deny: std::sync::atomic::AtomicBool,
}

impl Policy for Counting {
    fn check(&self, r: &PolicyRequest) -> Decision {
        match r.operation {
            Operation::CacheHitEncrypt => self.hits_encrypt.fetch_add(1, Ordering::SeqCst),
            Operation::CacheHitDecrypt => self.hits_decrypt.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
        if self.deny.load(Ordering::SeqCst) && r.operation.is_decryption() {
            Decision::Deny(format!(
                "{} may not decrypt",
                r.actor.clone().unwrap_or_default()
            ))
        } else {
            Decision::Allow
        }
    }
}

#[tokio::test]
async fn the_policy_sees_every_cache_hit_and_each_is_an_event() {
    let s = setup();
    let policy = Arc::new(Counting::default());
    let sink = Arc::new(MemorySink::new());
    let env = Envelope::new(
        Keyring::builder()
            .provider(s.kms.clone())
            .recipient(s.key.clone())
            .policy(policy.clone())
            .event_sink(sink.clone())
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    )
    .as_caller("alice", "treatment");
    let c = ctx("1");
    let m = env.seal(b"x", &c).await.unwrap();
    for _ in 0..4 {
        env.seal(b"x", &c).await.unwrap();
    }
    for _ in 0..5 {
        env.open(&m, &c).await.unwrap();
    }
    assert_eq!(policy.hits_encrypt.load(Ordering::SeqCst), 4);
    assert_eq!(policy.hits_decrypt.load(Ordering::SeqCst), 4);
    let events = sink.take();
    let count = |op| events.iter().filter(|e| e.operation == op).count();
    assert_eq!(count(Operation::Generate), 1);
    assert_eq!(count(Operation::CacheHitEncrypt), 4);
    assert_eq!(count(Operation::Unwrap), 1);
    assert_eq!(count(Operation::CacheHitDecrypt), 4);
    for e in events.iter().filter(|e| {
        matches!(
            e.operation,
            Operation::CacheHitEncrypt | Operation::CacheHitDecrypt
        )
    }) {
        assert_eq!(e.actor.as_deref(), Some("alice"));
        assert_eq!(e.key_ref.as_deref(), Some(s.key.as_str()));
        assert_eq!(e.key_version, Some(1));
        assert_eq!(e.provider, "mem");
        assert!(e.context_fingerprint.is_some());
        assert_eq!(e.outcome, Outcome::Success);
    }
    // A denial applies to cached keys too.
    policy.deny.store(true, Ordering::SeqCst);
    let e = env.open(&m, &c).await.unwrap_err();
    assert!(matches!(e, Error::PolicyDenied(_)), "{e:?}");
    assert!(sink
        .take()
        .iter()
        .any(|e| e.operation == Operation::CacheHitDecrypt && e.outcome == Outcome::Denied));
}

#[tokio::test]
async fn evicted_keys_are_released() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new().capacity(2)));
    for i in 0..5 {
        let c = ctx(&i.to_string());
        let m = env.seal(b"x", &c).await.unwrap();
        env.open(&m, &c).await.unwrap();
    }
    let stats = env.keyring().cache_stats();
    assert_eq!(stats.entries, 4, "two per cache");
    assert_eq!(stats.keys_cached, 10);
    assert_eq!(stats.evictions, 6);
    assert_eq!(stats.keys_released, 6, "every evicted key was dropped");
    // The least recently used went first.
    let before = s.calls();
    env.seal(b"x", &ctx("4")).await.unwrap();
    assert_eq!(s.calls(), before, "most recent still cached");
    env.seal(b"x", &ctx("0")).await.unwrap();
    assert_eq!(s.calls(), before + 1, "oldest was evicted");
    // A flush releases the rest; nothing else holds them.
    env.keyring().flush_cache();
    let stats = env.keyring().cache_stats();
    assert_eq!(stats.entries, 0);
    assert_eq!(stats.keys_released, stats.keys_cached);
}

#[tokio::test]
async fn a_flush_releases_cached_keys_at_once() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("1");
    let m = env.seal(b"x", &c).await.unwrap();
    assert_eq!(env.keyring().cache_stats().keys_released, 0);
    env.keyring().flush_cache_for(&s.key);
    let stats = env.keyring().cache_stats();
    assert_eq!(stats.keys_cached, 1);
    assert_eq!(
        stats.keys_released, 1,
        "no message holds it: dropped at once"
    );
    // The message still opens (a fresh unwrap).
    assert_eq!(env.open(&m, &c).await.unwrap(), b"x");
    assert_eq!(s.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_still_make_one_provider_call() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("shared");
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let env = env.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..50u32 {
                out.push(env.seal(&(t * 1000 + i).to_be_bytes(), &c).await.unwrap());
            }
            out
        }));
    }
    let mut sealed = Vec::new();
    for t in tasks {
        sealed.extend(t.await.unwrap());
    }
    assert_eq!(s.calls(), 1, "3,200 records from 64 tasks: one generate");
    // Concurrent opens of one record: one unwrap.
    let one = Arc::new(sealed[0].clone());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let env = env.clone();
        let c = c.clone();
        let one = one.clone();
        tasks.push(tokio::spawn(
            async move { env.open(&one, &c).await.unwrap() },
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.calls(), 2);
    // Concurrent opens of all of them (one header): still that one key.
    let sealed = Arc::new(sealed);
    let mut tasks = Vec::new();
    for k in 0..8 {
        let env = env.clone();
        let c = c.clone();
        let sealed = sealed.clone();
        tasks.push(tokio::spawn(async move {
            for m in sealed.iter().skip(k).step_by(8) {
                env.open(m, &c).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_miss_does_not_poison_the_waiters() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    s.kms.down.store(true, Ordering::SeqCst);
    let c = ctx("1");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let env = env.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move { env.seal(b"x", &c).await }));
    }
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert!(matches!(&e, Error::Provider(p) if p.kind() == ProviderErrorKind::Unavailable));
    }
    s.kms.down.store(false, Ordering::SeqCst);
    let m = env.seal(b"x", &c).await.unwrap();
    assert_eq!(env.open(&m, &c).await.unwrap(), b"x");
}

#[tokio::test]
async fn cached_keys_ride_out_a_provider_outage_within_their_limits() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c = ctx("1");
    let m = env.seal(b"x", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    s.kms.down.store(true, Ordering::SeqCst);
    let n = env.seal(b"y", &c).await.unwrap();
    assert_eq!(env.open(&n, &c).await.unwrap(), b"y");
    // A new partition needs the provider.
    assert!(env.seal(b"z", &ctx("2")).await.is_err());
}

#[tokio::test]
async fn destroying_or_disabling_through_the_keyring_flushes_the_key() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let archive = env.to_recipients([s.other.clone()]);
    let c = ctx("1");
    let m = env.seal(b"records", &c).await.unwrap();
    let a = archive.seal(b"archive", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    archive.open(&a, &c).await.unwrap();
    assert_eq!(env.keyring().cache_stats().entries, 4);
    // Disabling the primary of `records`: its two entries go, the archive's
    // stay; sealing now fails instead of using the cached key.
    let op = Caller::new("alice", "retire");
    env.keyring()
        .set_state(&s.key, 1, phi_envelope::provider::KeyState::Disabled, &op)
        .await
        .unwrap();
    assert_eq!(env.keyring().cache_stats().entries, 2);
    let e = env.seal(b"x", &c).await.unwrap_err();
    assert!(
        matches!(&e, Error::Provider(p) if p.kind() == ProviderErrorKind::KeyDisabled),
        "{e:?}"
    );
    let e = env.open(&m, &c).await.unwrap_err();
    assert!(
        matches!(&e, Error::Provider(p) if p.kind() == ProviderErrorKind::KeyDisabled),
        "{e:?}"
    );
    // The archive key is untouched and still served from the cache.
    let before = s.calls();
    archive.seal(b"more", &c).await.unwrap();
    archive.open(&a, &c).await.unwrap();
    assert_eq!(s.calls(), before);
    // Destroying the archive key's version flushes its entries.
    env.keyring().destroy(&s.other, 1, &op).await.unwrap();
    assert_eq!(env.keyring().cache_stats().entries, 0);
    let e = archive.open(&a, &c).await.unwrap_err();
    assert!(
        matches!(&e, Error::Provider(p) if p.kind() == ProviderErrorKind::KeyDestroyed),
        "{e:?}"
    );
}

#[tokio::test]
async fn the_cryptoperiod_bounds_a_cached_dek() {
    use phi_envelope::keyring::KeyPolicy;
    let s = setup();
    let period = Duration::from_secs(86_400);
    // Version 1 reaches the end of its period 100 ms from now.
    s.kms
        .backdate("records", 1, period - Duration::from_millis(100));
    let env = Envelope::new(
        Keyring::builder()
            .provider(s.kms.clone())
            .recipient(s.key.clone())
            .key_policy(s.key.clone(), KeyPolicy::new().cryptoperiod(period))
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    );
    let c = ctx("1");
    env.seal(b"x", &c).await.unwrap();
    env.seal(b"x", &c).await.unwrap();
    assert_eq!(s.calls(), 1, "cached within the period");
    tokio::time::sleep(Duration::from_millis(110)).await;
    let e = env.seal(b"x", &c).await.unwrap_err();
    assert!(matches!(e, Error::KeyLifecycle(_)), "{e:?}");
    assert_eq!(
        s.calls(),
        1,
        "the expired key was not served, nothing generated"
    );
}

#[tokio::test]
async fn streams_do_not_use_the_encryption_cache() {
    let s = setup();
    let env = s.envelope(Some(CacheConfig::new()));
    let c: EncryptionContext = ctx("1");
    for _ in 0..3 {
        let w = env.encryptor(Vec::new(), &c).await.unwrap();
        w.finish().unwrap();
    }
    assert_eq!(s.calls(), 3);
    assert_eq!(env.keyring().cache_stats().keys_cached, 0);
}
