//! Local denial of service through the sockets, and an HSM module that
//! loses its state: a real keywardd (under a 1024-descriptor limit where it
//! matters), real peers of other uids (perl processes started with another
//! uid), a real SoftHSM2 token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use keyward_client::IntentOutcome;

/// A uid the policy binds to a second agent, `flood`.
const FLOOD_UID: u32 = OTHER_UID;
/// A uid no policy names.
const STRANGER_UID: u32 = 4343;

/// `dev` (this process, uid 0) and `flood` (uid 4242), both on `hot`.
const TWO_AGENTS: &str = "[agents.dev]\nuid = {UID}\nkeys = [\"hot\"]\n\
[agents.dev.limits.SOL]\nper_tx = \"1\"\nper_day = \"100\"\n\n\
[agents.flood]\nuid = 4242\nkeys = [\"hot\"]\n\
[agents.flood.limits.SOL]\nper_tx = \"1\"\nper_day = \"1\"\n";

/// Holds `n` connections to `socket`, each with half a request head sent,
/// until its stdin closes; prints `ready <connected>` once they are open.
const FLOOD_PL: &str = r#"
use strict; use IO::Socket::UNIX; use IO::Handle;
$SIG{PIPE} = 'IGNORE';
my ($path, $n) = @ARGV; my @held; my $ok = 0;
for (1 .. $n) {
    my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path) or next;
    syswrite($c, "POST /v1/intents HTTP/1.1\r\nHost: keyward\r\nContent-Ty");
    push @held, $c; $ok++;
}
print "ready $ok\n"; STDOUT->flush;
my $line = <STDIN>;
"#;

