//! Rewrapping a header inside the keyring: the data key re-wrapped (or
//! re-encrypted by the provider) to new recipients and the new header
//! checked before it is returned; a rewrap reused within a batch; whether a
//! header is already current.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::events::{Operation, Outcome};
use crate::format::{EncryptionContext, Header, WrappedKey, MAX_RECIPIENTS};
use crate::message::OpeningKey;
use crate::primitives::Dek;
use crate::provider::{KeyRef, ProviderError};

use super::{call::Call, provider_of, Caller, Keyring};

impl Keyring {
    /// Re-wraps the DEK of `header` to `recipients` and re-tags it; the body
    /// is untouched. The context is required: providers bind it. Only the
    /// entry whose DEK verified the header tag is re-encrypted by a provider;
    /// the new header is checked (`check_rewrapped`) before it is returned.
    pub(crate) async fn rewrap_header(
        &self,
        header: &Header,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<Header> {
        if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
            return Err(Error::InvalidArgument(format!(
                "rewrap needs 1..={MAX_RECIPIENTS} recipients"
            )));
        }
        let fingerprint = self.context_fingerprint(context);
        let first = &recipients[0];
        // The rewrap as a whole is asked of the policy (before any provider
        // call) and recorded, failed or not; its unwrap and wraps are asked
        // and recorded as well.
        self.guarded(
            Call {
                operation: Operation::Rewrap,
                provider: first.scheme(),
                key_ref: Some(first.as_str()),
                key_version: None,
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.clone()),
            },
            self.rewrap_header_inner(header, recipients, context, caller, &fingerprint),
            |h| {
                (
                    Outcome::Success,
                    h.recipients().first().map(|r| r.key_version),
                )
            },
        )
        .await
    }

    async fn rewrap_header_inner(
        &self,
        header: &Header,
        recipients: &[KeyRef],
        context: &EncryptionContext,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Header> {
        // A refused cryptoperiod costs no unwrap.
        self.check_cryptoperiods(recipients, caller, fingerprint)
            .await?;
        let (dek, _, index) = self.unwrap_header_entry(header, context, caller).await?;
        // The one entry known to hold this message's DEK: the one whose DEK
        // verified the header tag. Another entry of the same provider may
        // hold anything (a crafted message can carry a valid wrapped key
        // that is not this message's), so no other entry is ever handed to
        // a provider's re-encryption.
        let verified = &header.recipients()[index];
        let mut entries = Vec::with_capacity(recipients.len());
        for key in recipients {
            let provider = self.provider_for(key)?;
            // Where the provider can re-encrypt the entry itself (AWS KMS
            // ReEncrypt), the plaintext DEK is not sent to it again.
            let reencrypted = if verified.provider == key.scheme() && provider.supports_rewrap() {
                self.rewrap_one(verified, key, context, caller, fingerprint)
                    .await?
            } else {
                None
            };
            let entry = match reencrypted {
                Some(e) => e,
                None => {
                    self.wrap_one(key, &dek, context, caller, fingerprint)
                        .await?
                }
            };
            if entry.provider != key.scheme() {
                return Err(ProviderError::new(
                    provider.id(),
                    crate::provider::ProviderErrorKind::Other,
                    format!(
                        "asked to wrap to {key}, the provider returned an entry of provider {:?}; nothing was rewrapped",
                        entry.provider
                    ),
                )
                .into());
            }
            entries.push(entry);
        }
        let new = crate::message::rewrap_header(header, &dek, entries)?;
        check_rewrapped(&new, &dek, recipients)?;
        Ok(new)
    }

    async fn rewrap_one(
        &self,
        entry: &WrappedKey,
        key: &KeyRef,
        context: &EncryptionContext,
        caller: &Caller,
        fingerprint: &str,
    ) -> Result<Option<WrappedKey>> {
        let provider = self.provider_for(key)?;
        self.call(
            Call {
                operation: Operation::Wrap,
                provider: provider.id(),
                key_ref: Some(key.as_str()),
                key_version: None,
                key_state: None,
                approvers: &[],
                caller,
                fingerprint: Some(fingerprint.to_owned()),
            },
            provider.rewrap(entry, key, context),
            |w| (Outcome::Success, w.as_ref().map(|w| w.key_version)),
        )
        .await
    }

    /// A rewrap that reused the new header of an identical one in the same
    /// batch (same header bytes, same context): no provider call, but the
    /// policy is asked and an event recorded, as for a cache hit.
    pub(crate) async fn record_rewrap_reuse(
        &self,
        new_header: &Header,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<()> {
        let first = &new_header.recipients()[0];
        let call = Call {
            operation: Operation::Rewrap,
            provider: provider_of(&first.key_ref),
            key_ref: Some(&first.key_ref),
            key_version: Some(first.key_version),
            key_state: None,
            approvers: &[],
            caller,
            fingerprint: Some(self.context_fingerprint(context)),
        };
        self.note_caller(call.operation, caller);
        self.authorize(&call).await?;
        self.record(&call, None, Outcome::Success, Duration::ZERO)
            .await
    }

    /// True when `header` is wrapped, in order, to exactly `recipients` at
    /// the versions `primaries` gives them. An entry matches its recipient
    /// when it names the same key by the same text, or when both name one
    /// key by identity ([`KeyProvider::identity`]: an AWS KMS alias
    /// recipient and the key ARN its headers record); unknown identities
    /// do not match. Not a key access: no event, no policy request.
    pub(crate) async fn header_is_current(
        &self,
        header: &Header,
        recipients: &[KeyRef],
        primaries: &[u32],
    ) -> bool {
        let entries = header.recipients();
        if entries.len() != recipients.len() || primaries.len() != recipients.len() {
            return false;
        }
        for ((entry, key), &version) in entries.iter().zip(recipients).zip(primaries) {
            if entry.provider != key.scheme() || entry.key_version != version {
                return false;
            }
            if entry.key_ref == key.as_str() {
                continue;
            }
            let (Ok(Some(ours)), Ok(Some(theirs))) = (
                self.identity_of(key).await,
                self.entry_identity_of(entry).await,
            ) else {
                return false;
            };
            if ours != theirs {
                return false;
            }
        }
        true
    }
}

/// The check of every rewrapped header before it is returned, with no
/// provider call: it reads back as built, has one entry per recipient, each
/// of the recipient's provider, and its tag verifies under the DEK that
/// verified the old header (the entries themselves were made from that DEK:
/// wrapped from it, or re-encrypted by the provider from the entry it came
/// from). [`Envelope::rewrap_file`](crate::Envelope::rewrap_file)
/// additionally unwraps every new entry before it commits.
fn check_rewrapped(new: &Header, dek: &Dek, recipients: &[KeyRef]) -> Result<()> {
    let refused = |what: &str| {
        Err(Error::Io(std::io::Error::other(format!(
            "the rewrapped header failed its check ({what}); nothing was rewrapped, the message is unchanged"
        ))))
    };
    let (parsed, used) = Header::parse(new.as_bytes())?;
    if used != new.len() || parsed.as_bytes() != new.as_bytes() {
        return refused("it does not read back as built");
    }
    if parsed.recipients().len() != recipients.len()
        || parsed
            .recipients()
            .iter()
            .zip(recipients)
            .any(|(e, r)| e.provider != r.scheme())
    {
        return refused("its entries are not the recipients asked for");
    }
    if OpeningKey::new(dek, &parsed).is_err() {
        return refused("its tag does not verify under the message's data key");
    }
    Ok(())
}
