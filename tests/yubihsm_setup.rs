//! `keyward hsm setup yubihsm` and `keyward hsm selftest` on MockHsm (the
//! yubihsm crate's software YubiHSM 2): in-process through
//! `Connector::mockhsm()` for the provisioning function, and through the
//! real CLI against `keyward hsm mock-connector` over HTTP.
//!
//! MockHsm panics when a session is opened with a missing authentication
//! key, and it never closes sessions (17 at most): each test uses its own
//! MockHsm and opens few sessions, and never opens one with key 1 after
//! it was deleted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::MockConnector;
use keyward::hsm::Hsm;
use keyward::hsm::yubihsm::credentials::read_credentials;
use keyward::hsm::yubihsm::{YubiHsm, YubiHsmSettings};
use keyward::tools::yubihsm_setup::plan::{
    ADMIN_AUTH_KEY_ID, AUDIT_AUTH_KEY_ID, SIGNER_AUTH_KEY_ID, WRAP_KEY_ID,
};
use keyward::tools::yubihsm_setup::{ProvisionOptions, Role, YubiHsmSetupError, provision};
use keyward::types::KeyName;
use yubihsm::{Capability, Client, Connector, Credentials, Domain, object};

const AUTH: object::Type = object::Type::AuthenticationKey;

struct Device {
    dir: tempfile::TempDir,
    connector: Connector,
}

impl Device {
    fn fresh() -> Device {
        Device {
            dir: tempfile::tempdir().expect("a temporary directory"),
            connector: Connector::mockhsm(),
        }
    }

    fn creds(&self) -> PathBuf {
        self.dir.path().join("credentials")
    }

    fn options(&self) -> ProvisionOptions {
        ProvisionOptions::factory(
            &self.creds(),
            &self.creds().join("yubihsm-signer"),
            "mockhsm",
        )
    }

    /// A client logged in with the credential file `file`.
    fn client(&self, file: &Path) -> Client {
        let (_, credentials) = read_credentials(file).expect("a credential file");
        Client::open(self.connector.clone(), credentials, false).expect("a session")
    }

    /// A client with the factory key (only while it exists!).
    fn factory(&self) -> Client {
        Client::open(self.connector.clone(), Credentials::default(), false)
            .expect("the factory key opens a session")
    }

    /// Every file in the credentials directory with its content and mode.
    fn files(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        let Ok(entries) = std::fs::read_dir(self.creds()) else {
            return BTreeMap::new();
        };
        entries
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    (
                        std::fs::read(e.path()).unwrap(),
                        meta.permissions().mode() & 0o7777,
                    ),
                )
            })
            .collect()
    }
}

/// Every object on the device with what it reports about itself.
fn objects(client: &Client) -> Vec<(u16, object::Type, String, Capability, Capability, Domain)> {
    let mut list: Vec<_> = client
        .list_objects(&[])
        .unwrap()
        .into_iter()
        .map(|e| {
            let i = client.get_object_info(e.object_id, e.object_type).unwrap();
            (
                e.object_id,
                e.object_type,
                i.label.try_as_str().unwrap().to_owned(),
                i.capabilities,
                i.delegated_capabilities,
                i.domains,
            )
        })
        .collect();
    list.sort_by_key(|o| (o.0, format!("{:?}", o.1)));
    list
}

fn is_not_found(r: Result<object::Info, yubihsm::client::Error>) -> bool {
    matches!(r, Err(e) if e.device_error() == Some(yubihsm::device::ErrorKind::ObjectNotFound))
}

