//! Key references: how keys are named in configuration, headers and logs.
//!
//! Why one file of this size: the parsing and canonical forms of every
//! provider's key references are one grammar; 150 of its lines are tests.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Longest key reference accepted, in bytes (the header's bound).
pub const MAX_KEY_REF_LEN: usize = crate::format::MAX_KEY_REF_LEN;

/// A parsed, validated reference to a key-encryption key.
///
/// | form | example |
/// | --- | --- |
/// | `local:NAME` | `local:backups` |
/// | `pkcs11:` URI (RFC 7512) | `pkcs11:token=phi;object=records-kek` |
/// | `aws-kms:` key id, ARN or alias | `aws-kms:alias/phi-records` |
/// | `vault-transit:MOUNT/KEY` (Vault / OpenBao Transit; mount `transit` when omitted) | `vault-transit:transit/backups` |
/// | `hpke-recovery:FINGERPRINT` (an offline recovery key: 32 hex digits, docs/RECOVERY.md) | `hpke-recovery:3f0c9a1e5b7d2c4486a1f0e9d3b5c7a2` |
/// | `SCHEME:REST` for your own providers | `vault:transit/phi` |
///
/// The text form ([`as_str`](Self::as_str), `Display`) is canonical: parsing
/// it again gives the same reference, and it is what headers and events
/// carry. A reference names a key, never a secret: a `pkcs11:` URI with
/// `pin-value` is refused.
///
/// ```
/// use phi_envelope::KeyRef;
/// let r: KeyRef = "local:backups".parse()?;
/// assert_eq!(r.scheme(), "local");
/// assert_eq!(r.to_string(), "local:backups");
/// assert!("local:".parse::<KeyRef>().is_err());
/// assert!("pkcs11:token=t;object=k?pin-value=1234".parse::<KeyRef>().is_err());
/// # Ok::<(), phi_envelope::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRef {
    text: String,
    kind: KeyRefKind,
}

/// What a [`KeyRef`] points at, by provider.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum KeyRefKind {
    /// A key in the local keystore.
    Local {
        /// The key's name: 1 to 64 of `[A-Za-z0-9._-]`.
        name: String,
    },
    /// A key object on a PKCS#11 token (RFC 7512 URI).
    Pkcs11(Box<Pkcs11Uri>),
    /// An AWS KMS key.
    AwsKms {
        /// Key id, key ARN, alias name (`alias/...`) or alias ARN.
        key_id: String,
    },
    /// A Vault / OpenBao Transit key. The canonical text always names the
    /// mount: `vault-transit:backups` reads as `vault-transit:transit/backups`.
    VaultTransit {
        /// The mount path of the Transit engine (`transit`, or nested such as
        /// `phi/transit`): segments of `[A-Za-z0-9._-]`, none `.` or `..`.
        mount: String,
        /// The key's name: 1 to 128 of `[A-Za-z0-9._-]`, not `.` or `..`.
        name: String,
    },
    /// An offline recovery key (the `recovery` feature's
    /// `provider::recovery::RecoveryProvider`):
    /// an X25519 public key named by its fingerprint. The canonical text is
    /// lowercase.
    HpkeRecovery {
        /// The key's fingerprint: 32 lowercase hex digits (16 bytes),
        /// specified in docs/RECOVERY.md.
        fingerprint: String,
    },
    /// A key of a provider outside this crate.
    Custom {
        /// The scheme, which is the provider's id.
        scheme: String,
        /// Everything after `SCHEME:`.
        rest: String,
    },
}

/// The attributes of an RFC 7512 `pkcs11:` URI that phi-envelope uses.
/// Percent-encoding is decoded; `id` is raw bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pkcs11Uri {
    /// `token`: the token label.
    pub token: Option<String>,
    /// `manufacturer`: the token manufacturer.
    pub manufacturer: Option<String>,
    /// `serial`: the token serial number.
    pub serial: Option<String>,
    /// `model`: the token model.
    pub model: Option<String>,
    /// `slot-id`: the slot number.
    pub slot_id: Option<u64>,
    /// `object`: the key object's label (CKA_LABEL).
    pub object: Option<String>,
    /// `id`: the key object's CKA_ID bytes.
    pub id: Option<Vec<u8>>,
    /// `type`: the object class; phi-envelope keys are `secret-key`.
    pub object_type: Option<String>,
    /// `module-path` query attribute: the PKCS#11 library to load.
    pub module_path: Option<String>,
    /// `module-name` query attribute.
    pub module_name: Option<String>,
    /// `pin-source` query attribute: where the PIN is read from (a file).
    pub pin_source: Option<String>,
}

