//! `keyward init --dev DIR`: a ready development instance on a SoftHSM2
//! token that lives in DIR, or (`--backend yubihsm-mock`, test and
//! development builds) on a MockHsm served by a mock connector process
//! ([`yubihsm_mock`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[cfg(feature = "yubihsm-mock")]
pub mod yubihsm_mock;

use crate::config::Config;
use crate::hsm::softhsm::provision_dev_token;
use crate::hsm::{HsmError, HsmKey};
use crate::ledger::events::KeyGenerated;
use crate::types::KeyName;

/// Label of the development token.
pub const DEV_TOKEN_LABEL: &str = "keyward-dev";
/// Name of the key a development instance starts with.
pub const DEV_KEY: &str = "hot";

/// Where SoftHSM2's module usually is on Debian.
pub const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Why a development instance could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// DIR already holds something.
    #[error(
        "{0} is not empty; refusing to overwrite an existing instance (choose a new directory)"
    )]
    NotEmpty(PathBuf),
    /// SoftHSM2 is not installed.
    #[error(
        "SoftHSM2 not found (looked in {0}); install it with `apt-get install softhsm2` or pass --module"
    )]
    NoModule(String),
    /// HSM failure.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The written config does not load (a bug).
    #[error("generated configuration is invalid: {0}")]
    Config(String),
    /// The ledger could not record the key.
    #[error("ledger: {0}")]
    Ledger(String),
    /// The mock connector of a `yubihsm-mock` instance did not start.
    #[error("the MockHsm connector did not start: {0}")]
    MockConnector(String),
}

/// The created instance.
#[derive(Debug)]
pub struct DevInstance {
    /// The directory.
    pub dir: PathBuf,
    /// Its `keyward.toml`.
    pub config: PathBuf,
    /// The key created in it.
    pub key: HsmKey,
}

/// Finds the SoftHSM2 module.
pub fn find_softhsm_module() -> Result<PathBuf, DevError> {
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| DevError::NoModule(SOFTHSM_MODULES.join(", ")))
}

/// Refuses a directory that exists and is not empty.
pub fn check_target(dir: &Path) -> Result<(), DevError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(DevError::NotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DevError::Io {
            what: format!("cannot read {}", dir.display()),
            source,
        }),
    }
}

/// Writes a new file (never replacing one) with `mode`, synced.
pub fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), DevError> {
    let io = |source| DevError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// `p` as a TOML basic string.
pub fn toml_str(p: &Path) -> String {
    // TOML basic string with the escapes a path can need.
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Creates a development instance in `dir` (absolute): a SoftHSM2 token, a
/// random user PIN (mode 0400), `keyward.toml`, `policy.toml` binding `uid`
/// to agent `dev` with modest SOL limits, and an Ed25519 key `hot`, recorded
/// as `key_generated` in a new ledger.
pub fn init_dev(dir: &Path, module: &Path, uid: u32) -> Result<DevInstance, DevError> {
    create_dir(dir)?;
    let token = provision_dev_token(dir, module, DEV_TOKEN_LABEL)?;
    let hsm = format!(
        "[hsm]\n\
         backend = \"pkcs11\"\n\
         module = {module}\n\
         token_label = \"{label}\"\n\
         pin_file = {pin}\n\
         env = {{ SOFTHSM2_CONF = {conf} }}\n",
        module = toml_str(module),
        label = DEV_TOKEN_LABEL,
        pin = toml_str(&token.pin_file),
        conf = toml_str(&token.conf_file),
    );
    finish_dev(dir, "SoftHSM2 token in this directory", &hsm, uid)
}

/// Creates `dir` (absolute, new or empty) with mode 0700.
pub fn create_dir(dir: &Path) -> Result<(), DevError> {
    use std::os::unix::fs::DirBuilderExt;
    check_target(dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DevError::Io {
            what: format!("cannot create {}", dir.display()),
            source,
        })
}

/// The rest of a development instance once its HSM is reachable and `hsm`
/// (the `[hsm]` section, TOML) says how: `keyward.toml`, `policy.toml`, the
/// audit key (pinned in `audit.vkey`) and key `hot`, both generated in the
/// HSM through [`crate::hsm::open`] and recorded in a new ledger.
pub fn finish_dev(dir: &Path, what: &str, hsm: &str, uid: u32) -> Result<DevInstance, DevError> {
    let config_path = dir.join("keyward.toml");
    let policy_path = dir.join("policy.toml");
    let config = format!(
        "# keyward development instance ({what}).\n\
         # Start: keywardd --config {cfg}\n\n\
         [daemon]\n\
         agent_socket = {agent}\n\
         admin_socket = {admin}\n\
         state_dir = {state}\n\
         policy = {policy}\n\n\
         {hsm}",
        cfg = config_path.display(),
        agent = toml_str(&dir.join("agent.sock")),
        admin = toml_str(&dir.join("admin.sock")),
        state = toml_str(&dir.join("state")),
        policy = toml_str(&policy_path),
    );
    let policy = format!(
        "# Development policy: the user who ran `keyward init --dev` is agent `dev`.\n\n\
         [agents.dev]\n\
         uid = {uid}\n\
         keys = [\"{DEV_KEY}\"]\n\
         # allow_recipients = [\"<base58 address>\"]   # absent: any recipient\n\n\
         [agents.dev.limits.SOL]\n\
         per_tx = \"1\"\n\
         per_day = \"10\"\n"
    );
    write_new(&config_path, 0o600, &config)?;
    write_new(&policy_path, 0o600, &policy)?;
    let cfg = Config::load(&config_path).map_err(|e| DevError::Config(e.to_string()))?;
    crate::policy::Policy::load(&policy_path).map_err(|e| DevError::Config(e.to_string()))?;

    let hsm = crate::hsm::open(&cfg.hsm)?;
    let name = KeyName::new(DEV_KEY).map_err(|e| DevError::Config(e.to_string()))?;
    let key = hsm.generate_ed25519(&name)?;
    // The audit key that signs checkpoints, pinned outside the database.
    let audit_name = KeyName::new(crate::ledger::checkpoint::AUDIT_KEY)
        .map_err(|e| DevError::Config(e.to_string()))?;
    let audit = hsm.generate_ed25519(&audit_name)?;
    let audit_vkey = crate::service::history::audit_vkey(&audit);
    write_new(
        &cfg.audit_vkey_path(),
        0o444,
        &crate::ledger::TrustedKey::file_text(&audit_vkey),
    )?;
    let ledger = crate::daemon::open_ledger(&cfg).map_err(|e| DevError::Ledger(e.to_string()))?;
    let audit_generated = KeyGenerated::audit_key(
        audit.name.as_str(),
        &audit.public_key,
        Some(cfg.audit_vkey_path().display().to_string()),
    );
    let generated = KeyGenerated::signing_key(
        key.name.as_str(),
        &key.public_key,
        hsm.backend(),
        Some(cfg.hsm.device_label()),
    );
    ledger
        .write_blocking(move |txn| {
            txn.record(None, None, &generated)?;
            txn.record(None, None, &audit_generated)?;
            Ok(())
        })
        .map_err(|e| DevError::Ledger(e.to_string()))?;
    ledger
        .close_blocking()
        .map_err(|e| DevError::Ledger(e.to_string()))?;
    Ok(DevInstance {
        dir: dir.to_path_buf(),
        config: config_path,
        key,
    })
}
