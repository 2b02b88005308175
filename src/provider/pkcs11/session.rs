//! The module registry, the session pool and session-loss recovery.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::errors::{ck_error, loss, provider_error, rv, Loss};
use crate::error::{Error, Result};
use crate::provider::ProviderErrorKind as K;

/// How an operation on a session failed.
#[derive(Debug)]
pub(crate) enum Fail {
    /// A PKCS#11 call failed. If it means the session, the token or the
    /// library was lost, the session is re-established and the operation
    /// retried once.
    Ck(CkError),
    /// A call that changed the token failed. The session is re-established
    /// for the next operation, but this one is not retried (it may have
    /// half-happened; describe the key to see its state).
    Mutating(CkError),
    /// A final answer (invalid state, disabled key, ...); the session is
    /// fine.
    Done(Error),
    /// Something was not found. A logged-out session sees no private
    /// object, so: if the session is not logged in, log in and retry once;
    /// otherwise this is the answer.
    NotFound(Error),
}

impl From<CkError> for Fail {
    fn from(e: CkError) -> Fail {
        Fail::Ck(e)
    }
}

/// One loaded PKCS#11 module. A module can be initialized once per process,
/// so every provider on the same module shares this (see [`module`]).
pub(super) struct Module {
    path: PathBuf,
    pub(super) ctx: Pkcs11,
    /// Bumped whenever the library is initialized again after it was
    /// finalized: every session handle of an older epoch is dead, and its
    /// number may already belong to a new session, so it is forgotten, never
    /// closed.
    epoch: AtomicU64,
    reinit: Mutex<()>,
    /// Token-changing operations (lifecycle verbs, counter reservations)
    /// of every provider of this module in the process hold it exclusively,
    /// every other operation shared: the former are read-modify-write
    /// sequences, and SoftHSM2 2.6.1 fails object creation that runs
    /// concurrently with other calls now and then with `CKR_GENERAL_ERROR`
    /// (upstream issue #573).
    pub(super) objects: RwLock<()>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn initialize(ctx: &Pkcs11) -> std::result::Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(()),
        // Someone else in this process (another library, a test harness)
        // initialized it: the library state is shared, which is fine.
        Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (each
    // critical section is a single push, pop or insert).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process-wide module for `path`: loaded and initialized on first use.
pub(super) fn module(path: &Path) -> Result<Arc<Module>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut reg = lock(REGISTRY.get_or_init(Default::default));
    if let Some(m) = reg.get(&key) {
        return Ok(m.clone());
    }
    let what = format!("loading the PKCS#11 module {}", path.display());
    let ctx = Pkcs11::new(&key).map_err(|e| ck_error(&what, "-", e))?;
    initialize(&ctx).map_err(|e| {
        let mut msg = format!(
            "initializing the PKCS#11 module {} failed: check its configuration",
            path.display()
        );
        if key.to_string_lossy().contains("softhsm") {
            msg.push_str(" (SoftHSM2: SOFTHSM2_CONF and its tokendir)");
        }
        Error::from(
            crate::provider::ProviderError::new(super::PROVIDER_ID, K::Misconfigured, msg)
                .with_source(e),
        )
    })?;
    let m = Arc::new(Module {
        path: key.clone(),
        ctx,
        epoch: AtomicU64::new(0),
        reinit: Mutex::new(()),
        objects: RwLock::new(()),
    });
    reg.insert(key, m.clone());
    Ok(m)
}

impl Module {
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Initializes the library again after it was finalized, once, however
    /// many threads noticed it in `seen` epoch.
    fn reinitialize(&self, seen: u64) -> std::result::Result<(), CkError> {
        let _g = lock(&self.reinit);
        if self.epoch() != seen {
            return Ok(());
        }
        initialize(&self.ctx)?;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// A session of the pool, tagged with the module epoch it was opened in.
pub(super) struct Lease {
    session: Session,
    epoch: u64,
}

impl Lease {
    pub(super) fn session(&self) -> &Session {
        &self.session
    }
}

/// The state shared by a provider and its blocking tasks.
pub(super) struct Inner {
    pub(super) module: Arc<Module>,
    pub(super) token: String,
    pin: SecretString,
    slot: Mutex<Option<Slot>>,
    idle: Mutex<Vec<Lease>>,
    /// Set once the token refused the PIN: it is never presented again, so
    /// that a wrong PIN cannot lock the token's user by retries.
    pin_rejected: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("module", &self.module)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let epoch = self.module.epoch();
        for lease in std::mem::take(&mut *lock(&self.idle)) {
            if lease.epoch == epoch {
                let _ = lease.session.close();
            }
        }
    }
}

impl Inner {
    /// Connects: finds the token, opens a session and logs in (which checks
    /// the PIN at once).
    pub(super) fn connect(module: Arc<Module>, token: String, pin: SecretString) -> Result<Inner> {
        let inner = Inner {
            module,
            token,
            pin,
            slot: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            pin_rejected: AtomicBool::new(false),
        };
        inner.find_slot().map_err(|e| match e {
            Error::Provider(p) if p.kind() == K::Unavailable => provider_error(
                K::Misconfigured,
                format!("{} (module {})", p.message(), inner.module.path.display()),
            ),
            e => e,
        })?;
        let lease = inner.open()?;
        inner.checkin(lease);
        Ok(inner)
    }

