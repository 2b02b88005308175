//! Key identity (see [`KeyIdentity`]): which spellings name one key, cached
//! for the describe TTL; flushing the data-key cache by identity; and the
//! [`KeyPolicy`] that applies to a recipient or a header entry, whatever
//! spelling it was set for.

use std::future::Future;
use std::time::Instant;

use crate::cache::{FlushTarget, KeyTag};
use crate::error::{Error, Result};
use crate::format::WrappedKey;
use crate::provider::{KeyIdentity, KeyRef};

use super::{lock, provider_of, KeyPolicy, Keyring};

impl Keyring {
    /// Drops every cached data key (both caches). Keys unwrapped by calls
    /// already under way are not cached afterwards.
    pub fn flush_cache(&self) {
        if let Some(c) = &self.cache {
            c.flush_all();
        }
    }

    /// Drops every cached data key that involves `key` (any version, any
    /// spelling of the same key), and forgets its cached description. The
    /// lifecycle verbs do this themselves; call it after changing the key
    /// elsewhere (another process, the provider's console).
    ///
    /// This makes no provider call: where the identity of `key` is not
    /// known yet (this keyring has not seen the spelling within the
    /// describe TTL) or the provider reports none, every cached data key of
    /// the provider is dropped.
    pub fn flush_cache_for(&self, key: &KeyRef) {
        let identity = self.cached_identity(false, key.as_str());
        self.flush_identity(key, identity.as_ref());
    }

    /// Most identity answers kept at once (references can come from
    /// headers).
    const IDENTITY_CACHE_MAX: usize = 4096;

    /// A fresh cached identity answer; `None` when unknown or not cached.
    pub(super) fn cached_identity(&self, entry: bool, text: &str) -> Option<KeyIdentity> {
        lock(&self.identities)
            .get(&(entry, text.to_owned()))
            .filter(|(_, at)| at.elapsed() < self.describe_ttl)
            .and_then(|(id, _)| id.clone())
    }

    fn remember_identity(&self, entry: bool, text: &str, identity: &Option<KeyIdentity>) {
        if self.describe_ttl.is_zero() {
            return;
        }
        let mut map = lock(&self.identities);
        if map.len() >= Self::IDENTITY_CACHE_MAX {
            map.clear();
        }
        map.insert((entry, text.to_owned()), (identity.clone(), Instant::now()));
    }

    /// The identity of `key` as its provider reports it (reused for the
    /// describe TTL). Not a key access: no policy request, no event (for
    /// AWS KMS it is the DescribeKey that resolving an alias makes anyway).
    pub(super) async fn identity_of(&self, key: &KeyRef) -> Result<Option<KeyIdentity>> {
        let known = lock(&self.identities)
            .get(&(false, key.as_str().to_owned()))
            .filter(|(_, at)| at.elapsed() < self.describe_ttl)
            .map(|(id, _)| id.clone());
        if let Some(known) = known {
            return Ok(known);
        }
        let Some(provider) = self.provider(key.scheme()) else {
            return Ok(None);
        };
        let identity = provider
            .identity(key)
            .await?
            .filter(|i| i.provider() == provider.id());
        self.remember_identity(false, key.as_str(), &identity);
        Ok(identity)
    }

    /// The identity of the key a header entry names
    /// ([`KeyProvider::entry_identity`]), reused for the describe TTL.
    pub(super) async fn entry_identity_of(
        &self,
        entry: &WrappedKey,
    ) -> Result<Option<KeyIdentity>> {
        let text = format!("{}\x00{}", entry.provider, entry.key_ref);
        let known = lock(&self.identities)
            .get(&(true, text.clone()))
            .filter(|(_, at)| at.elapsed() < self.describe_ttl)
            .map(|(id, _)| id.clone());
        if let Some(known) = known {
            return Ok(known);
        }
        let Some(provider) = self.provider(&entry.provider) else {
            return Ok(None);
        };
        let identity = provider
            .entry_identity(entry)
            .await?
            .filter(|i| i.provider() == provider.id());
        self.remember_identity(true, &text, &identity);
        Ok(identity)
    }

