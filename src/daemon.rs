//! The daemon: open the HSM and the ledger, bind the sockets, lock the
//! process down, serve the agent and admin sockets, shut down cleanly on
//! SIGTERM (see [`run`] for the steps).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::api::serve::{Admission, Limits, Socket, serve as serve_socket};
use crate::api::{
    AdminGroup, AppState, admin_router, agent_router, bind_socket, with_request_timeout,
};
use crate::config::{Config, ConfigError};
use crate::hsm::{ExecutorSettings, Hsm, HsmError, HsmExecutor, HsmKey};
use crate::ledger::{Ledger, LedgerError, LedgerOptions, events};
use crate::policy::Policy;
use crate::service::checkpoints::Checkpointer;
use crate::service::history::Established;
use crate::service::{Core, Operations, RetiringKeys, Signer};
use crate::types::KeyName;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Invalid configuration or policy.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// HSM failure.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// Ledger failure.
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// A key the policy names is not in the HSM, or is there but refused.
    #[error("policy file {policy}: key {key:?} cannot be used from the HSM token: {source}")]
    MissingKey {
        /// Policy file.
        policy: PathBuf,
        /// Key name.
        key: String,
        /// Lookup error.
        source: HsmError,
    },
    /// The audit history does not verify, or its anchor is wrong.
    #[error("{0}")]
    History(#[from] crate::service::history::HistoryError),
    /// The open-file limit cannot hold the connection limits and the reserve.
    #[error("{0}")]
    Descriptors(#[from] crate::fds::FdBudgetError),
    /// The seccomp filter could not be applied: the daemon does not serve
    /// unconfined.
    #[error("lockdown: {0}")]
    Seccomp(#[from] crate::harden::seccomp::SeccompError),
    /// Not configured, or configured unsafely: the checks of
    /// [`crate::doctor`] name each file, what is wrong and the fix.
    #[error("refusing to start: {0}")]
    Refused(#[from] crate::doctor::Refusal),
    /// An I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            DaemonError::Config(_) | DaemonError::MissingKey { .. } => "invalid_config",
            DaemonError::Hsm(e) => e.code(),
            DaemonError::Ledger(e) => e.code(),
            DaemonError::History(e) => e.code(),
            DaemonError::Io { .. } => "io_error",
            DaemonError::Descriptors(_) => "invalid_config",
            DaemonError::Seccomp(e) => e.code(),
            DaemonError::Refused(r) => r.code(),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Opens the configured HSM backend: [`crate::hsm::open`] on `[hsm]`.
pub fn open_hsm(cfg: &Config) -> Result<Arc<dyn Hsm>, HsmError> {
    crate::hsm::open(&cfg.hsm)
}

/// Opens the ledger database with the tables that live beside the chain.
pub fn open_ledger(cfg: &Config) -> Result<Ledger, DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.daemon.state_dir)
        .map_err(io(format!(
            "cannot create state directory {}",
            cfg.daemon.state_dir.display()
        )))?;
    Ok(Ledger::open(
        &cfg.ledger_path(),
        LedgerOptions {
            commit_delay: std::time::Duration::from_micros(cfg.ledger.commit_delay_us),
        },
    )?)
}

async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Choices an operator makes for one start.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Start on a history that fails verification at exactly this sequence
    /// number (recorded as `history_acknowledged`).
    pub accept_broken_history: Option<u64>,
    /// The seccomp filter [`lockdown`] applies to every thread. keywardd's
    /// `main` always sets it; it is an option so that tests calling the
    /// daemon's steps in their own process are never filtered.
    pub seccomp: Option<crate::harden::seccomp::Filter>,
}

/// Runs the daemon until SIGTERM or SIGINT, in four steps:
///
/// 1. [`open`]: the descriptor budget, the policy, the HSM (the PKCS#11
///    module is loaded here) and its keys, the ledger (migrated), the audit
///    history verified, the start recorded, interrupted intents recovered.
/// 2. [`bind`]: the agent and admin sockets and the signal handlers.
/// 3. [`lockdown`]: the single place that restricts the process, once it
///    holds everything it needs and before it reads any request.
/// 4. [`serve`]: the sockets and the background tasks until a stop signal,
///    then the orderly shutdown.
pub async fn run(cfg: Config, opts: StartOptions) -> Result<(), DaemonError> {
    let seccomp = opts.seccomp.clone();
    let opened = open(&cfg, opts).await?;
    let bound = bind(&cfg)?;
    for warning in lockdown(seccomp.as_ref())? {
        tracing::warn!("{warning}");
    }
    serve(&cfg, opened, bound).await
}

/// What [`open`] builds: the services, ready to serve.
struct Opened {
    ledger: Ledger,
    signer: Arc<Signer>,
    operations: Arc<Operations>,
    checkpointer: Arc<Checkpointer>,
    audit_key: HsmKey,
}

/// Step 1: everything the daemon needs before it can serve, and the record
/// of this start in the ledger.
async fn open(cfg: &Config, opts: StartOptions) -> Result<Opened, DaemonError> {
    // Before anything is opened: files others could change, a PIN that is
    // missing or readable by others, a state directory everyone reads.
    for warning in crate::doctor::refuse_unsafe(cfg)? {
        tracing::warn!(code = warning.code.as_str(), "{warning}");
    }
    // Before the HSM or the ledger opens a file: the connection limits must
    // leave them descriptors.
    let nofile = crate::fds::reserve(cfg.daemon.max_connections)?;
    tracing::info!(
        nofile,
        max_connections = cfg.daemon.max_connections,
        max_connections_per_uid = cfg.daemon.max_connections_per_uid,
        "descriptor budget"
    );
    let policy = Policy::load(&cfg.daemon.policy)?;
    let ledger = open_ledger(cfg)?;
    let (hsm, keys, retiring) = open_hsm_and_keys(cfg, &policy, &ledger).await?;
    let established = establish_history(cfg, &hsm, &ledger, opts).await?;
    let audit_key = established.key.clone();
    record_start(cfg, &ledger, &hsm, &keys, &policy, &established).await?;
    // Keys made while keywardd was not running (`keyward setup`, `keyward
    // key create`): recorded once, now.
    let pinned_in = established
        .unpinned
        .is_none()
        .then(|| cfg.audit_vkey_path().display().to_string());
    crate::service::keys::record_offline_keys(&ledger, &hsm, cfg.hsm.device_label(), pinned_in)
        .await?;
    let hsm_for_checkpoints = Arc::clone(&hsm);
    let core = Core::new(
        ledger.clone(),
        hsm,
        keys,
        policy,
        cfg.daemon.policy.clone(),
        Duration::from_secs(cfg.daemon.approval_ttl_s),
    );
    core.set_device_label(cfg.hsm.device_label());
    core.set_retiring(retiring);
    core.set_audit_key(audit_key.clone());
    let signer = Signer::new(Arc::clone(&core));
    let operations = Operations::new(core);
    // Signed checkpoints of the Merkle tree, over verified entries only. The
    // first covers this start before anything is recorded for an agent.
    let origin = cfg
        .ledger
        .origin
        .clone()
        .unwrap_or_else(|| format!("keyward/{}", cfg.hsm.device_label()));
    let checkpointer = Arc::new(Checkpointer::new(
        hsm_for_checkpoints,
        ledger.clone(),
        audit_key.clone(),
        origin,
        established.walker,
        Arc::clone(operations.core().history_gate()),
    ));
    let (every, interval) = checkpoint_cadence(cfg);
    match checkpointer.maybe(every, interval, true).await {
        Ok(Some(m)) => tracing::info!(size = m.size, seq = m.seq, "start checkpoint recorded"),
        Ok(None) => {}
        Err(e) => {
            return Err(DaemonError::Io {
                what: "the start checkpoint".into(),
                source: std::io::Error::other(e),
            });
        }
    }
    let recovered = operations.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "recorded intents interrupted by the last stop; their reservations were released"
        );
    }
    Ok(Opened {
        ledger,
        signer,
        operations,
        checkpointer,
        audit_key,
    })
}

