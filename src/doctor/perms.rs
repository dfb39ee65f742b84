//! Owners and modes of the files and directories keywardd trusts.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::{Code, Finding};
use crate::config::Config;

/// The daemon's system user in the packaged layout: it may own its config.
pub const DAEMON_USER: &str = "keyward";

/// Users who may own the config and the policy: root, this process's user
/// and the packaged daemon user.
fn trusted_owner(uid: u32) -> bool {
    uid == 0
        || uid == nix::unistd::geteuid().as_raw()
        || crate::policy::system_user_uid(DAEMON_USER) == Some(uid)
}

/// The config and the policy: no write access for group or others (they
/// decide what is signed), owned by root or the daemon's user.
pub(super) fn check_config_files(cfg: &Config, out: &mut Vec<Finding>) {
    check_trusted_file("configuration file", &cfg.file, out);
    check_trusted_file("policy file", &cfg.daemon.policy, out);
}

fn check_trusted_file(what: &str, path: &Path, out: &mut Vec<Finding>) {
    // A missing or unreadable file is reported by loading it.
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        let needed = mode & !0o027;
        out.push(Finding::error(
            Code::FileWritableByOthers,
            what,
            Some(path),
            format!(
                "{} has mode {mode:04o}: {} may change it, and with it what keywardd signs",
                path.display(),
                if mode & 0o002 != 0 {
                    "every user"
                } else {
                    "its group"
                }
            ),
            format!("chmod {needed:04o} {}", path.display()),
        ));
    }
    if !trusted_owner(meta.uid()) {
        out.push(Finding::error(
            Code::FileWrongOwner,
            what,
            Some(path),
            format!(
                "{} belongs to uid {}, not to root or the daemon's user",
                path.display(),
                meta.uid()
            ),
            format!("chown root:{DAEMON_USER} {}", path.display()),
        ));
    }
}

/// The state directory (ledger, acknowledgements): nothing for others.
/// Group access is the packaged layout's (group `keyward-ledger`, mode
/// 2750). A directory that does not exist yet is created by keywardd.
pub(super) fn check_state_dir(cfg: &Config, out: &mut Vec<Finding>) {
    let dir = &cfg.daemon.state_dir;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        out.push(Finding::error(
            Code::StateDirUnsafe,
            "state directory",
            Some(dir),
            format!("{} is not a directory", dir.display()),
            format!(
                "move it away; keywardd creates {} (mode 0700)",
                dir.display()
            ),
        ));
        return;
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        let needed = mode & !0o027;
        out.push(Finding::error(
            Code::StateDirUnsafe,
            "state directory",
            Some(dir),
            format!(
                "{} has mode {mode:04o}: every user may {} the ledger",
                dir.display(),
                if mode & 0o002 != 0 { "replace" } else { "read" }
            ),
            format!("chmod {needed:04o} {}", dir.display()),
        ));
    }
}

/// The directories of the agent and admin sockets: present (or made by
/// the unit's `RuntimeDirectory=` at start), and not writable by everyone
/// (anyone could put a socket of their own in place).
pub(super) fn check_socket_dirs(cfg: &Config, out: &mut Vec<Finding>) {
    let mut seen = Vec::new();
    for socket in [&cfg.daemon.agent_socket, &cfg.daemon.admin_socket] {
        let Some(dir) = socket.parent() else {
            continue;
        };
        if seen.contains(&dir) {
            continue;
        }
        seen.push(dir);
        match std::fs::metadata(dir) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o7777;
                if !meta.is_dir() {
                    out.push(Finding::error(
                        Code::SocketDirMissing,
                        "socket directory",
                        Some(dir),
                        format!("{} is not a directory", dir.display()),
                        format!("remove it or point {} elsewhere", cfg.file.display()),
                    ));
                } else if mode & 0o002 != 0 {
                    out.push(Finding::error(
                        Code::SocketDirUnsafe,
                        "socket directory",
                        Some(dir),
                        format!(
                            "{} has mode {mode:04o}: every user may replace {}",
                            dir.display(),
                            socket.display()
                        ),
                        format!("chmod {:04o} {}", mode & !0o1002, dir.display()),
                    ));
                }
            }
            Err(_) => {
                // keywardd does not create it: the unit's RuntimeDirectory=
                // does, at each start.
                let by_unit = super::credential::unit_runtime_dirs()
                    .iter()
                    .any(|d| d.as_path() == dir);
                if !by_unit {
                    out.push(Finding::error(
                        Code::SocketDirMissing,
                        "socket directory",
                        Some(dir),
                        format!("{} does not exist", dir.display()),
                        format!(
                            "mkdir -m 0751 {} (under systemd, RuntimeDirectory= in keywardd.service creates it), or point daemon.agent_socket/admin_socket in {} elsewhere",
                            dir.display(),
                            cfg.file.display()
                        ),
                    ));
                }
            }
        }
    }
}
