//! API errors as `{"error":"<code>","message":"..."}` with the SPEC §6 codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::claims::service::ServiceError;

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid token")]
    Unauthorized,
    #[error("operator token required")]
    OperatorOnly,
    #[error("not found")]
    NotFound,
    #[error("invalid claim code")]
    InvalidCode,
    #[error("device is claimed by another tenant")]
    AlreadyClaimed,
    #[error("{0}")]
    Conflict(String),
    #[error("tenant has reached max_devices")]
    QuotaExceeded,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized | Self::OperatorOnly => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::InvalidCode => (StatusCode::FORBIDDEN, "invalid_code"),
            Self::AlreadyClaimed => (StatusCode::CONFLICT, "already_claimed"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::QuotaExceeded => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({ "error": code, "message": self.to_string() });
        (status, Json(body)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound => Self::NotFound,
            ServiceError::InvalidCode => Self::InvalidCode,
            ServiceError::AlreadyClaimed => Self::AlreadyClaimed,
            ServiceError::Conflict(m) => Self::Conflict(m),
            ServiceError::QuotaExceeded => Self::QuotaExceeded,
            ServiceError::Invalid(m) => Self::InvalidRequest(m),
            ServiceError::Store(e) => {
                tracing::error!(error = %e, "store operation failed");
                Self::Internal
            }
        }
    }
}

/// Parses a JSON body; anything malformed is `invalid_request`, never a 500.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest(format!("body: {e}")))
}
