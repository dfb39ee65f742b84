//! Drills: `keyward drill dr` (disaster recovery: restore the latest
//! backup into a scratch instance and prove it signs with the original
//! keys) and `keyward drill rotation` (rotate a scratch key end to end).
//!
//! A drill is a list of named steps run in order ([`Run`]); the first that
//! fails ends the drill, which then fails naming that step. Every drill
//! ends with a [`Report`], written as JSON and as text
//! ([`Report::write`]) and recorded in production's ledger as
//! `drill_completed` (the CLI posts it to `POST /v1/admin/drills`).
//!
//! Drills never touch production's keys or ledger: they run on scratch
//! instances in a temporary directory, each with its own keywardd
//! ([`scratch::ScratchDaemon`]). The one exception is asked for by name:
//! [`rotation::run_live`] (`keyward drill rotation --live KEY`) rotates a
//! production key through the admin socket.

pub mod checks;
pub mod dr;
pub mod rotation;
pub mod scratch;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Why a drill step failed: the step and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {step} failed: {message}")]
pub struct StepFailed {
    /// The step's name.
    pub step: String,
    /// What went wrong (names the file at fault where there is one).
    pub message: String,
}

/// Why a drill could not run at all (before any step), or its report not
/// be written.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// A usage or environment problem.
    #[error("{0}")]
    Setup(String),
    /// The report could not be written.
    #[error("cannot write the drill report {path}: {source}")]
    Report {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl DrillError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            DrillError::Setup(_) => "drill_setup",
            DrillError::Report { .. } => "drill_report",
        }
    }
}

/// Told about each step as it starts and ends (progress bars on a
/// terminal, plain lines otherwise).
pub trait Progress {
    /// A step begins.
    fn start(&self, step: &str);
    /// A step ended (`ok`), after `ms` milliseconds, with a short note.
    fn finish(&self, step: &str, ok: bool, ms: u64, note: &str);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str) {}
    fn finish(&self, _: &str, _: bool, _: u64, _: &str) {}
}

/// One step of a drill's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// Step name.
    pub step: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// What it found.
    pub detail: String,
}

/// A drill's report (`drill-<kind>-<time>.json` and `.txt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `rotation` or `dr`.
    pub drill: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// When it started (UTC, RFC 3339).
    pub started_at: String,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// The step that failed, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// What failed, if anything did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every step run, in order.
    pub steps: Vec<StepReport>,
    /// DR drill: ms from the drill's start to the first signature verified
    /// under the original key on the restored instance (the recovery
    /// time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_time_ms: Option<u64>,
    /// Whether it touched production keys.
    pub live: bool,
    /// Facts worth keeping (backup used, keys checked, ledger head ...).
    pub facts: Vec<String>,
    /// Sequence number of the `drill_completed` entry in production's
    /// ledger, once recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_seq: Option<u64>,
}

impl Report {
    /// The readable text form.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "keyward {} drill: {} ({} ms, started {})",
            self.drill,
            self.outcome.to_uppercase(),
            self.duration_ms,
            self.started_at
        );
        if let Some(rto) = self.recovery_time_ms {
            let _ = writeln!(
                s,
                "recovery time: {rto} ms (start to first verified signature)"
            );
        }
        if let Some(step) = &self.failed_step {
            let _ = writeln!(
                s,
                "FAILED at step {step}: {}",
                self.error.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(s, "steps:");
        for st in &self.steps {
            let _ = writeln!(
                s,
                "  {:<8} {:<24} {:>8} ms  {}",
                st.outcome, st.step, st.duration_ms, st.detail
            );
        }
        if !self.facts.is_empty() {
            let _ = writeln!(s, "facts:");
            for f in &self.facts {
                let _ = writeln!(s, "  {f}");
            }
        }
        if let Some(seq) = self.ledger_seq {
            let _ = writeln!(s, "recorded in the ledger as drill_completed entry {seq}");
        }
        s
    }

    /// Writes `drill-<kind>-<started>.json` and `.txt` into `dir`
    /// (created 0700 if missing); returns both paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), DrillError> {
        use std::os::unix::fs::DirBuilderExt;
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DrillError::Report { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err(dir))?;
        let stamp: String = self
            .started_at
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let base = format!("drill-{}-{stamp}", self.drill);
        let json = dir.join(format!("{base}.json"));
        let text = dir.join(format!("{base}.txt"));
        let body = serde_json::to_vec_pretty(self).map_err(|e| DrillError::Report {
            path: json.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&json, body).map_err(err(&json))?;
        std::fs::write(&text, self.text()).map_err(err(&text))?;
        Ok((json, text))
    }
}

