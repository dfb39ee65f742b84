//! `keyward policy`: check a policy file offline, or make the daemon reload
//! its own (through the admin socket).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use keyward::config::Config;

use crate::{Failure, admin_post};

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate a policy file offline.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Make the running daemon load its policy file again (admin socket);
    /// an invalid file keeps the old policy in force.
    Reload,
}

/// Runs one `keyward policy` command.
pub(crate) fn run(config: &Path, command: PolicyCommand) -> Result<(), Failure> {
    match command {
        PolicyCommand::Check { file } => check(&file),
        PolicyCommand::Reload => reload(config),
    }
}

/// `keyward policy check FILE`: exit 1 when the file is invalid.
fn check(file: &Path) -> Result<(), Failure> {
    match keyward::policy::Policy::load(file) {
        Ok(p) => {
            println!("ok: {} agents, sha256 {}", p.agents.len(), p.hash_hex());
            Ok(())
        }
        Err(e) => Err(Failure(1, anyhow!("{e}"))),
    }
}

/// `keyward policy reload`: the daemon loads its policy file again.
fn reload(config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let view: keyward_client::wire::PolicyReloadView = admin_post(&cfg, "/v1/admin/policy/reload")?;
    println!(
        "policy {} in force (was {}), ledger seq {}",
        view.policy_sha256, view.previous_sha256, view.ledger_seq
    );
    Ok(())
}
