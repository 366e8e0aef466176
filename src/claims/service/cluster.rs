//! Several nodes over one shared store (SPEC §10). Every node keeps the whole map; the store
//! logs each change of a tenant or claim, and each node applies the changes to its map:
//! - when the store's watch pokes it (a notification after each commit, or a reconnect of
//!   the watch), and at least every [`SYNC_EVERY`] (a notification can be lost);
//! - when a write finds the claim changed (`change_claim` reads it then; not here).
//!
//! The log is read by cursor, not by sequence number: concurrent transactions commit out of
//! order, so a reader that went on after the highest number it saw could miss a smaller one
//! committed later. The store hands out a cursor behind every transaction still running
//! ([`crate::store::Fleet::changes_after`]); entries after it may come again (for as long as
//! an older transaction runs: a session left idle in one holds every cursor back). A claim
//! entry whose version the map already holds, or a newer one, is skipped without reading the
//! store; others are applied (applying reads what is stored now, so it is idempotent).
//!
//! A node's own entries are already in its map, unless the write's answer was lost after its
//! commit (a connection that broke at the commit): an own entry newer than the map's claim is
//! applied like a foreign one, so the map agrees with the store again.
//! With the embedded store there is one node: an empty log, nothing to watch.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ClaimsService, ServiceError};
use crate::device::DeviceId;
use crate::store::{Change, Subject};

/// How long a node remembers the version of a claim it put in its map (`map_has`): longer than
/// a change-log entry normally takes to come by (the next catch-up, within [`SYNC_EVERY`]).
pub const VERSIONS_KEPT: Duration = Duration::from_secs(60);

/// The longest a node goes without reading the change log.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

impl ClaimsService {
    /// Applies the change log from the cursor on; returns how many entries were other nodes'.
    /// At most one runs at a time, and callers that asked while one was starting share it: a
    /// flood of unknown tokens costs one read of the log per round, not one each.
    pub async fn catch_up(&self) -> Result<usize, ServiceError> {
        let inner = &self.inner;
        let ask = inner.catch_ups_asked.fetch_add(1, Ordering::SeqCst) + 1;
        let mut cursor = inner.applied.lock().await;
        if inner.catch_ups_covered.load(Ordering::SeqCst) >= ask {
            return Ok(0); // a catch-up that started after this ask has finished
        }
        let covers = inner.catch_ups_asked.load(Ordering::SeqCst);
        let Some(fleet) = inner.store.fleet() else {
            return Ok(0); // one node alone: its map is the store's
        };
        let batch = fleet.changes_after(*cursor).await?;
        let mut foreign = 0;
        let mut done: HashSet<&Subject> = HashSet::new();
        for Change { seq, subject, own } in &batch.changes {
            // Already in the map at this version or newer: this node's own write, or an entry
            // that comes again because an older transaction still holds the cursor back.
            if self.map_has(subject, *seq) {
                continue;
            }
            if !done.insert(subject) {
                continue;
            }
            match subject {
                Subject::Claim(id) => self.apply_claim(id).await?,
                Subject::Tenant(id) => self.apply_tenant(id).await?,
            }
            if !own {
                foreign += 1;
            }
        }
        *cursor = batch.next;
        let now = std::time::Instant::now();
        inner
            .versions
            .lock()
            .retain(|_, (_, at)| now.duration_since(*at) < VERSIONS_KEPT);
        inner.catch_ups_covered.store(covers, Ordering::SeqCst);
        if foreign > 0 {
            ::metrics::counter!(crate::metrics::CLUSTER_CHANGES_APPLIED_TOTAL)
                .increment(foreign as u64);
        }
        Ok(foreign)
    }

    /// Whether this node's map already holds change `seq` of `subject` (or a newer one).
    fn map_has(&self, subject: &Subject, seq: i64) -> bool {
        match subject {
            Subject::Claim(id) => {
                self.inner.cache.contains(id)
                    && self
                        .inner
                        .versions
                        .lock()
                        .get(id)
                        .is_some_and(|v| v.0 >= seq)
            }
            // Tenant changes are rare: apply every one.
            Subject::Tenant(_) => false,
        }
    }

    /// Makes the map hold what the store holds for claim `id`, and wakes the device.
    pub(super) async fn apply_claim(&self, id: &DeviceId) -> Result<(), ServiceError> {
        let _turn = self.turn(id).lock().await;
        let stored = self.inner.store.claim(id).await?;
        self.put_in_map(id, stored);
        Ok(())
    }

    /// Makes the map hold what the store holds for tenant `id`, and wakes its devices.
    pub(super) async fn apply_tenant(&self, id: &str) -> Result<(), ServiceError> {
        let inner = &self.inner;
        match inner.store.tenant(id).await? {
            Some(t) => inner.cache.put_tenant(super::tenant_entry(t)?),
            None => inner.cache.remove_tenant(id),
        }
        self.wake_tenant(id);
        Ok(())
    }

    /// Applies other nodes' changes whenever the store's watch pokes and every
    /// [`SYNC_EVERY`], until the watch closes or `cancel` fires.
    pub async fn run_sync(self, mut pokes: mpsc::Receiver<()>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                poke = pokes.recv() => if poke.is_none() { return },
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            // A failed catch-up is retried until it succeeds: nothing in the log is skipped.
            while let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "applying the change log failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}
