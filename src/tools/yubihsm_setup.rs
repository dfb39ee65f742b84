//! `keyward hsm setup yubihsm`: provisions a factory-fresh YubiHSM 2 for
//! keyward with least-privilege authentication keys, the way a careful
//! operator would by hand.
//!
//! 1. Every credential file must be absent (none is ever replaced), and
//!    the device must be fresh: nothing on it but the authentication key
//!    set-up logs in with (the factory key, id 1, password `password`),
//!    unless [`ProvisionOptions::force_not_fresh`]; even then the ids of
//!    [`plan`] must be free (a real device refuses a taken id; MockHsm
//!    would panic on one).
//! 2. New random passwords (OS RNG, 192 bits) are written first, each to
//!    its credential file `AUTH_KEY_ID:PASSWORD` (0400), so the device never
//!    holds a key whose password was not saved. With backups, the wrap
//!    key's material goes to its file too (`WRAP_KEY_ID:HEX`): it is what
//!    restores the backups on a replacement device, so it belongs offline.
//! 3. The objects of [`plan::plan`] are created: the signer's, the
//!    operator's (admin) and the auditor's authentication keys, and with
//!    backups the wrap key.
//! 4. Each new authentication key must open its own session and read
//!    itself back as it was asked for (capabilities, delegated
//!    capabilities, domains, label).
//! 5. Only then is the authentication key set-up logged in with deleted,
//!    last, and the admin session checks it is gone.
//!
//! A failure before step 5 undoes what the run did (the objects it
//! created, the files it wrote): the device keeps its factory key and
//! set-up can be run again. Passwords are never printed or logged.
//!
//! [`provision`] takes any of the crate's connectors, so the tests run it
//! on MockHsm; the command line ([`credentials_dir_default`] and the
//! `keyward.toml` settings) is in `src/bin/keyward/hsm.rs`.

pub mod plan;

mod error;
mod files;
mod steps;

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use yubihsm::{Client, Connector, Credentials, object, wrap};
use zeroize::Zeroizing;

pub use error::YubiHsmSetupError;
pub use plan::{PlannedObject, Role};
use plan::{capability_names, domain_numbers};
use steps::{Run, Secret, check_info, create, prove, random_bytes};

/// What to provision.
pub struct ProvisionOptions {
    /// The authentication key set-up logs in with, and deletes at the end.
    pub auth_key_id: u16,
    /// Its password.
    pub password: SecretString,
    /// Domains (1-16) of every object created (keyward's `hsm.domains`).
    pub domains: Vec<u8>,
    /// Create the wrap key and allow exports under wrap.
    pub backups: bool,
    /// Provision a device that holds other objects.
    pub force_not_fresh: bool,
    /// Where the admin's and auditor's credentials (and the wrap key) go.
    pub credentials_dir: PathBuf,
    /// The signer's credential file (what `hsm.credential_file` names).
    pub signer_file: PathBuf,
    /// A name for messages (the connector).
    pub device: String,
    /// With backups: the wrap key of an earlier device ([`parse_wrap_key`]),
    /// so this one can import its backups; `None` makes a new random one.
    pub wrap_key: Option<Zeroizing<Vec<u8>>>,
    /// Test seam: the proof of this role's key uses a wrong password.
    #[cfg(feature = "test-hooks")]
    pub sabotage_proof: Option<Role>,
}

impl ProvisionOptions {
    /// The factory credentials (key 1, `password`), domain 1, no backups.
    pub fn factory(credentials_dir: &Path, signer_file: &Path, device: &str) -> ProvisionOptions {
        ProvisionOptions {
            auth_key_id: plan::FACTORY_AUTH_KEY_ID,
            password: SecretString::from("password"),
            domains: vec![1],
            backups: false,
            force_not_fresh: false,
            wrap_key: None,
            credentials_dir: credentials_dir.to_path_buf(),
            signer_file: signer_file.to_path_buf(),
            device: device.to_owned(),
            #[cfg(feature = "test-hooks")]
            sabotage_proof: None,
        }
    }

