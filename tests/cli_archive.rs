//! Hostile directory backups: archives that try to write outside the
//! restore directory. A directory backup is recognised by its marker entry
//! inside the authenticated plaintext, so these tests craft the tar stream
//! (marker first, then the attack) and encrypt it with the CLI as a file:
//! it then restores as a directory backup, exactly like one made by someone
//! holding the key. Every one must be refused with exit 2, leave nothing
//! under the output name and nothing outside it, and `verify` must refuse it
//! too.

mod cli_support;

use std::fs;
use std::path::Path;

use cli_support::{names, Env};

const MARKER: &[u8] = b"{\"format\":\"phi-envelope-backup\",\"version\":1,\"kind\":\"directory\",\"root_mode\":493,\"root_mtime\":1700000000}\n";

/// A tar stream builder that writes names and link targets byte for byte
/// (the `tar` crate refuses `..` and absolute paths, which is the point
/// here).
struct Evil {
    out: Vec<u8>,
}

impl Evil {
    fn new() -> Evil {
        let mut e = Evil { out: Vec::new() };
        e.raw(
            tar::EntryType::Regular,
            ".phi-envelope-backup",
            None,
            MARKER,
            0o600,
        );
        e
    }

    fn raw(&mut self, ty: tar::EntryType, name: &str, link: Option<&str>, data: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                g.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn file(mut self, name: &str, data: &[u8]) -> Evil {
        self.raw(tar::EntryType::Regular, name, None, data, 0o644);
        self
    }

    fn dir(mut self, name: &str) -> Evil {
        self.raw(tar::EntryType::Directory, name, None, b"", 0o755);
        self
    }

    fn symlink(mut self, name: &str, target: &str) -> Evil {
        self.raw(tar::EntryType::Symlink, name, Some(target), b"", 0o777);
        self
    }

    fn hardlink(mut self, name: &str, target: &str) -> Evil {
        self.raw(tar::EntryType::Link, name, Some(target), b"", 0o644);
        self
    }

    fn special(mut self, ty: tar::EntryType, name: &str) -> Evil {
        self.raw(ty, name, None, b"", 0o644);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

/// Encrypts each archive with the CLI, tries to restore it (refused with
/// exit 2, the reason named, nothing left behind) and verifies them all in
/// one run (each refused). The cases run four at a time.
fn assert_refused(env: &Env, cases: Vec<(&str, Vec<u8>, &str)>) {
    if !env.keystore.exists() {
        env.ok(&["keys", "init"]);
    }
    let mut sealed_all = Vec::new();
    for group in cases.chunks(4) {
        std::thread::scope(|s| {
            for (name, archive, why) in group {
                s.spawn(move || {
                    let plain = format!("{name}.tar");
                    let sealed = format!("{name}.phi");
                    fs::write(env.path(&plain), archive).unwrap();
                    env.ok(&["encrypt", "-o", &sealed, &plain]);
                    let out = format!("restore-{name}");
                    let err = env.fails(&["decrypt", "-o", &out, &sealed], 2);
                    assert!(err.contains("refusing to restore"), "{name}: {err}");
                    assert!(err.contains(why), "{name}: expected {why:?} in: {err}");
                    assert!(!env.path(&out).exists(), "{name}: output exists");
                });
            }
        });
        sealed_all.extend(group.iter().map(|(name, _, _)| format!("{name}.phi")));
    }
    let mut args = vec!["verify", "--json"];
    args.extend(sealed_all.iter().map(String::as_str));
    let o = env.run(&args);
    assert_eq!(cli_support::code(&o), 2);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], 0, "verify accepted one: {v}");
    // Nothing outside: no stray file, no temp directory left.
    for n in names(env.dir.path()) {
        assert!(!n.starts_with('.'), "left {n}");
        assert!(!n.starts_with("escaped"), "wrote {n}");
    }
    assert!(!Path::new("/tmp/escaped-by-cli-test").exists());
}

#[test]
fn a_well_formed_crafted_archive_restores() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let archive = Evil::new()
        .dir("a")
        .file("a/f", b"data")
        .symlink("a/l", "f")
        .symlink("up", "a/../a/f")
        .hardlink("a/h", "a/f")
        .finish();
    fs::write(env.path("ok.tar"), archive).unwrap();
    env.ok(&["encrypt", "-o", "ok.phi", "ok.tar"]);
    env.ok(&["verify", "ok.phi"]);
    env.ok(&["decrypt", "-o", "out", "ok.phi"]);
    assert_eq!(fs::read(env.path("out/a/l")).unwrap(), b"data");
    assert_eq!(fs::read(env.path("out/up")).unwrap(), b"data");
    assert_eq!(fs::read(env.path("out/a/h")).unwrap(), b"data");
    // The same archive decrypted raw is the tar stream byte for byte.
    env.ok(&["decrypt", "--raw", "-o", "raw.tar", "ok.phi"]);
    assert_eq!(
        fs::read(env.path("raw.tar")).unwrap(),
        fs::read(env.path("ok.tar")).unwrap()
    );
}

