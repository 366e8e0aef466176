//! One device's MQTT session on the lobby, after its TLS handshake: CONNECT → route decision →
//! CONNACK, then wait (status, keep-alive, its own topics) until a redirect is due, the device
//! leaves, another connection takes over, or the lobby shuts down.
//!
//! The session never touches the store: it reads the claims map, and reports redirects through
//! the bounded activity channel. Control-plane changes arrive as wake-ups from the waiting room.

pub mod acl;
mod bridged;
mod inbound;
mod outbound;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

use crate::config::LimitsConfig;
use crate::device::Identity;
use crate::edge::EdgeContext;
use crate::model::ClaimState;
use crate::mqtt::codec::{self, CodecError, Connect, Packet, Protocol};
use crate::ratelimit::Pace;
use crate::route::{self, Redirect, Route};
use crate::waiting::SessionHandle;
use acl::{Acl, Subscriptions};

/// v5 reason codes the session sends.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    /// v3.1.1 CONNACK return code 3.
    pub const V3_SERVER_UNAVAILABLE: u8 = 0x03;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    /// v3.1.1 CONNACK return code 5.
    pub const V3_NOT_AUTHORIZED: u8 = 0x05;
}

/// Why a session ended (the `outcome` label of `lobby_connections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Closed,
    Redirected,
    TakenOver,
    Revoked,
    KeepAliveTimeout,
    ConnectTimeout,
    ProtocolError,
    Forbidden,
    Shutdown,
    /// Bridge mode: more un-acknowledged publishes than the device may have in flight.
    QuotaExceeded,
    /// Bridge mode: the tenant's upstream queue is full.
    ServerBusy,
    /// Bridge mode, v3.1.1: a publish the tenant's broker never took (it closed the
    /// connection on each of `limits.bridge_max_redeliveries` re-sends).
    BridgeRejected,
    /// The device reconnects faster than `limits.reconnect_*` allow.
    RateLimited,
    /// Nothing received for `limits.max_idle`.
    IdleTimeout,
    Io,
}

impl End {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Redirected => "redirected",
            End::TakenOver => "taken_over",
            End::Revoked => "revoked",
            End::KeepAliveTimeout => "keepalive_timeout",
            End::ConnectTimeout => "connect_timeout",
            End::ProtocolError => "protocol_error",
            End::Forbidden => "forbidden",
            End::Shutdown => "shutdown",
            End::QuotaExceeded => "quota_exceeded",
            End::ServerBusy => "server_busy",
            End::BridgeRejected => "bridge_rejected",
            End::RateLimited => "rate_limited",
            End::IdleTimeout => "idle_timeout",
            End::Io => "io_error",
        }
    }
}

/// How the connection got in: when its handshake finished, under which trust and limits.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub tls_done: Instant,
    /// The generation of the trust its certificate was verified against.
    pub trust_generation: u64,
    /// The limits this connection lives by, taken once at accept: a reload meanwhile does
    /// not change them.
    pub limits: Arc<LimitsConfig>,
}

/// Control flow inside the session: keep going, or end with a reason.
type Step = Result<(), End>;

