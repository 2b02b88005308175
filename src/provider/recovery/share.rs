//! Recovery shares: the recovery private key split M-of-N, as printable
//! text (docs/RECOVERY.md, section 4).

use std::fmt;

use zeroize::Zeroizing;

use super::shamir::{self, Bytes32, SECRET_LEN};
use super::{fingerprint_hex, RecoveryPrivateKey, FINGERPRINT_LEN};
use crate::error::{Error, Result};
use crate::primitives::{ct_eq, fill_random};

/// The tag every share text starts with, which names its format version.
pub const SHARE_TAG: &str = "phi-recovery-share-v1";
const TAG_PREFIX: &str = "phi-recovery-share-v";
/// Length of a share set's id in bytes.
const SET_ID_LEN: usize = 4;
/// Length of the checksum in bytes (8 hex digits).
const CHECKSUM_LEN: usize = 4;

fn share_error(reason: impl Into<String>) -> Error {
    Error::RecoveryShare(reason.into())
}

/// One share of a recovery private key.
///
/// Its text form ([`to_text`](Self::to_text), [`parse`](Self::parse)) is one
/// printable line:
///
/// ```text
/// phi-recovery-share-v1:FINGERPRINT:SET:M:N:I:VALUE:CHECKSUM
/// ```
///
/// `FINGERPRINT` (32 hex digits) names the key, `SET` (8 hex digits) the
/// split the share belongs to, `M` the threshold, `N` the number of
/// shares, `I` this share's index (decimal), `VALUE` the 32-byte share
/// value (64 hex digits) and `CHECKSUM` the first 4 bytes of SHA-256 of
/// everything before its colon (8 hex digits), so that a mistyped or
/// damaged share is refused when it is read. docs/RECOVERY.md specifies it.
///
/// The value is secret (M shares are the key): it is zeroized on drop and
/// `Debug` shows only the metadata.
pub struct RecoveryShare {
    fingerprint: [u8; FINGERPRINT_LEN],
    set_id: [u8; SET_ID_LEN],
    threshold: u8,
    count: u8,
    index: u8,
    value: Bytes32,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(field: &str, what: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    unhex_into(field, what, &mut out)?;
    Ok(out)
}

/// Decodes `field` (exactly `2 * out.len()` hex digits) into `out`, so
/// that a secret is decoded straight into its zeroizing home.
fn unhex_into(field: &str, what: &str, out: &mut [u8]) -> Result<()> {
    if field.len() != 2 * out.len() || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(share_error(format!(
            "its {what} must be {} hex digits",
            2 * out.len()
        )));
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&field[2 * i..2 * i + 2], 16)
            .map_err(|_| share_error(format!("its {what} is not hex")))?;
    }
    Ok(())
}

fn decimal(field: &str, what: &str) -> Result<u8> {
    let canonical = !field.is_empty()
        && field.len() <= 3
        && field.bytes().all(|b| b.is_ascii_digit())
        && (field == "0" || !field.starts_with('0'));
    match field.parse::<u8>() {
        Ok(v) if canonical => Ok(v),
        _ => Err(share_error(format!(
            "its {what} must be a decimal number 1..=255 without leading zeros"
        ))),
    }
}

fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest.as_ref()[..CHECKSUM_LEN]);
    out
}

