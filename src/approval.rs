//! Dual control: destructive lifecycle verbs need signed approvals from `K`
//! distinct registered custodians.
//!
//! A [`DualControl`] configured on the [`KeyringBuilder`](crate::keyring::KeyringBuilder)
//! names the custodians (an id and an Ed25519 public key each), the
//! threshold `K` and the verbs it guards. A guarded verb
//! ([`Keyring::destroy_approved`](crate::Keyring::destroy_approved),
//! [`Keyring::set_state_approved`](crate::Keyring::set_state_approved)) is
//! refused with [`Error::Approval`] and an event (outcome
//! `failed:approval`) unless the approvals passed with it hold at least `K`
//! valid ones from distinct custodians; all of this is checked before the
//! policy hook and before any provider call. The event of the verb names the
//! custodians whose approvals were accepted ([`Event::approvers`]).
//!
//! An [`Approval`] is an Ed25519 signature by a custodian over one exact
//! operation: the verb, the key reference as the verb is called with it,
//! the version, an expiry (unix seconds) and a random nonce, in the
//! length-prefixed encoding of [`approval_message`] (specified byte for
//! byte, with a test vector, in `docs/APPROVALS.md`).
//!
//! Refused, each with an error naming the approval and what is wrong:
//! an approval by a custodian who is not registered; one whose signature does
//! not verify under that custodian's registered key (tampered, or signed by
//! another key); one for another operation, key reference or version; one
//! that has expired, or whose expiry is further away than
//! [`DualControl::max_validity`]; one whose nonce was already used (a
//! replay); and too few distinct custodians (two approvals by one custodian
//! count once). Any invalid approval refuses the whole call.
//!
//! **Replay protection**: a keyring remembers the nonces it accepted, in
//! memory, until they expire. Another process does not know them: across
//! processes, an approval can be used again until it expires unless the
//! processes share a [spent-approvals file](DualControl::spent_file)
//! (the `backup` CLI keeps one beside the keystore). Keep expiries short
//! either way. See `docs/APPROVALS.md`.
//!
//! [`Event::approvers`]: crate::events::Event::approvers
//! [`Error::Approval`]: crate::Error::Approval
//!
//! ```
//! # async fn demo() -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use phi_envelope::approval::{CustodianKey, DualControl, GuardedOperation};
//! use phi_envelope::provider::local::LocalKeystore;
//! use phi_envelope::{Caller, KeyRef, Keyring};
//!
//! let alice = CustodianKey::generate("alice")?;
//! let bob = CustodianKey::generate("bob")?;
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
//! let key: KeyRef = "local:records".parse()?;
//! store.add_key(&key)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(store))
//!     .dual_control(DualControl::new(vec![alice.custodian(), bob.custodian()], 2)?)
//!     .build()?;
//! let operator = Caller::new("carol", "retention-end");
//! keyring.rotate(&key, &operator).await?;
//!
//! let op = GuardedOperation::Destroy;
//! let ttl = Duration::from_secs(3600);
//! let one = [alice.approve(op, &key, 1, ttl)?];
//! assert!(keyring.destroy_approved(&key, 1, &operator, &one).await.is_err());
//! let two = [alice.approve(op, &key, 1, ttl)?, bob.approve(op, &key, 1, ttl)?];
//! keyring.destroy_approved(&key, 1, &operator, &two).await?;
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! Why one file of this size: the approval format, the custodian registry,
//! the checks in their documented order and the spent-approvals file are one
//! protocol (docs/APPROVALS.md), read together when it is audited.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::primitives::fill_random;
use crate::provider::{KeyRef, KeyState};

