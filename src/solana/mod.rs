//! Solana message decoding, effect extraction and transfer building.
