//! A keywardd child process on a scratch instance: its own sockets and
//! state in the scratch directory; stopped (SIGTERM, then SIGKILL) when
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a scratch keywardd may take to serve its agent socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running scratch keywardd.
#[derive(Debug)]
pub struct ScratchDaemon {
    child: Option<Child>,
    /// Its `keyward.toml`.
    pub config: PathBuf,
    /// Its agent socket.
    pub agent_socket: PathBuf,
    /// Its admin socket.
    pub admin_socket: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

/// The last lines of a log file, for an error message.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl ScratchDaemon {
    /// Starts `keywardd --config CONFIG` with its output in `log`, and
    /// waits until its agent socket accepts connections.
    pub fn start(keywardd: &Path, config: &Path, log: &Path) -> Result<ScratchDaemon, String> {
        let cfg = crate::config::Config::load(config)
            .map_err(|e| format!("the scratch configuration {}: {e}", config.display()))?;
        let out = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = Command::new(keywardd)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", keywardd.display()))?;
        let mut d = ScratchDaemon {
            child: Some(child),
            config: config.to_path_buf(),
            agent_socket: cfg.daemon.agent_socket.clone(),
            admin_socket: cfg.daemon.admin_socket.clone(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&d.agent_socket).is_ok() {
                return Ok(d);
            }
            let exited = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "keywardd exited ({status}) on the scratch instance: {}",
                    log_tail(log)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "keywardd did not serve {} within {} s: {}",
                    d.agent_socket.display(),
                    START_TIMEOUT.as_secs(),
                    log_tail(log)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after 10 s. Returns whether it
    /// exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }
}

impl Drop for ScratchDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Signs a tiny SOL transfer with key `key` through the agent socket at
/// `socket` and checks the signature verifies, over the signed message,
/// under `expected` (base58): the HSM key behind the name is that key.
/// Returns the signature (base58).
pub fn sign_probe(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    intent_id: &str,
    key: &str,
    expected: &str,
) -> Result<String, String> {
    use base64::Engine as _;
    let client = keyward_client::Client::new(socket);
    let req = keyward_client::wire::IntentRequest {
        intent_id: intent_id.to_owned(),
        key: key.to_owned(),
        action: keyward_client::wire::Action::Transfer {
            asset: "SOL".to_owned(),
            to: bs58::encode(rand::random::<[u8; 32]>()).into_string(),
            amount: "0.000000001".to_owned(),
            recent_blockhash: bs58::encode(rand::random::<[u8; 32]>()).into_string(),
            memo: None,
            create_recipient_account: false,
        },
    };
    let signed = match rt.block_on(client.submit_intent(&req)) {
        Ok(keyward_client::IntentOutcome::Signed(s)) => s,
        Ok(keyward_client::IntentOutcome::Pending(_)) => {
            return Err(format!(
                "the intent for key {key} waits for approvals instead of signing"
            ));
        }
        Err(e) => return Err(format!("key {key} did not sign: {e}")),
    };
    let tx = base64::engine::general_purpose::STANDARD
        .decode(&signed.transaction)
        .map_err(|e| format!("key {key}: the signed transaction is not base64: {e}"))?;
    // Wire transaction: shortvec signature count (one byte below 128),
    // the signatures, then the message.
    let count = usize::from(*tx.first().ok_or("an empty transaction")?);
    if count == 0 || count >= 0x80 {
        return Err(format!("key {key}: unexpected signature count {count}"));
    }
    let message = tx
        .get(1 + 64 * count..)
        .ok_or_else(|| format!("key {key}: a truncated transaction"))?;
    let sig: [u8; 64] = bs58::decode(&signed.signature)
        .into_vec()
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| format!("key {key}: the signature is not 64 bytes of base58"))?;
    let pk: [u8; 32] = bs58::decode(expected)
        .into_vec()
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| format!("key {key}: the expected public key {expected} is not base58"))?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk)
        .map_err(|e| format!("key {key}: public key {expected}: {e}"))?;
    vk.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            format!(
                "key {key}: the signature does not verify under the original public key {expected}"
            )
        })?;
    Ok(signed.signature)
}
