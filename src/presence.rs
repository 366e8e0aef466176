//! Presence in a fleet: each node reports to the shared store which devices it holds, so any
//! node's device list says where a device is connected (`node`). The device path only sends
//! an event on a channel at connect and disconnect; a background task batches the events and
//! writes them in one statement every [`FLUSH`], with this node's heartbeat, at least every
//! [`HEARTBEAT`]. A node that stops beating (dead) has its devices shown as not connected.
//! Alone on its store, a node reports nothing: its waiting room is the whole truth.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::edge::identity::DeviceId;
use crate::store::{Presence, Store};

/// How often batched events are written.
pub const FLUSH: Duration = Duration::from_millis(500);
/// The longest a node goes without telling the store it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// A connect or disconnect, as the waiting room reports it.
#[derive(Debug, Clone)]
pub struct Event {
    pub device_id: DeviceId,
    pub thing_name: Arc<str>,
    pub protocol: &'static str,
    pub connected: bool,
    /// Unix ms.
    pub at: i64,
}

/// Writes this node's presence events (`node` is its `cluster.node_name`) until `cancel`,
/// then writes what is left.
pub async fn run(
    store: Arc<dyn Store>,
    node: String,
    mut events: mpsc::UnboundedReceiver<Event>,
    cancel: CancellationToken,
) {
    let mut pending: HashMap<DeviceId, Event> = HashMap::new();
    let mut tick = tokio::time::interval(FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beaten: Option<Instant> = None;
    loop {
        let stopping = tokio::select! {
            e = events.recv() => match e {
                // The latest event of a device wins.
                Some(e) => { pending.insert(e.device_id, e); continue; }
                None => true,
            },
            _ = tick.tick() => false,
            () = cancel.cancelled() => true,
        };
        let due = beaten.is_none_or(|b| b.elapsed() >= HEARTBEAT);
        if !pending.is_empty() || due {
            let batch: Vec<Presence> = pending
                .values()
                .map(|e| Presence {
                    device_id: e.device_id,
                    node: node.clone(),
                    thing_name: e.thing_name.to_string(),
                    protocol: e.protocol.to_owned(),
                    connected: e.connected,
                    last_seen: e.at,
                })
                .collect();
            match store.put_presence(&node, &batch).await {
                Ok(()) => {
                    pending.clear();
                    beaten = Some(Instant::now());
                }
                // Kept for the next tick: the latest state still wins.
                Err(e) => tracing::warn!(error = %e, "reporting presence failed; retrying"),
            }
        }
        if stopping {
            return;
        }
    }
}
