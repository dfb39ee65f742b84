//! SPL assets end to end: `transfer` intents for a mint become
//! TransferChecked between the right associated token accounts (Token and
//! Token-2022, with the recipient's account created on request), per-mint
//! limits hold under concurrency and across kill -9, and SPL transfers in
//! `sign_transaction` are counted per mint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::str::FromStr;

use base64::Engine as _;
use common::*;
use keyward_client::wire::{Action, IntentRequest, SignedIntent};
use keyward_client::{ClientError, IntentOutcome};
use solana_sdk::instruction::{AccountMeta, Instruction};
use solana_sdk::message::Message;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::transaction::Transaction;

fn token() -> Pubkey {
    Pubkey::from_str("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA").unwrap()
}

fn token_2022() -> Pubkey {
    Pubkey::from_str("TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb").unwrap()
}

fn ata_program() -> Pubkey {
    Pubkey::from_str("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL").unwrap()
}

/// The associated token account, derived here with solana-sdk.
fn ata(wallet: &Pubkey, mint: &Pubkey, program: &Pubkey) -> Pubkey {
    Pubkey::find_program_address(
        &[wallet.as_ref(), program.as_ref(), mint.as_ref()],
        &ata_program(),
    )
    .0
}

const MINT: Pubkey = Pubkey::new_from_array([42; 32]);
const MINT_2022: Pubkey = Pubkey::new_from_array([43; 32]);

fn policy(per_day: &str) -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\nbreaker = {{ max_consecutive_denials = 1000 }}\nrate_limit = {{ per_hour = 1000 }}\n\
         [agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"10\"\n\
         [agents.dev.limits.{MINT}]\ndecimals = 6\nper_tx = \"5\"\nper_day = \"{per_day}\"\n\
         [agents.dev.limits.{MINT_2022}]\ndecimals = 2\ntoken_program = \"token-2022\"\nper_tx = \"5\"\nper_day = \"{per_day}\"\n"
    )
}

/// An instance for bursts of 32 concurrent requests: the default per-uid
/// connection limit (32) has no room for a connection the daemon has not
/// released yet when the next one arrives.
fn burst_instance(per_day: &str) -> Instance {
    let mut inst = Instance::init();
    inst.write_policy(&policy(per_day));
    inst.add_daemon_config("max_connections_per_uid = 64");
    inst.start();
    inst
}

fn spl_transfer(id: &str, mint: &Pubkey, to: &Pubkey, amount: &str, create: bool) -> IntentRequest {
    IntentRequest {
        intent_id: id.to_owned(),
        key: "hot".to_owned(),
        action: Action::Transfer {
            asset: mint.to_string(),
            to: to.to_string(),
            amount: amount.to_owned(),
            recent_blockhash: blockhash(),
            memo: None,
            create_recipient_account: create,
        },
    }
}

fn signed(outcome: IntentOutcome) -> SignedIntent {
    match outcome {
        IntentOutcome::Signed(s) => s,
        other => panic!("expected a signature, got {other:?}"),
    }
}

/// Whether account `i` is writable per the message header.
fn writable(tx: &Transaction, i: usize) -> bool {
    let h = tx.message.header;
    let signers = h.num_required_signatures as usize;
    if i < signers {
        i < signers - h.num_readonly_signed_accounts as usize
    } else {
        i < tx.message.account_keys.len() - h.num_readonly_unsigned_accounts as usize
    }
}

fn decode(s: &SignedIntent) -> Transaction {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&s.transaction)
        .unwrap();
    let tx: Transaction = bincode::deserialize(&bytes).unwrap();
    tx.verify().expect("the signature verifies");
    tx
}

/// Spent in base units of `asset` in the rolling window.
fn spent(inst: &Instance, asset: &str) -> u64 {
    rt().block_on(inst.client().policy())
        .unwrap()
        .limits
        .iter()
        .find(|l| l.asset == asset)
        .unwrap_or_else(|| panic!("no budget for {asset}"))
        .spent_24h_base_units
}

