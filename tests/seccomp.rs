//! The lockdown's seccomp filter (and Landlock) on the real keywardd and
//! `keyward mirror`: every thread filtered, the self-test's forbidden calls
//! refused, a filter missing a needed call really kills, and extension
//! files that would weaken the filter refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The `Seccomp:` and `NoNewPrivs:` lines of every thread of `pid`.
fn thread_states(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let line = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .unwrap_or("")
                .to_owned()
        };
        out.push((
            task.file_name().to_string_lossy().into_owned(),
            line("Seccomp:"),
            line("NoNewPrivs:"),
        ));
    }
    out
}

fn assert_filtered(pid: u32) {
    let states = thread_states(pid);
    assert!(!states.is_empty());
    for (tid, seccomp, nnp) in &states {
        assert_eq!(seccomp, "Seccomp:\t2", "thread {tid} of {pid}: {states:?}");
        assert_eq!(nnp, "NoNewPrivs:\t1", "thread {tid} of {pid}: {states:?}");
    }
}

#[test]
fn every_thread_of_a_serving_keywardd_is_filtered_and_signing_works() {
    let mut inst = Instance::start_default();
    // Work that starts threads after the lockdown (the blocking pool,
    // the HSM executor) and runs the whole signing path under the filter.
    let rt = rt();
    let client = inst.client();
    for i in 0..3 {
        let r = rt
            .block_on(client.submit_intent(&transfer(&format!("sc-{i}"), &random_pubkey(), "0.01")))
            .unwrap();
        assert!(
            matches!(r, keyward_client::IntentOutcome::Signed(_)),
            "{r:?}"
        );
    }
    assert_filtered(inst.pid());
    assert!(thread_states(inst.pid()).len() > 2);
    assert_eq!(inst.stop().code(), Some(0), "{}", inst.log());
    assert!(
        inst.log()
            .contains("seccomp filter applied to every thread")
    );
}

/// Not dumpable: the kernel gives the files in /proc/PID (environ, mem,
/// ...) to root instead of the process's user when it is not dumpable.
/// Shown with keywardd running as another uid (as root, they would be
/// root's either way).
#[test]
fn keywardd_running_as_another_user_is_not_dumpable() {
    require_other_uids();
    let inst = Instance::init();
    let chown_all = |p: &Path| {
        let status = Command::new("chown")
            .args(["-R", &format!("{OTHER_UID}:{OTHER_UID}")])
            .arg(p)
            .status()
            .unwrap();
        assert!(status.success());
    };
    chown_all(inst.inst_dir());
    std::fs::set_permissions(inst.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    // The build's directory may be closed to other users: run a copy.
    let exe = inst.dir.path().join("keywardd");
    std::fs::copy(KEYWARDD, &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = inst.dir.path().join("other-uid.log");
    let mut child = Command::new(&exe)
        .arg("--config")
        .arg(&inst.config)
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .env("KEYWARD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "keywardd as another user is ready",
        Duration::from_secs(30),
        || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("keywardd exited ({status}): {}", read_log());
            }
            read_log().contains("keywardd ready")
        },
    );
    let pid = child.id();
    let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid();
    let states = thread_states(pid);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/environ belongs to uid {owner}: the daemon running as uid {OTHER_UID} is dumpable"
    );
    assert!(
        states
            .iter()
            .all(|(_, s, n)| s == "Seccomp:\t2" && n == "NoNewPrivs:\t1"),
        "{states:?}"
    );
}

#[test]
fn the_self_test_shows_each_forbidden_call_refused() {
    let inst = Instance::init();
    let out = Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .arg("--seccomp-self-test")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for call in ["execve(", "socket(AF_INET", "ptrace(", "openat("] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(call))
            .unwrap_or_else(|| panic!("no line for {call}: {stdout}"));
        assert!(line.contains(": refused: "), "{line}");
    }
    // The write outside the writable directories left no file behind.
    assert!(!stdout.contains("created"), "{stdout}");
    assert!(stdout.contains("all 4 forbidden calls refused"), "{stdout}");
}

