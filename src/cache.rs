//! The data-key cache: fewer provider round trips, within limits.
//!
//! Without a cache every sealed record costs one provider call (generate a
//! DEK under the primary KEK) and every opened record one more (unwrap). A
//! [`Keyring`](crate::Keyring) built with
//! [`data_key_cache`](crate::keyring::KeyringBuilder::data_key_cache) keeps
//! two bounded caches:
//!
//! - **Encryption**: a [`SealingKey`] (a DEK's HKDF state and its tagged
//!   header, computed once) serves many records. Each record still gets its
//!   own AES key and nonce: the body's random 24-byte salt goes into the HKDF
//!   that derives them. An entry is shared only by requests with the same
//!   recipients (in order), the same caller actor, the same optional
//!   caller-chosen partition
//!   ([`Envelope::with_cache_partition`](crate::Envelope::with_cache_partition))
//!   and the same encryption context: providers bind the context to the
//!   wrapped key (KMS encryption context, GCM AAD), so a DEK wrapped for one
//!   context must never be reused under another: a provider-side access rule
//!   on the context would otherwise be bypassed, and the header would not
//!   unwrap. Associated data
//!   ([`Envelope::seal_with`](crate::Envelope::seal_with)) is not part of
//!   the entry's key: records that differ only in it (one record id each)
//!   share an entry, and each still opens only with its own.
//!   Streams ([`Envelope::encryptor`](crate::Envelope::encryptor))
//!   always get a fresh DEK: their length is unknown up front.
//! - **Decryption**: an [`OpeningKey`] is cached under the exact header
//!   bytes and encryption context it was made for. Making it verified the
//!   header tag under the DEK, so a cached key is only ever reused for a
//!   header whose tag it already verified. Only whole records
//!   ([`Envelope::open`](crate::Envelope::open),
//!   [`Envelope::open_with`](crate::Envelope::open_with)) use it; the
//!   associated data is not part of its key either.
//!
//! Every entry is bounded by [`CacheLimits`] (age, messages, bytes), and the
//! cryptoperiod of its KEK's primary version when a
//! [`KeyPolicy`](crate::keyring::KeyPolicy) sets one; each cache holds at
//! most [`CacheConfig::capacity`] entries and evicts the least recently used.
//! On every cache hit the [policy hook](crate::policy::Policy) is consulted
//! (operation [`CacheHitEncrypt`](crate::events::Operation::CacheHitEncrypt)
//! or [`CacheHitDecrypt`](crate::events::Operation::CacheHitDecrypt)) and an
//! event is recorded, exactly as for a provider call. Concurrent misses of
//! the same entry are coalesced ("single flight"): one task calls the
//! provider, the others wait for its result without holding any lock.
//!
//! Rotating, disabling or destroying a key through the keyring flushes every
//! entry that involves the key, and a key unwrapped by a call that started
//! before the flush is not cached afterwards. "The key" is its identity,
//! whatever it is called ([`KeyIdentity`]):
//! each entry remembers its recipients and header entries with the
//! identities their provider reported, and a flush removes every entry that
//! shares the spelling or the identity (a KMS key destroyed by its ARN
//! takes the entries sealed to its alias). Where an identity is unknown, a
//! flush removes every entry of that provider. A change made elsewhere (by
//! another process, in the HSM console, in KMS) is not seen: an entry lives
//! at most [`CacheLimits::max_age`], so keep that short, or call
//! [`Keyring::flush_cache`](crate::Keyring::flush_cache).
//!
//! What "zeroized on eviction" means here: the cache never holds a [`Dek`]
//! (it is zeroized as soon as the keys are derived). It holds the derived
//! key state inside [`SealingKey`] and [`OpeningKey`]; an evicted entry is
//! dropped as soon as the last message using it is done ([`CacheStats`]
//! counts the releases, so tests can prove that nothing else holds them).
//! That state lives in `ring` HMAC contexts, which `ring` frees without
//! overwriting; see `docs/KEY-LIFECYCLE.md`.
//!
//! [`Dek`]: crate::Dek
//!
//! ```
//! # async fn demo() -> phi_envelope::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use phi_envelope::cache::{CacheConfig, CacheLimits};
//! use phi_envelope::provider::local::LocalKeystore;
//! use phi_envelope::{EncryptionContext, Envelope, KeyRef, Keyring};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("keys.json"))?;
//! let key: KeyRef = "local:records".parse()?;
//! store.add_key(&key)?;
//! let keyring = Keyring::builder()
//!     .provider(Arc::new(store))
//!     .recipient(key)
//!     .data_key_cache(
//!         CacheConfig::new()
//!             .encrypt(CacheLimits::new(Duration::from_secs(60), 10_000, 64 << 20))
//!             .decrypt(CacheLimits::new(Duration::from_secs(60), 10_000, 64 << 20)),
//!     )
//!     .build()?;
//! let envelope = Envelope::new(keyring).as_caller("lab-service", "store-result");
//!
//! let ctx = EncryptionContext::new().with("tenant", "st-mary")?;
//! for i in 0..100 {
//!     let sealed = envelope.seal(format!("result {i}").as_bytes(), &ctx).await?;
//!     envelope.open(&sealed, &ctx).await?;
//! }
//! let stats = envelope.keyring().cache_stats();
//! // One generate and one unwrap; every other use hit a cache.
//! assert_eq!(stats.provider_calls, 2);
//! assert_eq!(stats.encrypt_hits, 99);
//! assert_eq!(stats.decrypt_hits, 99);
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! Why one file of this size: the two data-key caches (sealing and opening)
//! share one entry type, one take and one put, one flush by key identity and
//! the single-flight lookup, and their invariants (limits, epochs, flush
//! order) are checked in one place; about 190 lines are its unit tests.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroize;

