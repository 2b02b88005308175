//! [`AwsKmsConfig`]: what the provider sends to KMS of the encryption
//! context, which keys it accepts for decryption, and the SDK overrides.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use ring::hmac;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::format::EncryptionContext;

/// The name of the one KMS encryption-context entry that carries the keyed
/// digest of the whole phi-envelope encryption context.
pub const CONTEXT_DIGEST_KEY: &str = "phi-envelope:ctx";

/// Shortest accepted context digest key, in bytes.
pub const MIN_CONTEXT_KEY_LEN: usize = 32;

/// Most previous context digest keys that unwrap tries (each costs one extra
/// Decrypt call on a message that does not open under the current key).
pub const MAX_PREVIOUS_CONTEXT_KEYS: usize = 3;

/// The HMAC label of the context digest (domain separation from every other
/// use of the same secret).
const DIGEST_LABEL: &[u8] = b"phi-envelope/v1 aws-kms encryption context\x00";

/// Configuration of an [`AwsKmsProvider`](super::AwsKmsProvider) beyond
/// what the AWS `SdkConfig` carries (endpoint, region, credentials).
///
/// # What reaches KMS of the encryption context
///
/// KMS writes the encryption context of every call into CloudTrail in
/// clear, and phi-envelope context values (a record id, a patient number)
/// can be PHI. So the provider never sends the context as is. It sends:
///
/// - one entry `"phi-envelope:ctx"` whose value is
///   `base64(HMAC-SHA-256(context_key, label || canonical pairs))` over the
///   **whole** context, where `context_key` is a secret of at least 32 bytes
///   that the application configures ([`AwsKmsConfig::new`]). KMS releases a
///   DEK only for the exact digest it was wrapped with, so the context stays
///   cryptographically bound to the wrapped key; a CloudTrail reader without
///   the secret cannot test guesses of the values;
/// - plus, in clear, the pairs whose keys the application declares
///   non-sensitive with [`clear_context_keys`](Self::clear_context_keys)
///   (e.g. `tenant`, `record_type`), so that key policies and IAM conditions
///   can use them (`kms:EncryptionContext:tenant`) and auditors can read them.
///
/// The context key is as long-lived as the data: a wrapped DEK unwraps only
/// with the context key it was made with. To replace it, configure the new
/// key here and the old one with
/// [`previous_context_key`](Self::previous_context_key), then rewrap the
/// stored messages (KMS ReEncrypt moves them to the new digest without the
/// DEK leaving KMS). The set of clear keys is part of the binding in the
/// same way: decide it once per data set.
///
/// ```
/// use phi_envelope::provider::aws_kms::AwsKmsConfig;
/// # let secret = [7u8; 32];
/// let config = AwsKmsConfig::new(&secret)?.clear_context_keys(["tenant", "record_type"])?;
/// # Ok::<(), phi_envelope::Error>(())
/// ```
#[derive(Clone)]
pub struct AwsKmsConfig {
    /// Current context key first, then previous ones.
    context_keys: Vec<Zeroizing<Vec<u8>>>,
    clear_keys: BTreeSet<String>,
    allowed_accounts: Option<BTreeSet<String>>,
    alias_cache_ttl: Duration,
    deletion_window_days: i32,
    automatic_rotation: bool,
    timeout_config: Option<TimeoutConfig>,
    retry_config: Option<RetryConfig>,
}

impl fmt::Debug for AwsKmsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsConfig")
            .field("context_key", &"<redacted>")
            .field("previous_context_keys", &(self.context_keys.len() - 1))
            .field("clear_context_keys", &self.clear_keys)
            .field("allowed_accounts", &self.allowed_accounts)
            .field("alias_cache_ttl", &self.alias_cache_ttl)
            .field("deletion_window_days", &self.deletion_window_days)
            .field("automatic_rotation", &self.automatic_rotation)
            .field("timeout_config", &self.timeout_config)
            .field("retry_config", &self.retry_config)
            .finish()
    }
}

fn config_error(reason: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("aws-kms configuration: {}", reason.into()))
}

fn check_context_key(key: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if key.len() < MIN_CONTEXT_KEY_LEN {
        return Err(config_error(format!(
            "the context digest key must be at least {MIN_CONTEXT_KEY_LEN} random bytes \
             (generate it once, keep it in your secret store as long as the data)"
        )));
    }
    Ok(Zeroizing::new(key.to_vec()))
}

