//! The keyward agent protocol: the one definition of every JSON body that
//! crosses the agent socket. The daemon imports these types, so client and
//! server cannot drift apart.
//!
//! Requests reject unknown fields (`deny_unknown_fields`): a typo in a field
//! name is an error, never a silently ignored constraint.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/intents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentRequest {
    /// Client-chosen id, 1-128 characters of `[A-Za-z0-9._:-]`. Submitting
    /// the same id with the same content again returns the original result.
    pub intent_id: String,
    /// Name of the key to sign with (as listed by `GET /v1/keys`).
    pub key: String,
    /// What to sign.
    pub action: Action,
}

/// The action an intent asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// keyward builds a transfer from the key to `to`.
    Transfer {
        /// `"SOL"` or an SPL mint address (base58).
        asset: String,
        /// Recipient wallet address (base58).
        to: String,
        /// Amount in the asset's UI units as a decimal string, e.g. `"1.25"`.
        amount: String,
        /// Recent blockhash (base58) the transaction is built on.
        recent_blockhash: String,
        /// Optional memo attached with the SPL Memo program.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memo: Option<String>,
        /// SPL only: create the recipient's associated token account first
        /// if it does not exist (idempotent; our key pays its rent, which
        /// counts as SOL spend).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        create_recipient_account: bool,
    },
    /// keyward decodes a caller-built message and signs it if policy allows.
    SignTransaction {
        /// Base64 (standard alphabet, padded) of the serialized message bytes.
        message: String,
    },
}

/// `200 OK` body of `POST /v1/intents?dry_run=true`: what keyward would
/// decide now. Nothing is signed, reserved or made pending; the dry run
/// counts toward the agent's rate windows, and a denied one toward its
/// breaker (recorded as `dry_run_evaluated`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunResult {
    /// The intent id of the request.
    pub intent_id: String,
    /// Always true.
    pub dry_run: bool,
    /// `allow`, `approval_required`, `deny`, `locked` (the agent's denial
    /// breaker is open) or `frozen` (an operator froze signing for this
    /// agent, key or everything).
    pub decision: String,
    /// Every rule the intent would break.
    #[serde(default)]
    pub reasons: Vec<DenialReason>,
    /// What it would spend per asset (`SOL` or mint), in base units.
    #[serde(default)]
    pub spend: std::collections::BTreeMap<String, u64>,
    /// When `decision` is `locked`: seconds until the lock lifts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// Status of an intent as reported by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    /// Signed; the signature was recorded before it was released.
    Signed,
    /// Waiting for human approval tokens.
    PendingApproval,
    /// Refused by policy (or by a failure that made signing impossible).
    Denied,
    /// The approval window ran out.
    Expired,
    /// Accepted and being signed right now.
    InProgress,
}

/// `200 OK` body of `POST /v1/intents`, and of `GET /v1/intents/{id}` for a
/// signed intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedIntent {
    /// The intent id.
    pub intent_id: String,
    /// Always [`IntentStatus::Signed`].
    pub status: IntentStatus,
    /// Base58 Ed25519 signature made by the key.
    pub signature: String,
    /// Base64 of the signed wire transaction (our signature in its slot;
    /// slots of other required signers, if any, are zero).
    pub transaction: String,
    /// Sequence number of the `signature_created` ledger entry.
    pub ledger_seq: u64,
    /// Hex SHA-256 hash of that ledger entry.
    pub entry_hash: String,
}

/// One reason for a denial: a machine-readable rule code and a human detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialReason {
    /// Stable snake_case rule code, e.g. `per_tx_limit`.
    pub rule: String,
    /// What exactly broke the rule, for humans.
    pub detail: String,
}

/// Body of `GET /v1/intents/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentView {
    /// The intent id.
    pub intent_id: String,
    /// Current status.
    pub status: IntentStatus,
    /// Present when signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Present when signed: base64 signed wire transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
    /// Present when signed: sequence of the `signature_created` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_seq: Option<u64>,
    /// Present when signed: hash of that entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_hash: Option<String>,
    /// Present when denied: the error code the submission got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Present when denied by policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<DenialReason>,
    /// Present when pending approval or expired: the approval request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRequest>,
    /// Present when signed: the leaf index of the `signature_created`
    /// entry in the ledger's Merkle tree (its sequence number − 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf_index: Option<u64>,
    /// Present once a signed checkpoint covers that entry: the inclusion
    /// proof with the checkpoint note (check it with
    /// `keyward audit verify-proof`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<serde_json::Value>,
}

