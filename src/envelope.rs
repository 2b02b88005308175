//! The envelope API: seal and open records, stream files, rewrap, inspect.
//!
//! An [`Envelope`] is cheap to clone (it shares its [`Keyring`]) and is
//! `Send + Sync`: build one at start-up and share it between tasks.
//!
//! ```
//! # async fn demo() -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use phi_envelope::{EncryptionContext, Envelope, Keyring, KeyRef};
//! use phi_envelope::provider::local::LocalKeystore;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
//! let key: KeyRef = "local:records".parse()?;
//! store.add_key(&key)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(store))
//!     .recipient(key)
//!     .build()?;
//! let envelope = Envelope::new(keyring).as_caller("lab-service", "store-result");
//!
//! let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
//! let sealed = envelope.seal(b"potassium 4.1 mmol/L", &ctx).await?;
//! assert_eq!(envelope.open(&sealed, &ctx).await?, b"potassium 4.1 mmol/L");
//!
//! let other = EncryptionContext::new().with("tenant", "st-john")?;
//! assert!(envelope.open(&sealed, &other).await.unwrap_err().is_decrypt());
//!
//! // A record id binds the body only (associated data): it reaches no
//! // provider and does not split the data-key cache.
//! let record = envelope.seal_with(b"sodium 140 mmol/L", &ctx, b"record 42").await?;
//! assert_eq!(envelope.open_with(&record, &ctx, b"record 42").await?, b"sodium 140 mmol/L");
//! assert!(envelope.open_with(&record, &ctx, b"record 43").await.unwrap_err().is_decrypt());
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
//! ```

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::cobblestone::{Decryptor, Encryptor, SeekableDecryptor};
use crate::error::{Error, Result};
use crate::format::{check_associated_data, EncryptionContext, Header};
use crate::keyring::{Caller, Keyring};
use crate::message::{MessageInfo, SealingKey};
use crate::provider::KeyRef;

/// Seals and opens messages under the keys of a [`Keyring`].
#[derive(Clone, Debug)]
pub struct Envelope {
    keyring: Arc<Keyring>,
    recipients: Option<Arc<[KeyRef]>>,
    caller: Caller,
    cache_partition: Option<Arc<str>>,
}

impl Envelope {
    /// An envelope over `keyring`, sealing to its default recipients.
    pub fn new(keyring: Keyring) -> Envelope {
        Envelope::from_shared(Arc::new(keyring))
    }

