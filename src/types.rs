//! Strong types parsed at the boundary, so the core never handles raw strings
//! or floats for names and money.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Lamports (1 SOL = 10^9 lamports). Money is integers, always.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lamports(pub u64);

impl Lamports {
    /// Zero lamports.
    pub const ZERO: Lamports = Lamports(0);

    /// Checked addition; `None` on overflow.
    pub fn checked_add(self, other: Lamports) -> Option<Lamports> {
        self.0.checked_add(other.0).map(Lamports)
    }
}

impl fmt::Display for Lamports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", crate::amount::format_units(u128::from(self.0), 9))
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is invalid: {why}")]
pub struct NameError {
    what: &'static str,
    value: String,
    why: &'static str,
}

fn check_name(
    what: &'static str,
    value: &str,
    max: usize,
    extra: &[char],
) -> Result<(), NameError> {
    let err = |why| NameError {
        what,
        value: value.chars().take(140).collect(),
        why,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value.len() > max {
        return Err(err("it is too long"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
    {
        return Err(err("it has characters outside the allowed set"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $extra:expr, $rule:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Parses a ", $what, ": ", $rule, ".")]
            pub fn new(value: &str) -> Result<Self, NameError> {
                check_name($what, value, $max, $extra)?;
                Ok(Self(value.to_owned()))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// An agent name from policy.toml.
    AgentName, "agent name", 64, &['_', '-', '.'], "1-64 characters of [A-Za-z0-9_.-]"
);
name_type!(
    /// A key name; it is the HSM object label of the key.
    KeyName, "key name", 64, &['_', '-', '.'], "1-64 characters of [A-Za-z0-9_.-]"
);
name_type!(
    /// A client-chosen intent id.
    IntentId, "intent id", 128, &['.', '_', ':', '-'], "1-128 characters of [A-Za-z0-9._:-]"
);

/// Sequence number of a ledger entry; the first entry is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LedgerSeq(pub u64);

impl fmt::Display for LedgerSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A 32-byte Ed25519 public key (a Solana address).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Base58 form, as Solana shows addresses.
    pub fn to_base58(&self) -> String {
        bs58::encode(self.0).into_string()
    }

    /// Parses a base58 address of exactly 32 bytes.
    pub fn from_base58(s: &str) -> Option<PublicKey> {
        let mut out = [0u8; 32];
        match bs58::decode(s).onto(&mut out) {
            Ok(32) => Some(PublicKey(out)),
            _ => None,
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base58())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base58())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_id_accepts_allowed_characters_and_refuses_others() {
        assert!(IntentId::new("a.b_c:d-9").is_ok());
        assert!(IntentId::new(&"x".repeat(128)).is_ok());
        assert!(IntentId::new(&"x".repeat(129)).is_err());
        assert!(IntentId::new("").is_err());
        assert!(IntentId::new("a b").is_err());
        assert!(IntentId::new("a/b").is_err());
        assert!(IntentId::new("é").is_err());
    }

    #[test]
    fn public_key_base58_round_trips_and_rejects_wrong_length() {
        let k = PublicKey([7u8; 32]);
        assert_eq!(PublicKey::from_base58(&k.to_base58()), Some(k));
        assert_eq!(
            PublicKey::from_base58(&bs58::encode([1u8; 31]).into_string()),
            None
        );
        assert_eq!(
            PublicKey::from_base58(&bs58::encode([1u8; 33]).into_string()),
            None
        );
        assert_eq!(PublicKey::from_base58("0OIl"), None);
    }
}
