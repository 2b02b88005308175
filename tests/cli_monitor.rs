//! Key-access monitoring through the `backup` CLI: `audit monitor` replays
//! a trail made by a workload that triggers the rules (a key created and
//! rotated, a version disabled, a decryption by an actor never seen
//! before) and writes their alerts as JSON Lines, exit 7; the rules file
//! turns rules off and changes their bounds, and is checked strictly; the
//! global `--alerts` runs the rules live beside the audit trail of a
//! command. The PostgreSQL table is replayed like a file log (against the
//! server `scripts/test.sh` starts; never skipped).

mod cli_support;

use std::collections::BTreeSet;
use std::fs;

use cli_support::{code, stdout, Env};
use serde_json::Value;

/// A keyed audit log (`audit.jsonl`, key `audit.key`) written by every
/// command of `env`.
fn logged(env: &Env, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "--audit-log",
        "audit.jsonl",
        "--audit-key-file",
        "audit.key",
    ];
    all.extend_from_slice(args);
    env.ok(&all)
}

/// A trail with the workload: cli-test creates local:backups, encrypts,
/// rotates, lets mallory restore, then disables version 1.
fn workload() -> Env {
    let env = Env::new();
    fs::write(env.path("audit.key"), "cd".repeat(32)).unwrap();
    fs::write(env.path("db.sql"), b"rows").unwrap();
    logged(&env, &["keys", "init"]);
    logged(
        &env,
        &["encrypt", "--context", "db=emr", "-o", "db.phi", "db.sql"],
    );
    logged(&env, &["keys", "rotate", "local:backups"]);
    logged(
        &env,
        &[
            "--actor",
            "mallory",
            "decrypt",
            "--context",
            "db=emr",
            "-o",
            "db.out",
            "db.phi",
        ],
    );
    logged(
        &env,
        &["keys", "disable", "local:backups", "--version", "1"],
    );
    env
}

fn alerts(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// (rule, actor, operation) of each alert.
fn triples(alerts: &[Value]) -> BTreeSet<(String, String, String)> {
    alerts
        .iter()
        .map(|a| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
            (
                s(&a["rule"]),
                s(&a["event"]["actor"]),
                s(&a["event"]["operation"]),
            )
        })
        .collect()
}

fn t(rule: &str, actor: &str, op: &str) -> (String, String, String) {
    (rule.to_owned(), actor.to_owned(), op.to_owned())
}

