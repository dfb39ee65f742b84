//! The NATS JetStream sink.
//!
//! Entry `n` of the ledger is message `n` of the stream: each publish
//! carries the message id `n` (the server drops a duplicate within its
//! window) and the expected last stream sequence `n − 1` (the server refuses
//! a publish that would leave a gap or fork the history). On connect the
//! mirror checks that the stream's last message is the ledger's entry of
//! that number, byte for byte, before it adds anything.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, context::Publish};
use secrecy::ExposeSecret;

use super::{CopiedEntry, MirrorError, parse_copied};
use crate::config::NatsSinkConfig;
use crate::ledger::{Entry, open_read_only};

fn nats_err(what: &str) -> impl FnOnce(String) -> MirrorError + '_ {
    move |e| MirrorError::Io {
        what: what.to_owned(),
        source: std::io::Error::other(e),
    }
}

/// Largest NATS password file accepted.
const MAX_PASSWORD_FILE: u64 = 4096;

/// Connects with the configured user (password read from its file, which
/// only its owner, this process's user or root, may read).
pub async fn connect(cfg: &NatsSinkConfig) -> Result<async_nats::Client, MirrorError> {
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .request_timeout(Some(Duration::from_secs(5)));
    if let (Some(user), Some(pw_file)) = (&cfg.user, &cfg.password_file) {
        // The same checks as the HSM PIN file: private, owned by us or root.
        let pw = crate::secret_file::read_secret_file(pw_file, MAX_PASSWORD_FILE)?;
        opts = opts.user_and_password(user.clone(), pw.expose_secret().to_owned());
    }
    opts.connect(cfg.url.as_str())
        .await
        .map_err(|e| nats_err("cannot connect to NATS")(e.to_string()))
}

/// A connected JetStream sink.
pub struct NatsSink {
    js: jetstream::Context,
    stream: String,
    subject: String,
    /// Last entry the stream holds.
    pub last: u64,
}

