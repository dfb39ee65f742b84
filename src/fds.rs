//! File descriptors: the connection limits must leave room for the HSM and
//! the ledger.
//!
//! Every accepted connection holds one descriptor. If connections could take
//! them all, the PKCS#11 module (SoftHSM2 opens its token files on each
//! operation) and SQLite would fail to open files, and a module that loses
//! its object store may not recover on its own. So the daemon raises its
//! soft `RLIMIT_NOFILE` to the hard limit and refuses to start unless both
//! sockets' connection limits (plus the refused connections each may hold
//! for a moment, [`crate::api::serve::MAX_LINGERING`]) and a fixed
//! [`RESERVED_FDS`] fit under it.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for everything but client connections: the ledger (the
/// database, its WAL and shared-memory files for the writer and each pooled
/// reader), the HSM module (token files, device or network handles), the
/// mirror's acknowledgement files, the listening sockets, the runtime
/// (epoll, eventfd, signal pipes), standard streams and logging.
pub const RESERVED_FDS: u64 = 256;

/// The descriptor budget does not fit the limit the daemon may use.
#[derive(Debug, thiserror::Error)]
#[error(
    "the open-file limit is {limit} (hard limit {hard}) but the connection limits need {needed}: \
     2 sockets x (daemon.max_connections + {lingering} refused connections held for a moment) = \
     {connections} plus {reserved} reserved for the HSM, the ledger and the mirror; raise \
     LimitNOFILE= in the unit (or `ulimit -n`) or lower daemon.max_connections"
)]
pub struct FdBudgetError {
    /// Soft limit in force after trying to raise it.
    pub limit: u64,
    /// Hard limit.
    pub hard: u64,
    /// Descriptors needed.
    pub needed: u64,
    /// Of which for connections.
    pub connections: u64,
    /// Refused connections each socket may hold for a moment.
    pub lingering: u64,
    /// Of which reserved.
    pub reserved: u64,
}

/// Descriptors needed for `max_connections` on each of the two sockets.
pub fn needed(max_connections: usize) -> u64 {
    let per_socket = max_connections.saturating_add(crate::api::serve::MAX_LINGERING);
    2 * u64::try_from(per_socket).unwrap_or(u64::MAX / 4) + RESERVED_FDS
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (always allowed) and
/// checks that `max_connections` on both sockets plus [`RESERVED_FDS`] fit.
/// Returns the soft limit in force.
pub fn reserve(max_connections: usize) -> Result<u64, FdBudgetError> {
    let need = needed(max_connections);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if limit < need {
        return Err(FdBudgetError {
            limit,
            hard,
            needed: need,
            connections: need - RESERVED_FDS,
            lingering: crate::api::serve::MAX_LINGERING as u64,
            reserved: RESERVED_FDS,
        });
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limits_fit_systemds_default_of_1024() {
        assert_eq!(needed(256), 896);
        assert!(needed(256) <= 1024);
        assert_eq!(needed(16_384), 33_152);
    }

    #[test]
    fn the_error_names_the_numbers_and_the_fix() {
        let e = FdBudgetError {
            limit: 512,
            hard: 512,
            needed: 896,
            connections: 640,
            lingering: 64,
            reserved: 256,
        };
        let msg = e.to_string();
        for part in ["512", "896", "LimitNOFILE", "daemon.max_connections"] {
            assert!(msg.contains(part), "{msg}");
        }
    }
}
