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

mod files;

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use yubihsm::{Client, Connector, Credentials, authentication, object, wrap};
use zeroize::Zeroizing;

pub use plan::{PlannedObject, Role};
use plan::{capability_names, domain_numbers};

/// Why set-up stopped. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum YubiHsmSetupError {
    /// The options or keyward.toml do not make sense.
    #[error("{0}")]
    Config(String),
    /// A credential file is already there.
    #[error(
        "{path} exists; set-up never replaces a credential. This device was probably provisioned already \
         (use its credentials), or move the file away if it belongs to a device that was reset"
    )]
    CredentialExists {
        /// The file.
        path: PathBuf,
    },
    /// The authentication key set-up logs in with does not open a session.
    #[error(
        "authentication key {id} did not open a session on {device} ({detail}); a provisioned device has no \
         factory key any more (use its admin credential), otherwise check --auth-key-id and --password-file"
    )]
    FactoryAuth {
        /// The key id.
        id: u16,
        /// The connector.
        device: String,
        /// The client's error.
        detail: String,
    },
    /// The device holds other objects than the key set-up logs in with.
    #[error(
        "the device is not fresh: it holds {}; set-up changed nothing. Provision a fresh or reset device \
         (yubihsm-shell: reset), or pass --force-not-fresh to add keyward's keys beside these objects",
        .objects.join(", ")
    )]
    NotFresh {
        /// The objects found.
        objects: Vec<String>,
    },
    /// An object id set-up uses is taken.
    #[error("object {id:#06x} ({object_type:?}) already exists; set-up changed nothing")]
    IdTaken {
        /// The id.
        id: u16,
        /// Its type.
        object_type: object::Type,
    },
    /// A device command failed.
    #[error("{op} on {device}: {detail}{}", rollback_note(.rolled_back))]
    Device {
        /// What was being done.
        op: String,
        /// The connector.
        device: String,
        /// The client's error.
        detail: String,
        /// Whether what this run did was undone.
        rolled_back: bool,
    },
    /// A new authentication key did not open a session or does not read
    /// back as created.
    #[error(
        "the new {role} authentication key {id:#06x} failed its proof: {detail}; the factory key was NOT deleted{}",
        rollback_note(.rolled_back)
    )]
    ProofFailed {
        /// Whose key.
        role: Role,
        /// Its id.
        id: u16,
        /// Why.
        detail: String,
        /// Whether what this run did was undone.
        rolled_back: bool,
    },
    /// Undoing a failed run failed too.
    #[error(
        "{cause}; undoing it failed too ({detail}): objects left on the device: {}. Delete them with the factory key \
         (yubihsm-shell) and remove the credential files this run wrote",
        .left.join(", ")
    )]
    RollbackIncomplete {
        /// The first failure.
        cause: String,
        /// Why undoing failed.
        detail: String,
        /// What is left on the device.
        left: Vec<String>,
    },
    /// The new keys work, but the factory key could not be deleted.
    #[error(
        "the new keys are in place and proven, but deleting authentication key {id} failed ({detail}): delete it \
         with the admin credential (yubihsm-shell -a delete-object -i {id} -t authentication-key), it still opens \
         a session with its old password"
    )]
    FactoryKeyKept {
        /// Its id.
        id: u16,
        /// Why.
        detail: String,
    },
    /// I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn rollback_note(rolled_back: &bool) -> &'static str {
    if *rolled_back {
        "; everything this run created was removed again (device and credential files)"
    } else {
        ""
    }
}

impl YubiHsmSetupError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            YubiHsmSetupError::Config(_) => "invalid_config",
            YubiHsmSetupError::CredentialExists { .. } => "credential_exists",
            YubiHsmSetupError::FactoryAuth { .. } => "factory_auth_failed",
            YubiHsmSetupError::NotFresh { .. } => "device_not_fresh",
            YubiHsmSetupError::IdTaken { .. } => "object_id_taken",
            YubiHsmSetupError::Device { .. } => "hsm_device_error",
            YubiHsmSetupError::ProofFailed { .. } => "credential_proof_failed",
            YubiHsmSetupError::RollbackIncomplete { .. } => "rollback_incomplete",
            YubiHsmSetupError::FactoryKeyKept { .. } => "factory_key_kept",
            YubiHsmSetupError::Io { .. } => "io_error",
        }
    }
}

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

/// A secret of one object: an authentication key's password or the wrap
/// key's bytes.
enum Secret {
    Password(Zeroizing<String>),
    WrapKey(Zeroizing<Vec<u8>>),
}

impl Secret {
    /// The credential file's content.
    fn file_text(&self, id: u16) -> Zeroizing<String> {
        match self {
            Secret::Password(p) => Zeroizing::new(format!("{id}:{}", p.as_str())),
            Secret::WrapKey(k) => Zeroizing::new(format!("{id}:{}", hex::encode(&k[..]))),
        }
    }
}

fn random_bytes(n: usize) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(vec![0u8; n]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..]);
    bytes
}

