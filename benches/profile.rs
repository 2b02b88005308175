//! Not a benchmark: fixed workloads to run under a profiler
//! (`valgrind --tool=callgrind`, `perf`) or `/usr/bin/time -v`, as
//! `scripts/bench.sh` does for `docs/PERFORMANCE.md`.
//!
//! ```text
//! profile record-cached N SIZE   N seals with a SealingKey built once
//! profile record-floor N SIZE    N times: salt, HKDF-Expand, key setup, seal
//! profile record-open N SIZE     N message::open with the DEK in hand
//! profile envelope-cached N SIZE N Envelope::seal through the data-key cache
//! profile envelope-open N SIZE  N Envelope::open through the decryption cache
//! profile raw-seal MIB           ring seal over MIB MiB in 16 KiB chunks
//! profile stream-seal MIB        Encryptor over MIB MiB to io::sink()
//! profile engine-seal MIB T      file engine over MIB MiB, T threads
//! profile file-roundtrip DIR MIB T
//!                                encrypt_file + decrypt_file of a MIB MiB
//!                                file in DIR, T threads (for peak RSS)
//! profile cpu-scaling            the file engine on 1 and 2 threads (on
//!                                PHI_SCALING_MIB MiB, default 64): wall
//!                                time and CPU time of the whole process, so
//!                                the cost of going parallel shows even when
//!                                other processes hold the cores
//! profile cpu-table              single-thread figures in CPU time of the
//!                                thread (from /proc/thread-self/schedstat),
//!                                which time slices lost to other processes
//!                                do not inflate: the ratios on a busy machine
//! ```

use std::io::{self, Write};

