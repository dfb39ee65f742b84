//! The approval request: what approvers are shown and what their tokens
//! bind to. Everything here is computed from the exact message bytes and
//! the signing key alone, so `keyward approve` on an approver's machine can
//! recompute it and refuse a request that does not match its bytes.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::amount::format_units;
use crate::solana::{Effects, decode_message, extract_effects};
use crate::types::PublicKey;

/// The derived effects as canonical JSON (sorted keys), as recorded in the
/// ledger and bound by the intent hash.
pub fn effects_json(e: &Effects) -> serde_json::Value {
    serde_json::json!({
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
    })
}

/// SHA-256 binding an approval to the exact message and what keyward
/// derived from it: domain, message length, message, effects JSON.
pub fn intent_hash(message: &[u8], effects: &Effects) -> [u8; 32] {
    let effects = serde_json::to_vec(&effects_json(effects)).unwrap_or_default();
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
/// `approval` is the `approval` object of a pending intent.
pub fn check(approval: &serde_json::Value) -> Result<CheckedRequest, String> {
    let field = |k: &str| {
        approval
            .get(k)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("the request has no {k:?}"))
    };
    let message = base64::engine::general_purpose::STANDARD
        .decode(field("message")?)
        .map_err(|e| format!("message is not base64: {e}"))?;
    let signer =
        PublicKey::from_base58(field("public_key")?).ok_or("public_key is not an address")?;
    let decoded =
        decode_message(&message).map_err(|e| format!("the message does not decode: {e}"))?;
    let effects = extract_effects(&decoded, &signer);
    let hash = intent_hash(&message, &effects);
    if hex::encode(hash) != field("intent_hash")? {
        return Err("the request's intent_hash is not the hash of its message: refusing".into());
    }
    let summary = summary(&signer, &effects);
    if summary != field("summary")? {
        return Err(format!(
            "the request's summary disagrees with its message: refusing\n  request says: {}\n  bytes say:    {summary}",
            field("summary")?
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
    fn effects_json_states_every_outflow_fee_and_program_as_recorded() {
        let (from, to) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let (_, effects) = transfer(&from, &to, 1_500);
        let json = effects_json(&effects);
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
            effects_json(&effects),
            effects_json(&other_effects(&again, &from))
        );
        assert_ne!(h, intent_hash(&again, &effects));
    }

    fn other_effects(message: &[u8], from: &PublicKey) -> Effects {
        extract_effects(&decode_message(message).unwrap(), from)
    }
}
