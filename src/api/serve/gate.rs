//! Admission at accept: which peers a socket serves, how many connections
//! each may hold, how a refused one is answered without being read, and how
//! much of that is logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_client::wire::{ErrorBody, ErrorDetail, codes};
use tokio::net::UnixStream;

use super::Limits;
use crate::api::peer::is_operator;
use crate::api::{AdminGroup, PeerCred};
use crate::service::Signer;

/// How long a refused connection is held (never read) before it is
/// closed; it is answered as soon as its peer sends, or at the end.
pub const LINGER: Duration = Duration::from_secs(1);

/// Refused connections held at once per socket (each holds a descriptor;
/// [`crate::fds`] counts them).
pub const MAX_LINGERING: usize = 64;

/// Which peers a socket serves; checked at accept, before any byte is read.
#[derive(Clone)]
pub enum Admission {
    /// The agent socket: uids the policy in force binds to an agent (looked
    /// up on each accept, so a policy reload takes effect at once).
    Agents(Arc<Signer>),
    /// The admin socket: root, the daemon's own effective uid and the
    /// members of `daemon.admin_socket_group` when it is set.
    Operators(Option<AdminGroup>),
}

impl Admission {
    fn admits(&self, peer: &PeerCred) -> bool {
        match self {
            Admission::Agents(signer) => peer
                .uid
                .is_some_and(|uid| signer.policy().agent_for_uid(uid).is_some()),
            Admission::Operators(group) => is_operator(group.as_ref(), peer),
        }
    }
}

/// Open connections of one socket, overall and per uid.
struct Slots {
    max: usize,
    max_per_uid: usize,
    state: Mutex<(usize, HashMap<u32, usize>)>,
}

/// A held connection slot, released on drop.
pub(super) struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The socket holds `daemon.max_connections`.
    Socket,
    /// The uid holds `daemon.max_connections_per_uid`.
    Uid,
    /// The uid is not served by this socket (or unknown).
    Stranger,
}

