//! The release path under failure, against a real keywardd and SoftHSM2
//! token: the fault-injection hook (`src/faults.rs`, test builds only) fails
//! the `signature_created` write after the HSM signed, makes the HSM refuse
//! to sign, or holds a signature inside the HSM call while the same intent
//! arrives again. Also: a key the agent may not use, approval tokens bound
//! to the exact message bytes, that release builds never resolve the
//! hook, and that they contain no MockHsm (issue 17, criterion 6): not in
//! the feature resolution, and the check packaging runs on the release
//! binaries' symbols (packaging/check-no-mockhsm.sh) catches a build that
//! has it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use keyward_client::wire::{Action, IntentRequest, IntentStatus};
use keyward_client::{ClientError, IntentOutcome};
use solana_sdk::pubkey::Pubkey;

const FAULTS: &str = "KEYWARD_TEST_FAULTS";

/// One SOL a day, one SOL per transaction.
fn policy() -> String {
    "[agents.dev]\nuid = {UID}\nkeys = [\"hot\"]\nbreaker = { max_consecutive_denials = 1000 }\n\
     [agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"1\"\n"
        .to_owned()
}

fn start_with_faults(faults: &str) -> Instance {
    let mut inst = Instance::init();
    inst.write_policy(&policy());
    inst.set_env(FAULTS, faults);
    inst.start();
    assert!(
        inst.log().contains("fault injection in force"),
        "the hook is not active: {}",
        inst.log()
    );
    inst
}

/// Spent (or reserved) lamports in the rolling window, from GET /v1/policy.
fn spent(inst: &Instance) -> u64 {
    rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units
}

/// Payloads of the ledger entries of `event` for intent `id`.
fn entries(inst: &Instance, event: &str, id: &str) -> Vec<serde_json::Value> {
    let conn =
        rusqlite::Connection::open_with_flags(&inst.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT payload FROM ledger WHERE event = ?1 AND intent_id = ?2 ORDER BY seq")
        .unwrap();
    stmt.query_map([event, id], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|p| serde_json::from_slice(&p.unwrap()).unwrap())
        .collect()
}

fn submit(inst: &Instance, req: &IntentRequest) -> Result<IntentOutcome, ClientError> {
    rt().block_on(inst.client().submit_intent(req))
}

fn signed(inst: &Instance, req: &IntentRequest) -> keyward_client::wire::SignedIntent {
    match submit(inst, req) {
        Ok(IntentOutcome::Signed(s)) => s,
        other => panic!("{}: expected signed, got {other:?}", req.intent_id),
    }
}

fn not_found(inst: &Instance, id: &str) {
    match rt().block_on(inst.client().get_intent(id)) {
        Err(ClientError::Api {
            status: 404, code, ..
        }) => assert_eq!(code, "intent_not_found"),
        other => panic!("{id}: expected 404 intent_not_found, got {other:?}"),
    }
}

/// POSTs `req` over the raw socket: (status, the whole JSON body).
fn post(inst: &Instance, req: &IntentRequest) -> (u16, serde_json::Value) {
    let (status, body) = raw_post(
        &inst.agent_socket,
        "application/json",
        &serde_json::to_vec(req).unwrap(),
    );
    (status, serde_json::from_str(&body).unwrap())
}

/// A 503 whose body is the error object and nothing else: no signature, no
/// transaction, no ledger reference.
fn assert_bare_error(status: u16, body: &serde_json::Value, code: &str) {
    assert_eq!(status, 503, "{body}");
    let obj = body.as_object().unwrap();
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        ["error"],
        "only an error: {body}"
    );
    assert_eq!(body["error"]["code"], code, "{body}");
    let text = body.to_string();
    for field in ["signature", "transaction", "ledger_seq", "entry_hash"] {
        assert!(!text.contains(field), "{field} in a refusal: {text}");
    }
}