/// What approvers are asked to sign off on: everything in it is derived
/// from the exact message bytes and the signing key, so an approver's tool
/// (`keyward approve`) recomputes `intent_hash` and `summary` from `message`
/// and refuses a request whose fields disagree with its bytes. Recorded as
/// the `approval_requested` ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// SHA-256 (hex) over the message and its derived effects: what a token
    /// binds to.
    pub intent_hash: String,
    /// Name of the signing key.
    pub key: String,
    /// Its public key (base58).
    pub public_key: String,
    /// Base64 of the exact message bytes.
    pub message: String,
    /// Approvals needed (under the policy in force when this was built).
    pub required: u64,
    /// Approvals that count so far.
    pub received: u64,
    /// Who may approve.
    pub approvers: Vec<String>,
    /// When the approval window ends (UTC, RFC 3339).
    pub expires_at: String,
    /// What the transaction does, in one line, derived from the bytes.
    pub summary: String,
    /// Why approval is needed, per asset.
    #[serde(default)]
    pub because: Vec<String>,
}

/// `202 Accepted` body: the intent waits for approvals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingIntent {
    /// The intent id.
    pub intent_id: String,
    /// Always [`IntentStatus::PendingApproval`].
    pub status: IntentStatus,
    /// The approval request.
    pub approval: ApprovalRequest,
}

/// Every error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error object. `code` is a stable snake_case identifier; the other
/// optional fields appear only with the codes that use them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable snake_case error code (see [`codes`]).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// With `policy_denied`: every rule the intent broke.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<DenialReason>,
    /// With `agent_locked` and similar: seconds until a retry may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// Stable error codes returned by the API.
pub mod codes {
    /// 403: the policy refused the intent; see `reasons`.
    pub const POLICY_DENIED: &str = "policy_denied";
    /// 403: the peer's uid is not mapped to any agent.
    pub const UNKNOWN_AGENT: &str = "unknown_agent";
    /// 400: the request body is malformed JSON or has unknown fields.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// 400: the transaction message could not be decoded strictly.
    pub const INVALID_MESSAGE: &str = "invalid_message";
    /// 400: an amount is not a valid decimal for the asset.
    pub const INVALID_AMOUNT: &str = "invalid_amount";
    /// 400: an address or blockhash is not valid base58 of 32 bytes.
    pub const INVALID_ADDRESS: &str = "invalid_address";
    /// 400: the intent id is empty, too long or has forbidden characters.
    pub const INVALID_INTENT_ID: &str = "invalid_intent_id";
    /// 404: no such intent for this agent.
    pub const INTENT_NOT_FOUND: &str = "intent_not_found";
    /// 404: no such route.
    pub const NOT_FOUND: &str = "not_found";
    /// 405: method not allowed on this route.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 409: the intent id was used before with different content.
    pub const INTENT_CONFLICT: &str = "intent_conflict";
    /// 409: the intent id is being processed by another request right now.
    pub const INTENT_IN_PROGRESS: &str = "intent_in_progress";
    /// 413: the body is larger than the limit.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// 415: the body is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// 423: the agent's denial circuit breaker is open.
    pub const AGENT_LOCKED: &str = "agent_locked";
    /// The intent waited for approvals longer than the approval window.
    pub const INTENT_EXPIRED: &str = "intent_expired";
    /// 503: the ledger could not record the decision; nothing was signed.
    pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";
    /// 503: the HSM could not sign; nothing was released.
    pub const HSM_UNAVAILABLE: &str = "hsm_unavailable";
    /// 503: the HSM's queue is full; refused at once, nothing was signed or
    /// reserved. Try again later.
    pub const HSM_BUSY: &str = "hsm_busy";
    /// 503: the mirror is too far behind; nothing is signed until it catches up.
    pub const MIRROR_LAGGING: &str = "mirror_lagging";
    /// 503: the audit history failed verification; nothing is signed.
    pub const LEDGER_HISTORY_BROKEN: &str = "ledger_history_broken";
    /// 503: the request took longer than the daemon's request time limit
    /// (`daemon.request_timeout_s`); a submitted intent is still recorded to
    /// the end, so ask for its outcome with `GET /v1/intents/{id}`.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// 503: the connection was refused at accept because this uid (or the
    /// socket) already holds as many connections as the daemon allows; the
    /// request was not read. Retry after `retry_after` seconds.
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    /// 500: an internal error; nothing was released.
    pub const INTERNAL: &str = "internal_error";
    /// 423: an operator froze signing for a scope this request falls in
    /// (`keyward freeze`); nothing was signed or counted and no intent
    /// record was kept, so the same intent id can be sent again once an
    /// operator lifts the freeze (`keyward unfreeze`).
    pub const FROZEN: &str = "frozen";
}

