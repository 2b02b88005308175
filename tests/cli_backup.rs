//! End-to-end tests of the `backup` CLI (examples/backup.rs): round trips,
//! verification, corrupt and foreign inputs, wrong keys and contexts,
//! overwrite refusal, inspect, the restore drill. They run the built
//! binary as an operator would.

mod cli_support;

use std::fs;
use std::io::Write;
use std::process::Stdio;

use cli_support::{code, make_tree, names, snapshot, stdout, unlock, Env};

#[test]
fn directory_round_trip_keeps_every_byte_mode_and_mtime() {
    let env = Env::new();
    // Only `keys init` creates the keystore and the key; encrypt uses them.
    let o = env.ok(&["keys", "init"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("created a new keystore"), "{err}");
    assert!(env.keystore.exists());
    let src = env.path("src");
    make_tree(&src);
    let o = env.ok(&[
        "encrypt",
        "--context",
        "site=st-mary",
        "-o",
        "src.phi",
        "src",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("created"), "{err}");
    env.ok(&[
        "decrypt",
        "--context",
        "site=st-mary",
        "-o",
        "restored",
        "src.phi",
    ]);
    assert_eq!(snapshot(&src), snapshot(&env.path("restored")));
    // Nothing left beside the outputs.
    assert_eq!(
        names(env.dir.path()),
        ["keys", "restored", "src", "src.phi"]
    );
    unlock(&src);
    unlock(&env.path("restored"));
}

#[test]
fn file_and_stdin_stdout_round_trips() {
    let env = Env::new();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(env.path("dump.sql"), &data).unwrap();
    env.ok(&["keys", "init"]);
    env.ok(&[
        "encrypt",
        "--key",
        "local:backups",
        "-o",
        "dump.phi",
        "dump.sql",
    ]);
    env.ok(&["decrypt", "-o", "dump.out", "dump.phi"]);
    assert_eq!(fs::read(env.path("dump.out")).unwrap(), data);

    // stdin -> stdout -> stdin -> stdout
    let mut enc = env
        .cmd()
        .args(["encrypt", "-o", "-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = enc.stdin.take().unwrap();
    let d = data.clone();
    let feeder = std::thread::spawn(move || input.write_all(&d));
    let sealed = enc.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert_eq!(
        code(&sealed),
        0,
        "{}",
        String::from_utf8_lossy(&sealed.stderr)
    );
    assert!(sealed.stdout.starts_with(b"PHIENV"));
    let mut dec = env
        .cmd()
        .args(["decrypt", "-o", "-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = dec.stdin.take().unwrap();
    let s = sealed.stdout.clone();
    let feeder = std::thread::spawn(move || input.write_all(&s));
    let opened = dec.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert_eq!(
        code(&opened),
        0,
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    assert_eq!(opened.stdout, data);

    // A FIFO input (process substitution) is read as a stream.
    let o = std::process::Command::new("bash")
        .current_dir(env.dir.path())
        .envs(
            env.cmd()
                .get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .arg("-c")
        .arg(format!(
            "exec '{}' encrypt -o fifo.phi <(head -c 100000 dump.sql)",
            cli_support::bin().display()
        ))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    env.ok(&["decrypt", "-o", "fifo.out", "fifo.phi"]);
    assert_eq!(fs::read(env.path("fifo.out")).unwrap(), &data[..100_000]);

    // Empty input is a valid (empty) backup.
    fs::write(env.path("empty"), b"").unwrap();
    env.ok(&["encrypt", "-o", "empty.phi", "empty"]);
    env.ok(&["decrypt", "-o", "empty.out", "empty.phi"]);
    assert_eq!(fs::read(env.path("empty.out")).unwrap(), b"");
}

#[test]
fn verify_good_tampered_truncated_foreign_and_empty_inputs() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    make_tree(&env.path("src"));
    env.ok(&["encrypt", "-o", "good.phi", "src"]);
    let good = fs::read(env.path("good.phi")).unwrap();
    let o = env.ok(&["verify", "good.phi"]);
    assert!(stdout(&o).starts_with("OK"), "{}", stdout(&o));
    assert!(stdout(&o).contains("directory"));

    // One flipped bit anywhere: in the wrapped key, in the header's tag, in
    // the body's key commitment, in a chunk, in the last byte.
    let o = env.ok(&["inspect", "--json", "good.phi"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let header_len = info["header_bytes"].as_u64().unwrap() as usize;
    let spots = [
        header_len - 40,
        header_len - 5,
        header_len + 30,
        good.len() / 2,
        good.len() - 1,
    ];
    for (i, at) in spots.into_iter().enumerate() {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        let name = format!("flip{i}.phi");
        fs::write(env.path(&name), &bad).unwrap();
        let err = env.fails(&["verify", &name], 2);
        assert!(err.is_empty() || err.contains("backup: "), "{err}");
        // And a restore of it leaves nothing.
        env.fails(&["decrypt", "-o", "out", &name], 2);
        assert!(!env.path("out").exists());
    }
    // A flipped bit in the key reference names a key nobody holds: the
    // header cannot be authenticated without a key, so this is a key
    // problem (3), said as such.
    let mut bad = good.clone();
    let at = good
        .windows(13)
        .position(|w| w == b"local:backups")
        .unwrap();
    bad[at + 7] ^= 0x01;
    fs::write(env.path("keyref.phi"), &bad).unwrap();
    let o = env.run(&["verify", "keyref.phi"]);
    assert_eq!(code(&o), 3);
    assert!(
        stdout(&o).contains("no configured key provider"),
        "{}",
        stdout(&o)
    );
    // Truncated at a chunk boundary, inside a chunk, inside the header.
    for (i, len) in [good.len() - 16_400, good.len() - 7, 20]
        .into_iter()
        .enumerate()
    {
        let name = format!("trunc{i}.phi");
        fs::write(env.path(&name), &good[..len]).unwrap();
        env.fails(&["verify", &name], 2);
        env.fails(&["decrypt", "-o", "out", &name], 2);
        assert!(!env.path("out").exists());
    }
    // Appended data.
    let mut long = good.clone();
    long.extend_from_slice(b"trailing");
    fs::write(env.path("appended.phi"), &long).unwrap();
    env.fails(&["verify", "appended.phi"], 2);
    // Foreign and empty files, a directory, a missing file.
    fs::write(
        env.path("foreign.phi"),
        b"SQLite format 3\0 and more bytes than a header needs",
    )
    .unwrap();
    fs::write(env.path("empty.phi"), b"").unwrap();
    let o = env.run(&["verify", "foreign.phi"]);
    assert_eq!(code(&o), 2);
    assert!(
        stdout(&o).contains("not a phi-envelope backup"),
        "{}",
        stdout(&o)
    );
    env.fails(&["verify", "empty.phi"], 2);
    env.fails(&["decrypt", "-o", "out", "empty.phi"], 2);
    env.fails(&["decrypt", "-o", "out", "foreign.phi"], 2);
    env.fails(&["decrypt", "-o", "out", "src"], 1);
    env.fails(&["decrypt", "-o", "out", "missing.phi"], 4);
    env.fails(&["inspect", "foreign.phi"], 2);
    assert!(!env.path("out").exists());
    // Nothing but our inputs in the directory: no temp file left anywhere.
    assert!(names(env.dir.path()).iter().all(|n| !n.starts_with('.')));
    unlock(&env.path("src"));
}

#[test]
fn wrong_key_and_wrong_context_fail_without_output() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("f"), b"lab results").unwrap();
    env.ok(&[
        "encrypt",
        "--context",
        "tenant=st-mary",
        "--context",
        "kind=labs",
        "-o",
        "f.phi",
        "f",
    ]);
    // Wrong or missing context: authentication fails (2).
    let err = env.fails(
        &[
            "decrypt",
            "--context",
            "tenant=st-john",
            "--context",
            "kind=labs",
            "-o",
            "out",
            "f.phi",
        ],
        2,
    );
    assert!(err.contains("--context"), "{err}");
    env.fails(&["decrypt", "-o", "out", "f.phi"], 2);
    env.fails(&["verify", "--context", "tenant=st-mary", "f.phi"], 2);
    assert!(!env.path("out").exists());
    // The right one, in any order.
    env.ok(&[
        "decrypt",
        "--context",
        "kind=labs",
        "--context",
        "tenant=st-mary",
        "-o",
        "out",
        "f.phi",
    ]);
    assert_eq!(fs::read(env.path("out")).unwrap(), b"lab results");

    // Another keystore with a key of the same name: the wrapped key does
    // not authenticate (2). A keystore without that key: key problem (3).
    let other = Env::new();
    other.ok(&["keys", "init"]);
    fs::copy(env.path("f.phi"), other.path("f.phi")).unwrap();
    other.fails(
        &[
            "decrypt",
            "--context",
            "kind=labs",
            "--context",
            "tenant=st-mary",
            "-o",
            "out",
            "f.phi",
        ],
        2,
    );
    let third = Env::new();
    third.ok(&["keys", "init", "--name", "other"]);
    fs::copy(env.path("f.phi"), third.path("f.phi")).unwrap();
    let err = third.fails(
        &[
            "decrypt",
            "--context",
            "kind=labs",
            "--context",
            "tenant=st-mary",
            "-o",
            "out",
            "f.phi",
        ],
        3,
    );
    assert!(err.contains("local:backups"), "{err}");
    // No keystore at all, a wrong passphrase: 3.
    let none = Env::new();
    fs::copy(env.path("f.phi"), none.path("f.phi")).unwrap();
    let err = none.fails(&["decrypt", "-o", "out", "f.phi"], 3);
    assert!(
        err.contains("keys init") || err.contains("--keystore"),
        "{err}"
    );
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_PASSPHRASE", "wrong")
        .args(["decrypt", "-o", "out2", "f.phi"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    // No passphrase and no terminal: usage (1), says what to set.
    let o = env
        .cmd()
        .env_remove("PHI_ENVELOPE_PASSPHRASE")
        .args(["decrypt", "-o", "out2", "f.phi"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("PHI_ENVELOPE_PASSPHRASE"));
    // The passphrase from a file works.
    fs::write(env.path("pass"), format!("{}\n", cli_support::PASSPHRASE)).unwrap();
    let o = env
        .cmd()
        .env_remove("PHI_ENVELOPE_PASSPHRASE")
        .args([
            "--passphrase-file",
            "pass",
            "verify",
            "--context",
            "kind=labs",
            "--context",
            "tenant=st-mary",
            "f.phi",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn refuses_to_overwrite_without_force_and_replaces_with_it() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("a"), b"first").unwrap();
    fs::write(env.path("b"), b"second").unwrap();
    fs::create_dir(env.path("dir")).unwrap();
    fs::write(env.path("dir/x"), b"x").unwrap();
    env.ok(&["encrypt", "-o", "a.phi", "a"]);
    env.ok(&["encrypt", "-o", "dir.phi", "dir"]);
    // encrypt: an existing output is kept (5), before any key is touched.
    env.fails(&["encrypt", "-o", "a.phi", "b"], 5);
    assert_eq!(
        fs::read(env.path("a.phi")).unwrap().len(),
        fs::read(env.path("a.phi")).unwrap().len()
    );
    env.ok(&["encrypt", "--force", "-o", "a.phi", "b"]);
    env.ok(&["decrypt", "-o", "out", "a.phi"]);
    assert_eq!(fs::read(env.path("out")).unwrap(), b"second");
    // decrypt onto an existing file or directory: refused, untouched.
    fs::write(env.path("keep"), b"keep me").unwrap();
    env.fails(&["decrypt", "-o", "keep", "a.phi"], 5);
    assert_eq!(fs::read(env.path("keep")).unwrap(), b"keep me");
    env.fails(&["decrypt", "-o", "dir", "dir.phi"], 5);
    env.fails(&["decrypt", "-o", "keep", "dir.phi"], 5);
    // --force replaces a file with a file and a directory with a directory.
    env.ok(&["decrypt", "--force", "-o", "keep", "a.phi"]);
    assert_eq!(fs::read(env.path("keep")).unwrap(), b"second");
    fs::write(env.path("dir/stale"), b"old").unwrap();
    env.ok(&["decrypt", "--force", "-o", "dir", "dir.phi"]);
    assert_eq!(names(&env.path("dir")), ["x"]);
    // A failed forced restore keeps the old one.
    let mut bad = fs::read(env.path("dir.phi")).unwrap();
    let n = bad.len();
    bad[n - 3] ^= 0xff;
    fs::write(env.path("bad.phi"), &bad).unwrap();
    env.fails(&["decrypt", "--force", "-o", "dir", "bad.phi"], 2);
    assert_eq!(names(&env.path("dir")), ["x"]);
    assert!(
        names(env.dir.path()).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names(env.dir.path())
    );
}

#[test]
fn raw_decrypt_gives_the_tar_stream_and_inspect_needs_no_key() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::create_dir(env.path("d")).unwrap();
    fs::write(env.path("d/f"), b"data").unwrap();
    env.ok(&["encrypt", "-o", "d.phi", "d"]);
    env.ok(&["decrypt", "--raw", "-o", "d.tar", "d.phi"]);
    let mut ar = tar::Archive::new(fs::File::open(env.path("d.tar")).unwrap());
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, [".phi-envelope-backup", "f"]);

    // inspect works without the keystore or the passphrase.
    let o = env
        .cmd()
        .env_remove("PHI_ENVELOPE_PASSPHRASE")
        .env("PHI_ENVELOPE_KEYSTORE", "/nonexistent/keystore.json")
        .args(["inspect", "--json", "d.phi"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["recipients"][0]["key_ref"], "local:backups");
    assert_eq!(v["recipients"][0]["key_version"], 1);
    assert!(v["plaintext_bytes"].as_u64().unwrap() > 1024);
    let o = env.ok(&["inspect", "d.phi"]);
    assert!(stdout(&o).contains("local:backups version 1"));
}

#[test]
fn restore_drill_verifies_every_backup_in_a_folder() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::create_dir(env.path("backups")).unwrap();
    for i in 0..4 {
        let f = format!("in{i}");
        fs::write(env.path(&f), vec![i as u8; 40_000 * i]).unwrap();
        env.ok(&[
            "encrypt",
            "--context",
            "drill=2026-Q4",
            "-o",
            &format!("backups/b{i}.phi"),
            &f,
        ]);
    }
    fs::create_dir(env.path("tree")).unwrap();
    fs::write(env.path("tree/x"), b"x").unwrap();
    env.ok(&[
        "encrypt",
        "--context",
        "drill=2026-Q4",
        "-o",
        "backups/tree.phi",
        "tree",
    ]);
    let mut all: Vec<String> = names(&env.path("backups"))
        .into_iter()
        .map(|n| format!("backups/{n}"))
        .collect();
    let mut args = vec!["verify", "--context", "drill=2026-Q4"];
    args.extend(all.iter().map(String::as_str));
    let o = env.ok(&args);
    assert!(
        stdout(&o).contains("5 verified, 0 failed"),
        "{}",
        stdout(&o)
    );

    // One damaged copy: the drill names it, the others still pass, exit 2.
    let mut b = fs::read(env.path("backups/b2.phi")).unwrap();
    b[200] ^= 0x40;
    fs::write(env.path("backups/b2.phi"), &b).unwrap();
    let mut json_args = vec!["verify", "--json", "--context", "drill=2026-Q4"];
    all.sort();
    json_args.extend(all.iter().map(String::as_str));
    let o = env.run(&json_args);
    assert_eq!(code(&o), 2);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["verified"], 4);
    assert_eq!(v["failed"], 1);
    let failed: Vec<&serde_json::Value> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["path"], "backups/b2.phi");
    assert_eq!(failed[0]["exit_code"], 2);
    let tree = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "backups/tree.phi")
        .unwrap();
    assert_eq!(tree["kind"], "directory");
    assert_eq!(tree["files"], 1);
}

#[test]
fn usage_errors_are_one_line_and_exit_1() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("f"), b"x").unwrap();
    let o = env.run(&[]);
    assert_eq!(code(&o), 1);
    let o = env.run(&["frobnicate"]);
    assert_eq!(code(&o), 1);
    let o = env.run(&["encrypt", "f"]);
    assert_eq!(code(&o), 1, "missing -o");
    env.fails(&["encrypt", "--context", "novalue", "-o", "f.phi", "f"], 1);
    env.fails(
        &[
            "encrypt",
            "--context",
            "a=1",
            "--context",
            "a=2",
            "-o",
            "f.phi",
            "f",
        ],
        1,
    );
    env.fails(&["encrypt", "--key", "local:", "-o", "f.phi", "f"], 1);
    env.fails(&["encrypt", "--key", "nope:thing", "-o", "f.phi", "f"], 1);
    env.fails(&["keys", "rotate", "local:bad name"], 1);
    assert!(!env.path("f.phi").exists());
    let o = env.run(&["--help"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("Exit codes"));
    // Backing up a directory into itself is refused.
    fs::create_dir(env.path("d")).unwrap();
    env.fails(&["encrypt", "-o", "d/self.phi", "d"], 1);
}
