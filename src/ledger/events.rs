//! The audit documents: one typed payload per [`EventType`].
//!
//! Every ledger entry is written through [`LedgerTxn::record`] with one of
//! these structs, and read back (by `keyward audit`, the views and the
//! verifiers) through the same structs with [`decode`]. A payload that
//! cannot be serialized is an error, never an empty entry.
//!
//! Field names are part of the audit format: auditors' tools read them.
//! Add optional fields (`#[serde(default)]`, skipped when empty) rather than
//! renaming or removing one; readers ignore fields they do not know, so
//! entries written by older releases keep decoding.
//!
//! [`LedgerTxn::record`]: super::LedgerTxn::record

use std::collections::BTreeMap;

use keyward_client::wire::{ApprovalRequest, DenialReason};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::EventType;
use super::checkpoint::CheckpointRecord;

/// A typed ledger payload: the struct of one [`EventType`].
pub trait LedgerEvent: Serialize + DeserializeOwned {
    /// The event type entries of this payload carry.
    const TYPE: EventType;
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The entry is of another event type.
    #[error("entry is {found}, not {expected}")]
    WrongType {
        /// The type asked for.
        expected: EventType,
        /// The type stored.
        found: String,
    },
    /// The payload is not the JSON the type describes.
    #[error("{event} payload: {source}")]
    Json {
        /// The event type.
        event: EventType,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// The payload bytes of `event`.
pub fn encode<E: LedgerEvent>(event: &E) -> Result<Vec<u8>, EventError> {
    serde_json::to_vec(event).map_err(|source| EventError::Json {
        event: E::TYPE,
        source,
    })
}

/// Reads the payload of an entry of type `event_name` as `E`.
pub fn decode<E: LedgerEvent>(event_name: &str, payload: &[u8]) -> Result<E, EventError> {
    if event_name != E::TYPE.as_str() {
        return Err(EventError::WrongType {
            expected: E::TYPE,
            found: event_name.to_owned(),
        });
    }
    serde_json::from_slice(payload).map_err(|source| EventError::Json {
        event: E::TYPE,
        source,
    })
}

macro_rules! events {
    ($($ty:ident => $variant:ident,)*) => {
        $(impl LedgerEvent for $ty {
            const TYPE: EventType = EventType::$variant;
        })*

        /// Checks that `payload` decodes as the struct of `event_name`
        /// (`Ok(false)` for an event name this release does not know).
        pub fn check_payload(event_name: &str, payload: &[u8]) -> Result<bool, EventError> {
            $(if event_name == EventType::$variant.as_str() {
                decode::<$ty>(event_name, payload)?;
                return Ok(true);
            })*
            Ok(false)
        }
    };
}

events! {
    IntentReceived => IntentReceived,
    PolicyEvaluated => PolicyEvaluated,
    ApprovalRequest => ApprovalRequested,
    ApprovalGranted => ApprovalGranted,
    ApprovalRejected => ApprovalRejected,
    IntentExpired => IntentExpired,
    ApprovalRefused => ApprovalRefused,
    DryRunEvaluated => DryRunEvaluated,
    ApproverAdded => ApproverAdded,
    ApproverRemoved => ApproverRemoved,
    SignatureCreated => SignatureCreated,
    SigningDenied => SigningDenied,
    KeyGenerated => KeyGenerated,
    KeyRotated => KeyRotated,
    KeyRetired => KeyRetired,
    SigningFrozen => SigningFrozen,
    SigningUnfrozen => SigningUnfrozen,
    BackupCreated => BackupCreated,
    PolicyLoaded => PolicyLoaded,
    BreakerTripped => BreakerTripped,
    BreakerReset => BreakerReset,
    CheckpointRecord => Checkpoint,
    DrillCompleted => DrillCompleted,
    DaemonStarted => DaemonStarted,
    DaemonStopped => DaemonStopped,
    HistoryAcknowledged => HistoryAcknowledged,
}

/// What keyward derived from a message: the effects for our key, as
/// recorded in `intent_received` and bound by the approval intent hash.
/// Fields are in alphabetical order, so the JSON is canonical (sorted
/// keys) and the intent hash over it is stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectsRecord {
    /// Whether our key pays the fees.
    pub fee_payer_is_us: bool,
    /// Fees our key pays, in lamports.
    pub fees_lamports: u64,
    /// Programs the message invokes (base58).
    pub programs: Vec<String>,
    /// SOL leaving our key.
    pub sol_outflows: Vec<SolOutflowRecord>,
    /// Tokens leaving accounts our key controls.
    pub spl_outflows: Vec<SplOutflowRecord>,
    /// Rules the message breaks whatever the policy says.
    pub violations: Vec<ViolationRecord>,
}

/// One SOL outflow (fields in alphabetical order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SolOutflowRecord {
    /// Instruction index.
    pub instruction: usize,
    /// What kind of outflow (`transfer`, `create_account`, ...).
    pub kind: String,
    /// Lamports.
    pub lamports: u64,
    /// Recipient (base58).
    pub to: String,
}