/// One entry of `GET /v1/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Key name (the HSM object label).
    pub name: String,
    /// Base58 Ed25519 public key (the Solana address).
    pub public_key: String,
    /// `active` when the key can sign.
    pub state: String,
}

/// Body of `GET /v1/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysView {
    /// Keys this agent may use.
    pub keys: Vec<KeyInfo>,
}

/// Limits and remaining budget for one asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetBudget {
    /// `"SOL"` or a mint address.
    pub asset: String,
    /// Decimals of the asset's UI unit.
    pub decimals: u8,
    /// Largest amount per transaction (UI units).
    pub per_tx: String,
    /// Largest total per rolling 24 hours (UI units).
    pub per_day: String,
    /// Spent (and reserved) during the last 24 hours (UI units).
    pub spent_24h: String,
    /// Spent during the last 24 hours in base units (lamports for SOL).
    pub spent_24h_base_units: u64,
    /// What is left of `per_day` (UI units).
    pub remaining_24h: String,
    /// Larger transactions wait for approvals (UI units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_above: Option<String>,
    /// Approvals they need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals_required: Option<u32>,
}

/// Rate limits of an agent and how much of them is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateView {
    /// Allowed intents per rolling minute, if limited.
    pub per_minute: Option<u32>,
    /// Allowed intents per rolling hour, if limited.
    pub per_hour: Option<u32>,
    /// Allowed intents in the last minute.
    pub used_last_minute: u32,
    /// Allowed intents in the last hour.
    pub used_last_hour: u32,
}

/// An agent's denial breaker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerView {
    /// Consecutive denials that lock the agent.
    pub max_consecutive_denials: u32,
    /// Length of the lock in seconds.
    pub cooldown_s: u64,
    /// Denials in a row so far.
    pub consecutive_denials: u32,
    /// When the current lock ends (RFC 3339 UTC), if locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
}

/// Body of `GET /v1/policy`: the caller's effective policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// The agent name the caller's uid maps to.
    pub agent: String,
    /// SHA-256 (hex) of the policy file in force.
    pub policy_hash: String,
    /// Keys the agent may sign with.
    pub keys: Vec<String>,
    /// Recipient allowlist; `None` means any recipient.
    pub allow_recipients: Option<Vec<String>>,
    /// Programs allowed in `sign_transaction` beyond the built-ins.
    pub allow_programs: Vec<String>,
    /// Per-asset limits and remaining budgets.
    pub limits: Vec<AssetBudget>,
    /// Rate limits and their use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateView>,
    /// Active hours, e.g. `Mon-Fri 08:00-20:00 (Europe/Berlin)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_hours: Option<String>,
    /// The denial breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerView>,
}

/// Body of `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// `ok` when the daemon can sign, `degraded` while a component is
    /// unavailable, `failed` when the audit history broke (signing stopped
    /// until an operator acts).
    pub status: String,
    /// Daemon version.
    pub version: String,
    /// HSM backend state.
    pub hsm: ComponentHealth,
    /// Ledger state.
    pub ledger: LedgerHealth,
    /// The external copy of the ledger, when a mirror is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorHealth>,
    /// Why `status` is not `ok`, one line per cause.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Emergency freezes in force (`keyward freeze`). The operator's
    /// reason is shown only on the admin socket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freezes: Vec<FreezeView>,
    /// The last drill of each kind (`rotation`, `dr`); a kind never run is
    /// `never` and does not degrade health.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drills: Vec<DrillHealth>,
}

/// Lag of the ledger's external copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorHealth {
    /// Whether signing is allowed (the lag is within its limits).
    pub ok: bool,
    /// Entries not yet acknowledged by the mirror.
    pub unmirrored_entries: u64,
    /// Age of the oldest of them, in seconds.
    pub oldest_unmirrored_age_s: u64,
    /// Why signing is stopped, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Each sink: name, last acknowledged entry and its lag in entries.
    #[serde(default)]
    pub sinks: Vec<SinkHealth>,
}

/// One mirror sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkHealth {
    /// `file` or `nats`.
    pub name: String,
    /// Last entry it acknowledged.
    pub acked_seq: u64,
    /// Entries it has not acknowledged yet.
    pub lag_entries: u64,
}

