//! Fleet coordination (SPEC §10): what the nodes sharing one store tell each other through it.
//!
//! A store several nodes share ([`Store::fleet`](super::Store::fleet) is `Some`) records every change of a tenant or
//! claim in a change log and tells the other nodes; it holds the job leases, the fleet's AWS
//! call buckets and where each device is connected. The embedded store has one node and no
//! fleet: that node holds every job, paces in memory, and its own waiting room says where
//! its devices are. Persistence itself is [`Store`](super::Store)'s.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StoreError;
use crate::device::DeviceId;

/// What the nodes sharing a store coordinate through it.
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Takes (or renews) this node's lease on the job named `key` for `lease`: true when this
    /// node holds it now, false when another node's lease on it is still running.
    async fn take_job(&self, key: &str, lease: Duration) -> Result<bool, StoreError>;
    /// Gives up this node's lease on `key` (the job is done).
    async fn finish_job(&self, key: &str) -> Result<(), StoreError>;
    /// Takes the next slot of the fleet's call bucket `key` (one AWS account and region):
    /// calls spaced `1 s / rate` apart across every node sharing the store, with up to `rate`
    /// of a quiet second's unused calls spent at once (a token bucket of `rate`, refilled at
    /// `rate` a second). Returns how long to wait for the slot.
    async fn pace_slot(&self, key: &str, rate: u32) -> Result<Duration, StoreError>;
    /// Records where devices are connected (`batch`, from node `node`) and that `node` is alive,
    /// and announces each connect in `batch` to the other nodes ([`Takeover`]). Of two
    /// connects of a device on two nodes the newer (by `stamp`) is kept.
    async fn put_presence(&self, node: &str, batch: &[Presence]) -> Result<(), StoreError>;
    /// What every node reported of `id` (of every device: `None`). A device whose node stopped
    /// reporting it is alive shows as not connected.
    async fn presence(&self, id: Option<&DeviceId>) -> Result<Vec<Presence>, StoreError>;
    /// What every node reported of each of `ids` (a page of the device list).
    async fn presence_of(&self, ids: &[DeviceId]) -> Result<Vec<Presence>, StoreError>;
    /// Up to `limit` devices some node reported that have no claim, in id order after `after`
    /// (the unclaimed part of a device-list page): reads about a page, not the table.
    async fn unclaimed_presence(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Presence>, StoreError>;
    /// Where a reader that has seen nothing starts: after every change committed so far.
    async fn change_cursor(&self) -> Result<i64, StoreError>;
    /// The changes committed at or after `cursor` (some seen before may come again), and the
    /// cursor to ask with next. A change that commits later is never behind the next cursor,
    /// whatever sequence number it got.
    async fn changes_after(&self, cursor: i64) -> Result<ChangeBatch, StoreError>;
    /// Starts watching for other nodes' changes until `cancel`: `changes` gets a poke after
    /// each change notification and after every (re)connect of the watch, so a node that lost
    /// its notifications catches up from the change log; `takeovers` gets the connects other
    /// nodes announced with their presence.
    fn watch(&self, cancel: CancellationToken) -> Watch;
}

/// What a node hears from the other nodes of its fleet ([`Fleet::watch`]).
pub struct Watch {
    /// A poke: apply the change log.
    pub changes: mpsc::Receiver<()>,
    /// Devices that connected on another node.
    pub takeovers: mpsc::Receiver<Takeover>,
    /// The watch itself, for the caller to run (in its task tracker, so shutdown waits for it).
    pub listen: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Another node's announcement that a device connected there (written with its presence):
/// this node closes its own connection of that device if it is older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub device_id: DeviceId,
    /// The connect stamp (`SessionHandle::stamp`).
    pub stamp: i64,
    /// At an equal stamp the announcing node's connection is the newer (a fixed order of the
    /// nodes, the same seen from each).
    pub wins_tie: bool,
}

/// Where a device is connected, or was last seen, as a node of a fleet reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub device_id: DeviceId,
    /// `cluster.node_name` of the node that saw it.
    pub node: String,
    pub thing_name: String,
    pub protocol: String,
    pub connected: bool,
    /// Unix ms of the connect or disconnect.
    pub last_seen: i64,
    /// The connect stamp of the connection this is about (`SessionHandle::stamp`).
    pub stamp: i64,
}

/// A read of the change log ([`Fleet::changes_after`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    pub changes: Vec<Change>,
    /// The cursor for the next read.
    pub next: i64,
}

/// What a change is about: a claim (by device) or a tenant (by id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Claim(DeviceId),
    Tenant(String),
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its number; a claim written by it has this version.
    pub seq: i64,
    pub subject: Subject,
    /// Made by this process (already in its map).
    pub own: bool,
}
