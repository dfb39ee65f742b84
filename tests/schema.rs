//! Schema versions of the ledger database: a database written by the
//! release before versions existed is adopted and still verifies; a
//! database newer than this binary is refused by every opener and left
//! byte for byte as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use keyward::ledger::{Expectations, Ledger, LedgerOptions, TrustedKey};
use keyward::schema::CURRENT;

const KEYWARD: &str = env!("CARGO_BIN_EXE_keyward");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A private copy of the fixture database (opening it writes to it).
fn copy_of_fixture(dir: &Path) -> PathBuf {
    let db = dir.join("ledger.sqlite3");
    std::fs::copy(fixture("ledger-v0.sqlite3"), &db).unwrap();
    db
}

fn user_version(db: &Path) -> u32 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

fn set_user_version(db: &Path, v: u32) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.pragma_update(None, "user_version", v).unwrap();
    // Into the main file, so its bytes are the whole database.
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
}

/// Every table, index and trigger with its SQL.
type Schema = Vec<(String, Option<String>)>;
/// Every entry: sequence number, event, hash.
type Entries = Vec<(i64, String, Vec<u8>)>;

/// What the database holds, its version aside.
fn contents(db: &Path) -> (Schema, Entries) {
    let c = rusqlite::Connection::open(db).unwrap();
    let schema = c
        .prepare("SELECT name, sql FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let entries = c
        .prepare("SELECT seq, event, hash FROM ledger ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (schema, entries)
}

/// The database file's bytes, once nothing is left in its write-ahead log.
fn bytes(db: &Path) -> Vec<u8> {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    if let Ok(m) = std::fs::metadata(&wal) {
        assert_eq!(m.len(), 0, "changes are waiting in {}", wal.display());
    }
    std::fs::read(db).unwrap()
}

/// (exit code, stdout + stderr) of `keyward audit verify` with the
/// fixture's audit key.
fn audit_verify(db: &Path) -> (i32, String) {
    let out = Command::new(KEYWARD)
        .args(["audit", "verify", "--db"])
        .arg(db)
        .arg("--vkey-file")
        .arg(fixture("ledger-v0.vkey"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_too_new_message(text: &str, db: &Path) {
    assert!(
        text.contains(&format!("schema version {}", CURRENT + 1))
            && text.contains(&format!("knows versions up to {CURRENT}"))
            && text.contains(&db.display().to_string()),
        "names both versions and the file: {text}"
    );
}

#[test]
fn a_database_of_the_release_before_versions_is_adopted_unchanged_and_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let db = copy_of_fixture(dir.path());
    assert_eq!(user_version(&db), 0, "the fixture predates versions");
    let before = contents(&db);

    // The writer migrates at open.
    let ledger = Ledger::open(&db, LedgerOptions::default()).unwrap();
    assert_eq!(ledger.health().head_seq, 21);
    ledger.close_blocking().unwrap();
    assert_eq!(user_version(&db), CURRENT);
    // Version 1 adopts it without a change; later migrations only add
    // their own (empty) tables and indexes.
    let migrated = contents(&db);
    let (mut schema, entries) = migrated.clone();
    let added = [
        "drills",
        "freezes",
        "key_registry",
        "key_registry_active",
        "key_registry_label",
    ];
    let found: Vec<String> = schema
        .iter()
        .map(|(n, _): &(String, Option<String>)| n.clone())
        .filter(|n| added.contains(&n.as_str()))
        .collect();
    assert_eq!(found, added, "migration 2's tables");
    schema.retain(|(n, _)| !added.contains(&n.as_str()));
    assert_eq!(
        (schema, entries),
        before,
        "version 1 adopted it without a change"
    );

    // The history verifies against the audit key pinned when it was made:
    // with the library and with `keyward audit verify`.
    let trusted = TrustedKey::from_file(&fixture("ledger-v0.vkey")).unwrap();
    let report = keyward::ledger::verify_history(&db, &trusted, &Expectations::default()).unwrap();
    assert_eq!((report.chain.entries, report.checkpoints), (21, 2));
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("21 entries verified"), "{out}");
    // Every payload the old release wrote reads through today's typed
    // documents (signed, denied, approver enrolled, policy reloaded,
    // approval granted, checkpoints, start and stop).
    assert!(
        out.contains("every entry reads as the document of its event type"),
        "{out}"
    );
    let conn = keyward::ledger::open_read_only(&db).unwrap();
    assert_eq!(keyward::ledger::payload_findings(&conn).unwrap(), []);

    // Opening it again finds nothing to do.
    let ledger = Ledger::open(&db, LedgerOptions::default()).unwrap();
    ledger.close_blocking().unwrap();
    assert_eq!(contents(&db), migrated);
}

#[test]
fn a_newer_database_is_refused_by_every_opener_and_left_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let db = copy_of_fixture(dir.path());
    set_user_version(&db, CURRENT + 1);
    let original = bytes(&db);

    let (code, out) = audit_verify(&db);
    assert_eq!(code, 2, "{out}");
    assert_too_new_message(&out, &db);
    assert_eq!(bytes(&db), original);

    let e = keyward::ledger::open_read_only(&db).unwrap_err();
    assert_eq!(e.code(), "ledger_schema_too_new");
    assert_eq!(bytes(&db), original);

    let Err(e) = Ledger::open(&db, LedgerOptions::default()) else {
        panic!("the writer opened a newer database");
    };
    assert_eq!(e.code(), "ledger_schema_too_new");
    assert_too_new_message(&e.to_string(), &db);
    assert_eq!(bytes(&db), original);
}

#[test]
fn keywardd_refuses_to_start_on_a_newer_database_and_leaves_it_alone() {
    let mut inst = Instance::start_default();
    assert_eq!(inst.stop().code(), Some(0));
    assert_eq!(user_version(&inst.db), CURRENT, "a new database is current");
    set_user_version(&inst.db, CURRENT + 1);
    let original = bytes(&inst.db);

    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("ledger_schema_too_new"), "{log}");
    assert_too_new_message(&log, &inst.db);
    assert_eq!(bytes(&inst.db), original);

    // Back at the version it knows, it starts again.
    set_user_version(&inst.db, CURRENT);
    inst.start();
    assert_eq!(inst.stop().code(), Some(0));
}
