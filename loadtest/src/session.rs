//! One device's connection: TCP → TLS → CONNECT/CONNACK with per-phase timings, then a small
//! event reader and the keep-alive loop used while a device waits.
//!
//! Per held connection the harness keeps the socket, the rustls state and a `Vec` that is empty
//! (and small) between packets: no buffered reader, no per-connection channel.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::{ClientConfig, HandshakeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, Packet, Version};
use crate::net::tcp_connect;
use crate::pki::Device;
use crate::stats::{Failure, Timings};
use crate::tls::TlsClient;

/// Settings shared by every connection of a run.
pub struct Ctx {
    /// Server MQTT addresses (one per `--port`); device `i` connects to `servers[i % len]`, so
    /// a fleet's nodes each get an even share.
    pub servers: Vec<SocketAddr>,
    /// Source addresses to bind to, round-robin by device index (empty: let the kernel pick).
    pub sources: Vec<IpAddr>,
    /// TLS settings.
    pub tls: TlsClient,
    /// MQTT protocol level.
    pub version: Version,
    /// Keep-alive sent in CONNECT, in seconds.
    pub keep_alive: u16,
    /// Limit for each phase (TCP, TLS, CONNACK, SUBACK).
    pub timeout: Duration,
    /// The devices.
    pub devices: Vec<Device>,
    /// Per-device TLS configs, made on first use and kept (so `--resume` can resume).
    configs: Vec<OnceLock<Arc<ClientConfig>>>,
}

/// Something the server sent, owned and small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// CONNACK code.
    ConnAck(u8),
    /// PUBLISH; `redirect` when its topic ends in `/redirect`.
    Publish {
        /// QoS of the publish.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Topic ends in `/redirect`.
        redirect: bool,
    },
    /// SUBACK with its first code.
    SubAck(u8),
    /// PUBACK for a packet id.
    PubAck(u16),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT with reason.
    Disconnect(u8),
    /// Anything else.
    Other(u8),
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The harness asked the connection to stop.
    Stopped,
    /// A redirect arrived (PUBLISH on `…/redirect`, or v5 DISCONNECT 0x9D) at this instant.
    Redirect(Instant),
    /// The server sent DISCONNECT with this (non-redirect) reason.
    Disconnected(u8),
}

/// An established MQTT connection.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
    version: Version,
}

fn timed_out(phase: &'static str) -> Failure {
    Failure::new(phase, "timeout")
}

impl Ctx {
    /// Settings for a run over `devices`.
    pub fn new(
        servers: Vec<SocketAddr>,
        sources: Vec<IpAddr>,
        tls: TlsClient,
        version: Version,
        timeout: Duration,
        devices: Vec<Device>,
    ) -> Self {
        let configs = devices.iter().map(|_| OnceLock::new()).collect();
        Self {
            servers,
            sources,
            tls,
            version,
            keep_alive: 60,
            timeout,
            devices,
            configs,
        }
    }

    fn config(&self, index: usize) -> Arc<ClientConfig> {
        self.configs[index]
            .get_or_init(|| self.tls.for_device(&self.devices[index].key))
            .clone()
    }

    /// Connects device `index`: TCP, TLS, CONNECT → CONNACK. Returns the connection, the phase
    /// timings and the CONNACK code (non-zero codes are returned, not treated as errors).
    pub async fn open(&self, index: usize) -> Result<(Conn, Timings, u8), Failure> {
        let source = self.sources.get(index % self.sources.len().max(1)).copied();
        let server = self.servers[index % self.servers.len()];
        let t0 = Instant::now();
        let tcp = timeout(self.timeout, tcp_connect(server, source))
            .await
            .map_err(|_| timed_out("tcp"))?
            .map_err(|e| Failure::new("tcp", e))?;
        let t1 = Instant::now();
        let connector = TlsConnector::from(self.config(index));
        let stream = timeout(
            self.timeout,
            connector.connect(self.tls.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timed_out("tls"))?
        .map_err(|e| Failure::new("tls", e))?;
        let t2 = Instant::now();
        let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        let name = &self.devices[index].name;
        let (conn, code) =
            Conn::start(stream, self.version, name, self.keep_alive, self.timeout).await?;
        let timings = Timings {
            tcp: t1 - t0,
            tls: t2 - t1,
            connack: t2.elapsed(),
            resumed,
        };
        Ok((conn, timings, code))
    }
}

impl Conn {
    /// CONNECT → CONNACK over an established TLS stream, within `limit`; returns the
    /// connection and the CONNACK code.
    pub async fn start(
        stream: TlsStream<TcpStream>,
        version: Version,
        client_id: &str,
        keep_alive: u16,
        limit: Duration,
    ) -> Result<(Self, u8), Failure> {
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            version,
        };
        let mut out = Vec::with_capacity(24 + client_id.len());
        mqtt::connect(&mut out, version, client_id, keep_alive);
        let code = timeout(limit, conn.connack(&out))
            .await
            .map_err(|_| timed_out("connack"))??;
        Ok((conn, code))
    }

