//! The v1 header: magic, version, suite, wrapped-key entries, header tag.

use std::fmt;
use std::io::Read;

use ring::hmac;

use crate::error::{Error, Result};
use crate::primitives::{hkdf_expand_sha512, SecretBytes};

/// The six magic bytes that open every message: ASCII `PHIENV`.
pub const MAGIC: [u8; 6] = *b"PHIENV";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Most wrapped-key entries (recipients) in one header.
pub const MAX_RECIPIENTS: usize = 8;
/// Longest provider id, in bytes.
pub const MAX_PROVIDER_ID_LEN: usize = 32;
/// Longest key reference, in bytes of UTF-8.
pub const MAX_KEY_REF_LEN: usize = 1024;
/// Longest wrapped key, in bytes.
pub const MAX_WRAPPED_KEY_LEN: usize = 2048;
/// Length of the header tag (HMAC-SHA-256).
pub const HEADER_TAG_LEN: usize = 32;
/// Length of the fixed part before the entries: magic, version, suite, count.
pub const FIXED_PREFIX_LEN: usize = MAGIC.len() + 3;
/// The largest possible header, in bytes.
pub const MAX_HEADER_LEN: usize = FIXED_PREFIX_LEN
    + MAX_RECIPIENTS
        * (1 + MAX_PROVIDER_ID_LEN + 2 + MAX_KEY_REF_LEN + 4 + 2 + MAX_WRAPPED_KEY_LEN)
    + HEADER_TAG_LEN;

// The text of every `Error::Malformed` a header can give: the field, as
// docs/FORMAT.md section 4 names it, then ": " and what is wrong with it.
// Stable: FORMAT.md section 8.1 lists them and the negative vectors use them.
const COUNT: &str = "count: out of range 1..=8";
const PLEN: &str = "plen: provider id length out of range 1..=32";
const PROVIDER_ID: &str = "provider id: a byte outside [a-z0-9-]";
const RLEN: &str = "rlen: key reference length out of range 1..=1024";
const KEY_REF_UTF8: &str = "key reference: not well-formed UTF-8";
const KEY_REF_CONTROL: &str =
    "key reference: a control character (U+0000..=U+001F, U+007F..=U+009F)";
const WLEN: &str = "wlen: wrapped key length out of range 1..=2048";

/// The HKDF-Expand info of the header-tag key.
pub(crate) const HEADER_TAG_LABEL: &[u8] = b"phi-envelope/v1 header tag";

/// An algorithm suite: how the body is encrypted and the header tagged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// Suite `0x01`: a Cobblestone-256 body (c2sp.org/chunked-encryption with
    /// AEAD_AES_256_GCM and HKDF-Expand-SHA-512, 16 KiB chunks) and an
    /// HMAC-SHA-256 header tag keyed by HKDF-Expand-SHA-512 from the DEK.
    Aes256GcmHkdfSha512 = 0x01,
}

impl Suite {
    /// The suite's one-byte id on the wire.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The suite's stable name, as tools print it (`inspect`) and as
    /// docs/FORMAT.md section 3 names it: `"Aes256GcmHkdfSha512"` for
    /// suite `0x01`. The same text as `Debug`.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes256GcmHkdfSha512 => "Aes256GcmHkdfSha512",
        }
    }

    /// The suite for a wire id; unknown ids are an error, never guessed.
    pub fn from_id(id: u8) -> Result<Suite> {
        match id {
            0x01 => Ok(Suite::Aes256GcmHkdfSha512),
            other => Err(Error::UnsupportedSuite(other)),
        }
    }
}

/// One wrapped-key entry: the DEK wrapped by one key-encryption key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The provider that can unwrap it (`local`, `pkcs11`, `aws-kms`, or a
    /// user provider's id): ASCII lowercase letters, digits and `-`.
    pub provider: String,
    /// The key reference, e.g. `local:backups` or an `aws-kms:` ARN.
    pub key_ref: String,
    /// The version of the key-encryption key that wrapped it.
    pub key_version: u32,
    /// The provider's opaque wrapped form of the DEK.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("provider", &self.provider)
            .field("key_ref", &self.key_ref)
            .field("key_version", &self.key_version)
            .field("wrapped_len", &self.wrapped.len())
            .finish()
    }
}

