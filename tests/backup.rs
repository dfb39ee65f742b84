//! `keyward backup create | verify | restore` (issue #18, criteria 3 and 6)
//! against a real keywardd on a SoftHSM2 dev instance: a backup taken
//! while agents sign restores into an instance whose ledger, counters and
//! key are the original's; any change to a backup is refused by verify and
//! restore alike; the daemon signs only manifests of its own history; a
//! backup never holds the PIN.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use sha2::{Digest, Sha256};
use solana_sdk::transaction::Transaction;

/// A dev instance on `backend`, started (backups are SoftHSM2's whatever
/// `KEYWARD_TEST_BACKEND` says).
fn started(backend: TestBackend) -> Instance {
    let mut inst = Instance::init_on(backend);
    inst.start();
    inst
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `keyward backup create OUT` on `inst`; asserts success.
fn create_backup(inst: &Instance, out: &Path) {
    let o = inst.keyward(&["backup", "create", out.to_str().unwrap()]);
    assert!(o.status.success(), "backup create failed: {}", stderr(&o));
}

/// The ledger head a backup's manifest covers: (seq, hash hex).
fn manifest_head(backup: &Path) -> (u64, String) {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("manifest.json")).unwrap()).unwrap();
    (
        m["ledger"]["seq"].as_u64().unwrap(),
        m["ledger"]["hash"].as_str().unwrap().to_owned(),
    )
}

