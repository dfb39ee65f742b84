//! The single ledger writer.
//!
//! One thread owns the only writable connection. Work arrives as closures
//! over a [`LedgerTxn`]; the writer takes every job that is waiting, runs
//! each inside its own savepoint of one `BEGIN IMMEDIATE` transaction (so a
//! failing job changes nothing, and later jobs in the batch see the effects
//! of earlier ones), commits once, syncs the write-ahead log once
//! (`fdatasync`, what `synchronous=FULL` would do) when any job in the batch
//! needs durability, and only then answers the callers. A caller therefore
//! never holds a result, such as a signature, whose ledger entry is not
//! durable. Only jobs that release nothing may opt out of the wait
//! ([`LedgerTxn::skip_sync`]); the log is written in order, so the next sync
//! covers them.
//!
//! Write failures are counted; after [`BREAKER_THRESHOLD`] in a row the audit
//! breaker opens and every write is refused until an operator resets it.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::events::{self, LedgerEvent};
use super::{BREAKER_THRESHOLD, EntryRef, EventType, LedgerError, entry_hash};
use crate::types::LedgerSeq;

/// Largest number of jobs committed together.
const MAX_BATCH: usize = 256;

/// Options of [`Ledger::open`].
#[derive(Debug, Clone, Default)]
pub struct LedgerOptions {
    /// How long the writer waits after the first queued job for others to
    /// join its commit (like PostgreSQL's `commit_delay`). Zero (default):
    /// commit whatever is queued at once; under load batches form anyway
    /// while the previous commit's fsync runs.
    pub commit_delay: std::time::Duration,
}

/// Health of the ledger for `/v1/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerHealthState {
    /// Sequence number of the last committed entry (0 when empty).
    pub head_seq: u64,
    /// Whether the audit breaker is open.
    pub breaker_open: bool,
    /// Consecutive failed writes.
    pub consecutive_failures: u32,
    /// Durable commits since the ledger was opened.
    pub commits: u64,
    /// Write jobs those commits contained.
    pub jobs_committed: u64,
    /// Most jobs one commit contained.
    pub largest_batch: u64,
    /// Syncs of the write-ahead log (commits whose answers waited for the
    /// disk).
    pub syncs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    seq: u64,
    hash: [u8; 32],
    ts_ms: i64,
}

/// A transaction of the writer, handed to [`Ledger::write`] closures.
pub struct LedgerTxn<'a> {
    conn: &'a Connection,
    head: Head,
    now_ms: i64,
    sync: bool,
}

impl LedgerTxn<'_> {
    /// Appends `event` as an entry of its type; it becomes durable when
    /// the closure's transaction commits, and is rolled back with it if the
    /// closure fails. The only way entries are written: every payload is
    /// one of the typed documents of [`super::events`].
    pub fn record<E: LedgerEvent>(
        &mut self,
        intent_id: Option<&str>,
        agent: Option<&str>,
        event: &E,
    ) -> Result<EntryRef, LedgerError> {
        let payload = events::encode(event)?;
        self.append_bytes(E::TYPE, intent_id, agent, &payload)
    }

    /// Appends an entry with raw payload bytes: tests that build histories
    /// of any shape.
    #[cfg(test)]
    pub(crate) fn append(
        &mut self,
        event: EventType,
        intent_id: Option<&str>,
        agent: Option<&str>,
        payload: &[u8],
    ) -> Result<EntryRef, LedgerError> {
        self.append_bytes(event, intent_id, agent, payload)
    }

    fn append_bytes(
        &mut self,
        event: EventType,
        intent_id: Option<&str>,
        agent: Option<&str>,
        payload: &[u8],
    ) -> Result<EntryRef, LedgerError> {
        #[cfg(feature = "test-hooks")]
        crate::faults::ledger_append(event)?;
        let seq = self.head.seq.checked_add(1).ok_or(LedgerError::Exhausted)?;
        let seq_i64 = i64::try_from(seq).map_err(|_| LedgerError::Exhausted)?;
        let ts_ms = self.now_ms.max(self.head.ts_ms);
        let hash = entry_hash(
            seq,
            &self.head.hash,
            ts_ms,
            event.as_str(),
            intent_id,
            agent,
            payload,
        );
        self.conn
            .prepare_cached(
                "INSERT INTO ledger (seq, ts_ms, event, intent_id, agent, payload, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                seq_i64,
                ts_ms,
                event.as_str(),
                intent_id,
                agent,
                payload,
                &self.head.hash[..],
                &hash[..]
            ])?;
        self.head = Head { seq, hash, ts_ms };
        Ok(EntryRef {
            seq: LedgerSeq(seq),
            hash,
        })
    }

    /// The connection, for the tables that live beside the chain.
    pub fn conn(&self) -> &Connection {
        self.conn
    }

    /// Lets this job be answered once its transaction has committed,
    /// without waiting for the write-ahead log to reach the disk. Only for
    /// jobs whose outcome releases nothing to anyone (an allowed decision
    /// before signing): the next synced commit, which any released
    /// signature waits for, makes these entries durable too, because the
    /// log is written in order. A crash before that loses only decisions
    /// whose signatures were never released. Every other job is synced
    /// before its answer (the default).
    pub fn skip_sync(&mut self) {
        self.sync = false;
    }

    /// The transaction's clock (milliseconds since the Unix epoch), never
    /// earlier than the last entry's.
    pub fn now_ms(&self) -> i64 {
        self.now_ms.max(self.head.ts_ms)
    }
}

