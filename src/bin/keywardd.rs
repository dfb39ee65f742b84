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
    /// Apply the seccomp filter (and Landlock) in child processes, try
    /// execve, socket(AF_INET), ptrace and a write outside the writable
    /// directories; exit 0 only if each is refused.
    #[arg(long)]
    seccomp_self_test: bool,
    /// One probe of the self-test (run by it in a child process).
    #[arg(long, hide = true, value_name = "NAME")]
    seccomp_probe: Option<String>,
    /// The file the `open-write` probe tries to create.
    #[arg(long, hide = true, value_name = "PATH")]
    seccomp_probe_path: Option<PathBuf>,
    /// Check the configuration, its files' owners and modes, the HSM token,
    /// PIN and keys, the ledger and the mirror's files; print every finding
    /// with its fix and exit: 0 when keywardd would start, 1 otherwise.
    /// Safe beside a running daemon (nothing is written).
    #[arg(long)]
    check_config: bool,
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
    if let Some(code) = keyward::harden::self_test::dispatch(
        args.seccomp_self_test,
        args.seccomp_probe.as_deref(),
        args.seccomp_probe_path.as_deref(),
        &args.config,
    ) {
        return ExitCode::from(code);
    }
    keyward::logging::init();
    if args.check_config {
        return ExitCode::from(keyward::doctor::run_cli(&args.config));
    }
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
    // The lockdown's filter and, while there is one thread, Landlock.
    let seccomp = match keyward::harden::confine_daemon(&cfg) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("keywardd: {e}");
            return ExitCode::from(1);
        }
    };
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
            seccomp: Some(seccomp),
        },
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywardd: {e}");
            tracing::error!(code = e.code(), "{e}");
            match e {
                DaemonError::Config(_)
                | DaemonError::MissingKey { .. }
                | DaemonError::Refused(_)
                | DaemonError::Descriptors(_) => ExitCode::from(2),
                DaemonError::History(_) => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}
