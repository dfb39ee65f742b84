//! Provisioning a SoftHSM2 token for a development instance.
//!
//! The token lives in the instance directory (its own `softhsm2.conf` and
//! token directory). SoftHSM2 reads `SOFTHSM2_CONF` from the environment when
//! the module is initialized, so the caller sets it to [`conf_path`] before
//! anything loads the module (in `main`, while single-threaded).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cryptoki::session::UserType;
use secrecy::SecretString;
use zeroize::Zeroizing;

use super::HsmError;
use super::pkcs11::{context, find_token};

/// Files of a provisioned development token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevToken {
    /// The user PIN (mode 0400).
    pub pin_file: PathBuf,
    /// SoftHSM2's configuration for this token.
    pub conf_file: PathBuf,
    /// SoftHSM2's token directory.
    pub token_dir: PathBuf,
}

/// SoftHSM2's configuration file for keyward: file object store, tokens in
/// `token_dir`, errors only in the log; `what` names the instance in its
/// first line.
pub fn conf_text(what: &str, token_dir: &Path) -> String {
    format!(
        "# SoftHSM2 configuration of {what}.\n\
         directories.tokendir = {}\n\
         objectstore.backend = file\n\
         log.level = ERROR\n\
         slots.removable = false\n",
        token_dir.display()
    )
}

/// Path of the SoftHSM2 configuration of a token provisioned in `dir`.
pub fn conf_path(dir: &Path) -> PathBuf {
    dir.join("softhsm2.conf")
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> HsmError {
    move |e| HsmError::Device {
        op: "provision",
        detail: format!("{what}: {e}"),
    }
}

/// A random PIN of 48 hex digits (192 bits).
fn random_pin() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 24]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..]);
    Zeroizing::new(hex::encode(&bytes[..]))
}

/// Creates a SoftHSM2 token labelled `label` in `dir`: `softhsm2.conf`, a
/// token directory `tokens/` (0700), a token initialized with a random SO PIN
/// (discarded: a development token needs no security officer) and a random
/// user PIN written to `pin` (mode 0400, created exclusively).
///
/// `SOFTHSM2_CONF` must already be set to [`conf_path`]`(dir)` in this
/// process's environment.
pub fn provision_dev_token(dir: &Path, module: &Path, label: &str) -> Result<DevToken, HsmError> {
    let conf_file = conf_path(dir);
    let token_dir = dir.join("tokens");
    if std::env::var_os("SOFTHSM2_CONF").as_deref() != Some(conf_file.as_os_str()) {
        return Err(HsmError::Device {
            op: "provision",
            detail: format!(
                "SOFTHSM2_CONF must be set to {} before the module is loaded",
                conf_file.display()
            ),
        });
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&token_dir)
        .map_err(io(format!("cannot create {}", token_dir.display())))?;
    let conf = conf_text("a keyward development instance", &token_dir);
    write_new(&conf_file, 0o600, conf.as_bytes())?;

    let ctx = context(module)?;
    let slot = ctx
        .get_all_slots()
        .map_err(|e| HsmError::Device {
            op: "C_GetSlotList",
            detail: e.to_string(),
        })?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|t| !t.token_initialized()))
        .ok_or_else(|| HsmError::Device {
            op: "provision",
            detail: "SoftHSM2 offers no uninitialized slot".into(),
        })?;
    let so_pin = random_pin();
    let user_pin = random_pin();
    let so_secret = SecretString::from(so_pin.as_str().to_owned());
    let user_secret = SecretString::from(user_pin.as_str().to_owned());
    let dev = |op: &'static str| {
        move |e: cryptoki::error::Error| HsmError::Device {
            op,
            detail: e.to_string(),
        }
    };
    ctx.init_token(slot, &so_secret, label)
        .map_err(dev("C_InitToken"))?;
    // SoftHSM2 moves an initialized token to a new slot id: find it by label.
    let slot = find_token(&ctx, label)?;
    let session = ctx.open_rw_session(slot).map_err(dev("C_OpenSession"))?;
    session
        .login(UserType::So, Some(&so_secret))
        .map_err(dev("C_Login(SO)"))?;
    session.init_pin(&user_secret).map_err(dev("C_InitPIN"))?;
    session.logout().map_err(dev("C_Logout"))?;
    drop(session);

    let pin_file = dir.join("pin");
    write_new(&pin_file, 0o400, user_pin.as_bytes())?;
    Ok(DevToken {
        pin_file,
        conf_file,
        token_dir,
    })
}

fn write_new(path: &Path, mode: u32, content: &[u8]) -> Result<(), HsmError> {
    let what = format!("cannot write {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(what.clone()))?;
    f.write_all(content).map_err(io(what.clone()))?;
    f.sync_all().map_err(io(what))
}