/// The label that starts every signed approval message (domain separation).
pub const APPROVAL_LABEL: &str = "phi-envelope/v1 approval";
/// The `format` member of an approval file.
pub const APPROVAL_FORMAT: &str = "phi-envelope-approval/1";
/// The first line of a custodian's private key file.
pub const CUSTODIAN_KEY_FORMAT: &str = "phi-envelope-custodian-key/1";
/// The shortest nonce accepted (bytes).
pub const MIN_NONCE_LEN: usize = 16;
/// The longest nonce accepted (bytes).
pub const MAX_NONCE_LEN: usize = 64;
/// The nonce length [`CustodianKey::approve`] uses (bytes).
pub const NONCE_LEN: usize = 16;
/// The longest custodian id (bytes).
pub const MAX_CUSTODIAN_ID_LEN: usize = 64;
/// The most approvals one call may carry (each costs a signature check).
pub const MAX_APPROVALS: usize = 64;
/// The longest approval file accepted by [`Approval::from_json`] (bytes).
pub const MAX_APPROVAL_JSON_LEN: usize = 4096;

/// A verb that dual control can guard: the `operation` field of an
/// approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum GuardedOperation {
    /// [`Keyring::destroy`](crate::Keyring::destroy): crypto-shredding.
    Destroy,
    /// `set_state` to [`KeyState::Disabled`]: every message under the
    /// version stops opening.
    Disable,
    /// `set_state` to [`KeyState::Enabled`]: the version becomes primary
    /// again (undoes a rotation, or brings a retired version back).
    Enable,
    /// `set_state` to [`KeyState::DecryptOnly`]: a retired (disabled)
    /// version opens again.
    DecryptOnly,
}

impl GuardedOperation {
    /// Every guardable verb; [`DualControl::new`] guards them all.
    pub const ALL: &'static [GuardedOperation] = &[
        GuardedOperation::Destroy,
        GuardedOperation::Disable,
        GuardedOperation::Enable,
        GuardedOperation::DecryptOnly,
    ];

    /// The stable name signed in approvals: `destroy`, `disable`, `enable`,
    /// `decrypt-only` (the `backup keys` verbs).
    pub fn as_str(self) -> &'static str {
        match self {
            GuardedOperation::Destroy => "destroy",
            GuardedOperation::Disable => "disable",
            GuardedOperation::Enable => "enable",
            GuardedOperation::DecryptOnly => "decrypt-only",
        }
    }

    /// The verb that moves a version to `state`.
    pub fn for_state(state: KeyState) -> GuardedOperation {
        match state {
            KeyState::Destroyed => GuardedOperation::Destroy,
            KeyState::Disabled => GuardedOperation::Disable,
            KeyState::Enabled => GuardedOperation::Enable,
            KeyState::DecryptOnly => GuardedOperation::DecryptOnly,
        }
    }
}

impl fmt::Display for GuardedOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GuardedOperation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        GuardedOperation::ALL
            .iter()
            .copied()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown operation {s:?}: approvals are for destroy, disable, enable or decrypt-only"
                ))
            })
    }
}

/// The message a custodian signs, byte for byte (`docs/APPROVALS.md`):
/// six fields, each a 4-byte big-endian length followed by its bytes:
///
/// 1. the label `phi-envelope/v1 approval` (24 bytes);
/// 2. the operation, [`GuardedOperation::as_str`] in ASCII;
/// 3. the key reference, exactly as the verb is called with it, UTF-8;
/// 4. the version, 4 bytes, big-endian;
/// 5. the expiry, unix seconds, 8 bytes, big-endian;
/// 6. the nonce, [`MIN_NONCE_LEN`] to [`MAX_NONCE_LEN`] random bytes.
pub fn approval_message(
    operation: GuardedOperation,
    key_ref: &str,
    version: u32,
    expires_at: u64,
    nonce: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + key_ref.len() + nonce.len());
    let mut field = |bytes: &[u8]| {
        // Every field is bounded far below 4 GiB (key references, nonces).
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    field(APPROVAL_LABEL.as_bytes());
    field(operation.as_str().as_bytes());
    field(key_ref.as_bytes());
    field(&version.to_be_bytes());
    field(&expires_at.to_be_bytes());
    field(nonce);
    out
}

