//! `keyward setup`: prepares a signer box's HSM for keywardd, with the
//! installed layout (`/etc/keyward`, `/var/lib/keyward`), every path taken
//! from `keyward.toml` so a test can point it at a temporary directory.
//!
//! 1. SoftHSM2 (`--softhsm`): writes SoftHSM's configuration (the file
//!    `[hsm] env.SOFTHSM2_CONF` names) if it is missing, with its token
//!    directory `<state_dir>/softhsm/tokens`, and initialises the token
//!    `hsm.token_label` with a random SO PIN and user PIN, or finds it.
//!    A vendor module (`--module`, `--token-label`): the vendor's tools
//!    have initialised the token; the operator's PIN must log in.
//! 2. The user PIN goes to the credential file (`<config dir>/credentials/
//!    hsm.pin`, root-only 0400 in a 0700 directory, written atomically),
//!    which the unit hands to keywardd with `LoadCredential=pin:...`.
//!    SoftHSM's SO PIN goes beside it (`so.pin`, 0400): keywardd never
//!    reads it; it lets root reset the user PIN without wiping the token,
//!    and gives root nothing it could not do with the user PIN it can
//!    read anyway. Secrets are never printed.
//! 3. The audit key (it signs checkpoints) is generated in the HSM, or
//!    found, and its verifier key pinned where keywardd expects it
//!    ([`Config::audit_vkey_path`]), 0444: readable by the daemon, not
//!    writable by it.
//!
//! Every step first looks at what is there: a second run changes nothing
//! and says so. An interrupted run resumes: the PINs are written before
//! the token is initialised with them, so a token never has a PIN that
//! was not saved.
//!
//! Run as root where the user `keyward` exists (the package's case), the
//! HSM work runs as root and the SoftHSM token directory is then chowned
//! to `keyward:keyward` ([`DaemonUser`]), recursively: simpler and easier
//! to check than dropping privileges around a module that may keep root's
//! file descriptors, and it also repairs a tree an interrupted run left.
//! Without that user (tests, installs by hand) everything belongs to the
//! invoking user. The ledger is never touched: keywardd records the audit
//! key at its first start (see [`crate::service::keys`]).

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

mod files;
mod token;

pub use files::{chown_tree, write_atomic};
use files::{make_dirs, random_pin, read_pin_or, write_credential};
use token::{cryptoki_err, init_user_pin, login_check};

use crate::config::{Config, Pkcs11BackendConfig};
use crate::hsm::pkcs11::{context, find_token};
use crate::hsm::{HsmError, HsmKey};
use crate::ledger::TrustedKey;
use crate::ledger::checkpoint::AUDIT_KEY;
use crate::types::KeyName;

/// Name of SoftHSM's SO PIN file beside it.
pub const SO_PIN_FILE: &str = "so.pin";
/// The system user keywardd runs as in the package.
pub const DAEMON_USER: &str = "keyward";

/// Why set-up stopped. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// keyward.toml does not say what set-up needs, or says something else
    /// than the command line.
    #[error("{0}")]
    Config(String),
    /// The token exists, but its PIN is not known here.
    #[error("{0}")]
    Token(String),
    /// HSM failure.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The pinned audit key differs from the HSM's.
    #[error(
        "{path} pins {pinned}, but the HSM's audit key is {hsm}; not replaced. Find out why before you re-pin by hand"
    )]
    PinnedKeyDiffers {
        /// The pin file.
        path: PathBuf,
        /// What it pins.
        pinned: String,
        /// The HSM's audit key.
        hsm: String,
    },
    /// A key was refused.
    #[error(transparent)]
    Key(#[from] crate::service::KeyCreateError),
    /// I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl SetupError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SetupError::Config(_) => "invalid_config",
            SetupError::Token(_) => "token_pin_unknown",
            SetupError::Hsm(e) => e.code(),
            SetupError::PinnedKeyDiffers { .. } => "audit_key_mismatch",
            SetupError::Key(e) => e.code(),
            SetupError::Io { .. } => "io_error",
        }
    }
}

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Io { what, source }
}

