//! keyward's own Solana decoder and effect extraction checked against an
//! independent implementation, solana-sdk, on generated messages:
//! - every well-formed message solana-sdk serializes decodes to the same
//!   fields;
//! - whatever keyward accepts (also after random corruption), solana-sdk
//!   accepts too, with the same fields and the same canonical bytes, so
//!   keyward is never the more lenient of the two;
//! - the SOL a message costs our key is exactly the transfers from it plus
//!   the signature and priority fees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::str::FromStr;

use keyward::solana::{DecodedMessage, MessageVersion, decode_message, extract_effects};
use keyward::types::{Lamports, PublicKey};
use proptest::prelude::*;
use solana_sdk::hash::Hash;
use solana_sdk::instruction::{AccountMeta, Instruction};
use solana_sdk::message::compiled_instruction::CompiledInstruction;
use solana_sdk::message::{Message, MessageHeader, VersionedMessage, v0};
use solana_sdk::pubkey::Pubkey;
use solana_system_interface::instruction::SystemInstruction;

fn ours(p: &Pubkey) -> PublicKey {
    PublicKey(p.to_bytes())
}

/// Asserts keyward's decoding equals solana-sdk's message.
fn assert_same(k: &DecodedMessage, s: &VersionedMessage) {
    let header = s.header();
    assert_eq!(k.num_required_signatures, header.num_required_signatures);
    assert_eq!(k.num_readonly_signed, header.num_readonly_signed_accounts);
    assert_eq!(
        k.num_readonly_unsigned,
        header.num_readonly_unsigned_accounts
    );
    let keys: Vec<PublicKey> = s.static_account_keys().iter().map(ours).collect();
    assert_eq!(k.account_keys, keys);
    assert_eq!(k.recent_blockhash, s.recent_blockhash().to_bytes());
    assert_eq!(k.instructions.len(), s.instructions().len());
    for (a, b) in k.instructions.iter().zip(s.instructions()) {
        assert_eq!(a.program_id_index, b.program_id_index);
        assert_eq!(a.accounts, b.accounts);
        assert_eq!(a.data, b.data);
    }
    match s {
        VersionedMessage::Legacy(_) => {
            assert_eq!(k.version, MessageVersion::Legacy);
            assert!(k.lookups.is_empty());
        }
        VersionedMessage::V0(m) => {
            assert_eq!(k.version, MessageVersion::V0);
            assert_eq!(k.lookups.len(), m.address_table_lookups.len());
            for (a, b) in k.lookups.iter().zip(&m.address_table_lookups) {
                assert_eq!(a.account_key, ours(&b.account_key));
                assert_eq!(a.writable_indexes, b.writable_indexes);
                assert_eq!(a.readonly_indexes, b.readonly_indexes);
            }
        }
        other => panic!("keyward decoded a message format it does not support: {other:?}"),
    }
}

prop_compose! {
    fn lookup()(w in prop::collection::vec(any::<u8>(), 0..4),
                r in prop::collection::vec(any::<u8>(), 0..4),
                extra in any::<u8>()) -> v0::MessageAddressTableLookup {
        let mut writable_indexes = w;
        if writable_indexes.is_empty() && r.is_empty() {
            writable_indexes.push(extra);
        }
        v0::MessageAddressTableLookup {
            account_key: Pubkey::new_unique(),
            writable_indexes,
            readonly_indexes: r,
        }
    }
}

