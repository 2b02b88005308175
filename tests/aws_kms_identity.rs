//! One KMS key, many spellings: the data-key caches, key policies and
//! lifecycle verbs act on the key, not on the text that names it; and no
//! request leaves the provider before every local check (issue 14, items 2
//! and 5).
//!
//! Against the real KMS API server (moto) on loopback; the cases where real
//! KMS refuses a disabled or scheduled-for-deletion key go through
//! `scripts/kms_fault_proxy.py` with `enforce_key_state` on (moto itself
//! does not refuse such keys). The request-path cases use a recording TCP
//! listener in this file that stands in for an endpoint: it counts every
//! connection. Run:
//! `scripts/test-services.sh run -- cargo test --all-features --test aws_kms_identity`.
#![cfg(feature = "aws-kms")]

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use phi_envelope::cache::CacheConfig;
use phi_envelope::keyring::KeyPolicy;
use phi_envelope::provider::aws_kms::{AwsKmsConfig, AwsKmsProvider};
use phi_envelope::provider::{KeyProvider, KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{
    Caller, Dek, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring, WrappedKey,
};

const HOWTO: &str = "KMS endpoint not configured: run scripts/test-services.sh start and source \
    target/test-services/env.sh";

/// moto's account.
const ACCOUNT: &str = "123456789012";

const CONTEXT_KEY: [u8; 32] = *b"phi-envelope test context key 01";

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{HOWTO} ({name} is not set)"),
    }
}

fn moto_url() -> String {
    let url = var("AWS_ENDPOINT_URL");
    assert!(
        url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:"),
        "AWS_ENDPOINT_URL={url} is not a loopback KMS endpoint; {HOWTO}"
    );
    url
}

async fn sdk_config(endpoint: &str) -> SdkConfig {
    var("AWS_REGION");
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    assert_eq!(sdk.endpoint_url(), Some(endpoint));
    sdk
}

async fn admin() -> aws_sdk_kms::Client {
    let client = aws_sdk_kms::Client::new(&sdk_config(&moto_url()).await);
    if let Err(e) = client.list_keys().limit(1).send().await {
        panic!(
            "{HOWTO}: {} does not answer ListKeys: {}",
            moto_url(),
            aws_sdk_kms::error::DisplayErrorContext(&e)
        );
    }
    client
}

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

/// A KMS key and an alias of it, by every spelling.
struct Spellings {
    id: String,
    arn: String,
    alias: String,
    alias_arn: String,
}

impl Spellings {
    fn r(text: &str) -> KeyRef {
        format!("aws-kms:{text}").parse().unwrap()
    }
    fn by_id(&self) -> KeyRef {
        Self::r(&self.id)
    }
    fn by_arn(&self) -> KeyRef {
        Self::r(&self.arn)
    }
    fn by_alias(&self) -> KeyRef {
        Self::r(&self.alias)
    }
    fn by_alias_arn(&self) -> KeyRef {
        Self::r(&self.alias_arn)
    }
}

async fn key_with_alias(client: &aws_sdk_kms::Client, what: &str) -> Spellings {
    let meta = client
        .create_key()
        .description(format!("phi-envelope identity test: {what}"))
        .send()
        .await
        .expect("CreateKey")
        .key_metadata
        .unwrap();
    let id = meta.key_id().to_owned();
    let arn = meta.arn().unwrap().to_owned();
    let alias = format!("alias/{}", unique(what));
    client
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&id)
        .send()
        .await
        .expect("CreateAlias");
    let alias_arn = arn.replace(&format!("key/{id}"), &alias);
    Spellings {
        id,
        arn,
        alias,
        alias_arn,
    }
}

fn config() -> AwsKmsConfig {
    AwsKmsConfig::new(&CONTEXT_KEY)
        .unwrap()
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(5))
                .build(),
        )
}

async fn provider_at(endpoint: &str, config: AwsKmsConfig) -> Arc<AwsKmsProvider> {
    Arc::new(AwsKmsProvider::new(&sdk_config(endpoint).await, config).unwrap())
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("tenant", "st-mary").unwrap()
}

fn operator() -> Caller {
    Caller::new("identity-test", "lifecycle")
}

fn kind(e: &Error) -> ProviderErrorKind {
    match e {
        Error::Provider(p) => p.kind(),
        other => panic!("expected a provider error, got {other:?}"),
    }
}

/// Both data-key caches on, one recipient.
fn cached_envelope(provider: Arc<dyn KeyProvider>, recipient: KeyRef) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(provider)
            .recipient(recipient)
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    )
    .as_caller("identity-test", "test")
}

// ---------------------------------------------------------------------------
// A private fault proxy in front of moto, enforcing key states like real KMS.
// ---------------------------------------------------------------------------

