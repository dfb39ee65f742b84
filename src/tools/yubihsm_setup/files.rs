//! The credential files of `keyward hsm setup yubihsm`: `AUTH_KEY_ID:PASSWORD`
//! (and the wrap key's `WRAP_KEY_ID:HEX`), 0400 in a 0700 directory, owned
//! by the invoking user (root in the package), as `keyward setup` writes
//! the PIN. A file is never replaced: it is written beside its place and
//! hard-linked there, which fails if anything is there already.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::YubiHsmSetupError;

/// Refuses `path` if anything is there (a file, a link, a directory).
pub(super) fn ensure_absent(path: &Path) -> Result<(), YubiHsmSetupError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(YubiHsmSetupError::CredentialExists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("cannot look at {}", path.display()))(e)),
    }
}

/// Creates the directory of `path` (0700) if it is missing, or narrows an
/// existing one that group or others may enter.
pub(super) fn prepare_dir(path: &Path) -> Result<(), YubiHsmSetupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if dir.is_dir() {
        let mode = std::fs::metadata(dir)
            .map_err(io(format!("cannot read {}", dir.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("cannot chmod {}", dir.display())))?;
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("cannot create {}", dir.display())))
}

/// Writes `content` to the new file `path`, 0400, synced; fails if `path`
/// exists.
pub(super) fn write_new(path: &Path, content: &[u8]) -> Result<(), YubiHsmSetupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o400))?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)?;
        std::fs::remove_file(&tmp)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(YubiHsmSetupError::CredentialExists {
                path: path.to_path_buf(),
            })
        }
        Err(e) => Err(io(format!("cannot write {}", path.display()))(e)),
    }
}

/// Removes the files this run wrote (when it stops before the end).
pub(super) fn remove_written(written: &[PathBuf]) {
    for path in written {
        let _ = std::fs::remove_file(path);
    }
}

pub(super) fn io(what: String) -> impl FnOnce(std::io::Error) -> YubiHsmSetupError {
    move |source| YubiHsmSetupError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_0400_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds").join("signer");
        prepare_dir(&path).unwrap();
        let mode = std::fs::metadata(dir.path().join("creds"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        ensure_absent(&path).unwrap();
        write_new(&path, b"2:first").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let err = write_new(&path, b"2:second").unwrap_err();
        assert_eq!(err.code(), "credential_exists");
        assert!(ensure_absent(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"2:first");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("creds"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }
}
