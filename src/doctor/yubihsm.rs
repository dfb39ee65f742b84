//! The checks of `backend = "yubihsm"`: the credential file in the
//! preflight (resolvable, present, mode and owner; never read there), then
//! its content, the connector (TCP) or the USB device, a session with the
//! authentication key, and the keys the policy names with the backend's
//! own protection checks. The password is never printed.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use super::credential::{SecretFileKind, UNIT, resolve_credential_for, secret_file_finding};
use super::{Code, Finding, Report};
use crate::config::{Config, YubiHsmBackendConfig, YubiHsmConnector};
use crate::hsm::HsmError;
use crate::hsm::yubihsm::{YubiHsm, YubiHsmSettings, connector_for, credentials};
use crate::policy::Policy;

const WHAT: &str = "YubiHSM credential";

/// Where sysfs lists USB devices.
const SYSFS_USB: &str = "/sys/bus/usb/devices";

/// The preflight of the credential file: resolvable, present, a regular
/// file only its owner (root or the daemon's user) may access.
pub(super) fn check_credential_file(cfg: &Config) -> Option<Finding> {
    let y = cfg.hsm.yubihsm()?;
    let source = resolve_credential_for(cfg, &y.credential_file);
    let Some(path) = source.path() else {
        let name = y.credential_file.display();
        return Some(Finding::error(
            Code::CredentialUnresolved,
            WHAT,
            None,
            format!(
                "hsm.credential_file {:?} names a systemd credential, but CREDENTIALS_DIRECTORY is not set and no {UNIT} names its source",
                name.to_string()
            ),
            format!(
                "install a YubiHSM drop-in (LoadCredential={name}:/etc/keyward/credentials/{name}; see /usr/share/doc/keyward/examples/drop-ins/), or set hsm.credential_file in {} to an absolute path",
                cfg.file.display()
            ),
        ));
    };
    secret_file_finding(path, &source, &CREDENTIAL_FILE)
}

/// The signer's credential file.
const CREDENTIAL_FILE: SecretFileKind = SecretFileKind {
    what: WHAT,
    noun: "credential",
    missing: Code::CredentialMissing,
    refused: Code::CredentialRefused,
    written_by: "run `keyward hsm setup yubihsm` (it writes the signer's AUTH_KEY_ID:PASSWORD there, mode 0400)",
    pronoun: "them",
    holding: "AUTH_KEY_ID:PASSWORD",
};

/// The finding for a credential file that passed the preflight but cannot
/// be used (not `AUTH_KEY_ID:PASSWORD`, empty): `detail` never holds the
/// password ([`credentials::read_credentials`]).
fn malformed(path: Option<&Path>, detail: &str) -> Finding {
    let fix = match path {
        Some(p) => format!(
            "write one line `AUTH_KEY_ID:PASSWORD` (the signer's authentication key id, a colon, its password) to {}, mode 0400; `keyward hsm setup yubihsm` does",
            p.display()
        ),
        None => "write one line `AUTH_KEY_ID:PASSWORD` to the credential file, mode 0400; `keyward hsm setup yubihsm` does".to_owned(),
    };
    Finding::error(
        Code::CredentialMalformed,
        WHAT,
        path,
        format!("the credential cannot be used: {detail}"),
        fix,
    )
}

/// [`super::hsm_finding`] for the YubiHSM: a credential the backend could
/// not use. A device that does not answer may answer later: `None`.
pub(super) fn hsm_finding(e: &HsmError) -> Option<Finding> {
    match e {
        HsmError::Pin(detail) => Some(malformed(None, detail)),
        _ => None,
    }
}

/// `the YubiHSM 2 at usb` / `... at http://127.0.0.1:12345`, for messages.
pub(super) fn device_name(y: &YubiHsmBackendConfig) -> String {
    format!("the YubiHSM 2 at {}", y.connector)
}

/// Whether the device can be reached at all: a TCP connection to the
/// connector, or a YubiHSM 2 (USB 1050:0030) in sysfs. `Ok` says what was
/// found.
fn reachable(connector: &YubiHsmConnector, timeout_ms: u64) -> Result<String, String> {
    match connector {
        YubiHsmConnector::Http { addr, port } => {
            let addrs: Vec<_> = (addr.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve the connector's address {connector}: {e}"))?
                .collect();
            let timeout = Duration::from_millis(timeout_ms.clamp(100, 5_000));
            let mut last = None;
            for a in &addrs {
                match TcpStream::connect_timeout(a, timeout) {
                    Ok(_) => {
                        return Ok(format!(
                            "yubihsm-connector at {connector} accepts connections"
                        ));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) => format!("nothing accepts connections at {connector}: {e}"),
                None => format!("{connector} resolves to no address"),
            })
        }
        YubiHsmConnector::Usb { serial } => {
            let found = usb_devices(Path::new(SYSFS_USB));
            let matching: Vec<&String> = found
                .iter()
                .filter(|s| serial.as_ref().is_none_or(|want| same_serial(want, s)))
                .collect();
            match (matching.as_slice(), serial) {
                ([], None) => Err(format!(
                    "no YubiHSM 2 (USB 1050:0030) is plugged in (none under {SYSFS_USB})"
                )),
                ([], Some(want)) => Err(format!(
                    "no YubiHSM 2 with serial number {want} is plugged in (found: {})",
                    if found.is_empty() {
                        "none".to_owned()
                    } else {
                        found.join(", ")
                    }
                )),
                ([_, _, ..], None) => Err(format!(
                    "{} YubiHSM 2 devices are plugged in ({}): name one with connector = \"usb:SERIAL\"",
                    matching.len(),
                    found.join(", ")
                )),
                ([s, ..], _) => Ok(format!("YubiHSM 2 with serial number {s} is plugged in")),
            }
        }
    }
}

/// Serial numbers (as sysfs gives them) of the YubiHSM 2 devices under
/// `sysfs`.
fn usb_devices(sysfs: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sysfs) else {
        return Vec::new();
    };
    let attr = |dir: &Path, name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|d| attr(d, "idVendor") == "1050" && attr(d, "idProduct") == "0030")
        .map(|d| attr(&d, "serial"))
        .collect();
    out.sort();
    out
}