#[test]
fn spl_transfer_intents_are_transfer_checked_between_associated_accounts() {
    let inst = Instance::with_policy(&policy("100"));
    let us = inst.hot;
    for (mint, program, decimals, amount, base) in [
        (MINT, token(), 6u8, "2.5", 2_500_000u64),
        (MINT_2022, token_2022(), 2u8, "1.25", 125u64),
    ] {
        let to = random_pubkey();
        let s = signed(
            rt().block_on(inst.client().submit_intent(&spl_transfer(
                &format!("spl-{mint}"),
                &mint,
                &to,
                amount,
                false,
            )))
            .unwrap(),
        );
        let tx = decode(&s);
        let keys = &tx.message.account_keys;
        assert_eq!(keys[0], us, "our key pays the fee");
        assert_eq!(
            tx.message.instructions.len(),
            1,
            "one instruction, nothing hidden"
        );
        let ix = &tx.message.instructions[0];
        assert_eq!(keys[ix.program_id_index as usize], program);
        let mut data = vec![12u8];
        data.extend_from_slice(&base.to_le_bytes());
        data.push(decimals);
        assert_eq!(
            ix.data, data,
            "TransferChecked of {base} with {decimals} decimals"
        );
        let accounts: Vec<Pubkey> = ix.accounts.iter().map(|&i| keys[i as usize]).collect();
        assert_eq!(
            accounts,
            vec![
                ata(&us, &mint, &program),
                mint,
                ata(&to, &mint, &program),
                us
            ],
            "source ATA, mint, destination ATA, our key as authority"
        );
        assert!(writable(&tx, ix.accounts[0] as usize));
        assert!(writable(&tx, ix.accounts[2] as usize));
        assert!(!writable(&tx, ix.accounts[1] as usize));
        assert_eq!(spent(&inst, &mint.to_string()), base);
    }
    // Only the signature fees were SOL spend.
    assert_eq!(spent(&inst, "SOL"), 2 * FEE);

    // Creating the recipient's account: CreateIdempotent funded by our key,
    // whose rent counts as SOL spend.
    let to = random_pubkey();
    let s = signed(
        rt().block_on(inst.client().submit_intent(&spl_transfer(
            "spl-create",
            &MINT,
            &to,
            "1",
            true,
        )))
        .unwrap(),
    );
    let tx = decode(&s);
    let keys = &tx.message.account_keys;
    assert_eq!(tx.message.instructions.len(), 2);
    let create = &tx.message.instructions[0];
    assert_eq!(keys[create.program_id_index as usize], ata_program());
    assert_eq!(create.data, vec![1], "CreateIdempotent");
    let accounts: Vec<Pubkey> = create.accounts.iter().map(|&i| keys[i as usize]).collect();
    let system = Pubkey::from_str("11111111111111111111111111111111").unwrap();
    assert_eq!(
        accounts,
        vec![us, ata(&to, &MINT, &token()), to, MINT, system, token()]
    );
    assert_eq!(spent(&inst, "SOL"), 3 * FEE + 2_039_280);
    assert_eq!(spent(&inst, &MINT.to_string()), 2_500_000 + 1_000_000);
}

#[test]
fn spl_limits_and_rules_deny_and_count_nothing() {
    let inst = Instance::with_policy(&policy("6"));
    let to = random_pubkey();
    let deny = |req: IntentRequest, rule: &str| {
        let before = Counters::of(&inst.db);
        let view_before = rt().block_on(inst.client().policy()).unwrap();
        match rt().block_on(inst.client().submit_intent(&req)) {
            Err(ClientError::Api {
                status: 403,
                code,
                reasons,
                ..
            }) => {
                assert_eq!(code, "policy_denied");
                assert!(
                    reasons.iter().any(|r| r.rule == rule),
                    "{}: {reasons:?}",
                    req.intent_id
                )
            }
            other => panic!("{}: expected a {rule} denial, got {other:?}", req.intent_id),
        }
        assert_nothing_counted(&inst, &req.intent_id, &before, &view_before);
    };
    deny(
        spl_transfer("over-per-tx", &MINT, &to, "5.000001", false),
        "per_tx_limit",
    );
    signed(
        rt().block_on(
            inst.client()
                .submit_intent(&spl_transfer("first", &MINT, &to, "5", false)),
        )
        .unwrap(),
    );
    deny(
        spl_transfer("over-day", &MINT, &to, "1.000001", false),
        "daily_limit",
    );
    // The other mint has its own budget.
    signed(
        rt().block_on(inst.client().submit_intent(&spl_transfer(
            "other-mint",
            &MINT_2022,
            &to,
            "5",
            false,
        )))
        .unwrap(),
    );
    // A mint without limits.
    deny(
        spl_transfer("no-limits", &Pubkey::new_unique(), &to, "1", false),
        "asset_not_allowed",
    );
    // Too many decimals for the mint is a bad amount, not a denial.
    match rt().block_on(inst.client().submit_intent(&spl_transfer(
        "precision",
        &MINT_2022,
        &to,
        "0.001",
        false,
    ))) {
        Err(ClientError::Api {
            status: 400, code, ..
        }) => assert_eq!(code, "invalid_amount"),
        other => panic!("expected invalid_amount, got {other:?}"),
    }

    // sign_transaction: a plain Transfer (no mint named) and a
    // TransferChecked with the wrong decimals are refused; a right one counts.
    let us = inst.hot;
    let src = ata(&us, &MINT, &token());
    let dst = ata(&to, &MINT, &token());
    let plain = Instruction::new_with_bytes(
        token(),
        &[&[3u8][..], &1u64.to_le_bytes()].concat(),
        vec![
            AccountMeta::new(src, false),
            AccountMeta::new(dst, false),
            AccountMeta::new_readonly(us, true),
        ],
    );
    let checked = |amount: u64, decimals: u8| {
        Instruction::new_with_bytes(
            token(),
            &[&[12u8][..], &amount.to_le_bytes(), &[decimals]].concat(),
            vec![
                AccountMeta::new(src, false),
                AccountMeta::new_readonly(MINT, false),
                AccountMeta::new(dst, false),
                AccountMeta::new_readonly(us, true),
            ],
        )
    };
    let msg = |ixs: &[Instruction]| {
        Message::new_with_blockhash(ixs, Some(&us), &random_hash()).serialize()
    };
    deny(
        sign_tx("plain-transfer", &msg(&[plain])),
        "asset_not_allowed",
    );
    deny(
        sign_tx("wrong-decimals", &msg(&[checked(1, 9)])),
        "asset_not_allowed",
    );
    // Two transfers together exceed what is left of the day (1 of 6).
    deny(
        sign_tx(
            "two-checked",
            &msg(&[checked(600_000, 6), checked(600_000, 6)]),
        ),
        "daily_limit",
    );
    signed(
        rt().block_on(
            inst.client()
                .submit_intent(&sign_tx("one-checked", &msg(&[checked(1_000_000, 6)]))),
        )
        .unwrap(),
    );
    assert_eq!(spent(&inst, &MINT.to_string()), 6_000_000);
    assert_eq!(spent(&inst, &MINT_2022.to_string()), 500);
    assert!(inst.audit_verify().status.success());
}

