//! The approval request: what approvers are shown and what their tokens
//! bind to. Everything here is computed from the exact message bytes and
//! the signing key alone, so `keyward approve` on an approver's machine can
//! recompute it and refuse a request that does not match its bytes.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use keyward_client::wire::ApprovalRequest;

use crate::amount::format_units;
use crate::ledger::events::{EffectsRecord, SolOutflowRecord, SplOutflowRecord, ViolationRecord};
use crate::solana::{Effects, decode_message, extract_effects};
use crate::types::PublicKey;

/// The derived effects as recorded in the ledger and bound by the intent
/// hash (canonical JSON: its fields serialize in sorted order).
pub fn effects_record(e: &Effects) -> EffectsRecord {
    EffectsRecord {
        fee_payer_is_us: e.fee_payer_is_us,
        fees_lamports: e.fees.0,
        programs: e.programs.iter().map(|p| p.to_base58()).collect(),
        sol_outflows: e
            .sol_outflows
            .iter()
            .map(|o| SolOutflowRecord {
                instruction: o.instruction,
                kind: o.kind.to_owned(),
                lamports: o.lamports.0,
                to: o.to.to_base58(),
            })
            .collect(),
        spl_outflows: e
            .spl_outflows
            .iter()
            .map(|o| SplOutflowRecord {
                amount: o.amount,
                decimals: o.decimals,
                destination: o.destination.to_base58(),
                instruction: o.instruction,
                mint: o.mint.map(|m| m.to_base58()),
                source: o.source.to_base58(),
                token_program: o.token_program.to_base58(),
            })
            .collect(),
        violations: e
            .violations
            .iter()
            .map(|v| ViolationRecord {
                detail: v.detail.clone(),
                instruction: v.instruction,
                rule: v.rule.to_owned(),
            })
            .collect(),
    }
}

/// SHA-256 binding an approval to the exact message and what keyward
/// derived from it: domain, message length, message, effects JSON.
pub fn intent_hash(message: &[u8], effects: &Effects) -> [u8; 32] {
    // Strings, numbers and lists only: serializing cannot fail.
    let effects = serde_json::to_vec(&effects_record(effects)).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(b"keyward:intent:v1\0");
    h.update((message.len() as u64).to_be_bytes());
    h.update(message);
    h.update(&effects);
    h.finalize().into()
}

