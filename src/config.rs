//! `keyward.toml` loading and validation.
//!
//! Every error names the file, the key and what is wrong, so an operator can
//! fix a bad config without guessing. Unknown keys are errors: a misspelt
//! setting must never be silently ignored on a signer.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default location of the daemon configuration.
pub const DEFAULT_CONFIG: &str = "/etc/keyward/keyward.toml";

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Line and column (1-based) when known.
    pub position: Option<(usize, usize)>,
    /// Dotted key path, e.g. `agents.trader.limits.SOL.per_tx`; empty when the
    /// problem is the file as a whole.
    pub key: String,
    /// What is wrong and, where possible, what to do.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl ConfigError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        "invalid_config"
    }

    pub(crate) fn new(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            position: None,
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// Turns a TOML parse/deserialize error into a config error with line,
    /// column and the dotted key path where it is known.
    pub(crate) fn from_toml(file: &Path, text: &str, err: &toml::de::Error, key: String) -> Self {
        let position = err.span().map(|span| line_col(text, span.start));
        ConfigError {
            file: file.to_path_buf(),
            position,
            key,
            problem: err.message().trim().to_owned(),
        }
    }
}

/// Deserializes TOML `text` (read from `file`) into `T`; an error names the
/// file, the line and column and the dotted key path of the bad value.
pub(crate) fn from_toml_str<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError::from_toml(file, text, &e, String::new()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { String::new() } else { path };
        ConfigError::from_toml(file, text, e.inner(), key)
    })
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// Reads a config file as UTF-8 text, mapping I/O errors to [`ConfigError`].
pub(crate) fn read_text(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, "", format!("cannot read the file: {e}")))
}

/// The whole `keyward.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Path of the file this was loaded from.
    pub file: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[hsm]`.
    pub hsm: HsmConfig,
    /// `[ledger]`.
    pub ledger: LedgerConfig,
    /// `[mirror]`, when entries are shipped to an external copy.
    pub mirror: Option<MirrorConfig>,
}

/// `[mirror]` section: where `keyward mirror` ships entries, and how far it
/// may fall behind before keywardd stops signing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Append-only JSON-lines file (a separate mount, or a file a syslog
    /// pipeline reads).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A NATS JetStream stream.
    #[serde(default)]
    pub nats: Option<NatsSinkConfig>,
    /// keywardd refuses to sign with more unmirrored entries than this
    /// (default 1000).
    #[serde(default = "default_unmirrored_entries")]
    pub max_unmirrored_entries: u64,
    /// ... or when the oldest unmirrored entry is older than this, in
    /// seconds (default 300).
    #[serde(default = "default_unmirrored_age")]
    pub max_unmirrored_age_s: u64,
    /// Where the mirror records what each sink acknowledged (default
    /// `<state_dir>/mirror`).
    #[serde(default)]
    pub ack_dir: Option<PathBuf>,
}

/// `[mirror.nats]`: a JetStream stream created with deny-delete and
/// deny-purge, written with the mirror's own restricted user.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// Server URL, e.g. `nats://10.0.0.5:4222`.
    pub url: String,
    /// Stream name (default `KEYWARD`).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subject the entries are published on (default `keyward.ledger`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// User name on the server.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the user's password (never the password itself).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_stream() -> String {
    "KEYWARD".to_owned()
}

fn default_subject() -> String {
    "keyward.ledger".to_owned()
}

fn default_unmirrored_entries() -> u64 {
    1000
}

fn default_unmirrored_age() -> u64 {
    300
}

/// `[daemon]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Agent socket path.
    pub agent_socket: PathBuf,
    /// Admin socket path (mode 0600, or 0660 with `admin_socket_group`).
    pub admin_socket: PathBuf,
    /// State directory; the ledger database lives here.
    pub state_dir: PathBuf,
    /// Policy file.
    pub policy: PathBuf,
    /// Group that owns the agent socket (mode 0660), e.g. `keyward-agents`.
    #[serde(default)]
    pub agent_socket_group: Option<String>,
    /// Group that owns the admin socket, e.g. `keyward-admin`: when set the
    /// socket is mode 0660 and that group's members may run the operator
    /// commands; when absent it is mode 0600 (the daemon's user only).
    #[serde(default)]
    pub admin_socket_group: Option<String>,
    /// Largest accepted request body in bytes (default 64 KiB).
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    /// Longest time one request may take, from its complete head to its
    /// response, in seconds (default 30). A submission that runs longer is
    /// still recorded to the end; the caller asks `GET /v1/intents/{id}`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
    /// Longest wait for a complete request head, in seconds (default 10).
    /// The clock runs whenever a connection waits for a request, so it also
    /// closes idle keep-alive connections.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_s: u64,
    /// Open connections allowed on each socket (default 256).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections allowed per peer uid on each socket (default 32).
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// On SIGTERM, how long in-flight requests may take to finish before
    /// the connections left are closed, in seconds (default 10).
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_s: u64,
    /// How long an intent waits for approvals before it expires, in
    /// seconds (default 900).
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_s: u64,
}

