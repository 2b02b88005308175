//! Key policies ([`KeyPolicy`], [`OnExpired`]) and the cryptoperiod check
//! of encryption: the primary version's age from `describe` (cached for
//! the describe TTL, one call however many tasks ask), refused or rotated
//! first (one rotation however many tasks find it expired).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cache::Join;
use crate::error::{Error, Result};
use crate::events::Operation;
use crate::provider::{KeyInfo, KeyRef};

use super::{call::Call, lock, Caller, Keyring, PrimaryId};

/// What encrypting does when the primary version of a key is older than
/// its [cryptoperiod](KeyPolicy::cryptoperiod).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnExpired {
    /// Refuse with [`Error::KeyLifecycle`]: an operator rotates the key
    /// (`backup keys rotate REF`) and encryption resumes.
    #[default]
    Refuse,
    /// Rotate the key first (one rotation, however many tasks are
    /// encrypting), then encrypt under the new primary. If the rotation
    /// fails, nothing is encrypted and the error is
    /// [`Error::KeyLifecycle`]; the old primary stays in place, so messages
    /// already written still open.
    RotateFirst,
}

/// The lifecycle rules of one key reference, enforced by the keyring for
/// every provider (see [`KeyringBuilder::key_policy`](crate::keyring::KeyringBuilder::key_policy)).
///
/// ```
/// use std::time::Duration;
/// use phi_envelope::keyring::{KeyPolicy, OnExpired};
///
/// let policy = KeyPolicy::new()
///     .min_decrypt_version(3)
///     .cryptoperiod(Duration::from_secs(365 * 24 * 3600))
///     .on_expired(OnExpired::Refuse);
/// assert_eq!(policy.min_decrypt_version, Some(3));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyPolicy {
    /// Header entries under an older version of this key are refused with
    /// [`Error::KeyLifecycle`] (and an event) before any provider call or
    /// cache lookup. Raise it once every message under the old versions has
    /// been rewrapped; it is the keyring-side guard that a version is
    /// retired, before it is disabled or destroyed in the provider.
    pub min_decrypt_version: Option<u32>,
    /// The maximum age of the primary version for encryption (NIST SP
    /// 800-57's originator-usage period), measured from the creation time
    /// the provider reports in [`describe`](Keyring::describe). A provider
    /// that reports no creation time cannot have a cryptoperiod enforced:
    /// encryption is then refused rather than let through unchecked.
    pub cryptoperiod: Option<Duration>,
    /// What happens when the primary is older than the cryptoperiod.
    pub on_expired: OnExpired,
}

impl KeyPolicy {
    /// No rules.
    pub fn new() -> KeyPolicy {
        KeyPolicy::default()
    }

    /// Sets [`min_decrypt_version`](Self::min_decrypt_version).
    pub fn min_decrypt_version(mut self, version: u32) -> KeyPolicy {
        self.min_decrypt_version = Some(version);
        self
    }

    /// Sets [`cryptoperiod`](Self::cryptoperiod).
    pub fn cryptoperiod(mut self, period: Duration) -> KeyPolicy {
        self.cryptoperiod = Some(period);
        self
    }

    /// Sets [`on_expired`](Self::on_expired).
    pub fn on_expired(mut self, on_expired: OnExpired) -> KeyPolicy {
        self.on_expired = on_expired;
        self
    }
}

