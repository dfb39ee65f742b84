//! The one error shape of the API: `{"error": {"code", "message", ...}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyward_client::wire::{ErrorBody, ErrorDetail, codes};

use crate::intents::IntentStatus;
use crate::service::SubmitError;

/// An API error: status and body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// An error with a stable code and a message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.to_owned(),
                    message: message.into(),
                    reasons: Vec::new(),
                    retry_after: None,
                },
            },
        }
    }

    /// From a full body (e.g. a policy denial with reasons).
    pub fn from_body(status: StatusCode, body: ErrorBody) -> ApiError {
        ApiError { status, body }
    }

    /// The error object, for a response that carries it beside others.
    pub fn detail(self) -> ErrorDetail {
        self.body.error
    }

    /// 404 for unknown routes.
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such endpoint")
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            codes::METHOD_NOT_ALLOWED,
            "method not allowed on this endpoint",
        )
    }
}

/// The HTTP status of a service error: the one place it is decided.
pub fn submit_error_status(e: &SubmitError) -> StatusCode {
    match e {
        SubmitError::BadRequest { .. } => StatusCode::BAD_REQUEST,
        SubmitError::Conflict | SubmitError::InProgress => StatusCode::CONFLICT,
        SubmitError::NotFound => StatusCode::NOT_FOUND,
        SubmitError::AuditUnavailable(_)
        | SubmitError::Hsm(_)
        | SubmitError::MirrorLagging(_)
        | SubmitError::HistoryBroken(_) => StatusCode::SERVICE_UNAVAILABLE,
        SubmitError::Frozen(_) => StatusCode::LOCKED,
        SubmitError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The HTTP status that answered an intent in `status` (what a repeated
/// submission replays).
pub fn intent_reply_status(status: IntentStatus) -> StatusCode {
    match status {
        IntentStatus::Signed => StatusCode::OK,
        IntentStatus::PendingApproval => StatusCode::ACCEPTED,
        IntentStatus::Denied => StatusCode::FORBIDDEN,
        IntentStatus::Expired => StatusCode::GONE,
        // Never replayed: the submission answers `intent_in_progress`.
        IntentStatus::InProgress => StatusCode::CONFLICT,
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        ApiError::new(submit_error_status(&e), e.code(), e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    /// A request's task panicked or was cancelled: 500, nothing released.
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// Handler for unknown routes.
pub async fn fallback() -> ApiError {
    ApiError::not_found()
}

/// Handler for wrong methods.
pub async fn method_fallback() -> ApiError {
    ApiError::method_not_allowed()
}
