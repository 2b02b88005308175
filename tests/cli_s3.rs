//! The `backup` CLI on object storage (`s3://BUCKET/KEY`), end to end
//! against moto's S3 endpoint (scripts/moto.sh, started by scripts/test.sh;
//! `AWS_ENDPOINT_URL` and the test credentials come from its environment),
//! and through scripts/kms_fault_proxy.py for dropped connections and
//! 500/503 answers. Every test has its own bucket. Parts are 5 MiB (S3's
//! smallest) so that a few tens of MiB make several parts.
#![cfg(all(feature = "s3", feature = "local"))]

mod cli_support;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use cli_support::{code, make_tree, signal, snapshot, stdout, wait_until, Env};

const PART: usize = 5 << 20;

fn moto_url() -> String {
    std::env::var("PHI_MOTO_URL").expect(
        "PHI_MOTO_URL is not set: run the S3 tests with scripts/test.sh (it starts moto_server)",
    )
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A client straight to moto (never through a fault proxy): the test's
/// view of the bucket.
fn client() -> Client {
    rt().block_on(async {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(moto_url())
            .load()
            .await;
        Client::new(&shared)
    })
}

/// A fresh bucket for one test.
struct Bucket {
    name: String,
    s3: Client,
}

impl Bucket {
    fn new(test: &str) -> Bucket {
        let name = format!("phi-{test}-{}", std::process::id());
        let s3 = client();
        rt().block_on(s3.create_bucket().bucket(&name).send())
            .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
        Bucket { name, s3 }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.name)
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        rt().block_on(async {
            match self
                .s3
                .get_object()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
            {
                Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
                Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => None,
                Err(e) => panic!("get {key}: {e:?}"),
            }
        })
    }

    fn put(&self, key: &str, body: Vec<u8>) {
        rt().block_on(
            self.s3
                .put_object()
                .bucket(&self.name)
                .key(key)
                .body(ByteStream::from(body))
                .send(),
        )
        .unwrap();
    }

    fn keys(&self) -> Vec<String> {
        let o = rt()
            .block_on(self.s3.list_objects_v2().bucket(&self.name).send())
            .unwrap();
        o.contents()
            .iter()
            .map(|o| o.key().unwrap().to_owned())
            .collect()
    }

    /// The multipart uploads in progress (ListMultipartUploads).
    fn uploads(&self) -> Vec<String> {
        let o = rt()
            .block_on(self.s3.list_multipart_uploads().bucket(&self.name).send())
            .unwrap();
        o.uploads()
            .iter()
            .map(|u| u.upload_id().unwrap().to_owned())
            .collect()
    }

    /// Parts stored so far by the upload `id`.
    fn parts(&self, key: &str, id: &str) -> usize {
        rt().block_on(
            self.s3
                .list_parts()
                .bucket(&self.name)
                .key(key)
                .upload_id(id)
                .send(),
        )
        .map(|o| o.parts().len())
        .unwrap_or_else(|e| {
            // moto names the answer's root ListPartsResponse (S3:
            // ListPartsResult), which the SDK refuses: count the parts in
            // the body.
            let body = e
                .raw_response()
                .and_then(|r| r.body().bytes())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            assert!(body.contains("<ListPartsResponse"), "ListParts: {e:?}");
            body.matches("<Part>").count()
        })
    }

    fn assert_clean(&self, key: &str) {
        assert_eq!(self.get(key), None, "an object was left under {key}");
        assert_eq!(self.keys(), Vec::<String>::new(), "objects were left");
        assert_eq!(
            self.uploads(),
            Vec::<String>::new(),
            "multipart uploads (and their parts) were left behind"
        );
    }
}

/// A keystore and the test's part size; AWS_* from the environment.
fn env() -> Env {
    let e = Env::new();
    e.ok(&["keys", "init"]);
    e
}

