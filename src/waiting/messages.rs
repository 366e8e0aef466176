//! The messages that cross between the device path and the control plane, both ways through
//! the waiting room's owner: what a session reports ([`Activity`], applied by the claims
//! service) and where devices connect ([`PresenceEvent`], written by a fleet's presence).

use std::sync::Arc;

use crate::device::DeviceId;

/// A device activity reported by the device path, applied to the store in the background.
#[derive(Debug)]
pub enum Activity {
    /// A redirect reached the device.
    Redirected {
        device_id: DeviceId,
        redirect_id: String,
        at: i64,
    },
    /// A device whose registration waits, or whose claim has no thing name yet, connected:
    /// its certificate, from the handshake. `named` is answered once the claim is named (or
    /// needed no name); the session waits for it at connect, so it routes by the claim's name.
    CertSeen {
        device_id: DeviceId,
        cert_der: Vec<u8>,
        named: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

/// A connect or disconnect, as the waiting room reports it.
#[derive(Debug, Clone)]
pub struct PresenceEvent {
    pub device_id: DeviceId,
    pub thing_name: Arc<str>,
    pub protocol: &'static str,
    pub connected: bool,
    /// Unix ms.
    pub at: i64,
    /// The connection's connect stamp (`SessionHandle::stamp`).
    pub stamp: i64,
}
