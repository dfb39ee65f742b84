//! Verification of the ledger's history against a trust anchor.
//!
//! A hash chain alone proves nothing against someone who can rewrite the
//! database and recompute every hash. What they cannot do without the HSM
//! is sign a checkpoint, so the history is authenticated by checkpoints
//! verified with a key that does not come from the database:
//!
//! - offline ([`verify_history`]): the audit key's verifier key pinned
//!   outside the database at set-up (`audit.vkey`) or given by the auditor;
//! - in keywardd ([`Walker`]): the HSM's own audit key, at start, before each
//!   new checkpoint and periodically while running.
//!
//! Rules, beyond the chain itself (contiguous sequence numbers, links,
//! hashes, known event types, non-decreasing time):
//!
//! 1. every checkpoint is signed by the trusted key, covers only earlier
//!    entries, never shrinks and has the Merkle root of the entries it
//!    covers;
//! 2. keywardd signs a checkpoint covering its own `daemon_started` entry
//!    before it records anything for an agent, so an agent's entry that no
//!    checkpoint of its run covers the start of (checkpoints removed, or a
//!    history made up) is a break, and so is one after a clean stop
//!    (`daemon_stopped`) and before the next start (entries added offline);
//! 3. the database must contain the newest checkpoint kept outside it (the
//!    mark in the HSM) and reach what the mirror acknowledged: a shorter or
//!    different history was truncated or rolled back.
//!
//! What no check on the box can see: entries after the newest checkpoint
//! that are rewritten or removed before anything outside the database has
//! seen them. The mirror (and, later, witnesses) is the answer to that.

use std::collections::VecDeque;
use std::path::Path;

use rusqlite::Connection;

use super::checkpoint::{self, CheckpointRecord, Mark};
use super::merkle::{Frontier, Hash, leaf_hash};
use super::verify::{SELECT, open_read_only, raw, to_entry};
use super::{Entry, EventType, LedgerError};

/// Result of a successful verification of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of entries checked.
    pub entries: u64,
    /// Sequence number of the last entry.
    pub head_seq: u64,
    /// Hash of the last entry (all zeros for an empty ledger).
    pub head_hash: [u8; 32],
}

/// Why verification failed: either a finding about the history (the ledger
/// is broken at `seq`) or a failure to read it.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The history is broken; `seq` is the first bad sequence number.
    #[error("first broken entry: seq {seq}: {problem}")]
    Broken {
        /// First broken sequence number.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
    /// The database could not be read.
    #[error("{0}")]
    Read(#[from] LedgerError),
}

impl VerifyError {
    /// Whether this is a finding about the chain (exit 1) rather than a
    /// failure to read it (exit 2).
    pub fn is_finding(&self) -> bool {
        matches!(self, VerifyError::Broken { .. })
    }

    /// The first broken sequence number, for findings.
    pub fn broken_seq(&self) -> Option<u64> {
        match self {
            VerifyError::Broken { seq, .. } => Some(*seq),
            VerifyError::Read(_) => None,
        }
    }
}

impl From<rusqlite::Error> for VerifyError {
    fn from(e: rusqlite::Error) -> Self {
        VerifyError::Read(LedgerError::Sqlite(e))
    }
}

fn broken(seq: u64, problem: impl Into<String>) -> VerifyError {
    VerifyError::Broken {
        seq,
        problem: problem.into(),
    }
}

/// The verifier key checkpoints must be signed with, and where it came
/// from (for the report: an auditor must see which key they trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    vkey: String,
    source: String,
}

impl TrustedKey {
    /// A verifier key string (`NAME+KEYID+KEY`) from `source`.
    pub fn new(vkey: &str, source: impl Into<String>) -> Result<TrustedKey, String> {
        let vkey = vkey.trim();
        checkpoint::parse_verifier_key(vkey)?;
        Ok(TrustedKey {
            vkey: vkey.to_owned(),
            source: source.into(),
        })
    }