type AnyResult = Result<Box<dyn Any + Send>, LedgerError>;
type JobFn = Box<dyn FnOnce(&mut LedgerTxn<'_>) -> AnyResult + Send>;

enum Reply {
    Async(oneshot::Sender<AnyResult>),
    Blocking(mpsc::SyncSender<AnyResult>),
}

impl Reply {
    fn send(self, r: AnyResult) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

enum Job {
    Write {
        f: JobFn,
        reply: Reply,
        bypass_breaker: bool,
    },
    /// A round trip through the writer thread: answered once the batch it
    /// arrived with is committed (see [`Ledger::ping`]).
    Ping(Reply),
    Close(Reply),
}

struct Shared {
    path: PathBuf,
    head_seq: AtomicU64,
    breaker_open: AtomicBool,
    consecutive_failures: AtomicU32,
    last_error: Mutex<String>,
    tripped_at_ms: AtomicU64,
    commits: AtomicU64,
    jobs_committed: AtomicU64,
    largest_batch: AtomicU64,
    syncs: AtomicU64,
    /// A sync failed: nothing durable can be promised until a restart.
    sync_failed: AtomicBool,
    /// Idle read-only connections.
    readers: Mutex<Vec<Connection>>,
}

/// Most idle read connections kept.
const MAX_IDLE_READERS: usize = 8;

/// A pooled read-only connection; it goes back to the pool when dropped.
pub struct Reader {
    conn: Option<Connection>,
    shared: Arc<Shared>,
}

impl std::ops::Deref for Reader {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // Present until drop.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("reader used after drop"))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && conn.is_autocommit()
        {
            let mut pool = match self.shared.readers.lock() {
                Ok(p) => p,
                Err(p) => p.into_inner(),
            };
            if pool.len() < MAX_IDLE_READERS {
                pool.push(conn);
            }
        }
    }
}

/// Handle of the ledger writer. Cheap to clone; all clones feed the same
/// single writer thread.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// The wall clock in Unix milliseconds (0 before 1970, saturating).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn open_err(path: &Path, detail: impl ToString) -> LedgerError {
    LedgerError::Open {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn load_head(conn: &Connection) -> Result<Head, LedgerError> {
    let row = conn
        .query_row(
            "SELECT seq, ts_ms, event, intent_id, agent, payload, prev_hash, hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                    r.get::<_, Vec<u8>>(6)?,
                    r.get::<_, Vec<u8>>(7)?,
                ))
            },
        )
        .optional()?;
    let Some((seq, ts_ms, event, intent_id, agent, payload, prev, hash)) = row else {
        return Ok(Head {
            seq: 0,
            hash: [0; 32],
            ts_ms: 0,
        });
    };
    let seq =
        u64::try_from(seq).map_err(|_| LedgerError::Corrupt(format!("negative head seq {seq}")))?;
    let prev: [u8; 32] = prev
        .try_into()
        .map_err(|_| LedgerError::Corrupt(format!("seq {seq}: prev_hash is not 32 bytes")))?;
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| LedgerError::Corrupt(format!("seq {seq}: hash is not 32 bytes")))?;
    let computed = entry_hash(
        seq,
        &prev,
        ts_ms,
        &event,
        intent_id.as_deref(),
        agent.as_deref(),
        &payload,
    );
    if computed != hash {
        return Err(LedgerError::Corrupt(format!(
            "the last entry (seq {seq}) does not match its hash"
        )));
    }
    Ok(Head { seq, hash, ts_ms })
}

