//! The recovery drill with an HSM: a backup wrapped to a SoftHSM2 key and
//! to the offline recovery key (docs/RECOVERY.md, docs/CUSTODIANS.md)
//! restores from 3 of its 5 shares after the token itself is deleted, and
//! not from 2.
//!
//! The token is this test's own (its own `softhsm2.conf` and token
//! directory, given only to the CLI processes it starts), so deleting it
//! disturbs no other test. The module path comes from the environment that
//! scripts/test-services.sh exports; without it the test fails loudly.

#![cfg(all(feature = "pkcs11", feature = "recovery"))]

mod cli_support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use cli_support::{code, make_tree, snapshot, stdout, Env};

const TOKEN: &str = "drill";
const PIN: &str = "drill-user-pin";
const SO_PIN: &str = "drill-so-pin";

fn module() -> String {
    match std::env::var("PHI_PKCS11_MODULE") {
        Ok(m) if Path::new(&m).is_file() => m,
        other => panic!(
            "PHI_PKCS11_MODULE is {other:?}, not a SoftHSM2 module: run the tests with \
             scripts/test.sh (or under scripts/test-services.sh)"
        ),
    }
}

fn softhsm2_util(conf: &Path, args: &[&str]) -> Output {
    let o = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(args)
        .output()
        .expect("softhsm2-util (installed by scripts/install-deps.sh)");
    assert!(
        o.status.success(),
        "softhsm2-util {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn an_hsm_backup_restores_from_3_of_5_shares_after_the_token_is_deleted_and_not_from_2() {
    let module = module();
    let env = Env::new();

    // A token of this test's own.
    let tokens = env.path("hsm/tokens");
    fs::create_dir_all(&tokens).unwrap();
    let conf = env.path("hsm/softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    softhsm2_util(
        &conf,
        &[
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--so-pin",
            SO_PIN,
            "--pin",
            PIN,
        ],
    );
    let hsm = |args: &[&str]| {
        let mut c = env.cmd();
        c.env("SOFTHSM2_CONF", &conf)
            .env("PHI_ENVELOPE_PKCS11_MODULE", &module)
            .env("PHI_ENVELOPE_PKCS11_TOKEN", TOKEN)
            .env("PHI_ENVELOPE_PKCS11_PIN", PIN)
            .args(args);
        c.output().unwrap()
    };
    let ok = |o: Output, what: &str| {
        assert_eq!(
            code(&o),
            0,
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };

    // The custodians' ceremony: only the public key goes online.
    let o = env.ok(&[
        "recovery",
        "keygen",
        "--shares",
        "5",
        "--threshold",
        "3",
        "--out",
        "custody",
    ]);
    let out = stdout(&o);
    let mut lines = out.lines();
    let recovery_ref = lines.next().unwrap().to_owned();
    let public = lines.next().unwrap().to_owned();
    assert!(recovery_ref.starts_with("hpke-recovery:"), "{out}");

    let key = format!("pkcs11:token={TOKEN};object=backups");
    ok(hsm(&["keys", "create", &key]), "keys create");
    let src = env.path("src");
    make_tree(&src);
    let mut c = env.cmd();
    c.env("SOFTHSM2_CONF", &conf)
        .env("PHI_ENVELOPE_PKCS11_MODULE", &module)
        .env("PHI_ENVELOPE_PKCS11_TOKEN", TOKEN)
        .env("PHI_ENVELOPE_PKCS11_PIN", PIN)
        .env("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY", &public)
        .args([
            "encrypt",
            "--key",
            &key,
            "--key",
            &recovery_ref,
            "--context",
            "site=st-mary",
            "-o",
            "src.phi",
            "src",
        ]);
    ok(c.output().unwrap(), "encrypt");
    let inspect: serde_json::Value =
        serde_json::from_str(&stdout(&env.ok(&["inspect", "--json", "src.phi"]))).unwrap();
    assert_eq!(inspect["recipients"][0]["provider"], "pkcs11");
    assert_eq!(inspect["recipients"][1]["provider"], "hpke-recovery");
    // While the HSM is there, it restores the backup.
    ok(
        hsm(&[
            "decrypt",
            "--context",
            "site=st-mary",
            "-o",
            "by-hsm",
            "src.phi",
        ]),
        "decrypt with the HSM",
    );
    assert_eq!(snapshot(&src), snapshot(&env.path("by-hsm")));

    // Disaster: the token is deleted, and the keystore is gone too.
    softhsm2_util(&conf, &["--delete-token", "--token", TOKEN]);
    assert_eq!(fs::read_dir(&tokens).unwrap().count(), 0);
    let _ = fs::remove_dir_all(env.keystore.parent().unwrap());
    let o = hsm(&[
        "decrypt",
        "--context",
        "site=st-mary",
        "-o",
        "gone",
        "src.phi",
    ]);
    assert_ne!(code(&o), 0, "the deleted token still decrypted");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(TOKEN),
        "the error does not name the token: {err}"
    );
    assert!(!env.path("gone").exists());

    let share = |i: u32| format!("custody/share-{i}-of-5.txt");
    // Three shares restore it, with no HSM, keystore or passphrase.
    let o = env
        .cmd()
        .env_remove("PHI_ENVELOPE_PASSPHRASE")
        .args([
            "decrypt",
            "--context",
            "site=st-mary",
            "--recovery-share",
            &share(5),
            "--recovery-share",
            &share(2),
            "--recovery-share",
            &share(4),
            "-o",
            "restored",
            "src.phi",
        ])
        .output()
        .unwrap();
    ok(o, "decrypt from 3 shares");
    assert_eq!(snapshot(&src), snapshot(&env.path("restored")));

    // Two are refused, saying how many more are needed, and write nothing.
    let err = env.fails(
        &[
            "decrypt",
            "--context",
            "site=st-mary",
            "--recovery-share",
            &share(1),
            "--recovery-share",
            &share(3),
            "-o",
            "refused",
            "src.phi",
        ],
        3,
    );
    assert!(err.contains("1 more needed"), "{err}");
    assert!(!env.path("refused").exists());
}
