//! Key rotation and retirement end to end against a real keywardd and a
//! SoftHSM2 token (issue #18, criterion 1): after `keyward key rotate hot`
//! intents for `hot` are signed by the new key; the old key signs nothing
//! but its sweep, which goes through the agent's policy and approvals; the
//! transition statement in the ledger verifies with both public keys; the
//! name keeps its new key across a restart; `key retire` is refused before
//! the grace period and after it removes the key from the HSM (checked
//! through the backend in this process, with the daemon stopped). It runs
//! on SoftHSM2 and, in the README test command, again on MockHsm.
//!
//! One test, because it opens the SoftHSM token in this process at the end
//! and SoftHSM2 reads `SOFTHSM2_CONF` from the process environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::*;
use ed25519_dalek::{Signature, VerifyingKey};
use keyward::types::KeyName;
use keyward_client::IntentOutcome;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::transaction::Transaction;

fn policy(allowed: &Pubkey) -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\nallow_recipients = [\"{allowed}\"]\n\
         breaker = {{ max_consecutive_denials = 1000 }}\n\
         [agents.dev.limits.SOL]\nper_tx = \"10\"\nper_day = \"100\"\napproval_above = \"1\"\n\
         approvers = {{ required = 1, of = [\"alice\"] }}\n"
    )
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &std::process::Output, code: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("({code})")), "expected {code}: {err}");
    err
}

/// Signs `id` for `hot` and returns the signed transaction.
fn signed(inst: &Instance, id: &str, to: &Pubkey, amount: &str) -> Transaction {
    submit_signed(inst, &transfer(id, to, amount))
}

fn submit_signed(inst: &Instance, req: &keyward_client::wire::IntentRequest) -> Transaction {
    match rt().block_on(inst.client().submit_intent(req)).unwrap() {
        IntentOutcome::Signed(s) => tx_of(&s.transaction),
        other => panic!("{}: expected signed, got {other:?}", req.intent_id),
    }
}

