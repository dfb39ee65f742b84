//! Key rotation and retirement, operator actions recorded in the ledger.
//!
//! `keyward key rotate NAME` ([`Operations::rotate_key`]) generates the
//! successor inside the HSM under a label in keyward's reserved namespace,
//! has both keys sign a transition statement ([`statement`]), and in one
//! ledger transaction records `key_generated` and `key_rotated`, registers
//! the successor as the name's active version and moves the old version to
//! `retiring`. From that commit on the name is served by the new key, so
//! agents keep using the same name; the old key signs nothing but the
//! sweep of its balances (see [`super::sweep`]).
//!
//! `keyward key retire NAME@VERSION` ([`Operations::retire_key`]) destroys a
//! retiring version in the HSM once its grace period is over (or earlier
//! with `force` and a reason) and records `key_retired`. The HSM's copy is
//! destroyed first, then the record is written: a key the ledger calls
//! retired is never still in the HSM, and a retirement interrupted between
//! the two is finished by running the command again.

pub use crate::ledger::registry::{STATEMENT_HEADER, statement, verify_rotation};

use super::Operations;
use crate::hsm::{HsmError, HsmKey, HsmOp};
use crate::ledger::LedgerError;
use crate::ledger::events::{KeyGenerated, KeyRetired, KeyRotated, created};
use crate::ledger::registry::{self, KeyState, RegisteredKey};
use crate::types::KeyName;

/// Longest reason accepted, in bytes.
pub const MAX_REASON: usize = 200;

/// Default grace period of a retiring key: 7 days.
pub const DEFAULT_GRACE_S: u64 = 7 * 24 * 3600;

/// Longest grace period accepted: 366 days.
pub const MAX_GRACE_S: u64 = 366 * 24 * 3600;

/// Why a rotation or a retirement was refused or failed. Nothing was
/// recorded unless the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The registry has no such key (or version).
    #[error("{0}")]
    UnknownKey(String),
    /// The request is malformed (reason, grace, version).
    #[error("{0}")]
    Invalid(String),
    /// The version is not in the state the action needs.
    #[error("{0}")]
    WrongState(String),
    /// `key retire` before the grace period ended, without `--force`.
    #[error(
        "{key} is in its grace period until {until}; retire it then, or now with --force and a reason"
    )]
    GracePeriod {
        /// `name@version`.
        key: String,
        /// End of the grace period (UTC).
        until: String,
    },
    /// The HSM failed; nothing was recorded.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The ledger failed; see the message for what the HSM holds.
    #[error("{0}")]
    Ledger(LedgerError),
}

impl RotateError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            RotateError::UnknownKey(_) => "unknown_key",
            RotateError::Invalid(_) => "invalid_request",
            RotateError::WrongState(_) => "key_state",
            RotateError::GracePeriod { .. } => "key_in_grace_period",
            RotateError::Hsm(e) => e.code(),
            RotateError::Ledger(_) => keyward_client::wire::codes::AUDIT_UNAVAILABLE,
        }
    }
}

impl From<LedgerError> for RotateError {
    fn from(e: LedgerError) -> Self {
        RotateError::Ledger(e)
    }
}

impl From<rusqlite::Error> for RotateError {
    fn from(e: rusqlite::Error) -> Self {
        RotateError::Ledger(e.into())
    }
}

/// A rotation done by [`Operations::rotate_key`].
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The key's name.
    pub name: String,
    /// The version rotated out (now retiring).
    pub old_version: u32,
    /// The successor's version (now active).
    pub new_version: u32,
    /// The retiring key.
    pub old_key: HsmKey,
    /// The successor.
    pub new_key: HsmKey,
    /// The transition statement both keys signed.
    pub statement: String,
    /// The old key's signature over it.
    pub old_signature: [u8; 64],
    /// The new key's signature over it.
    pub new_signature: [u8; 64],
    /// End of the old key's grace period (Unix ms).
    pub retire_after_ms: i64,
    /// Sequence of the `key_rotated` entry.
    pub ledger_seq: u64,
}

/// A retirement done by [`Operations::retire_key`].
#[derive(Debug, Clone)]
pub struct Retired {
    /// `name@version`.
    pub key: String,
    /// Its public key (base58).
    pub public_key: String,
    /// Whether it was retired within its grace period.
    pub forced: bool,
    /// Sequence of the `key_retired` entry.
    pub ledger_seq: u64,
}

