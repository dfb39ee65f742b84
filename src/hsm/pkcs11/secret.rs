//! HMAC secret keys (approver keys): import, lookup, attribute checks and
//! HMAC-SHA256.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::keys::value_unreadable;
use super::{Pkcs11Hsm, device};
use crate::hsm::HsmError;

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
    pub(super) fn find_secret(
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

    pub(super) fn secret_attributes(
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

impl Pkcs11Hsm {
    pub(super) fn hmac_once(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
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
}
