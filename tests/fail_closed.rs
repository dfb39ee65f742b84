//! Signing stops, and starts again by itself, on what it depends on:
//! the mirror's age limit (`max_unmirrored_age_s`), and the ledger after an
//! audit-breaker reset, when the recovery loop records the intent a failed
//! ledger write interrupted and releases its reservation.
//!
//! The ledger is made to fail with a real SQLite failure: a trigger added
//! to the running daemon's database refuses the entries written after the
//! HSM signed (`signature_created`) and by recovery (`signing_denied`),
//! while the admission before the HSM is written as usual.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use keyward_client::{ClientError, IntentOutcome};

fn submit(inst: &Instance, id: &str, amount: &str) -> Result<IntentOutcome, ClientError> {
    rt().block_on(
        inst.client()
            .submit_intent(&transfer(id, &random_pubkey(), amount)),
    )
}

fn health(inst: &Instance) -> keyward_client::wire::HealthView {
    rt().block_on(inst.client().health()).unwrap()
}

fn spent(inst: &Instance) -> u64 {
    rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units
}

#[test]
fn entries_older_than_the_mirror_age_limit_stop_signing_until_the_mirror_catches_up() {
    let mut inst = Instance::init();
    // The entry limit is far away: only the age stops signing.
    let (_copy, ack_dir) =
        inst.with_file_mirror("max_unmirrored_entries = 100000\nmax_unmirrored_age_s = 1\n");
    inst.start();

    // No mirror runs: once the oldest entry (the start's) is older than
    // 1 s, health says so and intents are refused.
    wait_until(
        "the age limit to be passed",
        Duration::from_secs(20),
        || !health(&inst).mirror.unwrap().ok,
    );
    let h = health(&inst);
    let m = h.mirror.unwrap();
    assert!(m.unmirrored_entries < 100, "{m:?}");
    assert!(m.oldest_unmirrored_age_s >= 1, "{m:?}");
    assert_eq!(
        m.detail
            .as_deref()
            .map(|d| d.contains("oldest unmirrored entry")),
        Some(true),
        "{m:?}"
    );
    assert_eq!(h.status, "degraded");
    let recorded = recorded_entries(&inst);
    match submit(&inst, "while-old", "0.01") {
        Err(ClientError::Api {
            status: 503, code, ..
        }) => assert_eq!(code, "mirror_lagging"),
        other => panic!("expected 503 mirror_lagging, got {other:?}"),
    }
    assert_eq!(
        recorded_entries(&inst),
        recorded,
        "a refused intent writes nothing"
    );
    assert_eq!(spent(&inst), 0);

    // The mirror catches up; signing resumes without a restart.
    let mut mirror = start_mirror(&inst);
    let caught_up = || {
        wait_until("the mirror to catch up", Duration::from_secs(20), || {
            keyward::mirror::read_ack(&ack_dir, "file") >= health(&inst).ledger.head_seq
                && health(&inst).mirror.unwrap().ok
        });
    };
    caught_up();
    match submit(&inst, "after-catch-up", "0.01").unwrap() {
        IntentOutcome::Signed(s) => assert_eq!(s.intent_id, "after-catch-up"),
        other => panic!("expected a signature, got {other:?}"),
    }
    assert_eq!(spent(&inst), 10_000_000 + FEE);
    // The refused id was never recorded: it can be sent again.
    caught_up();
    assert!(matches!(
        submit(&inst, "while-old", "0.01").unwrap(),
        IntentOutcome::Signed(_)
    ));
    mirror.kill().unwrap();
    mirror.wait().unwrap();
    assert!(inst.stop().success());
}

/// Ledger entries of `intent_id`: (event, payload).
fn entries_of(inst: &Instance, intent_id: &str) -> Vec<(String, serde_json::Value)> {
    let conn = rusqlite::Connection::open(&inst.db).unwrap();
    let mut stmt = conn
        .prepare("SELECT event, payload FROM ledger WHERE intent_id = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([intent_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })
    .unwrap()
    .map(|r| {
        let (event, payload) = r.unwrap();
        (event, serde_json::from_slice(&payload).unwrap())
    })
    .collect()
}

fn events(entries: &[(String, serde_json::Value)]) -> Vec<&str> {
    entries.iter().map(|(e, _)| e.as_str()).collect()
}

fn intent_status(inst: &Instance, intent_id: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(&inst.db).unwrap();
    conn.query_row(
        "SELECT status FROM intents WHERE agent = 'dev' AND intent_id = ?1",
        [intent_id],
        |r| r.get(0),
    )
    .ok()
}

/// Makes the daemon's ledger refuse `signature_created` and
/// `signing_denied` entries (a real SQLite failure of those writes).
fn refuse_entries_after_the_hsm(inst: &Instance) {
    rusqlite::Connection::open(&inst.db)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER test_refuse BEFORE INSERT ON ledger \
             WHEN NEW.event IN ('signature_created', 'signing_denied') \
             BEGIN SELECT RAISE(ABORT, 'test: this entry cannot be written'); END;",
        )
        .unwrap();
}

