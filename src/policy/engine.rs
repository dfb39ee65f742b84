//! The stateful part of a decision: the denial breaker, active hours, rate
//! windows and rolling spend, read and updated in the caller's transaction
//! (the ledger transaction that records the decision), so concurrent
//! intents and restarts can neither race nor reset them.

use std::collections::BTreeMap;

use keyward_client::wire::DenialReason;
use rusqlite::{Connection, OptionalExtension, params};

use super::evaluate::reason;
use super::{AgentPolicy, Asset, Decision, counters, evaluate, rules, spend_by_asset};
use crate::solana::Effects;
use crate::types::{KeyName, Lamports};

// Tables `rate_events` and `agent_breaker`: created and migrated by
// `crate::schema`.

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

/// Whether a decision changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reserve spend, count the rate, update the breaker.
    Commit,
    /// Like `Commit` for an intent whose approvals reached their quorum:
    /// the approval threshold no longer holds it back.
    CommitApproved,
    /// Decide only; change nothing.
    DryRun,
}

/// A breaker that this denial opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trip {
    /// Consecutive denials that opened it.
    pub denials: u32,
    /// When the lock ends (Unix ms).
    pub until_ms: i64,
}

/// An allowed intent that needs human approval before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalNeed {
    /// Distinct approvals needed: the largest quorum of the assets that
    /// crossed their threshold.
    pub required: u32,
    /// Who may approve (the union of those assets' approvers).
    pub of: Vec<String>,
    /// Why, per asset: `2.5 SOL is above 1`.
    pub because: Vec<String>,
}

/// Outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Reasons and spend.
    pub decision: Decision,
    /// What the agent had spent per asset in the window before.
    pub spent_before: BTreeMap<Asset, u64>,
    /// The agent is locked by its breaker for this many more milliseconds:
    /// nothing was evaluated.
    pub locked_for_ms: Option<i64>,
    /// This denial locked the agent.
    pub tripped: Option<Trip>,
    /// An expired lock was cleared by this decision.
    pub cooled_down: bool,
    /// Allowed, but above an approval threshold: nothing was reserved or
    /// counted; the intent waits for approvals.
    pub approval: Option<ApprovalNeed>,
}

