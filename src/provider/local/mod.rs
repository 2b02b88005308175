//! The local keystore: versioned AES-256 key-encryption keys in one
//! passphrase-protected file. The embedded default provider; it needs no
//! setup.
//!
//! ```
//! # async fn demo() -> phi_envelope::Result<()> {
//! use phi_envelope::provider::local::{LocalKeystore, SecretString};
//! use phi_envelope::provider::{KeyProvider, KeyState};
//! use phi_envelope::KeyRef;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("keys.json");
//! # let passphrase = SecretString::from("correct horse battery staple");
//! # /*
//! let passphrase = SecretString::from(std::env::var("PHI_KEYSTORE_PASSPHRASE").expect("passphrase"));
//! # */
//! let store = LocalKeystore::create(&path, passphrase.clone())?;
//! let key: KeyRef = "local:records".parse()?;
//! store.add_key(&key)?; // version 1, enabled (primary)
//!
//! let info = store.rotate(&key).await?; // version 2 primary, 1 decrypt-only
//! assert_eq!(info.primary_version, Some(2));
//! store.set_state(&key, 1, KeyState::Disabled).await?;
//! store.destroy(&key, 1).await?; // crypto-shredding: the bytes are gone
//!
//! let again = LocalKeystore::open(&path, passphrase)?;
//! assert_eq!(again.keys()[0].version(1).unwrap().state, KeyState::Destroyed);
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! # Keys, versions and states
//!
//! Keys are named `local:NAME` (`NAME`: 1 to 64 of `[A-Za-z0-9._-]`). Each
//! key has versions 1, 2, ...; each version has a [`KeyState`], a creation
//! time, and 32 random key bytes, which [`destroy`](KeyProvider::destroy)
//! erases for good, leaving a tombstone (version, state, creation time) so
//! that errors can say "destroyed" rather than "unknown".
//!
//! At most one version of a key is [`Enabled`](KeyState::Enabled): the
//! *primary*, under which [`wrap`](KeyProvider::wrap) encrypts. The verbs
//! and their preconditions:
//!
//! | verb | from | to | notes |
//! | --- | --- | --- | --- |
//! | `create_key` / [`add_key`](LocalKeystore::add_key) | key absent | v1 enabled | error if the key exists |
//! | `rotate` | any | new version enabled | the old primary (if any) becomes decrypt-only |
//! | `set_state(v, Enabled)` | decrypt-only, disabled | enabled | `v` becomes the primary; the old primary becomes decrypt-only (this is how a rotation is rolled back) |
//! | `set_state(v, DecryptOnly)` | enabled, disabled | decrypt-only | on the primary, leaves the key with no primary: wrapping fails until a version is enabled or the key rotated |
//! | `set_state(v, Disabled)` | enabled, decrypt-only | disabled | unwrapping under `v` fails with [`KeyDisabled`](ProviderErrorKind::KeyDisabled); reversible |
//! | `set_state(v, Destroyed)` | — | — | refused: use `destroy` |
//! | `destroy(v)` | decrypt-only, disabled | destroyed | the primary cannot be destroyed (rotate or demote it first); destroying a destroyed version is a no-op |
//! | anything | destroyed | — | refused with [`KeyDestroyed`](ProviderErrorKind::KeyDestroyed): nothing leaves destroyed |
//!
//! Setting a version to the state it is in changes nothing and writes
//! nothing. A verb that fails (precondition, I/O, a concurrent writer's
//! corrupt file) changes nothing, in memory or on disk.
//!
//! # Wrapping
//!
//! A DEK is wrapped with AES-256-GCM under the primary version, with a fresh
//! random 96-bit nonce and the additional data
//!
//! ```text
//! "phi-envelope/v1 local wrap" 0x00 || u16 len(key ref) || key ref || u32 version || canonical context pairs
//! ```
//!
//! (integers big-endian; the key reference is its canonical text, e.g.
//! `local:records`; the context encoding is
//! [`EncryptionContext::canonical_pairs`]). The wrapped form is
//! `nonce (12) || ciphertext (32) || tag (16)`, 60 bytes. Unwrapping answers
//! [`Unwrapped::NotMine`] for another provider's entry or a key name this
//! keystore does not hold, an error for a version that is destroyed,
//! disabled or missing, and [`Unwrapped::Rejected`] (never a reason) for a
//! wrapped key that does not authenticate: wrong context, tampered bytes,
//! wrong length.
//!
//! Random 96-bit nonces allow at most 2^32 encryptions under one key (NIST
//! SP 800-38D, 8.3). Each [`LocalKeystore`] counts its wraps per key version
//! in memory and refuses the next one past [`MAX_WRAPS_PER_VERSION`] with
//! [`LimitReached`](ProviderErrorKind::LimitReached). The count is per
//! process (per `LocalKeystore` value, reset when the process restarts),
//! not global: rotate keys on a schedule well before any key could
//! approach the limit across all processes.
//!
//! # The file
//!
//! One JSON document on one line, written by phi-envelope in compact form,
//! and read back only if it is byte for byte what phi-envelope would write
//! (a reformatted file is refused). **docs/KEYSTORE.md specifies it byte
//! for byte**, with committed vectors and an independent decoder: the
//! cleartext header (format, version, Argon2id parameters and salt), the
//! key table sealed as one AES-256-GCM message under the 32-byte key that
//! Argon2id (version 0x13) derives from the passphrase, with the header as
//! additional data and a fresh nonce on every write. This build writes
//! format version [`KEYSTORE_FORMAT_VERSION`] (2) and reads versions
//! [`OLDEST_READ_VERSION`] (1) to 2.
//!
//! New keystores use [`Argon2idParams::RFC_9106_SECOND`] (m = 64 MiB,
//! t = 3, p = 4); [`change_passphrase`](LocalKeystore::change_passphrase)
//! may raise them. Before running the KDF, parameters read from a file
//! must lie within m 8 MiB ..= 1 GiB, t 1 ..= 10, p 1 ..= 16 and
//! m × t ≤ 4 GiB, so that a hostile file cannot make us allocate or compute
//! without limit. The derived key stays in memory (zeroized on drop) for
//! later writes; the passphrase itself is not kept. On reading: at most
//! [`MAX_KEYS`] keys, [`MAX_VERSIONS`] versions a key, versions ascending
//! from 1, at most one enabled, valid names, no duplicates; the whole file
//! at most [`MAX_KEYSTORE_FILE_LEN`] bytes, checked before it is read.
//!
//! An **unprotected** keystore (tests only: [`create_unprotected_for_tests`](
//! LocalKeystore::create_unprotected_for_tests)) carries the table in
//! clear with a checksum tag under a public key; anyone can read its keys
//! and forge it. A protected opener refuses an unprotected file and vice
//! versa.
//!
//! Every failure to read a keystore is an [`Error::Keystore`] that says
//! what is wrong and what to do: not found, permissions, not a keystore,
//! truncated, unsupported version, modified, wrong passphrase (which cannot
//! be told apart from a modified ciphertext), protected/unprotected
//! mismatch, rolled back.
//!
//! # Rollback
//!
//! An older copy of the file put back in place would still authenticate and
//! bring back the versions destroyed since. The key table carries a
//! *generation*, raised by one on every write ([`generation`](
//! LocalKeystore::generation)). A file whose generation is lower than the
//! highest this process has seen of the same path is refused, by the
//! running value at its next call and by a new [`open`](LocalKeystore::open);
//! with a generation file ([`with_generation_file`](
//! LocalKeystore::with_generation_file)) kept where whoever can replace the
//! keystore cannot write, a new process refuses it too.
//!
//! # Files, permissions, concurrency, crashes
//!
//! - New keystores are created with mode 0600; opening a file that grants
//!   any permission to group or others (`mode & 0o077 != 0`), that belongs
//!   to another user or that is not a regular file is refused, with the
//!   `chmod 600` to run. Symbolic links are refused (`O_NOFOLLOW`). A
//!   directory that others can write (unless sticky) or that belongs to
//!   another user (not root) is refused.
//! - Every change is written atomically: a temporary file
//!   `.NAME.<random>.tmp` in the same directory, created with `O_EXCL` and
//!   mode 0600, written, fsynced, renamed over the keystore, then the
//!   directory fsynced. A failed write removes its temporary file and leaves
//!   the old keystore intact; temporary files left by a process killed
//!   mid-write are ignored by readers and removed by the next write.
//! - Writers take an exclusive advisory lock ([`std::fs::File::lock`]) on
//!   the sidecar file `PATH.lock` (created mode 0600, never deleted; opened
//!   with `O_NOFOLLOW | O_NONBLOCK` and refused unless it is a regular file
//!   of the user's own), re-read the keystore under the lock, apply the
//!   change, write, and only then release it: two processes (or two
//!   `LocalKeystore` values) rotating the same keystore lose no update. A
//!   keystore that cannot be read is never overwritten.
//! - Every operation first checks the file's identity (device, inode, size,
//!   modification and change time: one `lstat`) and reloads the table only
//!   when it changed, so that a rotation, state change or destruction made
//!   by another process applies here at the next call, without re-reading
//!   the file or re-running Argon2id on every wrap and unwrap; destroyed
//!   keys are not served from memory. Writers give each new file a later
//!   modification time than the one it replaces, so two versions never
//!   share an identity.
//!
//! The provider's futures do this small file I/O inline, on the thread that
//! polls them (an `lstat` for each call, a read when the file changed; for
//! the lifecycle verbs a lock, a write and two fsyncs). That is usually
//! negligible; an application that cannot afford it on its async executor
//! runs the calls on a blocking pool, or relies on the data-key cache to
//! make them rare.

