//! The YubiHSM 2 backend, over the device's native protocol (the `yubihsm`
//! crate): through `yubihsm-connector` over HTTP on 127.0.0.1, or on USB.
//!
//! - **One command at a time.** The device serializes every command and the
//!   crate's client holds one session, so the backend asks for one worker
//!   ([`Hsm::workers`]); the [`crate::hsm::HsmExecutor`] queues the rest
//!   with its bound and answers `hsm_busy` when the queue stays full.
//! - **Least privilege.** keywardd authenticates with the signer's own
//!   authentication key (`hsm.credential_file`, see [`credentials`]); the
//!   objects it creates live in `hsm.domains`. Ed25519 keys are generated on
//!   the device with the capability `sign-eddsa` only (plus
//!   `exportable-under-wrap` when `hsm.exportable_under_wrap` asks for
//!   backups), approver keys are `hmac-key` objects with `sign-hmac` and
//!   `verify-hmac`, data objects are opaque objects (both also
//!   `exportable-under-wrap` when backups are on). A key that was imported
//!   rather than generated on the device, that may do more than sign, or
//!   that could be exported when backups are off is refused
//!   ([`HsmError::UnprotectedKey`]).
//! - **Names.** Labels hold 40 bytes; [`names`] maps longer names.
//! - **Sandbox.** On USB, keywardd's seccomp filter needs libusb's calls:
//!   [`sandbox`].
//! - **Device loss.** A connector that is down, a USB device unplugged or a
//!   session the device forgot fails the call with
//!   [`HsmError::StateLost`] (`hsm_unavailable`) and drops the client; the
//!   next call opens a new session, so signing resumes by itself when the
//!   device is back. Calls that change nothing are retried once on a fresh
//!   session first (an expired session is normal after 30 s of silence).

pub mod credentials;
#[cfg(feature = "yubihsm-mock")]
pub mod mock_connector;
pub mod names;
pub mod sandbox;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

pub use yubihsm::Credentials;
use yubihsm::object::{self, Filter, Origin};
use yubihsm::{Capability, Client, Connector, Domain, asymmetric};
use zeroize::Zeroizing;

use super::{HsmError, HsmKey, KeyRef, foreign_key_ref};
use crate::config::{YubiHsmBackendConfig, YubiHsmConnector};
use crate::types::{KeyName, PublicKey};

/// How often keywardd pings an idle YubiHSM 2: the device closes a
/// session after 30 s without a command.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Largest opaque object a YubiHSM 2 stores.
pub const OPAQUE_MAX: usize = 1968;

/// What the backend needs besides the connector and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YubiHsmSettings {
    /// Domains of the objects keyward creates.
    pub domains: Vec<u8>,
    /// Whether Ed25519 keys may be exported under a wrap key.
    pub exportable_under_wrap: bool,
    /// A name for health and errors (the connector, e.g. `http://127.0.0.1:12345`).
    pub device: String,
}

/// A YubiHSM 2 behind one client and one session.
pub struct YubiHsm {
    connector: Connector,
    credentials: Credentials,
    domains: Domain,
    key_capabilities: Capability,
    /// What approver keys and data objects may do besides their use:
    /// exportable-under-wrap when backups are on (`keyward backup create`
    /// exports them with the keys), nothing otherwise.
    extra_capabilities: Capability,
    settings: YubiHsmSettings,
    client: Mutex<Option<Client>>,
    /// Ed25519 keys found or made since the start, by name: what health
    /// checks are still there.
    known: Mutex<BTreeMap<String, u16>>,
}

impl std::fmt::Debug for YubiHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("YubiHsm")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The crate's connector for `connector`.
pub fn connector_for(connector: &YubiHsmConnector, timeout_ms: u64) -> Result<Connector, HsmError> {
    match connector {
        YubiHsmConnector::Http { addr, port } => Ok(Connector::http(&yubihsm::HttpConfig {
            addr: addr.clone(),
            port: *port,
            timeout_ms,
        })),
        YubiHsmConnector::Usb { serial } => {
            let serial = match serial {
                Some(s) => Some(s.parse().map_err(|e| HsmError::Device {
                    op: "open",
                    detail: format!("serial number {s:?}: {e}"),
                })?),
                None => None,
            };
            Ok(Connector::usb(&yubihsm::UsbConfig { serial, timeout_ms }))
        }
    }
}

