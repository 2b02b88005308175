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

    let out = stdout(&e.ok(&[
        "audit",
        "checkpoint-keygen",
        "--unsealed",
        "--out",
        "cp.seed",
    ]));
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
    e.fails(
        &[
            "audit",
            "checkpoint-keygen",
            "--unsealed",
            "--out",
            "cp.seed",
        ],
        4,
    );

    // Signing verifies the keyed chain first: it needs the audit key.
    e.ok(&[
        "--audit-key-file",
        "audit.key",
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
    e.ok(&[
        "audit",
        "checkpoint-keygen",
        "--unsealed",
        "--out",
        "other.seed",
    ]);
    e.ok(&[
        "--audit-key-file",
        "audit.key",
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
    let count = |actor: &str, op: &str, key: &str| -> u64 {
        rows.iter()
            .filter(|r| r["actor"] == actor && r["operation"] == op && r["key_ref"] == key)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("bob", "unwrap", "local:backups"), 2, "{out}");
    assert!(count("alice", "generate", "local:backups") >= 1, "{out}");
    // The chain is keyed by default: each run unseals the audit key, and
    // that key use is in the trail too.
    assert_eq!(count("bob", "unwrap", "local:audit"), 2, "{out}");
    assert_eq!(count("alice", "create-key", "local:audit"), 1, "{out}");
    assert!(rows.iter().all(|r| r["day"].as_str().unwrap().len() == 10));
    let text = stdout(&e.ok(&["audit", "report", "audit.jsonl"]));
    assert!(text.contains("\tbob\t"), "{text}");
}

/// A checkpoint vouches for what it signs to anyone with the public key:
/// a trail whose keyed chain does not verify (a line changed or inserted
/// by someone without the audit key) is never signed.
#[test]
fn a_chain_that_does_not_verify_is_never_signed() {
    let e = Env::new();
    fs::write(e.path("audit.key"), "cd".repeat(32)).unwrap();
    let keyed = |args: &[&str]| {
        let mut a = vec![
            "--audit-log",
            "audit.jsonl",
            "--audit-key-file",
            "audit.key",
        ];
        a.extend(args);
        a.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let run = |args: &[&str]| {
        let a = keyed(args);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        e.ok(&a)
    };
    run(&["keys", "init"]);
    run(&["keys", "list"]);
    e.ok(&[
        "audit",
        "checkpoint-keygen",
        "--unsealed",
        "--out",
        "cp.seed",
    ]);
    let sign = [
        "--audit-key-file",
        "audit.key",
        "audit",
        "checkpoint",
        "audit.jsonl",
        "--signing-key",
        "cp.seed",
        "--out",
        "cp.jsonl",
    ];
    e.ok(&sign);
    let signed = fs::read_to_string(e.path("cp.jsonl")).unwrap();
    // Someone without the audit key changes a line.
    let log = fs::read_to_string(e.path("audit.jsonl")).unwrap();
    fs::write(
        e.path("audit.jsonl"),
        log.replacen(r#""actor":"cli-test""#, r#""actor":"cli-tesT""#, 1),
    )
    .unwrap();
    assert_ne!(
        fs::read_to_string(e.path("audit.jsonl")).unwrap(),
        log,
        "the test changed nothing"
    );
    let err = e.fails(&sign, 2);
    assert!(err.contains("no checkpoint was signed"), "{err}");
    assert_eq!(fs::read_to_string(e.path("cp.jsonl")).unwrap(), signed);
}
