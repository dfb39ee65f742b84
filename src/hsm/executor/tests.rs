//! Unit tests of the executor, on the mock backend.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::hsm::mock::MockHsm;

fn settings(queue_depth: usize, queue_wait_ms: u64, call_timeout_ms: u64) -> ExecutorSettings {
    ExecutorSettings {
        queue_depth,
        queue_wait: Duration::from_millis(queue_wait_ms),
        call_timeout: Duration::from_millis(call_timeout_ms),
    }
}

/// An executor over a mock with `workers` workers and its `hot` key.
fn setup(workers: usize, s: ExecutorSettings) -> (Arc<MockHsm>, Arc<HsmExecutor>, HsmKey) {
    let mock = Arc::new(MockHsm::new().with_workers(workers));
    let key = mock
        .generate_ed25519(&KeyName::new("hot").unwrap())
        .unwrap();
    let exec = HsmExecutor::start(Arc::clone(&mock) as Arc<dyn Hsm>, s).unwrap();
    (mock, Arc::new(exec), key)
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn sign(
    exec: &Arc<HsmExecutor>,
    key: &HsmKey,
) -> tokio::task::JoinHandle<Result<[u8; 64], HsmError>> {
    let (exec, key) = (Arc::clone(exec), key.clone());
    tokio::spawn(async move { exec.sign_verified(&key, b"message").await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_many_calls_at_once_as_the_backend_has_workers_and_queues_the_rest() {
    let (mock, exec, key) = setup(3, settings(8, 0, 60_000));
    assert_eq!(exec.workers(), 3);
    mock.close_gate(HsmOp::Sign);
    let calls: Vec<_> = (0..5).map(|_| sign(&exec, &key)).collect();
    wait_until("three held, two queued", || {
        mock.held(HsmOp::Sign) == 3 && exec.stats().queued == 2
    })
    .await;
    let stats = exec.stats();
    assert_eq!(stats.running, 3, "{stats:?}");
    assert!((2..=5).contains(&stats.max_queued), "{stats:?}");
    assert_eq!(
        mock.calls(HsmOp::Sign),
        3,
        "the queued calls never reached it"
    );
    mock.open_gate(HsmOp::Sign);
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let stats = exec.stats();
    let sign = stats.op(HsmOp::Sign);
    assert_eq!((sign.completed, sign.failed, sign.busy), (5, 0, 0));
    assert!(sign.max_us >= sign.run_max_us && sign.total_us >= sign.max_us);
    assert_eq!((stats.queued, stats.running), (0, 0));
    assert_eq!(stats.op(HsmOp::Hmac), OpStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_with_busy_and_never_reaches_the_hsm() {
    let (mock, exec, key) = setup(1, settings(1, 0, 60_000));
    mock.close_gate(HsmOp::Sign);
    let held = sign(&exec, &key);
    wait_until("one held", || mock.held(HsmOp::Sign) == 1).await;
    let queued = sign(&exec, &key);
    wait_until("one queued", || exec.stats().queued == 1).await;
    match exec.sign_verified(&key, b"one too many").await {
        Err(e @ HsmError::Busy { .. }) => assert_eq!(e.code(), "hsm_busy"),
        other => panic!("expected busy, got {other:?}"),
    }
    // Any other operation finds the same full queue.
    assert!(matches!(exec.health().await, Err(HsmError::Busy { .. })));
    assert_eq!(exec.stats().op(HsmOp::Sign).busy, 1);
    assert_eq!(exec.stats().op(HsmOp::Health).busy, 1);
    assert_eq!(mock.calls(HsmOp::Sign), 1);
    mock.open_gate(HsmOp::Sign);
    held.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    assert_eq!(mock.calls(HsmOp::Sign), 2);
    assert_eq!(mock.calls(HsmOp::Health), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_up_to_queue_wait_for_room_in_a_full_queue() {
    let (mock, exec, key) = setup(1, settings(1, 60_000, 120_000));
    mock.close_gate(HsmOp::Sign);
    let held = sign(&exec, &key);
    wait_until("one held", || mock.held(HsmOp::Sign) == 1).await;
    let queued = sign(&exec, &key);
    wait_until("one queued", || exec.stats().queued == 1).await;
    let waiting = sign(&exec, &key);
    // It waits for room rather than failing.
    wait_until("a caller waiting for room", || {
        exec.stats().waiting_for_room == 1
    })
    .await;
    assert!(!waiting.is_finished());
    mock.open_gate(HsmOp::Sign);
    for c in [held, queued, waiting] {
        c.await.unwrap().unwrap();
    }
    assert_eq!(exec.stats().op(HsmOp::Sign).busy, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_is_abandoned_if_queued_and_its_late_result_discarded_if_running() {
    let (mock, exec, key) = setup(1, settings(4, 0, 200));
    mock.close_gate(HsmOp::Sign);
    let running = sign(&exec, &key);
    wait_until("one held", || mock.held(HsmOp::Sign) == 1).await;
    let queued = sign(&exec, &key);
    for c in [running, queued] {
        match c.await.unwrap() {
            Err(e @ HsmError::Timeout { .. }) => assert_eq!(e.code(), "hsm_unavailable"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    assert_eq!(exec.stats().op(HsmOp::Sign).timed_out, 2);
    mock.open_gate(HsmOp::Sign);
    // The running call's signature is made, then dropped; the queued
    // call is never run.
    wait_until("the queued call abandoned", || {
        exec.stats().op(HsmOp::Sign).abandoned == 1
    })
    .await;
    assert_eq!(mock.calls(HsmOp::Sign), 1);
    assert_eq!(mock.succeeded(HsmOp::Sign), 1);
    let sign = exec.stats().op(HsmOp::Sign);
    assert_eq!((sign.completed, sign.timed_out), (0, 2));
    // The worker is free again.
    exec.sign_verified(&key, b"after").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failures_are_answered_and_counted() {
    let (mock, exec, key) = setup(2, settings(4, 0, 60_000));
    mock.fail_next(HsmOp::Sign, 1);
    assert!(matches!(
        exec.sign_verified(&key, b"m").await,
        Err(HsmError::Device { .. })
    ));
    exec.sign_verified(&key, b"m").await.unwrap();
    let found = exec
        .find_ed25519(&KeyName::new("hot").unwrap())
        .await
        .unwrap();
    assert_eq!(found, key);
    let sign = exec.stats().op(HsmOp::Sign);
    assert_eq!((sign.completed, sign.failed), (2, 1));
    assert_eq!(exec.stats().op(HsmOp::Find).completed, 1);
    // The blocking view goes through the same workers and counts.
    let e = Arc::clone(&exec);
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        e.blocking(rt).store_data("mark", b"1").unwrap();
    })
    .await
    .unwrap();
    assert_eq!(exec.stats().op(HsmOp::StoreData).completed, 1);
    assert_eq!(mock.load_data("mark").unwrap(), vec![b"1".to_vec()]);
}

/// The process exits only after the executor is gone; a worker still
/// inside the module (or finalizing it) while the module's exit-time
/// destructors run crashed keywardd on refusals to start. Dropping the
/// executor therefore waits for the call in hand and for the workers to
/// release the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_executor_waits_for_the_call_in_hand_and_releases_the_backend() {
    let (mock, exec, key) = setup(1, settings(4, 0, 60_000));
    mock.close_gate(HsmOp::Sign);
    let call = sign(&exec, &key);
    wait_until("one held", || mock.held(HsmOp::Sign) == 1).await;
    // The caller gives up; the worker is still inside the backend.
    call.abort();
    let _ = call.await;
    assert_eq!(Arc::strong_count(&exec), 1, "only this test holds it");
    assert_eq!(Arc::strong_count(&mock), 2, "this test and the worker");
    let dropper = std::thread::spawn(move || drop(exec));
    // A drop that does not wait returns at once: give it the chance.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !dropper.is_finished(),
        "the drop returned while a worker was still inside the backend"
    );
    mock.open_gate(HsmOp::Sign);
    dropper.join().unwrap();
    assert_eq!(
        Arc::strong_count(&mock),
        1,
        "the worker released the backend before the drop returned"
    );
}
