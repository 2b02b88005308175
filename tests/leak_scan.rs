//! The leak scan: a workload through the public API (records, streams,
//! seeking, rewrap, wrong context, rotation, state changes, destruction,
//! policy denial, a provider down) with every sink the crate ships, then a
//! search of every event, every audit-log byte, every `tracing` line and
//! every error message for DEK bytes, KEK bytes, plaintext and encryption
//! context values (and keys). Nothing may be found.
//!
//! DEK and KEK bytes come from a test provider that records every DEK it
//! wraps or unwraps and whose KEKs the test knows.

mod conformance;

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use conformance::MemoryKms;
use phi_envelope::audit::{self, AuditKey, AuditLog};
use phi_envelope::events::{EventSink, FanOut, MemorySink};
use phi_envelope::policy::{Decision, FnPolicy};
use phi_envelope::provider::{
    BoxFuture, GeneratedDek, KeyInfo, KeyProvider, KeyRefKind, KeyState, KeyVersionInfo,
    ProviderError, ProviderErrorKind, Unwrapped,
};
use phi_envelope::{Caller, Dek, EncryptionContext, Envelope, KeyRef, Keyring, Result, WrappedKey};

/// Every secret byte string the workload handled.
#[derive(Default)]
struct Secrets {
    deks: Mutex<Vec<[u8; 32]>>,
    keks: Mutex<Vec<[u8; 32]>>,
}

impl Secrets {
    fn dek(&self, dek: &Dek) {
        let bytes = *dek.expose_secret();
        let mut deks = self.deks.lock().unwrap();
        if !deks.contains(&bytes) {
            deks.push(bytes);
        }
    }
}

/// A key's versions: KEK bytes and state.
type Versions = Vec<([u8; 32], KeyState)>;

/// A provider with KEKs the test knows, full lifecycle support, and a
/// record of every DEK it saw.
struct KnownKms {
    id: String,
    keys: Mutex<BTreeMap<String, Versions>>,
    secrets: Arc<Secrets>,
    down: AtomicBool,
}

impl std::fmt::Debug for KnownKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnownKms").field("id", &self.id).finish()
    }
}

fn random32() -> [u8; 32] {
    *Dek::generate().unwrap().expose_secret()
}

fn perr(id: &str, kind: ProviderErrorKind, msg: &str) -> phi_envelope::Error {
    ProviderError::new(id, kind, msg).into()
}

impl KnownKms {
    fn new(id: &str, secrets: Arc<Secrets>) -> Self {
        KnownKms {
            id: id.into(),
            keys: Mutex::default(),
            secrets,
            down: AtomicBool::new(false),
        }
    }

    fn name_of(&self, key: &KeyRef) -> Option<String> {
        match key.kind() {
            KeyRefKind::Custom { scheme, rest } if scheme == &self.id => Some(rest.clone()),
            _ => None,
        }
    }

    fn new_kek(&self) -> [u8; 32] {
        let k = random32();
        self.secrets.keks.lock().unwrap().push(k);
        k
    }

    fn aad(key: &str, version: u32, ctx: &EncryptionContext) -> Vec<u8> {
        let mut aad = key.as_bytes().to_vec();
        aad.push(0);
        aad.extend_from_slice(&version.to_be_bytes());
        aad.extend_from_slice(&ctx.canonical_pairs());
        aad
    }

    fn info(&self, key: &KeyRef) -> Result<KeyInfo> {
        let name = self
            .name_of(key)
            .ok_or_else(|| perr(&self.id, ProviderErrorKind::KeyNotFound, "not my key"))?;
        let keys = self.keys.lock().unwrap();
        let versions = keys
            .get(&name)
            .ok_or_else(|| perr(&self.id, ProviderErrorKind::KeyNotFound, "no such key"))?;
        let infos: Vec<KeyVersionInfo> = versions
            .iter()
            .enumerate()
            .map(|(i, (_, s))| KeyVersionInfo::new(i as u32 + 1, *s, None))
            .collect();
        let primary = infos
            .iter()
            .rev()
            .find(|v| v.state == KeyState::Enabled)
            .map(|v| v.version);
        Ok(KeyInfo::new(key.clone(), primary, infos))
    }

    fn up(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(perr(
                &self.id,
                ProviderErrorKind::Unavailable,
                "down (simulated)",
            ));
        }
        Ok(())
    }
}

