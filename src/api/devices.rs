//! `/v1/devices`: what the lobby knows of a device, listings, migrate and revoke.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::claims::{claim_summary, parse_device_id};
use super::error::parse_json;
use super::{ApiError, ApiState, Caller};
use crate::claims::error::ServiceError;
use crate::device::DeviceId;
use crate::model::{rfc3339, Claim, ClaimState};
use crate::store::Presence;

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
    /// Registration attempts so far (SPEC §12).
    pub attempts: u32,
    /// When a registration that failed for a retryable reason is tried again (SPEC §12).
    pub next_attempt_at: Option<String>,
    /// The node (`cluster.node_name`) holding the device's connection, when connected (an
    /// extension of SPEC §6: in a fleet, from what every node reports to the store).
    pub node: Option<String>,
}

/// The protocol names sessions report, as static strings.
fn protocol_name(p: &str) -> Option<&'static str> {
    ["mqtt3.1.1", "mqtt5"].into_iter().find(|known| *known == p)
}

/// `remote`: what the fleet's store says of the device (other nodes' connections).
fn view(
    s: &ApiState,
    id: &DeviceId,
    claim: Option<&Claim>,
    remote: Option<&Presence>,
) -> DeviceView {
    let waiting = s.service.waiting();
    let seen = waiting.seen(id);
    let local = waiting.connected(id);
    let remote_live = remote.filter(|p| p.connected && local.is_none());
    let last_seen = match (
        seen.as_ref().map(|s| s.last_seen),
        remote.map(|p| p.last_seen),
    ) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    DeviceView {
        device_id: id.to_hex(),
        thing_name: claim
            .and_then(|c| c.thing_name.clone())
            .or_else(|| seen.as_ref().map(|s| s.thing_name.to_string()))
            .or_else(|| remote.map(|p| p.thing_name.clone())),
        tenant: claim.and_then(|c| c.tenant_id().map(str::to_owned)),
        state: claim.map_or(ClaimState::Unclaimed, |c| c.state),
        connected: local.is_some() || remote_live.is_some(),
        protocol: local
            .or_else(|| remote_live.and_then(|p| protocol_name(&p.protocol)))
            .or(seen.as_ref().map(|s| s.protocol))
            .or_else(|| remote.and_then(|p| protocol_name(&p.protocol))),
        last_seen: last_seen.map(rfc3339),
        claimed_at: claim.and_then(|c| c.claimed_at).map(rfc3339),
        redirected_at: claim.and_then(|c| c.redirected_at).map(rfc3339),
        error: claim.and_then(|c| c.error.clone()),
        attempts: claim.map_or(0, |c| c.attempts),
        next_attempt_at: claim.and_then(|c| c.next_attempt_at).map(rfc3339),
        node: match (local, remote_live) {
            (Some(_), _) => Some(s.node.to_string()),
            (None, Some(p)) => Some(p.node.clone()),
            (None, None) => None,
        },
    }
}

/// What the fleet's store says of `id` (nothing when this node is alone on its store).
async fn presence_of(s: &ApiState, id: &DeviceId) -> Result<Option<Presence>, ApiError> {
    let Some(fleet) = s.service.store().fleet() else {
        return Ok(None);
    };
    let found = fleet.presence(Some(id)).await.map_err(ServiceError::from)?;
    Ok(found.into_iter().next())
}

