//! Signed checkpoints of the ledger's Merkle tree, made only over entries
//! verified against the HSM's own audit key.
//!
//! The checkpointer keeps a [`Walker`] positioned at the last verified
//! entry. Before each checkpoint, and every `verify_interval` in between,
//! it verifies what was written since (links, hashes, that the entry
//! verified last is unchanged, and its own earlier checkpoints). The new
//! tree extends the verified one leaf by leaf, so each checkpoint is
//! consistent with the previous by construction. After the checkpoint is
//! recorded, it is kept in the HSM as the mark a later start must find.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::history::HistoryGate;
use crate::hsm::{HsmExecutor, HsmKey};
use crate::ledger::checkpoint::{self, AUDIT_KEY, CheckpointRecord, MARK_LABEL, Mark};
use crate::ledger::{Ledger, Walker};

/// Makes checkpoints and re-verifies the history while keywardd runs.
pub struct Checkpointer {
    hsm: Arc<HsmExecutor>,
    ledger: Ledger,
    key: HsmKey,
    origin: String,
    gate: Arc<HistoryGate>,
    state: tokio::sync::Mutex<State>,
}

struct State {
    /// Positioned at the last verified entry; `None` only while a
    /// verification runs on a blocking thread.
    walker: Option<Walker>,
    /// Size of the last checkpoint made.
    last_size: u64,
    last_at: Instant,
}

/// A checkpoint that was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    /// Entries covered.
    pub size: u64,
    /// Sequence of the `checkpoint` entry.
    pub seq: u64,
}

impl Checkpointer {
    /// A checkpointer over the history `walker` verified (through its head).
    pub fn new(
        hsm: Arc<HsmExecutor>,
        ledger: Ledger,
        key: HsmKey,
        origin: String,
        walker: Walker,
        gate: Arc<HistoryGate>,
    ) -> Checkpointer {
        gate.verified_through(walker.head().0);
        let last_size = walker.checkpointed();
        Checkpointer {
            hsm,
            ledger,
            key,
            origin,
            gate,
            state: tokio::sync::Mutex::new(State {
                walker: Some(walker),
                last_size,
                last_at: Instant::now(),
            }),
        }
    }

    /// The verifier key of the audit key.
    pub fn verifier_key(&self) -> String {
        checkpoint::verifier_key(AUDIT_KEY, &self.key.public_key)
    }

    /// Verifies the entries written since the last verified one. A break
    /// stops signing (the gate trips) and is returned.
    pub async fn verify_new(&self) -> Result<u64, String> {
        let mut st = self.state.lock().await;
        self.verify_locked(&mut st).await
    }

    async fn verify_locked(&self, st: &mut State) -> Result<u64, String> {
        self.gate.check()?;
        let Some(mut walker) = st.walker.take() else {
            let problem =
                "an earlier verification did not finish; the history is not verified".to_owned();
            self.gate.trip(problem.clone());
            return Err(problem);
        };
        let ledger = self.ledger.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = ledger
                .reader()
                .map_err(crate::ledger::VerifyError::Read)
                .and_then(|conn| walker.walk(&conn));
            (walker, r)
        })
        .await;
        let (walker, r) = match result {
            Ok(pair) => pair,
            Err(e) => {
                let problem = format!("the verification task failed: {e}");
                self.gate.trip(problem.clone());
                return Err(problem);
            }
        };
        let head = walker.head().0;
        st.walker = Some(walker);
        match r {
            Ok(n) => {
                self.gate.verified_through(head);
                Ok(n)
            }
            Err(crate::ledger::VerifyError::Read(e)) => {
                // Not a finding: the ledger could not be read this time.
                Err(format!("cannot read the ledger to verify it: {e}"))
            }
            Err(e) => {
                let problem = e.to_string();
                self.gate.trip(problem.clone());
                Err(problem)
            }
        }
    }

    /// Makes a checkpoint if `every` entries were added since the last one,
    /// or `interval` passed with any new entry (`force`: whenever there is a
    /// new entry, as at start and at shutdown). Verifies the new entries
    /// first; never signs over a broken history.
    pub async fn maybe(
        &self,
        every: u64,
        interval: Duration,
        force: bool,
    ) -> Result<Option<Made>, String> {
        let mut guard = self.state.lock().await;
        let head = self.ledger.health().head_seq;
        let new = head.saturating_sub(guard.last_size);
        let due = new > 0 && (force || new >= every || guard.last_at.elapsed() >= interval);
        if !due {
            return Ok(None);
        }
        self.verify_locked(&mut guard).await?;
        let st = &mut *guard;
        let Some(walker) = st.walker.as_mut() else {
            return Err("the history is not verified".into());
        };
        let (frontier, nodes) = walker.tree();
        let size = frontier.size();
        if size <= st.last_size {
            return Ok(None);
        }
        let root = frontier.root();
        let nodes = nodes.to_vec();
        let body = checkpoint::body(&self.origin, size, &root);
        let sig = self
            .hsm
            .sign_verified(&self.key, body.as_bytes())
            .await
            .map_err(|e| format!("the audit key could not sign: {e}"))?;
        let record = CheckpointRecord {
            origin: self.origin.clone(),
            size,
            root: hex::encode(root),
            note: checkpoint::note(&body, AUDIT_KEY, &self.key.public_key, &sig),
            key: AUDIT_KEY.to_owned(),
            public_key: self.key.public_key.to_base58(),
            verifier_key: self.verifier_key(),
        };
        let recorded = record.clone();
        let seq = self
            .ledger
            .write(move |txn| {
                let mut stmt = txn.conn().prepare_cached(
                    "INSERT OR IGNORE INTO merkle_nodes (level, idx, hash) VALUES (?1, ?2, ?3)",
                )?;
                for (level, idx, hash) in &nodes {
                    stmt.execute(rusqlite::params![
                        level,
                        i64::try_from(*idx).unwrap_or(i64::MAX),
                        &hash[..]
                    ])?;
                }
                drop(stmt);
                Ok(txn.record(None, None, &recorded)?.seq.0)
            })
            .await
            .map_err(|e| e.to_string())?;
        walker.nodes_stored();
        st.last_size = size;
        st.last_at = Instant::now();
        // Only a recorded checkpoint becomes the mark, so the mark is never
        // ahead of the database.
        let mark = Mark::of(&record, seq).encode();
        if let Err(e) = self.hsm.store_data(MARK_LABEL, &mark).await {
            tracing::error!(error = %e, size, "cannot keep the checkpoint in the HSM; the previous mark stays")
        }
        Ok(Some(Made { size, seq }))
    }
}
