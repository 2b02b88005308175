//! Primitives: the secret key types, the random source, and the AES-256-GCM,
//! HKDF-SHA-512 and HMAC-SHA-256 operations, all from `ring`.
//!
//! Nothing here knows about the wire format; the [`crate::cobblestone`] body
//! and the [`crate::format`] header are built on these.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// Length in bytes of a data-encryption key (AES-256).
pub const DEK_LEN: usize = 32;

/// A data-encryption key: 32 uniformly random bytes, the input key of one or
/// more messages.
///
/// The bytes are zeroized when the value is dropped and never printed: `Debug`
/// shows `Dek(<redacted>)`. There is no `Clone`; share a key with `Arc<Dek>`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Dek([u8; DEK_LEN]);

impl Dek {
    /// Generates a fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Dek> {
        let mut dek = Dek([0u8; DEK_LEN]);
        fill_random(&mut dek.0)?;
        Ok(dek)
    }

    /// Copies a key out of `bytes`, which must be exactly 32 bytes long.
    ///
    /// This is how a key provider turns the plaintext it unwrapped into a
    /// `Dek`; zeroize the source buffer afterwards (or keep it in a
    /// [`Zeroizing`] wrapper).
    pub fn from_slice(bytes: &[u8]) -> Result<Dek> {
        let arr: [u8; DEK_LEN] = bytes
            .try_into()
            .map_err(|_| Error::InvalidKeyLength { expected: DEK_LEN })?;
        let dek = Dek(arr);
        // `arr` was moved into `dek`; the temporary copy in `try_into` is a
        // plain array on the stack that the compiler does not let us reach.
        Ok(dek)
    }

    /// The key bytes, for a key provider that must wrap them.
    ///
    /// Do not copy them anywhere that is not zeroized.
    pub fn expose_secret(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new().fill(buf).map_err(|_| Error::Rng)
}

/// A fixed-size secret byte array that is zeroized on drop and never printed.
pub(crate) type SecretBytes<const N: usize> = Zeroizing<[u8; N]>;

/// HKDF-Expand-SHA-512 from `prk` (used directly as the pseudorandom key, as
/// in c2sp.org/chunked-encryption) with `info` given as parts, into `out`.
/// Fails only when `out` is longer than 255 * 64 bytes.
pub(crate) fn hkdf_expand_sha512(
    prk: &ring::hkdf::Prk,
    info: &[&[u8]],
    out: &mut [u8],
) -> Result<(), ring::error::Unspecified> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    prk.expand(info, Len(out.len()))?.fill(out)
}

/// AES-256-GCM with a 96-bit nonce and a 128-bit tag, from `ring`.
pub(crate) struct Aes256Gcm(ring::aead::LessSafeKey);

impl Aes256Gcm {
    /// A key from 32 bytes.
    pub(crate) fn new(key: &[u8]) -> Result<Aes256Gcm> {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
            .map_err(|_| Error::InvalidKeyLength { expected: 32 })?;
        Ok(Aes256Gcm(ring::aead::LessSafeKey::new(unbound)))
    }

