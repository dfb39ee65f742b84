//! Approvals of pending intents: the agent's tokens and the checks that
//! decide what counts, under the approvers and the policy in force now.

use std::collections::HashMap;
use std::sync::Arc;

use keyward_client::wire::{DenialReason, ErrorBody, ErrorDetail, SignedIntent, codes};

use super::{Signer, SubmitError, SubmitOutcome, denial_body};
use crate::approval::{self, ApprovalError, Verdict, store};
use crate::intents;
use crate::ledger::{EventType, LedgerError};
use crate::policy::{AgentPolicy, engine, spend_by_asset};
use crate::solana::{decode_message, extract_effects};
use crate::types::KeyName;

/// What an approval token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Refused, with its code; recorded as `approval_refused`.
    Refused(ApprovalError),
    /// Counted; the intent still waits. The 202 body with the current
    /// figures (`required` and `received` under the policy in force now).
    Counted(serde_json::Value),
    /// The quorum was reached and the intent signed.
    Signed(SignedIntent),
    /// The quorum was reached but the policy no longer allows the intent.
    Denied(Vec<DenialReason>),
    /// A rejection ended the intent.
    Rejected,
    /// The agent's denial breaker is open (recorded): 423 `agent_locked`.
    Locked {
        /// Seconds until the lock lifts.
        retry_after_s: u64,
    },
}

fn json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
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

