//! Drills (issue #18, criteria 4 and 5) against a real keywardd on a
//! SoftHSM2 dev instance: `keyward drill dr` restores a backup into a
//! scratch instance, starts keywardd on it and signs with the original key;
//! `keyward drill rotation` rotates and retires a scratch key; both write
//! their reports and record `drill_completed`; a corrupted backup fails the
//! DR drill at its verify step naming the file; health turns degraded when
//! the last drill of a kind failed or is older than 92 days (and not when
//! none ever ran); a malformed drill report changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use keyward_client::Method;
use keyward_client::wire::HealthView;
use serde_json::json;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn started() -> Instance {
    let mut inst = Instance::init_on(TestBackend::SoftHsm);
    inst.start();
    inst
}

fn sign_some(inst: &Instance, n: usize) {
    for i in 0..n {
        match rt()
            .block_on(inst.client().submit_intent(&transfer(
                &format!("pre-{i}"),
                &random_pubkey(),
                "0.01",
            )))
            .unwrap()
        {
            keyward_client::IntentOutcome::Signed(_) => {}
            other => panic!("not signed: {other:?}"),
        }
    }
}

/// `method path` with a JSON body on the admin socket: (status, body).
fn admin(
    inst: &Instance,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let client = keyward_client::Client::new(&inst.admin_socket);
    let (status, bytes) = rt()
        .block_on(client.request_json(method, path, body))
        .unwrap();
    (
        status.as_u16(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn admin_health(inst: &Instance) -> HealthView {
    let (status, body) = admin(inst, Method::GET, "/v1/admin/health", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn agent_health(inst: &Instance) -> HealthView {
    rt().block_on(inst.client().health()).unwrap()
}

/// The drill of `kind` as health reports it: (outcome, age_days, failed_step).
fn drill_of(h: &HealthView, kind: &str) -> (String, Option<u64>, Option<String>) {
    let d = h
        .drills
        .iter()
        .find(|d| d.kind == kind)
        .unwrap_or_else(|| panic!("health lists no {kind} drill: {h:?}"));
    (d.outcome.clone(), d.age_days, d.failed_step.clone())
}

/// Rows of the `drills` table: (kind, outcome, completed_ms, failed_step, seq).
fn drill_rows(db: &Path) -> Vec<(String, String, i64, Option<String>, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.prepare("SELECT kind, outcome, completed_ms, failed_step, seq FROM drills ORDER BY kind")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The one JSON report of `kind` in `dir`, and that a text one is beside it.
fn report(dir: &Path, kind: &str) -> serde_json::Value {
    let mut json: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(&format!("drill-{kind}-")) && n.ends_with(".json")
        })
        .collect();
    assert_eq!(json.len(), 1, "{json:?}");
    let path = json.pop().unwrap();
    let txt = path.with_extension("txt");
    let t = std::fs::read_to_string(&txt).unwrap();
    assert!(t.contains(&format!("keyward {kind} drill")), "{t}");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn step_names(r: &serde_json::Value) -> Vec<String> {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap().to_owned())
        .collect()
}

/// No scratch directory is left in `dir`.
fn no_scratch_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("keyward-drill-"))
        .collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

/// A child process killed when dropped (also when an assertion fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post_drill(inst: &Instance, body: serde_json::Value) -> (u16, String) {
    admin(inst, Method::POST, "/v1/admin/drills", Some(&body))
}

fn passing(kind: &str) -> serde_json::Value {
    json!({"kind": kind, "outcome": "passed", "duration_ms": 5,
           "steps": [{"step": "verify", "outcome": "passed", "duration_ms": 5}]})
}

#[test]
fn dr_drill_restores_the_newest_backup_signs_with_the_original_key_and_is_recorded() {
    let mut inst = Instance::init_on(TestBackend::SoftHsm);
    let (copy, _ack) = inst.with_file_mirror("");
    inst.start();
    let _mirror = Killed(start_mirror(&inst));
    sign_some(&inst, 3);
    let work = inst.dir.path().join("work");
    let backups = work.join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let o = inst.keyward(&["backup", "create", backups.join("b1").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // The mirror holds the backed-up entries before the drill compares them.
    let head = {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(backups.join("b1/manifest.json")).unwrap())
                .unwrap();
        m["ledger"]["seq"].as_u64().unwrap()
    };
    wait_until(
        "the mirror copies the backed-up entries",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&copy)
                .map(|t| t.lines().count() as u64 > head)
                .unwrap_or(false)
        },
    );
    let reports = work.join("reports");
    let o = inst.keyward(&[
        "drill",
        "dr",
        "--backup-dir",
        backups.to_str().unwrap(),
        "--report",
        reports.to_str().unwrap(),
        "--scratch-in",
        work.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("recovery time:"), "{out}");
    let r = report(&reports, "dr");
    assert_eq!(r["outcome"], "passed", "{r}");
    assert_eq!(
        step_names(&r),
        [
            "backup", "verify", "restore", "ledger", "counters", "start", "sign hot", "stop"
        ]
    );
    let rto = r["recovery_time_ms"].as_u64().unwrap();
    assert!(rto > 0 && rto <= r["duration_ms"].as_u64().unwrap(), "{r}");
    // The counters were recomputed from the three signed intents.
    assert!(
        r["steps"][4]["detail"]
            .as_str()
            .unwrap()
            .starts_with("3 spent, 0 reserved, 1 running totals match"),
        "{r}"
    );
    // The mirror was compared, and the key signed as production's `hot`.
    let facts = r["facts"].to_string();
    assert!(facts.contains("entries equal the restored ones"), "{facts}");
    assert!(
        facts.contains(&format!("key hot signs as {}", inst.hot)),
        "{facts}"
    );
    // Recorded in production's ledger and its drills table.
    let entries = ledger_entries(&inst.db, "drill_completed");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0].1;
    assert_eq!(
        (e["drill"].as_str(), e["outcome"].as_str()),
        (Some("dr"), Some("passed"))
    );
    assert_eq!(e["recovery_time_ms"].as_u64(), Some(rto));
    assert_eq!(e["steps"].as_array().unwrap().len(), 8);
    assert_eq!(r["ledger_seq"].as_i64(), Some(drill_rows(&inst.db)[0].4));
    let rows = drill_rows(&inst.db);
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("dr", "passed"));
    assert_eq!(drill_of(&admin_health(&inst), "dr").0, "passed");
    no_scratch_left(&work);
    // Without a backup given, the drill takes a fresh one through keywardd.
    let o = inst.keyward(&[
        "drill",
        "dr",
        "--json",
        "--report",
        reports.to_str().unwrap(),
        "--scratch-in",
        work.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let fresh: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(fresh["outcome"], "passed");
    assert!(
        fresh["facts"].to_string().contains("fresh backup recorded"),
        "{fresh}"
    );
    assert_eq!(ledger_entries(&inst.db, "backup_created").len(), 2);
    assert_eq!(ledger_entries(&inst.db, "drill_completed").len(), 2);
    no_scratch_left(&work);
    // Production's ledger still verifies (the drill only added its entries).
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", text(&v));
    inst.stop();
}

#[test]
fn a_corrupted_backup_fails_the_dr_drill_at_verify_naming_the_file_and_degrades_health() {
    let inst = started();
    sign_some(&inst, 2);
    let work = inst.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let backup = work.join("b1");
    let o = inst.keyward(&["backup", "create", backup.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // One byte changed in one file of the backup.
    let victim = backup.join("config").join("policy.toml");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let reports = work.join("reports");
    let o = inst.keyward(&[
        "drill",
        "dr",
        "--backup",
        backup.to_str().unwrap(),
        "--report",
        reports.to_str().unwrap(),
        "--scratch-in",
        work.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAILED at step verify") && out.contains("config/policy.toml"),
        "{out}"
    );
    let r = report(&reports, "dr");
    assert_eq!(r["outcome"], "failed");
    assert_eq!(r["failed_step"], "verify");
    assert_eq!(step_names(&r), ["backup", "verify"]);
    assert!(
        r["error"].as_str().unwrap().contains("config/policy.toml"),
        "{r}"
    );
    let entries = ledger_entries(&inst.db, "drill_completed");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1["outcome"], "failed");
    assert_eq!(entries[0].1["failed_step"], "verify");
    // Health on both sockets: degraded, naming the drill and the step.
    for h in [admin_health(&inst), agent_health(&inst)] {
        assert_eq!(h.status, "degraded", "{h:?}");
        assert!(
            h.reasons
                .iter()
                .any(|r| r.contains("dr drill failed at step verify")),
            "{:?}",
            h.reasons
        );
        assert_eq!(
            drill_of(&h, "dr"),
            ("failed".into(), Some(0), Some("verify".into()))
        );
    }
    no_scratch_left(&work);
    // A passing drill of that kind makes health ok again.
    let (status, body) = post_drill(&inst, passing("dr"));
    assert_eq!(status, 200, "{body}");
    let h = admin_health(&inst);
    assert_eq!(h.status, "ok", "{:?}", h.reasons);
}

#[test]
fn rotation_drill_rotates_and_retires_a_scratch_key_and_leaves_production_alone() {
    let inst = started();
    let work = inst.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let reports = work.join("reports");
    let keys_before = admin(&inst, Method::GET, "/v1/admin/keys", None).1;
    let o = inst.keyward(&[
        "drill",
        "rotation",
        "--report",
        reports.to_str().unwrap(),
        "--scratch-in",
        work.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let r = report(&reports, "rotation");
    assert_eq!(r["outcome"], "passed", "{r}");
    assert_eq!(
        step_names(&r),
        [
            "init",
            "start",
            "sign old",
            "rotate",
            "sign new",
            "old refused",
            "statement",
            "retire",
            "stop",
            "hsm"
        ]
    );
    let details = r["steps"].to_string();
    assert!(details.contains("key_not_signer"), "{details}");
    assert!(
        details.contains("verifies with the old and the new public key"),
        "{details}"
    );
    let entries = ledger_entries(&inst.db, "drill_completed");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1["drill"], "rotation");
    assert_eq!(entries[0].1["outcome"], "passed");
    assert_eq!(drill_of(&admin_health(&inst), "rotation").0, "passed");
    // Production: no rotation, the same keys, and `hot` still signs as before.
    assert!(ledger_entries(&inst.db, "key_rotated").is_empty());
    assert_eq!(
        admin(&inst, Method::GET, "/v1/admin/keys", None).1,
        keys_before
    );
    no_scratch_left(&work);
}

#[test]
fn health_degrades_when_the_last_drill_is_older_than_92_days_or_failed_but_not_when_never_run() {
    let mut inst = started();
    // A fresh instance: no drill yet, not degraded by drills.
    let h = admin_health(&inst);
    assert_eq!(h.status, "ok", "{:?}", h.reasons);
    assert_eq!(drill_of(&h, "dr"), ("never".into(), None, None));
    assert_eq!(drill_of(&h, "rotation"), ("never".into(), None, None));
    let doctor = text(&inst.keyward(&["doctor"]));
    assert!(
        doctor.contains("drill dr: never run (not degraded"),
        "{doctor}"
    );
    for kind in ["dr", "rotation"] {
        let (status, body) = post_drill(&inst, passing(kind));
        assert_eq!(status, 200, "{body}");
    }
    let h = admin_health(&inst);
    assert_eq!(h.status, "ok", "{:?}", h.reasons);
    assert_eq!(drill_of(&h, "dr"), ("passed".into(), Some(0), None));

    // The recorded time moved back (the table is derived state; the chain
    // is untouched), with keywardd stopped.
    let age = |inst: &mut Instance, days: i64| {
        inst.stop();
        let conn = rusqlite::Connection::open(&inst.db).unwrap();
        conn.execute(
            "UPDATE drills SET completed_ms = ?1 WHERE kind = 'dr'",
            [keyward::ledger::now_ms() - days * DAY_MS - 60_000],
        )
        .unwrap();
        drop(conn);
        inst.start();
    };
    age(&mut inst, 93);
    for h in [admin_health(&inst), agent_health(&inst)] {
        assert_eq!(h.status, "degraded");
        assert!(
            h.reasons
                .iter()
                .any(|r| r.contains("last dr drill") && r.contains("more than 92 days ago")),
            "{:?}",
            h.reasons
        );
        assert_eq!(drill_of(&h, "dr").1, Some(93));
        assert_eq!(drill_of(&h, "rotation").0, "passed");
    }
    // `keyward doctor` warns (and still passes: keywardd starts).
    let o = inst.keyward(&["doctor"]);
    let doctor = text(&o);
    assert_eq!(o.status.code(), Some(0), "{doctor}");
    assert!(
        doctor.contains("drill_stale") && doctor.contains("run `keyward drill dr`"),
        "{doctor}"
    );
    age(&mut inst, 91);
    let h = admin_health(&inst);
    assert_eq!(h.status, "ok", "{:?}", h.reasons);
    assert_eq!(drill_of(&h, "dr").1, Some(91));

    // A failed drill degrades at once; the next passing one clears it.
    let (status, body) = post_drill(
        &inst,
        json!({"kind": "rotation", "outcome": "failed", "duration_ms": 9, "failed_step": "retire",
               "steps": [{"step": "retire", "outcome": "failed", "duration_ms": 9}]}),
    );
    assert_eq!(status, 200, "{body}");
    let h = admin_health(&inst);
    assert_eq!(h.status, "degraded");
    assert!(
        h.reasons
            .iter()
            .any(|r| r.contains("rotation drill failed at step retire")),
        "{:?}",
        h.reasons
    );
    let (status, _) = post_drill(&inst, passing("rotation"));
    assert_eq!(status, 200);
    assert_eq!(admin_health(&inst).status, "ok");
    assert_eq!(ledger_entries(&inst.db, "drill_completed").len(), 4);
    let v = inst.audit_verify();
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn a_malformed_drill_report_changes_nothing() {
    let inst = started();
    let before = recorded_entries(&inst);
    let step = json!({"step": "verify", "outcome": "passed", "duration_ms": 1});
    let many: Vec<_> = (0..65).map(|_| step.clone()).collect();
    let bad = [
        (
            json!({"kind": "recovery", "outcome": "passed", "duration_ms": 1, "steps": [step]}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "ok", "duration_ms": 1, "steps": [step]}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "passed", "duration_ms": 1, "steps": []}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "passed", "duration_ms": 1, "steps": many}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "failed", "duration_ms": 1, "steps": [step]}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "passed", "duration_ms": 1, "failed_step": "x", "steps": [step]}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "passed", "duration_ms": 1,
                "steps": [{"step": "a\nb", "outcome": "passed", "duration_ms": 1}]}),
            "invalid_drill",
        ),
        (
            json!({"kind": "dr", "outcome": "passed", "duration_ms": 1,
                "steps": [{"step": "x".repeat(501), "outcome": "passed", "duration_ms": 1}]}),
            "invalid_drill",
        ),
        // The time is the daemon's: a report cannot set it.
        (
            json!({"kind": "dr", "outcome": "passed", "duration_ms": 1, "steps": [step],
                "completed_ms": 0}),
            "invalid_request",
        ),
    ];
    for (body, code) in bad {
        let (status, answer) = post_drill(&inst, body.clone());
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(error_code(&answer), code, "{body}: {answer}");
    }
    // A well-formed report on the agent socket, or from another uid on the
    // admin socket, is refused too.
    let good = passing("dr").to_string();
    let req = format!(
        "POST /v1/admin/drills HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{good}",
        good.len()
    );
    let (status, _) = raw_request(&inst.agent_socket, req.as_bytes());
    assert_eq!(status, 404);
    require_other_uids();
    open_up(&inst, &inst.admin_socket);
    let (status, body) = http_as(
        OTHER_UID,
        &inst.admin_socket,
        "POST",
        "/v1/admin/drills",
        &good,
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "not_an_operator")
    );
    assert_eq!(recorded_entries(&inst), before);
    assert!(drill_rows(&inst.db).is_empty());
    assert!(ledger_entries(&inst.db, "drill_completed").is_empty());
    assert_eq!(admin_health(&inst).status, "ok");
}