    pub(super) fn error(&self, what: &str, e: CkError) -> Error {
        ck_error(what, &self.token, e)
    }

    /// The answer once the token refused the PIN.
    fn pin_latched(&self) -> Error {
        provider_error(
            K::AccessDenied,
            format!(
                "token {:?} refused the user PIN earlier: this provider does not present it \
                 again (so that the token does not lock the user); fix the PIN and connect a \
                 new provider",
                self.token
            ),
        )
    }

    fn reinit_error(&self, e: CkError) -> Error {
        crate::provider::ProviderError::new(
            super::PROVIDER_ID,
            K::Unavailable,
            format!(
                "the PKCS#11 module {} was finalized and initializing it again failed ({e}): \
                 token {:?} is unreachable; check the module and its configuration (SoftHSM2: \
                 SOFTHSM2_CONF), then retry",
                self.module.path.display(),
                self.token
            ),
        )
        .with_source(e)
        .into()
    }

    /// The slot of the token, found by label (again after a token loss).
    fn find_slot(&self) -> Result<Slot> {
        if let Some(s) = *lock(&self.slot) {
            return Ok(s);
        }
        let what = format!("looking for token {:?}", self.token);
        let ctx = &self.module.ctx;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| self.error(&what, e))?;
        for slot in slots {
            if let Ok(info) = ctx.get_token_info(slot) {
                if info.token_initialized() && info.label() == self.token {
                    *lock(&self.slot) = Some(slot);
                    return Ok(slot);
                }
            }
        }
        Err(provider_error(
            K::Unavailable,
            format!(
                "no initialized token labelled {:?} is present: check the token label and that \
                 the HSM is connected (SoftHSM2: SOFTHSM2_CONF points at the token directory)",
                self.token
            ),
        ))
    }

    /// Token information (serial, model, manufacturer) for matching URIs.
    pub(super) fn token_info(&self) -> Result<cryptoki::slot::TokenInfo> {
        let slot = self.find_slot()?;
        self.module
            .ctx
            .get_token_info(slot)
            .map_err(|e| self.error("reading the token information", e))
    }

