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

mod session;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;

pub use session::context;
use session::{Handles, Open, PooledSession, lock};

use super::{Hsm, HsmError, HsmKey, KeyRef, foreign_key_ref};
use crate::types::{KeyName, PublicKey};

/// DER of the Ed25519 curve OID 1.3.101.112 (RFC 8410), for CKA_EC_PARAMS.
const ED25519_OID_DER: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];
/// DER PrintableString "edwards25519", the other form PKCS#11 3.0 allows.
const ED25519_NAME_DER: &[u8] = &[
    0x13, 0x0c, b'e', b'd', b'w', b'a', b'r', b'd', b's', b'2', b'5', b'5', b'1', b'9',
];

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

/// PKCS#11 attributes of a private key, as the token reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAttributes {
    /// CKA_TOKEN: stored on the token.
    pub token: bool,
    /// CKA_PRIVATE: only visible after login.
    pub private: bool,
    /// CKA_SENSITIVE: the value cannot be read.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE: the key can be wrapped out.
    pub extractable: bool,
    /// CKA_ALWAYS_SENSITIVE.
    pub always_sensitive: bool,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: bool,
    /// CKA_KEY_TYPE is CKK_EC_EDWARDS.
    pub key_type_ec_edwards: bool,
}

impl KeyAttributes {
    /// Whether the key is as keyward requires: on the token, private,
    /// sensitive and not extractable, since its creation.
    pub fn is_protected(&self) -> bool {
        self.token
            && self.private
            && self.sensitive
            && !self.extractable
            && self.always_sensitive
            && self.never_extractable
    }

    /// Every attribute that makes the key unfit for keyward, each named as
    /// PKCS#11 names it with the value the token reports; empty when the
    /// key [is protected](KeyAttributes::is_protected) and an Ed25519 key.
    pub fn weaknesses(&self) -> Vec<&'static str> {
        let checks = [
            (
                !self.key_type_ec_edwards,
                "CKA_KEY_TYPE is not CKK_EC_EDWARDS",
            ),
            (!self.token, "CKA_TOKEN is false"),
            (!self.private, "CKA_PRIVATE is false"),
            (!self.sensitive, "CKA_SENSITIVE is false"),
            (self.extractable, "CKA_EXTRACTABLE is true"),
            (!self.always_sensitive, "CKA_ALWAYS_SENSITIVE is false"),
            (!self.never_extractable, "CKA_NEVER_EXTRACTABLE is false"),
        ];
        checks
            .into_iter()
            .filter_map(|(weak, what)| weak.then_some(what))
            .collect()
    }
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

/// Whether a failed read of `CKA_VALUE` says the value is withheld (the
/// key is sensitive, or unextractable so that the token reports it as
/// such) rather than that the call failed.
fn value_unreadable(e: &CkError) -> bool {
    matches!(rv(e), Some(RvError::AttributeSensitive))
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

/// Decodes CKA_EC_POINT of an Ed25519 public key: a DER OCTET STRING
/// (`04 20 ‖ key`) as PKCS#11 specifies, or the raw 32 bytes some modules
/// return.
pub fn parse_ec_point(point: &[u8]) -> Option<[u8; 32]> {
    match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest.try_into().ok(),
        raw if raw.len() == 32 => raw.try_into().ok(),
        _ => None,
    }
}

/// Least time between two re-opens of the module; it doubles after each
/// re-open that fails, up to [`REOPEN_INTERVAL_MAX`].
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(2);

/// Longest wait between two re-opens of a module that stays broken.
pub const REOPEN_INTERVAL_MAX: Duration = Duration::from_secs(64);

/// How long a re-open waits for the calls in progress to finish.
const REOPEN_DRAIN: Duration = Duration::from_secs(10);

#[derive(Default)]
struct ReopenState {
    /// When the last re-open was tried.
    last: Option<Instant>,
    /// Re-opens that failed in a row.
    failures: u32,
    /// The module was initialized again (this generation) but logging in
    /// failed: the next attempt initializes it again.
    failed_generation: Option<u64>,
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

    /// Whether `e` means the module lost its state: an error the module
    /// reports as such, or "not found" for an Ed25519 key it had.
    fn lost_state(&self, e: &HsmError) -> bool {
        match e {
            HsmError::StateLost { .. } => true,
            HsmError::KeyNotFound(name) => lock(&self.known).contains(name),
            _ => false,
        }
    }

    fn remember(&self, name: &KeyName) {
        lock(&self.known).insert(name.to_string());
    }

