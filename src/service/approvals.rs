//! Approvals of pending intents and the approver registry.

use std::sync::Arc;

use base64::Engine as _;
use keyward_client::wire::{DenialReason, ErrorBody, ErrorDetail, SignedIntent, codes};
use zeroize::Zeroizing;

use super::{Signer, SubmitError, SubmitOutcome, denial_body};
use crate::approval::{self, ApprovalError, Verdict, store};
use crate::intents;
use crate::ledger::{EventType, LedgerError};
use crate::policy::{AgentPolicy, engine};
use crate::solana::{decode_message, extract_effects};

/// What an approval token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Refused, with its code; recorded as `approval_refused`.
    Refused(ApprovalError),
    /// Counted; the intent still waits. The 202 body with the new count.
    Counted(serde_json::Value),
    /// The quorum was reached and the intent signed.
    Signed(SignedIntent),
    /// The quorum was reached but the policy no longer allows the intent.
    Denied(Vec<DenialReason>),
    /// A rejection ended the intent.
    Rejected,
}

fn json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

use crate::ledger::now_ms;

/// What the writer decided for an approval that passed the HSM check.
enum Recorded {
    Refused(ApprovalError),
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

impl Signer {
    async fn record_refusal(
        &self,
        agent: &str,
        intent_id: &str,
        e: &ApprovalError,
        token: Option<&approval::TokenPayload>,
    ) {
        let payload = json(&serde_json::json!({
            "code": e.code(),
            "detail": e.to_string(),
            "approver": token.map(|t| t.approver.clone()),
            "nonce": token.map(|t| t.nonce.clone()),
        }));
        let (agent, intent_id) = (agent.to_owned(), intent_id.to_owned());
        if let Err(err) = self
            .ledger
            .write(move |txn| {
                txn.append(
                    EventType::ApprovalRefused,
                    Some(&intent_id),
                    Some(&agent),
                    &payload,
                )
            })
            .await
        {
            tracing::error!(error = %err, "cannot record a refused approval");
        }
    }

