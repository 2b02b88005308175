//! The AWS KMS provider against a real KMS API server on loopback.
//!
//! Run: `scripts/test-services.sh start; source target/test-services/env.sh;
//! cargo test --features aws-kms --test aws_kms`.
//!
//! Where each behaviour comes from, honestly:
//!
//! - **moto_server** (the KMS API as moto 5.2 implements it) answers every
//!   call that is not faulted: CreateKey, CreateAlias, DescribeKey,
//!   GenerateDataKey, Encrypt, Decrypt, ReEncrypt, EnableKey, DisableKey,
//!   ScheduleKeyDeletion, RotateKeyOnDemand. moto itself rejects a wrong
//!   encryption context and a tampered blob (InvalidCiphertextException), a
//!   blob made under another key than the pinned one (an
//!   AccessDeniedException without a message, where real KMS answers
//!   IncorrectKeyException), an unknown key (NotFoundException).
//! - moto does NOT refuse to use a key that is disabled or pending deletion.
//!   Real KMS does, so those cases go through **kms_fault_proxy.py** with
//!   `enforce_key_state` on: it asks moto for the key state and answers
//!   DisabledException / KMSInvalidStateException as real KMS would.
//! - The proxy also injects what no healthy server does on demand:
//!   ThrottlingException, AccessDeniedException (a missing permission),
//!   IncorrectKeyException (real KMS's answer to a wrong pinned key),
//!   KMSInternalException, delays past the SDK timeout, dropped
//!   connections, and a stopped server (the proxy process is killed).
//! - One adversarial endpoint is a few lines of Rust in this file
//!   (`FakeKms`): a "KMS" that answers with another key id than the one
//!   asked for, which neither moto nor the proxy can produce.
//!
//! Each test that injects faults starts its own proxy process (rules are
//! global to a proxy, tests run in parallel), in front of the shared moto.
//! The provider reaches moto and the proxies only through the SdkConfig
//! endpoint URL, as production does; there is no test-only code path.
//! A test that cannot reach the endpoint fails loudly; none is skipped.

#![cfg(feature = "aws-kms")]

mod conformance;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::provider::aws_kms::{AwsKmsConfig, AwsKmsProvider, CONTEXT_DIGEST_KEY};
use phi_envelope::provider::{KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{
    Caller, EncryptionContext, Envelope, Error, Header, KeyProvider, KeyRef, Keyring, WrappedKey,
};
use serde_json::{json, Value};

const NOT_CONFIGURED: &str =
    "KMS endpoint not configured: run scripts/test-services.sh start and source target/test-services/env.sh";

/// The context digest key of these tests (a real deployment draws 32
/// random bytes once and keeps them in its secret store).
const CONTEXT_KEY: [u8; 32] = *b"phi-envelope test context key 01";

// ---------------------------------------------------------------------------
// The environment: moto, SDK config, keys.
// ---------------------------------------------------------------------------

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{NOT_CONFIGURED} ({name} is not set)"),
    }
}

/// The moto URL; refuses anything but loopback so that a test never talks
/// to real AWS.
fn moto_url() -> String {
    let url = var("AWS_ENDPOINT_URL");
    assert!(
        url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:"),
        "AWS_ENDPOINT_URL={url} is not a loopback KMS endpoint; {NOT_CONFIGURED}"
    );
    url
}

/// The standard AWS configuration chain, as an application loads it; with
/// `endpoint` overriding AWS_ENDPOINT_URL (a private proxy, a fake).
async fn sdk_config(endpoint: Option<&str>) -> SdkConfig {
    let moto = moto_url();
    var("AWS_REGION");
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    let sdk = loader.load().await;
    assert_eq!(
        sdk.endpoint_url(),
        Some(endpoint.unwrap_or(&moto)),
        "the SDK did not pick up the endpoint"
    );
    sdk
}

/// A KMS client for the test's own calls (creating keys, direct checks):
/// straight to moto. Panics loudly when moto does not answer.
async fn admin() -> aws_sdk_kms::Client {
    let client = aws_sdk_kms::Client::new(&sdk_config(None).await);
    if let Err(e) = client.list_keys().limit(1).send().await {
        panic!(
            "{NOT_CONFIGURED}: {} does not answer ListKeys: {}",
            moto_url(),
            aws_sdk_kms::error::DisplayErrorContext(&e)
        );
    }
    client
}

struct TestKey {
    id: String,
    arn: String,
}

impl TestKey {
    fn by_id(&self) -> KeyRef {
        format!("aws-kms:{}", self.id).parse().unwrap()
    }
    fn by_arn(&self) -> KeyRef {
        format!("aws-kms:{}", self.arn).parse().unwrap()
    }
    fn header_ref(&self) -> String {
        format!("aws-kms:{}", self.arn)
    }
}

/// Creates a symmetric encryption key through the KMS API.
async fn create_key(client: &aws_sdk_kms::Client, what: &str) -> TestKey {
    let meta = client
        .create_key()
        .description(format!("phi-envelope test: {what}"))
        .send()
        .await
        .expect("CreateKey")
        .key_metadata
        .unwrap();
    TestKey {
        id: meta.key_id().to_owned(),
        arn: meta.arn().unwrap().to_owned(),
    }
}

/// A name unique to this test run (moto outlives test runs).
fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn create_alias(client: &aws_sdk_kms::Client, key: &TestKey, name: &str) -> String {
    let alias = format!("alias/{}", unique(name));
    client
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&key.id)
        .send()
        .await
        .expect("CreateAlias");
    alias
}

fn config() -> AwsKmsConfig {
    AwsKmsConfig::new(&CONTEXT_KEY)
        .unwrap()
        .clear_context_keys(["tenant"])
        .unwrap()
}

/// Fast retries and timeouts for the fault tests.
fn fast_config(attempts: u32) -> AwsKmsConfig {
    config()
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(attempts)
                .with_initial_backoff(Duration::from_millis(5))
                .with_max_backoff(Duration::from_millis(50)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_millis(800))
                .build(),
        )
}

async fn provider_at(endpoint: Option<&str>, config: AwsKmsConfig) -> Arc<AwsKmsProvider> {
    Arc::new(AwsKmsProvider::new(&sdk_config(endpoint).await, config).unwrap())
}

