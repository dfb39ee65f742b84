//! The key registry (`key_registry`, schema version 2): which HSM object
//! serves each key name, version by version.
//!
//! Policies and agents name keys by name (`hot`); the registry says which
//! HSM label serves the name now (its one `active` version) and which older
//! versions are `retiring` (they sign nothing but their sweep) or `retired`
//! (destroyed in the HSM). Version 1 of a name is labelled with the name
//! itself, as every key was before versions existed; a successor made by
//! `keyward key rotate` gets a label in keyward's reserved namespace
//! ([`hsm_label`]), so no operator can create or take it.
//!
//! Every change is made in the ledger transaction that records it
//! (`key_generated`, `key_rotated`, `key_retired`), so the table is always
//! what the chain says; this module only reads and writes rows.

use ed25519_dalek::{Signature, VerifyingKey};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::events::KeyRotated;
use crate::types::{KeyName, PublicKey};

/// The state of one version of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Serves its name: agents' intents are signed with it.
    Active,
    /// Rotated out: signs nothing but its sweep, until retired.
    Retiring,
    /// Destroyed in the HSM.
    Retired,
}

impl KeyState {
    /// Stable name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<KeyState> {
        match s {
            "active" => Some(KeyState::Active),
            "retiring" => Some(KeyState::Retiring),
            "retired" => Some(KeyState::Retired),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One version of a key, as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredKey {
    /// The key's name (what policies and agents use).
    pub name: String,
    /// Its version under the name, from 1.
    pub version: u32,
    /// HSM backend that holds it (`pkcs11`, `yubihsm`).
    pub backend: String,
    /// The label the backend finds it by.
    pub hsm_label: String,
    /// Public key (base58).
    pub public_key: String,
    /// Its state.
    pub state: KeyState,
    /// When it was registered (Unix ms).
    pub created_ms: i64,
    /// When it was rotated out (Unix ms).
    pub rotated_ms: Option<i64>,
    /// End of its grace period once retiring (Unix ms).
    pub retire_after_ms: Option<i64>,
    /// When it was destroyed (Unix ms).
    pub retired_ms: Option<i64>,
    /// The ledger entry that registered it.
    pub seq: u64,
}

impl RegisteredKey {
    /// `name@version`, as operators name one version.
    pub fn versioned_name(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// The HSM label of version `version` of key `name`: the name itself for
/// version 1; `keyward-v{version}-{name}` for a successor (in keyward's
/// reserved namespace), with the SHA-256 of the name in hex in place of the
/// name when that would not fit a key name's 64 characters.
pub fn hsm_label(name: &KeyName, version: u32) -> KeyName {
    if version <= 1 {
        return name.clone();
    }
    let prefix = format!("{}v{version}-", crate::service::keys::RESERVED_PREFIX);
    let label = if prefix.len() + name.as_str().len() <= 64 {
        format!("{prefix}{name}")
    } else {
        let digest = hex::encode(Sha256::digest(name.as_str().as_bytes()));
        format!("{prefix}{}", &digest[..64 - prefix.len()])
    };
    // Letters, digits, `-` and the name's own characters: always a key name.
    KeyName::new(&label).unwrap_or_else(|_| name.clone())
}

/// The first line of every transition statement.
pub const STATEMENT_HEADER: &str = "keyward key rotation v1";

/// The transition statement of a rotation: plain text both keys sign.
///
/// It starts with `keyward key rotation v1`, so it can never be taken for
/// a Solana message a key would otherwise sign: read as a legacy message
/// its header would ask for 107 signatures and its account list for 119
/// keys (3,808 bytes), far more than the statement holds, and a versioned
/// message starts with a byte of 0x80 or above, which no ASCII text does.
pub fn statement(
    name: &str,
    old: (&PublicKey, u32),
    new: (&PublicKey, u32),
    time_utc: &str,
    reason: &str,
) -> String {
    format!(
        "{STATEMENT_HEADER}\nkey: {name}\nold: {} (version {})\nnew: {} (version {})\ntime: {time_utc}\nreason: {reason}\n",
        old.0, old.1, new.0, new.1
    )
}

/// Checks a `key_rotated` entry: the statement names the key and both
/// public keys, and each key's signature over it verifies (strict Ed25519).
pub fn verify_rotation(r: &KeyRotated) -> Result<(), String> {
    let statement = r
        .statement
        .as_deref()
        .ok_or("the entry carries no transition statement")?;
    if !statement.starts_with(&format!("{STATEMENT_HEADER}\nkey: {}\n", r.key)) {
        return Err("the statement does not name the rotated key".into());
    }
    for (role, pk, sig) in [
        ("old", &r.old_public_key, &r.old_signature),
        ("new", &r.new_public_key, &r.new_signature),
    ] {
        if !statement.contains(&format!("\n{role}: {pk} ")) {
            return Err(format!("the statement does not name the {role} key {pk}"));
        }
        let pk =
            PublicKey::from_base58(pk).ok_or(format!("the {role} public key is not base58"))?;
        let sig = sig
            .as_deref()
            .ok_or(format!("no signature of the {role} key"))?;
        let sig: [u8; 64] = bs58::decode(sig)
            .into_vec()
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(format!(
                "the {role} key's signature is not 64 bytes of base58"
            ))?;
        VerifyingKey::from_bytes(&pk.0)
            .and_then(|vk| vk.verify_strict(statement.as_bytes(), &Signature::from_bytes(&sig)))
            .map_err(|_| format!("the {role} key's signature does not verify"))?;
    }
    Ok(())
}

const COLUMNS: &str = "name, version, backend, hsm_label, public_key, state, created_ms, \
                       rotated_ms, retire_after_ms, retired_ms, seq";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RegisteredKey> {
    let state: String = r.get(5)?;
    Ok(RegisteredKey {
        name: r.get(0)?,
        version: r.get(1)?,
        backend: r.get(2)?,
        hsm_label: r.get(3)?,
        public_key: r.get(4)?,
        state: KeyState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("unknown key state {state:?}").into(),
            )
        })?,
        created_ms: r.get(6)?,
        rotated_ms: r.get(7)?,
        retire_after_ms: r.get(8)?,
        retired_ms: r.get(9)?,
        seq: u64::try_from(r.get::<_, i64>(10)?).unwrap_or(0),
    })
}

/// Every registered version, by name then version.
pub fn all(conn: &Connection) -> rusqlite::Result<Vec<RegisteredKey>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM key_registry ORDER BY name, version"
    ))?;
    stmt.query_map([], row)?.collect()
}

