//! The schema of the ledger database, as an ordered list of migrations.
//!
//! One SQLite file holds the hash chain and every table that changes in the
//! same transactions as its entries: spend counters ([`crate::policy::counters`]),
//! rate windows and breakers ([`crate::policy::engine`]), intent records
//! ([`crate::intents`]) and the approver registry ([`crate::approval::store`]).
//! Those modules read and write their tables; this module alone creates and
//! changes them, so the database has one schema with one version.
//!
//! `PRAGMA user_version` holds the number of the last migration applied.
//! [`migrate`] (run by [`crate::ledger::Ledger::open`]) applies the pending
//! ones in one transaction: all of them or none. A database newer than this
//! binary is refused with `ledger_schema_too_new` and left untouched, by the
//! writer and by every read-only opener ([`check_readable`]), because an old
//! binary cannot know what a newer schema means for what it writes or
//! verifies.
//!
//! Adding a migration: append a [`Migration`] with the next version; never
//! edit one that has been released (databases in the field have applied it).
//!
//! ```
//! let mut conn = rusqlite::Connection::open_in_memory().unwrap();
//! let m = keyward::schema::migrate(&mut conn).unwrap();
//! assert_eq!((m.from, m.to), (0, keyward::schema::CURRENT));
//! ```

use rusqlite::{Connection, TransactionBehavior};

/// One step of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The `user_version` the database has once this step is applied
    /// (1, 2, ... without gaps).
    pub version: u32,
    /// What it does, for logs and errors.
    pub name: &'static str,
    /// The SQL it runs.
    pub sql: &'static str,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: V1,
    },
    Migration {
        version: 2,
        name: "key registry, freezes and drills",
        sql: V2,
    },
];

/// The schema version this binary writes (the last migration's).
pub const CURRENT: u32 = latest(MIGRATIONS);

const fn latest(migrations: &[Migration]) -> u32 {
    match migrations.last() {
        Some(m) => m.version,
        None => 0,
    }
}

/// Version 1: the schema of the releases before versions existed. Every
/// statement is `IF NOT EXISTS`, so applying it to such a database (version
/// 0 with its tables) changes nothing but the version: that is how they are
/// adopted. Keep it that way; later migrations need not be idempotent.
const V1: &str = "
-- The chain. Updates and deletes are refused by triggers; an attacker with
-- write access to the file can drop them, which is what the hash chain (and
-- the external mirror) is for.
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    event TEXT NOT NULL,
    intent_id TEXT,
    agent TEXT,
    payload BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_intent ON ledger(intent_id) WHERE intent_id IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TABLE IF NOT EXISTS merkle_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

-- Spend counters (policy::counters). `spend` holds one row per intent and
-- asset; `spend_total` keeps, per agent and asset, the sum of the rows newer
-- than `expired_through_ms`.
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    asset TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    ts_ms INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'spent'))
);
CREATE INDEX IF NOT EXISTS spend_window ON spend(agent, asset, ts_ms, amount);
CREATE UNIQUE INDEX IF NOT EXISTS spend_intent ON spend(agent, intent_id, asset);
CREATE TABLE IF NOT EXISTS spend_total (
    agent TEXT NOT NULL,
    asset TEXT NOT NULL,
    total INTEGER NOT NULL CHECK (total >= 0),
    expired_through_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, asset)
) WITHOUT ROWID;

