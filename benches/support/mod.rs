//! Shared by the benches: test data, a no-runtime `block_on`, a key
//! provider kept in memory on `ring` (the bench's stand-in for a local
//! keystore: one AES-256-GCM wrap or unwrap per DEK, as the local keystore
//! does), and the clock: wall time by default, or with `PHI_BENCH_CLOCK=cpu`
//! the CPU time of the benchmarking thread, which time slices lost to other
//! processes on a busy machine do not inflate (only single-thread benches
//! run then).

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::Criterion;
use phi_envelope::provider::{BoxFuture, KeyInfo, KeyProvider, KeyRef, Unwrapped};
use phi_envelope::{Dek, EncryptionContext, Envelope, Keyring, Result, WrappedKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

/// Pseudo-random bytes (xorshift), the same for every run.
pub fn data(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls a future that never waits on I/O to completion, without a runtime,
/// so that no executor cost is added to ours or to the peers'.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// A provider holding one KEK in memory and wrapping with ring's
/// AES-256-GCM, random nonce, the key reference as AAD.
pub struct RingKms {
    kek: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for RingKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKms")
    }
}

impl RingKms {
    pub fn new() -> RingKms {
        let kek = UnboundKey::new(&AES_256_GCM, &[0x4b; 32]).unwrap();
        RingKms {
            kek: LessSafeKey::new(kek),
            rng: SystemRandom::new(),
        }
    }
}

impl KeyProvider for RingKms {
    fn id(&self) -> &str {
        "bench"
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        _context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move {
            let mut nonce = [0u8; 12];
            self.rng.fill(&mut nonce).unwrap();
            let mut wrapped = nonce.to_vec();
            wrapped.extend_from_slice(dek.expose_secret());
            let tag = self
                .kek
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(key.as_str().as_bytes()),
                    &mut wrapped[12..],
                )
                .unwrap();
            wrapped.extend_from_slice(tag.as_ref());
            Ok(WrappedKey {
                provider: "bench".into(),
                key_ref: key.as_str().into(),
                key_version: 1,
                wrapped,
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        _context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move {
            if entry.wrapped.len() != 12 + 32 + 16 {
                return Ok(Unwrapped::Rejected);
            }
            let nonce: [u8; 12] = entry.wrapped[..12].try_into().unwrap();
            let mut buf = zeroize::Zeroizing::new(entry.wrapped[12..].to_vec());
            match self.kek.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(entry.key_ref.as_bytes()),
                &mut buf[..],
            ) {
                Ok(dek) => Ok(Unwrapped::Key(Dek::from_slice(dek)?)),
                Err(_) => Ok(Unwrapped::Rejected),
            }
        })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { Ok(KeyInfo::new(key.clone(), Some(1), Vec::new())) })
    }
}

/// An envelope over [`RingKms`], sealing to `bench:records`.
pub fn envelope() -> Envelope {
    let keyring = Keyring::builder()
        .provider(Arc::new(RingKms::new()))
        .recipient("bench:records".parse().unwrap())
        .build()
        .unwrap();
    Envelope::new(keyring)
}

/// [`envelope`] with the data-key cache on for sealing and opening, with
/// limits no bench reaches: every record after the first is a cache hit
/// (policy check and event included, as on every hit).
pub fn cached_envelope() -> Envelope {
    use phi_envelope::cache::{CacheConfig, CacheLimits};
    let limits = CacheLimits::new(
        std::time::Duration::from_secs(3600),
        u64::MAX / 2,
        u64::MAX / 2,
    );
    let keyring = Keyring::builder()
        .provider(Arc::new(RingKms::new()))
        .recipient("bench:records".parse().unwrap())
        .data_key_cache(CacheConfig::new().encrypt(limits).decrypt(limits))
        .build()
        .unwrap();
    Envelope::new(keyring)
}

/// The encryption context every bench uses.
pub fn context() -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_type", "lab-result")
        .unwrap()
}

/// Measures the CPU time of the calling thread
/// (`CLOCK_THREAD_CPUTIME_ID`), in the units of wall time.
pub struct ThreadCpu(WallTime);

impl Measurement for ThreadCpu {
    type Intermediate = cpu_time::ThreadTime;
    type Value = std::time::Duration;

    fn start(&self) -> Self::Intermediate {
        cpu_time::ThreadTime::now()
    }
    fn end(&self, start: Self::Intermediate) -> Self::Value {
        start.elapsed()
    }
    fn add(&self, a: &Self::Value, b: &Self::Value) -> Self::Value {
        *a + *b
    }
    fn zero(&self) -> Self::Value {
        std::time::Duration::ZERO
    }
    fn to_f64(&self, value: &Self::Value) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

/// True when `PHI_BENCH_CLOCK=cpu`: thread CPU time, single-thread benches.
pub fn cpu_clock() -> bool {
    std::env::var("PHI_BENCH_CLOCK").is_ok_and(|v| v == "cpu")
}

/// Criterion on the thread's CPU clock.
pub fn cpu_criterion() -> Criterion<ThreadCpu> {
    Criterion::default()
        .with_measurement(ThreadCpu(WallTime))
        .configure_from_args()
}
