//! One decision path: the decision made again at an approval quorum
//! records exactly what admission records (issue #15), on the signing
//! service in this process over the in-memory mock HSM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use keyward::approval::{TokenPayload, Verdict};
use keyward::service::{ApprovalOutcome, SubmitOutcome};

const UID: u32 = 1001;

/// `dev` may spend 0.1 SOL a day; above 0.05 SOL an intent needs alice's
/// approval; `max_denials` denials in a row lock it.
fn policy(max_denials: u32) -> String {
    format!(
        "[agents.dev]\nuid = {UID}\nkeys = [\"hot\"]\n\
         breaker = {{ max_consecutive_denials = {max_denials}, cooldown_s = 3600 }}\n\n\
         [agents.dev.limits.SOL]\nper_tx = \"0.1\"\nper_day = \"0.1\"\napproval_above = \"0.05\"\n\
         approvers = {{ required = 1, of = [\"alice\"] }}\n"
    )
}

struct Case {
    svc: MockService,
    alice: zeroize::Zeroizing<Vec<u8>>,
}

async fn case(max_denials: u32) -> Case {
    let svc = mock_service(&policy(max_denials), 2, settings(64, 1_000, 60_000));
    let alice = svc.operations.add_approver("alice", "test").await.unwrap();
    Case { svc, alice }
}

impl Case {
    fn agent(&self) -> keyward::policy::AgentPolicy {
        self.svc.signer.agent_for_uid(UID).unwrap()
    }

    async fn submit(&self, id: &str, amount: &str) -> SubmitOutcome {
        let req = transfer(id, &random_pubkey(), amount);
        self.svc.signer.submit(&self.agent(), req).await.unwrap()
    }

    /// Submits an intent that waits for alice and returns her token for it.
    async fn pending(&self, id: &str, amount: &str) -> String {
        let SubmitOutcome::Pending(p) = self.submit(id, amount).await else {
            panic!("{id}: expected to wait for approval");
        };
        let now = keyward::ledger::now_ms() / 1000;
        keyward::approval::make(
            &self.alice,
            &TokenPayload {
                intent_hash: p.approval.intent_hash.clone(),
                approver: "alice".into(),
                decision: Verdict::Approve,
                issued_at: now,
                expires_at: now + 600,
                nonce: hex::encode(rand::random::<[u8; 16]>()),
            },
        )
        .unwrap()
    }

