//! Presence in a fleet: each node reports to the shared store which devices it holds, so any
//! node's device list says where a device is connected (`node`). The device path only sends
//! an event on a bounded channel at connect and disconnect; a background task batches the
//! events and writes them in one statement every [`FLUSH`], with this node's heartbeat, at
//! least every [`HEARTBEAT`]. A node that stops beating (dead) has its devices shown as not
//! connected. Alone on its store, a node reports nothing: its waiting room is the whole truth.
//!
//! The same write announces each connect to the other nodes (SPEC §2 across nodes): a node
//! that hears of a newer connect of a device it holds closes its own session of it as taken
//! over ([`take_over`]). So a connect reaches the other nodes within about one [`FLUSH`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::device::DeviceId;
use crate::store::{Presence, Store, StoreError, Takeover};
use crate::waiting::{PresenceEvent, WaitingRoom};

/// How often batched events are written.
pub const FLUSH: Duration = Duration::from_millis(500);
/// The longest a node goes without telling the store it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Events queued towards the writer. It drains the queue while a write is in flight (what
/// waits is one entry per device), so this fills only if the writer gets no CPU at all.
pub const QUEUE: usize = 16_384;

/// What waits to be written, one entry per device, the latest winning, except that a
/// disconnect never hides a connect not yet written: the connect is written (and announced)
/// first, the disconnect in the next batch. A clone that connects and leaves within one
/// batch still takes over.
#[derive(Default)]
struct Pending {
    next: HashMap<DeviceId, PresenceEvent>,
    /// Disconnects that follow a connect in `next`.
    after: HashMap<DeviceId, PresenceEvent>,
}

impl Pending {
    fn add(&mut self, e: PresenceEvent) {
        let id = e.device_id;
        if let Some(later) = self.after.get_mut(&id) {
            if e.connected {
                self.after.remove(&id);
                self.next.insert(id, e);
            } else {
                *later = e;
            }
            return;
        }
        match self.next.get(&id) {
            Some(p) if p.connected && !e.connected => {
                self.after.insert(id, e);
            }
            _ => {
                self.next.insert(id, e);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.next.is_empty() && self.after.is_empty()
    }

    /// The batch to write now; the disconnects that must follow it wait for the next one.
    fn take_batch(&mut self) -> Vec<PresenceEvent> {
        let batch = std::mem::replace(&mut self.next, std::mem::take(&mut self.after));
        batch.into_values().collect()
    }

    /// Puts back a batch that failed to write, older than everything pending now.
    fn restore(&mut self, failed: Vec<PresenceEvent>) {
        let newer = std::mem::take(self);
        for e in failed
            .into_iter()
            .chain(newer.next.into_values())
            .chain(newer.after.into_values())
        {
            self.add(e);
        }
    }
}

type Write = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// One `put_presence` of `batch` from `node`, as a future that owns what it needs.
fn write(store: &Arc<dyn Store>, node: &str, batch: &[PresenceEvent]) -> Write {
    let rows: Vec<Presence> = batch
        .iter()
        .map(|e| Presence {
            device_id: e.device_id,
            node: node.to_owned(),
            thing_name: e.thing_name.to_string(),
            protocol: e.protocol.to_owned(),
            connected: e.connected,
            last_seen: e.at,
            stamp: e.stamp,
        })
        .collect();
    let (store, node) = (store.clone(), node.to_owned());
    Box::pin(async move {
        match store.fleet() {
            Some(fleet) => fleet.put_presence(&node, &rows).await,
            None => Ok(()),
        }
    })
}

/// Waits for the write in flight, if any (never resolves without one).
async fn finished(w: &mut Option<(Write, Vec<PresenceEvent>)>) -> Result<(), StoreError> {
    match w {
        Some((f, _)) => f.await,
        None => std::future::pending().await,
    }
}

/// Writes this node's presence events (`node` is its `cluster.node_name`) until `cancel`,
/// then writes what is left. Events keep being received while a write is in flight.
pub async fn run(
    store: Arc<dyn Store>,
    node: String,
    mut events: mpsc::Receiver<PresenceEvent>,
    cancel: CancellationToken,
) {
    let mut pending = Pending::default();
    let mut tick = tokio::time::interval(FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beaten: Option<Instant> = None;
    let mut writing: Option<(Write, Vec<PresenceEvent>)> = None;
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(e) => pending.add(e),
                None => break,
            },
            r = finished(&mut writing) => {
                let Some((_, batch)) = writing.take() else { continue };
                match r {
                    Ok(()) => beaten = Some(Instant::now()),
                    // Kept for the next tick: the latest state still wins.
                    Err(e) => {
                        tracing::warn!(error = %e, "reporting presence failed; retrying");
                        pending.restore(batch);
                    }
                }
            },
            _ = tick.tick(), if writing.is_none() => {
                let due = beaten.is_none_or(|b| b.elapsed() >= HEARTBEAT);
                if !pending.is_empty() || due {
                    let batch = pending.take_batch();
                    writing = Some((write(&store, &node, &batch), batch));
                }
            },
            () = cancel.cancelled() => break,
        }
    }
    // Stopping: what is in flight, then what is left (a connect before its disconnect).
    if let Some((w, _)) = writing.take() {
        let _ = w.await;
    }
    while !pending.is_empty() {
        let batch = pending.take_batch();
        if let Err(e) = write(&store, &node, &batch).await {
            tracing::warn!(error = %e, "reporting presence at shutdown failed");
            return;
        }
    }
}

