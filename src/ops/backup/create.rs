//! `keyward backup create OUT`, while keywardd runs.
//!
//! Order matters: the token first, then the ledger. The HSM keeps the
//! newest checkpoint as a mark that a start refuses to run behind; taken
//! first, the token's mark can never be ahead of the backed-up ledger.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use keyward_client::wire::{BackupSignRequest, BackupSigned};
use rusqlite::OptionalExtension;

use super::manifest::{
    FORMAT, FileEntry, InstanceInfo, KeyMaterial, LedgerHead, MANIFEST, Manifest, Role, SIGNATURE,
    manifest_digest, signature_text, verify_signature,
};
use super::{BackupError, digest_file, token};
use crate::config::{Config, HsmBackendConfig};
use crate::ledger::TrustedKey;

/// Paths of the fixed files inside a backup.
pub(super) const LEDGER_FILE: &str = "ledger/ledger.sqlite3";
pub(super) const CONFIG_FILE: &str = "config/keyward.toml";
pub(super) const POLICY_FILE: &str = "config/policy.toml";
pub(super) const VKEY_FILE: &str = "config/audit.vkey";
pub(super) const TOKEN_DIR: &str = "token";

/// What `backup create` is given besides the configuration.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The backup directory to create (must not exist).
    pub out: PathBuf,
    /// YubiHSM 2: the admin authentication key's credential file
    /// (`AUTH_KEY_ID:PASSWORD`) whose session exports the objects under
    /// wrap; never keywardd's own.
    pub admin_credential: Option<PathBuf>,
    /// YubiHSM 2: the wrap key's object id.
    pub wrap_key: u16,
}

/// A backup that was written.
#[derive(Debug, Clone)]
pub struct Created {
    /// Its directory.
    pub out: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Sequence number of the `backup_created` entry keywardd recorded.
    pub backup_seq: u64,
}

