//! `POST /v1/intents`: decide, reserve, sign, record, release.

use std::sync::Arc;

use base64::Engine as _;
use keyward_client::wire::{
    ApprovalRequest, DenialReason, ErrorBody, ErrorDetail, IntentRequest, PendingIntent,
    SignedIntent, codes,
};
use sha2::{Digest, Sha256};

use super::decision::{Decided, DecisionInput, abandon_intent, record_decision};
use super::freeze;
use super::prepare::{Prepared, prepare_with_keys};
use super::{Signer, SubmitError, SubmitOutcome};
use crate::approval::request;
use crate::intents::{self, IntentStatus, reply_json};
use crate::ledger::LedgerError;
use crate::ledger::events::{IntentReceived, SignatureCreated, SigningDenied};
use crate::policy::{AgentPolicy, counters, engine};
use crate::solana::assemble_transaction;
use crate::types::Lamports;

/// What ledger transaction A decided.
enum Admission {
    Replay { status: IntentStatus, body: Vec<u8> },
    Conflict,
    InProgress,
    Denied(Vec<DenialReason>),
    Locked { retry_after_s: u64 },
    Frozen(super::freeze::Frozen),
    Pending(Box<PendingIntent>),
    Expired,
    Allowed { sol_spend: Lamports },
}