/// Checks a custodian id: 1 to 64 bytes of ASCII letters, digits and
/// `.`, `_`, `@`, `-` (no spaces, so the registry's lines stay
/// unambiguous).
fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CUSTODIAN_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid custodian id {:?}: 1 to {MAX_CUSTODIAN_ID_LEN} ASCII letters, digits, '.', '_', '@' or '-'",
            truncate(id)
        )))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A registered custodian: an id and an Ed25519 public key.
///
/// Its text form (what `backup custodian keygen` prints, one line of the
/// CLI's custodians file) is `ID ed25519:HEX`, the public key as 64
/// lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Custodian {
    id: String,
    public_key: [u8; 32],
}

impl Custodian {
    /// A custodian from its id and its 32-byte Ed25519 public key.
    pub fn new(id: impl Into<String>, public_key: [u8; 32]) -> Result<Custodian> {
        let id = id.into();
        check_id(&id)?;
        Ok(Custodian { id, public_key })
    }

    /// The custodian's id, as recorded in events.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The Ed25519 public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }

    /// Whether `signature` is this custodian's over `message`.
    fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        UnparsedPublicKey::new(&signature::ED25519, &self.public_key)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Debug for Custodian {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Custodian({self})")
    }
}

impl fmt::Display for Custodian {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ed25519:{}", self.id, hex(&self.public_key))
    }
}

impl FromStr for Custodian {
    type Err = Error;

    /// Parses `ID ed25519:HEX` (spaces or tabs between the two).
    fn from_str(s: &str) -> Result<Custodian> {
        let mut parts = s.split_whitespace();
        let (Some(id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::InvalidArgument(format!(
                "not a custodian line (ID ed25519:HEX): {:?}",
                truncate(s)
            )));
        };
        let hex_key = key.strip_prefix("ed25519:").ok_or_else(|| {
            Error::InvalidArgument(format!(
                "custodian {id}: the public key must be written ed25519:HEX (64 hex digits)"
            ))
        })?;
        let bytes = unhex(hex_key).filter(|b| b.len() == 32).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "custodian {id}: the public key must be 64 hex digits after ed25519:"
            ))
        })?;
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&bytes);
        Custodian::new(id, public_key)
    }
}

/// A custodian's private signing key (Ed25519). The seed is zeroized on
/// drop and never shown: `Debug` prints the id and the public key.
pub struct CustodianKey {
    id: String,
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for CustodianKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustodianKey")
            .field("custodian", &self.custodian())
            .finish_non_exhaustive()
    }
}

impl CustodianKey {
    /// A new random key for custodian `id`.
    pub fn generate(id: impl Into<String>) -> Result<CustodianKey> {
        let mut seed = Zeroizing::new([0u8; 32]);
        fill_random(&mut seed[..])?;
        CustodianKey::from_seed(id, &seed)
    }

