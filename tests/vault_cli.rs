//! The `backup` CLI end to end with a Vault / OpenBao Transit key, on the
//! OpenBao dev server that scripts/test-services.sh starts (VAULT_ADDR,
//! VAULT_TOKEN). Fails loudly when the server is not configured.

#![cfg(feature = "vault")]

mod cli_support;

use std::fs;

use cli_support::Env;

#[test]
fn backup_encrypt_rotate_rewrap_and_restore_with_a_transit_key() {
    let addr = std::env::var("VAULT_ADDR").unwrap_or_default();
    let token = std::env::var("VAULT_TOKEN").unwrap_or_default();
    assert!(
        addr.starts_with("http://127.0.0.1:") && !token.is_empty(),
        "OpenBao not configured (VAULT_ADDR={addr:?}): run under scripts/test-services.sh"
    );
    let env = Env::new();
    let cli = |args: &[&str], context_key: bool| {
        let mut c = env.cmd();
        c.env("VAULT_ADDR", &addr)
            .env("VAULT_TOKEN", &token)
            .env_remove("VAULT_NAMESPACE")
            .env_remove("PHI_ENVELOPE_VAULT_CONTEXT_KEY_FILE")
            .args(args);
        if context_key {
            c.env(
                "PHI_ENVELOPE_VAULT_CONTEXT_KEY",
                "cli test context digest key, 32+ bytes",
            );
        } else {
            c.env_remove("PHI_ENVELOPE_VAULT_CONTEXT_KEY");
        }
        c.output().unwrap()
    };
    let ok = |args: &[&str]| {
        let o = cli(args, true);
        assert_eq!(
            cli_support::code(&o),
            0,
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    let name = format!("backups-{}-{}", std::process::id(), {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.subsec_nanos()
    });
    let key = format!("vault-transit:transit/{name}");
    // The local recipient needs its keystore: only `keys init` creates one.
    ok(&["keys", "init"]);
    ok(&["keys", "create", &key]);
    fs::write(env.path("dump.sql"), b"dump under Transit").unwrap();
    let encrypt = [
        "encrypt",
        "--key",
        &key,
        "--key",
        "local:backups",
        "--context",
        "db=emr",
        "-o",
        "d.phi",
        "dump.sql",
    ];
    ok(&encrypt);
    let o = ok(&["inspect", "--json", "d.phi"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["recipients"][0]["provider"], "vault-transit");
    assert_eq!(v["recipients"][0]["key_ref"], key.as_str());
    assert_eq!(v["recipients"][1]["key_ref"], "local:backups");

    ok(&["keys", "rotate", &key]);
    let o = ok(&["rewrap", "--context", "db=emr", "d.phi"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("v2"));
    // Disaster recovery: the keystore is gone, the Transit key restores.
    fs::remove_dir_all(env.keystore.parent().unwrap()).unwrap();
    ok(&["decrypt", "--context", "db=emr", "-o", "out", "d.phi"]);
    assert_eq!(fs::read(env.path("out")).unwrap(), b"dump under Transit");
    // Without the context digest secret: a clear usage error, nothing written.
    let o = cli(
        &["decrypt", "--context", "db=emr", "-o", "out2", "d.phi"],
        false,
    );
    assert_ne!(cli_support::code(&o), 0);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("PHI_ENVELOPE_VAULT_CONTEXT_KEY"), "{err}");
    assert!(!err.contains(&token), "{err}");
    assert!(!env.path("out2").exists());
}
