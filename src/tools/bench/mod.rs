//! `keyward bench`: keyward's own cost measured against the HSM's, in one
//! run on one machine.
//!
//! The benchmark builds a scratch instance in a temporary directory (a
//! SoftHSM2 token, a key, a policy with limits far above what the run can
//! spend, and an empty ledger), so no real instance's budgets or ledger are
//! touched. It then measures, one phase after the other:
//!
//! 1. the raw signing rate of the HSM backend, signing transfer-sized
//!    messages directly through the backend on one thread per core, and the
//!    CPU each signature takes;
//! 2. end-to-end signed intents per second through a real `keywardd` over
//!    its agent socket, with N concurrent clients (closed loop), with
//!    latency percentiles and keywardd's CPU time from `/proc`;
//! 3. the same at 80 % of the rate measured in 2, open loop (requests are
//!    sent on a fixed schedule and latency counts from the scheduled time,
//!    so a slow answer cannot hide the requests queued behind it);
//! 4. ledger entries per second, appended by concurrent writers to a
//!    scratch ledger with group commit.

mod cpu;
mod instance;
mod phases;
mod report;

pub use report::BenchReport;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyward_client::Client;

use crate::config::Config;
use crate::hsm::HsmError;
use crate::types::KeyName;

use cpu::{own_cpu, process_cpu};
use instance::{Daemon, Scratch, bench_policy, prefill};
use phases::{closed_loop, ledger_phase, open_loop, raw_phase};
use report::percentile_ms;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Concurrent agent clients in the end-to-end phases.
    pub clients: usize,
    /// Threads signing directly in the raw HSM phase (one per core).
    pub threads: usize,
    /// Length of each end-to-end phase; the raw and ledger phases take half.
    pub duration: Duration,
    /// The `keywardd` binary to start.
    pub keywardd: PathBuf,
    /// PKCS#11 module of SoftHSM2 (default: the Debian location).
    pub module: Option<PathBuf>,
    /// Ledger entries (with their intent and spend rows, older than the
    /// 24-hour window) written before the run, to see how cost grows with
    /// the size of the ledger.
    pub prefill: u64,
    /// Show progress on stderr.
    pub progress: bool,
}

impl BenchOptions {
    /// Defaults for this machine: one signing thread per core, two clients
    /// per core, 10 s phases.
    pub fn for_this_machine(keywardd: PathBuf) -> BenchOptions {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        BenchOptions {
            clients: 2 * cores,
            threads: cores,
            duration: Duration::from_secs(10),
            keywardd,
            module: None,
            prefill: 0,
            progress: false,
        }
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the scratch instance failed.
    #[error("benchmark set-up failed: {0}")]
    Setup(String),
    /// keywardd did not start or misbehaved.
    #[error("keywardd: {0}")]
    Daemon(String),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}

impl BenchError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            BenchError::Setup(_) => "bench_setup_failed",
            BenchError::Daemon(_) => "bench_daemon_failed",
            BenchError::Hsm(e) => e.code(),
        }
    }
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

fn progress(on: bool, msg: &str) {
    if on {
        eprintln!("keyward bench: {msg}");
    }
}

