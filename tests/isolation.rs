//! Two agents on one keywardd, each its own uid: agent `dev` is this
//! process (root), agent `other` is uid 4242, whose requests are sent by
//! perl processes started as that uid. `other` cannot see, approve, replay
//! or spend against `dev`'s intents, key, budget or breaker, and each
//! agent's counters move only with its own intents. The admin socket
//! refuses uid 4242 (neither root nor the daemon's user) and records
//! nothing; root is allowed.
//!
//! One test, because it generates the second key on the SoftHSM2 token in
//! this process before keywardd starts, and SoftHSM2 reads `SOFTHSM2_CONF`
//! from the process environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use keyward::hsm::Hsm;
use keyward::hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use keyward_client::IntentOutcome;
use keyward_client::wire::{IntentStatus, PolicyView};

/// `dev` (uid of this process) signs with `hot`, above 0.05 SOL only with
/// alice's approval; `other` (uid 4242) signs with `cold` and is locked
/// after 3 denials in a row.
const POLICY: &str = "[agents.dev]\nuid = {UID}\nkeys = [\"hot\"]\n\
breaker = { max_consecutive_denials = 3, cooldown_s = 3600 }\n\
[agents.dev.limits.SOL]\nper_tx = \"0.2\"\nper_day = \"1\"\napproval_above = \"0.05\"\n\
approvers = { required = 1, of = [\"alice\"] }\n\n\
[agents.other]\nuid = 4242\nkeys = [\"cold\"]\n\
breaker = { max_consecutive_denials = 3, cooldown_s = 3600 }\n\
[agents.other.limits.SOL]\nper_tx = \"0.1\"\nper_day = \"1\"\n";

/// Generates the key `cold` on the instance's token (before keywardd
/// starts), as an operator would with the HSM's own tools.
fn generate_cold_key(inst: &Instance) -> String {
    // SAFETY: this binary has one test; its in-process PKCS#11 module is
    // loaded below, on this thread, and no other thread is in C code that
    // reads the environment.
    #[allow(unsafe_code)]
    unsafe {
        keyward::process::set_env_single_threaded(
            "SOFTHSM2_CONF",
            &keyward::hsm::softhsm::conf_path(inst.inst_dir()),
        )
    };
    let hsm = Pkcs11Hsm::open(&Pkcs11Config {
        module: inst.config_value("module").into(),
        token_label: inst.config_value("token_label"),
        pin_file: inst.config_value("pin_file").into(),
        max_sessions: 1,
    })
    .unwrap();
    let key = hsm
        .generate_ed25519(&keyward::types::KeyName::new("cold").unwrap())
        .unwrap();
    key.public_key.to_base58()
}

/// `other`'s requests, sent as uid 4242.
struct Other<'a> {
    socket: &'a Path,
}

