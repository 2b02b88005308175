//! Rewrap without re-encrypting: records, batches and files, for the
//! in-memory user-style provider and the local keystore. A rewrapped message
//! has only the new entries, keeps its body byte for byte, and opens after
//! the old version is destroyed; a file rewrap that fails at any step leaves
//! the old file valid and no temporary file behind.

mod conformance;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use conformance::{bytes, ctx, MemoryKms};
use phi_envelope::events::{MemorySink, Operation, Outcome};
use phi_envelope::keyring::KeyringBuilder;
use phi_envelope::provider::local::LocalKeystore;
use phi_envelope::provider::{BoxFuture, KeyInfo, KeyProvider, ProviderErrorKind, Unwrapped};
use phi_envelope::rewrap::RecordRewrap;
use phi_envelope::{Caller, EncryptionContext, Envelope, Error, Header, KeyRef, Keyring};

struct Fixture {
    provider: Arc<dyn KeyProvider>,
    key: KeyRef,
    other: KeyRef,
    memory: Option<Arc<MemoryKms>>,
    dir: tempfile::TempDir,
}

fn memory_fixture() -> Fixture {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let other = kms.add_key("archive");
    Fixture {
        provider: kms.clone(),
        key,
        other,
        memory: Some(kms),
        dir: tempfile::tempdir().unwrap(),
    }
}

fn local_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json")).unwrap();
    let key: KeyRef = "local:records".parse().unwrap();
    let other: KeyRef = "local:archive".parse().unwrap();
    store.add_key(&key).unwrap();
    store.add_key(&other).unwrap();
    Fixture {
        provider: Arc::new(store),
        key,
        other,
        memory: None,
        dir,
    }
}

impl Fixture {
    fn builder(&self) -> KeyringBuilder {
        Keyring::builder()
            .provider(self.provider.clone())
            .recipient(self.key.clone())
    }

    fn envelope(&self) -> Envelope {
        Envelope::new(self.builder().build().unwrap()).as_caller("backup-operator", "rewrap")
    }

    fn memory(&self) -> &MemoryKms {
        self.memory.as_deref().expect("an in-memory provider case")
    }

    /// Files in the test directory other than the keystore's (file, lock,
    /// temporary files).
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("keys.json") && !n.starts_with(".keys.json"))
            .collect();
        names.sort();
        names
    }
}

fn operator() -> Caller {
    Caller::new("alice", "rotation")
}

fn entries(message: &[u8]) -> Vec<(String, u32)> {
    let (h, _) = Header::parse(message).unwrap();
    h.recipients()
        .iter()
        .map(|r| (r.key_ref.clone(), r.key_version))
        .collect()
}

fn body(message: &[u8]) -> &[u8] {
    let (_, used) = Header::parse(message).unwrap();
    &message[used..]
}

fn kind(e: &Error) -> Option<ProviderErrorKind> {
    match e {
        Error::Provider(p) => Some(p.kind()),
        _ => None,
    }
}

macro_rules! both_providers {
    ($($case:ident),* $(,)?) => {
        mod memory_provider {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::memory_fixture()).await
                }
            )*
        }
        mod local_keystore {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::local_fixture()).await
                }
            )*
        }
    };
}

both_providers!(
    record_rewrap_moves_to_the_new_primary_and_survives_the_old_one,
    record_rewrap_to_a_new_recipient_set,
    batch_rewrap_gives_a_result_per_record,
    file_rewrap_is_atomic_and_keeps_the_body,
    file_rewrap_with_the_wrong_context_changes_nothing,
    file_rewrap_refuses_symlinks_and_truncated_files,
);

