//! The keystore file format: parse with every bound, seal, open. No I/O.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::hex;
use super::table::Table;
use crate::primitives::{fill_random, Aes256Gcm};

/// The `format` value of every keystore file.
pub const FORMAT: &str = "phi-envelope-keystore";
/// The format version this build writes: 2, whose key table carries a
/// generation number (docs/KEYSTORE.md). Version 1 is still read.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_READ_VERSION: u32 = 1;
/// Largest keystore file accepted, in bytes.
pub const MAX_FILE_LEN: u64 = 16 << 20;

pub(super) const ALG_ARGON2ID: &str = "argon2id";
pub(super) const ALG_UNPROTECTED: &str = "none-unprotected-insecure";

/// The fixed, public "key" of unprotected keystores. It keeps the GCM tag a
/// checksum against accidental corruption; anyone can recompute it, so it
/// gives neither secrecy nor authenticity.
const UNPROTECTED_PUBLIC_KEY: &[u8; 32] = b"phi-envelope-UNPROTECTED-PUBLIC!";

/// Argon2id parameters of a keystore (stored in its cleartext header):
/// memory, passes and lanes. Argon2id version 0x13, 16-byte salt, 32-byte
/// output, no secret key, no associated data (docs/KEYSTORE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Argon2idParams {
    /// Memory in KiB (`m`), 8192 ..= 1048576.
    pub m_kib: u32,
    /// Passes (`t`), 1 ..= 10.
    pub t: u32,
    /// Lanes (`p`), 1 ..= 16.
    pub p: u32,
}

pub(super) type Argon2Params = Argon2idParams;

impl Argon2idParams {
    /// RFC 9106 section 4, the second recommended option (for when 2 GiB of
    /// memory is too much): 64 MiB, 3 passes, 4 lanes. The default of new
    /// keystores.
    pub const RFC_9106_SECOND: Argon2idParams = Argon2idParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 4,
    };

    /// Checked parameters: the bounds every keystore file is held to
    /// (m 8 MiB ..= 1 GiB, t 1 ..= 10, p 1 ..= 16, m × t ≤ 4 GiB).
    pub fn new(m_kib: u32, t: u32, p: u32) -> crate::Result<Argon2idParams> {
        let params = Argon2idParams { m_kib, t, p };
        params.check().map_err(|_| {
            crate::Error::InvalidArgument(format!(
                "Argon2id parameters m_kib={m_kib}, t={t}, p={p} are outside the accepted range \
                 (m_kib 8192..=1048576, t 1..=10, p 1..=16, m_kib*t <= 4194304)"
            ))
        })?;
        Ok(params)
    }

    /// The bounds checked before a file's parameters are used, so that a
    /// hostile file cannot make us allocate or compute without limit.
    pub(super) fn check(self) -> Result<(), String> {
        const MIN_M_KIB: u32 = 8 * 1024;
        const MAX_M_KIB: u32 = 1024 * 1024;
        let ok = (MIN_M_KIB..=MAX_M_KIB).contains(&self.m_kib)
            && (1..=10).contains(&self.t)
            && (1..=16).contains(&self.p)
            && u64::from(self.m_kib) * u64::from(self.t) <= 4 * 1024 * 1024;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the Argon2id parameters in the file (m_kib={}, t={}, p={}) are outside the accepted range \
                 (m_kib 8192..=1048576, t 1..=10, p 1..=16, m_kib*t <= 4194304); refusing to run the KDF \
                 (the file was modified or is not from phi-envelope)",
                self.m_kib, self.t, self.p
            ))
        }
    }
}

/// How the key table is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kdf {
    /// Sealed under Argon2id(passphrase, salt).
    Argon2id {
        params: Argon2Params,
        salt: [u8; 16],
    },
    /// In clear, integrity-checked under a public key (tests only).
    Unprotected,
}

