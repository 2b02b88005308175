//! Secret hygiene through the public API: no `Debug` or `Display` of a
//! public type that holds or touches a secret prints key bytes, context
//! values, plaintext, a PIN or a passphrase; secret types zeroize on drop
//! and cannot be copied, printed or serialized; a chunk that failed
//! authentication is never readable.
//!
//! The scanner below looks for every rendering a formatter could produce
//! of each secret: lower- and upper-case hex, the decimal list of `{:?}` on
//! a byte slice, `\x..` escapes, base64, and the text itself, for every
//! 8-byte window (so a partial print is caught too). The secrets are
//! distinctive byte patterns that occur nowhere else.
//!
//! Keys we cannot see from outside (the derived AES keys inside `ring`,
//! the HKDF and HMAC states) are covered by what prints them: nothing
//! prints a field of those types at all. What `ring` does not zeroize is
//! documented in SECURITY.md.

mod conformance;

use std::fmt::Debug;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use conformance::MemoryKms;
use phi_envelope::cobblestone;
use phi_envelope::events::MemorySink;
use phi_envelope::message::{OpeningKey, SealingKey};
use phi_envelope::provider::{
    BoxFuture, GeneratedDek, KeyInfo, KeyProvider, ProviderError, ProviderErrorKind, Unwrapped,
};
use phi_envelope::{Dek, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring, WrappedKey};
use zeroize::{Zeroize, ZeroizeOnDrop};

// ---------------------------------------------------------------------------
// The scanner.
// ---------------------------------------------------------------------------

/// A distinctive secret of `n` bytes: no two neighbours alike, no run that
/// a formatter would print for anything else.
fn secret(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(73).wrapping_add(seed) ^ 0x5a)
        .collect()
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// Every way a formatter could print (a part of) `secret`.
fn renderings(secret: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let window = secret.len().min(8);
    for w in secret.windows(window) {
        let hex: String = w.iter().map(|b| format!("{b:02x}")).collect();
        out.push(hex.to_uppercase());
        out.push(hex);
        out.push(
            w.iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
        out.push(w.iter().map(|b| format!("\\x{b:02x}")).collect());
    }
    // base64 at each of the three alignments; 12 characters = 9 bytes.
    for skip in 0..3.min(secret.len()) {
        let b = base64(&secret[skip..]);
        let b = &b[(4 - skip % 3) % 4..];
        for i in (0..b.len().saturating_sub(12)).step_by(4) {
            out.push(b[i..i + 12].to_owned());
        }
    }
    if let Ok(text) = std::str::from_utf8(secret) {
        out.push(text.to_owned());
    }
    out
}

/// Fails if `text` contains any rendering of any of `secrets`.
#[track_caller]
fn assert_clean(what: &str, text: &str, secrets: &[&[u8]]) {
    for s in secrets {
        for r in renderings(s) {
            assert!(
                !text.contains(&r),
                "{what} prints a secret ({r:?} found in {text:?})"
            );
        }
    }
}

/// `Debug` (alternate form too) of `value` is clean.
#[track_caller]
fn assert_debug_clean<T: Debug + ?Sized>(what: &str, value: &T, secrets: &[&[u8]]) {
    assert_clean(what, &format!("{value:?}"), secrets);
    assert_clean(what, &format!("{value:#?}"), secrets);
}

/// A type does NOT implement a trait: the call below is ambiguous (and does
/// not compile) when it does.
macro_rules! assert_not_impl {
    ($t:ty: $($tr:path),+) => {{
        $(
            {
                trait AmbiguousIfImpl<A> {
                    fn some_item() {}
                }
                impl<T: ?Sized> AmbiguousIfImpl<()> for T {}
                #[allow(dead_code)]
                struct Invalid;
                impl<T: ?Sized + $tr> AmbiguousIfImpl<Invalid> for T {}
                let _ = <$t as AmbiguousIfImpl<_>>::some_item;
            }
        )+
    }};
}

/// The scanner itself can fail: it finds a secret in each rendering a
/// careless `Debug` would produce, whole or in part.
#[test]
fn the_scanner_finds_every_rendering() {
    let s = secret(32, 0x42);
    let leaks = [
        format!("{s:?}"),
        format!("{:?}", &s[5..15]),
        s.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        s[3..13]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
        base64(&s),
        base64(&s[1..20]),
        base64(&s[2..]),
        bytes_as_escaped(&s[4..14]),
    ];
    for leak in leaks {
        let text = format!("Thing {{ field: {leak} }}");
        let caught = std::panic::catch_unwind(|| assert_clean("probe", &text, &[&s]));
        assert!(caught.is_err(), "the scanner missed {text}");
    }
    assert_clean("probe", "Dek(<redacted>)", &[&s]);
}

fn bytes_as_escaped(b: &[u8]) -> String {
    b.iter().map(|c| format!("\\x{c:02x}")).collect()
}

fn assert_zeroize_on_drop<T: ZeroizeOnDrop>() {}

fn dek_bytes() -> Vec<u8> {
    secret(32, 0x11)
}

fn ctx_with_phi() -> EncryptionContext {
    EncryptionContext::from_pairs([
        ("patient", "Jane Q. Roe 1970-01-01"),
        ("mrn", "MRN-7730021-Z"),
    ])
    .unwrap()
}

const CONTEXT_VALUES: [&[u8]; 2] = [b"Jane Q. Roe 1970-01-01", b"MRN-7730021-Z"];
const PLAINTEXT: &[u8] = b"HIV-1 RNA PCR: DETECTED, 41,000 copies/mL -- patient Jane Q. Roe";

// ---------------------------------------------------------------------------
// A provider that remembers every DEK it sees, to look for them afterwards.
// ---------------------------------------------------------------------------

struct Spy {
    inner: MemoryKms,
    seen: Mutex<Vec<Vec<u8>>>,
}

impl Debug for Spy {
    // Not derived: that would print the DEKs it keeps for the test.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spy").field("inner", &self.inner).finish()
    }
}