/// Health of one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// Whether the component works.
    pub ok: bool,
    /// Backend or component name.
    pub name: String,
    /// What is wrong, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Health of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerHealth {
    /// Whether the ledger accepts writes.
    pub ok: bool,
    /// Sequence number of the newest entry (0 when empty).
    pub head_seq: u64,
    /// `closed` (normal) or `open` (writes failed; signing stopped until reset).
    pub audit_breaker: String,
    /// Consecutive failed ledger writes.
    pub consecutive_failures: u32,
    /// Durable commits since keywardd started (group commit: one commit
    /// holds the entries of many intents).
    #[serde(default)]
    pub commits: u64,
    /// Most write jobs one commit held.
    #[serde(default)]
    pub largest_batch: u64,
    /// Whether the history verified against the HSM's audit key holds
    /// (`false`: signing stopped, health `failed`).
    #[serde(default = "yes")]
    pub history_ok: bool,
    /// The last entry verified against the HSM's audit key.
    #[serde(default)]
    pub verified_seq: u64,
    /// What broke, when the history is broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_detail: Option<String>,
}

fn yes() -> bool {
    true
}

/// Admin API: body of `POST /v1/admin/breakers/{name}/reset` responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerResetView {
    /// Breaker name (`audit` or an agent name).
    pub breaker: String,
    /// State after the reset (`closed`).
    pub state: String,
    /// Ledger sequence of the `breaker_reset` entry.
    pub ledger_seq: u64,
}

/// Body of `POST /v1/intents/{id}/approvals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSubmission {
    /// A `kwa1.…` approval token made by `keyward approve`.
    pub token: String,
}

/// Admin API: body of `POST /v1/admin/approvals`: an approver's token
/// relayed by the operator, applied to the pending intent it names (by its
/// intent hash) exactly as if the agent had handed it in. The answer is
/// the agent endpoint's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayedApproval {
    /// A `kwa1.…` approval token made by `keyward approve`.
    pub token: String,
}

/// Admin API: one intent waiting for approvals in `GET /v1/admin/approvals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApprovalInfo {
    /// The agent that submitted it.
    pub agent: String,
    /// Its intent id.
    pub intent_id: String,
    /// Key it would be signed with.
    pub key: String,
    /// What the transaction does, in one line.
    pub summary: String,
    /// Hex SHA-256 that approval tokens bind to.
    pub intent_hash: String,
    /// Approvals the policy in force now requires (0: it asks for none any
    /// more; the next approval leads to a fresh decision).
    pub required: u64,
    /// Approvals that count now (by approvers enrolled and listed now).
    pub received: u64,
    /// Who may approve under the policy in force now.
    pub approvers: Vec<String>,
    /// Every decision recorded so far.
    pub approvals: Vec<ApprovalRecordInfo>,
    /// When the approval window ends (RFC 3339 UTC).
    pub expires_at: String,
}

/// Admin API: one approver's decision on a pending intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecordInfo {
    /// Approver name.
    pub approver: String,
    /// `approve` or `reject`.
    pub decision: String,
    /// When it was recorded (RFC 3339 UTC).
    pub at: String,
    /// Whether it counts now (the approver is enrolled and listed now).
    pub counts: bool,
}

/// Admin API: answer of `POST /v1/admin/approvers/{name}`: the approver's
/// key, given out this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverCreated {
    /// Approver name.
    pub approver: String,
    /// The 32-byte HMAC key, base64url without padding.
    pub key: String,
}

impl std::fmt::Debug for ApproverCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApproverCreated")
            .field("approver", &self.approver)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Admin API: body of `DELETE /v1/admin/approvers/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverRemoved {
    /// Approver name.
    pub approver: String,
    /// Always `removed`.
    pub state: String,
    /// Sequence of the `approver_removed` entry.
    pub ledger_seq: u64,
}

/// Admin API: one approver in `GET /v1/admin/approvers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproverInfo {
    /// Name.
    pub name: String,
    /// `active` or `removed`.
    pub state: String,
    /// When enrolled (RFC 3339 UTC).
    pub added_at: String,
    /// When removed, if removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<String>,
}

/// Admin API: body of `POST /v1/admin/policy/reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReloadView {
    /// SHA-256 (hex) of the policy now in force.
    pub policy_sha256: String,
    /// SHA-256 (hex) of the policy it replaced.
    pub previous_sha256: String,
    /// Ledger sequence of the `policy_loaded` entry.
    pub ledger_seq: u64,
}

