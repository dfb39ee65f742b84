//! The one way the daemon reaches its HSM: a fixed pool of worker threads,
//! a bounded queue, a timeout per call and per-call timings.
//!
//! ```text
//! caller (async) --[a queue place: wait at most queue_wait, else hsm_busy]-->
//!   queue (queue_depth places) --> one of `workers` threads --> Hsm
//!   <--[the result, or Timeout after call_timeout (queue included)]--
//! ```
//!
//! - The number of workers is the backend's ([`Hsm::workers`]): a PKCS#11
//!   token's session count, 1 for a device that runs one command at a time.
//!   So the backend never sees more calls than it can serve, and blocking
//!   device calls never occupy the async runtime's threads.
//! - A call that finds the queue full waits up to `queue_wait` for a place,
//!   then fails with [`HsmError::Busy`] (`hsm_busy`) without touching the
//!   HSM. Work that does not need the HSM (policy decisions, denials, views)
//!   never waits here.
//! - A call not answered within `call_timeout` fails with
//!   [`HsmError::Timeout`]. If no worker has taken it yet it is never run;
//!   if one has, its result is dropped unread when it comes (a signature
//!   made after its caller gave up is never released).
//! - [`HsmExecutor::stats`] reads the counts and latencies per operation
//!   and the queue's depth, for metrics.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, TryAcquireError, oneshot};

mod blocking;
mod stats;

pub use blocking::Blocking;
use stats::{Counters, micros};
pub use stats::{ExecutorStats, OpStats};

use super::{Hsm, HsmError, HsmKey};
use crate::config::HsmConfig;
use crate::types::KeyName;

/// The operations the executor counts separately (and the mock backend
/// can slow down or fail one by one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HsmOp {
    /// [`Hsm::generate_ed25519`].
    Generate,
    /// [`Hsm::find_ed25519`].
    Find,
    /// [`Hsm::list_ed25519`].
    List,
    /// [`Hsm::sign_ed25519`] (with software verification).
    Sign,
    /// [`Hsm::random`].
    Random,
    /// [`Hsm::import_hmac_key`].
    ImportHmac,
    /// [`Hsm::hmac_sha256`].
    Hmac,
    /// [`Hsm::delete_secret`].
    DeleteSecret,
    /// [`Hsm::store_data`].
    StoreData,
    /// [`Hsm::load_data`].
    LoadData,
    /// [`Hsm::health`].
    Health,
    /// [`Hsm::destroy_ed25519`].
    DestroyKey,
}

impl HsmOp {
    /// Every operation, in a fixed order.
    pub const ALL: [HsmOp; 12] = [
        HsmOp::Generate,
        HsmOp::Find,
        HsmOp::List,
        HsmOp::Sign,
        HsmOp::Random,
        HsmOp::ImportHmac,
        HsmOp::Hmac,
        HsmOp::DeleteSecret,
        HsmOp::StoreData,
        HsmOp::LoadData,
        HsmOp::Health,
        HsmOp::DestroyKey,
    ];

    /// Stable snake_case name (for logs and metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            HsmOp::Generate => "generate",
            HsmOp::Find => "find",
            HsmOp::List => "list",
            HsmOp::Sign => "sign",
            HsmOp::Random => "random",
            HsmOp::ImportHmac => "import_hmac",
            HsmOp::Hmac => "hmac",
            HsmOp::DeleteSecret => "delete_secret",
            HsmOp::StoreData => "store_data",
            HsmOp::LoadData => "load_data",
            HsmOp::Health => "health",
            HsmOp::DestroyKey => "destroy_key",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Queue and timeout settings (`[hsm]` `queue_depth`, `queue_wait_ms`,
/// `call_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutorSettings {
    /// Calls that may wait for a worker.
    pub queue_depth: usize,
    /// How long a call waits for a place in a full queue before it fails
    /// with `hsm_busy`.
    pub queue_wait: Duration,
    /// The longest a call may take, from being asked for to its answer,
    /// time in the queue included.
    pub call_timeout: Duration,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        ExecutorSettings {
            queue_depth: crate::config::DEFAULT_HSM_QUEUE_DEPTH,
            queue_wait: Duration::from_millis(crate::config::DEFAULT_HSM_QUEUE_WAIT_MS),
            call_timeout: Duration::from_millis(crate::config::DEFAULT_HSM_CALL_TIMEOUT_MS),
        }
    }
}