impl AwsKmsConfig {
    /// A configuration whose context digests are keyed with `context_key`
    /// (at least 32 random bytes from your secret store; the slice is
    /// copied into a zeroizing buffer). Defaults: no clear context keys,
    /// every key account accepted, aliases cached for 5 minutes, a 30-day
    /// deletion window, automatic yearly rotation on keys it creates, and
    /// the SDK's timeouts and retries from the `SdkConfig`.
    pub fn new(context_key: &[u8]) -> Result<AwsKmsConfig> {
        Ok(AwsKmsConfig {
            context_keys: vec![check_context_key(context_key)?],
            clear_keys: BTreeSet::new(),
            allowed_accounts: None,
            alias_cache_ttl: Duration::from_secs(300),
            deletion_window_days: 30,
            automatic_rotation: true,
            timeout_config: None,
            retry_config: None,
        })
    }

    /// Adds a previous context digest key: messages wrapped under it still
    /// unwrap (one extra Decrypt call each), and rewrap moves them to the
    /// current key. At most [`MAX_PREVIOUS_CONTEXT_KEYS`], tried in the
    /// order added.
    pub fn previous_context_key(mut self, key: &[u8]) -> Result<AwsKmsConfig> {
        if self.context_keys.len() > MAX_PREVIOUS_CONTEXT_KEYS {
            return Err(config_error(format!(
                "at most {MAX_PREVIOUS_CONTEXT_KEYS} previous context keys; rewrap old messages and retire the oldest"
            )));
        }
        self.context_keys.push(check_context_key(key)?);
        Ok(self)
    }

