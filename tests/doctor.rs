//! Configuration checks: `keywardd --check-config`, `keyward doctor` and
//! the checks keywardd makes at start. Unsafe modes are refused with the
//! file and the mode it needs; an unconfigured instance says exactly what
//! is missing; a valid instance passes, also beside a running daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `keywardd --check-config`: (exit code, stdout + stderr).
fn check_config(inst: &Instance) -> (i32, String) {
    let out = Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .arg("--check-config")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `keyward doctor`: (exit code, stdout + stderr).
fn doctor(inst: &Instance) -> (i32, String) {
    let out = inst.keyward(&["doctor"]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn pin_file(inst: &Instance) -> PathBuf {
    PathBuf::from(inst.config_value("pin_file"))
}

fn state_dir(inst: &Instance) -> PathBuf {
    inst.inst_dir().join("state")
}

/// keywardd refuses to start (exit 2), and both checks fail (exit 1), each
/// naming every string of `expect`.
fn assert_refused_everywhere(inst: &mut Instance, expect: &[&str]) {
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 2, "start-up: {log}");
    let (check_code, check) = check_config(inst);
    assert_eq!(check_code, 1, "--check-config: {check}");
    let (doctor_code, doc) = doctor(inst);
    assert_eq!(doctor_code, 1, "keyward doctor: {doc}");
    for e in expect {
        assert!(log.contains(e), "start-up does not say {e:?}: {log}");
        assert!(
            check.contains(e),
            "--check-config does not say {e:?}: {check}"
        );
        assert!(doc.contains(e), "keyward doctor does not say {e:?}: {doc}");
    }
}

#[test]
fn a_valid_instance_passes_and_the_check_is_safe_beside_the_running_daemon() {
    let mut inst = Instance::init();
    let (code, out) = check_config(&inst);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("keywardd would start"), "{out}");
    assert!(out.contains("key \"hot\" found in the HSM"), "{out}");
    let (code, out) = doctor(&inst);
    assert_eq!(code, 0, "{out}");

    // Beside the daemon: no writer lock is taken, the ledger reads.
    inst.start();
    let (code, out) = check_config(&inst);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("opens read-only"), "{out}");
    assert!(inst.is_running());
    assert!(inst.stop().success(), "{}", inst.log());
}

#[test]
fn a_group_writable_pin_file_is_refused_with_the_mode_it_needs() {
    let mut inst = Instance::init();
    let pin = pin_file(&inst);
    chmod(&pin, 0o620);
    assert_refused_everywhere(
        &mut inst,
        &[
            &pin.display().to_string(),
            "mode 0620",
            &format!("chmod 0400 {}", pin.display()),
        ],
    );
}

#[test]
fn a_world_writable_config_is_refused_with_the_mode_it_needs() {
    let mut inst = Instance::init();
    chmod(&inst.config, 0o602);
    let config = inst.config.display().to_string();
    assert_refused_everywhere(
        &mut inst,
        &[
            &format!("{config} has mode 0602"),
            &format!("chmod 0600 {config}"),
            "file_writable_by_others",
        ],
    );
}

#[test]
fn a_world_readable_state_directory_is_refused_with_the_mode_it_needs() {
    let mut inst = Instance::init();
    let state = state_dir(&inst);
    chmod(&state, 0o755);
    let shown = state.display().to_string();
    assert_refused_everywhere(
        &mut inst,
        &[
            &format!("{shown} has mode 0755"),
            &format!("chmod 0750 {shown}"),
            "state_dir_unsafe",
        ],
    );
}

#[test]
fn a_missing_pin_is_named_with_the_way_to_make_it() {
    let mut inst = Instance::init();
    let pin = pin_file(&inst);
    std::fs::remove_file(&pin).unwrap();
    assert_refused_everywhere(
        &mut inst,
        &[
            &format!("no PIN: {} does not exist", pin.display()),
            "keyward setup",
            "pin_missing",
        ],
    );
}

