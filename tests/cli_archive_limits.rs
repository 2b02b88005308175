//! Hostile directory backups that cost, instead of escape: one entry named
//! `a/a/a/.../f` (GNU long names are unbounded) made restore and verify
//! quadratic in the depth. Paths and link targets are bounded in length,
//! and paths in depth, before any tree work: these archives are refused
//! with a clear error, by `decrypt` (nothing left behind) and by `verify`.
//! The archives are built with the `tar` crate, as any writer would, and
//! encrypted with the CLI as a file: they then restore as directory
//! backups, exactly like one made by someone holding the key.

mod cli_support;

use std::fs;

use cli_support::{names, Env};

const MARKER: &[u8] = b"{\"format\":\"phi-envelope-backup\",\"version\":1,\"kind\":\"directory\",\"root_mode\":493,\"root_mtime\":1700000000}\n";

fn header(ty: tar::EntryType, size: usize, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(size as u64);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

/// A directory backup's tar stream: the marker, then `build`'s entries.
fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, MARKER.len(), 0o600);
    b.append_data(&mut h, ".phi-envelope-backup", MARKER)
        .unwrap();
    build(&mut b);
    b.into_inner().unwrap()
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, data.len(), 0o644);
    b.append_data(&mut h, path, data).unwrap();
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, path, target).unwrap();
}

/// `levels` directories named `a`, then `f`: `a/a/.../a/f`.
fn deep(levels: usize) -> String {
    let mut p = "a/".repeat(levels);
    p.push('f');
    p
}

/// Encrypts the archive, then: `decrypt` refuses it (exit 2, the reason
/// named, no output, nothing else left) and `verify` refuses it.
fn assert_refused(env: &Env, name: &str, tar: &[u8], why: &str) {
    let plain = format!("{name}.tar");
    let sealed = format!("{name}.phi");
    fs::write(env.path(&plain), tar).unwrap();
    env.ok(&["encrypt", "-o", &sealed, &plain]);
    fs::remove_file(env.path(&plain)).unwrap();
    let out = format!("restore-{name}");
    let err = env.fails(&["decrypt", "-o", &out, &sealed], 2);
    assert!(err.contains("refusing to restore"), "{name}: {err}");
    assert!(err.contains(why), "{name}: expected {why:?} in: {err}");
    assert!(!env.path(&out).exists(), "{name}: output exists");
    let o = env.run(&["verify", &sealed]);
    assert_eq!(cli_support::code(&o), 2, "{name}: verify accepted it");
    let report = cli_support::stdout(&o);
    assert!(report.contains("FAILED"), "{name}: verify: {report}");
    assert!(
        report.contains(why),
        "{name}: verify: expected {why:?} in: {report}"
    );
    // Nothing but the sealed files and the keystore.
    for n in names(env.dir.path()) {
        assert!(
            n == "keys" || n.ends_with(".phi"),
            "{name}: left behind: {n}"
        );
    }
}

/// The archive of the report: one file 40,000 directories deep (an 80 KB
/// GNU long name, a backup of under 100 KB). Restoring it took 85 s and
/// 1.6 GB; it is refused before any directory is looked at.
#[test]
fn a_forty_thousand_level_path_is_refused() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let tar = archive(|b| file(b, &deep(40_000), b"x"));
    assert_refused(&env, "deep", &tar, "longer than 4095 bytes");
}

#[test]
fn paths_too_deep_or_too_long_and_long_link_targets_are_refused() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    // Under 4096 bytes, but deeper than 1024 directories.
    let tar = archive(|b| file(b, &deep(1_500), b"x"));
    assert_refused(&env, "depth", &tar, "deeper than 1024");
    // One component, longer than 4095 bytes.
    let tar = archive(|b| file(b, &"n".repeat(5_000), b"x"));
    assert_refused(&env, "long-name", &tar, "longer than 4095 bytes");
    // A symbolic link whose target is longer than 4095 bytes (it stays
    // inside: `a/..` repeated).
    let target = "a/../".repeat(1_000);
    let tar = archive(|b| {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, "a", std::io::empty()).unwrap();
        symlink(b, "l", &target);
    });
    assert_refused(&env, "long-link", &tar, "longer than 4095 bytes");
}

#[test]
fn paths_at_the_limits_restore() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    // Exactly 1024 levels: 1023 directories and the file; 2047 bytes.
    let path = deep(1_023);
    let tar = archive(|b| {
        file(b, &path, b"deep");
        // A link target of 4095 bytes, the most PATH_MAX allows, that stays inside.
        let mut target = "./".repeat(2_046);
        target.push_str("abc");
        symlink(b, "l", &target);
    });
    fs::write(env.path("ok.tar"), &tar).unwrap();
    env.ok(&["encrypt", "-o", "ok.phi", "ok.tar"]);
    env.ok(&["verify", "ok.phi"]);
    env.ok(&["decrypt", "-o", "out", "ok.phi"]);
    assert_eq!(fs::read(env.path("out").join(&path)).unwrap(), b"deep");
}

/// `encrypt` walks a tree as deep as a restore accepts (the walk keeps
/// its own stack: a recursive walk overflowed the thread's stack here),
/// and refuses, with exit 1, a tree with an entry one level deeper.
#[test]
fn encrypt_walks_the_deepest_tree_and_refuses_a_deeper_one() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    // 1024 directories below the root, made relative to one another (the
    // absolute path would pass PATH_MAX).
    let mut dir = fs::File::open(env.dir.path()).unwrap();
    for name in std::iter::once("tree").chain(std::iter::repeat_n("a", 1_024)) {
        rustix::fs::mkdirat(&dir, name, rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        let next = rustix::fs::openat(
            &dir,
            name,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        dir = fs::File::from(next);
    }
    // A file at level 1025.
    let f = rustix::fs::openat(
        &dir,
        "f",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    drop(f);
    let err = env.fails(&["encrypt", "-o", "tree.phi", "tree"], 1);
    assert!(err.contains("deeper than 1024"), "{err}");
    assert!(!env.path("tree.phi").exists());
}
