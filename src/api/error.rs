//! API errors as `{"error":"<code>","message":"..."}` with the SPEC §6 codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::claims::error::ServiceError;
use crate::store::StoreError;

/// Every error the API answers with: its own (authentication, parsing) or the claims
/// service's, each mapped to a SPEC §6 code in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid token")]
    Unauthorized,
    #[error("operator token required")]
    OperatorOnly,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("too many requests from this address; slow down")]
    RateLimited,
    /// A dependency (AWS) could not be reached; the message says which.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized | Self::OperatorOnly => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound | Self::Service(ServiceError::NotFound) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            Self::Service(ServiceError::InvalidCode) => (StatusCode::FORBIDDEN, "invalid_code"),
            Self::Service(ServiceError::AlreadyClaimed) => {
                (StatusCode::CONFLICT, "already_claimed")
            }
            Self::Service(ServiceError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            Self::Service(ServiceError::QuotaExceeded) => {
                (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded")
            }
            Self::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::InvalidRequest(_) | Self::Service(ServiceError::Invalid(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            Self::Service(ServiceError::Store(StoreError::Unavailable(_))) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            Self::Service(ServiceError::Store(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl ApiError {
    /// The status and the `{"error","message"}` body this error answers with (also one
    /// entry's answer in a batch).
    pub fn status_and_body(&self) -> (StatusCode, serde_json::Value) {
        let (status, code) = self.status_and_code();
        let message = match self {
            Self::Service(ServiceError::Store(e @ StoreError::Unavailable(_))) => {
                // The caller may retry (every mutation is safe to repeat); the details are the
                // operator's.
                tracing::warn!(error = %e, "store unavailable");
                "the store, or a lock in it, could not be reached in time; retry later".to_owned()
            }
            Self::Service(ServiceError::Store(e)) => {
                // The operator must look at the store; the caller learns only that it failed.
                tracing::error!(error = %e, "store operation failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        (
            status,
            serde_json::json!({ "error": code, "message": message }),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.status_and_body();
        (status, Json(body)).into_response()
    }
}

/// Parses a JSON body; anything malformed is `invalid_request`, never a 500.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest(format!("body: {e}")))
}
