//! A session in bridge mode: the device's publishes on its tenant's topics go upstream (QoS 1
//! acknowledged only after the tenant acknowledged, in arrival order), its subscriptions ride
//! the tenant's pool, and what the tenant sends is delivered at the granted QoS.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::{reason, End, Session, Step};
use crate::bridge::{self, filter_within, Busy, Inbound, Pool};
use crate::mqtt::codec::{Publish, QoS};
use crate::mqtt::topic::filter_matches;
use crate::route::Route;

/// The session's link to its tenant's bridge pool.
pub(super) struct BridgeLink {
    pub(super) tenant: Arc<str>,
    pool: Arc<Pool>,
    /// The tenant's topics for this device (placeholders filled in).
    patterns: Vec<String>,
    tx: mpsc::Sender<Inbound>,
    rx: mpsc::Receiver<Inbound>,
    /// Device packet ids awaiting the tenant's PUBACK, in arrival order.
    pending: VecDeque<(u16, oneshot::Receiver<()>)>,
    /// Filters this session holds on the pool.
    filters: HashSet<String>,
}

impl BridgeLink {
    pub(super) fn allows_publish(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| filter_matches(p, topic))
    }

    pub(super) fn allows_subscribe(&self, filter: &str) -> bool {
        self.patterns.iter().any(|p| filter_within(p, filter))
    }
}

/// What the bridge has for the session.
pub(super) enum BridgeEvent {
    /// A message from the tenant.
    Inbound(Inbound),
    /// The oldest pending publish was acknowledged by the tenant (`Ok(pkid)`), or its upstream
    /// pool went away without an answer (`Err`).
    Acked(Result<u16, ()>),
}

/// The next bridge event (never, without a link). Cancel-safe: nothing is taken from the link
/// until it is returned.
pub(super) async fn next_event(link: &mut Option<BridgeLink>) -> BridgeEvent {
    let Some(BridgeLink { rx, pending, .. }) = link else {
        return std::future::pending().await;
    };
    tokio::select! {
        Some(m) = rx.recv() => BridgeEvent::Inbound(m),
        acked = oldest_acked(pending) => BridgeEvent::Acked(acked),
        else => std::future::pending().await,
    }
}

async fn oldest_acked(pending: &mut VecDeque<(u16, oneshot::Receiver<()>)>) -> Result<u16, ()> {
    let Some((_, rx)) = pending.front_mut() else {
        return std::future::pending().await;
    };
    let acked = rx.await.is_ok();
    let (pkid, _) = pending.pop_front().ok_or(())?;
    if acked {
        Ok(pkid)
    } else {
        Err(())
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Joins or leaves the tenant's bridge as the route says.
    pub(super) fn follow_bridge(&mut self, route: &Route) {
        let wanted = match route {
            Route::Bridge { tenant, thing_name } => Some((tenant.clone(), thing_name.as_str())),
            _ => None,
        };
        if self.bridge.as_ref().map(|l| &l.tenant) == wanted.as_ref().map(|w| &w.0) {
            return;
        }
        self.detach_bridge();
        let Some((tenant_id, thing_name)) = wanted else {
            return;
        };
        let Some(entry) = self.ctx.cache.tenant(&tenant_id) else {
            return;
        };
        let Some(settings) = &entry.tenant.bridge else {
            return;
        };
        match self.ctx.bridge.pool(&entry.tenant) {
            Ok(pool) => {
                let (tx, rx) = mpsc::channel(bridge::DEVICE_QUEUE);
                // The claim's name, unique in the tenant; never the certificate's raw CN.
                let patterns =
                    bridge::device_patterns(settings, thing_name, &self.identity.device_id);
                self.bridge = Some(BridgeLink {
                    tenant: tenant_id,
                    pool,
                    patterns,
                    tx,
                    rx,
                    pending: VecDeque::new(),
                    filters: HashSet::new(),
                });
            }
            Err(e) => tracing::warn!(tenant = %tenant_id, error = %e, "cannot bridge"),
        }
    }

    /// Leaves the bridge: the session's upstream subscriptions are released.
    pub(super) fn detach_bridge(&mut self) {
        if let Some(link) = self.bridge.take() {
            for f in &link.filters {
                link.pool.unsubscribe(self.handle.conn_id, f);
                self.subs.remove(f);
            }
        }
    }

    /// Relays a device publish the tenant's topics allow.
    pub(super) async fn bridge_publish(&mut self, p: Publish) -> Step {
        let Some(link) = self.bridge.as_mut() else {
            return Ok(());
        };
        // `limits.max_inflight` un-acknowledged QoS 1 publishes upstream (announced as v5
        // Receive Maximum); past it the device is disconnected with 0x97, nothing dropped.
        if p.qos == QoS::AtLeastOnce && link.pending.len() >= usize::from(self.limits.max_inflight)
        {
            self.send_disconnect(reason::QUOTA_EXCEEDED, None);
            let _ = self.flush().await;
            return Err(End::QuotaExceeded);
        }
        match link
            .pool
            .publish(&self.identity.device_id, p.topic, p.payload, p.qos)
            .await
        {
            Ok(Some(rx)) => link.pending.push_back((p.pkid, rx)),
            Ok(None) => {}
            Err(Busy) => {
                self.send_disconnect(reason::SERVER_BUSY, None);
                let _ = self.flush().await;
                return Err(End::ServerBusy);
            }
        }
        Ok(())
    }

    /// Adds a subscription the tenant's topics allow; true when it was taken.
    pub(super) fn bridge_subscribe(&mut self, filter: &str) -> bool {
        let conn_id = self.handle.conn_id;
        let Some(link) = self.bridge.as_mut() else {
            return false;
        };
        if link.filters.insert(filter.to_owned()) {
            link.pool.subscribe(conn_id, filter, link.tx.clone());
        }
        true
    }

    /// Drops a bridged subscription, if it was one.
    pub(super) fn bridge_unsubscribe(&mut self, filter: &str) {
        let conn_id = self.handle.conn_id;
        if let Some(link) = self.bridge.as_mut() {
            if link.filters.remove(filter) {
                link.pool.unsubscribe(conn_id, filter);
            }
        }
    }

    /// PUBACKs every further pending publish the tenant has already acknowledged, so one write
    /// carries a run of acknowledgements (still in the order the device sent them).
    pub(super) fn ack_ready(&mut self) {
        let mut ready = Vec::new();
        if let Some(link) = self.bridge.as_mut() {
            while let Some((pkid, rx)) = link.pending.front_mut() {
                match rx.try_recv() {
                    Ok(()) => {
                        ready.push(*pkid);
                        link.pending.pop_front();
                    }
                    Err(_) => break, // not yet, or gone: `next_event` reports it
                }
            }
        }
        for pkid in ready {
            self.send_puback(pkid, reason::SUCCESS);
        }
    }

    /// Delivers a message from the tenant at the QoS the device was granted.
    pub(super) fn deliver_inbound(&mut self, msg: Inbound) {
        if let Some(granted) = self.subs.granted(&msg.topic) {
            let qos = granted.min(msg.qos).min(QoS::AtLeastOnce);
            self.publish(msg.topic, qos, msg.payload.to_vec());
        }
    }
}
