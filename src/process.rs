//! Process-wide set-up that must happen while the process is single-threaded.

use crate::config::Config;

/// Sets the environment variables the PKCS#11 module needs (for example
/// `SOFTHSM2_CONF`) from `[hsm] env`.
///
/// Call it first thing in `main`, before any thread is started: changing
/// the environment while other threads may read it is undefined behaviour.
#[allow(unsafe_code)]
pub fn apply_module_env(cfg: &Config) {
    for (name, value) in &cfg.hsm.env {
        // SAFETY: called from `main` before the tokio runtime or any other
        // thread exists, so nothing can read the environment concurrently.
        unsafe { std::env::set_var(name, value) };
    }
}

/// Sets one environment variable before any thread starts (see
/// [`apply_module_env`]).
#[allow(unsafe_code)]
pub fn set_env_single_threaded(name: &str, value: &std::path::Path) {
    // SAFETY: the caller runs in `main` before any thread is started.
    unsafe { std::env::set_var(name, value) };
}
