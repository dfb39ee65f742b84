//! Hardware security modules: the [`Hsm`] trait and its backends.
//!
//! Keys are generated inside the HSM as sensitive and non-extractable. A
//! key's name ([`KeyName`]) is its identity for users; each backend maps the
//! name to an opaque [`KeyRef`] of its own (a PKCS#11 label, later a YubiHSM
//! object id). Every signature an HSM returns is verified in software against
//! the key's public key before anyone sees it ([`sign_verified`]).
//!
//! [`open`] chooses the backend `[hsm]` names. The daemon and the signing
//! service reach it only through an [`HsmExecutor`]: a fixed number of
//! worker threads sized by the backend, a bounded queue, a timeout per call
//! and per-call timings.

pub mod executor;
#[cfg(feature = "mock-hsm")]
pub mod mock;
pub mod pin;
pub mod pkcs11;
pub mod softhsm;
pub mod yubihsm;

use std::sync::Arc;

pub use executor::{ExecutorSettings, ExecutorStats, HsmExecutor, HsmOp, OpStats};

use crate::config::{HsmBackendConfig, HsmConfig};
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
    /// The HSM holds a key under the label the key registry names, but with
    /// another public key: the key was replaced behind keyward's back. It
    /// is refused.
    #[error("key {key:?} in the HSM {detail}: refused")]
    KeyMismatch {
        /// The key's name and version (`hot@2`).
        key: String,
        /// Its label, and both public keys.
        detail: String,
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
    /// The executor's queue stayed full for the configured wait: the call
    /// was refused at once and nothing was asked of the HSM.
    #[error(
        "the HSM is busy: its queue of {queue_depth} calls stayed full for {waited_ms} ms ({op} refused); try again later"
    )]
    Busy {
        /// The operation refused.
        op: &'static str,
        /// Calls the queue holds (`hsm.queue_depth`).
        queue_depth: usize,
        /// How long the call waited for room (`hsm.queue_wait_ms`).
        waited_ms: u64,
    },
    /// The call was not answered within `hsm.call_timeout_ms` (queue
    /// included): the caller has given up and a result that comes later is
    /// discarded unread.
    #[error("HSM operation {op} timed out after {after_ms} ms; any later result is discarded")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout in force.
        after_ms: u64,
    },
    /// The executor's workers are gone (the daemon is stopping, or a call
    /// panicked): nothing more is asked of the HSM.
    #[error("the HSM executor has stopped ({op} not run)")]
    Stopped {
        /// The operation.
        op: &'static str,
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
            HsmError::KeyMismatch { .. } => "key_mismatch",
            HsmError::BadSignature(_) => "hsm_bad_signature",
            HsmError::Busy { .. } => "hsm_busy",
            _ => "hsm_unavailable",
        }
    }
}

/// How a backend reaches a key inside its device, filled by the backend
/// that found or made the key and opaque to everyone else: the service
/// passes it back unread. A PKCS#11 token finds keys by label (object
/// handles change when the module is re-opened); a YubiHSM addresses them
/// by a 16-bit object id, since its labels are shorter than key names.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyRef(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Label(String),
    ObjectId(u16),
}

impl KeyRef {
    /// A key found by its label.
    pub(crate) fn label(label: &str) -> KeyRef {
        KeyRef(Repr::Label(label.to_owned()))
    }

    /// A key addressed by a 16-bit object id.
    pub(crate) fn object_id(id: u16) -> KeyRef {
        KeyRef(Repr::ObjectId(id))
    }

    /// The label, for a backend that finds keys by label.
    pub(crate) fn as_label(&self) -> Option<&str> {
        match &self.0 {
            Repr::Label(l) => Some(l),
            Repr::ObjectId(_) => None,
        }
    }

    /// The object id, for a backend that addresses keys by id.
    pub(crate) fn as_object_id(&self) -> Option<u16> {
        match &self.0 {
            Repr::ObjectId(id) => Some(*id),
            Repr::Label(_) => None,
        }
    }
}

