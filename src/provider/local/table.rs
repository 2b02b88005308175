//! The key table: keys, versions, states and key bytes, with the lifecycle
//! state machine. Pure data and rules; no I/O, no format.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::hex;
use crate::error::{Error, Result};
use crate::provider::{
    KeyInfo, KeyRef, KeyState, KeyVersionInfo, ProviderError, ProviderErrorKind,
};

/// Most keys one keystore holds.
pub const MAX_KEYS: usize = 1024;
/// Most versions (destroyed ones included) one key has.
pub const MAX_VERSIONS: usize = 1024;

/// The 32 bytes of one KEK version, zeroized on drop.
pub(super) type KekBytes = Zeroizing<[u8; 32]>;

/// One version of a key.
#[derive(Clone)]
pub(super) struct VersionEntry {
    pub version: u32,
    pub state: KeyState,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// `None` exactly when the state is `Destroyed` (the tombstone).
    pub key: Option<KekBytes>,
}

/// Every key of a keystore, by name; versions ascending; and the table's
/// generation.
#[derive(Clone, Default)]
pub(super) struct Table {
    /// Raised by one on every write of the file (format version 2; 0 for a
    /// table read from a version-1 file). A reader refuses a table whose
    /// generation is lower than one it has seen: a rolled-back file.
    pub generation: u64,
    keys: BTreeMap<String, Vec<VersionEntry>>,
}

pub(super) fn provider_error(kind: ProviderErrorKind, message: impl Into<String>) -> Error {
    ProviderError::new(super::PROVIDER_ID, kind, message).into()
}

fn key_text(name: &str) -> String {
    format!("local:{name}")
}

fn not_found(name: &str) -> Error {
    provider_error(
        ProviderErrorKind::KeyNotFound,
        format!(
            "no key {} in this keystore; create it first (LocalKeystore::add_key or create_key)",
            key_text(name)
        ),
    )
}

impl Table {
    /// The versions of `name`, if the key exists.
    pub fn versions(&self, name: &str) -> Option<&[VersionEntry]> {
        self.keys.get(name).map(Vec::as_slice)
    }

    /// The key names and their versions, names ascending.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[VersionEntry])> {
        self.keys.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The primary (enabled) version of `name`, with its bytes.
    pub fn primary(&self, name: &str) -> Result<(u32, &[u8; 32])> {
        let versions = self.keys.get(name).ok_or_else(|| not_found(name))?;
        let primary = versions.iter().find(|v| v.state == KeyState::Enabled);
        match primary {
            Some(VersionEntry {
                version,
                key: Some(bytes),
                ..
            }) => Ok((*version, bytes)),
            _ => Err(provider_error(
                ProviderErrorKind::KeyDisabled,
                format!(
                    "key {} has no enabled (primary) version to encrypt with; rotate it or enable a version",
                    key_text(name)
                ),
            )),
        }
    }

    /// What a caller may know of `name`.
    pub fn info(&self, name: &str) -> Result<KeyInfo> {
        let versions = self.keys.get(name).ok_or_else(|| not_found(name))?;
        Ok(info_of(name, versions))
    }

    /// Every key's info, names ascending.
    pub fn infos(&self) -> Vec<KeyInfo> {
        self.keys.iter().map(|(n, v)| info_of(n, v)).collect()
    }

    /// Adds `name` with version 1 enabled.
    pub fn create_key(&mut self, name: &str, now: u64, key: KekBytes) -> Result<KeyInfo> {
        if self.keys.contains_key(name) {
            return Err(provider_error(
                ProviderErrorKind::InvalidState,
                format!(
                    "key {} already exists; rotate it to get a new version",
                    key_text(name)
                ),
            ));
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(provider_error(
                ProviderErrorKind::LimitReached,
                format!(
                    "a local keystore holds at most {MAX_KEYS} keys; use another keystore file"
                ),
            ));
        }
        self.keys.insert(
            name.to_owned(),
            vec![VersionEntry {
                version: 1,
                state: KeyState::Enabled,
                created_at: now,
                key: Some(key),
            }],
        );
        self.info(name)
    }

    /// Adds a new version of `name`, enabled and primary; the old primary,
    /// if any, becomes decrypt-only.
    pub fn rotate(&mut self, name: &str, now: u64, key: KekBytes) -> Result<KeyInfo> {
        let versions = self.keys.get_mut(name).ok_or_else(|| not_found(name))?;
        if versions.len() >= MAX_VERSIONS {
            return Err(provider_error(
                ProviderErrorKind::LimitReached,
                format!(
                    "key {} has {MAX_VERSIONS} versions, the most a local key may have; create a new key",
                    key_text(name)
                ),
            ));
        }
        let next = versions
            .last()
            .map_or(Some(1), |v| v.version.checked_add(1))
            .ok_or_else(|| {
                provider_error(
                    ProviderErrorKind::LimitReached,
                    "key version numbers are exhausted",
                )
            })?;
        for v in versions.iter_mut() {
            if v.state == KeyState::Enabled {
                v.state = KeyState::DecryptOnly;
            }
        }
        versions.push(VersionEntry {
            version: next,
            state: KeyState::Enabled,
            created_at: now,
            key: Some(key),
        });
        self.info(name)
    }

