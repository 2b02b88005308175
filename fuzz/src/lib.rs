//! Shared pieces of the phi-envelope fuzz targets:
//!
//! - [`reference`]: an independent Cobblestone-256 decoder on RustCrypto
//!   (`aes-gcm`, `hmac`, `sha2`), sharing no code with the library (`ring`),
//!   that says chunk by chunk what authenticates. The targets compare every
//!   decoder of the library against it.
//! - [`vectors`]: the committed known-answer messages (v1 vectors, Wycheproof
//!   Cobblestone vectors) with their keys, contexts and plaintexts.
//! - [`io`]: a reader that hands out its input in fuzzer-chosen pieces (and
//!   `Interrupted` errors), and read-size schedules.
//! - [`kms`]: a small deterministic in-memory key provider and a `block_on`
//!   for its always-ready futures, to fuzz through [`phi_envelope::Envelope`].

pub mod io;
pub mod kms;
pub mod reference;
pub mod vectors;

/// A stable name for the library's error kinds, for comparisons.
pub fn kind(e: &phi_envelope::Error) -> &'static str {
    use phi_envelope::Error as E;
    match e {
        E::Decrypt => "decrypt",
        E::Truncated => "truncated",
        E::TruncatedChunk => "truncated-chunk",
        E::NotEnvelope => "not-envelope",
        E::UnsupportedVersion(_) => "version",
        E::UnsupportedSuite(_) => "suite",
        E::Malformed(_) => "malformed",
        E::MessageTooLong => "too-long",
        E::Io(_) => "io",
        E::Provider(_) => "provider",
        E::NoMatchingKey(_) => "no-matching-key",
        _ => "other",
    }
}

/// The kind of an `io::Error` returned by a library reader.
pub fn io_kind(e: std::io::Error) -> &'static str {
    kind(&phi_envelope::Error::from(e))
}