impl WrappedKey {
    /// Checks the bounds and character sets of every field.
    pub fn validate(&self) -> Result<()> {
        validate_provider_id(self.provider.as_bytes())?;
        validate_key_ref(self.key_ref.as_bytes())?;
        if self.wrapped.is_empty() || self.wrapped.len() > MAX_WRAPPED_KEY_LEN {
            return Err(Error::Malformed(WLEN));
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        1 + self.provider.len() + 2 + self.key_ref.len() + 4 + 2 + self.wrapped.len()
    }
}

fn validate_provider_id(id: &[u8]) -> Result<()> {
    if id.is_empty() || id.len() > MAX_PROVIDER_ID_LEN {
        return Err(Error::Malformed(PLEN));
    }
    if !id
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(Error::Malformed(PROVIDER_ID));
    }
    Ok(())
}

fn validate_key_ref(r: &[u8]) -> Result<()> {
    if r.is_empty() || r.len() > MAX_KEY_REF_LEN {
        return Err(Error::Malformed(RLEN));
    }
    let s = std::str::from_utf8(r).map_err(|_| Error::Malformed(KEY_REF_UTF8))?;
    if s.chars().any(char::is_control) {
        return Err(Error::Malformed(KEY_REF_CONTROL));
    }
    Ok(())
}

/// A parsed header. Its bytes are kept as read so the tag can be verified
/// over exactly what was on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    suite: Suite,
    recipients: Vec<WrappedKey>,
    bytes: Vec<u8>,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("version", &VERSION)
            .field("suite", &self.suite)
            .field("recipients", &self.recipients)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// The header-tag key: HKDF-Expand-SHA-512(DEK, "phi-envelope/v1 header tag", 32).
pub(crate) fn header_tag_key(prk: &ring::hkdf::Prk) -> hmac::Key {
    let mut k: SecretBytes<32> = Default::default();
    hkdf_expand_sha512(prk, &[HEADER_TAG_LABEL], &mut k[..])
        .expect("32 bytes is within the HKDF limit");
    hmac::Key::new(hmac::HMAC_SHA256, &k[..])
}

impl Header {
    /// Encodes a header for `recipients` and appends its tag under `tag_key`.
    pub(crate) fn build(
        suite: Suite,
        recipients: Vec<WrappedKey>,
        tag_key: &hmac::Key,
    ) -> Result<Header> {
        if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
            return Err(Error::Malformed(COUNT));
        }
        for r in &recipients {
            r.validate()?;
        }
        let len = FIXED_PREFIX_LEN
            + recipients
                .iter()
                .map(WrappedKey::encoded_len)
                .sum::<usize>()
            + HEADER_TAG_LEN;
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(&MAGIC);
        bytes.push(VERSION);
        bytes.push(suite.id());
        bytes.push(recipients.len() as u8);
        for r in &recipients {
            bytes.push(r.provider.len() as u8);
            bytes.extend_from_slice(r.provider.as_bytes());
            bytes.extend_from_slice(&(r.key_ref.len() as u16).to_be_bytes());
            bytes.extend_from_slice(r.key_ref.as_bytes());
            bytes.extend_from_slice(&r.key_version.to_be_bytes());
            bytes.extend_from_slice(&(r.wrapped.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&r.wrapped);
        }
        let tag = hmac::sign(tag_key, &bytes);
        bytes.extend_from_slice(tag.as_ref());
        debug_assert_eq!(bytes.len(), len);
        Ok(Header {
            suite,
            recipients,
            bytes,
        })
    }

    /// Parses a header from the front of `input`, returning it and the number
    /// of bytes it took. The tag is not verified: that needs the DEK.
    pub fn parse(input: &[u8]) -> Result<(Header, usize)> {
        let mut rest = input;
        let header = Header::read_from(&mut rest)?;
        let used = input.len() - rest.len();
        Ok((header, used))
    }

