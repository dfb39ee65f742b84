//! `keyward audit verify` on a ledger written by the real daemon: an
//! untouched ledger verifies (exit 0); each kind of direct tampering with the
//! SQLite file makes it exit 1 and name the first broken sequence number.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// `keyward audit verify` trusting the audit key pinned at `init`.
fn verify(vkey: &Path, db: &Path) -> (i32, String, String) {
    let out = Command::new(KEYWARD)
        .arg("audit")
        .arg("verify")
        .arg("--vkey-file")
        .arg(vkey)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_of(db: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(db, &to).unwrap();
    to
}

/// Opens the copy the way an attacker would: drops the append-only triggers
/// and edits rows directly.
fn tamper(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(
        "DROP TRIGGER IF EXISTS ledger_no_update; DROP TRIGGER IF EXISTS ledger_no_delete;",
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
}

fn expect_broken_at(vkey: &Path, db: &Path, seq: u64) -> String {
    let (code, stdout, stderr) = verify(vkey, db);
    assert_eq!(
        code, 1,
        "tampered ledger must fail verification: {stdout}{stderr}"
    );
    assert!(
        stderr.contains(&format!("seq {seq}:")),
        "must name seq {seq} as the first broken entry: {stderr}"
    );
    stderr
}

#[test]
fn verify_detects_every_kind_of_tampering_and_names_the_first_broken_seq() {
    let mut inst = Instance::start_default();
    let rt = rt();
    for i in 0..4 {
        rt.block_on(inst.client().submit_intent(&transfer(
            &format!("t{i}"),
            &random_pubkey(),
            "0.1",
        )))
        .unwrap();
    }
    // And one denial, so denials are in the chain too.
    assert!(
        rt.block_on(
            inst.client()
                .submit_intent(&transfer("big", &random_pubkey(), "5"))
        )
        .is_err()
    );
    assert_eq!(inst.stop().code(), Some(0));

    let vk = inst.audit_vkey_file();
    let (code, stdout, stderr) = verify(&vk, &inst.db);
    assert_eq!(code, 0, "untouched ledger verifies: {stderr}");
    let n: u64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout:?}"));
    // key_generated (hot and the audit key, at init), daemon_started,
    // policy_loaded, the start checkpoint, 4 × 3, 3 for the denial, the
    // final checkpoint, daemon_stopped
    assert_eq!(n, 2 + 3 + 12 + 3 + 1 + 1, "{stdout}");

    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // 1. An edited payload byte in the middle of the chain.
    let db = copy_of(&inst.db, w, "edit.sqlite3");
    let payload: Vec<u8> = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT payload FROM ledger WHERE seq = 7", [], |r| r.get(0))
        .unwrap();
    let mut edited = payload.clone();
    let pos = edited.iter().position(|b| b.is_ascii_digit()).unwrap();
    edited[pos] = if edited[pos] == b'9' {
        b'1'
    } else {
        edited[pos] + 1
    };
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("DROP TRIGGER ledger_no_update;").unwrap();
    c.execute("UPDATE ledger SET payload = ?1 WHERE seq = 7", [&edited])
        .unwrap();
    drop(c);
    let msg = expect_broken_at(&vk, &db, 7);
    assert!(
        msg.contains(
            "seq 7: the entry's content does not match its hash (payload or fields edited)"
        ),
        "{msg}"
    );

    // 2. A deleted row.
    let db = copy_of(&inst.db, w, "delete.sqlite3");
    tamper(&db, "DELETE FROM ledger WHERE seq = 5");
    let msg = expect_broken_at(&vk, &db, 5);
    assert!(
        msg.contains(
            "seq 5: entries 5..5 are missing (rows deleted); the next stored entry is seq 6"
        ),
        "{msg}"
    );

    // 3. Two rows swapped (their contents trade places).
    let db = copy_of(&inst.db, w, "swap.sqlite3");
    tamper(
        &db,
        "UPDATE ledger SET seq = -1 WHERE seq = 4; UPDATE ledger SET seq = 4 WHERE seq = 9; UPDATE ledger SET seq = 9 WHERE seq = -1;",
    );
    let msg = expect_broken_at(&vk, &db, 4);
    assert!(
        msg.contains(
            "seq 4: the link to entry 3 is broken (rows reordered, replaced, or the link edited)"
        ),
        "{msg}"
    );

    // 4. A changed stored hash.
    let db = copy_of(&inst.db, w, "hash.sqlite3");
    tamper(
        &db,
        "UPDATE ledger SET hash = randomblob(32) WHERE seq = 11",
    );
    let msg = expect_broken_at(&vk, &db, 11);
    assert!(
        msg.contains("seq 11: the stored hash was changed (the next entry links to the hash of the unchanged content)"),
        "{msg}"
    );

    // 5. The last entry edited (no successor to compare with).
    let db = copy_of(&inst.db, w, "last.sqlite3");
    tamper(
        &db,
        &format!("UPDATE ledger SET event = 'daemon_started' WHERE seq = {n}"),
    );
    let msg = expect_broken_at(&vk, &db, n);
    assert!(
        msg.contains(&format!(
            "seq {n}: the last entry's content does not match its hash (payload, fields or hash edited)"
        )),
        "{msg}"
    );

    // A missing database is an error of its own (exit 2), not "verified".
    let (code, _, _) = verify(&vk, &w.join("absent.sqlite3"));
    assert_eq!(code, 2);

    // And the original still verifies.
    assert_eq!(verify(&vk, &inst.db).0, 0);
}
