//! Sweep intents: moving a retiring key's balances to its successor.
//!
//! After `keyward key rotate`, the old address still holds whatever was
//! sent to it. The sweep is an intent like any other: it belongs to an
//! agent (the one whose policy lists the key, or the one the operator
//! names), is decided by that agent's policy (limits, rate windows, active
//! hours, approvals) and recorded the same way. Two things differ, both
//! narrow: it is signed by the retiring version (the only signature that
//! version may still make), and its recipient allowlist is exactly the
//! successor's address: the address of the version of the same name that is
//! active when the sweep is decided (the registry records it). After two
//! rotations a sweep of version 1 goes to version 3, never to version 2,
//! which is retiring itself and may already be destroyed; a pending sweep
//! whose destination stopped being the active key by its quorum is denied.
//!
//! keyward has no network, so the operator gives the old address's
//! balances and a recent blockhash. The message moves each token balance
//! whole (creating the successor's associated token account first) and the
//! SOL balance less the fee and the rent of the accounts it creates.
//!
//! A pending sweep names its key `NAME@VERSION` (in `pending_approvals`,
//! `intent_received` and the approval request), so the approval path signs
//! it with that version.

use keyward_client::wire::{DenialReason, SweepSpec, codes};
use sha2::{Digest, Sha256};

use super::prepare::Prepared;
use super::shared::InForce;
use super::{Signer, SubmitError, SubmitOutcome};
use crate::amount::parse_units;
use crate::hsm::HsmKey;
use crate::ledger::LedgerError;
use crate::ledger::events::ActionSummary;
use crate::ledger::registry;
use crate::policy::{AgentPolicy, Asset, SOL_DECIMALS};
use crate::solana::{SplTransfer, build_sweep, decode_message, extract_effects, programs};
use crate::types::{IntentId, KeyName, Lamports, PublicKey};

/// The fee of a transaction with one signature, in lamports.
pub const FEE_LAMPORTS: u64 = 5_000;

/// Rent-exempt minimum of an SPL Token account (165 bytes), lamports.
pub const TOKEN_ACCOUNT_RENT: u64 = 2_039_280;

/// Rent-exempt minimum of a Token-2022 associated token account (170
/// bytes: the immutable-owner extension), lamports. A mint whose
/// extensions make its accounts larger needs more: such a sweep fails on
/// chain, moving nothing, and is made again with a smaller SOL balance.
pub const TOKEN_2022_ACCOUNT_RENT: u64 = 2_074_080;

/// `NAME@VERSION` of a sweep's key, as pending sweeps record it.
pub fn sweep_key_ref(name: &KeyName, version: u32) -> String {
    format!("{name}@{version}")
}

/// Parses the key of a pending intent: `Some((name, version))` for a
/// sweep, `None` for an ordinary key name.
pub(super) fn parse_sweep_ref(key: &str) -> Option<(KeyName, u32)> {
    let (name, version) = key.rsplit_once('@')?;
    Some((KeyName::new(name).ok()?, version.parse().ok()?))
}

/// The HSM key a pending intent's key names, from what is in force: the
/// active version of a name, or a retiring version for a sweep.
pub(super) fn key_of(in_force: &InForce, key: &str) -> Option<HsmKey> {
    match parse_sweep_ref(key) {
        Some((name, version)) => in_force.retiring.get(&(name, version)).cloned(),
        None => KeyName::new(key)
            .ok()
            .and_then(|n| in_force.keys.get(&n).cloned()),
    }
}

/// The policy a sweep of `key` (a pending intent's key) is decided under:
/// `agent`'s, with its recipient allowlist replaced by the successor's
/// address (see [`successor`]). For an ordinary key, `agent`'s unchanged.
pub(super) fn policy_for(
    conn: &rusqlite::Connection,
    agent: &AgentPolicy,
    key: &str,
) -> Result<AgentPolicy, LedgerError> {
    let Some((name, _)) = parse_sweep_ref(key) else {
        return Ok(agent.clone());
    };
    let successor = successor(conn, &name)?.ok_or_else(|| {
        LedgerError::Corrupt(format!("{key} has no active successor in the registry"))
    })?;
    Ok(only_to(agent, successor))
}

/// Where a sweep of a retiring version of `name` goes: the address of the
/// name's active version (not simply the next version, which may itself be
/// retiring or retired after a second rotation).
fn successor(
    conn: &rusqlite::Connection,
    name: &KeyName,
) -> Result<Option<PublicKey>, LedgerError> {
    Ok(registry::active(conn, name.as_str())?.and_then(|r| PublicKey::from_base58(&r.public_key)))
}

