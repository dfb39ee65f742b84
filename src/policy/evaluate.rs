//! The pure policy decision over derived effects.

use std::collections::BTreeMap;

use keyward_client::wire::DenialReason;

use super::{AgentPolicy, Asset, rules};
use crate::amount::format_units;
use crate::solana::{Effects, associated_token_address};
use crate::types::{KeyName, Lamports, PublicKey};

/// Outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Every rule the intent broke; empty means allowed.
    pub reasons: Vec<DenialReason>,
    /// What the transaction costs per asset in base units (SOL: outflows
    /// plus fees), the amounts counted against the limits when it is signed.
    pub spend: BTreeMap<Asset, u64>,
}

impl Decision {
    /// Whether the intent may be signed.
    pub fn allowed(&self) -> bool {
        self.reasons.is_empty()
    }

    /// The SOL part of [`Decision::spend`].
    pub fn sol_spend(&self) -> Lamports {
        Lamports(self.spend.get(&Asset::Sol).copied().unwrap_or(0))
    }

    /// A denial for reasons found before evaluation.
    pub fn denied(reasons: Vec<DenialReason>) -> Decision {
        Decision {
            reasons,
            spend: BTreeMap::new(),
        }
    }
}

pub(crate) fn reason(rule: &str, detail: String) -> DenialReason {
    DenialReason {
        rule: rule.to_owned(),
        detail,
    }
}

/// What a message spends per asset: SOL outflows plus fees, and SPL
/// outflows whose mint the instruction names. `Err` names an asset whose
/// total overflows 64 bits.
pub fn spend_by_asset(effects: &Effects) -> Result<BTreeMap<Asset, u64>, Asset> {
    let mut spend = BTreeMap::new();
    let sol = effects.total_sol_spend().ok_or(Asset::Sol)?;
    if sol > Lamports::ZERO {
        spend.insert(Asset::Sol, sol.0);
    }
    for out in &effects.spl_outflows {
        if let Some(mint) = out.mint {
            let asset = Asset::Mint(mint);
            let total = spend.entry(asset).or_insert(0u64);
            *total = total.checked_add(out.amount).ok_or(asset)?;
        }
    }
    Ok(spend)
}

fn units(amount: u64, decimals: u8) -> String {
    format_units(u128::from(amount), decimals)
}

/// Decides whether `agent` may sign a message with `key` whose derived
/// effects are `effects`, given what the agent already spent (or reserved)
/// per asset during the rolling 24-hour window (`spent_24h`; a missing
/// asset counts as zero). Every broken rule is reported, not only the
/// first.
pub fn evaluate(
    agent: &AgentPolicy,
    key: &KeyName,
    effects: &Effects,
    spent_24h: &BTreeMap<Asset, u64>,
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
        let Some(mint) = out.mint else {
            reasons.push(reason(
                rules::ASSET_NOT_ALLOWED,
                format!(
                    "instruction {} is a plain SPL Transfer, which does not name its mint; keyward signs token transfers only as TransferChecked",
                    out.instruction
                ),
            ));
            continue;
        };
        let Some(limits) = agent.limits.get(&Asset::Mint(mint)) else {
            reasons.push(reason(
                rules::ASSET_NOT_ALLOWED,
                format!(
                    "instruction {} moves mint {mint}, which has no limits for agent {}",
                    out.instruction, agent.name
                ),
            ));
            continue;
        };
        if limits.token_program != Some(out.token_program) {
            reasons.push(reason(
                rules::ASSET_NOT_ALLOWED,
                format!(
                    "instruction {} moves mint {mint} through program {}, but the policy names another token program for it",
                    out.instruction, out.token_program
                ),
            ));
        }
        if out.decimals != Some(limits.decimals) {
            reasons.push(reason(
                rules::ASSET_NOT_ALLOWED,
                format!(
                    "instruction {} asserts {:?} decimals for mint {mint}; the policy says {}",
                    out.instruction, out.decimals, limits.decimals
                ),
            ));
        }
        if let Some(allow) = &agent.allow_recipients
            && !spl_destination_allowed(allow, &out.destination, &mint, &out.token_program)
        {
            reasons.push(reason(
                rules::RECIPIENT_NOT_ALLOWED,
                format!(
                    "instruction {} sends {mint} to token account {}, which is neither on the allowlist nor the associated token account of a wallet on it",
                    out.instruction, out.destination
                ),
            ));
        }
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
    let spend = match spend_by_asset(effects) {
        Ok(spend) => spend,
        Err(asset) => {
            reasons.push(reason(
                rules::PER_TX_LIMIT,
                format!("the {asset} outflows of this message overflow a 64-bit amount"),
            ));
            return Decision {
                reasons,
                spend: BTreeMap::new(),
            };
        }
    };
    for (asset, &amount) in &spend {
        let Some(limits) = agent.limits.get(asset) else {
            if *asset == Asset::Sol {
                reasons.push(reason(
                    rules::ASSET_NOT_ALLOWED,
                    format!(
                        "this message costs our key {} SOL and the policy has no SOL limits for agent {}",
                        Lamports(amount),
                        agent.name
                    ),
                ));
            }
            // SPL assets without limits were reported per instruction above.
            continue;
        };
        let d = limits.decimals;
        let what = if *asset == Asset::Sol {
            "SOL including fees".to_owned()
        } else {
            format!("of {asset}")
        };
        if amount > limits.per_tx {
            reasons.push(reason(
                rules::PER_TX_LIMIT,
                format!(
                    "costs {} {what}; the per-transaction limit is {}",
                    units(amount, d),
                    units(limits.per_tx, d)
                ),
            ));
        }
        let spent = spent_24h.get(asset).copied().unwrap_or(0);
        match spent.checked_add(amount) {
            Some(total) if total <= limits.per_day => {}
            _ => reasons.push(reason(
                rules::DAILY_LIMIT,
                format!(
                    "{} spent in the last 24 hours plus {} {what} would exceed the daily limit of {}",
                    units(spent, d),
                    units(amount, d),
                    units(limits.per_day, d)
                ),
            )),
        }
    }
    Decision { reasons, spend }
}

