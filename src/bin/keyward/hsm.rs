//! `keyward hsm ...`: the HSM itself: provisioning a YubiHSM 2
//! ([`keyward::tools::yubihsm_setup`]), its self-test
//! ([`keyward::tools::yubihsm_selftest`]) and, in test builds, the mock
//! connector.

#[cfg(feature = "yubihsm-mock")]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use keyward::config::{Config, DEFAULT_YUBIHSM_TIMEOUT_MS, YubiHsmConnector};
use keyward::tools::yubihsm_selftest::{SelftestSettings, selftest};
use keyward::tools::yubihsm_setup::{
    self, ProvisionOptions, SIGNER_CREDENTIAL, credentials_dir_default, signer_credential_source,
};
use secrecy::{ExposeSecret, SecretString};

use crate::Failure;

/// `keyward hsm` subcommands.
#[derive(Subcommand)]
pub(crate) enum HsmCommand {
    /// Provision a factory-fresh HSM for keyward (as root, once per device).
    Setup {
        #[command(subcommand)]
        device: SetupDevice,
    },
    /// Check the YubiHSM 2 keyward.toml names with keywardd's own (signer)
    /// credential: a session, Ed25519 signing verified in software, HMAC,
    /// the capabilities, domains and origins the device reports; prints the
    /// checks that need real hardware. Exit 0 when every check passed, 1
    /// otherwise.
    Selftest,
    /// Development and tests only: serve a software YubiHSM 2 (the yubihsm
    /// crate's MockHsm) over the yubihsm-connector HTTP protocol until
    /// killed. SIGUSR1 takes it down, SIGUSR2 brings it back.
    #[cfg(feature = "yubihsm-mock")]
    #[command(hide = true)]
    MockConnector {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write the bound port into this file.
        #[arg(long)]
        port_file: Option<PathBuf>,
        /// Milliseconds each message takes inside the mock device.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Exit once this directory is removed.
        #[arg(long)]
        exit_when_gone: Option<PathBuf>,
    },
}

/// The devices `keyward hsm setup` provisions.
#[derive(Subcommand)]
pub(crate) enum SetupDevice {
    /// A factory-fresh YubiHSM 2: creates the signer's (keywardd), the
    /// operator's (admin) and the auditor's authentication keys with random
    /// passwords written to root-only credential files (and with --backups
    /// a wrap key), proves each opens a session, then deletes the factory
    /// authentication key (id 1). Refuses a device that is not fresh, and
    /// never replaces a credential file. Prints what it created, never a
    /// password.
    Yubihsm(YubiHsmSetupArgs),
}

