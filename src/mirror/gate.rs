//! The mirror gate: how far the external copy of the ledger may fall
//! behind before keywardd stops signing. The signing service asks it before
//! every release; `GET /v1/health` reports its lag.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::ledger::Ledger;

/// How far the external copy of the ledger may fall behind.
#[derive(Debug)]
pub struct MirrorGate {
    ack_dir: std::path::PathBuf,
    sinks: Vec<&'static str>,
    max_entries: u64,
    max_age_ms: i64,
    /// Age of the oldest unacknowledged entry, kept by [`MirrorGate::refresh`].
    oldest_unacked_age_ms: AtomicI64,
}

impl MirrorGate {
    /// A gate over the acknowledgements in `ack_dir`.
    pub fn new(
        ack_dir: std::path::PathBuf,
        sinks: Vec<&'static str>,
        max_entries: u64,
        max_age: std::time::Duration,
    ) -> MirrorGate {
        MirrorGate {
            ack_dir,
            sinks,
            max_entries,
            max_age_ms: i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX),
            oldest_unacked_age_ms: AtomicI64::new(0),
        }
    }

    /// (unacknowledged entries, age of the oldest in ms) now.
    pub fn lag(&self, head_seq: u64) -> (u64, i64) {
        let acked = super::min_ack(&self.ack_dir, &self.sinks);
        let entries = head_seq.saturating_sub(acked);
        let age = if entries == 0 {
            0
        } else {
            self.oldest_unacked_age_ms.load(Ordering::SeqCst)
        };
        (entries, age)
    }

    /// Recomputes the age of the oldest unacknowledged entry.
    pub fn refresh(&self, ledger: &Ledger) {
        let acked = super::min_ack(&self.ack_dir, &self.sinks);
        let age = ledger
            .reader()
            .ok()
            .and_then(|c| {
                c.query_row(
                    "SELECT ts_ms FROM ledger WHERE seq = ?1",
                    [i64::try_from(acked + 1).unwrap_or(i64::MAX)],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
            })
            .map_or(0, |ts| (crate::ledger::now_ms() - ts).max(0));
        self.oldest_unacked_age_ms.store(age, Ordering::SeqCst);
    }

    /// Each sink's acknowledged sequence number.
    pub fn sink_acks(&self) -> Vec<(&'static str, u64)> {
        self.sinks
            .iter()
            .map(|s| (*s, super::read_ack(&self.ack_dir, s)))
            .collect()
    }

    /// `Err` with what is wrong when signing must stop.
    pub fn check(&self, head_seq: u64) -> Result<(), String> {
        let (entries, age) = self.lag(head_seq);
        if entries > self.max_entries {
            return Err(format!(
                "{entries} entries unmirrored, at most {} allowed",
                self.max_entries
            ));
        }
        if age > self.max_age_ms {
            return Err(format!(
                "the oldest unmirrored entry is {} s old, at most {} s allowed",
                age / 1000,
                self.max_age_ms / 1000
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn gate_with_acks(
        acks: &[(&'static str, u64)],
        max_entries: u64,
    ) -> (tempfile::TempDir, MirrorGate) {
        let dir = tempfile::tempdir().unwrap();
        for (sink, seq) in acks {
            std::fs::write(super::super::ack_path(dir.path(), sink), format!("{seq}\n")).unwrap();
        }
        let sinks = acks.iter().map(|(s, _)| *s).collect();
        let gate = MirrorGate::new(
            dir.path().to_path_buf(),
            sinks,
            max_entries,
            Duration::from_secs(60),
        );
        (dir, gate)
    }

    #[test]
    fn signing_stops_when_more_entries_than_allowed_are_unmirrored() {
        let (_dir, gate) = gate_with_acks(&[("file", 3)], 2);
        assert_eq!(gate.check(5), Ok(()));
        let err = gate.check(6).unwrap_err();
        assert!(err.contains("3 entries unmirrored, at most 2"), "{err}");
    }

    #[test]
    fn the_slowest_sink_sets_the_lag() {
        let (_dir, gate) = gate_with_acks(&[("file", 10), ("nats", 4)], 100);
        assert_eq!(gate.lag(12).0, 8);
        assert_eq!(gate.sink_acks(), vec![("file", 10), ("nats", 4)]);
    }
}
