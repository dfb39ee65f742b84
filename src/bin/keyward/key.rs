//! `keyward key`: the keys the daemon serves (through the admin socket).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use keyward::config::Config;
use keyward_client::wire::{
    AdminKeyInfo, KeyRetireRequest, KeyRetiredView, KeyRotateRequest, KeyRotatedView,
    KeySweepRequest, SweepResult, SweepSpec, SweepToken,
};

use crate::{Failure, admin_get};

/// The old address's balances, for a sweep intent.
#[derive(clap::Args, Default)]
pub(crate) struct SweepArgs {
    /// The old address's SOL balance (decimal SOL); what moves is this less
    /// the fee and the rent of the token accounts the sweep creates.
    #[arg(long)]
    sol: Option<String>,
    /// A token balance of the old address, MINT=AMOUNT (decimal, in the
    /// token's units; its decimals come from the agent's policy). Repeat.
    #[arg(long = "token", value_name = "MINT=AMOUNT")]
    tokens: Vec<String>,
    /// A JSON file with the balances instead: {"sol": "1.5", "tokens":
    /// [{"mint": "...", "amount": "100"}], "recent_blockhash": "..."}.
    #[arg(long, conflicts_with_all = ["sol", "tokens"])]
    balances: Option<PathBuf>,
    /// Recent blockhash (base58) for the sweep transaction (read from an
    /// RPC node by the operator; keyward has no network).
    #[arg(long)]
    blockhash: Option<String>,
    /// The agent whose policy and approvers the sweep goes through
    /// (default: the one agent whose policy lists the key).
    #[arg(long)]
    agent: Option<String>,
}

impl SweepArgs {
    /// The sweep to request, or `None` when no balance was given.
    fn spec(&self) -> Result<Option<SweepSpec>, Failure> {
        let mut spec = match &self.balances {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Failure(2, anyhow!("cannot read {}: {e}", path.display())))?;
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Balances {
                    #[serde(default)]
                    sol: Option<String>,
                    #[serde(default)]
                    tokens: Vec<SweepToken>,
                    #[serde(default)]
                    recent_blockhash: Option<String>,
                }
                let b: Balances = serde_json::from_str(&text)
                    .map_err(|e| Failure(2, anyhow!("{}: {e}", path.display())))?;
                SweepSpec {
                    sol: b.sol,
                    tokens: b.tokens,
                    recent_blockhash: b.recent_blockhash.unwrap_or_default(),
                    ..SweepSpec::default()
                }
            }
            None => {
                let mut tokens = Vec::new();
                for t in &self.tokens {
                    let (mint, amount) = t.split_once('=').ok_or_else(|| {
                        Failure(2, anyhow!("--token {t:?}: expected MINT=AMOUNT"))
                    })?;
                    tokens.push(SweepToken {
                        mint: mint.to_owned(),
                        amount: amount.to_owned(),
                    });
                }
                SweepSpec {
                    sol: self.sol.clone(),
                    tokens,
                    ..SweepSpec::default()
                }
            }
        };
        if spec.sol.is_none() && spec.tokens.is_empty() {
            return Ok(None);
        }
        if let Some(b) = &self.blockhash {
            spec.recent_blockhash = b.clone();
        }
        if spec.recent_blockhash.is_empty() {
            return Err(Failure(
                2,
                anyhow!("a sweep needs --blockhash (a recent blockhash from an RPC node)"),
            ));
        }
        spec.agent = self.agent.clone();
        Ok(Some(spec))
    }
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// List every key: name, version, public key, backend, state
    /// (active, retiring, retired), created and rotated times.
    List,
    /// Rotate key NAME: generate its successor inside the HSM, have both
    /// keys sign the transition statement, record it, point the name at the
    /// successor (agents keep the name) and move the old key to retiring.
    /// With the old address's balances, also create the sweep intent that
    /// moves them to the new address (through policy and approvals).
    Rotate {
        /// Key name.
        name: String,
        /// Why (one line; recorded and signed by both keys).
        #[arg(long)]
        reason: String,
        /// Days the old key stays retiring before `key retire` may destroy
        /// it without --force.
        #[arg(long, default_value_t = 7)]
        grace_days: u64,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// Create a sweep intent for a retiring key NAME@VERSION (again, e.g.
    /// with a fresh blockhash after the first one expired).
    Sweep {
        /// NAME@VERSION of a retiring key.
        key: String,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// Destroy a retiring key NAME@VERSION in the HSM after its grace
    /// period (recorded); earlier only with --force and --reason.
    Retire {
        /// NAME@VERSION of a retiring key.
        key: String,
        /// Retire within the grace period.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why (required with --force).
        #[arg(long)]
        reason: Option<String>,
    },
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
        KeyCommand::Rotate {
            name,
            reason,
            grace_days,
            sweep,
        } => rotate(config, &name, &reason, grace_days, &sweep),
        KeyCommand::Sweep { key, sweep } => sweep_key(config, &key, &sweep),
        KeyCommand::Retire { key, force, reason } => retire(config, &key, force, reason),
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

/// `keyward key list`: every key version and the checkpoint verifier key.
fn list(config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let keys: Vec<AdminKeyInfo> = admin_get(&cfg, "/v1/admin/keys")?;
    println!(
        "{:<20} {:>3} {:<44} {:<8} {:<9} {:<20} {:<20} agents",
        "name", "ver", "public key", "backend", "state", "created", "rotated"
    );
    let day = |t: &Option<String>| {
        t.as_deref()
            .map_or("-".to_owned(), |s| s.chars().take(19).collect())
    };
    for k in &keys {
        println!(
            "{:<20} {:>3} {:<44} {:<8} {:<9} {:<20} {:<20} {}",
            k.name,
            k.version.map_or("-".to_owned(), |v| v.to_string()),
            k.public_key,
            k.backend.as_deref().unwrap_or("-"),
            k.state,
            day(&k.created_at),
            day(&k.rotated_at),
            k.agents.join(",")
        );
        if k.state == "retiring"
            && let Some(until) = &k.retire_after
        {
            println!("{:<24} grace period until {until}", "");
        }
    }
    for k in keys.iter().filter_map(|k| k.verifier_key.as_ref()) {
        println!("\ncheckpoint verifier key: {k}");
    }
    Ok(())
}

/// Prints a sweep's outcome.
fn print_sweep(s: &SweepResult) {
    let what = match s.http_status {
        200 => "signed (broadcast its transaction)",
        202 => "pending approval (`keyward approval list`)",
        403 => "denied by the agent's policy",
        _ => "not signed",
    };
    println!(
        "sweep intent {} of agent {}: {what} (HTTP {})",
        s.intent_id, s.agent, s.http_status
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&s.body).unwrap_or_default()
    );
}

/// `keyward key rotate NAME`.
fn rotate(
    config: &Path,
    name: &str,
    reason: &str,
    grace_days: u64,
    sweep: &SweepArgs,
) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let request = KeyRotateRequest {
        reason: reason.to_owned(),
        grace_s: Some(grace_days.saturating_mul(86_400)),
        sweep: sweep.spec()?,
    };
    let r: KeyRotatedView = crate::admin_call_json(
        &cfg,
        "POST",
        &format!("/v1/admin/keys/{name}/rotate"),
        &request,
    )?;
    println!(
        "rotated {}: version {} -> {} (ledger entry {})",
        r.name, r.old_version, r.new_version, r.ledger_seq
    );
    println!(
        "  old public key: {} (retiring until {})",
        r.old_public_key, r.retire_after
    );
    println!(
        "  new public key: {} (serves {:?} now)",
        r.new_public_key, r.name
    );
    println!("  both keys signed the transition statement:");
    for line in r.statement.lines() {
        println!("    {line}");
    }
    if let Some(s) = &r.sweep {
        print_sweep(s);
    }
    if let Some(e) = &r.sweep_error {
        eprintln!(
            "the sweep intent was not created: {} ({}); create it with `keyward key sweep {}@{} ...`",
            e.message, e.code, r.name, r.old_version
        );
        return Err(Failure(2, anyhow!("rotation done, sweep not created")));
    }
    if r.sweep.is_none() {
        println!(
            "Move the old address's balances with `keyward key sweep {}@{} --sol AMOUNT [--token MINT=AMOUNT] --blockhash HASH`.",
            r.name, r.old_version
        );
    }
    Ok(())
}