impl Other<'_> {
    fn get(&self, target: &str) -> (u16, String) {
        http_as(OTHER_UID, self.socket, "GET", target, "")
    }

    fn post(&self, target: &str, body: &serde_json::Value) -> (u16, String) {
        http_as(OTHER_UID, self.socket, "POST", target, &body.to_string())
    }

    fn submit(&self, req: &keyward_client::wire::IntentRequest) -> (u16, String) {
        self.post("/v1/intents", &serde_json::to_value(req).unwrap())
    }

    fn policy(&self) -> PolicyView {
        let (status, body) = self.get("/v1/policy");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

fn cold(id: &str, amount: &str) -> keyward_client::wire::IntentRequest {
    let mut req = transfer(id, &random_pubkey(), amount);
    req.key = "cold".into();
    req
}

fn denial_rules(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["error"]["reasons"]
        .as_array()
        .unwrap_or_else(|| panic!("no reasons in {body}"))
        .iter()
        .map(|r| r["rule"].as_str().unwrap().to_owned())
        .collect()
}

/// Ledger entries of `event` for `agent`, as intent ids in order.
fn entries_of(inst: &Instance, event: &str, agent: &str) -> Vec<String> {
    all_entries(inst)
        .into_iter()
        .filter(|(e, a, _)| e == event && a.as_deref() == Some(agent))
        .map(|(_, _, id)| id.unwrap_or_default())
        .collect()
}

#[test]
fn two_agents_cannot_reach_each_others_intents_keys_budgets_or_breakers() {
    require_other_uids();
    let mut inst = Instance::init();
    let cold_pubkey = generate_cold_key(&inst);
    inst.write_policy(POLICY);
    inst.start();
    open_up(&inst, &inst.agent_socket.clone());
    let other = Other {
        socket: &inst.agent_socket,
    };
    let dev = inst.client();
    let dev_spent = || rt().block_on(dev.policy()).unwrap().limits[0].spent_24h_base_units;

    // Each agent sees its own policy.
    let p = other.policy();
    assert_eq!(p.agent, "other");
    assert_eq!(p.keys, ["cold"]);
    assert_eq!(rt().block_on(dev.policy()).unwrap().agent, "dev");

    // dev: two signed intents and one waiting for alice.
    let a1 = transfer("a-1", &random_pubkey(), "0.01");
    let IntentOutcome::Signed(a1_signed) = rt().block_on(dev.submit_intent(&a1)).unwrap() else {
        panic!("a-1 not signed")
    };
    let IntentOutcome::Signed(shared_dev) = rt()
        .block_on(dev.submit_intent(&transfer("shared", &random_pubkey(), "0.02")))
        .unwrap()
    else {
        panic!("shared not signed for dev")
    };
    match rt()
        .block_on(dev.submit_intent(&transfer("a-pending", &random_pubkey(), "0.08")))
        .unwrap()
    {
        IntentOutcome::Pending(_) => {}
        other => panic!("a-pending: expected 202, got {other:?}"),
    }
    let dev_spent_before = dev_spent();
    assert_eq!(dev_spent_before, 30_000_000 + 2 * FEE);
    let o = other.policy();
    assert_eq!(o.limits[0].spent_24h_base_units, 0);

    // Enrol alice (root, admin socket) and have her approve a-pending.
    let work = tempfile::tempdir().unwrap();
    let alice_key = work.path().join("alice.key");
    let out = inst.keyward(&[
        "approver",
        "add",
        "alice",
        "--out",
        alice_key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = rt().block_on(dev.get_intent("a-pending")).unwrap();
    let request = work.path().join("a-pending.json");
    std::fs::write(&request, serde_json::to_vec(&view).unwrap()).unwrap();
    let out = inst.keyward(&[
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        "alice",
        "--key-file",
        alice_key.to_str().unwrap(),
        "--yes",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let recorded_before = recorded_entries(&inst);

    // other cannot see dev's intents.
    for id in ["a-1", "shared", "a-pending"] {
        let (status, body) = other.get(&format!("/v1/intents/{id}"));
        assert_eq!(
            (status, error_code(&body).as_str()),
            (404, "intent_not_found"),
            "{id}: {body}"
        );
    }
    // other cannot approve dev's intent with alice's valid token.
    let (status, body) = other.post(
        "/v1/intents/a-pending/approvals",
        &serde_json::json!({ "token": token }),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "intent_not_found"),
        "{body}"
    );
    assert_eq!(
        recorded_entries(&inst),
        recorded_before,
        "nothing recorded for the refusals"
    );
    let view = rt().block_on(dev.get_intent("a-pending")).unwrap();
    assert_eq!(view.status, IntentStatus::PendingApproval);

    // other cannot replay dev's signed intent: the same id and body is
    // other's own intent, and dev's key is not other's.
    let (status, body) = other.submit(&a1);
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "policy_denied"),
        "{body}"
    );
    assert_eq!(denial_rules(&body), ["key_not_allowed"]);
    assert!(!body.contains(&a1_signed.signature), "{body}");
    // An id dev used is free for other, signed with other's key only.
    let (status, body) = other.submit(&cold("shared", "0.03"));
    assert_eq!(status, 200, "{body}");
    let mine: keyward_client::wire::SignedIntent = serde_json::from_str(&body).unwrap();
    assert_ne!(mine.signature, shared_dev.signature);
    let tx: solana_sdk::transaction::Transaction = bincode::deserialize(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &mine.transaction,
        )
        .unwrap(),
    )
    .unwrap();
    tx.verify().unwrap();
    assert_eq!(tx.message.account_keys[0].to_string(), cold_pubkey);
    // dev's view of `shared` is its own, untouched.
    let view = rt().block_on(dev.get_intent("shared")).unwrap();
    assert_eq!(
        view.signature.as_deref(),
        Some(shared_dev.signature.as_str())
    );

    // Budgets: other's spend moved other's counter only.
    assert_eq!(dev_spent(), dev_spent_before);
    assert_eq!(
        other.policy().limits[0].spent_24h_base_units,
        30_000_000 + FEE
    );

    // Breakers: three denials in a row lock other, not dev.
    for id in ["too-big-1", "too-big-2", "too-big-3"] {
        let (status, body) = other.submit(&cold(id, "0.15"));
        assert_eq!(status, 403, "{body}");
        assert_eq!(denial_rules(&body), ["per_tx_limit"], "{body}");
    }
    let (status, body) = other.submit(&cold("locked", "0.01"));
    assert_eq!(
        (status, error_code(&body).as_str()),
        (423, "agent_locked"),
        "{body}"
    );
    let ob = other.policy().breaker.unwrap();
    assert!(ob.locked_until.is_some(), "{ob:?}");
    let db = rt().block_on(dev.policy()).unwrap().breaker.unwrap();
    assert_eq!((db.consecutive_denials, db.locked_until), (0, None));
    // dev still signs, and alice's token was not used up by other's try.
    let IntentOutcome::Signed(_) = rt()
        .block_on(dev.submit_intent(&transfer("a-2", &random_pubkey(), "0.01")))
        .unwrap()
    else {
        panic!("dev locked by other's denials")
    };
    let IntentOutcome::Signed(approved) = rt()
        .block_on(dev.add_approval("a-pending", &token))
        .unwrap()
    else {
        panic!("alice's token no longer signs dev's intent")
    };
    assert_eq!(approved.intent_id, "a-pending");
    assert_eq!(dev_spent(), dev_spent_before + 90_000_000 + 2 * FEE);
    assert_eq!(
        other.policy().limits[0].spent_24h_base_units,
        30_000_000 + FEE
    );

    // The ledger: each signature under its own agent, nothing of dev's under other.
    assert_eq!(
        entries_of(&inst, "signature_created", "dev"),
        ["a-1", "shared", "a-2", "a-pending"]
    );
    assert_eq!(entries_of(&inst, "signature_created", "other"), ["shared"]);
    assert_eq!(
        entries_of(&inst, "signing_denied", "other"),
        ["a-1", "too-big-1", "too-big-2", "too-big-3", "locked"]
    );
    assert!(entries_of(&inst, "signing_denied", "dev").is_empty());
    assert!(entries_of(&inst, "approval_received", "other").is_empty());

    // The admin socket: uid 4242 is neither root nor the daemon's user.
    open_up(&inst, &inst.admin_socket.clone());
    let recorded_before = recorded_entries(&inst);
    for (method, target) in [
        ("POST", "/v1/admin/breakers/other/reset"),
        ("POST", "/v1/admin/breakers/audit/reset"),
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/policy/reload"),
    ] {
        let (status, body) = http_as(OTHER_UID, &inst.admin_socket, method, target, "{}");
        assert_eq!(
            (status, error_code(&body).as_str()),
            (403, "not_an_operator"),
            "{method} {target}: {body}"
        );
    }
    assert_eq!(
        recorded_entries(&inst),
        recorded_before,
        "a refused operator records nothing"
    );
    let (status, body) = other.submit(&cold("still-locked", "0.01"));
    assert_eq!(
        (status, error_code(&body).as_str()),
        (423, "agent_locked"),
        "{body}"
    );
    // Root is an operator: the reset is recorded and other signs again.
    let out = inst.keyward(&["breaker", "reset", "other"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resets: Vec<_> = all_entries(&inst)
        .into_iter()
        .filter(|(e, a, _)| e == "breaker_reset" && a.as_deref() == Some("other"))
        .collect();
    assert_eq!(resets.len(), 1, "{resets:?}");
    let (status, body) = other.submit(&cold("after-reset", "0.01"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(dev_spent(), dev_spent_before + 90_000_000 + 2 * FEE);
    assert_eq!(
        other.policy().limits[0].spent_24h_base_units,
        40_000_000 + 2 * FEE
    );

    assert!(inst.stop().success());
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}