/// One SPL token outflow (fields in alphabetical order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplOutflowRecord {
    /// Base units.
    pub amount: u64,
    /// Decimals, when the instruction states them.
    pub decimals: Option<u8>,
    /// Destination token account (base58).
    pub destination: String,
    /// Instruction index.
    pub instruction: usize,
    /// Mint, when the instruction names it (base58).
    pub mint: Option<String>,
    /// Source token account (base58).
    pub source: String,
    /// Token program (base58).
    pub token_program: String,
}

/// One rule a message breaks (fields in alphabetical order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRecord {
    /// What is wrong.
    pub detail: String,
    /// Instruction index, when one instruction is at fault.
    pub instruction: Option<usize>,
    /// Stable rule code.
    pub rule: String,
}

/// What a request asked for, as the agent gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionSummary {
    /// A transfer keyward builds.
    Transfer {
        /// `SOL` or a mint (base58).
        asset: String,
        /// Recipient (base58).
        to: String,
        /// Amount in UI units, as given.
        amount: String,
        /// Recent blockhash (base58).
        recent_blockhash: String,
        /// Memo, if any.
        memo: Option<String>,
        /// SPL: create the recipient's token account first.
        #[serde(default)]
        create_recipient_account: bool,
    },
    /// A caller-built message (its bytes are in `message`).
    SignTransaction,
    /// The sweep of a rotated-out key's balances to its successor.
    Sweep {
        /// The version swept.
        version: u32,
        /// The successor's address (base58).
        to: String,
        /// The SOL balance given, as given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sol: Option<String>,
        /// The token balances given: (mint, amount), as given.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tokens: Vec<(String, String)>,
        /// Recent blockhash (base58).
        recent_blockhash: String,
    },
}

/// `intent_received`: what an agent asked for, with the exact message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentReceived {
    /// Key name asked for.
    pub key: String,
    /// The request's action as the agent gave it.
    pub action: ActionSummary,
    /// SHA-256 (hex) of the intent's canonical content.
    pub content_sha256: String,
    /// Base64 of the exact message, when there is one.
    pub message: Option<String>,
    /// SHA-256 (hex) of the message.
    pub message_sha256: Option<String>,
    /// What keyward derived from the message.
    pub effects: Option<EffectsRecord>,
}

/// `policy_evaluated`: the decision with its reasons and the policy hash.
/// Admission and the decision at an approval quorum write the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEvaluated {
    /// `allow` or `deny`.
    pub decision: String,
    /// Approvals that counted, when decided again at the quorum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_approvals: Option<u64>,
    /// Every rule the intent broke.
    #[serde(default)]
    pub reasons: Vec<DenialReason>,
    /// What it spends per asset (`SOL` or mint), base units.
    #[serde(default)]
    pub spend: BTreeMap<String, u64>,
    /// What the agent had spent in the last 24 h before it, per asset.
    #[serde(default)]
    pub spent_24h_before: BTreeMap<String, u64>,
    /// SOL it spends, lamports.
    pub sol_spend_lamports: u64,
    /// SHA-256 (hex) of the policy in force.
    pub policy_sha256: String,
}

/// The payload of `approval_granted` and `approval_rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    /// Approver name.
    pub approver: String,
    /// The token's nonce (single use).
    pub nonce: String,
    /// The intent hash the token signed.
    pub intent_hash: String,
    /// The operator who handed the token in, when not the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_by: Option<String>,
}