    /// The credential file of `role`.
    pub fn credential_file(&self, role: Role) -> PathBuf {
        match role {
            Role::Signer => self.signer_file.clone(),
            Role::Admin => self.credentials_dir.join("yubihsm-admin"),
            Role::Audit => self.credentials_dir.join("yubihsm-audit"),
            Role::Wrap => self.credentials_dir.join("yubihsm-wrap-key"),
        }
    }
}

/// `/etc/keyward/credentials` for `/etc/keyward/keyward.toml`: the
/// credentials directory beside the configuration, as `keyward setup`
/// keeps the PIN.
pub fn credentials_dir_default(config_file: &Path) -> PathBuf {
    let file = std::path::absolute(config_file).unwrap_or_else(|_| config_file.to_path_buf());
    file.parent().unwrap_or(Path::new("/")).join("credentials")
}

/// The default name of the signer's credential (`hsm.credential_file`).
pub const SIGNER_CREDENTIAL: &str = "yubihsm-signer";

/// The file holding the signer's credential `credential_file` (keyward.toml's
/// `hsm.credential_file`) for a tool run outside systemd: an absolute path
/// as is; a relative one (a systemd credential name) in `credentials_dir`
/// when given, else in `$CREDENTIALS_DIRECTORY` when `from_environment`
/// and it is set, else the file the installed `keywardd.service` loads it
/// from (`LoadCredential=NAME:PATH`), else in the credentials directory
/// beside `config_file` ([`credentials_dir_default`]).
pub fn signer_credential_source(
    config_file: &Path,
    credential_file: &Path,
    credentials_dir: Option<&Path>,
    from_environment: bool,
) -> PathBuf {
    if credential_file.is_absolute() {
        return credential_file.to_path_buf();
    }
    if let Some(dir) = credentials_dir {
        return dir.join(credential_file);
    }
    if from_environment && let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        return Path::new(&dir).join(credential_file);
    }
    crate::doctor::unit_credential_source(&credential_file.to_string_lossy())
        .unwrap_or_else(|| credentials_dir_default(config_file).join(credential_file))
}

/// The wrap key material of a `yubihsm-wrap-key` file (`16:HEX` as
/// written by set-up, or `0x0010:HEX`): 32 bytes of AES-256-CCM key. The
/// reason of a refusal names no secret.
pub fn parse_wrap_key(text: &str) -> Result<Zeroizing<Vec<u8>>, YubiHsmSetupError> {
    let bad = |why: &str| YubiHsmSetupError::Config(format!("the wrap key file: {why}"));
    let (id, key) = text
        .trim_end_matches(['\n', '\r'])
        .split_once(':')
        .ok_or_else(|| bad("expected WRAP_KEY_ID:HEX"))?;
    let id = match id.strip_prefix("0x") {
        Some(h) => u16::from_str_radix(h, 16).ok(),
        None => id.parse().ok(),
    };
    if id != Some(plan::WRAP_KEY_ID) {
        return Err(bad(&format!(
            "the id before the colon must be {:#06x}",
            plan::WRAP_KEY_ID
        )));
    }
    let key =
        Zeroizing::new(hex::decode(key).map_err(|_| bad("the key after the colon is not hex"))?);
    if key.len() != wrap::Algorithm::Aes256Ccm.key_len() {
        return Err(bad("the key must be 32 bytes (64 hex digits)"));
    }
    Ok(key)
}

/// One object created, and where its credential went.
#[derive(Debug, Clone)]
pub struct CreatedObject {
    /// The object.
    pub object: PlannedObject,
    /// Its credential file.
    pub credential_file: PathBuf,
}

/// What set-up did.
#[derive(Debug, Clone)]
pub struct ProvisionReport {
    /// The objects created, in order.
    pub created: Vec<CreatedObject>,
    /// The authentication key deleted at the end.
    pub deleted_auth_key: u16,
    /// Objects that were on the device before (with `force_not_fresh`).
    pub already_there: Vec<String>,
}

