//! `keyward backup restore IN --to DIR`: a fresh instance in DIR built from
//! a backup that verified first (nothing is written otherwise).
//!
//! DIR gets `keyward.toml` with every path rewritten into DIR (sockets,
//! state, policy, pinned key, SoftHSM2's configuration), `policy.toml`,
//! `audit.vkey` (the key the backup was verified with, not the copy inside
//! it), `state/ledger.sqlite3`, and for SoftHSM2 `softhsm2.conf` with the
//! token under `tokens/`. The PIN is not in the backup: `--pin-file` names
//! the file keywardd will read it from (the restored config points at it;
//! nothing is copied). The `[mirror]` section is dropped unless
//! `--keep-mirror`: a restore (a drill) must never ship entries to the
//! production instance's mirror.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::BackupError;
use super::create::{CONFIG_FILE, POLICY_FILE, TOKEN_DIR, copy_new, mkdirs, sync_tree, write_new};
use super::manifest::Manifest;
use super::manifest::{KeyMaterial, Role};
use super::verify::{Verified, verify};
use crate::config::Config;
use crate::ledger::TrustedKey;

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new instance's directory (absolute; new or empty).
    pub to: PathBuf,
    /// The file keywardd reads the PIN from; absent: the backed-up
    /// config's `pin_file` stays (e.g. a systemd credential name).
    pub pin_file: Option<PathBuf>,
    /// Keep the `[mirror]` section (only when this instance replaces the
    /// one the backup was taken from).
    pub keep_mirror: bool,
    /// A YubiHSM 2 backup: the replacement device to import its wrapped
    /// objects into.
    pub yubihsm: Option<YubiHsmTarget>,
}

/// The replacement YubiHSM 2 of a restore, provisioned with the backed-up
/// device's wrap key (same id, same key).
#[derive(Debug, Clone)]
pub struct YubiHsmTarget {
    /// Its connector (`http://127.0.0.1:12345` or `usb`), written into the
    /// restored configuration; absent: the backed-up one.
    pub connector: Option<String>,
    /// Its admin authentication key's credential file (`ID:PASSWORD`),
    /// which imports the objects; never written anywhere.
    pub admin_credential: PathBuf,
    /// The wrap key's object id (default: the manifest's).
    pub wrap_key: Option<u16>,
}

/// A restored instance.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Its `keyward.toml`.
    pub config: PathBuf,
    /// The backup's verification.
    pub verified: Verified,
    /// What the operator must do next, in order.
    pub next_steps: Vec<String>,
}

