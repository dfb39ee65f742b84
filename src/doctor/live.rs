//! The checks that open things: the HSM (PKCS#11: module, token, PIN;
//! YubiHSM: [`super::yubihsm`]; then the keys), the ledger (read-only) and
//! the mirror's files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{Code, Finding, Report};
use crate::config::{Config, HsmBackendConfig};
use crate::hsm::HsmError;
use crate::policy::Policy;
use crate::types::KeyName;

/// The PKCS#11 module file exists.
pub(super) fn check_module_file(cfg: &Config, out: &mut Vec<Finding>) {
    let Some(p) = cfg.hsm.pkcs11() else {
        return;
    };
    if !p.module.is_file() {
        out.push(Finding::error(
            Code::HsmModuleMissing,
            "PKCS#11 module",
            Some(&p.module),
            format!("{} does not exist", p.module.display()),
            format!(
                "install the HSM's module (SoftHSM2: apt install softhsm2), or correct hsm.module in {}",
                cfg.file.display()
            ),
        ));
    }
}

/// Where the token was looked for, for messages: the module, and the
/// module's environment (`SOFTHSM2_CONF=...`) when set.
fn token_place(cfg: &Config) -> String {
    let module = cfg
        .hsm
        .pkcs11()
        .map(|p| p.module.display().to_string())
        .unwrap_or_default();
    if cfg.hsm.env.is_empty() {
        module
    } else {
        let env: Vec<String> = cfg
            .hsm
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{module} ({})", env.join(" "))
    }
}

/// The finding for an HSM error that configuration causes and only an
/// operator can mend (no token of that label, a missing or refused PIN, a
/// PIN the token refuses); `None` for any other error (a device that does
/// not answer may answer later).
pub fn hsm_finding(cfg: &Config, e: &HsmError) -> Option<Finding> {
    if cfg.hsm.yubihsm().is_some() {
        return super::yubihsm::hsm_finding(e);
    }
    let label = cfg.hsm.device_label();
    match e {
        HsmError::TokenNotFound(_) => Some(Finding::error(
            Code::HsmTokenMissing,
            "HSM token",
            None,
            format!("token {label:?} not found in {}", token_place(cfg)),
            format!(
                "run `{}` (SoftHSM2: `{}`) to create it, or correct hsm.token_label in {}",
                keyward_cmd(cfg, "setup"),
                keyward_cmd(cfg, "setup --softhsm"),
                cfg.file.display()
            ),
        )),
        HsmError::Pin(detail) => {
            // The preflight names a missing or loose PIN file precisely;
            // this is what is left (an empty file, a race).
            Some(Finding::error(
                Code::PinRefused,
                "HSM PIN",
                None,
                format!("cannot read the PIN: {detail}"),
                "run `keyward setup`, or write the token's user PIN to the PIN file with mode 0400"
                    .to_owned(),
            ))
        }
        HsmError::Login { detail, .. } => Some(Finding::error(
            Code::HsmLoginFailed,
            "HSM PIN",
            None,
            format!("token {label:?} refused the PIN: {detail}"),
            "write the token's user PIN to the PIN file (mode 0400); `keyward setup` does"
                .to_owned(),
        )),
        _ => None,
    }
}

/// `keyward CMD` for a fix, with `--config` when the config is not the
/// default one.
fn keyward_cmd(cfg: &Config, cmd: &str) -> String {
    if cfg.file == Path::new(crate::config::DEFAULT_CONFIG) {
        format!("keyward {cmd}")
    } else {
        format!("keyward --config {} {cmd}", cfg.file.display())
    }
}

/// The HSM as messages name it: `HSM token "keyward"`, `the YubiHSM 2 at
/// usb`.
fn hsm_name(cfg: &Config) -> String {
    match cfg.hsm.yubihsm() {
        Some(y) => super::yubihsm::device_name(y),
        None => format!("HSM token {:?}", cfg.hsm.device_label()),
    }
}

/// The finding for a key the policy names that cannot be used.
pub fn key_finding(cfg: &Config, key: &str, e: &HsmError) -> Finding {
    let hsm = hsm_name(cfg);
    let policy = cfg.daemon.policy.display();
    match e {
        HsmError::KeyNotFound(_) => Finding::error(
            Code::KeyMissing,
            "signing key",
            Some(&cfg.daemon.policy),
            format!("key {key:?} named by policy {policy} is not in {hsm}"),
            format!(
                "{} (or remove it from {policy})",
                keyward_cmd(cfg, &format!("key create {key}"))
            ),
        ),
        HsmError::UnprotectedKey { .. } => Finding::error(
            Code::KeyUnprotected,
            "signing key",
            Some(&cfg.daemon.policy),
            format!("key {key:?} named by policy {policy} is refused: {e}"),
            format!(
                "generate a new key inside the HSM ({}) and name it in {policy} instead; never import one",
                keyward_cmd(cfg, "key create NAME")
            ),
        ),
        // Never "make a new key": `key create` refuses a registered name,
        // and a key that changed under its label is an incident.
        HsmError::KeyMismatch { .. } => Finding::error(
            Code::KeyMismatch,
            "signing key",
            Some(&cfg.daemon.policy),
            format!("key {key:?} named by policy {policy} is refused: {e}"),
            format!(
                "the key on the token is not the one the ledger registered: treat it as an incident (the token was changed outside keyward, or is not this ledger's); restore the token directory that belongs to this ledger from a verified backup ({}), never sign with the replacement",
                keyward_cmd(cfg, "backup verify IN")
            ),
        ),
        _ => Finding::error(
            Code::KeyUnusable,
            "signing key",
            Some(&cfg.daemon.policy),
            format!("key {key:?} named by policy {policy} cannot be used: {e}"),
            format!(
                "generate a new key inside the HSM (keyward key create NAME) and name it in {policy}"
            ),
        ),
    }
}