use phi_envelope::file::{self, FileOptions};
use phi_envelope::message::{self, SealingKey};
use phi_envelope::{Dek, WrappedKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

mod support;
use support::{block_on, context, data};

fn sealing_key() -> (Dek, SealingKey) {
    let dek = Dek::from_slice(&[0x22; 32]).unwrap();
    let entry = WrappedKey {
        provider: "bench".into(),
        key_ref: "bench:records".into(),
        key_version: 1,
        wrapped: vec![0xAA; 60],
    };
    let key = SealingKey::new(&dek, vec![entry]).unwrap();
    (dek, key)
}

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i)
        .map_or(default, |s| s.parse().expect("a number"))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let ctx = context();
    let (dek, key) = sealing_key();
    match args.first().map(String::as_str) {
        Some("record-cached") => {
            let pt = data(arg(&args, 2, 1024));
            for _ in 0..arg(&args, 1, 100_000) {
                std::hint::black_box(key.seal(&pt, &ctx).unwrap());
            }
        }
        Some("record-floor") => {
            struct Len76;
            impl hkdf::KeyType for Len76 {
                fn len(&self) -> usize {
                    76
                }
            }
            let pt = data(arg(&args, 2, 1024));
            let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA512, dek.expose_secret());
            let rng = SystemRandom::new();
            let body_ctx = ctx.canonical_pairs();
            for _ in 0..arg(&args, 1, 100_000) {
                let mut salt = [0u8; 24];
                rng.fill(&mut salt).unwrap();
                let mut okm = [0u8; 76];
                prk.expand(
                    &[
                        b"c2sp.org/chunked-encryption@v1+",
                        b"AEAD_AES_256_GCM",
                        &[0],
                        &salt,
                        &body_ctx,
                    ],
                    Len76,
                )
                .unwrap()
                .fill(&mut okm)
                .unwrap();
                let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &okm[..32]).unwrap());
                let mut out = pt.clone();
                let nonce = Nonce::assume_unique_for_key(okm[32..44].try_into().unwrap());
                let tag = k
                    .seal_in_place_separate_tag(nonce, Aad::empty(), &mut out)
                    .unwrap();
                out.extend_from_slice(tag.as_ref());
                std::hint::black_box(out);
            }
        }
        Some("envelope-cached") => {
            let env = support::cached_envelope();
            let pt = data(arg(&args, 2, 1024));
            for _ in 0..arg(&args, 1, 100_000) {
                std::hint::black_box(block_on(env.seal(&pt, &ctx)).unwrap());
            }
        }
        Some("envelope-open") => {
            let env = support::cached_envelope();
            let sealed = block_on(env.seal(&data(arg(&args, 2, 1024)), &ctx)).unwrap();
            for _ in 0..arg(&args, 1, 100_000) {
                std::hint::black_box(block_on(env.open(&sealed, &ctx)).unwrap());
            }
        }
        Some("record-open") => {
            let sealed = key.seal(&data(arg(&args, 2, 1024)), &ctx).unwrap();
            for _ in 0..arg(&args, 1, 100_000) {
                std::hint::black_box(message::open(&sealed, &dek, &ctx).unwrap());
            }
        }
        Some("raw-seal") => {
            let mut buf = data(arg(&args, 1, 256) << 20);
            let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1; 32]).unwrap());
            for (i, c) in buf.chunks_mut(16 * 1024).enumerate() {
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let tag = k
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), c)
                    .unwrap();
                let _ = std::hint::black_box(tag);
            }
        }
        Some("stream-seal") => {
            let pt = data(arg(&args, 1, 256) << 20);
            let mut enc = key.encryptor(io::sink(), &ctx).unwrap();
            enc.write_all(&pt).unwrap();
            enc.finish().unwrap();
        }
        Some("engine-seal") => {
            let pt = data(arg(&args, 1, 256) << 20);
            let opts = FileOptions::new().threads(arg(&args, 2, 1));
            file::encrypt_with_key(&key, &pt[..], io::sink(), &ctx, &opts).unwrap();
        }
        Some("file-roundtrip") => {
            let dir = std::path::PathBuf::from(args.get(1).expect("a directory"));
            let mib = arg(&args, 2, 1024);
            let opts = FileOptions::new().threads(arg(&args, 3, 0)).overwrite(true);
            let (plain, sealed, back) = (
                dir.join("profile-plain"),
                dir.join("profile-sealed"),
                dir.join("profile-restored"),
            );
            // Written in 1 MiB pieces so that making the file costs no RSS.
            let mut f = io::BufWriter::new(std::fs::File::create(&plain).unwrap());
            let piece = data(1 << 20);
            for _ in 0..mib {
                f.write_all(&piece).unwrap();
            }
            f.into_inner().unwrap().sync_all().unwrap();
            let env = support::envelope();
            let t = std::time::Instant::now();
            let r = block_on(env.encrypt_file(&plain, &sealed, &ctx, &opts)).unwrap();
            let enc = t.elapsed();
            let t = std::time::Instant::now();
            block_on(env.decrypt_file(&sealed, &back, &ctx, &opts)).unwrap();
            let dec = t.elapsed();
            eprintln!(
                "{mib} MiB, {} threads: encrypt {:.2?} ({:.2} GiB/s), decrypt {:.2?} ({:.2} GiB/s)",
                r.threads,
                enc,
                mib as f64 / 1024.0 / enc.as_secs_f64(),
                dec,
                mib as f64 / 1024.0 / dec.as_secs_f64()
            );
            for p in [plain, sealed, back] {
                std::fs::remove_file(p).unwrap();
            }
        }
        Some("cpu-table") => cpu_table(),
        Some("cpu-scaling") => cpu_scaling(),
        _ => {
            eprintln!("usage: see the top of benches/profile.rs");
            std::process::exit(2);
        }
    }
}

/// Nanoseconds this thread has run on a CPU, or `None` without schedstat.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// CPU nanoseconds per call of `f`: the best of 7 trials of `iters` calls.
fn cpu_ns(iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters.div_ceil(4) {
        f();
    }
    (0..7)
        .map(|_| {
            let t = thread_cpu_ns().expect("/proc/thread-self/schedstat");
            for _ in 0..iters {
                f();
            }
            (thread_cpu_ns().unwrap() - t) as f64 / f64::from(iters)
        })
        .fold(f64::INFINITY, f64::min)
}

