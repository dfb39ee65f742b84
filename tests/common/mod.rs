//! Shared integration-test harness: creates a real development instance
//! (SoftHSM2 token, config, policy, key) in a temporary directory with the
//! real `keyward init --dev`, starts the real `keywardd` on it, and hands out
//! `keyward-client` clients for its sockets.
//!
//! `KEYWARD_TEST_BACKEND=yubihsm-mock` makes every instance a
//! `keyward init --dev --backend yubihsm-mock` one instead: keywardd on
//! backend "yubihsm" over HTTP to a MockHsm in a `keyward hsm
//! mock-connector` process (default `softhsm`).
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

/// The HSM an [`Instance`] is created on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// A SoftHSM2 token in the instance directory, through PKCS#11.
    SoftHsm,
    /// MockHsm behind `keyward hsm mock-connector` (backend "yubihsm"),
    /// each message taking `latency_ms`.
    YubiHsmMock {
        /// Milliseconds per message inside the mock device.
        latency_ms: u64,
    },
}

impl TestBackend {
    /// The backend `KEYWARD_TEST_BACKEND` names (`softhsm`, the default,
    /// or `yubihsm-mock`); anything else fails the test.
    pub fn from_env() -> TestBackend {
        match std::env::var("KEYWARD_TEST_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("softhsm") => TestBackend::SoftHsm,
            Ok("yubihsm-mock") => TestBackend::YubiHsmMock { latency_ms: 0 },
            Ok(other) => {
                panic!("KEYWARD_TEST_BACKEND={other:?}: expected \"softhsm\" or \"yubihsm-mock\"")
            }
        }
    }

    /// Whether this is the YubiHSM backend on MockHsm.
    pub fn is_yubihsm(self) -> bool {
        matches!(self, TestBackend::YubiHsmMock { .. })
    }
}

/// A running (or stopped) keyward instance in a temporary directory.
pub struct Instance {
    /// The HSM it runs on.
    pub backend: TestBackend,
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
    /// Extra environment of keywardd (e.g. `KEYWARD_TEST_FAULTS`).
    env: Vec<(String, String)>,
}

impl Instance {
    /// `keyward init --dev` in a fresh directory, with its default policy,
    /// on the backend `KEYWARD_TEST_BACKEND` names.
    pub fn init() -> Instance {
        Instance::init_on(TestBackend::from_env())
    }

    /// `keyward init --dev` on `backend` in a fresh directory.
    pub fn init_on(backend: TestBackend) -> Instance {
        Instance::init_on_with(backend, &[])
    }

    /// `keyward init --dev` on `backend` in a fresh directory, with the
    /// extra `keyward init` arguments `extra`.
    pub fn init_on_with(backend: TestBackend, extra: &[&str]) -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("kw-test-")
            .tempdir()
            .unwrap();
        let inst_dir = dir.path().join("inst");
        let mut init = Command::new(KEYWARD);
        init.args(["init", "--dev"]).arg(&inst_dir);
        if let TestBackend::YubiHsmMock { latency_ms } = backend {
            init.args(["--backend", "yubihsm-mock", "--latency-ms"])
                .arg(latency_ms.to_string());
        }
        init.args(extra);
        let out = init.output().unwrap();
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
            backend,
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
            env: Vec::new(),
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

    /// Starts keywardd (from now on) with `name=value` in its environment.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// SoftHSM2's token directory of this instance.
    pub fn token_dir(&self) -> PathBuf {
        assert!(
            !self.backend.is_yubihsm(),
            "token_dir: this instance runs on MockHsm, which has no token directory"
        );
        self.inst_dir().join("tokens")
    }

    /// The pid of the mock connector serving this instance's MockHsm.
    pub fn mock_connector_pid(&self) -> Option<nix::unistd::Pid> {
        let text = std::fs::read_to_string(self.inst_dir().join("yubihsm-mock.pid")).ok()?;
        Some(nix::unistd::Pid::from_raw(text.trim().parse().ok()?))
    }