impl Spy {
    fn new(id: &str) -> (Arc<Spy>, KeyRef) {
        let inner = MemoryKms::new(id);
        let key = inner.add_key("records");
        (
            Arc::new(Spy {
                inner,
                seen: Mutex::new(Vec::new()),
            }),
            key,
        )
    }

    fn deks(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

impl KeyProvider for Spy {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<WrappedKey>> {
        self.seen.lock().unwrap().push(dek.expose_secret().to_vec());
        self.inner.wrap(key, dek, context)
    }
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Unwrapped>> {
        Box::pin(async move {
            let u = self.inner.unwrap(entry, context).await?;
            if let Unwrapped::Key(d) = &u {
                self.seen.lock().unwrap().push(d.expose_secret().to_vec());
            }
            Ok(u)
        })
    }
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        self.inner.describe(key)
    }
}

// ---------------------------------------------------------------------------
// Keys and key-derived types.
// ---------------------------------------------------------------------------

#[test]
fn dek_is_redacted_uncopyable_unprintable_and_zeroizes() {
    let bytes = dek_bytes();
    let dek = Dek::from_slice(&bytes).unwrap();
    assert_eq!(format!("{dek:?}"), "Dek(<redacted>)");
    assert_debug_clean("Dek", &dek, &[&bytes]);

    // Compile-time facts: zeroized on drop; no Clone, Copy, Display or
    // Serialize, so it cannot be duplicated, printed or written out.
    assert_zeroize_on_drop::<Dek>();
    assert_not_impl!(Dek: Clone, Copy, std::fmt::Display, serde::Serialize);

    // The zeroization the drop glue runs, made observable.
    let mut dek = dek;
    dek.zeroize();
    assert_eq!(dek.expose_secret(), &[0u8; 32]);

    // Wrappers of a DEK print it redacted too.
    let g = GeneratedDek {
        dek: Dek::from_slice(&bytes).unwrap(),
        wrapped: WrappedKey {
            provider: "local".into(),
            key_ref: "local:k".into(),
            key_version: 1,
            wrapped: secret(60, 0x22),
        },
    };
    assert_debug_clean("GeneratedDek", &g, &[&bytes, &secret(60, 0x22)]);
    let u = Unwrapped::Key(Dek::from_slice(&bytes).unwrap());
    assert_debug_clean("Unwrapped::Key", &u, &[&bytes]);
    assert_eq!(format!("{u:?}"), "Key(Dek(<redacted>))");
}

/// HKDF-Expand-SHA-512 with the DEK as PRK, as the format derives the
/// header-tag key (docs/FORMAT.md).
fn header_tag_key(dek: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha512>::new_from_slice(dek).unwrap();
    mac.update(b"phi-envelope/v1 header tag");
    mac.update(&[1]);
    mac.finalize().into_bytes()[..32].to_vec()
}

#[test]
fn sealing_and_opening_keys_headers_and_entries_print_no_key_material() {
    let bytes = dek_bytes();
    let wrapped = secret(60, 0x33);
    let tag_key = header_tag_key(&bytes);
    let secrets: [&[u8]; 3] = [&bytes, &wrapped, &tag_key];
    let dek = Dek::from_slice(&bytes).unwrap();
    let entry = WrappedKey {
        provider: "local".into(),
        key_ref: "local:records".into(),
        key_version: 3,
        wrapped: wrapped.clone(),
    };
    assert_debug_clean("WrappedKey", &entry, &secrets);
    assert!(format!("{entry:?}").contains("wrapped_len: 60"));

    let key = SealingKey::new(&dek, vec![entry]).unwrap();
    assert_debug_clean("SealingKey", &key, &secrets);
    let header: &Header = key.header();
    assert_debug_clean("Header", header, &secrets);
    let header_text = format!("{header:?}");
    assert!(header_text.contains("local:records") && header_text.contains("key_version: 3"));

    let opening = OpeningKey::new(&dek, header).unwrap();
    assert_debug_clean("OpeningKey", &opening, &secrets);

    let sealed = key.seal(PLAINTEXT, &ctx_with_phi()).unwrap();
    let info = phi_envelope::envelope::inspect(&sealed).unwrap();
    assert_debug_clean("MessageInfo", &info, &secrets);
    // The header tag itself is not a secret, but the rest must hold.
    assert_debug_clean("MessageInfo", &info, &CONTEXT_VALUES);
    assert_debug_clean("MessageInfo", &info, &[PLAINTEXT]);
}

#[test]
fn streams_print_no_key_and_no_buffered_plaintext() {
    let bytes = dek_bytes();
    let ctx = ctx_with_phi();
    let dek = Dek::from_slice(&bytes).unwrap();
    let entry = WrappedKey {
        provider: "local".into(),
        key_ref: "local:records".into(),
        key_version: 1,
        wrapped: secret(60, 0x44),
    };
    let key = SealingKey::new(&dek, vec![entry]).unwrap();
    let mut secrets: Vec<&[u8]> = vec![&bytes, PLAINTEXT];
    secrets.extend(CONTEXT_VALUES);

    // A partial chunk of plaintext sits in the encryptor's buffer.
    let mut w = key.encryptor(Vec::new(), &ctx).unwrap();
    w.write_all(PLAINTEXT).unwrap();
    assert_debug_clean("Encryptor", &w, &secrets);
    let sealed = w.finish().unwrap();

    // A decrypted chunk sits in the decryptor's buffer.
    let (header, used) = Header::parse(&sealed).unwrap();
    let opening = OpeningKey::new(&dek, &header).unwrap();
    let mut d = opening.decryptor(&sealed[used..], &ctx).unwrap();
    let mut first = [0u8; 4];
    d.read_exact(&mut first).unwrap();
    assert_eq!(&first, &PLAINTEXT[..4]);
    assert_debug_clean("Decryptor", &d, &secrets);

    let mut s = opening
        .seekable_decryptor(Cursor::new(&sealed[used..]), &ctx)
        .unwrap();
    s.seek(SeekFrom::Start(10)).unwrap();
    s.read_exact(&mut first).unwrap();
    assert_debug_clean("SeekableDecryptor", &s, &secrets);

    // The body layer's own types.
    let mut w = cobblestone::Encryptor::new(&bytes, b"ctx", Vec::new()).unwrap();
    w.write_all(PLAINTEXT).unwrap();
    assert_debug_clean("cobblestone::Encryptor", &w, &secrets);
}

#[test]
fn encryption_context_prints_its_keys_only() {
    let ctx = ctx_with_phi();
    let text = format!("{ctx:?}");
    assert!(text.contains("patient") && text.contains("mrn"), "{text}");
    assert_debug_clean("EncryptionContext", &ctx, &CONTEXT_VALUES);
    assert_not_impl!(EncryptionContext: std::fmt::Display, serde::Serialize);
    // Errors about a context never echo the value.
    let long = "Jane Q. Roe ".repeat(400);
    let e = EncryptionContext::new()
        .with("patient", long.clone())
        .unwrap_err();
    assert_clean("context error", &format!("{e} {e:?}"), &[long.as_bytes()]);
    let e = EncryptionContext::from_pairs([("mrn", "MRN-7730021-Z"), ("mrn", "MRN-7730021-Z")])
        .unwrap_err();
    assert_clean("context error", &format!("{e} {e:?}"), &CONTEXT_VALUES);
}

// ---------------------------------------------------------------------------
// Keyring, envelope, cache, events.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn keyring_envelope_cache_and_events_print_no_keys_or_context_values() {
    use phi_envelope::cache::{CacheConfig, CacheLimits};
    use std::time::Duration;