/// `keyward key sweep NAME@VERSION`.
fn sweep_key(config: &Path, key: &str, sweep: &SweepArgs) -> Result<(), Failure> {
    let (name, version) =
        keyward::service::rotation::parse_versioned(key).map_err(|e| Failure(2, anyhow!("{e}")))?;
    let Some(spec) = sweep.spec()? else {
        return Err(Failure(
            2,
            anyhow!("give the old address's balances: --sol, --token or --balances"),
        ));
    };
    let cfg = Config::load(config)?;
    let s: SweepResult = crate::admin_call_json(
        &cfg,
        "POST",
        &format!("/v1/admin/keys/{name}/sweep"),
        &KeySweepRequest {
            version,
            sweep: spec,
        },
    )?;
    print_sweep(&s);
    Ok(())
}

/// `keyward key retire NAME@VERSION`.
fn retire(config: &Path, key: &str, force: bool, reason: Option<String>) -> Result<(), Failure> {
    let (name, version) =
        keyward::service::rotation::parse_versioned(key).map_err(|e| Failure(2, anyhow!("{e}")))?;
    let cfg = Config::load(config)?;
    let r: KeyRetiredView = crate::admin_call_json(
        &cfg,
        "POST",
        &format!("/v1/admin/keys/{name}/retire"),
        &KeyRetireRequest {
            version,
            force,
            reason,
        },
    )?;
    println!(
        "retired {} ({}): destroyed in the HSM{} (ledger entry {})",
        r.key,
        r.public_key,
        if r.forced {
            ", within its grace period"
        } else {
            ""
        },
        r.ledger_seq
    );
    Ok(())
}