use crate::error::Result;
use crate::message::{OpeningKey, SealingKey};
use crate::provider::{KeyIdentity, KeyRef};

/// The limits of one cache entry: it is retired at the first one reached.
///
/// The defaults (five minutes, 2^20 messages, 64 GiB) keep the blast radius
/// of one DEK small while amortising provider calls over many records. The
/// format itself needs no limit: every message derives its own AES key and
/// nonce from a fresh 192-bit salt, so the GCM usage limits of SP 800-38D
/// never apply to the DEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheLimits {
    /// How long an entry may serve after it was made. Zero disables reuse.
    pub max_age: Duration,
    /// How many messages one entry may serve (the first one included).
    pub max_messages: u64,
    /// How many bytes (plaintext when sealing, body when opening) one entry
    /// may serve in total.
    pub max_bytes: u64,
}

impl CacheLimits {
    /// Default [`max_age`](Self::max_age): five minutes.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
    /// Default [`max_messages`](Self::max_messages): 2^20.
    pub const DEFAULT_MAX_MESSAGES: u64 = 1 << 20;
    /// Default [`max_bytes`](Self::max_bytes): 64 GiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;

    /// Limits of `max_age`, `max_messages` and `max_bytes`.
    pub fn new(max_age: Duration, max_messages: u64, max_bytes: u64) -> CacheLimits {
        CacheLimits {
            max_age,
            max_messages,
            max_bytes,
        }
    }

    /// The same limits with another maximum age.
    pub fn with_max_age(mut self, max_age: Duration) -> CacheLimits {
        self.max_age = max_age;
        self
    }

    /// The same limits with another maximum message count.
    pub fn with_max_messages(mut self, max_messages: u64) -> CacheLimits {
        self.max_messages = max_messages;
        self
    }

    /// The same limits with another maximum byte count.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> CacheLimits {
        self.max_bytes = max_bytes;
        self
    }

    /// Whether an entry made at `created`, that has served `messages`
    /// messages and `bytes` bytes, may serve one more of `len` bytes.
    fn admits(&self, created: Instant, messages: u64, bytes: u64, len: u64) -> bool {
        created.elapsed() < self.max_age
            && messages < self.max_messages
            && bytes.checked_add(len).is_some_and(|b| b <= self.max_bytes)
    }
}

impl Default for CacheLimits {
    fn default() -> CacheLimits {
        CacheLimits::new(
            Self::DEFAULT_MAX_AGE,
            Self::DEFAULT_MAX_MESSAGES,
            Self::DEFAULT_MAX_BYTES,
        )
    }
}

/// Which caches a keyring keeps, and their limits.
///
/// ```
/// use std::time::Duration;
/// use phi_envelope::cache::{CacheConfig, CacheLimits};
///
/// // Encryption cache only, one minute or 50,000 records per DEK.
/// let config = CacheConfig::new()
///     .encrypt(CacheLimits::default().with_max_age(Duration::from_secs(60)).with_max_messages(50_000))
///     .decrypt(None)
///     .capacity(256);
/// assert!(config.decrypt.is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Limits of the encryption cache; `None` turns it off.
    pub encrypt: Option<CacheLimits>,
    /// Limits of the decryption cache; `None` turns it off.
    pub decrypt: Option<CacheLimits>,
    /// Most entries each cache holds; the least recently used is evicted
    /// first.
    pub capacity: usize,
}

impl CacheConfig {
    /// Default [`capacity`](Self::capacity): 1024 entries per cache.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// Both caches on, with [`CacheLimits::default`] and
    /// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY).
    pub fn new() -> CacheConfig {
        CacheConfig {
            encrypt: Some(CacheLimits::default()),
            decrypt: Some(CacheLimits::default()),
            capacity: Self::DEFAULT_CAPACITY,
        }
    }

