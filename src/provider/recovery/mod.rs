//! The offline recovery recipient (feature `recovery`): a key whose public
//! half sits in the keyring and whose private half is never online.
//!
//! A message wrapped to an HSM or KMS key *and* to a recovery key can be
//! opened when the HSM is gone or the KMS account is lost: the recovery
//! private key, split M-of-N among custodians ([`RecoveryShare`]), is
//! restored from any M shares on an offline machine and opens it.
//! **docs/RECOVERY.md specifies the wrapped key and the share text byte for
//! byte**, with committed vectors (`tests/vectors/recovery-v1.json`).
//!
//! ```
//! # async fn demo() -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use phi_envelope::provider::recovery::{RecoveryPrivateKey, RecoveryProvider, RecoveryShare};
//! use phi_envelope::{EncryptionContext, Envelope, Keyring};
//!
//! // On the custodians' offline machine: a key, five shares, any three restore it.
//! let key = RecoveryPrivateKey::generate()?;
//! let public = key.public_key().clone();
//! let shares: Vec<String> = key.split(3, 5)?.iter().map(|s| s.to_text().to_string()).collect();
//! drop(key);
//!
//! // Online: seal to the public key (here alone; in practice beside the HSM or KMS key).
//! let sealing = Envelope::new(
//!     Keyring::builder()
//!         .provider(Arc::new(RecoveryProvider::new().with_public_key(public.clone())))
//!         .recipient(public.key_ref())
//!         .build()?,
//! );
//! let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
//! let sealed = sealing.seal(b"PHI", &ctx).await?;
//!
//! // Disaster: three custodians bring their shares.
//! let three: Vec<RecoveryShare> =
//!     shares[1..4].iter().map(|t| RecoveryShare::parse(t)).collect::<Result<_, _>>()?;
//! let restored = RecoveryPrivateKey::combine(&three)?;
//! let opening = Envelope::new(
//!     Keyring::builder()
//!         .provider(Arc::new(RecoveryProvider::new().with_private_key(restored)))
//!         .build()?,
//! );
//! assert_eq!(opening.open(&sealed, &ctx).await?, b"PHI");
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! # Wrapping
//!
//! A DEK is sealed with HPKE (RFC 9180), base mode, suite
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, to the recovery
//! public key, single-shot, with
//!
//! ```text
//! info = "phi-envelope/v1 hpke-recovery"
//! aad  = "phi-envelope/v1 hpke-recovery wrap" 0x00 || u16 len(key ref) || key ref
//!        || u32 version (1) || canonical context pairs
//! ```
//!
//! The wrapped form is `enc (32) || ciphertext (32) || tag (16)`, 80 bytes
//! ([`WRAPPED_KEY_LEN`]). The encryption context goes into `aad`, in the
//! very encoding the local keystore uses as its GCM additional data: the
//! context is per-wrap data, which is what HPKE's `aad` is for, while
//! `info` names the protocol and stays constant and short (so that HPKE
//! libraries that limit `info` can still open a wrapped key independently).
//! Both are authenticated: an unwrap under another context, another key
//! reference or another protocol fails.
//!
//! # Keys
//!
//! A recovery key is named `hpke-recovery:FINGERPRINT`; the fingerprint is
//! the first 16 bytes of `SHA-256("phi-envelope/v1 hpke-recovery
//! fingerprint" 0x00 || public key)` in lowercase hex. It has one version,
//! 1, always enabled: there is no rotation, a new recovery key is a new
//! key (rewrap messages to it, then retire the old one's shares).
//!
//! A [`RecoveryProvider`] holding only the public key (the online case)
//! wraps; asked to unwrap an entry of that key, it fails with
//! [`ProviderErrorKind::Unsupported`] and a message that says the private
//! key is offline, rather than reporting a rejected key. List the
//! recovery recipient last, after the HSM or KMS key, so that a normal
//! open never asks it. One holding the private key (restored from shares)
//! wraps and unwraps. Rewrapping a file checks every new entry by
//! unwrapping it; the recovery entry, which cannot be unwrapped online, is
//! skipped there ([`KeyProvider::can_unwrap`]), so another recipient must
//! verify.

