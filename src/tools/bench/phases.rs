//! The measuring phases: raw HSM signing, closed and open loops of agents
//! through keywardd, and ledger appends.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyward_client::wire::{Action, IntentRequest};
use keyward_client::{Client, IntentOutcome};

use crate::hsm::{Hsm, HsmError, HsmKey};
use crate::ledger::{Ledger, LedgerOptions, events};
use crate::solana::build_sol_transfer;
use crate::types::{Lamports, PublicKey};

use super::cpu::own_cpu;
use super::{BenchError, setup};

/// Signs transfer-sized messages directly through the backend on
/// `threads` threads for `duration`; returns (signatures per second, CPU
/// per signature).
pub(super) fn raw_phase(
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

/// What one load phase achieved.
pub(super) struct LoadResult {
    /// Intents signed.
    pub(super) signed: u64,
    /// Requests that did not end in a signature.
    pub(super) errors: u64,
    /// How long the phase ran.
    pub(super) elapsed: Duration,
    /// Latencies of the signed intents in microseconds, sorted.
    pub(super) latencies_us: Vec<u64>,
    /// What the first request that was not signed got instead.
    pub(super) first_error: Option<String>,
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

/// `Ok` when the intent was signed, else what came back instead.
async fn submit(client: &Client, req: &IntentRequest) -> Result<(), String> {
    match client.submit_intent(req).await {
        Ok(IntentOutcome::Signed(_)) => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Keeps the first error seen.
fn note(first: &mut Option<String>, e: String) {
    if first.is_none() {
        *first = Some(e);
    }
}

/// Closed loop: `clients` tasks each submit one intent after the other.
pub(super) async fn closed_loop(
    client: &Client,
    clients: usize,
    duration: Duration,
    tag: &str,
) -> LoadResult {
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
                let mut first_error = None;
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let req = intent(format!("bench-{tag}-{c}-{i}"), &blockhash);
                    i += 1;
                    let start = Instant::now();
                    match submit(&client, &req).await {
                        Ok(()) => {
                            signed += 1;
                            lat.push(
                                u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                            );
                        }
                        Err(e) => {
                            errors += 1;
                            note(&mut first_error, e);
                        }
                    }
                }
                (signed, errors, lat, first_error)
            })
        })
        .collect();
    let mut out = LoadResult {
        signed: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        first_error: None,
    };
    for t in tasks {
        match t.await {
            Ok((s, e, lat, first)) => {
                out.signed += s;
                out.errors += e;
                out.latencies_us.extend(lat);
                if let Some(f) = first {
                    note(&mut out.first_error, f);
                }
            }
            Err(e) => {
                out.errors += 1;
                note(&mut out.first_error, format!("client task failed: {e}"));
            }
        }
    }
    out.elapsed = t0.elapsed();
    out.latencies_us.sort_unstable();
    out
}

/// Requests the open loop keeps in flight at most.
const OPEN_LOOP_IN_FLIGHT: usize = 200;

/// Open loop: one request every 1/rate seconds, whatever the answers do;
/// latency counts from when the request was due.
pub(super) async fn open_loop(client: &Client, rate: f64, duration: Duration) -> LoadResult {
    let blockhash = PublicKey(rand::random()).to_base58();
    let period = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let total = (duration.as_secs_f64() * rate).max(1.0) as u64;
    // At most OPEN_LOOP_IN_FLIGHT requests at once: below the per-uid
    // connection limit the bench sets (256) and the HSM queue (256), so a
    // machine slowed down by other work shows in the latency, not in
    // refusals (hsm_busy, connection limits) counted as errors.
    let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_IN_FLIGHT));
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
        first_error: None,
    };
    for t in tasks {
        match t.await {
            Ok((Ok(()), lat)) => {
                out.signed += 1;
                out.latencies_us.push(lat);
            }
            Ok((Err(e), _)) => {
                out.errors += 1;
                note(&mut out.first_error, e);
            }
            Err(e) => {
                out.errors += 1;
                note(&mut out.first_error, format!("client task failed: {e}"));
            }
        }
    }
    out.elapsed = t0.elapsed();
    out.latencies_us.sort_unstable();
    out
}

/// Concurrent writers appending entries to a scratch ledger.
pub(super) async fn ledger_phase(
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
                    let received = events::IntentReceived {
                        key: "bench".to_owned(),
                        action: events::ActionSummary::SignTransaction,
                        content_sha256: "00".repeat(32),
                        message: None,
                        message_sha256: None,
                        effects: None,
                    };
                    let ok = ledger
                        .write(move |t| t.record(Some(&id), Some("bench"), &received))
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