fn envelope(provider: Arc<dyn KeyProvider>, key: &KeyRef) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(provider)
            .recipient(key.clone())
            .build()
            .unwrap(),
    )
    .as_caller("kms-test", "test")
}

const PHI_VALUE: &str = "MRN-0042-Jane-Roe";

fn ctx(record: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", format!("{PHI_VALUE}-{record}"))
        .unwrap()
}

fn provider_error(e: &Error) -> (ProviderErrorKind, String) {
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(PHI_VALUE),
        "an error leaks a context value: {text}"
    );
    match e {
        Error::Provider(p) => (p.kind(), p.message().to_owned()),
        other => panic!("expected a provider error, got {other:?}"),
    }
}

fn kind_of(e: &Error) -> ProviderErrorKind {
    provider_error(e).0
}

fn entry(message: &[u8], index: usize) -> WrappedKey {
    Header::parse(message).unwrap().0.recipients()[index].clone()
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("wrapped key in message")
}

// ---------------------------------------------------------------------------
// A private fault proxy in front of moto (scripts/kms_fault_proxy.py).
// ---------------------------------------------------------------------------

struct Proxy {
    child: Option<Child>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start() -> Proxy {
        let upstream = std::env::var("PHI_MOTO_URL").unwrap_or_else(|_| moto_url());
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kms_fault_proxy.py");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let log = dir.path().join("proxy.log");
        let child = Command::new(python)
            .arg(&script)
            .args([
                "--upstream",
                &upstream,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--quiet",
            ])
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                if let Ok(p) = p.trim().parse::<u16>() {
                    break p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the fault proxy did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let proxy = Proxy {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        assert_eq!(proxy.control("GET", "/__fault__/health", None)["ok"], true);
        proxy
    }

    fn url(&self) -> &str {
        &self.url
    }

    fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        http_json(&self.url, method, path, body)
    }

    fn fault(&self, rule: Value) {
        self.control("POST", "/__fault__", Some(rule));
    }

    fn clear(&self) {
        self.control("DELETE", "/__fault__", None);
    }

    fn enforce_key_state(&self, yes: bool) {
        self.control(
            "POST",
            "/__fault__/config",
            Some(json!({ "enforce_key_state": yes })),
        );
    }

    /// Requests seen per KMS operation (`Decrypt`, `ReEncrypt`, ...).
    fn calls(&self, operation: &str) -> u64 {
        self.control("GET", "/__fault__/stats", None)["by_target"]
            [format!("TrentService.{operation}")]
        .as_u64()
        .unwrap_or(0)
    }

    fn reset_stats(&self) {
        self.control("DELETE", "/__fault__/stats", None);
    }

    /// Stops the proxy process: to the SDK, the KMS server is gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A minimal HTTP/1.1 JSON call (the proxy's control API).
fn http_json(base: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).expect("proxy control connection");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}\n{body}"
    );
    serde_json::from_str(body).unwrap()
}

