//! The trust anchor of the audit history: rewrites of the ledger file that
//! recompute every hash are caught by `keyward audit verify` with the key
//! pinned at set-up and by keywardd refusing to start; truncation is also
//! caught by the checkpoint kept in the HSM and by the mirror's
//! acknowledgements. A break found while running stops signing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ed25519_dalek::Signer as _;
use keyward::ledger::checkpoint;
use keyward::ledger::merkle::{Frontier, leaf_hash};

/// A stored row, as an attacker reads it.
#[derive(Clone)]
struct Row {
    ts: i64,
    event: String,
    intent_id: Option<String>,
    agent: Option<String>,
    payload: Vec<u8>,
}

fn rows(db: &Path) -> Vec<Row> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT ts_ms, event, intent_id, agent, payload FROM ledger ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            ts: r.get(0)?,
            event: r.get(1)?,
            intent_id: r.get(2)?,
            agent: r.get(3)?,
            payload: r.get(4)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Replaces the whole ledger with `rows`, renumbered and with every hash
/// recomputed, the way an attacker with write access to the file would.
/// With `resign`, every checkpoint is made again over the new tree and
/// signed with that key (a key the attacker owns).
fn rewrite(db: &Path, rows: &[Row], resign: Option<&ed25519_dalek::SigningKey>) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(
        "DROP TRIGGER IF EXISTS ledger_no_update; DROP TRIGGER IF EXISTS ledger_no_delete;
         DELETE FROM ledger; DELETE FROM merkle_nodes;",
    )
    .unwrap();
    let mut prev = [0u8; 32];
    let mut tree = Frontier::default();
    for (i, r) in rows.iter().enumerate() {
        let seq = i as u64 + 1;
        let mut payload = r.payload.clone();
        if let (Some(sk), "checkpoint") = (resign, r.event.as_str()) {
            let mut v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let pk = keyward::types::PublicKey(sk.verifying_key().to_bytes());
            let size = tree.size();
            let root = tree.root();
            let body = checkpoint::body(v["origin"].as_str().unwrap(), size, &root);
            let sig = sk.sign(body.as_bytes()).to_bytes();
            v["size"] = size.into();
            v["root"] = hex::encode(root).into();
            v["note"] = checkpoint::note(&body, checkpoint::AUDIT_KEY, &pk, &sig).into();
            v["verifier_key"] = checkpoint::verifier_key(checkpoint::AUDIT_KEY, &pk).into();
            payload = serde_json::to_vec(&v).unwrap();
        }
        let hash = keyward::ledger::entry_hash(
            seq,
            &prev,
            r.ts,
            &r.event,
            r.intent_id.as_deref(),
            r.agent.as_deref(),
            &payload,
        );
        c.execute(
            "INSERT INTO ledger (seq, ts_ms, event, intent_id, agent, payload, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            rusqlite::params![seq as i64, r.ts, r.event, r.intent_id, r.agent, payload, &prev[..], &hash[..]],
        )
        .unwrap();
        tree.push(leaf_hash(&hash));
        prev = hash;
    }
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
}

/// Deletes the newest `n` rows (nothing else changes).
fn truncate(db: &Path, n: usize) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch("DROP TRIGGER IF EXISTS ledger_no_delete;")
        .unwrap();
    c.execute(
        "DELETE FROM ledger WHERE seq > (SELECT MAX(seq) FROM ledger) - ?1",
        [n as i64],
    )
    .unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
}

/// (exit code, stdout + stderr) of `keyward audit verify` with the pinned key.
fn audit_verify(inst: &Instance, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(extra);
    let out = inst.keyward(&args);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A running instance with some signed intents and one denial, then
/// stopped cleanly (final checkpoint, mark in the HSM).
fn instance_with_history() -> Instance {
    let mut inst = Instance::start_default();
    let rt = rt();
    for i in 0..5 {
        rt.block_on(inst.client().submit_intent(&transfer(
            &format!("t{i}"),
            &random_pubkey(),
            "0.1",
        )))
        .unwrap();
    }
    assert!(
        rt.block_on(
            inst.client()
                .submit_intent(&transfer("big", &random_pubkey(), "5"))
        )
        .is_err()
    );
    assert_eq!(inst.stop().code(), Some(0));
    inst
}

fn assert_refused(inst: &mut Instance, why: &str) -> String {
    let (code, log) = inst.start_refused(&[]);
    assert_eq!(code, 3, "keywardd must refuse to start ({why}): {log}");
    assert!(
        log.contains("ledger_history_broken") || log.contains("history is broken"),
        "{why}: {log}"
    );
    log
}

/// The first broken sequence number a refusal names.
fn named_seq(log: &str) -> u64 {
    let at = log
        .find("--accept-broken-history ")
        .expect("the refusal names the flag");
    log[at + "--accept-broken-history ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number in {log}"))
}

