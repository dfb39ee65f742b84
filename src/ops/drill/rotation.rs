//! `keyward drill rotation`: the key-rotation drill, on a scratch
//! development instance (a SoftHSM2 token in the scratch directory, made by
//! `keyward init --dev`, with its key `hot` and agent `dev` bound to the
//! drill's uid). Production's keys, ledger and policy are not used.
//!
//! Steps: `init` (the scratch instance), `start` (its keywardd), `sign old`
//! (the key signs before the rotation), `rotate` (grace period 0),
//! `sign new` (intents for the name are signed by the successor),
//! `old refused` (a message only the old key could sign is denied,
//! `key_not_signer`), `statement` (the `key_rotated` entry's transition
//! statement verifies with both public keys), `retire` (the old version is
//! destroyed), `stop`, and `hsm` (through PKCS#11: the old key's object is
//! gone from the token, the successor's is there with its public key).
//!
//! The last step loads the PKCS#11 module in this process: the caller must
//! have set `SOFTHSM2_CONF` to [`crate::hsm::softhsm::conf_path`] of
//! `instance` before any thread was started.

use std::path::Path;
use std::process::Command;

use keyward_client::wire::{AdminKeyInfo, KeyRetireRequest, KeyRotateRequest, KeyRotatedView};

use super::scratch::{ScratchDaemon, sign_probe};
use super::{Progress, Report, Run};
use crate::types::{KeyName, Lamports, PublicKey};

/// The scratch key the drill rotates (the one `keyward init --dev`
/// creates).
pub const DRILL_KEY: &str = "hot";

/// What the rotation drill needs.
pub struct RotationOptions<'a> {
    /// The `keyward` binary (for `keyward init --dev`).
    pub keyward: &'a Path,
    /// The keywardd binary for the scratch instance.
    pub keywardd: &'a Path,
    /// The scratch instance's directory (absolute, must not exist).
    pub instance: &'a Path,
}

fn admin<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    method: keyward_client::Method,
    path: &str,
    body: Option<&B>,
) -> Result<T, String> {
    let client = keyward_client::Client::new(socket);
    let (status, bytes) = rt
        .block_on(client.request_json(method, path, body))
        .map_err(|e| format!("{path}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{path}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: unexpected answer: {e}"))
}

fn key_version(keys: &[AdminKeyInfo], version: u32) -> Result<&AdminKeyInfo, String> {
    keys.iter()
        .find(|k| k.name == DRILL_KEY && k.version.unwrap_or(1) == version)
        .ok_or_else(|| format!("the scratch registry has no {DRILL_KEY}@{version}"))
}

