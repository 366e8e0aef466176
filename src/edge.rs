//! The device edge: TCP listener → TLS handshake (identity) → MQTT session.
//!
//! `EdgeContext` is everything the device path needs, shared by all connections; it holds no
//! store handle on purpose: the connect path reads only the claims map.

pub mod handshakes;
pub mod listener;
pub mod proxy;
pub mod record;
pub mod tls;
pub mod ws;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::claims::cache::ClaimsCache;
use crate::config::LimitsConfig;
use crate::waiting::Activity;
use crate::waiting::WaitingRoom;

/// Shared state of the device path.
#[derive(Debug)]
pub struct EdgeContext {
    pub cache: ClaimsCache,
    pub waiting: WaitingRoom,
    /// Redirects delivered, for the control plane to record (bounded; full means dropped,
    /// which loses only a `redirected_at` timestamp, never a redirect).
    pub activity: mpsc::Sender<Activity>,
    /// `[limits]` now; a connection keeps the limits it started with (reload: new ones).
    pub limits: arc_swap::ArcSwap<LimitsConfig>,
    /// Connection permits (`limits.max_connections`), taken before accept.
    pub permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// New connections per source address (`limits.connect_rate_per_address`).
    pub connect_limiter: arc_swap::ArcSwap<crate::ratelimit::AddressLimiter>,
    /// `shutdown.server_reference`, when set.
    pub shutdown_server_reference: Option<String>,
    pub compat_aws_device_lobby: bool,
    /// Cancelled when the lobby starts to stop: the listener accepts no more devices (the
    /// live ones are drained, then `cancel` ends the rest).
    pub stopping: CancellationToken,
    /// Cancelled when the lobby shuts down.
    pub cancel: CancellationToken,
    /// The bridge-mode tenants' upstream pools.
    pub bridge: crate::bridge::BridgeHub,
    /// What the edge trusts now; replaced on reload (SIGHUP).
    pub trust: arc_swap::ArcSwap<tls::Trust>,
}