// ---------------------------------------------------------------------------
// The shared conformance suite.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_key_id_and_alias_references() {
    let admin = admin().await;
    let a = create_key(&admin, "conformance key").await;
    let b = create_key(&admin, "conformance other key").await;
    let alias = create_alias(&admin, &b, "conformance").await;
    conformance::run(conformance::Subject {
        provider: provider_at(None, config()).await,
        key: a.by_id(),
        other_key: format!("aws-kms:{alias}").parse().unwrap(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_key_arns() {
    let admin = admin().await;
    let a = create_key(&admin, "conformance key").await;
    let b = create_key(&admin, "conformance other key").await;
    conformance::run(conformance::Subject {
        provider: provider_at(None, config()).await,
        key: a.by_arn(),
        other_key: b.by_arn(),
    })
    .await;
}

// ---------------------------------------------------------------------------
// Key ids, aliases, what reaches KMS.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_form_records_the_key_arn() {
    let admin = admin().await;
    let a = create_key(&admin, "ref forms").await;
    let b = create_key(&admin, "ref forms, alias target after update").await;
    let alias = create_alias(&admin, &a, "forms").await;
    let alias_arn = a.arn.replace(&format!("key/{}", a.id), &alias);
    // Resolve aliases on every use, to see the update below at once.
    let kms = provider_at(None, config().alias_cache_ttl(Duration::ZERO)).await;
    let c = ctx("forms");
    let mut sealed = Vec::new();
    for r in [
        a.by_id().to_string(),
        a.by_arn().to_string(),
        format!("aws-kms:{alias}"),
        format!("aws-kms:{alias_arn}"),
    ] {
        let key: KeyRef = r.parse().unwrap();
        let env = envelope(kms.clone(), &key);
        let m = env
            .seal(b"forms", &c)
            .await
            .unwrap_or_else(|e| panic!("{r}: {e}"));
        let e = entry(&m, 0);
        assert_eq!(e.provider, "aws-kms");
        assert_eq!(e.key_ref, a.header_ref(), "reference {r}");
        assert_eq!(e.key_version, 1);
        assert_eq!(env.open(&m, &c).await.unwrap(), b"forms");
        sealed.push(m);
    }
    // Re-point the alias (a rotation to a new key): new messages go to the
    // new key; old ones pinned the old key's ARN and still open.
    admin
        .update_alias()
        .alias_name(&alias)
        .target_key_id(&b.id)
        .send()
        .await
        .unwrap();
    let by_alias = envelope(kms.clone(), &format!("aws-kms:{alias}").parse().unwrap());
    let m = by_alias.seal(b"after", &c).await.unwrap();
    assert_eq!(entry(&m, 0).key_ref, b.header_ref());
    for old in &sealed {
        assert_eq!(by_alias.open(old, &c).await.unwrap(), b"forms");
    }
    // describe answers with the canonical (ARN) reference, version 1.
    let info = kms
        .describe(&format!("aws-kms:{alias}").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(info.key_ref.as_str(), b.header_ref());
    assert_eq!(info.primary_version, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_sees_a_keyed_digest_and_the_declared_clear_keys_only() {
    let admin = admin().await;
    let key = create_key(&admin, "context").await;
    let kms = provider_at(None, config()).await;
    let c = ctx("ctx");
    let sent = kms.kms_encryption_context(&c);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent["tenant"], "st-mary");
    assert!(sent.contains_key(CONTEXT_DIGEST_KEY));
    assert!(!sent.contains_key("record_id"));
    assert!(!format!("{sent:?}").contains(PHI_VALUE));

    let m = envelope(kms.clone(), &key.by_arn())
        .seal(b"x", &c)
        .await
        .unwrap();
    let blob = entry(&m, 0).wrapped;
    // Straight to KMS: the wrapped DEK opens under exactly that context...
    let ok = admin
        .decrypt()
        .key_id(&key.arn)
        .ciphertext_blob(aws_smithy_types::Blob::new(blob.clone()))
        .set_encryption_context(Some(sent.clone().into_iter().collect()))
        .send()
        .await
        .expect("KMS decrypts under the digest context");
    assert_eq!(ok.plaintext.unwrap().as_ref().len(), 32);
    // ...and under no other: not the raw context, not without the clear key,
    // not without the digest.
    let raw: std::collections::HashMap<String, String> = c
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut no_clear = sent.clone();
    no_clear.remove("tenant");
    let mut no_digest = sent.clone();
    no_digest.remove(CONTEXT_DIGEST_KEY);
    for wrong in [
        raw,
        no_clear.into_iter().collect(),
        no_digest.into_iter().collect(),
    ] {
        let e = admin
            .decrypt()
            .key_id(&key.arn)
            .ciphertext_blob(aws_smithy_types::Blob::new(blob.clone()))
            .set_encryption_context(Some(wrong))
            .send()
            .await
            .unwrap_err();
        use aws_sdk_kms::error::ProvideErrorMetadata;
        assert_eq!(e.code(), Some("InvalidCiphertextException"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_context_key_cannot_unwrap() {
    let admin = admin().await;
    let key = create_key(&admin, "context key").await;
    let kms = provider_at(None, config()).await;
    let m = envelope(kms.clone(), &key.by_arn())
        .seal(b"x", &ctx("k"))
        .await
        .unwrap();
    let stranger = provider_at(
        None,
        AwsKmsConfig::new(&[9; 32])
            .unwrap()
            .clear_context_keys(["tenant"])
            .unwrap(),
    )
    .await;
    assert!(matches!(
        stranger.unwrap(&entry(&m, 0), &ctx("k")).await.unwrap(),
        Unwrapped::Rejected
    ));
}

/// The context digest key can be replaced: the old one stays configured as
/// previous, and rewrap (ReEncrypt from the old digest to the new one)
/// moves messages over without the DEK leaving KMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_key_rotation_through_reencrypt() {
    let admin = admin().await;
    let key = create_key(&admin, "context key rotation").await;
    let old = provider_at(None, config()).await;
    let c = ctx("rot");
    let m = envelope(old.clone(), &key.by_arn())
        .seal(b"rotate the context key", &c)
        .await
        .unwrap();

    let proxy = Proxy::start();
    let new_key = [0x42u8; 32];
    let both = provider_at(
        Some(proxy.url()),
        AwsKmsConfig::new(&new_key)
            .unwrap()
            .previous_context_key(&CONTEXT_KEY)
            .unwrap()
            .clear_context_keys(["tenant"])
            .unwrap(),
    )
    .await;
    let env = envelope(both.clone(), &key.by_arn());
    assert_eq!(env.open(&m, &c).await.unwrap(), b"rotate the context key");
    assert_eq!(
        proxy.calls("Decrypt"),
        2,
        "current key rejected, previous key opened"
    );

    let rewrapped = env.rewrap(&m, &c).await.unwrap();
    assert!(proxy.calls("ReEncrypt") >= 1);
    assert_eq!(proxy.calls("Encrypt"), 0);
    let new_only = provider_at(
        None,
        AwsKmsConfig::new(&new_key)
            .unwrap()
            .clear_context_keys(["tenant"])
            .unwrap(),
    )
    .await;
    assert_eq!(
        envelope(new_only.clone(), &key.by_arn())
            .open(&rewrapped, &c)
            .await
            .unwrap(),
        b"rotate the context key"
    );
    assert!(matches!(
        old.unwrap(&entry(&rewrapped, 0), &c).await.unwrap(),
        Unwrapped::Rejected
    ));
}

// ---------------------------------------------------------------------------
// Rejections: wrong context, wrong key pinned, tampered blob, foreign answer.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_context_is_rejected_opaquely() {
    let admin = admin().await;
    let key = create_key(&admin, "wrong context").await;
    let kms = provider_at(None, config()).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let m = env.seal(b"x", &ctx("right")).await.unwrap();
    // moto: InvalidCiphertextException for the digest of another context.
    for wrong in [
        ctx("wrong"),
        EncryptionContext::new(),
        EncryptionContext::new().with("tenant", "st-mary").unwrap(),
    ] {
        assert!(matches!(
            kms.unwrap(&entry(&m, 0), &wrong).await.unwrap(),
            Unwrapped::Rejected
        ));
        assert!(env.open(&m, &wrong).await.unwrap_err().is_decrypt());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_pinned_is_rejected() {
    let admin = admin().await;
    let a = create_key(&admin, "pinned a").await;
    let b = create_key(&admin, "pinned b").await;
    let kms = provider_at(None, config()).await;
    let c = ctx("pin");
    let m = envelope(kms.clone(), &a.by_arn())
        .seal(b"x", &c)
        .await
        .unwrap();
    let mut wrong = entry(&m, 0);
    wrong.key_ref = b.header_ref();
    // moto answers an AccessDeniedException without a message for a blob of
    // key A with KeyId B pinned: not a missing permission ("... is not
    // authorized to perform ..."), so the provider treats it as a rejection.
    assert!(matches!(
        kms.unwrap(&wrong, &c).await.unwrap(),
        Unwrapped::Rejected
    ));
    // Real KMS answers IncorrectKeyException: injected by the proxy.
    let proxy = Proxy::start();
    proxy.fault(json!({"action": "error", "target": "Decrypt", "error_type": "IncorrectKeyException",
        "message": "The key ID in the request does not identify a CMK that can perform this operation."}));
    let via_proxy = provider_at(Some(proxy.url()), fast_config(1)).await;
    assert!(matches!(
        via_proxy.unwrap(&wrong, &c).await.unwrap(),
        Unwrapped::Rejected
    ));
    // Through the envelope (the header entry rewritten): no plaintext, the
    // opaque error.
    let mut spliced = m.clone();
    let at = find(&spliced, a.arn.as_bytes());
    spliced[at..at + a.arn.len()].copy_from_slice(b.arn.as_bytes());
    let env = envelope(kms.clone(), &a.by_arn());
    assert!(env.open(&spliced, &c).await.unwrap_err().is_decrypt());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_wrapped_key_is_rejected() {
    let admin = admin().await;
    let key = create_key(&admin, "tamper").await;
    let kms = provider_at(None, config()).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("tamper");
    let m = env.seal(b"x", &c).await.unwrap();
    let blob = entry(&m, 0).wrapped;
    let at = find(&m, &blob);
    // Every region of the blob: moto's key-id prefix (-> message-less
    // AccessDenied, moto's "no such key"), the IV, the tag, the ciphertext (->
    // InvalidCiphertextException); real KMS blobs: InvalidCiphertext.
    for offset in [0, 10, 35, 36, 40, 50, blob.len() - 1] {
        let mut t = m.clone();
        t[at + offset] ^= 0x01;
        let e = env.open(&t, &c).await.unwrap_err();
        assert!(e.is_decrypt(), "flip at blob offset {offset}: {e:?}");
    }
}

/// An endpoint that answers with another key than the one asked for (no
/// real server does; a few lines of Rust play that endpoint).
struct FakeKms {
    url: String,
}

impl FakeKms {
    fn start(answer_key: String) -> FakeKms {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let answer_key = answer_key.clone();
                std::thread::spawn(move || fake_kms_answer(stream, &answer_key));
            }
        });
        FakeKms { url }
    }
}

fn fake_kms_answer(stream: TcpStream, answer_key: &str) {
    let mut reader = BufReader::new(stream);
    loop {
        let (mut target, mut len) = (String::new(), 0usize);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "x-amz-target" => target = v.trim().to_owned(),
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let b64 = aws_smithy_types::base64::encode;
        let answer = match target.as_str() {
            "TrentService.DescribeKey" => json!({"KeyMetadata": {"KeyId": "k", "Arn": answer_key}}),
            _ => json!({
                "KeyId": answer_key,
                "Plaintext": b64(&[7u8; 32][..]),
                "CiphertextBlob": b64(&[1u8; 64][..]),
            }),
        }
        .to_string();
        let out = reader.get_mut();
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_for_another_key_is_an_error() {
    let asked = "arn:aws:kms:us-east-1:123456789012:key/11111111-1111-1111-1111-111111111111";
    let other = "arn:aws:kms:us-east-1:123456789012:key/22222222-2222-2222-2222-222222222222";
    let fake = FakeKms::start(other.to_owned());
    let kms = provider_at(Some(&fake.url), fast_config(1)).await;
    let key: KeyRef = format!("aws-kms:{asked}").parse().unwrap();
    let c = ctx("fake");
    for e in [
        kms.generate(&key, &c).await.map(|_| ()).unwrap_err(),
        kms.wrap(&key, &phi_envelope::Dek::generate().unwrap(), &c)
            .await
            .map(|_| ())
            .unwrap_err(),
        kms.unwrap(
            &WrappedKey {
                provider: "aws-kms".into(),
                key_ref: format!("aws-kms:{asked}"),
                key_version: 1,
                wrapped: vec![1; 64],
            },
            &c,
        )
        .await
        .map(|_| ())
        .unwrap_err(),
    ] {
        let (kind, message) = provider_error(&e);
        assert_eq!(kind, ProviderErrorKind::Other);
        assert!(
            message.contains(&format!("KMS answered with key {other}, expected {asked}")),
            "{message}"
        );
    }
    // A bare key id is matched against the key id inside the answered ARN.
    let by_id: KeyRef = "aws-kms:11111111-1111-1111-1111-111111111111"
        .parse()
        .unwrap();
    assert!(kms.generate(&by_id, &c).await.is_err());
}

// ---------------------------------------------------------------------------
// Endpoint down, multi-recipient, rewrap.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_run_is_unavailable_and_writes_nothing() {
    let admin = admin().await;
    let key = create_key(&admin, "stopped").await;
    let mut proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(2)).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("down");
    let before = env.seal(b"sealed while up", &c).await.unwrap();

    proxy.stop();
    let e = env.seal(b"x", &c).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::Unavailable);
    assert!(message.contains("KMS endpoint unreachable"), "{message}");
    let mut out = Vec::new();
    let e = env.encryptor(&mut out, &c).await.map(|_| ()).unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::Unavailable);
    assert!(out.is_empty(), "no byte may be written when KMS is down");
    let e = env.open(&before, &c).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_and_timeouts_are_unavailable() {
    let admin = admin().await;
    let key = create_key(&admin, "drop").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(2)).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("drop");
    let m = env.seal(b"x", &c).await.unwrap();

    proxy.fault(json!({"action": "drop", "target": "GenerateDataKey"}));
    let mut out = Vec::new();
    let e = env.encryptor(&mut out, &c).await.map(|_| ()).unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::Unavailable, "{message}");
    assert!(out.is_empty());
    assert_eq!(
        proxy.calls("GenerateDataKey"),
        1 + 2,
        "one success, then 2 attempts"
    );

    // A KMS that accepts the request and does not answer: the SDK's
    // attempt timeout (800 ms here) ends it, not the 3 s delay.
    proxy.clear();
    proxy.fault(json!({"action": "delay", "seconds": 3, "target": "Decrypt"}));
    let start = Instant::now();
    let e = env.open(&m, &c).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::Unavailable);
    assert!(message.contains("timeout"), "{message}");
    assert!(
        start.elapsed() < Duration::from_millis(2900),
        "{:?}",
        start.elapsed()
    );
}

#[cfg(feature = "local")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_kms_recipients_open_with_local_when_kms_is_down() {
    use phi_envelope::provider::local::LocalKeystore;
    let admin = admin().await;
    let key = create_key(&admin, "multi").await;
    let mut proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let local = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys")).unwrap();
    let local_key: KeyRef = "local:disaster-recovery".parse().unwrap();
    local.add_key(&local_key).unwrap();
    let local = Arc::new(local);
    let both = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .provider(local.clone())
            .recipient(key.by_arn())
            .recipient(local_key.clone())
            .build()
            .unwrap(),
    );
    let c = ctx("multi");
    let m = both.seal(b"two recipients", &c).await.unwrap();
    let recipients = Header::parse(&m).unwrap().0.recipients().to_vec();
    assert_eq!(recipients[0].provider, "aws-kms");
    assert_eq!(recipients[1].provider, "local");

    proxy.stop();
    // KMS (tried first) is down; the local key opens it.
    assert_eq!(both.open(&m, &c).await.unwrap(), b"two recipients");
    // Sealing needs every recipient: nothing is produced.
    let e = both.seal(b"x", &c).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_goes_through_reencrypt() {
    let admin = admin().await;
    let a = create_key(&admin, "rewrap from").await;
    let b = create_key(&admin, "rewrap to").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), config()).await;
    let c = ctx("rewrap");
    let m = envelope(kms.clone(), &a.by_arn())
        .seal(b"rewrap me", &c)
        .await
        .unwrap();
    let body_at = Header::parse(&m).unwrap().1;

    proxy.reset_stats();
    let to_b = envelope(kms.clone(), &b.by_arn());
    let r = to_b.rewrap(&m, &c).await.unwrap();
    assert_eq!(proxy.calls("ReEncrypt"), 1);
    assert_eq!(
        proxy.calls("Encrypt"),
        0,
        "the DEK is not sent to KMS again"
    );
    assert_eq!(proxy.calls("GenerateDataKey"), 0);
    assert_eq!(
        proxy.calls("Decrypt"),
        1,
        "the keyring unwraps once (header tag)"
    );
    let (h, at) = Header::parse(&r).unwrap();
    assert_eq!(&r[at..], &m[body_at..], "the body is untouched");
    assert_eq!(h.recipients()[0].key_ref, b.header_ref());
    assert_eq!(to_b.open(&r, &c).await.unwrap(), b"rewrap me");
    // Under the old key only, the rewrapped message is not openable.
    let mut old_only = entry(&r, 0);
    old_only.key_ref = a.header_ref();
    assert!(matches!(
        kms.unwrap(&old_only, &c).await.unwrap(),
        Unwrapped::Rejected
    ));
    // The context is still required.
    assert!(to_b
        .rewrap(&m, &ctx("other"))
        .await
        .unwrap_err()
        .is_decrypt());
}