mod file;
mod fsio;
mod generation;
mod hex;
mod table;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::ExposeSecret;
pub use secrecy::SecretString;
use zeroize::Zeroizing;

use self::file::Kdf;
use self::fsio::keystore_error;
use self::table::{provider_error, KekBytes, Table};
use super::{
    BoxFuture, KeyInfo, KeyProvider, KeyRef, KeyRefKind, KeyState, ProviderErrorKind, Unwrapped,
};
use crate::error::{Error, Result};
use crate::format::{EncryptionContext, WrappedKey};
use crate::primitives::{fill_random, Aes256Gcm, Dek};

pub use self::file::Argon2idParams;
pub use self::file::MAX_FILE_LEN as MAX_KEYSTORE_FILE_LEN;
pub use self::file::{FORMAT_VERSION as KEYSTORE_FORMAT_VERSION, OLDEST_READ_VERSION};
pub use self::table::{MAX_KEYS, MAX_VERSIONS};

/// **Fuzzing builds only** (`--cfg fuzzing`, set by cargo-fuzz): forgets
/// the generations this process has seen, so that a fuzz target loads each
/// input as a fresh process would instead of refusing it as a rollback of
/// an earlier input.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn forget_seen_generations_for_fuzzing() {
    generation::forget_all();
}

/// The provider id of the local keystore, and the scheme of its key
/// references.
pub const PROVIDER_ID: &str = "local";

