//! The PKCS#11 context, the login and the session pool, and how they are
//! replaced when the module loses its state.
//!
//! - The module is loaded and `C_Initialize`d once per process ([`context`]);
//!   every open of the same module shares that context. A re-open may
//!   finalize it and initialize a fresh one ([`reinitialize`]); the registry
//!   keeps a generation number so two users of the module never both do it.
//! - One [`Open`] is one login: an anchor session that keeps the user logged
//!   in, a pool of read-write sessions for concurrent callers (its lock is
//!   held only to take or return a session, never during a device call) and
//!   the object handles found through it.
//! - [`Open::close`] stops new calls, waits for the calls in progress and
//!   closes every session, so that the context can be finalized without any
//!   call running on it (PKCS#11 forbids `C_Finalize` during other calls,
//!   and a session handle closed after a re-initialization could name a new
//!   session).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;

use super::super::HsmError;
use super::super::pin::read_pin;
use super::{Pkcs11Config, device, find_token, rv};

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A loaded and initialized module, with the generation of its
/// initialization in this process.
struct Module {
    ctx: Pkcs11,
    generation: u64,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Module>> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn initialize(module: &Path) -> Result<Pkcs11, HsmError> {
    let err = |detail: String| HsmError::Module {
        module: module.display().to_string(),
        detail,
    };
    let ctx = Pkcs11::new(module).map_err(|e| err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => {}
        Err(e) => return Err(err(e.to_string())),
    }
    Ok(ctx)
}

/// The process-wide context of `module` and its generation, initialized on
/// first use.
pub(super) fn module_context(module: &Path) -> Result<(Pkcs11, u64), HsmError> {
    let mut map = lock(registry());
    if let Some(m) = map.get(module) {
        return Ok((m.ctx.clone(), m.generation));
    }
    let ctx = initialize(module)?;
    map.insert(
        module.to_path_buf(),
        Module {
            ctx: ctx.clone(),
            generation: 0,
        },
    );
    Ok((ctx, 0))
}

/// Finalizes the context of `module` if it is still the one of
/// `generation`, and initializes a new one: the module forgets everything
/// it held in memory and reads its token again. If someone re-initialized
/// it since, that newer context is returned as is.
///
/// The caller must have closed every session of its own on the old context
/// and have no call running on it ([`Open::close`]).
pub(super) fn reinitialize(module: &Path, generation: u64) -> Result<(Pkcs11, u64), HsmError> {
    let mut map = lock(registry());
    if let Some(m) = map.get(module)
        && m.generation != generation
    {
        return Ok((m.ctx.clone(), m.generation));
    }
    if let Some(old) = map.remove(module) {
        // An error here (for example "not initialized") means there is
        // nothing left to finalize.
        let _ = old.ctx.finalize();
    }
    let ctx = initialize(module)?;
    map.insert(
        module.to_path_buf(),
        Module {
            ctx: ctx.clone(),
            generation: generation + 1,
        },
    );
    Ok((ctx, generation + 1))
}

/// Whether the context of `module` is still the one of `generation`.
fn is_current(module: &Path, generation: u64) -> bool {
    lock(registry())
        .get(module)
        .is_some_and(|m| m.generation == generation)
}

/// The process-wide context of `module`, initialized on first use.
/// PKCS#11 allows one `C_Initialize` per process; every open of the same
/// module shares it. It is finalized only to recover a module that lost its
/// state (see [`super::Pkcs11Hsm`]).
pub fn context(module: &Path) -> Result<Pkcs11, HsmError> {
    module_context(module).map(|(ctx, _)| ctx)
}

/// Found object handles of one key pair.
#[derive(Debug, Clone, Copy)]
pub(super) struct Handles {
    pub(super) private: ObjectHandle,
}

/// One login to the token: anchor session, session pool, found handles.
pub(super) struct Open {
    module: PathBuf,
    pub(super) ctx: Pkcs11,
    pub(super) generation: u64,
    pub(super) slot: Slot,
    /// Keeps the user logged in; `None` once closed.
    pub(super) anchor: Mutex<Option<Session>>,
    pool: Mutex<Pool>,
    available: Condvar,
    max_sessions: usize,
    pub(super) handles: Mutex<HashMap<String, Handles>>,
}

struct Pool {
    idle: Vec<Session>,
    /// Sessions open (idle or in use).
    open: usize,
    /// No new session is handed out: a re-open is under way.
    closed: bool,
}

/// The error of a call that found its login closed by a re-open.
fn reopening() -> HsmError {
    HsmError::StateLost {
        op: "session",
        detail: "the HSM module is being re-opened".into(),
    }
}

impl Open {
    /// Finds the token by label in the context of `module` (of the given
    /// generation), logs in with the PIN from `cfg.pin_file` and prepares
    /// an empty pool.
    pub(super) fn new(cfg: &Pkcs11Config, ctx: Pkcs11, generation: u64) -> Result<Open, HsmError> {
        let slot = find_token(&ctx, &cfg.token_label)?;
        let pin = read_pin(&cfg.pin_file)?;
        let anchor = ctx.open_rw_session(slot).map_err(device("C_OpenSession"))?;
        match anchor.login(UserType::User, Some(&pin)) {
            Ok(()) => {}
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => {}
            Err(e) => {
                return Err(HsmError::Login {
                    token: cfg.token_label.clone(),
                    detail: e.to_string(),
                });
            }
        }
        drop(pin);
        Ok(Open {
            module: cfg.module.clone(),
            ctx,
            generation,
            slot,
            anchor: Mutex::new(Some(anchor)),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
                closed: false,
            }),
            available: Condvar::new(),
            max_sessions: cfg.max_sessions.max(1),
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a session from the pool, opening one if the pool is below its
    /// size, or waits for one to come back.
    pub(super) fn session(self: &Arc<Self>) -> Result<PooledSession, HsmError> {
        let mut pool = lock(&self.pool);
        loop {
            if pool.closed {
                return Err(reopening());
            }
            if let Some(session) = pool.idle.pop() {
                return Ok(PooledSession {
                    open: Arc::clone(self),
                    session: Some(session),
                    broken: false,
                });
            }
            if pool.open < self.max_sessions {
                pool.open += 1;
                drop(pool);
                return match self.ctx.open_rw_session(self.slot) {
                    Ok(session) => Ok(PooledSession {
                        open: Arc::clone(self),
                        session: Some(session),
                        broken: false,
                    }),
                    Err(e) => {
                        lock(&self.pool).open -= 1;
                        self.available.notify_one();
                        Err(device("C_OpenSession")(e))
                    }
                };
            }
            pool = match self.available.wait(pool) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Runs `f` on the anchor session (the login), unless closed.
    pub(super) fn with_anchor<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, CkError>,
    ) -> Result<Result<T, CkError>, HsmError> {
        let anchor = lock(&self.anchor);
        match anchor.as_ref() {
            Some(s) => Ok(f(s)),
            None => Err(reopening()),
        }
    }

    /// Stops handing out sessions, waits up to `drain` until no call holds
    /// one (`me` is the caller's own reference to this open), then closes
    /// the idle sessions and the anchor. Returns `false`, and opens the pool
    /// again, if calls were still running at the deadline.
    pub(super) fn close(self: &Arc<Self>, drain: Duration) -> bool {
        lock(&self.pool).closed = true;
        self.available.notify_all();
        let deadline = Instant::now() + drain;
        loop {
            {
                let pool = lock(&self.pool);
                if pool.open == pool.idle.len() {
                    break;
                }
            }
            if Instant::now() >= deadline {
                lock(&self.pool).closed = false;
                self.available.notify_all();
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let idle = {
            let mut pool = lock(&self.pool);
            pool.open = 0;
            std::mem::take(&mut pool.idle)
        };
        for session in idle {
            self.retire(session);
        }
        // Waits for a health check that holds the anchor, then closes it.
        if let Some(anchor) = lock(&self.anchor).take() {
            self.retire(anchor);
        }
        lock(&self.handles).clear();
        true
    }

    /// Closes `session`, unless the module was initialized again since it
    /// was opened: its handle could then name a session of the new
    /// context, so it is forgotten without a call.
    fn retire(&self, session: Session) {
        if is_current(&self.module, self.generation) {
            drop(session);
        } else {
            std::mem::forget(session);
        }
    }
}

/// A pooled session, returned to its pool on drop unless it failed.
pub(super) struct PooledSession {
    open: Arc<Open>,
    session: Option<Session>,
    pub(super) broken: bool,
}

impl PooledSession {
    pub(super) fn get(&self) -> Result<&Session, HsmError> {
        self.session.as_ref().ok_or(HsmError::Device {
            op: "session",
            detail: "session already returned".into(),
        })
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let mut pool = lock(&self.open.pool);
            if self.broken {
                self.open.retire(session);
                pool.open = pool.open.saturating_sub(1);
            } else {
                pool.idle.push(session);
            }
            drop(pool);
            self.open.available.notify_one();
        }
    }
}