#[test]
fn audit_monitor_replays_a_trail_through_the_rules() {
    let env = workload();
    let o = env.run(&["audit", "monitor", "audit.jsonl"]);
    assert_eq!(code(&o), 7, "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("alert(s)"), "{err}");
    let got = alerts(&stdout(&o));
    // Each alert carries its event, whole, and the time of the use.
    for a in &got {
        assert_eq!(a["time"], a["event"]["timestamp"], "{a}");
        assert!(a["message"].as_str().is_some_and(|m| !m.is_empty()), "{a}");
    }
    assert_eq!(
        triples(&got),
        BTreeSet::from([
            // The first use of the key by each actor.
            t("new-actor", "cli-test", "create-key"),
            t("new-actor", "mallory", "unwrap"),
            // Every lifecycle verb.
            t("key-management", "cli-test", "create-key"),
            t("key-management", "cli-test", "rotate"),
            t("key-management", "cli-test", "set-state"),
        ])
    );
    let disable = got
        .iter()
        .find(|a| a["event"]["operation"] == "set-state")
        .unwrap();
    assert_eq!(disable["event"]["key_state"], "disabled");
    assert_eq!(disable["event"]["key_version"], 1);

    // --alerts FILE: the same alerts, appended to the file.
    let o = env.run(&[
        "audit",
        "monitor",
        "audit.jsonl",
        "--alerts",
        "alerts.jsonl",
    ]);
    assert_eq!(code(&o), 7);
    assert_eq!(stdout(&o), "");
    let text = fs::read_to_string(env.path("alerts.jsonl")).unwrap();
    assert_eq!(triples(&alerts(&text)), triples(&got));
}

#[test]
fn the_rules_file_turns_rules_off_and_sets_their_bounds() {
    let env = workload();
    let rules = |name: &str, json: &str| {
        fs::write(env.path(name), json).unwrap();
        name.to_owned()
    };
    // Without key management and new actors: nothing fires, exit 0.
    let off = rules(
        "off.json",
        r#"{"new_actor": false, "key_management": false}"#,
    );
    let o = env.ok(&["audit", "monitor", "audit.jsonl", "--rules", &off]);
    assert_eq!(stdout(&o), "");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("0 alert(s)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A rate bound of 1 per hour: every actor's second access alerts.
    let rate = rules(
        "rate.json",
        r#"{"new_actor": false, "key_management": false,
            "actor_rate": {"max": 1, "window_secs": 3600}}"#,
    );
    let o = env.run(&["audit", "monitor", "audit.jsonl", "--rules", &rate]);
    assert_eq!(code(&o), 7);
    let got = alerts(&stdout(&o));
    assert!(!got.is_empty());
    assert!(got.iter().all(|a| a["rule"] == "actor-rate"), "{got:?}");
    assert!(
        got.iter().all(|a| a["event"]["actor"] == "cli-test"),
        "{got:?}"
    );
    // No allowed hour at all: every event is outside them.
    let hours = rules(
        "hours.json",
        r#"{"new_actor": false, "key_management": false, "actor_rate": false,
            "outside_hours": {"start": 0, "end": 0}}"#,
    );
    let o = env.run(&["audit", "monitor", "audit.jsonl", "--rules", &hours]);
    assert_eq!(code(&o), 7);
    let got = alerts(&stdout(&o));
    let lines = fs::read_to_string(env.path("audit.jsonl")).unwrap();
    let events = lines.lines().filter(|l| l.contains("\"event\":")).count();
    assert_eq!(got.len(), events);
    assert!(got.iter().all(|a| a["rule"] == "outside-hours"));

    // Checked strictly: unknown members, wrong types and values are
    // refused (exit 1), naming what is wrong.
    for (json, says) in [
        (r#"{"new_actors": false}"#, "unknown member \"new_actors\""),
        (
            r#"{"actor_rate": {"max": 5, "window": 60}}"#,
            "unknown member \"window\"",
        ),
        (r#"{"actor_rate": {"max": 5}}"#, "needs \"window_secs\""),
        (
            r#"{"actor_rate": {"max": 5, "window_secs": 0}}"#,
            "\"actor_rate\".\"window_secs\" must be an integer from 1",
        ),
        (
            r#"{"outside_hours": {"start": 8, "end": 25}}"#,
            "\"outside_hours\".\"end\" must be an integer from 0 to 24",
        ),
        (
            r#"{"denial_burst": true}"#,
            "\"denial_burst\" must be false or an object",
        ),
        (r#"{"key_management": "yes"}"#, "must be true or false"),
        (r#"[]"#, "must be a JSON object"),
        ("{", "not JSON"),
    ] {
        let f = rules("bad.json", json);
        let err = env.fails(&["audit", "monitor", "audit.jsonl", "--rules", &f], 1);
        assert!(err.contains(says), "{json}: {err}");
    }
    // --since: only events from then on alert (the rules learn from the
    // earlier ones); the whole trail is before 2100, and after 1970.
    let o = env.ok(&["audit", "monitor", "audit.jsonl", "--since", "2100-01-01"]);
    assert_eq!(stdout(&o), "");
    let o = env.run(&[
        "audit",
        "monitor",
        "audit.jsonl",
        "--since",
        "1970-01-01T00:00:00Z",
    ]);
    assert_eq!(code(&o), 7);
    let all = env.run(&["audit", "monitor", "audit.jsonl"]);
    assert_eq!(
        triples(&alerts(&stdout(&o))),
        triples(&alerts(&stdout(&all)))
    );
    for bad in [
        "2026-02-30",
        "2026-12-04T25:00:00Z",
        "yesterday",
        "2026-12-04T10:00:00",
    ] {
        let err = env.fails(&["audit", "monitor", "audit.jsonl", "--since", bad], 1);
        assert!(err.contains("--since"), "{bad}: {err}");
    }
    // A trail is needed.
    let err = env.fails(&["audit", "monitor"], 1);
    assert!(err.contains("LOG"), "{err}");
}

#[test]
fn alerts_runs_the_rules_live_beside_the_audit_trail() {
    let env = Env::new();
    fs::write(env.path("audit.key"), "cd".repeat(32)).unwrap();
    let live = |args: &[&str]| {
        let mut all = vec!["--alerts", "live.jsonl"];
        all.extend_from_slice(args);
        logged(&env, &all)
    };
    live(&["keys", "init"]);
    fs::write(env.path("db.sql"), b"rows").unwrap();
    live(&["encrypt", "--context", "db=emr", "-o", "db.phi", "db.sql"]);
    let read = || alerts(&fs::read_to_string(env.path("live.jsonl")).unwrap());
    // Creating the key alerted; encrypting did not (no new-actor rule
    // live: a command remembers no earlier use).
    assert_eq!(
        triples(&read()),
        BTreeSet::from([t("key-management", "cli-test", "create-key")])
    );
    live(&["keys", "rotate", "local:backups"]);
    let got = read();
    assert_eq!(got.len(), 2);
    let rotate = &got[1];
    assert_eq!(rotate["rule"], "key-management");
    assert_eq!(rotate["event"]["operation"], "rotate");
    assert_eq!(rotate["event"]["key_ref"], "local:backups");
    assert_eq!(rotate["event"]["key_version"], 2);
    // The alert is about the event the audit log recorded.
    let log = fs::read_to_string(env.path("audit.jsonl")).unwrap();
    let recorded = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["event"]["operation"] == "rotate")
        .unwrap();
    assert_eq!(recorded["event"], rotate["event"]);
    // PHI_ENVELOPE_ALERTS does the same; stdout is refused for a command
    // (it carries data).
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_ALERTS", "env.jsonl")
        .args(["keys", "rotate", "local:backups"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let got = alerts(&fs::read_to_string(env.path("env.jsonl")).unwrap());
    assert_eq!(
        triples(&got),
        BTreeSet::from([t("key-management", "cli-test", "rotate")])
    );
    let err = env.fails(&["--alerts", "-", "keys", "rotate", "local:backups"], 1);
    assert!(err.contains("--alerts -"), "{err}");
    // Refused before any key was used: still version 3 primary.
    let o = env.ok(&["keys", "list", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["keys"][0]["primary_version"], 3);
}

#[cfg(feature = "postgres")]
#[test]
fn audit_monitor_replays_the_postgresql_trail() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run these tests through scripts/test.sh, which starts PostgreSQL")
        })
    };
    let admin = var("PHI_PG_URL");
    let url = format!(
        "postgresql://postgres@{}:{}/phi_t_cli_monitor",
        var("PHI_PG_HOST"),
        var("PHI_PG_PORT")
    );
    sql(
        &admin,
        "DROP DATABASE IF EXISTS phi_t_cli_monitor WITH (FORCE)",
    );
    sql(&admin, "CREATE DATABASE phi_t_cli_monitor");
    let env = Env::new();
    env.ok(&["audit", "init-db", &url]);
    fs::write(env.path("audit.key"), "ef".repeat(32)).unwrap();
    let db = |args: &[&str]| {
        let mut all = vec!["--audit-db", &url, "--audit-key-file", "audit.key"];
        all.extend_from_slice(args);
        env.ok(&all)
    };
    db(&["keys", "init"]);
    db(&["keys", "rotate", "local:backups"]);
    let o = env.run(&["--audit-db", &url, "audit", "monitor"]);
    assert_eq!(code(&o), 7, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        triples(&alerts(&stdout(&o))),
        BTreeSet::from([
            t("new-actor", "cli-test", "create-key"),
            t("key-management", "cli-test", "create-key"),
            t("key-management", "cli-test", "rotate"),
        ])
    );
}

#[cfg(feature = "postgres")]
fn sql(url: &str, stmts: &str) {
    let (url, stmts) = (url.to_owned(), stmts.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client.batch_execute(&stmts).await.unwrap();
        })
    })
    .join()
    .unwrap()
}