/// Removes a half-written backup unless disarmed.
struct TmpDir(Option<PathBuf>);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Writes a backup of the instance `cfg` describes into `opts.out`.
/// `sign` asks the running keywardd to sign the manifest
/// (`POST /v1/admin/backups/sign`); its signature must verify under the
/// audit key pinned on this instance before anything is kept. The backup is
/// written in `OUT.tmp-XXXXXXXX` and renamed to OUT only when complete.
pub fn create(
    cfg: &Config,
    opts: &CreateOptions,
    sign: impl FnOnce(&BackupSignRequest) -> Result<BackupSigned, String>,
) -> Result<Created, BackupError> {
    let out = &opts.out;
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(BackupError::TargetExists(out.clone()));
    }
    let no_admin = || {
        BackupError::YubiHsmUnsupported(
            "backup exports the keys under wrap through the admin authentication key",
        )
    };
    let token_dir = match &cfg.hsm.backend {
        HsmBackendConfig::Pkcs11(_) => token::find_softhsm_token(cfg)?,
        HsmBackendConfig::YubiHsm(_) if opts.admin_credential.is_none() => return Err(no_admin()),
        HsmBackendConfig::YubiHsm(_) => None,
    };
    let vkey_path = cfg.audit_vkey_path();
    let trusted = TrustedKey::from_file(&vkey_path).map_err(BackupError::NoTrustedKey)?;
    let tmp = super::sibling_dir(out, |name, random| format!("{name}.tmp-{random}"))?;
    let mut guard = TmpDir(Some(tmp.clone()));

    let mut files = Vec::new();
    let mut exported_labels = None;
    let key_material = match (&cfg.hsm.backend, &token_dir) {
        (HsmBackendConfig::YubiHsm(y), _) => {
            let admin_credential = opts.admin_credential.as_deref().ok_or_else(no_admin)?;
            let labels = registry_labels(
                &crate::ledger::open_read_only(&cfg.ledger_path())
                    .map_err(|e| BackupError::Ledger(e.to_string()))?,
            )?;
            let admin = super::AdminSession::open(y, None, admin_credential)?;
            for rel in super::wrapped::export(&admin, y, opts.wrap_key, &labels, &tmp)? {
                files.push(entry(&tmp, &rel, Role::Wrapped)?);
            }
            exported_labels = Some(labels);
            KeyMaterial::YubihsmWrapped
        }
        (HsmBackendConfig::Pkcs11(_), Some(src)) => {
            let uuid = src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "token".into());
            let rel = format!("{TOKEN_DIR}/{uuid}");
            for (file, digest, size) in token::copy_token(src, &tmp.join(&rel))? {
                files.push(FileEntry {
                    path: format!("{rel}/{file}"),
                    role: Role::Token,
                    size,
                    sha256: hex::encode(digest),
                });
            }
            KeyMaterial::Softhsm2Token
        }
        (HsmBackendConfig::Pkcs11(_), None) => KeyMaterial::Vendor,
    };
    let head = snapshot_ledger(&cfg.ledger_path(), &tmp.join(LEDGER_FILE))?;
    if let Some(exported) = &exported_labels {
        // A key registered while the objects were exported is in the
        // snapshot but not in the backup: refused, not restored without it.
        let conn = rusqlite::Connection::open_with_flags(
            tmp.join(LEDGER_FILE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| BackupError::Ledger(e.to_string()))?;
        if let Some(missing) = registry_labels(&conn)?
            .into_iter()
            .find(|l| !exported.contains(l))
        {
            return Err(BackupError::Device(format!(
                "key {missing:?} was registered while the backup was taken; nothing was written, run it again"
            )));
        }
    }
    files.push(entry(&tmp, LEDGER_FILE, Role::Ledger)?);
    for (src, rel, role) in [
        (&cfg.file, CONFIG_FILE, Role::Config),
        (&cfg.daemon.policy, POLICY_FILE, Role::Policy),
        (&vkey_path, VKEY_FILE, Role::AuditVkey),
    ] {
        mkdirs(&tmp.join(rel))?;
        copy_new(src, &tmp.join(rel), 0o600)?;
        files.push(entry(&tmp, rel, role)?);
    }
    let (token_label, secrets, wrap_key, module) = match &cfg.hsm.backend {
        HsmBackendConfig::Pkcs11(p) => (
            p.token_label.clone(),
            vec![p.pin_file.clone()],
            None,
            p.module.display().to_string(),
        ),
        HsmBackendConfig::YubiHsm(y) => (
            y.connector.to_string(),
            vec![y.credential_file.clone()]
                .into_iter()
                .chain(opts.admin_credential.clone())
                .collect(),
            Some(opts.wrap_key),
            String::new(),
        ),
    };
    for secret in &secrets {
        refuse_pin(&tmp, secret)?;
    }
    let note = match key_material {
        KeyMaterial::Vendor => Some(format!(
            "no key material: the keys of token {token_label:?} in {module} must be backed up with the HSM vendor's own tools"
        )),
        KeyMaterial::YubihsmWrapped => Some(format!(
            "the keys are wrapped under wrap key {:#06x}: restore needs a YubiHSM 2 provisioned with that wrap key \
             and its admin credential (neither is in this backup)",
            opts.wrap_key
        )),
        KeyMaterial::Softhsm2Token => None,
    };
    let manifest = Manifest {
        format: FORMAT,
        created_at: crate::ledger::format_utc(crate::ledger::now_ms()),
        keyward_version: env!("CARGO_PKG_VERSION").to_owned(),
        instance: InstanceInfo {
            backend: cfg.hsm.backend_name().to_owned(),
            token_label,
            origin: cfg
                .ledger
                .origin
                .clone()
                .unwrap_or_else(|| format!("keyward/{}", cfg.hsm.device_label())),
            key_material,
            note,
            wrap_key,
        },
        ledger: head,
        files,
    };
    let bytes = manifest.to_bytes();
    let digest = manifest_digest(&bytes);
    let signed = sign(&BackupSignRequest {
        manifest_sha256: hex::encode(digest),
        ledger_seq: manifest.ledger.seq,
        ledger_hash: manifest.ledger.hash.clone(),
        files: manifest.files.len() as u64,
    })
    .map_err(BackupError::Sign)?;
    let sig = decode_sig(&signed.signature).ok_or_else(|| {
        BackupError::Sign(
            "keywardd answered with a signature that is not 64 bytes of base64".into(),
        )
    })?;
    let sig_text = signature_text(&sig);
    verify_signature(sig_text.as_bytes(), &bytes, trusted.vkey()).map_err(|e| {
        BackupError::Sign(format!(
            "keywardd's signature does not verify under the pinned audit key ({}): {e}",
            vkey_path.display()
        ))
    })?;
    write_new(&tmp.join(MANIFEST), &bytes)?;
    write_new(&tmp.join(SIGNATURE), sig_text.as_bytes())?;
    sync_tree(&tmp)?;
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &tmp,
        nix::fcntl::AT_FDCWD,
        out,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| match e {
        nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY => {
            BackupError::TargetExists(out.clone())
        }
        e => BackupError::Io {
            what: format!("cannot rename {} to {}", tmp.display(), out.display()),
            source: e.into(),
        },
    })?;
    guard.0 = None;
    sync_dir(&super::parent_dir(out))?;
    Ok(Created {
        out: out.clone(),
        manifest,
        backup_seq: signed.ledger_seq,
    })
}

/// The HSM labels of the registry's keys that are not retired.
fn registry_labels(conn: &rusqlite::Connection) -> Result<Vec<String>, BackupError> {
    use crate::ledger::registry::{self, KeyState};
    let mut labels: Vec<String> = registry::all(conn)
        .map_err(|e| BackupError::Ledger(e.to_string()))?
        .into_iter()
        .filter(|k| k.state != KeyState::Retired)
        .map(|k| k.hsm_label)
        .collect();
    labels.sort();
    labels.dedup();
    Ok(labels)
}