/// Verifies the backup in `backup` against `trusted`, then builds a fresh
/// instance from it in `opts.to`.
pub fn restore(
    backup: &Path,
    trusted: &TrustedKey,
    opts: &RestoreOptions,
) -> Result<Restored, BackupError> {
    let dir = &opts.to;
    if !dir.is_absolute() {
        return Err(BackupError::Config(format!(
            "--to {} must be an absolute path",
            dir.display()
        )));
    }
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(BackupError::TargetNotEmpty(dir.clone()));
        }
    } else if std::fs::symlink_metadata(dir).is_ok() {
        return Err(BackupError::TargetNotEmpty(dir.clone()));
    }
    if let Some(pin) = &opts.pin_file
        && (!pin.is_absolute() || !pin.is_file())
    {
        return Err(BackupError::Config(format!(
            "--pin-file {} must be an absolute path to an existing file",
            pin.display()
        )));
    }
    let verified = verify(backup, trusted)?;
    let manifest = &verified.manifest;
    let softhsm = manifest.instance.key_material == KeyMaterial::Softhsm2Token;
    let wrapped = manifest.instance.key_material == KeyMaterial::YubihsmWrapped;
    if wrapped && opts.yubihsm.is_none() {
        return Err(BackupError::YubiHsmUnsupported(
            "restore imports the wrapped keys into the replacement device (--connector) through its admin authentication key",
        ));
    }
    let config_bytes = std::fs::read(backup.join(CONFIG_FILE))
        .map_err(BackupError::io(format!("cannot read {CONFIG_FILE}")))?;
    same_as_listed(manifest, CONFIG_FILE, &config_bytes)?;
    let config_text = String::from_utf8(config_bytes).map_err(|_| {
        BackupError::invalid("backup_file_changed", CONFIG_FILE, "is not UTF-8 text")
    })?;
    let (text, pin_note) = rewrite_config(&config_text, dir, opts, softhsm)?;
    let config_path = dir.join("keyward.toml");
    let restored_cfg = Config::parse(&config_path, &text)
        .map_err(|e| BackupError::Config(format!("the rewritten configuration is invalid: {e}")))?;

    let tmp = super::sibling_dir(dir, |name, random| format!(".{name}.restore-{random}"))?;
    let built =
        build(backup, &tmp, dir, &verified, &text, trusted, softhsm).and_then(|()| {
            match (&opts.yubihsm, &restored_cfg.hsm.backend) {
                (Some(target), crate::config::HsmBackendConfig::YubiHsm(y)) if wrapped => {
                    import_wrapped(backup, &tmp, manifest, y, target).map(|_| ())
                }
                _ => Ok(()),
            }
        });
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Over a missing or empty DIR (rename(2) replaces an empty directory).
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(BackupError::Io {
            what: format!("cannot move the restored instance to {}", dir.display()),
            source: e,
        });
    }
    super::create::sync_dir(&super::parent_dir(dir))?;

    let mut next_steps = Vec::new();
    if wrapped {
        next_steps.push(
            "the keys were imported into the replacement YubiHSM 2 and checked against the ledger's registry; keywardd checks the audit key against audit.vkey when it starts"
                .into(),
        );
    } else if !softhsm {
        next_steps.push(format!(
            "THIS BACKUP HOLDS NO KEY MATERIAL: restore the keys of token {:?} with the HSM vendor's own backup before anything else",
            manifest.instance.token_label
        ));
    }
    next_steps.push(pin_note);
    next_steps.push(format!(
        "if keywardd runs as its own user: chown -R keyward:keyward {}",
        dir.display()
    ));
    next_steps.push(format!(
        "start it: keywardd --config {}",
        config_path.display()
    ));
    next_steps.push(format!(
        "check it: keyward doctor --config {0} and keyward audit verify --config {0}",
        config_path.display()
    ));
    if !opts.keep_mirror {
        next_steps.push(
            "the [mirror] section was dropped: add it back only when this instance replaces the one backed up"
                .into(),
        );
    }
    Ok(Restored {
        config: config_path,
        verified,
        next_steps,
    })
}

/// Writes the instance into `tmp` (renamed to `dir` afterwards).
fn build(
    backup: &Path,
    tmp: &Path,
    dir: &Path,
    verified: &Verified,
    config_text: &str,
    trusted: &TrustedKey,
    softhsm: bool,
) -> Result<(), BackupError> {
    let manifest = &verified.manifest;
    write_new(&tmp.join("keyward.toml"), config_text.as_bytes())?;
    copy_checked(backup, POLICY_FILE, &tmp.join("policy.toml"), manifest)?;
    // The key this backup was verified with, never the copy inside it.
    write_new(
        &tmp.join("audit.vkey"),
        TrustedKey::file_text(trusted.vkey()).as_bytes(),
    )?;
    std::fs::set_permissions(
        tmp.join("audit.vkey"),
        std::fs::Permissions::from_mode(0o444),
    )
    .map_err(BackupError::io("cannot make audit.vkey read-only"))?;
    let ledger = manifest.file(Role::Ledger).ok_or_else(|| {
        BackupError::invalid("backup_manifest_invalid", super::MANIFEST, "no ledger")
    })?;
    let db = tmp.join("state").join("ledger.sqlite3");
    mkdirs(&db)?;
    copy_checked(backup, &ledger.path, &db, manifest)?;
    if softhsm {
        let tokens = tmp.join("tokens");
        for f in manifest.files.iter().filter(|f| f.role == Role::Token) {
            let rest = f
                .path
                .strip_prefix(&format!("{TOKEN_DIR}/"))
                .ok_or_else(|| {
                    BackupError::invalid(
                        "backup_manifest_invalid",
                        super::MANIFEST,
                        format!("token file {} is outside {TOKEN_DIR}/", f.path),
                    )
                })?;
            let to = tokens.join(rest);
            mkdirs(&to)?;
            copy_checked(backup, &f.path, &to, manifest)?;
        }
        let conf =
            crate::hsm::softhsm::conf_text("a restored keyward instance", &dir.join("tokens"));
        write_new(&tmp.join("softhsm2.conf"), conf.as_bytes())?;
    }
    sync_tree(tmp)
}

