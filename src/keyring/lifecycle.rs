//! The lifecycle verbs: describe, create, rotate, set_state, disable and
//! destroy, each through the one call path with the actor checked first,
//! dual control for the verbs it guards, and the data-key cache of the key
//! flushed by identity.

use std::sync::Arc;
use std::time::Duration;

use crate::approval::{Approval, GuardedOperation};
use crate::error::{Error, Result};
use crate::events::{Operation, Outcome};
use crate::provider::{KeyInfo, KeyProvider, KeyRef, KeyState};

use super::{call::Call, lock, Caller, Keyring};

impl Keyring {
    /// One lifecycle verb through [`call`](Self::call). `change.target`
    /// is the state the verb moves the version to (recorded in its event
    /// whatever the outcome); the public verbs check the actor first
    /// ([`require_actor`](Self::require_actor)), and dual control for the
    /// verbs it guards.
    async fn manage<'a>(
        &'a self,
        operation: Operation,
        key: &'a KeyRef,
        change: Change<'a>,
        caller: &'a Caller,
        fut: impl FnOnce(&'a Arc<dyn KeyProvider>) -> crate::provider::BoxFuture<'a, Result<KeyInfo>>,
    ) -> Result<KeyInfo> {
        let Change {
            version,
            target,
            approvers,
        } = change;
        let provider = self.provider_for(key)?;
        let changes = operation != Operation::Describe;
        if changes {
            // Uses held in aggregated cache-hit events happened before this
            // change: they go into the trail before its event does.
            self.flush_events().await?;
        }
        // The primary a rotation moves away from, as last described.
        let rotated_away = if operation == Operation::Rotate {
            lock(&self.described)
                .get(key.as_str())
                .and_then(|(info, _)| info.primary().map(|p| (p.version, p.created_at)))
        } else {
            None
        };
        let result = self
            .call(
                Call {
                    operation,
                    provider: provider.id(),
                    key_ref: Some(key.as_str()),
                    key_version: version,
                    key_state: target,
                    approvers,
                    caller,
                    fingerprint: None,
                },
                // Once the policy allowed the verb: what is cached of the
                // key (by identity, any spelling) is flushed, and keys
                // fetched by calls under way are not cached after this.
                self.flushed_first(key, changes, fut(provider)),
                |info| (Outcome::Success, version.or(info.primary_version)),
            )
            .await;
        if changes {
            // Whatever the outcome: nothing cached survives a state change.
            self.flush_cache_for(key);
        }
        if let Ok(info) = &result {
            self.remember(key, info);
            let slots = self.rotation_slots(key);
            let mut away = lock(&self.rotated_away);
            match rotated_away {
                Some(old) => {
                    for slot in slots {
                        away.insert(slot, old);
                    }
                }
                // A state change (e.g. a rollback that re-enables the old
                // primary) means the operator took over.
                None if changes => {
                    for slot in &slots {
                        away.remove(slot);
                    }
                }
                None => {}
            }
        }
        result
    }

    /// Describes `key`: its versions, their states and creation times, the
    /// primary version.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::KeyState;
    /// # use phi_envelope::{Caller, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).build()?;
    /// let key: KeyRef = "local:records".parse()?;
    /// let operator = Caller::new("alice", "key-inventory");
    /// keyring.create_key(&key, &operator).await?;
    /// let info = keyring.describe(&key, &operator).await?;
    /// assert_eq!(info.primary_version, Some(1));
    /// assert_eq!(info.version(1).unwrap().state, KeyState::Enabled);
    /// assert!(info.version(1).unwrap().created_at.is_some());
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn describe(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(Operation::Describe, key, Change::NONE, caller, |p| {
            p.describe(key)
        })
        .await
    }

    /// Creates `key` with version 1 enabled and primary.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::{Caller, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).build()?;
    /// let key: KeyRef = "local:backups".parse()?;
    /// let info = keyring.create_key(&key, &Caller::new("alice", "setup")).await?;
    /// assert_eq!(info.primary_version, Some(1));
    /// // Creating it again is refused: rotate it instead.
    /// assert!(keyring.create_key(&key, &Caller::new("alice", "setup")).await.is_err());
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn create_key(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        let target = Some(KeyState::Enabled);
        self.require_actor(Operation::CreateKey, key, None, target, caller)
            .await?;
        let change = Change {
            target,
            ..Change::NONE
        };
        self.manage(Operation::CreateKey, key, change, caller, |p| {
            p.create_key(key)
        })
        .await
    }