/// Checkpoint every this many entries, or this often.
fn checkpoint_cadence(cfg: &Config) -> (u64, Duration) {
    (
        cfg.ledger.checkpoint_every,
        Duration::from_secs(cfg.ledger.checkpoint_interval_s),
    )
}

/// Opens the HSM (off the runtime's threads: loading the module and logging
/// in block) and finds every key the policy names, through the ledger's key
/// registry (the version active for each name, checked against its
/// registered public key), and the retiring versions still in the HSM.
async fn open_hsm_and_keys(
    cfg: &Config,
    policy: &Policy,
    ledger: &Ledger,
) -> Result<(Arc<HsmExecutor>, HashMap<KeyName, HsmKey>, RetiringKeys), DaemonError> {
    let hsm_cfg = cfg.clone();
    let hsm = tokio::task::spawn_blocking(move || open_hsm(&hsm_cfg))
        .await
        .map_err(|e| DaemonError::Io {
            what: "HSM start-up task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|e| match crate::doctor::hsm_finding(cfg, &e) {
            // No token, no PIN, a PIN refused: only the operator can mend it.
            Some(finding) => DaemonError::Refused(crate::doctor::Refusal(vec![finding])),
            None => DaemonError::Hsm(e),
        })?;
    // Test builds only: the HSM's signatures fail or wait on request.
    #[cfg(feature = "test-hooks")]
    let hsm = crate::faults::wrap_hsm(hsm);
    // From here on every HSM call goes through the executor.
    let hsm = Arc::new(HsmExecutor::start(hsm, ExecutorSettings::of(&cfg.hsm))?);
    let (keys, retiring, failed) =
        crate::service::keys::resolve(ledger, &hsm, policy.all_keys().into_iter().collect())
            .await?;
    let mut missing = Vec::new();
    for (name, e) in failed {
        match e {
            // Every key that is not there or not usable, named at once.
            e @ (HsmError::KeyNotFound(_)
            | HsmError::AmbiguousKey(_)
            | HsmError::KeyMismatch { .. }
            | HsmError::UnprotectedKey { .. }) => {
                missing.push(crate::doctor::key_finding(cfg, name.as_str(), &e));
            }
            source => {
                return Err(DaemonError::MissingKey {
                    policy: cfg.daemon.policy.clone(),
                    key: name.to_string(),
                    source,
                });
            }
        }
    }
    if !missing.is_empty() {
        return Err(crate::doctor::Refusal(missing).into());
    }
    Ok((hsm, keys, retiring))
}

