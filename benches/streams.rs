//! Streams and files: phi-envelope against raw `ring` AES-256-GCM over the
//! same 16 KiB chunks of the same data, and against the `age` crate, in one
//! run. `scripts/bench.sh` turns the results into the ratio table of
//! `docs/PERFORMANCE.md`.
//!
//! Groups (throughput in bytes of plaintext):
//! - `stream-seal`, `stream-open`: the 16 MiB data set in memory, output to
//!   `io::sink()` (sealing) or into a reused 1 MiB buffer (opening).
//!   - `raw-ring`: ring's `seal_in_place_separate_tag` over each 16 KiB
//!     chunk, in place; opening copies each sealed chunk into a scratch
//!     buffer first (open is destructive, so one copy is the minimum any
//!     decoder that leaves its input intact needs) and calls
//!     `open_in_place`.
//!   - `raw-ring-copy` (sealing): copy each chunk into a scratch buffer,
//!     then seal it in place: the least any sealer that leaves its input
//!     intact does on ring, which has no out-of-place seal.
//!   - `raw-ring-2t`: the same split over two threads: the ceiling of both
//!     cores.
//!   - `stream-1t`: our `Encryptor` / `Decryptor` (the `Write`/`Read`
//!     adapters) on one thread.
//!   - `engine-1t`, `engine-2t`: the file engine (`file::encrypt_with_key`,
//!     `file::decrypt_with_key`) reading a `&[u8]`, on one and two workers.
//!   - `age-1t`: the `age` crate (X25519 recipient, ChaCha20-Poly1305 in
//!     64 KiB chunks), one thread.
//! - `engine-seal`, `engine-open`: the file engine over 256 MiB in memory
//!   (past every cache), one and two workers: the two-core scaling figure.
//! - `engine-ceiling`: the same 256 MiB sealed in place by raw ring, and
//!   copied by `copy_from_slice`, on one and two threads: what the machine
//!   itself gives (the engine's seal is a copy plus a seal).
//! - `file-seal`, `file-open`: `Envelope::encrypt_file` / `decrypt_file`
//!   of a 64 MiB file in `/dev/shm` (tmpfs: the page-cache copies in and
//!   out, no disk), one and two workers, a provider call included.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion, Throughput};
use phi_envelope::file::{self, FileOptions};
use phi_envelope::message::{OpeningKey, SealingKey};
use phi_envelope::{Dek, Header, WrappedKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

mod support;
use support::{block_on, context, data};

const DATA_LEN: usize = 16 << 20;
/// Size of the files of the `file-*` benches.
const FILE_LEN: usize = 64 << 20;
const CHUNK: usize = 16 * 1024;
const TAG: usize = 16;

fn ring_key() -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x11; 32]).unwrap())
}

fn nonce(i: usize) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&(i as u64).to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Raw ring: seal every 16 KiB chunk of `buf` in place.
fn ring_seal(key: &LessSafeKey, buf: &mut [u8], first: usize) {
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        let tag = key
            .seal_in_place_separate_tag(nonce(first + i), Aad::empty(), chunk)
            .unwrap();
        let _ = black_box(tag);
    }
}

/// Raw ring: copy each sealed chunk into `scratch` and open it in place.
fn ring_open(key: &LessSafeKey, sealed: &[u8], scratch: &mut [u8], first: usize) {
    for (i, chunk) in sealed.chunks(CHUNK + TAG).enumerate() {
        let s = &mut scratch[..chunk.len()];
        s.copy_from_slice(chunk);
        let pt = key
            .open_in_place(nonce(first + i), Aad::empty(), s)
            .unwrap();
        let _ = black_box(pt);
    }
}

/// Runs `f` over `t` equal parts of `buf` (whole chunks) on `t` threads;
/// `f` gets a part and the index of its first chunk.
fn split(buf: &mut [u8], t: usize, f: impl Fn(&mut [u8], usize) + Sync) {
    let part = buf.len() / t / CHUNK * CHUNK;
    std::thread::scope(|s| {
        for (i, p) in buf.chunks_mut(part).enumerate() {
            let f = &f;
            s.spawn(move || f(p, i * part / CHUNK));
        }
    })
}

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