#[test]
fn a_failed_signature_created_write_releases_nothing_and_recovery_frees_the_budget() {
    // The second signature_created append fails: the first intent signs
    // normally, the second is signed by the HSM and then cannot be recorded.
    let mut inst = start_with_faults("ledger:signature_created:2");
    let first = signed(&inst, &transfer("first", &random_pubkey(), "0.25"));
    let before = spent(&inst);
    assert_eq!(before, SOL / 4 + FEE);

    let lost = transfer("lost", &random_pubkey(), "0.5");
    let (status, body) = post(&inst, &lost);
    assert_bare_error(status, &body, "audit_unavailable");
    // It failed at the signature_created write, after the HSM signed: it
    // was admitted, and the injected fault is the one that fired.
    assert_eq!(entries(&inst, "intent_received", "lost").len(), 1);
    let evaluated = entries(&inst, "policy_evaluated", "lost");
    assert_eq!(evaluated.len(), 1);
    assert_eq!(evaluated[0]["decision"], "allow");
    assert!(
        inst.log().contains("ledger append fails") && inst.log().contains("signature_created"),
        "{}",
        inst.log()
    );
    assert!(entries(&inst, "signature_created", "lost").is_empty());

    // Recovery (its loop runs every 2 s) records the interruption and
    // releases the reservation.
    wait_until("the interrupted entry", Duration::from_secs(30), || {
        entries(&inst, "signing_denied", "lost")
            .iter()
            .any(|p| p["code"] == "interrupted")
    });
    assert!(entries(&inst, "signature_created", "lost").is_empty());
    assert_eq!(spent(&inst), before, "the reservation is released");
    not_found(&inst, "lost");
    // The whole remaining budget signs: nothing of "lost" is still held.
    let rest = format!("0.{:09}", SOL - before - FEE);
    let rest = signed(&inst, &transfer("rest", &random_pubkey(), &rest));
    assert_eq!(spent(&inst), SOL);
    assert_ne!(rest.signature, first.signature);
    let health = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(health.ledger.audit_breaker, "closed");

    assert_eq!(inst.stop().code(), Some(0));
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn an_hsm_that_fails_to_sign_records_the_denial_releases_and_forgets_the_intent() {
    let inst = start_with_faults("hsm:sign_fails:2");
    signed(&inst, &transfer("first", &random_pubkey(), "0.25"));
    let before = spent(&inst);
    assert_eq!(before, SOL / 4 + FEE);

    let req = transfer("h", &random_pubkey(), "0.5");
    let (status, body) = post(&inst, &req);
    assert_bare_error(status, &body, "hsm_unavailable");
    // Recorded, released and forgotten in the same write, before the answer.
    let denied = entries(&inst, "signing_denied", "h");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["code"], "hsm_unavailable");
    assert!(entries(&inst, "signature_created", "h").is_empty());
    assert_eq!(spent(&inst), before, "the reservation is released");
    not_found(&inst, "h");

    // The same intent can be sent again, and signs once the HSM works.
    signed(&inst, &req);
    assert_eq!(entries(&inst, "signature_created", "h").len(), 1);
    assert_eq!(entries(&inst, "intent_received", "h").len(), 2);
    assert_eq!(spent(&inst), before + SOL / 2 + FEE);
    assert!(
        !entries(&inst, "signing_denied", "h")
            .iter()
            .any(|p| p["code"] == "interrupted"),
        "nothing was left for recovery"
    );
}

#[test]
fn the_same_intent_sent_concurrently_is_signed_once_and_counted_once() {
    const N: usize = 6;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("release-the-hsm");
    let inst = start_with_faults(&format!("hsm:sign_waits_for:{}", gate.display()));
    let req = transfer("dup", &random_pubkey(), "0.25");
    let rt = rt();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (client, req) = (inst.client(), req.clone());
            rt.spawn(async move { client.submit_intent(&req).await })
        })
        .collect();
    // The one admitted first is held inside the HSM call until the gate
    // opens; every other copy must be answered meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tasks.iter().filter(|t| t.is_finished()).count() < N - 1 {
        assert!(
            Instant::now() < deadline,
            "{} of {N} copies answered while one is held in the HSM",
            tasks.iter().filter(|t| t.is_finished()).count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (done, held): (Vec<_>, Vec<_>) = tasks.into_iter().partition(|t| t.is_finished());
    assert_eq!(held.len(), 1, "exactly one copy is inside the HSM call");
    for t in done {
        match rt.block_on(t).unwrap() {
            Err(ClientError::Api {
                status: 409, code, ..
            }) => assert_eq!(code, "intent_in_progress"),
            other => panic!("a copy overlapping the signing got {other:?}"),
        }
    }
    assert_eq!(entries(&inst, "intent_received", "dup").len(), 1);
    assert!(entries(&inst, "signature_created", "dup").is_empty());

    std::fs::write(&gate, b"").unwrap();
    let original = match rt.block_on(held.into_iter().next().unwrap()).unwrap() {
        Ok(IntentOutcome::Signed(s)) => s,
        other => panic!("the held copy: {other:?}"),
    };
    // Once signed, the same intent replays the original.
    let again = signed(&inst, &req);
    assert_eq!(again, original);
    assert_eq!(entries(&inst, "signature_created", "dup").len(), 1);
    assert_eq!(entries(&inst, "intent_received", "dup").len(), 1);
    assert_eq!(spent(&inst), SOL / 4 + FEE, "counted once");
}

