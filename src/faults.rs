//! Fault injection for the integration tests: fails a chosen ledger write
//! or HSM signature of a real keywardd, so the tests can reach the failure
//! paths of signing (a signature made but not recorded, an HSM that refuses)
//! that no real disk or token produces on demand.
//!
//! Compiled only with the cargo feature `test-hooks`. Only the package's
//! self dev-dependency turns it on, so test builds have it and `cargo build
//! --release` (which does not resolve dev-dependencies) never does;
//! `tests/release_path.rs` checks that resolution on every test run.
//!
//! keywardd reads [`ENV`] once at start ([`install_from_env`]); without it
//! nothing changes. The value is a comma-separated list of:
//!
//! - `ledger:EVENT:N`: the N-th append (counted from 1 since start) of an
//!   entry of type `EVENT` (e.g. `signature_created`) fails as a disk I/O
//!   error would, so the write job that makes it is rolled back;
//! - `hsm:sign_fails:N`: the N-th signature the signing service asks the
//!   HSM for fails with a device error (checkpoint signatures, made with
//!   the audit key, do not count and never fail);
//! - `hsm:sign_waits_for:PATH`: every signature the signing service asks
//!   the HSM for waits until the file `PATH` exists (at most
//!   [`MAX_HOLD`]), so a test can hold a request inside the HSM call;
//! - `ledger:writer_wedged_while:PATH`: while the file `PATH` exists
//!   (at most [`MAX_HOLD`] at a time), the ledger writer thread stops
//!   before its next batch as a wedged writer would (the watchdog's test:
//!   create the file to wedge it, remove it to release it).
//!
//! ```text
//! KEYWARD_TEST_FAULTS=ledger:signature_created:1,hsm:sign_fails:3 keywardd --config ...
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::hsm::{Hsm, HsmError, HsmKey};
use crate::ledger::{EventType, LedgerError};
use crate::types::KeyName;

/// The environment variable keywardd reads at start.
pub const ENV: &str = "KEYWARD_TEST_FAULTS";

/// Longest a signature waits for its `sign_waits_for` file.
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// What the injected errors say, so logs and ledger entries show them.
const INJECTED: &str = "injected by KEYWARD_TEST_FAULTS";

/// The faults of one keywardd run.
#[derive(Debug, Default)]
pub struct Faults {
    ledger: Vec<LedgerFault>,
    sign_fails: Vec<u64>,
    sign_waits_for: Option<PathBuf>,
    writer_wedged_while: Option<PathBuf>,
    /// Signatures asked for so far.
    signs: AtomicU64,
}

#[derive(Debug)]
struct LedgerFault {
    event: EventType,
    nth: u64,
    /// Appends of `event` so far.
    seen: AtomicU64,
}

/// A malformed [`ENV`] value: keywardd refuses to start on it.
#[derive(Debug, thiserror::Error)]
#[error("invalid {ENV} entry {entry:?}: {why}")]
pub struct FaultSpecError {
    entry: String,
    why: String,
}

fn nth(entry: &str, n: &str) -> Result<u64, FaultSpecError> {
    match n.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(FaultSpecError {
            entry: entry.to_owned(),
            why: format!("{n:?} is not a count from 1"),
        }),
    }
}

impl Faults {
    /// Parses an [`ENV`] value.
    pub fn parse(spec: &str) -> Result<Faults, FaultSpecError> {
        let mut faults = Faults::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why: &str| FaultSpecError {
                entry: entry.to_owned(),
                why: why.to_owned(),
            };
            match entry.splitn(3, ':').collect::<Vec<_>>()[..] {
                ["ledger", "writer_wedged_while", path] if !path.is_empty() => {
                    faults.writer_wedged_while = Some(PathBuf::from(path));
                }
                ["ledger", event, n] => faults.ledger.push(LedgerFault {
                    event: EventType::parse(event).ok_or_else(|| bad("unknown event type"))?,
                    nth: nth(entry, n)?,
                    seen: AtomicU64::new(0),
                }),
                ["hsm", "sign_fails", n] => faults.sign_fails.push(nth(entry, n)?),
                ["hsm", "sign_waits_for", path] if !path.is_empty() => {
                    faults.sign_waits_for = Some(PathBuf::from(path));
                }
                _ => {
                    return Err(bad(
                        "expected ledger:EVENT:N, ledger:writer_wedged_while:PATH, hsm:sign_fails:N or hsm:sign_waits_for:PATH",
                    ));
                }
            }
        }
        Ok(faults)
    }

    fn touches_hsm(&self) -> bool {
        !self.sign_fails.is_empty() || self.sign_waits_for.is_some()
    }
}

static FAULTS: OnceLock<Faults> = OnceLock::new();

/// Reads [`ENV`] (once; later calls change nothing) and puts its faults in
/// force. Returns the value when it was set.
pub fn install_from_env() -> Result<Option<String>, FaultSpecError> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(None);
    };
    let faults = Faults::parse(&spec)?;
    let _ = FAULTS.set(faults);
    Ok(Some(spec))
}

/// Called by every ledger append before it writes: `Err` when this append
/// is one chosen to fail.
pub(crate) fn ledger_append(event: EventType) -> Result<(), LedgerError> {
    let Some(faults) = FAULTS.get() else {
        return Ok(());
    };
    let mut fail = false;
    for f in faults.ledger.iter().filter(|f| f.event == event) {
        fail |= f.seen.fetch_add(1, Ordering::SeqCst) + 1 == f.nth;
    }
    if fail {
        tracing::warn!(event = event.as_str(), "{INJECTED}: ledger append fails");
        return Err(LedgerError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some(format!("disk I/O error {INJECTED}")),
        )));
    }
    Ok(())
}