    /// Reads a header from `reader`, consuming exactly its bytes. Every length
    /// is checked against its bound before anything is allocated. The tag is
    /// not verified: that needs the DEK.
    pub fn read_from<R: Read + ?Sized>(reader: &mut R) -> Result<Header> {
        let mut fixed = [0u8; FIXED_PREFIX_LEN];
        let got = read_full(reader, &mut fixed)?;
        // Field by field, each judged once it is complete (docs/FORMAT.md
        // section 4.4): the magic on the bytes present, so that a short
        // foreign input is `NotEnvelope`; then the version, and only for
        // version 1 the suite and the count. Input that ends inside the
        // first field not yet judged is `Truncated`.
        let n = got.min(MAGIC.len());
        if fixed[..n] != MAGIC[..n] {
            return Err(Error::NotEnvelope);
        }
        if got <= MAGIC.len() {
            return Err(Error::Truncated);
        }
        let version = fixed[MAGIC.len()];
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        if got <= MAGIC.len() + 1 {
            return Err(Error::Truncated);
        }
        let suite = Suite::from_id(fixed[MAGIC.len() + 1])?;
        if got < FIXED_PREFIX_LEN {
            return Err(Error::Truncated);
        }
        let count = usize::from(fixed[MAGIC.len() + 2]);
        if count == 0 || count > MAX_RECIPIENTS {
            return Err(Error::Malformed(COUNT));
        }
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&fixed);
        let mut recipients = Vec::with_capacity(count);
        for _ in 0..count {
            let plen = usize::from(read_array::<1, _>(reader, &mut bytes)?[0]);
            if plen == 0 || plen > MAX_PROVIDER_ID_LEN {
                return Err(Error::Malformed(PLEN));
            }
            let provider = read_vec(reader, plen, &mut bytes)?;
            validate_provider_id(&provider)?;
            let rlen = usize::from(u16::from_be_bytes(read_array(reader, &mut bytes)?));
            if rlen == 0 || rlen > MAX_KEY_REF_LEN {
                return Err(Error::Malformed(RLEN));
            }
            let key_ref = read_vec(reader, rlen, &mut bytes)?;
            validate_key_ref(&key_ref)?;
            let key_version = u32::from_be_bytes(read_array(reader, &mut bytes)?);
            let wlen = usize::from(u16::from_be_bytes(read_array(reader, &mut bytes)?));
            if wlen == 0 || wlen > MAX_WRAPPED_KEY_LEN {
                return Err(Error::Malformed(WLEN));
            }
            let wrapped = read_vec(reader, wlen, &mut bytes)?;
            recipients.push(WrappedKey {
                // Both validated above: ASCII and UTF-8 respectively.
                provider: String::from_utf8(provider).map_err(|_| Error::Malformed(PROVIDER_ID))?,
                key_ref: String::from_utf8(key_ref).map_err(|_| Error::Malformed(KEY_REF_UTF8))?,
                key_version,
                wrapped,
            });
        }
        read_array::<HEADER_TAG_LEN, _>(reader, &mut bytes)?;
        Ok(Header {
            suite,
            recipients,
            bytes,
        })
    }

    /// Verifies the header tag in constant time. A mismatch is the opaque
    /// [`Error::Decrypt`].
    pub(crate) fn verify(&self, tag_key: &hmac::Key) -> Result<()> {
        let (body, tag) = self.bytes.split_at(self.bytes.len() - HEADER_TAG_LEN);
        hmac::verify(tag_key, body, tag).map_err(|_| Error::Decrypt)
    }

    /// The algorithm suite.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The format version (always [`VERSION`] for a parsed header).
    pub fn version(&self) -> u8 {
        VERSION
    }

    /// The wrapped-key entries, in order.
    pub fn recipients(&self) -> &[WrappedKey] {
        &self.recipients
    }

    /// The encoded header, tag included, exactly as on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Length of the encoded header in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a header has at least its fixed prefix and tag.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Reads until `buf` is full or the reader ends; returns the count read.
pub(crate) fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

fn read_array<const N: usize, R: Read + ?Sized>(
    reader: &mut R,
    record: &mut Vec<u8>,
) -> Result<[u8; N]> {
    let mut a = [0u8; N];
    if read_full(reader, &mut a)? < N {
        return Err(Error::Truncated);
    }
    record_extend(record, &a);
    Ok(a)
}

/// Appends to the header record without ever growing its allocation past
/// [`MAX_HEADER_LEN`] (plain doubling could overshoot it).
fn record_extend(record: &mut Vec<u8>, data: &[u8]) {
    let need = record.len() + data.len();
    if need > record.capacity() {
        let target = (record.capacity() * 2).min(MAX_HEADER_LEN).max(need);
        record.reserve_exact(target - record.len());
    }
    record.extend_from_slice(data);
}

/// Reads `len` bytes (already bounded by the caller) into a new vector.
fn read_vec<R: Read + ?Sized>(reader: &mut R, len: usize, record: &mut Vec<u8>) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    if read_full(reader, &mut v)? < len {
        return Err(Error::Truncated);
    }
    record_extend(record, &v);
    Ok(v)
}
