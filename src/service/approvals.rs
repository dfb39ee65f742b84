//! Approvals of pending intents: the agent's tokens and the checks that
//! decide what counts, under the approvers and the policy in force now.

use std::sync::Arc;

use keyward_client::wire::{
    DenialReason, ErrorBody, ErrorDetail, PendingIntent, SignedIntent, codes,
};

use super::decision::{Decided, DecisionInput, record_breaker, record_decision, retry_after_s};
use super::{Core, Signer, SubmitError, SubmitOutcome, denial_body};
use crate::approval::{self, ApprovalError, Verdict, store};
use crate::intents::{self, IntentStatus, reply_json};
use crate::ledger::LedgerError;
use crate::ledger::events::{ApprovalDecision, ApprovalGranted, ApprovalRefused, ApprovalRejected};
use crate::policy::{AgentPolicy, engine, spend_by_asset};
use crate::solana::{decode_message, extract_effects};

/// What an approval token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Refused, with its code; recorded as `approval_refused`.
    Refused(ApprovalError),
    /// Counted; the intent still waits. The pending reply with the current
    /// figures (`required` and `received` under the policy in force now).
    Counted(Box<PendingIntent>),
    /// The quorum was reached and the intent signed.
    Signed(SignedIntent),
    /// The quorum was reached but the policy no longer allows the intent.
    Denied(Vec<DenialReason>),
    /// A rejection ended the intent.
    Rejected,
    /// The agent's denial breaker is open (recorded): `agent_locked`.
    Locked {
        /// Seconds until the lock lifts.
        retry_after_s: u64,
    },
    /// The token would complete the quorum of an intent under an
    /// emergency freeze: nothing was recorded and its nonce is unused, so
    /// it can be sent again once the freeze is lifted.
    Frozen(super::freeze::Frozen),
}

use crate::ledger::now_ms;

/// Longest `detail` of an `approval_refused` entry (bytes).
pub const MAX_REFUSAL_DETAIL: usize = 200;

/// Who hands a token in: the agent (its own intent; refusals count toward
/// its breaker and rate windows) or an operator relaying it through the
/// admin socket (recorded with `relayed_by`; nothing counts against the
/// agent, and a locked agent does not stop a relayed token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Relay<'a> {
    /// The agent's own request.
    Agent,
    /// An operator, e.g. `uid:0`.
    Operator(&'a str),
}

impl Relay<'_> {
    fn by(&self) -> Option<String> {
        match self {
            Relay::Agent => None,
            Relay::Operator(by) => Some((*by).to_owned()),
        }
    }
}

fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What the writer decided for an approval.
enum Recorded {
    Refused(ApprovalError),
    Locked(u64),
    Counted(Box<PendingIntent>),
    Rejected,
    Denied(Vec<DenialReason>),
    Quorum(Box<Quorum>),
    Frozen(super::freeze::Frozen),
}

/// An approved intent, decided again and ready to sign.
struct Quorum {
    key: crate::hsm::HsmKey,
    message: Vec<u8>,
    decoded: crate::solana::DecodedMessage,
    effects: crate::solana::Effects,
    sol_spend: crate::types::Lamports,
}

/// What the policy in force now asks of a pending intent.
pub(super) struct CurrentNeed {
    /// Approvals needed now; 0 when the policy no longer asks for any
    /// (the next approval then leads to a fresh decision).
    pub(super) required: u64,
    /// Who may approve now: the policy's list, or, when it asks for no
    /// approval any more, the list the intent was submitted under.
    pub(super) of: Vec<String>,
    because: Vec<String>,
    key: crate::hsm::HsmKey,
    decoded: crate::solana::DecodedMessage,
    effects: crate::solana::Effects,
}

/// Re-derives the approval need of a pending intent from `agent`'s policy
/// in force now, the way submission derived it: from the effects of the
/// exact stored message.
pub(super) fn current_need(
    agent: &AgentPolicy,
    in_force: &super::shared::InForce,
    p: &intents::Pending,
) -> Result<CurrentNeed, LedgerError> {
    // The active version of the key's name, or for a sweep its retiring
    // version.
    let Some(key) = super::sweep::key_of(in_force, &p.key) else {
        return Err(LedgerError::Corrupt(format!("key {} is not served", p.key)));
    };
    let decoded = decode_message(&p.message)
        .map_err(|e| LedgerError::Corrupt(format!("stored message: {e}")))?;
    let effects = extract_effects(&decoded, &key.public_key);
    let spend = spend_by_asset(&effects).unwrap_or_default();
    let (required, of, because) = match engine::approval_need(agent, &spend) {
        Some(n) => (u64::from(n.required), n.of, n.because),
        None => (0, p.approval.approvers.clone(), Vec::new()),
    };
    Ok(CurrentNeed {
        required,
        of,
        because,
        key,
        decoded,
        effects,
    })
}