/// Runs a device's session to its end over an established TLS stream.
pub async fn run<S>(io: S, identity: Identity, ctx: Arc<EdgeContext>, accepted: Accepted) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut io = io;
    let limits = accepted.limits.clone();
    // What the session needs of CONNECT, taken out: the packet's byte fields (password, will,
    // authentication data) share the read buffer's allocation and would pin it for the
    // session's life.
    let connect = match read_connect(&mut io, &mut rbuf, &limits).await {
        Ok(c) => ConnectInfo::from(c),
        Err(end) => return end,
    };
    let protocol = connect.protocol;
    let proto_label = match protocol {
        Protocol::V311 => "mqtt3.1.1",
        Protocol::V5 => "mqtt5",
    };
    if !ctx.waiting.admit(
        &identity.device_id,
        limits.reconnect_burst,
        limits.reconnect_interval,
    ) {
        // A reconnect loop: refused before it takes over the device's live session.
        refuse_connect(&mut io, protocol, reason::CONNECTION_RATE_EXCEEDED).await;
        return End::RateLimited;
    }
    let handle = ctx.waiting.register(
        identity.device_id,
        &identity.thing_name,
        proto_label,
        limits.reconnect_burst,
    );
    let compat_topic = ctx
        .compat_aws_device_lobby
        .then(|| format!("lobby/{}", identity.thing_name));
    let max_idle = (!limits.max_idle.is_zero()).then_some(limits.max_idle);
    let (publish_pace, publish_bytes_pace) = (
        Pace::new(limits.publish_rate),
        Pace::new(limits.publish_bytes_rate),
    );
    let mut s = Session {
        io,
        rbuf,
        wbuf: BytesMut::new(),
        protocol,
        acl: Acl::new(route::device_prefix(&identity.device_id), compat_topic),
        identity,
        ctx,
        limits,
        handle,
        subs: Subscriptions::default(),
        keep_alive: keep_alive_window(connect.keep_alive),
        max_idle,
        last_rx: Instant::now(),
        publish_pace,
        publish_bytes_pace,
        paused_until: None,
        next_pkid: 0,
        redirect_pkid: None,
        redirect_sent: None,
        redirect_deadline: None,
        due_redirect: None,
        cert_reported: false,
        name_reported: false,
        trust_generation: accepted.trust_generation,
        bridge: None,
        last_status: None,
        client_max_packet: connect.client_max_packet,
    };
    metrics::gauge!(crate::metrics::CONNECTIONS_ACTIVE, "protocol" => proto_label).increment(1.0);
    let end = match s.start(connect, accepted.tls_done).await {
        Ok(()) => {
            s.release_idle_read_buffer();
            s.run_loop().await
        }
        Err(end) => end,
    };
    metrics::gauge!(crate::metrics::CONNECTIONS_ACTIVE, "protocol" => proto_label).decrement(1.0);
    s.detach_bridge();
    s.ctx
        .waiting
        .deregister(&s.identity.device_id, s.handle.conn_id);
    let _ = timeout(Duration::from_secs(1), s.io.shutdown()).await;
    end
}

/// What the session keeps of CONNECT: no byte field of the packet (see [`run`]).
#[derive(Debug, Clone, Copy)]
struct ConnectInfo {
    protocol: Protocol,
    keep_alive: u16,
    client_id_empty: bool,
    has_auth_method: bool,
    client_max_packet: Option<u32>,
}

impl From<Connect> for ConnectInfo {
    fn from(c: Connect) -> Self {
        Self {
            protocol: c.protocol,
            keep_alive: c.keep_alive,
            client_id_empty: c.client_id.is_empty(),
            has_auth_method: c.properties.authentication_method.is_some(),
            client_max_packet: c.properties.maximum_packet_size,
        }
    }
}

/// MQTT allows 1.5 × keep-alive of silence; 0 turns the check off.
fn keep_alive_window(keep_alive: u16) -> Option<Duration> {
    (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500))
}

/// Reads the first packet, which must be CONNECT, under `limits.connect_timeout`.
async fn read_connect<S>(
    io: &mut S,
    rbuf: &mut BytesMut,
    limits: &LimitsConfig,
) -> Result<Connect, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = limits.max_packet_size;
    let read = async {
        loop {
            match codec::decode(rbuf, None, max) {
                Ok(Some(Packet::Connect(c))) => return Ok(c),
                Ok(Some(_)) => return Err(End::ProtocolError),
                Ok(None) => {}
                Err(e) => {
                    connect_refused(io, e).await;
                    return Err(End::ProtocolError);
                }
            }
            match io.read_buf(rbuf).await {
                Ok(0) => return Err(End::Closed),
                Ok(_) => {}
                Err(_) => return Err(End::Io),
            }
        }
    };
    timeout(limits.connect_timeout, read)
        .await
        .unwrap_or(Err(End::ConnectTimeout))
}

