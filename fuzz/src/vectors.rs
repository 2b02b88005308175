//! The committed known-answer messages, compiled in.

use std::io::Read;
use std::sync::OnceLock;

use phi_envelope::format::{body_context, Suite};
use phi_envelope::EncryptionContext;

use crate::reference::Reference;

const V1_JSON: &str = include_str!("../../tests/vectors/phi-envelope-v1.json");
const WYCHEPROOF_JSON: &str =
    include_str!("../../tests/vectors/wycheproof/c2sp_chunked_encryption_aes_256_gcm_test.json");

/// One v1 known-answer message.
pub struct V1 {
    pub dek: [u8; 32],
    pub context: EncryptionContext,
    /// The Cobblestone context of its body: `body_context(suite, context)`.
    pub body_context: Vec<u8>,
    pub plaintext: Vec<u8>,
    pub message: Vec<u8>,
    /// Length of the header at the front of `message`.
    pub header_len: usize,
}

/// One Wycheproof Cobblestone-256 body with a 32-byte key.
pub struct Body {
    pub id: u64,
    pub key: [u8; 32],
    pub context: Vec<u8>,
    pub body: Vec<u8>,
    /// The plaintext, for valid vectors (from the reference decoder,
    /// checked against the vector's SHA-512 by the library's own tests).
    pub plaintext: Option<Vec<u8>>,
}

fn unhex(v: &serde_json::Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

/// The v1 vectors of tests/vectors/phi-envelope-v1.json.
pub fn v1() -> &'static [V1] {
    static V: OnceLock<Vec<V1>> = OnceLock::new();
    V.get_or_init(|| {
        let doc: serde_json::Value = serde_json::from_str(V1_JSON).expect("v1 json");
        doc["vectors"]
            .as_array()
            .expect("vectors")
            .iter()
            .map(|v| {
                let pairs = v["context"].as_array().expect("context").iter().map(|p| {
                    (
                        p[0].as_str().expect("key").to_owned(),
                        p[1].as_str().expect("value").to_owned(),
                    )
                });
                let context = EncryptionContext::from_pairs(pairs).expect("context");
                let message = unhex(&v["message"]);
                let (header, header_len) =
                    phi_envelope::Header::parse(&message).expect("vector header");
                assert_eq!(header.suite(), Suite::Aes256GcmHkdfSha512);
                V1 {
                    dek: unhex(&v["dek"]).try_into().expect("32-byte dek"),
                    body_context: body_context(header.suite(), &context),
                    context,
                    plaintext: unhex(&v["plaintext"]),
                    message,
                    header_len,
                }
            })
            .collect()
    })
}

/// The Wycheproof Cobblestone-256 vectors with a 32-byte key and a body of
/// at most `max_len` bytes (the two counter-rollover vectors are 4 MiB).
pub fn wycheproof(max_len: usize) -> Vec<&'static Body> {
    static V: OnceLock<Vec<Body>> = OnceLock::new();
    let all = V.get_or_init(|| {
        let doc: serde_json::Value = serde_json::from_str(WYCHEPROOF_JSON).expect("json");
        let mut out = Vec::new();
        for g in doc["testGroups"].as_array().expect("groups") {
            for t in g["tests"].as_array().expect("tests") {
                let Ok(key) = <[u8; 32]>::try_from(unhex(&t["key"])) else {
                    continue;
                };
                let mut body = Vec::new();
                flate2::read::ZlibDecoder::new(&unhex(&t["ct"])[..])
                    .read_to_end(&mut body)
                    .expect("zlib");
                let context = unhex(&t["ctx"]);
                let plaintext = if t["result"] == "valid" {
                    let p = Reference::new(&key, &context, &body).plaintext();
                    assert!(p.is_some(), "reference decoder rejects a valid vector");
                    p
                } else {
                    None
                };
                out.push(Body {
                    id: t["tcId"].as_u64().expect("tcId"),
                    key,
                    context,
                    body,
                    plaintext,
                });
            }
        }
        out
    });
    all.iter().filter(|b| b.body.len() <= max_len).collect()
}

/// A key and Cobblestone context that fuzzed bodies are decrypted under.
pub struct Keying {
    pub key: [u8; 32],
    pub context: Vec<u8>,
    /// For v1 keyings: the index into [`v1`], whose whole messages (header
    /// and body) the target may decode through `OpeningKey`.
    pub v1: Option<usize>,
}

/// Every distinct keying of the vectors: the v1 DEKs with their body
/// contexts, and the Wycheproof key with its three contexts.
pub fn keyings() -> &'static [Keying] {
    static K: OnceLock<Vec<Keying>> = OnceLock::new();
    K.get_or_init(|| {
        let mut out: Vec<Keying> = v1()
            .iter()
            .enumerate()
            .map(|(i, v)| Keying {
                key: v.dek,
                context: v.body_context.clone(),
                v1: Some(i),
            })
            .collect();
        for b in wycheproof(usize::MAX) {
            if !out.iter().any(|k| k.key == b.key && k.context == b.context) {
                out.push(Keying {
                    key: b.key,
                    context: b.context.clone(),
                    v1: None,
                });
            }
        }
        out
    })
}