fn decode_sig(text: &str) -> Option<[u8; 64]> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
}

/// A consistent copy of the ledger at `src` (read-only, one read
/// transaction of SQLite's online backup API), in rollback-journal mode so
/// that the file stands alone; returns the copy's head, read from the copy.
fn snapshot_ledger(src: &Path, dst: &Path) -> Result<LedgerHead, BackupError> {
    let sql = |e: rusqlite::Error| BackupError::Ledger(e.to_string());
    mkdirs(dst)?;
    write_new(dst, b"")?;
    let from =
        crate::ledger::open_read_only(src).map_err(|e| BackupError::Ledger(e.to_string()))?;
    let mut to = rusqlite::Connection::open(dst).map_err(sql)?;
    {
        let backup = rusqlite::backup::Backup::new(&from, &mut to).map_err(sql)?;
        let mut waits = 0;
        loop {
            // -1: every page in one step, under one read transaction of
            // the source: a consistent snapshot however busy the writer is.
            match backup.step(-1).map_err(sql)? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => {}
                _ if waits < 100 => {
                    waits += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => return Err(BackupError::Ledger("the ledger stayed locked".into())),
            }
        }
    }
    drop(from);
    to.execute_batch("PRAGMA journal_mode = DELETE;")
        .map_err(sql)?;
    let head: Option<(i64, Vec<u8>)> = to
        .query_row(
            "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql)?;
    to.close().map_err(|(_, e)| sql(e))?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = dst.as_os_str().to_owned();
        p.push(suffix);
        if Path::new(&p).exists() {
            return Err(BackupError::Ledger(format!(
                "{} was left beside the snapshot",
                Path::new(&p).display()
            )));
        }
    }
    let (seq, hash) = match head {
        Some((seq, hash)) => (
            u64::try_from(seq).map_err(|_| BackupError::Ledger("negative head".into()))?,
            hash,
        ),
        None => (0, vec![0; 32]),
    };
    Ok(LedgerHead {
        seq,
        hash: hex::encode(hash),
    })
}

/// A guard: no file under `root` may hold the PIN that `pin_file` names.
/// When this process cannot read the PIN (a systemd credential outside
/// the unit), there is nothing to compare with and the check is skipped:
/// the backup's contents are chosen so that it never holds one.
fn refuse_pin(root: &Path, pin_file: &Path) -> Result<(), BackupError> {
    use secrecy::ExposeSecret as _;
    let Ok(pin) = crate::hsm::pin::read_pin(pin_file) else {
        return Ok(());
    };
    let pin = pin.expose_secret().as_bytes();
    if pin.is_empty() {
        return Ok(());
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(BackupError::io(format!("cannot read {}", dir.display())))?;
        for e in entries.flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
                continue;
            }
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(&path)
                    .map_err(BackupError::io(format!("cannot read {}", path.display())))?,
            );
            if bytes.windows(pin.len()).any(|w| w == pin) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                return Err(BackupError::HoldsPin(rel.display().to_string()));
            }
        }
    }
    Ok(())
}

fn entry(root: &Path, rel: &str, role: Role) -> Result<FileEntry, BackupError> {
    let (digest, size) = digest_file(&root.join(rel))?;
    Ok(FileEntry {
        path: rel.to_owned(),
        role,
        size,
        sha256: hex::encode(digest),
    })
}

/// Creates the parent directories of `file` (0700).
pub(super) fn mkdirs(file: &Path) -> Result<(), BackupError> {
    if let Some(dir) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(BackupError::io(format!("cannot create {}", dir.display())))?;
    }
    Ok(())
}

/// Copies `src` to the new file `dst` with `mode`, synced.
pub(super) fn copy_new(src: &Path, dst: &Path, mode: u32) -> Result<(), BackupError> {
    let mut from = std::fs::File::open(src)
        .map_err(BackupError::io(format!("cannot read {}", src.display())))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)
        .map_err(BackupError::io(format!("cannot create {}", dst.display())))?;
    std::io::copy(&mut from, &mut to).map_err(BackupError::io(format!(
        "cannot copy {} to {}",
        src.display(),
        dst.display()
    )))?;
    to.sync_all()
        .map_err(BackupError::io(format!("cannot sync {}", dst.display())))
}

/// Writes the new file `path` (0600), synced.
pub(super) fn write_new(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(BackupError::io(format!("cannot create {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(BackupError::io(format!("cannot write {}", path.display())))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BackupError::io(format!("cannot sync {}", dir.display())))
}

/// Syncs every directory under `root` (files were synced when written).
pub(super) fn sync_tree(root: &Path) -> Result<(), BackupError> {
    let entries = std::fs::read_dir(root)
        .map_err(BackupError::io(format!("cannot read {}", root.display())))?;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            sync_tree(&e.path())?;
        }
    }
    sync_dir(root)
}
