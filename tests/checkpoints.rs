//! Signed checkpoints end to end, checked by an independent implementation
//! written here: RFC 9162 tree hashing and proof verification, and the C2SP
//! signed-note format (key id, Ed25519 over the note text).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use sha2::{Digest, Sha256};

type H = [u8; 32];

fn sha(parts: &[&[u8]]) -> H {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// RFC 9162 §2.1.1 MTH, straight from the definition.
fn mth(d: &[H]) -> H {
    match d.len() {
        0 => sha(&[]),
        1 => sha(&[&[0u8], &d[0]]),
        n => {
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            sha(&[&[1u8], &mth(&d[..k]), &mth(&d[k..])])
        }
    }
}

/// RFC 9162 §2.1.3.2, written independently of keyward.
fn inclusion_ok(entry: &H, index: u64, size: u64, proof: &[H], root: &H) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = sha(&[&[0u8], entry]);
    for p in proof {
        if s == 0 {
            return false;
        }
        if f % 2 == 1 || f == s {
            r = sha(&[&[1u8], p, &r]);
            while f % 2 == 0 && f != 0 {
                f /= 2;
                s /= 2;
            }
        } else {
            r = sha(&[&[1u8], &r, p]);
        }
        f /= 2;
        s /= 2;
    }
    s == 0 && r == *root
}

/// RFC 9162 §2.1.4.2, written independently of keyward.
fn consistency_ok(m: u64, n: u64, proof: &[H], r1: &H, r2: &H) -> bool {
    if m == 0 || m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && r1 == r2;
    }
    let mut p = proof.to_vec();
    if m.is_power_of_two() {
        p.insert(0, *r1);
    }
    if p.is_empty() {
        return false;
    }
    let (mut f, mut s) = (m - 1, n - 1);
    while f % 2 == 1 {
        f /= 2;
        s /= 2;
    }
    let (mut fr, mut sr) = (p[0], p[0]);
    for c in &p[1..] {
        if s == 0 {
            return false;
        }
        if f % 2 == 1 || f == s {
            fr = sha(&[&[1u8], c, &fr]);
            sr = sha(&[&[1u8], c, &sr]);
            while f % 2 == 0 && f != 0 {
                f /= 2;
                s /= 2;
            }
        } else {
            sr = sha(&[&[1u8], &sr, c]);
        }
        f /= 2;
        s /= 2;
    }
    s == 0 && fr == *r1 && sr == *r2
}

/// C2SP signed note: verifies `note` with `name`'s Ed25519 `key`, returns
/// the text lines.
fn note_ok(note: &str, name: &str, key: &[u8; 32]) -> Option<Vec<String>> {
    let split = note.find("\n\n")?;
    let text = &note[..=split];
    let id = &sha(&[name.as_bytes(), b"\n", &[1u8], key])[..4];
    let vk = ed25519_dalek::VerifyingKey::from_bytes(key).ok()?;
    let ok = note[split + 2..].lines().any(|l| {
        let Some(rest) = l.strip_prefix("\u{2014} ") else {
            return false;
        };
        let Some((n, b)) = rest.rsplit_once(' ') else {
            return false;
        };
        let Ok(raw) = STANDARD.decode(b) else {
            return false;
        };
        n == name
            && raw.len() == 68
            && &raw[..4] == id
            && vk
                .verify_strict(
                    text.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&raw[4..].try_into().unwrap()),
                )
                .is_ok()
    });
    ok.then(|| text.lines().map(str::to_owned).collect())
}

fn hex32(s: &str) -> H {
    hex::decode(s).unwrap().try_into().unwrap()
}

