//! `keyward hsm selftest`: checks a YubiHSM 2 the way keywardd will use
//! it, with keywardd's own (signer) credentials, and prints the checks
//! only a real device can prove.
//!
//! Run on the device (each a [`Check`]):
//! - a session opens with the signer's authentication key, which has what
//!   keywardd needs and nothing more than `keyward hsm setup yubihsm`
//!   gives it, in the configured domains; the factory key (id 1) is gone;
//! - a throw-away Ed25519 key (label `keyward selftest`, which is no key
//!   name, so keywardd never lists it) is generated in the signer's
//!   domains, signs, and the signature verifies in software
//!   (`verify_strict`); the device reports the capabilities, domains and
//!   origin asked for;
//! - a throw-away HMAC-SHA256 key signs as software HMAC does, verifies
//!   its tag and refuses a wrong one; one without `sign-hmac` must not
//!   sign; both are deleted (the signer has `delete-hmac-key`);
//! - the signer must not be able to delete the Ed25519 key (it lacks
//!   `delete-asymmetric-key`): on a real device the key stays, and the
//!   report says how to delete it with the admin credential;
//! - every object the signer can list shares one of its domains.
//!
//! MockHsm (recognised by its serial number 0123456789) enforces neither
//! capabilities nor domains: the checks that rely on them are reported as
//! not provable there ([`Outcome::NotProvable`]), never as passed. The
//! checks that need other credentials or a wrap round trip are printed as
//! [`ManualCheck`]s with the exact `yubihsm-shell` commands.

use ed25519_dalek::{Signature, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use yubihsm::object::{Filter, Origin};
use yubihsm::{Capability, Client, Connector, Credentials, Domain, asymmetric, object};

mod manual;
mod report;

use manual::connector_url;
pub use manual::manual_checks;
pub use report::{Check, ManualCheck, Outcome, SelftestReport};

use crate::hsm::yubihsm::names;
use crate::tools::yubihsm_setup::plan::{
    self, FACTORY_AUTH_KEY_ID, capability_names, domain_numbers,
};

/// MockHsm's serial number.
const MOCK_SERIAL: &str = "0123456789";

/// The label of the throw-away objects (not a key name: keywardd never
/// lists them).
pub const SELFTEST_LABEL: &str = "keyward selftest";

/// What the self-test runs against.
#[derive(Debug, Clone)]
pub struct SelftestSettings {
    /// The signer's authentication key id (from its credential file).
    pub auth_key_id: u16,
    /// keyward's domains (`hsm.domains`).
    pub domains: Vec<u8>,
    /// `hsm.exportable_under_wrap`.
    pub exportable_under_wrap: bool,
    /// The connector as keyward.toml spells it (`http://...`, `usb`).
    pub device: String,
}

/// The checks run so far.
struct Checks {
    mock: bool,
    list: Vec<Check>,
}

impl Checks {
    fn record(&mut self, name: impl Into<String>, outcome: Outcome) {
        self.list.push(Check {
            name: name.into(),
            outcome,
        });
    }

    fn result<T>(&mut self, name: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => {
                self.record(name, Outcome::Pass);
                Some(v)
            }
            Err(why) => {
                self.record(name, Outcome::Fail(why));
                None
            }
        }
    }

    /// A check of something the device must refuse: the device's refusal
    /// is a pass; done is a failure, or not provable on MockHsm; any other
    /// error (the connection) proves nothing and fails.
    fn refused<T>(&mut self, name: &str, r: Result<T, yubihsm::client::Error>, done: &str) {
        let outcome = match r {
            Err(e) if *e.kind() == yubihsm::client::ErrorKind::DeviceError => Outcome::Pass,
            Err(e) => Outcome::Fail(format!("cannot tell: {e}")),
            Ok(_) if self.mock => Outcome::NotProvable(format!("MockHsm {done}")),
            Ok(_) => Outcome::Fail(format!("the device {done}")),
        };
        self.record(name, outcome);
    }
}

/// Runs the self-test (blocking). Never fails itself: every problem is a
/// failed check in the report.
pub fn selftest(
    connector: Connector,
    credentials: Credentials,
    settings: SelftestSettings,
) -> SelftestReport {
    let mut checks = Checks {
        mock: false,
        list: Vec::new(),
    };
    let mut left = Vec::new();
    let manual = manual_checks(&settings);
    let domains = match crate::hsm::yubihsm::domain_set(&settings.domains) {
        Ok(d) => Some(d),
        Err(e) => {
            checks.record("hsm.domains", Outcome::Fail(e.to_string()));
            None
        }
    };
    let client = Client::open(connector, credentials, false).map_err(|e| {
        format!(
            "{e} (is the device reachable, and is the password in the credential file the key's? \
             A provisioned device has no key 1)"
        )
    });
    let name = format!(
        "a session opens with authentication key {:#06x}",
        settings.auth_key_id
    );
    if let (Some(client), Some(domains)) = (checks.result(&name, client), domains) {
        checks.mock = client
            .device_info()
            .is_ok_and(|i| i.serial_number.to_string() == MOCK_SERIAL);
        run(&client, &settings, domains, &mut checks, &mut left);
    }
    SelftestReport {
        settings,
        mock: checks.mock,
        checks: checks.list,
        manual,
        left,
    }
}

