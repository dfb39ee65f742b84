//! Dry runs are not free probes: they count toward the agent's rate
//! windows, and denied ones toward its breaker, each with a compact ledger
//! entry; nothing is signed or reserved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use keyward_client::{ClientError, IntentOutcome};

fn policy(extra: &str) -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\n{extra}\n\
         [agents.dev.limits.SOL]\nper_tx = \"0.1\"\nper_day = \"10\"\n"
    )
}

fn dry(inst: &Instance, id: &str, amount: &str) -> keyward_client::wire::DryRunResult {
    rt().block_on(
        inst.client()
            .dry_run(&transfer(id, &random_pubkey(), amount)),
    )
    .unwrap()
}

fn count(inst: &Instance, event: &str) -> i64 {
    rusqlite::Connection::open(&inst.db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM ledger WHERE event = ?1",
            [event],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn denied_dry_runs_trip_the_breaker_and_allowed_ones_do_not_reset_it() {
    let inst = Instance::with_policy(&policy(
        "breaker = { max_consecutive_denials = 3, cooldown_s = 600 }",
    ));
    assert_eq!(dry(&inst, "probe-1", "0.5").decision, "deny");
    assert_eq!(dry(&inst, "probe-2", "0.01").decision, "allow");
    assert_eq!(dry(&inst, "probe-3", "0.2").decision, "deny");
    assert_eq!(dry(&inst, "probe-4", "0.15").decision, "deny");
    let locked = dry(&inst, "probe-5", "0.01");
    assert_eq!(locked.decision, "locked");
    assert!(locked.retry_after.is_some() && locked.reasons.is_empty());
    match rt().block_on(
        inst.client()
            .submit_intent(&transfer("real", &random_pubkey(), "0.01")),
    ) {
        Err(ClientError::Api {
            status: 423, code, ..
        }) => assert_eq!(code, "agent_locked"),
        other => panic!("expected 423 after three denied dry runs, got {other:?}"),
    }
    // Denied dry runs are recorded (no rate limit: the allowed one changed
    // nothing and is not); nothing was signed or reserved.
    assert_eq!(count(&inst, "dry_run_evaluated"), 3);
    assert_eq!(count(&inst, "breaker_tripped"), 1);
    assert_eq!(count(&inst, "signature_created"), 0);
    assert!(inst.audit_verify().status.success());
}

#[test]
fn dry_runs_count_toward_the_rate_limit() {
    let inst = Instance::with_policy(&policy(
        "rate_limit = { per_minute = 3 }\nbreaker = { max_consecutive_denials = 100 }",
    ));
    for i in 0..3 {
        assert_eq!(dry(&inst, &format!("probe-{i}"), "0.01").decision, "allow");
    }
    let limited = dry(&inst, "probe-3", "0.01");
    assert_eq!(limited.decision, "deny");
    assert!(
        limited.reasons.iter().any(|r| r.rule == "rate_limited"),
        "{limited:?}"
    );
    match rt().block_on(
        inst.client()
            .submit_intent(&transfer("real", &random_pubkey(), "0.01")),
    ) {
        Err(ClientError::Api {
            status: 403,
            reasons,
            ..
        }) => assert!(
            reasons.iter().any(|r| r.rule == "rate_limited"),
            "{reasons:?}"
        ),
        Ok(IntentOutcome::Signed(_)) => panic!("dry runs did not count toward the rate limit"),
        other => panic!("expected rate_limited, got {other:?}"),
    }
    assert_eq!(count(&inst, "dry_run_evaluated"), 4);
    assert_eq!(count(&inst, "signature_created"), 0);
    assert!(inst.audit_verify().status.success());
}
