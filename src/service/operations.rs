//! The operations service: what operators and keywardd's own housekeeping
//! do to the signer, each recorded in the ledger. Policy reload, breaker
//! resets (an agent's denial breaker and the audit breaker), the approver
//! registry, recovery of interrupted intents and expiry of pending ones;
//! key rotation and backups will join them here.
//!
//! It shares one [`Core`] with the signing service ([`Signer`]): a reload
//! swaps the policy and keys the signer reads, both at once.
//!
//! Where the borderline actions live, and why:
//!
//! - **Expiry** is here. It is housekeeping on the daemon's clock, like
//!   recovery: it ends intents (`intent_expired`) and never signs. The
//!   signing service does not need it to be correct: admission and the
//!   approval path treat an intent whose window has ended as expired
//!   whether or not its entry is written yet.
//! - **The operator's relay of approval tokens** (and the list of what
//!   waits for approvals) stays with the signing service
//!   ([`Signer::relay_approval`], [`Signer::pending_approvals`]), although
//!   the admin socket serves it. A relayed token takes the agent's own
//!   approval path, and at the quorum that path decides again and signs;
//!   keeping it in one place keeps one decision path, and keeps the rule
//!   that `Operations` never releases a signature: only [`Signer`] asks the
//!   HSM to sign a transaction. The list reports the same figures the
//!   approval path counts, from the same code.

use std::collections::HashSet;
use std::sync::Arc;

use keyward_client::wire::codes;

use super::decision;
use super::error::{BreakerError, ReloadError};
use super::shared::{Core, live_flights};
use crate::ledger::LedgerError;
use crate::ledger::events::{BreakerReset, IntentExpired, PolicyLoaded};
use crate::policy::Policy;

#[cfg(doc)]
use super::Signer;

/// A policy put in force by [`Operations::reload_policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// SHA-256 (hex) of the new policy file.
    pub policy_sha256: String,
    /// SHA-256 (hex) of the policy it replaced.
    pub previous_sha256: String,
    /// Sequence number of its `policy_loaded` entry.
    pub ledger_seq: u64,
}

/// The name of the audit breaker (the ledger's), beside the agents' breakers.
pub const AUDIT_BREAKER: &str = "audit";

/// The operations service shared by the admin API and the daemon's
/// signal handler and background tasks.
pub struct Operations {
    pub(super) core: Arc<Core>,
}

impl Operations {
    /// The operations service on `core` (the one the [`Signer`] holds).
    pub fn new(core: Arc<Core>) -> Arc<Operations> {
        Arc::new(Operations { core })
    }

    /// The shared state.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Loads the policy file again and, if it is valid and every key it
    /// names is in the HSM, records `policy_loaded` and puts it in force at
    /// once, with its keys (decisions already past their admission keep
    /// the policy they were decided under). An invalid file changes
    /// nothing.
    pub async fn reload_policy(&self, by: &str) -> Result<ReloadOutcome, ReloadError> {
        let core = &self.core;
        let _one_at_a_time = core.reload_lock.lock().await;
        let path = core.policy_path.clone();
        let policy = tokio::task::spawn_blocking(move || Policy::load(&path))
            .await
            .map_err(|e| ReloadError::Internal(e.to_string()))?
            .map_err(ReloadError::Invalid)?;
        // Every key found again through the registry: a key replaced in
        // the HSM since it was loaded is refused here, not served.
        let (keys, _, missing) = super::keys::resolve(
            &core.ledger,
            &core.hsm,
            policy.all_keys().into_iter().collect(),
        )
        .await
        .map_err(ReloadError::Ledger)?;
        if let Some((name, e)) = missing.into_iter().next() {
            return Err(ReloadError::MissingKey {
                key: name.to_string(),
                detail: e.to_string(),
            });
        }
        let previous = core.policy().hash_hex();
        let hash = policy.hash_hex();
        let loaded = PolicyLoaded {
            policy_sha256: hash.clone(),
            previous_sha256: Some(previous.clone()),
            path: core.policy_path.display().to_string(),
            by: Some(by.to_owned()),
            agents: policy.agents.iter().map(|a| a.name.to_string()).collect(),
        };
        let seq = core
            .ledger
            .write(move |txn| Ok(txn.record(None, None, &loaded)?.seq.0))
            .await
            .map_err(ReloadError::Ledger)?;
        core.put_in_force(policy, keys);
        tracing::info!(policy_sha256 = %hash, previous = %previous, by, "policy reloaded");
        Ok(ReloadOutcome {
            policy_sha256: hash,
            previous_sha256: previous,
            ledger_seq: seq,
        })
    }