    /// The key of custodian `id` from its 32-byte Ed25519 seed (RFC 8032
    /// private key).
    pub fn from_seed(id: impl Into<String>, seed: &[u8; 32]) -> Result<CustodianKey> {
        let id = id.into();
        check_id(&id)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| Error::InvalidArgument("the custodian key's seed was rejected".into()))?;
        Ok(CustodianKey {
            id,
            seed: Zeroizing::new(*seed),
            pair,
        })
    }

    /// The custodian's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public half, to register.
    pub fn custodian(&self) -> Custodian {
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(self.pair.public_key().as_ref());
        Custodian {
            id: self.id.clone(),
            public_key,
        }
    }

    /// The key file's text (secret: write it with mode 0600):
    ///
    /// ```text
    /// phi-envelope-custodian-key/1
    /// custodian ID
    /// seed 64-HEX-DIGITS
    /// ```
    pub fn to_file_text(&self) -> Zeroizing<String> {
        // Sized up front: a reallocation would leave the seed's hex in a
        // freed buffer.
        let mut s = Zeroizing::new(String::with_capacity(
            CUSTODIAN_KEY_FORMAT.len() + self.id.len() + 2 * self.seed.len() + 32,
        ));
        s.push_str(CUSTODIAN_KEY_FORMAT);
        s.push_str("\ncustodian ");
        s.push_str(&self.id);
        s.push_str("\nseed ");
        let h = Zeroizing::new(hex(&self.seed[..]));
        s.push_str(&h);
        s.push('\n');
        s
    }

    /// Reads what [`to_file_text`](Self::to_file_text) writes.
    pub fn from_file_text(text: &str) -> Result<CustodianKey> {
        let bad = |what: &str| {
            Error::InvalidArgument(format!(
                "not a custodian key file ({CUSTODIAN_KEY_FORMAT}): {what}"
            ))
        };
        let mut lines = text.lines();
        if lines.next().map(str::trim_end) != Some(CUSTODIAN_KEY_FORMAT) {
            return Err(bad("its first line must be the format"));
        }
        let id = lines
            .next()
            .and_then(|l| l.trim_end().strip_prefix("custodian "))
            .ok_or_else(|| bad("its second line must be `custodian ID`"))?;
        let seed_hex = lines
            .next()
            .and_then(|l| l.trim_end().strip_prefix("seed "))
            .ok_or_else(|| bad("its third line must be `seed HEX`"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(bad("it has lines after the seed"));
        }
        let bytes = Zeroizing::new(
            unhex(seed_hex)
                .filter(|b| b.len() == 32)
                .ok_or_else(|| bad("the seed must be 64 hex digits"))?,
        );
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes);
        CustodianKey::from_seed(id, &seed)
    }

    /// Signs an approval of `operation` on `version` of `key`, valid for
    /// `valid_for` from now, with a fresh random nonce.
    pub fn approve(
        &self,
        operation: GuardedOperation,
        key: &KeyRef,
        version: u32,
        valid_for: Duration,
    ) -> Result<Approval> {
        let expires_at = unix_seconds(SystemTime::now()).saturating_add(valid_for.as_secs());
        let mut nonce = vec![0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        self.approve_with(operation, key, version, expires_at, nonce)
    }

    /// Signs an approval with the given expiry (unix seconds) and nonce:
    /// for test vectors and for tools that choose their own nonces (never
    /// reuse one).
    pub fn approve_with(
        &self,
        operation: GuardedOperation,
        key: &KeyRef,
        version: u32,
        expires_at: u64,
        nonce: Vec<u8>,
    ) -> Result<Approval> {
        check_nonce(&nonce)?;
        let message = approval_message(operation, key.as_str(), version, expires_at, &nonce);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(self.pair.sign(&message).as_ref());
        Ok(Approval {
            custodian: self.id.clone(),
            operation,
            key_ref: key.as_str().to_owned(),
            version,
            expires_at,
            nonce,
            signature,
        })
    }
}

fn check_nonce(nonce: &[u8]) -> Result<()> {
    if (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "an approval's nonce must be {MIN_NONCE_LEN} to {MAX_NONCE_LEN} bytes, not {}",
            nonce.len()
        )))
    }
}

/// Seconds since the Unix epoch (0 before it).
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One custodian's signed approval of one operation. Not secret: it is
/// carried in a file (`backup keys approve`) to whoever runs the verb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    /// The custodian who signed it (looked up in the registry).
    pub custodian: String,
    /// The approved verb.
    pub operation: GuardedOperation,
    /// The key reference, exactly as the verb must be called with it.
    pub key_ref: String,
    /// The key version.
    pub version: u32,
    /// When it expires, in unix seconds: refused from that second on.
    pub expires_at: u64,
    /// Random bytes that make it single-use.
    pub nonce: Vec<u8>,
    /// The Ed25519 signature over [`message`](Self::message).
    pub signature: [u8; 64],
}

