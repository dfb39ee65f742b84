//! A minimal keyward agent: asks the daemon to sign one transfer of SOL
//! (or of an SPL mint with `--asset`).
//!
//! ```text
//! agent --socket PATH --intent-id ID --to ADDRESS --amount AMOUNT --blockhash HASH
//!       [--asset SOL|MINT] [--create-account] [--key hot] [--memo TEXT] [--request-out PATH]
//! agent --socket PATH --intent-id ID --approval TOKEN
//! ```
//! A transfer above an approval threshold is answered 202: `--request-out`
//! writes the approval request for `keyward approve`; `--approval` hands an
//! approver's token in.
//! Exit status: 0 signed, 3 denied by policy, 1 any other error, 2 usage.

use std::process::ExitCode;

use keyward_client::blocking::Client;
use keyward_client::wire::{Action, IntentRequest};
use keyward_client::{ClientError, IntentOutcome};

struct Args {
    socket: String,
    intent_id: String,
    to: String,
    amount: String,
    blockhash: String,
    key: String,
    memo: Option<String>,
    asset: String,
    create_account: bool,
    request_out: Option<String>,
    approval: Option<String>,
}

const USAGE: &str = "usage: agent --socket PATH --intent-id ID (--to ADDRESS --amount AMOUNT --blockhash HASH [--asset SOL|MINT] [--create-account] [--key NAME] [--memo TEXT] [--request-out PATH] | --approval TOKEN)";

fn parse_args() -> Result<Args, String> {
    let mut socket = None;
    let mut intent_id = None;
    let mut to = None;
    let mut amount = None;
    let mut blockhash = None;
    let mut key = "hot".to_owned();
    let mut memo = None;
    let mut asset = "SOL".to_owned();
    let mut create_account = false;
    let mut request_out = None;
    let mut approval = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(value()?),
            "--intent-id" => intent_id = Some(value()?),
            "--to" => to = Some(value()?),
            "--amount" => amount = Some(value()?),
            "--blockhash" => blockhash = Some(value()?),
            "--key" => key = value()?,
            "--memo" => memo = Some(value()?),
            "--asset" => asset = value()?,
            "--create-account" => create_account = true,
            "--request-out" => request_out = Some(value()?),
            "--approval" => approval = Some(value()?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("missing {name}\n{USAGE}"));
    let transfer = approval.is_none();
    let need_if = |v: Option<String>, name: &str| {
        if transfer {
            need(v, name)
        } else {
            Ok(v.unwrap_or_default())
        }
    };
    Ok(Args {
        socket: need(socket, "--socket")?,
        intent_id: need(intent_id, "--intent-id")?,
        to: need_if(to, "--to")?,
        amount: need_if(amount, "--amount")?,
        blockhash: need_if(blockhash, "--blockhash")?,
        key,
        memo,
        asset,
        create_account,
        request_out,
        approval,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let client = match Client::new(&args.socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = match &args.approval {
        Some(token) => client.add_approval(&args.intent_id, token),
        None => submit(&client, &args),
    };
    report(outcome, args.request_out.as_deref())
}

fn submit(client: &Client, args: &Args) -> Result<IntentOutcome, ClientError> {
    let req = IntentRequest {
        intent_id: args.intent_id.clone(),
        key: args.key.clone(),
        action: Action::Transfer {
            asset: args.asset.clone(),
            to: args.to.clone(),
            amount: args.amount.clone(),
            recent_blockhash: args.blockhash.clone(),
            memo: args.memo.clone(),
            create_recipient_account: args.create_account,
        },
    };
    client.submit_intent(&req)
}

fn report(outcome: Result<IntentOutcome, ClientError>, request_out: Option<&str>) -> ExitCode {
    match outcome {
        Ok(IntentOutcome::Signed(s)) => {
            println!("signed: {}", s.signature);
            println!("ledger entry: seq {} hash {}", s.ledger_seq, s.entry_hash);
            ExitCode::SUCCESS
        }
        Ok(IntentOutcome::Pending(body)) => {
            let approval = &body.approval;
            println!(
                "waiting for approval: {} of {} ({})",
                approval.received, approval.required, approval.summary
            );
            let text = serde_json::to_string(&body).unwrap_or_default();
            if let Some(path) = request_out
                && let Err(e) = std::fs::write(path, text)
            {
                eprintln!("agent: cannot write {path}: {e}");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(ClientError::Api {
            status,
            code,
            message,
            reasons,
            ..
        }) => {
            eprintln!("refused ({status} {code}): {message}");
            for r in &reasons {
                eprintln!("  - {}: {}", r.rule, r.detail);
            }
            if code == "policy_denied" {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("agent: {e}");
            ExitCode::from(1)
        }
    }
}