    let (spy, key) = Spy::new("spy");
    let fingerprint_key = secret(32, 0x55);
    let sink = Arc::new(MemorySink::new());
    let builder = Keyring::builder()
        .provider(spy.clone())
        .recipient(key)
        .event_sink(sink.clone())
        .context_fingerprint_key(&fingerprint_key);
    assert_debug_clean("KeyringBuilder", &builder, &[&fingerprint_key]);
    let keyring = builder
        .data_key_cache(
            CacheConfig::new()
                .encrypt(CacheLimits::new(Duration::from_secs(60), 100, 1 << 20))
                .decrypt(CacheLimits::new(Duration::from_secs(60), 100, 1 << 20)),
        )
        .build()
        .unwrap();
    let env = Envelope::new(keyring).as_caller("lab-service", "treatment");
    let ctx = ctx_with_phi();
    for _ in 0..3 {
        let sealed = env.seal(PLAINTEXT, &ctx).await.unwrap();
        assert_eq!(env.open(&sealed, &ctx).await.unwrap(), PLAINTEXT);
    }
    let mut w = env.encryptor(Vec::new(), &ctx).await.unwrap();
    w.write_all(PLAINTEXT).unwrap();
    let streamed = w.finish().unwrap();
    let mut d = env.decryptor(&streamed[..], &ctx).await.unwrap();
    let mut out = Vec::new();
    d.read_to_end(&mut out).unwrap();
    let _ = env.open(&streamed, &EncryptionContext::new()).await;

