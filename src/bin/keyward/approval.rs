//! `keyward approval`: intents waiting for approvals, and approvers' tokens
//! relayed by the operator (through the admin socket).

use std::path::Path;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use keyward::config::Config;

use crate::{Failure, admin_get, admin_runtime};

#[derive(Subcommand)]
pub(crate) enum ApprovalCommand {
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

/// Runs one `keyward approval` command.
pub(crate) fn run(config: &Path, command: ApprovalCommand) -> Result<(), Failure> {
    let cfg = Config::load(config)?;
    match command {
        ApprovalCommand::List => list(&cfg),
        ApprovalCommand::Submit { file } => submit(&cfg, &file),
    }
}

/// `keyward approval list`: the pending intents and their approvals.
fn list(cfg: &Config) -> Result<(), Failure> {
    let list: Vec<keyward_client::wire::PendingApprovalInfo> =
        admin_get(cfg, "/v1/admin/approvals")?;
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

/// `keyward approval submit FILE`: relays a token to the daemon.
fn submit(cfg: &Config, file: &str) -> Result<(), Failure> {
    // A token is about 400 bytes; read a little more than the
    // longest one accepted, never a whole large file.
    let limit = keyward::approval::MAX_TOKEN_LEN as u64 + 64;
    let mut text = String::new();
    let read = if file == "-" {
        std::io::Read::read_to_string(&mut std::io::Read::take(std::io::stdin(), limit), &mut text)
    } else {
        std::fs::File::open(file).and_then(|f| {
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