/// An SPL destination is allowed when it is on the allowlist itself or is
/// the associated token account (for this mint and program) of a wallet on
/// it.
fn spl_destination_allowed(
    allow: &std::collections::BTreeSet<PublicKey>,
    destination: &PublicKey,
    mint: &PublicKey,
    token_program: &PublicKey,
) -> bool {
    allow.contains(destination)
        || allow
            .iter()
            .any(|wallet| associated_token_address(wallet, mint, token_program) == *destination)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use super::*;
    use crate::policy::AssetLimits;
    use crate::solana::{SolOutflow, SplOutflow, programs};
    use crate::types::AgentName;

    const MINT: PublicKey = PublicKey([9; 32]);
    const WALLET: PublicKey = PublicKey([5; 32]);

    fn agent(allow: Option<BTreeSet<PublicKey>>) -> AgentPolicy {
        AgentPolicy {
            name: AgentName::new("a").unwrap(),
            uid: 1,
            keys: vec![KeyName::new("hot").unwrap()],
            allow_recipients: allow,
            allow_programs: BTreeSet::new(),
            limits: [
                (
                    Asset::Sol,
                    AssetLimits {
                        decimals: 9,
                        per_tx: 1_000_000,
                        per_day: 2_000_000,
                        token_program: None,
                        approval_above: None,
                        approvers: None,
                    },
                ),
                (
                    Asset::Mint(MINT),
                    AssetLimits {
                        decimals: 6,
                        per_tx: 100,
                        per_day: 150,
                        token_program: Some(programs::TOKEN),
                        approval_above: None,
                        approvers: None,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            rate_limit: Default::default(),
            active_hours: None,
            breaker: Default::default(),
        }
    }

    fn spl(destination: PublicKey, amount: u64) -> SplOutflow {
        SplOutflow {
            instruction: 0,
            token_program: programs::TOKEN,
            mint: Some(MINT),
            source: PublicKey([1; 32]),
            destination,
            amount,
            decimals: Some(6),
        }
    }

    fn rules_of(d: &Decision) -> Vec<&str> {
        d.reasons.iter().map(|r| r.rule.as_str()).collect()
    }

    #[test]
    fn spl_spend_is_per_mint_and_checked_against_its_limits() {
        let key = KeyName::new("hot").unwrap();
        let a = agent(None);
        let fx = Effects {
            fees: Lamports(5_000),
            spl_outflows: vec![spl(PublicKey([2; 32]), 60), spl(PublicKey([3; 32]), 40)],
            ..Effects::default()
        };
        let d = evaluate(&a, &key, &fx, &BTreeMap::new());
        assert!(d.allowed(), "{:?}", d.reasons);
        assert_eq!(d.spend[&Asset::Mint(MINT)], 100);
        assert_eq!(d.sol_spend(), Lamports(5_000));
        // 101 in one transaction; then 100 with 60 already spent today.
        let over = Effects {
            spl_outflows: vec![spl(PublicKey([2; 32]), 101)],
            ..fx.clone()
        };
        assert_eq!(
            rules_of(&evaluate(&a, &key, &over, &BTreeMap::new())),
            vec![rules::PER_TX_LIMIT]
        );
        let spent = [(Asset::Mint(MINT), 60)].into_iter().collect();
        assert_eq!(
            rules_of(&evaluate(&a, &key, &fx, &spent)),
            vec![rules::DAILY_LIMIT]
        );
    }

    #[test]
    fn limit_denials_state_the_amounts_in_the_assets_units() {
        let key = KeyName::new("hot").unwrap();
        let a = agent(None);
        let fx = Effects {
            fees: Lamports(5_000),
            spl_outflows: vec![spl(PublicKey([2; 32]), 101)],
            ..Effects::default()
        };
        let spent = [(Asset::Mint(MINT), 60)].into_iter().collect();
        let d = evaluate(&a, &key, &fx, &spent);
        let detail = |rule: &str| {
            d.reasons
                .iter()
                .find(|r| r.rule == rule)
                .map(|r| r.detail.clone())
                .unwrap()
        };
        assert_eq!(
            detail(rules::PER_TX_LIMIT),
            format!("costs 0.000101 of {MINT}; the per-transaction limit is 0.0001")
        );
        assert_eq!(
            detail(rules::DAILY_LIMIT),
            format!(
                "0.00006 spent in the last 24 hours plus 0.000101 of {MINT} would exceed the daily limit of 0.00015"
            )
        );
    }

    #[test]
    fn an_intent_that_spends_no_sol_needs_no_sol_limits() {
        // Fees paid by another account and only a token transfer: SOL is not
        // spent, so an agent without SOL limits may sign it.
        let key = KeyName::new("hot").unwrap();
        let mut a = agent(None);
        a.limits.remove(&Asset::Sol);
        let fx = Effects {
            spl_outflows: vec![spl(PublicKey([2; 32]), 10)],
            ..Effects::default()
        };
        assert_eq!(
            spend_by_asset(&fx).unwrap().keys().collect::<Vec<_>>(),
            vec![&Asset::Mint(MINT)]
        );
        let d = evaluate(&a, &key, &fx, &BTreeMap::new());
        assert!(d.allowed(), "{:?}", d.reasons);
    }

    #[test]
    fn spl_outflows_must_name_a_known_mint_program_and_decimals() {
        let key = KeyName::new("hot").unwrap();
        let a = agent(None);
        let mut plain = spl(PublicKey([2; 32]), 1);
        plain.mint = None;
        let mut other_mint = spl(PublicKey([2; 32]), 1);
        other_mint.mint = Some(PublicKey([8; 32]));
        let mut wrong_program = spl(PublicKey([2; 32]), 1);
        wrong_program.token_program = programs::TOKEN_2022;
        let mut wrong_decimals = spl(PublicKey([2; 32]), 1);
        wrong_decimals.decimals = Some(9);
        for out in [plain, other_mint, wrong_program, wrong_decimals] {
            let fx = Effects {
                spl_outflows: vec![out.clone()],
                ..Effects::default()
            };
            let d = evaluate(&a, &key, &fx, &BTreeMap::new());
            assert_eq!(rules_of(&d), vec![rules::ASSET_NOT_ALLOWED], "{out:?}");
        }
    }

    #[test]
    fn the_allowlist_admits_wallets_and_their_associated_token_accounts() {
        let key = KeyName::new("hot").unwrap();
        let a = agent(Some([WALLET].into_iter().collect()));
        let ata = associated_token_address(&WALLET, &MINT, &programs::TOKEN);
        let ok = Effects {
            spl_outflows: vec![spl(ata, 1)],
            sol_outflows: vec![SolOutflow {
                instruction: 1,
                to: WALLET,
                lamports: Lamports(1),
                kind: "transfer",
            }],
            ..Effects::default()
        };
        assert!(evaluate(&a, &key, &ok, &BTreeMap::new()).allowed());
        let elsewhere = Effects {
            spl_outflows: vec![spl(PublicKey([4; 32]), 1)],
            ..Effects::default()
        };
        assert_eq!(
            rules_of(&evaluate(&a, &key, &elsewhere, &BTreeMap::new())),
            vec![rules::RECIPIENT_NOT_ALLOWED]
        );
        // The ATA of the wallet for another token program is not it.
        let ata_2022 = associated_token_address(&WALLET, &MINT, &programs::TOKEN_2022);
        let wrong = Effects {
            spl_outflows: vec![spl(ata_2022, 1)],
            ..Effects::default()
        };
        assert!(
            rules_of(&evaluate(&a, &key, &wrong, &BTreeMap::new()))
                .contains(&rules::RECIPIENT_NOT_ALLOWED)
        );
    }
}