/// Applies other nodes' connect announcements to this node's waiting room until the watch
/// closes or `cancel`: an older session of the device here is closed as taken over.
pub async fn take_over(
    waiting: WaitingRoom,
    mut notices: mpsc::Receiver<Takeover>,
    cancel: CancellationToken,
) {
    loop {
        let t = tokio::select! {
            t = notices.recv() => match t {
                Some(t) => t,
                None => return,
            },
            () = cancel.cancelled() => return,
        };
        if waiting.taken_over_elsewhere(&t.device_id, t.stamp, t.wins_tie) {
            tracing::debug!(device_id = %t.device_id.to_hex(), "connected on another node: taken over");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8, connected: bool, stamp: i64) -> PresenceEvent {
        PresenceEvent {
            device_id: DeviceId([n; 32]),
            thing_name: "d".into(),
            protocol: "mqtt5",
            connected,
            at: stamp,
            stamp,
        }
    }

    fn states(batch: &[PresenceEvent]) -> Vec<(u8, bool, i64)> {
        let mut v: Vec<_> = batch
            .iter()
            .map(|e| (e.device_id.0[0], e.connected, e.stamp))
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_connect_is_written_before_the_disconnect_that_follows_it() {
        let mut p = Pending::default();
        p.add(event(1, true, 1));
        p.add(event(1, false, 1));
        p.add(event(2, false, 0));
        p.add(event(2, true, 2));
        assert_eq!(states(&p.take_batch()), [(1, true, 1), (2, true, 2)]);
        assert_eq!(states(&p.take_batch()), [(1, false, 1)]);
        assert!(p.is_empty());
        // A reconnect within the batch: the newest connect, and nothing after it.
        p.add(event(3, true, 1));
        p.add(event(3, false, 1));
        p.add(event(3, true, 5));
        assert_eq!(states(&p.take_batch()), [(3, true, 5)]);
        assert!(p.is_empty());
    }

    #[test]
    fn a_failed_batch_goes_back_behind_newer_events() {
        let mut p = Pending::default();
        p.add(event(1, true, 1));
        let failed = p.take_batch();
        p.add(event(1, false, 1));
        p.add(event(2, true, 2));
        p.restore(failed);
        assert_eq!(states(&p.take_batch()), [(1, true, 1), (2, true, 2)]);
        assert_eq!(states(&p.take_batch()), [(1, false, 1)]);
    }
}
