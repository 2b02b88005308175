//! The AWS KMS provider (feature `aws-kms`): KEKs are KMS keys, reached
//! through the official SDK (`aws-sdk-kms`) exactly as production reaches AWS.
//!
//! # Setup
//!
//! The application loads the standard AWS configuration (endpoint from
//! `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_KMS`, region from `AWS_REGION`,
//! credentials from the default chain, timeouts and retries) and hands it
//! over with an [`AwsKmsConfig`]:
//!
//! ```no_run
//! # async fn demo(context_key: &[u8]) -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use phi_envelope::provider::aws_kms::{AwsKmsConfig, AwsKmsProvider};
//! use phi_envelope::{Envelope, Keyring, KeyRef};
//!
//! let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
//! let config = AwsKmsConfig::new(context_key)?.clear_context_keys(["tenant"])?;
//! let kms = AwsKmsProvider::new(&sdk, config)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(kms))
//!     .recipient("aws-kms:alias/phi-records".parse::<KeyRef>()?)
//!     .build()?;
//! let envelope = Envelope::new(keyring);
//! # Ok(()) }
//! ```
//!
//! There is no other way in: no test-only endpoint, no runtime of its own.
//! Every method is an async SDK call on the caller's tokio runtime.
//!
//! # KMS calls per operation
//!
//! | phi-envelope | KMS |
//! | --- | --- |
//! | new message (`generate`) | GenerateDataKey (AES_256) |
//! | extra recipient (`wrap`) | Encrypt |
//! | open (`unwrap`) | Decrypt with KeyId pinned to the entry's key ARN (one more per previous context key, only when the current one is rejected) |
//! | rewrap (`rewrap`) | ReEncrypt with SourceKeyId pinned and DestinationKeyId: the DEK never leaves KMS |
//! | alias reference | DescribeKey once per alias per [`AwsKmsConfig::alias_cache_ttl`] |
//! | `identity` | none for a key ARN; DescribeKey for a key id, alias or alias ARN (aliases through the alias cache) |
//! | `describe` | DescribeKey |
//! | `create_key` (alias refs only) | CreateKey, CreateAlias, EnableKeyRotation |
//! | `rotate` | RotateKeyOnDemand, DescribeKey |
//! | `set_state` | EnableKey / DisableKey, DescribeKey |
//! | `destroy` | ScheduleKeyDeletion, DescribeKey |
//!
//! # Key ids
//!
//! A reference may name a key by id, key ARN, alias name or alias ARN. An
//! alias is resolved with DescribeKey to the key ARN (cached), and what a
//! header entry records is always `aws-kms:` + the key ARN: decryption pins
//! the real key, and re-pointing the alias (rotating to a new key) leaves
//! existing messages readable. The KeyId in every KMS answer is checked
//! against the key asked for; a mismatch is an error and any plaintext in
//! that answer is zeroized unused.
//!
//! Every spelling has one identity, `aws-kms:` + the key ARN
//! ([`KeyProvider::identity`]): the keyring's caches, key policies and
//! lifecycle verbs treat an alias and the key it names as one key.
//!
//! # Local checks first
//!
//! Every request path (generate, wrap, unwrap, rewrap, describe, identity,
//! the lifecycle verbs) checks the reference before anything is sent: a key
//! or alias ARN must be in the client's partition and region and, with
//! [`AwsKmsConfig::allowed_accounts`], in an allowed account. A recipient or
//! lifecycle target that fails is refused with
//! [`Misconfigured`](ProviderErrorKind::Misconfigured), saying why and that
//! no request was sent. A header entry that fails, or that names an alias
//! at all (headers record key ARNs; resolving a foreign alias would tell
//! its owner who opens which message when), is
//! [`Unwrapped::NotMine`], with no request.
//!
//! # Versions and lifecycle
//!
//! KMS rotates a key's backing material itself (yearly, or on demand) and
//! keeps every old backing key for decryption; which one wrapped a DEK is
//! inside the ciphertext, invisible to us. So a KMS key has exactly one
//! phi-envelope version, `1`, in every header entry and in
//! [`KeyInfo`]. `rotate` is RotateKeyOnDemand (new material for new
//! messages, old messages still open, the version stays 1); to move to a
//! *different* key, re-point an alias or change the recipient, then rewrap.
//! States map from KMS key states: `Enabled` (and `Updating`) → `Enabled`;
//! `Disabled`, `PendingImport`, `Unavailable`, `Creating` → `Disabled`;
//! `PendingDeletion` (and `PendingReplicaDeletion`) → `Destroyed`, although
//! KMS can still recover the key with CancelKeyDeletion until the waiting
//! period ends; only then is the material gone. KMS has no decrypt-only
//! state: `set_state(DecryptOnly)` is unsupported (deny `kms:Encrypt` and
//! `kms:GenerateDataKey` in the key policy instead).
//!
//! # Plaintext keys in memory
//!
//! A DEK from GenerateDataKey or Decrypt is moved out of the response into
//! a zeroizing buffer, copied into a [`Dek`] and the buffer zeroized at once.
//! What cannot be zeroized: the SDK's `Blob` offers no zeroization, and the
//! HTTP response body (base64 JSON) and its decoding buffers live in the
//! SDK and hyper and are freed without being wiped; likewise the copy of the
//! DEK that Encrypt serialises into its request. Keep that in mind when
//! assessing memory-disclosure risks; an HSM (PKCS#11) provider avoids it.

