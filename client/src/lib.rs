//! keyward-client: the wire types of the keyward agent API and clients for
//! its Unix socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyward_client::ClientError> {
//! use keyward_client::{Client, IntentOutcome};
//! use keyward_client::wire::{Action, IntentRequest};
//!
//! let client = Client::new("/run/keyward/agent.sock");
//! let req = IntentRequest {
//!     intent_id: "pay-0001".into(),
//!     key: "hot".into(),
//!     action: Action::Transfer {
//!         asset: "SOL".into(),
//!         to: "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM".into(),
//!         amount: "0.25".into(),
//!         recent_blockhash: "EkSnNWid2cvwEVnVx9aBqawnmiCNiDgp3gUdkDPTKN1N".into(),
//!         memo: None,
//!         create_recipient_account: false,
//!     },
//! };
//! match client.submit_intent(&req).await? {
//!     IntentOutcome::Signed(s) => println!("signed: {} (ledger seq {})", s.signature, s.ledger_seq),
//!     IntentOutcome::Pending(p) => println!(
//!         "waiting for {} approvals: {}",
//!         p.approval.required, p.approval.summary
//!     ),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors the daemon answers carry its stable code ([`ClientError::Api`]);
//! denials carry the rules that were broken.

pub mod blocking;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
pub use hyper::Method;
use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HOST};
use serde::Serialize;
use serde::de::DeserializeOwned;

use wire::{
    DenialReason, ErrorBody, HealthView, IntentRequest, IntentView, KeysView, PendingIntent,
    PolicyView, SignedIntent,
};

/// Largest response body the client reads.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Default time limit of one request (connect, send, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `POST /v1/intents` answered.
#[derive(Debug, Clone, PartialEq)]
pub enum IntentOutcome {
    /// 200: signed and recorded.
    Signed(SignedIntent),
    /// 202: waiting for human approval: the approval request.
    Pending(PendingIntent),
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error body.
    #[error("keyward refused ({status} {code}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code, e.g. `policy_denied`.
        code: String,
        /// Human-readable message.
        message: String,
        /// The broken rules, for `policy_denied`.
        reasons: Vec<DenialReason>,
        /// Seconds to wait before retrying, when the daemon says so.
        retry_after: Option<u64>,
    },
    /// The socket could not be reached.
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The request did not complete in time.
    #[error("the request timed out")]
    Timeout,
    /// The answer was not what the API defines.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The daemon's error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Async client of the agent (or admin) socket. Cheap to clone; clones
/// share a small pool of kept-alive connections, so a busy agent does not
/// pay a new connection per request.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    idle: Arc<Mutex<Vec<Sender>>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Idle connections kept per client (and its clones).
const MAX_IDLE: usize = 64;

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    text.replace(['\r', '\n'], " ")
}

/// Turns a non-2xx answer into [`ClientError::Api`] (or `Protocol` when the
/// body is not the API's error shape).
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
            reasons: e.error.reasons,
            retry_after: e.error.retry_after,
        },
        Err(_) => ClientError::Protocol(format!(
            "HTTP {status} with an unexpected body: {}",
            snippet(body)
        )),
    }
}

fn parse<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(api_error(status, body));
    }
    serde_json::from_slice(body).map_err(|e| {
        ClientError::Protocol(format!("cannot parse the answer ({e}): {}", snippet(body)))
    })
}

