//! Building the messages keyward signs for `transfer` intents, and the
//! signed transaction around a message.

use super::decode::{DecodedMessage, push_compact_len};
use super::{PACKET_DATA_SIZE, programs};
use crate::types::{Lamports, PublicKey};

/// Why a transfer could not be built. Codes are stable snake_case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The recipient is the signing key itself.
    #[error("the recipient is the signing key itself")]
    SelfTransfer,
    /// The recipient is a program keyward calls in the same message.
    #[error("the recipient {0} is a program id, not an account that can receive SOL")]
    RecipientIsProgram(PublicKey),
    /// The transaction would not fit in a network packet.
    #[error(
        "the transaction would be {size} bytes; the network accepts at most {max} (shorten the memo)"
    )]
    TooLarge {
        /// Size the signed transaction would have.
        size: usize,
        /// The maximum.
        max: usize,
    },
}

impl BuildError {
    /// Stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            BuildError::SelfTransfer => "self_transfer",
            BuildError::RecipientIsProgram(_) => "recipient_is_program",
            BuildError::TooLarge { .. } => "too_large",
        }
    }
}

/// One account of an instruction being built.
#[derive(Debug, Clone, Copy)]
struct Meta {
    key: PublicKey,
    writable: bool,
}

/// An instruction being built: program, accounts (none of which signs
/// except the fee payer), data.
struct Ix {
    program: PublicKey,
    accounts: Vec<Meta>,
    data: Vec<u8>,
}

fn w(key: PublicKey) -> Meta {
    Meta {
        key,
        writable: true,
    }
}

fn r(key: PublicKey) -> Meta {
    Meta {
        key,
        writable: false,
    }
}

/// Compiles a legacy message with `payer` as the only signer (and fee
/// payer): payer, writable accounts, then read-only accounts and programs,
/// each in order of first use. A program may not also be a writable
/// account.
fn compile(
    payer: &PublicKey,
    ixs: &[Ix],
    recent_blockhash: [u8; 32],
) -> Result<Vec<u8>, BuildError> {
    let mut writable: Vec<PublicKey> = Vec::new();
    let mut readonly: Vec<PublicKey> = Vec::new();
    let programs: Vec<PublicKey> = ixs.iter().map(|ix| ix.program).collect();
    for ix in ixs {
        for m in &ix.accounts {
            if m.key == *payer {
                continue;
            }
            if m.writable {
                if programs.contains(&m.key) {
                    return Err(BuildError::RecipientIsProgram(m.key));
                }
                readonly.retain(|k| *k != m.key);
                if !writable.contains(&m.key) {
                    writable.push(m.key);
                }
            } else if !writable.contains(&m.key) && !readonly.contains(&m.key) {
                readonly.push(m.key);
            }
        }
        if ix.program == *payer {
            return Err(BuildError::RecipientIsProgram(ix.program));
        }
        if !writable.contains(&ix.program) && !readonly.contains(&ix.program) {
            readonly.push(ix.program);
        }
    }
    let mut keys = vec![*payer];
    keys.extend(writable);
    let first_readonly = keys.len();
    keys.extend(readonly);
    let index = |k: &PublicKey| keys.iter().position(|x| x == k).map(|i| i as u8);
    let mut m = Vec::with_capacity(512);
    m.extend_from_slice(&[1, 0, (keys.len() - first_readonly) as u8]);
    push_compact_len(&mut m, keys.len());
    for k in &keys {
        m.extend_from_slice(&k.0);
    }
    m.extend_from_slice(&recent_blockhash);
    push_compact_len(&mut m, ixs.len());
    for ix in ixs {
        m.push(index(&ix.program).unwrap_or(0));
        push_compact_len(&mut m, ix.accounts.len());
        for a in &ix.accounts {
            m.push(index(&a.key).unwrap_or(0));
        }
        push_compact_len(&mut m, ix.data.len());
        m.extend_from_slice(&ix.data);
    }
    let size = 1 + 64 + m.len();
    if size > PACKET_DATA_SIZE {
        return Err(BuildError::TooLarge {
            size,
            max: PACKET_DATA_SIZE,
        });
    }
    Ok(m)
}

fn memo_ix(memo: Option<&str>) -> Option<Ix> {
    memo.map(|text| Ix {
        program: programs::MEMO,
        accounts: vec![],
        data: text.as_bytes().to_vec(),
    })
}

/// Builds the legacy message of a System transfer of `lamports` from `from`
/// (fee payer and only signer) to `to`, bound to `recent_blockhash`, with an
/// optional SPL Memo (no signer accounts) after the transfer.
pub fn build_sol_transfer(
    from: &PublicKey,
    to: &PublicKey,
    lamports: Lamports,
    recent_blockhash: [u8; 32],
    memo: Option<&str>,
) -> Result<Vec<u8>, BuildError> {
    if from == to {
        return Err(BuildError::SelfTransfer);
    }
    let mut data = Vec::with_capacity(12);
    // System Transfer: u32 tag 2, u64 lamports (bincode, little endian).
    data.extend_from_slice(&2u32.to_le_bytes());
    data.extend_from_slice(&lamports.0.to_le_bytes());
    let mut ixs = vec![Ix {
        program: programs::SYSTEM,
        accounts: vec![w(*from), w(*to)],
        data,
    }];
    ixs.extend(memo_ix(memo));
    compile(from, &ixs, recent_blockhash)
}

