//! The stateful policy rules end to end: the denial breaker (423, survives
//! a restart, lifts after the cooldown and on an operator reset, all
//! recorded), rate limits and active hours.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use keyward_client::{ClientError, IntentOutcome};

fn policy(extra: &str) -> String {
    format!(
        "[agents.dev]\nuid = {{UID}}\nkeys = [\"hot\"]\n{extra}\n\
         [agents.dev.limits.SOL]\nper_tx = \"0.1\"\nper_day = \"100\"\n"
    )
}

fn submit(inst: &Instance, id: &str, amount: &str) -> Result<IntentOutcome, ClientError> {
    rt().block_on(
        inst.client()
            .submit_intent(&transfer(id, &random_pubkey(), amount)),
    )
}

fn expect_rule(r: Result<IntentOutcome, ClientError>, rule: &str) {
    match r {
        Err(ClientError::Api {
            status: 403,
            reasons,
            ..
        }) => {
            assert!(
                reasons.iter().any(|x| x.rule == rule),
                "expected {rule}: {reasons:?}"
            )
        }
        other => panic!("expected a 403 {rule}, got {other:?}"),
    }
}

fn expect_locked(r: Result<IntentOutcome, ClientError>) -> u64 {
    match r {
        Err(ClientError::Api {
            status: 423,
            code,
            retry_after,
            ..
        }) => {
            assert_eq!(code, "agent_locked");
            retry_after.expect("423 carries retry_after")
        }
        other => panic!("expected 423 agent_locked, got {other:?}"),
    }
}

