//! `keyward approve`, on an approver's own machine: checks an approval
//! request against its bytes, shows what the transaction really does, and
//! prints a token.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;

use crate::Failure;

/// `keyward approve`'s options.
#[derive(Args)]
pub(crate) struct ApproveArgs {
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
}

/// Checks the request, shows what it does, asks, and prints the token.
pub(crate) fn run(args: ApproveArgs) -> Result<(), Failure> {
    use keyward::approval::{self, request as req};
    let ApproveArgs {
        request,
        approver,
        key_file,
        reject,
        yes,
        valid_for,
    } = args;
    let (request, approver) = (request.as_str(), approver.as_str());
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
    let request: keyward_client::wire::ApprovalRequest = serde_json::from_value(approval_obj)
        .map_err(|e| Failure(1, anyhow!("the approval request is not readable: {e}")))?;
    let checked = req::check(&request).map_err(|e| Failure(1, anyhow!(e)))?;
    if !(1..=approval::MAX_TOKEN_VALIDITY_S).contains(&valid_for) {
        return Err(Failure(
            2,
            anyhow!(
                "--valid-for must be between 1 and {} seconds",
                approval::MAX_TOKEN_VALIDITY_S
            ),
        ));
    }
    let key = crate::key_file::read(&key_file, approver)?;
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
