//! `POST /v1/intents`: decide, reserve, sign, record, release.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use keyward_client::wire::{
    DenialReason, ErrorBody, ErrorDetail, IntentRequest, IntentStatus, SignedIntent, codes,
};
use sha2::{Digest, Sha256};

use super::prepare::{Prepared, prepare};
use super::{Signer, SubmitError, SubmitOutcome};
use crate::approval::request;
use crate::intents;
use crate::ledger::{EventType, LedgerError};
use crate::policy::{AgentPolicy, counters, engine};
use crate::solana::assemble_transaction;
use crate::types::Lamports;

/// What ledger transaction A decided.
enum Admission {
    Replay { status: u16, body: Vec<u8> },
    Conflict,
    InProgress,
    Denied(Vec<DenialReason>),
    Locked { retry_after_s: u64 },
    Pending(Vec<u8>),
    Expired,
    Allowed { sol_spend: Lamports },
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    // Serializing our own plain data types cannot fail; an empty payload
    // would still be hashed and recorded rather than panic.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The 403 body of a policy denial.
pub fn denial_body(reasons: &[DenialReason]) -> ErrorBody {
    let first = reasons.first().map_or("policy", |r| r.rule.as_str());
    ErrorBody {
        error: ErrorDetail {
            code: codes::POLICY_DENIED.to_owned(),
            message: format!("denied by policy ({first}); see reasons"),
            reasons: reasons.to_vec(),
            retry_after: None,
        },
    }
}

impl Signer {
    /// Handles one intent of `agent`: returns the recorded outcome, or an
    /// error for which nothing was signed, counted or released.
    pub async fn submit(
        self: &Arc<Self>,
        agent: &AgentPolicy,
        req: IntentRequest,
    ) -> Result<SubmitOutcome, SubmitError> {
        // Fail closed on a broken history and while the external copy of
        // the ledger lags.
        self.check_history()?;
        if let Some(gate) = self.mirror_gate() {
            gate.check(self.ledger.health().head_seq)
                .map_err(SubmitError::MirrorLagging)?;
        }
        let keys = self.keys();
        let allowed_key = agent
            .keys
            .iter()
            .find(|n| n.as_str() == req.key)
            .and_then(|n| keys.get(n));
        let prepared = prepare(&req, agent, allowed_key)?;
        let agent_name = agent.name.to_string();
        let intent_id = prepared.intent_id.to_string();
        let _flight = self.begin_flight(&agent_name, &intent_id);

        let admission = self.admit(agent, &prepared).await?;
        let sol_spend = match admission {
            Admission::Replay { status, body } => {
                return Ok(SubmitOutcome::Replayed { status, body });
            }
            Admission::Conflict => return Err(SubmitError::Conflict),
            Admission::InProgress => return Err(SubmitError::InProgress),
            Admission::Denied(reasons) => return Ok(SubmitOutcome::Denied(reasons)),
            Admission::Locked { retry_after_s } => {
                return Ok(SubmitOutcome::Locked { retry_after_s });
            }
            Admission::Pending(body) => return Ok(SubmitOutcome::Pending(body)),
            Admission::Expired => return Ok(SubmitOutcome::Expired),
            Admission::Allowed { sol_spend } => sol_spend,
        };
        let (Some(key), Some((message, decoded, effects))) =
            (prepared.hsm_key.clone(), prepared.message.as_ref())
        else {
            // evaluate() denies when there is no key or message; reaching
            // this is a bug, and the reservation is left for recovery.
            self.needs_recovery.store(true, Ordering::SeqCst);
            return Err(SubmitError::Internal(
                "allowed intent without key or message".into(),
            ));
        };
        self.sign_admitted(
            agent_name, intent_id, key, message, decoded, effects, sol_spend,
        )
        .await
    }