    /// Runs `f`; if it fails because the module lost its state, re-opens
    /// the module and runs `f` once more. Only for calls that may safely
    /// run twice (finding, signing, reading).
    fn recovering<T>(&self, f: impl Fn() -> Result<T, HsmError>) -> Result<T, HsmError> {
        let before = self.current();
        match f() {
            Err(e) if self.lost_state(&e) => match self.reopen(&before) {
                Ok(()) => f(),
                Err(why) => Err(HsmError::StateLost {
                    op: "re-open",
                    detail: format!("{e}; not re-opened: {why}"),
                }),
            },
            other => other,
        }
    }

    /// Replaces the login `stale` (unless someone did already): closes its
    /// sessions, finalizes and initializes the module again, and logs in.
    /// At most one attempt per [`REOPEN_INTERVAL`].
    fn reopen(&self, stale: &Arc<Open>) -> Result<(), HsmError> {
        let mut state = lock(&self.reopened);
        if !Arc::ptr_eq(&self.current(), stale) {
            return Ok(());
        }
        let interval = REOPEN_INTERVAL
            .saturating_mul(1 << state.failures.min(6))
            .min(REOPEN_INTERVAL_MAX);
        if let Some(at) = state.last
            && at.elapsed() < interval
        {
            return Err(HsmError::StateLost {
                op: "re-open",
                detail: format!(
                    "the last attempt was {} ms ago; the next may start {} s after it",
                    at.elapsed().as_millis(),
                    interval.as_secs()
                ),
            });
        }
        state.last = Some(Instant::now());
        // Counted as failed until it succeeds.
        state.failures = state.failures.saturating_add(1);
        tracing::warn!(
            token = %self.cfg.token_label,
            module = %self.cfg.module.display(),
            "the HSM module lost its state; closing its sessions and initializing it again"
        );
        if !stale.close(REOPEN_DRAIN) {
            return Err(HsmError::StateLost {
                op: "re-open",
                detail: format!(
                    "HSM calls were still running after {} s; the module was not re-initialized",
                    REOPEN_DRAIN.as_secs()
                ),
            });
        }
        let generation = state.failed_generation.take().unwrap_or(stale.generation);
        let opened = session::reinitialize(&self.cfg.module, generation).and_then(|(ctx, g)| {
            Open::new(&self.cfg, ctx, g).inspect_err(|_| state.failed_generation = Some(g))
        });
        let open = match opened {
            Ok(open) => open,
            Err(e) => {
                tracing::error!(error = %e, "re-opening the HSM module failed; the next call tries again");
                return Err(e);
            }
        };
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(open),
            Err(p) => *p.into_inner() = Arc::new(open),
        }
        state.failures = 0;
        tracing::warn!(token = %self.cfg.token_label, "HSM module re-opened and logged in again");
        Ok(())
    }

    /// Closes the current login and re-opens the module, as after a lost
    /// state (for tests and operators' drills); subject to
    /// [`REOPEN_INTERVAL`].
    pub fn reopen_now(&self) -> Result<(), HsmError> {
        let current = self.current();
        self.reopen(&current)
    }

    fn find_pair(
        &self,
        session: &Session,
        name: &str,
    ) -> Result<Option<(ObjectHandle, ObjectHandle)>, HsmError> {
        let label = name.as_bytes().to_vec();
        let privs = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC_EDWARDS),
                Attribute::Label(label.clone()),
            ])
            .map_err(device("C_FindObjects"))?;
        let pubs = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::EC_EDWARDS),
                Attribute::Label(label),
            ])
            .map_err(device("C_FindObjects"))?;
        match (privs.as_slice(), pubs.as_slice()) {
            ([], []) => Ok(None),
            ([p], [q]) => Ok(Some((*p, *q))),
            ([], _) | (_, []) => Err(HsmError::Device {
                op: "find key",
                detail: format!("key {name:?} has a private or a public half only"),
            }),
            _ => Err(HsmError::AmbiguousKey(name.to_owned())),
        }
    }

    fn public_key(
        &self,
        session: &Session,
        public: ObjectHandle,
        name: &str,
    ) -> Result<PublicKey, HsmError> {
        let attrs = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(device("C_GetAttributeValue"))?;
        let point = attrs.iter().find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p.clone()),
            _ => None,
        });
        point
            .as_deref()
            .and_then(parse_ec_point)
            .map(PublicKey)
            .ok_or_else(|| HsmError::Device {
                op: "read public key",
                detail: format!("key {name:?}: CKA_EC_POINT is not a 32-byte Ed25519 point"),
            })
    }

    /// The protection attributes of a key object (a private or a secret key).
    fn attributes_of(session: &Session, private: ObjectHandle) -> Result<KeyAttributes, HsmError> {
        let attrs = session
            .get_attributes(
                private,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::KeyType,
                ],
            )
            .map_err(device("C_GetAttributeValue"))?;
        // Missing attributes count as the unsafe answer.
        let mut a = KeyAttributes {
            token: false,
            private: false,
            sensitive: false,
            extractable: true,
            always_sensitive: false,
            never_extractable: false,
            key_type_ec_edwards: false,
        };
        for attr in attrs {
            match attr {
                Attribute::Token(v) => a.token = v,
                Attribute::Private(v) => a.private = v,
                Attribute::Sensitive(v) => a.sensitive = v,
                Attribute::Extractable(v) => a.extractable = v,
                Attribute::AlwaysSensitive(v) => a.always_sensitive = v,
                Attribute::NeverExtractable(v) => a.never_extractable = v,
                Attribute::KeyType(t) => a.key_type_ec_edwards = t == KeyType::EC_EDWARDS,
                _ => {}
            }
        }
        Ok(a)
    }

    /// The PKCS#11 attributes of the private key `name`.
    pub fn private_key_attributes(&self, name: &KeyName) -> Result<KeyAttributes, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let (private, _) = self
            .find_pair(session, name.as_str())?
            .ok_or_else(|| HsmError::KeyNotFound(name.to_string()))?;
        Self::attributes_of(session, private)
    }

    /// Tries to read the private key's value (CKA_VALUE). A sensitive key
    /// yields `None`; tests use this to show the key cannot be read.
    pub fn try_read_private_value(&self, name: &KeyName) -> Result<Option<Vec<u8>>, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let (private, _) = self
            .find_pair(session, name.as_str())?
            .ok_or_else(|| HsmError::KeyNotFound(name.to_string()))?;
        match session.get_attributes(private, &[AttributeType::Value]) {
            Ok(attrs) => Ok(attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })),
            Err(e) if matches!(rv(&e), Some(RvError::AttributeSensitive)) => Ok(None),
            Err(e) => Err(device("C_GetAttributeValue")(e)),
        }
    }

    fn private_handle(&self, open: &Arc<Open>, name: &str) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = lock(&open.handles).get(name) {
            return Ok(h.private);
        }
        let s = open.session()?;
        let (private, _) = self
            .find_pair(s.get()?, name)?
            .ok_or_else(|| HsmError::KeyNotFound(name.to_owned()))?;
        lock(&open.handles).insert(name.to_owned(), Handles { private });
        Ok(private)
    }

    fn generate_with_params(
        &self,
        session: &Session,
        name: &KeyName,
        params: &[u8],
    ) -> Result<(ObjectHandle, ObjectHandle), CkError> {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let label = name.as_str().as_bytes().to_vec();
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(params.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(id.to_vec()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label),
            Attribute::Id(id.to_vec()),
        ];
        let (pubh, privh) =
            session.generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public, &private)?;
        Ok((privh, pubh))
    }
}