    /// Encrypts `buf` in place and returns the tag.
    pub(crate) fn seal_in_place(&self, nonce: [u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                buf,
            )
            // Fails only for inputs over 64 GiB; callers pass a chunk (16 KiB)
            // or a keystore table (at most 16 MiB).
            .expect("AES-GCM input length is bounded by the callers");
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `buf` (ciphertext followed by the 16-byte tag) in place and
    /// returns the plaintext length. On failure `buf` is zeroized and the
    /// error is the opaque [`Error::Decrypt`].
    pub(crate) fn open_in_place(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize> {
        match self.0.open_in_place(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(aad),
            buf,
        ) {
            Ok(pt) => Ok(pt.len()),
            Err(_) => {
                buf.zeroize();
                Err(Error::Decrypt)
            }
        }
    }
}

/// Makes the HKDF pseudorandom key state for `key` (HKDF-Expand without the
/// Extract step: the key is already uniformly random).
pub(crate) fn hkdf_prk_sha512(key: &[u8]) -> ring::hkdf::Prk {
    ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA512, key)
}

/// Constant-time equality of two byte strings of the same length.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dek_debug_is_redacted() {
        let dek = Dek::from_slice(&[0x41; 32]).unwrap();
        let s = format!("{dek:?}");
        assert_eq!(s, "Dek(<redacted>)");
        assert!(!s.contains("41") && !s.contains('A'));
    }

    #[test]
    fn dek_length_is_checked() {
        assert!(matches!(
            Dek::from_slice(&[0; 31]),
            Err(Error::InvalidKeyLength { expected: 32 })
        ));
        assert!(Dek::from_slice(&[0; 33]).is_err());
    }

    fn vectors(name: &str) -> serde_json::Value {
        let path = format!(
            "{}/tests/vectors/wycheproof/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn hex(v: &serde_json::Value) -> Vec<u8> {
        ::hex::decode(v.as_str().unwrap()).unwrap()
    }

    #[test]
    fn wycheproof_aes_256_gcm() {
        let doc = vectors("aes_gcm_test.json");
        let mut count = 0;
        for g in doc["testGroups"].as_array().unwrap() {
            if g["keySize"] != 256 || g["ivSize"] != 96 || g["tagSize"] != 128 {
                continue;
            }
            for t in g["tests"].as_array().unwrap() {
                count += 1;
                let id = &t["tcId"];
                let key = Aes256Gcm::new(&hex(&t["key"])).unwrap();
                let nonce: [u8; 12] = hex(&t["iv"]).try_into().unwrap();
                let (aad, msg, ct, tag) = (
                    hex(&t["aad"]),
                    hex(&t["msg"]),
                    hex(&t["ct"]),
                    hex(&t["tag"]),
                );
                let mut buf = [ct.clone(), tag.clone()].concat();
                let opened = key.open_in_place(nonce, &aad, &mut buf);
                if t["result"] == "valid" {
                    assert_eq!(opened.unwrap(), msg.len(), "tcId {id}");
                    assert_eq!(&buf[..msg.len()], &msg[..], "tcId {id}");
                    let mut sealed = msg.clone();
                    let got_tag = key.seal_in_place(nonce, &aad, &mut sealed);
                    assert_eq!((sealed, got_tag.to_vec()), (ct, tag), "tcId {id}");
                } else {
                    assert!(matches!(opened, Err(Error::Decrypt)), "tcId {id} must fail");
                    assert!(buf.iter().all(|&b| b == 0), "tcId {id}: buffer zeroed");
                }
            }
        }
        assert_eq!(count, 66);
    }

    #[test]
    fn wycheproof_hkdf_sha512_expand() {
        let doc = vectors("hkdf_sha512_test.json");
        let mut count = 0;
        for g in doc["testGroups"].as_array().unwrap() {
            for t in g["tests"].as_array().unwrap() {
                count += 1;
                let id = &t["tcId"];
                // Extract with ring, then Expand through our function.
                let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA512, &hex(&t["salt"]));
                let prk = salt.extract(&hex(&t["ikm"]));
                let info = hex(&t["info"]);
                let (a, b) = info.split_at(info.len() / 2);
                let mut out = vec![0u8; t["size"].as_u64().unwrap() as usize];
                let r = hkdf_expand_sha512(&prk, &[a, b], &mut out);
                if t["result"] == "valid" {
                    r.unwrap();
                    assert_eq!(out, hex(&t["okm"]), "tcId {id}");
                } else {
                    assert!(r.is_err(), "tcId {id} must fail");
                }
            }
        }
        assert_eq!(count, 83);
    }

    #[test]
    fn expand_matches_rustcrypto_oracle() {
        // HKDF-Expand with the key used directly as PRK, as Cobblestone does.
        for len in [1usize, 32, 64, 76, 200] {
            let key = [0x5a; 32];
            let mut ours = vec![0u8; len];
            hkdf_expand_sha512(&hkdf_prk_sha512(&key), &[b"abc", b"", b"def"], &mut ours).unwrap();
            // RFC 5869 Expand by hand on RustCrypto HMAC-SHA-512 (its `Hkdf`
            // refuses a PRK shorter than the hash output).
            use hmac::Mac;
            let mut theirs = Vec::new();
            let mut prev: Vec<u8> = Vec::new();
            for i in 1u8.. {
                if theirs.len() >= len {
                    break;
                }
                let mut mac = hmac::Hmac::<sha2::Sha512>::new_from_slice(&key).unwrap();
                mac.update(&prev);
                mac.update(b"abcdef");
                mac.update(&[i]);
                prev = mac.finalize().into_bytes().to_vec();
                theirs.extend_from_slice(&prev);
            }
            assert_eq!(ours, theirs[..len]);
        }
    }

    #[test]
    fn generated_keys_differ() {
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
