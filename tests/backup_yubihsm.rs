//! `keyward backup create | verify | restore` on a YubiHSM 2 (issue #18,
//! "Backup": keys exported under the wrap key), against a real keywardd on
//! a MockHsm served by `keyward hsm mock-connector`, and a second, fresh
//! mock connector as the replacement device.
//!
//! MockHsm (yubihsm 0.42.1) cannot carry an Ed25519 key through a wrap:
//! its Export Wrapped puts the key's *public* key where the secret belongs
//! (`Payload::to_bytes` of an Ed25519 key is `verifying_key().to_bytes()`),
//! and Import Wrapped takes those 32 bytes as the secret seed. The key
//! imported on the replacement is therefore another key, and restore must
//! refuse it (`restore_key_mismatch`): that is what these tests can show.
//! A real YubiHSM 2 wraps the private key; `keyward hsm selftest` on a
//! device covers the round trip there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use yubihsm::{Capability, Domain, object, wrap};

/// The wrap key id `keyward hsm setup yubihsm --backups` uses.
const WRAP_KEY: u16 = 0x0010;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An `AUTH_KEY_ID:PASSWORD` file (0400): MockHsm's factory key, which
/// has every capability (the admin key of a provisioned device).
fn admin_credential(path: &Path) -> PathBuf {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, b"1:password\n").unwrap();
    path.to_path_buf()
}

/// Puts wrap key `WRAP_KEY` with the bytes `key` on the device `client`
/// talks to, as `hsm setup yubihsm --backups` provisions it.
fn put_wrap_key(client: &yubihsm::Client, key: &[u8; 32]) {
    client
        .put_wrap_key(
            WRAP_KEY,
            object::Label::from("keyward-backup"),
            Domain::all(),
            Capability::EXPORT_WRAPPED | Capability::IMPORT_WRAPPED,
            Capability::all(),
            wrap::Algorithm::Aes256Ccm,
            key.to_vec(),
        )
        .unwrap();
}

/// A client of the dev instance's own MockHsm (its connector's port is in
/// `yubihsm-mock.port` beside keyward.toml).
fn instance_device(inst: &Instance) -> yubihsm::Client {
    let dir = inst.config.parent().unwrap();
    let port: u16 = std::fs::read_to_string(dir.join("yubihsm-mock.port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let connector = yubihsm::Connector::http(&yubihsm::HttpConfig {
        addr: "127.0.0.1".into(),
        port,
        timeout_ms: 10_000,
    });
    yubihsm::Client::open(connector, yubihsm::Credentials::default(), false).unwrap()
}

/// A started yubihsm-mock instance whose keys are (or are not) exportable
/// under wrap, its device holding wrap key `wrap`, the admin credential
/// where `backup create` looks by default, and an approver (an HMAC key).
fn instance(exportable: bool, wrap: &[u8; 32]) -> Instance {
    let extra: &[&str] = if exportable {
        &["--exportable-under-wrap"]
    } else {
        &[]
    };
    let mut inst = Instance::init_on_with(TestBackend::YubiHsmMock { latency_ms: 0 }, extra);
    put_wrap_key(&instance_device(&inst), wrap);
    admin_credential(&inst.config.parent().unwrap().join("yubihsm-admin"));
    inst.start();
    let out = inst.dir.path().join("alice.key");
    let o = inst.keyward(&["approver", "add", "alice", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "approver add: {}", stderr(&o));
    inst
}

fn manifest(backup: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(backup.join("manifest.json")).unwrap()).unwrap()
}

