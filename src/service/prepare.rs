//! Turning a request into the exact message bytes to sign and their derived
//! effects. Everything here is pure and runs before the ledger is touched:
//! bad input is refused with a specific error code and changes nothing.

use base64::Engine as _;
use keyward_client::wire::{Action, DenialReason, IntentRequest, codes};
use sha2::{Digest, Sha256};

use super::SubmitError;
use crate::amount::parse_units;
use crate::hsm::HsmKey;
use crate::ledger::events::ActionSummary;
use crate::policy::{AgentPolicy, Asset, SOL_DECIMALS, rules};
use crate::solana::{
    DecodedMessage, Effects, SplTransfer, build_sol_transfer, build_spl_transfer, decode_message,
    extract_effects, programs,
};
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
    pub summary: ActionSummary,
    /// For a sweep: the retiring version of `key` that signs it.
    pub sweep_version: Option<u32>,
}

impl Prepared {
    /// The key as the intent's records name it: the name, or
    /// `NAME@VERSION` for a sweep.
    pub fn key_ref(&self) -> String {
        match self.sweep_version {
            Some(v) => super::sweep::sweep_key_ref(&self.key, v),
            None => self.key.to_string(),
        }
    }
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

/// Parses and prepares a request of `agent` against the keys served now:
/// the key it names counts only if the agent's policy lists it.
pub(crate) fn prepare_with_keys(
    req: &IntentRequest,
    agent: &AgentPolicy,
    keys: &std::collections::HashMap<KeyName, HsmKey>,
) -> Result<Prepared, SubmitError> {
    let allowed_key = agent
        .keys
        .iter()
        .find(|n| n.as_str() == req.key)
        .and_then(|n| keys.get(n));
    prepare(req, agent, allowed_key)
}

/// Parses and prepares a request for an agent allowed to use `allowed_key`
/// (the HSM key for `req.key`, or `None` if the agent may not use it).
pub(crate) fn prepare(
    req: &IntentRequest,
    agent: &AgentPolicy,
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
            create_recipient_account,
        } => {
            let to_key = parse_address("to", to)?;
            let blockhash = PublicKey::from_base58(recent_blockhash).ok_or_else(|| {
                bad(
                    codes::INVALID_ADDRESS,
                    "recent_blockhash must be a base58 hash of 32 bytes",
                )
            })?;
            let summary = ActionSummary::Transfer {
                asset: asset.clone(),
                to: to.clone(),
                amount: amount.clone(),
                recent_blockhash: recent_blockhash.clone(),
                memo: memo.clone(),
                create_recipient_account: *create_recipient_account,
            };
            let asset_id = if asset == "SOL" {
                Asset::Sol
            } else {
                Asset::Mint(parse_address("asset", asset).map_err(|_| {
                    bad(
                        codes::INVALID_REQUEST,
                        "asset must be \"SOL\" or an SPL mint address (base58)",
                    )
                })?)
            };
            if asset_id == Asset::Sol && *create_recipient_account {
                return Err(bad(
                    codes::INVALID_REQUEST,
                    "create_recipient_account applies to SPL transfers only",
                ));
            }
            let limits = agent.limits.get(&asset_id);
            // The amount's precision comes from the policy: an asset
            // without limits cannot be spent, whatever the amount says.
            let decimals = match (asset_id, limits) {
                (Asset::Sol, _) => SOL_DECIMALS,
                (_, Some(l)) => l.decimals,
                (Asset::Mint(_), None) => {
                    pre_reasons.push(DenialReason {
                        rule: rules::ASSET_NOT_ALLOWED.to_owned(),
                        detail: format!("asset {asset} has no limits for agent {}", agent.name),
                    });
                    return finish(
                        intent_id,
                        key,
                        allowed_key,
                        content_hash,
                        None,
                        pre_reasons,
                        summary,
                    );
                }
            };
            let base_units = parse_units(amount, decimals)
                .map_err(|e| bad(codes::INVALID_AMOUNT, e.to_string()))?;
            if base_units == 0 {
                return Err(bad(
                    codes::INVALID_AMOUNT,
                    "amount must be greater than zero",
                ));
            }
            let bytes = match (allowed_key, asset_id) {
                (None, _) => None,
                (Some(k), Asset::Sol) => Some(build_sol_transfer(
                    &k.public_key,
                    &to_key,
                    Lamports(base_units),
                    blockhash.0,
                    memo.as_deref(),
                )),
                (Some(k), Asset::Mint(mint)) => Some(build_spl_transfer(
                    &k.public_key,
                    &to_key,
                    &SplTransfer {
                        mint,
                        token_program: limits
                            .and_then(|l| l.token_program)
                            .unwrap_or(programs::TOKEN),
                        amount: base_units,
                        decimals,
                        create_recipient_account: *create_recipient_account,
                    },
                    blockhash.0,
                    memo.as_deref(),
                )),
            };
            let bytes = bytes
                .transpose()
                .map_err(|e| bad(codes::INVALID_REQUEST, format!("{}: {e}", e.code())))?;
            (summary, bytes)
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
            let summary = ActionSummary::SignTransaction;
            (summary, Some(bytes))
        }
    };

    finish(
        intent_id,
        key,
        allowed_key,
        content_hash,
        message_bytes,
        pre_reasons,
        summary,
    )
}

/// Decodes the bytes to sign (if any) and derives their effects.
fn finish(
    intent_id: IntentId,
    key: KeyName,
    allowed_key: Option<&HsmKey>,
    content_hash: [u8; 32],
    message_bytes: Option<Vec<u8>>,
    pre_reasons: Vec<DenialReason>,
    summary: ActionSummary,
) -> Result<Prepared, SubmitError> {
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
        sweep_version: None,
    })
}
