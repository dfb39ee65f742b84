//! `keyward setup --softhsm` and `keyward key create` on a signer box laid
//! out as the package lays it out (`etc/`, `var/lib/`, `run/` in a
//! temporary directory), with the PIN handed to keywardd as a systemd
//! credential (`pin_file = "pin"`, `$CREDENTIALS_DIRECTORY`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use keyward_client::IntentOutcome;
use solana_sdk::pubkey::Pubkey;

/// A signer box in a temporary directory.
struct Box_ {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    starts: usize,
}

impl Box_ {
    /// keyward.toml and policy.toml (agent `dev` = this uid, key `hot`)
    /// as the package installs them, every path inside the directory.
    fn new() -> Box_ {
        let dir = tempfile::Builder::new()
            .prefix("kw-setup-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        for d in ["etc", "var/lib/keyward", "run"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // The package's state directory is 2750; the configuration check
        // refuses one everybody may read.
        std::fs::set_permissions(
            root.join("var/lib/keyward"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        let module = keyward::tools::dev::find_softhsm_module().unwrap();
        let config = format!(
            "[daemon]\n\
             agent_socket = \"{root}/run/agent.sock\"\n\
             admin_socket = \"{root}/run/admin.sock\"\n\
             state_dir = \"{root}/var/lib/keyward\"\n\
             policy = \"{root}/etc/policy.toml\"\n\n\
             [hsm]\n\
             backend = \"pkcs11\"\n\
             module = \"{module}\"\n\
             token_label = \"keyward\"\n\
             pin_file = \"pin\"\n\
             env = {{ SOFTHSM2_CONF = \"{root}/etc/softhsm2.conf\" }}\n",
            root = root.display(),
            module = module.display(),
        );
        std::fs::write(root.join("etc/keyward.toml"), config).unwrap();
        let b = Box_ {
            dir,
            daemon: None,
            starts: 0,
        };
        b.write_policy(&["hot"]);
        b
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn config(&self) -> PathBuf {
        self.path("etc/keyward.toml")
    }

    fn db(&self) -> PathBuf {
        self.path("var/lib/keyward/ledger.sqlite3")
    }

    fn write_policy(&self, keys: &[&str]) {
        let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
        std::fs::write(
            self.path("etc/policy.toml"),
            format!(
                "[agents.dev]\nuid = {}\nkeys = [{}]\n\n[agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"10\"\n",
                my_uid(),
                keys.join(", ")
            ),
        )
        .unwrap();
    }

    /// `keyward --config etc/keyward.toml ARGS`.
    fn keyward(&self, args: &[&str]) -> Output {
        Command::new(KEYWARD)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn setup(&self) -> String {
        let out = self.keyward(&["setup", "--softhsm"]);
        assert!(out.status.success(), "setup failed: {}", text(&out));
        text(&out)
    }

    /// `keyward key create NAME`; the printed public key.
    fn create_key(&self, name: &str) -> (Pubkey, String) {
        let out = self.keyward(&["key", "create", name]);
        assert!(out.status.success(), "key create failed: {}", text(&out));
        let all = text(&out);
        let pk = all
            .lines()
            .find_map(|l| l.trim().strip_prefix("public key: "))
            .unwrap_or_else(|| panic!("no public key in {all}"))
            .parse()
            .unwrap();
        (pk, all)
    }

    /// Starts keywardd as systemd would: the credential file copied to
    /// `$CREDENTIALS_DIRECTORY/pin`.
    fn start(&mut self) {
        let creds = self.path("creds");
        if !creds.exists() {
            std::fs::create_dir(&creds).unwrap();
            let pin = creds.join("pin");
            std::fs::copy(self.path("etc/credentials/hsm.pin"), &pin).unwrap();
            std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        self.starts += 1;
        let log =
            std::fs::File::create(self.path(&format!("keywardd-{}.log", self.starts))).unwrap();
        let child = Command::new(KEYWARDD)
            .arg("--config")
            .arg(self.config())
            .env("CREDENTIALS_DIRECTORY", &creds)
            .env("KEYWARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let admin = self.path("run/admin.sock");
        let agent = self.path("run/agent.sock");
        let log = self.path(&format!("keywardd-{}.log", self.starts));
        let child = self.daemon.as_mut().unwrap();
        wait_until("keywardd to serve", Duration::from_secs(30), || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "keywardd exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&agent).is_ok()
                && std::os::unix::net::UnixStream::connect(&admin).is_ok()
        });
    }

    fn stop(&mut self) {
        let mut child = self.daemon.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "keywardd stopped with {status}");
    }

    /// Every file under the box (except the daemon's logs and the
    /// credential copy) with its mode and the SHA-256 of its content: what
    /// "changes nothing" compares. SoftHSM2 rewrites its token's own
    /// record (`token.object`, `generation`) at every login, so only their
    /// presence counts; every object (key) file counts with its content.
    fn snapshot(&self) -> BTreeMap<PathBuf, (u32, String)> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u32, String)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let mode = meta.permissions().mode() & 0o7777;
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if meta.is_dir() {
                    out.insert(p.clone(), (mode, String::new()));
                    walk(&p, out);
                } else if name == "token.object" || name == "generation" {
                    out.insert(p.clone(), (mode, "(rewritten at login)".into()));
                } else if meta.is_file() {
                    use sha2::Digest as _;
                    let digest = sha2::Sha256::digest(std::fs::read(&p).unwrap());
                    out.insert(p.clone(), (mode, hex::encode(digest)));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &mut out);
        out.retain(|p, _| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with("keywardd-") && !p.starts_with(self.path("creds"))
        });
        out
    }

    /// The SoftHSM token's files (one per object, and the token's own).
    fn token_files(&self) -> BTreeMap<PathBuf, (u32, String)> {
        let tokens = self.path("var/lib/keyward/softhsm/tokens");
        self.snapshot()
            .into_iter()
            .filter(|(p, _)| p.starts_with(&tokens))
            .collect()
    }

    /// `key_generated` payloads naming `key`.
    fn generated(&self, key: &str) -> Vec<serde_json::Value> {
        ledger_entries(&self.db(), "key_generated")
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| p["key"] == key)
            .collect()
    }
}

impl Drop for Box_ {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn setup_softhsm_initialises_the_token_pin_credential_and_audit_key_and_a_second_run_changes_nothing()
 {
    let b = Box_::new();
    let first = b.setup();

