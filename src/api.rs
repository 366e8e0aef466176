//! The HTTP API of SPEC §6 (axum): tenants, claims, devices, health and metrics.
//!
//! Handlers are thin: authenticate, parse, call the claims service, shape the JSON. Bodies are
//! parsed by hand from bytes so malformed JSON is always a 400 `invalid_request`.

mod auth;
mod claims;
mod devices;
mod error;
pub mod serve;
mod tenants;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use auth::Caller;
pub use error::ApiError;

use crate::claims::service::ClaimsService;

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub service: ClaimsService,
    /// SHA-256 of the operator token (compared in constant time).
    pub admin_token_hash: [u8; 32],
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Set once the MQTT listener is bound.
    pub listeners_up: Arc<AtomicBool>,
    /// Fires when the node starts shutting down: from then on `/readyz` is 503.
    pub stopping: tokio_util::sync::CancellationToken,
    /// `cluster.node_name`, shown as a connected device's `node`.
    pub node: Arc<str>,
    /// Hot reload (`POST /v1/admin/reload`) and the API's rate limiter.
    pub reloader: Arc<dyn ReloadHandle>,
    /// The AWS backend: the lobby's own principal, for the tenants' trust policies.
    pub aws: Arc<dyn crate::provision::IotApiFactory>,
}

/// What the API may ask of hot reload (the assembly behind it is the server's).
pub trait ReloadHandle: Send + Sync {
    /// Reads the config file again and applies it, as SIGHUP does: the new trust generation,
    /// or why nothing changed.
    fn reload_file(&self) -> Result<u64, String>;
    /// The API's requests-per-address limiter now (`api.rate_limit`, reloadable).
    fn api_limiter(&self) -> Arc<crate::ratelimit::AddressLimiter>;
}

/// All routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route(
            "/v1/tenants/{id}",
            get(tenants::get_one)
                .patch(tenants::patch)
                .delete(tenants::delete),
        )
        .route(
            "/v1/tenants/{id}/aws-trust-policy",
            get(tenants::aws_trust_policy),
        )
        .route("/v1/claims", post(claims::claim))
        .route(
            "/v1/claims:batch",
            post(claims::claim_batch).layer(DefaultBodyLimit::max(claims::BATCH_MAX_BODY)),
        )
        .route(
            "/v1/claims/{device_id}",
            axum::routing::delete(claims::unclaim),
        )
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{device_id}", get(devices::get_one))
        .route("/v1/devices/{device_id}/migrate", post(devices::migrate))
        .route("/v1/devices/{device_id}/revoke", post(devices::revoke))
        .route("/v1/devices/{device_id}/retry", post(devices::retry))
        .route("/v1/admin/reload", post(reload))
        .route("/console/", get(console))
        .route("/console/jsqr.js", get(console_jsqr))
        .route("/console/console.js", get(console_js))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound.into_response() })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// `api.rate_limit`: `/v1/` requests per client address; health, metrics and the console
/// are not counted (monitoring must keep working while a client is throttled).
async fn rate_limit(
    State(s): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path().starts_with("/v1/") && !s.reloader.api_limiter().allow(peer.ip()) {
        return ApiError::RateLimited.into_response();
    }
    next.run(req).await
}

/// `POST /v1/admin/reload` (operator): what SIGHUP does — read the config file again and
/// apply `[tls]`, `[limits]` and the API rate limit. A file that does not load or validate is
/// a 400 naming the problem, and the running config stays.
async fn reload(State(s): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let generation = s
        .reloader
        .reload_file()
        .map_err(|e| ApiError::InvalidRequest(format!("reload refused: {e}")))?;
    Ok(
        Json(serde_json::json!({ "reloaded": true, "trust_generation": generation }))
            .into_response(),
    )
}

/// Largest request body: tenants and claims are a few hundred bytes (a `cert_pem` ~1 KiB).
const MAX_BODY: usize = 64 * 1024;

/// Every error leaves as SPEC §6 JSON, including the ones axum answers itself before a handler
/// runs (undecodable path or query, body too large, wrong method): one place instead of a
/// custom rejection per extractor.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let body = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&body).trim().to_owned();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    let body = serde_json::json!({ "error": code, "message": message });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n",
        )
            .into_response();
    };
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// The claim console: one static page that talks to this API with the token a person enters
/// (kept in the tab's session storage only). Embedded in the binary, no build step.
async fn console() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("api/console/index.html"),
    )
        .into_response()
}

/// The console's own script (no inline script: the CSP forbids it).
async fn console_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("api/console/console.js"),
    )
        .into_response()
}

/// The content security policy of every answer: scripts and everything else from this origin
/// only (no inline script), camera frames as `blob:`/`data:` images, never framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; media-src 'self' blob:; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// What a console needs of every answer: a CSP without inline script, no MIME sniffing, never
/// framed, no referrer.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    res
}

/// The console's QR decoder for browsers without `BarcodeDetector`: jsQR 1.4.0 (Apache-2.0,
/// `src/api/console/jsQR.LICENSE`), served from the binary (no CDN: factories are offline).
async fn console_jsqr() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("api/console/jsQR.js"),
    )
        .into_response()
}

/// `/readyz`: 200 once the listeners are up and the store answers; 503 before, when the store
/// does not answer, and from the moment a shutdown starts.
async fn readyz(State(state): State<ApiState>) -> Response {
    if !state.listeners_up.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "listeners not up\n").into_response();
    }
    if state.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match state.service.ping_store().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => {
            // Anyone may ask; the store's address and error are the operator's, in the log.
            tracing::warn!(error = %e, "readyz: store unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
    }
}
