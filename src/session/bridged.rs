//! A session in bridge mode: the device's publishes on its tenant's topics go upstream (QoS 1
//! acknowledged only after the tenant acknowledged, in arrival order), its subscriptions ride
//! the tenant's pool, and what the tenant sends is delivered at the granted QoS.
//!
//! A PATCH of the tenant wakes the session ([`crate::claims::service`] wakes every device of
//! the tenant), which compares the settings its link was made from with the map's: narrowed
//! `topics` apply at once (subscriptions outside them are dropped here and upstream; MQTT has
//! no packet to tell a device so, it just receives nothing more there; publishes there are
//! refused as SPEC §4 says), and a new endpoint or TLS files move the session to the new pool
//! without dropping the device: its subscriptions within the topics follow, and the publishes
//! the old pool had not acknowledged are sent again there and PUBACKed when it acknowledges.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::{End, Session, Step};
use crate::bridge::{self, filter_within, Busy, Inbound, Outcome, Pool};
use crate::claims::cache::TenantEntry;
use crate::model::Tenant;
use crate::mqtt::codec::{Protocol, Publish, QoS};
use crate::mqtt::reason;
use crate::mqtt::topic::filter_matches;
use crate::route::Route;

/// The session's link to its tenant's bridge pool.
pub(super) struct BridgeLink {
    pub(super) tenant: Arc<str>,
    /// The claim's thing name the patterns were filled with (a later naming re-links).
    thing_name: String,
    /// The tenant record the link was made from (a PATCH puts a new one in the map).
    made_from: Arc<TenantEntry>,
    pool: Arc<Pool>,
    /// The tenant's topics for this device (placeholders filled in).
    patterns: Vec<String>,
    tx: mpsc::Sender<Inbound>,
    rx: mpsc::Receiver<Inbound>,
    /// Device publishes awaiting the tenant's PUBACK, in arrival order.
    pending: VecDeque<Pending>,
    /// Filters this session holds on the pool.
    filters: HashSet<String>,
}

/// A device's QoS 1 publish relayed upstream and not yet PUBACKed to the device; kept whole,
/// so a move to a new pool can send it again.
struct Pending {
    pkid: u16,
    topic: String,
    payload: Bytes,
    answer: oneshot::Receiver<Outcome>,
}

/// Do `a` and `b` bridge the same way (endpoint, port, bridge settings)?
fn same_bridge(a: &Tenant, b: &Tenant) -> bool {
    a.endpoint == b.endpoint && a.port == b.port && a.bridge == b.bridge
}

/// An answer already known, for a pending publish carried over to a new pool.
fn answered(outcome: Outcome) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(outcome);
    rx
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
    /// The oldest pending publish (this packet id) has its answer from the tenant.
    Answered(u16, Outcome),
    /// The oldest pending publish's pool went away without an answer (the lobby stops).
    PoolGone,
}