/// Runs the rotation drill.
pub fn run(opts: &RotationOptions<'_>, progress: &dyn Progress) -> Report {
    let mut run = Run::new("rotation", false, progress);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            run.step::<()>("init", |_| Err(format!("no runtime: {e}")));
            return run.finish();
        }
    };
    let config = opts.instance.join("keyward.toml");
    run.step("init", |_| {
        let out = Command::new(opts.keyward)
            .arg("init")
            .arg("--dev")
            .arg(opts.instance)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", opts.keyward.display()))?;
        if !out.status.success() {
            return Err(format!(
                "keyward init --dev failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((
            (),
            format!("SoftHSM2 dev instance in {}", opts.instance.display()),
        ))
    });
    let daemon = run.step("start", |_| {
        let d = ScratchDaemon::start(opts.keywardd, &config, &opts.instance.join("keywardd.log"))?;
        Ok((d, "scratch keywardd serving".into()))
    });
    let Some(mut daemon) = daemon else {
        return run.finish();
    };
    let old = run.step("sign old", |_| {
        let keys: Vec<AdminKeyInfo> = admin::<(), _>(
            &rt,
            &daemon.admin_socket,
            keyward_client::Method::GET,
            "/v1/admin/keys",
            None,
        )?;
        let old = key_version(&keys, 1)?.clone();
        sign_probe(
            &rt,
            &daemon.agent_socket,
            "drill-before",
            DRILL_KEY,
            &old.public_key,
        )?;
        let note = format!("{DRILL_KEY}@1 {} signs", old.public_key);
        Ok((old, note))
    });
    let rotated = old.as_ref().and_then(|_| {
        run.step("rotate", |facts| {
            let r: KeyRotatedView = admin(
                &rt,
                &daemon.admin_socket,
                keyward_client::Method::POST,
                &format!("/v1/admin/keys/{DRILL_KEY}/rotate"),
                Some(&KeyRotateRequest {
                    reason: "rotation drill".into(),
                    grace_s: Some(0),
                    sweep: None,
                }),
            )?;
            facts.push(format!(
                "rotated {DRILL_KEY}: {} -> {} (key_rotated entry {})",
                r.old_public_key, r.new_public_key, r.ledger_seq
            ));
            let note = format!("version {} -> {}", r.old_version, r.new_version);
            Ok((r, note))
        })
    });
    if let (Some(old), Some(r)) = (&old, &rotated) {
        run.step("sign new", |_| {
            if r.new_public_key == old.public_key {
                return Err("the successor has the old public key".into());
            }
            sign_probe(
                &rt,
                &daemon.agent_socket,
                "drill-after",
                DRILL_KEY,
                &r.new_public_key,
            )?;
            Ok(((), format!("{DRILL_KEY} signs as {}", r.new_public_key)))
        });
        run.step("old refused", |_| {
            old_refused(&rt, &daemon, &old.public_key)
        });
        run.step("statement", |_| {
            let db = opts.instance.join("state").join("ledger.sqlite3");
            check_statement(&db, r, &old.public_key)
        });
        run.step("retire", |_| {
            let _: keyward_client::wire::KeyRetiredView = admin(
                &rt,
                &daemon.admin_socket,
                keyward_client::Method::POST,
                &format!("/v1/admin/keys/{DRILL_KEY}/retire"),
                Some(&KeyRetireRequest {
                    version: old.version.unwrap_or(1),
                    force: false,
                    reason: None,
                }),
            )?;
            Ok(((), format!("{DRILL_KEY}@1 destroyed (grace period 0)")))
        });
    }
    let labels = rotated.as_ref().and_then(|_| {
        let keys: Result<Vec<AdminKeyInfo>, String> = admin::<(), _>(
            &rt,
            &daemon.admin_socket,
            keyward_client::Method::GET,
            "/v1/admin/keys",
            None,
        );
        keys.ok().and_then(|keys| {
            let old = old.as_ref()?.hsm_label.clone()?;
            let new = key_version(&keys, 2).ok()?;
            Some((old, new.hsm_label.clone()?, new.public_key.clone()))
        })
    });
    run.step("stop", |_| {
        if daemon.stop() {
            Ok(((), "stopped cleanly".into()))
        } else {
            Err(format!(
                "the scratch keywardd did not stop cleanly: {}",
                super::scratch::log_tail(&daemon.log)
            ))
        }
    });
    if rotated.is_some() {
        run.step("hsm", |_| {
            let (old_label, new_label, new_pk) =
                labels.ok_or("the scratch registry does not list both versions' labels")?;
            let cfg = crate::config::Config::load(&config).map_err(|e| e.to_string())?;
            let hsm = crate::hsm::open(&cfg.hsm).map_err(|e| format!("the scratch HSM: {e}"))?;
            let name = |l: &str| KeyName::new(l).map_err(|e| format!("label {l}: {e}"));
            match hsm.find_ed25519(&name(&old_label)?) {
                Err(e) if e.code() == "key_not_found" => {}
                Err(e) => return Err(format!("looking for {old_label}: {e}")),
                Ok(_) => return Err(format!("the retired key {old_label} is still in the HSM")),
            }
            let current = hsm
                .find_ed25519(&name(&new_label)?)
                .map_err(|e| format!("the successor {new_label}: {e}"))?;
            if current.public_key.to_base58() != new_pk {
                return Err(format!("{new_label} in the HSM is not the registered key"));
            }
            Ok(((), format!("{old_label} gone, {new_label} present")))
        });
    }
    run.finish()
}

/// A message only the old key could sign (it pays and transfers) is
/// denied for the name, whose key is now the successor.
fn old_refused(
    rt: &tokio::runtime::Runtime,
    daemon: &ScratchDaemon,
    old: &str,
) -> Result<((), String), String> {
    use base64::Engine as _;
    let from = PublicKey::from_base58(old).ok_or("the old public key is not base58")?;
    let to = PublicKey(rand::random());
    let msg = crate::solana::build_sol_transfer(&from, &to, Lamports(1_000), rand::random(), None)
        .map_err(|e| e.to_string())?;
    let req = keyward_client::wire::IntentRequest {
        intent_id: "drill-old-key".into(),
        key: DRILL_KEY.into(),
        action: keyward_client::wire::Action::SignTransaction {
            message: base64::engine::general_purpose::STANDARD.encode(msg),
        },
    };
    let client = keyward_client::Client::new(&daemon.agent_socket);
    match rt.block_on(client.submit_intent(&req)) {
        Err(keyward_client::ClientError::Api { reasons, .. })
            if reasons.iter().any(|r| r.rule == "key_not_signer") =>
        {
            Ok(((), "denied: key_not_signer".into()))
        }
        other => Err(format!(
            "a message of the old key was not refused as key_not_signer: {other:?}"
        )),
    }
}

