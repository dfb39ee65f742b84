//! Intent records: what each `(agent, intent_id)` was and what it got, so a
//! repeated submission returns the original result without signing or
//! counting again, and a reused id with other content is refused.

use keyward_client::wire::ApprovalRequest;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};

/// Where an intent stands. Transitions (all in this module):
///
/// ```text
/// (new) ──► InProgress ──► Signed
///   │           └────────► (forgotten: signing failed or was interrupted)
///   ├─► Denied
///   └─► PendingApproval ──► InProgress (quorum) | Denied (rejected, or
///                           denied when decided again) | Expired
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntentStatus {
    /// Admitted and being signed right now.
    InProgress,
    /// Signed; the signature was recorded before it was released.
    Signed,
    /// Refused (policy, a rejection, a locked agent at the quorum).
    Denied,
    /// Waiting for approval tokens.
    PendingApproval,
    /// The approval window ran out.
    Expired,
}

impl IntentStatus {
    /// Every status.
    pub const ALL: [IntentStatus; 5] = [
        IntentStatus::InProgress,
        IntentStatus::Signed,
        IntentStatus::Denied,
        IntentStatus::PendingApproval,
        IntentStatus::Expired,
    ];

    /// The name stored in the `intents` table.
    pub fn as_str(self) -> &'static str {
        match self {
            IntentStatus::InProgress => "in_progress",
            IntentStatus::Signed => "signed",
            IntentStatus::Denied => "denied",
            IntentStatus::PendingApproval => "pending_approval",
            IntentStatus::Expired => "expired",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<IntentStatus> {
        IntentStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The status as the agent API reports it.
    pub fn wire(self) -> keyward_client::wire::IntentStatus {
        use keyward_client::wire::IntentStatus as W;
        match self {
            IntentStatus::InProgress => W::InProgress,
            IntentStatus::Signed => W::Signed,
            IntentStatus::Denied => W::Denied,
            IntentStatus::PendingApproval => W::PendingApproval,
            IntentStatus::Expired => W::Expired,
        }
    }
}

impl std::fmt::Display for IntentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for IntentStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for IntentStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        IntentStatus::parse(s)
            .ok_or_else(|| FromSqlError::Other(format!("unknown intent status {s:?}").into()))
    }
}

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
    /// The approval request as built when the intent was submitted.
    pub approval: ApprovalRequest,
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
    .execute(params![
        agent,
        intent_id,
        p.key,
        p.message,
        &p.intent_hash[..],
        serde_json::to_string(&p.approval).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
        p.expires_ms
    ])?;
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
            approval: serde_json::from_str(&r.get::<_, String>(3)?).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e))
            })?,
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
    /// Where it stands.
    pub status: IntentStatus,
    /// The stored reply (JSON) of a decided or pending intent: what a
    /// repeated submission gets again.
    pub response: Option<Vec<u8>>,
}

/// Looks an intent up.
pub fn get(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
) -> rusqlite::Result<Option<IntentRecord>> {
    conn.prepare_cached(
        "SELECT content_hash, status, response FROM intents WHERE agent = ?1 AND intent_id = ?2",
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
            response: r.get(2)?,
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
    /// Its first status.
    pub status: IntentStatus,
    /// The reply body, when the intent is already decided or pending.
    pub reply: Option<&'a [u8]>,
    /// Sequence number of its `intent_received` entry.
    pub received_seq: u64,
    /// Now.
    pub now_ms: i64,
}

/// The stored JSON of a reply (what a repeated submission gets again).
pub fn reply_json(reply: &impl serde::Serialize) -> rusqlite::Result<Vec<u8>> {
    serde_json::to_vec(reply).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Records a new intent.
pub fn insert(conn: &Connection, n: &NewIntent<'_>) -> rusqlite::Result<()> {
    // `http_status` is no longer written: the reply's status follows from
    // the intent's (the API maps it); the column stays for old databases.
    conn.prepare_cached(
        "INSERT INTO intents (agent, intent_id, content_hash, status, response, received_seq, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        n.agent,
        n.intent_id,
        &n.content_hash[..],
        n.status,
        n.reply,
        i64::try_from(n.received_seq).unwrap_or(i64::MAX),
        n.now_ms
    ])?;
    Ok(())
}

/// The reply body of an intent ended with an error `code`.
pub fn error_reply(code: &str, message: impl Into<String>) -> rusqlite::Result<Vec<u8>> {
    reply_json(&keyward_client::wire::ErrorBody {
        error: keyward_client::wire::ErrorDetail {
            code: code.to_owned(),
            message: message.into(),
            reasons: Vec::new(),
            retry_after: None,
        },
    })
}

/// Stores the final result of an intent: `Signed`, `Denied` or `Expired`
/// with the reply a repeated submission gets. The pending part of an
/// intent that waited for approvals stays for the views (an expired
/// intent still shows its request).
pub fn finish(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
    status: IntentStatus,
    response: &[u8],
    now_ms: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE intents SET status = ?3, http_status = NULL, response = ?4, updated_ms = ?5 WHERE agent = ?1 AND intent_id = ?2",
    )?
    .execute(params![agent, intent_id, status, response, now_ms])
}

