//! What a failed Transit request means for the caller.
//!
//! Vault and OpenBao answer an error with an HTTP status and
//! `{"errors": ["..."]}`. The status says most of it (403 permission denied
//! or bad token, 503 sealed or standby, 429 rate limited, 5xx server
//! trouble); a Transit 400 is told apart by its message. Only what the
//! untrusted input (the wrapped key from a header) can cause on a decrypt is
//! the opaque rejection; a sealed, unreachable or refusing server never is.

use super::PROVIDER_ID;
use crate::error::Error;
use crate::provider::{ProviderError, ProviderErrorKind};

/// What kind of request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Call {
    /// `encrypt`: the plaintext is ours, the key the caller's choice.
    Encrypt,
    /// `decrypt` / `rewrap`: the ciphertext comes from a header (untrusted).
    Decrypt,
    /// Reading a key's settings.
    Read,
    /// Creating, rotating, configuring, trimming or deleting a key.
    Manage,
}

/// The outcome of classifying a failure.
#[derive(Debug)]
pub(super) enum Failure {
    /// The ciphertext does not decrypt under this key and context: reported
    /// only as the opaque decryption error.
    Rejected,
    /// The ciphertext's version is below the key's minimum decryption
    /// version: disabled or trimmed (the caller asks the key which).
    TooOld(Error),
    /// An operational error.
    Error(Error),
}

pub(super) fn provider_error(kind: ProviderErrorKind, message: impl Into<String>) -> Error {
    ProviderError::new(PROVIDER_ID, kind, message).into()
}

/// The server's messages, bounded and without control characters, for an
/// operator. (Transit messages name keys and paths, never plaintext or
/// context.)
pub(super) fn server_says(errors: &[String]) -> String {
    let joined = errors.join("; ");
    let clean: String = joined
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    if clean.is_empty() {
        String::new()
    } else {
        format!(" (server: {clean})")
    }
}