#[test]
fn untouched_history_verifies_with_the_pinned_key_and_starts_again() {
    let mut inst = instance_with_history();
    let (code, out) = audit_verify(&inst, &["--hsm"]);
    assert_eq!(code, 0, "{out}");
    let pinned = std::fs::read_to_string(inst.audit_vkey_file()).unwrap();
    let vkey = pinned.lines().last().unwrap();
    assert!(out.contains(vkey), "names the key it trusted: {out}");
    assert!(out.contains("checkpoint kept in the HSM"), "{out}");
    inst.start();
    let signed = rt().block_on(inst.client().submit_intent(&transfer(
        "again",
        &random_pubkey(),
        "0.1",
    )));
    assert!(
        matches!(signed, Ok(keyward_client::IntentOutcome::Signed(_))),
        "{signed:?}"
    );
    assert_eq!(inst.stop().code(), Some(0));
    assert_eq!(audit_verify(&inst, &["--hsm"]).0, 0);
}

#[test]
fn deleting_an_intent_and_every_checkpoint_and_rehashing_is_caught() {
    let mut inst = instance_with_history();
    let kept: Vec<Row> = rows(&inst.db)
        .into_iter()
        .filter(|r| r.event != "checkpoint" && r.intent_id.as_deref() != Some("t2"))
        .collect();
    rewrite(&inst.db, &kept, None);
    // The chain alone is consistent: this is what used to pass.
    keyward::ledger::verify_chain(&inst.db).unwrap();

    let (code, out) = audit_verify(&inst, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no checkpoint signed by the trusted key"),
        "{out}"
    );
    let log = assert_refused(&mut inst, "checkpoints removed");
    assert!(named_seq(&log) > 0);
}

#[test]
fn entries_appended_after_a_clean_stop_are_caught() {
    let mut inst = instance_with_history();
    let mut all = rows(&inst.db);
    let mut fake = all
        .iter()
        .find(|r| r.event == "signature_created")
        .unwrap()
        .clone();
    fake.intent_id = Some("invented".into());
    fake.ts = all.last().unwrap().ts;
    all.push(fake);
    rewrite(&inst.db, &all, None);
    keyward::ledger::verify_chain(&inst.db).unwrap();
    let (code, out) = audit_verify(&inst, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("after a clean stop"), "{out}");
    assert_refused(&mut inst, "entries appended offline");
}

