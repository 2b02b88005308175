//! The CLI's audit chain is keyed by default, with its key sealed in the
//! keystore (docs/AUDIT-KEYS.md): made on the first use of a new log,
//! unsealed by every writer and verifier, recoverable by an independent
//! decoder from the keystore and its passphrase alone, never silently
//! replaced, and a bare checksum chain only when asked. The checkpoint
//! signing key is sealed the same way.

mod cli_support;

use std::fs;
use std::process::Command;

use cli_support::{stdout, Env, PASSPHRASE};

fn first_line(path: &std::path::Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// A keyring made with a log: the sealed key beside the keystore, an
/// HMAC chain under it, and `audit verify` using it with no key file.
fn keyed_env() -> Env {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&["--audit-log", "audit.jsonl", "keys", "init"]);
    e.ok(&["--audit-log", "audit.jsonl", "encrypt", "-o", "f.phi", "f"]);
    e
}

#[test]
fn the_chain_is_keyed_by_default_with_its_key_sealed_beside_the_keystore() {
    let e = keyed_env();
    let header = first_line(&e.path("audit.jsonl"));
    assert_eq!(header["mac"], "hmac-sha256", "{header}");
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    let bytes = fs::read(&sealed).unwrap();
    assert!(bytes.starts_with(b"PHIENV"), "not a sealed message");
    // The sealing key is a keystore key like any other.
    let list = stdout(&e.ok(&["keys", "list"]));
    assert!(list.contains("local:audit"), "{list}");
    let out = stdout(&e.ok(&["audit", "verify", "audit.jsonl"]));
    assert!(out.contains("hmac-sha256"), "{out}");
    assert!(out.contains(header["key_id"].as_str().unwrap()), "{out}");
    // The unseal is a key use, recorded in the trail it keys.
    let log = fs::read_to_string(e.path("audit.jsonl")).unwrap();
    assert!(
        log.contains(r#""operation":"unwrap","provider":"local","key_ref":"local:audit""#),
        "{log}"
    );
}

/// Whoever can write the log but has no key cannot rewrite it as a
/// checksum chain: the verifier takes the sealed key whatever the log says
/// of itself.
#[test]
fn a_log_rewritten_as_an_unkeyed_chain_is_refused() {
    let e = keyed_env();
    let other = Env::new();
    fs::write(other.path("f"), b"phi").unwrap();
    other.ok(&[
        "--audit-log",
        "forged.jsonl",
        "--audit-unkeyed",
        "keys",
        "init",
    ]);
    fs::copy(other.path("forged.jsonl"), e.path("audit.jsonl")).unwrap();
    let err = e.fails(&["audit", "verify", "audit.jsonl"], 2);
    assert!(err.contains("unkeyed"), "{err}");
    // Asked for on purpose, a checksum chain is checked as one.
    let out = stdout(&e.ok(&["--audit-unkeyed", "audit", "verify", "audit.jsonl"]));
    assert!(out.contains("a checksum only"), "{out}");
    // With the sealed key deleted too, an unkeyed chain is still no
    // evidence unless asked for.
    fs::remove_file(e.keystore.parent().unwrap().join("audit-key.phienv")).unwrap();
    let err = e.fails(&["audit", "verify", "audit.jsonl"], 2);
    assert!(err.contains("--audit-unkeyed"), "{err}");
    let err = e.fails(
        &[
            "audit",
            "checkpoint",
            "audit.jsonl",
            "--signing-key",
            "none",
        ],
        2,
    );
    assert!(err.contains("no checkpoint was signed"), "{err}");
}

#[test]
fn a_log_whose_sealed_key_is_missing_is_never_continued_under_a_new_key() {
    let e = keyed_env();
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    fs::rename(&sealed, e.path("moved.phienv")).unwrap();
    let before = fs::read(e.path("audit.jsonl")).unwrap();
    let err = e.fails(
        &["--audit-log", "audit.jsonl", "encrypt", "-o", "g.phi", "f"],
        6,
    );
    let key_id = first_line(&e.path("audit.jsonl"))["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.contains(&key_id) && err.contains("--audit-key-sealed"),
        "{err}"
    );
    assert_eq!(fs::read(e.path("audit.jsonl")).unwrap(), before);
    assert!(!sealed.exists(), "a new key was made");
    assert!(!e.path("g.phi").exists());
    // Pointed at the moved copy, it goes on.
    e.ok(&[
        "--audit-log",
        "audit.jsonl",
        "--audit-key-sealed",
        "moved.phienv",
        "encrypt",
        "-o",
        "g.phi",
        "f",
    ]);
    e.ok(&[
        "--audit-key-sealed",
        "moved.phienv",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
}

#[test]
fn an_unkeyed_log_goes_on_only_when_asked() {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&[
        "--audit-log",
        "old.jsonl",
        "--audit-unkeyed",
        "keys",
        "init",
    ]);
    assert_eq!(first_line(&e.path("old.jsonl"))["mac"], "sha256");
    let err = e.fails(
        &["--audit-log", "old.jsonl", "encrypt", "-o", "f.phi", "f"],
        6,
    );
    assert!(err.contains("--audit-unkeyed"), "{err}");
    assert!(!e.path("f.phi").exists());
    e.ok(&[
        "--audit-log",
        "old.jsonl",
        "--audit-unkeyed",
        "encrypt",
        "-o",
        "f.phi",
        "f",
    ]);
}

#[test]
fn a_sealed_key_of_another_keystore_is_refused_and_no_key_is_used() {
    let a = keyed_env();
    let b = Env::new();
    fs::write(b.path("f"), b"phi").unwrap();
    b.ok(&["keys", "init"]);
    b.ok(&["keys", "create", "local:audit"]);
    fs::copy(
        a.keystore.parent().unwrap().join("audit-key.phienv"),
        b.path("a.phienv"),
    )
    .unwrap();
    let err = b.fails(
        &[
            "--audit-log",
            "audit.jsonl",
            "--audit-key-sealed",
            "a.phienv",
            "encrypt",
            "-o",
            "f.phi",
            "f",
        ],
        6,
    );
    assert!(err.contains("cannot open the sealed key"), "{err}");
    assert!(!b.path("f.phi").exists());
    assert!(!b.path("audit.jsonl").exists());
}

/// Recoverable without this crate: the independent keystore decoder
/// (written from docs/KEYSTORE.md and docs/FORMAT.md) opens the sealed
/// audit key with the keystore and its passphrase alone; its key id is the
/// one in the log's header, and the raw key verifies the chain.
#[test]
fn the_independent_decoder_recovers_the_audit_key_from_the_keystore() {
    let e = keyed_env();
    fs::write(e.path("pass"), PASSPHRASE).unwrap();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/independent/keystore_recover.py"
        ))
        .arg("--keystore")
        .arg(&e.keystore)
        .arg("--passphrase-file")
        .arg(e.path("pass"))
        .arg("--message")
        .arg(e.keystore.parent().unwrap().join("audit-key.phienv"))
        .args(["--context", "phi-envelope-secret=audit-key/1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key_hex = v["plaintext"].as_str().unwrap();
    assert_eq!(key_hex.len(), 64);
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let id = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw),
        b"phi-envelope-audit/1 key-id\0",
    );
    let id_hex: String = id.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(first_line(&e.path("audit.jsonl"))["key_id"], id_hex);
    fs::write(e.path("raw.key"), key_hex).unwrap();
    // Without the keystore at all.
    fs::remove_file(&e.keystore).unwrap();
    e.ok(&[
        "--audit-key-file",
        "raw.key",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
}

#[test]
fn the_checkpoint_signing_key_is_sealed_by_default() {
    let e = keyed_env();
    // Neither sealed to a key nor asked for bare: refused.
    e.fails(&["audit", "checkpoint-keygen", "--out", "cp.key"], 1);
    // Sealed to the audit key's own sealing key: allowed, with a warning.
    let o = e.run(&[
        "audit",
        "checkpoint-keygen",
        "--seal-to",
        "local:audit",
        "--out",
        "weak.key",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("also seals the audit key"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&e.ok(&[
        "--audit-log",
        "audit.jsonl",
        "audit",
        "checkpoint-keygen",
        "--seal-to",
        "local:checkpoints",
        "--out",
        "cp.key",
    ]));
    let pk = out.split_whitespace().nth(3).unwrap().to_owned();
    assert_eq!(pk.len(), 64, "{out}");
    assert!(fs::read(e.path("cp.key")).unwrap().starts_with(b"PHIENV"));
    // The key uses that made it are in the trail.
    let log = fs::read_to_string(e.path("audit.jsonl")).unwrap();
    assert!(
        log.contains(r#""operation":"generate","provider":"local","key_ref":"local:checkpoints""#),
        "{log}"
    );
    e.ok(&[
        "audit",
        "checkpoint",
        "audit.jsonl",
        "--signing-key",
        "cp.key",
        "--out",
        "cps",
    ]);
    e.ok(&[
        "audit",
        "verify",
        "audit.jsonl",
        "--checkpoints",
        "cps",
        "--checkpoint-public-key",
        &pk,
    ]);
    // The audit key is not a signing key, though both are sealed alike.
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    let sealed = sealed.to_str().unwrap();
    let err = e.fails(
        &[
            "audit",
            "checkpoint",
            "audit.jsonl",
            "--signing-key",
            sealed,
        ],
        6,
    );
    assert!(err.contains("cannot open the sealed key"), "{err}");
    // A bare seed only when asked.
    e.ok(&[
        "audit",
        "checkpoint-keygen",
        "--unsealed",
        "--out",
        "bare.seed",
    ]);
    let bare = fs::read_to_string(e.path("bare.seed")).unwrap();
    assert_eq!(bare.trim().len(), 64);
}

/// An audit key sealed to some other key (anyone's backup key, say) is
/// not the trail's: only one sealed to the audit sealing key is taken, and
/// `encrypt` cannot make one at all.
#[test]
fn only_a_key_sealed_to_the_audit_sealing_key_is_taken() {
    let e = keyed_env();
    let err = e.fails(
        &[
            "encrypt",
            "--context",
            "phi-envelope-secret=audit-key/1",
            "-o",
            "forged.phienv",
            "f",
        ],
        1,
    );
    assert!(err.contains("reserved"), "{err}");
    e.ok(&[
        "--audit-key-ref",
        "local:backups",
        "audit",
        "keygen",
        "--out",
        "other.phienv",
    ]);
    let err = e.fails(
        &[
            "--audit-log",
            "new.jsonl",
            "--audit-key-sealed",
            "other.phienv",
            "encrypt",
            "-o",
            "g.phi",
            "f",
        ],
        6,
    );
    assert!(
        err.contains("not to the audit sealing key local:audit"),
        "{err}"
    );
    assert!(!e.path("g.phi").exists() && !e.path("new.jsonl").exists());
    let err = e.fails(
        &[
            "--audit-key-sealed",
            "other.phienv",
            "audit",
            "verify",
            "audit.jsonl",
        ],
        6,
    );
    assert!(err.contains("nothing was verified"), "{err}");
    // Trusted on purpose, it works.
    e.ok(&[
        "--audit-log",
        "new.jsonl",
        "--audit-key-sealed",
        "other.phienv",
        "--audit-key-ref",
        "local:backups",
        "encrypt",
        "-o",
        "g.phi",
        "f",
    ]);
}

/// No new key is made for a log that is not plainly new: a damaged first
/// line, rotated files without their first file, a directory that does
/// not exist. Nothing is written and no key is created.
#[test]
fn a_log_that_is_not_plainly_new_never_gets_a_new_key() {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&["keys", "init"]);
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    fs::write(e.path("torn.jsonl"), b"{\"seq\":0,\"type\":\"hea").unwrap();
    fs::write(e.path("rotated.jsonl.000002"), b"{}\n").unwrap();
    for log in ["torn.jsonl", "rotated.jsonl", "missing/dir/audit.jsonl"] {
        let err = e.fails(&["--audit-log", log, "encrypt", "-o", "g.phi", "f"], 6);
        assert!(err.contains("no key was used"), "{log}: {err}");
        assert!(!sealed.exists(), "{log}: a key was made");
        assert!(!e.path("g.phi").exists());
    }
    let list = stdout(&e.ok(&["keys", "list"]));
    assert!(!list.contains("local:audit"), "{list}");
}

/// Several first runs at once on a new log: one key wins, every run goes
/// on with it, and the chain verifies.
#[test]
fn first_runs_racing_on_a_new_log_share_one_key() {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&["keys", "init"]);
    let children: Vec<_> = (0..4)
        .map(|i| {
            e.cmd()
                .args(["--audit-log", "audit.jsonl", "encrypt", "-o"])
                .arg(format!("f{i}.phi"))
                .arg("f")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let out = stdout(&e.ok(&["audit", "verify", "audit.jsonl"]));
    assert!(out.contains("hmac-sha256"), "{out}");
}

/// A FIFO (or any file that is not a regular one) where the sealed key or
/// the log should be is refused at once, never waited on.
#[test]
fn a_fifo_at_the_sealed_key_or_the_log_is_refused_without_waiting() {
    let e = keyed_env();
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    fs::remove_file(&sealed).unwrap();
    let mk = |p: &std::path::Path| {
        assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    };
    mk(&sealed);
    mk(&e.path("fifo.jsonl"));
    for args in [
        vec!["--audit-log", "audit.jsonl", "encrypt", "-o", "g.phi", "f"],
        vec!["audit", "verify", "audit.jsonl"],
    ] {
        let mut child = e
            .cmd()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("{args:?} waited on a FIFO");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(6), "{args:?}");
    }
    fs::remove_file(&sealed).unwrap();
    let err = e.fails(
        &["--audit-log", "fifo.jsonl", "encrypt", "-o", "g.phi", "f"],
        6,
    );
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn destroying_the_version_that_seals_the_audit_key_warns_and_rewrap_moves_it() {
    let e = keyed_env();
    e.ok(&["keys", "rotate", "local:audit"]);
    let sealed = e.keystore.parent().unwrap().join("audit-key.phienv");
    let sealed = sealed.to_str().unwrap();
    e.ok(&[
        "rewrap",
        "--key",
        "local:audit",
        "--context",
        "phi-envelope-secret=audit-key/1",
        sealed,
    ]);
    let o = e.run(&["keys", "destroy", "local:audit", "--version", "1", "--yes"]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("seals the audit key"));
    e.ok(&["audit", "verify", "audit.jsonl"]);
    e.ok(&["keys", "rotate", "local:audit"]);
    let o = e.run(&["keys", "destroy", "local:audit", "--version", "2", "--yes"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("seals the audit key"), "{err}");
}

/// Disaster recovery with the keystore gone: a backup also wrapped to the
/// offline recovery key restores from its shares, but an audit log keyed
/// by a key sealed in that keystore cannot be written. The refusal says
/// so and what to do; each way out it names works.
#[cfg(feature = "recovery")]
#[test]
fn a_restore_without_the_keystore_says_the_audit_key_needs_it_and_how_to_go_on() {
    let e = keyed_env();
    let out = stdout(&e.ok(&[
        "recovery",
        "keygen",
        "--shares",
        "3",
        "--threshold",
        "2",
        "--out",
        "custody",
    ]));
    let mut lines = out.lines();
    let (recovery, public) = (lines.next().unwrap(), lines.next().unwrap());
    let o = e
        .cmd()
        .env("PHI_ENVELOPE_RECOVERY_PUBLIC_KEY", public)
        .args([
            "--audit-log",
            "audit.jsonl",
            "encrypt",
            "--key",
            "local:backups",
        ])
        .args(["--key", recovery, "-o", "dr.phi", "f"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The raw audit key, as recovered from a copy of the keystore.
    fs::write(e.path("pass"), PASSPHRASE).unwrap();
    let rec = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/independent/keystore_recover.py"
        ))
        .arg("--keystore")
        .arg(&e.keystore)
        .arg("--passphrase-file")
        .arg(e.path("pass"))
        .arg("--message")
        .arg(e.keystore.parent().unwrap().join("audit-key.phienv"))
        .args(["--context", "phi-envelope-secret=audit-key/1"])
        .output()
        .unwrap();
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&rec.stdout).unwrap();
    fs::write(e.path("raw.key"), v["plaintext"].as_str().unwrap()).unwrap();

    fs::remove_dir_all(e.keystore.parent().unwrap()).unwrap();
    let restore = |extra: &[&str], out: &str| {
        let mut a: Vec<&str> = extra.to_vec();
        a.extend([
            "decrypt",
            "--recovery-share",
            "custody/share-1-of-3.txt",
            "--recovery-share",
            "custody/share-3-of-3.txt",
            "-o",
            out,
            "dr.phi",
        ]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = restore(&["--audit-log", "audit.jsonl"], "out-1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = e.fails(&args, 3);
    assert!(
        err.contains("sealed to a keystore key") && err.contains("--audit-key-file"),
        "{err}"
    );
    assert!(!e.path("out-1").exists());
    let args = restore(
        &["--audit-log", "audit.jsonl", "--audit-key-file", "raw.key"],
        "out-2",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    e.ok(&args);
    assert_eq!(fs::read(e.path("out-2")).unwrap(), b"phi");
    e.ok(&[
        "--audit-key-file",
        "raw.key",
        "audit",
        "verify",
        "audit.jsonl",
    ]);
    let args = restore(&["--audit-log", "dr.jsonl", "--audit-unkeyed"], "out-3");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    e.ok(&args);
}

/// A raw key file may be a symbolic link (orchestrators mount secrets so),
/// but not a FIFO, which is refused rather than waited on.
#[test]
fn a_raw_key_file_may_be_a_link_but_never_a_fifo() {
    let e = Env::new();
    fs::write(e.path("f"), b"phi").unwrap();
    e.ok(&["keys", "init"]);
    fs::write(e.path("real.key"), "ab".repeat(32)).unwrap();
    std::os::unix::fs::symlink(e.path("real.key"), e.path("link.key")).unwrap();
    e.ok(&[
        "--audit-log",
        "audit.jsonl",
        "--audit-key-file",
        "link.key",
        "encrypt",
        "-o",
        "f.phi",
        "f",
    ]);
    assert!(Command::new("mkfifo")
        .arg(e.path("fifo.key"))
        .status()
        .unwrap()
        .success());
    let mut child = e
        .cmd()
        .args([
            "--audit-key-file",
            "fifo.key",
            "audit",
            "verify",
            "audit.jsonl",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("waited on a FIFO key file");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(6));
}