/// Connects to `socket`, sends nothing and reads until the daemon closes
/// the connection: prints `closed <status line>` then, or `timeout` if it
/// is still open after 10 s.
const SILENT_PL: &str = r#"
use strict; use IO::Socket::UNIX; use IO::Select;
my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or do { print "connect failed: $!\n"; exit 0 };
my $sel = IO::Select->new($c); my $all = ""; my $deadline = time + 10;
while (1) {
    my $left = $deadline - time;
    if ($left <= 0 || !$sel->can_read($left)) { print "timeout\n"; exit 0 }
    my $buf; my $n = sysread($c, $buf, 4096);
    if (!$n) { my ($line) = split /\r\n/, $all; $line //= ""; print "closed $line\n"; exit 0 }
    $all .= $buf;
}
"#;

/// One HTTP/1.1 GET with `Connection: close`; the status, or an error if
/// there is no answer within `limit`.
fn get_within(socket: &Path, path: &str, limit: Duration) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.set_write_timeout(Some(limit)).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("no answer within {limit:?}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Submits a 0.001 SOL transfer as this process (agent `dev`) and expects a
/// signature within `limit`.
fn signs_within(inst: &Instance, id: &str, limit: Duration) {
    let client = inst.client().with_timeout(limit);
    let req = transfer(id, &random_pubkey(), "0.001");
    let started = Instant::now();
    let out =
        rt().block_on(async { tokio::time::timeout(limit, client.submit_intent(&req)).await });
    match out {
        Ok(Ok(IntentOutcome::Signed(_))) => {}
        other => panic!(
            "intent {id} not signed within {limit:?} (after {:?}): {other:?}",
            started.elapsed()
        ),
    }
}

/// Reads the flood's `ready N` line, or gives up after `limit` (a daemon
/// that stops accepting leaves connects hanging; the test then goes on to
/// show what that does to everyone else).
fn wait_ready(child: &mut Child, limit: Duration) -> Option<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_flood_of_half_open_connections_from_one_agent_leaves_others_and_the_admin_socket_working() {
    require_other_uids();
    let mut inst = Instance::init();
    inst.write_policy(TWO_AGENTS);
    // systemd's default soft limit, here as the hard limit too.
    inst.set_nofile(1024);
    inst.start();
    open_up(&inst, &inst.agent_socket.clone());
    signs_within(&inst, "before-flood", Duration::from_secs(10));

    let socket = inst.agent_socket.to_str().unwrap().to_owned();
    let mut flood = perl_as(FLOOD_UID, FLOOD_PL, &[&socket, "1100"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_ready(&mut flood, Duration::from_secs(60));
    eprintln!("flood: {ready:?}");
    // The daemon has taken the flood up to its per-uid limit and refuses
    // the rest.
    wait_until(
        "the daemon to refuse the flood beyond its limit",
        Duration::from_secs(30),
        || {
            inst.log()
                .contains("daemon.max_connections_per_uid reached")
        },
    );

    let limit = Duration::from_secs(5);
    let (status, body) = get_within(&inst.agent_socket, "/v1/health", limit)
        .unwrap_or_else(|e| panic!("agent health while flooded: {e}\n{}", inst.log()));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let (status, body) = get_within(&inst.admin_socket, "/v1/admin/health", limit)
        .unwrap_or_else(|e| panic!("admin health while flooded: {e}\n{}", inst.log()));
    assert_eq!(status, 200, "{body}");
    signs_within(&inst, "during-flood", limit);
    assert!(inst.is_running());
    // The flooding agent's next connection is refused at once with a clear
    // answer, without its request being read.
    let out = perl_as(FLOOD_UID, SILENT_PL, &[&socket]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed HTTP/1.1 503 Service Unavailable"
    );

    // The flood goes away; signing goes on.
    drop(flood.stdin.take());
    let _ = flood.wait();
    signs_within(&inst, "after-flood", Duration::from_secs(10));
    let log = inst.log();
    assert!(
        log.contains("daemon.max_connections_per_uid reached"),
        "the refusals are logged: {log}"
    );
    let refusals = log
        .matches("daemon.max_connections_per_uid reached")
        .count();
    assert!(
        refusals <= 20,
        "{refusals} refusal lines: the log is bounded"
    );
    assert!(inst.stop().success());
}

#[test]
fn a_connection_from_a_uid_the_socket_does_not_serve_is_closed_before_its_first_byte() {
    require_other_uids();
    let inst = Instance::start_default();
    open_up(&inst, &inst.agent_socket.clone());
    open_up(&inst, &inst.admin_socket.clone());
    // The peer sends nothing: the daemon answers 403 without waiting for a
    // request and closes.
    for socket in [&inst.agent_socket, &inst.admin_socket] {
        let started = Instant::now();
        let out = perl_as(STRANGER_UID, SILENT_PL, &[socket.to_str().unwrap()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            said,
            "closed HTTP/1.1 403 Forbidden",
            "{}: {}",
            socket.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "closed at once, not by a timeout: {:?}",
            started.elapsed()
        );
    }
    let mut inst = inst;
    let log = inst.log();
    assert!(
        log.contains("connection from a uid this socket does not serve"),
        "{log}"
    );
    assert!(log.contains("uid=Some(4343)"), "{log}");
    assert!(inst.stop().success());
}

#[test]
fn sigterm_exits_within_the_drain_deadline_while_half_open_requests_are_held() {
    let mut inst = Instance::init();
    inst.add_daemon_config("header_read_timeout_s = 120\nshutdown_grace_s = 2");
    inst.start();
    // The daemon's open sockets (by inode): the three connections are
    // accepted once three sockets appear that it did not hold before.
    let sockets = |pid: u32| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .filter(|l| l.starts_with("socket:"))
            .collect()
    };
    let pid = inst.pid();
    let before = sockets(pid);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = UnixStream::connect(&inst.agent_socket).unwrap();
        s.write_all(b"POST /v1/intents HTTP/1.1\r\nHost: keyward\r\nContent-Ty")
            .unwrap();
        held.push(s);
    }
    // The daemon has accepted the three connections.
    wait_until(
        "the three connections to be accepted",
        Duration::from_secs(10),
        || sockets(pid).difference(&before).count() >= 3,
    );
    let started = Instant::now();
    let status = inst.stop();
    let took = started.elapsed();
    assert!(status.success(), "{status}: {}", inst.log());
    assert!(
        took < Duration::from_secs(10),
        "stopped {took:?} after SIGTERM with a 2 s grace"
    );
    assert!(
        took >= Duration::from_secs(2),
        "the held requests had their grace period: {took:?}"
    );
    let log = inst.log();
    assert!(log.contains("shutdown grace over"), "{log}");
    // The rest of the shutdown ran: the stop is in the ledger.
    let stopped: i64 = rusqlite::Connection::open(&inst.db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM ledger WHERE event = 'daemon_stopped'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stopped, 1, "one daemon_stopped entry");
    let out = inst.audit_verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
}

#[test]
fn an_hsm_module_that_lost_its_objects_fails_health_and_is_reopened_without_a_restart() {
    let mut inst = Instance::start_default();
    let client = inst.client();
    let health = || rt().block_on(client.health()).unwrap();
    signs_within(&inst, "before-loss", Duration::from_secs(10));
    assert!(health().hsm.ok);

    // SoftHSM2 keeps the token's objects in files. Taken away under the
    // running daemon, the module marks the token and its objects invalid in
    // memory, and they stay invalid when the files come back (as after the
    // descriptor exhaustion of issue #13): only a new C_Initialize reads
    // them again.
    let away = inst.dir.path().join("tokens-away");
    std::fs::rename(inst.token_dir(), &away).unwrap();
    let h = health();
    assert!(
        !h.hsm.ok,
        "health finds the keys, not just the login: {h:?}"
    );
    assert_eq!(h.status, "degraded");
    let err = rt()
        .block_on(client.submit_intent(&transfer("while-lost", &random_pubkey(), "0.001")))
        .unwrap_err();
    assert_eq!(err.code(), Some("hsm_unavailable"), "{err}");

    std::fs::rename(&away, inst.token_dir()).unwrap();
    let mut n = 0;
    wait_until("signing without a restart", Duration::from_secs(20), || {
        n += 1;
        let req = transfer(&format!("after-loss-{n}"), &random_pubkey(), "0.001");
        matches!(
            rt().block_on(client.submit_intent(&req)),
            Ok(IntentOutcome::Signed(_))
        )
    });
    let h = health();
    assert!(h.hsm.ok, "{h:?}");
    assert_eq!(h.status, "ok");
    let log = inst.log();
    assert!(log.contains("HSM module re-opened"), "{log}");
    assert!(inst.stop().success());
}

#[test]
fn slow_request_heads_and_bodies_are_cut_by_their_timeouts() {
    let mut inst = Instance::init();
    inst.add_daemon_config("header_read_timeout_s = 1\nrequest_timeout_s = 1");
    inst.start();
    // Half a head: closed after the header-read timeout, without an answer.
    let mut s = UnixStream::connect(&inst.agent_socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: kew")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
    // A kept-alive connection that waits for its next request as long is
    // closed too.
    let mut s = UnixStream::connect(&inst.agent_socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: keyward\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .expect("the idle connection is closed, not left open");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
    // A whole head and half a body: 503 request_timeout after 1 s.
    let mut s = UnixStream::connect(&inst.agent_socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /v1/intents HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"intent_id\":",
    )
    .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The daemon goes on signing.
    signs_within(&inst, "after-slow", Duration::from_secs(10));
    assert!(inst.stop().success());
}

#[test]
fn keywardd_refuses_to_start_when_the_connection_limits_do_not_fit_the_descriptor_limit() {
    let inst = Instance::init();
    // 2 × (256 connections + 64 held refusals) + 256 reserved = 896 > 512.
    let out = Command::new("prlimit")
        .arg("--nofile=512:512")
        .arg(KEYWARDD)
        .arg("--config")
        .arg(&inst.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an environment error");
    let err = String::from_utf8_lossy(&out.stderr);
    for part in ["512", "896", "LimitNOFILE", "daemon.max_connections"] {
        assert!(err.contains(part), "{part} missing from: {err}");
    }
    assert!(!inst.agent_socket.exists(), "nothing was served");
    // Lower limits fit (2 × (64 + 64) + 256 = 512): it starts.
    let mut inst = inst;
    inst.add_daemon_config("max_connections = 64");
    inst.set_nofile(512);
    inst.start();
    signs_within(&inst, "fits", Duration::from_secs(10));
    assert!(inst.stop().success());
}
