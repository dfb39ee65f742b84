//! Shared integration-test harness: creates a real development instance
//! (SoftHSM2 token, config, policy, key) in a temporary directory with the
//! real `keyward init --dev`, starts the real `keywardd` on it, and hands out
//! `keyward-client` clients for its sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use keyward_client::wire::IntentRequest;
use solana_sdk::pubkey::Pubkey;

/// Path of the `keyward` CLI under test.
pub const KEYWARD: &str = env!("CARGO_BIN_EXE_keyward");
/// Path of the `keywardd` daemon under test.
pub const KEYWARDD: &str = env!("CARGO_BIN_EXE_keywardd");

/// One SOL in lamports.
pub const SOL: u64 = 1_000_000_000;
/// Fee of a one-signature transaction.
pub const FEE: u64 = 5_000;

/// The uid of this test process (the dev policy binds it to agent `dev`).
pub fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// A running (or stopped) keyward instance in a temporary directory.
pub struct Instance {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub policy: PathBuf,
    pub db: PathBuf,
    pub agent_socket: PathBuf,
    pub admin_socket: PathBuf,
    /// Public key of the key `hot`.
    pub hot: Pubkey,
    child: Option<Child>,
    log_count: usize,
    /// Soft and hard `RLIMIT_NOFILE` keywardd is started with, if set.
    nofile: Option<u64>,
}

