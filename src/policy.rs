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
