//! Recording a decision: the one place that turns the policy engine's
//! verdict into ledger entries, for admission and for the decision made
//! again at an approval quorum alike, and the one place that abandons an
//! admitted intent (its reservation released, its record forgotten).
//!
//! The entries a decision writes, in order:
//!
//! ```text
//! [breaker_reset (cooldown)]
//! locked:     signing_denied {agent_locked}
//! otherwise:  policy_evaluated, [breaker_tripped], [signing_denied {policy_denied}]
//! ```

use std::collections::BTreeMap;

use keyward_client::wire::{DenialReason, codes};

use crate::ledger::events::{BreakerReset, BreakerTripped, PolicyEvaluated, SigningDenied};
use crate::ledger::{LedgerError, LedgerTxn};
use crate::policy::engine::{self, ApprovalNeed, Trip};
use crate::policy::{AgentPolicy, Asset};
use crate::solana::Effects;
use crate::types::{KeyName, Lamports};

/// What a decision is about.
pub(super) struct DecisionInput<'a> {
    /// The agent, under the policy in force.
    pub agent: &'a AgentPolicy,
    /// The key asked for.
    pub key: &'a KeyName,
    /// What the message does, when there is one.
    pub effects: Option<&'a Effects>,
    /// Reasons to deny found before the policy (e.g. a key not allowed).
    pub pre_reasons: Vec<DenialReason>,
    /// The intent.
    pub intent_id: &'a str,
    /// Admission or the quorum.
    pub mode: engine::Mode,
    /// SHA-256 (hex) of the policy in force.
    pub policy_sha256: &'a str,
    /// At a quorum: the approvals that counted.
    pub after_approvals: Option<u64>,
}

/// What was decided and recorded.
#[derive(Debug)]
pub(super) enum Decided {
    /// The agent's breaker is open: nothing was evaluated.
    Locked {
        /// Seconds until the lock lifts.
        retry_after_s: u64,
    },
    /// Denied by policy.
    Denied(Vec<DenialReason>),
    /// Allowed above an approval threshold: nothing reserved yet.
    NeedsApproval(ApprovalNeed),
    /// Allowed: the spend is reserved.
    Allowed {
        /// SOL it spends.
        sol_spend: Lamports,
    },
}

/// Whole seconds (rounded up, at least 1) of a lock of `ms`.
pub(super) fn retry_after_s(ms: i64) -> u64 {
    u64::try_from((ms + 999) / 1000).unwrap_or(1).max(1)
}

fn by_asset(m: &BTreeMap<Asset, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(a, v)| (a.key(), *v)).collect()
}

/// Decides `input` over the counters in `txn` and records the decision.
pub(super) fn record_decision(
    txn: &mut LedgerTxn<'_>,
    input: DecisionInput<'_>,
) -> Result<Decided, LedgerError> {
    let name = input.agent.name.as_str();
    let id = Some(input.intent_id);
    let now = txn.now_ms();
    let verdict = engine::decide(
        txn.conn(),
        input.agent,
        input.key,
        input.effects,
        input.pre_reasons,
        input.intent_id,
        now,
        input.mode,
    )?;
    if verdict.cooled_down {
        txn.record(None, Some(name), &BreakerReset::cooldown(name))?;
    }
    if let Some(ms) = verdict.locked_for_ms {
        let retry_after_s = retry_after_s(ms);
        let denied = SigningDenied {
            code: codes::AGENT_LOCKED.to_owned(),
            reasons: Vec::new(),
            retry_after_s: Some(retry_after_s),
            detail: None,
        };
        txn.record(id, Some(name), &denied)?;
        return Ok(Decided::Locked { retry_after_s });
    }
    let decision = verdict.decision;
    txn.record(
        id,
        Some(name),
        &PolicyEvaluated {
            decision: if decision.allowed() { "allow" } else { "deny" }.to_owned(),
            after_approvals: input.after_approvals,
            reasons: decision.reasons.clone(),
            spend: by_asset(&decision.spend),
            spent_24h_before: by_asset(&verdict.spent_before),
            sol_spend_lamports: decision.sol_spend().0,
            policy_sha256: input.policy_sha256.to_owned(),
        },
    )?;
    record_trip(txn, name, id, verdict.tripped)?;
    if !decision.allowed() {
        let denied = SigningDenied {
            code: codes::POLICY_DENIED.to_owned(),
            reasons: decision.reasons.clone(),
            retry_after_s: None,
            detail: None,
        };
        txn.record(id, Some(name), &denied)?;
        return Ok(Decided::Denied(decision.reasons));
    }
    if let Some(need) = verdict.approval {
        return Ok(Decided::NeedsApproval(need));
    }
    Ok(Decided::Allowed {
        sol_spend: decision.sol_spend(),
    })
}

/// Records what counting a denial outside [`record_decision`] did to the
/// agent's breaker (a refused approval, a denied dry run).
pub(super) fn record_breaker(
    txn: &mut LedgerTxn<'_>,
    agent: &str,
    intent_id: Option<&str>,
    (trip, cooled_down): (Option<Trip>, bool),
) -> Result<(), LedgerError> {
    if cooled_down {
        txn.record(None, Some(agent), &BreakerReset::cooldown(agent))?;
    }
    record_trip(txn, agent, intent_id, trip)
}

fn record_trip(
    txn: &mut LedgerTxn<'_>,
    agent: &str,
    intent_id: Option<&str>,
    trip: Option<Trip>,
) -> Result<(), LedgerError> {
    if let Some(trip) = trip {
        txn.record(
            intent_id,
            Some(agent),
            &BreakerTripped::agent(agent, trip.denials, trip.until_ms),
        )?;
    }
    Ok(())
}

/// Abandons an admitted intent that was not signed (the HSM failed, the
/// daemon stopped, the ledger failed): records `signing_denied` with
/// `code` and `detail`, releases its reservation and rate event, and
/// forgets its record and approvals so the agent may submit it again.
pub(super) fn abandon_intent(
    txn: &mut LedgerTxn<'_>,
    agent: &str,
    intent_id: &str,
    code: &str,
    detail: String,
) -> Result<(), LedgerError> {
    txn.record(
        Some(intent_id),
        Some(agent),
        &SigningDenied {
            code: code.to_owned(),
            reasons: Vec::new(),
            retry_after_s: None,
            detail: Some(detail),
        },
    )?;
    engine::release(txn.conn(), agent, intent_id)?;
    crate::intents::forget(txn.conn(), agent, intent_id)?;
    crate::approval::store::forget_intent(txn.conn(), agent, intent_id)?;
    Ok(())
}
