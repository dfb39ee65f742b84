//! Key rotation, sweeps and retirement at their edges (issue #18,
//! criterion 1), against real keywardd processes on SoftHSM2 tokens: an HSM
//! or ledger failure in the middle of a rotation changes nothing and leaves
//! no successor behind; racing rotations are serialized; a restart between
//! rotate and retire keeps the retiring key usable for its sweep; a key
//! replaced on the token behind keyward's back is refused by name; bad
//! sweep requests change nothing; sweeps go through the agent's policy and
//! are idempotent; retirement waits for a pending sweep and records a key
//! already gone from the token.
//!
//! Changing objects on the token needs the PKCS#11 module loaded with the
//! instance's `SOFTHSM2_CONF`, which the module reads from the process
//! environment. The tests here run in parallel threads, so that is done in
//! a child process: this binary re-run with only [`token_surgery`] (an
//! ignored test that does nothing unless its variables are set).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use keyward::hsm::Hsm as _;
use keyward::hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use keyward::types::KeyName;
use keyward_client::wire::{AdminKeyInfo, KeySweepRequest, SweepResult, SweepSpec, SweepToken};
use keyward_client::{IntentOutcome, Method};
use solana_sdk::pubkey::Pubkey;
use solana_sdk::transaction::Transaction;

const MINT: &str = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v";
const UNLISTED_MINT: &str = "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB";
const TOKEN_PROGRAM: &str = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA";
const ATA_PROGRAM: &str = "ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL";
const SYSTEM_PROGRAM: &str = "11111111111111111111111111111111";

/// One agent `dev` on `hot`: SOL up to 10 per intent, 100 a day, approval
/// by alice above 1; the mint up to 50 per intent. `extra` is appended.
fn policy(allowed: &Pubkey, extra: &str) -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\nallow_recipients = [\"{allowed}\"]\n\
         breaker = {{ max_consecutive_denials = 1000 }}\n\
         [agents.dev.limits.SOL]\nper_tx = \"10\"\nper_day = \"100\"\napproval_above = \"1\"\n\
         approvers = {{ required = 1, of = [\"alice\"] }}\n\
         [agents.dev.limits.{MINT}]\ndecimals = 6\nper_tx = \"50\"\nper_day = \"100\"\n{extra}"
    )
}

