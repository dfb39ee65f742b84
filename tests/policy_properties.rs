//! Property test of the decision engine over random sequences and timings
//! of intents for SOL and an SPL mint, with signing failures in between:
//! in every rolling 24-hour window the signed total per asset stays within
//! `per_day`, every signed amount within `per_tx`, and the signed count per
//! rolling minute and hour within the rate limits; and every intent those
//! limits admit is allowed (a model of the limits decides each one exactly).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use keyward::policy::{Asset, Policy, counters, engine};
use keyward::solana::{Effects, SolOutflow, SplOutflow, programs};
use keyward::types::{KeyName, Lamports, PublicKey};
use proptest::prelude::*;
use rusqlite::Connection;

const MINT: PublicKey = PublicKey([77; 32]);
const DAY: i64 = 86_400_000;
const FEE: u64 = 5_000;

fn policy() -> Policy {
    let text = format!(
        "[agents.a]\nuid = 1\nkeys = [\"hot\"]\n\
         rate_limit = {{ per_minute = 4, per_hour = 25 }}\n\
         breaker = {{ max_consecutive_denials = 100000 }}\n\
         [agents.a.limits.SOL]\nper_tx = \"0.5\"\nper_day = \"3\"\n\
         [agents.a.limits.{}]\ndecimals = 2\nper_tx = \"50\"\nper_day = \"120\"\n",
        MINT.to_base58()
    );
    Policy::parse(Path::new("policy.toml"), &text, &|_| None).unwrap()
}

#[derive(Debug, Clone)]
struct Op {
    dt_ms: i64,
    sol: Option<u64>,
    spl: Option<u64>,
    fails: bool,
}

fn op() -> impl Strategy<Value = Op> {
    (
        prop_oneof![
            0i64..2_000,
            0i64..120_000,
            0i64..4 * 3_600_000,
            0i64..2 * DAY
        ],
        prop::option::of(0u64..800_000_000),
        prop::option::of(0u64..8_000),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(dt_ms, sol, spl, fails)| Op {
            dt_ms,
            sol,
            spl,
            fails,
        })
}

fn effects(op: &Op) -> Effects {
    Effects {
        our_index: Some(0),
        fee_payer_is_us: true,
        fees: Lamports(FEE),
        sol_outflows: op
            .sol
            .map(|l| SolOutflow {
                instruction: 0,
                to: PublicKey([1; 32]),
                lamports: Lamports(l),
                kind: "transfer",
            })
            .into_iter()
            .collect(),
        spl_outflows: op
            .spl
            .map(|a| SplOutflow {
                instruction: 1,
                token_program: programs::TOKEN,
                mint: Some(MINT),
                source: PublicKey([2; 32]),
                destination: PublicKey([3; 32]),
                amount: a,
                decimals: Some(2),
            })
            .into_iter()
            .collect(),
        ..Effects::default()
    }
}

/// What `op` spends per asset: SOL its transfer and the fee we pay, the
/// mint its transfer.
fn spend_of(op: &Op) -> BTreeMap<Asset, u64> {
    let mut spend = BTreeMap::new();
    spend.insert(Asset::Sol, op.sol.unwrap_or(0) + FEE);
    if let Some(a) = op.spl {
        spend.insert(Asset::Mint(MINT), a);
    }
    spend
}

