//! `keyward approver`: enroll, list and remove approvers (through the admin
//! socket).

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Subcommand;
use keyward::config::Config;

use crate::{Failure, admin_call, admin_get, admin_post, key_file};

#[derive(Subcommand)]
pub(crate) enum ApproverCommand {
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

/// Runs one `keyward approver` command.
pub(crate) fn run(config: &Path, command: ApproverCommand) -> Result<(), Failure> {
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
            let written = key_file::write_new(&out, &created.approver, &created.key);
            created.key.zeroize();
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
            let v: keyward_client::wire::ApproverRemoved =
                admin_call(&cfg, "DELETE", &format!("/v1/admin/approvers/{name}"))?;
            println!("approver {name} removed (ledger seq {})", v.ledger_seq);
            Ok(())
        }
    }
}
