//! The signing service in-process on the in-memory HSM mock (no SoftHSM2),
//! every HSM call behind the executor: decisions that need no HSM never
//! wait for it, a full queue answers `hsm_busy` and keeps nothing reserved,
//! a call that times out releases its reservation and no signature, and
//! the service's concurrency and failure guarantees hold on the mock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FEE, MockService, ledger_entries, mock_service, random_pubkey, settings, transfer};
use keyward::hsm::{ExecutorSettings, HsmError, HsmOp};
use keyward::policy::AgentPolicy;
use keyward::service::{SubmitError, SubmitOutcome};
use keyward_client::wire::IntentRequest;

/// 0.1 SOL plus the signature fee.
const SPEND: u64 = 100_000_000 + FEE;
const DEV_UID: u32 = 1001;
const OTHER_UID: u32 = 1002;

/// `dev` may spend exactly ten transfers of 0.1 SOL a day; `other` at
/// most 0.01 SOL per transaction.
fn policy_text() -> String {
    format!(
        "[agents.dev]\nuid = {DEV_UID}\nkeys = [\"hot\"]\nbreaker = {{ max_consecutive_denials = 1000 }}\n\n\
         [agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"{}\"\n\n\
         [agents.other]\nuid = {OTHER_UID}\nkeys = [\"hot\"]\n\n\
         [agents.other.limits.SOL]\nper_tx = \"0.01\"\nper_day = \"1\"\n",
        keyward::amount::format_units(u128::from(10 * SPEND), 9)
    )
}

fn service(workers: usize, s: ExecutorSettings) -> MockService {
    mock_service(&policy_text(), workers, s)
}

impl MockService {
    fn agent(&self, uid: u32) -> AgentPolicy {
        self.signer.agent_for_uid(uid).unwrap()
    }

    /// Submits as `uid` on a task of its own.
    fn spawn(
        &self,
        uid: u32,
        req: IntentRequest,
    ) -> tokio::task::JoinHandle<Result<SubmitOutcome, SubmitError>> {
        let (signer, agent) = (Arc::clone(&self.signer), self.agent(uid));
        tokio::spawn(async move { signer.submit(&agent, req).await })
    }

    /// What `dev` has spent or reserved in the rolling window.
    async fn spent(&self) -> u64 {
        let view = self.signer.policy_view(&self.agent(DEV_UID)).await.unwrap();
        view.limits[0].spent_24h_base_units
    }

    /// Ledger payloads of `event` for intent `id`.
    fn entries(&self, event: &str, id: &str) -> Vec<serde_json::Value> {
        ledger_entries(&self.db, event)
            .into_iter()
            .filter(|(i, _)| i.as_deref() == Some(id))
            .map(|(_, p)| p)
            .collect()
    }

    async fn is_forgotten(&self, id: &str) -> bool {
        self.signer
            .intent_view(&self.agent(DEV_UID), id)
            .await
            .unwrap()
            .is_none()
    }

