//! What a decoded message does to the signing key.
//!
//! Only the instructions of programs keyward understands produce effects;
//! every other program is reported in [`Effects::unknown_programs`] for the
//! policy to deny unless allowlisted. Anything keyward understands but will
//! not sign (authority changes, durable nonces, accounts it cannot see) is a
//! [`Violation`]. The rule of thumb: a program can only use our key's
//! authority if our key is among the instruction's accounts, so an
//! instruction of an understood program that does not name our key cannot
//! spend from it.

use spl_token_interface::instruction::TokenInstruction;

use super::decode::{CompiledInstruction, DecodedMessage};
use super::{LAMPORTS_PER_SIGNATURE, MAX_COMPUTE_UNIT_LIMIT, programs};
use crate::types::{Lamports, PublicKey};

/// Rule codes of [`Violation`]s; they appear as denial reasons.
pub mod violations {
    /// Our key is not a required signer of the message.
    pub const KEY_NOT_SIGNER: &str = "key_not_signer";
    /// The message advances a durable nonce (it would stay valid forever).
    pub const DURABLE_NONCE: &str = "durable_nonce";
    /// A token instruction uses our key's authority for something other
    /// than a transfer (approve, set authority, close, burn, mint, freeze…).
    pub const TOKEN_AUTHORITY_OPERATION: &str = "token_authority_operation";
    /// An instruction that involves our key uses accounts loaded from an
    /// address lookup table, which cannot be seen offline.
    pub const LOOKUP_TABLE_ACCOUNT: &str = "lookup_table_account";
    /// A System instruction other than a transfer or account creation
    /// involves our key (assign, allocate, nonce authority…).
    pub const SYSTEM_INSTRUCTION_NOT_ALLOWED: &str = "system_instruction_not_allowed";
    /// An instruction of an understood program that keyward does not
    /// support with our key.
    pub const UNSUPPORTED_INSTRUCTION: &str = "unsupported_instruction";
    /// Instruction data or accounts do not match the program's layout.
    pub const MALFORMED_INSTRUCTION: &str = "malformed_instruction";
}
use violations as v;

/// Lamports the Associated Token Account program takes from the funder for
/// a new SPL Token account (165 bytes, rent exempt).
pub const ATA_RENT_TOKEN: u64 = 2_039_280;
/// Upper bound counted for a new Token-2022 account, whose size depends on
/// the mint's extensions (rent for 1 KiB, well above any account the
/// program creates for a plain wallet).
pub const ATA_RENT_TOKEN_2022: u64 = 8_017_920;

/// SOL leaving our key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SolOutflow {
    /// Instruction position.
    pub instruction: usize,
    /// Account that receives the lamports.
    pub to: PublicKey,
    /// Amount.
    pub lamports: Lamports,
    /// `transfer`, `transfer_with_seed`, `create_account`,
    /// `create_account_with_seed` or `ata_rent`.
    pub kind: &'static str,
}

/// SPL tokens moved with our key's authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplOutflow {
    /// Instruction position.
    pub instruction: usize,
    /// SPL Token or Token-2022.
    pub token_program: PublicKey,
    /// The mint, when the instruction names it (transfer-checked).
    pub mint: Option<PublicKey>,
    /// Token account debited.
    pub source: PublicKey,
    /// Token account credited.
    pub destination: PublicKey,
    /// Amount in base units.
    pub amount: u64,
    /// Decimals asserted by transfer-checked.
    pub decimals: Option<u8>,
}

/// Something keyward will not sign, found while reading the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Rule code (see [`violations`]).
    pub rule: &'static str,
    /// Human-readable detail.
    pub detail: String,
    /// Instruction position, when the violation is about one.
    pub instruction: Option<usize>,
}

/// Everything a message does to the signing key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Position of our key among the signers, when it signs.
    pub our_index: Option<usize>,
    /// Whether our key pays the fees.
    pub fee_payer_is_us: bool,
    /// Fees our key pays: signatures plus priority fee (zero when another
    /// account pays).
    pub fees: Lamports,
    /// SOL leaving our key.
    pub sol_outflows: Vec<SolOutflow>,
    /// SPL tokens moved with our key's authority.
    pub spl_outflows: Vec<SplOutflow>,
    /// Distinct programs the message calls, in first-use order.
    pub programs: Vec<PublicKey>,
    /// Instructions calling programs keyward does not understand.
    pub unknown_programs: Vec<(usize, PublicKey)>,
    /// What keyward will not sign.
    pub violations: Vec<Violation>,
}

