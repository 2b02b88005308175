//! The trail's own secrets kept sealed: the audit key that keys the hash
//! chain and the seed of a checkpoint signing key, each held at rest as a
//! phi-envelope message sealed to a key of a provider (the local keystore,
//! an HSM, a KMS or Transit key), never as a bare file.
//!
//! A sealed secret is an ordinary v1 message (docs/FORMAT.md) whose
//! plaintext is the 32-byte secret and whose encryption context is the one
//! pair `"phi-envelope-secret"` = [`SecretKind::label`]: a backup, or a
//! secret of the other kind, does not open as one (the context is part of
//! every key wrap and of the body's authentication). The file is not
//! secret: copy it to every machine that writes the same trail, and only
//! callers the sealing key's provider lets unwrap can use it. The format is
//! in docs/AUDIT-KEYS.md.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use phi_envelope::audit::sealed::{self, SecretKind};
//! use phi_envelope::audit::AuditKey;
//! use phi_envelope::provider::local::LocalKeystore;
//! use phi_envelope::{Envelope, KeyRef, Keyring};
//! # let dir = tempfile::tempdir()?;
//! # let ks = LocalKeystore::create_unprotected_for_tests(dir.path().join("ks.json"))?;
//! let key = KeyRef::parse("local:audit")?;
//! # ks.add_key(&key)?;
//! let envelope = Envelope::new(Keyring::builder().provider(std::sync::Arc::new(ks)).build()?)
//!     .as_caller("ops", "audit-key")
//!     .to_recipients([key]);
//! let (secret, message) = sealed::seal_new(&envelope, SecretKind::AuditKey).await?;
//! let again = sealed::unseal(&envelope, SecretKind::AuditKey, &message).await?;
//! assert_eq!(AuditKey::new(&*again)?.key_id(), AuditKey::new(&*secret)?.key_id());
//! // The same message is not a checkpoint seed.
//! assert!(sealed::unseal(&envelope, SecretKind::CheckpointSeed, &message).await.is_err());
//! # Ok(()) }
//! ```

use zeroize::Zeroizing;

use crate::{EncryptionContext, Envelope, Error, Result};

/// The context member naming what a sealed secret is.
pub const CONTEXT_KEY: &str = "phi-envelope-secret";

/// The length of every sealed secret.
pub const SECRET_LEN: usize = 32;

/// What a sealed secret is for; bound into its message's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretKind {
    /// The HMAC-SHA-256 key of an audit trail's chain
    /// ([`AuditKey::new`](super::AuditKey::new) of the 32 bytes).
    AuditKey,
    /// The Ed25519 seed of a checkpoint signing key
    /// ([`CheckpointKey::from_seed`](super::checkpoint::CheckpointKey::from_seed)).
    CheckpointSeed,
}

impl SecretKind {
    /// The context value: `audit-key/1` or `checkpoint-seed/1`.
    pub fn label(self) -> &'static str {
        match self {
            SecretKind::AuditKey => "audit-key/1",
            SecretKind::CheckpointSeed => "checkpoint-seed/1",
        }
    }

    /// The encryption context of a sealed secret of this kind.
    pub fn context(self) -> EncryptionContext {
        let mut c = EncryptionContext::new();
        // A constant pair: always valid.
        let _ = c.insert(CONTEXT_KEY, self.label());
        c
    }
}

/// Draws a new 32-byte secret and seals it to `envelope`'s recipients.
/// Returns the secret and the message to keep (write it with an atomic,
/// exclusive create: never over an existing one, which would orphan every
/// trail or checkpoint made with the old secret).
pub async fn seal_new(
    envelope: &Envelope,
    kind: SecretKind,
) -> Result<(Zeroizing<[u8; SECRET_LEN]>, Vec<u8>)> {
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    crate::primitives::fill_random(&mut secret[..])?;
    let message = envelope.seal(&secret[..], &kind.context()).await?;
    Ok((secret, message))
}

/// Opens a sealed secret of `kind`. A message of another kind, or sealed
/// under another context, is [`Error::Decrypt`]; one whose plaintext is not
/// exactly 32 bytes is [`Error::InvalidArgument`] (and the plaintext is
/// wiped).
pub async fn unseal(
    envelope: &Envelope,
    kind: SecretKind,
    message: &[u8],
) -> Result<Zeroizing<[u8; SECRET_LEN]>> {
    let plain = Zeroizing::new(envelope.open(message, &kind.context()).await?);
    let bytes: [u8; SECRET_LEN] = plain.as_slice().try_into().map_err(|_| {
        Error::InvalidArgument(format!(
            "a sealed {} holds {} bytes, not {SECRET_LEN}",
            kind.label(),
            plain.len()
        ))
    })?;
    Ok(Zeroizing::new(bytes))
}