impl RecoveryShare {
    /// Reads a share from its text. ASCII whitespace anywhere (line breaks,
    /// spaces a printer or a person put in) is ignored and hex digits may be
    /// upper case; then the text must be exactly the canonical form, and
    /// its checksum must match before any field is used.
    pub fn parse(text: &str) -> Result<RecoveryShare> {
        let mut canonical: Zeroizing<String> = Zeroizing::new(String::with_capacity(160));
        for c in text.chars().filter(|c| !c.is_ascii_whitespace()) {
            canonical.push(c.to_ascii_lowercase());
        }
        if canonical.len() > 200 {
            return Err(share_error(
                "it is too long to be a recovery share (more than 200 characters)",
            ));
        }
        if !canonical.starts_with(TAG_PREFIX) {
            return Err(share_error(format!(
                "it is not a phi-envelope recovery share (it should start with {SHARE_TAG}:)"
            )));
        }
        if !canonical.starts_with(&format!("{SHARE_TAG}:")) {
            let version: String = canonical[TAG_PREFIX.len()..]
                .chars()
                .take_while(|c| *c != ':')
                .take(8)
                .collect();
            return Err(share_error(format!(
                "share format version {version:?} is not supported (this build reads {SHARE_TAG})"
            )));
        }
        let Some((body, sum)) = canonical.rsplit_once(':') else {
            return Err(share_error("it has no checksum"));
        };
        let sum = unhex::<CHECKSUM_LEN>(sum, "checksum (the last field)")?;
        if !ct_eq(&checksum(body), &sum) {
            return Err(share_error(
                "its checksum does not match: the share was mistyped or damaged; compare it with the original character by character",
            ));
        }
        let fields: Vec<&str> = body.split(':').collect();
        let [_tag, fp, set, m, n, i, value] = fields[..] else {
            return Err(share_error(
                "it must have 8 fields separated by ':' (tag, fingerprint, set, threshold, shares, index, value, checksum)",
            ));
        };
        let fingerprint = unhex::<FINGERPRINT_LEN>(fp, "fingerprint")?;
        let set_id = unhex::<SET_ID_LEN>(set, "set id")?;
        let threshold = decimal(m, "threshold")?;
        let count = decimal(n, "share count")?;
        let index = decimal(i, "index")?;
        if threshold < 2 || threshold > count {
            return Err(share_error(format!(
                "its threshold {threshold} must lie in 2..={count} (its share count)"
            )));
        }
        if index == 0 || index > count {
            return Err(share_error(format!(
                "its index {index} must lie in 1..={count}"
            )));
        }
        let mut v = Zeroizing::new([0u8; SECRET_LEN]);
        unhex_into(value, "value", &mut v[..])?;
        Ok(RecoveryShare {
            fingerprint,
            set_id,
            threshold,
            count,
            index,
            value: v,
        })
    }

    /// The canonical text, one line without a line break. It is secret:
    /// keep it out of logs.
    pub fn to_text(&self) -> Zeroizing<String> {
        let body = Zeroizing::new(format!(
            "{SHARE_TAG}:{}:{}:{}:{}:{}:{}",
            hex(&self.fingerprint),
            hex(&self.set_id),
            self.threshold,
            self.count,
            self.index,
            Zeroizing::new(hex(&self.value[..])).as_str(),
        ));
        let sum = checksum(&body);
        Zeroizing::new(format!("{}:{}", body.as_str(), hex(&sum)))
    }

    /// The fingerprint of the key this is a share of (32 hex digits).
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint)
    }

    /// The id of the split this share belongs to (8 hex digits): every
    /// split of a key gets a fresh one, and shares of two splits do not
    /// combine.
    pub fn set_id(&self) -> String {
        hex(&self.set_id)
    }

    /// How many shares restore the key (M).
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// How many shares were made (N).
    pub fn count(&self) -> u8 {
        self.count
    }

    /// This share's index, 1 ..= N.
    pub fn index(&self) -> u8 {
        self.index
    }
}

impl fmt::Debug for RecoveryShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RecoveryShare(key {}, set {}, share {} of {}, threshold {}, value <redacted>)",
            hex(&self.fingerprint),
            hex(&self.set_id),
            self.index,
            self.count,
            self.threshold
        )
    }
}

/// Splits `key` into `count` shares, any `threshold` of which restore it.
pub(crate) fn split(
    key: &RecoveryPrivateKey,
    threshold: u8,
    count: u8,
) -> Result<Vec<RecoveryShare>> {
    check_parameters(threshold, count)?;
    let mut set_id = [0u8; SET_ID_LEN];
    fill_random(&mut set_id)?;
    let mut coefficients = Vec::with_capacity(usize::from(threshold) - 1);
    for _ in 1..threshold {
        let mut c = Zeroizing::new([0u8; SECRET_LEN]);
        fill_random(&mut c[..])?;
        coefficients.push(c);
    }
    split_with(key, threshold, count, set_id, &coefficients)
}