/// The `key_rotated` entry `r` names, in the ledger at `db`: it names the
/// old and new public keys and its transition statement verifies with both.
fn check_statement(db: &Path, r: &KeyRotatedView, old: &str) -> Result<((), String), String> {
    let conn = crate::ledger::open_read_only(db).map_err(|e| e.to_string())?;
    let payload: Vec<u8> = conn
        .query_row(
            "SELECT payload FROM ledger WHERE seq = ?1 AND event = 'key_rotated'",
            [i64::try_from(r.ledger_seq).map_err(|e| e.to_string())?],
            |row| row.get(0),
        )
        .map_err(|e| format!("the key_rotated entry {}: {e}", r.ledger_seq))?;
    let event: crate::ledger::events::KeyRotated = serde_json::from_slice(&payload)
        .map_err(|e| format!("the key_rotated entry is unreadable: {e}"))?;
    if event.old_public_key != old || event.new_public_key != r.new_public_key {
        return Err("the key_rotated entry names other keys".into());
    }
    crate::ledger::registry::verify_rotation(&event).map_err(|e| e.to_string())?;
    Ok(((), "verifies with the old and the new public key".into()))
}

/// What `keyward drill rotation --live KEY` is given: production's key
/// rotated through its admin socket.
pub struct LiveOptions<'a> {
    /// The production key to rotate.
    pub key: &'a str,
    /// Grace period of the old key (it is not retired by the drill).
    pub grace_s: u64,
    /// Production's ledger database (read-only).
    pub ledger: &'a Path,
}

/// The live rotation drill: rotates production's key `opts.key` through
/// `rotate` (production's `POST /v1/admin/keys/{name}/rotate`), verifies the
/// `key_rotated` entry in production's ledger with both public keys, and
/// checks through `keys` (`GET /v1/admin/keys`) that the name is served by
/// the successor and the old version is retiring. No sweep (the old
/// address's balances are the operator's to give: `keyward key sweep`) and
/// no retirement (after the grace period: `keyward key retire`).
pub fn run_live(
    opts: &LiveOptions<'_>,
    rotate: impl FnOnce(&KeyRotateRequest) -> Result<KeyRotatedView, String>,
    keys: impl FnOnce() -> Result<Vec<AdminKeyInfo>, String>,
    progress: &dyn Progress,
) -> Report {
    let mut run = Run::new("rotation", true, progress);
    let rotated = run.step("rotate", |facts| {
        let r = rotate(&KeyRotateRequest {
            reason: "rotation drill (live)".into(),
            grace_s: Some(opts.grace_s),
            sweep: None,
        })?;
        facts.push(format!(
            "rotated {}: {} -> {} (key_rotated entry {}); the old key is retiring until {}: sweep it (keyward key sweep) and retire it (keyward key retire {}@{})",
            r.name, r.old_public_key, r.new_public_key, r.ledger_seq, r.retire_after, r.name, r.old_version
        ));
        let note = format!("version {} -> {}", r.old_version, r.new_version);
        Ok((r, note))
    });
    if let Some(r) = &rotated {
        run.step("statement", |_| {
            check_statement(opts.ledger, r, &r.old_public_key)
        });
        run.step("registry", |_| {
            let keys = keys()?;
            let find = |v: u32| {
                keys.iter()
                    .find(|k| k.name == opts.key && k.version.unwrap_or(1) == v)
                    .ok_or_else(|| format!("the registry has no {}@{v}", opts.key))
            };
            let (old, new) = (find(r.old_version)?, find(r.new_version)?);
            if (old.state.as_str(), new.state.as_str()) != ("retiring", "active")
                || new.public_key != r.new_public_key
            {
                return Err(format!(
                    "{}@{} is {} and {}@{} is {}: expected retiring and active",
                    opts.key, r.old_version, old.state, opts.key, r.new_version, new.state
                ));
            }
            Ok(((), format!("{} served by {}", opts.key, new.public_key)))
        });
    }
    run.finish()
}