/// Imports the backup's wrapped objects into the replacement device and
/// checks every key the restored registry names (not retired) against it.
fn import_wrapped(
    backup: &Path,
    tmp: &Path,
    manifest: &Manifest,
    y: &crate::config::YubiHsmBackendConfig,
    target: &YubiHsmTarget,
) -> Result<usize, BackupError> {
    use crate::ledger::registry::{self, KeyState};
    let wrap_key = target
        .wrap_key
        .or(manifest.instance.wrap_key)
        .unwrap_or(super::DEFAULT_WRAP_KEY);
    let conn = rusqlite::Connection::open_with_flags(
        tmp.join("state").join("ledger.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .map_err(|e| BackupError::Ledger(e.to_string()))?;
    let mut expected = Vec::new();
    for k in registry::all(&conn).map_err(|e| BackupError::Ledger(e.to_string()))? {
        if k.state == KeyState::Retired {
            continue;
        }
        let pk = bs58::decode(&k.public_key)
            .into_vec()
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                BackupError::Ledger(format!(
                    "the registry's public key of {} is not 32 bytes of base58",
                    k.versioned_name()
                ))
            })?;
        expected.push((k.hsm_label, pk));
    }
    drop(conn);
    let files: Vec<String> = manifest
        .files
        .iter()
        .filter(|f| f.role == Role::Wrapped)
        .map(|f| f.path.clone())
        .collect();
    let admin = super::AdminSession::open(y, None, &target.admin_credential)?;
    super::wrapped::import(&admin, wrap_key, backup, &files, &expected)
}

/// Whether `bytes` are the file `rel` as the manifest lists it.
fn same_as_listed(manifest: &Manifest, rel: &str, bytes: &[u8]) -> Result<(), BackupError> {
    use sha2::{Digest, Sha256};
    let listed = manifest.files.iter().find(|f| f.path == rel);
    match listed {
        Some(f)
            if f.size == bytes.len() as u64 && hex::encode(Sha256::digest(bytes)) == f.sha256 =>
        {
            Ok(())
        }
        _ => Err(BackupError::invalid(
            "backup_file_changed",
            rel,
            "changed after it was verified",
        )),
    }
}

/// Copies the backup's file `rel` to `to` (0600) and checks the copy
/// against the manifest: the backup may change between its verification
/// and the copy.
fn copy_checked(
    backup: &Path,
    rel: &str,
    to: &Path,
    manifest: &Manifest,
) -> Result<(), BackupError> {
    copy_new(&backup.join(rel), to, 0o600)?;
    let (digest, size) = super::digest_file(to)?;
    match manifest.files.iter().find(|f| f.path == rel) {
        Some(f) if f.size == size && hex::encode(digest) == f.sha256 => Ok(()),
        _ => Err(BackupError::invalid(
            "backup_file_changed",
            rel,
            "changed after it was verified",
        )),
    }
}