impl std::fmt::Display for ProvisionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Created on the YubiHSM 2:")?;
        for c in &self.created {
            let o = &c.object;
            writeln!(
                f,
                "  {:#06x} {:?} {:?} ({})",
                o.id, o.object_type, o.label, o.role
            )?;
            writeln!(
                f,
                "      capabilities: {}",
                capability_names(o.capabilities)
            )?;
            writeln!(f, "      delegated:    {}", capability_names(o.delegated))?;
            writeln!(f, "      domains:      {:?}", domain_numbers(o.domains))?;
            writeln!(
                f,
                "      credential:   {} (0400)",
                c.credential_file.display()
            )?;
        }
        if !self.already_there.is_empty() {
            writeln!(
                f,
                "Left as they were (--force-not-fresh): {}",
                self.already_there.join(", ")
            )?;
        }
        writeln!(
            f,
            "Each new authentication key opened its own session; then authentication key {:#06x} was deleted.",
            self.deleted_auth_key
        )
    }
}

/// Provisions the device behind `connector` (see the module docs).
pub fn provision(
    connector: Connector,
    opts: &ProvisionOptions,
) -> Result<ProvisionReport, YubiHsmSetupError> {
    let domains = crate::hsm::yubihsm::domain_set(&opts.domains)
        .map_err(|e| YubiHsmSetupError::Config(e.to_string()))?;
    if opts.wrap_key.is_some() && !opts.backups {
        return Err(YubiHsmSetupError::Config(
            "a wrap key was given without backups".to_owned(),
        ));
    }
    let planned = plan::plan(domains, opts.backups);
    let paths: Vec<PathBuf> = planned
        .iter()
        .map(|o| opts.credential_file(o.role))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        if paths[..i].contains(p) {
            return Err(YubiHsmSetupError::Config(format!(
                "{} would hold two credentials",
                p.display()
            )));
        }
        files::ensure_absent(p)?;
        files::check_dir(p)?;
    }

    let device = opts.device.as_str();
    let factory = Client::open(
        connector.clone(),
        Credentials::from_password(opts.auth_key_id, opts.password.expose_secret().as_bytes()),
        false,
    )
    .map_err(|e| YubiHsmSetupError::FactoryAuth {
        id: opts.auth_key_id,
        device: device.to_owned(),
        detail: e.to_string(),
    })?;
    let others = check_device(&factory, opts, &planned)?;

    // The secrets are saved before the device gets them.
    let secrets: Vec<Secret> = planned
        .iter()
        .map(|o| match o.role {
            Role::Wrap => Secret::WrapKey(match &opts.wrap_key {
                Some(k) => k.clone(),
                None => random_bytes(wrap::Algorithm::Aes256Ccm.key_len()),
            }),
            _ => Secret::Password(Zeroizing::new(hex::encode(&random_bytes(24)[..]))),
        })
        .collect();
    let mut run = Run {
        factory: &factory,
        written: Vec::new(),
        created: Vec::new(),
    };
    for ((o, secret), path) in planned.iter().zip(&secrets).zip(&paths) {
        let saved = files::prepare_dir(path)
            .and_then(|()| files::write_new(path, secret.file_text(o.id).as_bytes()));
        if let Err(e) = saved {
            return Err(run.undo(e));
        }
        run.written.push(path.clone());
    }
    for (o, secret) in planned.iter().zip(&secrets) {
        if let Err(e) = create(&factory, o, secret) {
            let cause = YubiHsmSetupError::Device {
                op: format!("create the {} object {:#06x}", o.role, o.id),
                device: opts.device.clone(),
                detail: e.to_string(),
                rolled_back: true,
            };
            return Err(run.undo(cause));
        }
        run.created.push((o.id, o.object_type));
    }

    let admin = match prove_all(&connector, &factory, opts, &planned, &secrets) {
        Ok(admin) => admin,
        Err(cause) => return Err(run.undo(cause)),
    };
    delete_login_key(&factory, admin.as_ref(), opts.auth_key_id)?;
    Ok(ProvisionReport {
        created: planned
            .into_iter()
            .zip(paths)
            .map(|(object, credential_file)| CreatedObject {
                object,
                credential_file,
            })
            .collect(),
        deleted_auth_key: opts.auth_key_id,
        already_there: others,
    })
}