/// A pending intent's approval figures under the policy in force now.
#[derive(Debug, Default)]
pub(super) struct Figures {
    /// Approvals required now.
    pub(super) required: u64,
    /// Approvals that count now.
    pub(super) received: u64,
    /// Who may approve now.
    pub(super) of: Vec<String>,
}

impl Signer {
    /// The figures of `p` (a pending intent of `agent`) now: required by
    /// the policy in force, received from approvers enrolled and listed now.
    pub(super) fn current_figures(
        &self,
        agent: &AgentPolicy,
        intent_id: &str,
        p: &intents::Pending,
    ) -> Result<Figures, SubmitError> {
        let need = current_need(agent, &self.core.in_force(), p)?;
        let reader = self.core.ledger.reader()?;
        let mut received = 0;
        for (approver, decision, _) in store::decisions(&reader, agent.name.as_str(), intent_id)
            .map_err(LedgerError::Sqlite)?
        {
            if decision == "approve"
                && counts_now(&reader, &approver, &need.of).map_err(LedgerError::Sqlite)?
            {
                received += 1;
            }
        }
        Ok(Figures {
            required: need.required,
            received,
            of: need.of,
        })
    }
}

/// Whether `approver` counts now: enrolled now and listed in `of`.
pub(super) fn counts_now(
    conn: &rusqlite::Connection,
    approver: &str,
    of: &[String],
) -> rusqlite::Result<bool> {
    if !of.iter().any(|n| n == approver) {
        return Ok(false);
    }
    Ok(store::approver(conn, approver)?.is_some_and(|a| a.removed_ms.is_none()))
}

/// Records a refused approval in `txn`. For the agent's own request it
/// counts toward the agent's rate windows and breaker (recording a trip);
/// an agent already locked gets `agent_locked` recorded instead.
fn refuse(
    txn: &mut crate::ledger::LedgerTxn<'_>,
    agent: &AgentPolicy,
    intent_id: &str,
    e: ApprovalError,
    token: Option<&approval::TokenPayload>,
    relay: Relay<'_>,
) -> Result<Recorded, LedgerError> {
    let name = agent.name.as_str();
    let now = txn.now_ms();
    let relayed_by = relay.by();
    if relay == Relay::Agent
        && let Some(ms) = engine::locked_for_ms(txn.conn(), name, now)?
    {
        return record_locked(txn, name, intent_id, ms);
    }
    let refused = ApprovalRefused {
        code: e.code().to_owned(),
        detail: bounded(e.to_string(), MAX_REFUSAL_DETAIL),
        approver: token.map(|t| t.approver.clone()),
        nonce: token.map(|t| t.nonce.clone()),
        retry_after_s: None,
        relayed_by: relayed_by.clone(),
    };
    let entry = txn.record(Some(intent_id), Some(name), &refused)?;
    if relay == Relay::Agent {
        engine::count_rate(
            txn.conn(),
            agent,
            &engine::rate_key("approval_refused", entry.seq.0),
            now,
        )?;
        let counted = engine::count_denial(txn.conn(), agent, now)?;
        record_breaker(txn, name, Some(intent_id), counted)?;
    }
    Ok(Recorded::Refused(e))
}

/// Records an approval turned away because the agent is locked.
fn record_locked(
    txn: &mut crate::ledger::LedgerTxn<'_>,
    agent: &str,
    intent_id: &str,
    locked_ms: i64,
) -> Result<Recorded, LedgerError> {
    let retry_after_s = retry_after_s(locked_ms);
    let refused = ApprovalRefused {
        code: codes::AGENT_LOCKED.to_owned(),
        detail: "the agent is locked by its denial breaker".to_owned(),
        approver: None,
        nonce: None,
        retry_after_s: Some(retry_after_s),
        relayed_by: None,
    };
    txn.record(Some(intent_id), Some(agent), &refused)?;
    Ok(Recorded::Locked(retry_after_s))
}

impl Recorded {
    fn early(self) -> ApprovalOutcome {
        match self {
            Recorded::Refused(e) => ApprovalOutcome::Refused(e),
            Recorded::Locked(s) => ApprovalOutcome::Locked { retry_after_s: s },
            Recorded::Counted(b) => ApprovalOutcome::Counted(b),
            Recorded::Rejected => ApprovalOutcome::Rejected,
            Recorded::Denied(r) => ApprovalOutcome::Denied(r),
            Recorded::Frozen(f) => ApprovalOutcome::Frozen(f),
            Recorded::Quorum(_) => {
                ApprovalOutcome::Refused(ApprovalError::NotPending("in_progress".into()))
            }
        }
    }
}

