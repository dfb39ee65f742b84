//! The agent API (agent socket).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keyward_client::wire::{IntentRequest, codes};

use super::body::read_json;
use super::error::{fallback, method_fallback};
use super::{ApiError, AppState, PeerCred};
use crate::policy::AgentPolicy;
use crate::service::{SubmitOutcome, denial_body};

/// Routes of the agent socket.
pub fn agent_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/intents", post(submit_intent))
        .route("/v1/intents/{intent_id}", get(get_intent))
        .route("/v1/intents/{intent_id}/approvals", post(add_approval))
        .route("/v1/keys", get(keys))
        .route("/v1/policy", get(policy))
        .route("/v1/health", get(health))
        .fallback(fallback)
        .method_not_allowed_fallback(method_fallback)
        .with_state(state)
}

/// Maps the peer uid to its agent, or 403 `unknown_agent`.
fn agent_of(state: &AppState, peer: PeerCred) -> Result<AgentPolicy, ApiError> {
    let unknown =
        |detail: String| ApiError::new(StatusCode::FORBIDDEN, codes::UNKNOWN_AGENT, detail);
    let uid = peer
        .uid
        .ok_or_else(|| unknown("the peer's credentials could not be read".to_owned()))?;
    state.signer.agent_for_uid(uid).ok_or_else(|| {
        tracing::warn!(uid, pid = ?peer.pid, "request from a uid that is not an agent");
        unknown(format!("uid {uid} is not an agent in the policy"))
    })
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn submit_intent(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = agent_of(&state, peer)?;
    let dry_run = match query.as_deref() {
        None | Some("") => false,
        Some("dry_run=true") => true,
        Some("dry_run=false") => false,
        Some(other) => {
            // Anything else is refused: an agent must never get a real
            // signature because a parameter it meant was not understood.
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                codes::INVALID_REQUEST,
                format!("unsupported query {other:?}; the only parameter is dry_run=true"),
            ));
        }
    };
    let req: IntentRequest = read_json(&headers, body, state.max_body).await?;
    if dry_run {
        let result = state.signer.dry_run(&agent, &req).await?;
        return Ok((StatusCode::OK, axum::Json(result)).into_response());
    }
    // The submission runs to completion in its own task even if the client
    // goes away, so a decision is never left half recorded.
    let signer = Arc::clone(&state.signer);
    let outcome = tokio::spawn(async move { signer.submit(&agent, req).await })
        .await
        .map_err(ApiError::from)??;
    Ok(match outcome {
        SubmitOutcome::Signed(signed) => (StatusCode::OK, axum::Json(signed)).into_response(),
        SubmitOutcome::Denied(reasons) => {
            ApiError::from_body(StatusCode::FORBIDDEN, denial_body(&reasons)).into_response()
        }
        SubmitOutcome::Locked { retry_after_s } => locked_response(retry_after_s),
        SubmitOutcome::Pending(body) => (StatusCode::ACCEPTED, axum::Json(body)).into_response(),
        SubmitOutcome::Expired => ApiError::new(
            StatusCode::GONE,
            codes::INTENT_EXPIRED,
            "this intent waited for approvals longer than the approval window and expired; submit a new intent",
        )
        .into_response(),
        SubmitOutcome::Replayed { status, body } => {
            json_response(super::error::intent_reply_status(status), body)
        }
    })
}

/// 423 `agent_locked` with `Retry-After`.
pub(crate) fn locked_response(retry_after_s: u64) -> Response {
    let body = keyward_client::wire::ErrorBody {
        error: keyward_client::wire::ErrorDetail {
            code: codes::AGENT_LOCKED.to_owned(),
            message: format!(
                "this agent is locked after repeated denials; retry in {retry_after_s} s or ask an operator to run `keyward breaker reset`"
            ),
            reasons: Vec::new(),
            retry_after: Some(retry_after_s),
        },
    };
    let mut response = ApiError::from_body(StatusCode::LOCKED, body).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_s.to_string()) {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, v);
    }
    response
}

/// The answer to an approval token, for the agent and the admin socket.
pub(crate) fn approval_response(outcome: crate::service::ApprovalOutcome) -> Response {
    use crate::approval::ApprovalError as E;
    use crate::service::ApprovalOutcome as O;
    match outcome {
        O::Signed(s) => (StatusCode::OK, axum::Json(s)).into_response(),
        O::Counted(body) => (StatusCode::ACCEPTED, axum::Json(body)).into_response(),
        O::Denied(reasons) => {
            ApiError::from_body(StatusCode::FORBIDDEN, denial_body(&reasons)).into_response()
        }
        O::Rejected => ApiError::new(
            StatusCode::FORBIDDEN,
            "approval_rejected",
            "an approver rejected this intent; it will not be signed",
        )
        .into_response(),
        O::Locked { retry_after_s } => locked_response(retry_after_s),
        O::Frozen(f) => {
            ApiError::new(StatusCode::LOCKED, codes::FROZEN, f.to_string()).into_response()
        }
        O::Refused(e) => {
            let status = match &e {
                E::InvalidToken(_) | E::Expired(_) | E::OtherIntent => StatusCode::BAD_REQUEST,
                E::ApproverNotAllowed(_) => StatusCode::FORBIDDEN,
                E::Replayed | E::DuplicateApprover(_) | E::NotPending(_) => StatusCode::CONFLICT,
            };
            ApiError::new(status, e.code(), e.to_string()).into_response()
        }
    }
}

async fn add_approval(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(intent_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = agent_of(&state, peer)?;
    let sub: keyward_client::wire::ApprovalSubmission =
        read_json(&headers, body, state.max_body).await?;
    let signer = Arc::clone(&state.signer);
    let outcome =
        tokio::spawn(async move { signer.add_approval(&agent, &intent_id, &sub.token).await })
            .await
            .map_err(ApiError::from)??;
    Ok(approval_response(outcome))
}

async fn get_intent(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(intent_id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = agent_of(&state, peer)?;
    match state.signer.intent_view(&agent, &intent_id).await? {
        Some(view) => Ok(axum::Json(view).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            codes::INTENT_NOT_FOUND,
            format!("no intent {intent_id:?} for this agent"),
        )),
    }
}

async fn keys(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    let agent = agent_of(&state, peer)?;
    Ok(axum::Json(state.signer.keys_view(&agent)).into_response())
}

async fn policy(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    let agent = agent_of(&state, peer)?;
    Ok(axum::Json(state.signer.policy_view(&agent).await?).into_response())
}

async fn health(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    agent_of(&state, peer)?;
    Ok(axum::Json(state.signer.health_view().await).into_response())
}