    // SoftHSM's configuration, pointing at the token directory in state.
    let conf = std::fs::read_to_string(b.path("etc/softhsm2.conf")).unwrap();
    let tokens = b.path("var/lib/keyward/softhsm/tokens");
    assert!(
        conf.contains(&format!("directories.tokendir = {}", tokens.display())),
        "{conf}"
    );
    assert_eq!(mode(&b.path("etc/softhsm2.conf")), 0o640);
    assert_eq!(mode(&tokens), 0o700);
    assert!(
        std::fs::read_dir(&tokens).unwrap().next().is_some(),
        "a token was initialised in {}",
        tokens.display()
    );
    // The PIN credential (and the SO PIN beside it): root-only files in a
    // root-only directory, never shown.
    let creds = b.path("etc/credentials");
    assert_eq!(mode(&creds), 0o700);
    assert_eq!(mode(&creds.join("hsm.pin")), 0o400);
    assert_eq!(mode(&creds.join("so.pin")), 0o400);
    let pin = std::fs::read_to_string(creds.join("hsm.pin")).unwrap();
    let so_pin = std::fs::read_to_string(creds.join("so.pin")).unwrap();
    assert!(pin.trim().len() >= 32 && so_pin.trim().len() >= 32);
    assert_ne!(pin.trim(), so_pin.trim());
    assert!(
        !first.contains(pin.trim()) && !first.contains(so_pin.trim()),
        "a PIN was printed: {first}"
    );
    // The audit key is in the HSM, its verifier key pinned read-only, and
    // the output shows both.
    let vkey_file = b.path("etc/audit.vkey");
    assert_eq!(mode(&vkey_file), 0o444);
    let vkey = std::fs::read_to_string(&vkey_file).unwrap();
    let printed_vkey = first
        .lines()
        .find_map(|l| l.trim().strip_prefix("verifier key: "))
        .unwrap_or_else(|| panic!("no verifier key in {first}"));
    assert!(vkey.contains(printed_vkey), "{vkey} vs {first}");
    assert!(printed_vkey.starts_with("keyward-audit+"), "{first}");
    assert!(first.contains("Audit key \"keyward-audit\": "), "{first}");
    // The configuration check ran (the HSM opens with the credential as
    // keywardd will read it), and names the next step: the key the
    // policy names.
    assert!(first.contains("PIN accepted"), "{first}");
    assert!(
        first.contains("key create hot"),
        "names the next step: {first}"
    );
    // Set-up never creates the ledger (keywardd does, as its own user).
    assert!(!b.db().exists());