impl Signer {
    /// Records a refusal in its own ledger transaction (see [`refuse`]).
    async fn record_refusal(
        &self,
        agent: &AgentPolicy,
        intent_id: &str,
        e: ApprovalError,
        token: Option<&approval::TokenPayload>,
        relay: Relay<'_>,
    ) -> Result<ApprovalOutcome, SubmitError> {
        let (agent, intent_id) = (agent.clone(), intent_id.to_owned());
        let token = token.cloned();
        let by = relay.by();
        let recorded = self
            .core
            .ledger
            .write(move |txn| {
                let relay = match &by {
                    Some(b) => Relay::Operator(b),
                    None => Relay::Agent,
                };
                refuse(txn, &agent, &intent_id, e, token.as_ref(), relay)
            })
            .await?;
        Ok(recorded.early())
    }

    /// Adds an approval token to a pending intent of `agent` (the agent's
    /// own request). Checks, in order: the intent id's form and that the
    /// agent has such an intent (a bad id or an unknown intent records nothing), the
    /// agent's breaker, the token's form, that the intent is pending, that
    /// the approver counts now, the MAC (inside the HSM, constant-time
    /// comparison), that it is for this intent, not expired, not used
    /// before, and not a second approval by the same approver. Every
    /// refusal past the first two checks is recorded and counts toward the
    /// agent's breaker and rate windows. At the quorum the policy is
    /// checked again and the intent signed.
    pub async fn add_approval(
        self: &Arc<Self>,
        agent: &AgentPolicy,
        intent_id: &str,
        token: &str,
    ) -> Result<ApprovalOutcome, SubmitError> {
        let id = crate::types::IntentId::new(intent_id).map_err(|e| SubmitError::BadRequest {
            code: codes::INVALID_INTENT_ID,
            message: e.to_string(),
        })?;
        let intent_id = id.as_str();
        let agent_name = agent.name.to_string();
        let reader = self.core.ledger.reader()?;
        let exists = intents::get(&reader, &agent_name, intent_id)
            .map_err(LedgerError::Sqlite)?
            .is_some();
        let locked =
            engine::locked_for_ms(&reader, &agent_name, now_ms()).map_err(LedgerError::Sqlite)?;
        drop(reader);
        if !exists {
            return Err(SubmitError::NotFound);
        }
        if locked.is_some() {
            let (name, id) = (agent_name.clone(), intent_id.to_owned());
            let recorded = self
                .core
                .ledger
                .write(move |txn| {
                    let now = txn.now_ms();
                    let ms = engine::locked_for_ms(txn.conn(), &name, now)?.unwrap_or(1);
                    record_locked(txn, &name, &id, ms)
                })
                .await?;
            return Ok(recorded.early());
        }
        let parsed = match approval::parse(token) {
            Ok(p) => p,
            Err(e) => {
                return self
                    .record_refusal(agent, intent_id, e, None, Relay::Agent)
                    .await;
            }
        };
        self.apply_approval(agent, intent_id, parsed, Relay::Agent)
            .await
    }

