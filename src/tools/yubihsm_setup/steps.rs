//! The device steps of set-up: creating an object with its secret,
//! proving a new authentication key, reading an object back, and undoing
//! a run that stopped half way.

use std::path::PathBuf;

use yubihsm::{Client, Connector, Credentials, authentication, object, wrap};
use zeroize::Zeroizing;

use super::plan::{PlannedObject, capability_names, domain_numbers};
use super::{ProvisionOptions, YubiHsmSetupError, files};

/// A secret of one object: an authentication key's password or the wrap
/// key's bytes.
pub(super) enum Secret {
    Password(Zeroizing<String>),
    WrapKey(Zeroizing<Vec<u8>>),
}

impl Secret {
    /// The credential file's content.
    pub(super) fn file_text(&self, id: u16) -> Zeroizing<String> {
        match self {
            Secret::Password(p) => Zeroizing::new(format!("{id}:{}", p.as_str())),
            Secret::WrapKey(k) => Zeroizing::new(format!("{id}:{}", hex::encode(&k[..]))),
        }
    }
}

pub(super) fn random_bytes(n: usize) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(vec![0u8; n]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..]);
    bytes
}

/// What a run has done so far, to undo it.
pub(super) struct Run<'a> {
    pub(super) factory: &'a Client,
    pub(super) written: Vec<PathBuf>,
    pub(super) created: Vec<(u16, object::Type)>,
}

impl Run<'_> {
    /// Deletes the objects created and the files written, newest first;
    /// returns `cause`, or what is left if undoing fails.
    pub(super) fn undo(self, cause: YubiHsmSetupError) -> YubiHsmSetupError {
        let mut left = Vec::new();
        let mut failure = None;
        for (id, t) in self.created.iter().rev() {
            if let Err(e) = self.factory.delete_object(*id, *t) {
                left.push(format!("{id:#06x} ({t:?})"));
                failure.get_or_insert(e.to_string());
            }
        }
        files::remove_written(&self.written);
        match failure {
            None => cause,
            Some(detail) => YubiHsmSetupError::RollbackIncomplete {
                cause: cause.to_string(),
                detail,
                left,
            },
        }
    }
}

/// Creates `o` with its secret through the factory session.
pub(super) fn create(
    factory: &Client,
    o: &PlannedObject,
    secret: &Secret,
) -> Result<(), yubihsm::client::Error> {
    let label = object::Label::from(o.label);
    match secret {
        Secret::Password(password) => factory.put_authentication_key(
            o.id,
            label,
            o.domains,
            o.capabilities,
            o.delegated,
            authentication::Algorithm::YubicoAes,
            authentication::Key::derive_from_password(password.as_bytes()),
        ),
        Secret::WrapKey(bytes) => factory.put_wrap_key(
            o.id,
            label,
            o.domains,
            o.capabilities,
            o.delegated,
            wrap::Algorithm::Aes256Ccm,
            bytes.to_vec(),
        ),
    }
    .map(|_| ())
}

/// Opens a session with the new key `o` and reads it back.
pub(super) fn prove(
    connector: &Connector,
    o: &PlannedObject,
    password: &Zeroizing<String>,
    opts: &ProvisionOptions,
) -> Result<Client, String> {
    let password: Zeroizing<String> = {
        #[cfg(feature = "test-hooks")]
        let wrong = opts.sabotage_proof == Some(o.role);
        #[cfg(not(feature = "test-hooks"))]
        let wrong = {
            let _ = opts;
            false
        };
        if wrong {
            Zeroizing::new(format!("{}-sabotaged", password.as_str()))
        } else {
            password.clone()
        }
    };
    let client = Client::open(
        connector.clone(),
        Credentials::from_password(o.id, password.as_bytes()),
        false,
    )
    .map_err(|e| format!("it opens no session: {e}"))?;
    check_info(&client, o)?;
    Ok(client)
}

/// Whether the device reports `o` as it was asked to create it.
pub(super) fn check_info(client: &Client, o: &PlannedObject) -> Result<(), String> {
    let info = client
        .get_object_info(o.id, o.object_type)
        .map_err(|e| format!("cannot read it back: {e}"))?;
    let label = info.label.try_as_str().unwrap_or("").to_owned();
    if info.capabilities != o.capabilities
        || info.delegated_capabilities != o.delegated
        || info.domains != o.domains
        || label != o.label
    {
        return Err(format!(
            "the device reports label {label:?}, capabilities [{}], delegated [{}], domains {:?}",
            capability_names(info.capabilities),
            capability_names(info.delegated_capabilities),
            domain_numbers(info.domains)
        ));
    }
    Ok(())
}
