//! What `keyward hsm selftest` found, and how it is printed.

use super::{MOCK_SERIAL, SelftestSettings};

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Proven on this device.
    Pass,
    /// Failed: keywardd should not run on this device as it is.
    Fail(String),
    /// Not provable here (MockHsm does not enforce capabilities or domains).
    NotProvable(String),
}

/// One check run on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// How it went.
    pub outcome: Outcome,
}

/// A check that needs a real device or other credentials: what must hold,
/// and the commands that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualCheck {
    /// What must hold.
    pub what: String,
    /// `yubihsm-shell` commands (they prompt for the password).
    pub commands: Vec<String>,
}

/// What the self-test found.
#[derive(Debug, Clone)]
pub struct SelftestReport {
    /// The settings it ran with.
    pub settings: SelftestSettings,
    /// Whether the device is MockHsm.
    pub mock: bool,
    /// The checks run, in order.
    pub checks: Vec<Check>,
    /// The checks to run by hand.
    pub manual: Vec<ManualCheck>,
    /// Throw-away objects left on the device, with how to delete them.
    pub left: Vec<String>,
}

impl SelftestReport {
    /// Whether no check failed.
    pub fn passed(&self) -> bool {
        !self
            .checks
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Fail(_)))
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.checks.iter().filter(|c| f(&c.outcome)).count()
    }
}

impl std::fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "keyward hsm selftest: {} with authentication key {:#06x}, domains {:?}",
            s.device, s.auth_key_id, s.domains
        )?;
        if self.mock {
            writeln!(
                f,
                "  This is MockHsm (serial {MOCK_SERIAL}): it enforces neither capabilities nor domains, \
                 so the checks that rely on them cannot be proven here."
            )?;
        }
        for c in &self.checks {
            match &c.outcome {
                Outcome::Pass => writeln!(f, "  PASS  {}", c.name)?,
                Outcome::Fail(why) => writeln!(f, "  FAIL  {}: {why}", c.name)?,
                Outcome::NotProvable(why) => writeln!(f, "  MOCK  {}: not proven ({why})", c.name)?,
            }
        }
        if !self.left.is_empty() {
            writeln!(f, "Left on the device:")?;
            for l in &self.left {
                writeln!(f, "  {l}")?;
            }
        }
        if !self.manual.is_empty() {
            writeln!(
                f,
                "Manual checks on real hardware (once per device; yubihsm-shell prompts for each password):"
            )?;
            for (i, m) in self.manual.iter().enumerate() {
                writeln!(f, "  {}. {}", i + 1, m.what)?;
                for c in &m.commands {
                    writeln!(f, "       $ {c}")?;
                }
            }
        }
        writeln!(
            f,
            "Summary: {} passed, {} failed, {} not provable on MockHsm, {} to check by hand",
            self.count(|o| *o == Outcome::Pass),
            self.count(|o| matches!(o, Outcome::Fail(_))),
            self.count(|o| matches!(o, Outcome::NotProvable(_))),
            self.manual.len()
        )
    }
}
