//! The mirror: ships ledger entries in order, exactly once, to an external
//! append-only copy, and records what it acknowledged; keywardd refuses to
//! sign when the copy falls too far behind. `keyward audit verify --mirror`
//! compares the two.
//!
//! Sinks: an append-only JSON-lines file (`O_APPEND`, `fsync` per batch),
//! and a NATS JetStream stream ([`nats`]). Each copy holds every entry as
//! the JSON line `keyward audit export` prints, so it can be verified on
//! its own.

mod gate;
pub mod nats;

pub use gate::MirrorGate;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::ledger::{Entry, LedgerError, open_read_only};

/// Why the mirror failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A sink could not be written or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The sink's copy does not continue the ledger.
    #[error("{0}")]
    Diverged(String),
    /// A sink's password file was refused (loose mode, other owner) or
    /// could not be read.
    #[error("NATS password file: {0}")]
    Secret(#[from] crate::secret_file::SecretFileError),
    /// The mirror's seccomp filter could not be applied: it does not run
    /// unconfined.
    #[error("lockdown: {0}")]
    Lockdown(#[from] crate::harden::seccomp::SeccompError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MirrorError {
    let what = what.into();
    move |source| MirrorError::Io { what, source }
}

/// The acknowledgement file of `sink` (`file`, `nats`) in `ack_dir`.
pub fn ack_path(ack_dir: &Path, sink: &str) -> PathBuf {
    ack_dir.join(format!("{sink}.ack"))
}

/// The sequence number `sink` acknowledged (0 when none).
pub fn read_ack(ack_dir: &Path, sink: &str) -> u64 {
    std::fs::read_to_string(ack_path(ack_dir, sink))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The sinks a mirror configuration names.
pub fn sinks(cfg: &crate::config::MirrorConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if cfg.file.is_some() {
        out.push("file");
    }
    if cfg.nats.is_some() {
        out.push("nats");
    }
    out
}

/// The most any configured sink has acknowledged, and which sink: the
/// ledger must reach at least that far. `None` without a mirror or before
/// any acknowledgement.
pub fn highest_ack(cfg: &crate::config::Config) -> Option<(u64, String)> {
    let m = cfg.mirror.as_ref()?;
    let dir = m
        .ack_dir
        .clone()
        .unwrap_or_else(|| cfg.daemon.state_dir.join("mirror"));
    sinks(m)
        .into_iter()
        .map(|s| (read_ack(&dir, s), s.to_owned()))
        .max()
        .filter(|(acked, _)| *acked > 0)
}

/// What every configured sink has acknowledged: the smallest of their acks.
pub fn min_ack(ack_dir: &Path, sinks: &[&str]) -> u64 {
    sinks
        .iter()
        .map(|s| read_ack(ack_dir, s))
        .min()
        .unwrap_or(0)
}

fn write_ack(ack_dir: &Path, sink: &str, seq: u64) -> Result<(), MirrorError> {
    std::fs::create_dir_all(ack_dir).map_err(io(format!("cannot create {}", ack_dir.display())))?;
    let tmp = ack_dir.join(format!("{sink}.ack.tmp"));
    let mut f = File::create(&tmp).map_err(io("cannot write the ack file"))?;
    writeln!(f, "{seq}").map_err(io("cannot write the ack file"))?;
    f.sync_all().map_err(io("cannot sync the ack file"))?;
    std::fs::rename(&tmp, ack_path(ack_dir, sink)).map_err(io("cannot replace the ack file"))?;
    File::open(ack_dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync the ack directory"))
}

/// One line of the copy, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedEntry {
    /// Sequence number.
    pub seq: u64,
    /// Entry hash (hex).
    pub hash: String,
    /// The whole line.
    pub line: String,
}

fn parse_line(line: &str) -> Option<CopiedEntry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(CopiedEntry {
        seq: v["seq"].as_u64()?,
        hash: v["hash"].as_str()?.to_owned(),
        line: line.to_owned(),
    })
}

/// Reads the copy. A last line without its newline (a write torn by a
/// crash) is ignored; any other unreadable line is an error.
pub fn read_copy(path: &Path) -> Result<(Vec<CopiedEntry>, u64), MirrorError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io(format!("cannot read {}", path.display()))(e)),
    };
    let mut out = Vec::new();
    let mut good_len = 0u64;
    let mut reader = BufReader::new(f);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(io(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            break; // torn tail
        }
        let entry = parse_line(line.trim_end()).ok_or_else(|| {
            MirrorError::Diverged(format!(
                "{}: line {} is not an entry",
                path.display(),
                out.len() + 1
            ))
        })?;
        out.push(entry);
        good_len += n as u64;
    }
    Ok((out, good_len))
}