/// Admin API: one key in `GET /v1/admin/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminKeyInfo {
    /// Key name (what policies and agents use).
    pub name: String,
    /// Base58 public key.
    pub public_key: String,
    /// Key state: `active`, `retiring`, `retired` (or `audit` for the
    /// audit key).
    pub state: String,
    /// Agents whose policy lets them use the key (its active version).
    pub agents: Vec<String>,
    /// For the audit key: the signed-note verifier key of checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier_key: Option<String>,
    /// Version under the name (1 unless rotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// HSM backend holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The label the HSM finds it by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_label: Option<String>,
    /// When it was registered (UTC, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// When it was rotated out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<String>,
    /// End of its grace period, while retiring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<String>,
    /// When it was destroyed in the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<String>,
}

/// Admin API: what a retiring key's address holds, to be swept to its
/// successor (keyward has no network: the operator reads the balances).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// The agent whose policy and approvers the sweep goes through;
    /// default: the one agent whose policy lists the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Recent blockhash (base58) the sweep transaction is bound to.
    pub recent_blockhash: String,
    /// The old address's SOL balance (decimal SOL). What is moved is this
    /// less the fee and the rent of the token accounts the sweep creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sol: Option<String>,
    /// The old address's token balances, each moved whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<SweepToken>,
    /// Intent id; default: `sweep:NAME:VERSION:` and 16 hex digits of the
    /// request's digest (so the same request is the same intent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
}

/// One token balance of a sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepToken {
    /// The mint (base58).
    pub mint: String,
    /// The balance (decimal, in the token's units).
    pub amount: String,
}

/// Admin API: `POST /v1/admin/keys/{name}/rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotateRequest {
    /// Why (one line, recorded and signed by both keys).
    pub reason: String,
    /// Grace period of the old key before `key retire` may destroy it
    /// without `force`, seconds (default 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_s: Option<u64>,
    /// The old address's balances, to create the sweep intent at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepSpec>,
}

/// Admin API: a sweep intent created (by a rotation or by
/// `POST /v1/admin/keys/{name}/sweep`): the agent and intent it went
/// through, and what the agent API would have answered for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// The agent whose policy decided it.
    pub agent: String,
    /// Its intent id (`GET /v1/admin/approvals` lists it while pending).
    pub intent_id: String,
    /// The HTTP status the agent API gives this outcome (200 signed, 202
    /// pending approval, 403 denied, ...).
    pub http_status: u16,
    /// The body the agent API gives it.
    pub body: serde_json::Value,
}

/// Admin API: the answer to a rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRotatedView {
    /// Key name.
    pub name: String,
    /// The version rotated out (now retiring).
    pub old_version: u32,
    /// The successor's version (now active).
    pub new_version: u32,
    /// The old public key.
    pub old_public_key: String,
    /// The new public key.
    pub new_public_key: String,
    /// The transition statement both keys signed.
    pub statement: String,
    /// The old key's signature (base58).
    pub old_signature: String,
    /// The new key's signature (base58).
    pub new_signature: String,
    /// End of the old key's grace period (UTC).
    pub retire_after: String,
    /// Sequence of the `key_rotated` entry.
    pub ledger_seq: u64,
    /// The sweep intent, when balances were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepResult>,
    /// Why the sweep intent could not be created (the rotation stands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_error: Option<ErrorDetail>,
}

/// Admin API: `POST /v1/admin/keys/{name}/sweep`, a sweep intent for a
/// retiring version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySweepRequest {
    /// The retiring version whose address is swept.
    pub version: u32,
    /// The balances and the rest.
    pub sweep: SweepSpec,
}

/// Admin API: `POST /v1/admin/keys/{name}/retire`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRetireRequest {
    /// The retiring version to destroy.
    pub version: u32,
    /// Destroy it within its grace period (needs `reason`).
    #[serde(default)]
    pub force: bool,
    /// Why (required with `force`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Admin API: the answer to a retirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRetiredView {
    /// `name@version`.
    pub key: String,
    /// Its public key.
    pub public_key: String,
    /// Whether it was retired within its grace period.
    pub forced: bool,
    /// Sequence of the `key_retired` entry.
    pub ledger_seq: u64,
}

/// Admin API: `POST /v1/admin/keys`, a new signing key generated inside
/// the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCreateRequest {
    /// Key name: 1-64 characters of `[A-Za-z0-9_.-]`, not starting with
    /// `keyward-` (reserved).
    pub name: String,
}