/// Where KMS refuses ReEncrypt for the source key's sake (here: the caller
/// lacks kms:ReEncryptFrom), the keyring, which holds the DEK already, wraps
/// it with Encrypt under the destination instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_falls_back_to_encrypt_when_reencrypt_is_refused() {
    let admin = admin().await;
    let a = create_key(&admin, "rewrap fallback from").await;
    let b = create_key(&admin, "rewrap fallback to").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(1)).await;
    let c = ctx("fallback");
    let m = envelope(kms.clone(), &a.by_arn())
        .seal(b"fallback", &c)
        .await
        .unwrap();
    proxy.fault(json!({"action": "error", "target": "ReEncrypt", "error_type": "AccessDeniedException",
        "message": format!("User: arn:aws:iam::123456789012:user/ops is not authorized to perform: kms:ReEncryptFrom on resource: {}", a.arn)}));
    proxy.reset_stats();
    let to_b = envelope(kms.clone(), &b.by_arn());
    let r = to_b.rewrap(&m, &c).await.unwrap();
    assert_eq!(proxy.calls("ReEncrypt"), 1);
    assert_eq!(proxy.calls("Encrypt"), 1);
    assert_eq!(entry(&r, 0).key_ref, b.header_ref());
    assert_eq!(to_b.open(&r, &c).await.unwrap(), b"fallback");
    // Throttling is not a reason to fall back: it is reported.
    proxy.clear();
    proxy.fault(
        json!({"action": "error", "target": "ReEncrypt", "error_type": "ThrottlingException"}),
    );
    assert_eq!(
        kind_of(&to_b.rewrap(&m, &c).await.unwrap_err()),
        ProviderErrorKind::Throttled
    );
}

