//! `keywardd --seccomp-self-test`: shows that the lockdown refuses what a
//! compromised signer would try first.
//!
//! Each probe runs in a child process (`keywardd --seccomp-probe NAME`),
//! since the filter kills the whole process: the child sets up Landlock and
//! applies the daemon's filter exactly as keywardd does (extension files
//! included), makes one forbidden call, and reports. A probe passes when
//! the child is killed by `SIGSYS` or the call fails with an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::landlock::{Enforced, restrict_writes, writable_paths};
use super::seccomp::Filter;
use crate::config::Config;

/// Exit code of a probe whose forbidden call succeeded.
const ALLOWED: i32 = 3;
/// Exit code of a probe whose call was refused with an error (not 0: a
/// successful `execve` of /bin/true exits 0).
const REFUSED: i32 = 10;

/// The forbidden calls tried.
pub const PROBES: &[(&str, &str)] = &[
    ("execve", "execve(\"/bin/true\")"),
    ("socket-inet", "socket(AF_INET, SOCK_STREAM)"),
    ("ptrace", "ptrace(PTRACE_TRACEME)"),
    (
        "open-write",
        "openat(PATH outside the writable directories, O_WRONLY|O_CREAT)",
    ),
];

/// The network probe on a configuration whose backend programs allow TCP
/// over IPv4 (a YubiHSM behind an HTTP connector on 127.0.0.1): UDP, which
/// no program allows (a compromised signer's first way out, e.g. over DNS).
pub const UDP_PROBE: (&str, &str) = ("socket-udp", "socket(AF_INET, SOCK_DGRAM)");

/// The probes for the configuration `config`: [`PROBES`], with
/// [`UDP_PROBE`] for `socket-inet` when the configuration's backend
/// programs allow TCP over IPv4.
pub fn probes_for(config: &Path) -> Vec<(&'static str, &'static str)> {
    let inet_allowed = Config::load(config).is_ok_and(|cfg| {
        super::seccomp::BackendProgram::for_hsm(&cfg.hsm)
            .contains(&super::seccomp::BackendProgram::Tcp4)
    });
    PROBES
        .iter()
        .map(|p| {
            if inet_allowed && p.0 == "socket-inet" {
                UDP_PROBE
            } else {
                *p
            }
        })
        .collect()
}

/// A file outside every writable directory for the `open-write` probe.
pub fn outside_path() -> PathBuf {
    std::env::temp_dir().join(format!("keyward-self-test-{}", std::process::id()))
}

/// Runs every probe with `exe` (keywardd itself), prints one line per probe
/// and a summary; `true` when every call was refused.
pub fn run(exe: &Path, config: &Path) -> bool {
    let target = outside_path();
    let mut all = true;
    let probes = probes_for(config);
    for (name, call) in &probes {
        let out = Command::new(exe)
            .arg("--config")
            .arg(config)
            .arg("--seccomp-probe")
            .arg(name)
            .arg("--seccomp-probe-path")
            .arg(&target)
            .output();
        let call = call.replace("PATH", &target.display().to_string());
        let (refused, how) = match out {
            Err(e) => (false, format!("the probe could not run: {e}")),
            Ok(out) => {
                use std::os::unix::process::ExitStatusExt;
                let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                match (out.status.signal(), out.status.code()) {
                    (Some(sig), _) if sig == nix::libc::SIGSYS => {
                        (true, "killed by SIGSYS (seccomp)".to_owned())
                    }
                    (Some(sig), _) => (false, format!("the probe died of signal {sig}: {err}")),
                    (None, Some(REFUSED)) => (true, said),
                    (None, Some(ALLOWED)) => (false, format!("ALLOWED: {said}")),
                    (None, code) => (false, format!("the probe failed ({code:?}): {err}")),
                }
            }
        };
        all &= refused;
        let verdict = if refused { "refused" } else { "NOT REFUSED" };
        println!("{call}: {verdict}: {how}");
    }
    let _ = std::fs::remove_file(&target);
    if all {
        println!(
            "seccomp self-test: all {} forbidden calls refused",
            probes.len()
        );
    } else {
        println!("seccomp self-test: FAILED: a forbidden call was not refused");
    }
    all
}

/// The child's side: locks down as keywardd does, makes the call `name`,
/// prints what happened and returns the exit code (if it returns at all).
pub fn probe(name: &str, config: &Path, target: &Path) -> i32 {
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return 2;
        }
    };
    let filter = match Filter::for_daemon(&cfg) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    // A fresh install may lack the state directory; the daemon creates it
    // before it locks down, the probe only allows what exists.
    let paths: Vec<PathBuf> = writable_paths(&cfg, &filter.write_paths)
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    match restrict_writes(&paths) {
        Ok(Enforced::Fully | Enforced::Partly) => {}
        Ok(Enforced::No) => eprintln!("this kernel has no Landlock"),
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    }
    if let Err(e) = filter.apply() {
        eprintln!("{e}");
        return 2;
    }
    let result: Result<String, nix::Error> = match name {
        "execve" => nix::unistd::execv(c"/bin/true", &[c"true"]).map(|_| "ran".into()),
        "socket-inet" => nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .map(|_| "socket created".into()),
        "socket-udp" => nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .map(|_| "socket created".into()),
        // TRACEME rather than attaching to a process: if it were allowed,
        // attaching would stop that process.
        "ptrace" => nix::sys::ptrace::traceme().map(|_| "traced by the parent".into()),
        "open-write" => {
            use nix::fcntl::{OFlag, open};
            open(
                target,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .map(|_| format!("{} created", target.display()))
        }
        other => {
            eprintln!("unknown probe {other:?}");
            return 2;
        }
    };
    match result {
        Ok(what) => {
            println!("{what}");
            ALLOWED
        }
        Err(errno) => {
            println!("failed with {errno}");
            REFUSED
        }
    }
}

/// keywardd's `--seccomp-self-test` and `--seccomp-probe`: the exit code
/// when one of them was asked for, `None` otherwise.
pub fn dispatch(
    self_test: bool,
    probe_name: Option<&str>,
    probe_path: Option<&Path>,
    config: &Path,
) -> Option<u8> {
    if let Some(name) = probe_name {
        let target = probe_path.map_or_else(outside_path, Path::to_path_buf);
        return Some(u8::try_from(probe(name, config, &target)).unwrap_or(2));
    }
    if !self_test {
        return None;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("keywardd: cannot find its own executable: {e}");
            return Some(2);
        }
    };
    Some(if run(&exe, config) { 0 } else { 1 })
}
