//! The signing service: submission, the agent's approvals (and tokens an
//! operator relays, which take the same path), dry runs and the views.
//! Only this service asks the HSM to sign a transaction.

use std::sync::Arc;

use keyward_client::wire::{DenialReason, SignedIntent};

use super::shared::Core;
use crate::ledger::Ledger;
use crate::policy::{AgentPolicy, Policy};

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

/// The signing service shared by the API handlers.
pub struct Signer {
    pub(super) core: Arc<Core>,
}

impl Signer {
    /// The signing service on `core` (the one the
    /// [`Operations`](super::Operations) service holds).
    pub fn new(core: Arc<Core>) -> Arc<Signer> {
        Arc::new(Signer { core })
    }

    /// The shared state.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.core.policy()
    }

    /// The agent bound to a peer uid.
    pub fn agent_for_uid(&self, uid: u32) -> Option<AgentPolicy> {
        self.core.agent_for_uid(uid)
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        self.core.ledger()
    }
}
