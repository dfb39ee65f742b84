//! Signing keys made inside the HSM, an operator action, each recorded in
//! the ledger as `key_generated` exactly once:
//!
//! - while keywardd runs, `keyward key create NAME` asks it through the
//!   admin socket ([`Operations::create_key`]): the key is generated through
//!   the HSM executor and recorded before the answer;
//! - before the first start (or while keywardd is stopped), `keyward setup`
//!   and `keyward key create` open the HSM themselves and never touch the
//!   ledger (root must not create or own ledger files); keywardd records
//!   every HSM key the ledger has not seen at its next start
//!   ([`record_offline_keys`]), marked `created: "offline"`. The check and
//!   the record are one ledger transaction, so a key is recorded once
//!   however often keywardd restarts.

use std::collections::HashSet;

use crate::hsm::{HsmError, HsmExecutor, HsmKey, HsmOp};
use crate::ledger::checkpoint::AUDIT_KEY;
use crate::ledger::events::{KeyGenerated, created};
use crate::ledger::{Ledger, LedgerError};
use crate::types::KeyName;

use super::Operations;

/// Prefix of the names keyward keeps for its own HSM objects (the audit
/// key, approver keys, the checkpoint mark).
pub const RESERVED_PREFIX: &str = "keyward-";

/// Why a key was not created. Nothing was recorded; only
/// [`KeyCreateError::Ledger`] can leave a key in the HSM (recorded at the
/// next start).
#[derive(Debug, thiserror::Error)]
pub enum KeyCreateError {
    /// Not a key name.
    #[error("{0}")]
    InvalidName(String),
    /// A name keyward keeps for itself.
    #[error(
        "the name {0:?} is reserved for keyward's own keys (names starting with \"{RESERVED_PREFIX}\"); choose another"
    )]
    Reserved(String),
    /// The HSM already holds a key of this name.
    #[error("a key named {0:?} exists already in the HSM; choose another name")]
    Exists(String),
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(HsmError),
    /// The key was made but could not be recorded.
    #[error(
        "the key was generated but the ledger cannot record it now ({0}); keywardd records it at its next start"
    )]
    Ledger(LedgerError),
}

impl KeyCreateError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            KeyCreateError::InvalidName(_) => "invalid_key_name",
            KeyCreateError::Reserved(_) => "key_name_reserved",
            KeyCreateError::Exists(_) => "key_exists",
            KeyCreateError::Hsm(e) => e.code(),
            KeyCreateError::Ledger(_) => keyward_client::wire::codes::AUDIT_UNAVAILABLE,
        }
    }
}

impl From<HsmError> for KeyCreateError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::KeyExists(name) => KeyCreateError::Exists(name),
            other => KeyCreateError::Hsm(other),
        }
    }
}

/// The name of a new signing key: a [`KeyName`] that keyward does not keep
/// for itself.
pub fn new_key_name(name: &str) -> Result<KeyName, KeyCreateError> {
    let key = KeyName::new(name).map_err(|e| KeyCreateError::InvalidName(e.to_string()))?;
    if name == AUDIT_KEY || name.starts_with(RESERVED_PREFIX) {
        return Err(KeyCreateError::Reserved(name.to_owned()));
    }
    Ok(key)
}

/// A key made by [`Operations::create_key`].
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The key.
    pub key: HsmKey,
    /// Sequence number of its `key_generated` entry.
    pub ledger_seq: u64,
}