async fn record_rewrap_moves_to_the_new_primary_and_survives_the_old_one(f: Fixture) {
    let env = f.envelope();
    let c = ctx("1");
    let old = env.seal(&bytes(40_000, 3), &c).await.unwrap();
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let new = env.rewrap(&old, &c).await.unwrap();
    assert_eq!(
        entries(&new),
        [(f.key.to_string(), 2)],
        "old entries are gone"
    );
    assert_eq!(body(&new), body(&old), "body byte for byte");
    assert_eq!(env.open(&new, &c).await.unwrap(), bytes(40_000, 3));
    // The context is still required.
    assert!(env.rewrap(&old, &ctx("2")).await.unwrap_err().is_decrypt());

    env.keyring().disable(&f.key, 1, &operator()).await.unwrap();
    env.keyring().destroy(&f.key, 1, &operator()).await.unwrap();
    assert_eq!(env.open(&new, &c).await.unwrap(), bytes(40_000, 3));
    let e = env.open(&old, &c).await.unwrap_err();
    assert_eq!(kind(&e), Some(ProviderErrorKind::KeyDestroyed), "{e:?}");
    // And a rewrap of the old copy is no longer possible.
    let e = env.rewrap(&old, &c).await.unwrap_err();
    assert_eq!(kind(&e), Some(ProviderErrorKind::KeyDestroyed), "{e:?}");
}

async fn record_rewrap_to_a_new_recipient_set(f: Fixture) {
    let env = f.envelope();
    let c = ctx("1");
    let old = env.seal(b"moving keys", &c).await.unwrap();
    let both = env.to_recipients([f.other.clone(), f.key.clone()]);
    let new = both.rewrap(&old, &c).await.unwrap();
    assert_eq!(
        entries(&new),
        [(f.other.to_string(), 1), (f.key.to_string(), 1)]
    );
    assert_eq!(body(&new), body(&old));
    // Opens with the new recipient alone.
    let archive_only = env.to_recipients([f.other.clone()]);
    let moved = archive_only.rewrap(&new, &c).await.unwrap();
    assert_eq!(entries(&moved), [(f.other.to_string(), 1)]);
    assert_eq!(env.open(&moved, &c).await.unwrap(), b"moving keys");
}

async fn batch_rewrap_gives_a_result_per_record(f: Fixture) {
    use phi_envelope::cache::CacheConfig;
    let sink = Arc::new(MemorySink::new());
    let env = Envelope::new(
        f.builder()
            .event_sink(sink.clone())
            .data_key_cache(CacheConfig::new().decrypt(None))
            .build()
            .unwrap(),
    )
    .as_caller("backup-operator", "rewrap");
    // 20 records with their own contexts, 30 sharing one (one cached DEK).
    let own: Vec<EncryptionContext> = (0..20).map(|i| ctx(&format!("own-{i}"))).collect();
    let shared = ctx("shared");
    let mut items: Vec<(Vec<u8>, EncryptionContext)> = Vec::new();
    for (i, c) in own.iter().enumerate() {
        items.push((env.seal(&bytes(100 + i, 1), c).await.unwrap(), c.clone()));
    }
    for i in 0..30 {
        items.push((
            env.seal(&bytes(200 + i, 2), &shared).await.unwrap(),
            shared.clone(),
        ));
    }
    // One with the wrong context, one malformed, one truncated.
    let wrong = (items[0].0.clone(), ctx("wrong"));
    items.push(wrong);
    items.push((b"not an envelope message".to_vec(), shared.clone()));
    let mut cut = items[1].0.clone();
    cut.truncate(20); // inside the header
    items.push((cut, own[1].clone()));

    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    sink.take();
    let calls = env.keyring().provider_calls();
    let refs: Vec<(&[u8], &EncryptionContext)> =
        items.iter().map(|(m, c)| (m.as_slice(), c)).collect();
    let results = env.rewrap_batch_with(&refs, 4).await;
    assert_eq!(results.len(), items.len());
    // 20 own headers + 1 shared + 1 wrong context = 22 groups: one unwrap
    // each, one wrap for each of the 21 that unwrapped.
    assert_eq!(env.keyring().provider_calls() - calls, 22 + 21);
    for (i, r) in results.iter().enumerate().take(50) {
        let new = r.rewrapped().unwrap();
        assert_eq!(entries(new), [(f.key.to_string(), 2)]);
        assert_eq!(body(new), body(&items[i].0));
        let pt = env.open(new, &items[i].1).await.unwrap();
        let want = if i < 20 {
            bytes(100 + i, 1)
        } else {
            bytes(200 + i - 20, 2)
        };
        assert_eq!(pt, want);
    }
    assert!(results[50].error().unwrap().is_decrypt());
    assert!(matches!(
        results[51],
        RecordRewrap::Failed(Error::NotEnvelope)
    ));
    assert!(matches!(
        results[52],
        RecordRewrap::Failed(Error::Truncated)
    ));
    // Every rewrapped record has its own rewrap event, and the rewrap that
    // failed (wrong context) is recorded as failed; the malformed inputs
    // never reached the keyring.
    let events = sink.events();
    let rewraps = |ok: bool| {
        events
            .iter()
            .filter(|e| e.operation == Operation::Rewrap && (e.outcome == Outcome::Success) == ok)
            .count()
    };
    assert_eq!(rewraps(true), 50);
    assert_eq!(rewraps(false), 1);
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
}

