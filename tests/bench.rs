//! `keyward bench --json` end to end (short phases): it builds its own
//! scratch instance, drives a real keywardd and prints every figure the
//! performance issue asks for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn bench_json_prints_every_figure_and_signs_without_errors() {
    let out = Command::new(KEYWARD)
        .args(["bench", "--json", "--duration", "1.5", "--clients", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keyward bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    for field in [
        "raw_hsm_per_s",
        "end_to_end_per_s",
        "ratio",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "p99_ms_at_80pct",
        "ledger_entries_per_s",
        "keyward_cpu_us_per_intent",
    ] {
        let x = v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {v}"));
        assert!(x.is_finite(), "{field} = {x}");
    }
    assert!(v["backend"].as_str().unwrap().starts_with("pkcs11"));
    assert_eq!(v["clients"], 3);
    assert_eq!(v["errors"], 0, "{v}");
    let raw = v["raw_hsm_per_s"].as_f64().unwrap();
    let e2e = v["end_to_end_per_s"].as_f64().unwrap();
    assert!(raw > 0.0 && e2e > 0.0, "{v}");
    assert!((v["ratio"].as_f64().unwrap() - e2e / raw).abs() < 1e-9);
    assert!(v["p50_ms"].as_f64().unwrap() <= v["p99_ms"].as_f64().unwrap());
    assert!(v["p99_ms"].as_f64().unwrap() <= v["p999_ms"].as_f64().unwrap());
    assert!(v["ledger_entries_per_s"].as_f64().unwrap() > 0.0);
    // The scratch instance is gone afterwards.
    let scratch = v["scratch_dir"].as_str().unwrap();
    assert!(scratch.contains("keyward-bench-"));
    assert!(
        !std::path::Path::new(scratch).exists(),
        "{scratch} was removed"
    );
}