/// `keyward hsm setup yubihsm`'s options.
#[derive(Args)]
pub(crate) struct YubiHsmSetupArgs {
    /// Where the device is: "http://IP:PORT" (yubihsm-connector), "usb" or
    /// "usb:SERIAL" [default: keyward.toml's hsm.connector, else
    /// http://127.0.0.1:12345].
    #[arg(long, value_name = "CONNECTOR")]
    connector: Option<String>,
    /// The authentication key to log in with, deleted at the end.
    #[arg(long, value_name = "ID", default_value_t = 1)]
    auth_key_id: u16,
    /// File holding that key's password (owner-only) [default: the
    /// factory password].
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Directory of the credential files [default: credentials/ beside
    /// keyward.toml, /etc/keyward/credentials].
    #[arg(long, value_name = "DIR")]
    credentials_dir: Option<PathBuf>,
    /// Also create a wrap key for backups and let keyward's keys be
    /// exported under it (set hsm.exportable_under_wrap = true).
    #[arg(long)]
    backups: bool,
    /// With --backups: the wrap key file (yubihsm-wrap-key) of an earlier
    /// device instead of a new random wrap key, so this device can import
    /// that device's backups.
    #[arg(long, value_name = "FILE", requires = "backups")]
    wrap_key_file: Option<PathBuf>,
    /// Provision even though the device holds other objects (keyward's
    /// object ids must still be free).
    #[arg(long)]
    force_not_fresh: bool,
}

/// Runs `keyward hsm ...`.
pub(crate) fn run(config: &Path, command: HsmCommand) -> Result<(), Failure> {
    match command {
        HsmCommand::Setup {
            device: SetupDevice::Yubihsm(args),
        } => setup_yubihsm(config, args),
        HsmCommand::Selftest => run_selftest(config),
        #[cfg(feature = "yubihsm-mock")]
        HsmCommand::MockConnector {
            listen,
            port_file,
            latency_ms,
            exit_when_gone,
        } => {
            keyward::hsm::yubihsm::mock_connector::serve(
                keyward::hsm::yubihsm::mock_connector::MockConnectorOptions {
                    listen,
                    port_file,
                    latency: std::time::Duration::from_millis(latency_ms),
                    exit_when_gone,
                },
            )?;
            Ok(())
        }
    }
}

fn setup_yubihsm(config: &Path, args: YubiHsmSetupArgs) -> Result<(), Failure> {
    // keyward.toml is optional: a device may be provisioned before it.
    let cfg = if config.exists() {
        Some(Config::load(config)?)
    } else {
        None
    };
    let yh = cfg.as_ref().and_then(|c| c.hsm.yubihsm());
    let connector = match (&args.connector, yh) {
        (Some(c), _) => YubiHsmConnector::parse(c).map_err(|e| anyhow!("--connector {e}"))?,
        (None, Some(y)) => y.connector.clone(),
        (None, None) => YubiHsmConnector::Http {
            addr: "127.0.0.1".to_owned(),
            port: 12345,
        },
    };
    let timeout = yh.map_or(DEFAULT_YUBIHSM_TIMEOUT_MS, |y| y.timeout_ms);
    if yh.is_some_and(|y| y.exportable_under_wrap) && !args.backups {
        return Err(anyhow!(
            "{} sets hsm.exportable_under_wrap = true: give --backups (a wrap key), or set it to false",
            config.display()
        )
        .into());
    }
    let credential_file = yh.map_or_else(
        || PathBuf::from(SIGNER_CREDENTIAL),
        |y| y.credential_file.clone(),
    );
    let credentials_dir = args
        .credentials_dir
        .clone()
        .unwrap_or_else(|| credentials_dir_default(config));
    let signer_file = signer_credential_source(
        config,
        &credential_file,
        args.credentials_dir.as_deref(),
        false,
    );
    let password = match &args.password_file {
        Some(f) => keyward::secret_file::read_secret_file(f, 4096)
            .with_context(|| format!("cannot read the password from {}", f.display()))?,
        None => SecretString::from("password"),
    };
    let mut opts =
        ProvisionOptions::factory(&credentials_dir, &signer_file, &connector.to_string());
    opts.auth_key_id = args.auth_key_id;
    opts.password = password;
    opts.domains = yh.map_or_else(|| vec![1], |y| y.domains.clone());
    opts.backups = args.backups;
    opts.force_not_fresh = args.force_not_fresh;
    if let Some(f) = &args.wrap_key_file {
        let text = keyward::secret_file::read_secret_file(f, 4096)
            .with_context(|| format!("cannot read the wrap key from {}", f.display()))?;
        opts.wrap_key = Some(
            yubihsm_setup::parse_wrap_key(text.expose_secret())
                .map_err(|e| anyhow!("{}: {e} ({})", f.display(), e.code()))?,
        );
    }
    let device = keyward::hsm::yubihsm::connector_for(&connector, timeout)?;
    let report =
        yubihsm_setup::provision(device, &opts).map_err(|e| anyhow!("{e} ({})", e.code()))?;
    print!("{report}");
    println!();
    println!("Next:");
    let wanted = format!(
        "[hsm]\n  backend = \"yubihsm\"\n  connector = \"{connector}\"\n  credential_file = \"{}\"\n  domains = {:?}\n  exportable_under_wrap = {}",
        credential_file.display(),
        opts.domains,
        args.backups
    );
    if yh.is_none() {
        println!(
            "  In {}, set (then `keyward doctor`):\n  {wanted}",
            config.display()
        );
    } else if args.backups && !yh.is_some_and(|y| y.exportable_under_wrap) {
        println!(
            "  In {}, set hsm.exportable_under_wrap = true so keyward's keys can be backed up",
            config.display()
        );
    }
    if credential_file.is_relative() {
        println!(
            "  keywardd.service must load the signer's credential: LoadCredential={}:{}",
            credential_file.display(),
            signer_file.display()
        );
    }
    if args.backups {
        println!(
            "  Copy the wrap key {} offline (it restores the backups on a replacement device), then remove it from this box",
            opts.credential_file(yubihsm_setup::Role::Wrap).display()
        );
    }
    println!("  keyward hsm selftest          # checks the device with the signer's credential");
    println!(
        "  keyward setup --yubihsm       # the audit key on the device, its verifier key pinned"
    );
    Ok(())
}

fn run_selftest(config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let yh = cfg.hsm.yubihsm().ok_or_else(|| {
        anyhow!(
            "{}: keyward hsm selftest checks a YubiHSM 2; [hsm] backend is {:?}",
            config.display(),
            cfg.hsm.backend_name()
        )
    })?;
    let file = signer_credential_source(config, &yh.credential_file, None, true);
    let (auth_key_id, credentials) = keyward::hsm::yubihsm::credentials::read_credentials(&file)
        .with_context(|| format!("cannot read the signer's credential {}", file.display()))?;
    let device = keyward::hsm::yubihsm::connector_for(&yh.connector, yh.timeout_ms)?;
    let report = selftest(
        device,
        credentials,
        SelftestSettings {
            auth_key_id,
            domains: yh.domains.clone(),
            exportable_under_wrap: yh.exportable_under_wrap,
            device: yh.connector.to_string(),
        },
    );
    print!("{report}");
    if report.passed() {
        Ok(())
    } else {
        Err(Failure(
            1,
            anyhow!("the self-test failed: see the FAIL lines above"),
        ))
    }
}
