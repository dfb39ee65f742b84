//! Human approvals: tokens, the approval request, and their checks.
//!
//! A token is `kwa1.<base64url(payload)>.<base64url(mac)>` where the payload
//! is the canonical JSON of [`TokenPayload`] and the MAC is
//! HMAC-SHA256(approver key, [`DOMAIN`] ‖ payload). The daemon recomputes
//! the MAC inside the HSM with the approver's stored key and compares in
//! constant time; `keyward approve` makes tokens in software from the
//! approver's key file.

pub mod request;
pub mod store;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Token format version prefix.
pub const TOKEN_PREFIX: &str = "kwa1";
/// Domain separator of the MAC.
pub const DOMAIN: &[u8] = b"keyward:approval:v1\0";
/// Longest token accepted (bytes).
pub const MAX_TOKEN_LEN: usize = 2048;
/// Longest validity a token may claim (issued-at to expiry).
pub const MAX_TOKEN_VALIDITY_S: i64 = 24 * 3600;

/// HSM label of an approver's HMAC key.
pub fn key_label(approver: &str) -> String {
    format!("keyward-approver:{approver}")
}

/// Approve or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Counts toward the quorum.
    Approve,
    /// Ends the intent.
    Reject,
}

/// What a token says. Field order is the canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPayload {
    /// Hex SHA-256 binding the exact message and its derived effects.
    pub intent_hash: String,
    /// Approver name.
    pub approver: String,
    /// Approve or reject.
    pub decision: Verdict,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds; the token is refused after it.
    pub expires_at: i64,
    /// 16 random bytes, hex: each token is single use.
    pub nonce: String,
}

/// Why a token or approval was refused. Each has a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// Malformed, wrong prefix or domain, bad MAC.
    #[error("invalid approval token: {0}")]
    InvalidToken(String),
    /// The token's expiry has passed.
    #[error("the approval token expired at {0}")]
    Expired(String),
    /// The nonce was used before.
    #[error("this approval token was already used")]
    Replayed,
    /// The approver is not (or no longer) allowed for this intent.
    #[error("approver {0:?} may not approve this intent")]
    ApproverNotAllowed(String),
    /// The token approves another intent.
    #[error("the token is for another intent")]
    OtherIntent,
    /// The approver already approved this intent.
    #[error("approver {0:?} already approved this intent; it counts once")]
    DuplicateApprover(String),
    /// The intent is not waiting for approvals.
    #[error("intent is not pending approval (it is {0})")]
    NotPending(String),
}

impl ApprovalError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            ApprovalError::InvalidToken(_) => "invalid_approval_token",
            ApprovalError::Expired(_) => "approval_expired",
            ApprovalError::Replayed => "approval_replayed",
            ApprovalError::ApproverNotAllowed(_) => "approver_not_allowed",
            ApprovalError::OtherIntent => "approval_for_other_intent",
            ApprovalError::DuplicateApprover(_) => "duplicate_approver",
            ApprovalError::NotPending(_) => "intent_not_pending",
        }
    }
}

/// A token that parsed; its MAC is not checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    /// What it says.
    pub payload: TokenPayload,
    payload_bytes: Vec<u8>,
    mac: [u8; 32],
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn invalid(why: &str) -> ApprovalError {
    ApprovalError::InvalidToken(why.to_owned())
}

impl ParsedToken {
    /// The bytes the MAC covers: domain separator then payload.
    pub fn mac_input(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(DOMAIN.len() + self.payload_bytes.len());
        v.extend_from_slice(DOMAIN);
        v.extend_from_slice(&self.payload_bytes);
        v
    }

    /// The token's MAC.
    pub fn mac(&self) -> &[u8; 32] {
        &self.mac
    }

    /// Constant-time comparison of the token's MAC with `expected`.
    pub fn mac_matches(&self, expected: &[u8; 32]) -> bool {
        bool::from(self.mac.ct_eq(expected))
    }
}

