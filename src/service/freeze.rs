//! Emergency freezes: an operator stops signing for everything, one agent
//! or one key with one command (`keyward freeze`), the first step of every
//! incident runbook.
//!
//! This module owns the `freezes` table (schema version 2). A row is a
//! freeze in force; putting one in force and lifting it are each one
//! ledger transaction that also records `signing_frozen` or
//! `signing_unfrozen`, so the table and the chain never disagree and a
//! freeze survives restarts.
//!
//! Every decision that could lead to a new signature reads the table
//! inside its own ledger transaction ([`covering`]): admission of an
//! intent, the approval that would complete a quorum, and dry runs. The
//! ledger has one writer, so a request whose transaction runs after the
//! freeze's commit (any request sent after `keyward freeze` returned)
//! sees it. Intents admitted before it (already inside the HSM call, or
//! past their quorum) finish.

use keyward_client::wire::codes;
use rusqlite::{Connection, OptionalExtension, params};

use super::Operations;
use crate::ledger::LedgerError;
use crate::ledger::events::{SigningFrozen, SigningUnfrozen};
use crate::types::{AgentName, KeyName};

/// Longest operator's reason (bytes).
pub const MAX_REASON: usize = 500;

/// What a freeze covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeScope {
    /// Every intent.
    All,
    /// Every intent of one agent.
    Agent(AgentName),
    /// Every intent naming one key.
    Key(KeyName),
}

impl FreezeScope {
    /// Parses the admin API's `scope` (`all`, `agent`, `key`) and `target`.
    pub fn parse(scope: &str, target: Option<&str>) -> Result<FreezeScope, FreezeError> {
        let bad = |why: &str| FreezeError::InvalidScope(why.to_owned());
        match (scope, target) {
            ("all", None) => Ok(FreezeScope::All),
            ("all", Some(_)) => Err(bad("scope `all` takes no target")),
            ("agent", Some(t)) => AgentName::new(t)
                .map(FreezeScope::Agent)
                .map_err(|e| bad(&format!("agent name {t:?}: {e}"))),
            ("key", Some(t)) => KeyName::new(t)
                .map(FreezeScope::Key)
                .map_err(|e| bad(&format!("key name {t:?}: {e}"))),
            ("agent" | "key", None) => Err(bad("scopes `agent` and `key` need a target")),
            (other, _) => Err(bad(&format!(
                "unknown scope {other:?}: give `all`, `agent` or `key`"
            ))),
        }
    }
}

impl std::fmt::Display for FreezeScope {
    /// The stored form: `all`, `agent:NAME` or `key:NAME`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FreezeScope::All => f.write_str("all"),
            FreezeScope::Agent(a) => write!(f, "agent:{}", a.as_str()),
            FreezeScope::Key(k) => write!(f, "key:{}", k.as_str()),
        }
    }
}

/// A freeze in force, as the `freezes` table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    /// `all`, `agent:NAME` or `key:NAME`.
    pub scope: String,
    /// The operator's reason (never shown to agents).
    pub reason: String,
    /// Who (`uid:N`).
    pub by: String,
    /// When it began (Unix ms).
    pub since_ms: i64,
    /// Sequence of its `signing_frozen` entry.
    pub seq: u64,
}

/// What an agent is told when a freeze refuses its request: the scope and
/// since when, never the operator's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "signing is frozen for {scope} since {since} by an operator; nothing was signed or counted; \
     send the intent again once the freeze is lifted"
)]
pub struct Frozen {
    /// The scope in force (`all`, `agent:NAME`, `key:NAME`).
    pub scope: String,
    /// Since when (UTC).
    pub since: String,
}

impl From<&Freeze> for Frozen {
    fn from(f: &Freeze) -> Frozen {
        Frozen {
            scope: f.scope.clone(),
            since: crate::ledger::format_utc(f.since_ms),
        }
    }
}

/// Why a freeze or an unfreeze changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The scope or target is malformed.
    #[error("invalid freeze scope: {0}")]
    InvalidScope(String),
    /// The reason is empty, too long or has control characters.
    #[error("a freeze needs a reason of 1-{MAX_REASON} bytes without control characters: {0}")]
    InvalidReason(String),
    /// The policy in force has no agent by that name.
    #[error("the policy in force has no agent {0:?}")]
    UnknownAgent(String),
    /// The policy in force names no key by that name.
    #[error("the policy in force names no key {0:?}")]
    UnknownKey(String),
    /// Nothing to lift: that scope is not frozen.
    #[error("{0} is not frozen; `keyward freeze --list` shows the freezes in force")]
    NotFrozen(String),
    /// The ledger could not record it; nothing changed.
    #[error("the ledger cannot record it, nothing changed: {0}")]
    Ledger(#[from] LedgerError),
}

impl FreezeError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            FreezeError::InvalidScope(_) => "invalid_scope",
            FreezeError::InvalidReason(_) => "invalid_reason",
            FreezeError::UnknownAgent(_) => "unknown_agent",
            FreezeError::UnknownKey(_) => "unknown_key",
            FreezeError::NotFrozen(_) => "not_frozen",
            FreezeError::Ledger(_) => codes::AUDIT_UNAVAILABLE,
        }
    }
}

