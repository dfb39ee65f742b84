//! Data objects (such as the checkpoint mark): stored as private,
//! non-modifiable token objects tagged with keyward's CKA_APPLICATION.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{Pkcs11Hsm, device};
use crate::hsm::HsmError;

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
    pub(super) fn store_once(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
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

    pub(super) fn load_once(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
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