/// The crate's domain set of `domains` (1-16).
pub fn domain_set(domains: &[u8]) -> Result<Domain, HsmError> {
    let mut set = Domain::empty();
    for d in domains {
        set |= Domain::at(usize::from(*d)).map_err(|e| HsmError::Device {
            op: "open",
            detail: format!("domain {d}: {e}"),
        })?;
    }
    if set.is_empty() {
        return Err(HsmError::Device {
            op: "open",
            detail: "no domain for keyward's objects".into(),
        });
    }
    Ok(set)
}

impl YubiHsm {
    /// Opens the device `cfg` names with the credentials of its credential
    /// file, and proves the session works (blocking).
    pub fn open(cfg: &YubiHsmBackendConfig) -> Result<YubiHsm, HsmError> {
        let (_, credentials) = credentials::read_credentials(&cfg.credential_file)?;
        let connector = connector_for(&cfg.connector, cfg.timeout_ms)?;
        YubiHsm::with_connector(
            connector,
            credentials,
            YubiHsmSettings {
                domains: cfg.domains.clone(),
                exportable_under_wrap: cfg.exportable_under_wrap,
                device: cfg.connector.to_string(),
            },
        )
    }

    /// Opens a session through `connector` (any of the crate's, MockHsm's
    /// included) and proves it works.
    pub fn with_connector(
        connector: Connector,
        credentials: Credentials,
        settings: YubiHsmSettings,
    ) -> Result<YubiHsm, HsmError> {
        let domains = domain_set(&settings.domains)?;
        let extra_capabilities = if settings.exportable_under_wrap {
            Capability::EXPORTABLE_UNDER_WRAP
        } else {
            Capability::empty()
        };
        let key_capabilities = Capability::SIGN_EDDSA | extra_capabilities;
        let hsm = YubiHsm {
            connector,
            credentials,
            domains,
            key_capabilities,
            extra_capabilities,
            settings,
            client: Mutex::new(None),
            known: Mutex::new(BTreeMap::new()),
        };
        hsm.call("open", Retry::No, |c| c.ping().map(|_| ()))?;
        Ok(hsm)
    }

    /// A fresh MockHsm in this process (the yubihsm crate's software
    /// YubiHSM 2), through its factory authentication key (id 1,
    /// password `password`). Test and development builds only.
    #[cfg(feature = "yubihsm-mock")]
    pub fn mock(settings: YubiHsmSettings) -> Result<YubiHsm, HsmError> {
        YubiHsm::with_connector(Connector::mockhsm(), Credentials::default(), settings)
    }

    /// Runs `f` on the open client, opening one (a new session) first if
    /// there is none. A failure of the connection or session drops the
    /// client so the next call starts afresh; with [`Retry::Once`] the call
    /// is made once more on the fresh session first.
    fn call<T>(
        &self,
        op: &'static str,
        retry: Retry,
        f: impl Fn(&Client) -> Result<T, yubihsm::client::Error>,
    ) -> Result<T, HsmError> {
        match self.call_once(op, &f) {
            Err(HsmError::StateLost { .. }) if retry == Retry::Once => self.call_once(op, &f),
            other => other,
        }
    }

    fn call_once<T>(
        &self,
        op: &'static str,
        f: &impl Fn(&Client) -> Result<T, yubihsm::client::Error>,
    ) -> Result<T, HsmError> {
        let mut slot = lock(&self.client);
        if slot.is_none() {
            let client = Client::open(self.connector.clone(), self.credentials.clone(), true)
                .map_err(|e| self.error(op, &e))?;
            *slot = Some(client);
        }
        let Some(client) = slot.as_ref() else {
            return Err(HsmError::Stopped { op });
        };
        match f(client) {
            Ok(v) => Ok(v),
            Err(e) => {
                let err = self.error(op, &e);
                if matches!(err, HsmError::StateLost { .. }) {
                    *slot = None;
                }
                Err(err)
            }
        }
    }

    /// Maps a client error: anything about the connection or the session is
    /// [`HsmError::StateLost`] (the client is dropped and re-opened), the
    /// device's refusals are [`HsmError::Device`].
    fn error(&self, op: &'static str, e: &yubihsm::client::Error) -> HsmError {
        use yubihsm::client::ErrorKind as K;
        let detail = format!("{} ({}): {e}", self.settings.device, error_chain(e));
        match e.kind() {
            K::DeviceError | K::ResponseError => HsmError::Device { op, detail },
            K::AuthenticationError
            | K::ClosedSessionError
            | K::ConnectorError
            | K::CreateFailed
            | K::ProtocolError => HsmError::StateLost { op, detail },
        }
    }

