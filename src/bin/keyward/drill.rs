//! `keyward drill dr | rotation`: drills on scratch instances, reported in
//! files and recorded in production's ledger through the admin socket.

use std::cell::RefCell;
use std::io::IsTerminal as _;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use keyward::config::Config;
use keyward::ledger::TrustedKey;
use keyward::ops::drill::{self, Progress, Report};
use keyward_client::wire::{AdminKeyInfo, DrillRecorded};

use crate::Failure;

/// Where reports go when `--report` is not given.
pub(crate) const DEFAULT_REPORT_DIR: &str = "/var/lib/keyward/drills";

#[derive(Subcommand)]
pub(crate) enum DrillCommand {
    /// Disaster recovery: verify the latest backup, restore it into a
    /// scratch directory, start keywardd on it, check its ledger (and the
    /// file mirror), its counters, sign with every key and compare each
    /// public key with production's; reports the recovery time. Never
    /// touches production but to record the drill.
    Dr(DrArgs),
    /// Key rotation on a scratch development instance: rotate a key, sign
    /// with the new one, show the old one refused, verify the transition
    /// statement with both keys, retire the old key and check the HSM no
    /// longer holds it. With --live KEY: rotate production's KEY instead
    /// (through the admin socket, with a grace period; no sweep, no
    /// retirement).
    Rotation(RotationArgs),
}

/// Options every drill takes.
#[derive(Args)]
pub(crate) struct CommonArgs {
    /// Directory for the report (JSON and text).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_REPORT_DIR)]
    report: PathBuf,
    /// Print the report as JSON on stdout (instead of text).
    #[arg(long)]
    json: bool,
    /// keywardd binary for the scratch instance (default: next to this
    /// keyward, else /usr/bin/keywardd).
    #[arg(long, value_name = "PATH")]
    keywardd: Option<PathBuf>,
    /// Keep the scratch directory (for a post-mortem).
    #[arg(long)]
    keep: bool,
    /// Where to create the scratch directory (default: the system's
    /// temporary directory).
    #[arg(long, value_name = "DIR")]
    scratch_in: Option<PathBuf>,
}

/// `keyward drill dr`'s options.
#[derive(Args)]
pub(crate) struct DrArgs {
    /// The backup to recover from.
    #[arg(long, value_name = "DIR", conflicts_with = "backup_dir")]
    backup: Option<PathBuf>,
    /// Recover from the newest backup in this directory. Without --backup
    /// or --backup-dir, a fresh backup is taken through the running
    /// keywardd (recorded as backup_created) into the scratch directory.
    #[arg(long, value_name = "DIR")]
    backup_dir: Option<PathBuf>,
    /// The PIN file the restored keywardd reads (default: the backed-up
    /// configuration's pin_file).
    #[arg(long, value_name = "PATH")]
    pin_file: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// `keyward drill rotation`'s options.
#[derive(Args)]
pub(crate) struct RotationArgs {
    /// Rotate this production key (recorded as key_rotated; agents keep
    /// its name) instead of a scratch one. The old key stays retiring for
    /// --grace-days: sweep and retire it with `keyward key`.
    #[arg(long, value_name = "KEY")]
    live: Option<String>,
    /// With --live: days the old key stays retiring.
    #[arg(long, default_value_t = 7, requires = "live")]
    grace_days: u64,
    #[command(flatten)]
    common: CommonArgs,
}

/// Runs one `keyward drill` command.
pub(crate) fn run(config: &Path, command: DrillCommand) -> Result<(), Failure> {
    match command {
        DrillCommand::Dr(args) => dr(config, args),
        DrillCommand::Rotation(args) => rotation(config, args),
    }
}

/// Progress: a spinner per step on a terminal, plain lines otherwise.
struct Bars {
    terminal: bool,
    current: RefCell<Option<indicatif::ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            terminal: std::io::stderr().is_terminal(),
            current: RefCell::new(None),
        }
    }
}

impl Progress for Bars {
    fn start(&self, step: &str) {
        if self.terminal {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message(format!("{step} ..."));
            bar.enable_steady_tick(Duration::from_millis(120));
            *self.current.borrow_mut() = Some(bar);
        } else {
            eprintln!("drill: {step} ...");
        }
    }

