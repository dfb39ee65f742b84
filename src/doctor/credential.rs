//! Where the PIN comes from, as the daemon resolves it, and what the
//! installed unit says about it.
//!
//! keywardd reads a relative `hsm.pin_file` from `$CREDENTIALS_DIRECTORY`
//! ([`crate::hsm::pin::resolve_pin_path`]). An operator running the checks
//! from a shell has no such directory; the checks then look the
//! credential's source up in `keywardd.service` (`LoadCredential=ID:PATH`,
//! drop-ins included), the file systemd will hand to the daemon.

use std::path::{Path, PathBuf};

use super::{Code, Finding, Severity};
use crate::config::Config;
use crate::secret_file::SecretFileError;

/// The daemon's unit.
pub const UNIT: &str = "keywardd.service";

/// Where systemd looks for units, most important first.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// Where the PIN file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// An absolute `pin_file`.
    File(PathBuf),
    /// A credential in `$CREDENTIALS_DIRECTORY` (the daemon under systemd).
    Credential {
        /// The credential's name (`pin_file`).
        name: String,
        /// Its path in the credentials directory.
        path: PathBuf,
    },
    /// Outside systemd: the file `keywardd.service` loads the credential
    /// from.
    UnitSource {
        /// The credential's name.
        name: String,
        /// The file named by `LoadCredential=`.
        path: PathBuf,
    },
    /// A credential name with neither a credentials directory nor a unit
    /// that names its source.
    Unresolved {
        /// The credential's name.
        name: String,
    },
}

impl PinSource {
    /// The file holding the PIN, when known.
    pub fn path(&self) -> Option<&Path> {
        match self {
            PinSource::File(p)
            | PinSource::Credential { path: p, .. }
            | PinSource::UnitSource { path: p, .. } => Some(p),
            PinSource::Unresolved { .. } => None,
        }
    }
}

/// Resolves `pin_file` as the daemon does, falling back to the unit's
/// `LoadCredential=` source outside systemd.
pub fn resolve_pin(pin_file: &Path) -> PinSource {
    if pin_file.is_absolute() {
        return PinSource::File(pin_file.to_path_buf());
    }
    let name = pin_file.display().to_string();
    if let Ok(path) = crate::hsm::pin::resolve_pin_path(pin_file) {
        return PinSource::Credential { name, path };
    }
    match unit_credential_source(&name) {
        Some(path) => PinSource::UnitSource { name, path },
        None => PinSource::Unresolved { name },
    }
}

/// Where the package's unit loads the PIN credential from, beside the
/// configuration: `<config dir>/credentials/hsm.pin` (`keyward setup`
/// writes it there).
pub fn layout_credential_source(cfg: &Config) -> PathBuf {
    let file = std::path::absolute(&cfg.file).unwrap_or_else(|_| cfg.file.clone());
    file.parent()
        .unwrap_or(Path::new("/"))
        .join("credentials")
        .join("hsm.pin")
}

/// [`resolve_pin`] for the instance `cfg`: a credential neither a
/// credentials directory nor an installed unit resolves is looked for
/// where the installed layout keeps it ([`layout_credential_source`]),
/// when it is there (an instance set up by hand, or in a test).
pub fn resolve_pin_for(cfg: &Config, pin_file: &Path) -> PinSource {
    match resolve_pin(pin_file) {
        PinSource::Unresolved { name } => {
            let path = layout_credential_source(cfg);
            if std::fs::symlink_metadata(&path).is_ok() {
                PinSource::UnitSource { name, path }
            } else {
                PinSource::Unresolved { name }
            }
        }
        other => other,
    }
}

/// [`resolve_pin`] for a YubiHSM `credential_file` of the instance `cfg`:
/// a credential neither a credentials directory nor an installed unit
/// resolves is looked for as `<config dir>/credentials/<name>` (where the
/// YubiHSM drop-ins load it from, `/etc/keyward/credentials/yubihsm-signer`),
/// when it is there.
pub(super) fn resolve_credential_for(cfg: &Config, credential_file: &Path) -> PinSource {
    match resolve_pin(credential_file) {
        PinSource::Unresolved { name } => {
            let file = std::path::absolute(&cfg.file).unwrap_or_else(|_| cfg.file.clone());
            let path = file
                .parent()
                .unwrap_or(Path::new("/"))
                .join("credentials")
                .join(&name);
            if std::fs::symlink_metadata(&path).is_ok() {
                PinSource::UnitSource { name, path }
            } else {
                PinSource::Unresolved { name }
            }
        }
        other => other,
    }
}