async fn file_rewrap_is_atomic_and_keeps_the_body(f: Fixture) {
    let env = f.envelope();
    let c = ctx("backup-2026-11-25");
    let plaintext = bytes(3 * 16_384 + 123, 5);
    let path = f.dir.path().join("backup.phi");
    let mut w = env.encryptor(Vec::new(), &c).await.unwrap();
    std::io::Write::write_all(&mut w, &plaintext).unwrap();
    let sealed = w.finish().unwrap();
    write(&path, &sealed);

    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let report = env.rewrap_file(&path, &c).await.unwrap();
    assert!(report.changed);
    assert_eq!(report.path, path);
    assert_eq!(report.old_header.recipients()[0].key_version, 1);
    assert_eq!(report.new_header.recipients()[0].key_version, 2);
    assert_eq!(report.body_len, body(&sealed).len() as u64);
    let now = std::fs::read(&path).unwrap();
    assert_eq!(entries(&now), [(f.key.to_string(), 2)]);
    assert_eq!(body(&now), body(&sealed), "body copied byte for byte");
    assert_eq!(f.files(), ["backup.phi"], "no temporary file left");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "permissions kept");
    }
    // Already current: not rewritten, no provider call but a describe.
    let calls = env.keyring().provider_calls();
    let again = env.rewrap_file(&path, &c).await.unwrap();
    assert!(!again.changed);
    assert!(env.keyring().provider_calls() - calls <= 1);
    assert_eq!(std::fs::read(&path).unwrap(), now);

    // Shred version 1: the file still opens, a copy of the old one does not.
    env.keyring().disable(&f.key, 1, &operator()).await.unwrap();
    env.keyring().destroy(&f.key, 1, &operator()).await.unwrap();
    let mut r = env
        .decryptor(std::fs::File::open(&path).unwrap(), &c)
        .await
        .unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut out).unwrap();
    assert_eq!(out, plaintext);
    assert_eq!(
        kind(&env.open(&sealed, &c).await.unwrap_err()),
        Some(ProviderErrorKind::KeyDestroyed)
    );
}

async fn file_rewrap_with_the_wrong_context_changes_nothing(f: Fixture) {
    let env = f.envelope();
    let path = f.dir.path().join("backup.phi");
    let sealed = env.seal(&bytes(50_000, 9), &ctx("right")).await.unwrap();
    write(&path, &sealed);
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let e = env.rewrap_file(&path, &ctx("wrong")).await.unwrap_err();
    assert!(e.is_decrypt(), "{e:?}");
    assert_eq!(std::fs::read(&path).unwrap(), sealed);
    assert_eq!(f.files(), ["backup.phi"]);
}

async fn file_rewrap_refuses_symlinks_and_truncated_files(f: Fixture) {
    let env = f.envelope();
    let c = ctx("1");
    let path = f.dir.path().join("backup.phi");
    let sealed = env.seal(&bytes(20_000, 1), &c).await.unwrap();
    write(&path, &sealed[..10]); // cut inside the header
    let calls = env.keyring().provider_calls();
    assert!(matches!(
        env.rewrap_file(&path, &c).await.unwrap_err(),
        Error::Truncated
    ));
    assert_eq!(
        env.keyring().provider_calls(),
        calls,
        "refused before any call"
    );
    write(&path, &sealed);
    #[cfg(unix)]
    {
        let link = f.dir.path().join("link.phi");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            env.rewrap_file(&link, &c).await.unwrap_err(),
            Error::InvalidArgument(_)
        ));
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }
    assert_eq!(std::fs::read(&path).unwrap(), sealed);
}

