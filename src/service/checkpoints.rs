//! Signed checkpoints of the ledger's Merkle tree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hsm::{Hsm, HsmKey, sign_verified};
use crate::ledger::checkpoint::{self, AUDIT_KEY};
use crate::ledger::merkle::{Frontier, leaf_hash};
use crate::ledger::{EventType, Ledger, LedgerError};

/// Makes checkpoints: keeps the tree's frontier, signs with the audit key.
pub struct Checkpointer {
    hsm: Arc<dyn Hsm>,
    ledger: Ledger,
    key: HsmKey,
    origin: String,
    state: tokio::sync::Mutex<State>,
}

struct State {
    frontier: Frontier,
    /// Perfect subtrees completed since the last recorded checkpoint, stored
    /// with the next one (they make proofs O(log² n)).
    pending_nodes: Vec<(u32, u64, [u8; 32])>,
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

fn read_hashes(ledger: &Ledger, after: u64) -> Result<Vec<(u64, [u8; 32])>, LedgerError> {
    let conn = ledger.reader()?;
    let mut stmt = conn.prepare("SELECT seq, hash FROM ledger WHERE seq > ?1 ORDER BY seq")?;
    let rows = stmt.query_map([i64::try_from(after).unwrap_or(i64::MAX)], |r| {
        let seq: i64 = r.get(0)?;
        let h: Vec<u8> = r.get(1)?;
        Ok((seq, h))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, h) = row?;
        let hash: [u8; 32] = h.as_slice().try_into().map_err(|_| {
            LedgerError::Corrupt(format!("entry {seq} has a hash of {} bytes", h.len()))
        })?;
        out.push((u64::try_from(seq).unwrap_or(0), hash));
    }
    Ok(out)
}

fn append(
    frontier: &mut Frontier,
    hashes: &[(u64, [u8; 32])],
    mut nodes: Option<&mut Vec<(u32, u64, [u8; 32])>>,
) -> Result<(), LedgerError> {
    for (seq, h) in hashes {
        if *seq != frontier.size() + 1 {
            return Err(LedgerError::Corrupt(format!(
                "entry {seq} follows {}: the ledger has a gap",
                frontier.size()
            )));
        }
        let made = frontier.push(leaf_hash(h));
        if let Some(n) = nodes.as_deref_mut() {
            n.extend(made);
        }
    }
    Ok(())
}

impl Checkpointer {
    /// Builds the tree over every entry so far (once, at start).
    pub fn new(
        hsm: Arc<dyn Hsm>,
        ledger: Ledger,
        key: HsmKey,
        origin: String,
    ) -> Result<Checkpointer, LedgerError> {
        let mut frontier = Frontier::default();
        let mut nodes = Vec::new();
        append(&mut frontier, &read_hashes(&ledger, 0)?, Some(&mut nodes))?;
        let last_size = last_checkpoint_size(&ledger)?;
        // Nodes completed after the last checkpoint were never stored: they
        // go with the next one.
        nodes.retain(|(level, idx, _)| (idx + 1) << level > last_size);
        Ok(Checkpointer {
            hsm,
            ledger,
            key,
            origin,
            state: tokio::sync::Mutex::new(State {
                frontier,
                pending_nodes: nodes,
                last_size,
                last_at: Instant::now(),
            }),
        })
    }

    /// The verifier key of the audit key.
    pub fn verifier_key(&self) -> String {
        checkpoint::verifier_key(AUDIT_KEY, &self.key.public_key)
    }

    /// Makes a checkpoint if `every` entries were added since the last one,
    /// or `interval` passed with any new entry (`force`: whenever there is a
    /// new entry, as at shutdown).
    pub async fn maybe(
        &self,
        every: u64,
        interval: Duration,
        force: bool,
    ) -> Result<Option<Made>, String> {
        let mut st = self.state.lock().await;
        let head = self.ledger.health().head_seq;
        let new = head.saturating_sub(st.last_size);
        let due = new > 0 && (force || new >= every || st.last_at.elapsed() >= interval);
        if !due {
            return Ok(None);
        }
        let size0 = st.frontier.size();
        let hashes = read_hashes(&self.ledger, size0).map_err(|e| e.to_string())?;
        let st = &mut *st;
        append(&mut st.frontier, &hashes, Some(&mut st.pending_nodes))
            .map_err(|e| e.to_string())?;
        let size = st.frontier.size();
        let root = st.frontier.root();
        let body = checkpoint::body(&self.origin, size, &root);
        let hsm = Arc::clone(&self.hsm);
        let key = self.key.clone();
        let to_sign = body.clone().into_bytes();
        let sig = tokio::task::spawn_blocking(move || sign_verified(&*hsm, &key, &to_sign))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the audit key could not sign: {e}"))?;
        let note = checkpoint::note(&body, AUDIT_KEY, &self.key.public_key, &sig);
        let payload = serde_json::to_vec(&serde_json::json!({
            "origin": self.origin,
            "size": size,
            "root": hex::encode(root),
            "note": note,
            "key": AUDIT_KEY,
            "public_key": self.key.public_key.to_base58(),
            "verifier_key": self.verifier_key(),
        }))
        .map_err(|e| e.to_string())?;
        let nodes = st.pending_nodes.clone();
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
                Ok(txn
                    .append(EventType::Checkpoint, None, None, &payload)?
                    .seq
                    .0)
            })
            .await
            .map_err(|e| e.to_string())?;
        st.pending_nodes.clear();
        st.last_size = size;
        st.last_at = Instant::now();
        Ok(Some(Made { size, seq }))
    }
}

/// Size of the last checkpoint in the ledger (0 if none).
fn last_checkpoint_size(ledger: &Ledger) -> Result<u64, LedgerError> {
    let conn = ledger.reader()?;
    Ok(crate::ledger::latest_checkpoint(&conn)?
        .and_then(|v| v["size"].as_u64())
        .unwrap_or(0))
}