/// The backed-up `keyward.toml` with every path moved into `dir`; also the
/// next step about the PIN.
fn rewrite_config(
    text: &str,
    dir: &Path,
    opts: &RestoreOptions,
    softhsm: bool,
) -> Result<(String, String), BackupError> {
    use toml::Value;
    let bad = |p: String| BackupError::Config(format!("{CONFIG_FILE}: {p}"));
    let mut root: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let path = |p: PathBuf| Value::String(p.display().to_string());
    let table = |root: &mut toml::Table, name: &str| -> Result<toml::Table, BackupError> {
        match root.remove(name) {
            None => Ok(toml::Table::new()),
            Some(Value::Table(t)) => Ok(t),
            Some(_) => Err(bad(format!("[{name}] is not a table"))),
        }
    };
    let mut daemon = table(&mut root, "daemon")?;
    daemon.insert("agent_socket".into(), path(dir.join("agent.sock")));
    daemon.insert("admin_socket".into(), path(dir.join("admin.sock")));
    daemon.insert("state_dir".into(), path(dir.join("state")));
    daemon.insert("policy".into(), path(dir.join("policy.toml")));
    root.insert("daemon".into(), Value::Table(daemon));

    let mut ledger = table(&mut root, "ledger")?;
    ledger.insert(
        "path".into(),
        path(dir.join("state").join("ledger.sqlite3")),
    );
    ledger.insert("audit_vkey".into(), path(dir.join("audit.vkey")));
    root.insert("ledger".into(), Value::Table(ledger));

    let mut hsm = table(&mut root, "hsm")?;
    if softhsm {
        let mut env = match hsm.remove("env") {
            None => toml::Table::new(),
            Some(Value::Table(t)) => t,
            Some(_) => return Err(bad("hsm.env is not a table".into())),
        };
        env.insert("SOFTHSM2_CONF".into(), path(dir.join("softhsm2.conf")));
        hsm.insert("env".into(), Value::Table(env));
    }
    let yubihsm = hsm.get("backend").and_then(Value::as_str) == Some("yubihsm");
    let pin_key = if yubihsm {
        "credential_file"
    } else {
        "pin_file"
    };
    if let Some(connector) = opts.yubihsm.as_ref().and_then(|t| t.connector.as_ref()) {
        hsm.insert("connector".into(), Value::String(connector.clone()));
    }
    let pin_note = match &opts.pin_file {
        Some(pin) => {
            hsm.insert(pin_key.into(), path(pin.clone()));
            format!(
                "the PIN is not in the backup: keywardd reads it from {} (keep it 0400, owned by keywardd's user)",
                pin.display()
            )
        }
        None => format!(
            "the PIN is not in the backup: provide it as {pin_key} {} names (a relative name is a systemd credential, LoadCredential=)",
            hsm.get(pin_key)
                .and_then(Value::as_str)
                .unwrap_or("(unset)")
        ),
    };
    root.insert("hsm".into(), Value::Table(hsm));

    if opts.keep_mirror {
        if let Some(Value::Table(m)) = root.get_mut("mirror") {
            // Its acknowledgements belong to the old state directory.
            m.remove("ack_dir");
        }
    } else {
        root.remove("mirror");
    }
    let body = toml::to_string(&root).map_err(|e| bad(e.to_string()))?;
    Ok((
        format!(
            "# keyward instance restored by `keyward backup restore` into {}.\n\n{body}",
            dir.display()
        ),
        pin_note,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ORIGINAL: &str = r#"
[daemon]
agent_socket = "/run/keyward/agent.sock"
admin_socket = "/run/keyward/admin.sock"
state_dir = "/var/lib/keyward"
policy = "/etc/keyward/policy.toml"
agent_socket_group = "keyward-agents"

[hsm]
backend = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "keyward"
pin_file = "pin"
env = { SOFTHSM2_CONF = "/etc/softhsm/softhsm2.conf" }

[ledger]
path = "/var/lib/keyward/ledger.sqlite3"
checkpoint_every = 500

[mirror]
file = "/var/log/keyward/ledger.jsonl"
"#;

    fn opts(keep_mirror: bool) -> RestoreOptions {
        RestoreOptions {
            to: PathBuf::from("/srv/restored"),
            pin_file: Some(PathBuf::from("/root/pin")),
            keep_mirror,
            yubihsm: None,
        }
    }

    #[test]
    fn every_path_moves_into_the_new_directory_and_the_mirror_is_dropped() {
        let dir = Path::new("/srv/restored");
        let (text, note) = rewrite_config(ORIGINAL, dir, &opts(false), true).unwrap();
        let cfg = Config::parse(&dir.join("keyward.toml"), &text).unwrap();
        assert_eq!(cfg.daemon.agent_socket, dir.join("agent.sock"));
        assert_eq!(cfg.daemon.admin_socket, dir.join("admin.sock"));
        assert_eq!(cfg.daemon.state_dir, dir.join("state"));
        assert_eq!(cfg.daemon.policy, dir.join("policy.toml"));
        assert_eq!(cfg.ledger_path(), dir.join("state/ledger.sqlite3"));
        assert_eq!(cfg.audit_vkey_path(), dir.join("audit.vkey"));
        assert_eq!(
            cfg.hsm.env.get("SOFTHSM2_CONF").map(String::as_str),
            Some("/srv/restored/softhsm2.conf")
        );
        assert_eq!(
            cfg.hsm.pkcs11().unwrap().pin_file,
            PathBuf::from("/root/pin")
        );
        assert_eq!(cfg.ledger.checkpoint_every, 500, "other settings stay");
        assert_eq!(
            cfg.daemon.agent_socket_group.as_deref(),
            Some("keyward-agents")
        );
        assert!(
            cfg.mirror.is_none(),
            "a restore never ships to the old mirror"
        );
        assert!(note.contains("/root/pin"));
        let (text, _) = rewrite_config(ORIGINAL, dir, &opts(true), true).unwrap();
        let cfg = Config::parse(&dir.join("keyward.toml"), &text).unwrap();
        assert_eq!(
            cfg.mirror.unwrap().ack_dir,
            Some(dir.join("state").join("mirror"))
        );
    }

    #[test]
    fn a_yubihsm_restore_points_at_the_replacement_device_and_its_credential() {
        let original = r#"
[daemon]
agent_socket = "/run/keyward/agent.sock"
admin_socket = "/run/keyward/admin.sock"
state_dir = "/var/lib/keyward"
policy = "/etc/keyward/policy.toml"

[hsm]
backend = "yubihsm"
connector = "http://127.0.0.1:12345"
credential_file = "yubihsm-signer"
exportable_under_wrap = true
"#;
        let dir = Path::new("/srv/restored");
        let mut o = opts(false);
        o.pin_file = Some(PathBuf::from("/root/yubihsm-signer"));
        o.yubihsm = Some(YubiHsmTarget {
            connector: Some("http://127.0.0.1:23456".into()),
            admin_credential: PathBuf::from("/root/yubihsm-admin"),
            wrap_key: None,
        });
        let (text, note) = rewrite_config(original, dir, &o, false).unwrap();
        assert!(
            !text.contains("yubihsm-admin"),
            "never the admin credential"
        );
        let cfg = Config::parse(&dir.join("keyward.toml"), &text).unwrap();
        let crate::config::HsmBackendConfig::YubiHsm(y) = &cfg.hsm.backend else {
            panic!("not yubihsm: {text}");
        };
        assert_eq!(y.connector.to_string(), "http://127.0.0.1:23456");
        assert_eq!(y.credential_file, PathBuf::from("/root/yubihsm-signer"));
        assert!(y.exportable_under_wrap, "other settings stay");
        assert!(note.contains("/root/yubihsm-signer"));
        // Without a replacement connector, the backed-up one stays.
        o.yubihsm = None;
        let (text, _) = rewrite_config(original, dir, &o, false).unwrap();
        assert!(text.contains("http://127.0.0.1:12345"), "{text}");
    }
}