// ---------------------------------------------------------------------------
// Crash safety with fault injection: the in-memory provider.
// ---------------------------------------------------------------------------

/// Rewraps a sealed file with the provider failing after `ok_calls` more
/// calls; the file must be unchanged, still open, and alone in its directory.
async fn rewrap_file_failing_after(ok_calls: usize) -> Error {
    let f = memory_fixture();
    let env = f.envelope();
    let c = ctx("nightly");
    let path = f.dir.path().join("backup.phi");
    let sealed = env.seal(&bytes(70_000, 4), &c).await.unwrap();
    write(&path, &sealed);
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let m = f.memory();
    if ok_calls == 0 {
        m.down.store(true, Ordering::SeqCst);
    } else {
        m.down_after_calls
            .store(m.calls.load(Ordering::SeqCst) + ok_calls, Ordering::SeqCst);
    }
    let e = env.rewrap_file(&path, &c).await.unwrap_err();
    assert_eq!(std::fs::read(&path).unwrap(), sealed, "old file untouched");
    assert_eq!(f.files(), ["backup.phi"], "no temporary file left");
    m.down.store(false, Ordering::SeqCst);
    m.down_after_calls.store(0, Ordering::SeqCst);
    assert_eq!(env.open(&sealed, &c).await.unwrap(), bytes(70_000, 4));
    // And the rewrap succeeds once the provider is back.
    assert!(env.rewrap_file(&path, &c).await.unwrap().changed);
    assert_eq!(
        env.open(&std::fs::read(&path).unwrap(), &c).await.unwrap(),
        bytes(70_000, 4)
    );
    e
}

#[tokio::test]
async fn file_rewrap_with_the_provider_down_leaves_the_old_file() {
    let e = rewrap_file_failing_after(0).await;
    assert_eq!(kind(&e), Some(ProviderErrorKind::Unavailable), "{e:?}");
}

#[tokio::test]
async fn file_rewrap_failing_after_the_new_wrap_leaves_the_old_file() {
    // Unwrap and wrap succeed; the verification unwrap of the new header
    // fails: nothing is committed.
    let e = rewrap_file_failing_after(2).await;
    assert_eq!(kind(&e), Some(ProviderErrorKind::Unavailable), "{e:?}");
}

#[tokio::test]
async fn file_rewrap_verifies_every_new_recipient() {
    // Rewrapping to two recipients where the second provider is down after
    // wrapping: the new header is not committed.
    let f = memory_fixture();
    let dr = Arc::new(MemoryKms::new("dr"));
    let dr_key = dr.add_key("offsite");
    let env = Envelope::new(f.builder().provider(dr.clone()).build().unwrap());
    let c = ctx("1");
    let path = f.dir.path().join("backup.phi");
    let sealed = env.seal(&bytes(1000, 1), &c).await.unwrap();
    write(&path, &sealed);
    let both = env.to_recipients([f.key.clone(), dr_key]);
    // dr: one wrap, then down for the verification.
    dr.down_after_calls.store(1, Ordering::SeqCst);
    let e = both.rewrap_file(&path, &c).await.unwrap_err();
    assert_eq!(kind(&e), Some(ProviderErrorKind::Unavailable), "{e:?}");
    assert_eq!(std::fs::read(&path).unwrap(), sealed);
    dr.down_after_calls.store(0, Ordering::SeqCst);
    let report = both.rewrap_file(&path, &c).await.unwrap();
    assert_eq!(report.new_header.recipients().len(), 2);
    // The DR key alone opens it.
    let dr_only = Envelope::new(Keyring::builder().provider(dr).build().unwrap());
    assert_eq!(
        dr_only
            .open(&std::fs::read(&path).unwrap(), &c)
            .await
            .unwrap(),
        bytes(1000, 1)
    );
}