/// (path, role) of every file the manifest lists.
fn listed(m: &serde_json::Value) -> Vec<(String, String)> {
    m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_yubihsm_backup_holds_every_object_wrapped_verifies_and_is_imported_only_onto_a_device_with_the_wrap_key()
 {
    let wrap: [u8; 32] = rand::random();
    let inst = instance(true, &wrap);
    let device = instance_device(&inst);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("backup");

    let o = inst.keyward(&["backup", "create", out.to_str().unwrap()]);
    assert!(o.status.success(), "backup create: {}", stderr(&o));
    let m = manifest(&out);
    assert_eq!(m["instance"]["backend"], "yubihsm");
    assert_eq!(m["instance"]["key_material"], "yubihsm_wrapped");
    assert_eq!(m["instance"]["wrap_key"], WRAP_KEY);
    let files = listed(&m);
    let wrapped: Vec<&str> = files
        .iter()
        .filter(|(_, r)| r == "wrapped")
        .map(|(p, _)| p.as_str())
        .collect();
    // hot and the audit key, alice's HMAC key: each a file named by its
    // object, holding the device's nonce and ciphertext.
    let hot_id = device
        .list_objects(&[
            yubihsm::object::Filter::Type(object::Type::AsymmetricKey),
            yubihsm::object::Filter::Label(object::Label::from("hot")),
        ])
        .unwrap()[0]
        .object_id;
    let hot_file = format!("hsm/asymmetric-key-{hot_id:04x}.wrap");
    assert!(wrapped.contains(&hot_file.as_str()), "{wrapped:?}");
    assert_eq!(
        wrapped
            .iter()
            .filter(|p| p.starts_with("hsm/asymmetric-key-"))
            .count(),
        2,
        "hot and the audit key: {wrapped:?}"
    );
    assert_eq!(
        wrapped
            .iter()
            .filter(|p| p.starts_with("hsm/hmac-key-"))
            .count(),
        1,
        "alice: {wrapped:?}"
    );
    assert!(!files.iter().any(|(_, r)| r == "token"));
    // Neither credential is in the backup.
    for f in &files {
        let bytes = std::fs::read(out.join(&f.0)).unwrap();
        assert!(
            !bytes.windows(8).any(|w| w == b"password"),
            "{} holds a credential",
            f.0
        );
    }
    assert_eq!(ledger_entries(&inst.db, "backup_created").len(), 1);
    let o = inst.keyward(&["backup", "verify", out.to_str().unwrap()]);
    assert!(o.status.success(), "backup verify: {}", stderr(&o));

    // A replacement device without the wrap key's bytes (another key under
    // the same id) imports nothing and restores nothing.
    let other = MockConnector::start();
    put_wrap_key(&other.client(), &rand::random());
    let cred = admin_credential(&work.path().join("replacement-admin"));
    let restore = |conn: &MockConnector, to: &Path| {
        inst.keyward(&[
            "backup",
            "restore",
            out.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
            "--connector",
            &conn.url(),
            "--admin-credential",
            cred.to_str().unwrap(),
        ])
    };
    let to = work.path().join("restored");
    let o = restore(&other, &to);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("backup_device"), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot import"), "{}", stderr(&o));
    assert!(!to.exists(), "a failed restore wrote {}", to.display());

    // The replacement with the same wrap key: every object is imported
    // under its own id; alice's HMAC key is alice's (same tags). MockHsm's
    // Ed25519 key comes out as another key (see the module's doc), and
    // restore refuses it by the registry's public key.
    let replacement = MockConnector::start();
    let rclient = replacement.client();
    put_wrap_key(&rclient, &wrap);
    let o = restore(&replacement, &to);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("restore_key_mismatch") && stderr(&o).contains("\"hot\""),
        "{}",
        stderr(&o)
    );
    assert!(!to.exists(), "a refused restore wrote {}", to.display());
    let info = rclient
        .get_object_info(hot_id, object::Type::AsymmetricKey)
        .unwrap();
    assert_eq!(info.origin, object::Origin::WrappedGenerated);
    assert_eq!(info.label.try_as_str().unwrap(), "hot");
    let imported = rclient.get_public_key(hot_id).unwrap();
    assert_ne!(imported.as_ref(), inst.hot.as_ref());
    let seed: [u8; 32] = inst.hot.to_bytes();
    assert_eq!(
        imported.as_ref(),
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .as_bytes(),
        "MockHsm now wraps Ed25519 keys differently: if the public key is the original's, \
         this test can check the full restore (sign with `hot` on the replacement)"
    );
    let hmac_id = device
        .list_objects(&[yubihsm::object::Filter::Type(object::Type::HmacKey)])
        .unwrap()[0]
        .object_id;
    assert_eq!(
        device.sign_hmac(hmac_id, b"m".to_vec()).unwrap().0,
        rclient.sign_hmac(hmac_id, b"m".to_vec()).unwrap().0,
        "alice's HMAC key is not the original after the import"
    );

    // Once imported, the objects are there: a second restore refuses
    // before importing anything (MockHsm would panic on a taken id; the
    // connector still answers afterwards).
    let o = restore(&replacement, &to);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("restore_object_exists"),
        "{}",
        stderr(&o)
    );
    assert!(replacement.accepts());
    rclient.ping().unwrap();
}

#[test]
fn a_yubihsm_backup_names_the_key_that_is_not_exportable_and_writes_nothing() {
    let inst = instance(false, &rand::random());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let o = inst.keyward(&["backup", "create", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("backup_not_exportable"), "{err}");
    assert!(err.contains("\"hot\""), "{err}");
    assert!(err.contains("exportable_under_wrap"), "{err}");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
    assert!(ledger_entries(&inst.db, "backup_created").is_empty());
}

#[test]
fn a_yubihsm_backup_without_the_admin_credential_is_refused_and_never_uses_keywardds() {
    let mut inst = Instance::init_on_with(
        TestBackend::YubiHsmMock { latency_ms: 0 },
        &["--exportable-under-wrap"],
    );
    put_wrap_key(&instance_device(&inst), &rand::random());
    inst.start();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // No yubihsm-admin beside keywardd's yubihsm-signer: refused, though
    // keywardd's own credential would open a session.
    let o = inst.keyward(&["backup", "create", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("admin credential"), "{}", stderr(&o));
    assert!(stderr(&o).contains("yubihsm-admin"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
    assert!(ledger_entries(&inst.db, "backup_created").is_empty());
}

#[test]
fn a_yubihsm_restore_refuses_a_device_that_already_has_a_key_of_the_same_name() {
    let wrap: [u8; 32] = rand::random();
    let inst = instance(true, &wrap);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("backup");
    let o = inst.keyward(&["backup", "create", out.to_str().unwrap()]);
    assert!(o.status.success(), "backup create: {}", stderr(&o));
    // The replacement already holds a key labelled `hot` (under an id the
    // backup does not use): importing would make `hot` ambiguous.
    let replacement = MockConnector::start();
    let rclient = replacement.client();
    put_wrap_key(&rclient, &wrap);
    rclient
        .generate_asymmetric_key(
            0x7000,
            object::Label::from("hot"),
            Domain::DOM1,
            Capability::SIGN_EDDSA,
            yubihsm::asymmetric::Algorithm::Ed25519,
        )
        .unwrap();
    let cred = admin_credential(&work.path().join("replacement-admin"));
    let to = work.path().join("restored");
    let o = inst.keyward(&[
        "backup",
        "restore",
        out.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
        "--connector",
        &replacement.url(),
        "--admin-credential",
        cred.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("restore_object_exists") && stderr(&o).contains("\"hot\""),
        "{}",
        stderr(&o)
    );
    assert!(!to.exists());
    // Nothing was imported: the device holds only the wrap key and the
    // key put there (and its factory authentication key).
    let objects = rclient.list_objects(&[]).unwrap();
    assert_eq!(objects.len(), 3, "{objects:?}");
}