    /// Moves `version` of `name` to `target`; see the module docs of
    /// [`super`] for the rules. Returns `false` when nothing changed.
    pub fn set_state(&mut self, name: &str, version: u32, target: KeyState) -> Result<bool> {
        let versions = self.keys.get_mut(name).ok_or_else(|| not_found(name))?;
        let idx = find_version(versions, name, version)?;
        let current = versions[idx].state;
        let this = format!("key {} version {version}", key_text(name));
        if target == KeyState::Destroyed {
            return Err(provider_error(
                ProviderErrorKind::InvalidState,
                format!(
                    "{this}: set_state cannot destroy; use destroy, which erases the key bytes"
                ),
            ));
        }
        if current == KeyState::Destroyed {
            return Err(provider_error(
                ProviderErrorKind::KeyDestroyed,
                format!("{this} was destroyed; a destroyed version cannot change state"),
            ));
        }
        if current == target {
            return Ok(false);
        }
        if target == KeyState::Enabled {
            // Enabling a version makes it the primary: at most one version
            // is ever enabled.
            for v in versions.iter_mut() {
                if v.state == KeyState::Enabled {
                    v.state = KeyState::DecryptOnly;
                }
            }
        }
        versions[idx].state = target;
        Ok(true)
    }

    /// Erases the bytes of `version` of `name`, keeping a tombstone. Returns
    /// `false` when it was already destroyed.
    pub fn destroy(&mut self, name: &str, version: u32) -> Result<bool> {
        let versions = self.keys.get_mut(name).ok_or_else(|| not_found(name))?;
        let idx = find_version(versions, name, version)?;
        let entry = &mut versions[idx];
        match entry.state {
            KeyState::Destroyed => Ok(false),
            KeyState::Enabled => Err(provider_error(
                ProviderErrorKind::InvalidState,
                format!(
                    "key {} version {version} is the primary version; rotate the key (or set the version decrypt-only or disabled) before destroying it",
                    key_text(name)
                ),
            )),
            _ => {
                entry.state = KeyState::Destroyed;
                // Dropping the `Zeroizing` wipes the bytes.
                entry.key = None;
                Ok(true)
            }
        }
    }
}

fn find_version(versions: &[VersionEntry], name: &str, version: u32) -> Result<usize> {
    versions
        .iter()
        .position(|v| v.version == version)
        .ok_or_else(|| {
            provider_error(
                ProviderErrorKind::KeyNotFound,
                format!("key {} has no version {version}", key_text(name)),
            )
        })
}

fn info_of(name: &str, versions: &[VersionEntry]) -> KeyInfo {
    let key_ref =
        KeyRef::parse(&key_text(name)).expect("names are validated when loaded or created");
    let primary = versions
        .iter()
        .find(|v| v.state == KeyState::Enabled)
        .map(|v| v.version);
    let versions = versions
        .iter()
        .map(|v| {
            KeyVersionInfo::new(
                v.version,
                v.state,
                Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(v.created_at)),
            )
        })
        .collect();
    KeyInfo::new(key_ref, primary, versions)
}

// ---------------------------------------------------------------------------
// Serialization: the JSON text that is sealed inside the keystore file.
// ---------------------------------------------------------------------------

/// `"enabled"`, `"decrypt-only"`, `"disabled"`, `"destroyed"`.
fn state_from_str(s: &str) -> Option<KeyState> {
    [
        KeyState::Enabled,
        KeyState::DecryptOnly,
        KeyState::Disabled,
        KeyState::Destroyed,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

/// Key bytes as 64 lowercase hex digits; decoded straight into a zeroizing
/// array from the (zeroizing) plaintext buffer, no intermediate copy.
struct KeyHex(KekBytes);

impl<'de> Deserialize<'de> for KeyHex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyHex;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 lowercase hex digits")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyHex, E> {
                let mut key = Zeroizing::new([0u8; 32]);
                if hex::decode_into(s.as_bytes(), &mut key[..]) {
                    Ok(KeyHex(key))
                } else {
                    // Never echo the value: it is key material.
                    Err(E::custom("key is not 64 lowercase hex digits"))
                }
            }
        }
        d.deserialize_str(V)
    }
}

struct KeyHexRef<'a>(&'a [u8; 32]);

impl Serialize for KeyHexRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Zeroizing::new([0u8; 64]);
        hex::encode_into(self.0, &mut buf[..]);
        s.serialize_str(std::str::from_utf8(&buf[..]).expect("hex is ASCII"))
    }
}

