//! The daemon: open the HSM and the ledger, serve the agent and admin
//! sockets, shut down cleanly on SIGTERM.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::serve::{Admission, Limits, Socket, serve};
use crate::api::{AppState, admin_router, agent_router, bind_socket, with_request_timeout};
use crate::config::{Config, ConfigError};
use crate::hsm::{ExecutorSettings, Hsm, HsmError, HsmExecutor};
use crate::ledger::{EventType, Ledger, LedgerError, LedgerOptions};
use crate::policy::Policy;
use crate::service::Signer;

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
            extra_schema: vec![
                crate::policy::counters::SCHEMA,
                crate::policy::engine::SCHEMA,
                crate::intents::SCHEMA,
                crate::approval::store::SCHEMA,
            ],
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
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config, opts: StartOptions) -> Result<(), DaemonError> {
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
    let hsm_cfg = cfg.clone();
    let hsm = tokio::task::spawn_blocking(move || open_hsm(&hsm_cfg))
        .await
        .map_err(|e| DaemonError::Io {
            what: "HSM start-up task".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
    // Test builds only: the HSM's signatures fail or wait on request.
    #[cfg(feature = "test-hooks")]
    let hsm = crate::faults::wrap_hsm(hsm);
    // From here on every HSM call goes through the executor.
    let hsm = Arc::new(HsmExecutor::start(hsm, ExecutorSettings::of(&cfg.hsm))?);
    let mut keys = HashMap::new();
    for name in policy.all_keys() {
        let key = hsm
            .find_ed25519(&name)
            .await
            .map_err(|source| DaemonError::MissingKey {
                policy: cfg.daemon.policy.clone(),
                key: name.to_string(),
                source,
            })?;
        keys.insert(name, key);
    }
    let ledger = open_ledger(&cfg)?;
    // The trust anchor: the whole history verified against the HSM's own
    // audit key (made on a fresh install), the pinned key, the checkpoint
    // kept in the HSM and what the mirror acknowledged.
    let established = {
        let (hsm, ledger, cfg) = (Arc::clone(&hsm), ledger.clone(), cfg.clone());
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
        e
    };
    let audit_key = established.key.clone();
    if let Some(path) = &established.unpinned {
        tracing::warn!(
            path = %path.display(),
            verifier_key = %crate::service::history::audit_vkey(&audit_key),
            "the audit key is not pinned: run `keyward audit pin` (as root) so auditors can verify checkpoints"
        );
    }
    if established.generated {
        let payload = serde_json::to_vec(&serde_json::json!({
            "key": audit_key.name.as_str(),
            "public_key": audit_key.public_key.to_base58(),
            "purpose": "checkpoints",
            "verifier_key": crate::ledger::checkpoint::verifier_key(crate::ledger::checkpoint::AUDIT_KEY, &audit_key.public_key),
        }))
        .unwrap_or_default();
        ledger
            .write(move |txn| {
                txn.append(EventType::KeyGenerated, None, None, &payload)
                    .map(|_| ())
            })
            .await?;
    }
    if let Some((seq, finding)) = &established.acknowledged {
        let payload = serde_json::to_vec(&serde_json::json!({
            "first_broken_seq": seq,
            "finding": finding,
            "by_uid": nix::unistd::getuid().as_raw(),
            "pid": std::process::id(),
        }))
        .map_err(|e| DaemonError::Io {
            what: "acknowledgement".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        ledger
            .write(move |txn| {
                txn.append(EventType::HistoryAcknowledged, None, None, &payload)
                    .map(|_| ())
            })
            .await?;
    }
    let started = serde_json::to_vec(&serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "hsm_backend": hsm.backend(),
        "token_label": cfg.hsm.device_label(),
        "keys": keys.values().map(|k| serde_json::json!({"name": k.name.as_str(), "public_key": k.public_key.to_base58()})).collect::<Vec<_>>(),
    }))
    .unwrap_or_default();
    let loaded = serde_json::to_vec(&serde_json::json!({
        "policy_sha256": policy.hash_hex(),
        "path": cfg.daemon.policy.display().to_string(),
        "agents": policy.agents.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
    }))
    .unwrap_or_default();
    ledger
        .write(move |txn| {
            txn.append(EventType::DaemonStarted, None, None, &started)?;
            txn.append(EventType::PolicyLoaded, None, None, &loaded)?;
            Ok(())
        })
        .await?;
    let hsm_for_checkpoints = Arc::clone(&hsm);
    let signer = Signer::new(
        ledger.clone(),
        hsm,
        keys,
        policy,
        cfg.daemon.policy.clone(),
        Duration::from_secs(cfg.daemon.approval_ttl_s),
    );
    // Signed checkpoints of the Merkle tree, over verified entries only. The
    // first covers this start before anything is recorded for an agent.
    let origin = cfg
        .ledger
        .origin
        .clone()
        .unwrap_or_else(|| format!("keyward/{}", cfg.hsm.device_label()));
    let checkpointer = Arc::new(crate::service::checkpoints::Checkpointer::new(
        Arc::clone(&hsm_for_checkpoints),
        ledger.clone(),
        audit_key.clone(),
        origin,
        established.walker,
        Arc::clone(signer.history_gate()),
    ));
    let every = cfg.ledger.checkpoint_every;
    let interval = Duration::from_secs(cfg.ledger.checkpoint_interval_s);
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
    let recovered = signer.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "recorded intents interrupted by the last stop; their reservations were released"
        );
    }

    let agent_listener = bind_socket(&cfg.daemon.agent_socket, 0o660).map_err(io(format!(
        "cannot bind agent socket {}",
        cfg.daemon.agent_socket.display()
    )))?;
    if let Some(group) = &cfg.daemon.agent_socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| {
                ConfigError::new(
                    &cfg.file,
                    "daemon.agent_socket_group",
                    format!("no group named {group:?}"),
                )
            })?
            .gid;
        nix::unistd::chown(&cfg.daemon.agent_socket, None, Some(gid)).map_err(|e| {
            io(format!(
                "cannot chown {}",
                cfg.daemon.agent_socket.display()
            ))(e.into())
        })?;
    }
    let admin_listener = bind_socket(&cfg.daemon.admin_socket, 0o600).map_err(io(format!(
        "cannot bind admin socket {}",
        cfg.daemon.admin_socket.display()
    )))?;

    let state = AppState {
        signer: Arc::clone(&signer),
        max_body: cfg.daemon.max_body_bytes,
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
    let agent_srv = serve(
        Socket {
            name: "agent",
            listener: agent_listener,
            router: with_request_timeout(agent_router(state.clone()), request_timeout),
            admission: Admission::Agents(Arc::clone(&signer)),
            limits,
        },
        stop_rx.clone(),
    );
    let admin_srv = serve(
        Socket {
            name: "admin",
            listener: admin_listener,
            router: with_request_timeout(admin_router(state), request_timeout),
            admission: Admission::Operators,
            limits,
        },
        stop_rx.clone(),
    );

    // The mirror gate: signing stops while the external copy lags.
    let mirror_task = cfg.mirror.clone().map(|m| {
        let gate = Arc::new(crate::service::MirrorGate::new(
            m.ack_dir
                .clone()
                .unwrap_or_else(|| cfg.daemon.state_dir.join("mirror")),
            crate::mirror::sinks(&m),
            m.max_unmirrored_entries,
            Duration::from_secs(m.max_unmirrored_age_s),
        ));
        signer.set_mirror_gate(Arc::clone(&gate));
        let ledger = ledger.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let g = Arc::clone(&gate);
                let l = ledger.clone();
                let _ = tokio::task::spawn_blocking(move || g.refresh(&l)).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown_signal(stop.clone()) => return,
                }
            }
        })
    });

    let cp = Arc::clone(&checkpointer);
    let cp_stop = stop_rx.clone();
    let verify_every = Duration::from_secs(cfg.ledger.verify_interval_s);
    let checkpoints = tokio::spawn(async move {
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
    });

    // Expire pending intents whose approval window has ended.
    let expiry_signer = Arc::clone(&signer);
    let expiry_stop = stop_rx.clone();
    let expiry = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown_signal(expiry_stop.clone()) => return,
            }
            match expiry_signer.expire_due().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "pending intents expired"),
                Err(e) => {
                    tracing::warn!(error = %e, "recording expired intents failed; will retry")
                }
            }
        }
    });

    // Retry recording interrupted intents while the ledger was failing.
    let recovery_signer = Arc::clone(&signer);
    let recovery_stop = stop_rx.clone();
    let recovery = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown_signal(recovery_stop.clone()) => return,
            }
            if recovery_signer.needs_recovery()
                && !recovery_signer.ledger().health().breaker_open
                && let Err(e) = recovery_signer.recover().await
            {
                tracing::warn!(error = %e, "recording interrupted intents failed; will retry");
            }
        }
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("cannot install SIGTERM handler"))?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(io("cannot install SIGINT handler"))?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        agent_socket = %cfg.daemon.agent_socket.display(),
        admin_socket = %cfg.daemon.admin_socket.display(),
        "keywardd ready"
    );
    let servers = tokio::spawn(async move {
        tokio::join!(agent_srv, admin_srv);
    });
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io("cannot install SIGHUP handler"))?;
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
                match signer.reload_policy("SIGHUP").await {
                    Ok(r) => tracing::info!(policy_sha256 = %r.policy_sha256, seq = r.ledger_seq, "SIGHUP: policy reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: policy reload refused; the old policy stays in force"),
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    if let Err(e) = servers.await {
        tracing::error!(error = %e, "server task failed");
    }
    let _ = recovery.await;
    let _ = expiry.await;
    let _ = checkpoints.await;
    if let Some(t) = mirror_task {
        let _ = t.await;
    }
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
    match checkpointer.maybe(every, interval, true).await {
        Ok(Some(m)) => tracing::info!(size = m.size, seq = m.seq, "final checkpoint recorded"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
    }
    let stopped =
        serde_json::to_vec(&serde_json::json!({ "pid": std::process::id() })).unwrap_or_default();
    let result = ledger
        .write(move |txn| {
            txn.append(EventType::DaemonStopped, None, None, &stopped)?;
            Ok(())
        })
        .await;
    drop(signer);
    ledger.close().await?;
    result?;
    Ok(())
}