    /// Rotates `key`: a new primary version; the old one becomes
    /// decrypt-only, so everything already written still opens. A failed
    /// rotation leaves the old primary working. Cached data keys of `key`
    /// are flushed either way, so the next record is sealed under the new
    /// primary.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::KeyState;
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?;
    /// let envelope = Envelope::new(keyring);
    /// let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
    /// let before = envelope.seal(b"v1 record", &ctx).await?;
    ///
    /// let info = envelope.keyring().rotate(&key, &Caller::new("alice", "scheduled")).await?;
    /// assert_eq!(info.primary_version, Some(2));
    /// assert_eq!(info.version(1).unwrap().state, KeyState::DecryptOnly);
    ///
    /// let after = envelope.seal(b"v2 record", &ctx).await?;
    /// let inspect = |m: &[u8]| phi_envelope::envelope::inspect(m).unwrap().header.recipients()[0].key_version;
    /// assert_eq!((inspect(&before), inspect(&after)), (1, 2));
    /// assert_eq!(envelope.open(&before, &ctx).await?, b"v1 record");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn rotate(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.require_actor(
            Operation::Rotate,
            key,
            None,
            Some(KeyState::Enabled),
            caller,
        )
        .await?;
        self.rotate_unchecked(key, caller).await
    }

    /// [`rotate`](Self::rotate) without the actor check: the rotation that
    /// a [`OnExpired::RotateFirst`] policy makes on behalf of a key use,
    /// which follows the rule of key use (warned, counted, not refused).
    pub(super) async fn rotate_unchecked(&self, key: &KeyRef, caller: &Caller) -> Result<KeyInfo> {
        self.manage(
            Operation::Rotate,
            key,
            Change {
                target: Some(KeyState::Enabled),
                ..Change::NONE
            },
            caller,
            |p| p.rotate(key),
        )
        .await
    }

    /// Dual control: the approvers of a guarded verb, or its refusal
    /// (recorded, outcome `failed:approval`), before the policy hook or any
    /// provider is asked.
    async fn check_approvals(
        &self,
        operation: Operation,
        key: &KeyRef,
        version: u32,
        target: KeyState,
        caller: &Caller,
        approvals: &[Approval],
    ) -> Result<Vec<String>> {
        let guarded = GuardedOperation::for_state(target);
        let Some(checker) = &self.approvals else {
            if approvals.is_empty() {
                return Ok(Vec::new());
            }
            return Err(Error::InvalidArgument(format!(
                "approvals were given for {guarded} of {key} version {version}, but this keyring has no dual control (no custodians are registered); nothing was done"
            )));
        };
        if !checker.guards(guarded) {
            return Ok(Vec::new());
        }
        match checker.check(guarded, key, version, approvals) {
            Ok(approvers) => Ok(approvers),
            Err(refusal) => {
                self.record(
                    &Call {
                        operation,
                        provider: key.scheme(),
                        key_ref: Some(key.as_str()),
                        key_version: Some(version),
                        key_state: Some(target),
                        approvers: &refusal.approvers,
                        caller,
                        fingerprint: None,
                    },
                    None,
                    Outcome::Failed("approval".into()),
                    Duration::ZERO,
                )
                .await?;
                Err(Error::Approval(refusal.message))
            }
        }
    }

    /// Moves `version` of `key` to `state`: decrypt-only, disabled, or
    /// (where the provider allows) back to enabled, which makes it the
    /// primary. [`KeyState::Destroyed`] is refused: use
    /// [`destroy`](Self::destroy), which erases the key. The provider checks
    /// the state machine (`docs/KEY-LIFECYCLE.md`) and refuses a transition
    /// it does not allow with [`ProviderErrorKind::InvalidState`] or
    /// [`ProviderErrorKind::KeyDestroyed`]. Cached data keys of `key` are
    /// flushed.
    /// Under [dual control](crate::approval) the changes it guards are
    /// refused without approvals: use
    /// [`set_state_approved`](Self::set_state_approved).
    ///
    /// [`ProviderErrorKind::InvalidState`]: crate::provider::ProviderErrorKind::InvalidState
    /// [`ProviderErrorKind::KeyDestroyed`]: crate::provider::ProviderErrorKind::KeyDestroyed
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::{Caller, KeyRef, Keyring};
    /// use phi_envelope::provider::KeyState;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).build()?;
    /// let operator = Caller::new("alice", "rollback");
    /// keyring.rotate(&key, &operator).await?; // v2 primary, v1 decrypt-only
    /// // Roll the rotation back: v1 primary again, v2 decrypt-only.
    /// let info = keyring.set_state(&key, 1, KeyState::Enabled, &operator).await?;
    /// assert_eq!(info.primary_version, Some(1));
    /// assert_eq!(info.version(2).unwrap().state, KeyState::DecryptOnly);
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn set_state(
        &self,
        key: &KeyRef,
        version: u32,
        state: KeyState,
        caller: &Caller,
    ) -> Result<KeyInfo> {
        self.set_state_approved(key, version, state, caller, &[])
            .await
    }

    /// [`set_state`](Self::set_state) with the custodians' approvals of a
    /// keyring under [dual control](crate::approval)
    /// ([`KeyringBuilder::dual_control`](crate::keyring::KeyringBuilder::dual_control)): moving a version to disabled,
    /// enabled or decrypt-only is refused with [`Error::Approval`] (and an
    /// event, outcome `failed:approval`) unless `approvals` hold valid ones
    /// of that exact change (operation `disable`, `enable` or
    /// `decrypt-only`, this `key` spelled as here, this `version`) from the
    /// threshold of distinct registered custodians. Checked after the actor
    /// and before the policy hook or any provider call; the approvals are
    /// spent once accepted, whatever the provider answers. A verb the dual
    /// control does not guard ignores `approvals`; a keyring without dual
    /// control refuses any.
    pub async fn set_state_approved(
        &self,
        key: &KeyRef,
        version: u32,
        state: KeyState,
        caller: &Caller,
        approvals: &[Approval],
    ) -> Result<KeyInfo> {
        if state == KeyState::Destroyed {
            return Err(Error::KeyLifecycle(format!(
                "set_state cannot destroy {key} version {version}: use destroy, which erases the key material (backup keys destroy {key} --version {version})"
            )));
        }
        self.require_actor(Operation::SetState, key, Some(version), Some(state), caller)
            .await?;
        let approvers = self
            .check_approvals(Operation::SetState, key, version, state, caller, approvals)
            .await?;
        self.manage(
            Operation::SetState,
            key,
            Change {
                version: Some(version),
                target: Some(state),
                approvers: &approvers,
            },
            caller,
            |p| p.set_state(key, version, state),
        )
        .await
    }

    /// Disables `version` of `key`: nothing can be unwrapped under it until
    /// it is enabled or set decrypt-only again (reversible, unlike
    /// [`destroy`](Self::destroy)). The step before destroying a version:
    /// disable it, watch for failures (events with outcome
    /// `failed:key-disabled`) for as long as your retention rules ask, then
    /// destroy it.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::{KeyState, ProviderErrorKind};
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, Error, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:records".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?;
    /// # let envelope = Envelope::new(keyring);
    /// # let ctx = EncryptionContext::new();
    /// let old = envelope.seal(b"under v1", &ctx).await?;
    /// let operator = Caller::new("alice", "retire-v1");
    /// envelope.keyring().rotate(&key, &operator).await?;
    /// envelope.keyring().disable(&key, 1, &operator).await?;
    /// match envelope.open(&old, &ctx).await {
    ///     Err(Error::Provider(e)) => assert_eq!(e.kind(), ProviderErrorKind::KeyDisabled),
    ///     other => panic!("{other:?}"),
    /// }
    /// // Reversible: set it decrypt-only again.
    /// envelope.keyring().set_state(&key, 1, KeyState::DecryptOnly, &operator).await?;
    /// assert_eq!(envelope.open(&old, &ctx).await?, b"under v1");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn disable(&self, key: &KeyRef, version: u32, caller: &Caller) -> Result<KeyInfo> {
        self.set_state(key, version, KeyState::Disabled, caller)
            .await
    }

    /// Destroys `version` of `key`: everything wrapped under it becomes
    /// unreadable for good (crypto-shredding); opening such a message fails
    /// with [`ProviderErrorKind::KeyDestroyed`]. Messages under other
    /// versions are unaffected. Cached data keys of `key` are flushed first
    /// and again after, so a destroyed key is never served from the cache.
    /// What "destroyed" means per provider (erased bytes, a destroyed HSM
    /// object, a KMS deletion window) is in `docs/KEY-LIFECYCLE.md`.
    /// Under [dual control](crate::approval) this passes no approvals and
    /// is refused with [`Error::Approval`]: use
    /// [`destroy_approved`](Self::destroy_approved).
    ///
    /// [`ProviderErrorKind::KeyDestroyed`]: crate::provider::ProviderErrorKind::KeyDestroyed
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// # use std::sync::Arc;
    /// # use phi_envelope::provider::local::LocalKeystore;
    /// # use phi_envelope::provider::ProviderErrorKind;
    /// # use phi_envelope::{Caller, EncryptionContext, Envelope, Error, KeyRef, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let key: KeyRef = "local:contract-acme".parse()?;
    /// # store.add_key(&key)?;
    /// # let keyring = Keyring::builder().provider(Arc::new(store)).recipient(key.clone()).build()?;
    /// # let envelope = Envelope::new(keyring);
    /// # let ctx = EncryptionContext::new();
    /// let v1 = envelope.seal(b"end of retention", &ctx).await?;
    /// let operator = Caller::new("alice", "retention-end");
    /// envelope.keyring().rotate(&key, &operator).await?;
    /// let v2 = envelope.seal(b"still retained", &ctx).await?;
    ///
    /// envelope.keyring().disable(&key, 1, &operator).await?;
    /// envelope.keyring().destroy(&key, 1, &operator).await?;
    /// match envelope.open(&v1, &ctx).await {
    ///     Err(Error::Provider(e)) => assert_eq!(e.kind(), ProviderErrorKind::KeyDestroyed),
    ///     other => panic!("{other:?}"),
    /// }
    /// assert_eq!(envelope.open(&v2, &ctx).await?, b"still retained");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn destroy(&self, key: &KeyRef, version: u32, caller: &Caller) -> Result<KeyInfo> {
        self.destroy_approved(key, version, caller, &[]).await
    }

    /// [`destroy`](Self::destroy) with the custodians' approvals of a
    /// keyring under [dual control](crate::approval)
    /// ([`KeyringBuilder::dual_control`](crate::keyring::KeyringBuilder::dual_control)): refused with [`Error::Approval`]
    /// (and an event, outcome `failed:approval`) unless `approvals` hold
    /// valid approvals of operation `destroy` of this `key` (spelled as
    /// here) and `version` from the threshold of distinct registered
    /// custodians. Checked after the actor and before the policy hook or
    /// any provider call, so a refused destroy changes nothing; the
    /// approvals are spent once accepted, whatever the provider answers.
    /// The event of the destroy names the approvers
    /// ([`Event::approvers`](crate::events::Event::approvers)).
    pub async fn destroy_approved(
        &self,
        key: &KeyRef,
        version: u32,
        caller: &Caller,
        approvals: &[Approval],
    ) -> Result<KeyInfo> {
        let target = Some(KeyState::Destroyed);
        self.require_actor(Operation::Destroy, key, Some(version), target, caller)
            .await?;
        let approvers = self
            .check_approvals(
                Operation::Destroy,
                key,
                version,
                KeyState::Destroyed,
                caller,
                approvals,
            )
            .await?;
        self.manage(
            Operation::Destroy,
            key,
            Change {
                version: Some(version),
                target,
                approvers: &approvers,
            },
            caller,
            |p| p.destroy(key, version),
        )
        .await
    }
}

/// What a lifecycle verb changes: the version, the state it moves it to,
/// and the custodians who approved it (dual control).
struct Change<'a> {
    version: Option<u32>,
    target: Option<KeyState>,
    approvers: &'a [String],
}

impl Change<'_> {
    pub(super) const NONE: Change<'static> = Change {
        version: None,
        target: None,
        approvers: &[],
    };
}