prop_compose! {
    /// A structurally valid message: distinct keys, a writable fee payer,
    /// program ids among the static keys (never the payer), account
    /// indexes in range.
    fn message()(n_keys in 2usize..8, v0_msg in any::<bool>(),
                 lookups in prop::collection::vec(lookup(), 0..3),
                 seeds in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..5),
                                                 prop::collection::vec(any::<u8>(), 0..40)), 0..4),
                 sig_frac in 0.0f64..1.0, ro_signed_frac in 0.0f64..1.0, ro_unsigned_frac in 0.0f64..1.0,
                 hash in any::<[u8; 32]>()) -> VersionedMessage {
        let keys: Vec<Pubkey> = (0..n_keys).map(|_| Pubkey::new_unique()).collect();
        let signers = 1 + ((n_keys - 1) as f64 * sig_frac) as usize;
        let ro_signed = ((signers - 1) as f64 * ro_signed_frac) as usize;
        let ro_unsigned = ((n_keys - signers) as f64 * ro_unsigned_frac) as usize;
        let lookups = if v0_msg { lookups } else { vec![] };
        let loaded: usize = lookups.iter().map(|l| l.writable_indexes.len() + l.readonly_indexes.len()).sum();
        let total = n_keys + loaded;
        let instructions = seeds
            .into_iter()
            .map(|(p, accts, data)| CompiledInstruction {
                program_id_index: (1 + usize::from(p) % (n_keys - 1)) as u8,
                accounts: accts.into_iter().map(|a| (usize::from(a) % total) as u8).collect(),
                data,
            })
            .collect();
        let header = MessageHeader {
            num_required_signatures: signers as u8,
            num_readonly_signed_accounts: ro_signed as u8,
            num_readonly_unsigned_accounts: ro_unsigned as u8,
        };
        let recent_blockhash = Hash::new_from_array(hash);
        if v0_msg {
            VersionedMessage::V0(v0::Message {
                header,
                account_keys: keys,
                recent_blockhash,
                instructions,
                address_table_lookups: lookups,
            })
        } else {
            VersionedMessage::Legacy(Message {
                header,
                account_keys: keys,
                recent_blockhash,
                instructions,
            })
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Insert(i, x)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match *m {
        Mutation::Flip(i, x) => bytes[i % len] ^= x,
        Mutation::Truncate(i) => bytes.truncate(i % len),
        Mutation::Insert(i, x) => bytes.insert(i % (len + 1), x),
        Mutation::Remove(i) => {
            bytes.remove(i % len);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn well_formed_messages_decode_to_the_same_fields(msg in message()) {
        prop_assume!(msg.sanitize().is_ok());
        let bytes = msg.serialize();
        prop_assume!(1 + 64 * usize::from(msg.header().num_required_signatures) + bytes.len() <= 1232);
        let decoded = decode_message(&bytes).expect("keyward decodes what solana-sdk serializes");
        assert_same(&decoded, &msg);
    }

    #[test]
    fn keyward_accepts_nothing_solana_sdk_rejects(msg in message(), muts in prop::collection::vec(mutation(), 1..4)) {
        let mut bytes = msg.serialize();
        for m in &muts {
            apply(&mut bytes, m);
        }
        if let Ok(decoded) = decode_message(&bytes) {
            let theirs: VersionedMessage = bincode::deserialize(&bytes)
                .expect("solana-sdk deserializes what keyward accepted");
            theirs.sanitize().expect("solana-sdk sanitizes what keyward accepted");
            prop_assert_eq!(theirs.serialize(), bytes, "the bytes are canonical: nothing trails or aliases");
            assert_same(&decoded, &theirs);
        }
    }

    #[test]
    fn sol_spend_is_exactly_transfers_plus_fees(
        amounts in prop::collection::vec(0u64..=u64::MAX / 16, 1..5),
        other_amount in prop::option::of(1u64..1_000_000_000),
        price in prop::option::of(0u64..10_000_000),
        limit in prop::option::of(0u32..2_000_000),
        memo in prop::option::of("[a-z ]{0,40}"),
    ) {
        let us = Pubkey::new_unique();
        let other = Pubkey::new_unique();
        let system = solana_sdk::pubkey::Pubkey::from_str("11111111111111111111111111111111").unwrap();
        let budget = Pubkey::from_str("ComputeBudget111111111111111111111111111111").unwrap();
        let mut ixs = Vec::new();
        if let Some(p) = price {
            ixs.push(Instruction::new_with_bytes(budget, &[&[3u8][..], &p.to_le_bytes()].concat(), vec![]));
        }
        if let Some(l) = limit {
            ixs.push(Instruction::new_with_bytes(budget, &[&[2u8][..], &l.to_le_bytes()].concat(), vec![]));
        }
        let mut recipients = Vec::new();
        for a in &amounts {
            let to = Pubkey::new_unique();
            recipients.push((to, *a));
            ixs.push(Instruction::new_with_bincode(
                system,
                &SystemInstruction::Transfer { lamports: *a },
                vec![AccountMeta::new(us, true), AccountMeta::new(to, false)],
            ));
        }
        // A transfer by another signer is not our spend.
        if let Some(a) = other_amount {
            ixs.push(Instruction::new_with_bincode(
                system,
                &SystemInstruction::Transfer { lamports: a },
                vec![AccountMeta::new(other, true), AccountMeta::new(Pubkey::new_unique(), false)],
            ));
        }
        if let Some(text) = &memo {
            let memo_id = Pubkey::from_str("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr").unwrap();
            ixs.push(Instruction::new_with_bytes(memo_id, text.as_bytes(), vec![]));
        }
        let msg = Message::new_with_blockhash(&ixs, Some(&us), &Hash::new_from_array([7; 32]));
        let bytes = msg.serialize();
        let decoded = decode_message(&bytes).unwrap();
        let fx = extract_effects(&decoded, &ours(&us));
        prop_assert!(fx.violations.is_empty(), "{:?}", fx.violations);
        prop_assert!(fx.unknown_programs.is_empty());
        prop_assert_eq!(fx.our_index, Some(0));
        prop_assert!(fx.fee_payer_is_us);
        let signatures = 1 + u64::from(other_amount.is_some());
        let cu = u128::from(limit.unwrap_or(1_400_000).min(1_400_000));
        let priority = (u128::from(price.unwrap_or(0)) * cu).div_ceil(1_000_000) as u64;
        prop_assert_eq!(fx.fees, Lamports(5_000 * signatures + priority));
        let expected: u64 = amounts.iter().sum::<u64>() + 5_000 * signatures + priority;
        prop_assert_eq!(fx.total_sol_spend(), Some(Lamports(expected)));
        prop_assert_eq!(fx.sol_outflows.len(), amounts.len());
        for (o, (to, a)) in fx.sol_outflows.iter().zip(&recipients) {
            prop_assert_eq!(o.to, ours(to));
            prop_assert_eq!(o.lamports, Lamports(*a));
        }

        // Signed by another payer, the same transfers cost us no fees.
        let msg = Message::new_with_blockhash(&ixs, Some(&other), &Hash::new_from_array([7; 32]));
        let fx = extract_effects(&decode_message(&msg.serialize()).unwrap(), &ours(&us));
        prop_assert!(!fx.fee_payer_is_us);
        prop_assert_eq!(fx.total_sol_spend(), Some(Lamports(amounts.iter().sum())));
    }
}

#[test]
fn overflowing_outflows_are_reported_as_no_total() {
    let us = Pubkey::new_unique();
    let system = Pubkey::from_str("11111111111111111111111111111111").unwrap();
    let ixs: Vec<Instruction> = (0..2)
        .map(|_| {
            Instruction::new_with_bincode(
                system,
                &SystemInstruction::Transfer {
                    lamports: u64::MAX / 2 + 1,
                },
                vec![
                    AccountMeta::new(us, true),
                    AccountMeta::new(Pubkey::new_unique(), false),
                ],
            )
        })
        .collect();
    let msg = Message::new_with_blockhash(&ixs, Some(&us), &Hash::new_from_array([7; 32]));
    let fx = extract_effects(&decode_message(&msg.serialize()).unwrap(), &ours(&us));
    assert_eq!(fx.total_sol_spend(), None);
}