/// Runs Argon2id.
pub(super) fn derive(
    passphrase: &SecretString,
    params: Argon2Params,
    salt: &[u8; 16],
) -> Result<Zeroizing<[u8; 32]>, String> {
    params.check()?;
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
    let block_count = p.block_count();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut key = Zeroizing::new([0u8; 32]);
    // Our own memory, so that the passphrase-dependent blocks are wiped
    // afterwards (`hash_password_into` drops them as they are).
    let mut blocks = Zeroizing::new(vec![argon2::Block::default(); block_count]);
    argon
        .hash_password_into_with_memory(
            passphrase.expose_secret().as_bytes(),
            salt,
            &mut key[..],
            &mut blocks[..],
        )
        .map_err(|e| format!("the key derivation failed: {e}"))?;
    Ok(key)
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct KdfJson {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m_kib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    salt: Option<String>,
}

impl KdfJson {
    fn of(kdf: &Kdf) -> KdfJson {
        match kdf {
            Kdf::Argon2id { params, salt } => KdfJson {
                alg: ALG_ARGON2ID.into(),
                m_kib: Some(params.m_kib),
                t: Some(params.t),
                p: Some(params.p),
                salt: Some(hex::encode(salt)),
            },
            Kdf::Unprotected => KdfJson {
                alg: ALG_UNPROTECTED.into(),
                m_kib: None,
                t: None,
                p: None,
                salt: None,
            },
        }
    }
}

/// The cleartext header: the AAD of the sealed table (and, for an
/// unprotected file, the start of the AAD of its checksum tag).
#[derive(Serialize)]
struct HeaderJson<'a> {
    format: &'a str,
    version: u32,
    kdf: &'a KdfJson,
}

/// The table of an unprotected keystore, as a JSON string, zeroized on drop.
struct ClearTable(Zeroizing<String>);

impl Serialize for ClearTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClearTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| ClearTable(Zeroizing::new(s)))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    format: String,
    version: u32,
    kdf: KdfJson,
    nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<ClearTable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

/// Only the fields that identify a keystore, read first so that a foreign
/// or future file gets the right error.
#[derive(Deserialize)]
struct Probe {
    format: serde_json::Value,
    version: Option<serde_json::Value>,
}

/// A parsed, structurally valid keystore file, not yet authenticated.
pub(super) struct Parsed {
    pub kdf: Kdf,
    /// The file's format version (1 or 2).
    pub version: u32,
    header_aad: Vec<u8>,
    nonce: [u8; 12],
    payload: Payload,
}

enum Payload {
    /// `ciphertext || tag` of the table.
    Sealed(Vec<u8>),
    /// The table in clear and the GCM tag over `header || table`.
    Clear(ClearTable, [u8; 16]),
}

/// Why a file could not be read as a keystore: the reason of the
/// `Error::Keystore`.
#[derive(Debug)]
pub(super) struct ParseError(pub String);

fn invalid(reason: impl Into<String>) -> ParseError {
    ParseError(reason.into())
}

const OUR_PREFIX: &[u8] = b"{\"format\":\"phi-envelope-keystore\",";

fn header_aad(version: u32, kdf: &KdfJson) -> Vec<u8> {
    serde_json::to_vec(&HeaderJson {
        format: FORMAT,
        version,
        kdf,
    })
    .expect("serializing the header cannot fail")
}

fn to_file_bytes(file: &FileJson) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(
        256 + file.ciphertext.as_ref().map_or(0, String::len)
            + file.table.as_ref().map_or(0, |t| 2 * t.0.len()),
    ));
    serde_json::to_writer(&mut *out, file).expect("serializing the keystore cannot fail");
    out.push(b'\n');
    out
}