impl ExecutorSettings {
    /// The settings of an `[hsm]` section.
    pub fn of(cfg: &HsmConfig) -> ExecutorSettings {
        ExecutorSettings {
            queue_depth: cfg.queue_depth,
            queue_wait: Duration::from_millis(cfg.queue_wait_ms),
            call_timeout: Duration::from_millis(cfg.call_timeout_ms),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

type Job = Box<dyn FnOnce(&dyn Hsm) + Send>;

/// The executor in front of one HSM backend. See the module docs.
pub struct HsmExecutor {
    backend: &'static str,
    keepalive: Option<Duration>,
    workers: usize,
    settings: ExecutorSettings,
    /// Free places in the queue; a call holds one until a worker takes it.
    places: Arc<Semaphore>,
    jobs: Mutex<mpsc::Sender<Job>>,
    counters: Arc<Counters>,
    /// Disconnects once every worker has returned and dropped its handle
    /// on the backend (see the `Drop` impl).
    workers_done: Mutex<mpsc::Receiver<()>>,
}

impl std::fmt::Debug for HsmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmExecutor")
            .field("backend", &self.backend)
            .field("workers", &self.workers)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Dropping the executor closes its queue and waits (at most the call
/// timeout and 2 s more) for the workers to finish the call in hand and
/// release the backend. The process must not exit while a worker is still
/// inside the PKCS#11 module or finalizing it: a module's own exit-time
/// destructors racing a worker crash the process, which turned a clean
/// refusal to start (exit 2 or 3) into death by a signal.
impl Drop for HsmExecutor {
    fn drop(&mut self) {
        // Replacing the sender drops the one the workers listen on.
        drop(std::mem::replace(&mut *lock(&self.jobs), mpsc::channel().0));
        let deadline = Instant::now() + self.settings.call_timeout + Duration::from_secs(2);
        let done = lock(&self.workers_done);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match done.recv_timeout(left) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        backend = self.backend,
                        "HSM workers still busy at shutdown; not waiting longer"
                    );
                    return;
                }
            }
        }
    }
}

impl HsmExecutor {
    /// Starts [`Hsm::workers`] worker threads over `hsm`. They stop once
    /// the executor is dropped and the queue is empty.
    pub fn start(hsm: Arc<dyn Hsm>, settings: ExecutorSettings) -> Result<HsmExecutor, HsmError> {
        let workers = hsm.workers().max(1);
        let settings = ExecutorSettings {
            queue_depth: settings.queue_depth.max(1),
            ..settings
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        for i in 0..workers {
            let (rx, hsm, done) = (Arc::clone(&rx), Arc::clone(&hsm), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("hsm-{i}"))
                .spawn(move || {
                    loop {
                        // One worker waits on the channel at a time; the
                        // others wait for the lock.
                        let job = lock(&rx).recv();
                        match job {
                            Ok(job) => job(&*hsm),
                            Err(_) => break,
                        }
                    }
                    // The backend first (the last handle finalizes the
                    // module), then the sign that this worker is gone.
                    drop(hsm);
                    drop(done);
                })
                .map_err(|e| HsmError::Device {
                    op: "start HSM worker",
                    detail: e.to_string(),
                })?;
        }
        Ok(HsmExecutor {
            backend: hsm.backend(),
            keepalive: hsm.keepalive(),
            workers,
            places: Arc::new(Semaphore::new(settings.queue_depth)),
            settings,
            jobs: Mutex::new(tx),
            counters: Arc::new(Counters::default()),
            workers_done: Mutex::new(done_rx),
        })
    }

    /// Backend name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The backend's [`Hsm::keepalive`].
    pub fn keepalive(&self) -> Option<Duration> {
        self.keepalive
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The settings in force.
    pub fn settings(&self) -> ExecutorSettings {
        self.settings
    }

    /// Counts, latencies and the queue now.
    pub fn stats(&self) -> ExecutorStats {
        let ops = *lock(&self.counters.ops);
        ExecutorStats {
            backend: self.backend,
            workers: self.workers,
            queue_depth: self.settings.queue_depth,
            queued: self.queued(),
            max_queued: self.counters.max_queued.load(Ordering::SeqCst),
            running: self.counters.running.load(Ordering::SeqCst),
            waiting_for_room: self.counters.waiting_for_room.load(Ordering::SeqCst),
            ops: HsmOp::ALL.iter().map(|op| (*op, ops[op.index()])).collect(),
        }
    }

    /// Calls the workers have finished since the start, whether their
    /// callers still waited or not: while it grows, the HSM is working (a
    /// long backlog of signatures is progress, not a wedge).
    pub fn calls_finished(&self) -> u64 {
        self.counters.finished.load(Ordering::SeqCst)
    }

    fn queued(&self) -> usize {
        self.settings
            .queue_depth
            .saturating_sub(self.places.available_permits())
    }

    /// Runs `f` on a worker with the backend and returns its result; see
    /// the module docs for `hsm_busy` and the timeout. `op` is what the
    /// call is counted as.
    pub async fn call<T, F>(&self, op: HsmOp, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        let asked = Instant::now();
        let name = op.as_str();
        let place = match Arc::clone(&self.places).try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(HsmError::Stopped { op: name }),
            Err(TryAcquireError::NoPermits) => {
                let wait = self.settings.queue_wait;
                let waiting = &self.counters.waiting_for_room;
                waiting.fetch_add(1, Ordering::SeqCst);
                let room =
                    tokio::time::timeout(wait, Arc::clone(&self.places).acquire_owned()).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                match room {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(HsmError::Stopped { op: name }),
                    Err(_) => {
                        self.counters.with(op, |s| s.busy += 1);
                        return Err(HsmError::Busy {
                            op: name,
                            queue_depth: self.settings.queue_depth,
                            waited_ms: millis(wait),
                        });
                    }
                }
            }
        };
        self.counters
            .max_queued
            .fetch_max(self.queued(), Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let counters = Arc::clone(&self.counters);
        let job: Job = Box::new(move |hsm| {
            // Out of the queue, into the backend.
            drop(place);
            if tx.is_closed() {
                // The caller gave up while this waited: never run.
                counters.with(op, |s| s.abandoned += 1);
                return;
            }
            counters.running.fetch_add(1, Ordering::SeqCst);
            let started = Instant::now();
            let result =
                std::panic::catch_unwind(AssertUnwindSafe(|| f(hsm))).unwrap_or_else(|_| {
                    Err(HsmError::Device {
                        op: name,
                        detail: "the HSM call panicked".into(),
                    })
                });
            let ran = micros(started.elapsed());
            counters.running.fetch_sub(1, Ordering::SeqCst);
            counters.finished.fetch_add(1, Ordering::SeqCst);
            counters.with(op, |s| {
                s.run_total_us = s.run_total_us.saturating_add(ran);
                s.run_max_us = s.run_max_us.max(ran);
            });
            // A caller that timed out meanwhile dropped its receiver: the
            // result (a signature, say) is dropped here, unread.
            let _ = tx.send(result);
        });
        if lock(&self.jobs).send(job).is_err() {
            return Err(HsmError::Stopped { op: name });
        }
        let timeout = self.settings.call_timeout;
        let left = timeout.saturating_sub(asked.elapsed());
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(result)) => {
                let took = micros(asked.elapsed());
                self.counters.with(op, |s| {
                    s.completed += 1;
                    s.failed += u64::from(result.is_err());
                    s.total_us = s.total_us.saturating_add(took);
                    s.max_us = s.max_us.max(took);
                });
                result
            }
            Ok(Err(_)) => Err(HsmError::Stopped { op: name }),
            Err(_) => {
                self.counters.with(op, |s| s.timed_out += 1);
                tracing::warn!(
                    op = name,
                    timeout_ms = millis(timeout),
                    "HSM call timed out; its result will be discarded"
                );
                Err(HsmError::Timeout {
                    op: name,
                    after_ms: millis(timeout),
                })
            }
        }
    }

