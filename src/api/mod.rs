//! HTTP/1.1 over Unix sockets: the agent API and the admin API.
//!
//! The caller's identity is the peer uid the kernel reports for the socket
//! (`SO_PEERCRED`), never anything the caller says.

mod admin;
mod agent;
mod body;
mod error;
mod peer;
pub mod serve;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use keyward_client::wire::codes;

pub use admin::admin_router;
pub use agent::agent_router;
pub use error::{ApiError, intent_reply_status, submit_error_status};
pub use peer::{AdminGroup, PeerCred};

use crate::service::{Operations, Signer};

/// State shared by the handlers of one socket.
#[derive(Clone)]
pub struct AppState {
    /// The signing service (the agent socket's, and the admin socket's
    /// relay of approval tokens).
    pub signer: Arc<Signer>,
    /// The operations service (the admin socket's).
    pub operations: Arc<Operations>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// The audit key that signs checkpoints: (public key, verifier key).
    pub audit_key: Option<(String, String)>,
    /// `daemon.admin_socket_group`, whose members may use the admin API.
    pub admin_group: Option<AdminGroup>,
}

/// Binds a Unix socket at `path` with `mode`, refusing to take over a socket
/// another live process is serving. A stale socket file left by a crash is
/// replaced.
pub fn bind_socket(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Bind under a restrictive umask-equivalent: create, then chmod before
    // anyone is told the daemon is ready.
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Wraps every request of `router` in a whole-request time limit
/// (`daemon.request_timeout_s`): from the complete request head to the
/// response, including reading the body. A request over the limit gets 503
/// `request_timeout`. Submissions and approvals run in their own tasks, so
/// a decision in progress is still recorded to the end; only the wait for
/// it is cut, and `GET /v1/intents/{id}` tells its outcome.
pub fn with_request_timeout(router: Router, limit: Duration) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(limit, next.run(req)).await {
                Ok(response) => response,
                Err(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::REQUEST_TIMEOUT,
                    format!(
                        "the request took longer than {} s (daemon.request_timeout_s); an intent already submitted is still recorded: ask GET /v1/intents/{{id}} for its outcome",
                        limit.as_secs()
                    ),
                )
                .into_response(),
            }
        },
    ))
}