fn started(extra: &str) -> (Instance, Pubkey) {
    let allowed = random_pubkey();
    let mut inst = Instance::init();
    inst.write_policy(&policy(&allowed, extra));
    inst.start();
    (inst, allowed)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command failed and its error names `code`.
fn failed_with(out: &Output, code: &str) {
    assert!(!out.status.success(), "expected {code}: {}", text(out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("({code})")),
        "expected {code}: {}",
        text(out)
    );
}

/// An admin API request: (status, body).
fn admin<T: serde::Serialize>(
    inst: &Instance,
    method: Method,
    path: &str,
    body: Option<&T>,
) -> (u16, String) {
    rt().block_on(async {
        let (status, body) = keyward_client::Client::new(&inst.admin_socket)
            .request_json(method, path, body)
            .await
            .unwrap();
        (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
    })
}

fn keys(inst: &Instance) -> Vec<AdminKeyInfo> {
    let (status, body) = admin::<()>(inst, Method::GET, "/v1/admin/keys", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// (version, state) of every registered version of `hot`, by version.
fn hot_versions(inst: &Instance) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = keys(inst)
        .into_iter()
        .filter(|k| k.name == "hot")
        .map(|k| (k.version.expect("a registered version"), k.state))
        .collect();
    v.sort();
    v
}

fn public_key_of(inst: &Instance, version: u32) -> Pubkey {
    keys(inst)
        .into_iter()
        .find(|k| k.name == "hot" && k.version == Some(version))
        .unwrap_or_else(|| panic!("no hot@{version}"))
        .public_key
        .parse()
        .unwrap()
}

fn rotate(inst: &Instance, extra: &[&str]) -> Output {
    let mut args = vec!["key", "rotate", "hot", "--reason", "edge test"];
    args.extend_from_slice(extra);
    inst.keyward(&args)
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

/// Signs a transfer for `hot` and returns its fee payer (the signer), after
/// checking that the signature verifies.
fn signer_of_new_intent(inst: &Instance, id: &str, to: &Pubkey) -> Pubkey {
    match rt()
        .block_on(inst.client().submit_intent(&transfer(id, to, "0.1")))
        .unwrap()
    {
        IntentOutcome::Signed(s) => {
            let tx = tx_of(&s.transaction);
            tx.verify().expect("the signature verifies");
            tx.message.account_keys[0]
        }
        other => panic!("{id}: expected signed, got {other:?}"),
    }
}

fn spec(blockhash: &str, sol: Option<&str>) -> SweepSpec {
    SweepSpec {
        recent_blockhash: blockhash.to_owned(),
        sol: sol.map(str::to_owned),
        ..SweepSpec::default()
    }
}

/// `POST /v1/admin/keys/hot/sweep`: (status, body).
fn sweep(inst: &Instance, version: u32, spec: SweepSpec) -> (u16, String) {
    admin(
        inst,
        Method::POST,
        "/v1/admin/keys/hot/sweep",
        Some(&KeySweepRequest {
            version,
            sweep: spec,
        }),
    )
}

fn swept(inst: &Instance, version: u32, spec: SweepSpec) -> SweepResult {
    let (status, body) = sweep(inst, version, spec);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn count(inst: &Instance, event: &str) -> usize {
    ledger_entries(&inst.db, event).len()
}

fn hot_generated_versions(inst: &Instance) -> Vec<u64> {
    ledger_entries(&inst.db, "key_generated")
        .into_iter()
        .filter(|(_, g)| g["key"] == "hot")
        .filter_map(|(_, g)| g["version"].as_u64())
        .collect()
}

fn verifies(inst: &Instance) {
    let v = inst.audit_verify();
    assert!(v.status.success(), "audit verify: {}", text(&v));
}

/// Nothing the failed rotation could have left: no new version recorded,
/// the registry unchanged, the name still signed by v1.
fn assert_rotation_left_nothing(inst: &Instance, allowed: &Pubkey, id: &str) {
    assert_eq!(count(inst, "key_rotated"), 0);
    assert!(
        !hot_generated_versions(inst).contains(&2),
        "no key_generated for hot@2"
    );
    assert_eq!(hot_versions(inst), vec![(1, "active".to_owned())]);
    assert_eq!(signer_of_new_intent(inst, id, allowed), inst.hot);
}

/// A rotation that succeeds after failed ones makes version 2 under the
/// label `keyward-v2-hot`: generating it would have failed (key_exists)
/// had a failed rotation left its successor on the token; and a restart
/// finds no unregistered key in keyward's namespace.
fn assert_clean_rotation_after_failures(inst: &mut Instance, allowed: &Pubkey) {
    // No faults after the next restart (the counts start again there).
    inst.set_env("KEYWARD_TEST_FAULTS", "");
    let out = ok(&rotate(inst, &[]));
    assert!(out.contains("version 1 -> 2"), "{out}");
    let listed = keys(inst);
    let v2 = listed
        .iter()
        .find(|k| k.name == "hot" && k.version == Some(2))
        .unwrap();
    assert_eq!(v2.hsm_label.as_deref(), Some("keyward-v2-hot"));
    assert_eq!(
        hot_versions(inst),
        vec![(1, "retiring".to_owned()), (2, "active".to_owned())]
    );
    let v2: Pubkey = v2.public_key.parse().unwrap();
    assert_eq!(
        signer_of_new_intent(inst, "after-clean-rotation", allowed),
        v2
    );
    assert_eq!(count(inst, "key_rotated"), 1);
    inst.stop();
    inst.start();
    let log = inst.log();
    assert!(
        !log.contains("not in the key registry"),
        "a successor of a failed rotation was left on the token: {log}"
    );
    assert_eq!(signer_of_new_intent(inst, "after-restart", allowed), v2);
    verifies(inst);
}

#[test]
fn an_hsm_failure_in_either_statement_signature_changes_nothing() {
    let allowed = random_pubkey();
    let mut inst = Instance::init();
    inst.write_policy(&policy(&allowed, ""));
    // Signatures since start (the audit key's do not count): 1 = the old
    // key's over the first statement (fails), 2 = the intent after it,
    // 3 and 4 = the old and the new key's over the second statement (the
    // new key's fails).
    inst.set_env("KEYWARD_TEST_FAULTS", "hsm:sign_fails:1,hsm:sign_fails:4");
    inst.start();

    failed_with(&rotate(&inst, &[]), "hsm_unavailable");
    assert_rotation_left_nothing(&inst, &allowed, "after-old-key-failed");
    // The old key signed, the successor's signature failed.
    failed_with(&rotate(&inst, &[]), "hsm_unavailable");
    assert_rotation_left_nothing(&inst, &allowed, "after-new-key-failed");
    assert!(
        !inst
            .log()
            .contains("cannot destroy the unrecorded successor"),
        "{}",
        inst.log()
    );
    assert_clean_rotation_after_failures(&mut inst, &allowed);
}

#[test]
fn a_ledger_failure_while_recording_a_rotation_changes_nothing() {
    let allowed = random_pubkey();
    let mut inst = Instance::init();
    inst.write_policy(&policy(&allowed, ""));
    inst.set_env("KEYWARD_TEST_FAULTS", "ledger:key_rotated:1");
    inst.start();
    let before = recorded_entries(&inst);
    let out = rotate(&inst, &["--sol", "0.5", "--blockhash", &blockhash()]);
    failed_with(&out, "audit_unavailable");
    assert_eq!(recorded_entries(&inst), before, "nothing recorded");
    assert!(
        inst.log()
            .contains("rotation not recorded; the successor is destroyed"),
        "{}",
        inst.log()
    );
    assert!(
        count(&inst, "intent_received") == 0,
        "no sweep without a rotation"
    );
    assert_rotation_left_nothing(&inst, &allowed, "after-ledger-failed");
    assert_clean_rotation_after_failures(&mut inst, &allowed);
}

#[test]
fn racing_rotations_make_two_versions_each_recorded_once() {
    let (mut inst, allowed) = started("");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("--config")
            .arg(&inst.config)
            .args(["key", "rotate", "hot", "--reason", "race"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    assert_eq!(
        hot_versions(&inst),
        vec![
            (1, "retiring".to_owned()),
            (2, "retiring".to_owned()),
            (3, "active".to_owned())
        ]
    );
    let rotated: Vec<(u64, u64)> = ledger_entries(&inst.db, "key_rotated")
        .into_iter()
        .map(|(_, r)| {
            (
                r["old_version"].as_u64().unwrap(),
                r["new_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rotated, vec![(1, 2), (2, 3)]);
    let mut generated = hot_generated_versions(&inst);
    generated.sort();
    assert_eq!(generated.iter().filter(|v| **v >= 2).count(), 2);
    assert_eq!(generated.iter().filter(|v| **v == 2).count(), 1);
    assert_eq!(generated.iter().filter(|v| **v == 3).count(), 1);
    let v3 = public_key_of(&inst, 3);
    assert_eq!(signer_of_new_intent(&inst, "after-race", &allowed), v3);
    inst.stop();
    verifies(&inst);
}

#[test]
fn after_a_restart_the_retiring_key_still_sweeps_and_the_name_serves_the_new_key() {
    let (mut inst, allowed) = started("");
    ok(&rotate(&inst, &[]));
    let v2 = public_key_of(&inst, 2);
    inst.stop();
    inst.start();
    assert_eq!(signer_of_new_intent(&inst, "after-restart", &allowed), v2);

    // The agent API lists hot with its new public key.
    let listed = format!("{:?}", rt().block_on(inst.client().keys()).unwrap());
    assert!(listed.contains(&v2.to_string()), "{listed}");
    assert!(!listed.contains(&inst.hot.to_string()), "{listed}");

    // The sweep through the CLI after the restart, within the limits and
    // below approval_above: signed at once by the old key.
    let bh = blockhash();
    let out = ok(&inst.keyward(&["key", "sweep", "hot@1", "--sol", "0.5", "--blockhash", &bh]));
    assert!(out.contains("signed"), "{out}");
    let s = swept(&inst, 1, spec(&bh, Some("0.5")));
    assert_eq!(s.http_status, 200, "{s:?}");
    let tx = tx_of(s.body["transaction"].as_str().unwrap());
    assert_eq!(
        tx.message.account_keys[0], inst.hot,
        "signed by the old key"
    );
    tx.verify().unwrap();
    assert!(tx.message.account_keys.contains(&v2));

    // `key create hot` is refused: the registry knows the name.
    let out = inst.keyward(&["key", "create", "hot"]);
    failed_with(&out, "key_exists");
    assert_eq!(
        hot_versions(&inst),
        vec![(1, "retiring".to_owned()), (2, "active".to_owned())]
    );

    // A policy reload keeps serving the new key; a policy naming an unknown
    // key is refused and the one in force stays.
    let policy_text = std::fs::read_to_string(&inst.policy).unwrap();
    std::fs::write(
        &inst.policy,
        policy_text.replace(
            "max_consecutive_denials = 1000",
            "max_consecutive_denials = 999",
        ),
    )
    .unwrap();
    ok(&inst.keyward(&["policy", "reload"]));
    assert_eq!(signer_of_new_intent(&inst, "after-reload", &allowed), v2);
    std::fs::write(
        &inst.policy,
        policy_text.replace("keys = [\"hot\"]", "keys = [\"hot\", \"nosuchkey\"]"),
    )
    .unwrap();
    let out = inst.keyward(&["policy", "reload"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nosuchkey"), "{}", text(&out));
    assert_eq!(
        signer_of_new_intent(&inst, "after-bad-reload", &allowed),
        v2
    );
    // And the sweep key survived the reloads.
    let s = swept(&inst, 1, spec(&blockhash(), Some("0.25")));
    assert_eq!(s.http_status, 200, "{s:?}");
    inst.stop();
    verifies(&inst);
    // doctor finds the rotated key through the registry (its label is
    // keyward-v2-hot, not its name).
    std::fs::write(&inst.policy, &policy_text).unwrap();
    let d = text(&inst.keyward(&["doctor"]));
    assert!(d.contains("key \"hot\" found in the HSM"), "{d}");
    for bad in ["key_missing", "key_mismatch", "key_unusable"] {
        assert!(!d.contains(bad), "{bad}: {d}");
    }
}

#[test]
fn sweeps_go_through_the_agents_policy_and_are_idempotent() {
    let (inst, _allowed) = started("");
    ok(&rotate(&inst, &[]));
    let v2 = public_key_of(&inst, 2);

    // Over per_tx: denied, recorded as a policy denial, nothing counted.
    let counters = Counters::of(&inst.db);
    let denied = swept(&inst, 1, spec(&blockhash(), Some("20")));
    assert_eq!(denied.http_status, 403, "{denied:?}");
    let recorded: Vec<_> = all_entries(&inst)
        .into_iter()
        .filter(|(_, _, id)| id.as_deref() == Some(denied.intent_id.as_str()))
        .map(|(e, _, _)| e)
        .collect();
    assert!(
        recorded.iter().any(|e| e == "signing_denied"),
        "{recorded:?}"
    );
    let denial = ledger_entries(&inst.db, "signing_denied")
        .into_iter()
        .find(|(id, _)| id.as_deref() == Some(denied.intent_id.as_str()))
        .unwrap()
        .1;
    assert!(denial.to_string().contains("per_tx"), "{denial}");
    assert_eq!(denied.body["error"]["code"], "policy_denied", "{denied:?}");
    assert!(
        !recorded.iter().any(|e| e == "signature_created"),
        "{recorded:?}"
    );
    assert_eq!(
        Counters::of(&inst.db),
        counters,
        "a denied sweep counts nothing"
    );

    // Within limits, below approval_above: signed at once by the old key,
    // counted toward the agent's day.
    let bh = blockhash();
    let first = swept(&inst, 1, spec(&bh, Some("0.5")));
    assert_eq!(first.http_status, 200, "{first:?}");
    assert_eq!(first.agent, "dev");
    let tx = tx_of(first.body["transaction"].as_str().unwrap());
    assert_eq!(tx.message.account_keys[0], inst.hot);
    tx.verify().unwrap();
    let ix = &tx.message.instructions[0];
    assert_eq!(
        tx.message.account_keys[usize::from(ix.accounts[1])],
        v2,
        "to the successor"
    );
    let spent: Vec<_> = Counters::of(&inst.db)
        .spend
        .into_iter()
        .filter(|(_, _, id, _, _)| *id == first.intent_id)
        .collect();
    assert_eq!(spent.len(), 1, "{spent:?}");
    assert_eq!(spent[0].0, "dev");
    assert_eq!(
        spent[0].3, 500_000_000,
        "what leaves the old address counts: the amount moved and the fee"
    );
    let policy = rt().block_on(inst.client().policy()).unwrap();
    assert!(
        format!("{:?}", policy.limits).contains("\"0.5\""),
        "the day's SOL spend shows the sweep: {:?}",
        policy.limits
    );

    // The same request again: the same intent, the same answer, counted once.
    let entries = recorded_entries(&inst);
    let again = swept(&inst, 1, spec(&bh, Some("0.5")));
    assert_eq!(again.intent_id, first.intent_id);
    assert_eq!(again.body["transaction"], first.body["transaction"]);
    assert_eq!(recorded_entries(&inst), entries, "a replay records nothing");
    assert_eq!(
        Counters::of(&inst.db)
            .spend
            .iter()
            .filter(|(_, _, id, _, _)| *id == first.intent_id)
            .count(),
        1
    );
    // Another blockhash: another intent.
    let other = swept(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert_eq!(other.http_status, 200, "{other:?}");
    assert_ne!(other.intent_id, first.intent_id);
}

#[test]
fn bad_sweeps_change_nothing_and_token_sweeps_pay_the_successors_token_account() {
    let extra = format!(
        "[agents.other]\nuid = {OTHER_UID}\nkeys = [\"hot\"]\n\
         [agents.other.limits.SOL]\nper_tx = \"10\"\nper_day = \"100\"\n"
    );
    let (inst, _allowed) = started(&extra);
    ok(&rotate(&inst, &["--grace-days", "0"]));
    ok(&rotate(&inst, &["--grace-days", "0"]));
    ok(&inst.keyward(&["key", "retire", "hot@1"]));
    assert_eq!(
        hot_versions(&inst),
        vec![
            (1, "retired".to_owned()),
            (2, "retiring".to_owned()),
            (3, "active".to_owned())
        ]
    );
    let v2 = public_key_of(&inst, 2);
    let v3 = public_key_of(&inst, 3);
    let dev = |mut s: SweepSpec| {
        s.agent = Some("dev".into());
        s
    };
    let bh = blockhash();
    let token = |mint: &str, amount: &str| SweepToken {
        mint: mint.to_owned(),
        amount: amount.to_owned(),
    };
    let cases: Vec<(&str, u32, SweepSpec, &str)> = vec![
        ("zero SOL", 2, dev(spec(&bh, Some("0"))), "invalid_amount"),
        (
            "negative SOL",
            2,
            dev(spec(&bh, Some("-1"))),
            "invalid_amount",
        ),
        (
            "garbage SOL",
            2,
            dev(spec(&bh, Some("lots"))),
            "invalid_amount",
        ),
        (
            "too many decimals",
            2,
            dev(spec(&bh, Some("0.0000000001"))),
            "invalid_amount",
        ),
        (
            "below the fee",
            2,
            dev(spec(&bh, Some("0.000004"))),
            "invalid_amount",
        ),
        (
            "exactly the fee",
            2,
            dev(spec(&bh, Some("0.000005"))),
            "invalid_amount",
        ),
        (
            "zero tokens only",
            2,
            dev(SweepSpec {
                tokens: vec![token(MINT, "0")],
                ..spec(&bh, None)
            }),
            "invalid_request",
        ),
        (
            "garbage token amount",
            2,
            dev(SweepSpec {
                tokens: vec![token(MINT, "1e3")],
                ..spec(&bh, Some("1"))
            }),
            "invalid_amount",
        ),
        (
            "mint without limits",
            2,
            dev(SweepSpec {
                tokens: vec![token(UNLISTED_MINT, "5")],
                ..spec(&bh, Some("1"))
            }),
            "asset_not_allowed",
        ),
        (
            "rent not covered",
            2,
            dev(SweepSpec {
                tokens: vec![token(MINT, "5")],
                ..spec(&bh, Some("0.001"))
            }),
            "invalid_amount",
        ),
        (
            "unknown agent",
            2,
            SweepSpec {
                agent: Some("nobody".into()),
                ..spec(&bh, Some("1"))
            },
            "unknown_agent",
        ),
        (
            "ambiguous agent",
            2,
            spec(&bh, Some("1")),
            "invalid_request",
        ),
        (
            "bad blockhash",
            2,
            dev(spec("not-a-hash", Some("1"))),
            "invalid_address",
        ),
        (
            "short blockhash",
            2,
            dev(spec("1111", Some("1"))),
            "invalid_address",
        ),
        (
            "active version",
            3,
            dev(spec(&bh, Some("1"))),
            "key_not_retiring",
        ),
        (
            "retired version",
            1,
            dev(spec(&bh, Some("1"))),
            "key_not_retiring",
        ),
        (
            "unknown version",
            9,
            dev(spec(&bh, Some("1"))),
            "key_not_retiring",
        ),
        (
            "overflowing SOL",
            2,
            dev(spec(&bh, Some("18446744073.709551616"))),
            "invalid_amount",
        ),
        (
            "the same mint twice",
            2,
            dev(SweepSpec {
                tokens: vec![token(MINT, "5"), token(MINT, "5")],
                ..spec(&bh, Some("1"))
            }),
            "invalid_request",
        ),
        ("nothing at all", 2, dev(spec(&bh, None)), "invalid_request"),
    ];
    let entries = recorded_entries(&inst);
    let counters = Counters::of(&inst.db);
    for (what, version, s, code) in cases {
        let (status, body) = sweep(&inst, version, s);
        assert!(
            (400..500).contains(&status),
            "{what}: expected a refusal, got {status}: {body}"
        );
        assert_eq!(error_code(&body), code, "{what}: {body}");
        assert_eq!(
            recorded_entries(&inst),
            entries,
            "{what}: recorded something"
        );
        assert_eq!(
            Counters::of(&inst.db),
            counters,
            "{what}: counted something"
        );
    }
    // Through the CLI as well: usage errors before anything is sent.
    let out = inst.keyward(&["key", "sweep", "hot@2", "--sol", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = inst.keyward(&["key", "sweep", "hot", "--sol", "1", "--blockhash", &bh]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(recorded_entries(&inst), entries);

    // A sweep of SOL and tokens: the SPL transfer goes from the old key's
    // token account to the successor's (created in the same transaction).
    let s = swept(
        &inst,
        2,
        dev(SweepSpec {
            tokens: vec![token(MINT, "12.5")],
            ..spec(&bh, Some("0.5"))
        }),
    );
    assert_eq!(s.http_status, 200, "{s:?}");
    let tx = tx_of(s.body["transaction"].as_str().unwrap());
    tx.verify().unwrap();
    assert_eq!(tx.message.account_keys[0], v2, "signed by hot@2");
    let (mint, token_program, ata_program): (Pubkey, Pubkey, Pubkey) = (
        MINT.parse().unwrap(),
        TOKEN_PROGRAM.parse().unwrap(),
        ATA_PROGRAM.parse().unwrap(),
    );
    let ata = |owner: &Pubkey| {
        Pubkey::find_program_address(
            &[owner.as_ref(), token_program.as_ref(), mint.as_ref()],
            &ata_program,
        )
        .0
    };
    let keys_of =
        |ix: &solana_sdk::message::compiled_instruction::CompiledInstruction| -> Vec<Pubkey> {
            ix.accounts
                .iter()
                .map(|a| tx.message.account_keys[usize::from(*a)])
                .collect()
        };
    let program_of = |ix: &solana_sdk::message::compiled_instruction::CompiledInstruction| {
        tx.message.account_keys[usize::from(ix.program_id_index)]
    };
    let transfers: Vec<_> = tx
        .message
        .instructions
        .iter()
        .filter(|ix| program_of(ix) == token_program)
        .collect();
    assert_eq!(transfers.len(), 1, "{:?}", tx.message);
    let t = transfers[0];
    // TransferChecked: [source, mint, destination, owner], tag 12, amount, decimals.
    assert_eq!(t.data[0], 12, "TransferChecked");
    assert_eq!(
        u64::from_le_bytes(t.data[1..9].try_into().unwrap()),
        12_500_000
    );
    assert_eq!(t.data[9], 6);
    assert_eq!(
        keys_of(t),
        vec![ata(&v2), mint, ata(&v3), v2],
        "from hot@2's token account to hot@3's"
    );
    let creates: Vec<_> = tx
        .message
        .instructions
        .iter()
        .filter(|ix| program_of(ix) == ata_program)
        .collect();
    assert_eq!(creates.len(), 1);
    assert!(keys_of(creates[0]).contains(&ata(&v3)));
    assert!(keys_of(creates[0]).contains(&v3));
    let sol: Vec<_> = tx
        .message
        .instructions
        .iter()
        .filter(|ix| program_of(ix) == SYSTEM_PROGRAM.parse::<Pubkey>().unwrap())
        .collect();
    assert_eq!(sol.len(), 1);
    assert_eq!(keys_of(sol[0]), vec![v2, v3]);
    assert_eq!(
        u64::from_le_bytes(sol[0].data[4..12].try_into().unwrap()),
        500_000_000 - 5_000 - 2_039_280,
        "the SOL balance less the fee and the new token account's rent"
    );
}

#[test]
fn retirement_waits_for_a_pending_sweep_unless_forced() {
    let (inst, _allowed) = started("");
    ok(&rotate(&inst, &["--grace-days", "0"]));
    let pending = swept(&inst, 1, spec(&blockhash(), Some("3")));
    assert_eq!(pending.http_status, 202, "{pending:?}");
    let out = inst.keyward(&["key", "retire", "hot@1"]);
    failed_with(&out, "key_state");
    assert!(text(&out).contains(&pending.intent_id), "{}", text(&out));
    // --force needs a reason (clap: exit 2 before anything is sent).
    let out = inst.keyward(&["key", "retire", "hot@1", "--force"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(count(&inst, "key_retired"), 0);
    assert_eq!(hot_versions(&inst)[0].1, "retiring");
    ok(&inst.keyward(&[
        "key",
        "retire",
        "hot@1",
        "--force",
        "--reason",
        "sweep abandoned",
    ]));
    let retired = ledger_entries(&inst.db, "key_retired");
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].1["reason"], "sweep abandoned");
    assert_eq!(hot_versions(&inst)[0].1, "retired");
    // The pending sweep cannot be signed any more: its key is gone.
    let (status, _) = sweep(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert_eq!(status, 400);
}

/// Runs [`token_surgery`] in a child process of this binary with the
/// instance's `SOFTHSM2_CONF`: `op` is `destroy:LABEL` or `replace:LABEL`
/// (destroyed and generated again, protected, with another public key).
fn surgery(inst: &Instance, op: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "token_surgery",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "SOFTHSM2_CONF",
            keyward::hsm::softhsm::conf_path(inst.inst_dir()),
        )
        .env("KW_SURGERY_OP", op)
        .env("KW_SURGERY_MODULE", inst.config_value("module"))
        .env("KW_SURGERY_TOKEN", inst.config_value("token_label"))
        .env("KW_SURGERY_PIN_FILE", inst.config_value("pin_file"))
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&format!("surgery done: {op}")), "{t}");
}

/// Not a test on its own: the child process of [`surgery`].
#[test]
#[ignore = "run by other tests in a child process"]
fn token_surgery() {
    let Ok(op) = std::env::var("KW_SURGERY_OP") else {
        return;
    };
    let var = |n: &str| std::env::var(n).unwrap();
    let hsm = Pkcs11Hsm::open(&Pkcs11Config {
        module: var("KW_SURGERY_MODULE").into(),
        token_label: var("KW_SURGERY_TOKEN"),
        pin_file: var("KW_SURGERY_PIN_FILE").into(),
        max_sessions: 1,
    })
    .unwrap();
    let (what, label) = op.split_once(':').unwrap();
    let label = KeyName::new(label).unwrap();
    let key = hsm.find_ed25519(&label).unwrap();
    hsm.destroy_ed25519(&key).unwrap();
    assert_eq!(
        hsm.find_ed25519(&label).unwrap_err().code(),
        "key_not_found"
    );
    if what == "replace" {
        let fresh = hsm.generate_ed25519(&label).unwrap();
        assert_ne!(fresh.public_key, key.public_key);
    }
    println!("surgery done: {op}");
}

fn doctor(inst: &Instance) -> String {
    text(&inst.keyward(&["doctor"]))
}

#[test]
fn keys_changed_on_the_token_behind_keywards_back() {
    let (mut inst, allowed) = started("");
    ok(&rotate(&inst, &[]));
    let v2 = public_key_of(&inst, 2);
    inst.stop();

    // The retiring key destroyed on the token: keywardd starts (it only
    // cannot sweep), and retiring it records the retirement.
    surgery(&inst, "destroy:hot");
    inst.start();
    assert!(
        inst.log().contains("a retiring key cannot be found"),
        "{}",
        inst.log()
    );
    assert_eq!(signer_of_new_intent(&inst, "still-v2", &allowed), v2);
    let (status, body) = sweep(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "key_not_retiring"),
        "{body}"
    );
    ok(&inst.keyward(&["key", "retire", "hot@1", "--force", "--reason", "gone"]));
    let retired = ledger_entries(&inst.db, "key_retired");
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].1["public_key"], inst.hot.to_string());
    assert_eq!(hot_versions(&inst)[0].1, "retired");
    assert!(
        inst.log().contains("not in the HSM any more"),
        "{}",
        inst.log()
    );
    inst.stop();

    // The active key replaced under its label: refused by name at start
    // and by doctor; nothing is served.
    surgery(&inst, "replace:keyward-v2-hot");
    let (code, log) = inst.start_refused(&[]);
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("hot@2"), "{log}");
    assert!(log.contains("key_mismatch"), "{log}");
    assert!(
        log.contains(&v2.to_string()),
        "names the registered key: {log}"
    );
    let d = doctor(&inst);
    assert!(d.contains("key_mismatch") && d.contains("hot@2"), "{d}");
    assert!(
        !d.contains("key create"),
        "`key create` is refused for a registered name; not the fix: {d}"
    );
    assert!(!inst.agent_socket.exists() || !inst.is_running());
}

/// The destination of a sweep's SOL transfer.
fn sweep_destination(s: &SweepResult) -> Pubkey {
    let tx = tx_of(s.body["transaction"].as_str().unwrap());
    tx.verify().unwrap();
    let ix = &tx.message.instructions[0];
    tx.message.account_keys[usize::from(ix.accounts[1])]
}

#[test]
fn a_sweep_after_two_rotations_goes_to_the_key_that_serves_the_name() {
    let (inst, _allowed) = started("");
    ok(&rotate(&inst, &["--grace-days", "0"]));
    ok(&rotate(&inst, &["--grace-days", "0"]));
    let (v1, v2, v3) = (inst.hot, public_key_of(&inst, 2), public_key_of(&inst, 3));
    // hot@2 (exposed, say) is retired at once, before hot@1 was swept: a
    // sweep of hot@1 to hot@2's address would send the funds to a key that
    // no longer exists.
    ok(&inst.keyward(&["key", "retire", "hot@2"]));
    let s = swept(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert_eq!(s.http_status, 200, "{s:?}");
    let tx = tx_of(s.body["transaction"].as_str().unwrap());
    assert_eq!(tx.message.account_keys[0], v1, "signed by hot@1");
    assert_eq!(
        sweep_destination(&s),
        v3,
        "to the active version, not hot@2 ({v2}), which is retired"
    );
    assert!(!tx.message.account_keys.contains(&v2));
}

#[test]
fn a_pending_sweep_whose_destination_stopped_serving_the_name_is_denied_at_its_quorum() {
    let (inst, _allowed) = started("");
    let dir = inst.dir.path().join("approver");
    std::fs::create_dir_all(&dir).unwrap();
    let alice = dir.join("alice.key");
    ok(&inst.keyward(&["approver", "add", "alice", "--out", alice.to_str().unwrap()]));
    ok(&rotate(&inst, &["--grace-days", "0"]));
    let v2 = public_key_of(&inst, 2);
    let pending = swept(&inst, 1, spec(&blockhash(), Some("3")));
    assert_eq!(pending.http_status, 202, "{pending:?}");
    // hot is rotated again (and hot@2 retired) before alice approves: the
    // sweep would pay hot@2, which no longer serves the name.
    ok(&rotate(&inst, &["--grace-days", "0"]));
    ok(&inst.keyward(&["key", "retire", "hot@2"]));
    let id = pending.intent_id.as_str();
    let view = rt().block_on(inst.client().get_intent(id)).unwrap();
    let request = dir.join("request.json");
    std::fs::write(&request, serde_json::to_vec(&view).unwrap()).unwrap();
    let token = ok(&inst.keyward(&[
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        "alice",
        "--key-file",
        alice.to_str().unwrap(),
        "--yes",
    ]))
    .trim()
    .to_owned();
    match rt().block_on(inst.client().add_approval(id, &token)) {
        Err(keyward_client::ClientError::Api { code, reasons, .. }) => {
            assert_eq!(code, "policy_denied");
            assert!(
                reasons.iter().any(
                    |r| r.rule == "recipient_not_allowed" && r.detail.contains(&v2.to_string())
                ),
                "{reasons:?}"
            );
        }
        other => panic!("the sweep to the retired hot@2 was not denied: {other:?}"),
    }
    assert!(signatures_recorded(&inst.db, id).is_empty());
}

fn enroll_alice(inst: &Instance) -> std::path::PathBuf {
    let dir = inst.dir.path().join("alice");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("alice.key");
    ok(&inst.keyward(&["approver", "add", "alice", "--out", key.to_str().unwrap()]));
    key
}

/// alice's approval token for pending intent `id`.
fn alice_token(inst: &Instance, alice: &Path, id: &str) -> String {
    let view = rt().block_on(inst.client().get_intent(id)).unwrap();
    let request = inst.dir.path().join("alice").join("request.json");
    std::fs::write(&request, serde_json::to_vec(&view).unwrap()).unwrap();
    ok(&inst.keyward(&[
        "approve",
        "--request",
        request.to_str().unwrap(),
        "--approver",
        "alice",
        "--key-file",
        alice.to_str().unwrap(),
        "--yes",
    ]))
    .trim()
    .to_owned()
}

#[test]
fn a_sweep_pending_when_its_key_was_force_retired_is_never_signed_and_nothing_else_stops() {
    let (inst, allowed) = started("");
    let alice = enroll_alice(&inst);
    ok(&rotate(&inst, &["--grace-days", "0"]));
    let v2 = public_key_of(&inst, 2);
    let pending = swept(&inst, 1, spec(&blockhash(), Some("3")));
    assert_eq!(pending.http_status, 202, "{pending:?}");
    let id = pending.intent_id.clone();
    let token = alice_token(&inst, &alice, &id);
    ok(&inst.keyward(&[
        "key",
        "retire",
        "hot@1",
        "--force",
        "--reason",
        "abandon the sweep",
    ]));
    // The sweep ended with its key, recorded; listing the pending intents
    // still works (it failed with "ledger head is corrupt" while a sweep
    // whose key was gone stayed pending).
    let expired = ledger_entries(&inst.db, "intent_expired");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].0.as_deref(), Some(id.as_str()));
    let list = ok(&inst.keyward(&["approval", "list"]));
    assert!(!list.contains(&id), "{list}");
    let view = rt().block_on(inst.client().get_intent(&id)).unwrap();
    assert!(
        format!("{view:?}").to_lowercase().contains("expired"),
        "{view:?}"
    );
    // The approval cannot get the sweep signed: its key is destroyed.
    let approved = rt().block_on(inst.client().add_approval(&id, &token));
    assert!(
        !matches!(approved, Ok(IntentOutcome::Signed(_))),
        "{approved:?}"
    );
    assert!(signatures_recorded(&inst.db, &id).is_empty());
    // Nothing else stopped: the name signs with hot@2, the ledger verifies.
    assert_eq!(signer_of_new_intent(&inst, "after-retire", &allowed), v2);
    let health = rt().block_on(inst.client().health()).unwrap();
    assert_eq!(health.status, "ok", "{health:?}");
    verifies(&inst);
}

#[test]
fn a_retirement_whose_record_fails_is_finished_by_running_it_again() {
    let allowed = random_pubkey();
    let mut inst = Instance::init();
    inst.write_policy(&policy(&allowed, ""));
    inst.set_env("KEYWARD_TEST_FAULTS", "ledger:key_retired:1");
    inst.start();
    ok(&rotate(&inst, &["--grace-days", "0"]));
    let before = recorded_entries(&inst);
    failed_with(
        &inst.keyward(&["key", "retire", "hot@1"]),
        "audit_unavailable",
    );
    assert_eq!(recorded_entries(&inst), before);
    assert_eq!(hot_versions(&inst)[0].1, "retiring");
    // Destroyed already: a sweep cannot be signed, and says so.
    let (status, body) = sweep(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert!(status >= 400, "{status}: {body}");
    assert!(signatures_recorded(&inst.db, "x").is_empty());
    // Again: recorded now, once.
    ok(&inst.keyward(&["key", "retire", "hot@1"]));
    assert_eq!(count(&inst, "key_retired"), 1);
    assert_eq!(hot_versions(&inst)[0].1, "retired");
    assert!(
        inst.log().contains("not in the HSM any more"),
        "{}",
        inst.log()
    );
    failed_with(&inst.keyward(&["key", "retire", "hot@1"]), "key_state");
    // The audit key is never rotated as a signing key.
    failed_with(
        &inst.keyward(&["key", "rotate", "keyward-audit", "--reason", "x"]),
        "unknown_key",
    );
    verifies(&inst);
}

#[test]
fn a_pending_sweep_whose_key_vanished_from_the_token_breaks_no_listing() {
    let (mut inst, allowed) = started("");
    let alice = enroll_alice(&inst);
    ok(&rotate(&inst, &["--grace-days", "0"]));
    let v2 = public_key_of(&inst, 2);
    let pending = swept(&inst, 1, spec(&blockhash(), Some("3")));
    assert_eq!(pending.http_status, 202, "{pending:?}");
    let id = pending.intent_id.clone();
    let token = alice_token(&inst, &alice, &id);
    // An ordinary intent waits for alice too.
    let big = transfer("big", &allowed, "2");
    assert!(matches!(
        rt().block_on(inst.client().submit_intent(&big)).unwrap(),
        IntentOutcome::Pending(_)
    ));
    inst.stop();
    surgery(&inst, "destroy:hot");
    inst.start();
    // The other pending intent is still listed and can be approved; the
    // sweep is listed but cannot be signed.
    let list = ok(&inst.keyward(&["approval", "list"]));
    assert!(list.contains("big") && list.contains(&id), "{list}");
    let view = rt().block_on(inst.client().get_intent(&id)).unwrap();
    assert!(format!("{view:?}").contains("PendingApproval"), "{view:?}");
    match rt().block_on(inst.client().add_approval(&id, &token)) {
        Err(keyward_client::ClientError::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!(
                (status, code.as_str()),
                (409, "intent_not_pending"),
                "{message}"
            );
            assert!(message.contains("hot@1"), "{message}");
        }
        other => panic!("expected a refusal naming the missing key, got {other:?}"),
    }
    assert!(signatures_recorded(&inst.db, &id).is_empty());
    let big_token = alice_token(&inst, &alice, "big");
    match rt()
        .block_on(inst.client().add_approval("big", &big_token))
        .unwrap()
    {
        IntentOutcome::Signed(s) => assert_eq!(tx_of(&s.transaction).message.account_keys[0], v2),
        other => panic!("expected big signed by hot@2, got {other:?}"),
    }
    // Retiring the vanished key ends the sweep.
    ok(&inst.keyward(&["key", "retire", "hot@1", "--force", "--reason", "gone"]));
    let list = ok(&inst.keyward(&["approval", "list"]));
    assert!(!list.contains(&id), "{list}");
    verifies(&inst);
}

#[test]
fn key_create_of_a_rotated_name_is_refused_by_the_daemon_and_offline() {
    let (mut inst, allowed) = started("");
    ok(&rotate(&inst, &["--grace-days", "0"]));
    ok(&inst.keyward(&["key", "retire", "hot@1"]));
    let v2 = public_key_of(&inst, 2);
    let before = recorded_entries(&inst);
    failed_with(&inst.keyward(&["key", "create", "hot"]), "key_exists");
    assert_eq!(recorded_entries(&inst), before);
    inst.stop();
    // Offline: the label `hot` is free on the token (hot@1 was destroyed),
    // but the registry knows the name: refused, nothing generated.
    let out = inst.keyward(&["key", "create", "hot"]);
    failed_with(&out, "key_exists");
    assert!(text(&out).contains("key rotate hot"), "{}", text(&out));
    inst.start();
    assert!(
        !inst.log().contains("not a registered version"),
        "a key was generated under the registered name: {}",
        inst.log()
    );
    assert_eq!(signer_of_new_intent(&inst, "after", &allowed), v2);
    // A new name is still created offline.
    inst.stop();
    ok(&inst.keyward(&["key", "create", "cold"]));
}

#[test]
fn a_ledger_failure_on_the_successors_key_generated_entry_changes_nothing() {
    let (mut inst, allowed) = started("");
    // The first start recorded the keys made offline; from the second on,
    // the rotation's is the first key_generated entry.
    inst.stop();
    inst.set_env("KEYWARD_TEST_FAULTS", "ledger:key_generated:1");
    inst.start();
    let before = recorded_entries(&inst);
    failed_with(&rotate(&inst, &[]), "audit_unavailable");
    assert_eq!(recorded_entries(&inst), before, "nothing recorded");
    assert_rotation_left_nothing(&inst, &allowed, "after-key-generated-failed");
    assert_clean_rotation_after_failures(&mut inst, &allowed);
}

#[test]
fn a_freeze_of_the_key_covers_its_sweep_but_not_the_rotation() {
    let (inst, allowed) = started("");
    ok(&inst.keyward(&[
        "freeze",
        "--key",
        "hot",
        "--reason",
        "key suspected exposed",
    ]));
    // The incident's next step: rotate while frozen.
    ok(&rotate(&inst, &[]));
    let v2 = public_key_of(&inst, 2);
    let before = recorded_entries(&inst);
    let counters = Counters::of(&inst.db);
    let (status, body) = sweep(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert_eq!(
        (status, error_code(&body).as_str()),
        (423, "frozen"),
        "{body}"
    );
    assert!(recorded_entries(&inst) > before, "the refusal is recorded");
    assert_eq!(Counters::of(&inst.db), counters, "nothing counted");
    ok(&inst.keyward(&["unfreeze", "--key", "hot", "--reason", "rotated"]));
    let s = swept(&inst, 1, spec(&blockhash(), Some("0.5")));
    assert_eq!(s.http_status, 200, "{s:?}");
    assert_eq!(sweep_destination(&s), v2);
    assert_eq!(signer_of_new_intent(&inst, "after-unfreeze", &allowed), v2);
}

#[test]
fn a_key_no_policy_names_rotates_and_a_later_policy_gets_its_new_version() {
    let (inst, _allowed) = started("");
    let created = ok(&inst.keyward(&["key", "create", "cold"]));
    let before = recorded_entries(&inst);
    let out = inst.keyward(&[
        "key",
        "rotate",
        "cold",
        "--reason",
        "x",
        "--grace-days",
        "400",
    ]);
    failed_with(&out, "invalid_request");
    assert_eq!(recorded_entries(&inst), before);
    ok(&inst.keyward(&["key", "rotate", "cold", "--reason", "before first use"]));
    let cold2: Pubkey = keys(&inst)
        .into_iter()
        .find(|k| k.name == "cold" && k.version == Some(2))
        .unwrap()
        .public_key
        .parse()
        .unwrap();
    assert!(!created.contains(&cold2.to_string()));
    // No agent lists it: its sweep has nobody's policy to go through.
    let (status, body) = admin(
        &inst,
        Method::POST,
        "/v1/admin/keys/cold/sweep",
        Some(&KeySweepRequest {
            version: 1,
            sweep: spec(&blockhash(), Some("1")),
        }),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "unknown_agent"),
        "{body}"
    );
    // A policy naming it now gets version 2.
    let policy_text = std::fs::read_to_string(&inst.policy).unwrap();
    std::fs::write(
        &inst.policy,
        format!(
            "{policy_text}\n[agents.ops]\nuid = {OTHER_UID}\nkeys = [\"cold\"]\n\
             [agents.ops.limits.SOL]\nper_tx = \"1\"\nper_day = \"1\"\n"
        ),
    )
    .unwrap();
    ok(&inst.keyward(&["policy", "reload"]));
    let cold = keys(&inst)
        .into_iter()
        .find(|k| k.name == "cold" && k.version == Some(2))
        .unwrap();
    assert_eq!(cold.agents, vec!["ops".to_owned()]);
    let s = admin(
        &inst,
        Method::POST,
        "/v1/admin/keys/cold/sweep",
        Some(&KeySweepRequest {
            version: 1,
            sweep: spec(&blockhash(), Some("0.5")),
        }),
    );
    assert_eq!(s.0, 200, "{}", s.1);
    let s: SweepResult = serde_json::from_str(&s.1).unwrap();
    assert_eq!(s.http_status, 200, "{s:?}");
    assert_eq!(sweep_destination(&s), cold2);
}

/// Object files in the instance's SoftHSM2 token directory.
fn token_objects(inst: &Instance) -> usize {
    let mut n = 0;
    for dir in std::fs::read_dir(inst.token_dir()).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            n += std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "object")
                })
                .count();
        }
    }
    n
}

#[test]
fn a_crash_after_the_successor_was_generated_does_not_block_the_next_rotation() {
    let allowed = random_pubkey();
    let mut inst = Instance::init();
    inst.write_policy(&policy(&allowed, ""));
    inst.start();
    inst.stop();
    let hold = inst.dir.path().join("release-signatures");
    inst.set_env(
        "KEYWARD_TEST_FAULTS",
        &format!("hsm:sign_waits_for:{}", hold.display()),
    );
    inst.start();
    let objects = token_objects(&inst);
    // The rotation generates the successor, then waits in the first
    // statement signature; keywardd dies there.
    let rotation = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--config")
        .arg(&inst.config)
        .args(["key", "rotate", "hot", "--reason", "crash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Held in the signature: the successor was generated (and is on the
    // token) before.
    wait_until(
        "the rotation's signature held",
        std::time::Duration::from_secs(30),
        || inst.log().contains("HSM signature held"),
    );
    assert_eq!(token_objects(&inst), objects + 2, "the successor's pair");
    inst.kill9();
    let out = rotation.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(count(&inst, "key_rotated"), 0);

    inst.set_env("KEYWARD_TEST_FAULTS", "");
    inst.start();
    assert!(
        inst.log().contains("not in the key registry"),
        "the orphan is reported: {}",
        inst.log()
    );
    assert_eq!(
        signer_of_new_intent(&inst, "after-crash", &allowed),
        inst.hot
    );
    // The next rotation works: the orphan under keyward-v2-hot is not
    // a reason to refuse it, and is never what serves the name.
    let out = ok(&rotate(&inst, &[]));
    assert!(out.contains("version 1 -> 2"), "{out}");
    let v2 = public_key_of(&inst, 2);
    assert_eq!(signer_of_new_intent(&inst, "after-rotation", &allowed), v2);
    assert_eq!(token_objects(&inst), objects + 2, "the orphan is gone");
    inst.stop();
    inst.start();
    assert!(
        !inst.log().contains("not in the key registry"),
        "{}",
        inst.log()
    );
    verifies(&inst);
}
