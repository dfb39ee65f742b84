//! `policy.toml`: parsing and validation into a [`Policy`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::hours::ActiveHours;
use super::{AgentPolicy, Approvers, Asset, AssetLimits, BreakerConfig, Policy, RateLimit};
use crate::amount::parse_units;
use crate::config::{ConfigError, read_text};
use crate::solana::programs;
use crate::types::{AgentName, KeyName, PublicKey};

/// Decimals of SOL.
pub const SOL_DECIMALS: u8 = 9;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    user: Option<String>,
    keys: Vec<String>,
    #[serde(default)]
    allow_recipients: Option<Vec<String>>,
    #[serde(default)]
    allow_programs: Vec<String>,
    #[serde(default)]
    limits: BTreeMap<String, RawLimits>,
    #[serde(default)]
    rate_limit: Option<RawRate>,
    #[serde(default)]
    active_hours: Option<RawHours>,
    #[serde(default)]
    breaker: Option<RawBreaker>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovers {
    required: u32,
    of: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    #[serde(default)]
    per_minute: Option<u32>,
    #[serde(default)]
    per_hour: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHours {
    tz: String,
    windows: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    #[serde(default)]
    max_consecutive_denials: Option<u32>,
    #[serde(default)]
    cooldown_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    decimals: Option<u8>,
    per_tx: String,
    per_day: String,
    #[serde(default)]
    approval_above: Option<String>,
    #[serde(default)]
    approvers: Option<RawApprovers>,
    /// SPL only: `token` (default) or `token-2022`.
    #[serde(default)]
    token_program: Option<String>,
}

/// Resolves a user name to a uid (through the system user database).
pub type UserResolver<'a> = &'a dyn Fn(&str) -> Option<u32>;

/// Looks a user up in the system user database.
pub fn system_user_uid(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

impl Policy {
    /// Loads and validates a policy file.
    pub fn load(file: &Path) -> Result<Policy, ConfigError> {
        let text = read_text(file)?;
        Self::parse(file, &text, &system_user_uid)
    }

    /// Parses policy text as if read from `file`; `resolve_user` maps
    /// `user = "name"` to a uid.
    pub fn parse(
        file: &Path,
        text: &str,
        resolve_user: UserResolver<'_>,
    ) -> Result<Policy, ConfigError> {
        let raw: RawPolicy = crate::config::from_toml_str(file, text)?;
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        let err = |key: String, problem: String| ConfigError::new(file, key, problem);

        let mut agents = Vec::new();
        let mut by_uid = HashMap::new();
        for (name, a) in raw.agents {
            let key = |k: &str| format!("agents.{name}.{k}");
            let agent_name =
                AgentName::new(&name).map_err(|e| err(format!("agents.{name}"), e.to_string()))?;
            let rate_limit = match a.rate_limit {
                None => RateLimit::default(),
                Some(r) => {
                    if r.per_minute.is_none() && r.per_hour.is_none() {
                        return Err(err(
                            key("rate_limit"),
                            "give per_minute, per_hour or both".into(),
                        ));
                    }
                    for (k, v) in [("per_minute", r.per_minute), ("per_hour", r.per_hour)] {
                        if v == Some(0) {
                            return Err(err(
                                key(&format!("rate_limit.{k}")),
                                "0 would deny everything; remove the agent's keys instead".into(),
                            ));
                        }
                    }
                    RateLimit {
                        per_minute: r.per_minute,
                        per_hour: r.per_hour,
                    }
                }
            };
            let active_hours = match a.active_hours {
                None => None,
                Some(h) => Some(
                    ActiveHours::parse(&h.tz, &h.windows)
                        .map_err(|e| err(key("active_hours"), e))?,
                ),
            };
            let breaker = match a.breaker {
                None => BreakerConfig::default(),
                Some(b) => {
                    let d = BreakerConfig::default();
                    let max = b
                        .max_consecutive_denials
                        .unwrap_or(d.max_consecutive_denials);
                    let cooldown = b.cooldown_s.unwrap_or(d.cooldown_s);
                    if !(1..=100_000).contains(&max) {
                        return Err(err(
                            key("breaker.max_consecutive_denials"),
                            "must be between 1 and 100000".into(),
                        ));
                    }
                    if !(1..=7 * 86_400).contains(&cooldown) {
                        return Err(err(
                            key("breaker.cooldown_s"),
                            "must be between 1 s and 7 days".into(),
                        ));
                    }
                    BreakerConfig {
                        max_consecutive_denials: max,
                        cooldown_s: cooldown,
                    }
                }
            };
            let uid = match (a.uid, a.user.as_deref()) {
                (Some(uid), None) => uid,
                (None, Some(user)) => resolve_user(user)
                    .ok_or_else(|| err(key("user"), format!("no system user named {user:?}")))?,
                (Some(_), Some(_)) => {
                    return Err(err(key("uid"), "give either uid or user, not both".into()));
                }
                (None, None) => {
                    return Err(err(key("uid"), "every agent needs a uid or a user".into()));
                }
            };
            if let Some(other) = by_uid.insert(uid, agents.len()) {
                let other: &AgentPolicy = &agents[other];
                return Err(err(
                    key("uid"),
                    format!(
                        "uid {uid} is already bound to agent {:?}",
                        other.name.as_str()
                    ),
                ));
            }
            if a.keys.is_empty() {
                return Err(err(key("keys"), "list at least one key".into()));
            }
            let mut keys = Vec::new();
            for k in &a.keys {
                let kn = KeyName::new(k).map_err(|e| err(key("keys"), e.to_string()))?;
                if k == crate::ledger::checkpoint::AUDIT_KEY {
                    return Err(err(
                        key("keys"),
                        format!("{k:?} is reserved for signing checkpoints"),
                    ));
                }
                if keys.contains(&kn) {
                    return Err(err(key("keys"), format!("key {k:?} listed twice")));
                }
                keys.push(kn);
            }
            let allow_recipients = match a.allow_recipients {
                None => None,
                Some(list) => {
                    let mut set = BTreeSet::new();
                    for r in &list {
                        let pk = PublicKey::from_base58(r).ok_or_else(|| {
                            err(
                                key("allow_recipients"),
                                format!("{r:?} is not a base58 address of 32 bytes"),
                            )
                        })?;
                        set.insert(pk);
                    }
                    Some(set)
                }
            };
            let mut allow_programs = BTreeSet::new();
            for p in &a.allow_programs {
                let pk = PublicKey::from_base58(p).ok_or_else(|| {
                    err(
                        key("allow_programs"),
                        format!("{p:?} is not a base58 program id of 32 bytes"),
                    )
                })?;
                allow_programs.insert(pk);
            }
            let mut limits = BTreeMap::new();
            for (asset_name, l) in a.limits {
                let lkey = |k: &str| format!("agents.{name}.limits.{asset_name}.{k}");
                let asset = if asset_name == "SOL" {
                    Asset::Sol
                } else {
                    Asset::Mint(PublicKey::from_base58(&asset_name).ok_or_else(|| {
                        err(
                            format!("agents.{name}.limits.{asset_name}"),
                            "an asset is \"SOL\" or an SPL mint address (base58 of 32 bytes)"
                                .into(),
                        )
                    })?)
                };
                let (decimals, token_program) = match asset {
                    Asset::Sol => {
                        if let Some(d) = l.decimals
                            && d != SOL_DECIMALS
                        {
                            return Err(err(
                                lkey("decimals"),
                                format!("SOL has {SOL_DECIMALS} decimals, not {d}"),
                            ));
                        }
                        if l.token_program.is_some() {
                            return Err(err(
                                lkey("token_program"),
                                "SOL has no token program".into(),
                            ));
                        }
                        (SOL_DECIMALS, None)
                    }
                    Asset::Mint(_) => {
                        let d = l.decimals.ok_or_else(|| {
                            err(
                                lkey("decimals"),
                                "SPL limits need the mint's decimals (they are checked on chain by TransferChecked)"
                                    .into(),
                            )
                        })?;
                        if d > 19 {
                            return Err(err(
                                lkey("decimals"),
                                format!("{d} decimals cannot express a 64-bit amount"),
                            ));
                        }
                        let program = match l.token_program.as_deref() {
                            None | Some("token") => programs::TOKEN,
                            Some("token-2022") => programs::TOKEN_2022,
                            Some(other) => {
                                return Err(err(
                                    lkey("token_program"),
                                    format!("{other:?} is not \"token\" or \"token-2022\""),
                                ));
                            }
                        };
                        (d, Some(program))
                    }
                };
                let per_tx = parse_units(&l.per_tx, decimals)
                    .map_err(|e| err(lkey("per_tx"), e.to_string()))?;
                let per_day = parse_units(&l.per_day, decimals)
                    .map_err(|e| err(lkey("per_day"), e.to_string()))?;
                if per_tx > per_day {
                    return Err(err(lkey("per_tx"), "per_tx is larger than per_day".into()));
                }
                if per_day > i64::MAX as u64 {
                    return Err(err(lkey("per_day"), "too large".into()));
                }
                let approval_above = match &l.approval_above {
                    None => None,
                    Some(a) => Some(
                        parse_units(a, decimals)
                            .map_err(|e| err(lkey("approval_above"), e.to_string()))?,
                    ),
                };
                let approvers = match l.approvers {
                    None => None,
                    Some(a) => {
                        let mut of: Vec<String> = Vec::new();
                        for n in &a.of {
                            AgentName::new(n).map_err(|e| {
                                err(
                                    lkey("approvers.of"),
                                    e.to_string().replace("agent name", "approver name"),
                                )
                            })?;
                            if of.contains(n) {
                                return Err(err(
                                    lkey("approvers.of"),
                                    format!("{n:?} is listed twice"),
                                ));
                            }
                            of.push(n.clone());
                        }
                        if a.required == 0 || a.required as usize > of.len() {
                            return Err(err(
                                lkey("approvers.required"),
                                format!("must be between 1 and the {} approvers listed", of.len()),
                            ));
                        }
                        Some(Approvers {
                            required: a.required,
                            of,
                        })
                    }
                };
                match (approval_above.is_some(), approvers.is_some()) {
                    (true, false) => {
                        return Err(err(
                            lkey("approvers"),
                            "approval_above needs approvers = { required = M, of = [...] }".into(),
                        ));
                    }
                    (false, true) => {
                        return Err(err(
                            lkey("approval_above"),
                            "approvers without approval_above would never be asked".into(),
                        ));
                    }
                    _ => {}
                }
                limits.insert(
                    asset,
                    AssetLimits {
                        decimals,
                        per_tx,
                        per_day,
                        token_program,
                        approval_above,
                        approvers,
                    },
                );
            }
            agents.push(AgentPolicy {
                name: agent_name,
                uid,
                keys,
                allow_recipients,
                allow_programs,
                limits,
                rate_limit,
                active_hours,
                breaker,
            });
        }
        Ok(Policy {
            hash,
            agents,
            by_uid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, ConfigError> {
        Policy::parse(Path::new("/etc/keyward/policy.toml"), text, &|u| {
            (u == "trader").then_some(4242)
        })
    }

    const GOOD: &str = r#"
[agents.trader]
user = "trader"
keys = ["hot"]
allow_recipients = ["11111111111111111111111111111112"]

[agents.trader.limits.SOL]
per_tx = "2.5"
per_day = "20"

[agents.bot]
uid = 1000
keys = ["hot", "cold"]
"#;

    #[test]
    fn parses_agents_limits_and_users() {
        let p = parse(GOOD).unwrap();
        let trader = p.agent_for_uid(4242).unwrap();
        assert_eq!(trader.name.as_str(), "trader");
        let sol = trader.sol().unwrap();
        assert_eq!(sol.per_tx, 2_500_000_000);
        assert_eq!(sol.per_day, 20_000_000_000);
        assert_eq!(sol.decimals, 9);
        assert_eq!(trader.allow_recipients.as_ref().map(|s| s.len()), Some(1));
        let bot = p.agent_for_uid(1000).unwrap();
        assert!(bot.sol().is_none(), "no limits: SOL spend is denied");
        assert!(bot.allow_recipients.is_none());
        assert!(p.agent_for_uid(0).is_none());
    }

    #[test]
    fn hash_is_sha256_of_the_file_bytes() {
        let p = parse(GOOD).unwrap();
        let expect: [u8; 32] = Sha256::digest(GOOD.as_bytes()).into();
        assert_eq!(p.hash, expect);
    }

    #[test]
    fn refuses_rules_it_would_not_enforce() {
        // approval_above needs approvers, and the reverse.
        let text = GOOD.replace(
            "per_day = \"20\"",
            "per_day = \"20\"\napproval_above = \"1\"",
        );
        assert_eq!(
            parse(&text).unwrap_err().key,
            "agents.trader.limits.SOL.approvers"
        );
        let with =
            |extra: &str| GOOD.replace("per_day = \"20\"", &format!("per_day = \"20\"\n{extra}"));
        let p = parse(&with("approval_above = \"1\"\napprovers = { required = 2, of = [\"alice\", \"bob\", \"carol\"] }")).unwrap();
        let sol = p.agent_for_uid(4242).unwrap().sol().unwrap().clone();
        assert_eq!(sol.approval_above, Some(1_000_000_000));
        assert_eq!(sol.approvers.unwrap().of.len(), 3);
        for (extra, key) in [
            (
                "approvers = { required = 1, of = [\"alice\"] }",
                "agents.trader.limits.SOL.approval_above",
            ),
            (
                "approval_above = \"1\"\napprovers = { required = 3, of = [\"alice\", \"bob\"] }",
                "agents.trader.limits.SOL.approvers.required",
            ),
            (
                "approval_above = \"1\"\napprovers = { required = 1, of = [\"alice\", \"alice\"] }",
                "agents.trader.limits.SOL.approvers.of",
            ),
            (
                "approval_above = \"1.0000000001\"\napprovers = { required = 1, of = [\"a\"] }",
                "agents.trader.limits.SOL.approval_above",
            ),
        ] {
            assert_eq!(parse(&with(extra)).unwrap_err().key, key, "{extra}");
        }
    }

    const USDC: &str = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v";

    #[test]
    fn rates_hours_and_breakers_parse_with_defaults_and_bounds() {
        let p = parse(GOOD).unwrap();
        let bot = p.agent_for_uid(1000).unwrap();
        assert_eq!(
            bot.breaker,
            BreakerConfig::default(),
            "the breaker is on by default"
        );
        assert_eq!(bot.rate_limit, RateLimit::default());
        assert!(bot.active_hours.is_none());
        let text = GOOD.replace(
            "uid = 1000\n",
            "uid = 1000\nrate_limit = { per_minute = 3 }\nbreaker = { cooldown_s = 60 }\n\
             active_hours = { tz = \"Europe/Berlin\", windows = [\"Mon-Fri 08:00-20:00\"] }\n",
        );
        let p = parse(&text).unwrap();
        let bot = p.agent_for_uid(1000).unwrap();
        assert_eq!(
            bot.rate_limit,
            RateLimit {
                per_minute: Some(3),
                per_hour: None
            }
        );
        assert_eq!(
            bot.breaker,
            BreakerConfig {
                max_consecutive_denials: 5,
                cooldown_s: 60
            }
        );
        assert!(
            bot.active_hours
                .as_ref()
                .unwrap()
                .describe()
                .contains("Europe/Berlin")
        );
        for (extra, key) in [
            ("rate_limit = {}", "agents.bot.rate_limit"),
            (
                "rate_limit = { per_hour = 0 }",
                "agents.bot.rate_limit.per_hour",
            ),
            (
                "breaker = { max_consecutive_denials = 0 }",
                "agents.bot.breaker.max_consecutive_denials",
            ),
            (
                "breaker = { cooldown_s = 0 }",
                "agents.bot.breaker.cooldown_s",
            ),
            (
                "active_hours = { tz = \"Nowhere/Land\", windows = [\"daily 00:00-01:00\"] }",
                "agents.bot.active_hours",
            ),
            (
                "active_hours = { tz = \"UTC\", windows = [\"Mon 9-10\"] }",
                "agents.bot.active_hours",
            ),
            ("rate_limit = { per_second = 1 }", "agents.bot.rate_limit"),
        ] {
            let text = GOOD.replace("uid = 1000\n", &format!("uid = 1000\n{extra}\n"));
            let e = parse(&text).unwrap_err();
            assert!(e.key.starts_with(key), "{extra}: {e}");
        }
    }

    #[test]
    fn spl_limits_are_per_mint_with_decimals_and_token_program() {
        let text = format!(
            "{GOOD}\n[agents.bot.limits.{USDC}]\ndecimals = 6\nper_tx = \"1.5\"\nper_day = \"2\"\n\
             \n[agents.bot.limits.So11111111111111111111111111111111111111112]\ndecimals = 9\n\
             token_program = \"token-2022\"\nper_tx = \"1\"\nper_day = \"1\"\n"
        );
        let p = parse(&text).unwrap();
        let bot = p.agent_for_uid(1000).unwrap();
        let usdc = &bot.limits[&Asset::Mint(PublicKey::from_base58(USDC).unwrap())];
        assert_eq!(
            (usdc.decimals, usdc.per_tx, usdc.per_day),
            (6, 1_500_000, 2_000_000)
        );
        assert_eq!(usdc.token_program, Some(programs::TOKEN));
        assert!(
            bot.limits
                .values()
                .any(|l| l.token_program == Some(programs::TOKEN_2022))
        );
        assert!(bot.sol().is_none());
        let bad = [
            // More decimals than the mint has.
            (
                text.replace("\"1.5\"", "\"1.5000001\""),
                format!("agents.bot.limits.{USDC}.per_tx"),
            ),
            // Decimals are required for SPL.
            (
                text.replace("decimals = 6\n", ""),
                format!("agents.bot.limits.{USDC}.decimals"),
            ),
            (
                text.replace("\"token-2022\"", "\"token-2023\""),
                "agents.bot.limits.So11111111111111111111111111111111111111112.token_program"
                    .to_owned(),
            ),
            (
                text.replace(USDC, "not-a-mint"),
                "agents.bot.limits.not-a-mint".to_owned(),
            ),
        ];
        for (t, key) in bad {
            assert_eq!(parse(&t).unwrap_err().key, key);
        }
    }

    #[test]
    fn refuses_bad_amounts_addresses_and_bindings() {
        let cases = [
            (
                GOOD.replace("\"2.5\"", "\"2.5000000001\""),
                "agents.trader.limits.SOL.per_tx",
            ),
            (
                GOOD.replace("\"2.5\"", "\"-1\""),
                "agents.trader.limits.SOL.per_tx",
            ),
            (
                GOOD.replace("\"2.5\"", "\"30\""),
                "agents.trader.limits.SOL.per_tx",
            ),
            (
                GOOD.replace("11111111111111111111111111111112", "not-an-address"),
                "agents.trader.allow_recipients",
            ),
            (
                GOOD.replace("uid = 1000", "uid = 4242"),
                "agents.trader.uid",
            ),
            (
                GOOD.replace("user = \"trader\"", "user = \"nobody-here\""),
                "agents.trader.user",
            ),
            (
                GOOD.replace("keys = [\"hot\", \"cold\"]", "keys = []"),
                "agents.bot.keys",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let e = parse("[agents.x]\nuid = \n").unwrap_err();
        assert!(e.position.is_some(), "{e}");
        let e = parse("[agents.x]\nuid = 1\nkeys=[\"a\"]\nfoo = 1\n").unwrap_err();
        assert!(e.to_string().contains("foo"), "{e}");
    }
}