    /// Applies a parsed token to the intent `intent_id` of `agent`, for
    /// the agent or relayed by an operator: the same checks and the same
    /// ledger entries either way.
    pub(super) async fn apply_approval(
        self: &Arc<Self>,
        agent: &AgentPolicy,
        intent_id: &str,
        parsed: approval::ParsedToken,
        relay: Relay<'_>,
    ) -> Result<ApprovalOutcome, SubmitError> {
        let agent_name = agent.name.to_string();
        let t = parsed.payload.clone();

        // Read-only checks first: nothing is written for an unknown intent.
        let reader = self.core.ledger.reader()?;
        let rec = intents::get(&reader, &agent_name, intent_id).map_err(LedgerError::Sqlite)?;
        let Some(rec) = rec else {
            return Err(SubmitError::NotFound);
        };
        let pending =
            intents::pending(&reader, &agent_name, intent_id).map_err(LedgerError::Sqlite)?;
        let pre = (|| -> Result<Result<intents::Pending, ApprovalError>, LedgerError> {
            let Some(p) = pending
                .as_ref()
                .filter(|_| rec.status == IntentStatus::PendingApproval)
            else {
                return Ok(Err(ApprovalError::NotPending(rec.status.to_string())));
            };
            if p.expires_ms <= now_ms() {
                return Ok(Err(ApprovalError::NotPending("expired".into())));
            }
            // A key no longer served (a sweep's retiring key gone from the
            // HSM) signs nothing: refused as such, not as a ledger fault.
            if super::sweep::key_of(&self.core.in_force(), &p.key).is_none() {
                return Ok(Err(ApprovalError::NotPending(format!(
                    "waiting on key {}, which is not in the HSM any more",
                    p.key
                ))));
            }
            // Who may approve is what the policy in force now says.
            let need = current_need(agent, &self.core.in_force(), p)?;
            if !counts_now(&reader, &t.approver, &need.of)? {
                return Ok(Err(ApprovalError::ApproverNotAllowed(t.approver.clone())));
            }
            Ok(Ok(p.clone()))
        })()?;
        drop(reader);
        let pending = match pre {
            Ok(p) => p,
            Err(e) => {
                return self
                    .record_refusal(agent, intent_id, e, Some(&t), relay)
                    .await;
            }
        };

        // The MAC, verified inside the HSM with the approver's stored key.
        let label = approval::key_label(&t.approver);
        let verified = self
            .core
            .hsm
            .verify_hmac_sha256(&label, &parsed.mac_input(), parsed.mac())
            .await;
        let mac_ok = match verified {
            Ok(ok) => ok,
            Err(crate::hsm::HsmError::KeyNotFound(_)) => false,
            Err(e) => return Err(SubmitError::Hsm(e)),
        };
        let check = if !mac_ok {
            Err(ApprovalError::InvalidToken(
                "the MAC does not verify".into(),
            ))
        } else if t.intent_hash != hex::encode(pending.intent_hash) {
            Err(ApprovalError::OtherIntent)
        } else if t.expires_at.saturating_mul(1000) < now_ms() {
            Err(ApprovalError::Expired(crate::ledger::format_utc(
                t.expires_at.saturating_mul(1000),
            )))
        } else {
            Ok(())
        };
        if let Err(e) = check {
            return self
                .record_refusal(agent, intent_id, e, Some(&t), relay)
                .await;
        }

        // Record it; re-check everything that can change in the meantime,
        // with the approver registry and the policy as they are inside
        // this transaction.
        let _flight = self.core.begin_flight(&agent_name, intent_id);
        let core = Arc::clone(&self.core);
        let agent_req = agent.clone();
        let id = intent_id.to_owned();
        let by = relay.by();
        let recorded = self
            .core
            .ledger
            .write(move |txn| record_approval(txn, &core, &agent_req, &id, &t, by.as_deref()))
            .await?;
        let Recorded::Quorum(q) = recorded else {
            return Ok(recorded.early());
        };
        let Quorum {
            key,
            message,
            decoded,
            effects,
            sol_spend,
        } = *q;
        match self
            .sign_admitted(
                agent.name.to_string(),
                intent_id.to_owned(),
                key,
                &message,
                &decoded,
                &effects,
                sol_spend,
            )
            .await?
        {
            SubmitOutcome::Signed(s) => Ok(ApprovalOutcome::Signed(s)),
            other => Err(SubmitError::Internal(format!(
                "unexpected signing outcome {other:?}"
            ))),
        }
    }
}

