//! The audit ledger: an append-only SHA-256 hash chain in SQLite.
//!
//! Every decision and signature is an entry. Entry `n` commits to entry
//! `n - 1` through its hash, so editing, deleting or reordering any stored
//! entry breaks the chain at that point and [`verify_chain`] names it; who can
//! rewrite the whole file is caught by checkpoints verified with a trusted key
//! ([`verify_history`]).
//!
//! ```text
//! hash(n) = SHA-256( "keyward:ledger:v1\0"
//!                    ‖ seq (u64 BE) ‖ prev_hash (32 bytes) ‖ ts_ms (i64 BE)
//!                    ‖ lp(event) ‖ opt(intent_id) ‖ opt(agent) ‖ lp(payload) )
//! lp(x)  = len(x) as u64 BE ‖ x
//! opt(x) = 0x00 when absent, 0x01 ‖ lp(x) when present
//! ```
//! The first entry has seq 1 and a prev_hash of 32 zero bytes.
//!
//! The database runs in WAL mode; one thread owns the only writable
//! connection ([`Ledger`]). Callers hand it closures that append entries and
//! update the tables that live beside the chain (spend counters, intent
//! records) in the same transaction, and get their result only once that
//! transaction is committed and the log synced to disk (group commit: one
//! sync for every job waiting at the time).
//!
//! The tables (the chain's and those beside it) and their versions belong
//! to [`crate::schema`]; [`Ledger::open`] migrates, and every opener refuses
//! a database newer than the binary.

pub mod checkpoint;
pub mod events;
mod history;
mod keys;
pub mod merkle;
pub mod registry;
mod verify;
mod writer;

use sha2::{Digest, Sha256};

pub use history::{
    Expectations, HistoryReport, TrustedKey, VerifyError, VerifyReport, Walker, verify_chain,
    verify_history, verify_history_conn,
};
pub use keys::generated_keys;
pub use verify::{
    InclusionProof, PayloadFinding, entries_after, export_jsonl, latest_checkpoint, open_read_only,
    payload_findings, prove, trail, verify_proof,
};
pub use writer::{Ledger, LedgerHealthState, LedgerOptions, LedgerTxn, Reader, now_ms};

use crate::types::LedgerSeq;

/// Domain separator of entry hashes.
pub const DOMAIN: &[u8] = b"keyward:ledger:v1\0";

/// Number of consecutive failed writes that opens the audit breaker.
pub const BREAKER_THRESHOLD: u32 = 3;