mod config;
mod error;
mod key_id;

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use aws_sdk_kms::types::{DataKeySpec, EncryptionAlgorithmSpec, KeySpec, KeyUsageType};
use aws_sdk_kms::Client;
use aws_smithy_types::Blob;
use zeroize::Zeroizing;

pub use config::{
    AwsKmsConfig, CONTEXT_DIGEST_KEY, MAX_PREVIOUS_CONTEXT_KEYS, MIN_CONTEXT_KEY_LEN,
};

use self::error::{classify, provider_error, CallKind, Failure};
use self::key_id::{KmsKey, KmsRef};
use super::{
    BoxFuture, GeneratedDek, KeyIdentity, KeyInfo, KeyProvider, KeyRef, KeyRefKind, KeyState,
    KeyVersionInfo, ProviderErrorKind, Unwrapped,
};
use crate::error::{Error, Result};
use crate::format::{EncryptionContext, WrappedKey, MAX_WRAPPED_KEY_LEN};
use crate::primitives::{Dek, DEK_LEN};

/// The provider id, the scheme of its key references.
pub const PROVIDER_ID: &str = "aws-kms";

/// The phi-envelope version of every KMS key (see the module docs).
pub const KMS_KEY_VERSION: u32 = 1;

/// Most aliases kept resolved at once (aliases can come from headers).
const ALIAS_CACHE_MAX: usize = 256;

/// A key provider backed by AWS KMS (or any endpoint speaking the KMS API).
///
/// Built from the application's `aws_config::SdkConfig` and an
/// [`AwsKmsConfig`]; see the [module docs](self) for the API calls, the key
/// id rules, the lifecycle mapping and what reaches KMS of the encryption
/// context. Cheap to share: hold it as `Arc<dyn KeyProvider>`.
pub struct AwsKmsProvider {
    client: Client,
    config: AwsKmsConfig,
    region: String,
    aliases: Mutex<HashMap<String, (KmsKey, Instant)>>,
}

impl fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsProvider")
            .field("region", &self.region)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn misconfigured(message: impl Into<String>) -> Error {
    provider_error(ProviderErrorKind::Misconfigured, message)
}

fn other(message: impl Into<String>) -> Error {
    provider_error(ProviderErrorKind::Other, message)
}

fn mismatch(answered: &str, expected: &KmsKey) -> Error {
    other(format!(
        "KMS answered with key {answered}, expected {}; the answer was discarded. Check \
         AWS_ENDPOINT_URL: the endpoint is not behaving like KMS",
        expected.pin()
    ))
}

/// A reference refused by a local check: no request was made for it.
fn refused(shown: &str, reason: &str) -> Error {
    misconfigured(format!(
        "{shown}: {reason}; refused by a local check, no request was sent to KMS"
    ))
}

/// The AWS partition of a region (`aws`, `aws-cn`, `aws-us-gov`, the
/// isolated partitions), by the region's prefix.
fn partition_of(region: &str) -> &'static str {
    const PREFIXES: [(&str, &str); 6] = [
        ("cn-", "aws-cn"),
        ("us-gov-", "aws-us-gov"),
        ("us-isob-", "aws-iso-b"),
        ("us-isof-", "aws-iso-f"),
        ("us-iso-", "aws-iso"),
        ("eu-isoe-", "aws-iso-e"),
    ];
    PREFIXES
        .iter()
        .find(|(prefix, _)| region.starts_with(prefix))
        .map_or("aws", |(_, partition)| partition)
}

/// Moves a plaintext key out of a response into a [`Dek`]; the decoded
/// buffer is zeroized. `None` when missing or not 32 bytes.
fn take_dek(blob: Option<Blob>) -> Option<Dek> {
    let bytes = Zeroizing::new(blob?.into_inner());
    Dek::from_slice(&bytes).ok()
}

