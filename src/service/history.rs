//! The trust anchor of the audit history in keywardd: at start the whole
//! history is verified against the HSM's own audit key, the checkpoint kept
//! in the HSM and what the mirror acknowledged; while running, a break
//! found later stops signing ([`HistoryGate`]).

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;
use crate::hsm::{Hsm, HsmError, HsmKey};
use crate::ledger::checkpoint::{self, AUDIT_KEY, MARK_LABEL, Mark};
use crate::ledger::{
    Expectations, HistoryReport, Ledger, LedgerError, TrustedKey, VerifyError, Walker,
};
use crate::types::KeyName;

/// Whether the history verified so far holds. Once broken, it stays broken
/// until keywardd is restarted (and refuses to start on the break unless an
/// operator acknowledges it).
#[derive(Debug, Default)]
pub struct HistoryGate {
    broken: Mutex<Option<String>>,
    verified_seq: AtomicU64,
}

impl HistoryGate {
    /// `Err` with what is wrong while the history is broken.
    pub fn check(&self) -> Result<(), String> {
        match &*lock(&self.broken) {
            Some(problem) => Err(problem.clone()),
            None => Ok(()),
        }
    }

    /// Marks the history broken: signing stops.
    pub fn trip(&self, problem: String) {
        tracing::error!(%problem, "the audit history is broken; signing stopped");
        let mut b = lock(&self.broken);
        if b.is_none() {
            *b = Some(problem);
        }
    }

    /// Records that the history is verified through `seq`.
    pub fn verified_through(&self, seq: u64) {
        self.verified_seq.fetch_max(seq, Ordering::SeqCst);
    }

    /// The last verified sequence number.
    pub fn verified_seq(&self) -> u64 {
        self.verified_seq.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Why keywardd refuses to start on its history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The history is broken at `seq`.
    #[error(
        "the audit history is broken: {source}. keywardd will not extend it. Investigate with `keyward audit verify`; \
         to run anyway on this history, start keywardd once with --accept-broken-history {seq} (recorded in the ledger)"
    )]
    Broken {
        /// First broken sequence number.
        seq: u64,
        /// The finding.
        source: VerifyError,
    },
    /// The HSM's audit key is not the one pinned at set-up.
    #[error(
        "the HSM's audit key {hsm} is not the key pinned in {path}: {pinned}. Checkpoints would not verify for auditors; \
         use the HSM this signer was set up with, or re-pin deliberately"
    )]
    KeyMismatch {
        /// The pin file.
        path: PathBuf,
        /// The pinned verifier key.
        pinned: String,
        /// The HSM's verifier key.
        hsm: String,
    },
    /// The audit key is missing although the history needs it.
    #[error("the HSM has no audit key {AUDIT_KEY:?}, but {0}; refusing to make a new one")]
    AuditKeyMissing(String),
    /// The pinned key file or the HSM's checkpoint mark is unreadable.
    #[error("{0}")]
    Anchor(String),
    /// HSM failure.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// Ledger failure.
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
}

impl HistoryError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            HistoryError::Broken { .. } => "ledger_history_broken",
            HistoryError::KeyMismatch { .. } => "audit_key_mismatch",
            HistoryError::AuditKeyMissing(_) => "audit_key_missing",
            HistoryError::Anchor(_) => "audit_anchor_invalid",
            HistoryError::Hsm(e) => e.code(),
            HistoryError::Ledger(e) => e.code(),
        }
    }
}

/// What the start-up check established.
#[derive(Debug)]
pub struct Established {
    /// The audit key.
    pub key: HsmKey,
    /// Whether it was generated now (a fresh install).
    pub generated: bool,
    /// The verifier, positioned at the head.
    pub walker: Walker,
    /// The report, when the history verified.
    pub report: Option<HistoryReport>,
    /// The break an operator acknowledged: (first broken seq, finding).
    pub acknowledged: Option<(u64, String)>,
    /// The pinned key file, when there is none yet.
    pub unpinned: Option<PathBuf>,
}

/// The verifier key of the HSM's audit key.
pub fn audit_vkey(key: &HsmKey) -> String {
    checkpoint::verifier_key(AUDIT_KEY, &key.public_key)
}

/// Finds (or, on a fresh install, generates) the audit key, checks it
/// against the pinned key, and verifies the whole history against it, the
/// checkpoint kept in the HSM and what the mirror acknowledged. Blocking.
/// `accept_break`: the first broken sequence number an operator
/// acknowledged for this start.
pub fn establish(
    hsm: &dyn Hsm,
    ledger: &Ledger,
    cfg: &Config,
    accept_break: Option<u64>,
) -> Result<Established, HistoryError> {
    let pin_path = cfg.audit_vkey_path();
    let pinned = if pin_path.exists() {
        Some(TrustedKey::from_file(&pin_path).map_err(HistoryError::Anchor)?)
    } else {
        None
    };
    let name = KeyName::new(AUDIT_KEY).map_err(|e| HistoryError::Anchor(e.to_string()))?;
    let marks = hsm.load_data(MARK_LABEL)?;
    let conn = ledger.reader()?;
    let (key, generated) = match hsm.find_ed25519(&name) {
        Ok(k) => (k, false),
        Err(HsmError::KeyNotFound(_)) => {
            let has_checkpoint = crate::ledger::latest_checkpoint(&conn)?.is_some();
            let why = if has_checkpoint {
                Some("the ledger has checkpoints signed by it".to_owned())
            } else if !marks.is_empty() {
                Some("the HSM keeps a checkpoint signed by it".to_owned())
            } else {
                pinned
                    .as_ref()
                    .map(|_| format!("its verifier key is pinned in {}", pin_path.display()))
            };
            if let Some(why) = why {
                return Err(HistoryError::AuditKeyMissing(why));
            }
            (hsm.generate_ed25519(&name)?, true)
        }
        Err(e) => return Err(e.into()),
    };
    let vkey = audit_vkey(&key);
    if let Some(p) = &pinned
        && p.vkey() != vkey
    {
        return Err(HistoryError::KeyMismatch {
            path: pin_path,
            pinned: p.vkey().to_owned(),
            hsm: vkey,
        });
    }
    let trusted = TrustedKey::new(&vkey, "the HSM's audit key").map_err(HistoryError::Anchor)?;
    let mark = Mark::newest(&marks, &vkey).map_err(HistoryError::Anchor)?;
    let mirror_acked = crate::mirror::highest_ack(cfg);
    let expect = Expectations { mark, mirror_acked };
    let unpinned = pinned.is_none().then_some(pin_path);
    match crate::ledger::verify_history_conn(&conn, &trusted, &expect) {
        Ok((report, walker)) => Ok(Established {
            key,
            generated,
            walker,
            report: Some(report),
            acknowledged: None,
            unpinned,
        }),
        Err(VerifyError::Read(e)) => Err(e.into()),
        Err(source @ VerifyError::Broken { .. }) => {
            let seq = source.broken_seq().unwrap_or(0);
            if accept_break != Some(seq) {
                return Err(HistoryError::Broken { seq, source });
            }
            tracing::warn!(seq, finding = %source, "starting on a broken history, as the operator acknowledged");
            let walker = Walker::accept_stored(&conn, trusted)
                .map_err(|e| HistoryError::Broken { seq, source: e })?;
            Ok(Established {
                key,
                generated,
                walker,
                report: None,
                acknowledged: Some((seq, source.to_string())),
                unpinned,
            })
        }
    }
}