// ---------------------------------------------------------------------------
// Operational errors through the proxy.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_then_reported() {
    let admin = admin().await;
    let key = create_key(&admin, "throttle").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(3)).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("throttle");
    // Once: the SDK backs off and retries; the caller never sees it.
    proxy.fault(
        json!({"action": "error", "error_type": "ThrottlingException", "target": "GenerateDataKey",
        "message": "Rate exceeded", "count": 1}),
    );
    let m = env.seal(b"x", &c).await.unwrap();
    assert_eq!(proxy.calls("GenerateDataKey"), 2);
    // Always: Throttled after the configured 3 attempts.
    proxy.fault(
        json!({"action": "error", "error_type": "ThrottlingException", "target": "Decrypt",
        "message": "Rate exceeded"}),
    );
    let e = env.open(&m, &c).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::Throttled);
    assert!(message.contains("back off"), "{message}");
    assert_eq!(proxy.calls("Decrypt"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_are_retried_then_unavailable() {
    let admin = admin().await;
    let key = create_key(&admin, "internal").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(3)).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("internal");
    let m = env.seal(b"x", &c).await.unwrap();
    proxy.fault(json!({"action": "error", "error_type": "KMSInternalException", "target": "Decrypt", "count": 2}));
    assert_eq!(env.open(&m, &c).await.unwrap(), b"x");
    assert_eq!(proxy.calls("Decrypt"), 3);
    proxy.fault(
        json!({"action": "error", "error_type": "KMSInternalException", "target": "Decrypt"}),
    );
    assert_eq!(
        kind_of(&env.open(&m, &c).await.unwrap_err()),
        ProviderErrorKind::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_is_reported_with_what_to_grant() {
    let admin = admin().await;
    let key = create_key(&admin, "denied").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), fast_config(1)).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("denied");
    let m = env.seal(b"x", &c).await.unwrap();
    let denial = |op: &str| {
        json!({"action": "error", "error_type": "AccessDeniedException", "target": op,
            "message": format!("User: arn:aws:iam::123456789012:user/lab is not authorized to perform: kms:{op} on resource: {} because no identity-based policy allows the kms:{op} action", key.arn)})
    };
    proxy.fault(denial("Decrypt"));
    let (kind, message) = provider_error(&env.open(&m, &c).await.unwrap_err());
    assert_eq!(kind, ProviderErrorKind::AccessDenied);
    assert!(
        message.contains("grant the caller kms:Decrypt"),
        "{message}"
    );
    proxy.fault(denial("GenerateDataKey"));
    let (kind, _) = provider_error(&env.seal(b"x", &c).await.unwrap_err());
    assert_eq!(kind, ProviderErrorKind::AccessDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_key_is_refused_until_enabled() {
    let admin = admin().await;
    let key = create_key(&admin, "disabled").await;
    let proxy = Proxy::start();
    // moto keeps decrypting under a disabled key; the proxy answers like
    // real KMS (DisabledException).
    proxy.enforce_key_state(true);
    let kms = provider_at(Some(proxy.url()), fast_config(1)).await;
    let env = envelope(kms.clone(), &key.by_arn());
    let c = ctx("disabled");
    let m = env.seal(b"x", &c).await.unwrap();
    let caller = Caller::new("kms-test-operator", "lifecycle");

    let info = env
        .keyring()
        .set_state(&key.by_arn(), 1, KeyState::Disabled, &caller)
        .await
        .unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Disabled);
    assert_eq!(info.primary_version, None);
    let (kind, message) = provider_error(&env.open(&m, &c).await.unwrap_err());
    assert_eq!(kind, ProviderErrorKind::KeyDisabled);
    assert!(message.contains("EnableKey"), "{message}");
    assert_eq!(
        kind_of(&env.seal(b"y", &c).await.unwrap_err()),
        ProviderErrorKind::KeyDisabled
    );

    let info = env
        .keyring()
        .set_state(&key.by_arn(), 1, KeyState::Enabled, &caller)
        .await
        .unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(env.open(&m, &c).await.unwrap(), b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deletion_is_destroyed_but_recoverable_until_the_window_ends() {
    let admin = admin().await;
    let key = create_key(&admin, "pending deletion").await;
    let proxy = Proxy::start();
    proxy.enforce_key_state(true);
    let kms = provider_at(
        Some(proxy.url()),
        fast_config(1).deletion_window_days(7).unwrap(),
    )
    .await;
    let sink = Arc::new(MemorySink::new());
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.by_arn())
            .event_sink(sink.clone())
            .build()
            .unwrap(),
    );
    let c = ctx("deletion");
    let m = env.seal(b"shred me", &c).await.unwrap();
    let info = env
        .keyring()
        .destroy(
            &key.by_arn(),
            1,
            &Caller::new("kms-test-operator", "crypto-shredding"),
        )
        .await
        .unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);
    let meta = admin
        .describe_key()
        .key_id(&key.id)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    assert_eq!(
        meta.key_state(),
        Some(&aws_sdk_kms::types::KeyState::PendingDeletion)
    );
    assert!(meta.deletion_date().is_some());

    let (kind, message) = provider_error(&env.open(&m, &c).await.unwrap_err());
    assert_eq!(kind, ProviderErrorKind::KeyDestroyed);
    assert!(
        message.contains("pending deletion") && message.contains("CancelKeyDeletion"),
        "{message}"
    );
    assert!(sink
        .events()
        .iter()
        .any(|e| e.operation == Operation::Destroy && e.outcome == Outcome::Success));

    // Within the window an administrator can still recover it.
    admin
        .cancel_key_deletion()
        .key_id(&key.id)
        .send()
        .await
        .unwrap();
    admin.enable_key().key_id(&key.id).send().await.unwrap();
    assert_eq!(env.open(&m, &c).await.unwrap(), b"shred me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_key_not_found() {
    admin().await;
    let kms = provider_at(None, config()).await;
    let c = ctx("unknown");
    for r in [
        "aws-kms:00000000-0000-0000-0000-000000000000".to_owned(),
        "aws-kms:arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
            .to_owned(),
        format!("aws-kms:alias/{}", unique("missing")),
    ] {
        let key: KeyRef = r.parse().unwrap();
        let (kind, message) = provider_error(
            &envelope(kms.clone(), &key)
                .seal(b"x", &c)
                .await
                .unwrap_err(),
        );
        assert_eq!(kind, ProviderErrorKind::KeyNotFound, "{r}: {message}");
        assert!(message.contains("region"), "{message}");
        assert_eq!(
            kind_of(&kms.describe(&key).await.unwrap_err()),
            ProviderErrorKind::KeyNotFound
        );
    }
}

// ---------------------------------------------------------------------------
// Lifecycle verbs, decrypt allow-list, configuration.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_verbs_map_to_kms() {
    let admin = admin().await;
    let kms = provider_at(None, config()).await;
    let keyring = Keyring::builder().provider(kms.clone()).build().unwrap();
    let caller = Caller::new("kms-test-operator", "lifecycle");
    let alias: KeyRef = format!("aws-kms:alias/{}", unique("created"))
        .parse()
        .unwrap();

    // create_key: CreateKey + CreateAlias + EnableKeyRotation.
    let info = keyring.create_key(&alias, &caller).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(info.versions.len(), 1);
    assert_eq!(info.version(1).unwrap().state, KeyState::Enabled);
    assert!(info.version(1).unwrap().created_at.is_some());
    let arn = info
        .key_ref
        .as_str()
        .strip_prefix("aws-kms:")
        .unwrap()
        .to_owned();
    assert!(arn.contains(":key/"), "{arn}");
    let rotation = admin
        .get_key_rotation_status()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    assert!(rotation.key_rotation_enabled());
    assert_eq!(
        kind_of(&keyring.create_key(&alias, &caller).await.unwrap_err()),
        ProviderErrorKind::InvalidState,
        "the alias exists"
    );
    let by_id: KeyRef = "aws-kms:00000000-0000-0000-0000-000000000001"
        .parse()
        .unwrap();
    assert_eq!(
        kind_of(&keyring.create_key(&by_id, &caller).await.unwrap_err()),
        ProviderErrorKind::Unsupported
    );

    // rotate: RotateKeyOnDemand; the version stays 1, messages still open.
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(alias.clone())
            .build()
            .unwrap(),
    );
    let c = ctx("lifecycle");
    let m = env.seal(b"before rotation", &c).await.unwrap();
    let info = keyring.rotate(&alias, &caller).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    let rotations = admin
        .list_key_rotations()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(rotations.rotations().len(), 1);
    assert_eq!(env.open(&m, &c).await.unwrap(), b"before rotation");
    assert_eq!(
        entry(&env.seal(b"after", &c).await.unwrap(), 0).key_version,
        1
    );

    // Versions other than 1 do not exist; decrypt-only is not a KMS state.
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&alias, 2, KeyState::Disabled, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::KeyNotFound
    );
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&alias, 1, KeyState::DecryptOnly, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::Unsupported
    );
    // destroy: ScheduleKeyDeletion (default 30-day window).
    let info = keyring.destroy(&alias, 1, &caller).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, KeyState::Destroyed);
    assert_eq!(info.primary_version, None);
    let meta = admin
        .describe_key()
        .key_id(&arn)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    let days = (meta.deletion_date().unwrap().secs()
        - aws_smithy_types::DateTime::from(std::time::SystemTime::now()).secs())
        / 86_400;
    assert!((29..=30).contains(&days), "{days} days");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_outside_the_allowed_accounts_are_not_called() {
    let admin = admin().await;
    let key = create_key(&admin, "allowed accounts").await;
    let c = ctx("accounts");
    let m = envelope(provider_at(None, config()).await, &key.by_arn())
        .seal(b"x", &c)
        .await
        .unwrap();
    let proxy = Proxy::start();
    let strict = provider_at(
        Some(proxy.url()),
        config().allowed_accounts(["111122223333"]).unwrap(),
    )
    .await;
    assert!(matches!(
        strict.unwrap(&entry(&m, 0), &c).await.unwrap(),
        Unwrapped::NotMine
    ));
    assert!(matches!(
        envelope(strict.clone(), &key.by_arn()).open(&m, &c).await,
        Err(Error::NoMatchingKey(_))
    ));
    assert_eq!(
        proxy.calls("Decrypt"),
        0,
        "no KMS call for a foreign account"
    );
    // moto's account (123456789012) allowed: opens.
    let allowed = provider_at(
        Some(proxy.url()),
        config().allowed_accounts(["123456789012"]).unwrap(),
    )
    .await;
    assert_eq!(
        envelope(allowed, &key.by_arn()).open(&m, &c).await.unwrap(),
        b"x"
    );
}

