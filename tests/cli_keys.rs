//! End-to-end tests of the key lifecycle through the `backup` CLI: init,
//! list, rotate then restore old backups, disable and enable, destroy
//! (crypto-shredding), rewrap in place; and the audit log with
//! `audit verify`.

mod cli_support;

use std::fs;

use cli_support::{code, stdout, Env};

#[test]
fn init_list_rotate_disable_destroy_and_rewrap() {
    let env = Env::new();
    let o = env.ok(&["keys", "init"]);
    assert!(stdout(&o).contains("local:backups"));
    // A second init of the same key is refused.
    env.fails(&["keys", "init"], 1);
    env.ok(&["keys", "create", "local:archive"]);

    fs::write(env.path("v1.sql"), b"under version 1").unwrap();
    env.ok(&["encrypt", "--context", "db=emr", "-o", "v1.phi", "v1.sql"]);
    let o = env.ok(&["keys", "rotate", "local:backups"]);
    assert!(
        stdout(&o).contains("version 2 is now primary"),
        "{}",
        stdout(&o)
    );
    fs::write(env.path("v2.sql"), b"under version 2").unwrap();
    env.ok(&["encrypt", "--context", "db=emr", "-o", "v2.phi", "v2.sql"]);

    let o = env.ok(&["keys", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let b = keys.iter().find(|k| k["ref"] == "local:backups").unwrap();
    assert_eq!(b["primary_version"], 2);
    assert_eq!(b["versions"][0]["state"], "decrypt-only");
    assert_eq!(b["versions"][1]["state"], "enabled");
    assert!(b["versions"][0]["created_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let o = env.ok(&["keys", "list"]);
    assert!(stdout(&o).contains("decrypt-only"));

    // Old backups still restore after the rotation.
    env.ok(&["decrypt", "--context", "db=emr", "-o", "v1.out", "v1.phi"]);
    assert_eq!(fs::read(env.path("v1.out")).unwrap(), b"under version 1");
    let inspect = |f: &str| -> u64 {
        let o = env.ok(&["inspect", "--json", f]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["recipients"][0]["key_version"].as_u64().unwrap()
    };
    assert_eq!(inspect("v1.phi"), 1);
    assert_eq!(inspect("v2.phi"), 2);

    // Disable version 1: its backups cannot be restored (3) until enabled.
    env.ok(&["keys", "disable", "local:backups", "--version", "1"]);
    let err = env.fails(&["decrypt", "--context", "db=emr", "-o", "x", "v1.phi"], 3);
    assert!(err.contains("disabled"), "{err}");
    env.ok(&["keys", "decrypt-only", "local:backups", "--version", "1"]);
    env.ok(&["verify", "--context", "db=emr", "v1.phi"]);

    // Rewrap in place to the current primary: body untouched, header new,
    // and a rewrap needs the right context.
    let before = fs::read(env.path("v1.phi")).unwrap();
    env.fails(&["rewrap", "--context", "db=other", "v1.phi"], 2);
    assert_eq!(fs::read(env.path("v1.phi")).unwrap(), before);
    let o = env.ok(&["rewrap", "--context", "db=emr", "v1.phi", "v2.phi"]);
    let out = stdout(&o);
    assert!(
        out.contains("rewrapped v1.phi: local:backups v1 -> local:backups v2"),
        "{out}"
    );
    assert!(out.contains("unchanged v2.phi"), "{out}");
    assert_eq!(inspect("v1.phi"), 2);
    let after = fs::read(env.path("v1.phi")).unwrap();
    let o = env.ok(&["inspect", "--json", "v1.phi"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let body = v["body_bytes"].as_u64().unwrap() as usize;
    assert_eq!(before.len(), after.len());
    assert_eq!(
        before[before.len() - body..],
        after[after.len() - body..],
        "the body changed"
    );
    assert_ne!(
        before[..before.len() - body],
        after[..after.len() - body],
        "the header did not change"
    );
    // Rewrap to another key.
    env.ok(&[
        "rewrap",
        "--key",
        "local:archive",
        "--context",
        "db=emr",
        "v2.phi",
    ]);
    let o = env.ok(&["inspect", "--json", "v2.phi"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["recipients"][0]["key_ref"], "local:archive");
    // No temporary file was left by the rewraps.
    assert!(cli_support::names(env.dir.path())
        .iter()
        .all(|n| !n.starts_with('.')));

    // Destroy version 1 (after disabling it): a copy of the old backup is
    // gone for good (3), the rewrapped one still restores.
    fs::write(env.path("v1-old-copy.phi"), &before).unwrap();
    env.ok(&["keys", "disable", "local:backups", "--version", "1"]);
    // The primary cannot be destroyed.
    env.fails(
        &[
            "keys",
            "destroy",
            "--yes",
            "local:backups",
            "--version",
            "2",
        ],
        3,
    );
    // Without a terminal, destroying needs --yes.
    env.ok(&[
        "keys",
        "destroy",
        "--yes",
        "local:backups",
        "--version",
        "1",
    ]);
    let err = env.fails(
        &[
            "decrypt",
            "--context",
            "db=emr",
            "-o",
            "x",
            "v1-old-copy.phi",
        ],
        3,
    );
    assert!(err.contains("destroyed"), "{err}");
    env.ok(&["decrypt", "--context", "db=emr", "-o", "v1.again", "v1.phi"]);
    assert_eq!(fs::read(env.path("v1.again")).unwrap(), b"under version 1");
    let o = env.ok(&["keys", "show", "--json", "local:backups"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["versions"][0]["state"], "destroyed");
    // Unknown keys are a key problem, with a hint.
    env.fails(&["keys", "rotate", "local:nope"], 3);
}

#[test]
fn audit_log_is_written_verified_and_tampering_is_named() {
    let env = Env::new();
    fs::write(env.path("f"), b"phi").unwrap();
    let log = env.path("audit.jsonl");
    let key = env.path("audit.key");
    fs::write(&key, "42".repeat(32)).unwrap();
    let with_log = |args: &[&str]| {
        let mut a = vec![
            "--audit-log",
            "audit.jsonl",
            "--audit-key-file",
            "audit.key",
            "--actor",
            "alice",
        ];
        a.extend_from_slice(args);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let o = env.cmd().args(&args).output().unwrap();
        assert_eq!(
            code(&o),
            0,
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    run(with_log(&["keys", "init"]));
    run(with_log(&[
        "encrypt",
        "--context",
        "case=1",
        "-o",
        "f.phi",
        "f",
    ]));
    run(with_log(&[
        "decrypt",
        "--context",
        "case=1",
        "-o",
        "f.out",
        "f.phi",
    ]));
    run(with_log(&["keys", "rotate", "local:backups"]));

    let text = fs::read_to_string(&log).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["type"] == "event")
        .collect();
    let ops: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["operation"].as_str().unwrap())
        .collect();
    for op in ["create-key", "generate", "unwrap", "rotate"] {
        assert!(ops.contains(&op), "no {op} event in {ops:?}");
    }
    assert!(events.iter().all(|e| e["event"]["actor"] == "alice"));
    // No context value and no plaintext in the log.
    assert!(!text.contains("case") && !text.contains("\"1\"") && !text.contains("phi\""));

    let o = env.ok(&[
        "--audit-key-file",
        "audit.key",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
    assert!(stdout(&o).starts_with("OK"), "{}", stdout(&o));
    let o = env.ok(&[
        "--audit-key-file",
        "audit.key",
        "audit",
        "verify",
        "--json",
        "audit.jsonl",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["entries"].as_u64().unwrap() >= 4);
    // Without the key a keyed log is not accepted as verified.
    let o = env.run(&["audit", "verify", "audit.jsonl"]);
    assert_ne!(code(&o), 0);

    // Edit one event (a different actor): verify names that line, exit 2.
    let lines: Vec<&str> = text.lines().collect();
    let target = lines
        .iter()
        .position(|l| l.contains("\"operation\":\"unwrap\""))
        .unwrap();
    let mut edited: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    edited[target] = edited[target].replace("\"actor\":\"alice\"", "\"actor\":\"mallory\"");
    fs::write(&log, edited.join("\n") + "\n").unwrap();
    let err = env.fails(
        &[
            "--audit-key-file",
            "audit.key",
            "audit",
            "verify",
            "audit.jsonl",
        ],
        2,
    );
    assert!(err.contains(&format!("line {}", target + 1)), "{err}");

    // Deleting a line is named too.
    let mut deleted: Vec<&str> = lines.clone();
    deleted.remove(target);
    fs::write(&log, deleted.join("\n") + "\n").unwrap();
    let err = env.fails(
        &[
            "--audit-key-file",
            "audit.key",
            "audit",
            "verify",
            "audit.jsonl",
        ],
        2,
    );
    assert!(err.contains(&format!("line {}", target + 1)), "{err}");

    // A log that cannot be written refuses the operation (fail closed): 6.
    fs::write(&log, text).unwrap();
    fs::create_dir(env.path("ro")).unwrap();
    let o = env
        .cmd()
        .args([
            "--audit-log",
            "/proc/phi-envelope-no-such-dir/audit.jsonl",
            "verify",
            "f.phi",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 6, "{}", String::from_utf8_lossy(&o.stderr));
}

/// Two runs that shared the audit log without its lock (an older version,
/// a copy written back) forked its chain: the next run uses no key (exit 6),
/// writes nothing, and its error says how to start a new log (the verify
/// command, moving the files, the setting that names the log). Following
/// it gives a working log again.
#[test]
fn a_forked_audit_log_is_refused_and_the_error_says_how_to_start_a_new_one() {
    let env = Env::new();
    fs::write(env.path("f"), b"phi").unwrap();
    let log = env.path("audit.jsonl");
    fs::write(env.path("audit.key"), "42".repeat(32)).unwrap();
    let args = |log: &str, rest: &[&str]| {
        let mut a = vec!["--audit-log", log, "--audit-key-file", "audit.key"];
        a.extend_from_slice(rest);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let encrypt = |out: &'static str| ["encrypt", "--context", "case=1", "-o", out, "f"];
    let o = env
        .cmd()
        .args(args("audit.jsonl", &["keys", "init"]))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    // The fork: a second writer continued a copy of the same tail.
    fs::copy(&log, env.path("copy.jsonl")).unwrap();
    for (l, out) in [("audit.jsonl", "1.phi"), ("copy.jsonl", "2.phi")] {
        let o = env.cmd().args(args(l, &encrypt(out))).output().unwrap();
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    }
    let copy = fs::read_to_string(env.path("copy.jsonl")).unwrap();
    let mut forked = fs::read_to_string(&log).unwrap();
    forked.push_str(copy.lines().next_back().unwrap());
    forked.push('\n');
    fs::write(&log, &forked).unwrap();

    let o = env
        .cmd()
        .args(args("audit.jsonl", &encrypt("3.phi")))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(code(&o), 6, "{err}");
    for needed in [
        "audit verify",
        "evidence",
        "new log",
        "--audit-log",
        "PHI_ENVELOPE_AUDIT_LOG",
    ] {
        assert!(
            err.contains(needed),
            "the error does not say {needed:?}: {err}"
        );
    }
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        forked,
        "nothing appended"
    );

    // The way out it describes: keep the old log as evidence, start anew.
    fs::create_dir(env.path("evidence")).unwrap();
    fs::rename(&log, env.path("evidence/audit.jsonl")).unwrap();
    let o = env
        .cmd()
        .args(args("audit.jsonl", &encrypt("4.phi")))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    env.ok(&[
        "--audit-key-file",
        "audit.key",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
}

/// A run killed in the middle of an append leaves a torn last line. Under
/// the log's lock only a dead writer can have left it, so the next run cuts
/// it off and records a `torn-tail` gap line instead of stopping every
/// later run; the log still verifies.
#[test]
fn a_line_torn_by_a_killed_run_is_cut_off_by_the_next_run() {
    let env = Env::new();
    fs::write(env.path("f"), b"phi").unwrap();
    let log = env.path("audit.jsonl");
    let args = |rest: &[&str]| {
        let mut a = vec!["--audit-log", "audit.jsonl"];
        a.extend_from_slice(rest);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let o = env.cmd().args(args(&["keys", "init"])).output().unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let text = fs::read_to_string(&log).unwrap();
    let last = text.lines().next_back().unwrap().to_owned();
    let mut torn = text.clone();
    torn.push_str(&last[..last.len() / 2]);
    fs::write(&log, &torn).unwrap();

    let o = env
        .cmd()
        .args(args(&[
            "encrypt",
            "--context",
            "case=1",
            "-o",
            "1.phi",
            "f",
        ]))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let after = fs::read_to_string(&log).unwrap();
    assert!(after.starts_with(&text), "the complete lines are kept");
    assert!(after.contains("torn-tail"), "{after}");
    assert!(after.ends_with('\n'));
    env.ok(&["audit", "verify", "audit.jsonl"]);
}