#[tokio::test]
async fn a_file_changed_after_prepare_is_not_overwritten() {
    let f = memory_fixture();
    let env = f.envelope();
    let c = ctx("1");
    let path = f.dir.path().join("backup.phi");
    let sealed = env.seal(&bytes(5000, 1), &c).await.unwrap();
    write(&path, &sealed);
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let prepared = env.prepare_rewrap_file(&path, &c).await.unwrap();
    assert!(!prepared.is_current());
    let other = env.seal(&bytes(6000, 2), &c).await.unwrap();
    write(&path, &other);
    assert!(prepared.commit().is_err());
    assert_eq!(std::fs::read(&path).unwrap(), other);
    assert_eq!(f.files(), ["backup.phi"]);
}

#[tokio::test]
async fn batch_rewrap_of_cache_sealed_records_costs_two_calls() {
    use phi_envelope::cache::CacheConfig;
    let f = memory_fixture();
    let env = Envelope::new(
        f.builder()
            .data_key_cache(CacheConfig::new())
            .build()
            .unwrap(),
    );
    let c = ctx("ward-7");
    let mut sealed = Vec::new();
    for i in 0..1000 {
        sealed.push(env.seal(&bytes(i, 3), &c).await.unwrap());
    }
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    let before = f.memory().calls.load(Ordering::SeqCst);
    let items: Vec<(&[u8], &EncryptionContext)> =
        sealed.iter().map(|m| (m.as_slice(), &c)).collect();
    let results = env.rewrap_batch(&items).await;
    assert_eq!(
        f.memory().calls.load(Ordering::SeqCst) - before,
        2,
        "one unwrap and one wrap for 1000 records sharing a DEK"
    );
    for (i, r) in results.into_iter().enumerate().step_by(97) {
        let new = r.into_result().unwrap().unwrap();
        assert_eq!(entries(&new)[0].1, 2);
        assert_eq!(env.open(&new, &c).await.unwrap(), bytes(i, 3));
    }
}

#[tokio::test]
async fn batch_rewrap_with_the_provider_down_fails_each_record_clearly() {
    let f = memory_fixture();
    let env = f.envelope();
    let c = ctx("1");
    let a = env.seal(b"a", &c).await.unwrap();
    let b = env.seal(b"b", &c).await.unwrap();
    // Under v1 while v2 is primary: they need a rewrap (current records
    // would be left alone without a provider call).
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    f.memory().down.store(true, Ordering::SeqCst);
    let results = env.rewrap_batch(&[(&a, &c), (&b, &c), (&a, &c)]).await;
    assert_eq!(results.len(), 3);
    for r in results {
        assert_eq!(
            kind(&r.into_result().unwrap_err()),
            Some(ProviderErrorKind::Unavailable)
        );
    }
}

// ---------------------------------------------------------------------------
// Rewrap re-encrypts only the entry that verified, and checks what it built.
// ---------------------------------------------------------------------------

/// The in-memory provider with a provider-side rewrap, the way AWS KMS
/// ReEncrypt works: `rewrap` decrypts the entry it is handed and encrypts
/// the result under the destination key, without the DEK leaving the
/// provider. Counts the rewraps it was asked for.
#[derive(Debug)]
struct Reencrypting {
    inner: Arc<MemoryKms>,
    rewraps: std::sync::atomic::AtomicUsize,
    /// When set, `rewrap` returns its entry under another provider's id (a
    /// provider bug the keyring must catch).
    mislabel: std::sync::atomic::AtomicBool,
}