fn checked_blob(blob: Option<Blob>, operation: &str) -> Result<Vec<u8>> {
    let blob = blob.map(Blob::into_inner).unwrap_or_default();
    if blob.is_empty() || blob.len() > MAX_WRAPPED_KEY_LEN {
        return Err(other(format!(
            "KMS {operation} returned a ciphertext of {} bytes; phi-envelope stores 1 to \
             {MAX_WRAPPED_KEY_LEN} bytes per wrapped key",
            blob.len()
        )));
    }
    Ok(blob)
}

fn to_hash_map(m: std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    m.into_iter().collect()
}

impl AwsKmsProvider {
    /// A provider on the KMS client that `sdk_config` describes (endpoint,
    /// region, credentials, timeouts, retries), with `config`'s overrides.
    ///
    /// Fails with [`ProviderErrorKind::Misconfigured`] when no region or no
    /// credentials provider is configured (KMS signs every request for a
    /// region, even on a custom endpoint).
    pub fn new(sdk_config: &aws_config::SdkConfig, config: AwsKmsConfig) -> Result<AwsKmsProvider> {
        if sdk_config.credentials_provider().is_none() {
            return Err(misconfigured(
                "no AWS credentials provider is configured: load the configuration with \
                 aws_config::load_defaults (default credentials chain) or set one",
            ));
        }
        let mut builder = aws_sdk_kms::config::Builder::from(sdk_config);
        if let Some(t) = config.timeouts() {
            let mut t = t.clone();
            if let Some(base) = sdk_config.timeout_config() {
                t.take_defaults_from(base);
            }
            builder = builder.timeout_config(t);
        }
        if let Some(r) = config.retries() {
            builder = builder.retry_config(r.clone());
        }
        Self::from_client(Client::from_conf(builder.build()), config)
    }

    /// A provider on an existing KMS client (its own endpoint, region,
    /// credentials, timeouts and retries; those of `config` are ignored).
    pub fn from_client(client: Client, config: AwsKmsConfig) -> Result<AwsKmsProvider> {
        let region = client
            .config()
            .region()
            .map(|r| r.as_ref().to_owned())
            .ok_or_else(|| {
                misconfigured(
                    "no AWS region is configured: set AWS_REGION (or the region in the \
                     SdkConfig); KMS keys and request signatures are per region",
                )
            })?;
        Ok(AwsKmsProvider {
            client,
            config,
            region,
            aliases: Mutex::new(HashMap::new()),
        })
    }

    /// The region of the client.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Exactly the encryption context this provider sends to KMS for
    /// `context`: the keyed digest entry [`CONTEXT_DIGEST_KEY`] plus the
    /// declared clear pairs. For key-policy authors and for matching
    /// CloudTrail entries to messages (with the context key).
    pub fn kms_encryption_context(
        &self,
        context: &EncryptionContext,
    ) -> std::collections::BTreeMap<String, String> {
        self.config.kms_context(context, 0)
    }

    fn kms_ref(&self, key: &KeyRef) -> Result<KmsRef> {
        match key.kind() {
            KeyRefKind::AwsKms { key_id } => {
                KmsRef::parse(key_id).ok_or_else(|| Error::InvalidKeyRef {
                    reference: key.to_string(),
                    reason: "not a KMS key id, key ARN, alias or alias ARN".into(),
                })
            }
            _ => Err(Error::InvalidArgument(format!(
                "{key} is not an aws-kms: reference; the aws-kms provider holds only KMS keys"
            ))),
        }
    }

    /// Resolves a reference to a key: a key id or ARN as is, an alias with
    /// DescribeKey (cached for the configured TTL).
    ///
    /// Every request path of the provider goes through here or through
    /// [`local_check`](Self::local_check) first, so a reference that a
    /// local check refuses never reaches the network.
    async fn resolve(&self, kms_ref: &KmsRef, shown: &str) -> Result<KmsKey> {
        self.local_check(kms_ref)
            .map_err(|reason| refused(shown, &reason))?;
        let alias = match kms_ref {
            KmsRef::Key(k) => return Ok(k.clone()),
            KmsRef::Alias(a) => a,
        };
        let ttl = self.config.alias_ttl();
        if let Some((key, at)) = self.lock_aliases().get(alias) {
            if at.elapsed() < ttl {
                return Ok(key.clone());
            }
        }
        let key = self.describe_raw(alias, shown).await.and_then(|meta| {
            KmsKey::from_metadata(meta.key_id(), meta.arn()).ok_or_else(|| {
                other(format!(
                    "KMS described alias {shown} with an unusable key id {:?}",
                    meta.key_id()
                ))
            })
        })?;
        // An alias names a key of its own account and region; checked all
        // the same, before the key is used.
        self.local_check(&KmsRef::Key(key.clone()))
            .map_err(|reason| refused(shown, &format!("it resolves to {}: {reason}", key.pin())))?;
        if !ttl.is_zero() {
            let mut cache = self.lock_aliases();
            if cache.len() >= ALIAS_CACHE_MAX {
                cache.clear();
            }
            cache.insert(alias.clone(), (key.clone(), Instant::now()));
        }
        Ok(key)
    }