#[tokio::test]
async fn missing_region_or_credentials_is_misconfigured() {
    let no_region = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(
            aws_sdk_kms::config::Credentials::new("AKIDTEST", "secret", None, None, "test"),
        ))
        .build();
    let e = AwsKmsProvider::new(&no_region, config()).unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::Misconfigured);
    assert!(message.contains("AWS_REGION"), "{message}");
    let no_credentials = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .build();
    assert_eq!(
        kind_of(&AwsKmsProvider::new(&no_credentials, config()).unwrap_err()),
        ProviderErrorKind::Misconfigured
    );
}

// ---------------------------------------------------------------------------
// Latency on loopback.
// ---------------------------------------------------------------------------

fn summary(name: &str, mut samples: Vec<Duration>) -> String {
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    format!(
        "{name}: n={} mean={:.2?} p50={:.2?} p90={:.2?} p99={:.2?}",
        samples.len(),
        mean,
        pct(50),
        pct(90),
        pct(99)
    )
}

/// Round trips of the provider to moto on loopback (printed; run with
/// `--nocapture` to see them). moto is Python: these measure the test
/// server as much as the SDK, and real KMS in-region is typically 5-20 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_on_loopback() {
    let admin = admin().await;
    let key = create_key(&admin, "latency").await;
    let kms = provider_at(None, config()).await;
    let key_ref = key.by_arn();
    let c = ctx("latency");
    let (mut generate, mut decrypt) = (Vec::new(), Vec::new());
    for i in 0..220 {
        let t = Instant::now();
        let g = kms.generate(&key_ref, &c).await.unwrap();
        let gt = t.elapsed();
        let t = Instant::now();
        let u = kms.unwrap(&g.wrapped, &c).await.unwrap();
        let dt = t.elapsed();
        let Unwrapped::Key(dek) = u else {
            panic!("unwrap")
        };
        assert_eq!(dek.expose_secret(), g.dek.expose_secret());
        if i >= 20 {
            generate.push(gt);
            decrypt.push(dt);
        }
    }
    let report = format!(
        "{}\n{}",
        summary("GenerateDataKey", generate),
        summary("Decrypt", decrypt)
    );
    println!(
        "KMS round trips to moto on loopback ({} build):\n{report}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let _ = std::fs::write(latency_report_path(), report);
}