impl Ledger {
    /// Opens (creating if needed) the ledger database at `path`, brings its
    /// schema up to date ([`crate::schema::migrate`]) and starts the writer
    /// thread. Refuses a database newer than this binary before changing
    /// anything in it, and one whose last entry does not match its hash: a
    /// signer must not extend a chain it cannot trust.
    pub fn open(path: &Path, options: LedgerOptions) -> Result<Ledger, LedgerError> {
        let lock = lock_writer(path)?;
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_err(path, e))?;
        // Before the journal mode or the file's mode is touched: a newer
        // database is left exactly as it is.
        crate::schema::check_readable(&conn)?;
        set_file_modes(path)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| open_err(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(
                path,
                format!("cannot switch to WAL mode (journal_mode is {mode})"),
            ));
        }
        // Commits do not sync by themselves: the writer syncs the log after
        // every commit whose answers need durability (see `skip_sync`).
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA temp_store = MEMORY;", // NO_TEMP_FILES
        )
        .map_err(|e| open_err(path, e))?;
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(|e| open_err(path, e))?;
        if sync != 1 {
            return Err(open_err(
                path,
                format!("synchronous is {sync}, expected NORMAL (1)"),
            ));
        }
        let migrated = crate::schema::migrate(&mut conn)?;
        if migrated.from != migrated.to {
            tracing::info!(
                path = %path.display(),
                from = migrated.from,
                to = migrated.to,
                "ledger schema migrated"
            );
        }
        let head = load_head(&conn)?;
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            head_seq: AtomicU64::new(head.seq),
            breaker_open: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            last_error: Mutex::new(String::new()),
            tripped_at_ms: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            jobs_committed: AtomicU64::new(0),
            largest_batch: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_failed: AtomicBool::new(false),
            readers: Mutex::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel();
        let checkpointer = Checkpointer::start(path).map_err(|e| open_err(path, e))?;
        let (sync_tx, sync_rx) = mpsc::channel();
        let syncer_shared = Arc::clone(&shared);
        let syncer_thread = std::thread::Builder::new()
            .name("keyward-ledger-sync".into())
            .spawn(move || run_syncer(syncer_shared, sync_rx))
            .map_err(|e| open_err(path, format!("cannot start the sync thread: {e}")))?;
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("keyward-ledger".into())
            .spawn(move || {
                Writer {
                    conn,
                    head,
                    shared: thread_shared,
                    commit_delay: options.commit_delay,
                    syncer: Some(sync_tx),
                    syncer_thread: Some(syncer_thread),
                    checkpointer: Some(checkpointer),
                    _lock: lock,
                }
                .run(rx)
            })
            .map_err(|e| open_err(path, format!("cannot start the writer thread: {e}")))?;
        Ok(Ledger { tx, shared })
    }

    /// Runs `f` in a ledger transaction and returns its result once the
    /// transaction is durably committed. If `f` fails, or the commit fails,
    /// nothing `f` did is kept.
    pub async fn write<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LedgerTxn<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(f, Reply::Async(tx), false)?;
        let result = rx.await.map_err(|_| LedgerError::Closed)?;
        downcast(result)
    }

    /// [`Ledger::write`] for synchronous callers (not from inside an async
    /// runtime's worker thread).
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LedgerTxn<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(f, Reply::Blocking(tx), false)?;
        downcast(rx.recv().map_err(|_| LedgerError::Closed)?)
    }

    fn submit<T, F>(&self, f: F, reply: Reply, bypass_breaker: bool) -> Result<(), LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LedgerTxn<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        if !bypass_breaker {
            self.check_breaker()?;
        }
        let f: JobFn = Box::new(move |txn| f(txn).map(|v| Box::new(v) as Box<dyn Any + Send>));
        self.tx
            .send(Job::Write {
                f,
                reply,
                bypass_breaker,
            })
            .map_err(|_| LedgerError::Closed)
    }

    fn check_breaker(&self) -> Result<(), LedgerError> {
        if self.shared.breaker_open.load(Ordering::SeqCst) {
            return Err(LedgerError::BreakerOpen {
                failures: self.shared.consecutive_failures.load(Ordering::SeqCst),
                last_error: last_error(&self.shared),
            });
        }
        Ok(())
    }

    /// Health for `/v1/health`.
    pub fn health(&self) -> LedgerHealthState {
        LedgerHealthState {
            head_seq: self.shared.head_seq.load(Ordering::SeqCst),
            breaker_open: self.shared.breaker_open.load(Ordering::SeqCst),
            consecutive_failures: self.shared.consecutive_failures.load(Ordering::SeqCst),
            commits: self.shared.commits.load(Ordering::Relaxed),
            jobs_committed: self.shared.jobs_committed.load(Ordering::Relaxed),
            largest_batch: self.shared.largest_batch.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
        }
    }

    /// Closes the audit breaker on an operator's request. The trip and the
    /// reset are recorded (`breaker_tripped`, `breaker_reset`) in the same
    /// transaction; if that write fails too, the breaker stays open.
    pub async fn reset_breaker(&self, actor: &str) -> Result<EntryRef, LedgerError> {
        let shared = Arc::clone(&self.shared);
        let was_open = shared.breaker_open.load(Ordering::SeqCst);
        let failures = shared.consecutive_failures.load(Ordering::SeqCst);
        let tripped_at = shared.tripped_at_ms.load(Ordering::SeqCst);
        let last = last_error(&shared);
        let actor = actor.to_owned();
        let (tx, rx) = oneshot::channel();
        self.submit(
            move |txn: &mut LedgerTxn<'_>| {
                if was_open {
                    txn.record(
                        None,
                        None,
                        &events::BreakerTripped {
                            breaker: "audit".to_owned(),
                            consecutive_denials: None,
                            locked_until: None,
                            locked_until_ms: None,
                            tripped_at_ms: Some(i64::try_from(tripped_at).unwrap_or(i64::MAX)),
                            consecutive_failures: Some(failures),
                            last_error: Some(last),
                            recorded_late: Some(
                                "the ledger could not be written while the breaker was open"
                                    .to_owned(),
                            ),
                        },
                    )?;
                }
                txn.record(
                    None,
                    None,
                    &events::BreakerReset {
                        breaker: "audit".to_owned(),
                        by: None,
                        consecutive_denials_before: None,
                        was_locked: None,
                        actor: Some(actor),
                        was_open: Some(was_open),
                    },
                )
            },
            Reply::Async(tx),
            true,
        )?;
        let entry: EntryRef = downcast(rx.await.map_err(|_| LedgerError::Closed)?)?;
        shared.breaker_open.store(false, Ordering::SeqCst);
        shared.consecutive_failures.store(0, Ordering::SeqCst);
        Ok(entry)
    }

    /// A read-only connection to the database (for views and audits),
    /// which never writes temporary files ([`NO_TEMP_FILES`]),
    /// from a small pool: opening one costs more than most reads.
    pub fn reader(&self) -> Result<Reader, LedgerError> {
        let pooled = match self.shared.readers.lock() {
            Ok(mut p) => p.pop(),
            Err(p) => p.into_inner().pop(),
        };
        let conn = match pooled {
            Some(c) => c,
            None => {
                let conn = Connection::open_with_flags(
                    &self.shared.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                conn.execute_batch(NO_TEMP_FILES)?;
                conn
            }
        };
        Ok(Reader {
            conn: Some(conn),
            shared: Arc::clone(&self.shared),
        })
    }

    /// Idle pooled read connections (for tests and diagnostics).
    pub fn idle_readers(&self) -> usize {
        match self.shared.readers.lock() {
            Ok(p) => p.len(),
            Err(p) => p.into_inner().len(),
        }
    }

    /// A no-op round trip through the writer thread: answered once the
    /// writer has taken it from its queue and committed the batch it came
    /// with. A writer stuck in a job, a commit or a lock never answers, which
    /// is what the systemd watchdog ([`crate::watchdog`]) looks for. It
    /// writes nothing and does not wait for the disk sync (the syncer is a
    /// thread of its own).
    pub async fn ping(&self) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Ping(Reply::Async(tx)))
            .map_err(|_| LedgerError::Closed)?;
        downcast(rx.await.map_err(|_| LedgerError::Closed)?)
    }

    /// Finishes every queued write, checkpoints the WAL and closes the
    /// database. Later writes fail with [`LedgerError::Closed`].
    pub async fn close(&self) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Close(Reply::Async(tx)))
            .map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?.map(|_| ())
    }

    /// [`Ledger::close`] for synchronous callers.
    pub fn close_blocking(&self) -> Result<(), LedgerError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Job::Close(Reply::Blocking(tx)))
            .map_err(|_| LedgerError::Closed)?;
        rx.recv().map_err(|_| LedgerError::Closed)?.map(|_| ())
    }
}