/// the scratch token's configuration path is put into the environment for
/// the PKCS#11 module.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let scratch = Scratch::new()?;
    let inst_dir = scratch.0.join("inst");
    let module = match &opts.module {
        Some(m) => m.clone(),
        None => crate::tools::dev::find_softhsm_module().map_err(setup)?,
    };
    // SAFETY: `run` is documented to be called from `main` before any other
    // thread exists (`keyward bench` does), and no module is loaded yet.
    #[allow(unsafe_code)]
    unsafe {
        crate::process::set_env_single_threaded(
            "SOFTHSM2_CONF",
            &crate::hsm::softhsm::conf_path(&inst_dir),
        )
    };
    progress(
        opts.progress,
        &format!("creating a scratch instance in {}", inst_dir.display()),
    );
    let uid = nix::unistd::getuid().as_raw();
    let inst = crate::tools::dev::init_dev(&inst_dir, &module, uid).map_err(setup)?;
    std::fs::write(inst_dir.join("policy.toml"), bench_policy(uid)).map_err(setup)?;
    // Every bench client connects as this one uid: let it use the whole
    // socket, so the open loop measures signing, not the per-uid limit.
    let text = std::fs::read_to_string(&inst.config).map_err(setup)?;
    let text = text.replacen("\n[hsm]", "max_connections_per_uid = 256\n\n[hsm]", 1);
    std::fs::write(&inst.config, text).map_err(setup)?;
    let cfg = Config::load(&inst.config).map_err(setup)?;
    if opts.prefill > 0 {
        progress(
            opts.progress,
            &format!("prefilling the ledger with {} entries", opts.prefill),
        );
        prefill(&cfg, opts.prefill, opts.progress)?;
    }

    // (a) Raw HSM signing, before keywardd runs, so nothing competes.
    let raw_time = opts.duration / 2;
    progress(
        opts.progress,
        &format!(
            "(a) raw HSM signing on {} threads for {:?}",
            opts.threads, raw_time
        ),
    );
    let hsm = crate::daemon::open_hsm(&cfg)?;
    let key = hsm.find_ed25519(&KeyName::new("hot").map_err(setup)?)?;
    let (raw_per_s, raw_cpu) = raw_phase(&hsm, &key, opts.threads.max(1), raw_time)?;
    drop(hsm);

    progress(opts.progress, "starting keywardd");
    let mut daemon = Daemon::start(
        &opts.keywardd,
        &inst.config,
        scratch.0.join("keywardd.log"),
        &cfg.daemon.agent_socket,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup)?;
    let client = Client::new(&cfg.daemon.agent_socket).with_timeout(Duration::from_secs(30));

    // (b) Maximum rate, closed loop, after a warm-up.
    progress(
        opts.progress,
        &format!(
            "(b) end to end, {} clients, {:?}",
            opts.clients, opts.duration
        ),
    );
    let warm = rt.block_on(closed_loop(
        &client,
        opts.clients,
        opts.duration / 5,
        "warm",
    ));
    let commits0 = rt
        .block_on(client.health())
        .map(|h| h.ledger.commits)
        .unwrap_or(0);
    let d_cpu0 = process_cpu(daemon.pid())?;
    let c_cpu0 = own_cpu();
    let max = rt.block_on(closed_loop(&client, opts.clients, opts.duration, "max"));
    let d_cpu = process_cpu(daemon.pid())?.saturating_sub(d_cpu0);
    let c_cpu = own_cpu().saturating_sub(c_cpu0);
    let commits = rt
        .block_on(client.health())
        .map(|h| h.ledger.commits.saturating_sub(commits0))
        .unwrap_or(0);
    let e2e_per_s = max.signed as f64 / max.elapsed.as_secs_f64();

    // (c) 80 % of that, open loop.
    let rate80 = 0.8 * e2e_per_s;
    progress(
        opts.progress,
        &format!(
            "(c) end to end at {rate80:.0}/s (80 %), {:?}",
            opts.duration
        ),
    );
    let at80 = rt.block_on(open_loop(&client, rate80, opts.duration));
    daemon.stop()?;

    // (d) The ledger alone.
    let ledger_time = opts.duration / 2;
    progress(
        opts.progress,
        &format!(
            "(d) ledger appends, {} writers, {ledger_time:?}",
            opts.clients * 4
        ),
    );
    let (ledger_per_s, ledger_batch) = rt.block_on(ledger_phase(
        &scratch.0.join("bench-ledger.sqlite3"),
        opts.clients * 4,
        ledger_time,
    ))?;

    let verify_start = Instant::now();
    // What keywardd does at every start: the whole history against the
    // audit key.
    let trusted = crate::ledger::TrustedKey::from_file(&cfg.audit_vkey_path()).map_err(setup)?;
    let verified = crate::ledger::verify_history(
        &cfg.ledger_path(),
        &trusted,
        &crate::ledger::Expectations::default(),
    )
    .map_err(setup)?
    .chain;
    let verify_time = verify_start.elapsed();

    let per_intent = |cpu: Duration| {
        if max.signed == 0 {
            0.0
        } else {
            cpu.as_secs_f64() * 1e6 / max.signed as f64
        }
    };
    let raw_cpu_us = raw_cpu.as_secs_f64() * 1e6;
    let keywardd_us = per_intent(d_cpu);
    Ok(BenchReport {
        backend: format!("pkcs11 ({})", module.display()),
        clients: opts.clients,
        threads: opts.threads,
        cores,
        duration_s: opts.duration.as_secs_f64(),
        raw_hsm_per_s: raw_per_s,
        raw_hsm_cpu_us_per_sign: raw_cpu_us,
        end_to_end_per_s: e2e_per_s,
        ratio: if raw_per_s > 0.0 {
            e2e_per_s / raw_per_s
        } else {
            0.0
        },
        p50_ms: percentile_ms(&max.latencies_us, 0.50),
        p99_ms: percentile_ms(&max.latencies_us, 0.99),
        p999_ms: percentile_ms(&max.latencies_us, 0.999),
        rate_at_80pct_per_s: rate80,
        achieved_at_80pct_per_s: at80.signed as f64 / at80.elapsed.as_secs_f64(),
        p50_ms_at_80pct: percentile_ms(&at80.latencies_us, 0.50),
        p99_ms_at_80pct: percentile_ms(&at80.latencies_us, 0.99),
        p999_ms_at_80pct: percentile_ms(&at80.latencies_us, 0.999),
        ledger_entries_per_s: ledger_per_s,
        ledger_largest_batch: ledger_batch,
        keywardd_cpu_us_per_intent: keywardd_us,
        keyward_cpu_us_per_intent: keywardd_us - raw_cpu_us,
        client_cpu_us_per_intent: per_intent(c_cpu),
        commits_during_max: commits,
        errors: warm.errors + max.errors + at80.errors,
        first_error: warm
            .first_error
            .clone()
            .or_else(|| max.first_error.clone())
            .or_else(|| at80.first_error.clone()),
        prefilled_entries: opts.prefill,
        ledger_entries: verified.entries,
        audit_verify_entries_per_s: verified.entries as f64 / verify_time.as_secs_f64().max(1e-9),
        scratch_dir: scratch.0.display().to_string(),
    })
}
