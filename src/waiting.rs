//! The waiting room: device_id → the live session holding that device, plus what the lobby has
//! seen of devices that connected (for the operator's device list).
//!
//! The control plane wakes a session with [`WaitingRoom::wake`] after it changed that device's
//! claim; the session then re-reads the claims map and acts (status, redirect, revoke). Wake-ups
//! coalesce (a `Notify` permit), so a burst of changes costs one re-read and nothing blocks.
//! A newer connection of the same device replaces the handle and wakes the old session, which
//! finds it is no longer registered and closes (takeover).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, Notify};

use crate::claims::cache::IdHashBuilder;
use crate::claims::model::now_ms;
use crate::edge::identity::DeviceId;
use crate::presence;

/// The live session of a device.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    /// Distinguishes successive connections of one device.
    pub conn_id: u64,
    pub wake: Arc<Notify>,
    /// `"mqtt3.1.1"` or `"mqtt5"`.
    pub protocol: &'static str,
}

/// What was last seen of a device that connected.
#[derive(Clone, Debug)]
pub struct Seen {
    pub thing_name: Arc<str>,
    pub protocol: &'static str,
    /// Unix ms of the last connect or disconnect.
    pub last_seen: i64,
    /// Reconnect budget (a token bucket): tokens left at `tokens_at` (Unix ms).
    connect_tokens: f32,
    tokens_at: i64,
}

/// Cheap `Clone` handle.
#[derive(Clone, Default)]
pub struct WaitingRoom {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    live: papaya::HashMap<DeviceId, SessionHandle, IdHashBuilder>,
    seen: papaya::HashMap<DeviceId, Seen, IdHashBuilder>,
    next_conn: AtomicU64,
    /// In a fleet: where connects and disconnects are reported (`presence`).
    presence: OnceLock<mpsc::UnboundedSender<presence::Event>>,
}

impl std::fmt::Debug for WaitingRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingRoom")
            .field("live", &self.inner.live.len())
            .finish()
    }
}

impl WaitingRoom {
    /// Reports every later connect and disconnect to `tx` (a fleet's presence). Once.
    pub fn report_presence(&self, tx: mpsc::UnboundedSender<presence::Event>) {
        let _ = self.inner.presence.set(tx);
    }

    fn report(&self, id: DeviceId, connected: bool) {
        let Some(tx) = self.inner.presence.get() else {
            return;
        };
        if let Some(s) = self.inner.seen.pin().get(&id) {
            let _ = tx.send(presence::Event {
                device_id: id,
                thing_name: s.thing_name.clone(),
                protocol: s.protocol,
                connected,
                at: s.last_seen,
            });
        }
    }

    /// Registers a new session for `id`, taking over from any older one (which is woken).
    pub fn register(
        &self,
        id: DeviceId,
        thing_name: &str,
        protocol: &'static str,
        burst: u32,
    ) -> SessionHandle {
        let handle = SessionHandle {
            conn_id: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            wake: Arc::new(Notify::new()),
            protocol,
        };
        let live = self.inner.live.pin();
        if let Some(old) = live.insert(id, handle.clone()) {
            old.wake.notify_one();
        }
        self.touch(id, thing_name, protocol, burst);
        self.report(id, true);
        handle
    }

    /// May this device connect again now? A token bucket per device: `burst` connects at once,
    /// then one per `interval` (AWS IoT allows one per second per client id). A device seen for
    /// the first time always may. Spends a token when it answers yes.
    pub fn admit(&self, id: &DeviceId, burst: u32, interval: std::time::Duration) -> bool {
        let seen = self.inner.seen.pin();
        let Some(s) = seen.get(id) else {
            return true;
        };
        let now = now_ms();
        let per_ms = 1.0 / (interval.as_millis().max(1) as f64);
        let refill = (now - s.tokens_at).max(0) as f64 * per_ms;
        let tokens = (f64::from(s.connect_tokens) + refill).min(f64::from(burst));
        if tokens < 1.0 {
            return false;
        }
        let mut spent = s.clone();
        spent.connect_tokens = (tokens - 1.0) as f32;
        spent.tokens_at = now;
        seen.insert(*id, spent);
        true
    }

    /// Removes the session `conn_id` of `id` if it is still the registered one.
    pub fn deregister(&self, id: &DeviceId, conn_id: u64) {
        let removed = self
            .inner
            .live
            .pin()
            .remove_if(id, |_, h| h.conn_id == conn_id)
            .ok()
            .flatten()
            .is_some();
        if removed {
            if let Some(seen) = self.inner.seen.pin().get(id) {
                let mut s = seen.clone();
                s.last_seen = now_ms();
                self.inner.seen.pin().insert(*id, s);
            }
            self.report(*id, false);
        }
    }

    /// True while `conn_id` is the registered session of `id`.
    pub fn is_current(&self, id: &DeviceId, conn_id: u64) -> bool {
        self.inner
            .live
            .pin()
            .get(id)
            .is_some_and(|h| h.conn_id == conn_id)
    }

    /// Wakes the device's session, if connected, to re-read its claim.
    pub fn wake(&self, id: &DeviceId) {
        if let Some(h) = self.inner.live.pin().get(id) {
            h.wake.notify_one();
        }
    }

    /// Wakes every connected session (tenant changes, trust reloads).
    pub fn wake_all(&self) {
        for (_, h) in self.inner.live.pin().iter() {
            h.wake.notify_one();
        }
    }

    /// The protocol of the device's live session, if connected.
    pub fn connected(&self, id: &DeviceId) -> Option<&'static str> {
        self.inner.live.pin().get(id).map(|h| h.protocol)
    }

    /// Connected sessions now.
    pub fn live_count(&self) -> usize {
        self.inner.live.len()
    }

    /// What was last seen of a device.
    pub fn seen(&self, id: &DeviceId) -> Option<Seen> {
        self.inner.seen.pin().get(id).cloned()
    }

    /// Calls `f` for every device ever seen by this process.
    pub fn for_each_seen(&self, mut f: impl FnMut(&DeviceId, &Seen)) {
        for (id, s) in self.inner.seen.pin().iter() {
            f(id, s);
        }
    }

    fn touch(&self, id: DeviceId, thing_name: &str, protocol: &'static str, burst: u32) {
        let seen = self.inner.seen.pin();
        let now = now_ms();
        let previous = seen.get(&id);
        let thing_name = match previous {
            Some(s) if &*s.thing_name == thing_name => s.thing_name.clone(),
            _ => Arc::from(thing_name),
        };
        // A device seen for the first time starts with a full bucket, this connect spent.
        let (connect_tokens, tokens_at) = previous
            .map_or((burst.saturating_sub(1) as f32, now), |s| {
                (s.connect_tokens, s.tokens_at)
            });
        seen.insert(
            id,
            Seen {
                thing_name,
                protocol,
                last_seen: now,
                connect_tokens,
                tokens_at,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takeover_wakes_the_older_session() {
        let room = WaitingRoom::default();
        let id = DeviceId([3; 32]);
        let first = room.register(id, "d", "mqtt5", 5);
        let second = room.register(id, "d", "mqtt5", 5);
        first.wake.notified().await; // would hang without the takeover wake
        assert!(!room.is_current(&id, first.conn_id));
        assert!(room.is_current(&id, second.conn_id));
        room.deregister(&id, first.conn_id); // stale: must not remove the newer one
        assert_eq!(room.connected(&id), Some("mqtt5"));
        room.deregister(&id, second.conn_id);
        assert_eq!(room.connected(&id), None);
        assert!(room.seen(&id).is_some());
    }
}
