//! The operator's side of approvals (admin socket): relaying an approver's
//! token without the agent's help, so a rejection is a veto even when the
//! agent withholds it, and listing what waits for approvals.

use std::sync::Arc;

use keyward_client::wire::{ApprovalRecordInfo, PendingApprovalInfo};

use super::approvals::{Figures, Relay, counts_now, current_need};
use super::{ApprovalOutcome, Signer, SubmitError};
use crate::approval::{self, store};
use crate::intents;
use crate::ledger::{LedgerError, format_utc, now_ms};

impl Signer {
    /// Applies a token relayed by an operator (`by`, e.g. `uid:0`) to the
    /// pending intent whose intent hash it binds, whichever agent
    /// submitted it: the same checks and ledger entries as the agent's own
    /// request, each entry marked `relayed_by`. Refusals do not count
    /// against the agent, and a locked agent does not stop a relayed
    /// token. A token that does not parse names no intent, so its refusal
    /// is answered without a ledger entry. Returns the intent's agent and
    /// id with the outcome.
    pub async fn relay_approval(
        self: &Arc<Self>,
        token: &str,
        by: &str,
    ) -> Result<(String, String, ApprovalOutcome), SubmitError> {
        let parsed = match approval::parse(token) {
            Ok(p) => p,
            Err(e) => return Ok((String::new(), String::new(), ApprovalOutcome::Refused(e))),
        };
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&parsed.payload.intent_hash, &mut hash).map_err(|e| {
            SubmitError::BadRequest {
                code: "invalid_approval_token",
                message: format!("intent_hash: {e}"),
            }
        })?;
        let reader = self.core.ledger.reader()?;
        let found = intents::pending_by_hash(&reader, &hash).map_err(LedgerError::Sqlite)?;
        drop(reader);
        let (agent_name, intent_id) = match found.as_slice() {
            [] => return Err(SubmitError::NotFound),
            [one] => one.clone(),
            several => {
                return Err(SubmitError::BadRequest {
                    code: "ambiguous_approval",
                    message: format!(
                        "{} pending intents bind to this intent hash ({}); the token cannot say which one it approves",
                        several.len(),
                        several
                            .iter()
                            .map(|(a, i)| format!("{a}/{i}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        };
        let Some(agent) = self.core.agent_named(&agent_name) else {
            return Err(SubmitError::BadRequest {
                code: "unknown_agent",
                message: format!("agent {agent_name:?} is no longer in the policy"),
            });
        };
        let outcome = self
            .apply_approval(&agent, &intent_id, parsed, Relay::Operator(by))
            .await?;
        Ok((agent_name, intent_id, outcome))
    }

    /// Every intent waiting for approvals, with the figures of the policy
    /// in force now and every decision recorded so far.
    pub fn pending_approvals(&self) -> Result<Vec<PendingApprovalInfo>, SubmitError> {
        let reader = self.core.ledger.reader()?;
        let in_force = self.core.in_force();
        let mut out = Vec::new();
        for (agent_name, intent_id, p) in
            intents::all_pending(&reader, now_ms()).map_err(LedgerError::Sqlite)?
        {
            // No agent, no signature: nobody's approval counts. The same
            // when its key is not served any more (a sweep whose retiring
            // key is not in the HSM): listed, never a reason to fail the
            // whole list.
            let agent = self
                .core
                .agent_named(&agent_name)
                .filter(|_| super::sweep::key_of(&in_force, &p.key).is_some());
            let approvers = match &agent {
                Some(agent) => current_need(agent, &in_force, &p)?.of,
                None => Vec::new(),
            };
            let figures = match &agent {
                Some(agent) => self.current_figures(agent, &intent_id, &p)?,
                None => Figures::default(),
            };
            let mut approvals = Vec::new();
            for (approver, decision, ts) in
                store::decisions(&reader, &agent_name, &intent_id).map_err(LedgerError::Sqlite)?
            {
                let counts =
                    counts_now(&reader, &approver, &approvers).map_err(LedgerError::Sqlite)?;
                approvals.push(ApprovalRecordInfo {
                    approver,
                    decision,
                    at: format_utc(ts),
                    counts,
                });
            }
            out.push(PendingApprovalInfo {
                agent: agent_name,
                intent_id,
                key: p.key,
                summary: p.approval.summary.clone(),
                intent_hash: hex::encode(p.intent_hash),
                required: figures.required,
                received: figures.received,
                approvers,
                approvals,
                expires_at: format_utc(p.expires_ms),
            });
        }
        Ok(out)
    }
}
