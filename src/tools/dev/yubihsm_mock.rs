//! `keyward init --dev DIR --backend yubihsm-mock`: a development instance
//! on the yubihsm crate's MockHsm, reached the way a real YubiHSM 2 is,
//! through a connector over HTTP on 127.0.0.1.
//!
//! The MockHsm lives in a detached `keyward hsm mock-connector` process
//! (its own process group, so a terminal's Ctrl-C or a test harness killing
//! keywardd leaves it alone): the keys survive keywardd's restarts, and the
//! connector exits by itself once DIR is removed. Its pid is in
//! `DIR/yubihsm-mock.pid`, its port in `DIR/yubihsm-mock.port`, its log in
//! `DIR/yubihsm-mock.log`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{DevError, DevInstance, create_dir, finish_dev, toml_str, write_new};

/// Pid file of the mock connector, in the instance directory.
pub const PID_FILE: &str = "yubihsm-mock.pid";
/// Port file the mock connector writes once it listens.
pub const PORT_FILE: &str = "yubihsm-mock.port";
/// The mock connector's log.
pub const LOG_FILE: &str = "yubihsm-mock.log";
/// The credential file keywardd authenticates with.
pub const CREDENTIAL_FILE: &str = "yubihsm-signer";

/// How long the mock connector may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The running mock connector of a development instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConnector {
    /// Its process id (also in [`PID_FILE`]).
    pub pid: u32,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
}

/// Creates a development instance in `dir` (absolute, new or empty) on a
/// MockHsm: starts `exe hsm mock-connector` (`exe` is the `keyward` binary;
/// `latency_ms` per message), writes the credential file and the
/// configuration with `backend = "yubihsm"`, then makes the keys as the
/// SoftHSM2 instance does (`exportable`: with `exportable_under_wrap =
/// true`, so that `keyward backup create` can export them). On failure the
/// connector is stopped again.
pub fn init_dev(
    dir: &Path,
    exe: &Path,
    latency_ms: u64,
    uid: u32,
    exportable: bool,
) -> Result<(DevInstance, MockConnector), DevError> {
    create_dir(dir)?;
    let connector = start_connector(dir, exe, latency_ms)?;
    let made = write_credentials(dir).and_then(|credentials| {
        let hsm = format!(
            "[hsm]\n\
             backend = \"yubihsm\"\n\
             connector = \"http://127.0.0.1:{port}\"\n\
             credential_file = {cred}\n{exportable}",
            port = connector.port,
            cred = toml_str(&credentials),
            exportable = if exportable {
                "exportable_under_wrap = true\n"
            } else {
                ""
            },
        );
        finish_dev(
            dir,
            &format!(
                "MockHsm served by `keyward hsm mock-connector`, pid {} in {PID_FILE}",
                connector.pid
            ),
            &hsm,
            uid,
        )
    });
    match made {
        Ok(inst) => Ok((inst, connector)),
        Err(e) => {
            stop(connector.pid);
            Err(e)
        }
    }
}

/// Writes the credential file keywardd authenticates with (mode 0400,
/// `AUTH_KEY_ID:PASSWORD`): MockHsm's factory authentication key. Returns
/// its absolute path.
pub fn write_credentials(dir: &Path) -> Result<PathBuf, DevError> {
    let path = dir.join(CREDENTIAL_FILE);
    // The well-known factory key of every fresh YubiHSM 2 (and of MockHsm);
    // not a secret of this instance.
    write_new(&path, 0o400, "1:password\n")?;
    Ok(path)
}

/// Starts the mock connector detached from this process (its own process
/// group; stdin closed; output to [`LOG_FILE`]), waits for [`PORT_FILE`]
/// and writes [`PID_FILE`].
pub fn start_connector(dir: &Path, exe: &Path, latency_ms: u64) -> Result<MockConnector, DevError> {
    let io = |what: String| move |source| DevError::Io { what, source };
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("cannot create {}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io(format!("cannot open {}", log_path.display())))?;
    let port_file = dir.join(PORT_FILE);
    let mut child = Command::new(exe)
        .args(["hsm", "mock-connector", "--listen", "127.0.0.1:0"])
        .arg("--port-file")
        .arg(&port_file)
        .arg("--exit-when-gone")
        .arg(dir)
        .arg("--latency-ms")
        .arg(latency_ms.to_string())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(io(format!(
            "cannot start {} hsm mock-connector",
            exe.display()
        )))?;
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    let port = loop {
        if let Ok(text) = std::fs::read_to_string(&port_file)
            && let Ok(port) = text.trim().parse::<u16>()
        {
            break port;
        }
        let exited = child
            .try_wait()
            .map_err(io("cannot watch the mock connector".into()))?;
        if let Some(status) = exited {
            return Err(DevError::MockConnector(format!(
                "it exited ({status}) before listening; see {}",
                log_path.display()
            )));
        }
        if Instant::now() > deadline {
            stop(pid);
            return Err(DevError::MockConnector(format!(
                "it did not listen within {} s; see {}",
                START_TIMEOUT.as_secs(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Err(e) = write_new(&dir.join(PID_FILE), 0o600, &format!("{pid}\n")) {
        stop(pid);
        return Err(e);
    }
    // Not waited for: it outlives this process (its parent becomes init).
    drop(child);
    Ok(MockConnector { pid, port })
}

/// Stops the mock connector `pid` (SIGTERM), best effort.
fn stop(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
