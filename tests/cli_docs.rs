//! The shell blocks of the operator documents run as tests: every ```sh
//! block of docs/KEY-LIFECYCLE.md and docs/CLI.md is extracted and run
//! with bash (`set -euo pipefail`) in a temporary directory, against the
//! built `backup` CLI, so that a documented command that stops working
//! fails CI. Absolute paths of the documents (`/backups`, `/etc/phi`, ...)
//! are mapped into the temporary directory. A block preceded by
//! `<!-- doc-test: skip (why) -->` is not run (an example value, a build,
//! an HSM); the reason is required.
//!
//! KEY-LIFECYCLE.md is a procedure: its blocks run in order in one shell,
//! each building on the last. CLI.md's blocks are independent examples:
//! each runs in a fresh directory with a keystore and a few backups.

mod cli_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cli_support::{code, Env};

/// A shell block of a document.
#[derive(Debug)]
struct Block {
    /// `docs/X.md:LINE` of the opening fence.
    at: String,
    code: String,
    /// Why it is not run, when it is not.
    skip: Option<String>,
}

/// The ```sh blocks of `doc` (relative to the repository), in order.
fn blocks(doc: &str) -> Vec<Block> {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    let mut prev = "";
    while let Some((i, line)) = lines.next() {
        let fence = line.trim_start();
        if fence == "```sh" {
            let indent = line.len() - fence.len();
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim_start() == "```" {
                    break;
                }
                code.push_str(l.get(indent..).unwrap_or(l.trim_start()));
                code.push('\n');
            }
            let skip = prev
                .trim()
                .strip_prefix("<!-- doc-test: skip")
                .map(|r| r.trim_end_matches("-->").trim().to_owned());
            if let Some(why) = &skip {
                assert!(
                    why.starts_with('(') && why.len() > 2,
                    "{doc}:{}: a skipped block needs a reason",
                    i + 1
                );
            }
            out.push(Block {
                at: format!("{doc}:{}", i + 1),
                code,
                skip,
            });
        }
        if !line.trim().is_empty() {
            prev = line;
        }
    }
    assert!(!out.is_empty(), "{doc} has no shell blocks");
    out
}

/// The absolute paths the documents use, mapped into the sandbox.
const ROOTS: [&str; 6] = [
    "/etc/phi",
    "/var/log/phi",
    "/backups",
    "/srv",
    "/tmp/x",
    "/media",
];

/// `code` with the documents' absolute paths under `$ROOT`. Any other
/// absolute path in a command would escape the sandbox: refused.
fn sandboxed(block: &Block) -> String {
    let mut code = block.code.clone();
    for root in ROOTS {
        code = code.replace(root, &format!("$ROOT{root}"));
    }
    for word in code.split(|c: char| c.is_whitespace() || "\"'=(".contains(c)) {
        assert!(
            !word.starts_with('/') || word.starts_with("/dev/"),
            "{}: the absolute path {word} is not mapped into the sandbox (add it to ROOTS)",
            block.at
        );
    }
    code
}