/// The file sink.
pub struct FileSink {
    path: PathBuf,
    file: File,
    /// Last sequence number in the file.
    pub last: u64,
}

impl FileSink {
    /// Opens the copy, drops a torn last line, and checks that it is a
    /// prefix of the ledger's sequence (1, 2, 3, … without gaps).
    pub fn open(path: &Path) -> Result<FileSink, MirrorError> {
        let (entries, good_len) = read_copy(path)?;
        for (i, e) in entries.iter().enumerate() {
            if e.seq != i as u64 + 1 {
                return Err(MirrorError::Diverged(format!(
                    "{}: line {} holds entry {}: the copy has a gap or is out of order",
                    path.display(),
                    i + 1,
                    e.seq
                )));
            }
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io(format!("cannot open {}", path.display())))?;
        let len = file.seek(SeekFrom::End(0)).map_err(io("cannot seek"))?;
        if len > good_len {
            // Only a crash mid-write leaves this: drop the torn line.
            file.set_len(good_len)
                .map_err(io("cannot drop a torn last line"))?;
            file.sync_all().map_err(io("cannot sync"))?;
        }
        Ok(FileSink {
            path: path.to_path_buf(),
            file,
            last: entries.last().map_or(0, |e| e.seq),
        })
    }

    /// Appends entries (which must continue the copy) and syncs once.
    pub fn ship(&mut self, entries: &[Entry]) -> Result<(), MirrorError> {
        let mut buf = String::new();
        let mut next = self.last + 1;
        for e in entries {
            if e.seq != next {
                return Err(MirrorError::Diverged(format!(
                    "entry {} does not follow {}",
                    e.seq,
                    next - 1
                )));
            }
            buf.push_str(&e.to_json_line());
            buf.push('\n');
            next += 1;
        }
        self.file
            .write_all(buf.as_bytes())
            .map_err(io(format!("cannot append to {}", self.path.display())))?;
        self.file
            .sync_data()
            .map_err(io(format!("cannot sync {}", self.path.display())))?;
        self.last = next - 1;
        Ok(())
    }
}

/// Runs the mirror until `stop`: ships every new entry to each configured
/// sink in order, then records that sink's acknowledged sequence number. A
/// sink that fails (a NATS server down) is retried; the others go on.
pub fn run(cfg: &crate::config::Config, stop: &AtomicBool) -> Result<(), MirrorError> {
    run_locked(cfg, stop, None)
}