    /// Resets the breaker named `name` on an operator's (`actor`'s)
    /// request: `audit` (see [`Operations::reset_audit_breaker`]) or an
    /// agent of the policy in force (see
    /// [`Operations::reset_agent_breaker`]). Returns the sequence of its
    /// `breaker_reset` entry.
    pub async fn reset_breaker(&self, name: &str, actor: &str) -> Result<u64, BreakerError> {
        if name == AUDIT_BREAKER {
            return Ok(self.reset_audit_breaker(actor).await?);
        }
        if self.core.agent_named(name).is_none() {
            return Err(BreakerError::Unknown(name.to_owned()));
        }
        Ok(self.reset_agent_breaker(name, actor).await?)
    }

    /// Clears an agent's denial breaker on an operator's request and
    /// records `breaker_reset` with the state before; returns its sequence.
    pub async fn reset_agent_breaker(&self, agent: &str, actor: &str) -> Result<u64, LedgerError> {
        let agent = agent.to_owned();
        let actor = actor.to_owned();
        self.core
            .ledger
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

    /// Closes the audit breaker (the ledger writes again) on an operator's
    /// request, recorded as `breaker_reset`; returns its sequence. Then
    /// records the intents interrupted while it was open and releases
    /// their reservations (a failure there is logged, and retried by the
    /// daemon's recovery task).
    pub async fn reset_audit_breaker(&self, actor: &str) -> Result<u64, LedgerError> {
        let entry = self.core.ledger.reset_breaker(actor).await?;
        if let Err(e) = self.recover().await {
            tracing::error!(error = %e, "recovery of interrupted intents failed after breaker reset");
        }
        Ok(entry.seq.0)
    }

    /// Records every pending intent whose approval window has ended as
    /// `intent_expired` and marks it expired. Returns how many.
    pub async fn expire_due(&self) -> Result<usize, LedgerError> {
        let now = crate::ledger::now_ms();
        // A cheap read first: the writer is only bothered when there is work.
        let reader = self.core.ledger.reader()?;
        let due = crate::intents::due_to_expire(&reader, now).map_err(LedgerError::Sqlite)?;
        drop(reader);
        if due.is_empty() {
            return Ok(0);
        }
        self.core
            .ledger
            .write(move |txn| {
                let now = txn.now_ms();
                let mut n = 0;
                for (agent, intent_id) in crate::intents::due_to_expire(txn.conn(), now)? {
                    let Some(p) = crate::intents::pending(txn.conn(), &agent, &intent_id)? else {
                        continue;
                    };
                    let body = crate::intents::error_reply(
                        codes::INTENT_EXPIRED,
                        "this intent waited for approvals longer than the approval window",
                    )?;
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

    /// Whether an interrupted intent waits for [`Operations::recover`].
    pub fn needs_recovery(&self) -> bool {
        self.core.needs_recovery()
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
        let in_flight = self.core.in_flight();
        let n = self
            .core
            .ledger
            .write(move |txn| {
                let live: HashSet<(String, String)> = live_flights(&in_flight);
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
        self.core.recovered();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::hsm::{HsmExecutor, HsmKey};
    use crate::ledger::Ledger;
    use crate::types::KeyName;

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
        fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), crate::hsm::HsmError> {
            Err(crate::hsm::HsmError::KeyNotFound(key.name.to_string()))
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
        let core = Core::new(
            ledger,
            Arc::new(hsm),
            HashMap::new(),
            policy,
            path,
            std::time::Duration::from_secs(60),
        );
        let operations = Operations::new(Arc::clone(&core));
        let s = Arc::clone(&core);
        *HOOK.lock().unwrap() = Some(Box::new(move || {
            // What `submit` does: the flight first, then the admission
            // that makes the intent `in_progress`.
            std::mem::forget(s.begin_flight("dev", "i-1"));
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
        let n = rt.block_on(operations.recover()).unwrap();
        assert_eq!(n, 0, "an intent in flight was recovered as interrupted");
        let conn = core.ledger().reader().unwrap();
        let rec = crate::intents::get(&conn, "dev", "i-1").unwrap().unwrap();
        assert_eq!(rec.status, crate::intents::IntentStatus::InProgress);
    }
}
