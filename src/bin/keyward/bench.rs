//! `keyward bench`: keyward's cost measured against the HSM's on a scratch
//! instance ([`keyward::tools::bench`]).

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;

use crate::Failure;

/// `keyward bench`'s options.
#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Concurrent agent clients (default: 2 × cores).
    #[arg(long)]
    clients: Option<usize>,
    /// Signing threads in the raw HSM phase (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds of each end-to-end phase (the raw and ledger phases take half).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// The keywardd binary (default: next to this program).
    #[arg(long)]
    keywardd: Option<PathBuf>,
    /// PKCS#11 module of SoftHSM2 (default: the Debian location).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Ledger entries to write before the run (to measure how cost grows
    /// with the ledger's size).
    #[arg(long, default_value_t = 0)]
    prefill: u64,
}

/// Runs the benchmark and prints its report.
pub(crate) fn run(args: BenchArgs) -> Result<(), Failure> {
    let BenchArgs {
        json,
        clients,
        threads,
        duration,
        keywardd,
        module,
        prefill,
    } = args;
    if !(0.5..=3600.0).contains(&duration) {
        return Err(Failure(
            2,
            anyhow!("--duration must be between 0.5 and 3600 seconds"),
        ));
    }
    let keywardd = match keywardd {
        Some(k) => k,
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name("keywardd"),
    };
    let mut opts = keyward::tools::bench::BenchOptions::for_this_machine(keywardd);
    opts.clients = clients.unwrap_or(opts.clients).max(1);
    opts.threads = threads.unwrap_or(opts.threads).max(1);
    opts.duration = std::time::Duration::from_secs_f64(duration);
    opts.module = module;
    opts.prefill = prefill;
    opts.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = keyward::tools::bench::run(&opts)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.errors > 0 {
        return Err(Failure(
            1,
            anyhow!(
                "{} requests were not signed (the first got: {})",
                report.errors,
                report.first_error.as_deref().unwrap_or("nothing recorded")
            ),
        ));
    }
    Ok(())
}