/// Length of a wrapped DEK: nonce (12) || ciphertext (32) || tag (16).
pub const WRAPPED_KEY_LEN: usize = 60;

/// Most wraps under one key version that one [`LocalKeystore`] performs:
/// 2^32, the NIST SP 800-38D limit for random 96-bit GCM nonces.
pub const MAX_WRAPS_PER_VERSION: u64 = 1 << 32;

/// The label that starts the additional data of every wrapped DEK.
const WRAP_LABEL: &[u8] = b"phi-envelope/v1 local wrap\x00";

enum Protection {
    Passphrase { kdf: Kdf, key: Zeroizing<[u8; 32]> },
    Unprotected,
}

/// What one [`LocalKeystore`] holds of its file, behind one lock.
struct Cache {
    /// The derived key and the KDF header it belongs to; replaced whole by
    /// a passphrase change.
    protection: Protection,
    table: Table,
    /// The identity of the file version the table was read from (or
    /// written as); `None` forces a reload at the next use.
    identity: Option<fsio::Identity>,
}

/// A keystore file of versioned AES-256 key-encryption keys; implements
/// [`KeyProvider`] with the id `local`. See the [module docs](self) for the
/// state machine and the guarantees, and docs/KEYSTORE.md for the file
/// format byte for byte.
///
/// `Debug` shows the path, the protection and each key's versions and
/// states, never key bytes.
pub struct LocalKeystore {
    path: PathBuf,
    /// `path` with its directory resolved: the key of this process's
    /// rollback marks.
    canonical: PathBuf,
    /// The operator's generation file, if one is kept.
    generation_file: Option<PathBuf>,
    cache: Mutex<Cache>,
    wraps: Mutex<HashMap<(String, u32), u64>>,
    /// Full reads (and authentications) of the file by this value.
    file_reads: AtomicU64,
    /// Argon2id derivations by this value.
    kdf_runs: AtomicU64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_kek() -> Result<KekBytes> {
    let mut k = Zeroizing::new([0u8; 32]);
    fill_random(&mut k[..])?;
    Ok(k)
}

fn local_name(key: &KeyRef) -> Result<&str> {
    match key.kind() {
        KeyRefKind::Local { name } => Ok(name),
        _ => Err(Error::InvalidArgument(format!(
            "{key} is not a local:NAME key reference; the local keystore holds only local keys"
        ))),
    }
}

fn wrap_aad(key_ref: &str, version: u32, context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_LABEL.len() + 2 + key_ref.len() + 4 + 64);
    aad.extend_from_slice(WRAP_LABEL);
    // Key references are at most 1024 bytes (`KeyRef::parse`).
    aad.extend_from_slice(&(key_ref.len() as u16).to_be_bytes());
    aad.extend_from_slice(key_ref.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&context.canonical_pairs());
    aad
}

fn mode_mismatch(path: &Path, found: Kdf) -> Error {
    match found {
        Kdf::Unprotected => keystore_error(
            path,
            "this keystore is UNPROTECTED (test-only, no passphrase): refusing to use it as a protected \
             keystore; open it with LocalKeystore::open_unprotected_for_tests, or create a protected one",
        ),
        Kdf::Argon2id { .. } => keystore_error(
            path,
            "this keystore is protected by a passphrase; open it with LocalKeystore::open",
        ),
    }
}

fn seal(protection: &Protection, table: &Table) -> Result<Zeroizing<Vec<u8>>> {
    match protection {
        Protection::Passphrase { kdf, key } => file::seal(kdf, Some(key), table),
        Protection::Unprotected => file::seal(&Kdf::Unprotected, None, table),
    }
}

/// Authenticates and decodes file bytes with the key of `protection`.
fn decode(path: &Path, protection: &Protection, bytes: &[u8]) -> Result<Table> {
    let parsed = file::parse(bytes).map_err(|e| keystore_error(path, e.0))?;
    let key = match protection {
        Protection::Passphrase { kdf, key } => {
            if parsed.kdf == Kdf::Unprotected {
                return Err(mode_mismatch(path, parsed.kdf));
            }
            if parsed.kdf != *kdf {
                return Err(keystore_error(
                    path,
                    "the keystore's passphrase, salt or KDF parameters changed since it was opened (keys \
                     passwd, or the file was replaced); open it again, with its current passphrase",
                ));
            }
            Some(&**key)
        }
        Protection::Unprotected => {
            if parsed.kdf != Kdf::Unprotected {
                return Err(mode_mismatch(path, parsed.kdf));
            }
            None
        }
    };
    parsed.open(key).map_err(|e| keystore_error(path, e.0))
}