    // Again: nothing changes, and it says so.
    let before = b.snapshot();
    let second = b.setup();
    assert!(second.contains("Nothing to change"), "{second}");
    assert!(!second.contains(pin.trim()) && !second.contains(so_pin.trim()));
    assert_eq!(
        second.lines().find(|l| l.contains("verifier key: ")),
        first.lines().find(|l| l.contains("verifier key: ")),
        "the same audit key"
    );
    assert_eq!(b.snapshot(), before, "the second run changed files");
}

#[test]
fn a_key_created_offline_is_recorded_once_at_the_next_start_and_not_again_at_a_restart() {
    let mut b = Box_::new();
    b.setup();
    let (hot, out) = b.create_key("hot");
    assert!(out.contains("offline"), "{out}");
    assert!(
        !b.db().exists(),
        "offline creation never touches the ledger"
    );

    b.start();
    let recorded = b.generated("hot");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["public_key"], hot.to_string());
    assert_eq!(recorded[0]["created"], "offline");
    assert_eq!(recorded[0]["sensitive"], true);
    assert_eq!(recorded[0]["extractable"], false);
    // The audit key set-up made is recorded the same way, as pinned.
    let audit = b.generated("keyward-audit");
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["purpose"], "checkpoints");
    assert_eq!(
        audit[0]["pinned_in"],
        b.path("etc/audit.vkey").display().to_string()
    );
    // The key serves the agent.
    let keys = rt().block_on(keyward_client::Client::new(b.path("run/agent.sock")).keys());
    assert!(format!("{keys:?}").contains(&hot.to_string()), "{keys:?}");
    b.stop();