impl Approval {
    /// The signed bytes ([`approval_message`] of its fields).
    pub fn message(&self) -> Vec<u8> {
        approval_message(
            self.operation,
            &self.key_ref,
            self.version,
            self.expires_at,
            &self.nonce,
        )
    }

    /// The approval file: one JSON object, members in this order:
    /// `format` (`phi-envelope-approval/1`), `custodian`, `operation`,
    /// `key_ref`, `version`, `expires_at` (unix seconds), `nonce` and
    /// `signature` (lowercase hex).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(384);
        out.push('{');
        crate::json::push_key(&mut out, "format", true);
        crate::json::push_str(&mut out, APPROVAL_FORMAT);
        crate::json::push_key(&mut out, "custodian", false);
        crate::json::push_str(&mut out, &self.custodian);
        crate::json::push_key(&mut out, "operation", false);
        crate::json::push_str(&mut out, self.operation.as_str());
        crate::json::push_key(&mut out, "key_ref", false);
        crate::json::push_str(&mut out, &self.key_ref);
        crate::json::push_key(&mut out, "version", false);
        out.push_str(&self.version.to_string());
        crate::json::push_key(&mut out, "expires_at", false);
        out.push_str(&self.expires_at.to_string());
        crate::json::push_key(&mut out, "nonce", false);
        crate::json::push_str(&mut out, &hex(&self.nonce));
        crate::json::push_key(&mut out, "signature", false);
        crate::json::push_str(&mut out, &hex(&self.signature));
        out.push('}');
        out
    }

    /// Parses an approval file (at most [`MAX_APPROVAL_JSON_LEN`] bytes).
    /// The signature is not checked here: the keyring checks it against
    /// its registry.
    pub fn from_json(text: &str) -> Result<Approval> {
        let bad = |what: String| {
            Error::InvalidArgument(format!("not an approval ({APPROVAL_FORMAT}): {what}"))
        };
        if text.len() > MAX_APPROVAL_JSON_LEN {
            return Err(bad(format!("longer than {MAX_APPROVAL_JSON_LEN} bytes")));
        }
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let s = |k: &str| crate::json::req_str(obj, k).map_err(bad);
        let n = |k: &str| {
            crate::json::opt_u64(obj, k)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("{k:?} must be a number")))
        };
        if s("format")? != APPROVAL_FORMAT {
            return Err(bad(format!("format must be {APPROVAL_FORMAT:?}")));
        }
        let custodian = s("custodian")?.to_owned();
        check_id(&custodian)?;
        let operation: GuardedOperation = s("operation")?.parse()?;
        let key_ref = KeyRef::parse(s("key_ref")?)?.as_str().to_owned();
        let version =
            u32::try_from(n("version")?).map_err(|_| bad("version exceeds u32".into()))?;
        let expires_at = n("expires_at")?;
        let nonce = unhex(s("nonce")?).ok_or_else(|| bad("nonce must be hex".into()))?;
        check_nonce(&nonce)?;
        let sig = unhex(s("signature")?)
            .filter(|b| b.len() == 64)
            .ok_or_else(|| bad("signature must be 128 hex digits".into()))?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&sig);
        Ok(Approval {
            custodian,
            operation,
            key_ref,
            version,
            expires_at,
            nonce,
            signature,
        })
    }
}

/// Where a [`DualControl`] reads the time (unix time is what approvals
/// expire in). Tests inject a fixed clock.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The dual-control policy of a keyring: the registered custodians, how
/// many distinct ones must approve (`K`), which verbs need approvals, and
/// how far ahead an approval may expire.
#[derive(Clone)]
pub struct DualControl {
    custodians: Vec<Custodian>,
    threshold: usize,
    guarded: BTreeSet<GuardedOperation>,
    max_validity: Duration,
    clock: Clock,
    spent_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for DualControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DualControl")
            .field("custodians", &self.custodians)
            .field("threshold", &self.threshold)
            .field("guarded", &self.guarded)
            .field("max_validity", &self.max_validity)
            .field("spent_file", &self.spent_file)
            .finish_non_exhaustive()
    }
}