/// Admin API: the answer to `POST /v1/admin/keys`, sent once the key's
/// `key_generated` entry is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCreated {
    /// Key name.
    pub name: String,
    /// Base58 public key (the Solana address).
    pub public_key: String,
    /// Sequence number of its `key_generated` entry.
    pub ledger_seq: u64,
}

/// Admin API: `POST /v1/admin/freezes`, an emergency freeze: every new
/// intent in scope is refused with 423 `frozen` until it is lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// `all`, `agent` or `key`.
    pub scope: String,
    /// The agent or key name, for the scopes `agent` and `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Why (required; recorded in the ledger, never shown to agents).
    pub reason: String,
}

/// Admin API: `POST /v1/admin/freezes/lift`, lifting a freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnfreezeRequest {
    /// `all`, `agent` or `key`.
    pub scope: String,
    /// The agent or key name, for the scopes `agent` and `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Why, when the operator says (recorded in the ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A freeze in force: the answer to `POST /v1/admin/freezes`, an item of
/// `GET /v1/admin/freezes` and of the health view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeView {
    /// `all`, `agent:NAME` or `key:NAME`.
    pub scope: String,
    /// When it began (UTC, RFC 3339).
    pub since: String,
    /// Who froze it (`uid:N`).
    pub by: String,
    /// The operator's reason: on the admin socket only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Sequence number of its `signing_frozen` entry.
    pub ledger_seq: u64,
    /// In the answer to a freeze: `false` when the scope was already
    /// frozen (nothing new was recorded; this is the freeze in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
}

/// Admin API: the answer to `POST /v1/admin/freezes/lift`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfreezeView {
    /// The scope lifted (`all`, `agent:NAME` or `key:NAME`).
    pub scope: String,
    /// When the freeze it lifted began (UTC).
    pub frozen_since: String,
    /// Sequence number of the `signing_frozen` entry it lifted.
    pub frozen_seq: u64,
    /// Sequence number of its `signing_unfrozen` entry.
    pub ledger_seq: u64,
}

/// Admin API: `POST /v1/admin/backups/sign`, the audit key's signature over
/// a backup's manifest. keywardd signs only the domain-separated digest
/// (`"keyward:backup-manifest:v1\0" ‖ SHA-256(manifest.json)`), and only
/// when `(ledger_seq, ledger_hash)` is an entry of its own ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSignRequest {
    /// SHA-256 (hex) of the manifest's bytes.
    pub manifest_sha256: String,
    /// The ledger head the backup covers: its sequence number ...
    pub ledger_seq: u64,
    /// ... and that entry's hash (hex).
    pub ledger_hash: String,
    /// Files the manifest lists.
    pub files: u64,
}

/// Admin API: the answer to `POST /v1/admin/backups/sign`, sent once the
/// `backup_created` entry is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSigned {
    /// The audit key's Ed25519 signature (base64) over the
    /// domain-separated manifest digest.
    pub signature: String,
    /// The audit key's verifier key (`NAME+KEYID+KEY`).
    pub verifier_key: String,
    /// Sequence number of the `backup_created` entry.
    pub ledger_seq: u64,
}

/// The last drill of one kind, as health reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillHealth {
    /// `rotation` or `dr`.
    pub kind: String,
    /// `passed`, `failed`, or `never` (no drill of this kind was recorded).
    pub outcome: String,
    /// When it was recorded (UTC, RFC 3339); absent when never run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Whole days since then; absent when never run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_days: Option<u64>,
    /// The step that failed, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// Sequence number of its `drill_completed` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_seq: Option<u64>,
}

/// One step of a drill: name, `passed` or `failed`, duration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillStepView {
    /// Step name.
    pub step: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// How long it took, ms.
    pub duration_ms: u64,
}

/// Admin API: `POST /v1/admin/drills`, a finished drill to record as
/// `drill_completed`. It carries no time: the daemon's clock stamps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRecordRequest {
    /// `rotation` or `dr`.
    pub kind: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// How long the drill took, ms.
    pub duration_ms: u64,
    /// What was checked or what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The step that failed (exactly when `outcome` is `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// Every step, in order.
    pub steps: Vec<DrillStepView>,
    /// DR drill: start to first verified signature, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_time_ms: Option<u64>,
    /// Whether it ran on production keys.
    #[serde(default)]
    pub live: bool,
}

/// Admin API: the answer to `POST /v1/admin/drills`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecorded {
    /// `rotation` or `dr`.
    pub kind: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// When the daemon recorded it (UTC).
    pub completed_at: String,
    /// Sequence number of the `drill_completed` entry.
    pub ledger_seq: u64,
}