impl Effects {
    /// SOL this message costs our key: outflows plus fees, or `None` if the
    /// sum overflows 64 bits.
    pub fn total_sol_spend(&self) -> Option<Lamports> {
        self.sol_outflows
            .iter()
            .try_fold(self.fees, |acc, o| acc.checked_add(o.lamports))
    }

    fn violation(&mut self, rule: &'static str, instruction: usize, detail: impl Into<String>) {
        self.violations.push(Violation {
            rule,
            detail: detail.into(),
            instruction: Some(instruction),
        });
    }
}

/// One instruction with its accounts resolved: `None` for an account loaded
/// from a lookup table.
struct Ix<'a> {
    index: usize,
    accounts: Vec<Option<PublicKey>>,
    data: &'a [u8],
    involves_us: bool,
}

impl Ix<'_> {
    fn account(&self, i: usize) -> Option<Option<PublicKey>> {
        self.accounts.get(i).copied()
    }

    fn has_loaded(&self) -> bool {
        self.accounts.iter().any(Option::is_none)
    }
}

/// Derives the effects of `msg` on `ours`. Never fails: whatever cannot be
/// understood becomes a violation or an unknown program.
pub fn extract_effects(msg: &DecodedMessage, ours: &PublicKey) -> Effects {
    let mut fx = Effects::default();
    let our_static = msg.account_keys.iter().position(|k| k == ours);
    match our_static {
        Some(i) if msg.is_signer(i) => fx.our_index = Some(i),
        Some(i) => fx.violations.push(Violation {
            rule: v::KEY_NOT_SIGNER,
            detail: format!(
                "our key {ours} is account {i} of the message but not a required signer"
            ),
            instruction: None,
        }),
        None => fx.violations.push(Violation {
            rule: v::KEY_NOT_SIGNER,
            detail: format!("our key {ours} is not among the message's signers"),
            instruction: None,
        }),
    }
    fx.fee_payer_is_us = fx.our_index == Some(0);

    let mut budget = ComputeBudget::default();
    for (index, ci) in msg.instructions.iter().enumerate() {
        // decode_message guarantees the program index is a static key.
        let Some(program) = msg.static_key(ci.program_id_index) else {
            fx.violation(
                v::MALFORMED_INSTRUCTION,
                index,
                "program id is not a static account",
            );
            continue;
        };
        if !fx.programs.contains(&program) {
            fx.programs.push(program);
        }
        let ix = resolve(msg, ci, index, our_static);
        match program {
            p if p == programs::SYSTEM => system(&mut fx, &ix, ours),
            p if p == programs::TOKEN || p == programs::TOKEN_2022 => token(&mut fx, &ix, p),
            p if p == programs::ASSOCIATED_TOKEN => associated_token(&mut fx, &ix, ours),
            p if p == programs::COMPUTE_BUDGET => budget.read(&mut fx, &ix),
            p if p == programs::MEMO || p == programs::MEMO_V1 => {
                if std::str::from_utf8(ix.data).is_err() {
                    fx.violation(v::MALFORMED_INSTRUCTION, index, "memo is not valid UTF-8");
                }
            }
            p => fx.unknown_programs.push((index, p)),
        }
    }

    if fx.fee_payer_is_us {
        let signature_fee = u64::from(msg.num_required_signatures) * LAMPORTS_PER_SIGNATURE;
        fx.fees = Lamports(signature_fee.saturating_add(budget.priority_fee()));
    }
    fx
}

fn resolve<'a>(
    msg: &DecodedMessage,
    ci: &'a CompiledInstruction,
    index: usize,
    our_static: Option<usize>,
) -> Ix<'a> {
    let accounts: Vec<Option<PublicKey>> = ci.accounts.iter().map(|&a| msg.static_key(a)).collect();
    let involves_us = our_static.is_some_and(|o| ci.accounts.iter().any(|&a| usize::from(a) == o));
    Ix {
        index,
        accounts,
        data: &ci.data,
        involves_us,
    }
}

/// Records a [`violations::LOOKUP_TABLE_ACCOUNT`] and returns true when an
/// instruction involving our key takes accounts from a lookup table: where
/// the value goes cannot be known offline.
fn loaded_accounts(fx: &mut Effects, ix: &Ix<'_>, what: &str) -> bool {
    if !ix.has_loaded() {
        return false;
    }
    fx.violation(
        v::LOOKUP_TABLE_ACCOUNT,
        ix.index,
        format!("{what} involving our key uses accounts from an address lookup table"),
    );
    true
}