pub(super) fn nix_io(what: impl Into<String>) -> impl FnOnce(nix::Error) -> SetupError {
    let what = what.into();
    move |e| SetupError::Io {
        what,
        source: e.into(),
    }
}

/// Which HSM to set up.
pub enum Target {
    /// SoftHSM2: the module keyward.toml names (checked against where
    /// SoftHSM2 is installed).
    SoftHsm,
    /// A vendor's PKCS#11 module whose token the vendor's tools
    /// initialised, with the user PIN the operator gave.
    Vendor {
        /// The module (must be keyward.toml's `hsm.module`).
        module: PathBuf,
        /// The token label (must be keyward.toml's `hsm.token_label`).
        token_label: String,
        /// The user PIN.
        pin: SecretString,
    },
    /// A YubiHSM 2 already provisioned by `keyward hsm setup yubihsm`:
    /// only the audit key is left to make and pin, with the signer's
    /// credential keyward.toml names.
    YubiHsm,
}

/// The user that must own the SoftHSM token files: `keyward` when set-up
/// runs as root and that user exists, else nobody (files stay the
/// invoking user's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonUser {
    /// Its uid.
    pub uid: nix::unistd::Uid,
    /// Its primary group.
    pub gid: nix::unistd::Gid,
}

impl DaemonUser {
    /// `keyward`, when this process is root and the user exists.
    pub fn find() -> Option<DaemonUser> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let user = nix::unistd::User::from_name(DAEMON_USER).ok().flatten()?;
        Some(DaemonUser {
            uid: user.uid,
            gid: user.gid,
        })
    }
}

/// One thing set-up did or found already done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Whether it changed something.
    pub changed: bool,
    /// What it did or found.
    pub what: String,
}

/// What set-up did.
#[derive(Debug)]
pub struct Report {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The audit key.
    pub audit_key: HsmKey,
    /// Its verifier key, as pinned.
    pub audit_vkey: String,
    /// The PIN credential file (YubiHSM: the signer's credential file).
    pub pin_file: PathBuf,
}

impl Report {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        self.steps.iter().any(|s| s.changed)
    }
}

/// The steps taken so far.
#[derive(Default)]
struct Steps(Vec<Step>);

impl Steps {
    fn done(&mut self, what: String) {
        self.0.push(Step {
            changed: true,
            what,
        });
    }

    fn found(&mut self, what: String) {
        self.0.push(Step {
            changed: false,
            what,
        });
    }
}

/// The file holding the HSM user PIN, as root and the CLI see it outside
/// systemd: an absolute `hsm.pin_file` as is; a relative one (a systemd
/// credential, the package's `pin_file = "pin"`) in
/// `$CREDENTIALS_DIRECTORY` when that is set, else the file the installed
/// unit loads it from, else where the layout keeps it,
/// `<config dir>/credentials/hsm.pin`
/// ([`crate::doctor::resolve_pin_for`], the configuration check's reading).
pub fn pin_source(cfg: &Config, p: &Pkcs11BackendConfig) -> PathBuf {
    crate::doctor::resolve_pin_for(cfg, &p.pin_file)
        .path()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::doctor::layout_credential_source(cfg))
}

/// Where a tool outside systemd reads the YubiHSM signer's credential
/// file, resolved as [`pin_source`] resolves the PIN (with the layout's
/// `<config dir>/credentials/NAME` for a relative name).
pub fn credential_source(cfg: &Config, y: &crate::config::YubiHsmBackendConfig) -> PathBuf {
    crate::doctor::resolve_pin_for(cfg, &y.credential_file)
        .path()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            cfg.file
                .parent()
                .unwrap_or(Path::new("."))
                .join("credentials")
                .join(&y.credential_file)
        })
}