    /// Every check of a reference that needs no request: the account
    /// allow-list, the region and partition of the client, for the key or
    /// alias ARN forms (a bare key id or alias name is resolved by KMS in
    /// the caller's own account and region). `Err` says why, for a refusal.
    fn local_check(&self, kms_ref: &KmsRef) -> std::result::Result<(), String> {
        let Some(arn) = kms_ref.arn() else {
            return Ok(());
        };
        let partition = partition_of(&self.region);
        if arn.partition != partition {
            return Err(format!(
                "it is in partition {}, but this provider's client (region {}) is in partition \
                 {partition}",
                arn.partition, self.region
            ));
        }
        if arn.region != self.region {
            return Err(format!(
                "it is in region {}, but this provider's client is in {}; KMS keys are \
                 regional: use a provider whose client is in that region",
                arn.region, self.region
            ));
        }
        if !self.config.account_allowed(arn.account) {
            return Err(format!(
                "it names account {}, which is not in this provider's allowed_accounts",
                arn.account
            ));
        }
        Ok(())
    }

    /// The key ARN of `key`, as a header records it: local for a key ARN,
    /// DescribeKey for an alias (cached for the alias TTL) or a bare id.
    async fn key_identity(&self, key: &KeyRef) -> Result<Option<KeyIdentity>> {
        let kms_ref = self.kms_ref(key)?;
        let resolved = match &kms_ref {
            KmsRef::Key(k) if k.arn.is_none() => {
                self.local_check(&kms_ref)
                    .map_err(|reason| refused(key.as_str(), &reason))?;
                let meta = self.describe_raw(&k.id, key.as_str()).await?;
                let found = KmsKey::from_metadata(meta.key_id(), meta.arn())
                    .filter(|found| k.matches(found.pin()))
                    .ok_or_else(|| mismatch(meta.arn().unwrap_or(meta.key_id()), k))?;
                self.local_check(&KmsRef::Key(found.clone()))
                    .map_err(|reason| refused(key.as_str(), &reason))?;
                found
            }
            _ => self.resolve(&kms_ref, key.as_str()).await?,
        };
        // Without an ARN (a KMS-compatible server that reports none) the
        // identity is unknown: the keyring then flushes more, never less.
        Ok(match resolved.arn {
            Some(_) => Some(KeyIdentity::new(PROVIDER_ID, Self::header_ref(&resolved)?)),
            None => None,
        })
    }

