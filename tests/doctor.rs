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