/// Attributes of a secret (HMAC) key as the token reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretKeyAttributes {
    /// CKA_TOKEN.
    pub token: bool,
    /// CKA_PRIVATE.
    pub private: bool,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
}

impl SecretKeyAttributes {
    /// Stored on the token, private, sensitive and not extractable.
    pub fn is_protected(&self) -> bool {
        self.token && self.private && self.sensitive && !self.extractable
    }
}

impl Pkcs11Hsm {
    fn find_secret(
        &self,
        session: &Session,
        label: &str,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(device("C_FindObjects"))?;
        match found.as_slice() {
            [] => Ok(None),
            [h] => Ok(Some(*h)),
            _ => Err(HsmError::AmbiguousKey(label.to_owned())),
        }
    }

    fn secret_attributes(
        session: &Session,
        h: ObjectHandle,
    ) -> Result<SecretKeyAttributes, HsmError> {
        // The same reading as a private key's (missing attributes count as
        // the unsafe answer); a secret key has no pair, so only the flags.
        let a = Self::attributes_of(session, h)?;
        Ok(SecretKeyAttributes {
            token: a.token,
            private: a.private,
            sensitive: a.sensitive,
            extractable: a.extractable,
        })
    }

    /// The attributes of the secret key `label` (for tests and audits).
    pub fn secret_key_attributes(&self, label: &str) -> Result<SecretKeyAttributes, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let h = self
            .find_secret(session, label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
        Self::secret_attributes(session, h)
    }

