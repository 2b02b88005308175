//! End-to-end tests of the offline recovery recipient in the `backup` CLI
//! (examples/backup/recovery.rs, docs/CLI.md "Offline recovery key"): `backup recovery
//! keygen`, a backup wrapped to the local keystore and the recovery key,
//! and `backup decrypt --recovery-share` restoring it from 3 of 5 shares
//! without the keystore, refusing 2 shares and a mistyped one.

#![cfg(feature = "recovery")]

mod cli_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cli_support::{make_tree, snapshot, stdout, Env};

fn keygen(env: &Env, dir: &str) -> (String, String) {
    let o = env.ok(&[
        "recovery",
        "keygen",
        "--shares",
        "5",
        "--threshold",
        "3",
        "--out",
        dir,
    ]);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("hpke-recovery:"), "{out}");
    assert!(lines[1].starts_with("phi-recovery-public-v1:"), "{out}");
    (lines[0].to_owned(), lines[1].to_owned())
}

#[test]
fn keygen_writes_five_private_shares_and_the_public_key() {
    let env = Env::new();
    let (key_ref, public) = keygen(&env, "custody");
    let dir = env.path("custody");
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for i in 1..=5 {
        let p = dir.join(format!("share-{i}-of-5.txt"));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = fs::read_to_string(&p).unwrap();
        let fp = key_ref.strip_prefix("hpke-recovery:").unwrap();
        assert!(
            text.starts_with(&format!("phi-recovery-share-v1:{fp}:")),
            "{text}"
        );
        assert!(text.contains(&format!(":3:5:{i}:")), "{text}");
    }
    assert_eq!(
        fs::read_to_string(dir.join("recovery-public.txt")).unwrap(),
        format!("{public}\n")
    );
    // Nothing is ever overwritten; a threshold of 1 is refused.
    let err = env.fails(
        &[
            "recovery",
            "keygen",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--out",
            "custody",
        ],
        5,
    );
    assert!(err.contains("already exists"), "{err}");
    let err = env.fails(
        &[
            "recovery",
            "keygen",
            "--shares",
            "5",
            "--threshold",
            "1",
            "--out",
            "other",
        ],
        1,
    );
    assert!(err.contains("--threshold must be 2"), "{err}");
    assert!(!env.path("other").exists());
}