fn run(
    client: &Client,
    s: &SelftestSettings,
    domains: Domain,
    checks: &mut Checks,
    left: &mut Vec<String>,
) {
    check_auth_key(client, s, domains, checks);
    let factory = client.get_object_info(FACTORY_AUTH_KEY_ID, object::Type::AuthenticationKey);
    let gone = match factory {
        Err(e) if e.device_error() == Some(yubihsm::device::ErrorKind::ObjectNotFound) => Ok(()),
        Ok(_) => Err(
            "it still exists: whoever knows its factory password controls the device \
                      (run keyward hsm setup yubihsm, or delete it with the admin credential)"
                .to_owned(),
        ),
        Err(e) => Err(format!("cannot tell: {e}")),
    };
    checks.result("the factory authentication key 0x0001 is gone", gone);
    ed25519(client, s, domains, checks, left);
    hmac(client, domains, checks);
    let visible = visible_objects(client, domains);
    match visible {
        Ok(()) => {
            checks.record(
                "every object the signer lists shares one of its domains",
                Outcome::Pass,
            );
        }
        Err(why) if checks.mock => {
            checks.record(
                "every object the signer lists shares one of its domains",
                Outcome::NotProvable(format!("MockHsm lists every object: {why}")),
            );
        }
        Err(why) => {
            checks.record(
                "every object the signer lists shares one of its domains",
                Outcome::Fail(why),
            );
        }
    }
}

/// The signer's own key: in keyward's domains, with what keywardd needs
/// and nothing more than set-up gives it.
fn check_auth_key(client: &Client, s: &SelftestSettings, domains: Domain, checks: &mut Checks) {
    let info = match client.get_object_info(s.auth_key_id, object::Type::AuthenticationKey) {
        Ok(i) => i,
        Err(e) => {
            checks.record("the signer's key reads back", Outcome::Fail(e.to_string()));
            return;
        }
    };
    let r = if info.domains.contains(domains) {
        Ok(())
    } else {
        Err(format!(
            "hsm.domains is {:?} but the key's domains are {:?}",
            s.domains,
            domain_numbers(info.domains)
        ))
    };
    checks.result("the signer's key may use keyward's domains", r);
    let needed = plan::signer_capabilities();
    let missing = needed - info.capabilities;
    let r = if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing {}", capability_names(missing)))
    };
    checks.result("the signer's key has what keywardd needs", r);
    let extra = info.capabilities - needed;
    let r = if extra.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "it may also {}: use the signer key keyward hsm setup yubihsm creates",
            capability_names(extra)
        ))
    };
    checks.result("the signer's key can do nothing more", r);
    let wanted = plan::key_capabilities(s.exportable_under_wrap);
    let r = if info.delegated_capabilities.contains(wanted)
        && (info.delegated_capabilities - wanted).is_empty()
    {
        Ok(())
    } else {
        Err(format!(
            "its delegated capabilities are [{}], keyward's keys need exactly [{}] \
             (hsm.exportable_under_wrap = {})",
            capability_names(info.delegated_capabilities),
            capability_names(wanted),
            s.exportable_under_wrap
        ))
    };
    checks.result("the keys it creates can do only what keyward's keys do", r);
}

/// A free id of `t` from the backend's range.
fn free_id(client: &Client, t: object::Type) -> Result<u16, String> {
    let taken = client
        .list_objects(&[Filter::Type(t)])
        .map_err(|e| format!("cannot list objects: {e}"))?;
    let ids: Vec<u16> = taken.iter().map(|e| e.object_id).collect();
    names::free_id(&ids).ok_or_else(|| "no free object id".to_owned())
}

/// The device reports `id` as asked.
fn reads_back(
    client: &Client,
    id: u16,
    t: object::Type,
    caps: Capability,
    domains: Domain,
    origin: Origin,
) -> Result<(), String> {
    let info = client
        .get_object_info(id, t)
        .map_err(|e| format!("cannot read it back: {e}"))?;
    if info.capabilities != caps || info.domains != domains || info.origin != origin {
        return Err(format!(
            "asked for [{}] in {:?} ({origin:?}), the device reports [{}] in {:?} ({:?})",
            capability_names(caps),
            domain_numbers(domains),
            capability_names(info.capabilities),
            domain_numbers(info.domains),
            info.origin
        ));
    }
    Ok(())
}