/// Polls for the next bridge event (never ready without a link). Cancel-safe: nothing is
/// taken from the link until it is returned. A poll function rather than an async fn: the
/// wait loop of every session, bridged or not, holds the future that calls it.
pub(super) fn poll_event(
    link: &mut Option<Box<BridgeLink>>,
    cx: &mut Context<'_>,
) -> Poll<BridgeEvent> {
    let Some(link) = link.as_deref_mut() else {
        return Poll::Pending;
    };
    // A closed channel (the pool stopped) yields nothing more; the answers below still come.
    if let Poll::Ready(Some(m)) = link.rx.poll_recv(cx) {
        return Poll::Ready(BridgeEvent::Inbound(m));
    }
    let Some(oldest) = link.pending.front_mut() else {
        return Poll::Pending;
    };
    match Pin::new(&mut oldest.answer).poll(cx) {
        Poll::Ready(Ok(outcome)) => {
            let pkid = oldest.pkid;
            link.pending.pop_front();
            Poll::Ready(BridgeEvent::Answered(pkid, outcome))
        }
        Poll::Ready(Err(_)) => {
            oldest.answer = oneshot::channel().1; // never polled again once spent
            Poll::Ready(BridgeEvent::PoolGone)
        }
        Poll::Pending => Poll::Pending,
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Joins, leaves or re-links the tenant's bridge as the route and the tenant's current
    /// settings say. Returns the link it replaced, for [`Self::carry_over`] to finish with.
    pub(super) fn follow_bridge(&mut self, route: &Route) -> Option<Box<BridgeLink>> {
        let wanted = match route {
            Route::Bridge { tenant, thing_name } => Some((tenant.clone(), thing_name.as_str())),
            _ => None,
        };
        let linked = self
            .bridge
            .as_ref()
            .map(|l| (&l.tenant, l.thing_name.as_str()));
        if linked == wanted.as_ref().map(|(t, n)| (t, *n)) && self.bridge_current() {
            return None;
        }
        let old = self.bridge.take();
        let Some((tenant_id, thing_name)) = wanted else {
            return old;
        };
        let Some(entry) = self.ctx.cache.tenant(&tenant_id) else {
            return old;
        };
        let Some(settings) = &entry.tenant.bridge else {
            return old;
        };
        match self.ctx.bridge.pool(&entry.tenant) {
            Ok(pool) => {
                let (tx, rx) = mpsc::channel(bridge::DEVICE_QUEUE);
                // The claim's name, unique in the tenant; never the certificate's raw CN.
                let patterns =
                    bridge::device_patterns(settings, thing_name, &self.identity.device_id);
                self.bridge = Some(Box::new(BridgeLink {
                    tenant: tenant_id,
                    thing_name: thing_name.to_owned(),
                    made_from: entry.clone(),
                    pool,
                    patterns,
                    tx,
                    rx,
                    pending: VecDeque::new(),
                    filters: HashSet::new(),
                }));
            }
            Err(e) => tracing::warn!(tenant = %tenant_id, error = %e, "cannot bridge"),
        }
        old
    }

    /// Does the link still bridge as its tenant's record in the map says (no link: yes)?
    fn bridge_current(&self) -> bool {
        let Some(link) = &self.bridge else {
            return true;
        };
        self.ctx.cache.tenant(&link.tenant).is_some_and(|e| {
            Arc::ptr_eq(&e, &link.made_from) || same_bridge(&e.tenant, &link.made_from.tenant)
        })
    }

    /// Finishes [`Self::follow_bridge`] with the link it replaced. The same tenant's new
    /// link takes over what the old one held: on the same pool (only `topics` changed) its
    /// channel and pending answers, minus the subscriptions outside the new topics; on a new
    /// pool (endpoint, port or TLS files changed) its subscriptions within the topics, and its
    /// pending publishes, those the tenant answered with that answer and the rest sent again.
    /// Nothing is PUBACKed that a tenant did not acknowledge. Another tenant, or none: the old
    /// link's subscriptions are released.
    pub(super) async fn carry_over(&mut self, old: Option<Box<BridgeLink>>) -> Step {
        let Some(mut old) = old else { return Ok(()) };
        let Some(mut new) = self.bridge.take_if(|l| l.tenant == old.tenant) else {
            return self.leave_bridge(old).await;
        };
        let conn_id = self.handle.conn_id;
        if Arc::ptr_eq(&old.pool, &new.pool) {
            (new.tx, new.rx, new.pending) = (old.tx, old.rx, old.pending);
            for f in old.filters {
                if new.allows_subscribe(&f) {
                    new.filters.insert(f);
                } else {
                    new.pool.unsubscribe(conn_id, &f);
                    self.subs.remove(&f);
                }
            }
            self.bridge = Some(new);
            return Ok(());
        }
        for f in old.filters.drain() {
            old.pool.unsubscribe(conn_id, &f);
            if new.allows_subscribe(&f) {
                new.pool.subscribe(conn_id, &f, new.tx.clone());
                new.filters.insert(f);
            } else {
                self.subs.remove(&f);
            }
        }
        let cap = self.limits.bridge_max_redeliveries;
        for mut p in old.pending.drain(..) {
            p.answer = match p.answer.try_recv() {
                Ok(outcome) => answered(outcome),
                Err(_) => {
                    let (topic, payload) = (p.topic.clone(), p.payload.clone());
                    let id = &self.identity.device_id;
                    match new
                        .pool
                        .publish(id, topic, payload, QoS::AtLeastOnce, cap)
                        .await
                    {
                        Ok(Some(rx)) => rx,
                        // The new pool's queue stays full: the device keeps what is not
                        // acknowledged and sends it again when it reconnects.
                        Ok(None) | Err(Busy) => {
                            self.bridge = Some(new);
                            self.send_disconnect(reason::SERVER_BUSY, None);
                            let _ = self.flush().await;
                            return Err(End::ServerBusy);
                        }
                    }
                }
            };
            new.pending.push_back(p);
        }
        self.bridge = Some(new);
        // What the old pool delivered and the session has not yet: where still subscribed.
        while let Ok(msg) = old.rx.try_recv() {
            self.deliver_inbound(msg);
        }
        Ok(())
    }

    /// The session is no longer bridged by `old`'s tenant: its subscriptions are released.
    /// If the tenant still wants it bridged but the new settings cannot be used (a TLS file
    /// gone), publishes still unanswered end the session without a PUBACK, so the device
    /// sends them again when it reconnects rather than waiting for good.
    async fn leave_bridge(&mut self, old: Box<BridgeLink>) -> Step {
        self.release(&old);
        let still_wanted =
            matches!(self.route(), Route::Bridge { tenant, .. } if tenant == old.tenant);
        if still_wanted && !old.pending.is_empty() {
            self.send_disconnect(reason::SERVER_BUSY, None);
            let _ = self.flush().await;
            return Err(End::ServerBusy);
        }
        Ok(())
    }

    /// Leaves the bridge: the session's upstream subscriptions are released.
    pub(super) fn detach_bridge(&mut self) {
        if let Some(link) = self.bridge.take() {
            self.release(&link);
        }
    }

    fn release(&mut self, link: &BridgeLink) {
        for f in &link.filters {
            link.pool.unsubscribe(self.handle.conn_id, f);
            self.subs.remove(f);
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
        let cap = self.limits.bridge_max_redeliveries;
        // A QoS 1 publish is kept until answered, to go again if the tenant's pool changes.
        let kept = (p.qos == QoS::AtLeastOnce).then(|| (p.topic.clone(), p.payload.clone()));
        match link
            .pool
            .publish(&self.identity.device_id, p.topic, p.payload, p.qos, cap)
            .await
        {
            Ok(Some(answer)) => {
                let (topic, payload) = kept.unwrap_or_default();
                link.pending.push_back(Pending {
                    pkid: p.pkid,
                    topic,
                    payload,
                    answer,
                });
            }
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

    /// The tenant answered the oldest pending publish: the device is answered, with every
    /// further one already answered (one write carries a run of them, still in the order the
    /// device sent them).
    pub(super) async fn on_answered(&mut self, pkid: u16, outcome: Outcome) -> Step {
        let step = self
            .answer(pkid, outcome)
            .and_then(|()| self.answer_ready());
        let flushed = self.flush().await;
        step.and(flushed)
    }

    /// PUBACK for what the tenant acknowledged. A publish given up on (the tenant closed the
    /// connection on each re-send, `limits.bridge_max_redeliveries`): v5 PUBACK 0x80, v3.1.1
    /// (no negative PUBACK) the connection closed without one.
    fn answer(&mut self, pkid: u16, outcome: Outcome) -> Step {
        match (outcome, self.protocol) {
            (Outcome::Acked, _) => self.send_puback(pkid, reason::SUCCESS),
            (Outcome::Rejected, Protocol::V5) => self.send_puback(pkid, reason::UNSPECIFIED),
            (Outcome::Rejected, Protocol::V311) => return Err(End::BridgeRejected),
        }
        Ok(())
    }

    fn answer_ready(&mut self) -> Step {
        loop {
            let Some(front) = self.bridge.as_mut().and_then(|l| l.pending.front_mut()) else {
                return Ok(());
            };
            let outcome = match front.answer.try_recv() {
                Ok(outcome) => outcome,
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => {
                    // A spent receiver must not be polled again: `next_event` sees this one.
                    front.answer = oneshot::channel().1;
                    return Ok(());
                }
            };
            let pkid = front.pkid;
            if let Some(link) = self.bridge.as_mut() {
                link.pending.pop_front();
            }
            self.answer(pkid, outcome)?;
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