    /// Objects of `object_type` labelled `label`.
    fn objects(
        &self,
        op: &'static str,
        object_type: object::Type,
        label: &str,
        algorithm: Option<yubihsm::Algorithm>,
    ) -> Result<Vec<u16>, HsmError> {
        let label = object_label(label)?;
        let mut filters = vec![Filter::Type(object_type), Filter::Label(label)];
        if let Some(a) = algorithm {
            filters.push(Filter::Algorithm(a));
        }
        let entries = self.call(op, Retry::Once, |c| c.list_objects(&filters))?;
        Ok(entries.into_iter().map(|e| e.object_id).collect())
    }

    /// A free object id of `object_type`.
    fn free_id(&self, op: &'static str, object_type: object::Type) -> Result<u16, HsmError> {
        let taken = self.call(op, Retry::Once, |c| {
            c.list_objects(&[Filter::Type(object_type)])
        })?;
        let ids: Vec<u16> = taken.iter().map(|e| e.object_id).collect();
        names::free_id(&ids).ok_or_else(|| HsmError::Device {
            op,
            detail: format!("no free object id for a {object_type:?} object"),
        })
    }

    /// The one Ed25519 key labelled for `name`, checked, with its public key.
    fn find_key(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let label = names::device_label(name.as_str());
        let ids = self.objects(
            "find",
            object::Type::AsymmetricKey,
            &label,
            Some(ed25519_alg()),
        )?;
        let id = match ids.as_slice() {
            [] => return Err(HsmError::KeyNotFound(name.to_string())),
            [id] => *id,
            _ => return Err(HsmError::AmbiguousKey(name.to_string())),
        };
        self.key_at(name, id)
    }

    /// The Ed25519 key `id`, named `name`, checked for keyward's
    /// protection rules.
    fn key_at(&self, name: &KeyName, id: u16) -> Result<HsmKey, HsmError> {
        let info = self.call("find", Retry::Once, |c| {
            c.get_object_info(id, object::Type::AsymmetricKey)
        })?;
        let weaknesses = self.weaknesses(&info);
        if !weaknesses.is_empty() {
            return Err(HsmError::UnprotectedKey {
                key: name.to_string(),
                weaknesses: weaknesses.join(", "),
            });
        }
        let public = self.call("find", Retry::Once, |c| c.get_public_key(id))?;
        let bytes: [u8; 32] = public.as_ref().try_into().map_err(|_| HsmError::Device {
            op: "find",
            detail: format!(
                "key {:?} (object {id:#06x}) has a {}-byte public key, not an Ed25519 one",
                name.as_str(),
                public.as_ref().len()
            ),
        })?;
        lock(&self.known).insert(name.to_string(), id);
        Ok(HsmKey {
            name: name.clone(),
            public_key: PublicKey(bytes),
            key_ref: KeyRef::object_id(id),
        })
    }

    /// Why the key `info` describes is not fit for keyward (empty if fit).
    fn weaknesses(&self, info: &object::Info) -> Vec<String> {
        let mut weak = Vec::new();
        if !matches!(info.origin, Origin::Generated | Origin::WrappedGenerated) {
            weak.push(format!(
                "origin is {:?}: the private key existed outside the device",
                info.origin
            ));
        }
        if !info.capabilities.contains(Capability::SIGN_EDDSA) {
            weak.push("capability sign-eddsa is missing".to_owned());
        }
        let allowed = Capability::SIGN_EDDSA | Capability::EXPORTABLE_UNDER_WRAP;
        let extra = info.capabilities - allowed;
        if !extra.is_empty() {
            weak.push(format!("it may do more than sign ({extra:?})"));
        }
        if info
            .capabilities
            .contains(Capability::EXPORTABLE_UNDER_WRAP)
            && !self.settings.exportable_under_wrap
        {
            weak.push(
                "capability exportable-under-wrap is set but hsm.exportable_under_wrap is false"
                    .to_owned(),
            );
        }
        weak
    }

    /// The one HMAC key labelled for `label`.
    fn hmac_key(&self, op: &'static str, label: &str) -> Result<Option<u16>, HsmError> {
        let ids = self.objects(
            op,
            object::Type::HmacKey,
            &names::device_label(label),
            Some(yubihsm::Algorithm::Hmac(yubihsm::hmac::Algorithm::Sha256)),
        )?;
        match ids.as_slice() {
            [] => Ok(None),
            [id] => Ok(Some(*id)),
            _ => Err(HsmError::AmbiguousKey(label.to_owned())),
        }
    }

