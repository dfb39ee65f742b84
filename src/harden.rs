//! Process hardening applied at daemon start, before any untrusted input is
//! read.

pub mod landlock;
pub mod seccomp;
pub mod self_test;

/// Why keywardd cannot confine itself (it then refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The seccomp filter (with its extension files) is unusable.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// Landlock could not be set up.
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    /// The state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl ConfineError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ConfineError::Seccomp(e) => e.code(),
            ConfineError::Landlock(e) => e.code(),
            ConfineError::StateDir { .. } => "io_error",
        }
    }
}

/// keywardd's confinement, set up in `main` while it has one thread: loads
/// the daemon's seccomp filter (with its HSM backend's program and
/// `seccomp.d/` beside the configuration file) for the lockdown step to apply, and restricts file-system writes
/// with Landlock to the directories keywardd writes ([`landlock`]). Without
/// Landlock in the kernel, that half is logged and skipped.
pub fn confine_daemon(cfg: &crate::config::Config) -> Result<seccomp::Filter, ConfineError> {
    use std::os::unix::fs::DirBuilderExt;
    let filter = seccomp::Filter::for_daemon(cfg)?;
    // Landlock allows only existing paths; the ledger's step would create
    // the state directory the same way.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.daemon.state_dir)
        .map_err(|source| ConfineError::StateDir {
            path: cfg.daemon.state_dir.clone(),
            source,
        })?;
    let paths = landlock::writable_paths(cfg, &filter.write_paths);
    match landlock::restrict_writes(&paths)? {
        landlock::Enforced::Fully => {
            tracing::info!(paths = ?paths, "Landlock: writes only beneath these paths")
        }
        landlock::Enforced::Partly => tracing::warn!(
            paths = ?paths,
            "Landlock: writes restricted, but this kernel's Landlock does not cover every kind of write"
        ),
        landlock::Enforced::No => tracing::warn!(
            "Landlock: this kernel has none; file-system writes rest on the unit's ProtectSystem=strict"
        ),
    }
    Ok(filter)
}

/// What could not be applied (logged as warnings; none is fatal).
pub type Warnings = Vec<String>;

/// Sets a private umask (0077), disables core dumps and ptrace attachment by non-root (PR_SET_DUMPABLE 0),
/// sets no_new_privs, ignores SIGXFSZ (a file-size limit must surface as a
/// write error that the ledger reports, not kill the signer), and locks
/// memory where permitted so secrets are not swapped out.
pub fn harden_process() -> Warnings {
    use nix::sys::resource::{Resource, setrlimit};
    let mut warnings = Vec::new();
    // Files and sockets start private; the sockets are opened up to their
    // configured modes explicitly after they are bound.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        warnings.push(format!("cannot disable core dumps: {e}"));
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warnings.push(format!("cannot clear the dumpable flag: {e}"));
    }
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        warnings.push(format!("cannot set no_new_privs: {e}"));
    }
    ignore_sigxfsz(&mut warnings);
    limit_malloc_arenas(&mut warnings);
    if let Err(e) = nix::sys::mman::mlockall(
        nix::sys::mman::MlockAllFlags::MCL_CURRENT | nix::sys::mman::MlockAllFlags::MCL_FUTURE,
    ) {
        warnings.push(format!(
            "cannot lock memory (mlockall: {e}); grant CAP_IPC_LOCK or raise LimitMEMLOCK to keep secrets out of swap"
        ));
    }
    warnings
}

#[allow(unsafe_code)]
fn ignore_sigxfsz(warnings: &mut Warnings) {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing SIG_IGN runs no handler code, so none of the
    // async-signal-safety hazards that make `signal` unsafe apply.
    if let Err(e) = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) } {
        warnings.push(format!("cannot ignore SIGXFSZ: {e}"));
    }
}

/// Keeps glibc's malloc to its main heap. By default glibc gives threads that
/// contend for the heap arenas of their own (up to 8 per core), each
/// reserving 64 MiB of address space. Under `mlockall(MCL_FUTURE)` every
/// reservation counts against `RLIMIT_MEMLOCK` although it is never touched:
/// measured on keywardd under load (tests/units.rs), 10 arenas made 640 MiB
/// of a 700 MiB locked size, far above any sane `LimitMEMLOCK=`, and once
/// the limit is reached every new mapping (thread stacks included) fails.
/// One heap keeps the locked size to what the daemon really uses; its lock
/// is not what keywardd waits on (the HSM and fsync are).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas(warnings: &mut Warnings) {
    use std::ffi::c_int;
    /// glibc's `M_ARENA_MAX` (malloc.h).
    const M_ARENA_MAX: c_int = -8;
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // SAFETY: mallopt takes two integers, touches no memory of ours and
    // takes malloc's own lock; M_ARENA_MAX only caps arenas created later.
    if unsafe { mallopt(M_ARENA_MAX, 1) } != 1 {
        warnings.push("cannot limit malloc to one arena (mallopt M_ARENA_MAX failed)".to_owned());
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas(_warnings: &mut Warnings) {}
