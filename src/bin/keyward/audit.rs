//! `keyward audit`: offline ledger commands (verify, pin, trail, export,
//! checkpoint, prove, verify-proof); only `pin` talks to the daemon.

mod verify;

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Subcommand, ValueEnum};
use keyward::config::Config;

use crate::{Failure, admin_get};

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
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
pub(crate) enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// Runs one `keyward audit` command.
pub(crate) fn run(config: &Path, command: AuditCommand) -> Result<(), Failure> {
    match command {
        AuditCommand::Verify {
            db,
            vkey,
            vkey_file,
            hsm,
            mirror,
            allowed_lag,
        } => verify::run(config, db, vkey, vkey_file, hsm, mirror, allowed_lag),
        AuditCommand::Pin => pin(config),
        AuditCommand::Trail {
            intent_id,
            agent,
            db,
        } => trail(config, &intent_id, agent.as_deref(), db),
        AuditCommand::Checkpoint { vkey, db } => checkpoint(config, vkey, db),
        AuditCommand::Prove { seq, db } => prove(config, seq, db),
        AuditCommand::VerifyProof { proof, vkey } => verify_proof(&proof, &vkey),
        AuditCommand::Export {
            format: ExportFormat::Jsonl,
            since,
            db,
        } => export(config, since, db),
    }
}

/// The ledger database: `--db`, or the one the config names.
fn db_path(cli_config: &Path, db: Option<PathBuf>) -> Result<PathBuf, Failure> {
    match db {
        Some(db) => Ok(db),
        None => {
            let cfg = Config::load(cli_config).map_err(|e| anyhow!("{e} (or pass --db PATH)"))?;
            Ok(cfg.ledger_path())
        }
    }
}

/// `keyward audit pin`: writes the daemon's audit verifier key to the pin
/// file (mode 0444), or checks that the pinned key is the same.
fn pin(cli_config: &Path) -> Result<(), Failure> {
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
    keyward::tools::dev::write_new(&path, 0o444, &keyward::ledger::TrustedKey::file_text(&vkey))
        .map_err(|e| Failure(2, anyhow!(e)))?;
    println!(
        "pinned the audit verifier key in {}: {vkey}",
        path.display()
    );
    Ok(())
}

/// `keyward audit trail`: every ledger entry of one intent, as JSON lines.
fn trail(
    config: &Path,
    intent_id: &str,
    agent: Option<&str>,
    db: Option<PathBuf>,
) -> Result<(), Failure> {
    let db = db_path(config, db)?;
    let conn = keyward::ledger::open_read_only(&db)?;
    let entries = keyward::ledger::trail(&conn, intent_id, agent)?;
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

/// `keyward audit checkpoint`: the latest signed checkpoint, verified first with `--vkey`.
fn checkpoint(config: &Path, vkey: Option<String>, db: Option<PathBuf>) -> Result<(), Failure> {
    let db = db_path(config, db)?;
    let conn = keyward::ledger::open_read_only(&db)?;
    let v = keyward::ledger::latest_checkpoint(&conn)?
        .ok_or_else(|| Failure(1, anyhow!("the ledger has no checkpoint yet")))?;
    let note = v.note.as_str();
    if let Some(vkey) = vkey {
        let cp = keyward::ledger::checkpoint::verify(note, &vkey)
            .map_err(|e| Failure(1, anyhow!("the latest checkpoint does not verify: {e}")))?;
        eprintln!(
            "verified: {} entries, signed by {}",
            cp.size,
            vkey.split('+').next().unwrap_or("")
        );
    }
    print!("{note}");
    Ok(())
}

/// `keyward audit prove`: an inclusion proof of one entry.
fn prove(config: &Path, seq: u64, db: Option<PathBuf>) -> Result<(), Failure> {
    let db = db_path(config, db)?;
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

/// `keyward audit verify-proof`: checks an inclusion proof offline.
fn verify_proof(proof: &str, vkey: &str) -> Result<(), Failure> {
    let text = if proof == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(proof).with_context(|| format!("cannot read {proof}"))?
    };
    let v: serde_json::Value = serde_json::from_str(&text).context("the proof is not JSON")?;
    // Accept a bare proof or an intent view that carries one.
    let p: keyward::ledger::InclusionProof =
        serde_json::from_value(if v.get("proof").is_some_and(|p| p.is_object()) {
            v["proof"].clone()
        } else {
            v
        })
        .context("not an inclusion proof")?;
    match keyward::ledger::verify_proof(&p, vkey) {
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

/// `keyward audit export`: entries from `since` on as JSON lines.
fn export(config: &Path, since: u64, db: Option<PathBuf>) -> Result<(), Failure> {
    let db = db_path(config, db)?;
    let conn = keyward::ledger::open_read_only(&db)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let n = keyward::ledger::export_jsonl(&conn, since, &mut out)?;
    use std::io::Write;
    out.flush()?;
    eprintln!("exported {n} entries");
    Ok(())
}