/// `agent`'s policy for a sweep to `to`: its limits, rate windows and
/// approvers, and `to` as the only allowed recipient (keyward builds the
/// sweep's message; anything else in it is not a sweep).
fn only_to(agent: &AgentPolicy, to: PublicKey) -> AgentPolicy {
    let mut a = agent.clone();
    a.allow_recipients = Some(std::iter::once(to).collect());
    a
}

/// A sweep created by [`Signer::sweep`].
#[derive(Debug)]
pub struct Swept {
    /// The agent it went through.
    pub agent: String,
    /// Its intent id.
    pub intent_id: String,
    /// What the decision path answered.
    pub outcome: SubmitOutcome,
}

fn bad(code: &'static str, message: impl Into<String>) -> SubmitError {
    SubmitError::BadRequest {
        code,
        message: message.into(),
    }
}

impl Signer {
    /// Creates the sweep intent of version `version` of key `name` (a
    /// retiring version) from `spec`, and takes it through the decision
    /// path of its agent: signed, pending approval or denied, recorded like
    /// any intent. Bad input changes nothing.
    pub async fn sweep(
        self: &std::sync::Arc<Self>,
        name: &str,
        version: u32,
        spec: &SweepSpec,
    ) -> Result<Swept, SubmitError> {
        self.core.check_history()?;
        if let Some(gate) = self.core.mirror_gate() {
            gate.check(self.core.ledger.health().head_seq)
                .map_err(SubmitError::MirrorLagging)?;
        }
        let name = KeyName::new(name).map_err(|e| bad(codes::INVALID_REQUEST, e.to_string()))?;
        let in_force = self.core.in_force();
        let Some(old) = in_force.retiring.get(&(name.clone(), version)).cloned() else {
            return Err(bad(
                "key_not_retiring",
                format!(
                    "{name}@{version} is not a retiring key in the HSM (see `keyward key list`): only a rotated-out version is swept"
                ),
            ));
        };
        let reader = self.core.ledger.reader()?;
        let successor = successor(&reader, &name)?.ok_or_else(|| {
            SubmitError::Internal(format!(
                "{name}@{version} has no active successor in the registry"
            ))
        })?;
        drop(reader);
        let agent = choose_agent(&in_force, &name, spec.agent.as_deref())?;
        let prepared = prepare_sweep(&agent, &name, version, &old, &successor, spec)?;
        let agent_name = agent.name.to_string();
        let intent_id = prepared.intent_id.to_string();
        let decided_under = only_to(&agent, successor);
        let _flight = self.core.begin_flight(&agent_name, &intent_id);
        let outcome = self.decide_and_sign(&decided_under, &prepared).await?;
        tracing::warn!(key = %name, version, agent = %agent_name, intent = %intent_id, "sweep intent created");
        Ok(Swept {
            agent: agent_name,
            intent_id,
            outcome,
        })
    }
}