/// A sandbox: a private directory with `backup` on PATH and the test's
/// passphrase.
struct Sandbox {
    env: Env,
    bin_dir: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        // The runbook's checks are jq pipelines: without jq they cannot be
        // run, and the test must say why rather than fail obscurely.
        let jq = Command::new("jq").arg("--version").output();
        assert!(
            jq.is_ok_and(|o| o.status.success()),
            "jq is needed to run the documents' shell blocks (scripts/install-deps.sh installs it)"
        );
        let env = Env::new();
        let bin_dir = env.path("bin");
        fs::create_dir(&bin_dir).unwrap();
        std::os::unix::fs::symlink(cli_support::bin(), bin_dir.join("backup")).unwrap();
        for root in ROOTS {
            let p = env.path(root.trim_start_matches('/'));
            let dir = if root == "/tmp/x" {
                p.parent().unwrap().to_path_buf()
            } else {
                p
            };
            fs::create_dir_all(dir).unwrap();
        }
        Sandbox { env, bin_dir }
    }

    /// Runs `script` with bash in the sandbox.
    fn bash(&self, script: &str) -> Output {
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("bash")
            .arg("-c")
            .arg(format!("set -euo pipefail\n{script}"))
            .current_dir(self.env.dir.path())
            .env("PATH", path)
            .env("ROOT", self.env.dir.path())
            .env("PHI_ENVELOPE_PASSPHRASE", cli_support::PASSPHRASE)
            .env("PHI_ENVELOPE_ACTOR", "doc-test")
            .env("PHI_ENVELOPE_KEYSTORE", &self.env.keystore)
            .env_remove("PHI_ENVELOPE_AUDIT_LOG")
            .env_remove("PHI_ENVELOPE_AUDIT_KEY_FILE")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `script` and asserts success, naming `what`.
    fn ok(&self, what: &str, script: &str) -> Output {
        let o = self.bash(script);
        assert_eq!(
            code(&o),
            0,
            "{what} failed:\n{script}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }
}

/// Inputs the documents back up.
const DUMPS: &str = r#"
printf 'patient dump 1\n' > "$ROOT/srv/dumps/db.sql"
printf 'patient dump 0\n' > "$ROOT/srv/dumps/db-00.sql"
printf 'patient dump 2\n' > "$ROOT/srv/dumps/db-02.sql"
"#;

#[test]
fn key_lifecycle_runbook_runs_as_written() {
    let sb = Sandbox::new();
    fs::create_dir_all(sb.env.path("srv/dumps")).unwrap();
    // What the runbook takes as given: the audit key, and nightly backups
    // under v1 once the key exists (a store in /backups/2026, and an old
    // one that is never rewrapped and must be shredded with v1).
    fs::write(sb.env.path("etc/phi/audit.key"), "ab".repeat(32)).unwrap();
    let nightly = r#"
mkdir -p "$ROOT/backups/2026"
backup encrypt --context system=emr -o "$ROOT/backups/2026/db-01.phi" "$ROOT/srv/dumps/db.sql"
backup encrypt --context system=emr -o "$ROOT/backups/2026/db-02.phi" "$ROOT/srv/dumps/db-02.sql"
mkdir -p "$ROOT/backups/old"
backup encrypt --context system=emr -o "$ROOT/backups/old/v1-only.phi" "$ROOT/srv/dumps/db-00.sql"
"#;
    let mut script = String::from(DUMPS);
    let mut ran = 0;
    for b in blocks("docs/KEY-LIFECYCLE.md") {
        if b.skip.is_some() {
            continue;
        }
        script.push_str(&format!("echo '== {}' >&2\n{}\n", b.at, sandboxed(&b)));
        if b.code.contains("backup keys init") {
            script.push_str(nightly);
        }
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} blocks ran");
    let o = sb.ok("docs/KEY-LIFECYCLE.md", &script);
    let err = String::from_utf8_lossy(&o.stderr);
    // The procedure really happened: v1 destroyed, the store on v2, the
    // audit log verified by the runbook's own jq queries above.
    let v: serde_json::Value = serde_json::from_slice(
        &sb.env
            .cmd()
            .env(
                "PHI_ENVELOPE_KEYSTORE",
                sb.env.path("etc/phi/keystore.json"),
            )
            .args(["keys", "show", "--json", "local:backups"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(v["versions"][0]["state"], "destroyed", "{v}\n{err}");
    // The 5.3 check said so (its message names the mapped directory).
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("no backup in"), "{out}\n{err}");
}

#[test]
fn cli_manual_examples_run_as_written() {
    let mut ran = 0;
    for b in blocks("docs/CLI.md") {
        if b.skip.is_some() {
            continue;
        }
        let sb = Sandbox::new();
        fs::create_dir_all(sb.env.path("srv/dumps")).unwrap();
        let mut script = String::from(DUMPS);
        if !b.code.contains("backup keys init") {
            // A machine in use: a keystore and backups of a month.
            script.push_str(
                r#"
backup keys init >/dev/null
mkdir -p "$ROOT/backups/2026-11"
backup encrypt -q --context system=emr -o "$ROOT/backups/2026-11/db-01.phi" "$ROOT/srv/dumps/db.sql"
backup encrypt -q --context system=emr -o "$ROOT/backups/2026-11/db-02.phi" "$ROOT/srv/dumps/db-02.sql"
"#,
            );
        }
        script.push_str(&sandboxed(&b));
        sb.ok(&b.at, &script);
        ran += 1;
    }
    assert!(ran >= 3, "only {ran} blocks ran");
}

/// The §5.3 check of KEY-LIFECYCLE.md, exactly as the document has it: the
/// lines from "for f in" to the end of the jq command in the block that
/// says "nothing references v1 any more".
fn no_v1_check() -> String {
    let b = blocks("docs/KEY-LIFECYCLE.md")
        .into_iter()
        .find(|b| b.code.contains("nothing references v1 any more"))
        .expect("KEY-LIFECYCLE.md 5.3 has the no-v1 check");
    let code = sandboxed(&b);
    let start = code.find("for f in").expect("the check starts with a loop");
    code[start..].trim().to_owned()
}

/// The pre-check before crypto-shredding must see every backup, not only
/// the last one: with three backups of which only the middle one is still
/// under v1, it fails; once that one is rewrapped, it passes.
#[test]
fn the_no_v1_check_fails_when_any_backup_still_names_v1() {
    let sb = Sandbox::new();
    let check = no_v1_check();
    fs::create_dir_all(sb.env.path("backups/2026")).unwrap();
    fs::write(sb.env.path("f"), b"phi").unwrap();
    sb.ok(
        "setup",
        r#"
backup keys init >/dev/null
backup encrypt -q --context system=emr -o "$ROOT/backups/2026/b.phi" f
backup keys rotate local:backups >/dev/null
backup encrypt -q --context system=emr -o "$ROOT/backups/2026/a.phi" f
backup encrypt -q --context system=emr -o "$ROOT/backups/2026/c.phi" f
"#,
    );
    // b.phi (v1) is neither the first nor the last document.
    let o = sb.bash(&check);
    assert_ne!(
        code(&o),
        0,
        "the check passed although b.phi is under v1:\n{check}\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Only the first one under v1: fails too.
    let o = sb.bash(&format!(
        "mv \"$ROOT/backups/2026/b.phi\" \"$ROOT/backups/2026/0.phi\"\n{check}"
    ));
    assert_ne!(code(&o), 0, "the check passed although 0.phi is under v1");
    // An unreadable backup is no proof of anything: fails.
    let o = sb.bash(&format!(
        "backup rewrap -q --context system=emr \"$ROOT\"/backups/2026/*.phi >/dev/null\n\
         printf 'not a backup' > \"$ROOT/backups/2026/z.phi\"\n{check}"
    ));
    assert_ne!(code(&o), 0, "the check passed over a file inspect refuses");
    // Everything rewrapped to v2: passes.
    sb.ok(
        "the check after the rewrap",
        &format!("rm \"$ROOT/backups/2026/z.phi\"\n{check}"),
    );
}
