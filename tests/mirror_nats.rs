//! The NATS JetStream mirror against a real nats-server on 127.0.0.1 (a
//! free port, a temporary store, users with per-run passwords): every entry
//! once and in order, also across a SIGKILL of the mirror; signing stops at
//! the lag limit while the server is down and resumes when it is back; the
//! mirror's user cannot delete, purge, remove or reconfigure the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use keyward_client::{ClientError, IntentOutcome};

struct Nats {
    child: Option<Child>,
    port: u16,
    conf: std::path::PathBuf,
}

impl Nats {
    fn start(dir: &Path, port: u16, admin_pw: &str, mirror_pw: &str) -> Nats {
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                r#"listen: "127.0.0.1:{port}"
jetstream {{ store_dir: "{store}" }}
accounts {{
  KW {{
    jetstream: enabled
    users: [
      {{ user: admin, password: "{admin_pw}" }}
      {{ user: mirror, password: "{mirror_pw}", permissions: {{
          publish: {{ allow: ["keyward.ledger", "$JS.API.INFO", "$JS.API.STREAM.INFO.KEYWARD",
                              "$JS.API.STREAM.MSG.GET.KEYWARD", "$JS.API.DIRECT.GET.KEYWARD", "$JS.API.DIRECT.GET.KEYWARD.>"] }}
          subscribe: {{ allow: ["_INBOX.>"] }}
      }} }}
    ]
  }}
}}
"#,
                store = dir.join("js").display()
            ),
        )
        .unwrap();
        let mut n = Nats {
            child: None,
            port,
            conf,
        };
        n.restart();
        n
    }

    fn restart(&mut self) {
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed by scripts/install-deps.sh");
        self.child = Some(child);
        wait_until("nats-server to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn password() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

async fn js(port: u16, user: &str, pw: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.into(), pw.into())
        .request_timeout(Some(Duration::from_secs(1)))
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    // A refused request (permissions) is never answered: time out soon.
    let mut ctx = jetstream::new(client);
    ctx.set_timeout(Duration::from_secs(1));
    ctx
}

/// The permission violations the server reported to a client.
type Violations = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Like [`js`], and collects the server's `Permissions Violation` reports,
/// so that a refusal can be told from a timeout of another cause.
async fn js_watched(port: u16, user: &str, pw: &str) -> (jetstream::Context, Violations) {
    let seen: Violations = Default::default();
    let sink = seen.clone();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.into(), pw.into())
        .request_timeout(Some(Duration::from_secs(1)))
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(async_nats::ServerError::Other(m)) = event {
                    sink.lock().unwrap().push(m);
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut ctx = jetstream::new(client);
    ctx.set_timeout(Duration::from_secs(1));
    (ctx, seen)
}

/// Waits until the server has reported a permissions violation for a
/// publish to `subject`: the request was refused, not lost.
fn refused_by_server(seen: &Violations, subject: &str) {
    let want = format!("Permissions Violation for Publish to \"{subject}\"");
    wait_until(
        &format!("the server to refuse {subject}"),
        Duration::from_secs(10),
        || seen.lock().unwrap().iter().any(|m| m.contains(&want)),
    );
}

#[test]
fn jetstream_mirror_is_exact_fails_closed_and_cannot_be_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let (admin_pw, mirror_pw) = (password(), password());
    let port = free_port();
    let mut nats = Nats::start(tmp.path(), port, &admin_pw, &mirror_pw);
    let rt = rt();
    // The operator creates the stream; the mirror's user could not.
    rt.block_on(async {
        js(port, "admin", &admin_pw)
            .await
            .create_stream(jetstream::stream::Config {
                name: "KEYWARD".into(),
                subjects: vec!["keyward.ledger".into()],
                deny_delete: true,
                deny_purge: true,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .unwrap();
    });

    let mut inst = Instance::init();
    let pw_file = tmp.path().join("mirror.pw");
    std::fs::write(&pw_file, &mirror_pw).unwrap();
    // Like the PIN file: only its owner may read it.
    std::fs::set_permissions(
        &pw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let ack_dir = inst.inst_dir().join("state").join("mirror");
    let cfg = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(
        &inst.config,
        format!(
            "{cfg}\n[mirror]\nmax_unmirrored_entries = 12\n\
             nats = {{ url = \"nats://127.0.0.1:{port}\", user = \"mirror\", password_file = \"{}\" }}\n",
            pw_file.display()
        ),
    )
    .unwrap();
    inst.start();
    let head = |inst: &Instance| rt.block_on(inst.client().health()).unwrap().ledger.head_seq;
    let acked = || keyward::mirror::read_ack(&ack_dir, "nats");
    let mut mirror = start_mirror(&inst);
    wait_until("the first catch-up", Duration::from_secs(30), || {
        acked() >= head(&inst)
    });
    for i in 0..3 {
        let r = rt.block_on(inst.client().submit_intent(&transfer(
            &format!("a{i}"),
            &random_pubkey(),
            "0.01",
        )));
        assert!(matches!(r, Ok(IntentOutcome::Signed(_))), "{r:?}");
    }

    // SIGKILL the mirror in the middle of a burst; restart it.
    wait_until("the mirror to ship a0..a2", Duration::from_secs(30), || {
        acked() >= head(&inst)
    });
    let burst_start = head(&inst);
    let client = inst.client();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let c = client.clone();
            rt.spawn(async move {
                c.submit_intent(&transfer(&format!("b{i}"), &random_pubkey(), "0.01"))
                    .await
            })
        })
        .collect();
    // Once the mirror has shipped an entry of the burst.
    wait_until(
        "the mirror to ship an entry of the burst",
        Duration::from_secs(30),
        || acked() > burst_start,
    );
    mirror.kill().unwrap();
    mirror.wait().unwrap();
    // At most 9 entries of the burst wait unmirrored: it signs in full.
    for (i, h) in handles.into_iter().enumerate() {
        match rt.block_on(h).unwrap() {
            Ok(IntentOutcome::Signed(s)) => assert_eq!(s.intent_id, format!("b{i}")),
            other => panic!("b{i}: {other:?}"),
        }
    }
    assert_eq!(head(&inst), burst_start + 9);
    let mut mirror = start_mirror(&inst);
    wait_until("catch-up after SIGKILL", Duration::from_secs(30), || {
        acked() >= head(&inst)
    });
    let n = head(&inst);
    rt.block_on(async {
        let mut stream = js(port, "admin", &admin_pw)
            .await
            .get_stream("KEYWARD")
            .await
            .unwrap();
        let state = stream.info().await.unwrap().state.clone();
        assert_eq!(
            (state.messages, state.last_sequence),
            (n, n),
            "every entry exactly once"
        );
        for seq in 1..=n {
            let m = stream.get_raw_message(seq).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["seq"].as_u64(), Some(seq), "in order");
        }
    });

    // nats-server down: signing continues to the lag limit, then 503.
    nats.stop();
    let mut refused = false;
    for i in 0..10 {
        match rt.block_on(inst.client().submit_intent(&transfer(
            &format!("c{i}"),
            &random_pubkey(),
            "0.01",
        ))) {
            Ok(IntentOutcome::Signed(_)) => {}
            Err(ClientError::Api {
                status: 503, code, ..
            }) => {
                assert_eq!(code, "mirror_lagging");
                refused = true;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused, "signing stopped at the lag limit");
    // Back up: the mirror catches up and signing resumes, same keywardd.
    nats.restart();
    wait_until(
        "catch-up after the server came back",
        Duration::from_secs(30),
        || acked() >= head(&inst),
    );
    let r = rt.block_on(
        inst.client()
            .submit_intent(&transfer("after", &random_pubkey(), "0.01")),
    );
    assert!(matches!(r, Ok(IntentOutcome::Signed(_))), "{r:?}");

    // The mirror's user cannot rewrite history: the server refuses each
    // request (a permissions violation it reports; the request itself is
    // never answered, so the client sees a timeout), and nothing changed.
    use jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
    use jetstream::stream::{DeleteMessageErrorKind, PurgeErrorKind};
    let (js_m, seen) = rt.block_on(js_watched(port, "mirror", &mirror_pw));
    rt.block_on(async {
        let stream = js_m.get_stream("KEYWARD").await.unwrap();
        let e = stream.delete_message(1).await.unwrap_err();
        assert_eq!(e.kind(), DeleteMessageErrorKind::TimedOut, "{e}");
        let e = stream.purge().await.unwrap_err();
        assert_eq!(e.kind(), PurgeErrorKind::TimedOut, "{e}");
        // (delete_stream reports a timed-out request as `Request`.)
        match js_m.delete_stream("KEYWARD").await {
            Err(e) => assert_eq!(e.kind(), GetStreamErrorKind::Request, "{e}"),
            Ok(_) => panic!("the mirror's user deleted the stream"),
        }
        let weakened = jetstream::stream::Config {
            name: "KEYWARD".into(),
            subjects: vec!["keyward.ledger".into()],
            deny_delete: false,
            deny_purge: false,
            ..Default::default()
        };
        let e = js_m.update_stream(&weakened).await.unwrap_err();
        assert_eq!(e.kind(), CreateStreamErrorKind::TimedOut, "{e}");
    });
    refused_by_server(&seen, "$JS.API.STREAM.MSG.DELETE.KEYWARD");
    refused_by_server(&seen, "$JS.API.STREAM.PURGE.KEYWARD");
    refused_by_server(&seen, "$JS.API.STREAM.DELETE.KEYWARD");
    refused_by_server(&seen, "$JS.API.STREAM.UPDATE.KEYWARD");
    rt.block_on(async {
        // And the admin's stream still denies deletes at the stream level:
        // JetStream answers with an error.
        let admin = self::js(port, "admin", &admin_pw).await;
        let mut s = admin.get_stream("KEYWARD").await.unwrap();
        let e = s.delete_message(1).await.unwrap_err();
        assert!(
            matches!(e.kind(), DeleteMessageErrorKind::JetStream(_)),
            "deny_delete holds for everyone: {e}"
        );
        // Nothing was deleted, purged or reconfigured.
        let info = s.info().await.unwrap().clone();
        assert_eq!(info.state.first_sequence, 1);
        assert_eq!(info.state.messages, info.state.last_sequence);
        assert!(info.config.deny_delete && info.config.deny_purge);
        assert!(s.get_raw_message(1).await.is_ok());
    });

    // Stop keywardd, let the mirror ship the last entries, compare.
    assert!(inst.stop().success());
    let last = keyward::ledger::verify_chain(&inst.db).unwrap().head_seq;
    wait_until("the final entries", Duration::from_secs(30), || {
        acked() >= last
    });
    let out = inst.keyward(&[
        "audit",
        "verify",
        "--db",
        inst.db.to_str().unwrap(),
        "--mirror",
        "nats",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("agrees on {last} entries")));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mirror.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(mirror.wait().unwrap().success());
}
