//! The files set-up writes: PINs (whole or not at all, root-only) and
//! the directories and ownership of SoftHSM2's token.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use secrecy::SecretString;
use zeroize::Zeroizing;

use super::{DaemonUser, SetupError, io, nix_io};

/// A random PIN of 48 hex digits (192 bits).
pub(super) fn random_pin() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 24]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..]);
    Zeroizing::new(hex::encode(&bytes[..]))
}

pub(super) fn read_pin_or(
    path: &Path,
    missing: impl FnOnce() -> String,
) -> Result<SecretString, SetupError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Err(SetupError::Token(missing()));
    }
    crate::secret_file::read_secret_file(path, 4096).map_err(|e| SetupError::Token(e.to_string()))
}

/// Writes the PIN credential `path`: the directory is created 0700, the
/// file 0400, both owned by this process's user (root in the package).
pub(super) fn write_credential(path: &Path, content: &[u8]) -> Result<(), SetupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.is_dir() {
        make_dirs(dir, 0o700, None)?;
    } else {
        let mode = std::fs::metadata(dir)
            .map_err(io(format!("cannot read {}", dir.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("cannot chmod {}", dir.display())))?;
        }
    }
    write_atomic(path, 0o400, content)
}

/// Writes `path` whole or not at all: a new temporary file beside it
/// (`mode`, synced), renamed over it, the directory synced.
pub fn write_atomic(path: &Path, mode: u32, content: &[u8]) -> Result<(), SetupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let what = format!("cannot write {}", path.display());
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; set it as asked.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io(what))
}

/// Creates `dir` and its missing parents with `mode`, owned by `owner`
/// when given.
pub(super) fn make_dirs(
    dir: &Path,
    mode: u32,
    owner: Option<DaemonUser>,
) -> Result<(), SetupError> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.exists() {
            break;
        }
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    for p in missing.iter().rev() {
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(p)
            .map_err(io(format!("cannot create {}", p.display())))?;
        if let Some(o) = owner {
            nix::unistd::chown(p, Some(o.uid), Some(o.gid))
                .map_err(nix_io(format!("cannot chown {}", p.display())))?;
        }
    }
    Ok(())
}

/// Gives `dir` and everything in it to `owner` (SoftHSM2 wrote the token
/// files as root).
pub fn chown_tree(dir: &Path, owner: DaemonUser) -> Result<(), SetupError> {
    nix::unistd::chown(dir, Some(owner.uid), Some(owner.gid))
        .map_err(nix_io(format!("cannot chown {}", dir.display())))?;
    let entries = std::fs::read_dir(dir).map_err(io(format!("cannot read {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("cannot read {}", dir.display())))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(io(format!("cannot stat {}", path.display())))?;
        if ft.is_symlink() {
            continue;
        }
        if ft.is_dir() {
            chown_tree(&path, owner)?;
        } else {
            nix::unistd::chown(&path, Some(owner.uid), Some(owner.gid))
                .map_err(nix_io(format!("cannot chown {}", path.display())))?;
        }
    }
    Ok(())
}