/// `approval_granted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApprovalGranted(pub ApprovalDecision);

/// `approval_rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApprovalRejected(pub ApprovalDecision);

/// `intent_expired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentExpired {
    /// The pending intent's hash (hex).
    pub intent_hash: String,
    /// When its window ended (UTC, RFC 3339).
    pub expired_at: String,
}

/// `approval_refused`: every field is bounded (a constant code, a detail
/// cut short, a validated approver name and nonce), so a refusal never
/// writes more than a few hundred bytes whatever the request held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRefused {
    /// Stable code.
    pub code: String,
    /// What was wrong, cut short.
    pub detail: String,
    /// The token's approver, when it parsed.
    pub approver: Option<String>,
    /// The token's nonce, when it parsed.
    pub nonce: Option<String>,
    /// With `agent_locked`: seconds until the lock lifts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// The operator who handed the token in, when not the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_by: Option<String>,
}

/// `dry_run_evaluated`: bounded by the number of rule kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunEvaluated {
    /// `allow`, `approval_required` or `deny`.
    pub decision: String,
    /// The rules that denied it.
    pub rules: std::collections::BTreeSet<String>,
    /// SHA-256 (hex) of the intent's canonical content.
    pub content_sha256: String,
}

/// `approver_added`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverAdded {
    /// Approver name.
    pub approver: String,
    /// Who enrolled them (e.g. `uid:0`).
    pub by: String,
    /// Label of their HMAC key in the HSM.
    pub key_label: String,
}

/// `approver_removed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverRemoved {
    /// Approver name.
    pub approver: String,
    /// Who removed them.
    pub by: String,
}

/// `signature_created`: the HSM signed and the signature verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureCreated {
    /// The signature (base58).
    pub signature: String,
    /// Key name.
    pub key: String,
    /// Its public key (base58).
    pub public_key: String,
    /// SHA-256 (hex) of the signed message.
    pub message_sha256: String,
    /// SOL it spends, lamports.
    pub sol_spend_lamports: u64,
}

/// `signing_denied`: nothing was signed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningDenied {
    /// Stable code (`policy_denied`, `agent_locked`, `interrupted`, an
    /// HSM error code, ...).
    pub code: String,
    /// With `policy_denied`: every rule the intent broke.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<DenialReason>,
    /// With `agent_locked`: seconds until the lock lifts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// What happened, for failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `key_generated`: a key made inside the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGenerated {
    /// Key name.
    pub key: String,
    /// Public key (base58).
    pub public_key: String,
    /// What the key is for, when not signing for agents (`checkpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The C2SP verifier key of an audit key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier_key: Option<String>,
    /// Where the audit key was pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_in: Option<String>,
    /// HSM backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Token label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_label: Option<String>,
    /// Whether the private key is sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitive: Option<bool>,
    /// Whether the private key is extractable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extractable: Option<bool>,
    /// How the key came to be recorded: `admin_socket` (made by keywardd
    /// on an operator's request), `offline` (made while keywardd was not
    /// running, by `keyward setup` or `keyward key create`, and recorded
    /// at its next start). Absent in entries of earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Who asked for it (`uid:N`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The key's version under its name (1 unless rotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The label the HSM finds it by, when not the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_label: Option<String>,
}

impl KeyGenerated {
    /// The audit key (it signs checkpoints), with its C2SP verifier key and
    /// where it was pinned, when it was.
    pub fn audit_key(
        name: &str,
        public_key: &crate::types::PublicKey,
        pinned_in: Option<String>,
    ) -> KeyGenerated {
        KeyGenerated {
            key: name.to_owned(),
            public_key: public_key.to_base58(),
            purpose: Some("checkpoints".to_owned()),
            verifier_key: Some(super::checkpoint::verifier_key(
                super::checkpoint::AUDIT_KEY,
                public_key,
            )),
            pinned_in,
            backend: None,
            token_label: None,
            sensitive: None,
            extractable: None,
            created: None,
            by: None,
            version: None,
            hsm_label: None,
        }
    }

