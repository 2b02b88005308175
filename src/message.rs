//! Whole messages (header and body) with the DEK in hand: the layer the
//! envelope API uses once a key provider has produced or unwrapped the DEK.
//!
//! A [`SealingKey`] is made once per DEK: it holds the encoded header with
//! its tag and the HKDF state of the DEK, so that sealing many messages under
//! a cached DEK costs one salt, one HKDF-Expand and the AES-GCM work each.
//! An [`OpeningKey`] is made from a DEK and a parsed [`Header`]; making it
//! verifies the header tag.
//!
//! Most applications use [`crate::Envelope`], which does all of this with
//! keys from a provider.

use std::fmt;
use std::io::{Read, Seek, Write};

use ring::hkdf::Prk;
use ring::hmac;

use crate::cobblestone::{self, Decryptor, Encryptor, SeekableDecryptor, SALT_LEN};
use crate::error::Result;
use crate::format::{body_context, header_tag_key, EncryptionContext, Header, Suite, WrappedKey};
use crate::primitives::{hkdf_prk_sha512, Dek};

/// The suite this build writes.
pub const DEFAULT_SUITE: Suite = Suite::Aes256GcmHkdfSha512;

/// A DEK ready to seal messages: the HKDF state of the DEK and the header
/// (wrapped keys and tag), both computed once.
pub struct SealingKey {
    prk: Prk,
    header: Header,
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingKey")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    /// Builds the header for `recipients` (the DEK wrapped under each
    /// recipient key) and tags it with a key derived from `dek`.
    pub fn new(dek: &Dek, recipients: Vec<WrappedKey>) -> Result<SealingKey> {
        let prk = hkdf_prk_sha512(dek.expose_secret());
        let header = Header::build(DEFAULT_SUITE, recipients, &header_tag_key(&prk))?;
        Ok(SealingKey { prk, header })
    }

    /// The header every message sealed with this key starts with.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Seals `plaintext` as one message bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.seal_with_salt(plaintext, context, None)
    }

    pub(crate) fn seal_with_salt(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
        salt: Option<&[u8; SALT_LEN]>,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(
            self.header.len() + cobblestone::body_len(plaintext.len() as u64) as usize,
        );
        out.extend_from_slice(self.header.as_bytes());
        let ctx = body_context(self.header.suite(), context);
        cobblestone::encrypt_into(&self.prk, &ctx, salt, plaintext, &mut out)?;
        Ok(out)
    }

    /// Writes the header to `inner` and returns a writer that encrypts the
    /// body; call [`Encryptor::finish`] at the end.
    pub fn encryptor<W: Write>(
        &self,
        inner: W,
        context: &EncryptionContext,
    ) -> Result<Encryptor<W>> {
        self.encryptor_with_salt(inner, context, None)
    }

    /// The body keys and the 56-byte body prefix of a new message (fresh
    /// salt), for adapters that write the body themselves.
    #[cfg(feature = "tokio")]
    pub(crate) fn start_body(
        &self,
        context: &EncryptionContext,
    ) -> Result<(cobblestone::BodyKeys, [u8; cobblestone::PREFIX_LEN])> {
        let ctx = body_context(self.header.suite(), context);
        cobblestone::start_body(&self.prk, &ctx, None)
    }

    pub(crate) fn encryptor_with_salt<W: Write>(
        &self,
        mut inner: W,
        context: &EncryptionContext,
        salt: Option<&[u8; SALT_LEN]>,
    ) -> Result<Encryptor<W>> {
        inner.write_all(self.header.as_bytes())?;
        let ctx = body_context(self.header.suite(), context);
        Encryptor::with_prk(&self.prk, &ctx, salt, inner)
    }
}

/// A DEK whose header tag has been verified, ready to open the body that
/// follows the header.
pub struct OpeningKey {
    prk: Prk,
    suite: Suite,
}