    let deks = spy.deks();
    assert!(!deks.is_empty(), "the spy saw no DEK");
    let mut secrets: Vec<&[u8]> = deks.iter().map(Vec::as_slice).collect();
    secrets.push(&fingerprint_key);
    secrets.extend(CONTEXT_VALUES);
    secrets.push(PLAINTEXT);

    assert_debug_clean("Envelope", &env, &secrets);
    assert_debug_clean("Keyring", env.keyring(), &secrets);
    assert_debug_clean("CacheStats", &env.keyring().cache_stats(), &secrets);
    assert_debug_clean("Decryptor", &d, &secrets);
    let events = sink.events();
    assert!(events.len() >= 3);
    for e in &events {
        assert_debug_clean("Event", e, &secrets);
    }
}

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------

/// Every variant prints (Display and Debug) without panicking, and none of
/// those the library builds from secret-bearing input repeats the secret.
#[tokio::test]
async fn errors_print_no_secrets() {
    let io = std::io::Error::other("disk on fire");
    let provider = ProviderError::new("vault", ProviderErrorKind::Unavailable, "down");
    let variants: Vec<Error> = vec![
        Error::Decrypt,
        Error::Truncated,
        Error::NotEnvelope,
        Error::UnsupportedVersion(9),
        Error::UnsupportedSuite(7),
        Error::Malformed("x"),
        Error::InvalidContext("x"),
        Error::InvalidAssociatedData("x"),
        Error::InvalidKeyRef {
            reference: "local:".into(),
            reason: "empty".into(),
        },
        Error::InvalidKeyLength { expected: 32 },
        Error::MessageTooLong,
        Error::Rng,
        Error::Provider(provider),
        Error::NoMatchingKey("local:k v1".into()),
        Error::PolicyDenied("no".into()),
        Error::Audit("full".into()),
        Error::KeyLifecycle("expired".into()),
        Error::InvalidArgument("bad".into()),
        Error::Keystore {
            path: "/k.json".into(),
            reason: "bad".into(),
        },
        Error::Io(io),
    ];
    for e in &variants {
        assert!(!format!("{e}").is_empty());
        assert!(!format!("{e:?}").is_empty());
        let _ = std::error::Error::source(e);
    }

    // A wrong context: the opaque error, whatever the context held.
    let (spy, key) = Spy::new("spy");
    let env = Envelope::new(
        Keyring::builder()
            .provider(spy.clone())
            .recipient(key)
            .build()
            .unwrap(),
    );
    let sealed = env.seal(PLAINTEXT, &ctx_with_phi()).await.unwrap();
    let wrong = EncryptionContext::from_pairs([("patient", "Jane Q. Roe 1970-01-01")]).unwrap();
    let e = env.open(&sealed, &wrong).await.unwrap_err();
    assert!(e.is_decrypt());
    let deks = spy.deks();
    let mut secrets: Vec<&[u8]> = deks.iter().map(Vec::as_slice).collect();
    secrets.extend(CONTEXT_VALUES);
    assert_clean("Error::Decrypt", &format!("{e} {e:?}"), &secrets);

    // A provider that is down.
    spy.inner
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = env.seal(PLAINTEXT, &ctx_with_phi()).await.unwrap_err();
    assert!(matches!(&e, Error::Provider(p) if p.kind() == ProviderErrorKind::Unavailable));
    assert_clean("ProviderError", &format!("{e} {e:?}"), &secrets);

    // A key length error does not echo the key.
    let short = secret(31, 0x66);
    let e = Dek::from_slice(&short).unwrap_err();
    assert_clean("InvalidKeyLength", &format!("{e} {e:?}"), &[&short]);
}

