//! The `backup` CLI with an HSM key (SoftHSM2), when the tests are built
//! with the `pkcs11` feature and run under scripts/test-services.sh (which
//! exports PHI_PKCS11_MODULE, PHI_PKCS11_TOKEN and PHI_PKCS11_PIN). Without
//! that environment the test fails loudly; it is never skipped.

#![cfg(feature = "pkcs11")]

mod cli_support;

#[test]
fn hsm_and_local_recipients_rotate_rewrap_and_restore_without_the_keystore() {
    use std::fs;

    use cli_support::Env;

    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with scripts/test.sh (or under scripts/test-services.sh)")
        })
    };
    let (module, token, pin) = (
        var("PHI_PKCS11_MODULE"),
        var("PHI_PKCS11_TOKEN"),
        var("PHI_PKCS11_PIN"),
    );
    let env = Env::new();
    let hsm = |args: &[&str]| {
        let mut c = env.cmd();
        c.env("PHI_ENVELOPE_PKCS11_MODULE", &module)
            .env("PHI_ENVELOPE_PKCS11_TOKEN", &token)
            .env("PHI_ENVELOPE_PKCS11_PIN", &pin)
            .args(args);
        let o = c.output().unwrap();
        assert_eq!(
            cli_support::code(&o),
            0,
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    // A label of our own on the shared test token.
    let label = format!(
        "cli-{}-{}",
        std::process::id(),
        env.dir.path().file_name().unwrap().to_string_lossy()
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
    let key = format!("pkcs11:token={token};object={label}");
    // The local recipient needs its keystore: only `keys init` creates one.
    hsm(&["keys", "init"]);
    hsm(&["keys", "create", &key]);
    fs::write(env.path("dump.sql"), b"dump under the HSM").unwrap();
    hsm(&[
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
    ]);
    let o = hsm(&["inspect", "--json", "d.phi"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["recipients"][0]["provider"], "pkcs11");
    assert_eq!(v["recipients"][1]["key_ref"], "local:backups");

    hsm(&["keys", "rotate", &key]);
    let o = hsm(&["rewrap", "--context", "db=emr", "d.phi"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("v2"));
    // Disaster recovery: the keystore is gone, the HSM key restores.
    fs::remove_dir_all(env.keystore.parent().unwrap()).unwrap();
    hsm(&["decrypt", "--context", "db=emr", "-o", "out", "d.phi"]);
    assert_eq!(fs::read(env.path("out")).unwrap(), b"dump under the HSM");
}