/// The agent a sweep goes through: the one named (its policy must list
/// the key), or the only agent whose policy lists it.
fn choose_agent(
    in_force: &InForce,
    name: &KeyName,
    named: Option<&str>,
) -> Result<AgentPolicy, SubmitError> {
    let listing: Vec<&AgentPolicy> = in_force
        .policy
        .agents
        .iter()
        .filter(|a| a.keys.contains(name))
        .collect();
    match named {
        Some(n) => listing
            .iter()
            .find(|a| a.name.as_str() == n)
            .map(|a| (*a).clone())
            .ok_or_else(|| {
                bad(
                    "unknown_agent",
                    format!("no agent {n:?} whose policy lists key {name:?}"),
                )
            }),
        None => match listing.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(bad(
                "unknown_agent",
                format!(
                    "no agent's policy lists key {name:?}: a sweep goes through an agent's policy and approvers"
                ),
            )),
            many => Err(bad(
                codes::INVALID_REQUEST,
                format!(
                    "several agents list key {name:?} ({}): name one with `agent`",
                    many.iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        },
    }
}

/// Builds the sweep's message and the request record, refusing bad input
/// before anything is recorded.
fn prepare_sweep(
    agent: &AgentPolicy,
    name: &KeyName,
    version: u32,
    old: &HsmKey,
    successor: &PublicKey,
    spec: &SweepSpec,
) -> Result<Prepared, SubmitError> {
    let blockhash = PublicKey::from_base58(&spec.recent_blockhash).ok_or_else(|| {
        bad(
            codes::INVALID_ADDRESS,
            "recent_blockhash must be a base58 hash of 32 bytes",
        )
    })?;
    let mut transfers = Vec::new();
    let mut rent = 0u64;
    for t in &spec.tokens {
        let mint = PublicKey::from_base58(&t.mint).ok_or_else(|| {
            bad(
                codes::INVALID_ADDRESS,
                format!("mint {:?} is not base58", t.mint),
            )
        })?;
        // Each balance moves whole: a mint given twice would transfer more
        // than the address holds (failing on chain after counting both).
        if transfers.iter().any(|t: &SplTransfer| t.mint == mint)
            || spec.tokens.iter().filter(|o| o.mint == t.mint).count() > 1
        {
            return Err(bad(
                codes::INVALID_REQUEST,
                format!("mint {mint} is given more than once: give each token balance once"),
            ));
        }
        let Some(limits) = agent.limits.get(&Asset::Mint(mint)) else {
            return Err(bad(
                "asset_not_allowed",
                format!(
                    "agent {}'s policy has no limits for mint {mint}: its sweep would be denied (add the mint's limits, then sweep)",
                    agent.name
                ),
            ));
        };
        let amount = parse_units(&t.amount, limits.decimals)
            .map_err(|e| bad(codes::INVALID_AMOUNT, format!("mint {mint}: {e}")))?;
        if amount == 0 {
            continue;
        }
        let token_program = limits.token_program.unwrap_or(programs::TOKEN);
        rent += if token_program == programs::TOKEN_2022 {
            TOKEN_2022_ACCOUNT_RENT
        } else {
            TOKEN_ACCOUNT_RENT
        };
        transfers.push(SplTransfer {
            mint,
            token_program,
            amount,
            decimals: limits.decimals,
            create_recipient_account: true,
        });
    }
    let sol = match &spec.sol {
        None => None,
        Some(s) => {
            let balance = parse_units(s, SOL_DECIMALS)
                .map_err(|e| bad(codes::INVALID_AMOUNT, format!("sol: {e}")))?;
            let costs = FEE_LAMPORTS + rent;
            let moved = balance.checked_sub(costs).filter(|m| *m > 0).ok_or_else(|| {
                bad(
                    codes::INVALID_AMOUNT,
                    format!(
                        "a SOL balance of {s} does not cover the sweep's fee and the rent of the accounts it creates ({} SOL): nothing would move",
                        Lamports(costs)
                    ),
                )
            })?;
            Some(Lamports(moved))
        }
    };
    if sol.is_none() && transfers.is_empty() {
        return Err(bad(
            codes::INVALID_REQUEST,
            "nothing to sweep: give the old address's SOL balance and/or token balances",
        ));
    }
    let message = build_sweep(&old.public_key, successor, sol, &transfers, blockhash.0)
        .map_err(|e| bad(codes::INVALID_REQUEST, format!("{}: {e}", e.code())))?;
    let decoded = decode_message(&message)
        .map_err(|e| SubmitError::Internal(format!("the built sweep does not decode: {e}")))?;
    let effects = extract_effects(&decoded, &old.public_key);
    let key_ref = sweep_key_ref(name, version);
    let content = serde_json::to_vec(&(&key_ref, &spec.recent_blockhash, &spec.sol, &spec.tokens))
        .map_err(|e| SubmitError::Internal(format!("cannot serialize the sweep: {e}")))?;
    let content_hash: [u8; 32] = Sha256::digest(&content).into();
    let intent_id = match &spec.intent_id {
        Some(id) => id.clone(),
        None => format!(
            "sweep:{name}:{version}:{}",
            &hex::encode(content_hash)[..16]
        ),
    };
    let intent_id =
        IntentId::new(&intent_id).map_err(|e| bad(codes::INVALID_INTENT_ID, e.to_string()))?;
    Ok(Prepared {
        intent_id,
        key: name.clone(),
        hsm_key: Some(old.clone()),
        content_hash,
        message: Some((message, decoded, effects)),
        pre_reasons: Vec::<DenialReason>::new(),
        summary: ActionSummary::Sweep {
            version,
            to: successor.to_base58(),
            sol: spec.sol.clone(),
            tokens: spec
                .tokens
                .iter()
                .map(|t| (t.mint.clone(), t.amount.clone()))
                .collect(),
            recent_blockhash: spec.recent_blockhash.clone(),
        },
        sweep_version: Some(version),
    })
}