fn latency_report_path() -> PathBuf {
    std::env::temp_dir().join("phi-envelope-kms-latency.txt")
}

// ---------------------------------------------------------------------------
// Per-record associated data (docs/FORMAT.md section 5.4): the tenant is the
// key context, the record id binds only the body.
// ---------------------------------------------------------------------------

/// 10,000 records of one tenant, each bound to its own record id as
/// associated data, cost one GenerateDataKey per cache window (here 2,500
/// messages) and one Decrypt per window to open them all; every record
/// refuses to open under another id, under no associated data, and its id
/// does not open another record. The record id reaches no event: every
/// event carries the tenant-only context's fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_record_associated_data_costs_one_generate_per_cache_window() {
    use phi_envelope::cache::{CacheConfig, CacheLimits};

    const RECORDS: usize = 10_000;
    const WINDOW: u64 = 2_500;
    let windows = RECORDS as u64 / WINDOW;
    let admin = admin().await;
    let key = create_key(&admin, "associated data").await;
    let proxy = Proxy::start();
    let kms = provider_at(Some(proxy.url()), config()).await;
    let sink = Arc::new(MemorySink::new());
    let hour = Duration::from_secs(3600);
    let keyring = Keyring::builder()
        .provider(kms)
        .recipient(key.by_arn())
        .event_sink(sink.clone())
        .data_key_cache(
            CacheConfig::new()
                .encrypt(CacheLimits::new(hour, WINDOW, 1 << 30))
                .decrypt(CacheLimits::new(hour, 1 << 20, 1 << 30)),
        )
        .build()
        .unwrap();
    let env = Envelope::new(keyring).as_caller("lab-service", "store-result");
    let tenant = EncryptionContext::new().with("tenant", "st-mary").unwrap();
    let id = |i: usize| format!("{PHI_VALUE}-record-{i:05}");
    let result = |i: usize| format!("potassium {}.{} mmol/L", 3 + i % 3, i % 10);

    proxy.reset_stats();
    let mut sealed = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let m = env
            .seal_with(result(i).as_bytes(), &tenant, id(i).as_bytes())
            .await
            .unwrap();
        sealed.push(m);
    }
    assert_eq!(proxy.calls("GenerateDataKey"), windows);
    assert_eq!(proxy.calls("Encrypt") + proxy.calls("Decrypt"), 0);
    let stats = env.keyring().cache_stats();
    assert_eq!(stats.encrypt_misses, windows);
    assert_eq!(stats.encrypt_hits, RECORDS as u64 - windows);
    // The records of one window share their header (one DEK), and no
    // header carries the id.
    let headers: std::collections::BTreeSet<Vec<u8>> = sealed
        .iter()
        .map(|m| Header::parse(m).unwrap().0.as_bytes().to_vec())
        .collect();
    assert_eq!(headers.len() as u64, windows);
    assert!(sealed.iter().all(|m| !m
        .windows(PHI_VALUE.len())
        .any(|w| w == PHI_VALUE.as_bytes())));

    for (i, m) in sealed.iter().enumerate() {
        let other = (i + 1) % RECORDS;
        assert_eq!(
            env.open_with(m, &tenant, id(i).as_bytes()).await.unwrap(),
            result(i).as_bytes()
        );
        assert!(env
            .open_with(m, &tenant, id(other).as_bytes())
            .await
            .unwrap_err()
            .is_decrypt());
        assert!(env.open(m, &tenant).await.unwrap_err().is_decrypt());
        assert!(env
            .open_with(&sealed[other], &tenant, id(i).as_bytes())
            .await
            .unwrap_err()
            .is_decrypt());
    }
    // Opening cost one Decrypt per window: the decryption cache is found by
    // header and context, never by associated data.
    assert_eq!(proxy.calls("Decrypt"), windows);
    assert_eq!(proxy.calls("GenerateDataKey"), windows);

    // Every key use was recorded, under the tenant-only context (one
    // fingerprint for all records); no event names a record id.
    let tenant_fp = env.keyring().context_fingerprint(&tenant);
    let events = sink.events();
    let fingerprints: Vec<&str> = events
        .iter()
        .filter_map(|e| e.context_fingerprint.as_deref())
        .collect();
    assert!(
        fingerprints.len() >= 2 * RECORDS,
        "{} events",
        fingerprints.len()
    );
    assert!(fingerprints.iter().all(|fp| *fp == tenant_fp));
    for e in &events {
        let text = format!("{} {e:?}", e.to_json());
        assert!(!text.contains(PHI_VALUE), "an event names a record: {text}");
    }

    // The key context still binds through KMS: another tenant cannot open.
    let other_tenant = EncryptionContext::new().with("tenant", "st-john").unwrap();
    assert!(env
        .open_with(&sealed[0], &other_tenant, id(0).as_bytes())
        .await
        .unwrap_err()
        .is_decrypt());
    assert_eq!(proxy.calls("Decrypt"), windows + 1);
}

