//! `keyward setup`: the HSM of a signer box made ready for keywardd (see
//! [`keyward::tools::setup`]).

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Args;
use keyward::config::Config;
use keyward::tools::setup::{Report, Target};
use secrecy::SecretString;

use crate::Failure;

/// `keyward setup`'s options.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("hsm").required(true).args(["softhsm", "module", "yubihsm"])))]
pub(crate) struct SetupArgs {
    /// Use Debian's SoftHSM2: write its configuration and initialise the
    /// token (or find them).
    #[arg(long)]
    softhsm: bool,
    /// A YubiHSM 2 that `keyward hsm setup yubihsm` provisioned: generate
    /// the audit key on it with the signer's credential and pin its
    /// verifier key.
    #[arg(long)]
    yubihsm: bool,
    /// A vendor's PKCS#11 module whose token the vendor's tools have
    /// initialised (with --token-label); the PIN is read from stdin.
    #[arg(long, value_name = "PATH", requires = "token_label")]
    module: Option<PathBuf>,
    /// The label of the vendor token.
    #[arg(long, value_name = "LABEL", requires = "module")]
    token_label: Option<String>,
    /// Read the vendor token's user PIN from FILE instead of stdin.
    #[arg(long, value_name = "FILE", requires = "module")]
    pin_file: Option<PathBuf>,
}

/// Runs set-up for the instance `config` describes.
pub(crate) fn run(config: &Path, args: SetupArgs) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    // The module reads its environment when loaded; nothing else runs yet.
    keyward::process::apply_module_env(&cfg);
    let target = match (args.softhsm, args.module, args.token_label) {
        _ if args.yubihsm => Target::YubiHsm,
        (true, _, _) => Target::SoftHsm,
        (false, Some(module), Some(token_label)) => Target::Vendor {
            module,
            token_label,
            pin: read_pin(args.pin_file.as_deref())?,
        },
        _ => {
            return Err(
                anyhow!("give --softhsm, --yubihsm, or --module PATH --token-label LABEL").into(),
            );
        }
    };
    let report = keyward::tools::setup::setup(&cfg, target)?;
    print_report(&report);
    println!();
    println!("Configuration check (as `keyward doctor`):");
    let check = keyward::tools::setup::run_config_check(&cfg);
    print!("{check}");
    println!();
    // Keys the policy names are made next (`keyward key create`); anything
    // else wrong stops here.
    let missing: Vec<&str> = check
        .findings
        .iter()
        .filter(|f| f.code == keyward::doctor::Code::KeyMissing)
        .map(|f| f.fix.as_str())
        .collect();
    let blocking = check.findings.iter().any(|f| {
        f.severity == keyward::doctor::Severity::Error
            && f.code != keyward::doctor::Code::KeyMissing
    });
    if blocking {
        return Err(Failure(
            1,
            anyhow!(
                "the HSM is set up, but keywardd would refuse to start with {}: fix what is listed above, then run `keyward doctor`",
                cfg.file.display()
            ),
        ));
    }
    println!("Next:");
    for fix in &missing {
        println!("  {fix}");
    }
    if missing.is_empty() {
        println!(
            "  keyward key create NAME       # a signing key; name it in {}",
            cfg.daemon.policy.display()
        );
    }
    println!("  systemctl restart keywardd    # then `keyward key list`");
    Ok(())
}

fn print_report(report: &Report) {
    for step in &report.steps {
        let mark = if step.changed { "done" } else { "ok  " };
        println!("  {mark} {}", step.what);
    }
    if !report.changed() {
        println!("Nothing to change: this box is set up.");
    }
    println!();
    println!(
        "Audit key {:?}: {}",
        report.audit_key.name.as_str(),
        report.audit_key.public_key
    );
    println!("  verifier key: {}", report.audit_vkey);
    println!("  (keywardd records it in the ledger at its first start)");
}

/// The vendor token's PIN: from `file`, or one line of stdin, not echoed
/// when stdin is a terminal.
fn read_pin(file: Option<&Path>) -> Result<SecretString, Failure> {
    if let Some(f) = file {
        return Ok(keyward::secret_file::read_secret_file(f, 4096)?);
    }
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let echo = if tty {
        eprint!("User PIN of the token: ");
        Some(EchoOff::new(&stdin)?)
    } else {
        None
    };
    let mut line = zeroize::Zeroizing::new(String::new());
    let read = stdin.lock().read_line(&mut line);
    drop(echo);
    if tty {
        eprintln!();
    }
    read.context("cannot read the PIN from stdin")?;
    let pin = line.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(anyhow!("no PIN given on stdin").into());
    }
    Ok(SecretString::from(pin.to_owned()))
}

/// Terminal echo off until dropped.
struct EchoOff {
    saved: nix::sys::termios::Termios,
    fd: std::os::fd::OwnedFd,
}

impl EchoOff {
    fn new(stdin: &std::io::Stdin) -> Result<EchoOff, Failure> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        use std::os::fd::AsFd;
        let fd = stdin.as_fd().try_clone_to_owned()?;
        let saved = tcgetattr(&fd).context("cannot read the terminal settings")?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&fd, SetArg::TCSANOW, &quiet).context("cannot turn off echo")?;
        Ok(EchoOff { saved, fd })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}
