//! `backup audit checkpoint-keygen`, `audit checkpoint` and `audit verify
//! --checkpoints`: an auditor with the public key only checks a file log,
//! and a history rewritten with the audit key is refused (exit 2).

mod cli_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cli_support::{stdout, Env};

#[test]
fn checkpoints_through_the_cli() {
    let e = Env::new();
    fs::write(e.path("audit.key"), "ab".repeat(32)).unwrap();
    let w = [
        "--audit-log",
        "audit.jsonl",
        "--audit-key-file",
        "audit.key",
    ];
    let run = |args: &[&str]| {
        let mut a = w.to_vec();
        a.extend(args);
        e.ok(&a)
    };
    run(&["keys", "init"]);
    fs::write(e.path("f"), b"phi").unwrap();
    run(&["encrypt", "-o", "f.phi", "f"]);

    let out = stdout(&e.ok(&["audit", "checkpoint-keygen", "--out", "cp.seed"]));
    let pk = out
        .split_whitespace()
        .nth(3)
        .expect("the public key is printed")
        .to_owned();
    assert_eq!(pk.len(), 64, "{out}");
    let mode = fs::metadata(e.path("cp.seed"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never overwritten.
    e.fails(&["audit", "checkpoint-keygen", "--out", "cp.seed"], 4);

    e.ok(&[
        "audit",
        "checkpoint",
        "audit.jsonl",
        "--signing-key",
        "cp.seed",
        "--out",
        "cp.jsonl",
    ]);
    run(&["decrypt", "-o", "f.out", "f.phi"]);
    // The auditor: no audit key, the public key only.
    let verify = [
        "audit",
        "verify",
        "audit.jsonl",
        "--checkpoints",
        "cp.jsonl",
        "--checkpoint-public-key",
        &pk,
    ];
    let out = stdout(&e.ok(&verify));
    assert!(out.contains("OK checkpoints: 1 checkpoint(s)"), "{out}");
    // With the audit key as well, the chain is verified too.
    let mut both = vec!["--audit-key-file", "audit.key"];
    both.extend(verify);
    let out = stdout(&e.ok(&both));
    assert!(out.contains("chain intact"), "{out}");

    // The log's host rewrites the history with the audit key: the chain
    // verifies, the checkpoint does not.
    fs::remove_file(e.path("audit.jsonl")).unwrap();
    run(&["keys", "list"]);
    run(&["keys", "list"]);
    run(&["keys", "list"]);
    let mut chain = vec!["--audit-key-file", "audit.key"];
    chain.extend(["audit", "verify", "audit.jsonl"]);
    e.ok(&chain);
    let err = e.fails(&verify, 2);
    assert!(
        err.contains("REWRITTEN") || err.contains("cut short"),
        "{err}"
    );

    // A checkpoint of another key is refused.
    e.ok(&["audit", "checkpoint-keygen", "--out", "other.seed"]);
    e.ok(&[
        "audit",
        "checkpoint",
        "audit.jsonl",
        "--signing-key",
        "other.seed",
        "--out",
        "other.jsonl",
    ]);
    let err = e.fails(
        &[
            "audit",
            "verify",
            "audit.jsonl",
            "--checkpoints",
            "other.jsonl",
            "--checkpoint-public-key",
            &pk,
        ],
        2,
    );
    assert!(err.contains("signed by"), "{err}");
}

/// `backup audit report`: one row per day, key, actor, purpose, operation
/// and outcome, with its count.
#[test]
fn report_summarises_who_used_which_key() {
    let e = Env::new();
    let w = ["--audit-log", "audit.jsonl"];
    let run = |actor: &str, args: &[&str]| {
        let mut a = w.to_vec();
        a.extend(["--actor", actor]);
        a.extend(args);
        e.ok(&a)
    };
    run("alice", &["keys", "init"]);
    fs::write(e.path("f"), b"phi").unwrap();
    run("alice", &["encrypt", "-o", "f.phi", "f"]);
    run("bob", &["decrypt", "-o", "f.out", "f.phi"]);
    run("bob", &["decrypt", "--force", "-o", "f.out", "f.phi"]);
    let out = stdout(&e.ok(&["audit", "report", "audit.jsonl", "--json"]));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |actor: &str, op: &str| -> u64 {
        rows.iter()
            .filter(|r| r["actor"] == actor && r["operation"] == op)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("bob", "unwrap"), 2, "{out}");
    assert!(count("alice", "generate") >= 1, "{out}");
    assert!(rows.iter().all(|r| r["day"].as_str().unwrap().len() == 10));
    let text = stdout(&e.ok(&["audit", "report", "audit.jsonl"]));
    assert!(text.contains("\tbob\t"), "{text}");
}