#[test]
fn traversal_and_escaping_links_are_refused() {
    let env = Env::new();
    assert_refused(
        &env,
        vec![
            // Paths.
            (
                "dotdot",
                Evil::new().file("../escaped", b"x").finish(),
                "`..`",
            ),
            (
                "inner-dotdot",
                Evil::new().dir("a").file("a/../../escaped", b"x").finish(),
                "`..`",
            ),
            (
                "absolute",
                Evil::new().file("/tmp/escaped-by-cli-test", b"x").finish(),
                "absolute",
            ),
            // A link out of the tree, then a file written through it.
            (
                "link-then-file",
                Evil::new()
                    .symlink("escape", "..")
                    .file("escape/escaped", b"x")
                    .finish(),
                "outside",
            ),
            (
                "absolute-link",
                Evil::new().symlink("etc", "/etc").finish(),
                "absolute",
            ),
            // Each link stays inside on its own, together they leave: `b`
            // is the root, so `b/..` is the root's parent.
            (
                "composed-links",
                Evil::new()
                    .symlink("a", "b/../escaped")
                    .symlink("b", ".")
                    .finish(),
                "outside",
            ),
            // A file through a link that points inside is refused too: no
            // write ever follows a link.
            (
                "file-through-inner-link",
                Evil::new()
                    .dir("d")
                    .symlink("l", "d")
                    .file("l/f", b"x")
                    .finish(),
                "symbolic link",
            ),
            (
                "loop",
                Evil::new().symlink("x", "y").symlink("y", "x").finish(),
                "too many",
            ),
        ],
    );
}

#[test]
fn hard_links_devices_duplicates_and_trailing_data_are_refused() {
    let env = Env::new();
    let mut trailing = Evil::new().file("f", b"x").finish();
    trailing.extend_from_slice(b"hidden data after the end");
    trailing.extend_from_slice(&[0u8; 487]);
    assert_refused(
        &env,
        vec![
            // Hard links out, absolute, through a link.
            (
                "hardlink-out",
                Evil::new().hardlink("h", "../../etc/passwd").finish(),
                "hard-link",
            ),
            (
                "hardlink-abs",
                Evil::new().hardlink("h", "/etc/passwd").finish(),
                "hard-link",
            ),
            (
                "hardlink-through-link",
                Evil::new()
                    .symlink("l", ".")
                    .file("f", b"x")
                    .hardlink("h", "l/f")
                    .finish(),
                "hard-link",
            ),
            // Special files.
            (
                "device",
                Evil::new().special(tar::EntryType::Char, "null").finish(),
                "device",
            ),
            (
                "block",
                Evil::new().special(tar::EntryType::Block, "sda").finish(),
                "device",
            ),
            (
                "fifo",
                Evil::new().special(tar::EntryType::Fifo, "p").finish(),
                "FIFO",
            ),
            // A second entry for the same path (a file, then a link there).
            (
                "duplicate",
                Evil::new().file("f", b"one").symlink("f", "..").finish(),
                "twice",
            ),
            ("trailing", trailing, "after the end"),
        ],
    );
}

#[test]
fn encrypt_refuses_links_a_restore_would_refuse() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::create_dir(env.path("d")).unwrap();
    fs::write(env.path("d/f"), b"x").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", env.path("d/abs")).unwrap();
    let err = env.fails(&["encrypt", "-o", "d.phi", "d"], 1);
    assert!(err.contains("--skip-outside-links"), "{err}");
    assert!(!env.path("d.phi").exists());
    let o = env.ok(&["encrypt", "--skip-outside-links", "-o", "d.phi", "d"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipping symbolic link"));
    env.ok(&["decrypt", "-o", "out", "d.phi"]);
    assert_eq!(names(&env.path("out")), ["f"]);
}