    fn finish(&self, step: &str, ok: bool, ms: u64, note: &str) {
        let line = format!(
            "{} {step} ({ms} ms){}{note}",
            if ok { "ok    " } else { "FAILED" },
            if note.is_empty() { "" } else { ": " }
        );
        match self.current.borrow_mut().take() {
            Some(bar) => bar.finish_with_message(line),
            None => eprintln!("drill: {line}"),
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf, Failure> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The keywardd binary: `--keywardd`, else next to this executable, else
/// /usr/bin/keywardd.
fn keywardd(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(p) = given {
        return absolute(&p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("keywardd")));
    match beside {
        Some(p) if p.is_file() => Ok(p),
        _ => Ok(PathBuf::from("/usr/bin/keywardd")),
    }
}

/// A new scratch directory (0700); removed on drop unless kept.
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(parent: Option<&Path>, kind: &str, keep: bool) -> Result<Scratch, Failure> {
        let parent = match parent {
            Some(p) => absolute(p)?,
            None => std::env::temp_dir(),
        };
        let dir = parent.join(format!(
            "keyward-drill-{kind}-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the scratch directory {}", dir.display()))?;
        Ok(Scratch { dir, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("drill: scratch directory kept: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Records the report in production's ledger, writes it, prints it, and
/// maps its outcome to the exit status.
fn conclude(cfg: &Config, mut report: Report, common: &CommonArgs) -> Result<(), Failure> {
    let recorded: Result<DrillRecorded, Failure> =
        crate::admin_call_json(cfg, "POST", "/v1/admin/drills", &report.record_request());
    let record_error = match recorded {
        Ok(r) => {
            report.ledger_seq = Some(r.ledger_seq);
            None
        }
        Err(Failure(_, e)) => Some(e),
    };
    let report_dir = absolute(&common.report)?;
    let written = report.write(&report_dir);
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    let (json, text) = written.map_err(|e| Failure(2, anyhow!("{e}")))?;
    if !common.json {
        println!("report: {} and {}", json.display(), text.display());
    }
    let unrecorded = record_error
        .as_ref()
        .map(|e| format!("; the drill was NOT recorded in the ledger: {e:#}"))
        .unwrap_or_default();
    match (&report.failed_step, record_error) {
        (Some(step), _) => Err(Failure(
            1,
            anyhow!(
                "drill {} FAILED at step {step}: {}{unrecorded}",
                report.drill,
                report.error.as_deref().unwrap_or("")
            ),
        )),
        (None, Some(e)) => Err(Failure(
            2,
            anyhow!("the drill passed but was NOT recorded in the ledger: {e:#}"),
        )),
        (None, None) => Ok(()),
    }
}

/// `keyward drill dr`.
fn dr(config: &Path, args: DrArgs) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    let trusted = TrustedKey::from_file(&cfg.audit_vkey_path())
        .map_err(|e| Failure(2, anyhow!("no trusted audit key: {e}")))?;
    let keys: Vec<AdminKeyInfo> = crate::admin_get(&cfg, "/v1/admin/keys")?;
    let originals: Vec<(String, String)> = keys
        .into_iter()
        .filter(|k| k.state != "audit")
        .map(|k| (k.name, k.public_key))
        .collect();
    let source = match (&args.backup, &args.backup_dir) {
        (Some(b), _) => drill::dr::BackupSource::Given(absolute(b)?),
        (None, Some(d)) => drill::dr::BackupSource::NewestIn(absolute(d)?),
        (None, None) => drill::dr::BackupSource::Fresh,
    };
    let pin_file = args.pin_file.as_deref().map(absolute).transpose()?;
    let keywardd = keywardd(args.common.keywardd.clone())?;
    let scratch = Scratch::new(args.common.scratch_in.as_deref(), "dr", args.common.keep)?;
    let opts = drill::dr::DrOptions {
        config: &cfg,
        backup: source,
        trusted: &trusted,
        keywardd: &keywardd,
        scratch: &scratch.dir,
        pin_file,
        originals,
        uid: nix::unistd::getuid().as_raw(),
    };
    let bars = Bars::new();
    let report = drill::dr::run(
        &opts,
        |req| {
            crate::admin_call_with::<_, keyward_client::wire::BackupSigned>(
                &cfg,
                "POST",
                "/v1/admin/backups/sign",
                Some(req),
            )
            .map_err(|e| match e {
                crate::AdminError::NotRunning(why) => format!("keywardd is not running ({why})"),
                crate::AdminError::Failed(Failure(_, e)) => format!("{e:#}"),
            })
        },
        &bars,
    );
    drop(scratch);
    conclude(&cfg, report, &args.common)
}

/// `keyward drill rotation --live KEY`.
fn rotation_live(cfg: &Config, key: &str, args: &RotationArgs) -> Result<(), Failure> {
    let ledger = cfg.ledger_path();
    let opts = drill::rotation::LiveOptions {
        key,
        grace_s: args.grace_days.saturating_mul(86_400),
        ledger: &ledger,
    };
    let call_error = |e: crate::AdminError| match e {
        crate::AdminError::NotRunning(why) => format!("keywardd is not running ({why})"),
        crate::AdminError::Failed(Failure(_, e)) => format!("{e:#}"),
    };
    let report = drill::rotation::run_live(
        &opts,
        |req| {
            crate::admin_call_with(
                cfg,
                "POST",
                &format!("/v1/admin/keys/{key}/rotate"),
                Some(req),
            )
            .map_err(call_error)
        },
        || crate::admin_call_with::<(), _>(cfg, "GET", "/v1/admin/keys", None).map_err(call_error),
        &Bars::new(),
    );
    conclude(cfg, report, &args.common)
}

/// `keyward drill rotation`.
fn rotation(config: &Path, args: RotationArgs) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    if let Some(key) = &args.live {
        return rotation_live(&cfg, key, &args);
    }
    let args = &args.common;
    let keywardd = keywardd(args.keywardd.clone())?;
    let keyward = std::env::current_exe().context("cannot find the keyward executable")?;
    let scratch = Scratch::new(args.scratch_in.as_deref(), "rotation", args.keep)?;
    let instance = scratch.dir.join("instance");
    // The drill's last step opens the scratch token through PKCS#11 in this
    // process; SoftHSM2 reads its configuration path when loaded.
    // SAFETY: no other thread exists yet (progress bars start later).
    #[allow(unsafe_code)]
    unsafe {
        keyward::process::set_env_single_threaded(
            "SOFTHSM2_CONF",
            &keyward::hsm::softhsm::conf_path(&instance),
        )
    };
    let opts = drill::rotation::RotationOptions {
        keyward: &keyward,
        keywardd: &keywardd,
        instance: &instance,
    };
    let report = drill::rotation::run(&opts, &Bars::new());
    drop(scratch);
    conclude(&cfg, report, args)
}
