//! Dual control through the `backup` CLI: custodians generate their keys
//! (`custodian keygen`), sign approvals (`keys approve`), and a destroy
//! under `--custodians` is refused with one approval (nothing changes) and
//! done with two from distinct custodians, which the audit log names.

mod cli_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cli_support::{stdout, Env};

#[test]
fn destroy_is_refused_with_one_approval_and_done_with_two() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("v1.sql"), b"under version 1").unwrap();
    env.ok(&["encrypt", "-o", "v1.phi", "v1.sql"]);
    env.ok(&["keys", "rotate", "local:backups"]);

    // Two custodians and the registry: threshold 2.
    let mut registry = String::from("# test custodians\nthreshold 2\n");
    for id in ["alice", "bob"] {
        let key = format!("{id}.key");
        let o = env.ok(&["custodian", "keygen", "--id", id, "--out", &key]);
        let line = stdout(&o);
        assert!(
            line.starts_with(&format!("custodian {id} ed25519:")),
            "{line}"
        );
        registry.push_str(&line);
        let mode = fs::metadata(env.path(&key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
        // A key file is never overwritten.
        env.fails(&["custodian", "keygen", "--id", id, "--out", &key], 5);
    }
    fs::write(env.path("custodians"), &registry).unwrap();

    let approve = |who: &str, out: &str| {
        let o = env.ok(&[
            "keys",
            "approve",
            "--key",
            "local:backups",
            "--version",
            "1",
            "--operation",
            "destroy",
            "--expires-in",
            "1h",
            "--custodian-key",
            &format!("{who}.key"),
            "--out",
            out,
        ]);
        assert!(
            stdout(&o).contains(&format!(
                "custodian {who} approved destroy of local:backups version 1"
            )),
            "{}",
            stdout(&o)
        );
    };
    approve("alice", "alice.approval");
    approve("bob", "bob.approval");

    let destroy = |approvals: &[&str]| {
        let mut args = vec![
            "--custodians",
            "custodians",
            "--audit-log",
            "audit.jsonl",
            "keys",
            "destroy",
            "--yes",
            "local:backups",
            "--version",
            "1",
        ];
        for a in approvals {
            args.extend(["--approval", a]);
        }
        args.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };

    // Without approvals, with one, and with one given twice: refused (3).
    for (approvals, expected) in [
        (vec![], "got 0; missing 2"),
        (vec!["alice.approval"], "got 1 (alice); missing 1"),
        (
            vec!["alice.approval", "alice.approval"],
            "got 1 (alice) (approvals by one custodian count once); missing 1",
        ),
    ] {
        let args = destroy(&approvals);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = env.fails(&refs, 3);
        assert!(
            err.contains("dual control: destroy of local:backups version 1 needs approvals from 2 distinct custodians"),
            "{err}"
        );
        assert!(err.contains(expected), "{err}");
    }
    // Nothing changed: the old backup still restores.
    env.ok(&["decrypt", "-o", "v1.out", "v1.phi"]);
    assert_eq!(fs::read(env.path("v1.out")).unwrap(), b"under version 1");

    // An approval for another version is refused by name.
    env.ok(&[
        "keys",
        "approve",
        "--key",
        "local:backups",
        "--version",
        "2",
        "--operation",
        "destroy",
        "--custodian-key",
        "bob.key",
        "--out",
        "bob-v2.approval",
    ]);
    let args = destroy(&["alice.approval", "bob-v2.approval"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = env.fails(&refs, 3);
    assert!(
        err.contains("approval 2 (custodian bob) is for destroy of local:backups version 2"),
        "{err}"
    );

    // Two distinct custodians: destroyed.
    let args = destroy(&["alice.approval", "bob.approval"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = env.ok(&refs);
    assert!(stdout(&o).contains("is destroyed"), "{}", stdout(&o));
    let err = env.fails(&["decrypt", "-o", "v1.again", "v1.phi"], 3);
    assert!(err.contains("destroyed"), "{err}");

    // The same approvals in a later run (another process) are refused:
    // the spent-approvals file beside the keystore remembers them.
    let args = destroy(&["alice.approval", "bob.approval"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = env.fails(&refs, 3);
    assert!(
        err.contains("approval 1 (custodian alice) was already used (recorded in"),
        "{err}"
    );
    assert!(err.contains("spent-approvals"), "{err}");

    // The audit log names the approvers of the destroy, and verifies.
    let log = fs::read_to_string(env.path("audit.jsonl")).unwrap();
    let destroys: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "event" && v["event"]["operation"] == "destroy")
        .map(|v| v["event"].clone())
        .collect();
    assert_eq!(destroys.len(), 6, "{destroys:?}");
    assert_eq!(destroys[4]["outcome"], "success");
    assert_eq!(
        destroys[4]["approvers"],
        serde_json::json!(["alice", "bob"])
    );
    assert!(destroys
        .iter()
        .enumerate()
        .all(|(i, e)| i == 4 || e["outcome"] == "failed:approval"));
    env.ok(&["audit", "verify", "audit.jsonl"]);
}

#[test]
fn bad_custodian_files_and_approvals_are_clear_errors() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    env.ok(&["keys", "rotate", "local:backups"]);
    fs::write(env.path("custodians"), "threshold 3\n").unwrap();
    let err = env.fails(
        &[
            "--custodians",
            "custodians",
            "keys",
            "disable",
            "local:backups",
            "--version",
            "1",
        ],
        3,
    );
    assert!(err.contains("custodians file"), "{err}");
    assert!(err.contains("only 0 custodian(s)"), "{err}");

    fs::write(env.path("custodians"), "threshold 1\nfrobnicate\n").unwrap();
    let err = env.fails(
        &[
            "--custodians",
            "custodians",
            "keys",
            "disable",
            "local:backups",
            "--version",
            "1",
        ],
        3,
    );
    assert!(
        err.contains("line 2: unknown statement \"frobnicate\""),
        "{err}"
    );

    fs::write(env.path("not-an-approval"), "{}").unwrap();
    let err = env.fails(
        &[
            "keys",
            "disable",
            "local:backups",
            "--version",
            "1",
            "--approval",
            "not-an-approval",
        ],
        1,
    );
    assert!(err.contains("not an approval"), "{err}");

    env.ok(&["custodian", "keygen", "--id", "alice", "--out", "alice.key"]);
    let err = env.fails(
        &[
            "keys",
            "approve",
            "--key",
            "local:backups",
            "--version",
            "1",
            "--operation",
            "rotate",
            "--custodian-key",
            "alice.key",
            "--out",
            "a",
        ],
        1,
    );
    assert!(err.contains("unknown operation \"rotate\""), "{err}");
    let err = env.fails(
        &[
            "keys",
            "approve",
            "--key",
            "local:backups",
            "--version",
            "1",
            "--operation",
            "disable",
            "--expires-in",
            "soon",
            "--custodian-key",
            "alice.key",
            "--out",
            "a",
        ],
        1,
    );
    assert!(err.contains("--expires-in"), "{err}");
    // Approvals without dual control configured are refused, not ignored.
    env.ok(&[
        "keys",
        "approve",
        "--key",
        "local:backups",
        "--version",
        "1",
        "--operation",
        "disable",
        "--custodian-key",
        "alice.key",
        "--out",
        "a",
    ]);
    let err = env.fails(
        &[
            "keys",
            "disable",
            "local:backups",
            "--version",
            "1",
            "--approval",
            "a",
        ],
        1,
    );
    assert!(err.contains("no dual control"), "{err}");
}