/// Provisions the device behind `connector` (see the module docs).
pub fn provision(
    connector: Connector,
    opts: &ProvisionOptions,
) -> Result<ProvisionReport, YubiHsmSetupError> {
    let domains = crate::hsm::yubihsm::domain_set(&opts.domains)
        .map_err(|e| YubiHsmSetupError::Config(e.to_string()))?;
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
    let dev_err = |op: &str, rolled_back: bool| {
        let op = op.to_owned();
        move |e: yubihsm::client::Error| YubiHsmSetupError::Device {
            op,
            device: device.to_owned(),
            detail: e.to_string(),
            rolled_back,
        }
    };
    let entries = factory
        .list_objects(&[])
        .map_err(dev_err("list objects", false))?;
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
    for o in &planned {
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

    // The secrets are saved before the device gets them.
    let secrets: Vec<Secret> = planned
        .iter()
        .map(|o| match o.role {
            Role::Wrap => Secret::WrapKey(random_bytes(wrap::Algorithm::Aes256Ccm.key_len())),
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
            let cause = dev_err(&format!("create the {} object {:#06x}", o.role, o.id), true)(e);
            return Err(run.undo(cause));
        }
        run.created.push((o.id, o.object_type));
    }

    // Each new authentication key opens its own session and reads itself back.
    let mut admin = None;
    for (o, secret) in planned.iter().zip(&secrets) {
        let Secret::Password(password) = secret else {
            if let Err(detail) = check_info(&factory, o) {
                let cause = YubiHsmSetupError::ProofFailed {
                    role: o.role,
                    id: o.id,
                    detail,
                    rolled_back: true,
                };
                return Err(run.undo(cause));
            }
            continue;
        };
        match prove(&connector, o, password, opts) {
            Ok(client) => {
                if o.role == Role::Admin {
                    admin = Some(client);
                }
            }
            Err(detail) => {
                let cause = YubiHsmSetupError::ProofFailed {
                    role: o.role,
                    id: o.id,
                    detail,
                    rolled_back: true,
                };
                return Err(run.undo(cause));
            }
        }
    }

    // Last: the key this run logged in with.
    let kept = |detail: String| YubiHsmSetupError::FactoryKeyKept {
        id: opts.auth_key_id,
        detail,
    };
    factory
        .delete_object(opts.auth_key_id, object::Type::AuthenticationKey)
        .map_err(|e| kept(e.to_string()))?;
    if let Some(admin) = admin {
        match admin.get_object_info(opts.auth_key_id, object::Type::AuthenticationKey) {
            Err(e) if e.device_error() == Some(yubihsm::device::ErrorKind::ObjectNotFound) => {}
            Ok(_) => return Err(kept("the device still lists it".to_owned())),
            Err(e) => return Err(kept(format!("cannot check it is gone: {e}"))),
        }
    }
    let already_there = if others.is_empty() {
        Vec::new()
    } else {
        others
    };
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
        already_there,
    })
}

/// What a run has done so far, to undo it.
struct Run<'a> {
    factory: &'a Client,
    written: Vec<PathBuf>,
    created: Vec<(u16, object::Type)>,
}

impl Run<'_> {
    /// Deletes the objects created and the files written, newest first;
    /// returns `cause`, or what is left if undoing fails.
    fn undo(self, cause: YubiHsmSetupError) -> YubiHsmSetupError {
        let mut left = Vec::new();
        let mut failure = None;
        for (id, t) in self.created.iter().rev() {
            if let Err(e) = self.factory.delete_object(*id, *t) {
                left.push(format!("{id:#06x} ({t:?})"));
                failure.get_or_insert(e.to_string());
            }
        }
        files::remove_written(&self.written);
        match failure {
            None => cause,
            Some(detail) => YubiHsmSetupError::RollbackIncomplete {
                cause: cause.to_string(),
                detail,
                left,
            },
        }
    }
}

/// Creates `o` with its secret through the factory session.
fn create(
    factory: &Client,
    o: &PlannedObject,
    secret: &Secret,
) -> Result<(), yubihsm::client::Error> {
    let label = object::Label::from(o.label);
    match secret {
        Secret::Password(password) => factory.put_authentication_key(
            o.id,
            label,
            o.domains,
            o.capabilities,
            o.delegated,
            authentication::Algorithm::YubicoAes,
            authentication::Key::derive_from_password(password.as_bytes()),
        ),
        Secret::WrapKey(bytes) => factory.put_wrap_key(
            o.id,
            label,
            o.domains,
            o.capabilities,
            o.delegated,
            wrap::Algorithm::Aes256Ccm,
            bytes.to_vec(),
        ),
    }
    .map(|_| ())
}

/// Opens a session with the new key `o` and reads it back.
fn prove(
    connector: &Connector,
    o: &PlannedObject,
    password: &Zeroizing<String>,
    opts: &ProvisionOptions,
) -> Result<Client, String> {
    let password: Zeroizing<String> = {
        #[cfg(feature = "test-hooks")]
        let wrong = opts.sabotage_proof == Some(o.role);
        #[cfg(not(feature = "test-hooks"))]
        let wrong = {
            let _ = opts;
            false
        };
        if wrong {
            Zeroizing::new(format!("{}-sabotaged", password.as_str()))
        } else {
            password.clone()
        }
    };
    let client = Client::open(
        connector.clone(),
        Credentials::from_password(o.id, password.as_bytes()),
        false,
    )
    .map_err(|e| format!("it opens no session: {e}"))?;
    check_info(&client, o)?;
    Ok(client)
}

/// Whether the device reports `o` as it was asked to create it.
fn check_info(client: &Client, o: &PlannedObject) -> Result<(), String> {
    let info = client
        .get_object_info(o.id, o.object_type)
        .map_err(|e| format!("cannot read it back: {e}"))?;
    let label = info.label.try_as_str().unwrap_or("").to_owned();
    if info.capabilities != o.capabilities
        || info.delegated_capabilities != o.delegated
        || info.domains != o.domains
        || label != o.label
    {
        return Err(format!(
            "the device reports label {label:?}, capabilities [{}], delegated [{}], domains {:?}",
            capability_names(info.capabilities),
            capability_names(info.delegated_capabilities),
            domain_numbers(info.domains)
        ));
    }
    Ok(())
}