fn events(inst: &Instance, name: &str) -> Vec<String> {
    let out = inst.keyward(&["audit", "export", "--db", inst.db.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("\"event\":\"{name}\"")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn five_denials_lock_the_agent_across_restarts_until_cooldown_or_reset() {
    let mut inst = Instance::with_policy(&policy(
        "breaker = { max_consecutive_denials = 5, cooldown_s = 3 }",
    ));
    for i in 0..4 {
        expect_rule(submit(&inst, &format!("big-{i}"), "1"), "per_tx_limit");
    }
    let tripped = std::time::Instant::now();
    expect_rule(submit(&inst, "big-4", "1"), "per_tx_limit");
    // Now even an allowed intent is refused while the lock lasts, and told
    // how long in whole seconds rounded up: 3 within the first second of
    // the 3 s lock.
    let retry = expect_locked(submit(&inst, "small-1", "0.01"));
    if tripped.elapsed() < std::time::Duration::from_millis(1000) {
        assert_eq!(retry, 3, "retry_after");
    } else {
        assert!((2..=3).contains(&retry), "retry_after {retry}");
    }
    let breaker = rt()
        .block_on(inst.client().policy())
        .unwrap()
        .breaker
        .unwrap();
    assert_eq!(
        (breaker.max_consecutive_denials, breaker.consecutive_denials),
        (5, 5)
    );
    assert!(
        breaker.locked_until.is_some(),
        "GET /v1/policy shows the lock"
    );
    assert_eq!(events(&inst, "breaker_tripped").len(), 1);

    // The lock is in the ledger database: a restart keeps it.
    assert!(inst.stop().success());
    inst.start();
    expect_locked(submit(&inst, "small-1", "0.01"));

    // An operator reset lifts it at once, and is recorded.
    let out = inst.keyward(&["breaker", "reset", "dev"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(matches!(
        submit(&inst, "small-1", "0.01"),
        Ok(IntentOutcome::Signed(_))
    ));
    let resets = events(&inst, "breaker_reset");
    assert_eq!(resets.len(), 1);
    assert!(resets[0].contains("\"by\":\"uid:"), "{}", resets[0]);

    // An allowed intent resets the count: four denials do not lock.
    for i in 0..4 {
        expect_rule(submit(&inst, &format!("again-{i}"), "1"), "per_tx_limit");
    }
    assert!(matches!(
        submit(&inst, "small-2", "0.01"),
        Ok(IntentOutcome::Signed(_))
    ));
    for i in 0..5 {
        expect_rule(submit(&inst, &format!("third-{i}"), "1"), "per_tx_limit");
    }
    expect_locked(submit(&inst, "small-3", "0.01"));
    // After the cooldown the lock lifts by itself, recorded as a reset.
    wait_until(
        "the cooldown to end",
        std::time::Duration::from_secs(10),
        || {
            rt().block_on(inst.client().policy())
                .unwrap()
                .breaker
                .unwrap()
                .locked_until
                .is_none()
        },
    );
    assert!(matches!(
        submit(&inst, "small-3", "0.01"),
        Ok(IntentOutcome::Signed(_))
    ));
    let resets = events(&inst, "breaker_reset");
    assert_eq!(resets.len(), 2);
    assert!(resets[1].contains("\"by\":\"cooldown\""), "{}", resets[1]);
    assert_eq!(events(&inst, "breaker_tripped").len(), 2);
    assert!(inst.audit_verify().status.success());

    // Unknown breakers are refused by name.
    let out = inst.keyward(&["breaker", "reset", "nobody"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown_breaker")
            || String::from_utf8_lossy(&out.stderr).contains("no breaker")
    );
}

#[test]
fn rate_limits_count_allowed_intents_per_minute() {
    let inst = Instance::with_policy(&policy("rate_limit = { per_minute = 3, per_hour = 100 }"));
    for i in 0..3 {
        assert!(matches!(
            submit(&inst, &format!("r-{i}"), "0.01"),
            Ok(IntentOutcome::Signed(_))
        ));
    }
    expect_rule(submit(&inst, "r-3", "0.01"), "rate_limited");
    let view = rt().block_on(inst.client().policy()).unwrap();
    let rate = view.rate_limit.unwrap();
    assert_eq!(
        (rate.per_minute, rate.used_last_minute, rate.used_last_hour),
        (Some(3), 3, 3)
    );
    // Denials do not count toward the rate: still limited, not more so.
    expect_rule(submit(&inst, "r-4", "0.01"), "rate_limited");
    let spent = rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units;
    assert_eq!(
        spent,
        3 * (10_000_000 + FEE),
        "denied intents spent nothing"
    );
}

/// A daily window in UTC from `from` to `to` hours after the current hour.
fn window(from: i64, to: i64) -> String {
    let hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 3600
        % 24;
    let h = |d: i64| (hour + d).rem_euclid(24);
    format!("daily {:02}:00-{:02}:00", h(from), h(to))
}

#[test]
fn active_hours_deny_outside_the_window_and_allow_inside() {
    let outside = policy(&format!(
        "active_hours = {{ tz = \"UTC\", windows = [\"{}\"] }}",
        window(3, 5)
    ));
    let inst = Instance::with_policy(&outside);
    expect_rule(submit(&inst, "late", "0.01"), "outside_active_hours");
    drop(inst);
    // This window started an hour ago and ends in two (it may cross midnight).
    let inside = policy(&format!(
        "active_hours = {{ tz = \"UTC\", windows = [\"{}\"] }}",
        window(-1, 2)
    ));
    let inst = Instance::with_policy(&inside);
    assert!(matches!(
        submit(&inst, "on-time", "0.01"),
        Ok(IntentOutcome::Signed(_))
    ));
}

#[test]
fn dry_runs_decide_without_signing_or_reserving_but_count_toward_the_rate() {
    let inst = Instance::with_policy(&policy(
        "rate_limit = { per_minute = 3 }\nbreaker = { max_consecutive_denials = 5, cooldown_s = 300 }",
    ));
    let client = inst.client();
    let spent = |inst: &Instance| {
        rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units
    };

    let ok = rt()
        .block_on(client.dry_run(&transfer("d-ok", &random_pubkey(), "0.05")))
        .unwrap();
    assert!(ok.dry_run);
    assert_eq!(ok.decision, "allow", "{ok:?}");
    assert_eq!(ok.spend["SOL"], 50_000_000 + FEE);
    assert_eq!(spent(&inst), 0, "a dry run reserves nothing");
    let no = rt()
        .block_on(client.dry_run(&transfer("d-no", &random_pubkey(), "1")))
        .unwrap();
    assert_eq!(no.decision, "deny");
    assert!(
        no.reasons.iter().any(|r| r.rule == "per_tx_limit"),
        "{no:?}"
    );
    // Two dry runs took two of the three places in the minute.
    assert!(matches!(
        submit(&inst, "real-1", "0.05"),
        Ok(IntentOutcome::Signed(_))
    ));
    let limited = rt()
        .block_on(client.dry_run(&transfer("d-rate", &random_pubkey(), "0.05")))
        .unwrap();
    assert!(
        limited.reasons.iter().any(|r| r.rule == "rate_limited"),
        "{limited:?}"
    );
    assert_eq!(spent(&inst), 50_000_000 + FEE, "only the real intent spent");
    // A dry run's id is not taken: the same id can be used for real.
    assert!(rt().block_on(client.get_intent("d-ok")).is_err());
    let out = inst.keyward(&["audit", "export", "--db", inst.db.to_str().unwrap()]);
    let recorded = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"dry_run_evaluated\""))
        .count();
    assert_eq!(
        recorded, 3,
        "each counted dry run is a compact ledger entry"
    );
    assert!(inst.audit_verify().status.success());
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn reload_keeps_the_old_policy_when_invalid_and_applies_a_valid_one_at_once() {
    let inst = Instance::with_policy(&policy(""));
    let old_hash = rt().block_on(inst.client().policy()).unwrap().policy_hash;
    expect_rule(submit(&inst, "big-before", "0.5"), "per_tx_limit");

    // Invalid: line 3 is not TOML. The old policy stays in force.
    std::fs::write(&inst.policy, "[agents.dev]\nuid = 0\nkeys = [\"hot\"\n").unwrap();
    let out = inst.keyward(&["policy", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:", inst.policy.display())),
        "names file:line:column: {err}"
    );
    assert!(err.contains("old policy stays in force"), "{err}");
    assert_eq!(
        rt().block_on(inst.client().policy()).unwrap().policy_hash,
        old_hash
    );
    expect_rule(submit(&inst, "big-invalid", "0.5"), "per_tx_limit");
    // A policy naming a key the HSM does not have is refused too.
    inst.write_policy(&policy("").replace("keys = [\"hot\"]", "keys = [\"hot\", \"cold\"]"));
    let out = inst.keyward(&["policy", "reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cold"));

    // Valid: a larger per_tx applies to the very next intent.
    let text = policy("")
        .replace("per_tx = \"0.1\"", "per_tx = \"1\"")
        .replace("{UID}", &my_uid().to_string());
    std::fs::write(&inst.policy, &text).unwrap();
    let out = inst.keyward(&["policy", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_hash = sha256_hex(text.as_bytes());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&new_hash));
    assert!(matches!(
        submit(&inst, "big-after", "0.5"),
        Ok(IntentOutcome::Signed(_))
    ));
    let loaded = events(&inst, "policy_loaded");
    assert!(loaded.last().unwrap().contains(&new_hash), "{loaded:?}");
    assert!(
        loaded.last().unwrap().contains(&old_hash),
        "records what it replaced"
    );
    let evaluated = events(&inst, "policy_evaluated");
    assert!(
        evaluated.last().unwrap().contains(&new_hash),
        "decisions name the policy they used"
    );

    // SIGHUP does the same.
    let text2 = text.replace("per_tx = \"1\"", "per_tx = \"0.3\"");
    std::fs::write(&inst.policy, &text2).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(inst.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let hash2 = sha256_hex(text2.as_bytes());
    // The reload is recorded: a `policy_loaded` entry for the new file, by
    // SIGHUP.
    let db = inst.db.clone();
    let loaded_by_hup = move || -> Vec<serde_json::Value> {
        ledger_entries(&db, "policy_loaded")
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| p["by"] == "SIGHUP")
            .collect()
    };
    wait_until(
        "the SIGHUP reload to be recorded",
        std::time::Duration::from_secs(10),
        || loaded_by_hup().len() == 1,
    );
    assert!(
        loaded_by_hup()[0].to_string().contains(&hash2),
        "{:?}",
        loaded_by_hup()
    );
    assert_eq!(
        rt().block_on(inst.client().policy()).unwrap().policy_hash,
        hash2
    );
    expect_rule(submit(&inst, "big-hup", "0.5"), "per_tx_limit");
    // An invalid file on SIGHUP changes nothing: the refusal is logged (it
    // writes nothing to the ledger), the old policy stays in force.
    let refusals = |inst: &Instance| inst.log().matches("SIGHUP: policy reload refused").count();
    assert_eq!(refusals(&inst), 0);
    let entries_before = ledger_entries(&inst.db, "policy_loaded").len();
    std::fs::write(&inst.policy, "garbage = [").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(inst.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(
        "the invalid SIGHUP reload to be refused",
        std::time::Duration::from_secs(10),
        || refusals(&inst) == 1,
    );
    assert_eq!(
        rt().block_on(inst.client().policy()).unwrap().policy_hash,
        hash2
    );
    assert_eq!(
        ledger_entries(&inst.db, "policy_loaded").len(),
        entries_before
    );
    assert!(matches!(
        submit(&inst, "small-hup", "0.2"),
        Ok(IntentOutcome::Signed(_))
    ));
    assert!(inst.audit_verify().status.success());
}

#[test]
fn intents_above_the_approval_threshold_wait_reserve_nothing_and_expire() {
    let mut inst = Instance::init();
    let cfg = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(
        &inst.config,
        cfg.replace("[daemon]\n", "[daemon]\napproval_ttl_s = 2\n"),
    )
    .unwrap();
    inst.write_policy(&policy("").replace(
        "per_day = \"100\"\n",
        "per_day = \"100\"\napproval_above = \"0.05\"\napprovers = { required = 2, of = [\"alice\", \"bob\", \"carol\"] }\n",
    ));
    inst.start();
    let client = inst.client();
    let to = random_pubkey();
    let req = transfer("big", &to, "0.08");
    let body = match rt().block_on(client.submit_intent(&req)).unwrap() {
        IntentOutcome::Pending(b) => b,
        other => panic!("expected 202 pending, got {other:?}"),
    };
    assert_eq!(
        body.status,
        keyward_client::wire::IntentStatus::PendingApproval
    );
    assert_eq!(body.intent_id, "big");
    let approval = &body.approval;
    let hash = approval.intent_hash.as_str();
    assert_eq!(hash.len(), 64);
    assert_eq!(approval.required, 2);
    assert_eq!(approval.received, 0);
    assert!(approval.expires_at.ends_with('Z'));
    let summary = approval.summary.as_str();
    assert!(
        summary.contains(&to.to_string()) && summary.contains("0.08"),
        "{summary}"
    );

    // It reserves nothing, and is what GET and a replay show.
    let spent = |inst: &Instance| {
        rt().block_on(inst.client().policy()).unwrap().limits[0].spent_24h_base_units
    };
    assert_eq!(spent(&inst), 0);
    let view = rt().block_on(client.get_intent("big")).unwrap();
    assert_eq!(
        view.status,
        keyward_client::wire::IntentStatus::PendingApproval
    );
    assert_eq!(view.approval.as_ref().unwrap().intent_hash, hash);
    match rt().block_on(client.submit_intent(&req)).unwrap() {
        IntentOutcome::Pending(again) => assert_eq!(again, body),
        other => panic!("a replay is the same 202, got {other:?}"),
    }
    let dry = rt()
        .block_on(client.dry_run(&transfer("big-dry", &to, "0.08")))
        .unwrap();
    assert_eq!(dry.decision, "approval_required");
    // Below the threshold signs as usual.
    assert!(matches!(
        submit(&inst, "small", "0.01"),
        Ok(IntentOutcome::Signed(_))
    ));
    assert_eq!(spent(&inst), 10_000_000 + FEE);
    let requested = events(&inst, "approval_requested");
    assert_eq!(requested.len(), 1);
    assert!(requested[0].contains(hash));

    // The window runs out: expired, recorded, and the id is answered 410.
    wait_until(
        "the expiry to be recorded",
        std::time::Duration::from_secs(15),
        || !ledger_entries(&inst.db, "intent_expired").is_empty(),
    );
    let view = rt().block_on(client.get_intent("big")).unwrap();
    assert_eq!(view.status, keyward_client::wire::IntentStatus::Expired);
    match rt().block_on(client.submit_intent(&req)) {
        Err(ClientError::Api {
            status: 410, code, ..
        }) => assert_eq!(code, "intent_expired"),
        other => panic!("expected 410 intent_expired, got {other:?}"),
    }
    assert_eq!(
        spent(&inst),
        10_000_000 + FEE,
        "nothing was ever reserved for it"
    );
    assert!(inst.audit_verify().status.success());
}
