//! The waiting room: device_id → the live session holding that device, plus what the lobby has
//! seen of devices that connected (for the operator's device list).
//!
//! The control plane wakes a session with [`WaitingRoom::wake`] after it changed that device's
//! claim; the session then re-reads the claims map and acts (status, redirect, revoke). Wake-ups
//! coalesce (a `Notify` permit), so a burst of changes costs one re-read and nothing blocks.
//! A newer connection of the same device replaces the handle and wakes the old session, which
//! finds it is no longer registered and closes (takeover). In a fleet the newer connection may
//! be on another node: each connect carries a stamp from a hybrid logical clock (wall-clock µs,
//! never behind any stamp this node has made or heard of), other nodes announce theirs
//! (`presence`), and [`WaitingRoom::taken_over_elsewhere`] closes a session older than the
//! announced one. Every node orders connects of a device the same way, by (stamp, node), so
//! exactly the newest one stays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

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
    /// When it connected, on the fleet's hybrid logical clock (µs; see the module doc).
    pub stamp: i64,
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
    /// The newest connect stamp made or heard of. Held while a stamp is made and its handle
    /// inserted, and while another node's stamp is compared with the live handle, so a
    /// connect racing an announcement is either seen by it or stamped after it.
    clock: Mutex<i64>,
    /// In a fleet: where connects and disconnects are reported (`presence`).
    presence: OnceLock<mpsc::Sender<presence::Event>>,
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
    pub fn report_presence(&self, tx: mpsc::Sender<presence::Event>) {
        let _ = self.inner.presence.set(tx);
    }

    /// Never waits: the presence writer drains its queue while it writes, so a full queue
    /// means that task is starved; the event is then dropped and counted (the store keeps
    /// this device's previous presence until its next connect or disconnect, and another
    /// node's older connection of it is not told to close).
    fn report(&self, id: DeviceId, connected: bool, stamp: i64) {
        let Some(tx) = self.inner.presence.get() else {
            return;
        };
        if let Some(s) = self.inner.seen.pin().get(&id) {
            let event = presence::Event {
                device_id: id,
                thing_name: s.thing_name.clone(),
                protocol: s.protocol,
                connected,
                at: s.last_seen,
                stamp,
            };
            if tx.try_send(event).is_err() {
                presence::dropped();
            }
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
        let mut clock = self.clock();
        let stamp = (*clock + 1).max(now_us());
        *clock = stamp;
        let handle = SessionHandle {
            conn_id: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            wake: Arc::new(Notify::new()),
            protocol,
            stamp,
        };
        let old = self.inner.live.pin().insert(id, handle.clone()).cloned();
        drop(clock);
        if let Some(old) = old {
            old.wake.notify_one();
        }
        self.touch(id, thing_name, protocol, burst);
        self.report(id, true, stamp);
        handle
    }

    /// Another node announced a connect of `id` at `stamp`; `wins_tie`: that node goes first
    /// at an equal stamp. A live session here that is older loses its handle and is woken,
    /// so it closes as taken over (v5 DISCONNECT 0x8E); a newer one stays (that node closes
    /// its own when it hears of this one). True when a session here was taken over.
    pub fn taken_over_elsewhere(&self, id: &DeviceId, stamp: i64, wins_tie: bool) -> bool {
        let mut clock = self.clock();
        *clock = (*clock).max(stamp);
        let older =
            |_: &DeviceId, h: &SessionHandle| h.stamp < stamp || (h.stamp == stamp && wins_tie);
        let removed = self
            .inner
            .live
            .pin()
            .remove_if(id, older)
            .ok()
            .flatten()
            .map(|(_, h)| h.clone());
        drop(clock);
        // Its session ends without a disconnect report: the device is connected elsewhere.
        removed.map(|old| old.wake.notify_one()).is_some()
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, i64> {
        self.inner
            .clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
            .map(|(_, h)| h.stamp);
        if let Some(stamp) = removed {
            if let Some(seen) = self.inner.seen.pin().get(id) {
                let mut s = seen.clone();
                s.last_seen = now_ms();
                self.inner.seen.pin().insert(*id, s);
            }
            self.report(*id, false, stamp);
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

/// Now, in µs since the Unix epoch.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
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

    #[tokio::test]
    async fn only_an_older_session_is_taken_over_from_elsewhere() {
        let room = WaitingRoom::default();
        let id = DeviceId([4; 32]);
        let here = room.register(id, "d", "mqtt5", 5);
        // Announced before this connect: this one is newer and stays.
        assert!(!room.taken_over_elsewhere(&id, here.stamp - 1, true));
        // An equal stamp: the tie-break decides, the same way on both nodes.
        assert!(!room.taken_over_elsewhere(&id, here.stamp, false));
        assert!(room.is_current(&id, here.conn_id));
        assert!(room.taken_over_elsewhere(&id, here.stamp, true));
        here.wake.notified().await;
        assert!(!room.is_current(&id, here.conn_id));
        assert_eq!(room.connected(&id), None);
        // A connect after hearing of a far-ahead stamp is stamped after it (it is newer).
        let far = now_us() + 60_000_000;
        assert!(!room.taken_over_elsewhere(&id, far, true));
        let later = room.register(id, "d", "mqtt5", 5);
        assert!(later.stamp > far);
        assert!(!room.taken_over_elsewhere(&id, far, true));
        assert!(room.is_current(&id, later.conn_id));
    }
}