/// Refuses a CONNECT with `v5_code` (v3.1.1: "server unavailable"), then the caller closes.
async fn refuse_connect<S: AsyncWrite + Unpin>(io: &mut S, protocol: Protocol, v5_code: u8) {
    let code = match protocol {
        Protocol::V311 => reason::V3_SERVER_UNAVAILABLE,
        Protocol::V5 => v5_code,
    };
    let connack = Packet::ConnAck(codec::ConnAck {
        session_present: false,
        code,
        properties: Default::default(),
    });
    let mut out = BytesMut::new();
    if codec::encode(&connack, protocol, &mut out).is_ok() {
        let _ = io.write_all(&out).await;
        let _ = io.flush().await;
    }
}

/// Answers an unusable CONNECT: v3.1.1 return code 1 for an unknown protocol level (the one
/// refusal both versions understand), nothing otherwise (the connection just closes).
async fn connect_refused<S: AsyncWrite + Unpin>(io: &mut S, e: CodecError) {
    if let CodecError::UnsupportedProtocol(_) = e {
        let _ = io.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
        let _ = io.flush().await;
    }
}

struct Session<S> {
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    protocol: Protocol,
    identity: Identity,
    acl: Acl,
    ctx: Arc<EdgeContext>,
    limits: Arc<LimitsConfig>,
    handle: SessionHandle,
    subs: Subscriptions,
    keep_alive: Option<Duration>,
    /// `limits.max_idle`, when set: the cap on silence whatever the keep-alive.
    max_idle: Option<Duration>,
    last_rx: Instant,
    /// `limits.publish_rate` and `limits.publish_bytes_rate`, when set.
    publish_pace: Option<Pace>,
    publish_bytes_pace: Option<Pace>,
    /// Over a publish rate: nothing more is read or decoded until then (backpressure).
    paused_until: Option<Instant>,
    next_pkid: u16,
    /// The packet id of the redirect publish awaiting PUBACK (v3.1.1 closes on it).
    redirect_pkid: Option<u16>,
    /// The redirect already sent in this session (sent once per redirect id).
    redirect_sent: Option<String>,
    /// v3.1.1: when the lobby closes a redirected device that has not acknowledged.
    redirect_deadline: Option<Instant>,
    /// The redirect this session has acted on (published where subscribed, grace armed).
    due_redirect: Option<String>,
    /// The certificate went to the control plane for a waiting registration.
    cert_reported: bool,
    /// The certificate went to the control plane to name an unnamed claim.
    name_reported: bool,
    /// The trust generation this device's certificate was last checked against.
    trust_generation: u64,
    /// Set while the device's tenant bridges its traffic.
    bridge: Option<bridged::BridgeLink>,
    /// The last status sent, to send it again only on change.
    last_status: Option<(ClaimState, Option<Arc<str>>)>,
    client_max_packet: Option<u32>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Answers CONNECT: a v5 device with a due redirect gets CONNACK 0x9D and leaves.
    async fn start(&mut self, connect: ConnectInfo, tls_done: Instant) -> Step {
        if self.protocol == Protocol::V5 && connect.has_auth_method {
            self.send_connack(reason::BAD_AUTH_METHOD, None, None);
            self.flush().await?;
            return Err(End::ProtocolError);
        }
        self.name_claim_if_unnamed(true).await;
        let route = self.route();
        match (&route, self.protocol) {
            (Route::Refuse, _) => {
                let code = match self.protocol {
                    Protocol::V311 => reason::V3_NOT_AUTHORIZED,
                    Protocol::V5 => reason::NOT_AUTHORIZED,
                };
                self.send_connack(code, None, None);
                self.flush().await?;
                Err(End::Revoked)
            }
            (Route::Redirect(r), Protocol::V5) => {
                self.send_connack(reason::SERVER_MOVED, Some(r), None);
                self.flush().await?;
                self.redirected(r, "connack");
                Err(End::Redirected)
            }
            _ => {
                let _no_link_yet = self.follow_bridge(&route);
                let assigned = (self.protocol == Protocol::V5 && connect.client_id_empty)
                    .then(|| self.identity.device_id.to_hex());
                self.send_connack(reason::SUCCESS, None, assigned);
                self.flush().await?;
                if let Route::Redirect(r) = &route {
                    // v3.1.1 with a due redirect: it comes on subscribe, within the grace.
                    self.due_redirect = Some(r.redirect_id.clone());
                    self.arm_redirect_grace();
                }
                metrics::histogram!(crate::metrics::CONNECT_DURATION_SECONDS)
                    .record(tls_done.elapsed().as_secs_f64());
                self.last_status = Some(status_key(&route));
                self.report_cert_if_registering(&route);
                Ok(())
            }
        }
    }