-- Rate windows and denial breakers (policy::engine).
CREATE TABLE IF NOT EXISTS rate_events (
    agent TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, intent_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_window ON rate_events(agent, ts_ms);
CREATE TABLE IF NOT EXISTS agent_breaker (
    agent TEXT NOT NULL PRIMARY KEY,
    consecutive INTEGER NOT NULL,
    locked_until_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Intent records and pending approvals (intents).
CREATE TABLE IF NOT EXISTS intents (
    agent TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    content_hash BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('in_progress', 'signed', 'denied', 'pending_approval', 'expired')),
    http_status INTEGER,
    response BLOB,
    received_seq INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, intent_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS intents_in_progress ON intents(status) WHERE status = 'in_progress';
CREATE TABLE IF NOT EXISTS pending_approvals (
    agent TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    key TEXT NOT NULL,
    message BLOB NOT NULL,
    intent_hash BLOB NOT NULL,
    approval TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, intent_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_expiry ON pending_approvals(expires_ms);

-- Approvers, used nonces and granted approvals (approval::store).
CREATE TABLE IF NOT EXISTS approvers (
    name TEXT NOT NULL PRIMARY KEY,
    added_ms INTEGER NOT NULL,
    removed_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approval_nonces (
    nonce TEXT NOT NULL PRIMARY KEY,
    approver TEXT NOT NULL,
    agent TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    used_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    agent TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    approver TEXT NOT NULL,
    decision TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, intent_id, approver)
) WITHOUT ROWID;
";

/// Version 2: the key registry (which HSM object serves each key name, by
/// version), emergency freezes and the last drill of each kind.
const V2: &str = "
-- The key registry (service::keys): the source of truth for which HSM
-- object serves a key name. Every change is recorded in the ledger in the
-- same transaction (key_generated, key_rotated, key_retired). `hsm_label`
-- is what the backend finds the key by; `public_key` (base58) must match
-- what the HSM returns for it, or the key is refused.
CREATE TABLE key_registry (
    name TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    backend TEXT NOT NULL,
    hsm_label TEXT NOT NULL,
    public_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    created_ms INTEGER NOT NULL,
    rotated_ms INTEGER,
    retire_after_ms INTEGER,
    retired_ms INTEGER,
    seq INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE UNIQUE INDEX key_registry_active ON key_registry(name) WHERE state = 'active';
CREATE UNIQUE INDEX key_registry_label ON key_registry(hsm_label) WHERE state <> 'retired';

-- Emergency freezes (service::freeze): scope `all`, `agent:NAME` or
-- `key:NAME`; a row is a freeze in force. Recorded as signing_frozen and
-- signing_unfrozen.
CREATE TABLE freezes (
    scope TEXT NOT NULL PRIMARY KEY,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;

-- The last drill of each kind (`rotation`, `dr`), as its drill_completed
-- entry records it.
CREATE TABLE drills (
    kind TEXT NOT NULL PRIMARY KEY,
    outcome TEXT NOT NULL CHECK (outcome IN ('passed', 'failed')),
    completed_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    failed_step TEXT,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Why a database's schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database was written by a newer keyward.
    #[error(
        "ledger database {path} has schema version {found}, but this keyward ({binary}) knows versions up to {known}: \
         it was written by a newer release. It was left unchanged; run that release (or a newer one) on it"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Its `user_version`.
        found: u32,
        /// The newest version this binary knows.
        known: u32,
        /// This binary's version.
        binary: &'static str,
    },
    /// A migration failed; the transaction was rolled back.
    #[error(
        "cannot migrate ledger database {path} from schema version {from} to {to}: migration {failed} ({name}) failed: {source}; \
         nothing was changed"
    )]
    MigrationFailed {
        /// The database file.
        path: String,
        /// The version it has (and keeps).
        from: u32,
        /// The version it was to reach.
        to: u32,
        /// The migration that failed.
        failed: u32,
        /// Its name.
        name: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The version could not be read or written.
    #[error("cannot read or write the schema version of ledger database {path}: {source}")]
    Version {
        /// The database file.
        path: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

impl SchemaError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SchemaError::TooNew { .. } => "ledger_schema_too_new",
            SchemaError::MigrationFailed { .. } => "ledger_schema_migration_failed",
            SchemaError::Version { .. } => "ledger_unavailable",
        }
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version the database had.
    pub from: u32,
    /// The version it has now ([`CURRENT`]).
    pub to: u32,
}

fn path_of(conn: &Connection) -> String {
    match conn.path() {
        Some(p) if !p.is_empty() => p.to_owned(),
        _ => ":memory:".to_owned(),
    }
}

/// The database's `user_version`.
pub fn version(conn: &Connection) -> Result<u32, SchemaError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        .map_err(|source| SchemaError::Version {
            path: path_of(conn),
            source,
        })
}

/// For read-only openers: refuses a database newer than this binary; never
/// changes anything. Returns its version (0 for a database from before
/// versions existed, which reads like version 1).
pub fn check_readable(conn: &Connection) -> Result<u32, SchemaError> {
    refuse_newer(conn, CURRENT)
}

fn refuse_newer(conn: &Connection, known: u32) -> Result<u32, SchemaError> {
    let found = version(conn)?;
    if found > known {
        return Err(SchemaError::TooNew {
            path: path_of(conn),
            found,
            known,
            binary: env!("CARGO_PKG_VERSION"),
        });
    }
    Ok(found)
}

/// Brings the database to [`CURRENT`]: applies every pending migration and
/// sets `user_version`, in one `BEGIN IMMEDIATE` transaction. Refuses, and
/// changes nothing, when the database is newer than this binary.
pub fn migrate(conn: &mut Connection) -> Result<Migrated, SchemaError> {
    migrate_with(conn, MIGRATIONS)
}

/// [`migrate`] with another list (tests of the runner).
pub(crate) fn migrate_with(
    conn: &mut Connection,
    migrations: &[Migration],
) -> Result<Migrated, SchemaError> {
    let path = path_of(conn);
    let known = latest(migrations);
    let version_err = |source| SchemaError::Version {
        path: path.clone(),
        source,
    };
    // Read the version inside the write transaction: no other writer can
    // migrate between the check and the changes.
    let txn = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(version_err)?;
    let from = refuse_newer(&txn, known)?;
    for m in migrations.iter().filter(|m| m.version > from) {
        txn.execute_batch(m.sql)
            .and_then(|()| txn.pragma_update(None, "user_version", m.version))
            .map_err(|source| SchemaError::MigrationFailed {
                path: path.clone(),
                from,
                to: known,
                failed: m.version,
                name: m.name,
                source,
            })?;
    }
    txn.commit().map_err(version_err)?;
    Ok(Migrated { from, to: known })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: Migration = Migration {
        version: 1,
        name: "a",
        sql: "CREATE TABLE a (x INTEGER NOT NULL);",
    };
    const T2: Migration = Migration {
        version: 2,
        name: "b",
        sql: "CREATE TABLE b (y INTEGER NOT NULL); INSERT INTO b (y) VALUES (7);",
    };
    const T3_FAILS: Migration = Migration {
        version: 3,
        name: "c",
        sql: "CREATE TABLE c (z INTEGER); INSERT INTO a (x) VALUES (NULL);",
    };

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn file_db(dir: &tempfile::TempDir) -> Connection {
        Connection::open(dir.path().join("db.sqlite3")).unwrap()
    }

    #[test]
    fn the_versions_run_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
        assert_eq!(CURRENT as usize, MIGRATIONS.len());
    }

    #[test]
    fn a_fresh_database_gets_every_migration_and_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_db(&dir);
        let m = migrate_with(&mut c, &[T1, T2]).unwrap();
        assert_eq!(m, Migrated { from: 0, to: 2 });
        assert_eq!(version(&c).unwrap(), 2);
        assert_eq!(tables(&c), ["a", "b"]);
        // Nothing is pending any more: running again changes nothing.
        assert_eq!(
            migrate_with(&mut c, &[T1, T2]).unwrap(),
            Migrated { from: 2, to: 2 }
        );
        let rows: i64 = c
            .query_row("SELECT count(*) FROM b", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1, "migration 2 ran once");
    }

    #[test]
    fn a_partly_migrated_database_gets_only_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_db(&dir);
        migrate_with(&mut c, &[T1]).unwrap();
        c.execute("INSERT INTO a (x) VALUES (1)", []).unwrap();
        let m = migrate_with(&mut c, &[T1, T2]).unwrap();
        assert_eq!(m, Migrated { from: 1, to: 2 });
        assert_eq!(tables(&c), ["a", "b"]);
        let kept: i64 = c.query_row("SELECT x FROM a", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 1, "migration 1 did not run again");
    }

    #[test]
    fn a_failing_migration_rolls_back_every_step_of_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_db(&dir);
        migrate_with(&mut c, &[T1]).unwrap();
        let e = migrate_with(&mut c, &[T1, T2, T3_FAILS]).unwrap_err();
        assert_eq!(e.code(), "ledger_schema_migration_failed");
        let text = e.to_string();
        assert!(
            text.contains("from schema version 1 to 3") && text.contains("migration 3 (c)"),
            "{text}"
        );
        assert_eq!(version(&c).unwrap(), 1, "the version is rolled back");
        assert_eq!(tables(&c), ["a"], "migration 2 is rolled back with 3");
    }

    #[test]
    fn a_newer_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_db(&dir);
        migrate_with(&mut c, &[T1, T2]).unwrap();
        let e = migrate_with(&mut c, &[T1]).unwrap_err();
        assert_eq!(e.code(), "ledger_schema_too_new");
        let text = e.to_string();
        assert!(
            text.contains("schema version 2") && text.contains("versions up to 1"),
            "{text}"
        );
        assert!(text.contains("db.sqlite3"), "names the file: {text}");
        assert_eq!(version(&c).unwrap(), 2);
        assert_eq!(tables(&c), ["a", "b"]);
        c.pragma_update(None, "user_version", CURRENT + 1).unwrap();
        assert_eq!(
            check_readable(&c).unwrap_err().code(),
            "ledger_schema_too_new"
        );
        c.pragma_update(None, "user_version", CURRENT).unwrap();
        assert_eq!(check_readable(&c).unwrap(), CURRENT);
    }

    #[test]
    fn a_database_from_before_versions_is_adopted_as_version_one_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_db(&dir);
        // What the releases before versions created: the same tables,
        // user_version 0.
        c.execute_batch(V1).unwrap();
        c.execute(
            "INSERT INTO approvers (name, added_ms) VALUES ('alice', 1)",
            [],
        )
        .unwrap();
        let schema = |c: &Connection| -> Vec<(String, Option<String>)> {
            let mut stmt = c
                .prepare("SELECT name, sql FROM sqlite_master ORDER BY name")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let before = schema(&c);
        assert_eq!(version(&c).unwrap(), 0);
        let m = migrate_with(&mut c, &MIGRATIONS[..1]).unwrap();
        assert_eq!(m, Migrated { from: 0, to: 1 });
        assert_eq!(schema(&c), before);
        let n: i64 = c
            .query_row("SELECT count(*) FROM approvers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }
}