/// Parses a token strictly: prefix, two base64url parts without padding, a
/// 32-byte MAC, and a payload that is exactly the canonical JSON of a valid
/// [`TokenPayload`]. Never panics; every refusal is `InvalidToken`.
pub fn parse(token: &str) -> Result<ParsedToken, ApprovalError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid("too long"));
    }
    let mut parts = token.split('.');
    let (Some(prefix), Some(payload_b64), Some(mac_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("not three dot-separated parts"));
    };
    if prefix != TOKEN_PREFIX {
        return Err(invalid("unknown token version"));
    }
    let payload_bytes = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| invalid("payload is not base64url"))?;
    let mac_bytes = URL_SAFE_NO_PAD
        .decode(mac_b64)
        .map_err(|_| invalid("MAC is not base64url"))?;
    let mac: [u8; 32] = mac_bytes
        .as_slice()
        .try_into()
        .map_err(|_| invalid("MAC is not 32 bytes"))?;
    let payload: TokenPayload = serde_json::from_slice(&payload_bytes)
        .map_err(|_| invalid("payload is not a token payload"))?;
    let canonical =
        serde_json::to_vec(&payload).map_err(|_| invalid("payload cannot be serialized"))?;
    if canonical != payload_bytes {
        return Err(invalid("payload is not in canonical form"));
    }
    if !is_hex(&payload.intent_hash, 64) {
        return Err(invalid("intent_hash is not 64 lowercase hex digits"));
    }
    if !is_hex(&payload.nonce, 32) {
        return Err(invalid("nonce is not 32 lowercase hex digits"));
    }
    if crate::types::AgentName::new(&payload.approver).is_err() {
        return Err(invalid("approver name is not valid"));
    }
    if payload.expires_at < payload.issued_at
        || payload.expires_at - payload.issued_at > MAX_TOKEN_VALIDITY_S
    {
        return Err(invalid(
            "validity period is negative or longer than 24 hours",
        ));
    }
    Ok(ParsedToken {
        payload,
        payload_bytes,
        mac,
    })
}

/// Makes a token with the approver's key (software HMAC, for
/// `keyward approve`).
pub fn make(key: &[u8], payload: &TokenPayload) -> Result<String, ApprovalError> {
    let payload_bytes =
        serde_json::to_vec(payload).map_err(|_| invalid("payload cannot be serialized"))?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).map_err(|_| invalid("bad key"))?;
    mac.update(DOMAIN);
    mac.update(&payload_bytes);
    let tag = mac.finalize().into_bytes();
    Ok(format!(
        "{TOKEN_PREFIX}.{}.{}",
        URL_SAFE_NO_PAD.encode(&payload_bytes),
        URL_SAFE_NO_PAD.encode(tag)
    ))
}

