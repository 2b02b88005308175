//! A user who can write inside a tree that someone else backs up must not
//! be able to get a file from outside the tree into the backup: not by
//! swapping an entry for a symbolic link between the moment the walker
//! looks at it and the moment it opens it, not for a file and not for a
//! directory. And a restore writes only inside its target, whatever is
//! swapped next to it.
//!
//! The swapping thread exchanges, atomically and for as long as the backups
//! run, each entry of the tree with a symbolic link to an outside secret
//! (`renameat2(RENAME_EXCHANGE)`): at any instant every name exists, as a
//! regular file (or directory) or as a link. Every backup is decrypted raw
//! and restored, and neither the tar stream nor the restored tree may hold
//! a byte of the secret.

mod cli_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use cli_support::Env;
use rustix::fs::{renameat_with, RenameFlags, CWD};

/// How many backups run while the entries are swapped. On the walker that
/// opened entries by path, a secret got in within the first ten.
const BACKUPS: usize = 20;
/// Swapped regular files and directories in the tree.
const FILES: usize = 48;
const DIRS: usize = 16;
/// The secret: same length as the innocent contents, so that a walker that
/// read the secret instead would read all of it.
const SECRET: &[u8] = b"OUTSIDE-SECRET-7f3a9c:never-in-a-backup:0123456789abcdef";

fn innocent() -> Vec<u8> {
    let mut v = b"innocent".repeat(SECRET.len() / 8 + 1);
    v.truncate(SECRET.len());
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every byte of every regular file under `root` (links not followed).
fn all_file_bytes(root: &Path, out: &mut Vec<u8>) {
    for e in fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            all_file_bytes(&e.path(), out);
        } else if md.is_file() {
            out.extend(fs::read(e.path()).unwrap());
        }
    }
}

struct Swaps {
    pairs: Vec<(PathBuf, PathBuf)>,
}

impl Swaps {
    /// The tree `root` (files `f..`, directories `d../inner`) and, outside
    /// it in `spare`, one symbolic link per entry: to the secret file for
    /// a file, to a directory holding the secret as `inner` for a
    /// directory.
    fn build(root: &Path, spare: &Path, outside: &Path) -> Swaps {
        fs::create_dir_all(root).unwrap();
        fs::create_dir_all(spare).unwrap();
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("secret"), SECRET).unwrap();
        fs::write(outside.join("dir/inner"), SECRET).unwrap();
        let mut pairs = Vec::new();
        for i in 0..FILES {
            let name = format!("f{i:03}");
            fs::write(root.join(&name), innocent()).unwrap();
            std::os::unix::fs::symlink(outside.join("secret"), spare.join(&name)).unwrap();
            pairs.push((root.join(&name), spare.join(&name)));
        }
        for i in 0..DIRS {
            let name = format!("d{i:03}");
            fs::create_dir(root.join(&name)).unwrap();
            fs::write(root.join(&name).join("inner"), innocent()).unwrap();
            std::os::unix::fs::symlink(outside.join("dir"), spare.join(&name)).unwrap();
            pairs.push((root.join(&name), spare.join(&name)));
        }
        Swaps { pairs }
    }

    /// Exchanges every pair, over and over, until `stop`; leaves each
    /// pair as it found it.
    fn run(&self, stop: &AtomicBool) {
        let exchange = |(a, b): &(PathBuf, PathBuf)| {
            renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).expect("renameat2 EXCHANGE")
        };
        while !stop.load(Ordering::Relaxed) {
            for p in &self.pairs {
                exchange(p);
                std::thread::yield_now();
                exchange(p);
            }
        }
    }
}

#[test]
fn swapping_entries_for_links_never_smuggles_an_outside_file_into_a_backup() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let root = env.path("tree");
    let swaps = Swaps::build(&root, &env.path("spare"), &env.path("outside"));
    let stop = AtomicBool::new(false);
    let mut warned = 0;
    std::thread::scope(|s| {
        let swapper = s.spawn(|| swaps.run(&stop));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for i in 0..BACKUPS {
                let sealed = format!("b{i}.phi");
                // The links swapped in are absolute, so a walker that sees
                // one skips it (with a warning) under this flag; the
                // backup must complete.
                let o = env.ok(&["encrypt", "--skip-outside-links", "-o", &sealed, "tree"]);
                if String::from_utf8_lossy(&o.stderr).contains("warning") {
                    warned += 1;
                }
                let raw = format!("b{i}.tar");
                env.ok(&["decrypt", "--raw", "-o", &raw, &sealed]);
                let tar = fs::read(env.path(&raw)).unwrap();
                assert!(
                    !contains(&tar, SECRET),
                    "backup {i}: the outside secret is inside the backup's tar stream"
                );
                // The tar stream is all the plaintext; every few backups
                // the restored tree is checked as well.
                if i % 5 == 4 {
                    let out = format!("r{i}");
                    env.ok(&["decrypt", "-o", &out, &sealed]);
                    let mut bytes = Vec::new();
                    all_file_bytes(&env.path(&out), &mut bytes);
                    assert!(
                        !contains(&bytes, SECRET),
                        "backup {i}: the outside secret is in the restored tree"
                    );
                    fs::remove_dir_all(env.path(&out)).unwrap();
                }
                fs::remove_file(env.path(&raw)).unwrap();
                fs::remove_file(env.path(&sealed)).unwrap();
            }
        }));
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    // The race was really run: entries were seen as links (and skipped).
    assert!(warned > 0, "no backup ever saw a swapped entry");
}
