//! The credential files of `keyward hsm setup yubihsm`: `AUTH_KEY_ID:PASSWORD`
//! (and the wrap key's `WRAP_KEY_ID:HEX`), 0400 in a 0700 directory, owned
//! by the invoking user (root in the package), as `keyward setup` writes
//! the PIN. A file is never replaced: it is written beside its place and
//! hard-linked there, which fails if anything is there already.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// Refuses an existing directory of `path` that does not belong to this
/// process's user or is open to group or others (it is not changed: a
/// directory given by mistake, such as `/tmp`, is refused rather than
/// narrowed). A missing one is fine: [`prepare_dir`] creates it.
pub(super) fn check_dir(path: &Path) -> Result<(), YubiHsmSetupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("cannot read {}", dir.display()))(e)),
    };
    let mode = meta.permissions().mode() & 0o7777;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || mode & 0o077 != 0 {
        return Err(YubiHsmSetupError::Config(format!(
            "the credentials directory {} must be a directory of uid {me} closed to group and others \
             (it is mode {mode:04o}, uid {}): chmod 700 it, or give another --credentials-dir",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// [`check_dir`], then creates the directory of `path` (0700, parents
/// too) if it is missing.
pub(super) fn prepare_dir(path: &Path) -> Result<(), YubiHsmSetupError> {
    check_dir(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
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

    #[test]
    fn an_open_directory_is_refused_not_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare_dir(&open.join("signer")).unwrap_err();
        assert_eq!(err.code(), "invalid_config");
        assert!(err.to_string().contains("0755"), "{err}");
        let mode = std::fs::metadata(&open).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "left as it was");
    }
}
