//! The encryption context and its canonical encoding.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};

/// Most key/value pairs an encryption context may hold.
pub const MAX_CONTEXT_PAIRS: usize = 64;
/// Longest context key, in bytes of UTF-8.
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
/// Longest context value, in bytes of UTF-8.
pub const MAX_CONTEXT_VALUE_LEN: usize = 4096;
/// Largest canonical encoding of a whole context, in bytes.
pub const MAX_CONTEXT_ENCODED_LEN: usize = 65536;

/// The caller's encryption context: key/value pairs (tenant, record type,
/// record id, ...) that are bound to a message and must be presented again to
/// decrypt it.
///
/// The context is never stored in a message: values such as a record id can
/// themselves be PHI. It is bound into the body's key derivation through a
/// canonical, injective encoding (see `docs/FORMAT.md`), and passed to key
/// providers that can bind it to the wrapped key.
///
/// `Debug` prints the keys only, never the values.
///
/// ```
/// use phi_envelope::EncryptionContext;
/// let ctx = EncryptionContext::new()
///     .with("tenant", "st-mary")?
///     .with("record_type", "lab-result")?;
/// assert_eq!(ctx.get("tenant"), Some("st-mary"));
/// assert!(ctx.clone().with("tenant", "other").is_err()); // duplicate key
/// # Ok::<(), phi_envelope::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext {
    pairs: BTreeMap<String, String>,
}

impl EncryptionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pair; a duplicate key, an empty key or a size over the bounds
    /// is an error.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Result<()> {
        let key = key.into();
        let value = value.into();
        if key.is_empty() {
            return Err(Error::InvalidContext("empty key"));
        }
        if key.len() > MAX_CONTEXT_KEY_LEN {
            return Err(Error::InvalidContext("key longer than 256 bytes"));
        }
        if value.len() > MAX_CONTEXT_VALUE_LEN {
            return Err(Error::InvalidContext("value longer than 4096 bytes"));
        }
        if self.pairs.len() >= MAX_CONTEXT_PAIRS {
            return Err(Error::InvalidContext("more than 64 pairs"));
        }
        if self.pairs.contains_key(&key) {
            return Err(Error::InvalidContext("duplicate key"));
        }
        if self.encoded_len() + 2 + key.len() + 2 + value.len() > MAX_CONTEXT_ENCODED_LEN {
            return Err(Error::InvalidContext("encoding larger than 65536 bytes"));
        }
        self.pairs.insert(key, value);
        Ok(())
    }

    /// Builder form of [`insert`](Self::insert).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Result<Self> {
        self.insert(key, value)?;
        Ok(self)
    }

    /// Builds a context from pairs; duplicates are an error.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut ctx = Self::new();
        for (k, v) in pairs {
            ctx.insert(k, v)?;
        }
        Ok(ctx)
    }

    /// The value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.get(key).map(String::as_str)
    }

    /// The pairs in canonical (bytewise ascending key) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// True when the context has no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Length of [`canonical_pairs`](Self::canonical_pairs).
    fn encoded_len(&self) -> usize {
        2 + self
            .pairs
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>()
    }

    /// The canonical, injective encoding of the pairs: `u16 count`, then for
    /// each pair in ascending bytewise key order `u16 key length || key ||
    /// u16 value length || value`, all integers big-endian.
    ///
    /// `String`'s `Ord` is bytewise on UTF-8, so the map's order is the
    /// canonical order.
    pub fn canonical_pairs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write_canonical_pairs(&mut out);
        out
    }

    pub(crate) fn write_canonical_pairs(&self, out: &mut Vec<u8>) {
        // Bounds are enforced by `insert`, so the casts cannot truncate.
        out.extend_from_slice(&(self.pairs.len() as u16).to_be_bytes());
        for (k, v) in &self.pairs {
            out.extend_from_slice(&(k.len() as u16).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
}

impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionContext")
            .field("keys", &self.pairs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_sorted_and_length_prefixed() {
        let ctx = EncryptionContext::from_pairs([("b", "2"), ("a", "")]).unwrap();
        assert_eq!(
            ctx.canonical_pairs(),
            [0, 2, 0, 1, b'a', 0, 0, 0, 1, b'b', 0, 1, b'2']
        );
        assert_eq!(EncryptionContext::new().canonical_pairs(), [0, 0]);
    }

    #[test]
    fn encoding_is_injective_on_tricky_pairs() {
        let a = EncryptionContext::from_pairs([("ab", "c")]).unwrap();
        let b = EncryptionContext::from_pairs([("a", "bc")]).unwrap();
        assert_ne!(a.canonical_pairs(), b.canonical_pairs());
    }

    #[test]
    fn bounds_and_duplicates_are_rejected() {
        assert!(EncryptionContext::from_pairs([("a", "1"), ("a", "2")]).is_err());
        assert!(EncryptionContext::from_pairs([("", "1")]).is_err());
        assert!(EncryptionContext::from_pairs([("k".repeat(257), "1")]).is_err());
        assert!(EncryptionContext::from_pairs([("k", "v".repeat(4097))]).is_err());
        let many = (0..65).map(|i| (format!("k{i}"), String::new()));
        assert!(EncryptionContext::from_pairs(many).is_err());
    }

    #[test]
    fn debug_hides_values() {
        let ctx = EncryptionContext::from_pairs([("patient", "Jane Roe 1970-01-01")]).unwrap();
        let s = format!("{ctx:?}");
        assert!(s.contains("patient"));
        assert!(!s.contains("Jane"));
    }
}
