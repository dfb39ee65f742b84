//! keyward: operator, auditor and development CLI.
//!
//! Exit status: 0 success, 1 a negative finding (e.g. a broken chain),
//! 2 a usage or environment error.
//!
//! One module per group of subcommands; this file holds the command line's
//! top level, the dispatch, the exit status and the admin socket client
//! they share.

mod approval;
mod approve;
mod approver;
mod audit;
mod backup;
mod bench;
mod breaker;
mod drill;
mod freeze;
mod hsm;
mod init;
mod key;
mod key_file;
mod mirror;
mod policy;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use keyward::config::{Config, DEFAULT_CONFIG};

/// keyward: the operator's CLI for the keyward signing appliance.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// keyward.toml of the instance to act on.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare this signer box's HSM for keywardd: SoftHSM2 (--softhsm) or a
    /// vendor module's token (--module PATH --token-label LABEL); writes the
    /// PIN credential (root only, 0400), generates the audit key and pins
    /// its verifier key, then checks the configuration. Safe to run again.
    Setup(setup::SetupArgs),
    /// Create a development instance: a SoftHSM2 token, config, policy and a key `hot`, all in DIR.
    Init(init::InitArgs),
    /// Offline ledger commands (no daemon needed).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Keys (through the running daemon's admin socket).
    Key {
        #[command(subcommand)]
        command: key::KeyCommand,
    },
    /// Circuit breakers (through the admin socket).
    Breaker {
        #[command(subcommand)]
        command: breaker::BreakerCommand,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Ship ledger entries to the mirror configured in [mirror], in order and
    /// exactly once, until SIGTERM (run as its own service and user).
    Mirror,
    /// Approvers of large intents (through the admin socket).
    Approver {
        #[command(subcommand)]
        command: approver::ApproverCommand,
    },
    /// Intents waiting for approvals, and approvers' tokens relayed by the
    /// operator (through the admin socket).
    Approval {
        #[command(subcommand)]
        command: approval::ApprovalCommand,
    },
    /// On an approver's own machine: check an approval request against its
    /// bytes, show what the transaction really does, and print a token.
    Approve(approve::ApproveArgs),
    /// Measure keyward's cost against the HSM's: raw signing rate,
    /// end-to-end intents per second with latency, latency at 80 % load and
    /// ledger appends, on a scratch SoftHSM2 instance (no real instance is
    /// touched).
    Bench(bench::BenchArgs),
    /// Packaging: write the manual pages keyward.1 and keyward-*.1 into DIR.
    #[command(hide = true)]
    WriteManPage {
        /// Directory to write the pages into.
        dir: PathBuf,
    },
    /// The HSM itself: `setup yubihsm` provisions a factory-fresh YubiHSM 2
    /// with least-privilege authentication keys, `selftest` checks it with
    /// keywardd's credential.
    Hsm {
        #[command(subcommand)]
        command: hsm::HsmCommand,
    },
    /// Backups: create (through the running daemon, which signs and
    /// records it), verify and restore into a fresh instance.
    Backup {
        #[command(subcommand)]
        command: backup::BackupCommand,
    },
    /// Check this instance as `keywardd --check-config` does: files' owners
    /// and modes, the HSM token, PIN and keys, the ledger (read-only) and
    /// the mirror's files; every finding with its fix. Exit 0 when keywardd
    /// would start, 1 otherwise. Safe beside a running daemon.
    Doctor,
    /// Emergency stop: refuse every new intent (or one agent's, with
    /// --agent, or one key's, with --key) with 423 `frozen` until
    /// `keyward unfreeze`; intents already inside the HSM finish. Recorded
    /// in the ledger, survives restarts. `--list` shows the freezes in force.
    Freeze(freeze::FreezeArgs),
    /// Lift a freeze (the same scope as given to `keyward freeze`); recorded.
    Unfreeze(freeze::UnfreezeArgs),
    /// Drills on scratch instances (`dr`: restore the latest backup and
    /// sign with it; `rotation`: rotate and retire a scratch key), each
    /// reported in files and recorded in the ledger as drill_completed.
    /// Exit 1 names the step that failed.
    Drill {
        #[command(subcommand)]
        command: drill::DrillCommand,
    },
}

