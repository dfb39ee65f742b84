//! `keyward hsm mock-connector`: the yubihsm crate's MockHsm (a software
//! YubiHSM 2) served over the `yubihsm-connector` HTTP protocol, so that a
//! development instance, the demo and the end-to-end tests run keywardd's
//! real YubiHSM backend, HTTP connector included, without a device.
//!
//! Built only with the cargo feature `yubihsm-mock` (test and development
//! builds; the release binary never has it). The MockHsm lives in this
//! process's memory: keys survive keywardd's restarts, not this process's.
//!
//! - `POST /connector/api` passes one message to the MockHsm and returns its
//!   answer; `GET /connector/status` answers `status=OK` as the real
//!   connector does. Messages are handled one at a time, as the device does,
//!   each after `latency` (a real YubiHSM 2 takes about 100 ms per Ed25519
//!   signature).
//! - `SIGUSR1` takes the connector down (the listening socket is closed and
//!   open connections are dropped, so clients get "connection refused", as
//!   with a stopped `yubihsm-connector` or an unplugged device); `SIGUSR2`
//!   brings it back on the same port with the same MockHsm.
//! - With `exit_when_gone`, the process exits once that directory is
//!   removed (a development instance's directory), so no test leaves one
//!   behind.
//! - A panic inside the MockHsm (it panics on some misuse, e.g. a taken
//!   object id) poisons it: the process then exits with status 70 rather
//!   than serve a broken device.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Mutex, watch};

/// What `keyward hsm mock-connector` serves.
#[derive(Debug, Clone)]
pub struct MockConnectorOptions {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// File to write the bound port into (atomically), once listening.
    pub port_file: Option<PathBuf>,
    /// Time each message takes inside the mock device.
    pub latency: Duration,
    /// Exit when this directory is gone.
    pub exit_when_gone: Option<PathBuf>,
}

/// Why the mock connector could not serve.
#[derive(Debug, thiserror::Error)]
#[error("mock connector: {0}")]
pub struct MockConnectorError(String);

struct Device {
    connector: yubihsm::Connector,
    latency: Duration,
    /// CreateSession messages seen (the MockHsm holds at most 16 sessions
    /// and never forgets one).
    sessions: std::sync::atomic::AtomicU64,
    /// One command at a time, as on the device.
    busy: Mutex<()>,
}

/// A mock connector running on its own thread in this process (tests).
pub struct MockConnector {
    addr: SocketAddr,
    online: watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockConnector {
    /// Starts a fresh MockHsm behind a connector on `opts.listen`, on its
    /// own thread (signals and `exit_when_gone` are the CLI's, not used).
    pub fn start(opts: MockConnectorOptions) -> Result<MockConnector, MockConnectorError> {
        let rt = runtime()?;
        let listener = rt.block_on(bind(&opts))?;
        let addr = local_addr(&listener)?;
        let (online, online_rx) = watch::channel(true);
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("mock-connector".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = accept_loop(listener, addr, device(&opts), online_rx) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .map_err(|e| MockConnectorError(format!("cannot start a thread: {e}")))?;
        Ok(MockConnector {
            addr,
            online,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the connector down (`false`: listener closed, connections
    /// dropped) or brings it back (`true`, same port, same MockHsm).
    pub fn set_online(&self, online: bool) {
        let _ = self.online.send(online);
    }
}

impl Drop for MockConnector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, MockConnectorError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| MockConnectorError(format!("cannot start a runtime: {e}")))
}

async fn bind(opts: &MockConnectorOptions) -> Result<TcpListener, MockConnectorError> {
    TcpListener::bind(opts.listen)
        .await
        .map_err(|e| MockConnectorError(format!("cannot listen on {}: {e}", opts.listen)))
}

fn local_addr(l: &TcpListener) -> Result<SocketAddr, MockConnectorError> {
    l.local_addr()
        .map_err(|e| MockConnectorError(e.to_string()))
}

fn device(opts: &MockConnectorOptions) -> Router {
    let device = Arc::new(Device {
        connector: yubihsm::Connector::mockhsm(),
        latency: opts.latency,
        sessions: std::sync::atomic::AtomicU64::new(0),
        busy: Mutex::new(()),
    });
    Router::new()
        .route("/connector/api", post(api))
        .route("/connector/status", get(status))
        .with_state(device)
}

/// Serves until killed (blocking; builds its own runtime): the CLI's
/// `keyward hsm mock-connector`, with the port file, the signals and
/// `exit_when_gone`.
pub fn serve(opts: MockConnectorOptions) -> Result<(), MockConnectorError> {
    runtime()?.block_on(run(opts))
}

async fn run(opts: MockConnectorOptions) -> Result<(), MockConnectorError> {
    let first = bind(&opts).await?;
    let addr = local_addr(&first)?;
    if let Some(file) = &opts.port_file {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", addr.port()))
            .and_then(|()| std::fs::rename(&tmp, file))
            .map_err(|e| MockConnectorError(format!("cannot write {}: {e}", file.display())))?;
    }
    tracing::info!(%addr, "MockHsm connector listening");

    if let Some(dir) = opts.exit_when_gone.clone() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !dir.exists() {
                    tracing::info!(dir = %dir.display(), "instance directory gone; exiting");
                    std::process::exit(0);
                }
            }
        });
    }

