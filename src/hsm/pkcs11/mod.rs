//! PKCS#11 backend on cryptoki: works with SoftHSM2 and vendor modules.
//!
//! - The module is loaded and `C_Initialize`d once per process
//!   ([`context`]); later opens in the same process share that context.
//! - The token is found by its label, never by slot number.
//! - The user logs in once; an anchor session keeps the login alive, and a
//!   pool of read-write sessions serves concurrent signers. The pool's lock
//!   is held only to take or return a session, never during a device call
//!   ([`session`]).
//! - An error that means the module lost its state (a session or login it
//!   forgot, a device that went away, a key found before that it no longer
//!   finds) re-opens it: close every session, finalize and initialize the
//!   module again, log in again, and retry the call once. Re-opens are
//!   serialized, at most one per [`REOPEN_INTERVAL`], backing off to
//!   [`REOPEN_INTERVAL_MAX`] while they fail; the lock that
//!   guards the current login is taken only to clone it, never during a
//!   device call. Several handles on one module in one process share its
//!   context, so a re-open by one finalizes it under the others: keywardd
//!   holds one.
//! - A key's [`KeyRef`] is its label (the key name): object handles are not
//!   stable across a re-open, so they are only cached per login.
//! - Ed25519 keys are generated inside the token as sensitive,
//!   non-extractable, private token objects; the attributes are read back
//!   and a key that does not have them is destroyed.
//!
//! This file holds the backend type, its [`Hsm`] impl and the error
//! mapping; the mechanisms live in submodules: `session` (context, login,
//! session pool), `recovery` (lost state, re-open, health), `keys` (Ed25519
//! generation, lookup and attribute checks), `signing`, `secret` (HMAC
//! approver keys) and `data` (data objects such as the checkpoint mark).

mod data;
mod keys;
mod recovery;
mod secret;
mod session;
mod signing;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use keys::{ED25519_NAME_DER, ED25519_OID_DER};
pub use keys::{KeyAttributes, parse_ec_point};
use recovery::ReopenState;
pub use recovery::{REOPEN_INTERVAL, REOPEN_INTERVAL_MAX};
pub use secret::SecretKeyAttributes;
pub use session::context;
use session::{Handles, Open, PooledSession, lock};

use super::{Hsm, HsmError, HsmKey, KeyRef};
use crate::types::KeyName;

/// Settings of [`Pkcs11Hsm::open`].
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token.
    pub token_label: String,
    /// PIN file (see [`super::pin::read_pin`]).
    pub pin_file: PathBuf,
    /// Largest number of pooled sessions (concurrent signatures).
    pub max_sessions: usize,
}

/// Return values that mean the module no longer has the session, the
/// login or the device this process had: only a re-open helps.
fn means_lost_state(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
            | RvError::GeneralError
    )
}

