//! Recovery from a module that lost its state: recognising it, re-opening
//! the module (rate-limited, with back-off) and the health check that finds it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::session::SessionState;

use super::session::{self, Open, lock};
use super::{Pkcs11Hsm, device};
use crate::hsm::HsmError;
use crate::types::KeyName;

/// Least time between two re-opens of the module; it doubles after each
/// re-open that fails, up to [`REOPEN_INTERVAL_MAX`].
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(2);

/// Longest wait between two re-opens of a module that stays broken.
pub const REOPEN_INTERVAL_MAX: Duration = Duration::from_secs(64);

/// How long a re-open waits for the calls in progress to finish.
const REOPEN_DRAIN: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct ReopenState {
    /// When the last re-open was tried.
    last: Option<Instant>,
    /// Re-opens that failed in a row.
    failures: u32,
    /// The module was initialized again (this generation) but logging in
    /// failed: the next attempt initializes it again.
    failed_generation: Option<u64>,
}

impl Pkcs11Hsm {
    /// Whether `e` means the module lost its state: an error the module
    /// reports as such, or "not found" for an Ed25519 key it had.
    fn lost_state(&self, e: &HsmError) -> bool {
        match e {
            HsmError::StateLost { .. } => true,
            HsmError::KeyNotFound(name) => lock(&self.known).contains(name),
            _ => false,
        }
    }

    pub(super) fn remember(&self, name: &KeyName) {
        lock(&self.known).insert(name.to_string());
    }

    /// Runs `f`; if it fails because the module lost its state, re-opens
    /// the module and runs `f` once more. Only for calls that may safely
    /// run twice (finding, signing, reading).
    pub(super) fn recovering<T>(&self, f: impl Fn() -> Result<T, HsmError>) -> Result<T, HsmError> {
        let before = self.current();
        match f() {
            Err(e) if self.lost_state(&e) => match self.reopen(&before) {
                Ok(()) => f(),
                Err(why) => Err(HsmError::StateLost {
                    op: "re-open",
                    detail: format!("{e}; not re-opened: {why}"),
                }),
            },
            other => other,
        }
    }

    /// Replaces the login `stale` (unless someone did already): closes its
    /// sessions, finalizes and initializes the module again, and logs in.
    /// At most one attempt per [`REOPEN_INTERVAL`].
    fn reopen(&self, stale: &Arc<Open>) -> Result<(), HsmError> {
        let mut state = lock(&self.reopened);
        if !Arc::ptr_eq(&self.current(), stale) {
            return Ok(());
        }
        let interval = REOPEN_INTERVAL
            .saturating_mul(1 << state.failures.min(6))
            .min(REOPEN_INTERVAL_MAX);
        if let Some(at) = state.last
            && at.elapsed() < interval
        {
            return Err(HsmError::StateLost {
                op: "re-open",
                detail: format!(
                    "the last attempt was {} ms ago; the next may start {} s after it",
                    at.elapsed().as_millis(),
                    interval.as_secs()
                ),
            });
        }
        state.last = Some(Instant::now());
        // Counted as failed until it succeeds.
        state.failures = state.failures.saturating_add(1);
        tracing::warn!(
            token = %self.cfg.token_label,
            module = %self.cfg.module.display(),
            "the HSM module lost its state; closing its sessions and initializing it again"
        );
        if !stale.close(REOPEN_DRAIN) {
            return Err(HsmError::StateLost {
                op: "re-open",
                detail: format!(
                    "HSM calls were still running after {} s; the module was not re-initialized",
                    REOPEN_DRAIN.as_secs()
                ),
            });
        }
        let generation = state.failed_generation.take().unwrap_or(stale.generation);
        let opened = session::reinitialize(&self.cfg.module, generation).and_then(|(ctx, g)| {
            Open::new(&self.cfg, ctx, g).inspect_err(|_| state.failed_generation = Some(g))
        });
        let open = match opened {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(error = %e, "re-opening the HSM module failed; the next call tries again");
                return Err(e);
            }
        };
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(open),
            Err(p) => *p.into_inner() = Arc::new(open),
        }
        state.failures = 0;
        tracing::warn!(token = %self.cfg.token_label, "HSM module re-opened and logged in again");
        Ok(())
    }

    /// Closes the current login and re-opens the module, as after a lost
    /// state (for tests and operators' drills); subject to
    /// [`REOPEN_INTERVAL`].
    pub fn reopen_now(&self) -> Result<(), HsmError> {
        let current = self.current();
        self.reopen(&current)
    }

    /// The login is in force and every Ed25519 key found since the start is
    /// found again by a fresh search (not a cached handle): a module that
    /// lost its objects fails here.
    pub(super) fn health_once(&self) -> Result<(), HsmError> {
        let open = self.current();
        let info = open
            .with_anchor(|s| s.get_session_info())?
            .map_err(device("C_GetSessionInfo"))?;
        match info.session_state() {
            SessionState::RwUser | SessionState::RoUser => {}
            other => {
                return Err(HsmError::StateLost {
                    op: "C_GetSessionInfo",
                    detail: format!("session state is {other:?}, not logged in as user"),
                });
            }
        }
        let known: Vec<String> = lock(&self.known).iter().cloned().collect();
        if !known.is_empty() {
            let s = open.session()?;
            for name in &known {
                if self.find_pair(s.get()?, name)?.is_none() {
                    return Err(HsmError::KeyNotFound(name.clone()));
                }
            }
        }
        Ok(())
    }
}