/// The answer written to a refused connection: an HTTP/1.1 response with
/// the API's error body and `Connection: close`.
fn refusal_response(admission: &Admission, refusal: Refusal) -> Vec<u8> {
    let (status, code, message, retry_after) = match (refusal, admission) {
        (Refusal::Stranger, Admission::Agents(_)) => (
            "403 Forbidden",
            codes::UNKNOWN_AGENT,
            "this uid is not an agent in the policy",
            None,
        ),
        (Refusal::Stranger, Admission::Operators(_)) => (
            "403 Forbidden",
            "not_an_operator",
            crate::api::admin::NOT_AN_OPERATOR,
            None,
        ),
        (Refusal::Socket | Refusal::Uid, _) => (
            "503 Service Unavailable",
            codes::TOO_MANY_CONNECTIONS,
            if refusal == Refusal::Uid {
                "this uid holds as many connections as daemon.max_connections_per_uid allows; reuse or close one"
            } else {
                "the socket holds as many connections as daemon.max_connections allows"
            },
            Some(1),
        ),
    };
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.to_owned(),
            reasons: Vec::new(),
            retry_after,
        },
    })
    .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(s) = retry_after {
        head.push_str(&format!("retry-after: {s}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    out
}

impl Slots {
    fn take(self: &Arc<Self>, uid: u32) -> Result<Slot, Refusal> {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (total, per_uid) = &mut *guard;
        if *total >= self.max {
            return Err(Refusal::Socket);
        }
        let mine = per_uid.entry(uid).or_insert(0);
        if *mine >= self.max_per_uid {
            return Err(Refusal::Uid);
        }
        *mine += 1;
        *total += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = match self.slots.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (total, per_uid) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
    }
}

/// Logs at most [`LogBudget::PER_WINDOW`] lines per window and then one
/// summary of what it held back, so a flood of refused connections cannot
/// flood the log.
struct LogBudget {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    const PER_WINDOW: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(10);

    fn new() -> LogBudget {
        LogBudget {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this event; reports the events held back in the
    /// previous window when a new window starts.
    fn allow(&mut self, socket: &'static str) -> bool {
        if self.window_start.elapsed() >= Self::WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(
                    socket,
                    suppressed = self.suppressed,
                    "refused connections not logged one by one in the last window"
                );
            }
            self.window_start = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::PER_WINDOW {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Whether an `accept()` error means the process or system is out of a
/// resource (back off) rather than one failed connection (go on).
fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(nix::errno::Errno::from_raw),
        Some(
            nix::errno::Errno::EMFILE
                | nix::errno::Errno::ENFILE
                | nix::errno::Errno::ENOBUFS
                | nix::errno::Errno::ENOMEM
        )
    )
}

/// Resolves once the peer has sent something (or hung up), without reading
/// it: the kernel is asked with `poll(2)` whether input is waiting, since
/// the runtime's readiness may fire without any.
async fn peer_has_sent(stream: &UnixStream) {
    use std::os::fd::AsFd;
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let waiting = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut fds = [nix::poll::PollFd::new(
                stream.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
                Ok(n) if n > 0 => Ok(()),
                // Clears the runtime's readiness until the next event.
                _ => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        });
        if waiting.is_ok() {
            return;
        }
    }
}

/// Decides, for each accepted connection, whether it is served.
pub(super) struct Gate {
    name: &'static str,
    admission: Admission,
    limits: Limits,
    slots: Arc<Slots>,
    /// Refused connections that may be held after their answer.
    lingering: Arc<tokio::sync::Semaphore>,
    log: LogBudget,
}

impl Gate {
    pub(super) fn new(name: &'static str, admission: Admission, limits: Limits) -> Gate {
        Gate {
            name,
            admission,
            limits,
            slots: Arc::new(Slots {
                max: limits.max_connections,
                max_per_uid: limits.max_per_uid,
                state: Mutex::new((0, HashMap::new())),
            }),
            lingering: Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING)),
            log: LogBudget::new(),
        }
    }

    /// A slot for the peer if it may be served now; otherwise logs why
    /// (within the log budget).
    pub(super) fn admit(&mut self, peer: PeerCred) -> Result<Slot, Refusal> {
        let name = self.name;
        let Some(uid) = peer.uid.filter(|_| self.admission.admits(&peer)) else {
            if self.log.allow(name) {
                tracing::warn!(
                    socket = name,
                    uid = ?peer.uid,
                    pid = ?peer.pid,
                    "connection from a uid this socket does not serve; refused before reading"
                );
            }
            return Err(Refusal::Stranger);
        };
        match self.slots.take(uid) {
            Ok(slot) => Ok(slot),
            Err(refusal) => {
                if self.log.allow(name) {
                    let (limit, which) = match refusal {
                        Refusal::Socket | Refusal::Stranger => {
                            (self.limits.max_connections, "daemon.max_connections")
                        }
                        Refusal::Uid => (self.limits.max_per_uid, "daemon.max_connections_per_uid"),
                    };
                    tracing::warn!(
                        socket = name,
                        uid,
                        pid = ?peer.pid,
                        limit,
                        "connection refused: {which} reached"
                    );
                }
                Err(refusal)
            }
        }
    }

    /// Answers a refused connection and closes it, never reading from it.
    /// The answer goes out once the peer has sent something (an HTTP client
    /// drops an answer that comes before its request) or after [`LINGER`],
    /// followed by end-of-file; the socket is closed [`LINGER`] after
    /// accept, so that a client still writing its request is not cut off
    /// before it reads the answer. Beyond [`MAX_LINGERING`] waiting, the
    /// answer is written and the socket closed at once. Writes never wait:
    /// a fresh socket's send buffer takes the few hundred bytes.
    pub(super) fn refuse(&self, stream: UnixStream, refusal: Refusal) {
        let answer = refusal_response(&self.admission, refusal);
        let Ok(permit) = Arc::clone(&self.lingering).try_acquire_owned() else {
            let _ = stream.try_write(&answer);
            return;
        };
        let until = tokio::time::Instant::now() + LINGER;
        tokio::spawn(async move {
            let _ = tokio::time::timeout_at(until, peer_has_sent(&stream)).await;
            let _ = stream.try_write(&answer);
            if let Ok(stream) = stream.into_std() {
                let _ = stream.shutdown(std::net::Shutdown::Write);
                tokio::time::sleep_until(until).await;
                drop(stream);
            }
            drop(permit);
        });
    }

    /// After a failed `accept()`: backs off when the process or the system
    /// is out of descriptors or memory (accepting again at once would spin),
    /// longer each time up to a second; returns the next back-off.
    pub(super) async fn accept_failed(
        &mut self,
        e: &std::io::Error,
        backoff: Duration,
    ) -> Duration {
        if !is_resource_exhaustion(e) {
            tracing::debug!(socket = self.name, error = %e, "accept failed");
            return Duration::ZERO;
        }
        let backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        if self.log.allow(self.name) {
            tracing::error!(
                socket = self.name,
                error = %e,
                backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "accept failed for lack of resources; backing off"
            );
        }
        tokio::time::sleep(backoff).await;
        backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_per_socket_and_per_uid_and_free_on_drop() {
        let slots = Arc::new(Slots {
            max: 3,
            max_per_uid: 2,
            state: Mutex::new((0, HashMap::new())),
        });
        let a1 = slots.take(1).unwrap();
        let _a2 = slots.take(1).unwrap();
        assert_eq!(slots.take(1).err(), Some(Refusal::Uid));
        let _b1 = slots.take(2).unwrap();
        assert_eq!(slots.take(3).err(), Some(Refusal::Socket));
        drop(a1);
        let _a3 = slots.take(1).unwrap();
        assert_eq!(slots.take(2).err(), Some(Refusal::Socket));
    }

    #[test]
    fn refusals_answer_with_the_api_error_shape() {
        let text = String::from_utf8(refusal_response(
            &Admission::Operators(None),
            Refusal::Stranger,
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let parsed: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.error.code, "not_an_operator");
        let text =
            String::from_utf8(refusal_response(&Admission::Operators(None), Refusal::Uid)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("retry-after: 1\r\n"), "{text}");
        assert!(text.contains("\"too_many_connections\""), "{text}");
    }

    #[test]
    fn log_budget_holds_back_a_flood() {
        let mut log = LogBudget::new();
        let allowed = (0..1000).filter(|_| log.allow("agent")).count();
        assert_eq!(allowed, LogBudget::PER_WINDOW as usize);
        assert_eq!(log.suppressed, 1000 - u64::from(LogBudget::PER_WINDOW));
    }

    #[test]
    fn descriptor_exhaustion_is_told_apart_from_a_failed_connection() {
        let emfile = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let enfile = std::io::Error::from_raw_os_error(nix::errno::Errno::ENFILE as i32);
        let aborted = std::io::Error::from_raw_os_error(nix::errno::Errno::ECONNABORTED as i32);
        assert!(is_resource_exhaustion(&emfile));
        assert!(is_resource_exhaustion(&enfile));
        assert!(!is_resource_exhaustion(&aborted));
    }
}