fn invalid(reference: &str, reason: impl Into<String>) -> Error {
    Error::InvalidKeyRef {
        reference: redact_pin(reference).chars().take(200).collect(),
        reason: reason.into(),
    }
}

/// A reference as it may be echoed in an error: the value of any
/// `pin-value` attribute (a secret that has no place in a reference) is
/// replaced, so the error that refuses it does not repeat it.
fn redact_pin(reference: &str) -> String {
    let mut out = String::with_capacity(reference.len());
    let mut rest = reference;
    while let Some(i) = rest.find("pin-value=") {
        let start = i + "pin-value=".len();
        out.push_str(&rest[..start]);
        out.push_str("<redacted>");
        let value_len = rest[start..].find(['&', ';']).unwrap_or(rest.len() - start);
        rest = &rest[start + value_len..];
    }
    out.push_str(rest);
    out
}

impl KeyRef {
    /// Parses and validates a reference.
    pub fn parse(text: &str) -> Result<KeyRef> {
        if text.is_empty() || text.len() > MAX_KEY_REF_LEN {
            return Err(invalid(text, "length must be 1..=1024 bytes"));
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(text, "contains whitespace or a control character"));
        }
        let (scheme, rest) = text
            .split_once(':')
            .ok_or_else(|| invalid(text, "expected SCHEME:..., e.g. local:NAME"))?;
        let kind = match scheme {
            "local" => {
                if rest.is_empty() || rest.len() > 64 {
                    return Err(invalid(text, "local key name must be 1..=64 characters"));
                }
                if !rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    return Err(invalid(text, "local key name allows only [A-Za-z0-9._-]"));
                }
                KeyRefKind::Local {
                    name: rest.to_owned(),
                }
            }
            "pkcs11" => KeyRefKind::Pkcs11(Box::new(parse_pkcs11(text, rest)?)),
            "aws-kms" => KeyRefKind::AwsKms {
                key_id: parse_aws_kms(text, rest)?,
            },
            "vault-transit" => parse_vault_transit(text, rest)?,
            "hpke-recovery" => {
                if rest.len() != HPKE_RECOVERY_FINGERPRINT_HEX_LEN
                    || !rest.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(invalid(
                        text,
                        "a recovery key fingerprint is 32 hex digits (expected hpke-recovery:FINGERPRINT)",
                    ));
                }
                KeyRefKind::HpkeRecovery {
                    fingerprint: rest.to_ascii_lowercase(),
                }
            }
            _ => {
                if scheme.is_empty()
                    || scheme.len() > crate::format::MAX_PROVIDER_ID_LEN
                    || !scheme.starts_with(|c: char| c.is_ascii_lowercase())
                    || !scheme
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(invalid(
                        text,
                        "unknown scheme; a provider scheme is [a-z][a-z0-9-]* (up to 32)",
                    ));
                }
                if rest.is_empty() {
                    return Err(invalid(text, "nothing after the scheme"));
                }
                KeyRefKind::Custom {
                    scheme: scheme.to_owned(),
                    rest: rest.to_owned(),
                }
            }
        };
        let text = match &kind {
            KeyRefKind::Pkcs11(uri) => uri.to_uri(),
            KeyRefKind::VaultTransit { mount, name } => format!("vault-transit:{mount}/{name}"),
            KeyRefKind::HpkeRecovery { fingerprint } => format!("hpke-recovery:{fingerprint}"),
            _ => text.to_owned(),
        };
        // The canonical text is what headers carry: percent-encoding can
        // make it longer than the input, so the bound applies to it too.
        if text.len() > MAX_KEY_REF_LEN {
            return Err(invalid(
                &text,
                "its canonical form is longer than 1024 bytes",
            ));
        }
        Ok(KeyRef { text, kind })
    }

    /// The scheme, which is the id of the provider that holds the key:
    /// `local`, `pkcs11`, `aws-kms`, `vault-transit`, `hpke-recovery`, or a
    /// custom provider's id.
    pub fn scheme(&self) -> &str {
        match &self.kind {
            KeyRefKind::Local { .. } => "local",
            KeyRefKind::Pkcs11(_) => "pkcs11",
            KeyRefKind::AwsKms { .. } => "aws-kms",
            KeyRefKind::VaultTransit { .. } => "vault-transit",
            KeyRefKind::HpkeRecovery { .. } => "hpke-recovery",
            KeyRefKind::Custom { scheme, .. } => scheme,
        }
    }

    /// What the reference points at.
    pub fn kind(&self) -> &KeyRefKind {
        &self.kind
    }

    /// The canonical text form.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({})", self.text)
    }
}

