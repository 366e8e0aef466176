//! Bridge mode (SPEC §5): a claimed device of a bridge-mode tenant stays on the lobby, which
//! relays its traffic to the tenant's endpoint over a per-tenant pool of upstream connections.
//!
//! Device → tenant: publishes on the tenant's `topics` go to one upstream connection (chosen by
//! device, so one device's messages keep their order); QoS 1 is acknowledged to the device only
//! after the tenant acknowledged. Tenant → device: device subscriptions become upstream
//! subscriptions, counted across the tenant's devices and dropped with the last subscriber;
//! what the tenant sends is fanned out to every matching session.

pub mod upstream;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::{fill_template, DeviceId};
use crate::model::{BridgeSettings, Tenant};
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::filter_matches;
use upstream::{Command, Target};
pub use upstream::{Inbound, Outcome};

/// Commands queued per upstream connection beyond its in-flight window; past this, devices
/// are told the server is busy rather than queued without bound.
const UPSTREAM_QUEUE: usize = 1024;
/// How long a device's publish waits for room in a full upstream queue.
pub const BUSY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);
/// Messages from the tenant waiting to be fanned out.
const FANOUT_QUEUE: usize = 1024;
/// Messages waiting for one device; a device that does not keep up loses QoS 0 and QoS 1
/// deliveries past this (counted), it never stalls the tenant's other devices.
pub const DEVICE_QUEUE: usize = 256;

/// Why a tenant's bridge cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge.{0}")]
    File(crate::pem::ClientConfigError),
    #[error("bridge: {0}")]
    Config(String),
}

/// The upstream TLS client configuration of a tenant's `bridge` settings.
pub fn client_tls(b: &BridgeSettings) -> Result<Arc<rustls::ClientConfig>, BridgeError> {
    use std::path::Path;
    crate::pem::client_config(Path::new(&b.ca), Path::new(&b.cert), Path::new(&b.key))
        .map_err(BridgeError::File)
}

/// The tenant's `topics` for one device: `{thing_name}` (and `{cn}`, the same) and
/// `{device_id}` filled in by [`fill_template`], so a placeholder is one literal level however
/// the certificate is named. `thing_name` is the claim's (unique in the tenant).
pub fn device_patterns(b: &BridgeSettings, thing_name: &str, id: &DeviceId) -> Vec<String> {
    b.topics
        .iter()
        .map(|t| fill_template(t, thing_name, id))
        .collect()
}

/// Is every topic `filter` can match also matched by `pattern`?
pub fn filter_within(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(pl), Some(fl)) if pl == fl && fl != "+" && fl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One pool per bridge-mode tenant, created on first use. Cheap `Clone`.
#[derive(Clone)]
pub struct BridgeHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    /// Weak: a pool lives while some session holds it (its tenant has bridged devices
    /// connected) and closes its upstream connections when the last one leaves.
    pools: Mutex<HashMap<String, std::sync::Weak<Pool>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for BridgeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BridgeHub")
    }
}

impl BridgeHub {
    pub fn new(cancel: CancellationToken, tracker: TaskTracker) -> Self {
        Self {
            inner: Arc::new(HubInner {
                pools: Mutex::new(HashMap::new()),
                cancel,
                tracker,
            }),
        }
    }

    /// The tenant's pool, started as needed, and started anew when its connection settings
    /// (endpoint, port, TLS files, pool size) changed. `topics` are not part of it: they are
    /// each session's to apply, so narrowing them keeps the upstream connections.
    ///
    /// A replaced pool is not cancelled here: it lives on while sessions hold it, so their
    /// publishes in flight there are still answered, until each moves to the new one (a
    /// tenant change wakes them) and the last one's leaving closes it.
    pub fn pool(&self, tenant: &Tenant) -> Result<Arc<Pool>, BridgeError> {
        let (Some(settings), Some(host)) = (&tenant.bridge, &tenant.endpoint) else {
            return Err(BridgeError::Config(
                "tenant has no bridge settings or endpoint".into(),
            ));
        };
        let connection = BridgeSettings {
            topics: Vec::new(),
            ..settings.clone()
        };
        let key = (host.clone(), tenant.port, connection);
        let mut pools = self.inner.pools.lock();
        pools.retain(|_, p| p.strong_count() > 0);
        if let Some(pool) = pools.get(&tenant.id).and_then(std::sync::Weak::upgrade) {
            if pool.key == key {
                return Ok(pool);
            }
        }
        let pool = Pool::start(tenant, key, &self.inner.cancel, &self.inner.tracker)?;
        pools.insert(tenant.id.clone(), Arc::downgrade(&pool));
        Ok(pool)
    }
}