/// `[hsm]` with `pin_file` replaced by [`pin_source`] (PKCS#11) or
/// `credential_file` by [`credential_source`] (YubiHSM): what a tool
/// outside systemd opens the HSM with.
pub fn offline_hsm_config(cfg: &Config) -> Result<crate::config::HsmConfig, SetupError> {
    let mut hsm = cfg.hsm.clone();
    match &mut hsm.backend {
        crate::config::HsmBackendConfig::Pkcs11(p) => p.pin_file = pin_source(cfg, p),
        crate::config::HsmBackendConfig::YubiHsm(y) => {
            y.credential_file = credential_source(cfg, y)
        }
    }
    Ok(hsm)
}

/// [`Target::YubiHsm`] is handled before the PKCS#11 steps.
fn unreachable_target(cfg: &Config) -> Result<(), SetupError> {
    Err(SetupError::Config(format!(
        "{}: internal error: the YubiHSM set-up took the PKCS#11 path",
        cfg.file.display()
    )))
}

fn pkcs11(cfg: &Config) -> Result<&Pkcs11BackendConfig, SetupError> {
    cfg.hsm.pkcs11().ok_or_else(|| {
        SetupError::Config(format!(
            "{}: set-up supports [hsm] backend = \"pkcs11\"",
            cfg.file.display()
        ))
    })
}

/// The SoftHSM2 configuration keyward.toml passes to the module
/// (`[hsm] env.SOFTHSM2_CONF`), if any.
pub fn softhsm_conf(cfg: &Config) -> Option<PathBuf> {
    cfg.hsm.env.get("SOFTHSM2_CONF").map(PathBuf::from)
}

/// The token directory a SoftHSM2 configuration names.
pub fn softhsm_token_dir(conf: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "directories.tokendir").then(|| PathBuf::from(v.trim()))
    })
}

/// Sets up the HSM `target` for the instance `cfg` describes (see the
/// module docs). `[hsm] env` must already be in this process's
/// environment ([`crate::process::apply_module_env`]).
pub fn setup(cfg: &Config, target: Target) -> Result<Report, SetupError> {
    if let Target::YubiHsm = target {
        let y = cfg.hsm.yubihsm().ok_or_else(|| {
            SetupError::Config(format!(
                "{}: --yubihsm needs [hsm] backend = \"yubihsm\" (see `keyward hsm setup yubihsm`)",
                cfg.file.display()
            ))
        })?;
        let credential = credential_source(cfg, y);
        let mut steps = Steps::default();
        let (audit_key, audit_vkey) = audit_key(cfg, &mut steps)?;
        return Ok(Report {
            steps: steps.0,
            audit_key,
            audit_vkey,
            pin_file: credential,
        });
    }
    let p = pkcs11(cfg)?.clone();
    let owner = DaemonUser::find();
    let pin_file = pin_source(cfg, &p);
    let mut steps = Steps::default();
    match target {
        Target::SoftHsm => softhsm(cfg, &p, owner, &pin_file, &mut steps)?,
        Target::Vendor {
            module,
            token_label,
            pin,
        } => vendor(cfg, &p, &module, &token_label, &pin, &pin_file, &mut steps)?,
        Target::YubiHsm => unreachable_target(cfg)?,
    }
    let (audit_key, audit_vkey) = audit_key(cfg, &mut steps)?;
    if let Some(owner) = owner {
        give_tokens_to(cfg, owner)?;
    }
    Ok(Report {
        steps: steps.0,
        audit_key,
        audit_vkey,
        pin_file,
    })
}

/// After HSM work as root: the SoftHSM token directory keyward.toml's
/// SoftHSM configuration names goes (back) to `owner`. Nothing for other
/// modules.
pub fn give_tokens_to(cfg: &Config, owner: DaemonUser) -> Result<(), SetupError> {
    if let Some(tokens) = softhsm_conf(cfg).and_then(|c| softhsm_token_dir(&c))
        && tokens.is_dir()
    {
        chown_tree(&tokens, owner)?;
    }
    Ok(())
}

