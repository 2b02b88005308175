//! The policy hook: sees every key access before any provider is called and
//! can deny it.

use std::fmt;

use crate::events::Operation;

/// What the policy hook is asked about. It carries no key material and no
/// context values: only a keyed fingerprint of the context.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyRequest {
    /// The operation about to happen.
    pub operation: Operation,
    /// The provider's id.
    pub provider: String,
    /// The key reference, when one applies.
    pub key_ref: Option<String>,
    /// The KEK version, when known.
    pub key_version: Option<u32>,
    /// Who asks.
    pub actor: Option<String>,
    /// Why.
    pub purpose: Option<String>,
    /// Keyed fingerprint of the encryption context (hex), when one applies.
    pub context_fingerprint: Option<String>,
}

/// The answer of a policy: allow, or deny with a reason the caller sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse; the reason goes into the error and must not contain secrets.
    Deny(String),
}

/// A policy hook. It runs before every provider call; a denial is an
/// [`Error::PolicyDenied`](crate::Error::PolicyDenied) and an event.
pub trait Policy: Send + Sync + fmt::Debug {
    /// Decides on one request.
    fn check(&self, request: &PolicyRequest) -> Decision;
}

/// Allows everything: the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn check(&self, _request: &PolicyRequest) -> Decision {
        Decision::Allow
    }
}

impl PolicyRequest {
    /// A request for `operation` on `provider`, with nothing else set: for
    /// testing policies (the keyring builds its requests itself).
    pub fn new(operation: Operation, provider: impl Into<String>) -> PolicyRequest {
        PolicyRequest {
            operation,
            provider: provider.into(),
            key_ref: None,
            key_version: None,
            actor: None,
            purpose: None,
            context_fingerprint: None,
        }
    }

    /// Sets the key reference and version.
    pub fn with_key(mut self, key_ref: impl Into<String>, version: Option<u32>) -> PolicyRequest {
        self.key_ref = Some(key_ref.into());
        self.key_version = version;
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: impl Into<String>) -> PolicyRequest {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the purpose.
    pub fn with_purpose(mut self, purpose: impl Into<String>) -> PolicyRequest {
        self.purpose = Some(purpose.into());
        self
    }

    /// Sets the context fingerprint.
    pub fn with_context_fingerprint(mut self, fingerprint: impl Into<String>) -> PolicyRequest {
        self.context_fingerprint = Some(fingerprint.into());
        self
    }
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// A role in [`SegregationOfDuties`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Manages keys (create, rotate, change state, destroy, describe) and
    /// the keyring's policy (set-policy); never encrypts or decrypts data.
    KeyCustodian,
    /// Encrypts and decrypts data (generate, wrap, unwrap, rewrap, cache
    /// hits, describe); never manages keys.
    DataUser,
}

/// What an operation is, for segregation of duties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Management,
    Data,
    ReadOnly,
}

