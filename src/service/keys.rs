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

use std::collections::{HashMap, HashSet};

use crate::hsm::{Hsm, HsmError, HsmExecutor, HsmKey, HsmOp};
use crate::ledger::checkpoint::AUDIT_KEY;
use crate::ledger::events::{KeyGenerated, created};
use crate::ledger::registry::{self, KeyState, RegisteredKey};
use crate::ledger::{Ledger, LedgerError};
use crate::types::KeyName;

use super::Operations;
use super::shared::{Keys, RetiringKeys};

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
    /// The key registry knows the name already.
    #[error(
        "a key named {name:?} is registered already (version {version}); make a new key for it with `keyward key rotate {name}`, or choose another name"
    )]
    Registered {
        /// The name.
        name: String,
        /// Its latest version.
        version: u32,
    },
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
            KeyCreateError::Exists(_) | KeyCreateError::Registered { .. } => "key_exists",
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
    /// non-extractable), records `key_generated` and registers it as
    /// version 1 before returning. A policy may name it after the next
    /// reload. A name the key registry knows (even retired) is refused:
    /// a new key for it is made by `keyward key rotate`.
    pub async fn create_key(&self, name: &str, by: &str) -> Result<CreatedKey, KeyCreateError> {
        let name = new_key_name(name)?;
        let core = &self.core;
        // One key change at a time, and never during a reload: the HSM's
        // "does it exist" and "generate" are two calls.
        let _one_at_a_time = core.reload_lock.lock().await;
        let reader = core.ledger.reader().map_err(KeyCreateError::Ledger)?;
        let known = registry::latest_version(&reader, name.as_str())
            .map_err(|e| KeyCreateError::Ledger(e.into()))?;
        drop(reader);
        if known > 0 {
            return Err(KeyCreateError::Registered {
                name: name.to_string(),
                version: known,
            });
        }
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
        generated.version = Some(1);
        let backend = core.hsm.backend().to_owned();
        let registered = key.clone();
        let ledger_seq = core
            .ledger
            .write(move |txn| {
                let entry = txn.record(None, None, &generated)?;
                let now = txn.now_ms();
                registry::insert(
                    txn.conn(),
                    &version_one(&registered, &backend, now, entry.seq.0),
                )?;
                Ok(entry.seq.0)
            })
            .await
            .map_err(|e| {
                tracing::error!(key = %key.name, error = %e, "key generated but not recorded; it is recorded at the next start");
                KeyCreateError::Ledger(e)
            })?;
        tracing::warn!(key = %key.name, public_key = %key.public_key, by, ledger_seq, "signing key created");
        Ok(CreatedKey { key, ledger_seq })
    }
}

/// The registry row of a key registered as version 1 of its own name
/// (labelled with the name).
fn version_one(key: &HsmKey, backend: &str, now_ms: i64, seq: u64) -> RegisteredKey {
    RegisteredKey {
        name: key.name.to_string(),
        version: 1,
        backend: backend.to_owned(),
        hsm_label: key.name.to_string(),
        public_key: key.public_key.to_base58(),
        state: KeyState::Active,
        created_ms: now_ms,
        rotated_ms: None,
        retire_after_ms: None,
        retired_ms: None,
        seq,
    }
}

/// Finds version `reg` of a key in the HSM by its registered label and
/// checks that the HSM's public key is the registered one; the key comes
/// back under its name (`hot`, whatever its label), which is what the
/// ledger records for its signatures.
pub fn find_registered(hsm: &dyn Hsm, reg: &RegisteredKey) -> Result<HsmKey, HsmError> {
    let label = KeyName::new(&reg.hsm_label).map_err(|e| HsmError::Device {
        op: "find",
        detail: format!("registered label of {}: {e}", reg.versioned_name()),
    })?;
    let mut key = hsm.find_ed25519(&label)?;
    if key.public_key.to_base58() != reg.public_key {
        return Err(HsmError::KeyMismatch {
            key: reg.versioned_name(),
            detail: format!(
                "(label {:?}) has public key {}, but the ledger's key registry records {}",
                reg.hsm_label, key.public_key, reg.public_key
            ),
        });
    }
    key.name = KeyName::new(&reg.name).map_err(|e| HsmError::Device {
        op: "find",
        detail: format!("registered name {:?}: {e}", reg.name),
    })?;
    Ok(key)
}

/// Finds the key that serves `name` now: its active registered version
/// (checked against the registry's public key), or, for a name the
/// registry does not know yet (a key made before versions existed, or
/// offline), the key labelled with the name.
pub fn find_serving(
    hsm: &dyn Hsm,
    conn: &rusqlite::Connection,
    name: &KeyName,
) -> Result<HsmKey, HsmError> {
    let unreadable = |e: rusqlite::Error| HsmError::Device {
        op: "find",
        detail: format!("cannot read the key registry: {e}"),
    };
    let active = registry::active(conn, name.as_str()).map_err(unreadable)?;
    let known = registry::latest_version(conn, name.as_str()).map_err(unreadable)? > 0;
    find_for(hsm, name, active.as_ref(), known)
}