impl LocalKeystore {
    /// Creates a new keystore file at `path` protected by `passphrase`
    /// (Argon2id with [`Argon2idParams::RFC_9106_SECOND`]), with no keys.
    /// Fails if the file exists, the passphrase is empty, or the directory
    /// can be written by others.
    pub fn create(path: impl AsRef<Path>, passphrase: SecretString) -> Result<LocalKeystore> {
        Self::create_with_params(path, passphrase, Argon2idParams::RFC_9106_SECOND)
    }

    /// [`create`](Self::create) with other Argon2id parameters (within the
    /// bounds of [`Argon2idParams::new`]).
    pub fn create_with_params(
        path: impl AsRef<Path>,
        passphrase: SecretString,
        params: Argon2idParams,
    ) -> Result<LocalKeystore> {
        let path = path.as_ref();
        if passphrase.expose_secret().is_empty() {
            return Err(keystore_error(path, "the passphrase must not be empty"));
        }
        Argon2idParams::new(params.m_kib, params.t, params.p)?;
        refuse_existing(path)?;
        fsio::check_dir(path)?;
        let mut salt = [0u8; 16];
        fill_random(&mut salt)?;
        let key = file::derive(&passphrase, params, &salt).map_err(|r| keystore_error(path, r))?;
        drop(passphrase);
        Self::create_with(
            path,
            Protection::Passphrase {
                kdf: Kdf::Argon2id { params, salt },
                key,
            },
            1,
        )
    }

    /// Opens the keystore file at `path` with `passphrase`.
    ///
    /// Refuses, with an [`Error::Keystore`] saying why: a missing file, a
    /// symbolic link, a file of another user or that group or others may
    /// access, a directory that others can write, a file that is not a
    /// keystore, truncated, of an unknown version, modified, opened with the
    /// wrong passphrase, unprotected, or rolled back (older than a
    /// generation this process has seen).
    pub fn open(path: impl AsRef<Path>, passphrase: SecretString) -> Result<LocalKeystore> {
        let path = path.as_ref();
        fsio::check_dir(path)?;
        let (bytes, identity) = fsio::read(path)?;
        let parsed = file::parse(&bytes).map_err(|e| keystore_error(path, e.0))?;
        let Kdf::Argon2id { params, salt } = parsed.kdf else {
            return Err(mode_mismatch(path, parsed.kdf));
        };
        let key = file::derive(&passphrase, params, &salt).map_err(|r| keystore_error(path, r))?;
        drop(passphrase);
        let kdf = parsed.kdf;
        let table = parsed
            .open(Some(&key))
            .map_err(|e| keystore_error(path, e.0))?;
        Self::loaded(
            path,
            Protection::Passphrase { kdf, key },
            table,
            identity,
            1,
        )
    }

