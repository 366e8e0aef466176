//! What the claims service tells the rest of the lobby after a write. Provisioning listens:
//! it registers claims that are `registering` and removes registrations marked for removal,
//! re-reading the stored state first, so an event is a nudge and never the work itself (a
//! lost one is found by provisioning's own sweeps of the stored queues).

use tokio::sync::mpsc;

use crate::device::DeviceId;

/// A change provisioning acts on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClaimEvent {
    /// The device's claim is `registering`: register it with its tenant.
    Registering(DeviceId),
    /// The device's registration with this tenant was marked for removal.
    Retiring(DeviceId, String),
}

/// The claims service's outlet for [`ClaimEvent`]s. Cheap `Clone`.
#[derive(Debug, Clone)]
pub struct ClaimEvents {
    tx: mpsc::UnboundedSender<ClaimEvent>,
}

impl ClaimEvents {
    /// An outlet and the queue its listener drains. Unbounded on purpose: events are tiny,
    /// deduplicated by the listener and bounded by the number of claims; blocking the claims
    /// service on a full queue would be worse.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<ClaimEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Tells the listener (if it is still there).
    pub fn emit(&self, event: ClaimEvent) {
        let _ = self.tx.send(event);
    }
}
