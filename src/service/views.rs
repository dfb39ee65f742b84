//! Read-only views: intent status, keys, effective policy, health.

use std::sync::Arc;

use keyward_client::wire::{
    AssetBudget, ComponentHealth, ErrorBody, HealthView, IntentStatus, IntentView, KeyInfo,
    KeysView, LedgerHealth, PolicyView, SignedIntent, codes,
};

use super::decision::record_breaker;
use super::{Signer, SubmitError};
use crate::amount::format_units;
use crate::intents::IntentStatus as Status;
use crate::ledger::events::DryRunEvaluated;
use crate::policy::{AgentPolicy, AssetLimits, counters, engine};
use crate::types::IntentId;

use crate::ledger::now_ms;

/// The answer's `decision` for a dry-run verdict.
fn dry_run_decision(verdict: &engine::Verdict) -> &'static str {
    if verdict.locked_for_ms.is_some() {
        "locked"
    } else if verdict.approval.is_some() {
        "approval_required"
    } else if verdict.decision.allowed() {
        "allow"
    } else {
        "deny"
    }
}

impl Signer {
    async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, SubmitError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let ledger = self.core.ledger.clone();
        tokio::task::spawn_blocking(move || {
            let conn = ledger.reader().map_err(SubmitError::AuditUnavailable)?;
            f(&conn).map_err(SubmitError::from)
        })
        .await
        .map_err(|e| SubmitError::Internal(e.to_string()))?
    }

    /// What keyward would decide for `req` now. Nothing is signed,
    /// reserved or made pending, but a dry run is not free: it counts
    /// toward the agent's rate windows, and a denied one toward its
    /// breaker, in one ledger transaction with a compact
    /// `dry_run_evaluated` entry (counters change only with an entry). A
    /// locked agent learns nothing and nothing is recorded.
    pub async fn dry_run(
        self: &Arc<Self>,
        agent: &AgentPolicy,
        req: &keyward_client::wire::IntentRequest,
    ) -> Result<keyward_client::wire::DryRunResult, SubmitError> {
        let p = super::prepare::prepare_with_keys(req, agent, &self.core.keys())?;
        let agent_c = agent.clone();
        let intent_id = p.intent_id.to_string();
        let key = p.key.clone();
        let effects = p.message.as_ref().map(|(_, _, e)| e.clone());
        let pre = p.pre_reasons.clone();
        let id = intent_id.clone();
        let content_sha256 = hex::encode(p.content_hash);
        let agent_name = agent.name.to_string();
        let key_name = p.key.to_string();
        let frozen = self
            .read(move |c| super::freeze::covering(c, &agent_name, &key_name))
            .await?;
        if let Some(f) = frozen {
            // Like a locked agent, a frozen one learns only that it is
            // frozen, and nothing is recorded or counted.
            return Ok(keyward_client::wire::DryRunResult {
                intent_id,
                dry_run: true,
                decision: "frozen".to_owned(),
                spend: Default::default(),
                reasons: vec![keyward_client::wire::DenialReason {
                    rule: codes::FROZEN.to_owned(),
                    detail: super::freeze::Frozen::from(&f).to_string(),
                }],
                retry_after: None,
            });
        }
        let verdict = self
            .core
            .ledger
            .write(move |txn| {
                let now = txn.now_ms();
                // Nothing a dry run records releases anything.
                txn.skip_sync();
                let verdict = engine::decide(
                    txn.conn(),
                    &agent_c,
                    &key,
                    effects.as_ref(),
                    pre,
                    &id,
                    now,
                    engine::Mode::DryRun,
                )?;
                if verdict.locked_for_ms.is_some() {
                    return Ok(verdict);
                }
                let denied = !verdict.decision.allowed();
                let rl = agent_c.rate_limit;
                if !denied && rl.per_minute.is_none() && rl.per_hour.is_none() {
                    return Ok(verdict);
                }
                let name = agent_c.name.as_str();
                let evaluated = DryRunEvaluated {
                    decision: dry_run_decision(&verdict).to_owned(),
                    rules: verdict
                        .decision
                        .reasons
                        .iter()
                        .map(|r| r.rule.clone())
                        .collect(),
                    content_sha256,
                };
                let entry = txn.record(Some(&id), Some(name), &evaluated)?;
                engine::count_rate(
                    txn.conn(),
                    &agent_c,
                    &engine::rate_key("dry_run", entry.seq.0),
                    now,
                )?;
                if denied {
                    let counted = engine::count_denial(txn.conn(), &agent_c, now)?;
                    record_breaker(txn, name, Some(&id), counted)?;
                }
                Ok(verdict)
            })
            .await?;
        let decision = dry_run_decision(&verdict);
        let retry_after = verdict
            .locked_for_ms
            .map(|ms| u64::try_from((ms + 999) / 1000).unwrap_or(1));
        Ok(keyward_client::wire::DryRunResult {
            intent_id,
            dry_run: true,
            decision: decision.to_owned(),
            spend: verdict
                .decision
                .spend
                .iter()
                .map(|(a, v)| (a.key(), *v))
                .collect(),
            reasons: verdict.decision.reasons,
            retry_after,
        })
    }

    /// Status of one of the agent's intents; `None` if there is none.
    pub async fn intent_view(
        self: &Arc<Self>,
        agent: &AgentPolicy,
        intent_id: &str,
    ) -> Result<Option<IntentView>, SubmitError> {
        let id = IntentId::new(intent_id).map_err(|e| SubmitError::BadRequest {
            code: keyward_client::wire::codes::INVALID_INTENT_ID,
            message: e.to_string(),
        })?;
        let agent_name = agent.name.to_string();
        let rec = self
            .read(move |c| {
                let rec = crate::intents::get(c, &agent_name, id.as_str())?;
                let pending = match &rec {
                    Some(r) if matches!(r.status, Status::PendingApproval | Status::Expired) => {
                        crate::intents::pending(c, &agent_name, id.as_str())?
                    }
                    _ => None,
                };
                Ok(rec.map(|r| (r, pending)))
            })
            .await?;
        let Some((rec, pending)) = rec else {
            return Ok(None);
        };
        let mut view = IntentView {
            intent_id: intent_id.to_owned(),
            status: IntentStatus::InProgress,
            signature: None,
            transaction: None,
            ledger_seq: None,
            entry_hash: None,
            error_code: None,
            reasons: Vec::new(),
            approval: None,
            leaf_index: None,
            proof: None,
        };
        let body = rec.response.unwrap_or_default();
        match rec.status {
            Status::Signed => {
                let s: SignedIntent = serde_json::from_slice(&body)
                    .map_err(|e| SubmitError::Internal(format!("stored response: {e}")))?;
                view.status = IntentStatus::Signed;
                view.signature = Some(s.signature);
                view.transaction = Some(s.transaction);
                view.ledger_seq = Some(s.ledger_seq);
                view.entry_hash = Some(s.entry_hash);
                view.leaf_index = s.ledger_seq.checked_sub(1);
                let seq = s.ledger_seq;
                view.proof = self
                    .read(move |c| {
                        crate::ledger::prove(c, seq).map_err(|e| {
                            rusqlite::Error::ToSqlConversionFailure(Box::new(
                                std::io::Error::other(e.to_string()),
                            ))
                        })
                    })
                    .await?
                    .and_then(|p| serde_json::to_value(p).ok());
            }
            Status::Denied => {
                let e: ErrorBody = serde_json::from_slice(&body)
                    .map_err(|e| SubmitError::Internal(format!("stored response: {e}")))?;
                view.status = IntentStatus::Denied;
                view.error_code = Some(e.error.code);
                view.reasons = e.error.reasons;
            }
            Status::PendingApproval | Status::Expired => {
                // A window that has run out reads as expired at once, before
                // the sweeper records it.
                let expired = rec.status == Status::Expired
                    || pending.as_ref().is_none_or(|p| p.expires_ms <= now_ms());
                view.status = if expired {
                    view.error_code = Some(codes::INTENT_EXPIRED.to_owned());
                    IntentStatus::Expired
                } else {
                    IntentStatus::PendingApproval
                };
                // A key no longer served (a sweep's retiring key gone from
                // the HSM): the request as recorded, no figures.
                let figures = match (&pending, expired) {
                    (Some(p), false)
                        if super::sweep::key_of(&self.core.in_force(), &p.key).is_some() =>
                    {
                        Some(self.current_figures(agent, intent_id, p)?)
                    }
                    _ => None,
                };
                view.approval = pending.map(|p| {
                    let mut req = p.approval;
                    // What counts is decided under the policy in force now.
                    if let Some(f) = figures {
                        req.required = f.required;
                        req.received = f.received;
                        req.approvers = f.of;
                    }
                    req
                });
            }
            Status::InProgress => {}
        }
        Ok(Some(view))
    }

    /// Keys the agent may use.
    pub fn keys_view(&self, agent: &AgentPolicy) -> KeysView {
        let keys = self.core.keys();
        KeysView {
            keys: agent
                .keys
                .iter()
                .filter_map(|n| keys.get(n))
                .map(|k| KeyInfo {
                    name: k.name.to_string(),
                    public_key: k.public_key.to_base58(),
                    state: "active".to_owned(),
                })
                .collect(),
        }
    }

    /// The agent's effective policy and remaining budgets.
    pub async fn policy_view(
        self: &Arc<Self>,
        agent: &AgentPolicy,
    ) -> Result<PolicyView, SubmitError> {
        let policy = self.core.policy();
        let agent_name = agent.name.to_string();
        let assets: Vec<(String, AssetLimits)> = agent
            .limits
            .iter()
            .map(|(a, l)| (a.key(), l.clone()))
            .collect();
        let rl = agent.rate_limit;
        let (limits, (used_minute, used_hour), (denials, locked_until)) = self
            .read(move |c| {
                let now = now_ms();
                let limits = assets
                    .into_iter()
                    .map(|(asset, l)| {
                        let spent = counters::spent_24h(c, &agent_name, &asset, now)?.0;
                        let d = l.decimals;
                        Ok(AssetBudget {
                            asset,
                            decimals: d,
                            per_tx: format_units(u128::from(l.per_tx), d),
                            per_day: format_units(u128::from(l.per_day), d),
                            spent_24h: format_units(u128::from(spent), d),
                            spent_24h_base_units: spent,
                            remaining_24h: format_units(
                                u128::from(l.per_day.saturating_sub(spent)),
                                d,
                            ),
                            approval_above: l
                                .approval_above
                                .map(|a| format_units(u128::from(a), d)),
                            approvals_required: l.approvers.as_ref().map(|a| a.required),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let rates = engine::rate_counts(c, &agent_name, now)?;
                let (denials, until) = engine::breaker_state(c, &agent_name)?;
                Ok((
                    limits,
                    rates,
                    (denials, if until > now { Some(until) } else { None }),
                ))
            })
            .await?;
        Ok(PolicyView {
            agent: agent.name.to_string(),
            policy_hash: policy.hash_hex(),
            keys: agent.keys.iter().map(|k| k.to_string()).collect(),
            allow_recipients: agent
                .allow_recipients
                .as_ref()
                .map(|s| s.iter().map(|k| k.to_base58()).collect()),
            allow_programs: agent.allow_programs.iter().map(|k| k.to_base58()).collect(),
            limits,
            rate_limit: (rl.per_minute.is_some() || rl.per_hour.is_some()).then_some(
                keyward_client::wire::RateView {
                    per_minute: rl.per_minute,
                    per_hour: rl.per_hour,
                    used_last_minute: used_minute,
                    used_last_hour: used_hour,
                },
            ),
            active_hours: agent.active_hours.as_ref().map(|h| h.describe()),
            breaker: Some(keyward_client::wire::BreakerView {
                max_consecutive_denials: agent.breaker.max_consecutive_denials,
                cooldown_s: agent.breaker.cooldown_s,
                consecutive_denials: denials,
                locked_until: locked_until.map(crate::ledger::format_utc),
            }),
        })
    }

    /// Health of the HSM and the ledger.
    pub async fn health_view(self: &Arc<Self>) -> HealthView {
        let backend = self.core.hsm.backend();
        let hsm_state = self.core.hsm.health().await.map_err(|e| e.to_string());
        let l = self.core.ledger.health();
        let ledger_ok = !l.breaker_open;
        let mirror = self.core.mirror_gate().map(|g| {
            let (entries, age_ms) = g.lag(l.head_seq);
            let check = g.check(l.head_seq);
            keyward_client::wire::MirrorHealth {
                ok: check.is_ok(),
                unmirrored_entries: entries,
                oldest_unmirrored_age_s: u64::try_from(age_ms / 1000).unwrap_or(0),
                detail: check.err(),
                sinks: g
                    .sink_acks()
                    .into_iter()
                    .map(|(name, acked)| keyward_client::wire::SinkHealth {
                        name: name.to_owned(),
                        acked_seq: acked,
                        lag_entries: l.head_seq.saturating_sub(acked),
                    })
                    .collect(),
            }
        });
        let mirror_ok = mirror.as_ref().is_none_or(|m| m.ok);
        let history = self.core.history_gate().check();
        // The freezes in force, without the operator's reasons (the admin
        // socket adds them). Unreadable, they are reported as a cause.
        let freezes = self.read(super::freeze::list).await;
        let mut reasons = Vec::new();
        if let Err(e) = &history {
            reasons.push(format!("the audit history is broken: {e}"));
        }
        if let Err(e) = &hsm_state {
            reasons.push(format!("the HSM is unavailable: {e}"));
        }
        if !ledger_ok {
            reasons.push("the audit breaker is open: the ledger cannot record".to_owned());
        }
        if !mirror_ok {
            reasons.push("the ledger mirror is behind: nothing is signed".to_owned());
        }
        let freezes: Vec<keyward_client::wire::FreezeView> = match freezes {
            Ok(list) => list
                .into_iter()
                .map(|f| {
                    reasons.push(format!(
                        "signing frozen for {} since {} (`keyward unfreeze` lifts it)",
                        f.scope,
                        crate::ledger::format_utc(f.since_ms)
                    ));
                    keyward_client::wire::FreezeView {
                        scope: f.scope,
                        since: crate::ledger::format_utc(f.since_ms),
                        by: f.by,
                        reason: None,
                        ledger_seq: f.seq,
                        created: None,
                    }
                })
                .collect(),
            Err(e) => {
                reasons.push(format!("the freezes in force cannot be read: {e}"));
                Vec::new()
            }
        };
        let drills = self.drill_health(&mut reasons).await;
        HealthView {
            status: if history.is_err() {
                "failed"
            } else if reasons.is_empty() {
                "ok"
            } else {
                "degraded"
            }
            .to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            hsm: ComponentHealth {
                ok: hsm_state.is_ok(),
                name: backend.to_owned(),
                detail: hsm_state.err(),
            },
            ledger: LedgerHealth {
                ok: ledger_ok,
                head_seq: l.head_seq,
                audit_breaker: if l.breaker_open { "open" } else { "closed" }.to_owned(),
                consecutive_failures: l.consecutive_failures,
                commits: l.commits,
                largest_batch: l.largest_batch,
                history_ok: history.is_ok(),
                verified_seq: self.core.history_gate().verified_seq(),
                history_detail: history.err(),
            },
            mirror,
            reasons,
            freezes,
            drills,
        }
    }

    /// The last drill of each kind for health; a failed drill or one older
    /// than [`super::drills::MAX_DRILL_AGE_DAYS`] adds its reason, a kind
    /// never run is `never` and adds none.
    async fn drill_health(
        self: &Arc<Self>,
        reasons: &mut Vec<String>,
    ) -> Vec<keyward_client::wire::DrillHealth> {
        let last = match self.read(super::drills::last_drills).await {
            Ok(l) => l,
            Err(e) => {
                reasons.push(format!("the last drills cannot be read: {e}"));
                return Vec::new();
            }
        };
        let now = crate::ledger::now_ms();
        super::drills::KINDS
            .iter()
            .map(|kind| match last.iter().find(|d| d.kind == *kind) {
                Some(d) => {
                    if let Some(why) = d.degraded_reason(now) {
                        reasons.push(why);
                    }
                    keyward_client::wire::DrillHealth {
                        kind: d.kind.clone(),
                        outcome: d.outcome.clone(),
                        completed_at: Some(crate::ledger::format_utc(d.completed_ms)),
                        age_days: u64::try_from(d.age_days(now)).ok(),
                        failed_step: d.failed_step.clone(),
                        ledger_seq: Some(d.seq),
                    }
                }
                None => keyward_client::wire::DrillHealth {
                    kind: (*kind).to_owned(),
                    outcome: "never".to_owned(),
                    completed_at: None,
                    age_days: None,
                    failed_step: None,
                    ledger_seq: None,
                },
            })
            .collect()
    }
}
