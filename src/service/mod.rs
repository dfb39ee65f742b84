//! The signing service: the request path from a parsed intent to a recorded
//! signature, independent of the transport.
//!
//! ```text
//! prepare (pure) -> ledger txn A: intent_received, policy_evaluated, reserve spend
//!   -> HSM sign + software verify (no lock held) -> ledger txn B: signature_created,
//!   spend confirmed -> response
//! ```
//! Nothing is released before txn B is durably committed. If anything fails
//! between A and B, the reservation stays counted (fail closed) until
//! [`Signer::recover`] records the interruption and releases it.

mod approvals;
mod approvers;
pub mod checkpoints;
mod decision;
pub mod history;
mod prepare;
mod relay;
mod submit;
mod views;

pub use approvals::ApprovalOutcome;
pub use approvers::encode_key;
pub use submit::denial_body;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use keyward_client::wire::{DenialReason, SignedIntent, codes};

use crate::hsm::{HsmExecutor, HsmKey};
use crate::ledger::events::{BreakerReset, IntentExpired, PolicyLoaded};
use crate::ledger::{Ledger, LedgerError};
use crate::mirror::MirrorGate;
use crate::policy::{AgentPolicy, Policy};
use crate::types::KeyName;

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

/// Result of a submission that the ledger recorded (or replayed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Signed and recorded.
    Signed(SignedIntent),
    /// Denied by policy and recorded.
    Denied(Vec<DenialReason>),
    /// The agent's denial breaker is open: `agent_locked`.
    Locked {
        /// Seconds until the lock lifts.
        retry_after_s: u64,
    },
    /// Allowed but above an approval threshold: waits for approvals.
    Pending(Box<keyward_client::wire::PendingIntent>),
    /// The intent's approval window ran out: `intent_expired`.
    Expired,
    /// The same intent was submitted before: its original response.
    Replayed {
        /// The intent's status, which the original response answered.
        status: crate::intents::IntentStatus,
        /// Original JSON body.
        body: Vec<u8>,
    },
}

/// A policy put in force by [`Signer::reload_policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// SHA-256 (hex) of the new policy file.
    pub policy_sha256: String,
    /// SHA-256 (hex) of the policy it replaced.
    pub previous_sha256: String,
    /// Sequence number of its `policy_loaded` entry.
    pub ledger_seq: u64,
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

/// The signing service shared by all API handlers.
pub struct Signer {
    ledger: Ledger,
    hsm: Arc<HsmExecutor>,
    keys: RwLock<Arc<HashMap<KeyName, HsmKey>>>,
    policy: RwLock<Arc<Policy>>,
    policy_path: std::path::PathBuf,
    reload_lock: tokio::sync::Mutex<()>,
    approval_ttl_ms: i64,
    mirror_gate: std::sync::OnceLock<Arc<MirrorGate>>,
    history: Arc<history::HistoryGate>,
    /// Intents being processed by a request right now, shared with the
    /// ledger writer so [`Signer::recover`] can read it inside its write.
    in_flight: Arc<Mutex<InFlight>>,
    needs_recovery: AtomicBool,
}

impl Signer {
    /// Clears an agent's denial breaker on an operator's request and
    /// records `breaker_reset` with the state before; returns its sequence.
    pub async fn reset_agent_breaker(&self, agent: &str, actor: &str) -> Result<u64, LedgerError> {
        let agent = agent.to_owned();
        let actor = actor.to_owned();
        self.ledger
            .write(move |txn| {
                let (denials, locked_until) =
                    crate::policy::engine::reset_breaker(txn.conn(), &agent)?;
                let reset = BreakerReset {
                    breaker: agent.clone(),
                    by: Some(actor),
                    consecutive_denials_before: Some(denials),
                    was_locked: Some(locked_until > txn.now_ms()),
                    actor: None,
                    was_open: None,
                };
                let entry = txn.record(None, Some(&agent), &reset)?;
                Ok(entry.seq.0)
            })
            .await
    }
}

