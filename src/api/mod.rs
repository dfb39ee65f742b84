//! HTTP/1.1 over Unix sockets: the agent API and the admin API.
//!
//! The caller's identity is the peer uid the kernel reports for the socket
//! (`SO_PEERCRED`), never anything the caller says.

mod admin;
mod agent;
mod body;
mod error;
mod peer;

use std::path::Path;
use std::sync::Arc;

pub use admin::admin_router;
pub use agent::agent_router;
pub use error::ApiError;
pub use peer::PeerCred;

use crate::service::Signer;

/// State shared by the handlers of one socket.
#[derive(Clone)]
pub struct AppState {
    /// The signing service.
    pub signer: Arc<Signer>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// The audit key that signs checkpoints: (public key, verifier key).
    pub audit_key: Option<(String, String)>,
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
