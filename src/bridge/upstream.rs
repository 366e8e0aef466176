//! One upstream MQTT 3.1.1 connection to a tenant's endpoint over mutual TLS, kept up with
//! backoff and jitter, speaking the lobby's own codec.
//!
//! Why not rumqttc here: with a clean session it drops in-flight QoS 1 publishes on reconnect
//! and does not tell which request a PUBACK belongs to. The bridge acknowledges a device only
//! after the tenant acknowledged, so it needs exactly that: every QoS 1 publish stays in
//! `inflight` until its PUBACK, across reconnects (re-sent with DUP), and its waiter is told.
//!
//! A poison message: a broker may close the connection on a publish it will never take (AWS
//! IoT does, on a topic the policy forbids). Re-sending it on every reconnect would stall
//! every device on the connection for good. So after a reconnect the un-acked publishes go
//! again one at a time, oldest first, each waiting for its PUBACK before the next (and before
//! any new command): a connection lost then is blamed on that one publish. Past its
//! `max_redeliveries` it is given up on ([`Outcome::Rejected`], counted in
//! `lobby_bridge_poison_total`) and the rest carry on.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::mqtt::codec::{self, Packet, Protocol, QoS};

/// Un-acked QoS 1 publishes one upstream connection carries at once.
pub const MAX_INFLIGHT: usize = 64;
const KEEP_ALIVE: u16 = 30;
const MAX_PACKET: usize = 1 << 20;
/// Most bytes written in one batch.
const BATCH_BYTES: usize = 64 * 1024;

/// How a relayed publish ended upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The tenant acknowledged it (QoS 1), or it was written (QoS 0).
    Acked,
    /// The tenant closed the connection each time it was sent, `max_redeliveries` re-sends
    /// over: given up on, never acknowledged.
    Rejected,
}

/// What an upstream connection is asked to do.
#[derive(Debug)]
pub enum Command {
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        /// Re-sends after a lost connection before a QoS 1 publish is given up on.
        max_redeliveries: u16,
        /// Told how it ended (QoS 1: once the tenant acknowledged it, or it was given up on).
        done: Option<oneshot::Sender<Outcome>>,
    },
    Subscribe(String),
    Unsubscribe(String),
}

/// A message from the tenant, for the pool to fan out.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
}

/// Where to connect and how.
#[derive(Clone)]
pub struct Target {
    pub tenant: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub client_id: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} as {}", self.host, self.port, self.client_id)
    }
}

struct InFlight {
    /// Arrival order (packet ids wrap around).
    seq: u64,
    topic: String,
    payload: Bytes,
    /// Re-sends so far, counted only while it was the one publish outstanding.
    redeliveries: u16,
    max_redeliveries: u16,
    done: Option<oneshot::Sender<Outcome>>,
}

/// The connection's state that outlives a reconnect.
struct State {
    target: Target,
    /// QoS 1 publishes awaiting PUBACK, by packet id (re-sent after a reconnect).
    inflight: BTreeMap<u16, InFlight>,
    subscriptions: HashSet<String>,
    next_pkid: u16,
    next_seq: u64,
    /// After a reconnect: the one re-sent publish awaiting its PUBACK before the next goes.
    probing: Option<u16>,
}

type Conn = TlsStream<TcpStream>;

