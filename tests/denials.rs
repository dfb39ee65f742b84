//! Everything the policy and the decoder must refuse, end to end against a
//! real keywardd and SoftHSM2 token: each denial is a 403 naming the rule,
//! each undecodable message a 400 with a decoding error, and none of them
//! signs or counts anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::str::FromStr;

use common::*;
use keyward_client::{ClientError, IntentOutcome};
use solana_sdk::instruction::{AccountMeta, Instruction};
use solana_sdk::message::compiled_instruction::CompiledInstruction;
use solana_sdk::message::{Message, MessageHeader, VersionedMessage, v0};
use solana_sdk::pubkey::Pubkey;
use solana_system_interface::instruction::SystemInstruction;

fn token_program() -> Pubkey {
    Pubkey::from_str("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA").unwrap()
}

/// The one recipient the test policy allows.
fn allowed() -> Pubkey {
    Pubkey::new_from_array([7; 32])
}

fn policy() -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\nbreaker = {{ max_consecutive_denials = 1000 }}\n# A denial must not use up a place in the rate windows.\nrate_limit = {{ per_minute = 1000, per_hour = 1000 }}\nallow_recipients = [\"{}\"]\n\
         [agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"1.5\"\n",
        allowed()
    )
}

fn system_transfer(from: &Pubkey, to: &Pubkey, lamports: u64) -> Instruction {
    Instruction::new_with_bincode(
        Pubkey::default(),
        &SystemInstruction::Transfer { lamports },
        vec![AccountMeta::new(*from, true), AccountMeta::new(*to, false)],
    )
}

fn legacy(payer: &Pubkey, ixs: &[Instruction]) -> Vec<u8> {
    Message::new_with_blockhash(ixs, Some(payer), &random_hash()).serialize()
}

/// Spent (or reserved) lamports in the rolling window, from GET /v1/policy.
fn spent(inst: &Instance) -> u64 {
    rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units
}

/// Submits and expects a 403 policy denial naming `rule`; checks that
/// nothing was signed or counted.
fn expect_denied(inst: &Instance, req: keyward_client::wire::IntentRequest, rule: &str) {
    let before = Counters::of(&inst.db);
    let view_before = rt().block_on(inst.client().policy()).unwrap();
    let result = rt().block_on(inst.client().submit_intent(&req));
    match result {
        Err(ClientError::Api {
            status: 403,
            code,
            reasons,
            ..
        }) => {
            assert_eq!(code, "policy_denied");
            assert!(
                reasons.iter().any(|r| r.rule == rule),
                "{}: expected rule {rule}, got {reasons:?}",
                req.intent_id
            );
            assert!(
                reasons.iter().all(|r| !r.detail.is_empty()),
                "every reason explains itself"
            );
        }
        Ok(IntentOutcome::Signed(s)) => panic!(
            "{}: SIGNED although it must be denied ({rule}): {s:?}",
            req.intent_id
        ),
        other => panic!(
            "{}: expected a 403 denial ({rule}), got {other:?}",
            req.intent_id
        ),
    }
    assert_nothing_counted(inst, &req.intent_id, &before, &view_before);
}