/// Finds `name` as the registry says: its `active` version; nothing for a
/// name the registry knows (`known`) with no active version (never a
/// fall-back to a label); the key labelled with the name for a name it
/// does not know yet.
fn find_for(
    hsm: &dyn Hsm,
    name: &KeyName,
    active: Option<&RegisteredKey>,
    known: bool,
) -> Result<HsmKey, HsmError> {
    match active {
        Some(reg) => find_registered(hsm, reg),
        None if known => Err(HsmError::KeyNotFound(name.to_string())),
        None => hsm.find_ed25519(name),
    }
}

/// At start: the keys the policy names, each found through the registry
/// ([`find_serving`]), and every retiring version still in the HSM (for
/// their sweeps; one that cannot be found is logged and left out).
pub async fn resolve(
    ledger: &Ledger,
    hsm: &HsmExecutor,
    names: Vec<KeyName>,
) -> Result<(Keys, RetiringKeys, Vec<(KeyName, HsmError)>), LedgerError> {
    let reader = ledger.reader()?;
    let registered = registry::all(&reader)?;
    drop(reader);
    let mut keys = Keys::new();
    let mut missing = Vec::new();
    for name in names {
        let versions: Vec<&RegisteredKey> = registered
            .iter()
            .filter(|r| r.name == name.as_str())
            .collect();
        let known = !versions.is_empty();
        let active = versions
            .into_iter()
            .find(|r| r.state == KeyState::Active)
            .cloned();
        let wanted = name.clone();
        let found = hsm
            .call(HsmOp::Find, move |h| {
                find_for(h, &wanted, active.as_ref(), known)
            })
            .await;
        match found {
            Ok(key) => {
                keys.insert(name, key);
            }
            Err(e) => missing.push((name, e)),
        }
    }
    let mut retiring = RetiringKeys::new();
    for reg in registered
        .into_iter()
        .filter(|r| r.state == KeyState::Retiring)
    {
        let Ok(name) = KeyName::new(&reg.name) else {
            continue;
        };
        let version = reg.version;
        let what = reg.versioned_name();
        match hsm
            .call(HsmOp::Find, move |h| find_registered(h, &reg))
            .await
        {
            Ok(key) => {
                retiring.insert((name, version), key);
            }
            Err(e) => {
                tracing::warn!(key = %what, error = %e, "a retiring key cannot be found in the HSM: it cannot sign its sweep");
            }
        }
    }
    Ok((keys, retiring, missing))
}

/// At start: records `key_generated` (`created: "offline"`) for every
/// Ed25519 key in the HSM that no `key_generated` entry names with its
/// public key, and registers every signing key the registry does not know
/// as version 1 of its name, in one transaction with the checks. The audit
/// key is recorded as such, with `pinned_in` when it is pinned, and never
/// registered. Labels in keyward's reserved namespace that the registry
/// does not know (a successor whose rotation was interrupted before it was
/// recorded) are logged and left alone. Returns the keys recorded. A
/// token whose keys cannot be listed (for example one holding a key
/// keyward refuses) is logged and skipped: those keys are recorded at a
/// later start.
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
    let (backend, token) = (hsm.backend().to_owned(), token_label.to_owned());
    let recorded = ledger
        .write(move |txn| {
            let seen: HashMap<(String, String), u64> = crate::ledger::generated_keys(txn.conn())?
                .into_iter()
                .collect();
            let registered = registry::all(txn.conn())?;
            let labels: HashSet<&str> = registered
                .iter()
                .filter(|r| r.state != KeyState::Retired)
                .map(|r| r.hsm_label.as_str())
                .collect();
            let names: HashSet<&str> = registered.iter().map(|r| r.name.as_str()).collect();
            let mut recorded = Vec::new();
            let mut register = Vec::new();
            for key in keys {
                let label = key.name.as_str();
                if labels.contains(label) {
                    continue;
                }
                let pk = key.public_key.to_base58();
                let audit = label == AUDIT_KEY;
                if !audit && label.starts_with(RESERVED_PREFIX) {
                    tracing::warn!(label, public_key = %pk, "an HSM key in keyward's namespace is not in the key registry (a rotation interrupted before it was recorded?); it is not used");
                    continue;
                }
                if !audit && names.contains(label) {
                    tracing::warn!(key = label, public_key = %pk, "an HSM key carries the name of a registered key but is not a registered version; it is not used");
                    continue;
                }
                let seq = match seen.get(&(label.to_owned(), pk)) {
                    Some(seq) => *seq,
                    None => {
                        let mut generated = if audit {
                            KeyGenerated::audit_key(
                                AUDIT_KEY,
                                &key.public_key,
                                audit_pinned_in.clone(),
                            )
                        } else {
                            let mut g = KeyGenerated::signing_key(
                                label,
                                &key.public_key,
                                &backend,
                                Some(&token),
                            );
                            g.version = Some(1);
                            g
                        };
                        generated.created = Some(created::OFFLINE.to_owned());
                        recorded.push(key.clone());
                        txn.record(None, None, &generated)?.seq.0
                    }
                };
                if !audit {
                    register.push((key, seq));
                }
            }
            let now = txn.now_ms();
            for (key, seq) in register {
                registry::insert(txn.conn(), &version_one(&key, &backend, now, seq))?;
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
