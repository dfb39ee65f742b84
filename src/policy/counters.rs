//! Spend counters in the ledger database.
//!
//! Every allowed intent reserves its spend inside the same transaction that
//! records its `policy_evaluated` entry; the reservation becomes spend when
//! the `signature_created` entry commits and is released only if signing
//! failed and nothing was released. A reservation therefore counts from the
//! moment the decision is made, so concurrent intents can never exceed a
//! limit together, and a crash can only over-count (fail closed), never
//! under-count.

use rusqlite::{Connection, OptionalExtension, params};

use crate::types::Lamports;

/// Length of the rolling window of `per_day` limits.
pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Schema of the counters, created with the ledger.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    asset TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    ts_ms INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'spent'))
);
CREATE INDEX IF NOT EXISTS spend_window ON spend(agent, asset, ts_ms);
CREATE UNIQUE INDEX IF NOT EXISTS spend_intent ON spend(agent, intent_id, asset);
";

/// Total spent or reserved by `agent` in `asset` during the 24 hours
/// before `now_ms`. A sum that does not fit is an error (fail closed).
pub fn spent_24h(
    conn: &Connection,
    agent: &str,
    asset: &str,
    now_ms: i64,
) -> rusqlite::Result<Lamports> {
    let mut stmt = conn.prepare_cached(
        "SELECT amount FROM spend WHERE agent = ?1 AND asset = ?2 AND ts_ms > ?3",
    )?;
    let mut rows = stmt.query(params![agent, asset, now_ms - DAY_MS])?;
    let mut total: u64 = 0;
    while let Some(row) = rows.next()? {
        let amount: i64 = row.get(0)?;
        total = u64::try_from(amount)
            .ok()
            .and_then(|a| total.checked_add(a))
            .ok_or(rusqlite::Error::IntegralValueOutOfRange(0, amount))?;
    }
    Ok(Lamports(total))
}

/// Reserves `amount` for an intent at `now_ms`.
pub fn reserve(
    conn: &Connection,
    agent: &str,
    asset: &str,
    intent_id: &str,
    amount: Lamports,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let amount = i64::try_from(amount.0)
        .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, i64::MAX))?;
    conn.prepare_cached(
        "INSERT INTO spend (agent, asset, intent_id, amount, ts_ms, state) VALUES (?1, ?2, ?3, ?4, ?5, 'reserved')",
    )?
    .execute(params![agent, asset, intent_id, amount, now_ms])?;
    Ok(())
}

/// Turns an intent's reservations into spend (its signature was recorded).
pub fn confirm(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached("UPDATE spend SET state = 'spent' WHERE agent = ?1 AND intent_id = ?2 AND state = 'reserved'")?
        .execute(params![agent, intent_id])
}

/// Drops an intent's reservations (nothing was signed for it).
pub fn release(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM spend WHERE agent = ?1 AND intent_id = ?2 AND state = 'reserved'",
    )?
    .execute(params![agent, intent_id])
}

/// The state of an intent's reservation, for tests and diagnostics.
pub fn state_of(
    conn: &Connection,
    agent: &str,
    intent_id: &str,
) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT state FROM spend WHERE agent = ?1 AND intent_id = ?2",
        params![agent, intent_id],
        |r| r.get(0),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c
    }

    #[test]
    fn window_is_rolling_24_hours() {
        let c = db();
        let t0 = 1_700_000_000_000;
        reserve(&c, "a", "SOL", "i1", Lamports(5), t0).unwrap();
        reserve(&c, "a", "SOL", "i2", Lamports(7), t0 + 1000).unwrap();
        reserve(&c, "b", "SOL", "i3", Lamports(100), t0).unwrap();
        assert_eq!(spent_24h(&c, "a", "SOL", t0 + 1000).unwrap(), Lamports(12));
        assert_eq!(
            spent_24h(&c, "a", "SOL", t0 + DAY_MS - 1).unwrap(),
            Lamports(12)
        );
        assert_eq!(
            spent_24h(&c, "a", "SOL", t0 + DAY_MS).unwrap(),
            Lamports(7),
            "i1 leaves the window after exactly 24h"
        );
        assert_eq!(
            spent_24h(&c, "a", "SOL", t0 + DAY_MS + 1000).unwrap(),
            Lamports(0)
        );
    }

    #[test]
    fn confirm_keeps_and_release_drops_only_reservations() {
        let c = db();
        reserve(&c, "a", "SOL", "i1", Lamports(5), 10).unwrap();
        reserve(&c, "a", "SOL", "i2", Lamports(7), 10).unwrap();
        assert_eq!(confirm(&c, "a", "i1").unwrap(), 1);
        assert_eq!(
            release(&c, "a", "i1").unwrap(),
            0,
            "spent rows are never released"
        );
        assert_eq!(release(&c, "a", "i2").unwrap(), 1);
        assert_eq!(spent_24h(&c, "a", "SOL", 20).unwrap(), Lamports(5));
        assert_eq!(state_of(&c, "a", "i1").unwrap().as_deref(), Some("spent"));
        assert!(
            reserve(&c, "a", "SOL", "i1", Lamports(1), 11).is_err(),
            "one reservation per intent"
        );
    }

    #[test]
    fn overflowing_sum_is_an_error_not_a_wrap() {
        let c = db();
        reserve(&c, "a", "SOL", "i1", Lamports(i64::MAX as u64), 10).unwrap();
        reserve(&c, "a", "SOL", "i2", Lamports(i64::MAX as u64), 10).unwrap();
        reserve(&c, "a", "SOL", "i3", Lamports(i64::MAX as u64), 10).unwrap();
        assert!(spent_24h(&c, "a", "SOL", 20).is_err());
        assert!(reserve(&c, "a", "SOL", "i4", Lamports(u64::MAX), 10).is_err());
    }
}