impl fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpeningKey")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl OpeningKey {
    /// Verifies `header`'s tag under `dek`. A mismatch (a wrong DEK, or any
    /// header byte changed) is the opaque [`Error::Decrypt`](crate::Error::Decrypt).
    pub fn new(dek: &Dek, header: &Header) -> Result<OpeningKey> {
        let prk = hkdf_prk_sha512(dek.expose_secret());
        header.verify(&header_tag_key(&prk))?;
        Ok(OpeningKey {
            prk,
            suite: header.suite(),
        })
    }

    /// The body keys for a body whose 56-byte prefix is `prefix`, after the
    /// commitment check, for adapters that read the body themselves.
    #[cfg(feature = "tokio")]
    pub(crate) fn body_keys(
        &self,
        prefix: &[u8; cobblestone::PREFIX_LEN],
        context: &EncryptionContext,
    ) -> Result<cobblestone::BodyKeys> {
        cobblestone::BodyKeys::from_prefix(&self.prk, &body_context(self.suite, context), prefix)
    }

    /// Decrypts a whole body (the bytes after the header) held in memory.
    /// Returns nothing unless every chunk authenticated.
    pub fn open(&self, body: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        cobblestone::decrypt_slice(&self.prk, &body_context(self.suite, context), body)
    }

    /// A reader that decrypts the body from `inner`, positioned just after
    /// the header.
    pub fn decryptor<R: Read>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<Decryptor<R>> {
        Decryptor::with_prk(&self.prk, &body_context(self.suite, context), inner)
    }

    /// A random-access reader over the body from `inner`, positioned just
    /// after the header.
    pub fn seekable_decryptor<R: Read + Seek>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<SeekableDecryptor<R>> {
        SeekableDecryptor::with_prk(&self.prk, &body_context(self.suite, context), inner)
    }
}

/// Opens a whole message held in memory with a known DEK.
pub fn open(message: &[u8], dek: &Dek, context: &EncryptionContext) -> Result<Vec<u8>> {
    let (header, used) = Header::parse(message)?;
    OpeningKey::new(dek, &header)?.open(&message[used..], context)
}

/// Replaces the wrapped-key entries of `header` and re-tags it, after
/// verifying the old tag under `dek`. The body is untouched: write the new
/// header followed by the old body.
pub fn rewrap_header(header: &Header, dek: &Dek, recipients: Vec<WrappedKey>) -> Result<Header> {
    let prk = hkdf_prk_sha512(dek.expose_secret());
    let tag_key: hmac::Key = header_tag_key(&prk);
    header.verify(&tag_key)?;
    Header::build(header.suite(), recipients, &tag_key)
}

/// The structural facts of a message that need no key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageInfo {
    /// The parsed header (recipients, suite, version).
    pub header: Header,
    /// Body length in bytes, when known.
    pub body_len: Option<u64>,
    /// Number of chunks, when the body length is known and valid.
    pub chunks: Option<u64>,
    /// Plaintext length, when the body length is known and valid.
    pub plaintext_len: Option<u64>,
}

