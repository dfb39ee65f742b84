//! The systemd watchdog: `WATCHDOG=1` only while the ledger writer and
//! the HSM answer.
//!
//! When systemd passes `WATCHDOG_USEC` (the unit's `WatchdogSec=`), a task
//! checks both every half of that interval and pings only when both
//! passed; a check that fails stops the pings (and is logged with its
//! reason), so systemd restarts a daemon whose writer or HSM is wedged.
//!
//! What "responsive" means, with `deadline` a quarter of `WatchdogSec`
//! (so a check plus its ping always fit in the interval):
//!
//! - **The ledger writer** answers a no-op round trip ([`Ledger::ping`])
//!   within `deadline`. The ping waits behind the writes queued before it,
//!   so a writer that is merely busy answers (batches commit in
//!   milliseconds); one stuck in a job, a commit or a lock does not. The
//!   ping writes nothing. A writer that answers with errors (the audit
//!   breaker open) is responsive: signing is already refused there, and a
//!   restart would not mend a disk.
//! - **The HSM** answers a health probe ([`HsmExecutor::health`], a session
//!   query and a look-up of the keys in use) within `deadline`, *or*, when
//!   the probe waits behind a backlog of signatures, the executor's workers
//!   finish at least one call while it waits ([`HsmExecutor::calls_finished`]):
//!   a long queue that moves is load, not a wedge. Only when every worker
//!   stays inside one call for the whole `deadline` is the HSM
//!   unresponsive. A probe that times out is never run later (the executor
//!   drops calls whose caller gave up), so probes do not pile up. An HSM
//!   that answers with an error (the device is gone) is responsive for the
//!   watchdog: requests fail closed with `hsm_unavailable`, and the
//!   backend re-opens the module on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::hsm::{HsmError, HsmExecutor};
use crate::ledger::{Ledger, LedgerError};

/// What a check found unresponsive.
#[derive(Debug, thiserror::Error)]
pub enum Unresponsive {
    /// The ledger writer did not answer the round trip in time.
    #[error("the ledger writer did not answer a no-op round trip within {deadline_ms} ms")]
    LedgerWriter {
        /// The deadline.
        deadline_ms: u64,
    },
    /// The ledger writer thread is gone.
    #[error("the ledger writer has stopped")]
    LedgerClosed,
    /// No HSM call finished and the probe was not answered in time.
    #[error(
        "the HSM answered no health probe and finished no call within {deadline_ms} ms (every worker is inside one call)"
    )]
    Hsm {
        /// The deadline.
        deadline_ms: u64,
    },
    /// The HSM executor's workers are gone.
    #[error("the HSM executor has stopped")]
    HsmStopped,
}

impl Unresponsive {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Unresponsive::LedgerWriter { .. } => "watchdog_ledger_writer",
            Unresponsive::LedgerClosed => "watchdog_ledger_closed",
            Unresponsive::Hsm { .. } => "watchdog_hsm",
            Unresponsive::HsmStopped => "watchdog_hsm_stopped",
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The ping period and the check deadline for systemd's `WATCHDOG_USEC`:
/// half and a quarter of it.
pub fn timing(watchdog: Duration) -> (Duration, Duration) {
    (watchdog / 2, watchdog / 4)
}

/// Whether the ledger writer answers within `deadline`.
pub async fn ledger_responsive(ledger: &Ledger, deadline: Duration) -> Result<(), Unresponsive> {
    match tokio::time::timeout(deadline, ledger.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(LedgerError::Closed)) => Err(Unresponsive::LedgerClosed),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "watchdog: the ledger writer answered with an error");
            Ok(())
        }
        Err(_) => Err(Unresponsive::LedgerWriter {
            deadline_ms: millis(deadline),
        }),
    }
}

/// Whether the HSM answers within `deadline` (see the module docs).
pub async fn hsm_responsive(hsm: &HsmExecutor, deadline: Duration) -> Result<(), Unresponsive> {
    let started = Instant::now();
    let finished_before = hsm.calls_finished();
    match tokio::time::timeout(deadline, hsm.health()).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(HsmError::Stopped { .. })) => return Err(Unresponsive::HsmStopped),
        Ok(Err(HsmError::Busy { .. } | HsmError::Timeout { .. })) | Err(_) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "watchdog: the HSM answered its health probe with an error");
            return Ok(());
        }
    }
    // The probe waited behind other calls: progress counts.
    loop {
        if hsm.calls_finished() != finished_before {
            return Ok(());
        }
        if started.elapsed() >= deadline {
            return Err(Unresponsive::Hsm {
                deadline_ms: millis(deadline),
            });
        }
        tokio::time::sleep(Duration::from_millis(10).min(deadline)).await;
    }
}

