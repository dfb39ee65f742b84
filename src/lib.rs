//! keyward: a hardened, HSM-backed signing appliance for Solana.
//!
//! Agents submit signing intents over a Unix socket; keyward decodes what the
//! transaction really does ([`solana`]), checks it against policy ([`policy`]),
//! signs inside an HSM ([`hsm`]) and records every decision and signature in
//! a durable SHA-256 hash chain ([`ledger`]) before it releases anything.
#![deny(unsafe_code)]

pub mod amount;
pub mod hsm;
pub mod ledger;
pub mod solana;
pub mod types;