/// The active version of `name`, if the registry knows the name.
pub fn active(conn: &Connection, name: &str) -> rusqlite::Result<Option<RegisteredKey>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM key_registry WHERE name = ?1 AND state = 'active'"
    ))?
    .query_row([name], row)
    .optional()
}

/// Version `version` of `name`.
pub fn get(conn: &Connection, name: &str, version: u32) -> rusqlite::Result<Option<RegisteredKey>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM key_registry WHERE name = ?1 AND version = ?2"
    ))?
    .query_row(params![name, version], row)
    .optional()
}

/// The highest version of `name` (any state), 0 when unknown.
pub fn latest_version(conn: &Connection, name: &str) -> rusqlite::Result<u32> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM key_registry WHERE name = ?1",
        [name],
        |r| r.get(0),
    )
}

/// Adds a version. The schema refuses a second active version of a name
/// and a label another live version uses.
pub fn insert(conn: &Connection, k: &RegisteredKey) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO key_registry ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        k.name,
        k.version,
        k.backend,
        k.hsm_label,
        k.public_key,
        k.state.as_str(),
        k.created_ms,
        k.rotated_ms,
        k.retire_after_ms,
        k.retired_ms,
        i64::try_from(k.seq).unwrap_or(i64::MAX),
    ])?;
    Ok(())
}