/// (seq, hash) of every entry of a ledger, up to `through`.
fn chain(db: &Path, through: u64) -> Vec<(u64, Vec<u8>)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.prepare("SELECT seq, hash FROM ledger WHERE seq <= ?1 ORDER BY seq")
        .unwrap()
        .query_map([through as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// A keywardd started on a restored instance; killed on drop.
struct Restored {
    child: Child,
    dir: PathBuf,
}

impl Restored {
    fn start(dir: &Path, log: &Path) -> Restored {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(KEYWARDD)
            .arg("--config")
            .arg(dir.join("keyward.toml"))
            .env("KEYWARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut r = Restored {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(dir.join("agent.sock")).is_err() {
            assert!(
                r.child.try_wait().unwrap().is_none(),
                "keywardd exited on the restored instance"
            );
            assert!(Instant::now() < deadline, "restored keywardd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r.dir = dir.to_path_buf();
        r
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The spend rows of a ledger database: (agent, asset, intent id) →
/// (amount, state).
fn spend_rows(db: &Path) -> Vec<(String, String, String, i64, String)> {
    Counters::of(db).spend
}

fn intent_ids(conn: &rusqlite::Connection, sql: &str) -> BTreeSet<String> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn a_backup_taken_while_four_clients_sign_restores_the_ledger_counters_and_key() {
    let inst = started(TestBackend::SoftHsm);
    let stop = Arc::new(AtomicBool::new(false));
    let signed = Arc::new(AtomicUsize::new(0));
    let mut agents = Vec::new();
    for a in 0..4 {
        let (stop, signed) = (Arc::clone(&stop), Arc::clone(&signed));
        let client = inst.client();
        agents.push(std::thread::spawn(move || {
            let rt = rt();
            let to = random_pubkey();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let req = transfer(&format!("a{a}-{n}"), &to, "0.001");
                match rt.block_on(client.submit_intent(&req)) {
                    Ok(keyward_client::IntentOutcome::Signed(_)) => {
                        signed.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("agent {a}: intent {n} not signed: {other:?}"),
                }
                n += 1;
            }
            n
        }));
    }
    wait_until("the agents sign", Duration::from_secs(30), || {
        signed.load(Ordering::Relaxed) >= 12
    });
    let work = tempfile::tempdir().unwrap();
    let backup = work.path().join("backup");
    let before = signed.load(Ordering::Relaxed);
    create_backup(&inst, &backup);
    // Signing went on during and after the backup.
    wait_until("signing goes on", Duration::from_secs(30), || {
        signed.load(Ordering::Relaxed) >= before + 8
    });
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        a.join().unwrap();
    }
    let (head, head_hash) = manifest_head(&backup);
    assert!(
        head > 12,
        "the backup covers the agents' entries (head {head})"
    );
    // A backup_created entry in the original names that head.
    let created = ledger_entries(&inst.db, "backup_created");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].1["ledger_seq"], head);
    assert_eq!(created[0].1["ledger_hash"], head_hash.as_str());

    let verify = inst.keyward(&["backup", "verify", backup.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "backup verify: {}",
        stderr(&verify)
    );

    // The PIN is in no file of the backup.
    let pin = std::fs::read(inst.config_value("pin_file")).unwrap();
    let pin = String::from_utf8(pin).unwrap();
    let pin = pin.trim();
    assert!(pin.len() >= 16);
    for f in files_under(&backup) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(pin.len()).any(|w| w == pin.as_bytes()),
            "{} holds the PIN",
            f.display()
        );
    }

    let restored = work.path().join("restored");
    let o = inst.keyward(&[
        "backup",
        "restore",
        backup.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
        "--pin-file",
        &inst.config_value("pin_file"),
    ]);
    assert!(o.status.success(), "restore failed: {}", stderr(&o));
    assert!(stdout(&o).contains("keywardd --config"), "{}", stdout(&o));
    let rdb = restored.join("state").join("ledger.sqlite3");

    // The restored ledger verifies against the original's pinned key ...
    let o = Command::new(KEYWARD)
        .args(["audit", "verify", "--db"])
        .arg(&rdb)
        .arg("--vkey-file")
        .arg(inst.audit_vkey_file())
        .output()
        .unwrap();
    assert!(o.status.success(), "restored ledger: {}", stderr(&o));
    // ... and holds every entry of the original up to the manifest's head,
    // with the same hashes, and nothing after it.
    let original = chain(&inst.db, head);
    let copy = chain(&rdb, i64::MAX as u64);
    assert_eq!(copy.len() as u64, head);
    assert_eq!(
        copy, original,
        "the restored chain differs from the original's"
    );

    // Counters: every spent row is an intent signed in the restored
    // ledger and the reverse; every reserved row an intent in progress;
    // the running total is the sum of the rows; and each row is the
    // original's.
    let conn =
        rusqlite::Connection::open_with_flags(&rdb, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let signed_ids = intent_ids(
        &conn,
        "SELECT intent_id FROM ledger WHERE event = 'signature_created'",
    );
    let in_progress = intent_ids(
        &conn,
        "SELECT intent_id FROM intents WHERE status = 'in_progress'",
    );
    let rows = spend_rows(&rdb);
    let spent: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.4 == "spent")
        .map(|r| r.2.clone())
        .collect();
    let reserved: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.4 == "reserved")
        .map(|r| r.2.clone())
        .collect();
    assert!(signed_ids.len() >= 12);
    assert_eq!(spent, signed_ids, "spent rows are not the signed intents");
    assert_eq!(
        reserved, in_progress,
        "reserved rows are not the intents in progress"
    );
    let total: i64 = rows.iter().map(|r| r.3).sum();
    assert_eq!(
        Counters::of(&rdb).totals,
        vec![("dev".to_owned(), "SOL".to_owned(), total)]
    );
    let original_rows = spend_rows(&inst.db);
    for r in &rows {
        assert!(
            original_rows
                .iter()
                .any(|o| (&o.0, &o.1, &o.2, o.3) == (&r.0, &r.1, &r.2, r.3)
                    && (r.4 == "reserved" || o.4 == "spent")),
            "restored spend row {r:?} is not the original's"
        );
    }
    drop(conn);

    // keywardd starts on the restored instance and signs with the
    // original key.
    let daemon = Restored::start(&restored, &work.path().join("restored.log"));
    let client = keyward_client::Client::new(daemon.dir.join("agent.sock"));
    let to = random_pubkey();
    let s = match rt()
        .block_on(client.submit_intent(&transfer("after-restore", &to, "0.01")))
        .unwrap()
    {
        keyward_client::IntentOutcome::Signed(s) => s,
        other => panic!("not signed on the restored instance: {other:?}"),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&s.transaction)
        .unwrap();
    let tx: Transaction = bincode::deserialize(&bytes).unwrap();
    assert_eq!(
        tx.message.account_keys[0], inst.hot,
        "signed by another key"
    );
    tx.verify()
        .expect("the signature verifies under the original public key");
}

/// Runs `backup verify` and `backup restore` on a changed backup: both
/// exit 1 naming `names`, and restore writes nothing.
fn assert_refused(inst: &Instance, backup: &Path, names: &str, case: &str) {
    let v = inst.keyward(&["backup", "verify", backup.to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(1), "{case}: verify: {}", stderr(&v));
    assert!(
        stderr(&v).contains(names),
        "{case}: verify does not name {names}: {}",
        stderr(&v)
    );
    let parent = backup.parent().unwrap();
    let to = parent.join(format!("{case}-restored"));
    let r = inst.keyward(&[
        "backup",
        "restore",
        backup.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
        "--pin-file",
        &inst.config_value("pin_file"),
    ]);
    assert_eq!(r.status.code(), Some(1), "{case}: restore: {}", stderr(&r));
    assert!(
        stderr(&r).contains(names),
        "{case}: restore does not name {names}: {}",
        stderr(&r)
    );
    assert!(!to.exists(), "{case}: restore wrote {}", to.display());
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restore"))
        .collect();
    assert!(leftovers.is_empty(), "{case}: restore left {leftovers:?}");
}

#[test]
fn a_changed_manifest_file_extra_or_missing_file_or_another_keys_signature_is_refused() {
    let inst = started(TestBackend::SoftHsm);
    let other = started(TestBackend::SoftHsm);
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good");
    create_backup(&inst, &good);
    let v = inst.keyward(&["backup", "verify", good.to_str().unwrap()]);
    assert!(v.status.success(), "the untouched backup: {}", stderr(&v));

    let case = |name: &str, change: &dyn Fn(&Path), names: &str| {
        let dir = work.path().join(name);
        copy_dir(&good, &dir);
        change(&dir);
        assert_refused(&inst, &dir, names, name);
    };
    case(
        "manifest-byte",
        &|d| {
            let p = d.join("manifest.json");
            let text = std::fs::read_to_string(&p).unwrap();
            let at = text.find("\"size\": ").unwrap() + 8;
            flip_byte(&p, at);
        },
        "manifest.json",
    );
    case(
        "policy-byte",
        &|d| flip_byte(&d.join("config/policy.toml"), 5),
        "config/policy.toml",
    );
    case(
        "db-byte",
        &|d| flip_byte(&d.join("ledger/ledger.sqlite3"), 5000),
        "ledger/ledger.sqlite3",
    );
    case(
        "extra-file",
        &|d| std::fs::write(d.join("config/notes.txt"), b"hello").unwrap(),
        "config/notes.txt",
    );
    case(
        "missing-file",
        &|d| std::fs::remove_file(d.join("config/audit.vkey")).unwrap(),
        "config/audit.vkey",
    );

    // The other instance's daemon signs this backup's exact manifest (with
    // a head of its own ledger): a valid signature by another audit key.
    let digest = hex::encode(Sha256::digest(
        std::fs::read(good.join("manifest.json")).unwrap(),
    ));
    let (seq, hash) = chain(&other.db, 1).pop().unwrap();
    let (status, body) = sign_request(&other, &digest, seq, &hex::encode(hash));
    assert_eq!(status, 200, "{body}");
    let answer: keyward_client::wire::BackupSigned = serde_json::from_str(&body).unwrap();
    case(
        "other-key",
        &|d| {
            std::fs::write(d.join("manifest.sig"), format!("{}\n", answer.signature)).unwrap();
        },
        "manifest.sig",
    );
}

/// `POST /v1/admin/backups/sign` on `inst`'s admin socket.
fn sign_request(inst: &Instance, digest: &str, seq: u64, hash: &str) -> (u16, String) {
    let client = keyward_client::Client::new(&inst.admin_socket);
    let body = keyward_client::wire::BackupSignRequest {
        manifest_sha256: digest.to_owned(),
        ledger_seq: seq,
        ledger_hash: hash.to_owned(),
        files: 1,
    };
    let (status, body) = rt()
        .block_on(client.request_json(
            keyward_client::Method::POST,
            "/v1/admin/backups/sign",
            Some(&body),
        ))
        .unwrap();
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn the_daemon_signs_no_manifest_whose_head_is_not_in_its_ledger() {
    let inst = started(TestBackend::SoftHsm);
    let digest = "ab".repeat(32);
    let (seq, hash) = chain(&inst.db, 1).pop().unwrap();
    let mut wrong = hash.clone();
    wrong[0] ^= 1;
    for (seq, hash) in [(seq, hex::encode(&wrong)), (1_000_000, hex::encode(&hash))] {
        let (status, body) = sign_request(&inst, &digest, seq, &hash);
        assert_eq!(status, 409, "{body}");
        assert_eq!(error_code(&body), "backup_head_unknown", "{body}");
    }
    assert!(ledger_entries(&inst.db, "backup_created").is_empty());
    // The same request with the true head is signed and recorded.
    let (status, body) = sign_request(&inst, &digest, seq, &hex::encode(&hash));
    assert_eq!(status, 200, "{body}");
    let created = ledger_entries(&inst.db, "backup_created");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].1["manifest_sha256"], digest.as_str());
}

#[test]
fn backup_create_is_refused_onto_an_existing_out_with_a_pin_inside_or_without_a_daemon() {
    let inst = started(TestBackend::SoftHsm);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = inst.keyward(&["backup", "create", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("backup_target_exists"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        1,
        "a temporary backup was left beside OUT"
    );
    assert!(ledger_entries(&inst.db, "backup_created").is_empty());

    // A file that would carry the PIN into the backup is refused (a
    // guard: nothing keyward copies should ever hold it).
    let pin = std::fs::read_to_string(inst.config_value("pin_file")).unwrap();
    let policy = std::fs::read_to_string(&inst.policy).unwrap();
    std::fs::write(&inst.policy, format!("{policy}\n# {}\n", pin.trim())).unwrap();
    let leak = work.path().join("leak");
    let o = inst.keyward(&["backup", "create", leak.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("backup_holds_pin"), "{}", stderr(&o));
    assert!(!stderr(&o).contains(pin.trim()), "the PIN was printed");
    std::fs::write(&inst.policy, policy).unwrap();

    // Without a running daemon nothing signs the manifest: refused, and
    // nothing is left behind.
    let mut inst = inst;
    inst.stop();
    let o = inst.keyward(&["backup", "create", leak.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not running"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        1,
        "a refused backup left files beside OUT"
    );
}
