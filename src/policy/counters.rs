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

// Tables `spend` (one row per intent and asset) and `spend_total` (per
// agent and asset, the sum of the rows newer than `expired_through_ms`, so
// the rolling-window total costs a range scan over only the rows that left
// the window since the last decision, not over the whole day: deciding does
// not get slower as the day fills up): created and migrated by
// `crate::schema`.

fn overflow(amount: i64) -> rusqlite::Error {
    rusqlite::Error::IntegralValueOutOfRange(0, amount)
}

/// Sum of `agent`'s `asset` rows with `after < ts_ms <= through`.
fn range_sum(
    conn: &Connection,
    agent: &str,
    asset: &str,
    after: i64,
    through: i64,
) -> rusqlite::Result<u64> {
    let mut stmt = conn.prepare_cached(
        "SELECT amount FROM spend WHERE agent = ?1 AND asset = ?2 AND ts_ms > ?3 AND ts_ms <= ?4",
    )?;
    let mut rows = stmt.query(params![agent, asset, after, through])?;
    let mut total: u64 = 0;
    while let Some(row) = rows.next()? {
        let amount: i64 = row.get(0)?;
        total = u64::try_from(amount)
            .ok()
            .and_then(|a| total.checked_add(a))
            .ok_or_else(|| overflow(amount))?;
    }
    Ok(total)
}

/// The stored running total and how far it has expired, if any.
fn load_total(conn: &Connection, agent: &str, asset: &str) -> rusqlite::Result<Option<(u64, i64)>> {
    conn.prepare_cached(
        "SELECT total, expired_through_ms FROM spend_total WHERE agent = ?1 AND asset = ?2",
    )?
    .query_row(params![agent, asset], |r| {
        let total: i64 = r.get(0)?;
        let through: i64 = r.get(1)?;
        Ok((total, through))
    })
    .optional()?
    .map(|(total, through)| {
        u64::try_from(total)
            .map(|t| (t, through))
            .map_err(|_| overflow(total))
    })
    .transpose()
}

fn store_total(
    conn: &Connection,
    agent: &str,
    asset: &str,
    total: u64,
    through: i64,
) -> rusqlite::Result<()> {
    let total = i64::try_from(total).map_err(|_| overflow(i64::MAX))?;
    conn.prepare_cached(
        "INSERT INTO spend_total (agent, asset, total, expired_through_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (agent, asset) DO UPDATE SET total = excluded.total, expired_through_ms = excluded.expired_through_ms",
    )?
    .execute(params![agent, asset, total, through])?;
    Ok(())
}

/// The window total at `now_ms` from the stored running total, and the
/// new expiry point. Exact in every case: rows that left the window since
/// the last call are subtracted; if the clock went back, rows that were
/// expired but are inside the window again are added back.
fn window_total(
    conn: &Connection,
    agent: &str,
    asset: &str,
    now_ms: i64,
) -> rusqlite::Result<(u64, i64)> {
    let cutoff = now_ms - DAY_MS;
    let Some((total, through)) = load_total(conn, agent, asset)? else {
        // No running total yet (a new agent, or a ledger from before it
        // existed): count the window once.
        return Ok((range_sum(conn, agent, asset, cutoff, i64::MAX)?, cutoff));
    };
    if cutoff >= through {
        let expired = range_sum(conn, agent, asset, through, cutoff)?;
        // The running total includes every row it subtracts here.
        let total = total.checked_sub(expired).ok_or_else(|| overflow(0))?;
        Ok((total, cutoff))
    } else {
        let back = range_sum(conn, agent, asset, cutoff, through)?;
        let total = total.checked_add(back).ok_or_else(|| overflow(0))?;
        Ok((total, cutoff))
    }
}

/// Total spent or reserved by `agent` in `asset` during the 24 hours
/// before `now_ms`, without writing (for read-only views). A sum that does
/// not fit is an error (fail closed).
pub fn spent_24h(
    conn: &Connection,
    agent: &str,
    asset: &str,
    now_ms: i64,
) -> rusqlite::Result<Lamports> {
    window_total(conn, agent, asset, now_ms).map(|(t, _)| Lamports(t))
}