/// A sequence of at most `N` elements; longer input fails before more than
/// `N` elements are allocated.
struct Bounded<T, const N: usize>(Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Bounded<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {N} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N).min(64));
                while let Some(x) = seq.next_element()? {
                    if out.len() == N {
                        return Err(de::Error::custom(format!("more than {N} elements")));
                    }
                    out.push(x);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(V::<T, N>(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableIn {
    #[serde(default)]
    generation: Option<u64>,
    keys: Bounded<KeyIn, MAX_KEYS>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyIn {
    name: String,
    versions: Bounded<VersionIn, MAX_VERSIONS>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionIn {
    version: u32,
    state: String,
    created_at: u64,
    #[serde(default)]
    key: Option<KeyHex>,
}

#[derive(Serialize)]
struct TableOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    keys: Vec<KeyOut<'a>>,
}

#[derive(Serialize)]
struct KeyOut<'a> {
    name: &'a str,
    versions: Vec<VersionOut<'a>>,
}

#[derive(Serialize)]
struct VersionOut<'a> {
    version: u32,
    state: &'static str,
    created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<KeyHexRef<'a>>,
}

impl Table {
    /// The table as JSON (format version 2), in a zeroizing buffer sized
    /// up front so that it never reallocates (which would leave copies of
    /// key bytes behind).
    #[cfg(test)]
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        self.to_json_for(super::file::FORMAT_VERSION)
    }

    /// The table as JSON for a file of format `version`: version 1 has no
    /// generation member.
    pub fn to_json_for(&self, version: u32) -> Zeroizing<Vec<u8>> {
        let out = TableOut {
            generation: (version >= 2).then_some(self.generation),
            keys: self
                .keys
                .iter()
                .map(|(name, versions)| KeyOut {
                    name,
                    versions: versions
                        .iter()
                        .map(|v| VersionOut {
                            version: v.version,
                            state: v.state.as_str(),
                            created_at: v.created_at,
                            key: v.key.as_deref().map(KeyHexRef),
                        })
                        .collect(),
                })
                .collect(),
        };
        // {"name":"..","versions":[..]} and per version at most
        // {"version":4294967295,"state":"decrypt-only","created_at":18446744073709551615,"key":"<64>"},
        let estimate = 48
            + self
                .keys
                .iter()
                .map(|(n, v)| 32 + n.len() + v.len() * 160)
                .sum::<usize>();
        let mut buf = Zeroizing::new(Vec::with_capacity(estimate));
        serde_json::to_writer(&mut *buf, &out).expect("serializing the key table cannot fail");
        buf
    }

    /// Parses and checks the table of a file of format `version`: version
    /// 1 has no generation (read as 0), version 2 must have one, at least
    /// 1. The error says what is wrong without echoing any value.
    pub fn from_json(bytes: &[u8], version: u32) -> std::result::Result<Table, String> {
        let parsed: TableIn = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "the key table does not parse (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let generation = match (version, parsed.generation) {
            (1, None) => 0,
            (1, Some(_)) => return Err("a version-1 table has a generation".into()),
            (_, Some(g)) if g >= 1 => g,
            (_, _) => return Err("the table has no valid generation".into()),
        };
        let mut keys = BTreeMap::new();
        for k in parsed.keys.0 {
            let name = k.name;
            if KeyRef::parse(&key_text(&name)).is_err() {
                return Err("a key name is invalid".into());
            }
            let mut versions: Vec<VersionEntry> = Vec::with_capacity(k.versions.0.len());
            let mut enabled = 0;
            for v in k.versions.0 {
                let state =
                    state_from_str(&v.state).ok_or_else(|| format!("key {name}: unknown state"))?;
                if v.version == 0 || versions.last().is_some_and(|p| p.version >= v.version) {
                    return Err(format!("key {name}: versions are not ascending from 1"));
                }
                if (state == KeyState::Destroyed) != v.key.is_none() {
                    return Err(format!(
                        "key {name} version {}: key bytes must be present exactly when not destroyed",
                        v.version
                    ));
                }
                if state == KeyState::Enabled {
                    enabled += 1;
                }
                versions.push(VersionEntry {
                    version: v.version,
                    state,
                    created_at: v.created_at,
                    key: v.key.map(|k| k.0),
                });
            }
            if versions.is_empty() {
                return Err(format!("key {name} has no versions"));
            }
            if enabled > 1 {
                return Err(format!("key {name} has more than one enabled version"));
            }
            if keys.insert(name.clone(), versions).is_some() {
                return Err(format!("key {name} appears twice"));
            }
        }
        Ok(Table { generation, keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kb(b: u8) -> KekBytes {
        Zeroizing::new([b; 32])
    }

    fn states(t: &Table, name: &str) -> Vec<(u32, KeyState)> {
        t.versions(name)
            .unwrap()
            .iter()
            .map(|v| (v.version, v.state))
            .collect()
    }

    #[test]
    fn rotate_and_state_machine() {
        use KeyState::*;
        let mut t = Table::default();
        t.create_key("k", 1, kb(1)).unwrap();
        assert!(t.create_key("k", 1, kb(1)).is_err());
        t.rotate("k", 2, kb(2)).unwrap();
        assert_eq!(states(&t, "k"), [(1, DecryptOnly), (2, Enabled)]);
        assert_eq!(t.primary("k").unwrap().0, 2);

        // Enabling an old version makes it primary.
        assert!(t.set_state("k", 1, Enabled).unwrap());
        assert_eq!(states(&t, "k"), [(1, Enabled), (2, DecryptOnly)]);
        assert!(!t.set_state("k", 1, Enabled).unwrap());
        // Demoting the primary leaves none.
        t.set_state("k", 1, DecryptOnly).unwrap();
        assert!(t.primary("k").is_err());
        assert_eq!(t.info("k").unwrap().primary_version, None);
        t.set_state("k", 2, Disabled).unwrap();
        assert!(t.set_state("k", 2, Destroyed).is_err());
        assert!(t.set_state("k", 9, Disabled).is_err());

        // Destroy: not the primary, idempotent, final.
        t.set_state("k", 2, Enabled).unwrap();
        assert!(t.destroy("k", 2).is_err());
        assert!(t.destroy("k", 1).unwrap());
        assert!(!t.destroy("k", 1).unwrap());
        assert!(t.set_state("k", 1, DecryptOnly).is_err());
        assert!(t.set_state("k", 1, Enabled).is_err());
        assert!(t.versions("k").unwrap()[0].key.is_none());
    }

    #[test]
    fn json_round_trip_and_checks() {
        let mut t = Table::default();
        t.create_key("a", 10, kb(0xab)).unwrap();
        t.rotate("a", 11, kb(0xcd)).unwrap();
        t.destroy("a", 1).unwrap();
        t.create_key("b", 12, kb(0x01)).unwrap();
        let json = t.to_json();
        let text = std::str::from_utf8(&json).unwrap();
        assert!(!text.contains(&"ab".repeat(32)), "destroyed bytes gone");
        assert!(text.contains(&"cd".repeat(32)));
        t.generation = 7;
        let json = t.to_json();
        assert!(json.starts_with(b"{\"generation\":7,\"keys\":["));
        let back = Table::from_json(&json, 2).unwrap();
        assert_eq!(back.to_json().as_slice(), json.as_slice());
        assert_eq!(back.generation, 7);
        // Version 1 has no generation; version 2 needs one.
        let v1 = br#"{"keys":[]}"#;
        assert_eq!(Table::from_json(v1, 1).unwrap().generation, 0);
        assert!(Table::from_json(v1, 2).is_err());
        assert!(Table::from_json(br#"{"generation":0,"keys":[]}"#, 2).is_err());
        assert!(Table::from_json(br#"{"generation":3,"keys":[]}"#, 1).is_err());

        for bad in [
            r#"{"keys":[{"name":"a","versions":[]}]}"#,
            r#"{"keys":[{"name":"a b","versions":[{"version":1,"state":"destroyed","created_at":0}]}]}"#,
            r#"{"keys":[{"name":"a","versions":[{"version":1,"state":"enabled","created_at":0}]}]}"#,
            r#"{"keys":[{"name":"a","versions":[{"version":1,"state":"bogus","created_at":0}]}]}"#,
            r#"{"keys":[{"name":"a","versions":[{"version":2,"state":"destroyed","created_at":0},{"version":1,"state":"destroyed","created_at":0}]}]}"#,
            r#"{"keys":[],"extra":1}"#,
        ] {
            assert!(Table::from_json(bad.as_bytes(), 1).is_err(), "{bad}");
        }
        let secret = format!(
            r#"{{"keys":[{{"name":"a","versions":[{{"version":1,"state":"enabled","created_at":0,"key":"{}"}}]}}]}}"#,
            "AB".repeat(32)
        );
        let err = Table::from_json(secret.as_bytes(), 1).err().unwrap();
        assert!(
            !err.contains("ABAB"),
            "errors never echo key material: {err}"
        );
    }

    #[test]
    fn too_many_keys_is_refused_while_parsing() {
        let one = r#"{"name":"k","versions":[{"version":1,"state":"destroyed","created_at":0}]}"#;
        let many = vec![one; MAX_KEYS + 1].join(",");
        let err = Table::from_json(format!(r#"{{"keys":[{many}]}}"#).as_bytes(), 1)
            .err()
            .unwrap();
        assert!(err.contains("does not parse"), "{err}");
    }
}
