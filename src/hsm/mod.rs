//! Hardware security modules: the [`Hsm`] trait and its backends.
//!
//! Keys are generated inside the HSM as sensitive and non-extractable and are
//! found again by label (the key name). Every signature an HSM returns is
//! verified in software against the key's public key before anyone sees it
//! ([`sign_verified`]).

pub mod pin;
pub mod pkcs11;
pub mod softhsm;

use crate::types::{KeyName, PublicKey};

/// Errors of the HSM layer. `code()` is the stable API code.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded or initialized.
    #[error("cannot load PKCS#11 module {module}: {detail}")]
    Module {
        /// Module path.
        module: String,
        /// What went wrong.
        detail: String,
    },
    /// No token with the configured label is present.
    #[error("no token labelled {0:?} is present")]
    TokenNotFound(String),
    /// Login with the user PIN failed.
    #[error("login to token {token:?} failed: {detail}")]
    Login {
        /// Token label.
        token: String,
        /// What went wrong (never the PIN).
        detail: String,
    },
    /// The PIN could not be read.
    #[error("cannot read the HSM PIN: {0}")]
    Pin(String),
    /// No Ed25519 key pair with this label exists.
    #[error("no Ed25519 key named {0:?} in the HSM")]
    KeyNotFound(String),
    /// A key with this label exists already.
    #[error("a key named {0:?} exists already in the HSM")]
    KeyExists(String),
    /// More than one key pair carries this label: refuse to guess.
    #[error("more than one key named {0:?} in the HSM")]
    AmbiguousKey(String),
    /// A key pair with this label exists but its private key is not
    /// protected as keyward requires (sensitive, non-extractable, always
    /// so, private token object): keyward refuses to use it.
    #[error(
        "key {key:?} in the HSM is not protected as keyward requires ({weaknesses}); it is refused: generate a new key inside the HSM"
    )]
    UnprotectedKey {
        /// The key's name (its label).
        key: String,
        /// The attributes at fault, with the values the token reports.
        weaknesses: String,
    },
    /// The HSM returned a signature that does not verify: never released.
    #[error("the HSM returned a signature that does not verify for key {0:?}")]
    BadSignature(String),
    /// The module no longer has this process's session, login or device
    /// (or lost a key it had): the backend re-opens it.
    #[error("HSM operation {op} failed: {detail} (the module lost its state)")]
    StateLost {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Any other failure of the device or module.
    #[error("HSM operation {op} failed: {detail}")]
    Device {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
}

impl HsmError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            HsmError::KeyNotFound(_) => "key_not_found",
            HsmError::KeyExists(_) => "key_exists",
            HsmError::AmbiguousKey(_) => "key_ambiguous",
            HsmError::UnprotectedKey { .. } => "key_unprotected",
            HsmError::BadSignature(_) => "hsm_bad_signature",
            _ => "hsm_unavailable",
        }
    }
}

/// An Ed25519 key held by the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmKey {
    /// Key name (the label of the private and public key objects).
    pub name: KeyName,
    /// Public key.
    pub public_key: PublicKey,
}

/// What every HSM backend offers. Implementations are thread-safe and let
/// several threads sign at once (no global lock around device calls).
pub trait Hsm: Send + Sync {
    /// Backend name for health and benchmarks, e.g. `pkcs11`.
    fn backend(&self) -> &'static str;

    /// Generates an Ed25519 key pair inside the HSM, labelled `name`;
    /// the private key is sensitive, non-extractable, private and persistent.
    /// Fails with [`HsmError::KeyExists`] if the label is taken.
    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError>;

    /// Finds the Ed25519 key pair labelled `name`.
    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError>;

    /// Lists every Ed25519 key pair on the token (sorted by name).
    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError>;

    /// Signs `message` with the private key of `key` (pure Ed25519).
    /// Callers use [`sign_verified`], which also checks the result.
    fn sign_ed25519(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError>;

    /// `len` random bytes from the HSM's generator.
    fn random(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError>;

    /// Stores `key` as a sensitive, non-extractable secret key (HMAC) named
    /// `label`; refuses an existing label.
    fn import_hmac_key(&self, label: &str, key: &[u8]) -> Result<(), HsmError>;

    /// HMAC-SHA256 of `data` with the secret key `label`, inside the HSM.
    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError>;

    /// Destroys the secret key `label`; `false` if there was none.
    fn delete_secret(&self, label: &str) -> Result<bool, HsmError>;

    /// Stores `value` as a private, persistent data object named `label`
    /// (readable and writable only after login with the daemon's
    /// credentials), replacing every earlier object of that label. The new
    /// object is created before the old ones are destroyed, so an
    /// interruption leaves both, never neither.
    fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError>;

    /// The values of every data object named `label`: none, one, or two
    /// after an interrupted [`Hsm::store_data`].
    fn load_data(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError>;

    /// Liveness check of the device and login state that also finds the
    /// keys in use again, so a module that lost its objects fails it.
    fn health(&self) -> Result<(), HsmError>;
}

/// Signs with the HSM and verifies the signature in software (ed25519-dalek,
/// strict verification) before returning it. A signature that does not verify
/// is an error and is never released.
pub fn sign_verified(hsm: &dyn Hsm, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
    let sig = hsm.sign_ed25519(key, message)?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key.0)
        .map_err(|_| HsmError::BadSignature(key.name.to_string()))?;
    let signature = ed25519_dalek::Signature::from_bytes(&sig);
    vk.verify_strict(message, &signature)
        .map_err(|_| HsmError::BadSignature(key.name.to_string()))?;
    Ok(sig)
}