impl KeyProvider for KnownKms {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move {
            self.up()?;
            self.secrets.dek(dek);
            let name = self
                .name_of(key)
                .ok_or_else(|| perr(&self.id, ProviderErrorKind::KeyNotFound, "not my key"))?;
            let keys = self.keys.lock().unwrap();
            let versions = keys
                .get(&name)
                .ok_or_else(|| perr(&self.id, ProviderErrorKind::KeyNotFound, "no such key"))?;
            let (i, (kek, _)) = versions
                .iter()
                .enumerate()
                .rev()
                .find(|(_, (_, s))| *s == KeyState::Enabled)
                .ok_or_else(|| perr(&self.id, ProviderErrorKind::KeyDisabled, "no primary"))?;
            let version = i as u32 + 1;
            let nonce: [u8; 12] = random32()[..12].try_into().unwrap();
            let ct = Aes256Gcm::new_from_slice(kek)
                .unwrap()
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: dek.expose_secret(),
                        aad: &Self::aad(key.as_str(), version, context),
                    },
                )
                .unwrap();
            Ok(WrappedKey {
                provider: self.id.clone(),
                key_ref: key.to_string(),
                key_version: version,
                wrapped: [&nonce[..], &ct].concat(),
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move {
            let Some(name) = entry
                .key_ref
                .parse::<KeyRef>()
                .ok()
                .and_then(|k| self.name_of(&k))
            else {
                return Ok(Unwrapped::NotMine);
            };
            self.up()?;
            let keys = self.keys.lock().unwrap();
            let Some((kek, state)) = keys
                .get(&name)
                .and_then(|v| v.get((entry.key_version as usize).wrapping_sub(1)))
            else {
                return Ok(Unwrapped::NotMine);
            };
            match state {
                KeyState::Destroyed => {
                    return Err(perr(&self.id, ProviderErrorKind::KeyDestroyed, "destroyed"))
                }
                KeyState::Disabled => {
                    return Err(perr(&self.id, ProviderErrorKind::KeyDisabled, "disabled"))
                }
                _ => {}
            }
            if entry.wrapped.len() != 60 {
                return Ok(Unwrapped::Rejected);
            }
            let pt = Aes256Gcm::new_from_slice(kek).unwrap().decrypt(
                Nonce::from_slice(&entry.wrapped[..12]),
                Payload {
                    msg: &entry.wrapped[12..],
                    aad: &Self::aad(&entry.key_ref, entry.key_version, context),
                },
            );
            match pt {
                Ok(pt) => {
                    let dek = Dek::from_slice(&zeroize::Zeroizing::new(pt))?;
                    self.secrets.dek(&dek);
                    Ok(Unwrapped::Key(dek))
                }
                Err(_) => Ok(Unwrapped::Rejected),
            }
        })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.info(key) })
    }

    fn create_key<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = self
                .name_of(key)
                .ok_or_else(|| perr(&self.id, ProviderErrorKind::KeyNotFound, "not my key"))?;
            let kek = self.new_kek();
            self.keys
                .lock()
                .unwrap()
                .insert(name, vec![(kek, KeyState::Enabled)]);
            self.info(key)
        })
    }

    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = self.name_of(key).unwrap();
            let kek = self.new_kek();
            {
                let mut keys = self.keys.lock().unwrap();
                let versions = keys.get_mut(&name).unwrap();
                for (_, s) in versions.iter_mut() {
                    if *s == KeyState::Enabled {
                        *s = KeyState::DecryptOnly;
                    }
                }
                versions.push((kek, KeyState::Enabled));
            }
            self.info(key)
        })
    }

    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = self.name_of(key).unwrap();
            self.keys.lock().unwrap().get_mut(&name).unwrap()[version as usize - 1].1 = state;
            self.info(key)
        })
    }

    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move {
            let name = self.name_of(key).unwrap();
            {
                let mut keys = self.keys.lock().unwrap();
                let v = &mut keys.get_mut(&name).unwrap()[version as usize - 1];
                *v = ([0; 32], KeyState::Destroyed);
            }
            self.info(key)
        })
    }
}

/// Another provider (the conformance suite's in-memory KMS) with every DEK
/// it sees recorded.
struct Recording {
    inner: Arc<MemoryKms>,
    secrets: Arc<Secrets>,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("inner", &self.inner)
            .finish()
    }
}

impl KeyProvider for Recording {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        self.secrets.dek(dek);
        self.inner.wrap(key, dek, context)
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move {
            let u = self.inner.unwrap(entry, context).await?;
            if let Unwrapped::Key(dek) = &u {
                self.secrets.dek(dek);
            }
            Ok(u)
        })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        self.inner.describe(key)
    }

    fn generate<'a>(
        &'a self,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<GeneratedDek>> {
        Box::pin(async move {
            let g = self.inner.generate(key, context).await?;
            self.secrets.dek(&g.dek);
            Ok(g)
        })
    }
}

