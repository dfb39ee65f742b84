//! `keyward backup`: create (through the running daemon, which signs the
//! manifest), verify and restore (offline).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use keyward::config::Config;
use keyward::ledger::TrustedKey;
use keyward::ops::backup::{self, BackupError};

use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum BackupCommand {
    /// Back up this instance while keywardd runs (run as root): the
    /// SoftHSM2 token (encrypted under its PINs), a consistent ledger
    /// snapshot, keyward.toml, the policy and the pinned audit key, with a
    /// manifest of SHA-256 digests signed by the audit key. Never the PIN.
    Create {
        /// The backup directory to create; it must not exist.
        out: PathBuf,
    },
    /// Check a backup: the manifest's signature under the trusted audit
    /// key, every file's digest, no file more or less, and the ledger's
    /// chain and checkpoints up to the manifest's head. Exit 1 names the
    /// file at fault.
    Verify {
        /// The backup directory.
        #[arg(value_name = "IN")]
        input: PathBuf,
        /// A file holding the audit verifier key to trust (default: the
        /// key pinned for the instance of --config); never the backup's own.
        #[arg(long, value_name = "FILE")]
        vkey: Option<PathBuf>,
    },
    /// Verify a backup, then build a fresh instance from it in DIR (new or
    /// empty). The PIN is not in the backup: give --pin-file.
    Restore {
        /// The backup directory.
        #[arg(value_name = "IN")]
        input: PathBuf,
        /// The new instance's directory.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// A file holding the audit verifier key to trust (default: the
        /// key pinned for the instance of --config); never the backup's own.
        #[arg(long, value_name = "FILE")]
        vkey: Option<PathBuf>,
        /// The file the restored keywardd reads the HSM PIN from (the
        /// restored config points at it). Default: the backed-up config's
        /// pin_file.
        #[arg(long, value_name = "PATH")]
        pin_file: Option<PathBuf>,
        /// Keep the [mirror] section (only when the restored instance
        /// replaces the one backed up; a drill must never ship to
        /// production's mirror).
        #[arg(long)]
        keep_mirror: bool,
    },
}

/// Runs one `keyward backup` command.
pub(crate) fn run(config: &Path, command: BackupCommand) -> Result<(), Failure> {
    match command {
        BackupCommand::Create { out } => create(config, out),
        BackupCommand::Verify { input, vkey } => verify(config, &input, vkey),
        BackupCommand::Restore {
            input,
            to,
            vkey,
            pin_file,
            keep_mirror,
        } => restore(config, &input, to, vkey, pin_file, keep_mirror),
    }
}

/// Exit 1 for a finding about the backup, 2 otherwise; the code in the message.
fn failure(e: BackupError) -> Failure {
    let code = if e.is_finding() { 1 } else { 2 };
    Failure(code, anyhow!("{e} ({})", e.code()))
}

fn absolute(p: PathBuf) -> Result<PathBuf, Failure> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// The audit key to trust: `--vkey FILE`, or the key pinned for the
/// instance of `--config`.
fn trusted_key(config: &Path, vkey: Option<PathBuf>) -> Result<TrustedKey, Failure> {
    let file = match vkey {
        Some(f) => f,
        None => Config::load(config)
            .map_err(|e| {
                Failure(
                    2,
                    anyhow!(
                        "no trusted audit key: {e}; give --vkey FILE with the audit key pinned at set-up (a key found in the backup proves nothing)"
                    ),
                )
            })?
            .audit_vkey_path(),
    };
    TrustedKey::from_file(&file).map_err(|e| Failure(2, anyhow!("no trusted audit key: {e}")))
}

/// `keyward backup create OUT`.
fn create(config: &Path, out: PathBuf) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let opts = backup::CreateOptions {
        out: absolute(out)?,
    };
    let created = backup::create(&cfg, &opts, |req| {
        crate::admin_call_with::<_, keyward_client::wire::BackupSigned>(
            &cfg,
            "POST",
            "/v1/admin/backups/sign",
            Some(req),
        )
        .map_err(|e| match e {
            crate::AdminError::NotRunning(why) => format!(
                "keywardd is not running ({why}): the running daemon signs and records every backup; start it"
            ),
            crate::AdminError::Failed(Failure(_, e)) => format!("{e:#}"),
        })
    })
    .map_err(failure)?;
    let m = &created.manifest;
    println!("backup written to {}", created.out.display());
    println!(
        "  ledger head: entry {} ({}); recorded as backup_created entry {}",
        m.ledger.seq, m.ledger.hash, created.backup_seq
    );
    println!("  files: {}", m.files.len());
    if let Some(note) = &m.instance.note {
        println!("  NOTE: {note}");
    }
    println!(
        "The PIN is not in the backup: store it separately from the backup (see README, Backup and restore)."
    );
    Ok(())
}

/// `keyward backup verify IN`.
fn verify(config: &Path, input: &Path, vkey: Option<PathBuf>) -> Result<(), Failure> {
    let trusted = trusted_key(config, vkey)?;
    let v = backup::verify(input, &trusted).map_err(|e| {
        let f = failure(e);
        Failure(
            f.0,
            anyhow!("backup {} is INVALID: {:#}", input.display(), f.1),
        )
    })?;
    let m = &v.manifest;
    println!(
        "ok: manifest signed by the trusted audit key {} (from {})",
        trusted.vkey(),
        trusted.source()
    );
    println!(
        "ok: {} files with their sizes and SHA-256 digests, nothing more",
        m.files.len()
    );
    println!(
        "ok: ledger verified: {} entries, head entry {} ({}) as the manifest says; {} checkpoints, the newest covers 1..{}",
        v.history.chain.entries,
        m.ledger.seq,
        m.ledger.hash,
        v.history.checkpoints,
        v.history.checkpointed
    );
    if v.vkey_matches {
        println!(
            "ok: the backup's own config/audit.vkey is the trusted key (it was not used to verify)"
        );
    } else {
        println!(
            "note: the backup's own config/audit.vkey is not the trusted key (it was not used to verify)"
        );
    }
    if let Some(note) = &m.instance.note {
        println!("NOTE: {note}");
    }
    Ok(())
}

/// `keyward backup restore IN --to DIR`.
fn restore(
    config: &Path,
    input: &Path,
    to: PathBuf,
    vkey: Option<PathBuf>,
    pin_file: Option<PathBuf>,
    keep_mirror: bool,
) -> Result<(), Failure> {
    let trusted = trusted_key(config, vkey)?;
    let opts = backup::RestoreOptions {
        to: absolute(to)?,
        pin_file: pin_file.map(absolute).transpose()?,
        keep_mirror,
    };
    let r = backup::restore(input, &trusted, &opts).map_err(|e| {
        let f = failure(e);
        Failure(
            f.0,
            anyhow!("nothing restored from {}: {:#}", input.display(), f.1),
        )
    })?;
    println!(
        "restored the backup of entry {} into {}",
        r.verified.manifest.ledger.seq,
        opts.to.display()
    );
    println!("Next:");
    for (i, step) in r.next_steps.iter().enumerate() {
        println!("  {}. {step}", i + 1);
    }
    Ok(())
}