    fn signal_connector(&self, signal: nix::sys::signal::Signal) {
        let pid = self
            .mock_connector_pid()
            .expect("this instance has no mock connector (KEYWARD_TEST_BACKEND=yubihsm-mock?)");
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Takes the mock connector down (SIGUSR1): connections refused, as
    /// with a stopped `yubihsm-connector` or an unplugged device.
    pub fn connector_down(&self) {
        self.signal_connector(nix::sys::signal::Signal::SIGUSR1);
    }

    /// Brings the mock connector back (SIGUSR2), same port, same MockHsm.
    pub fn connector_up(&self) {
        self.signal_connector(nix::sys::signal::Signal::SIGUSR2);
    }

    /// Replaces policy.toml (`{UID}` → this process's uid).
    pub fn write_policy(&self, policy: &str) {
        std::fs::write(&self.policy, policy.replace("{UID}", &my_uid().to_string())).unwrap();
    }

    /// The instance directory.
    pub fn inst_dir(&self) -> &Path {
        self.config.parent().unwrap()
    }

    /// Appends a `[mirror]` section with a file sink (and the `extra`
    /// lines) to the configuration; returns the copy's path and the
    /// acknowledgement directory.
    pub fn with_file_mirror(&self, extra: &str) -> (PathBuf, PathBuf) {
        let copy = self.dir.path().join("copy").join("ledger.jsonl");
        let ack_dir = self.inst_dir().join("state").join("mirror");
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            format!("{cfg}\n[mirror]\nfile = \"{}\"\n{extra}", copy.display()),
        )
        .unwrap();
        (copy, ack_dir)
    }

