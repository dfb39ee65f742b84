//! A ledger that cannot be written: the daemon's file-size limit is dropped
//! to 1 byte with `prlimit`, so every SQLite write fails with EFBIG, as on a
//! full file system. Each intent gets 503 `audit_unavailable`, no signature
//! and no spend; after three failures in a row the audit breaker opens and
//! stays open, even once the disk is writable again, until an operator
//! resets it through the admin socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use keyward_client::{ClientError, IntentOutcome};

fn set_fsize(pid: u32, soft: &str) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--fsize={soft}:"))
        .output()
        .expect("prlimit (util-linux) is installed by scripts/install-deps.sh");
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn expect_audit_unavailable(inst: &Instance, id: &str) {
    match rt().block_on(
        inst.client()
            .submit_intent(&transfer(id, &random_pubkey(), "0.1")),
    ) {
        Err(ClientError::Api {
            status: 503, code, ..
        }) => assert_eq!(code, "audit_unavailable"),
        Ok(IntentOutcome::Signed(s)) => {
            panic!("{id}: a signature was released without a ledger entry: {s:?}")
        }
        other => panic!("{id}: expected 503 audit_unavailable, got {other:?}"),
    }
}

fn spent(inst: &Instance) -> u64 {
    rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units
}

#[test]
fn unwritable_ledger_gives_503_signs_nothing_counts_nothing_and_opens_the_breaker() {
    let mut inst = Instance::start_default();
    let ok = rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("before", &random_pubkey(), "0.1")),
        )
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));
    let spent_before = spent(&inst);
    assert_eq!(spent_before, 100_000_000 + FEE);
    let head_before = rt()
        .block_on(inst.client().health())
        .unwrap()
        .ledger
        .head_seq;

    set_fsize(inst.pid(), "1");
    for i in 0..3 {
        expect_audit_unavailable(&inst, &format!("fail-{i}"));
        assert_eq!(
            spent(&inst),
            spent_before,
            "a failed ledger write counts nothing"
        );
    }
    let health = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(health.ledger.audit_breaker, "open");
    assert_eq!(health.status, "degraded");
    assert_eq!(health.ledger.head_seq, head_before, "nothing was recorded");

    // The disk is writable again, but the breaker stays open until reset.
    set_fsize(inst.pid(), "unlimited");
    expect_audit_unavailable(&inst, "still-open");
    for id in ["fail-0", "fail-1", "fail-2", "still-open"] {
        let e = rt().block_on(inst.client().get_intent(id)).unwrap_err();
        assert!(
            matches!(e, ClientError::Api { status: 404, .. }),
            "{id}: {e:?}"
        );
    }

    let out = inst.keyward(&["breaker", "reset", "audit"]);
    assert!(
        out.status.success(),
        "reset failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("closed"));
    let health = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(health.ledger.audit_breaker, "closed");
    assert_eq!(health.status, "ok");

    let ok = rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("after", &random_pubkey(), "0.1")),
        )
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));
    assert_eq!(spent(&inst), 2 * (100_000_000 + FEE));
    // A failed id can be submitted again once the ledger works.
    let ok = rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("fail-0", &random_pubkey(), "0.1")),
        )
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));

    assert_eq!(inst.stop().code(), Some(0));
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let export = inst.keyward(&["audit", "export", "--db", inst.db.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&export.stdout);
    let tripped = text
        .lines()
        .position(|l| l.contains("\"breaker_tripped\""))
        .expect("trip recorded");
    let reset = text
        .lines()
        .position(|l| l.contains("\"breaker_reset\""))
        .expect("reset recorded");
    assert!(tripped < reset);
}

#[test]
fn two_failures_then_success_do_not_open_the_breaker() {
    let inst = Instance::start_default();
    set_fsize(inst.pid(), "1");
    expect_audit_unavailable(&inst, "f1");
    expect_audit_unavailable(&inst, "f2");
    set_fsize(inst.pid(), "unlimited");
    let ok = rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("ok", &random_pubkey(), "0.1")),
        )
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));
    let health = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(health.ledger.audit_breaker, "closed");
    assert_eq!(health.ledger.consecutive_failures, 0);
}
