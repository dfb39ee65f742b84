//! `keyward mirror`: the mirror process, shipping ledger entries to the
//! sinks in `[mirror]` until SIGTERM.

use std::path::Path;

use anyhow::{Context, anyhow};
use keyward::config::Config;

use crate::Failure;

/// Runs the mirror until SIGTERM or SIGINT.
pub(crate) fn run(config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    if cfg.mirror.is_none() {
        return Err(Failure(
            2,
            anyhow!("{} has no [mirror] section", config.display()),
        ));
    }
    // The filter is applied by the mirror once its start-up is done.
    let filter = keyward::harden::seccomp::Filter::compiled(keyward::harden::seccomp::Role::Mirror)
        .map_err(|e| Failure(1, anyhow!("{e}")))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    ctrl_stop(std::sync::Arc::clone(&stop))?;
    keyward::mirror::run_locked(&cfg, &stop, Some(&filter))
        .map_err(|e| Failure(1, anyhow!("mirror stopped: {e}")))
}

/// Sets `flag` on SIGTERM or SIGINT (a small thread waiting on a signal set).
fn ctrl_stop(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<(), Failure> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("cannot block SIGTERM")?;
    std::thread::spawn(move || {
        let _ = set.wait();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    Ok(())
}
