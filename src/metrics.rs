//! Prometheus metrics (SPEC §9): the names as constants, one recorder per process, and small
//! helpers so call sites stay one line. Labels never carry a device id.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_ACTIVE: &str = "lobby_connections_active";
pub const CONNECTIONS_TOTAL: &str = "lobby_connections_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "lobby_tls_handshake_failures_total";
pub const TLS_HANDSHAKE_DURATION_SECONDS: &str = "lobby_tls_handshake_duration_seconds";
pub const CONNECT_DURATION_SECONDS: &str = "lobby_connect_duration_seconds";
pub const REDIRECTS_TOTAL: &str = "lobby_redirects_total";
pub const CLAIMS: &str = "lobby_claims";
pub const CLAIM_TO_REDIRECT_SECONDS: &str = "lobby_claim_to_redirect_seconds";
pub const REGISTRATIONS_TOTAL: &str = "lobby_registrations_total";
pub const REGISTRATION_DURATION_SECONDS: &str = "lobby_registration_duration_seconds";
pub const BRIDGE_MESSAGES_TOTAL: &str = "lobby_bridge_messages_total";
pub const BRIDGE_UPSTREAM_CONNECTED: &str = "lobby_bridge_upstream_connected";
pub const STORE_OPERATION_DURATION_SECONDS: &str = "lobby_store_operation_duration_seconds";
/// An extension of SPEC §9: bridge messages dropped, by reason (`upstream_busy` for QoS 0
/// past a full upstream queue, `device_slow` for a device that does not keep up).
pub const BRIDGE_DROPPED_TOTAL: &str = "lobby_bridge_dropped_total";
/// An extension of SPEC §9: device publishes given up on because the tenant's broker closed
/// the connection each time one was sent (`limits.bridge_max_redeliveries`), by tenant.
pub const BRIDGE_POISON_TOTAL: &str = "lobby_bridge_poison_total";
/// An extension of SPEC §9: 1 while this node listens to the shared store's change log.
pub const CLUSTER_WATCH_CONNECTED: &str = "lobby_cluster_watch_connected";
/// An extension of SPEC §9: other nodes' changes applied to this node's map.
pub const CLUSTER_CHANGES_APPLIED_TOTAL: &str = "lobby_cluster_changes_applied_total";
/// An extension of SPEC §9: presence events (connects, disconnects) dropped because the
/// presence writer's queue was full.
pub const CLUSTER_PRESENCE_DROPPED_TOTAL: &str = "lobby_cluster_presence_dropped_total";
/// An extension of SPEC §9: completed device handshakes by kind (`full`, `resumed`).
pub const TLS_HANDSHAKES_TOTAL: &str = "lobby_tls_handshakes_total";
/// `lobby_build_info{version}`: always 1; the label says which build answers.
pub const BUILD_INFO: &str = "lobby_build_info";

/// Every `outcome` of `lobby_connections_total` (`session::End::label`, checked there).
pub const CONNECTION_OUTCOMES: &[&str] = &[
    "closed",
    "redirected",
    "taken_over",
    "revoked",
    "keepalive_timeout",
    "connect_timeout",
    "protocol_error",
    "forbidden",
    "shutdown",
    "quota_exceeded",
    "server_busy",
    "bridge_rejected",
    "rate_limited",
    "idle_timeout",
    "io_error",
];
/// Every `reason` of `lobby_tls_handshake_failures_total`.
pub const HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "revoked",
    "expired",
    "bad_certificate",
    "no_certificate",
    "protocol",
    "timeout",
    "proxy_protocol",
    "rate_limited",
    "busy",
];
/// The `protocol` label of `lobby_connections_active`.
pub const PROTOCOLS: &[&str] = &["mqtt3.1.1", "mqtt5"];
/// Every `kind` of `lobby_redirects_total`.
pub const REDIRECT_KINDS: &[&str] = &["connack", "disconnect", "publish"];
/// Every `state` of `lobby_claims` (`model::ClaimState::as_str`).
pub const CLAIM_STATES: &[&str] = &["unclaimed", "registering", "ready", "failed", "revoked"];
/// Every `outcome` of `lobby_registrations_total`.
pub const REGISTRATION_OUTCOMES: &[&str] = &["ready", "failed"];

