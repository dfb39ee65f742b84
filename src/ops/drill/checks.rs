//! What the DR drill checks on a restored ledger besides its chain: the
//! spending counters against the entries, and the external mirror's copy
//! against the restored entries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::Connection;

/// What [`counters_match_ledger`] compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountersChecked {
    /// Spend rows of signed intents.
    pub spent: usize,
    /// Spend rows reserved by intents in progress.
    pub reserved: usize,
    /// Running totals checked.
    pub totals: usize,
}

type Ids = BTreeSet<(String, String)>;

fn ids(conn: &Connection, sql: &str) -> rusqlite::Result<Ids> {
    conn.prepare(sql)?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// Recomputes the spending counters of a ledger database from its entries
/// and compares: the spent rows are exactly the intents with a
/// `signature_created` entry, each SOL row is the lamports that entry says
/// it spends, the reserved rows are exactly the intents in progress, and
/// every running total is the sum of its rows still in the window.
pub fn counters_match_ledger(conn: &Connection) -> Result<CountersChecked, String> {
    let sql = |e: rusqlite::Error| format!("cannot read the restored ledger: {e}");
    let signed = ids(
        conn,
        "SELECT agent, intent_id FROM ledger WHERE event = 'signature_created' AND agent IS NOT NULL AND intent_id IS NOT NULL",
    )
    .map_err(sql)?;
    let spent = ids(
        conn,
        "SELECT DISTINCT agent, intent_id FROM spend WHERE state = 'spent'",
    )
    .map_err(sql)?;
    if let Some(x) = spent.difference(&signed).next() {
        return Err(format!(
            "spend row of intent {}/{} is counted as spent but the ledger has no signature for it",
            x.0, x.1
        ));
    }
    if let Some(x) = signed.difference(&spent).next() {
        return Err(format!(
            "intent {}/{} was signed but is not counted as spent",
            x.0, x.1
        ));
    }
    // SOL amounts: the row equals what signature_created says it spends.
    let mut stmt = conn
        .prepare(
            "SELECT s.agent, s.intent_id, s.amount, l.payload FROM spend s
             JOIN ledger l ON l.agent = s.agent AND l.intent_id = s.intent_id AND l.event = 'signature_created'
             WHERE s.asset = 'SOL' AND s.state = 'spent'",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })
        .map_err(sql)?;
    for row in rows {
        let (agent, intent, amount, payload) = row.map_err(sql)?;
        let created: crate::ledger::events::SignatureCreated = serde_json::from_slice(&payload)
            .map_err(|e| format!("signature_created of {agent}/{intent} is unreadable: {e}"))?;
        if u64::try_from(amount).ok() != Some(created.sol_spend_lamports) {
            return Err(format!(
                "intent {agent}/{intent}: {amount} lamports counted, the ledger says {}",
                created.sol_spend_lamports
            ));
        }
    }
    let reserved = ids(
        conn,
        "SELECT DISTINCT agent, intent_id FROM spend WHERE state = 'reserved'",
    )
    .map_err(sql)?;
    let in_progress = ids(
        conn,
        "SELECT agent, intent_id FROM intents WHERE status = 'in_progress'",
    )
    .map_err(sql)?;
    if reserved != in_progress {
        return Err(format!(
            "reserved spend rows ({}) are not the intents in progress ({})",
            reserved.len(),
            in_progress.len()
        ));
    }
    // Running totals: the sum of each agent's and asset's rows newer than
    // the point it expired through.
    let mut totals: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    let mut stmt = conn
        .prepare("SELECT agent, asset, total, expired_through_ms FROM spend_total")
        .map_err(sql)?;
    for t in stmt
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?))))
        .map_err(sql)?
    {
        let (k, v) = t.map_err(sql)?;
        totals.insert(k, v);
    }
    for ((agent, asset), (total, through)) in &totals {
        let sum: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(amount), 0) FROM spend WHERE agent = ?1 AND asset = ?2 AND ts_ms > ?3",
                rusqlite::params![agent, asset, through],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if sum != *total {
            return Err(format!(
                "the running total of {agent}/{asset} is {total} but its rows sum to {sum}"
            ));
        }
    }
    Ok(CountersChecked {
        spent: spent.len(),
        reserved: reserved.len(),
        totals: totals.len(),
    })
}

