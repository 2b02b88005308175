//! `backup keys passwd`: a new passphrase for the keystore, atomically;
//! backups made before still restore; the old passphrase no longer opens
//! it. And `--keystore-generation-file`: a keystore file put back from an
//! older copy is refused by a new process.

mod cli_support;

use std::fs;

use cli_support::{stdout, Env};

#[test]
fn passwd_changes_the_passphrase_and_keeps_the_keys() {
    let env = Env::new();
    env.ok(&["keys", "init"]);
    fs::write(env.path("db.sql"), b"patients").unwrap();
    env.ok(&["encrypt", "-o", "db.phi", "db.sql"]);
    let before = stdout(&env.ok(&["keys", "list", "--json"]));

    // The new passphrase from a file: one trailing newline is not part of it.
    fs::write(env.path("new.txt"), b"a much better passphrase\n").unwrap();
    let o = env.ok(&[
        "keys",
        "passwd",
        "--new-passphrase-file",
        "new.txt",
        "--kdf-memory-mib",
        "128",
    ]);
    let out = stdout(&o);
    assert!(out.contains("changed the passphrase"), "{out}");
    assert!(out.contains("m=128 MiB, t=3, p=4"), "{out}");
    let text = fs::read_to_string(&env.keystore).unwrap();
    assert!(text.contains(r#""m_kib":131072,"t":3,"p":4"#), "{text}");

    // The old passphrase is refused (exit 3), the new one opens the same keys.
    let err = env.fails(&["keys", "list"], 3);
    assert!(err.contains("wrong passphrase"), "{err}");
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_PASSPHRASE", "a much better passphrase")
        .args(["keys", "list", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8(o.stdout).unwrap(), before);
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_PASSPHRASE", "a much better passphrase")
        .args(["decrypt", "-o", "back.sql", "db.phi"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(fs::read(env.path("back.sql")).unwrap(), b"patients");

    // Without a new passphrase and without a terminal: a clear usage error,
    // nothing changed.
    let now = fs::read(&env.keystore).unwrap();
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_PASSPHRASE", "a much better passphrase")
        .env_remove("PHI_ENVELOPE_NEW_PASSPHRASE")
        .args(["keys", "passwd"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("PHI_ENVELOPE_NEW_PASSPHRASE"));
    assert_eq!(fs::read(&env.keystore).unwrap(), now);
}

#[test]
fn a_generation_file_refuses_an_old_keystore_copy() {
    let env = Env::new();
    let gen = env.path("keystore.generation");
    let gen_arg = gen.to_str().unwrap();
    env.ok(&["--keystore-generation-file", gen_arg, "keys", "init"]);
    env.ok(&[
        "--keystore-generation-file",
        gen_arg,
        "keys",
        "rotate",
        "backups",
    ]);
    let old = fs::read(&env.keystore).unwrap();
    env.ok(&[
        "--keystore-generation-file",
        gen_arg,
        "keys",
        "destroy",
        "backups",
        "--version",
        "1",
        "--yes",
    ]);
    fs::remove_file(&env.keystore).unwrap();
    fs::write(&env.keystore, &old).unwrap();
    fs::set_permissions(
        &env.keystore,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let err = env.fails(&["--keystore-generation-file", gen_arg, "keys", "list"], 3);
    assert!(err.contains("rolled back"), "{err}");
}
