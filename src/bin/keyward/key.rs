//! `keyward key`: the keys the daemon serves (through the admin socket).

use std::path::Path;

use clap::Subcommand;
use keyward::config::Config;

use crate::{Failure, admin_get};

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// List the keys the daemon serves.
    List,
}

/// Runs one `keyward key` command.
pub(crate) fn run(config: &Path, command: KeyCommand) -> Result<(), Failure> {
    match command {
        KeyCommand::List => list(config),
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
