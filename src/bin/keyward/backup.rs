//! `keyward backup`: create (through the running daemon, which signs the
//! manifest), verify and restore (offline).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::{Args, Subcommand};
use keyward::config::Config;
use keyward::ledger::TrustedKey;
use keyward::ops::backup::{self, BackupError};

use crate::Failure;

#[derive(Subcommand)]
pub(crate) enum BackupCommand {
    /// Back up this instance while keywardd runs (run as root): the
    /// SoftHSM2 token (encrypted under its PINs) or a YubiHSM 2's objects
    /// exported under its wrap key, a consistent ledger
    /// snapshot, keyward.toml, the policy and the pinned audit key, with a
    /// manifest of SHA-256 digests signed by the audit key. Never the PIN.
    Create {
        /// The backup directory to create; it must not exist.
        out: PathBuf,
        #[command(flatten)]
        yubihsm: WrapArgs,
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
    /// empty). The PIN is not in the backup: give --pin-file (for a YubiHSM
    /// 2, the signer's credential file). A YubiHSM 2 backup is imported
    /// into the replacement device: --connector and --admin-credential.
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
        #[command(flatten)]
        replacement: ReplacementArgs,
    },
}

/// YubiHSM 2: how objects are exported or imported under wrap.
#[derive(Args)]
pub(crate) struct WrapArgs {
    /// YubiHSM 2: the credential file (`AUTH_KEY_ID:PASSWORD`, 0400) of the
    /// admin authentication key that exports or imports under wrap (default:
    /// `yubihsm-admin` beside keywardd's credential_file); never keywardd's
    /// own, never printed.
    #[arg(long, value_name = "FILE")]
    admin_credential: Option<PathBuf>,
    /// YubiHSM 2: the wrap key's object id (default 0x0010, or the backup's).
    #[arg(long, value_name = "ID", value_parser = parse_object_id)]
    wrap_key: Option<u16>,
}

/// YubiHSM 2: the replacement device a restore imports into.
#[derive(Args)]
pub(crate) struct ReplacementArgs {
    /// YubiHSM 2: the replacement device's connector (e.g.
    /// `http://127.0.0.1:12345`), provisioned with the backed-up device's
    /// wrap key; written into the restored configuration.
    #[arg(long, value_name = "URL")]
    connector: Option<String>,
    #[command(flatten)]
    wrap: WrapArgs,
}

/// An object id: `0x0010` or `16`.
fn parse_object_id(s: &str) -> Result<u16, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(id) if id != 0 && id != 0xffff => Ok(id),
        _ => Err(format!(
            "{s:?} is not an object id (1-65534, decimal or 0x hex)"
        )),
    }
}

/// The admin authentication key's credential file `keyward hsm setup
/// yubihsm` writes beside keywardd's.
const ADMIN_CREDENTIAL: &str = "yubihsm-admin";

/// Runs one `keyward backup` command.
pub(crate) fn run(config: &Path, command: BackupCommand) -> Result<(), Failure> {
    match command {
        BackupCommand::Create { out, yubihsm } => create(config, out, yubihsm),
        BackupCommand::Verify { input, vkey } => verify(config, &input, vkey),
        BackupCommand::Restore {
            input,
            to,
            vkey,
            pin_file,
            keep_mirror,
            replacement,
        } => restore(
            config,
            &input,
            to,
            vkey,
            (pin_file, keep_mirror),
            replacement,
        ),
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
fn create(config: &Path, out: PathBuf, wrap: WrapArgs) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let admin_credential = match (&cfg.hsm.backend, wrap.admin_credential) {
        (_, Some(f)) => Some(absolute(f)?),
        (keyward::config::HsmBackendConfig::YubiHsm(y), None) => {
            Some(y.credential_file.with_file_name(ADMIN_CREDENTIAL))
        }
        _ => None,
    };
    let opts = backup::CreateOptions {
        out: absolute(out)?,
        admin_credential,
        wrap_key: wrap.wrap_key.unwrap_or(backup::DEFAULT_WRAP_KEY),
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
    (pin_file, keep_mirror): (Option<PathBuf>, bool),
    replacement: ReplacementArgs,
) -> Result<(), Failure> {
    let trusted = trusted_key(config, vkey)?;
    let yubihsm = match replacement.wrap.admin_credential {
        Some(f) => Some(backup::YubiHsmTarget {
            connector: replacement.connector,
            admin_credential: absolute(f)?,
            wrap_key: replacement.wrap.wrap_key,
        }),
        None if replacement.connector.is_some() => {
            return Err(Failure(
                2,
                anyhow!(
                    "--connector needs --admin-credential FILE: the replacement device's admin authentication key imports the keys"
                ),
            ));
        }
        None => None,
    };
    let opts = backup::RestoreOptions {
        to: absolute(to)?,
        pin_file: pin_file.map(absolute).transpose()?,
        keep_mirror,
        yubihsm,
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
