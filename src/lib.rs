//! Lobby: one MQTT/TLS endpoint for devices not yet bound to a tenant, which sends each device
//! on to its tenant once claimed.
//!
//! # Layout: the data flow
//! The device path, one connection:
//! 1. [`edge::listener`] accepts (a connection permit first) and spawns the connection task,
//!    which takes a place in the handshake budget ([`edge::handshakes`]);
//! 2. [`edge::tls`] runs the mTLS handshake against the manufacturing CAs; [`edge::identity`]
//!    turns the leaf certificate into the `device_id`;
//! 3. [`mqtt::session`] reads CONNECT ([`mqtt::codec`]) and looks the claim up in
//!    [`claims::cache`] (one lock-free read, never the store);
//! 4. [`route`] decides, purely: wait, redirect (v5 CONNACK 0x9D / redirect publish), bridge
//!    (later) or refuse;
//! 5. a waiting session registers in [`waiting`], keeps alive and follows its own topics
//!    ([`mqtt::acl`]).
//!
//! The control plane:
//! 1. [`api`] (axum) authenticates operator and tenant tokens;
//! 2. [`claims::service`] validates, writes the [`store`] (durable), updates the map, then wakes
//!    the device's session through [`waiting`], which re-reads the map and redirects;
//! 3. [`provision`] registers claims in `registering` with the tenant's backend (AWS IoT:
//!    [`provision::aws_iot`], the only module that knows the SDK) and removes registrations
//!    marked `removing`; both queues are stored state, so a restart resumes them.
//!
//! Around them: [`config`], [`server`] (assembly, start, shutdown), [`metrics`], [`pki`] (dev
//! PKI), [`qr`] (claim-code labels).

#![forbid(unsafe_code)]

pub mod api;
pub mod bridge;
pub mod claims;
pub mod config;
pub mod device;
pub mod edge;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod pem;
pub mod pki;
pub mod presence;
pub mod provision;
pub mod qr;
pub mod ratelimit;
pub mod route;
pub mod server;
pub mod session;
pub mod store;
pub mod waiting;