fn streams<M: Measurement>(c: &mut Criterion<M>) {
    let wall = !support::cpu_clock();
    let pt = data(DATA_LEN);
    let ctx = context();
    let (dek, key) = sealing_key();
    let ring = ring_key();

    // Sealed forms of the same data, for the open benches.
    let mut message = Vec::new();
    file::encrypt_with_key(&key, &pt[..], &mut message, &ctx, &FileOptions::new()).unwrap();
    let (header, used) = Header::parse(&message).unwrap();
    let body = &message[used..];
    let opening = OpeningKey::new(&dek, &header).unwrap();
    let mut ring_sealed = Vec::with_capacity(DATA_LEN + DATA_LEN / CHUNK * TAG);
    for (i, chunk) in pt.chunks(CHUNK).enumerate() {
        let mut c = chunk.to_vec();
        let tag = ring
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut c)
            .unwrap();
        ring_sealed.extend_from_slice(&c);
        ring_sealed.extend_from_slice(tag.as_ref());
    }
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public();
    let age_sealed = {
        let enc = age::Encryptor::with_recipients(std::iter::once(&recipient as _)).unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(&pt).unwrap();
        w.finish().unwrap();
        out
    };

    let mut g = c.benchmark_group("stream-seal");
    g.throughput(Throughput::Bytes(DATA_LEN as u64));
    g.sample_size(20);
    let mut buf = pt.clone();
    g.bench_function("raw-ring", |b| b.iter(|| ring_seal(&ring, &mut buf, 0)));
    let mut scratch = vec![0u8; CHUNK + TAG];
    g.bench_function("raw-ring-copy", |b| {
        b.iter(|| {
            for (i, chunk) in pt.chunks(CHUNK).enumerate() {
                let s = &mut scratch[..chunk.len()];
                s.copy_from_slice(chunk);
                let tag = ring
                    .seal_in_place_separate_tag(nonce(i), Aad::empty(), s)
                    .unwrap();
                let _ = black_box(tag);
            }
        })
    });
    if wall {
        g.bench_function("raw-ring-2t", |b| {
            b.iter(|| {
                let (a, z) = buf.split_at_mut(DATA_LEN / 2);
                std::thread::scope(|s| {
                    s.spawn(|| ring_seal(&ring, a, 0));
                    ring_seal(&ring, z, DATA_LEN / 2 / CHUNK);
                })
            })
        });
    }
    g.bench_function("stream-1t", |b| {
        b.iter(|| {
            let mut enc = key.encryptor(io::sink(), &ctx).unwrap();
            enc.write_all(&pt).unwrap();
            enc.finish().unwrap();
        })
    });
    for threads in [1, 2].into_iter().filter(|&t| wall || t == 1) {
        let opts = FileOptions::new().threads(threads);
        g.bench_function(BenchmarkId::new("engine", format!("{threads}t")), |b| {
            b.iter(|| file::encrypt_with_key(&key, &pt[..], io::sink(), &ctx, &opts).unwrap())
        });
    }
    g.bench_function("age-1t", |b| {
        b.iter(|| {
            let enc = age::Encryptor::with_recipients(std::iter::once(&recipient as _)).unwrap();
            let mut w = enc.wrap_output(io::sink()).unwrap();
            w.write_all(&pt).unwrap();
            w.finish().unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("stream-open");
    g.throughput(Throughput::Bytes(DATA_LEN as u64));
    g.sample_size(20);
    let mut scratch = vec![0u8; CHUNK + TAG];
    g.bench_function("raw-ring", |b| {
        b.iter(|| ring_open(&ring, &ring_sealed, &mut scratch, 0))
    });
    if wall {
        g.bench_function("raw-ring-2t", |b| {
            let half = DATA_LEN / 2 / CHUNK * (CHUNK + TAG);
            let (a, z) = ring_sealed.split_at(half);
            b.iter(|| {
                std::thread::scope(|s| {
                    s.spawn(|| ring_open(&ring, a, &mut vec![0u8; CHUNK + TAG], 0));
                    ring_open(&ring, z, &mut vec![0u8; CHUNK + TAG], DATA_LEN / 2 / CHUNK);
                })
            })
        });
    }
    let mut out = vec![0u8; 1 << 20];
    g.bench_function("stream-1t", |b| {
        b.iter(|| {
            let mut dec = opening.decryptor(body, &ctx).unwrap();
            while dec.read(&mut out).unwrap() > 0 {}
        })
    });
    for threads in [1, 2].into_iter().filter(|&t| wall || t == 1) {
        let opts = FileOptions::new().threads(threads);
        g.bench_function(BenchmarkId::new("engine", format!("{threads}t")), |b| {
            b.iter(|| file::decrypt_with_key(&opening, body, io::sink(), &ctx, &opts).unwrap())
        });
    }
    g.bench_function("age-1t", |b| {
        b.iter(|| {
            let dec = age::Decryptor::new_buffered(&age_sealed[..]).unwrap();
            let mut r = dec
                .decrypt(std::iter::once(&identity as &dyn age::Identity))
                .unwrap();
            while r.read(&mut out).unwrap() > 0 {}
        })
    });
    g.finish();
}

/// The file engine on file-sized data held in memory (256 MiB, past the
/// caches), one and two workers: the scaling figure, without the fixed
/// per-call cost (thread start, first touch of the buffers) that a 16 MiB
/// input still shows.
fn engine<M: Measurement>(c: &mut Criterion<M>) {
    const LEN: usize = 256 << 20;
    let pt = data(LEN);
    let ctx = context();
    let (dek, key) = sealing_key();
    let mut message = Vec::new();
    file::encrypt_with_key(&key, &pt[..], &mut message, &ctx, &FileOptions::new()).unwrap();
    let (header, used) = Header::parse(&message).unwrap();
    let opening = OpeningKey::new(&dek, &header).unwrap();
    let threads: &[usize] = if support::cpu_clock() { &[1] } else { &[1, 2] };
    // The ceilings of the same 256 MiB on this machine: the raw cipher in
    // place, and a plain copy (what reading from memory costs at least),
    // on one and two threads.
    let mut g = c.benchmark_group("engine-ceiling");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10);
    let ring = ring_key();
    let mut buf = pt.clone();
    let mut dst = vec![0u8; LEN];
    for &t in threads {
        g.bench_function(format!("raw-ring-{t}t"), |b| {
            b.iter(|| split(&mut buf, t, |part, first| ring_seal(&ring, part, first)))
        });
        g.bench_function(format!("memcpy-{t}t"), |b| {
            b.iter(|| {
                std::thread::scope(|s| {
                    let parts = dst.chunks_mut(LEN / t).zip(pt.chunks(LEN / t));
                    for (d, src) in parts {
                        s.spawn(move || d.copy_from_slice(black_box(src)));
                    }
                })
            })
        });
    }
    g.finish();
    for op in ["seal", "open"] {
        let mut g = c.benchmark_group(format!("engine-{op}"));
        g.throughput(Throughput::Bytes(LEN as u64));
        g.sample_size(10);
        for &t in threads {
            let opts = FileOptions::new().threads(t);
            g.bench_function(format!("{t}t"), |b| {
                b.iter(|| {
                    if op == "seal" {
                        file::encrypt_with_key(&key, &pt[..], io::sink(), &ctx, &opts).unwrap()
                    } else {
                        file::decrypt_with_key(&opening, &message[used..], io::sink(), &ctx, &opts)
                            .unwrap()
                    }
                })
            });
        }
        g.finish();
    }
}

/// A scratch directory on tmpfs when there is one.
fn scratch_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn files<M: Measurement>(c: &mut Criterion<M>) {
    if support::cpu_clock() {
        return; // several threads: wall time only
    }
    let env = support::envelope();
    let ctx = context();
    let dir = scratch_dir();
    let (plain, sealed, restored) = (
        dir.path().join("plain"),
        dir.path().join("sealed"),
        dir.path().join("restored"),
    );
    std::fs::write(&plain, data(FILE_LEN)).unwrap();
    let opts = FileOptions::new().overwrite(true);
    block_on(env.encrypt_file(&plain, &sealed, &ctx, &opts)).unwrap();
    let enc_out = dir.path().join("sealed2");

    let mut g = c.benchmark_group("file-seal");
    g.throughput(Throughput::Bytes(FILE_LEN as u64));
    g.sample_size(20);
    // The floor of a durable file write: the bytes copied into a new file,
    // synced and renamed into place, as `encrypt_file` commits its output.
    let bytes = data(FILE_LEN);
    let tmp = dir.path().join("floor.tmp");
    let floor = dir.path().join("floor");
    g.bench_function("write-sync-rename", |b| {
        b.iter(|| {
            let mut f = std::fs::File::create(&tmp).unwrap();
            f.write_all(&bytes).unwrap();
            f.sync_all().unwrap();
            std::fs::rename(&tmp, &floor).unwrap();
        })
    });
    for threads in [1, 2] {
        let opts = opts.clone().threads(threads);
        g.bench_function(BenchmarkId::new("file", format!("{threads}t")), |b| {
            b.iter(|| block_on(env.encrypt_file(&plain, &enc_out, &ctx, &opts)).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("file-open");
    g.throughput(Throughput::Bytes(FILE_LEN as u64));
    g.sample_size(20);
    for threads in [1, 2] {
        let opts = opts.clone().threads(threads);
        g.bench_function(BenchmarkId::new("file", format!("{threads}t")), |b| {
            b.iter(|| block_on(env.decrypt_file(&sealed, &restored, &ctx, &opts)).unwrap())
        });
    }
    g.finish();
}

fn main() {
    if support::cpu_clock() {
        let mut c = support::cpu_criterion();
        streams(&mut c);
        engine(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        streams(&mut c);
        engine(&mut c);
        files(&mut c);
        c.final_summary();
    }
}
