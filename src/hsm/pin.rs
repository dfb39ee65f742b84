//! Reading the HSM user PIN from a file or a systemd credential.
//!
//! The PIN never comes from the command line or the environment. A relative
//! `pin_file` names a credential in `$CREDENTIALS_DIRECTORY` (systemd
//! `LoadCredential=`); an absolute one is a file that only its owner (the
//! daemon's user or root) may read.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

use super::HsmError;

/// Largest PIN file accepted.
const MAX_PIN_FILE: u64 = 4096;

/// Where `pin_file` points: an absolute path as is, a relative one inside
/// `$CREDENTIALS_DIRECTORY`.
pub fn resolve_pin_path(pin_file: &Path) -> Result<PathBuf, HsmError> {
    if pin_file.is_absolute() {
        return Ok(pin_file.to_path_buf());
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Ok(Path::new(&dir).join(pin_file)),
        None => Err(HsmError::Pin(format!(
            "pin_file {} is relative, which names a systemd credential, but CREDENTIALS_DIRECTORY is not set \
             (use LoadCredential= in the unit, or an absolute path)",
            pin_file.display()
        ))),
    }
}

/// Reads the PIN. Refuses files that are not regular files, that group or
/// others may access, or that belong to someone other than this process's
/// user or root ([`crate::secret_file`]). A single trailing newline is
/// removed; an empty PIN is refused. Errors never contain the PIN.
pub fn read_pin(pin_file: &Path) -> Result<SecretString, HsmError> {
    let path = resolve_pin_path(pin_file)?;
    crate::secret_file::read_secret_file(&path, MAX_PIN_FILE)
        .map_err(|e| HsmError::Pin(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    use secrecy::ExposeSecret;

    use super::*;

    fn write(dir: &Path, name: &str, mode: u32, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_a_private_pin_file_and_strips_one_newline() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "pin", 0o400, b"s3cret-PIN\n");
        assert_eq!(read_pin(&p).unwrap().expose_secret(), "s3cret-PIN");
        let p = write(d.path(), "pin2", 0o600, b"x y\r\n");
        assert_eq!(read_pin(&p).unwrap().expose_secret(), "x y");
    }

    #[test]
    fn refuses_loose_modes_empty_files_and_directories_without_showing_the_pin() {
        let d = tempfile::tempdir().unwrap();
        for (name, mode) in [("g", 0o440), ("o", 0o404), ("gw", 0o620)] {
            let p = write(d.path(), name, mode, b"topsecret");
            let e = read_pin(&p).unwrap_err().to_string();
            assert!(e.contains("mode"), "{e}");
            assert!(!e.contains("topsecret"));
        }
        let p = write(d.path(), "empty", 0o400, b"\n");
        assert!(read_pin(&p).unwrap_err().to_string().contains("empty"));
        assert!(read_pin(d.path()).is_err());
        assert!(read_pin(&d.path().join("absent")).is_err());
    }

    #[test]
    fn relative_paths_are_systemd_credentials() {
        // Only the resolution is tested here: the environment is process-wide.
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            let e = resolve_pin_path(Path::new("pin")).unwrap_err().to_string();
            assert!(e.contains("CREDENTIALS_DIRECTORY"), "{e}");
        }
        assert_eq!(
            resolve_pin_path(Path::new("/a/b")).unwrap(),
            PathBuf::from("/a/b")
        );
    }
}
