//! Turning a request into the exact message bytes to sign and their derived
//! effects. Everything here is pure and runs before the ledger is touched:
//! bad input is refused with a specific 400 error and changes nothing.

use base64::Engine as _;
use keyward_client::wire::{Action, DenialReason, IntentRequest, codes};
use sha2::{Digest, Sha256};

use super::SubmitError;
use crate::amount::parse_units;
use crate::hsm::HsmKey;
use crate::policy::{SOL_DECIMALS, rules};
use crate::solana::{DecodedMessage, Effects, build_sol_transfer, decode_message, extract_effects};
use crate::types::{IntentId, KeyName, Lamports, PublicKey};

/// A request parsed, built and decoded, ready for the policy decision.
pub(crate) struct Prepared {
    pub intent_id: IntentId,
    pub key: KeyName,
    /// The HSM key, when the agent may use it.
    pub hsm_key: Option<HsmKey>,
    /// SHA-256 of the request content (key and action).
    pub content_hash: [u8; 32],
    /// Exact bytes that will be signed, when there is a message to sign.
    pub message: Option<(Vec<u8>, DecodedMessage, Effects)>,
    /// Reasons to deny found while preparing (e.g. the key is not allowed).
    pub pre_reasons: Vec<DenialReason>,
    /// What the request asked for, for the ledger.
    pub summary: serde_json::Value,
}

fn bad(code: &'static str, message: impl Into<String>) -> SubmitError {
    SubmitError::BadRequest {
        code,
        message: message.into(),
    }
}

fn parse_address(field: &str, value: &str) -> Result<PublicKey, SubmitError> {
    PublicKey::from_base58(value).ok_or_else(|| {
        bad(
            codes::INVALID_ADDRESS,
            format!("{field} must be a base58 address of 32 bytes"),
        )
    })
}

/// Parses and prepares a request for an agent allowed to use `allowed_key`
/// (the HSM key for `req.key`, or `None` if the agent may not use it).
pub(crate) fn prepare(
    req: &IntentRequest,
    allowed_key: Option<&HsmKey>,
) -> Result<Prepared, SubmitError> {
    let intent_id =
        IntentId::new(&req.intent_id).map_err(|e| bad(codes::INVALID_INTENT_ID, e.to_string()))?;
    let key = KeyName::new(&req.key).map_err(|e| bad(codes::INVALID_REQUEST, e.to_string()))?;
    let content = serde_json::to_vec(&(&req.key, &req.action))
        .map_err(|e| SubmitError::Internal(format!("cannot serialize request: {e}")))?;
    let content_hash: [u8; 32] = Sha256::digest(&content).into();
    let mut pre_reasons = Vec::new();
    if allowed_key.is_none() {
        pre_reasons.push(DenialReason {
            rule: rules::KEY_NOT_ALLOWED.to_owned(),
            detail: format!("this agent may not use key {key:?}"),
        });
    }

    let (summary, message_bytes) = match &req.action {
        Action::Transfer {
            asset,
            to,
            amount,
            recent_blockhash,
            memo,
        } => {
            let to_key = parse_address("to", to)?;
            let blockhash = PublicKey::from_base58(recent_blockhash).ok_or_else(|| {
                bad(
                    codes::INVALID_ADDRESS,
                    "recent_blockhash must be a base58 hash of 32 bytes",
                )
            })?;
            let summary = serde_json::json!({
                "type": "transfer", "asset": asset, "to": to, "amount": amount,
                "recent_blockhash": recent_blockhash, "memo": memo,
            });
            if asset != "SOL" {
                parse_address("asset", asset).map_err(|_| {
                    bad(
                        codes::INVALID_REQUEST,
                        "asset must be \"SOL\" or an SPL mint address (base58)",
                    )
                })?;
                pre_reasons.push(DenialReason {
                    rule: rules::ASSET_NOT_ALLOWED.to_owned(),
                    detail: format!(
                        "SPL transfers are not supported by this version; asset {asset} is denied"
                    ),
                });
                (summary, None)
            } else {
                let lamports = parse_units(amount, SOL_DECIMALS)
                    .map_err(|e| bad(codes::INVALID_AMOUNT, e.to_string()))?;
                if lamports == 0 {
                    return Err(bad(
                        codes::INVALID_AMOUNT,
                        "amount must be greater than zero",
                    ));
                }
                match allowed_key {
                    Some(k) => {
                        let bytes = build_sol_transfer(
                            &k.public_key,
                            &to_key,
                            Lamports(lamports),
                            blockhash.0,
                            memo.as_deref(),
                        )
                        .map_err(|e| bad(codes::INVALID_REQUEST, e.to_string()))?;
                        (summary, Some(bytes))
                    }
                    None => (summary, None),
                }
            }
        }
        Action::SignTransaction { message } => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(message)
                .map_err(|e| {
                    bad(
                        codes::INVALID_MESSAGE,
                        format!("message is not valid base64: {e}"),
                    )
                })?;
            let summary = serde_json::json!({ "type": "sign_transaction" });
            (summary, Some(bytes))
        }
    };

    let message = match message_bytes {
        Some(bytes) => {
            // Decode, don't trust: even messages keyward built itself are
            // decoded from the exact bytes that will be signed.
            let decoded = decode_message(&bytes)
                .map_err(|e| bad(codes::INVALID_MESSAGE, format!("{}: {e}", e.code())))?;
            let effects = match allowed_key {
                Some(k) => extract_effects(&decoded, &k.public_key),
                None => Effects::default(),
            };
            Some((bytes, decoded, effects))
        }
        None => None,
    };
    Ok(Prepared {
        intent_id,
        key,
        hsm_key: allowed_key.cloned(),
        content_hash,
        message,
        pre_reasons,
        summary,
    })
}