    /// Sets (or, with `None`, turns off) the encryption cache.
    pub fn encrypt(mut self, limits: impl Into<Option<CacheLimits>>) -> CacheConfig {
        self.encrypt = limits.into();
        self
    }

    /// Sets (or, with `None`, turns off) the decryption cache.
    pub fn decrypt(mut self, limits: impl Into<Option<CacheLimits>>) -> CacheConfig {
        self.decrypt = limits.into();
        self
    }

    /// Sets the capacity of each cache (at least 1).
    pub fn capacity(mut self, entries: usize) -> CacheConfig {
        self.capacity = entries.max(1);
        self
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig::new()
    }
}

/// Counters of a keyring's provider calls and data-key caches, from
/// [`Keyring::cache_stats`](crate::Keyring::cache_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Every provider call the keyring made (generate, wrap, unwrap,
    /// describe, lifecycle verbs), with or without a cache.
    pub provider_calls: u64,
    /// Records sealed with a cached key.
    pub encrypt_hits: u64,
    /// Records for which a key was made because none was cached.
    pub encrypt_misses: u64,
    /// Records opened with a cached key.
    pub decrypt_hits: u64,
    /// Records for which a key was unwrapped because none was cached.
    pub decrypt_misses: u64,
    /// Entries in the caches now.
    pub entries: u64,
    /// Entries retired (a limit reached, capacity, a flush).
    pub evictions: u64,
    /// Keys ever put into a cache.
    pub keys_cached: u64,
    /// Cached keys whose memory has been released: evicted, and no message
    /// in progress holds them any more. Equal to `keys_cached` once the
    /// caches are flushed and idle.
    pub keys_released: u64,
}

/// A cached key that counts its own release.
pub(crate) struct CachedKey<K> {
    key: K,
    released: Arc<AtomicU64>,
}

impl<K> Deref for CachedKey<K> {
    type Target = K;
    fn deref(&self) -> &K {
        &self.key
    }
}

impl<K> Drop for CachedKey<K> {
    fn drop(&mut self) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }
}

/// A key for one message: made for it alone, or shared through the cache.
pub(crate) enum KeyUse<K> {
    /// Made for this message; dropped after it.
    Fresh(K),
    /// Shared with other messages through the cache.
    Cached(Arc<CachedKey<K>>),
}

impl<K> Deref for KeyUse<K> {
    type Target = K;
    fn deref(&self) -> &K {
        match self {
            KeyUse::Fresh(k) => k,
            KeyUse::Cached(k) => k,
        }
    }
}

impl<K> fmt::Debug for KeyUse<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyUse::Fresh(_) => "KeyUse::Fresh(..)",
            KeyUse::Cached(_) => "KeyUse::Cached(..)",
        })
    }
}

/// A cached opening key and the header entry (key reference, version) that
/// first unwrapped it.
pub(crate) type OpeningHit = (Arc<CachedKey<OpeningKey>>, (String, u32));

/// The key of a cache entry: an exact, injective encoding of everything
/// that must match (see [`DataKeyCache::seal_id`] and
/// [`DataKeyCache::open_id`]), compared in full by the map. Two entries
/// share an id only when every field is equal, so no hash collision can
/// make one partition's DEK serve another. The context enters as its
/// canonical bytes: a hit then costs no keyed digest of it (the keyring
/// computes the context's fingerprint only when an event or the policy
/// needs it). Context values can be PHI, so an id is zeroized when it is
/// dropped, and it never leaves the cache: no event, error or `Debug`
/// output shows it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct EntryId(pub(crate) Vec<u8>);

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({} bytes)", self.0.len())
    }
}

impl Drop for EntryId {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A key that a cache entry involves: its provider, a spelling of it, and
/// its identity where the provider reported one.
#[derive(Clone, Debug)]
pub(crate) struct KeyTag {
    /// The provider id.
    pub provider: String,
    /// A reference text of the key (a recipient, a header entry).
    pub text: String,
    /// The key's identity; `None` when unknown.
    pub identity: Option<KeyIdentity>,
}

/// The key a flush is for: a spelling and, where known, its identity.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlushTarget<'a> {
    /// The provider id.
    pub provider: &'a str,
    /// The reference text given.
    pub text: &'a str,
    /// Its identity; `None` when unknown.
    pub identity: Option<&'a KeyIdentity>,
}

impl KeyTag {
    /// Whether a flush of `target` must remove an entry with this tag: the
    /// same spelling, or the same identity, or, when either identity is
    /// unknown, any key of the same provider (flushing more is safe,
    /// flushing less is not).
    pub(crate) fn hit_by(&self, target: &FlushTarget<'_>) -> bool {
        self.provider == target.provider
            && (self.text == target.text
                || match (&self.identity, target.identity) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                })
    }
}