    /// The key in a pinned key file: its first line that is neither empty
    /// nor a `#` comment.
    pub fn from_file(path: &Path) -> Result<TrustedKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the pinned audit key {}: {e}", path.display()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| format!("{} holds no verifier key", path.display()))?;
        TrustedKey::new(line, path.display().to_string())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The text of a pinned key file for `vkey`.
    pub fn file_text(vkey: &str) -> String {
        format!(
            "# keyward audit verifier key: checkpoints of this signer's ledger must be signed by it.\n\
             # Pinned at set-up; keep this file root-owned and read-only.\n{vkey}\n"
        )
    }

    /// The verifier key string.
    pub fn vkey(&self) -> &str {
        &self.vkey
    }

    /// Where the key came from (a file, `--vkey`, the HSM).
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// What the database must also contain, known from outside it.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// The newest checkpoint kept in the HSM.
    pub mark: Option<Mark>,
    /// Entries the mirror acknowledged: (sequence number, which sink).
    pub mirror_acked: Option<(u64, String)>,
}

/// Result of a successful verification of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryReport {
    /// The chain.
    pub chain: VerifyReport,
    /// Checkpoints verified with the trusted key.
    pub checkpoints: u64,
    /// Entries the newest checkpoint covers (1..=checkpointed).
    pub checkpointed: u64,
}

impl HistoryReport {
    /// Entries after the newest checkpoint: authenticated by the chain
    /// alone, so their truncation or rewrite shows only against the mirror.
    pub fn uncovered(&self) -> u64 {
        self.chain.entries.saturating_sub(self.checkpointed)
    }
}

/// A streaming verifier of ledger entries in sequence order. Holds the
/// Merkle frontier of what it verified, so keywardd signs new checkpoints
/// over exactly the entries it checked.
#[derive(Debug)]
pub struct Walker {
    trusted: Option<TrustedKey>,
    next_seq: u64,
    prev_hash: Hash,
    prev_ts: i64,
    /// An entry whose hash did not match: the next entry tells whether its
    /// content or its stored hash was changed.
    pending: Option<(Entry, Hash)>,
    frontier: Frontier,
    /// Leaves of verified entries not yet in the frontier.
    unpushed: VecDeque<Hash>,
    /// Perfect subtrees completed beyond the newest checkpoint (stored with
    /// the next one, for O(log² n) proofs).
    nodes: Vec<(u32, u64, Hash)>,
    watch: Option<u64>,
    watched_root: Option<Hash>,
    checkpoints: u64,
    checkpointed: u64,
    checkpoint_seqs: Vec<(u64, u64)>,
    /// The current daemon run's `daemon_started` entry, and whether a
    /// checkpoint covers it.
    run_start: Option<u64>,
    run_covered: bool,
}

impl Walker {
    /// A verifier from the first entry. With `trusted`, checkpoints are
    /// authenticated and the run rule applies; without, only the chain is
    /// checked (this proves nothing against someone who can rewrite the
    /// whole file).
    pub fn new(trusted: Option<TrustedKey>) -> Walker {
        Walker {
            trusted,
            next_seq: 1,
            prev_hash: [0; 32],
            prev_ts: i64::MIN,
            pending: None,
            frontier: Frontier::default(),
            unpushed: VecDeque::new(),
            nodes: Vec::new(),
            watch: None,
            watched_root: None,
            checkpoints: 0,
            checkpointed: 0,
            checkpoint_seqs: Vec::new(),
            run_start: None,
            run_covered: false,
        }
    }

    /// A verifier that takes the stored history as it is, without checking
    /// it (only after an operator acknowledged a break): the tree is built
    /// from the stored hashes and verification goes on from the head.
    /// Sequence numbers must still be contiguous: a tree cannot be built
    /// over missing entries.
    pub fn accept_stored(conn: &Connection, trusted: TrustedKey) -> Result<Walker, VerifyError> {
        let mut w = Walker::new(Some(trusted));
        let mut stmt = conn.prepare("SELECT seq, ts_ms, hash FROM ledger ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let ts: i64 = row.get(1)?;
            let h: Vec<u8> = row.get(2)?;
            let seq = u64::try_from(seq).unwrap_or(0);
            let hash: Hash = h
                .as_slice()
                .try_into()
                .map_err(|_| broken(seq, "hash is not 32 bytes"))?;
            if seq != w.next_seq {
                return Err(broken(
                    w.next_seq,
                    "entries are missing: the history cannot be taken as it is; restore the database from a backup or the mirror",
                ));
            }
            w.frontier.push(leaf_hash(&hash));
            w.prev_hash = hash;
            w.prev_ts = ts;
            w.next_seq += 1;
        }
        // A checkpoint entry that does not decode is reported by the walk
        // itself; here it only means nothing is known to be covered.
        let conn_cp = match super::verify::latest_checkpoint(conn) {
            Err(LedgerError::Corrupt(_)) => None,
            other => other?,
        };
        w.checkpointed = conn_cp.map_or(0, |r| r.size).min(w.frontier.size());
        Ok(w)
    }