/// Payload of `approval_refused`: every field is bounded (the code is a
/// constant, the detail is cut at [`MAX_REFUSAL_DETAIL`], the approver
/// name and nonce were validated by [`approval::parse`]), so a refusal
/// never writes more than a few hundred bytes whatever the request held.
#[derive(serde::Serialize)]
struct RefusalEntry<'a> {
    code: &'a str,
    detail: String,
    approver: Option<&'a str>,
    nonce: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_by: Option<&'a str>,
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
    Counted(serde_json::Value),
    Rejected,
    Denied(Vec<DenialReason>),
    Quorum(Box<Quorum>),
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
    keys: &HashMap<KeyName, crate::hsm::HsmKey>,
    p: &intents::Pending,
) -> Result<CurrentNeed, LedgerError> {
    let key_name = KeyName::new(&p.key).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    let Some(key) = keys.get(&key_name) else {
        return Err(LedgerError::Corrupt(format!("key {} is not served", p.key)));
    };
    let decoded = decode_message(&p.message)
        .map_err(|e| LedgerError::Corrupt(format!("stored message: {e}")))?;
    let effects = extract_effects(&decoded, &key.public_key);
    let spend = spend_by_asset(&effects).unwrap_or_default();
    let (required, of, because) = match engine::approval_need(agent, &spend) {
        Some(n) => (u64::from(n.required), n.of, n.because),
        None => {
            let req: serde_json::Value = serde_json::from_str(&p.approval).unwrap_or_default();
            let of = req["approvers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (0, of, Vec::new())
        }
    };
    Ok(CurrentNeed {
        required,
        of,
        because,
        key: key.clone(),
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
        let need = current_need(agent, &self.keys(), p)?;
        let reader = self.ledger.reader()?;
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

/// The agent named `name` in the policy in force now.
pub(super) fn agent_now(signer: &Signer, name: &str) -> Option<AgentPolicy> {
    signer
        .policy()
        .agents
        .iter()
        .find(|a| a.name.as_str() == name)
        .cloned()
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
    let payload = json(&RefusalEntry {
        code: e.code(),
        detail: bounded(e.to_string(), MAX_REFUSAL_DETAIL),
        approver: token.map(|t| t.approver.as_str()),
        nonce: token.map(|t| t.nonce.as_str()),
        retry_after_s: None,
        relayed_by: relayed_by.as_deref(),
    });
    let entry = txn.append(
        EventType::ApprovalRefused,
        Some(intent_id),
        Some(name),
        &payload,
    )?;
    if relay == Relay::Agent {
        engine::count_rate(
            txn.conn(),
            agent,
            &engine::rate_key("approval_refused", entry.seq.0),
            now,
        )?;
        let (trip, cooled_down) = engine::count_denial(txn.conn(), agent, now)?;
        if cooled_down {
            let reset = json(&serde_json::json!({ "breaker": name, "by": "cooldown" }));
            txn.append(EventType::BreakerReset, None, Some(name), &reset)?;
        }
        if let Some(trip) = trip {
            let tripped = json(&serde_json::json!({
                "breaker": name,
                "consecutive_denials": trip.denials,
                "locked_until": crate::ledger::format_utc(trip.until_ms),
                "locked_until_ms": trip.until_ms,
            }));
            txn.append(
                EventType::BreakerTripped,
                Some(intent_id),
                Some(name),
                &tripped,
            )?;
        }
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
    let retry_after_s = u64::try_from((locked_ms + 999) / 1000).unwrap_or(1);
    let payload = json(&RefusalEntry {
        code: codes::AGENT_LOCKED,
        detail: "the agent is locked by its denial breaker".to_owned(),
        approver: None,
        nonce: None,
        retry_after_s: Some(retry_after_s),
        relayed_by: None,
    });
    txn.append(
        EventType::ApprovalRefused,
        Some(intent_id),
        Some(agent),
        &payload,
    )?;
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
    /// agent has such an intent (a 400 or 404 records nothing), the
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
        let reader = self.ledger.reader()?;
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
        let reader = self.ledger.reader()?;
        let rec = intents::get(&reader, &agent_name, intent_id).map_err(LedgerError::Sqlite)?;
        let Some(rec) = rec else {
            return Err(SubmitError::NotFound);
        };
        let pending =
            intents::pending(&reader, &agent_name, intent_id).map_err(LedgerError::Sqlite)?;
        let pre = (|| -> Result<Result<intents::Pending, ApprovalError>, LedgerError> {
            let Some(p) = pending
                .as_ref()
                .filter(|_| rec.status == "pending_approval")
            else {
                return Ok(Err(ApprovalError::NotPending(rec.status.clone())));
            };
            if p.expires_ms <= now_ms() {
                return Ok(Err(ApprovalError::NotPending("expired".into())));
            }
            // Who may approve is what the policy in force now says.
            let need = current_need(agent, &self.keys(), p)?;
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

        // The MAC, inside the HSM with the approver's stored key.
        let label = approval::key_label(&t.approver);
        let expected = self.hsm.hmac_sha256(&label, &parsed.mac_input()).await;
        let mac_ok = match expected {
            Ok(mac) => parsed.mac_matches(&mac),
            Err(crate::hsm::HsmError::KeyNotFound(_)) => false,
            Err(e) => return Err(SubmitError::from_hsm(e)),
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
        let _flight = self.begin_flight(&agent_name, intent_id);
        let signer = Arc::clone(self);
        let agent_req = agent.clone();
        let id = intent_id.to_owned();
        let by = relay.by();
        let recorded = self
            .ledger
            .write(move |txn| record_approval(txn, &signer, &agent_req, &id, &t, by.as_deref()))
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
    signer: &Signer,
    agent_req: &AgentPolicy,
    id: &str,
    t: &approval::TokenPayload,
    by: Option<&str>,
) -> Result<Recorded, LedgerError> {
    let relay = match by {
        Some(b) => Relay::Operator(b),
        None => Relay::Agent,
    };
    let Some(agent_c) = agent_now(signer, agent_req.name.as_str()) else {
        // Nothing can be signed for an agent the policy no
        // longer names; the intent waits to expire.
        let e = ApprovalError::ApproverNotAllowed(t.approver.clone());
        return refuse(txn, agent_req, id, e, Some(t), relay);
    };
    let name = agent_c.name.as_str();
    let now = txn.now_ms();
    let status = intents::get(txn.conn(), name, id)?
        .map(|r| r.status)
        .unwrap_or_default();
    let p = match intents::pending(txn.conn(), name, id)? {
        Some(p) if status == "pending_approval" && p.expires_ms > now => p,
        _ => {
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
    let need = current_need(&agent_c, &signer.keys(), &p)?;
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
    store::use_nonce(txn.conn(), &t.nonce, &t.approver, name, id, now)?;
    let decision = match t.decision {
        Verdict::Approve => "approve",
        Verdict::Reject => "reject",
    };
    store::record(txn.conn(), name, id, &t.approver, decision, &t.nonce, now)?;
    let mut event = serde_json::json!({
        "approver": t.approver, "nonce": t.nonce, "intent_hash": t.intent_hash,
    });
    if let Some(b) = &by {
        event["relayed_by"] = serde_json::json!(b);
    }
    let event = json(&event);
    if t.decision == Verdict::Reject {
        txn.append(EventType::ApprovalRejected, Some(id), Some(name), &event)?;
        let body = json(&ErrorBody {
            error: ErrorDetail {
                code: "approval_rejected".into(),
                message: format!("approver {} rejected this intent", t.approver),
                reasons: Vec::new(),
                retry_after: None,
            },
        });
        intents::finish(txn.conn(), name, id, "denied", 403, &body, now)?;
        return Ok(Recorded::Rejected);
    }
    txn.append(EventType::ApprovalGranted, Some(id), Some(name), &event)?;
    // Only approvals by approvers who are enrolled and listed
    // now count, against the quorum the policy asks for now.
    let mut received: u64 = 1;
    for a in &granted {
        if counts_now(txn.conn(), a, &need.of)? {
            received += 1;
        }
    }
    if received < need.required {
        let mut req: serde_json::Value = serde_json::from_str(&p.approval).unwrap_or_default();
        req["required"] = serde_json::json!(need.required);
        req["received"] = serde_json::json!(received);
        req["approvers"] = serde_json::json!(need.of);
        req["because"] = serde_json::json!(need.because);
        return Ok(Recorded::Counted(serde_json::json!({
            "intent_id": id, "status": "pending_approval", "approval": req,
        })));
    }
    // The quorum (or a policy that no longer asks for one): decide
    // again on the exact bytes, now.
    let CurrentNeed {
        key: hsm_key,
        decoded,
        effects,
        ..
    } = need;
    let verdict = engine::decide(
        txn.conn(),
        &agent_c,
        &hsm_key.name,
        Some(&effects),
        Vec::new(),
        id,
        now,
        engine::Mode::CommitApproved,
    )?;
    let decision = verdict.decision;
    let evaluated = json(&serde_json::json!({
        "decision": if decision.allowed() { "allow" } else { "deny" },
        "after_approvals": received,
        "reasons": decision.reasons,
        "sol_spend_lamports": decision.sol_spend().0,
        "policy_sha256": signer.policy().hash_hex(),
    }));
    txn.append(EventType::PolicyEvaluated, Some(id), Some(name), &evaluated)?;
    if let Some(ms) = verdict.locked_for_ms {
        let reasons = vec![DenialReason {
            rule: codes::AGENT_LOCKED.into(),
            detail: format!("the agent is locked for {} more seconds", (ms + 999) / 1000),
        }];
        let body = json(&denial_body(&reasons));
        intents::finish(txn.conn(), name, id, "denied", 403, &body, now)?;
        return Ok(Recorded::Denied(reasons));
    }
    if !decision.allowed() {
        let body = json(&denial_body(&decision.reasons));
        let denied =
            json(&serde_json::json!({ "code": codes::POLICY_DENIED, "reasons": decision.reasons }));
        txn.append(EventType::SigningDenied, Some(id), Some(name), &denied)?;
        intents::finish(txn.conn(), name, id, "denied", 403, &body, now)?;
        return Ok(Recorded::Denied(decision.reasons));
    }
    intents::set_status(txn.conn(), name, id, "in_progress", now)?;
    Ok(Recorded::Quorum(Box::new(Quorum {
        key: hsm_key,
        message: p.message,
        decoded,
        effects,
        sol_spend: decision.sol_spend(),
    })))
}