fn expect_bad_message(inst: &Instance, id: &str, bytes: &[u8]) {
    let head = rt()
        .block_on(inst.client().health())
        .unwrap()
        .ledger
        .head_seq;
    match rt().block_on(inst.client().submit_intent(&sign_tx(id, bytes))) {
        Err(ClientError::Api {
            status: 400,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, "invalid_message", "{id}: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("{id}: expected 400 invalid_message, got {other:?}"),
    }
    let after = rt()
        .block_on(inst.client().health())
        .unwrap()
        .ledger
        .head_seq;
    assert_eq!(head, after, "{id}: a malformed request writes nothing");
}

#[test]
fn limits_and_allowlist_deny_transfers_and_count_nothing() {
    let inst = Instance::with_policy(&policy());
    let to = allowed();
    expect_denied(&inst, transfer("over-per-tx", &to, "1.5"), "per_tx_limit");
    // Exactly at the limit, fees included, is still over: 1 SOL + fee > 1 SOL.
    expect_denied(&inst, transfer("per-tx-with-fee", &to, "1"), "per_tx_limit");
    expect_denied(
        &inst,
        transfer("not-allowed", &random_pubkey(), "0.1"),
        "recipient_not_allowed",
    );

    let ok = rt()
        .block_on(inst.client().submit_intent(&transfer("first", &to, "0.9")))
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));
    assert_eq!(spent(&inst), 900_000_000 + FEE);
    expect_denied(&inst, transfer("over-daily", &to, "0.9"), "daily_limit");
    // What is left still goes through.
    let ok = rt()
        .block_on(inst.client().submit_intent(&transfer("rest", &to, "0.5")))
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));
    assert_eq!(spent(&inst), 1_400_000_000 + 2 * FEE);
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn sign_transaction_hidden_effects_are_found_and_denied() {
    let inst = Instance::with_policy(&policy());
    let us = inst.hot;
    let to = allowed();

    // A program keyward does not understand and the policy does not allow.
    let unknown = Instruction::new_with_bytes(
        Pubkey::new_unique(),
        &[1, 2, 3],
        vec![AccountMeta::new(us, true)],
    );
    expect_denied(
        &inst,
        sign_tx("unknown-program", &legacy(&us, &[unknown])),
        "program_not_allowed",
    );

    // A second transfer hidden after an allowed one: each is within per_tx,
    // together they are not.
    let two = legacy(
        &us,
        &[
            system_transfer(&us, &to, 600_000_000),
            system_transfer(&us, &to, 600_000_000),
        ],
    );
    expect_denied(
        &inst,
        sign_tx("hidden-second-transfer", &two),
        "per_tx_limit",
    );

    // SPL approve / set-authority / close-account with our key as authority.
    let token_account = Pubkey::new_unique();
    let approve = Instruction::new_with_bytes(
        token_program(),
        &[&[4u8][..], &1_000u64.to_le_bytes()].concat(),
        vec![
            AccountMeta::new(token_account, false),
            AccountMeta::new_readonly(Pubkey::new_unique(), false),
            AccountMeta::new_readonly(us, true),
        ],
    );
    expect_denied(
        &inst,
        sign_tx("spl-approve", &legacy(&us, &[approve])),
        "token_authority_operation",
    );
    let mut set_auth_data = vec![6u8, 2u8, 1u8];
    set_auth_data.extend_from_slice(Pubkey::new_unique().as_ref());
    let set_authority = Instruction::new_with_bytes(
        token_program(),
        &set_auth_data,
        vec![
            AccountMeta::new(token_account, false),
            AccountMeta::new_readonly(us, true),
        ],
    );
    expect_denied(
        &inst,
        sign_tx("spl-set-authority", &legacy(&us, &[set_authority])),
        "token_authority_operation",
    );
    let close = Instruction::new_with_bytes(
        token_program(),
        &[9u8],
        vec![
            AccountMeta::new(token_account, false),
            AccountMeta::new(Pubkey::new_unique(), false),
            AccountMeta::new_readonly(us, true),
        ],
    );
    expect_denied(
        &inst,
        sign_tx("spl-close-account", &legacy(&us, &[close])),
        "token_authority_operation",
    );

    // A durable-nonce advance (the transaction would stay valid forever).
    let nonce = Instruction::new_with_bincode(
        Pubkey::default(),
        &SystemInstruction::AdvanceNonceAccount,
        vec![
            AccountMeta::new(Pubkey::new_unique(), false),
            AccountMeta::new_readonly(
                Pubkey::from_str("SysvarRecentB1ockHashes11111111111111111111").unwrap(),
                false,
            ),
            AccountMeta::new_readonly(us, true),
        ],
    );
    let with_nonce = legacy(&us, &[nonce, system_transfer(&us, &to, 1_000)]);
    expect_denied(
        &inst,
        sign_tx("durable-nonce", &with_nonce),
        "durable_nonce",
    );

    // Our key is not a signer: someone else pays and signs.
    let other = Pubkey::new_unique();
    let not_signer = legacy(&other, &[system_transfer(&other, &to, 1_000)]);
    expect_denied(&inst, sign_tx("not-signer", &not_signer), "key_not_signer");

    // v0: the transfer's recipient comes from an address lookup table, so
    // keyward cannot see where the money goes.
    let table = Pubkey::new_unique();
    let v0msg = v0::Message {
        header: MessageHeader {
            num_required_signatures: 1,
            num_readonly_signed_accounts: 0,
            num_readonly_unsigned_accounts: 1,
        },
        account_keys: vec![us, Pubkey::default()],
        recent_blockhash: random_hash(),
        instructions: vec![CompiledInstruction {
            program_id_index: 1,
            accounts: vec![0, 2],
            data: bincode::serialize(&SystemInstruction::Transfer { lamports: 1_000 }).unwrap(),
        }],
        address_table_lookups: vec![v0::MessageAddressTableLookup {
            account_key: table,
            writable_indexes: vec![0],
            readonly_indexes: vec![],
        }],
    };
    let bytes = VersionedMessage::V0(v0msg).serialize();
    expect_denied(
        &inst,
        sign_tx("lookup-recipient", &bytes),
        "lookup_table_account",
    );

    // Nothing above was signed or counted, and the ledger is intact.
    assert_eq!(spent(&inst), 0);
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn malformed_truncated_and_trailing_messages_are_400_decoding_errors() {
    let inst = Instance::with_policy(&policy());
    let us = inst.hot;
    let good = legacy(&us, &[system_transfer(&us, &allowed(), 1_000)]);
    expect_bad_message(&inst, "empty", &[]);
    expect_bad_message(&inst, "truncated", &good[..good.len() - 5]);
    expect_bad_message(&inst, "truncated-header", &good[..2]);
    let mut trailing = good.clone();
    trailing.push(0);
    expect_bad_message(&inst, "trailing", &trailing);
    let mut bad_index = good.clone();
    // The last instruction's program id index is right after the blockhash
    // and the instruction count; point it far out of range.
    let ix_start = 3 + 1 + 32 * 3 + 32 + 1;
    bad_index[ix_start] = 200;
    expect_bad_message(&inst, "index-out-of-range", &bad_index);
    let mut bad_version = good.clone();
    bad_version.insert(0, 0x85);
    expect_bad_message(&inst, "unsupported-version", &bad_version);
    expect_bad_message(&inst, "garbage", &[0xff; 64]);

    // The well-formed original is fine (so the cases above fail for the
    // reason they test, not because the base message was bad).
    let ok = rt()
        .block_on(inst.client().submit_intent(&sign_tx("good", &good)))
        .unwrap();
    assert!(matches!(ok, IntentOutcome::Signed(_)));
}
