//! Drills recorded (`POST /v1/admin/drills`) and their freshness in health.
//!
//! This module owns the `drills` table (schema version 2): one row per
//! kind (`rotation`, `dr`), the last drill of that kind. Recording a drill
//! is one ledger transaction that writes `drill_completed` and replaces the
//! row, so the table and the chain never disagree. The daemon's clock
//! stamps the time; the drill's report gives only the outcome, the steps
//! and their durations.
//!
//! Health is degraded when the last drill of a kind failed, or is older
//! than [`MAX_DRILL_AGE_DAYS`]; a kind never run is reported as `never`
//! and does not degrade health (a fresh install is not degraded on day
//! one).

use rusqlite::{Connection, params};

use super::Operations;
use crate::ledger::LedgerError;
use crate::ledger::events::{DrillCompleted, DrillStep};

/// A drill older than this many days degrades health (quarterly drills
/// with a week of randomized delay fit inside it).
pub const MAX_DRILL_AGE_DAYS: i64 = 92;
/// The drill kinds.
pub const KINDS: [&str; 2] = ["rotation", "dr"];
/// Most steps a drill may report.
pub const MAX_STEPS: usize = 64;
/// Longest step name, failed step or detail (bytes).
pub const MAX_TEXT: usize = 500;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// A drill's result as the drill reports it (no time: the daemon stamps it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillReport {
    /// `rotation` or `dr`.
    pub kind: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// What was checked or what failed.
    pub detail: Option<String>,
    /// The step that failed (required when `outcome` is `failed`).
    pub failed_step: Option<String>,
    /// Each step: name, outcome, duration.
    pub steps: Vec<DrillStep>,
    /// DR drill: start to first verified signature, ms.
    pub recovery_time_ms: Option<u64>,
    /// Whether it ran on production keys.
    pub live: bool,
}

/// The last drill of a kind, as the `drills` table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastDrill {
    /// `rotation` or `dr`.
    pub kind: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// When it was recorded (Unix ms, the daemon's clock).
    pub completed_ms: i64,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// The step that failed.
    pub failed_step: Option<String>,
    /// Sequence of its `drill_completed` entry.
    pub seq: u64,
}

impl LastDrill {
    /// Whole days since it was recorded, at `now_ms` (0 if in the future).
    pub fn age_days(&self, now_ms: i64) -> i64 {
        (now_ms.saturating_sub(self.completed_ms) / DAY_MS).max(0)
    }

    /// Why this drill degrades health at `now_ms`, if it does.
    pub fn degraded_reason(&self, now_ms: i64) -> Option<String> {
        if self.outcome != "passed" {
            return Some(format!(
                "the last {} drill failed at step {} ({}): fix the cause and run `keyward drill {}` again",
                self.kind,
                self.failed_step.as_deref().unwrap_or("unknown"),
                crate::ledger::format_utc(self.completed_ms),
                self.kind
            ));
        }
        let age = self.age_days(now_ms);
        (now_ms.saturating_sub(self.completed_ms) > MAX_DRILL_AGE_DAYS * DAY_MS).then(|| {
            format!(
                "the last {} drill was on {}, more than {MAX_DRILL_AGE_DAYS} days ago ({age} days): run `keyward drill {}`",
                self.kind,
                crate::ledger::format_utc(self.completed_ms),
                self.kind
            )
        })
    }
}

/// Why a drill was not recorded; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The report is malformed.
    #[error("invalid drill report: {0}")]
    Invalid(String),
    /// The ledger could not record it.
    #[error("the ledger cannot record it, nothing changed: {0}")]
    Ledger(#[from] LedgerError),
}

impl DrillError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            DrillError::Invalid(_) => "invalid_drill",
            DrillError::Ledger(_) => keyward_client::wire::codes::AUDIT_UNAVAILABLE,
        }
    }
}

fn text(what: &str, s: &str) -> Result<(), DrillError> {
    if s.is_empty() || s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(DrillError::Invalid(format!(
            "{what} must be 1-{MAX_TEXT} bytes without control characters"
        )));
    }
    Ok(())
}

fn outcome(what: &str, s: &str) -> Result<(), DrillError> {
    if s == "passed" || s == "failed" {
        Ok(())
    } else {
        Err(DrillError::Invalid(format!(
            "{what} must be `passed` or `failed`, not {s:?}"
        )))
    }
}