/// The associated token account of `wallet` for `mint` under
/// `token_program` (the address the Associated Token Account program
/// derives).
pub fn associated_token_address(
    wallet: &PublicKey,
    mint: &PublicKey,
    token_program: &PublicKey,
) -> PublicKey {
    let (address, _bump) = solana_pubkey::Pubkey::find_program_address(
        &[&wallet.0, &token_program.0, &mint.0],
        &solana_pubkey::Pubkey::new_from_array(programs::ASSOCIATED_TOKEN.0),
    );
    PublicKey(address.to_bytes())
}

/// What an SPL transfer moves.
#[derive(Debug, Clone, Copy)]
pub struct SplTransfer {
    /// The mint.
    pub mint: PublicKey,
    /// SPL Token or Token-2022.
    pub token_program: PublicKey,
    /// Amount in base units.
    pub amount: u64,
    /// The mint's decimals (checked on chain by TransferChecked).
    pub decimals: u8,
    /// Create the recipient's associated token account first
    /// (CreateIdempotent, funded by `from`).
    pub create_recipient_account: bool,
}

/// The instructions of an SPL transfer of `t` from `from`'s associated
/// token account to `to`'s, with the creation of `to`'s account first when
/// asked.
fn spl_transfer_ixs(
    from: &PublicKey,
    to: &PublicKey,
    t: &SplTransfer,
) -> Result<Vec<Ix>, BuildError> {
    if t.token_program != programs::TOKEN && t.token_program != programs::TOKEN_2022 {
        return Err(BuildError::RecipientIsProgram(t.token_program));
    }
    let source = associated_token_address(from, &t.mint, &t.token_program);
    let destination = associated_token_address(to, &t.mint, &t.token_program);
    let mut ixs = Vec::new();
    if t.create_recipient_account {
        ixs.push(Ix {
            program: programs::ASSOCIATED_TOKEN,
            accounts: vec![
                w(*from),
                w(destination),
                r(*to),
                r(t.mint),
                r(programs::SYSTEM),
                r(t.token_program),
            ],
            data: vec![1],
        });
    }
    let mut data = Vec::with_capacity(10);
    data.push(12);
    data.extend_from_slice(&t.amount.to_le_bytes());
    data.push(t.decimals);
    ixs.push(Ix {
        program: t.token_program,
        accounts: vec![w(source), r(t.mint), w(destination), r(*from)],
        data,
    });
    Ok(ixs)
}

/// Builds the sweep of a rotated-out key: every token transfer of `tokens`
/// (each creating `to`'s account first when asked), then a System
/// transfer of `sol` when given, all from `from` (fee payer and only
/// signer) to `to`, in one legacy message.
pub fn build_sweep(
    from: &PublicKey,
    to: &PublicKey,
    sol: Option<Lamports>,
    tokens: &[SplTransfer],
    recent_blockhash: [u8; 32],
) -> Result<Vec<u8>, BuildError> {
    if from == to {
        return Err(BuildError::SelfTransfer);
    }
    let mut ixs = Vec::new();
    for t in tokens {
        ixs.extend(spl_transfer_ixs(from, to, t)?);
    }
    if let Some(lamports) = sol {
        let mut data = Vec::with_capacity(12);
        data.extend_from_slice(&2u32.to_le_bytes());
        data.extend_from_slice(&lamports.0.to_le_bytes());
        ixs.push(Ix {
            program: programs::SYSTEM,
            accounts: vec![w(*from), w(*to)],
            data,
        });
    }
    compile(from, &ixs, recent_blockhash)
}

/// Builds a TransferChecked of `t` from `from`'s associated token account
/// to `to`'s (the recipient wallet), optionally creating the recipient's
/// account first, with an optional memo. `from` signs and pays the fees.
pub fn build_spl_transfer(
    from: &PublicKey,
    to: &PublicKey,
    t: &SplTransfer,
    recent_blockhash: [u8; 32],
    memo: Option<&str>,
) -> Result<Vec<u8>, BuildError> {
    if from == to {
        return Err(BuildError::SelfTransfer);
    }
    let mut ixs = spl_transfer_ixs(from, to, t)?;
    ixs.extend(memo_ix(memo));
    compile(from, &ixs, recent_blockhash)
}

