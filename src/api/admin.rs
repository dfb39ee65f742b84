//! The admin API (admin socket, mode 0600, or 0660 with
//! `daemon.admin_socket_group`): operator actions, each recorded
//! in the ledger. They are the [`Operations`](crate::service::Operations)
//! service's, except the relay of approval tokens and the list of what
//! waits for approvals, which are the signing service's (a relayed token
//! takes the agent's approval path), and the health view both sockets
//! share.

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keyward_client::wire::{AdminKeyInfo, BreakerResetView, codes};

use super::error::{fallback, method_fallback};
use super::peer::is_operator;
use super::{AdminGroup, ApiError, AppState, PeerCred};
use crate::service::{AUDIT_BREAKER, BreakerError};

/// Routes of the admin socket.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admin/breakers/{name}/reset", post(reset_breaker))
        .route("/v1/admin/keys", get(keys).post(create_key))
        .route("/v1/admin/keys/{name}/rotate", post(rotate_key))
        .route("/v1/admin/keys/{name}/retire", post(retire_key))
        .route("/v1/admin/keys/{name}/sweep", post(sweep_key))
        .route("/v1/admin/policy/reload", post(reload_policy))
        .route("/v1/admin/approvers", get(list_approvers))
        .route(
            "/v1/admin/approvers/{name}",
            post(add_approver).delete(remove_approver),
        )
        .route(
            "/v1/admin/approvals",
            get(list_pending_approvals).post(relay_approval),
        )
        .route("/v1/admin/health", get(health))
        .route("/v1/admin/freezes", get(list_freezes).post(freeze))
        .route("/v1/admin/freezes/lift", post(unfreeze))
        .route("/v1/admin/backups/sign", post(sign_backup))
        .route("/v1/admin/drills", post(record_drill))
        .fallback(fallback)
        .method_not_allowed_fallback(method_fallback)
        .with_state(state)
}

/// Only root, the daemon's own user and members of
/// `daemon.admin_socket_group` may use the admin socket (the socket's mode
/// and group already say so; this is the second lock).
fn operator(group: &Option<AdminGroup>, peer: PeerCred) -> Result<u32, ApiError> {
    match peer.uid {
        Some(uid) if is_operator(group.as_ref(), &peer) => Ok(uid),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_an_operator",
            NOT_AN_OPERATOR,
        )),
    }
}

/// The message of a `not_an_operator` refusal.
pub(super) const NOT_AN_OPERATOR: &str = "only root, the daemon's user or a member of daemon.admin_socket_group may use the admin socket";

async fn reset_breaker(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let seq = state
        .operations
        .reset_breaker(&name, &format!("uid:{uid}"))
        .await
        .map_err(|e| {
            let status = match &e {
                BreakerError::Unknown(_) => StatusCode::NOT_FOUND,
                BreakerError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            ApiError::new(status, e.code(), e.to_string())
        })?;
    if name == AUDIT_BREAKER {
        tracing::warn!(uid, seq, "audit breaker reset by operator");
    } else {
        tracing::warn!(uid, agent = %name, seq, "agent breaker reset by operator");
    }
    Ok(axum::Json(BreakerResetView {
        breaker: name,
        state: "closed".to_owned(),
        ledger_seq: seq,
    })
    .into_response())
}

async fn add_approver(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let key = state
        .operations
        .add_approver(&name, &format!("uid:{uid}"))
        .await?;
    // The key leaves keywardd this once, to the operator; it is never logged.
    tracing::warn!(uid, approver = %name, "approver enrolled");
    let encoded = crate::service::encode_key(&key);
    Ok(axum::Json(keyward_client::wire::ApproverCreated {
        approver: name,
        key: encoded.to_string(),
    })
    .into_response())
}

async fn remove_approver(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let seq = state
        .operations
        .remove_approver(&name, &format!("uid:{uid}"))
        .await
        .map_err(|e| match e {
            crate::service::SubmitError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_approver",
                format!("no active approver named {name:?}"),
            ),
            other => other.into(),
        })?;
    tracing::warn!(uid, approver = %name, seq, "approver removed");
    Ok(axum::Json(keyward_client::wire::ApproverRemoved {
        approver: name,
        state: "removed".to_owned(),
        ledger_seq: seq,
    })
    .into_response())
}

