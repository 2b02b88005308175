//! The crate's error type, and the provider error it carries
//! ([`ProviderError`], public as `provider::ProviderError`): both sit below
//! the providers and the primitives, which return them.
//!
//! Authentication failures of every kind (a chunk tag, the key commitment, the
//! header tag, a wrong key, a wrong encryption context, a wrapped key that a
//! provider could not unwrap) are reported as the single opaque
//! [`Error::Decrypt`]: a caller, and an attacker probing with modified
//! messages, learns nothing about which check failed. Structural problems
//! (bad magic, an unknown version or suite, an oversized field, a truncated
//! message) and operational failures (I/O, a provider that is down, a policy
//! denial) are specific, carry their source and say what to do.
//!
//! One refinement keeps truncated copies recognisable: a final chunk that
//! fails after full chunks that authenticated is [`Error::TruncatedChunk`]
//! (a copy cut inside a chunk, or its end damaged), not `Decrypt`; it tells
//! a caller nothing it does not already know (docs/FORMAT.md section 7.4).
//! Every decoder reports the first defect in stream order (section 7.3).

use std::io;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in phi-envelope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Authentication failed: the key, the encryption context or the data is
    /// wrong. Deliberately says no more.
    #[error("decryption failed: wrong key, wrong encryption context, or the data was modified")]
    Decrypt,

    /// The message ends where no message can end: inside its header or its
    /// body prefix, or where a chunk boundary leaves no room for the final
    /// chunk (a copy cut at a chunk boundary, or within the first 15 bytes
    /// of a chunk). In the body this is reported only once every chunk
    /// before the cut authenticated (`docs/FORMAT.md`, section 7.3).
    #[error("message is truncated: it ends before its final chunk (or inside its header); a complete copy is needed")]
    Truncated,

    /// The message ends inside a chunk: every chunk before its last one
    /// authenticated, and the last one, which is shorter than a full chunk,
    /// does not. This is what a copy cut short inside a chunk (a full disk,
    /// `head -c`) looks like; a final chunk that was modified, or bytes
    /// appended after it, look the same, and no decoder can tell these
    /// apart. Reported only when at least one full chunk authenticated
    /// before it; otherwise the failure is the opaque [`Error::Decrypt`].
    /// See `docs/FORMAT.md`, section 7.4, and SECURITY.md for why this does
    /// not weaken the opacity of authentication failures.
    #[error("message is truncated: it ends inside a chunk (every chunk before it authenticated, the last one did not: the copy was cut short or its end was damaged); a complete copy is needed")]
    TruncatedChunk,

    /// The input does not start with the phi-envelope magic bytes.
    #[error("not a phi-envelope message (unknown magic bytes)")]
    NotEnvelope,

    /// The message was written by a format version this build does not know.
    #[error("unsupported phi-envelope format version {0}; a newer phi-envelope may read it")]
    UnsupportedVersion(u8),

    /// The message uses an algorithm suite this build does not know.
    #[error("unsupported algorithm suite {0:#04x}")]
    UnsupportedSuite(u8),

    /// A header field is malformed or exceeds its bound. The text starts
    /// with the field's name as docs/FORMAT.md section 4 spells it (`count`,
    /// `plen`, `provider id`, `rlen`, `key reference`, `wlen`), then `": "`
    /// and what is wrong; [`Error::malformed_field`] returns the name.
    #[error("malformed header: {0}")]
    Malformed(&'static str),

    /// The encryption context is invalid (duplicate key, empty key, too large).
    #[error("invalid encryption context: {0}")]
    InvalidContext(&'static str),

    /// The associated data is invalid (longer than 65536 bytes,
    /// docs/FORMAT.md section 5.4). Refused before any key is used; the text
    /// never repeats the data, which may itself be PHI (a record id).
    #[error("invalid associated data: {0}")]
    InvalidAssociatedData(&'static str),

    /// A key reference could not be parsed.
    #[error("invalid key reference {reference:?}: {reason}")]
    InvalidKeyRef {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A key was given with the wrong length.
    #[error("invalid key length: expected {expected} bytes")]
    InvalidKeyLength {
        /// The length the algorithm requires.
        expected: usize,
    },

    /// The message would exceed the 2^38 chunk limit of the body format.
    #[error("message too long: the chunk counter limit (2^38 chunks, 4 PiB) was reached")]
    MessageTooLong,

    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Rng,

    /// A key provider failed (unavailable, access denied, key disabled or
    /// destroyed, ...); the message says what to do.
    #[error(transparent)]
    Provider(ProviderError),

    /// No configured provider holds any key that this message is wrapped to.
    #[error("no configured key provider holds a key for this message (recipients: {0}); check the keystore or provider configuration")]
    NoMatchingKey(String),

    /// The policy hook denied the operation.
    #[error("denied by policy: {0}")]
    PolicyDenied(String),

    /// Dual control refused a guarded lifecycle verb before any provider
    /// call: too few valid approvals from distinct custodians, or an
    /// approval that is expired, already used, altered, by an unknown
    /// custodian or for another operation (see [`crate::approval`]). The
    /// text says which approval and what is missing.
    #[error("dual control: {0}")]
    Approval(String),

    /// The audit log could not be written and the operation was refused
    /// (fail-closed).
    #[error("audit log unavailable, operation refused: {0}")]
    Audit(String),

    /// A key-lifecycle rule refused the operation (cryptoperiod expired,
    /// version below the minimum decryption version, ...).
    #[error("key lifecycle: {0}")]
    KeyLifecycle(String),

    /// An argument is invalid (e.g. no recipients given).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The local keystore file is invalid or unusable.
    #[error("keystore {path}: {reason}")]
    Keystore {
        /// The keystore file.
        path: std::path::PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A recovery share could not be read (mistyped, damaged, another
    /// format), or the shares given do not restore a recovery key (too few,
    /// of different keys or splits, a share twice, a wrong combination).
    /// The text says what is wrong and what to do; it never contains share
    /// values.
    #[error("recovery share: {0}")]
    RecoveryShare(String),

    /// A call of the [blocking facade](crate::blocking) was refused: made
    /// from inside an async runtime (where it would block a worker), or
    /// without a runtime for a keyring whose providers need one. The text
    /// says which and what to do instead.
    #[error("blocking call refused: {0}")]
    Blocking(String),

    /// An I/O error from the underlying reader, writer or file system.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
}

impl Error {
    /// True for the opaque authentication failure.
    pub fn is_decrypt(&self) -> bool {
        matches!(self, Error::Decrypt)
    }

    /// For [`Error::Malformed`], the header field at fault, as
    /// docs/FORMAT.md section 4 names it (`"count"`, `"plen"`,
    /// `"provider id"`, `"rlen"`, `"key reference"`, `"wlen"`).
    pub fn malformed_field(&self) -> Option<&'static str> {
        match self {
            Error::Malformed(text) => Some(text.split(": ").next().unwrap_or(text)),
            _ => None,
        }
    }

    /// True when the message is cut short: [`Error::Truncated`] or
    /// [`Error::TruncatedChunk`]. Either way a complete copy is needed.
    pub fn is_truncated(&self) -> bool {
        matches!(self, Error::Truncated | Error::TruncatedChunk)
    }
}

/// Wraps our error in an `io::Error` so that `Read`/`Write` adapters can
/// return it; [`From<io::Error>`] unwraps it again.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(inner) => inner,
            other => {
                let kind = match other {
                    Error::Truncated | Error::TruncatedChunk => io::ErrorKind::UnexpectedEof,
                    _ => io::ErrorKind::InvalidData,
                };
                io::Error::new(kind, other)
            }
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            match e.into_inner().map(|b| b.downcast::<Error>()) {
                Some(Ok(inner)) => *inner,
                // Unreachable in practice (checked above); keep the I/O error.
                Some(Err(other)) => Error::Io(io::Error::other(other)),
                None => Error::Io(io::Error::other("unknown I/O error")),
            }
        } else {
            Error::Io(e)
        }
    }
}

/// What went wrong in a provider, as a caller can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The provider cannot be reached or did not answer in time (network,
    /// endpoint down, token removed, session lost). Retry later.
    Unavailable,
    /// The provider refused the caller's credentials or permissions
    /// (AccessDenied, wrong PIN).
    AccessDenied,
    /// The provider is rate-limiting; back off and retry.
    Throttled,
    /// The key (or version) does not exist in the provider.
    KeyNotFound,
    /// The key version is disabled.
    KeyDisabled,
    /// The key version is destroyed, or scheduled for deletion: messages
    /// under it can no longer be decrypted.
    KeyDestroyed,
    /// The requested lifecycle change is not allowed from the current state.
    InvalidState,
    /// The provider's configuration is wrong (module path, region, file).
    Misconfigured,
    /// The provider does not support this operation.
    Unsupported,
    /// A usage limit was reached (e.g. invocations per key for random GCM
    /// nonces); rotate the key.
    LimitReached,
    /// Anything else the provider reported.
    Other,
}