    /// [`super::sign_verified`] on a worker: the HSM signs, software
    /// verifies.
    pub async fn sign_verified(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let (key, message) = (key.clone(), message.to_vec());
        self.call(HsmOp::Sign, move |hsm| {
            super::sign_verified(hsm, &key, &message)
        })
        .await
    }

    /// [`Hsm::find_ed25519`] on a worker.
    pub async fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let name = name.clone();
        self.call(HsmOp::Find, move |hsm| hsm.find_ed25519(&name))
            .await
    }

    /// [`Hsm::hmac_sha256`] on a worker.
    pub async fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let (label, data) = (label.to_owned(), data.to_vec());
        self.call(HsmOp::Hmac, move |hsm| hsm.hmac_sha256(&label, &data))
            .await
    }

    /// [`Hsm::verify_hmac_sha256`] on a worker.
    pub async fn verify_hmac_sha256(
        &self,
        label: &str,
        data: &[u8],
        tag: &[u8; 32],
    ) -> Result<bool, HsmError> {
        let (label, data, tag) = (label.to_owned(), data.to_vec(), *tag);
        self.call(HsmOp::Hmac, move |hsm| {
            hsm.verify_hmac_sha256(&label, &data, &tag)
        })
        .await
    }

    /// [`Hsm::random`] on a worker.
    pub async fn random(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError> {
        self.call(HsmOp::Random, move |hsm| hsm.random(len)).await
    }

    /// [`Hsm::import_hmac_key`] on a worker.
    pub async fn import_hmac_key(
        &self,
        label: &str,
        key: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<(), HsmError> {
        let label = label.to_owned();
        self.call(HsmOp::ImportHmac, move |hsm| {
            hsm.import_hmac_key(&label, &key)
        })
        .await
    }

    /// [`Hsm::delete_secret`] on a worker.
    pub async fn delete_secret(&self, label: &str) -> Result<bool, HsmError> {
        let label = label.to_owned();
        self.call(HsmOp::DeleteSecret, move |hsm| hsm.delete_secret(&label))
            .await
    }

    /// [`Hsm::store_data`] on a worker.
    pub async fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        let (label, value) = (label.to_owned(), value.to_vec());
        self.call(HsmOp::StoreData, move |hsm| hsm.store_data(&label, &value))
            .await
    }

    /// [`Hsm::health`] on a worker.
    pub async fn health(&self) -> Result<(), HsmError> {
        self.call(HsmOp::Health, |hsm| hsm.health()).await
    }

    /// The backend as a blocking [`Hsm`] whose every call goes through this
    /// executor, for blocking code such as the start-up verification of the
    /// history. Use it only on a thread that may block inside a tokio
    /// runtime (e.g. in `spawn_blocking`), never on a runtime worker.
    pub fn blocking(&self, runtime: tokio::runtime::Handle) -> Blocking<'_> {
        Blocking {
            executor: self,
            runtime,
        }
    }
}

#[cfg(all(test, feature = "mock-hsm"))]
mod tests;