/// A pending intent whose quorum was reached becomes `in_progress`
/// (being signed).
pub fn start_signing(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE intents SET status = ?3, updated_ms = ?4 WHERE agent = ?1 AND intent_id = ?2 AND status = ?5",
    )?
    .execute(params![
        agent,
        intent_id,
        IntentStatus::InProgress,
        now_ms,
        IntentStatus::PendingApproval
    ])
}

/// Forgets an intent whose signing failed or was interrupted before
/// anything was released (its record and its pending part), so the agent
/// may submit it again.
pub fn forget(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM pending_approvals WHERE agent = ?1 AND intent_id = ?2 AND EXISTS
         (SELECT 1 FROM intents WHERE agent = ?1 AND intent_id = ?2 AND status = ?3)",
    )?
    .execute(params![agent, intent_id, IntentStatus::InProgress])?;
    conn.prepare_cached("DELETE FROM intents WHERE agent = ?1 AND intent_id = ?2 AND status = ?3")?
        .execute(params![agent, intent_id, IntentStatus::InProgress])
}

/// Every intent left `in_progress` (agent, intent_id).
pub fn in_progress(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached("SELECT agent, intent_id FROM intents WHERE status = ?1")?;
    let rows = stmt.query_map([IntentStatus::InProgress], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            intent_hash: "00".into(),
            key: "hot".into(),
            public_key: "11111111111111111111111111111111".into(),
            message: "AQ==".into(),
            required: 2,
            received: 0,
            approvers: vec!["alice".into()],
            expires_at: "2026-01-01T00:00:00Z".into(),
            summary: "s".into(),
            because: Vec::new(),
        }
    }

    fn add(c: &Connection, id: &str, status: IntentStatus) {
        insert(
            c,
            &NewIntent {
                agent: "a",
                intent_id: id,
                content_hash: &[1; 32],
                status,
                reply: None,
                received_seq: 1,
                now_ms: 1,
            },
        )
        .unwrap();
        let p = Pending {
            key: "hot".into(),
            message: vec![1],
            intent_hash: [2; 32],
            approval: request(),
            expires_ms: 10,
        };
        insert_pending(c, "a", id, &p).unwrap();
    }

    #[test]
    fn every_status_is_stored_and_read_back_by_its_name() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        for (i, s) in IntentStatus::ALL.into_iter().enumerate() {
            add(&c, &format!("i{i}"), s);
            assert_eq!(get(&c, "a", &format!("i{i}")).unwrap().unwrap().status, s);
            assert_eq!(IntentStatus::parse(s.as_str()), Some(s));
        }
        // The table's CHECK constraint and the enum agree.
        assert!(c.execute(
            "INSERT INTO intents (agent, intent_id, content_hash, status, received_seq, updated_ms) VALUES ('a', 'x', x'00', 'bogus', 1, 1)",
            [],
        ).is_err());
    }

    #[test]
    fn forgetting_removes_an_interrupted_intent_and_its_pending_part_only() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        add(&c, "run", IntentStatus::PendingApproval);
        assert_eq!(start_signing(&c, "a", "run", 2).unwrap(), 1);
        add(&c, "wait", IntentStatus::PendingApproval);
        assert_eq!(forget(&c, "a", "run").unwrap(), 1);
        assert_eq!(forget(&c, "a", "wait").unwrap(), 0);
        assert!(get(&c, "a", "run").unwrap().is_none());
        assert!(pending(&c, "a", "run").unwrap().is_none());
        // A pending intent is not forgotten, nor its request.
        assert_eq!(
            get(&c, "a", "wait").unwrap().unwrap().status,
            IntentStatus::PendingApproval
        );
        assert_eq!(
            pending(&c, "a", "wait").unwrap().unwrap().approval,
            request()
        );
    }

    #[test]
    fn only_a_pending_intent_starts_signing() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        add(&c, "d", IntentStatus::Denied);
        assert_eq!(start_signing(&c, "a", "d", 2).unwrap(), 0);
        assert_eq!(
            get(&c, "a", "d").unwrap().unwrap().status,
            IntentStatus::Denied
        );
    }
}
