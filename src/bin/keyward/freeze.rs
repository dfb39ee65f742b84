//! `keyward freeze` and `keyward unfreeze`: the emergency stop (through
//! the admin socket). A freeze refuses every new intent in its scope with
//! 423 `frozen` from the next request on; intents already inside the HSM
//! finish. Both are recorded in the ledger and survive restarts.

use std::path::Path;

use clap::Args;
use keyward::config::Config;
use keyward_client::wire::{FreezeRequest, FreezeView, UnfreezeRequest, UnfreezeView};

use crate::{Failure, admin_get};

/// `keyward freeze`.
#[derive(Args)]
pub(crate) struct FreezeArgs {
    /// Freeze only this agent's intents.
    #[arg(long, conflicts_with = "key")]
    agent: Option<String>,
    /// Freeze only intents naming this key.
    #[arg(long)]
    key: Option<String>,
    /// Why (required; recorded in the ledger, shown on the admin socket,
    /// never to agents).
    #[arg(long, required_unless_present = "list")]
    reason: Option<String>,
    /// List the freezes in force instead (scope, since, by, reason).
    #[arg(long, conflicts_with_all = ["agent", "key", "reason"])]
    list: bool,
}

/// `keyward unfreeze`.
#[derive(Args)]
pub(crate) struct UnfreezeArgs {
    /// Lift the freeze of this agent.
    #[arg(long, conflicts_with = "key")]
    agent: Option<String>,
    /// Lift the freeze of this key.
    #[arg(long)]
    key: Option<String>,
    /// Why (recorded in the ledger).
    #[arg(long)]
    reason: Option<String>,
}

/// The admin API's scope and target for `--agent` / `--key` / neither.
fn scope(agent: Option<String>, key: Option<String>) -> (String, Option<String>) {
    match (agent, key) {
        (Some(a), _) => ("agent".to_owned(), Some(a)),
        (None, Some(k)) => ("key".to_owned(), Some(k)),
        (None, None) => ("all".to_owned(), None),
    }
}

fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    cfg: &Config,
    path: &str,
    body: &B,
) -> Result<T, Failure> {
    crate::admin_call_json(cfg, "POST", path, body)
}

/// Runs `keyward freeze`.
pub(crate) fn run_freeze(config: &Path, args: FreezeArgs) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    if args.list {
        return list(&cfg);
    }
    let (scope, target) = scope(args.agent, args.key);
    let request = FreezeRequest {
        scope,
        target,
        reason: args.reason.unwrap_or_default(),
    };
    let view: FreezeView = post(&cfg, "/v1/admin/freezes", &request)?;
    if view.created == Some(false) {
        println!(
            "{} was already frozen since {} by {} (ledger seq {}); nothing changed",
            view.scope, view.since, view.by, view.ledger_seq
        );
    } else {
        println!(
            "signing frozen for {} since {} (ledger seq {}); `keyward unfreeze` lifts it",
            view.scope, view.since, view.ledger_seq
        );
    }
    Ok(())
}

/// Runs `keyward unfreeze`.
pub(crate) fn run_unfreeze(config: &Path, args: UnfreezeArgs) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let (scope, target) = scope(args.agent, args.key);
    let request = UnfreezeRequest {
        scope,
        target,
        reason: args.reason,
    };
    let view: UnfreezeView = post(&cfg, "/v1/admin/freezes/lift", &request)?;
    println!(
        "signing unfrozen for {} (frozen since {}, ledger seq {})",
        view.scope, view.frozen_since, view.ledger_seq
    );
    Ok(())
}

/// `keyward freeze --list`.
fn list(cfg: &Config) -> Result<(), Failure> {
    let freezes: Vec<FreezeView> = admin_get(cfg, "/v1/admin/freezes")?;
    if freezes.is_empty() {
        println!("no freezes in force");
        return Ok(());
    }
    println!(
        "{:<24} {:<24} {:<10} {:>8} reason",
        "scope", "since", "by", "seq"
    );
    for f in &freezes {
        println!(
            "{:<24} {:<24} {:<10} {:>8} {}",
            f.scope,
            f.since,
            f.by,
            f.ledger_seq,
            f.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
