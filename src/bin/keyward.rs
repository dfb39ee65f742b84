//! keyward: operator, auditor and development CLI.
//!
//! Exit status: 0 success, 1 a negative finding (e.g. a broken chain),
//! 2 a usage or environment error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use keyward::config::{Config, DEFAULT_CONFIG};

/// keyward: the operator's CLI for the keyward signing appliance.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// keyward.toml of the instance to act on.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a development instance: a SoftHSM2 token, config, policy and a key `hot`, all in DIR.
    Init {
        /// Create a development instance in this (new or empty) directory.
        #[arg(long, value_name = "DIR")]
        dev: PathBuf,
        /// PKCS#11 module of SoftHSM2 (default: the Debian location).
        #[arg(long)]
        module: Option<PathBuf>,
    },
    /// Offline ledger commands (no daemon needed).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Keys (through the running daemon's admin socket).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Circuit breakers (through the admin socket).
    Breaker {
        #[command(subcommand)]
        command: BreakerCommand,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Ship ledger entries to the mirror configured in [mirror], in order and
    /// exactly once, until SIGTERM (run as its own service and user).
    Mirror,
    /// Approvers of large intents (through the admin socket).
    Approver {
        #[command(subcommand)]
        command: ApproverCommand,
    },
    /// Intents waiting for approvals, and approvers' tokens relayed by the
    /// operator (through the admin socket).
    Approval {
        #[command(subcommand)]
        command: ApprovalCommand,
    },
    /// On an approver's own machine: check an approval request against its
    /// bytes, show what the transaction really does, and print a token.
    Approve {
        /// The approval request (the JSON of `GET /v1/intents/{id}`), a file or `-` for stdin.
        #[arg(long)]
        request: String,
        /// Your approver name.
        #[arg(long)]
        approver: String,
        /// Your key file (from `keyward approver add`).
        #[arg(long)]
        key_file: PathBuf,
        /// Reject the intent instead of approving it.
        #[arg(long)]
        reject: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Seconds the token stays valid (at most 86400).
        #[arg(long, default_value_t = 600)]
        valid_for: i64,
    },
    /// Measure keyward's cost against the HSM's: raw signing rate,
    /// end-to-end intents per second with latency, latency at 80 % load and
    /// ledger appends, on a scratch SoftHSM2 instance (no real instance is
    /// touched).
    Bench {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Concurrent agent clients (default: 2 × cores).
        #[arg(long)]
        clients: Option<usize>,
        /// Signing threads in the raw HSM phase (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Seconds of each end-to-end phase (the raw and ledger phases take half).
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// The keywardd binary (default: next to this program).
        #[arg(long)]
        keywardd: Option<PathBuf>,
        /// PKCS#11 module of SoftHSM2 (default: the Debian location).
        #[arg(long)]
        module: Option<PathBuf>,
        /// Ledger entries to write before the run (to measure how cost grows
        /// with the ledger's size).
        #[arg(long, default_value_t = 0)]
        prefill: u64,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the history: the hash chain, every checkpoint against a trusted
    /// audit key (never one found in the database), the checkpoint kept in the
    /// HSM (--hsm) and the mirror; exit 1 naming the first broken entry.
    Verify {
        /// Ledger database (default: from the config).
        #[arg(long)]
        db: Option<PathBuf>,
        /// The audit verifier key you trust (default: the key pinned at
        /// set-up, `ledger.audit_vkey` of the config, /etc/keyward/audit.vkey).
        #[arg(long, conflicts_with = "vkey_file")]
        vkey: Option<String>,
        /// A file holding the audit verifier key you trust.
        #[arg(long)]
        vkey_file: Option<PathBuf>,
        /// Also check that the history contains the checkpoint keyward keeps in
        /// the HSM (opens the HSM with the config's PIN: run as root on the
        /// signer box); this shows truncation and rollback.
        #[arg(long)]
        hsm: bool,
        /// Also compare with the mirror's copy (`file:///path` or a path):
        /// a missing tail, a truncated local ledger, an edited entry or a fork.
        #[arg(long)]
        mirror: Option<String>,
        /// With --mirror: how many of the newest entries the copy may lack.
        #[arg(long, default_value_t = 0)]
        allowed_lag: u64,
    },
    /// Pin the running daemon's audit verifier key in the file named by
    /// `ledger.audit_vkey` (default /etc/keyward/audit.vkey), once, at set-up.
    /// Refuses to replace a pinned key that differs.
    Pin,
    /// Every ledger entry of one intent, in order.
    Trail {
        /// The intent id.
        intent_id: String,
        /// Only this agent's intent of that id.
        #[arg(long)]
        agent: Option<String>,
        /// Ledger database (default: from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Export entries as JSON lines to stdout.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// First sequence number to export.
        #[arg(long, default_value_t = 1)]
        since: u64,
        /// Ledger database (default: from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Print the latest signed checkpoint (a C2SP signed note); with --vkey, verify it first.
    Checkpoint {
        /// The audit verifier key you trust (from `keyward key list`).
        #[arg(long)]
        vkey: Option<String>,
        /// Ledger database (default: from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Print an inclusion proof of entry SEQ under the latest signed checkpoint that covers it (JSON).
    Prove {
        /// The entry's sequence number.
        seq: u64,
        /// Ledger database (default: from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Check an inclusion proof offline against a trusted audit verifier key.
    VerifyProof {
        /// The proof (JSON from `audit prove` or GET /v1/intents/{id}), a file or `-`.
        #[arg(long)]
        proof: String,
        /// The audit verifier key you trust (from `keyward key list`).
        #[arg(long)]
        vkey: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List the keys the daemon serves.
    List,
}

#[derive(Subcommand)]
enum BreakerCommand {
    /// Close a breaker (`audit`) after fixing its cause; recorded in the ledger.
    Reset {
        /// Breaker name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ApproverCommand {
    /// Enroll an approver: a new HMAC key in the HSM, its only copy written to --out (mode 0400).
    Add {
        /// Approver name.
        name: String,
        /// Where to write the approver's key file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// List approvers.
    List,
    /// Remove an approver; their tokens stop counting at once.
    Remove {
        /// Approver name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ApprovalCommand {
    /// Hand an approver's token to the daemon without the agent: it is
    /// applied to the pending intent it binds, as if the agent had sent it
    /// (a rejection vetoes the intent); recorded as relayed by you.
    Submit {
        /// File holding the token as `keyward approve` prints it, or `-` for stdin.
        file: String,
    },
    /// Intents waiting for approvals, with the approvals so far.
    List,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file offline.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Make the running daemon load its policy file again (admin socket);
    /// an invalid file keeps the old policy in force.
    Reload,
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

/// The audit key `audit verify` trusts: `--vkey`, `--vkey-file`, or the key
/// pinned at set-up. Never a key found in the database.
fn trusted_audit_key(
    cli_config: &Path,
    vkey: Option<String>,
    vkey_file: Option<PathBuf>,
) -> Result<keyward::ledger::TrustedKey, Failure> {
    use keyward::ledger::TrustedKey;
    if let Some(v) = vkey {
        return TrustedKey::new(&v, "--vkey").map_err(|e| Failure(2, anyhow!("--vkey: {e}")));
    }
    if let Some(f) = vkey_file {
        return TrustedKey::from_file(&f).map_err(|e| Failure(2, anyhow!(e)));
    }
    let pinned = match Config::load(cli_config) {
        Ok(cfg) => cfg.audit_vkey_path(),
        Err(_) => PathBuf::from(DEFAULT_AUDIT_VKEY),
    };
    if pinned.exists() {
        return TrustedKey::from_file(&pinned).map_err(|e| Failure(2, anyhow!(e)));
    }
    Err(Failure(
        2,
        anyhow!(
            "no trusted audit key: {} does not exist. Give --vkey KEY or --vkey-file FILE with the audit key pinned at set-up \
             (`keyward audit pin`); a key found in the database itself proves nothing",
            pinned.display()
        ),
    ))
}

/// What `audit verify` knows from outside the database: with `--hsm`, the
/// checkpoint kept in the HSM; with a mirror in the config, what it
/// acknowledged.
fn history_expectations(
    cli_config: &Path,
    hsm: bool,
    trusted: &keyward::ledger::TrustedKey,
) -> Result<keyward::ledger::Expectations, Failure> {
    let mut expect = keyward::ledger::Expectations::default();
    let cfg = match Config::load(cli_config) {
        Ok(cfg) => Some(cfg),
        Err(e) if hsm => return Err(Failure(2, anyhow!("--hsm needs the config: {e}"))),
        Err(_) => None,
    };
    let Some(cfg) = cfg else {
        return Ok(expect);
    };
    expect.mirror_acked = keyward::mirror::highest_ack(&cfg);
    if hsm {
        // The module reads its environment when loaded; this process is
        // still single-threaded here.
        keyward::process::apply_module_env(&cfg);
        let device = keyward::daemon::open_hsm(&cfg)
            .map_err(|e| Failure(2, anyhow!("cannot open the HSM: {e}")))?;
        let values = device
            .load_data(keyward::ledger::checkpoint::MARK_LABEL)
            .map_err(|e| Failure(2, anyhow!("cannot read the HSM's checkpoint mark: {e}")))?;
        expect.mark = keyward::ledger::checkpoint::Mark::newest(&values, trusted.vkey())
            .map_err(|e| Failure(1, anyhow!("{e} (with the trusted key {})", trusted.vkey())))?;
        if expect.mark.is_none() {
            println!("note: the HSM keeps no checkpoint yet");
        }
    }
    Ok(expect)
}

/// `keyward audit pin`: writes the daemon's audit verifier key to the pin
/// file (mode 0444), or checks that the pinned key is the same.
fn audit_pin(cli_config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(cli_config)?;
    let keys: Vec<keyward_client::wire::AdminKeyInfo> = admin_get(&cfg, "/v1/admin/keys")?;
    let vkey = keys
        .iter()
        .find_map(|k| k.verifier_key.clone())
        .ok_or_else(|| Failure(2, anyhow!("the daemon reported no audit verifier key")))?;
    let path = cfg.audit_vkey_path();
    if path.exists() {
        let pinned =
            keyward::ledger::TrustedKey::from_file(&path).map_err(|e| Failure(2, anyhow!(e)))?;
        if pinned.vkey() == vkey {
            println!("already pinned in {}: {vkey}", path.display());
            return Ok(());
        }
        return Err(Failure(
            1,
            anyhow!(
                "{} pins {}, but the daemon's audit key is {vkey}; not replaced. Find out why before you re-pin by hand",
                path.display(),
                pinned.vkey()
            ),
        ));
    }
    keyward::dev::write_new(&path, 0o444, &keyward::ledger::TrustedKey::file_text(&vkey))
        .map_err(|e| Failure(2, anyhow!(e)))?;
    println!(
        "pinned the audit verifier key in {}: {vkey}",
        path.display()
    );
    Ok(())
}

/// Where the audit key is pinned when no config says otherwise.
const DEFAULT_AUDIT_VKEY: &str = "/etc/keyward/audit.vkey";

fn db_path(cli_config: &Path, db: Option<PathBuf>) -> Result<PathBuf, Failure> {
    match db {
        Some(db) => Ok(db),
        None => {
            let cfg = Config::load(cli_config).map_err(|e| anyhow!("{e} (or pass --db PATH)"))?;
            Ok(cfg.ledger_path())
        }
    }
}

fn bench(
    json: bool,
    clients: Option<usize>,
    threads: Option<usize>,
    duration: f64,
    keywardd: Option<PathBuf>,
    module: Option<PathBuf>,
    prefill: u64,
) -> Result<(), Failure> {
    if !(0.5..=3600.0).contains(&duration) {
        return Err(Failure(
            2,
            anyhow!("--duration must be between 0.5 and 3600 seconds"),
        ));
    }
    let keywardd = match keywardd {
        Some(k) => k,
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name("keywardd"),
    };
    let mut opts = keyward::bench::BenchOptions::for_this_machine(keywardd);
    opts.clients = clients.unwrap_or(opts.clients).max(1);
    opts.threads = threads.unwrap_or(opts.threads).max(1);
    opts.duration = std::time::Duration::from_secs_f64(duration);
    opts.module = module;
    opts.prefill = prefill;
    opts.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = keyward::bench::run(&opts)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.errors > 0 {
        return Err(Failure(
            1,
            anyhow!("{} requests were not signed", report.errors),
        ));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Approver { command } => approver(&cli.config, command),
        Command::Approval { command } => approval_cmd(&cli.config, command),
        Command::Mirror => mirror(&cli.config),
        Command::Approve {
            request,
            approver,
            key_file,
            reject,
            yes,
            valid_for,
        } => approve(&request, &approver, &key_file, reject, yes, valid_for),
        Command::Bench {
            json,
            clients,
            threads,
            duration,
            keywardd,
            module,
            prefill,
        } => bench(json, clients, threads, duration, keywardd, module, prefill),
        Command::Init { dev, module } => init_dev(&dev, module),
        Command::Audit { command } => match command {
            AuditCommand::Verify {
                db,
                vkey,
                vkey_file,
                hsm,
                mirror,
                allowed_lag,
            } => {
                let db = db_path(&cli.config, db)?;
                let trusted = trusted_audit_key(&cli.config, vkey, vkey_file)?;
                let expect = history_expectations(&cli.config, hsm, &trusted)?;
                match keyward::ledger::verify_history(&db, &trusted, &expect) {
                    Ok(history) => {
                        let report = &history.chain;
                        println!(
                            "ok: {} entries verified, head seq {} hash {}",
                            report.entries,
                            report.head_seq,
                            hex::encode(report.head_hash)
                        );
                        println!(
                            "ok: {} checkpoints signed by the trusted audit key {} (from {}); the newest covers entries 1..{}",
                            history.checkpoints,
                            trusted.vkey(),
                            trusted.source(),
                            history.checkpointed
                        );
                        if let Some(m) = &expect.mark {
                            println!(
                                "ok: the history contains the checkpoint kept in the HSM ({} entries, entry {})",
                                m.size, m.seq
                            );
                        }
                        if let Some((acked, sink)) = &expect.mirror_acked {
                            println!(
                                "ok: the history reaches entry {acked}, which the mirror {sink} acknowledged"
                            );
                        }
                        if history.uncovered() > 0 {
                            println!(
                                "note: entries {}..{} are not covered by a signed checkpoint yet; only the mirror can vouch for them (--mirror)",
                                history.checkpointed + 1,
                                report.entries
                            );
                        }
                        if let Some(m) = mirror {
                            let (name, result) = if m == "nats" {
                                let cfg = Config::load(&cli.config)?;
                                let n = cfg.mirror.and_then(|m| m.nats).ok_or_else(|| {
                                    Failure(
                                        2,
                                        anyhow!("no [mirror.nats] in {}", cli.config.display()),
                                    )
                                })?;
                                let rt = admin_runtime()?;
                                let copy = rt
                                    .block_on(keyward::mirror::nats::fetch_copy(&n))
                                    .map_err(|e| {
                                        Failure(2, anyhow!("cannot read stream {}: {e}", n.stream))
                                    })?;
                                (
                                    format!("stream {}", n.stream),
                                    keyward::mirror::compare_entries(&db, &copy, allowed_lag),
                                )
                            } else {
                                let path = PathBuf::from(m.strip_prefix("file://").unwrap_or(&m));
                                (
                                    path.display().to_string(),
                                    keyward::mirror::compare(&db, &path, allowed_lag),
                                )
                            };
                            match result {
                                Ok(n) => println!("ok: the mirror {name} agrees on {n} entries"),
                                Err(Ok(d)) => {
                                    return Err(Failure(1, anyhow!("mirror {name} DIVERGES: {d}")));
                                }
                                Err(Err(e)) => {
                                    return Err(Failure(
                                        2,
                                        anyhow!("cannot compare with {name}: {e}"),
                                    ));
                                }
                            }
                        }
                        Ok(())
                    }
                    Err(e) if e.is_finding() => Err(Failure(
                        1,
                        anyhow!("ledger {} is BROKEN: {e}", db.display()),
                    )),
                    Err(e) => Err(Failure(2, anyhow!("cannot verify {}: {e}", db.display()))),
                }
            }
            AuditCommand::Pin => audit_pin(&cli.config),
            AuditCommand::Trail {
                intent_id,
                agent,
                db,
            } => {
                let db = db_path(&cli.config, db)?;
                let conn = keyward::ledger::open_read_only(&db)?;
                let entries = keyward::ledger::trail(&conn, &intent_id, agent.as_deref())?;
                if entries.is_empty() {
                    return Err(Failure(
                        1,
                        anyhow!("no ledger entries for intent {intent_id:?}"),
                    ));
                }
                let mut out = std::io::stdout().lock();
                for e in entries {
                    use std::io::Write;
                    writeln!(out, "{}", e.to_json_line())?;
                }
                Ok(())
            }
            AuditCommand::Checkpoint { vkey, db } => {
                let db = db_path(&cli.config, db)?;
                let conn = keyward::ledger::open_read_only(&db)?;
                let v = keyward::ledger::latest_checkpoint(&conn)?
                    .ok_or_else(|| Failure(1, anyhow!("the ledger has no checkpoint yet")))?;
                let note = v["note"].as_str().unwrap_or_default();
                if let Some(vkey) = vkey {
                    let cp = keyward::ledger::checkpoint::verify(note, &vkey).map_err(|e| {
                        Failure(1, anyhow!("the latest checkpoint does not verify: {e}"))
                    })?;
                    eprintln!(
                        "verified: {} entries, signed by {}",
                        cp.size,
                        vkey.split('+').next().unwrap_or("")
                    );
                }
                print!("{note}");
                Ok(())
            }
            AuditCommand::Prove { seq, db } => {
                let db = db_path(&cli.config, db)?;
                let conn = keyward::ledger::open_read_only(&db)?;
                match keyward::ledger::prove(&conn, seq)? {
                    Some(p) => {
                        println!("{}", serde_json::to_string_pretty(&p)?);
                        Ok(())
                    }
                    None => Err(Failure(
                        1,
                        anyhow!("no signed checkpoint covers entry {seq} yet"),
                    )),
                }
            }
            AuditCommand::VerifyProof { proof, vkey } => {
                let text = if proof == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    s
                } else {
                    std::fs::read_to_string(&proof)
                        .with_context(|| format!("cannot read {proof}"))?
                };
                let v: serde_json::Value =
                    serde_json::from_str(&text).context("the proof is not JSON")?;
                // Accept a bare proof or an intent view that carries one.
                let p: keyward::ledger::InclusionProof =
                    serde_json::from_value(if v.get("proof").is_some_and(|p| p.is_object()) {
                        v["proof"].clone()
                    } else {
                        v
                    })
                    .context("not an inclusion proof")?;
                match keyward::ledger::verify_proof(&p, &vkey) {
                    Ok(()) => {
                        println!(
                            "ok: entry {} (hash {}) is in the tree of {} entries signed by {}",
                            p.seq,
                            p.entry_hash,
                            p.tree_size,
                            vkey.split('+').next().unwrap_or("")
                        );
                        Ok(())
                    }
                    Err(e) => Err(Failure(1, anyhow!("proof does not verify: {e}"))),
                }
            }
            AuditCommand::Export {
                format: ExportFormat::Jsonl,
                since,
                db,
            } => {
                let db = db_path(&cli.config, db)?;
                let conn = keyward::ledger::open_read_only(&db)?;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let n = keyward::ledger::export_jsonl(&conn, since, &mut out)?;
                use std::io::Write;
                out.flush()?;
                eprintln!("exported {n} entries");
                Ok(())
            }
        },
        Command::Key {
            command: KeyCommand::List,
        } => {
            let cfg = Config::load(&cli.config)?;
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
        Command::Breaker {
            command: BreakerCommand::Reset { name },
        } => {
            keyward::types::AgentName::new(&name).map_err(|_| {
                Failure(
                    2,
                    anyhow!("{name:?} is not a breaker name: give `audit` or an agent's name"),
                )
            })?;
            let cfg = Config::load(&cli.config)?;
            let view: keyward_client::wire::BreakerResetView =
                admin_post(&cfg, &format!("/v1/admin/breakers/{name}/reset"))?;
            println!(
                "breaker {} is {} (ledger seq {})",
                view.breaker, view.state, view.ledger_seq
            );
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => match keyward::policy::Policy::load(&file) {
            Ok(p) => {
                println!("ok: {} agents, sha256 {}", p.agents.len(), p.hash_hex());
                Ok(())
            }
            Err(e) => Err(Failure(1, anyhow!("{e}"))),
        },
        Command::Policy {
            command: PolicyCommand::Reload,
        } => {
            let cfg = Config::load(&cli.config)?;
            let view: keyward_client::wire::PolicyReloadView =
                admin_post(&cfg, "/v1/admin/policy/reload")?;
            println!(
                "policy {} in force (was {}), ledger seq {}",
                view.policy_sha256, view.previous_sha256, view.ledger_seq
            );
            Ok(())
        }
    }
}

fn init_dev(dir: &Path, module: Option<PathBuf>) -> Result<(), Failure> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(dir)
    };
    keyward::dev::check_target(&dir)?;
    let module = match module {
        Some(m) => m,
        None => keyward::dev::find_softhsm_module()?,
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
    let inst = keyward::dev::init_dev(&dir, &module, uid)?;
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

fn admin_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn admin_call<T: serde::de::DeserializeOwned>(
    cfg: &Config,
    method: &str,
    path: &str,
) -> Result<T, Failure> {
    let client = keyward_client::Client::new(&cfg.daemon.admin_socket);
    let rt = admin_runtime()?;
    let method =
        keyward_client::Method::from_bytes(method.as_bytes()).map_err(|e| anyhow!("{e}"))?;
    let result = rt.block_on(client.request_json::<()>(method, path, None));
    let (status, body) = result.map_err(|e| anyhow!("{e}"))?;
    if status.is_success() {
        Ok(serde_json::from_slice(&body).context("unexpected answer from the daemon")?)
    } else {
        let msg = serde_json::from_slice::<keyward_client::wire::ErrorBody>(&body)
            .map(|b| format!("{} ({})", b.error.message, b.error.code))
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(Failure(2, anyhow!("the daemon refused: {msg}")))
    }
}

fn admin_get<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str) -> Result<T, Failure> {
    admin_call(cfg, "GET", path)
}

fn mirror(config: &Path) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    if cfg.mirror.is_none() {
        return Err(Failure(
            2,
            anyhow!("{} has no [mirror] section", config.display()),
        ));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    ctrl_stop(std::sync::Arc::clone(&stop))?;
    keyward::mirror::run(&cfg, &stop).map_err(|e| Failure(1, anyhow!("mirror stopped: {e}")))
}

/// Sets `flag` on SIGTERM or SIGINT (a small thread waiting on a signal set).
fn ctrl_stop(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<(), Failure> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("cannot block SIGTERM")?;
    std::thread::spawn(move || {
        let _ = set.wait();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    Ok(())
}

const KEY_FILE_HEADER: &str = "keyward-approver-key v1";

fn approver(config: &Path, command: ApproverCommand) -> Result<(), Failure> {
    use zeroize::Zeroize as _;
    let cfg = Config::load(config)?;
    let valid = |name: &str| {
        keyward::types::AgentName::new(name)
            .map(|_| ())
            .map_err(|e| {
                Failure(
                    2,
                    anyhow!("{}", e.to_string().replace("agent name", "approver name")),
                )
            })
    };
    match command {
        ApproverCommand::Add { name, out } => {
            valid(&name)?;
            if out.exists() {
                return Err(Failure(
                    2,
                    anyhow!("{} exists; refusing to overwrite a key file", out.display()),
                ));
            }
            let mut created: keyward_client::wire::ApproverCreated =
                admin_post(&cfg, &format!("/v1/admin/approvers/{name}"))?;
            let mut text = format!(
                "{KEY_FILE_HEADER}\napprover: {}\nkey: {}\n",
                created.approver, created.key
            );
            created.key.zeroize();
            let written = (|| -> std::io::Result<()> {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o400)
                    .open(&out)?;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })();
            text.zeroize();
            written.with_context(|| {
                format!(
                    "cannot write the key file {} (the approver is enrolled; remove and add again)",
                    out.display()
                )
            })?;
            println!(
                "approver {name} enrolled; their key is in {} (mode 0400): hand it over and delete your copy",
                out.display()
            );
            Ok(())
        }
        ApproverCommand::List => {
            let list: Vec<keyward_client::wire::ApproverInfo> =
                admin_get(&cfg, "/v1/admin/approvers")?;
            for a in list {
                println!(
                    "{}\t{}\tadded {}{}",
                    a.name,
                    a.state,
                    a.added_at,
                    a.removed_at
                        .map(|r| format!(", removed {r}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        ApproverCommand::Remove { name } => {
            valid(&name)?;
            let v: serde_json::Value =
                admin_call(&cfg, "DELETE", &format!("/v1/admin/approvers/{name}"))?;
            println!("approver {name} removed (ledger seq {})", v["ledger_seq"]);
            Ok(())
        }
    }
}

fn approval_cmd(config: &Path, command: ApprovalCommand) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    match command {
        ApprovalCommand::List => {
            let list: Vec<keyward_client::wire::PendingApprovalInfo> =
                admin_get(&cfg, "/v1/admin/approvals")?;
            if list.is_empty() {
                println!("no intent is waiting for approvals");
            }
            for p in list {
                println!(
                    "{}/{}\tkey {}\t{}/{} approvals\texpires {}\n  {}\n  intent hash {}\n  approvers now: {}",
                    p.agent,
                    p.intent_id,
                    p.key,
                    p.received,
                    p.required,
                    p.expires_at,
                    p.summary,
                    p.intent_hash,
                    p.approvers.join(", ")
                );
                for a in p.approvals {
                    println!(
                        "  {}	{}	{}{}",
                        a.approver,
                        a.decision,
                        a.at,
                        if a.counts {
                            ""
                        } else {
                            "\t(does not count now)"
                        }
                    );
                }
            }
            Ok(())
        }
        ApprovalCommand::Submit { file } => {
            // A token is about 400 bytes; read a little more than the
            // longest one accepted, never a whole large file.
            let limit = keyward::approval::MAX_TOKEN_LEN as u64 + 64;
            let mut text = String::new();
            let read = if file == "-" {
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(std::io::stdin(), limit),
                    &mut text,
                )
            } else {
                std::fs::File::open(&file).and_then(|f| {
                    std::io::Read::read_to_string(&mut std::io::Read::take(f, limit), &mut text)
                })
            };
            read.with_context(|| format!("cannot read the token from {file}"))?;
            let token = text.trim().to_owned();
            let client = keyward_client::Client::new(&cfg.daemon.admin_socket);
            let body = keyward_client::wire::RelayedApproval { token };
            let (status, answer) = admin_runtime()?
                .block_on(client.request_json(
                    keyward_client::Method::POST,
                    "/v1/admin/approvals",
                    Some(&body),
                ))
                .map_err(|e| anyhow!("{e}"))?;
            let value: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
            match status.as_u16() {
                200 => {
                    println!(
                        "relayed: the quorum is reached; intent {} is signed ({})",
                        value["intent_id"].as_str().unwrap_or("?"),
                        value["signature"].as_str().unwrap_or("?")
                    );
                    Ok(())
                }
                202 => {
                    println!(
                        "relayed: intent {} has {} of {} approvals",
                        value["intent_id"].as_str().unwrap_or("?"),
                        value["approval"]["received"],
                        value["approval"]["required"]
                    );
                    Ok(())
                }
                _ => {
                    let code = value["error"]["code"].as_str().unwrap_or("?");
                    let message = value["error"]["message"].as_str().unwrap_or("?");
                    if code == "approval_rejected" {
                        println!("relayed: {message}");
                        return Ok(());
                    }
                    let exit = if status.is_client_error() { 1 } else { 2 };
                    Err(Failure(
                        exit,
                        anyhow!("the daemon refused the token: {message} ({code})"),
                    ))
                }
            }
        }
    }
}

fn read_key_file(path: &Path, approver: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, Failure> {
    use base64::Engine as _;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let mut lines = text.lines();
    if lines.next() != Some(KEY_FILE_HEADER) {
        return Err(Failure(
            2,
            anyhow!("{} is not a keyward approver key file", path.display()),
        ));
    }
    let name = lines.next().and_then(|l| l.strip_prefix("approver: "));
    if name != Some(approver) {
        return Err(Failure(
            2,
            anyhow!(
                "{} is the key of {:?}, not of {approver:?}",
                path.display(),
                name.unwrap_or("?")
            ),
        ));
    }
    let key = lines
        .next()
        .and_then(|l| l.strip_prefix("key: "))
        .and_then(|k| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(k)
                .ok()
        })
        .filter(|k| k.len() == 32)
        .ok_or_else(|| Failure(2, anyhow!("{} has no valid key", path.display())))?;
    Ok(zeroize::Zeroizing::new(key))
}

fn approve(
    request: &str,
    approver: &str,
    key_file: &Path,
    reject: bool,
    yes: bool,
    valid_for: i64,
) -> Result<(), Failure> {
    use keyward::approval::{self, request as req};
    let text = if request == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("cannot read the request from stdin")?;
        s
    } else {
        std::fs::read_to_string(request).with_context(|| format!("cannot read {request}"))?
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).context("the request is not JSON")?;
    let approval_obj = if value.get("intent_hash").is_some() {
        value.clone()
    } else {
        value["approval"].clone()
    };
    if approval_obj.is_null() {
        return Err(Failure(
            2,
            anyhow!("the request has no approval object (is the intent pending?)"),
        ));
    }
    let checked = req::check(&approval_obj).map_err(|e| Failure(1, anyhow!(e)))?;
    if !(1..=approval::MAX_TOKEN_VALIDITY_S).contains(&valid_for) {
        return Err(Failure(
            2,
            anyhow!(
                "--valid-for must be between 1 and {} seconds",
                approval::MAX_TOKEN_VALIDITY_S
            ),
        ));
    }
    let key = read_key_file(key_file, approver)?;
    let e = &checked.effects;
    eprintln!("This transaction, decoded from its bytes:");
    eprintln!("  signed by     {}", checked.signer);
    for o in &e.sol_outflows {
        eprintln!(
            "  sends         {} SOL to {} ({})",
            o.lamports, o.to, o.kind
        );
    }
    for o in &e.spl_outflows {
        let amount = o.decimals.map_or_else(
            || format!("{} base units", o.amount),
            |d| keyward::amount::format_units(u128::from(o.amount), d),
        );
        let mint = o
            .mint
            .map_or_else(|| "an unnamed mint".to_owned(), |m| m.to_base58());
        eprintln!(
            "  sends         {amount} of {mint} to token account {}",
            o.destination
        );
    }
    eprintln!(
        "  fees          {} SOL (paid by the signer: {})",
        e.fees, e.fee_payer_is_us
    );
    eprintln!(
        "  programs      {}",
        e.programs
            .iter()
            .map(|p| p.to_base58())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for v in &e.violations {
        eprintln!("  WARNING       {}: {}", v.rule, v.detail);
    }
    eprintln!("  intent hash   {}", hex::encode(checked.intent_hash));
    let verb = if reject { "REJECT" } else { "APPROVE" };
    if !yes {
        eprint!("{verb} this transaction as {approver}? Type yes: ");
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("cannot read the answer")?;
        if answer.trim() != "yes" {
            return Err(Failure(1, anyhow!("not confirmed; no token made")));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs() as i64;
    let nonce: [u8; 16] = rand::random();
    let payload = approval::TokenPayload {
        intent_hash: hex::encode(checked.intent_hash),
        approver: approver.to_owned(),
        decision: if reject {
            approval::Verdict::Reject
        } else {
            approval::Verdict::Approve
        },
        issued_at: now,
        expires_at: now + valid_for,
        nonce: hex::encode(nonce),
    };
    let token = approval::make(&key, &payload).map_err(|e| Failure(2, anyhow!("{e}")))?;
    println!("{token}");
    Ok(())
}

fn admin_post<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str) -> Result<T, Failure> {
    admin_call(cfg, "POST", path)
}
