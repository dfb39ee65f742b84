//! What the executor counts: per operation, and its queue.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::{HsmOp, lock};

/// Counts and latencies of one operation since the executor started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Calls answered with the backend's result (success or error).
    pub completed: u64,
    /// Of those, the ones the backend failed.
    pub failed: u64,
    /// Calls refused with `hsm_busy` (never queued).
    pub busy: u64,
    /// Calls that timed out.
    pub timed_out: u64,
    /// Timed-out calls no worker had taken yet: never run.
    pub abandoned: u64,
    /// Sum of the answered calls' latency, asked → answered (queue
    /// included), in microseconds.
    pub total_us: u64,
    /// Largest such latency, in microseconds.
    pub max_us: u64,
    /// Sum of the time workers spent in the backend, in microseconds.
    pub run_total_us: u64,
    /// Largest time in the backend, in microseconds.
    pub run_max_us: u64,
}

/// A snapshot of the executor: its shape, its queue, and [`OpStats`] per
/// operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorStats {
    /// Backend name.
    pub backend: &'static str,
    /// Worker threads.
    pub workers: usize,
    /// Places in the queue.
    pub queue_depth: usize,
    /// Calls waiting in the queue now.
    pub queued: usize,
    /// Most calls that waited in the queue at once.
    pub max_queued: usize,
    /// Calls inside the backend now.
    pub running: usize,
    /// Calls waiting for room in a full queue now.
    pub waiting_for_room: usize,
    /// Per operation, in [`HsmOp::ALL`] order.
    pub ops: Vec<(HsmOp, OpStats)>,
}

impl ExecutorStats {
    /// The counts of `op`.
    pub fn op(&self, op: HsmOp) -> OpStats {
        self.ops
            .iter()
            .find(|(o, _)| *o == op)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }
}

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) ops: Mutex<[OpStats; HsmOp::ALL.len()]>,
    pub(super) running: AtomicUsize,
    pub(super) waiting_for_room: AtomicUsize,
    pub(super) max_queued: AtomicUsize,
    /// Calls the workers have finished (answered or not in time): the
    /// progress the watchdog looks for.
    pub(super) finished: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub(super) fn with(&self, op: HsmOp, f: impl FnOnce(&mut OpStats)) {
        f(&mut lock(&self.ops)[op.index()]);
    }
}