mod hpke;
mod shamir;
mod share;
#[cfg(test)]
mod vector_tests;

use std::fmt;

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

pub use self::share::{RecoveryShare, SHARE_TAG};
use super::{
    BoxFuture, KeyIdentity, KeyInfo, KeyProvider, KeyRef, KeyRefKind, KeyState, KeyVersionInfo,
    ProviderError, ProviderErrorKind, Unwrapped,
};
use crate::error::{Error, Result};
use crate::format::{EncryptionContext, WrappedKey};
use crate::primitives::Dek;

/// The provider id, and the scheme of its key references.
pub const PROVIDER_ID: &str = "hpke-recovery";

/// Length of a wrapped DEK: `enc (32) || ciphertext (32) || tag (16)`.
pub const WRAPPED_KEY_LEN: usize = hpke::N_ENC + 32 + hpke::N_T;

/// The tag of a public key's text form.
pub const PUBLIC_KEY_TAG: &str = "phi-recovery-public-v1";

/// The only key version of a recovery key.
const VERSION: u32 = 1;

const INFO: &[u8] = b"phi-envelope/v1 hpke-recovery";
const WRAP_LABEL: &[u8] = b"phi-envelope/v1 hpke-recovery wrap\x00";
const FINGERPRINT_LABEL: &[u8] = b"phi-envelope/v1 hpke-recovery fingerprint\x00";
pub(crate) const FINGERPRINT_LEN: usize = 16;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn fingerprint_hex(fp: &[u8; FINGERPRINT_LEN]) -> String {
    hex(fp)
}

fn provider_error(kind: ProviderErrorKind, message: impl Into<String>) -> Error {
    ProviderError::new(PROVIDER_ID, kind, message).into()
}

/// The public half of a recovery key: an X25519 public key. Not secret.
///
/// Its text form is `phi-recovery-public-v1:` and 64 lowercase hex digits
/// ([`to_text`](Self::to_text), [`parse`](Self::parse), `Display`).
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryPublicKey {
    bytes: [u8; 32],
    fingerprint: [u8; FINGERPRINT_LEN],
}

impl RecoveryPublicKey {
    /// A public key from its 32 bytes (RFC 7748 encoding). Small-order
    /// points, with which no secret could be shared, are refused, and so is
    /// a set top bit (which X25519 ignores: the same key would have a second
    /// encoding and a second fingerprint).
    pub fn from_bytes(bytes: [u8; 32]) -> Result<RecoveryPublicKey> {
        if bytes[31] & 0x80 != 0 {
            return Err(Error::InvalidArgument(
                "not a canonical X25519 public key (its top bit is set)".into(),
            ));
        }
        // u >= p = 2^255 - 19 (little-endian 0xed, 0xff x 30, 0x7f and
        // above): the same point as u - p, a second encoding.
        if bytes[31] == 0x7f && bytes[1..31].iter().all(|b| *b == 0xff) && bytes[0] >= 0xed {
            return Err(Error::InvalidArgument(
                "not a canonical X25519 public key (not reduced modulo 2^255 - 19)".into(),
            ));
        }
        if !hpke::is_valid_public_key(&bytes) {
            return Err(Error::InvalidArgument(
                "not a usable X25519 public key (a small-order point)".into(),
            ));
        }
        let digest = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(FINGERPRINT_LABEL);
            ctx.update(&bytes);
            ctx.finish()
        };
        let mut fingerprint = [0u8; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(&digest.as_ref()[..FINGERPRINT_LEN]);
        Ok(RecoveryPublicKey { bytes, fingerprint })
    }