fn cpu_table() {
    use envelopers::{
        Aes256Gcm, CacheOptions, CachingKeyWrapper, EnvelopeCipher, SimpleKeyProvider,
    };
    use io::Read;
    use phi_envelope::message::OpeningKey;
    use phi_envelope::Header;

    const LEN: usize = 16 << 20;
    const CHUNK: usize = 16 * 1024;
    let ctx = context();
    let (dek, key) = sealing_key();
    let pt = data(LEN);
    let ring = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1; 32]).unwrap());
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let gib = |ns: f64| LEN as f64 / ns / 1.073_741_824;
    println!("single thread, CPU time of the thread, best of 7 ({LEN} bytes for streams)");
    println!("{:34} {:>10} {:>8}", "workload", "GiB/s", "ratio");

    let mut buf = pt.clone();
    let raw_seal = cpu_ns(8, || {
        for (i, c) in buf.chunks_mut(CHUNK).enumerate() {
            let _ = std::hint::black_box(
                ring.seal_in_place_separate_tag(nonce(i), Aad::empty(), c)
                    .unwrap(),
            );
        }
    });
    let mut scratch = vec![0u8; CHUNK];
    let raw_copy_seal = cpu_ns(8, || {
        for (i, c) in pt.chunks(CHUNK).enumerate() {
            let s = &mut scratch[..c.len()];
            s.copy_from_slice(c);
            let _ = std::hint::black_box(
                ring.seal_in_place_separate_tag(nonce(i), Aad::empty(), s)
                    .unwrap(),
            );
        }
    });
    let stream_seal = cpu_ns(8, || {
        let mut enc = key.encryptor(io::sink(), &ctx).unwrap();
        enc.write_all(&pt).unwrap();
        enc.finish().unwrap();
    });
    let opts = FileOptions::new().threads(1);
    let engine_seal = cpu_ns(8, || {
        file::encrypt_with_key(&key, &pt[..], io::sink(), &ctx, &opts).unwrap();
    });
    for (name, ns) in [
        ("seal raw-ring (baseline)", raw_seal),
        ("seal raw-ring-copy", raw_copy_seal),
        ("seal stream-1t (Encryptor)", stream_seal),
        ("seal engine-1t", engine_seal),
    ] {
        println!("{name:34} {:>10.2} {:>7.2}x", gib(ns), raw_seal / ns);
    }

    let mut ring_sealed = Vec::new();
    for (i, c) in pt.chunks(CHUNK).enumerate() {
        let mut c = c.to_vec();
        let tag = ring
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut c)
            .unwrap();
        ring_sealed.extend_from_slice(&c);
        ring_sealed.extend_from_slice(tag.as_ref());
    }
    let mut scratch = vec![0u8; CHUNK + 16];
    let raw_open = cpu_ns(8, || {
        for (i, c) in ring_sealed.chunks(CHUNK + 16).enumerate() {
            let s = &mut scratch[..c.len()];
            s.copy_from_slice(c);
            let _ = std::hint::black_box(ring.open_in_place(nonce(i), Aad::empty(), s).unwrap());
        }
    });
    let mut message = Vec::new();
    file::encrypt_with_key(&key, &pt[..], &mut message, &ctx, &opts).unwrap();
    let (header, used) = Header::parse(&message).unwrap();
    let body = &message[used..];
    let opening = OpeningKey::new(&dek, &header).unwrap();
    let mut out = vec![0u8; 1 << 20];
    let stream_open = cpu_ns(8, || {
        let mut dec = opening.decryptor(body, &ctx).unwrap();
        while dec.read(&mut out).unwrap() > 0 {}
    });
    let engine_open = cpu_ns(8, || {
        file::decrypt_with_key(&opening, body, io::sink(), &ctx, &opts).unwrap();
    });
    for (name, ns) in [
        ("open raw-ring (baseline)", raw_open),
        ("open stream-1t (Decryptor)", stream_open),
        ("open engine-1t", engine_open),
    ] {
        println!("{name:34} {:>10.2} {:>7.2}x", gib(ns), raw_open / ns);
    }

    println!();
    println!(
        "{:34} {:>10} {:>8} {:>12}",
        "1 KiB record", "k/s", "/floor", "/envelopers"
    );
    let rec = data(1024);
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA512, dek.expose_secret());
    let rng = SystemRandom::new();
    let body_ctx = ctx.canonical_pairs();
    struct Len76;
    impl hkdf::KeyType for Len76 {
        fn len(&self) -> usize {
            76
        }
    }
    let floor = cpu_ns(20_000, || {
        let mut salt = [0u8; 24];
        rng.fill(&mut salt).unwrap();
        let mut okm = [0u8; 76];
        prk.expand(
            &[
                b"c2sp.org/chunked-encryption@v1+",
                b"AEAD_AES_256_GCM",
                &[0],
                &salt,
                &body_ctx,
            ],
            Len76,
        )
        .unwrap()
        .fill(&mut okm)
        .unwrap();
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &okm[..32]).unwrap());
        let mut out = Vec::with_capacity(24 + 32 + rec.len() + 16);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&okm[44..]);
        out.extend_from_slice(&rec);
        let n = Nonce::assume_unique_for_key(okm[32..44].try_into().unwrap());
        let tag = k
            .seal_in_place_separate_tag(n, Aad::empty(), &mut out[56..])
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        std::hint::black_box(out);
    });
    let big = CacheOptions::default()
        .with_max_age(std::time::Duration::from_secs(3600))
        .with_max_bytes(usize::MAX / 2)
        .with_max_messages(usize::MAX / 2);
    let peer: EnvelopeCipher<CachingKeyWrapper<Aes256Gcm, SimpleKeyProvider<Aes256Gcm>>> =
        EnvelopeCipher::init(CachingKeyWrapper::new(
            SimpleKeyProvider::init([5; 16]),
            big,
        ));
    let peer_seal = cpu_ns(20_000, || {
        std::hint::black_box(block_on(peer.encrypt(&rec)).unwrap());
    });
    let ours_seal = cpu_ns(20_000, || {
        std::hint::black_box(key.seal(&rec, &ctx).unwrap());
    });
    let peer_default: EnvelopeCipher<CachingKeyWrapper<Aes256Gcm, SimpleKeyProvider<Aes256Gcm>>> =
        EnvelopeCipher::init(CachingKeyWrapper::new(
            SimpleKeyProvider::init([5; 16]),
            CacheOptions::default(),
        ));
    let peer_default_seal = cpu_ns(20_000, || {
        std::hint::black_box(block_on(peer_default.encrypt(&rec)).unwrap());
    });
    let peer_fresh: EnvelopeCipher<SimpleKeyProvider<Aes256Gcm>> =
        EnvelopeCipher::init(SimpleKeyProvider::init([5; 16]));
    let peer_fresh_seal = cpu_ns(20_000, || {
        std::hint::black_box(block_on(peer_fresh.encrypt(&rec)).unwrap());
    });
    let fresh_rec = block_on(peer_fresh.encrypt(&rec)).unwrap();
    let peer_fresh_open = cpu_ns(20_000, || {
        std::hint::black_box(block_on(peer_fresh.decrypt(&fresh_rec)).unwrap());
    });
    let sealed = key.seal(&rec, &ctx).unwrap();
    let peer_rec = block_on(peer.encrypt(&rec)).unwrap();
    let peer_open = cpu_ns(20_000, || {
        std::hint::black_box(block_on(peer.decrypt(&peer_rec)).unwrap());
    });
    let ours_open = cpu_ns(20_000, || {
        std::hint::black_box(message::open(&sealed, &dek, &ctx).unwrap());
    });
    let (h, used) = Header::parse(&sealed).unwrap();
    let ok = OpeningKey::new(&dek, &h).unwrap();
    let ours_open_hdr = cpu_ns(20_000, || {
        let (_, u) = Header::parse(&sealed).unwrap();
        debug_assert_eq!(u, used);
        std::hint::black_box(ok.open(&sealed[u..], &ctx).unwrap());
    });
    let row = |name: &str, ns: f64, peer: Option<f64>| {
        let p = peer.map_or("-".to_string(), |p| format!("{:.2}x", p / ns));
        println!(
            "{name:34} {:>10.0} {:>7.2}x {:>12}",
            1e6 / ns,
            floor / ns,
            p
        );
    };
    println!("(ratios to envelopers: its cache holding the DEK / a fresh DEK per record)");
    let row2 = |name: &str, ns: f64, a: f64, b: f64| {
        println!(
            "{name:34} {:>10.0} {:>7.2}x {:>5.2}x / {:.2}x",
            1e6 / ns,
            floor / ns,
            a / ns,
            b / ns
        );
    };
    row("seal floor", floor, None);
    row2(
        "seal ours-cached (SealingKey)",
        ours_seal,
        peer_seal,
        peer_fresh_seal,
    );
    row("seal envelopers-cached", peer_seal, None);
    row("seal envelopers-default-cache", peer_default_seal, None);
    row("seal envelopers-fresh", peer_fresh_seal, None);
    row2(
        "open ours-cached (DEK in hand)",
        ours_open,
        peer_open,
        peer_fresh_open,
    );
    row2(
        "open ours-cached-hdr (OpeningKey)",
        ours_open_hdr,
        peer_open,
        peer_fresh_open,
    );
    row("open envelopers-cached", peer_open, None);
    row("open envelopers-fresh", peer_fresh_open, None);
}