    /// Adds an approval token to a pending intent of `agent`. Checks, in
    /// order: the token's form, that the intent is pending, that the
    /// approver may approve it, the MAC (inside the HSM, constant-time
    /// comparison), that it is for this intent, not expired, not used
    /// before, and not a second approval by the same approver. At the
    /// quorum the policy is checked again and the intent signed.
    pub async fn add_approval(
        self: &Arc<Self>,
        agent: &AgentPolicy,
        intent_id: &str,
        token: &str,
    ) -> Result<ApprovalOutcome, SubmitError> {
        let agent_name = agent.name.to_string();
        let parsed = match approval::parse(token) {
            Ok(p) => p,
            Err(e) => {
                self.record_refusal(&agent_name, intent_id, &e, None).await;
                return Ok(ApprovalOutcome::Refused(e));
            }
        };
        let t = parsed.payload.clone();

        // Read-only checks first: nothing is written for an unknown intent.
        let reader = self.ledger.reader()?;
        let rec = intents::get(&reader, &agent_name, intent_id).map_err(LedgerError::Sqlite)?;
        let Some(rec) = rec else {
            return Err(SubmitError::NotFound);
        };
        let pending =
            intents::pending(&reader, &agent_name, intent_id).map_err(LedgerError::Sqlite)?;
        let approver_rec = store::approver(&reader, &t.approver).map_err(LedgerError::Sqlite)?;
        drop(reader);
        let pre = (|| {
            let Some(p) = pending
                .as_ref()
                .filter(|_| rec.status == "pending_approval")
            else {
                return Err(ApprovalError::NotPending(rec.status.clone()));
            };
            if p.expires_ms <= now_ms() {
                return Err(ApprovalError::NotPending("expired".into()));
            }
            let req: serde_json::Value = serde_json::from_str(&p.approval).unwrap_or_default();
            let listed = req["approvers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n.as_str() == Some(t.approver.as_str())));
            let enrolled = approver_rec
                .as_ref()
                .is_some_and(|a| a.removed_ms.is_none());
            if !listed || !enrolled {
                return Err(ApprovalError::ApproverNotAllowed(t.approver.clone()));
            }
            Ok(p.clone())
        })();
        let pending = match pre {
            Ok(p) => p,
            Err(e) => {
                self.record_refusal(&agent_name, intent_id, &e, Some(&t))
                    .await;
                return Ok(ApprovalOutcome::Refused(e));
            }
        };

        // The MAC, inside the HSM with the approver's stored key.
        let hsm = Arc::clone(&self.hsm);
        let label = approval::key_label(&t.approver);
        let input = parsed.mac_input();
        let expected = tokio::task::spawn_blocking(move || hsm.hmac_sha256(&label, &input))
            .await
            .map_err(|e| SubmitError::Internal(e.to_string()))?;
        let mac_ok = match expected {
            Ok(mac) => parsed.mac_matches(&mac),
            Err(crate::hsm::HsmError::KeyNotFound(_)) => false,
            Err(e) => return Err(SubmitError::HsmUnavailable(e.to_string())),
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
            self.record_refusal(&agent_name, intent_id, &e, Some(&t))
                .await;
            return Ok(ApprovalOutcome::Refused(e));
        }

        // Record it; re-check everything that can change in the meantime.
        let _flight = self.begin_flight(&agent_name, intent_id);
        let agent_c = agent.clone();
        let id = intent_id.to_owned();
        let keys = self.keys();
        let policy_hash = self.policy().hash_hex();
        let recorded = self
            .ledger
            .write(move |txn| {
                let name = agent_c.name.as_str();
                let now = txn.now_ms();
                let refusal = |txn: &mut crate::ledger::LedgerTxn<'_>, e: ApprovalError| -> Result<Recorded, LedgerError> {
                    let payload = json(&serde_json::json!({
                        "code": e.code(), "detail": e.to_string(), "approver": t.approver, "nonce": t.nonce,
                    }));
                    txn.append(EventType::ApprovalRefused, Some(&id), Some(name), &payload)?;
                    Ok(Recorded::Refused(e))
                };
                let status = intents::get(txn.conn(), name, &id)?.map(|r| r.status).unwrap_or_default();
                let Some(p) = intents::pending(txn.conn(), name, &id)? else {
                    return refusal(txn, ApprovalError::NotPending(status));
                };
                if status != "pending_approval" || p.expires_ms <= now {
                    return refusal(txn, ApprovalError::NotPending(status));
                }
                if store::nonce_used(txn.conn(), &t.nonce)? {
                    return refusal(txn, ApprovalError::Replayed);
                }
                let granted = store::granted(txn.conn(), name, &id)?;
                if granted.contains(&t.approver) {
                    return refusal(txn, ApprovalError::DuplicateApprover(t.approver.clone()));
                }
                store::use_nonce(txn.conn(), &t.nonce, &t.approver, name, &id, now)?;
                let decision = match t.decision {
                    Verdict::Approve => "approve",
                    Verdict::Reject => "reject",
                };
                store::record(txn.conn(), name, &id, &t.approver, decision, &t.nonce, now)?;
                let event = json(&serde_json::json!({
                    "approver": t.approver, "nonce": t.nonce, "intent_hash": t.intent_hash,
                }));
                if t.decision == Verdict::Reject {
                    txn.append(EventType::ApprovalRejected, Some(&id), Some(name), &event)?;
                    let body = json(&ErrorBody {
                        error: ErrorDetail {
                            code: "approval_rejected".into(),
                            message: format!("approver {} rejected this intent", t.approver),
                            reasons: Vec::new(),
                            retry_after: None,
                        },
                    });
                    intents::finish(txn.conn(), name, &id, "denied", 403, &body, now)?;
                    return Ok(Recorded::Rejected);
                }
                txn.append(EventType::ApprovalGranted, Some(&id), Some(name), &event)?;
                let mut req: serde_json::Value = serde_json::from_str(&p.approval).unwrap_or_default();
                let required = req["required"].as_u64().unwrap_or(u64::MAX);
                let received = granted.len() as u64 + 1;
                req["received"] = serde_json::json!(received);
                if received < required {
                    return Ok(Recorded::Counted(serde_json::json!({
                        "intent_id": id, "status": "pending_approval", "approval": req,
                    })));
                }
                // The quorum: decide again on the exact bytes, now.
                let key_name = crate::types::KeyName::new(&p.key).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
                let Some(hsm_key) = keys.get(&key_name) else {
                    return Err(LedgerError::Corrupt(format!("key {} is not served", p.key)));
                };
                let decoded = decode_message(&p.message)
                    .map_err(|e| LedgerError::Corrupt(format!("stored message: {e}")))?;
                let effects = extract_effects(&decoded, &hsm_key.public_key);
                let verdict = engine::decide(
                    txn.conn(),
                    &agent_c,
                    &key_name,
                    Some(&effects),
                    Vec::new(),
                    &id,
                    now,
                    engine::Mode::CommitApproved,
                )?;
                let decision = verdict.decision;
                let evaluated = json(&serde_json::json!({
                    "decision": if decision.allowed() { "allow" } else { "deny" },
                    "after_approvals": received,
                    "reasons": decision.reasons,
                    "sol_spend_lamports": decision.sol_spend().0,
                    "policy_sha256": policy_hash,
                }));
                txn.append(EventType::PolicyEvaluated, Some(&id), Some(name), &evaluated)?;
                if let Some(ms) = verdict.locked_for_ms {
                    let reasons = vec![DenialReason {
                        rule: codes::AGENT_LOCKED.into(),
                        detail: format!("the agent is locked for {} more seconds", (ms + 999) / 1000),
                    }];
                    let body = json(&denial_body(&reasons));
                    intents::finish(txn.conn(), name, &id, "denied", 403, &body, now)?;
                    return Ok(Recorded::Denied(reasons));
                }
                if !decision.allowed() {
                    let body = json(&denial_body(&decision.reasons));
                    let denied = json(&serde_json::json!({ "code": codes::POLICY_DENIED, "reasons": decision.reasons }));
                    txn.append(EventType::SigningDenied, Some(&id), Some(name), &denied)?;
                    intents::finish(txn.conn(), name, &id, "denied", 403, &body, now)?;
                    return Ok(Recorded::Denied(decision.reasons));
                }
                intents::set_status(txn.conn(), name, &id, "in_progress", now)?;
                Ok(Recorded::Quorum(Box::new(Quorum {
                    key: hsm_key.clone(),
                    message: p.message,
                    decoded,
                    effects,
                    sol_spend: decision.sol_spend(),
                })))
            })
            .await?;
        match recorded {
            Recorded::Refused(e) => Ok(ApprovalOutcome::Refused(e)),
            Recorded::Counted(body) => Ok(ApprovalOutcome::Counted(body)),
            Recorded::Rejected => Ok(ApprovalOutcome::Rejected),
            Recorded::Denied(r) => Ok(ApprovalOutcome::Denied(r)),
            Recorded::Quorum(q) => {
                let Quorum {
                    key,
                    message,
                    decoded,
                    effects,
                    sol_spend,
                } = *q;
                match self
                    .sign_admitted(
                        agent_name,
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
    }

    /// Enrolls an approver: 32 random bytes from the HSM become a
    /// sensitive, non-extractable HMAC key in the HSM, `approver_added` is
    /// recorded, and the key is returned once for the approver's key file.
    pub async fn add_approver(
        &self,
        name: &str,
        by: &str,
    ) -> Result<Zeroizing<Vec<u8>>, SubmitError> {
        crate::types::AgentName::new(name).map_err(|e| SubmitError::BadRequest {
            code: codes::INVALID_REQUEST,
            message: e.to_string().replace("agent name", "approver name"),
        })?;
        let reader = self.ledger.reader()?;
        if store::approver(&reader, name)
            .map_err(LedgerError::Sqlite)?
            .is_some()
        {
            return Err(SubmitError::BadRequest {
                code: "approver_exists",
                message: format!("approver {name:?} exists or was removed; a name is never reused"),
            });
        }
        drop(reader);
        let hsm = Arc::clone(&self.hsm);
        let label = approval::key_label(name);
        let key = tokio::task::spawn_blocking(
            move || -> Result<Zeroizing<Vec<u8>>, crate::hsm::HsmError> {
                let key = hsm.random(32)?;
                hsm.import_hmac_key(&label, &key)?;
                Ok(key)
            },
        )
        .await
        .map_err(|e| SubmitError::Internal(e.to_string()))?
        .map_err(|e| SubmitError::HsmUnavailable(e.to_string()))?;
        let (n, b) = (name.to_owned(), by.to_owned());
        let recorded = self
            .ledger
            .write(move |txn| {
                let now = txn.now_ms();
                store::add_approver(txn.conn(), &n, now)?;
                let payload = json(&serde_json::json!({
                    "approver": n, "by": b, "key_label": approval::key_label(&n),
                }));
                txn.append(EventType::ApproverAdded, None, None, &payload)
            })
            .await;
        if let Err(e) = recorded {
            // Not recorded, so not enrolled: the key must not linger.
            let hsm = Arc::clone(&self.hsm);
            let label = approval::key_label(name);
            let _ = tokio::task::spawn_blocking(move || hsm.delete_secret(&label)).await;
            return Err(e.into());
        }
        Ok(key)
    }

    /// Removes an approver: recorded, then the key is destroyed. Their
    /// tokens stop counting at once.
    pub async fn remove_approver(&self, name: &str, by: &str) -> Result<u64, SubmitError> {
        let (n, b) = (name.to_owned(), by.to_owned());
        let seq = self
            .ledger
            .write(move |txn| {
                let now = txn.now_ms();
                if !store::remove_approver(txn.conn(), &n, now)? {
                    return Ok(None);
                }
                let payload = json(&serde_json::json!({ "approver": n, "by": b }));
                Ok(Some(
                    txn.append(EventType::ApproverRemoved, None, None, &payload)?
                        .seq
                        .0,
                ))
            })
            .await?
            .ok_or(SubmitError::NotFound)?;
        let hsm = Arc::clone(&self.hsm);
        let label = approval::key_label(name);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || hsm.delete_secret(&label)).await {
            tracing::error!(approver = name, error = %e, "approver removed, but destroying the key failed; it no longer counts");
        }
        Ok(seq)
    }

    /// Every approver with their state.
    pub fn approvers(&self) -> Result<Vec<store::ApproverRecord>, SubmitError> {
        let reader = self.ledger.reader()?;
        Ok(store::approvers(&reader).map_err(LedgerError::Sqlite)?)
    }
}

/// Base64url of an approver key, for the admin answer.
pub fn encode_key(key: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key))
}