fn cmd(e: &Env, endpoint: Option<&str>) -> Command {
    let mut c = e.cmd();
    c.env("PHI_ENVELOPE_S3_PART_SIZE", PART.to_string()).env(
        "AWS_ENDPOINT_URL",
        endpoint.map_or_else(moto_url, str::to_owned),
    );
    c
}

fn run(e: &Env, args: &[&str]) -> std::process::Output {
    cmd(e, None).args(args).output().unwrap()
}

fn ok(e: &Env, args: &[&str]) -> std::process::Output {
    let o = run(e, args);
    assert_eq!(
        code(&o),
        0,
        "backup {args:?}:\nstdout: {}\nstderr: {}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn fails(e: &Env, args: &[&str], want: i32) -> String {
    let o = run(e, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        code(&o),
        want,
        "backup {args:?}: expected exit {want}\nstdout: {}\nstderr: {err}",
        stdout(&o)
    );
    cli_support::assert_friendly(&err);
    err
}

/// Bytes that do not compress and are not all alike.
fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn file_round_trip_in_several_parts_with_inspect_and_ls() {
    let b = Bucket::new("file");
    let e = env();
    let input = e.path("db.sql");
    let plain = data(4 * PART + 12_345, 1);
    std::fs::write(&input, &plain).unwrap();
    let url = b.url("nightly/db.phi");
    let o = ok(&e, &["encrypt", "-o", &url, input.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("to {url}")));
    let stored = b.get("nightly/db.phi").expect("the object");
    assert!(stored.len() > plain.len());
    assert_eq!(b.uploads(), Vec::<String>::new());
    // The same bytes as a local backup would hold: a local decrypt of the
    // downloaded object restores the input.
    std::fs::write(e.path("copy.phi"), &stored).unwrap();
    e.ok(&["decrypt", "-o", "from-copy", "copy.phi"]);
    assert_eq!(std::fs::read(e.path("from-copy")).unwrap(), plain);

    ok(&e, &["decrypt", "-o", "restored", &url]);
    assert_eq!(std::fs::read(e.path("restored")).unwrap(), plain);
    let v = ok(&e, &["verify", "--json", &url]);
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["results"][0]["plaintext_bytes"], plain.len() as u64);
    assert_eq!(j["results"][0]["path"], url.as_str());

    let i = ok(&e, &["inspect", "--json", &url]);
    let j: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
    assert_eq!(j["file_bytes"], stored.len() as u64);
    assert_eq!(j["plaintext_bytes"], plain.len() as u64);
    assert_eq!(j["recipients"][0]["key_ref"], "local:backups");
    assert_eq!(j["recipients"][0]["key_version"], 1);

    // ls: the backup with its size and keys, and an object that is not one.
    b.put("nightly/notes.txt", b"not a backup".to_vec());
    b.put("other/x.phi", stored.clone());
    let l = stdout(&ok(&e, &["ls", &b.url("nightly/")]));
    assert!(
        l.lines().any(
            |l| l.starts_with(&format!("{url}  {} bytes (", stored.len()))
                && l.ends_with(")  keys local:backups v1")
        ),
        "{l}"
    );
    assert!(
        l.contains(&format!(
            "{}  12 bytes  not a backup",
            b.url("nightly/notes.txt")
        )),
        "{l}"
    );
    assert!(!l.contains("other/x.phi"), "{l}");
    let l = ok(&e, &["ls", "--json", &b.url("")]);
    let j: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap();
    let objs = j["objects"].as_array().unwrap();
    assert_eq!(objs.len(), 3);
    let backups: Vec<&str> = objs
        .iter()
        .filter(|o| o["backup"] == true)
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert_eq!(backups, ["nightly/db.phi", "other/x.phi"]);
    assert_eq!(objs[0]["recipients"][0]["key_version"], 1);
    assert_eq!(objs[0]["size"], stored.len() as u64);
}