struct Proxy {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start() -> Proxy {
        let upstream = std::env::var("PHI_MOTO_URL").unwrap_or_else(|_| moto_url());
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let log = dir.path().join("proxy.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kms_fault_proxy.py");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(python)
            .arg(&script)
            .args([
                "--upstream",
                &upstream,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .arg("--quiet")
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
            {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "the fault proxy did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let proxy = Proxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        proxy.control(r#"{"enforce_key_state": true}"#);
        proxy
    }

    /// POST /__fault__/config.
    fn control(&self, body: &str) {
        use std::io::Write;
        let addr = self.url.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(addr).expect("proxy control connection");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /__fault__/config HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"));
        assert!(
            response.contains("\"enforce_key_state\": true")
                || response.contains("\"enforce_key_state\":true"),
            "{response}"
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Item 2: caches flushed by key identity.
// ---------------------------------------------------------------------------

/// Sealed under the alias, destroyed by the key ARN (what `inspect` shows):
/// the encryption cache must not keep sealing new records under the
/// destroyed key (they would be lost), and the decryption cache must not
/// keep serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_by_key_arn_flushes_what_the_alias_cached() {
    let admin = admin().await;
    let k = key_with_alias(&admin, "destroy-by-arn").await;
    let proxy = Proxy::start();
    let kms = provider_at(&proxy.url, config()).await;
    let env = cached_envelope(kms, k.by_alias());
    let c = ctx();
    let m1 = env.seal(b"first", &c).await.unwrap();
    let m2 = env.seal(b"second", &c).await.unwrap();
    assert_eq!(env.keyring().cache_stats().encrypt_hits, 1, "cache warm");
    assert_eq!(env.open(&m1, &c).await.unwrap(), b"first");
    assert_eq!(env.open(&m1, &c).await.unwrap(), b"first");
    assert_eq!(env.keyring().cache_stats().decrypt_hits, 1, "cache warm");

    env.keyring()
        .destroy(&k.by_arn(), 1, &operator())
        .await
        .unwrap();

    let hits = env.keyring().cache_stats().encrypt_hits;
    let sealed = env.seal(b"after destroy", &c).await;
    assert_eq!(
        env.keyring().cache_stats().encrypt_hits,
        hits,
        "a record was sealed with the cached data key of a destroyed key"
    );
    let e = sealed.expect_err("sealing under a key pending deletion must fail");
    assert_eq!(kind(&e), ProviderErrorKind::KeyDestroyed, "{e}");
    for m in [&m1, &m2] {
        let e = env.open(m, &c).await.expect_err("served from the cache");
        assert_eq!(kind(&e), ProviderErrorKind::KeyDestroyed, "{e}");
    }
}

/// The reverse: destroyed by the alias, the decryption cache of entries
/// keyed by the header's key ARN is flushed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_by_alias_flushes_what_the_header_arn_cached() {
    let admin = admin().await;
    let k = key_with_alias(&admin, "destroy-by-alias").await;
    let proxy = Proxy::start();
    let kms = provider_at(&proxy.url, config()).await;
    let env = cached_envelope(kms, k.by_alias());
    let c = ctx();
    let m = env.seal(b"record", &c).await.unwrap();
    assert_eq!(env.open(&m, &c).await.unwrap(), b"record");
    assert_eq!(env.open(&m, &c).await.unwrap(), b"record");
    assert_eq!(env.keyring().cache_stats().decrypt_hits, 1, "cache warm");

    env.keyring()
        .destroy(&k.by_alias(), 1, &operator())
        .await
        .unwrap();

    let hits = env.keyring().cache_stats().decrypt_hits;
    let e = env
        .open(&m, &c)
        .await
        .expect_err("a message under a destroyed key was opened from the cache");
    assert_eq!(kind(&e), ProviderErrorKind::KeyDestroyed, "{e}");
    assert_eq!(env.keyring().cache_stats().decrypt_hits, hits);
    let e = env.seal(b"new", &c).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::KeyDestroyed, "{e}");
}

/// Disabled by the bare key id and by the alias ARN, sealed under the alias
/// name and the key ARN: every spelling reaches both caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_by_key_id_or_alias_arn_flushes_every_spelling() {
    let admin = admin().await;
    let proxy = Proxy::start();
    let kms = provider_at(&proxy.url, config()).await;
    let c = ctx();
    for verb_by_id in [true, false] {
        let k = key_with_alias(&admin, "disable").await;
        for recipient in [k.by_alias(), k.by_arn()] {
            let env = cached_envelope(kms.clone(), recipient.clone());
            let m = env.seal(b"r", &c).await.unwrap();
            env.seal(b"r", &c).await.unwrap();
            env.open(&m, &c).await.unwrap();
            env.open(&m, &c).await.unwrap();
            let stats = env.keyring().cache_stats();
            assert_eq!((stats.encrypt_hits, stats.decrypt_hits), (1, 1));

            let target = if verb_by_id {
                k.by_id()
            } else {
                k.by_alias_arn()
            };
            env.keyring()
                .disable(&target, 1, &operator())
                .await
                .unwrap();
            let what = format!("recipient {recipient}, disabled as {target}");
            let e = env.seal(b"r", &c).await.expect_err(&what);
            assert_eq!(kind(&e), ProviderErrorKind::KeyDisabled, "{what}: {e}");
            let e = env.open(&m, &c).await.expect_err(&what);
            assert_eq!(kind(&e), ProviderErrorKind::KeyDisabled, "{what}: {e}");
            let stats = env.keyring().cache_stats();
            assert_eq!((stats.encrypt_hits, stats.decrypt_hits), (1, 1), "{what}");
            env.keyring()
                .set_state(&target, 1, KeyState::Enabled, &operator())
                .await
                .unwrap();
            assert_eq!(env.open(&m, &c).await.unwrap(), b"r", "{what}");
        }
    }
}

// ---------------------------------------------------------------------------
// Item 2: key policies by key identity.
// ---------------------------------------------------------------------------

/// A minimum decryption version set on the alias applies to headers, which
/// record the key ARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_policy_on_the_alias_applies_to_headers_recording_the_arn() {
    let admin = admin().await;
    let k = key_with_alias(&admin, "policy-alias").await;
    let kms = provider_at(&moto_url(), config()).await;
    let c = ctx();
    let sealed = cached_envelope(kms.clone(), k.by_alias())
        .seal(b"v1 record", &c)
        .await
        .unwrap();
    for policy_key in [k.by_alias(), k.by_alias_arn(), k.by_id()] {
        let env = Envelope::new(
            Keyring::builder()
                .provider(kms.clone())
                .recipient(k.by_alias())
                .key_policy(policy_key.clone(), KeyPolicy::new().min_decrypt_version(2))
                .build()
                .unwrap(),
        );
        match env.open(&sealed, &c).await {
            Err(Error::KeyLifecycle(m)) => assert!(m.contains("minimum decryption version"), "{m}"),
            other => panic!("policy on {policy_key} not applied to the ARN header: {other:?}"),
        }
    }
}

/// A cryptoperiod set on the key ARN (as `inspect` shows it) applies when
/// the recipient is the alias.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cryptoperiod_on_the_arn_applies_to_the_alias_recipient() {
    let admin = admin().await;
    let k = key_with_alias(&admin, "policy-arn").await;
    let kms = provider_at(&moto_url(), config()).await;
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms)
            .recipient(k.by_alias())
            .key_policy(
                k.by_arn(),
                KeyPolicy::new().cryptoperiod(Duration::from_nanos(1)),
            )
            .build()
            .unwrap(),
    );
    match env.seal(b"x", &ctx()).await {
        Err(Error::KeyLifecycle(m)) => assert!(m.contains("cryptoperiod"), "{m}"),
        other => panic!("the cryptoperiod of the ARN did not apply to the alias: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Item 5: every local check before any request.
// ---------------------------------------------------------------------------

/// A loopback listener that stands in for a KMS endpoint and counts every
/// connection made to it (and answers none: the connection is dropped).
struct Recorder {
    url: String,
    connections: Arc<AtomicU64>,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicU64::new(0));
        let seen = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Recorder { url, connections }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

fn entry(key_ref: &str) -> WrappedKey {
    WrappedKey {
        provider: "aws-kms".into(),
        key_ref: key_ref.into(),
        key_version: 1,
        wrapped: vec![7; 150],
    }
}

const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

/// Header entries that are not ours by a local check alone (an alias:
/// headers always record key ARNs; a foreign account; another region or
/// partition) make no request at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_entries_failing_a_local_check_make_no_request() {
    let rec = Recorder::start();
    var("AWS_REGION");
    let region = var("AWS_REGION");
    let kms = provider_at(&rec.url, config().allowed_accounts([ACCOUNT]).unwrap()).await;
    let c = ctx();
    for key_ref in [
        // A foreign alias ARN: its owner would see who opened what, when.
        "aws-kms:arn:aws:kms:REGION:999999999999:alias/their-records".to_owned(),
        // An alias of our own account: headers record key ARNs, never aliases.
        format!("aws-kms:arn:aws:kms:REGION:{ACCOUNT}:alias/phi-records"),
        "aws-kms:alias/phi-records".to_owned(),
        // A foreign key ARN.
        format!("aws-kms:arn:aws:kms:REGION:999999999999:key/{KEY_ID}"),
        // Our account, another region or partition than the client's.
        format!("aws-kms:arn:aws:kms:xx-nowhere-7:{ACCOUNT}:key/{KEY_ID}"),
        format!("aws-kms:arn:aws-cn:kms:REGION:{ACCOUNT}:key/{KEY_ID}"),
    ] {
        let key_ref = key_ref.replace("REGION", &region);
        let answer = kms.unwrap(&entry(&key_ref), &c).await;
        assert!(
            matches!(answer, Ok(Unwrapped::NotMine)),
            "{key_ref}: {answer:?}"
        );
        assert_eq!(rec.connections(), 0, "{key_ref} reached the endpoint");
    }
}

/// Recipients and lifecycle verbs on such references are refused with a
/// clear error before any request: wrap, generate (seal), describe, create,
/// rotate, set_state, destroy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_failing_a_local_check_are_refused_before_any_request() {
    let rec = Recorder::start();
    let region = var("AWS_REGION");
    let kms = provider_at(&rec.url, config().allowed_accounts([ACCOUNT]).unwrap()).await;
    let c = ctx();
    let dek = Dek::generate().unwrap();
    for (text, why) in [
        (
            "aws-kms:arn:aws:kms:REGION:999999999999:alias/their-records".to_owned(),
            "999999999999",
        ),
        (
            format!("aws-kms:arn:aws:kms:REGION:999999999999:key/{KEY_ID}"),
            "999999999999",
        ),
        (
            format!("aws-kms:arn:aws:kms:xx-nowhere-7:{ACCOUNT}:alias/phi"),
            "xx-nowhere-7",
        ),
        (
            format!("aws-kms:arn:aws-cn:kms:REGION:{ACCOUNT}:key/{KEY_ID}"),
            "aws-cn",
        ),
    ] {
        let key: KeyRef = text.replace("REGION", &region).parse().unwrap();
        let results: Vec<(&str, Result<(), Error>)> = vec![
            ("wrap", kms.wrap(&key, &dek, &c).await.map(drop)),
            ("generate", kms.generate(&key, &c).await.map(drop)),
            ("describe", kms.describe(&key).await.map(drop)),
            ("create_key", kms.create_key(&key).await.map(drop)),
            ("rotate", kms.rotate(&key).await.map(drop)),
            (
                "set_state",
                kms.set_state(&key, 1, KeyState::Disabled).await.map(drop),
            ),
            ("destroy", kms.destroy(&key, 1).await.map(drop)),
        ];
        for (verb, r) in results {
            let e = r.expect_err(&format!("{verb} {key} must be refused"));
            let text = e.to_string();
            assert_eq!(
                kind(&e),
                ProviderErrorKind::Misconfigured,
                "{verb} {key}: {text}"
            );
            assert!(
                text.contains(why) && text.contains("no request was sent"),
                "{verb} {key}: the refusal does not say why: {text}"
            );
        }
        let env = cached_envelope(kms.clone(), key.clone());
        let e = env.seal(b"x", &c).await.unwrap_err();
        assert_eq!(
            kind(&e),
            ProviderErrorKind::Misconfigured,
            "seal {key}: {e}"
        );
        assert_eq!(rec.connections(), 0, "{key} reached the endpoint");
    }
}