    /// Reads the text form `phi-recovery-public-v1:HEX` (surrounding
    /// whitespace ignored, hex digits in either case).
    pub fn parse(text: &str) -> Result<RecoveryPublicKey> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "not a recovery public key ({why}); expected {PUBLIC_KEY_TAG}: and 64 hex digits"
            ))
        };
        let text = text.trim();
        let rest = text
            .strip_prefix(PUBLIC_KEY_TAG)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(|| bad("wrong tag"))?;
        if rest.len() != 64 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("wrong length or not hex"));
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&rest[2 * i..2 * i + 2], 16).map_err(|_| bad("not hex"))?;
        }
        RecoveryPublicKey::from_bytes(bytes)
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KEY_TAG}:{}", hex(&self.bytes))
    }

    /// The 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.bytes
    }

    /// The fingerprint: 32 lowercase hex digits.
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint)
    }

    pub(crate) fn fingerprint_bytes(&self) -> [u8; FINGERPRINT_LEN] {
        self.fingerprint
    }

    /// The key reference to name this key by: `hpke-recovery:FINGERPRINT`.
    pub fn key_ref(&self) -> KeyRef {
        KeyRef::parse(&format!("{PROVIDER_ID}:{}", self.fingerprint()))
            .expect("a fingerprint is always a valid key reference")
    }

    fn x25519(&self) -> PublicKey {
        PublicKey::from(self.bytes)
    }
}

impl fmt::Debug for RecoveryPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecoveryPublicKey({})", self.key_ref())
    }
}

impl fmt::Display for RecoveryPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// The private half of a recovery key. Zeroized on drop, never printed
/// (`Debug` shows the key reference only), no `Clone`.
///
/// It is made on a custodian's offline machine ([`generate`](Self::generate)),
/// split into shares ([`split`](Self::split)) and dropped; it exists again
/// only when M shares are combined ([`combine`](Self::combine)) to restore
/// backups. There is deliberately no way to export its bytes.
pub struct RecoveryPrivateKey {
    secret: StaticSecret,
    public: RecoveryPublicKey,
}

impl RecoveryPrivateKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<RecoveryPrivateKey> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        crate::primitives::fill_random(&mut bytes[..])?;
        // Clamped as X25519 uses it (RFC 7748 5), so that every bit of the
        // key, as shared, is bound by the public key and its fingerprint.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        RecoveryPrivateKey::from_secret_bytes(&bytes)
    }

    pub(crate) fn from_secret_bytes(bytes: &[u8; 32]) -> Result<RecoveryPrivateKey> {
        let secret = StaticSecret::from(*bytes);
        let public = RecoveryPublicKey::from_bytes(PublicKey::from(&secret).to_bytes())?;
        Ok(RecoveryPrivateKey { secret, public })
    }

    pub(crate) fn secret_bytes(&self) -> shamir::Bytes32 {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The public key.
    pub fn public_key(&self) -> &RecoveryPublicKey {
        &self.public
    }

    /// Splits the key into `shares` shares, any `threshold` of which
    /// restore it; fewer reveal nothing about it (Shamir's secret sharing
    /// over GF(2^8)). `2 <= threshold <= shares <= 255`. Every split gets a
    /// fresh random set id; shares of two splits never combine.
    pub fn split(&self, threshold: u8, shares: u8) -> Result<Vec<RecoveryShare>> {
        share::split(self, threshold, shares)
    }

    /// Restores a key from shares of one split: at least its threshold, of
    /// one key and one set, no index twice, each already checked by its
    /// checksum when it was parsed. The result is checked against the
    /// shares' fingerprint, so a wrong combination is an error, never a
    /// wrong key. Every failure is an [`Error::RecoveryShare`] that says
    /// what to do (for too few shares: how many more are needed).
    pub fn combine(shares: &[RecoveryShare]) -> Result<RecoveryPrivateKey> {
        share::combine(shares)
    }
}

impl fmt::Debug for RecoveryPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RecoveryPrivateKey({}, <redacted>)",
            self.public.key_ref()
        )
    }
}

enum Held {
    Public(RecoveryPublicKey),
    Private(RecoveryPrivateKey),
}

impl Held {
    fn public(&self) -> &RecoveryPublicKey {
        match self {
            Held::Public(p) => p,
            Held::Private(k) => k.public_key(),
        }
    }
}