fn hit(keys: &[KeyTag], target: &FlushTarget<'_>) -> bool {
    keys.iter().any(|k| k.hit_by(target))
}

/// One cached key of either cache, with what it has served so far.
struct Entry<K, M> {
    key: Arc<CachedKey<K>>,
    created: Instant,
    /// Messages served.
    uses: u64,
    bytes: u64,
    keys: Vec<KeyTag>,
    /// What the cache keeps beside the key ([`SealEntry`], [`OpenEntry`]).
    meta: M,
}

/// An encryption-cache entry; beside the key, the earliest end of a
/// recipient primary's cryptoperiod.
type SealEntry = Entry<SealingKey, Option<SystemTime>>;

/// A decryption-cache entry; beside the key, the header entry whose unwrap
/// made it (for events).
type OpenEntry = Entry<OpeningKey, (String, u32)>;

/// Whether a sealing key is still inside its recipients' cryptoperiods.
fn in_period(not_after: &Option<SystemTime>) -> bool {
    not_after.is_none_or(|t| SystemTime::now() < t)
}

/// One of the two caches as [`DataKeyCache::take`] and
/// [`DataKeyCache::put`] see it: its limits, entries and counters, and
/// whether an entry is still usable by what it keeps beside the key.
struct Shelf<'a, K, M> {
    limits: Option<CacheLimits>,
    lru: &'a Mutex<Lru<Entry<K, M>>>,
    hits: &'a AtomicU64,
    misses: &'a AtomicU64,
    usable: fn(&M) -> bool,
}

struct Slot<E> {
    entry: E,
    last_used: u64,
}

/// A map bounded by a capacity that evicts the least recently used entry.
struct Lru<E> {
    map: HashMap<EntryId, Slot<E>>,
    tick: u64,
    capacity: usize,
}

