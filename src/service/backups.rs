//! The audit key's signature over a backup's manifest
//! (`POST /v1/admin/backups/sign`).
//!
//! keywardd never signs operator-chosen bytes with the audit key: it signs
//! only [`crate::ops::backup::signed_message`] of a 32-byte manifest digest
//! (domain-separated, so it cannot pass for a checkpoint note), and only
//! when the ledger head the backup claims to cover is an entry of its own
//! ledger. Like a transaction signature, the signature is verified in
//! software and released only after its `backup_created` entry commits.

use rusqlite::OptionalExtension;

use super::Operations;
use crate::hsm::HsmError;
use crate::ledger::LedgerError;
use crate::ledger::events::BackupCreated;

/// What a backup's manifest signature is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSignRequest {
    /// SHA-256 of the manifest's bytes.
    pub manifest_sha256: [u8; 32],
    /// The ledger head the backup covers: its sequence number ...
    pub ledger_seq: u64,
    /// ... and that entry's hash.
    pub ledger_hash: [u8; 32],
    /// Files the manifest lists.
    pub files: u64,
}

/// A manifest signature, released after its `backup_created` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSignature {
    /// The audit key's Ed25519 signature over the domain-separated digest.
    pub signature: [u8; 64],
    /// The audit key's verifier key.
    pub verifier_key: String,
    /// Sequence number of the `backup_created` entry.
    pub ledger_seq: u64,
}

/// Why a manifest was not signed.
#[derive(Debug, thiserror::Error)]
pub enum BackupSignError {
    /// The claimed head is not an entry of this ledger (wrong sequence
    /// number, or another hash there).
    #[error(
        "ledger entry {seq} with hash {hash} is not in this daemon's ledger; a backup must cover a head of this instance's own history"
    )]
    UnknownHead {
        /// The claimed sequence number.
        seq: u64,
        /// The claimed hash (hex).
        hash: String,
    },
    /// The history failed verification: nothing is signed.
    #[error("the audit history is broken ({0}); nothing is signed")]
    HistoryBroken(String),
    /// The daemon runs without an audit key (never in production).
    #[error("this daemon has no audit key")]
    NoAuditKey,
    /// The HSM could not sign.
    #[error("the HSM could not sign: {0}")]
    Hsm(#[source] HsmError),
    /// The ledger could not be read or could not record.
    #[error("the audit ledger: {0}")]
    Ledger(#[source] LedgerError),
}

impl BackupSignError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            BackupSignError::UnknownHead { .. } => "backup_head_unknown",
            BackupSignError::HistoryBroken(_) => "history_broken",
            BackupSignError::NoAuditKey => "no_audit_key",
            BackupSignError::Hsm(e) => e.code(),
            BackupSignError::Ledger(_) => "audit_unavailable",
        }
    }
}

impl Operations {
    /// Signs a backup's manifest digest with the audit key once `req`'s
    /// ledger head is found in this ledger, and records `backup_created`
    /// (by `by`) before it returns the signature.
    pub async fn sign_backup(
        &self,
        req: BackupSignRequest,
        by: &str,
    ) -> Result<BackupSignature, BackupSignError> {
        let core = &self.core;
        core.history_gate()
            .check()
            .map_err(BackupSignError::HistoryBroken)?;
        let key = core.audit_key().ok_or(BackupSignError::NoAuditKey)?.clone();
        let reader = core.ledger.reader().map_err(BackupSignError::Ledger)?;
        let stored: Option<Vec<u8>> = i64::try_from(req.ledger_seq)
            .ok()
            .map(|seq| {
                reader
                    .query_row("SELECT hash FROM ledger WHERE seq = ?1", [seq], |r| {
                        r.get(0)
                    })
                    .optional()
            })
            .transpose()
            .map_err(|e| BackupSignError::Ledger(LedgerError::Sqlite(e)))?
            .flatten();
        drop(reader);
        let found = stored.is_some_and(|h| {
            use subtle::ConstantTimeEq as _;
            h.len() == 32 && bool::from(h.as_slice().ct_eq(&req.ledger_hash))
        });
        if !found {
            return Err(BackupSignError::UnknownHead {
                seq: req.ledger_seq,
                hash: hex::encode(req.ledger_hash),
            });
        }
        let message = crate::ops::backup::signed_message(&req.manifest_sha256);
        let signature = core
            .hsm
            .sign_verified(&key, &message)
            .await
            .map_err(BackupSignError::Hsm)?;
        let created = BackupCreated {
            manifest_sha256: hex::encode(req.manifest_sha256),
            ledger_seq: req.ledger_seq,
            ledger_hash: hex::encode(req.ledger_hash),
            files: req.files,
            by: Some(by.to_owned()),
        };
        let seq = core
            .ledger
            .write(move |txn| Ok(txn.record(None, None, &created)?.seq.0))
            .await
            .map_err(BackupSignError::Ledger)?;
        tracing::warn!(
            by,
            backup_created = seq,
            head = req.ledger_seq,
            "backup manifest signed by the audit key"
        );
        Ok(BackupSignature {
            signature,
            verifier_key: crate::ledger::checkpoint::verifier_key(
                crate::ledger::checkpoint::AUDIT_KEY,
                &key.public_key,
            ),
            ledger_seq: seq,
        })
    }
}
