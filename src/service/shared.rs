//! The state the signing service and the operations service share, held
//! once: the ledger, the HSM executor, the policy and keys in force (which
//! a reload swaps together), the intents in flight, the history gate and
//! the mirror gate. [`Signer`](super::Signer) and
//! [`Operations`](super::Operations) each hold the same `Arc<Core>`;
//! nothing here is copied between them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use super::SubmitError;
use super::history::HistoryGate;
use crate::hsm::{HsmExecutor, HsmKey};
use crate::ledger::Ledger;
use crate::mirror::MirrorGate;
use crate::policy::{AgentPolicy, Policy};
use crate::types::KeyName;

/// The HSM keys the policy refers to, by name: each name's active version.
pub type Keys = HashMap<KeyName, HsmKey>;

/// Retiring key versions still in the HSM, by name and version: they sign
/// their sweep intents and nothing else.
pub type RetiringKeys = HashMap<(KeyName, u32), HsmKey>;

/// The shared state of keywardd's services.
pub struct Core {
    pub(super) ledger: Ledger,
    pub(super) hsm: Arc<HsmExecutor>,
    /// The policy and its keys, swapped together by a reload: a reader
    /// sees both old or both new.
    in_force: RwLock<InForce>,
    pub(super) policy_path: PathBuf,
    /// Held by [`Operations::reload_policy`](super::Operations::reload_policy):
    /// one reload at a time.
    pub(super) reload_lock: tokio::sync::Mutex<()>,
    pub(super) approval_ttl_ms: i64,
    mirror_gate: OnceLock<Arc<MirrorGate>>,
    /// The label of the HSM device (PKCS#11 token label), for records.
    device_label: OnceLock<String>,
    /// The audit key (checkpoints, backup manifests), once the history is
    /// established.
    audit_key: OnceLock<HsmKey>,
    history: Arc<HistoryGate>,
    /// Intents being processed by a request right now, shared with the
    /// ledger writer so recovery can read it inside its write.
    in_flight: Arc<Mutex<InFlight>>,
    needs_recovery: AtomicBool,
}

/// A policy and the keys it refers to, as put in force together.
#[derive(Clone)]
pub(super) struct InForce {
    pub(super) policy: Arc<Policy>,
    pub(super) keys: Arc<Keys>,
    pub(super) retiring: Arc<RetiringKeys>,
}

impl InForce {
    /// The agent named `name` in this policy.
    pub(super) fn agent_named(&self, name: &str) -> Option<AgentPolicy> {
        self.policy
            .agents
            .iter()
            .find(|a| a.name.as_str() == name)
            .cloned()
    }
}

