//! The pure policy decision over derived effects.

use keyward_client::wire::DenialReason;

use super::{AgentPolicy, rules};
use crate::solana::Effects;
use crate::types::{KeyName, Lamports};

/// Outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Every rule the intent broke; empty means allowed.
    pub reasons: Vec<DenialReason>,
    /// SOL this transaction costs the key (outflows plus fees), the amount
    /// counted against the limits when it is signed.
    pub sol_spend: Lamports,
}

impl Decision {
    /// Whether the intent may be signed.
    pub fn allowed(&self) -> bool {
        self.reasons.is_empty()
    }
}

fn reason(rule: &str, detail: String) -> DenialReason {
    DenialReason {
        rule: rule.to_owned(),
        detail,
    }
}

/// Decides whether `agent` may sign a message with `key` whose derived
/// effects are `effects`, given `spent_24h` already spent (or reserved) by
/// the agent in SOL during the rolling 24-hour window. Every broken rule is
/// reported, not only the first.
pub fn evaluate(
    agent: &AgentPolicy,
    key: &KeyName,
    effects: &Effects,
    spent_24h: Lamports,
) -> Decision {
    let mut reasons = Vec::new();
    if !agent.keys.contains(key) {
        reasons.push(reason(
            rules::KEY_NOT_ALLOWED,
            format!("agent {} may not use key {key}", agent.name),
        ));
    }
    for v in &effects.violations {
        let at = v
            .instruction
            .map(|i| format!("instruction {i}: "))
            .unwrap_or_default();
        reasons.push(reason(v.rule, format!("{at}{}", v.detail)));
    }
    for (ix, program) in &effects.unknown_programs {
        if !agent.allow_programs.contains(program) {
            reasons.push(reason(
                rules::PROGRAM_NOT_ALLOWED,
                format!("instruction {ix} calls program {program}, which keyward does not understand and the policy does not allow"),
            ));
        }
    }
    for out in &effects.spl_outflows {
        let mint = out.mint.map_or_else(
            || "an unnamed mint (plain Transfer)".to_owned(),
            |m| m.to_string(),
        );
        reasons.push(reason(
            rules::ASSET_NOT_ALLOWED,
            format!(
                "instruction {} moves {} base units of {mint} from our key; SPL assets are not allowed by this policy",
                out.instruction, out.amount
            ),
        ));
    }
    if let Some(allow) = &agent.allow_recipients {
        for out in effects.sol_outflows.iter().filter(|o| o.kind != "ata_rent") {
            if !allow.contains(&out.to) {
                reasons.push(reason(
                    rules::RECIPIENT_NOT_ALLOWED,
                    format!(
                        "instruction {} sends {} SOL to {}, which is not on the allowlist",
                        out.instruction, out.lamports, out.to
                    ),
                ));
            }
        }
    }
    let sol_spend = effects.total_sol_spend();
    match (sol_spend, agent.sol) {
        (None, _) => reasons.push(reason(
            rules::PER_TX_LIMIT,
            "the SOL outflows of this message overflow a 64-bit lamport count".to_owned(),
        )),
        (Some(spend), _) if spend == Lamports::ZERO => {}
        (Some(spend), None) => reasons.push(reason(
            rules::ASSET_NOT_ALLOWED,
            format!("this message costs our key {spend} SOL and the policy has no SOL limits for agent {}", agent.name),
        )),
        (Some(spend), Some(limits)) => {
            if spend > limits.per_tx {
                reasons.push(reason(
                    rules::PER_TX_LIMIT,
                    format!("costs {spend} SOL including fees; the per-transaction limit is {}", limits.per_tx),
                ));
            }
            match spent_24h.checked_add(spend) {
                Some(total) if total <= limits.per_day => {}
                _ => reasons.push(reason(
                    rules::DAILY_LIMIT,
                    format!(
                        "{spent_24h} SOL spent in the last 24 hours plus {spend} SOL would exceed the daily limit of {}",
                        limits.per_day
                    ),
                )),
            }
        }
    }
    Decision {
        reasons,
        sol_spend: sol_spend.unwrap_or(Lamports(u64::MAX)),
    }
}