/// Classifies an error answer of `operation` (the Transit path, e.g.
/// `transit/decrypt/backups`) on `key`.
pub(super) fn classify(
    operation: &str,
    key: &str,
    call: Call,
    status: u16,
    errors: &[String],
) -> Failure {
    use ProviderErrorKind as K;
    let says = server_says(errors);
    let text = errors.join("; ").to_ascii_lowercase();
    let has = |s: &str| text.contains(s);
    let (kind, message) = if status == 503 || has("vault is sealed") || has("is sealed") {
        (
            K::Unavailable,
            if has("sealed") {
                format!(
                    "the Vault/OpenBao server is sealed and cannot serve {operation} for \
                     {key}{says}: an operator must unseal it; nothing was decrypted or changed"
                )
            } else {
                format!(
                    "the Vault/OpenBao server cannot serve {operation} for {key} now (HTTP \
                     503: sealed, standby or in maintenance){says}; retry later"
                )
            },
        )
    } else if status == 403 {
        (
            K::AccessDenied,
            format!(
                "Vault/OpenBao denied {operation} for {key}{says}: the token is missing, expired \
                 or revoked, or its policies lack the `update` capability on {operation} (and \
                 `read` on the key's keys/ path); see docs/TRANSIT.md for the policy"
            ),
        )
    } else if status == 429 {
        (
            K::Throttled,
            format!(
                "Vault/OpenBao is rate-limiting {operation} for {key}{says}: back off and retry, \
                 or turn on the data-key cache"
            ),
        )
    } else if status >= 500 || status == 412 {
        (
            K::Unavailable,
            format!(
                "the Vault/OpenBao server failed {operation} for {key} with HTTP {status}{says}; \
                 retry later and check the server's logs"
            ),
        )
    } else if has("encryption key not found") || (status == 404 && call != Call::Decrypt) {
        if has("no handler for route") {
            (
                K::Misconfigured,
                format!(
                    "no Transit engine is mounted where {key} says{says}: check the mount in the \
                     key reference (vault-transit:MOUNT/KEY) and the namespace"
                ),
            )
        } else {
            (
                K::KeyNotFound,
                format!(
                    "the Transit key {key} does not exist{says}: check the key reference, the \
                     mount and the namespace (VAULT_NAMESPACE)"
                ),
            )
        }
    } else if status == 404 {
        (
            K::Misconfigured,
            format!(
                "the server has no {operation}{says}: check the mount in the key reference \
                 (vault-transit:MOUNT/KEY), the namespace and VAULT_ADDR"
            ),
        )
    } else if call == Call::Decrypt && has("disallowed by policy") {
        return Failure::TooOld(provider_error(
            K::KeyDisabled,
            format!(
                "the version of {key} that wrapped this key is below the key's \
                 min_decryption_version{says}: an administrator retired it (set_state to \
                 decrypt-only re-enables it unless it was trimmed)"
            ),
        ));
    } else if call == Call::Decrypt
        && (has("message authentication failed")
            || has("invalid ciphertext")
            || has("could not decode")
            || has("cipher:")
            || has("invalid ciphertext length"))
    {
        return Failure::Rejected;
    } else if has("missing 'context'") || has("key derivation") {
        (
            K::Misconfigured,
            format!(
                "the Transit key {key} does not work with phi-envelope's context binding{says}: \
                 phi-envelope needs a derived aes256-gcm96 key (create it with create_key)"
            ),
        )
    } else if has("deletion is not allowed") {
        (
            K::InvalidState,
            format!(
                "Transit refuses to delete {key}: deletion_allowed is not set on the key{says}"
            ),
        )
    } else if call == Call::Manage && status == 400 {
        (
            K::InvalidState,
            format!("Transit refused {operation} for {key}{says}"),
        )
    } else {
        (
            K::Other,
            format!("Transit {operation} for {key} failed with HTTP {status}{says}"),
        )
    };
    Failure::Error(provider_error(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, msg: &str, call: Call) -> Option<ProviderErrorKind> {
        match classify(
            "transit/decrypt/k",
            "vault-transit:transit/k",
            call,
            status,
            &[msg.into()],
        ) {
            Failure::Rejected => None,
            Failure::TooOld(Error::Provider(p)) | Failure::Error(Error::Provider(p)) => {
                Some(p.kind())
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_map_to_kinds() {
        use Call::*;
        use ProviderErrorKind as K;
        // What the input causes: opaque, on decrypt only.
        for m in [
            "cipher: message authentication failed",
            "invalid ciphertext: no prefix",
            "invalid ciphertext: could not decode base64",
            "invalid ciphertext: version is too new",
        ] {
            assert_eq!(kind(400, m, Decrypt), None, "{m}");
            assert_eq!(kind(400, m, Encrypt), Some(K::Other), "{m}");
        }
        // What the server causes: never opaque, whatever the call.
        for call in [Encrypt, Decrypt, Read, Manage] {
            assert_eq!(kind(503, "Vault is sealed", call), Some(K::Unavailable));
            assert_eq!(kind(403, "permission denied", call), Some(K::AccessDenied));
            assert_eq!(
                kind(429, "request path: rate limit", call),
                Some(K::Throttled)
            );
            assert_eq!(kind(500, "internal error", call), Some(K::Unavailable));
        }
        assert_eq!(
            kind(400, "encryption key not found", Decrypt),
            Some(K::KeyNotFound)
        );
        assert_eq!(kind(404, "", Read), Some(K::KeyNotFound));
        assert_eq!(
            kind(404, "no handler for route \"nope/decrypt/k\"", Decrypt),
            Some(K::Misconfigured)
        );
        assert_eq!(
            kind(
                400,
                "ciphertext or signature version is disallowed by policy (too old)",
                Decrypt
            ),
            Some(K::KeyDisabled)
        );
        assert_eq!(
            kind(400, "missing 'context' for key derivation", Encrypt),
            Some(K::Misconfigured)
        );
        assert_eq!(
            kind(
                400,
                "error deleting policy k: deletion is not allowed for this key",
                Manage
            ),
            Some(K::InvalidState)
        );
    }

    #[test]
    fn server_messages_are_bounded() {
        let long = "x\n".repeat(1000);
        let s = server_says(&[long]);
        assert!(s.len() < 330 && !s.contains('\n'), "{s}");
    }
}
