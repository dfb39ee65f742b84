//! The approver key file: written once by `keyward approver add` (mode
//! 0400), read by `keyward approve` on the approver's machine.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context, anyhow};

use crate::Failure;

/// First line of every key file.
const HEADER: &str = "keyward-approver-key v1";

/// Writes a new key file for `approver` holding `key` (base64url) at
/// `path`, which must not exist: mode 0400, synced; the text is zeroized.
pub(crate) fn write_new(path: &Path, approver: &str, key: &str) -> std::io::Result<()> {
    let text = zeroize::Zeroizing::new(format!("{HEADER}\napprover: {approver}\nkey: {key}\n"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Reads the key of `approver` from the key file at `path`.
pub(crate) fn read(path: &Path, approver: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, Failure> {
    use base64::Engine as _;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(Failure(
            2,
            anyhow!("{} is not a keyward approver key file", path.display()),
        ));
    }
    let name = lines.next().and_then(|l| l.strip_prefix("approver: "));
    if name != Some(approver) {
        return Err(Failure(
            2,
            anyhow!(
                "{} is the key of {:?}, not of {approver:?}",
                path.display(),
                name.unwrap_or("?")
            ),
        ));
    }
    let key = lines
        .next()
        .and_then(|l| l.strip_prefix("key: "))
        .and_then(|k| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(k)
                .ok()
        })
        .filter(|k| k.len() == 32)
        .ok_or_else(|| Failure(2, anyhow!("{} has no valid key", path.display())))?;
    Ok(zeroize::Zeroizing::new(key))
}
