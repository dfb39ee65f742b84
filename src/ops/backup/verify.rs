//! `keyward backup verify IN`: the manifest's signature under a trusted
//! audit key, every file's size and digest, no file more or less, and the
//! ledger snapshot's chain and checkpoints up to the manifest's head.
//! Reads only: nothing in IN is written.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use super::manifest::{KeyMaterial, MANIFEST, Manifest, Role, SIGNATURE, verify_signature};
use super::{BackupError, digest_file};
use crate::ledger::{HistoryReport, TrustedKey};

/// A backup that verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Its manifest.
    pub manifest: Manifest,
    /// What the ledger snapshot's verification found.
    pub history: HistoryReport,
    /// Whether the backup's own `audit.vkey` is the trusted key (it is
    /// never used to verify; a difference is worth a look).
    pub vkey_matches: bool,
}

/// Verifies the backup in `dir` against the `trusted` audit key.
pub fn verify(dir: &Path, trusted: &TrustedKey) -> Result<Verified, BackupError> {
    if !dir.is_dir() {
        return Err(BackupError::Config(format!(
            "{} is not a backup directory",
            dir.display()
        )));
    }
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| {
            BackupError::invalid(
                "backup_file_missing",
                name,
                format!("cannot read it in {}: {e}", dir.display()),
            )
        })
    };
    let bytes = read(MANIFEST)?;
    let sig = read(SIGNATURE)?;
    verify_signature(&sig, &bytes, trusted.vkey())?;
    let manifest = Manifest::parse(&bytes)?;
    check_files(dir, &manifest)?;
    let ledger = manifest
        .file(Role::Ledger)
        .map(|f| f.path.clone())
        .unwrap_or_default();
    let history = verify_ledger(&dir.join(&ledger), &ledger, &manifest, trusted)?;
    let vkey_matches = manifest
        .file(Role::AuditVkey)
        .and_then(|f| TrustedKey::from_file(&dir.join(&f.path)).ok())
        .is_some_and(|k| k.vkey() == trusted.vkey());
    Ok(Verified {
        manifest,
        history,
        vkey_matches,
    })
}

/// A manifest path: relative, `/`-separated plain names only.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && p.split('/').all(|s| !s.is_empty())
}

fn check_files(dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let bad = |code, file: &str, p: String| BackupError::invalid(code, file, p);
    let mut listed = BTreeSet::new();
    for f in &manifest.files {
        if !safe_path(&f.path) || f.path == MANIFEST || f.path == SIGNATURE {
            return Err(bad(
                "backup_manifest_invalid",
                MANIFEST,
                format!("lists an unsafe path {:?}", f.path),
            ));
        }
        if !listed.insert(f.path.clone()) {
            return Err(bad(
                "backup_manifest_invalid",
                MANIFEST,
                format!("lists {} twice", f.path),
            ));
        }
    }
    for role in [Role::Ledger, Role::Config, Role::Policy, Role::AuditVkey] {
        let n = manifest.files.iter().filter(|f| f.role == role).count();
        if n != 1 {
            return Err(bad(
                "backup_manifest_invalid",
                MANIFEST,
                format!("lists {n} files of role {role:?}; a backup has exactly one"),
            ));
        }
    }
    let tokens = manifest.files.iter().any(|f| f.role == Role::Token);
    if tokens != (manifest.instance.key_material == KeyMaterial::Softhsm2Token) {
        return Err(bad(
            "backup_manifest_invalid",
            MANIFEST,
            "its token files do not match its key_material".into(),
        ));
    }
    let wrapped = manifest.files.iter().any(|f| f.role == Role::Wrapped);
    if wrapped != (manifest.instance.key_material == KeyMaterial::YubihsmWrapped) {
        return Err(bad(
            "backup_manifest_invalid",
            MANIFEST,
            "its wrapped objects do not match its key_material".into(),
        ));
    }
    // Every file present is listed (or is the manifest or its signature).
    let mut present = BTreeSet::new();
    walk(dir, "", &mut present)?;
    for p in &present {
        if p != MANIFEST && p != SIGNATURE && !listed.contains(p) {
            return Err(bad(
                "backup_file_unlisted",
                p,
                "is not listed in the manifest; a backup holds nothing unsigned".into(),
            ));
        }
    }
    for f in &manifest.files {
        if !present.contains(&f.path) {
            return Err(bad(
                "backup_file_missing",
                &f.path,
                "is listed in the manifest but missing".into(),
            ));
        }
        let (digest, size) = digest_file(&dir.join(&f.path))?;
        if size != f.size || hex::encode(digest) != f.sha256 {
            return Err(bad(
                "backup_file_changed",
                &f.path,
                format!(
                    "is not the file the manifest lists ({size} bytes, SHA-256 {}; the manifest says {} bytes, {})",
                    hex::encode(digest),
                    f.size,
                    f.sha256
                ),
            ));
        }
    }
    Ok(())
}

/// Every regular file under `dir`, relative; anything else is a finding.
fn walk(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) -> Result<(), BackupError> {
    let entries = std::fs::read_dir(dir)
        .map_err(BackupError::io(format!("cannot read {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(BackupError::io(format!("cannot read {}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let ty = e.file_type().map_err(BackupError::io(format!(
            "cannot read {}",
            e.path().display()
        )))?;
        if ty.is_dir() {
            walk(&e.path(), &rel, out)?;
        } else if ty.is_file() {
            out.insert(rel);
        } else {
            return Err(BackupError::invalid(
                "backup_file_unlisted",
                rel,
                "is neither a regular file nor a directory",
            ));
        }
    }
    Ok(())
}

fn verify_ledger(
    path: &Path,
    name: &str,
    manifest: &Manifest,
    trusted: &TrustedKey,
) -> Result<HistoryReport, BackupError> {
    let broken = |p: String| BackupError::invalid("backup_ledger_broken", name, p);
    let history =
        crate::ledger::verify_history(path, trusted, &crate::ledger::Expectations::default())
            .map_err(|e| broken(format!("the ledger does not verify: {e}")))?;
    let conn = crate::ledger::open_read_only(path).map_err(|e| broken(e.to_string()))?;
    let findings = crate::ledger::payload_findings(&conn).map_err(|e| broken(e.to_string()))?;
    if let Some(f) = findings.first() {
        return Err(broken(format!(
            "entry {} ({}) does not read as its event type: {}",
            f.seq, f.event, f.problem
        )));
    }
    let head = (history.chain.head_seq, hex::encode(history.chain.head_hash));
    if head != (manifest.ledger.seq, manifest.ledger.hash.clone()) {
        return Err(BackupError::invalid(
            "backup_head_mismatch",
            name,
            format!(
                "its head is entry {} ({}), but the manifest covers entry {} ({})",
                head.0, head.1, manifest.ledger.seq, manifest.ledger.hash
            ),
        ));
    }
    Ok(history)
}