impl Reencrypting {
    fn new(inner: Arc<MemoryKms>) -> Arc<Reencrypting> {
        Arc::new(Reencrypting {
            inner,
            rewraps: std::sync::atomic::AtomicUsize::new(0),
            mislabel: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl KeyProvider for Reencrypting {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a phi_envelope::Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<phi_envelope::WrappedKey>> {
        self.inner.wrap(key, dek, context)
    }
    fn unwrap<'a>(
        &'a self,
        entry: &'a phi_envelope::WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Unwrapped>> {
        self.inner.unwrap(entry, context)
    }
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        self.inner.describe(key)
    }
    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        self.inner.rotate(key)
    }
    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: phi_envelope::provider::KeyState,
    ) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        self.inner.set_state(key, version, state)
    }
    fn destroy<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
    ) -> BoxFuture<'a, phi_envelope::Result<KeyInfo>> {
        self.inner.destroy(key, version)
    }
    fn supports_rewrap(&self) -> bool {
        true
    }
    fn rewrap<'a>(
        &'a self,
        entry: &'a phi_envelope::WrappedKey,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, phi_envelope::Result<Option<phi_envelope::WrappedKey>>> {
        Box::pin(async move {
            self.rewraps.fetch_add(1, Ordering::SeqCst);
            match self.inner.unwrap(entry, context).await? {
                Unwrapped::Key(dek) => {
                    let mut entry = self.inner.wrap(key, &dek, context).await?;
                    if self.mislabel.load(Ordering::SeqCst) {
                        entry.provider = "elsewhere".into();
                    }
                    Ok(Some(entry))
                }
                _ => Ok(None),
            }
        })
    }
}

