//! The Vault / OpenBao Transit provider against a real OpenBao server.
//!
//! Run: `scripts/test-services.sh run -- cargo test --all-features --test vault`
//! (`scripts/openbao.sh` starts `bao server -dev` on a free loopback port,
//! mounts Transit at `transit/`, declares a raw file audit device, and
//! exports `VAULT_ADDR`, `VAULT_TOKEN` (the dev server's random root token),
//! `PHI_OPENBAO_AUDIT_LOG` and `PHI_BAO`).
//!
//! The provider is built from the standard environment (`VaultConfig::from_env`)
//! as an application builds it; there is no test-only code path. The tests'
//! own administrative steps (policies, tokens, non-derived keys, sealing) go
//! through the `bao` command-line tool. Tests that change a server's global
//! state (sealing it) start their own dev server. A test that cannot reach
//! its server fails loudly; none is skipped.

#![cfg(feature = "vault")]

mod conformance;

use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_envelope::provider::vault::{
    VaultAppRole, VaultConfig, VaultToken, VaultTransitProvider, MAX_BATCH,
};
use phi_envelope::provider::{KeyState, ProviderErrorKind, Unwrapped};
use phi_envelope::{
    Caller, Dek, EncryptionContext, Envelope, Error, Header, KeyProvider, KeyRef, Keyring,
    WrappedKey,
};

const NOT_CONFIGURED: &str = "OpenBao not configured: run scripts/test-services.sh start and \
     source target/test-services/env.sh (or scripts/test-services.sh run -- cargo test ...)";

/// The context digest key of these tests (a real deployment draws 32
/// random bytes once and keeps them in its secret store).
const CONTEXT_KEY: [u8; 32] = *b"phi-envelope vault test ctx key1";

const PHI_VALUE: &str = "MRN-0042-Jane-Roe";

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{NOT_CONFIGURED} ({name} is not set)"),
    }
}

/// The server address; refuses anything but loopback.
fn addr() -> String {
    let url = var("VAULT_ADDR");
    assert!(
        url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:"),
        "VAULT_ADDR={url} is not a loopback test server; {NOT_CONFIGURED}"
    );
    url
}

fn bao_bin() -> String {
    var("PHI_BAO")
}

