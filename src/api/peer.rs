//! Peer credentials of a Unix-socket connection.

/// The kernel-reported identity of the connected process (`SO_PEERCRED`),
/// read by [`super::serve`] right after `accept()` and handed to the
/// handlers as `ConnectInfo<PeerCred>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Peer uid; `None` if the kernel could not tell (the connection is
    /// closed at accept).
    pub uid: Option<u32>,
    /// Peer's primary gid (what `SO_PEERCRED` reports; supplementary groups
    /// are not in it).
    pub gid: Option<u32>,
    /// Peer pid, for logs.
    pub pid: Option<i32>,
}

/// The group given the admin socket (`daemon.admin_socket_group`), resolved
/// when the socket is bound: its members may use the admin API besides root
/// and the daemon's own user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdminGroup {
    /// The group's gid: a peer whose primary group it is is a member.
    pub gid: u32,
    /// Users listed as its members in the group database at start-up
    /// (a user added later is admitted after the daemon restarts, as a
    /// login session sees a new group only after logging in again).
    pub member_uids: Vec<u32>,
}

impl AdminGroup {
    /// Resolves group `name` and its listed members from the system's
    /// group and user databases; `None` when there is no such group.
    pub fn resolve(name: &str) -> Option<AdminGroup> {
        let group = nix::unistd::Group::from_name(name).ok().flatten()?;
        let member_uids = group
            .mem
            .iter()
            .filter_map(|user| nix::unistd::User::from_name(user).ok().flatten())
            .map(|user| user.uid.as_raw())
            .collect();
        Some(AdminGroup {
            gid: group.gid.as_raw(),
            member_uids,
        })
    }

    /// Whether the peer belongs to the group.
    pub fn admits(&self, peer: &PeerCred) -> bool {
        peer.gid == Some(self.gid) || peer.uid.is_some_and(|uid| self.member_uids.contains(&uid))
    }
}

/// Whether `peer` may use the admin socket: root, the daemon's own
/// effective uid, or a member of `group` (`daemon.admin_socket_group`).
/// The connection gate and every admin handler ask this one question.
pub fn is_operator(group: Option<&AdminGroup>, peer: &PeerCred) -> bool {
    match peer.uid {
        Some(uid) if uid == 0 || uid == nix::unistd::geteuid().as_raw() => true,
        Some(_) => group.is_some_and(|g| g.admits(peer)),
        None => false,
    }
}
