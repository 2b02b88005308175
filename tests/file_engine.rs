//! The parallel file engine through the public API: round trips for every
//! boundary size and thread count, interoperability with the sequential
//! stream adapters, and what is (not) left on disk when decryption or the
//! output fails. No timing is asserted anywhere.
//!
//! Byte-identical output across thread counts is checked where the salt can
//! be fixed, in the unit tests of `src/file.rs`.

mod conformance;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use conformance::MemoryKms;
use phi_envelope::file::{FileOptions, FileReport, BATCH_CHUNKS};
use phi_envelope::{EncryptionContext, Envelope, Error, Keyring};

const CHUNK: usize = 16 * 1024;
const MIB: usize = 1 << 20;
const THREADS: [usize; 4] = [1, 2, 4, 8];

fn envelope() -> Envelope {
    let kms = Arc::new(MemoryKms::new("vault-sim"));
    let key = kms.add_key("backups");
    Envelope::new(
        Keyring::builder()
            .provider(kms)
            .recipient(key)
            .build()
            .unwrap(),
    )
    .as_caller("backup-test", "restore-drill")
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new()
        .with("backup", "2026-11-25")
        .unwrap()
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// The names in `dir`, sorted: shows leftovers such as temporary files.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

struct Files {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    plain: PathBuf,
    sealed: PathBuf,
    out: PathBuf,
}

fn files() -> Files {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    Files {
        plain: dir.join("plain.bin"),
        sealed: dir.join("plain.bin.phi"),
        out: dir.join("restored.bin"),
        _dir: d,
        dir,
    }
}

#[test]
fn files_round_trip_at_every_boundary_and_thread_count() {
    let env = envelope();
    let f = files();
    let sizes = [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        MIB - 1,
        MIB,
        MIB + 1,
        5 * MIB + 17,
    ];
    for (i, &len) in sizes.iter().enumerate() {
        let pt = data(len, i as u64 + 1);
        std::fs::write(&f.plain, &pt).unwrap();
        for (j, &enc_threads) in THREADS.iter().enumerate() {
            let opts = FileOptions::new().threads(enc_threads).overwrite(true);
            let sealed = block_on(env.encrypt_file(&f.plain, &f.sealed, &ctx(), &opts)).unwrap();
            assert_eq!(sealed.plaintext_len, len as u64);
            assert_eq!(sealed.chunks, (len / CHUNK + 1) as u64);
            assert_eq!(
                sealed.ciphertext_len,
                std::fs::metadata(&f.sealed).unwrap().len()
            );
            // Decrypt with another thread count than the one that encrypted.
            let dec_threads = THREADS[(j + 1) % THREADS.len()];
            let opts = FileOptions::new().threads(dec_threads).overwrite(true);
            let opened: FileReport =
                block_on(env.decrypt_file(&f.sealed, &f.out, &ctx(), &opts)).unwrap();
            assert_eq!(opened.plaintext_len, len as u64);
            assert_eq!(opened.ciphertext_len, sealed.ciphertext_len);
            assert!(
                std::fs::read(&f.out).unwrap() == pt,
                "len {len}: {enc_threads} -> {dec_threads} threads"
            );
        }
    }
    assert_eq!(
        listing(&f.dir),
        ["plain.bin", "plain.bin.phi", "restored.bin"]
    );
}

#[test]
fn engine_and_sequential_adapters_read_each_other() {
    let env = envelope();
    let pt = data(3 * MIB + 5 * CHUNK + 3, 9);
    for threads in [1, 2, 3] {
        let opts = FileOptions::new().threads(threads);
        // Engine -> sequential decryptor.
        let mut sealed = Vec::new();
        block_on(env.encrypt_stream_parallel(&pt[..], &mut sealed, &ctx(), &opts)).unwrap();
        let mut back = Vec::new();
        block_on(env.decryptor(&sealed[..], &ctx()))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == pt, "{threads} threads: engine output");

        // Sequential encryptor -> engine.
        let mut enc = block_on(env.encryptor(Vec::new(), &ctx())).unwrap();
        enc.write_all(&pt).unwrap();
        let sealed = enc.finish().unwrap();
        let mut back = Vec::new();
        let r =
            block_on(env.decrypt_stream_parallel(&sealed[..], &mut back, &ctx(), &opts)).unwrap();
        assert!(back == pt, "{threads} threads: engine input");
        assert_eq!(r.ciphertext_len, sealed.len() as u64);
    }
}