/// The trust anchor: the whole history verified against the HSM's own
/// audit key (made on a fresh install), the pinned key, the checkpoint kept
/// in the HSM and what the mirror acknowledged.
async fn establish_history(
    cfg: &Config,
    hsm: &Arc<HsmExecutor>,
    ledger: &Ledger,
    opts: StartOptions,
) -> Result<Established, DaemonError> {
    let (hsm, ledger, cfg) = (Arc::clone(hsm), ledger.clone(), cfg.clone());
    let accept = opts.accept_broken_history;
    let verify_started = std::time::Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let e = tokio::task::spawn_blocking(move || {
        crate::service::history::establish(&hsm.blocking(runtime), &ledger, &cfg, accept)
    })
    .await
    .map_err(|e| DaemonError::Io {
        what: "history verification task".into(),
        source: std::io::Error::other(e.to_string()),
    })??;
    if let Some(r) = &e.report {
        tracing::info!(
            entries = r.chain.entries,
            checkpoints = r.checkpoints,
            uncovered = r.uncovered(),
            ms = verify_started.elapsed().as_millis() as u64,
            "audit history verified against the HSM's audit key"
        );
    }
    Ok(e)
}

/// Records this start: a newly generated audit key, an acknowledged break,
/// `daemon_started` and the policy in force.
async fn record_start(
    cfg: &Config,
    ledger: &Ledger,
    hsm: &HsmExecutor,
    keys: &HashMap<KeyName, HsmKey>,
    policy: &Policy,
    established: &Established,
) -> Result<(), DaemonError> {
    let audit_key = &established.key;
    if let Some(path) = &established.unpinned {
        tracing::warn!(
            path = %path.display(),
            verifier_key = %crate::service::history::audit_vkey(audit_key),
            "the audit key is not pinned: run `keyward audit pin` (as root) so auditors can verify checkpoints"
        );
    }
    if established.generated {
        let generated =
            events::KeyGenerated::audit_key(audit_key.name.as_str(), &audit_key.public_key, None);
        ledger
            .write(move |txn| txn.record(None, None, &generated).map(|_| ()))
            .await?;
    }
    if let Some((seq, finding)) = &established.acknowledged {
        let acknowledged = events::HistoryAcknowledged {
            first_broken_seq: *seq,
            finding: finding.clone(),
            by_uid: nix::unistd::getuid().as_raw(),
            pid: std::process::id(),
        };
        ledger
            .write(move |txn| txn.record(None, None, &acknowledged).map(|_| ()))
            .await?;
    }
    let started = events::DaemonStarted {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        hsm_backend: hsm.backend().to_owned(),
        token_label: cfg.hsm.device_label().to_owned(),
        keys: keys
            .values()
            .map(|k| events::ServedKey {
                name: k.name.to_string(),
                public_key: k.public_key.to_base58(),
            })
            .collect(),
    };
    let loaded = events::PolicyLoaded {
        policy_sha256: policy.hash_hex(),
        previous_sha256: None,
        path: cfg.daemon.policy.display().to_string(),
        by: None,
        agents: policy.agents.iter().map(|a| a.name.to_string()).collect(),
    };
    ledger
        .write(move |txn| {
            txn.record(None, None, &started)?;
            txn.record(None, None, &loaded)?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// What [`bind`] acquired from the system for serving.
struct Bound {
    agent: tokio::net::UnixListener,
    admin: tokio::net::UnixListener,
    /// `daemon.admin_socket_group`, resolved when the socket was given to it.
    admin_group: Option<AdminGroup>,
    signals: Signals,
}

/// The stop and reload signals.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// Step 2: the agent and admin sockets (with their modes and group) and the
/// signal handlers; nothing is accepted yet.
fn bind(cfg: &Config) -> Result<Bound, DaemonError> {
    let agent_listener = bind_socket(&cfg.daemon.agent_socket, 0o660).map_err(io(format!(
        "cannot bind agent socket {}",
        cfg.daemon.agent_socket.display()
    )))?;
    if let Some(group) = &cfg.daemon.agent_socket_group {
        chown_socket_group(
            cfg,
            &cfg.daemon.agent_socket,
            "daemon.agent_socket_group",
            group,
        )?;
    }
    let admin_mode = match cfg.daemon.admin_socket_group {
        Some(_) => 0o660,
        None => 0o600,
    };
    let admin_listener = bind_socket(&cfg.daemon.admin_socket, admin_mode).map_err(io(format!(
        "cannot bind admin socket {}",
        cfg.daemon.admin_socket.display()
    )))?;
    let admin_group = match &cfg.daemon.admin_socket_group {
        Some(group) => Some(chown_socket_group(
            cfg,
            &cfg.daemon.admin_socket,
            "daemon.admin_socket_group",
            group,
        )?),
        None => None,
    };
    let signals = Signals {
        term: signal(SignalKind::terminate()).map_err(io("cannot install SIGTERM handler"))?,
        int: signal(SignalKind::interrupt()).map_err(io("cannot install SIGINT handler"))?,
        hup: signal(SignalKind::hangup()).map_err(io("cannot install SIGHUP handler"))?,
    };
    Ok(Bound {
        agent: agent_listener,
        admin: admin_listener,
        admin_group,
        signals,
    })
}

/// Gives `socket` to `group` (the config's `key`) and returns the group
/// with its listed members; the daemon's user must be a member of it (no
/// capability is needed then).
fn chown_socket_group(
    cfg: &Config,
    socket: &std::path::Path,
    key: &str,
    group: &str,
) -> Result<AdminGroup, DaemonError> {
    let resolved = AdminGroup::resolve(group)
        .ok_or_else(|| ConfigError::new(&cfg.file, key, format!("no group named {group:?}")))?;
    nix::unistd::chown(socket, None, Some(nix::unistd::Gid::from_raw(resolved.gid))).map_err(
        |e| {
            io(format!(
                "cannot chown {} to group {group}",
                socket.display()
            ))(e.into())
        },
    )?;
    Ok(resolved)
}

/// Step 3, the lockdown: the single place that restricts the process once
/// the PKCS#11 module is loaded (with whatever threads and files it opens),
/// the ledger is open and the sockets are bound, and before any request is
/// read. It applies the daemon's seccomp filter to all threads (TSYNC;
/// threads started later inherit it): the steps before it may make any
/// system call, serving after it may not make new kinds. If the filter
/// cannot be applied the daemon does not serve (fail closed).
///
/// What [`crate::harden::harden_process`] does stays at the top of `main`,
/// on purpose: the umask must be in force before the ledger and the
/// sockets are created, and core dumps, ptrace and swap must be shut before
/// the PIN is read and the module handles secrets. The lockdown checks that
/// those are still in force and returns what is not, as warnings.
pub fn lockdown(
    seccomp: Option<&crate::harden::seccomp::Filter>,
) -> Result<crate::harden::Warnings, DaemonError> {
    let mut warnings = Vec::new();
    match nix::sys::prctl::get_no_new_privs() {
        Ok(true) => {}
        Ok(false) => warnings.push("lockdown: no_new_privs is not set".to_owned()),
        Err(e) => warnings.push(format!("lockdown: cannot read no_new_privs: {e}")),
    }
    match nix::sys::prctl::get_dumpable() {
        Ok(false) => {}
        Ok(true) => warnings.push(
            "lockdown: the process is dumpable (core dumps and ptrace by its user are possible)"
                .to_owned(),
        ),
        Err(e) => warnings.push(format!("lockdown: cannot read the dumpable flag: {e}")),
    }
    if let Some(filter) = seccomp {
        filter.apply()?;
        tracing::info!(
            filter = filter.role().name(),
            extensions = ?filter.extensions,
            backend_programs = ?filter.backend_programs.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "seccomp filter applied to every thread"
        );
    }
    Ok(warnings)
}

/// Step 4: serves both sockets and runs the background tasks until SIGTERM
/// or SIGINT (SIGHUP reloads the policy), then stops in order: connections,
/// tasks, a final checkpoint, `daemon_stopped`, the ledger.
async fn serve(cfg: &Config, opened: Opened, bound: Bound) -> Result<(), DaemonError> {
    let Opened {
        ledger,
        signer,
        operations,
        checkpointer,
        audit_key,
    } = opened;
    let Bound {
        agent: agent_listener,
        admin: admin_listener,
        admin_group,
        signals,
    } = bound;
    let state = AppState {
        signer: Arc::clone(&signer),
        operations: Arc::clone(&operations),
        max_body: cfg.daemon.max_body_bytes,
        admin_group: admin_group.clone(),
        audit_key: Some((
            audit_key.public_key.to_base58(),
            crate::ledger::checkpoint::verifier_key(
                crate::ledger::checkpoint::AUDIT_KEY,
                &audit_key.public_key,
            ),
        )),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = Limits {
        max_connections: cfg.daemon.max_connections,
        max_per_uid: cfg.daemon.max_connections_per_uid,
        header_read_timeout: Duration::from_secs(cfg.daemon.header_read_timeout_s),
        shutdown_grace: Duration::from_secs(cfg.daemon.shutdown_grace_s),
    };
    let request_timeout = Duration::from_secs(cfg.daemon.request_timeout_s);
    let agent_srv = serve_socket(
        Socket {
            name: "agent",
            listener: agent_listener,
            router: with_request_timeout(agent_router(state.clone()), request_timeout),
            admission: Admission::Agents(Arc::clone(&signer)),
            limits,
        },
        stop_rx.clone(),
    );
    let admin_srv = serve_socket(
        Socket {
            name: "admin",
            listener: admin_listener,
            router: with_request_timeout(admin_router(state), request_timeout),
            admission: Admission::Operators(admin_group),
            limits,
        },
        stop_rx.clone(),
    );
    let mut tasks = spawn_background(cfg, &ledger, &operations, &checkpointer, &stop_rx);

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // systemd counts WatchdogSec= from READY=1: the pings start after it.
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let (period, deadline) = crate::watchdog::timing(interval);
        tasks.push(tokio::spawn(crate::watchdog::run(
            ledger.clone(),
            Arc::clone(operations.core().hsm()),
            period,
            deadline,
            stop_rx.clone(),
        )));
    }
    tracing::info!(
        agent_socket = %cfg.daemon.agent_socket.display(),
        admin_socket = %cfg.daemon.admin_socket.display(),
        "keywardd ready"
    );
    // Freezes live in the ledger database: they are in force from the
    // first request; say so where the operator looks first.
    match operations.freezes().await {
        Ok(list) => {
            for f in list {
                tracing::warn!(scope = %f.scope, by = %f.by, seq = f.seq, "signing is frozen (`keyward unfreeze` lifts it)");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the freezes in force"),
    }
    let servers = tokio::spawn(async move {
        tokio::join!(agent_srv, admin_srv);
    });
    wait_for_stop(signals, &operations).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    if let Err(e) = servers.await {
        tracing::error!(error = %e, "server task failed");
    }
    for task in tasks {
        let _ = task.await;
    }
    shut_down(cfg, ledger, signer, &checkpointer).await
}

/// The tasks that run beside the sockets until `stop`: the mirror gate's
/// refresh, checkpoints and re-verification, expiry of pending intents and
/// recovery of interrupted ones.
fn spawn_background(
    cfg: &Config,
    ledger: &Ledger,
    operations: &Arc<Operations>,
    checkpointer: &Arc<Checkpointer>,
    stop_rx: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // The mirror gate: signing stops while the external copy lags.
    if let Some(m) = cfg.mirror.clone() {
        let gate = Arc::new(crate::mirror::MirrorGate::new(
            m.ack_dir
                .clone()
                .unwrap_or_else(|| cfg.daemon.state_dir.join("mirror")),
            crate::mirror::sinks(&m),
            m.max_unmirrored_entries,
            Duration::from_secs(m.max_unmirrored_age_s),
        ));
        operations.core().set_mirror_gate(Arc::clone(&gate));
        let ledger = ledger.clone();
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let g = Arc::clone(&gate);
                let l = ledger.clone();
                let _ = tokio::task::spawn_blocking(move || g.refresh(&l)).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown_signal(stop.clone()) => return,
                }
            }
        }));
    }

    let cp = Arc::clone(checkpointer);
    let cp_stop = stop_rx.clone();
    let (every, interval) = checkpoint_cadence(cfg);
    let verify_every = Duration::from_secs(cfg.ledger.verify_interval_s);
    tasks.push(tokio::spawn(async move {
        let mut last_verify = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown_signal(cp_stop.clone()) => return,
            }
            match cp.maybe(every, interval, false).await {
                Ok(Some(m)) => tracing::info!(size = m.size, seq = m.seq, "checkpoint recorded"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "checkpoint failed; will retry"),
            }
            if last_verify.elapsed() >= verify_every {
                last_verify = std::time::Instant::now();
                if let Err(e) = cp.verify_new().await {
                    tracing::error!(error = %e, "re-verification of the audit history failed");
                }
            }
        }
    }));

    // A device that forgets idle sessions is pinged while idle; the pings
    // also notice a device that went away (and came back) before anyone
    // signs.
    if let Some(period) = operations.core().hsm().keepalive() {
        let hsm = Arc::clone(operations.core().hsm());
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut was_ok = true;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = shutdown_signal(stop.clone()) => return,
                }
                match hsm.health().await {
                    Ok(()) if !was_ok => {
                        was_ok = true;
                        tracing::info!(backend = hsm.backend(), "HSM available again");
                    }
                    Ok(()) => {}
                    // A full queue means the device is busy, not idle.
                    Err(crate::hsm::HsmError::Busy { .. }) => {}
                    Err(e) => {
                        if was_ok {
                            tracing::warn!(backend = hsm.backend(), error = %e, "HSM keepalive failed");
                        }
                        was_ok = false;
                    }
                }
            }
        }));
    }

    // Expire pending intents whose approval window has ended.
    let expiry = Arc::clone(operations);
    let expiry_stop = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown_signal(expiry_stop.clone()) => return,
            }
            match expiry.expire_due().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "pending intents expired"),
                Err(e) => {
                    tracing::warn!(error = %e, "recording expired intents failed; will retry")
                }
            }
        }
    }));

    // Retry recording interrupted intents while the ledger was failing.
    let recovery = Arc::clone(operations);
    let recovery_stop = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown_signal(recovery_stop.clone()) => return,
            }
            if recovery.needs_recovery()
                && !recovery.core().ledger().health().breaker_open
                && let Err(e) = recovery.recover().await
            {
                tracing::warn!(error = %e, "recording interrupted intents failed; will retry");
            }
        }
    }));
    tasks
}

