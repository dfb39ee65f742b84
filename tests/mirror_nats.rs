//! The NATS JetStream mirror against a real nats-server on 127.0.0.1 (a
//! free port, a temporary store, users with per-run passwords): every entry
//! once and in order, also across a SIGKILL of the mirror; signing stops at
//! the lag limit while the server is down and resumes when it is back; the
//! mirror's user cannot delete, purge, remove or reconfigure the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
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
    std::thread::sleep(Duration::from_millis(15));
    mirror.kill().unwrap();
    mirror.wait().unwrap();
    for h in handles {
        let _ = rt.block_on(h).unwrap();
    }
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

    // The mirror's user cannot rewrite history.
    rt.block_on(async {
        let js = js(port, "mirror", &mirror_pw).await;
        let stream = js.get_stream("KEYWARD").await.unwrap();
        assert!(stream.delete_message(1).await.is_err(), "delete a message");
        assert!(stream.purge().await.is_err(), "purge");
        assert!(
            js.delete_stream("KEYWARD").await.is_err(),
            "delete the stream"
        );
        let weakened = jetstream::stream::Config {
            name: "KEYWARD".into(),
            subjects: vec!["keyward.ledger".into()],
            deny_delete: false,
            deny_purge: false,
            ..Default::default()
        };
        assert!(
            js.update_stream(&weakened).await.is_err(),
            "update the stream"
        );
        // And the admin's stream still denies deletes at the stream level.
        let admin = self::js(port, "admin", &admin_pw).await;
        let s = admin.get_stream("KEYWARD").await.unwrap();
        assert!(
            s.delete_message(1).await.is_err(),
            "deny_delete holds for everyone"
        );
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
