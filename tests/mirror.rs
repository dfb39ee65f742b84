//! The mirror to an append-only file, end to end: keywardd signs until the
//! unmirrored lag reaches its limit, then answers 503 `mirror_lagging`, and
//! resumes by itself when `keyward mirror` catches up; every entry is in the
//! copy exactly once and in order, also after the mirror is killed with
//! SIGKILL and restarted; `keyward audit verify --mirror` names each kind
//! of divergence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use keyward::mirror::{Divergence, compare, read_copy};
use keyward_client::{ClientError, IntentOutcome};

fn head(inst: &Instance) -> u64 {
    rt().block_on(inst.client().health())
        .unwrap()
        .ledger
        .head_seq
}

/// compare() with read errors turned into panics.
fn cmp(db: &std::path::Path, copy: &std::path::Path) -> Result<u64, Divergence> {
    match compare(db, copy, 0) {
        Ok(n) => Ok(n),
        Err(Ok(d)) => Err(d),
        Err(Err(e)) => panic!("cannot compare: {e}"),
    }
}

fn submit(inst: &Instance, id: &str) -> Result<IntentOutcome, ClientError> {
    rt().block_on(
        inst.client()
            .submit_intent(&transfer(id, &random_pubkey(), "0.01")),
    )
}

#[test]
fn mirror_lag_fails_closed_and_the_copy_is_exact() {
    let mut inst = Instance::init();
    let (copy, ack_dir) =
        inst.with_file_mirror("max_unmirrored_entries = 12\nmax_unmirrored_age_s = 3600\n");
    inst.start();

    // No mirror running: signing goes on while at most 12 entries wait
    // unmirrored (nothing is acknowledged yet, so the head is the lag); each
    // signed intent writes three (received, evaluated, signed).
    let start_head = head(&inst);
    assert!(start_head <= 6, "start-up wrote {start_head} entries");
    let expected = (12 - start_head) / 3 + 1;
    let mut signed = 0;
    let refused = loop {
        let lag = head(&inst);
        match submit(&inst, &format!("pre-{signed}")) {
            Ok(IntentOutcome::Signed(_)) => {
                assert!(lag <= 12, "signed with {lag} entries unmirrored");
                signed += 1;
            }
            Err(ClientError::Api {
                status: 503, code, ..
            }) => {
                assert!(lag > 12, "refused with only {lag} entries unmirrored");
                break code;
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(signed < 10, "the lag limit never stopped signing");
    };
    assert_eq!(refused, "mirror_lagging");
    assert_eq!(signed, expected, "signed before the limit");
    assert_eq!(head(&inst), start_head + 3 * signed);
    assert!(head(&inst) > 12);
    let health = rt().block_on(inst.client().health()).unwrap();
    let m = health.mirror.unwrap();
    assert!(!m.ok && m.unmirrored_entries > 12, "{m:?}");
    assert_eq!(m.sinks.len(), 1);
    assert_eq!(
        (m.sinks[0].name.as_str(), m.sinks[0].acked_seq),
        ("file", 0)
    );
    assert_eq!(health.status, "degraded");
    let before = head(&inst);
    assert!(matches!(
        submit(&inst, "while-lagging"),
        Err(ClientError::Api { status: 503, .. })
    ));
    assert_eq!(head(&inst), before, "a refused intent writes nothing");

    // The mirror catches up; signing resumes without restarting keywardd.
    let mut mirror = start_mirror(&inst);
    wait_until("the mirror to catch up", Duration::from_secs(20), || {
        keyward::mirror::read_ack(&ack_dir, "file") >= head(&inst)
    });
    assert!(matches!(
        submit(&inst, "after-catch-up").unwrap(),
        IntentOutcome::Signed(_)
    ));

    // Kill -9 the mirror in the middle of a burst (once it has shipped an
    // entry of the burst), restart it.
    wait_until(
        "the mirror to ship the last intent",
        Duration::from_secs(20),
        || keyward::mirror::read_ack(&ack_dir, "file") >= head(&inst),
    );
    let burst_start = head(&inst);
    let client = inst.client();
    let rt = rt();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let c = client.clone();
            rt.spawn(async move {
                c.submit_intent(&transfer(&format!("burst-{i}"), &random_pubkey(), "0.01"))
                    .await
            })
        })
        .collect();
    wait_until(
        "the mirror to ship an entry of the burst",
        Duration::from_secs(20),
        || keyward::mirror::read_ack(&ack_dir, "file") > burst_start,
    );
    mirror.kill().unwrap();
    mirror.wait().unwrap();
    // At most 3 + 9 entries wait unmirrored: the burst signs in full.
    for (i, h) in handles.into_iter().enumerate() {
        match rt.block_on(h).unwrap() {
            Ok(IntentOutcome::Signed(s)) => assert_eq!(s.intent_id, format!("burst-{i}")),
            other => panic!("burst-{i}: {other:?}"),
        }
    }
    assert_eq!(head(&inst), burst_start + 9);
    let mut mirror = start_mirror(&inst);
    assert!(inst.stop().success());
    let last = keyward::ledger::verify_chain(&inst.db).unwrap().head_seq;
    wait_until(
        "the mirror to ship the last entries",
        Duration::from_secs(20),
        || keyward::mirror::read_ack(&ack_dir, "file") >= last,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mirror.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(mirror.wait().unwrap().success());

    // Every entry exactly once, in order; the CLI agrees.
    let (lines, _) = read_copy(&copy).unwrap();
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    assert_eq!(cmp(&inst.db, &copy), Ok(last));
    let url = format!("file://{}", copy.display());
    let out = inst.keyward(&[
        "audit",
        "verify",
        "--db",
        inst.db.to_str().unwrap(),
        "--mirror",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each kind of divergence is named.
    let work = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&copy).unwrap();
    let all: Vec<&str> = text.lines().collect();
    let write_copy = |name: &str, lines: &[String]| {
        let p = work.path().join(name);
        std::fs::write(
            &p,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        p
    };
    let verify_with = |db: &std::path::Path, copy: &std::path::Path| {
        let o = inst.keyward(&[
            "audit",
            "verify",
            "--db",
            db.to_str().unwrap(),
            "--mirror",
            copy.to_str().unwrap(),
        ]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // The mirror misses a tail.
    let short = write_copy(
        "short.jsonl",
        &all[..all.len() - 3]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        cmp(&inst.db, &short),
        Err(Divergence::MirrorMissingTail {
            mirror_last: last - 3,
            local_last: last
        })
    );
    let (code, err) = verify_with(&inst.db, &short);
    assert_eq!(code, Some(1));
    assert!(err.contains("missing a tail"), "{err}");
    // The local ledger lost its tail (rolled back).
    let db = work.path().join("truncated.sqlite3");
    std::fs::copy(&inst.db, &db).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(&format!(
        "DROP TRIGGER ledger_no_delete; DELETE FROM ledger WHERE seq > {};",
        last - 2
    ))
    .unwrap();
    drop(conn);
    let (code, err) = verify_with(&db, &copy);
    assert_eq!(code, Some(1));
    assert!(err.contains("truncated"), "{err}");
    // An entry edited locally (same hash, other content).
    let db = work.path().join("edited.sqlite3");
    std::fs::copy(&inst.db, &db).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "DROP TRIGGER ledger_no_update; UPDATE ledger SET payload = CAST('{\"edited\":true}' AS BLOB) WHERE seq = 5;",
    )
    .unwrap();
    drop(conn);
    assert_eq!(cmp(&db, &copy), Err(Divergence::Modified { seq: 5 }));
    // A forked history: the mirror has another entry 7.
    let mut forked: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    let mut v: serde_json::Value = serde_json::from_str(&forked[6]).unwrap();
    v["hash"] = serde_json::json!(hex::encode([3u8; 32]));
    forked[6] = v.to_string();
    let forked = write_copy("forked.jsonl", &forked);
    assert_eq!(cmp(&inst.db, &forked), Err(Divergence::Fork { seq: 7 }));
    let (code, err) = verify_with(&inst.db, &forked);
    assert_eq!(code, Some(1));
    assert!(err.contains("fork at entry 7"), "{err}");
}