fn entries(inst: &Instance) -> Vec<serde_json::Value> {
    let out = inst.keyward(&["audit", "export", "--db", inst.db.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sequence number of the newest checkpoint entry (0: none).
fn last_checkpoint_seq(inst: &Instance) -> u64 {
    rusqlite::Connection::open(&inst.db)
        .unwrap()
        .query_row(
            "SELECT coalesce(max(seq), 0) FROM ledger WHERE event = 'checkpoint'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
}

#[test]
fn checkpoints_notes_and_proofs_verify_independently_and_tampering_is_found() {
    let mut inst = Instance::init();
    let cfg = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(
        &inst.config,
        format!("{cfg}\n[ledger]\ncheckpoint_every = 7\norigin = \"keyward.test/ckpt\"\n"),
    )
    .unwrap();
    inst.start();
    for i in 0..12 {
        rt().block_on(inst.client().submit_intent(&transfer(
            &format!("c{i}"),
            &random_pubkey(),
            "0.01",
        )))
        .unwrap();
        // Let the checkpointer (every 500 ms) see the growing ledger: a
        // checkpoint after every fourth intent (twelve entries).
        if i % 4 == 3 {
            let head = rt()
                .block_on(inst.client().health())
                .unwrap()
                .ledger
                .head_seq;
            wait_until(
                "a checkpoint over the new entries",
                std::time::Duration::from_secs(10),
                || last_checkpoint_seq(&inst) > head,
            );
        }
    }
    let keys = inst.keyward(&["key", "list"]);
    let listing = String::from_utf8_lossy(&keys.stdout).into_owned();
    let vkey = listing
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint verifier key: "))
        .unwrap_or_else(|| panic!("key list prints the verifier key: {listing}"))
        .to_owned();
    // GET /v1/intents/{id} carries the proof once a checkpoint covers it.
    let view = rt().block_on(inst.client().get_intent("c0")).unwrap();
    assert_eq!(view.leaf_index, view.ledger_seq.map(|s| s - 1));
    let proof = view.proof.clone().expect("a checkpoint covers c0 by now");
    assert_eq!(proof["seq"].as_u64(), view.ledger_seq);
    let file = inst.dir.path().join("view.json");
    std::fs::write(&file, serde_json::to_vec(&view).unwrap()).unwrap();
    let ok = inst.keyward(&[
        "audit",
        "verify-proof",
        "--proof",
        file.to_str().unwrap(),
        "--vkey",
        &vkey,
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(inst.stop().success());

    // keyward audit checkpoint prints the latest note, verified with --vkey.
    let out = inst.keyward(&[
        "audit",
        "checkpoint",
        "--db",
        inst.db.to_str().unwrap(),
        "--vkey",
        &vkey,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        latest.starts_with("keyward.test/ckpt\n") && latest.contains("\u{2014} keyward-audit "),
        "{latest}"
    );
    let wrong = vkey.replacen("keyward-audit", "someone-else", 1);
    let out = inst.keyward(&[
        "audit",
        "checkpoint",
        "--db",
        inst.db.to_str().unwrap(),
        "--vkey",
        &wrong,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a wrong verifier key is refused"
    );

    let all = entries(&inst);
    let hashes: Vec<H> = all
        .iter()
        .map(|e| hex32(e["hash"].as_str().unwrap()))
        .collect();
    let checkpoints: Vec<&serde_json::Value> =
        all.iter().filter(|e| e["event"] == "checkpoint").collect();
    assert!(checkpoints.len() >= 3, "{} checkpoints", checkpoints.len());
    // The audit key's public key, from the verifier key string.
    let raw = STANDARD
        .decode(vkey.splitn(3, '+').nth(2).unwrap())
        .unwrap();
    let key: [u8; 32] = raw[1..].try_into().unwrap();
    let mut sizes = Vec::new();
    for cp in &checkpoints {
        let p = &cp["payload"];
        let lines =
            note_ok(p["note"].as_str().unwrap(), "keyward-audit", &key).expect("note verifies");
        assert_eq!(lines[0], "keyward.test/ckpt");
        let size: usize = lines[1].parse().unwrap();
        let root: H = STANDARD.decode(&lines[2]).unwrap().try_into().unwrap();
        assert!(size < cp["seq"].as_u64().unwrap() as usize);
        assert_eq!(root, mth(&hashes[..size]), "root of entries 1..{size}");
        sizes.push((size, root));
    }
    // Inclusion proofs of random entries, from keyward audit prove.
    let last = sizes.last().unwrap().0 as u64;
    for seq in [1, 2, last / 2, last - 1, last] {
        let out = inst.keyward(&[
            "audit",
            "prove",
            &seq.to_string(),
            "--db",
            inst.db.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let proof: Vec<H> = p["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| hex32(h.as_str().unwrap()))
            .collect();
        let size = p["tree_size"].as_u64().unwrap();
        let lines = note_ok(p["checkpoint"].as_str().unwrap(), "keyward-audit", &key).unwrap();
        let root: H = STANDARD.decode(&lines[2]).unwrap().try_into().unwrap();
        assert_eq!(lines[1], size.to_string());
        assert!(
            inclusion_ok(&hashes[seq as usize - 1], seq - 1, size, &proof, &root),
            "seq {seq}"
        );
        // keyward's own offline check agrees, and refuses a changed proof.
        let file = inst.dir.path().join(format!("proof-{seq}.json"));
        std::fs::write(&file, &out.stdout).unwrap();
        let ok = inst.keyward(&[
            "audit",
            "verify-proof",
            "--proof",
            file.to_str().unwrap(),
            "--vkey",
            &vkey,
        ]);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let mut bad = p.clone();
        bad["entry_hash"] = serde_json::json!(hex::encode([7u8; 32]));
        std::fs::write(&file, serde_json::to_vec(&bad).unwrap()).unwrap();
        let no = inst.keyward(&[
            "audit",
            "verify-proof",
            "--proof",
            file.to_str().unwrap(),
            "--vkey",
            &vkey,
        ]);
        assert_eq!(no.status.code(), Some(1));
    }
    // Proofs come from the perfect subtrees stored with each checkpoint
    // (O(log² n)); without them the same proof is computed from the leaves.
    let nodes: i64 = rusqlite::Connection::open(&inst.db)
        .unwrap()
        .query_row("SELECT count(*) FROM merkle_nodes", [], |r| r.get(0))
        .unwrap();
    assert!(nodes > 0, "nodes are stored with checkpoints");
    let bare = inst.dir.path().join("bare.sqlite3");
    std::fs::copy(&inst.db, &bare).unwrap();
    rusqlite::Connection::open(&bare)
        .unwrap()
        .execute("DELETE FROM merkle_nodes", [])
        .unwrap();
    for seq in [1, last / 2, last] {
        let a = inst.keyward(&[
            "audit",
            "prove",
            &seq.to_string(),
            "--db",
            inst.db.to_str().unwrap(),
        ]);
        let b = inst.keyward(&[
            "audit",
            "prove",
            &seq.to_string(),
            "--db",
            bare.to_str().unwrap(),
        ]);
        assert!(b.status.success());
        assert_eq!(
            a.stdout, b.stdout,
            "seq {seq}: stored nodes and leaves give the same proof"
        );
    }

    // Consistency proofs between successive checkpoints (keyward's prover,
    // this file's verifier).
    let leaves: Vec<H> = hashes
        .iter()
        .map(keyward::ledger::merkle::leaf_hash)
        .collect();
    for w in sizes.windows(2) {
        let ((m, r1), (n, r2)) = (w[0], w[1]);
        let proof = keyward::ledger::merkle::consistency_proof(&leaves[..n], m).unwrap();
        assert!(
            consistency_ok(m as u64, n as u64, &proof, &r1, &r2),
            "{m} -> {n}"
        );
        assert!(!consistency_ok(m as u64, n as u64, &proof, &r2, &r1) || m == n);
    }

    // Tampering: a forged checkpoint with a wrong root or signature, chained
    // correctly, is named by audit verify.
    for (what, edit) in [("root", 0usize), ("note", 1)] {
        let db = inst.dir.path().join(format!("forged-{what}.sqlite3"));
        std::fs::copy(&inst.db, &db).unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        let (seq, prev, ts): (i64, Vec<u8>, i64) = conn
            .query_row(
                "SELECT seq, hash, ts_ms FROM ledger ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let genuine = &checkpoints.last().unwrap()["payload"];
        let mut forged = genuine.clone();
        if edit == 0 {
            forged["root"] = serde_json::json!(hex::encode([9u8; 32]));
        } else {
            // The right root, a signature with one bit flipped.
            let note = genuine["note"].as_str().unwrap();
            let sig_line = note.lines().last().unwrap();
            let (head, b64) = sig_line.rsplit_once(' ').unwrap();
            let mut raw = STANDARD.decode(b64).unwrap();
            raw[40] ^= 1;
            forged["note"] = serde_json::json!(
                note.replace(sig_line, &format!("{head} {}", STANDARD.encode(raw)))
            );
        }
        let payload = serde_json::to_vec(&forged).unwrap();
        let prev: H = prev.try_into().unwrap();
        let new_seq = seq as u64 + 1;
        let hash =
            keyward::ledger::entry_hash(new_seq, &prev, ts, "checkpoint", None, None, &payload);
        conn.execute(
            "INSERT INTO ledger (seq, ts_ms, event, intent_id, agent, payload, prev_hash, hash) VALUES (?1, ?2, 'checkpoint', NULL, NULL, ?3, ?4, ?5)",
            rusqlite::params![new_seq as i64, ts, payload, &prev[..], &hash[..]],
        )
        .unwrap();
        drop(conn);
        let out = inst.keyward(&["audit", "verify", "--db", db.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "a forged checkpoint ({what}) is found"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("seq {new_seq}")) && err.contains("checkpoint"),
            "{what}: {err}"
        );
        let expect = if edit == 0 {
            "root does not match"
        } else {
            "signature does not verify"
        };
        assert!(err.contains(expect), "{what}: {err}");
    }
}
