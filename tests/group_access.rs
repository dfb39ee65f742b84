//! The groups of the installed layout, for real with a second uid: the
//! admin socket given to `daemon.admin_socket_group` admits that group's
//! members and nobody else, and the ledger database (with its `-wal` and
//! `-shm` files) is readable by the daemon's group, so a member who is not
//! its owner runs `keyward audit verify` on the database a running keywardd
//! holds open in WAL mode (the mirror's read-only open is the same call).
//! Needs root to run the second uid (the tests run as root, as CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A group every Debian system has, that neither the test nor the daemon
/// (root) has as its primary group: the group the tests hand out.
const GROUP: &str = "nogroup";
const GROUP_GID: u32 = 65534;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Lets other uids traverse to the instance's files (the temporary
/// directories are private); the files themselves keep their modes.
fn open_dirs(inst: &Instance) {
    set_mode(inst.dir.path(), 0o755);
    set_mode(inst.inst_dir(), 0o755);
}

fn chgrp(p: &Path, gid: u32) {
    nix::unistd::chown(p, None, Some(nix::unistd::Gid::from_raw(gid))).unwrap();
}

fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

#[test]
fn admin_socket_group_admits_its_members_and_refuses_others() {
    require_other_uids();
    assert_eq!(
        nix::unistd::Group::from_name(GROUP)
            .unwrap()
            .map(|g| g.gid.as_raw()),
        Some(GROUP_GID),
        "group {GROUP} is missing"
    );
    let mut inst = Instance::init();
    inst.add_daemon_config(&format!("admin_socket_group = \"{GROUP}\""));
    inst.start();
    open_dirs(&inst);
    let meta = std::fs::metadata(&inst.admin_socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), GROUP_GID);

    // A member (primary group) uses the admin API.
    let out = perl_as(
        OTHER_UID,
        HTTP_GET_PL,
        &[inst.admin_socket.to_str().unwrap(), "/v1/admin/keys"],
    )
    .gid(GROUP_GID)
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("hot"),
        "member of {GROUP}: {text}"
    );

    // Someone outside the group cannot even connect (the kernel's check of
    // the socket's mode and group) ...
    let out = perl_as(
        OTHER_UID,
        HTTP_GET_PL,
        &[inst.admin_socket.to_str().unwrap(), "/v1/admin/keys"],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("connect failed: Permission denied"),
        "outside {GROUP}: {text}"
    );
    // ... and with the socket opened up by mistake, the daemon's own check
    // refuses them.
    set_mode(&inst.admin_socket, 0o666);
    let out = perl_as(
        OTHER_UID,
        HTTP_GET_PL,
        &[inst.admin_socket.to_str().unwrap(), "/v1/admin/keys"],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 403") && text.contains("not_an_operator"),
        "outside {GROUP}, socket opened up: {text}"
    );
    inst.stop();
}

/// One GET with `Connection: close`; prints the whole answer, or
/// `connect failed: <errno text>`.
const HTTP_GET_PL: &str = r#"
use strict; use IO::Socket::UNIX;
my ($path, $target) = @ARGV;
my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path) or do { print "connect failed: $!\n"; exit 0 };
syswrite($c, "GET $target HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n\r\n");
local $/; my $all = <$c>; print $all // "";
"#;

#[test]
fn a_ledger_group_member_verifies_the_live_wal_database_it_does_not_own() {
    require_other_uids();
    let mut inst = Instance::start_default();
    let to = random_pubkey();
    rt().block_on(
        inst.client()
            .submit_intent(&transfer("group-read-1", &to, "0.1")),
    )
    .unwrap();

    // While keywardd holds the database open in WAL mode: the database,
    // its -wal and its -shm are 0640 (SQLite gives the side files the
    // database's mode; the daemon's umask is 0077).
    let wal = side_file(&inst.db, "-wal");
    let shm = side_file(&inst.db, "-shm");
    for f in [&inst.db, &wal, &shm] {
        assert_eq!(mode(f), 0o640, "{}", f.display());
    }

    // What the package's setgid state directory does: the files belong to
    // the ledger group. The reader is in that group and owns nothing.
    let state = inst.db.parent().unwrap().to_path_buf();
    chgrp(&state, GROUP_GID);
    set_mode(&state, 0o2750);
    for f in [&inst.db, &wal, &shm] {
        chgrp(f, GROUP_GID);
    }
    open_dirs(&inst);
    // The CLI and the pinned audit key where the other uid can reach them
    // (the build directory is under root's home).
    let bin = inst.dir.path().join("keyward");
    std::fs::copy(KEYWARD, &bin).unwrap();
    set_mode(&bin, 0o755);
    let vkey = inst.dir.path().join("audit.vkey");
    std::fs::copy(inst.audit_vkey_file(), &vkey).unwrap();
    set_mode(&vkey, 0o644);

    let db = inst.db.clone();
    let verify = |gid: u32| {
        Command::new(&bin)
            .args(["audit", "verify", "--db"])
            .arg(&db)
            .arg("--vkey-file")
            .arg(&vkey)
            .uid(OTHER_UID)
            .gid(gid)
            .output()
            .unwrap()
    };
    let out = verify(GROUP_GID);
    assert!(
        out.status.success(),
        "audit verify as a member of the ledger group: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inst.is_running(), "{}", inst.log());

    // Outside the group: refused by the file modes.
    let out = verify(OTHER_UID);
    assert!(
        !out.status.success(),
        "audit verify outside the ledger group succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    inst.stop();
}
