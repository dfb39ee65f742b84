//! Decode + effect extraction + policy evaluation of typical and worst-case
//! messages: the per-intent work keyward does before it touches the ledger.
//! Run with `cargo bench --bench decode_policy`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keyward::policy::{AgentPolicy, Asset, AssetLimits, evaluate};
use keyward::solana::{build_sol_transfer, decode_message, extract_effects, programs};
use keyward::types::{AgentName, KeyName, Lamports, PublicKey};

fn agent(allow: usize) -> AgentPolicy {
    AgentPolicy {
        name: AgentName::new("bench").unwrap(),
        uid: 1000,
        keys: vec![KeyName::new("hot").unwrap()],
        allow_recipients: Some((1..=allow).map(|i| PublicKey([i as u8; 32])).collect()),
        allow_programs: Default::default(),
        limits: [(
            Asset::Sol,
            AssetLimits {
                decimals: 9,
                per_tx: u64::MAX / 4,
                per_day: u64::MAX / 2,
                token_program: None,
                approval_above: None,
                approvers: None,
            },
        )]
        .into_iter()
        .collect(),
        rate_limit: Default::default(),
        active_hours: None,
        breaker: Default::default(),
    }
}

/// The largest instruction count a packet allows with value in it: 56
/// System transfers from `us` and 8 memos, 64 instructions in 1230 bytes.
fn sixty_four_instructions(us: &PublicKey) -> Vec<u8> {
    let keys = [*us, PublicKey([1; 32]), programs::SYSTEM, programs::MEMO];
    let mut m = vec![1, 0, 2, keys.len() as u8];
    for k in &keys {
        m.extend_from_slice(&k.0);
    }
    m.extend_from_slice(&[9; 32]);
    m.push(64);
    for _ in 0..56 {
        m.extend_from_slice(&[2, 2, 0, 1, 12]);
        m.extend_from_slice(&2u32.to_le_bytes());
        m.extend_from_slice(&1000u64.to_le_bytes());
    }
    for _ in 0..8 {
        m.extend_from_slice(&[3, 0, 3]);
        m.extend_from_slice(b"abc");
    }
    m
}

fn bench(c: &mut Criterion) {
    let us = PublicKey([200; 32]);
    let key = KeyName::new("hot").unwrap();
    let typical = build_sol_transfer(
        &us,
        &PublicKey([3; 32]),
        Lamports(1_000_000),
        [7; 32],
        Some("invoice 42"),
    )
    .unwrap();
    let worst = sixty_four_instructions(&us);
    let policy = agent(64);
    let spent = std::collections::BTreeMap::new();
    for (name, msg) in [("typical transfer", &typical), ("64 instructions", &worst)] {
        // Every step once, so the benchmark measures an allowed path.
        let fx = extract_effects(&decode_message(msg).unwrap(), &us);
        assert!(fx.violations.is_empty(), "{:?}", fx.violations);
        assert!(evaluate(&policy, &key, &fx, &spent).allowed());
        c.bench_function(&format!("decode + effects + policy: {name}"), |b| {
            b.iter(|| {
                let decoded = decode_message(black_box(msg)).unwrap();
                let effects = extract_effects(&decoded, &us);
                black_box(evaluate(&policy, &key, &effects, &spent))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
