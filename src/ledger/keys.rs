//! Which HSM keys the ledger has recorded (`key_generated` entries).

use rusqlite::Connection;

use super::LedgerError;
use super::events::{self, KeyGenerated};

/// A key a `key_generated` entry records: ((name, base58 public key),
/// sequence number of the entry).
pub type GeneratedKey = ((String, String), u64);

/// Every key a `key_generated` entry records, in ledger order. A payload
/// that does not decode is an error.
pub fn generated_keys(conn: &Connection) -> Result<Vec<GeneratedKey>, LedgerError> {
    let mut stmt = conn.prepare(
        "SELECT event, payload, seq FROM ledger WHERE event = 'key_generated' ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next()? {
        let event: String = row.get(0)?;
        let payload: Vec<u8> = row.get(1)?;
        let seq = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
        let k: KeyGenerated = events::decode(&event, &payload)?;
        keys.push(((k.key, k.public_key), seq));
    }
    Ok(keys)
}