/// The approval's ledger transaction: every check that can change
/// meanwhile is made again, with the approver registry and the policy as
/// they are inside this transaction; at the quorum (or when the policy no
/// longer asks for one) the intent is decided again on its exact bytes.
fn record_approval(
    txn: &mut crate::ledger::LedgerTxn<'_>,
    core: &Core,
    agent_req: &AgentPolicy,
    id: &str,
    t: &approval::TokenPayload,
    by: Option<&str>,
) -> Result<Recorded, LedgerError> {
    let relay = match by {
        Some(b) => Relay::Operator(b),
        None => Relay::Agent,
    };
    // One snapshot of the policy and its keys for the whole decision, even
    // if a reload puts another in force meanwhile.
    let in_force = core.in_force();
    let Some(agent_c) = in_force.agent_named(agent_req.name.as_str()) else {
        // Nothing can be signed for an agent the policy no
        // longer names; the intent waits to expire.
        let e = ApprovalError::ApproverNotAllowed(t.approver.clone());
        return refuse(txn, agent_req, id, e, Some(t), relay);
    };
    let name = agent_c.name.as_str();
    let now = txn.now_ms();
    let status = intents::get(txn.conn(), name, id)?.map(|r| r.status);
    let p = match intents::pending(txn.conn(), name, id)? {
        Some(p) if status == Some(IntentStatus::PendingApproval) && p.expires_ms > now => p,
        _ => {
            let status = status.map_or_else(String::new, |s| s.to_string());
            return refuse(
                txn,
                &agent_c,
                id,
                ApprovalError::NotPending(status),
                Some(t),
                relay,
            );
        }
    };
    let need = current_need(&agent_c, &in_force, &p)?;
    if !counts_now(txn.conn(), &t.approver, &need.of)? {
        return refuse(
            txn,
            &agent_c,
            id,
            ApprovalError::ApproverNotAllowed(t.approver.clone()),
            Some(t),
            relay,
        );
    }
    if store::nonce_used(txn.conn(), &t.nonce)? {
        return refuse(txn, &agent_c, id, ApprovalError::Replayed, Some(t), relay);
    }
    let granted = store::granted(txn.conn(), name, id)?;
    if granted.contains(&t.approver) {
        return refuse(
            txn,
            &agent_c,
            id,
            ApprovalError::DuplicateApprover(t.approver.clone()),
            Some(t),
            relay,
        );
    }
    // Approvals that count now, this one included, against the quorum
    // the policy asks for now.
    let mut received: u64 = 1;
    for a in &granted {
        if counts_now(txn.conn(), a, &need.of)? {
            received += 1;
        }
    }
    // An approval that would complete the quorum of a frozen intent is
    // turned away before anything is recorded or its nonce used.
    if t.decision == Verdict::Approve
        && received >= need.required
        && let Some(f) = super::freeze::covering(txn.conn(), name, &p.key)?
    {
        return Ok(Recorded::Frozen((&f).into()));
    }
    store::use_nonce(txn.conn(), &t.nonce, &t.approver, name, id, now)?;
    let decision = match t.decision {
        Verdict::Approve => "approve",
        Verdict::Reject => "reject",
    };
    store::record(txn.conn(), name, id, &t.approver, decision, &t.nonce, now)?;
    let event = ApprovalDecision {
        approver: t.approver.clone(),
        nonce: t.nonce.clone(),
        intent_hash: t.intent_hash.clone(),
        relayed_by: by.map(str::to_owned),
    };
    if t.decision == Verdict::Reject {
        txn.record(Some(id), Some(name), &ApprovalRejected(event))?;
        let body = reply_json(&ErrorBody {
            error: ErrorDetail {
                code: "approval_rejected".into(),
                message: format!("approver {} rejected this intent", t.approver),
                reasons: Vec::new(),
                retry_after: None,
            },
        })?;
        intents::finish(txn.conn(), name, id, IntentStatus::Denied, &body, now)?;
        return Ok(Recorded::Rejected);
    }
    txn.record(Some(id), Some(name), &ApprovalGranted(event))?;
    if received < need.required {
        let mut approval = p.approval;
        approval.required = need.required;
        approval.received = received;
        approval.approvers = need.of;
        approval.because = need.because;
        return Ok(Recorded::Counted(Box::new(PendingIntent {
            intent_id: id.to_owned(),
            status: IntentStatus::PendingApproval.wire(),
            approval,
        })));
    }
    // The quorum (or a policy that no longer asks for one): decide
    // again on the exact bytes, now, as admission decides.
    let CurrentNeed {
        key: hsm_key,
        decoded,
        effects,
        ..
    } = need;
    // A sweep is decided with its successor's address allowed.
    let decided_under = super::sweep::policy_for(txn.conn(), &agent_c, &p.key)?;
    let decided = record_decision(
        txn,
        DecisionInput {
            agent: &decided_under,
            key: &hsm_key.name,
            effects: Some(&effects),
            pre_reasons: Vec::new(),
            intent_id: id,
            mode: engine::Mode::CommitApproved,
            policy_sha256: &in_force.policy.hash_hex(),
            after_approvals: Some(received),
        },
    )?;
    let reasons = match decided {
        Decided::Allowed { sol_spend } => {
            intents::start_signing(txn.conn(), name, id, now)?;
            return Ok(Recorded::Quorum(Box::new(Quorum {
                key: hsm_key,
                message: p.message,
                decoded,
                effects,
                sol_spend,
            })));
        }
        Decided::Denied(reasons) => reasons,
        Decided::Locked { retry_after_s } => vec![DenialReason {
            rule: codes::AGENT_LOCKED.into(),
            detail: format!("the agent is locked for {retry_after_s} more seconds"),
        }],
        Decided::NeedsApproval(_) => {
            // Approved intents are decided without thresholds.
            return Err(LedgerError::Corrupt(
                "an approved intent was asked for approvals again".into(),
            ));
        }
    };
    let body = reply_json(&denial_body(&reasons))?;
    intents::finish(txn.conn(), name, id, IntentStatus::Denied, &body, now)?;
    Ok(Recorded::Denied(reasons))
}
