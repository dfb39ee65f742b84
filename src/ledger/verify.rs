//! Offline reading and verification of a ledger database.

use std::io::Write;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::checkpoint::CheckpointRecord;
use super::events;
use super::{Entry, EventType, LedgerError};

/// Opens a ledger database read-only. A missing file is an error (never
/// created), and so is a database newer than this binary
/// (`ledger_schema_too_new`); nothing is migrated.
pub fn open_read_only(path: &Path) -> Result<Connection, LedgerError> {
    if !path.exists() {
        return Err(LedgerError::Open {
            path: path.display().to_string(),
            detail: "no such file".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| LedgerError::Open {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(super::writer::NO_TEMP_FILES)?;
    crate::schema::check_readable(&conn)?;
    Ok(conn)
}

/// A row as stored, before its hashes are known to be 32 bytes.
pub(super) struct RawRow {
    seq: i64,
    ts_ms: i64,
    event: String,
    intent_id: Option<String>,
    agent: Option<String>,
    payload: Vec<u8>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

pub(super) const SELECT: &str =
    "SELECT seq, ts_ms, event, intent_id, agent, payload, prev_hash, hash FROM ledger";

pub(super) fn raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        seq: r.get(0)?,
        ts_ms: r.get(1)?,
        event: r.get(2)?,
        intent_id: r.get(3)?,
        agent: r.get(4)?,
        payload: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

pub(super) fn to_entry(r: RawRow) -> Result<Entry, (i64, String)> {
    let seq = u64::try_from(r.seq).map_err(|_| (r.seq, "negative sequence number".to_owned()))?;
    let prev_hash: [u8; 32] = r
        .prev_hash
        .try_into()
        .map_err(|_| (r.seq, "prev_hash is not 32 bytes".to_owned()))?;
    let hash: [u8; 32] = r
        .hash
        .try_into()
        .map_err(|_| (r.seq, "hash is not 32 bytes".to_owned()))?;
    Ok(Entry {
        seq,
        ts_ms: r.ts_ms,
        event: r.event,
        intent_id: r.intent_id,
        agent: r.agent,
        payload: r.payload,
        prev_hash,
        hash,
    })
}

fn collect(rows: rusqlite::Rows<'_>) -> Result<Vec<Entry>, LedgerError> {
    let mut out = Vec::new();
    let mut rows = rows;
    while let Some(row) = rows.next()? {
        let entry = to_entry(raw(row)?)
            .map_err(|(seq, p)| LedgerError::Corrupt(format!("seq {seq}: {p}")))?;
        out.push(entry);
    }
    Ok(out)
}

/// Every entry of one intent, in order (optionally only `agent`'s).
pub fn trail(
    conn: &Connection,
    intent_id: &str,
    agent: Option<&str>,
) -> Result<Vec<Entry>, LedgerError> {
    let mut stmt = conn.prepare(&format!(
        "{SELECT} WHERE intent_id = ?1 AND (?2 IS NULL OR agent = ?2) ORDER BY seq"
    ))?;
    let rows = stmt.query(params![intent_id, agent])?;
    collect(rows)
}

/// Writes every entry from `since` on as JSON lines; returns the count.
pub fn export_jsonl(
    conn: &Connection,
    since: u64,
    out: &mut impl Write,
) -> Result<u64, LedgerError> {
    let since = i64::try_from(since).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&format!("{SELECT} WHERE seq >= ?1 ORDER BY seq"))?;
    let mut rows = stmt.query(params![since])?;
    let mut n = 0u64;
    while let Some(row) = rows.next()? {
        let entry = to_entry(raw(row)?)
            .map_err(|(seq, p)| LedgerError::Corrupt(format!("seq {seq}: {p}")))?;
        writeln!(out, "{}", entry.to_json_line()).map_err(|e| LedgerError::Open {
            path: "<output>".into(),
            detail: e.to_string(),
        })?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{EventType, Ledger, LedgerOptions};

    fn ledger_with(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        for i in 0..n {
            let id = format!("i{i}");
            l.write_blocking(move |t| {
                t.append(
                    EventType::IntentReceived,
                    Some(&id),
                    Some("a"),
                    b"{\"n\":1}",
                )
            })
            .unwrap();
        }
        l.close_blocking().unwrap();
        (dir, path)
    }

    fn tamper(path: &Path, sql: &str) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "DROP TRIGGER IF EXISTS ledger_no_update; DROP TRIGGER IF EXISTS ledger_no_delete;",
        )
        .unwrap();
        c.execute_batch(sql).unwrap();
    }

    fn broken_at(path: &Path) -> (u64, String) {
        match crate::ledger::verify_chain(path) {
            Err(crate::ledger::VerifyError::Broken { seq, problem }) => (seq, problem),
            other => panic!("expected a finding, got {other:?}"),
        }
    }

    #[test]
    fn payloads_are_read_back_through_their_event_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        l.write_blocking(|t| {
            t.record(None, None, &crate::ledger::events::DaemonStopped { pid: 7 })?;
            // Written as a raw payload: not the document of its type.
            t.append(
                EventType::SignatureCreated,
                Some("i"),
                Some("a"),
                b"{\"n\":1}",
            )?;
            t.append(EventType::DaemonStopped, None, None, b"{\"pid\":8}")
        })
        .unwrap();
        l.close_blocking().unwrap();
        let conn = open_read_only(&path).unwrap();
        let findings = payload_findings(&conn).unwrap();
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(
            (findings[0].seq, findings[0].event.as_str()),
            (2, "signature_created")
        );
        assert!(findings[0].problem.contains("signature"), "{findings:?}");
    }

    #[test]
    fn there_is_no_proof_for_entry_zero_or_beyond_the_checkpoint() {
        let (_d, path) = ledger_with(3);
        let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        l.write_blocking(|t| {
            t.record(
                None,
                None,
                &crate::ledger::checkpoint::CheckpointRecord {
                    origin: "test".into(),
                    size: 3,
                    root: "00".repeat(32),
                    note: String::new(),
                    key: "audit".into(),
                    public_key: String::new(),
                    verifier_key: String::new(),
                },
            )
        })
        .unwrap();
        l.close_blocking().unwrap();
        let conn = open_read_only(&path).unwrap();
        assert!(prove(&conn, 0).unwrap().is_none(), "entry 0 does not exist");
        assert!(prove(&conn, 4).unwrap().is_none(), "not covered yet");
        let p = prove(&conn, 2).unwrap().unwrap();
        assert_eq!((p.seq, p.leaf_index, p.tree_size), (2, 1, 3));
    }

    /// A proof whose root is not the signed checkpoint's is refused even
    /// when its size is, and its path leads to the root it claims.
    #[test]
    fn a_proof_under_a_root_the_checkpoint_did_not_sign_is_refused() {
        use crate::ledger::checkpoint::{AUDIT_KEY, body, note, verifier_key};
        use crate::ledger::merkle::leaf_hash;
        use ed25519_dalek::Signer as _;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let pk = crate::types::PublicKey(sk.verifying_key().to_bytes());
        let vkey = verifier_key(AUDIT_KEY, &pk);
        let signed_entry = [1u8; 32];
        let root = leaf_hash(&signed_entry);
        let text = body("test", 1, &root);
        let sig = sk.sign(text.as_bytes()).to_bytes();
        let proof = |entry: [u8; 32]| InclusionProof {
            seq: 1,
            leaf_index: 0,
            entry_hash: hex::encode(entry),
            tree_size: 1,
            root: hex::encode(leaf_hash(&entry)),
            proof: Vec::new(),
            checkpoint: note(&text, AUDIT_KEY, &pk, &sig),
            verifier_key: vkey.clone(),
        };
        assert_eq!(verify_proof(&proof(signed_entry), &vkey), Ok(()));
        let forged = verify_proof(&proof([2; 32]), &vkey).unwrap_err();
        assert!(forged.contains("not the signed checkpoint's"), "{forged}");
    }

    #[test]
    fn untouched_ledger_verifies() {
        let (_d, path) = ledger_with(5);
        let r = crate::ledger::verify_chain(&path).unwrap();
        assert_eq!((r.entries, r.head_seq), (5, 5));
    }

    #[test]
    fn empty_ledger_verifies_and_missing_file_is_not_a_finding() {
        let (d, path) = ledger_with(0);
        assert_eq!(crate::ledger::verify_chain(&path).unwrap().entries, 0);
        let e = crate::ledger::verify_chain(&d.path().join("nope")).unwrap_err();
        assert!(!e.is_finding());
    }

    #[test]
    fn edited_payload_is_named() {
        let (_d, path) = ledger_with(5);
        tamper(
            &path,
            "UPDATE ledger SET payload = X'7B226E223A327D' WHERE seq = 3",
        );
        let (seq, problem) = broken_at(&path);
        assert_eq!(seq, 3);
        assert!(problem.contains("content"), "{problem}");
    }

    #[test]
    fn edited_last_payload_is_named() {
        let (_d, path) = ledger_with(5);
        tamper(&path, "UPDATE ledger SET agent = 'b' WHERE seq = 5");
        assert_eq!(broken_at(&path).0, 5);
    }

    #[test]
    fn deleted_row_is_named() {
        let (_d, path) = ledger_with(5);
        tamper(&path, "DELETE FROM ledger WHERE seq = 2");
        let (seq, problem) = broken_at(&path);
        assert_eq!(seq, 2);
        assert!(problem.contains("missing"), "{problem}");
    }

    #[test]
    fn swapped_rows_are_named() {
        let (_d, path) = ledger_with(5);
        tamper(
            &path,
            "UPDATE ledger SET seq = -1 WHERE seq = 2; UPDATE ledger SET seq = 2 WHERE seq = 4; UPDATE ledger SET seq = 4 WHERE seq = -1;",
        );
        assert_eq!(broken_at(&path).0, 2);
    }

    #[test]
    fn changed_hash_is_named() {
        let (_d, path) = ledger_with(5);
        tamper(&path, "UPDATE ledger SET hash = zeroblob(32) WHERE seq = 4");
        let (seq, problem) = broken_at(&path);
        assert_eq!(seq, 4);
        assert!(problem.contains("stored hash"), "{problem}");
    }

    #[test]
    fn changed_link_is_named() {
        let (_d, path) = ledger_with(5);
        tamper(
            &path,
            "UPDATE ledger SET prev_hash = zeroblob(32) WHERE seq = 3",
        );
        assert_eq!(broken_at(&path).0, 3);
    }

    #[test]
    fn export_and_trail() {
        let (_d, path) = ledger_with(3);
        let c = open_read_only(&path).unwrap();
        let mut out = Vec::new();
        assert_eq!(export_jsonl(&c, 2, &mut out).unwrap(), 2);
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["seq"], 2);
        assert_eq!(lines[0]["payload"]["n"], 1);
        assert_eq!(lines[1]["event"], "intent_received");
        let t = trail(&c, "i1", None).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].seq, 2);
        assert!(trail(&c, "i1", Some("other")).unwrap().is_empty());
    }
}

