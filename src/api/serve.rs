//! The accept loop of both sockets: who may connect, how many, for how long.
//!
//! `axum::serve` reads a request before anyone asks who sent it and keeps
//! every connection for as long as the peer likes, so one local process
//! could hold all of the daemon's descriptors. Here, for each connection:
//!
//! 1. the peer's credentials (`SO_PEERCRED`) are read right after
//!    `accept()`, before any byte, and a uid the socket does not serve is
//!    refused at once ([`Admission`], in `gate`);
//! 2. it must fit under the socket's limit overall and per uid, or it is
//!    refused at once ([`Limits`]);
//!
//!    A refused connection gets a canned error answer (403 `unknown_agent`
//!    or `not_an_operator`, 503 `too_many_connections`) and is closed
//!    [`LINGER`] after accept; no byte of it is ever read. The answer waits
//!    until the peer has sent something (its request, unread) or [`LINGER`]
//!    has passed, because an HTTP client drops an answer that comes before
//!    its request; at most [`MAX_LINGERING`] refused connections are held at
//!    a time, and beyond that they are answered and closed at once;
//! 3. hyper serves it with a header-read timeout (which also bounds idle
//!    keep-alive waits), and the router wraps each request in the
//!    whole-request timeout ([`super::with_request_timeout`]);
//! 4. on shutdown, accepting stops, each connection is told to finish its
//!    request and close, and whatever is left at the deadline is dropped.
//!
//! `accept()` failing for lack of descriptors (`EMFILE`, `ENFILE`) backs off
//! instead of spinning, and never stops the loop.

mod gate;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

pub use gate::{Admission, LINGER, MAX_LINGERING};
use gate::{Gate, Slot};

use super::PeerCred;

/// Limits and timeouts of one socket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections per peer uid at most.
    pub max_per_uid: usize,
    /// Longest wait for a complete request head (also bounds idle waits).
    pub header_read_timeout: Duration,
    /// How long connections may finish their requests after shutdown.
    pub shutdown_grace: Duration,
}

/// One socket to serve.
pub struct Socket {
    /// For logs: `agent` or `admin`.
    pub name: &'static str,
    /// The bound listener.
    pub listener: UnixListener,
    /// The routes (with the request timeout already layered on).
    pub router: Router,
    /// Who may connect.
    pub admission: Admission,
    /// Limits and timeouts.
    pub limits: Limits,
}

fn peer_cred(stream: &UnixStream) -> PeerCred {
    match stream.peer_cred() {
        Ok(cred) => PeerCred {
            uid: Some(cred.uid()),
            gid: Some(cred.gid()),
            pid: cred.pid(),
        },
        Err(_) => PeerCred {
            uid: None,
            gid: None,
            pid: None,
        },
    }
}

/// Serves one admitted connection until it ends or `stop` turns true; then
/// lets it finish the request in progress and close.
async fn connection(
    http: hyper::server::conn::http1::Builder,
    stream: UnixStream,
    peer: PeerCred,
    router: Router,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    let _slot = slot;
    let service = router.map_request(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Serves `socket` until `stop` turns true, then drains: each connection
/// finishes its request in progress and closes; connections still open
/// after `limits.shutdown_grace` are closed.
pub async fn serve(socket: Socket, mut stop: watch::Receiver<bool>) {
    let Socket {
        name,
        listener,
        router,
        admission,
        limits,
    } = socket;
    let mut gate = Gate::new(name, admission, limits);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    while !*stop.borrow() {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    // Who it is, before any byte is read.
                    let peer = peer_cred(&stream);
                    match gate.admit(peer) {
                        Ok(slot) => {
                            connections.spawn(connection(
                                http.clone(),
                                stream,
                                peer,
                                router.clone(),
                                slot,
                                stop.clone(),
                            ));
                        }
                        Err(refusal) => gate.refuse(stream, refusal),
                    }
                }
                Err(e) => backoff = gate.accept_failed(&e, backoff).await,
            },
        }
    }
    drop(listener);
    let open = connections.len();
    if open > 0 {
        tracing::info!(
            socket = name,
            open,
            grace_s = limits.shutdown_grace.as_secs(),
            "draining connections"
        );
    }
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            socket = name,
            closed = connections.len(),
            "shutdown grace over; closing the connections left"
        );
        connections.shutdown().await;
    }
}