#[test]
fn directory_round_trip_larger_than_several_parts() {
    let b = Bucket::new("dir");
    let e = env();
    let root = e.path("tree");
    make_tree(&root);
    std::fs::write(root.join("db/2026/dump.bin"), data(3 * PART + 77, 2)).unwrap();
    let url = b.url("dirs/tree.phi");
    ok(&e, &["encrypt", "-o", &url, root.to_str().unwrap()]);
    assert!(b.get("dirs/tree.phi").unwrap().len() > 3 * PART);
    ok(&e, &["decrypt", "-o", "restored", &url]);
    assert_eq!(snapshot(&root), snapshot(&e.path("restored")));
    cli_support::unlock(&e.path("restored"));
    cli_support::unlock(&root);
}

#[test]
fn existing_object_refused_without_force_and_replaced_with_it() {
    let b = Bucket::new("exists");
    let e = env();
    std::fs::write(e.path("a"), b"first").unwrap();
    std::fs::write(e.path("b"), b"second").unwrap();
    let url = b.url("x.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    let first = b.get("x.phi").unwrap();
    let err = fails(&e, &["encrypt", "-o", &url, "b"], 5);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(b.get("x.phi").unwrap(), first);
    assert_eq!(b.uploads(), Vec::<String>::new());
    ok(&e, &["encrypt", "--force", "-o", &url, "b"]);
    ok(&e, &["decrypt", "-o", "-", &url]);
    let o = ok(&e, &["decrypt", "-o", "-", &url]);
    assert_eq!(o.stdout, b"second");
}

/// An encrypt that streams stdin into `url`; the test writes the input.
fn spawn_encrypt(e: &Env, url: &str, endpoint: Option<&str>) -> Child {
    cmd(e, endpoint)
        .args(["encrypt", "-o", url, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn an_object_created_during_the_upload_is_not_replaced() {
    let b = Bucket::new("race");
    let e = env();
    let url = b.url("race.phi");
    let mut child = spawn_encrypt(&e, &url, None);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data(2 * PART, 3)).unwrap();
    // Someone else writes the object after our check and before our
    // completion: the conditional completion (If-None-Match: *) refuses.
    wait_until("the upload started", || !b.uploads().is_empty());
    b.put("race.phi", b"theirs".to_vec());
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 5, "{err}");
    cli_support::assert_friendly(&err);
    // What happened, and what the operator can do about it.
    assert!(err.contains("already exists"), "{err}");
    assert!(err.contains("while this backup was uploaded"), "{err}");
    assert!(err.contains("left as it is"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(err.contains("another name"), "{err}");
    assert_eq!(b.get("race.phi").unwrap(), b"theirs");
    assert_eq!(b.uploads(), Vec::<String>::new());
}

/// A rewrap whose object was replaced after it was read is refused by
/// the store with 412 Precondition Failed, on the body's copy
/// (`x-amz-copy-source-if-match`) or on the completion (`If-Match`). moto
/// ignores both conditions, so the proxy answers what AWS S3 does. The
/// message says the object changed and to run the rewrap again (rewrap
/// has no --force), not that it "already exists"; the object is left as
/// it is and the upload aborted.
#[test]
fn a_rewrap_refused_by_a_precondition_says_the_object_changed() {
    let b = Bucket::new("rewrap412");
    let p = Proxy::start();
    let e = env();
    std::fs::write(e.path("a"), data(3 * PART + 5, 16)).unwrap();
    let url = b.url("r.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    let before = b.get("r.phi").unwrap();
    e.ok(&["keys", "rotate", "local:backups"]);
    for (method, path, op) in [
        ("PUT", "partNumber=2", "UploadPartCopy 2"),
        ("POST", "uploadId=", "CompleteMultipartUpload"),
    ] {
        p.rules(serde_json::json!([
            {"action": "error", "protocol": "s3", "error_type": "PreconditionFailed",
             "message": "At least one of the pre-conditions you specified did not hold",
             "status": 412, "method": method, "path_contains": path, "count": 1},
        ]));
        let o = run_via(&e, &p, &["rewrap", &url]);
        cli_support::assert_friendly(&String::from_utf8_lossy(&o.stderr));
        // rewrap reports each input on stdout (FAILED ...).
        let err = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
        assert_eq!(code(&o), 4, "{op}: {err}");
        assert!(err.contains(op), "{op}: {err}");
        assert!(
            err.contains("changed while it was rewrapped"),
            "{op}: {err}"
        );
        assert!(err.contains("left as it is"), "{op}: {err}");
        assert!(err.contains("run the rewrap again"), "{op}: {err}");
        assert!(!err.contains("already exists"), "{op}: {err}");
        assert!(!err.contains("--force"), "{op}: {err}");
        assert_eq!(
            b.get("r.phi").unwrap(),
            before,
            "{op}: the object was replaced"
        );
        assert_eq!(b.uploads(), Vec::<String>::new(), "{op}");
    }
}

#[test]
fn an_interrupt_mid_upload_leaves_no_object_and_no_parts() {
    // (SIGTERM, like SIGINT, exits with 130: docs/CLI.md, "Exit codes".)
    for (sig, status, name) in [("-INT", 130, "int"), ("-TERM", 130, "term")] {
        let b = Bucket::new(&format!("intr-{name}"));
        let e = env();
        let url = b.url("big.phi");
        let mut child = spawn_encrypt(&e, &url, None);
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&data(3 * PART, 4)).unwrap();
        // Parts are stored: the upload is under way.
        wait_until("a part was stored", || {
            b.uploads()
                .first()
                .is_some_and(|id| b.parts("big.phi", id) > 0)
        });
        signal(child.id(), sig);
        // The producer goes on writing; the CLI stops reading.
        let _ = stdin.write_all(&data(PART, 5));
        drop(stdin);
        let o = child.wait_with_output().unwrap();
        assert_eq!(code(&o), status, "{}", String::from_utf8_lossy(&o.stderr));
        b.assert_clean("big.phi");
    }
}

#[test]
fn a_refused_key_touches_no_object_and_leaves_no_upload() {
    let b = Bucket::new("nokey");
    let e = env();
    std::fs::write(e.path("a"), data(PART + 1, 6)).unwrap();
    let url = b.url("a.phi");
    fails(
        &e,
        &["encrypt", "--key", "local:nonexistent", "-o", &url, "a"],
        3,
    );
    b.assert_clean("a.phi");
    // And at restore: the wrong context is refused, nothing is written.
    ok(&e, &["encrypt", "--context", "site=a", "-o", &url, "a"]);
    fails(
        &e,
        &["decrypt", "--context", "site=b", "-o", "out", &url],
        2,
    );
    assert!(!e.path("out").exists());
}

#[test]
fn a_truncated_or_tampered_object_is_refused() {
    let b = Bucket::new("tamper");
    let e = env();
    let plain = data(2 * PART + 999, 7);
    std::fs::write(e.path("a"), &plain).unwrap();
    ok(&e, &["encrypt", "-o", &b.url("good.phi"), "a"]);
    let good = b.get("good.phi").unwrap();
    let mut cut = good.clone();
    cut.truncate(good.len() - 100);
    b.put("cut.phi", cut);
    let mut flipped = good.clone();
    let at = good.len() / 2;
    flipped[at] ^= 0x01;
    b.put("flipped.phi", flipped);
    let mut cut_at_chunk = good.clone();
    cut_at_chunk.truncate(PART);
    b.put("short.phi", cut_at_chunk);
    for key in ["cut.phi", "flipped.phi", "short.phi"] {
        let err = fails(&e, &["decrypt", "-o", "out", &b.url(key)], 2);
        assert!(!e.path("out").exists(), "{key}: {err}");
        let v = run(&e, &["verify", &b.url(key)]);
        assert_eq!(code(&v), 2, "{key}: {}", stdout(&v));
        assert!(stdout(&v).starts_with("FAILED"), "{}", stdout(&v));
    }
    ok(&e, &["verify", &b.url("good.phi")]);
}

#[test]
fn rewrap_rewrites_the_header_and_keeps_the_body_byte_for_byte() {
    let b = Bucket::new("rewrap");
    let e = env();
    let plain = data(3 * PART + 5, 8);
    std::fs::write(e.path("a"), &plain).unwrap();
    let url = b.url("r.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    let before = b.get("r.phi").unwrap();
    let o = ok(&e, &["rewrap", &url]);
    assert!(stdout(&o).starts_with("unchanged"), "{}", stdout(&o));
    assert_eq!(b.get("r.phi").unwrap(), before);
    e.ok(&["keys", "rotate", "local:backups"]);
    let o = ok(&e, &["rewrap", &url]);
    assert!(
        stdout(&o).contains("local:backups v1 -> local:backups v2"),
        "{}",
        stdout(&o)
    );
    let after = b.get("r.phi").unwrap();
    let i: serde_json::Value =
        serde_json::from_slice(&ok(&e, &["inspect", "--json", &url]).stdout).unwrap();
    assert_eq!(i["recipients"][0]["key_version"], 2);
    let (old_h, new_h) = (
        before.len() - i["body_bytes"].as_u64().unwrap() as usize,
        i["header_bytes"].as_u64().unwrap() as usize,
    );
    assert_eq!(after[new_h..], before[old_h..], "the body changed");
    assert_ne!(after[..new_h], before[..old_h]);
    assert_eq!(b.uploads(), Vec::<String>::new());
    ok(&e, &["decrypt", "-o", "back", &url]);
    assert_eq!(std::fs::read(e.path("back")).unwrap(), plain);
}

// ---------------------------------------------------------------------------
// Faults: scripts/kms_fault_proxy.py between the CLI and moto.

struct Proxy {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start() -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kms_fault_proxy.py");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(python)
            .arg(&script)
            .args(["--upstream", &moto_url(), "--port", "0", "--quiet"])
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the fault proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Proxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn control(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-sS", "-X", method, "-H", "content-type: application/json"])
            .args(["--data-binary", body])
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn rules(&self, rules: serde_json::Value) {
        self.control("DELETE", "/__fault__", "");
        let added = self.control(
            "POST",
            "/__fault__",
            &serde_json::json!({ "rules": rules }).to_string(),
        );
        assert!(added["added"].is_array(), "{added}");
    }

    fn faults(&self) -> u64 {
        let s = self.control("GET", "/__fault__/stats", "");
        s["faults"]
            .as_object()
            .map_or(0, |m| m.values().map(|v| v.as_u64().unwrap()).sum())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through the proxy, with a retry budget larger than the faults a test
/// injects (the standard AWS_MAX_ATTEMPTS), so that no request can be
/// unlucky enough to meet them all.
fn run_via(e: &Env, p: &Proxy, args: &[&str]) -> std::process::Output {
    cmd(e, Some(&p.url))
        .env("AWS_MAX_ATTEMPTS", "6")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn upload_survives_dropped_connections_and_5xx_within_the_retry_budget() {
    let b = Bucket::new("upfault");
    let p = Proxy::start();
    let e = env();
    let plain = data(4 * PART + 3, 9);
    std::fs::write(e.path("a"), &plain).unwrap();
    let part = "partNumber=";
    p.rules(serde_json::json!([
        {"action": "error", "protocol": "s3", "error_type": "SlowDown", "method": "PUT", "path_contains": part, "count": 1},
        {"action": "drop", "method": "PUT", "path_contains": part, "skip": 1, "count": 1},
        {"action": "error", "protocol": "s3", "error_type": "InternalError", "method": "PUT", "path_contains": part, "skip": 2, "count": 1},
        {"action": "drop_response", "method": "PUT", "path_contains": part, "skip": 3, "count": 1},
    ]));
    let url = b.url("a.phi");
    let o = run_via(&e, &p, &["encrypt", "-o", &url, "a"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(p.faults(), 4);
    assert_eq!(b.uploads(), Vec::<String>::new());
    ok(&e, &["decrypt", "-o", "back", &url]);
    assert_eq!(std::fs::read(e.path("back")).unwrap(), plain);
}

#[test]
fn upload_failing_past_the_retry_budget_aborts_with_a_clear_error() {
    let b = Bucket::new("upfail");
    let p = Proxy::start();
    let e = env();
    std::fs::write(e.path("a"), data(3 * PART, 10)).unwrap();
    p.rules(serde_json::json!([
        {"action": "error", "protocol": "s3", "error_type": "ServiceUnavailable", "method": "PUT", "path_contains": "partNumber=", "skip": 1},
    ]));
    let url = b.url("a.phi");
    let o = cmd(&e, Some(&p.url))
        .env("AWS_MAX_ATTEMPTS", "2")
        .args(["encrypt", "-o", &url, "a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(code(&o), 4, "{err}");
    cli_support::assert_friendly(&err);
    assert!(err.contains("UploadPart"), "{err}");
    assert!(err.contains("ServiceUnavailable"), "{err}");
    assert!(err.contains("HTTP 503"), "{err}");
    assert!(err.contains("retries"), "{err}");
    b.assert_clean("a.phi");
}

#[test]
fn download_survives_cut_bodies_and_5xx_and_fails_cleanly_past_them() {
    let b = Bucket::new("downfault");
    let p = Proxy::start();
    let e = env();
    let plain = data(3 * PART + 11, 11);
    std::fs::write(e.path("a"), &plain).unwrap();
    let url = b.url("a.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    p.rules(serde_json::json!([
        {"action": "cut_body", "method": "GET", "skip": 1, "count": 2},
        {"action": "error", "protocol": "s3", "error_type": "SlowDown", "method": "GET", "count": 1},
        {"action": "drop", "method": "GET", "skip": 3, "count": 1},
        {"action": "error", "protocol": "s3", "error_type": "InternalError", "method": "GET", "skip": 4, "count": 1},
    ]));
    let o = run_via(&e, &p, &["decrypt", "-o", "back", &url]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(e.path("back")).unwrap(), plain);
    assert_eq!(p.faults(), 5);

    // Every body cut: a clear error, nothing under the output name.
    p.rules(serde_json::json!([
        {"action": "cut_body", "method": "GET", "path_contains": "a.phi", "skip": 1},
    ]));
    let o = run_via(&e, &p, &["decrypt", "-o", "again", &url]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(code(&o), 4, "{err}");
    cli_support::assert_friendly(&err);
    assert!(err.contains("cut mid-transfer"), "{err}");
    assert!(!e.path("again").exists());
    assert!(cli_support::temps(e.dir.path()).is_empty());
}

#[test]
fn retain_until_locks_the_new_object() {
    let name = format!("phi-lock-{}", std::process::id());
    let s3 = client();
    rt().block_on(
        s3.create_bucket()
            .bucket(&name)
            .object_lock_enabled_for_bucket(true)
            .send(),
    )
    .unwrap();
    let e = env();
    std::fs::write(e.path("a"), data(PART + 10, 12)).unwrap();
    let url = format!("s3://{name}/locked.phi");
    ok(
        &e,
        &[
            "encrypt",
            "--retain-until",
            "2099-01-02",
            "--retain-mode",
            "compliance",
            "-o",
            &url,
            "a",
        ],
    );
    let h = rt()
        .block_on(s3.head_object().bucket(&name).key("locked.phi").send())
        .unwrap();
    assert_eq!(
        h.object_lock_mode(),
        Some(&aws_sdk_s3::types::ObjectLockMode::Compliance)
    );
    assert_eq!(
        h.object_lock_retain_until_date()
            .unwrap()
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap(),
        "2099-01-02T00:00:00Z"
    );
    ok(&e, &["verify", &url]);
    // Refused before anything is written: a past date, a local output.
    let b = Bucket::new("lockusage");
    let err = fails(
        &e,
        &[
            "encrypt",
            "--retain-until",
            "2001-01-01",
            "-o",
            &b.url("x"),
            "a",
        ],
        1,
    );
    assert!(err.contains("in the past"), "{err}");
    let err = fails(
        &e,
        &[
            "encrypt",
            "--retain-until",
            "2099-01-01",
            "-o",
            "x.phi",
            "a",
        ],
        1,
    );
    assert!(err.contains("s3://"), "{err}");
    let err = fails(
        &e,
        &["encrypt", "--retain-until", "soon", "-o", &b.url("x"), "a"],
        1,
    );
    assert!(err.contains("YYYY-MM-DD"), "{err}");
    b.assert_clean("x");
}

#[test]
fn plaintext_never_goes_to_object_storage_and_urls_are_checked() {
    let b = Bucket::new("usage");
    let e = env();
    std::fs::write(e.path("a"), b"x").unwrap();
    let url = b.url("a.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    let err = fails(&e, &["decrypt", "-o", &b.url("plain"), &url], 1);
    assert!(err.contains("plaintext"), "{err}");
    let err = fails(&e, &["encrypt", "-o", "x.phi", &url], 1);
    assert!(err.contains("plaintext"), "{err}");
    for bad in ["s3://", "s3://Bad_Bucket/k", &b.url("")] {
        let err = fails(&e, &["inspect", bad], 1);
        assert!(err.contains("s3://BUCKET/KEY"), "{bad}: {err}");
    }
    let err = fails(&e, &["decrypt", "-o", "out", &b.url("missing.phi")], 4);
    assert!(err.contains("not found"), "{err}");
    let err = fails(&e, &["ls", "/tmp"], 1);
    assert!(err.contains("s3://BUCKET/PREFIX"), "{err}");
    assert_eq!(b.keys(), ["a.phi"]);
}

#[test]
fn an_interrupt_mid_download_leaves_no_output() {
    let b = Bucket::new("intrdown");
    let p = Proxy::start();
    let e = env();
    std::fs::write(e.path("a"), data(4 * PART, 13)).unwrap();
    let url = b.url("a.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    // The header and the first range come at once, the rest slowly: the
    // restore is under way (its temporary file exists) when the signal
    // comes.
    p.rules(serde_json::json!([
        {"action": "delay", "seconds": 3, "method": "GET", "skip": 2},
    ]));
    let child = cmd(&e, Some(&p.url))
        .args(["decrypt", "-o", "out", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the restore started", || {
        !cli_support::temps(e.dir.path()).is_empty()
    });
    signal(child.id(), "-INT");
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!e.path("out").exists());
    assert!(cli_support::temps(e.dir.path()).is_empty());
}

#[test]
fn an_object_replaced_while_it_is_read_is_refused() {
    let b = Bucket::new("swap");
    let p = Proxy::start();
    let e = env();
    std::fs::write(e.path("a"), data(4 * PART, 14)).unwrap();
    std::fs::write(e.path("b"), data(4 * PART, 15)).unwrap();
    let url = b.url("a.phi");
    ok(&e, &["encrypt", "-o", &url, "a"]);
    ok(&e, &["encrypt", "-o", &b.url("b.phi"), "b"]);
    let other = b.get("b.phi").unwrap();
    p.rules(serde_json::json!([
        {"action": "delay", "seconds": 3, "method": "GET", "skip": 2},
    ]));
    let child = cmd(&e, Some(&p.url))
        .args(["decrypt", "-o", "out", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the restore started", || {
        !cli_support::temps(e.dir.path()).is_empty()
    });
    // Another authentic backup under the same key, mid-read: the ranges
    // still to come are refused (If-Match), never mixed in.
    b.put("a.phi", other);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(code(&o), 4, "{err}");
    cli_support::assert_friendly(&err);
    assert!(err.contains("changed while it was read"), "{err}");
    assert!(!e.path("out").exists());
    assert!(cli_support::temps(e.dir.path()).is_empty());
}
