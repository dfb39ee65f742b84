//! Approvals follow the approvers and the policy in force now, refused
//! approvals cannot grow the ledger without bound, and an operator can
//! relay an approver's token (a rejection is a veto without the agent).
//! Each runs a real keywardd on a real SoftHSM2 token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use keyward_client::wire::IntentStatus;
use keyward_client::{ClientError, IntentOutcome};

/// A 2-of-3 SOL approval above 0.05, `breaker` the agent's breaker line.
fn policy_with(of: &str, required: u32, extra: &str) -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\n{extra}\n\
         [agents.dev.limits.SOL]\nper_tx = \"0.2\"\nper_day = \"1\"\napproval_above = \"0.05\"\n\
         approvers = {{ required = {required}, of = [{of}] }}\n"
    )
}

fn policy() -> String {
    policy_with(
        "\"alice\", \"bob\", \"carol\"",
        2,
        "breaker = { max_consecutive_denials = 1000 }",
    )
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Enrolls approvers; their key files are in the returned directory.
fn enroll(inst: &Instance, names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let out = dir.path().join(format!("{name}.key"));
        ok(&inst.keyward(&["approver", "add", name, "--out", out.to_str().unwrap()]));
    }
    dir
}

/// Submits a transfer that waits for approvals.
fn pending(inst: &Instance, id: &str, amount: &str) {
    match rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer(id, &random_pubkey(), amount)),
        )
        .unwrap()
    {
        IntentOutcome::Pending(_) => {}
        other => panic!("{id}: expected 202, got {other:?}"),
    }
}

/// The approval request of a pending intent, as an approver receives it.
fn request_file(inst: &Instance, id: &str, dir: &Path) -> PathBuf {
    let view = rt().block_on(inst.client().get_intent(id)).unwrap();
    assert_eq!(view.status, IntentStatus::PendingApproval);
    let path = dir.join(format!("{id}.request.json"));
    std::fs::write(&path, serde_json::to_vec(&view).unwrap()).unwrap();
    path
}

/// `keyward approve` by `who` (with `--reject` when `reject`).
fn token(inst: &Instance, request: &Path, keys: &Path, who: &str, reject: bool) -> String {
    let key = keys.join(format!("{who}.key"));
    let mut args = vec![
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        who,
        "--key-file",
        key.to_str().unwrap(),
        "--yes",
    ];
    if reject {
        args.push("--reject");
    }
    ok(&inst.keyward(&args)).trim().to_owned()
}

/// Hands a token in as the agent and expects 202 with these figures.
fn counted(inst: &Instance, id: &str, token: &str, received: u64, required: u64) {
    match rt().block_on(inst.client().add_approval(id, token)) {
        Ok(IntentOutcome::Pending(b)) => {
            assert_eq!(b.approval.received, received, "{b:?}");
            assert_eq!(b.approval.required, required, "{b:?}");
        }
        other => panic!("{id}: expected 202 with {received} of {required}, got {other:?}"),
    }
}

fn signed(inst: &Instance, id: &str, token: &str) {
    match rt().block_on(inst.client().add_approval(id, token)) {
        Ok(IntentOutcome::Signed(s)) => assert_eq!(s.intent_id, id),
        other => panic!("{id}: expected the quorum to sign, got {other:?}"),
    }
}

fn status(inst: &Instance, id: &str) -> IntentStatus {
    rt().block_on(inst.client().get_intent(id)).unwrap().status
}