impl<E> Lru<E> {
    fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    fn get_mut(&mut self, id: &EntryId) -> Option<&mut E> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(id).map(|s| {
            s.last_used = tick;
            &mut s.entry
        })
    }

    fn remove(&mut self, id: &EntryId) -> Option<E> {
        self.map.remove(id).map(|s| s.entry)
    }

    /// Inserts, returning how many entries were evicted (the replaced one
    /// and the least recently used one).
    fn insert(&mut self, id: EntryId, entry: E) -> u64 {
        self.tick += 1;
        let mut evicted = 0;
        let slot = Slot {
            entry,
            last_used: self.tick,
        };
        if self.map.insert(id, slot).is_some() {
            evicted += 1;
        }
        while self.map.len() > self.capacity {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.map.remove(&k);
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }

    fn retain(&mut self, mut keep: impl FnMut(&E) -> bool) -> u64 {
        let before = self.map.len();
        self.map.retain(|_, s| keep(&s.entry));
        (before - self.map.len()) as u64
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave an entry half-updated in a
    // way that matters for safety (counters only grow); keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The two caches, their counters and their single-flight table.
pub(crate) struct DataKeyCache {
    encrypt: Option<CacheLimits>,
    decrypt: Option<CacheLimits>,
    seal: Mutex<Lru<SealEntry>>,
    open: Mutex<Lru<OpenEntry>>,
    /// Bumped by every flush; a key made by a call that started before a
    /// flush is not cached.
    epoch: AtomicU64,
    released: Arc<AtomicU64>,
    cached: AtomicU64,
    evictions: AtomicU64,
    encrypt_hits: AtomicU64,
    encrypt_misses: AtomicU64,
    decrypt_hits: AtomicU64,
    decrypt_misses: AtomicU64,
}

impl fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKeyCache")
            .field("encrypt", &self.encrypt)
            .field("decrypt", &self.decrypt)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Appends a length-prefixed field (injective encoding of the entry id).
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl DataKeyCache {
    pub(crate) fn new(config: &CacheConfig) -> Result<DataKeyCache> {
        Ok(DataKeyCache {
            encrypt: config.encrypt,
            decrypt: config.decrypt,
            seal: Mutex::new(Lru::new(config.capacity)),
            open: Mutex::new(Lru::new(config.capacity)),
            epoch: AtomicU64::new(0),
            released: Arc::new(AtomicU64::new(0)),
            cached: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            encrypt_hits: AtomicU64::new(0),
            encrypt_misses: AtomicU64::new(0),
            decrypt_hits: AtomicU64::new(0),
            decrypt_misses: AtomicU64::new(0),
        })
    }

    pub(crate) fn encrypt_enabled(&self) -> bool {
        self.encrypt.is_some()
    }

    pub(crate) fn decrypt_enabled(&self) -> bool {
        self.decrypt.is_some()
    }

    /// The encryption partition: recipients in order, actor, partition
    /// string, encryption context (its canonical pairs), as exact bytes.
    ///
    /// The encoding is injective: a fixed label, the recipient count, then
    /// every variable field length-prefixed and each optional one behind a
    /// presence byte, so two different tuples never give the same bytes.
    /// (Until this was measured, the bytes went through one more
    /// HMAC-SHA-256 under a per-cache key: 7.4 k instructions per cached
    /// seal, a quarter of the message itself, for no property the exact
    /// bytes lack: they are what the map compares.)
    pub(crate) fn seal_id(
        &self,
        recipients: &[KeyRef],
        actor: Option<&str>,
        partition: Option<&str>,
        context: &[u8],
    ) -> EntryId {
        let mut enc = Vec::with_capacity(128);
        enc.extend_from_slice(b"phi-envelope cache: seal\x00");
        enc.extend_from_slice(&(recipients.len() as u64).to_be_bytes());
        for r in recipients {
            field(&mut enc, r.as_str().as_bytes());
        }
        for part in [actor, partition] {
            match part {
                Some(s) => {
                    enc.push(1);
                    field(&mut enc, s.as_bytes());
                }
                None => enc.push(0),
            }
        }
        field(&mut enc, context);
        EntryId(enc)
    }

    /// The decryption entry: exact header bytes and encryption context (its
    /// canonical pairs), as exact bytes, injective like
    /// [`seal_id`](Self::seal_id)'s (the labels differ, so a seal id is
    /// never an open id).
    pub(crate) fn open_id(&self, header: &[u8], context: &[u8]) -> EntryId {
        let mut enc = Vec::with_capacity(header.len() + 64);
        enc.extend_from_slice(b"phi-envelope cache: open\x00");
        field(&mut enc, header);
        field(&mut enc, context);
        EntryId(enc)
    }

    /// The current flush epoch; capture it before a provider call.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A cached sealing key for one more message of `len` bytes, counted
    /// against the entry's limits. An entry past a limit is evicted.
    pub(crate) fn take_sealing(
        &self,
        id: &EntryId,
        len: u64,
    ) -> Option<Arc<CachedKey<SealingKey>>> {
        self.take(self.sealing(), id, len, |e| e.key.clone())
    }

    /// Puts a fresh sealing key (already used for one message of `len`
    /// bytes) into the cache, unless a flush happened since `epoch` or the
    /// limits leave no second use.
    pub(crate) fn put_sealing(
        &self,
        id: EntryId,
        key: SealingKey,
        not_after: Option<SystemTime>,
        keys: Vec<KeyTag>,
        len: u64,
        epoch: u64,
    ) -> KeyUse<SealingKey> {
        self.put(self.sealing(), id, (key, not_after, keys), len, epoch)
    }

    /// A cached opening key for one more message of `len` body bytes, and
    /// the header entry (key reference, version) that first unwrapped it.
    pub(crate) fn take_opening(&self, id: &EntryId, len: u64) -> Option<OpeningHit> {
        self.take(self.opening(), id, len, |e| (e.key.clone(), e.meta.clone()))
    }

    /// Puts an opening key (already used once, for `len` body bytes) into
    /// the cache, under the same conditions as
    /// [`put_sealing`](Self::put_sealing).
    pub(crate) fn put_opening(
        &self,
        id: EntryId,
        key: OpeningKey,
        used: (String, u32),
        keys: Vec<KeyTag>,
        len: u64,
        epoch: u64,
    ) -> KeyUse<OpeningKey> {
        self.put(self.opening(), id, (key, used, keys), len, epoch)
    }

    /// The encryption cache, for [`take`](Self::take) and [`put`](Self::put).
    fn sealing(&self) -> Shelf<'_, SealingKey, Option<SystemTime>> {
        Shelf {
            limits: self.encrypt,
            lru: &self.seal,
            hits: &self.encrypt_hits,
            misses: &self.encrypt_misses,
            usable: in_period,
        }
    }

    /// The decryption cache, for [`take`](Self::take) and [`put`](Self::put).
    fn opening(&self) -> Shelf<'_, OpeningKey, (String, u32)> {
        Shelf {
            limits: self.decrypt,
            lru: &self.open,
            hits: &self.decrypt_hits,
            misses: &self.decrypt_misses,
            usable: |_| true,
        }
    }

    /// What [`take_sealing`](Self::take_sealing) and
    /// [`take_opening`](Self::take_opening) share: the entry `id` of
    /// `shelf` for one more message of `len` bytes, counted against its
    /// limits (and as a hit) while it is usable, and handed out by `hit`;
    /// an entry past a limit is evicted.
    fn take<K, M, H>(
        &self,
        shelf: Shelf<'_, K, M>,
        id: &EntryId,
        len: u64,
        hit: impl FnOnce(&Entry<K, M>) -> H,
    ) -> Option<H> {
        let limits = shelf.limits?;
        let mut lru = lock(shelf.lru);
        let entry = lru.get_mut(id)?;
        let usable = (shelf.usable)(&entry.meta);
        if usable && limits.admits(entry.created, entry.uses, entry.bytes, len) {
            entry.uses += 1;
            entry.bytes += len;
            shelf.hits.fetch_add(1, Ordering::Relaxed);
            Some(hit(entry))
        } else {
            let old = lru.remove(id);
            drop(lru);
            drop(old);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// What [`put_sealing`](Self::put_sealing) and
    /// [`put_opening`](Self::put_opening) share: puts `entry` (the key,
    /// what is kept beside it, the keys it involves) into `shelf` as used
    /// once, for `len` bytes (a miss), unless its limits leave no second
    /// use, it is not usable, or a flush happened since `epoch`.
    fn put<K, M>(
        &self,
        shelf: Shelf<'_, K, M>,
        id: EntryId,
        entry: (K, M, Vec<KeyTag>),
        len: u64,
        epoch: u64,
    ) -> KeyUse<K> {
        let (key, meta, keys) = entry;
        shelf.misses.fetch_add(1, Ordering::Relaxed);
        let Some(limits) = shelf.limits else {
            return KeyUse::Fresh(key);
        };
        let now = Instant::now();
        let reusable = limits.admits(now, 1, len, 0) && (shelf.usable)(&meta);
        if !(reusable && epoch == self.epoch()) {
            return KeyUse::Fresh(key);
        }
        let key = Arc::new(CachedKey {
            key,
            released: self.released.clone(),
        });
        self.cached.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            key: key.clone(),
            created: now,
            uses: 1,
            bytes: len,
            keys,
            meta,
        };
        let evicted = {
            let mut lru = lock(shelf.lru);
            // Checked again under the lock: a flush that ran meanwhile wins.
            if epoch == self.epoch() {
                lru.insert(id, entry)
            } else {
                0
            }
        };
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        KeyUse::Cached(key)
    }

    /// Removes every entry that involves the key `target` (any version,
    /// any spelling: see [`KeyTag::hit_by`]), in both caches, and makes keys
    /// fetched by calls already under way uncacheable.
    pub(crate) fn flush_key(&self, target: &FlushTarget<'_>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let a = lock(&self.seal).retain(|e| !hit(&e.keys, target));
        let b = lock(&self.open).retain(|e| !hit(&e.keys, target));
        self.evictions.fetch_add(a + b, Ordering::Relaxed);
    }

    /// Removes every entry.
    pub(crate) fn flush_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let a = lock(&self.seal).retain(|_| false);
        let b = lock(&self.open).retain(|_| false);
        self.evictions.fetch_add(a + b, Ordering::Relaxed);
    }

    /// The counters (without `provider_calls`, which the keyring fills in).
    pub(crate) fn stats(&self) -> CacheStats {
        let entries = (lock(&self.seal).map.len() + lock(&self.open).map.len()) as u64;
        CacheStats {
            provider_calls: 0,
            encrypt_hits: self.encrypt_hits.load(Ordering::Relaxed),
            encrypt_misses: self.encrypt_misses.load(Ordering::Relaxed),
            decrypt_hits: self.decrypt_hits.load(Ordering::Relaxed),
            decrypt_misses: self.decrypt_misses.load(Ordering::Relaxed),
            entries,
            evictions: self.evictions.load(Ordering::Relaxed),
            keys_cached: self.cached.load(Ordering::Relaxed),
            keys_released: self.released.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------
// Single flight: concurrent misses of one entry make one provider call.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Flight {
    state: Mutex<FlightState>,
}

#[derive(Default)]
struct FlightState {
    done: bool,
    wakers: Vec<Waker>,
}

/// In-flight operations by id. No lock is held across an `.await`: a waiter
/// registers its waker and returns `Pending`.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<EntryId, Arc<Flight>>>,
}

impl fmt::Debug for Flights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &lock(&self.map).len())
            .finish()
    }
}

