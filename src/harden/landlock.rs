//! Landlock: the file-system half of the lockdown, which seccomp cannot do
//! (a filter sees `openat`'s flags, never its path).
//!
//! keywardd may create, write, truncate, rename and remove files only
//! beneath the paths [`writable_paths`] names: the state directory (the
//! ledger and its -wal/-shm), the sockets' directories (bound at start,
//! removed at stop), SoftHSM's token directory (SoftHSM re-opens its object
//! and lock files for writing on every signature) and the `write_paths` of
//! the seccomp extension files. Reading stays unrestricted.
//!
//! Landlock restricts the calling thread and the threads it starts later,
//! so [`restrict_writes`] runs in `main` while the process has one thread
//! (before the runtime, the HSM module and its threads), not at the
//! lockdown step, where threads already run and the kernel's Landlock has
//! no TSYNC before ABI v8.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
};

use crate::config::Config;

/// Why the write restriction could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The process already runs several threads.
    #[error(
        "Landlock must be set up while the process has one thread; it has {0} (a bug in keywardd's start-up order)"
    )]
    Threads(usize),
    /// A path to allow could not be opened.
    #[error("cannot allow writes beneath {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel refused the ruleset.
    #[error("cannot restrict file-system writes with Landlock: {0}")]
    Ruleset(String),
}

impl LandlockError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            LandlockError::Threads(_) => "landlock_threads",
            LandlockError::Path { .. } => "landlock_path",
            LandlockError::Ruleset(_) => "landlock_failed",
        }
    }
}

/// Whether the kernel enforces the restriction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    /// Fully.
    Fully,
    /// Partly (an older Landlock ABI).
    Partly,
    /// Not at all: the kernel has no Landlock (the unit's
    /// `ProtectSystem=strict` still holds).
    No,
}

/// The paths keywardd may write beneath, for `cfg` and the extension
/// files' `write_paths`.
pub fn writable_paths(cfg: &Config, extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut paths = vec![cfg.daemon.state_dir.clone()];
    for socket in [&cfg.daemon.agent_socket, &cfg.daemon.admin_socket] {
        if let Some(dir) = socket.parent() {
            paths.push(dir.to_path_buf());
        }
    }
    if let Some(dir) = softhsm_conf(cfg).and_then(|conf| softhsm_token_dir(&conf)) {
        paths.push(dir);
    }
    paths.extend(extra.iter().cloned());
    paths.sort();
    paths.dedup();
    paths
}

/// SoftHSM2's configuration file: `SOFTHSM2_CONF` from `[hsm] env` or the
/// environment, else SoftHSM's default when the module is SoftHSM's.
fn softhsm_conf(cfg: &Config) -> Option<PathBuf> {
    if let Some(conf) = cfg.hsm.env.get("SOFTHSM2_CONF") {
        return Some(PathBuf::from(conf));
    }
    if let Some(conf) = std::env::var_os("SOFTHSM2_CONF") {
        return Some(PathBuf::from(conf));
    }
    let p = cfg.hsm.pkcs11()?;
    let is_softhsm = p
        .module
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("softhsm"));
    is_softhsm.then(|| PathBuf::from("/etc/softhsm/softhsm2.conf"))
}

/// `directories.tokendir` of a SoftHSM2 configuration file.
fn softhsm_token_dir(conf: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "directories.tokendir").then(|| PathBuf::from(value.trim()))
    })
}

/// Restricts file-system writes of this process to beneath `paths` (each
/// must exist). Call it while the process has one thread.
pub fn restrict_writes(paths: &[PathBuf]) -> Result<Enforced, LandlockError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads != 1 {
        return Err(LandlockError::Threads(threads));
    }
    for path in paths {
        std::fs::metadata(path).map_err(|source| LandlockError::Path {
            path: path.clone(),
            source,
        })?;
    }
    let ruleset_err = |e: landlock::RulesetError| LandlockError::Ruleset(e.to_string());
    // ABI v3's write rights (v5's device ioctls are left alone: a YubiHSM
    // over USB needs them). Best effort: an older kernel enforces less.
    let write = AccessFs::from_write(ABI::V3);
    let status = Ruleset::default()
        .handle_access(write)
        .map_err(ruleset_err)?
        .create()
        .map_err(ruleset_err)?
        .add_rules(path_beneath_rules(paths, write))
        .map_err(ruleset_err)?
        .restrict_self()
        .map_err(ruleset_err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partly,
        RulesetStatus::NotEnforced => Enforced::No,
    })
}
