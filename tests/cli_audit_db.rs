//! `backup --audit-db URL`: the CLI's PostgreSQL audit trail, against the
//! server `scripts/test.sh` starts (`PHI_PG_URL`, `PHI_PG_HOST`,
//! `PHI_PG_PORT`; without them the test fails, it is never skipped):
//! `audit init-db`, key uses recorded in the table, `audit verify
//! --audit-db` naming the first tampered entry.
#![cfg(feature = "postgres")]

mod cli_support;

use std::fs;

use cli_support::{code, stdout, Env};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run these tests through scripts/test.sh, which starts PostgreSQL"
        )
    })
}

fn url(user: &str, db: &str) -> String {
    format!(
        "postgresql://{user}@{}:{}/{db}",
        env("PHI_PG_HOST"),
        env("PHI_PG_PORT")
    )
}

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

#[test]
fn init_db_record_and_verify_through_the_cli() {
    let admin = env("PHI_PG_URL");
    sql(&admin, "DROP DATABASE IF EXISTS phi_t_cli WITH (FORCE)");
    sql(&admin, "CREATE DATABASE phi_t_cli");
    let e = Env::new();
    let su = url("postgres", "phi_t_cli");
    let out = stdout(&e.ok(&["audit", "init-db", &su]));
    assert!(out.contains("schema phi_audit ready"), "{out}");
    // Twice is harmless.
    e.ok(&["--audit-db", &su, "audit", "init-db"]);
    sql(
        &admin,
        "DO $$ BEGIN
           BEGIN CREATE ROLE phi_test_writer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
           BEGIN CREATE ROLE phi_test_verifier LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END;
         END $$;
         GRANT phi_audit_writer TO phi_test_writer;
         GRANT phi_audit_verifier TO phi_test_verifier;",
    );
    let (writer, verifier) = (
        url("phi_test_writer", "phi_t_cli"),
        url("phi_test_verifier", "phi_t_cli"),
    );
    fs::write(e.path("audit.key"), "ab".repeat(32)).unwrap();
    let w = ["--audit-db", &writer, "--audit-key-file", "audit.key"];

    // Without a key the trail is not opened, and no key is used.
    let err = e.fails(&["--audit-db", &writer, "keys", "init"], 6);
    assert!(err.contains("--audit-key-file"), "{err}");

    let mut args = w.to_vec();
    args.extend(["keys", "init"]);
    e.ok(&args);
    fs::write(e.path("f"), b"phi").unwrap();
    let mut args = w.to_vec();
    args.extend(["encrypt", "-o", "f.phi", "f"]);
    e.ok(&args);
    // Through the environment variable too.
    let o = e
        .cmd()
        .env("PHI_ENVELOPE_AUDIT_DB", &writer)
        .args([
            "--audit-key-file",
            "audit.key",
            "decrypt",
            "-o",
            "f.out",
            "f.phi",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));

    let v = ["--audit-db", &verifier, "--audit-key-file", "audit.key"];
    let mut args = v.to_vec();
    args.extend(["audit", "verify", "--json"]);
    let out = stdout(&e.ok(&args));
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["ok"], true, "{out}");
    assert_eq!(j["keyed"], true, "{out}");
    assert!(j["entries"].as_u64().unwrap() >= 3, "{out}");
    assert!(
        !out.contains("postgresql://"),
        "no connection string in reports: {out}"
    );

    // The report reads the table too.
    let out = stdout(&e.ok(&["--audit-db", &verifier, "audit", "report", "--json"]));
    assert!(
        out.lines().any(|l| l.contains("\"actor\":\"cli-test\"") && l.contains("\"operation\":\"unwrap\"")),
        "{out}"
    );

    // A superuser rewrites entry 2: verify names it.
    sql(
        &su,
        r#"SET session_replication_role = replica;
           UPDATE phi_audit.entries SET line = replace(line, '"cli-test"', '"mallory"') WHERE seq = 2"#,
    );
    let mut args = v.to_vec();
    args.extend(["audit", "verify"]);
    let err = e.fails(&args, 2);
    assert!(
        err.contains("phi_audit.entries line 3 (seq 2)"),
        "names the entry: {err}"
    );
}

/// A fleet's writers share one audit key: made once by `audit keygen`,
/// sealed, and copied to each writer. Without it the trail is not opened
/// and no key is used; with it two writers (two machines, each with its
/// copy of the sealed file and of the keystore that can open it) append to
/// one chain, which verifies with the sealed key and no key file.
#[test]
fn writers_of_a_fleet_share_one_sealed_audit_key() {
    let admin = env("PHI_PG_URL");
    sql(
        &admin,
        "DROP DATABASE IF EXISTS phi_t_cli_fleet WITH (FORCE)",
    );
    sql(&admin, "CREATE DATABASE phi_t_cli_fleet");
    let a = Env::new();
    let su = url("postgres", "phi_t_cli_fleet");
    a.ok(&["audit", "init-db", &su]);
    a.ok(&["keys", "init"]);
    let err = a.fails(&["--audit-db", &su, "keys", "list"], 6);
    assert!(err.contains("audit keygen"), "{err}");
    let out = stdout(&a.ok(&["--audit-db", &su, "audit", "keygen", "--out", "fleet.key"]));
    assert!(out.contains("sealed to local:audit"), "{out}");
    // Never over an existing one.
    a.fails(&["audit", "keygen", "--out", "fleet.key"], 4);

    let b = Env::new();
    fs::create_dir_all(b.keystore.parent().unwrap()).unwrap();
    fs::copy(&a.keystore, &b.keystore).unwrap();
    fs::copy(a.path("fleet.key"), b.path("fleet.key")).unwrap();
    for (e, actor) in [(&a, "host-a"), (&b, "host-b")] {
        fs::write(e.path("f"), actor).unwrap();
        e.ok(&[
            "--audit-db",
            &su,
            "--audit-key-sealed",
            "fleet.key",
            "--actor",
            actor,
            "encrypt",
            "-o",
            "f.phi",
            "f",
        ]);
    }
    let out = stdout(&b.ok(&[
        "--audit-db",
        &su,
        "--audit-key-sealed",
        "fleet.key",
        "audit",
        "verify",
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["ok"], true, "{out}");
    assert_eq!(j["keyed"], true, "{out}");
    let report = stdout(&a.ok(&["--audit-db", &su, "audit", "report", "--json"]));
    for host in ["host-a", "host-b"] {
        assert!(
            report
                .lines()
                .any(|l| l.contains(&format!("\"actor\":\"{host}\""))
                    && l.contains("\"key_ref\":\"local:backups\"")),
            "{report}"
        );
    }
}
