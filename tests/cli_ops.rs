//! Everyday operator mistakes and interruptions that must not lose data or
//! leave a short backup behind: Ctrl-C in a pipeline, `--expect-size`,
//! `keys destroy` without a terminal, a mistyped keystore path, the actor
//! recorded without `$USER`, and error hints that name CLI commands.

mod cli_support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use cli_support::{code, names, signal, stdout, temps, wait_until, Env};

/// The numbers of the `read` and `readv` system calls on this
/// architecture.
const SYS_READS: [u64; 2] = if cfg!(target_arch = "x86_64") {
    [0, 19]
} else if cfg!(target_arch = "aarch64") {
    [63, 65]
} else {
    panic!("SYS_READS: unknown architecture for this test")
};

/// True when a thread of `pid` is blocked in `read` on its standard input
/// (a descriptor that refers to the same pipe as its fd 0): the process
/// has consumed everything written so far and waits for more.
fn blocked_reading_stdin(pid: u32) -> bool {
    let Ok(stdin) = fs::read_link(format!("/proc/{pid}/fd/0")) else {
        return false;
    };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    for t in tasks.flatten() {
        let Ok(sc) = fs::read_to_string(t.path().join("syscall")) else {
            continue;
        };
        let mut f = sc.split_whitespace();
        let (Some(nr), Some(fd)) = (f.next(), f.next()) else {
            continue;
        };
        let Ok(nr) = nr.parse::<u64>() else { continue };
        let Ok(fd) = u64::from_str_radix(fd.trim_start_matches("0x"), 16) else {
            continue;
        };
        if SYS_READS.contains(&nr)
            && fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|l| l == stdin)
        {
            return true;
        }
    }
    false
}

/// True once no thread of `pid` has signal `sig` pending: it was
/// delivered (the handler ran, or is running).
fn signal_delivered(pid: u32, sig: u32) -> bool {
    let bit = 1u64 << (sig - 1);
    let pending = |status: &str, field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|m| m & bit != 0)
    };
    let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true; // exited
    };
    if pending(&st, "ShdPnd:") || pending(&st, "SigPnd:") {
        return false;
    }
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        fs::read_to_string(t.path().join("status")).map_or(true, |s| !pending(&s, "SigPnd:"))
    })
}

fn encrypt_from_pipe(env: &Env, extra: &[&str]) -> Child {
    env.cmd()
        .args(["encrypt"])
        .args(extra)
        .args(["-o", "out.phi", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The race of issue 14 item 7 made deterministic: SIGINT arrives while
/// the CLI waits for more input, and only then does the input end (the
/// producer of a pipeline dies of the same Ctrl-C). The end of input must
/// not commit what was read so far.
#[test]
fn sigint_then_end_of_input_commits_nothing_and_exits_130() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let mut child = encrypt_from_pipe(&env, &[]);
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 100_000]).unwrap();
    wait_until("the CLI waits for more input", || {
        blocked_reading_stdin(pid)
    });
    signal(pid, "-INT");
    wait_until("SIGINT is delivered", || signal_delivered(pid, 2));
    drop(stdin); // end of input, after the interrupt
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 130, "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        !env.path("out.phi").exists(),
        "a truncated backup was committed"
    );
    assert!(
        temps(env.dir.path()).is_empty(),
        "{:?}",
        temps(env.dir.path())
    );
}

/// The same as an operator meets it: `producer | backup encrypt -o F -`
/// in one process group, and Ctrl-C (SIGINT to the group) while the
/// producer is stalled. The producer dies, the CLI sees the end of its
/// input, and must still not commit.
#[test]
fn ctrl_c_in_a_pipeline_commits_nothing_and_exits_130() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let mut producer = Command::new("sh")
        .arg("-c")
        .arg("head -c 200000 /dev/zero; exec sleep 600")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = producer.id();
    let pipe = producer.stdout.take().unwrap();
    let child = env
        .cmd()
        .args(["encrypt", "-o", "out.phi", "-"])
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(pgid as i32)
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_until("the CLI waits for more input", || {
        blocked_reading_stdin(pid)
    });
    signal(format!("-{pgid}"), "-INT"); // Ctrl-C: the whole foreground group
    let o = child.wait_with_output().unwrap();
    let _ = producer.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 130, "{err}");
    assert!(
        !env.path("out.phi").exists(),
        "a short backup was committed"
    );
    assert!(temps(env.dir.path()).is_empty());
}