fn tx_of(b64: &str) -> Transaction {
    use base64::Engine as _;
    bincode::deserialize(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// The transaction is signed by `signer` (its first signature verifies
/// under it over the message).
fn assert_signed_by(tx: &Transaction, signer: &Pubkey) {
    assert_eq!(&tx.message.account_keys[0], signer, "fee payer and signer");
    tx.verify().expect("the signature verifies");
}

fn verify_with(pk: &str, message: &[u8], sig_b58: &str) {
    let pk: [u8; 32] = bs58::decode(pk).into_vec().unwrap().try_into().unwrap();
    let sig: [u8; 64] = bs58::decode(sig_b58)
        .into_vec()
        .unwrap()
        .try_into()
        .unwrap();
    VerifyingKey::from_bytes(&pk)
        .unwrap()
        .verify_strict(message, &Signature::from_bytes(&sig))
        .expect("signature over the statement verifies");
}

fn keys(inst: &Instance) -> Vec<keyward_client::wire::AdminKeyInfo> {
    let out = ok(&inst.keyward(&["key", "list"]));
    assert!(out.contains("retiring") || out.contains("active"), "{out}");
    rt().block_on(async {
        let (status, body) = keyward_client::Client::new(&inst.admin_socket)
            .request_json::<()>(keyward_client::Method::GET, "/v1/admin/keys", None)
            .await
            .unwrap();
        assert!(status.is_success());
        serde_json::from_slice(&body).unwrap()
    })
}

fn version_of(
    keys: &[keyward_client::wire::AdminKeyInfo],
    v: u32,
) -> keyward_client::wire::AdminKeyInfo {
    keys.iter()
        .find(|k| k.name == "hot" && k.version == Some(v))
        .unwrap_or_else(|| panic!("no hot@{v} in {keys:?}"))
        .clone()
}

fn enroll_alice(inst: &Instance) -> PathBuf {
    let dir = inst.dir.path().join("approver");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("alice.key");
    ok(&inst.keyward(&["approver", "add", "alice", "--out", key.to_str().unwrap()]));
    key
}

/// alice's approval token for the pending intent `id`.
fn alice_token(inst: &Instance, id: &str, key: &std::path::Path) -> String {
    let view = rt().block_on(inst.client().get_intent(id)).unwrap();
    let request = inst
        .dir
        .path()
        .join(format!("{}.json", id.replace(':', "_")));
    std::fs::write(&request, serde_json::to_vec(&view).unwrap()).unwrap();
    let out = inst.keyward(&[
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        "alice",
        "--key-file",
        key.to_str().unwrap(),
        "--yes",
    ]);
    ok(&out).trim().to_owned()
}

/// Approves `id` with alice's token: the quorum signs it.
fn approve(inst: &Instance, id: &str, key: &std::path::Path) -> keyward_client::wire::SignedIntent {
    let token = alice_token(inst, id, key);
    match rt()
        .block_on(inst.client().add_approval(id, &token))
        .unwrap()
    {
        IntentOutcome::Signed(s) => s,
        other => panic!("expected the sweep signed at the quorum, got {other:?}"),
    }
}

/// Approves `id` with alice's token and returns the denial the quorum's
/// decision gave.
fn approve_denied(inst: &Instance, id: &str, key: &std::path::Path) -> String {
    let token = alice_token(inst, id, key);
    match rt().block_on(inst.client().add_approval(id, &token)) {
        Err(keyward_client::ClientError::Api { code, reasons, .. }) => {
            assert_eq!(code, "policy_denied");
            format!("{reasons:?}")
        }
        other => panic!("{id}: expected a denial at the quorum, got {other:?}"),
    }
}

#[test]
fn rotation_sweep_and_retirement_end_to_end() {
    let allowed = random_pubkey();
    let mut inst = Instance::init();
    inst.write_policy(&policy(&allowed));
    inst.start();
    let alice = enroll_alice(&inst);
    let v1 = inst.hot;

    // Before: v1 signs; a pending intent for v1 waits for approval.
    let before = transfer("before", &allowed, "0.5");
    let before_tx = submit_signed(&inst, &before);
    assert_signed_by(&before_tx, &v1);
    match rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("big-before", &allowed, "2")),
        )
        .unwrap()
    {
        IntentOutcome::Pending(_) => {}
        other => panic!("expected pending, got {other:?}"),
    }

    // Bad rotations change nothing.
    refused(
        &inst.keyward(&["key", "rotate", "nope", "--reason", "x"]),
        "unknown_key",
    );
    refused(
        &inst.keyward(&["key", "rotate", "hot", "--reason", " "]),
        "invalid_request",
    );
    let sweep_bad = inst.keyward(&["key", "rotate", "hot", "--reason", "x", "--sol", "1"]);
    assert_eq!(
        sweep_bad.status.code(),
        Some(2),
        "a sweep without a blockhash"
    );
    assert!(
        String::from_utf8_lossy(&sweep_bad.stderr).contains("--blockhash"),
        "{}",
        String::from_utf8_lossy(&sweep_bad.stderr)
    );
    assert!(ledger_entries(&inst.db, "key_rotated").is_empty());
    assert_eq!(version_of(&keys(&inst), 1).state, "active");

    // Rotate, with the old address's balance: the sweep is created at once.
    let bh = blockhash();
    let out = ok(&inst.keyward(&[
        "key",
        "rotate",
        "hot",
        "--reason",
        "quarterly rotation",
        "--sol",
        "3",
        "--blockhash",
        &bh,
    ]));
    assert!(out.contains("version 1 -> 2"), "{out}");
    assert!(
        out.contains("pending approval"),
        "a 3 SOL sweep needs alice: {out}"
    );
    let listed = keys(&inst);
    let (old, new) = (version_of(&listed, 1), version_of(&listed, 2));
    assert_eq!(
        (old.state.as_str(), new.state.as_str()),
        ("retiring", "active")
    );
    assert_eq!(old.public_key, v1.to_string());
    assert_eq!(new.hsm_label.as_deref(), Some("keyward-v2-hot"));
    assert!(old.rotated_at.is_some() && old.retire_after.is_some());
    assert_eq!(new.agents, vec!["dev".to_owned()]);
    let v2: Pubkey = new.public_key.parse().unwrap();
    assert_ne!(v2, v1);

    // The transition statement verifies with both public keys.
    let rotated = ledger_entries(&inst.db, "key_rotated");
    assert_eq!(rotated.len(), 1);
    let r = &rotated[0].1;
    let statement = r["statement"].as_str().unwrap();
    assert!(
        statement.contains(&format!("old: {v1} (version 1)")),
        "{statement}"
    );
    assert!(
        statement.contains(&format!("new: {v2} (version 2)")),
        "{statement}"
    );
    assert!(statement.contains("reason: quarterly rotation"));
    assert_eq!(r["old_public_key"], v1.to_string());
    assert_eq!(r["new_public_key"], v2.to_string());
    verify_with(
        &v1.to_string(),
        statement.as_bytes(),
        r["old_signature"].as_str().unwrap(),
    );
    verify_with(
        &v2.to_string(),
        statement.as_bytes(),
        r["new_signature"].as_str().unwrap(),
    );
    let generated = ledger_entries(&inst.db, "key_generated");
    assert!(
        generated.iter().any(|(_, g)| g["key"] == "hot"
            && g["version"] == 2
            && g["public_key"] == v2.to_string()),
        "{generated:?}"
    );

    // Intents for `hot` are signed by the new key now; replays keep their
    // original answer.
    assert_signed_by(&signed(&inst, "after", &allowed, "0.5"), &v2);
    assert_eq!(submit_signed(&inst, &before), before_tx);

    // The old key refuses everything but its sweep: a message it would
    // sign is denied (the name's key does not sign it), and the intent
    // pending from before the rotation is denied at its quorum.
    let msg = solana_sdk::message::Message::new_with_blockhash(
        &[solana_system_interface::instruction::transfer(
            &v1, &allowed, 1_000,
        )],
        Some(&v1),
        &random_hash(),
    );
    match rt().block_on(
        inst.client()
            .submit_intent(&sign_tx("old-key", &msg.serialize())),
    ) {
        Err(keyward_client::ClientError::Api { reasons, .. }) => assert!(
            reasons.iter().any(|r| r.rule == "key_not_signer"),
            "{reasons:?}"
        ),
        other => panic!("the old key signed a new intent: {other:?}"),
    }

    // The sweep: pending under the agent's policy, signed by the OLD key at
    // alice's approval, moving 3 SOL less the fee to the NEW address (not
    // on the allowlist, allowed as the name's own successor).
    let sweep_id = ledger_entries(&inst.db, "intent_received")
        .into_iter()
        .find(|(_, e)| e["key"] == "hot@1")
        .and_then(|(id, _)| id)
        .expect("the sweep's intent_received names hot@1");
    assert!(sweep_id.starts_with("sweep:hot:1:"), "{sweep_id}");
    let sweep = approve(&inst, &sweep_id, &alice);
    let sweep_tx = tx_of(&sweep.transaction);
    assert_signed_by(&sweep_tx, &v1);
    assert!(sweep_tx.message.account_keys.contains(&v2));
    assert_eq!(
        sweep_tx.message.recent_blockhash.to_string(),
        bh,
        "bound to the operator's blockhash"
    );
    let transfer_ix = &sweep_tx.message.instructions[0];
    let lamports = u64::from_le_bytes(transfer_ix.data[4..12].try_into().unwrap());
    assert_eq!(lamports, 3_000_000_000 - 5_000, "the balance less the fee");
    assert_eq!(
        sweep_tx.message.account_keys[usize::from(transfer_ix.accounts[1])],
        v2
    );
    let denied_at_quorum = approve_denied(&inst, "big-before", &alice);
    assert!(
        denied_at_quorum.contains("key_not_signer"),
        "the pre-rotation intent is not signed by the retiring key: {denied_at_quorum}"
    );
    // A sweep of the active version is refused.
    refused(
        &inst.keyward(&[
            "key",
            "sweep",
            "hot@2",
            "--sol",
            "1",
            "--blockhash",
            &blockhash(),
        ]),
        "key_not_retiring",
    );

    // Retire: not before the grace period, not the active version; with
    // --force a reason is required and the key goes.
    refused(
        &inst.keyward(&["key", "retire", "hot@1"]),
        "key_in_grace_period",
    );
    refused(&inst.keyward(&["key", "retire", "hot@2"]), "key_state");
    refused(&inst.keyward(&["key", "retire", "hot@9"]), "unknown_key");
    let no_reason = inst.keyward(&["key", "retire", "hot@1", "--force"]);
    assert_eq!(no_reason.status.code(), Some(2), "--force needs --reason");
    assert_eq!(version_of(&keys(&inst), 1).state, "retiring");
    assert!(ledger_entries(&inst.db, "key_retired").is_empty());
    ok(&inst.keyward(&[
        "key",
        "retire",
        "hot@1",
        "--force",
        "--reason",
        "sweep confirmed on chain",
    ]));
    let retired = ledger_entries(&inst.db, "key_retired");
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].1["forced"], true);
    assert_eq!(retired[0].1["public_key"], v1.to_string());
    assert_eq!(version_of(&keys(&inst), 1).state, "retired");
    refused(&inst.keyward(&["key", "retire", "hot@1"]), "key_state");

    // A second rotation with no grace period: v2 retires without --force.
    ok(&inst.keyward(&[
        "key",
        "rotate",
        "hot",
        "--reason",
        "drill",
        "--grace-days",
        "0",
    ]));
    let v3: Pubkey = version_of(&keys(&inst), 3).public_key.parse().unwrap();
    ok(&inst.keyward(&["key", "retire", "hot@2"]));
    assert_eq!(
        ledger_entries(&inst.db, "key_retired")[1].1["forced"],
        false
    );

    // The name keeps its newest key across a restart.
    inst.stop();
    inst.start();
    assert_signed_by(&signed(&inst, "after-restart", &allowed, "0.5"), &v3);
    let verify = inst.audit_verify();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    inst.stop();

    // Through the backend itself (PKCS#11 on SoftHSM2, the YubiHSM
    // protocol on MockHsm): the retired keys are gone from the device, the
    // active one is there with its registered public key.
    // SAFETY: this test is the binary's only one; the module is loaded
    // after this, on this thread.
    #[allow(unsafe_code)]
    unsafe {
        keyward::process::set_env_single_threaded(
            "SOFTHSM2_CONF",
            &keyward::hsm::softhsm::conf_path(inst.inst_dir()),
        )
    };
    let cfg = keyward::config::Config::load(&inst.config).unwrap();
    let hsm = keyward::hsm::open(&cfg.hsm).unwrap();
    for gone in ["hot", "keyward-v2-hot"] {
        assert_eq!(
            hsm.find_ed25519(&KeyName::new(gone).unwrap())
                .unwrap_err()
                .code(),
            "key_not_found",
            "{gone} was destroyed"
        );
    }
    let current = hsm
        .find_ed25519(&KeyName::new("keyward-v3-hot").unwrap())
        .unwrap();
    assert_eq!(current.public_key.to_base58(), v3.to_string());
}