/// Encrypts `len` bytes to `f.sealed` and returns the sealed bytes and
/// where the body starts.
fn sealed_file(env: &Envelope, f: &Files, len: usize) -> (Vec<u8>, usize) {
    std::fs::write(&f.plain, data(len, 77)).unwrap();
    let opts = FileOptions::new().threads(2).overwrite(true);
    block_on(env.encrypt_file(&f.plain, &f.sealed, &ctx(), &opts)).unwrap();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let header_len = phi_envelope::Header::parse(&sealed).unwrap().1;
    (sealed, header_len)
}

#[test]
fn tampered_truncated_or_extended_files_leave_nothing_behind() {
    let env = envelope();
    let f = files();
    let len = 3 * BATCH_CHUNKS * CHUNK + 5 * CHUNK + 100;
    let (sealed, header) = sealed_file(&env, &f, len);
    let body = header + 56;
    let ct = CHUNK + 16;
    let chunk_at = |k: usize| body + k * ct;
    let last = len / CHUNK;

    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (what, at) in [
        ("header", 10),
        ("header tag", header - 1),
        ("salt", header + 3),
        ("commitment", header + 30),
        ("first chunk", chunk_at(0) + 5),
        ("chunk in batch 2", chunk_at(2 * BATCH_CHUNKS + 7) + 100),
        ("last full chunk's tag", chunk_at(last) - 1),
        ("final chunk", chunk_at(last) + 3),
    ] {
        let mut m = sealed.clone();
        m[at] ^= 0x01;
        cases.push((format!("flipped bit in {what}"), m));
    }
    for (what, cut) in [
        ("at the final chunk", chunk_at(last)),
        ("at a batch boundary", chunk_at(BATCH_CHUNKS)),
        ("inside a chunk", chunk_at(7) + 1000),
        ("inside the final tag", sealed.len() - 1),
        ("after the prefix", body),
        ("inside the header", header - 1),
    ] {
        cases.push((format!("truncated {what}"), sealed[..cut].to_vec()));
    }
    let mut extended = sealed.clone();
    extended.push(0);
    cases.push(("one byte appended".into(), extended));
    let mut swapped = sealed.clone();
    let (a, b) = (chunk_at(1), chunk_at(2));
    let first: Vec<u8> = swapped[a..a + ct].to_vec();
    swapped.copy_within(b..b + ct, a);
    swapped[b..b + ct].copy_from_slice(&first);
    cases.push(("two chunks swapped".into(), swapped));

    for (what, bytes) in cases {
        std::fs::write(&f.sealed, &bytes).unwrap();
        for threads in [1, 2, 4] {
            let opts = FileOptions::new().threads(threads);
            let e = block_on(env.decrypt_file(&f.sealed, &f.out, &ctx(), &opts)).unwrap_err();
            // A flip in the header's fields may also read as a structural
            // error (e.g. an unknown key); everything else is opaque.
            assert!(
                what == "flipped bit in header"
                    || matches!(e, Error::Decrypt | Error::Truncated | Error::TruncatedChunk),
                "{what}, {threads} threads: {e}"
            );
            assert_eq!(
                listing(&f.dir),
                ["plain.bin", "plain.bin.phi"],
                "{what}, {threads} threads: no output, no temporary file"
            );
        }
    }

    // The wrong context is the same opaque failure.
    std::fs::write(&f.sealed, &sealed).unwrap();
    let other = EncryptionContext::new().with("backup", "other").unwrap();
    let e = block_on(env.decrypt_file(&f.sealed, &f.out, &other, &FileOptions::new())).unwrap_err();
    assert!(e.is_decrypt(), "{e}");
    assert_eq!(listing(&f.dir), ["plain.bin", "plain.bin.phi"]);
}