/// Moves the active version `version` of `name` to retiring.
pub fn mark_retiring(
    conn: &Connection,
    name: &str,
    version: u32,
    rotated_ms: i64,
    retire_after_ms: i64,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE key_registry SET state = 'retiring', rotated_ms = ?3, retire_after_ms = ?4 \
         WHERE name = ?1 AND version = ?2 AND state = 'active'",
        params![name, version, rotated_ms, retire_after_ms],
    )?;
    Ok(n == 1)
}

/// Moves the retiring version `version` of `name` to retired.
pub fn mark_retired(
    conn: &Connection,
    name: &str,
    version: u32,
    retired_ms: i64,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE key_registry SET state = 'retired', retired_ms = ?3 \
         WHERE name = ?1 AND version = ?2 AND state = 'retiring'",
        params![name, version, retired_ms],
    )?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut c).unwrap();
        c
    }

    fn key(name: &str, version: u32, state: KeyState) -> RegisteredKey {
        let n = KeyName::new(name).unwrap();
        RegisteredKey {
            name: name.to_owned(),
            version,
            backend: "pkcs11".into(),
            hsm_label: hsm_label(&n, version).to_string(),
            public_key: format!("pk{version}"),
            state,
            created_ms: 1,
            rotated_ms: None,
            retire_after_ms: None,
            retired_ms: None,
            seq: u64::from(version),
        }
    }

    #[test]
    fn labels_of_successors_are_reserved_key_names_and_distinct() {
        let hot = KeyName::new("hot").unwrap();
        assert_eq!(hsm_label(&hot, 1).as_str(), "hot");
        assert_eq!(hsm_label(&hot, 2).as_str(), "keyward-v2-hot");
        let long = KeyName::new(&"k".repeat(64)).unwrap();
        let (a, b) = (hsm_label(&long, 2), hsm_label(&long, 3));
        assert!(a.as_str().starts_with("keyward-v2-") && a.as_str().len() == 64);
        assert_ne!(a, b);
        let other = KeyName::new(&format!("{}x", "k".repeat(63))).unwrap();
        assert_ne!(hsm_label(&other, 2), a, "hashed labels of two names differ");
        for label in [&a, &b, &hsm_label(&hot, 2)] {
            assert!(
                crate::service::new_key_name(label.as_str()).is_err(),
                "{label} is reserved: no operator can create it"
            );
        }
    }

    #[test]
    fn one_active_version_per_name_and_states_move_forward_only() {
        let c = db();
        insert(&c, &key("hot", 1, KeyState::Active)).unwrap();
        assert!(
            insert(&c, &key("hot", 2, KeyState::Active)).is_err(),
            "two active versions"
        );
        assert!(mark_retiring(&c, "hot", 1, 10, 20).unwrap());
        insert(&c, &key("hot", 2, KeyState::Active)).unwrap();
        assert_eq!(active(&c, "hot").unwrap().unwrap().version, 2);
        assert_eq!(latest_version(&c, "hot").unwrap(), 2);
        assert_eq!(latest_version(&c, "cold").unwrap(), 0);
        assert!(!mark_retiring(&c, "hot", 1, 10, 20).unwrap(), "not active");
        assert!(
            !mark_retired(&c, "hot", 2, 30).unwrap(),
            "active is not retired directly"
        );
        assert!(mark_retired(&c, "hot", 1, 30).unwrap());
        let v1 = get(&c, "hot", 1).unwrap().unwrap();
        assert_eq!(
            (v1.state, v1.rotated_ms, v1.retire_after_ms, v1.retired_ms),
            (KeyState::Retired, Some(10), Some(20), Some(30))
        );
        assert_eq!(v1.versioned_name(), "hot@1");
        assert_eq!(all(&c).unwrap().len(), 2);
    }
}
