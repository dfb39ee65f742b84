//! The systemd watchdog: keywardd pings `WATCHDOG=1` only while its ledger
//! writer answers; a wedged writer (a test hook holds its thread) stops the
//! pings while the process lives on, and they resume once it is released.
//! READY=1 still comes first, once the sockets are bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The test's end of `NOTIFY_SOCKET`.
struct Notify(UnixDatagram);

impl Notify {
    fn bind(path: &Path) -> Notify {
        Notify(UnixDatagram::bind(path).unwrap())
    }

    /// The next message, waiting at most `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.0.set_nonblocking(false).unwrap();
        self.0.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 512];
        match self.0.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Every message already queued.
    fn drain(&self) -> Vec<String> {
        self.0.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = self.0.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    /// Waits (with a deadline) for a `WATCHDOG=1` ping.
    fn wait_ping(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .recv(Duration::from_millis(500))
                .is_some_and(|m| m.contains("WATCHDOG=1"))
            {
                return;
            }
        }
        panic!("no WATCHDOG=1 ping: {what}");
    }
}

fn spawn(inst: &Instance, notify: &Path, wedge: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .env("KEYWARD_LOG", "info")
        .env("NOTIFY_SOCKET", notify)
        // WatchdogSec=1: a check every 0.5 s, each with 0.25 s to answer.
        .env("WATCHDOG_USEC", "1000000")
        .env(
            "KEYWARD_TEST_FAULTS",
            format!("ledger:writer_wedged_while:{}", wedge.display()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
fn a_wedged_ledger_writer_stops_the_watchdog_pings_until_it_is_released() {
    let inst = Instance::init();
    let notify_path = inst.dir.path().join("notify.sock");
    let wedge = inst.dir.path().join("wedge-the-writer");
    let log = inst.dir.path().join("keywardd.log");
    let notify = Notify::bind(&notify_path);
    let mut child = spawn(&inst, &notify_path, &wedge, &log);
    let alive = |child: &mut Child| child.try_wait().unwrap().is_none();

    // READY=1 first, and only once both sockets are bound; pings follow.
    let first = notify
        .recv(Duration::from_secs(60))
        .expect("keywardd sends READY=1");
    assert!(first.contains("READY=1"), "first message: {first:?}");
    assert!(!first.contains("WATCHDOG=1"), "first message: {first:?}");
    UnixStream::connect(&inst.agent_socket).expect("agent socket is up at READY=1");
    UnixStream::connect(&inst.admin_socket).expect("admin socket is up at READY=1");
    notify.wait_ping("after READY=1");
    notify.wait_ping("a second one");

    // Wedge the writer: the next check's round trip is never answered.
    std::fs::write(&wedge, b"").unwrap();
    const MISSED: &str = "code=\"watchdog_ledger_writer\"";
    wait_until(
        "the watchdog reports the wedged writer",
        Duration::from_secs(30),
        || count(&log, MISSED) >= 1,
    );
    // Every ping sent before that report is queued by now; drop them.
    let seen = count(&log, MISSED);
    notify.drain();
    wait_until("two more failed checks", Duration::from_secs(30), || {
        count(&log, MISSED) >= seen + 2
    });
    let during: Vec<String> = notify
        .drain()
        .into_iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .collect();
    assert!(
        during.is_empty(),
        "pings while the writer was wedged: {during:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        alive(&mut child),
        "the daemon lives on; systemd restarts it"
    );
    assert!(count(&log, "not pinging: the ledger writer did not answer") >= 3);

    // Released: the writer answers and the pings resume.
    std::fs::remove_file(&wedge).unwrap();
    notify.wait_ping("after the writer was released");
    wait_until(
        "the watchdog logs that pings resume",
        Duration::from_secs(30),
        || count(&log, "pings resume") >= 1,
    );
    assert!(alive(&mut child));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "clean stop");
}