impl Core {
    /// The shared state. `keys` are the HSM keys the policy refers to;
    /// every HSM call goes through `hsm`; pending intents wait at most
    /// `approval_ttl` for their approvals.
    pub fn new(
        ledger: Ledger,
        hsm: Arc<HsmExecutor>,
        keys: Keys,
        policy: Policy,
        policy_path: PathBuf,
        approval_ttl: std::time::Duration,
    ) -> Arc<Core> {
        Arc::new(Core {
            ledger,
            hsm,
            in_force: RwLock::new(InForce {
                policy: Arc::new(policy),
                keys: Arc::new(keys),
                retiring: Arc::new(RetiringKeys::new()),
            }),
            policy_path,
            reload_lock: tokio::sync::Mutex::new(()),
            approval_ttl_ms: i64::try_from(approval_ttl.as_millis()).unwrap_or(i64::MAX / 2),
            mirror_gate: OnceLock::new(),
            device_label: OnceLock::new(),
            audit_key: OnceLock::new(),
            history: Arc::new(HistoryGate::default()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            needs_recovery: AtomicBool::new(false),
        })
    }

    /// The policy and keys in force, read together: one snapshot for a
    /// decision that needs both.
    pub(super) fn in_force(&self) -> InForce {
        match self.in_force.read() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a policy and its keys in force, both at once (the retiring
    /// keys stay).
    pub(super) fn put_in_force(&self, policy: Policy, keys: Keys) {
        self.update_in_force(|f| {
            f.policy = Arc::new(policy);
            f.keys = Arc::new(keys);
        });
    }

    /// Changes what is in force under the write lock: readers see all of
    /// the change or none of it.
    pub(super) fn update_in_force(&self, change: impl FnOnce(&mut InForce)) {
        match self.in_force.write() {
            Ok(mut f) => change(&mut f),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    /// Sets the retiring key versions (at start).
    pub fn set_retiring(&self, retiring: RetiringKeys) {
        self.update_in_force(|f| f.retiring = Arc::new(retiring));
    }

    /// The retiring key versions still in the HSM.
    pub fn retiring(&self) -> Arc<RetiringKeys> {
        self.in_force().retiring
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.in_force().policy
    }

    /// The HSM keys the policy in force refers to.
    pub fn keys(&self) -> Arc<Keys> {
        self.in_force().keys
    }

    /// The agent bound to a peer uid.
    pub fn agent_for_uid(&self, uid: u32) -> Option<AgentPolicy> {
        self.policy().agent_for_uid(uid).cloned()
    }

    /// The agent named `name` in the policy in force now.
    pub fn agent_named(&self, name: &str) -> Option<AgentPolicy> {
        self.in_force().agent_named(name)
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The HSM, behind its executor.
    pub fn hsm(&self) -> &Arc<HsmExecutor> {
        &self.hsm
    }

    /// Makes signing depend on the mirror keeping up (set once, at start).
    pub fn set_mirror_gate(&self, gate: Arc<MirrorGate>) {
        let _ = self.mirror_gate.set(gate);
    }

    /// Names the HSM device (the PKCS#11 token label) for the records of
    /// keys made through the admin socket; set once at start.
    pub fn set_device_label(&self, label: &str) {
        let _ = self.device_label.set(label.to_owned());
    }

    /// Sets the audit key (once, at start).
    pub fn set_audit_key(&self, key: HsmKey) {
        let _ = self.audit_key.set(key);
    }

    /// The audit key, once set.
    pub fn audit_key(&self) -> Option<&HsmKey> {
        self.audit_key.get()
    }

    /// The HSM device's label, once set.
    pub fn device_label(&self) -> Option<&str> {
        self.device_label.get().map(String::as_str)
    }

    /// The mirror gate, when a mirror is configured.
    pub fn mirror_gate(&self) -> Option<&Arc<MirrorGate>> {
        self.mirror_gate.get()
    }

    /// Whether the audit history verified so far holds.
    pub fn history_gate(&self) -> &Arc<HistoryGate> {
        &self.history
    }

    /// `Err` when signing must stop because the history is broken.
    pub(super) fn check_history(&self) -> Result<(), SubmitError> {
        self.history.check().map_err(SubmitError::HistoryBroken)
    }

    /// Whether an interrupted intent waits for recovery.
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery.load(Ordering::SeqCst)
    }

    /// Notes that an intent was left `in_progress` with its reservation:
    /// recovery must record and release it.
    pub(super) fn mark_needs_recovery(&self) {
        self.needs_recovery.store(true, Ordering::SeqCst);
    }

    /// Notes that recovery has run.
    pub(super) fn recovered(&self) {
        self.needs_recovery.store(false, Ordering::SeqCst);
    }

    /// Registers a request processing `intent_id` of `agent` until the
    /// guard drops. Every request registers before it queues the
    /// transaction that makes its intent `in_progress`.
    pub(super) fn begin_flight(&self, agent: &str, intent_id: &str) -> FlightGuard<'_> {
        let key = (agent.to_owned(), intent_id.to_owned());
        with_flights(&self.in_flight, |m| *m.entry(key.clone()).or_insert(0) += 1);
        FlightGuard { core: self, key }
    }

    /// The in-flight set, to be read inside a ledger write with
    /// [`live_flights`].
    pub(super) fn in_flight(&self) -> Arc<Mutex<InFlight>> {
        Arc::clone(&self.in_flight)
    }
}

/// (agent, intent id) → requests processing it now.
pub(super) type InFlight = HashMap<(String, String), usize>;

fn with_flights<T>(m: &Mutex<InFlight>, f: impl FnOnce(&mut InFlight) -> T) -> T {
    match m.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

/// The (agent, intent id) pairs some request is processing now.
pub(super) fn live_flights(m: &Mutex<InFlight>) -> HashSet<(String, String)> {
    with_flights(m, |m| m.keys().cloned().collect())
}

/// Removes an intent from the in-flight set when its request ends.
pub(super) struct FlightGuard<'a> {
    core: &'a Core,
    key: (String, String),
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        with_flights(&self.core.in_flight, |m| {
            if let Some(n) = m.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        });
    }
}