    /// Stores `value` as a new opaque object labelled `label` (device form).
    fn put_opaque(&self, op: &'static str, label: &str, value: &[u8]) -> Result<u16, HsmError> {
        if value.len() > OPAQUE_MAX {
            return Err(HsmError::Device {
                op,
                detail: format!(
                    "{} bytes do not fit an opaque object (at most {OPAQUE_MAX})",
                    value.len()
                ),
            });
        }
        let id = self.free_id(op, object::Type::Opaque)?;
        let object_label = object_label(label)?;
        self.call(op, Retry::No, |c| {
            c.put_opaque(
                id,
                object_label.clone(),
                self.domains,
                self.extra_capabilities,
                yubihsm::opaque::Algorithm::Data,
                value.to_vec(),
            )
        })
    }

    fn delete(&self, op: &'static str, id: u16, t: object::Type) -> Result<(), HsmError> {
        self.call(op, Retry::No, |c| c.delete_object(id, t))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// The call changes nothing: it may be made again on a new session.
    Once,
    /// The call changes the device: never made twice.
    No,
}

fn ed25519_alg() -> yubihsm::Algorithm {
    yubihsm::Algorithm::Asymmetric(asymmetric::Algorithm::Ed25519)
}

fn object_label(label: &str) -> Result<object::Label, HsmError> {
    object::Label::from_bytes(label.as_bytes()).map_err(|e| HsmError::Device {
        op: "label",
        detail: format!("label {label:?}: {e}"),
    })
}

/// The error and its sources, for the detail of an error.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        "no detail".to_owned()
    } else {
        parts.join(": ")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl super::Hsm for YubiHsm {
    fn backend(&self) -> &'static str {
        "yubihsm"
    }

    fn workers(&self) -> usize {
        1
    }

    /// Half the device's 30-second session timeout.
    fn keepalive(&self) -> Option<std::time::Duration> {
        Some(KEEPALIVE)
    }

    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let label = names::device_label(name.as_str());
        if !self
            .objects("generate", object::Type::AsymmetricKey, &label, None)?
            .is_empty()
        {
            return Err(HsmError::KeyExists(name.to_string()));
        }
        // The full name first, so a key with a hashed label always has it.
        let record = names::name_record_label(&label);
        if let Some(record) = &record {
            for id in self.objects("generate", object::Type::Opaque, record, None)? {
                self.delete("generate", id, object::Type::Opaque)?;
            }
            self.put_opaque("generate", record, name.as_str().as_bytes())?;
        }
        let id = self.free_id("generate", object::Type::AsymmetricKey)?;
        let object_label = object_label(&label)?;
        self.call("generate", Retry::No, |c| {
            c.generate_asymmetric_key(
                id,
                object_label.clone(),
                self.domains,
                self.key_capabilities,
                asymmetric::Algorithm::Ed25519,
            )
        })?;
        self.key_at(name, id)
    }

    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        self.find_key(name)
    }

    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError> {
        let entries = self.call("list", Retry::Once, |c| {
            c.list_objects(&[
                Filter::Type(object::Type::AsymmetricKey),
                Filter::Algorithm(ed25519_alg()),
            ])
        })?;
        let mut keys = Vec::new();
        for entry in entries {
            let info = self.call("list", Retry::Once, |c| {
                c.get_object_info(entry.object_id, object::Type::AsymmetricKey)
            })?;
            let label = info.label.try_as_str().unwrap_or("").to_owned();
            let name = match names::name_record_label(&label) {
                None => label,
                Some(record) => {
                    let ids = self.objects("list", object::Type::Opaque, &record, None)?;
                    let Some(id) = ids.first() else {
                        tracing::warn!(
                            object = entry.object_id,
                            "an Ed25519 key with a hashed label has no name record; not listed"
                        );
                        continue;
                    };
                    let bytes = self.call("list", Retry::Once, |c| c.get_opaque(*id))?;
                    String::from_utf8(bytes).unwrap_or_default()
                }
            };
            // Keys of other applications may share the device: only names
            // keyward could have given are listed.
            let Ok(name) = KeyName::new(&name) else {
                continue;
            };
            keys.push(self.key_at(&name, entry.object_id)?);
        }
        keys.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        Ok(keys)
    }

    fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), HsmError> {
        let id = key
            .key_ref
            .as_object_id()
            .ok_or_else(|| foreign_key_ref("destroy", key))?;
        let info = match self.call("destroy", Retry::Once, |c| {
            c.get_object_info(id, object::Type::AsymmetricKey)
        }) {
            Ok(info) => info,
            Err(HsmError::Device { .. }) => {
                return Err(HsmError::KeyNotFound(key.name.to_string()));
            }
            Err(e) => return Err(e),
        };
        lock(&self.known).retain(|_, known| *known != id);
        self.delete("destroy", id, object::Type::AsymmetricKey)?;
        // A hashed label's name record goes with its key.
        if let Some(record) = info
            .label
            .try_as_str()
            .ok()
            .and_then(names::name_record_label)
        {
            for rid in self.objects("destroy", object::Type::Opaque, &record, None)? {
                self.delete("destroy", rid, object::Type::Opaque)?;
            }
        }
        Ok(())
    }

    fn sign_ed25519(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let id = key
            .key_ref
            .as_object_id()
            .ok_or_else(|| foreign_key_ref("sign", key))?;
        let sig = self.call("sign", Retry::Once, |c| {
            c.sign_ed25519(id, message.to_vec())
        })?;
        Ok(sig.to_bytes())
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        // The device returns at most about 2 KB per command.
        while out.len() < len {
            let n = (len - out.len()).min(1024);
            let chunk =
                Zeroizing::new(self.call("random", Retry::Once, |c| c.get_pseudo_random(n))?);
            if chunk.len() != n {
                return Err(HsmError::Device {
                    op: "random",
                    detail: format!("asked for {n} random bytes, got {}", chunk.len()),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    fn import_hmac_key(&self, label: &str, key: &[u8]) -> Result<(), HsmError> {
        if self.hmac_key("import_hmac", label)?.is_some() {
            return Err(HsmError::KeyExists(label.to_owned()));
        }
        let id = self.free_id("import_hmac", object::Type::HmacKey)?;
        let object_label = object_label(&names::device_label(label))?;
        let key = Zeroizing::new(key.to_vec());
        self.call("import_hmac", Retry::No, |c| {
            c.put_hmac_key(
                id,
                object_label.clone(),
                self.domains,
                Capability::SIGN_HMAC | Capability::VERIFY_HMAC | self.extra_capabilities,
                yubihsm::hmac::Algorithm::Sha256,
                key.to_vec(),
            )
        })?;
        Ok(())
    }

    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let id = self
            .hmac_key("hmac", label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
        let tag = self.call("hmac", Retry::Once, |c| c.sign_hmac(id, data.to_vec()))?;
        tag.as_slice().try_into().map_err(|_| HsmError::Device {
            op: "hmac",
            detail: format!("an HMAC-SHA256 tag of {} bytes", tag.len()),
        })
    }

    /// Verified inside the device (verify-hmac): the expected tag never
    /// leaves it. The device's "does not verify" answer is `false`.
    fn verify_hmac_sha256(
        &self,
        label: &str,
        data: &[u8],
        tag: &[u8; 32],
    ) -> Result<bool, HsmError> {
        let id = self
            .hmac_key("hmac", label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
        self.call("hmac", Retry::Once, |c| {
            match c.verify_hmac(id, data.to_vec(), tag.to_vec()) {
                Ok(()) => Ok(true),
                // The crate reports a tag that does not verify (the device
                // answered 0) as a response error; any other response
                // error also refuses (fail closed).
                Err(e) if *e.kind() == yubihsm::client::ErrorKind::ResponseError => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn delete_secret(&self, label: &str) -> Result<bool, HsmError> {
        match self.hmac_key("delete_secret", label)? {
            None => Ok(false),
            Some(id) => {
                self.delete("delete_secret", id, object::Type::HmacKey)?;
                Ok(true)
            }
        }
    }

    fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        let device_label = names::device_label(label);
        let old = self.objects("store_data", object::Type::Opaque, &device_label, None)?;
        self.put_opaque("store_data", &device_label, value)?;
        for id in old {
            self.delete("store_data", id, object::Type::Opaque)?;
        }
        Ok(())
    }

    fn load_data(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        let device_label = names::device_label(label);
        let mut values = Vec::new();
        for id in self.objects("load_data", object::Type::Opaque, &device_label, None)? {
            values.push(self.call("load_data", Retry::Once, |c| c.get_opaque(id))?);
        }
        Ok(values)
    }

    fn health(&self) -> Result<(), HsmError> {
        self.call("health", Retry::Once, |c| c.ping().map(|_| ()))?;
        let known: Vec<(String, u16)> = lock(&self.known)
            .iter()
            .map(|(n, id)| (n.clone(), *id))
            .collect();
        for (name, id) in known {
            let info = self.call("health", Retry::Once, |c| {
                c.get_object_info(id, object::Type::AsymmetricKey)
            });
            match info {
                Ok(info) if info.label.try_as_str().ok() == Some(&names::device_label(&name)) => {}
                Ok(_) | Err(HsmError::Device { .. }) => return Err(HsmError::KeyNotFound(name)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