impl DrillReport {
    /// Checks the report: a known kind, an outcome, bounded texts and
    /// steps, and a failed step exactly when the drill failed.
    pub fn validate(&self) -> Result<(), DrillError> {
        if !KINDS.contains(&self.kind.as_str()) {
            return Err(DrillError::Invalid(format!(
                "unknown drill kind {:?}: give `rotation` or `dr`",
                self.kind
            )));
        }
        outcome("outcome", &self.outcome)?;
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(DrillError::Invalid(format!(
                "a drill reports 1-{MAX_STEPS} steps, not {}",
                self.steps.len()
            )));
        }
        for s in &self.steps {
            text("a step name", &s.step)?;
            outcome("a step's outcome", &s.outcome)?;
        }
        if let Some(d) = &self.detail {
            text("detail", d)?;
        }
        match (&self.outcome[..], &self.failed_step) {
            ("failed", Some(f)) => text("failed_step", f)?,
            ("failed", None) => {
                return Err(DrillError::Invalid(
                    "a failed drill names its failed_step".into(),
                ));
            }
            (_, Some(_)) => {
                return Err(DrillError::Invalid(
                    "a passed drill has no failed_step".into(),
                ));
            }
            _ => {}
        }
        if self.outcome == "passed" && self.steps.iter().any(|s| s.outcome != "passed") {
            return Err(DrillError::Invalid(
                "a passed drill has only passed steps".into(),
            ));
        }
        Ok(())
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LastDrill> {
    Ok(LastDrill {
        kind: r.get(0)?,
        outcome: r.get(1)?,
        completed_ms: r.get(2)?,
        duration_ms: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        failed_step: r.get(4)?,
        seq: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
    })
}

/// The last drill of each kind that has run, by kind.
pub fn last_drills(conn: &Connection) -> rusqlite::Result<Vec<LastDrill>> {
    conn.prepare_cached(
        "SELECT kind, outcome, completed_ms, duration_ms, failed_step, seq FROM drills ORDER BY kind",
    )?
    .query_map([], row)?
    .collect()
}

impl Operations {
    /// Records a drill on an operator's (`by`'s) request: `drill_completed`
    /// and the kind's `drills` row in one ledger transaction, stamped with
    /// the daemon's clock. An invalid report changes nothing.
    pub async fn record_drill(
        &self,
        report: DrillReport,
        by: &str,
    ) -> Result<LastDrill, DrillError> {
        report.validate()?;
        let kind = report.kind.clone();
        let failed_step = report.failed_step.clone();
        let duration_ms = report.duration_ms;
        let detail = report
            .detail
            .clone()
            .map(|d| format!("{d} (recorded by {by})"))
            .or_else(|| Some(format!("recorded by {by}")));
        let event = DrillCompleted {
            drill: report.kind,
            outcome: report.outcome,
            duration_ms: report.duration_ms,
            detail,
            failed_step: report.failed_step,
            steps: report.steps,
            recovery_time_ms: report.recovery_time_ms,
            live: report.live,
        };
        let last = self
            .core
            .ledger
            .write(move |txn| {
                let entry = txn.record(None, None, &event)?;
                let completed_ms = txn.now_ms();
                let seq = i64::try_from(entry.seq.0).map_err(|_| LedgerError::Exhausted)?;
                let duration = i64::try_from(duration_ms).unwrap_or(i64::MAX);
                txn.conn().execute(
                    "INSERT INTO drills (kind, outcome, completed_ms, duration_ms, failed_step, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (kind) DO UPDATE SET outcome = excluded.outcome,
                       completed_ms = excluded.completed_ms, duration_ms = excluded.duration_ms,
                       failed_step = excluded.failed_step, seq = excluded.seq",
                    params![kind, event.outcome, completed_ms, duration, failed_step, seq],
                )?;
                Ok(LastDrill {
                    kind,
                    outcome: event.outcome.clone(),
                    completed_ms,
                    duration_ms,
                    failed_step,
                    seq: entry.seq.0,
                })
            })
            .await?;
        tracing::warn!(kind = %last.kind, outcome = %last.outcome, seq = last.seq, "drill recorded");
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn step(name: &str, outcome: &str) -> DrillStep {
        DrillStep {
            step: name.into(),
            outcome: outcome.into(),
            duration_ms: 1,
        }
    }

    fn report() -> DrillReport {
        DrillReport {
            kind: "dr".into(),
            outcome: "passed".into(),
            duration_ms: 10,
            detail: None,
            failed_step: None,
            steps: vec![step("verify", "passed")],
            recovery_time_ms: Some(5),
            live: false,
        }
    }

    #[test]
    fn a_well_formed_report_passes_and_malformed_ones_are_refused() {
        report().validate().unwrap();
        type Change = Box<dyn Fn(&mut DrillReport)>;
        let bad: Vec<Change> = vec![
            Box::new(|r| r.kind = "recovery".into()),
            Box::new(|r| r.outcome = "ok".into()),
            Box::new(|r| r.steps.clear()),
            Box::new(|r| r.steps = vec![step("s", "passed"); MAX_STEPS + 1]),
            Box::new(|r| r.steps = vec![step("", "passed")]),
            Box::new(|r| r.steps = vec![step("a\nb", "passed")]),
            Box::new(|r| r.steps = vec![step("s", "failed")]),
            Box::new(|r| r.failed_step = Some("s".into())),
            Box::new(|r| r.outcome = "failed".into()),
            Box::new(|r| r.detail = Some("x".repeat(MAX_TEXT + 1))),
        ];
        for (i, change) in bad.iter().enumerate() {
            let mut r = report();
            change(&mut r);
            assert_eq!(
                r.validate().unwrap_err().code(),
                "invalid_drill",
                "case {i}"
            );
        }
        let mut failed = report();
        failed.outcome = "failed".into();
        failed.failed_step = Some("verify".into());
        failed.steps = vec![step("verify", "failed")];
        failed.validate().unwrap();
    }

    #[test]
    fn health_degrades_for_a_failed_drill_or_one_older_than_92_days() {
        let now = 1_000 * DAY_MS;
        let mut d = LastDrill {
            kind: "dr".into(),
            outcome: "passed".into(),
            completed_ms: now - MAX_DRILL_AGE_DAYS * DAY_MS,
            duration_ms: 1,
            failed_step: None,
            seq: 1,
        };
        assert_eq!(d.degraded_reason(now), None, "exactly 92 days is fresh");
        d.completed_ms -= 1;
        let why = d.degraded_reason(now).unwrap();
        assert!(why.contains("more than 92 days ago"), "{why}");
        d.completed_ms = now;
        d.outcome = "failed".into();
        d.failed_step = Some("verify".into());
        let why = d.degraded_reason(now).unwrap();
        assert!(why.contains("failed at step verify"), "{why}");
    }
}