impl FromStr for KeyRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<KeyRef> {
        KeyRef::parse(s)
    }
}

fn parse_aws_kms(text: &str, rest: &str) -> Result<String> {
    let ok_chars = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b':'))
    };
    let valid = if let Some(alias) = rest.strip_prefix("alias/") {
        !alias.is_empty() && !alias.starts_with("aws/") && ok_chars(alias) && !alias.contains(':')
    } else if let Some(arn) = rest.strip_prefix("arn:") {
        // arn:PARTITION:kms:REGION:ACCOUNT:key/ID or :alias/NAME
        let parts: Vec<&str> = arn.splitn(5, ':').collect();
        parts.len() == 5
            && parts[0].starts_with("aws")
            && parts[1] == "kms"
            && !parts[2].is_empty()
            && parts[3].len() == 12
            && parts[3].bytes().all(|b| b.is_ascii_digit())
            && (parts[4]
                .strip_prefix("key/")
                .is_some_and(|id| ok_chars(id) && !id.contains('/'))
                || parts[4].strip_prefix("alias/").is_some_and(ok_chars))
    } else {
        ok_chars(rest) && !rest.contains('/') && !rest.contains(':')
    };
    if !valid || rest.len() > 2048 {
        return Err(invalid(
            text,
            "expected aws-kms:KEY-ID, aws-kms:arn:aws:kms:REGION:ACCOUNT:key/KEY-ID, aws-kms:alias/NAME or an alias ARN",
        ));
    }
    Ok(rest.to_owned())
}

/// Length of the fingerprint of an `hpke-recovery:` reference, in hex
/// digits.
pub(crate) const HPKE_RECOVERY_FINGERPRINT_HEX_LEN: usize = 32;

/// The default mount of a `vault-transit:` reference without one.
pub(crate) const DEFAULT_TRANSIT_MOUNT: &str = "transit";

/// `vault-transit:[MOUNT/]KEY`: the key name is the last segment; what is
/// before it is the mount. Every segment is a plain path component (no `.`,
/// `..`, empty segment or percent sign), so a reference can never address
/// another path of the server than `MOUNT/.../KEY`.
fn parse_vault_transit(text: &str, rest: &str) -> Result<KeyRefKind> {
    let segment_ok = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    let (mount, name) = match rest.rsplit_once('/') {
        Some((mount, name)) => (mount, name),
        None => (DEFAULT_TRANSIT_MOUNT, rest),
    };
    if !segment_ok(name, 128) {
        return Err(invalid(
            text,
            "a Transit key name is 1..=128 of [A-Za-z0-9._-] (expected vault-transit:MOUNT/KEY)",
        ));
    }
    if mount.len() > 256 || !mount.split('/').all(|s| segment_ok(s, 256)) {
        return Err(invalid(
            text,
            "a Transit mount is /-separated segments of [A-Za-z0-9._-] (no empty, . or .. segment; \
             expected vault-transit:MOUNT/KEY)",
        ));
    }
    Ok(KeyRefKind::VaultTransit {
        mount: mount.to_owned(),
        name: name.to_owned(),
    })
}