fn accept_entries_again(inst: &Instance) {
    rusqlite::Connection::open(&inst.db)
        .unwrap()
        .execute_batch("DROP TRIGGER test_refuse;")
        .unwrap();
}

#[test]
fn an_intent_interrupted_while_the_ledger_failed_is_recorded_and_released_after_the_audit_breaker_reset()
 {
    let mut inst = Instance::start_default();
    assert!(matches!(
        submit(&inst, "before", "0.1").unwrap(),
        IntentOutcome::Signed(_)
    ));
    let spent_before = spent(&inst);
    assert_eq!(spent_before, 100_000_000 + FEE);

    // The HSM signs "cut", but its signature_created entry cannot be
    // written: 503, no signature.
    refuse_entries_after_the_hsm(&inst);
    match submit(&inst, "cut", "0.2") {
        Err(ClientError::Api {
            status: 503, code, ..
        }) => assert_eq!(code, "audit_unavailable"),
        Ok(IntentOutcome::Signed(s)) => panic!("released without its entry: {s:?}"),
        other => panic!("expected 503 audit_unavailable, got {other:?}"),
    }
    // The recovery loop cannot record it either; its failures open the
    // audit breaker.
    wait_until("the audit breaker to open", Duration::from_secs(30), || {
        health(&inst).ledger.audit_breaker == "open"
    });
    accept_entries_again(&inst);
    // While the breaker is open, "cut" stays as it was left: admitted,
    // its spend reserved, nothing signed or denied on record.
    assert_eq!(
        events(&entries_of(&inst, "cut")),
        ["intent_received", "policy_evaluated"]
    );
    assert_eq!(intent_status(&inst, "cut").as_deref(), Some("in_progress"));
    assert_eq!(spent(&inst), spent_before + 200_000_000 + FEE);
    let refused = health(&inst).ledger.head_seq;

    let out = inst.keyward(&["breaker", "reset", "audit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The loop records "cut" as interrupted and releases its reservation.
    wait_until(
        "cut to be recorded as interrupted",
        Duration::from_secs(20),
        || entries_of(&inst, "cut").len() == 3,
    );
    let entries = entries_of(&inst, "cut");
    assert_eq!(
        events(&entries),
        ["intent_received", "policy_evaluated", "signing_denied"]
    );
    assert_eq!(entries[2].1["code"], "interrupted", "{entries:?}");
    assert_eq!(intent_status(&inst, "cut"), None, "the intent is forgotten");
    assert_eq!(spent(&inst), spent_before, "the reservation is released");
    // Exactly the trip and the reset (recorded with the reset) and the
    // interrupted entry were written since.
    let all = all_entries(&inst);
    let since: Vec<&str> = all[usize::try_from(refused).unwrap()..]
        .iter()
        .map(|(e, _, _)| e.as_str())
        .filter(|e| *e != "checkpoint")
        .collect();
    assert_eq!(
        since,
        ["breaker_tripped", "breaker_reset", "signing_denied"],
        "{all:?}"
    );
    assert_eq!(
        all.iter()
            .filter(|(e, _, _)| e == "signature_created")
            .count(),
        1,
        "only \"before\" was signed"
    );
    let e = rt().block_on(inst.client().get_intent("cut")).unwrap_err();
    assert!(matches!(e, ClientError::Api { status: 404, .. }), "{e:?}");

    // The id can be sent again, and signs.
    assert!(matches!(
        submit(&inst, "cut", "0.2").unwrap(),
        IntentOutcome::Signed(_)
    ));
    assert_eq!(spent(&inst), spent_before + 200_000_000 + FEE);
    assert_eq!(health(&inst).status, "ok");
    assert!(inst.stop().success());
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}