    /// Remembers the Merkle root at `size` leaves (for the HSM's mark).
    /// Call before walking.
    pub fn watch(&mut self, size: u64) {
        self.watch = Some(size);
    }

    /// Sequence number and hash of the last verified entry (0 and zeros
    /// when none).
    pub fn head(&self) -> (u64, Hash) {
        (self.next_seq - 1, self.prev_hash)
    }

    /// Entries the newest verified checkpoint covers.
    pub fn checkpointed(&self) -> u64 {
        self.checkpointed
    }

    fn push_to(&mut self, size: u64) -> Result<(), String> {
        while self.frontier.size() < size {
            let leaf = self
                .unpushed
                .pop_front()
                .ok_or("checkpoint beyond the entries read")?;
            let made = self.frontier.push(leaf);
            self.nodes.extend(made);
            if self.watch == Some(self.frontier.size()) {
                self.watched_root = Some(self.frontier.root());
            }
        }
        Ok(())
    }

    /// The tree over every verified entry, and the perfect subtrees
    /// completed since the newest checkpoint.
    pub fn tree(&mut self) -> (&Frontier, &[(u32, u64, Hash)]) {
        let all = self.frontier.size() + self.unpushed.len() as u64;
        // Cannot fail: exactly the unpushed leaves are pushed.
        let _ = self.push_to(all);
        (&self.frontier, &self.nodes)
    }

    /// Forgets the subtrees once a checkpoint has stored them. The tree
    /// stands at the checkpoint's size whenever one is stored or read (a
    /// checkpoint never covers less than the tree, and the tree is pushed
    /// up to it), so every subtree held lies inside it.
    pub fn nodes_stored(&mut self) {
        self.nodes.clear();
    }

    /// Verifies the next entry.
    pub fn entry(&mut self, entry: Entry) -> Result<(), VerifyError> {
        if let Some((bad, computed)) = self.pending.take() {
            let problem = if entry.prev_hash == bad.hash {
                "the entry's content does not match its hash (payload or fields edited)"
            } else if entry.prev_hash == computed {
                "the stored hash was changed (the next entry links to the hash of the unchanged content)"
            } else {
                "the entry does not match its hash and the next entry does not link to it (entry replaced)"
            };
            return Err(broken(bad.seq, problem));
        }
        let expected = self.next_seq;
        if entry.seq != expected {
            return Err(broken(
                expected,
                if entry.seq > expected {
                    format!(
                        "entries {expected}..{} are missing (rows deleted); the next stored entry is seq {}",
                        entry.seq - 1,
                        entry.seq
                    )
                } else {
                    format!("sequence number {} appears out of order", entry.seq)
                },
            ));
        }
        if entry.prev_hash != self.prev_hash {
            return Err(broken(
                entry.seq,
                format!(
                    "the link to entry {} is broken (rows reordered, replaced, or the link edited)",
                    entry.seq - 1
                ),
            ));
        }
        let Some(event) = EventType::parse(&entry.event) else {
            return Err(broken(
                entry.seq,
                format!("unknown event type {:?}", entry.event),
            ));
        };
        if entry.ts_ms < self.prev_ts {
            return Err(broken(
                entry.seq,
                "timestamp earlier than the previous entry's",
            ));
        }
        let computed = entry.computed_hash();
        if computed != entry.hash {
            // The next entry (or the end) turns this into the finding.
            self.pending = Some((entry, computed));
            return Ok(());
        }
        if self.trusted.is_some() {
            self.authenticate(event, &entry)
                .map_err(|p| broken(entry.seq, p))?;
        }
        self.unpushed.push_back(leaf_hash(&entry.hash));
        self.prev_hash = entry.hash;
        self.prev_ts = entry.ts_ms;
        self.next_seq += 1;
        Ok(())
    }