fn device(op: &'static str) -> impl Fn(CkError) -> HsmError {
    move |e| match rv(&e) {
        Some(code) if means_lost_state(code) => HsmError::StateLost {
            op,
            detail: e.to_string(),
        },
        _ => HsmError::Device {
            op,
            detail: e.to_string(),
        },
    }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// The slot holding the initialized token labelled `label`.
pub fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, HsmError> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(device("C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(device("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [] => Err(HsmError::TokenNotFound(label.to_owned())),
        [slot] => Ok(*slot),
        _ => Err(HsmError::Device {
            op: "find token",
            detail: format!(
                "{} tokens are labelled {label:?}; refusing to guess",
                found.len()
            ),
        }),
    }
}

/// An Ed25519 signer on a PKCS#11 token.
pub struct Pkcs11Hsm {
    cfg: Pkcs11Config,
    /// The login in force; replaced by a re-open. Its lock is held only to
    /// clone or swap it.
    current: RwLock<Arc<Open>>,
    /// Serializes re-opens; when the last one was tried and what is left
    /// to redo.
    reopened: Mutex<ReopenState>,
    /// Ed25519 keys found or generated since the start: not finding one
    /// of them later means the module lost its state.
    known: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("token", &self.cfg.token_label)
            .field("max_sessions", &self.cfg.max_sessions)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Hsm {
    /// Loads the module (once per process), finds the token by label, logs
    /// in with the PIN from `pin_file` and prepares the session pool.
    pub fn open(cfg: &Pkcs11Config) -> Result<Pkcs11Hsm, HsmError> {
        let (ctx, generation) = session::module_context(&cfg.module)?;
        let open = Open::new(cfg, ctx, generation)?;
        Ok(Pkcs11Hsm {
            cfg: cfg.clone(),
            current: RwLock::new(Arc::new(open)),
            reopened: Mutex::new(ReopenState::default()),
            known: Mutex::new(BTreeSet::new()),
        })
    }

    /// The login in force.
    fn current(&self) -> Arc<Open> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Takes a session of the login in force from its pool.
    fn session(&self) -> Result<PooledSession, HsmError> {
        self.current().session()
    }

    /// Runs `f` on a pooled session; a session whose call fails with a
    /// session-level error is discarded rather than reused.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, CkError>,
    ) -> Result<Result<T, CkError>, HsmError> {
        Self::with_session_of(&self.current(), f)
    }

    /// [`Self::with_session`] on the login `open` (so that object handles
    /// found through it are used with its sessions only).
    fn with_session_of<T>(
        open: &Arc<Open>,
        f: impl FnOnce(&Session) -> Result<T, CkError>,
    ) -> Result<Result<T, CkError>, HsmError> {
        let mut s = open.session()?;
        let result = f(s.get()?);
        if let Err(e) = &result
            && rv(e).is_some_and(means_lost_state)
        {
            s.broken = true;
        }
        Ok(result)
    }

    fn random_once(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError> {
        let n = u32::try_from(len).map_err(|_| HsmError::Device {
            op: "C_GenerateRandom",
            detail: "too many bytes".into(),
        })?;
        self.with_session(|s| s.generate_random_vec(n))?
            .map(zeroize::Zeroizing::new)
            .map_err(device("C_GenerateRandom"))
    }
}

impl Hsm for Pkcs11Hsm {
    fn backend(&self) -> &'static str {
        "pkcs11"
    }

    /// One worker per pooled session: the pool never makes a call wait.
    fn workers(&self) -> usize {
        self.cfg.max_sessions.max(1)
    }

    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let open = self.current();
        let s = open.session()?;
        let session = s.get()?;
        if self.find_pair(session, name.as_str())?.is_some() {
            return Err(HsmError::KeyExists(name.to_string()));
        }
        let (private, public) = match self.generate_with_params(session, name, ED25519_OID_DER) {
            Ok(pair) => pair,
            Err(e)
                if matches!(
                    rv(&e),
                    Some(RvError::AttributeValueInvalid | RvError::CurveNotSupported)
                ) =>
            {
                self.generate_with_params(session, name, ED25519_NAME_DER)
                    .map_err(device("C_GenerateKeyPair"))?
            }
            Err(e) => return Err(device("C_GenerateKeyPair")(e)),
        };
        // The same judgement as for a key found on the token
        // (`find_once`); SoftHSM2 always honours the template, so this
        // refusal is reached only on a token that ignores it.
        let weaknesses = Self::attributes_of(session, private)?.weaknesses();
        let public_key = self.public_key(session, public, name.as_str());
        if !weaknesses.is_empty() || public_key.is_err() {
            let _ = session.destroy_object(private);
            let _ = session.destroy_object(public);
            let why = if weaknesses.is_empty() {
                "its public key could not be read".to_owned()
            } else {
                weaknesses.join(", ")
            };
            return Err(HsmError::Device {
                op: "C_GenerateKeyPair",
                detail: format!(
                    "the token did not create key {name:?} as required (sensitive, non-extractable, private token object): {why}; the key was destroyed"
                ),
            });
        }
        lock(&open.handles).insert(name.to_string(), Handles { private });
        self.remember(name);
        Ok(HsmKey {
            name: name.clone(),
            public_key: public_key?,
            key_ref: KeyRef::label(name.as_str()),
        })
    }

    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        self.recovering(|| self.find_once(name))
    }

    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError> {
        self.recovering(|| self.list_once())
    }

    fn sign_ed25519(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        self.recovering(|| self.sign_once(key, message))
    }

    fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), HsmError> {
        let label = key
            .key_ref
            .as_label()
            .ok_or_else(|| super::foreign_key_ref("C_DestroyObject", key))?;
        let open = self.current();
        let s = open.session()?;
        let session = s.get()?;
        let (private, public) = self
            .find_pair(session, label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
        // Forgotten first: health must not look for a key being destroyed.
        lock(&open.handles).remove(label);
        lock(&self.known).remove(label);
        session
            .destroy_object(private)
            .map_err(device("C_DestroyObject"))?;
        session
            .destroy_object(public)
            .map_err(device("C_DestroyObject"))?;
        Ok(())
    }

    fn random(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError> {
        self.recovering(|| self.random_once(len))
    }

    fn import_hmac_key(&self, label: &str, key: &[u8]) -> Result<(), HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        if self.find_secret(session, label)?.is_some() {
            return Err(HsmError::KeyExists(label.to_owned()));
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(key.to_vec()),
        ];
        let h = session
            .create_object(&template)
            .map_err(device("C_CreateObject"))?;
        // Read back what the token made of it; refuse anything weaker.
        let attrs = Self::secret_attributes(session, h)?;
        if !attrs.is_protected() {
            let _ = session.destroy_object(h);
            return Err(HsmError::Device {
                op: "C_CreateObject",
                detail: format!(
                    "the token stored {label:?} without protection: {attrs:?}; destroyed"
                ),
            });
        }
        Ok(())
    }

    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        self.recovering(|| self.hmac_once(label, data))
    }

    fn delete_secret(&self, label: &str) -> Result<bool, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        match self.find_secret(session, label)? {
            Some(h) => {
                session
                    .destroy_object(h)
                    .map_err(device("C_DestroyObject"))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        // Safe to repeat: a store replaces every earlier object of the label.
        self.recovering(|| self.store_once(label, value))
    }

    fn load_data(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        self.recovering(|| self.load_once(label))
    }

    fn health(&self) -> Result<(), HsmError> {
        self.recovering(|| self.health_once())
    }
}
