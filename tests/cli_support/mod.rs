//! Shared by the end-to-end tests of the `backup` CLI (tests/cli_*.rs): the
//! built example binary, a private environment per test (keystore,
//! passphrase, working directory), and tree comparison.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub const PASSPHRASE: &str = "cli-test passphrase, not a secret";

/// The `backup` example binary, built once per test process with the same
/// profile and features as the tests (`cargo test` builds examples, but
/// `cargo test --test cli_x` does not: build it to be sure).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/cli_x-HASH
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // What cargo sets for a running test is not the environment of the
        // `cargo test` that built the dependencies: some build scripts
        // (ring's) rerun when it changes, and every test run would then
        // rebuild them twice (here, and in the next `cargo test`).
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k == "CARGO_MANIFEST_DIR"
                || k == "CARGO_MANIFEST_PATH"
                || k == "CARGO_CRATE_NAME"
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "CARGO_TARGET_TMPDIR"
                || k.starts_with("CARGO_PKG_")
            {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "--example", "backup", "--target-dir"])
            .arg(target_dir);
        if profile == "release" {
            cmd.arg("--release");
        }
        let mut features = vec!["local"];
        if cfg!(feature = "pkcs11") {
            features.push("pkcs11");
        }
        if cfg!(feature = "aws-kms") {
            features.push("aws-kms");
        }
        if cfg!(feature = "tokio") {
            features.push("tokio");
        }
        if cfg!(feature = "tracing") {
            features.push("tracing");
        }
        if cfg!(feature = "vault") {
            features.push("vault");
        }
        if cfg!(feature = "recovery") {
            features.push("recovery");
        }
        if cfg!(feature = "s3") {
            features.push("s3");
        }
        if cfg!(feature = "postgres") {
            features.push("postgres");
        }
        if features.len() == 9 {
            cmd.arg("--all-features");
        } else {
            cmd.arg("--features").arg(features.join(","));
        }
        let status = cmd.status().expect("run cargo build --example backup");
        assert!(status.success(), "cargo build --example backup failed");
        let bin = profile_dir.join("examples").join("backup");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// A private directory with its own keystore; commands run in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub keystore: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let keystore = dir.path().join("keys").join("keystore.json");
        Env { dir, keystore }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A command with the test's keystore and passphrase, nothing else
    /// from the caller's environment that the CLI reads.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path())
            .env("PHI_ENVELOPE_KEYSTORE", &self.keystore)
            .env("PHI_ENVELOPE_PASSPHRASE", PASSPHRASE)
            .env("PHI_ENVELOPE_ACTOR", "cli-test")
            .env_remove("PHI_ENVELOPE_AUDIT_LOG")
            .env_remove("PHI_ENVELOPE_AUDIT_DB")
            .env_remove("PHI_ENVELOPE_AUDIT_KEY_FILE")
            .env_remove("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY")
            .env_remove("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY_FILE")
            .env_remove("PHI_ENVELOPE_CUSTODIANS")
            .env_remove("PHI_ENVELOPE_ALERTS")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run backup")
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let o = self.run(args);
        assert_eq!(
            code(&o),
            0,
            "backup {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Runs and asserts the exit code; returns stderr.
    pub fn fails(&self, args: &[&str], want: i32) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            code(&o),
            want,
            "backup {args:?}: expected exit {want}\nstdout: {}\nstderr: {err}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_friendly(&err);
        err
    }
}

/// The exit code (signals as 128 + n).
pub fn code(o: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    o.status
        .code()
        .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0))
}

/// An error is one friendly line: no panic, no backtrace, no debug dump.
pub fn assert_friendly(stderr: &str) {
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        !stderr.contains("RUST_BACKTRACE"),
        "backtrace hint: {stderr}"
    );
    assert!(
        !stderr.contains("internal error"),
        "internal error: {stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.starts_with("backup: ")
                && !l.starts_with("backup: warning")
                && !l.starts_with("backup: created")
        })
        .collect();
    assert!(errors.len() <= 1, "more than one error line: {stderr}");
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A small tree with what a real backup has: nested directories, modes
/// (including a read-only directory and an executable), an empty file, a
/// file bigger than a chunk and a batch, names with spaces and non-ASCII
/// bytes, a long path, relative symbolic links, an old mtime.
pub fn make_tree(root: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, PermissionsExt};
    fs::create_dir_all(root.join("db/2026")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::write(root.join("README"), b"patient export\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..(1 << 20) + 16_385u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(root.join("db/2026/dump.sql"), &big).unwrap();
    fs::write(root.join("db/run.sh"), b"#!/bin/sh\necho restore\n").unwrap();
    fs::set_permissions(root.join("db/run.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(root.join("db/secret.key"), b"k").unwrap();
    fs::set_permissions(
        root.join("db/secret.key"),
        fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    fs::write(root.join("name with spaces.txt"), b"x").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xc3\xa9-\xff.bin");
    fs::write(root.join(odd), b"bytes").unwrap();
    let long = "d".repeat(120);
    fs::create_dir_all(root.join(&long)).unwrap();
    fs::write(root.join(&long).join("f".repeat(110)), b"long path").unwrap();
    symlink("README", root.join("link-to-readme")).unwrap();
    symlink("../README", root.join("db/up-link")).unwrap();
    symlink("2026/dump.sql", root.join("db/latest")).unwrap();
    let old = filetime::FileTime::from_unix_time(1_000_000_000, 0);
    filetime::set_file_mtime(root.join("README"), old).unwrap();
    fs::create_dir_all(root.join("ro")).unwrap();
    fs::write(root.join("ro/inside"), b"ro").unwrap();
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
}

/// What a tree holds, for comparison: per relative path, the type, the
/// permission bits, the mtime (seconds; not for symbolic links' own) and
/// the content or link target.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let md = fs::symlink_metadata(root).unwrap();
    out.insert(
        PathBuf::from("."),
        format!("dir {:o} {}", md.mode() & 0o7777, md.mtime()),
    );
    walk(root, Path::new(""), &mut out);
    out
}

fn walk(dir: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let r = rel.join(e.file_name());
        let md = fs::symlink_metadata(&p).unwrap();
        let mode = md.mode() & 0o7777;
        let desc = if md.is_dir() {
            walk(&p, &r, out);
            format!("dir {mode:o} {}", md.mtime())
        } else if md.file_type().is_symlink() {
            format!("link -> {}", fs::read_link(&p).unwrap().display())
        } else {
            let data = fs::read(&p).unwrap();
            format!(
                "file {mode:o} {} len {} sum {}",
                md.mtime(),
                data.len(),
                checksum(&data)
            )
        };
        out.insert(r, desc);
    }
}

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a: enough to tell contents apart in a test.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Makes a tree writable again so that the temp dir can be removed.
pub fn unlock(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = fs::symlink_metadata(root) {
        if md.is_dir() {
            let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o755));
            if let Ok(rd) = fs::read_dir(root) {
                for e in rd.flatten() {
                    unlock(&e.path());
                }
            }
        }
    }
}

/// The names in `dir`.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Temporary files or directories (`.NAME.<hex>.tmp`, `.old`) left in `dir`.
pub fn temps(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.starts_with('.') && (n.ends_with(".tmp") || n.ends_with(".old")))
        .collect()
}

/// Sends `sig` (`-INT`, `-KILL`, ...) to `target`: a pid, or `-PGID` for a
/// process group. The shell's kill builtin: no procps needed.
pub fn signal(target: impl std::fmt::Display, sig: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("kill {sig} {target}"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {target}");
}

/// Polls `cond` until it holds. It guards against a hang only: a test
/// that would wait for ever fails after a minute instead.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