/// Ledger rows other than checkpoints (which a timer may add).
fn rows(inst: &Instance) -> i64 {
    rusqlite::Connection::open(&inst.db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM ledger WHERE event != 'checkpoint'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

fn events(inst: &Instance, event: &str) -> Vec<(Option<String>, serde_json::Value, usize)> {
    let conn = rusqlite::Connection::open(&inst.db).unwrap();
    let mut stmt = conn
        .prepare("SELECT intent_id, payload FROM ledger WHERE event = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([event], |r| {
        let payload: Vec<u8> = r.get(1)?;
        Ok((
            r.get(0)?,
            serde_json::from_slice(&payload).unwrap(),
            payload.len(),
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
fn a_removed_approvers_earlier_approval_stops_counting_for_a_pending_intent() {
    let inst = Instance::with_policy(&policy());
    let keys = enroll(&inst, &["alice", "bob", "carol"]);
    pending(&inst, "p1", "0.08");
    let req = request_file(&inst, "p1", keys.path());
    counted(
        &inst,
        "p1",
        &token(&inst, &req, keys.path(), "alice", false),
        1,
        2,
    );

    ok(&inst.keyward(&["approver", "remove", "alice"]));
    let view = rt().block_on(inst.client().get_intent("p1")).unwrap();
    let approval = view.approval.unwrap();
    assert_eq!(approval.received, 0, "{approval:?}");
    assert_eq!(approval.required, 2, "{approval:?}");
    // bob's approval would be the second; alice's no longer counts.
    counted(
        &inst,
        "p1",
        &token(&inst, &req, keys.path(), "bob", false),
        1,
        2,
    );
    assert_eq!(status(&inst, "p1"), IntentStatus::PendingApproval);
    signed(
        &inst,
        "p1",
        &token(&inst, &req, keys.path(), "carol", false),
    );
    assert!(inst.audit_verify().status.success());
}

#[test]
fn approvals_follow_the_reloaded_policys_list_and_quorum() {
    let inst = Instance::with_policy(&policy());
    let keys = enroll(&inst, &["alice", "bob", "carol", "dave"]);
    pending(&inst, "p1", "0.08");
    let req = request_file(&inst, "p1", keys.path());
    counted(
        &inst,
        "p1",
        &token(&inst, &req, keys.path(), "alice", false),
        1,
        2,
    );

    // alice leaves the policy's list.
    inst.write_policy(&policy_with(
        "\"bob\", \"carol\"",
        2,
        "breaker = { max_consecutive_denials = 1000 }",
    ));
    ok(&inst.keyward(&["policy", "reload"]));
    counted(
        &inst,
        "p1",
        &token(&inst, &req, keys.path(), "bob", false),
        1,
        2,
    );
    assert_eq!(status(&inst, "p1"), IntentStatus::PendingApproval);
    let list = ok(&inst.keyward(&["approval", "list"]));
    assert!(
        list.contains("dev/p1") && list.contains("1/2 approvals"),
        "{list}"
    );
    assert!(
        list.contains("(does not count now)"),
        "alice's approval: {list}"
    );
    signed(
        &inst,
        "p1",
        &token(&inst, &req, keys.path(), "carol", false),
    );

    // A raised quorum applies to a pending intent at once.
    pending(&inst, "p2", "0.08");
    let req2 = request_file(&inst, "p2", keys.path());
    counted(
        &inst,
        "p2",
        &token(&inst, &req2, keys.path(), "bob", false),
        1,
        2,
    );
    inst.write_policy(&policy_with(
        "\"bob\", \"carol\", \"dave\"",
        3,
        "breaker = { max_consecutive_denials = 1000 }",
    ));
    ok(&inst.keyward(&["policy", "reload"]));
    counted(
        &inst,
        "p2",
        &token(&inst, &req2, keys.path(), "carol", false),
        2,
        3,
    );
    signed(
        &inst,
        "p2",
        &token(&inst, &req2, keys.path(), "dave", false),
    );

    // A policy that asks for no approval any more does not sign a pending
    // intent by itself: it stays pending until the next approval, which
    // leads to a fresh decision under the policy in force.
    pending(&inst, "p3", "0.08");
    let req3 = request_file(&inst, "p3", keys.path());
    inst.write_policy(
        "[agents.dev]\nuid = {UID}\nkeys = [\"hot\"]\n\
         [agents.dev.limits.SOL]\nper_tx = \"0.2\"\nper_day = \"1\"\n",
    );
    ok(&inst.keyward(&["policy", "reload"]));
    assert_eq!(status(&inst, "p3"), IntentStatus::PendingApproval);
    signed(&inst, "p3", &token(&inst, &req3, keys.path(), "bob", false));
    assert!(inst.audit_verify().status.success());
}

#[test]
fn refused_approvals_for_a_bad_or_foreign_intent_id_write_nothing() {
    let inst = Instance::with_policy(&policy());
    let _keys = enroll(&inst, &["alice", "bob", "carol"]);
    pending(&inst, "theirs", "0.08");

    // 300 malformed approvals for a 60 KB id: 400, nothing recorded.
    let before = rows(&inst);
    let long_id = "a".repeat(60 * 1024);
    let body = br#"{"token":"kwa1.not.a-token"}"#;
    for _ in 0..300 {
        let mut req = format!(
            "POST /v1/intents/{long_id}/approvals HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let (code, answer) = raw_request(&inst.agent_socket, &req);
        assert!((400..500).contains(&code), "{code} {answer}");
    }
    assert_eq!(rows(&inst), before, "no ledger entry for a malformed id");

    // `theirs` belongs to agent dev; uid 0 becomes agent mallory.
    inst.write_policy(
        "[agents.dev]\nuid = 4242\nkeys = [\"hot\"]\n\
         [agents.dev.limits.SOL]\nper_tx = \"0.2\"\nper_day = \"1\"\napproval_above = \"0.05\"\n\
         approvers = { required = 2, of = [\"alice\", \"bob\", \"carol\"] }\n\
         [agents.mallory]\nuid = {UID}\nkeys = [\"hot\"]\n\
         [agents.mallory.limits.SOL]\nper_tx = \"0.2\"\nper_day = \"1\"\n",
    );
    ok(&inst.keyward(&["policy", "reload"]));
    let before = rows(&inst);
    let client = inst.client();
    for _ in 0..300 {
        match rt().block_on(client.add_approval("theirs", "kwa1.not.a-token")) {
            Err(ClientError::Api { status, code, .. }) => {
                assert_eq!((status, code.as_str()), (404, "intent_not_found"))
            }
            other => panic!("expected 404, got {other:?}"),
        }
    }
    assert_eq!(
        rows(&inst),
        before,
        "no ledger entry for another agent's intent"
    );
}

#[test]
fn refused_approvals_trip_the_agents_breaker_and_write_bounded_entries() {
    let inst = Instance::with_policy(&policy_with(
        "\"alice\", \"bob\", \"carol\"",
        2,
        "breaker = { max_consecutive_denials = 3, cooldown_s = 600 }",
    ));
    let _keys = enroll(&inst, &["alice", "bob", "carol"]);
    pending(&inst, "mine", "0.08");
    let client = inst.client();
    let garbage = "x".repeat(30_000);
    for bad in ["kwa1.not.a-token", garbage.as_str(), "kwa1..", "nonsense"]
        .iter()
        .take(3)
    {
        match rt().block_on(client.add_approval("mine", bad)) {
            Err(ClientError::Api { status, code, .. }) => {
                assert_eq!((status, code.as_str()), (400, "invalid_approval_token"))
            }
            other => panic!("expected 400, got {other:?}"),
        }
    }
    match rt().block_on(client.add_approval("mine", "kwa1.not.a-token")) {
        Err(ClientError::Api {
            status: 423,
            code,
            retry_after,
            ..
        }) => {
            assert_eq!(code, "agent_locked");
            assert!(retry_after.is_some());
        }
        other => panic!("expected 423 after three refusals, got {other:?}"),
    }
    match rt().block_on(client.submit_intent(&transfer("next", &random_pubkey(), "0.01"))) {
        Err(ClientError::Api { status: 423, .. }) => {}
        other => panic!("the agent is locked for intents too: {other:?}"),
    }
    let tripped = events(&inst, "breaker_tripped");
    assert_eq!(tripped.len(), 1, "{tripped:?}");
    let refused = events(&inst, "approval_refused");
    assert_eq!(refused.len(), 4, "three refusals and one lock: {refused:?}");
    assert_eq!(refused[3].1["code"], "agent_locked");
    for (id, payload, len) in &refused {
        assert_eq!(id.as_deref(), Some("mine"));
        assert!(*len <= 512, "{len} bytes: {payload}");
    }
    assert!(inst.audit_verify().status.success());
}

#[test]
fn refused_approvals_count_toward_the_agents_rate_limit() {
    let inst = Instance::with_policy(&policy_with(
        "\"alice\", \"bob\", \"carol\"",
        2,
        "rate_limit = { per_minute = 2 }\nbreaker = { max_consecutive_denials = 1000 }",
    ));
    pending(&inst, "mine", "0.08");
    let client = inst.client();
    for _ in 0..2 {
        match rt().block_on(client.add_approval("mine", "kwa1.not.a-token")) {
            Err(ClientError::Api { status: 400, .. }) => {}
            other => panic!("expected 400, got {other:?}"),
        }
    }
    match rt().block_on(client.submit_intent(&transfer("next", &random_pubkey(), "0.01"))) {
        Err(ClientError::Api {
            status: 403,
            reasons,
            ..
        }) => assert!(
            reasons.iter().any(|r| r.rule == "rate_limited"),
            "{reasons:?}"
        ),
        other => panic!("two refusals used up the minute's two places: {other:?}"),
    }
}

#[test]
fn an_operator_relays_tokens_and_a_relayed_reject_vetoes_the_intent() {
    let inst = Instance::with_policy(&policy());
    let keys = enroll(&inst, &["alice", "bob", "carol"]);
    pending(&inst, "p1", "0.08");
    let req = request_file(&inst, "p1", keys.path());
    let work = tempfile::tempdir().unwrap();

    // An approval relayed by the operator counts.
    let alice = work.path().join("alice.token");
    std::fs::write(
        &alice,
        format!("{}\n", token(&inst, &req, keys.path(), "alice", false)),
    )
    .unwrap();
    let out = ok(&inst.keyward(&["approval", "submit", alice.to_str().unwrap()]));
    assert!(out.contains("p1 has 1 of 2 approvals"), "{out}");
    let list = ok(&inst.keyward(&["approval", "list"]));
    assert!(
        list.contains("dev/p1") && list.contains("1/2 approvals"),
        "{list}"
    );
    assert!(list.contains("alice\tapprove"), "{list}");

    // bob's rejection, relayed through stdin, ends the intent.
    let no = token(&inst, &req, keys.path(), "bob", true);
    let mut child = std::process::Command::new(KEYWARD)
        .args(["--config", inst.config.to_str().unwrap()])
        .args(["approval", "submit", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), no.as_bytes()).unwrap();
    let out = ok(&child.wait_with_output().unwrap());
    assert!(out.contains("rejected"), "{out}");

    let view = rt().block_on(inst.client().get_intent("p1")).unwrap();
    assert_eq!(view.status, IntentStatus::Denied);
    assert_eq!(view.error_code.as_deref(), Some("approval_rejected"));
    match rt().block_on(
        inst.client()
            .add_approval("p1", &token(&inst, &req, keys.path(), "carol", false)),
    ) {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "intent_not_pending"),
        other => panic!("the veto holds: {other:?}"),
    }
    let rejected = events(&inst, "approval_rejected");
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].1["relayed_by"], "uid:0");
    assert_eq!(
        events(&inst, "approval_granted")[0].1["relayed_by"],
        "uid:0"
    );
    let list = ok(&inst.keyward(&["approval", "list"]));
    assert!(!list.contains("dev/p1"), "{list}");

    // A token for no pending intent is refused and records nothing.
    let before = rows(&inst);
    let o = inst.keyward(&["approval", "submit", alice.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(rows(&inst), before);
}
