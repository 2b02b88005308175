//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;

/// One Cobblestone-256 vector from Wycheproof.
pub struct CobblestoneVector {
    pub id: u64,
    pub comment: String,
    pub key: Vec<u8>,
    pub ctx: Vec<u8>,
    pub ct: Vec<u8>,
    pub valid: bool,
    pub flags: Vec<String>,
    pub msg_len: Option<u64>,
    pub msg_sha512: Option<Vec<u8>>,
}

impl CobblestoneVector {
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

pub fn vector_file(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn cobblestone_vectors() -> Vec<CobblestoneVector> {
    let doc = vector_file("wycheproof/c2sp_chunked_encryption_aes_256_gcm_test.json");
    let hex = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
    let mut out = Vec::new();
    for g in doc["testGroups"].as_array().unwrap() {
        assert_eq!(g["aead"], "AEAD_AES_256_GCM");
        assert_eq!(g["sha"], "SHA-512");
        for t in g["tests"].as_array().unwrap() {
            let mut ct = Vec::new();
            flate2::read::ZlibDecoder::new(&hex(&t["ct"])[..])
                .read_to_end(&mut ct)
                .unwrap();
            out.push(CobblestoneVector {
                id: t["tcId"].as_u64().unwrap(),
                comment: t["comment"].as_str().unwrap().to_owned(),
                key: hex(&t["key"]),
                ctx: hex(&t["ctx"]),
                ct,
                valid: t["result"] == "valid",
                flags: t["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
                msg_len: t["msgLength"].as_u64(),
                msg_sha512: t.get("msgSha512").map(hex),
            });
        }
    }
    assert_eq!(out.len(), 35);
    out
}

pub fn sha512(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha512::digest(data).to_vec()
}

/// Deterministic pseudo-random bytes for test plaintexts.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Whole-message helpers (format_*, oracle, v1_vectors).
// ---------------------------------------------------------------------------

use phi_envelope::{
    message::{OpeningKey, SealingKey},
    Dek, EncryptionContext, Error, Header, WrappedKey,
};

/// A wrapped-key entry with the given fields.
pub fn entry(provider: &str, key_ref: &str, version: u32, wrapped: &[u8]) -> WrappedKey {
    WrappedKey {
        provider: provider.into(),
        key_ref: key_ref.into(),
        key_version: version,
        wrapped: wrapped.to_vec(),
    }
}

/// One vector of `tests/vectors/phi-envelope-v1.json` (or of
/// `phi-envelope-v1-ad.json`, which adds the associated data).
pub struct V1Vector {
    pub name: String,
    pub dek: Vec<u8>,
    pub salt: Vec<u8>,
    pub context: Vec<(String, String)>,
    /// Empty in `phi-envelope-v1.json`, which has no such member.
    pub associated_data: Vec<u8>,
    pub recipients: Vec<WrappedKey>,
    pub plaintext: Vec<u8>,
    pub message: Vec<u8>,
}

impl V1Vector {
    pub fn dek(&self) -> Dek {
        Dek::from_slice(&self.dek).unwrap()
    }

    pub fn context(&self) -> EncryptionContext {
        EncryptionContext::from_pairs(self.context.iter().cloned()).unwrap()
    }
}

pub fn v1_vectors() -> Vec<V1Vector> {
    let doc = vector_file("phi-envelope-v1.json");
    assert!(
        doc["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.get("associated_data").is_none()),
        "phi-envelope-v1.json has no associated data"
    );
    let out = positive_vectors(&doc);
    assert_eq!(out.len(), 4, "phi-envelope-v1.json holds four vectors");
    out
}

/// The positive vectors of `tests/vectors/phi-envelope-v1-ad.json`, each
/// with its associated data (docs/FORMAT.md section 13.2).
pub fn ad_vectors() -> Vec<V1Vector> {
    let doc = vector_file("phi-envelope-v1-ad.json");
    assert!(
        doc["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.get("associated_data").is_some()),
        "every vector of phi-envelope-v1-ad.json has its associated data"
    );
    let out = positive_vectors(&doc);
    assert_eq!(out.len(), 4, "phi-envelope-v1-ad.json holds four vectors");
    assert!(out.iter().all(|v| !v.associated_data.is_empty()));
    out
}

fn positive_vectors(doc: &serde_json::Value) -> Vec<V1Vector> {
    let hex = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
    let s = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
    doc["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| V1Vector {
            name: s(&v["name"]),
            dek: hex(&v["dek"]),
            salt: hex(&v["salt"]),
            context: v["context"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (s(&p[0]), s(&p[1])))
                .collect(),
            associated_data: v.get("associated_data").map(hex).unwrap_or_default(),
            recipients: v["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| WrappedKey {
                    provider: s(&r["provider"]),
                    key_ref: s(&r["key_ref"]),
                    key_version: u32::try_from(r["key_version"].as_u64().unwrap()).unwrap(),
                    wrapped: hex(&r["wrapped"]),
                })
                .collect(),
            plaintext: hex(&v["plaintext"]),
            message: hex(&v["message"]),
        })
        .collect()
}

/// A fresh DEK and a sealing key for it with `recipients`.
pub fn sealing_key(recipients: Vec<WrappedKey>) -> (Dek, SealingKey) {
    let dek = Dek::generate().unwrap();
    let key = SealingKey::new(&dek, recipients).unwrap();
    (dek, key)
}

/// A typical one-recipient list.
pub fn one_recipient() -> Vec<WrappedKey> {
    vec![entry("local", "local:records", 1, &[0xA5; 40])]
}

/// A typical two-recipient list (HSM + KMS for disaster recovery).
pub fn two_recipients() -> Vec<WrappedKey> {
    vec![
        entry("pkcs11", "pkcs11:token=phi;object=kek", 3, &[0xB6; 40]),
        entry("aws-kms", "aws-kms:alias/phi-dr", 0x0102_0304, &[0xC7; 56]),
    ]
}

/// A typical non-empty context.
pub fn test_context() -> EncryptionContext {
    EncryptionContext::from_pairs([("tenant", "st-mary"), ("record_type", "lab-result")]).unwrap()
}

/// Reads `r` to its end (or first error) with reads of `buf_len` bytes,
/// returning the bytes released and the first error. After an error it
/// checks that three more reads fail too: a failed reader stays failed.
pub fn drain_with<R: Read>(mut r: R, buf_len: usize) -> (Vec<u8>, Option<Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; buf_len];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                for _ in 0..3 {
                    assert!(
                        r.read(&mut buf).is_err(),
                        "a failed reader must keep failing"
                    );
                }
                return (out, Some(Error::from(e)));
            }
        }
    }
}