fn classify(op: Operation) -> Option<Class> {
    match op {
        Operation::CreateKey
        | Operation::Rotate
        | Operation::SetState
        | Operation::Destroy
        | Operation::SetPolicy => Some(Class::Management),
        Operation::Generate
        | Operation::Wrap
        | Operation::Unwrap
        | Operation::Rewrap
        | Operation::CacheHitEncrypt
        | Operation::CacheHitDecrypt => Some(Class::Data),
        Operation::Describe => Some(Class::ReadOnly),
        // An operation added later is denied until classified here.
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Segregation of duties between key custodians and data users, a common
/// key-management control: the people and services that manage keys cannot
/// read data, and those that read data cannot manage keys. (One example
/// policy; whether it is the right one for an organisation is the
/// organisation's call.)
///
/// | actor | create / rotate / set-state / destroy / set-policy | generate / wrap (encrypt) | unwrap / cache-hit-decrypt (decrypt) | describe |
/// | --- | --- | --- | --- | --- |
/// | key custodian | allowed | denied | denied | allowed |
/// | data user | denied | allowed | allowed | allowed |
/// | unknown, or no actor | denied (or as configured) | denied | denied | denied |
///
/// Custodians are denied encryption too (least privilege: they have no
/// need for data keys, and a wrap exposes a DEK to the caller's process).
/// Rewrapping unwraps the DEK, so it is a data user's job (e.g. a
/// re-encryption service account). An actor named in both roles is denied
/// everything: that is a configuration error this policy will not paper
/// over.
///
/// ```
/// use std::sync::Arc;
/// use phi_envelope::policy::SegregationOfDuties;
///
/// let policy = SegregationOfDuties::new()
///     .custodian("kms-admin@ops")
///     .data_user("lab-service")
///     .data_user("rewrap-job");
/// // Keyring::builder().policy(Arc::new(policy)) ...
/// # let _ = Arc::new(policy);
/// ```
#[derive(Clone, Debug, Default)]
pub struct SegregationOfDuties {
    custodians: std::collections::BTreeSet<String>,
    data_users: std::collections::BTreeSet<String>,
    unknown: Option<Role>,
}

impl SegregationOfDuties {
    /// A policy with no actors: everything is denied until actors are
    /// added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key custodian.
    pub fn custodian(mut self, actor: impl Into<String>) -> Self {
        self.custodians.insert(actor.into());
        self
    }

    /// Adds a data user.
    pub fn data_user(mut self, actor: impl Into<String>) -> Self {
        self.data_users.insert(actor.into());
        self
    }

    /// How actors in neither set (and requests without an actor) are
    /// treated: `None` (the default) denies them everything; `Some(role)`
    /// gives them that role.
    pub fn unknown_actors(mut self, role: Option<Role>) -> Self {
        self.unknown = role;
        self
    }

    /// The role of `actor`, if it has exactly one.
    pub fn role_of(&self, actor: Option<&str>) -> Option<Role> {
        let Some(actor) = actor else {
            return self.unknown;
        };
        match (
            self.custodians.contains(actor),
            self.data_users.contains(actor),
        ) {
            (true, false) => Some(Role::KeyCustodian),
            (false, true) => Some(Role::DataUser),
            (false, false) => self.unknown,
            (true, true) => None,
        }
    }
}

impl Policy for SegregationOfDuties {
    fn check(&self, request: &PolicyRequest) -> Decision {
        let who = match &request.actor {
            Some(a) => format!("actor {a:?}"),
            None => "a request without an actor".to_owned(),
        };
        let op = request.operation;
        let Some(class) = classify(op) else {
            return Decision::Deny(format!(
                "segregation of duties: operation {op} is not classified"
            ));
        };
        let actor = request.actor.as_deref();
        if let Some(a) = actor {
            if self.custodians.contains(a) && self.data_users.contains(a) {
                return Decision::Deny(format!(
                    "segregation of duties: {who} is both a key custodian and a data user; give it one role"
                ));
            }
        }
        match (self.role_of(actor), class) {
            (None, _) => Decision::Deny(format!(
                "segregation of duties: {who} is neither a key custodian nor a data user"
            )),
            (Some(_), Class::ReadOnly)
            | (Some(Role::KeyCustodian), Class::Management)
            | (Some(Role::DataUser), Class::Data) => Decision::Allow,
            (Some(Role::KeyCustodian), Class::Data) => Decision::Deny(format!(
                "segregation of duties: {who} is a key custodian and may not {op} (custodians manage keys, they do not use them on data)"
            )),
            (Some(Role::DataUser), Class::Management) => Decision::Deny(format!(
                "segregation of duties: {who} is a data user and may not {op} (key management is for key custodians)"
            )),
        }
    }
}

/// A policy from a closure: `FnPolicy::new(|req| ...)`.
///
/// ```
/// use phi_envelope::events::Operation;
/// use phi_envelope::policy::{Decision, FnPolicy};
///
/// // No key destruction outside the change window's purpose.
/// let policy = FnPolicy::new(|req| {
///     if req.operation == Operation::Destroy && req.purpose.as_deref() != Some("retention-expiry") {
///         Decision::Deny("destroy only with purpose retention-expiry".into())
///     } else {
///         Decision::Allow
///     }
/// });
/// # let _ = policy;
/// ```
pub struct FnPolicy<F>(F);

impl<F> FnPolicy<F>
where
    F: Fn(&PolicyRequest) -> Decision + Send + Sync,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        FnPolicy(f)
    }
}

impl<F> fmt::Debug for FnPolicy<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnPolicy")
    }
}

impl<F> Policy for FnPolicy<F>
where
    F: Fn(&PolicyRequest) -> Decision + Send + Sync,
{
    fn check(&self, request: &PolicyRequest) -> Decision {
        (self.0)(request)
    }
}

/// Allows a request only if every policy allows it; the first denial (in
/// order) is the answer.
///
/// ```
/// use std::sync::Arc;
/// use phi_envelope::policy::{AllOf, Decision, FnPolicy, SegregationOfDuties};
///
/// let policy = AllOf::new()
///     .and(Arc::new(SegregationOfDuties::new().data_user("lab-service")))
///     .and(Arc::new(FnPolicy::new(|req| match req.purpose.as_deref() {
///         Some(_) => Decision::Allow,
///         None => Decision::Deny("a purpose is required".into()),
///     })));
/// # let _ = policy;
/// ```
#[derive(Debug, Default, Clone)]
pub struct AllOf(Vec<std::sync::Arc<dyn Policy>>);

impl AllOf {
    /// No policies yet (allows everything).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a policy.
    pub fn and(mut self, policy: std::sync::Arc<dyn Policy>) -> Self {
        self.0.push(policy);
        self
    }
}

impl Policy for AllOf {
    fn check(&self, request: &PolicyRequest) -> Decision {
        for p in &self.0 {
            if let Decision::Deny(reason) = p.check(request) {
                return Decision::Deny(reason);
            }
        }
        Decision::Allow
    }
}
