//! How keys and their versions map to token objects, and the lifecycle
//! verbs on them. Everything here runs on a blocking thread with one
//! logged-in session.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::errors::provider_error;
use super::session::Fail;
use crate::error::Error;
use crate::provider::{
    KeyInfo, KeyRef, KeyState, KeyVersionInfo, Pkcs11Uri, ProviderErrorKind as K,
};

/// `CKA_APPLICATION` of the version metadata data objects.
pub(super) const META_APPLICATION: &[u8] = b"phi-envelope/v1 kek-meta";
/// Magic of the metadata value.
const META_MAGIC: &[u8; 4] = b"PHM1";
/// Length of the metadata value.
const META_LEN: usize = 4 + 8 + 8 + 8;

/// Which token objects make up one key: the `object` (CKA_LABEL) and `id`
/// (CKA_ID prefix) of its `pkcs11:` URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct KeyName {
    /// CKA_LABEL of every version's object, when the URI names one.
    pub label: Option<String>,
    /// The URI's `id` bytes (empty without `id=`): each version's CKA_ID is
    /// this followed by `:v` and the decimal version number.
    pub base_id: Vec<u8>,
}

impl KeyName {
    pub(super) fn from_uri(uri: &Pkcs11Uri) -> KeyName {
        KeyName {
            label: uri.object.clone(),
            base_id: uri.id.clone().unwrap_or_default(),
        }
    }

    /// CKA_ID of `version`: base id || `:v` || decimal version.
    pub(super) fn version_id(&self, version: u32) -> Vec<u8> {
        let mut id = self.base_id.clone();
        id.extend_from_slice(b":v");
        id.extend_from_slice(version.to_string().as_bytes());
        id
    }

    /// The version a CKA_ID names, if it is one of this key's: the base id,
    /// `:v`, then a decimal number from 1 without leading zeros.
    pub(super) fn parse_version(&self, id: &[u8]) -> Option<u32> {
        let digits = id
            .strip_prefix(self.base_id.as_slice())?
            .strip_prefix(b":v")?;
        if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    /// The CKA_LABEL of the metadata objects of this key, without the
    /// version number.
    fn meta_prefix(&self) -> String {
        let label = match &self.label {
            Some(l) => hex(l.as_bytes()),
            None => "*".into(),
        };
        format!(
            "phi-envelope kek-meta o={label} i={} v=",
            hex(&self.base_id)
        )
    }

    /// The CKA_LABEL of the metadata object of `version`.
    fn meta_label(&self, version: u32) -> String {
        format!("{}{version}", self.meta_prefix())
    }

    /// The search template of every version object.
    fn key_template(&self) -> Vec<Attribute> {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
        ];
        if let Some(l) = &self.label {
            t.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        t
    }

    /// The attributes a new version object is generated with.
    fn generate_template(&self, version: u32) -> Vec<Attribute> {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Id(self.version_id(version)),
        ];
        if let Some(l) = &self.label {
            t.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        t
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .max(1)
}

/// One version's key object.
#[derive(Clone, Copy, Debug)]
pub(super) struct VersionObject {
    pub version: u32,
    pub handle: ObjectHandle,
    pub encrypt: bool,
    pub decrypt: bool,
}

/// What the metadata data object of a version records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Meta {
    /// Creation time, seconds since the Unix epoch (0: unknown).
    pub created: u64,
    /// GCM encryptions reserved under this version so far (an upper bound
    /// of those performed).
    pub reserved: u64,
    /// Destruction time, seconds since the Unix epoch (0: not destroyed).
    pub destroyed: u64,
}

impl Meta {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(META_LEN);
        v.extend_from_slice(META_MAGIC);
        v.extend_from_slice(&self.created.to_be_bytes());
        v.extend_from_slice(&self.reserved.to_be_bytes());
        v.extend_from_slice(&self.destroyed.to_be_bytes());
        v
    }

    /// Decodes a value; longer values (a later layout) keep their prefix.
    pub(super) fn decode(v: &[u8]) -> Option<Meta> {
        if v.len() < META_LEN || &v[..4] != META_MAGIC {
            return None;
        }
        let u = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        Some(Meta {
            created: u(4),
            reserved: u(12),
            destroyed: u(20),
        })
    }