impl Signer {
    /// Builds the service. `keys` are the HSM keys the policy refers to;
    /// every HSM call goes through `hsm`.
    pub fn new(
        ledger: Ledger,
        hsm: Arc<HsmExecutor>,
        keys: HashMap<KeyName, HsmKey>,
        policy: Policy,
        policy_path: std::path::PathBuf,
        approval_ttl: std::time::Duration,
    ) -> Arc<Signer> {
        Arc::new(Signer {
            ledger,
            hsm,
            keys: RwLock::new(Arc::new(keys)),
            policy: RwLock::new(Arc::new(policy)),
            policy_path,
            reload_lock: tokio::sync::Mutex::new(()),
            approval_ttl_ms: i64::try_from(approval_ttl.as_millis()).unwrap_or(i64::MAX / 2),
            mirror_gate: std::sync::OnceLock::new(),
            history: Arc::new(history::HistoryGate::default()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            needs_recovery: AtomicBool::new(false),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The agent bound to a peer uid.
    pub fn agent_for_uid(&self, uid: u32) -> Option<AgentPolicy> {
        self.policy().agent_for_uid(uid).cloned()
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The HSM, behind its executor.
    pub fn hsm(&self) -> &Arc<HsmExecutor> {
        &self.hsm
    }

    /// The HSM keys the policy refers to.
    pub fn keys(&self) -> Arc<HashMap<KeyName, HsmKey>> {
        match self.keys.read() {
            Ok(k) => Arc::clone(&k),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Records every pending intent whose approval window has ended as
    /// `intent_expired` and marks it expired. Returns how many.
    pub async fn expire_due(&self) -> Result<usize, LedgerError> {
        let now = crate::ledger::now_ms();
        // A cheap read first: the writer is only bothered when there is work.
        let reader = self.ledger.reader()?;
        let due = crate::intents::due_to_expire(&reader, now).map_err(LedgerError::Sqlite)?;
        drop(reader);
        if due.is_empty() {
            return Ok(0);
        }
        self.ledger
            .write(move |txn| {
                let now = txn.now_ms();
                let mut n = 0;
                for (agent, intent_id) in crate::intents::due_to_expire(txn.conn(), now)? {
                    let Some(p) = crate::intents::pending(txn.conn(), &agent, &intent_id)? else {
                        continue;
                    };
                    let body = crate::intents::reply_json(&keyward_client::wire::ErrorBody {
                        error: keyward_client::wire::ErrorDetail {
                            code: codes::INTENT_EXPIRED.to_owned(),
                            message:
                                "this intent waited for approvals longer than the approval window"
                                    .into(),
                            reasons: Vec::new(),
                            retry_after: None,
                        },
                    })?;
                    crate::intents::finish(
                        txn.conn(),
                        &agent,
                        &intent_id,
                        crate::intents::IntentStatus::Expired,
                        &body,
                        now,
                    )?;
                    let expired = IntentExpired {
                        intent_hash: hex::encode(p.intent_hash),
                        expired_at: crate::ledger::format_utc(p.expires_ms),
                    };
                    txn.record(Some(&intent_id), Some(&agent), &expired)?;
                    n += 1;
                }
                Ok(n)
            })
            .await
    }

    /// Loads the policy file again and, if it is valid and every key it
    /// names is in the HSM, records `policy_loaded` and puts it in force at
    /// once (decisions already past their admission keep the policy they
    /// were decided under). An invalid file changes nothing.
    pub async fn reload_policy(&self, by: &str) -> Result<ReloadOutcome, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let path = self.policy_path.clone();
        let policy = tokio::task::spawn_blocking(move || Policy::load(&path))
            .await
            .map_err(|e| ReloadError::Internal(e.to_string()))?
            .map_err(ReloadError::Invalid)?;
        let current = self.keys();
        let mut keys = (*current).clone();
        for name in policy.all_keys() {
            if keys.contains_key(&name) {
                continue;
            }
            let key = self
                .hsm
                .find_ed25519(&name)
                .await
                .map_err(|e| ReloadError::MissingKey {
                    key: name.to_string(),
                    detail: e.to_string(),
                })?;
            keys.insert(name, key);
        }
        let previous = self.policy().hash_hex();
        let hash = policy.hash_hex();
        let loaded = PolicyLoaded {
            policy_sha256: hash.clone(),
            previous_sha256: Some(previous.clone()),
            path: self.policy_path.display().to_string(),
            by: Some(by.to_owned()),
            agents: policy.agents.iter().map(|a| a.name.to_string()).collect(),
        };
        let seq = self
            .ledger
            .write(move |txn| Ok(txn.record(None, None, &loaded)?.seq.0))
            .await
            .map_err(ReloadError::Ledger)?;
        match self.keys.write() {
            Ok(mut k) => *k = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
        match self.policy.write() {
            Ok(mut p) => *p = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
        tracing::info!(policy_sha256 = %hash, previous = %previous, by, "policy reloaded");
        Ok(ReloadOutcome {
            policy_sha256: hash,
            previous_sha256: previous,
            ledger_seq: seq,
        })
    }

    /// Makes signing depend on the mirror keeping up.
    pub fn set_mirror_gate(&self, gate: Arc<MirrorGate>) {
        let _ = self.mirror_gate.set(gate);
    }

    /// Whether the audit history verified so far holds.
    pub fn history_gate(&self) -> &Arc<history::HistoryGate> {
        &self.history
    }

    /// `Err` when signing must stop because the history is broken.
    fn check_history(&self) -> Result<(), SubmitError> {
        self.history.check().map_err(SubmitError::HistoryBroken)
    }

    /// The mirror gate, when a mirror is configured.
    pub fn mirror_gate(&self) -> Option<&Arc<MirrorGate>> {
        self.mirror_gate.get()
    }

    /// Whether an interrupted intent waits for [`Signer::recover`].
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery.load(Ordering::SeqCst)
    }

    /// Records every intent left in progress by a crash or a failed ledger
    /// write as interrupted and releases its reservation (no signature was
    /// released for it). Intents being processed right now are left alone.
    ///
    /// The snapshot of in-flight intents is taken inside the write, on the
    /// writer thread: every request registers its flight before it queues
    /// the transaction that makes its intent `in_progress` (submission's
    /// admission, an approval's quorum), so by the time the writer runs
    /// this job, any intent it finds `in_progress` either has a live
    /// flight in the map or was left behind by a request that has ended.
    /// A snapshot taken before queueing the job could miss an intent
    /// admitted in between and release the spend of an intent being
    /// signed.
    pub async fn recover(&self) -> Result<usize, LedgerError> {
        #[cfg(test)]
        tests::before_recover_write();
        let in_flight = Arc::clone(&self.in_flight);
        let n = self
            .ledger
            .write(move |txn| {
                let live: HashSet<(String, String)> =
                    with_flights(&in_flight, |m| m.keys().cloned().collect());
                let stale: Vec<(String, String)> = crate::intents::in_progress(txn.conn())?
                    .into_iter()
                    .filter(|k| !live.contains(k))
                    .collect();
                for (agent, intent_id) in &stale {
                    decision::abandon_intent(
                        txn,
                        agent,
                        intent_id,
                        "interrupted",
                        "signing did not complete (the daemon stopped or the ledger failed); no signature was released".to_owned(),
                    )?;
                }
                Ok(stale.len())
            })
            .await?;
        self.needs_recovery.store(false, Ordering::SeqCst);
        Ok(n)
    }

    fn begin_flight(&self, agent: &str, intent_id: &str) -> FlightGuard<'_> {
        let key = (agent.to_owned(), intent_id.to_owned());
        self.flights(|m| *m.entry(key.clone()).or_insert(0) += 1);
        FlightGuard { signer: self, key }
    }

    fn flights<T>(&self, f: impl FnOnce(&mut InFlight) -> T) -> T {
        with_flights(&self.in_flight, f)
    }
}

/// (agent, intent id) → requests processing it now.
type InFlight = HashMap<(String, String), usize>;

fn with_flights<T>(m: &Mutex<InFlight>, f: impl FnOnce(&mut InFlight) -> T) -> T {
    match m.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

/// Removes an intent from the in-flight set when its request ends.
struct FlightGuard<'a> {
    signer: &'a Signer,
    key: (String, String),
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.signer.flights(|m| {
            if let Some(n) = m.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    type Hook = Box<dyn FnOnce() + Send>;
    static HOOK: Mutex<Option<Hook>> = Mutex::new(None);

    /// Runs once where `recover` used to take its snapshot of the
    /// in-flight intents, just before it queues its write.
    pub(super) fn before_recover_write() {
        let hook = HOOK.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
    }

    use crate::hsm::Hsm;

    /// An HSM that is never reached: recovery does not sign.
    struct NoHsm;

    impl Hsm for NoHsm {
        fn backend(&self) -> &'static str {
            "none"
        }
        fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(name.to_string()))
        }
        fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(name.to_string()))
        }
        fn list_ed25519(&self) -> Result<Vec<HsmKey>, crate::hsm::HsmError> {
            Ok(Vec::new())
        }
        fn sign_ed25519(&self, key: &HsmKey, _: &[u8]) -> Result<[u8; 64], crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(key.name.to_string()))
        }
        fn random(&self, _: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound("random".into()))
        }
        fn import_hmac_key(&self, label: &str, _: &[u8]) -> Result<(), crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(label.into()))
        }
        fn hmac_sha256(&self, label: &str, _: &[u8]) -> Result<[u8; 32], crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(label.into()))
        }
        fn delete_secret(&self, _: &str) -> Result<bool, crate::hsm::HsmError> {
            Ok(false)
        }
        fn store_data(&self, label: &str, _: &[u8]) -> Result<(), crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(label.into()))
        }
        fn load_data(&self, _: &str) -> Result<Vec<Vec<u8>>, crate::hsm::HsmError> {
            Ok(Vec::new())
        }
        fn health(&self) -> Result<(), crate::hsm::HsmError> {
            Ok(())
        }
    }

    /// An intent admitted (its flight registered, then its admission
    /// committed) after `recover` was called but before its write runs is
    /// live, not stale: recovery must not release it.
    #[test]
    fn recovery_leaves_an_intent_admitted_while_it_was_queued_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(
            &dir.path().join("l.sqlite3"),
            crate::ledger::LedgerOptions {
                commit_delay: std::time::Duration::ZERO,
            },
        )
        .unwrap();
        let path = dir.path().join("policy.toml");
        let policy = Policy::parse(&path, "", &|_: &str| None).unwrap();
        let hsm = HsmExecutor::start(Arc::new(NoHsm), Default::default()).unwrap();
        let signer = Signer::new(
            ledger,
            Arc::new(hsm),
            HashMap::new(),
            policy,
            path,
            std::time::Duration::from_secs(60),
        );
        let s = Arc::clone(&signer);
        *HOOK.lock().unwrap() = Some(Box::new(move || {
            // What `submit` does: the flight first, then the admission
            // that makes the intent `in_progress`.
            s.flights(|m| *m.entry(("dev".into(), "i-1".into())).or_insert(0) += 1);
            s.ledger
                .write_blocking(|txn| {
                    let entry = txn.append(
                        crate::ledger::EventType::IntentReceived,
                        Some("i-1"),
                        Some("dev"),
                        b"{}",
                    )?;
                    let now = txn.now_ms();
                    crate::intents::insert(
                        txn.conn(),
                        &crate::intents::NewIntent {
                            agent: "dev",
                            intent_id: "i-1",
                            content_hash: &[0; 32],
                            status: crate::intents::IntentStatus::InProgress,
                            reply: None,
                            received_seq: entry.seq.0,
                            now_ms: now,
                        },
                    )?;
                    Ok(())
                })
                .unwrap();
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let n = rt.block_on(signer.recover()).unwrap();
        assert_eq!(n, 0, "an intent in flight was recovered as interrupted");
        let conn = signer.ledger().reader().unwrap();
        let rec = crate::intents::get(&conn, "dev", "i-1").unwrap().unwrap();
        assert_eq!(rec.status, crate::intents::IntentStatus::InProgress);
    }
}
