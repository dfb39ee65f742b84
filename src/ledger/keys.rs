//! Which HSM keys the ledger has recorded (`key_generated` entries).

use rusqlite::Connection;

use super::LedgerError;
use super::events::{self, KeyGenerated};

/// Every key a `key_generated` entry records, as (name, base58 public
/// key), in ledger order. A payload that does not decode is an error.
pub fn generated_keys(conn: &Connection) -> Result<Vec<(String, String)>, LedgerError> {
    let mut stmt = conn
        .prepare("SELECT event, payload FROM ledger WHERE event = 'key_generated' ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next()? {
        let event: String = row.get(0)?;
        let payload: Vec<u8> = row.get(1)?;
        let k: KeyGenerated = events::decode(&event, &payload)?;
        keys.push((k.key, k.public_key));
    }
    Ok(keys)
}