    fn login(&self, s: &Session) -> std::result::Result<(), CkError> {
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) => Ok(()),
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
            Err(e) => {
                if matches!(
                    rv(&e),
                    Some(
                        RvError::PinIncorrect
                            | RvError::PinInvalid
                            | RvError::PinLenRange
                            | RvError::PinLocked
                            | RvError::PinExpired
                    )
                ) {
                    self.pin_rejected.store(true, Ordering::Release);
                }
                Err(e)
            }
        }
    }

    /// Opens a new session and logs it in, recovering a finalized library
    /// or a moved token once.
    fn open(&self) -> Result<Lease> {
        if self.pin_rejected.load(Ordering::Acquire) {
            return Err(self.pin_latched());
        }
        let what = format!("opening a session with token {:?}", self.token);
        let mut recovered = false;
        loop {
            let epoch = self.module.epoch();
            let slot = self.find_slot()?;
            let e = match self.module.ctx.open_rw_session_no_drop(slot) {
                Ok(session) => match self.login(&session) {
                    Ok(()) => return Ok(Lease { session, epoch }),
                    Err(e) => {
                        let _ = session.close();
                        e
                    }
                },
                Err(e) => e,
            };
            if recovered || self.pin_rejected.load(Ordering::Acquire) {
                return Err(self.error(&what, e));
            }
            match loss(&e) {
                Loss::NotInitialized => {
                    self.module
                        .reinitialize(epoch)
                        .map_err(|e| self.reinit_error(e))?;
                    *lock(&self.slot) = None;
                }
                Loss::Token | Loss::Session => *lock(&self.slot) = None,
                Loss::None | Loss::Login => return Err(self.error(&what, e)),
            }
            recovered = true;
        }
    }

    /// A session from the pool, or a new one.
    fn checkout(&self) -> Result<Lease> {
        let epoch = self.module.epoch();
        loop {
            let Some(lease) = lock(&self.idle).pop() else {
                break;
            };
            if lease.epoch == epoch {
                return Ok(lease);
            }
            // Opened before the library was finalized: dead; forget it.
        }
        self.open()
    }

    /// Returns a healthy session to the pool.
    fn checkin(&self, lease: Lease) {
        if lease.epoch == self.module.epoch() {
            lock(&self.idle).push(lease);
        }
    }

    /// Forgets a dead session (without C_CloseSession: its handle may have
    /// been reused) and what else the loss implies.
    fn discard(&self, lease: Lease, what: Loss) -> Result<()> {
        let epoch = lease.epoch;
        drop(lease); // opened without close-on-drop
        match what {
            Loss::NotInitialized => {
                self.module
                    .reinitialize(epoch)
                    .map_err(|e| self.reinit_error(e))?;
            }
            Loss::Token => {
                *lock(&self.slot) = None;
                // Every session on the token is gone with it.
                lock(&self.idle).clear();
            }
            Loss::Session => {
                // Keep the idle sessions that still answer.
                let idle = std::mem::take(&mut *lock(&self.idle));
                let alive: Vec<Lease> = idle
                    .into_iter()
                    .filter(|l| l.session.get_session_info().is_ok())
                    .collect();
                lock(&self.idle).extend(alive);
            }
            Loss::Login | Loss::None => {}
        }
        Ok(())
    }

    /// Runs `f` on a session, recovering a lost session, token, login or
    /// library once. `what` describes the operation for error messages.
    pub(super) fn run<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&Session) -> std::result::Result<T, Fail>,
    ) -> Result<T> {
        let mut lease = self.checkout()?;
        let first = f(lease.session());
        let failure = match first {
            Ok(v) => {
                self.checkin(lease);
                return Ok(v);
            }
            Err(Fail::Done(e)) => {
                self.checkin(lease);
                return Err(e);
            }
            Err(Fail::NotFound(e)) => match lease.session().get_session_info() {
                // A logged-out session sees no private object: log in, retry.
                Ok(i)
                    if !matches!(
                        i.session_state(),
                        SessionState::RwUser | SessionState::RoUser
                    ) =>
                {
                    Loss::Login
                }
                Err(ie) if loss(&ie) != Loss::None => loss(&ie),
                _ => {
                    self.checkin(lease);
                    return Err(e);
                }
            },
            Err(Fail::Mutating(e)) => {
                let l = loss(&e);
                if l == Loss::None {
                    self.checkin(lease);
                } else {
                    self.discard(lease, l)?;
                }
                return Err(self.error(what, e));
            }
            Err(Fail::Ck(e)) => match loss(&e) {
                Loss::None => {
                    self.checkin(lease);
                    return Err(self.error(what, e));
                }
                l => l,
            },
        };
        // Recover, then retry once.
        if failure == Loss::Login {
            if self.pin_rejected.load(Ordering::Acquire) {
                self.checkin(lease);
                return Err(self.pin_latched());
            }
            if let Err(e) = self.login(lease.session()) {
                let l = loss(&e);
                if l == Loss::None {
                    self.checkin(lease);
                } else {
                    self.discard(lease, l)?;
                }
                return Err(self.error(what, e));
            }
        } else {
            self.discard(lease, failure)?;
            lease = self.open()?;
        }
        match f(lease.session()) {
            Ok(v) => {
                self.checkin(lease);
                Ok(v)
            }
            Err(Fail::Done(e) | Fail::NotFound(e)) => {
                self.checkin(lease);
                Err(e)
            }
            Err(Fail::Ck(e) | Fail::Mutating(e)) => {
                let l = loss(&e);
                if l == Loss::None {
                    self.checkin(lease);
                } else {
                    // Forget it; the next operation starts afresh.
                    let _ = self.discard(lease, l);
                }
                Err(self.error(&format!("{what} (after re-opening the session)"), e))
            }
        }
    }
}
