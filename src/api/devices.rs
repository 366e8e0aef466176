//! `/v1/devices`: what the lobby knows of a device, listings, migrate and revoke.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::claims::{claim_summary, parse_device_id};
use super::error::parse_json;
use super::{ApiError, ApiState, Caller};
use crate::claims::model::{rfc3339, Claim, ClaimState};
use crate::edge::identity::DeviceId;

/// A device as the API shows it (SPEC §6).
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub device_id: String,
    pub thing_name: Option<String>,
    pub tenant: Option<String>,
    pub state: ClaimState,
    pub connected: bool,
    pub protocol: Option<&'static str>,
    pub last_seen: Option<String>,
    pub claimed_at: Option<String>,
    pub redirected_at: Option<String>,
    pub error: Option<String>,
}

fn view(s: &ApiState, id: &DeviceId, claim: Option<&Claim>) -> DeviceView {
    let waiting = s.service.waiting();
    let seen = waiting.seen(id);
    let connected = waiting.connected(id);
    DeviceView {
        device_id: id.to_hex(),
        thing_name: claim
            .and_then(|c| c.thing_name.clone())
            .or_else(|| seen.as_ref().map(|s| s.thing_name.to_string())),
        tenant: claim.and_then(|c| c.tenant_id().map(str::to_owned)),
        state: claim.map_or(ClaimState::Unclaimed, |c| c.state),
        connected: connected.is_some(),
        protocol: connected.or(seen.as_ref().map(|s| s.protocol)),
        last_seen: seen.as_ref().map(|s| rfc3339(s.last_seen)),
        claimed_at: claim.and_then(|c| c.claimed_at).map(rfc3339),
        redirected_at: claim.and_then(|c| c.redirected_at).map(rfc3339),
        error: claim.and_then(|c| c.error.clone()),
    }
}

/// `GET /v1/devices/{device_id}`: a tenant sees only its own devices (others are 404).
pub async fn get_one(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_device_id(&id)?;
    let claim = s.service.cache().claim(&id);
    match caller.tenant() {
        Some(t) if claim.as_ref().and_then(|c| c.tenant_id()) != Some(t) => Err(ApiError::NotFound),
        None if claim.is_none() && s.service.waiting().seen(&id).is_none() => {
            Err(ApiError::NotFound)
        }
        _ => Ok(Json(view(&s, &id, claim.as_deref())).into_response()),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    tenant: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// `GET /v1/devices?state=&tenant=&limit=&after=` → `{"devices":[...],"next"}`, by device id.
pub async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            ClaimState::parse(v)
                .ok_or_else(|| ApiError::InvalidRequest(format!("state: unknown value {v:?}")))?,
        ),
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            DeviceId::parse_hex(a)
                .ok_or_else(|| ApiError::InvalidRequest("after: expected a device_id".into()))?,
        ),
    };
    // A tenant is always scoped to itself; an operator may filter by tenant.
    let tenant = caller.tenant().map(str::to_owned).or(q.tenant);
    let mut rows: Vec<(DeviceId, Option<Arc<Claim>>)> = Vec::new();
    let keep = |id: &DeviceId| after.is_none_or(|a| *id > a);
    s.service.cache().for_each_claim(|c| {
        let state_ok = state.is_none_or(|st| st == c.state);
        let tenant_ok = tenant.as_deref().is_none_or(|t| c.tenant_id() == Some(t));
        if state_ok && tenant_ok && keep(&c.device_id) {
            rows.push((c.device_id, Some(c.clone())));
        }
    });
    let unclaimed_wanted = caller.tenant().is_none()
        && tenant.is_none()
        && state.is_none_or(|st| st == ClaimState::Unclaimed);
    if unclaimed_wanted {
        let cache = s.service.cache();
        s.service.waiting().for_each_seen(|id, _| {
            if keep(id) && cache.claim(id).is_none() {
                rows.push((*id, None));
            }
        });
    }
    rows.sort_unstable_by_key(|r| r.0);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more.then(|| rows.last().map(|r| r.0.to_hex())).flatten();
    let devices: Vec<DeviceView> = rows
        .iter()
        .map(|(id, c)| view(&s, id, c.as_deref()))
        .collect();
    Ok(Json(json!({ "devices": devices, "next": next })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    tenant: String,
}

/// `POST /v1/devices/{device_id}/migrate` (operator): `{"tenant"}`.
pub async fn migrate(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let id = parse_device_id(&id)?;
    let body: MigrateBody = parse_json(&body)?;
    let c = s.service.migrate(&id, &body.tenant).await?;
    Ok(Json(claim_summary(&c)).into_response())
}

/// `POST /v1/devices/{device_id}/revoke` (operator).
pub async fn revoke(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let id = parse_device_id(&id)?;
    let c = s.service.revoke(&id).await?;
    Ok(Json(claim_summary(&c)).into_response())
}
