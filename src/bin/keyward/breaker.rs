//! `keyward breaker`: circuit breakers (through the admin socket).

use std::path::Path;

use anyhow::anyhow;
use clap::Subcommand;
use keyward::config::Config;

use crate::{Failure, admin_post};

#[derive(Subcommand)]
pub(crate) enum BreakerCommand {
    /// Close a breaker (`audit`) after fixing its cause; recorded in the ledger.
    Reset {
        /// Breaker name.
        name: String,
    },
}

/// Runs one `keyward breaker` command.
pub(crate) fn run(config: &Path, command: BreakerCommand) -> Result<(), Failure> {
    match command {
        BreakerCommand::Reset { name } => reset(config, &name),
    }
}

/// `keyward breaker reset NAME`: closes a breaker; the daemon records it.
fn reset(config: &Path, name: &str) -> Result<(), Failure> {
    keyward::types::AgentName::new(name).map_err(|_| {
        Failure(
            2,
            anyhow!("{name:?} is not a breaker name: give `audit` or an agent's name"),
        )
    })?;
    let cfg = Config::load(config)?;
    let view: keyward_client::wire::BreakerResetView =
        admin_post(&cfg, &format!("/v1/admin/breakers/{name}/reset"))?;
    println!(
        "breaker {} is {} (ledger seq {})",
        view.breaker, view.state, view.ledger_seq
    );
    Ok(())
}
