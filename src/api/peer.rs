//! Peer credentials of a Unix-socket connection.

/// The kernel-reported identity of the connected process (`SO_PEERCRED`),
/// read by [`super::serve`] right after `accept()` and handed to the
/// handlers as `ConnectInfo<PeerCred>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Peer uid; `None` if the kernel could not tell (the connection is
    /// closed at accept).
    pub uid: Option<u32>,
    /// Peer pid, for logs.
    pub pid: Option<i32>,
}
