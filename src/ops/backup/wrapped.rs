//! A YubiHSM 2's key material in a backup: every object keyward needs to
//! rebuild the instance, exported under the device's wrap key
//! (`keyward hsm setup yubihsm --backups` makes wrap key 0x0010) through a
//! session of the operator's admin authentication key, never keywardd's.
//!
//! Each object is one file `hsm/TYPE-ID.wrap` (`TYPE` is `asymmetric-key`,
//! `hmac-key` or `opaque`, `ID` four hex digits) holding the device's
//! answer to Export Wrapped: the 13-byte nonce, then the AES-CCM
//! ciphertext. Without the wrap key, which only a YubiHSM 2 provisioned
//! with it holds, the files are useless; with it they still cannot sign
//! without a device and an authentication key's password.
//!
//! Exported: the Ed25519 keys the key registry names (every version not
//! retired), the audit key, and every HMAC key (approvers) and opaque
//! object (name records, the checkpoint mark) in keyward's domains. An
//! object without the capability `exportable-under-wrap` cannot be
//! exported: the backup is refused and names it.

use std::path::Path;

use yubihsm::object::{self, Filter};
use yubihsm::{Capability, Client, Credentials};

use super::BackupError;
use super::create::{mkdirs, write_new};
use crate::config::YubiHsmBackendConfig;
use crate::hsm::yubihsm::{connector_for, credentials, domain_set, names};

/// The directory of the wrapped objects inside a backup.
pub const WRAPPED_DIR: &str = "hsm";

/// The wrap key `keyward hsm setup yubihsm --backups` creates.
pub const DEFAULT_WRAP_KEY: u16 = 0x0010;

/// The audit key's name (its device label).
const AUDIT_KEY: &str = crate::ledger::checkpoint::AUDIT_KEY;

/// A session of the admin authentication key on one device.
pub struct AdminSession {
    client: Client,
    device: String,
}

impl std::fmt::Debug for AdminSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSession")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

fn device_err(device: &str, what: String, e: &yubihsm::client::Error) -> BackupError {
    BackupError::Device(format!("{device}: {what}: {e}"))
}

impl AdminSession {
    /// Opens a session on the device `cfg` names with the credential in
    /// `admin_credential` (`AUTH_KEY_ID:PASSWORD`, read like keywardd's and
    /// never shown). `connector` overrides the configuration's (a
    /// replacement device).
    pub fn open(
        cfg: &YubiHsmBackendConfig,
        connector: Option<&crate::config::YubiHsmConnector>,
        admin_credential: &Path,
    ) -> Result<AdminSession, BackupError> {
        let (_, creds): (u16, Credentials) = credentials::read_credentials(admin_credential)
            .map_err(|e| BackupError::Device(format!("admin credential: {e}")))?;
        let target = connector.unwrap_or(&cfg.connector);
        let device = target.to_string();
        let conn = connector_for(target, cfg.timeout_ms)
            .map_err(|e| BackupError::Device(e.to_string()))?;
        let client = Client::open(conn, creds, true).map_err(|e| {
            device_err(
                &device,
                "cannot open a session with the admin credential".into(),
                &e,
            )
        })?;
        Ok(AdminSession { client, device })
    }

    fn list(&self, filters: &[Filter]) -> Result<Vec<u16>, BackupError> {
        self.client
            .list_objects(filters)
            .map(|v| v.into_iter().map(|e| e.object_id).collect())
            .map_err(|e| device_err(&self.device, "cannot list objects".into(), &e))
    }

    /// Whether an object of `t` with `id` exists.
    fn exists(&self, t: object::Type, id: u16) -> Result<bool, BackupError> {
        Ok(!self.list(&[Filter::Type(t), Filter::Id(id)])?.is_empty())
    }

    /// The public key of the Ed25519 key labelled for `name`.
    fn ed25519_public(&self, name: &str) -> Result<Option<[u8; 32]>, BackupError> {
        let ids = self.ed25519_ids(name)?;
        let Some(id) = ids.first() else {
            return Ok(None);
        };
        let pk = self
            .client
            .get_public_key(*id)
            .map_err(|e| device_err(&self.device, format!("cannot read key {name:?}"), &e))?;
        Ok(<[u8; 32]>::try_from(pk.as_ref()).ok())
    }