/// Compares the restored ledger with the external file mirror's copy:
/// every mirrored entry up to `head` must be the restored entry with the
/// same hash, and the mirror must hold nothing up to `head` that the
/// restored ledger lacks. Returns how many entries were compared.
pub fn mirror_matches(conn: &Connection, mirror: &Path, head: u64) -> Result<usize, String> {
    let (copy, _) = crate::mirror::read_copy(mirror)
        .map_err(|e| format!("the mirror copy {}: {e}", mirror.display()))?;
    let mut compared = 0;
    let mut stmt = conn
        .prepare("SELECT hash FROM ledger WHERE seq = ?1")
        .map_err(|e| e.to_string())?;
    for entry in copy.iter().filter(|e| e.seq <= head) {
        let seq = i64::try_from(entry.seq).map_err(|e| e.to_string())?;
        let hash: Option<Vec<u8>> =
            stmt.query_row([seq], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e.to_string()),
                })?;
        match hash {
            None => {
                return Err(format!(
                    "the mirror {} holds entry {} which the restored ledger lacks: the backup is behind the mirror",
                    mirror.display(),
                    entry.seq
                ));
            }
            Some(h) if hex::encode(&h) != entry.hash.to_ascii_lowercase() => {
                return Err(format!(
                    "entry {} differs between the restored ledger and the mirror {}",
                    entry.seq,
                    mirror.display()
                ));
            }
            Some(_) => compared += 1,
        }
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rusqlite::params;

    /// A ledger with one signed intent `dev/a` spending `lamports` SOL
    /// (recorded), its spend row of `counted` and a running total `total`.
    fn db(lamports: u64, counted: i64, total: i64) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        let payload = serde_json::to_vec(&serde_json::json!({
            "signature": "s", "key": "hot", "public_key": "p",
            "message_sha256": "00", "sol_spend_lamports": lamports
        }))
        .unwrap();
        conn.execute(
            "INSERT INTO ledger (seq, ts_ms, event, intent_id, agent, payload, prev_hash, hash)
             VALUES (1, 1, 'signature_created', 'a', 'dev', ?1, x'00', x'01')",
            params![payload],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO spend (agent, asset, intent_id, amount, ts_ms, state) VALUES ('dev', 'SOL', 'a', ?1, 5, 'spent')",
            params![counted],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO spend_total (agent, asset, total, expired_through_ms) VALUES ('dev', 'SOL', ?1, 0)",
            params![total],
        )
        .unwrap();
        conn
    }

    #[test]
    fn counters_that_match_their_entries_pass_and_any_difference_is_named() {
        let ok = counters_match_ledger(&db(5_000, 5_000, 5_000)).unwrap();
        assert_eq!((ok.spent, ok.reserved, ok.totals), (1, 0, 1));
        let e = counters_match_ledger(&db(5_000, 4_000, 4_000)).unwrap_err();
        assert!(e.contains("dev/a: 4000 lamports counted"), "{e}");
        let e = counters_match_ledger(&db(5_000, 5_000, 6_000)).unwrap_err();
        assert!(e.contains("running total of dev/SOL"), "{e}");
        // A spent row without its signature.
        let conn = db(5_000, 5_000, 5_000);
        conn.execute(
            "INSERT INTO spend (agent, asset, intent_id, amount, ts_ms, state) VALUES ('dev', 'SOL', 'b', 1, 6, 'spent')",
            [],
        )
        .unwrap();
        let e = counters_match_ledger(&conn).unwrap_err();
        assert!(e.contains("dev/b is counted as spent"), "{e}");
        // A reservation without an intent in progress.
        let conn = db(5_000, 5_000, 5_000);
        conn.execute(
            "INSERT INTO spend (agent, asset, intent_id, amount, ts_ms, state) VALUES ('dev', 'SOL', 'c', 1, 6, 'reserved')",
            [],
        )
        .unwrap();
        let e = counters_match_ledger(&conn).unwrap_err();
        assert!(e.contains("reserved spend rows (1)"), "{e}");
    }
}