    /// Signs an admitted intent (its spend reserved, its record
    /// `in_progress`) in the HSM with no lock held, verifies the signature,
    /// records `signature_created` durably and only then returns it. On an
    /// HSM failure the reservation is released and nothing is returned.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn sign_admitted(
        &self,
        agent_name: String,
        intent_id: String,
        key: crate::hsm::HsmKey,
        message: &[u8],
        decoded: &crate::solana::DecodedMessage,
        effects: &crate::solana::Effects,
        sol_spend: Lamports,
    ) -> Result<SubmitOutcome, SubmitError> {
        let Some(signer_index) = effects.our_index else {
            self.needs_recovery.store(true, Ordering::SeqCst);
            return Err(SubmitError::Internal(
                "allowed intent where our key does not sign".into(),
            ));
        };

        // Never sign on a history found broken since admission; the
        // reservation is released by recovery.
        if let Err(e) = self.check_history() {
            self.needs_recovery.store(true, Ordering::SeqCst);
            return Err(e);
        }
        // Sign in the HSM with no lock held, then verify in software. A
        // full queue (`hsm_busy`) or a timeout is a failed signature like
        // any other: released below, and a signature that comes after a
        // timeout is dropped by the executor, unread.
        let signed = self.hsm.sign_verified(&key, message).await;

        let message_sha256 = hex::encode(Sha256::digest(message));
        let agent_c = agent_name.clone();
        let id_c = intent_id.clone();
        match signed {
            Ok(signature) => {
                let transaction = assemble_transaction(message, decoded, signer_index, &signature);
                let sig_b58 = bs58::encode(signature).into_string();
                let tx_b64 = base64::engine::general_purpose::STANDARD.encode(&transaction);
                let payload = json(&serde_json::json!({
                    "signature": sig_b58,
                    "key": key.name.as_str(),
                    "public_key": key.public_key.to_base58(),
                    "message_sha256": message_sha256,
                    "sol_spend_lamports": sol_spend.0,
                }));
                let result = self
                    .ledger
                    .write(move |txn| {
                        let entry = txn.append(
                            EventType::SignatureCreated,
                            Some(&id_c),
                            Some(&agent_c),
                            &payload,
                        )?;
                        counters::confirm(txn.conn(), &agent_c, &id_c)?;
                        let response = SignedIntent {
                            intent_id: id_c.clone(),
                            status: IntentStatus::Signed,
                            signature: sig_b58,
                            transaction: tx_b64,
                            ledger_seq: entry.seq.0,
                            entry_hash: hex::encode(entry.hash),
                        };
                        let now = txn.now_ms();
                        intents::finish(
                            txn.conn(),
                            &agent_c,
                            &id_c,
                            "signed",
                            200,
                            &json(&response),
                            now,
                        )?;
                        Ok(response)
                    })
                    .await;
                match result {
                    Ok(response) => Ok(SubmitOutcome::Signed(response)),
                    Err(e) => {
                        // The signature is dropped here, unreleased.
                        self.needs_recovery.store(true, Ordering::SeqCst);
                        Err(SubmitError::AuditUnavailable(e.to_string()))
                    }
                }
            }
            Err(hsm_err) => {
                let code = hsm_err.code();
                let detail = hsm_err.to_string();
                tracing::error!(agent = %agent_name, intent = %intent_id, error = %detail, "HSM signing failed");
                let payload = json(&serde_json::json!({ "code": code, "detail": detail }));
                let recorded = self
                    .ledger
                    .write(move |txn| {
                        txn.append(
                            EventType::SigningDenied,
                            Some(&id_c),
                            Some(&agent_c),
                            &payload,
                        )?;
                        engine::release(txn.conn(), &agent_c, &id_c)?;
                        intents::forget(txn.conn(), &agent_c, &id_c)?;
                        crate::approval::store::forget_intent(txn.conn(), &agent_c, &id_c)?;
                        Ok(())
                    })
                    .await;
                if recorded.is_err() {
                    self.needs_recovery.store(true, Ordering::SeqCst);
                }
                Err(SubmitError::from_hsm(hsm_err))
            }
        }
    }