    b.start();
    b.stop();
    assert_eq!(b.generated("hot").len(), 1, "recorded again at a restart");
    assert_eq!(b.generated("keyward-audit").len(), 1);
    let out = Command::new(KEYWARD)
        .arg("--config")
        .arg(b.config())
        .args(["audit", "verify", "--db"])
        .arg(b.db())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_key_created_online_is_recorded_before_the_answer_and_signs_once_a_reloaded_policy_names_it() {
    let mut b = Box_::new();
    b.setup();
    b.create_key("hot");
    b.start();

    let (cold, out) = b.create_key("cold");
    assert!(!out.contains("offline"), "{out}");
    // The answer names the entry that records the key: it was committed
    // before the answer.
    let seq: i64 = out
        .split("ledger entry ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ledger entry in {out}"));
    let conn = rusqlite::Connection::open(b.db()).unwrap();
    let (event, payload): (String, Vec<u8>) = conn
        .query_row(
            "SELECT event, payload FROM ledger WHERE seq = ?1",
            [seq],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    drop(conn);
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(event, "key_generated");
    assert_eq!(payload["key"], "cold");
    assert_eq!(payload["public_key"], cold.to_string());
    assert_eq!(payload["created"], "admin_socket");
    assert_eq!(payload["by"], format!("uid:{}", my_uid()));

    // Named by the policy and reloaded, it signs.
    b.write_policy(&["hot", "cold"]);
    let out = b.keyward(&["policy", "reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut req = transfer("cold-1", &random_pubkey(), "0.1");
    req.key = "cold".to_owned();
    let client = keyward_client::Client::new(b.path("run/agent.sock"));
    match rt().block_on(client.submit_intent(&req)).unwrap() {
        IntentOutcome::Signed(s) => {
            let sig: solana_sdk::signature::Signature = s.signature.parse().unwrap();
            use base64::Engine as _;
            let tx: solana_sdk::transaction::Transaction = bincode::deserialize(
                &base64::engine::general_purpose::STANDARD
                    .decode(&s.transaction)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(tx.message.account_keys[0], cold, "signed by cold");
            assert_eq!(tx.signatures[0], sig);
            tx.verify().unwrap();
        }
        other => panic!("expected signed, got {other:?}"),
    }
    b.stop();
    // A restart does not record it a second time.
    b.start();
    b.stop();
    assert_eq!(b.generated("cold").len(), 1);
}

#[test]
fn bad_names_the_reserved_name_and_an_existing_key_are_refused_with_nothing_changed() {
    let mut b = Box_::new();
    b.setup();
    b.create_key("hot");
    let refusals = [
        ("bad name", "invalid_key_name"),
        ("", "invalid_key_name"),
        ("keyward-audit", "key_name_reserved"),
        ("keyward-approver:x", "invalid_key_name"),
        ("keyward-spare", "key_name_reserved"),
        ("hot", "key_exists"),
    ];
    // Offline: the token keeps its objects, and no ledger appears.
    let before = b.token_files();
    for (name, code) in refusals {
        let out = b.keyward(&["key", "create", name]);
        assert_eq!(out.status.code(), Some(2), "{name:?}: {}", text(&out));
        assert!(text(&out).contains(code), "{name:?}: {}", text(&out));
    }
    assert_eq!(
        b.token_files(),
        before,
        "an offline refusal changed the token"
    );
    assert!(!b.db().exists());

    // Through the daemon: the same refusals, and the ledger is unchanged.
    b.start();
    let before = b.token_files();
    let entries_before = recorded(&b.db());
    for (name, code) in refusals {
        let out = b.keyward(&["key", "create", name]);
        assert_eq!(out.status.code(), Some(2), "{name:?}: {}", text(&out));
        assert!(text(&out).contains(code), "{name:?}: {}", text(&out));
        assert!(!text(&out).contains("offline"), "{}", text(&out));
    }
    // The admin endpoint itself refuses them (not only the CLI's check).
    let admin = b.path("run/admin.sock");
    for (name, code, status) in [
        ("bad name", "invalid_key_name", 400),
        ("keyward-audit", "key_name_reserved", 400),
        ("hot", "key_exists", 409),
    ] {
        let (st, body) = http_as(
            my_uid(),
            &admin,
            "POST",
            "/v1/admin/keys",
            &serde_json::json!({ "name": name }).to_string(),
        );
        assert_eq!((st, error_code(&body).as_str()), (status, code), "{body}");
    }
    assert_eq!(recorded(&b.db()), entries_before, "a refusal was recorded");
    assert_eq!(b.token_files(), before, "a refusal changed the token");
    b.stop();
}

/// Entries other than keywardd's own housekeeping (checkpoints).
fn recorded(db: &Path) -> Vec<(i64, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, event FROM ledger WHERE event != 'checkpoint' ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn setup_with_a_vendor_module_saves_the_pin_only_once_it_logs_in() {
    let b = Box_::new();
    // The vendor's tools initialise the token (SoftHSM2 stands in for the
    // vendor module here).
    let tokens = b.path("vendor-tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(
        b.path("etc/softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let pin = "vendor-PIN-271828";
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "keyward",
            "--so-pin",
            "so-314159",
        ])
        .args(["--pin", pin])
        .env("SOFTHSM2_CONF", b.path("etc/softhsm2.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let module = keyward::tools::dev::find_softhsm_module().unwrap();
    let module = module.to_str().unwrap();
    let credential = b.path("etc/credentials/hsm.pin");
    let write_pin_file = |name: &str, content: &str| {
        let p = b.path(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        p
    };

    // A wrong PIN is refused and not saved.
    let wrong = write_pin_file("wrong.pin", "not-the-pin\n");
    let out = b.keyward(&[
        "setup",
        "--module",
        module,
        "--token-label",
        "keyward",
        "--pin-file",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("login"), "{}", text(&out));
    assert!(!credential.exists(), "a PIN that does not log in was saved");

    // A label keyward.toml does not name is refused (keywardd would not
    // find the token).
    let right = write_pin_file("right.pin", &format!("{pin}\n"));
    let out = b.keyward(&[
        "setup",
        "--module",
        module,
        "--token-label",
        "other",
        "--pin-file",
        right.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("token_label"), "{}", text(&out));
    assert!(!credential.exists());

    // The right PIN on stdin: saved 0400, never shown; the audit key made.
    let mut child = Command::new(KEYWARD)
        .arg("--config")
        .arg(b.config())
        .args(["setup", "--module", module, "--token-label", "keyward"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{pin}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains(pin),
        "the PIN was printed: {}",
        text(&out)
    );
    assert_eq!(mode(&credential), 0o400);
    assert_eq!(std::fs::read_to_string(&credential).unwrap().trim(), pin);
    assert!(
        !b.path("etc/credentials/so.pin").exists(),
        "no SO PIN is known"
    );
    assert_eq!(mode(&b.path("etc/audit.vkey")), 0o444);
    // The saved credential opens the token for the next command.
    b.create_key("hot");
}

#[test]
fn setup_interrupted_after_saving_the_pins_resumes_with_them() {
    let b = Box_::new();
    // An earlier run saved the PINs and stopped before the token existed.
    let creds = b.path("etc/credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (name, pin) in [
        ("hsm.pin", "saved-user-pin-1"),
        ("so.pin", "saved-so-pin-2"),
    ] {
        let p = creds.join(name);
        std::fs::write(&p, format!("{pin}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let out = b.setup();
    assert!(out.contains("initialised SoftHSM2 token"), "{out}");
    assert!(!out.contains("saved-user-pin-1") && !out.contains("saved-so-pin-2"));
    assert_eq!(
        std::fs::read_to_string(creds.join("hsm.pin")).unwrap(),
        "saved-user-pin-1\n",
        "the saved PIN is the token's"
    );
    // The token takes the saved PIN: keys can be made with it.
    b.create_key("hot");
}

/// `keyward setup --yubihsm` on a PKCS#11 configuration is refused with
/// the reason, exit 2, and nothing is written (no token, no credential,
/// no pinned key).
#[test]
fn setup_for_a_yubihsm_on_a_pkcs11_configuration_is_refused_and_changes_nothing() {
    let b = Box_::new();
    let before = b.snapshot();
    let out = b.keyward(&["setup", "--yubihsm"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("--yubihsm needs [hsm] backend = \"yubihsm\""),
        "{all}"
    );
    assert_eq!(b.snapshot(), before, "nothing written");
    assert!(!b.path("etc/audit.vkey").exists());
}
