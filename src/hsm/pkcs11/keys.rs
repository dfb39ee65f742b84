//! Ed25519 key pairs: generation, lookup by label, and the attribute checks
//! that refuse a key the token would let out.

use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::session::{Handles, Open, lock};
use super::{Pkcs11Hsm, device, rv};
use crate::hsm::{HsmError, HsmKey, KeyRef};
use crate::types::{KeyName, PublicKey};

/// DER of the Ed25519 curve OID 1.3.101.112 (RFC 8410), for CKA_EC_PARAMS.
pub(super) const ED25519_OID_DER: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];
/// DER PrintableString "edwards25519", the other form PKCS#11 3.0 allows.
pub(super) const ED25519_NAME_DER: &[u8] = &[
    0x13, 0x0c, b'e', b'd', b'w', b'a', b'r', b'd', b's', b'2', b'5', b'5', b'1', b'9',
];

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
    /// CKA_SIGN: the key may sign (a token refuses C_SignInit otherwise).
    pub sign: bool,
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
    /// key [is protected](KeyAttributes::is_protected), an Ed25519 key and
    /// allowed to sign.
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
            (!self.sign, "CKA_SIGN is false"),
        ];
        checks
            .into_iter()
            .filter_map(|(weak, what)| weak.then_some(what))
            .collect()
    }
}

/// Whether a failed read of `CKA_VALUE` says the value is withheld (the
/// key is sensitive, or unextractable so that the token reports it as
/// such) rather than that the call failed.
pub(super) fn value_unreadable(e: &CkError) -> bool {
    matches!(rv(e), Some(RvError::AttributeSensitive))
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

impl Pkcs11Hsm {
    pub(super) fn find_pair(
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

    pub(super) fn public_key(
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
    pub(super) fn attributes_of(
        session: &Session,
        private: ObjectHandle,
    ) -> Result<KeyAttributes, HsmError> {
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
                    AttributeType::Sign,
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
            sign: false,
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
                Attribute::Sign(v) => a.sign = v,
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

    pub(super) fn private_handle(
        &self,
        open: &Arc<Open>,
        name: &str,
    ) -> Result<ObjectHandle, HsmError> {
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

    pub(super) fn generate_with_params(
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

    pub(super) fn find_once(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
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

    pub(super) fn list_once(&self) -> Result<Vec<HsmKey>, HsmError> {
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
            // A key another session destroys meanwhile (a retirement) is
            // not listed: its handle is no longer valid.
            let attrs = match session.get_attributes(h, &[AttributeType::Label]) {
                Ok(attrs) => attrs,
                Err(e) if rv(&e) == Some(RvError::ObjectHandleInvalid) => continue,
                Err(e) => return Err(device("C_GetAttributeValue")(e)),
            };
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
        let mut keys = Vec::with_capacity(names.len());
        for n in &names {
            match self.find_once(n) {
                Ok(k) => keys.push(k),
                // Destroyed between the listing and the lookup.
                Err(HsmError::KeyNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(keys)
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
            sign: true,
        };
        assert!(good.weaknesses().is_empty());
        assert!(good.is_protected());
        let cases: [(KeyAttributes, &str); 8] = [
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
            (
                KeyAttributes {
                    sign: false,
                    ..good
                },
                "CKA_SIGN is false",
            ),
        ];
        for (attrs, named) in cases {
            assert_eq!(attrs.weaknesses(), [named], "{attrs:?}");
        }
    }
}
