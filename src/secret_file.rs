//! Reading a secret (the HSM PIN, the NATS mirror password) from a file
//! that only its owner may read.
//!
//! One check for every secret file: a regular file, no access for group or
//! others, owned by this process's user or root, small, non-empty text. A
//! single trailing newline is removed. Errors name the file and the fix and
//! never contain the secret.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use secrecy::SecretString;
use zeroize::Zeroizing;

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be opened, inspected or read.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done (`open`, `stat`, `read`).
        what: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not a regular file.
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The file.
        path: String,
    },
    /// Group or others have some access.
    #[error("{path} has mode {mode:04o}; group and others must have no access (chmod 0400 {path})")]
    Mode {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by another user.
    #[error("{path} belongs to uid {owner}, not to this process's user ({euid}) or root")]
    Owner {
        /// The file.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// Larger than a secret can be.
    #[error("{path} is larger than {max} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit.
        max: u64,
    },
    /// Empty (or only a newline).
    #[error("{path} is empty")]
    Empty {
        /// The file.
        path: String,
    },
    /// Not UTF-8.
    #[error("{path} is not UTF-8 text")]
    NotText {
        /// The file.
        path: String,
    },
}

impl SecretFileError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SecretFileError::Io { .. } => "secret_file_unreadable",
            _ => "secret_file_refused",
        }
    }
}

/// Checks the file at `path` as a secret file without reading it: a
/// regular file that group and others cannot access at all, owned by this
/// process's user or root. The checks [`read_secret_file`] makes before it
/// reads; `keyward doctor` makes them on files it must not read.
pub fn check_secret_file(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Io {
        what: "stat",
        path: path.display().to_string(),
        source,
    })?;
    check_metadata(path, &meta)
}

/// The checks of [`check_secret_file`] on metadata already read.
fn check_metadata(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretFileError> {
    let shown = || path.display().to_string();
    if !meta.file_type().is_file() {
        return Err(SecretFileError::NotRegular { path: shown() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Mode {
            path: shown(),
            mode,
        });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(SecretFileError::Owner {
            path: shown(),
            owner: meta.uid(),
            euid,
        });
    }
    Ok(())
}

/// Reads the secret in `path` (at most `max_len` bytes) after checking the
/// file as described in the [module docs](self).
pub fn read_secret_file(path: &Path, max_len: u64) -> Result<SecretString, SecretFileError> {
    let shown = || path.display().to_string();
    let io = |what| {
        move |source| SecretFileError::Io {
            what,
            path: shown(),
            source,
        }
    };
    let mut file = std::fs::File::open(path).map_err(io("open"))?;
    let meta = file.metadata().map_err(io("stat"))?;
    check_metadata(path, &meta)?;
    if meta.len() > max_len {
        return Err(SecretFileError::TooLarge {
            path: shown(),
            max: max_len,
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(64));
    (&mut file)
        .take(max_len)
        .read_to_end(&mut buf)
        .map_err(io("read"))?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.is_empty() {
        return Err(SecretFileError::Empty { path: shown() });
    }
    let text = std::str::from_utf8(&buf).map_err(|_| SecretFileError::NotText { path: shown() })?;
    Ok(SecretString::from(text.to_owned()))
}