    /// Drops cached data keys and descriptions of the key `key` names,
    /// whose identity is `identity` (`None`: unknown, so every key of its
    /// provider).
    fn flush_identity(&self, key: &KeyRef, identity: Option<&KeyIdentity>) {
        let target = FlushTarget {
            provider: key.scheme(),
            text: key.as_str(),
            identity,
        };
        if let Some(c) = &self.cache {
            c.flush_key(&target);
        }
        let described: Vec<String> = lock(&self.described).keys().cloned().collect();
        let stale: Vec<String> = described
            .into_iter()
            .filter(|text| {
                KeyTag {
                    provider: provider_of(text).to_owned(),
                    text: text.clone(),
                    identity: self.cached_identity(false, text),
                }
                .hit_by(&target)
            })
            .collect();
        let mut map = lock(&self.described);
        for text in stale {
            map.remove(&text);
        }
    }

    /// Resolves the identity of `key` (an unknown one, or a failure to
    /// resolve it, flushes every key of the provider) and flushes it: the
    /// first step of a lifecycle verb, once the policy allowed it.
    async fn flush_key_identity(&self, key: &KeyRef) {
        let identity = self.identity_of(key).await.ok().flatten();
        self.flush_identity(key, identity.as_ref());
    }

    /// Runs a lifecycle verb's provider call after flushing what is cached
    /// of its key, by identity (see [`flush_key_identity`](Self::flush_key_identity)).
    pub(super) async fn flushed_first<T>(
        &self,
        key: &KeyRef,
        changes: bool,
        verb: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        if changes {
            self.flush_key_identity(key).await;
        }
        verb.await
    }

    /// The key policy that applies to `key` (a recipient): the one set for
    /// this spelling, else the one set for another spelling of the same key
    /// by identity. Fails closed when an identity cannot be resolved: it
    /// is then unknown whether a policy applies.
    pub(super) async fn policy_for_key(&self, key: &KeyRef) -> Result<Option<&KeyPolicy>> {
        if let Some(p) = self.key_policies.get(key.as_str()) {
            return Ok(Some(p));
        }
        if !self.has_policies_for(key.scheme()) {
            return Ok(None);
        }
        let identity = self.identity_of(key).await?;
        self.policy_by_identity(key.scheme(), identity).await
    }

    /// [`policy_for_key`](Self::policy_for_key) for a header entry.
    pub(super) async fn policy_for_entry(&self, entry: &WrappedKey) -> Result<Option<&KeyPolicy>> {
        if let Some(p) = self.key_policies.get(&entry.key_ref) {
            return Ok(Some(p));
        }
        if !self.has_policies_for(&entry.provider) {
            return Ok(None);
        }
        let identity = self.entry_identity_of(entry).await?;
        self.policy_by_identity(&entry.provider, identity).await
    }

    fn has_policies_for(&self, provider: &str) -> bool {
        self.key_policies
            .keys()
            .any(|text| provider_of(text) == provider)
    }

    async fn policy_by_identity(
        &self,
        provider: &str,
        identity: Option<KeyIdentity>,
    ) -> Result<Option<&KeyPolicy>> {
        let Some(identity) = identity else {
            return Ok(None);
        };
        // In the order of their spellings, so that the answer does not
        // depend on hashing when two spellings of one key both have a
        // policy (set one per key).
        let mut candidates: Vec<(&String, &KeyPolicy)> = self
            .key_policies
            .iter()
            .filter(|(text, _)| provider_of(text) == provider)
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        for (text, policy) in candidates {
            let Ok(key) = KeyRef::parse(text) else {
                continue;
            };
            let theirs = self.identity_of(&key).await.map_err(|e| {
                Error::KeyLifecycle(format!(
                    "cannot tell whether the key policy set for {key} applies to {identity}: the identity of {key} could not be resolved, so nothing was done. Cause: {e}"
                ))
            })?;
            if theirs.as_ref() == Some(&identity) {
                return Ok(Some(policy));
            }
        }
        Ok(None)
    }
}