/// A drill in progress: runs steps in order, timing each, and stops at the
/// first that fails.
pub struct Run<'a> {
    drill: &'static str,
    live: bool,
    started: Instant,
    started_at: String,
    steps: Vec<StepReport>,
    facts: Vec<String>,
    failed: Option<StepFailed>,
    recovery_time_ms: Option<u64>,
    progress: &'a dyn Progress,
}

impl<'a> Run<'a> {
    /// Starts drill `drill` (`rotation` or `dr`).
    pub fn new(drill: &'static str, live: bool, progress: &'a dyn Progress) -> Run<'a> {
        Run {
            drill,
            live,
            started: Instant::now(),
            started_at: crate::ledger::format_utc(crate::ledger::now_ms()),
            steps: Vec::new(),
            facts: Vec::new(),
            failed: None,
            recovery_time_ms: None,
            progress,
        }
    }

    /// Runs step `name` unless an earlier one failed; its `Ok` is a short
    /// note of what it found, its `Err` what failed. Returns the step's
    /// value, or `None` when it failed or did not run.
    pub fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Vec<String>) -> Result<(T, String), String>,
    ) -> Option<T> {
        if self.failed.is_some() {
            return None;
        }
        self.progress.start(name);
        let t = Instant::now();
        let result = f(&mut self.facts);
        let ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok((value, note)) => {
                self.progress.finish(name, true, ms, &note);
                self.steps.push(StepReport {
                    step: name.to_owned(),
                    outcome: "passed".into(),
                    duration_ms: ms,
                    detail: note,
                });
                Some(value)
            }
            Err(message) => {
                self.progress.finish(name, false, ms, &message);
                self.steps.push(StepReport {
                    step: name.to_owned(),
                    outcome: "failed".into(),
                    duration_ms: ms,
                    detail: message.clone(),
                });
                self.failed = Some(StepFailed {
                    step: name.to_owned(),
                    message,
                });
                None
            }
        }
    }

    /// Marks now as the recovery time (the first verified signature).
    pub fn mark_recovered(&mut self) {
        self.recovery_time_ms = Some(self.elapsed_ms());
    }

    /// Milliseconds since the drill started.
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a step failed.
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The finished drill's report.
    pub fn finish(self) -> Report {
        let duration_ms = self.elapsed_ms();
        Report {
            drill: self.drill.to_owned(),
            outcome: if self.failed.is_some() {
                "failed"
            } else {
                "passed"
            }
            .to_owned(),
            started_at: self.started_at,
            duration_ms,
            failed_step: self.failed.as_ref().map(|f| f.step.clone()),
            error: self.failed.map(|f| f.message),
            steps: self.steps,
            recovery_time_ms: self.recovery_time_ms,
            live: self.live,
            facts: self.facts,
            ledger_seq: None,
        }
    }
}

impl Report {
    /// What production's ledger records of it (`POST /v1/admin/drills`).
    pub fn record_request(&self) -> keyward_client::wire::DrillRecordRequest {
        let clip = |s: &str| -> String {
            let cleaned: String = s.chars().filter(|c| !c.is_control()).collect();
            let mut end = cleaned.len().min(crate::service::drills::MAX_TEXT);
            while !cleaned.is_char_boundary(end) {
                end -= 1;
            }
            cleaned[..end].to_owned()
        };
        keyward_client::wire::DrillRecordRequest {
            kind: self.drill.clone(),
            outcome: self.outcome.clone(),
            duration_ms: self.duration_ms,
            detail: self.error.as_deref().map(clip).filter(|s| !s.is_empty()),
            failed_step: self.failed_step.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| keyward_client::wire::DrillStepView {
                    step: s.step.clone(),
                    outcome: s.outcome.clone(),
                    duration_ms: s.duration_ms,
                })
                .collect(),
            recovery_time_ms: self.recovery_time_ms,
            live: self.live,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_run_stops_at_the_first_failed_step_and_names_it() {
        let mut run = Run::new("dr", false, &Quiet);
        assert_eq!(run.step("one", |_| Ok((1, "fine".into()))), Some(1));
        assert_eq!(
            run.step::<()>("two", |_| Err("ledger/ledger.sqlite3: changed".into())),
            None
        );
        let mut ran = false;
        assert_eq!(
            run.step("three", |_| {
                ran = true;
                Ok(((), String::new()))
            }),
            None
        );
        assert!(!ran, "a step after a failure must not run");
        let report = run.finish();
        assert_eq!(report.outcome, "failed");
        assert_eq!(report.failed_step.as_deref(), Some("two"));
        assert_eq!(report.steps.len(), 2);
        assert!(
            report
                .text()
                .contains("FAILED at step two: ledger/ledger.sqlite3")
        );
        let req = report.record_request();
        assert_eq!(req.failed_step.as_deref(), Some("two"));
        assert_eq!(req.steps[1].outcome, "failed");
    }
}