impl DualControl {
    /// The default of [`max_validity`](Self::max_validity): 24 hours.
    pub const DEFAULT_MAX_VALIDITY: Duration = Duration::from_secs(24 * 3600);

    /// `threshold` approvals from distinct `custodians` for every
    /// [`GuardedOperation`] (destroy, disable, enable, decrypt-only).
    /// Refused: no custodians, a threshold of 0 or above the number of
    /// custodians, two custodians with one id or one public key.
    pub fn new(custodians: Vec<Custodian>, threshold: usize) -> Result<DualControl> {
        if threshold == 0 {
            return Err(Error::InvalidArgument(
                "dual control needs a threshold of at least 1 approval".into(),
            ));
        }
        if threshold > custodians.len() {
            return Err(Error::InvalidArgument(format!(
                "dual control asks for {threshold} approvals but only {} custodian(s) are registered",
                custodians.len()
            )));
        }
        for (i, c) in custodians.iter().enumerate() {
            for d in &custodians[..i] {
                if d.id == c.id {
                    return Err(Error::InvalidArgument(format!(
                        "two custodians share the id {:?}",
                        c.id
                    )));
                }
                if d.public_key == c.public_key {
                    return Err(Error::InvalidArgument(format!(
                        "custodians {:?} and {:?} share one public key: they would count as two approvals from one key holder",
                        d.id, c.id
                    )));
                }
            }
        }
        Ok(DualControl {
            custodians,
            threshold,
            guarded: GuardedOperation::ALL.iter().copied().collect(),
            max_validity: Self::DEFAULT_MAX_VALIDITY,
            clock: Arc::new(SystemTime::now),
            spent_file: None,
        })
    }

    /// Guards exactly `operations` (default: all of
    /// [`GuardedOperation::ALL`]). Verbs not guarded need no approval.
    pub fn guard(mut self, operations: impl IntoIterator<Item = GuardedOperation>) -> Self {
        self.guarded = operations.into_iter().collect();
        self
    }

    /// Refuses approvals that expire more than `max` after now (default
    /// [`DEFAULT_MAX_VALIDITY`](Self::DEFAULT_MAX_VALIDITY)): it bounds how
    /// long an approval, once signed, can be used, and how long its nonce
    /// is remembered.
    pub fn max_validity(mut self, max: Duration) -> Self {
        self.max_validity = max;
        self
    }

    /// Also records accepted approvals in the file at `path` (created
    /// with mode 0600 if missing), and refuses those already in it: replay
    /// protection across processes (every run of the `backup` CLI) and
    /// restarts, for the processes that share the file. Each check takes an
    /// exclusive `flock` of the file, reads it and appends one line per
    /// accepted approval (`spent ID NONCE-HEX EXPIRY`), synced before the
    /// verb goes on; a file that cannot be opened, locked, read or written
    /// refuses the verb. The file only grows (about 70 bytes an approval);
    /// lines whose expiry has passed are skipped, and the file may be
    /// emptied once every approval in it has expired. Whoever can write
    /// the file can remove entries from it: keep it where only the service
    /// (or the operator account) writes.
    pub fn spent_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.spent_file = Some(path.into());
        self
    }

    /// Where the time comes from (default [`SystemTime::now`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The registered custodians.
    pub fn custodians(&self) -> &[Custodian] {
        &self.custodians
    }

    /// How many distinct custodians must approve.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether `operation` needs approvals.
    pub fn guards(&self, operation: GuardedOperation) -> bool {
        self.guarded.contains(&operation)
    }
}

