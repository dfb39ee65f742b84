//! A synchronous client for programs without an async runtime.
//!
//! Each [`Client`] owns a small current-thread tokio runtime. Do not call it
//! from inside an async runtime (use [`crate::Client`] there).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::Serialize;

use crate::wire::{HealthView, IntentRequest, IntentView, KeysView, PolicyView};
use crate::{ClientError, IntentOutcome};

/// Blocking client of the agent (or admin) socket.
#[derive(Debug)]
pub struct Client {
    inner: crate::Client,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the socket at `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot start the client runtime: {e}")))?;
        Ok(Client {
            inner: crate::Client::new(socket),
            runtime,
        })
    }

    /// Sets the time limit of each request (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.inner = self.inner.with_timeout(timeout);
        self
    }

    /// `POST /v1/intents`.
    pub fn submit_intent(&self, req: &IntentRequest) -> Result<IntentOutcome, ClientError> {
        self.runtime.block_on(self.inner.submit_intent(req))
    }

    /// `POST /v1/intents/{id}/approvals`.
    pub fn add_approval(&self, intent_id: &str, token: &str) -> Result<IntentOutcome, ClientError> {
        self.runtime
            .block_on(self.inner.add_approval(intent_id, token))
    }

    /// `POST /v1/intents?dry_run=true`.
    pub fn dry_run(&self, req: &IntentRequest) -> Result<crate::wire::DryRunResult, ClientError> {
        self.runtime.block_on(self.inner.dry_run(req))
    }

    /// `GET /v1/intents/{id}`.
    pub fn get_intent(&self, intent_id: &str) -> Result<IntentView, ClientError> {
        self.runtime.block_on(self.inner.get_intent(intent_id))
    }

    /// `GET /v1/keys`.
    pub fn keys(&self) -> Result<KeysView, ClientError> {
        self.runtime.block_on(self.inner.keys())
    }

    /// `GET /v1/policy`.
    pub fn policy(&self) -> Result<PolicyView, ClientError> {
        self.runtime.block_on(self.inner.policy())
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Result<HealthView, ClientError> {
        self.runtime.block_on(self.inner.health())
    }

    /// One request with an optional JSON body; any status is returned.
    pub fn request_json<T: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.runtime
            .block_on(self.inner.request_json(method, path, body))
    }
}
