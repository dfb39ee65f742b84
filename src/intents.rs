//! Intent records: what each `(agent, intent_id)` was and what it got, so a
//! repeated submission returns the original result without signing or
//! counting again, and a reused id with other content is refused.

use rusqlite::{Connection, OptionalExtension, params};

// Tables `intents` and `pending_approvals`: created and migrated by
// `crate::schema`.

/// An intent waiting for approvals: the exact message to sign and the
/// approval request shown to approvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Key name to sign with.
    pub key: String,
    /// The exact message bytes that approvals bind to.
    pub message: Vec<u8>,
    /// SHA-256 over the message and its derived effects.
    pub intent_hash: [u8; 32],
    /// The approval request (JSON object).
    pub approval: String,
    /// When the approval window ends (Unix ms).
    pub expires_ms: i64,
}

/// Records the pending part of an intent whose record says
/// `pending_approval`.
pub fn insert_pending(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
    p: &Pending,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO pending_approvals (agent, intent_id, key, message, intent_hash, approval, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![agent, intent_id, p.key, p.message, &p.intent_hash[..], p.approval, p.expires_ms])?;
    Ok(())
}

/// The pending part of an intent, if it has one.
pub fn pending(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
) -> rusqlite::Result<Option<Pending>> {
    conn.prepare_cached(
        "SELECT key, message, intent_hash, approval, expires_ms FROM pending_approvals WHERE agent = ?1 AND intent_id = ?2",
    )?
    .query_row(params![agent, intent_id], |r| {
        let hash: Vec<u8> = r.get(2)?;
        let mut intent_hash = [0u8; 32];
        if hash.len() == 32 {
            intent_hash.copy_from_slice(&hash);
        }
        Ok(Pending {
            key: r.get(0)?,
            message: r.get(1)?,
            intent_hash,
            approval: r.get(3)?,
            expires_ms: r.get(4)?,
        })
    })
    .optional()
}

/// The intents still `pending_approval` whose approvals bind to
/// `intent_hash`: (agent, intent_id).
pub fn pending_by_hash(
    conn: &Connection,
    intent_hash: &[u8; 32],
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.agent, p.intent_id FROM pending_approvals p
         JOIN intents i ON i.agent = p.agent AND i.intent_id = p.intent_id
         WHERE p.intent_hash = ?1 AND i.status = 'pending_approval'",
    )?;
    let rows = stmt.query_map(params![&intent_hash[..]], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Every intent still `pending_approval` whose window has not ended at
/// `now_ms`, oldest window end first: (agent, intent_id, pending part).
pub fn all_pending(
    conn: &Connection,
    now_ms: i64,
) -> rusqlite::Result<Vec<(String, String, Pending)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.agent, p.intent_id FROM pending_approvals p
         JOIN intents i ON i.agent = p.agent AND i.intent_id = p.intent_id
         WHERE p.expires_ms > ?1 AND i.status = 'pending_approval'
         ORDER BY p.expires_ms",
    )?;
    let ids: Vec<(String, String)> = stmt
        .query_map(params![now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for (agent, id) in ids {
        if let Some(p) = pending(conn, &agent, &id)? {
            out.push((agent, id, p));
        }
    }
    Ok(out)
}

/// Intents still `pending_approval` whose window ended at or before
/// `now_ms`: (agent, intent_id).
pub fn due_to_expire(conn: &Connection, now_ms: i64) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.agent, p.intent_id FROM pending_approvals p
         JOIN intents i ON i.agent = p.agent AND i.intent_id = p.intent_id
         WHERE p.expires_ms <= ?1 AND i.status = 'pending_approval'",
    )?;
    let rows = stmt.query_map(params![now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Stored state of an intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentRecord {
    /// SHA-256 of the intent's canonical content.
    pub content_hash: [u8; 32],
    /// `in_progress`, `signed` or `denied`.
    pub status: String,
    /// HTTP status of the stored response.
    pub http_status: Option<u16>,
    /// The stored response body (JSON).
    pub response: Option<Vec<u8>>,
}

/// Looks an intent up.
pub fn get(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
) -> rusqlite::Result<Option<IntentRecord>> {
    conn.prepare_cached(
        "SELECT content_hash, status, http_status, response FROM intents WHERE agent = ?1 AND intent_id = ?2",
    )?
    .query_row(params![agent, intent_id], |r| {
        let hash: Vec<u8> = r.get(0)?;
        let mut content_hash = [0u8; 32];
        if hash.len() == 32 {
            content_hash.copy_from_slice(&hash);
        }
        Ok(IntentRecord {
            content_hash,
            status: r.get(1)?,
            http_status: r.get::<_, Option<u16>>(2)?,
            response: r.get(3)?,
        })
    })
    .optional()
}

/// A new intent record.
#[derive(Debug, Clone, Copy)]
pub struct NewIntent<'a> {
    /// Agent name.
    pub agent: &'a str,
    /// The agent's intent id.
    pub intent_id: &'a str,
    /// SHA-256 of the intent's canonical content.
    pub content_hash: &'a [u8; 32],
    /// `in_progress`, `signed`, `denied` or `pending_approval`.
    pub status: &'a str,
    /// Final HTTP status and body, when the intent is already decided.
    pub reply: Option<(u16, &'a [u8])>,
    /// Sequence number of its `intent_received` entry.
    pub received_seq: u64,
    /// Now.
    pub now_ms: i64,
}

/// Records a new intent.
pub fn insert(conn: &Connection, n: &NewIntent<'_>) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO intents (agent, intent_id, content_hash, status, http_status, response, received_seq, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        n.agent,
        n.intent_id,
        &n.content_hash[..],
        n.status,
        n.reply.map(|r| r.0),
        n.reply.map(|r| r.1),
        i64::try_from(n.received_seq).unwrap_or(i64::MAX),
        n.now_ms
    ])?;
    Ok(())
}

/// Stores the final result of an intent.
pub fn finish(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
    status: &str,
    http_status: u16,
    response: &[u8],
    now_ms: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE intents SET status = ?3, http_status = ?4, response = ?5, updated_ms = ?6 WHERE agent = ?1 AND intent_id = ?2",
    )?
    .execute(params![agent, intent_id, status, http_status, response, now_ms])
}

/// Changes an intent's status (e.g. a pending intent whose quorum was
/// reached becomes `in_progress`).
pub fn set_status(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
    status: &str,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE intents SET status = ?3, updated_ms = ?4 WHERE agent = ?1 AND intent_id = ?2",
    )?
    .execute(params![agent, intent_id, status, now_ms])
}

/// Forgets an intent whose signing failed before anything was released, so
/// the agent may submit it again.
pub fn forget(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM intents WHERE agent = ?1 AND intent_id = ?2 AND status = 'in_progress'",
    )?
    .execute(params![agent, intent_id])
}

/// Every intent left `in_progress` (agent, intent_id).
pub fn in_progress(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt =
        conn.prepare_cached("SELECT agent, intent_id FROM intents WHERE status = 'in_progress'")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}
