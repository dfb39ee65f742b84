//! Configuration checks: what `keywardd --check-config` and `keyward
//! doctor` print, and what keywardd refuses to start with.
//!
//! Every check yields [`Finding`]s: what was checked, the file, what is
//! wrong and the command that fixes it, under a stable [`Code`]. Two sets:
//!
//! - [`preflight`]: files and directories only (owners and modes of the
//!   config, the policy, the PIN file or the YubiHSM credential file, the
//!   state directory, the sockets' directory, the HSM module's presence). keywardd runs it at every start
//!   and refuses to start on any error ([`Severity::Error`]).
//! - [`check`]: the preflight, then the policy, the HSM (PKCS#11: module,
//!   token by label, PIN login; YubiHSM: the credential file's content, the
//!   connector or USB device, a session with the authentication key; then
//!   every key the policy names, with the backend's protection checks), the
//!   ledger (opened
//!   read-only, schema version known) and the mirror configuration. It
//!   never takes the ledger's writer lock and never writes to the ledger or
//!   the HSM, so it is safe beside a running daemon.
//!
//! ```no_run
//! let report = keyward::doctor::check(std::path::Path::new("/etc/keyward/keyward.toml"));
//! print!("{report}");
//! std::process::exit(if report.passed() { 0 } else { 1 });
//! ```

mod credential;
mod live;
mod perms;
mod yubihsm;

use std::fmt;
use std::path::{Path, PathBuf};

pub use credential::{
    PinSource, layout_credential_source, resolve_pin, resolve_pin_for, unit_credential_source,
};
pub use live::{hsm_finding, key_finding};

use crate::config::Config;

/// Whether a finding stops the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// keywardd would refuse to start (or must not be started) like this.
    Error,
    /// keywardd starts, but something needs the operator's attention (the
    /// mirror's files, which keywardd itself does not use).
    Warning,
}

/// The stable code of a finding (`as_str` gives its snake_case name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The config file cannot be read or is invalid.
    ConfigInvalid,
    /// A file others may change: group- or world-writable.
    FileWritableByOthers,
    /// A config or policy file owned by someone other than root or the
    /// daemon's user.
    FileWrongOwner,
    /// The policy cannot be read or is invalid.
    PolicyInvalid,
    /// A relative `pin_file` outside systemd, and no unit names its source.
    PinUnresolved,
    /// The PIN file does not exist.
    PinMissing,
    /// The PIN file exists but is refused (mode, owner, type, content).
    PinRefused,
    /// The state directory is readable or writable by everyone, or not a
    /// directory.
    StateDirUnsafe,
    /// A socket's directory neither exists nor can be created.
    SocketDirMissing,
    /// A socket's directory is writable by everyone.
    SocketDirUnsafe,
    /// The PKCS#11 module file does not exist.
    HsmModuleMissing,
    /// The PKCS#11 module cannot be loaded or the device does not answer.
    HsmUnavailable,
    /// No token carries the configured label.
    HsmTokenMissing,
    /// The token refused the PIN.
    HsmLoginFailed,
    /// A key the policy names is not in the HSM.
    KeyMissing,
    /// A key the policy names is in the HSM but cannot be used.
    KeyUnusable,
    /// A key the policy names is in the HSM but not protected as keyward
    /// requires (extractable, imported, able to do more than sign).
    KeyUnprotected,
    /// YubiHSM: a relative `credential_file` outside systemd, and no unit
    /// names its source.
    CredentialUnresolved,
    /// YubiHSM: the credential file does not exist.
    CredentialMissing,
    /// YubiHSM: the credential file is refused (mode, owner, type).
    CredentialRefused,
    /// YubiHSM: the credential file is not `AUTH_KEY_ID:PASSWORD`.
    CredentialMalformed,
    /// YubiHSM: nothing answers at the connector's address, or no YubiHSM
    /// is plugged in.
    HsmConnectorUnreachable,
    /// YubiHSM: the device refused the authentication key or password.
    HsmAuthFailed,
    /// The ledger database cannot be opened read-only.
    LedgerUnreadable,
    /// The ledger database is of a newer schema than this binary.
    LedgerSchemaTooNew,
    /// The mirror's acknowledgement directory is missing or unsafe.
    MirrorAckDir,
    /// A mirror sink's file or directory is missing or unsafe.
    MirrorSink,
    /// The NATS password file is missing or refused.
    MirrorPasswordFile,
    /// The HSM object the ledger's key registry names for a key has
    /// another public key than the registered one: replaced behind
    /// keyward's back, or a token that is not this ledger's.
    KeyMismatch,
    /// The last drill of a kind failed or is older than 92 days (a
    /// warning: health is degraded, keywardd starts).
    DrillStale,
}