/// Breaker state of an agent: consecutive denials and lock end (0: none).
pub fn breaker_state(conn: &Connection, agent: &str) -> rusqlite::Result<(u32, i64)> {
    Ok(conn
        .prepare_cached("SELECT consecutive, locked_until_ms FROM agent_breaker WHERE agent = ?1")?
        .query_row(params![agent], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?
        .unwrap_or((0, 0)))
}

fn set_breaker(
    conn: &Connection,
    agent: &str,
    consecutive: u32,
    locked_until: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO agent_breaker (agent, consecutive, locked_until_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (agent) DO UPDATE SET consecutive = excluded.consecutive, locked_until_ms = excluded.locked_until_ms",
    )?
    .execute(params![agent, consecutive, locked_until])?;
    Ok(())
}

/// Clears an agent's breaker (operator reset). Returns the state before.
pub fn reset_breaker(conn: &Connection, agent: &str) -> rusqlite::Result<(u32, i64)> {
    let before = breaker_state(conn, agent)?;
    set_breaker(conn, agent, 0, 0)?;
    Ok(before)
}

/// Allowed intents of `agent` in the last minute and hour before `now_ms`.
pub fn rate_counts(conn: &Connection, agent: &str, now_ms: i64) -> rusqlite::Result<(u32, u32)> {
    let count = |since: i64| -> rusqlite::Result<u32> {
        conn.prepare_cached("SELECT count(*) FROM rate_events WHERE agent = ?1 AND ts_ms > ?2")?
            .query_row(params![agent, since], |r| r.get(0))
    };
    Ok((count(now_ms - MINUTE_MS)?, count(now_ms - HOUR_MS)?))
}

/// When the oldest of the last `n` allowed intents leaves a window of
/// `window_ms`: the earliest moment another one fits.
fn retry_in_ms(
    conn: &Connection,
    agent: &str,
    now_ms: i64,
    window_ms: i64,
    n: u32,
) -> rusqlite::Result<i64> {
    let oldest: Option<i64> = conn
        .prepare_cached(
            "SELECT ts_ms FROM rate_events WHERE agent = ?1 AND ts_ms > ?2 ORDER BY ts_ms DESC LIMIT 1 OFFSET ?3",
        )?
        .query_row(params![agent, now_ms - window_ms, n.saturating_sub(1)], |r| r.get(0))
        .optional()?;
    Ok(oldest.map_or(0, |t| (t + window_ms - now_ms).max(0)))
}

/// Forgets what an intent counted (its signing failed and nothing was
/// released): its spend reservations and its rate event.
pub fn release(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<()> {
    counters::release(conn, agent, intent_id)?;
    conn.prepare_cached("DELETE FROM rate_events WHERE agent = ?1 AND intent_id = ?2")?
        .execute(params![agent, intent_id])?;
    Ok(())
}

/// Sets the breaker after one more denial on top of `consecutive`; the trip
/// if this denial opened it.
fn add_denial(
    conn: &Connection,
    agent: &AgentPolicy,
    consecutive: u32,
    now_ms: i64,
) -> rusqlite::Result<Option<Trip>> {
    let name = agent.name.as_str();
    let denials = consecutive.saturating_add(1);
    if denials >= agent.breaker.max_consecutive_denials {
        let until_ms = now_ms.saturating_add(
            i64::try_from(agent.breaker.cooldown_s).unwrap_or(i64::MAX / 2000) * 1000,
        );
        set_breaker(conn, name, denials, until_ms)?;
        Ok(Some(Trip { denials, until_ms }))
    } else {
        set_breaker(conn, name, denials, 0)?;
        Ok(None)
    }
}

/// How long `agent` stays locked by its breaker at `now_ms`, if it is.
pub fn locked_for_ms(conn: &Connection, agent: &str, now_ms: i64) -> rusqlite::Result<Option<i64>> {
    let (_, locked_until) = breaker_state(conn, agent)?;
    Ok((locked_until > now_ms).then_some(locked_until - now_ms))
}

/// Counts a denial made outside [`decide`] (a refused approval, a denied
/// dry run) toward `agent`'s breaker, in the caller's ledger transaction,
/// which must record the denial itself. Call only when the agent is not
/// locked. Returns the trip it caused and whether an expired lock was
/// cleared first (the caller records `breaker_reset` by cooldown then).
pub fn count_denial(
    conn: &Connection,
    agent: &AgentPolicy,
    now_ms: i64,
) -> rusqlite::Result<(Option<Trip>, bool)> {
    let (consecutive, locked_until) = breaker_state(conn, agent.name.as_str())?;
    let cooled_down = locked_until != 0 && locked_until <= now_ms;
    let consecutive = if cooled_down { 0 } else { consecutive };
    Ok((add_denial(conn, agent, consecutive, now_ms)?, cooled_down))
}

/// Counts one event toward `agent`'s rate windows (when it has any) under
/// `key`, unique per agent: an intent id, or for events that are not
/// intents a key no intent id can take (see [`rate_key`]).
pub fn count_rate(
    conn: &Connection,
    agent: &AgentPolicy,
    key: &str,
    now_ms: i64,
) -> rusqlite::Result<bool> {
    let rl = agent.rate_limit;
    if rl.per_minute.is_none() && rl.per_hour.is_none() {
        return Ok(false);
    }
    let name = agent.name.as_str();
    conn.prepare_cached("DELETE FROM rate_events WHERE agent = ?1 AND ts_ms <= ?2")?
        .execute(params![name, now_ms - HOUR_MS])?;
    conn.prepare_cached("INSERT INTO rate_events (agent, intent_id, ts_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![name, key, now_ms])?;
    Ok(true)
}

/// The rate-window key of an event that is not an intent (`what` names it,
/// `seq` is its ledger entry): `#` cannot appear in an intent id, so it
/// never collides with one.
pub fn rate_key(what: &str, seq: u64) -> String {
    format!("#{what}/{seq}")
}

/// The approvals `agent`'s policy asks for a transaction spending `spend`
/// (per asset): `None` when no asset crosses its approval threshold. Pure:
/// the same figures at submission and, under the policy in force then, at
/// every later approval.
pub fn approval_need(agent: &AgentPolicy, spend: &BTreeMap<Asset, u64>) -> Option<ApprovalNeed> {
    let mut approval: Option<ApprovalNeed> = None;
    for (asset, &amount) in spend {
        let Some(l) = agent.limits.get(asset) else {
            continue;
        };
        if let (Some(threshold), Some(approvers)) = (l.approval_above, &l.approvers)
            && amount > threshold
        {
            let need = approval.get_or_insert_with(|| ApprovalNeed {
                required: 0,
                of: Vec::new(),
                because: Vec::new(),
            });
            need.required = need.required.max(approvers.required);
            for n in &approvers.of {
                if !need.of.contains(n) {
                    need.of.push(n.clone());
                }
            }
            let units = |v: u64| crate::amount::format_units(u128::from(v), l.decimals);
            need.because.push(format!(
                "{} {asset} is above {}",
                units(amount),
                units(threshold)
            ));
        }
    }
    approval
}

/// Decides an intent of `agent` at `now_ms`: the breaker first (a locked
/// agent is not evaluated), then the static rules and limits
/// ([`evaluate`]), active hours and rates. In [`Mode::Commit`] an allowed
/// intent reserves its spend and counts toward the rates, a denial counts
/// toward the breaker (and may lock the agent), an allowed one resets it.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    conn: &Connection,
    agent: &AgentPolicy,
    key: &KeyName,
    effects: Option<&Effects>,
    pre_reasons: Vec<DenialReason>,
    intent_id: &str,
    now_ms: i64,
    mode: Mode,
) -> rusqlite::Result<Verdict> {
    let name = agent.name.as_str();
    let commit = matches!(mode, Mode::Commit | Mode::CommitApproved);
    let (consecutive, locked_until) = breaker_state(conn, name)?;
    let mut cooled_down = false;
    if locked_until > now_ms {
        return Ok(Verdict {
            decision: Decision::denied(Vec::new()),
            spent_before: BTreeMap::new(),
            locked_for_ms: Some(locked_until - now_ms),
            tripped: None,
            cooled_down: false,
            approval: None,
        });
    }
    let mut consecutive = consecutive;
    if locked_until != 0 {
        // The cooldown has passed: the lock lifts and the count restarts.
        cooled_down = true;
        consecutive = 0;
        if commit {
            set_breaker(conn, name, 0, 0)?;
        }
    }

    let mut spent_before = BTreeMap::new();
    if let Some(Ok(spend)) = effects.map(spend_by_asset) {
        for asset in spend.into_keys() {
            let s = if commit {
                counters::spent_24h_advance(conn, name, &asset.key(), now_ms)?
            } else {
                counters::spent_24h(conn, name, &asset.key(), now_ms)?
            };
            spent_before.insert(asset, s.0);
        }
    }
    let mut decision = match effects {
        Some(effects) if pre_reasons.is_empty() => evaluate(agent, key, effects, &spent_before),
        _ => Decision::denied(pre_reasons),
    };

    if let Some(hours) = &agent.active_hours
        && !hours.allows(now_ms)
    {
        decision.reasons.push(reason(
            rules::OUTSIDE_ACTIVE_HOURS,
            format!(
                "it is {} for agent {}; its active hours are {}",
                hours.local_time(now_ms),
                agent.name,
                hours.describe()
            ),
        ));
    }
    let rl = agent.rate_limit;
    if rl.per_minute.is_some() || rl.per_hour.is_some() {
        let (minute, hour) = rate_counts(conn, name, now_ms)?;
        for (limit, count, window, what) in [
            (rl.per_minute, minute, MINUTE_MS, "minute"),
            (rl.per_hour, hour, HOUR_MS, "hour"),
        ] {
            if let Some(limit) = limit
                && count >= limit
            {
                let wait = retry_in_ms(conn, name, now_ms, window, limit)?;
                decision.reasons.push(reason(
                    rules::RATE_LIMITED,
                    format!(
                        "{count} intents allowed in the last {what}; the limit is {limit}; another fits in {} s",
                        (wait + 999) / 1000
                    ),
                ));
            }
        }
    }

    let approval = if decision.allowed() && mode != Mode::CommitApproved {
        approval_need(agent, &decision.spend)
    } else {
        None
    };

    let mut tripped = None;
    if commit {
        if decision.allowed() && approval.is_none() {
            for (asset, amount) in &decision.spend {
                counters::reserve(
                    conn,
                    name,
                    &asset.key(),
                    intent_id,
                    Lamports(*amount),
                    now_ms,
                )?;
            }
            count_rate(conn, agent, intent_id, now_ms)?;
            if consecutive != 0 {
                set_breaker(conn, name, 0, 0)?;
            }
        } else if decision.allowed() {
            // Waiting for approval: nothing reserved or counted until it is
            // approved and signed; not a denial either.
        } else {
            tripped = add_denial(conn, agent, consecutive, now_ms)?;
        }
    }
    Ok(Verdict {
        decision,
        spent_before,
        locked_for_ms: None,
        tripped,
        cooled_down,
        approval,
    })
}