async fn list_approvers(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    operator(&state.admin_group, peer)?;
    let list: Vec<keyward_client::wire::ApproverInfo> = state
        .operations
        .approvers()?
        .into_iter()
        .map(|a| keyward_client::wire::ApproverInfo {
            name: a.name,
            state: if a.removed_ms.is_some() {
                "removed"
            } else {
                "active"
            }
            .to_owned(),
            added_at: crate::ledger::format_utc(a.added_ms),
            removed_at: a.removed_ms.map(crate::ledger::format_utc),
        })
        .collect();
    Ok(axum::Json(list).into_response())
}

/// `POST /v1/admin/approvals`: an approver's token relayed by the operator;
/// the answer is the agent endpoint's.
async fn relay_approval(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let sub: keyward_client::wire::RelayedApproval =
        super::body::read_json(&headers, body, state.max_body).await?;
    let signer = std::sync::Arc::clone(&state.signer);
    let by = format!("uid:{uid}");
    // Runs to completion even if the operator's client goes away.
    let (agent, intent_id, outcome) =
        tokio::spawn(async move { signer.relay_approval(&sub.token, &by).await })
            .await
            .map_err(ApiError::from)?
            .map_err(|e| match e {
                crate::service::SubmitError::NotFound => ApiError::new(
                    StatusCode::NOT_FOUND,
                    codes::INTENT_NOT_FOUND,
                    "no intent pending approval binds to this token's intent hash",
                ),
                other => other.into(),
            })?;
    tracing::warn!(uid, agent = %agent, intent = %intent_id, "approval token relayed by operator");
    if outcome == crate::service::ApprovalOutcome::Rejected {
        return Ok(ApiError::new(
            StatusCode::FORBIDDEN,
            "approval_rejected",
            format!("intent {intent_id:?} of agent {agent:?} was rejected; it will not be signed"),
        )
        .into_response());
    }
    Ok(super::agent::approval_response(outcome))
}

/// `GET /v1/admin/approvals`: intents waiting for approvals.
async fn list_pending_approvals(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    operator(&state.admin_group, peer)?;
    let signer = std::sync::Arc::clone(&state.signer);
    let list = tokio::task::spawn_blocking(move || signer.pending_approvals())
        .await
        .map_err(ApiError::from)??;
    Ok(axum::Json(list).into_response())
}

async fn reload_policy(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    match state.operations.reload_policy(&format!("uid:{uid}")).await {
        Ok(r) => Ok(axum::Json(keyward_client::wire::PolicyReloadView {
            policy_sha256: r.policy_sha256,
            previous_sha256: r.previous_sha256,
            ledger_seq: r.ledger_seq,
        })
        .into_response()),
        Err(e) => {
            tracing::warn!(uid, error = %e, "policy reload refused; the old policy stays in force");
            let status = match &e {
                crate::service::ReloadError::Invalid(_)
                | crate::service::ReloadError::MissingKey { .. } => StatusCode::BAD_REQUEST,
                crate::service::ReloadError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
                crate::service::ReloadError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(
                status,
                e.code(),
                format!("{e}; the old policy stays in force"),
            ))
        }
    }
}