fn check_parameters(threshold: u8, count: u8) -> Result<()> {
    if threshold < 2 || threshold > count {
        return Err(Error::InvalidArgument(format!(
            "a recovery key split needs 2 <= threshold <= shares <= 255 (got threshold {threshold}, shares {count})"
        )));
    }
    Ok(())
}

/// [`split`] with the set id and the polynomial coefficients given (for
/// the test vectors).
pub(crate) fn split_with(
    key: &RecoveryPrivateKey,
    threshold: u8,
    count: u8,
    set_id: [u8; SET_ID_LEN],
    coefficients: &[Bytes32],
) -> Result<Vec<RecoveryShare>> {
    check_parameters(threshold, count)?;
    if coefficients.len() != usize::from(threshold) - 1 {
        return Err(Error::InvalidArgument(
            "a split with threshold M needs M - 1 coefficient vectors".into(),
        ));
    }
    let secret = key.secret_bytes();
    let fingerprint = key.public_key().fingerprint_bytes();
    Ok((1..=count)
        .map(|index| RecoveryShare {
            fingerprint,
            set_id,
            threshold,
            count,
            index,
            value: shamir::evaluate(&secret, coefficients, index),
        })
        .collect())
}

/// Restores a key from shares: every check that can be made before the
/// shares are combined is made first, and the combined key is checked
/// against the shares' fingerprint.
pub(crate) fn combine(shares: &[RecoveryShare]) -> Result<RecoveryPrivateKey> {
    let Some(first) = shares.first() else {
        return Err(share_error("no shares given"));
    };
    for s in shares {
        if s.fingerprint != first.fingerprint {
            return Err(share_error(format!(
                "the shares are of different recovery keys: share {} is for key {}, share {} for key {}; give shares of one key only",
                first.index,
                fingerprint_hex(&first.fingerprint),
                s.index,
                fingerprint_hex(&s.fingerprint)
            )));
        }
        if s.set_id != first.set_id || s.threshold != first.threshold || s.count != first.count {
            return Err(share_error(format!(
                "the shares are of different splits of key {}: share {} is of set {} ({} of {}), share {} of set {} ({} of {}); shares of two splits never combine, give shares of one set only",
                fingerprint_hex(&first.fingerprint),
                first.index, hex(&first.set_id), first.threshold, first.count,
                s.index, hex(&s.set_id), s.threshold, s.count
            )));
        }
    }
    let mut seen = [false; 256];
    for s in shares {
        if std::mem::replace(&mut seen[usize::from(s.index)], true) {
            return Err(share_error(format!(
                "share {} was given twice; each share counts once",
                s.index
            )));
        }
    }
    let threshold = usize::from(first.threshold);
    if shares.len() < threshold {
        let missing = threshold - shares.len();
        return Err(share_error(format!(
            "{} of the {} shares given; key {} needs {} of its {} shares: {} more needed (fewer than {} reveal nothing of the key)",
            shares.len(),
            first.count,
            fingerprint_hex(&first.fingerprint),
            threshold,
            first.count,
            missing,
            threshold
        )));
    }
    // Every share given takes part: an extra share that does not lie on
    // the same polynomial changes the result, which the fingerprint check
    // then refuses, rather than going unnoticed.
    let points: Vec<(u8, &[u8; SECRET_LEN])> =
        shares.iter().map(|s| (s.index, &*s.value)).collect();
    let secret = shamir::interpolate(&points);
    let key = RecoveryPrivateKey::from_secret_bytes(&secret)?;
    if key.public_key().fingerprint_bytes() != first.fingerprint {
        return Err(share_error(format!(
            "the shares do not combine to key {}: at least one share is wrong although its checksum matches (altered together with its checksum, or not from this split); try another combination of shares",
            fingerprint_hex(&first.fingerprint)
        )));
    }
    Ok(key)
}