/// An inclusion proof of one entry under a signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InclusionProof {
    /// The entry's sequence number.
    pub seq: u64,
    /// Its leaf index (seq − 1).
    pub leaf_index: u64,
    /// The entry's hash (hex); the leaf is SHA-256(0x00 ‖ entry hash).
    pub entry_hash: String,
    /// Size of the checkpointed tree.
    pub tree_size: u64,
    /// Its root (hex).
    pub root: String,
    /// Audit path (hex hashes), RFC 9162 order.
    pub proof: Vec<String>,
    /// The signed checkpoint note.
    pub checkpoint: String,
    /// The verifier key the note is signed with (check it against the one
    /// you trust, e.g. from `keyward key list`).
    pub verifier_key: String,
}

/// Proves entry `seq` is in the tree of the latest checkpoint that covers
/// it. `Ok(None)` when no checkpoint covers it yet.
pub fn prove(conn: &Connection, seq: u64) -> Result<Option<InclusionProof>, LedgerError> {
    let cp: Option<Vec<u8>> = conn
        .prepare("SELECT payload FROM ledger WHERE event = 'checkpoint' ORDER BY seq DESC")?
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .filter_map(Result::ok)
        .find(|p| {
            events::decode::<CheckpointRecord>(EventType::Checkpoint.as_str(), p)
                .is_ok_and(|r| r.size >= seq)
        });
    let Some(cp) = cp else { return Ok(None) };
    let record = events::decode::<CheckpointRecord>(EventType::Checkpoint.as_str(), &cp)
        .map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    let size = record.size;
    if seq == 0 || seq > size {
        return Ok(None);
    }
    let hash_at = |s: u64| -> Result<[u8; 32], LedgerError> {
        let h: Vec<u8> = conn
            .prepare_cached("SELECT hash FROM ledger WHERE seq = ?1")?
            .query_row([i64::try_from(s).unwrap_or(i64::MAX)], |r| r.get(0))?;
        <[u8; 32]>::try_from(h.as_slice())
            .map_err(|_| LedgerError::Corrupt(format!("entry {s}: hash of the wrong length")))
    };
    // Perfect subtrees from the stored nodes (written with each
    // checkpoint); a missing one is computed from its leaves.
    let mut perfect = |level: u32, idx: u64| -> Result<[u8; 32], LedgerError> {
        if level == 0 {
            return Ok(super::merkle::leaf_hash(&hash_at(idx + 1)?));
        }
        let stored: Option<Vec<u8>> = conn
            .prepare_cached("SELECT hash FROM merkle_nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(
                rusqlite::params![level, i64::try_from(idx).unwrap_or(i64::MAX)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(h) = stored.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()) {
            return Ok(h);
        }
        let width = 1u64 << level;
        let leaves = (idx * width..(idx + 1) * width)
            .map(|i| hash_at(i + 1).map(|h| super::merkle::leaf_hash(&h)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(super::merkle::root(&leaves))
    };
    let Some(path) = super::merkle::inclusion_proof_with(seq - 1, size, &mut perfect)? else {
        return Ok(None);
    };
    let root = super::merkle::subtree_root(0, size, &mut perfect)?;
    let entry_hash = hash_at(seq)?;
    Ok(Some(InclusionProof {
        seq,
        leaf_index: seq - 1,
        entry_hash: hex::encode(entry_hash),
        tree_size: size,
        root: hex::encode(root),
        proof: path.iter().map(hex::encode).collect(),
        checkpoint: record.note,
        verifier_key: record.verifier_key,
    }))
}

/// Verifies an inclusion proof offline with a trusted verifier key: the
/// note's signature, that it names the proof's size and root, and the
/// audit path from the entry to that root.
pub fn verify_proof(p: &InclusionProof, trusted_vkey: &str) -> Result<(), String> {
    let cp = super::checkpoint::verify(&p.checkpoint, trusted_vkey)?;
    if cp.size != p.tree_size || hex::encode(cp.root) != p.root {
        return Err("the proof's size or root is not the signed checkpoint's".into());
    }
    let hex32 = |s: &str| -> Result<[u8; 32], String> {
        hex::decode(s)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| format!("{s:?} is not a 32-byte hex hash"))
    };
    let entry = hex32(&p.entry_hash)?;
    let path = p
        .proof
        .iter()
        .map(|h| hex32(h))
        .collect::<Result<Vec<_>, _>>()?;
    if p.leaf_index + 1 != p.seq {
        return Err("leaf index and sequence number disagree".into());
    }
    if super::merkle::verify_inclusion(
        &super::merkle::leaf_hash(&entry),
        p.leaf_index,
        p.tree_size,
        &path,
        &cp.root,
    ) {
        Ok(())
    } else {
        Err("the audit path does not lead from the entry to the checkpoint's root".into())
    }
}

/// Up to `max` entries after sequence number `after`, in order.
pub fn entries_after(conn: &Connection, after: u64, max: usize) -> Result<Vec<Entry>, LedgerError> {
    let mut stmt = conn.prepare(&format!("{SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
    let rows = stmt.query(params![
        i64::try_from(after).unwrap_or(i64::MAX),
        i64::try_from(max).unwrap_or(i64::MAX)
    ])?;
    collect(rows)
}

/// An entry whose payload does not read as the document of its event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFinding {
    /// The entry.
    pub seq: u64,
    /// Its event name.
    pub event: String,
    /// What does not read.
    pub problem: String,
}

/// Reads every entry's payload back through the typed documents of
/// [`events`]: the entries whose payload is not the document of their type
/// (or whose type this release does not know). The hash chain proves the
/// bytes were not changed; this proves they say what the format says.
pub fn payload_findings(conn: &Connection) -> Result<Vec<PayloadFinding>, LedgerError> {
    let mut stmt = conn.prepare("SELECT seq, event, payload FROM ledger ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let mut findings = Vec::new();
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let event: String = row.get(1)?;
        let payload: Vec<u8> = row.get(2)?;
        let problem = match events::check_payload(&event, &payload) {
            // A rotation's statement must verify with both keys it names.
            Ok(true) if event == EventType::KeyRotated.as_str() => {
                match events::decode::<events::KeyRotated>(&event, &payload)
                    .map_err(|e| e.to_string())
                    .and_then(|r| super::registry::verify_rotation(&r))
                {
                    Ok(()) => continue,
                    Err(e) => format!("key rotation: {e}"),
                }
            }
            Ok(true) => continue,
            Ok(false) => "an event type this release does not know".to_owned(),
            Err(e) => e.to_string(),
        };
        findings.push(PayloadFinding {
            seq: u64::try_from(seq).unwrap_or(0),
            event,
            problem,
        });
    }
    Ok(findings)
}

/// The latest `checkpoint` entry, if any (one that does not decode is
/// corrupt and an error).
pub fn latest_checkpoint(conn: &Connection) -> Result<Option<CheckpointRecord>, LedgerError> {
    let payload: Option<Vec<u8>> = conn
        .query_row(
            "SELECT payload FROM ledger WHERE event = 'checkpoint' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    payload
        .map(|p| {
            events::decode::<CheckpointRecord>(EventType::Checkpoint.as_str(), &p)
                .map_err(|e| LedgerError::Corrupt(e.to_string()))
        })
        .transpose()
}