// ------------------------------------------------------------------ tracing

#[cfg(feature = "tracing")]
mod capture {
    //! A minimal `tracing` subscriber that formats every event and span
    //! (target, level, all fields) into a line and keeps it.

    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    #[derive(Default, Clone)]
    pub struct Collect {
        pub lines: Arc<Mutex<Vec<String>>>,
        next: Arc<AtomicU64>,
    }

    struct Line(String);

    impl Visit for Line {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            let _ = write!(self.0, " {}={}", field.name(), value);
        }
    }

    impl Subscriber for Collect {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            let mut line = Line(format!(
                "span {} {}",
                span.metadata().target(),
                span.metadata().name()
            ));
            span.record(&mut line);
            self.lines.lock().unwrap().push(line.0);
            Id::from_u64(self.next.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn record(&self, _: &Id, values: &Record<'_>) {
            let mut line = Line("record".into());
            values.record(&mut line);
            self.lines.lock().unwrap().push(line.0);
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let m = event.metadata();
            let mut line = Line(format!("{} {}", m.level(), m.target()));
            event.record(&mut line);
            self.lines.lock().unwrap().push(line.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

// ------------------------------------------------------------------ scan

fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// Every spelling of a 32-byte secret, and of each 12-byte window of it,
/// that a careless log line could contain.
fn key_forms(key: &[u8; 32]) -> Vec<Vec<u8>> {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut forms = vec![
        key.to_vec(),
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        base64(key, STD, true).into_bytes(),
        base64(key, URL, false).into_bytes(),
        format!("{key:?}").into_bytes(),
        format!("{:?}", &key[..12])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
    ];
    for w in key.windows(12) {
        forms.push(w.to_vec());
        forms.push(hex::encode(w).into_bytes());
        forms.push(hex::encode_upper(w).into_bytes());
    }
    forms
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Returns "where: what" for every secret found in `corpus`.
fn scan(corpus: &[(String, Vec<u8>)], secrets: &[(String, Vec<Vec<u8>>)]) -> Vec<String> {
    let mut found = Vec::new();
    for (place, text) in corpus {
        for (what, forms) in secrets {
            if forms.iter().any(|f| contains(text, f)) {
                found.push(format!("{place}: {what}"));
            }
        }
    }
    found
}

// ------------------------------------------------------------------ workload

const PLAINTEXTS: [&str; 4] = [
    "potassium 4.1 mmol/L, creatinine 88 umol/L",
    "Dx: type 2 diabetes mellitus, HbA1c 7.9 percent",
    "HIV-1 RNA viral load undetectable",
    "psychiatric intake note: patient reports insomnia",
];

const CONTEXT_VALUES: [&str; 4] = [
    "MRN-5550123-Jane-Roe",
    "tenant-st-marys-oncology",
    "record-8841-lab-result",
    "ssn-078-05-1120",
];

const CONTEXT_KEYS: [&str; 3] = ["patient_mrn_zq", "tenant_zq", "record_id_zq"];

fn context(i: usize) -> EncryptionContext {
    EncryptionContext::new()
        .with(CONTEXT_KEYS[0], CONTEXT_VALUES[i % 4])
        .unwrap()
        .with(CONTEXT_KEYS[1], CONTEXT_VALUES[1])
        .unwrap()
        .with(CONTEXT_KEYS[2], format!("{}-{i}", CONTEXT_VALUES[2]))
        .unwrap()
}

fn stream_plaintext() -> Vec<u8> {
    PLAINTEXTS.join(" | ").repeat(1200).into_bytes()
}

/// What the workload produced, apart from the sinks.
struct Outputs {
    errors: Vec<String>,
    debug: Vec<String>,
}

async fn run_workload(sink: Arc<dyn EventSink>, secrets: Arc<Secrets>) -> Outputs {
    let mut errors = Vec::new();
    let mut note = |e: phi_envelope::Error| errors.push(format!("{e} / {e:?}"));
    let hsm = Arc::new(KnownKms::new("hsm-sim", secrets.clone()));
    let mem = Arc::new(MemoryKms::new("kms-sim"));
    let records: KeyRef = "hsm-sim:records".parse().unwrap();
    let archive: KeyRef = "hsm-sim:archive".parse().unwrap();
    let offsite = mem.add_key("offsite");
    let custodian = Caller::new("kms-admin", "key-maintenance");
    let keyring = Keyring::builder()
        .provider(hsm.clone())
        .provider(Arc::new(Recording {
            inner: mem.clone(),
            secrets: secrets.clone(),
        }))
        .recipient(records.clone())
        .event_sink(sink)
        .policy(Arc::new(FnPolicy::new(|r| {
            if r.purpose.as_deref() == Some("curiosity") {
                Decision::Deny("no purpose of use".into())
            } else {
                Decision::Allow
            }
        })))
        .build()
        .unwrap();
    let kr = &keyring;
    kr.create_key(&records, &custodian).await.unwrap();
    kr.create_key(&archive, &custodian).await.unwrap();
    let debug = vec![format!("{kr:?}")];
    let env = Envelope::new(keyring).as_caller("lab-service", "treatment");
    let kr = env.keyring();

    // Records: seal, open, wrong context, multi-recipient, rewrap.
    let mut sealed = Vec::new();
    for (i, pt) in PLAINTEXTS.iter().enumerate() {
        let s = env.seal(pt.as_bytes(), &context(i)).await.unwrap();
        assert_eq!(env.open(&s, &context(i)).await.unwrap(), pt.as_bytes());
        note(env.open(&s, &context(i + 1)).await.unwrap_err());
        sealed.push(s);
    }
    let both = env.to_recipients([records.clone(), offsite.clone()]);
    let dual = both
        .seal(PLAINTEXTS[0].as_bytes(), &context(0))
        .await
        .unwrap();
    assert_eq!(
        env.open(&dual, &context(0)).await.unwrap(),
        PLAINTEXTS[0].as_bytes()
    );
    let moved = env
        .to_recipients([archive.clone()])
        .rewrap(&sealed[1], &context(1))
        .await
        .unwrap();
    assert_eq!(
        env.open(&moved, &context(1)).await.unwrap(),
        PLAINTEXTS[1].as_bytes()
    );
    note(env.rewrap(&sealed[2], &context(0)).await.unwrap_err());

    // Streams and random access.
    let pt = stream_plaintext();
    let mut w = env.encryptor(Vec::new(), &context(3)).await.unwrap();
    for piece in pt.chunks(5000) {
        w.write_all(piece).unwrap();
    }
    let stream = w.finish().unwrap();
    let mut out = Vec::new();
    env.decryptor(&stream[..], &context(3))
        .await
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, pt);
    let mut r = env
        .seekable_decryptor(Cursor::new(&stream), &context(3))
        .await
        .unwrap();
    r.seek(SeekFrom::Start(20_000)).unwrap();
    let mut buf = [0u8; 100];
    r.read_exact(&mut buf).unwrap();
    note(env.decryptor(&stream[..], &context(2)).await.err().unwrap());

    // Lifecycle: rotate, seal under v2, disable v1, re-allow, destroy v1.
    kr.rotate(&records, &custodian).await.unwrap();
    let v2 = env
        .seal(PLAINTEXTS[2].as_bytes(), &context(2))
        .await
        .unwrap();
    kr.set_state(&records, 1, KeyState::Disabled, &custodian)
        .await
        .unwrap();
    note(env.open(&sealed[0], &context(0)).await.unwrap_err());
    kr.set_state(&records, 1, KeyState::DecryptOnly, &custodian)
        .await
        .unwrap();
    env.open(&sealed[0], &context(0)).await.unwrap();
    kr.describe(&records, &custodian).await.unwrap();
    kr.destroy(&records, 1, &custodian).await.unwrap();
    note(env.open(&sealed[3], &context(3)).await.unwrap_err());
    assert_eq!(
        env.open(&v2, &context(2)).await.unwrap(),
        PLAINTEXTS[2].as_bytes()
    );
    // The dual-recipient record survives through the offsite key.
    assert_eq!(
        env.open(&dual, &context(0)).await.unwrap(),
        PLAINTEXTS[0].as_bytes()
    );

    // Denied by policy; provider down.
    note(
        env.as_caller("lab-service", "curiosity")
            .open(&v2, &context(2))
            .await
            .unwrap_err(),
    );
    hsm.down.store(true, Ordering::SeqCst);
    note(env.seal(b"x", &context(0)).await.unwrap_err());
    note(env.open(&v2, &context(2)).await.unwrap_err());
    hsm.down.store(false, Ordering::SeqCst);

    Outputs { errors, debug }
}

#[test]
fn no_key_plaintext_or_context_value_reaches_any_event_log_or_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit_key = AuditKey::new(&[0x5a; 32]).unwrap();
    let log = Arc::new(
        AuditLog::builder()
            .audit_key(audit_key.clone())
            .max_file_bytes(8 * 1024)
            .open(&path)
            .unwrap(),
    );
    let memory = Arc::new(MemorySink::new());
    #[allow(unused_mut)]
    let mut sinks: Vec<Arc<dyn EventSink>> = vec![memory.clone(), log.clone()];
    #[cfg(feature = "tracing")]
    sinks.push(Arc::new(phi_envelope::audit::TracingSink));
    let sink: Arc<dyn EventSink> = Arc::new(FanOut(sinks));
    let secrets = Arc::new(Secrets::default());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    #[cfg(feature = "tracing")]
    let collect = capture::Collect::default();
    #[cfg(feature = "tracing")]
    let outputs = tracing::subscriber::with_default(collect.clone(), || {
        rt.block_on(run_workload(sink, secrets.clone()))
    });
    #[cfg(not(feature = "tracing"))]
    let outputs = rt.block_on(run_workload(sink, secrets.clone()));
    drop(log);

    // The corpus: every event (Debug and JSON), every byte of every audit
    // file, every tracing line, every error message, the keyring's Debug.
    let events = memory.events();
    let mut corpus: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        corpus.push((format!("event {i} (Debug)"), format!("{e:?}").into_bytes()));
        corpus.push((format!("event {i} (JSON)"), e.to_json().into_bytes()));
    }
    let files = audit::log_files(&path).unwrap();
    assert!(files.len() > 1, "the log rotated");
    for f in &files {
        corpus.push((f.display().to_string(), std::fs::read(f).unwrap()));
    }
    #[cfg(feature = "tracing")]
    {
        let lines = collect.lines.lock().unwrap().clone();
        let audit_lines = lines
            .iter()
            .filter(|l| l.contains("phi_envelope::audit"))
            .count();
        assert_eq!(audit_lines, events.len(), "one tracing event per event");
        assert!(lines.iter().any(|l| l.contains("context_fingerprint=")));
        for (i, l) in lines.iter().enumerate() {
            corpus.push((format!("tracing line {i}: {l}"), l.clone().into_bytes()));
        }
    }
    for (i, e) in outputs.errors.iter().enumerate() {
        corpus.push((format!("error {i}: {e}"), e.clone().into_bytes()));
    }
    for d in &outputs.debug {
        corpus.push(("keyring Debug".into(), d.clone().into_bytes()));
    }

    // The secrets.
    let deks = secrets.deks.lock().unwrap().clone();
    let keks = secrets.keks.lock().unwrap().clone();
    let mut wanted: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for (i, k) in deks.iter().enumerate() {
        wanted.push((format!("DEK {i}"), key_forms(k)));
    }
    for (i, k) in keks.iter().enumerate() {
        wanted.push((format!("KEK {i}"), key_forms(k)));
    }
    for v in CONTEXT_VALUES {
        wanted.push((format!("context value {v:?}"), vec![v.as_bytes().to_vec()]));
    }
    for k in CONTEXT_KEYS {
        wanted.push((format!("context key {k:?}"), vec![k.as_bytes().to_vec()]));
    }
    for p in PLAINTEXTS {
        // The whole text and any 16-byte piece of it.
        let mut forms = vec![p.as_bytes().to_vec()];
        forms.extend(p.as_bytes().windows(16).map(<[u8]>::to_vec));
        wanted.push((format!("plaintext {p:?}"), forms));
    }

    // The scan is not vacuous: there was plenty to find, and it finds a
    // planted secret in each form.
    assert!(deks.len() >= 7, "{} DEKs", deks.len());
    assert!(keks.len() >= 3, "{} KEKs", keks.len());
    assert!(events.len() >= 40, "{} events", events.len());
    assert!(outputs.errors.len() >= 8, "{} errors", outputs.errors.len());
    let report = audit::Verifier::new().key(audit_key).verify(&path).unwrap();
    assert_eq!(report.entries as usize, events.len());
    for form in [
        hex::encode(deks[3]),
        hex::encode_upper(&keks[1][10..22]),
        format!("{:?}", deks[0]),
        CONTEXT_VALUES[0].to_owned(),
        PLAINTEXTS[1][5..21].to_owned(),
    ] {
        let planted = vec![("planted".to_owned(), format!("x{form}x").into_bytes())];
        assert_eq!(scan(&planted, &wanted).len(), 1, "scanner misses {form}");
    }

    println!(
        "leak scan: {} events, {} audit files, {} corpus items, {} errors; searched for {} DEKs, {} KEKs, {} context values, {} plaintexts",
        events.len(),
        files.len(),
        corpus.len(),
        outputs.errors.len(),
        deks.len(),
        keks.len(),
        CONTEXT_VALUES.len(),
        PLAINTEXTS.len()
    );
    let leaks = scan(&corpus, &wanted);
    assert!(leaks.is_empty(), "secrets found:\n{}", leaks.join("\n"));
}