#[test]
fn live_rotation_drill_rotates_the_production_key_and_leaves_the_old_one_retiring() {
    let inst = started();
    let work = inst.dir.path().join("work");
    let reports = work.join("reports");
    let o = inst.keyward(&[
        "drill",
        "rotation",
        "--live",
        "hot",
        "--grace-days",
        "3",
        "--report",
        reports.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let r = report(&reports, "rotation");
    assert_eq!(
        (r["outcome"].as_str(), r["live"].as_bool()),
        (Some("passed"), Some(true))
    );
    assert_eq!(step_names(&r), ["rotate", "statement", "registry"]);
    let rotated = ledger_entries(&inst.db, "key_rotated");
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0].1["old_public_key"], inst.hot.to_string());
    let new = rotated[0].1["new_public_key"].as_str().unwrap().to_owned();
    assert_ne!(new, inst.hot.to_string());
    let done = ledger_entries(&inst.db, "drill_completed");
    assert_eq!(
        (done[0].1["drill"].as_str(), done[0].1["live"].as_bool()),
        (Some("rotation"), Some(true))
    );
    let keys: Vec<keyward_client::wire::AdminKeyInfo> =
        serde_json::from_str(&admin(&inst, Method::GET, "/v1/admin/keys", None).1).unwrap();
    let state = |v: u32| {
        keys.iter()
            .find(|k| k.name == "hot" && k.version.unwrap_or(1) == v)
            .map(|k| (k.state.clone(), k.public_key.clone()))
            .unwrap()
    };
    assert_eq!(state(1), ("retiring".into(), inst.hot.to_string()));
    assert_eq!(state(2), ("active".into(), new.clone()));
    // Agents keep the name: `hot` signs, with the new key.
    let s = match rt()
        .block_on(
            inst.client()
                .submit_intent(&transfer("after-live", &random_pubkey(), "0.01")),
        )
        .unwrap()
    {
        keyward_client::IntentOutcome::Signed(s) => s,
        other => panic!("not signed: {other:?}"),
    };
    let created = ledger_entries(&inst.db, "signature_created");
    assert!(
        created
            .iter()
            .any(|(id, e)| id.as_deref() == Some("after-live")
                && e["public_key"] == new.as_str()
                && e["signature"] == s.signature.as_str()),
        "{created:?}"
    );
}
