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
//!
//! What was seen is bounded: an entry of a device that is not connected is forgotten
//! [`SEEN_RETENTION`] after it was last seen, and past [`SEEN_MAX`] entries the oldest such
//! go first (a live device is never forgotten). Sweeps run off the connect path, at most
//! once per [`SEEN_SWEEP_EVERY`] or when the map has grown past the cap.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use tokio::sync::{mpsc, Notify};

mod messages;
pub use messages::{Activity, PresenceEvent};

use crate::device::DeviceId;
use crate::device::IdHashBuilder;
use crate::model::now_ms;

/// How long the lobby remembers a device that left (its `last_seen`, thing name and protocol
/// in the device list): 30 days.
pub const SEEN_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;
/// The same, as a duration (for the docs).
pub const SEEN_RETENTION: std::time::Duration =
    std::time::Duration::from_millis(SEEN_RETENTION_MS as u64);
/// Devices remembered at most, live ones aside (about 150 bytes each: some 150 MB at worst,
/// which takes a million distinct certified devices).
pub const SEEN_MAX: usize = 1_000_000;
/// Sweeps for entries past `SEEN_RETENTION` run at most this often.
pub const SEEN_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

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
    /// Set when the node drains: on its next wake-up the session says goodbye and ends.
    pub leave: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Whether the node asked this session to leave (a drain).
    pub fn asked_to_leave(&self) -> bool {
        self.leave.load(Ordering::Acquire)
    }
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
    presence: OnceLock<mpsc::Sender<PresenceEvent>>,
    /// When `seen` is swept next.
    seen_sweep: SeenSweep,
}