/// 32 concurrent intents for a mint whose per_day admits exactly 12.
fn burst(inst: &Instance, prefix: &str, n: usize) -> Vec<Result<IntentOutcome, ClientError>> {
    let rt = rt();
    let client = inst.client();
    rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let client = client.clone();
                let req = spl_transfer(
                    &format!("{prefix}-{i}"),
                    &MINT,
                    &random_pubkey(),
                    "1",
                    false,
                );
                tokio::spawn(async move { client.submit_intent(&req).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

#[test]
fn thirty_two_concurrent_spl_intents_against_a_day_for_twelve_sign_exactly_twelve() {
    let mut inst = burst_instance("12");
    let results = burst(&inst, "c", 32);
    let signed_n = results
        .iter()
        .filter(|r| matches!(r, Ok(IntentOutcome::Signed(_))))
        .count();
    assert_eq!(signed_n, 12, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, ClientError::Api { status: 403, reasons, .. } if reasons.iter().any(|x| x.rule == "daily_limit")),
                "{e:?}"
            );
        }
    }
    assert_eq!(spent(&inst, &MINT.to_string()), 12_000_000);
    assert!(inst.audit_verify().status.success());
    assert!(inst.stop().success());
    inst.start();
    assert_eq!(spent(&inst, &MINT.to_string()), 12_000_000);
    let after = rt().block_on(inst.client().submit_intent(&spl_transfer(
        "c-after",
        &MINT,
        &random_pubkey(),
        "1",
        false,
    )));
    assert!(
        matches!(&after, Err(ClientError::Api { status: 403, reasons, .. }) if reasons.iter().any(|r| r.rule == "daily_limit")),
        "{after:?}"
    );
    let trail = IntentTrail::of(&inst.db);
    assert_eq!(trail.signed.len(), 12, "{trail:?}");
    for r in &results {
        if let Ok(IntentOutcome::Signed(s)) = r {
            assert_eq!(
                trail.signed.get(&s.intent_id),
                Some(&vec![s.signature.clone()])
            );
        }
    }
}

#[test]
fn kill_9_during_a_spl_burst_neither_overspends_nor_loses_a_signature() {
    let reqs: Vec<_> = (0..32)
        .map(|i| spl_transfer(&format!("k-{i}"), &MINT, &random_pubkey(), "1", false))
        .collect();
    let (inst, outcome) = crash_run(
        8,
        || burst_instance("12"),
        &[],
        &reqs,
        std::time::Duration::from_millis(2),
        false,
        12,
    );
    assert!(!outcome.interrupted.is_empty());
    assert_eq!(outcome.total_signed, 12);
    assert_eq!(
        spent(&inst, &MINT.to_string()),
        12_000_000,
        "interrupted reservations were released"
    );
    assert_eq!(spent(&inst, "SOL"), 12 * FEE, "fees of the twelve");
    assert!(inst.audit_verify().status.success());
}
