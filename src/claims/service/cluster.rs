//! Several nodes over one shared store (SPEC §10). Every node keeps the whole map; the store
//! logs each change of a tenant or claim, and each node applies the other nodes' changes:
//! - when the store's watch pokes it (a notification, or a reconnect of the watch);
//! - under the write lock, before any mutation, so a claim is checked against every change
//!   committed on any node ("another tenant claimed it" is exact across nodes).
//!
//! Writers hold the store's cluster-wide lock while they write, so the log's order is the
//! commit order and reading it after the last applied sequence number misses nothing.
//! With the embedded store there is one node: no lock, an empty log, nothing to watch.

use tokio::sync::{mpsc, MutexGuard};
use tokio_util::sync::CancellationToken;

use super::{gauge_state, ClaimsService, ServiceError, TenantEntry};
use crate::store::{Change, StoreError, Subject, WriteLock};

/// Held while a node mutates tenants or claims. Fields drop in order: the cluster lock first.
pub(super) struct WriteGuard<'a> {
    _cluster: Option<Box<dyn WriteLock>>,
    _local: MutexGuard<'a, ()>,
}

impl ClaimsService {
    /// Takes this node's write lock, then the cluster's (if any), then applies every change
    /// other nodes committed before it.
    pub(super) async fn write(&self) -> Result<WriteGuard<'_>, ServiceError> {
        let local = self.inner.write.lock().await;
        let cluster = self.inner.store.lock_writes().await?;
        if cluster.is_some() {
            self.catch_up().await?;
        }
        Ok(WriteGuard {
            _cluster: cluster,
            _local: local,
        })
    }

    /// Applies the change log after the last applied entry; returns how many entries were
    /// other nodes' (this node's own are in its map already).
    pub async fn catch_up(&self) -> Result<usize, ServiceError> {
        let mut applied = self.inner.applied.lock().await;
        let changes = self.inner.store.changes_since(*applied).await?;
        let mut foreign = 0;
        for Change { seq, subject, own } in changes {
            if !own {
                self.apply(&subject).await?;
                foreign += 1;
            }
            *applied = seq;
        }
        if foreign > 0 {
            ::metrics::counter!(crate::metrics::CLUSTER_CHANGES_APPLIED_TOTAL)
                .increment(foreign as u64);
        }
        Ok(foreign)
    }

    /// Makes the map hold what the store holds for `subject`, and wakes who it concerns.
    async fn apply(&self, subject: &Subject) -> Result<(), ServiceError> {
        let inner = &self.inner;
        match subject {
            Subject::Claim(id) => {
                let old = inner.cache.claim(id);
                if let Some(old) = &old {
                    gauge_state(old.state, -1.0);
                }
                match inner.store.claim(id).await? {
                    Some(claim) => {
                        gauge_state(claim.state, 1.0);
                        inner.cache.put_claim(claim);
                    }
                    None => inner.cache.remove_claim(id),
                }
                inner.waiting.wake(id);
            }
            Subject::Tenant(id) => {
                match inner.store.tenant(id).await? {
                    Some(t) => {
                        let mut token_hash = [0u8; 32];
                        hex::decode_to_slice(&t.token_hash, &mut token_hash).map_err(|_| {
                            StoreError::Corrupt(format!("token hash of {}", t.tenant.id))
                        })?;
                        inner.cache.put_tenant(TenantEntry {
                            tenant: t.tenant,
                            token_hash,
                        });
                    }
                    None => inner.cache.remove_tenant(id),
                }
                self.wake_tenant(id);
            }
        }
        Ok(())
    }

    /// Applies other nodes' changes whenever the store's watch pokes, until it closes or
    /// `cancel` fires.
    pub async fn run_sync(self, mut pokes: mpsc::Receiver<()>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                poke = pokes.recv() => if poke.is_none() { return },
                () = cancel.cancelled() => return,
            }
            // A failed catch-up is retried until it succeeds: nothing in the log is skipped.
            while let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "applying the change log failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}
