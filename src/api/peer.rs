//! Peer credentials of a Unix-socket connection.

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;

/// The kernel-reported identity of the connected process (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Peer uid; `None` if the kernel could not tell (the request is refused).
    pub uid: Option<u32>,
    /// Peer pid, for logs.
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for PeerCred {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => PeerCred {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(_) => PeerCred {
                uid: None,
                pid: None,
            },
        }
    }
}