/// What the README's table documents, written out here on purpose (not
/// taken from the plan) so a change to either shows.
fn documented(backups: bool) -> Vec<(u16, object::Type, String, Capability, Capability, Domain)> {
    let keys = Capability::SIGN_EDDSA
        | Capability::SIGN_HMAC
        | Capability::VERIFY_HMAC
        | if backups {
            Capability::EXPORTABLE_UNDER_WRAP
        } else {
            Capability::empty()
        };
    let signer = Capability::SIGN_EDDSA
        | Capability::SIGN_HMAC
        | Capability::VERIFY_HMAC
        | Capability::GENERATE_ASYMMETRIC_KEY
        | Capability::PUT_HMAC_KEY
        | Capability::DELETE_HMAC_KEY
        | Capability::GET_OPAQUE
        | Capability::PUT_OPAQUE
        | Capability::DELETE_OPAQUE
        | Capability::GET_PSEUDO_RANDOM;
    let mut admin = Capability::DELETE_ASYMMETRIC_KEY
        | Capability::DELETE_HMAC_KEY
        | Capability::DELETE_OPAQUE
        | Capability::DELETE_AUTHENTICATION_KEY
        | Capability::GET_OPAQUE
        | Capability::PUT_OPAQUE
        | Capability::GET_OPTION;
    if backups {
        admin |= Capability::EXPORT_WRAPPED | Capability::IMPORT_WRAPPED;
    }
    let d = Domain::DOM1;
    let mut list = vec![
        (0x0002, AUTH, "keyward-signer".to_owned(), signer, keys, d),
        (
            0x0003,
            AUTH,
            "keyward-admin".to_owned(),
            admin,
            if backups { keys } else { Capability::empty() },
            d,
        ),
        (
            0x0004,
            AUTH,
            "keyward-audit".to_owned(),
            Capability::GET_LOG_ENTRIES | Capability::GET_OPTION,
            Capability::empty(),
            d,
        ),
    ];
    if backups {
        list.push((
            0x0010,
            object::Type::WrapKey,
            "keyward-backup".to_owned(),
            Capability::EXPORT_WRAPPED | Capability::IMPORT_WRAPPED,
            keys,
            d,
        ));
    }
    list
}

fn assert_credential_file(path: &Path, id: u16) -> String {
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o400,
        "{}",
        path.display()
    );
    let text = std::fs::read_to_string(path).unwrap();
    let (file_id, secret) = text.split_once(':').expect("ID:SECRET");
    assert_eq!(file_id, id.to_string(), "{}", path.display());
    assert!(
        secret.len() >= 48,
        "a long random secret in {}",
        path.display()
    );
    secret.to_owned()
}

fn signer_backend(dev: &Device, backups: bool) -> YubiHsm {
    let (id, credentials) = read_credentials(&dev.creds().join("yubihsm-signer")).unwrap();
    assert_eq!(id, SIGNER_AUTH_KEY_ID);
    YubiHsm::with_connector(
        dev.connector.clone(),
        credentials,
        YubiHsmSettings {
            domains: vec![1],
            exportable_under_wrap: backups,
            device: "mockhsm".to_owned(),
        },
    )
    .expect("keywardd's backend opens with the signer's credential")
}

#[test]
fn setup_on_a_fresh_device_creates_the_documented_objects_and_deletes_the_factory_key() {
    let dev = Device::fresh();
    let report = provision(dev.connector.clone(), &dev.options()).expect("set-up");
    assert_eq!(report.deleted_auth_key, 1);
    assert_eq!(report.created.len(), 3);

    let admin = dev.client(&dev.creds().join("yubihsm-admin"));
    assert!(
        is_not_found(admin.get_object_info(1, AUTH)),
        "the factory key is gone"
    );
    assert_eq!(
        objects(&admin),
        documented(false),
        "exactly the documented objects"
    );

    let files = dev.files();
    assert_eq!(
        files.keys().cloned().collect::<Vec<_>>(),
        ["yubihsm-admin", "yubihsm-audit", "yubihsm-signer"]
    );
    let mut secrets = vec![
        assert_credential_file(&dev.creds().join("yubihsm-signer"), SIGNER_AUTH_KEY_ID),
        assert_credential_file(&dev.creds().join("yubihsm-admin"), ADMIN_AUTH_KEY_ID),
        assert_credential_file(&dev.creds().join("yubihsm-audit"), AUDIT_AUTH_KEY_ID),
    ];
    secrets.sort();
    secrets.dedup();
    assert_eq!(secrets.len(), 3, "three different passwords");
    let dir_mode = std::fs::metadata(dev.creds()).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    // keywardd's backend works with the signer's credential file.
    let hsm = signer_backend(&dev, false);
    let key = hsm.generate_ed25519(&KeyName::new("hot").unwrap()).unwrap();
    let message = b"a transaction message";
    let sig = hsm.sign_ed25519(&key, message).unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key.0).unwrap();
    vk.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig))
        .expect("the signature verifies");
    hsm.import_hmac_key("approver-alice", &[7u8; 32]).unwrap();
    assert!(hsm.delete_secret("approver-alice").unwrap());
}