    /// Path of the daemon log of the n-th start.
    pub fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("keywardd-{n}.log"))
    }

    /// Starts keywardd and waits until the agent socket answers.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Spawns keywardd with extra arguments, its output in a new log.
    fn spawn_daemon(&mut self, args: &[&str]) -> Child {
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
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("KEYWARD_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// [`Instance::start`] with extra arguments for keywardd.
    pub fn start_with(&mut self, args: &[&str]) {
        let child = self.spawn_daemon(args);
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

    /// The value of `key = ...` in keyward.toml (quotes removed).
    pub fn config_value(&self, key: &str) -> String {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no {key} in {text}"));
        line.split_once('=')
            .unwrap()
            .1
            .trim()
            .trim_matches('"')
            .to_owned()
    }

    /// The audit key pinned by `keyward init --dev`.
    pub fn audit_vkey_file(&self) -> PathBuf {
        self.inst_dir().join("audit.vkey")
    }

    /// Starts keywardd with extra arguments and waits for it to exit
    /// (for start-ups that must be refused). Returns (exit code, log).
    pub fn start_refused(&mut self, args: &[&str]) -> (i32, String) {
        let mut child = self.spawn_daemon(args);
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
        // The mock connector is not our child (it was started detached by
        // `keyward init`); it would exit by itself once the directory is
        // gone, but not before the next poll.
        if let Some(pid) = self.mock_connector_pid() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
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
    parse_response(&text)
}

/// (status, body) of a raw HTTP/1.1 response.
fn parse_response(text: &str) -> (u16, String) {
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

// ---- The ledger as the audit trail records it (read from the SQLite file,
// which keywardd keeps in WAL mode, so it can be read while it runs). ----

/// `(intent id, payload)` of every ledger entry of kind `event`, in order.
pub fn ledger_entries(db: &Path, event: &str) -> Vec<(Option<String>, serde_json::Value)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT intent_id, payload FROM ledger WHERE event = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([event], |r| {
        let payload: Vec<u8> = r.get(1)?;
        Ok((r.get(0)?, serde_json::from_slice(&payload).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The signatures of the `signature_created` entries of intent `id`.
pub fn signatures_recorded(db: &Path, id: &str) -> Vec<String> {
    ledger_entries(db, "signature_created")
        .into_iter()
        .filter(|(i, _)| i.as_deref() == Some(id))
        .map(|(_, p)| p["signature"].as_str().unwrap().to_owned())
        .collect()
}

/// What the ledger says about the intents it names: who was admitted
/// (a `policy_evaluated` entry that allows), who got a signature, and who
/// was recorded as interrupted by a crash.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IntentTrail {
    /// Intent ids with an allowing `policy_evaluated` entry.
    pub admitted: std::collections::BTreeSet<String>,
    /// Intent id → the signature of its `signature_created` entries.
    pub signed: std::collections::BTreeMap<String, Vec<String>>,
    /// Intent ids with a `signing_denied` entry of code `interrupted`.
    pub interrupted: std::collections::BTreeSet<String>,
}

impl IntentTrail {
    /// Reads the trail from the ledger at `db` through `conn`.
    pub fn read(conn: &rusqlite::Connection) -> IntentTrail {
        let mut stmt = conn
            .prepare_cached(
                "SELECT event, intent_id, payload FROM ledger WHERE event IN \
                 ('policy_evaluated', 'signature_created', 'signing_denied') ORDER BY seq",
            )
            .unwrap();
        let mut trail = IntentTrail::default();
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .unwrap();
        for row in rows {
            let (event, id, payload) = row.unwrap();
            let Some(id) = id else { continue };
            let p: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            match event.as_str() {
                "policy_evaluated" if p["decision"] == "allow" => {
                    trail.admitted.insert(id);
                }
                "signature_created" => trail
                    .signed
                    .entry(id)
                    .or_default()
                    .push(p["signature"].as_str().unwrap().to_owned()),
                "signing_denied" if p["code"] == "interrupted" => {
                    trail.interrupted.insert(id);
                }
                _ => {}
            }
        }
        trail
    }

    /// Reads the trail of the ledger at `db`.
    pub fn of(db: &Path) -> IntentTrail {
        IntentTrail::read(&rusqlite::Connection::open(db).unwrap())
    }

    /// Admitted intents without a signature and not (yet) recorded as
    /// interrupted: in flight.
    pub fn in_flight(&self) -> Vec<&String> {
        self.admitted
            .iter()
            .filter(|i| !self.signed.contains_key(*i) && !self.interrupted.contains(*i))
            .collect()
    }
}

/// Polls the ledger at `db` without pause (a kill must follow the moment
/// `cond` holds) until `cond` holds; returns the trail then, or `None`
/// after `timeout`.
pub fn watch_ledger(
    db: &Path,
    timeout: Duration,
    mut cond: impl FnMut(&IntentTrail) -> bool,
) -> Option<IntentTrail> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let trail = IntentTrail::read(&conn);
        if cond(&trail) {
            return Some(trail);
        }
        std::thread::yield_now();
    }
    None
}

/// What one kill -9 run ended with (see [`crash_run`]).
#[derive(Debug)]
pub struct CrashOutcome {
    /// The trail at the kill (what the ledger held when keywardd died).
    pub at_kill: IntentTrail,
    /// Intents recorded as interrupted at the restart.
    pub interrupted: std::collections::BTreeSet<String>,
    /// Signatures returned to the client, before and after the kill.
    pub total_signed: usize,
}

/// A kill -9 in the middle of a burst, repeated (each time on a fresh
/// instance from `make`) until the kill caught a request in flight, at most
/// `attempts` times: `before` are signed one by one, then `burst` is sent
/// concurrently, one request every `stagger`, and keywardd is killed the
/// moment the ledger shows a burst intent admitted but not yet signed (and,
/// with `need_committed_signature`, a burst intent already signed: a batch
/// committed under load). After the restart, checks that
/// - every request of the burst ended signed, denied with `daily_limit`,
///   or cut by the kill (never anything else);
/// - every returned signature is the one in its intent's `signature_created`
///   entry, a denied intent has none, an intent cut by the kill either has
///   one, was recorded `interrupted`, or was never admitted;
/// - exactly the intents in flight at the kill are recorded `interrupted`
///   (so the kill caught at least one);
/// - sending every request again gives each signed intent its signature
///   back, the others a signature or `daily_limit`, and exactly `limit`
///   signatures in all, each recorded once.
///
/// Returns the finished instance and what happened; the caller checks the
/// counters.
pub fn crash_run(
    attempts: usize,
    make: impl Fn() -> Instance,
    before: &[IntentRequest],
    burst: &[IntentRequest],
    stagger: Duration,
    need_committed_signature: bool,
    limit: usize,
) -> (Instance, CrashOutcome) {
    for attempt in 1..=attempts {
        let mut inst = make();
        if let Some(outcome) = crash_attempt(
            &mut inst,
            before,
            burst,
            stagger,
            need_committed_signature,
            limit,
        ) {
            return (inst, outcome);
        }
        eprintln!("attempt {attempt}: the kill caught no request in flight; again");
    }
    panic!("in {attempts} attempts the kill -9 never caught a request in flight");
}

fn crash_attempt(
    inst: &mut Instance,
    before: &[IntentRequest],
    burst: &[IntentRequest],
    stagger: Duration,
    need_committed_signature: bool,
    limit: usize,
) -> Option<CrashOutcome> {
    use keyward_client::{ClientError, IntentOutcome};
    use std::collections::BTreeSet;

    let rt = rt();
    let client = inst.client();
    let mut returned = std::collections::BTreeMap::new();
    for req in before {
        match rt.block_on(client.submit_intent(req)) {
            Ok(IntentOutcome::Signed(s)) => {
                returned.insert(s.intent_id.clone(), s.signature);
            }
            other => panic!("{}: expected a signature, got {other:?}", req.intent_id),
        }
    }
    let burst_ids: BTreeSet<String> = burst.iter().map(|r| r.intent_id.clone()).collect();
    let handles: Vec<_> = burst
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, req)| {
            let client = client.clone();
            let delay = stagger * i as u32;
            rt.spawn(async move {
                tokio::time::sleep(delay).await;
                (req.intent_id.clone(), client.submit_intent(&req).await)
            })
        })
        .collect();
    let caught = watch_ledger(&inst.db, Duration::from_secs(20), |t| {
        let in_flight = t.in_flight().iter().any(|i| burst_ids.contains(*i));
        let committed = !need_committed_signature || t.signed.keys().any(|i| burst_ids.contains(i));
        in_flight && committed
    });
    inst.kill9();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| rt.block_on(h).unwrap())
        .collect();
    let at_kill = IntentTrail::of(&inst.db);
    // None: everything finished before the condition was seen.
    caught?;
    let mut denied = BTreeSet::new();
    let mut cut = BTreeSet::new();
    for (id, r) in &results {
        match r {
            Ok(IntentOutcome::Signed(s)) => {
                assert_eq!(&s.intent_id, id);
                returned.insert(id.clone(), s.signature.clone());
            }
            Err(ClientError::Api {
                status: 403,
                code,
                reasons,
                ..
            }) if code == "policy_denied" => {
                assert!(
                    reasons.iter().any(|x| x.rule == "daily_limit"),
                    "{id}: {reasons:?}"
                );
                denied.insert(id.clone());
            }
            Err(ClientError::Connect { .. } | ClientError::Protocol(_)) => {
                cut.insert(id.clone());
            }
            other => panic!("{id}: neither signed, denied by daily_limit nor cut: {other:?}"),
        }
    }
    inst.start();
    let verify = inst.audit_verify();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let after = IntentTrail::of(&inst.db);
    // Recovery recorded exactly the intents that were in flight.
    let in_flight: BTreeSet<String> = at_kill.in_flight().into_iter().cloned().collect();
    assert!(at_kill.interrupted.is_empty(), "{at_kill:?}");
    assert_eq!(after.interrupted, in_flight, "interrupted at the restart");
    if in_flight.is_empty() {
        // The requests seen in flight finished before the kill landed.
        return None;
    }
    for (id, sig) in &returned {
        assert_eq!(
            after.signed.get(id),
            Some(&vec![sig.clone()]),
            "{id}: the returned signature is recorded once"
        );
    }
    for id in &denied {
        assert!(!after.signed.contains_key(id), "{id} was denied");
        assert!(!after.admitted.contains(id), "{id} was denied");
    }
    for id in &cut {
        assert!(
            after.signed.contains_key(id)
                || after.interrupted.contains(id)
                || !after.admitted.contains(id),
            "{id}: cut by the kill, admitted, neither signed nor interrupted"
        );
    }

    // Finish the run with the same requests.
    let client = inst.client();
    let mut total_signed = 0;
    for req in before.iter().chain(burst) {
        let id = &req.intent_id;
        match rt.block_on(client.submit_intent(req)) {
            Ok(IntentOutcome::Signed(s)) => {
                if let Some(sig) = at_kill.signed.get(id) {
                    assert_eq!(sig, &vec![s.signature.clone()], "{id}: replayed");
                }
                total_signed += 1;
            }
            Err(ClientError::Api {
                status: 403,
                reasons,
                ..
            }) if reasons.iter().any(|x| x.rule == "daily_limit") => {
                assert!(
                    !at_kill.signed.contains_key(id),
                    "{id}: signed, then denied"
                );
            }
            other => panic!("{id}: unexpected {other:?}"),
        }
    }
    assert_eq!(total_signed, limit, "signatures against a limit of {limit}");
    let end = IntentTrail::of(&inst.db);
    assert_eq!(end.signed.len(), limit, "{end:?}");
    assert!(end.signed.values().all(|s| s.len() == 1), "{end:?}");
    Some(CrashOutcome {
        at_kill,
        interrupted: after.interrupted,
        total_signed,
    })
}

/// Every counter the policy keeps, read from the ledger database: the
/// spend rows and totals of every agent and asset, and the rate-limit
/// events (the rate windows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// (agent, asset, intent id, amount, state) of every spend row.
    pub spend: Vec<(String, String, String, i64, String)>,
    /// (agent, asset, total) of every running total but zero ones (the
    /// evaluation creates an asset's total at zero when it first reads it).
    pub totals: Vec<(String, String, i64)>,
    /// (agent, intent id, ts) of every rate-window event.
    pub rate: Vec<(String, String, i64)>,
}

impl Counters {
    pub fn of(db: &Path) -> Counters {
        let conn = rusqlite::Connection::open(db).unwrap();
        let spend = conn
            .prepare("SELECT agent, asset, intent_id, amount, state FROM spend ORDER BY id")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let totals = conn
            .prepare(
                "SELECT agent, asset, total FROM spend_total WHERE total != 0 ORDER BY agent, asset",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let rate = conn
            .prepare("SELECT agent, intent_id, ts_ms FROM rate_events ORDER BY agent, intent_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        Counters {
            spend,
            totals,
            rate,
        }
    }
}

/// Asserts that a refused intent left no trace but its record: no
/// `signature_created` entry for it, no counter changed (every asset's
/// spend and totals, the rate windows; the same through `GET /v1/policy`),
/// and no signature in its view.
pub fn assert_nothing_counted(
    inst: &Instance,
    id: &str,
    before: &Counters,
    view_before: &keyward_client::wire::PolicyView,
) {
    assert_eq!(
        signatures_recorded(&inst.db, id),
        Vec::<String>::new(),
        "{id}: a refused intent has no signature_created entry"
    );
    assert_eq!(&Counters::of(&inst.db), before, "{id}: counters changed");
    let rt = rt();
    let view = rt.block_on(inst.client().policy()).unwrap();
    assert_eq!(view.limits, view_before.limits, "{id}: budgets changed");
    assert_eq!(
        view.rate_limit, view_before.rate_limit,
        "{id}: rate windows changed"
    );
    if let Ok(v) = rt.block_on(inst.client().get_intent(id)) {
        assert!(v.signature.is_none(), "{id}: {v:?}");
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
    parse_response(&text)
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
pub fn all_entries(inst: &Instance) -> Vec<(String, Option<String>, Option<String>)> {
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
    all_entries(inst)
        .iter()
        .filter(|(e, _, _)| e != "checkpoint")
        .count()
}

/// A signing service in this process on the in-memory mock HSM (feature
/// `mock-hsm`), with no SoftHSM and no daemon: for tests of the service's
/// decisions, concurrency and failures.
pub struct MockService {
    /// Holds the state directory and the policy file.
    pub _dir: tempfile::TempDir,
    /// The ledger database.
    pub db: PathBuf,
    /// The policy file (rewrite it and call `Operations::reload_policy`).
    pub policy_path: PathBuf,
    /// The mock device.
    pub mock: std::sync::Arc<keyward::hsm::mock::MockHsm>,
    /// The executor every HSM call goes through.
    pub exec: std::sync::Arc<keyward::hsm::HsmExecutor>,
    /// The signing service.
    pub signer: std::sync::Arc<keyward::service::Signer>,
    /// The operations service, on the same core.
    pub operations: std::sync::Arc<keyward::service::Operations>,
    /// The key `hot`.
    pub hot: keyward::hsm::HsmKey,
}

/// Executor settings.
pub fn settings(
    queue_depth: usize,
    queue_wait_ms: u64,
    call_timeout_ms: u64,
) -> keyward::hsm::ExecutorSettings {
    keyward::hsm::ExecutorSettings {
        queue_depth,
        queue_wait: Duration::from_millis(queue_wait_ms),
        call_timeout: Duration::from_millis(call_timeout_ms),
    }
}

/// A [`MockService`] under `policy` (TOML) with key `hot`.
pub fn mock_service(
    policy: &str,
    workers: usize,
    s: keyward::hsm::ExecutorSettings,
) -> MockService {
    use keyward::hsm::Hsm as _;
    let dir = tempfile::tempdir().unwrap();
    // The [hsm] section is required but never opened: the mock stands in.
    let config = dir.path().join("keyward.toml");
    let cfg = keyward::config::Config::parse(
        &config,
        "[daemon]\nagent_socket = \"agent.sock\"\nadmin_socket = \"admin.sock\"\n\
         state_dir = \"state\"\npolicy = \"policy.toml\"\n\n\
         [hsm]\nmodule = \"/nonexistent/module.so\"\ntoken_label = \"mock\"\npin_file = \"pin\"\n",
    )
    .unwrap();
    let ledger = keyward::daemon::open_ledger(&cfg).unwrap();
    let mock = std::sync::Arc::new(keyward::hsm::mock::MockHsm::new().with_workers(workers));
    let hot = mock
        .generate_ed25519(&keyward::types::KeyName::new("hot").unwrap())
        .unwrap();
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    let parsed = keyward::policy::Policy::load(&policy_path).unwrap();
    let exec = std::sync::Arc::new(
        keyward::hsm::HsmExecutor::start(
            std::sync::Arc::clone(&mock) as std::sync::Arc<dyn keyward::hsm::Hsm>,
            s,
        )
        .unwrap(),
    );
    let core = keyward::service::Core::new(
        ledger,
        std::sync::Arc::clone(&exec),
        std::collections::HashMap::from([(hot.name.clone(), hot.clone())]),
        parsed,
        policy_path.clone(),
        Duration::from_secs(900),
    );
    let signer = keyward::service::Signer::new(std::sync::Arc::clone(&core));
    let operations = keyward::service::Operations::new(core);
    MockService {
        db: cfg.ledger_path(),
        policy_path,
        _dir: dir,
        mock,
        exec,
        signer,
        operations,
        hot,
    }
}

/// The entries of intent `id` in order: (event, payload).
pub fn intent_entries(db: &Path, id: &str) -> Vec<(String, serde_json::Value)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT event, payload FROM ledger WHERE intent_id = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([id], |r| {
        let payload: Vec<u8> = r.get(1)?;
        Ok((r.get(0)?, serde_json::from_slice(&payload).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// A `keyward hsm mock-connector` (MockHsm over the connector's HTTP
/// protocol) on a free port; killed when dropped, and gone with its
/// directory in any case (`--exit-when-gone`).
pub struct MockConnector {
    child: std::process::Child,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl MockConnector {
    pub fn start() -> MockConnector {
        let dir = tempfile::Builder::new()
            .prefix("kw-mockhsm-")
            .tempdir()
            .unwrap();
        let port_file = dir.path().join("port");
        let mut child = Command::new(KEYWARD)
            .args(["hsm", "mock-connector", "--port-file"])
            .arg(&port_file)
            .arg("--exit-when-gone")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse::<u16>().ok())
            {
                break p;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the mock connector exited: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the mock connector wrote no port"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        MockConnector {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An inspecting client with MockHsm's factory key (id 1).
    pub fn client(&self) -> yubihsm::Client {
        let connector = yubihsm::Connector::http(&yubihsm::HttpConfig {
            addr: "127.0.0.1".into(),
            port: self.port,
            timeout_ms: 10_000,
        });
        yubihsm::Client::open(connector, yubihsm::Credentials::default(), false).unwrap()
    }

    /// SIGUSR1: connector down; SIGUSR2: back up on the same port.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn accepts(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }
}

impl Drop for MockConnector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