    /// An envelope over a shared keyring.
    pub fn from_shared(keyring: Arc<Keyring>) -> Envelope {
        Envelope {
            keyring,
            recipients: None,
            caller: Caller::default(),
            cache_partition: None,
        }
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The same envelope acting for `actor` with `purpose`: both are
    /// recorded in every event and shown to the policy hook.
    pub fn as_caller(&self, actor: impl Into<String>, purpose: impl Into<String>) -> Envelope {
        Envelope {
            caller: Caller::new(actor, purpose),
            ..self.clone()
        }
    }

    /// The caller operations are attributed to.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The same envelope sealing to `recipients` instead of the keyring's
    /// defaults.
    pub fn to_recipients(&self, recipients: impl IntoIterator<Item = KeyRef>) -> Envelope {
        Envelope {
            recipients: Some(recipients.into_iter().collect()),
            ..self.clone()
        }
    }

    /// The same envelope in its own partition of the encryption
    /// [data-key cache](crate::cache): records sealed through it never share
    /// a DEK with records sealed through an envelope with another partition
    /// (or none), even for the same recipients, actor and context. Use it to
    /// separate tenants or data sets that must not share a key.
    pub fn with_cache_partition(&self, partition: impl Into<String>) -> Envelope {
        Envelope {
            cache_partition: Some(Arc::from(partition.into())),
            ..self.clone()
        }
    }

    /// The recipients new messages are wrapped to.
    pub fn recipients(&self) -> &[KeyRef] {
        match &self.recipients {
            Some(r) => r,
            None => self.keyring.recipients(),
        }
    }

    /// A fresh data key wrapped to the recipients.
    pub(crate) async fn sealing_key(&self, context: &EncryptionContext) -> Result<SealingKey> {
        self.keyring
            .new_sealing_key(self.recipients(), context, &self.caller)
            .await
    }

    /// Encrypts a record bound to `context`. With the keyring's data-key
    /// cache on, the DEK may be shared with other records of the same
    /// partition (the record still gets its own AES key and nonce).
    pub async fn seal(&self, plaintext: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.seal_with(plaintext, context, &[]).await
    }

    /// Encrypts a record bound to `context` (the key context: it goes to the
    /// providers and selects the cached DEK, as for [`seal`](Self::seal))
    /// and to the associated data `ad`, which binds only the body: a record
    /// id, a column name, a row version.
    ///
    /// The associated data never reaches a provider, an event, the policy
    /// hook or the data-key cache's key, so records that differ only in it
    /// share a cached DEK (one provider call per cache window, not one per
    /// record). Like the context it is not stored: present it again to
    /// [`open_with`](Self::open_with). Empty `ad` is no associated data, and
    /// the message is then exactly what [`seal`](Self::seal) writes. To bind
    /// several values, encode them unambiguously (each length-prefixed, or
    /// a canonical JSON array): the library binds the bytes as given.
    /// Associated data over 65536 bytes is
    /// [`Error::InvalidAssociatedData`], refused before any key is used
    /// (docs/FORMAT.md, section 5.4).
    pub async fn seal_with(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Vec<u8>> {
        check_associated_data(ad)?;
        self.keyring
            .record_sealing_key(
                self.recipients(),
                context,
                &self.caller,
                self.cache_partition.as_deref(),
                plaintext.len() as u64,
            )
            .await?
            .seal_with(plaintext, context, ad)
    }

    /// Decrypts a record sealed under `context`. Any authentication failure
    /// is the opaque [`Error::Decrypt`]. With the keyring's decryption cache
    /// on, a key already unwrapped for this exact header and context may be
    /// reused.
    pub async fn open(&self, message: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.open_with(message, context, &[]).await
    }

    /// Decrypts a record sealed with [`seal_with`](Self::seal_with) under
    /// `context` and the associated data `ad`. Other associated data, none
    /// for a record sealed with some, or some for a record sealed without,
    /// is the opaque [`Error::Decrypt`], like a wrong context. The
    /// associated data is checked before any key is used, and is not part
    /// of the decryption cache's key (a cached key is found by header and
    /// context).
    pub async fn open_with(
        &self,
        message: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Vec<u8>> {
        check_associated_data(ad)?;
        let (header, used) = Header::parse(message)?;
        let body = &message[used..];
        let key = self
            .keyring
            .record_opening_key(&header, context, &self.caller, body.len() as u64)
            .await?;
        key.open_with(body, context, ad)
    }

    /// Starts an encrypted stream into `inner`: writes the header and
    /// returns the writer of the body. Call [`Encryptor::finish`] at the end:
    /// a stream dropped without it does not decrypt.
    pub async fn encryptor<W: Write>(
        &self,
        inner: W,
        context: &EncryptionContext,
    ) -> Result<Encryptor<W>> {
        self.encryptor_with(inner, context, &[]).await
    }

    /// [`encryptor`](Self::encryptor) for a stream whose body is bound to
    /// the associated data `ad` as well (see [`seal_with`](Self::seal_with)).
    pub async fn encryptor_with<W: Write>(
        &self,
        inner: W,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Encryptor<W>> {
        check_associated_data(ad)?;
        self.sealing_key(context)
            .await?
            .encryptor_with(inner, context, ad)
    }

    /// Reads the header from `inner`, unwraps the DEK, and returns a reader
    /// of the plaintext that authenticates every chunk before releasing it.
    pub async fn decryptor<R: Read>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<Decryptor<R>> {
        self.decryptor_with(inner, context, &[]).await
    }

    /// [`decryptor`](Self::decryptor) for a stream whose body is bound to
    /// the associated data `ad` as well (see [`open_with`](Self::open_with)).
    pub async fn decryptor_with<R: Read>(
        &self,
        mut inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Decryptor<R>> {
        check_associated_data(ad)?;
        let header = Header::read_from(&mut inner)?;
        let (_, key) = self
            .keyring
            .unwrap_header(&header, context, &self.caller)
            .await?;
        key.decryptor_with(inner, context, ad)
    }

    /// Like [`decryptor`](Self::decryptor), for random access: the message
    /// starts at `inner`'s current position; the final chunk is
    /// authenticated before this returns.
    pub async fn seekable_decryptor<R: Read + Seek>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<SeekableDecryptor<R>> {
        self.seekable_decryptor_with(inner, context, &[]).await
    }

    /// [`seekable_decryptor`](Self::seekable_decryptor) for a message whose
    /// body is bound to the associated data `ad` as well.
    pub async fn seekable_decryptor_with<R: Read + Seek>(
        &self,
        mut inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<SeekableDecryptor<R>> {
        check_associated_data(ad)?;
        let header = Header::read_from(&mut inner)?;
        let (_, key) = self
            .keyring
            .unwrap_header(&header, context, &self.caller)
            .await?;
        key.seekable_decryptor_with(inner, context, ad)
    }

    /// Re-wraps a header to this envelope's recipients (the current primary
    /// versions of their keys). The body is untouched: write the new header
    /// followed by the old body.
    ///
    /// The DEK is unwrapped from the first entry whose DEK verifies the
    /// header tag; only that DEK is wrapped again, or only that entry is
    /// handed to a provider that re-encrypts inside itself (AWS KMS
    /// ReEncrypt). The new header is checked before it is returned (one
    /// entry per recipient, of that recipient's provider; its tag verifies
    /// under the same DEK), so a message that opened before opens after, or
    /// the rewrap fails and nothing changes. Rewrap needs the encryption
    /// context (the providers bind it) but not the associated data of
    /// [`seal_with`](Self::seal_with): the header tag does not cover it and
    /// the body is not touched (only the in-place file rewrap, which checks
    /// the rewritten body, takes it:
    /// [`rewrap_file_with`](Self::rewrap_file_with)). It is rewrapped even when it is
    /// already current; [`rewrap_batch`](Self::rewrap_batch) and
    /// [`rewrap_file`](Self::rewrap_file) leave current ones alone.
    pub async fn rewrap_header(
        &self,
        header: &Header,
        context: &EncryptionContext,
    ) -> Result<Header> {
        self.keyring
            .rewrap_header(header, self.recipients(), context, &self.caller)
            .await
    }

    /// Re-wraps a record held in memory: new header, same body; see
    /// [`rewrap_header`](Self::rewrap_header) for what is checked.
    pub async fn rewrap(&self, message: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        let (header, used) = Header::parse(message)?;
        // Fail early on a body that cannot be valid, before any provider call.
        crate::cobblestone::plaintext_len((message.len() - used) as u64)?;
        let new_header = self.rewrap_header(&header, context).await?;
        let mut out = Vec::with_capacity(new_header.len() + message.len() - used);
        out.extend_from_slice(new_header.as_bytes());
        out.extend_from_slice(&message[used..]);
        Ok(out)
    }
}

/// Reads what a message's header says, without any key: version, suite,
/// recipients (provider, key reference, key version), and from the length
/// the chunk count and plaintext length.
pub fn inspect(message: &[u8]) -> Result<MessageInfo> {
    let (header, used) = Header::parse(message)?;
    MessageInfo::new(header, Some((message.len() - used) as u64))
}

/// [`inspect`] for a message in a seekable source (a file); reads only the
/// header.
pub fn inspect_reader<R: Read + Seek>(mut inner: R) -> Result<MessageInfo> {
    let start = inner.stream_position()?;
    let header = Header::read_from(&mut inner)?;
    let end = inner.seek(SeekFrom::End(0))?;
    let body = end
        .checked_sub(start + header.len() as u64)
        .ok_or(Error::Truncated)?;
    MessageInfo::new(header, Some(body))
}
