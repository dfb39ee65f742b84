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
    if *to == programs::SYSTEM || (memo.is_some() && *to == programs::MEMO) {
        return Err(BuildError::RecipientIsProgram(*to));
    }
    // Keys: payer (signer, writable), recipient (writable), then the
    // read-only programs.
    let mut keys = vec![*from, *to, programs::SYSTEM];
    if memo.is_some() {
        keys.push(programs::MEMO);
    }
    let readonly_unsigned = (keys.len() - 2) as u8;
    let mut m = Vec::with_capacity(256);
    m.extend_from_slice(&[1, 0, readonly_unsigned]);
    push_compact_len(&mut m, keys.len());
    for k in &keys {
        m.extend_from_slice(&k.0);
    }
    m.extend_from_slice(&recent_blockhash);
    push_compact_len(&mut m, if memo.is_some() { 2 } else { 1 });
    // System Transfer: u32 tag 2, u64 lamports (bincode, little endian).
    m.extend_from_slice(&[2, 2, 0, 1]);
    push_compact_len(&mut m, 12);
    m.extend_from_slice(&2u32.to_le_bytes());
    m.extend_from_slice(&lamports.0.to_le_bytes());
    if let Some(text) = memo {
        m.push(3);
        push_compact_len(&mut m, 0);
        push_compact_len(&mut m, text.len());
        m.extend_from_slice(text.as_bytes());
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