/// Host, port and the bridge settings without `topics`.
type PoolKey = (String, u16, BridgeSettings);

/// A tenant's upstream connections and the device subscriptions riding on them.
pub struct Pool {
    key: PoolKey,
    conns: Vec<mpsc::Sender<Command>>,
    /// filter → session id → that session's delivery queue.
    subs: Mutex<HashMap<String, HashMap<u64, mpsc::Sender<Inbound>>>>,
    cancel: CancellationToken,
    /// The lobby's tasks (a stop waits for them).
    tracker: TaskTracker,
}

impl Drop for Pool {
    /// The last bridged device of the tenant left: close the upstream connections.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The upstream queue is full: the tenant is not keeping up (or is down) for long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl Pool {
    fn start(
        tenant: &Tenant,
        key: PoolKey,
        parent: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, BridgeError> {
        let tls = client_tls(&key.2)?;
        let cancel = parent.child_token();
        let (in_tx, in_rx) = mpsc::channel(FANOUT_QUEUE);
        let mut conns = Vec::new();
        let n = usize::from(key.2.pool_size.max(1));
        for i in 0..n {
            let (tx, rx) = mpsc::channel(UPSTREAM_QUEUE);
            let target = Target {
                tenant: tenant.id.clone(),
                host: key.0.clone(),
                port: key.1,
                tls: tls.clone(),
                client_id: format!("lobby-{}-{i}-{:08x}", tenant.id, rand::random::<u32>()),
            };
            tracker.spawn(upstream::run(target, rx, in_tx.clone(), cancel.clone()));
            conns.push(tx);
        }
        let pool = Arc::new(Pool {
            key,
            conns,
            subs: Mutex::new(HashMap::new()),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        tracker.spawn(fan_out(Arc::downgrade(&pool), in_rx, cancel));
        Ok(pool)
    }

    fn conn_for(&self, h: &impl Hash) -> &mpsc::Sender<Command> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        h.hash(&mut hasher);
        let i = (hasher.finish() % self.conns.len() as u64) as usize;
        &self.conns[i]
    }

    /// Relays a device's publish. For QoS 1 the receiver resolves once the tenant acknowledged
    /// it, or once it was given up on after `max_redeliveries` re-sends that each lost the
    /// connection ([`Outcome::Rejected`]). A full upstream queue is waited on for
    /// [`BUSY_AFTER`] (the device's session stops reading meanwhile: TCP flow control, not
    /// loss); past that QoS 0 is dropped and counted, QoS 1 is `Busy`.
    pub async fn publish(
        &self,
        device: &DeviceId,
        topic: String,
        payload: Bytes,
        qos: QoS,
        max_redeliveries: u16,
    ) -> Result<Option<oneshot::Receiver<Outcome>>, Busy> {
        let (done, rx) = match qos {
            QoS::AtMostOnce => (None, None),
            _ => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        let cmd = Command::Publish {
            topic,
            payload,
            qos,
            max_redeliveries,
            done,
        };
        match self.conn_for(device).send_timeout(cmd, BUSY_AFTER).await {
            Ok(()) => Ok(rx),
            // QoS 0 is best effort: the device is not cut off for it.
            Err(_) if qos == QoS::AtMostOnce => {
                metrics::counter!(crate::metrics::BRIDGE_DROPPED_TOTAL, "reason" => "upstream_busy")
                    .increment(1);
                Ok(None)
            }
            Err(_) => Err(Busy),
        }
    }

    /// Adds `session`'s subscription to `filter`; the first one subscribes upstream.
    pub fn subscribe(&self, session: u64, filter: &str, tx: mpsc::Sender<Inbound>) {
        let first = {
            let mut subs = self.subs.lock();
            let entry = subs.entry(filter.to_owned()).or_default();
            entry.insert(session, tx);
            entry.len() == 1
        };
        if first {
            let conn = self.conn_for(&filter).clone();
            if let Err(mpsc::error::TrySendError::Full(cmd)) =
                conn.try_send(Command::Subscribe(filter.to_owned()))
            {
                // A busy upstream queue must not block the device's session: queue it later.
                let cancel = self.cancel.clone();
                self.tracker.spawn(async move {
                    tokio::select! {
                        _ = conn.send(cmd) => {}
                        () = cancel.cancelled() => {}
                    }
                });
            }
        }
    }

    /// Drops `session`'s subscription to `filter`; the last one unsubscribes upstream.
    pub fn unsubscribe(&self, session: u64, filter: &str) {
        let last = {
            let mut subs = self.subs.lock();
            match subs.get_mut(filter) {
                Some(entry) => {
                    let removed = entry.remove(&session).is_some();
                    let empty = entry.is_empty();
                    if empty {
                        subs.remove(filter);
                    }
                    removed && empty
                }
                None => false,
            }
        };
        if last {
            // Best effort: an upstream that is gone has no subscription to drop.
            let _ = self
                .conn_for(&filter)
                .try_send(Command::Unsubscribe(filter.to_owned()));
        }
    }

    /// Upstream filters held now (tests, metrics).
    pub fn filters(&self) -> Vec<String> {
        let subs = self.subs.lock();
        subs.keys().cloned().collect()
    }
}

/// Delivers what the tenant sends to every session subscribed to a matching filter (once per
/// session, however many of its filters match).
async fn fan_out(
    pool: std::sync::Weak<Pool>,
    mut rx: mpsc::Receiver<Inbound>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            () = cancel.cancelled() => return,
        };
        let Some(pool) = pool.upgrade() else { return };
        let targets: Vec<mpsc::Sender<Inbound>> = {
            let subs = pool.subs.lock();
            let mut seen = HashMap::new();
            for (filter, sessions) in subs.iter() {
                if filter_matches(filter, &msg.topic) {
                    for (id, tx) in sessions {
                        seen.entry(*id).or_insert_with(|| tx.clone());
                    }
                }
            }
            seen.into_values().collect()
        };
        for tx in targets {
            if tx.try_send(msg.clone()).is_err() {
                metrics::counter!(crate::metrics::BRIDGE_DROPPED_TOTAL, "reason" => "device_slow")
                    .increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_within_patterns() {
        for (p, f) in [
            ("things/dev-1/#", "things/dev-1/cmd/#"),
            ("things/dev-1/#", "things/dev-1/cmd"),
            ("things/dev-1/#", "things/dev-1/+/x"),
            ("things/+/cmd", "things/dev-1/cmd"),
            ("fleet/#", "fleet/#"),
        ] {
            assert!(filter_within(p, f), "{p} ⊇ {f}");
        }
        for (p, f) in [
            ("things/dev-1/#", "things/#"),
            ("things/dev-1/#", "things/+/cmd"),
            ("things/+/cmd", "things/#"),
            ("things/dev-1/cmd", "things/dev-1/cmd/x"),
            ("things/dev-1/cmd", "things/dev-1"),
        ] {
            assert!(!filter_within(p, f), "{p} ⊉ {f}");
        }
    }

    #[test]
    fn patterns_are_filled_in() {
        let b = BridgeSettings {
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            topics: vec!["things/{thing_name}/#".into(), "ids/{device_id}".into()],
            pool_size: 1,
        };
        let p = device_patterns(&b, "dev-1", &DeviceId([0xab; 32]));
        assert_eq!(p[0], "things/dev-1/#");
        assert!(p[1].starts_with("ids/abab"));
    }

    #[test]
    fn a_hostile_name_fills_one_literal_level() {
        let b = BridgeSettings {
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            topics: vec!["things/{thing_name}/#".into(), "c/{cn}/up".into()],
            pool_size: 1,
        };
        let id = DeviceId([0xab; 32]);
        let hex = id.to_hex();
        for name in ["+", "#", "a/b", "$SYS", "a\0b", "", "\u{202e}x"] {
            let p = device_patterns(&b, name, &id);
            assert_eq!(p[0], format!("things/{hex}/#"), "{name:?}");
            assert_eq!(p[1], format!("c/{hex}/up"), "{name:?}");
        }
        assert!(!filter_within(
            &device_patterns(&b, "+", &id)[0],
            "things/other/#"
        ));
    }
}