/// A reason operators give: 1 to [`MAX_REASON`] bytes, one line of
/// printable text.
pub fn check_reason(reason: &str) -> Result<&str, RotateError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(RotateError::Invalid("a reason is required".into()));
    }
    if reason.len() > MAX_REASON {
        return Err(RotateError::Invalid(format!(
            "the reason is longer than {MAX_REASON} bytes"
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(RotateError::Invalid(
            "the reason must be one line of printable text".into(),
        ));
    }
    Ok(reason)
}

/// Parses `NAME@VERSION`.
pub fn parse_versioned(s: &str) -> Result<(KeyName, u32), RotateError> {
    let bad = || RotateError::Invalid(format!("{s:?} is not NAME@VERSION (e.g. hot@1)"));
    let (name, version) = s.rsplit_once('@').ok_or_else(bad)?;
    let name = KeyName::new(name).map_err(|e| RotateError::Invalid(e.to_string()))?;
    let version: u32 = version.parse().map_err(|_| bad())?;
    if version == 0 {
        return Err(bad());
    }
    Ok((name, version))
}

/// Ends every sweep of `key_ref` (`NAME@VERSION`) still waiting for
/// approvals, in the transaction that retires its key: its key is gone, so
/// no quorum can get it signed. Each is finished as expired and recorded
/// as `intent_expired` (its window ended now), as the expiry task does
/// for a window that ran out; left pending, it would break every reading
/// of the pending intents (the approval list, its figures).
fn end_orphaned_sweeps(
    txn: &mut crate::ledger::LedgerTxn<'_>,
    key_ref: &str,
    at: i64,
) -> Result<(), LedgerError> {
    let orphans: Vec<_> = crate::intents::all_pending(txn.conn(), i64::MIN)?
        .into_iter()
        .filter(|(_, _, p)| p.key == key_ref)
        .collect();
    for (agent, intent_id, p) in orphans {
        let body = crate::intents::error_reply(
            keyward_client::wire::codes::INTENT_EXPIRED,
            format!("this sweep's key {key_ref} was retired while it waited for approvals"),
        )?;
        crate::intents::finish(
            txn.conn(),
            &agent,
            &intent_id,
            crate::intents::IntentStatus::Expired,
            &body,
            at,
        )?;
        let expired = crate::ledger::events::IntentExpired {
            intent_hash: hex::encode(p.intent_hash),
            expired_at: crate::ledger::format_utc(at),
        };
        txn.record(Some(&intent_id), Some(&agent), &expired)?;
        tracing::warn!(agent = %agent, intent = %intent_id, key = key_ref, "pending sweep ended: its key was retired");
    }
    Ok(())
}

impl Operations {
    /// Rotates key `name`: see the module documentation. `grace_s` (default
    /// [`DEFAULT_GRACE_S`]) is how long the old key stays retiring before
    /// `key retire` may destroy it without `--force`.
    pub async fn rotate_key(
        &self,
        name: &str,
        reason: &str,
        grace_s: Option<u64>,
        by: &str,
    ) -> Result<Rotated, RotateError> {
        let name = KeyName::new(name).map_err(|e| RotateError::Invalid(e.to_string()))?;
        let reason = check_reason(reason)?.to_owned();
        let grace_s = grace_s.unwrap_or(DEFAULT_GRACE_S);
        if grace_s > MAX_GRACE_S {
            return Err(RotateError::Invalid(format!(
                "the grace period may be at most {MAX_GRACE_S} s (366 days)"
            )));
        }
        let core = &self.core;
        // One key change at a time, never during a reload.
        let _one_at_a_time = core.reload_lock.lock().await;
        let reader = core.ledger.reader()?;
        let old_reg = registry::active(&reader, name.as_str())?.ok_or_else(|| {
            RotateError::UnknownKey(format!(
                "the key registry has no active key named {name:?} (see `keyward key list`)"
            ))
        })?;
        let new_version = registry::latest_version(&reader, name.as_str())? + 1;
        drop(reader);
        let old_key = {
            let reg = old_reg.clone();
            core.hsm
                .call(HsmOp::Find, move |h| super::keys::find_registered(h, &reg))
                .await?
        };
        let label = registry::hsm_label(&name, new_version);
        // A successor left by a rotation interrupted before it was recorded
        // (keywardd killed between generating it and the ledger write)
        // holds the label: the registry does not know it and no recorded
        // signature was made with it, so it is destroyed and the rotation
        // goes on. Without this, every later rotation of the name failed
        // with key_exists.
        let orphan_label = label.clone();
        let orphan = core
            .hsm
            .call(HsmOp::Find, move |h| match h.find_ed25519(&orphan_label) {
                Ok(key) => Ok(Some(key)),
                Err(HsmError::KeyNotFound(_)) => Ok(None),
                Err(e) => Err(e),
            })
            .await?;
        if let Some(orphan) = orphan {
            tracing::warn!(label = %label, public_key = %orphan.public_key, "destroying an unregistered successor left by an interrupted rotation");
            core.hsm
                .call(HsmOp::DestroyKey, move |h| h.destroy_ed25519(&orphan))
                .await?;
        }
        let generated_label = label.clone();
        let mut new_key = core
            .hsm
            .call(HsmOp::Generate, move |h| {
                h.generate_ed25519(&generated_label)
            })
            .await?;
        new_key.name = name.clone();

        let now = crate::ledger::now_ms();
        let text = statement(
            name.as_str(),
            (&old_key.public_key, old_reg.version),
            (&new_key.public_key, new_version),
            &crate::ledger::format_utc(now),
            &reason,
        );
        let signed = async {
            let old_signature = core.hsm.sign_verified(&old_key, text.as_bytes()).await?;
            let new_signature = core.hsm.sign_verified(&new_key, text.as_bytes()).await?;
            Ok::<_, HsmError>((old_signature, new_signature))
        }
        .await;
        let (old_signature, new_signature) = match signed {
            Ok(s) => s,
            Err(e) => {
                self.discard_successor(&new_key, &label).await;
                return Err(e.into());
            }
        };
        let retire_after_ms = now.saturating_add(i64::try_from(grace_s * 1000).unwrap_or(i64::MAX));
        let mut generated = KeyGenerated::signing_key(
            name.as_str(),
            &new_key.public_key,
            core.hsm.backend(),
            core.device_label(),
        );
        generated.created = Some(created::ADMIN_SOCKET.to_owned());
        generated.by = Some(by.to_owned());
        generated.version = Some(new_version);
        generated.hsm_label = Some(label.to_string());
        let rotated = KeyRotated {
            key: name.to_string(),
            old_public_key: old_key.public_key.to_base58(),
            new_public_key: new_key.public_key.to_base58(),
            reason: reason.clone(),
            statement: Some(text.clone()),
            old_signature: Some(bs58::encode(old_signature).into_string()),
            new_signature: Some(bs58::encode(new_signature).into_string()),
            old_version: Some(old_reg.version),
            new_version: Some(new_version),
            new_hsm_label: Some(label.to_string()),
            retire_after_ms: Some(retire_after_ms),
            by: Some(by.to_owned()),
        };
        let new_reg = RegisteredKey {
            name: name.to_string(),
            version: new_version,
            backend: core.hsm.backend().to_owned(),
            hsm_label: label.to_string(),
            public_key: new_key.public_key.to_base58(),
            state: KeyState::Active,
            created_ms: now,
            rotated_ms: None,
            retire_after_ms: None,
            retired_ms: None,
            seq: 0,
        };
        let old_version = old_reg.version;
        let written = core
            .ledger
            .write(move |txn| {
                let entry = txn.record(None, None, &generated)?;
                let at = txn.now_ms();
                if !registry::mark_retiring(
                    txn.conn(),
                    &new_reg.name,
                    old_version,
                    at,
                    retire_after_ms,
                )? {
                    return Err(LedgerError::Corrupt(format!(
                        "{}@{old_version} is no longer the active version",
                        new_reg.name
                    )));
                }
                registry::insert(
                    txn.conn(),
                    &RegisteredKey {
                        created_ms: at,
                        seq: entry.seq.0,
                        ..new_reg
                    },
                )?;
                Ok(txn.record(None, None, &rotated)?.seq.0)
            })
            .await;
        let ledger_seq = match written {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(key = %name, error = %e, "rotation not recorded; the successor is destroyed");
                self.discard_successor(&new_key, &label).await;
                return Err(RotateError::Ledger(e));
            }
        };
        // Agents' next intents for the name are signed by the successor.
        let (serving, retiring) = (new_key.clone(), old_key.clone());
        let key_name = name.clone();
        core.update_in_force(move |f| {
            if f.keys.contains_key(&key_name) {
                let mut keys = (*f.keys).clone();
                keys.insert(key_name.clone(), serving);
                f.keys = std::sync::Arc::new(keys);
            }
            let mut r = (*f.retiring).clone();
            r.insert((key_name, old_version), retiring);
            f.retiring = std::sync::Arc::new(r);
        });
        tracing::warn!(
            key = %name,
            old_version,
            new_version,
            old_public_key = %old_key.public_key,
            new_public_key = %new_key.public_key,
            by,
            ledger_seq,
            "key rotated"
        );
        Ok(Rotated {
            name: name.to_string(),
            old_version,
            new_version,
            old_key,
            new_key,
            statement: text,
            old_signature,
            new_signature,
            retire_after_ms,
            ledger_seq,
        })
    }

    /// Destroys a successor whose rotation was not recorded (best effort:
    /// one left behind is reported at the next start and never used).
    async fn discard_successor(&self, key: &HsmKey, label: &KeyName) {
        let doomed = key.clone();
        if let Err(e) = self
            .core
            .hsm
            .call(HsmOp::DestroyKey, move |h| h.destroy_ed25519(&doomed))
            .await
        {
            tracing::error!(label = %label, error = %e, "cannot destroy the unrecorded successor key; it is never used");
        }
    }

    /// Retires version `version` of key `name`: destroys it in the HSM and
    /// records `key_retired`. Only a retiring version; before the end of its
    /// grace period only with `force` and a reason.
    pub async fn retire_key(
        &self,
        name: &str,
        version: u32,
        force: bool,
        reason: Option<&str>,
        by: &str,
    ) -> Result<Retired, RotateError> {
        let name = KeyName::new(name).map_err(|e| RotateError::Invalid(e.to_string()))?;
        let reason = reason.map(check_reason).transpose()?.map(str::to_owned);
        let core = &self.core;
        let _one_at_a_time = core.reload_lock.lock().await;
        let reader = core.ledger.reader()?;
        let reg = registry::get(&reader, name.as_str(), version)?.ok_or_else(|| {
            RotateError::UnknownKey(format!("the key registry has no {name}@{version}"))
        })?;
        // A sweep waiting for approvals would lose its key.
        let key_ref = super::sweep::sweep_key_ref(&name, version);
        let pending_sweeps: Vec<String> =
            crate::intents::all_pending(&reader, crate::ledger::now_ms())?
                .into_iter()
                .filter(|(_, _, p)| p.key == key_ref)
                .map(|(agent, id, _)| format!("{agent}/{id}"))
                .collect();
        drop(reader);
        let what = reg.versioned_name();
        match reg.state {
            KeyState::Retiring => {}
            KeyState::Active => {
                return Err(RotateError::WrongState(format!(
                    "{what} is the active version of {name}; rotate it first (`keyward key rotate {name}`)"
                )));
            }
            KeyState::Retired => {
                return Err(RotateError::WrongState(format!(
                    "{what} is retired already"
                )));
            }
        }
        let now = crate::ledger::now_ms();
        let until = reg.retire_after_ms.unwrap_or(0);
        let early = now < until;
        if early && !force {
            return Err(RotateError::GracePeriod {
                key: what,
                until: crate::ledger::format_utc(until),
            });
        }
        if early && reason.is_none() {
            return Err(RotateError::Invalid(format!(
                "retiring {what} within its grace period needs a reason (--reason)"
            )));
        }
        if !pending_sweeps.is_empty() && !force {
            return Err(RotateError::WrongState(format!(
                "{what} has a sweep waiting for approvals ({}); approve or let it expire first, or retire with --force and a reason",
                pending_sweeps.join(", ")
            )));
        }
        if !pending_sweeps.is_empty() && reason.is_none() {
            return Err(RotateError::Invalid(format!(
                "retiring {what} with a pending sweep needs a reason (--reason)"
            )));
        }
        // Destroyed first: a key the ledger calls retired is never still in
        // the HSM. Already gone (an interrupted retirement): recorded now.
        let found = {
            let reg = reg.clone();
            core.hsm
                .call(HsmOp::Find, move |h| super::keys::find_registered(h, &reg))
                .await
        };
        match found {
            Ok(key) => {
                core.hsm
                    .call(HsmOp::DestroyKey, move |h| h.destroy_ed25519(&key))
                    .await?;
            }
            Err(HsmError::KeyNotFound(_)) => {
                tracing::warn!(key = %what, "the retiring key is not in the HSM any more; recording its retirement");
            }
            Err(e) => return Err(e.into()),
        }
        let retired = KeyRetired {
            key: name.to_string(),
            version,
            public_key: reg.public_key.clone(),
            forced: early,
            reason,
            by: Some(by.to_owned()),
        };
        let key_name = name.to_string();
        let ledger_seq = core
            .ledger
            .write(move |txn| {
                let at = txn.now_ms();
                if !registry::mark_retired(txn.conn(), &key_name, version, at)? {
                    return Err(LedgerError::Corrupt(format!(
                        "{key_name}@{version} is no longer retiring"
                    )));
                }
                let seq = txn.record(None, None, &retired)?.seq.0;
                end_orphaned_sweeps(txn, &key_ref, at)?;
                Ok(seq)
            })
            .await
            .map_err(|e| {
                tracing::error!(key = %what, error = %e, "the key was destroyed but its retirement is not recorded; run `keyward key retire` again");
                RotateError::Ledger(e)
            })?;
        let key_name = name.clone();
        core.update_in_force(move |f| {
            let mut r = (*f.retiring).clone();
            r.remove(&(key_name, version));
            f.retiring = std::sync::Arc::new(r);
        });
        tracing::warn!(key = %what, forced = early, by, ledger_seq, "key retired: destroyed in the HSM");
        Ok(Retired {
            key: what,
            public_key: reg.public_key,
            forced: early,
            ledger_seq,
        })
    }

    /// Every version the key registry holds, by name then version.
    pub fn registered_keys(&self) -> Result<Vec<RegisteredKey>, LedgerError> {
        let reader = self.core.ledger.reader()?;
        Ok(registry::all(&reader)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::PublicKey;

    fn signing_key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn rotation(old: &ed25519_dalek::SigningKey, new: &ed25519_dalek::SigningKey) -> KeyRotated {
        use ed25519_dalek::Signer as _;
        let (opk, npk) = (
            PublicKey(old.verifying_key().to_bytes()),
            PublicKey(new.verifying_key().to_bytes()),
        );
        let text = statement(
            "hot",
            (&opk, 1),
            (&npk, 2),
            "2026-12-03T00:00:00Z",
            "quarterly",
        );
        KeyRotated {
            key: "hot".into(),
            old_public_key: opk.to_base58(),
            new_public_key: npk.to_base58(),
            reason: "quarterly".into(),
            old_signature: Some(bs58::encode(old.sign(text.as_bytes()).to_bytes()).into_string()),
            new_signature: Some(bs58::encode(new.sign(text.as_bytes()).to_bytes()).into_string()),
            statement: Some(text),
            old_version: Some(1),
            new_version: Some(2),
            new_hsm_label: None,
            retire_after_ms: None,
            by: None,
        }
    }

    #[test]
    fn a_rotation_verifies_with_both_keys_and_any_change_breaks_it() {
        let (a, b, c) = (signing_key(1), signing_key(2), signing_key(3));
        let good = rotation(&a, &b);
        verify_rotation(&good).unwrap();
        let mut swapped = good.clone();
        std::mem::swap(&mut swapped.old_signature, &mut swapped.new_signature);
        assert!(verify_rotation(&swapped).is_err());
        let mut other = good.clone();
        other.new_public_key = PublicKey(c.verifying_key().to_bytes()).to_base58();
        assert!(
            verify_rotation(&other).is_err(),
            "statement names another key"
        );
        let mut edited = good.clone();
        edited.statement = Some(
            good.statement
                .clone()
                .unwrap()
                .replace("quarterly", "other"),
        );
        assert!(verify_rotation(&edited).is_err());
        let mut unsigned = good.clone();
        unsigned.new_signature = None;
        assert!(verify_rotation(&unsigned).is_err());
        let mut renamed = good;
        renamed.key = "cold".into();
        assert!(verify_rotation(&renamed).is_err());
    }

    #[test]
    fn a_statement_is_never_a_solana_message() {
        let (a, b) = (signing_key(1), signing_key(2));
        let text = rotation(&a, &b).statement.unwrap();
        assert!(text.len() < 1232);
        assert!(crate::solana::decode_message(text.as_bytes()).is_err());
        let long = statement(
            &"k".repeat(64),
            (&PublicKey([255; 32]), u32::MAX),
            (&PublicKey([255; 32]), u32::MAX),
            "2026-12-03T00:00:00Z",
            &"r".repeat(MAX_REASON),
        );
        assert!(
            long.len() < 3808,
            "shorter than the account list its header asks for"
        );
        assert!(crate::solana::decode_message(long.as_bytes()).is_err());
    }

    #[test]
    fn reasons_and_versioned_names_are_checked() {
        assert_eq!(check_reason("  quarterly  ").unwrap(), "quarterly");
        for bad in ["", "   ", "two\nlines", &"x".repeat(MAX_REASON + 1)] {
            assert_eq!(check_reason(bad).unwrap_err().code(), "invalid_request");
        }
        assert_eq!(parse_versioned("hot@2").unwrap().1, 2);
        assert_eq!(
            parse_versioned("a@b@3").unwrap_err().code(),
            "invalid_request"
        );
        for bad in ["hot", "hot@", "hot@0", "hot@-1", "@1", "hot@x"] {
            assert!(parse_versioned(bad).is_err(), "{bad}");
        }
    }
}
