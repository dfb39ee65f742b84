//! Policy: who may sign what, and the limits that no sequence of requests can
//! get past.
//!
//! [`evaluate`] is pure: it sees the effects keyward derived from the exact
//! message bytes and the agent's spend in the rolling window, and decides.
//! The spend comes from [`counters`], read and updated inside the same ledger
//! transaction as the decision, so concurrency and restarts cannot overspend.

pub mod counters;
pub mod engine;
mod evaluate;
mod file;
pub mod hours;

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use evaluate::{Decision, evaluate, spend_by_asset};
pub use file::{SOL_DECIMALS, UserResolver, system_user_uid};

use crate::types::{AgentName, KeyName, PublicKey};

/// Stable rule codes used in denial reasons.
pub mod rules {
    /// The agent may not use this key.
    pub const KEY_NOT_ALLOWED: &str = "key_not_allowed";
    /// The amount (with fees) exceeds the per-transaction limit.
    pub const PER_TX_LIMIT: &str = "per_tx_limit";
    /// The amount (with fees) would exceed the rolling 24-hour limit.
    pub const DAILY_LIMIT: &str = "daily_limit";
    /// A recipient is not on the agent's allowlist.
    pub const RECIPIENT_NOT_ALLOWED: &str = "recipient_not_allowed";
    /// An instruction calls a program that is neither understood nor allowlisted.
    pub const PROGRAM_NOT_ALLOWED: &str = "program_not_allowed";
    /// The asset has no limits for this agent (or is not supported yet).
    pub const ASSET_NOT_ALLOWED: &str = "asset_not_allowed";
    /// The agent is outside its active hours.
    pub const OUTSIDE_ACTIVE_HOURS: &str = "outside_active_hours";
    /// The agent reached its per-minute or per-hour rate.
    pub const RATE_LIMITED: &str = "rate_limited";
}

/// Signed-intent rates: at most this many allowed intents per rolling
/// minute and hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// Per rolling 60 seconds.
    pub per_minute: Option<u32>,
    /// Per rolling 3600 seconds.
    pub per_hour: Option<u32>,
}

/// The denial circuit breaker of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive denials that lock the agent.
    pub max_consecutive_denials: u32,
    /// How long the lock lasts, in seconds.
    pub cooldown_s: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            max_consecutive_denials: 5,
            cooldown_s: 300,
        }
    }
}

/// An asset limits apply to: SOL, or an SPL mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Asset {
    /// Native SOL (lamports), fees included.
    Sol,
    /// An SPL Token or Token-2022 mint.
    Mint(PublicKey),
}

impl Asset {
    /// The asset's name in policy files, counters and answers: `SOL` or
    /// the mint's base58 address.
    pub fn key(&self) -> String {
        match self {
            Asset::Sol => "SOL".to_owned(),
            Asset::Mint(m) => m.to_base58(),
        }
    }
}

impl std::fmt::Display for Asset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Limits of one asset, in base units (lamports for SOL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetLimits {
    /// Decimals of the UI unit (9 for SOL, the mint's for SPL).
    pub decimals: u8,
    /// Largest spend per transaction (fees included for SOL).
    pub per_tx: u64,
    /// Largest spend per rolling 24 hours (fees included for SOL).
    pub per_day: u64,
    /// SPL only: the token program that owns the mint (Token or Token-2022).
    pub token_program: Option<PublicKey>,
    /// Transactions spending more than this (base units) need approval.
    pub approval_above: Option<u64>,
    /// Who approves them, when `approval_above` is set.
    pub approvers: Option<Approvers>,
}

/// An M-of-N quorum of named approvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approvers {
    /// Distinct approvals needed (M).
    pub required: u32,
    /// Who may approve (N names).
    pub of: Vec<String>,
}

/// One agent's effective policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPolicy {
    /// Agent name.
    pub name: AgentName,
    /// Unix uid the agent connects as.
    pub uid: u32,
    /// Keys the agent may sign with.
    pub keys: Vec<KeyName>,
    /// Recipient allowlist (wallet addresses); `None` means any recipient.
    pub allow_recipients: Option<BTreeSet<PublicKey>>,
    /// Programs allowed in `sign_transaction` beyond the built-ins.
    pub allow_programs: BTreeSet<PublicKey>,
    /// Limits per asset; an asset without limits cannot be spent.
    pub limits: BTreeMap<Asset, AssetLimits>,
    /// Rates of allowed intents.
    pub rate_limit: RateLimit,
    /// When the agent may sign; `None` means always.
    pub active_hours: Option<hours::ActiveHours>,
    /// The denial circuit breaker (on by default: 5 denials, 300 s).
    pub breaker: BreakerConfig,
}

impl AgentPolicy {
    /// SOL limits, if SOL may be spent.
    pub fn sol(&self) -> Option<&AssetLimits> {
        self.limits.get(&Asset::Sol)
    }
}

/// A loaded, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// SHA-256 of the policy file bytes.
    pub hash: [u8; 32],
    /// Agents.
    pub agents: Vec<AgentPolicy>,
    by_uid: HashMap<u32, usize>,
}

impl Policy {
    /// The agent bound to `uid`, if any.
    pub fn agent_for_uid(&self, uid: u32) -> Option<&AgentPolicy> {
        self.by_uid.get(&uid).and_then(|&i| self.agents.get(i))
    }

    /// Hex form of [`Policy::hash`].
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Every key name any agent may use (sorted, unique).
    pub fn all_keys(&self) -> BTreeSet<KeyName> {
        self.agents
            .iter()
            .flat_map(|a| a.keys.iter().cloned())
            .collect()
    }
}
