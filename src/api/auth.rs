//! Bearer-token authentication: the operator token, or a tenant's token (looked up by hash).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::{ApiError, ApiState};
use crate::claims::service::token_hash;

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    Operator,
    Tenant(String),
}

impl Caller {
    /// The tenant scope of the caller (`None` for the operator, who sees everything).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Operator => None,
            Caller::Tenant(t) => Some(t),
        }
    }

    /// Fails unless the caller is the operator.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Tenant(_) => Err(ApiError::OperatorOnly),
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The auth scheme is case-insensitive (RFC 9110 §11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let hash = token_hash(token);
        if bool::from(hash.ct_eq(&state.admin_token_hash)) {
            return Ok(Caller::Operator);
        }
        if let Some(t) = state.service.cache().tenant_by_token(&hash) {
            return Ok(Caller::Tenant(t.tenant.id.clone()));
        }
        // In a fleet the tenant may have been created on another node a moment ago: apply
        // the change log once before saying no (one indexed query; `api.rate_limit` bounds
        // how often a stranger can make this node ask).
        if state.service.store().fleet().is_some() {
            state.service.catch_up().await?;
            if let Some(t) = state.service.cache().tenant_by_token(&hash) {
                return Ok(Caller::Tenant(t.tenant.id.clone()));
            }
        }
        Err(ApiError::Unauthorized)
    }
}
