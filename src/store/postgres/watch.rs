//! The fleet's watch: one connection per node in `LISTEN lobby_changes` (the change log) and
//! `LISTEN lobby_takeover` (connects announced by the other nodes' presence writers),
//! re-established with backoff whenever it drops. Nothing it missed while down is lost: the
//! change log is replayed (a poke), and the connects recorded meanwhile are read back from the
//! presence table.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{pg, PostgresStore, CHANNEL, NODE_GONE_AFTER_SECS};
use crate::device::DeviceId;
use crate::model::now_ms;
use crate::store::{StoreError, Takeover};

/// The notification channel of connect announcements: `<device_id> <stamp> <origin>`,
/// sent with the presence that records the connect.
pub(super) const TAKEOVER_CHANNEL: &str = "lobby_takeover";
/// Takeover notices queued towards the node's waiting room. The watch waits when it is full
/// (PostgreSQL keeps the notifications meanwhile); the waiting room takes each in microseconds.
pub(super) const TAKEOVER_QUEUE: usize = 1024;
/// After the watch was down, connects recorded since this long before it went down are read
/// back: an announcement goes out up to one presence flush after its connect (more while a
/// node retries a failed write), and nodes' clocks differ a little.
const RESYNC_MARGIN_MS: i64 = 10_000;

/// Where the watch hands what it hears.
pub(super) struct Listeners {
    pub(super) changes: mpsc::Sender<()>,
    pub(super) takeovers: mpsc::Sender<Takeover>,
    /// For the watch's own connection, this process's origin and reading presence back.
    pub(super) store: PostgresStore,
}

impl Listeners {
    /// Hands on one notification.
    async fn deliver(&self, n: &tokio_postgres::Notification) {
        if n.channel() != TAKEOVER_CHANNEL {
            let _ = self.changes.try_send(());
            return;
        }
        match parse_takeover(n.payload(), &self.store.origin) {
            Some(Some(t)) => {
                let _ = self.takeovers.send(t).await;
            }
            Some(None) => {}
            None => tracing::warn!(payload = n.payload(), "unreadable takeover notice"),
        }
    }

    /// Hands on every connect on another live node recorded since `since` (Unix ms): the
    /// announcements this node may have missed. Repeats are harmless.
    async fn resync(&self, since: i64) -> Result<usize, StoreError> {
        let sql = format!(
            "SELECT p.device_id, p.stamp, p.origin FROM lobby_presence p \
             JOIN lobby_nodes n ON n.name = p.node \
             WHERE p.connected AND p.origin <> $1 AND p.last_seen >= $2 \
             AND n.heartbeat > now() - make_interval(secs => {NODE_GONE_AFTER_SECS})"
        );
        let own: &str = &self.store.origin;
        let rows = self
            .store
            .query("presence_resync", &sql, &[&own, &since])
            .await?;
        let mut n = 0;
        for r in &rows {
            let (id, stamp, origin): (&str, i64, &str) = (
                r.try_get(0).map_err(pg)?,
                r.try_get(1).map_err(pg)?,
                r.try_get(2).map_err(pg)?,
            );
            let device_id = DeviceId::parse_hex(id)
                .ok_or_else(|| StoreError::Corrupt(format!("presence of {id:?}")))?;
            let t = Takeover {
                device_id,
                stamp,
                wins_tie: origin > own,
            };
            if self.takeovers.send(t).await.is_err() {
                break;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// `<device_id> <stamp> <origin>` → the notice, `Some(None)` for this process's own, `None`
/// when unreadable.
fn parse_takeover(payload: &str, own: &str) -> Option<Option<Takeover>> {
    let mut parts = payload.split(' ');
    let (id, stamp, origin) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let notice = Takeover {
        device_id: DeviceId::parse_hex(id)?,
        stamp: stamp.parse().ok()?,
        // Origins are lowercase hex, compared bytewise here and as `COLLATE "C"` in SQL.
        wins_tie: origin > own,
    };
    Some((origin != own).then_some(notice))
}

/// Watches until `cancel`. Pokes `to.changes` after every change notification and after
/// every (re)connect; hands takeover notices to `to.takeovers`, and after a reconnect the
/// connects recorded while it was down.
pub(super) async fn listen(to: Listeners, cancel: CancellationToken) {
    let mut config = to.store.config.clone();
    config.application_name(format!("lobby-listen-{}", to.store.origin));
    let mut backoff = Duration::from_millis(100);
    // Unix ms when the watch went down, until the connects since are read back.
    let mut lost_at: Option<i64> = None;
    loop {
        let session = async {
            let (client, mut conn) = config.connect(to.store.tls.clone()).await.map_err(pg)?;
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            let listen = format!("LISTEN {CHANNEL}; LISTEN {TAKEOVER_CHANNEL}");
            let subscribe = client.batch_execute(&listen);
            let mut subscribe = std::pin::pin!(subscribe);
            // The connection makes progress only while its messages are polled.
            loop {
                tokio::select! {
                    r = &mut subscribe => { r.map_err(pg)?; break; }
                    m = messages.next() => match m {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(pg(e)),
                        None => return Err(StoreError::Backend("watch connection closed".into())),
                    },
                }
            }
            crate::metrics::cluster_watch_connected(true);
            tracing::info!("watching the change log");
            // Catch up on whatever was missed while not listening.
            let _ = to.changes.try_send(());
            if let Some(at) = lost_at {
                // Announcements from now on arrive here; read back those that went out before.
                match to.resync(at - RESYNC_MARGIN_MS).await {
                    Ok(n) => {
                        tracing::info!(connects = n, "read back connects missed by the watch");
                        lost_at = None;
                    }
                    Err(e) => tracing::warn!(error = %e, "reading back missed connects failed"),
                }
            }
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => to.deliver(&n).await,
                    Ok(_) => {}
                    Err(e) => return Err(pg(e)),
                }
            }
            Err::<(), _>(StoreError::Backend("watch connection closed".into()))
        };
        let ended = tokio::select! {
            r = session => r,
            () = cancel.cancelled() => return,
        };
        crate::metrics::cluster_watch_connected(false);
        lost_at.get_or_insert_with(now_ms);
        if let Err(e) = ended {
            tracing::warn!(error = %e, retry_in = ?backoff, "change-log watch lost");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_notices_parse_and_order_the_nodes() {
        let id = "ab".repeat(32);
        let notice = |origin: &str| parse_takeover(&format!("{id} 42 {origin}"), "5555");
        let t = notice("a000").unwrap().unwrap();
        assert_eq!(
            (t.device_id.to_hex(), t.stamp, t.wins_tie),
            (id.clone(), 42, true)
        );
        assert!(!notice("1fff").unwrap().unwrap().wins_tie);
        assert_eq!(notice("5555"), Some(None), "its own notice");
        for bad in [
            "",
            "xyz 1 a",
            &format!("{id} x a"),
            &format!("{id} 1"),
            &format!("{id} 1 a b"),
        ] {
            assert_eq!(parse_takeover(bad, "5555"), None, "{bad:?}");
        }
    }
}
