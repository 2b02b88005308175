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
//!
//! Why one file of this size: records, streams and the seekable reader all
//! derive their keys from one header and one body context here, so that every
//! decoder checks the same things in the same order (docs/FORMAT.md section
//! 7); over 1,000 of its lines are the known-answer and boundary tests that
//! pin that order.

use std::fmt;
use std::io::{Read, Seek, Write};

use ring::hkdf::Prk;
use ring::hmac;

use crate::cobblestone::{self, Decryptor, Encryptor, SeekableDecryptor, SALT_LEN};
use crate::error::Result;
use crate::format::{
    body_context_with_ad, header_tag_key, EncryptionContext, Header, Suite, WrappedKey,
};
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
        self.seal_with_salt(plaintext, context, &[], None)
    }

    /// Seals `plaintext` as one message bound to `context` and to the
    /// associated data `ad` (docs/FORMAT.md, section 5.4): the message opens
    /// only with the same context and the same associated data. Empty `ad`
    /// is the same as [`seal`](Self::seal).
    pub fn seal_with(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Vec<u8>> {
        self.seal_with_salt(plaintext, context, ad, None)
    }

    pub(crate) fn seal_with_salt(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
        salt: Option<&[u8; SALT_LEN]>,
    ) -> Result<Vec<u8>> {
        let ctx = body_context_with_ad(self.header.suite(), context, ad)?;
        let mut out = Vec::with_capacity(
            self.header.len() + cobblestone::body_len(plaintext.len() as u64) as usize,
        );
        out.extend_from_slice(self.header.as_bytes());
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
        self.encryptor_with_salt(inner, context, &[], None)
    }

    /// [`encryptor`](Self::encryptor) for a body bound to the associated
    /// data `ad` as well (docs/FORMAT.md, section 5.4).
    pub fn encryptor_with<W: Write>(
        &self,
        inner: W,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Encryptor<W>> {
        self.encryptor_with_salt(inner, context, ad, None)
    }

    /// The body keys and the 56-byte body prefix of a new message (fresh
    /// salt), for adapters that write the body themselves.
    #[cfg(feature = "tokio")]
    pub(crate) fn start_body(
        &self,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<(cobblestone::BodyKeys, [u8; cobblestone::PREFIX_LEN])> {
        let ctx = body_context_with_ad(self.header.suite(), context, ad)?;
        cobblestone::start_body(&self.prk, &ctx, None)
    }

    pub(crate) fn encryptor_with_salt<W: Write>(
        &self,
        mut inner: W,
        context: &EncryptionContext,
        ad: &[u8],
        salt: Option<&[u8; SALT_LEN]>,
    ) -> Result<Encryptor<W>> {
        // The associated data is checked before anything is written.
        let ctx = body_context_with_ad(self.header.suite(), context, ad)?;
        inner.write_all(self.header.as_bytes())?;
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
        ad: &[u8],
    ) -> Result<cobblestone::BodyKeys> {
        let ctx = body_context_with_ad(self.suite, context, ad)?;
        cobblestone::BodyKeys::from_prefix(&self.prk, &ctx, prefix)
    }

    /// Decrypts a whole body (the bytes after the header) held in memory.
    /// Returns nothing unless every chunk authenticated.
    pub fn open(&self, body: &[u8], context: &EncryptionContext) -> Result<Vec<u8>> {
        self.open_with(body, context, &[])
    }

    /// [`open`](Self::open) for a body bound to the associated data `ad` as
    /// well (docs/FORMAT.md, section 5.4). Other associated data (or none,
    /// for a body sealed with some) is the opaque
    /// [`Error::Decrypt`](crate::Error::Decrypt).
    pub fn open_with(
        &self,
        body: &[u8],
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Vec<u8>> {
        let ctx = body_context_with_ad(self.suite, context, ad)?;
        cobblestone::decrypt_slice(&self.prk, &ctx, body)
    }

    /// A reader that decrypts the body from `inner`, positioned just after
    /// the header.
    pub fn decryptor<R: Read>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<Decryptor<R>> {
        self.decryptor_with(inner, context, &[])
    }

    /// [`decryptor`](Self::decryptor) for a body bound to the associated
    /// data `ad` as well.
    pub fn decryptor_with<R: Read>(
        &self,
        inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<Decryptor<R>> {
        let ctx = body_context_with_ad(self.suite, context, ad)?;
        Decryptor::with_prk(&self.prk, &ctx, inner)
    }

    /// A random-access reader over the body from `inner`, positioned just
    /// after the header.
    pub fn seekable_decryptor<R: Read + Seek>(
        &self,
        inner: R,
        context: &EncryptionContext,
    ) -> Result<SeekableDecryptor<R>> {
        self.seekable_decryptor_with(inner, context, &[])
    }

    /// [`seekable_decryptor`](Self::seekable_decryptor) for a body bound to
    /// the associated data `ad` as well.
    pub fn seekable_decryptor_with<R: Read + Seek>(
        &self,
        inner: R,
        context: &EncryptionContext,
        ad: &[u8],
    ) -> Result<SeekableDecryptor<R>> {
        let ctx = body_context_with_ad(self.suite, context, ad)?;
        SeekableDecryptor::with_prk(&self.prk, &ctx, inner)
    }
}

/// Opens a whole message held in memory with a known DEK.
pub fn open(message: &[u8], dek: &Dek, context: &EncryptionContext) -> Result<Vec<u8>> {
    open_with(message, dek, context, &[])
}

/// [`open`] for a message bound to the associated data `ad` as well
/// (docs/FORMAT.md, section 5.4). The associated data is checked before the
/// DEK is used.
pub fn open_with(
    message: &[u8],
    dek: &Dek,
    context: &EncryptionContext,
    ad: &[u8],
) -> Result<Vec<u8>> {
    crate::format::check_associated_data(ad)?;
    let (header, used) = Header::parse(message)?;
    OpeningKey::new(dek, &header)?.open_with(&message[used..], context, ad)
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
    use crate::Error;

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
        /// Associated data (docs/FORMAT.md, section 5.4); empty in the v1
        /// file, which has no such member.
        ad: Vec<u8>,
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
                ad: vec![],
            },
            Case {
                name: "empty message, empty context",
                dek: [0x33; 32],
                salt: [0x44; 24],
                context: vec![],
                recipients: vec![entry("local", "local:k", 7, &[0x01])],
                plaintext: vec![],
                ad: vec![],
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
                ad: vec![],
            },
            Case {
                name: "three chunks, last short",
                dek: [0x77; 32],
                salt: [0x88; 24],
                context: vec![("a", ""), ("b", "x=y;z")],
                recipients: vec![entry("local", "local:backups", 2, &[0xDD; 60])],
                plaintext: seq(2 * 16384 + 1000),
                ad: vec![],
            },
        ]
    }

    fn seal_case(c: &Case) -> Vec<u8> {
        let dek = Dek::from_slice(&c.dek).unwrap();
        let key = SealingKey::new(&dek, c.recipients.clone()).unwrap();
        let ctx = EncryptionContext::from_pairs(c.context.iter().copied()).unwrap();
        key.seal_with_salt(&c.plaintext, &ctx, &c.ad, Some(&c.salt))
            .unwrap()
    }

    fn to_json(cases: &[Case]) -> String {
        let mut out = String::from("{\n  \"description\": \"phi-envelope v1 known-answer vectors (docs/FORMAT.md). Each message is header || Cobblestone-256 body, sealed with the given DEK and salt.\",\n  \"vectors\": [\n");
        out.push_str(&positives_json(cases, false));
        out.push_str("  ],\n");
        out.push_str(&negatives_json(&negatives(cases)));
        out.push_str("}\n");
        out
    }

    /// The positive vectors, one JSON object each; with `with_ad`, each
    /// has an `associated_data` member after its context.
    fn positives_json(cases: &[Case], with_ad: bool) -> String {
        let mut out = String::new();
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
            let ad = if with_ad {
                format!("\n      \"associated_data\": \"{}\",", ::hex::encode(&c.ad))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "    {{\n      \"name\": {:?},\n      \"dek\": \"{}\",\n      \"salt\": \"{}\",\n      \"context\": [{}],{}\n      \"recipients\": [{}],\n      \"plaintext\": \"{}\",\n      \"message\": \"{}\"\n    }}{}\n",
                c.name,
                ::hex::encode(c.dek),
                ::hex::encode(c.salt),
                ctx.join(", "),
                ad,
                recips.join(", "),
                ::hex::encode(&c.plaintext),
                ::hex::encode(seal_case(c)),
                if i + 1 == cases.len() { "" } else { "," }
            ));
        }
        out
    }

    /// A negative vector: a message (or a context) every decoder must
    /// refuse with `error`. docs/FORMAT.md section 13 gives the schema.
    struct Negative {
        name: String,
        dek: [u8; 32],
        context: Vec<(String, String)>,
        /// The provider ids the decoder holds, for key selection vectors.
        providers: Option<Vec<&'static str>>,
        message: Vec<u8>,
        error: &'static str,
        value: Option<u8>,
        field: Option<&'static str>,
        released: usize,
        /// The associated data presented to decrypt: `None` in the v1 file
        /// (no such member), `Some` in the associated-data file.
        ad: Option<Vec<u8>>,
    }

    /// The negative vectors, derived from the positive ones: one or more
    /// for every error kind of FORMAT.md section 8 that bytes can produce
    /// (all but `MessageTooLong`, which needs a body of 4 PiB), and the
    /// precedence cases of section 7.3.
    fn negatives(cases: &[Case]) -> Vec<Negative> {
        let msgs: Vec<Vec<u8>> = cases.iter().map(seal_case).collect();
        let ctx_of = |c: &Case| -> Vec<(String, String)> {
            c.context
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let hlen = |m: &[u8]| Header::parse(m).unwrap().1;
        let mut out = Vec::new();
        let mut add = |name: &str,
                       base: usize,
                       message: Vec<u8>,
                       error: &'static str,
                       value: Option<u8>,
                       field: Option<&'static str>,
                       released: usize| {
            out.push(Negative {
                name: name.into(),
                dek: cases[base].dek,
                context: ctx_of(&cases[base]),
                providers: None,
                message,
                error,
                value,
                field,
                released,
                ad: None,
            });
        };
        let set = |m: &[u8], at: usize, bytes: &[u8]| {
            let mut m = m.to_vec();
            m[at..at + bytes.len()].copy_from_slice(bytes);
            m
        };
        let flip = |m: &[u8], at: usize| {
            let mut m = m.to_vec();
            m[at] ^= 0x01;
            m
        };
        // The worked example (FORMAT.md section 12): H = 63.
        let e = &msgs[1];
        add(
            "bad magic",
            1,
            set(e, 5, b"W"),
            "NotEnvelope",
            None,
            None,
            0,
        );
        add(
            "foreign input shorter than the magic",
            1,
            b"PHX".to_vec(),
            "NotEnvelope",
            None,
            None,
            0,
        );
        add("empty input", 1, Vec::new(), "Truncated", None, None, 0);
        add(
            "the magic alone",
            1,
            b"PHIENV".to_vec(),
            "Truncated",
            None,
            None,
            0,
        );
        add(
            "unknown version",
            1,
            set(e, 6, &[2]),
            "UnsupportedVersion",
            Some(2),
            None,
            0,
        );
        add(
            "unknown version, 7 bytes",
            1,
            b"PHIENV\x02".to_vec(),
            "UnsupportedVersion",
            Some(2),
            None,
            0,
        );
        add(
            "unknown suite",
            1,
            set(e, 7, &[2]),
            "UnsupportedSuite",
            Some(2),
            None,
            0,
        );
        add(
            "unknown suite, 8 bytes",
            1,
            b"PHIENV\x01\x09".to_vec(),
            "UnsupportedSuite",
            Some(9),
            None,
            0,
        );
        add(
            "version 1 and suite 1, no count",
            1,
            b"PHIENV\x01\x01".to_vec(),
            "Truncated",
            None,
            None,
            0,
        );
        add(
            "count 0",
            1,
            set(e, 8, &[0]),
            "Malformed",
            None,
            Some("count"),
            0,
        );
        add(
            "count 9",
            1,
            set(e, 8, &[9]),
            "Malformed",
            None,
            Some("count"),
            0,
        );
        add(
            "plen 0",
            1,
            set(e, 9, &[0]),
            "Malformed",
            None,
            Some("plen"),
            0,
        );
        add(
            "plen 33",
            1,
            set(e, 9, &[33]),
            "Malformed",
            None,
            Some("plen"),
            0,
        );
        add(
            "provider id with an uppercase letter",
            1,
            set(e, 10, b"L"),
            "Malformed",
            None,
            Some("provider id"),
            0,
        );
        add(
            "rlen 0",
            1,
            set(e, 15, &[0, 0]),
            "Malformed",
            None,
            Some("rlen"),
            0,
        );
        add(
            "rlen 1025",
            1,
            set(e, 15, &[0x04, 0x01]),
            "Malformed",
            None,
            Some("rlen"),
            0,
        );
        add(
            "key reference not UTF-8",
            1,
            set(e, 23, &[0xff]),
            "Malformed",
            None,
            Some("key reference"),
            0,
        );
        add(
            "key reference with a C0 control character",
            1,
            set(e, 23, b"\n"),
            "Malformed",
            None,
            Some("key reference"),
            0,
        );
        add(
            "key reference with a C1 control character (U+0085)",
            1,
            set(e, 22, &[0xc2, 0x85]),
            "Malformed",
            None,
            Some("key reference"),
            0,
        );
        add(
            "wlen 0",
            1,
            set(e, 28, &[0, 0]),
            "Malformed",
            None,
            Some("wlen"),
            0,
        );
        add(
            "wlen 2049",
            1,
            set(e, 28, &[0x08, 0x01]),
            "Malformed",
            None,
            Some("wlen"),
            0,
        );
        add(
            "header cut inside an entry",
            1,
            e[..20].to_vec(),
            "Truncated",
            None,
            None,
            0,
        );
        add(
            "header cut inside its tag",
            1,
            e[..50].to_vec(),
            "Truncated",
            None,
            None,
            0,
        );
        add(
            "header without a body",
            1,
            e[..63].to_vec(),
            "Truncated",
            None,
            None,
            0,
        );
        add(
            "body shorter than its prefix",
            1,
            e[..63 + 40].to_vec(),
            "Truncated",
            None,
            None,
            0,
        );
        add(
            "header tag changed",
            1,
            flip(e, 62),
            "Decrypt",
            None,
            None,
            0,
        );
        add(
            "key version changed",
            1,
            flip(e, 27),
            "Decrypt",
            None,
            None,
            0,
        );
        add(
            "wrapped key changed",
            1,
            flip(e, 30),
            "Decrypt",
            None,
            None,
            0,
        );
        add("salt changed", 1, flip(e, 63), "Decrypt", None, None, 0);
        add(
            "commitment changed",
            1,
            flip(e, 63 + 24),
            "Decrypt",
            None,
            None,
            0,
        );
        add(
            "empty final chunk changed",
            1,
            flip(e, e.len() - 1),
            "Decrypt",
            None,
            None,
            0,
        );
        // The record: one chunk.
        let r = &msgs[0];
        add(
            "record's only chunk changed",
            0,
            flip(r, r.len() - 1),
            "Decrypt",
            None,
            None,
            0,
        );
        // One full chunk and an empty final chunk.
        let f = &msgs[2];
        let f_body = hlen(f) + 56;
        add(
            "final chunk missing",
            2,
            f[..f.len() - 16].to_vec(),
            "Truncated",
            None,
            None,
            16384,
        );
        add(
            "final chunk cut inside its tag",
            2,
            f[..f.len() - 8].to_vec(),
            "Truncated",
            None,
            None,
            16384,
        );
        add(
            "final chunk cut to 1 byte",
            2,
            f[..f.len() - 15].to_vec(),
            "Truncated",
            None,
            None,
            16384,
        );
        add(
            "empty final chunk changed after a full chunk",
            2,
            flip(f, f.len() - 1),
            "TruncatedChunk",
            None,
            None,
            16384,
        );
        add(
            "chunk 0 changed and the final chunk missing",
            2,
            flip(&f[..f.len() - 16], f_body + 7),
            "Decrypt",
            None,
            None,
            0,
        );
        // Two full chunks and a final chunk of 1000 bytes.
        let t = &msgs[3];
        let t_body = hlen(t) + 56;
        let chunk = |i: usize| t_body + i * 16400;
        add(
            "cut inside chunk 0",
            3,
            t[..chunk(0) + 8000].to_vec(),
            "Decrypt",
            None,
            None,
            0,
        );
        add(
            "cut inside chunk 1",
            3,
            t[..chunk(1) + 5000].to_vec(),
            "TruncatedChunk",
            None,
            None,
            16384,
        );
        add(
            "cut at the start of the final chunk",
            3,
            t[..chunk(2)].to_vec(),
            "Truncated",
            None,
            None,
            32768,
        );
        add(
            "cut inside the final chunk",
            3,
            t[..t.len() - 1].to_vec(),
            "TruncatedChunk",
            None,
            None,
            32768,
        );
        add(
            "final chunk changed",
            3,
            flip(t, t.len() - 1),
            "TruncatedChunk",
            None,
            None,
            32768,
        );
        add(
            "one byte appended",
            3,
            [&t[..], &[0]].concat(),
            "TruncatedChunk",
            None,
            None,
            32768,
        );
        add(
            "a full chunk's worth appended",
            3,
            [&t[..], &[0; 16400][..]].concat(),
            "Decrypt",
            None,
            None,
            32768,
        );
        add(
            "chunk 1 changed and the final chunk cut",
            3,
            flip(&t[..t.len() - 1], chunk(1) + 9),
            "Decrypt",
            None,
            None,
            16384,
        );
        let mut swapped = t.clone();
        swapped[chunk(0)..chunk(1)].copy_from_slice(&t[chunk(1)..chunk(2)]);
        swapped[chunk(1)..chunk(2)].copy_from_slice(&t[chunk(0)..chunk(1)]);
        add(
            "chunks 0 and 1 swapped",
            3,
            swapped,
            "Decrypt",
            None,
            None,
            0,
        );
        // The DEK or the context is wrong.
        let wrong = |name: &str,
                     base: usize,
                     dek: [u8; 32],
                     context: Vec<(String, String)>,
                     message: Vec<u8>| Negative {
            name: name.into(),
            dek: if base == usize::MAX {
                dek
            } else {
                cases[base].dek
            },
            context,
            providers: None,
            message,
            error: "Decrypt",
            value: None,
            field: None,
            released: 0,
            ad: None,
        };
        let st_mary = || vec![("tenant".to_string(), "st-mary".to_string())];
        out.push(wrong(
            "wrong DEK",
            usize::MAX,
            [0x34; 32],
            Vec::new(),
            e.clone(),
        ));
        out.push(wrong(
            "wrong DEK and the final chunk missing",
            usize::MAX,
            [0x56; 32],
            ctx_of(&cases[2]),
            f[..f.len() - 16].to_vec(),
        ));
        out.push(wrong("wrong context", 0, [0; 32], st_mary(), r.clone()));
        out.push(wrong(
            "wrong context and the final chunk missing",
            2,
            [0; 32],
            st_mary(),
            f[..f.len() - 16].to_vec(),
        ));
        // Key selection: the decoder holds no provider the header names.
        out.push(Negative {
            name: "no provider for any entry".into(),
            dek: cases[1].dek,
            context: Vec::new(),
            providers: Some(vec!["pkcs11", "aws-kms"]),
            message: e.clone(),
            error: "NoMatchingKey",
            value: None,
            field: None,
            released: 0,
            ad: None,
        });
        // Invalid contexts, refused before any key is used.
        let invalid = |name: &str, context: Vec<(String, String)>| Negative {
            name: name.into(),
            dek: cases[0].dek,
            context,
            providers: None,
            message: r.clone(),
            error: "InvalidContext",
            value: None,
            field: None,
            released: 0,
            ad: None,
        };
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        out.push(invalid(
            "context with a duplicate key",
            vec![kv("tenant", "st-mary"), kv("tenant", "st-mary")],
        ));
        out.push(invalid("context with an empty key", vec![kv("", "x")]));
        out.push(invalid(
            "context key of 257 bytes",
            vec![kv(&"k".repeat(257), "")],
        ));
        out.push(invalid(
            "context value of 4097 bytes",
            vec![kv("k", &"v".repeat(4097))],
        ));
        out.push(invalid(
            "context of 65 pairs",
            (0..65).map(|i| kv(&format!("k{i:02}"), "")).collect(),
        ));
        out.push(invalid(
            "context encoding over 65536 bytes",
            (0..16)
                .map(|i| kv(&format!("k{i:02}"), &"v".repeat(4096)))
                .collect(),
        ));
        out
    }

    fn negatives_json(negs: &[Negative]) -> String {
        let mut out = String::from("  \"negative_vectors\": [\n");
        for (i, n) in negs.iter().enumerate() {
            let ctx: Vec<String> = n
                .context
                .iter()
                .map(|(k, v)| format!("[{k:?}, {v:?}]"))
                .collect();
            let mut fields = vec![
                format!("\"name\": {:?}", n.name),
                format!("\"dek\": \"{}\"", ::hex::encode(n.dek)),
                format!("\"context\": [{}]", ctx.join(", ")),
            ];
            if let Some(ad) = &n.ad {
                fields.push(format!("\"associated_data\": \"{}\"", ::hex::encode(ad)));
            }
            if let Some(p) = &n.providers {
                let ids: Vec<String> = p.iter().map(|id| format!("{id:?}")).collect();
                fields.push(format!("\"providers\": [{}]", ids.join(", ")));
            }
            fields.push(format!("\"message\": \"{}\"", ::hex::encode(&n.message)));
            fields.push(format!("\"error\": {:?}", n.error));
            if let Some(v) = n.value {
                fields.push(format!("\"value\": {v}"));
            }
            if let Some(f) = n.field {
                fields.push(format!("\"field\": {f:?}"));
            }
            fields.push(format!("\"released\": {}", n.released));
            out.push_str(&format!(
                "    {{\n      {}\n    }}{}\n",
                fields.join(",\n      "),
                if i + 1 == negs.len() { "" } else { "," }
            ));
        }
        out.push_str("  ]\n");
        out
    }

    /// The negative vectors give their error here too (the full check,
    /// through every decoder, is `tests/v1_vectors.rs`).
    #[test]
    fn negative_vectors_give_their_error() {
        for n in negatives(&cases())
            .into_iter()
            .chain(ad_negatives(&ad_cases()))
        {
            let ctx = EncryptionContext::from_pairs(n.context.iter().cloned());
            let got = match ctx {
                Err(e) => e,
                Ok(_) if n.providers.is_some() => continue,
                Ok(ctx) => open_with(
                    &n.message,
                    &Dek::from_slice(&n.dek).unwrap(),
                    &ctx,
                    n.ad.as_deref().unwrap_or_default(),
                )
                .unwrap_err(),
            };
            let debug = format!("{got:?}");
            let variant = debug.split(|c: char| !c.is_ascii_alphanumeric()).next();
            assert_eq!(variant, Some(n.error), "{}: {got:?}", n.name);
            assert_eq!(got.malformed_field(), n.field, "{}", n.name);
            let value = match got {
                Error::UnsupportedVersion(v) | Error::UnsupportedSuite(v) => Some(v),
                _ => None,
            };
            assert_eq!(value, n.value, "{}", n.name);
        }
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

    const AD_VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/phi-envelope-v1-ad.json"
    );

    /// Messages bound to associated data (FORMAT.md section 5.4). The first
    /// two are the first two v1 vectors with associated data added: same
    /// header, another body.
    fn ad_cases() -> Vec<Case> {
        let v1 = cases();
        let seq = |n: usize, mul: usize| (0..n).map(|i| (i * mul % 256) as u8).collect::<Vec<u8>>();
        vec![
            Case {
                name: "record bound to its record id",
                ad: b"record_id=000123".to_vec(),
                ..v1.into_iter().next().expect("the record vector")
            },
            Case {
                name: "empty message, empty context, associated data",
                dek: [0x33; 32],
                salt: [0x44; 24],
                context: vec![],
                recipients: vec![entry("local", "local:k", 7, &[0x01])],
                plaintext: vec![],
                ad: b"42".to_vec(),
            },
            Case {
                name: "three chunks, last short, binary associated data",
                dek: [0x77; 32],
                salt: [0x88; 24],
                context: vec![("a", ""), ("b", "x=y;z")],
                recipients: vec![entry("local", "local:backups", 2, &[0xDD; 60])],
                plaintext: seq(2 * 16384 + 1000, 1),
                ad: seq(300, 1),
            },
            Case {
                name: "associated data of 65536 bytes",
                dek: [0x99; 32],
                salt: [0xAB; 24],
                context: vec![("tenant", "st-mary")],
                recipients: vec![entry("local", "local:records", 1, &[0xEE; 60])],
                plaintext: b"x".to_vec(),
                ad: seq(65536, 7),
            },
        ]
    }

    /// What a decoder must refuse when associated data is wrong, missing,
    /// unexpected or too long, through every decoder (`tests/ad_vectors.rs`).
    fn ad_negatives(cases: &[Case]) -> Vec<Negative> {
        let msgs: Vec<Vec<u8>> = cases.iter().map(seal_case).collect();
        let v1 = cases_v1_record();
        let v1_msg = seal_case(&v1);
        let pairs = |c: &Case| -> Vec<(String, String)> {
            c.context
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let neg = |name: &str,
                   c: &Case,
                   context: Vec<(String, String)>,
                   message: &[u8],
                   ad: &[u8],
                   error: &'static str,
                   released: usize| Negative {
            name: name.into(),
            dek: c.dek,
            context,
            providers: None,
            message: message.to_vec(),
            error,
            value: None,
            field: None,
            released,
            ad: Some(ad.to_vec()),
        };
        let (r, rm) = (&cases[0], &msgs[0]);
        let (t, tm) = (&cases[2], &msgs[2]);
        let (big, bm) = (&cases[3], &msgs[3]);
        let mut moved = pairs(r);
        moved.push(("record_id".into(), "000123".into()));
        let mut other_big = big.ad.clone();
        other_big[65535] ^= 1;
        let mut too_long = big.ad.clone();
        too_long.push(0);
        vec![
            neg(
                "another record's associated data",
                r,
                pairs(r),
                rm,
                b"record_id=000124",
                "Decrypt",
                0,
            ),
            neg(
                "associated data missing",
                r,
                pairs(r),
                rm,
                b"",
                "Decrypt",
                0,
            ),
            neg(
                "associated data one byte short",
                r,
                pairs(r),
                rm,
                b"record_id=00012",
                "Decrypt",
                0,
            ),
            neg(
                "associated data for a message sealed without",
                &v1,
                pairs(&v1),
                &v1_msg,
                b"record_id=000123",
                "Decrypt",
                0,
            ),
            neg(
                "associated data moved into the context",
                r,
                moved,
                rm,
                b"",
                "Decrypt",
                0,
            ),
            neg(
                "context pairs given as associated data",
                &v1,
                Vec::new(),
                &v1_msg,
                &EncryptionContext::from_pairs(v1.context.iter().copied())
                    .unwrap()
                    .canonical_pairs(),
                "Decrypt",
                0,
            ),
            neg(
                "wrong context, right associated data",
                r,
                vec![("tenant".into(), "st-mary".into())],
                rm,
                &r.ad,
                "Decrypt",
                0,
            ),
            neg(
                "three chunks, wrong associated data",
                t,
                pairs(t),
                tm,
                &t.ad[..299],
                "Decrypt",
                0,
            ),
            neg(
                "three chunks, associated data right, final chunk cut",
                t,
                pairs(t),
                &tm[..tm.len() - 1],
                &t.ad,
                "TruncatedChunk",
                32768,
            ),
            neg(
                "last byte of 65536 bytes of associated data changed",
                big,
                pairs(big),
                bm,
                &other_big,
                "Decrypt",
                0,
            ),
            neg(
                "associated data of 65537 bytes",
                big,
                pairs(big),
                bm,
                &too_long,
                "InvalidAssociatedData",
                0,
            ),
        ]
    }

    /// The first v1 vector (a record without associated data).
    fn cases_v1_record() -> Case {
        cases().into_iter().next().expect("the record vector")
    }

    fn ad_json(cases: &[Case]) -> String {
        let mut out = String::from("{\n  \"description\": \"phi-envelope v1 known-answer vectors with associated data (docs/FORMAT.md sections 5.4 and 13.2). Each message is header || Cobblestone-256 body, sealed with the given DEK, salt, encryption context and associated data.\",\n  \"vectors\": [\n");
        out.push_str(&positives_json(cases, true));
        out.push_str("  ],\n");
        out.push_str(&negatives_json(&ad_negatives(cases)));
        out.push_str("}\n");
        out
    }

    /// Byte-for-byte check of the committed associated-data vectors
    /// (`PHI_ENVELOPE_REGENERATE_VECTORS=1` rewrites the file).
    #[test]
    fn known_answer_vectors_with_associated_data() {
        let want = ad_json(&ad_cases());
        if std::env::var_os("PHI_ENVELOPE_REGENERATE_VECTORS").is_some() {
            std::fs::write(AD_VECTORS, &want).unwrap();
        }
        let have =
            std::fs::read_to_string(AD_VECTORS).expect("tests/vectors/phi-envelope-v1-ad.json");
        assert!(
            have == want,
            "output differs from the committed associated-data vectors"
        );
    }

    /// Associated data changes the body only: the header is the one the
    /// same DEK and recipients give without it, and the body differs.
    #[test]
    fn associated_data_changes_only_the_body() {
        let (with, without) = (&ad_cases()[0], &cases()[0]);
        let (a, b) = (seal_case(with), seal_case(without));
        let used = Header::parse(&a).unwrap().1;
        assert_eq!(a[..used], b[..used]);
        assert_eq!(a.len(), b.len());
        assert_ne!(a[used + SALT_LEN..], b[used + SALT_LEN..]);
    }

    /// Empty associated data is no associated data, byte for byte.
    #[test]
    fn empty_associated_data_is_none() {
        let c = &cases()[0];
        let dek = Dek::from_slice(&c.dek).unwrap();
        let key = SealingKey::new(&dek, c.recipients.clone()).unwrap();
        let ctx = EncryptionContext::from_pairs(c.context.iter().copied()).unwrap();
        assert_eq!(
            key.seal_with_salt(&c.plaintext, &ctx, b"", Some(&c.salt))
                .unwrap(),
            key.seal_with_salt(&c.plaintext, &ctx, &[], Some(&c.salt))
                .unwrap()
        );
        assert_eq!(
            seal_case(c),
            key.seal_with_salt(&c.plaintext, &ctx, b"", Some(&c.salt))
                .unwrap()
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