#[test]
fn with_backups_a_wrap_key_exists_and_keys_are_exportable_under_it() {
    let dev = Device::fresh();
    let mut opts = dev.options();
    opts.backups = true;
    let report = provision(dev.connector.clone(), &opts).expect("set-up");
    assert_eq!(report.created.len(), 4);
    let admin = dev.client(&dev.creds().join("yubihsm-admin"));
    assert_eq!(objects(&admin), documented(true));
    let secret = assert_credential_file(&dev.creds().join("yubihsm-wrap-key"), WRAP_KEY_ID);
    assert_eq!(secret.len(), 64, "32 bytes of AES-256-CCM key, in hex");

    let hsm = signer_backend(&dev, true);
    hsm.generate_ed25519(&KeyName::new("hot").unwrap()).unwrap();
    let keys = admin
        .list_objects(&[object::Filter::Type(object::Type::AsymmetricKey)])
        .unwrap();
    assert_eq!(keys.len(), 1);
    let id = keys[0].object_id;
    let info = admin
        .get_object_info(id, object::Type::AsymmetricKey)
        .unwrap();
    assert_eq!(
        info.capabilities,
        Capability::SIGN_EDDSA | Capability::EXPORTABLE_UNDER_WRAP
    );
    admin
        .export_wrapped(WRAP_KEY_ID, object::Type::AsymmetricKey, id)
        .expect("the admin exports a key under the wrap key");
}

#[test]
fn a_replacement_device_given_the_wrap_key_file_imports_the_old_devices_backups() {
    let old = Device::fresh();
    let mut opts = old.options();
    opts.backups = true;
    provision(old.connector.clone(), &opts).expect("old device");
    let old_admin = old.client(&old.creds().join("yubihsm-admin"));
    // An opaque object stands for a backed-up object: MockHsm's wrapped
    // Ed25519 export does not round-trip (the README lists that check as
    // one for real hardware).
    old_admin
        .put_opaque(
            0x0100,
            "backed-up".into(),
            Domain::DOM1,
            Capability::EXPORTABLE_UNDER_WRAP,
            yubihsm::opaque::Algorithm::Data,
            b"restore me".to_vec(),
        )
        .unwrap();
    let wrapped = old_admin
        .export_wrapped(WRAP_KEY_ID, object::Type::Opaque, 0x0100)
        .unwrap();

    let wrap_file = std::fs::read_to_string(old.creds().join("yubihsm-wrap-key")).unwrap();
    let new = Device::fresh();
    let mut opts = new.options();
    opts.backups = true;
    opts.wrap_key = Some(keyward::tools::yubihsm_setup::parse_wrap_key(&wrap_file).unwrap());
    provision(new.connector.clone(), &opts).expect("replacement device");
    assert_eq!(
        std::fs::read_to_string(new.creds().join("yubihsm-wrap-key")).unwrap(),
        wrap_file,
        "the same wrap key"
    );
    let new_admin = new.client(&new.creds().join("yubihsm-admin"));
    new_admin
        .import_wrapped(WRAP_KEY_ID, wrapped)
        .expect("the new device unwraps the old device's backup");
    assert_eq!(new_admin.get_opaque(0x0100).unwrap(), b"restore me");

    // A fresh random wrap key could not have.
    let other = Device::fresh();
    let mut opts = other.options();
    opts.backups = true;
    provision(other.connector.clone(), &opts).unwrap();
    let other_admin = other.client(&other.creds().join("yubihsm-admin"));
    let wrapped = old_admin
        .export_wrapped(WRAP_KEY_ID, object::Type::Opaque, 0x0100)
        .unwrap();
    assert!(other_admin.import_wrapped(WRAP_KEY_ID, wrapped).is_err());
}

#[test]
fn a_failed_proof_keeps_the_factory_key_and_undoes_everything() {
    let dev = Device::fresh();
    let mut opts = dev.options();
    opts.backups = true;
    // The audit key is proven last among the authentication keys: the
    // signer's and the admin's proofs have passed by then.
    opts.sabotage_proof = Some(Role::Audit);
    let err = provision(dev.connector.clone(), &opts).unwrap_err();
    assert_eq!(err.code(), "credential_proof_failed", "{err}");
    assert!(matches!(
        err,
        YubiHsmSetupError::ProofFailed {
            role: Role::Audit,
            rolled_back: true,
            ..
        }
    ));
    assert!(
        err.to_string().contains("factory key was NOT deleted"),
        "{err}"
    );

    let factory = dev.factory();
    let left = objects(&factory);
    assert_eq!(left.len(), 1, "only the factory key: {left:?}");
    assert_eq!((left[0].0, left[0].1), (1, AUTH));
    assert!(
        dev.files().is_empty(),
        "no credential file left: {:?}",
        dev.files().keys()
    );

    // Nothing half done: set-up runs again from scratch.
    opts.sabotage_proof = None;
    provision(dev.connector.clone(), &opts).expect("a second, clean run");
    let admin = dev.client(&dev.creds().join("yubihsm-admin"));
    assert_eq!(objects(&admin), documented(true));
}