/// Parses a keystore file. Checks, in order: not empty; JSON whose `format`
/// is ours (else "not a keystore", or "truncated" when our file stops
/// early); a known version; every field present, typed, and bounded; the
/// exact bytes phi-envelope writes (so that any modified byte is caught
/// here or by the tag); the KDF parameters within bounds.
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    if bytes.is_empty() {
        return Err(invalid(
            "the file is empty, not a phi-envelope keystore (an interrupted copy?); restore it from a backup",
        ));
    }
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(invalid(
            "the file is larger than 16 MiB: not a phi-envelope keystore",
        ));
    }
    // Our prefix, or a file cut short inside it.
    let ours = bytes.starts_with(OUR_PREFIX) || OUR_PREFIX.starts_with(bytes);
    let probe: Probe = match serde_json::from_slice(bytes) {
        Ok(p) => p,
        Err(e) if ours && e.is_eof() => {
            return Err(invalid(
                "the keystore file is truncated (an interrupted write or copy); restore it from a backup",
            ))
        }
        Err(e) if ours => {
            return Err(invalid(format!(
                "the keystore file is corrupted (invalid JSON at line {}, column {}); restore it from a backup",
                e.line(),
                e.column()
            )))
        }
        Err(_) => {
            return Err(invalid(
                "not a phi-envelope keystore (expected a JSON document with \"format\": \"phi-envelope-keystore\")",
            ))
        }
    };
    if probe.format != FORMAT {
        return Err(invalid(
            "not a phi-envelope keystore (expected a JSON document with \"format\": \"phi-envelope-keystore\")",
        ));
    }
    match probe.version.as_ref().and_then(serde_json::Value::as_u64) {
        Some(v) if (u64::from(OLDEST_READ_VERSION)..=u64::from(FORMAT_VERSION)).contains(&v) => {}
        Some(v) => {
            return Err(invalid(format!(
                "unsupported keystore format version {v} (this build reads versions {OLDEST_READ_VERSION} \
                 to {FORMAT_VERSION}); a newer phi-envelope may read it"
            )))
        }
        None => return Err(invalid("the keystore file is malformed: no valid \"version\"")),
    }
    let file: FileJson = serde_json::from_slice(bytes).map_err(|e| {
        invalid(format!(
            "the keystore file is malformed (line {}, column {}); restore it from a backup",
            e.line(),
            e.column()
        ))
    })?;
    if to_file_bytes(&file).as_slice() != bytes {
        return Err(invalid(
            "the keystore file was modified: it is not byte for byte in the form phi-envelope writes \
             (edited or reformatted by hand?); restore it from a backup",
        ));
    }
    let malformed = |what: &str| invalid(format!("the keystore file is malformed: {what}"));
    let kdf = match (file.kdf.alg.as_str(), &file.kdf) {
        (
            ALG_ARGON2ID,
            KdfJson {
                m_kib: Some(m_kib),
                t: Some(t),
                p: Some(p),
                salt: Some(salt),
                ..
            },
        ) => {
            let mut s = [0u8; 16];
            if !hex::decode_into(salt.as_bytes(), &mut s) {
                return Err(malformed("the salt is not 16 bytes of lowercase hex"));
            }
            let params = Argon2Params {
                m_kib: *m_kib,
                t: *t,
                p: *p,
            };
            params.check().map_err(invalid)?;
            Kdf::Argon2id { params, salt: s }
        }
        (ALG_UNPROTECTED, KdfJson { m_kib: None, t: None, p: None, salt: None, .. }) => Kdf::Unprotected,
        (ALG_ARGON2ID | ALG_UNPROTECTED, _) => return Err(malformed("wrong KDF parameters")),
        _ => {
            return Err(invalid(
                "the keystore uses an unknown key-derivation algorithm; a newer phi-envelope may read it",
            ))
        }
    };
    let mut nonce = [0u8; 12];
    if !hex::decode_into(file.nonce.as_bytes(), &mut nonce) {
        return Err(malformed("the nonce is not 12 bytes of lowercase hex"));
    }
    let payload = match (kdf, file.ciphertext, file.table, file.tag) {
        (Kdf::Argon2id { .. }, Some(ct), None, None) => {
            let ct =
                hex::decode(&ct).ok_or_else(|| malformed("the ciphertext is not lowercase hex"))?;
            if ct.len() < 16 {
                return Err(malformed("the ciphertext is shorter than a GCM tag"));
            }
            Payload::Sealed(ct)
        }
        (Kdf::Unprotected, None, Some(table), Some(tag)) => {
            let mut t = [0u8; 16];
            if !hex::decode_into(tag.as_bytes(), &mut t) {
                return Err(malformed("the tag is not 16 bytes of lowercase hex"));
            }
            Payload::Clear(table, t)
        }
        _ => return Err(malformed("the fields do not match the KDF")),
    };
    Ok(Parsed {
        kdf,
        version: file.version,
        header_aad: header_aad(file.version, &file.kdf),
        nonce,
        payload,
    })
}

impl Parsed {
    /// The header bytes that are the AAD of the table (test vectors).
    #[cfg(test)]
    pub fn header_aad_for_tests(&self) -> &[u8] {
        &self.header_aad
    }

    /// Authenticates and decrypts the table. `key` is the derived key of a
    /// protected file (ignored for an unprotected one). The error is one
    /// message for every authentication failure.
    pub fn open(self, key: Option<&[u8; 32]>) -> Result<Table, ParseError> {
        let plaintext: Zeroizing<Vec<u8>> = match self.payload {
            Payload::Sealed(ct) => {
                let key = key.expect("a protected keystore is opened with its key");
                let mut buf = Zeroizing::new(ct);
                let gcm = Aes256Gcm::new(key).expect("32-byte key");
                let len = gcm
                    .open_in_place(self.nonce, &self.header_aad, &mut buf)
                    .map_err(|_| invalid("wrong passphrase or the keystore file was modified"))?;
                buf.truncate(len);
                buf
            }
            Payload::Clear(table, mut tag) => {
                let gcm = Aes256Gcm::new(UNPROTECTED_PUBLIC_KEY).expect("32-byte key");
                let mut aad = Zeroizing::new(self.header_aad);
                aad.extend_from_slice(table.0.as_bytes());
                gcm.open_in_place(self.nonce, &aad, &mut tag).map_err(|_| {
                    invalid(
                        "the keystore file was modified or corrupted (its integrity check failed)",
                    )
                })?;
                Zeroizing::new(table.0.as_bytes().to_vec())
            }
        };
        Table::from_json(&plaintext, self.version).map_err(|why| {
            invalid(format!(
                "the key table is inconsistent ({why}); restore the keystore from a backup"
            ))
        })
    }
}