    let (online_tx, online_rx) = watch::channel(true);
    let mut down =
        signal(SignalKind::user_defined1()).map_err(|e| MockConnectorError(e.to_string()))?;
    let mut up =
        signal(SignalKind::user_defined2()).map_err(|e| MockConnectorError(e.to_string()))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = down.recv() => { let _ = online_tx.send(false); }
                _ = up.recv() => { let _ = online_tx.send(true); }
            }
        }
    });
    accept_loop(first, addr, device(&opts), online_rx).await;
    Ok(())
}

/// Accepts and serves connections while online; offline, the listener is
/// closed and open connections are dropped until online again.
async fn accept_loop(
    first: TcpListener,
    addr: SocketAddr,
    app: Router,
    online_rx: watch::Receiver<bool>,
) {
    let mut listener = Some(first);
    let mut online = online_rx.clone();
    loop {
        match listener.as_ref() {
            Some(l) => {
                tokio::select! {
                    accepted = l.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let service = TowerToHyperService::new(app.clone());
                        let mut offline = online_rx.clone();
                        tokio::spawn(async move {
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service);
                            tokio::select! {
                                _ = conn => {}
                                _ = offline.wait_for(|on| !*on) => {}
                            }
                        });
                    }
                    _ = online.wait_for(|on| !*on) => {
                        tracing::info!("connector down");
                        listener = None;
                    }
                }
            }
            None => {
                if online.wait_for(|on| *on).await.is_err() {
                    return;
                }
                // The same port again; a client may hold it in TIME_WAIT,
                // which SO_REUSEADDR (set by tokio) allows.
                loop {
                    match TcpListener::bind(addr).await {
                        Ok(l) => {
                            listener = Some(l);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(%addr, "cannot listen again yet: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                tracing::info!("connector up");
            }
        }
    }
}

async fn status() -> String {
    format!(
        "status=OK\nserial=*\nversion=keyward-mockhsm\npid={}\n",
        std::process::id()
    )
}

async fn api(State(device): State<Arc<Device>>, body: Bytes) -> Result<Vec<u8>, StatusCode> {
    let _one_at_a_time = device.busy.lock().await;
    if !device.latency.is_zero() {
        tokio::time::sleep(device.latency).await;
    }
    // The command code is the message's first byte (CreateSession: 0x03).
    if body.first() == Some(&0x03) {
        let n = device
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        tracing::info!(sessions = n, "MockHsm session opened");
    }
    let connector = device.connector.clone();
    let answer = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            connector.send_message(uuid::Uuid::new_v4(), body.to_vec().into())
        }))
    })
    .await;
    match answer {
        Ok(Ok(Ok(message))) => Ok(message.into()),
        Ok(Ok(Err(e))) => {
            tracing::warn!("MockHsm refused a message: {e}");
            Err(StatusCode::BAD_REQUEST)
        }
        Ok(Err(_)) | Err(_) => {
            eprintln!("keyward hsm mock-connector: the MockHsm panicked and is poisoned; exiting");
            std::process::exit(70);
        }
    }
}