/// What the transaction does, in one line, from the effects alone.
pub fn summary(signer: &PublicKey, e: &Effects) -> String {
    let mut parts = Vec::new();
    for o in &e.sol_outflows {
        parts.push(format!("{} SOL to {} ({})", o.lamports, o.to, o.kind));
    }
    for o in &e.spl_outflows {
        let amount = match o.decimals {
            Some(d) => format_units(u128::from(o.amount), d),
            None => format!("{} base units", o.amount),
        };
        let mint = o
            .mint
            .map_or_else(|| "an unnamed mint".to_owned(), |m| m.to_base58());
        parts.push(format!(
            "{amount} of {mint} to token account {}",
            o.destination
        ));
    }
    if parts.is_empty() {
        parts.push("no transfers".to_owned());
    }
    format!(
        "{signer} sends {}; fees {} SOL; programs {}",
        parts.join(", "),
        e.fees,
        e.programs
            .iter()
            .map(|p| p.to_base58())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A request that matched its bytes.
#[derive(Debug, Clone)]
pub struct CheckedRequest {
    /// The intent hash (recomputed, equal to the request's).
    pub intent_hash: [u8; 32],
    /// The signing key.
    pub signer: PublicKey,
    /// The effects derived from the bytes.
    pub effects: Effects,
    /// The summary derived from the bytes (equal to the request's).
    pub summary: String,
}

/// Decodes the message in an approval request independently and checks
/// that the request's intent hash and summary are what its bytes say.
pub fn check(approval: &ApprovalRequest) -> Result<CheckedRequest, String> {
    let message = base64::engine::general_purpose::STANDARD
        .decode(&approval.message)
        .map_err(|e| format!("message is not base64: {e}"))?;
    let signer =
        PublicKey::from_base58(&approval.public_key).ok_or("public_key is not an address")?;
    let decoded =
        decode_message(&message).map_err(|e| format!("the message does not decode: {e}"))?;
    let effects = extract_effects(&decoded, &signer);
    let hash = intent_hash(&message, &effects);
    if hex::encode(hash) != approval.intent_hash {
        return Err("the request's intent_hash is not the hash of its message: refusing".into());
    }
    let summary = summary(&signer, &effects);
    if summary != approval.summary {
        return Err(format!(
            "the request's summary disagrees with its message: refusing\n  request says: {}\n  bytes say:    {summary}",
            approval.summary
        ));
    }
    Ok(CheckedRequest {
        intent_hash: hash,
        signer,
        effects,
        summary,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::solana::build_sol_transfer;
    use crate::types::Lamports;

    fn transfer(from: &PublicKey, to: &PublicKey, lamports: u64) -> (Vec<u8>, Effects) {
        let message = build_sol_transfer(from, to, Lamports(lamports), [3; 32], None).unwrap();
        let effects = extract_effects(&decode_message(&message).unwrap(), from);
        (message, effects)
    }

    #[test]
    fn effects_record_states_every_outflow_fee_and_program_as_recorded() {
        let (from, to) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (_, effects) = transfer(&from, &to, 1_500);
        let json = serde_json::to_value(effects_record(&effects)).unwrap();
        assert_eq!(json["fee_payer_is_us"], true);
        assert_eq!(json["fees_lamports"], 5_000);
        assert_eq!(json["sol_outflows"][0]["lamports"], 1_500);
        assert_eq!(json["sol_outflows"][0]["to"], to.to_base58());
        assert_eq!(json["sol_outflows"][0]["kind"], "transfer");
        assert_eq!(json["spl_outflows"], serde_json::json!([]));
        assert_eq!(
            json["programs"],
            serde_json::json!([PublicKey([0; 32]).to_base58()])
        );
        assert_eq!(json["violations"], serde_json::json!([]));
    }

    /// The bytes the intent hash covers are exactly what earlier releases
    /// hashed (a `json!` object, whose keys serialize sorted): tokens
    /// signed for pending intents keep verifying across the upgrade.
    #[test]
    fn the_effects_bytes_are_those_earlier_releases_hashed() {
        let (from, to) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (_, mut e) = transfer(&from, &to, 1_500);
        e.spl_outflows.push(crate::solana::SplOutflow {
            instruction: 1,
            token_program: PublicKey([5; 32]),
            mint: None,
            source: PublicKey([6; 32]),
            destination: PublicKey([7; 32]),
            amount: 9,
            decimals: Some(6),
        });
        e.violations.push(crate::solana::Violation {
            rule: "r",
            detail: "d".into(),
            instruction: None,
        });
        let before = serde_json::json!({
            "fee_payer_is_us": e.fee_payer_is_us,
            "fees_lamports": e.fees.0,
            "sol_outflows": e.sol_outflows.iter().map(|o| serde_json::json!({
                "instruction": o.instruction, "to": o.to.to_base58(), "lamports": o.lamports.0, "kind": o.kind,
            })).collect::<Vec<_>>(),
            "spl_outflows": e.spl_outflows.iter().map(|o| serde_json::json!({
                "instruction": o.instruction, "token_program": o.token_program.to_base58(),
                "mint": o.mint.map(|m| m.to_base58()), "source": o.source.to_base58(),
                "destination": o.destination.to_base58(), "amount": o.amount, "decimals": o.decimals,
            })).collect::<Vec<_>>(),
            "programs": e.programs.iter().map(|p| p.to_base58()).collect::<Vec<_>>(),
            "violations": e.violations.iter().map(|v| serde_json::json!({
                "rule": v.rule, "detail": v.detail, "instruction": v.instruction,
            })).collect::<Vec<_>>(),
        });
        assert_eq!(
            serde_json::to_vec(&effects_record(&e)).unwrap(),
            serde_json::to_vec(&before).unwrap()
        );
    }

    #[test]
    fn the_intent_hash_binds_the_bytes_and_what_was_derived_from_them() {
        let (from, to) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (message, effects) = transfer(&from, &to, 1_500);
        let h = intent_hash(&message, &effects);
        // The same bytes read for another signer derive other effects.
        let other = extract_effects(&decode_message(&message).unwrap(), &to);
        assert_ne!(h, intent_hash(&message, &other));
        // Other bytes with the same effects (another blockhash).
        let again = build_sol_transfer(&from, &to, Lamports(1_500), [4; 32], None).unwrap();
        assert_eq!(
            effects_record(&effects),
            effects_record(&other_effects(&again, &from))
        );
        assert_ne!(h, intent_hash(&again, &effects));
    }

    fn other_effects(message: &[u8], from: &PublicKey) -> Effects {
        extract_effects(&decode_message(message).unwrap(), from)
    }
}
