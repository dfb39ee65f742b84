//! Emergency freezes against a real keywardd on SoftHSM2 (issue #18,
//! acceptance criterion 2): `keyward freeze` stops signing from the very
//! next request for the scope given (everything, one agent, one key),
//! survives a restart, and `keyward unfreeze` restores it; both are in the
//! ledger, which still verifies. An intent already inside the HSM when the
//! freeze lands finishes; an approval that would complete a frozen
//! intent's quorum is turned away without using its nonce; bad requests
//! change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use keyward_client::wire::{FreezeView, HealthView, IntentRequest};
use keyward_client::{ClientError, IntentOutcome, Method};

/// Two agents (this process's uid and another one), two keys.
fn policy() -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\", \"cold\"]\n\
         breaker = {{ max_consecutive_denials = 1000 }}\n\
         [agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"10\"\napproval_above = \"0.5\"\n\
         approvers = {{ required = 2, of = [\"alice\", \"bob\"] }}\n\
         [agents.other]\nuid = {OTHER_UID}\nkeys = [\"hot\"]\n\
         [agents.other.limits.SOL]\nper_tx = \"1\"\nper_day = \"10\"\n"
    )
}

/// An instance with the key `cold` beside `hot`, on [`policy`], running
/// (with `faults` as `KEYWARD_TEST_FAULTS`, when given).
fn start(faults: Option<&str>) -> Instance {
    let mut inst = Instance::init();
    let o = inst.keyward(&["key", "create", "cold"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    inst.write_policy(&policy());
    if let Some(f) = faults {
        inst.set_env("KEYWARD_TEST_FAULTS", f);
    }
    inst.start();
    inst
}

fn on_key(mut req: IntentRequest, key: &str) -> IntentRequest {
    req.key = key.to_owned();
    req
}

fn submit(inst: &Instance, req: &IntentRequest) -> Result<IntentOutcome, ClientError> {
    rt().block_on(inst.client().submit_intent(req))
}

fn assert_signed(inst: &Instance, req: &IntentRequest) {
    match submit(inst, req) {
        Ok(IntentOutcome::Signed(s)) => assert!(!s.signature.is_empty()),
        other => panic!("{}: expected a signature, got {other:?}", req.intent_id),
    }
}

/// Asserts 423 `frozen` naming `scope`; returns the message.
fn assert_frozen(inst: &Instance, req: &IntentRequest, scope: &str) -> String {
    match submit(inst, req) {
        Err(ClientError::Api {
            status: 423,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, "frozen", "{message}");
            assert!(
                message.contains(&format!("frozen for {scope} since ")),
                "the message names the scope and since when: {message}"
            );
            message
        }
        other => panic!("{}: expected 423 frozen, got {other:?}", req.intent_id),
    }
}

/// Runs the CLI; asserts its exit status; returns stdout and stderr.
fn cli(inst: &Instance, args: &[&str], status: i32) -> String {
    let o = inst.keyward(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(status), "keyward {args:?}: {text}");
    text
}

/// `method path` with a JSON body on the admin socket: (status, body).
fn admin(inst: &Instance, method: Method, path: &str, body: &serde_json::Value) -> (u16, String) {
    let client = keyward_client::Client::new(&inst.admin_socket);
    let body = (method != Method::GET).then_some(body);
    let (status, bytes) = rt()
        .block_on(client.request_json(method, path, body))
        .unwrap();
    (
        status.as_u16(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn admin_health(inst: &Instance) -> HealthView {
    let (status, body) = admin(
        inst,
        Method::GET,
        "/v1/admin/health",
        &serde_json::Value::Null,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The rows of the `freezes` table: (scope, reason, by, seq).
fn freeze_rows(db: &Path) -> Vec<(String, String, String, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.prepare("SELECT scope, reason, by, seq FROM freezes ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// `(seq, payload)` of every entry of kind `event`.
fn entries_with_seq(db: &Path, event: &str) -> Vec<(i64, serde_json::Value)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.prepare("SELECT seq, payload FROM ledger WHERE event = ?1 ORDER BY seq")
        .unwrap()
        .query_map([event], |r| {
            let p: Vec<u8> = r.get(1)?;
            Ok((r.get(0)?, serde_json::from_slice(&p).unwrap()))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn intent_rows(db: &Path, id: &str) -> usize {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT count(*) FROM intents WHERE intent_id = ?1",
        [id],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as usize
}

fn frozen_denials(db: &Path, id: &str) -> Vec<serde_json::Value> {
    ledger_entries(db, "signing_denied")
        .into_iter()
        .filter(|(i, p)| i.as_deref() == Some(id) && p["code"] == "frozen")
        .map(|(_, p)| p)
        .collect()
}

fn assert_audit_verifies(inst: &Instance) {
    let o = inst.audit_verify();
    assert!(
        o.status.success(),
        "keyward audit verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn freeze_all_refuses_the_next_intent_survives_a_restart_and_unfreeze_restores_signing() {
    let mut inst = start(None);
    let to = random_pubkey();
    assert_signed(&inst, &transfer("before", &to, "0.1"));
    let reason = format!("incident-{}", random_pubkey());

    let out = cli(&inst, &["freeze", "--reason", &reason], 0);
    assert!(out.contains("signing frozen for all"), "{out}");

    // The very next request is refused, and the agent is not told why.
    let counters = Counters::of(&inst.db);
    let view_before = rt().block_on(inst.client().policy()).unwrap();
    let held_back = transfer("held-back", &to, "0.1");
    let message = assert_frozen(&inst, &held_back, "all");
    assert!(
        !message.contains(&reason),
        "the operator's reason reaches the agent: {message}"
    );
    let cold = on_key(transfer("cold-1", &to, "0.1"), "cold");
    assert_frozen(&inst, &cold, "all");
    assert_nothing_counted(&inst, "held-back", &counters, &view_before);
    let view_after = rt().block_on(inst.client().policy()).unwrap();
    assert_eq!(view_after.breaker, view_before.breaker, "no breaker count");
    // Recorded for the audit trail, but no intent record: the id is free.
    assert_eq!(frozen_denials(&inst.db, "held-back").len(), 1);
    assert_eq!(intent_rows(&inst.db, "held-back"), 0);

    // A dry run reports it, and counts nothing either.
    let dry = rt()
        .block_on(inst.client().dry_run(&transfer("dry", &to, "0.1")))
        .unwrap();
    assert_eq!(dry.decision, "frozen");
    assert!(dry.spend.is_empty());
    assert_eq!(Counters::of(&inst.db), counters);

    // Health: degraded with the cause; the reason on the admin socket only.
    let h = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(h.status, "degraded", "{h:?}");
    assert!(
        h.reasons
            .iter()
            .any(|r| r.contains("signing frozen for all")),
        "{h:?}"
    );
    assert_eq!(h.freezes.len(), 1);
    assert_eq!(h.freezes[0].scope, "all");
    assert_eq!(
        h.freezes[0].reason, None,
        "the agent socket shows no reason"
    );
    assert!(!serde_json::to_string(&h).unwrap().contains(&reason));
    let ah = admin_health(&inst);
    assert_eq!(ah.status, "degraded");
    assert_eq!(ah.freezes[0].reason.as_deref(), Some(reason.as_str()));

    // Survives a crash and a restart.
    inst.kill9();
    inst.start();
    wait_until(
        "the start-up log to name the freeze",
        Duration::from_secs(20),
        || inst.log().contains("signing is frozen"),
    );
    assert_frozen(&inst, &held_back, "all");
    assert_eq!(frozen_denials(&inst.db, "held-back").len(), 2);
    let listed = cli(&inst, &["freeze", "--list"], 0);
    assert!(
        listed.contains("all") && listed.contains(&reason),
        "{listed}"
    );

    // Unfreeze: the same intent id is signed now.
    let out = cli(&inst, &["unfreeze", "--reason", "contained"], 0);
    assert!(out.contains("signing unfrozen for all"), "{out}");
    assert_signed(&inst, &held_back);
    assert_signed(&inst, &cold);
    let h = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(h.status, "ok", "{h:?}");
    assert!(h.freezes.is_empty() && h.reasons.is_empty(), "{h:?}");
    assert!(freeze_rows(&inst.db).is_empty());
    assert!(cli(&inst, &["freeze", "--list"], 0).contains("no freezes in force"));

    // Both are in the ledger, with what the operator said and who.
    let frozen = entries_with_seq(&inst.db, "signing_frozen");
    assert_eq!(frozen.len(), 1);
    let (frozen_seq, f) = &frozen[0];
    assert_eq!(f["scope"], "all");
    assert_eq!(f["reason"], reason.as_str());
    assert_eq!(f["by"], format!("uid:{}", my_uid()));
    let unfrozen = entries_with_seq(&inst.db, "signing_unfrozen");
    assert_eq!(unfrozen.len(), 1);
    let (unfrozen_seq, u) = &unfrozen[0];
    assert_eq!(u["scope"], "all");
    assert_eq!(u["reason"], "contained");
    assert_eq!(u["frozen_seq"], *frozen_seq);
    assert!(unfrozen_seq > frozen_seq);
    assert_audit_verifies(&inst);
}

#[test]
fn agent_and_key_scopes_refuse_only_their_intents() {
    let inst = start(None);
    let to = random_pubkey();

    // key:cold — intents naming cold are refused, hot still signs.
    cli(
        &inst,
        &["freeze", "--key", "cold", "--reason", "cold key suspected"],
        0,
    );
    assert_frozen(
        &inst,
        &on_key(transfer("k1", &to, "0.1"), "cold"),
        "key:cold",
    );
    assert_signed(&inst, &transfer("k2", &to, "0.1"));
    // Freezing it again is idempotent: nothing new recorded.
    let entries = recorded_entries(&inst);
    let again = cli(&inst, &["freeze", "--key", "cold", "--reason", "again"], 0);
    assert!(again.contains("already frozen"), "{again}");
    assert_eq!(recorded_entries(&inst), entries);
    let rows = freeze_rows(&inst.db);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "cold key suspected", "the first reason stays");
    cli(&inst, &["unfreeze", "--key", "cold"], 0);
    assert_signed(&inst, &on_key(transfer("k1", &to, "0.1"), "cold"));

    // agent:other — this agent (dev) still signs on both keys.
    cli(
        &inst,
        &["freeze", "--agent", "other", "--reason", "other misbehaves"],
        0,
    );
    assert_signed(&inst, &transfer("a1", &to, "0.1"));
    assert_signed(&inst, &on_key(transfer("a2", &to, "0.1"), "cold"));
    // agent:dev — refused on every key, while other's freeze stays.
    cli(
        &inst,
        &["freeze", "--agent", "dev", "--reason", "dev misbehaves"],
        0,
    );
    assert_frozen(&inst, &transfer("a3", &to, "0.1"), "agent:dev");
    assert_frozen(
        &inst,
        &on_key(transfer("a4", &to, "0.1"), "cold"),
        "agent:dev",
    );
    let scopes: Vec<String> = freeze_rows(&inst.db).into_iter().map(|r| r.0).collect();
    assert_eq!(scopes, ["agent:other", "agent:dev"]);
    let h = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(h.freezes.len(), 2, "{h:?}");
    cli(&inst, &["unfreeze", "--agent", "dev"], 0);
    assert_signed(&inst, &transfer("a3", &to, "0.1"));
    let scopes: Vec<String> = freeze_rows(&inst.db).into_iter().map(|r| r.0).collect();
    assert_eq!(
        scopes,
        ["agent:other"],
        "lifting one freeze leaves the other"
    );

    // The ledger names the agent on agent-scoped entries.
    let frozen: Vec<_> = ledger_entries(&inst.db, "signing_frozen")
        .into_iter()
        .map(|(_, p)| p["scope"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(frozen, ["key:cold", "agent:other", "agent:dev"]);
    assert_eq!(ledger_entries(&inst.db, "signing_unfrozen").len(), 2);
    assert_audit_verifies(&inst);
}

#[test]
fn an_intent_inside_the_hsm_when_the_freeze_lands_is_still_signed() {
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("release-the-hsm");
    let inst = start(Some(&format!("hsm:sign_waits_for:{}", gate.display())));
    let to = random_pubkey();
    let rt = rt();
    let client = inst.client();
    let held_req = transfer("in-flight", &to, "0.1");
    let held = rt.spawn(async move { client.submit_intent(&held_req).await });
    // Admitted (its decision recorded) and now waiting inside the HSM.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !IntentTrail::of(&inst.db).admitted.contains("in-flight") {
        assert!(Instant::now() < deadline, "the intent was never admitted");
        std::thread::sleep(Duration::from_millis(20));
    }
    cli(&inst, &["freeze", "--reason", "stop everything"], 0);
    // New intents are refused at once, while the held one waits.
    assert_frozen(&inst, &transfer("after", &to, "0.1"), "all");
    assert!(!held.is_finished());
    std::fs::write(&gate, b"").unwrap();
    match rt.block_on(held).unwrap() {
        Ok(IntentOutcome::Signed(s)) => {
            assert_eq!(
                signatures_recorded(&inst.db, "in-flight"),
                vec![s.signature]
            );
        }
        other => panic!("the in-flight intent was not signed: {other:?}"),
    }
    assert!(signatures_recorded(&inst.db, "after").is_empty());
    assert_audit_verifies(&inst);
}

// ---- Approvals ----

fn enroll(inst: &Instance, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(format!("{name}.key"));
    cli(
        inst,
        &["approver", "add", name, "--out", out.to_str().unwrap()],
        0,
    );
    out
}

fn token(inst: &Instance, request: &Path, who: &str, key: &Path) -> String {
    let out = inst.keyward(&[
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        who,
        "--key-file",
        key.to_str().unwrap(),
        "--yes",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn an_approval_completing_a_frozen_intents_quorum_is_refused_and_counts_after_unfreeze() {
    let inst = start(None);
    let dir = tempfile::tempdir().unwrap();
    let alice = enroll(&inst, dir.path(), "alice");
    let bob = enroll(&inst, dir.path(), "bob");
    let to = random_pubkey();
    match submit(&inst, &transfer("big", &to, "0.8")).unwrap() {
        IntentOutcome::Pending(_) => {}
        other => panic!("expected 202, got {other:?}"),
    }
    let view = rt().block_on(inst.client().get_intent("big")).unwrap();
    let request = dir.path().join("big.request.json");
    std::fs::write(&request, serde_json::to_vec(&view).unwrap()).unwrap();
    let alice_token = token(&inst, &request, "alice", &alice);
    let bob_token = token(&inst, &request, "bob", &bob);

    cli(
        &inst,
        &["freeze", "--agent", "dev", "--reason", "review"],
        0,
    );
    // The first approval does not complete the quorum: counted as usual.
    let counted = rt()
        .block_on(inst.client().add_approval("big", &alice_token))
        .unwrap();
    assert!(matches!(counted, IntentOutcome::Pending(_)), "{counted:?}");
    // The second would: refused, nothing recorded, its nonce unused.
    let entries = recorded_entries(&inst);
    let counters = Counters::of(&inst.db);
    match rt().block_on(inst.client().add_approval("big", &bob_token)) {
        Err(ClientError::Api {
            status: 423, code, ..
        }) => assert_eq!(code, "frozen"),
        other => panic!("expected 423 frozen, got {other:?}"),
    }
    // Relayed by an operator, it takes the same path and is refused too.
    let token_file = dir.path().join("bob.token");
    std::fs::write(&token_file, &bob_token).unwrap();
    let out = cli(
        &inst,
        &["approval", "submit", token_file.to_str().unwrap()],
        1,
    );
    assert!(out.contains("frozen"), "{out}");
    assert_eq!(recorded_entries(&inst), entries, "nothing was recorded");
    assert_eq!(Counters::of(&inst.db), counters);
    assert!(signatures_recorded(&inst.db, "big").is_empty());
    assert_eq!(ledger_entries(&inst.db, "approval_granted").len(), 1);

    // After unfreeze the same token completes the quorum and signs.
    cli(&inst, &["unfreeze", "--agent", "dev"], 0);
    match rt()
        .block_on(inst.client().add_approval("big", &bob_token))
        .unwrap()
    {
        IntentOutcome::Signed(s) => {
            assert_eq!(signatures_recorded(&inst.db, "big"), vec![s.signature]);
        }
        other => panic!("expected a signature, got {other:?}"),
    }
    assert_audit_verifies(&inst);
}

#[test]
fn bad_freeze_requests_change_nothing() {
    let inst = start(None);
    let entries = recorded_entries(&inst);
    let no_reason = serde_json::json!({"scope": "all", "reason": "   "});

    // Empty reason: the CLI and the API refuse it.
    let out = cli(&inst, &["freeze", "--reason", ""], 2);
    assert!(out.contains("invalid_reason"), "{out}");
    let (status, body) = admin(&inst, Method::POST, "/v1/admin/freezes", &no_reason);
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "invalid_reason")
    );
    // Without --reason clap refuses it before anything is sent.
    cli(&inst, &["freeze"], 2);
    // Unknown agent and key (the policy in force does not name them).
    let out = cli(&inst, &["freeze", "--agent", "ghost", "--reason", "x"], 2);
    assert!(out.contains("unknown_agent"), "{out}");
    let out = cli(&inst, &["freeze", "--key", "ghost", "--reason", "x"], 2);
    assert!(out.contains("unknown_key"), "{out}");
    let (status, body) = admin(
        &inst,
        Method::POST,
        "/v1/admin/freezes",
        &serde_json::json!({"scope": "key", "target": "ghost", "reason": "x"}),
    );
    assert_eq!((status, error_code(&body).as_str()), (404, "unknown_key"));
    let (status, body) = admin(
        &inst,
        Method::POST,
        "/v1/admin/freezes",
        &serde_json::json!({"scope": "everything", "reason": "x"}),
    );
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_scope"));
    // Unfreeze of a scope not frozen.
    let out = cli(&inst, &["unfreeze"], 2);
    assert!(out.contains("not_frozen"), "{out}");
    let out = cli(&inst, &["unfreeze", "--agent", "dev"], 2);
    assert!(out.contains("not_frozen"), "{out}");
    // The agent socket has no such route.
    let body = r#"{"scope":"all","reason":"agent tries"}"#;
    let req = format!(
        "POST /v1/admin/freezes HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, _) = raw_request(&inst.agent_socket, req.as_bytes());
    assert_eq!(status, 404);
    // Another uid on the admin socket is not an operator.
    require_other_uids();
    open_up(&inst, &inst.admin_socket);
    let (status, body) = http_as(
        OTHER_UID,
        &inst.admin_socket,
        "POST",
        "/v1/admin/freezes",
        body,
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "not_an_operator")
    );

    assert_eq!(recorded_entries(&inst), entries, "nothing was recorded");
    assert!(freeze_rows(&inst.db).is_empty());
    assert_signed(&inst, &transfer("still-signs", &random_pubkey(), "0.1"));
    let views: Vec<FreezeView> = serde_json::from_str(
        &admin(
            &inst,
            Method::GET,
            "/v1/admin/freezes",
            &serde_json::Value::Null,
        )
        .1,
    )
    .unwrap();
    assert!(views.is_empty());
}