    /// Opens the keystore at `path`, or creates it (as [`create`](Self::create),
    /// with no keys) if no file is there. A file that exists but does not
    /// open is an error, never replaced.
    pub fn open_or_create(
        path: impl AsRef<Path>,
        passphrase: SecretString,
    ) -> Result<LocalKeystore> {
        let path = path.as_ref();
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match Self::create(path, passphrase.clone()) {
                    // Another process created it in between.
                    Err(Error::Keystore { .. }) if std::fs::symlink_metadata(path).is_ok() => {
                        Self::open(path, passphrase)
                    }
                    r => r,
                }
            }
            _ => Self::open(path, passphrase),
        }
    }

    /// **Tests only: no protection.** Creates a keystore whose keys are
    /// stored in clear in the file, readable by anyone who can read the
    /// file. Use it in tests and examples, never for real data.
    pub fn create_unprotected_for_tests(path: impl AsRef<Path>) -> Result<LocalKeystore> {
        let path = path.as_ref();
        refuse_existing(path)?;
        Self::create_with(path, Protection::Unprotected, 0)
    }

    /// **Tests only: no protection.** Opens a keystore made by
    /// [`create_unprotected_for_tests`](Self::create_unprotected_for_tests);
    /// refuses a passphrase-protected one.
    pub fn open_unprotected_for_tests(path: impl AsRef<Path>) -> Result<LocalKeystore> {
        let path = path.as_ref();
        fsio::check_dir(path)?;
        let (bytes, identity) = fsio::read(path)?;
        let parsed = file::parse(&bytes).map_err(|e| keystore_error(path, e.0))?;
        if parsed.kdf != Kdf::Unprotected {
            return Err(mode_mismatch(path, parsed.kdf));
        }
        let table = parsed.open(None).map_err(|e| keystore_error(path, e.0))?;
        Self::loaded(path, Protection::Unprotected, table, identity, 0)
    }

    /// Keeps the keystore's generation (its rollback high-water mark) in
    /// the file `generation_file` as well, so that a **new** process also
    /// refuses an older copy of the keystore put in its place.
    ///
    /// Put it where whoever can replace the keystore file cannot write
    /// (another directory, owned by the service or by root; another
    /// volume). Checked now: if the file names a higher generation than the
    /// keystore's, the keystore was rolled back and this fails; if it does
    /// not exist, it is created with the keystore's generation (trust on
    /// first use). Every later write of the keystore raises it (an
    /// [`Error::Keystore`] says so when that fails after the keystore was
    /// written). Its format: the generation in decimal and a newline, mode
    /// 0600; it follows the same file rules as the keystore.
    pub fn with_generation_file(
        mut self,
        generation_file: impl AsRef<Path>,
    ) -> Result<LocalKeystore> {
        let g = generation_file.as_ref().to_owned();
        fsio::check_dir(&g)?;
        let _lock = fsio::lock(&self.path)?;
        let current = self.current()?.table.generation;
        match generation::read_file(&g)? {
            Some(mark) if current < mark => {
                return Err(generation::rolled_back(
                    &self.path,
                    current,
                    mark,
                    &format!("the generation file {}", g.display()),
                    "write the keystore's generation into the generation file (or remove it) deliberately, \
                     knowing that destroyed keys may come back",
                ))
            }
            Some(mark) if current == mark => {}
            _ => generation::write_file(&g, current)?,
        }
        self.generation_file = Some(g);
        Ok(self)
    }

    fn create_with(path: &Path, protection: Protection, kdf_runs: u64) -> Result<LocalKeystore> {
        let mut table = Table::default();
        table.generation = 1;
        let bytes = seal(&protection, &table)?;
        let _lock = fsio::lock(path)?;
        fsio::remove_stale_temps(path);
        let identity = fsio::write_atomic(path, &bytes, true, None)?;
        let store = Self::with_table(path, protection, table, identity, kdf_runs);
        generation::reset(&store.canonical, 1);
        Ok(store)
    }

    /// A keystore just read from its file: refused if rolled back.
    fn loaded(
        path: &Path,
        protection: Protection,
        table: Table,
        identity: fsio::Identity,
        kdf_runs: u64,
    ) -> Result<LocalKeystore> {
        let generation = table.generation;
        let store = Self::with_table(path, protection, table, Some(identity), kdf_runs);
        store.file_reads.store(1, Ordering::Relaxed);
        generation::check_and_raise(path, &store.canonical, generation)?;
        Ok(store)
    }

    fn with_table(
        path: &Path,
        protection: Protection,
        table: Table,
        identity: Option<fsio::Identity>,
        kdf_runs: u64,
    ) -> LocalKeystore {
        LocalKeystore {
            path: path.to_owned(),
            canonical: generation::canonical(path),
            generation_file: None,
            cache: Mutex::new(Cache {
                protection,
                table,
                identity,
            }),
            wraps: Mutex::new(HashMap::new()),
            file_reads: AtomicU64::new(0),
            kdf_runs: AtomicU64::new(kdf_runs),
        }
    }

    /// The keystore file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation of the keystore as this value last read or wrote it:
    /// raised by one on every write of the file (0 for a file of format
    /// version 1 not yet rewritten).
    pub fn generation(&self) -> u64 {
        self.lock_cache().table.generation
    }

    /// The Argon2id parameters of a protected keystore (`None` for an
    /// unprotected one).
    pub fn kdf_params(&self) -> Option<Argon2idParams> {
        match &self.lock_cache().protection {
            Protection::Passphrase {
                kdf: Kdf::Argon2id { params, .. },
                ..
            } => Some(*params),
            _ => None,
        }
    }

    /// Changes the passphrase and the Argon2id parameters of a protected
    /// keystore, atomically: a new random salt, the key table re-sealed
    /// under the new derived key, the file replaced in one rename under the
    /// lock. A crash leaves either the old file (old passphrase) or the new
    /// one (new passphrase), never a mix. The keys, their versions and
    /// states do not change; the generation rises by one.
    ///
    /// Other [`LocalKeystore`] values and processes that have the keystore
    /// open get an [`Error::Keystore`] at their next call and must open it
    /// again with the new passphrase. Old copies of the file still open
    /// with the old passphrase.
    pub fn change_passphrase(
        &self,
        new_passphrase: SecretString,
        params: Argon2idParams,
    ) -> Result<()> {
        if matches!(self.lock_cache().protection, Protection::Unprotected) {
            return Err(keystore_error(
                &self.path,
                "an unprotected (test-only) keystore has no passphrase to change; create a protected one",
            ));
        }
        if new_passphrase.expose_secret().is_empty() {
            return Err(keystore_error(
                &self.path,
                "the new passphrase must not be empty",
            ));
        }
        Argon2idParams::new(params.m_kib, params.t, params.p)?;
        let mut salt = [0u8; 16];
        fill_random(&mut salt)?;
        let key = file::derive(&new_passphrase, params, &salt)
            .map_err(|r| keystore_error(&self.path, r))?;
        self.kdf_runs.fetch_add(1, Ordering::Relaxed);
        drop(new_passphrase);
        let protection = Protection::Passphrase {
            kdf: Kdf::Argon2id { params, salt },
            key,
        };
        self.modify_with(Some(protection), |_| Ok(((), false)))
    }

    /// Creates `key` with version 1 enabled (primary): the synchronous form
    /// of [`KeyProvider::create_key`]. Fails if the key exists.
    pub fn add_key(&self, key: &KeyRef) -> Result<KeyInfo> {
        let name = local_name(key)?;
        let kek = new_kek()?;
        self.modify(|t| Ok((t.create_key(name, now(), kek)?, true)))
    }

    /// Every key, names ascending, with its versions and states, as of the
    /// file now (or, if the file cannot be read at the moment or was rolled
    /// back, as last read; every other operation reports that error).
    pub fn keys(&self) -> Vec<KeyInfo> {
        if let Ok(cache) = self.current() {
            return cache.table.infos();
        }
        self.lock_cache().table.infos()
    }

    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        // The cache is replaced whole after each successful step, so a
        // panic elsewhere cannot leave it half-updated.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The table as the file holds it now: one `lstat` of the file, and a
    /// reload (read, authenticate, decode, rollback check) only when its
    /// identity changed since the table was read or written.
    fn current(&self) -> Result<MutexGuard<'_, Cache>> {
        let mut cache = self.lock_cache();
        let now = fsio::identity(&self.path)?;
        if cache.identity != Some(now) {
            let (bytes, identity) = fsio::read(&self.path)?;
            self.file_reads.fetch_add(1, Ordering::Relaxed);
            let table = decode(&self.path, &cache.protection, &bytes)?;
            generation::check_and_raise(&self.path, &self.canonical, table.generation)?;
            cache.table = table;
            cache.identity = Some(identity);
        }
        Ok(cache)
    }

    /// Read-modify-write under the lock. `change` returns its result and
    /// whether the table changed; nothing is written when it did not, or
    /// when anything fails.
    fn modify<R>(&self, change: impl FnOnce(&mut Table) -> Result<(R, bool)>) -> Result<R> {
        self.modify_with(None, change)
    }

    /// [`modify`](Self::modify), sealing under `protection` when given (and
    /// then writing even when the table did not change).
    fn modify_with<R>(
        &self,
        protection: Option<Protection>,
        change: impl FnOnce(&mut Table) -> Result<(R, bool)>,
    ) -> Result<R> {
        let _lock = fsio::lock(&self.path)?;
        let mut cache = self.current()?;
        let mut table = cache.table.clone();
        let (result, changed) = change(&mut table)?;
        if !changed && protection.is_none() {
            return Ok(result);
        }
        table.generation = table.generation.checked_add(1).ok_or_else(|| {
            keystore_error(&self.path, "the keystore's generation counter is exhausted")
        })?;
        let bytes = seal(protection.as_ref().unwrap_or(&cache.protection), &table)?;
        fsio::remove_stale_temps(&self.path);
        let identity = fsio::write_atomic(&self.path, &bytes, false, cache.identity)?;
        let generation = table.generation;
        generation::raise(&self.canonical, generation);
        cache.table = table;
        cache.identity = identity;
        if let Some(p) = protection {
            cache.protection = p;
        }
        drop(cache);
        if let Some(g) = &self.generation_file {
            generation::write_file(g, generation).map_err(|e| {
                keystore_error(
                    g,
                    format!(
                        "the keystore change WAS written (generation {generation}), but the generation file \
                         could not be updated ({e}); do not repeat the change: fix the generation file, or \
                         write {generation} into it"
                    ),
                )
            })?;
        }
        Ok(result)
    }

    fn count_wrap(&self, name: &str, version: u32) -> Result<()> {
        let mut wraps = self.wraps.lock().unwrap_or_else(PoisonError::into_inner);
        let count = wraps.entry((name.to_owned(), version)).or_insert(0);
        if *count >= MAX_WRAPS_PER_VERSION {
            return Err(provider_error(
                ProviderErrorKind::LimitReached,
                format!(
                    "key local:{name} version {version} has wrapped 2^32 keys in this process, the NIST SP 800-38D \
                     limit for random GCM nonces under one key; rotate the key"
                ),
            ));
        }
        *count += 1;
        Ok(())
    }

    fn wrap_sync(
        &self,
        key: &KeyRef,
        dek: &Dek,
        context: &EncryptionContext,
    ) -> Result<WrappedKey> {
        let name = local_name(key)?;
        let cache = self.current()?;
        let (version, kek) = cache.table.primary(name)?;
        self.count_wrap(name, version)?;
        let mut nonce = [0u8; 12];
        fill_random(&mut nonce)?;
        let aad = wrap_aad(key.as_str(), version, context);
        let mut out = Zeroizing::new([0u8; WRAPPED_KEY_LEN]);
        out[..12].copy_from_slice(&nonce);
        out[12..44].copy_from_slice(dek.expose_secret());
        let tag = Aes256Gcm::new(kek)?.seal_in_place(nonce, &aad, &mut out[12..44]);
        out[44..].copy_from_slice(&tag);
        Ok(WrappedKey {
            provider: PROVIDER_ID.into(),
            key_ref: key.as_str().into(),
            key_version: version,
            wrapped: out.to_vec(),
        })
    }

    fn unwrap_sync(&self, entry: &WrappedKey, context: &EncryptionContext) -> Result<Unwrapped> {
        if entry.provider != PROVIDER_ID {
            return Ok(Unwrapped::NotMine);
        }
        let Ok(key) = KeyRef::parse(&entry.key_ref) else {
            return Ok(Unwrapped::NotMine);
        };
        let KeyRefKind::Local { name } = key.kind() else {
            return Ok(Unwrapped::NotMine);
        };
        let cache = self.current()?;
        let Some(versions) = cache.table.versions(name) else {
            return Ok(Unwrapped::NotMine);
        };
        let version = entry.key_version;
        let Some(v) = versions.iter().find(|v| v.version == version) else {
            return Err(provider_error(
                ProviderErrorKind::KeyNotFound,
                format!("key {key} has no version {version} in this keystore (was the keystore restored from an older backup?)"),
            ));
        };
        let kek = match (v.state, &v.key) {
            (KeyState::Destroyed, _) | (_, None) => {
                return Err(provider_error(
                    ProviderErrorKind::KeyDestroyed,
                    format!("key {key} version {version} was destroyed; data wrapped under it cannot be recovered"),
                ))
            }
            (KeyState::Disabled, _) => {
                return Err(provider_error(
                    ProviderErrorKind::KeyDisabled,
                    format!("key {key} version {version} is disabled; set it decrypt-only to decrypt with it again"),
                ))
            }
            (_, Some(kek)) => kek,
        };
        if entry.wrapped.len() != WRAPPED_KEY_LEN {
            return Ok(Unwrapped::Rejected);
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&entry.wrapped[..12]);
        let mut buf = Zeroizing::new([0u8; WRAPPED_KEY_LEN - 12]);
        buf.copy_from_slice(&entry.wrapped[12..]);
        let aad = wrap_aad(key.as_str(), version, context);
        match Aes256Gcm::new(&kek[..])?.open_in_place(nonce, &aad, &mut buf[..]) {
            Ok(32) => Ok(Unwrapped::Key(Dek::from_slice(&buf[..32])?)),
            _ => Ok(Unwrapped::Rejected),
        }
    }

    fn describe_sync(&self, key: &KeyRef) -> Result<KeyInfo> {
        let name = local_name(key)?;
        self.current()?.table.info(name)
    }

    fn rotate_sync(&self, key: &KeyRef) -> Result<KeyInfo> {
        let name = local_name(key)?;
        let kek = new_kek()?;
        self.modify(|t| Ok((t.rotate(name, now(), kek)?, true)))
    }

    fn set_state_sync(&self, key: &KeyRef, version: u32, state: KeyState) -> Result<KeyInfo> {
        let name = local_name(key)?;
        self.modify(|t| {
            let changed = t.set_state(name, version, state)?;
            Ok((t.info(name)?, changed))
        })
    }

    fn destroy_sync(&self, key: &KeyRef, version: u32) -> Result<KeyInfo> {
        let name = local_name(key)?;
        // The old table, the only other holder of the bytes, is dropped
        // (zeroized) when `modify` replaces the cache.
        self.modify(|t| {
            let changed = t.destroy(name, version)?;
            Ok((t.info(name)?, changed))
        })
    }

    #[cfg(test)]
    fn set_wrap_count(&self, name: &str, version: u32, count: u64) {
        self.wraps
            .lock()
            .unwrap()
            .insert((name.to_owned(), version), count);
    }
}