    /// Event names of intent `id`, in order.
    fn events(&self, id: &str) -> Vec<String> {
        intent_entries(&self.svc.db, id)
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    /// What `id` recorded after `marker` (its last occurrence).
    fn after(&self, id: &str, marker: &str) -> Vec<(String, serde_json::Value)> {
        let all = intent_entries(&self.svc.db, id);
        let at = all
            .iter()
            .rposition(|(e, _)| e == marker)
            .unwrap_or_else(|| panic!("{id}: no {marker} in {all:?}"));
        all[at + 1..].to_vec()
    }
}

fn names(entries: &[(String, serde_json::Value)]) -> Vec<&str> {
    entries.iter().map(|(e, _)| e.as_str()).collect()
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.retain(|k| k != "after_approvals");
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_at_the_quorum_that_trips_the_breaker_records_breaker_tripped() {
    let c = case(1).await;
    let token = c.pending("big", "0.08").await;
    // 0.04 more is signed meanwhile: 0.08 no longer fits the 0.1 a day.
    assert!(matches!(
        c.submit("small", "0.04").await,
        SubmitOutcome::Signed(_)
    ));
    match c
        .svc
        .signer
        .add_approval(&c.agent(), "big", &token)
        .await
        .unwrap()
    {
        ApprovalOutcome::Denied(reasons) => {
            assert!(
                reasons.iter().any(|r| r.rule == "daily_limit"),
                "{reasons:?}"
            )
        }
        other => panic!("expected a denial at the quorum, got {other:?}"),
    }
    let after = c.after("big", "approval_granted");
    assert_eq!(
        names(&after),
        ["policy_evaluated", "breaker_tripped", "signing_denied"],
        "{after:?}"
    );
    assert_eq!(after[0].1["decision"], "deny");
    assert_eq!(after[0].1["after_approvals"], 1);
    assert_eq!(after[1].1["breaker"], "dev");
    assert_eq!(after[1].1["consecutive_denials"], 1);
    assert_eq!(after[2].1["code"], "policy_denied");
    // The trip holds: the next intent finds the agent locked.
    assert!(matches!(
        c.submit("next", "0.01").await,
        SubmitOutcome::Locked { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_agent_at_the_quorum_records_signing_denied_as_admission_does() {
    let c = case(1).await;
    let token = c.pending("big", "0.08").await;
    // One denial locks dev (0.5 SOL is over per_tx).
    assert!(matches!(
        c.submit("over", "0.5").await,
        SubmitOutcome::Denied(_)
    ));
    // Admission of a locked agent: signing_denied {agent_locked}, no
    // policy_evaluated.
    assert!(matches!(
        c.submit("locked", "0.01").await,
        SubmitOutcome::Locked { .. }
    ));
    let admitted = c.after("locked", "intent_received");
    assert_eq!(names(&admitted), ["signing_denied"], "{admitted:?}");
    assert_eq!(admitted[0].1["code"], "agent_locked");

    // An operator relays alice's token (a locked agent does not stop a
    // relayed token): the quorum's decision finds the agent locked.
    let (_, id, outcome) = c.svc.signer.relay_approval(&token, "uid:0").await.unwrap();
    assert_eq!(id, "big");
    match outcome {
        ApprovalOutcome::Denied(reasons) => {
            assert_eq!(reasons[0].rule, "agent_locked", "{reasons:?}")
        }
        other => panic!("expected the locked agent to be denied, got {other:?}"),
    }
    let at_quorum = c.after("big", "approval_granted");
    assert_eq!(names(&at_quorum), names(&admitted), "{at_quorum:?}");
    assert_eq!(at_quorum[0].1["code"], "agent_locked");
    assert!(at_quorum[0].1["retry_after_s"].as_u64().unwrap() > 0);
    let view = c
        .svc
        .signer
        .intent_view(&c.agent(), "big")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.status, keyward_client::wire::IntentStatus::Denied);
    assert_eq!(c.svc.mock.succeeded(keyward::hsm::HsmOp::Sign), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_path_writes_the_sequence_admission_writes() {
    let c = case(100).await;
    // Waits while the others spend; denied at its quorum below.
    let deny_token = c.pending("q-deny", "0.07").await;
    // Allowed: admission and quorum.
    assert!(matches!(
        c.submit("a-allow", "0.01").await,
        SubmitOutcome::Signed(_)
    ));
    let token = c.pending("q-allow", "0.06").await;
    assert!(matches!(
        c.svc
            .signer
            .add_approval(&c.agent(), "q-allow", &token)
            .await
            .unwrap(),
        ApprovalOutcome::Signed(_)
    ));
    let admission = c.after("a-allow", "intent_received");
    let quorum = c.after("q-allow", "approval_granted");
    assert_eq!(names(&admission), ["policy_evaluated", "signature_created"]);
    assert_eq!(names(&quorum), names(&admission));
    assert_eq!(keys(&quorum[0].1), keys(&admission[0].1), "same shape");
    assert_eq!(quorum[0].1["spend"]["SOL"], 60_000_000 + FEE);
    assert_eq!(quorum[0].1["spent_24h_before"]["SOL"], 10_000_000 + FEE);

    // Denied: admission and quorum (0.01 + 0.06 + 0.07 is over 0.1).
    assert!(matches!(
        c.submit("a-deny", "0.5").await,
        SubmitOutcome::Denied(_)
    ));
    assert!(matches!(
        c.svc
            .signer
            .add_approval(&c.agent(), "q-deny", &deny_token)
            .await
            .unwrap(),
        ApprovalOutcome::Denied(_)
    ));
    let admission = c.after("a-deny", "intent_received");
    let quorum = c.after("q-deny", "approval_granted");
    assert_eq!(names(&admission), ["policy_evaluated", "signing_denied"]);
    assert_eq!(names(&quorum), names(&admission));
    assert_eq!(keys(&quorum[0].1), keys(&admission[0].1), "same shape");
    assert_eq!(keys(&quorum[1].1), keys(&admission[1].1), "same shape");
    assert_eq!(quorum[1].1["code"], "policy_denied");

    // Nothing else was written for them.
    assert_eq!(
        c.events("q-deny"),
        [
            "intent_received",
            "policy_evaluated",
            "approval_requested",
            "approval_granted",
            "policy_evaluated",
            "signing_denied"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_that_fails_verification_keeps_its_code_and_is_never_released() {
    let c = case(100).await;
    c.svc.mock.corrupt_next_signatures(1);
    let req = transfer("bad-sig", &random_pubkey(), "0.01");
    match c.svc.signer.submit(&c.agent(), req.clone()).await {
        Err(e) => {
            assert_eq!(e.code(), "hsm_bad_signature", "{e}");
            assert!(matches!(
                e,
                keyward::service::SubmitError::Hsm(keyward::hsm::HsmError::BadSignature(_))
            ));
        }
        Ok(other) => panic!("a signature that does not verify was released: {other:?}"),
    }
    let after = c.after("bad-sig", "policy_evaluated");
    assert_eq!(names(&after), ["signing_denied"], "{after:?}");
    assert_eq!(after[0].1["code"], "hsm_bad_signature");
    // Released and forgotten: the same intent signs once the device is right.
    let view = c.svc.signer.policy_view(&c.agent()).await.unwrap();
    assert_eq!(view.limits[0].spent_24h_base_units, 0);
    assert!(matches!(
        c.svc.signer.submit(&c.agent(), req).await.unwrap(),
        SubmitOutcome::Signed(_)
    ));
}