/// Reads fixed-size little-endian fields, requiring the data to end exactly.
struct Data<'a>(&'a [u8]);

impl Data<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    fn key(&mut self) -> Option<PublicKey> {
        let (head, rest) = self.0.split_first_chunk::<32>()?;
        self.0 = rest;
        Some(PublicKey(*head))
    }
    /// A bincode string: u64 length then UTF-8 bytes.
    fn string(&mut self) -> Option<()> {
        let n = usize::try_from(self.u64()?).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        std::str::from_utf8(s).ok()?;
        self.0 = rest;
        Some(())
    }
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// System instructions that move our lamports, decoded strictly from their
/// bincode layout: (kind, lamports, index of the funding account, index of
/// the receiving account, index of the account being created if any).
struct SystemMove {
    kind: &'static str,
    lamports: u64,
    from: usize,
    to: usize,
    created: Option<usize>,
}

fn decode_system(data: &[u8]) -> Result<Option<SystemMove>, u32> {
    let mut d = Data(data);
    let Some(tag) = d.u32() else {
        return Err(u32::MAX);
    };
    let bad = || tag;
    let mv = match tag {
        // CreateAccount { lamports, space, owner }: [funder, new]
        0 => {
            let lamports = d.u64().ok_or_else(bad)?;
            d.u64().ok_or_else(bad)?;
            d.key().ok_or_else(bad)?;
            SystemMove {
                kind: "create_account",
                lamports,
                from: 0,
                to: 1,
                created: Some(1),
            }
        }
        // Transfer { lamports }: [from, to]
        2 => {
            let lamports = d.u64().ok_or_else(bad)?;
            SystemMove {
                kind: "transfer",
                lamports,
                from: 0,
                to: 1,
                created: None,
            }
        }
        // CreateAccountWithSeed { base, seed, lamports, space, owner }: [funder, new, base?]
        3 => {
            d.key().ok_or_else(bad)?;
            d.string().ok_or_else(bad)?;
            let lamports = d.u64().ok_or_else(bad)?;
            d.u64().ok_or_else(bad)?;
            d.key().ok_or_else(bad)?;
            SystemMove {
                kind: "create_account_with_seed",
                lamports,
                from: 0,
                to: 1,
                created: Some(1),
            }
        }
        // TransferWithSeed { lamports, from_seed, from_owner }: [from, base, to]
        11 => {
            let lamports = d.u64().ok_or_else(bad)?;
            d.string().ok_or_else(bad)?;
            d.key().ok_or_else(bad)?;
            SystemMove {
                kind: "transfer_with_seed",
                lamports,
                from: 0,
                to: 2,
                created: None,
            }
        }
        // CreateAccountAllowPrefund { lamports, space, owner }: [new, funder?]
        13 => {
            let lamports = d.u64().ok_or_else(bad)?;
            d.u64().ok_or_else(bad)?;
            d.key().ok_or_else(bad)?;
            SystemMove {
                kind: "create_account",
                lamports,
                from: 1,
                to: 0,
                created: Some(0),
            }
        }
        _ => return Ok(None),
    };
    d.end().ok_or_else(bad)?;
    Ok(Some(mv))
}

fn system_name(tag: u32) -> &'static str {
    match tag {
        1 => "Assign",
        4 => "AdvanceNonceAccount",
        5 => "WithdrawNonceAccount",
        6 => "InitializeNonceAccount",
        7 => "AuthorizeNonceAccount",
        8 => "Allocate",
        9 => "AllocateWithSeed",
        10 => "AssignWithSeed",
        12 => "UpgradeNonceAccount",
        _ => "an unknown System instruction",
    }
}