    /// One signature held inside the device and one call in the queue.
    async fn fill_the_queue(
        &self,
        to: &solana_sdk::pubkey::Pubkey,
    ) -> Vec<tokio::task::JoinHandle<Result<SubmitOutcome, SubmitError>>> {
        self.mock.close_gate(HsmOp::Sign);
        let held = self.spawn(DEV_UID, transfer("held", to, "0.1"));
        wait_until("a signature held in the HSM", || {
            self.mock.held(HsmOp::Sign) == 1
        })
        .await;
        let queued = self.spawn(DEV_UID, transfer("queued", to, "0.1"));
        wait_until("a signature queued", || self.exec.stats().queued == 1).await;
        vec![held, queued]
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn signed(outcome: Result<SubmitOutcome, SubmitError>) -> keyward_client::wire::SignedIntent {
    match outcome {
        Ok(SubmitOutcome::Signed(s)) => s,
        other => panic!("expected signed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_denial_for_another_agent_is_answered_while_signatures_are_held_and_the_queue_is_full() {
    let svc = service(1, settings(1, 0, 600_000));
    let to = random_pubkey();
    let waiting = svc.fill_the_queue(&to).await;

    // Policy denies `other` 1 SOL (per_tx 0.01): decided and recorded with
    // the HSM's worker held and its queue full.
    let outcome = svc
        .signer
        .submit(&svc.agent(OTHER_UID), transfer("denied", &to, "1"))
        .await;
    match outcome {
        Ok(SubmitOutcome::Denied(reasons)) => {
            assert!(
                reasons.iter().any(|r| r.rule == "per_tx_limit"),
                "{reasons:?}"
            )
        }
        other => panic!("expected a policy denial, got {other:?}"),
    }
    // Answered while the signatures were still held: nothing got through.
    assert_eq!(svc.mock.held(HsmOp::Sign), 1);
    assert_eq!(svc.exec.stats().queued, 1);
    assert_eq!(svc.mock.succeeded(HsmOp::Sign), 0);
    let denied = svc.entries("signing_denied", "denied");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["code"], "policy_denied");

    svc.mock.open_gate(HsmOp::Sign);
    for t in waiting {
        signed(t.await.unwrap());
    }
    assert_eq!(svc.spent().await, 2 * SPEND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_hsm_busy_and_keeps_nothing_reserved() {
    let svc = service(1, settings(1, 0, 600_000));
    let to = random_pubkey();
    let waiting = svc.fill_the_queue(&to).await;
    let before = svc.spent().await;
    assert_eq!(before, 2 * SPEND, "the held and the queued intent");

    let req = transfer("busy", &to, "0.1");
    match svc.signer.submit(&svc.agent(DEV_UID), req.clone()).await {
        Err(e @ SubmitError::Hsm(HsmError::Busy { .. })) => {
            assert_eq!(e.code(), "hsm_busy");
            assert_eq!(keyward::api::submit_error_status(&e).as_u16(), 503);
        }
        other => panic!("expected hsm_busy, got {other:?}"),
    }
    assert_eq!(svc.spent().await, before, "nothing stays reserved");
    assert_eq!(svc.mock.calls(HsmOp::Sign), 1, "the HSM was not asked");
    // Recorded as a failed HSM call is: denied with the code, released,
    // and forgotten so that the same intent can be sent again.
    let denied = svc.entries("signing_denied", "busy");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["code"], "hsm_busy");
    assert!(svc.entries("signature_created", "busy").is_empty());
    assert!(svc.is_forgotten("busy").await);
    assert_eq!(svc.exec.stats().op(HsmOp::Sign).busy, 1);

    svc.mock.open_gate(HsmOp::Sign);
    for t in waiting {
        signed(t.await.unwrap());
    }
    signed(svc.signer.submit(&svc.agent(DEV_UID), req).await);
    assert_eq!(svc.spent().await, 3 * SPEND);
    assert_eq!(svc.entries("signature_created", "busy").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signature_that_times_out_releases_its_reservation_and_is_never_released() {
    let svc = service(1, settings(4, 0, 300));
    let to = random_pubkey();
    svc.mock.close_gate(HsmOp::Sign);
    let req = transfer("slow", &to, "0.1");
    match svc.signer.submit(&svc.agent(DEV_UID), req.clone()).await {
        Err(e @ SubmitError::Hsm(_)) => {
            assert_eq!(e.code(), "hsm_unavailable");
            assert!(e.to_string().contains("timed out"), "{e}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(svc.spent().await, 0, "the reservation is released");
    let denied = svc.entries("signing_denied", "slow");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["code"], "hsm_unavailable");
    assert!(
        denied[0]["detail"].as_str().unwrap().contains("timed out"),
        "{denied:?}"
    );
    assert!(svc.is_forgotten("slow").await);

    // The device finishes the signature after all: it is dropped unread.
    assert_eq!(svc.mock.held(HsmOp::Sign), 1);
    svc.mock.open_gate(HsmOp::Sign);
    wait_until("the late signature", || {
        svc.mock.succeeded(HsmOp::Sign) == 1 && svc.exec.stats().running == 0
    })
    .await;
    assert!(svc.entries("signature_created", "slow").is_empty());
    assert!(svc.is_forgotten("slow").await);
    assert_eq!(svc.spent().await, 0);
    assert_eq!(svc.exec.stats().op(HsmOp::Sign).timed_out, 1);

    // Sent again, it signs once.
    signed(svc.signer.submit(&svc.agent(DEV_UID), req).await);
    assert_eq!(svc.entries("signature_created", "slow").len(), 1);
    assert_eq!(svc.spent().await, SPEND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_signers_against_a_limit_for_ten_sign_exactly_ten_on_the_mock() {
    let svc = service(4, settings(64, 1_000, 600_000));
    // Signatures overlap each other and the ledger writes.
    svc.mock.set_delay(HsmOp::Sign, Duration::from_millis(5));
    let to = random_pubkey();
    let tasks: Vec<_> = (0..16)
        .map(|i| svc.spawn(DEV_UID, transfer(&format!("c-{i}"), &to, "0.1")))
        .collect();
    let mut signatures = Vec::new();
    let mut denied = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(SubmitOutcome::Signed(s)) => signatures.push(s),
            Ok(SubmitOutcome::Denied(reasons)) => {
                assert!(
                    reasons.iter().any(|r| r.rule == "daily_limit"),
                    "{reasons:?}"
                );
                denied += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((signatures.len(), denied), (10, 6));
    assert_eq!(svc.spent().await, 10 * SPEND, "never overspent");
    assert_eq!(ledger_entries(&svc.db, "signature_created").len(), 10);
    assert_eq!(svc.mock.succeeded(HsmOp::Sign), 10);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&svc.hot.public_key.0).unwrap();
    for s in &signatures {
        assert_eq!(svc.entries("signature_created", &s.intent_id).len(), 1);
        let sig: [u8; 64] = bs58::decode(&s.signature)
            .into_vec()
            .unwrap()
            .try_into()
            .unwrap();
        use base64::Engine as _;
        let tx = base64::engine::general_purpose::STANDARD
            .decode(&s.transaction)
            .unwrap();
        vk.verify_strict(&tx[65..], &ed25519_dalek::Signature::from_bytes(&sig))
            .unwrap();
    }
    let stats = svc.exec.stats();
    assert_eq!(stats.workers, 4);
    assert!(stats.max_queued <= 64 && stats.op(HsmOp::Sign).completed == 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_hsm_that_fails_to_sign_fails_closed_and_releases_the_reservation() {
    let svc = service(2, settings(16, 1_000, 600_000));
    let to = random_pubkey();
    svc.mock.fail_next(HsmOp::Sign, 1);
    let req = transfer("h", &to, "0.1");
    match svc.signer.submit(&svc.agent(DEV_UID), req.clone()).await {
        Err(e @ SubmitError::Hsm(_)) => assert_eq!(e.code(), "hsm_unavailable"),
        other => panic!("expected hsm_unavailable, got {other:?}"),
    }
    assert_eq!(svc.spent().await, 0);
    let denied = svc.entries("signing_denied", "h");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["code"], "hsm_unavailable");
    assert!(svc.entries("signature_created", "h").is_empty());
    assert!(svc.is_forgotten("h").await);

    signed(svc.signer.submit(&svc.agent(DEV_UID), req).await);
    assert_eq!(svc.spent().await, SPEND);
    assert_eq!(svc.exec.stats().op(HsmOp::Sign).failed, 1);
}
