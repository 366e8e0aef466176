//! `/v1/tenants`: operator-only tenant CRUD.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::parse_json;
use super::{ApiError, ApiState, Caller};
use crate::claims::error::ServiceError;
use crate::claims::tenant_input::TenantInput;
use crate::model::Backend;

/// `POST /v1/tenants` → 201 `{"tenant":{...},"token":"..."}` (the token is shown only here).
pub async fn create(
    State(s): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let input: TenantInput = parse_json(&body)?;
    let (tenant, token) = s.service.create_tenant(input).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "tenant": tenant, "token": token })),
    )
        .into_response())
}

/// `GET /v1/tenants` → `{"tenants":[...]}`
pub async fn list(State(s): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let tenants: Vec<_> = s
        .service
        .cache()
        .tenants()
        .iter()
        .map(|e| e.tenant.clone())
        .collect();
    Ok(Json(json!({ "tenants": tenants })).into_response())
}

/// `GET /v1/tenants/{id}`
pub async fn get_one(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let e = s.service.cache().tenant(&id).ok_or(ApiError::NotFound)?;
    Ok(Json(e.tenant.clone()).into_response())
}

/// `GET /v1/tenants/{id}/aws-trust-policy` → the trust policy an aws-iot tenant puts on its
/// role: the lobby's principal may assume it, with the tenant's external id only (operator,
/// or the tenant itself). 409 for a tenant without an aws-iot backend, 503 when the lobby's
/// own AWS identity cannot be read.
pub async fn aws_trust_policy(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if matches!(&caller, Caller::Tenant(t) if *t != id) {
        return Err(ApiError::NotFound);
    }
    let e = s.service.cache().tenant(&id).ok_or(ApiError::NotFound)?;
    let Backend::AwsIot(aws) = &e.tenant.backend else {
        return Err(ServiceError::Conflict("the tenant has no aws-iot backend".into()).into());
    };
    let principal = s.aws.lobby_principal().await.map_err(|e| {
        tracing::warn!(error = %e, "the lobby's AWS identity could not be read");
        ApiError::Unavailable(format!("the lobby's AWS identity could not be read: {e}"))
    })?;
    Ok(Json(json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "AWS": principal },
            "Action": "sts:AssumeRole",
            "Condition": { "StringEquals": { "sts:ExternalId": aws.external_id } },
        }],
    }))
    .into_response())
}

/// `PATCH /v1/tenants/{id}`
pub async fn patch(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let input: TenantInput = parse_json(&body)?;
    let tenant = s.service.update_tenant(&id, input).await?;
    Ok(Json(tenant).into_response())
}

/// `DELETE /v1/tenants/{id}` → 204; 409 while it has devices.
pub async fn delete(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    s.service.delete_tenant(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