    fn lock_aliases(&self) -> std::sync::MutexGuard<'_, HashMap<String, (KmsKey, Instant)>> {
        // The map holds no invariant a panic could break.
        self.aliases.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn describe_raw(
        &self,
        key_id: &str,
        shown: &str,
    ) -> Result<aws_sdk_kms::types::KeyMetadata> {
        let out = self
            .client
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| fail("DescribeKey", shown, CallKind::Manage, e))?;
        out.key_metadata.ok_or_else(|| {
            other(format!(
                "KMS DescribeKey for {shown} returned no key metadata"
            ))
        })
    }

    /// The header reference of a key.
    fn header_ref(key: &KmsKey) -> Result<String> {
        let text = format!("{PROVIDER_ID}:{}", key.pin());
        KeyRef::parse(&text).map(|r| r.to_string()).map_err(|_| {
            other(format!(
                "KMS answered with an unusable key id {}",
                key.pin()
            ))
        })
    }

    fn entry(key: &KmsKey, wrapped: Vec<u8>) -> Result<WrappedKey> {
        Ok(WrappedKey {
            provider: PROVIDER_ID.to_owned(),
            key_ref: Self::header_ref(key)?,
            key_version: KMS_KEY_VERSION,
            wrapped,
        })
    }

    /// Checks the KeyId of an answer and returns the key for the header.
    fn answered(expected: &KmsKey, answered: Option<&str>) -> Result<KmsKey> {
        let answered = answered.unwrap_or("");
        if !expected.matches(answered) {
            return Err(mismatch(
                if answered.is_empty() {
                    "<none>"
                } else {
                    answered
                },
                expected,
            ));
        }
        Ok(expected.canonical(answered))
    }

    async fn generate_dek(
        &self,
        key: &KeyRef,
        context: &EncryptionContext,
    ) -> Result<GeneratedDek> {
        let target = self.resolve(&self.kms_ref(key)?, key.as_str()).await?;
        let mut out = self
            .client
            .generate_data_key()
            .key_id(target.pin())
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(to_hash_map(self.config.kms_context(context, 0))))
            .send()
            .await
            .map_err(|e| fail("GenerateDataKey", key.as_str(), CallKind::Encrypt, e))?;
        let dek = take_dek(out.plaintext.take());
        let header_key = Self::answered(&target, out.key_id.as_deref())?;
        let dek = dek.ok_or_else(|| {
            other(format!(
                "KMS GenerateDataKey for {key} returned no {DEK_LEN}-byte plaintext key"
            ))
        })?;
        let wrapped = checked_blob(out.ciphertext_blob.take(), "GenerateDataKey")?;
        Ok(GeneratedDek {
            dek,
            wrapped: Self::entry(&header_key, wrapped)?,
        })
    }

    async fn wrap_dek(
        &self,
        key: &KeyRef,
        dek: &Dek,
        context: &EncryptionContext,
    ) -> Result<WrappedKey> {
        let target = self.resolve(&self.kms_ref(key)?, key.as_str()).await?;
        let mut out = self
            .client
            .encrypt()
            .key_id(target.pin())
            .plaintext(Blob::new(dek.expose_secret().to_vec()))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .set_encryption_context(Some(to_hash_map(self.config.kms_context(context, 0))))
            .send()
            .await
            .map_err(|e| fail("Encrypt", key.as_str(), CallKind::Encrypt, e))?;
        let header_key = Self::answered(&target, out.key_id.as_deref())?;
        let wrapped = checked_blob(out.ciphertext_blob.take(), "Encrypt")?;
        Self::entry(&header_key, wrapped)
    }

    /// The pinned key of a header entry; `None` when the entry is not one
    /// this provider may use (foreign account, unparseable reference).
    async fn entry_key(&self, entry: &WrappedKey) -> Result<Option<KmsKey>> {
        let Ok(key_ref) = KeyRef::parse(&entry.key_ref) else {
            return Ok(None);
        };
        let Ok(kms_ref) = self.kms_ref(&key_ref) else {
            return Ok(None);
        };
        // Headers record key ARNs (or, from servers that answer with bare
        // ids, key ids), never aliases: an alias in a header was not written
        // by this provider, and resolving it would tell the alias's owner
        // who opens which message when. Then every local check; the entry
        // costs no request before the Decrypt itself.
        let KmsRef::Key(key) = kms_ref else {
            return Ok(None);
        };
        if self.local_check(&KmsRef::Key(key.clone())).is_err() {
            return Ok(None);
        }
        Ok(Some(key))
    }

    async fn unwrap_entry(
        &self,
        entry: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<Unwrapped> {
        if entry.provider != PROVIDER_ID {
            return Ok(Unwrapped::NotMine);
        }
        if entry.key_version != KMS_KEY_VERSION || entry.wrapped.is_empty() {
            return Ok(Unwrapped::Rejected);
        }
        let Some(key) = self.entry_key(entry).await? else {
            return Ok(Unwrapped::NotMine);
        };
        for index in 0..self.config.context_key_count() {
            let result = self
                .client
                .decrypt()
                .key_id(key.pin())
                .ciphertext_blob(Blob::new(entry.wrapped.clone()))
                .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
                .set_encryption_context(Some(to_hash_map(self.config.kms_context(context, index))))
                .send()
                .await;
            let mut out = match result {
                Ok(out) => out,
                Err(e) => match classify("Decrypt", &entry.key_ref, CallKind::Decrypt, e) {
                    Failure::Rejected => continue,
                    Failure::Error(e) => return Err(e),
                },
            };
            let dek = take_dek(out.plaintext.take());
            Self::answered(&key, out.key_id.as_deref())?;
            // A ciphertext of another length under our key is not a DEK of
            // ours: opaque, like any other foreign wrapped key.
            return Ok(dek.map_or(Unwrapped::Rejected, Unwrapped::Key));
        }
        Ok(Unwrapped::Rejected)
    }

    async fn rewrap_entry(
        &self,
        entry: &WrappedKey,
        key: &KeyRef,
        context: &EncryptionContext,
    ) -> Result<Option<WrappedKey>> {
        if entry.provider != PROVIDER_ID || entry.key_version != KMS_KEY_VERSION {
            return Ok(None);
        }
        let Some(source) = self.entry_key(entry).await? else {
            return Ok(None);
        };
        let destination = self.resolve(&self.kms_ref(key)?, key.as_str()).await?;
        let destination_context = to_hash_map(self.config.kms_context(context, 0));
        for index in 0..self.config.context_key_count() {
            let result = self
                .client
                .re_encrypt()
                .ciphertext_blob(Blob::new(entry.wrapped.clone()))
                .source_key_id(source.pin())
                .source_encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
                .set_source_encryption_context(Some(to_hash_map(
                    self.config.kms_context(context, index),
                )))
                .destination_key_id(destination.pin())
                .destination_encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
                .set_destination_encryption_context(Some(destination_context.clone()))
                .send()
                .await;
            let mut out = match result {
                Ok(out) => out,
                Err(e) => match classify("ReEncrypt", &entry.key_ref, CallKind::Decrypt, e) {
                    Failure::Rejected => continue,
                    // The keyring holds the DEK already: where only ReEncrypt
                    // is refused (state or permission of the source key), it
                    // falls back to Encrypt under the destination, which
                    // reports any problem of the destination key itself.
                    Failure::Error(Error::Provider(p))
                        if !matches!(
                            p.kind(),
                            ProviderErrorKind::Unavailable | ProviderErrorKind::Throttled
                        ) =>
                    {
                        return Ok(None)
                    }
                    Failure::Error(e) => return Err(e),
                },
            };
            if !out
                .source_key_id
                .as_deref()
                .is_none_or(|s| source.matches(s))
            {
                return Err(mismatch(
                    out.source_key_id.as_deref().unwrap_or(""),
                    &source,
                ));
            }
            let header_key = Self::answered(&destination, out.key_id.as_deref())?;
            let wrapped = checked_blob(out.ciphertext_blob.take(), "ReEncrypt")?;
            return Self::entry(&header_key, wrapped).map(Some);
        }
        Ok(None)
    }

    /// DescribeKey → [`KeyInfo`].
    async fn describe_key(&self, key: &KeyRef) -> Result<KeyInfo> {
        let target = self.resolve(&self.kms_ref(key)?, key.as_str()).await?;
        self.describe_resolved(&target, key.as_str()).await
    }

    async fn describe_resolved(&self, target: &KmsKey, shown: &str) -> Result<KeyInfo> {
        use aws_sdk_kms::types::KeyState as S;
        let meta = self.describe_raw(target.pin(), shown).await?;
        let key = KmsKey::from_metadata(meta.key_id(), meta.arn())
            .filter(|k| target.matches(k.pin()))
            .ok_or_else(|| mismatch(meta.arn().unwrap_or(meta.key_id()), target))?;
        if meta
            .key_spec()
            .is_some_and(|s| *s != KeySpec::SymmetricDefault)
            || meta
                .key_usage()
                .is_some_and(|u| *u != KeyUsageType::EncryptDecrypt)
        {
            return Err(misconfigured(format!(
                "KMS key {shown} is not a symmetric encryption key: phi-envelope needs KeySpec \
                 SYMMETRIC_DEFAULT and KeyUsage ENCRYPT_DECRYPT"
            )));
        }
        let state = match meta.key_state() {
            Some(S::Enabled) | Some(S::Updating) => KeyState::Enabled,
            Some(S::PendingDeletion) | Some(S::PendingReplicaDeletion) => KeyState::Destroyed,
            _ => KeyState::Disabled,
        };
        let created = meta
            .creation_date()
            .and_then(|d| SystemTime::try_from(*d).ok());
        let key_ref = KeyRef::parse(&Self::header_ref(&key)?)?;
        Ok(KeyInfo::new(
            key_ref,
            (state == KeyState::Enabled).then_some(KMS_KEY_VERSION),
            vec![KeyVersionInfo::new(KMS_KEY_VERSION, state, created)],
        ))
    }

    /// The KeyId of a lifecycle call: the bare key id. Key management is
    /// never cross-account in KMS, and a bare id is what every KMS-API
    /// server accepts for it (moto 5.2 fails DisableKey and
    /// ScheduleKeyDeletion given an ARN). A key ARN of another region is
    /// refused rather than resolved to a same-id replica in this one.
    fn manage_id<'k>(&self, key: &'k KmsKey, shown: &str) -> Result<&'k str> {
        match key.region() {
            Some(region) if region != self.region => Err(misconfigured(format!(
                "{shown} is in region {region} but this provider's client is in {}: manage a \
                 key with a client of its own region",
                self.region
            ))),
            _ => Ok(&key.id),
        }
    }

    /// Resolves `key` for a lifecycle verb on `version` (always 1).
    async fn manage_target(&self, key: &KeyRef, version: u32) -> Result<KmsKey> {
        if version != KMS_KEY_VERSION {
            return Err(provider_error(
                ProviderErrorKind::KeyNotFound,
                format!(
                    "{key} has no version {version}: a KMS key has the single phi-envelope \
                     version {KMS_KEY_VERSION} (KMS rotation is internal to the key)"
                ),
            ));
        }
        self.resolve(&self.kms_ref(key)?, key.as_str()).await
    }

    async fn create(&self, key: &KeyRef) -> Result<KeyInfo> {
        let kms_ref = self.kms_ref(key)?;
        self.local_check(&kms_ref)
            .map_err(|reason| refused(key.as_str(), &reason))?;
        let alias = match kms_ref {
            KmsRef::Alias(a) => match a.find(":alias/") {
                Some(i) => a[i + 1..].to_owned(),
                None => a,
            },
            KmsRef::Key(_) => {
                return Err(provider_error(
                    ProviderErrorKind::Unsupported,
                    format!(
                        "cannot create {key}: KMS chooses key ids; name the new key with an \
                         alias (aws-kms:alias/NAME)"
                    ),
                ))
            }
        };
        let shown = key.as_str();
        let meta = self
            .client
            .create_key()
            .key_spec(KeySpec::SymmetricDefault)
            .key_usage(KeyUsageType::EncryptDecrypt)
            .description(format!("phi-envelope key-encryption key {alias}"))
            .send()
            .await
            .map_err(|e| fail("CreateKey", shown, CallKind::Manage, e))?
            .key_metadata
            .ok_or_else(|| {
                other(format!(
                    "KMS CreateKey for {shown} returned no key metadata"
                ))
            })?;
        let created = KmsKey::from_metadata(meta.key_id(), meta.arn()).ok_or_else(|| {
            other(format!(
                "KMS CreateKey for {shown} returned an unusable key id"
            ))
        })?;
        let aliased = self
            .client
            .create_alias()
            .alias_name(&alias)
            .target_key_id(&created.id)
            .send()
            .await;
        if let Err(e) = aliased {
            // Do not leave an unnamed, unused key behind (best effort: the
            // shortest waiting period; it holds no data yet).
            let _ = self
                .client
                .schedule_key_deletion()
                .key_id(&created.id)
                .pending_window_in_days(7)
                .send()
                .await;
            return Err(fail("CreateAlias", shown, CallKind::Manage, e));
        }
        if self.config.rotates_automatically() {
            self.client
                .enable_key_rotation()
                .key_id(&created.id)
                .send()
                .await
                .map_err(|e| fail("EnableKeyRotation", shown, CallKind::Manage, e))?;
        }
        self.lock_aliases().remove(&alias);
        self.describe_resolved(&created, shown).await
    }

    async fn rotate_key(&self, key: &KeyRef) -> Result<KeyInfo> {
        let target = self.manage_target(key, KMS_KEY_VERSION).await?;
        self.client
            .rotate_key_on_demand()
            .key_id(self.manage_id(&target, key.as_str())?)
            .send()
            .await
            .map_err(|e| fail("RotateKeyOnDemand", key.as_str(), CallKind::Manage, e))?;
        self.describe_resolved(&target, key.as_str()).await
    }

    async fn change_state(&self, key: &KeyRef, version: u32, state: KeyState) -> Result<KeyInfo> {
        let target = self.manage_target(key, version).await?;
        let shown = key.as_str();
        match state {
            KeyState::Enabled => {
                self.client
                    .enable_key()
                    .key_id(self.manage_id(&target, shown)?)
                    .send()
                    .await
                    .map_err(|e| fail("EnableKey", shown, CallKind::Manage, e))?;
            }
            KeyState::Disabled => {
                self.client
                    .disable_key()
                    .key_id(self.manage_id(&target, shown)?)
                    .send()
                    .await
                    .map_err(|e| fail("DisableKey", shown, CallKind::Manage, e))?;
            }
            KeyState::DecryptOnly => {
                return Err(provider_error(
                    ProviderErrorKind::Unsupported,
                    format!(
                        "KMS has no decrypt-only key state ({key}): deny kms:Encrypt and \
                         kms:GenerateDataKey in the key policy, or rotate to a new key (alias) \
                         and rewrap"
                    ),
                ))
            }
            _ => {
                return Err(provider_error(
                    ProviderErrorKind::InvalidState,
                    format!("use destroy to schedule the deletion of {key}"),
                ))
            }
        }
        self.describe_resolved(&target, shown).await
    }

    async fn destroy_key(&self, key: &KeyRef, version: u32) -> Result<KeyInfo> {
        let target = self.manage_target(key, version).await?;
        self.client
            .schedule_key_deletion()
            .key_id(self.manage_id(&target, key.as_str())?)
            .pending_window_in_days(self.config.deletion_window())
            .send()
            .await
            .map_err(|e| fail("ScheduleKeyDeletion", key.as_str(), CallKind::Manage, e))?;
        self.describe_resolved(&target, key.as_str()).await
    }
}