/// When the next sweep of `seen` is due; 0 fields mean "not yet set".
#[derive(Default)]
struct SeenSweep {
    /// Unix ms of the next sweep for age.
    next_at: AtomicI64,
    /// The size that calls a sweep for the cap (0: the cap).
    at_len: AtomicUsize,
    /// The cap (0: `SEEN_MAX`; tests set a small one).
    cap: AtomicUsize,
    running: AtomicBool,
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
    pub fn report_presence(&self, tx: mpsc::Sender<PresenceEvent>) {
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
            let event = PresenceEvent {
                device_id: id,
                thing_name: s.thing_name.clone(),
                protocol: s.protocol,
                connected,
                at: s.last_seen,
                stamp,
            };
            if tx.try_send(event).is_err() {
                ::metrics::counter!(crate::metrics::CLUSTER_PRESENCE_DROPPED_TOTAL).increment(1);
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
            leave: Arc::new(AtomicBool::new(false)),
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

    fn clock(&self) -> MutexGuard<'_, i64> {
        self.inner.clock.lock()
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

    /// Asks every session connected now to leave, spread evenly over `over` (one after
    /// another, not all at once, so the nodes that take the devices see a ramp); returns when
    /// the last one was asked. Sessions that connect meanwhile are not asked (the listener has
    /// stopped accepting before a drain).
    pub async fn drain(&self, over: Duration) -> usize {
        let handles: Vec<SessionHandle> = self
            .inner
            .live
            .pin()
            .iter()
            .map(|(_, h)| h.clone())
            .collect();
        let (start, n) = (tokio::time::Instant::now(), handles.len());
        for (i, h) in handles.into_iter().enumerate() {
            let at = start + over.mul_f64(i as f64 / n as f64);
            tokio::time::sleep_until(at).await;
            h.leave.store(true, Ordering::Release);
            h.wake.notify_one();
        }
        n
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
        drop(seen);
        self.maybe_sweep_seen(now);
    }

    /// Starts a sweep of `seen` when one is due: in a blocking task when in a runtime, so the
    /// connect that noticed does not pay for it.
    fn maybe_sweep_seen(&self, now: i64) {
        let sweep = &self.inner.seen_sweep;
        let cap = match sweep.cap.load(Ordering::Relaxed) {
            0 => SEEN_MAX,
            n => n,
        };
        let at_len = match sweep.at_len.load(Ordering::Relaxed) {
            0 => cap,
            n => n,
        };
        let next_at = sweep.next_at.load(Ordering::Relaxed);
        if next_at == 0 {
            let first = now + SEEN_SWEEP_EVERY.as_millis() as i64;
            let _ = sweep
                .next_at
                .compare_exchange(0, first, Ordering::Relaxed, Ordering::Relaxed);
        }
        let due = (next_at != 0 && now >= next_at) || self.inner.seen.len() > at_len;
        if !due || sweep.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let room = self.clone();
        let run = move || {
            room.sweep_seen(now, SEEN_RETENTION_MS, cap);
            room.inner
                .seen_sweep
                .running
                .store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Forgets devices not connected now that were last seen before `now - retention_ms`,
    /// then, above `max` entries, the longest gone of the rest down to 7/8 of `max`.
    /// Returns how many were forgotten.
    pub fn sweep_seen(&self, now: i64, retention_ms: i64, max: usize) -> usize {
        let live = self.inner.live.pin();
        let seen = self.inner.seen.pin();
        let before = seen.len();
        let cutoff = now - retention_ms;
        seen.retain(|id, s| s.last_seen >= cutoff || live.contains_key(id));
        if seen.len() > max {
            let mut gone: Vec<(i64, DeviceId)> = seen
                .iter()
                .filter(|(id, _)| !live.contains_key(*id))
                .map(|(id, s)| (s.last_seen, *id))
                .collect();
            let excess = (seen.len() - max * 7 / 8).min(gone.len());
            if excess > 0 && excess < gone.len() {
                gone.select_nth_unstable(excess);
            }
            for (_, id) in gone.iter().take(excess) {
                seen.remove(id);
            }
        }
        let after = seen.len();
        let sweep = &self.inner.seen_sweep;
        // Live devices above the cap are kept: the next cap sweep waits for max/8 more.
        sweep
            .at_len
            .store(max.max(after + max / 8), Ordering::Relaxed);
        sweep
            .next_at
            .store(now + SEEN_SWEEP_EVERY.as_millis() as i64, Ordering::Relaxed);
        before - after
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

    /// A device seen `age_ms` ago, not connected.
    fn seen_gone(room: &WaitingRoom, n: u8, age_ms: i64) -> DeviceId {
        let id = DeviceId([n; 32]);
        let h = room.register(id, "d", "mqtt5", 5);
        room.deregister(&id, h.conn_id);
        let mut s = room.seen(&id).unwrap();
        s.last_seen = now_ms() - age_ms;
        room.inner.seen.pin().insert(id, s);
        id
    }

    #[test]
    fn seen_forgets_old_departed_devices_never_live_ones() {
        let room = WaitingRoom::default();
        let day = 24 * 3600 * 1000;
        let old = seen_gone(&room, 1, 31 * day);
        let recent = seen_gone(&room, 2, day);
        let live = DeviceId([3; 32]);
        let _h = room.register(live, "live", "mqtt5", 5);
        let mut s = room.seen(&live).unwrap();
        s.last_seen = now_ms() - 365 * day; // connected for a year
        room.inner.seen.pin().insert(live, s);
        assert_eq!(room.sweep_seen(now_ms(), SEEN_RETENTION_MS, SEEN_MAX), 1);
        assert!(room.seen(&old).is_none(), "gone for 31 days: forgotten");
        assert!(room.seen(&recent).is_some());
        assert!(
            room.seen(&live).is_some(),
            "a live device is never forgotten"
        );
    }

    #[test]
    fn seen_is_capped_oldest_first() {
        let room = WaitingRoom::default();
        let ids: Vec<DeviceId> = (0..16u8)
            .map(|n| seen_gone(&room, n, 1000 * i64::from(16 - n)))
            .collect();
        let live = DeviceId([200; 32]);
        let _h = room.register(live, "live", "mqtt5", 5);
        // 17 entries, cap 8: down to 7 (7/8 of the cap), the longest gone first, live kept.
        let forgotten = room.sweep_seen(now_ms(), SEEN_RETENTION_MS, 8);
        assert_eq!(forgotten, 10);
        assert!(room.seen(&live).is_some());
        assert!(
            ids[..10].iter().all(|id| room.seen(id).is_none()),
            "oldest forgotten"
        );
        assert!(
            ids[10..].iter().all(|id| room.seen(id).is_some()),
            "newest kept"
        );
    }

    /// Past the cap, a connect starts the sweep itself.
    #[tokio::test]
    async fn connects_past_the_cap_start_a_sweep() {
        let room = WaitingRoom::default();
        for n in 0..=u8::MAX {
            seen_gone(&room, n, 1000);
        }
        room.inner.seen_sweep.cap.store(100, Ordering::Relaxed);
        let _h = room.register(DeviceId([7; 32]), "d", "mqtt5", 5);
        for _ in 0..500 {
            if !room.inner.seen_sweep.running.load(Ordering::Acquire)
                && room.inner.seen.len() == 100 * 7 / 8
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no sweep: {} entries", room.inner.seen.len());
    }
}