fn default_approval_ttl() -> u64 {
    900
}

fn default_body_limit() -> usize {
    64 * 1024
}

fn default_request_timeout() -> u64 {
    30
}

fn default_header_read_timeout() -> u64 {
    10
}

fn default_max_connections() -> usize {
    256
}

fn default_max_connections_per_uid() -> usize {
    // keyward-client opens one connection per concurrent request and keeps
    // idle ones for reuse: 64 lets an agent run a few dozen requests at
    // once while holding at most a quarter of the socket.
    64
}

fn default_shutdown_grace() -> u64 {
    10
}

/// Largest accepted `daemon.max_connections`.
pub const MAX_CONNECTIONS: usize = 16_384;

/// `[hsm]` section: the backend (tagged by `backend`, `"pkcs11"` when
/// absent), what every backend shares, and the executor's queue and
/// timeout (see [`crate::hsm::HsmExecutor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmConfig {
    /// The backend and its own settings.
    pub backend: HsmBackendConfig,
    /// Environment the backend's library needs, set before it is loaded
    /// (for example `SOFTHSM2_CONF`). Never put secrets here.
    pub env: BTreeMap<String, String>,
    /// Calls that may wait for an HSM worker (`hsm.queue_depth`, default
    /// [`DEFAULT_HSM_QUEUE_DEPTH`]).
    pub queue_depth: usize,
    /// How long a call waits for room in a full queue before it fails
    /// with `hsm_busy`, in ms (`hsm.queue_wait_ms`, default
    /// [`DEFAULT_HSM_QUEUE_WAIT_MS`]).
    pub queue_wait_ms: u64,
    /// The longest one HSM call may take, queue included, in ms
    /// (`hsm.call_timeout_ms`, default [`DEFAULT_HSM_CALL_TIMEOUT_MS`]).
    pub call_timeout_ms: u64,
}

/// The HSM backend `[hsm] backend` chooses, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HsmBackendConfig {
    /// `backend = "pkcs11"` (the default): any PKCS#11 module.
    Pkcs11(Pkcs11BackendConfig),
    /// `backend = "yubihsm"`: a YubiHSM 2 over its native protocol.
    YubiHsm(YubiHsmBackendConfig),
}

/// The settings of `backend = "yubihsm"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YubiHsmBackendConfig {
    /// How the device is reached (`hsm.connector`).
    pub connector: YubiHsmConnector,
    /// File holding `AUTH_KEY_ID:PASSWORD` of the signer's authentication
    /// key (`hsm.credential_file`); a relative path is looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), like `pin_file`.
    pub credential_file: PathBuf,
    /// The domains (1-16) of the objects keyward creates (`hsm.domains`,
    /// default `[1]`); they must be among the authentication key's.
    pub domains: Vec<u8>,
    /// Whether new Ed25519 keys may be exported under a wrap key, for
    /// backups (`hsm.exportable_under_wrap`, default false). When false,
    /// keyward also refuses keys that could be.
    pub exportable_under_wrap: bool,
    /// Timeout of one exchange with the device or connector, in ms
    /// (`hsm.timeout_ms`, default 10000).
    pub timeout_ms: u64,
}

/// Where a YubiHSM 2 is (`hsm.connector`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YubiHsmConnector {
    /// `"http://ADDR:PORT"`: a `yubihsm-connector` (normally on
    /// 127.0.0.1:12345).
    Http {
        /// Host address (an IP address).
        addr: String,
        /// TCP port.
        port: u16,
    },
    /// `"usb"` or `"usb:SERIAL"`: the device on USB, directly.
    Usb {
        /// The device's serial number (10 digits), when more than one may
        /// be attached.
        serial: Option<String>,
    },
}

/// Default `hsm.timeout_ms` of the YubiHSM backend.
pub const DEFAULT_YUBIHSM_TIMEOUT_MS: u64 = 10_000;

impl YubiHsmConnector {
    /// Parses `hsm.connector`.
    pub fn parse(s: &str) -> Result<YubiHsmConnector, String> {
        if s == "usb" {
            return Ok(YubiHsmConnector::Usb { serial: None });
        }
        if let Some(serial) = s.strip_prefix("usb:") {
            if serial.len() != 10 || !serial.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{s:?}: a YubiHSM serial number is 10 digits (\"usb:0123456789\")"
                ));
            }
            return Ok(YubiHsmConnector::Usb {
                serial: Some(serial.to_owned()),
            });
        }
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(format!(
                "{s:?}: expected \"http://ADDR:PORT\" (a yubihsm-connector), \"usb\" or \"usb:SERIAL\""
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let addr: std::net::SocketAddr = rest.parse().map_err(|_| {
            format!("{s:?}: expected \"http://IP:PORT\" with an IP address and a port")
        })?;
        if addr.port() == 0 {
            return Err(format!("{s:?}: port 0 is not a connector's port"));
        }
        Ok(YubiHsmConnector::Http {
            addr: addr.ip().to_string(),
            port: addr.port(),
        })
    }
}

