//! Records: sealing and opening one message of 64 B, 1 KiB and 16 KiB, with
//! a cached DEK and with a fresh one, against the floor of our design and
//! the Rust envelope crates a user might pick instead (`envelopers`,
//! `kms-aead`), in one run. `scripts/bench.sh` turns the results into the
//! ratio table of `docs/PERFORMANCE.md`.
//!
//! Every function returns the sealed message as bytes (or the plaintext),
//! so allocation of the output is included everywhere.
//!
//! `record-seal/SIZE`:
//! - `raw-aead`: ring AES-256-GCM seal with a key set up once (the AEAD
//!   alone, for reference).
//! - `floor`: the floor of our design, by hand on ring: a 24-byte salt from
//!   the OS RNG, HKDF-Expand-SHA-512 to 76 bytes (from an HMAC state made
//!   once per DEK), AES-256 key setup, one seal.
//! - `ours-cached`: `message::SealingKey::seal` with the key built once:
//!   what the data-key cache holds (header and its tag, HKDF state).
//! - `ours-fresh`: `Envelope::seal` through the keyring and a provider that
//!   wraps with ring in memory (a fresh DEK, generated and wrapped, per
//!   record; policy check and event included).
//! - `envelope-cached`: `Envelope::seal` / `Envelope::open` with the
//!   keyring's data-key cache on (limits never reached): the cached path a
//!   service uses, with the policy check and the event of every cache hit.
//! - `envelopers-cached` / `envelopers-fresh`: `EnvelopeCipher` over
//!   `CachingKeyWrapper<SimpleKeyProvider>` (limits set so the DEK stays
//!   cached) / over `SimpleKeyProvider`, AES-256-GCM, returning its
//!   `EncryptedRecord` struct (not bytes: the stricter comparison for us).
//!   `envelopers-cached-bytes` adds its own serialisation (`to_vec`, CBOR,
//!   which writes a byte string as an array of integers, about 10 ns per
//!   byte), which is what storing the record costs with that crate.
//! - `kms-aead-cached` / `kms-aead-fresh`: `KmsAeadRingEnvelopeEncryption`
//!   with AES-256-GCM and a provider wrapping with ring in memory (the crate
//!   ships no local KEK provider): `encrypt_value_with_dek` /
//!   `encrypt_value` (a DEK generated and wrapped per record).
//!
//! - `esdk-committing` / `esdk-default`: the AWS Encryption SDK for Rust
//!   (`aws-esdk`) with a raw AES keyring (AES-256-GCM wrapping key in
//!   memory) and the same encryption context: the committing suite without
//!   signing (`AlgAes256GcmHkdfSha512CommitKey`) and the SDK's default
//!   (`AlgAes256GcmHkdfSha512CommitKeyEcdsaP384`, an ECDSA P-384 signature
//!   per message). A fresh data key per message: the raw keyring has no
//!   cache, and the SDK's caching materials manager is not what a raw
//!   keyring user gets by default.
//!
//! The bench prints each format's message overhead in bytes (sealed length
//! minus plaintext length) on stderr before it runs.
//!
//! `record-open/SIZE`: the same, opening: `raw-aead` (ring open of a copy),
//! `ours-cached` (`message::open` with the DEK in hand: header parse and
//! tag check, HKDF, commitment, open), `ours-cached-hdr` (what a cache
//! keyed by the header bytes can hold: the header parsed, an `OpeningKey`
//! made once, so the header's HMAC is not recomputed), `ours-fresh`
//! (`Envelope::open`, one provider unwrap per record), and the peers'
//! decrypt paths.

use std::hint::black_box;
use std::time::Duration;