/// A freeze put in force, or the one already in force for that scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeOutcome {
    /// The freeze in force now.
    pub freeze: Freeze,
    /// `false` when the scope was already frozen: nothing was recorded.
    pub created: bool,
}

/// A freeze lifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfrozen {
    /// The freeze that was lifted.
    pub lifted: Freeze,
    /// Sequence of the `signing_unfrozen` entry.
    pub seq: u64,
}

fn checked_reason(reason: &str) -> Result<String, FreezeError> {
    let r = reason.trim();
    if r.is_empty() {
        return Err(FreezeError::InvalidReason("it is empty".into()));
    }
    if r.len() > MAX_REASON {
        return Err(FreezeError::InvalidReason(format!(
            "it has {} bytes",
            r.len()
        )));
    }
    if r.chars().any(char::is_control) {
        return Err(FreezeError::InvalidReason(
            "it has control characters".into(),
        ));
    }
    Ok(r.to_owned())
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Freeze> {
    Ok(Freeze {
        scope: r.get(0)?,
        reason: r.get(1)?,
        by: r.get(2)?,
        since_ms: r.get(3)?,
        seq: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
    })
}

/// Every freeze in force, oldest first.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<Freeze>> {
    conn.prepare_cached("SELECT scope, reason, by, since_ms, seq FROM freezes ORDER BY seq")?
        .query_map([], row)?
        .collect()
}

fn get(conn: &Connection, scope: &str) -> rusqlite::Result<Option<Freeze>> {
    conn.prepare_cached("SELECT scope, reason, by, since_ms, seq FROM freezes WHERE scope = ?1")?
        .query_row([scope], row)
        .optional()
}

/// The freeze (the oldest, if several) that covers a new intent of
/// `agent` naming `key`, if any: `all`, `agent:AGENT` or `key:KEY`.
pub(super) fn covering(
    conn: &Connection,
    agent: &str,
    key: &str,
) -> rusqlite::Result<Option<Freeze>> {
    conn.prepare_cached(
        "SELECT scope, reason, by, since_ms, seq FROM freezes
         WHERE scope IN ('all', ?1, ?2) ORDER BY seq LIMIT 1",
    )?
    .query_row(params![format!("agent:{agent}"), format!("key:{key}")], row)
    .optional()
}

impl Operations {
    /// Freezes signing for `scope` on an operator's (`by`'s) request:
    /// records `signing_frozen` and the row in one transaction. The agent
    /// or key must be one the policy in force knows. A scope already
    /// frozen keeps its freeze (idempotent: nothing recorded, the freeze
    /// in force returned with `created: false`).
    pub async fn freeze(
        &self,
        scope: FreezeScope,
        reason: &str,
        by: &str,
    ) -> Result<FreezeOutcome, FreezeError> {
        let reason = checked_reason(reason)?;
        let policy = self.core.policy();
        match &scope {
            FreezeScope::All => {}
            FreezeScope::Agent(a) => {
                if !policy.agents.iter().any(|p| &p.name == a) {
                    return Err(FreezeError::UnknownAgent(a.to_string()));
                }
            }
            FreezeScope::Key(k) => {
                if !policy.all_keys().contains(k) {
                    return Err(FreezeError::UnknownKey(k.to_string()));
                }
            }
        }
        let agent = match &scope {
            FreezeScope::Agent(a) => Some(a.to_string()),
            _ => None,
        };
        let scope = scope.to_string();
        let by = by.to_owned();
        let outcome = self
            .core
            .ledger
            .write(move |txn| {
                if let Some(existing) = get(txn.conn(), &scope)? {
                    return Ok(FreezeOutcome {
                        freeze: existing,
                        created: false,
                    });
                }
                let event = SigningFrozen {
                    scope: scope.clone(),
                    reason: reason.clone(),
                    by: by.clone(),
                };
                let entry = txn.record(None, agent.as_deref(), &event)?;
                let since_ms = txn.now_ms();
                let seq = i64::try_from(entry.seq.0).map_err(|_| LedgerError::Exhausted)?;
                txn.conn().execute(
                    "INSERT INTO freezes (scope, reason, by, since_ms, seq) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![scope, reason, by, since_ms, seq],
                )?;
                Ok(FreezeOutcome {
                    freeze: Freeze {
                        scope,
                        reason,
                        by,
                        since_ms,
                        seq: entry.seq.0,
                    },
                    created: true,
                })
            })
            .await?;
        if outcome.created {
            tracing::warn!(scope = %outcome.freeze.scope, by = %outcome.freeze.by, seq = outcome.freeze.seq, "signing frozen");
        }
        Ok(outcome)
    }