fn system(fx: &mut Effects, ix: &Ix<'_>, ours: &PublicKey) {
    let tag = ix
        .data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if tag == Some(4) {
        fx.violation(
            v::DURABLE_NONCE,
            ix.index,
            "advances a durable nonce, so the transaction would never expire",
        );
        return;
    }
    let mv = match decode_system(ix.data) {
        Ok(mv) => mv,
        Err(_) => {
            fx.violation(
                v::MALFORMED_INSTRUCTION,
                ix.index,
                "System instruction data does not match its layout",
            );
            return;
        }
    };
    let Some(mv) = mv else {
        if ix.involves_us {
            let name = tag.map_or("an unknown System instruction", system_name);
            fx.violation(
                v::SYSTEM_INSTRUCTION_NOT_ALLOWED,
                ix.index,
                format!("System {name} involving our key is not allowed"),
            );
        }
        return;
    };
    if !ix.involves_us {
        return;
    }
    if loaded_accounts(fx, ix, &format!("{} of {} lamports", mv.kind, mv.lamports)) {
        return;
    }
    if let Some(c) = mv.created
        && ix.account(c) == Some(Some(*ours))
    {
        fx.violation(
            v::SYSTEM_INSTRUCTION_NOT_ALLOWED,
            ix.index,
            "creating an account at our key's address would hand it to another program",
        );
        return;
    }
    // TransferWithSeed debits an account derived from the base (signer);
    // it is ours when we are the base or the source.
    let from_is_us = ix.account(mv.from) == Some(Some(*ours))
        || (mv.kind == "transfer_with_seed" && ix.account(1) == Some(Some(*ours)));
    if !from_is_us {
        return;
    }
    match ix.account(mv.to) {
        Some(Some(to)) => fx.sol_outflows.push(SolOutflow {
            instruction: ix.index,
            to,
            lamports: Lamports(mv.lamports),
            kind: mv.kind,
        }),
        _ => fx.violation(
            v::MALFORMED_INSTRUCTION,
            ix.index,
            format!("{} lacks the receiving account", mv.kind),
        ),
    }
}

fn token(fx: &mut Effects, ix: &Ix<'_>, program: PublicKey) {
    let name = if program == programs::TOKEN {
        "SPL Token"
    } else {
        "Token-2022"
    };
    // Token-2022 shares SPL Token's instruction layout up to tag 24; its
    // extension instructions are not understood.
    let shared = ix.data.first().is_some_and(|&t| t <= 24);
    let parsed = if program == programs::TOKEN || shared {
        TokenInstruction::unpack(ix.data).ok()
    } else {
        None
    };
    let Some(parsed) = parsed else {
        if ix.involves_us {
            fx.violation(
                v::UNSUPPORTED_INSTRUCTION,
                ix.index,
                format!(
                    "{name} instruction {:?} involving our key is not supported",
                    ix.data.first()
                ),
            );
        } else if program == programs::TOKEN {
            fx.violation(
                v::MALFORMED_INSTRUCTION,
                ix.index,
                format!("{name} instruction data is not valid"),
            );
        }
        return;
    };
    if !ix.involves_us {
        return;
    }
    if loaded_accounts(fx, ix, &format!("{name} instruction")) {
        return;
    }
    let acct = |i: usize| ix.account(i).flatten();
    let outflow = match parsed {
        TokenInstruction::Transfer { amount } => (acct(0), None, acct(1), amount, None),
        TokenInstruction::TransferChecked { amount, decimals } => {
            (acct(0), acct(1), acct(2), amount, Some(decimals))
        }
        TokenInstruction::Approve { .. }
        | TokenInstruction::ApproveChecked { .. }
        | TokenInstruction::SetAuthority { .. }
        | TokenInstruction::CloseAccount
        | TokenInstruction::Burn { .. }
        | TokenInstruction::BurnChecked { .. }
        | TokenInstruction::MintTo { .. }
        | TokenInstruction::MintToChecked { .. }
        | TokenInstruction::FreezeAccount
        | TokenInstruction::ThawAccount
        | TokenInstruction::WithdrawExcessLamports
        | TokenInstruction::UnwrapLamports { .. } => {
            fx.violation(
                v::TOKEN_AUTHORITY_OPERATION,
                ix.index,
                format!(
                    "{name} {} with our key as authority is not allowed",
                    token_name(&parsed)
                ),
            );
            return;
        }
        // Instructions that cannot use our authority to move value.
        TokenInstruction::Revoke
        | TokenInstruction::SyncNative
        | TokenInstruction::InitializeAccount
        | TokenInstruction::InitializeAccount2 { .. }
        | TokenInstruction::InitializeAccount3 { .. }
        | TokenInstruction::InitializeMint { .. }
        | TokenInstruction::InitializeMint2 { .. }
        | TokenInstruction::InitializeMultisig { .. }
        | TokenInstruction::InitializeMultisig2 { .. }
        | TokenInstruction::InitializeImmutableOwner
        | TokenInstruction::GetAccountDataSize
        | TokenInstruction::AmountToUiAmount { .. }
        | TokenInstruction::UiAmountToAmount { .. } => return,
        _ => {
            fx.violation(
                v::UNSUPPORTED_INSTRUCTION,
                ix.index,
                format!(
                    "{name} {} involving our key is not supported",
                    token_name(&parsed)
                ),
            );
            return;
        }
    };
    match outflow {
        (Some(source), mint, Some(destination), amount, decimals)
            if ix.accounts.len() >= 3 + usize::from(mint.is_some()) =>
        {
            fx.spl_outflows.push(SplOutflow {
                instruction: ix.index,
                token_program: program,
                mint,
                source,
                destination,
                amount,
                decimals,
            });
        }
        _ => fx.violation(
            v::MALFORMED_INSTRUCTION,
            ix.index,
            format!("{name} transfer lacks accounts"),
        ),
    }
}