/// Runs `bao ARGS` against `addr` with `token`; panics loudly on failure.
fn bao_at(addr: &str, token: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(bao_bin())
        .args(args)
        .env("VAULT_ADDR", addr)
        .env("BAO_ADDR", addr)
        .env("VAULT_TOKEN", token)
        .env("BAO_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run bao: {e}; {NOT_CONFIGURED}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bao {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn bao(args: &[&str]) -> String {
    bao_at(&addr(), &var("VAULT_TOKEN"), args, None)
}

/// A name unique to this test run.
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

fn key_ref(name: &str) -> KeyRef {
    format!("vault-transit:transit/{name}").parse().unwrap()
}

fn config() -> VaultConfig {
    addr();
    VaultConfig::from_env(&CONTEXT_KEY).expect("VaultConfig::from_env")
}

fn provider_with(config: VaultConfig) -> Arc<VaultTransitProvider> {
    Arc::new(VaultTransitProvider::new(config).unwrap())
}

fn provider() -> Arc<VaultTransitProvider> {
    provider_with(config())
}

/// A new derived Transit key, created through the provider.
async fn new_key(p: &VaultTransitProvider, name: &str) -> KeyRef {
    let key = key_ref(&unique(name));
    let info = p.create_key(&key).await.expect("create_key");
    assert_eq!(info.primary_version, Some(1));
    key
}

fn envelope(provider: Arc<dyn KeyProvider>, key: &KeyRef) -> Envelope {
    Envelope::new(
        Keyring::builder()
            .provider(provider)
            .recipient(key.clone())
            .build()
            .unwrap(),
    )
    .as_caller("vault-test", "test")
}

fn ctx(record: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("tenant", "st-mary")
        .unwrap()
        .with("record_id", format!("{PHI_VALUE}-{record}"))
        .unwrap()
}

/// The provider error in `e`; checks that no context value leaked into it.
fn provider_error(e: &Error) -> (ProviderErrorKind, String) {
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(PHI_VALUE),
        "an error leaks a context value: {text}"
    );
    let token = std::env::var("VAULT_TOKEN").unwrap_or_default();
    assert!(
        token.is_empty() || !text.contains(&token),
        "an error leaks the token: {text}"
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

/// Writes the policy `policy` (HCL) under `name`, with the root token.
fn write_policy(name: &str, policy: &str) {
    bao_at(
        &addr(),
        &var("VAULT_TOKEN"),
        &["policy", "write", name, "-"],
        Some(policy),
    );
}

/// A token whose only policy is `policy` (HCL), written by the test.
fn token_with_policy(name: &str, policy: &str) -> VaultToken {
    write_policy(name, policy);
    let token = bao(&[
        "token",
        "create",
        "-no-default-policy",
        &format!("-policy={name}"),
        "-ttl=10m",
        "-field=token",
    ]);
    VaultToken::new(token).unwrap()
}

// ---------------------------------------------------------------------------
// The shared conformance suite.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_openbao() {
    let p = provider();
    let key = new_key(&p, "conformance").await;
    let other_key = new_key(&p, "conformance-other").await;
    conformance::run(conformance::Subject {
        provider: p,
        key,
        other_key,
    })
    .await;
}

// ---------------------------------------------------------------------------
// Versions, context, audit.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_records_the_transit_version_and_old_versions_open() {
    let p = provider();
    let key = new_key(&p, "versions").await;
    let env = envelope(p.clone(), &key);
    let c = ctx("v");
    let m1 = env.seal(b"under v1", &c).await.unwrap();
    let e1 = entry(&m1, 0);
    assert_eq!(e1.provider, "vault-transit");
    assert_eq!(e1.key_ref, key.as_str());
    assert_eq!(e1.key_version, 1);
    // aes256-gcm96: 12-byte nonce, 32-byte DEK, 16-byte tag; no text prefix.
    assert_eq!(e1.wrapped.len(), 60);

    let info = p.rotate(&key).await.unwrap();
    assert_eq!(info.primary_version, Some(2));
    let m2 = env.seal(b"under v2", &c).await.unwrap();
    assert_eq!(entry(&m2, 0).key_version, 2);
    assert_eq!(env.open(&m1, &c).await.unwrap(), b"under v1");
    assert_eq!(env.open(&m2, &c).await.unwrap(), b"under v2");

    // The version is bound: the v1 wrapped key presented as v2 is rejected.
    let mut wrong_version = e1.clone();
    wrong_version.key_version = 2;
    assert!(matches!(
        p.unwrap(&wrong_version, &c).await.unwrap(),
        Unwrapped::Rejected
    ));
    // A version the key never had is rejected too (input, not the server).
    wrong_version.key_version = 99;
    assert!(matches!(
        p.unwrap(&wrong_version, &c).await.unwrap(),
        Unwrapped::Rejected
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_context_and_tampering_are_rejected_opaquely() {
    let p = provider();
    let key = new_key(&p, "context").await;
    let dek = Dek::generate().unwrap();
    let c = ctx("a");
    let wrapped = p.wrap(&key, &dek, &c).await.unwrap();
    match p.unwrap(&wrapped, &c).await.unwrap() {
        Unwrapped::Key(k) => assert_eq!(k.expose_secret(), dek.expose_secret()),
        other => panic!("{other:?}"),
    }
    for wrong in [ctx("b"), EncryptionContext::new()] {
        assert!(matches!(
            p.unwrap(&wrapped, &wrong).await.unwrap(),
            Unwrapped::Rejected
        ));
    }
    for i in [0, 11, 12, 40, 59] {
        let mut t = wrapped.clone();
        t.wrapped[i] ^= 1;
        assert!(
            matches!(p.unwrap(&t, &c).await.unwrap(), Unwrapped::Rejected),
            "flip at {i}"
        );
    }
    let mut short = wrapped.clone();
    short.wrapped.truncate(5);
    assert!(matches!(
        p.unwrap(&short, &c).await.unwrap(),
        Unwrapped::Rejected
    ));
    // Another provider's entry, or a key reference of another scheme: not mine.
    let mut foreign = wrapped.clone();
    foreign.provider = "aws-kms".into();
    assert!(matches!(
        p.unwrap(&foreign, &c).await.unwrap(),
        Unwrapped::NotMine
    ));
    let mut foreign = wrapped.clone();
    foreign.key_ref = "local:x".into();
    assert!(matches!(
        p.unwrap(&foreign, &c).await.unwrap(),
        Unwrapped::NotMine
    ));
}

/// The raw audit device records every request as the server received it:
/// the context values never reach it, only the keyed digest; the token is
/// HMAC'd by the server itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_device_sees_a_keyed_digest_and_no_context_value() {
    let p = provider();
    let key = new_key(&p, "audit").await;
    let env = envelope(p.clone(), &key);
    let secret = format!("{PHI_VALUE}-audit-{}", unique("v"));
    let c = EncryptionContext::new().with("patient", &secret).unwrap();
    let m = env.seal(b"x", &c).await.unwrap();
    env.open(&m, &c).await.unwrap();
    let digest = p.transit_context(&c);
    let log_path = PathBuf::from(var("PHI_OPENBAO_AUDIT_LOG"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(&log_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", log_path.display()));
        if log.matches(&digest).count() >= 2 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        log.matches(&digest).count() >= 2,
        "the encrypt and decrypt requests (with the digest) are not in the audit log"
    );
    assert!(
        !log.contains(&secret),
        "a context value reached the audit log"
    );
    assert!(
        !log.contains("patient"),
        "a context key reached the audit log"
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret.as_bytes());
    assert!(
        !log.contains(&b64),
        "a context value (base64) reached the audit log"
    );
}

// ---------------------------------------------------------------------------
// Errors: permissions, unknown keys, unusable keys, server down or sealed.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_decrypt_capability_is_access_denied() {
    let admin = provider();
    let key = new_key(&admin, "no-decrypt").await;
    let name = key.as_str().rsplit('/').next().unwrap().to_owned();
    let policy = format!(
        "path \"transit/encrypt/{name}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/keys/{name}\" {{ capabilities = [\"read\"] }}\n"
    );
    let token = token_with_policy(&unique("encrypt-only"), &policy);
    let p = provider_with(config().token(token));
    let env = envelope(p.clone(), &key);
    let c = ctx("denied");
    let m = env.seal(b"sealed with encrypt only", &c).await.unwrap();
    let e = env.open(&m, &c).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::AccessDenied, "{message}");
    assert!(message.contains("transit/decrypt/"), "{message}");
    assert!(!e.is_decrypt());
    // The root token opens it: nothing was wrong with the message.
    assert_eq!(
        envelope(admin, &key).open(&m, &c).await.unwrap(),
        b"sealed with encrypt only"
    );
    // A revoked or bogus token: access denied, not a bad message.
    let p = provider_with(config().token(VaultToken::new("s.not-a-token").unwrap()));
    let e = envelope(p, &key).open(&m, &c).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::AccessDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_not_found_and_never_created() {
    let p = provider();
    let name = unique("missing");
    let key = key_ref(&name);
    let env = envelope(p.clone(), &key);
    // Transit's encrypt would create the key for a token that may (root can):
    // the provider reads the key first and refuses.
    let e = env.seal(b"x", &ctx("m")).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::KeyNotFound);
    let e = p.describe(&key).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::KeyNotFound);
    // An entry naming a missing key: key not found.
    let real = new_key(&p, "real").await;
    let mut w = p
        .wrap(&real, &Dek::generate().unwrap(), &ctx("m"))
        .await
        .unwrap();
    w.key_ref = key.as_str().to_owned();
    assert_eq!(
        kind_of(&p.unwrap(&w, &ctx("m")).await.unwrap_err()),
        ProviderErrorKind::KeyNotFound
    );
    // A missing mount: misconfigured, and it says to check the mount.
    let on_missing_mount: KeyRef = format!("vault-transit:nowhere/{name}").parse().unwrap();
    let (kind, message) = provider_error(&p.describe(&on_missing_mount).await.unwrap_err());
    assert!(
        matches!(
            kind,
            ProviderErrorKind::Misconfigured | ProviderErrorKind::KeyNotFound
        ),
        "{kind:?} {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_derived_key_is_refused() {
    let p = provider();
    let name = unique("not-derived");
    bao(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        "type=aes256-gcm96",
    ]);
    let key = key_ref(&name);
    let (kind, message) =
        provider_error(&envelope(p, &key).seal(b"x", &ctx("n")).await.unwrap_err());
    assert_eq!(kind, ProviderErrorKind::Misconfigured, "{message}");
    assert!(message.contains("derived"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_silent_server_is_unavailable() {
    let p = provider();
    let key = new_key(&p, "down").await;
    let c = ctx("down");
    let m = envelope(p.clone(), &key).seal(b"x", &c).await.unwrap();
    // Nothing listens on this port.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = provider_with(
        VaultConfig::new(
            &format!("http://127.0.0.1:{port}"),
            VaultToken::new(var("VAULT_TOKEN")).unwrap(),
            &CONTEXT_KEY,
        )
        .unwrap(),
    );
    let env = envelope(dead, &key);
    let e = env.open(&m, &c).await.unwrap_err();
    assert!(!e.is_decrypt(), "{e:?}");
    assert_eq!(kind_of(&e), ProviderErrorKind::Unavailable);
    assert_eq!(
        kind_of(&env.seal(b"x", &c).await.unwrap_err()),
        ProviderErrorKind::Unavailable
    );
    // A server that accepts the connection and never answers: the request
    // timeout ends the call as unavailable.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hold = std::thread::spawn(move || {
        let (s, _) = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    let slow = provider_with(
        VaultConfig::new(
            &format!("http://127.0.0.1:{silent_port}"),
            VaultToken::new("t").unwrap(),
            &CONTEXT_KEY,
        )
        .unwrap()
        .request_timeout(Duration::from_millis(300)),
    );
    let (kind, message) = provider_error(&envelope(slow, &key).open(&m, &c).await.unwrap_err());
    assert_eq!(kind, ProviderErrorKind::Unavailable, "{message}");
    assert!(message.contains("did not answer"), "{message}");
    hold.join().unwrap();
}

/// A dev server of this test's own (sealing is global to a server).
struct OwnServer {
    child: Child,
    addr: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl OwnServer {
    fn start() -> OwnServer {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("http://127.0.0.1:{port}");
        let token = unique("root");
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let child = Command::new(bao_bin())
            .args([
                "server",
                "-dev",
                "-dev-no-store-token",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-dev-root-token-id={token}"),
            ])
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bao server: {e}; {NOT_CONFIGURED}"));
        let mut server = OwnServer {
            child,
            addr,
            token,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = Command::new(bao_bin())
                .args(["status"])
                .env("VAULT_ADDR", &server.addr)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("bao server -dev exited: {status}");
            }
            assert!(Instant::now() < deadline, "bao server -dev did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        server.bao(&["secrets", "enable", "transit"]);
        server
    }

    fn bao(&self, args: &[&str]) -> String {
        bao_at(&self.addr, &self.token, args, None)
    }

    fn provider(&self) -> Arc<VaultTransitProvider> {
        provider_with(
            VaultConfig::new(
                &self.addr,
                VaultToken::new(self.token.clone()).unwrap(),
                &CONTEXT_KEY,
            )
            .unwrap(),
        )
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_server_is_unavailable_never_a_bad_message() {
    let server = OwnServer::start();
    let p = server.provider();
    let key = new_key(&p, "sealed").await;
    let env = envelope(p.clone(), &key);
    let c = ctx("sealed");
    let m = env.seal(b"before sealing", &c).await.unwrap();
    server.bao(&["operator", "seal"]);
    for e in [
        env.open(&m, &c).await.unwrap_err(),
        env.seal(b"x", &c).await.unwrap_err(),
    ] {
        assert!(!e.is_decrypt(), "{e:?}");
        let (kind, message) = provider_error(&e);
        assert_eq!(kind, ProviderErrorKind::Unavailable, "{message}");
        assert!(message.contains("sealed"), "{message}");
    }
    // With the key-check cache cold too (a fresh provider).
    let e = envelope(server.provider(), &key)
        .open(&m, &c)
        .await
        .unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_transit_recipients_open_with_local_when_transit_is_down() {
    use phi_envelope::provider::local::LocalKeystore;
    let server = OwnServer::start();
    let transit = server.provider();
    let key = new_key(&transit, "multi").await;
    let dir = tempfile::tempdir().unwrap();
    let local = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys")).unwrap();
    let local_key: KeyRef = "local:disaster-recovery".parse().unwrap();
    local.add_key(&local_key).unwrap();
    let both = Envelope::new(
        Keyring::builder()
            .provider(transit.clone())
            .provider(Arc::new(local))
            .recipient(key.clone())
            .recipient(local_key)
            .build()
            .unwrap(),
    );
    let c = ctx("multi");
    let m = both.seal(b"two recipients", &c).await.unwrap();
    assert_eq!(entry(&m, 0).provider, "vault-transit");
    assert_eq!(entry(&m, 1).provider, "local");
    drop(server);
    assert_eq!(both.open(&m, &c).await.unwrap(), b"two recipients");
    assert_eq!(
        kind_of(&both.seal(b"x", &c).await.unwrap_err()),
        ProviderErrorKind::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_read_from_its_file_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let token = var("VAULT_TOKEN");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let p = provider_with(config().token_file(&file));
    let key = new_key(&p, "token-file").await;
    let env = envelope(p.clone(), &key);
    let c = ctx("t");
    let m = env.seal(b"x", &c).await.unwrap();
    let debug = format!("{p:?} {:?}", config());
    assert!(!debug.contains(&token), "Debug shows the token: {debug}");
    // A renewed (here: replaced by a bad) token is picked up at once.
    std::fs::write(&file, "s.replaced-by-something-else").unwrap();
    assert_eq!(
        kind_of(&env.open(&m, &c).await.unwrap_err()),
        ProviderErrorKind::AccessDenied
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        kind_of(&env.open(&m, &c).await.unwrap_err()),
        ProviderErrorKind::Misconfigured
    );
}

// ---------------------------------------------------------------------------
// Lifecycle through Transit, through the keyring.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_maps_onto_min_versions_and_trim_shreds() {
    let p = provider();
    let keyring = Keyring::builder().provider(p.clone()).build().unwrap();
    let caller = Caller::new("vault-test", "lifecycle");
    let key = key_ref(&unique("lifecycle"));

    let info = keyring.create_key(&key, &caller).await.unwrap();
    assert_eq!(info.primary_version, Some(1));
    assert_eq!(info.version(1).unwrap().state, KeyState::Enabled);
    assert!(info.version(1).unwrap().created_at.is_some());
    let settings = bao(&[
        "read",
        "-format=json",
        &format!("transit/keys/{}", name_of(&key)),
    ]);
    assert!(settings.contains("\"derived\": true"), "{settings}");
    assert!(settings.contains("\"exportable\": false"), "{settings}");
    assert!(
        settings.contains("\"type\": \"aes256-gcm96\""),
        "{settings}"
    );
    assert_eq!(
        kind_of(&keyring.create_key(&key, &caller).await.unwrap_err()),
        ProviderErrorKind::InvalidState
    );

    let env = envelope(p.clone(), &key);
    let c = ctx("life");
    let m1 = env.seal(b"v1", &c).await.unwrap();
    keyring.rotate(&key, &caller).await.unwrap();
    let m2 = env.seal(b"v2", &c).await.unwrap();
    let info = keyring.rotate(&key, &caller).await.unwrap();
    assert_eq!(info.primary_version, Some(3));
    let states: Vec<_> = info.versions.iter().map(|v| v.state).collect();
    use KeyState::*;
    assert_eq!(states, [DecryptOnly, DecryptOnly, Enabled]);

    // Disable: from the oldest up (min_decryption_version).
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&key, 2, Disabled, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::InvalidState
    );
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&key, 3, Disabled, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::InvalidState
    );
    let info = keyring.set_state(&key, 1, Disabled, &caller).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, Disabled);
    assert_eq!(
        kind_of(&env.open(&m1, &c).await.unwrap_err()),
        ProviderErrorKind::KeyDisabled
    );
    assert_eq!(env.open(&m2, &c).await.unwrap(), b"v2");
    // Re-enable (decrypt-only), then disable again.
    keyring
        .set_state(&key, 1, DecryptOnly, &caller)
        .await
        .unwrap();
    assert_eq!(env.open(&m1, &c).await.unwrap(), b"v1");
    // Not expressible in Transit: an older primary, a decrypt-only primary.
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&key, 1, Enabled, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::Unsupported
    );
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&key, 3, DecryptOnly, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::Unsupported
    );

    // Destroy: oldest first, never the primary.
    assert_eq!(
        kind_of(&keyring.destroy(&key, 2, &caller).await.unwrap_err()),
        ProviderErrorKind::InvalidState
    );
    assert_eq!(
        kind_of(&keyring.destroy(&key, 3, &caller).await.unwrap_err()),
        ProviderErrorKind::InvalidState
    );
    let w1 = entry(&m1, 0);
    let info = keyring.destroy(&key, 1, &caller).await.unwrap();
    assert_eq!(info.version(1).unwrap().state, Destroyed);
    assert_eq!(info.version(2).unwrap().state, DecryptOnly);
    assert_eq!(info.primary_version, Some(3));

    // Crypto-shredding: the message under version 1 never opens again,
    // through the provider or straight through the server as root.
    let e = env.open(&m1, &c).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::KeyDestroyed);
    let e = Envelope::new(Keyring::builder().provider(provider()).build().unwrap())
        .open(&m1, &c)
        .await
        .unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::KeyDestroyed);
    assert_eq!(
        kind_of(
            &keyring
                .set_state(&key, 1, DecryptOnly, &caller)
                .await
                .unwrap_err()
        ),
        ProviderErrorKind::KeyDestroyed
    );
    let lowered = Command::new(bao_bin())
        .args([
            "write",
            &format!("transit/keys/{}/config", name_of(&key)),
            "min_decryption_version=1",
        ])
        .env("VAULT_ADDR", addr())
        .env("VAULT_TOKEN", var("VAULT_TOKEN"))
        .output()
        .unwrap();
    assert!(!lowered.status.success(), "the server let version 1 back");
    assert!(matches!(
        p.unwrap(&w1, &c).await,
        Err(Error::Provider(_)) | Ok(Unwrapped::Rejected)
    ));
    // Destroying it again is a no-op; the rest still works.
    keyring.destroy(&key, 1, &caller).await.unwrap();
    assert_eq!(env.open(&m2, &c).await.unwrap(), b"v2");
    assert_eq!(
        env.open(&env.seal(b"v3", &c).await.unwrap(), &c)
            .await
            .unwrap(),
        b"v3"
    );
}

fn name_of(key: &KeyRef) -> String {
    key.as_str().rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_only_where_deletion_is_allowed() {
    let p = provider();
    let key = new_key(&p, "delete").await;
    let c = ctx("d");
    let m = envelope(p.clone(), &key).seal(b"x", &c).await.unwrap();
    assert_eq!(
        kind_of(&p.delete_key(&key).await.unwrap_err()),
        ProviderErrorKind::InvalidState
    );
    assert_eq!(envelope(p.clone(), &key).open(&m, &c).await.unwrap(), b"x");
    bao(&[
        "write",
        &format!("transit/keys/{}/config", name_of(&key)),
        "deletion_allowed=true",
    ]);
    p.delete_key(&key).await.unwrap();
    assert_eq!(
        kind_of(&envelope(p.clone(), &key).open(&m, &c).await.unwrap_err()),
        ProviderErrorKind::KeyNotFound
    );
}

// ---------------------------------------------------------------------------
// Rewrap: one at a time through the keyring, and in batches.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_to_the_latest_version_and_keeps_the_body() {
    let p = provider();
    let key = new_key(&p, "rewrap").await;
    let env = envelope(p.clone(), &key);
    let c = ctx("rw");
    let m = env.seal(b"rewrap me", &c).await.unwrap();
    let (_, at) = Header::parse(&m).unwrap();
    p.rotate(&key).await.unwrap();
    let r = env.rewrap(&m, &c).await.unwrap();
    let (h, at2) = Header::parse(&r).unwrap();
    assert_eq!(&r[at2..], &m[at..], "the body is untouched");
    assert_eq!(h.recipients()[0].key_version, 2);
    assert_ne!(h.recipients()[0].wrapped, entry(&m, 0).wrapped);
    assert_eq!(env.open(&r, &c).await.unwrap(), b"rewrap me");
    // The provider's own rewrap answers for the same key only.
    let other = new_key(&p, "rewrap-other").await;
    assert!(p.rewrap(&entry(&m, 0), &other, &c).await.unwrap().is_none());
    let same = p.rewrap(&entry(&m, 0), &key, &c).await.unwrap().unwrap();
    assert_eq!(same.key_version, 2);
    // After version 1 is retired, only the rewrapped message opens.
    p.set_state(&key, 1, KeyState::Disabled).await.unwrap();
    assert!(env.open(&m, &c).await.is_err());
    assert_eq!(env.open(&r, &c).await.unwrap(), b"rewrap me");
    assert!(env.rewrap(&m, &ctx("other")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rewrap_without_the_deks() {
    let p = provider();
    let key = new_key(&p, "batch").await;
    let other = new_key(&p, "batch-other").await;
    let n = MAX_BATCH + 44;
    let mut deks = Vec::new();
    let mut entries = Vec::new();
    let mut contexts = Vec::new();
    for i in 0..n {
        let dek = Dek::generate().unwrap();
        let c = ctx(&format!("b{i}"));
        entries.push(p.wrap(&key, &dek, &c).await.unwrap());
        deks.push(dek);
        contexts.push(c);
    }
    // Item 7 under the wrong context, item 9 of another key.
    let wrong = ctx("not-this-one");
    let foreign = p
        .wrap(&other, &Dek::generate().unwrap(), &contexts[9])
        .await
        .unwrap();
    p.rotate(&key).await.unwrap();
    let items: Vec<(&WrappedKey, &EncryptionContext)> = (0..n)
        .map(|i| match i {
            7 => (&entries[i], &wrong),
            9 => (&foreign, &contexts[i]),
            _ => (&entries[i], &contexts[i]),
        })
        .collect();
    let results = p.rewrap_batch(&key, &items).await.unwrap();
    assert_eq!(results.len(), n);
    for (i, r) in results.iter().enumerate() {
        match i {
            7 => assert!(matches!(r, Err(Error::Decrypt)), "{r:?}"),
            9 => assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}"),
            _ => {
                let e = r.as_ref().unwrap();
                assert_eq!(e.key_version, 2);
                match p.unwrap(e, &contexts[i]).await.unwrap() {
                    Unwrapped::Key(k) => assert_eq!(k.expose_secret(), deks[i].expose_secret()),
                    other => panic!("{i}: {other:?}"),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewable_token_is_renewed_and_a_root_token_is_not() {
    let token = bao(&[
        "token",
        "create",
        "-policy=default",
        "-ttl=2m",
        "-explicit-max-ttl=1h",
        "-renewable=true",
        "-field=token",
    ]);
    let p = provider_with(config().token(VaultToken::new(token).unwrap()));
    let lease = p
        .renew_token(Some(Duration::from_secs(1800)))
        .await
        .unwrap();
    assert!(
        lease > Duration::from_secs(600) && lease <= Duration::from_secs(3600),
        "{lease:?}"
    );
    // The root token of the dev server has no lease to renew.
    let e = provider().renew_token(None).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::InvalidState);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_key_sets_the_configured_auto_rotate_period() {
    let p = provider_with(
        config()
            .auto_rotate_period(Duration::from_secs(30 * 86_400))
            .unwrap(),
    );
    let key = new_key(&p, "auto-rotate").await;
    let settings = bao(&[
        "read",
        "-format=json",
        &format!("transit/keys/{}", name_of(&key)),
    ]);
    let v: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(v["data"]["auto_rotate_period"], 30 * 86_400, "{settings}");
    assert!(config()
        .auto_rotate_period(Duration::from_secs(60))
        .is_err());
}

// ---------------------------------------------------------------------------
// Staying logged in: renewal and AppRole.
// ---------------------------------------------------------------------------

/// The policy of a token that seals and opens under `key`.
fn seal_open_policy(key: &KeyRef) -> String {
    let name = name_of(key);
    format!(
        "path \"transit/encrypt/{name}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/decrypt/{name}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/keys/{name}\" {{ capabilities = [\"read\"] }}\n"
    )
}

/// An AppRole mount of its own, a role on it with `policy` and `settings`
/// (`key=value` for `auth/MOUNT/role/r`); returns the mount and role id.
fn app_role_mount(policy: &str, settings: &[&str]) -> (String, String) {
    let mount = unique("approle");
    let policy_name = unique("approle-policy");
    write_policy(&policy_name, policy);
    bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    let role = format!("auth/{mount}/role/r");
    let mut args = vec![
        "write".to_owned(),
        role.clone(),
        format!("token_policies={policy_name}"),
    ];
    args.extend(settings.iter().map(|s| s.to_string()));
    bao(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let role_id = bao(&["read", "-field=role_id", &format!("{role}/role-id")]);
    (mount, role_id)
}

/// The AppRole identity of role `r` on `mount`, with `secret_id`.
fn app_role(mount: &str, role_id: &str, secret_id: &str) -> VaultAppRole {
    VaultAppRole::new(role_id, secret_id)
        .unwrap()
        .mount(mount)
        .unwrap()
}

fn new_secret_id(mount: &str) -> String {
    bao(&[
        "write",
        "-f",
        "-field=secret_id",
        &format!("auth/{mount}/role/r/secret-id"),
    ])
}

/// A policy file written for `key` and a token with it: `ttl`, renewable
/// or not (its policies include `default`: lookup-self, renew-self).
fn token_for(key: &KeyRef, ttl: &str, renewable: bool) -> String {
    let policy = unique("renewal-policy");
    write_policy(&policy, &seal_open_policy(key));
    bao(&[
        "token",
        "create",
        &format!("-policy={policy}"),
        &format!("-ttl={ttl}"),
        "-explicit-max-ttl=1h",
        &format!("-renewable={renewable}"),
        "-field=token",
    ])
}

// The sleeps below leave seconds of margin either side of the 2/3 and 9/10
// points of each lease: they test behaviour over time, not speed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewable_token_is_renewed_before_it_expires() {
    let admin = provider();
    let key = new_key(&admin, "renewed").await;
    let c = ctx("renewed");
    let m = envelope(admin, &key).seal(b"kept alive", &c).await.unwrap();
    // Twenty seconds to live, renewable for an hour.
    let token = token_for(&key, "20s", true);
    let env = envelope(
        provider_with(config().token(VaultToken::new(token.clone()).unwrap())),
        &key,
    );
    // The first request learns the lease; past two thirds of it (13.3 s),
    // the next request renews first ...
    assert_eq!(env.open(&m, &c).await.unwrap(), b"kept alive");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(env.open(&m, &c).await.unwrap(), b"kept alive");
    // ... so the token outlives its first twenty seconds.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(env.open(&m, &c).await.unwrap(), b"kept alive");
    let lookup = bao(&["token", "lookup", "-format=json", &token]);
    let v: serde_json::Value = serde_json::from_str(&lookup).unwrap();
    assert!(v["data"]["ttl"].as_u64().unwrap() > 0, "{lookup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_cannot_be_renewed_is_used_until_it_expires() {
    let admin = provider();
    let key = new_key(&admin, "not-renewed").await;
    let c = ctx("not-renewed");
    let m = envelope(admin, &key).seal(b"until then", &c).await.unwrap();
    let token = token_for(&key, "5s", false);
    let env = envelope(
        provider_with(config().token(VaultToken::new(token).unwrap())),
        &key,
    );
    assert_eq!(env.open(&m, &c).await.unwrap(), b"until then");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let e = env.open(&m, &c).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::AccessDenied);
    assert!(!e.is_decrypt());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_role_logs_in_once_and_renews() {
    let admin = provider();
    let key = new_key(&admin, "approle").await;
    let c = ctx("approle");
    let m = envelope(admin.clone(), &key)
        .seal(b"opened by a role", &c)
        .await
        .unwrap();
    // A secret id good for one login: everything after it must be renewal.
    let (mount, role_id) = app_role_mount(
        &seal_open_policy(&key),
        &["token_ttl=20s", "token_max_ttl=1h", "secret_id_num_uses=1"],
    );
    let secret = new_secret_id(&mount);
    let role = app_role(&mount, &role_id, &secret);
    let p = provider_with(config().app_role(role));
    let debug = format!("{p:?}");
    assert!(
        !debug.contains(&secret) && !debug.contains(&role_id),
        "{debug}"
    );
    let env = envelope(p.clone(), &key);
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened by a role");
    // Renewed in [13.3 s, 18 s) after the login, then again 13.3 s later.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened by a role");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened by a role");

    // Its tokens revoked behind its back: the one secret id is used up, so
    // the new login fails, and says so as access denied.
    bao(&["token", "revoke", "-mode=path", &format!("auth/{mount}/")]);
    let e = env.open(&m, &c).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::AccessDenied, "{message}");
    assert!(
        message.contains(&format!("auth/{mount}/login")),
        "{message}"
    );
    assert!(!message.contains(&secret), "{message}");
    assert!(!e.is_decrypt());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_keeps_the_app_role_token() {
    let admin = provider();
    let allowed = new_key(&admin, "approle-allowed").await;
    let denied = new_key(&admin, "approle-denied").await;
    let c = ctx("approle-denied");
    let m_allowed = envelope(admin.clone(), &allowed)
        .seal(b"allowed", &c)
        .await
        .unwrap();
    let m_denied = envelope(admin.clone(), &denied)
        .seal(b"denied", &c)
        .await
        .unwrap();
    // One login only: a denial that logged in again would use it up.
    let (mount, role_id) = app_role_mount(
        &seal_open_policy(&allowed),
        &["token_ttl=1h", "secret_id_num_uses=1"],
    );
    let role = app_role(&mount, &role_id, &new_secret_id(&mount));
    let p = provider_with(config().app_role(role));
    assert_eq!(
        envelope(p.clone(), &allowed)
            .open(&m_allowed, &c)
            .await
            .unwrap(),
        b"allowed"
    );
    for _ in 0..3 {
        let e = envelope(p.clone(), &denied)
            .open(&m_denied, &c)
            .await
            .unwrap_err();
        let (kind, message) = provider_error(&e);
        assert_eq!(kind, ProviderErrorKind::AccessDenied, "{message}");
        assert!(!message.contains("login"), "{message}");
    }
    assert_eq!(
        envelope(p, &allowed).open(&m_allowed, &c).await.unwrap(),
        b"allowed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_role_logs_in_again_after_expiry_or_revocation_from_its_secret_file() {
    let admin = provider();
    let key = new_key(&admin, "approle-file").await;
    let c = ctx("approle-file");
    let m = envelope(admin.clone(), &key)
        .seal(b"opened again", &c)
        .await
        .unwrap();

    // Tokens that cannot live past three seconds: a new login past 9/10.
    let (short_mount, short_role) = app_role_mount(
        &seal_open_policy(&key),
        &["token_ttl=3s", "token_max_ttl=3s"],
    );
    let role = app_role(&short_mount, &short_role, &new_secret_id(&short_mount));
    let env = envelope(provider_with(config().app_role(role)), &key);
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened again");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened again");

    // Long-lived tokens, the secret id in a file: revocation is what
    // makes the next request log in again (the 403 retry).
    let (mount, role_id) = app_role_mount(&seal_open_policy(&key), &["token_ttl=1h"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret-id");
    let first = new_secret_id(&mount);
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let role = VaultAppRole::with_secret_id_file(&role_id, &file)
        .unwrap()
        .mount(&mount)
        .unwrap();
    let env = envelope(provider_with(config().app_role(role)), &key);
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened again");
    bao(&["token", "revoke", "-mode=path", &format!("auth/{mount}/")]);
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened again");

    // The orchestrator rotates the secret id: the old one is destroyed,
    // the file rewritten, every token of the mount revoked.
    let second = new_secret_id(&mount);
    bao(&[
        "write",
        &format!("auth/{mount}/role/r/secret-id/destroy"),
        &format!("secret_id={first}"),
    ]);
    std::fs::write(&file, &second).unwrap();
    bao(&["token", "revoke", "-mode=path", &format!("auth/{mount}/")]);
    assert_eq!(env.open(&m, &c).await.unwrap(), b"opened again");

    // A wrong secret id: access denied, never a bad message, never shown.
    std::fs::write(&file, "00000000-0000-0000-0000-000000000000").unwrap();
    bao(&["token", "revoke", "-mode=path", &format!("auth/{mount}/")]);
    let e = env.open(&m, &c).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::AccessDenied, "{message}");
    assert!(
        message.contains(&format!("auth/{mount}/login")),
        "{message}"
    );
    assert!(!e.is_decrypt());
    std::fs::remove_file(&file).unwrap();
    let e = env.open(&m, &c).await.unwrap_err();
    assert_eq!(kind_of(&e), ProviderErrorKind::Misconfigured);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_role_login_to_a_server_that_is_down_is_unavailable() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let role = VaultAppRole::new("some-role", "some-secret").unwrap();
    let p = provider_with(
        VaultConfig::with_app_role(&format!("http://127.0.0.1:{port}"), role, &CONTEXT_KEY)
            .unwrap(),
    );
    let key = key_ref("down");
    let e = p.describe(&key).await.unwrap_err();
    let (kind, message) = provider_error(&e);
    assert_eq!(kind, ProviderErrorKind::Unavailable, "{message}");
    assert!(!message.contains("some-secret"), "{message}");
}

#[test]
fn app_role_comes_from_the_environment_without_a_token() {
    // The variables are read by from_env; this process's own VAULT_TOKEN
    // is not touched (a child process gets the environment under test).
    if std::env::var("PHI_APPROLE_ENV_CHILD").is_ok() {
        let c = VaultConfig::from_env(&CONTEXT_KEY).unwrap();
        let debug = format!("{c:?}");
        assert!(debug.contains("AppRole"), "{debug}");
        assert!(debug.contains("approle-env"), "{debug}");
        assert!(!debug.contains("env-secret-id"), "{debug}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--exact",
            "app_role_comes_from_the_environment_without_a_token",
            "--nocapture",
        ])
        .env("PHI_APPROLE_ENV_CHILD", "1")
        .env("VAULT_ADDR", "http://127.0.0.1:8200")
        .env_remove("VAULT_TOKEN")
        .env_remove("BAO_TOKEN")
        .env_remove("VAULT_SECRET_ID")
        .env_remove("VAULT_SECRET_ID_FILE")
        .env("VAULT_ROLE_ID", "env-role-id")
        .env("VAULT_APPROLE_MOUNT", "approle-env");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    let (ok, said) = run(&[("VAULT_SECRET_ID", "env-secret-id")]);
    assert!(ok, "{said}");
    // Both a secret id and a file, or neither: a configuration error.
    for extra in [
        &[
            ("VAULT_SECRET_ID", "env-secret-id"),
            ("VAULT_SECRET_ID_FILE", "/nonexistent"),
        ][..],
        &[][..],
    ] {
        let (ok, said) = run(extra);
        assert!(!ok, "{said}");
        assert!(said.contains("exactly one of VAULT_SECRET_ID"), "{said}");
    }
}