fn last_error(shared: &Shared) -> String {
    match shared.last_error.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn downcast<T: 'static>(r: AnyResult) -> Result<T, LedgerError> {
    let boxed = r?;
    boxed.downcast::<T>().map(|b| *b).map_err(|_| {
        LedgerError::Corrupt("internal: ledger job returned an unexpected type".into())
    })
}

struct Writer {
    conn: Connection,
    head: Head,
    shared: Arc<Shared>,
    commit_delay: std::time::Duration,
    /// Hands committed answers that need durability to the syncer thread.
    syncer: Option<mpsc::Sender<Durable>>,
    syncer_thread: Option<std::thread::JoinHandle<()>>,
    /// Copies the log into the database off the writer thread.
    checkpointer: Option<Checkpointer>,
    /// Held until the writer thread ends: one writer per database.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Mode of the ledger database and its `-wal` and `-shm` files: the
/// daemon writes, its group (`keyward-ledger` through the setgid state
/// directory of the package) reads, so that the mirror and auditors open it
/// read-only; a WAL reader needs the `-shm` file readable too. SQLite
/// creates `-wal` and `-shm` with the database file's mode; those left by an
/// older version (0600) are brought to this mode here.
pub const LEDGER_FILE_MODE: u32 = 0o640;

fn set_file_modes(path: &Path) -> Result<(), LedgerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(LEDGER_FILE_MODE))
        .map_err(|e| open_err(path, e))?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        match std::fs::set_permissions(&side, std::fs::Permissions::from_mode(LEDGER_FILE_MODE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(open_err(
                    path,
                    format!("cannot set the mode of {}: {e}", side.to_string_lossy()),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Takes the exclusive writer lock `<db>.lock`, so that a second daemon (or
/// `keyward init`) can never append to a chain whose head another process
/// holds in memory.
fn lock_writer(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, LedgerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| open_err(path, format!("cannot open lock file: {e}")))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        open_err(
            path,
            format!("another process is writing this ledger (lock held: {e}); is keywardd already running?"),
        )
    })
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut closing: Option<Reply> = None;
        while let Ok(first) = rx.recv() {
            // Test builds only: a writer wedged on request (the watchdog's test).
            #[cfg(feature = "test-hooks")]
            crate::faults::ledger_writer_gate();
            let mut batch = Vec::new();
            let mut pings = Vec::new();
            match first {
                Job::Close(reply) => {
                    closing = Some(reply);
                }
                Job::Ping(reply) => pings.push(reply),
                Job::Write {
                    f,
                    reply,
                    bypass_breaker,
                } => batch.push((f, reply, bypass_breaker)),
            }
            if closing.is_none() {
                let deadline = std::time::Instant::now() + self.commit_delay;
                while batch.len() < MAX_BATCH {
                    let next = if self.commit_delay.is_zero() {
                        rx.try_recv().map_err(|_| ())
                    } else {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        rx.recv_timeout(left).map_err(|_| ())
                    };
                    match next {
                        Ok(Job::Write {
                            f,
                            reply,
                            bypass_breaker,
                        }) => batch.push((f, reply, bypass_breaker)),
                        Ok(Job::Ping(reply)) => pings.push(reply),
                        Ok(Job::Close(reply)) => {
                            closing = Some(reply);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                self.run_batch(batch);
            }
            for reply in pings {
                reply.send(Ok(Box::new(())));
            }
            if closing.is_some() {
                break;
            }
        }
        // Refuse anything still queued, then close the database cleanly.
        while let Ok(job) = rx.try_recv() {
            match job {
                Job::Write { reply, .. } | Job::Ping(reply) | Job::Close(reply) => {
                    reply.send(Err(LedgerError::Closed))
                }
            }
        }
        // Let the syncer answer everything committed before the log is
        // checkpointed and the database closed.
        drop(self.syncer.take());
        if let Some(t) = self.syncer_thread.take() {
            let _ = t.join();
        }
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
        let Writer {
            conn, _lock: lock, ..
        } = self;
        let result = conn.close().map_err(|(_, e)| LedgerError::Sqlite(e));
        // Release the writer lock before answering, so whoever waited for
        // the close can open the ledger at once.
        drop(lock);
        if let Some(reply) = closing {
            reply.send(result.map(|()| Box::new(()) as Box<dyn Any + Send>));
        }
    }

    fn run_batch(&mut self, batch: Vec<(JobFn, Reply, bool)>) {
        let breaker_open = self.shared.breaker_open.load(Ordering::SeqCst);
        let mut runnable = Vec::with_capacity(batch.len());
        for (f, reply, bypass) in batch {
            if breaker_open && !bypass {
                reply.send(Err(LedgerError::BreakerOpen {
                    failures: self.shared.consecutive_failures.load(Ordering::SeqCst),
                    last_error: last_error(&self.shared),
                }));
            } else {
                runnable.push((f, reply));
            }
        }
        if runnable.is_empty() {
            return;
        }
        if let Err(e) = self.exec("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            for (_, reply) in runnable {
                self.failed(&msg);
                reply.send(Err(LedgerError::Sqlite(clone_err(&e))));
            }
            return;
        }
        let now = now_ms();
        let mut head = self.head;
        let mut results: Vec<(AnyResult, Reply, bool)> = Vec::with_capacity(runnable.len());
        for (f, reply) in runnable {
            let (result, sync) = self.run_job(f, &mut head, now);
            results.push((result, reply, sync));
        }
        match self.exec("COMMIT") {
            Ok(()) => {
                self.head = head;
                self.shared.head_seq.store(head.seq, Ordering::SeqCst);
                let jobs = results.len() as u64;
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .jobs_committed
                    .fetch_add(jobs, Ordering::Relaxed);
                self.shared.largest_batch.fetch_max(jobs, Ordering::Relaxed);
                // Answers that need durability wait for the syncer; the
                // writer goes on with the next batch meanwhile.
                let mut durable = Vec::new();
                for (result, reply, sync) in results {
                    match &result {
                        Ok(_) => self.succeeded(),
                        Err(e) => self.failed(&e.to_string()),
                    }
                    if result.is_ok() && sync {
                        durable.push((result, reply));
                    } else {
                        reply.send(result);
                    }
                }
                if !durable.is_empty()
                    && let Some(syncer) = &self.syncer
                    && let Err(mpsc::SendError(lost)) = syncer.send(durable)
                {
                    for (_, reply) in lost {
                        reply.send(Err(LedgerError::Closed));
                    }
                }
            }
            Err(e) => {
                let msg = format!("commit failed: {e}");
                tracing::error!(error = %msg, "ledger commit failed; nothing of this batch was recorded");
                let _ = self.conn.execute_batch("ROLLBACK");
                // Re-read the committed head in case the failure left the
                // connection's view uncertain.
                if let Ok(h) = load_head(&self.conn) {
                    self.head = h;
                }
                for (_, reply, _) in results {
                    self.failed(&msg);
                    reply.send(Err(LedgerError::Sqlite(clone_err(&e))));
                }
            }
        }
    }

    /// Runs one transaction-control statement from the statement cache
    /// (they run several times per intent; parsing them each time shows).
    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Runs one job in its own savepoint; returns its result and whether
    /// its answer must wait for the log to be synced.
    fn run_job(&self, f: JobFn, head: &mut Head, now: i64) -> (AnyResult, bool) {
        if let Err(e) = self.exec("SAVEPOINT job") {
            return (Err(e.into()), true);
        }
        let mut txn = LedgerTxn {
            conn: &self.conn,
            head: *head,
            now_ms: now,
            sync: true,
        };
        // A panicking job must not take the single writer down with it:
        // it fails like any other job and its savepoint is rolled back.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut txn)))
            .unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(LedgerError::JobPanicked(msg))
            });
        let sync = txn.sync;
        let new_head = txn.head;
        let result = match result {
            Ok(v) => match self.exec("RELEASE job") {
                Ok(()) => {
                    *head = new_head;
                    Ok(v)
                }
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK TO job; RELEASE job");
                    Err(e.into())
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "ledger job failed; its changes were rolled back");
                let _ = self.conn.execute_batch("ROLLBACK TO job; RELEASE job");
                Err(e)
            }
        };
        (result, sync)
    }

    fn succeeded(&self) {
        self.shared.consecutive_failures.store(0, Ordering::SeqCst);
    }

    fn failed(&self, msg: &str) {
        let n = self
            .shared
            .consecutive_failures
            .fetch_add(1, Ordering::SeqCst)
            .saturating_add(1);
        match self.shared.last_error.lock() {
            Ok(mut g) => *g = msg.to_owned(),
            Err(p) => *p.into_inner() = msg.to_owned(),
        }
        if n >= BREAKER_THRESHOLD && !self.shared.breaker_open.swap(true, Ordering::SeqCst) {
            self.shared
                .tripped_at_ms
                .store(u64::try_from(now_ms()).unwrap_or(0), Ordering::SeqCst);
            tracing::error!(
                failures = n,
                last_error = %msg,
                "audit breaker OPEN: the ledger failed {n} times in a row; nothing will be signed until `keyward breaker reset audit`"
            );
        }
    }
}

