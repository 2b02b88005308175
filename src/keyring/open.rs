//! Decryption: unwrapping a header's data key (entries in order, each
//! checked against the header tag, the minimum decryption version first),
//! the opening key from the data-key cache, and the check of every entry of
//! a rewrapped header.

use crate::cache::{KeyTag, KeyUse};
use crate::error::{Error, Result};
use crate::events::{Operation, Outcome};
use crate::format::{EncryptionContext, Header, WrappedKey, MAX_RECIPIENTS};
use crate::message::OpeningKey;
use crate::primitives::Dek;
use crate::provider::{KeyProvider, Unwrapped};

use super::{call::Call, Caller, Keyring};

impl Keyring {
    /// The minimum decryption version that refuses `entry`, if any (the
    /// policy of its key by identity, whatever spelling it was set for).
    async fn refused_version(&self, entry: &WrappedKey) -> Result<Option<u32>> {
        Ok(self
            .policy_for_entry(entry)
            .await?
            .and_then(|p| p.min_decrypt_version)
            .filter(|min| entry.key_version < *min))
    }

    /// Unwraps the DEK of `header` with the first entry that a configured
    /// provider can unwrap and whose DEK verifies the header tag.
    ///
    /// Entries are tried in order (at most [`MAX_RECIPIENTS`]). An entry
    /// below its key's [minimum decryption
    /// version](KeyPolicy::min_decrypt_version) is refused before any
    /// provider call (an event records it). If no entry succeeds: an
    /// operational failure (provider down, key destroyed, policy denial, a
    /// lifecycle refusal) is returned as is, so the operator can act;
    /// otherwise a rejected entry gives the opaque [`Error::Decrypt`]
    /// without saying which entry or why; and a message for which no
    /// provider holds a key gives [`Error::NoMatchingKey`].
    pub(crate) async fn unwrap_header(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(Dek, OpeningKey)> {
        let (dek, key, _) = self.unwrap_header_entry(header, context, caller).await?;
        Ok((dek, key))
    }

    /// [`unwrap_header`](Self::unwrap_header), and the index of the entry
    /// that worked.
    pub(super) async fn unwrap_header_entry(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(Dek, OpeningKey, usize)> {
        let fingerprint = self.context_fingerprint(context);
        let mut operational: Option<Error> = None;
        let mut rejected = false;
        for (index, entry) in header.recipients().iter().enumerate().take(MAX_RECIPIENTS) {
            let Some(provider) = self.provider(&entry.provider) else {
                continue;
            };
            let call = Call {
                operation: Operation::Unwrap,
                provider: provider.id(),
                key_ref: Some(&entry.key_ref),
                key_version: Some(entry.key_version),
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.clone()),
            };
            let refused = match self.refused_version(entry).await {
                Ok(refused) => refused,
                Err(e) => {
                    operational.get_or_insert(e);
                    continue;
                }
            };
            if let Some(min) = refused {
                let e = self
                    .lifecycle_refusal(
                    &call,
                    format!(
                        "the message is wrapped under {} version {}, below the minimum decryption version {min} set for this key; it was not rewrapped after a rotation (or is a copy kept from before one)",
                        entry.key_ref, entry.key_version
                    ),
                )
                    .await;
                if matches!(e, Error::Audit(_)) {
                    return Err(e);
                }
                operational.get_or_insert(e);
                continue;
            }
            let result = self
                .call(
                    call,
                    verified_unwrap(&**provider, entry, header, context),
                    |u| u.outcome(),
                )
                .await;
            match result {
                Ok(Verified::Key(found)) => {
                    let (dek, key) = *found;
                    return Ok((dek, key, index));
                }
                Ok(Verified::Rejected) => rejected = true,
                Ok(Verified::NotMine) => {}
                Err(e @ Error::Audit(_)) => return Err(e),
                Err(e) => {
                    operational.get_or_insert(e);
                }
            }
        }
        if let Some(e) = operational {
            return Err(e);
        }
        if rejected {
            return Err(Error::Decrypt);
        }
        let refs: Vec<String> = header
            .recipients()
            .iter()
            .map(|r| format!("{} v{}", r.key_ref, r.key_version))
            .collect();
        Err(Error::NoMatchingKey(refs.join(", ")))
    }

    /// The opening key for one record whose body is `len` bytes: from the
    /// decryption cache when one is configured and holds a key made for
    /// these exact header bytes and this context (policy asked, event
    /// recorded), otherwise unwrapped (and then cached).
    pub(crate) async fn record_opening_key(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
        len: u64,
    ) -> Result<KeyUse<OpeningKey>> {
        let cache = match &self.cache {
            Some(c) if c.decrypt_enabled() => c,
            _ => {
                let (_, key) = self.unwrap_header(header, context, caller).await?;
                return Ok(KeyUse::Fresh(key));
            }
        };
        // The context's values can be PHI: this copy is zeroized.
        let pairs = zeroize::Zeroizing::new(context.canonical_pairs());
        let id = cache.open_id(header.as_bytes(), &pairs);
        let hit = |(key, (key_ref, version)): crate::cache::OpeningHit| async move {
            self.record_cache_hit(
                Operation::CacheHitDecrypt,
                &key_ref,
                version,
                caller,
                context,
                header.as_bytes(),
            )
            .await?;
            Ok(KeyUse::Cached(key))
        };
        let load = || async {
            let epoch = cache.epoch();
            let (dek, key, index) = self.unwrap_header_entry(header, context, caller).await?;
            drop(dek);
            let used = &header.recipients()[index];
            let keys = self.open_tags(header, index).await;
            Ok(cache.put_opening(
                id.clone(),
                key,
                (used.key_ref.clone(), used.key_version),
                keys,
                len,
                epoch,
            ))
        };
        self.flights
            .find_or_load(&id, || cache.take_opening(&id, len), hit, load)
            .await
    }

    /// What an opening-cache entry involves: every header entry; the
    /// identity of the one that unwrapped (`used`) where its provider
    /// reports it, the others unknown (so that no other entry of a header,
    /// which anyone may have written, costs a lookup; a verb on any key of
    /// their provider flushes the entry).
    async fn open_tags(&self, header: &Header, used: usize) -> Vec<KeyTag> {
        let mut tags = Vec::with_capacity(header.recipients().len());
        for (i, entry) in header.recipients().iter().enumerate() {
            let identity = if i == used {
                self.entry_identity_of(entry).await.ok().flatten()
            } else {
                None
            };
            tags.push(KeyTag {
                provider: entry.provider.clone(),
                text: entry.key_ref.clone(),
                identity,
            });
        }
        tags
    }

    /// Unwraps every entry of `header` that a configured provider can
    /// answer for and checks that each gives the DEK that verifies the
    /// header tag; returns the opening key. Used to verify a rewrapped
    /// header before it replaces the old one: a recipient that could not
    /// open it (e.g. a disaster-recovery key) is found now, not in a
    /// disaster. An entry whose provider cannot unwrap it here by design
    /// ([`KeyProvider::can_unwrap`]: an offline recovery key) is skipped.
    /// Fails if no entry could be checked.
    pub(crate) async fn verify_header(
        &self,
        header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<OpeningKey> {
        let fingerprint = self.context_fingerprint(context);
        let mut opening = None;
        for entry in header.recipients() {
            let Some(provider) = self.provider(&entry.provider) else {
                continue;
            };
            if !provider.can_unwrap(entry) {
                // An offline recovery key: it cannot be checked here.
                continue;
            }
            let unwrapped = self
                .call(
                    Call {
                        operation: Operation::Unwrap,
                        provider: provider.id(),
                        key_ref: Some(&entry.key_ref),
                        key_version: Some(entry.key_version),
                        key_state: None,
                        approvers: &[],
                        caller,
                        fingerprint: Some(fingerprint.clone()),
                    },
                    verified_unwrap(&**provider, entry, header, context),
                    |u| u.outcome(),
                )
                .await?;
            match unwrapped {
                Verified::Key(found) => {
                    opening.get_or_insert(found.1);
                }
                Verified::Rejected => return Err(Error::Decrypt),
                Verified::NotMine => {
                    return Err(Error::NoMatchingKey(format!(
                        "{} v{} (its provider does not hold it)",
                        entry.key_ref, entry.key_version
                    )))
                }
            }
        }
        opening.ok_or_else(|| {
            Error::NoMatchingKey(
                header
                    .recipients()
                    .iter()
                    .map(|r| format!("{} v{}", r.key_ref, r.key_version))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
    }
}

/// An unwrap whose DEK has also verified the header tag.
enum Verified {
    NotMine,
    Rejected,
    Key(Box<(Dek, OpeningKey)>),
}

impl Verified {
    /// The event outcome: a DEK that does not verify the header tag is a
    /// rejection, not a success.
    fn outcome(&self) -> (Outcome, Option<u32>) {
        match self {
            Verified::Key(..) => (Outcome::Success, None),
            Verified::Rejected => (Outcome::Rejected, None),
            Verified::NotMine => (Outcome::Failed("not-mine".into()), None),
        }
    }
}

/// Unwraps `entry` and checks the DEK against the header tag.
async fn verified_unwrap(
    provider: &dyn KeyProvider,
    entry: &WrappedKey,
    header: &Header,
    context: &EncryptionContext,
) -> Result<Verified> {
    Ok(match provider.unwrap(entry, context).await? {
        Unwrapped::Key(dek) => match OpeningKey::new(&dek, header) {
            Ok(key) => Verified::Key(Box::new((dek, key))),
            Err(_) => Verified::Rejected,
        },
        Unwrapped::Rejected => Verified::Rejected,
        Unwrapped::NotMine => Verified::NotMine,
    })
}
