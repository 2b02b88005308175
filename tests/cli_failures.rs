//! The `backup` CLI when things go wrong outside it: a full disk, a killed
//! process, an interrupt. Never a partial file or directory under the
//! final name; temporary files only beside it, removed on every failure
//! the process survives, and by `backup clean` after a SIGKILL.

mod cli_support;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{code, names, signal, temps, Env};

#[test]
fn dev_full_as_stdout_is_an_io_error() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("f"), vec![7u8; 300_000]).unwrap();
    env.ok(&["encrypt", "-o", "f.phi", "f"]);
    for args in [
        &["decrypt", "-o", "-", "f.phi"][..],
        &["encrypt", "--force", "-o", "-", "f"][..],
    ] {
        let o = env
            .cmd()
            .args(args)
            .stdout(File::options().write(true).open("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 4, "{args:?}: {err}");
        assert!(err.contains("no space left"), "{err}");
        cli_support::assert_friendly(&err);
    }
    // An output directory that does not exist: I/O error, nothing created.
    env.fails(&["decrypt", "-o", "no/such/dir/out", "f.phi"], 4);
    env.fails(&["encrypt", "-o", "no/such/dir/f.phi", "f"], 4);
}

/// Runs `backup ARGS` with stdout on a pipe whose reader reads `keep`
/// bytes and then closes it; returns the exit code and stderr.
fn with_stdout_closed_after(env: &Env, args: &[&str], keep: usize) -> (i32, String) {
    use std::io::Read;
    let mut child = env
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = vec![0u8; keep];
    out.read_exact(&mut got).unwrap();
    drop(out);
    let o = child.wait_with_output().unwrap();
    (code(&o), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A reader that closes stdout early (`| head -1`, `| true`) is no
/// internal error: the command stops, says nothing, and exits 141, what a
/// shell reports for a command killed by SIGPIPE; never 0, so that an
/// incomplete restore on stdout is not taken for a complete one.
#[test]
fn a_stdout_closed_by_its_reader_is_a_quiet_exit_141() {
    let env = Env::new();
    let log = "--audit-log=audit.jsonl";
    env.ok(&[log, "keys", "init"]);
    for i in 0..3 {
        env.ok(&["keys", "create", &format!("local:k{i}")]);
    }
    fs::write(env.path("f"), vec![7u8; 3_000_000]).unwrap();
    env.ok(&[log, "encrypt", "--key", "local:k0", "-o", "f.phi", "f"]);
    for (args, keep) in [
        (&["keys", "list"][..], 0),
        (&["audit", "verify", "--json", "audit.jsonl"][..], 0),
        (&["audit", "report", "audit.jsonl"][..], 0),
        (&["audit", "report", "--json", "audit.jsonl"][..], 0),
        (&["decrypt", "-o", "-", "f.phi"][..], 10),
        (&["encrypt", "--key", "local:k1", "-o", "-", "f"][..], 10),
    ] {
        let (status, err) = with_stdout_closed_after(&env, args, keep);
        assert_eq!(status, 141, "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}: quiet");
    }
    // A complete restore still exits 0.
    env.ok(&["decrypt", "-o", "f.out", "f.phi"]);
    assert_eq!(fs::read(env.path("f.out")).unwrap().len(), 3_000_000);
}

/// A small tmpfs, unmounted on drop; `None` where mounting is not allowed
/// (not root, or no CAP_SYS_ADMIN in the container): the test then fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_leaves_nothing_under_the_final_name() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    // CI runs as root on this kind of machine, where mounting works; a
    // machine where it does not fails here loudly rather than skipping.
    let small = Tmpfs::mount(&env.path("small"), "2m").expect(
        "cannot mount a 2 MiB tmpfs (needs root with CAP_SYS_ADMIN) for the full-disk test",
    );
    let big: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    fs::write(env.path("big"), &big).unwrap();
    // encrypt into the full disk
    let err = env.fails(&["encrypt", "-o", "small/big.phi", "big"], 4);
    assert!(err.contains("no space left"), "{err}");
    assert!(names(&small.0).is_empty(), "left {:?}", names(&small.0));
    // decrypt a file and a directory into it
    env.ok(&["encrypt", "-o", "big.phi", "big"]);
    env.fails(&["decrypt", "-o", "small/big", "big.phi"], 4);
    assert!(names(&small.0).is_empty(), "left {:?}", names(&small.0));
    fs::create_dir(env.path("tree")).unwrap();
    fs::write(env.path("tree/a"), &big[..1_500_000]).unwrap();
    fs::write(env.path("tree/b"), &big[1_500_000..]).unwrap();
    env.ok(&["encrypt", "-o", "tree.phi", "tree"]);
    env.fails(&["decrypt", "-o", "small/tree", "tree.phi"], 4);
    assert!(names(&small.0).is_empty(), "left {:?}", names(&small.0));
    // What fits, restores.
    fs::write(env.path("fits"), &big[..100_000]).unwrap();
    env.ok(&["encrypt", "-o", "small/fits.phi", "fits"]);
    env.ok(&["decrypt", "-o", "small/fits", "small/fits.phi"]);
    assert_eq!(fs::read(small.0.join("fits")).unwrap(), &big[..100_000]);
}

/// Waits until `dir` holds a temporary file or directory.
fn wait_for_temp(dir: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Some(t) = temps(dir).into_iter().find(|n| n.ends_with(".tmp")) {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_encrypt_leaves_only_a_temp_file_that_clean_removes() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let mut child = env
        .cmd()
        .args(["encrypt", "-o", "out.phi", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![1u8; 3 << 20]).unwrap();
    let temp = wait_for_temp(env.dir.path());
    assert!(temp.starts_with(".out.phi."), "{temp}");
    child.kill().unwrap(); // SIGKILL mid-way
    child.wait().unwrap();
    drop(stdin);
    assert!(
        !env.path("out.phi").exists(),
        "a partial backup under the final name"
    );
    // `clean` lists it, then removes it.
    let o = env.ok(&["clean", "--dry-run", "."]);
    assert!(cli_support::stdout(&o).contains(&temp));
    assert_eq!(temps(env.dir.path()), std::slice::from_ref(&temp));
    env.ok(&["clean", "."]);
    assert!(temps(env.dir.path()).is_empty());
}

#[test]
fn interrupted_restore_removes_its_temporary_directory() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::create_dir(env.path("tree")).unwrap();
    for i in 0..4 {
        fs::write(env.path(&format!("tree/f{i}")), vec![i as u8; 2 << 20]).unwrap();
    }
    env.ok(&["encrypt", "-o", "tree.phi", "tree"]);
    let sealed = fs::read(env.path("tree.phi")).unwrap();
    let mut child = env
        .cmd()
        .args(["decrypt", "-o", "restored", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&sealed[..sealed.len() / 2]).unwrap();
    let temp = wait_for_temp(env.dir.path());
    assert!(temp.starts_with(".restored."), "{temp}");
    signal(child.id(), "-INT");
    std::thread::sleep(Duration::from_millis(200));
    // The reader notices at its next read.
    let _ = stdin.write_all(&sealed[sealed.len() / 2..]);
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 130, "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!env.path("restored").exists());
    assert!(
        temps(env.dir.path()).is_empty(),
        "{:?}",
        temps(env.dir.path())
    );
}

#[test]
fn interrupted_encrypt_removes_its_temporary_file() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let mut child = env
        .cmd()
        .args(["encrypt", "-o", "out.phi", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![1u8; 2 << 20]).unwrap();
    wait_for_temp(env.dir.path());
    signal(child.id(), "-TERM");
    std::thread::sleep(Duration::from_millis(200));
    let _ = stdin.write_all(&vec![1u8; 1 << 20]);
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!env.path("out.phi").exists());
    assert!(
        temps(env.dir.path()).is_empty(),
        "{:?}",
        temps(env.dir.path())
    );
}