    /// Tries to read a secret key's value; a key whose value the token
    /// will not reveal (sensitive or unextractable) yields `None`. Any other
    /// failure is an error, never taken for "unreadable".
    pub fn try_read_secret_value(&self, label: &str) -> Result<Option<Vec<u8>>, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let h = self
            .find_secret(session, label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
        // cryptoki leaves out an attribute the token reports as sensitive
        // or unavailable; a token may also fail the whole call with
        // CKR_ATTRIBUTE_SENSITIVE.
        match session.get_attributes(h, &[AttributeType::Value]) {
            Ok(attrs) => Ok(attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })),
            Err(e) if value_unreadable(&e) => Ok(None),
            Err(e) => Err(device("C_GetAttributeValue(CKA_VALUE)")(e)),
        }
    }
}

/// `CKA_APPLICATION` of keyward's data objects.
const DATA_APPLICATION: &str = "keyward";

impl Pkcs11Hsm {
    fn find_data(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(device("C_FindObjects(data)"))
    }

    /// (CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE) of each data object named
    /// `label` (for tests and audits).
    pub fn data_object_attributes(&self, label: &str) -> Result<Vec<(bool, bool, bool)>, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let mut out = Vec::new();
        for h in Self::find_data(session, label)? {
            let attrs = session
                .get_attributes(
                    h,
                    &[
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Modifiable,
                    ],
                )
                .map_err(device("C_GetAttributeValue(data)"))?;
            let (mut token, mut private, mut modifiable) = (false, false, true);
            for a in attrs {
                match a {
                    Attribute::Token(v) => token = v,
                    Attribute::Private(v) => private = v,
                    Attribute::Modifiable(v) => modifiable = v,
                    _ => {}
                }
            }
            out.push((token, private, modifiable));
        }
        Ok(out)
    }
}

impl Pkcs11Hsm {
    fn find_once(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let open = self.current();
        let s = open.session()?;
        let session = s.get()?;
        let (private, public) = self
            .find_pair(session, name.as_str())?
            .ok_or_else(|| HsmError::KeyNotFound(name.to_string()))?;
        // A key found on the token is used only if it is as protected as
        // one keyward generates: a key that can be read or wrapped out, or
        // ever could, is refused by name.
        let weaknesses = Self::attributes_of(session, private)?.weaknesses();
        if !weaknesses.is_empty() {
            return Err(HsmError::UnprotectedKey {
                key: name.to_string(),
                weaknesses: weaknesses.join(", "),
            });
        }
        let public_key = self.public_key(session, public, name.as_str())?;
        lock(&open.handles).insert(name.to_string(), Handles { private });
        self.remember(name);
        Ok(HsmKey {
            name: name.clone(),
            public_key,
            key_ref: KeyRef::label(name.as_str()),
        })
    }