/// Serial numbers compared as numbers (the device reports them padded).
fn same_serial(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn unreachable_fix(cfg: &Config, connector: &YubiHsmConnector) -> String {
    match connector {
        YubiHsmConnector::Http { .. } => format!(
            "start yubihsm-connector (systemctl start yubihsm-connector) and check it listens on {connector}, or correct hsm.connector in {}",
            cfg.file.display()
        ),
        YubiHsmConnector::Usb { .. } => format!(
            "plug in the YubiHSM 2, give user keyward its device with the udev rule in the yubihsm-usb.conf drop-in (/usr/share/doc/keyward/examples/drop-ins/), or correct hsm.connector in {}",
            cfg.file.display()
        ),
    }
}

/// The live checks: credential content, connector or device, a session
/// with the authentication key, then every key the policy names. Changes
/// nothing on the device.
pub(super) fn check_device(
    cfg: &Config,
    y: &YubiHsmBackendConfig,
    policy: Option<&Policy>,
    report: &mut Report,
) {
    let source = resolve_credential_for(cfg, &y.credential_file);
    let Some(path) = source.path() else {
        // The preflight named it.
        return;
    };
    if crate::secret_file::check_secret_file(path).is_err() {
        // The preflight named it (as a warning when this user may not look).
        report.skipped.push(format!(
            "the YubiHSM session and keys: {} cannot be read here",
            path.display()
        ));
        return;
    }
    let (auth_key, creds) = match credentials::read_credentials(path) {
        Ok(v) => v,
        Err(HsmError::Pin(detail)) => {
            report.findings.push(malformed(Some(path), &detail));
            return;
        }
        Err(e) => {
            report.findings.push(malformed(Some(path), &e.to_string()));
            return;
        }
    };
    report.ok(format!(
        "YubiHSM credential {} holds authentication key {auth_key} and a password",
        path.display()
    ));
    let device = device_name(y);
    match reachable(&y.connector, y.timeout_ms) {
        Ok(what) => report.ok(what),
        Err(problem) => {
            report.findings.push(Finding::error(
                Code::HsmConnectorUnreachable,
                "YubiHSM connector",
                None,
                problem,
                unreachable_fix(cfg, &y.connector),
            ));
            return;
        }
    }
    let unavailable = |e: &dyn std::fmt::Display| {
        Finding::error(
            Code::HsmUnavailable,
            "YubiHSM",
            None,
            format!("{device}: {e}"),
            unreachable_fix(cfg, &y.connector),
        )
    };
    let connector = match connector_for(&y.connector, y.timeout_ms) {
        Ok(c) => c,
        Err(e) => {
            report.findings.push(unavailable(&e));
            return;
        }
    };
    // A session of its own first, to tell a refused password from a device
    // that does not answer.
    match yubihsm::Client::open(connector.clone(), creds.clone(), false) {
        Ok(_) => {}
        Err(e) if *e.kind() == yubihsm::client::ErrorKind::AuthenticationError => {
            report.findings.push(Finding::error(
                Code::HsmAuthFailed,
                WHAT,
                Some(path),
                format!("{device} refused authentication key {auth_key} with the password in {}: {e}", path.display()),
                format!(
                    "write the signer's authentication key id and password to {} (`keyward hsm setup yubihsm` creates them), mode 0400",
                    path.display()
                ),
            ));
            return;
        }
        Err(e) => {
            report.findings.push(unavailable(&e));
            return;
        }
    }
    let hsm = match YubiHsm::with_connector(
        connector,
        creds,
        YubiHsmSettings {
            domains: y.domains.clone(),
            exportable_under_wrap: y.exportable_under_wrap,
            device: y.connector.to_string(),
        },
    ) {
        Ok(h) => h,
        Err(e) => {
            report.findings.push(unavailable(&e));
            return;
        }
    };
    report.ok(format!(
        "{device}: session opened with authentication key {auth_key}"
    ));
    super::live::check_keys(cfg, &hsm, policy, report);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn yubihsms_are_found_in_sysfs_by_vendor_product_and_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (dir, vendor, product, serial) in [
            ("1-1", "1050", "0030", "0012345678"),
            ("1-2", "1050", "0407", "999"),
            ("2-1", "1d6b", "0002", "0000:00:14.0"),
        ] {
            let d = sys.path().join(dir);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("idVendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("idProduct"), format!("{product}\n")).unwrap();
            std::fs::write(d.join("serial"), format!("{serial}\n")).unwrap();
        }
        assert_eq!(usb_devices(sys.path()), ["0012345678"]);
        assert!(same_serial("12345678", "0012345678"));
        assert!(!same_serial("12345679", "0012345678"));
        assert!(usb_devices(&sys.path().join("none")).is_empty());
    }
}
