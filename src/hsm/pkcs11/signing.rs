//! Ed25519 signing with a key's cached handle, found again once if the
//! token no longer knows it.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};

use super::session::lock;
use super::{Pkcs11Hsm, device, rv};
use crate::hsm::{HsmError, HsmKey, foreign_key_ref};

impl Pkcs11Hsm {
    pub(super) fn sign_once(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
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
}