/// Software HMAC-SHA256 over `DOMAIN ‖ payload` (what the HSM computes).
pub fn software_mac(key: &[u8], parsed: &ParsedToken) -> Option<[u8; 32]> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).ok()?;
    mac.update(&parsed.mac_input());
    Some(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn payload() -> TokenPayload {
        TokenPayload {
            intent_hash: "ab".repeat(32),
            approver: "alice".into(),
            decision: Verdict::Approve,
            issued_at: 1_800_000_000,
            expires_at: 1_800_000_600,
            nonce: "cd".repeat(16),
        }
    }

    #[test]
    fn a_made_token_parses_and_its_mac_matches_only_with_the_key() {
        let key = [7u8; 32];
        let t = make(&key, &payload()).unwrap();
        assert!(t.starts_with("kwa1."));
        let p = parse(&t).unwrap();
        assert_eq!(p.payload, payload());
        assert!(p.mac_matches(&software_mac(&key, &p).unwrap()));
        assert!(!p.mac_matches(&software_mac(&[8u8; 32], &p).unwrap()));
    }

    #[test]
    fn a_token_may_be_valid_for_one_day_and_no_longer() {
        let key = [7u8; 32];
        let mut day = payload();
        day.expires_at = day.issued_at + 86_400;
        assert!(parse(&make(&key, &day).unwrap()).is_ok());
        let mut longer = payload();
        longer.expires_at = longer.issued_at + 86_401;
        let e = parse(&make(&key, &longer).unwrap()).unwrap_err();
        assert_eq!(e.code(), "invalid_approval_token");
        // A token may not end before it was issued; one that ends as it is
        // issued is well formed (and expired as soon as that second passes).
        let mut backwards = payload();
        backwards.expires_at = backwards.issued_at - 1;
        let e = parse(&make(&key, &backwards).unwrap()).unwrap_err();
        assert_eq!(e.code(), "invalid_approval_token");
        let mut instant = payload();
        instant.expires_at = instant.issued_at;
        assert!(parse(&make(&key, &instant).unwrap()).is_ok());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let t = make(&[7u8; 32], &payload()).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let reencode = |p: &TokenPayload| URL_SAFE_NO_PAD.encode(serde_json::to_vec(p).unwrap());
        let mut bad_hash = payload();
        bad_hash.intent_hash = "AB".repeat(32);
        let mut long = payload();
        long.expires_at = long.issued_at + MAX_TOKEN_VALIDITY_S + 1;
        let non_canonical = URL_SAFE_NO_PAD.encode(serde_json::to_vec_pretty(&payload()).unwrap());
        for bad in [
            String::new(),
            "kwa1".into(),
            format!("kwa2.{}.{}", parts[1], parts[2]),
            format!("{}.{}", parts[0], parts[1]),
            format!("{t}.extra"),
            format!("kwa1.{}=.{}", parts[1], parts[2]),
            format!("kwa1.{}.{}", parts[1], &parts[2][..10]),
            format!("kwa1.{non_canonical}.{}", parts[2]),
            format!("kwa1.{}.{}", reencode(&bad_hash), parts[2]),
            format!("kwa1.{}.{}", reencode(&long), parts[2]),
            format!("kwa1.{}.{}", URL_SAFE_NO_PAD.encode(b"{}"), parts[2]),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.code(), "invalid_approval_token", "{bad}");
        }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;
        use super::payload;

        const KEY: [u8; 32] = [7u8; 32];

        /// A token passes only if it parses and its MAC verifies.
        fn accepted(t: &str) -> bool {
            match parse(t) {
                Ok(p) => software_mac(&KEY, &p).is_some_and(|m| p.mac_matches(&m)),
                Err(e) => {
                    assert_eq!(e.code(), "invalid_approval_token");
                    false
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn random_strings_are_refused_without_panicking(s in ".{0,300}") {
                prop_assert!(!accepted(&s));
            }

            #[test]
            fn random_tokens_with_the_right_shape_are_refused(
                a in "[A-Za-z0-9_-]{0,200}", b in "[A-Za-z0-9_-]{0,60}"
            ) {
                let t = format!("kwa1.{a}.{b}");
                prop_assert!(!accepted(&t));
            }

            #[test]
            fn every_mutation_of_a_valid_token_is_refused(
                edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4)
            ) {
                let good = make(&KEY, &payload()).unwrap();
                prop_assert!(accepted(&good));
                let mut bytes = good.clone().into_bytes();
                for (at, byte, kind) in edits {
                    let i = at.index(bytes.len().max(1));
                    match kind {
                        0 if !bytes.is_empty() => bytes[i] ^= byte | 1,
                        1 => bytes.insert(i.min(bytes.len()), byte),
                        _ if !bytes.is_empty() => { bytes.remove(i); }
                        _ => {}
                    }
                }
                let mutated = String::from_utf8_lossy(&bytes).into_owned();
                prop_assume!(mutated != good);
                let refused = !accepted(&mutated);
                prop_assert!(refused, "accepted a mutated token: {}", mutated);
            }
        }
    }
}