/// The role of a caller in a flight.
pub(crate) enum Join<'a> {
    /// Do the work; dropping the guard (on success, failure or
    /// cancellation) releases the waiters.
    Leader(#[allow(dead_code)] FlightGuard<'a>),
    /// Someone else is doing it: await this, then look again.
    Waiter(FlightWait),
}

impl Flights {
    /// Single flight around a lookup: the value `find` gives, else one
    /// load however many tasks miss `id` at once. `found` handles a value
    /// found, `load` fetches (and stores) a missing one; both give the
    /// answer. A task that misses joins the flight of `id`: the leader
    /// looks again (a leader may have finished just before) and loads,
    /// holding the flight until `found` or `load` is done; the others wait
    /// for it, then look again, so when the leader fails or is cancelled
    /// the next one loads.
    pub(crate) async fn find_or_load<H, T, FutH, FutL>(
        &self,
        id: &EntryId,
        mut find: impl FnMut() -> Option<H>,
        found: impl FnOnce(H) -> FutH,
        load: impl FnOnce() -> FutL,
    ) -> T
    where
        FutH: Future<Output = T>,
        FutL: Future<Output = T>,
    {
        loop {
            if let Some(value) = find() {
                return found(value).await;
            }
            match self.join(id) {
                Join::Leader(_flight) => {
                    if let Some(value) = find() {
                        return found(value).await;
                    }
                    return load().await;
                }
                Join::Waiter(wait) => wait.await,
            }
        }
    }