    /// Lifts the freeze of `scope` on an operator's request: records
    /// `signing_unfrozen` (naming the `signing_frozen` entry it lifts) and
    /// removes the row in one transaction. A scope that is not frozen is
    /// refused ([`FreezeError::NotFrozen`]); an agent or key the policy no
    /// longer names can still be unfrozen.
    pub async fn unfreeze(
        &self,
        scope: FreezeScope,
        reason: Option<&str>,
        by: &str,
    ) -> Result<Unfrozen, FreezeError> {
        let reason = match reason {
            Some(r) if !r.trim().is_empty() => Some(checked_reason(r)?),
            _ => None,
        };
        let agent = match &scope {
            FreezeScope::Agent(a) => Some(a.to_string()),
            _ => None,
        };
        let scope = scope.to_string();
        let by = by.to_owned();
        let outcome = self
            .core
            .ledger
            .write(move |txn| {
                let Some(lifted) = get(txn.conn(), &scope)? else {
                    return Ok(Err(FreezeError::NotFrozen(scope)));
                };
                let event = SigningUnfrozen {
                    scope: scope.clone(),
                    reason,
                    by,
                    frozen_seq: Some(lifted.seq),
                };
                let entry = txn.record(None, agent.as_deref(), &event)?;
                txn.conn()
                    .execute("DELETE FROM freezes WHERE scope = ?1", [&scope])?;
                Ok(Ok(Unfrozen {
                    lifted,
                    seq: entry.seq.0,
                }))
            })
            .await??;
        tracing::warn!(scope = %outcome.lifted.scope, seq = outcome.seq, "signing unfrozen");
        Ok(outcome)
    }

    /// Every freeze in force, oldest first.
    pub async fn freezes(&self) -> Result<Vec<Freeze>, LedgerError> {
        let ledger = self.core.ledger.clone();
        tokio::task::spawn_blocking(move || {
            let conn = ledger.reader()?;
            list(&conn).map_err(LedgerError::Sqlite)
        })
        .await
        .map_err(|e| LedgerError::Corrupt(format!("freeze list task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scopes_parse_to_their_stored_form_and_bad_ones_are_refused() {
        let stored = |s: &str, t: Option<&str>| FreezeScope::parse(s, t).unwrap().to_string();
        assert_eq!(stored("all", None), "all");
        assert_eq!(stored("agent", Some("trader")), "agent:trader");
        assert_eq!(stored("key", Some("hot")), "key:hot");
        for (s, t) in [
            ("all", Some("x")),
            ("agent", None),
            ("key", None),
            ("everything", None),
            ("agent", Some("bad name")),
            ("key", Some("")),
        ] {
            let e = FreezeScope::parse(s, t).unwrap_err();
            assert_eq!(e.code(), "invalid_scope", "{s} {t:?}");
        }
    }

    #[test]
    fn a_reason_must_be_non_empty_bounded_and_printable() {
        assert_eq!(
            checked_reason("  key hot exposed \n").unwrap(),
            "key hot exposed"
        );
        for bad in ["", "   ", "a\u{7}b", &"x".repeat(MAX_REASON + 1)] {
            assert_eq!(checked_reason(bad).unwrap_err().code(), "invalid_reason");
        }
        assert!(checked_reason(&"x".repeat(MAX_REASON)).is_ok());
    }

    fn db_with(scopes: &[&str]) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        for (i, s) in scopes.iter().enumerate() {
            conn.execute(
                "INSERT INTO freezes (scope, reason, by, since_ms, seq) VALUES (?1, 'r', 'uid:0', ?2, ?2)",
                params![s, i64::try_from(i).unwrap() + 1],
            )
            .unwrap();
        }
        conn
    }

    #[test]
    fn covering_matches_all_the_agent_or_the_key_and_nothing_else() {
        let scope = |conn: &Connection, agent: &str, key: &str| {
            covering(conn, agent, key).unwrap().map(|f| f.scope)
        };
        let none = db_with(&[]);
        assert_eq!(scope(&none, "dev", "hot"), None);
        let some = db_with(&["agent:other", "key:cold"]);
        assert_eq!(scope(&some, "dev", "hot"), None);
        assert_eq!(scope(&some, "other", "hot").as_deref(), Some("agent:other"));
        assert_eq!(scope(&some, "dev", "cold").as_deref(), Some("key:cold"));
        // A name that only looks like another scope's is not covered.
        assert_eq!(scope(&some, "cold", "other"), None);
        // The oldest of several wins.
        let all = db_with(&["key:hot", "all"]);
        assert_eq!(scope(&all, "dev", "hot").as_deref(), Some("key:hot"));
        assert_eq!(scope(&all, "dev", "cold").as_deref(), Some("all"));
        assert_eq!(list(&all).unwrap().len(), 2);
    }

    #[test]
    fn what_an_agent_is_told_names_scope_and_time_but_not_the_reason() {
        let f = Freeze {
            scope: "agent:dev".into(),
            reason: "secret incident details".into(),
            by: "uid:0".into(),
            since_ms: 0,
            seq: 7,
        };
        let told = Frozen::from(&f).to_string();
        assert!(
            told.contains("agent:dev") && told.contains("1970-01-01"),
            "{told}"
        );
        assert!(!told.contains("secret"), "{told}");
    }
}