impl std::fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::Label(l) => write!(f, "KeyRef(label {l:?})"),
            Repr::ObjectId(id) => write!(f, "KeyRef(object {id:#06x})"),
        }
    }
}

/// The error of a backend handed a [`KeyRef`] another backend made.
pub(crate) fn foreign_key_ref(op: &'static str, key: &HsmKey) -> HsmError {
    HsmError::Device {
        op,
        detail: format!(
            "key {:?} carries a reference of another backend ({:?})",
            key.name.as_str(),
            key.key_ref
        ),
    }
}

/// An Ed25519 key held by the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmKey {
    /// Key name: the identity users, policies and the ledger know.
    pub name: KeyName,
    /// Public key.
    pub public_key: PublicKey,
    /// Where the backend that found the key reaches it.
    pub key_ref: KeyRef,
}

/// What every HSM backend offers. Implementations are thread-safe and
/// serve up to [`Hsm::workers`] calls at once (the executor never asks for
/// more); a backend that can serve several holds no global lock around
/// device calls. Methods block: async code calls them through an
/// [`HsmExecutor`].
pub trait Hsm: Send + Sync {
    /// Backend name for health and benchmarks, e.g. `pkcs11`.
    fn backend(&self) -> &'static str;

    /// How many calls the backend serves at once: the [`HsmExecutor`]
    /// starts this many worker threads. A device that runs one command at
    /// a time says 1 (the default); a PKCS#11 token its session count.
    fn workers(&self) -> usize {
        1
    }

    /// Generates an Ed25519 key pair inside the HSM, labelled `name`;
    /// the private key is sensitive, non-extractable, private and persistent.
    /// Fails with [`HsmError::KeyExists`] if the label is taken.
    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError>;

    /// Finds the Ed25519 key pair labelled `name`.
    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError>;

    /// Lists every Ed25519 key pair on the token (sorted by name).
    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError>;

    /// Destroys the Ed25519 key pair `key` (private and public objects,
    /// and anything the backend keeps for its name). A key already gone is
    /// [`HsmError::KeyNotFound`]. After this, health no longer looks for it.
    fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), HsmError>;

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

    /// Whether `tag` is the HMAC-SHA256 of `data` under the secret key
    /// `label`. A device that verifies MACs itself (YubiHSM verify-hmac)
    /// does so inside; the default computes the MAC in the HSM and compares
    /// in constant time. A missing key is [`HsmError::KeyNotFound`].
    fn verify_hmac_sha256(
        &self,
        label: &str,
        data: &[u8],
        tag: &[u8; 32],
    ) -> Result<bool, HsmError> {
        let mac = self.hmac_sha256(label, data)?;
        Ok(bool::from(subtle::ConstantTimeEq::ct_eq(
            &mac[..],
            &tag[..],
        )))
    }

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

    /// How often keywardd should call [`Hsm::health`] while idle, for a
    /// device that forgets an idle session (a YubiHSM 2 after 30 s): the
    /// next signature then does not wait for a new session, and a device
    /// that went away shows in health and the log before anyone signs.
    /// `None` (the default): no such need.
    fn keepalive(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Opens the backend `[hsm]` names (blocking: it loads the module and logs
/// in). The daemon puts the result behind an [`HsmExecutor`]; one-shot
/// tools (the CLI, the benchmark) may call it directly.
pub fn open(cfg: &HsmConfig) -> Result<Arc<dyn Hsm>, HsmError> {
    match &cfg.backend {
        HsmBackendConfig::Pkcs11(p) => {
            let hsm = pkcs11::Pkcs11Hsm::open(&pkcs11::Pkcs11Config {
                module: p.module.clone(),
                token_label: p.token_label.clone(),
                pin_file: p.pin_file.clone(),
                max_sessions: p.max_sessions.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(4, |n| n.get() * 2)
                }),
            })?;
            Ok(Arc::new(hsm))
        }
        HsmBackendConfig::YubiHsm(y) => Ok(Arc::new(yubihsm::YubiHsm::open(y)?)),
    }
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
