//! `keyward init --dev DIR`: a development instance on a SoftHSM2 token, or
//! (test and development builds) on a MockHsm.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::Failure;

/// `keyward init`'s options.
#[derive(Args)]
pub(crate) struct InitArgs {
    /// Create a development instance in this (new or empty) directory.
    #[arg(long, value_name = "DIR")]
    dev: PathBuf,
    /// The HSM the instance uses.
    #[arg(long, value_enum, default_value_t = DevBackend::Softhsm)]
    backend: DevBackend,
    /// PKCS#11 module of SoftHSM2 (default: the Debian location).
    #[arg(long)]
    module: Option<PathBuf>,
    /// `yubihsm-mock`: milliseconds each message takes in the mock device
    /// (a real YubiHSM 2 takes about 100 ms per signature).
    #[cfg(feature = "yubihsm-mock")]
    #[arg(long, value_name = "N", default_value_t = 0)]
    latency_ms: u64,
    /// `yubihsm-mock`: make the keys exportable under wrap
    /// (`exportable_under_wrap = true`), so the instance can be backed up.
    #[cfg(feature = "yubihsm-mock")]
    #[arg(long)]
    exportable_under_wrap: bool,
}

/// Which HSM a development instance runs on.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DevBackend {
    /// A SoftHSM2 token in DIR, through PKCS#11.
    Softhsm,
    /// The yubihsm crate's MockHsm behind `keyward hsm mock-connector`
    /// (backend "yubihsm" over HTTP); test and development builds only.
    #[cfg(feature = "yubihsm-mock")]
    YubihsmMock,
}

/// Creates the development instance.
pub(crate) fn run(args: InitArgs) -> Result<(), Failure> {
    let dir = if args.dev.is_absolute() {
        args.dev.clone()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(&args.dev)
    };
    keyward::tools::dev::check_target(&dir)?;
    let uid = nix::unistd::getuid().as_raw();
    let inst = match args.backend {
        DevBackend::Softhsm => softhsm(&dir, args.module.clone(), uid)?,
        #[cfg(feature = "yubihsm-mock")]
        DevBackend::YubihsmMock => {
            yubihsm_mock(&dir, args.latency_ms, uid, args.exportable_under_wrap)?
        }
    };
    println!(
        "Created a keyward development instance in {}",
        inst.dir.display()
    );
    println!(
        "  key {:?}: {}",
        inst.key.name.as_str(),
        inst.key.public_key
    );
    println!("  agent `dev` is uid {uid}; limits: 1 SOL per transaction, 10 SOL per 24 hours");
    println!();
    println!("Start the daemon:");
    println!("  keywardd --config {}", inst.config.display());
    Ok(())
}

fn softhsm(
    dir: &Path,
    module: Option<PathBuf>,
    uid: u32,
) -> Result<keyward::tools::dev::DevInstance, Failure> {
    let module = match module {
        Some(m) => m,
        None => keyward::tools::dev::find_softhsm_module()?,
    };
    // SoftHSM2 reads its configuration path when the module is loaded.
    // SAFETY: `keyward init` runs on the main thread before any other thread
    // is started and before the module is loaded.
    #[allow(unsafe_code)]
    unsafe {
        keyward::process::set_env_single_threaded(
            "SOFTHSM2_CONF",
            &keyward::hsm::softhsm::conf_path(dir),
        )
    };
    Ok(keyward::tools::dev::init_dev(dir, &module, uid)?)
}

#[cfg(feature = "yubihsm-mock")]
fn yubihsm_mock(
    dir: &Path,
    latency_ms: u64,
    uid: u32,
    exportable: bool,
) -> Result<keyward::tools::dev::DevInstance, Failure> {
    use keyward::tools::dev::yubihsm_mock;
    let exe = std::env::current_exe().context("cannot find the keyward executable")?;
    let (inst, connector) = yubihsm_mock::init_dev(dir, &exe, latency_ms, uid, exportable)?;
    println!(
        "The MockHsm (a software YubiHSM 2; its keys live in that process) runs in \
         `keyward hsm mock-connector`, pid {}, on 127.0.0.1:{}; it logs to {}.",
        connector.pid,
        connector.port,
        dir.join(yubihsm_mock::LOG_FILE).display()
    );
    println!(
        "  Stop it with `kill $(cat {})` (the keys are then gone), or remove the directory: \
         it exits by itself.",
        dir.join(yubihsm_mock::PID_FILE).display()
    );
    Ok(inst)
}