/// The filter is really in force: the same daemon with one system call it
/// needs in steady state removed from the filter (a test-build hook) is
/// killed by SIGSYS on the first connection, after a normal start-up.
#[test]
fn a_filter_lacking_accept4_kills_the_daemon_at_its_first_connection() {
    let inst = Instance::init();
    let log = inst.dir.path().join("drop.log");
    let mut child = Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .env("KEYWARD_LOG", "info")
        .env("KEYWARD_TEST_SECCOMP_DROP", "accept4")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let _ = std::os::unix::net::UnixStream::connect(&inst.agent_socket);
        assert!(Instant::now() < deadline, "keywardd was not killed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("keywardd ready"), "{text}");
    assert_eq!(status.signal(), Some(nix::libc::SIGSYS), "{status}: {text}");
}

fn write_extension(inst: &Instance, name: &str, text: &str) {
    let dir = inst.inst_dir().join("seccomp.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn an_extension_allowing_execve_is_refused_at_start() {
    let mut inst = Instance::init();
    write_extension(
        &inst,
        "vendor.json",
        r#"{"comment": "vendor", "allow": [{"syscall": "execve", "comment": "helper"}]}"#,
    );
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("vendor.json"), "{log}");
    assert!(log.contains("never allows"), "{log}");
}

#[test]
fn an_extension_naming_an_unknown_system_call_is_refused_at_start() {
    let mut inst = Instance::init();
    write_extension(
        &inst,
        "vendor.json",
        r#"{"comment": "vendor", "allow": [{"syscall": "frobnicate", "comment": "x"}]}"#,
    );
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("unknown system call \"frobnicate\""), "{log}");
}

#[test]
fn an_extension_changing_the_default_action_is_refused_at_start() {
    let mut inst = Instance::init();
    write_extension(
        &inst,
        "vendor.json",
        r#"{"keywardd": {"mismatch_action": "allow", "match_action": "allow", "filter": []}}"#,
    );
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("seccomp extension"), "{log}");
}

/// A valid extension is merged: the daemon serves with it, filtered.
#[test]
fn a_valid_extension_is_merged_and_the_daemon_serves() {
    let mut inst = Instance::init();
    write_extension(
        &inst,
        "vendor.json",
        r#"{"comment": "vendor module reads the host name",
            "allow": [{"syscall": "uname", "comment": "gethostname"}]}"#,
    );
    inst.start();
    // The sockets accept (into their backlog) from the moment they are
    // bound, before the lockdown: wait for the daemon to serve.
    wait_until("keywardd ready", Duration::from_secs(30), || {
        inst.log().contains("keywardd ready")
    });
    assert_filtered(inst.pid());
    assert!(inst.log().contains("vendor.json"), "{}", inst.log());
    assert_eq!(inst.stop().code(), Some(0));
}

/// `keyward mirror` applies its own filter once started, on every thread,
/// and ships entries under it.
#[test]
fn the_mirror_runs_filtered_and_ships_under_its_filter() {
    let mut inst = Instance::init();
    let (_copy, ack_dir) = inst.with_file_mirror("");
    inst.start();
    let mut mirror = start_mirror(&inst);
    wait_until("the mirror's first ack", Duration::from_secs(20), || {
        keyward::mirror::read_ack(&ack_dir, "file") > 0
    });
    let first = keyward::mirror::read_ack(&ack_dir, "file");
    assert_filtered(mirror.id());
    let r = rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("m-1", &random_pubkey(), "0.01")),
        )
        .unwrap();
    assert!(
        matches!(r, keyward_client::IntentOutcome::Signed(_)),
        "{r:?}"
    );
    wait_until(
        "the mirror to ship the signature",
        Duration::from_secs(20),
        || keyward::mirror::read_ack(&ack_dir, "file") > first,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mirror.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = mirror.wait().unwrap();
    assert!(status.success(), "{status}");
}