    fn ed25519_ids(&self, name: &str) -> Result<Vec<u16>, BackupError> {
        let label = object::Label::from_bytes(names::device_label(name).as_bytes())
            .map_err(|e| BackupError::Device(format!("label of {name:?}: {e}")))?;
        self.list(&[
            Filter::Type(object::Type::AsymmetricKey),
            Filter::Label(label),
            Filter::Algorithm(yubihsm::Algorithm::Asymmetric(
                yubihsm::asymmetric::Algorithm::Ed25519,
            )),
        ])
    }
}

/// One object to export: its type, id and what to call it in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    object_type: object::Type,
    id: u16,
    what: String,
}

fn type_name(t: object::Type) -> Option<&'static str> {
    match t {
        object::Type::AsymmetricKey => Some("asymmetric-key"),
        object::Type::HmacKey => Some("hmac-key"),
        object::Type::Opaque => Some("opaque"),
        _ => None,
    }
}

/// The backup-relative path of the wrapped object `t`/`id`.
pub fn wrapped_path(t: object::Type, id: u16) -> Option<String> {
    type_name(t).map(|n| format!("{WRAPPED_DIR}/{n}-{id:04x}.wrap"))
}

/// The object a wrapped file's path names.
fn parse_wrapped_path(path: &str) -> Option<(object::Type, u16)> {
    let stem = path
        .strip_prefix(&format!("{WRAPPED_DIR}/"))?
        .strip_suffix(".wrap")?;
    let (t, id) = stem.rsplit_once('-')?;
    let t = [
        object::Type::AsymmetricKey,
        object::Type::HmacKey,
        object::Type::Opaque,
    ]
    .into_iter()
    .find(|ty| type_name(*ty) == Some(t))?;
    if id.len() != 4 {
        return None;
    }
    Some((t, u16::from_str_radix(id, 16).ok()?))
}

/// Exports, under wrap key `wrap_key`, the audit key, the Ed25519 keys
/// labelled `key_labels` (the registry's versions not retired) and every
/// HMAC key and opaque object in keyward's domains, into `root/hsm/`.
/// Returns the written paths, relative to `root`, sorted.
pub fn export(
    admin: &AdminSession,
    cfg: &YubiHsmBackendConfig,
    wrap_key: u16,
    key_labels: &[String],
    root: &Path,
) -> Result<Vec<String>, BackupError> {
    let domains = domain_set(&cfg.domains).map_err(|e| BackupError::Device(e.to_string()))?;
    let mut wanted = Vec::new();
    let mut labels: Vec<&str> = key_labels.iter().map(String::as_str).collect();
    labels.push(AUDIT_KEY);
    labels.sort_unstable();
    labels.dedup();
    for label in labels {
        match admin.ed25519_ids(label)?.as_slice() {
            [id] => wanted.push(Wanted {
                object_type: object::Type::AsymmetricKey,
                id: *id,
                what: format!("Ed25519 key {label:?}"),
            }),
            [] => {
                return Err(BackupError::Device(format!(
                    "{}: no Ed25519 key labelled for {label:?}, which the key registry names",
                    admin.device
                )));
            }
            _ => {
                return Err(BackupError::Device(format!(
                    "{}: more than one Ed25519 key labelled for {label:?}",
                    admin.device
                )));
            }
        }
    }
    for (t, what) in [
        (object::Type::HmacKey, "HMAC key"),
        (object::Type::Opaque, "opaque object"),
    ] {
        for id in admin.list(&[Filter::Type(t), Filter::Domains(domains)])? {
            wanted.push(Wanted {
                object_type: t,
                id,
                what: format!("{what} {id:#06x}"),
            });
        }
    }
    let mut written = Vec::new();
    for w in &wanted {
        let info = admin
            .client
            .get_object_info(w.id, w.object_type)
            .map_err(|e| device_err(&admin.device, format!("cannot read {}", w.what), &e))?;
        if !info
            .capabilities
            .contains(Capability::EXPORTABLE_UNDER_WRAP)
        {
            let label = info.label.try_as_str().unwrap_or("?").to_owned();
            return Err(BackupError::NotExportable(format!(
                "{} (object {:#06x}, label {label:?})",
                w.what, w.id
            )));
        }
        let message = admin
            .client
            .export_wrapped(wrap_key, w.object_type, w.id)
            .map_err(|e| {
                device_err(
                    &admin.device,
                    format!("cannot export {} under wrap key {wrap_key:#06x}", w.what),
                    &e,
                )
            })?;
        let rel = wrapped_path(w.object_type, w.id)
            .ok_or_else(|| BackupError::Device(format!("{} has no file name", w.what)))?;
        let path = root.join(&rel);
        mkdirs(&path)?;
        write_new(&path, &message.into_vec())?;
        written.push(rel);
    }
    written.sort();
    Ok(written)
}