#[test]
fn a_stream_decryption_releases_only_authenticated_chunks_in_order() {
    let env = envelope();
    let pt = data(4 * BATCH_CHUNKS * CHUNK + 10, 5);
    let mut sealed = Vec::new();
    block_on(env.encrypt_stream_parallel(&pt[..], &mut sealed, &ctx(), &FileOptions::new()))
        .unwrap();
    let body = phi_envelope::Header::parse(&sealed).unwrap().1 + 56;
    // Corrupt a chunk in the third batch.
    sealed[body + (2 * BATCH_CHUNKS + 5) * (CHUNK + 16) + 9] ^= 0x80;
    for threads in [1, 2, 8] {
        let opts = FileOptions::new().threads(threads);
        let mut out = Vec::new();
        let e = block_on(env.decrypt_stream_parallel(&sealed[..], &mut out, &ctx(), &opts))
            .unwrap_err();
        assert!(e.is_decrypt(), "{e}");
        assert!(
            out.len() <= (2 * BATCH_CHUNKS + 5) * CHUNK,
            "{threads} threads"
        );
        assert!(out[..] == pt[..out.len()], "only authenticated plaintext");
    }
}

#[test]
fn existing_outputs_are_refused_unless_overwrite_is_set() {
    let env = envelope();
    let f = files();
    sealed_file(&env, &f, 1000);
    std::fs::write(&f.out, b"keep me").unwrap();

    let e = block_on(env.encrypt_file(&f.plain, &f.out, &ctx(), &FileOptions::new())).unwrap_err();
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::AlreadyExists),
        "{e}"
    );
    let e = block_on(env.decrypt_file(&f.sealed, &f.out, &ctx(), &FileOptions::new())).unwrap_err();
    assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read(&f.out).unwrap(), b"keep me");
    assert_eq!(
        listing(&f.dir),
        ["plain.bin", "plain.bin.phi", "restored.bin"]
    );

    let opts = FileOptions::new().overwrite(true);
    block_on(env.decrypt_file(&f.sealed, &f.out, &ctx(), &opts)).unwrap();
    assert_eq!(std::fs::read(&f.out).unwrap(), data(1000, 77));
}

/// A writer that accepts `left` bytes and then fails.
struct FailAfter {
    left: usize,
    got: Vec<u8>,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer went away"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        self.got.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_writer_is_a_clear_error() {
    let env = envelope();
    let pt = data(3 * MIB + 1, 3);
    let mut sealed = Vec::new();
    block_on(env.encrypt_stream_parallel(&pt[..], &mut sealed, &ctx(), &FileOptions::new()))
        .unwrap();
    for threads in [1, 2, 4] {
        let opts = FileOptions::new().threads(threads);
        for left in [0, 10, 1000, MIB + 7] {
            let mut w = FailAfter {
                left,
                got: Vec::new(),
            };
            let e =
                block_on(env.encrypt_stream_parallel(&pt[..], &mut w, &ctx(), &opts)).unwrap_err();
            assert!(
                matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::BrokenPipe),
                "{e}"
            );
            assert!(e.to_string().contains("writing the output"), "{e}");

            let mut w = FailAfter {
                left,
                got: Vec::new(),
            };
            let e = block_on(env.decrypt_stream_parallel(&sealed[..], &mut w, &ctx(), &opts))
                .unwrap_err();
            assert!(e.to_string().contains("peer went away"), "{e}");
            assert!(w.got[..] == pt[..w.got.len()]);
        }
    }
}

#[test]
fn dev_full_is_a_clear_error() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return; // not on this system
    };
    let env = envelope();
    let pt = data(2 * MIB, 4);
    for threads in [1, 2] {
        let opts = FileOptions::new().threads(threads);
        let e = block_on(env.encrypt_stream_parallel(&pt[..], &full, &ctx(), &opts)).unwrap_err();
        assert!(
            matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::StorageFull),
            "{e}"
        );
        assert!(e.to_string().contains("writing the output"), "{e}");
    }
}

#[test]
fn a_missing_input_names_the_path() {
    let env = envelope();
    let f = files();
    let e =
        block_on(env.encrypt_file(&f.plain, &f.sealed, &ctx(), &FileOptions::new())).unwrap_err();
    assert!(e.to_string().contains("plain.bin"), "{e}");
    assert!(listing(&f.dir).is_empty());
}
