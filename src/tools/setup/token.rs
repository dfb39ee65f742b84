//! The PKCS#11 calls of set-up beyond what the backend does: setting the
//! user PIN as the security officer, and a login check.

use cryptoki::session::UserType;
use secrecy::SecretString;

use super::SetupError;
use crate::hsm::HsmError;

pub(super) fn cryptoki_err(op: &'static str) -> impl FnOnce(cryptoki::error::Error) -> HsmError {
    move |e| HsmError::Device {
        op,
        detail: e.to_string(),
    }
}

pub(super) fn init_user_pin(
    ctx: &cryptoki::context::Pkcs11,
    slot: cryptoki::slot::Slot,
    so: &SecretString,
    user: &SecretString,
) -> Result<(), SetupError> {
    let session = ctx
        .open_rw_session(slot)
        .map_err(cryptoki_err("C_OpenSession"))?;
    session
        .login(UserType::So, Some(so))
        .map_err(cryptoki_err("C_Login(SO)"))?;
    session.init_pin(user).map_err(cryptoki_err("C_InitPIN"))?;
    session.logout().map_err(cryptoki_err("C_Logout"))?;
    Ok(())
}

/// Logs in as the user with `pin` and out again.
pub(super) fn login_check(
    ctx: &cryptoki::context::Pkcs11,
    slot: cryptoki::slot::Slot,
    label: &str,
    pin: &SecretString,
) -> Result<(), SetupError> {
    let session = ctx
        .open_ro_session(slot)
        .map_err(cryptoki_err("C_OpenSession"))?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => {
            return Err(HsmError::Login {
                token: label.to_owned(),
                detail: e.to_string(),
            }
            .into());
        }
    }
    let _ = session.logout();
    Ok(())
}