/// [`run`], applying `seccomp` (to every thread) once start-up is done:
/// the runtime built, the file sink opened and checked, its
/// acknowledgement written; before the first entry is read for shipping.
/// `keyward mirror` passes the mirror's filter; tests calling the mirror in
/// their own process pass none.
pub fn run_locked(
    cfg: &crate::config::Config,
    stop: &AtomicBool,
    seccomp: Option<&crate::harden::seccomp::Filter>,
) -> Result<(), MirrorError> {
    let m = cfg
        .mirror
        .clone()
        .ok_or_else(|| MirrorError::Diverged("no [mirror] section".into()))?;
    let db = cfg.ledger_path();
    let ack_dir = m
        .ack_dir
        .clone()
        .unwrap_or_else(|| cfg.daemon.state_dir.join("mirror"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("cannot start the mirror runtime"))?;
    let mut file = match &m.file {
        Some(path) => {
            let sink = FileSink::open(path)?;
            write_ack(&ack_dir, "file", sink.last)?;
            Some(sink)
        }
        None => None,
    };
    let mut nats: Option<nats::NatsSink> = None;
    let mut nats_wait = std::time::Instant::now();
    if let Some(filter) = seccomp {
        filter.apply()?;
        tracing::info!(
            filter = filter.role().name(),
            "seccomp filter applied to every thread"
        );
    }
    while !stop.load(Ordering::SeqCst) {
        let mut shipped = 0;
        if let Some(sink) = file.as_mut() {
            let n = ship_once(&db, sink, 1000)?;
            if n > 0 {
                write_ack(&ack_dir, "file", sink.last)?;
            }
            shipped += n;
        }
        if let Some(ncfg) = &m.nats {
            if nats.is_none() && std::time::Instant::now() >= nats_wait {
                match rt.block_on(nats::NatsSink::connect(ncfg, &db)) {
                    Ok(sink) => {
                        write_ack(&ack_dir, "nats", sink.last)?;
                        nats = Some(sink);
                    }
                    Err(MirrorError::Diverged(d)) => return Err(MirrorError::Diverged(d)),
                    Err(e) => {
                        tracing::warn!(error = %e, "NATS sink unavailable; will retry");
                        nats_wait = std::time::Instant::now() + Duration::from_millis(500);
                    }
                }
            }
            if let Some(sink) = nats.as_mut() {
                let conn = open_read_only(&db)?;
                let entries = crate::ledger::entries_after(&conn, sink.last, 256)?;
                drop(conn);
                if !entries.is_empty() {
                    match rt.block_on(sink.ship(&entries)) {
                        Ok(()) => {
                            write_ack(&ack_dir, "nats", sink.last)?;
                            shipped += entries.len();
                        }
                        Err(MirrorError::Diverged(d)) => return Err(MirrorError::Diverged(d)),
                        Err(e) => {
                            tracing::warn!(error = %e, "shipping to NATS failed; reconnecting");
                            nats = None;
                            nats_wait = std::time::Instant::now() + Duration::from_millis(500);
                        }
                    }
                }
            }
        }
        if shipped == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Ships up to `max` entries after the sink's last one; returns how many.
pub fn ship_once(db: &Path, sink: &mut FileSink, max: usize) -> Result<usize, MirrorError> {
    let conn = open_read_only(db)?;
    let entries = crate::ledger::entries_after(&conn, sink.last, max)?;
    if entries.is_empty() {
        return Ok(0);
    }
    sink.ship(&entries)?;
    Ok(entries.len())
}

/// How a copy differs from the local ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Divergence {
    /// The copy lacks entries after this sequence number.
    MirrorMissingTail {
        /// Last entry in the copy.
        mirror_last: u64,
        /// Last local entry.
        local_last: u64,
    },
    /// The local ledger lacks entries the copy has (rolled back).
    LocalTruncated {
        /// Last local entry.
        local_last: u64,
        /// Last entry in the copy.
        mirror_last: u64,
    },
    /// The same entry differs in content but keeps its hash: one side was
    /// edited.
    Modified {
        /// The entry.
        seq: u64,
    },
    /// Different hashes at the same sequence number: the histories forked.
    Fork {
        /// The first sequence number where they differ.
        seq: u64,
    },
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::MirrorMissingTail {
                mirror_last,
                local_last,
            } => write!(
                f,
                "the mirror is missing a tail: it ends at entry {mirror_last}, the local ledger at {local_last}"
            ),
            Divergence::LocalTruncated {
                local_last,
                mirror_last,
            } => write!(
                f,
                "the local ledger was truncated (rolled back): it ends at entry {local_last}, the mirror has up to {mirror_last}"
            ),
            Divergence::Modified { seq } => write!(
                f,
                "entry {seq} was modified on one side: same hash, different content"
            ),
            Divergence::Fork { seq } => {
                write!(f, "the histories fork at entry {seq}: different hashes")
            }
        }
    }
}

/// Compares the local ledger with the file copy at `copy`. `Ok(n)`: they
/// agree on `n` entries (the copy may lag by at most `allowed_lag`).
pub fn compare(
    db: &Path,
    copy: &Path,
    allowed_lag: u64,
) -> Result<u64, Result<Divergence, MirrorError>> {
    let (copied, _) = read_copy(copy).map_err(Err)?;
    compare_entries(db, &copied, allowed_lag)
}

/// Compares the local ledger with a copy read from any sink.
pub fn compare_entries(
    db: &Path,
    copied: &[CopiedEntry],
    allowed_lag: u64,
) -> Result<u64, Result<Divergence, MirrorError>> {
    let conn = open_read_only(db).map_err(|e| Err(e.into()))?;
    let local = crate::ledger::entries_after(&conn, 0, usize::MAX).map_err(|e| Err(e.into()))?;
    for (i, c) in copied.iter().enumerate() {
        let Some(l) = local.get(i) else {
            return Err(Ok(Divergence::LocalTruncated {
                local_last: local.len() as u64,
                mirror_last: copied.last().map_or(0, |e| e.seq),
            }));
        };
        if c.seq != l.seq || c.hash != hex::encode(l.hash) {
            return Err(Ok(Divergence::Fork { seq: l.seq }));
        }
        if c.line != l.to_json_line() {
            return Err(Ok(Divergence::Modified { seq: l.seq }));
        }
    }
    let local_last = local.len() as u64;
    let mirror_last = copied.len() as u64;
    if local_last > mirror_last + allowed_lag {
        return Err(Ok(Divergence::MirrorMissingTail {
            mirror_last,
            local_last,
        }));
    }
    Ok(mirror_last)
}

/// Parses a line of a copy (for sinks other than the file).
pub fn parse_copied(line: &str) -> Option<CopiedEntry> {
    parse_line(line)
}
