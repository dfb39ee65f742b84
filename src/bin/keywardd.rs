//! keywardd: the keyward signing daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keyward::config::{Config, DEFAULT_CONFIG};
use keyward::daemon::{DaemonError, StartOptions, run};

/// The keyward signing daemon: serves the agent and admin sockets.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// keyward.toml
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Start although the audit history fails verification at exactly this
    /// sequence number (the number the refusal names). The acknowledgement
    /// is recorded in the ledger; it holds for this start only.
    #[arg(long, value_name = "SEQ")]
    accept_broken_history: Option<u64>,
    /// Packaging: write the manual page keywardd.8 into DIR and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    write_man_page: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.write_man_page {
        use clap::CommandFactory;
        return match keyward::manpage::write(Args::command().name("keywardd"), "8", dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "keywardd: cannot write the manual page into {}: {e}",
                    dir.display()
                );
                ExitCode::from(2)
            }
        };
    }
    keyward::logging::init();
    // Test builds only (feature `test-hooks`, never in a release build).
    #[cfg(feature = "test-hooks")]
    match keyward::faults::install_from_env() {
        Ok(Some(spec)) => tracing::warn!(faults = %spec, "TEST BUILD: fault injection in force"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("keywardd: {e}");
            return ExitCode::from(2);
        }
    }
    let cfg = match Config::load(&args.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("keywardd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    for warning in keyward::harden::harden_process() {
        tracing::warn!("{warning}");
    }
    // The PKCS#11 module reads its environment when it is loaded; set it now,
    // while this process has a single thread.
    keyward::process::apply_module_env(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keywardd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(
        cfg,
        StartOptions {
            accept_broken_history: args.accept_broken_history,
        },
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywardd: {e}");
            tracing::error!(code = e.code(), "{e}");
            match e {
                DaemonError::Config(_)
                | DaemonError::MissingKey { .. }
                | DaemonError::Descriptors(_) => ExitCode::from(2),
                DaemonError::History(_) => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}