/// The values of `key=` in `keywardd.service` as systemd would combine
/// them: the first unit file found, then the drop-ins of every unit
/// directory in file-name order; an empty assignment clears the list.
fn unit_values(dirs: &[&Path], key: &str) -> Vec<String> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(main) = dirs.iter().map(|d| d.join(UNIT)).find(|p| p.is_file()) {
        files.push(main);
    }
    let mut dropins: Vec<(std::ffi::OsString, PathBuf)> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir.join(format!("{UNIT}.d"))) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if Path::new(&name).extension().is_some_and(|x| x == "conf")
                && !dropins.iter().any(|(n, _)| *n == name)
            {
                dropins.push((name, e.path()));
            }
        }
    }
    dropins.sort();
    files.extend(dropins.into_iter().map(|(_, p)| p));
    let mut values = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            if k.trim() != key {
                continue;
            }
            let v = v.trim();
            if v.is_empty() {
                values.clear();
            } else {
                values.push(v.to_owned());
            }
        }
    }
    values
}

fn unit_dirs() -> Vec<&'static Path> {
    UNIT_DIRS.iter().map(Path::new).collect()
}

/// The file `keywardd.service` loads the credential `name` from
/// (`LoadCredential=name:PATH`), when an installed unit says so.
pub fn unit_credential_source(name: &str) -> Option<PathBuf> {
    credential_source_in(&unit_dirs(), name)
}

fn credential_source_in(dirs: &[&Path], name: &str) -> Option<PathBuf> {
    unit_values(dirs, "LoadCredential")
        .iter()
        .filter_map(|v| v.split_once(':'))
        .filter(|(id, path)| *id == name && path.starts_with('/'))
        .map(|(_, path)| PathBuf::from(path))
        .next_back()
}

/// The directories `RuntimeDirectory=` of `keywardd.service` creates at
/// each start (`/run/keyward`).
pub(super) fn unit_runtime_dirs() -> Vec<PathBuf> {
    runtime_dirs_in(&unit_dirs())
}

fn runtime_dirs_in(dirs: &[&Path]) -> Vec<PathBuf> {
    unit_values(dirs, "RuntimeDirectory")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|d| Path::new("/run").join(d.split(':').next().unwrap_or(&d)))
        .collect()
}

/// The PIN file: resolvable, present, a regular file no one but its owner
/// (root or the daemon's user) may access. Never reads it.
pub(super) fn check_pin_file(cfg: &Config) -> Option<Finding> {
    let pkcs11 = cfg.hsm.pkcs11()?;
    let source = resolve_pin_for(cfg, &pkcs11.pin_file);
    let Some(path) = source.path() else {
        return Some(Finding::error(
            Code::PinUnresolved,
            "HSM PIN",
            None,
            format!(
                "hsm.pin_file {:?} names a systemd credential, but CREDENTIALS_DIRECTORY is not set and no {UNIT} names its source",
                pkcs11.pin_file.display().to_string()
            ),
            format!(
                "start keywardd from {UNIT} (LoadCredential={}:/etc/keyward/credentials/hsm.pin), or set hsm.pin_file in {} to an absolute path",
                pkcs11.pin_file.display(),
                cfg.file.display()
            ),
        ));
    };
    secret_file_finding(path, &source, &PIN_FILE)
}

/// One kind of secret file the checks look at, for their findings.
pub(super) struct SecretFileKind {
    /// The finding's subject ("HSM PIN").
    pub what: &'static str,
    /// Its short name in messages ("PIN").
    pub noun: &'static str,
    /// The code of a missing file.
    pub missing: Code,
    /// The code of a file refused as it is (mode, owner, type).
    pub refused: Code,
    /// The set-up command that writes it, and what it writes.
    pub written_by: &'static str,
    /// "it" or "them", for "write it to ...".
    pub pronoun: &'static str,
    /// What the file holds ("the PIN").
    pub holding: &'static str,
}

