//! Replacing the policy hook at run time: a verb of its own, with an
//! actor, asked of the policy in force, and recorded as a `set-policy`
//! event (the key-management rule of [`crate::monitor`] alerts on it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::events::{Operation, Outcome};
use crate::policy::Policy;

use super::{call::Call, Caller, Keyring};

/// The `provider` of a `set-policy` event: no provider is involved.
const KEYRING: &str = "keyring";

impl Keyring {
    /// Replaces the policy hook: every request from now on is asked of
    /// `policy`. Refused, each with an error and a `set-policy` event:
    ///
    /// 1. without an actor ([`Error::InvalidArgument`], outcome
    ///    `failed:no-actor`), as for key management;
    /// 2. on a keyring not built with
    ///    [`KeyringBuilder::policy_replaceable`](crate::keyring::KeyringBuilder::policy_replaceable)`(true)`
    ///    ([`Error::InvalidArgument`], outcome `failed:not-replaceable`);
    /// 3. while another change is under way on this keyring (changes
    ///    take turns, so the trail's order of `set-policy` events is the
    ///    order the policies came into force; [`Error::InvalidArgument`],
    ///    outcome `failed:concurrent`);
    /// 4. when the policy in force denies the request (operation
    ///    [`Operation::SetPolicy`], no key; [`Error::PolicyDenied`],
    ///    outcome `denied`).
    ///
    /// Otherwise the new policy is put in force and its event (outcome
    /// `success`) recorded, always failing closed, whatever
    /// `fail_closed` says: if the sink does not confirm it, the old policy
    /// is put back and the change is refused with [`Error::Audit`]. A
    /// success event is never recorded for a policy that is not in force
    /// (dropping the call while it awaits the receipt leaves the new
    /// policy in force with its event submitted). The new policy applies
    /// to every request checked after this returns. Aggregated cache-hit events held are recorded before, so
    /// the uses made under the old policy come first in the trail. A
    /// request already past its check when the policy changes goes on
    /// under the old one. Dual control, key policies and the event sink
    /// are fixed for the keyring's life.
    ///
    /// ```
    /// # async fn demo() -> phi_envelope::Result<()> {
    /// use std::sync::Arc;
    /// use phi_envelope::policy::SegregationOfDuties;
    /// use phi_envelope::provider::local::LocalKeystore;
    /// use phi_envelope::{Caller, Error, Keyring};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
    /// let sod = || SegregationOfDuties::new().custodian("kms-admin");
    /// let keyring = Keyring::builder()
    ///     .provider(Arc::new(store))
    ///     .policy(Arc::new(sod().data_user("lab-service")))
    ///     .policy_replaceable(true)
    ///     .build()?;
    /// // A data user may not change the policy; a custodian may.
    /// let lab = Caller::new("lab-service", "self-service");
    /// assert!(matches!(
    ///     keyring.replace_policy(Arc::new(sod()), &lab).await,
    ///     Err(Error::PolicyDenied(_))
    /// ));
    /// let admin = Caller::new("kms-admin", "offboard-lab");
    /// keyring.replace_policy(Arc::new(sod()), &admin).await?;
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn replace_policy(&self, policy: Arc<dyn Policy>, caller: &Caller) -> Result<()> {
        let call = Call {
            operation: Operation::SetPolicy,
            provider: KEYRING,
            key_ref: None,
            key_version: None,
            key_state: None,
            approvers: &[],
            caller,
            fingerprint: None,
        };
        let refuse = |kind: &str| Outcome::Failed(kind.into());
        if !caller.has_actor() {
            self.record(&call, None, refuse("no-actor"), Duration::ZERO)
                .await?;
            return Err(Error::InvalidArgument(
                "replacing the policy refused: it needs an actor, who is doing it, for the audit trail; pass Caller::new(actor, purpose); nothing was changed".into(),
            ));
        }
        if !self.policy_replaceable {
            self.record(&call, None, refuse("not-replaceable"), Duration::ZERO)
                .await?;
            return Err(Error::InvalidArgument(
                "this keyring's policy is fixed: build it with KeyringBuilder::policy_replaceable(true) to replace it at run time; nothing was changed".into(),
            ));
        }
        let Some(_turn) = Turn::take(&self.policy_changing) else {
            self.record(&call, None, refuse("concurrent"), Duration::ZERO)
                .await?;
            return Err(Error::InvalidArgument(
                "another policy change is under way on this keyring: try again once it is done; nothing was changed".into(),
            ));
        };
        self.flush_events().await?;
        self.authorize(&call).await?;
        let old = std::mem::replace(
            &mut *self.policy.write().unwrap_or_else(|p| p.into_inner()),
            policy.clone(),
        );
        self.checks_policy.store(true, Ordering::Release);
        let confirmed = match self.submit(&call, None, Outcome::Success, Duration::ZERO) {
            None => Ok(()),
            Some(receipt) => receipt.await.map_err(|e| Error::Audit(e.0)),
        };
        if let Err(e) = confirmed {
            let mut p = self.policy.write().unwrap_or_else(|p| p.into_inner());
            if Arc::ptr_eq(&p, &policy) {
                *p = old;
            }
            return Err(e);
        }
        Ok(())
    }
}

/// One policy change's turn: taken if no other is under way, given back
/// when dropped (also when the call is dropped mid-way).
struct Turn<'a>(&'a AtomicBool);

impl<'a> Turn<'a> {
    fn take(flag: &'a AtomicBool) -> Option<Turn<'a>> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Turn(flag))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
