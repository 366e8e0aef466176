//! The fleet of nodes sharing one PostgreSQL database ([`Fleet`]): the change log and its
//! notifications, presence and takeovers, job leases and the AWS call buckets.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::sql::*;
use super::{describe, pg, watch, PostgresStore};
use crate::device::DeviceId;
use crate::store::{Change, ChangeBatch, Fleet, Presence, StoreError, Subject, Watch};

/// Sends the change log's notification after commits, coalescing those that come while one
/// is on its way. A lost one costs the other nodes a moment: they also read the log on a timer.
pub(super) struct Notifier {
    pending: tokio::sync::Notify,
    /// Stops the sending task when the last handle of the store goes.
    _stop: tokio_util::sync::DropGuard,
}

impl Notifier {
    pub(super) fn start(pool: Pool) -> Arc<Self> {
        let stop = CancellationToken::new();
        let notifier = Arc::new(Self {
            pending: tokio::sync::Notify::new(),
            _stop: stop.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&notifier);
        tokio::spawn(async move {
            loop {
                let Some(n) = weak.upgrade() else { return };
                tokio::select! {
                    () = n.pending.notified() => {}
                    () = stop.cancelled() => return,
                }
                drop(n);
                let sent = async {
                    let c = pool.get().await.map_err(|e| e.to_string())?;
                    c.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                        .await
                        .map_err(|e| describe(&e))
                };
                if let Err(e) = sent.await {
                    tracing::warn!(error = %e, "telling the fleet of a change failed");
                }
            }
        });
        notifier
    }

    pub(super) fn poke(&self) {
        self.pending.notify_one();
    }
}

impl PostgresStore {
    /// Presence rows of `sql` (a [`presence_select`] with its conditions).
    async fn presence_rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Presence>, StoreError> {
        let rows = self.query("presence", sql, params).await?;
        rows.iter()
            .map(|r| {
                let id: &str = r.try_get(0).map_err(pg)?;
                Ok(Presence {
                    device_id: DeviceId::parse_hex(id)
                        .ok_or_else(|| StoreError::Corrupt(format!("presence of {id:?}")))?,
                    node: r.try_get(1).map_err(pg)?,
                    thing_name: r.try_get(2).map_err(pg)?,
                    protocol: r.try_get(3).map_err(pg)?,
                    connected: r.try_get(4).map_err(pg)?,
                    last_seen: r.try_get(5).map_err(pg)?,
                    stamp: r.try_get(6).map_err(pg)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Fleet for PostgresStore {
    async fn change_cursor(&self) -> Result<i64, StoreError> {
        let rows = self
            .query(
                "change_cursor",
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await?;
        rows.first()
            .map_or(Ok(0), |r| r.try_get::<_, i64>(0).map_err(pg))
    }

    async fn changes_after(&self, cursor: i64) -> Result<ChangeBatch, StoreError> {
        let rows = self
            .query("changes_after", CHANGES_AFTER, &[&cursor.to_string()])
            .await?;
        let mut batch = ChangeBatch {
            changes: Vec::with_capacity(rows.len()),
            next: cursor,
        };
        for r in &rows {
            batch.next = r.try_get(0).map_err(pg)?;
            let Some(seq) = r.try_get::<_, Option<i64>>(1).map_err(pg)? else {
                continue; // no changes: the row carries only the cursor
            };
            let (kind, key): (&str, &str) = (r.try_get(2).map_err(pg)?, r.try_get(3).map_err(pg)?);
            let subject = match kind {
                "claim" => Subject::Claim(
                    DeviceId::parse_hex(key)
                        .ok_or_else(|| StoreError::Corrupt(format!("change of claim {key:?}")))?,
                ),
                "tenant" => Subject::Tenant(key.to_owned()),
                other => return Err(StoreError::Corrupt(format!("change kind {other:?}"))),
            };
            batch.changes.push(Change {
                seq,
                subject,
                own: r.try_get::<_, &str>(4).map_err(pg)? == &*self.origin,
            });
        }
        // The cursor never goes back (a reader's snapshot may be older than the last one).
        batch.next = batch.next.max(cursor);
        Ok(batch)
    }

    async fn put_presence(&self, node: &str, batch: &[Presence]) -> Result<(), StoreError> {
        let ids: Vec<String> = batch.iter().map(|p| p.device_id.to_hex()).collect();
        let things: Vec<&str> = batch.iter().map(|p| p.thing_name.as_str()).collect();
        let protocols: Vec<&str> = batch.iter().map(|p| p.protocol.as_str()).collect();
        let connected: Vec<bool> = batch.iter().map(|p| p.connected).collect();
        let at: Vec<i64> = batch.iter().map(|p| p.last_seen).collect();
        let stamps: Vec<i64> = batch.iter().map(|p| p.stamp).collect();
        let announced: Vec<String> = batch
            .iter()
            .filter(|p| p.connected)
            .map(|p| format!("{} {} {}", p.device_id.to_hex(), p.stamp, self.origin))
            .collect();
        self.timed("put_presence", async {
            let mut client = self.client().await?;
            let beat = client.prepare_cached(NODE_BEAT).await.map_err(pg)?;
            let upsert = client.prepare_cached(PRESENCE_UPSERT).await.map_err(pg)?;
            let announce = client.prepare_cached(ANNOUNCE).await.map_err(pg)?;
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(&beat, &[&node]).await.map_err(pg)?;
            if !batch.is_empty() {
                tx.execute(
                    &upsert,
                    &[
                        &ids,
                        &things,
                        &protocols,
                        &connected,
                        &at,
                        &node,
                        &stamps,
                        &&*self.origin,
                    ],
                )
                .await
                .map_err(pg)?;
            }
            if !announced.is_empty() {
                // Delivered at commit, with the presence it announces.
                tx.execute(&announce, &[&announced]).await.map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
        .await
    }

    async fn presence(&self, id: Option<&DeviceId>) -> Result<Vec<Presence>, StoreError> {
        match id {
            Some(id) => {
                let sql = format!("{} WHERE p.device_id = $1", presence_select());
                self.presence_rows(&sql, &[&id.to_hex()]).await
            }
            None => self.presence_rows(&presence_select(), &[]).await,
        }
    }

    async fn presence_of(&self, ids: &[DeviceId]) -> Result<Vec<Presence>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hex: Vec<String> = ids.iter().map(DeviceId::to_hex).collect();
        let sql = format!("{} WHERE p.device_id = ANY($1::text[])", presence_select());
        self.presence_rows(&sql, &[&hex]).await
    }

    async fn unclaimed_presence(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Presence>, StoreError> {
        let after = after.map_or_else(String::new, DeviceId::to_hex);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // The primary key's order (collation "C": hex order is id order), so a page reads
        // about a page of rows.
        let sql = format!(
            "{} WHERE p.device_id > $1 AND NOT EXISTS \
             (SELECT 1 FROM claims c WHERE c.device_id = p.device_id) \
             ORDER BY p.device_id LIMIT $2",
            presence_select()
        );
        self.presence_rows(&sql, &[&after, &limit]).await
    }

    /// The row lock of the upsert decides between nodes racing for the same job.
    async fn take_job(&self, key: &str, lease: Duration) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "take_job",
                "INSERT INTO lobby_jobs (key, node, until) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (key) DO UPDATE SET node = EXCLUDED.node, until = EXCLUDED.until \
                 WHERE lobby_jobs.until < now() OR lobby_jobs.node = EXCLUDED.node \
                 RETURNING key",
                &[&key, &&*self.origin, &lease.as_secs_f64()],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn finish_job(&self, key: &str) -> Result<(), StoreError> {
        self.execute(
            "finish_job",
            "DELETE FROM lobby_jobs WHERE key = $1 AND node = $2",
            &[&key, &&*self.origin],
        )
        .await
        .map(drop)
    }

    async fn pace_slot(&self, key: &str, rate: u32) -> Result<Duration, StoreError> {
        let interval = Duration::from_secs(1) / rate.max(1);
        let rows = self
            .query("pace_slot", PACE_SLOT, &[&key, &interval.as_secs_f64()])
            .await?;
        let until_end: i64 = rows
            .first()
            .ok_or_else(|| StoreError::Backend("pace_slot answered no row".into()))?
            .try_get(0)
            .map_err(pg)?;
        let until_end = Duration::from_micros(u64::try_from(until_end).unwrap_or(0));
        Ok(until_end.saturating_sub(interval))
    }

    fn watch(&self, cancel: CancellationToken) -> Watch {
        let (changes, rx) = mpsc::channel(1);
        let (takeovers, takeover_rx) = mpsc::channel(watch::TAKEOVER_QUEUE);
        let to = watch::Listeners {
            changes,
            takeovers,
            store: self.clone(),
        };
        Watch {
            changes: rx,
            takeovers: takeover_rx,
            listen: Box::pin(watch::listen(to, cancel)),
        }
    }
}