/// Both checks, at once.
pub async fn check(
    ledger: &Ledger,
    hsm: &HsmExecutor,
    deadline: Duration,
) -> Result<(), Vec<Unresponsive>> {
    let (l, h) = tokio::join!(
        ledger_responsive(ledger, deadline),
        hsm_responsive(hsm, deadline)
    );
    let failed: Vec<Unresponsive> = [l.err(), h.err()].into_iter().flatten().collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

/// Pings systemd every `period` after [`check`] passed (with `deadline`),
/// until `stop`. Logs when the pings stop and when they resume.
pub async fn run(
    ledger: Ledger,
    hsm: Arc<HsmExecutor>,
    period: Duration,
    deadline: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(
        period_ms = millis(period),
        deadline_ms = millis(deadline),
        "systemd watchdog: pinging while the ledger writer and the HSM answer"
    );
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        match check(&ledger, &hsm, deadline).await {
            Ok(()) => {
                if failing {
                    tracing::warn!(
                        "systemd watchdog: the ledger writer and the HSM answer again; pings resume"
                    );
                    failing = false;
                }
                if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "systemd watchdog: cannot notify");
                }
            }
            Err(why) => {
                failing = true;
                for w in &why {
                    tracing::error!(
                        code = w.code(),
                        "systemd watchdog: not pinging: {w}; systemd restarts keywardd when WatchdogSec= passes without a ping"
                    );
                }
            }
        }
    }
}

#[cfg(all(test, feature = "mock-hsm"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hsm::mock::MockHsm;
    use crate::hsm::{ExecutorSettings, Hsm, HsmOp};
    use crate::types::KeyName;

    fn executor(workers: usize) -> (Arc<MockHsm>, Arc<HsmExecutor>, crate::hsm::HsmKey) {
        let mock = Arc::new(MockHsm::new().with_workers(workers));
        let key = mock
            .generate_ed25519(&KeyName::new("hot").unwrap())
            .unwrap();
        let exec = HsmExecutor::start(
            Arc::clone(&mock) as Arc<dyn Hsm>,
            ExecutorSettings {
                queue_depth: 64,
                queue_wait: Duration::from_millis(50),
                call_timeout: Duration::from_secs(30),
            },
        )
        .unwrap();
        (mock, Arc::new(exec), key)
    }

    fn sign(exec: &Arc<HsmExecutor>, key: &crate::hsm::HsmKey) -> tokio::task::JoinHandle<()> {
        let (exec, key) = (Arc::clone(exec), key.clone());
        tokio::spawn(async move {
            let _ = exec.sign_verified(&key, b"m").await;
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_hsm_whose_every_worker_is_stuck_is_unresponsive() {
        let (mock, exec, key) = executor(1);
        assert!(
            hsm_responsive(&exec, Duration::from_millis(200))
                .await
                .is_ok()
        );
        mock.close_gate(HsmOp::Sign);
        let held = sign(&exec, &key);
        while mock.held(HsmOp::Sign) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let e = hsm_responsive(&exec, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "watchdog_hsm");
        mock.open_gate(HsmOp::Sign);
        held.await.unwrap();
        assert!(hsm_responsive(&exec, Duration::from_secs(5)).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_of_signatures_that_moves_is_responsive() {
        let (mock, exec, key) = executor(1);
        // Each signature takes 20 ms; 40 of them queue ahead of the probe,
        // which cannot be answered within its deadline: the calls that
        // finish meanwhile show the HSM works.
        mock.set_delay(HsmOp::Sign, Duration::from_millis(20));
        let backlog: Vec<_> = (0..40).map(|_| sign(&exec, &key)).collect();
        while exec.stats().queued < 30 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = mock.calls(HsmOp::Health);
        assert!(
            hsm_responsive(&exec, Duration::from_millis(200))
                .await
                .is_ok()
        );
        for b in backlog {
            b.await.unwrap();
        }
        // The probe that gave up was never run.
        assert_eq!(mock.calls(HsmOp::Health), before);
    }
}