/// An SDK failure as an error (a rejection outside Decrypt is an error too).
fn fail<E>(operation: &str, key: &str, call: CallKind, e: aws_sdk_kms::error::SdkError<E>) -> Error
where
    E: aws_sdk_kms::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match classify(operation, key, call, e) {
        Failure::Error(e) => e,
        Failure::Rejected => Error::Decrypt,
    }
}

impl KeyProvider for AwsKmsProvider {
    fn id(&self) -> &str {
        PROVIDER_ID
    }

    /// Encrypt under the key (an alias resolved to its key ARN).
    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(self.wrap_dek(key, dek, context))
    }

    /// Decrypt with the KeyId pinned to the entry's key.
    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(self.unwrap_entry(entry, context))
    }

    /// DescribeKey: one version (1) in the state mapped from the KMS state.
    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.describe_key(key))
    }

    /// GenerateDataKey (AES_256): the DEK comes from KMS's random source.
    fn generate<'a>(
        &'a self,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<GeneratedDek>> {
        Box::pin(self.generate_dek(key, context))
    }

    /// The key ARN (as `aws-kms:ARN`, the form headers record) of any
    /// spelling: key id, key ARN, alias, alias ARN. Local for a key ARN;
    /// DescribeKey for the others (aliases cached for the alias TTL). A
    /// reference that a local check refuses (account, region, partition)
    /// is an error, with no request made.
    fn identity<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        Box::pin(self.key_identity(key))
    }

    /// A header entry's key ARN with no request at all for an alias (never
    /// written by this provider) or for an entry that fails a local check;
    /// [`identity`](KeyProvider::identity) otherwise.
    fn entry_identity<'a>(
        &'a self,
        entry: &'a WrappedKey,
    ) -> BoxFuture<'a, Result<Option<KeyIdentity>>> {
        Box::pin(async move {
            if entry.provider != PROVIDER_ID {
                return Ok(None);
            }
            let Ok(key_ref) = KeyRef::parse(&entry.key_ref) else {
                return Ok(None);
            };
            match self.kms_ref(&key_ref) {
                Ok(KmsRef::Key(k)) if self.local_check(&KmsRef::Key(k.clone())).is_ok() => {
                    self.key_identity(&key_ref).await
                }
                _ => Ok(None),
            }
        })
    }

    fn supports_rewrap(&self) -> bool {
        true
    }

    /// ReEncrypt: the DEK never leaves KMS. `Ok(None)` (the keyring then
    /// wraps with Encrypt) for an entry of another provider, or when KMS
    /// refuses the re-encryption for the source key's sake.
    fn rewrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        key: &'a KeyRef,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Option<WrappedKey>>> {
        Box::pin(self.rewrap_entry(entry, key, context))
    }

    /// CreateKey + CreateAlias (+ EnableKeyRotation); alias references only.
    fn create_key<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.create(key))
    }

    /// RotateKeyOnDemand; the phi-envelope version stays 1.
    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.rotate_key(key))
    }

    /// EnableKey / DisableKey for version 1.
    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.change_state(key, version, state))
    }

    /// ScheduleKeyDeletion with the configured waiting period.
    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(self.destroy_key(key, version))
    }
}

#[cfg(test)]
mod tests {
    use super::partition_of;

    #[test]
    fn partitions_by_region() {
        for (region, partition) in [
            ("us-east-1", "aws"),
            ("eu-west-3", "aws"),
            ("cn-north-1", "aws-cn"),
            ("us-gov-west-1", "aws-us-gov"),
            ("us-iso-east-1", "aws-iso"),
            ("us-isob-east-1", "aws-iso-b"),
        ] {
            assert_eq!(partition_of(region), partition, "{region}");
        }
    }
}