    /// A signing key generated inside the HSM as sensitive and
    /// non-extractable (the only way keyward makes one).
    pub fn signing_key(
        name: &str,
        public_key: &crate::types::PublicKey,
        backend: &str,
        token_label: Option<&str>,
    ) -> KeyGenerated {
        KeyGenerated {
            key: name.to_owned(),
            public_key: public_key.to_base58(),
            purpose: None,
            verifier_key: None,
            pinned_in: None,
            backend: Some(backend.to_owned()),
            token_label: token_label.map(str::to_owned),
            sensitive: Some(true),
            extractable: Some(false),
            created: None,
            by: None,
            version: None,
            hsm_label: None,
        }
    }
}

/// How keys come to be recorded (`KeyGenerated::created`).
pub mod created {
    /// Made by keywardd on an operator's request through the admin socket.
    pub const ADMIN_SOCKET: &str = "admin_socket";
    /// Made while keywardd was not running; recorded at its next start.
    pub const OFFLINE: &str = "offline";
}

/// `key_rotated`: a key name moved to a successor generated in the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotated {
    /// Key name (unchanged for agents).
    pub key: String,
    /// The retiring public key (base58).
    pub old_public_key: String,
    /// The successor's public key (base58).
    pub new_public_key: String,
    /// Why.
    pub reason: String,
    /// The transition statement both keys signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// The old key's signature over the statement (base58).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_signature: Option<String>,
    /// The new key's signature over the statement (base58).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_signature: Option<String>,
    /// The retiring key's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_version: Option<u32>,
    /// The successor's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_version: Option<u32>,
    /// The successor's HSM label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_hsm_label: Option<String>,
    /// End of the retiring key's grace period (Unix ms): `key retire`
    /// refuses before it without `--force`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after_ms: Option<i64>,
    /// Who asked for it (`uid:N`, `drill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// `key_retired`: a retiring key destroyed in the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRetired {
    /// Key name.
    pub key: String,
    /// The version destroyed.
    pub version: u32,
    /// Its public key (base58).
    pub public_key: String,
    /// Whether it was retired before its grace period ended.
    pub forced: bool,
    /// The operator's reason (required when forced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// `signing_frozen`: an operator stopped signing for a scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningFrozen {
    /// `all`, `agent:NAME` or `key:NAME`.
    pub scope: String,
    /// Why (the operator's words).
    pub reason: String,
    /// Who (`uid:N`).
    pub by: String,
}

/// `signing_unfrozen`: an operator lifted a freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningUnfrozen {
    /// The scope lifted.
    pub scope: String,
    /// The operator's words, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who (`uid:N`).
    pub by: String,
    /// The sequence of the `signing_frozen` entry it lifts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_seq: Option<u64>,
}

/// `backup_created`: the audit key signed a backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCreated {
    /// SHA-256 (hex) of the manifest's signed bytes.
    pub manifest_sha256: String,
    /// The ledger head the backup covers: its sequence number.
    pub ledger_seq: u64,
    /// ... and that entry's hash (hex).
    pub ledger_hash: String,
    /// Files the manifest lists.
    pub files: u64,
    /// Who asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// `policy_loaded`: a policy file put in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLoaded {
    /// SHA-256 (hex) of the file.
    pub policy_sha256: String,
    /// SHA-256 of the policy it replaced (on a reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sha256: Option<String>,
    /// The file.
    pub path: String,
    /// Who asked for the reload (`SIGHUP`, `uid:0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The agents it names.
    pub agents: Vec<String>,
}

/// `breaker_tripped`: an agent's denial breaker or the audit breaker
/// opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerTripped {
    /// The agent's name, or `audit`.
    pub breaker: String,
    /// Agent breaker: the denials in a row that tripped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_denials: Option<u32>,
    /// Agent breaker: locked until (UTC, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
    /// Agent breaker: locked until (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_ms: Option<i64>,
    /// Audit breaker: when it opened (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tripped_at_ms: Option<i64>,
    /// Audit breaker: the failed writes in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Audit breaker: the last write error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Audit breaker: why this entry is recorded after the fact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_late: Option<String>,
}

impl BreakerTripped {
    /// An agent's denial breaker opened after `denials` denials in a row.
    pub fn agent(agent: &str, denials: u32, until_ms: i64) -> BreakerTripped {
        BreakerTripped {
            breaker: agent.to_owned(),
            consecutive_denials: Some(denials),
            locked_until: Some(super::format_utc(until_ms)),
            locked_until_ms: Some(until_ms),
            tripped_at_ms: None,
            consecutive_failures: None,
            last_error: None,
            recorded_late: None,
        }
    }
}