impl std::fmt::Display for YubiHsmConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            YubiHsmConnector::Http { addr, port } if addr.contains(':') => {
                write!(f, "http://[{addr}]:{port}")
            }
            YubiHsmConnector::Http { addr, port } => write!(f, "http://{addr}:{port}"),
            YubiHsmConnector::Usb { serial: None } => f.write_str("usb"),
            YubiHsmConnector::Usb { serial: Some(s) } => write!(f, "usb:{s}"),
        }
    }
}

/// The settings of `backend = "pkcs11"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11BackendConfig {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token holding the keys (never a slot number).
    pub token_label: String,
    /// File holding the user PIN; a relative path is looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub pin_file: PathBuf,
    /// Largest number of concurrent HSM sessions, and so of HSM worker
    /// threads (default: 2 × cores).
    pub max_sessions: Option<usize>,
}

impl HsmConfig {
    /// The backend's name as `backend` spells it.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            HsmBackendConfig::Pkcs11(_) => "pkcs11",
            HsmBackendConfig::YubiHsm(_) => "yubihsm",
        }
    }

    /// What names the device holding the keys: the PKCS#11 token label
    /// (the default checkpoint origin is `keyward/<label>`).
    pub fn device_label(&self) -> &str {
        match &self.backend {
            HsmBackendConfig::Pkcs11(p) => &p.token_label,
            HsmBackendConfig::YubiHsm(_) => "yubihsm",
        }
    }

    /// The PKCS#11 settings, when that is the backend.
    pub fn pkcs11(&self) -> Option<&Pkcs11BackendConfig> {
        match &self.backend {
            HsmBackendConfig::Pkcs11(p) => Some(p),
            HsmBackendConfig::YubiHsm(_) => None,
        }
    }

    /// The YubiHSM settings, when that is the backend.
    pub fn yubihsm(&self) -> Option<&YubiHsmBackendConfig> {
        match &self.backend {
            HsmBackendConfig::YubiHsm(y) => Some(y),
            HsmBackendConfig::Pkcs11(_) => None,
        }
    }
}

/// Default `hsm.queue_depth`.
pub const DEFAULT_HSM_QUEUE_DEPTH: usize = 256;
/// Default `hsm.queue_wait_ms`.
pub const DEFAULT_HSM_QUEUE_WAIT_MS: u64 = 1_000;
/// Default `hsm.call_timeout_ms`: above the time a PKCS#11 module may take
/// to be re-opened after it lost its state, below the default request
/// timeout.
pub const DEFAULT_HSM_CALL_TIMEOUT_MS: u64 = 20_000;

/// `[hsm]` as written: every backend's keys, checked against `backend`
/// after parsing (so that unknown keys keep their line and column).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    module: Option<PathBuf>,
    #[serde(default)]
    token_label: Option<String>,
    #[serde(default)]
    pin_file: Option<PathBuf>,
    #[serde(default)]
    max_sessions: Option<usize>,
    #[serde(default)]
    connector: Option<String>,
    #[serde(default)]
    credential_file: Option<PathBuf>,
    #[serde(default)]
    domains: Option<Vec<u8>>,
    #[serde(default)]
    exportable_under_wrap: Option<bool>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    queue_depth: Option<usize>,
    #[serde(default)]
    queue_wait_ms: Option<u64>,
    #[serde(default)]
    call_timeout_ms: Option<u64>,
}