impl NatsSink {
    /// Connects, finds the stream (creating it with deny-delete and
    /// deny-purge if it does not exist and the user may create it), and
    /// checks that its last message is the ledger's entry of that number.
    pub async fn connect(cfg: &NatsSinkConfig, db: &Path) -> Result<NatsSink, MirrorError> {
        let client = connect(cfg).await?;
        let js = jetstream::new(client);
        let mut stream = match js.get_stream(&cfg.stream).await {
            Ok(s) => s,
            Err(_) => js
                .create_stream(jetstream::stream::Config {
                    name: cfg.stream.clone(),
                    subjects: vec![cfg.subject.clone()],
                    deny_delete: true,
                    deny_purge: true,
                    allow_direct: true,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| nats_err("cannot find or create the stream")(e.to_string()))?,
        };
        let info = stream
            .info()
            .await
            .map_err(|e| nats_err("cannot read the stream's state")(e.to_string()))?;
        if !info.config.deny_delete || !info.config.deny_purge {
            return Err(MirrorError::Diverged(format!(
                "stream {} allows deleting or purging messages; it must be created with deny_delete and deny_purge",
                cfg.stream
            )));
        }
        let last = info.state.last_sequence;
        if last > 0 {
            let msg = stream
                .get_raw_message(last)
                .await
                .map_err(|e| nats_err("cannot read the stream's last message")(e.to_string()))?;
            let copied = parse_copied(&String::from_utf8_lossy(&msg.payload)).ok_or_else(|| {
                MirrorError::Diverged(format!("stream message {last} is not a ledger entry"))
            })?;
            let conn = open_read_only(db)?;
            let local = crate::ledger::entries_after(&conn, last - 1, 1)?;
            match local.first() {
                Some(e)
                    if e.seq == last && copied.seq == last && copied.line == e.to_json_line() => {}
                Some(_) => {
                    return Err(MirrorError::Diverged(format!(
                        "stream message {last} is not the ledger's entry {last}: the histories fork"
                    )));
                }
                None => {
                    return Err(MirrorError::Diverged(format!(
                        "the stream has {last} entries, more than the local ledger: it was truncated"
                    )));
                }
            }
        }
        Ok(NatsSink {
            js,
            stream: cfg.stream.clone(),
            subject: cfg.subject.clone(),
            last,
        })
    }

    /// Publishes entries that continue the stream, pipelined, and waits
    /// for every acknowledgement in order.
    pub async fn ship(&mut self, entries: &[Entry]) -> Result<(), MirrorError> {
        let mut acks = Vec::with_capacity(entries.len());
        for e in entries {
            if e.seq != self.last + 1 + acks.len() as u64 {
                return Err(MirrorError::Diverged(format!(
                    "entry {} does not follow the stream",
                    e.seq
                )));
            }
            let publish = Publish::build()
                .payload(e.to_json_line().into())
                .message_id(e.seq.to_string())
                .expected_last_sequence(e.seq - 1);
            let ack = self
                .js
                .send_publish(self.subject.clone(), publish)
                .await
                .map_err(|err| nats_err("cannot publish")(err.to_string()))?;
            acks.push((e.seq, ack));
        }
        for (seq, ack) in acks {
            let ack = ack
                .await
                .map_err(|err| nats_err("publish not acknowledged")(err.to_string()))?;
            if ack.sequence != seq || ack.stream != self.stream {
                return Err(MirrorError::Diverged(format!(
                    "entry {seq} was stored as message {} of stream {}",
                    ack.sequence, ack.stream
                )));
            }
            self.last = seq;
        }
        Ok(())
    }
}

/// Reads every message of the stream as copied entries (for
/// `keyward audit verify --mirror nats`).
pub async fn fetch_copy(cfg: &NatsSinkConfig) -> Result<Vec<CopiedEntry>, MirrorError> {
    let client = connect(cfg).await?;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| nats_err("cannot find the stream")(e.to_string()))?;
    let last = stream
        .info()
        .await
        .map_err(|e| nats_err("cannot read the stream's state")(e.to_string()))?
        .state
        .last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let msg = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| nats_err("cannot read a stream message")(e.to_string()))?;
        let line = String::from_utf8_lossy(&msg.payload).into_owned();
        // A message holding another entry number shows up as a fork at
        // this position when compared.
        out.push(parse_copied(&line).ok_or_else(|| {
            MirrorError::Diverged(format!("stream message {seq} is not a ledger entry"))
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    use super::*;

    fn password_file(dir: &Path, mode: u32) -> std::path::PathBuf {
        let p = dir.join(format!("nats-{mode:o}.pw"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(b"hunter2-nats\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn cfg(password_file: &Path) -> NatsSinkConfig {
        NatsSinkConfig {
            // Nothing listens here: a refused file must fail before any
            // connection attempt, and a private one gets as far as it.
            url: "nats://127.0.0.1:9".into(),
            stream: "KEYWARD".into(),
            subject: "keyward.ledger".into(),
            user: Some("mirror".into()),
            password_file: Some(password_file.to_path_buf()),
        }
    }

    #[test]
    fn a_password_file_that_group_or_others_can_read_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for mode in [0o640, 0o604, 0o644] {
            let p = password_file(d.path(), mode);
            let e = rt.block_on(connect(&cfg(&p))).unwrap_err();
            assert!(matches!(e, MirrorError::Secret(_)), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("NATS password file")
                    && text.contains(&p.display().to_string())
                    && text.contains(&format!("mode {mode:04o}"))
                    && text.contains("chmod 0400"),
                "{text}"
            );
            assert!(!text.contains("hunter2"), "{text}");
        }
        // A private file passes the check; the connection itself fails.
        let p = password_file(d.path(), 0o400);
        let e = rt.block_on(connect(&cfg(&p))).unwrap_err();
        assert!(matches!(e, MirrorError::Io { .. }), "{e}");
    }
}
