//! From SDK errors to [`ProviderError`]s that say what to do, or to the
//! opaque rejection of a wrapped key.
//!
//! The SDK error itself is never attached as a source nor printed with
//! `Debug`: a response that could not be parsed carries the raw HTTP body,
//! which for a data-key call can hold a plaintext key. Messages are built
//! from the error code, KMS's message (which names keys, never context
//! values: the context reaching KMS is a digest plus declared non-sensitive
//! pairs), the request id and, for a network failure, the connector error.

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::operation::RequestId;

use super::PROVIDER_ID;
use crate::error::Error;
use crate::provider::{ProviderError, ProviderErrorKind};

/// What a failed KMS call means for the caller.
#[derive(Debug)]
pub(super) enum Failure {
    /// The wrapped key does not decrypt under the pinned key and context
    /// (InvalidCiphertextException, IncorrectKeyException): reported only as
    /// the opaque decryption error.
    Rejected,
    /// An operational error.
    Error(Error),
}

/// What kind of call failed: data calls use a key, management calls change
/// it (KMSInvalidStateException means different things for them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CallKind {
    /// Decrypt / ReEncrypt: the input ciphertext is untrusted.
    Decrypt,
    /// GenerateDataKey / Encrypt.
    Encrypt,
    /// DescribeKey and the lifecycle verbs.
    Manage,
}

pub(super) fn provider_error(kind: ProviderErrorKind, message: impl Into<String>) -> Error {
    ProviderError::new(PROVIDER_ID, kind, message).into()
}

/// Classifies a failed SDK call of `operation` (the KMS API name) on `key`.
pub(super) fn classify<E>(operation: &str, key: &str, call: CallKind, err: SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let request_id = err.request_id().map(str::to_owned);
    match err {
        SdkError::ServiceError(_) => classify_service(
            operation,
            key,
            call,
            ServiceAnswer {
                code: err.code(),
                message: err.message(),
                request_id: request_id.as_deref(),
                status: err.raw_response().map(|r| r.status().as_u16()),
            },
        ),
        SdkError::TimeoutError(_) => Failure::Error(provider_error(
            ProviderErrorKind::Unavailable,
            format!(
                "KMS endpoint did not answer {operation} for {key} within the configured timeout \
                 (SDK timeout config, after its retries): check that KMS is reachable and healthy, \
                 or raise the operation timeouts"
            ),
        )),
        SdkError::DispatchFailure(ref d) => {
            let detail = d
                .as_connector_error()
                .map(|c| DisplayErrorContext(c).to_string())
                .unwrap_or_else(|| "no connection".to_owned());
            let what = if d.is_timeout() {
                "timed out connecting"
            } else {
                "could not send the request"
            };
            Failure::Error(provider_error(
                ProviderErrorKind::Unavailable,
                format!(
                    "KMS endpoint unreachable: {operation} for {key} {what} ({detail}); check \
                     AWS_ENDPOINT_URL / AWS_REGION, the network and credentials, and retry later"
                ),
            ))
        }
        SdkError::ResponseError(_) => Failure::Error(provider_error(
            ProviderErrorKind::Unavailable,
            format!(
                "KMS endpoint sent an unreadable answer to {operation} for {key} (cut short or \
                 not KMS); check that AWS_ENDPOINT_URL points at KMS, and retry"
            ),
        )),
        SdkError::ConstructionFailure(_) => Failure::Error(provider_error(
            ProviderErrorKind::Misconfigured,
            format!(
                "the {operation} request for {key} could not be built ({}); check the AWS \
                 configuration (region, endpoint)",
                DisplayErrorContext(&err)
            ),
        )),
        // `SdkError` is non-exhaustive.
        _ => Failure::Error(provider_error(
            ProviderErrorKind::Other,
            format!("KMS {operation} for {key} failed"),
        )),
    }
}

/// The KMS message, bounded, for an operator (KMS messages name keys and
/// principals, never encryption-context values).
fn kms_says(message: Option<&str>, request_id: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(m) = message.filter(|m| !m.is_empty()) {
        let m: String = m.chars().take(300).collect();
        s.push_str(&format!(" (KMS: {m})"));
    }
    if let Some(r) = request_id {
        s.push_str(&format!(" [request id {r}]"));
    }
    s
}

/// What a KMS error response says.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ServiceAnswer<'a> {
    /// The error code (`__type`), e.g. `DisabledException`.
    pub code: Option<&'a str>,
    /// KMS's message.
    pub message: Option<&'a str>,
    /// The request id, for AWS support and CloudTrail.
    pub request_id: Option<&'a str>,
    /// The HTTP status.
    pub status: Option<u16>,
}

