//! The scratch instance the benchmark runs on: a temporary directory, its
//! policy, an optional prefilled ledger, and a keywardd child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::ledger::events;
use crate::types::Lamports;

use super::{BenchError, progress, setup};

/// A directory removed when dropped.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn new() -> Result<Scratch, BenchError> {
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
pub(super) struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub(super) fn start(
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn stop(&mut self) -> Result<(), BenchError> {
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

pub(super) fn bench_policy(uid: u32) -> String {
    // Limits far above what any run can spend (each intent moves 1000
    // lamports plus the fee), so the benchmark measures the signing path,
    // not denials.
    format!(
        "# keyward bench scratch policy\n\
         [agents.bench]\nuid = {uid}\nkeys = [\"hot\"]\n\n\
         [agents.bench.limits.SOL]\nper_tx = \"1\"\nper_day = \"1000000000\"\n"
    )
}

/// Writes `n` old entries, each with its intent record and a spent
/// reservation from two days ago, as a long-running signer would have.
pub(super) fn prefill(cfg: &Config, n: u64, progress_on: bool) -> Result<(), BenchError> {
    let ledger = crate::daemon::open_ledger(cfg).map_err(setup)?;
    // A history keywardd accepts: a start, a checkpoint covering it signed
    // by the audit key, then the old entries, then a stop.
    {
        let hsm = crate::daemon::open_hsm(cfg).map_err(setup)?;
        let est = crate::service::history::establish(&*hsm, &ledger, cfg, None).map_err(setup)?;
        let started = events::DaemonStarted {
            version: format!("{} (bench prefill)", env!("CARGO_PKG_VERSION")),
            pid: std::process::id(),
            hsm_backend: hsm.backend().to_owned(),
            token_label: cfg.hsm.device_label().to_owned(),
            keys: Vec::new(),
        };
        ledger
            .write_blocking(move |t| t.record(None, None, &started).map(|_| ()))
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
    // A signature entry as keywardd writes it (about the same size).
    let created = events::SignatureCreated {
        signature: bs58::encode([7u8; 64]).into_string(),
        key: "bench".to_owned(),
        public_key: bs58::encode([8u8; 32]).into_string(),
        message_sha256: "ab".repeat(32),
        sol_spend_lamports: 1000,
    };
    let chunk = 5_000u64;
    let mut done = 0u64;
    while done < n {
        let count = chunk.min(n - done);
        let start = done;
        let created = created.clone();
        ledger
            .write_blocking(move |t| {
                let old = t.now_ms() - 2 * crate::policy::counters::DAY_MS;
                for i in start..start + count {
                    let id = format!("prefill-{i}");
                    let entry = t.record(Some(&id), Some("bench"), &created)?;
                    crate::intents::insert(
                        t.conn(),
                        &crate::intents::NewIntent {
                            agent: "bench",
                            intent_id: &id,
                            content_hash: &[0; 32],
                            status: crate::intents::IntentStatus::Signed,
                            reply: Some(b"{}"),
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
            t.record(
                None,
                None,
                &events::DaemonStopped {
                    pid: std::process::id(),
                },
            )
            .map(|_| ())
        })
        .map_err(setup)?;
    ledger.close_blocking().map_err(setup)
}
