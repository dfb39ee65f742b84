//! The operations service and the signing service share one core: what an
//! operator puts in force through `Operations` is what the `Signer` decides
//! under, at once, with nothing copied between them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{MockService, mock_service, random_pubkey, settings, transfer};
use keyward::hsm::Hsm as _;
use keyward::service::SubmitOutcome;
use keyward::types::KeyName;

const DEV_UID: u32 = 1001;
const NEW_UID: u32 = 1003;

fn limits(agent: &str) -> String {
    format!("[agents.{agent}.limits.SOL]\nper_tx = \"1\"\nper_day = \"10\"\n\n")
}

/// A policy with agent `dev` on key `hot`.
fn dev_policy() -> String {
    format!(
        "[agents.dev]\nuid = {DEV_UID}\nkeys = [\"hot\"]\n\n{}",
        limits("dev")
    )
}

/// The services on the mock HSM under [`dev_policy`].
fn service() -> MockService {
    mock_service(&dev_policy(), 1, settings(8, 1_000, 10_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reloaded_through_operations_is_in_force_for_the_signer_with_its_new_key() {
    let before = dev_policy();
    let svc = service();
    assert!(svc.signer.agent_for_uid(NEW_UID).is_none());
    // A key the HSM has but the policy in force does not name yet.
    let cold = svc
        .mock
        .generate_ed25519(&KeyName::new("cold").unwrap())
        .unwrap();
    let after = format!(
        "{before}[agents.new]\nuid = {NEW_UID}\nkeys = [\"cold\"]\n\n{}",
        limits("new")
    );
    std::fs::write(&svc.policy_path, after).unwrap();

    let reloaded = svc.operations.reload_policy("test").await.unwrap();

    // The signer reads the policy and the keys the reload put in force.
    assert_eq!(svc.signer.policy().hash_hex(), reloaded.policy_sha256);
    let agent = svc
        .signer
        .agent_for_uid(NEW_UID)
        .expect("the new agent is in force for the signer");
    let mut req = transfer("cold-1", &random_pubkey(), "0.1");
    req.key = "cold".to_owned();
    match svc.signer.submit(&agent, req).await.unwrap() {
        SubmitOutcome::Signed(s) => assert!(!s.signature.is_empty()),
        other => panic!("expected signed with the reloaded key, got {other:?}"),
    }
    assert_eq!(
        svc.signer
            .core()
            .keys()
            .get(&cold.name)
            .map(|k| k.public_key),
        Some(cold.public_key)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_reloaded_through_operations_leaves_the_signer_on_the_old_one() {
    let before = dev_policy();
    let svc = service();
    let hash = svc.signer.policy().hash_hex();
    std::fs::write(
        &svc.policy_path,
        format!(
            "{before}[agents.new]\nuid = {NEW_UID}\nkeys = [\"missing\"]\n\n{}",
            limits("new")
        ),
    )
    .unwrap();

    let refused = svc.operations.reload_policy("test").await.unwrap_err();

    assert_eq!(refused.code(), "key_not_found");
    assert_eq!(svc.signer.policy().hash_hex(), hash);
    assert!(svc.signer.agent_for_uid(NEW_UID).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_resets_the_breaker_of_an_agent_in_force_and_refuses_any_other_name() {
    let svc = service();

    let refused = svc
        .operations
        .reset_breaker("nobody", "uid:0")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "unknown_breaker");
    assert!(common::ledger_entries(&svc.db, "breaker_reset").is_empty());

    let seq = svc.operations.reset_breaker("dev", "uid:0").await.unwrap();
    let resets = common::ledger_entries(&svc.db, "breaker_reset");
    assert_eq!(resets.len(), 1, "{resets:?}");
    assert_eq!(resets[0].1["breaker"], "dev");
    assert_eq!(resets[0].1["by"], "uid:0");
    assert!(seq > 0);
}