/// Checkpoints the write-ahead log from its own connection and thread.
///
/// SQLite's automatic checkpoint would run inside the writer's commit and
/// stall every intent behind it (tens of milliseconds with two syncs).
/// Here a PASSIVE checkpoint runs every [`CHECKPOINT_EVERY`] next to the
/// writer, which goes on appending; the log restarts from its beginning
/// once a checkpoint has caught up. Only if the log still grows past
/// [`CHECKPOINT_FORCE_FRAMES`] does a RESTART checkpoint make the writer
/// wait for it, so the log cannot grow without bound.
struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// How often the checkpointer runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// Log size (in frames of one page) above which writers wait for a
/// checkpoint.
const CHECKPOINT_FORCE_FRAMES: i64 = 65_536;

/// SQLite keeps its temporary files (statement journals that outgrow
/// 64 KiB under a large group commit, sorts, temporary tables) in memory:
/// keywardd may write only beneath its state directory (Landlock), and
/// SQLite's temporary directory is elsewhere (`/var/tmp`, `/tmp`), so a
/// spill to disk would fail the write with "unable to open database file"
/// (or, before `access(2)` was allowed, kill the daemon with SIGSYS while
/// SQLite looked for a temporary directory). Seen under load in
/// tests/units.rs and tests/bench.rs.
pub(crate) const NO_TEMP_FILES: &str = "PRAGMA temp_store = MEMORY;";