/// The PKCS#11 user PIN file.
const PIN_FILE: SecretFileKind = SecretFileKind {
    what: "HSM PIN",
    noun: "PIN",
    missing: Code::PinMissing,
    refused: Code::PinRefused,
    written_by: "run `keyward setup` (it writes the token's user PIN there, mode 0400)",
    pronoun: "it",
    holding: "the PIN",
};

/// The finding about the secret file `path` (resolved from `source`) when
/// it is missing or not private, with its fix; `None` when it passes.
/// Never reads the file.
pub(super) fn secret_file_finding(
    path: &Path,
    source: &PinSource,
    kind: &SecretFileKind,
) -> Option<Finding> {
    let err = crate::secret_file::check_secret_file(path).err()?;
    let whence = match source {
        PinSource::File(_) | PinSource::Unresolved { .. } => String::new(),
        PinSource::Credential { name, .. } => match unit_credential_source(name) {
            Some(src) => format!(
                " (credential {name:?} of {UNIT}, loaded from {})",
                src.display()
            ),
            None => format!(" (credential {name:?} in $CREDENTIALS_DIRECTORY)"),
        },
        PinSource::UnitSource { name, .. } => {
            format!(" (the source of credential {name:?} in {UNIT})")
        }
    };
    let shown = path.display();
    let refused = |problem: String, fix: String| {
        Finding::error(kind.refused, kind.what, Some(path), problem, fix)
    };
    let finding = match &err {
        SecretFileError::Io { source: e, .. } if e.kind() == std::io::ErrorKind::NotFound => {
            Finding::error(
                kind.missing,
                kind.what,
                Some(path),
                format!("no {}: {shown} does not exist{whence}", kind.noun),
                format!(
                    "{}, or write {} to {shown} with mode 0400",
                    kind.written_by, kind.pronoun
                ),
            )
        }
        SecretFileError::Io { source: e, .. }
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && matches!(source, PinSource::UnitSource { .. }) =>
        {
            Finding {
                severity: Severity::Warning,
                ..refused(
                    format!("cannot inspect {shown}{whence}: {e}"),
                    format!("run the check as root to inspect the {} file", kind.noun),
                )
            }
        }
        SecretFileError::Mode { .. } => {
            refused(format!("{err}{whence}"), format!("chmod 0400 {shown}"))
        }
        SecretFileError::Owner { .. } => {
            refused(format!("{err}{whence}"), format!("chown root:root {shown}"))
        }
        _ => refused(
            format!("{err}{whence}"),
            format!(
                "replace {shown} with a regular file holding {}, mode 0400",
                kind.holding
            ),
        ),
    };
    Some(finding)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_unit_and_its_dropins_name_the_credential_source_and_runtime_dir() {
        let lib = tempfile::tempdir().unwrap();
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(
            lib.path().join(UNIT),
            "[Service]\nRuntimeDirectory=keyward\nLoadCredential=pin:/etc/keyward/credentials/hsm.pin\nLoadCredential=other:/x\n",
        )
        .unwrap();
        let dirs = [etc.path(), lib.path()];
        assert_eq!(
            credential_source_in(&dirs, "pin"),
            Some(PathBuf::from("/etc/keyward/credentials/hsm.pin"))
        );
        assert_eq!(credential_source_in(&dirs, "nope"), None);
        assert_eq!(runtime_dirs_in(&dirs), vec![PathBuf::from("/run/keyward")]);
        // A drop-in that clears the list and names another source wins.
        let d = etc.path().join(format!("{UNIT}.d"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("pin.conf"),
            "[Service]\nLoadCredential=\nLoadCredential=pin:/srv/pin\n",
        )
        .unwrap();
        assert_eq!(
            credential_source_in(&dirs, "pin"),
            Some(PathBuf::from("/srv/pin"))
        );
        assert_eq!(credential_source_in(&dirs, "other"), None);
    }
}
