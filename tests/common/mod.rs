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