impl Checkpointer {
    fn start(db: &Path) -> Result<Checkpointer, String> {
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("cannot open the checkpoint connection: {e}"))?;
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA temp_store = MEMORY;",
        )
        .map_err(|e| format!("cannot set up the checkpoint connection: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_t = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("keyward-ledger-ckpt".into())
            .spawn(move || {
                while !stop_t.load(Ordering::SeqCst) {
                    std::thread::park_timeout(CHECKPOINT_EVERY);
                    if stop_t.load(Ordering::SeqCst) {
                        break;
                    }
                    let frames = conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
                    match frames {
                        Ok(n) if n > CHECKPOINT_FORCE_FRAMES => {
                            if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(RESTART)") {
                                tracing::warn!(error = %e, "ledger checkpoint (restart) failed");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "ledger checkpoint failed; will retry")
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Checkpointer { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

/// Answers waiting for the write-ahead log to reach the disk.
type Durable = Vec<(AnyResult, Reply)>;

/// Makes every committed transaction durable: `fdatasync` of the
/// write-ahead log, what `synchronous=FULL` does at each commit in WAL
/// mode. The log is written in order, so one sync covers every commit made
/// before it started.
fn sync_wal(db: &Path) -> std::io::Result<()> {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::File::open(&wal)?.sync_data()
}

/// The syncer thread: takes every batch of committed answers waiting, syncs
/// the log once, and answers them. After a failed sync nothing is answered
/// with success again until keywardd restarts: the kernel may have dropped
/// the unwritten pages, so a later sync could succeed without them, and
/// SQLite's recovery would then discard everything after the hole.
fn run_syncer(shared: Arc<Shared>, rx: mpsc::Receiver<Durable>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = first;
        while let Ok(more) = rx.try_recv() {
            waiting.extend(more);
        }
        let outcome = if shared.sync_failed.load(Ordering::SeqCst) {
            Err("an earlier sync of the ledger failed; restart keywardd".to_owned())
        } else {
            sync_wal(&shared.path)
                .map_err(|e| format!("cannot sync the ledger's write-ahead log: {e}"))
        };
        match outcome {
            Ok(()) => {
                shared.syncs.fetch_add(1, Ordering::Relaxed);
                for (result, reply) in waiting {
                    reply.send(result);
                }
            }
            Err(msg) => {
                if !shared.sync_failed.swap(true, Ordering::SeqCst) {
                    tracing::error!(error = %msg, "ledger sync failed; the audit breaker is open until keywardd restarts");
                }
                match shared.last_error.lock() {
                    Ok(mut g) => *g = msg.clone(),
                    Err(p) => *p.into_inner() = msg.clone(),
                }
                shared.consecutive_failures.fetch_add(1, Ordering::SeqCst);
                if !shared.breaker_open.swap(true, Ordering::SeqCst) {
                    shared
                        .tripped_at_ms
                        .store(u64::try_from(now_ms()).unwrap_or(0), Ordering::SeqCst);
                }
                for (_, reply) in waiting {
                    reply.send(Err(LedgerError::Sqlite(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
                        Some(msg.clone()),
                    ))));
                }
            }
        }
    }
}

/// `rusqlite::Error` is not `Clone`; keep its code and message.
fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Ledger {
        Ledger::open(&dir.join("l.sqlite3"), LedgerOptions::default()).unwrap()
    }

    #[test]
    fn entries_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        let a = l
            .write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}"))
            .unwrap();
        let b = l
            .write_blocking(|t| {
                t.append(
                    EventType::IntentReceived,
                    Some("i"),
                    Some("a"),
                    b"{\"x\":1}",
                )
            })
            .unwrap();
        assert_eq!((a.seq.0, b.seq.0), (1, 2));
        assert_eq!(l.health().head_seq, 2);
        l.close_blocking().unwrap();
        assert!(matches!(
            l.write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}")),
            Err(LedgerError::Closed)
        ));
        let l = open(dir.path());
        assert_eq!(l.health().head_seq, 2);
        let c = l
            .write_blocking(|t| t.append(EventType::DaemonStopped, None, None, b"{}"))
            .unwrap();
        assert_eq!(c.seq.0, 3);
        l.close_blocking().unwrap();
        let report = super::super::verify_chain(&dir.path().join("l.sqlite3")).unwrap();
        assert_eq!(report.entries, 3);
        assert_eq!(report.head_hash, c.hash);
    }

    #[test]
    fn a_ping_is_a_round_trip_through_the_writer_that_records_nothing() {
        let d = tempfile::tempdir().unwrap();
        let l = open(d.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let before = l.health();
        rt.block_on(l.ping()).unwrap();
        let after = l.health();
        assert_eq!(
            (after.head_seq, after.commits, after.syncs),
            (before.head_seq, before.commits, before.syncs)
        );
        l.close_blocking().unwrap();
        assert!(matches!(rt.block_on(l.ping()), Err(LedgerError::Closed)));
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        let second = Ledger::open(&dir.path().join("l.sqlite3"), LedgerOptions::default());
        assert!(matches!(second, Err(LedgerError::Open { .. })));
        l.close_blocking().unwrap();
        let again = open(dir.path());
        again.close_blocking().unwrap();
    }

    #[test]
    fn a_failing_job_changes_nothing_and_others_commit() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.sqlite3"), LedgerOptions::default()).unwrap();
        l.write_blocking(|t| {
            Ok(t.conn()
                .execute_batch("CREATE TABLE t (x INTEGER NOT NULL);")?)
        })
        .unwrap();
        let err = l.write_blocking(|t| {
            t.append(EventType::IntentReceived, Some("i"), None, b"{}")?;
            t.conn().execute("INSERT INTO t (x) VALUES (1)", [])?;
            t.conn().execute("INSERT INTO t (x) VALUES (NULL)", [])?;
            Ok(())
        });
        assert!(err.is_err());
        let ok = l
            .write_blocking(|t| t.append(EventType::IntentReceived, Some("j"), None, b"{}"))
            .unwrap();
        assert_eq!(ok.seq.0, 1, "the failed job's entry was rolled back");
        let rows: i64 = l
            .reader()
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        assert_eq!(l.health().consecutive_failures, 0);
        l.close_blocking().unwrap();
    }

    #[test]
    fn with_a_commit_delay_concurrent_jobs_share_one_commit_and_each_sees_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(
            &dir.path().join("l.sqlite3"),
            LedgerOptions {
                commit_delay: std::time::Duration::from_millis(200),
            },
        )
        .unwrap();
        l.write_blocking(|t| {
            t.conn().execute_batch(
                "CREATE TABLE budget (spent INTEGER NOT NULL); INSERT INTO budget (spent) VALUES (0);",
            )?;
            Ok(())
        })
        .unwrap();
        // Ten jobs race for a budget of 7: each reads what the jobs before
        // it in the same batch wrote, so exactly 7 succeed.
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    l.write_blocking(move |t| {
                        let spent: i64 =
                            t.conn()
                                .query_row("SELECT spent FROM budget", [], |r| r.get(0))?;
                        if spent >= 7 {
                            return Ok(false);
                        }
                        t.conn()
                            .execute("UPDATE budget SET spent = spent + 1", [])?;
                        t.append(
                            EventType::IntentReceived,
                            Some(&format!("i{i}")),
                            None,
                            b"{}",
                        )?;
                        Ok(true)
                    })
                    .unwrap()
                })
            })
            .collect();
        let admitted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(admitted, 7);
        let h = l.health();
        assert_eq!(h.head_seq, 7);
        assert!(h.largest_batch >= 2, "jobs were committed together: {h:?}");
        assert!(h.commits < h.jobs_committed, "{h:?}");
        l.close_blocking().unwrap();
    }

    #[test]
    fn no_connection_of_the_ledger_writes_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.sqlite3"), LedgerOptions::default()).unwrap();
        // 2 = MEMORY: statement journals and sorts never spill to a
        // temporary directory outside the state directory.
        let writer: i64 = l
            .write_blocking(|t| Ok(t.conn().query_row("PRAGMA temp_store", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(writer, 2);
        let reader: i64 = l
            .reader()
            .unwrap()
            .query_row("PRAGMA temp_store", [], |r| r.get(0))
            .unwrap();
        assert_eq!(reader, 2);
        let verifier = super::super::verify::open_read_only(&dir.path().join("l.sqlite3"));
        l.close_blocking().unwrap();
        let verifier: i64 = verifier
            .unwrap()
            .query_row("PRAGMA temp_store", [], |r| r.get(0))
            .unwrap();
        assert_eq!(verifier, 2);
    }

    #[test]
    fn only_jobs_that_need_durability_sync_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.sqlite3"), LedgerOptions::default()).unwrap();
        let mode: i64 = l
            .write_blocking(|t| Ok(t.conn().query_row("PRAGMA synchronous", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(mode, 1, "commits alone do not sync; the writer does");
        let syncs0 = l.health().syncs;
        l.write_blocking(|t| {
            t.skip_sync();
            t.append(EventType::IntentReceived, Some("a"), None, b"{}")
        })
        .unwrap();
        assert_eq!(
            l.health().syncs,
            syncs0,
            "a skip_sync job is answered after the commit alone"
        );
        l.write_blocking(|t| t.append(EventType::SignatureCreated, Some("a"), None, b"{}"))
            .unwrap();
        assert_eq!(
            l.health().syncs,
            syncs0 + 1,
            "a default job waits for the sync"
        );
        // Both are committed and chained.
        let (n, head): (i64, i64) = l
            .reader()
            .unwrap()
            .query_row("SELECT count(*), max(seq) FROM ledger", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((n, head), (2, 2));
        l.close_blocking().unwrap();
        assert!(crate::ledger::verify_chain(&dir.path().join("l.sqlite3")).is_ok());
    }

    #[test]
    fn the_checkpointer_copies_the_log_into_the_database_off_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("l.sqlite3");
        let l = Ledger::open(&db, LedgerOptions::default()).unwrap();
        let payload = vec![b'x'; 1000];
        l.write_blocking(move |t| {
            for i in 0..2000 {
                t.append(
                    EventType::IntentReceived,
                    Some(&format!("i{i}")),
                    None,
                    &payload,
                )?;
            }
            Ok(())
        })
        .unwrap();
        // No automatic checkpoint on the writer: the entries are in the log.
        let before = std::fs::metadata(&db).unwrap().len();
        assert!(
            before < 200_000,
            "the writer did not checkpoint: {before} bytes"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::metadata(&db).unwrap().len() < 2_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        l.close_blocking().unwrap();
        assert_eq!(crate::ledger::verify_chain(&db).unwrap().entries, 2000);
    }

    #[test]
    fn pooled_readers_are_reused_and_see_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.sqlite3"), LedgerOptions::default()).unwrap();
        let count = |l: &Ledger| -> i64 {
            l.reader()
                .unwrap()
                .query_row("SELECT count(*) FROM ledger", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&l), 0);
        assert_eq!(l.idle_readers(), 1, "the reader went back to the pool");
        for i in 1..=3 {
            l.write_blocking(|t| t.append(EventType::IntentReceived, None, None, b"{}"))
                .unwrap();
            assert_eq!(count(&l), i, "a pooled reader sees the latest commit");
        }
        let (a, b) = (l.reader().unwrap(), l.reader().unwrap());
        drop((a, b));
        assert_eq!(l.idle_readers(), 2);
        l.close_blocking().unwrap();
    }

    #[test]
    fn a_panicking_job_is_rolled_back_and_the_writer_lives_on() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.sqlite3"), LedgerOptions::default()).unwrap();
        let err = l
            .write_blocking(|t| -> Result<(), LedgerError> {
                t.append(EventType::IntentReceived, Some("i"), None, b"{}")?;
                panic!("boom");
            })
            .unwrap_err();
        assert!(
            matches!(&err, LedgerError::JobPanicked(m) if m == "boom"),
            "{err}"
        );
        let ok = l
            .write_blocking(|t| t.append(EventType::IntentReceived, Some("j"), None, b"{}"))
            .unwrap();
        assert_eq!(ok.seq.0, 1, "the panicked job's entry was rolled back");
        l.close_blocking().unwrap();
    }

    #[test]
    fn three_failures_open_the_breaker_until_reset() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        for i in 1..=3u32 {
            let r: Result<(), _> = l.write_blocking(|t| {
                t.append(EventType::IntentReceived, None, None, b"{}")?;
                Err(LedgerError::Sqlite(rusqlite::Error::InvalidQuery))
            });
            assert!(r.is_err());
            assert_eq!(l.health().consecutive_failures, i);
        }
        assert!(l.health().breaker_open);
        let refused = l.write_blocking(|t| t.append(EventType::IntentReceived, None, None, b"{}"));
        assert!(matches!(
            refused,
            Err(LedgerError::BreakerOpen { failures: 3, .. })
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let entry = rt.block_on(l.reset_breaker("uid:0")).unwrap();
        assert_eq!(entry.seq.0, 2, "breaker_tripped then breaker_reset");
        assert!(!l.health().breaker_open);
        let ok = l
            .write_blocking(|t| t.append(EventType::IntentReceived, None, None, b"{}"))
            .unwrap();
        assert_eq!(ok.seq.0, 3);
        l.close_blocking().unwrap();
    }

    #[test]
    fn a_corrupt_head_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite3");
        let l = open(dir.path());
        l.write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}"))
            .unwrap();
        l.close_blocking().unwrap();
        let c = Connection::open(&path).unwrap();
        c.execute_batch("DROP TRIGGER ledger_no_update; UPDATE ledger SET payload = X'7B7D7B7D';")
            .unwrap();
        drop(c);
        assert!(matches!(
            Ledger::open(&path, LedgerOptions::default()),
            Err(LedgerError::Corrupt(_))
        ));
    }

    #[test]
    fn updates_and_deletes_are_refused_by_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        l.write_blocking(|t| t.append(EventType::DaemonStarted, None, None, b"{}"))
            .unwrap();
        let e = l.write_blocking(|t| {
            t.conn().execute("UPDATE ledger SET payload = X'00'", [])?;
            Ok(())
        });
        assert!(e.is_err());
        let e = l.write_blocking(|t| {
            t.conn().execute("DELETE FROM ledger", [])?;
            Ok(())
        });
        assert!(e.is_err());
        assert_eq!(l.health().head_seq, 1);
        l.close_blocking().unwrap();
    }

    #[test]
    fn concurrent_writers_get_distinct_contiguous_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|j| {
                            let id = format!("{i}-{j}");
                            l.write_blocking(move |t| {
                                t.append(EventType::IntentReceived, Some(&id), None, b"{}")
                            })
                            .unwrap()
                            .seq
                            .0
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
        l.close_blocking().unwrap();
        assert_eq!(
            super::super::verify_chain(&dir.path().join("l.sqlite3"))
                .unwrap()
                .entries,
            400
        );
    }
}