// ---------------------------------------------------------------------------
// Rewrap knows a current record by key identity too.
// ---------------------------------------------------------------------------

/// Recipients are usually aliases, headers record the key ARN: records
/// sealed under the alias at the current primary version are current, so
/// batch rewrap leaves them alone and uses no key for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_counts_records_sealed_under_the_alias_as_current() {
    let admin = admin().await;
    let k = key_with_alias(&admin, "rewrap-current").await;
    let kms = provider_at(&moto_url(), config()).await;
    let env = cached_envelope(kms, k.by_alias());
    let c = ctx();
    let mut messages = Vec::new();
    for i in 0..4u8 {
        messages.push(env.seal(&[i; 64], &c).await.unwrap());
    }
    let header = Header::parse(&messages[0]).unwrap().0;
    assert_eq!(
        header.recipients()[0].key_ref,
        k.by_arn().as_str(),
        "headers record the ARN"
    );
    let items: Vec<(&[u8], &EncryptionContext)> =
        messages.iter().map(|m| (m.as_slice(), &c)).collect();
    // The first run may describe the key (its primary version); a second
    // run finds it in the describe cache and makes no provider call at all.
    for _ in 0..2 {
        let calls = env.keyring().provider_calls();
        for r in env.rewrap_batch(&items).await {
            assert!(r.is_unchanged(), "sealed under the alias, current: {r:?}");
        }
        assert!(
            env.keyring().provider_calls() - calls <= 1,
            "at most the describe: no key use for current records"
        );
    }
    let calls = env.keyring().provider_calls();
    let _ = env.rewrap_batch(&items).await;
    assert_eq!(env.keyring().provider_calls(), calls, "describe cached");
}