    fn list_once(&self) -> Result<Vec<HsmKey>, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let privs = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC_EDWARDS),
            ])
            .map_err(device("C_FindObjects"))?;
        let mut names = Vec::new();
        for h in privs {
            let attrs = session
                .get_attributes(h, &[AttributeType::Label])
                .map_err(device("C_GetAttributeValue"))?;
            for a in attrs {
                if let Attribute::Label(l) = a
                    && let Ok(text) = String::from_utf8(l)
                    && let Ok(name) = KeyName::new(&text)
                {
                    names.push(name);
                }
            }
        }
        drop(s);
        names.sort();
        names.dedup();
        names.iter().map(|n| self.find_once(n)).collect()
    }

    fn sign_once(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
        // One login for the handle and the call: a handle is only
        // meaningful in the context that found it.
        let label = key
            .key_ref
            .as_label()
            .ok_or_else(|| foreign_key_ref("C_Sign", key))?;
        let open = self.current();
        let mut handle = self.private_handle(&open, label)?;
        for attempt in 0..2 {
            let result = Self::with_session_of(&open, |s| s.sign(&mechanism, handle, message))?;
            match result {
                Ok(sig) => {
                    return sig.as_slice().try_into().map_err(|_| HsmError::Device {
                        op: "C_Sign",
                        detail: format!("signature of {} bytes, expected 64", sig.len()),
                    });
                }
                Err(e)
                    if attempt == 0
                        && matches!(
                            rv(&e),
                            Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
                        ) =>
                {
                    lock(&open.handles).remove(label);
                    handle = self.private_handle(&open, label)?;
                }
                Err(e) => return Err(device("C_Sign")(e)),
            }
        }
        Err(HsmError::KeyNotFound(key.name.to_string()))
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

    fn hmac_once(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let h = self
            .find_secret(session, label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
        let mac = session
            .sign(&Mechanism::Sha256Hmac, h, data)
            .map_err(device("C_Sign(HMAC)"))?;
        mac.as_slice().try_into().map_err(|_| HsmError::Device {
            op: "C_Sign(HMAC)",
            detail: format!("MAC of {} bytes, expected 32", mac.len()),
        })
    }

    /// The login is in force and every Ed25519 key found since the start is
    /// found again by a fresh search (not a cached handle): a module that
    /// lost its objects fails here.
    fn health_once(&self) -> Result<(), HsmError> {
        let open = self.current();
        let info = open
            .with_anchor(|s| s.get_session_info())?
            .map_err(device("C_GetSessionInfo"))?;
        match info.session_state() {
            SessionState::RwUser | SessionState::RoUser => {}
            other => {
                return Err(HsmError::StateLost {
                    op: "C_GetSessionInfo",
                    detail: format!("session state is {other:?}, not logged in as user"),
                });
            }
        }
        let known: Vec<String> = lock(&self.known).iter().cloned().collect();
        if !known.is_empty() {
            let s = open.session()?;
            for name in &known {
                if self.find_pair(s.get()?, name)?.is_none() {
                    return Err(HsmError::KeyNotFound(name.clone()));
                }
            }
        }
        Ok(())
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

impl Pkcs11Hsm {
    fn store_once(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let old = Self::find_data(session, label)?;
        let template = [
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Application(DATA_APPLICATION.as_bytes().to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(value.to_vec()),
        ];
        session
            .create_object(&template)
            .map_err(device("C_CreateObject(data)"))?;
        for h in old {
            session
                .destroy_object(h)
                .map_err(device("C_DestroyObject(data)"))?;
        }
        Ok(())
    }

    fn load_once(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        let s = self.session()?;
        let session = s.get()?;
        let mut out = Vec::new();
        for h in Self::find_data(session, label)? {
            let attrs = session
                .get_attributes(h, &[AttributeType::Value])
                .map_err(device("C_GetAttributeValue(data)"))?;
            out.extend(attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_withheld_value_reads_as_unreadable() {
        use cryptoki::context::Function;
        let f = Function::GetAttributeValue;
        assert!(value_unreadable(&CkError::Pkcs11(
            RvError::AttributeSensitive,
            f
        )));
        for other in [
            RvError::DeviceError,
            RvError::SessionHandleInvalid,
            RvError::ObjectHandleInvalid,
            RvError::UserNotLoggedIn,
            RvError::AttributeTypeInvalid,
            RvError::GeneralError,
        ] {
            assert!(!value_unreadable(&CkError::Pkcs11(other, f)), "{other:?}");
        }
        assert!(!value_unreadable(&CkError::NullFunctionPointer));
    }

    #[test]
    fn ec_point_forms() {
        let key = [9u8; 32];
        let mut der = vec![0x04, 0x20];
        der.extend_from_slice(&key);
        assert_eq!(parse_ec_point(&der), Some(key));
        assert_eq!(parse_ec_point(&key), Some(key));
        assert_eq!(parse_ec_point(&der[..33]), None);
        assert_eq!(parse_ec_point(&[0x04, 0x21, 0]), None);
        assert_eq!(parse_ec_point(&[]), None);
    }

    #[test]
    fn each_unsafe_attribute_is_named_and_only_a_fully_protected_key_passes() {
        let good = KeyAttributes {
            token: true,
            private: true,
            sensitive: true,
            extractable: false,
            always_sensitive: true,
            never_extractable: true,
            key_type_ec_edwards: true,
        };
        assert!(good.weaknesses().is_empty());
        assert!(good.is_protected());
        let cases: [(KeyAttributes, &str); 7] = [
            (
                KeyAttributes {
                    key_type_ec_edwards: false,
                    ..good
                },
                "CKA_KEY_TYPE is not CKK_EC_EDWARDS",
            ),
            (
                KeyAttributes {
                    token: false,
                    ..good
                },
                "CKA_TOKEN is false",
            ),
            (
                KeyAttributes {
                    private: false,
                    ..good
                },
                "CKA_PRIVATE is false",
            ),
            (
                KeyAttributes {
                    sensitive: false,
                    ..good
                },
                "CKA_SENSITIVE is false",
            ),
            (
                KeyAttributes {
                    extractable: true,
                    ..good
                },
                "CKA_EXTRACTABLE is true",
            ),
            (
                KeyAttributes {
                    always_sensitive: false,
                    ..good
                },
                "CKA_ALWAYS_SENSITIVE is false",
            ),
            (
                KeyAttributes {
                    never_extractable: false,
                    ..good
                },
                "CKA_NEVER_EXTRACTABLE is false",
            ),
        ];
        for (attrs, named) in cases {
            assert_eq!(attrs.weaknesses(), [named], "{attrs:?}");
        }
    }
}
