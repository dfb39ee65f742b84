//! The client against a real HTTP/1.1 server on a real Unix socket that
//! answers canned responses and records what it received.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use keyward_client::wire::{Action, IntentRequest};
use keyward_client::{Client, ClientError, IntentOutcome};

#[derive(Debug, Clone, Default)]
struct Seen {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Serves `(status, body)` for every request (or never answers when
/// `status` is 0); returns the socket directory and what was received.
fn serve(
    status: u16,
    body: &'static str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<Mutex<Vec<Seen>>>,
    tokio::runtime::Runtime,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(&path) })
        .unwrap();
    let seen_srv = Arc::clone(&seen);
    rt.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = Arc::clone(&seen_srv);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().to_string();
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let received = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        seen.lock().unwrap().push(Seen {
                            method,
                            path,
                            content_type,
                            body: received,
                        });
                        if status == 0 {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(StatusCode::from_u16(status).unwrap())
                                .body(Full::new(Bytes::from_static(body.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (dir, path, seen, rt)
}

fn request() -> IntentRequest {
    IntentRequest {
        intent_id: "pay/1".into(),
        key: "hot".into(),
        action: Action::Transfer {
            asset: "SOL".into(),
            to: "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM".into(),
            amount: "0.25".into(),
            recent_blockhash: "EkSnNWid2cvwEVnVx9aBqawnmiCNiDgp3gUdkDPTKN1N".into(),
            memo: None,
            create_recipient_account: false,
        },
    }
}

const SIGNED: &str = r#"{"intent_id":"pay/1","status":"signed","signature":"sig","transaction":"dHg=","ledger_seq":7,"entry_hash":"ab"}"#;

#[test]
fn signed_answer_and_the_request_sent() {
    let (_d, path, seen, rt) = serve(200, SIGNED);
    let out = rt
        .block_on(Client::new(&path).submit_intent(&request()))
        .unwrap();
    match out {
        IntentOutcome::Signed(s) => assert_eq!((s.signature.as_str(), s.ledger_seq), ("sig", 7)),
        other => panic!("{other:?}"),
    }
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/intents");
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    let sent: IntentRequest = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent, request());
}

#[test]
fn pending_answer() {
    let (_d, path, _seen, rt) = serve(
        202,
        r#"{"intent_id":"i","status":"pending_approval","approval":{"intent_hash":"ab","key":"hot","public_key":"k","message":"AQ==","required":2,"received":0,"approvers":["alice"],"expires_at":"2026-01-01T00:00:00Z","summary":"s"}}"#,
    );
    let out = rt
        .block_on(Client::new(&path).submit_intent(&request()))
        .unwrap();
    assert!(matches!(out, IntentOutcome::Pending(v) if v.approval.required == 2));
}

#[test]
fn denial_carries_code_and_reasons() {
    let (_d, path, _seen, rt) = serve(
        403,
        r#"{"error":{"code":"policy_denied","message":"denied","reasons":[{"rule":"daily_limit","detail":"x"}]}}"#,
    );
    let err = rt
        .block_on(Client::new(&path).submit_intent(&request()))
        .unwrap_err();
    match &err {
        ClientError::Api {
            status: 403,
            code,
            reasons,
            ..
        } => {
            assert_eq!(code, "policy_denied");
            assert_eq!(reasons[0].rule, "daily_limit");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), Some("policy_denied"));
}

#[test]
fn non_json_error_is_a_protocol_error() {
    let (_d, path, _seen, rt) = serve(500, "oops");
    let err = rt.block_on(Client::new(&path).health()).unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(ref m) if m.contains("500")),
        "{err:?}"
    );
}

#[test]
fn missing_socket_is_a_connect_error_and_silence_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(Client::new(dir.path().join("absent.sock")).keys())
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");

    let (_d, path, _seen, rt) = serve(0, "");
    let client = Client::new(&path).with_timeout(Duration::from_millis(300));
    let err = rt.block_on(client.policy()).unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
}

#[test]
fn get_intent_encodes_the_id_and_blocking_client_works_from_a_plain_thread() {
    let (_d, path, seen, _rt) = serve(
        200,
        r#"{"intent_id":"pay/1","status":"signed","signature":"sig","transaction":"dHg=","ledger_seq":7,"entry_hash":"ab"}"#,
    );
    let view = std::thread::spawn(move || {
        keyward_client::blocking::Client::new(&path)
            .unwrap()
            .get_intent("pay/1")
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(view.signature.as_deref(), Some("sig"));
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/v1/intents/pay%2F1");
    assert!(seen.body.is_empty());
}

/// A server that counts accepted connections; with `keep_alive` false it
/// closes every connection after one answer.
fn counting_server(
    keep_alive: bool,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::runtime::Runtime,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(&path) })
        .unwrap();
    let count = Arc::clone(&accepted);
    rt.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (dir, path, accepted, rt)
}

#[test]
fn sequential_requests_reuse_one_kept_alive_connection() {
    let (_dir, path, accepted, _srv) = counting_server(true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client::new(&path);
    let clone = client.clone();
    for i in 0..6 {
        let c = if i % 2 == 0 { &client } else { &clone };
        let (status, body) = rt
            .block_on(c.request_json::<()>(keyward_client::Method::GET, "/x", None))
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"{}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_server_that_closes_connections_is_handled_transparently() {
    let (_dir, path, accepted, _srv) = counting_server(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Client::new(&path);
    for _ in 0..5 {
        let (status, _) = rt
            .block_on(client.request_json::<()>(keyward_client::Method::GET, "/x", None))
            .unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
}
