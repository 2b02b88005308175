//! How PKCS#11 return values become phi-envelope errors.

use cryptoki::error::{Error as CkError, RvError};

use super::PROVIDER_ID;
use crate::error::Error;
use crate::provider::{ProviderError, ProviderErrorKind};

/// What a failed call says about the session it ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Loss {
    /// Nothing: the session is fine (the call itself failed).
    None,
    /// This session is gone (closed, handle invalid).
    Session,
    /// The token went away or answered with a device error: find its slot
    /// again and open a new session.
    Token,
    /// The library was finalized (by another user of the module in this
    /// process): initialize it again; every session is gone.
    NotInitialized,
    /// The session is no longer logged in: log in again.
    Login,
}

/// The return value of a failed call, if it came from the module.
pub(super) fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Classifies a failure by what it means for the session.
pub(super) fn loss(e: &CkError) -> Loss {
    match rv(e) {
        Some(RvError::SessionHandleInvalid | RvError::SessionClosed) => Loss::Session,
        Some(
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid
            | RvError::DeviceError,
        ) => Loss::Token,
        Some(RvError::CryptokiNotInitialized) => Loss::NotInitialized,
        Some(RvError::UserNotLoggedIn) => Loss::Login,
        _ => Loss::None,
    }
}

/// A provider error of `kind`.
pub(super) fn provider_error(kind: ProviderErrorKind, message: impl Into<String>) -> Error {
    ProviderError::new(PROVIDER_ID, kind, message).into()
}

/// Maps a failed PKCS#11 call made while doing `what` (e.g. "wrapping
/// under pkcs11:token=t;object=k v2") on token `token` to an error that says
/// what to do. Never includes a PIN, key bytes or context values: a
/// `cryptoki` error carries only a return value and a function name.
pub(super) fn ck_error(what: &str, token: &str, e: CkError) -> Error {
    use ProviderErrorKind as K;
    let (kind, advice): (ProviderErrorKind, String) = match &e {
        CkError::LibraryLoading(_) => (
            K::Misconfigured,
            "cannot load the PKCS#11 module: check the module path (SoftHSM2: \
             /usr/lib/softhsm/libsofthsm2.so)"
                .into(),
        ),
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange => (
                K::AccessDenied,
                format!(
                    "the token {token:?} refused the user PIN: check the PIN (this provider \
                     will not try it again, so that the token does not lock the user; fix \
                     the PIN and connect a new provider)"
                ),
            ),
            RvError::PinLocked => (
                K::AccessDenied,
                format!(
                    "the user PIN of token {token:?} is locked: the token's security officer \
                     must unlock or reset it"
                ),
            ),
            RvError::PinExpired => (
                K::AccessDenied,
                format!("the user PIN of token {token:?} has expired: change it with the token's tools"),
            ),
            RvError::UserPinNotInitialized => (
                K::Misconfigured,
                format!(
                    "token {token:?} has no user PIN: initialise it (softhsm2-util --init-token, \
                     pkcs11-tool --init-pin)"
                ),
            ),
            RvError::UserAnotherAlreadyLoggedIn | RvError::UserTooManyTypes => (
                K::AccessDenied,
                format!(
                    "another user (the security officer?) is logged in to token {token:?} in \
                     this process: log it out"
                ),
            ),
            RvError::TokenNotPresent
            | RvError::DeviceRemoved
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid => (
                K::Unavailable,
                format!(
                    "token {token:?} is not present: check that the HSM is connected and the \
                     token label is right; retry later"
                ),
            ),
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn => (
                K::Unavailable,
                format!(
                    "lost the session with token {token:?} and re-opening it failed: check the \
                     HSM and retry later"
                ),
            ),
            RvError::DeviceError | RvError::DeviceMemory => (
                K::Unavailable,
                format!("token {token:?} reported a device failure: check the HSM's health and retry"),
            ),
            RvError::SessionCount => (
                K::Throttled,
                format!(
                    "token {token:?} has no free sessions: lower the pool size or the number of \
                     applications using the token, then retry"
                ),
            ),
            RvError::HostMemory => (K::Unavailable, "the PKCS#11 module ran out of memory".into()),
            RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => (
                K::KeyNotFound,
                "the key object is gone from the token (destroyed while in use?)".into(),
            ),
            RvError::KeyFunctionNotPermitted => (
                K::KeyDisabled,
                "the key version does not allow this operation (it is disabled or decrypt-only)"
                    .into(),
            ),
            RvError::MechanismInvalid | RvError::MechanismParamInvalid => (
                K::Unsupported,
                format!(
                    "token {token:?} does not support AES-GCM encryption (CKM_AES_GCM) with a \
                     96-bit IV and a 128-bit tag, which this provider needs"
                ),
            ),
            RvError::TokenWriteProtected | RvError::SessionReadOnly => (
                K::Misconfigured,
                format!("token {token:?} is write-protected: lifecycle operations need a writable token"),
            ),
            RvError::CryptokiAlreadyInitialized => (
                K::Other,
                "the PKCS#11 module was initialized twice".into(),
            ),
            _ => (K::Other, format!("token {token:?} failed")),
        },
        _ => (K::Other, "the PKCS#11 wrapper failed".into()),
    };
    ProviderError::new(PROVIDER_ID, kind, format!("{what}: {advice} ({e})"))
        .with_source(e)
        .into()
}
