//! Why `keyward hsm setup yubihsm` stopped: one variant per cause, each
//! with a stable code and a message that says what to do.

use std::path::PathBuf;

use yubihsm::object;

use super::Role;

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