fn token_name(t: &TokenInstruction<'_>) -> &'static str {
    match t {
        TokenInstruction::Approve { .. } => "Approve",
        TokenInstruction::ApproveChecked { .. } => "ApproveChecked",
        TokenInstruction::SetAuthority { .. } => "SetAuthority",
        TokenInstruction::CloseAccount => "CloseAccount",
        TokenInstruction::Burn { .. } => "Burn",
        TokenInstruction::BurnChecked { .. } => "BurnChecked",
        TokenInstruction::MintTo { .. } => "MintTo",
        TokenInstruction::MintToChecked { .. } => "MintToChecked",
        TokenInstruction::FreezeAccount => "FreezeAccount",
        TokenInstruction::ThawAccount => "ThawAccount",
        TokenInstruction::WithdrawExcessLamports => "WithdrawExcessLamports",
        TokenInstruction::UnwrapLamports { .. } => "UnwrapLamports",
        TokenInstruction::Batch => "Batch",
        _ => "instruction",
    }
}

fn associated_token(fx: &mut Effects, ix: &Ix<'_>, ours: &PublicKey) {
    // Create (empty data or 0), CreateIdempotent (1), RecoverNested (2).
    let create = matches!(ix.data, [] | [0] | [1]);
    if !create {
        if ix.involves_us {
            fx.violation(
                v::UNSUPPORTED_INSTRUCTION,
                ix.index,
                "Associated Token Account instruction other than create involving our key is not supported",
            );
        }
        return;
    }
    // [funder, associated account, wallet, mint, system program, token program]
    if ix.account(0) != Some(Some(*ours)) {
        if ix.involves_us {
            loaded_accounts(fx, ix, "Associated Token Account create");
        }
        return;
    }
    if loaded_accounts(fx, ix, "Associated Token Account create") {
        return;
    }
    let rent = match ix.account(5).flatten() {
        Some(p) if p == programs::TOKEN => ATA_RENT_TOKEN,
        Some(p) if p == programs::TOKEN_2022 => ATA_RENT_TOKEN_2022,
        _ => {
            fx.violation(
                v::UNSUPPORTED_INSTRUCTION,
                ix.index,
                "Associated Token Account create for a token program other than SPL Token or Token-2022",
            );
            return;
        }
    };
    match ix.account(1).flatten() {
        Some(ata) => fx.sol_outflows.push(SolOutflow {
            instruction: ix.index,
            to: ata,
            lamports: Lamports(rent),
            kind: "ata_rent",
        }),
        None => fx.violation(
            v::MALFORMED_INSTRUCTION,
            ix.index,
            "Associated Token Account create lacks accounts",
        ),
    }
}

/// Compute Budget instructions seen so far; each kind may appear once.
#[derive(Default)]
struct ComputeBudget {
    unit_limit: Option<u32>,
    unit_price: Option<u64>,
    heap: Option<u32>,
    data_size: Option<u32>,
}

impl ComputeBudget {
    fn read(&mut self, fx: &mut Effects, ix: &Ix<'_>) {
        let (tag, rest) = match ix.data.split_first() {
            Some((&t, rest)) => (t, rest),
            None => {
                fx.violation(
                    v::MALFORMED_INSTRUCTION,
                    ix.index,
                    "empty Compute Budget instruction",
                );
                return;
            }
        };
        let u32_arg = <[u8; 4]>::try_from(rest).ok().map(u32::from_le_bytes);
        let u64_arg = <[u8; 8]>::try_from(rest).ok().map(u64::from_le_bytes);
        let duplicate = match (tag, u32_arg, u64_arg) {
            (1, Some(x), _) => self.heap.replace(x).is_some(),
            (2, Some(x), _) => self.unit_limit.replace(x).is_some(),
            (4, Some(x), _) => self.data_size.replace(x).is_some(),
            (3, _, Some(x)) => self.unit_price.replace(x).is_some(),
            _ => {
                fx.violation(
                    v::MALFORMED_INSTRUCTION,
                    ix.index,
                    format!("Compute Budget instruction {tag} is not valid"),
                );
                return;
            }
        };
        if duplicate {
            fx.violation(
                v::MALFORMED_INSTRUCTION,
                ix.index,
                "duplicate Compute Budget instruction (the runtime rejects the transaction)",
            );
        }
    }

    /// Priority fee in lamports: price (micro-lamports per unit) times the
    /// unit limit, rounded up. Without an explicit limit the runtime's
    /// maximum is used, an upper bound.
    fn priority_fee(&self) -> u64 {
        let price = u128::from(self.unit_price.unwrap_or(0));
        let limit = u128::from(
            self.unit_limit
                .unwrap_or(MAX_COMPUTE_UNIT_LIMIT)
                .min(MAX_COMPUTE_UNIT_LIMIT),
        );
        let fee = (price * limit).div_ceil(1_000_000);
        u64::try_from(fee).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::solana::decode::MessageVersion;

    const US: PublicKey = PublicKey([1; 32]);
    const OTHER: PublicKey = PublicKey([2; 32]);
    const A: PublicKey = PublicKey([3; 32]);
    const B: PublicKey = PublicKey([4; 32]);
    const MINT: PublicKey = PublicKey([5; 32]);

    /// Keys: US (payer), OTHER (second signer), A, B, MINT, then the
    /// programs; `ixs` name programs and accounts by key.
    fn msg(ixs: &[(PublicKey, &[PublicKey], Vec<u8>)]) -> DecodedMessage {
        let mut keys = vec![US, OTHER, A, B, MINT];
        for (p, accts, _) in ixs {
            for k in std::iter::once(p).chain(accts.iter()) {
                if !keys.contains(k) {
                    keys.push(*k);
                }
            }
        }
        let idx = |k: &PublicKey| keys.iter().position(|x| x == k).unwrap() as u8;
        let instructions = ixs
            .iter()
            .map(|(p, accts, data)| CompiledInstruction {
                program_id_index: idx(p),
                accounts: accts.iter().map(idx).collect(),
                data: data.clone(),
            })
            .collect();
        DecodedMessage {
            version: MessageVersion::Legacy,
            num_required_signatures: 2,
            num_readonly_signed: 0,
            num_readonly_unsigned: 0,
            account_keys: keys.clone(),
            recent_blockhash: [0; 32],
            instructions,
            lookups: vec![],
        }
    }

    fn rules(fx: &Effects) -> Vec<&'static str> {
        fx.violations.iter().map(|v| v.rule).collect()
    }

    fn sys(tag: u32, rest: &[u8]) -> Vec<u8> {
        [&tag.to_le_bytes()[..], rest].concat()
    }

    fn token(tag: u8, rest: &[u8]) -> Vec<u8> {
        [&[tag][..], rest].concat()
    }

    #[test]
    fn system_outflows_and_refusals() {
        let lamports = 7u64.to_le_bytes();
        let create = [&lamports[..], &0u64.to_le_bytes(), &[9; 32]].concat();
        let fx = extract_effects(
            &msg(&[
                (programs::SYSTEM, &[US, A], sys(2, &lamports)),
                (programs::SYSTEM, &[US, B], sys(0, &create)),
                // Someone else's transfer is not ours.
                (programs::SYSTEM, &[OTHER, A], sys(2, &lamports)),
            ]),
            &US,
        );
        assert!(fx.violations.is_empty(), "{:?}", fx.violations);
        let kinds: Vec<_> = fx
            .sol_outflows
            .iter()
            .map(|o| (o.kind, o.to, o.lamports.0))
            .collect();
        assert_eq!(kinds, vec![("transfer", A, 7), ("create_account", B, 7)]);
        assert_eq!(fx.fees, Lamports(10_000), "two signatures, we pay");

        let seed = [
            &5u64.to_le_bytes()[..],
            &3u64.to_le_bytes(),
            b"abc",
            &[9; 32],
        ]
        .concat();
        let fx = extract_effects(
            &msg(&[(programs::SYSTEM, &[A, US, B], sys(11, &seed))]),
            &US,
        );
        assert_eq!(fx.sol_outflows[0].kind, "transfer_with_seed");
        assert_eq!(fx.sol_outflows[0].to, B);

        let cases: [(Vec<u8>, &[PublicKey], &str); 5] = [
            (
                sys(1, &[9; 32]),
                &[US],
                violations::SYSTEM_INSTRUCTION_NOT_ALLOWED,
            ),
            (
                sys(8, &0u64.to_le_bytes()),
                &[US],
                violations::SYSTEM_INSTRUCTION_NOT_ALLOWED,
            ),
            (
                sys(0, &create),
                &[OTHER, US],
                violations::SYSTEM_INSTRUCTION_NOT_ALLOWED,
            ),
            (sys(4, &[]), &[A, B, OTHER], violations::DURABLE_NONCE),
            (
                sys(2, &lamports[..7]),
                &[US, A],
                violations::MALFORMED_INSTRUCTION,
            ),
        ];
        for (data, accts, rule) in cases {
            let fx = extract_effects(&msg(&[(programs::SYSTEM, accts, data.clone())]), &US);
            assert_eq!(rules(&fx), vec![rule], "{data:?}");
            assert!(fx.sol_outflows.is_empty());
        }
        // Trailing bytes after a transfer's fields are refused, not ignored.
        let fx = extract_effects(
            &msg(&[(
                programs::SYSTEM,
                &[US, A],
                sys(2, &[&lamports[..], &[0]].concat()),
            )]),
            &US,
        );
        assert_eq!(rules(&fx), vec![violations::MALFORMED_INSTRUCTION]);
    }

    #[test]
    fn token_transfers_are_outflows_and_authority_operations_are_refused() {
        let amount = 1_000u64.to_le_bytes();
        for program in [programs::TOKEN, programs::TOKEN_2022] {
            let fx = extract_effects(
                &msg(&[
                    (
                        program,
                        &[A, MINT, B, US],
                        token(12, &[&amount[..], &[6]].concat()),
                    ),
                    (program, &[A, B, US], token(3, &amount)),
                    (program, &[A, B, OTHER], token(3, &amount)),
                ]),
                &US,
            );
            assert!(fx.violations.is_empty(), "{:?}", fx.violations);
            assert_eq!(
                fx.spl_outflows.len(),
                2,
                "the transfer by OTHER is not ours"
            );
            assert_eq!(fx.spl_outflows[0].mint, Some(MINT));
            assert_eq!(fx.spl_outflows[0].decimals, Some(6));
            assert_eq!(fx.spl_outflows[0].destination, B);
            assert_eq!(fx.spl_outflows[1].mint, None);
            assert_eq!(fx.spl_outflows[1].amount, 1_000);
            for data in [
                token(4, &amount),
                token(6, &[2, 0]),
                token(9, &[]),
                token(8, &amount),
                token(15, &[&amount[..], &[6]].concat()),
                token(7, &amount),
            ] {
                let fx = extract_effects(&msg(&[(program, &[A, B, US], data.clone())]), &US);
                assert_eq!(
                    rules(&fx),
                    vec![violations::TOKEN_AUTHORITY_OPERATION],
                    "{data:?}"
                );
            }
            let fx = extract_effects(&msg(&[(program, &[A, US], token(5, &[]))]), &US);
            assert!(fx.violations.is_empty(), "revoke only lowers risk");
        }
        // Token-2022 extensions and SPL Token batches with our key are not understood.
        let fx = extract_effects(
            &msg(&[(programs::TOKEN_2022, &[A, US], token(26, &[1]))]),
            &US,
        );
        assert_eq!(rules(&fx), vec![violations::UNSUPPORTED_INSTRUCTION]);
        let fx = extract_effects(&msg(&[(programs::TOKEN, &[A, US], token(255, &[]))]), &US);
        assert_eq!(rules(&fx), vec![violations::UNSUPPORTED_INSTRUCTION]);
        let fx = extract_effects(&msg(&[(programs::TOKEN, &[A, US], token(3, &[1]))]), &US);
        assert_eq!(rules(&fx), vec![violations::UNSUPPORTED_INSTRUCTION]);
    }

    #[test]
    fn associated_token_account_rent_is_counted() {
        let accts = [US, A, B, MINT, programs::SYSTEM, programs::TOKEN];
        let fx = extract_effects(&msg(&[(programs::ASSOCIATED_TOKEN, &accts, vec![1])]), &US);
        assert!(fx.violations.is_empty(), "{:?}", fx.violations);
        assert_eq!(fx.sol_outflows[0].kind, "ata_rent");
        assert_eq!(fx.sol_outflows[0].lamports, Lamports(ATA_RENT_TOKEN));
        assert_eq!(fx.sol_outflows[0].to, A);
        let odd = [US, A, B, MINT, programs::SYSTEM, OTHER];
        let fx = extract_effects(&msg(&[(programs::ASSOCIATED_TOKEN, &odd, vec![])]), &US);
        assert_eq!(rules(&fx), vec![violations::UNSUPPORTED_INSTRUCTION]);
        let fx = extract_effects(
            &msg(&[(programs::ASSOCIATED_TOKEN, &[A, US], vec![2])]),
            &US,
        );
        assert_eq!(rules(&fx), vec![violations::UNSUPPORTED_INSTRUCTION]);
    }

    #[test]
    fn compute_budget_fees_and_duplicates() {
        let price = |p: u64| {
            (
                programs::COMPUTE_BUDGET,
                &[][..],
                token(3, &p.to_le_bytes()),
            )
        };
        let limit = |l: u32| {
            (
                programs::COMPUTE_BUDGET,
                &[][..],
                token(2, &l.to_le_bytes()),
            )
        };
        let fx = extract_effects(&msg(&[price(1_000_000), limit(200_000)]), &US);
        assert!(fx.violations.is_empty());
        assert_eq!(fx.fees, Lamports(10_000 + 200_000));
        // Without a limit the runtime maximum is assumed.
        let fx = extract_effects(&msg(&[price(1)]), &US);
        assert_eq!(fx.fees, Lamports(10_000 + 2));
        let fx = extract_effects(&msg(&[price(1), price(2)]), &US);
        assert_eq!(rules(&fx), vec![violations::MALFORMED_INSTRUCTION]);
        let fx = extract_effects(&msg(&[(programs::COMPUTE_BUDGET, &[], vec![0])]), &US);
        assert_eq!(rules(&fx), vec![violations::MALFORMED_INSTRUCTION]);
        // Another payer: no fees for us.
        let mut m = msg(&[price(1_000_000)]);
        m.account_keys.swap(0, 1);
        let fx = extract_effects(&m, &US);
        assert_eq!(fx.our_index, Some(1));
        assert_eq!(fx.fees, Lamports(0));
    }

    #[test]
    fn memos_signers_and_unknown_programs() {
        let fx = extract_effects(&msg(&[(programs::MEMO, &[], vec![0xff, 0xfe])]), &US);
        assert_eq!(rules(&fx), vec![violations::MALFORMED_INSTRUCTION]);
        let fx = extract_effects(&msg(&[(programs::MEMO_V1, &[US], b"hi".to_vec())]), &US);
        assert!(fx.violations.is_empty());
        let unknown = PublicKey([42; 32]);
        let fx = extract_effects(&msg(&[(unknown, &[US], vec![])]), &US);
        assert_eq!(fx.unknown_programs, vec![(0, unknown)]);
        // A key that is present but not a signer, or absent.
        let fx = extract_effects(&msg(&[]), &A);
        assert_eq!(rules(&fx), vec![violations::KEY_NOT_SIGNER]);
        assert_eq!(fx.our_index, None);
        let fx = extract_effects(&msg(&[]), &PublicKey([77; 32]));
        assert_eq!(rules(&fx), vec![violations::KEY_NOT_SIGNER]);
    }

    #[test]
    fn lookup_accounts_in_our_instructions_are_refused() {
        let mut m = msg(&[(programs::SYSTEM, &[US, A], sys(2, &1u64.to_le_bytes()))]);
        m.version = MessageVersion::V0;
        m.lookups.push(crate::solana::AddressTableLookup {
            account_key: PublicKey([50; 32]),
            writable_indexes: vec![0],
            readonly_indexes: vec![],
        });
        let loaded = m.account_keys.len() as u8;
        m.instructions[0].accounts[1] = loaded;
        let fx = extract_effects(&m, &US);
        assert_eq!(rules(&fx), vec![violations::LOOKUP_TABLE_ACCOUNT]);
        assert!(fx.sol_outflows.is_empty());
    }
}