/// What the streaming decoder did with a whole message: the plaintext bytes
/// it released before the outcome, and the outcome.
pub struct Streamed {
    pub released: Vec<u8>,
    pub result: Result<(), Error>,
}

/// Opens `message` through the streaming path: `Header::read_from` on a
/// reader, `OpeningKey::new`, then the body `Decryptor` read with `buf_len`.
pub fn open_streaming(
    message: &[u8],
    dek: &Dek,
    ctx: &EncryptionContext,
    buf_len: usize,
) -> Streamed {
    let mut reader = message;
    let setup = Header::read_from(&mut reader)
        .and_then(|h| OpeningKey::new(dek, &h))
        .and_then(|k| k.decryptor(reader, ctx));
    match setup {
        Err(e) => Streamed {
            released: Vec::new(),
            result: Err(e),
        },
        Ok(dec) => {
            let (released, err) = drain_with(dec, buf_len);
            Streamed {
                released,
                result: err.map_or(Ok(()), Err),
            }
        }
    }
}

/// Opens `message` through the seeking path (`Header::parse`, then a
/// `SeekableDecryptor` over a cursor positioned after the header) and reads
/// the whole plaintext from the start.
pub fn open_seeking(message: &[u8], dek: &Dek, ctx: &EncryptionContext) -> Result<Vec<u8>, Error> {
    use std::io::Cursor;
    let (header, used) = Header::parse(message)?;
    let key = OpeningKey::new(dek, &header)?;
    let mut cur = Cursor::new(message);
    cur.set_position(used as u64);
    let dec = key.seekable_decryptor(cur, ctx)?;
    match drain_with(dec, 5000) {
        (out, None) => Ok(out),
        (_, Some(e)) => Err(e),
    }
}

/// The three decoders on one message: one-shot, streaming, seeking.
pub fn open_all(message: &[u8], dek: &Dek, ctx: &EncryptionContext) -> [Result<Vec<u8>, Error>; 3] {
    let s = open_streaming(message, dek, ctx, 4096);
    [
        phi_envelope::message::open(message, dek, ctx),
        s.result.map(|()| s.released),
        open_seeking(message, dek, ctx),
    ]
}

/// Which part of a v1 header a byte belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderField {
    Magic,
    Version,
    Suite,
    Count,
    ProviderLen,
    Provider,
    KeyRefLen,
    KeyRef,
    KeyVersion,
    WrappedLen,
    Wrapped,
    Tag,
}

/// The field of every byte of the header that encodes `recipients`, in
/// order, computed from the layout in docs/FORMAT.md.
pub fn header_layout(recipients: &[WrappedKey]) -> Vec<HeaderField> {
    use HeaderField::*;
    let mut out = Vec::new();
    let mut push = |f: HeaderField, n: usize| out.extend(std::iter::repeat_n(f, n));
    push(Magic, 6);
    push(Version, 1);
    push(Suite, 1);
    push(Count, 1);
    for r in recipients {
        push(ProviderLen, 1);
        push(Provider, r.provider.len());
        push(KeyRefLen, 2);
        push(KeyRef, r.key_ref.len());
        push(KeyVersion, 4);
        push(WrappedLen, 2);
        push(Wrapped, r.wrapped.len());
    }
    push(Tag, 32);
    out
}

/// Writes `data` to `w` in slices whose sizes cycle through `sizes` (odd
/// sizes exercise an encryptor's buffering across chunk boundaries).
pub fn write_in_slices<W: std::io::Write>(w: &mut W, data: &[u8], sizes: &[usize]) {
    let mut rest = data;
    for &s in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = s.clamp(1, rest.len());
        w.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
}

/// A decoder outcome for assertion messages, without the plaintext.
pub fn describe(r: &Result<Vec<u8>, Error>) -> String {
    match r {
        Ok(v) => format!("Ok({} bytes)", v.len()),
        Err(e) => format!("{e:?}"),
    }
}