/// `POST /v1/admin/keys`: a new signing key generated inside the HSM,
/// answered once its `key_generated` entry is committed.
async fn create_key(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use crate::service::KeyCreateError;
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::KeyCreateRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let operations = std::sync::Arc::clone(&state.operations);
    let by = format!("uid:{uid}");
    // Runs to completion even if the operator's client goes away.
    let created = tokio::spawn(async move { operations.create_key(&req.name, &by).await })
        .await
        .map_err(ApiError::from)?
        .map_err(|e| {
            let status = match &e {
                KeyCreateError::InvalidName(_) | KeyCreateError::Reserved(_) => {
                    StatusCode::BAD_REQUEST
                }
                KeyCreateError::Exists(_) | KeyCreateError::Registered { .. } => {
                    StatusCode::CONFLICT
                }
                KeyCreateError::Hsm(_) | KeyCreateError::Ledger(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            ApiError::new(status, e.code(), e.to_string())
        })?;
    Ok(axum::Json(keyward_client::wire::KeyCreated {
        name: created.key.name.to_string(),
        public_key: created.key.public_key.to_base58(),
        ledger_seq: created.ledger_seq,
    })
    .into_response())
}

async fn keys(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    operator(&state.admin_group, peer)?;
    let core = state.operations.core();
    let policy = core.policy();
    let served = core.keys();
    let utc = |ms: Option<i64>| ms.map(crate::ledger::format_utc);
    // Every registered version, and keys served that the registry has not
    // recorded yet (registered at the next start).
    let registered = state
        .operations
        .registered_keys()
        .map_err(crate::service::SubmitError::from)?;
    let mut keys: Vec<AdminKeyInfo> = registered
        .iter()
        .map(|r| {
            let active = r.state == crate::ledger::registry::KeyState::Active;
            AdminKeyInfo {
                name: r.name.clone(),
                public_key: r.public_key.clone(),
                state: r.state.to_string(),
                agents: if active {
                    policy
                        .agents
                        .iter()
                        .filter(|a| a.keys.iter().any(|k| k.as_str() == r.name))
                        .map(|a| a.name.to_string())
                        .collect()
                } else {
                    Vec::new()
                },
                verifier_key: None,
                version: Some(r.version),
                backend: Some(r.backend.clone()),
                hsm_label: Some(r.hsm_label.clone()),
                created_at: utc(Some(r.created_ms)),
                rotated_at: utc(r.rotated_ms),
                retire_after: utc(r.retire_after_ms),
                retired_at: utc(r.retired_ms),
            }
        })
        .collect();
    for k in served.values() {
        if registered.iter().any(|r| r.name == k.name.as_str()) {
            continue;
        }
        keys.push(AdminKeyInfo {
            name: k.name.to_string(),
            public_key: k.public_key.to_base58(),
            state: "active".to_owned(),
            agents: policy
                .agents
                .iter()
                .filter(|a| a.keys.contains(&k.name))
                .map(|a| a.name.to_string())
                .collect(),
            verifier_key: None,
            version: None,
            backend: Some(core.hsm().backend().to_owned()),
            hsm_label: None,
            created_at: None,
            rotated_at: None,
            retire_after: None,
            retired_at: None,
        });
    }
    if let Some((public_key, vkey)) = &state.audit_key {
        keys.push(AdminKeyInfo {
            name: crate::ledger::checkpoint::AUDIT_KEY.to_owned(),
            public_key: public_key.clone(),
            state: "audit".to_owned(),
            agents: Vec::new(),
            verifier_key: Some(vkey.clone()),
            version: None,
            backend: Some(core.hsm().backend().to_owned()),
            hsm_label: None,
            created_at: None,
            rotated_at: None,
            retire_after: None,
            retired_at: None,
        });
    }
    keys.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    Ok(axum::Json(keys).into_response())
}

fn rotate_error(e: crate::service::rotation::RotateError) -> ApiError {
    use crate::service::rotation::RotateError;
    let status = match &e {
        RotateError::UnknownKey(_) => StatusCode::NOT_FOUND,
        RotateError::Invalid(_) => StatusCode::BAD_REQUEST,
        RotateError::WrongState(_) | RotateError::GracePeriod { .. } => StatusCode::CONFLICT,
        RotateError::Hsm(crate::hsm::HsmError::KeyMismatch { .. }) => StatusCode::CONFLICT,
        RotateError::Hsm(_) | RotateError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e.code(), e.to_string())
}

/// What the agent API would answer for a sweep's outcome.
fn sweep_result(swept: crate::service::sweep::Swept) -> keyward_client::wire::SweepResult {
    use crate::service::SubmitOutcome;
    let (status, body) = match swept.outcome {
        SubmitOutcome::Signed(s) => (200, serde_json::to_value(s).ok()),
        SubmitOutcome::Pending(p) => (202, serde_json::to_value(p).ok()),
        SubmitOutcome::Denied(reasons) => (
            403,
            serde_json::to_value(crate::service::denial_body(&reasons)).ok(),
        ),
        SubmitOutcome::Locked { retry_after_s } => (
            423,
            Some(serde_json::json!({"error": {"code": codes::AGENT_LOCKED,
                "message": format!("the agent is locked for {retry_after_s} more seconds")}})),
        ),
        SubmitOutcome::Expired => (
            410,
            Some(serde_json::json!({"error": {"code": codes::INTENT_EXPIRED,
                "message": "the sweep's approval window ended"}})),
        ),
        SubmitOutcome::Replayed { status, body } => (
            super::error::intent_reply_status(status).as_u16(),
            serde_json::from_slice(&body).ok(),
        ),
    };
    keyward_client::wire::SweepResult {
        agent: swept.agent,
        intent_id: swept.intent_id,
        http_status: status,
        body: body.unwrap_or(serde_json::Value::Null),
    }
}

async fn rotate_key(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::KeyRotateRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let by = format!("uid:{uid}");
    let (operations, signer) = (
        std::sync::Arc::clone(&state.operations),
        std::sync::Arc::clone(&state.signer),
    );
    // Runs to completion even if the operator's client goes away.
    let view = tokio::spawn(async move {
        let r = operations
            .rotate_key(&name, &req.reason, req.grace_s, &by)
            .await
            .map_err(rotate_error)?;
        let (mut sweep, mut sweep_error) = (None, None);
        if let Some(spec) = &req.sweep {
            match signer.sweep(&r.name, r.old_version, spec).await {
                Ok(s) => sweep = Some(sweep_result(s)),
                Err(e) => sweep_error = Some(ApiError::from(e).detail()),
            }
        }
        Ok::<_, ApiError>(keyward_client::wire::KeyRotatedView {
            name: r.name,
            old_version: r.old_version,
            new_version: r.new_version,
            old_public_key: r.old_key.public_key.to_base58(),
            new_public_key: r.new_key.public_key.to_base58(),
            statement: r.statement,
            old_signature: bs58::encode(r.old_signature).into_string(),
            new_signature: bs58::encode(r.new_signature).into_string(),
            retire_after: crate::ledger::format_utc(r.retire_after_ms),
            ledger_seq: r.ledger_seq,
            sweep,
            sweep_error,
        })
    })
    .await
    .map_err(ApiError::from)??;
    Ok(axum::Json(view).into_response())
}

async fn sweep_key(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::KeySweepRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let signer = std::sync::Arc::clone(&state.signer);
    let swept = tokio::spawn(async move { signer.sweep(&name, req.version, &req.sweep).await })
        .await
        .map_err(ApiError::from)??;
    tracing::warn!(uid, intent = %swept.intent_id, "sweep intent created by operator");
    Ok(axum::Json(sweep_result(swept)).into_response())
}

async fn retire_key(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::KeyRetireRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let by = format!("uid:{uid}");
    let operations = std::sync::Arc::clone(&state.operations);
    let retired = tokio::spawn(async move {
        operations
            .retire_key(&name, req.version, req.force, req.reason.as_deref(), &by)
            .await
    })
    .await
    .map_err(ApiError::from)?
    .map_err(rotate_error)?;
    Ok(axum::Json(keyward_client::wire::KeyRetiredView {
        key: retired.key,
        public_key: retired.public_key,
        forced: retired.forced,
        ledger_seq: retired.ledger_seq,
    })
    .into_response())
}

async fn health(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    operator(&state.admin_group, peer)?;
    let mut view = state.signer.health_view().await;
    // The operator's reasons, on this socket only.
    if let Ok(list) = state.operations.freezes().await {
        for v in &mut view.freezes {
            v.reason = list
                .iter()
                .find(|f| f.scope == v.scope)
                .map(|f| f.reason.clone());
        }
    }
    Ok(axum::Json(view).into_response())
}

// ---- Emergency freezes ----

fn freeze_error(e: crate::service::FreezeError) -> ApiError {
    use crate::service::FreezeError as E;
    let status = match &e {
        E::InvalidScope(_) | E::InvalidReason(_) => StatusCode::BAD_REQUEST,
        E::UnknownAgent(_) | E::UnknownKey(_) => StatusCode::NOT_FOUND,
        E::NotFrozen(_) => StatusCode::CONFLICT,
        E::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e.code(), e.to_string())
}

fn freeze_view(
    f: crate::service::Freeze,
    created: Option<bool>,
) -> keyward_client::wire::FreezeView {
    keyward_client::wire::FreezeView {
        since: crate::ledger::format_utc(f.since_ms),
        scope: f.scope,
        by: f.by,
        reason: Some(f.reason),
        ledger_seq: f.seq,
        created,
    }
}

/// `POST /v1/admin/freezes`: every new intent in scope is refused with
/// 423 `frozen` from the next request on; idempotent for a scope already
/// frozen (`created: false`, nothing recorded).
async fn freeze(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::FreezeRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let scope = crate::service::FreezeScope::parse(&req.scope, req.target.as_deref())
        .map_err(freeze_error)?;
    let operations = std::sync::Arc::clone(&state.operations);
    let by = format!("uid:{uid}");
    // Runs to completion even if the operator's client goes away.
    let outcome = tokio::spawn(async move { operations.freeze(scope, &req.reason, &by).await })
        .await
        .map_err(ApiError::from)?
        .map_err(freeze_error)?;
    Ok(axum::Json(freeze_view(outcome.freeze, Some(outcome.created))).into_response())
}

/// `POST /v1/admin/freezes/lift`: lifts a freeze; 409 `not_frozen` when
/// there is none for that scope.
async fn unfreeze(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::UnfreezeRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let scope = crate::service::FreezeScope::parse(&req.scope, req.target.as_deref())
        .map_err(freeze_error)?;
    let operations = std::sync::Arc::clone(&state.operations);
    let by = format!("uid:{uid}");
    let done =
        tokio::spawn(async move { operations.unfreeze(scope, req.reason.as_deref(), &by).await })
            .await
            .map_err(ApiError::from)?
            .map_err(freeze_error)?;
    Ok(axum::Json(keyward_client::wire::UnfreezeView {
        scope: done.lifted.scope,
        frozen_since: crate::ledger::format_utc(done.lifted.since_ms),
        frozen_seq: done.lifted.seq,
        ledger_seq: done.seq,
    })
    .into_response())
}

/// `GET /v1/admin/freezes`: the freezes in force, with their reasons.
async fn list_freezes(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
) -> Result<Response, ApiError> {
    operator(&state.admin_group, peer)?;
    let list = state
        .operations
        .freezes()
        .await
        .map_err(crate::service::SubmitError::from)?;
    let views: Vec<_> = list.into_iter().map(|f| freeze_view(f, None)).collect();
    Ok(axum::Json(views).into_response())
}

/// `POST /v1/admin/backups/sign`: the audit key's signature over a backup
/// manifest's domain-separated digest, answered once its `backup_created`
/// entry is committed.
async fn sign_backup(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use crate::service::{BackupSignError, BackupSignRequest};
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::BackupSignRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let hash32 = |field: &str, hex_text: &str| -> Result<[u8; 32], ApiError> {
        hex::decode(hex_text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("{field} must be 64 hex digits (a SHA-256)"),
                )
            })
    };
    let request = BackupSignRequest {
        manifest_sha256: hash32("manifest_sha256", &req.manifest_sha256)?,
        ledger_seq: req.ledger_seq,
        ledger_hash: hash32("ledger_hash", &req.ledger_hash)?,
        files: req.files,
    };
    let operations = std::sync::Arc::clone(&state.operations);
    let by = format!("uid:{uid}");
    // Runs to completion even if the operator's client goes away.
    let signed = tokio::spawn(async move { operations.sign_backup(request, &by).await })
        .await
        .map_err(ApiError::from)?
        .map_err(|e| {
            let status = match &e {
                BackupSignError::UnknownHead { .. } => StatusCode::CONFLICT,
                BackupSignError::NoAuditKey => StatusCode::INTERNAL_SERVER_ERROR,
                BackupSignError::HistoryBroken(_)
                | BackupSignError::Hsm(_)
                | BackupSignError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            ApiError::new(status, e.code(), e.to_string())
        })?;
    use base64::Engine as _;
    Ok(axum::Json(keyward_client::wire::BackupSigned {
        signature: base64::engine::general_purpose::STANDARD.encode(signed.signature),
        verifier_key: signed.verifier_key,
        ledger_seq: signed.ledger_seq,
    })
    .into_response())
}

/// `POST /v1/admin/drills`: records a finished drill (`drill_completed` and
/// the last drill of its kind, stamped with the daemon's clock); 400
/// `invalid_drill` for a malformed report, which changes nothing.
async fn record_drill(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use crate::service::{DrillError, DrillReport};
    let uid = operator(&state.admin_group, peer)?;
    let req: keyward_client::wire::DrillRecordRequest =
        super::body::read_json(&headers, body, state.max_body).await?;
    let report = DrillReport {
        kind: req.kind,
        outcome: req.outcome,
        duration_ms: req.duration_ms,
        detail: req.detail,
        failed_step: req.failed_step,
        steps: req
            .steps
            .into_iter()
            .map(|s| crate::ledger::events::DrillStep {
                step: s.step,
                outcome: s.outcome,
                duration_ms: s.duration_ms,
            })
            .collect(),
        recovery_time_ms: req.recovery_time_ms,
        live: req.live,
    };
    let operations = std::sync::Arc::clone(&state.operations);
    let by = format!("uid:{uid}");
    // Runs to completion even if the operator's client goes away.
    let last = tokio::spawn(async move { operations.record_drill(report, &by).await })
        .await
        .map_err(ApiError::from)?
        .map_err(|e| {
            let status = match &e {
                DrillError::Invalid(_) => StatusCode::BAD_REQUEST,
                DrillError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            ApiError::new(status, e.code(), e.to_string())
        })?;
    Ok(axum::Json(keyward_client::wire::DrillRecorded {
        completed_at: crate::ledger::format_utc(last.completed_ms),
        kind: last.kind,
        outcome: last.outcome,
        ledger_seq: last.seq,
    })
    .into_response())
}
