//! The README's first command, scripts/backup-demo.sh, keeps working: run
//! it with the test build of the CLI on a small tree made for the purpose
//! (modes, an old mtime, symbolic links, a read-only directory).

mod cli_support;

use std::process::Command;

#[test]
fn backup_demo_script_restores_a_tree_identically() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("patient-exports");
    cli_support::make_tree(&tree);
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/backup-demo.sh"
        ))
        .arg(&tree)
        .env("PHI_BACKUP_BIN", cli_support::bin())
        .env("TMPDIR", dir.path())
        .env_remove("PHI_ENVELOPE_PASSPHRASE")
        .env_remove("PHI_ENVELOPE_KEYSTORE")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cli_support::unlock(&tree);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all backups restored identically"), "{text}");
    assert!(text.contains("DEMO passphrase"), "{text}");
}