/// Imports the wrapped objects `files` (backup-relative paths, read from
/// `backup`) into the replacement device under wrap key `wrap_key`, after
/// checking that none of their ids is taken there and that no Ed25519 key
/// there has the label of a key to restore (nothing is imported
/// otherwise), then checks that each key in `expected` (name, public key)
/// is on the device with that public key.
pub fn import(
    admin: &AdminSession,
    wrap_key: u16,
    backup: &Path,
    files: &[String],
    expected: &[(String, [u8; 32])],
) -> Result<usize, BackupError> {
    let mut objects = Vec::new();
    for f in files {
        let (t, id) = parse_wrapped_path(f).ok_or_else(|| {
            BackupError::invalid(
                "backup_manifest_invalid",
                f.clone(),
                "is not a wrapped object's file name (hsm/TYPE-ID.wrap)",
            )
        })?;
        if admin.exists(t, id)? {
            return Err(BackupError::ObjectExists(format!(
                "{}: {} object {id:#06x} (from {f})",
                admin.device,
                type_name(t).unwrap_or("?")
            )));
        }
        objects.push((f, t, id));
    }
    // A key already there under one of the names would make two keys for
    // one name (keywardd refuses an ambiguous key): refused as well.
    for name in expected
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(std::iter::once(AUDIT_KEY))
    {
        if !admin.ed25519_ids(name)?.is_empty() {
            return Err(BackupError::ObjectExists(format!(
                "{}: an Ed25519 key labelled for {name:?}",
                admin.device
            )));
        }
    }
    for (f, t, id) in &objects {
        let bytes =
            std::fs::read(backup.join(f)).map_err(BackupError::io(format!("cannot read {f}")))?;
        let message = yubihsm::wrap::Message::from_vec(bytes).map_err(|e| {
            BackupError::invalid("backup_file_changed", f.to_string(), e.to_string())
        })?;
        let handle = admin.client.import_wrapped(wrap_key, message).map_err(|e| {
            device_err(
                &admin.device,
                format!(
                    "cannot import {f} under wrap key {wrap_key:#06x} (is it the wrap key of the backed-up device?)"
                ),
                &e,
            )
        })?;
        if handle.object_type != *t || handle.object_id != *id {
            return Err(BackupError::Device(format!(
                "{}: {f} was imported as {:?} object {:#06x}, not the one its name says",
                admin.device, handle.object_type, handle.object_id
            )));
        }
    }
    for (name, public) in expected {
        match admin.ed25519_public(name)? {
            Some(pk) if pk == *public => {}
            Some(pk) => {
                return Err(BackupError::KeyMismatch(format!(
                    "key {name:?}: the device holds {} after the import, the ledger's registry says {}",
                    bs58::encode(pk).into_string(),
                    bs58::encode(public).into_string()
                )));
            }
            None => {
                return Err(BackupError::KeyMismatch(format!(
                    "key {name:?} is in the ledger's registry but no wrapped object of the backup holds it"
                )));
            }
        }
    }
    Ok(objects.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_file_names_round_trip_and_nothing_else_parses() {
        for (t, id) in [
            (object::Type::AsymmetricKey, 0x0100),
            (object::Type::HmacKey, 0xfffe),
            (object::Type::Opaque, 1),
        ] {
            let p = wrapped_path(t, id).unwrap_or_default();
            assert_eq!(parse_wrapped_path(&p), Some((t, id)), "{p}");
        }
        assert_eq!(wrapped_path(object::Type::WrapKey, 16), None);
        for bad in [
            "hsm/opaque-01.wrap",
            "hsm/wrap-key-0010.wrap",
            "token/opaque-0001.wrap",
            "hsm/opaque-0001",
            "hsm/opaque-zzzz.wrap",
        ] {
            assert_eq!(parse_wrapped_path(bad), None, "{bad}");
        }
    }
}