/// Called by the ledger writer thread before each batch: holds the thread
/// while the `writer_wedged_while` file exists (at most [`MAX_HOLD`]).
pub(crate) fn ledger_writer_gate() {
    let Some(path) = FAULTS.get().and_then(|f| f.writer_wedged_while.as_ref()) else {
        return;
    };
    if !path.exists() {
        return;
    }
    tracing::warn!(path = %path.display(), "{INJECTED}: ledger writer wedged");
    let deadline = Instant::now() + MAX_HOLD;
    while path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::warn!("{INJECTED}: ledger writer released");
}

/// keywardd's HSM, wrapped when signature faults are set (before the
/// executor, so a held signature holds a worker as a slow device would).
pub fn wrap_hsm(hsm: Arc<dyn Hsm>) -> Arc<dyn Hsm> {
    match FAULTS.get() {
        Some(f) if f.touches_hsm() => Arc::new(FaultyHsm { inner: hsm }),
        _ => hsm,
    }
}

fn before_sign(faults: &Faults) -> Result<(), HsmError> {
    if let Some(path) = &faults.sign_waits_for {
        if !path.exists() {
            // Tests wait for this line to know a request is inside the HSM.
            tracing::warn!(path = %path.display(), "{INJECTED}: HSM signature held");
        }
        let deadline = Instant::now() + MAX_HOLD;
        while !path.exists() {
            if Instant::now() > deadline {
                return Err(HsmError::Device {
                    op: "sign",
                    detail: format!("{INJECTED}: {} never appeared", path.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let n = faults.signs.fetch_add(1, Ordering::SeqCst) + 1;
    if faults.sign_fails.contains(&n) {
        tracing::warn!(n, "{INJECTED}: HSM signature fails");
        return Err(HsmError::Device {
            op: "sign",
            detail: format!("CKR_DEVICE_ERROR {INJECTED}"),
        });
    }
    Ok(())
}

/// An HSM whose signatures fail or wait as [`ENV`] says; everything else
/// goes to the real one unchanged.
struct FaultyHsm {
    inner: Arc<dyn Hsm>,
}

impl Hsm for FaultyHsm {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn workers(&self) -> usize {
        self.inner.workers()
    }
    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        self.inner.generate_ed25519(name)
    }
    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        self.inner.find_ed25519(name)
    }
    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError> {
        self.inner.list_ed25519()
    }
    fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), HsmError> {
        self.inner.destroy_ed25519(key)
    }
    fn sign_ed25519(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        if let Some(faults) = FAULTS.get()
            && key.name.as_str() != crate::ledger::checkpoint::AUDIT_KEY
        {
            before_sign(faults)?;
        }
        self.inner.sign_ed25519(key, message)
    }
    fn random(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError> {
        self.inner.random(len)
    }
    fn import_hmac_key(&self, label: &str, key: &[u8]) -> Result<(), HsmError> {
        self.inner.import_hmac_key(label, key)
    }
    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        self.inner.hmac_sha256(label, data)
    }
    fn keepalive(&self) -> Option<std::time::Duration> {
        self.inner.keepalive()
    }
    fn verify_hmac_sha256(
        &self,
        label: &str,
        data: &[u8],
        tag: &[u8; 32],
    ) -> Result<bool, HsmError> {
        self.inner.verify_hmac_sha256(label, data, tag)
    }
    fn delete_secret(&self, label: &str) -> Result<bool, HsmError> {
        self.inner.delete_secret(label)
    }
    fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        self.inner.store_data(label, value)
    }
    fn load_data(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        self.inner.load_data(label)
    }
    fn health(&self) -> Result<(), HsmError> {
        self.inner.health()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_every_kind_and_keeps_colons_in_paths() {
        let f = Faults::parse(
            "ledger:signature_created:2, hsm:sign_fails:1,hsm:sign_waits_for:/tmp/a:b,ledger:writer_wedged_while:/tmp/w",
        )
        .unwrap();
        assert_eq!(f.ledger.len(), 1);
        assert_eq!(f.ledger[0].event, EventType::SignatureCreated);
        assert_eq!(f.ledger[0].nth, 2);
        assert_eq!(f.sign_fails, vec![1]);
        assert_eq!(f.sign_waits_for, Some(PathBuf::from("/tmp/a:b")));
        assert_eq!(f.writer_wedged_while, Some(PathBuf::from("/tmp/w")));
        assert!(Faults::parse("").unwrap().ledger.is_empty());
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for bad in [
            "ledger:no_such_event:1",
            "ledger:signature_created:0",
            "ledger:signature_created:x",
            "ledger:signature_created",
            "hsm:sign_fails:-1",
            "hsm:sign_waits_for:",
            "ledger:writer_wedged_while:",
            "hsm:explode:1",
            "disk:full",
        ] {
            let e = Faults::parse(bad).unwrap_err();
            assert!(e.to_string().contains(ENV), "{bad}: {e}");
        }
    }

    #[test]
    fn the_nth_signature_fails_once() {
        let f = Faults::parse("hsm:sign_fails:2").unwrap();
        assert!(before_sign(&f).is_ok());
        assert!(matches!(before_sign(&f), Err(HsmError::Device { .. })));
        assert!(before_sign(&f).is_ok());
    }
}
