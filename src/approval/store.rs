//! Approver registry, used nonces and granted approvals, in the ledger
//! database (changed in the same transactions as their ledger entries).

use rusqlite::{Connection, OptionalExtension, params};

// Tables `approvers`, `approval_nonces` and `approvals`: created and
// migrated by `crate::schema`.

/// An enrolled approver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApproverRecord {
    /// Name.
    pub name: String,
    /// When enrolled (Unix ms).
    pub added_ms: i64,
    /// When removed, if removed.
    pub removed_ms: Option<i64>,
}

/// Looks an approver up.
pub fn approver(conn: &Connection, name: &str) -> rusqlite::Result<Option<ApproverRecord>> {
    conn.prepare_cached("SELECT name, added_ms, removed_ms FROM approvers WHERE name = ?1")?
        .query_row(params![name], |r| {
            Ok(ApproverRecord {
                name: r.get(0)?,
                added_ms: r.get(1)?,
                removed_ms: r.get(2)?,
            })
        })
        .optional()
}

/// Every approver, enrolled or removed.
pub fn approvers(conn: &Connection) -> rusqlite::Result<Vec<ApproverRecord>> {
    let mut stmt =
        conn.prepare_cached("SELECT name, added_ms, removed_ms FROM approvers ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok(ApproverRecord {
            name: r.get(0)?,
            added_ms: r.get(1)?,
            removed_ms: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Enrolls an approver (a removed name cannot come back: its tokens must
/// never count again).
pub fn add_approver(conn: &Connection, name: &str, now_ms: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO approvers (name, added_ms) VALUES (?1, ?2)")?
        .execute(params![name, now_ms])?;
    Ok(())
}

/// Marks an approver removed; `false` if there was no active one.
pub fn remove_approver(conn: &Connection, name: &str, now_ms: i64) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached(
            "UPDATE approvers SET removed_ms = ?2 WHERE name = ?1 AND removed_ms IS NULL",
        )?
        .execute(params![name, now_ms])?
        == 1)
}

/// Whether a nonce was used.
pub fn nonce_used(conn: &Connection, nonce: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM approval_nonces WHERE nonce = ?1")?
        .query_row(params![nonce], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records a nonce as used.
pub fn use_nonce(
    conn: &Connection,
    nonce: &str,
    approver: &str,
    agent: &str,
    intent_id: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO approval_nonces (nonce, approver, agent, intent_id, used_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![nonce, approver, agent, intent_id, now_ms])?;
    Ok(())
}

/// Approvers who approved an intent so far.
pub fn granted(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT approver FROM approvals WHERE agent = ?1 AND intent_id = ?2 AND decision = 'approve' ORDER BY ts_ms",
    )?;
    let rows = stmt.query_map(params![agent, intent_id], |r| r.get(0))?;
    rows.collect()
}

/// Every decision recorded on an intent so far: (approver, `approve` or
/// `reject`, Unix ms), oldest first.
pub fn decisions(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
) -> rusqlite::Result<Vec<(String, String, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT approver, decision, ts_ms FROM approvals WHERE agent = ?1 AND intent_id = ?2 ORDER BY ts_ms, approver",
    )?;
    let rows = stmt.query_map(params![agent, intent_id], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

/// Forgets the approvals of an intent whose signing was interrupted
/// (nothing was released); the ledger keeps their history and the used
/// nonces stay used. The agent may submit it again, and it needs a new
/// round of approvals. (The intent's own record and pending part are
/// `intents::forget`'s.)
pub fn forget_intent(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM approvals WHERE agent = ?1 AND intent_id = ?2")?
        .execute(params![agent, intent_id])?;
    Ok(())
}

/// Records an approver's decision on an intent.
pub fn record(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
    approver: &str,
    decision: &str,
    nonce: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO approvals (agent, intent_id, approver, decision, nonce, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![agent, intent_id, approver, decision, nonce, now_ms])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forgetting_an_interrupted_intent_clears_its_round_but_not_its_nonces() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        record(&c, "a", "i", "alice", "approve", "n1", 1).unwrap();
        use_nonce(&c, "n1", "alice", "a", "i", 1).unwrap();
        forget_intent(&c, "a", "i").unwrap();
        assert!(granted(&c, "a", "i").unwrap().is_empty());
        assert!(nonce_used(&c, "n1").unwrap(), "a used nonce stays used");
        // A new round can be recorded for the same intent id.
        record(&c, "a", "i", "alice", "approve", "n2", 2).unwrap();
    }
}