/// The file bytes (format version [`FORMAT_VERSION`]) of `table`, sealed
/// under `key` (protected) or in clear with a checksum tag (unprotected),
/// under a fresh random nonce.
pub(super) fn seal(
    kdf: &Kdf,
    key: Option<&[u8; 32]>,
    table: &Table,
) -> crate::Result<Zeroizing<Vec<u8>>> {
    seal_version(FORMAT_VERSION, kdf, key, table)
}

/// [`seal`] as a file of format `version` (1 only to make test vectors).
pub(super) fn seal_version(
    version: u32,
    kdf: &Kdf,
    key: Option<&[u8; 32]>,
    table: &Table,
) -> crate::Result<Zeroizing<Vec<u8>>> {
    let kdf_json = KdfJson::of(kdf);
    let aad = header_aad(version, &kdf_json);
    let mut nonce = [0u8; 12];
    fill_random(&mut nonce)?;
    let json = table.to_json_for(version);
    let (ciphertext, clear, tag) = match kdf {
        Kdf::Argon2id { .. } => {
            let key = key.expect("a protected keystore is sealed with its key");
            let mut buf = Zeroizing::new(Vec::with_capacity(json.len() + 16));
            buf.extend_from_slice(&json);
            let tag = Aes256Gcm::new(key)?.seal_in_place(nonce, &aad, &mut buf);
            buf.extend_from_slice(&tag);
            (Some(hex::encode(&buf)), None, None)
        }
        Kdf::Unprotected => {
            let text = Zeroizing::new(String::from_utf8(json.to_vec()).expect("JSON is UTF-8"));
            let mut full = Zeroizing::new(aad);
            full.extend_from_slice(text.as_bytes());
            let tag = Aes256Gcm::new(UNPROTECTED_PUBLIC_KEY)?.seal_in_place(nonce, &full, &mut []);
            (None, Some(ClearTable(text)), Some(hex::encode(&tag)))
        }
    };
    let file = FileJson {
        format: FORMAT.into(),
        version,
        kdf: kdf_json,
        nonce: hex::encode(&nonce),
        ciphertext,
        table: clear,
        tag,
    };
    let out = to_file_bytes(&file);
    if out.len() as u64 > MAX_FILE_LEN {
        return Err(crate::provider::ProviderError::new(
            super::PROVIDER_ID,
            crate::provider::ProviderErrorKind::LimitReached,
            "the keystore would exceed 16 MiB; destroyed versions and keys cannot be removed, use another keystore file",
        )
        .into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_bounds() {
        assert!(Argon2Params::RFC_9106_SECOND.check().is_ok());
        for bad in [
            Argon2Params {
                m_kib: 1024,
                t: 3,
                p: 1,
            },
            Argon2Params {
                m_kib: u32::MAX,
                t: 3,
                p: 1,
            },
            Argon2Params {
                m_kib: 65536,
                t: 0,
                p: 1,
            },
            Argon2Params {
                m_kib: 65536,
                t: 1000,
                p: 1,
            },
            Argon2Params {
                m_kib: 65536,
                t: 3,
                p: 0,
            },
            Argon2Params {
                m_kib: 65536,
                t: 3,
                p: 255,
            },
            Argon2Params {
                m_kib: 1024 * 1024,
                t: 10,
                p: 1,
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unprotected_round_trip_and_every_byte_flip() {
        let mut t = Table::default();
        t.create_key("k", 5, Zeroizing::new([9; 32])).unwrap();
        t.generation = 3;
        let bytes = seal(&Kdf::Unprotected, None, &t).unwrap();
        let back = parse(&bytes).unwrap().open(None).unwrap();
        assert_eq!(back.generation, t.generation);
        assert_eq!(back.to_json().as_slice(), t.to_json().as_slice());
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x01;
            let r = parse(&b).and_then(|p| p.open(None));
            assert!(r.is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn a_hostile_kdf_is_refused_before_running() {
        let bad = br#"{"format":"phi-envelope-keystore","version":1,"kdf":{"alg":"argon2id","m_kib":4294967295,"t":4294967295,"p":1,"salt":"00000000000000000000000000000000"},"nonce":"000000000000000000000000","ciphertext":"00000000000000000000000000000000"}
"#;
        let Err(ParseError(why)) = parse(bad) else {
            panic!()
        };
        assert!(why.contains("refusing to run the KDF"), "{why}");
    }
}
