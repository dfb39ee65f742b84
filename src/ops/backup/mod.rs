//! `keyward backup create | verify | restore`: a signed, self-checking copy
//! of an instance taken while keywardd runs, and a fresh instance built
//! from it.
//!
//! A backup is a directory:
//!
//! ```text
//! manifest.json          what is in it (manifest::Manifest), with SHA-256 digests
//! manifest.sig           the audit key's signature over the manifest (base64)
//! token/<uuid>/...       SoftHSM2's token directory (encrypted under the PINs)
//! hsm/TYPE-ID.wrap       or a YubiHSM 2's objects, exported under its wrap key
//! ledger/ledger.sqlite3  a consistent snapshot of the ledger (SQLite online backup)
//! config/keyward.toml    the configuration
//! config/policy.toml     the policy
//! config/audit.vkey      the pinned audit verifier key (informative only)
//! ```
//!
//! It never holds the PIN (or any credential file): the backup alone cannot
//! sign. The approver registry is in the ledger and the approvers' keys are
//! in the token.
//!
//! Trust: a backup is verified only against an audit verifier key from
//! outside it (the instance's pinned key, or `--vkey FILE`), never against
//! the `audit.vkey` it carries.

mod create;
mod manifest;
mod restore;
mod token;
mod verify;
mod wrapped;

use std::path::PathBuf;

pub use create::{CreateOptions, Created, create};
pub use manifest::{
    FileEntry, InstanceInfo, KeyMaterial, LedgerHead, MANIFEST, Manifest, Role, SIGNATURE,
    SIGNING_DOMAIN, signed_message,
};
pub use restore::{RestoreOptions, Restored, YubiHsmTarget, restore};
pub use token::find_softhsm_token;
pub use verify::{Verified, verify};
pub use wrapped::{AdminSession, DEFAULT_WRAP_KEY, WRAPPED_DIR};

/// Why a backup could not be created, verified or restored. Each has a
/// stable snake_case code ([`BackupError::code`]); [`BackupError::Invalid`]
/// is a finding about the backup (exit 1), the others are usage or
/// environment errors (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup is not what its manifest and signature say. `file` names
    /// the file (or the step) at fault.
    #[error("{file}: {problem}")]
    Invalid {
        /// Stable code (`backup_manifest_invalid`, `backup_signature_invalid`,
        /// `backup_file_changed`, `backup_file_missing`, `backup_file_unlisted`,
        /// `backup_ledger_broken`, `backup_head_mismatch`).
        code: &'static str,
        /// The file, relative to the backup, or the step.
        file: String,
        /// What is wrong.
        problem: String,
    },
    /// `backup create`'s OUT already exists.
    #[error("{0} already exists; a backup is never written over anything (choose a new name)")]
    TargetExists(PathBuf),
    /// `backup restore`'s DIR is not empty.
    #[error(
        "{0} exists and is not empty; a restore builds a fresh instance (choose a new or empty directory)"
    )]
    TargetNotEmpty(PathBuf),
    /// A YubiHSM 2 backup or restore without what it needs (the admin
    /// credential).
    #[error(
        "a YubiHSM 2 {0}: give --admin-credential FILE (the admin authentication key, `keyward hsm setup yubihsm --backups`)"
    )]
    YubiHsmUnsupported(&'static str),
    /// An object of the YubiHSM 2 cannot be exported under wrap: it was
    /// made without `exportable-under-wrap` (`[hsm] exportable_under_wrap
    /// = false` when it was created). Such objects cannot be backed up.
    #[error(
        "{0} is not exportable under wrap (made while [hsm] exportable_under_wrap was false): it cannot be backed up; \
         nothing was written. Rotate it (keyward key rotate) after setting exportable_under_wrap = true"
    )]
    NotExportable(String),
    /// The replacement YubiHSM 2 already holds an object of the backup's.
    #[error(
        "the replacement device already holds {0}: a restore never imports over an object (reset the device or use a fresh one); nothing was imported"
    )]
    ObjectExists(String),
    /// An imported key is not the one the ledger's registry names.
    #[error("{0}")]
    KeyMismatch(String),
    /// The YubiHSM 2 refused or failed.
    #[error("YubiHSM 2: {0}")]
    Device(String),
    /// The SoftHSM2 token could not be found.
    #[error("the SoftHSM2 token {label:?}: {problem}")]
    Token {
        /// The token label.
        label: String,
        /// What went wrong.
        problem: String,
    },
    /// A file of the backup holds the HSM PIN (never expected: a guard).
    #[error("{0} holds the HSM PIN; no backup was written (a backup must never be enough to sign)")]
    HoldsPin(String),
    /// No audit verifier key to trust.
    #[error("no trusted audit key: {0}")]
    NoTrustedKey(String),
    /// The configuration could not be read or rewritten.
    #[error("configuration: {0}")]
    Config(String),
    /// The ledger snapshot failed.
    #[error("ledger snapshot: {0}")]
    Ledger(String),
    /// keywardd did not sign the manifest, or signed it with a key other
    /// than the pinned one.
    #[error("manifest signature: {0}")]
    Sign(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl BackupError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::Invalid { code, .. } => code,
            BackupError::TargetExists(_) => "backup_target_exists",
            BackupError::TargetNotEmpty(_) => "restore_target_not_empty",
            BackupError::YubiHsmUnsupported(_) => "backup_yubihsm_unsupported",
            BackupError::NotExportable(_) => "backup_not_exportable",
            BackupError::ObjectExists(_) => "restore_object_exists",
            BackupError::KeyMismatch(_) => "restore_key_mismatch",
            BackupError::Device(_) => "backup_device",
            BackupError::Token { .. } => "backup_token_not_found",
            BackupError::HoldsPin(_) => "backup_holds_pin",
            BackupError::NoTrustedKey(_) => "backup_no_trusted_key",
            BackupError::Config(_) => "backup_config",
            BackupError::Ledger(_) => "backup_ledger",
            BackupError::Sign(_) => "backup_sign_failed",
            BackupError::Io { .. } => "backup_io",
        }
    }

    /// Whether this is a finding about the backup (exit 1).
    pub fn is_finding(&self) -> bool {
        matches!(self, BackupError::Invalid { .. })
    }

    pub(crate) fn invalid(
        code: &'static str,
        file: impl Into<String>,
        problem: impl Into<String>,
    ) -> BackupError {
        BackupError::Invalid {
            code,
            file: file.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
        let what = what.into();
        move |source| BackupError::Io { what, source }
    }
}

/// SHA-256 of a file's bytes and its size, streamed.
/// The directory `target` is in (`.` for a bare name).
pub(crate) fn parent_dir(target: &std::path::Path) -> std::path::PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// Creates a new directory (mode 0700) beside `target`, named by `name`
/// from `target`'s file name and eight random hex digits: where a backup or
/// a restored instance is built before it is renamed onto `target`.
pub(crate) fn sibling_dir(
    target: &std::path::Path,
    name: impl Fn(&str, &str) -> String,
) -> Result<std::path::PathBuf, BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    let file_name = target
        .file_name()
        .ok_or_else(|| BackupError::Config(format!("{} names no directory", target.display())))?;
    let dir = parent_dir(target).join(name(
        &file_name.to_string_lossy(),
        &hex::encode(rand::random::<[u8; 4]>()),
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(BackupError::io(format!("cannot create {}", dir.display())))?;
    Ok(dir)
}

pub(crate) fn digest_file(path: &std::path::Path) -> Result<([u8; 32], u64), BackupError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(BackupError::io(format!("cannot read {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(BackupError::io(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((h.finalize().into(), size))
}