/// `GET /v1/devices/{device_id}`: a tenant sees only its own devices (others are 404).
pub async fn get_one(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_device_id(&id)?;
    let held = s.service.cache().claim(&id);
    let owned_by = |t: Option<&str>| caller.tenant().is_none_or(|c| t == Some(c));
    if !owned_by(held.as_ref().and_then(|c| c.tenant_id())) {
        return Err(ApiError::NotFound);
    }
    // The map holds a claim's view only: the rest is the store's.
    let claim = match held {
        Some(_) => s
            .service
            .store()
            .claim(&id)
            .await
            .map_err(ServiceError::from)?,
        None => None,
    };
    if !owned_by(claim.as_ref().and_then(|c| c.tenant_id())) {
        return Err(ApiError::NotFound);
    }
    let remote = presence_of(&s, &id).await?;
    if claim.is_none() && s.service.waiting().seen(&id).is_none() && remote.is_none() {
        return Err(ApiError::NotFound);
    }
    Ok(Json(view(&s, &id, claim.as_ref(), remote.as_ref())).into_response())
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
    // One page costs a pass over this node's map and waiting room (in memory, keeping only
    // the page's worth) and, in a fleet, two store reads of about a page each.
    let mut page = Page::new(after, limit + 1);
    s.service.cache().for_each_claim(|id, st, t| {
        let state_ok = state.is_none_or(|want| want == st);
        let tenant_ok = tenant.as_deref().is_none_or(|want| t == Some(want));
        if state_ok && tenant_ok {
            page.offer(*id, true);
        }
    });
    let unclaimed_wanted = caller.tenant().is_none()
        && tenant.is_none()
        && state.is_none_or(|st| st == ClaimState::Unclaimed);
    let fleet = s.service.store().fleet();
    if unclaimed_wanted {
        let (cache, waiting) = (s.service.cache(), s.service.waiting());
        waiting.for_each_seen(|id, _| {
            if !cache.contains(id) {
                page.offer(*id, false);
            }
        });
        // Devices waiting on (or last seen by) other nodes of the fleet.
        if let Some(fleet) = fleet {
            let remote = fleet
                .unclaimed_presence(after.as_ref(), limit + 1)
                .await
                .map_err(ServiceError::from)?;
            for p in remote {
                let id = p.device_id;
                if !cache.contains(&id) && waiting.seen(&id).is_none() {
                    page.offer(id, false);
                }
            }
        }
    }
    let mut rows = page.into_sorted();
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more.then(|| rows.last().map(|r| r.0.to_hex())).flatten();
    let remote: HashMap<DeviceId, Presence> = if let Some(fleet) = fleet {
        let ids: Vec<DeviceId> = rows.iter().map(|r| r.0).collect();
        let found = fleet.presence_of(&ids).await.map_err(ServiceError::from)?;
        found.into_iter().map(|p| (p.device_id, p)).collect()
    } else {
        HashMap::new()
    };
    // The page's claims, whole, from the store (the map holds views only).
    let claimed: Vec<DeviceId> = rows.iter().filter(|r| r.1).map(|r| r.0).collect();
    let claims: HashMap<DeviceId, Claim> = s
        .service
        .store()
        .claims_of(&claimed)
        .await
        .map_err(ServiceError::from)?
        .into_iter()
        .map(|c| (c.device_id, c))
        .collect();
    let devices: Vec<DeviceView> = rows
        .iter()
        .map(|Row(id, _)| view(&s, id, claims.get(id), remote.get(id)))
        .collect();
    Ok(Json(json!({ "devices": devices, "next": next })).into_response())
}

/// A device-list row: the device and whether the map holds a claim of it, ordered by device
/// id alone.
struct Row(DeviceId, bool);

impl PartialEq for Row {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Row {}
impl PartialOrd for Row {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Row {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// The `size` smallest device ids after `after` of all offered (each offered once): a
/// max-heap, so a pass over a million claims holds a page, not a million rows.
struct Page {
    after: Option<DeviceId>,
    size: usize,
    heap: std::collections::BinaryHeap<Row>,
}

impl Page {
    fn new(after: Option<DeviceId>, size: usize) -> Self {
        Self {
            after,
            size,
            heap: std::collections::BinaryHeap::with_capacity(size + 1),
        }
    }

    fn offer(&mut self, id: DeviceId, claim: bool) {
        if self.after.is_some_and(|a| id <= a) {
            return;
        }
        if self.heap.len() < self.size {
            self.heap.push(Row(id, claim));
        } else if self.heap.peek().is_some_and(|top| id < top.0) {
            self.heap.pop();
            self.heap.push(Row(id, claim));
        }
    }

    fn into_sorted(self) -> Vec<Row> {
        self.heap.into_sorted_vec()
    }
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

/// `POST /v1/devices/{device_id}/retry` (the owner, operator): a `failed` registration queued
/// again → 202 `{"device_id","tenant","state":"registering"}`; any other state 409 `conflict`.
pub async fn retry(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_device_id(&id)?;
    let c = s.service.retry(&id, caller.tenant()).await?;
    Ok((StatusCode::ACCEPTED, Json(claim_summary(&c))).into_response())
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
