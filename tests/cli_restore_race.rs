//! A restore writes only inside the directory it restores into, even when
//! someone who can write next to the target moves the temporary restore
//! directory away mid-restore and puts a symbolic link to another
//! directory under its name: the writes follow the directory, never the
//! name, and the restore notices and fails without leaving anything.

mod cli_support;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use cli_support::Env;

/// Files in the backup: each is created, written and synced, which keeps
/// the restore busy long enough for the swap to land in the middle.
const FILES: usize = 200;

/// Waits for the temporary restore directory of `out` to appear in `dir`,
/// moves it to `moved` and puts a link to `victim` under its name.
/// Returns whether it swapped.
fn swap_temp_dir(dir: &Path, out: &str, moved: &Path, victim: &Path, stop: &AtomicBool) -> bool {
    let prefix = format!(".{out}.");
    while !stop.load(Ordering::Relaxed) {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                // Let a few entries land first, so that the swap happens
                // mid-restore rather than before the first entry.
                std::thread::sleep(std::time::Duration::from_millis(20));
                if fs::rename(e.path(), moved).is_ok() {
                    std::os::unix::fs::symlink(victim, e.path()).unwrap();
                    return true;
                }
            }
        }
    }
    false
}

#[test]
fn moving_the_temporary_restore_directory_never_redirects_a_write() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let tree = env.path("tree");
    for d in 0..4 {
        fs::create_dir_all(tree.join(format!("d{d}"))).unwrap();
    }
    for i in 0..FILES {
        fs::write(
            tree.join(format!("d{}/f{i:04}", i % 4)),
            format!("file {i}\n").repeat(64),
        )
        .unwrap();
    }
    env.ok(&["encrypt", "-o", "tree.phi", "tree"]);
    let victim = env.path("victim");
    fs::create_dir(&victim).unwrap();
    let moved = env.path("moved");
    let stop = AtomicBool::new(false);
    let (swapped, o) = std::thread::scope(|s| {
        let watcher = s.spawn(|| swap_temp_dir(env.dir.path(), "out", &moved, &victim, &stop));
        let o = env.run(&["decrypt", "-o", "out", "tree.phi"]);
        stop.store(true, Ordering::Relaxed);
        (watcher.join().unwrap(), o)
    });
    assert!(swapped, "the temporary restore directory was never seen");
    // Nothing was written through the link.
    assert_eq!(
        cli_support::names(&victim),
        Vec::<String>::new(),
        "a restore wrote outside its directory"
    );
    // The restore saw its directory replaced and failed, leaving nothing
    // under the output name.
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_ne!(cli_support::code(&o), 0, "the restore succeeded: {err}");
    cli_support::assert_friendly(&err);
    assert!(err.contains("replaced"), "{err}");
    assert!(
        fs::symlink_metadata(env.path("out")).is_err(),
        "something is under the output name"
    );
    // The restored entries are all in the directory that was moved away.
    let mut n = 0;
    if moved.exists() {
        cli_support::unlock(&moved);
        for d in fs::read_dir(&moved).unwrap() {
            n += fs::read_dir(d.unwrap().path()).unwrap().count();
        }
    }
    assert!(n <= FILES);
}