macro_rules! event_types {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// Kinds of ledger entries.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType {
            $($(#[$doc])* $variant,)*
        }

        impl EventType {
            /// Every event type.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// Stable name stored in the ledger.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)*
                }
            }

            /// Parses a stored name.
            pub fn parse(name: &str) -> Option<EventType> {
                match name {
                    $($name => Some(EventType::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

event_types! {
    /// An agent submitted an intent (what it asked for, the exact message).
    IntentReceived => "intent_received",
    /// The policy decision with its reasons and the policy hash.
    PolicyEvaluated => "policy_evaluated",
    /// An approval was requested for a pending intent.
    ApprovalRequested => "approval_requested",
    /// An approver approved.
    ApprovalGranted => "approval_granted",
    /// An approver rejected.
    ApprovalRejected => "approval_rejected",
    /// A pending intent's approval window ran out.
    IntentExpired => "intent_expired",
    /// An approval token was refused (with its code).
    ApprovalRefused => "approval_refused",
    /// A dry run that counted toward the agent's rate windows or breaker
    /// (its decision and the rules that denied it; nothing signed).
    DryRunEvaluated => "dry_run_evaluated",
    /// An approver was enrolled (their key stored in the HSM).
    ApproverAdded => "approver_added",
    /// An approver was removed (their key destroyed).
    ApproverRemoved => "approver_removed",
    /// The HSM signed and the signature verified; it is released after this entry commits.
    SignatureCreated => "signature_created",
    /// Nothing was signed, with the reason.
    SigningDenied => "signing_denied",
    /// A key was generated in the HSM.
    KeyGenerated => "key_generated",
    /// A key was rotated.
    KeyRotated => "key_rotated",
    /// A retiring key was destroyed in the HSM.
    KeyRetired => "key_retired",
    /// An operator froze signing (all, an agent or a key).
    SigningFrozen => "signing_frozen",
    /// An operator lifted a freeze.
    SigningUnfrozen => "signing_unfrozen",
    /// A backup's manifest was signed by the audit key.
    BackupCreated => "backup_created",
    /// A policy file was loaded (its SHA-256).
    PolicyLoaded => "policy_loaded",
    /// A circuit breaker opened.
    BreakerTripped => "breaker_tripped",
    /// An operator closed a circuit breaker.
    BreakerReset => "breaker_reset",
    /// A signed checkpoint.
    Checkpoint => "checkpoint",
    /// A key-rotation or disaster-recovery drill finished.
    DrillCompleted => "drill_completed",
    /// The daemon started.
    DaemonStarted => "daemon_started",
    /// The daemon stopped cleanly.
    DaemonStopped => "daemon_stopped",
    /// An operator started keywardd on a history that failed verification.
    HistoryAcknowledged => "history_acknowledged",
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an appended entry landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef {
    /// Its sequence number.
    pub seq: LedgerSeq,
    /// Its hash.
    pub hash: [u8; 32],
}

/// A stored ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number (1, 2, ...).
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Event type name.
    pub event: String,
    /// Intent the entry belongs to.
    pub intent_id: Option<String>,
    /// Agent the entry belongs to.
    pub agent: Option<String>,
    /// Exact stored payload bytes (JSON).
    pub payload: Vec<u8>,
    /// Hash of the previous entry.
    pub prev_hash: [u8; 32],
    /// This entry's hash.
    pub hash: [u8; 32],
}

impl Entry {
    /// The hash this entry's content and link should have.
    pub fn computed_hash(&self) -> [u8; 32] {
        entry_hash(
            self.seq,
            &self.prev_hash,
            self.ts_ms,
            &self.event,
            self.intent_id.as_deref(),
            self.agent.as_deref(),
            &self.payload,
        )
    }

    /// One JSON line for export and trails. `payload` is the parsed JSON for
    /// reading; `payload_b64` is the exact hashed bytes for re-verification.
    pub fn to_json_line(&self) -> String {
        use base64::Engine as _;
        /// One exported entry.
        #[derive(serde::Serialize)]
        struct Line<'a> {
            seq: u64,
            ts_ms: i64,
            time: String,
            event: &'a str,
            intent_id: Option<&'a str>,
            agent: Option<&'a str>,
            payload: serde_json::Value,
            payload_b64: String,
            prev_hash: String,
            hash: String,
        }
        let line = Line {
            seq: self.seq,
            ts_ms: self.ts_ms,
            time: format_utc(self.ts_ms),
            event: &self.event,
            intent_id: self.intent_id.as_deref(),
            agent: self.agent.as_deref(),
            // For reading only: any JSON the entry holds, null if none.
            payload: serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null),
            payload_b64: base64::engine::general_purpose::STANDARD.encode(&self.payload),
            prev_hash: hex::encode(self.prev_hash),
            hash: hex::encode(self.hash),
        };
        // Plain strings and numbers: serializing cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }
}

fn lp(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

fn opt(h: &mut Sha256, value: Option<&str>) {
    match value {
        None => h.update([0u8]),
        Some(v) => {
            h.update([1u8]);
            lp(h, v.as_bytes());
        }
    }
}

/// The hash of an entry (see the module documentation).
pub fn entry_hash(
    seq: u64,
    prev_hash: &[u8; 32],
    ts_ms: i64,
    event: &str,
    intent_id: Option<&str>,
    agent: Option<&str>,
    payload: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(prev_hash);
    h.update(ts_ms.to_be_bytes());
    lp(&mut h, event.as_bytes());
    opt(&mut h, intent_id);
    opt(&mut h, agent);
    lp(&mut h, payload);
    h.finalize().into()
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds.
pub fn format_utc(ts_ms: i64) -> String {
    let secs = ts_ms.div_euclid(1000);
    let ms = ts_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Errors of the ledger. `code()` is the stable API code.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite failed (disk full, read-only file system, I/O error, ...).
    #[error("ledger database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database could not be opened or set up.
    #[error("cannot open ledger {path}: {detail}")]
    Open {
        /// Database path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The stored chain head does not match its content: refuse to extend it.
    #[error("ledger head is corrupt: {0}; run `keyward audit verify`")]
    Corrupt(String),
    /// The audit breaker is open after repeated write failures.
    #[error(
        "the audit breaker is open after {failures} consecutive ledger write failures (last: {last_error}); fix the cause, then run `keyward breaker reset audit`"
    )]
    BreakerOpen {
        /// Consecutive failures that opened it.
        failures: u32,
        /// The last failure.
        last_error: String,
    },
    /// The ledger was closed.
    #[error("the ledger is closed")]
    Closed,
    /// A write job panicked; its changes were rolled back.
    #[error("a ledger write panicked and was rolled back: {0}")]
    JobPanicked(String),
    /// The sequence space is exhausted (never in practice).
    #[error("ledger sequence numbers exhausted")]
    Exhausted,
    /// A payload could not be encoded (nothing was written) or a stored
    /// one does not decode as its type.
    #[error("ledger payload: {0}")]
    Event(#[from] events::EventError),
    /// The database's schema version cannot be used (newer than this
    /// binary, or a migration failed).
    #[error(transparent)]
    Schema(Box<crate::schema::SchemaError>),
}

impl From<crate::schema::SchemaError> for LedgerError {
    fn from(e: crate::schema::SchemaError) -> LedgerError {
        LedgerError::Schema(Box::new(e))
    }
}

impl LedgerError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Corrupt(_) => "ledger_corrupt",
            LedgerError::Open { .. } => "ledger_unavailable",
            LedgerError::Schema(e) => e.code(),
            _ => "audit_unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_covers_every_field() {
        let base = entry_hash(1, &[0; 32], 5, "e", Some("i"), Some("a"), b"p");
        assert_ne!(
            base,
            entry_hash(2, &[0; 32], 5, "e", Some("i"), Some("a"), b"p")
        );
        assert_ne!(
            base,
            entry_hash(1, &[1; 32], 5, "e", Some("i"), Some("a"), b"p")
        );
        assert_ne!(
            base,
            entry_hash(1, &[0; 32], 6, "e", Some("i"), Some("a"), b"p")
        );
        assert_ne!(
            base,
            entry_hash(1, &[0; 32], 5, "f", Some("i"), Some("a"), b"p")
        );
        assert_ne!(base, entry_hash(1, &[0; 32], 5, "e", None, Some("a"), b"p"));
        assert_ne!(base, entry_hash(1, &[0; 32], 5, "e", Some("i"), None, b"p"));
        assert_ne!(
            base,
            entry_hash(1, &[0; 32], 5, "e", Some("i"), Some("a"), b"q")
        );
        // Field boundaries are unambiguous.
        assert_ne!(
            entry_hash(1, &[0; 32], 5, "e", Some("ab"), Some("c"), b""),
            entry_hash(1, &[0; 32], 5, "e", Some("a"), Some("bc"), b"")
        );
        assert_ne!(
            entry_hash(1, &[0; 32], 5, "e", Some(""), None, b""),
            entry_hash(1, &[0; 32], 5, "e", None, Some(""), b"")
        );
    }

    #[test]
    fn event_names_round_trip() {
        for e in EventType::ALL {
            assert_eq!(EventType::parse(e.as_str()), Some(*e));
        }
        assert_eq!(EventType::parse("nope"), None);
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(format_utc(1_795_564_799_999), "2026-11-24T23:59:59.999Z");
    }
}