    /// Rules 1 and 2 of the module documentation.
    fn authenticate(&mut self, event: EventType, entry: &Entry) -> Result<(), String> {
        match event {
            EventType::DaemonStarted => {
                self.run_start = Some(entry.seq);
                self.run_covered = false;
            }
            // Nothing is recorded for an agent between a clean stop and the
            // next start.
            EventType::DaemonStopped => {
                self.run_start = None;
                self.run_covered = false;
            }
            EventType::Checkpoint => {
                let size = self.check_checkpoint(entry)?;
                self.checkpoints += 1;
                self.checkpointed = size;
                self.checkpoint_seqs.push((entry.seq, size));
                if self.run_start.is_some_and(|s| size >= s) {
                    self.run_covered = true;
                }
            }
            _ => {}
        }
        if entry.agent.is_some() || entry.intent_id.is_some() {
            match self.run_start {
                None => {
                    return Err(
                        "an agent's entry outside a daemon run (before any start, or after a clean stop): \
                         entries were added or the start removed"
                            .into(),
                    );
                }
                Some(s) if !self.run_covered => {
                    return Err(format!(
                        "an agent's entry, but no checkpoint signed by the trusted key covers the daemon start at seq {s} \
                         (keywardd signs one before it serves): checkpoints were removed or the history rewritten"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Checks a `checkpoint` entry against the trusted key; returns its size.
    fn check_checkpoint(&mut self, entry: &Entry) -> Result<u64, String> {
        let Some(trusted) = self.trusted.clone() else {
            return Ok(0);
        };
        let rec: CheckpointRecord = super::events::decode(&entry.event, &entry.payload)
            .map_err(|e| format!("checkpoint payload is not readable: {e}"))?;
        let size = rec.size;
        if size >= entry.seq {
            return Err(format!(
                "checkpoint claims {size} entries, more than precede it"
            ));
        }
        // The tree stands at least at the newest checkpoint's size.
        if size < self.frontier.size() {
            return Err(format!(
                "checkpoint of {size} entries after one of {}: a checkpoint never shrinks",
                self.frontier.size()
            ));
        }
        self.push_to(size)?;
        let root = hex::encode(self.frontier.root());
        if rec.root != root {
            return Err(format!(
                "checkpoint root does not match the Merkle root of entries 1..{size}"
            ));
        }
        let cp = checkpoint::verify(&rec.note, trusted.vkey()).map_err(|e| {
            if rec.verifier_key != trusted.vkey() {
                format!(
                    "checkpoint signed by {}, not by the trusted audit key {} (from {})",
                    rec.verifier_key,
                    trusted.vkey(),
                    trusted.source()
                )
            } else {
                format!("checkpoint note: {e}")
            }
        })?;
        if cp.size != size || hex::encode(cp.root) != root {
            return Err("the signed note says another size or root than the checkpoint".into());
        }
        // Subtrees inside the checkpoint were stored with it.
        self.nodes_stored();
        Ok(size)
    }

    /// Ends a batch: an entry whose hash did not match is a break even if
    /// nothing follows it.
    pub fn settle(&mut self) -> Result<(), VerifyError> {
        if let Some((bad, _)) = self.pending.take() {
            return Err(broken(
                bad.seq,
                "the last entry's content does not match its hash (payload, fields or hash edited)",
            ));
        }
        Ok(())
    }

    /// Settles, then checks rule 3 against what is known from outside the
    /// database, and reports.
    pub fn conclude(&mut self, expect: &Expectations) -> Result<HistoryReport, VerifyError> {
        self.settle()?;
        let entries = self.next_seq - 1;
        if let Some(mark) = &expect.mark {
            if mark.size > entries {
                return Err(broken(
                    entries + 1,
                    format!(
                        "the database ends at entry {entries}, but the checkpoint kept in the HSM covers {} entries: \
                         entries were removed (truncation or rollback)",
                        mark.size
                    ),
                ));
            }
            self.tree();
            let root_at_mark = if self.watch == Some(mark.size) {
                self.watched_root
            } else {
                None
            };
            if root_at_mark.map(hex::encode).as_deref() != Some(mark.root.as_str()) {
                return Err(broken(
                    mark.size,
                    format!(
                        "entries 1..{} do not have the root of the checkpoint kept in the HSM: the history was rewritten",
                        mark.size
                    ),
                ));
            }
            if self.trusted.is_some() && !self.checkpoint_seqs.contains(&(mark.seq, mark.size)) {
                return Err(broken(
                    mark.seq,
                    format!(
                        "the checkpoint kept in the HSM (entry {}, {} entries) is not in the database, whose newest covers {}: \
                         checkpoints were removed or the database rolled back",
                        mark.seq, mark.size, self.checkpointed
                    ),
                ));
            }
        }
        if let Some((acked, sink)) = &expect.mirror_acked
            && *acked > entries
        {
            return Err(broken(
                entries + 1,
                format!(
                    "the mirror {sink} acknowledged entries up to {acked}, but the database ends at {entries}: \
                     truncation or rollback"
                ),
            ));
        }
        Ok(HistoryReport {
            chain: VerifyReport {
                entries,
                head_seq: entries,
                head_hash: self.prev_hash,
            },
            checkpoints: self.checkpoints,
            checkpointed: self.checkpointed,
        })
    }

    /// Verifies every entry after the head in `conn`, in batches; first
    /// checks that the head entry itself is still what was verified.
    pub fn walk(&mut self, conn: &Connection) -> Result<u64, VerifyError> {
        let (head, head_hash) = self.head();
        if head > 0 {
            let stored: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT hash FROM ledger WHERE seq = ?1",
                    [i64::try_from(head).unwrap_or(i64::MAX)],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            if stored.as_deref() != Some(&head_hash[..]) {
                return Err(broken(
                    head,
                    "the entry verified last was changed or removed since",
                ));
            }
        }
        let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE seq > ?1 ORDER BY seq"))?;
        let mut rows = stmt.query([i64::try_from(head).unwrap_or(i64::MAX)])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            let entry = to_entry(raw(row)?)
                .map_err(|(seq, p)| broken(u64::try_from(seq).unwrap_or(0), p))?;
            self.entry(entry)?;
            n += 1;
        }
        self.settle()?;
        Ok(n)
    }
}

/// Recomputes the chain of the database at `path` and names the first
/// broken sequence number. Checkpoints are NOT authenticated: this proves
/// nothing against someone who can rewrite the whole file; use
/// [`verify_history`] with a trusted key for that.
pub fn verify_chain(path: &Path) -> Result<VerifyReport, VerifyError> {
    let conn = open_read_only(path)?;
    let mut w = Walker::new(None);
    w.walk(&conn)?;
    Ok(w.conclude(&Expectations::default())?.chain)
}

/// Verifies the history of the database at `path`: the chain, every
/// checkpoint against `trusted` (never a key found in the database), the
/// run rule, and what `expect` knows from outside the database.
pub fn verify_history(
    path: &Path,
    trusted: &TrustedKey,
    expect: &Expectations,
) -> Result<HistoryReport, VerifyError> {
    let conn = open_read_only(path)?;
    verify_history_conn(&conn, trusted, expect).map(|(r, _)| r)
}

/// [`verify_history`] on an open connection; also returns the walker, to
/// go on verifying from the head.
pub fn verify_history_conn(
    conn: &Connection,
    trusted: &TrustedKey,
    expect: &Expectations,
) -> Result<(HistoryReport, Walker), VerifyError> {
    let mut w = Walker::new(Some(trusted.clone()));
    if let Some(m) = &expect.mark {
        w.watch(m.size);
    }
    w.walk(conn)?;
    let report = w.conclude(expect)?;
    Ok((report, w))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ed25519_dalek::Signer as _;

    use super::*;
    use crate::ledger::{Ledger, LedgerOptions};
    use crate::types::PublicKey;

    fn key(seed: u8) -> (ed25519_dalek::SigningKey, String) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let pk = PublicKey(sk.verifying_key().to_bytes());
        let vkey = checkpoint::verifier_key(checkpoint::AUDIT_KEY, &pk);
        (sk, vkey)
    }

    /// A checkpoint payload over `hashes`, signed by `sk`.
    fn checkpoint_payload(sk: &ed25519_dalek::SigningKey, hashes: &[Hash]) -> Vec<u8> {
        let mut f = Frontier::default();
        for h in hashes {
            f.push(leaf_hash(h));
        }
        let pk = PublicKey(sk.verifying_key().to_bytes());
        let body = checkpoint::body("keyward/test", f.size(), &f.root());
        let note = checkpoint::note(
            &body,
            checkpoint::AUDIT_KEY,
            &pk,
            &sk.sign(body.as_bytes()).to_bytes(),
        );
        serde_json::to_vec(&CheckpointRecord {
            origin: "keyward/test".into(),
            size: f.size(),
            root: hex::encode(f.root()),
            note,
            key: checkpoint::AUDIT_KEY.into(),
            public_key: pk.to_base58(),
            verifier_key: checkpoint::verifier_key(checkpoint::AUDIT_KEY, &pk),
        })
        .unwrap()
    }

    /// A ledger: daemon_started, then (optionally) a checkpoint over it by
    /// `signer`, then one agent entry.
    fn ledger(
        signer: Option<&ed25519_dalek::SigningKey>,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        let start = l
            .write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}"))
            .unwrap();
        if let Some(sk) = signer {
            let payload = checkpoint_payload(sk, &[start.hash]);
            l.write_blocking(move |t| t.append(EventType::Checkpoint, None, None, &payload))
                .unwrap();
        }
        l.write_blocking(|t| t.append(EventType::IntentReceived, Some("i"), Some("a"), b"{}"))
            .unwrap();
        l.close_blocking().unwrap();
        (dir, path)
    }

    fn broken_at(r: Result<HistoryReport, VerifyError>) -> (u64, String) {
        match r {
            Err(VerifyError::Broken { seq, problem }) => (seq, problem),
            other => panic!("expected a finding, got {other:?}"),
        }
    }

    #[test]
    fn a_start_covered_by_a_trusted_checkpoint_verifies() {
        let (sk, vkey) = key(1);
        let (_d, path) = ledger(Some(&sk));
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let r = verify_history(&path, &trusted, &Expectations::default()).unwrap();
        assert_eq!((r.chain.entries, r.checkpoints, r.checkpointed), (3, 1, 1));
        assert_eq!(r.uncovered(), 2);
    }

    #[test]
    fn an_agent_entry_after_an_uncovered_start_is_a_finding() {
        let (_, vkey) = key(1);
        let (_d, path) = ledger(None);
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let (seq, problem) = broken_at(verify_history(&path, &trusted, &Expectations::default()));
        assert_eq!(seq, 2);
        assert!(
            problem.contains("covers the daemon start at seq 1"),
            "{problem}"
        );
        // The chain alone is fine.
        assert_eq!(verify_chain(&path).unwrap().entries, 2);
    }

    /// One step of a made-up ledger.
    enum Step {
        Entry(EventType, Option<&'static str>, Option<&'static str>),
        /// A checkpoint over the first n entries, signed by the key.
        Checkpoint(usize),
    }

    fn build(
        sk: &ed25519_dalek::SigningKey,
        steps: &[Step],
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        let mut hashes = Vec::new();
        for step in steps {
            let e = match step {
                Step::Entry(ev, intent, agent) => {
                    let (ev, intent, agent) = (*ev, *intent, *agent);
                    l.write_blocking(move |t| t.append(ev, intent, agent, b"{}"))
                        .unwrap()
                }
                Step::Checkpoint(n) => {
                    let payload = checkpoint_payload(sk, &hashes[..*n]);
                    l.write_blocking(move |t| t.append(EventType::Checkpoint, None, None, &payload))
                        .unwrap()
                }
            };
            hashes.push(e.hash);
        }
        l.close_blocking().unwrap();
        (dir, path)
    }

    #[test]
    fn an_agents_entry_without_an_intent_is_held_to_the_run_rule_too() {
        // A breaker reset by cooldown names the agent but no intent.
        let (sk, vkey) = key(1);
        let (_d, path) = build(
            &sk,
            &[
                Step::Entry(EventType::DaemonStarted, None, None),
                Step::Entry(EventType::BreakerReset, None, Some("a")),
            ],
        );
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let (seq, _) = broken_at(verify_history(&path, &trusted, &Expectations::default()));
        assert_eq!(seq, 2);
    }

    #[test]
    fn a_note_signed_over_another_root_or_size_is_a_finding() {
        let (sk, vkey) = key(1);
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let pk = PublicKey(sk.verifying_key().to_bytes());
        for (size, root) in [(1u64, [7u8; 32]), (2, [0u8; 32])] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("l.sqlite3");
            let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
            let start = l
                .write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}"))
                .unwrap();
            // The record states the true size and root of entry 1; its note,
            // signed by the trusted key, says something else.
            let mut rec: CheckpointRecord =
                serde_json::from_slice(&checkpoint_payload(&sk, &[start.hash])).unwrap();
            let true_root: Hash = hex::decode(&rec.root).unwrap().try_into().unwrap();
            let root = if size == 1 { root } else { true_root };
            let body = checkpoint::body("keyward/test", size, &root);
            rec.note = checkpoint::note(
                &body,
                checkpoint::AUDIT_KEY,
                &pk,
                &sk.sign(body.as_bytes()).to_bytes(),
            );
            let payload = serde_json::to_vec(&rec).unwrap();
            l.write_blocking(move |t| t.append(EventType::Checkpoint, None, None, &payload))
                .unwrap();
            l.close_blocking().unwrap();
            let (seq, problem) =
                broken_at(verify_history(&path, &trusted, &Expectations::default()));
            assert_eq!(seq, 2);
            assert!(problem.contains("another size or root"), "{problem}");
        }
    }

    #[test]
    fn a_checkpoint_that_covers_less_than_an_earlier_one_is_a_finding() {
        let (sk, vkey) = key(1);
        let (_d, path) = build(
            &sk,
            &[
                Step::Entry(EventType::DaemonStarted, None, None),
                Step::Entry(EventType::PolicyLoaded, None, None),
                Step::Checkpoint(2),
                Step::Checkpoint(1),
            ],
        );
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let (seq, problem) = broken_at(verify_history(&path, &trusted, &Expectations::default()));
        assert_eq!(seq, 4);
        assert!(problem.contains("never shrinks"), "{problem}");
    }

    #[test]
    fn a_checkpoint_by_another_key_is_a_finding_naming_both_keys() {
        let (forger, forged_vkey) = key(2);
        let (_, vkey) = key(1);
        let (_d, path) = ledger(Some(&forger));
        let trusted = TrustedKey::new(&vkey, "pinned.vkey").unwrap();
        let (seq, problem) = broken_at(verify_history(&path, &trusted, &Expectations::default()));
        assert_eq!(seq, 2);
        assert!(
            problem.contains(&forged_vkey) && problem.contains("pinned.vkey"),
            "{problem}"
        );
    }

    #[test]
    fn the_hsm_mark_and_the_mirror_must_be_contained() {
        let (sk, vkey) = key(1);
        let (_d, path) = ledger(Some(&sk));
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let conn = open_read_only(&path).unwrap();
        let payload: Vec<u8> = conn
            .query_row("SELECT payload FROM ledger WHERE seq = 2", [], |r| r.get(0))
            .unwrap();
        let rec: CheckpointRecord = serde_json::from_slice(&payload).unwrap();
        let good = Mark::of(&rec, 2);
        let ok = Expectations {
            mark: Some(good.clone()),
            mirror_acked: Some((3, "file".into())),
        };
        verify_history(&path, &trusted, &ok).unwrap();
        // A mark beyond the end: truncation.
        let mut longer = good.clone();
        longer.size = 5;
        let (seq, _) = broken_at(verify_history(
            &path,
            &trusted,
            &Expectations {
                mark: Some(longer),
                mirror_acked: None,
            },
        ));
        assert_eq!(seq, 4);
        // Another root at the mark's size: a rewrite.
        let mut other = good.clone();
        other.root = hex::encode([7u8; 32]);
        assert_eq!(
            broken_at(verify_history(
                &path,
                &trusted,
                &Expectations {
                    mark: Some(other),
                    mirror_acked: None
                },
            ))
            .0,
            1
        );
        // The mark's checkpoint entry is not where it should be.
        let mut moved = good;
        moved.seq = 3;
        assert_eq!(
            broken_at(verify_history(
                &path,
                &trusted,
                &Expectations {
                    mark: Some(moved),
                    mirror_acked: None
                },
            ))
            .0,
            3
        );
        // The mirror acknowledged more than there is.
        let (seq, problem) = broken_at(verify_history(
            &path,
            &trusted,
            &Expectations {
                mark: None,
                mirror_acked: Some((9, "nats".into())),
            },
        ));
        assert_eq!(seq, 4);
        assert!(problem.contains("nats"), "{problem}");
    }

    #[test]
    fn marks_are_verified_and_the_newest_wins() {
        let (sk, vkey) = key(1);
        let (forger, _) = key(2);
        let mark = |sk: &ed25519_dalek::SigningKey, n: usize| {
            let hashes: Vec<Hash> = (0..n).map(|i| [i as u8; 32]).collect();
            let rec: CheckpointRecord =
                serde_json::from_slice(&checkpoint_payload(sk, &hashes)).unwrap();
            Mark::of(&rec, n as u64 + 1).encode()
        };
        let newest = Mark::newest(&[mark(&sk, 3), mark(&sk, 5)], &vkey)
            .unwrap()
            .unwrap();
        assert_eq!(newest.size, 5);
        assert!(Mark::newest(&[mark(&forger, 3)], &vkey).is_err());
        assert!(Mark::newest(&[b"junk".to_vec()], &vkey).is_err());
        assert_eq!(Mark::newest(&[], &vkey).unwrap(), None);
    }

    #[test]
    fn the_tree_holds_only_subtrees_completed_after_the_newest_checkpoint() {
        let (sk, vkey) = key(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        let a = l
            .write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}"))
            .unwrap();
        let b = l
            .write_blocking(|t| t.append(EventType::PolicyLoaded, None, None, b"{}"))
            .unwrap();
        let payload = checkpoint_payload(&sk, &[a.hash, b.hash]);
        l.write_blocking(move |t| t.append(EventType::Checkpoint, None, None, &payload))
            .unwrap();
        l.write_blocking(|t| t.append(EventType::IntentReceived, Some("i"), Some("a"), b"{}"))
            .unwrap();
        l.close_blocking().unwrap();
        let conn = open_read_only(&path).unwrap();
        let trusted = TrustedKey::new(&vkey, "test").unwrap();
        let mut w = Walker::new(Some(trusted));
        assert_eq!(w.walk(&conn).unwrap(), 4, "entries verified");
        assert_eq!(w.walk(&conn).unwrap(), 0, "nothing new");
        // Leaves 1 and 2 made node (1, 0), stored with the checkpoint; leaves
        // 3 and 4 make (1, 1) and (2, 0), which the next checkpoint stores.
        let levels: Vec<(u32, u64)> = w.tree().1.iter().map(|(l, i, _)| (*l, *i)).collect();
        assert_eq!(levels, [(1, 1), (2, 0)]);
        w.nodes_stored();
        assert!(w.tree().1.is_empty());
    }

    #[test]
    fn a_pinned_key_file_skips_comments_and_refuses_garbage() {
        let (_, vkey) = key(1);
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("audit.vkey");
        std::fs::write(&good, TrustedKey::file_text(&vkey)).unwrap();
        let k = TrustedKey::from_file(&good).unwrap();
        assert_eq!(k.vkey(), vkey);
        assert_eq!(k.source(), good.display().to_string());
        let bad = dir.path().join("bad.vkey");
        std::fs::write(&bad, "# only a comment\nnot-a-key\n").unwrap();
        assert!(TrustedKey::from_file(&bad).is_err());
        assert!(TrustedKey::from_file(&dir.path().join("absent")).is_err());
    }
}