/// Runs one upstream connection until `cancel`.
pub async fn run(
    target: Target,
    mut commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    cancel: CancellationToken,
) {
    let mut state = State {
        target,
        inflight: BTreeMap::new(),
        subscriptions: HashSet::new(),
        next_pkid: 0,
        next_seq: 0,
        probing: None,
    };
    let mut attempt = 0u32;
    loop {
        match connect(&state.target).await {
            Ok(conn) => {
                attempt = 0;
                let gauge = metrics::gauge!(crate::metrics::BRIDGE_UPSTREAM_CONNECTED, "tenant" => state.target.tenant.clone());
                gauge.increment(1.0);
                let why = state.serve(conn, &mut commands, &inbound, &cancel).await;
                gauge.decrement(1.0);
                match why {
                    Ok(()) => return, // cancelled or the pool went away
                    Err(e) => {
                        tracing::warn!(upstream = ?state.target, error = %e, "upstream connection lost")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(upstream = ?state.target, error = %e, "upstream connect failed")
            }
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100 * (1u64 << attempt.min(8))).min(Duration::from_secs(15));
    cap.mul_f64(rand::rng().random_range(0.5..=1.0))
}

async fn connect(t: &Target) -> std::io::Result<Conn> {
    let name = ServerName::try_from(t.host.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tcp = timeout(
        Duration::from_secs(10),
        TcpStream::connect((t.host.as_str(), t.port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect"))??;
    let _ = tcp.set_nodelay(true);
    let mut conn = timeout(
        Duration::from_secs(10),
        TlsConnector::from(t.tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
    let connect = Packet::Connect(codec::Connect {
        protocol: Protocol::V311,
        client_id: t.client_id.clone(),
        keep_alive: KEEP_ALIVE,
        clean_start: true,
        ..Default::default()
    });
    write(&mut conn, &connect).await?;
    let mut buf = BytesMut::new();
    match timeout(Duration::from_secs(10), read_packet(&mut conn, &mut buf)).await {
        Ok(Ok(Packet::ConnAck(a))) if a.code == 0 => Ok(conn),
        Ok(Ok(other)) => Err(other_err(format!("refused: {other:?}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "CONNACK")),
    }
}

fn other_err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

async fn write(conn: &mut Conn, p: &Packet) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(64);
    codec::encode(p, Protocol::V311, &mut out).map_err(|e| other_err(e.to_string()))?;
    conn.write_all(&out).await?;
    conn.flush().await
}

async fn read_packet(conn: &mut Conn, buf: &mut BytesMut) -> std::io::Result<Packet> {
    loop {
        match codec::decode(buf, Some(Protocol::V311), MAX_PACKET) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(other_err(format!("upstream sent a bad packet: {e}"))),
        }
        if conn.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
    }
}

impl State {
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Serves a connected upstream; `Ok` means stop for good, `Err` reconnect.
    async fn serve(
        &mut self,
        mut conn: Conn,
        commands: &mut mpsc::Receiver<Command>,
        inbound: &mpsc::Sender<Inbound>,
        cancel: &CancellationToken,
    ) -> std::io::Result<()> {
        // A new session: subscriptions again, then the un-acked publishes one at a time.
        for filter in self.subscriptions.clone() {
            let pkid = self.pkid();
            write(&mut conn, &subscribe(pkid, filter)).await?;
        }
        self.probing = None;
        self.probe_next(&mut conn).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let ping_every = Duration::from_secs(u64::from(KEEP_ALIVE) / 2);
        let mut last_rx = Instant::now();
        let mut ping = tokio::time::interval(ping_every);
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = write(&mut conn, &Packet::Disconnect(Default::default())).await;
                    return Ok(());
                }
                cmd = commands.recv(), if self.probing.is_none() && self.inflight.len() < MAX_INFLIGHT => match cmd {
                    Some(cmd) => self.commands_batch(&mut conn, cmd, commands).await?,
                    None => return Ok(()),
                },
                read = conn.read_buf(&mut buf) => {
                    if read? == 0 {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
                    }
                    last_rx = Instant::now();
                    self.input(&mut conn, &mut buf, inbound).await?;
                    if self.probing.is_some_and(|p| !self.inflight.contains_key(&p)) {
                        self.probe_next(&mut conn).await?;
                    }
                }
                _ = ping.tick() => {
                    if last_rx.elapsed() > ping_every * 3 {
                        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "keep-alive"));
                    }
                    write(&mut conn, &Packet::PingReq).await?;
                }
            }
        }
    }

    /// Re-sends the oldest un-acked publish alone (as DUP), or gives it up past its
    /// `max_redeliveries`; with none left, new commands are taken again.
    async fn probe_next(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        self.probing = None;
        loop {
            let Some((&pkid, _)) = self.inflight.iter().min_by_key(|(_, f)| f.seq) else {
                return Ok(());
            };
            let Some(f) = self.inflight.get_mut(&pkid) else {
                return Ok(());
            };
            if f.redeliveries < f.max_redeliveries {
                f.redeliveries += 1;
                let p = publish(
                    pkid,
                    f.topic.clone(),
                    f.payload.clone(),
                    QoS::AtLeastOnce,
                    true,
                );
                self.probing = Some(pkid);
                return write(conn, &p).await;
            }
            if let Some(f) = self.inflight.remove(&pkid) {
                tracing::warn!(upstream = ?self.target, topic = %f.topic, redeliveries = f.redeliveries,
                    "the tenant closed the connection on this publish each time: given up on");
                metrics::counter!(crate::metrics::BRIDGE_POISON_TOTAL, "tenant" => self.target.tenant.clone())
                    .increment(1);
                if let Some(done) = f.done {
                    let _ = done.send(Outcome::Rejected);
                }
            }
        }
    }

    /// Encodes one command into `out` (written by the caller, batched with the next ones).
    fn command(&mut self, out: &mut BytesMut, cmd: Command) -> std::io::Result<()> {
        let packet = match cmd {
            Command::Publish {
                topic,
                payload,
                qos: QoS::AtMostOnce,
                done,
                ..
            } => {
                if let Some(done) = done {
                    let _ = done.send(Outcome::Acked);
                }
                publish(0, topic, payload, QoS::AtMostOnce, false)
            }
            Command::Publish {
                topic,
                payload,
                max_redeliveries,
                done,
                ..
            } => {
                let pkid = self.pkid();
                self.next_seq += 1;
                // Kept until its PUBACK: if the write fails it goes again after a reconnect.
                let in_flight = InFlight {
                    seq: self.next_seq,
                    topic: topic.clone(),
                    payload: payload.clone(),
                    redeliveries: 0,
                    max_redeliveries,
                    done,
                };
                self.inflight.insert(pkid, in_flight);
                publish(pkid, topic, payload, QoS::AtLeastOnce, false)
            }
            Command::Subscribe(filter) => {
                if !self.subscriptions.insert(filter.clone()) {
                    return Ok(());
                }
                subscribe(self.pkid(), filter)
            }
            Command::Unsubscribe(filter) => {
                if !self.subscriptions.remove(&filter) {
                    return Ok(());
                }
                Packet::Unsubscribe(codec::Unsubscribe {
                    pkid: self.pkid(),
                    filters: vec![filter],
                    properties: Default::default(),
                })
            }
        };
        codec::encode(&packet, Protocol::V311, out).map_err(|e| other_err(e.to_string()))
    }

    /// Takes `first` and whatever else is queued (within the in-flight window and one batch),
    /// and writes them in one go: one TLS record and one flush for many small publishes.
    async fn commands_batch(
        &mut self,
        conn: &mut Conn,
        first: Command,
        commands: &mut mpsc::Receiver<Command>,
    ) -> std::io::Result<()> {
        let mut out = BytesMut::with_capacity(4096);
        self.command(&mut out, first)?;
        while self.inflight.len() < MAX_INFLIGHT && out.len() < BATCH_BYTES {
            match commands.try_recv() {
                Ok(cmd) => self.command(&mut out, cmd)?,
                Err(_) => break,
            }
        }
        conn.write_all(&out).await?;
        conn.flush().await
    }

    async fn input(
        &mut self,
        conn: &mut Conn,
        buf: &mut BytesMut,
        inbound: &mpsc::Sender<Inbound>,
    ) -> std::io::Result<()> {
        loop {
            let packet = match codec::decode(buf, Some(Protocol::V311), MAX_PACKET) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(other_err(format!("upstream sent a bad packet: {e}"))),
            };
            match packet {
                Packet::PubAck(ack) => {
                    if let Some(f) = self.inflight.remove(&ack.pkid) {
                        metrics::counter!(crate::metrics::BRIDGE_MESSAGES_TOTAL, "direction" => "up", "tenant" => self.target.tenant.clone()).increment(1);
                        if let Some(done) = f.done {
                            let _ = done.send(Outcome::Acked);
                        }
                    }
                }
                Packet::Publish(p) => {
                    if p.qos == QoS::AtLeastOnce {
                        let ack = Packet::PubAck(codec::PubAck {
                            pkid: p.pkid,
                            ..Default::default()
                        });
                        write(conn, &ack).await?;
                    }
                    metrics::counter!(crate::metrics::BRIDGE_MESSAGES_TOTAL, "direction" => "down", "tenant" => self.target.tenant.clone()).increment(1);
                    // The pool's fan-out queue is bounded: waiting here slows this upstream
                    // connection rather than dropping what the tenant sent.
                    let msg = Inbound {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos,
                    };
                    if inbound.send(msg).await.is_err() {
                        return Ok(());
                    }
                }
                _ => {} // SUBACK, UNSUBACK, PINGRESP
            }
        }
    }
}

fn publish(pkid: u16, topic: String, payload: Bytes, qos: QoS, dup: bool) -> Packet {
    Packet::Publish(codec::Publish {
        dup,
        qos,
        retain: false,
        topic,
        pkid,
        payload,
        properties: Default::default(),
    })
}

fn subscribe(pkid: u16, filter: String) -> Packet {
    Packet::Subscribe(codec::Subscribe {
        pkid,
        filters: vec![codec::SubscribeFilter {
            filter,
            qos: QoS::AtLeastOnce,
            ..Default::default()
        }],
        properties: Default::default(),
    })
}