impl RawHsm {
    /// Validates `[hsm]` into its backend; `abs` resolves a path against
    /// the config file's directory.
    fn validate(
        self,
        file: &Path,
        abs: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<HsmConfig, ConfigError> {
        let err =
            |key: &str, problem: String| ConfigError::new(file, format!("hsm.{key}"), problem);
        let backend_name = self.backend.as_deref().unwrap_or("pkcs11");
        // A key of the other backend is a mistake worth a clear refusal.
        let pkcs11_keys = [
            ("module", self.module.is_some()),
            ("token_label", self.token_label.is_some()),
            ("pin_file", self.pin_file.is_some()),
            ("max_sessions", self.max_sessions.is_some()),
        ];
        let yubihsm_keys = [
            ("connector", self.connector.is_some()),
            ("credential_file", self.credential_file.is_some()),
            ("domains", self.domains.is_some()),
            (
                "exportable_under_wrap",
                self.exportable_under_wrap.is_some(),
            ),
            ("timeout_ms", self.timeout_ms.is_some()),
        ];
        let foreign = match backend_name {
            "pkcs11" => &yubihsm_keys[..],
            "yubihsm" => &pkcs11_keys[..],
            _ => &[][..],
        };
        if let Some((key, _)) = foreign.iter().find(|(_, set)| *set) {
            return Err(err(
                key,
                format!("is not a setting of backend {backend_name:?}"),
            ));
        }
        let backend = match backend_name {
            "pkcs11" => {
                let need = |key: &str, what: &str| {
                    err(key, format!("missing: backend \"pkcs11\" needs {what}"))
                };
                let module = self
                    .module
                    .ok_or_else(|| need("module", "the path of the PKCS#11 module"))?;
                let token_label = self
                    .token_label
                    .ok_or_else(|| need("token_label", "the label of the token"))?;
                let pin_file = self
                    .pin_file
                    .ok_or_else(|| need("pin_file", "the file holding the user PIN"))?;
                if token_label.is_empty() || token_label.len() > 32 {
                    return Err(err(
                        "token_label",
                        "must be 1-32 bytes (a PKCS#11 token label)".into(),
                    ));
                }
                if self.max_sessions == Some(0) {
                    return Err(err("max_sessions", "must be at least 1".into()));
                }
                HsmBackendConfig::Pkcs11(Pkcs11BackendConfig {
                    module: abs(&module),
                    token_label,
                    pin_file,
                    max_sessions: self.max_sessions,
                })
            }
            "yubihsm" => {
                let need = |key: &str, what: &str| {
                    err(key, format!("missing: backend \"yubihsm\" needs {what}"))
                };
                let connector = self.connector.ok_or_else(|| {
                    need(
                        "connector",
                        "the device's connector (\"http://127.0.0.1:12345\" or \"usb\")",
                    )
                })?;
                let connector =
                    YubiHsmConnector::parse(&connector).map_err(|e| err("connector", e))?;
                let credential_file = self.credential_file.ok_or_else(|| {
                    need(
                        "credential_file",
                        "the file holding the authentication key id and password",
                    )
                })?;
                let mut domains = self.domains.unwrap_or_else(|| vec![1]);
                domains.sort_unstable();
                domains.dedup();
                if domains.is_empty() || domains.iter().any(|d| !(1..=16).contains(d)) {
                    return Err(err(
                        "domains",
                        "must list domains between 1 and 16 (at least one)".into(),
                    ));
                }
                let timeout_ms = self.timeout_ms.unwrap_or(DEFAULT_YUBIHSM_TIMEOUT_MS);
                if !(100..=600_000).contains(&timeout_ms) {
                    return Err(err(
                        "timeout_ms",
                        "must be between 100 and 600000 (ten minutes)".into(),
                    ));
                }
                HsmBackendConfig::YubiHsm(YubiHsmBackendConfig {
                    connector,
                    credential_file,
                    domains,
                    exportable_under_wrap: self.exportable_under_wrap.unwrap_or(false),
                    timeout_ms,
                })
            }
            other => {
                return Err(err(
                    "backend",
                    format!(
                        "unknown backend {other:?}; this version supports \"pkcs11\" and \"yubihsm\""
                    ),
                ));
            }
        };
        for name in self.env.keys() {
            let upper = name.to_ascii_uppercase();
            if upper.contains("PIN") || upper.contains("SECRET") || upper.contains("PASSWORD") {
                return Err(err(
                    &format!("env.{name}"),
                    "looks like a secret; secrets never go into the environment (use pin_file)"
                        .into(),
                ));
            }
        }
        let queue_depth = self.queue_depth.unwrap_or(DEFAULT_HSM_QUEUE_DEPTH);
        if queue_depth == 0 || queue_depth > 65_536 {
            return Err(err("queue_depth", "must be between 1 and 65536".into()));
        }
        let queue_wait_ms = self.queue_wait_ms.unwrap_or(DEFAULT_HSM_QUEUE_WAIT_MS);
        if queue_wait_ms > 60_000 {
            return Err(err(
                "queue_wait_ms",
                "must be at most 60000 (one minute)".into(),
            ));
        }
        let call_timeout_ms = self.call_timeout_ms.unwrap_or(DEFAULT_HSM_CALL_TIMEOUT_MS);
        if call_timeout_ms == 0 || call_timeout_ms > 600_000 {
            return Err(err(
                "call_timeout_ms",
                "must be between 1 and 600000 (ten minutes)".into(),
            ));
        }
        Ok(HsmConfig {
            backend,
            env: self.env,
            queue_depth,
            queue_wait_ms,
            call_timeout_ms,
        })
    }
}

/// `[ledger]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Database path (default `<state_dir>/ledger.sqlite3`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Microseconds the ledger writer waits for more intents to join a
    /// durable commit (0, the default: commit at once; batches still form
    /// under load). At most 100000.
    #[serde(default)]
    pub commit_delay_us: u64,
    /// A signed checkpoint after this many new entries (default 1000).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ... or after this many seconds with new entries (default 60).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_s: u64,
    /// Origin line of checkpoints (default `keyward/<token label>`).
    #[serde(default)]
    pub origin: Option<String>,
    /// The audit key's verifier key, pinned outside the database at set-up
    /// (default `audit.vkey` beside this file, i.e. `/etc/keyward/audit.vkey`).
    /// keywardd refuses an HSM audit key that differs from it; `keyward
    /// audit verify` trusts only it (or `--vkey`).
    #[serde(default)]
    pub audit_vkey: Option<PathBuf>,
    /// Seconds between re-verifications of the entries written since the
    /// last verified one (default 300). A break stops signing.
    #[serde(default = "default_verify_interval")]
    pub verify_interval_s: u64,
}

fn default_verify_interval() -> u64 {
    300
}

fn default_checkpoint_every() -> u64 {
    1000
}

fn default_checkpoint_interval() -> u64 {
    60
}

