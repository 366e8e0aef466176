//! Lobby: one MQTT/TLS endpoint for devices not yet bound to a tenant, which sends each device
//! on to its tenant once claimed.
//!
//! # Layout: the data flow
//! The rooms stand on floors, each using only its own floor and those beneath
//! (ARCHITECTURE.md; `scripts/arch-figures.py` checks it). The device path, one connection:
//! 1. [`edge::listener`] accepts (a connection permit first) and spawns the connection task,
//!    which takes a place in the handshake budget ([`edge::handshakes`]);
//! 2. [`edge::tls`] runs the mTLS handshake against the manufacturing CAs (files read by
//!    [`pem`]); [`device`] turns the leaf certificate into the `device_id`;
//! 3. [`session`] reads CONNECT ([`mqtt::codec`]; `session/connect.rs`) and looks the claim
//!    up in [`claims::cache`] (one lock-free read, never the store); it answers with the codes
//!    of [`mqtt::reason`];
//! 4. [`route`] decides, purely: wait, redirect (v5 CONNACK 0x9D / redirect publish), bridge
//!    ([`bridge`]) or refuse;
//! 5. a waiting session registers in [`waiting`], keeps alive and follows its own topics
//!    ([`session::acl`]); what it reports back ([`waiting::Activity`]) is defined there.
//!
//! The control plane:
//! 1. [`api`] (axum) authenticates operator and tenant tokens;
//! 2. [`claims::service`] validates, writes the [`store`] (durable), updates the map, then wakes
//!    the device's session through [`waiting`], which re-reads the map and redirects; in a
//!    fleet, the store's [`store::Fleet`] carries the change feed to the other nodes;
//! 3. [`provision`] registers claims in `registering` with the tenant's backend (AWS IoT:
//!    [`provision::aws_iot`], the only module that knows the SDK) and removes registrations
//!    marked `removing`, nudged by [`claims::events`]; both queues are stored state, so a
//!    restart resumes them.
//!
//! Beneath both: [`model`] (the persisted nouns), [`config`], [`metrics`], [`ratelimit`].
//! Around them: [`server`] (assembly, start, shutdown, [`server::reload`]), [`presence`] (a
//! fleet's connection reports), [`pki`] (dev PKI), [`qr`] (claim-code labels).

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