#[test]
fn expect_size_refuses_a_short_or_long_input() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    let data = vec![3u8; 40_000];
    fs::write(env.path("f"), &data).unwrap();
    // Right size: committed.
    env.ok(&["encrypt", "--expect-size", "40000", "-o", "ok.phi", "f"]);
    env.ok(&["decrypt", "-o", "ok.out", "ok.phi"]);
    assert_eq!(fs::read(env.path("ok.out")).unwrap(), data);
    // A file shorter or longer than announced: refused, nothing committed.
    for n in ["40001", "39999", "0"] {
        let err = env.fails(&["encrypt", "--expect-size", n, "-o", "bad.phi", "f"], 2);
        assert!(err.contains("--expect-size"), "{err}");
        assert!(err.contains("40000"), "{err}");
        assert!(!env.path("bad.phi").exists());
        assert!(temps(env.dir.path()).is_empty());
    }
    // From a pipe, short: refused before the final chunk, so that even a
    // ciphertext already on stdout does not decrypt as complete.
    let mut child = env
        .cmd()
        .args(["encrypt", "--expect-size", "1000000", "-o", "-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&[5u8; 70_000]);
    });
    let o = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 2, "{err}");
    assert!(err.contains("70000"), "{err}");
    fs::write(env.path("piped.phi"), &o.stdout).unwrap();
    env.fails(&["verify", "piped.phi"], 2);
    // A directory's size is not the plaintext's: usage error.
    fs::create_dir(env.path("d")).unwrap();
    env.fails(&["encrypt", "--expect-size", "10", "-o", "d.phi", "d"], 1);
    assert!(!env.path("d.phi").exists());
}