#[test]
fn an_agent_asking_for_a_key_it_may_not_use_is_denied_key_not_allowed() {
    let inst = Instance::with_policy(&policy());
    // The audit key is in the HSM (it signs checkpoints); no agent may use it.
    let conn = rusqlite::Connection::open(&inst.db).unwrap();
    let audit: Pubkey = conn
        .query_row(
            "SELECT json_extract(payload, '$.public_key') FROM ledger
             WHERE event = 'key_generated' AND json_extract(payload, '$.key') = 'keyward-audit'",
            [],
            |r| r.get::<_, String>(0),
        )
        .unwrap()
        .parse()
        .unwrap();
    drop(conn);
    let mut as_audit = transfer("audit-transfer", &random_pubkey(), "0.1");
    as_audit.key = "keyward-audit".into();
    let mut unknown = transfer("cold-transfer", &random_pubkey(), "0.1");
    unknown.key = "cold".into();
    let ix = solana_system_interface::instruction::transfer(&audit, &random_pubkey(), 1000);
    let message =
        solana_sdk::message::Message::new_with_blockhash(&[ix], Some(&audit), &random_hash());
    let mut raw = sign_tx("audit-message", &message.serialize());
    raw.key = "keyward-audit".into();

    for req in [as_audit, unknown, raw] {
        let id = req.intent_id.clone();
        match submit(&inst, &req) {
            Err(ClientError::Api {
                status: 403,
                code,
                reasons,
                ..
            }) => {
                assert_eq!(code, "policy_denied", "{id}");
                assert!(!reasons.is_empty(), "{id}");
                assert!(
                    reasons.iter().all(|r| r.rule == "key_not_allowed"),
                    "{id}: {reasons:?}"
                );
            }
            other => panic!("{id}: expected 403 key_not_allowed, got {other:?}"),
        }
        let denied = entries(&inst, "signing_denied", &id);
        assert_eq!(denied.len(), 1, "{id}");
        assert_eq!(denied[0]["code"], "policy_denied");
        assert!(entries(&inst, "signature_created", &id).is_empty(), "{id}");
        let view = rt().block_on(inst.client().get_intent(&id)).unwrap();
        assert_eq!(view.status, IntentStatus::Denied);
        assert_eq!(view.error_code.as_deref(), Some("policy_denied"));
    }
    assert_eq!(spent(&inst), 0, "nothing counted");
    let conn = rusqlite::Connection::open(&inst.db).unwrap();
    let signatures: i64 = conn
        .query_row(
            "SELECT count(*) FROM ledger WHERE event = 'signature_created'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(signatures, 0);
}

/// A SOL transfer with a chosen blockhash and memo.
fn transfer_with(id: &str, to: &Pubkey, blockhash: &str, memo: &str) -> IntentRequest {
    IntentRequest {
        intent_id: id.to_owned(),
        key: "hot".to_owned(),
        action: Action::Transfer {
            asset: "SOL".to_owned(),
            to: to.to_string(),
            amount: "0.1".to_owned(),
            recent_blockhash: blockhash.to_owned(),
            memo: Some(memo.to_owned()),
            create_recipient_account: false,
        },
    }
}

fn approval_of(inst: &Instance, id: &str) -> serde_json::Value {
    let view = rt().block_on(inst.client().get_intent(id)).unwrap();
    assert_eq!(view.status, IntentStatus::PendingApproval, "{id}");
    serde_json::to_value(view.approval.unwrap()).unwrap()
}

#[test]
fn an_approval_token_binds_the_exact_message_bytes_not_only_their_effects() {
    let mut inst = Instance::init();
    inst.write_policy(
        "[agents.dev]\nuid = {UID}\nkeys = [\"hot\"]\nbreaker = { max_consecutive_denials = 1000 }\n\
         [agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"1\"\napproval_above = \"0.05\"\n\
         approvers = { required = 1, of = [\"alice\"] }\n",
    );
    inst.start();
    let keys = tempfile::tempdir().unwrap();
    let alice = keys.path().join("alice.key");
    let o = inst.keyward(&["approver", "add", "alice", "--out", alice.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Three intents with the same effects: b differs from a only in the
    // blockhash, c only in the memo.
    let to = random_pubkey();
    let (h1, h2) = (blockhash(), blockhash());
    for req in [
        transfer_with("a", &to, &h1, "invoice 1"),
        transfer_with("b", &to, &h2, "invoice 1"),
        transfer_with("c", &to, &h1, "invoice 2"),
    ] {
        match submit(&inst, &req) {
            Ok(IntentOutcome::Pending(_)) => {}
            other => panic!("{}: expected 202, got {other:?}", req.intent_id),
        }
    }
    let (a, b, c) = (
        approval_of(&inst, "a"),
        approval_of(&inst, "b"),
        approval_of(&inst, "c"),
    );
    assert_eq!(a["summary"], b["summary"], "same effects");
    assert_eq!(a["summary"], c["summary"], "same effects");
    assert_ne!(a["message"], b["message"]);
    assert_ne!(a["message"], c["message"]);

    // alice approves a, after `keyward approve` decoded its bytes.
    let view = rt().block_on(inst.client().get_intent("a")).unwrap();
    let request = keys.path().join("a.request.json");
    std::fs::write(&request, serde_json::to_vec(&view).unwrap()).unwrap();
    let o = inst.keyward(&[
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        "alice",
        "--key-file",
        alice.to_str().unwrap(),
        "--yes",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();

    // Her token does not move to b or c.
    for id in ["b", "c"] {
        match rt().block_on(inst.client().add_approval(id, &token)) {
            Err(ClientError::Api { code, .. }) => {
                assert_eq!(code, "approval_for_other_intent", "{id}")
            }
            other => panic!("{id}: a token for a was taken for {id}: {other:?}"),
        }
        let still = approval_of(&inst, id);
        assert_eq!(still["received"], 0, "{id}: {still}");
        assert!(entries(&inst, "approval_granted", id).is_empty(), "{id}");
        assert!(entries(&inst, "signature_created", id).is_empty(), "{id}");
    }
    let hashes = [&a, &b, &c].map(|x| x["intent_hash"].as_str().unwrap().to_owned());
    assert_ne!(hashes[0], hashes[1], "the hash binds the blockhash");
    assert_ne!(hashes[0], hashes[2], "the hash binds the memo");

    // On a, it signs exactly the bytes the approver was shown.
    let s = match rt().block_on(inst.client().add_approval("a", &token)) {
        Ok(IntentOutcome::Signed(s)) => s,
        other => panic!("a: expected signed, got {other:?}"),
    };
    let shown = base64::engine::general_purpose::STANDARD
        .decode(a["message"].as_str().unwrap())
        .unwrap();
    let tx = base64::engine::general_purpose::STANDARD
        .decode(&s.transaction)
        .unwrap();
    assert_eq!(tx[0], 1, "one signature");
    assert_eq!(
        &tx[65..],
        &shown[..],
        "the signed message is the approved one"
    );
    let sig: [u8; 64] = bs58::decode(&s.signature)
        .into_vec()
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(&tx[1..65], &sig[..]);
    ed25519_dalek::VerifyingKey::from_bytes(&inst.hot.to_bytes())
        .unwrap()
        .verify_strict(&shown, &ed25519_dalek::Signature::from_bytes(&sig))
        .unwrap();
    let created = entries(&inst, "signature_created", "a");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["signature"], s.signature);
}

/// `cargo tree` with the feature resolution of a build without
/// dev-dependencies (what `cargo build --release` resolves): the features of
/// the package `keyward`.
fn release_features(extra: &[&str]) -> String {
    release_features_of("keyward", extra)
}

/// [`release_features`] for package `package` (`-i`): its features and what
/// turns each one on.
fn release_features_of(package: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "keyward",
            "-e",
            "features,no-dev",
            "-i",
            package,
            "--prefix",
            "none",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn release_builds_never_resolve_the_fault_injection_hook_or_the_mock_hsm() {
    let release = release_features(&[]);
    assert!(release.contains("keyward feature \"default\""), "{release}");
    assert!(
        !release.contains("test-hooks"),
        "a build without dev-dependencies enables the hook: {release}"
    );
    assert!(
        !release.contains("mock-hsm"),
        "a build without dev-dependencies contains the mock HSM: {release}"
    );
    // The check sees the features when something does turn them on.
    let leaked = release_features(&["--features", "test-hooks,mock-hsm"]);
    assert!(
        leaked.contains("keyward feature \"test-hooks\""),
        "{leaked}"
    );
    assert!(leaked.contains("keyward feature \"mock-hsm\""), "{leaked}");
}

#[test]
fn release_builds_never_resolve_the_yubihsm_crates_mockhsm() {
    let release = release_features_of("yubihsm", &[]);
    // The backend's own features are there: the check looks at the right
    // package.
    for feature in ["http", "usb", "passwords"] {
        assert!(
            release.contains(&format!("yubihsm feature \"{feature}\"")),
            "{feature}: {release}"
        );
    }
    assert!(
        !release.contains("mockhsm"),
        "a build without dev-dependencies contains yubihsm's MockHsm: {release}"
    );
    assert!(!release.contains("yubihsm-mock"), "{release}");
    // And it sees MockHsm when keyward's feature turns it on.
    let leaked = release_features_of("yubihsm", &["--features", "yubihsm-mock"]);
    assert!(leaked.contains("yubihsm feature \"mockhsm\""), "{leaked}");
    assert!(
        leaked.contains("keyward feature \"yubihsm-mock\""),
        "{leaked}"
    );
}

/// packaging/check-no-mockhsm.sh on `bin`: (exit code, stdout + stderr).
fn check_no_mockhsm(args: &[&str]) -> (i32, String) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join("check-no-mockhsm.sh");
    let out = Command::new(script).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_release_binary_check_finds_mockhsm_in_a_test_build_and_packaging_runs_it() {
    // The test build of `keyward` serves MockHsm (`keyward hsm
    // mock-connector`): both looks of the check must find it there, or a
    // clean result on the release binaries would prove nothing.
    let test_build = env!("CARGO_BIN_EXE_keyward");
    let (code, out) = check_no_mockhsm(&[test_build]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("contains MockHsm symbols"), "{out}");
    assert!(out.contains("yubihsm..mockhsm.."), "{out}");
    let (code, out) = check_no_mockhsm(&["--stripped", test_build]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("source paths of yubihsm's mockhsm module"),
        "{out}"
    );
    // A binary without a symbol table is not passed by the symbol look.
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("keyward-stripped");
    let st = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(test_build)
        .status()
        .unwrap();
    assert!(st.success());
    let (code, out) = check_no_mockhsm(&[stripped.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("has no symbol table"), "{out}");
    // The packaging runs it on the release binaries before stripping them,
    // and on the installed ones (the release build lives there, not in
    // this suite: packaging/test/install-test.sh).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let build = std::fs::read_to_string(root.join("packaging/build-deb.sh")).unwrap();
    let check = build
        .find("packaging/check-no-mockhsm.sh \"$release/keywardd\" \"$release/keyward\"")
        .expect("build-deb.sh checks both release binaries");
    let built = build.find("\ncargo build --release").unwrap();
    let stripped_at = build.find("\ncargo deb --no-build").unwrap();
    assert!(built < check && check < stripped_at, "{build}");
    assert!(build.contains("*yubihsm-mock*"), "{build}");
    let install = std::fs::read_to_string(root.join("packaging/test/install-test.sh")).unwrap();
    assert!(
        install.contains(
            "packaging/check-no-mockhsm.sh --stripped \"$root/usr/bin/keywardd\" \"$root/usr/bin/keyward\""
        ),
        "install-test.sh checks the installed binaries"
    );
}

#[test]
fn keywardd_refuses_to_start_on_a_fault_spec_it_does_not_understand() {
    let mut inst = Instance::init();
    inst.set_env(FAULTS, "ledger:no_such_event:1");
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("invalid KEYWARD_TEST_FAULTS entry"), "{log}");
}
