//! The service's errors: what a request gets when nothing was recorded as
//! its decision, why a reload changed nothing, and why a breaker reset was
//! refused. Each has a stable
//! snake_case code; the API maps them to HTTP.

use keyward_client::wire::codes;

use crate::ledger::LedgerError;

/// Errors of a submission that are not a recorded decision.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request is malformed; nothing was recorded or counted.
    #[error("{message}")]
    BadRequest {
        /// Stable code, e.g. `invalid_message`.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The intent id was used before with different content.
    #[error("intent id was already used with different content")]
    Conflict,
    /// No such intent (or approver).
    #[error("not found")]
    NotFound,
    /// The intent id is being processed right now.
    #[error("this intent is being processed; ask again with GET /v1/intents/{{id}}")]
    InProgress,
    /// The ledger could not record; nothing was signed or released.
    #[error("the audit ledger cannot record right now, so nothing is signed: {0}")]
    AuditUnavailable(#[source] LedgerError),
    /// The HSM failed, was busy (its queue stayed full), timed out or
    /// returned a signature that does not verify; nothing was released.
    /// Its code is the HSM error's (`hsm_unavailable`, `hsm_busy`,
    /// `hsm_bad_signature`, `key_not_found`, ...).
    #[error("the HSM could not sign: {0}")]
    Hsm(#[source] crate::hsm::HsmError),
    /// The external copy of the ledger is too far behind: nothing is
    /// signed until it catches up.
    #[error("the ledger mirror is behind ({0}); nothing is signed until it catches up")]
    MirrorLagging(String),
    /// The audit history failed verification while running: nothing is
    /// signed until an operator restarts keywardd on a verified history.
    #[error("the audit history is broken ({0}); nothing is signed")]
    HistoryBroken(String),
    /// An operator froze signing for a scope the request falls in
    /// (`keyward freeze`): nothing was signed or counted and no intent
    /// record kept (a refused submission is recorded as `signing_denied
    /// {frozen}`; a refused approval records nothing and uses no nonce).
    #[error("{0}")]
    Frozen(super::freeze::Frozen),
    /// An internal error; nothing was released.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SubmitError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::BadRequest { code, .. } => code,
            SubmitError::Conflict => codes::INTENT_CONFLICT,
            SubmitError::NotFound => codes::INTENT_NOT_FOUND,
            SubmitError::InProgress => codes::INTENT_IN_PROGRESS,
            SubmitError::AuditUnavailable(_) => codes::AUDIT_UNAVAILABLE,
            SubmitError::Hsm(e) => e.code(),
            SubmitError::MirrorLagging(_) => codes::MIRROR_LAGGING,
            SubmitError::HistoryBroken(_) => codes::LEDGER_HISTORY_BROKEN,
            SubmitError::Frozen(_) => codes::FROZEN,
            SubmitError::Internal(_) => codes::INTERNAL,
        }
    }
}

impl From<LedgerError> for SubmitError {
    fn from(e: LedgerError) -> Self {
        SubmitError::AuditUnavailable(e)
    }
}

impl From<rusqlite::Error> for SubmitError {
    fn from(e: rusqlite::Error) -> Self {
        SubmitError::AuditUnavailable(LedgerError::Sqlite(e))
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is invalid: file, line, column and what is wrong.
    #[error("{0}")]
    Invalid(crate::config::ConfigError),
    /// The policy names a key the HSM does not have.
    #[error("the policy names key {key:?}, which the HSM does not have: {detail}")]
    MissingKey {
        /// The key name.
        key: String,
        /// What the HSM said.
        detail: String,
    },
    /// The `policy_loaded` entry could not be recorded.
    #[error("the ledger cannot record the new policy: {0}")]
    Ledger(LedgerError),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReloadError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "invalid_policy",
            ReloadError::MissingKey { .. } => "key_not_found",
            ReloadError::Ledger(_) => codes::AUDIT_UNAVAILABLE,
            ReloadError::Internal(_) => codes::INTERNAL,
        }
    }
}

/// Why a breaker reset changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError {
    /// No breaker by that name: neither `audit` nor an agent of the policy
    /// in force.
    #[error("no breaker named {0:?}: give `audit` or the name of an agent in the policy")]
    Unknown(String),
    /// The reset could not be recorded.
    #[error("{0}")]
    Ledger(#[from] LedgerError),
}

impl BreakerError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            BreakerError::Unknown(_) => "unknown_breaker",
            BreakerError::Ledger(_) => codes::AUDIT_UNAVAILABLE,
        }
    }
}