fn refuse_existing(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(keystore_error(
            path,
            "already exists; open it instead of creating it (a keystore is never overwritten)",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(keystore_error(path, format!("cannot check the path: {e}"))),
    }
}

impl fmt::Debug for LocalKeystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LocalKeystore");
        d.field("path", &self.path);
        match self.cache.try_lock() {
            Ok(cache) => {
                let protection = match &cache.protection {
                    Protection::Passphrase {
                        kdf: Kdf::Argon2id { params, .. },
                        ..
                    } => format!(
                        "passphrase (argon2id m={} KiB, t={}, p={})",
                        params.m_kib, params.t, params.p
                    ),
                    Protection::Passphrase { .. } => "passphrase".to_owned(),
                    Protection::Unprotected => "UNPROTECTED (tests only)".to_owned(),
                };
                d.field("protection", &protection)
                    .field("generation", &cache.table.generation);
                let keys: Vec<String> = cache
                    .table
                    .iter()
                    .map(|(name, versions)| {
                        let vs: Vec<String> = versions
                            .iter()
                            .map(|v| format!("v{} {}", v.version, v.state))
                            .collect();
                        format!("local:{name} [{}]", vs.join(", "))
                    })
                    .collect();
                d.field("keys", &keys);
            }
            Err(_) => {
                d.field("keys", &"<busy>");
            }
        }
        d.finish()
    }
}