/// SoftHSM2: configuration, token directory, PINs, token.
fn softhsm(
    cfg: &Config,
    p: &Pkcs11BackendConfig,
    owner: Option<DaemonUser>,
    pin_file: &Path,
    steps: &mut Steps,
) -> Result<(), SetupError> {
    if !p.module.exists() {
        let hint = crate::tools::dev::find_softhsm_module()
            .map(|m| format!("SoftHSM2 is at {}: set hsm.module to it", m.display()))
            .unwrap_or_else(|e| e.to_string());
        return Err(SetupError::Config(format!(
            "{}: hsm.module {} does not exist; {hint}",
            cfg.file.display(),
            p.module.display()
        )));
    }
    let conf = softhsm_conf(cfg).ok_or_else(|| {
        SetupError::Config(format!(
            "{}: [hsm] env must name SoftHSM's configuration, e.g. env = {{ SOFTHSM2_CONF = \"/etc/keyward/softhsm2.conf\" }}",
            cfg.file.display()
        ))
    })?;
    if std::env::var_os("SOFTHSM2_CONF").as_deref() != Some(conf.as_os_str()) {
        return Err(SetupError::Config(format!(
            "SOFTHSM2_CONF must be set to {} before the module is loaded",
            conf.display()
        )));
    }
    let tokens = if conf.exists() {
        let tokens = softhsm_token_dir(&conf).ok_or_else(|| {
            SetupError::Config(format!(
                "{} names no directories.tokendir; fix it or remove it to have it written",
                conf.display()
            ))
        })?;
        steps.found(format!("SoftHSM2 configuration {} kept", conf.display()));
        tokens
    } else {
        let tokens = cfg.daemon.state_dir.join("softhsm").join("tokens");
        let text = crate::hsm::softhsm::conf_text(
            "keyward (written by `keyward setup --softhsm`)",
            &tokens,
        );
        // root:keyward 0640 in the package: the daemon reads it, only root
        // changes it.
        write_atomic(&conf, 0o640, text.as_bytes())?;
        if let Some(o) = owner {
            nix::unistd::chown(&conf, Some(nix::unistd::Uid::from_raw(0)), Some(o.gid))
                .map_err(nix_io(format!("cannot chown {}", conf.display())))?;
        }
        steps.done(format!("wrote SoftHSM2 configuration {}", conf.display()));
        tokens
    };
    if !tokens.is_dir() {
        make_dirs(&tokens, 0o700, owner)?;
        steps.done(format!("created token directory {}", tokens.display()));
    }

    let ctx = context(&p.module)?;
    let so_file = pin_file
        .parent()
        .unwrap_or(Path::new("."))
        .join(SO_PIN_FILE);
    match find_token(&ctx, &p.token_label) {
        Ok(slot) => {
            let info = ctx
                .get_token_info(slot)
                .map_err(cryptoki_err("C_GetTokenInfo"))?;
            let user_pin = read_pin_or(pin_file, || {
                format!(
                    "token {:?} exists but its PIN file {} does not; keyward cannot log in. \
                     Restore the PIN file, or reset the user PIN with the SO PIN (softhsm2-util / pkcs11-tool --init-pin)",
                    p.token_label,
                    pin_file.display()
                )
            })?;
            if !info.user_pin_initialized() {
                // An earlier run stopped between C_InitToken and C_InitPIN.
                let so = read_pin_or(&so_file, || {
                    format!(
                        "token {:?} has no user PIN and the SO PIN file {} is missing; \
                         delete the token (softhsm2-util --delete-token) and run set-up again",
                        p.token_label,
                        so_file.display()
                    )
                })?;
                init_user_pin(&ctx, slot, &so, &user_pin)?;
                steps.done(format!("set the user PIN of token {:?}", p.token_label));
            }
            login_check(&ctx, slot, &p.token_label, &user_pin)?;
            steps.found(format!(
                "token {:?} found; the PIN in {} logs in",
                p.token_label,
                pin_file.display()
            ));
        }
        Err(HsmError::TokenNotFound(_)) => {
            // The PINs are saved before the token gets them.
            let so = ensure_pin(
                &so_file,
                steps,
                "SO PIN (root only; keywardd never reads it)",
            )?;
            let user = ensure_pin(pin_file, steps, "user PIN credential")?;
            let slot = ctx
                .get_all_slots()
                .map_err(cryptoki_err("C_GetSlotList"))?
                .into_iter()
                .find(|s| ctx.get_token_info(*s).is_ok_and(|t| !t.token_initialized()))
                .ok_or_else(|| {
                    SetupError::Token("SoftHSM2 offers no uninitialized slot".to_owned())
                })?;
            ctx.init_token(slot, &so, &p.token_label)
                .map_err(cryptoki_err("C_InitToken"))?;
            // SoftHSM2 moves an initialized token to a new slot: find it.
            let slot = find_token(&ctx, &p.token_label)?;
            init_user_pin(&ctx, slot, &so, &user)?;
            login_check(&ctx, slot, &p.token_label, &user)?;
            steps.done(format!(
                "initialised SoftHSM2 token {:?} in {}",
                p.token_label,
                tokens.display()
            ));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// A vendor module: the token exists; the PIN must log in before it is
/// saved.
fn vendor(
    cfg: &Config,
    p: &Pkcs11BackendConfig,
    module: &Path,
    token_label: &str,
    pin: &SecretString,
    pin_file: &Path,
    steps: &mut Steps,
) -> Result<(), SetupError> {
    if module != p.module || token_label != p.token_label {
        return Err(SetupError::Config(format!(
            "{} says module = {} and token_label = {:?}; keywardd uses those: set them to {} and {token_label:?} first",
            cfg.file.display(),
            p.module.display(),
            p.token_label,
            module.display()
        )));
    }
    let ctx = context(module)?;
    let slot = find_token(&ctx, token_label)?;
    login_check(&ctx, slot, token_label, pin)?;
    steps.found(format!(
        "token {token_label:?} found; the PIN given logs in"
    ));
    match std::fs::symlink_metadata(pin_file) {
        Ok(_) => {
            let saved = crate::secret_file::read_secret_file(pin_file, 4096)
                .map_err(|e| SetupError::Token(e.to_string()))?;
            if saved.expose_secret() == pin.expose_secret() {
                steps.found(format!("PIN credential {} kept", pin_file.display()));
            } else {
                write_credential(pin_file, pin.expose_secret().as_bytes())?;
                steps.done(format!(
                    "replaced the PIN credential {} (it held another PIN)",
                    pin_file.display()
                ));
            }
        }
        Err(_) => {
            write_credential(pin_file, pin.expose_secret().as_bytes())?;
            steps.done(format!("wrote the PIN credential {}", pin_file.display()));
        }
    }
    Ok(())
}

/// The audit key, found or generated, and its pinned verifier key.
fn audit_key(cfg: &Config, steps: &mut Steps) -> Result<(HsmKey, String), SetupError> {
    let hsm = crate::hsm::open(&offline_hsm_config(cfg)?)?;
    let name = KeyName::new(AUDIT_KEY).map_err(|e| SetupError::Config(e.to_string()))?;
    let key = match hsm.find_ed25519(&name) {
        Ok(k) => {
            steps.found(format!("audit key {AUDIT_KEY:?} found in the HSM"));
            k
        }
        Err(HsmError::KeyNotFound(_)) => {
            let k = hsm.generate_ed25519(&name)?;
            steps.done(format!("generated the audit key {AUDIT_KEY:?} in the HSM"));
            k
        }
        Err(e) => return Err(e.into()),
    };
    drop(hsm);
    let vkey = crate::service::history::audit_vkey(&key);
    let path = cfg.audit_vkey_path();
    if path.exists() {
        let pinned = TrustedKey::from_file(&path).map_err(SetupError::Config)?;
        if pinned.vkey() != vkey {
            return Err(SetupError::PinnedKeyDiffers {
                path,
                pinned: pinned.vkey().to_owned(),
                hsm: vkey,
            });
        }
        steps.found(format!(
            "audit verifier key already pinned in {}",
            path.display()
        ));
    } else {
        // Root-owned (or the invoking user's) 0444: keywardd reads it and
        // cannot change it.
        write_atomic(&path, 0o444, TrustedKey::file_text(&vkey).as_bytes())?;
        steps.done(format!(
            "pinned the audit verifier key in {}",
            path.display()
        ));
    }
    Ok((key, vkey))
}

/// The PIN in `path`, or a new random one saved there first.
fn ensure_pin(path: &Path, steps: &mut Steps, what: &str) -> Result<SecretString, SetupError> {
    if std::fs::symlink_metadata(path).is_ok() {
        let pin = crate::secret_file::read_secret_file(path, 4096)
            .map_err(|e| SetupError::Token(e.to_string()))?;
        steps.found(format!("{what} {} kept", path.display()));
        return Ok(pin);
    }
    let pin = random_pin();
    write_credential(path, pin.as_bytes())?;
    steps.done(format!("wrote a random {what} to {}", path.display()));
    Ok(SecretString::from(pin.as_str().to_owned()))
}

/// `keyward key create NAME` while keywardd is not running: the key is
/// generated in the HSM opened with the PIN credential ([`pin_source`]),
/// and the ledger is not touched (keywardd records it at its next start).
/// As root with the user `keyward`, the SoftHSM token files are given back
/// to it afterwards.
pub fn create_key_offline(cfg: &Config, name: &str) -> Result<HsmKey, SetupError> {
    let name = crate::service::new_key_name(name)?;
    // A name the ledger's key registry knows (even retired, its label gone
    // from the HSM) gets a new key only through `keyward key rotate`, as
    // the daemon's `key create` says; a key made here under it would never
    // be used.
    let known = registered_versions(cfg, name.as_str())?;
    if known > 0 {
        return Err(crate::service::KeyCreateError::Registered {
            name: name.to_string(),
            version: known,
        }
        .into());
    }
    let hsm = crate::hsm::open(&offline_hsm_config(cfg)?)?;
    let key = hsm
        .generate_ed25519(&name)
        .map_err(|e| SetupError::Key(e.into()))?;
    drop(hsm);
    if let Some(owner) = DaemonUser::find() {
        give_tokens_to(cfg, owner)?;
    }
    Ok(key)
}

/// The latest version of `name` in the ledger's key registry (read-only),
/// 0 when the ledger or its registry does not exist yet. A ledger that
/// exists but cannot be read is an error: the name may be registered.
fn registered_versions(cfg: &Config, name: &str) -> Result<u32, SetupError> {
    use rusqlite::{Connection, OpenFlags};
    let path = cfg.ledger_path();
    if !path.exists() {
        return Ok(0);
    }
    let unreadable = |e: rusqlite::Error| SetupError::Io {
        what: format!("reading the key registry in {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    };
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unreadable)?;
    let has_registry: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'key_registry')",
            [],
            |r| r.get(0),
        )
        .map_err(unreadable)?;
    if !has_registry {
        return Ok(0);
    }
    crate::ledger::registry::latest_version(&conn, name).map_err(unreadable)
}

/// The configuration check after set-up: [`crate::doctor::check`], what
/// `keyward doctor` and `keywardd --check-config` run.
pub fn run_config_check(cfg: &Config) -> crate::doctor::Report {
    crate::doctor::check(&cfg.file)
}