#[test]
fn checkpoints_resigned_with_another_key_are_caught() {
    let mut inst = instance_with_history();
    let forger = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let kept: Vec<Row> = rows(&inst.db)
        .into_iter()
        .filter(|r| r.intent_id.as_deref() != Some("t3"))
        .collect();
    rewrite(&inst.db, &kept, Some(&forger));
    keyward::ledger::verify_chain(&inst.db).unwrap();

    let (code, out) = audit_verify(&inst, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not by the trusted audit key"), "{out}");
    // A trusted key given on the command line is used the same way.
    let pinned = std::fs::read_to_string(inst.audit_vkey_file()).unwrap();
    let vkey = pinned.lines().last().unwrap().to_owned();
    let (code, out) = audit_verify(&inst, &["--vkey", &vkey]);
    assert_eq!(code, 1, "{out}");
    assert_refused(&mut inst, "checkpoints signed by a foreign key");
}

#[test]
fn truncating_the_newest_entries_is_caught_by_the_hsm_mark_and_can_be_acknowledged() {
    let mut inst = instance_with_history();
    let before = rows(&inst.db).len() as u64;
    truncate(&inst.db, 8);
    // What is left is a consistent prefix, signed up to its last checkpoint.
    let (code, out) = audit_verify(&inst, &[]);
    assert_eq!(
        code, 0,
        "without the HSM or a mirror a prefix is all there is: {out}"
    );
    assert!(out.contains("not covered by a signed checkpoint"), "{out}");
    // The checkpoint kept in the HSM shows the truncation.
    let (code, out) = audit_verify(&inst, &["--hsm"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("kept in the HSM"), "{out}");
    let log = assert_refused(&mut inst, "truncated");
    let seq = named_seq(&log);
    assert_eq!(seq, before - 8 + 1, "{log}");

    // The operator may start anyway, but only by naming the break, and the
    // acknowledgement is recorded.
    let (code, log) = inst.start_refused(&["--accept-broken-history", &(seq + 1).to_string()]);
    assert_eq!(code, 3, "another number is not an acknowledgement: {log}");
    inst.start_with(&["--accept-broken-history", &seq.to_string()]);
    let signed = rt().block_on(inst.client().submit_intent(&transfer(
        "after",
        &random_pubkey(),
        "0.1",
    )));
    assert!(
        matches!(signed, Ok(keyward_client::IntentOutcome::Signed(_))),
        "{signed:?}"
    );
    assert_eq!(inst.stop().code(), Some(0));
    let acks: Vec<Row> = rows(&inst.db)
        .into_iter()
        .filter(|r| r.event == "history_acknowledged")
        .collect();
    assert_eq!(acks.len(), 1);
    let ack: serde_json::Value = serde_json::from_slice(&acks[0].payload).unwrap();
    assert_eq!(ack["first_broken_seq"], seq);
    // The new checkpoint replaced the mark: the next start needs nothing.
    inst.start();
    assert_eq!(inst.stop().code(), Some(0));
    assert_eq!(audit_verify(&inst, &["--hsm"]).0, 0);
}

#[test]
fn truncation_behind_the_mirror_is_caught_by_its_acknowledgements() {
    let mut inst = Instance::init();
    let mirror_file = inst.dir.path().join("mirror.jsonl");
    let mut text = std::fs::read_to_string(&inst.config).unwrap();
    text.push_str(&format!(
        "\n[mirror]\nfile = \"{}\"\n",
        mirror_file.display()
    ));
    std::fs::write(&inst.config, text).unwrap();
    inst.start();
    let mut mirror = start_mirror(&inst);
    let rt = rt();
    for i in 0..3 {
        rt.block_on(inst.client().submit_intent(&transfer(
            &format!("m{i}"),
            &random_pubkey(),
            "0.1",
        )))
        .unwrap();
    }
    assert_eq!(inst.stop().code(), Some(0));
    let head = rows(&inst.db).len() as u64;
    let ack = inst.inst_dir().join("state/mirror/file.ack");
    wait_until(
        "the mirror acknowledges the head",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&ack)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                == Some(head)
        },
    );
    mirror.kill().unwrap();
    mirror.wait().unwrap();

    // Only the newest entry: the checkpoint kept in the HSM is still there,
    // so what catches this is the mirror's acknowledgement.
    truncate(&inst.db, 1);
    assert_eq!(
        audit_verify(&inst, &["--hsm", "--config", "/nonexistent"]).0,
        2
    );
    // With the mirror in the config, its acknowledgements show the
    // truncation even without the HSM, and the copy itself does too.
    let (code, out) = audit_verify(&inst, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("acknowledged"), "{out}");
    let (code, out) = audit_verify(&inst, &["--mirror", mirror_file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let log = assert_refused(&mut inst, "behind the mirror");
    assert!(log.contains("the mirror file acknowledged"), "{log}");
    assert_eq!(named_seq(&log), head, "{log}");
}

#[test]
fn a_rewrite_while_running_stops_signing_and_fails_health() {
    let mut inst = Instance::init();
    let mut text = std::fs::read_to_string(&inst.config).unwrap();
    text.push_str("\n[ledger]\nverify_interval_s = 1\n");
    std::fs::write(&inst.config, text).unwrap();
    inst.start();
    let rt = rt();
    let client = inst.client();
    rt.block_on(client.submit_intent(&transfer("ok", &random_pubkey(), "0.1")))
        .unwrap();
    // Let the history be verified through the head, then rewrite an entry
    // the daemon has verified, as root on the box could.
    let head = rt.block_on(client.health()).unwrap().ledger.head_seq;
    wait_until(
        "the history to be verified through the head",
        Duration::from_secs(10),
        || rt.block_on(client.health()).unwrap().ledger.verified_seq >= head,
    );
    let c = rusqlite::Connection::open(&inst.db).unwrap();
    c.execute_batch("DROP TRIGGER IF EXISTS ledger_no_update;")
        .unwrap();
    let head: i64 = c
        .query_row("SELECT MAX(seq) FROM ledger", [], |r| r.get(0))
        .unwrap();
    c.execute(
        "UPDATE ledger SET payload = CAST('{}' AS BLOB), hash = zeroblob(32) WHERE seq = ?1",
        [head],
    )
    .unwrap();
    drop(c);
    wait_until("health turns failed", Duration::from_secs(20), || {
        rt.block_on(client.health())
            .map(|h| h.status == "failed" && !h.ledger.history_ok)
            .unwrap_or(false)
    });
    let err = rt
        .block_on(client.submit_intent(&transfer("blocked", &random_pubkey(), "0.1")))
        .unwrap_err();
    assert!(
        err.to_string().contains("ledger_history_broken"),
        "signing stops with 503 ledger_history_broken: {err}"
    );
}