#[test]
fn a_missing_pin_credential_names_the_credentials_directory() {
    let mut inst = Instance::init();
    let pin = pin_file(&inst);
    let text = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(
        &inst.config,
        text.replace(
            &format!("pin_file = \"{}\"", pin.display()),
            "pin_file = \"pin\"",
        ),
    )
    .unwrap();
    let creds = inst.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    inst.set_env("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 2, "{log}");
    let expect = format!(
        "no PIN: {} does not exist (credential \"pin\"",
        creds.join("pin").display()
    );
    assert!(log.contains(&expect), "{log}");
    assert!(log.contains("keyward setup"), "{log}");

    // With the credential in place the daemon starts.
    std::fs::copy(&pin, creds.join("pin")).unwrap();
    chmod(&creds.join("pin"), 0o400);
    inst.start();
    assert!(inst.stop().success());
}

#[test]
fn a_missing_token_is_named_with_its_module() {
    let mut inst = Instance::init();
    let label = inst.config_value("token_label");
    let module = inst.config_value("module");
    let text = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(
        &inst.config,
        text.replace(
            &format!("token_label = \"{label}\""),
            "token_label = \"not-set-up\"",
        ),
    )
    .unwrap();
    assert_refused_everywhere(
        &mut inst,
        &[
            &format!("token \"not-set-up\" not found in {module}"),
            "setup",
            "hsm_token_missing",
        ],
    );
}

#[test]
fn a_key_the_policy_names_but_the_hsm_lacks_is_named_with_the_command_that_makes_it() {
    let mut inst = Instance::init();
    let policy = std::fs::read_to_string(&inst.policy).unwrap();
    std::fs::write(
        &inst.policy,
        policy.replace("keys = [\"hot\"]", "keys = [\"hot\", \"cold\"]"),
    )
    .unwrap();
    let expect = format!(
        "key \"cold\" named by policy {} is not in HSM token",
        inst.policy.display()
    );
    assert_refused_everywhere(&mut inst, &[&expect, "key create cold", "key_missing"]);
}

// ---- backend = "yubihsm" (on MockHsm behind `keyward hsm mock-connector`) --

/// An instance (`keyward init --dev`) moved to `backend = "yubihsm"` on a
/// mock connector: a signer authentication key (id 2, a password made for
/// this run) with its credential file, and the policy's key `hot`
/// generated on the device as keyward generates keys.
struct YubiInstance {
    inst: Instance,
    connector: MockConnector,
    credential: PathBuf,
    password: String,
}

impl YubiInstance {
    fn new() -> YubiInstance {
        let inst = Instance::init();
        let connector = MockConnector::start();
        let password = hex::encode(rand::random::<[u8; 16]>());
        let client = connector.client();
        let everything = yubihsm::Capability::all();
        client
            .put_authentication_key(
                2,
                "keyward-signer".into(),
                yubihsm::Domain::DOM1,
                everything,
                everything,
                yubihsm::authentication::Algorithm::YubicoAes,
                yubihsm::authentication::Key::derive_from_password(password.as_bytes()),
            )
            .unwrap();
        client
            .generate_asymmetric_key(
                0x0020,
                "hot".into(),
                yubihsm::Domain::DOM1,
                yubihsm::Capability::SIGN_EDDSA,
                yubihsm::asymmetric::Algorithm::Ed25519,
            )
            .unwrap();
        let credential = inst.inst_dir().join("yubihsm-signer");
        std::fs::write(&credential, format!("2:{password}\n")).unwrap();
        chmod(&credential, 0o400);
        let text = std::fs::read_to_string(&inst.config).unwrap();
        let at = text.find("\n[hsm]").unwrap();
        std::fs::write(
            &inst.config,
            format!(
                "{}\n[hsm]\nbackend = \"yubihsm\"\nconnector = \"{}\"\ncredential_file = \"{}\"\ndomains = [1]\n",
                &text[..at],
                connector.url(),
                credential.display()
            ),
        )
        .unwrap();
        YubiInstance {
            inst,
            connector,
            credential,
            password,
        }
    }

    fn set_credential(&self, content: &str, mode: u32) {
        chmod(&self.credential, 0o600);
        std::fs::write(&self.credential, content).unwrap();
        chmod(&self.credential, mode);
    }

    /// Both checks, which must agree: (exit code, output of
    /// --check-config).
    fn checks(&self) -> (i32, String) {
        let (code, out) = check_config(&self.inst);
        let (doctor_code, doc) = doctor(&self.inst);
        assert_eq!(code, doctor_code, "{out}\n---\n{doc}");
        assert!(!out.contains(&self.password), "the password printed: {out}");
        assert!(!doc.contains(&self.password), "the password printed: {doc}");
        (code, out)
    }
}

#[test]
fn a_yubihsm_instance_passes_with_its_credential_connector_session_and_keys() {
    let y = YubiInstance::new();
    let (code, out) = y.checks();
    assert_eq!(code, 0, "{out}");
    let url = y.connector.url();
    for expected in [
        format!(
            "YubiHSM credential {} holds authentication key 2 and a password",
            y.credential.display()
        ),
        format!("yubihsm-connector at {url} accepts connections"),
        format!("the YubiHSM 2 at {url}: session opened with authentication key 2"),
        "key \"hot\" found in the HSM".to_owned(),
        "keywardd would start".to_owned(),
    ] {
        assert!(out.contains(&expected), "{expected:?} missing: {out}");
    }
    // The PKCS#11 wording is not used for this backend.
    for wrong in ["PIN", "token", "module"] {
        assert!(!out.contains(wrong), "{wrong:?} in {out}");
    }
}

#[test]
fn a_yubihsm_key_the_policy_names_that_is_missing_or_unprotected_is_named() {
    let y = YubiInstance::new();
    // An imported key under a name the policy uses.
    y.connector
        .client()
        .put_asymmetric_key(
            0x0021,
            "imported".into(),
            yubihsm::Domain::DOM1,
            yubihsm::Capability::SIGN_EDDSA,
            yubihsm::asymmetric::Algorithm::Ed25519,
            rand::random::<[u8; 32]>().to_vec(),
        )
        .unwrap();
    let policy = std::fs::read_to_string(&y.inst.policy).unwrap();
    y.inst.write_policy(&policy.replace(
        "keys = [\"hot\"]",
        "keys = [\"hot\", \"imported\", \"absent\"]",
    ));
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[key_unprotected]"), "{out}");
    assert!(out.contains("origin is Imported"), "{out}");
    assert!(out.contains("[key_missing]"), "{out}");
    assert!(
        out.contains(&format!(
            "key \"absent\" named by policy {} is not in the YubiHSM 2 at {}",
            y.inst.policy.display(),
            y.connector.url()
        )),
        "{out}"
    );
}

#[test]
fn a_world_readable_yubihsm_credential_is_refused_with_the_mode_it_needs() {
    let mut y = YubiInstance::new();
    chmod(&y.credential, 0o644);
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    let shown = y.credential.display().to_string();
    for expected in [
        "[credential_refused]",
        "mode 0644",
        &format!("chmod 0400 {shown}"),
    ] {
        assert!(out.contains(expected), "{expected:?} missing: {out}");
    }
    assert!(out.contains("mend the credential file first"), "{out}");
    // keywardd refuses to start on it as well.
    let (code, log) = y.inst.start_refused(&[]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains(&format!("chmod 0400 {shown}")), "{log}");
}

#[test]
fn a_malformed_or_missing_yubihsm_credential_is_named_without_its_content() {
    let mut y = YubiInstance::new();
    let secret = hex::encode(rand::random::<[u8; 16]>());
    y.set_credential(&format!("{secret}\n"), 0o400);
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[credential_malformed]"), "{out}");
    assert!(out.contains("AUTH_KEY_ID:PASSWORD"), "{out}");
    assert!(!out.contains(&secret), "the file's content printed: {out}");
    let (code, log) = y.inst.start_refused(&[]);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("credential_malformed") || log.contains("AUTH_KEY_ID:PASSWORD"),
        "{log}"
    );
    assert!(!log.contains(&secret), "{log}");

    std::fs::remove_file(&y.credential).unwrap();
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[credential_missing]"), "{out}");
    assert!(
        out.contains(&format!(
            "no credential: {} does not exist",
            y.credential.display()
        )),
        "{out}"
    );
}

