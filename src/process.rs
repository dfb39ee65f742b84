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

/// Sets one environment variable, for a PKCS#11 module loaded later (see
/// [`apply_module_env`]).
///
/// # Safety
///
/// It has the contract of [`std::env::set_var`]: no other thread may read
/// or write the environment at the same time other than through `std::env`
/// (which serialises with this call). In particular, no thread may be
/// inside C code that calls `getenv` or `setenv`, such as a PKCS#11
/// module being loaded or running. Calling it from `main` before any other
/// thread is started meets this.
#[allow(unsafe_code)]
pub unsafe fn set_env_single_threaded(name: &str, value: &std::path::Path) {
    // SAFETY: forwarded to the caller (see `# Safety`).
    unsafe { std::env::set_var(name, value) };
}