/// The objects on the device other than the login key; refuses a device
/// that is not fresh (unless forced) or on which one of `planned`'s ids is
/// taken.
fn check_device(
    factory: &Client,
    opts: &ProvisionOptions,
    planned: &[PlannedObject],
) -> Result<Vec<String>, YubiHsmSetupError> {
    let entries = factory
        .list_objects(&[])
        .map_err(|e| YubiHsmSetupError::Device {
            op: "list objects".to_owned(),
            device: opts.device.clone(),
            detail: e.to_string(),
            rolled_back: false,
        })?;
    let others: Vec<String> = entries
        .iter()
        .filter(|e| {
            !(e.object_id == opts.auth_key_id && e.object_type == object::Type::AuthenticationKey)
        })
        .map(|e| format!("{:#06x} ({:?})", e.object_id, e.object_type))
        .collect();
    if !others.is_empty() && !opts.force_not_fresh {
        return Err(YubiHsmSetupError::NotFresh { objects: others });
    }
    for o in planned {
        let taken = entries
            .iter()
            .any(|e| e.object_id == o.id && e.object_type == o.object_type);
        if taken {
            return Err(YubiHsmSetupError::IdTaken {
                id: o.id,
                object_type: o.object_type,
            });
        }
    }
    Ok(others)
}

/// Each new authentication key opens its own session and reads itself
/// back; the wrap key reads back through the login session. Returns the
/// admin's session.
fn prove_all(
    connector: &Connector,
    factory: &Client,
    opts: &ProvisionOptions,
    planned: &[PlannedObject],
    secrets: &[Secret],
) -> Result<Option<Client>, YubiHsmSetupError> {
    let mut admin = None;
    for (o, secret) in planned.iter().zip(secrets) {
        let proven = match secret {
            Secret::Password(password) => prove(connector, o, password, opts).map(Some),
            Secret::WrapKey(_) => check_info(factory, o).map(|()| None),
        };
        match proven {
            Ok(client) if o.role == Role::Admin => admin = client,
            Ok(_) => {}
            Err(detail) => {
                return Err(YubiHsmSetupError::ProofFailed {
                    role: o.role,
                    id: o.id,
                    detail,
                    rolled_back: true,
                });
            }
        }
    }
    Ok(admin)
}

/// Deletes the login key `id`, last, and checks through the admin's
/// session that it is gone.
fn delete_login_key(
    factory: &Client,
    admin: Option<&Client>,
    id: u16,
) -> Result<(), YubiHsmSetupError> {
    let kept = |detail: String| YubiHsmSetupError::FactoryKeyKept { id, detail };
    factory
        .delete_object(id, object::Type::AuthenticationKey)
        .map_err(|e| kept(e.to_string()))?;
    if let Some(admin) = admin {
        match admin.get_object_info(id, object::Type::AuthenticationKey) {
            Err(e) if e.device_error() == Some(yubihsm::device::ErrorKind::ObjectNotFound) => {}
            Ok(_) => return Err(kept("the device still lists it".to_owned())),
            Err(e) => return Err(kept(format!("cannot check it is gone: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_key_files_parse_and_refusals_name_no_secret() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_wrap_key(&format!("16:{hex}\n")).unwrap().len(), 32);
        assert_eq!(parse_wrap_key(&format!("0x0010:{hex}")).unwrap().len(), 32);
        for bad in [
            format!("17:{hex}"),
            hex.clone(),
            format!("16:{}", &hex[..62]),
            format!("16:{}zz", &hex[..62]),
        ] {
            let err = parse_wrap_key(&bad).unwrap_err();
            assert_eq!(err.code(), "invalid_config");
            assert!(!err.to_string().contains(&hex[..16]), "{err}");
        }
    }
}