impl ProviderErrorKind {
    /// A stable lowercase name for logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderErrorKind::Unavailable => "unavailable",
            ProviderErrorKind::AccessDenied => "access-denied",
            ProviderErrorKind::Throttled => "throttled",
            ProviderErrorKind::KeyNotFound => "key-not-found",
            ProviderErrorKind::KeyDisabled => "key-disabled",
            ProviderErrorKind::KeyDestroyed => "key-destroyed",
            ProviderErrorKind::InvalidState => "invalid-state",
            ProviderErrorKind::Misconfigured => "misconfigured",
            ProviderErrorKind::Unsupported => "unsupported",
            ProviderErrorKind::LimitReached => "limit-reached",
            ProviderErrorKind::Other => "other",
        }
    }
}

/// An operational failure of a key provider. Its message says what happened
/// and what to do; it never contains key material or context values.
#[derive(Debug)]
pub struct ProviderError {
    provider: String,
    kind: ProviderErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ProviderError {
    /// A new error of `kind` from `provider` (its id).
    pub fn new(
        provider: impl Into<String>,
        kind: ProviderErrorKind,
        message: impl Into<String>,
    ) -> Self {
        ProviderError {
            provider: provider.into(),
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The provider's id.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> ProviderErrorKind {
        self.kind
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key provider {}: {}", self.provider, self.message)
    }
}

impl std::error::Error for ProviderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ProviderError> for Error {
    fn from(e: ProviderError) -> Error {
        Error::Provider(e)
    }
}