/// The recovery recipient provider (id `hpke-recovery`): seals DEKs to
/// recovery public keys and, where it holds a recovery private key,
/// unwraps them. See the [module documentation](self).
#[derive(Default)]
pub struct RecoveryProvider {
    keys: Vec<Held>,
}

impl RecoveryProvider {
    /// A provider with no keys.
    pub fn new() -> RecoveryProvider {
        RecoveryProvider::default()
    }

    /// Adds a public key, for sealing. Adding a key it already holds
    /// changes nothing.
    pub fn with_public_key(mut self, key: RecoveryPublicKey) -> RecoveryProvider {
        if self.find(&key.fingerprint_bytes()).is_none() {
            self.keys.push(Held::Public(key));
        }
        self
    }

    /// Adds a private key (restored from shares), for sealing and
    /// unwrapping; it replaces the same key's public half.
    pub fn with_private_key(mut self, key: RecoveryPrivateKey) -> RecoveryProvider {
        let fp = key.public_key().fingerprint_bytes();
        self.keys.retain(|h| h.public().fingerprint_bytes() != fp);
        self.keys.push(Held::Private(key));
        self
    }

    /// The references of the keys held, in the order they were added.
    pub fn key_refs(&self) -> Vec<KeyRef> {
        self.keys.iter().map(|h| h.public().key_ref()).collect()
    }

    fn find(&self, fp: &[u8; FINGERPRINT_LEN]) -> Option<&Held> {
        self.keys
            .iter()
            .find(|h| &h.public().fingerprint_bytes() == fp)
    }

    fn find_ref(&self, key: &KeyRef) -> Option<&Held> {
        let KeyRefKind::HpkeRecovery { fingerprint } = key.kind() else {
            return None;
        };
        self.keys
            .iter()
            .find(|h| &h.public().fingerprint() == fingerprint)
    }

    fn held(&self, key: &KeyRef) -> Result<&Held> {
        if !matches!(key.kind(), KeyRefKind::HpkeRecovery { .. }) {
            return Err(Error::InvalidArgument(format!(
                "{key} is not an hpke-recovery:FINGERPRINT key reference; the recovery provider holds only recovery keys"
            )));
        }
        self.find_ref(key).ok_or_else(|| {
            provider_error(
                ProviderErrorKind::KeyNotFound,
                format!("no recovery public key with the reference {key} is configured; add the public key printed when the recovery key was made"),
            )
        })
    }

    fn wrap_sync(
        &self,
        key: &KeyRef,
        dek: &Dek,
        context: &EncryptionContext,
    ) -> Result<WrappedKey> {
        let public = self.held(key)?.public();
        let sk_e = hpke::ephemeral()?;
        let wrapped = wrap_with(&sk_e, public, dek, context)?;
        Ok(WrappedKey {
            provider: PROVIDER_ID.into(),
            key_ref: public.key_ref().as_str().into(),
            key_version: VERSION,
            wrapped,
        })
    }

    fn unwrap_sync(&self, entry: &WrappedKey, context: &EncryptionContext) -> Result<Unwrapped> {
        if entry.provider != PROVIDER_ID {
            return Ok(Unwrapped::NotMine);
        }
        let Ok(key) = KeyRef::parse(&entry.key_ref) else {
            return Ok(Unwrapped::NotMine);
        };
        let Some(held) = self.find_ref(&key) else {
            return Ok(Unwrapped::NotMine);
        };
        let private = match held {
            Held::Private(k) => k,
            Held::Public(_) => {
                return Err(provider_error(
                    ProviderErrorKind::Unsupported,
                    format!("recovery key {key} is held here as a public key only: its private key is offline; restore it from its shares (backup decrypt --recovery-share FILE ...) to open this message"),
                ))
            }
        };
        if entry.key_version != VERSION {
            return Err(provider_error(
                ProviderErrorKind::KeyNotFound,
                format!(
                    "recovery key {key} has only version 1, not {}",
                    entry.key_version
                ),
            ));
        }
        Ok(match unwrap_with(private, &key, &entry.wrapped, context)? {
            Some(dek) => Unwrapped::Key(dek),
            None => Unwrapped::Rejected,
        })
    }