impl MessageInfo {
    /// Facts from a header and, when known, the length of the body after it.
    /// An impossible body length is [`Error::Truncated`](crate::Error::Truncated).
    pub fn new(header: Header, body_len: Option<u64>) -> Result<MessageInfo> {
        let plaintext_len = body_len.map(cobblestone::plaintext_len).transpose()?;
        Ok(MessageInfo {
            header,
            body_len,
            chunks: plaintext_len.map(|n| n / cobblestone::CHUNK_SIZE as u64 + 1),
            plaintext_len,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Known-answer vectors for the whole v1 format. The fixed salt is a
    //! test-only seam: `seal_with_salt` is crate-private and only tests pass
    //! `Some(salt)`.
    use super::*;

    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/phi-envelope-v1.json"
    );

    struct Case {
        name: &'static str,
        dek: [u8; 32],
        salt: [u8; 24],
        context: Vec<(&'static str, &'static str)>,
        recipients: Vec<WrappedKey>,
        plaintext: Vec<u8>,
    }

    fn entry(provider: &str, key_ref: &str, version: u32, wrapped: &[u8]) -> WrappedKey {
        WrappedKey {
            provider: provider.into(),
            key_ref: key_ref.into(),
            key_version: version,
            wrapped: wrapped.to_vec(),
        }
    }

    fn cases() -> Vec<Case> {
        let seq = |n: usize| (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
        vec![
            Case {
                name: "record, one local recipient, context",
                dek: [0x11; 32],
                salt: [0x22; 24],
                context: vec![("tenant", "st-mary"), ("record_type", "lab-result")],
                recipients: vec![entry("local", "local:records", 1, &[0xAA; 60])],
                plaintext: b"{\"mrn\":\"000123\",\"result\":\"negative\"}".to_vec(),
            },
            Case {
                name: "empty message, empty context",
                dek: [0x33; 32],
                salt: [0x44; 24],
                context: vec![],
                recipients: vec![entry("local", "local:k", 7, &[0x01])],
                plaintext: vec![],
            },
            Case {
                name: "two recipients, exactly one full chunk",
                dek: [0x55; 32],
                salt: [0x66; 24],
                context: vec![("backup", "2026-11-25")],
                recipients: vec![
                    entry("pkcs11", "pkcs11:token=phi;object=kek", 3, &[0xBB; 60]),
                    entry(
                        "aws-kms",
                        "aws-kms:arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                        1,
                        &[0xCC; 184],
                    ),
                ],
                plaintext: seq(16384),
            },
            Case {
                name: "three chunks, last short",
                dek: [0x77; 32],
                salt: [0x88; 24],
                context: vec![("a", ""), ("b", "x=y;z")],
                recipients: vec![entry("local", "local:backups", 2, &[0xDD; 60])],
                plaintext: seq(2 * 16384 + 1000),
            },
        ]
    }

    fn seal_case(c: &Case) -> Vec<u8> {
        let dek = Dek::from_slice(&c.dek).unwrap();
        let key = SealingKey::new(&dek, c.recipients.clone()).unwrap();
        let ctx = EncryptionContext::from_pairs(c.context.iter().copied()).unwrap();
        key.seal_with_salt(&c.plaintext, &ctx, Some(&c.salt))
            .unwrap()
    }

    fn to_json(cases: &[Case]) -> String {
        let mut out = String::from("{\n  \"description\": \"phi-envelope v1 known-answer vectors (docs/FORMAT.md). Each message is header || Cobblestone-256 body, sealed with the given DEK and salt.\",\n  \"vectors\": [\n");
        for (i, c) in cases.iter().enumerate() {
            let ctx: Vec<String> = c
                .context
                .iter()
                .map(|(k, v)| format!("[{:?}, {:?}]", k, v))
                .collect();
            let recips: Vec<String> = c
                .recipients
                .iter()
                .map(|r| {
                    format!(
                        "{{\"provider\": {:?}, \"key_ref\": {:?}, \"key_version\": {}, \"wrapped\": \"{}\"}}",
                        r.provider,
                        r.key_ref,
                        r.key_version,
                        ::hex::encode(&r.wrapped)
                    )
                })
                .collect();
            out.push_str(&format!(
                "    {{\n      \"name\": {:?},\n      \"dek\": \"{}\",\n      \"salt\": \"{}\",\n      \"context\": [{}],\n      \"recipients\": [{}],\n      \"plaintext\": \"{}\",\n      \"message\": \"{}\"\n    }}{}\n",
                c.name,
                ::hex::encode(c.dek),
                ::hex::encode(c.salt),
                ctx.join(", "),
                recips.join(", "),
                ::hex::encode(&c.plaintext),
                ::hex::encode(seal_case(c)),
                if i + 1 == cases.len() { "" } else { "," }
            ));
        }
        out.push_str("  ]\n}\n");
        out
    }

    /// Byte-for-byte check of the committed vectors. Set
    /// `PHI_ENVELOPE_REGENERATE_VECTORS=1` to rewrite the file (only when the
    /// format is deliberately changed, which v1 never is).
    #[test]
    fn known_answer_vectors() {
        let want = to_json(&cases());
        if std::env::var_os("PHI_ENVELOPE_REGENERATE_VECTORS").is_some() {
            std::fs::write(VECTORS, &want).unwrap();
        }
        let have = std::fs::read_to_string(VECTORS).expect("tests/vectors/phi-envelope-v1.json");
        assert!(
            have == want,
            "v1 output differs from the committed known-answer vectors"
        );
    }

    #[test]
    fn sealing_key_header_is_computed_once_and_reused() {
        let c = &cases()[0];
        let a = seal_case(c);
        let dek = Dek::from_slice(&c.dek).unwrap();
        let key = SealingKey::new(&dek, c.recipients.clone()).unwrap();
        assert!(a.starts_with(key.header().as_bytes()));
    }
}