/// Percent-encodes one path segment.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client of the socket at `socket`. Does no I/O.
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Sets the time limit of each request (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /v1/intents`: asks for a signature.
    pub async fn submit_intent(&self, req: &IntentRequest) -> Result<IntentOutcome, ClientError> {
        let (status, body) = self
            .request_json(Method::POST, "/v1/intents", Some(req))
            .await?;
        match status {
            StatusCode::OK => parse(status, &body).map(IntentOutcome::Signed),
            StatusCode::ACCEPTED => parse(status, &body).map(IntentOutcome::Pending),
            s if s.is_success() => Err(ClientError::Protocol(format!("unexpected status {s}"))),
            s => Err(api_error(s, &body)),
        }
    }

    /// `POST /v1/intents/{id}/approvals`: hands an approval token to the
    /// daemon. 200 signed when it completed the quorum, 202 pending with the
    /// new count otherwise; refusals are [`ClientError::Api`] with their
    /// codes.
    pub async fn add_approval(
        &self,
        intent_id: &str,
        token: &str,
    ) -> Result<IntentOutcome, ClientError> {
        let path = format!("/v1/intents/{}/approvals", encode_segment(intent_id));
        let body = wire::ApprovalSubmission {
            token: token.to_owned(),
        };
        let (status, body) = self.request_json(Method::POST, &path, Some(&body)).await?;
        match status {
            StatusCode::OK => parse(status, &body).map(IntentOutcome::Signed),
            StatusCode::ACCEPTED => parse(status, &body).map(IntentOutcome::Pending),
            s if s.is_success() => Err(ClientError::Protocol(format!("unexpected status {s}"))),
            s => Err(api_error(s, &body)),
        }
    }

    /// `POST /v1/intents?dry_run=true`: what keyward would decide for
    /// `req` now, without signing or reserving anything. A dry run counts
    /// toward the agent's rate limit, and a denied one toward its breaker.
    pub async fn dry_run(&self, req: &IntentRequest) -> Result<wire::DryRunResult, ClientError> {
        let (status, body) = self
            .request_json(Method::POST, "/v1/intents?dry_run=true", Some(req))
            .await?;
        parse(status, &body)
    }

    /// `GET /v1/intents/{id}`: the state of one of this agent's intents.
    pub async fn get_intent(&self, intent_id: &str) -> Result<IntentView, ClientError> {
        let path = format!("/v1/intents/{}", encode_segment(intent_id));
        let (status, body) = self.request_json::<()>(Method::GET, &path, None).await?;
        parse(status, &body)
    }

    /// `GET /v1/keys`: the keys this agent may use.
    pub async fn keys(&self) -> Result<KeysView, ClientError> {
        let (status, body) = self
            .request_json::<()>(Method::GET, "/v1/keys", None)
            .await?;
        parse(status, &body)
    }

    /// `GET /v1/policy`: this agent's effective policy and remaining budgets.
    pub async fn policy(&self) -> Result<PolicyView, ClientError> {
        let (status, body) = self
            .request_json::<()>(Method::GET, "/v1/policy", None)
            .await?;
        parse(status, &body)
    }

    /// `GET /v1/health`: HSM and ledger state.
    pub async fn health(&self) -> Result<HealthView, ClientError> {
        let (status, body) = self
            .request_json::<()>(Method::GET, "/v1/health", None)
            .await?;
        parse(status, &body)
    }

    /// One request with an optional JSON body; returns the status and body
    /// whatever the status (used by the admin CLI).
    pub async fn request_json<T: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let payload = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| {
                ClientError::Protocol(format!("cannot serialize the request: {e}"))
            })?),
            None => None,
        };
        tokio::time::timeout(self.timeout, self.send(method, path, payload))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// An idle kept-alive connection that is ready, if there is one.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
            .await
            .map_err(|e| ClientError::Protocol(format!("HTTP handshake failed: {e}")))?;
        // The connection's driver lives as long as the connection: until
        // the server closes it or the last sender is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        payload: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost");
        if payload.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let mut request = builder
            .body(Full::new(Bytes::from(payload.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(format!("invalid request: {e}")))?;
        // A kept-alive connection may have been closed by the daemon while
        // idle; a request it did not send goes out again on a new one.
        let mut sender = loop {
            let Some(mut sender) = self.take_idle() else {
                break self.connect().await?;
            };
            match sender.try_send_request(request).await {
                Ok(response) => return self.finish(sender, response).await,
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => {
                        return Err(ClientError::Protocol(format!(
                            "request failed: {}",
                            e.into_error()
                        )));
                    }
                },
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(format!("request failed: {e}")))?;
        self.finish(sender, response).await
    }

    /// Reads the whole answer, then returns the connection to the pool.
    async fn finish(
        &self,
        sender: Sender,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("cannot read the answer: {e}")))?
            .to_bytes();
        self.put_idle(sender);
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("pay-1_a.b~"), "pay-1_a.b~");
        assert_eq!(encode_segment("a/b?c"), "a%2Fb%3Fc");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let body = br#"{"error":{"code":"policy_denied","message":"no","reasons":[{"rule":"per_tx_limit","detail":"too much"}]}}"#;
        match api_error(StatusCode::FORBIDDEN, body) {
            ClientError::Api {
                status,
                code,
                reasons,
                ..
            } => {
                assert_eq!((status, code.as_str()), (403, "policy_denied"));
                assert_eq!(reasons[0].rule, "per_tx_limit");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            api_error(StatusCode::BAD_GATEWAY, b"<html>"),
            ClientError::Protocol(_)
        ));
    }
}