    /// Merges two records of the same version (left behind by a crash
    /// between writing a new record and removing the old one, or by two
    /// writers): the earliest creation, the most reservations, the
    /// destruction if any.
    pub(super) fn merge(self, o: Meta) -> Meta {
        let created = match (self.created, o.created) {
            (0, c) | (c, 0) => c,
            (a, b) => a.min(b),
        };
        Meta {
            created,
            reserved: self.reserved.max(o.reserved),
            destroyed: self.destroyed.max(o.destroyed),
        }
    }
}

/// The metadata objects of one version, merged.
#[derive(Clone, Debug)]
pub(super) struct MetaRecord {
    pub handles: Vec<ObjectHandle>,
    pub meta: Meta,
}

/// Every version object of `name`.
pub(super) fn find_versions(s: &Session, name: &KeyName) -> Result<Vec<VersionObject>, Fail> {
    let handles = s.find_objects(&name.key_template())?;
    let mut out = Vec::new();
    for h in handles {
        let attrs = match s.get_attributes(
            h,
            &[
                AttributeType::Id,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
            ],
        ) {
            Ok(a) => a,
            // Destroyed between the search and now.
            Err(e) if is_handle_invalid(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        let (mut version, mut encrypt, mut decrypt) = (None, false, false);
        for a in attrs {
            match a {
                Attribute::Id(id) => version = name.parse_version(&id),
                Attribute::Encrypt(b) => encrypt = b,
                Attribute::Decrypt(b) => decrypt = b,
                _ => {}
            }
        }
        if let Some(version) = version {
            out.push(VersionObject {
                version,
                handle: h,
                encrypt,
                decrypt,
            });
        }
    }
    out.sort_by_key(|v| v.version);
    Ok(out)
}

/// The object(s) of one version (normally one; two processes rotating at
/// the same instant can leave two, and both work).
pub(super) fn find_version(
    s: &Session,
    name: &KeyName,
    version: u32,
) -> Result<Vec<ObjectHandle>, Fail> {
    let mut t = name.key_template();
    t.push(Attribute::Id(name.version_id(version)));
    Ok(s.find_objects(&t)?)
}

pub(super) fn is_handle_invalid(e: &cryptoki::error::Error) -> bool {
    use cryptoki::error::RvError;
    matches!(
        super::errors::rv(e),
        Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
    )
}

/// The primary version: the highest whose object may encrypt and decrypt.
pub(super) fn primary(versions: &[VersionObject]) -> Option<&VersionObject> {
    versions
        .iter()
        .filter(|v| v.encrypt && v.decrypt)
        .max_by_key(|v| v.version)
}

fn meta_template(label: Option<&str>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Application(META_APPLICATION.to_vec()),
    ];
    if let Some(l) = label {
        t.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    t
}

fn read_meta_objects(
    s: &Session,
    handles: Vec<ObjectHandle>,
) -> Result<Vec<(ObjectHandle, String, Meta)>, Fail> {
    let mut out = Vec::new();
    for h in handles {
        let attrs = match s.get_attributes(h, &[AttributeType::Label, AttributeType::Value]) {
            Ok(a) => a,
            Err(e) if is_handle_invalid(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        let (mut label, mut meta) = (None, None);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8(l).ok(),
                Attribute::Value(v) => meta = Meta::decode(&v),
                _ => {}
            }
        }
        if let (Some(l), Some(m)) = (label, meta) {
            out.push((h, l, m));
        }
    }
    Ok(out)
}

/// Every version's metadata, merged per version.
pub(super) fn read_metas(s: &Session, name: &KeyName) -> Result<BTreeMap<u32, MetaRecord>, Fail> {
    let prefix = name.meta_prefix();
    let handles = s.find_objects(&meta_template(None))?;
    let mut out: BTreeMap<u32, MetaRecord> = BTreeMap::new();
    for (h, label, meta) in read_meta_objects(s, handles)? {
        let Some(v) = label
            .strip_prefix(&prefix)
            .filter(|d| !d.starts_with('0'))
            .and_then(|d| d.parse::<u32>().ok())
        else {
            continue;
        };
        let rec = out.entry(v).or_insert(MetaRecord {
            handles: Vec::new(),
            meta,
        });
        rec.meta = rec.meta.merge(meta);
        rec.handles.push(h);
    }
    Ok(out)
}

/// One version's metadata, merged.
pub(super) fn read_meta(
    s: &Session,
    name: &KeyName,
    version: u32,
) -> Result<Option<MetaRecord>, Fail> {
    let label = name.meta_label(version);
    let handles = s.find_objects(&meta_template(Some(&label)))?;
    let mut rec: Option<MetaRecord> = None;
    for (h, _, meta) in read_meta_objects(s, handles)? {
        match &mut rec {
            Some(r) => {
                r.meta = r.meta.merge(meta);
                r.handles.push(h);
            }
            None => {
                rec = Some(MetaRecord {
                    handles: vec![h],
                    meta,
                })
            }
        }
    }
    Ok(rec)
}

/// Replaces the metadata of `version` with `meta`: a new object first, then
/// the old ones are destroyed (SoftHSM2 does not let CKA_VALUE of a data
/// object change, and this order never leaves a moment without a record;
/// readers merge any leftovers).
pub(super) fn write_meta(
    s: &Session,
    name: &KeyName,
    version: u32,
    meta: Meta,
    old: &[ObjectHandle],
) -> Result<(), cryptoki::error::Error> {
    let mut t = meta_template(Some(&name.meta_label(version)));
    t.extend([
        Attribute::Private(true),
        Attribute::Modifiable(true),
        Attribute::Value(meta.encode()),
    ]);
    s.create_object(&t)?;
    for h in old {
        // A leftover is harmless (merged on read).
        let _ = s.destroy_object(*h);
    }
    Ok(())
}

/// The error for a version that has no key object: destroyed (a tombstone,
/// a metadata record without its key, or newer versions exist) or never
/// existed.
pub(super) fn missing_version(
    s: &Session,
    key_ref: &str,
    name: &KeyName,
    version: u32,
    token: &str,
) -> Result<Error, Fail> {
    if let Some(rec) = read_meta(s, name, version)? {
        let when = if rec.meta.destroyed != 0 {
            " by phi-envelope"
        } else {
            " (outside phi-envelope: its metadata remains)"
        };
        return Ok(destroyed_error(key_ref, version, when));
    }
    let versions = find_versions(s, name)?;
    if versions.iter().any(|v| v.version > version) {
        return Ok(destroyed_error(
            key_ref,
            version,
            " (it is missing from the token while newer versions exist)",
        ));
    }
    Ok(provider_error(
        K::KeyNotFound,
        format!(
            "{key_ref} version {version} is not on token {token:?}: check the key reference, \
             the token, and that the key was created (create_key)"
        ),
    ))
}

fn destroyed_error(key_ref: &str, version: u32, how: &str) -> Error {
    provider_error(
        K::KeyDestroyed,
        format!(
            "{key_ref} version {version} was destroyed{how}: everything wrapped under it is \
             unreadable for good (crypto-shredding); open such messages through another \
             recipient if they have one"
        ),
    )
}

/// Describes a key from its objects; `None` when nothing of it exists.
pub(super) fn key_info(
    key: &KeyRef,
    versions: &[VersionObject],
    metas: &BTreeMap<u32, MetaRecord>,
) -> Option<KeyInfo> {
    let primary = primary(versions).map(|v| v.version);
    let mut numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
    numbers.extend(metas.keys());
    numbers.sort_unstable();
    numbers.dedup();
    if numbers.is_empty() {
        return None;
    }
    let infos = numbers
        .into_iter()
        .map(|n| {
            let objs: Vec<&VersionObject> = versions.iter().filter(|v| v.version == n).collect();
            let state = if objs.is_empty() {
                KeyState::Destroyed
            } else if objs.iter().all(|o| !o.decrypt) {
                KeyState::Disabled
            } else if primary == Some(n) {
                KeyState::Enabled
            } else {
                KeyState::DecryptOnly
            };
            let created = metas
                .get(&n)
                .map(|m| m.meta.created)
                .filter(|&c| c != 0)
                .map(|c| UNIX_EPOCH + Duration::from_secs(c));
            KeyVersionInfo::new(n, state, created)
        })
        .collect();
    Some(KeyInfo::new(key.clone(), primary, infos))
}

fn key_not_found(key: &KeyRef, token: &str) -> Error {
    provider_error(
        K::KeyNotFound,
        format!(
            "{key} does not exist on token {token:?}: check the key reference and the token, or \
             create the key (create_key)"
        ),
    )
}

/// Describes `key`.
pub(super) fn describe(
    s: &Session,
    key: &KeyRef,
    name: &KeyName,
    token: &str,
) -> Result<KeyInfo, Fail> {
    let versions = find_versions(s, name)?;
    let metas = read_metas(s, name)?;
    key_info(key, &versions, &metas).ok_or_else(|| Fail::NotFound(key_not_found(key, token)))
}

/// Generates the object and the metadata of a new version. On failure
/// nothing of it is left behind (as far as the token lets us).
fn add_version(s: &Session, name: &KeyName, version: u32) -> Result<(), Fail> {
    let handle = s
        .generate_key(&Mechanism::AesKeyGen, &name.generate_template(version))
        .map_err(Fail::Mutating)?;
    let meta = Meta {
        created: now_secs(),
        reserved: 0,
        destroyed: 0,
    };
    if let Err(e) = write_meta(s, name, version, meta, &[]) {
        let _ = s.destroy_object(handle);
        return Err(Fail::Mutating(e));
    }
    Ok(())
}

/// Creates version 1 of a key that does not exist yet.
pub(super) fn create_key(
    s: &Session,
    key: &KeyRef,
    name: &KeyName,
    token: &str,
) -> Result<KeyInfo, Fail> {
    let versions = find_versions(s, name)?;
    let metas = read_metas(s, name)?;
    if let Some(info) = key_info(key, &versions, &metas) {
        return Err(Fail::Done(provider_error(
            K::InvalidState,
            format!(
                "{key} already exists on token {token:?} ({} version(s)): rotate it to get a new \
                 version",
                info.versions.len()
            ),
        )));
    }
    add_version(s, name, 1)?;
    describe(s, key, name, token)
}

/// Adds a new primary version; the previous ones become decrypt-only.
pub(super) fn rotate(
    s: &Session,
    key: &KeyRef,
    name: &KeyName,
    token: &str,
) -> Result<KeyInfo, Fail> {
    let versions = find_versions(s, name)?;
    let metas = read_metas(s, name)?;
    let highest = versions
        .iter()
        .map(|v| v.version)
        .chain(metas.keys().copied())
        .max()
        .ok_or_else(|| Fail::NotFound(key_not_found(key, token)))?;
    // Destroyed versions keep their numbers: a number is never reused.
    let next = highest.checked_add(1).ok_or_else(|| {
        Fail::Done(provider_error(
            K::LimitReached,
            format!("{key} has no version numbers left: create a new key"),
        ))
    })?;
    // A failure here leaves the old primary as it was.
    add_version(s, name, next)?;
    // The new version is the primary from now on (the highest enabled one);
    // clearing CKA_ENCRYPT on the older ones makes the token enforce it. A
    // failure here is harmless: only the primary is ever used to wrap.
    for v in versions.iter().filter(|v| v.encrypt) {
        let _ = s.update_attributes(v.handle, &[Attribute::Encrypt(false)]);
    }
    describe(s, key, name, token)
}

/// Moves `version` to `state` (not `Destroyed`).
pub(super) fn set_state(
    s: &Session,
    key: &KeyRef,
    name: &KeyName,
    token: &str,
    version: u32,
    state: KeyState,
) -> Result<KeyInfo, Fail> {
    let versions = find_versions(s, name)?;
    let objs: Vec<&VersionObject> = versions.iter().filter(|v| v.version == version).collect();
    if objs.is_empty() {
        let err = missing_version(s, key.as_str(), name, version, token)?;
        return Err(match &err {
            Error::Provider(p) if p.kind() == K::KeyDestroyed => Fail::Done(provider_error(
                K::KeyDestroyed,
                format!("{key} version {version} was destroyed; a destroyed version cannot change state"),
            )),
            _ => Fail::NotFound(err),
        });
    }
    let attrs = match state {
        // Enabling a version makes it the primary: it is enabled first (so
        // that some version stays primary whatever fails), then every other
        // version loses CKA_ENCRYPT.
        KeyState::Enabled => [Attribute::Encrypt(true), Attribute::Decrypt(true)],
        KeyState::DecryptOnly => [Attribute::Encrypt(false), Attribute::Decrypt(true)],
        KeyState::Disabled => [Attribute::Encrypt(false), Attribute::Decrypt(false)],
        KeyState::Destroyed => {
            return Err(Fail::Done(provider_error(
                K::InvalidState,
                format!(
                    "{key} version {version}: set_state cannot destroy; use destroy, which \
                     destroys the key object"
                ),
            )))
        }
    };
    for o in objs {
        s.update_attributes(o.handle, &attrs)
            .map_err(Fail::Mutating)?;
    }
    if state == KeyState::Enabled {
        for o in versions
            .iter()
            .filter(|v| v.version != version && v.encrypt)
        {
            s.update_attributes(o.handle, &[Attribute::Encrypt(false)])
                .map_err(Fail::Mutating)?;
        }
    }
    describe(s, key, name, token)
}

/// Destroys `version`: records a tombstone, then destroys the object(s).
pub(super) fn destroy(
    s: &Session,
    key: &KeyRef,
    name: &KeyName,
    token: &str,
    version: u32,
) -> Result<KeyInfo, Fail> {
    let versions = find_versions(s, name)?;
    let objs: Vec<&VersionObject> = versions.iter().filter(|v| v.version == version).collect();
    let old = read_meta(s, name, version)?;
    if objs.is_empty() {
        // Already destroyed (idempotent), or never existed.
        let known = old.is_some() || versions.iter().any(|v| v.version > version);
        if !known {
            return Err(Fail::NotFound(missing_version(
                s,
                key.as_str(),
                name,
                version,
                token,
            )?));
        }
        if old.as_ref().is_none_or(|r| r.meta.destroyed == 0) {
            let (handles, mut meta) = old.map(|r| (r.handles, r.meta)).unwrap_or_default();
            meta.destroyed = now_secs();
            write_meta(s, name, version, meta, &handles).map_err(Fail::Mutating)?;
        }
        return describe(s, key, name, token);
    }
    if primary(&versions).map(|p| p.version) == Some(version) {
        return Err(Fail::Done(provider_error(
            K::InvalidState,
            format!(
                "{key} version {version} is the primary: rotate first (or make it decrypt-only \
                 or disabled), then destroy it"
            ),
        )));
    }
    // The tombstone first: once the object is gone, the record that it was
    // destroyed on purpose is already there.
    let (handles, mut meta) = old.map(|r| (r.handles, r.meta)).unwrap_or_default();
    if meta.destroyed == 0 {
        meta.destroyed = now_secs();
    }
    write_meta(s, name, version, meta, &handles).map_err(Fail::Mutating)?;
    for o in objs {
        match s.destroy_object(o.handle) {
            Ok(()) => {}
            Err(e) if is_handle_invalid(&e) => {}
            Err(e) => return Err(Fail::Mutating(e)),
        }
    }
    describe(s, key, name, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(label: Option<&str>, id: &[u8]) -> KeyName {
        KeyName {
            label: label.map(str::to_owned),
            base_id: id.to_vec(),
        }
    }

    #[test]
    fn version_ids_round_trip_and_reject_others() {
        let n = name(Some("k"), b"");
        assert_eq!(n.version_id(1), b":v1");
        assert_eq!(n.parse_version(b":v1"), Some(1));
        assert_eq!(n.parse_version(b":v4294967295"), Some(u32::MAX));
        for bad in [
            &b":v"[..],
            b":v0",
            b":v01",
            b":v1a",
            b"v1",
            b":v4294967296",
            b"x:v1",
        ] {
            assert_eq!(n.parse_version(bad), None, "{bad:?}");
        }
        let n = name(None, &[1, 2]);
        assert_eq!(n.version_id(12), [1, 2, b':', b'v', b'1', b'2']);
        assert_eq!(n.parse_version(&[1, 2, b':', b'v', b'7']), Some(7));
        assert_eq!(n.parse_version(&[1, b':', b'v', b'7']), None);
        // Another key whose id extends this one's is not mistaken for it.
        let other = name(None, b"\x01\x02:v1");
        assert_eq!(n.parse_version(&other.version_id(3)), None);
    }

    #[test]
    fn meta_labels_separate_keys() {
        assert_ne!(
            name(Some("a"), b"").meta_label(1),
            name(None, b"").meta_label(1)
        );
        assert_ne!(
            name(Some("a"), b"").meta_label(1),
            name(Some("a"), b"\0").meta_label(1)
        );
        assert_eq!(
            name(Some("k"), b"\x01").meta_label(3),
            "phi-envelope kek-meta o=6b i=01 v=3"
        );
    }

    #[test]
    fn meta_encoding_and_merge() {
        let m = Meta {
            created: 10,
            reserved: 4096,
            destroyed: 0,
        };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        let mut longer = m.encode();
        longer.push(0);
        assert_eq!(Meta::decode(&longer), Some(m));
        assert_eq!(Meta::decode(&m.encode()[..27]), None);
        assert_eq!(Meta::decode(b"XXXXaaaaaaaaaaaaaaaaaaaaaaaa"), None);
        let n = Meta {
            created: 5,
            reserved: 100,
            destroyed: 7,
        };
        assert_eq!(
            m.merge(n),
            Meta {
                created: 5,
                reserved: 4096,
                destroyed: 7
            }
        );
        assert_eq!(Meta::default().merge(m).created, 10);
    }
}