    /// Hands every complete packet in the buffer to `on`, reading from the socket first when
    /// there is none; returns how many were handled. Cancel-safe (only the read awaits).
    pub async fn read_batch(&mut self, mut on: impl FnMut(Packet<'_>)) -> Result<usize, Failure> {
        loop {
            let mut at = 0;
            let mut count = 0;
            while let Some((packet, used)) =
                mqtt::parse(&self.buf[at..], self.version).map_err(|e| Failure::new("mqtt", e))?
            {
                on(packet);
                at += used;
                count += 1;
            }
            self.buf.drain(..at);
            if count > 0 {
                return Ok(count);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(Failure::new("read", "closed by server")),
                Ok(_) => {}
                Err(e) => return Err(Failure::new("read", e)),
            }
        }
    }

    /// Writes `bytes` and flushes them through TLS.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| Failure::new("write", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| Failure::new("write", e))
    }

    async fn connack(&mut self, connect: &[u8]) -> Result<u8, Failure> {
        self.send(connect).await?;
        match self.next().await {
            Ok(Event::ConnAck(code)) => Ok(code),
            Ok(other) => Err(Failure::new("connack", format!("unexpected {other:?}"))),
            Err(f) => Err(Failure::new("connack", f.detail)),
        }
    }

    /// The next packet from the server. Cancel-safe: bytes read stay in the buffer.
    pub async fn next(&mut self) -> Result<Event, Failure> {
        loop {
            match mqtt::parse(&self.buf, self.version) {
                Ok(Some((packet, used))) => {
                    let event = match packet {
                        Packet::ConnAck(c) => Event::ConnAck(c),
                        Packet::Publish {
                            topic, qos, pkid, ..
                        } => Event::Publish {
                            qos,
                            pkid,
                            redirect: topic.ends_with(b"/redirect"),
                        },
                        Packet::SubAck(c) => Event::SubAck(c),
                        Packet::PubAck(id) => Event::PubAck(id),
                        Packet::PingResp => Event::PingResp,
                        Packet::Disconnect(r) => Event::Disconnect(r),
                        Packet::Other(t) => Event::Other(t),
                    };
                    self.buf.drain(..used);
                    if self.buf.is_empty() && self.buf.capacity() > 1024 {
                        self.buf = Vec::new(); // don't keep a large buffer while idle
                    }
                    return Ok(event);
                }
                Ok(None) => {}
                Err(e) => return Err(Failure::new("mqtt", e)),
            }
            let read = self.stream.read_buf(&mut self.buf).await;
            match read {
                Ok(0) => return Err(Failure::new("read", "closed by server")),
                Ok(_) => {}
                Err(e) => return Err(Failure::new("read", e)),
            }
        }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK; returns its code.
    pub async fn subscribe(&mut self, filter: &str, limit: Duration) -> Result<u8, Failure> {
        let mut out = Vec::with_capacity(16 + filter.len());
        mqtt::subscribe(&mut out, self.version, 1, filter);
        self.send(&out).await?;
        let wait = async {
            loop {
                match self.next().await? {
                    Event::SubAck(code) => return Ok(code),
                    Event::Publish { qos: 1, pkid, .. } => self.send(&mqtt::puback(pkid)).await?,
                    Event::Disconnect(r) => {
                        return Err(Failure::new("subscribe", format!("disconnect 0x{r:02X}")))
                    }
                    _ => {}
                }
            }
        };
        timeout(limit, wait)
            .await
            .map_err(|_| timed_out("subscribe"))?
    }

    /// Keeps the connection alive (PINGREQ every `keep_alive / 2`) and acknowledges QoS 1
    /// publishes until `stop`, a redirect (when `want_redirect`), or a server DISCONNECT.
    pub async fn hold(
        &mut self,
        keep_alive: Duration,
        stop: &CancellationToken,
        want_redirect: bool,
    ) -> Result<Held, Failure> {
        let period = keep_alive / 2;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(Held::Stopped),
                _ = ping.tick() => self.send(&mqtt::PINGREQ).await?,
                event = self.next() => match event? {
                    Event::Publish { qos, pkid, redirect } => {
                        let at = Instant::now();
                        let acked = if qos == 1 {
                            self.send(&mqtt::puback(pkid)).await
                        } else {
                            Ok(())
                        };
                        // A v5 lobby follows the redirect publish with DISCONNECT and closes
                        // at once, so the PUBACK may meet a closed socket: the redirect counts.
                        if redirect && want_redirect {
                            return Ok(Held::Redirect(at));
                        }
                        acked?;
                    }
                    Event::Disconnect(mqtt::REASON_SERVER_MOVED) if want_redirect => {
                        return Ok(Held::Redirect(Instant::now()));
                    }
                    Event::Disconnect(reason) => return Ok(Held::Disconnected(reason)),
                    _ => {}
                },
            }
        }
    }

    /// Sends DISCONNECT and waits (briefly) for the server to close first, so that TIME_WAIT
    /// lands on the server side and the harness' ephemeral ports are reusable at once.
    pub async fn close(mut self) {
        if self.send(&mqtt::DISCONNECT).await.is_err() {
            return;
        }
        let mut sink = [0u8; 64];
        let drain = async {
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = timeout(Duration::from_secs(1), drain).await;
    }
}