/// A `pkcs11:` key reference may not carry a PIN (`pin-value`), and the
/// error that refuses it must not repeat the PIN either: key references go
/// into configuration errors, logs and tickets.
#[test]
fn key_reference_errors_do_not_echo_a_pin() {
    let pin = "8675309-SO-PIN";
    for text in [
        format!("pkcs11:token=phi;object=kek?pin-value={pin}"),
        format!("pkcs11:token=phi;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value={pin}"),
        format!("pkcs11:object=kek;pin-value={pin}"),
    ] {
        let e = KeyRef::parse(&text).unwrap_err();
        assert_clean(
            "KeyRef::parse error for a URI with pin-value",
            &format!("{e} | {e:?}"),
            &[pin.as_bytes()],
        );
    }
}

// ---------------------------------------------------------------------------
// Providers and the audit log.
// ---------------------------------------------------------------------------

/// All runs of 64 hex digits in `text` (the KEKs of an unprotected keystore
/// file are stored that way).
fn hex_keys(text: &str) -> Vec<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let run = b[i..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if run == 64 {
            out.push(hex::decode(&text[i..i + 64]).unwrap());
        }
        i += run.max(1);
    }
    out
}

#[tokio::test]
async fn local_keystore_prints_no_key_and_no_passphrase() {
    use phi_envelope::provider::local::{LocalKeystore, SecretString};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let store = LocalKeystore::create_unprotected_for_tests(&path).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    store.add_key(&key).unwrap();
    store.rotate(&key).await.unwrap();
    let keks = hex_keys(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(
        keks.len(),
        2,
        "expected the two KEK versions in the test file"
    );
    let g = store.generate(&key, &ctx_with_phi()).await.unwrap();
    let dek = g.dek.expose_secret().to_vec();
    let mut secrets: Vec<&[u8]> = keks.iter().map(Vec::as_slice).collect();
    secrets.push(&dek);
    secrets.extend(CONTEXT_VALUES);
    assert_debug_clean("LocalKeystore", &store, &secrets);
    assert_debug_clean("GeneratedDek", &g, &secrets);
    assert_debug_clean("KeyInfo", &store.keys(), &secrets);

    // A protected keystore: the passphrase never shows, nor in errors.
    let passphrase = "correct horse battery staple 7731";
    let path = dir.path().join("protected.json");
    let store = LocalKeystore::create(&path, SecretString::from(passphrase)).unwrap();
    store.add_key(&key).unwrap();
    assert_debug_clean(
        "LocalKeystore (protected)",
        &store,
        &[passphrase.as_bytes()],
    );
    let wrong = "Tr0ub4dor&3 wrong passphrase";
    let e = LocalKeystore::open(&path, SecretString::from(wrong)).unwrap_err();
    assert_clean(
        "keystore error",
        &format!("{e} {e:?}"),
        &[wrong.as_bytes(), passphrase.as_bytes()],
    );
    let reopened = LocalKeystore::open(&path, SecretString::from(passphrase)).unwrap();
    assert_debug_clean(
        "LocalKeystore (reopened)",
        &reopened,
        &[passphrase.as_bytes()],
    );
}

#[test]
fn audit_key_and_log_print_no_key_and_log_no_context_values() {
    use phi_envelope::audit::{AuditKey, AuditLog};

    let key_bytes = secret(32, 0x77);
    let key = AuditKey::new(&key_bytes).unwrap();
    assert_debug_clean("AuditKey", &key, &[&key_bytes]);
    let verifier = phi_envelope::audit::Verifier::new().key(key.clone());
    assert_debug_clean("audit::Verifier", &verifier, &[&key_bytes]);
    let builder = AuditLog::builder().audit_key(key);
    assert_debug_clean("AuditLogBuilder", &builder, &[&key_bytes]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(builder.open(&path).unwrap());
    assert_debug_clean("AuditLog", &*log, &[&key_bytes]);

    // The log as a keyring's sink: what lands in the file.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (spy, kref) = Spy::new("spy");
    let env = Envelope::new(
        Keyring::builder()
            .provider(spy.clone())
            .recipient(kref)
            .event_sink(log.clone())
            .build()
            .unwrap(),
    )
    .as_caller("lab", "treatment");
    rt.block_on(async {
        let sealed = env.seal(PLAINTEXT, &ctx_with_phi()).await.unwrap();
        env.open(&sealed, &ctx_with_phi()).await.unwrap();
        let _ = env.open(&sealed, &EncryptionContext::new()).await;
    });
    let deks = spy.deks();
    let mut secrets: Vec<&[u8]> = deks.iter().map(Vec::as_slice).collect();
    secrets.extend(CONTEXT_VALUES);
    secrets.push(&key_bytes);
    secrets.push(PLAINTEXT);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().count() >= 4, "{text}");
    assert_clean("audit log file", &text, &secrets);
    assert_debug_clean("AuditLog", &*log, &secrets);
}

#[cfg(feature = "pkcs11")]
#[test]
fn pkcs11_pin_and_config_print_no_pin() {
    use phi_envelope::provider::local::SecretString;
    use phi_envelope::provider::pkcs11::{Pin, Pkcs11Config};

    let pin = "4711-0815-USER-PIN";
    let p = Pin::new(SecretString::from(pin));
    assert_eq!(format!("{p:?}"), "Pin(<redacted>)");
    assert_not_impl!(Pin: Clone, std::fmt::Display, serde::Serialize);
    let config = Pkcs11Config::new("/usr/lib/softhsm/libsofthsm2.so", "phi", p);
    assert_debug_clean("Pkcs11Config", &config, &[pin.as_bytes()]);

    // From the environment and from a file: the value never shows, in the
    // PIN or in the errors.
    let var = "PHI_SECRET_HYGIENE_TEST_PIN";
    std::env::set_var(var, pin);
    let p = Pin::from_env(var).unwrap();
    assert_debug_clean("Pin::from_env", &p, &[pin.as_bytes()]);
    std::env::remove_var(var);
    let e = Pin::from_env(var).unwrap_err();
    assert!(format!("{e}").contains(var));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pin");
    std::fs::write(&file, format!("{pin}\n")).unwrap();
    let p = Pin::from_file(&file).unwrap();
    assert_debug_clean("Pin::from_file", &p, &[pin.as_bytes()]);
    let bad = dir.path().join("bad-pin");
    let mut not_utf8 = pin.as_bytes().to_vec();
    not_utf8.push(0xff);
    std::fs::write(&bad, &not_utf8).unwrap();
    let e = Pin::from_file(&bad).unwrap_err();
    assert_clean(
        "Pin::from_file error",
        &format!("{e} {e:?}"),
        &[pin.as_bytes()],
    );

    // A configuration from a URI whose pin-source file holds the PIN.
    let uri = format!(
        "pkcs11:token=phi;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source={}",
        file.display()
    );
    let config = Pkcs11Config::from_uri(&uri, None).unwrap();
    assert_debug_clean("Pkcs11Config::from_uri", &config, &[pin.as_bytes()]);
}

#[cfg(feature = "aws-kms")]
#[test]
fn aws_kms_config_and_provider_print_no_context_key() {
    use phi_envelope::provider::aws_kms::{AwsKmsConfig, AwsKmsProvider};

    let key = secret(32, 0x88);
    let old = secret(32, 0x99);
    let config = AwsKmsConfig::new(&key)
        .unwrap()
        .previous_context_key(&old)
        .unwrap();
    assert_debug_clean("AwsKmsConfig", &config, &[&key, &old]);
    let short = secret(16, 0xaa);
    let e = AwsKmsConfig::new(&short).unwrap_err();
    assert_clean("AwsKmsConfig error", &format!("{e} {e:?}"), &[&short]);

    let access_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY-HYGIENE-TEST";
    let credentials = aws_sdk_kms::config::Credentials::new(
        "AKIDHYGIENETEST00001",
        access_secret,
        None,
        None,
        "secret-hygiene",
    );
    let sdk = aws_config::SdkConfig::builder()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(
            credentials,
        ))
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let provider = AwsKmsProvider::new(&sdk, config).unwrap();
    assert_debug_clean(
        "AwsKmsProvider",
        &provider,
        &[&key, &old, access_secret.as_bytes()],
    );
    // What reaches KMS carries no context value either.
    let sent = provider.kms_encryption_context(&ctx_with_phi());
    assert_debug_clean("kms_encryption_context", &sent, &CONTEXT_VALUES);
}