/// The blocking facade on the KMS endpoint: a plain thread with no runtime
/// of its own hands the facade a multi-threaded runtime's handle; the
/// runtime-free facade refuses this keyring, and a call from inside the
/// runtime is refused before any key is used.
#[test]
fn blocking_facade_with_a_runtime_handle() {
    use phi_envelope::blocking::BlockingEnvelope;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (provider, key) = rt.block_on(async {
        let key = create_key(&admin().await, "blocking facade").await;
        (provider_at(None, config()).await, key)
    });
    let env = envelope(provider, &key.by_id());

    let refused = BlockingEnvelope::new(env.clone()).unwrap_err();
    assert!(
        matches!(refused, Error::Blocking(_)) && refused.to_string().contains("with_runtime"),
        "{refused}"
    );

    let facade = BlockingEnvelope::with_runtime(env.clone(), rt.handle().clone()).unwrap();
    let context = ctx("blocking");
    let sealed = facade.seal(b"potassium 4.1", &context).unwrap();
    assert_eq!(facade.open(&sealed, &context).unwrap(), b"potassium 4.1");
    assert!(facade
        .open(&sealed, &ctx("other"))
        .unwrap_err()
        .is_decrypt());
    let bound = facade.seal_with(b"sodium 140", &context, b"row 7").unwrap();
    assert_eq!(
        facade.open_with(&bound, &context, b"row 7").unwrap(),
        b"sodium 140"
    );
    assert!(facade
        .open_with(&bound, &context, b"row 8")
        .unwrap_err()
        .is_decrypt());
    // What the facade sealed is an ordinary message: the async API opens it.
    assert_eq!(
        rt.block_on(env.open(&sealed, &context)).unwrap(),
        b"potassium 4.1"
    );

    let mut stream = Vec::new();
    let mut w = facade.encryptor(&mut stream, &context).unwrap();
    w.write_all(&[5u8; 40_000]).unwrap();
    w.finish().unwrap();
    let mut back = Vec::new();
    facade
        .decryptor(&stream[..], &context)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, vec![5u8; 40_000]);

    let rewrapped = facade.rewrap(&sealed, &context).unwrap();
    assert_eq!(facade.open(&rewrapped, &context).unwrap(), b"potassium 4.1");
    let calls = env.keyring().provider_calls();

    // Inside the runtime (a worker of it, here through block_on) the call
    // is refused, and no provider is called.
    let inside = rt
        .block_on(async { facade.seal(b"x", &context) })
        .unwrap_err();
    assert!(matches!(inside, Error::Blocking(_)), "{inside}");
    assert!(
        inside.to_string().contains("inside a tokio runtime"),
        "{inside}"
    );
    let spawned = rt
        .block_on(rt.spawn({
            let facade = facade.clone();
            let context = context.clone();
            async move { facade.open(&sealed, &context) }
        }))
        .unwrap()
        .unwrap_err();
    assert!(matches!(spawned, Error::Blocking(_)), "{spawned}");
    assert_eq!(env.keyring().provider_calls(), calls);
}
