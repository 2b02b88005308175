//! HPKE (RFC 9180) in base mode for one suite:
//! DHKEM(X25519, HKDF-SHA256) (KEM 0x0020), HKDF-SHA256 (KDF 0x0001),
//! AES-256-GCM (AEAD 0x0002).
//!
//! X25519 comes from `x25519-dalek` (ring cannot load a stored X25519
//! private key); HKDF, HMAC and AES-256-GCM come from `ring`, like every
//! other primitive of the crate. Every secret intermediate (the DH output,
//! the shared secret, the key schedule's secret, key and exporter secret)
//! is held in a zeroizing type. `ring`'s HMAC and HKDF states keep their
//! own copies of keys for the length of one call and do not zeroize them;
//! that is true of every use of `ring` in this crate.
//!
//! Checked against the RFC 9180 test vectors of this suite
//! (`tests/vectors/hpke/`), see `vector_tests`.

use ring::{hkdf, hmac};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::primitives::{fill_random, Aes256Gcm};

/// Length of the encapsulated key `enc` (an X25519 public key).
pub(crate) const N_ENC: usize = 32;
/// Length of the AEAD tag.
pub(crate) const N_T: usize = 16;
const N_K: usize = 32;
const N_N: usize = 12;

/// `"KEM" || I2OSP(kem_id, 2)`.
const KEM_SUITE_ID: [u8; 5] = [b'K', b'E', b'M', 0x00, 0x20];
/// `"HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) || I2OSP(aead_id, 2)`.
const HPKE_SUITE_ID: [u8; 10] = [b'H', b'P', b'K', b'E', 0x00, 0x20, 0x00, 0x01, 0x00, 0x02];
const VERSION_LABEL: &[u8] = b"HPKE-v1";
const MODE_BASE: u8 = 0x00;

pub(crate) type Secret32 = Zeroizing<[u8; 32]>;

/// `LabeledExtract(salt, label, ikm) = HKDF-Extract(salt, "HPKE-v1" ||
/// suite_id || label || ikm)`, that is HMAC-SHA256 keyed with `salt`.
fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Secret32 {
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut ctx = hmac::Context::with_key(&key);
    for part in [VERSION_LABEL, suite_id, label, ikm] {
        ctx.update(part);
    }
    let tag = ctx.sign();
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(tag.as_ref());
    out
}

/// `LabeledExpand(prk, label, info, L) = HKDF-Expand(prk, I2OSP(L, 2) ||
/// "HPKE-v1" || suite_id || label || info, L)`, into `out` (`L =
/// out.len()`, at most 255 * 32).
fn labeled_expand(
    suite_id: &[u8],
    prk: &[u8; 32],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<()> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let too_long = || Error::InvalidArgument("HKDF-SHA256 output longer than 8160 bytes".into());
    let length = u16::try_from(out.len()).map_err(|_| too_long())?;
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk);
    let length = length.to_be_bytes();
    prk.expand(
        &[&length, VERSION_LABEL, suite_id, label, info],
        Len(out.len()),
    )
    .and_then(|okm| okm.fill(out))
    .map_err(|_| too_long())
}

/// `ExtractAndExpand(dh, kem_context)` of DHKEM.
fn extract_and_expand(dh: &[u8; 32], kem_context: &[u8; 64]) -> Result<Secret32> {
    let eae_prk = labeled_extract(&KEM_SUITE_ID, b"", b"eae_prk", dh);
    let mut shared = Zeroizing::new([0u8; 32]);
    labeled_expand(
        &KEM_SUITE_ID,
        &eae_prk,
        b"shared_secret",
        kem_context,
        &mut shared[..],
    )?;
    Ok(shared)
}

/// True when `pk` is usable as a recipient key: X25519 with it gives a
/// non-zero output. Every clamped X25519 scalar is a multiple of the
/// cofactor 8, so the small-order points (for which RFC 9180, section
/// 7.1.4, requires the all-zero check) give zero for every scalar: one
/// trial with a fixed scalar finds them all.
pub(crate) fn is_valid_public_key(pk: &[u8; 32]) -> bool {
    let probe = StaticSecret::from([0x42u8; 32]);
    probe
        .diffie_hellman(&PublicKey::from(*pk))
        .was_contributory()
}

/// `Encap(pkR)` with the ephemeral private key `sk_e`: returns `enc` and
/// the shared secret. Fails (RFC 9180, section 7.1.4) when the DH output
/// is all zero, that is when `pk_r` is a small-order point.
pub(crate) fn encap_with(sk_e: &StaticSecret, pk_r: &PublicKey) -> Result<([u8; N_ENC], Secret32)> {
    let dh = sk_e.diffie_hellman(pk_r);
    if !dh.was_contributory() {
        return Err(Error::InvalidArgument(
            "the recovery public key is a small-order X25519 point; it cannot be a recipient"
                .into(),
        ));
    }
    let enc = PublicKey::from(sk_e).to_bytes();
    let mut kem_context = [0u8; 64];
    kem_context[..32].copy_from_slice(&enc);
    kem_context[32..].copy_from_slice(pk_r.as_bytes());
    Ok((enc, extract_and_expand(dh.as_bytes(), &kem_context)?))
}

/// `Decap(enc, skR)`; `None` when the DH output is all zero (a small-order
/// `enc`), which the caller reports like any other failed unwrap.
pub(crate) fn decap(enc: &[u8; N_ENC], sk_r: &StaticSecret) -> Result<Option<Secret32>> {
    let dh = sk_r.diffie_hellman(&PublicKey::from(*enc));
    if !dh.was_contributory() {
        return Ok(None);
    }
    let mut kem_context = [0u8; 64];
    kem_context[..32].copy_from_slice(enc);
    kem_context[32..].copy_from_slice(PublicKey::from(sk_r).as_bytes());
    Ok(Some(extract_and_expand(dh.as_bytes(), &kem_context)?))
}