impl KeyProvider for LocalKeystore {
    fn id(&self) -> &str {
        PROVIDER_ID
    }

    /// Every future of this provider completes on its first poll (its work
    /// is local and runs inline), so the blocking facade needs no runtime.
    fn needs_runtime(&self) -> bool {
        false
    }

    fn wrap<'a>(
        &'a self,
        key: &'a KeyRef,
        dek: &'a Dek,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<WrappedKey>> {
        Box::pin(async move { self.wrap_sync(key, dek, context) })
    }

    fn unwrap<'a>(
        &'a self,
        entry: &'a WrappedKey,
        context: &'a EncryptionContext,
    ) -> BoxFuture<'a, Result<Unwrapped>> {
        Box::pin(async move { self.unwrap_sync(entry, context) })
    }

    fn describe<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.describe_sync(key) })
    }

    /// `local:NAME` is the only spelling of a local key: it is its identity.
    fn identity<'a>(
        &'a self,
        key: &'a KeyRef,
    ) -> BoxFuture<'a, Result<Option<super::KeyIdentity>>> {
        let id = matches!(key.kind(), KeyRefKind::Local { .. })
            .then(|| super::KeyIdentity::new(PROVIDER_ID, key.as_str()));
        Box::pin(async move { Ok(id) })
    }

    fn create_key<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.add_key(key) })
    }

    fn rotate<'a>(&'a self, key: &'a KeyRef) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.rotate_sync(key) })
    }

    fn set_state<'a>(
        &'a self,
        key: &'a KeyRef,
        version: u32,
        state: KeyState,
    ) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.set_state_sync(key, version, state) })
    }

    fn destroy<'a>(&'a self, key: &'a KeyRef, version: u32) -> BoxFuture<'a, Result<KeyInfo>> {
        Box::pin(async move { self.destroy_sync(key, version) })
    }
}