/// Opens the HSM as keywardd would (the PIN from where the daemon gets it,
/// or from the unit's credential source outside systemd), and finds every
/// key the policy names. Changes nothing in the HSM.
pub(super) fn check_hsm(cfg: &Config, policy: Option<&Policy>, report: &mut Report) {
    if let Some(y) = cfg.hsm.yubihsm() {
        super::yubihsm::check_device(cfg, y, policy, report);
        return;
    }
    let mut hsm_cfg = cfg.hsm.clone();
    match &mut hsm_cfg.backend {
        HsmBackendConfig::Pkcs11(p) => {
            if let Some(path) = super::resolve_pin_for(cfg, &p.pin_file).path() {
                p.pin_file = path.to_path_buf();
            }
            // One session is enough to look.
            p.max_sessions = Some(1);
        }
        // Checked by super::yubihsm above.
        HsmBackendConfig::YubiHsm(_) => return,
    }
    let hsm = match crate::hsm::open(&hsm_cfg) {
        Ok(hsm) => hsm,
        Err(e) => {
            report
                .findings
                .push(hsm_finding(cfg, &e).unwrap_or_else(|| {
                    Finding::error(
                        Code::HsmUnavailable,
                        "HSM",
                        None,
                        format!("{e}"),
                        format!(
                            "check that the device is present and hsm.module in {} is its module",
                            cfg.file.display()
                        ),
                    )
                }));
            return;
        }
    };
    report.ok(format!(
        "HSM token {:?} found in {}, PIN accepted",
        cfg.hsm.device_label(),
        token_place(cfg)
    ));
    check_keys(cfg, hsm.as_ref(), policy, report);
}

/// Every key the policy names, found and passing the backend's protection
/// checks, and the audit key when it exists.
pub(super) fn check_keys(
    cfg: &Config,
    hsm: &dyn crate::hsm::Hsm,
    policy: Option<&Policy>,
    report: &mut Report,
) {
    let Some(policy) = policy else {
        return;
    };
    // Keys are found as keywardd finds them: through the ledger's key
    // registry when the ledger has one (a rotated key's label is not its name).
    let registry = registry_reader(cfg);
    for name in policy.all_keys() {
        let found = match &registry {
            Some(conn) => crate::service::keys::find_serving(hsm, conn, &name),
            None => hsm.find_ed25519(&name),
        };
        match found {
            Ok(_) => report.ok(format!("key {:?} found in the HSM", name.as_str())),
            Err(e) => report.findings.push(key_finding(cfg, name.as_str(), &e)),
        }
    }
    // The audit key is made at the first start; later starts need it.
    if let Ok(audit) = KeyName::new(crate::ledger::checkpoint::AUDIT_KEY)
        && hsm.find_ed25519(&audit).is_ok()
    {
        report.ok("audit key found in the HSM");
    }
}

/// A read-only connection to the ledger when it exists and has the key
/// registry (schema version 2 or later).
fn registry_reader(cfg: &Config) -> Option<rusqlite::Connection> {
    use rusqlite::{Connection, OpenFlags};
    let path = cfg.ledger_path();
    if !path.exists() {
        return None;
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    crate::ledger::registry::all(&conn).ok()?;
    Some(conn)
}

/// Opens the ledger read-only (never the writer's lock: the daemon may
/// be running) and checks that this binary knows its schema.
pub(super) fn check_ledger(cfg: &Config, report: &mut Report) {
    use rusqlite::{Connection, OpenFlags};
    let path = cfg.ledger_path();
    if !path.exists() {
        report.ok(format!(
            "ledger {} does not exist yet (keywardd creates it)",
            path.display()
        ));
        return;
    }
    let conn = match Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => {
            report.findings.push(unreadable(cfg, &path, &e.to_string()));
            return;
        }
    };
    match crate::schema::check_readable(&conn) {
        Ok(v) => report.ok(format!(
            "ledger {} opens read-only, schema version {v} (this binary: {})",
            path.display(),
            crate::schema::CURRENT
        )),
        Err(e @ crate::schema::SchemaError::TooNew { .. }) => {
            report.findings.push(Finding::error(
                Code::LedgerSchemaTooNew,
                "ledger",
                Some(&path),
                e.to_string(),
                "install the keyward version that wrote it (or newer)".to_owned(),
            ));
        }
        Err(e) => report.findings.push(unreadable(cfg, &path, &e.to_string())),
    }
    check_drills(&conn, &path, report);
}