#[test]
fn a_second_run_refuses_and_changes_nothing() {
    let dev = Device::fresh();
    provision(dev.connector.clone(), &dev.options()).expect("first run");
    let admin = dev.client(&dev.creds().join("yubihsm-admin"));
    let objects_before = objects(&admin);
    let files_before = dev.files();

    // Same place: the credential files are there; the device is not touched.
    let err = provision(dev.connector.clone(), &dev.options()).unwrap_err();
    assert_eq!(err.code(), "credential_exists", "{err}");

    // Elsewhere, logged in with the admin key (the factory key is gone):
    // the device is not fresh, and keyward's ids are taken even when forced.
    let admin_pw = std::fs::read_to_string(dev.creds().join("yubihsm-admin")).unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut opts = ProvisionOptions::factory(
        &other.path().join("c"),
        &other.path().join("c").join("yubihsm-signer"),
        "mockhsm",
    );
    opts.auth_key_id = ADMIN_AUTH_KEY_ID;
    opts.password = admin_pw.split_once(':').unwrap().1.to_owned().into();
    let err = provision(dev.connector.clone(), &opts).unwrap_err();
    assert_eq!(err.code(), "device_not_fresh", "{err}");
    opts.force_not_fresh = true;
    let err = provision(dev.connector.clone(), &opts).unwrap_err();
    assert_eq!(err.code(), "object_id_taken", "{err}");
    assert!(
        !other.path().join("c").exists(),
        "no file written elsewhere"
    );

    assert_eq!(objects(&admin), objects_before, "device unchanged");
    assert_eq!(dev.files(), files_before, "files unchanged");
}

#[test]
fn a_device_with_another_object_is_refused_unless_forced() {
    let dev = Device::fresh();
    let factory = dev.factory();
    factory
        .put_opaque(
            0x0100,
            "someone-else".into(),
            Domain::DOM2,
            Capability::empty(),
            yubihsm::opaque::Algorithm::Data,
            b"not keyward's".to_vec(),
        )
        .unwrap();
    let err = provision(dev.connector.clone(), &dev.options()).unwrap_err();
    assert_eq!(err.code(), "device_not_fresh", "{err}");
    assert!(err.to_string().contains("0x0100"), "{err}");
    assert_eq!(objects(&factory).len(), 2, "nothing created");
    assert!(factory.get_object_info(1, AUTH).is_ok(), "factory key kept");
    assert!(dev.files().is_empty());

    let mut opts = dev.options();
    opts.force_not_fresh = true;
    let report = provision(dev.connector.clone(), &opts).expect("forced");
    assert_eq!(report.already_there.len(), 1, "{:?}", report.already_there);
    let admin = dev.client(&dev.creds().join("yubihsm-admin"));
    assert!(
        admin.get_object_info(0x0100, object::Type::Opaque).is_ok(),
        "left alone"
    );
    assert!(is_not_found(admin.get_object_info(1, AUTH)));
}

#[test]
fn selftest_fails_a_device_that_was_never_provisioned() {
    use keyward::tools::yubihsm_selftest::{Outcome, SelftestSettings, selftest};
    let dev = Device::fresh();
    // keywardd pointed at the factory key: it works, but it is not least
    // privilege and the factory key is still there.
    let report = selftest(
        dev.connector.clone(),
        Credentials::default(),
        SelftestSettings {
            auth_key_id: 1,
            domains: vec![1],
            exportable_under_wrap: false,
            device: "mockhsm".to_owned(),
        },
    );
    assert!(report.mock);
    assert!(!report.passed(), "{report}");
    let outcome = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name:?}:\n{report}"))
            .outcome
            .clone()
    };
    assert!(matches!(
        outcome("the factory authentication key 0x0001 is gone"),
        Outcome::Fail(_)
    ));
    assert!(matches!(
        outcome("the signer's key can do nothing more"),
        Outcome::Fail(_)
    ));
    assert_eq!(
        outcome("it signs, and the signature verifies in software"),
        Outcome::Pass
    );
    assert!(
        report
            .to_string()
            .contains("FAIL  the factory authentication key 0x0001 is gone")
    );
}

// --- The CLI against `keyward hsm mock-connector` -----------------------