impl Operations {
    /// Generates the Ed25519 signing key `name` inside the HSM (sensitive,
    /// non-extractable) and records `key_generated` before returning. A
    /// policy may name it after the next reload.
    pub async fn create_key(&self, name: &str, by: &str) -> Result<CreatedKey, KeyCreateError> {
        let name = new_key_name(name)?;
        let core = &self.core;
        // One key change at a time, and never during a reload: the HSM's
        // "does it exist" and "generate" are two calls.
        let _one_at_a_time = core.reload_lock.lock().await;
        let key = core
            .hsm
            .call(HsmOp::Generate, move |hsm| hsm.generate_ed25519(&name))
            .await?;
        let mut generated = KeyGenerated::signing_key(
            key.name.as_str(),
            &key.public_key,
            core.hsm.backend(),
            core.device_label(),
        );
        generated.created = Some(created::ADMIN_SOCKET.to_owned());
        generated.by = Some(by.to_owned());
        let ledger_seq = core
            .ledger
            .write(move |txn| Ok(txn.record(None, None, &generated)?.seq.0))
            .await
            .map_err(|e| {
                tracing::error!(key = %key.name, error = %e, "key generated but not recorded; it is recorded at the next start");
                KeyCreateError::Ledger(e)
            })?;
        tracing::warn!(key = %key.name, public_key = %key.public_key, by, ledger_seq, "signing key created");
        Ok(CreatedKey { key, ledger_seq })
    }
}

/// At start: records `key_generated` (`created: "offline"`) for every
/// Ed25519 key in the HSM that no `key_generated` entry names with its
/// public key, in one transaction with the check. The audit key is
/// recorded as such, with `pinned_in` when it is pinned. Returns the keys
/// recorded. A token whose keys cannot be listed (for example one holding
/// a key keyward refuses) is logged and skipped: those keys are recorded at
/// a later start.
pub async fn record_offline_keys(
    ledger: &Ledger,
    hsm: &HsmExecutor,
    token_label: &str,
    audit_pinned_in: Option<String>,
) -> Result<Vec<HsmKey>, LedgerError> {
    let keys = match hsm.call(HsmOp::List, |h| h.list_ed25519()).await {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the HSM's keys; keys made offline are recorded at a later start");
            return Ok(Vec::new());
        }
    };
    let (backend, label) = (hsm.backend().to_owned(), token_label.to_owned());
    let recorded = ledger
        .write(move |txn| {
            let seen: HashSet<(String, String)> = crate::ledger::generated_keys(txn.conn())?
                .into_iter()
                .collect();
            let mut recorded = Vec::new();
            for key in keys {
                let pk = key.public_key.to_base58();
                if seen.contains(&(key.name.to_string(), pk)) {
                    continue;
                }
                let mut generated = if key.name.as_str() == AUDIT_KEY {
                    KeyGenerated::audit_key(AUDIT_KEY, &key.public_key, audit_pinned_in.clone())
                } else {
                    KeyGenerated::signing_key(
                        key.name.as_str(),
                        &key.public_key,
                        &backend,
                        Some(&label),
                    )
                };
                generated.created = Some(created::OFFLINE.to_owned());
                txn.record(None, None, &generated)?;
                recorded.push(key);
            }
            Ok(recorded)
        })
        .await?;
    for key in &recorded {
        tracing::info!(key = %key.name, public_key = %key.public_key, "recorded a key created offline");
    }
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_name_is_a_key_name_keyward_does_not_keep_for_itself() {
        assert_eq!(new_key_name("hot").unwrap().as_str(), "hot");
        assert_eq!(new_key_name("cold-2.b_x").unwrap().as_str(), "cold-2.b_x");
        for (name, code) in [
            ("", "invalid_key_name"),
            ("a b", "invalid_key_name"),
            (&"k".repeat(65), "invalid_key_name"),
            (AUDIT_KEY, "key_name_reserved"),
            ("keyward-checkpoint-mark", "key_name_reserved"),
            ("keyward-", "key_name_reserved"),
        ] {
            assert_eq!(new_key_name(name).unwrap_err().code(), code, "{name:?}");
        }
        // Only the prefix is reserved.
        assert!(new_key_name("keyward").is_ok());
        assert!(new_key_name("my-keyward-key").is_ok());
    }

    #[test]
    fn an_existing_key_in_the_hsm_is_key_exists() {
        let e: KeyCreateError = HsmError::KeyExists("hot".into()).into();
        assert_eq!(e.code(), "key_exists");
        let e: KeyCreateError = HsmError::KeyNotFound("hot".into()).into();
        assert_eq!(e.code(), "key_not_found");
    }
}