#[test]
fn a_refused_yubihsm_password_is_named_hsm_auth_failed() {
    let y = YubiInstance::new();
    let wrong = hex::encode(rand::random::<[u8; 16]>());
    y.set_credential(&format!("2:{wrong}\n"), 0o400);
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[hsm_auth_failed]"), "{out}");
    assert!(out.contains("refused authentication key 2"), "{out}");
    assert!(!out.contains(&wrong), "{out}");
}

#[test]
fn a_yubihsm_connector_that_is_down_is_named_and_passes_once_back() {
    let y = YubiInstance::new();
    y.connector.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_until(
        "the connector down",
        std::time::Duration::from_secs(10),
        || !y.connector.accepts(),
    );
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    let url = y.connector.url();
    assert!(out.contains("[hsm_connector_unreachable]"), "{out}");
    assert!(
        out.contains(&format!("nothing accepts connections at {url}")),
        "{out}"
    );
    assert!(out.contains("systemctl start yubihsm-connector"), "{out}");

    y.connector.signal(nix::sys::signal::Signal::SIGUSR2);
    wait_until(
        "the connector back",
        std::time::Duration::from_secs(10),
        || y.connector.accepts(),
    );
    let (code, out) = y.checks();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_yubihsm_on_usb_that_is_not_plugged_in_is_named_with_the_udev_fix() {
    let y = YubiInstance::new();
    let text = std::fs::read_to_string(&y.inst.config).unwrap();
    std::fs::write(
        &y.inst.config,
        text.replace(
            &format!("connector = \"{}\"", y.connector.url()),
            "connector = \"usb:0012345678\"",
        ),
    )
    .unwrap();
    let (code, out) = y.checks();
    assert_eq!(code, 1, "{out}");
    // This machine has no YubiHSM 2 (none with that serial, at least).
    assert!(out.contains("[hsm_connector_unreachable]"), "{out}");
    assert!(
        out.contains("no YubiHSM 2 with serial number 0012345678 is plugged in"),
        "{out}"
    );
    assert!(out.contains("yubihsm-usb.conf"), "{out}");
}