/// Waits for SIGTERM or SIGINT; reloads the policy on SIGHUP meanwhile.
async fn wait_for_stop(signals: Signals, operations: &Operations) {
    let Signals {
        term: mut sigterm,
        int: mut sigint,
        hup: mut sighup,
    } = signals;
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: finishing in-flight requests");
                break;
            }
            _ = sigint.recv() => {
                tracing::info!("SIGINT: finishing in-flight requests");
                break;
            }
            _ = sighup.recv() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                match operations.reload_policy("SIGHUP").await {
                    Ok(r) => tracing::info!(policy_sha256 = %r.policy_sha256, seq = r.ledger_seq, "SIGHUP: policy reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: policy reload refused; the old policy stays in force"),
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

/// After the sockets and tasks stopped: lets submissions still running
/// finish recording, removes the sockets, records a final checkpoint and
/// `daemon_stopped`, and closes the ledger.
async fn shut_down(
    cfg: &Config,
    ledger: Ledger,
    signer: Arc<Signer>,
    checkpointer: &Checkpointer,
) -> Result<(), DaemonError> {
    // Requests run their submissions in their own tasks; give any still
    // running a moment to finish recording before the ledger closes.
    for _ in 0..100 {
        if Arc::strong_count(&signer) <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&cfg.daemon.agent_socket);
    let _ = std::fs::remove_file(&cfg.daemon.admin_socket);
    // A last checkpoint covers everything up to the stop.
    let (every, interval) = checkpoint_cadence(cfg);
    match checkpointer.maybe(every, interval, true).await {
        Ok(Some(m)) => tracing::info!(size = m.size, seq = m.seq, "final checkpoint recorded"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
    }
    let stopped = events::DaemonStopped {
        pid: std::process::id(),
    };
    let result = ledger
        .write(move |txn| txn.record(None, None, &stopped).map(|_| ()))
        .await;
    drop(signer);
    ledger.close().await?;
    result?;
    Ok(())
}