// ---------------------------------------------------------------------------
// Failed chunks are never readable.
// ---------------------------------------------------------------------------

/// A three-chunk body whose middle chunk is corrupted: the streaming reader
/// releases the first chunk and not one byte of the second, leaves the
/// caller's buffer untouched on failure, and fails on every later read; the
/// seeking reader refuses the corrupted chunk, and after that every read,
/// even of a good chunk; the one-shot decoder returns nothing.
#[test]
fn a_chunk_that_failed_is_never_readable() {
    let key = dek_bytes();
    let pt: Vec<u8> = (0..2 * 16384 + 500).map(|i| (i % 251) as u8).collect();
    let mut body = cobblestone::encrypt(&key, b"ctx", &pt).unwrap();
    let chunk1 = cobblestone::PREFIX_LEN + cobblestone::CHUNK_CT_SIZE;
    body[chunk1 + 100] ^= 0x01;

    assert!(cobblestone::decrypt(&key, b"ctx", &body)
        .unwrap_err()
        .is_decrypt());

    let mut d = cobblestone::Decryptor::new(&key, b"ctx", &body[..]).unwrap();
    let mut got = Vec::new();
    let mut buf = [0xEEu8; 7];
    let err = loop {
        match d.read(&mut buf) {
            Ok(0) => panic!("a corrupted stream ended cleanly"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(got, pt[..16384], "exactly the first chunk is released");
    assert!(Error::from(err).is_decrypt());
    for _ in 0..3 {
        let mut probe = [0xEEu8; 64];
        assert!(d.read(&mut probe).is_err(), "a failed stream reads again");
        assert_eq!(
            probe, [0xEE; 64],
            "a failed read wrote into the caller's buffer"
        );
    }

    let mut s = cobblestone::SeekableDecryptor::new(&key, b"ctx", Cursor::new(&body)).unwrap();
    let mut probe = [0xEEu8; 64];
    s.seek(SeekFrom::Start(16384 + 10)).unwrap();
    assert!(s.read(&mut probe).is_err(), "the corrupted chunk was read");
    assert_eq!(
        probe, [0xEE; 64],
        "a failed read wrote into the caller's buffer"
    );
    s.seek(SeekFrom::Start(0)).unwrap();
    assert!(
        s.read(&mut probe).is_err(),
        "a failed seekable reader reads again"
    );
    assert_eq!(probe, [0xEE; 64]);
}

#[tokio::test]
async fn custodian_keys_print_no_seed_nor_do_dual_control_errors_and_events() {
    use phi_envelope::approval::{CustodianKey, DualControl, GuardedOperation};

    let seed: [u8; 32] = secret(32, 0x31).try_into().unwrap();
    let key = CustodianKey::from_seed("alice", &seed).unwrap();
    assert_debug_clean("CustodianKey", &key, &[&seed]);
    assert_not_impl!(CustodianKey: Clone, std::fmt::Display, serde::Serialize);
    let kref: KeyRef = "spy:records".parse().unwrap();
    let approval = key
        .approve(
            GuardedOperation::Destroy,
            &kref,
            1,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
    assert_debug_clean("Approval", &approval, &[&seed]);
    assert_clean("Approval::to_json", &approval.to_json(), &[&seed]);
    let dual = DualControl::new(vec![key.custodian()], 1).unwrap();
    assert_debug_clean("DualControl", &dual, &[&seed]);

    let sink = Arc::new(MemorySink::new());
    let (spy, _) = Spy::new("spy");
    let keyring = Keyring::builder()
        .provider(spy)
        .event_sink(sink.clone())
        .dual_control(dual)
        .build()
        .unwrap();
    assert_debug_clean("Keyring under dual control", &keyring, &[&seed]);
    let caller = phi_envelope::Caller::new("ops", "retire");
    let mut tampered = approval.clone();
    tampered.signature[0] ^= 1;
    let err = keyring
        .destroy_approved(&kref, 1, &caller, &[tampered])
        .await
        .unwrap_err();
    assert_clean("dual-control error", &err.to_string(), &[&seed]);
    for e in sink.take() {
        assert_clean("dual-control event", &e.to_json(), &[&seed]);
    }
}