/// Like [`spent_24h`], and moves the stored running total forward to
/// `now_ms`, so the next decision scans only what expires after it. Call
/// inside the ledger transaction that makes the decision.
pub fn spent_24h_advance(
    conn: &Connection,
    agent: &str,
    asset: &str,
    now_ms: i64,
) -> rusqlite::Result<Lamports> {
    let (total, through) = window_total(conn, agent, asset, now_ms)?;
    store_total(conn, agent, asset, total, through)?;
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
    let signed = i64::try_from(amount.0).map_err(|_| overflow(i64::MAX))?;
    let (total, through) = window_total(conn, agent, asset, now_ms)?;
    // A row is in the running total when it is newer than the expiry point;
    // the window total above has moved that point to now - 24h < now.
    let total = total
        .checked_add(amount.0)
        .ok_or_else(|| overflow(signed))?;
    conn.prepare_cached(
        "INSERT INTO spend (agent, asset, intent_id, amount, ts_ms, state) VALUES (?1, ?2, ?3, ?4, ?5, 'reserved')",
    )?
    .execute(params![agent, asset, intent_id, signed, now_ms])?;
    store_total(conn, agent, asset, total, through)
}

/// Turns an intent's reservations into spend (its signature was recorded).
pub fn confirm(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached("UPDATE spend SET state = 'spent' WHERE agent = ?1 AND intent_id = ?2 AND state = 'reserved'")?
        .execute(params![agent, intent_id])
}

/// Drops an intent's reservations (nothing was signed for it).
pub fn release(conn: &Connection, agent: &str, intent_id: &str) -> rusqlite::Result<usize> {
    let rows: Vec<(String, i64, i64)> = conn
        .prepare_cached(
            "SELECT asset, amount, ts_ms FROM spend WHERE agent = ?1 AND intent_id = ?2 AND state = 'reserved'",
        )?
        .query_map(params![agent, intent_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (asset, amount, ts) in &rows {
        if let Some((total, through)) = load_total(conn, agent, asset)?
            && *ts > through
        {
            let amount = u64::try_from(*amount).map_err(|_| overflow(*amount))?;
            let total = total.checked_sub(amount).ok_or_else(|| overflow(0))?;
            store_total(conn, agent, asset, total, through)?;
        }
    }
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
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
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
        // A second reservation would push the running total past i64.
        assert!(reserve(&c, "a", "SOL", "i2", Lamports(i64::MAX as u64), 10).is_err());
        assert!(reserve(&c, "a", "SOL", "i4", Lamports(u64::MAX), 10).is_err());
        assert_eq!(
            spent_24h(&c, "a", "SOL", 20).unwrap(),
            Lamports(i64::MAX as u64)
        );
    }

    /// Brute force: the exact window sum over every row.
    fn exact(c: &Connection, agent: &str, now: i64) -> u64 {
        let mut stmt = c
            .prepare("SELECT amount FROM spend WHERE agent = ?1 AND asset = 'SOL' AND ts_ms > ?2")
            .unwrap();
        stmt.query_map(params![agent, now - DAY_MS], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|a| a.unwrap() as u64)
            .sum()
    }

    #[test]
    fn running_total_equals_the_exact_window_under_random_operations() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let c = db();
        let mut now: i64 = 1_700_000_000_000;
        let mut live: Vec<String> = Vec::new();
        for i in 0..3000 {
            // Mostly forward in steps up to 2 h, sometimes back up to 3 h.
            now += if rng.gen_bool(0.1) {
                -rng.gen_range(0..3 * 3_600_000)
            } else {
                rng.gen_range(0..2 * 3_600_000)
            };
            let agent = if rng.gen_bool(0.5) { "a" } else { "b" };
            match rng.gen_range(0..4) {
                0 | 1 => {
                    let id = format!("i{i}");
                    reserve(
                        &c,
                        agent,
                        "SOL",
                        &id,
                        Lamports(rng.gen_range(0..1_000_000)),
                        now,
                    )
                    .unwrap();
                    live.push(format!("{agent}:{id}"));
                }
                2 if !live.is_empty() => {
                    let k = live.swap_remove(rng.gen_range(0..live.len()));
                    let (agent, id) = k.split_once(':').unwrap();
                    if rng.gen_bool(0.5) {
                        confirm(&c, agent, id).unwrap();
                    } else {
                        release(&c, agent, id).unwrap();
                    }
                }
                _ => {
                    spent_24h_advance(&c, agent, "SOL", now).unwrap();
                }
            }
            for a in ["a", "b"] {
                assert_eq!(
                    spent_24h(&c, a, "SOL", now).unwrap(),
                    Lamports(exact(&c, a, now)),
                    "step {i}, agent {a}"
                );
            }
        }
    }
}