impl Keyring {
    /// Checks the cryptoperiod of every recipient that has one: refuses or
    /// rotates first, as configured. Returns the earliest end of the
    /// recipients' cryptoperiods. Describes a key only when a cryptoperiod
    /// is configured for it, and reuses the answer for the describe TTL.
    pub(super) async fn check_cryptoperiods(
        &self,
        recipients: &[KeyRef],
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Option<SystemTime>> {
        let mut earliest: Option<SystemTime> = None;
        for key in recipients {
            let Some(policy) = self.policy_for_key(key).await? else {
                continue;
            };
            let Some(period) = policy.cryptoperiod else {
                continue;
            };
            if let Some(end) = self
                .primary_period_end(key, policy, period, caller, fingerprint)
                .await?
            {
                earliest = Some(earliest.map_or(end, |e| e.min(end)));
            }
        }
        Ok(earliest)
    }

    async fn primary_period_end(
        &self,
        key: &KeyRef,
        policy: &KeyPolicy,
        period: Duration,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Option<SystemTime>> {
        // The primary that this call rotated away from.
        let mut rotated_from: Option<PrimaryId> = None;
        loop {
            let info = self.described(key, caller).await?;
            // No primary: the provider refuses the wrap itself, clearly.
            let Some(primary) = info.primary() else {
                return Ok(None);
            };
            let refusal = |message: String| async move {
                self.lifecycle_refusal(
                    &Call {
                        operation: Operation::Generate,
                        provider: key.scheme(),
                        key_ref: Some(key.as_str()),
                        key_version: Some(primary.version),
                        key_state: None,
                        approvers: &[],
                        caller,
                        fingerprint: Some(fingerprint.to_owned()),
                    },
                    message,
                )
                .await
            };
            let Some(created) = primary.created_at else {
                return Err(refusal(format!(
                    "a cryptoperiod is set for {key}, but its provider does not report when version {} was created, so the period cannot be enforced; remove the cryptoperiod for this key or use a provider that reports creation times",
                    primary.version
                )).await);
            };
            // A period too long to represent never ends.
            let Some(end) = created.checked_add(period) else {
                return Ok(None);
            };
            let now = SystemTime::now();
            if now < end {
                return Ok(Some(end));
            }
            let age = now.duration_since(created).unwrap_or_default();
            let current = (primary.version, primary.created_at);
            if rotated_from == Some(current) || self.was_rotated_away(key, current) {
                // AWS KMS, for one, rotates key material inside one version
                // and keeps reporting the key's creation time.
                return Err(refusal(format!(
                    "{key} was rotated, but its provider still reports the same primary version {} created {}s ago, past the cryptoperiod of {}s: it rotates key material inside one version (AWS KMS does), so the keyring cannot tell the new material's age; rely on the provider's own rotation schedule (e.g. KMS automatic key rotation) and remove the cryptoperiod from this key's policy",
                    primary.version,
                    age.as_secs(),
                    period.as_secs()
                )).await);
            }
            if rotated_from.is_some() {
                // Just rotated to this version: use it for this message even
                // if the period is shorter than the time since; `now` keeps
                // it out of the cache.
                return Ok(Some(now));
            }
            let age = now.duration_since(created).unwrap_or_default();
            match policy.on_expired {
                OnExpired::Refuse => {
                    return Err(refusal(format!(
                        "the primary version {} of {key} is {}s old, past its cryptoperiod of {}s; rotate the key (backup keys rotate {key}) and encrypt again",
                        primary.version,
                        age.as_secs(),
                        period.as_secs()
                    )).await);
                }
                OnExpired::RotateFirst => {
                    let expired = (primary.version, primary.created_at);
                    if let Err(e) = self.rotate_once(key, expired, caller).await {
                        return Err(Error::KeyLifecycle(format!(
                            "the primary version {} of {key} is past its cryptoperiod of {}s and rotating it first failed, so nothing was encrypted; version {} stays primary and existing messages still open. Cause: {e}",
                            primary.version,
                            period.as_secs(),
                            primary.version
                        )));
                    }
                    rotated_from = Some(expired);
                }
            }
        }
    }

    /// Rotates `key` once for every task that found its primary `expired`
    /// at the same time: one task rotates, the others wait for it; if it
    /// fails, the next one tries.
    async fn rotate_once(&self, key: &KeyRef, expired: PrimaryId, caller: &Caller) -> Result<()> {
        let mut id = b"rotate\x00".to_vec();
        id.extend_from_slice(key.as_str().as_bytes());
        let id = crate::cache::EntryId(id);
        loop {
            let done = |info: &KeyInfo| {
                self.was_rotated_away(key, expired)
                    || info
                        .primary()
                        .is_none_or(|p| (p.version, p.created_at) != expired)
            };
            match self.flights.join(&id) {
                Join::Leader(_flight) => {
                    if done(&*self.described(key, caller).await?) {
                        return Ok(());
                    }
                    self.rotate_unchecked(key, caller).await?;
                    return Ok(());
                }
                Join::Waiter(wait) => {
                    wait.await;
                    if done(&*self.described(key, caller).await?) {
                        return Ok(());
                    }
                    // The leader failed: try ourselves.
                }
            }
        }
    }

    /// Whether a rotation through this keyring already moved `key` away
    /// from the primary `id`.
    fn was_rotated_away(&self, key: &KeyRef, id: PrimaryId) -> bool {
        let slots = self.rotation_slots(key);
        let away = lock(&self.rotated_away);
        slots.iter().any(|slot| away.get(slot) == Some(&id))
    }

    /// Where a rotation of `key` is remembered: its spelling, and its
    /// identity where known, so that a rotation through one spelling counts
    /// for the others.
    pub(super) fn rotation_slots(&self, key: &KeyRef) -> Vec<String> {
        let mut slots = vec![key.as_str().to_owned()];
        if let Some(identity) = self.cached_identity(false, key.as_str()) {
            slots.push(format!("{}\x00{}", identity.provider(), identity.as_str()));
        }
        slots
    }

    /// `describe(key)`, reused for the describe TTL; one call however many
    /// tasks ask at once.
    async fn described(&self, key: &KeyRef, caller: &Caller) -> Result<Arc<KeyInfo>> {
        let fresh = || -> Option<Arc<KeyInfo>> {
            let map = lock(&self.described);
            map.get(key.as_str())
                .filter(|(_, at)| at.elapsed() < self.describe_ttl)
                .map(|(info, _)| info.clone())
        };
        let mut id = b"describe\x00".to_vec();
        id.extend_from_slice(key.as_str().as_bytes());
        let id = crate::cache::EntryId(id);
        let load = || async { Ok(Arc::new(self.describe(key, caller).await?)) };
        self.flights
            .find_or_load(&id, fresh, |info| std::future::ready(Ok(info)), load)
            .await
    }

    pub(super) fn remember(&self, key: &KeyRef, info: &KeyInfo) {
        lock(&self.described).insert(
            key.as_str().to_owned(),
            (Arc::new(info.clone()), Instant::now()),
        );
    }

    /// The primary version of every key in `keys`, from the (TTL-cached)
    /// descriptions; `None` if one is unknown.
    pub(crate) async fn primary_versions(
        &self,
        keys: &[KeyRef],
        caller: &Caller,
    ) -> Option<Vec<u32>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.described(key, caller).await.ok()?.primary_version?);
        }
        Some(out)
    }
}