#[cfg(test)]
mod vector_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn wrap_limit_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalKeystore::create_unprotected_for_tests(dir.path().join("k.json")).unwrap();
        let key: KeyRef = "local:k".parse().unwrap();
        store.add_key(&key).unwrap();
        let ctx = EncryptionContext::new();
        let dek = Dek::generate().unwrap();
        store.set_wrap_count("k", 1, MAX_WRAPS_PER_VERSION - 1);
        block_on(store.wrap(&key, &dek, &ctx)).unwrap();
        let Err(Error::Provider(e)) = block_on(store.wrap(&key, &dek, &ctx)) else {
            panic!("limit not enforced")
        };
        assert_eq!(e.kind(), ProviderErrorKind::LimitReached);
        assert!(e.message().contains("rotate the key"), "{e}");
        // Unwrapping is not limited, and a new version starts from zero.
        block_on(store.rotate(&key)).unwrap();
        let w = block_on(store.wrap(&key, &dek, &ctx)).unwrap();
        assert_eq!(w.key_version, 2);
    }

    fn fast() -> Argon2idParams {
        Argon2idParams::new(8 * 1024, 1, 1).unwrap()
    }

    fn reads(s: &LocalKeystore) -> (u64, u64) {
        (
            s.file_reads.load(Ordering::Relaxed),
            s.kdf_runs.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn calls_neither_reread_nor_rederive_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let pass = SecretString::from("pass phrase");
        let a = LocalKeystore::create_with_params(&path, pass.clone(), fast()).unwrap();
        let key: KeyRef = "local:k".parse().unwrap();
        a.add_key(&key).unwrap();
        assert_eq!(reads(&a), (0, 1), "create derives once and reads nothing");
        let b = LocalKeystore::open(&path, pass).unwrap();
        assert_eq!(reads(&b), (1, 1));
        let ctx = EncryptionContext::new();
        let dek = Dek::generate().unwrap();
        for _ in 0..20 {
            let w = block_on(b.wrap(&key, &dek, &ctx)).unwrap();
            assert!(matches!(
                block_on(b.unwrap(&w, &ctx)),
                Ok(Unwrapped::Key(_))
            ));
            block_on(b.describe(&key)).unwrap();
        }
        assert_eq!(reads(&b), (1, 1), "no re-read, no re-derivation per call");
        // A change through another value is seen at the next call: one
        // reload, still no derivation.
        block_on(a.rotate(&key)).unwrap();
        let w = block_on(b.wrap(&key, &dek, &ctx)).unwrap();
        assert_eq!(w.key_version, 2);
        assert_eq!(reads(&b), (2, 1));
        // Its own writes do not make it reload either.
        block_on(b.rotate(&key)).unwrap();
        block_on(b.wrap(&key, &dek, &ctx)).unwrap();
        assert_eq!(reads(&b), (2, 1));
        assert_eq!(reads(&a), (0, 1));
        // Quick changes in a row, the last back to an earlier size.
        block_on(a.set_state(&key, 1, KeyState::Disabled)).unwrap();
        block_on(a.set_state(&key, 1, KeyState::DecryptOnly)).unwrap();
        block_on(a.set_state(&key, 1, KeyState::Disabled)).unwrap();
        let info = block_on(b.describe(&key)).unwrap();
        assert_eq!(info.version(1).unwrap().state, KeyState::Disabled);
    }

    #[test]
    fn wrap_aad_layout() {
        let ctx = EncryptionContext::from_pairs([("a", "b")]).unwrap();
        let aad = wrap_aad("local:k", 7, &ctx);
        let mut want = b"phi-envelope/v1 local wrap\0".to_vec();
        want.extend_from_slice(&[0, 7]);
        want.extend_from_slice(b"local:k");
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(&[0, 1, 0, 1, b'a', 0, 1, b'b']);
        assert_eq!(aad, want);
    }
}