/// `breaker_reset`: a breaker closed, by its cool-down or an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerReset {
    /// The agent's name, or `audit`.
    pub breaker: String,
    /// Agent breaker: `cooldown` or the operator (`uid:0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Agent breaker reset by an operator: the denials in a row before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_denials_before: Option<u32>,
    /// Agent breaker reset by an operator: whether it was locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was_locked: Option<bool>,
    /// Audit breaker: the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Audit breaker: whether it was open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was_open: Option<bool>,
}

impl BreakerReset {
    /// An agent's breaker closed by its cool-down.
    pub fn cooldown(agent: &str) -> BreakerReset {
        BreakerReset {
            breaker: agent.to_owned(),
            by: Some("cooldown".to_owned()),
            consecutive_denials_before: None,
            was_locked: None,
            actor: None,
            was_open: None,
        }
    }
}

/// `drill_completed`: a key-rotation or disaster-recovery drill finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillCompleted {
    /// Which drill (`rotation`, `dr`).
    pub drill: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// What was checked or what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// Each step's name and duration in ms, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<DrillStep>,
    /// DR drill: ms from start to the first verified signature on the
    /// restored instance (the recovery time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_time_ms: Option<u64>,
    /// Whether it ran on production keys (`--live`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

/// One step of a drill, as `drill_completed` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillStep {
    /// Step name.
    pub step: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// How long it took, ms.
    pub duration_ms: u64,
}

/// One key served, as `daemon_started` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedKey {
    /// Key name.
    pub name: String,
    /// Public key (base58).
    pub public_key: String,
}

/// `daemon_started`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStarted {
    /// keyward's version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// HSM backend.
    pub hsm_backend: String,
    /// Token label.
    pub token_label: String,
    /// The keys the policy uses.
    pub keys: Vec<ServedKey>,
}

/// `daemon_stopped`: a clean stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStopped {
    /// Process id.
    pub pid: u32,
}

/// `history_acknowledged`: an operator started keywardd on a history that
/// failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryAcknowledged {
    /// The first entry that failed.
    pub first_broken_seq: u64,
    /// What verification found.
    pub finding: String,
    /// The operator's uid.
    pub by_uid: u32,
    /// Process id.
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_event_type_has_exactly_one_payload_struct() {
        for t in EventType::ALL {
            // `check_payload` knows every type: a payload of the wrong
            // shape is an error, never "unknown".
            assert!(
                check_payload(t.as_str(), b"[]").is_err(),
                "{t} has no payload struct"
            );
        }
        assert!(!check_payload("no_such_event", b"{}").unwrap());
    }

    #[test]
    fn decode_refuses_another_event_type() {
        let p = encode(&DaemonStopped { pid: 7 }).unwrap();
        assert_eq!(
            decode::<DaemonStopped>("daemon_stopped", &p).unwrap().pid,
            7
        );
        assert!(matches!(
            decode::<DaemonStopped>("daemon_started", &p),
            Err(EventError::WrongType { .. })
        ));
    }

    #[test]
    fn payloads_written_by_earlier_releases_still_decode() {
        // As `json!` wrote them before the typed documents.
        let cases: &[(&str, &str)] = &[
            (
                "policy_evaluated",
                r#"{"after_approvals":2,"decision":"allow","policy_sha256":"ab","reasons":[],"sol_spend_lamports":5}"#,
            ),
            (
                "breaker_reset",
                r#"{"actor":"uid:0","breaker":"audit","was_open":true}"#,
            ),
            (
                "breaker_tripped",
                r#"{"breaker":"audit","consecutive_failures":3,"last_error":"disk","recorded_late":"x","tripped_at_ms":1}"#,
            ),
            (
                "signing_denied",
                r#"{"code":"interrupted","detail":"signing did not complete"}"#,
            ),
            ("daemon_stopped", r#"{"pid":12}"#),
        ];
        for (event, payload) in cases {
            assert!(
                check_payload(event, payload.as_bytes()).unwrap(),
                "{event} did not decode"
            );
        }
    }
}