#[test]
fn destroy_without_a_terminal_needs_yes_and_names_the_old_copies() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    env.ok(&["keys", "rotate", "local:backups"]);
    env.ok(&["keys", "disable", "local:backups", "--version", "1"]);
    // No terminal (stdin is /dev/null) and no --yes: refused, nothing
    // destroyed.
    let err = env.fails(&["keys", "destroy", "local:backups", "--version", "1"], 1);
    assert!(err.contains("--yes"), "{err}");
    let o = env.ok(&["keys", "show", "--json", "local:backups"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["versions"][0]["state"], "disabled");
    // With --yes it is destroyed, and the operator is told that old
    // copies of the keystore file still hold the version.
    let o = env.ok(&[
        "keys",
        "destroy",
        "--yes",
        "local:backups",
        "--version",
        "1",
    ]);
    let out = stdout(&o);
    assert!(out.contains("is destroyed"), "{out}");
    assert!(
        out.contains("copies of the keystore file") && out.contains("still hold"),
        "{out}"
    );
    let o = env.ok(&["keys", "show", "--json", "local:backups"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["versions"][0]["state"], "destroyed");
}

#[test]
fn a_missing_keystore_is_never_created_implicitly() {
    let env = Env::new();
    fs::write(env.path("f"), b"phi").unwrap();
    // A fresh machine: encrypt refuses and names the path and `keys init`.
    let err = env.fails(&["encrypt", "-o", "f.phi", "f"], 3);
    assert!(err.contains(&env.keystore.display().to_string()), "{err}");
    assert!(err.contains("backup keys init"), "{err}");
    assert!(!env.keystore.exists(), "a keystore was created");
    assert!(!env.path("keys").exists(), "its directory was created");
    assert!(!env.path("f.phi").exists());
    // A typo in the path of an existing keystore: refused the same way,
    // nothing created beside the real one.
    env.ok(&["keys", "init"]);
    let typo = env.path("keys/keystroe.json");
    let err = env.fails(
        &[
            "--keystore",
            typo.to_str().unwrap(),
            "encrypt",
            "-o",
            "f.phi",
            "f",
        ],
        3,
    );
    assert!(err.contains(&typo.display().to_string()), "{err}");
    assert!(!typo.exists());
    // Only the real keystore (and its lock file) beside it.
    let beside = names(&env.path("keys"));
    assert!(
        beside.iter().all(|n| n.starts_with("keystore.json")),
        "{beside:?}"
    );
    assert!(!env.path("f.phi").exists());
    // Only `keys init` creates one.
    env.ok(&["encrypt", "-o", "f.phi", "f"]);
}

/// Who this process runs as, the way an operator would name it: the login
/// name of its uid in /etc/passwd, else `uid:N`.
fn os_user() -> String {
    let uid = fs::metadata("/proc/self").unwrap().uid();
    fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string() && !f[0].is_empty()).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// The actors of the audit log's events.
fn actors(env: &Env) -> Vec<String> {
    fs::read_to_string(env.path("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["type"] == "event")
        .map(|e| e["event"]["actor"].as_str().unwrap_or("<none>").to_owned())
        .collect()
}

#[test]
fn the_actor_is_never_unknown() {
    let env = Env::new();
    // No --actor, no PHI_ENVELOPE_ACTOR, and a $USER that any process
    // could have set: the OS user is recorded, for data and key
    // management alike.
    // Half of the commands also without $USER and $LOGNAME (a cron job, a
    // systemd unit): never "unknown".
    let run = |args: &[&str], user: Option<&str>| {
        let mut c = env.cmd();
        c.env_remove("PHI_ENVELOPE_ACTOR").env_remove("LOGNAME");
        match user {
            Some(u) => c.env("USER", u),
            None => c.env_remove("USER"),
        };
        let o = c
            .args(["--audit-log", "audit.jsonl"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["keys", "init"], None);
    fs::write(env.path("f"), b"phi").unwrap();
    run(&["encrypt", "-o", "f.phi", "f"], None);
    run(&["keys", "rotate", "local:backups"], Some("someone-else"));
    run(&["decrypt", "-o", "f.out", "f.phi"], Some("someone-else"));
    let got = actors(&env);
    assert!(got.len() >= 4, "{got:?}");
    let want = os_user();
    assert!(want != "unknown" && !want.is_empty());
    assert!(got.iter().all(|a| *a == want), "want {want}: {got:?}");
    // An explicit --actor wins, also over an empty PHI_ENVELOPE_ACTOR.
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_ACTOR", "")
        .args([
            "--audit-log",
            "audit.jsonl",
            "--actor",
            "carol",
            "keys",
            "show",
            "local:backups",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(actors(&env).last().unwrap(), "carol");
    // An empty or blank PHI_ENVELOPE_ACTOR is no name: the OS user again.
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_ACTOR", "  ")
        .args([
            "--audit-log",
            "audit.jsonl",
            "keys",
            "show",
            "local:backups",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(*actors(&env).last().unwrap(), want);
}

/// True when `err` tells the operator to enable a version.
fn suggests_enable(err: &str) -> bool {
    err.contains("keys enable")
        || err.contains("enable a version")
        || err.contains("enable it")
        || err.contains("Enable")
}

#[test]
fn error_hints_name_cli_commands_and_never_enable_for_a_retired_version() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("f"), b"phi").unwrap();
    env.ok(&["encrypt", "-o", "v1.phi", "f"]);
    env.ok(&["keys", "rotate", "local:backups"]);
    env.ok(&["keys", "disable", "local:backups", "--version", "1"]);
    // A retired (disabled) version: the fix is decrypt-only, never
    // `enable`, which would make v1 primary again and undo the rotation.
    let err = env.fails(&["decrypt", "-o", "x", "v1.phi"], 3);
    assert!(err.contains("disabled"), "{err}");
    assert!(
        err.contains("backup keys decrypt-only local:backups --version 1"),
        "{err}"
    );
    assert!(!suggests_enable(&err), "{err}");
    // An unknown key: the CLI command to create it, not a library call.
    let err = env.fails(&["encrypt", "--key", "local:nope", "-o", "y.phi", "f"], 3);
    assert!(err.contains("backup keys create local:nope"), "{err}");
    assert!(!err.contains("::") && !err.contains("create_key"), "{err}");
    // No primary version left: rotate, not enable.
    env.ok(&["keys", "decrypt-only", "local:backups", "--version", "2"]);
    let err = env.fails(&["encrypt", "-o", "z.phi", "f"], 3);
    assert!(err.contains("backup keys rotate local:backups"), "{err}");
    assert!(!suggests_enable(&err), "{err}");
    // The primary cannot be destroyed: the commands that make it possible.
    env.ok(&["keys", "rotate", "local:backups"]);
    let err = env.fails(
        &[
            "keys",
            "destroy",
            "--yes",
            "local:backups",
            "--version",
            "3",
        ],
        3,
    );
    assert!(err.contains("backup keys rotate local:backups"), "{err}");
    assert!(!env.path("x").exists() && !env.path("y.phi").exists());
}

/// A dropped terminal or ssh session (SIGHUP) and Ctrl-\ (SIGQUIT) are
/// interrupts like Ctrl-C: the producer that dies of the same hangup ends
/// the input, and nothing is committed nor left behind.
#[test]
fn sighup_and_sigquit_then_end_of_input_commit_nothing() {
    for (name, number) in [("-HUP", 1), ("-QUIT", 3)] {
        let env = Env::new();
        env.ok(&["keys", "init"]);
        let mut child = encrypt_from_pipe(&env, &[]);
        let pid = child.id();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![7u8; 100_000]).unwrap();
        wait_until("the CLI waits for more input", || {
            blocked_reading_stdin(pid)
        });
        signal(pid, name);
        wait_until("the signal is delivered", || signal_delivered(pid, number));
        drop(stdin);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 130, "{name}: {err}");
        assert!(err.contains("interrupted"), "{name}: {err}");
        assert!(!env.path("out.phi").exists(), "{name}: committed");
        assert!(
            temps(env.dir.path()).is_empty(),
            "{name}: a temporary file is left"
        );
    }
}