fn cpu_scaling() {
    use phi_envelope::message::OpeningKey;
    use phi_envelope::Header;

    // PHI_SCALING_MIB sets the size (default 64 MiB).
    let len = std::env::var("PHI_SCALING_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(64)
        << 20;
    let ctx = context();
    let (dek, key) = sealing_key();
    let pt = data(len);
    let mut message = Vec::new();
    file::encrypt_with_key(&key, &pt[..], &mut message, &ctx, &FileOptions::new()).unwrap();
    let (header, used) = Header::parse(&message).unwrap();
    let opening = OpeningKey::new(&dek, &header).unwrap();
    println!("file engine, {len} bytes in memory to io::sink(), best of 5");
    println!(
        "{:10} {:>8} {:>12} {:>12} {:>14}",
        "op", "threads", "wall GiB/s", "CPU GiB/s", "CPU vs 1 thread"
    );
    for op in ["seal", "open"] {
        let mut cpu1 = 0.0;
        for threads in [1, 2] {
            let opts = FileOptions::new().threads(threads);
            let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..5 {
                let (w, c) = (std::time::Instant::now(), cpu_time::ProcessTime::now());
                if op == "seal" {
                    file::encrypt_with_key(&key, &pt[..], io::sink(), &ctx, &opts).unwrap();
                } else {
                    file::decrypt_with_key(&opening, &message[used..], io::sink(), &ctx, &opts)
                        .unwrap();
                }
                cpu = cpu.min(c.elapsed().as_secs_f64());
                wall = wall.min(w.elapsed().as_secs_f64());
            }
            if threads == 1 {
                cpu1 = cpu;
            }
            let gib = |s: f64| len as f64 / s / (1u64 << 30) as f64;
            println!(
                "{op:10} {threads:>8} {:>12.2} {:>12.2} {:>13.2}x",
                gib(wall),
                gib(cpu),
                cpu / cpu1
            );
        }
    }
}