/// Buckets for sub-second operations (handshakes, store writes, redirects), in seconds.
const FAST_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once (later calls, e.g. several lobbies in one test
/// process, share it) and returns the handle that renders `/metrics`.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), FAST_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            zero_series();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Device connections open now, by protocol."
    );
    describe_counter!(CONNECTIONS_TOTAL, "Device connections by outcome.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "Failed TLS handshakes by reason."
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "Completed device TLS handshakes by kind (full, resumed)."
    );
    describe_histogram!(
        TLS_HANDSHAKE_DURATION_SECONDS,
        Unit::Seconds,
        "TLS handshakes."
    );
    describe_histogram!(
        CONNECT_DURATION_SECONDS,
        Unit::Seconds,
        "TLS done to CONNACK sent."
    );
    describe_counter!(REDIRECTS_TOTAL, "Redirects sent by kind.");
    describe_counter!(
        BRIDGE_POISON_TOTAL,
        "Bridged publishes given up on: the tenant closed the connection on each re-send."
    );
    describe_gauge!(
        CLAIMS,
        "Claims by state in this node's map. Every node of a fleet holds every claim, so this is \
         the fleet's count on each node: aggregate with max, not sum."
    );
    describe_gauge!(BUILD_INFO, "Always 1; `version` is the running build.");
    describe_counter!(
        REGISTRATIONS_TOTAL,
        "Device registrations with a tenant's backend, by outcome."
    );
    describe_histogram!(
        REGISTRATION_DURATION_SECONDS,
        Unit::Seconds,
        "One registration, first step to ready or failed."
    );
    describe_histogram!(
        CLAIM_TO_REDIRECT_SECONDS,
        Unit::Seconds,
        "Claim ready to redirect sent."
    );
    describe_histogram!(
        STORE_OPERATION_DURATION_SECONDS,
        Unit::Seconds,
        "Store calls by op."
    );
}

/// Registers every SPEC §9 series whose label values are known, at zero, so a dashboard shows
/// 0 (not "no data") and `rate()` works from the first scrape. Series labelled by tenant
/// (bridge) or by store operation appear with their first value.
fn zero_series() {
    use metrics::{counter, gauge, histogram};
    for &outcome in CONNECTION_OUTCOMES {
        counter!(CONNECTIONS_TOTAL, "outcome" => outcome).absolute(0);
    }
    for &reason in HANDSHAKE_FAILURE_REASONS {
        counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).absolute(0);
    }
    for kind in ["full", "resumed"] {
        counter!(TLS_HANDSHAKES_TOTAL, "kind" => kind).absolute(0);
    }
    for &protocol in PROTOCOLS {
        gauge!(CONNECTIONS_ACTIVE, "protocol" => protocol).increment(0.0);
    }
    for &kind in REDIRECT_KINDS {
        counter!(REDIRECTS_TOTAL, "kind" => kind).absolute(0);
    }
    for &state in CLAIM_STATES {
        gauge!(CLAIMS, "state" => state).increment(0.0);
    }
    for &outcome in REGISTRATION_OUTCOMES {
        counter!(REGISTRATIONS_TOTAL, "backend" => "aws-iot", "outcome" => outcome).absolute(0);
    }
    let _ = histogram!(TLS_HANDSHAKE_DURATION_SECONDS);
    let _ = histogram!(CONNECT_DURATION_SECONDS);
    let _ = histogram!(CLAIM_TO_REDIRECT_SECONDS);
    let _ = histogram!(REGISTRATION_DURATION_SECONDS, "backend" => "aws-iot");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Times one store operation.
pub fn store_operation(op: &'static str, took: Duration) {
    metrics::histogram!(STORE_OPERATION_DURATION_SECONDS, "op" => op).record(took.as_secs_f64());
}

/// Counts a finished device connection.
pub fn connection_outcome(outcome: &'static str) {
    metrics::counter!(CONNECTIONS_TOTAL, "outcome" => outcome).increment(1);
}

/// Counts a failed handshake. Reasons besides the TLS ones: `timeout`, `proxy_protocol`,
/// `rate_limited`, `revoked`, `expired`, `no_certificate`, and `busy` (closed as the oldest
/// handshake in progress when `limits.max_handshakes` were taken).
pub fn handshake_failure(reason: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).increment(1);
}

/// Whether the change-log watch is connected.
pub fn cluster_watch_connected(up: bool) {
    metrics::gauge!(CLUSTER_WATCH_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// Counts a completed device handshake of `kind` (`full`, `resumed`).
pub fn handshake(kind: &'static str) {
    metrics::counter!(TLS_HANDSHAKES_TOTAL, "kind" => kind).increment(1);
}

/// Counts a redirect of `kind` (`connack`, `disconnect`, `publish`).
pub fn redirect(kind: &'static str) {
    metrics::counter!(REDIRECTS_TOTAL, "kind" => kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_claim_state_is_zeroed_at_start() {
        use crate::model::ClaimState::*;
        for s in [Unclaimed, Registering, Ready, Failed, Revoked] {
            assert!(CLAIM_STATES.contains(&s.as_str()), "{}", s.as_str());
        }
    }
}