/// A refusal: what is wrong, and the custodians whose approvals were valid
/// (recorded in the refusal's event).
pub(crate) struct Refusal {
    pub(crate) message: String,
    pub(crate) approvers: Vec<String>,
}

/// The keyring's side of dual control: the policy and the nonces it
/// accepted, each until it expires.
pub(crate) struct ApprovalChecker {
    config: DualControl,
    /// (custodian id, nonce) -> expiry (unix seconds).
    spent: Mutex<HashMap<(String, Vec<u8>), u64>>,
}

impl fmt::Debug for ApprovalChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl ApprovalChecker {
    pub(crate) fn new(config: DualControl) -> ApprovalChecker {
        ApprovalChecker {
            config,
            spent: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn guards(&self, operation: GuardedOperation) -> bool {
        self.config.guards(operation)
    }

    /// Checks `approvals` for `operation` on `version` of `key`; on
    /// success their nonces are spent and the distinct approvers returned
    /// (sorted by id). Nothing is spent on a refusal.
    pub(crate) fn check(
        &self,
        operation: GuardedOperation,
        key: &KeyRef,
        version: u32,
        approvals: &[Approval],
    ) -> std::result::Result<Vec<String>, Refusal> {
        let what = format!("{operation} of {key} version {version}");
        if approvals.len() > MAX_APPROVALS {
            return Err(Refusal {
                message: format!(
                    "{what} refused: {} approvals given, at most {MAX_APPROVALS} are read",
                    approvals.len()
                ),
                approvers: Vec::new(),
            });
        }
        let now = unix_seconds((self.config.clock)());
        let latest = now.saturating_add(self.config.max_validity.as_secs());
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        spent.retain(|_, expiry| *expiry > now);
        let mut approvers: BTreeSet<String> = BTreeSet::new();
        let refuse = |approvers: &BTreeSet<String>, message: String| Refusal {
            message,
            approvers: approvers.iter().cloned().collect(),
        };
        for (i, a) in approvals.iter().enumerate() {
            let n = i + 1;
            let who = &a.custodian;
            let Some(custodian) = self.config.custodians.iter().find(|c| &c.id == who) else {
                return Err(refuse(
                    &approvers,
                    format!("{what} refused: approval {n} is by {who:?}, who is not a registered custodian"),
                ));
            };
            if a.operation != operation || a.key_ref != key.as_str() || a.version != version {
                return Err(refuse(
                    &approvers,
                    format!(
                        "{what} refused: approval {n} (custodian {who}) is for {} of {} version {}, not for this operation",
                        a.operation, a.key_ref, a.version
                    ),
                ));
            }
            if !custodian.verifies(&a.message(), &a.signature) {
                return Err(refuse(
                    &approvers,
                    format!("{what} refused: the signature of approval {n} does not verify under custodian {who}'s registered key (altered, or signed with another key)"),
                ));
            }
            if a.expires_at <= now {
                return Err(refuse(
                    &approvers,
                    format!(
                        "{what} refused: approval {n} (custodian {who}) expired {} s ago; ask {who} for a new one",
                        now - a.expires_at
                    ),
                ));
            }
            if a.expires_at > latest {
                return Err(refuse(
                    &approvers,
                    format!(
                        "{what} refused: approval {n} (custodian {who}) expires {} s from now, more than the {} s an approval may be valid for",
                        a.expires_at - now,
                        self.config.max_validity.as_secs()
                    ),
                ));
            }
            // By nonce alone: the same signed approval relabelled with
            // another custodian id is the same approval.
            if spent.keys().any(|(_, nonce)| *nonce == a.nonce) {
                return Err(refuse(
                    &approvers,
                    format!("{what} refused: approval {n} (custodian {who}) was already used (an approval is good for one operation); ask {who} for a new one"),
                ));
            }
            approvers.insert(who.clone());
        }
        if approvers.len() < self.config.threshold {
            let got: Vec<&str> = approvers.iter().map(String::as_str).collect();
            let dup = if approvals.len() > approvers.len() {
                " (approvals by one custodian count once)"
            } else {
                ""
            };
            return Err(refuse(
                &approvers,
                format!(
                    "{what} needs approvals from {} distinct custodians, got {}{}{dup}; missing {}",
                    self.config.threshold,
                    approvers.len(),
                    if got.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", got.join(", "))
                    },
                    self.config.threshold - approvers.len()
                ),
            ));
        }
        if let Some(path) = &self.config.spent_file {
            match spend_in_file(path, approvals, now) {
                Ok(None) => {}
                Ok(Some(i)) => {
                    let who = &approvals[i].custodian;
                    return Err(refuse(
                        &approvers,
                        format!(
                            "{what} refused: approval {} (custodian {who}) was already used (recorded in {}); ask {who} for a new one",
                            i + 1,
                            path.display()
                        ),
                    ));
                }
                Err(e) => {
                    return Err(refuse(
                        &approvers,
                        format!(
                            "{what} refused: the approvals cannot be recorded as used in {}: {e}; nothing was done",
                            path.display()
                        ),
                    ))
                }
            }
        }
        for a in approvals {
            spent.insert((a.custodian.clone(), a.nonce.clone()), a.expires_at);
        }
        Ok(approvers.into_iter().collect())
    }
}

/// The longest spent-approvals file read.
const MAX_SPENT_FILE: u64 = 16 * 1024 * 1024;

/// Checks `approvals` against the spent-approvals file at `path` and, if
/// none is in it, appends them, under an exclusive `flock` of the file
/// (other processes wait): `Some(i)` when approval `i` was already used.
fn spend_in_file(
    path: &std::path::Path,
    approvals: &[Approval],
    now: u64,
) -> std::io::Result<Option<usize>> {
    use std::io::{Read, Write};
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600)
            .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32);
    }
    let mut file = opts.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // Released when `file` is closed, on every path.
    file.lock()?;
    let len = file.metadata()?.len();
    if len > MAX_SPENT_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SPENT_FILE} bytes; once every approval in it has expired (max-validity after the last use) it can be emptied"
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    // A last line without its newline is a write cut short: ignored (its
    // approvals were not accepted: the verb failed with the write).
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut used: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for (n, line) in complete.lines().enumerate() {
        let bad =
            || std::io::Error::other(format!("line {} is not `spent ID NONCE EXPIRY`", n + 1));
        let mut f = line.split(' ');
        let (Some("spent"), Some(_id), Some(nonce), Some(expiry), None) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(bad());
        };
        let expiry: u64 = expiry.parse().map_err(|_| bad())?;
        let nonce = unhex(nonce).ok_or_else(bad)?;
        if expiry > now {
            // By nonce alone (see `check`).
            used.insert(nonce);
        }
    }
    if let Some(i) = approvals.iter().position(|a| used.contains(&a.nonce)) {
        return Ok(Some(i));
    }
    // Cut a torn last line off (under the lock, so no live writer is
    // writing it) rather than complete it into a line that would refuse
    // every later verb.
    if complete.len() < text.len() {
        file.set_len(complete.len() as u64)?;
    }
    let mut add = String::new();
    for a in approvals {
        add.push_str(&format!(
            "spent {} {} {}\n",
            a.custodian,
            hex(&a.nonce),
            a.expires_at
        ));
    }
    file.write_all(add.as_bytes())?;
    file.sync_data()?;
    Ok(None)
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// Decodes hex (either case); `None` if it is not hex of whole bytes.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    // Sized up front: it may decode a seed, and growing would leave pieces
    // of it in freed buffers.
    let mut out = Vec::with_capacity(b.len() / 2);
    for p in b.chunks(2) {
        out.push(digit(p[0])? << 4 | digit(p[1])?);
    }
    Some(out)
}
