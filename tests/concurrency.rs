//! Limits hold under concurrency and across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use keyward_client::{ClientError, IntentOutcome};

/// 0.1 SOL plus the signature fee.
const SPEND: u64 = 100_000_000 + FEE;

fn policy() -> String {
    // per_day admits exactly 10 transfers of 0.1 SOL with their fees.
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\n# Many denials in a row are the point of these tests.\nbreaker = {{ max_consecutive_denials = 1000 }}\n\n[agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"{}\"\n",
        keyward::amount::format_units(u128::from(10 * SPEND), 9)
    )
}

/// An instance with the limit policy, optionally with a commit delay so
/// that concurrent intents share durable commits.
fn instance(commit_delay_us: Option<u64>) -> Instance {
    let mut inst = Instance::init();
    inst.write_policy(&policy());
    if let Some(us) = commit_delay_us {
        inst.set_commit_delay_us(us);
    }
    inst.start();
    inst
}

#[test]
fn sixteen_concurrent_intents_against_a_limit_for_ten_sign_exactly_ten_also_after_restart() {
    limit_holds(None);
}

#[test]
fn group_commit_sixteen_concurrent_intents_in_shared_commits_sign_exactly_ten() {
    limit_holds(Some(20_000));
}

#[test]
fn kill_9_mid_run_loses_no_returned_signature_and_never_overspends() {
    kill_9_run(None);
}

#[test]
fn group_commit_kill_9_during_a_batch_loses_no_returned_signature_and_never_overspends() {
    kill_9_run(Some(50_000));
}

fn limit_holds(commit_delay_us: Option<u64>) {
    let mut inst = instance(commit_delay_us);
    let rt = rt();
    let client = inst.client();
    let to = random_pubkey();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let client = client.clone();
            let req = transfer(&format!("c-{i}"), &to, "0.1");
            tasks.push(tokio::spawn(
                async move { client.submit_intent(&req).await },
            ));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let signed = results
        .iter()
        .filter(|r| matches!(r, Ok(IntentOutcome::Signed(_))))
        .count();
    let denied: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Err(ClientError::Api {
                status: 403,
                code,
                reasons,
                ..
            }) if code == "policy_denied" => Some(reasons),
            _ => None,
        })
        .collect();
    assert_eq!(signed, 10, "{results:?}");
    assert_eq!(denied.len(), 6, "{results:?}");
    assert!(
        denied
            .iter()
            .all(|r| r.iter().any(|x| x.rule == "daily_limit"))
    );

    let budget = rt.block_on(client.policy()).unwrap();
    assert_eq!(
        budget.limits[0].spent_24h_base_units,
        10 * SPEND,
        "counter = 10 × (amount + fee)"
    );
    if commit_delay_us.is_some() {
        let health = rt.block_on(client.health()).unwrap();
        assert!(
            health.ledger.largest_batch >= 2,
            "intents shared durable commits: {:?}",
            health.ledger
        );
    }
    assert_eq!(budget.limits[0].remaining_24h, "0");
    let verify = inst.audit_verify();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Restart: the counter is unchanged and the 11th is still denied.
    assert!(inst.stop().success());
    inst.start();
    let client = inst.client();
    let budget = rt.block_on(client.policy()).unwrap();
    assert_eq!(budget.limits[0].spent_24h_base_units, 10 * SPEND);
    let err = rt
        .block_on(client.submit_intent(&transfer("c-after", &to, "0.1")))
        .unwrap_err();
    match err {
        ClientError::Api {
            status: 403,
            reasons,
            ..
        } => assert!(reasons.iter().any(|r| r.rule == "daily_limit")),
        other => panic!("expected daily_limit denial, got {other:?}"),
    }
    // Even a tiny amount is denied: nothing is left.
    let err = rt
        .block_on(client.submit_intent(&transfer("c-tiny", &to, "0.000000001")))
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 403, reasons, .. } if reasons.iter().any(|r| r.rule == "daily_limit")),
        "{err:?}"
    );
    // Ten signatures in the ledger, one for each signed intent.
    let trail = IntentTrail::of(&inst.db);
    assert_eq!(trail.signed.len(), 10, "{trail:?}");
    for r in &results {
        if let Ok(IntentOutcome::Signed(s)) = r {
            assert_eq!(
                trail.signed.get(&s.intent_id),
                Some(&vec![s.signature.clone()])
            );
        }
    }
    assert!(inst.audit_verify().status.success());
}

fn kill_9_run(commit_delay_us: Option<u64>) {
    let to = random_pubkey();
    // The same requests are sent again after the restart (same ids, same
    // content), so they are built once: five signed one by one before the
    // crash, then eleven concurrently.
    let reqs: Vec<_> = (0..16)
        .map(|i| transfer(&format!("k-{i}"), &to, "0.1"))
        .collect();
    // With group commit, requests arrive spread over several batches, so
    // that one batch has committed signatures while the next is in flight.
    let (stagger_ms, need_committed) = match commit_delay_us {
        Some(_) => (15, true),
        None => (2, false),
    };
    let (inst, outcome) = crash_run(
        8,
        || instance(commit_delay_us),
        &reqs[..5],
        &reqs[5..],
        std::time::Duration::from_millis(stagger_ms),
        need_committed,
        10,
    );
    assert!(!outcome.interrupted.is_empty());
    assert_eq!(outcome.total_signed, 10);
    let rt = rt();
    let budget = rt.block_on(inst.client().policy()).unwrap();
    assert_eq!(
        budget.limits[0].spent_24h_base_units,
        10 * SPEND,
        "interrupted reservations were released"
    );
    assert_eq!(budget.limits[0].remaining_24h, "0");
    assert!(inst.audit_verify().status.success());
}