fn write_config(path: &Path, port: u16, credential_file: &Path, backups: bool) {
    std::fs::write(
        path,
        format!(
            "[daemon]\nagent_socket = \"agent.sock\"\nadmin_socket = \"admin.sock\"\nstate_dir = \"state\"\npolicy = \"policy.toml\"\n\n\
             [hsm]\nbackend = \"yubihsm\"\nconnector = \"http://127.0.0.1:{port}\"\ncredential_file = \"{}\"\n\
             domains = [1]\nexportable_under_wrap = {backups}\ntimeout_ms = 5000\n",
            credential_file.display()
        ),
    )
    .unwrap();
}

fn keyward(config: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("keyward runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn cli_setup_then_selftest_pass_on_mockhsm_and_no_secret_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockConnector::start();
    let creds = dir.path().join("credentials");
    let signer_file = creds.join("yubihsm-signer");
    let config = dir.path().join("keyward.toml");
    write_config(&config, mock.port, &signer_file, true);

    let (code, out) = keyward(&config, &["hsm", "setup", "yubihsm", "--backups"]);
    assert_eq!(code, 0, "{out}");
    for what in [
        "0x0002",
        "\"keyward-signer\"",
        "0x0003",
        "\"keyward-admin\"",
        "0x0004",
        "\"keyward-audit\"",
        "0x0010",
        "\"keyward-backup\"",
        "sign-eddsa",
        "export-wrapped",
        "domains:      [1]",
    ] {
        assert!(out.contains(what), "the report names {what:?}:\n{out}");
    }
    assert!(out.contains(&signer_file.display().to_string()), "{out}");
    assert!(
        out.contains(&creds.join("yubihsm-wrap-key").display().to_string()),
        "{out}"
    );
    assert!(out.contains("0x0001 was deleted"), "{out}");

    let (code, selftest_out) = keyward(&config, &["hsm", "selftest"]);
    assert_eq!(code, 0, "{selftest_out}");
    assert!(selftest_out.contains("MockHsm"), "{selftest_out}");
    assert!(
        selftest_out.contains("PASS  it signs, and the signature verifies in software"),
        "{selftest_out}"
    );
    assert!(
        selftest_out.contains("MOCK  a key without sign-hmac does not sign"),
        "MockHsm cannot prove capability checks, and says so:\n{selftest_out}"
    );
    assert!(
        selftest_out.contains("Manual checks on real hardware"),
        "{selftest_out}"
    );
    assert!(selftest_out.contains("import_wrapped"), "{selftest_out}");
    assert!(selftest_out.contains(" 0 failed"), "{selftest_out}");

    // No secret in anything printed.
    for name in [
        "yubihsm-signer",
        "yubihsm-admin",
        "yubihsm-audit",
        "yubihsm-wrap-key",
    ] {
        let text = std::fs::read_to_string(creds.join(name)).unwrap();
        let secret = text.split_once(':').unwrap().1;
        assert!(secret.len() >= 48);
        assert!(!out.contains(secret), "{name}'s secret printed by setup");
        assert!(
            !selftest_out.contains(secret),
            "{name}'s secret printed by selftest"
        );
    }

    // Run twice: refused with the stable code, nothing changed.
    let before: Vec<Vec<u8>> = ["yubihsm-signer", "yubihsm-admin"]
        .iter()
        .map(|n| std::fs::read(creds.join(n)).unwrap())
        .collect();
    let (code, again) = keyward(&config, &["hsm", "setup", "yubihsm", "--backups"]);
    assert_eq!(code, 2, "{again}");
    assert!(again.contains("credential_exists"), "{again}");
    let after: Vec<Vec<u8>> = ["yubihsm-signer", "yubihsm-admin"]
        .iter()
        .map(|n| std::fs::read(creds.join(n)).unwrap())
        .collect();
    assert_eq!(before, after);

    // Logged in with the admin key elsewhere: not fresh, nothing written.
    let admin_text = std::fs::read_to_string(creds.join("yubihsm-admin")).unwrap();
    let admin_pw = dir.path().join("admin-password");
    std::fs::write(&admin_pw, admin_text.split_once(':').unwrap().1).unwrap();
    std::fs::set_permissions(&admin_pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let other_config = dir.path().join("other.toml");
    write_config(
        &other_config,
        mock.port,
        &elsewhere.join("yubihsm-signer"),
        true,
    );
    let (code, out) = keyward(
        &other_config,
        &[
            "hsm",
            "setup",
            "yubihsm",
            "--backups",
            "--auth-key-id",
            "3",
            "--password-file",
            admin_pw.to_str().unwrap(),
            "--credentials-dir",
            elsewhere.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("device_not_fresh"), "{out}");
    assert!(
        !out.contains(admin_text.split_once(':').unwrap().1),
        "{out}"
    );
    assert!(!elsewhere.exists(), "nothing written elsewhere");

    // A wrong password on the signer's id: refused cleanly, exit 1.
    let wrong = dir.path().join("wrong-credential");
    std::fs::write(&wrong, "2:not-the-password\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o400)).unwrap();
    let wrong_config = dir.path().join("wrong.toml");
    write_config(&wrong_config, mock.port, &wrong, true);
    let (code, out) = keyward(&wrong_config, &["hsm", "selftest"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  a session opens with authentication key 0x0002"),
        "{out}"
    );
    assert!(out.contains("the self-test failed"), "{out}");
    assert!(!out.contains("not-the-password"), "{out}");
}

#[test]
fn hsm_commands_are_in_the_manual_pages() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("write-man-page")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "keyward-hsm.1",
        "keyward-hsm-setup-yubihsm.1",
        "keyward-hsm-selftest.1",
    ] {
        assert!(dir.path().join(page).is_file(), "{page} written");
    }
    assert!(
        !dir.path().join("keyward-hsm-mock-connector.1").exists(),
        "the hidden mock connector has no page"
    );
}

/// The operator's whole path on a fresh device, through the CLI only:
/// `keyward hsm setup yubihsm`, `keyward setup --yubihsm` (the audit key on
/// the device with the signer's credential, its verifier key pinned), an
/// offline `keyward key create hot`, then `keyward doctor` finds keywardd
/// would start; `keyward setup --yubihsm` again changes nothing.
#[test]
fn the_operators_path_from_a_fresh_device_to_a_config_keywardd_accepts() {
    let dir = tempfile::Builder::new()
        .prefix("kw-yhpath-")
        .tempdir()
        .unwrap();
    let root = dir.path();
    for d in ["etc", "var/lib/keyward", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(
        root.join("var/lib/keyward"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let connector = MockConnector::start();
    let port = connector.port;
    let config = root.join("etc/keyward.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nagent_socket = \"{r}/run/agent.sock\"\nadmin_socket = \"{r}/run/admin.sock\"\n\
             state_dir = \"{r}/var/lib/keyward\"\npolicy = \"{r}/etc/policy.toml\"\n\n\
             [hsm]\nbackend = \"yubihsm\"\nconnector = \"http://127.0.0.1:{port}\"\n\
             credential_file = \"yubihsm-signer\"\n",
            r = root.display()
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("etc/policy.toml"),
        format!(
            "[agents.dev]\nuid = {}\nkeys = [\"hot\"]\n\n[agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"10\"\n",
            nix::unistd::getuid().as_raw()
        ),
    )
    .unwrap();
    let keyward = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };

    let (code, text) = keyward(&["hsm", "setup", "yubihsm"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("keyward setup --yubihsm"),
        "names the next step: {text}"
    );
    let signer = root.join("etc/credentials/yubihsm-signer");
    let password = std::fs::read_to_string(&signer).unwrap();

    let (code, first) = keyward(&["setup", "--yubihsm"]);
    // The policy's key does not exist yet: set-up says to create it.
    assert_eq!(code, Some(0), "{first}");
    assert!(first.contains("generated the audit key"), "{first}");
    assert!(first.contains("key create hot"), "{first}");
    let vkey = std::fs::read_to_string(root.join("etc/audit.vkey")).unwrap();
    let printed = first
        .lines()
        .find_map(|l| l.trim().strip_prefix("verifier key: "))
        .unwrap_or_else(|| panic!("no verifier key in {first}"));
    assert!(vkey.contains(printed), "{vkey} vs {first}");

    let (code, text) = keyward(&["key", "create", "hot"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = keyward(&["doctor"]);
    assert_eq!(code, Some(0), "keywardd would start: {text}");
    assert!(text.contains("key \"hot\" found"), "{text}");

    let (code, second) = keyward(&["setup", "--yubihsm"]);
    assert_eq!(code, Some(0), "{second}");
    assert!(second.contains("Nothing to change"), "{second}");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/audit.vkey")).unwrap(),
        vkey
    );
    for out in [&first, &second] {
        let secret = password.trim().split_once(':').unwrap().1;
        assert!(!out.contains(secret), "the signer's password was printed");
    }
    drop(connector);
}