impl Instance {
    /// `keyward init --dev` in a fresh directory, with its default policy.
    pub fn init() -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("kw-test-")
            .tempdir()
            .unwrap();
        let inst_dir = dir.path().join("inst");
        let out = Command::new(KEYWARD)
            .args(["init", "--dev"])
            .arg(&inst_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keyward init --dev failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let hot = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("key \"hot\": "))
            .and_then(|k| k.trim().parse::<Pubkey>().ok())
            .unwrap_or_else(|| panic!("init output does not name the hot key: {stdout}"));
        Instance {
            config: inst_dir.join("keyward.toml"),
            policy: inst_dir.join("policy.toml"),
            db: inst_dir.join("state").join("ledger.sqlite3"),
            agent_socket: inst_dir.join("agent.sock"),
            admin_socket: inst_dir.join("admin.sock"),
            dir,
            hot,
            child: None,
            log_count: 0,
            nofile: None,
        }
    }

    /// Initializes, replaces the policy with `policy` (where `{UID}` stands
    /// for this process's uid) and starts the daemon.
    pub fn with_policy(policy: &str) -> Instance {
        let mut inst = Instance::init();
        inst.write_policy(policy);
        inst.start();
        inst
    }

    /// Initializes and starts with the default dev policy.
    pub fn start_default() -> Instance {
        let mut inst = Instance::init();
        inst.start();
        inst
    }

    /// Adds a `[ledger]` section with `commit_delay_us` to keyward.toml, so
    /// that concurrent intents are committed together (group commit).
    pub fn set_commit_delay_us(&self, us: u64) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        assert!(!text.contains("[ledger]"), "already set");
        text.push_str(&format!("\n[ledger]\ncommit_delay_us = {us}\n"));
        std::fs::write(&self.config, text).unwrap();
    }

    /// Adds `lines` (TOML `key = value` lines) to the `[daemon]` section of
    /// keyward.toml.
    pub fn add_daemon_config(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replacen("\n[hsm]", &format!("{}\n\n[hsm]", lines.trim_end()), 1);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts keywardd (from now on) with soft and hard `RLIMIT_NOFILE` set
    /// to `n` (through `prlimit`), like a unit with `LimitNOFILE=n`.
    pub fn set_nofile(&mut self, n: u64) {
        self.nofile = Some(n);
    }

    /// SoftHSM2's token directory of this instance.
    pub fn token_dir(&self) -> PathBuf {
        self.inst_dir().join("tokens")
    }

    /// Replaces policy.toml (`{UID}` → this process's uid).
    pub fn write_policy(&self, policy: &str) {
        std::fs::write(&self.policy, policy.replace("{UID}", &my_uid().to_string())).unwrap();
    }

    /// The instance directory.
    pub fn inst_dir(&self) -> &Path {
        self.config.parent().unwrap()
    }

    /// Path of the daemon log of the n-th start.
    pub fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("keywardd-{n}.log"))
    }

    /// Starts keywardd and waits until the agent socket answers.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// [`Instance::start`] with extra arguments for keywardd.
    pub fn start_with(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "already running");
        self.log_count += 1;
        let log = std::fs::File::create(self.log_path(self.log_count)).unwrap();
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(KEYWARDD);
                c
            }
            None => Command::new(KEYWARDD),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("KEYWARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.agent_socket).is_ok()
                && std::os::unix::net::UnixStream::connect(&self.admin_socket).is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("keywardd exited during start-up ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keywardd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The latest daemon log.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path(self.log_count)) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("keywardd did not stop on SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// An async agent client.
    pub fn client(&self) -> keyward_client::Client {
        keyward_client::Client::new(&self.agent_socket)
    }

    /// Runs the `keyward` CLI with `--config` of this instance.
    pub fn keyward(&self, args: &[&str]) -> Output {
        Command::new(KEYWARD)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// `keyward audit verify --db` on this instance's ledger, trusting the
    /// audit key pinned at `init` (found through `--config`).
    pub fn audit_verify(&self) -> Output {
        Command::new(KEYWARD)
            .arg("--config")
            .arg(&self.config)
            .args(["audit", "verify", "--db"])
            .arg(&self.db)
            .output()
            .unwrap()
    }

    /// The audit key pinned by `keyward init --dev`.
    pub fn audit_vkey_file(&self) -> PathBuf {
        self.inst_dir().join("audit.vkey")
    }

    /// Starts keywardd with extra arguments and waits for it to exit
    /// (for start-ups that must be refused). Returns (exit code, log).
    pub fn start_refused(&mut self, args: &[&str]) -> (i32, String) {
        assert!(self.child.is_none(), "already running");
        self.log_count += 1;
        let log = std::fs::File::create(self.log_path(self.log_count)).unwrap();
        let mut child = Command::new(KEYWARDD)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("KEYWARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keywardd did not exit: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A random recipient.
pub fn random_pubkey() -> Pubkey {
    Pubkey::new_unique()
}

/// A random 32-byte hash (a plausible recent blockhash).
pub fn random_hash() -> solana_sdk::hash::Hash {
    solana_sdk::hash::Hash::new_from_array(rand::random::<[u8; 32]>())
}

/// A plausible recent blockhash (base58).
pub fn blockhash() -> String {
    random_hash().to_string()
}

/// A SOL transfer intent.
pub fn transfer(id: &str, to: &Pubkey, amount: &str) -> IntentRequest {
    IntentRequest {
        intent_id: id.to_owned(),
        key: "hot".to_owned(),
        action: keyward_client::wire::Action::Transfer {
            asset: "SOL".to_owned(),
            to: to.to_string(),
            amount: amount.to_owned(),
            recent_blockhash: blockhash(),
            memo: None,
            create_recipient_account: false,
        },
    }
}

/// A `sign_transaction` intent for serialized message bytes.
pub fn sign_tx(id: &str, message: &[u8]) -> IntentRequest {
    use base64::Engine as _;
    IntentRequest {
        intent_id: id.to_owned(),
        key: "hot".to_owned(),
        action: keyward_client::wire::Action::SignTransaction {
            message: base64::engine::general_purpose::STANDARD.encode(message),
        },
    }
}

/// A multi-threaded runtime for tests that drive the async client.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Raw HTTP/1.1 request over the agent socket (for malformed requests the
/// typed client cannot send). Returns (status, body).
pub fn raw_request(socket: &Path, request: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A POST /v1/intents with the given content type and body, `Connection: close`.
pub fn raw_post(socket: &Path, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut req = format!(
        "POST /v1/intents HTTP/1.1\r\nHost: keyward\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_request(socket, &req)
}

/// Starts `keyward mirror` for the instance's config.
pub fn start_mirror(inst: &Instance) -> Child {
    Command::new(KEYWARD)
        .args(["--config", inst.config.to_str().unwrap(), "mirror"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Polls `f` every 50 ms until it holds; fails after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A uid that is neither root nor the daemon's user: the tests bind it to a
/// second agent (or to none) and run clients as it.
pub const OTHER_UID: u32 = 4242;

/// Perl, which the tests run as other uids (a process of the test binary
/// cannot change its uid without changing it for every test thread).
pub const PERL: &str = "/usr/bin/perl";

/// Fails, naming the reason, unless this process can run clients as other
/// uids: that needs root (the tests run as root in CI and on the dev box)
/// and perl. Never a silent skip: a test that cannot run its second uid
/// fails.
pub fn require_other_uids() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test runs clients as uid {OTHER_UID} and must run as root (it runs as uid {euid}); \
         run the suite as root, as CI does; it is not skipped"
    );
    assert!(
        Path::new(PERL).is_file(),
        "this test runs clients as other uids through {PERL}, which is missing; install perl; it is not skipped"
    );
}

/// Runs perl `script` with `args` as `uid` (and gid `uid`, no groups).
pub fn perl_as(uid: u32, script: &str, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(PERL);
    c.arg("-e").arg(script).args(args).uid(uid).gid(uid);
    c
}

/// Lets other uids reach `socket` of the instance (the test runs as root
/// with private temporary directories and 0660/0600 sockets): what is left
/// is the daemon's own check of the peer.
pub fn open_up(inst: &Instance, socket: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    mode(inst.dir.path(), 0o755);
    mode(inst.inst_dir(), 0o755);
    mode(socket, 0o666);
}

/// One HTTP/1.1 request with `Connection: close`, sent by a process of
/// another uid; prints the whole answer.
const HTTP_PL: &str = r#"
use strict; use IO::Socket::UNIX;
my ($path, $method, $target, $body) = @ARGV; $body //= "";
my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path) or do { print "connect failed: $!\n"; exit 3 };
my $req = "$method $target HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n";
$req .= "Content-Type: application/json\r\nContent-Length: " . length($body) . "\r\n" if $method ne "GET";
$req .= "\r\n" . $body;
syswrite($c, $req);
local $/; my $all = <$c>; print $all // "";
"#;

/// `method target` with a JSON `body` on `socket`, sent as `uid`.
/// Returns (status, body).
pub fn http_as(uid: u32, socket: &Path, method: &str, target: &str, body: &str) -> (u16, String) {
    let out = perl_as(
        uid,
        HTTP_PL,
        &[socket.to_str().unwrap(), method, target, body],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client as uid {uid}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The error code of an API error body.
pub fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
        .to_owned()
}

/// `(event, agent, intent_id)` of every ledger entry, in order, read
/// straight from the database.
pub fn ledger_entries(inst: &Instance) -> Vec<(String, Option<String>, Option<String>)> {
    let conn = rusqlite::Connection::open(&inst.db).unwrap();
    let mut stmt = conn
        .prepare("SELECT event, agent, intent_id FROM ledger ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Entries in the ledger other than checkpoints (which keywardd writes on
/// its own schedule): what requests recorded.
pub fn recorded_entries(inst: &Instance) -> usize {
    ledger_entries(inst)
        .iter()
        .filter(|(e, _, _)| e != "checkpoint")
        .count()
}