    /// Ledger transaction A: idempotency check, `intent_received`, the policy
    /// decision over the counters, `policy_evaluated`, and either the denial
    /// or the reservation, all in one durable transaction.
    async fn admit(&self, agent: &AgentPolicy, p: &Prepared) -> Result<Admission, LedgerError> {
        let agent = agent.clone();
        let policy_hash = self.policy().hash_hex();
        let intent_id = p.intent_id.to_string();
        let key = p.key.clone();
        let content_hash = p.content_hash;
        let pre_reasons = p.pre_reasons.clone();
        let effects = p.message.as_ref().map(|(_, _, e)| e.clone());
        let message = p.message.as_ref().map(|(m, _, _)| m.clone());

        let signer_key = p.hsm_key.as_ref().map(|k| k.public_key);
        let approval_ttl_ms = self.approval_ttl_ms;
        let received = json(&serde_json::json!({
            "key": p.key.as_str(),
            "action": p.summary,
            "content_sha256": hex::encode(p.content_hash),
            "message": p.message.as_ref().map(|(m, _, _)| base64::engine::general_purpose::STANDARD.encode(m)),
            "message_sha256": p.message.as_ref().map(|(m, _, _)| hex::encode(Sha256::digest(m))),
            "effects": effects.as_ref().map(request::effects_json),
        }));
        self.ledger
            .write(move |txn| {
                let agent_name = agent.name.as_str();
                if let Some(rec) = intents::get(txn.conn(), agent_name, &intent_id)? {
                    // An intent recorded as expired replays its recorded 410;
                    // one whose window ended but is not recorded yet is
                    // expired all the same.
                    let expired = rec.status == "pending_approval"
                        && intents::pending(txn.conn(), agent_name, &intent_id)?
                            .is_none_or(|p| p.expires_ms <= txn.now_ms());
                    return Ok(if rec.content_hash != content_hash {
                        Admission::Conflict
                    } else if rec.status == "in_progress" {
                        Admission::InProgress
                    } else if expired {
                        Admission::Expired
                    } else {
                        Admission::Replay {
                            status: rec.http_status.unwrap_or(500),
                            body: rec.response.unwrap_or_default(),
                        }
                    });
                }
                let now = txn.now_ms();
                let entry = txn.append(EventType::IntentReceived, Some(&intent_id), Some(agent_name), &received)?;
                let base = intents::NewIntent {
                    agent: agent_name,
                    intent_id: &intent_id,
                    content_hash: &content_hash,
                    status: "in_progress",
                    reply: None,
                    received_seq: entry.seq.0,
                    now_ms: now,
                };
                let verdict = engine::decide(
                    txn.conn(),
                    &agent,
                    &key,
                    effects.as_ref(),
                    pre_reasons,
                    &intent_id,
                    now,
                    engine::Mode::Commit,
                )?;
                if verdict.cooled_down {
                    let reset = json(&serde_json::json!({
                        "breaker": agent_name, "by": "cooldown",
                    }));
                    txn.append(EventType::BreakerReset, None, Some(agent_name), &reset)?;
                }
                if let Some(ms) = verdict.locked_for_ms {
                    // The lock is transient: no intent record, so the same id
                    // can be sent again once the agent is unlocked.
                    let retry_after_s = u64::try_from((ms + 999) / 1000).unwrap_or(1);
                    let denied = json(&serde_json::json!({
                        "code": codes::AGENT_LOCKED, "retry_after_s": retry_after_s,
                    }));
                    txn.append(EventType::SigningDenied, Some(&intent_id), Some(agent_name), &denied)?;
                    return Ok(Admission::Locked { retry_after_s });
                }
                let decision = verdict.decision;
                let evaluated = json(&serde_json::json!({
                    "decision": if decision.allowed() { "allow" } else { "deny" },
                    "reasons": decision.reasons,
                    "spend": decision.spend.iter().map(|(a, v)| (a.key(), *v)).collect::<BTreeMap<_, _>>(),
                    "spent_24h_before": verdict.spent_before.iter().map(|(a, v)| (a.key(), *v)).collect::<BTreeMap<_, _>>(),
                    "sol_spend_lamports": decision.sol_spend().0,
                    "policy_sha256": policy_hash,
                }));
                txn.append(EventType::PolicyEvaluated, Some(&intent_id), Some(agent_name), &evaluated)?;
                if let Some(trip) = verdict.tripped {
                    let tripped = json(&serde_json::json!({
                        "breaker": agent_name,
                        "consecutive_denials": trip.denials,
                        "locked_until": crate::ledger::format_utc(trip.until_ms),
                        "locked_until_ms": trip.until_ms,
                    }));
                    txn.append(EventType::BreakerTripped, Some(&intent_id), Some(agent_name), &tripped)?;
                }
                if !decision.allowed() {
                    let body = json(&denial_body(&decision.reasons));
                    let denied = json(&serde_json::json!({ "code": codes::POLICY_DENIED, "reasons": decision.reasons }));
                    txn.append(EventType::SigningDenied, Some(&intent_id), Some(agent_name), &denied)?;
                    intents::insert(txn.conn(), &intents::NewIntent { status: "denied", reply: Some((403, &body)), ..base })?;
                    return Ok(Admission::Denied(decision.reasons));
                }
                if let (Some(need), Some(message), Some(fx), Some(signer)) =
                    (&verdict.approval, &message, &effects, &signer_key)
                {
                    let expires_ms = now.saturating_add(approval_ttl_ms);
                    let intent_hash = request::intent_hash(message, fx);
                    let approval = serde_json::json!({
                        "intent_hash": hex::encode(intent_hash),
                        "key": key.as_str(),
                        "public_key": signer.to_base58(),
                        "message": base64::engine::general_purpose::STANDARD.encode(message),
                        "required": need.required,
                        "received": 0,
                        "approvers": need.of,
                        "expires_at": crate::ledger::format_utc(expires_ms),
                        // Only approvers read it: built only when asked for.
                        "summary": request::summary(signer, fx),
                        "because": need.because,
                    });
                    let body = json(&serde_json::json!({
                        "intent_id": intent_id, "status": "pending_approval", "approval": approval,
                    }));
                    txn.append(EventType::ApprovalRequested, Some(&intent_id), Some(agent_name), &json(&approval))?;
                    intents::insert(txn.conn(), &intents::NewIntent { status: "pending_approval", reply: Some((202, &body)), ..base })?;
                    intents::insert_pending(
                        txn.conn(),
                        agent_name,
                        &intent_id,
                        &intents::Pending {
                            key: key.to_string(),
                            message: message.clone(),
                            intent_hash,
                            approval: String::from_utf8_lossy(&json(&approval)).into_owned(),
                            expires_ms,
                        },
                    )?;
                    return Ok(Admission::Pending(body));
                }
                intents::insert(txn.conn(), &base)?;
                // Nothing is released on this answer: the signature is, and its
                // commit is synced, which makes these entries durable too.
                txn.skip_sync();
                Ok(Admission::Allowed {
                    sol_spend: decision.sol_spend(),
                })
            })
            .await
    }
}