/// A failure with the exit status it maps to.
struct Failure(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(2, e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keyward::logging::init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("keyward: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Runs the command the command line names.
fn run(cli: Cli) -> Result<(), Failure> {
    let config = &cli.config;
    match cli.command {
        Command::Init(args) => init::run(args),
        Command::Setup(args) => setup::run(config, args),
        Command::Audit { command } => audit::run(config, command),
        Command::Key { command } => key::run(config, command),
        Command::Breaker { command } => breaker::run(config, command),
        Command::Policy { command } => policy::run(config, command),
        Command::Mirror => mirror::run(config),
        Command::Approver { command } => approver::run(config, command),
        Command::Approval { command } => approval::run(config, command),
        Command::Approve(args) => approve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Hsm { command } => hsm::run(config, command),
        Command::Backup { command } => backup::run(config, command),
        Command::WriteManPage { dir } => {
            use clap::CommandFactory;
            keyward::manpage::write(Cli::command().name("keyward"), "1", &dir)
                .with_context(|| format!("cannot write the manual page into {}", dir.display()))?;
            Ok(())
        }
        Command::Freeze(args) => freeze::run_freeze(config, args),
        Command::Unfreeze(args) => freeze::run_unfreeze(config, args),
        Command::Drill { command } => drill::run(config, command),
        Command::Doctor => match keyward::doctor::run_cli(config) {
            0 => Ok(()),
            code => Err(Failure(
                code,
                anyhow!("keywardd would refuse to start with {}", config.display()),
            )),
        },
    }
}

/// A runtime for one call to the daemon.
fn admin_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Calls the running daemon through the admin socket named in `cfg`; a
/// refusal is exit status 2 with the daemon's message and code.
fn admin_call<T: serde::de::DeserializeOwned>(
    cfg: &Config,
    method: &str,
    path: &str,
) -> Result<T, Failure> {
    admin_call_with::<(), T>(cfg, method, path, None).map_err(|e| e.into_failure(cfg))
}

impl AdminError {
    /// The failure to report: "the daemon is not running" names the socket.
    fn into_failure(self, cfg: &Config) -> Failure {
        match self {
            AdminError::NotRunning(why) => Failure(
                2,
                anyhow!(
                    "cannot connect to {}: {why} (is keywardd running?)",
                    cfg.daemon.admin_socket.display()
                ),
            ),
            AdminError::Failed(f) => f,
        }
    }
}

/// Why an admin call did not succeed.
enum AdminError {
    /// Nothing serves the admin socket (it is absent, or refuses
    /// connections): the daemon is not running.
    NotRunning(String),
    /// Any other failure, or the daemon's refusal.
    Failed(Failure),
}

/// [`admin_call`] with a JSON body, telling "the daemon is not running"
/// apart from every other failure.
fn admin_call_with<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    cfg: &Config,
    method: &str,
    path: &str,
    body: Option<&B>,
) -> Result<T, AdminError> {
    let failed = |e: anyhow::Error| AdminError::Failed(Failure(2, e));
    let client = keyward_client::Client::new(&cfg.daemon.admin_socket);
    let rt = admin_runtime().map_err(AdminError::Failed)?;
    let method = keyward_client::Method::from_bytes(method.as_bytes())
        .map_err(|e| failed(anyhow!("{e}")))?;
    let result = rt.block_on(client.request_json(method, path, body));
    let (status, body) = match result {
        Ok(answer) => answer,
        Err(keyward_client::ClientError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AdminError::NotRunning(source.to_string()));
        }
        Err(e) => return Err(failed(anyhow!("{e}"))),
    };
    if status.is_success() {
        serde_json::from_slice(&body)
            .context("unexpected answer from the daemon")
            .map_err(failed)
    } else {
        let msg = serde_json::from_slice::<keyward_client::wire::ErrorBody>(&body)
            .map(|b| format!("{} ({})", b.error.message, b.error.code))
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(failed(anyhow!("the daemon refused: {msg}")))
    }
}

/// [`admin_call`] with a JSON body.
fn admin_call_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    cfg: &Config,
    method: &str,
    path: &str,
    body: &B,
) -> Result<T, Failure> {
    admin_call_with::<B, T>(cfg, method, path, Some(body)).map_err(|e| e.into_failure(cfg))
}

/// `GET path` on the admin socket.
fn admin_get<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str) -> Result<T, Failure> {
    admin_call(cfg, "GET", path)
}

/// `POST path` (no body) on the admin socket.
fn admin_post<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str) -> Result<T, Failure> {
    admin_call(cfg, "POST", path)
}