/// A message with two entries under the same key: the first wraps a decoy
/// DEK (a valid wrapped key, but not the one of this message), the second
/// the DEK that keys the header tag and the body. It opens: the keyring
/// tries the first entry, its DEK fails the header tag, then the second.
async fn decoy_first_message(
    kms: &MemoryKms,
    key: &KeyRef,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Vec<u8> {
    use phi_envelope::message::SealingKey;
    use phi_envelope::Dek;
    let real = Dek::generate().unwrap();
    let decoy = Dek::generate().unwrap();
    let entries = vec![
        kms.wrap(key, &decoy, context).await.unwrap(),
        kms.wrap(key, &real, context).await.unwrap(),
    ];
    SealingKey::new(&real, entries)
        .unwrap()
        .seal(plaintext, context)
        .unwrap()
}

struct DecoyCase {
    kms: Arc<MemoryKms>,
    provider: Arc<Reencrypting>,
    key: KeyRef,
    env: Envelope,
    context: EncryptionContext,
    message: Vec<u8>,
}

async fn decoy_case() -> DecoyCase {
    let kms = Arc::new(MemoryKms::new("mem"));
    let key = kms.add_key("records");
    let provider = Reencrypting::new(kms.clone());
    let env = Envelope::new(
        Keyring::builder()
            .provider(provider.clone())
            .recipient(key.clone())
            .build()
            .unwrap(),
    )
    .as_caller("backup-operator", "rewrap");
    let context = ctx("decoy");
    let message = decoy_first_message(&kms, &key, &context, b"potassium 4.1").await;
    assert_eq!(
        env.open(&message, &context).await.unwrap(),
        b"potassium 4.1",
        "the crafted message opens before any rewrap"
    );
    env.keyring().rotate(&key, &operator()).await.unwrap();
    DecoyCase {
        kms,
        provider,
        key,
        env,
        context,
        message,
    }
}

impl DecoyCase {
    /// The rewrapped message opens, under the new primary, and the
    /// provider re-encrypted one entry (the one that verified).
    async fn check(&self, rewrapped: &[u8]) {
        assert_eq!(entries(rewrapped), [(self.key.to_string(), 2)]);
        assert_eq!(body(rewrapped), body(&self.message));
        assert_eq!(
            self.env.open(rewrapped, &self.context).await.unwrap(),
            b"potassium 4.1",
            "a message that opened before the rewrap opens after it"
        );
        assert_eq!(self.provider.rewraps.load(Ordering::SeqCst), 1);
        // And it survives the shredding of version 1.
        self.env
            .keyring()
            .disable(&self.key, 1, &operator())
            .await
            .unwrap();
        self.env
            .keyring()
            .destroy(&self.key, 1, &operator())
            .await
            .unwrap();
        assert_eq!(
            self.env.open(rewrapped, &self.context).await.unwrap(),
            b"potassium 4.1"
        );
        let _ = &self.kms;
    }
}

#[tokio::test]
async fn record_rewrap_reencrypts_the_entry_that_verified() {
    let case = decoy_case().await;
    let new = case.env.rewrap(&case.message, &case.context).await.unwrap();
    case.check(&new).await;
}

#[tokio::test]
async fn header_rewrap_reencrypts_the_entry_that_verified() {
    let case = decoy_case().await;
    let (header, used) = Header::parse(&case.message).unwrap();
    let new = case
        .env
        .rewrap_header(&header, &case.context)
        .await
        .unwrap();
    let mut out = new.as_bytes().to_vec();
    out.extend_from_slice(&case.message[used..]);
    case.check(&out).await;
}

#[tokio::test]
async fn batch_rewrap_reencrypts_the_entry_that_verified() {
    let case = decoy_case().await;
    let results = case
        .env
        .rewrap_batch(&[(&case.message, &case.context)])
        .await;
    let new = results.into_iter().next().unwrap().into_result().unwrap();
    let new = new.expect("rewrapped, not current");
    case.check(&new).await;
}

#[tokio::test]
async fn a_rewrapped_header_that_fails_its_check_is_not_returned() {
    let case = decoy_case().await;
    case.provider.mislabel.store(true, Ordering::SeqCst);
    let e = case
        .env
        .rewrap(&case.message, &case.context)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing was rewrapped"), "{e}");
    let report = case
        .env
        .rewrap_batch(&[(&case.message, &case.context)])
        .await;
    assert!(report[0].error().is_some(), "{report:?}");
    // The original still opens.
    assert_eq!(
        case.env.open(&case.message, &case.context).await.unwrap(),
        b"potassium 4.1"
    );
}

#[tokio::test]
async fn file_rewrap_of_the_crafted_message_succeeds() {
    // rewrap_file checked its result already (and refused); now it
    // succeeds, since the header it is given is right.
    let case = decoy_case().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("record.phi");
    write(&path, &case.message);
    let report = case.env.rewrap_file(&path, &case.context).await.unwrap();
    assert!(report.changed);
    case.check(&std::fs::read(&path).unwrap()).await;
}

#[tokio::test]
async fn batch_rewrap_of_current_records_calls_no_provider() {
    let f = memory_fixture();
    let env = f.envelope();
    let mut items: Vec<(Vec<u8>, EncryptionContext)> = Vec::new();
    for i in 0..6 {
        let c = ctx(&format!("stale-{i}"));
        items.push((env.seal(&bytes(100 + i, 1), &c).await.unwrap(), c));
    }
    env.keyring().rotate(&f.key, &operator()).await.unwrap();
    // Interleave: even items were sealed under v1, odd ones under v2.
    for i in 0..6 {
        let c = ctx(&format!("current-{i}"));
        let sealed = env.seal(&bytes(200 + i, 2), &c).await.unwrap();
        items.insert(2 * i + 1, (sealed, c));
    }
    let keyring_calls = env.keyring().provider_calls();
    let memory_calls = f.memory().calls.load(Ordering::SeqCst);
    let refs: Vec<(&[u8], &EncryptionContext)> =
        items.iter().map(|(m, c)| (m.as_slice(), c)).collect();
    let results = env.rewrap_batch(&refs).await;
    assert_eq!(results.len(), 12);
    // One unwrap and one wrap per stale record; nothing for the current
    // ones (the primary version is known from the rotation just made).
    assert_eq!(env.keyring().provider_calls() - keyring_calls, 2 * 6);
    assert_eq!(
        f.memory().calls.load(Ordering::SeqCst) - memory_calls,
        2 * 6
    );
    for (i, r) in results.iter().enumerate() {
        let (new, want) = if i % 2 == 0 {
            (
                r.rewrapped().expect("stale: rewrapped"),
                bytes(100 + i / 2, 1),
            )
        } else {
            assert!(r.is_unchanged(), "current: unchanged, {r:?}");
            (items[i].0.as_slice(), bytes(200 + i / 2, 2))
        };
        assert_eq!(entries(new), [(f.key.to_string(), 2)]);
        assert_eq!(env.open(new, &items[i].1).await.unwrap(), want);
    }
}