    fn describe_sync(&self, key: &KeyRef) -> Result<KeyInfo> {
        let public = self.held(key)?.public();
        Ok(KeyInfo::new(
            public.key_ref(),
            Some(VERSION),
            vec![KeyVersionInfo::new(VERSION, KeyState::Enabled, None)],
        ))
    }
}

/// The additional data of a wrap: the local keystore's encoding under this
/// provider's label.
fn wrap_aad(key_ref: &str, version: u32, context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_LABEL.len() + 2 + key_ref.len() + 4 + 64);
    aad.extend_from_slice(WRAP_LABEL);
    // Key references are at most 1024 bytes (`KeyRef::parse`).
    aad.extend_from_slice(&(key_ref.len() as u16).to_be_bytes());
    aad.extend_from_slice(key_ref.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&context.canonical_pairs());
    aad
}

/// Seals `dek` to `public` with the ephemeral key `sk_e`: the 80 wrapped
/// bytes.
fn wrap_with(
    sk_e: &StaticSecret,
    public: &RecoveryPublicKey,
    dek: &Dek,
    context: &EncryptionContext,
) -> Result<Vec<u8>> {
    let aad = wrap_aad(public.key_ref().as_str(), VERSION, context);
    let (enc, ct) = hpke::seal_base_with(sk_e, &public.x25519(), INFO, &aad, dek.expose_secret())?;
    let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
    out.extend_from_slice(&enc);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens 80 wrapped bytes with `private`; `None` when they do not
/// authenticate (wrong context, wrong key, tampered, wrong length).
fn unwrap_with(
    private: &RecoveryPrivateKey,
    key: &KeyRef,
    wrapped: &[u8],
    context: &EncryptionContext,
) -> Result<Option<Dek>> {
    if wrapped.len() != WRAPPED_KEY_LEN {
        return Ok(None);
    }
    let mut enc = [0u8; hpke::N_ENC];
    enc.copy_from_slice(&wrapped[..hpke::N_ENC]);
    let aad = wrap_aad(key.as_str(), VERSION, context);
    match hpke::open_base(&enc, &private.secret, INFO, &aad, &wrapped[hpke::N_ENC..]) {
        Ok(pt) if pt.len() == 32 => Ok(Some(Dek::from_slice(&pt)?)),
        Ok(_) | Err(Error::Decrypt) => Ok(None),
        Err(e) => Err(e),
    }
}

impl fmt::Debug for RecoveryProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|h| match h {
                Held::Public(p) => format!("{} (public key only)", p.key_ref()),
                Held::Private(k) => format!("{} (private key held)", k.public_key().key_ref()),
            })
            .collect();
        f.debug_struct("RecoveryProvider")
            .field("keys", &keys)
            .finish()
    }
}

impl KeyProvider for RecoveryProvider {
    fn id(&self) -> &str {
        PROVIDER_ID
    }

    /// Every future of this provider completes on its first poll (its work
    /// is local and runs inline), so the blocking facade needs no runtime.
    fn needs_runtime(&self) -> bool {
        false
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move { self.wrap_sync(key, dek, context) })
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move { self.unwrap_sync(entry, context) })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.describe_sync(key) })
    }

    /// False for an entry of a key held as a public key only: its private
    /// key is offline.
    fn can_unwrap(&self, entry: &WrappedKey) -> bool {
        let public_only = entry.provider == PROVIDER_ID
            && KeyRef::parse(&entry.key_ref)
                .ok()
                .and_then(|key| self.find_ref(&key))
                .is_some_and(|held| matches!(held, Held::Public(_)));
        !public_only
    }

    /// `hpke-recovery:FINGERPRINT` is the only spelling of a recovery key.
    fn identity<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        let id = matches!(key.kind(), KeyRefKind::HpkeRecovery { .. })
            .then(|| KeyIdentity::new(PROVIDER_ID, key.as_str()));
        Box::pin(async move { Ok(id) })
    }
}