fn ed25519(
    client: &Client,
    s: &SelftestSettings,
    domains: Domain,
    checks: &mut Checks,
    left: &mut Vec<String>,
) {
    let mut caps = Capability::SIGN_EDDSA;
    if s.exportable_under_wrap {
        caps |= Capability::EXPORTABLE_UNDER_WRAP;
    }
    let generated = free_id(client, object::Type::AsymmetricKey).and_then(|id| {
        client
            .generate_asymmetric_key(
                id,
                object::Label::from(SELFTEST_LABEL),
                domains,
                caps,
                asymmetric::Algorithm::Ed25519,
            )
            .map_err(|e| e.to_string())
    });
    let Some(id) = checks.result(
        "a throw-away Ed25519 key is generated on the device",
        generated,
    ) else {
        return;
    };
    let signed = (|| {
        let public = client.get_public_key(id).map_err(|e| e.to_string())?;
        let bytes: [u8; 32] = public
            .as_ref()
            .try_into()
            .map_err(|_| "its public key is not 32 bytes".to_owned())?;
        let vk = VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())?;
        let message = b"keyward selftest: a message to sign".to_vec();
        let sig = client
            .sign_ed25519(id, message.clone())
            .map_err(|e| e.to_string())?;
        vk.verify_strict(&message, &Signature::from_bytes(&sig.to_bytes()))
            .map_err(|e| format!("the signature does not verify in software: {e}"))
    })();
    checks.result("it signs, and the signature verifies in software", signed);
    checks.result(
        "the device reports its capabilities, domains and origin (generated) as asked",
        reads_back(
            client,
            id,
            object::Type::AsymmetricKey,
            caps,
            domains,
            Origin::Generated,
        ),
    );
    let deleted = client.delete_object(id, object::Type::AsymmetricKey);
    let kept = deleted.is_err();
    checks.refused(
        "the signer cannot delete Ed25519 keys (no delete-asymmetric-key)",
        deleted,
        "deleted the key",
    );
    if kept {
        left.push(format!(
            "Ed25519 key {id:#06x} labelled {SELFTEST_LABEL:?} (keywardd ignores it); delete it with the admin credential: \
             yubihsm-shell -C {} --authkey {} -a delete-object -i {id:#06x} -t asymmetric-key",
            connector_url(&s.device),
            plan::ADMIN_AUTH_KEY_ID
        ));
    }
}

fn hmac(client: &Client, domains: Domain, checks: &mut Checks) {
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key[..]);
    let caps = Capability::SIGN_HMAC | Capability::VERIFY_HMAC;
    let put = |caps: Capability| {
        free_id(client, object::Type::HmacKey).and_then(|id| {
            client
                .put_hmac_key(
                    id,
                    object::Label::from(SELFTEST_LABEL),
                    domains,
                    caps,
                    yubihsm::hmac::Algorithm::Sha256,
                    key.to_vec(),
                )
                .map_err(|e| e.to_string())
        })
    };
    let Some(id) = checks.result("a throw-away HMAC-SHA256 key is imported", put(caps)) else {
        return;
    };
    let data = b"keyward selftest: data to authenticate".to_vec();
    let tagged = (|| {
        let tag = client
            .sign_hmac(id, data.clone())
            .map_err(|e| e.to_string())?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).map_err(|e| e.to_string())?;
        mac.update(&data);
        let expected = mac.finalize().into_bytes();
        if !bool::from(tag.as_slice().ct_eq(expected.as_slice())) {
            return Err("the device's tag differs from software HMAC-SHA256".to_owned());
        }
        client
            .verify_hmac(id, data.clone(), tag.clone())
            .map_err(|e| format!("the device does not verify its own tag: {e}"))?;
        let mut wrong = tag.as_slice().to_vec();
        if let Some(b) = wrong.first_mut() {
            *b ^= 1;
        }
        match client.verify_hmac(id, data.clone(), wrong) {
            Ok(()) => Err("the device accepted a wrong tag".to_owned()),
            Err(_) => Ok(()),
        }
    })();
    checks.result(
        "it signs as software HMAC-SHA256 does, verifies its tag and refuses a wrong one",
        tagged,
    );
    checks.result(
        "the device reports its capabilities, domains and origin (imported) as asked",
        reads_back(
            client,
            id,
            object::Type::HmacKey,
            caps,
            domains,
            Origin::Imported,
        ),
    );
    if let Some(verify_only) = checks.result(
        "a throw-away HMAC key without sign-hmac is imported",
        put(Capability::VERIFY_HMAC),
    ) {
        checks.refused(
            "a key without sign-hmac does not sign",
            client.sign_hmac(verify_only, data.clone()),
            "signed with it",
        );
        let r = client.delete_object(verify_only, object::Type::HmacKey);
        checks.result("it is deleted", r.map_err(|e| e.to_string()));
    }
    let r = client.delete_object(id, object::Type::HmacKey);
    checks.result(
        "the throw-away HMAC key is deleted",
        r.map_err(|e| e.to_string()),
    );
}

/// Every object the signer lists shares one of `domains`.
fn visible_objects(client: &Client, domains: Domain) -> Result<(), String> {
    let entries = client.list_objects(&[]).map_err(|e| e.to_string())?;
    let mut foreign = Vec::new();
    for e in entries {
        let info = client
            .get_object_info(e.object_id, e.object_type)
            .map_err(|err| err.to_string())?;
        if !info.domains.intersects(domains) {
            foreign.push(format!(
                "{:#06x} ({:?}) in {:?}",
                e.object_id,
                e.object_type,
                domain_numbers(info.domains)
            ));
        }
    }
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(format!("it sees {}", foreign.join(", ")))
    }
}
