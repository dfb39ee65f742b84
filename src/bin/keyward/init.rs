//! `keyward init --dev DIR`: a development instance on a SoftHSM2 token.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::Failure;

/// `keyward init`'s options.
#[derive(Args)]
pub(crate) struct InitArgs {
    /// Create a development instance in this (new or empty) directory.
    #[arg(long, value_name = "DIR")]
    dev: PathBuf,
    /// PKCS#11 module of SoftHSM2 (default: the Debian location).
    #[arg(long)]
    module: Option<PathBuf>,
}

/// Creates the development instance.
pub(crate) fn run(args: InitArgs) -> Result<(), Failure> {
    let InitArgs { dev: dir, module } = args;
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(dir)
    };
    keyward::tools::dev::check_target(&dir)?;
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
            &keyward::hsm::softhsm::conf_path(&dir),
        )
    };
    let uid = nix::unistd::getuid().as_raw();
    let inst = keyward::tools::dev::init_dev(&dir, &module, uid)?;
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