use async_trait::async_trait;
use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion, Throughput};
use envelopers::{
    Aes256Gcm, CacheOptions, CachingKeyWrapper, EncryptedRecord, EnvelopeCipher, SimpleKeyProvider,
};
use kms_aead::ring_encryption::RingAeadEncryption;
use kms_aead::{
    CipherText, DataEncryptionKey, EncryptedDataEncryptionKey, KmsAeadEnvelopeEncryption,
    KmsAeadResult, KmsAeadRingEncryptionProvider, KmsAeadRingEnvelopeEncryption,
};
use phi_envelope::message::{self, OpeningKey, SealingKey};
use phi_envelope::{Dek, Header, WrappedKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use secret_vault_value::SecretValue;

use aws_esdk::client::Client as EsdkClient;
use aws_esdk::material_providers::client::Client as MplClient;
use aws_esdk::material_providers::types::keyring::KeyringRef;
use aws_esdk::material_providers::types::material_providers_config::MaterialProvidersConfig;
use aws_esdk::material_providers::types::{AesWrappingAlg, EsdkAlgorithmSuiteId};
use aws_esdk::types::aws_encryption_sdk_config::AwsEncryptionSdkConfig;
use std::collections::HashMap;

mod support;
use support::{block_on, context, data};

const SIZES: [usize; 3] = [64, 1024, 16 * 1024];

/// The floor: salt, HKDF-Expand-SHA-512 to 76 bytes, AES key setup, seal.
fn floor_seal(prk: &hkdf::Prk, rng: &SystemRandom, ctx: &[u8], pt: &[u8]) -> Vec<u8> {
    struct Len76;
    impl hkdf::KeyType for Len76 {
        fn len(&self) -> usize {
            76
        }
    }
    let mut salt = [0u8; 24];
    rng.fill(&mut salt).unwrap();
    let mut okm = [0u8; 76];
    prk.expand(
        &[
            b"c2sp.org/chunked-encryption@v1+",
            b"AEAD_AES_256_GCM",
            &[0],
            &salt,
            ctx,
        ],
        Len76,
    )
    .unwrap()
    .fill(&mut okm)
    .unwrap();
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &okm[..32]).unwrap());
    let nonce: [u8; 12] = okm[32..44].try_into().unwrap();
    let mut out = Vec::with_capacity(24 + 32 + pt.len() + 16);
    out.extend_from_slice(&salt);
    out.extend_from_slice(&okm[44..]);
    let start = out.len();
    out.extend_from_slice(pt);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut out[start..],
        )
        .unwrap();
    out.extend_from_slice(tag.as_ref());
    out
}

/// kms-aead ships no local KEK provider; this one wraps DEKs with ring's
/// AES-256-GCM in memory, like ours.
struct KmsAeadLocal {
    kek: LessSafeKey,
    rng: SystemRandom,
}

#[async_trait]
impl KmsAeadRingEncryptionProvider for KmsAeadLocal {
    async fn encrypt_data_encryption_key(
        &self,
        key: &DataEncryptionKey,
    ) -> KmsAeadResult<EncryptedDataEncryptionKey> {
        let mut nonce = [0u8; 12];
        self.rng.fill(&mut nonce).unwrap();
        let mut out = nonce.to_vec();
        out.extend_from_slice(key.0.ref_sensitive_value());
        let tag = self
            .kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut out[12..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        Ok(EncryptedDataEncryptionKey::new(out, None))
    }

    async fn decrypt_data_encryption_key(
        &self,
        encrypted: &EncryptedDataEncryptionKey,
    ) -> KmsAeadResult<DataEncryptionKey> {
        let nonce: [u8; 12] = encrypted.wrapped()[..12].try_into().unwrap();
        let mut buf = encrypted.wrapped()[12..].to_vec();
        let dek = self
            .kek
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .unwrap();
        Ok(DataEncryptionKey(SecretValue::new(dek.to_vec())))
    }

    async fn generate_encryption_key(
        &self,
        aead: &RingAeadEncryption,
    ) -> KmsAeadResult<DataEncryptionKey> {
        aead.generate_data_encryption_key()
    }
}

/// The AWS Encryption SDK with a raw AES keyring and one suite.
struct Esdk {
    client: EsdkClient,
    keyring: KeyringRef,
    suite: EsdkAlgorithmSuiteId,
    context: HashMap<String, String>,
}

impl Esdk {
    fn new(suite: EsdkAlgorithmSuiteId) -> Esdk {
        let client =
            EsdkClient::from_conf(AwsEncryptionSdkConfig::builder().build().unwrap()).unwrap();
        let mpl =
            MplClient::from_conf(MaterialProvidersConfig::builder().build().unwrap()).unwrap();
        let keyring = block_on(
            mpl.create_raw_aes_keyring()
                .key_namespace("bench")
                .key_name("records")
                .wrapping_key(vec![0x77u8; 32])
                .wrapping_alg(AesWrappingAlg::AlgAes256GcmIv12Tag16)
                .send(),
        )
        .unwrap();
        let context = HashMap::from([
            ("tenant".to_owned(), "st-mary".to_owned()),
            ("record_type".to_owned(), "lab-result".to_owned()),
        ]);
        Esdk {
            client,
            keyring,
            suite,
            context,
        }
    }

    fn seal(&self, pt: &[u8]) -> Vec<u8> {
        block_on(
            self.client
                .encrypt()
                .plaintext(pt.to_vec())
                .keyring(self.keyring.clone())
                .encryption_context(self.context.clone())
                .algorithm_suite_id(self.suite)
                .send(),
        )
        .unwrap()
        .ciphertext
        .unwrap()
        .into_inner()
    }