impl Code {
    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::ConfigInvalid => "config_invalid",
            Code::FileWritableByOthers => "file_writable_by_others",
            Code::FileWrongOwner => "file_wrong_owner",
            Code::PolicyInvalid => "policy_invalid",
            Code::PinUnresolved => "pin_unresolved",
            Code::PinMissing => "pin_missing",
            Code::PinRefused => "pin_refused",
            Code::StateDirUnsafe => "state_dir_unsafe",
            Code::SocketDirMissing => "socket_dir_missing",
            Code::SocketDirUnsafe => "socket_dir_unsafe",
            Code::HsmModuleMissing => "hsm_module_missing",
            Code::HsmUnavailable => "hsm_unavailable",
            Code::HsmTokenMissing => "hsm_token_missing",
            Code::HsmLoginFailed => "hsm_login_failed",
            Code::KeyMissing => "key_missing",
            Code::KeyUnusable => "key_unusable",
            Code::KeyUnprotected => "key_unprotected",
            Code::CredentialUnresolved => "credential_unresolved",
            Code::CredentialMissing => "credential_missing",
            Code::CredentialRefused => "credential_refused",
            Code::CredentialMalformed => "credential_malformed",
            Code::HsmConnectorUnreachable => "hsm_connector_unreachable",
            Code::HsmAuthFailed => "hsm_auth_failed",
            Code::LedgerUnreadable => "ledger_unreadable",
            Code::LedgerSchemaTooNew => "ledger_schema_too_new",
            Code::MirrorAckDir => "mirror_ack_dir",
            Code::MirrorSink => "mirror_sink",
            Code::MirrorPasswordFile => "mirror_password_file",
            Code::KeyMismatch => "key_mismatch",
            Code::DrillStale => "drill_stale",
        }
    }
}

/// One problem found: what was checked, the file, what is wrong, and the
/// fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Stable code.
    pub code: Code,
    /// Error or warning.
    pub severity: Severity,
    /// What was checked, e.g. `configuration file`, `HSM PIN`.
    pub what: String,
    /// The file or directory concerned, when there is one.
    pub path: Option<PathBuf>,
    /// What is wrong, naming the file.
    pub problem: String,
    /// What to do, as a command where there is one
    /// (`chmod 0640 /etc/keyward/keyward.toml`).
    pub fix: String,
}

impl Finding {
    fn error(code: Code, what: &str, path: Option<&Path>, problem: String, fix: String) -> Self {
        Finding {
            code,
            severity: Severity::Error,
            what: what.to_owned(),
            path: path.map(Path::to_path_buf),
            problem,
            fix,
        }
    }

    fn warning(self) -> Self {
        Finding {
            severity: Severity::Warning,
            ..self
        }
    }
}

impl fmt::Display for Finding {
    /// One line: `what: problem (fix: ...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.what, self.problem, self.fix)
    }
}

/// Findings that stop keywardd from starting, as one error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refusal(pub Vec<Finding>);