    /// Joins the flight `id`, or starts it.
    pub(crate) fn join(&self, id: &EntryId) -> Join<'_> {
        let mut map = lock(&self.map);
        if let Some(f) = map.get(id) {
            return Join::Waiter(FlightWait(f.clone()));
        }
        let flight = Arc::new(Flight::default());
        map.insert(id.clone(), flight.clone());
        Join::Leader(FlightGuard {
            flights: self,
            id: id.clone(),
            flight,
        })
    }
}

/// Held by the leader of a flight.
pub(crate) struct FlightGuard<'a> {
    flights: &'a Flights,
    id: EntryId,
    flight: Arc<Flight>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        {
            let mut map = lock(&self.flights.map);
            if map
                .get(&self.id)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                map.remove(&self.id);
            }
        }
        let wakers = {
            let mut st = lock(&self.flight.state);
            st.done = true;
            std::mem::take(&mut st.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }
}

/// Resolves when the flight's leader is done (whatever the outcome).
pub(crate) struct FlightWait(Arc<Flight>);

impl Future for FlightWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = lock(&self.0.state);
        if st.done {
            return Poll::Ready(());
        }
        if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{EncryptionContext, WrappedKey};
    use crate::primitives::Dek;

    fn sealing_key() -> SealingKey {
        let dek = Dek::generate().unwrap();
        SealingKey::new(
            &dek,
            vec![WrappedKey {
                provider: "t".into(),
                key_ref: "t:k".into(),
                key_version: 1,
                wrapped: vec![1; 8],
            }],
        )
        .unwrap()
    }

    fn tag(text: &str, identity: Option<&str>) -> KeyTag {
        KeyTag {
            provider: "t".into(),
            text: text.into(),
            identity: identity.map(|i| KeyIdentity::new("t", i)),
        }
    }

    fn target<'a>(text: &'a str, identity: Option<&'a KeyIdentity>) -> FlushTarget<'a> {
        FlushTarget {
            provider: "t",
            text,
            identity,
        }
    }

    #[test]
    fn flushes_match_spelling_identity_or_unknown() {
        let k1 = KeyIdentity::new("t", "t:key-1");
        let k2 = KeyIdentity::new("t", "t:key-2");
        let alias = tag("t:alias", Some("t:key-1"));
        assert!(alias.hit_by(&target("t:alias", None)), "same spelling");
        assert!(alias.hit_by(&target("t:key-1", Some(&k1))), "same identity");
        assert!(!alias.hit_by(&target("t:key-2", Some(&k2))), "another key");
        assert!(alias.hit_by(&target("t:other", None)), "target unknown");
        let unknown = tag("t:x", None);
        assert!(
            unknown.hit_by(&target("t:key-2", Some(&k2))),
            "entry unknown"
        );
        let elsewhere = FlushTarget {
            provider: "u",
            text: "t:alias",
            identity: None,
        };
        assert!(!alias.hit_by(&elsewhere), "another provider");
    }

    fn cache(limits: CacheLimits, capacity: usize) -> DataKeyCache {
        DataKeyCache::new(
            &CacheConfig::new()
                .encrypt(limits)
                .decrypt(limits)
                .capacity(capacity),
        )
        .unwrap()
    }

    fn put(c: &DataKeyCache, id: EntryId, len: u64) -> KeyUse<SealingKey> {
        c.put_sealing(
            id,
            sealing_key(),
            None,
            vec![tag("t:k", None)],
            len,
            c.epoch(),
        )
    }

    #[test]
    fn message_and_byte_limits_retire_an_entry() {
        let c = cache(CacheLimits::new(Duration::from_secs(60), 3, 100), 8);
        let id = EntryId(vec![1; 32]);
        assert!(matches!(put(&c, id.clone(), 10), KeyUse::Cached(_)));
        assert!(c.take_sealing(&id, 10).is_some());
        assert!(c.take_sealing(&id, 10).is_some());
        assert!(c.take_sealing(&id, 10).is_none(), "fourth message");
        assert!(matches!(put(&c, id.clone(), 60), KeyUse::Cached(_)));
        assert!(c.take_sealing(&id, 40).is_some());
        assert!(c.take_sealing(&id, 1).is_none(), "101 bytes");
        // A message larger than the byte limit is never cached.
        assert!(matches!(put(&c, id.clone(), 101), KeyUse::Fresh(_)));
    }

    #[test]
    fn lru_capacity_and_release_counting() {
        let c = cache(CacheLimits::default(), 2);
        for i in 0..5u8 {
            let _ = put(&c, EntryId(vec![i; 32]), 1);
        }
        let s = c.stats();
        assert_eq!(s.entries, 2);
        assert_eq!(s.evictions, 3);
        assert_eq!(s.keys_cached, 5);
        assert_eq!(s.keys_released, 3);
        assert!(
            c.take_sealing(&EntryId(vec![0; 32]), 1).is_none(),
            "oldest evicted"
        );
        assert!(
            c.take_sealing(&EntryId(vec![4; 32]), 1).is_some(),
            "newest kept"
        );
        c.flush_all();
        assert_eq!(c.stats().keys_released, 5);
    }

    #[test]
    fn a_flush_during_a_miss_keeps_the_key_out() {
        let c = cache(CacheLimits::default(), 8);
        let epoch = c.epoch();
        c.flush_key(&target("t:k", None));
        let k = c.put_sealing(EntryId(vec![9; 32]), sealing_key(), None, vec![], 1, epoch);
        assert!(matches!(k, KeyUse::Fresh(_)));
        assert!(c.take_sealing(&EntryId(vec![9; 32]), 1).is_none());
    }

    #[test]
    fn ids_separate_every_partition_field() {
        let c = cache(CacheLimits::default(), 8);
        let a: KeyRef = "local:a".parse().unwrap();
        let b: KeyRef = "local:b".parse().unwrap();
        let ctx = EncryptionContext::new().canonical_pairs();
        let one = std::slice::from_ref(&a);
        let base = c.seal_id(one, Some("x"), None, &ctx);
        assert_ne!(
            base,
            c.seal_id(&[a.clone(), b.clone()], Some("x"), None, &ctx)
        );
        assert_ne!(
            base,
            c.seal_id(std::slice::from_ref(&b), Some("x"), None, &ctx)
        );
        assert_ne!(base, c.seal_id(one, Some("y"), None, &ctx));
        assert_ne!(base, c.seal_id(one, None, Some("x"), &ctx));
        assert_ne!(base, c.seal_id(one, Some("x"), Some(""), &ctx));
        let other = EncryptionContext::new()
            .with("k", "v")
            .unwrap()
            .canonical_pairs();
        assert_ne!(base, c.seal_id(one, Some("x"), None, &other));
        assert_eq!(base, c.seal_id(one, Some("x"), None, &ctx));
    }

    /// The ids are the encoded bytes themselves, so the map's equality is
    /// the check; fields that run together in a plain concatenation stay
    /// apart, and no seal id is an open id.
    #[test]
    fn ids_are_injective_encodings() {
        let c = cache(CacheLimits::default(), 8);
        let ab: KeyRef = "local:ab".parse().unwrap();
        let a: KeyRef = "local:a".parse().unwrap();
        let fp = [7u8; 16];
        // Actor "x" with partition "y" against actor "xy" without one, and
        // the actor moved into the partition.
        let pairs = [
            c.seal_id(std::slice::from_ref(&a), Some("x"), Some("y"), &fp),
            c.seal_id(std::slice::from_ref(&a), Some("xy"), None, &fp),
            c.seal_id(std::slice::from_ref(&a), None, Some("xy"), &fp),
            c.seal_id(std::slice::from_ref(&ab), Some("x"), Some("y"), &fp),
            c.seal_id(std::slice::from_ref(&a), Some("x"), Some("y"), &[7u8; 15]),
        ];
        for (i, x) in pairs.iter().enumerate() {
            for y in &pairs[i + 1..] {
                assert_ne!(x, y);
            }
        }
        let open = c.open_id(b"header", &fp);
        assert_ne!(open, c.open_id(b"header", &[8u8; 16]));
        assert_ne!(open, c.open_id(b"headers", &fp[1..]));
        assert!(pairs.iter().all(|s| *s != open));
        // Deterministic within a cache and across caches: nothing keyed.
        assert_eq!(
            open,
            cache(CacheLimits::default(), 8).open_id(b"header", &fp)
        );
    }
}
