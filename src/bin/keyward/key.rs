//! `keyward key`: the keys the daemon serves (through the admin socket).

use std::path::Path;

use anyhow::anyhow;
use clap::Subcommand;
use keyward::config::Config;

use crate::{Failure, admin_get};

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// List the keys the daemon serves.
    List,
    /// Generate an Ed25519 signing key NAME inside the HSM (sensitive,
    /// non-extractable) and print its public key. Through the running
    /// daemon, which records it in the ledger; while the daemon is not
    /// running, directly in the HSM (keywardd records it at its next
    /// start).
    Create {
        /// Key name: 1-64 characters of [A-Za-z0-9_.-], not starting with
        /// `keyward-` (reserved).
        name: String,
    },
}

/// Runs one `keyward key` command.
pub(crate) fn run(config: &Path, command: KeyCommand) -> Result<(), Failure> {
    match command {
        KeyCommand::List => list(config),
        KeyCommand::Create { name } => create(config, &name),
    }
}

/// `keyward key create NAME`.
fn create(config: &Path, name: &str) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    // Refused here as the daemon would, before anything is opened.
    keyward::service::new_key_name(name).map_err(|e| Failure(2, anyhow!("{e} ({})", e.code())))?;
    // For the offline path: the module reads its environment when loaded.
    keyward::process::apply_module_env(&cfg);
    let request = keyward_client::wire::KeyCreateRequest {
        name: name.to_owned(),
    };
    match crate::admin_call_with::<_, keyward_client::wire::KeyCreated>(
        &cfg,
        "POST",
        "/v1/admin/keys",
        Some(&request),
    ) {
        Ok(created) => {
            println!(
                "created key {:?} in the HSM (ledger entry {})",
                created.name, created.ledger_seq
            );
            println!("  public key: {}", created.public_key);
            println!("Name it in a policy's `keys`, then `keyward policy reload`.");
            Ok(())
        }
        Err(crate::AdminError::NotRunning(why)) => {
            eprintln!("keywardd is not running ({why}): creating the key directly in the HSM");
            let key = keyward::tools::setup::create_key_offline(&cfg, name)
                .map_err(|e| Failure(2, anyhow!("{e} ({})", e.code())))?;
            println!("created key {:?} in the HSM (offline)", key.name.as_str());
            println!("  public key: {}", key.public_key);
            println!(
                "keywardd records it in the ledger at its next start; name it in a policy's `keys` first."
            );
            Ok(())
        }
        Err(crate::AdminError::Failed(f)) => Err(f),
    }
}

/// `keyward key list`: the daemon's keys and the checkpoint verifier key.
fn list(config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let keys: Vec<keyward_client::wire::AdminKeyInfo> = admin_get(&cfg, "/v1/admin/keys")?;
    println!("{:<20} {:<46} {:<8} agents", "name", "public key", "state");
    for k in &keys {
        println!(
            "{:<20} {:<46} {:<8} {}",
            k.name,
            k.public_key,
            k.state,
            k.agents.join(",")
        );
    }
    for k in keys.iter().filter_map(|k| k.verifier_key.as_ref()) {
        println!("\ncheckpoint verifier key: {k}");
    }
    Ok(())
}
