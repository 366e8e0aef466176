//! `/v1/claims`: claim a device with its code, unclaim it.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::parse_json;
use super::{ApiError, ApiState, Caller};
use crate::claims::model::{Claim, ClaimState};
use crate::edge::identity::DeviceId;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    code: String,
    cert_pem: Option<String>,
    /// Operator only: the tenant to claim for.
    tenant: Option<String>,
}

/// `POST /v1/claims` → 201 new claim, 200 when this tenant already holds it.
pub async fn claim(
    State(s): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ClaimBody = parse_json(&body)?;
    let tenant = match (&caller, body.tenant) {
        (Caller::Tenant(own), None) => own.clone(),
        (Caller::Tenant(own), Some(t)) if &t == own => t,
        (Caller::Tenant(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "a tenant claims only for itself".into(),
            ))
        }
        (Caller::Operator, Some(t)) => t,
        (Caller::Operator, None) => {
            return Err(ApiError::InvalidRequest(
                "the operator must name a \"tenant\"".into(),
            ))
        }
    };
    if caller.tenant().is_none() && s.service.cache().tenant(&tenant).is_none() {
        return Err(ApiError::InvalidRequest(format!("no tenant {tenant:?}")));
    }
    let out = s
        .service
        .claim(&tenant, &body.code, body.cert_pem.as_deref())
        .await?;
    let status = if out.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let c = &out.claim;
    let body = claim_summary(c);
    Ok((status, Json(body)).into_response())
}

/// `DELETE /v1/claims/{device_id}` → 200 `{"device_id","tenant":null,"state":"unclaimed"}`.
pub async fn unclaim(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_device_id(&id)?;
    s.service.unclaim(&id, caller.tenant()).await?;
    let state = if s.service.cache().is_revoked(&id) {
        ClaimState::Revoked
    } else {
        ClaimState::Unclaimed
    };
    Ok(Json(json!({ "device_id": id.to_hex(), "tenant": null, "state": state })).into_response())
}

/// `{"device_id","tenant","state"}`: what claim, migrate and revoke answer.
pub fn claim_summary(c: &Claim) -> serde_json::Value {
    json!({ "device_id": c.device_id.to_hex(), "tenant": c.tenant_id(), "state": c.state })
}

/// A device id from a path; malformed ids are 404 like unknown ones (no oracle for tenants).
pub fn parse_device_id(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse_hex(s).ok_or(ApiError::NotFound)
}
