//! The operator CLI and the daemon's start-up checks: `keyward init --dev`,
//! invalid configurations, `policy check`, `key list`, socket modes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn init_dev_creates_a_complete_instance_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("inst");
    let out = Command::new(KEYWARD)
        .args(["init", "--dev"])
        .arg(&inst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "keywardd --config {}",
            inst.join("keyward.toml").display()
        )),
        "prints the start command: {stdout}"
    );
    assert_eq!(mode(&inst.join("pin")), 0o400, "PIN file is 0400");
    assert!(inst.join("softhsm2.conf").is_file());
    assert!(
        inst.join("tokens").is_dir(),
        "the token lives in the instance directory"
    );
    let conf = std::fs::read_to_string(inst.join("softhsm2.conf")).unwrap();
    assert!(conf.contains(&inst.join("tokens").display().to_string()));
    let config = std::fs::read_to_string(inst.join("keyward.toml")).unwrap();
    assert!(
        config.contains("token_label = \"keyward-dev\""),
        "token found by label: {config}"
    );
    assert!(!config.contains("slot"), "never by slot number");
    let policy = std::fs::read_to_string(inst.join("policy.toml")).unwrap();
    assert!(policy.contains(&format!("uid = {}", my_uid())), "{policy}");
    assert!(
        !policy.contains("\nallow_recipients"),
        "allowlist left open: {policy}"
    );
    // The PIN never appears in the output or the config.
    let pin = std::fs::read_to_string(inst.join("pin")).unwrap();
    assert!(pin.trim().len() >= 16);
    assert!(!stdout.contains(pin.trim()) && !config.contains(pin.trim()));

    let before = std::fs::read(inst.join("keyward.toml")).unwrap();
    let again = Command::new(KEYWARD)
        .args(["init", "--dev"])
        .arg(&inst)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(
        std::fs::read(inst.join("keyward.toml")).unwrap(),
        before,
        "nothing changed"
    );
}

#[test]
fn keywardd_refuses_invalid_config_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let cases = [
        ("[daemon]\nagent_socket = 5\n", "agent_socket"),
        (
            "[daemon]\nagent_socket = \"/a\"\nadmin_socket = \"/b\"\nstate_dir = \"/c\"\npolicy = \"/d\"\nbogus = 1\n",
            "bogus",
        ),
        ("[daemon\n", ""),
    ];
    for (text, key) in cases {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(KEYWARDD)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&cfg.display().to_string()),
            "names the file: {err}"
        );
        assert!(err.contains(key), "names the key {key}: {err}");
    }
    let out = Command::new(KEYWARDD)
        .arg("--config")
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keywardd_refuses_a_policy_naming_a_key_the_hsm_does_not_have() {
    let mut inst = Instance::init();
    inst.write_policy("[agents.dev]\nuid = {UID}\nkeys = [\"cold\"]\n[agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"2\"\n");
    let out = Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cold"));
    assert!(!inst.is_running());
}

#[test]
fn policy_check_validates_offline() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[agents.a]\nuid = 1000\nkeys = [\"hot\"]\n[agents.a.limits.SOL]\nper_tx = \"1\"\nper_day = \"2\"\n").unwrap();
    let out = Command::new(KEYWARD)
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[agents.a]\nuid = 1000\nkeys = [\"hot\"]\n[agents.a.limits.SOL]\nper_tx = \"1.0000000001\"\nper_day = \"2\"\n").unwrap();
    let out = Command::new(KEYWARD)
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("per_tx") && err.contains(&bad.display().to_string()),
        "{err}"
    );
}

#[test]
fn key_list_sockets_and_offline_commands_on_a_running_instance() {
    let mut inst = Instance::start_default();
    assert_eq!(mode(&inst.agent_socket), 0o660);
    assert_eq!(mode(&inst.admin_socket), 0o600);
    let out = inst.keyward(&["key", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hot") && text.contains(&inst.hot.to_string()) && text.contains("dev"),
        "{text}"
    );

    // A second daemon on the same sockets refuses to start.
    let out = Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(inst.is_running());

    // Offline ledger commands find the database through the config.
    let out = inst.keyward(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = inst.keyward(&["audit", "trail", "no-such-intent"]);
    assert_eq!(out.status.code(), Some(1));
    let out = inst.keyward(&["audit", "export", "--format", "jsonl"]);
    assert!(out.status.success());
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1);
    assert_eq!(first["event"], "key_generated");
    assert_eq!(first["payload"]["public_key"], inst.hot.to_string());
    assert_eq!(inst.stop().code(), Some(0));
}

#[test]
fn keywardd_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let inst = Instance::init();
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("keywardd sends READY=1");
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("READY=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Ready means serving: both sockets accept connections at once.
    std::os::unix::net::UnixStream::connect(&inst.agent_socket).expect("agent socket is up");
    std::os::unix::net::UnixStream::connect(&inst.admin_socket).expect("admin socket is up");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).expect("keywardd sends STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
    assert!(
        !inst.agent_socket.exists(),
        "sockets are removed on a clean stop"
    );
}
