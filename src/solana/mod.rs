//! Solana message decoding, effect extraction and transfer building.
//!
//! keyward never trusts what an agent says a transaction does: it decodes
//! the exact message bytes that will be signed ([`decode_message`]), derives
//! what they do to the signing key ([`extract_effects`]) and lets the policy
//! decide on those effects alone. The decoder is deliberately stricter than
//! the Solana runtime: anything it cannot decode with certainty is refused.

mod build;
mod decode;
mod effects;

pub use build::{
    BuildError, SplTransfer, assemble_transaction, associated_token_address, build_sol_transfer,
    build_spl_transfer, build_sweep,
};
pub use decode::{
    AddressTableLookup, CompiledInstruction, DecodeError, DecodedMessage, MessageVersion,
    decode_message,
};
pub use effects::{Effects, SolOutflow, SplOutflow, Violation, extract_effects, violations};

use crate::types::PublicKey;

/// Largest serialized transaction the network accepts (IPv6 MTU minus
/// headers), signatures included.
pub const PACKET_DATA_SIZE: usize = 1232;

/// Lamports charged per required signature.
pub const LAMPORTS_PER_SIGNATURE: u64 = 5_000;

/// Compute units the runtime grants at most; used as the limit when a
/// message sets a priority price without a limit (an upper bound).
pub const MAX_COMPUTE_UNIT_LIMIT: u32 = 1_400_000;

const fn id(s: &str) -> PublicKey {
    PublicKey(solana_pubkey::Pubkey::from_str_const(s).to_bytes())
}

/// Well-known program ids keyward understands.
pub mod programs {
    use super::{PublicKey, id};

    /// The System program.
    pub const SYSTEM: PublicKey = id("11111111111111111111111111111111");
    /// SPL Token.
    pub const TOKEN: PublicKey = id("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA");
    /// SPL Token-2022.
    pub const TOKEN_2022: PublicKey = id("TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb");
    /// SPL Associated Token Account.
    pub const ASSOCIATED_TOKEN: PublicKey = id("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL");
    /// The Compute Budget program.
    pub const COMPUTE_BUDGET: PublicKey = id("ComputeBudget111111111111111111111111111111");
    /// SPL Memo, first version.
    pub const MEMO_V1: PublicKey = id("Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo");
    /// SPL Memo, current version (used when keyward builds a memo).
    pub const MEMO: PublicKey = id("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr");
    /// The recent-blockhashes sysvar (used by durable-nonce instructions).
    pub const SYSVAR_RECENT_BLOCKHASHES: PublicKey =
        id("SysvarRecentB1ockHashes11111111111111111111");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::programs;

    #[test]
    fn program_ids_match_the_interface_crates() {
        assert_eq!(
            programs::SYSTEM.0,
            solana_system_interface::program::ID.to_bytes()
        );
        assert_eq!(programs::TOKEN.0, spl_token_interface::ID.to_bytes());
        assert_eq!(
            programs::COMPUTE_BUDGET.0,
            solana_compute_budget_interface::ID.to_bytes()
        );
        assert_eq!(programs::MEMO_V1.0, spl_memo_interface::v1::ID.to_bytes());
        assert_eq!(programs::MEMO.0, spl_memo_interface::v3::ID.to_bytes());
    }
}