/// Largest accepted `ledger.commit_delay_us`.
pub const MAX_COMMIT_DELAY_US: u64 = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: DaemonConfig,
    hsm: RawHsm,
    #[serde(default)]
    ledger: Option<LedgerConfig>,
    #[serde(default)]
    mirror: Option<MirrorConfig>,
}

impl Config {
    /// Loads and validates `file`. Relative paths in it are taken relative to
    /// the directory holding the file (except `hsm.pin_file`, see
    /// [`Pkcs11BackendConfig::pin_file`]).
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = read_text(file)?;
        Self::parse(file, &text)
    }

    /// Parses config text as if it had been read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = from_toml_str(file, text)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut daemon = raw.daemon;
        daemon.agent_socket = abs(&daemon.agent_socket);
        daemon.admin_socket = abs(&daemon.admin_socket);
        daemon.state_dir = abs(&daemon.state_dir);
        daemon.policy = abs(&daemon.policy);
        if daemon.agent_socket == daemon.admin_socket {
            return Err(ConfigError::new(
                file,
                "daemon.admin_socket",
                "the admin socket must differ from the agent socket",
            ));
        }
        if daemon.max_body_bytes < 1024 || daemon.max_body_bytes > 1024 * 1024 {
            return Err(ConfigError::new(
                file,
                "daemon.max_body_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if daemon.approval_ttl_s == 0 || daemon.approval_ttl_s > 7 * 86_400 {
            return Err(ConfigError::new(
                file,
                "daemon.approval_ttl_s",
                "must be between 1 second and 7 days",
            ));
        }
        if daemon.request_timeout_s == 0 || daemon.request_timeout_s > 600 {
            return Err(ConfigError::new(
                file,
                "daemon.request_timeout_s",
                "must be between 1 and 600 seconds",
            ));
        }
        if daemon.header_read_timeout_s == 0 || daemon.header_read_timeout_s > 600 {
            return Err(ConfigError::new(
                file,
                "daemon.header_read_timeout_s",
                "must be between 1 and 600 seconds",
            ));
        }
        if daemon.shutdown_grace_s == 0 || daemon.shutdown_grace_s > 300 {
            return Err(ConfigError::new(
                file,
                "daemon.shutdown_grace_s",
                "must be between 1 and 300 seconds (keep systemd's TimeoutStopSec above it)",
            ));
        }
        if daemon.max_connections == 0 || daemon.max_connections > MAX_CONNECTIONS {
            return Err(ConfigError::new(
                file,
                "daemon.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if daemon.max_connections_per_uid == 0
            || daemon.max_connections_per_uid > daemon.max_connections
        {
            return Err(ConfigError::new(
                file,
                "daemon.max_connections_per_uid",
                format!(
                    "must be between 1 and daemon.max_connections ({})",
                    daemon.max_connections
                ),
            ));
        }
        let hsm = raw.hsm.validate(file, &abs)?;
        let ledger = raw.ledger.unwrap_or(LedgerConfig {
            path: None,
            commit_delay_us: 0,
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval_s: default_checkpoint_interval(),
            origin: None,
            audit_vkey: None,
            verify_interval_s: default_verify_interval(),
        });
        if ledger.checkpoint_every == 0
            || ledger.checkpoint_interval_s == 0
            || ledger.verify_interval_s == 0
        {
            return Err(ConfigError::new(
                file,
                if ledger.checkpoint_every == 0 {
                    "ledger.checkpoint_every"
                } else if ledger.checkpoint_interval_s == 0 {
                    "ledger.checkpoint_interval_s"
                } else {
                    "ledger.verify_interval_s"
                },
                "must be at least 1",
            ));
        }
        if let Some(o) = &ledger.origin
            && (o.is_empty() || o.contains('\n') || o.chars().any(char::is_control))
        {
            return Err(ConfigError::new(
                file,
                "ledger.origin",
                "must be one non-empty line of text",
            ));
        }
        if ledger.commit_delay_us > MAX_COMMIT_DELAY_US {
            return Err(ConfigError::new(
                file,
                "ledger.commit_delay_us",
                format!(
                    "{} is too long; at most {MAX_COMMIT_DELAY_US} (0.1 s) is accepted",
                    ledger.commit_delay_us
                ),
            ));
        }
        let ledger = LedgerConfig {
            commit_delay_us: ledger.commit_delay_us,
            checkpoint_every: ledger.checkpoint_every,
            checkpoint_interval_s: ledger.checkpoint_interval_s,
            origin: ledger.origin.clone(),
            audit_vkey: Some(
                ledger
                    .audit_vkey
                    .as_deref()
                    .map(abs)
                    .unwrap_or_else(|| base.join("audit.vkey")),
            ),
            verify_interval_s: ledger.verify_interval_s,
            path: Some(
                ledger
                    .path
                    .map(|p| abs(&p))
                    .unwrap_or_else(|| daemon.state_dir.join("ledger.sqlite3")),
            ),
        };
        let mirror = match raw.mirror {
            None => None,
            Some(m) => {
                if m.max_unmirrored_entries == 0 || m.max_unmirrored_age_s == 0 {
                    return Err(ConfigError::new(
                        file,
                        if m.max_unmirrored_entries == 0 {
                            "mirror.max_unmirrored_entries"
                        } else {
                            "mirror.max_unmirrored_age_s"
                        },
                        "must be at least 1",
                    ));
                }
                if m.file.is_none() && m.nats.is_none() {
                    return Err(ConfigError::new(
                        file,
                        "mirror",
                        "name at least one sink: file = \"...\" and/or [mirror.nats]",
                    ));
                }
                if let Some(n) = &m.nats
                    && n.user.is_some() != n.password_file.is_some()
                {
                    return Err(ConfigError::new(
                        file,
                        "mirror.nats.password_file",
                        "give user and password_file together",
                    ));
                }
                let nats = m.nats.clone().map(|n| NatsSinkConfig {
                    password_file: n.password_file.as_deref().map(abs),
                    ..n
                });
                Some(MirrorConfig {
                    file: m.file.as_deref().map(abs),
                    nats,
                    ack_dir: Some(abs(&m
                        .ack_dir
                        .clone()
                        .unwrap_or_else(|| daemon.state_dir.join("mirror")))),
                    ..m
                })
            }
        };
        Ok(Config {
            mirror,
            file: file.to_path_buf(),
            daemon,
            hsm,
            ledger,
        })
    }

    /// Where the audit key's verifier key is pinned.
    pub fn audit_vkey_path(&self) -> PathBuf {
        self.ledger.audit_vkey.clone().unwrap_or_else(|| {
            self.file
                .parent()
                .unwrap_or(Path::new("."))
                .join("audit.vkey")
        })
    }

    /// Path of the ledger database.
    pub fn ledger_path(&self) -> PathBuf {
        self.ledger
            .path
            .clone()
            .unwrap_or_else(|| self.daemon.state_dir.join("ledger.sqlite3"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
agent_socket = "agent.sock"
admin_socket = "/run/keyward/admin.sock"
state_dir = "state"
policy = "policy.toml"

[hsm]
backend = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "keyward"
pin_file = "pin"
env = { SOFTHSM2_CONF = "/tmp/x/softhsm2.conf" }
"#;

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let cfg = Config::parse(Path::new("/etc/kw/keyward.toml"), GOOD).unwrap();
        assert_eq!(cfg.daemon.agent_socket, Path::new("/etc/kw/agent.sock"));
        assert_eq!(
            cfg.daemon.admin_socket,
            Path::new("/run/keyward/admin.sock")
        );
        assert_eq!(cfg.ledger_path(), Path::new("/etc/kw/state/ledger.sqlite3"));
        assert_eq!(
            cfg.hsm.pkcs11().unwrap().pin_file,
            Path::new("pin"),
            "pin_file keeps credential semantics"
        );
        assert_eq!(cfg.daemon.max_body_bytes, 64 * 1024);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace("token_label", "tokn_label");
        let err = Config::parse(Path::new("/etc/kw/keyward.toml"), &text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/kw/keyward.toml:"), "{msg}");
        assert!(msg.contains("tokn_label"), "{msg}");
        assert!(err.position.is_some());
    }

    #[test]
    fn wrong_backend_and_secret_env_are_refused_with_the_key() {
        let err = Config::parse(
            Path::new("k.toml"),
            &GOOD.replace("\"pkcs11\"", "\"magic\""),
        )
        .unwrap_err();
        assert_eq!(err.key, "hsm.backend");
        let err = Config::parse(
            Path::new("k.toml"),
            &GOOD.replace("SOFTHSM2_CONF", "HSM_PIN"),
        )
        .unwrap_err();
        assert_eq!(err.key, "hsm.env.HSM_PIN");
    }

    #[test]
    fn commit_delay_is_bounded_and_type_errors_name_the_key() {
        let text = format!("{GOOD}\n[ledger]\ncommit_delay_us = 2000\n");
        let cfg = Config::parse(Path::new("k.toml"), &text).unwrap();
        assert_eq!(cfg.ledger.commit_delay_us, 2000);
        let text = format!("{GOOD}\n[ledger]\ncommit_delay_us = 100001\n");
        let err = Config::parse(Path::new("k.toml"), &text).unwrap_err();
        assert_eq!(err.key, "ledger.commit_delay_us");
        let text = format!("{GOOD}\n[ledger]\ncommit_delay_us = \"soon\"\n");
        let err = Config::parse(Path::new("k.toml"), &text).unwrap_err();
        assert_eq!(err.key, "ledger.commit_delay_us");
        assert!(err.position.is_some());
    }

    #[test]
    fn mirror_section_parses_with_defaults() {
        let text =
            format!("{GOOD}\n[mirror]\nfile = \"m/ledger.jsonl\"\nmax_unmirrored_entries = 5\n");
        let cfg = Config::parse(Path::new("/etc/kw/k.toml"), &text).unwrap();
        let m = cfg.mirror.unwrap();
        assert_eq!(m.file.as_deref(), Some(Path::new("/etc/kw/m/ledger.jsonl")));
        assert_eq!((m.max_unmirrored_entries, m.max_unmirrored_age_s), (5, 300));
        let err = Config::parse(
            Path::new("k.toml"),
            &format!("{GOOD}\n[mirror]\nfile = \"x\"\nmax_unmirrored_age_s = 0\n"),
        )
        .unwrap_err();
        assert_eq!(err.key, "mirror.max_unmirrored_age_s");
        let err = Config::parse(
            Path::new("k.toml"),
            &format!("{GOOD}\n[mirror]\nfile = \"x\"\nurl = 1\n"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("url"), "{err}");
    }

    #[test]
    fn connection_limits_and_timeouts_have_defaults_and_bounds() {
        let cfg = Config::parse(Path::new("k.toml"), GOOD).unwrap();
        assert_eq!(
            (
                cfg.daemon.max_connections,
                cfg.daemon.max_connections_per_uid,
                cfg.daemon.header_read_timeout_s,
                cfg.daemon.shutdown_grace_s,
                cfg.daemon.request_timeout_s,
            ),
            (256, 64, 10, 10, 30)
        );
        let with = |line: &str| GOOD.replace("[hsm]", &format!("{line}\n\n[hsm]"));
        for (line, key) in [
            ("max_connections = 0", "daemon.max_connections"),
            ("max_connections = 100000", "daemon.max_connections"),
            (
                "max_connections_per_uid = 0",
                "daemon.max_connections_per_uid",
            ),
            (
                "max_connections_per_uid = 300",
                "daemon.max_connections_per_uid",
            ),
            ("header_read_timeout_s = 0", "daemon.header_read_timeout_s"),
            ("shutdown_grace_s = 0", "daemon.shutdown_grace_s"),
            ("shutdown_grace_s = 301", "daemon.shutdown_grace_s"),
        ] {
            let err = Config::parse(Path::new("k.toml"), &with(line)).unwrap_err();
            assert_eq!(err.key, key, "{line}: {err}");
        }
        let cfg = Config::parse(
            Path::new("k.toml"),
            &with("max_connections = 64\nmax_connections_per_uid = 64\nshutdown_grace_s = 2"),
        )
        .unwrap();
        assert_eq!(cfg.daemon.max_connections_per_uid, 64);
        assert_eq!(cfg.daemon.shutdown_grace_s, 2);
    }

    #[test]
    fn hsm_backend_defaults_to_pkcs11_and_refuses_the_other_backends_keys() {
        let explicit = Config::parse(Path::new("/etc/kw/k.toml"), GOOD).unwrap();
        let implicit = Config::parse(
            Path::new("/etc/kw/k.toml"),
            &GOOD.replace("backend = \"pkcs11\"\n", ""),
        )
        .unwrap();
        assert_eq!(explicit, implicit);
        assert_eq!(explicit.hsm.backend_name(), "pkcs11");
        assert_eq!(explicit.hsm.device_label(), "keyward");
        let p = explicit.hsm.pkcs11().unwrap();
        assert_eq!(p.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(p.max_sessions, None);
        assert_eq!(explicit.hsm.env.len(), 1);
        assert!(explicit.hsm.yubihsm().is_none());

        // pkcs11 settings under backend "yubihsm": refused by key.
        let err = Config::parse(
            Path::new("k.toml"),
            &GOOD.replace("\"pkcs11\"", "\"yubihsm\""),
        )
        .unwrap_err();
        assert_eq!(err.key, "hsm.module");
        assert!(err.problem.contains("not a setting of backend"), "{err}");
        let err = Config::parse(
            Path::new("k.toml"),
            &GOOD.replace("module = \"/usr/lib/softhsm/libsofthsm2.so\"\n", ""),
        )
        .unwrap_err();
        assert_eq!(err.key, "hsm.module");
        assert!(err.to_string().contains("pkcs11"), "{err}");
        let err = Config::parse(Path::new("k.toml"), &format!("{GOOD}connector = \"usb\"\n"))
            .unwrap_err();
        assert_eq!(err.key, "hsm.connector");
        let err = Config::parse(
            Path::new("k.toml"),
            &GOOD.replace("\"pkcs11\"", "\"cloudhsm\""),
        )
        .unwrap_err();
        assert_eq!(err.key, "hsm.backend");
        assert!(err.problem.contains("\"yubihsm\""), "{err}");
    }

    /// `GOOD` with its `[hsm]` section replaced by `hsm`.
    fn with_hsm(hsm: &str) -> String {
        let start = GOOD.find("[hsm]").unwrap();
        let end = GOOD[start + 1..]
            .find("\n[")
            .map_or(GOOD.len(), |i| start + 1 + i + 1);
        format!("{}{hsm}\n{}", &GOOD[..start], &GOOD[end..])
    }

    #[test]
    fn yubihsm_backend_parses_its_connector_credentials_and_domains() {
        let cfg = Config::parse(
            Path::new("/etc/kw/k.toml"),
            &with_hsm(
                "[hsm]\nbackend = \"yubihsm\"\nconnector = \"http://127.0.0.1:12345\"\ncredential_file = \"yubihsm-signer\"\n",
            ),
        )
        .unwrap();
        assert_eq!(cfg.hsm.backend_name(), "yubihsm");
        let y = cfg.hsm.yubihsm().unwrap();
        assert_eq!(
            y.connector,
            YubiHsmConnector::Http {
                addr: "127.0.0.1".into(),
                port: 12345
            }
        );
        assert_eq!(y.connector.to_string(), "http://127.0.0.1:12345");
        assert_eq!(y.credential_file, Path::new("yubihsm-signer"));
        assert_eq!(y.domains, vec![1]);
        assert!(!y.exportable_under_wrap);
        assert_eq!(y.timeout_ms, DEFAULT_YUBIHSM_TIMEOUT_MS);
        assert!(cfg.hsm.pkcs11().is_none());

        let cfg = Config::parse(
            Path::new("k.toml"),
            &with_hsm(
                "[hsm]\nbackend = \"yubihsm\"\nconnector = \"usb:0012345678\"\ncredential_file = \"/etc/kw/auth\"\ndomains = [3, 1, 3]\nexportable_under_wrap = true\ntimeout_ms = 2000\n",
            ),
        )
        .unwrap();
        let y = cfg.hsm.yubihsm().unwrap();
        assert_eq!(
            y.connector,
            YubiHsmConnector::Usb {
                serial: Some("0012345678".into())
            }
        );
        assert_eq!(y.domains, vec![1, 3]);
        assert!(y.exportable_under_wrap);
        assert_eq!(y.timeout_ms, 2000);

        for (hsm, key) in [
            ("connector = \"usb\"", "hsm.credential_file"),
            ("credential_file = \"a\"", "hsm.connector"),
            (
                "connector = \"usb:12\"\ncredential_file = \"a\"",
                "hsm.connector",
            ),
            (
                "connector = \"tcp://1.2.3.4:1\"\ncredential_file = \"a\"",
                "hsm.connector",
            ),
            (
                "connector = \"http://localhost:12345\"\ncredential_file = \"a\"",
                "hsm.connector",
            ),
            (
                "connector = \"http://127.0.0.1:0\"\ncredential_file = \"a\"",
                "hsm.connector",
            ),
            (
                "connector = \"usb\"\ncredential_file = \"a\"\ndomains = [0]",
                "hsm.domains",
            ),
            (
                "connector = \"usb\"\ncredential_file = \"a\"\ndomains = [17]",
                "hsm.domains",
            ),
            (
                "connector = \"usb\"\ncredential_file = \"a\"\ndomains = []",
                "hsm.domains",
            ),
            (
                "connector = \"usb\"\ncredential_file = \"a\"\ntimeout_ms = 5",
                "hsm.timeout_ms",
            ),
            (
                "connector = \"usb\"\ncredential_file = \"a\"\npin_file = \"p\"",
                "hsm.pin_file",
            ),
        ] {
            let err = Config::parse(
                Path::new("k.toml"),
                &with_hsm(&format!("[hsm]\nbackend = \"yubihsm\"\n{hsm}\n")),
            )
            .unwrap_err();
            assert_eq!(err.key, key, "{hsm}: {err}");
        }
    }

    #[test]
    fn hsm_executor_keys_have_defaults_and_bounds() {
        let cfg = Config::parse(Path::new("k.toml"), GOOD).unwrap();
        assert_eq!(
            (
                cfg.hsm.queue_depth,
                cfg.hsm.queue_wait_ms,
                cfg.hsm.call_timeout_ms
            ),
            (
                DEFAULT_HSM_QUEUE_DEPTH,
                DEFAULT_HSM_QUEUE_WAIT_MS,
                DEFAULT_HSM_CALL_TIMEOUT_MS
            )
        );
        let with = |line: &str| format!("{GOOD}{line}\n");
        let cfg = Config::parse(
            Path::new("k.toml"),
            &with("queue_depth = 4\nqueue_wait_ms = 0\ncall_timeout_ms = 500"),
        )
        .unwrap();
        assert_eq!(
            (
                cfg.hsm.queue_depth,
                cfg.hsm.queue_wait_ms,
                cfg.hsm.call_timeout_ms
            ),
            (4, 0, 500)
        );
        for (line, key) in [
            ("queue_depth = 0", "hsm.queue_depth"),
            ("queue_depth = 65537", "hsm.queue_depth"),
            ("queue_wait_ms = 60001", "hsm.queue_wait_ms"),
            ("call_timeout_ms = 0", "hsm.call_timeout_ms"),
            ("call_timeout_ms = 600001", "hsm.call_timeout_ms"),
            ("max_sessions = 0", "hsm.max_sessions"),
        ] {
            let err = Config::parse(Path::new("k.toml"), &with(line)).unwrap_err();
            assert_eq!(err.key, key, "{line}: {err}");
        }
        let err = Config::parse(Path::new("k.toml"), &with("queue_depth = \"deep\"")).unwrap_err();
        assert_eq!(err.key, "hsm.queue_depth");
        assert!(err.position.is_some());
    }

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
