//! `keyward audit verify`: the whole history against a trusted audit key,
//! the checkpoint kept in the HSM and the mirror's copy.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use keyward::config::Config;

use super::db_path;
use crate::{Failure, admin_runtime};

/// Where the audit key is pinned when no config says otherwise.
const DEFAULT_AUDIT_VKEY: &str = "/etc/keyward/audit.vkey";

/// Verifies the ledger `db` (or the config's); exit 1 names the first broken entry.
pub(super) fn run(
    config: &Path,
    db: Option<PathBuf>,
    vkey: Option<String>,
    vkey_file: Option<PathBuf>,
    hsm: bool,
    mirror: Option<String>,
    allowed_lag: u64,
) -> Result<(), Failure> {
    let db = db_path(config, db)?;
    let trusted = trusted_audit_key(config, vkey, vkey_file)?;
    let expect = history_expectations(config, hsm, &trusted)?;
    match keyward::ledger::verify_history(&db, &trusted, &expect) {
        Ok(history) => {
            let report = &history.chain;
            println!(
                "ok: {} entries verified, head seq {} hash {}",
                report.entries,
                report.head_seq,
                hex::encode(report.head_hash)
            );
            println!(
                "ok: {} checkpoints signed by the trusted audit key {} (from {}); the newest covers entries 1..{}",
                history.checkpoints,
                trusted.vkey(),
                trusted.source(),
                history.checkpointed
            );
            let conn = keyward::ledger::open_read_only(&db)?;
            let findings = keyward::ledger::payload_findings(&conn)?;
            if let Some(f) = findings.first() {
                return Err(Failure(
                    1,
                    anyhow!(
                        "ledger {} is BROKEN: {} entries do not read as their event type; the first is entry {} ({}): {}",
                        db.display(),
                        findings.len(),
                        f.seq,
                        f.event,
                        f.problem
                    ),
                ));
            }
            println!("ok: every entry reads as the document of its event type");
            if let Some(m) = &expect.mark {
                println!(
                    "ok: the history contains the checkpoint kept in the HSM ({} entries, entry {})",
                    m.size, m.seq
                );
            }
            if let Some((acked, sink)) = &expect.mirror_acked {
                println!(
                    "ok: the history reaches entry {acked}, which the mirror {sink} acknowledged"
                );
            }
            if history.uncovered() > 0 {
                println!(
                    "note: entries {}..{} are not covered by a signed checkpoint yet; only the mirror can vouch for them (--mirror)",
                    history.checkpointed + 1,
                    report.entries
                );
            }
            if let Some(m) = mirror {
                compare_mirror(config, &db, &m, allowed_lag)?;
            }
            Ok(())
        }
        Err(e) if e.is_finding() => Err(Failure(
            1,
            anyhow!("ledger {} is BROKEN: {e}", db.display()),
        )),
        Err(e) => Err(Failure(2, anyhow!("cannot verify {}: {e}", db.display()))),
    }
}

/// The audit key `audit verify` trusts: `--vkey`, `--vkey-file`, or the key
/// pinned at set-up. Never a key found in the database.
fn trusted_audit_key(
    cli_config: &Path,
    vkey: Option<String>,
    vkey_file: Option<PathBuf>,
) -> Result<keyward::ledger::TrustedKey, Failure> {
    use keyward::ledger::TrustedKey;
    if let Some(v) = vkey {
        return TrustedKey::new(&v, "--vkey").map_err(|e| Failure(2, anyhow!("--vkey: {e}")));
    }
    if let Some(f) = vkey_file {
        return TrustedKey::from_file(&f).map_err(|e| Failure(2, anyhow!(e)));
    }
    let pinned = match Config::load(cli_config) {
        Ok(cfg) => cfg.audit_vkey_path(),
        Err(_) => PathBuf::from(DEFAULT_AUDIT_VKEY),
    };
    if pinned.exists() {
        return TrustedKey::from_file(&pinned).map_err(|e| Failure(2, anyhow!(e)));
    }
    Err(Failure(
        2,
        anyhow!(
            "no trusted audit key: {} does not exist. Give --vkey KEY or --vkey-file FILE with the audit key pinned at set-up \
             (`keyward audit pin`); a key found in the database itself proves nothing",
            pinned.display()
        ),
    ))
}

/// What `audit verify` knows from outside the database: with `--hsm`, the
/// checkpoint kept in the HSM; with a mirror in the config, what it
/// acknowledged.
fn history_expectations(
    cli_config: &Path,
    hsm: bool,
    trusted: &keyward::ledger::TrustedKey,
) -> Result<keyward::ledger::Expectations, Failure> {
    let mut expect = keyward::ledger::Expectations::default();
    let cfg = match Config::load(cli_config) {
        Ok(cfg) => Some(cfg),
        Err(e) if hsm => return Err(Failure(2, anyhow!("--hsm needs the config: {e}"))),
        Err(_) => None,
    };
    let Some(cfg) = cfg else {
        return Ok(expect);
    };
    expect.mirror_acked = keyward::mirror::highest_ack(&cfg);
    if hsm {
        // The module reads its environment when loaded; this process is
        // still single-threaded here.
        keyward::process::apply_module_env(&cfg);
        let device = keyward::daemon::open_hsm(&cfg)
            .map_err(|e| Failure(2, anyhow!("cannot open the HSM: {e}")))?;
        let values = device
            .load_data(keyward::ledger::checkpoint::MARK_LABEL)
            .map_err(|e| Failure(2, anyhow!("cannot read the HSM's checkpoint mark: {e}")))?;
        expect.mark = keyward::ledger::checkpoint::Mark::newest(&values, trusted.vkey())
            .map_err(|e| Failure(1, anyhow!("{e} (with the trusted key {})", trusted.vkey())))?;
        if expect.mark.is_none() {
            println!("note: the HSM keeps no checkpoint yet");
        }
    }
    Ok(expect)
}

/// `--mirror`: compares the ledger `db` with the mirror's copy (`nats`: the
/// stream in `[mirror.nats]`; else `file:///path` or a path); exit 1 when
/// they diverge.
fn compare_mirror(config: &Path, db: &Path, m: &str, allowed_lag: u64) -> Result<(), Failure> {
    let (name, result) = if m == "nats" {
        let cfg = Config::load(config)?;
        let n = cfg
            .mirror
            .and_then(|m| m.nats)
            .ok_or_else(|| Failure(2, anyhow!("no [mirror.nats] in {}", config.display())))?;
        let rt = admin_runtime()?;
        let copy = rt
            .block_on(keyward::mirror::nats::fetch_copy(&n))
            .map_err(|e| Failure(2, anyhow!("cannot read stream {}: {e}", n.stream)))?;
        (
            format!("stream {}", n.stream),
            keyward::mirror::compare_entries(db, &copy, allowed_lag),
        )
    } else {
        let path = PathBuf::from(m.strip_prefix("file://").unwrap_or(m));
        (
            path.display().to_string(),
            keyward::mirror::compare(db, &path, allowed_lag),
        )
    };
    match result {
        Ok(n) => {
            println!("ok: the mirror {name} agrees on {n} entries");
            Ok(())
        }
        Err(Ok(d)) => Err(Failure(1, anyhow!("mirror {name} DIVERGES: {d}"))),
        Err(Err(e)) => Err(Failure(2, anyhow!("cannot compare with {name}: {e}"))),
    }
}
