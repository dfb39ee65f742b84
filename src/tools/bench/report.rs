//! The figures of one benchmark run and the table `keyward bench` prints.

use serde::Serialize;

/// Figures of one run. Rates are per second, latencies in milliseconds,
/// CPU in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// HSM backend (`pkcs11`) and module.
    pub backend: String,
    /// Concurrent clients in the end-to-end phase.
    pub clients: usize,
    /// Signing threads in the raw phase.
    pub threads: usize,
    /// Cores of this machine.
    pub cores: usize,
    /// Length of each end-to-end phase in seconds.
    pub duration_s: f64,
    /// (a) Signatures per second directly through the backend.
    pub raw_hsm_per_s: f64,
    /// CPU time of this process per raw signature.
    pub raw_hsm_cpu_us_per_sign: f64,
    /// (b) Signed intents per second through keywardd.
    pub end_to_end_per_s: f64,
    /// `end_to_end_per_s / raw_hsm_per_s`.
    pub ratio: f64,
    /// Latency percentiles at the maximum rate.
    pub p50_ms: f64,
    /// 99th percentile at the maximum rate.
    pub p99_ms: f64,
    /// 99.9th percentile at the maximum rate.
    pub p999_ms: f64,
    /// (c) The offered rate of the 80 % phase.
    pub rate_at_80pct_per_s: f64,
    /// What was answered per second at that rate.
    pub achieved_at_80pct_per_s: f64,
    /// Median latency at 80 % of the maximum rate.
    pub p50_ms_at_80pct: f64,
    /// 99th percentile at 80 % of the maximum rate.
    pub p99_ms_at_80pct: f64,
    /// 99.9th percentile at 80 % of the maximum rate.
    pub p999_ms_at_80pct: f64,
    /// (d) Ledger entries appended per second by concurrent writers.
    pub ledger_entries_per_s: f64,
    /// Most jobs one ledger commit held in the ledger phase.
    pub ledger_largest_batch: u64,
    /// keywardd's CPU per signed intent, everything included (on SoftHSM
    /// that includes the signature, which runs inside keywardd).
    pub keywardd_cpu_us_per_intent: f64,
    /// keywardd's CPU per signed intent minus the CPU one raw signature
    /// took: keyward's own work (HTTP, decoding, policy, verification,
    /// ledger).
    pub keyward_cpu_us_per_intent: f64,
    /// The load generator's CPU per intent (the client side).
    pub client_cpu_us_per_intent: f64,
    /// Durable ledger commits keywardd made during the maximum-rate phase.
    pub commits_during_max: u64,
    /// Requests that did not end in a signature (must be 0).
    pub errors: u64,
    /// What the first of them got instead (none when `errors` is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Entries in the ledger before the run.
    pub prefilled_entries: u64,
    /// Entries in the ledger after the run.
    pub ledger_entries: u64,
    /// `keyward audit verify` speed over the whole ledger after the run.
    pub audit_verify_entries_per_s: f64,
    /// Where the scratch instance was (removed after the run).
    pub scratch_dir: String,
}

/// Percentile `p` (0..1) of sorted latencies in microseconds, in ms.
pub(super) fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

impl BenchReport {
    /// The human-readable table, with the targets.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |what: &str, value: String, target: &str| {
            t.push_str(&format!("{what:<44} {value:>14}   {target}\n"));
        };
        row("backend", self.backend.clone(), "");
        row(
            "cores / signing threads / clients",
            format!("{} / {} / {}", self.cores, self.threads, self.clients),
            "",
        );
        row(
            "(a) raw HSM signatures per s",
            format!("{:.0}", self.raw_hsm_per_s),
            "",
        );
        row(
            "    CPU per raw signature (µs)",
            format!("{:.0}", self.raw_hsm_cpu_us_per_sign),
            "",
        );
        row(
            "(b) end-to-end signed intents per s",
            format!("{:.0}", self.end_to_end_per_s),
            "",
        );
        row(
            "    ratio end-to-end / raw",
            format!("{:.2}", self.ratio),
            "target >= 0.6",
        );
        row(
            "    latency p50 / p99 / p99.9 (ms)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                self.p50_ms, self.p99_ms, self.p999_ms
            ),
            "",
        );
        row(
            "(c) offered at 80 % (per s)",
            format!("{:.0}", self.rate_at_80pct_per_s),
            "",
        );
        row(
            "    answered per s",
            format!("{:.0}", self.achieved_at_80pct_per_s),
            "",
        );
        row(
            "    latency p50 / p99 / p99.9 (ms)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                self.p50_ms_at_80pct, self.p99_ms_at_80pct, self.p999_ms_at_80pct
            ),
            "target p99 <= 15",
        );
        row(
            "(d) ledger entries per s",
            format!("{:.0}", self.ledger_entries_per_s),
            "",
        );
        row(
            "    largest commit (entries)",
            format!("{}", self.ledger_largest_batch),
            "",
        );
        row(
            "keywardd CPU per intent, total (µs)",
            format!("{:.0}", self.keywardd_cpu_us_per_intent),
            "",
        );
        row(
            "keyward CPU per intent, w/o signature (µs)",
            format!("{:.0}", self.keyward_cpu_us_per_intent),
            "target <= 100",
        );
        row(
            "client CPU per intent (µs)",
            format!("{:.0}", self.client_cpu_us_per_intent),
            "",
        );
        row(
            "ledger commits in (b)",
            format!("{}", self.commits_during_max),
            "",
        );
        row(
            "ledger entries before / after the run",
            format!("{} / {}", self.prefilled_entries, self.ledger_entries),
            "",
        );
        row(
            "audit verify, entries per s",
            format!("{:.0}", self.audit_verify_entries_per_s),
            "target >= 100000",
        );
        row("errors", format!("{}", self.errors), "must be 0");
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=1000).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 500.0);
        assert_eq!(percentile_ms(&v, 0.99), 990.0);
        assert_eq!(percentile_ms(&v, 0.999), 999.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        assert_eq!(percentile_ms(&[7000], 0.999), 7.0);
    }
}