    async fn run_loop(&mut self) -> End {
        let cancel = self.ctx.cancel.clone();
        let wake = self.handle.wake.clone();
        loop {
            let deadline = self.next_deadline();
            let step = tokio::select! {
                read = self.io.read_buf(&mut self.rbuf), if self.paused_until.is_none() => match read {
                    Ok(0) => Err(End::Closed),
                    Ok(_) => {
                        self.last_rx = Instant::now();
                        self.on_input().await
                    }
                    Err(_) => Err(End::Io),
                },
                () = wake.notified() => self.reevaluate().await,
                event = bridged::next_event(&mut self.bridge) => match event {
                    bridged::BridgeEvent::Inbound(msg) => {
                        self.deliver_inbound(msg);
                        self.flush().await
                    }
                    bridged::BridgeEvent::Answered(pkid, outcome) => {
                        self.on_answered(pkid, outcome).await
                    }
                    bridged::BridgeEvent::PoolGone => {
                        // The tenant's pool stopped (the lobby stops) before it answered: the
                        // device keeps the message and sends it again on its next connection.
                        self.send_disconnect(reason::SERVER_BUSY, None);
                        let _ = self.flush().await;
                        Err(End::ServerBusy)
                    }
                },
                () = cancel.cancelled() => self.on_shutdown().await,
                () = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.on_deadline().await
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// The earliest of the keep-alive, idle, redirect-grace and end-of-pause deadlines. While
    /// paused nothing is read, so silence is not counted.
    fn next_deadline(&self) -> Option<Instant> {
        if self.paused_until.is_some() {
            return [self.paused_until, self.redirect_deadline]
                .into_iter()
                .flatten()
                .min();
        }
        let ka = self.keep_alive.map(|w| self.last_rx + w);
        let idle = self.max_idle.map(|m| self.last_rx + m);
        [ka, idle, self.redirect_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    async fn on_deadline(&mut self) -> Step {
        let now = Instant::now();
        if self.redirect_deadline.is_some_and(|d| d <= now) {
            return Err(End::Redirected);
        }
        if let Some(until) = self.paused_until {
            if until <= now {
                // Back within the publish rates: what is buffered first, then reading again;
                // the device was not silent while the lobby did not read.
                self.paused_until = None;
                self.last_rx = now;
                return self.on_input().await;
            }
            return Ok(());
        }
        let silent_for = |d: Option<Duration>| d.is_some_and(|d| self.last_rx + d <= now);
        if silent_for(self.keep_alive) || silent_for(self.max_idle) {
            let end = if silent_for(self.keep_alive) {
                End::KeepAliveTimeout
            } else {
                End::IdleTimeout
            };
            self.send_disconnect(reason::KEEP_ALIVE_TIMEOUT, None);
            let _ = self.flush().await;
            return Err(end);
        }
        Ok(())
    }

    async fn on_shutdown(&mut self) -> Step {
        let reference = self.ctx.shutdown_server_reference.clone();
        match reference {
            Some(r) => self.send_disconnect(reason::USE_ANOTHER_SERVER, Some(r)),
            None => self.send_disconnect(reason::SERVER_SHUTTING_DOWN, None),
        }
        let _ = self.flush().await;
        Err(End::Shutdown)
    }

    /// Decodes and handles every complete packet buffered.
    async fn on_input(&mut self) -> Step {
        // Over a publish rate: the rest stays buffered (and the socket unread) until the pause.
        while self.paused_until.is_none() {
            let packet = match codec::decode(
                &mut self.rbuf,
                Some(self.protocol),
                self.limits.max_packet_size,
            ) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "malformed packet");
                    self.send_disconnect(e.reason_code(), None);
                    let _ = self.flush().await;
                    return Err(End::ProtocolError);
                }
            };
            self.on_packet(packet).await?;
        }
        self.release_idle_read_buffer();
        self.flush().await
    }

    async fn on_packet(&mut self, packet: Packet) -> Step {
        match packet {
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Publish(p) => {
                self.pace_publish(&p);
                self.on_publish(p).await
            }
            Packet::PubAck(ack) => {
                if self.redirect_pkid == Some(ack.pkid) && self.protocol == Protocol::V311 {
                    return Err(End::Redirected);
                }
                Ok(())
            }
            Packet::Subscribe(sub) => self.on_subscribe(sub),
            Packet::Unsubscribe(unsub) => {
                self.on_unsubscribe(unsub);
                Ok(())
            }
            Packet::Disconnect(_) => Err(End::Closed),
            _ => {
                self.send_disconnect(reason::PROTOCOL_ERROR, None);
                let _ = self.flush().await;
                Err(End::ProtocolError)
            }
        }
    }

    /// Re-reads the claims map after a wake-up and acts on any change.
    async fn reevaluate(&mut self) -> Step {
        if !self
            .ctx
            .waiting
            .is_current(&self.identity.device_id, self.handle.conn_id)
        {
            self.send_disconnect(reason::SESSION_TAKEN_OVER, None);
            let _ = self.flush().await;
            return Err(End::TakenOver);
        }
        let route = self.route();
        if route == Route::Refuse || !self.still_trusted() {
            self.send_disconnect(reason::NOT_AUTHORIZED, None);
            let _ = self.flush().await;
            return Err(End::Revoked);
        }
        self.report_cert_if_registering(&route);
        self.name_claim_if_unnamed(false).await;
        let replaced = self.follow_bridge(&route);
        self.carry_over(replaced).await?;
        let key = status_key(&route);
        if self.last_status.as_ref() != Some(&key) {
            self.last_status = Some(key.clone());
            self.publish_status(key.0, key.1.as_deref());
        }
        match &route {
            Route::Redirect(r) if self.due_redirect.as_deref() != Some(r.redirect_id.as_str()) => {
                // A redirect became due (a claim, or a migration replacing an earlier one).
                self.due_redirect = Some(r.redirect_id.clone());
                self.publish_redirect(r);
                if self.protocol == Protocol::V5 {
                    self.send_disconnect(reason::SERVER_MOVED, Some(r.server_reference()));
                    self.flush().await?;
                    self.redirected(r, "disconnect");
                    return Err(End::Redirected);
                }
                self.redirect_deadline = Some(Instant::now() + self.limits.redirect_grace);
            }
            Route::Redirect(_) => {}
            // Unclaimed again, or waiting on registration: nothing is due any more, and the
            // device may wait as long as it keeps alive.
            _ => self.withdraw_redirect(),
        }
        self.flush().await
    }

    /// After a trust reload: is this device's certificate still accepted (CA still configured,
    /// not on a new CRL, still valid)? Checked once per reload.
    fn still_trusted(&mut self) -> bool {
        let trust = self.ctx.trust.load();
        if trust.generation == self.trust_generation {
            return true;
        }
        self.trust_generation = trust.generation;
        trust.still_trusts(&self.identity)
    }

    /// v3.1.1: the device has `limits.redirect_grace` to take a due redirect; a new redirect
    /// (migration) starts a new grace, a re-subscribe does not extend it.
    fn arm_redirect_grace(&mut self) {
        if self.protocol == Protocol::V311 && self.redirect_deadline.is_none() {
            self.redirect_deadline = Some(Instant::now() + self.limits.redirect_grace);
        }
    }

    /// A registration may be waiting for this device's certificate: hand it over, once.
    fn report_cert_if_registering(&mut self, route: &Route) {
        let registering = matches!(
            route,
            Route::Wait {
                state: ClaimState::Registering,
                ..
            }
        );
        if registering && !self.cert_reported {
            self.cert_reported = true;
            self.send_cert(None);
        }
    }

    /// Hands this device's certificate to the control plane, which names an unnamed claim
    /// from it and gives it to a registration waiting for it (both, when both apply); `named`
    /// hears when the naming is done. False when the activity channel is full.
    fn send_cert(&self, named: Option<tokio::sync::oneshot::Sender<()>>) -> bool {
        self.ctx
            .activity
            .try_send(crate::waiting::Activity::CertSeen {
                device_id: self.identity.device_id,
                cert_der: self.identity.cert_der.clone(),
                named,
            })
            .is_ok()
    }

    /// A claim made before its device was ever seen (and without its certificate) has no
    /// thing name: have it named from this certificate, once. At connect (`wait`) the session
    /// waits for that (bounded by `limits.connect_timeout`), so its redirect or bridge topics
    /// carry the claim's name (unique in the tenant), not the certificate's; later the commit
    /// wakes the session, which then re-routes.
    async fn name_claim_if_unnamed(&mut self, wait: bool) {
        if self.name_reported {
            return;
        }
        let Some(claim) = self.ctx.cache.claim(&self.identity.device_id) else {
            return;
        };
        if !claim.unnamed() {
            return;
        }
        self.name_reported = true;
        // The same message hands the certificate to a registration waiting for it.
        self.cert_reported |= claim.state == ClaimState::Registering;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.send_cert(Some(tx));
        if sent && wait {
            let _ = tokio::time::timeout(self.limits.connect_timeout, rx).await;
        }
    }

    fn withdraw_redirect(&mut self) {
        self.due_redirect = None;
        self.redirect_sent = None;
        self.redirect_pkid = None;
        self.redirect_deadline = None;
    }

    fn route(&self) -> Route {
        let id = &self.identity.device_id;
        let claim = self.ctx.cache.claim(id);
        let tenant = claim
            .as_ref()
            .and_then(|c| c.tenant_id())
            .and_then(|t| self.ctx.cache.tenant(t));
        route::decide(
            claim.as_deref(),
            tenant.as_ref().map(|t| &t.tenant),
            &self.identity.thing_name,
        )
    }

    /// Records a delivered redirect: metrics and the claim's `redirected_at`.
    fn redirected(&mut self, r: &Redirect, kind: &'static str) {
        crate::metrics::redirect(kind);
        if self.redirect_sent.as_deref() == Some(r.redirect_id.as_str()) && kind == "disconnect" {
            return; // the publish already counted this redirect
        }
        self.redirect_sent = Some(r.redirect_id.clone());
        let now = crate::model::now_ms();
        let waited = (now - r.issued_at).max(0) as f64 / 1000.0;
        metrics::histogram!(crate::metrics::CLAIM_TO_REDIRECT_SECONDS).record(waited);
        let _ = self
            .ctx
            .activity
            .try_send(crate::waiting::Activity::Redirected {
                device_id: self.identity.device_id,
                redirect_id: r.redirect_id.clone(),
                at: now,
            });
    }

    /// An empty read buffer holds no memory while the device is quiet (most of its life); the
    /// next read allocates what it needs.
    fn release_idle_read_buffer(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
    }

    async fn flush(&mut self) -> Step {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        // A device that stops reading must not pin the session forever.
        match timeout(self.limits.connect_timeout, write).await {
            Ok(Ok(())) => {
                // Most sessions then sit idle for hours: give the buffer back.
                self.wbuf = BytesMut::new();
                Ok(())
            }
            _ => Err(End::Io),
        }
    }
}

fn status_key(route: &Route) -> (ClaimState, Option<Arc<str>>) {
    let (state, tenant) = route.status();
    (state, tenant.map(Arc::from))
}

fn codec_topic_match(filter: &str, topic: &str) -> bool {
    crate::mqtt::topic::filter_matches(filter, topic)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