    fn open(&self, sealed: &[u8]) -> Vec<u8> {
        block_on(
            self.client
                .decrypt()
                .ciphertext(sealed.to_vec())
                .keyring(self.keyring.clone())
                .encryption_context(self.context.clone())
                .send(),
        )
        .unwrap()
        .plaintext
        .unwrap()
        .into_inner()
    }
}

fn records<M: Measurement>(c: &mut Criterion<M>) {
    let ctx = context();
    let body_ctx = ctx.canonical_pairs();
    let rng = SystemRandom::new();
    let dek = Dek::from_slice(&[0x33; 32]).unwrap();
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA512, dek.expose_secret());
    let raw = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x44; 32]).unwrap());
    let entry = WrappedKey {
        provider: "bench".into(),
        key_ref: "bench:records".into(),
        key_version: 1,
        wrapped: vec![0xAA; 60],
    };
    let cached = SealingKey::new(&dek, vec![entry]).unwrap();
    let env = support::envelope();
    let envelope_cached = support::cached_envelope();

    let kek = [0x55u8; 16];
    let envelopers_fresh: EnvelopeCipher<SimpleKeyProvider<Aes256Gcm>> =
        EnvelopeCipher::init(SimpleKeyProvider::init(kek));
    let big = CacheOptions::default()
        .with_max_age(Duration::from_secs(3600))
        .with_max_bytes(usize::MAX / 2)
        .with_max_messages(usize::MAX / 2)
        .with_max_entries(16);
    let envelopers_cached: EnvelopeCipher<
        CachingKeyWrapper<Aes256Gcm, SimpleKeyProvider<Aes256Gcm>>,
    > = EnvelopeCipher::init(CachingKeyWrapper::new(SimpleKeyProvider::init(kek), big));

    let kms = block_on(KmsAeadRingEnvelopeEncryption::with_algorithm(
        KmsAeadLocal {
            kek: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x66; 32]).unwrap()),
            rng: SystemRandom::new(),
        },
        &AES_256_GCM,
    ))
    .unwrap();
    let (kms_dek, _) =
        block_on(KmsAeadEnvelopeEncryption::<String>::generate_new_dek(&kms)).unwrap();
    let aad = String::from("tenant=st-mary;record_type=lab-result");
    let esdk_committing = Esdk::new(EsdkAlgorithmSuiteId::AlgAes256GcmHkdfSha512CommitKey);
    let esdk_default = Esdk::new(EsdkAlgorithmSuiteId::AlgAes256GcmHkdfSha512CommitKeyEcdsaP384);
    for size in SIZES {
        let pt = data(size);
        let over = |sealed: usize| sealed - size;
        eprintln!(
            "overhead/{size}: ours {} B, envelopers (to_vec) {} B, esdk-committing {} B, esdk-default {} B",
            over(block_on(envelope_cached.seal(&pt, &ctx)).unwrap().len()),
            over(
                block_on(envelopers_cached.encrypt(&pt))
                    .unwrap()
                    .to_vec()
                    .unwrap()
                    .len()
            ),
            over(esdk_committing.seal(&pt).len()),
            over(esdk_default.seal(&pt).len()),
        );
    }

    for size in SIZES {
        let pt = data(size);
        let id = |name: &str| BenchmarkId::new(name, size);

        let mut g = c.benchmark_group("record-seal");
        g.throughput(Throughput::Elements(1));
        g.bench_function(id("raw-aead"), |b| {
            b.iter(|| {
                let mut out = pt.clone();
                let tag = raw
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key([7; 12]),
                        Aad::empty(),
                        &mut out,
                    )
                    .unwrap();
                out.extend_from_slice(tag.as_ref());
                out
            })
        });
        g.bench_function(id("floor"), |b| {
            b.iter(|| floor_seal(&prk, &rng, &body_ctx, black_box(&pt)))
        });
        g.bench_function(id("ours-cached"), |b| {
            b.iter(|| cached.seal(black_box(&pt), &ctx).unwrap())
        });
        g.bench_function(id("ours-fresh"), |b| {
            b.iter(|| block_on(env.seal(black_box(&pt), &ctx)).unwrap())
        });
        g.bench_function(id("envelope-cached"), |b| {
            b.iter(|| block_on(envelope_cached.seal(black_box(&pt), &ctx)).unwrap())
        });
        g.bench_function(id("envelopers-cached"), |b| {
            b.iter(|| block_on(envelopers_cached.encrypt(black_box(&pt))).unwrap())
        });
        g.bench_function(id("envelopers-fresh"), |b| {
            b.iter(|| block_on(envelopers_fresh.encrypt(black_box(&pt))).unwrap())
        });
        g.bench_function(id("envelopers-cached-bytes"), |b| {
            b.iter(|| {
                block_on(envelopers_cached.encrypt(black_box(&pt)))
                    .unwrap()
                    .to_vec()
                    .unwrap()
            })
        });
        g.bench_function(id("esdk-committing"), |b| {
            b.iter(|| esdk_committing.seal(black_box(&pt)))
        });
        g.bench_function(id("esdk-default"), |b| {
            b.iter(|| esdk_default.seal(black_box(&pt)))
        });
        let secret = SecretValue::new(pt.clone());
        g.bench_function(id("kms-aead-cached"), |b| {
            b.iter(|| block_on(kms.encrypt_value_with_dek(&aad, &secret, &kms_dek)).unwrap())
        });
        g.bench_function(id("kms-aead-fresh"), |b| {
            b.iter(|| block_on(kms.encrypt_value(&aad, &secret)).unwrap())
        });
        g.finish();

        // Sealed forms for the open benches.
        let mut raw_sealed = pt.clone();
        let tag = raw
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([7; 12]),
                Aad::empty(),
                &mut raw_sealed,
            )
            .unwrap();
        raw_sealed.extend_from_slice(tag.as_ref());
        let ours = cached.seal(&pt, &ctx).unwrap();
        let ours_fresh = block_on(env.seal(&pt, &ctx)).unwrap();
        let env_cached = block_on(envelopers_cached.encrypt(&pt))
            .unwrap()
            .to_vec()
            .unwrap();
        let env_fresh = block_on(envelopers_fresh.encrypt(&pt))
            .unwrap()
            .to_vec()
            .unwrap();
        let kms_cached: CipherText =
            block_on(kms.encrypt_value_with_dek(&aad, &secret, &kms_dek)).unwrap();
        let kms_fresh = block_on(kms.encrypt_value(&aad, &secret)).unwrap();

        let mut g = c.benchmark_group("record-open");
        g.throughput(Throughput::Elements(1));
        g.bench_function(id("raw-aead"), |b| {
            b.iter(|| {
                let mut buf = raw_sealed.clone();
                let n = raw
                    .open_in_place(
                        Nonce::assume_unique_for_key([7; 12]),
                        Aad::empty(),
                        &mut buf,
                    )
                    .unwrap()
                    .len();
                buf.truncate(n);
                buf
            })
        });
        g.bench_function(id("ours-cached"), |b| {
            b.iter(|| message::open(black_box(&ours), &dek, &ctx).unwrap())
        });
        let (header, _) = Header::parse(&ours).unwrap();
        let opening = OpeningKey::new(&dek, &header).unwrap();
        g.bench_function(id("ours-cached-hdr"), |b| {
            b.iter(|| {
                let (_, used) = Header::parse(black_box(&ours)).unwrap();
                opening.open(&ours[used..], &ctx).unwrap()
            })
        });
        g.bench_function(id("ours-fresh"), |b| {
            b.iter(|| block_on(env.open(black_box(&ours_fresh), &ctx)).unwrap())
        });
        let sealed_cached = block_on(envelope_cached.seal(&pt, &ctx)).unwrap();
        g.bench_function(id("envelope-cached"), |b| {
            b.iter(|| block_on(envelope_cached.open(black_box(&sealed_cached), &ctx)).unwrap())
        });
        let rec_cached = EncryptedRecord::from_vec(env_cached.clone()).unwrap();
        let rec_fresh = EncryptedRecord::from_vec(env_fresh.clone()).unwrap();
        g.bench_function(id("envelopers-cached"), |b| {
            b.iter(|| block_on(envelopers_cached.decrypt(black_box(&rec_cached))).unwrap())
        });
        g.bench_function(id("envelopers-fresh"), |b| {
            b.iter(|| block_on(envelopers_fresh.decrypt(black_box(&rec_fresh))).unwrap())
        });
        g.bench_function(id("envelopers-cached-bytes"), |b| {
            b.iter(|| {
                let rec = EncryptedRecord::from_vec(black_box(env_cached.clone())).unwrap();
                block_on(envelopers_cached.decrypt(&rec)).unwrap()
            })
        });
        let esdk_c = esdk_committing.seal(&pt);
        g.bench_function(id("esdk-committing"), |b| {
            b.iter(|| esdk_committing.open(black_box(&esdk_c)))
        });
        let esdk_d = esdk_default.seal(&pt);
        g.bench_function(id("esdk-default"), |b| {
            b.iter(|| esdk_default.open(black_box(&esdk_d)))
        });
        g.bench_function(id("kms-aead-cached"), |b| {
            b.iter(|| block_on(kms.decrypt_value_with_dek(&aad, &kms_cached, &kms_dek)).unwrap())
        });
        g.bench_function(id("kms-aead-fresh"), |b| {
            b.iter(|| block_on(kms.decrypt_value(&aad, &kms_fresh)).unwrap())
        });
        g.finish();
    }
}

fn main() {
    if support::cpu_clock() {
        let mut c = support::cpu_criterion();
        records(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        records(&mut c);
        c.final_summary();
    }
}