fn pct_decode(text: &str, s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid(text, "bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_decode_str(text: &str, s: &str) -> Result<String> {
    String::from_utf8(pct_decode(text, s)?).map_err(|_| invalid(text, "attribute is not UTF-8"))
}

fn pct_encode(bytes: &[u8], all: bool) -> String {
    let mut out = String::new();
    for &b in bytes {
        if !all && (b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn parse_pkcs11(text: &str, rest: &str) -> Result<Pkcs11Uri> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut uri = Pkcs11Uri::default();
    let set = |slot: &mut Option<String>, name: &str, v: &str| -> Result<()> {
        if slot.is_some() {
            return Err(invalid(text, format!("attribute {name} given twice")));
        }
        *slot = Some(pct_decode_str(text, v)?);
        Ok(())
    };
    for attr in path.split(';').filter(|a| !a.is_empty()) {
        let (name, value) = attr
            .split_once('=')
            .ok_or_else(|| invalid(text, format!("attribute {attr:?} has no '='")))?;
        match name {
            "token" => set(&mut uri.token, name, value)?,
            "manufacturer" => set(&mut uri.manufacturer, name, value)?,
            "serial" => set(&mut uri.serial, name, value)?,
            "model" => set(&mut uri.model, name, value)?,
            "object" => set(&mut uri.object, name, value)?,
            "type" => set(&mut uri.object_type, name, value)?,
            "slot-id" => {
                let v = value
                    .parse()
                    .map_err(|_| invalid(text, "slot-id must be a decimal number"))?;
                if uri.slot_id.replace(v).is_some() {
                    return Err(invalid(text, "attribute slot-id given twice"));
                }
            }
            "id" => {
                if uri.id.replace(pct_decode(text, value)?).is_some() {
                    return Err(invalid(text, "attribute id given twice"));
                }
            }
            "library-manufacturer"
            | "library-description"
            | "library-version"
            | "slot-description"
            | "slot-manufacturer" => {}
            _ => return Err(invalid(text, format!("unknown path attribute {name:?}"))),
        }
    }
    for attr in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|a| !a.is_empty())
    {
        let (name, value) = attr
            .split_once('=')
            .ok_or_else(|| invalid(text, format!("query attribute {attr:?} has no '='")))?;
        match name {
            "pin-value" => {
                return Err(invalid(
                    text,
                    "pin-value puts a secret in a key reference; give the PIN through the provider's configuration",
                ))
            }
            "pin-source" => set(&mut uri.pin_source, name, value)?,
            "module-path" => set(&mut uri.module_path, name, value)?,
            "module-name" => set(&mut uri.module_name, name, value)?,
            _ => return Err(invalid(text, format!("unknown query attribute {name:?}"))),
        }
    }
    if uri.object.is_none() && uri.id.is_none() {
        return Err(invalid(text, "a pkcs11 key reference needs object= or id="));
    }
    if uri
        .object_type
        .as_deref()
        .is_some_and(|t| t != "secret-key")
    {
        return Err(invalid(
            text,
            "type must be secret-key for a key-encryption key",
        ));
    }
    Ok(uri)
}

impl Pkcs11Uri {
    /// The canonical URI text: attributes in a fixed order, percent-encoded.
    pub fn to_uri(&self) -> String {
        let mut path = Vec::new();
        let mut push = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                path.push(format!("{name}={}", pct_encode(v.as_bytes(), false)));
            }
        };
        push("token", &self.token);
        push("manufacturer", &self.manufacturer);
        push("serial", &self.serial);
        push("model", &self.model);
        push("object", &self.object);
        push("type", &self.object_type);
        if let Some(id) = &self.id {
            path.push(format!("id={}", pct_encode(id, true)));
        }
        if let Some(s) = self.slot_id {
            path.push(format!("slot-id={s}"));
        }
        let mut query = Vec::new();
        for (name, v) in [
            ("module-name", &self.module_name),
            ("module-path", &self.module_path),
            ("pin-source", &self.pin_source),
        ] {
            if let Some(v) = v {
                query.push(format!(
                    "{name}={}",
                    pct_encode(v.as_bytes(), false).replace("%2f", "/")
                ));
            }
        }
        let mut s = format!("pkcs11:{}", path.join(";"));
        if !query.is_empty() {
            s.push('?');
            s.push_str(&query.join("&"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_refs() {
        let r = KeyRef::parse("local:phi-backups_2026.v1").unwrap();
        assert_eq!(
            r.kind(),
            &KeyRefKind::Local {
                name: "phi-backups_2026.v1".into()
            }
        );
        for bad in [
            "local:",
            "local:a b",
            "local:a/b",
            "local:ä",
            "nocolon",
            ":x",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
        assert!(KeyRef::parse(&format!("local:{}", "a".repeat(65))).is_err());
    }

    #[test]
    fn pkcs11_refs_round_trip() {
        let r = KeyRef::parse("pkcs11:token=My%20Token;object=kek;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so").unwrap();
        let KeyRefKind::Pkcs11(u) = r.kind() else {
            panic!()
        };
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.object.as_deref(), Some("kek"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(
            u.module_path.as_deref(),
            Some("/usr/lib/softhsm/libsofthsm2.so")
        );
        let again = KeyRef::parse(r.as_str()).unwrap();
        assert_eq!(again, r);
        assert_eq!(
            r.as_str(),
            "pkcs11:token=My%20Token;object=kek;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so"
        );
    }

    #[test]
    fn pkcs11_refs_rejected() {
        for bad in [
            "pkcs11:token=t",
            "pkcs11:token=t;object=k?pin-value=1234",
            "pkcs11:object=k;object=j",
            "pkcs11:object=k;bogus=1",
            "pkcs11:object=%zz",
            "pkcs11:object=k;type=private",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aws_kms_refs() {
        for good in [
            "aws-kms:1234abcd-12ab-34cd-56ef-1234567890ab",
            "aws-kms:mrk-1234abcd12ab34cd56ef1234567890ab",
            "aws-kms:alias/phi-records",
            "aws-kms:arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "aws-kms:arn:aws:kms:us-east-1:111122223333:alias/phi-records",
            "aws-kms:arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/abc",
        ] {
            assert!(KeyRef::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "aws-kms:",
            "aws-kms:alias/",
            "aws-kms:alias/aws/ebs",
            "aws-kms:arn:aws:s3:::bucket",
            "aws-kms:arn:aws:kms:us-east-1:1111:key/x",
            "aws-kms:key/with/slash",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vault_transit_refs() {
        let r = KeyRef::parse("vault-transit:backups").unwrap();
        assert_eq!(r.as_str(), "vault-transit:transit/backups");
        assert_eq!(r.scheme(), "vault-transit");
        assert_eq!(KeyRef::parse(r.as_str()).unwrap(), r);
        let r = KeyRef::parse("vault-transit:phi/transit/records-kek_1.v2").unwrap();
        assert_eq!(
            r.kind(),
            &KeyRefKind::VaultTransit {
                mount: "phi/transit".into(),
                name: "records-kek_1.v2".into()
            }
        );
        for bad in [
            "vault-transit:",
            "vault-transit:/k",
            "vault-transit:transit/",
            "vault-transit:transit//k",
            "vault-transit:../sys/k",
            "vault-transit:transit/..",
            "vault-transit:./k",
            "vault-transit:transit/k%2f",
            "vault-transit:transit/k?x=1",
            "vault-transit:transit/k#f",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
        assert!(KeyRef::parse(&format!("vault-transit:t/{}", "a".repeat(129))).is_err());
    }

    #[test]
    fn hpke_recovery_refs() {
        let r = KeyRef::parse("hpke-recovery:3F0C9A1E5B7D2C4486A1F0E9D3B5C7A2").unwrap();
        assert_eq!(r.as_str(), "hpke-recovery:3f0c9a1e5b7d2c4486a1f0e9d3b5c7a2");
        assert_eq!(r.scheme(), "hpke-recovery");
        assert_eq!(KeyRef::parse(r.as_str()).unwrap(), r);
        assert_eq!(
            r.kind(),
            &KeyRefKind::HpkeRecovery {
                fingerprint: "3f0c9a1e5b7d2c4486a1f0e9d3b5c7a2".into()
            }
        );
        for bad in [
            "hpke-recovery:",
            "hpke-recovery:3f0c9a1e5b7d2c4486a1f0e9d3b5c7a",
            "hpke-recovery:3f0c9a1e5b7d2c4486a1f0e9d3b5c7a22",
            "hpke-recovery:3f0c9a1e5b7d2c4486a1f0e9d3b5c7ag",
            "hpke-recovery:+f0c9a1e5b7d2c4486a1f0e9d3b5c7a2",
        ] {
            let e = KeyRef::parse(bad).unwrap_err();
            assert!(e.to_string().contains("32 hex digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_never_echo_a_pin() {
        let e = KeyRef::parse("pkcs11:object=k?pin-value=1234&module-path=/m;x").unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(!text.contains("1234"), "{text}");
        assert!(text.contains("pin-value=<redacted>"), "{text}");
        assert_eq!(redact_pin("a;pin-value=9;b"), "a;pin-value=<redacted>;b");
    }

    #[test]
    fn custom_refs() {
        let r = KeyRef::parse("vault:transit/phi").unwrap();
        assert_eq!(r.scheme(), "vault");
        assert!(KeyRef::parse("Vault:x").is_err());
        assert!(KeyRef::parse("vault:").is_err());
        assert!(KeyRef::parse("local:a\n").is_err());
    }
}