/// Classifies a KMS error response by its code.
pub(super) fn classify_service(
    operation: &str,
    key: &str,
    call: CallKind,
    answer: ServiceAnswer<'_>,
) -> Failure {
    use ProviderErrorKind as K;
    let message = answer.message;
    let says = kms_says(message, answer.request_id);
    let code = answer.code.unwrap_or("");
    let status = answer.status.unwrap_or(0);
    let pending_deletion = message.is_some_and(|m| {
        let m = m.to_ascii_lowercase();
        m.contains("pending deletion") || m.contains("pendingdeletion")
    });
    let (kind, text) = match code {
        "InvalidCiphertextException" | "IncorrectKeyException" if call == CallKind::Decrypt => {
            return Failure::Rejected
        }
        // On Decrypt and ReEncrypt the ciphertext is untrusted input. Real
        // KMS reports a missing permission as "User: ... is not authorized
        // to perform: kms:Decrypt ..." (IAM, key policy, VPC endpoint
        // policy alike): that stays AccessDenied. Any other
        // AccessDeniedException there is about the ciphertext: real KMS's
        // deliberately ambiguous "The ciphertext refers to a customer master
        // key that does not exist, does not exist in this region, or you are
        // not allowed to access" for a blob naming a key the caller cannot
        // use, and moto's message-less answer for a blob made under another
        // key than the pinned one (where real KMS says
        // IncorrectKeyException). Those are the opaque rejection, so that a
        // tampered or spliced wrapped key looks like any other.
        "AccessDeniedException"
            if call == CallKind::Decrypt
                && !message.is_some_and(|m| m.contains("not authorized")) =>
        {
            return Failure::Rejected
        }
        "ThrottlingException"
        | "Throttling"
        | "ThrottledException"
        | "TooManyRequestsException" => (
            K::Throttled,
            format!(
                "KMS is throttling {operation} for {key}{says}; the SDK retried with backoff: \
                 back off and retry, turn on the data-key cache, or request a higher KMS quota"
            ),
        ),
        "AccessDeniedException" => (
            K::AccessDenied,
            format!(
                "KMS denied {operation} on {key}{says}: grant the caller kms:{operation} on this \
                 key in its IAM policy and the key policy (check kms:EncryptionContext \
                 conditions too)"
            ),
        ),
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "SignatureDoesNotMatch"
        | "ExpiredTokenException"
        | "MissingAuthenticationToken"
        | "InvalidAccessKeyId" => (
            K::AccessDenied,
            format!(
                "KMS rejected the credentials for {operation} on {key}: {code}{says}; check the \
                 AWS credentials chain (expired session, wrong keys, wrong region)"
            ),
        ),
        "DisabledException" => (
            K::KeyDisabled,
            format!(
                "KMS key {key} is disabled{says}: messages under it cannot be opened or sealed \
                 until an administrator enables it (EnableKey, or set_state(Enabled))"
            ),
        ),
        "KMSInvalidStateException" if call != CallKind::Manage && pending_deletion => (
            K::KeyDestroyed,
            format!(
                "KMS key {key} is pending deletion{says}: everything wrapped under it is \
                 unreadable; until the waiting period ends an administrator can still recover it \
                 with CancelKeyDeletion (then EnableKey); after that it is gone for good"
            ),
        ),
        "KMSInvalidStateException" if call != CallKind::Manage => (
            K::KeyDisabled,
            format!(
                "KMS key {key} is not usable in its current state{says}: check its state with \
                 DescribeKey (pending import, unavailable custom key store, ...)"
            ),
        ),
        "KMSInvalidStateException" => (
            K::InvalidState,
            format!(
                "KMS refused {operation} on {key} in the key's current state{says}{}",
                if pending_deletion {
                    ": it is pending deletion; CancelKeyDeletion first if it must be used again"
                } else {
                    ""
                }
            ),
        ),
        "NotFoundException" => (
            K::KeyNotFound,
            format!(
                "KMS key {key} was not found{says}: check the key reference, the region \
                 (AWS_REGION) and the account"
            ),
        ),
        "InvalidArnException" => (
            K::Misconfigured,
            format!("KMS does not accept {key} as a key ARN{says}"),
        ),
        "InvalidKeyUsageException" => (
            K::Misconfigured,
            format!(
                "KMS key {key} cannot be used for {operation}{says}: phi-envelope needs a \
                 symmetric encryption key (KeySpec SYMMETRIC_DEFAULT, KeyUsage ENCRYPT_DECRYPT)"
            ),
        ),
        "LimitExceededException" => (
            K::LimitReached,
            format!("a KMS quota was reached for {operation} on {key}{says}"),
        ),
        "AlreadyExistsException" => (
            K::InvalidState,
            format!("{key} already exists in KMS{says}"),
        ),
        "UnsupportedOperationException" => (
            K::Unsupported,
            format!("KMS does not support {operation} for {key}{says}"),
        ),
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "KMSUnavailableException"
        | "InternalFailure"
        | "InternalServerError" => (
            K::Unavailable,
            format!(
                "KMS could not serve {operation} for {key}: {code}{says}; the SDK retried: retry \
                 later"
            ),
        ),
        "" if status >= 500 => (
            K::Unavailable,
            format!(
                "KMS endpoint failed {operation} for {key} with HTTP {status} and no error \
                 code{says}; the SDK retried: retry later, and check the endpoint's logs"
            ),
        ),
        _ => (
            K::Other,
            format!(
                "KMS {operation} for {key} failed: {} (HTTP {status}){says}",
                if code.is_empty() {
                    "unknown error"
                } else {
                    code
                }
            ),
        ),
    };
    Failure::Error(provider_error(kind, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(code: &str, message: Option<&str>, call: CallKind) -> Option<ProviderErrorKind> {
        let answer = ServiceAnswer {
            code: Some(code),
            message,
            request_id: Some("req-1"),
            status: Some(400),
        };
        match classify_service("Decrypt", "aws-kms:k", call, answer) {
            Failure::Rejected => None,
            Failure::Error(Error::Provider(p)) => Some(p.kind()),
            Failure::Error(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn codes_map_to_kinds() {
        use CallKind::*;
        use ProviderErrorKind as K;
        assert_eq!(kind("InvalidCiphertextException", None, Decrypt), None);
        assert_eq!(kind("IncorrectKeyException", None, Decrypt), None);
        assert_eq!(
            kind("InvalidCiphertextException", None, Encrypt),
            Some(K::Other)
        );
        assert_eq!(
            kind(
                "AccessDeniedException",
                Some("The ciphertext refers to a customer master key that does not exist"),
                Decrypt
            ),
            None
        );
        assert_eq!(kind("AccessDeniedException", None, Decrypt), None);
        assert_eq!(
            kind(
                "AccessDeniedException",
                Some("User: x is not authorized to perform: kms:Decrypt"),
                Decrypt
            ),
            Some(K::AccessDenied)
        );
        assert_eq!(
            kind("AccessDeniedException", None, Encrypt),
            Some(K::AccessDenied)
        );
        assert_eq!(
            kind("ThrottlingException", None, Encrypt),
            Some(K::Throttled)
        );
        assert_eq!(
            kind("DisabledException", None, Decrypt),
            Some(K::KeyDisabled)
        );
        assert_eq!(
            kind(
                "KMSInvalidStateException",
                Some("arn:... is pending deletion."),
                Decrypt
            ),
            Some(K::KeyDestroyed)
        );
        assert_eq!(
            kind(
                "KMSInvalidStateException",
                Some("arn:... is PendingImport."),
                Decrypt
            ),
            Some(K::KeyDisabled)
        );
        assert_eq!(
            kind(
                "KMSInvalidStateException",
                Some("arn:... is pending deletion."),
                Manage
            ),
            Some(K::InvalidState)
        );
        assert_eq!(
            kind("NotFoundException", None, Manage),
            Some(K::KeyNotFound)
        );
        assert_eq!(
            kind("KMSInternalException", None, Decrypt),
            Some(K::Unavailable)
        );
        assert_eq!(
            kind("ExpiredTokenException", None, Decrypt),
            Some(K::AccessDenied)
        );
        assert_eq!(kind("Whatever", None, Decrypt), Some(K::Other));
    }

    #[test]
    fn messages_say_what_to_do() {
        let Failure::Error(e) = classify_service(
            "Decrypt",
            "aws-kms:arn:aws:kms:us-east-1:111122223333:key/k",
            CallKind::Decrypt,
            ServiceAnswer {
                code: Some("KMSInvalidStateException"),
                message: Some("arn:aws:kms:us-east-1:111122223333:key/k is pending deletion."),
                request_id: Some("req-9"),
                status: Some(400),
            },
        ) else {
            panic!()
        };
        let s = e.to_string();
        assert!(s.contains("CancelKeyDeletion"), "{s}");
        assert!(s.contains("req-9"), "{s}");
    }
}