/// The reply body of a policy denial (`policy_denied` with its reasons).
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
        self.core.check_history()?;
        if let Some(gate) = self.core.mirror_gate() {
            gate.check(self.core.ledger.health().head_seq)
                .map_err(SubmitError::MirrorLagging)?;
        }
        let prepared = prepare_with_keys(&req, agent, &self.core.keys())?;
        let _flight = self
            .core
            .begin_flight(agent.name.as_str(), prepared.intent_id.as_str());
        self.decide_and_sign(agent, &prepared).await
    }

    /// Admits a prepared intent (decision and reservation, recorded) and,
    /// when allowed, signs it. The caller has registered the flight.
    pub(super) async fn decide_and_sign(
        &self,
        agent: &AgentPolicy,
        prepared: &Prepared,
    ) -> Result<SubmitOutcome, SubmitError> {
        let agent_name = agent.name.to_string();
        let intent_id = prepared.intent_id.to_string();
        let admission = self.admit(agent, prepared).await?;
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
            Admission::Frozen(f) => return Err(SubmitError::Frozen(f)),
            Admission::Pending(body) => return Ok(SubmitOutcome::Pending(body)),
            Admission::Expired => return Ok(SubmitOutcome::Expired),
            Admission::Allowed { sol_spend } => sol_spend,
        };
        let (Some(key), Some((message, decoded, effects))) =
            (prepared.hsm_key.clone(), prepared.message.as_ref())
        else {
            // evaluate() denies when there is no key or message; reaching
            // this is a bug, and the reservation is left for recovery.
            self.core.mark_needs_recovery();
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
            self.core.mark_needs_recovery();
            return Err(SubmitError::Internal(
                "allowed intent where our key does not sign".into(),
            ));
        };

        // Never sign on a history found broken since admission; the
        // reservation is released by recovery.
        if let Err(e) = self.core.check_history() {
            self.core.mark_needs_recovery();
            return Err(e);
        }
        // Sign in the HSM with no lock held, then verify in software. A
        // full queue (`hsm_busy`) or a timeout is a failed signature like
        // any other: released below, and a signature that comes after a
        // timeout is dropped by the executor, unread.
        let signed = self.core.hsm.sign_verified(&key, message).await;

        let message_sha256 = hex::encode(Sha256::digest(message));
        let agent_c = agent_name.clone();
        let id_c = intent_id.clone();
        match signed {
            Ok(signature) => {
                let transaction = assemble_transaction(message, decoded, signer_index, &signature);
                let sig_b58 = bs58::encode(signature).into_string();
                let tx_b64 = base64::engine::general_purpose::STANDARD.encode(&transaction);
                let created = SignatureCreated {
                    signature: sig_b58.clone(),
                    key: key.name.to_string(),
                    public_key: key.public_key.to_base58(),
                    message_sha256,
                    sol_spend_lamports: sol_spend.0,
                };
                let result = self
                    .core
                    .ledger
                    .write(move |txn| {
                        let entry = txn.record(Some(&id_c), Some(&agent_c), &created)?;
                        counters::confirm(txn.conn(), &agent_c, &id_c)?;
                        let response = SignedIntent {
                            intent_id: id_c.clone(),
                            status: IntentStatus::Signed.wire(),
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
                            IntentStatus::Signed,
                            &reply_json(&response)?,
                            now,
                        )?;
                        Ok(response)
                    })
                    .await;
                match result {
                    Ok(response) => Ok(SubmitOutcome::Signed(response)),
                    Err(e) => {
                        // The signature is dropped here, unreleased.
                        self.core.mark_needs_recovery();
                        Err(SubmitError::AuditUnavailable(e))
                    }
                }
            }
            Err(hsm_err) => {
                let detail = hsm_err.to_string();
                tracing::error!(agent = %agent_name, intent = %intent_id, error = %detail, "HSM signing failed");
                let code = hsm_err.code();
                let recorded = self
                    .core
                    .ledger
                    .write(move |txn| abandon_intent(txn, &agent_c, &id_c, code, detail))
                    .await;
                if recorded.is_err() {
                    self.core.mark_needs_recovery();
                }
                Err(SubmitError::Hsm(hsm_err))
            }
        }
    }

    /// Ledger transaction A: idempotency check, `intent_received`, the policy
    /// decision over the counters, `policy_evaluated`, and either the denial
    /// or the reservation, all in one durable transaction.
    async fn admit(&self, agent: &AgentPolicy, p: &Prepared) -> Result<Admission, LedgerError> {
        let agent = agent.clone();
        let policy_hash = self.core.policy().hash_hex();
        let intent_id = p.intent_id.to_string();
        let key = p.key.clone();
        let content_hash = p.content_hash;
        let pre_reasons = p.pre_reasons.clone();
        let effects = p.message.as_ref().map(|(_, _, e)| e.clone());
        let message = p.message.as_ref().map(|(m, _, _)| m.clone());

        let signer_key = p.hsm_key.as_ref().map(|k| k.public_key);
        let approval_ttl_ms = self.core.approval_ttl_ms;
        let key_ref = p.key_ref();
        let received = IntentReceived {
            key: key_ref.clone(),
            action: p.summary.clone(),
            content_sha256: hex::encode(p.content_hash),
            message: p
                .message
                .as_ref()
                .map(|(m, _, _)| base64::engine::general_purpose::STANDARD.encode(m)),
            message_sha256: p
                .message
                .as_ref()
                .map(|(m, _, _)| hex::encode(Sha256::digest(m))),
            effects: effects.as_ref().map(request::effects_record),
        };
        self.core
            .ledger
            .write(move |txn| {
                let agent_name = agent.name.as_str();
                if let Some(rec) = intents::get(txn.conn(), agent_name, &intent_id)? {
                    // An intent recorded as expired replays its recorded reply;
                    // one whose window ended but is not recorded yet is
                    // expired all the same.
                    let expired = rec.status == IntentStatus::PendingApproval
                        && intents::pending(txn.conn(), agent_name, &intent_id)?
                            .is_none_or(|p| p.expires_ms <= txn.now_ms());
                    return Ok(if rec.content_hash != content_hash {
                        Admission::Conflict
                    } else if rec.status == IntentStatus::InProgress {
                        Admission::InProgress
                    } else if expired {
                        Admission::Expired
                    } else {
                        Admission::Replay {
                            status: rec.status,
                            body: rec.response.unwrap_or_default(),
                        }
                    });
                }
                let now = txn.now_ms();
                let entry = txn.record(Some(&intent_id), Some(agent_name), &received)?;
                // An emergency freeze refuses it before the policy counts
                // anything; like a lock, no intent record is kept.
                if let Some(f) = freeze::covering(txn.conn(), agent_name, key.as_str())? {
                    txn.record(
                        Some(&intent_id),
                        Some(agent_name),
                        &SigningDenied {
                            code: codes::FROZEN.to_owned(),
                            reasons: Vec::new(),
                            retry_after_s: None,
                            detail: Some(format!(
                                "signing frozen for {} (signing_frozen seq {})",
                                f.scope, f.seq
                            )),
                        },
                    )?;
                    return Ok(Admission::Frozen((&f).into()));
                }
                let base = intents::NewIntent {
                    agent: agent_name,
                    intent_id: &intent_id,
                    content_hash: &content_hash,
                    status: IntentStatus::InProgress,
                    reply: None,
                    received_seq: entry.seq.0,
                    now_ms: now,
                };
                let decided = record_decision(
                    txn,
                    DecisionInput {
                        agent: &agent,
                        key: &key,
                        effects: effects.as_ref(),
                        pre_reasons,
                        intent_id: &intent_id,
                        mode: engine::Mode::Commit,
                        policy_sha256: &policy_hash,
                        after_approvals: None,
                    },
                )?;
                let sol_spend = match decided {
                    // The lock is transient: no intent record, so the same
                    // id can be sent again once the agent is unlocked.
                    Decided::Locked { retry_after_s } => {
                        return Ok(Admission::Locked { retry_after_s });
                    }
                    Decided::Denied(reasons) => {
                        let body = reply_json(&denial_body(&reasons))?;
                        intents::insert(
                            txn.conn(),
                            &intents::NewIntent {
                                status: IntentStatus::Denied,
                                reply: Some(&body),
                                ..base
                            },
                        )?;
                        return Ok(Admission::Denied(reasons));
                    }
                    Decided::NeedsApproval(need) => {
                        let (Some(message), Some(fx), Some(signer)) =
                            (&message, &effects, &signer_key)
                        else {
                            // evaluate() denies without a key or a message.
                            return Err(LedgerError::Corrupt(
                                "approval needed for an intent without key or message".into(),
                            ));
                        };
                        let expires_ms = now.saturating_add(approval_ttl_ms);
                        let intent_hash = request::intent_hash(message, fx);
                        let approval = ApprovalRequest {
                            intent_hash: hex::encode(intent_hash),
                            key: key_ref.clone(),
                            public_key: signer.to_base58(),
                            message: base64::engine::general_purpose::STANDARD.encode(message),
                            required: u64::from(need.required),
                            received: 0,
                            approvers: need.of,
                            expires_at: crate::ledger::format_utc(expires_ms),
                            summary: request::summary(signer, fx),
                            because: need.because,
                        };
                        let reply = PendingIntent {
                            intent_id: intent_id.clone(),
                            status: IntentStatus::PendingApproval.wire(),
                            approval: approval.clone(),
                        };
                        txn.record(Some(&intent_id), Some(agent_name), &approval)?;
                        intents::insert(
                            txn.conn(),
                            &intents::NewIntent {
                                status: IntentStatus::PendingApproval,
                                reply: Some(&reply_json(&reply)?),
                                ..base
                            },
                        )?;
                        intents::insert_pending(
                            txn.conn(),
                            agent_name,
                            &intent_id,
                            &intents::Pending {
                                key: key_ref,
                                message: message.clone(),
                                intent_hash,
                                approval,
                                expires_ms,
                            },
                        )?;
                        return Ok(Admission::Pending(Box::new(reply)));
                    }
                    Decided::Allowed { sol_spend } => sol_spend,
                };
                intents::insert(txn.conn(), &base)?;
                // Nothing is released on this answer: the signature is, and its
                // commit is synced, which makes these entries durable too.
                txn.skip_sync();
                Ok(Admission::Allowed { sol_spend })
            })
            .await
    }
}