/// The model of the limits: an intent spending `spend` at `now` is within
/// them given the intents that stayed signed (`signed`): every amount within
/// `per_tx`, every asset's rolling 24 hours with it within `per_day`, and
/// fewer than the rate limit's intents in the last minute and hour.
fn admits(
    agent: &keyward::policy::AgentPolicy,
    signed: &[(i64, BTreeMap<Asset, u64>)],
    now: i64,
    spend: &BTreeMap<Asset, u64>,
) -> bool {
    let within = |w: i64| signed.iter().filter(move |(u, _)| *u > now - w);
    spend.iter().all(|(asset, amount)| {
        let Some(l) = agent.limits.get(asset) else {
            return false;
        };
        let day: u64 = within(DAY)
            .map(|(_, s)| s.get(asset).copied().unwrap_or(0))
            .sum();
        *amount <= l.per_tx && day + amount <= l.per_day
    }) && within(60_000).count() < 4
        && within(3_600_000).count() < 25
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn signed_totals_and_rates_stay_within_limits(ops in prop::collection::vec(op(), 1..250)) {
        let policy = policy();
        let agent = &policy.agents[0];
        let key = KeyName::new("hot").unwrap();
        let mut conn = Connection::open_in_memory().unwrap();
        keyward::schema::migrate(&mut conn).unwrap();
        let mut now: i64 = 1_800_000_000_000;
        // (time, spend per asset) of every intent that stayed signed.
        let mut signed: Vec<(i64, BTreeMap<Asset, u64>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            now += op.dt_ms;
            let id = format!("i{i}");
            let fx = effects(op);
            let v = engine::decide(&conn, agent, &key, Some(&fx), vec![], &id, now, engine::Mode::Commit).unwrap();
            prop_assert!(v.locked_for_ms.is_none());
            // Lower bound: what the limits admit is allowed (an engine that
            // denies too much fails here, one that allows too much below).
            let must_allow = admits(agent, &signed, now, &spend_of(op));
            prop_assert_eq!(
                v.decision.allowed(),
                must_allow,
                "op {} {:?} at {}: {:?}",
                i,
                op,
                now,
                v.decision.reasons
            );
            if v.decision.allowed() {
                prop_assert_eq!(&v.decision.spend, &spend_of(op), "op {}", i);
            }
            if v.decision.allowed() {
                if op.fails {
                    // Signing failed: nothing was released, the reservation goes.
                    engine::release(&conn, "a", &id).unwrap();
                } else {
                    signed.push((now, v.decision.spend.clone()));
                }
            }
        }
        let limits = &agent.limits;
        for (t, spend) in &signed {
            for (asset, amount) in spend {
                prop_assert!(*amount <= limits[asset].per_tx, "{asset}: {amount} > per_tx");
            }
            // Windows ending at each signed intent (where the sums peak).
            for (asset, l) in limits {
                let day: u64 = signed
                    .iter()
                    .filter(|(u, _)| *u > t - DAY && u <= t)
                    .map(|(_, s)| s.get(asset).copied().unwrap_or(0))
                    .sum();
                prop_assert!(day <= l.per_day, "{asset}: {day} in the 24 h before {t}, per_day {}", l.per_day);
            }
            let count = |w: i64| signed.iter().filter(|(u, _)| *u > t - w && u <= t).count();
            prop_assert!(count(60_000) <= 4, "{} in a minute", count(60_000));
            prop_assert!(count(3_600_000) <= 25, "{} in an hour", count(3_600_000));
        }
        // The engine's own view agrees with the signed history.
        for asset in limits.keys() {
            let expect: u64 = signed
                .iter()
                .filter(|(u, _)| *u > now - DAY)
                .map(|(_, s)| s.get(asset).copied().unwrap_or(0))
                .sum();
            prop_assert_eq!(counters::spent_24h(&conn, "a", &asset.key(), now).unwrap(), Lamports(expect));
        }
    }
}

#[test]
fn dry_runs_change_nothing() {
    let policy = policy();
    let agent = &policy.agents[0];
    let key = KeyName::new("hot").unwrap();
    let mut conn = Connection::open_in_memory().unwrap();
    keyward::schema::migrate(&mut conn).unwrap();
    let now = 1_800_000_000_000;
    let fx = effects(&Op {
        dt_ms: 0,
        sol: Some(100_000_000),
        spl: Some(100),
        fails: false,
    });
    let dump = |c: &Connection| -> Vec<String> {
        let mut out = Vec::new();
        for table in ["spend", "spend_total", "rate_events", "agent_breaker"] {
            let mut stmt = c.prepare(&format!("SELECT * FROM {table}")).unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    Ok((0..n)
                        .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                        .collect::<Vec<_>>()
                        .join(","))
                })
                .unwrap();
            out.extend(rows.map(|r| format!("{table}:{}", r.unwrap())));
        }
        out
    };
    engine::decide(
        &conn,
        agent,
        &key,
        Some(&fx),
        vec![],
        "real",
        now,
        engine::Mode::Commit,
    )
    .unwrap();
    let before = dump(&conn);
    for (i, amount) in [100_000_000u64, 900_000_000].into_iter().enumerate() {
        let fx = effects(&Op {
            dt_ms: 0,
            sol: Some(amount),
            spl: None,
            fails: false,
        });
        let v = engine::decide(
            &conn,
            agent,
            &key,
            Some(&fx),
            vec![],
            &format!("dry{i}"),
            now + 1,
            engine::Mode::DryRun,
        )
        .unwrap();
        assert_eq!(v.decision.allowed(), i == 0, "{:?}", v.decision.reasons);
    }
    assert_eq!(dump(&conn), before, "a dry run writes nothing");
}