/// An HPKE encryption context (RFC 9180, section 5.2), base mode.
pub(crate) struct Context {
    key: Secret32,
    base_nonce: [u8; N_N],
    #[cfg_attr(not(test), allow(dead_code))]
    exporter_secret: Secret32,
    seq: u64,
}

impl Context {
    /// `KeySchedule(mode_base, shared_secret, info, psk = "", psk_id = "")`.
    pub(crate) fn base(shared_secret: &[u8; 32], info: &[u8]) -> Result<Context> {
        Ok(Self::schedule(shared_secret, info)?.0)
    }

    /// The key schedule, with its `key_schedule_context` and `secret` (for
    /// the test vectors).
    pub(crate) fn schedule(
        shared_secret: &[u8; 32],
        info: &[u8],
    ) -> Result<(Context, [u8; 65], Secret32)> {
        let psk_id_hash = labeled_extract(&HPKE_SUITE_ID, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(&HPKE_SUITE_ID, b"", b"info_hash", info);
        let mut ksc = [0u8; 65];
        ksc[0] = MODE_BASE;
        ksc[1..33].copy_from_slice(&psk_id_hash[..]);
        ksc[33..].copy_from_slice(&info_hash[..]);
        // psk = "" in base mode.
        let secret = labeled_extract(&HPKE_SUITE_ID, shared_secret, b"secret", b"");
        let mut key = Zeroizing::new([0u8; N_K]);
        labeled_expand(&HPKE_SUITE_ID, &secret, b"key", &ksc, &mut key[..])?;
        let mut base_nonce = [0u8; N_N];
        labeled_expand(
            &HPKE_SUITE_ID,
            &secret,
            b"base_nonce",
            &ksc,
            &mut base_nonce,
        )?;
        let mut exporter_secret = Zeroizing::new([0u8; 32]);
        labeled_expand(
            &HPKE_SUITE_ID,
            &secret,
            b"exp",
            &ksc,
            &mut exporter_secret[..],
        )?;
        let ctx = Context {
            key,
            base_nonce,
            exporter_secret,
            seq: 0,
        };
        Ok((ctx, ksc, secret))
    }

    #[cfg(test)]
    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    #[cfg(test)]
    pub(crate) fn base_nonce(&self) -> &[u8; 12] {
        &self.base_nonce
    }

    #[cfg(test)]
    pub(crate) fn exporter_secret(&self) -> &[u8; 32] {
        &self.exporter_secret
    }

    /// `ComputeNonce(seq)`: the base nonce XOR the big-endian sequence
    /// number.
    pub(crate) fn nonce(&self) -> [u8; N_N] {
        let mut nonce = self.base_nonce;
        for (n, s) in nonce[N_N - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn advance(&mut self) -> Result<()> {
        self.seq = self.seq.checked_add(1).ok_or_else(|| {
            Error::InvalidArgument("HPKE message limit reached for this context".into())
        })?;
        Ok(())
    }

    /// `ContextS.Seal(aad, pt)`: `ciphertext || tag`.
    pub(crate) fn seal(&mut self, aad: &[u8], pt: &[u8]) -> Result<Vec<u8>> {
        let aead = Aes256Gcm::new(&self.key[..])?;
        let mut out = Vec::with_capacity(pt.len() + N_T);
        out.extend_from_slice(pt);
        let tag = aead.seal_in_place(self.nonce(), aad, &mut out);
        out.extend_from_slice(&tag);
        self.advance()?;
        Ok(out)
    }

    /// `ContextR.Open(aad, ct)`: the plaintext, or the opaque
    /// [`Error::Decrypt`]. The sequence number advances only on success.
    pub(crate) fn open(&mut self, aad: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if ct.len() < N_T {
            return Err(Error::Decrypt);
        }
        let aead = Aes256Gcm::new(&self.key[..])?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let len = aead.open_in_place(self.nonce(), aad, &mut buf[..])?;
        buf.truncate(len);
        self.advance()?;
        Ok(buf)
    }

    /// `Context.Export(exporter_context, L)`.
    #[cfg(test)]
    pub(crate) fn export(&self, exporter_context: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(vec![0u8; len]);
        labeled_expand(
            &HPKE_SUITE_ID,
            &self.exporter_secret,
            b"sec",
            exporter_context,
            &mut out[..],
        )?;
        Ok(out)
    }
}

/// A fresh ephemeral X25519 key from the operating system's CSPRNG.
pub(crate) fn ephemeral() -> Result<StaticSecret> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    fill_random(&mut bytes[..])?;
    Ok(StaticSecret::from(*bytes))
}

/// Single-shot `SealBase(pkR, info, aad, pt)` with the ephemeral key
/// `sk_e`: `(enc, ciphertext || tag)`.
pub(crate) fn seal_base_with(
    sk_e: &StaticSecret,
    pk_r: &PublicKey,
    info: &[u8],
    aad: &[u8],
    pt: &[u8],
) -> Result<([u8; N_ENC], Vec<u8>)> {
    let (enc, shared) = encap_with(sk_e, pk_r)?;
    let ct = Context::base(&shared, info)?.seal(aad, pt)?;
    Ok((enc, ct))
}

/// Single-shot `OpenBase(enc, skR, info, aad, ct)`: the plaintext, or the
/// opaque [`Error::Decrypt`].
pub(crate) fn open_base(
    enc: &[u8; N_ENC],
    sk_r: &StaticSecret,
    info: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let shared = decap(enc, sk_r)?.ok_or(Error::Decrypt)?;
    Context::base(&shared, info)?.open(aad, ct)
}
