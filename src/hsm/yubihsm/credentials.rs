//! The signer's authentication key: `AUTH_KEY_ID:PASSWORD` in one file.
//!
//! Like the PKCS#11 PIN, it never comes from argv or the environment: a
//! relative `credential_file` names a systemd credential in
//! `$CREDENTIALS_DIRECTORY`; an absolute one must be a regular file only its
//! owner (this process's user or root) may read ([`crate::secret_file`]).
//! The password is turned into the session keys with the YubiHSM's own
//! derivation (PBKDF2-SHA256, as `yubihsm-shell` does) and dropped.

use std::path::Path;

use secrecy::ExposeSecret;

use crate::hsm::HsmError;

/// Largest credential file accepted.
const MAX_CREDENTIAL_FILE: u64 = 4096;

/// Reads `credential_file` into the authentication key id and the
/// credentials derived from its password. Errors never contain the password.
pub fn read_credentials(credential_file: &Path) -> Result<(u16, yubihsm::Credentials), HsmError> {
    let path = crate::hsm::pin::resolve_pin_path(credential_file)?;
    let secret = crate::secret_file::read_secret_file(&path, MAX_CREDENTIAL_FILE)
        .map_err(|e| HsmError::Pin(e.to_string()))?;
    let (id, password) = parse(secret.expose_secret())
        .map_err(|why| HsmError::Pin(format!("{}: {why}", path.display())))?;
    Ok((
        id,
        yubihsm::Credentials::from_password(id, password.as_bytes()),
    ))
}

/// Splits `ID:PASSWORD`; the reason of a refusal names no secret.
fn parse(text: &str) -> Result<(u16, &str), &'static str> {
    let (id, password) = text.split_once(':').ok_or(
        "expected AUTH_KEY_ID:PASSWORD (the authentication key's object id, a colon, its password)",
    )?;
    let id: u16 = id
        .trim()
        .parse()
        .map_err(|_| "the authentication key id before the colon must be a number 1-65534")?;
    if id == 0 || id == 0xffff {
        return Err("the authentication key id before the colon must be a number 1-65534");
    }
    if password.is_empty() {
        return Err("the password after the colon is empty");
    }
    Ok((id, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_id_and_password_and_refuses_the_rest() {
        assert_eq!(parse("2:s3cret").unwrap(), (2, "s3cret"));
        assert_eq!(parse("2:a:b").unwrap(), (2, "a:b"), "colons in passwords");
        for bad in [
            "s3cret",
            "x:s3cret",
            "0:s3cret",
            "65535:s3cret",
            "2:",
            ":pw",
        ] {
            let why = parse(bad).unwrap_err();
            assert!(!why.contains("s3cret"), "{why}");
        }
    }
}