/// The wire transaction: the signature count, one 64-byte slot per required
/// signer (ours at `signer_index`, zeros for the others, which their
/// holders fill in), then the message bytes.
pub fn assemble_transaction(
    message: &[u8],
    decoded: &DecodedMessage,
    signer_index: usize,
    signature: &[u8; 64],
) -> Vec<u8> {
    let n = usize::from(decoded.num_required_signatures);
    let mut tx = Vec::with_capacity(3 + 64 * n + message.len());
    push_compact_len(&mut tx, n);
    for i in 0..n {
        if i == signer_index {
            tx.extend_from_slice(signature);
        } else {
            tx.extend_from_slice(&[0u8; 64]);
        }
    }
    tx.extend_from_slice(message);
    tx
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::solana::{decode_message, extract_effects};

    #[test]
    fn a_built_transfer_decodes_to_exactly_one_outflow() {
        let from = PublicKey([1; 32]);
        let to = PublicKey([2; 32]);
        for memo in [None, Some("invoice 42")] {
            let m = build_sol_transfer(&from, &to, Lamports(123), [7; 32], memo).unwrap();
            let d = decode_message(&m).unwrap();
            let fx = extract_effects(&d, &from);
            assert!(fx.violations.is_empty(), "{:?}", fx.violations);
            assert!(fx.unknown_programs.is_empty());
            assert_eq!(fx.our_index, Some(0));
            assert_eq!(fx.fees, Lamports(5_000));
            assert_eq!(fx.sol_outflows.len(), 1);
            assert_eq!(fx.sol_outflows[0].to, to);
            assert_eq!(fx.sol_outflows[0].lamports, Lamports(123));
            assert_eq!(fx.total_sol_spend(), Some(Lamports(5_123)));
            assert_eq!(d.instructions.len(), 1 + usize::from(memo.is_some()));
        }
    }

    #[test]
    fn a_sweep_moves_every_token_then_the_sol_to_the_successor() {
        use crate::solana::{decode_message, extract_effects};
        let (from, to) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let t = |mint: u8, amount| SplTransfer {
            mint: PublicKey([mint; 32]),
            token_program: programs::TOKEN,
            amount,
            decimals: 6,
            create_recipient_account: true,
        };
        let m = build_sweep(
            &from,
            &to,
            Some(Lamports(7_000)),
            &[t(5, 10), t(6, 20)],
            [9; 32],
        )
        .unwrap();
        let fx = extract_effects(&decode_message(&m).unwrap(), &from);
        assert_eq!(fx.our_index, Some(0));
        let sol: Vec<_> = fx
            .sol_outflows
            .iter()
            .filter(|o| o.kind != "ata_rent")
            .collect();
        assert_eq!(sol.len(), 1);
        assert_eq!((sol[0].to, sol[0].lamports), (to, Lamports(7_000)));
        assert_eq!(fx.spl_outflows.len(), 2);
        for (out, (mint, amount)) in fx.spl_outflows.iter().zip([(5u8, 10u64), (6, 20)]) {
            assert_eq!(out.amount, amount);
            assert_eq!(
                out.destination,
                associated_token_address(&to, &PublicKey([mint; 32]), &programs::TOKEN)
            );
        }
        // Tokens only, and the refusals.
        assert!(build_sweep(&from, &to, None, &[t(5, 1)], [9; 32]).is_ok());
        assert_eq!(
            build_sweep(&from, &from, Some(Lamports(1)), &[], [9; 32]).unwrap_err(),
            BuildError::SelfTransfer
        );
        let many: Vec<_> = (10..30).map(|m| t(m, 1)).collect();
        assert_eq!(
            build_sweep(&from, &to, None, &many, [9; 32])
                .unwrap_err()
                .code(),
            "too_large"
        );
    }

    #[test]
    fn refuses_self_transfers_program_recipients_and_oversized_memos() {
        let from = PublicKey([1; 32]);
        let e = build_sol_transfer(&from, &from, Lamports(1), [7; 32], None).unwrap_err();
        assert_eq!(e.code(), "self_transfer");
        let e =
            build_sol_transfer(&from, &programs::SYSTEM, Lamports(1), [7; 32], None).unwrap_err();
        assert_eq!(e.code(), "recipient_is_program");
        let long = "x".repeat(1100);
        let e = build_sol_transfer(
            &from,
            &PublicKey([2; 32]),
            Lamports(1),
            [7; 32],
            Some(&long),
        )
        .unwrap_err();
        assert_eq!(e.code(), "too_large");
    }

    #[test]
    fn assembles_signature_slots_in_signer_order() {
        let m = build_sol_transfer(
            &PublicKey([1; 32]),
            &PublicKey([2; 32]),
            Lamports(1),
            [7; 32],
            None,
        )
        .unwrap();
        let d = decode_message(&m).unwrap();
        let tx = assemble_transaction(&m, &d, 0, &[9; 64]);
        assert_eq!(tx[0], 1);
        assert_eq!(&tx[1..65], &[9; 64]);
        assert_eq!(&tx[65..], &m[..]);
    }
}
