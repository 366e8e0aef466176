//! `/v1/claims`: claim a device with its code (one, or a batch), unclaim it.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::parse_json;
use super::{ApiError, ApiState, Caller};
use crate::claims::service::ClaimOutcome;
use crate::device::DeviceId;
use crate::model::{Claim, ClaimState};

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
    let tenant = claiming_tenant(&s, &caller, body.tenant)?;
    let out = s
        .service
        .claim(&tenant, &body.code, body.cert_pem.as_deref())
        .await?;
    Ok((claimed_status(&out), Json(claim_summary(&out.claim))).into_response())
}

/// 201 for a new claim, 200 when this tenant already held the device.
fn claimed_status(out: &ClaimOutcome) -> StatusCode {
    if out.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// The most claims one `POST /v1/claims:batch` may hold (SPEC §12).
pub const BATCH_MAX: usize = 1000;

/// Largest batch body: [`BATCH_MAX`] claims with a certificate each (~1.5 KiB).
pub const BATCH_MAX_BODY: usize = 2 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    claims: Vec<BatchItem>,
    /// Operator only: the tenant to claim for.
    tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    code: String,
    cert_pem: Option<String>,
}

/// `POST /v1/claims:batch` → 200 `{"results":[…]}`, one per claim in request order: what
/// `POST /v1/claims` would answer for it, its status inside (SPEC §12).
pub async fn claim_batch(
    State(s): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: BatchBody = parse_json(&body)?;
    if body.claims.len() > BATCH_MAX {
        return Err(ApiError::InvalidRequest(format!(
            "a batch holds at most {BATCH_MAX} claims, not {}",
            body.claims.len()
        )));
    }
    let tenant = claiming_tenant(&s, &caller, body.tenant)?;
    let items = body.claims.into_iter().map(|c| (c.code, c.cert_pem));
    let results: Vec<_> = s
        .service
        .claim_batch(&tenant, items.collect())
        .await?
        .into_iter()
        .map(|answer| match answer {
            Ok(out) => {
                let mut entry = claim_summary(&out.claim);
                entry["status"] = json!(claimed_status(&out).as_u16());
                entry
            }
            Err(e) => {
                let (status, mut entry) = ApiError::from(e).status_and_body();
                entry["status"] = json!(status.as_u16());
                entry
            }
        })
        .collect();
    Ok(Json(json!({ "results": results })).into_response())
}

/// The tenant a claim is for: a tenant claims for itself, the operator names one that exists.
fn claiming_tenant(
    s: &ApiState,
    caller: &Caller,
    named: Option<String>,
) -> Result<String, ApiError> {
    let tenant = match (caller, named) {
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
    Ok(tenant)
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