#[test]
fn a_backup_restores_from_3_of_5_shares_without_the_keystore_and_not_from_2() {
    let env = Env::new();
    // Only `keys init` creates the keystore and its key.
    env.ok(&["keys", "init"]);
    let (key_ref, public) = keygen(&env, "custody");
    let src = env.path("src");
    make_tree(&src);
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY", &public)
        .args([
            "encrypt",
            "--key",
            "local:backups",
            "--key",
            &key_ref,
            "--context",
            "site=st-mary",
            "-o",
            "src.phi",
            "src",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inspect = stdout(&env.ok(&["inspect", "--json", "src.phi"]));
    assert!(inspect.contains(&key_ref), "{inspect}");
    assert!(inspect.contains("local:backups"), "{inspect}");

    // Rotating the local key and rewrapping keeps the recovery entry (the
    // public key is enough online; without it the rewrap says what is
    // missing).
    env.ok(&["keys", "rotate", "local:backups"]);
    let o = env.run(&["rewrap", "--context", "site=st-mary", "src.phi"]);
    assert_eq!(cli_support::code(&o), 3);
    let report = stdout(&o);
    assert!(report.contains(&key_ref), "{report}");
    assert!(
        report.contains("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY"),
        "{report}"
    );
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY", &public)
        .args(["rewrap", "--context", "site=st-mary", "src.phi"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inspect = stdout(&env.ok(&["inspect", "--json", "src.phi"]));
    assert!(inspect.contains(&key_ref), "{inspect}");

    let share = |i: u32| format!("custody/share-{i}-of-5.txt");
    // With shares, the keystore is not asked: no passphrase is needed.
    let o = env
        .cmd()
        .env_remove("PHI_ENVELOPE_PASSPHRASE")
        .args([
            "decrypt",
            "--context",
            "site=st-mary",
            "--recovery-share",
            &share(1),
            "--recovery-share",
            &share(3),
            "--recovery-share",
            &share(5),
            "-o",
            "restored-1",
            "src.phi",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains(&format!("restored recovery key {key_ref} from 3 shares")));
    assert_eq!(snapshot(&src), snapshot(&env.path("restored-1")));

    // The keystore is gone: the shares still restore it.
    fs::remove_file(&env.keystore).unwrap();
    env.ok(&[
        "decrypt",
        "--context",
        "site=st-mary",
        "--recovery-share",
        &share(4),
        "--recovery-share",
        &share(2),
        "--recovery-share",
        &share(1),
        "-o",
        "restored-2",
        "src.phi",
    ]);
    assert_eq!(snapshot(&src), snapshot(&env.path("restored-2")));

    // Two shares: refused, saying how many more are needed.
    let err = env.fails(
        &[
            "decrypt",
            "--context",
            "site=st-mary",
            "--recovery-share",
            &share(2),
            "--recovery-share",
            &share(5),
            "-o",
            "restored-3",
            "src.phi",
        ],
        3,
    );
    assert!(err.contains("1 more needed"), "{err}");
    assert!(!env.path("restored-3").exists());

    // A share with one character mistyped: refused by its checksum, with
    // the file named.
    let text = fs::read_to_string(env.path(&share(2))).unwrap();
    let pos = text.len() - 30;
    let c = if &text[pos..pos + 1] == "0" { "1" } else { "0" };
    let mut typo = text.clone();
    typo.replace_range(pos..pos + 1, c);
    fs::write(env.path("typo.txt"), typo).unwrap();
    let err = env.fails(
        &[
            "decrypt",
            "--context",
            "site=st-mary",
            "--recovery-share",
            &share(1),
            "--recovery-share",
            "typo.txt",
            "--recovery-share",
            &share(3),
            "-o",
            "restored-4",
            "src.phi",
        ],
        3,
    );
    assert!(err.contains("typo.txt"), "{err}");
    assert!(err.contains("checksum"), "{err}");

    // The wrong context with the right shares: authentication fails.
    let err = env.fails(
        &[
            "decrypt",
            "--context",
            "site=elsewhere",
            "--recovery-share",
            &share(1),
            "--recovery-share",
            &share(2),
            "--recovery-share",
            &share(3),
            "-o",
            "restored-5",
            "src.phi",
        ],
        2,
    );
    assert!(err.contains("authentication failed"), "{err}");
}

#[test]
fn shares_do_not_restore_a_backup_that_is_not_wrapped_to_the_recovery_key() {
    let env = Env::new();
    // Only `keys init` creates the keystore and its key.
    env.ok(&["keys", "init"]);
    keygen(&env, "custody");
    fs::write(env.path("note.txt"), b"PHI").unwrap();
    env.ok(&["encrypt", "-o", "note.phi", "note.txt"]);
    let err = env.fails(
        &[
            "decrypt",
            "--recovery-share",
            "custody/share-1-of-5.txt",
            "--recovery-share",
            "custody/share-2-of-5.txt",
            "--recovery-share",
            "custody/share-3-of-5.txt",
            "-o",
            "out.txt",
            "note.phi",
        ],
        3,
    );
    assert!(err.contains("not wrapped to a recovery key"), "{err}");
    // A backup wrapped to the recovery key, and shares of two keys:
    // refused before they are combined.
    let (key_ref, public) = keygen(&env, "other");
    let o = env
        .cmd()
        .env("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY", &public)
        .args(["encrypt", "--key", "local:backups", "--key", &key_ref])
        .args(["-o", "note2.phi", "note.txt"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = env.fails(
        &[
            "decrypt",
            "--recovery-share",
            "other/share-1-of-5.txt",
            "--recovery-share",
            "custody/share-2-of-5.txt",
            "--recovery-share",
            "other/share-3-of-5.txt",
            "-o",
            "out.txt",
            "note2.phi",
        ],
        3,
    );
    assert!(err.contains("different recovery keys"), "{err}");
    // Wrapping to a recovery key whose public key is not configured: a
    // clear error naming it.
    let err = env.fails(
        &["encrypt", "--key", &key_ref, "-o", "note3.phi", "note.txt"],
        3,
    );
    assert!(err.contains(&key_ref), "{err}");
    assert!(err.contains("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY"), "{err}");
    assert!(!env.path("note3.phi").exists());
}

/// The shares are made together in one directory: it must be the user's
/// alone. An existing directory others can enter, or a link to one, is
/// refused before any key is drawn; a new one is created mode 0700.
#[test]
fn keygen_refuses_a_directory_others_can_enter() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let open = env.path("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    let private = env.path("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&private, env.path("link")).unwrap();
    for dir in ["open", "link"] {
        let args = [
            "recovery",
            "keygen",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--out",
            dir,
        ];
        let err = env.fails(&args, 1);
        assert!(err.contains("mode 0700"), "{err}");
    }
    assert_eq!(fs::read_dir(&open).unwrap().count(), 0);
    assert_eq!(fs::read_dir(&private).unwrap().count(), 0);
    keygen(&env, "private");
    keygen(&env, "new");
    let mode = fs::metadata(env.path("new")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}