impl Refusal {
    /// The code of the first finding.
    pub fn code(&self) -> &'static str {
        self.0.first().map_or("invalid_config", |f| f.code.as_str())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for finding in &self.0 {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// The outcome of [`check`]: every finding, and what passed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Everything found, in the order checked.
    pub findings: Vec<Finding>,
    /// The checks that passed, in words (`HSM token "keyward" found`).
    pub passed: Vec<String>,
    /// The checks not made, and why.
    pub skipped: Vec<String>,
}

impl Report {
    /// True when keywardd would start: no [`Severity::Error`] finding.
    pub fn passed(&self) -> bool {
        !self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    fn ok(&mut self, what: impl Into<String>) {
        self.passed.push(what.into());
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.passed {
            writeln!(f, "ok       {p}")?;
        }
        for s in &self.skipped {
            writeln!(f, "skipped  {s}")?;
        }
        for finding in &self.findings {
            let tag = match finding.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "warning",
            };
            writeln!(
                f,
                "{tag:<8} [{}] {}: {}",
                finding.code.as_str(),
                finding.what,
                finding.problem
            )?;
            writeln!(f, "         fix: {}", finding.fix)?;
        }
        let errors = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count();
        if errors == 0 {
            writeln!(f, "keywardd would start with this configuration")
        } else {
            writeln!(
                f,
                "keywardd would refuse to start: {errors} problem(s) above"
            )
        }
    }
}

/// The checks keywardd makes at every start before it opens anything:
/// owners and modes of its files and directories, the PIN file's presence
/// and mode, the HSM module's presence. Never reads a secret.
pub fn preflight(cfg: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    perms::check_config_files(cfg, &mut findings);
    findings.extend(credential::check_pin_file(cfg));
    findings.extend(yubihsm::check_credential_file(cfg));
    perms::check_state_dir(cfg, &mut findings);
    perms::check_socket_dirs(cfg, &mut findings);
    live::check_module_file(cfg, &mut findings);
    findings
}

/// [`preflight`] as keywardd's start-up uses it: `Err` with every error
/// finding; warnings are returned to be logged.
pub fn refuse_unsafe(cfg: &Config) -> Result<Vec<Finding>, Refusal> {
    let (errors, warnings): (Vec<_>, Vec<_>) = preflight(cfg)
        .into_iter()
        .partition(|f| f.severity == Severity::Error);
    if errors.is_empty() {
        Ok(warnings)
    } else {
        Err(Refusal(errors))
    }
}

/// Every check, on the config file at `config` (see the module docs).
/// Blocking: it loads the PKCS#11 module and logs in, or opens a session
/// on the YubiHSM. The module's
/// environment (`[hsm] env`) must already be set
/// ([`crate::process::apply_module_env`]).
pub fn check(config: &Path) -> Report {
    let mut report = Report::default();
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            report.findings.push(Finding::error(
                Code::ConfigInvalid,
                "configuration file",
                Some(config),
                e.to_string(),
                format!(
                    "correct {} (see keyward.toml(5) in the README)",
                    config.display()
                ),
            ));
            return report;
        }
    };
    report.ok(format!("configuration {} loads", config.display()));
    check_loaded(&cfg, &mut report);
    report
}

/// [`check`] on a loaded config.
fn check_loaded(cfg: &Config, report: &mut Report) {
    let pre = preflight(cfg);
    if pre.is_empty() {
        report.ok(match cfg.hsm.yubihsm() {
            None => "owners and modes of the config, policy, PIN, state and socket directories",
            Some(_) => {
                "owners and modes of the config, policy, YubiHSM credential, state and socket directories"
            }
        });
    }
    let hsm_possible = !pre.iter().any(|f| {
        f.severity == Severity::Error
            && matches!(
                f.code,
                Code::PinMissing
                    | Code::PinRefused
                    | Code::PinUnresolved
                    | Code::HsmModuleMissing
                    | Code::CredentialUnresolved
                    | Code::CredentialMissing
                    | Code::CredentialRefused
            )
    });
    report.findings.extend(pre);
    let policy = match crate::policy::Policy::load(&cfg.daemon.policy) {
        Ok(p) => {
            report.ok(format!("policy {} loads", cfg.daemon.policy.display()));
            Some(p)
        }
        Err(e) => {
            report.findings.push(Finding::error(
                Code::PolicyInvalid,
                "policy file",
                Some(&cfg.daemon.policy),
                e.to_string(),
                format!(
                    "correct it (`keyward policy check {}` shows the same)",
                    cfg.daemon.policy.display()
                ),
            ));
            None
        }
    };
    if hsm_possible {
        live::check_hsm(cfg, policy.as_ref(), report);
    } else {
        report.skipped.push(
            match cfg.hsm.yubihsm() {
                None => "the HSM token, PIN login and keys: mend the PIN file or module first",
                Some(_) => {
                    "the YubiHSM's connector, session and keys: mend the credential file first"
                }
            }
            .into(),
        );
    }
    live::check_ledger(cfg, report);
    live::check_mirror(cfg, report);
}

/// Runs [`check`] for a command line (`keywardd --check-config`, `keyward
/// doctor`): sets the module's environment, prints the report on stdout
/// and returns the exit status (0 when keywardd would start, 1 otherwise).
///
/// Call it from `main` while the process has a single thread: the module's
/// environment is set here.
pub fn run_cli(config: &Path) -> u8 {
    if let Ok(cfg) = Config::load(config) {
        crate::process::apply_module_env(&cfg);
    }
    let report = check(config);
    print!("{report}");
    if report.passed() { 0 } else { 1 }
}