    /// Context keys whose values are NOT sensitive and are sent to KMS in
    /// clear next to the digest (visible in CloudTrail, usable in key
    /// policies as `kms:EncryptionContext:KEY`). Never list a key whose
    /// value can identify a patient. Names starting with `aws:` or
    /// `phi-envelope:` are reserved.
    pub fn clear_context_keys<I, S>(mut self, keys: I) -> Result<AwsKmsConfig>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for key in keys {
            let key = key.into();
            let lower = key.to_ascii_lowercase();
            if key.is_empty() || lower.starts_with("aws:") || lower.starts_with("phi-envelope:") {
                return Err(config_error(format!(
                    "clear context key {key:?} is empty or uses a reserved prefix (aws:, phi-envelope:)"
                )));
            }
            self.clear_keys.insert(key);
        }
        Ok(self)
    }

    /// Accepts only KMS keys and aliases that live in one of `accounts`
    /// (12-digit AWS account ids). A header entry naming a key in any other
    /// account is treated as not this provider's, and a recipient or
    /// lifecycle target naming one (key ARN or alias ARN) is refused; either
    /// way before any request, so no KMS call is made for it. Without this,
    /// any key the credentials may use is accepted (IAM and key policies
    /// are then the only limit).
    pub fn allowed_accounts<I, S>(mut self, accounts: I) -> Result<AwsKmsConfig>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = BTreeSet::new();
        for a in accounts {
            let a = a.into();
            if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(config_error(format!(
                    "{a:?} is not a 12-digit AWS account id"
                )));
            }
            set.insert(a);
        }
        if set.is_empty() {
            return Err(config_error("allowed_accounts needs at least one account"));
        }
        self.allowed_accounts = Some(set);
        Ok(self)
    }

    /// How long an alias stays resolved to its key ARN (default 5 minutes).
    /// After an alias is re-pointed, new messages follow it within this
    /// time; existing messages record the key ARN and are unaffected.
    /// `Duration::ZERO` resolves on every use.
    pub fn alias_cache_ttl(mut self, ttl: Duration) -> AwsKmsConfig {
        self.alias_cache_ttl = ttl;
        self
    }

    /// The waiting period of `destroy` (KMS ScheduleKeyDeletion), 7 to 30
    /// days (default 30). The key can be recovered with CancelKeyDeletion
    /// until the period ends; only then is the key material gone.
    pub fn deletion_window_days(mut self, days: u8) -> Result<AwsKmsConfig> {
        if !(7..=30).contains(&days) {
            return Err(config_error(
                "KMS accepts a deletion window of 7 to 30 days",
            ));
        }
        self.deletion_window_days = i32::from(days);
        Ok(self)
    }

    /// Whether `create_key` turns on KMS automatic key rotation (default
    /// `true`; KMS rotates the backing key yearly and keeps old material for
    /// decryption).
    pub fn automatic_rotation(mut self, yes: bool) -> AwsKmsConfig {
        self.automatic_rotation = yes;
        self
    }

    /// Timeouts of KMS calls (connect, per attempt, whole operation),
    /// overriding those of the `SdkConfig` field by field. Set at least an
    /// operation attempt timeout in production: without one a KMS endpoint
    /// that accepts the connection and never answers holds the caller.
    pub fn timeout_config(mut self, timeouts: TimeoutConfig) -> AwsKmsConfig {
        self.timeout_config = Some(timeouts);
        self
    }

    /// Retries with backoff of KMS calls (attempts, backoff), replacing the
    /// `SdkConfig`'s. The SDK retries throttling, transient and timeout
    /// errors; the default is standard mode with 3 attempts.
    pub fn retry_config(mut self, retries: RetryConfig) -> AwsKmsConfig {
        self.retry_config = Some(retries);
        self
    }

    pub(super) fn timeouts(&self) -> Option<&TimeoutConfig> {
        self.timeout_config.as_ref()
    }

    pub(super) fn retries(&self) -> Option<&RetryConfig> {
        self.retry_config.as_ref()
    }

    pub(super) fn alias_ttl(&self) -> Duration {
        self.alias_cache_ttl
    }

    pub(super) fn deletion_window(&self) -> i32 {
        self.deletion_window_days
    }

    pub(super) fn rotates_automatically(&self) -> bool {
        self.automatic_rotation
    }

    pub(super) fn account_allowed(&self, account: &str) -> bool {
        self.allowed_accounts
            .as_ref()
            .is_none_or(|set| set.contains(account))
    }

    /// Number of context keys (current + previous).
    pub(super) fn context_key_count(&self) -> usize {
        self.context_keys.len()
    }

    /// The KMS encryption context for `context` under context key `index`
    /// (0 = current).
    pub(super) fn kms_context(
        &self,
        context: &EncryptionContext,
        index: usize,
    ) -> BTreeMap<String, String> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.context_keys[index]);
        let mut mac = hmac::Context::with_key(&key);
        mac.update(DIGEST_LABEL);
        mac.update(&context.canonical_pairs());
        let digest = aws_smithy_types::base64::encode(mac.sign().as_ref());
        let mut out = BTreeMap::new();
        for (k, v) in context.iter() {
            if self.clear_keys.contains(k) {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
        out.insert(CONTEXT_DIGEST_KEY.to_owned(), digest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> EncryptionContext {
        EncryptionContext::new()
            .with("tenant", "st-mary")
            .unwrap()
            .with("patient", "MRN-123 Jane Roe")
            .unwrap()
    }

    #[test]
    fn digest_hides_values_and_clear_keys_pass() {
        let c = AwsKmsConfig::new(&[1; 32])
            .unwrap()
            .clear_context_keys(["tenant"])
            .unwrap();
        let kms = c.kms_context(&ctx(), 0);
        assert_eq!(kms.len(), 2);
        assert_eq!(kms["tenant"], "st-mary");
        let d = &kms[CONTEXT_DIGEST_KEY];
        assert_eq!(d.len(), 44);
        let all: String = kms.values().cloned().collect();
        assert!(!all.contains("Jane") && !all.contains("MRN"));
        assert!(!kms.contains_key("patient"));
    }

    #[test]
    fn digest_depends_on_key_and_every_pair() {
        let a = AwsKmsConfig::new(&[1; 32]).unwrap();
        let b = AwsKmsConfig::new(&[2; 32]).unwrap();
        let d = |c: &AwsKmsConfig, x: &EncryptionContext| {
            c.kms_context(x, 0)[CONTEXT_DIGEST_KEY].clone()
        };
        assert_eq!(d(&a, &ctx()), d(&a, &ctx()));
        assert_ne!(d(&a, &ctx()), d(&b, &ctx()));
        let other = EncryptionContext::new()
            .with("tenant", "st-mary")
            .unwrap()
            .with("patient", "MRN-124 Jane Roe")
            .unwrap();
        assert_ne!(d(&a, &ctx()), d(&a, &other));
        assert_ne!(d(&a, &ctx()), d(&a, &EncryptionContext::new()));
    }

    #[test]
    fn config_is_validated() {
        assert!(AwsKmsConfig::new(&[0; 31]).is_err());
        let c = AwsKmsConfig::new(&[0; 32]).unwrap();
        assert!(c.clone().clear_context_keys(["aws:x"]).is_err());
        assert!(c.clone().clear_context_keys(["phi-envelope:ctx"]).is_err());
        assert!(c.clone().clear_context_keys([""]).is_err());
        assert!(c.clone().allowed_accounts(["12345"]).is_err());
        assert!(c.clone().allowed_accounts(Vec::<String>::new()).is_err());
        assert!(c.clone().deletion_window_days(6).is_err());
        assert!(c.clone().deletion_window_days(31).is_err());
        let mut c2 = c.clone();
        for i in 0..MAX_PREVIOUS_CONTEXT_KEYS {
            c2 = c2.previous_context_key(&[i as u8 + 1; 32]).unwrap();
        }
        assert!(c2.previous_context_key(&[9; 32]).is_err());
        let s = format!("{c:?}");
        assert!(s.contains("<redacted>"));
    }
}
