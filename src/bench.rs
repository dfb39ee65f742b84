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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyward_client::wire::{Action, IntentRequest};
use keyward_client::{Client, IntentOutcome};
use serde::Serialize;

use crate::config::Config;
use crate::hsm::{Hsm, HsmError, HsmKey};
use crate::ledger::{EventType, Ledger, LedgerOptions};
use crate::solana::build_sol_transfer;
use crate::types::{KeyName, Lamports, PublicKey};

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

/// Figures of one run. Rates are per second, latencies in milliseconds,
/// CPU in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// HSM backend (`pkcs11`) and module.
    pub backend: String,
    /// Concurrent clients in the end-to-end phase.
    pub clients: usize,
    /// Signing threads in the raw phase.
    pub threads: usize,
    /// Cores of this machine.
    pub cores: usize,
    /// Length of each end-to-end phase in seconds.
    pub duration_s: f64,
    /// (a) Signatures per second directly through the backend.
    pub raw_hsm_per_s: f64,
    /// CPU time of this process per raw signature.
    pub raw_hsm_cpu_us_per_sign: f64,
    /// (b) Signed intents per second through keywardd.
    pub end_to_end_per_s: f64,
    /// `end_to_end_per_s / raw_hsm_per_s`.
    pub ratio: f64,
    /// Latency percentiles at the maximum rate.
    pub p50_ms: f64,
    /// 99th percentile at the maximum rate.
    pub p99_ms: f64,
    /// 99.9th percentile at the maximum rate.
    pub p999_ms: f64,
    /// (c) The offered rate of the 80 % phase.
    pub rate_at_80pct_per_s: f64,
    /// What was answered per second at that rate.
    pub achieved_at_80pct_per_s: f64,
    /// Median latency at 80 % of the maximum rate.
    pub p50_ms_at_80pct: f64,
    /// 99th percentile at 80 % of the maximum rate.
    pub p99_ms_at_80pct: f64,
    /// 99.9th percentile at 80 % of the maximum rate.
    pub p999_ms_at_80pct: f64,
    /// (d) Ledger entries appended per second by concurrent writers.
    pub ledger_entries_per_s: f64,
    /// Most jobs one ledger commit held in the ledger phase.
    pub ledger_largest_batch: u64,
    /// keywardd's CPU per signed intent, everything included (on SoftHSM
    /// that includes the signature, which runs inside keywardd).
    pub keywardd_cpu_us_per_intent: f64,
    /// keywardd's CPU per signed intent minus the CPU one raw signature
    /// took: keyward's own work (HTTP, decoding, policy, verification,
    /// ledger).
    pub keyward_cpu_us_per_intent: f64,
    /// The load generator's CPU per intent (the client side).
    pub client_cpu_us_per_intent: f64,
    /// Durable ledger commits keywardd made during the maximum-rate phase.
    pub commits_during_max: u64,
    /// Requests that did not end in a signature (must be 0).
    pub errors: u64,
    /// Entries in the ledger before the run.
    pub prefilled_entries: u64,
    /// Entries in the ledger after the run.
    pub ledger_entries: u64,
    /// `keyward audit verify` speed over the whole ledger after the run.
    pub audit_verify_entries_per_s: f64,
    /// Where the scratch instance was (removed after the run).
    pub scratch_dir: String,
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

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, BenchError> {
        use std::os::unix::fs::DirBuilderExt;
        let name = format!(
            "keyward-bench-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let dir = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A keywardd child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(
        keywardd: &Path,
        config: &Path,
        log: PathBuf,
        socket: &Path,
    ) -> Result<Daemon, BenchError> {
        let log_file = std::fs::File::create(&log).map_err(setup)?;
        let child = Command::new(keywardd)
            .arg("--config")
            .arg(config)
            .env("KEYWARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| BenchError::Daemon(format!("cannot start {}: {e}", keywardd.display())))?;
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(BenchError::Daemon(format!(
                    "exited during start-up ({status}): {}",
                    d.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Daemon(format!(
                    "did not start in 30 s: {}",
                    d.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) -> Result<(), BenchError> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(BenchError::Daemon(format!(
                        "stopped with {status}: {}",
                        self.log_text()
                    )));
                }
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    return Err(BenchError::Daemon("did not stop on SIGTERM".into()));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time (user + system) of a process from `/proc/PID/stat`.
fn process_cpu(pid: u32) -> Result<Duration, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(setup)?;
    // Fields after the command name (which may contain spaces) start with
    // the state (field 3); utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(setup(format!("cannot parse /proc/{pid}/stat")));
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(100);
    Ok(Duration::from_micros((utime + stime) * 1_000_000 / hz))
}

/// CPU time of this process (all threads).
fn own_cpu() -> Duration {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// Percentile `p` (0..1) of sorted latencies in microseconds, in ms.
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

fn progress(on: bool, msg: &str) {
    if on {
        eprintln!("keyward bench: {msg}");
    }
}

fn bench_policy(uid: u32) -> String {
    // Limits far above what any run can spend (each intent moves 1000
    // lamports plus the fee), so the benchmark measures the signing path,
    // not denials.
    format!(
        "# keyward bench scratch policy\n\
         [agents.bench]\nuid = {uid}\nkeys = [\"hot\"]\n\n\
         [agents.bench.limits.SOL]\nper_tx = \"1\"\nper_day = \"1000000000\"\n"
    )
}

/// Signs transfer-sized messages directly through the backend on
/// `threads` threads for `duration`; returns (signatures per second, CPU
/// per signature).
fn raw_phase(
    hsm: &Arc<dyn Hsm>,
    key: &HsmKey,
    threads: usize,
    duration: Duration,
) -> Result<(f64, Duration), BenchError> {
    let message = build_sol_transfer(
        &key.public_key,
        &PublicKey([7; 32]),
        Lamports(1000),
        [9; 32],
        None,
    )
    .map_err(setup)?;
    let run = |d: Duration| -> Result<(u64, Duration, Duration), BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let cpu0 = own_cpu();
        let t0 = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (hsm, key, message) = (Arc::clone(hsm), key.clone(), message.clone());
                let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
                std::thread::spawn(move || -> Result<(), HsmError> {
                    while !stop.load(Ordering::Relaxed) {
                        hsm.sign_ed25519(&key, &message)?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(d);
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| setup("a signing thread panicked"))??;
        }
        Ok((
            count.load(Ordering::Relaxed),
            t0.elapsed(),
            own_cpu().saturating_sub(cpu0),
        ))
    };
    run(duration / 5)?;
    let (n, elapsed, cpu) = run(duration)?;
    if n == 0 {
        return Err(setup("the HSM made no signature"));
    }
    Ok((
        n as f64 / elapsed.as_secs_f64(),
        cpu / u32::try_from(n).unwrap_or(u32::MAX),
    ))
}

struct LoadResult {
    signed: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

fn intent(id: String, blockhash: &str) -> IntentRequest {
    IntentRequest {
        intent_id: id,
        key: "hot".to_owned(),
        action: Action::Transfer {
            asset: "SOL".to_owned(),
            to: PublicKey(rand::random()).to_base58(),
            amount: "0.000001".to_owned(),
            recent_blockhash: blockhash.to_owned(),
            memo: None,
            create_recipient_account: false,
        },
    }
}

async fn submit(client: &Client, req: &IntentRequest) -> bool {
    matches!(
        client.submit_intent(req).await,
        Ok(IntentOutcome::Signed(_))
    )
}

/// Closed loop: `clients` tasks each submit one intent after the other.
async fn closed_loop(client: &Client, clients: usize, duration: Duration, tag: &str) -> LoadResult {
    let blockhash = PublicKey(rand::random()).to_base58();
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let client = client.clone();
            let (tag, blockhash) = (tag.to_owned(), blockhash.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let (mut signed, mut errors) = (0u64, 0u64);
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let req = intent(format!("bench-{tag}-{c}-{i}"), &blockhash);
                    i += 1;
                    let start = Instant::now();
                    if submit(&client, &req).await {
                        signed += 1;
                        lat.push(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
                    } else {
                        errors += 1;
                    }
                }
                (signed, errors, lat)
            })
        })
        .collect();
    let mut out = LoadResult {
        signed: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        if let Ok((s, e, lat)) = t.await {
            out.signed += s;
            out.errors += e;
            out.latencies_us.extend(lat);
        } else {
            out.errors += 1;
        }
    }
    out.elapsed = t0.elapsed();
    out.latencies_us.sort_unstable();
    out
}

/// Open loop: one request every 1/rate seconds, whatever the answers do;
/// latency counts from when the request was due.
async fn open_loop(client: &Client, rate: f64, duration: Duration) -> LoadResult {
    let blockhash = PublicKey(rand::random()).to_base58();
    let period = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let total = (duration.as_secs_f64() * rate).max(1.0) as u64;
    let limit = Arc::new(tokio::sync::Semaphore::new(4096));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for i in 0..total {
        let due = t0 + period * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let req = intent(format!("bench-open-{i}"), &blockhash);
        tasks.push(tokio::spawn(async move {
            let ok = submit(&client, &req).await;
            drop(permit);
            (
                ok,
                u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX),
            )
        }));
    }
    let mut out = LoadResult {
        signed: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::with_capacity(tasks.len()),
    };
    for t in tasks {
        match t.await {
            Ok((true, lat)) => {
                out.signed += 1;
                out.latencies_us.push(lat);
            }
            _ => out.errors += 1,
        }
    }
    out.elapsed = t0.elapsed();
    out.latencies_us.sort_unstable();
    out
}

/// Concurrent writers appending entries to a scratch ledger.
async fn ledger_phase(
    path: &Path,
    writers: usize,
    duration: Duration,
) -> Result<(f64, u64), BenchError> {
    let ledger = Ledger::open(path, LedgerOptions::default()).map_err(setup)?;
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let id = format!("bench-ledger-{w}-{n}");
                    let payload = br#"{"benchmark":true}"#;
                    let ok = ledger
                        .write(move |t| {
                            t.append(EventType::IntentReceived, Some(&id), Some("bench"), payload)
                        })
                        .await
                        .is_ok();
                    if !ok {
                        break;
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut entries = 0;
    for t in tasks {
        entries += t.await.unwrap_or(0);
    }
    let elapsed = t0.elapsed();
    let largest = ledger.health().largest_batch;
    ledger.close().await.map_err(setup)?;
    Ok((entries as f64 / elapsed.as_secs_f64(), largest))
}

/// Writes `n` old entries, each with its intent record and a spent
/// reservation from two days ago, as a long-running signer would have.
fn prefill(cfg: &Config, n: u64, progress_on: bool) -> Result<(), BenchError> {
    let ledger = crate::daemon::open_ledger(cfg).map_err(setup)?;
    // A history keywardd accepts: a start, a checkpoint covering it signed
    // by the audit key, then the old entries, then a stop.
    {
        let hsm = crate::daemon::open_hsm(cfg).map_err(setup)?;
        let est = crate::service::history::establish(&*hsm, &ledger, cfg, None).map_err(setup)?;
        ledger
            .write_blocking(|t| {
                t.append(
                    EventType::DaemonStarted,
                    None,
                    None,
                    b"{\"bench\":\"prefill\"}",
                )
                .map(|_| ())
            })
            .map_err(setup)?;
        let hsm = crate::hsm::HsmExecutor::start(hsm, Default::default()).map_err(setup)?;
        let checkpointer = crate::service::checkpoints::Checkpointer::new(
            std::sync::Arc::new(hsm),
            ledger.clone(),
            est.key,
            "keyward/bench".into(),
            est.walker,
            std::sync::Arc::default(),
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(setup)?
            .block_on(checkpointer.maybe(1, Duration::from_secs(1), true))
            .map_err(setup)?;
    }
    let payload = vec![b'x'; 400];
    let chunk = 5_000u64;
    let mut done = 0u64;
    while done < n {
        let count = chunk.min(n - done);
        let start = done;
        let payload = payload.clone();
        ledger
            .write_blocking(move |t| {
                let old = t.now_ms() - 2 * crate::policy::counters::DAY_MS;
                for i in start..start + count {
                    let id = format!("prefill-{i}");
                    let entry = t.append(
                        EventType::SignatureCreated,
                        Some(&id),
                        Some("bench"),
                        &payload,
                    )?;
                    crate::intents::insert(
                        t.conn(),
                        &crate::intents::NewIntent {
                            agent: "bench",
                            intent_id: &id,
                            content_hash: &[0; 32],
                            status: "signed",
                            reply: Some((200, b"{}")),
                            received_seq: entry.seq.0,
                            now_ms: old,
                        },
                    )?;
                    crate::policy::counters::reserve(
                        t.conn(),
                        "bench",
                        "SOL",
                        &id,
                        Lamports(1000),
                        old,
                    )?;
                    crate::policy::counters::confirm(t.conn(), "bench", &id)?;
                }
                Ok(())
            })
            .map_err(setup)?;
        done += count;
        if progress_on && done.is_multiple_of(100_000) {
            progress(true, &format!("prefilled {done} of {n} entries"));
        }
    }
    ledger
        .write_blocking(|t| {
            t.append(EventType::DaemonStopped, None, None, b"{}")
                .map(|_| ())
        })
        .map_err(setup)?;
    ledger.close_blocking().map_err(setup)
}

/// Runs the benchmark. Call from `main` before any other thread exists:
/// the scratch token's configuration path is put into the environment for
/// the PKCS#11 module.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let scratch = Scratch::new()?;
    let inst_dir = scratch.0.join("inst");
    let module = match &opts.module {
        Some(m) => m.clone(),
        None => crate::dev::find_softhsm_module().map_err(setup)?,
    };
    crate::process::set_env_single_threaded(
        "SOFTHSM2_CONF",
        &crate::hsm::softhsm::conf_path(&inst_dir),
    );
    progress(
        opts.progress,
        &format!("creating a scratch instance in {}", inst_dir.display()),
    );
    let uid = nix::unistd::getuid().as_raw();
    let inst = crate::dev::init_dev(&inst_dir, &module, uid).map_err(setup)?;
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
        prefilled_entries: opts.prefill,
        ledger_entries: verified.entries,
        audit_verify_entries_per_s: verified.entries as f64 / verify_time.as_secs_f64().max(1e-9),
        scratch_dir: scratch.0.display().to_string(),
    })
}

impl BenchReport {
    /// The human-readable table, with the targets.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |what: &str, value: String, target: &str| {
            t.push_str(&format!("{what:<44} {value:>14}   {target}\n"));
        };
        row("backend", self.backend.clone(), "");
        row(
            "cores / signing threads / clients",
            format!("{} / {} / {}", self.cores, self.threads, self.clients),
            "",
        );
        row(
            "(a) raw HSM signatures per s",
            format!("{:.0}", self.raw_hsm_per_s),
            "",
        );
        row(
            "    CPU per raw signature (µs)",
            format!("{:.0}", self.raw_hsm_cpu_us_per_sign),
            "",
        );
        row(
            "(b) end-to-end signed intents per s",
            format!("{:.0}", self.end_to_end_per_s),
            "",
        );
        row(
            "    ratio end-to-end / raw",
            format!("{:.2}", self.ratio),
            "target >= 0.6",
        );
        row(
            "    latency p50 / p99 / p99.9 (ms)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                self.p50_ms, self.p99_ms, self.p999_ms
            ),
            "",
        );
        row(
            "(c) offered at 80 % (per s)",
            format!("{:.0}", self.rate_at_80pct_per_s),
            "",
        );
        row(
            "    answered per s",
            format!("{:.0}", self.achieved_at_80pct_per_s),
            "",
        );
        row(
            "    latency p50 / p99 / p99.9 (ms)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                self.p50_ms_at_80pct, self.p99_ms_at_80pct, self.p999_ms_at_80pct
            ),
            "target p99 <= 15",
        );
        row(
            "(d) ledger entries per s",
            format!("{:.0}", self.ledger_entries_per_s),
            "",
        );
        row(
            "    largest commit (entries)",
            format!("{}", self.ledger_largest_batch),
            "",
        );
        row(
            "keywardd CPU per intent, total (µs)",
            format!("{:.0}", self.keywardd_cpu_us_per_intent),
            "",
        );
        row(
            "keyward CPU per intent, w/o signature (µs)",
            format!("{:.0}", self.keyward_cpu_us_per_intent),
            "target <= 100",
        );
        row(
            "client CPU per intent (µs)",
            format!("{:.0}", self.client_cpu_us_per_intent),
            "",
        );
        row(
            "ledger commits in (b)",
            format!("{}", self.commits_during_max),
            "",
        );
        row(
            "ledger entries before / after the run",
            format!("{} / {}", self.prefilled_entries, self.ledger_entries),
            "",
        );
        row(
            "audit verify, entries per s",
            format!("{:.0}", self.audit_verify_entries_per_s),
            "target >= 100000",
        );
        row("errors", format!("{}", self.errors), "must be 0");
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=1000).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 500.0);
        assert_eq!(percentile_ms(&v, 0.99), 990.0);
        assert_eq!(percentile_ms(&v, 0.999), 999.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        assert_eq!(percentile_ms(&[7000], 0.999), 7.0);
    }

    #[test]
    fn own_process_cpu_is_readable_from_proc() {
        let t0 = process_cpu(std::process::id()).expect("/proc/self/stat parses");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert!(x != 1);
        let t1 = process_cpu(std::process::id()).unwrap();
        assert!(t1 > t0, "CPU time grows while spinning: {t0:?} -> {t1:?}");
    }
}