/// The last drill of each kind, as health reports it: a failed or too old
/// one is a warning (health is degraded), one never run is said, not
/// counted against the box.
fn check_drills(conn: &rusqlite::Connection, path: &Path, report: &mut Report) {
    use crate::service::drills::{KINDS, last_drills};
    let Ok(last) = last_drills(conn) else {
        return; // a ledger from before schema 2: keywardd migrates it
    };
    let now = crate::ledger::now_ms();
    for kind in KINDS {
        match last.iter().find(|d| d.kind == kind) {
            None => report.ok(format!(
                "drill {kind}: never run (not degraded; keyward-drill.timer runs it quarterly, or `keyward drill {kind}`)"
            )),
            Some(d) => match d.degraded_reason(now) {
                None => report.ok(format!(
                    "drill {kind}: passed {} days ago",
                    d.age_days(now)
                )),
                Some(why) => report.findings.push(
                    Finding::error(
                        Code::DrillStale,
                        "drills",
                        Some(path),
                        why,
                        format!("run `keyward drill {kind}` (README, \"Drills\")"),
                    )
                    .warning(),
                ),
            },
        }
    }
}

fn unreadable(cfg: &Config, path: &Path, detail: &str) -> Finding {
    Finding::error(
        Code::LedgerUnreadable,
        "ledger",
        Some(path),
        format!("cannot open {} read-only: {detail}", path.display()),
        format!(
            "run the check as the daemon's user or root; the ledger belongs in {}",
            cfg.daemon.state_dir.display()
        ),
    )
}

/// The mirror's acknowledgement directory, its file sink's directory and
/// its NATS password file. Warnings: keywardd starts without them, but
/// the mirror does not, and signing stops once it lags.
pub(super) fn check_mirror(cfg: &Config, report: &mut Report) {
    let Some(m) = &cfg.mirror else {
        return;
    };
    let ack_dir = m
        .ack_dir
        .clone()
        .unwrap_or_else(|| cfg.daemon.state_dir.join("mirror"));
    let before = report.findings.len();
    match std::fs::metadata(&ack_dir) {
        Ok(meta) if meta.is_dir() => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o002 != 0 {
                report.findings.push(
                    Finding::error(
                        Code::MirrorAckDir,
                        "mirror acknowledgement directory",
                        Some(&ack_dir),
                        format!(
                            "{} has mode {mode:04o}: every user may fake what the mirror acknowledged",
                            ack_dir.display()
                        ),
                        format!("chmod 0750 {}", ack_dir.display()),
                    )
                    .warning(),
                );
            }
        }
        Ok(_) => report.findings.push(
            Finding::error(
                Code::MirrorAckDir,
                "mirror acknowledgement directory",
                Some(&ack_dir),
                format!("{} is not a directory", ack_dir.display()),
                format!("remove it; mkdir -m 0750 {}", ack_dir.display()),
            )
            .warning(),
        ),
        Err(_) => report.findings.push(
            Finding::error(
                Code::MirrorAckDir,
                "mirror acknowledgement directory",
                Some(&ack_dir),
                format!("{} does not exist", ack_dir.display()),
                format!(
                    "mkdir -m 0750 {} and give it to the mirror's user (chown keyward-mirror:keyward)",
                    ack_dir.display()
                ),
            )
            .warning(),
        ),
    }
    if let Some(file) = &m.file
        && let Some(dir) = file.parent()
        && !dir.is_dir()
    {
        report.findings.push(
            Finding::error(
                Code::MirrorSink,
                "mirror file sink",
                Some(file),
                format!("the directory of {} does not exist", file.display()),
                format!(
                    "mkdir -m 0750 {} and give it to the mirror's user",
                    dir.display()
                ),
            )
            .warning(),
        );
    }
    if let Some(pw) = m.nats.as_ref().and_then(|n| n.password_file.as_ref()) {
        use crate::secret_file::SecretFileError;
        match crate::secret_file::check_secret_file(pw) {
            // The file belongs to the mirror's user, not to whoever checks.
            Ok(()) | Err(SecretFileError::Owner { .. }) => {}
            Err(e) => {
                let fix = match &e {
                    SecretFileError::Mode { .. } => format!("chmod 0400 {}", pw.display()),
                    _ => format!(
                        "write the NATS user's password to {} (mode 0400, owned by the mirror's user)",
                        pw.display()
                    ),
                };
                report.findings.push(
                    Finding::error(
                        Code::MirrorPasswordFile,
                        "NATS password file",
                        Some(pw),
                        e.to_string(),
                        fix,
                    )
                    .warning(),
                );
            }
        }
    }
    if report.findings.len() == before {
        report.ok(format!(
            "mirror files ({} sink(s), acknowledgements in {})",
            crate::mirror::sinks(m).len(),
            ack_dir.display()
        ));
    }
}
