//! keyward: a hardened, HSM-backed signing appliance for Solana.
//!
//! Agents submit signing intents over a Unix socket ([`api`]); keyward
//! decodes what the transaction really does ([`solana`]), checks it against
//! policy ([`policy`]), signs inside an HSM ([`hsm`]) and records every
//! decision and signature in a durable SHA-256 hash chain ([`ledger`]) before
//! it releases anything ([`service`]).
#![deny(unsafe_code)]

pub mod amount;
pub mod api;
pub mod approval;
pub mod config;
pub mod daemon;
pub mod doctor;
#[cfg(feature = "test-hooks")]
pub mod faults;
pub mod fds;
pub mod harden;
pub mod hsm;
pub mod intents;
pub mod ledger;
pub mod logging;
pub mod manpage;
pub mod mirror;
pub mod ops;
pub mod policy;
pub mod process;
pub mod schema;
pub mod secret_file;
pub mod service;
pub mod solana;
pub mod tools;
pub mod types;
pub mod watchdog;
