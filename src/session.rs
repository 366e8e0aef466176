//! One device's MQTT session on the lobby, after its TLS handshake: CONNECT → route decision →
//! CONNACK, then wait (status, keep-alive, its own topics) until a redirect is due, the device
//! leaves, another connection takes over, or the lobby shuts down.
//!
//! The session never touches the store: it reads the claims map, and reports redirects through
//! the bounded activity channel. Control-plane changes arrive as wake-ups from the waiting room.

pub mod acl;
mod bridged;
mod connect;
mod end;
mod inbound;
mod outbound;
mod redirect;

use connect::{read_connect, refuse_connect, ConnectInfo};
pub use end::End;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

use crate::config::LimitsConfig;
use crate::device::Identity;
use crate::edge::EdgeContext;
use crate::model::ClaimState;
use crate::mqtt::codec::{self, Packet, Protocol};
use crate::mqtt::reason;
use crate::ratelimit::Pace;
use crate::route::{self, Route};
use crate::waiting::SessionHandle;
use acl::{Acl, Subscriptions};

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

/// Runs a device's session to its end over an established TLS stream: [`open`], then
/// [`wait`].
pub async fn run<S>(io: S, identity: Identity, ctx: Arc<EdgeContext>, accepted: Accepted) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match Box::pin(open(io, identity, ctx, accepted)).await {
        Ok(opened) => wait(opened).await,
        Err(end) => end,
    }
}

/// A session past CONNECT: registered in the waiting room, counted, its CONNACK sent (or its
/// start failed, `started`).
pub struct Opened<S> {
    session: Box<Session<S>>,
    started: Step,
}

/// The session after [`open`], to its end.
///
/// What stays resident while the device waits (most of its life) is kept small: this future
/// holds the session's box and the wait loop only (call it from a future whose own state is
/// small, not from the one that ran [`open`]: a future keeps room for everything it ever
/// held), and the loop boxes each handler it runs (see [`Session::run_loop`]).
pub async fn wait<S>(opened: Opened<S>) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Opened {
        session: mut s,
        started,
    } = opened;
    let proto_label = s.handle.protocol;
    let end = match started {
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

/// CONNECT → CONNACK over an established TLS stream. Box this future: it is large, and freed
/// once the session waits.
pub async fn open<S>(
    io: S,
    identity: Identity,
    ctx: Arc<EdgeContext>,
    accepted: Accepted,
) -> Result<Opened<S>, End>
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
        Err(end) => return Err(end),
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
        return Err(End::RateLimited);
    }
    let handle = ctx.waiting.register(
        identity.device_id,
        &identity.thing_name,
        proto_label,
        limits.reconnect_burst,
    );
    let mut s = Box::new(Session::new(
        io, rbuf, identity, ctx, &accepted, handle, &connect,
    ));
    metrics::gauge!(crate::metrics::CONNECTIONS_ACTIVE, "protocol" => proto_label).increment(1.0);
    let started = s.start(connect, accepted.tls_done).await;
    Ok(Opened {
        session: s,
        started,
    })
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
    /// Boxed: most sessions never bridge.
    bridge: Option<Box<bridged::BridgeLink>>,
    /// The last status sent, to send it again only on change.
    last_status: Option<(ClaimState, Option<Arc<str>>)>,
    client_max_packet: Option<u32>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Waits for the next thing to do and does it. Each handler runs boxed: inline, the largest
    /// of them (a publish through the bridge, a re-route) would size the wait of every idle
    /// connection.
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
                        Box::pin(self.on_input()).await
                    }
                    Err(_) => Err(End::Io),
                },
                () = wake.notified() => match self.handle.asked_to_leave() {
                    true => Box::pin(self.on_shutdown()).await,
                    false => Box::pin(self.reevaluate()).await,
                },
                event = std::future::poll_fn(|cx| bridged::poll_event(&mut self.bridge, cx)) => match event {
                    bridged::BridgeEvent::Inbound(msg) => {
                        self.deliver_inbound(msg);
                        Box::pin(self.flush()).await
                    }
                    bridged::BridgeEvent::Answered(pkid, outcome) => {
                        Box::pin(self.on_answered(pkid, outcome)).await
                    }
                    bridged::BridgeEvent::PoolGone => {
                        // The tenant's pool stopped (the lobby stops) before it answered: the
                        // device keeps the message and sends it again on its next connection.
                        self.send_disconnect(reason::SERVER_BUSY, None);
                        let _ = Box::pin(self.flush()).await;
                        Err(End::ServerBusy)
                    }
                },
                () = cancel.cancelled() => Box::pin(self.on_shutdown()).await,
                () = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    Box::pin(self.on_deadline()).await
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
    /// wakes the session, which then re-routes. A claim whose name the map does not know yet
    /// (loaded at start) is settled by the same message, every time the session finds it so.
    async fn name_claim_if_unnamed(&mut self, wait: bool) {
        let Some(claim) = self.ctx.cache.claim(&self.identity.device_id) else {
            return;
        };
        // A name only the store knows (the claim was loaded before this device was seen): the
        // certificate settles it, as it names an unnamed claim, and a wait here is the same.
        let unknown = claim.thing_name == route::ThingName::Unknown;
        let unnamed = !self.name_reported && claim.unnamed();
        if !unknown && !unnamed {
            return;
        }
        self.name_reported |= unnamed;
        // The same message hands the certificate to a registration waiting for it.
        self.cert_reported |= claim.state == ClaimState::Registering;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !wait {
            self.send_cert(Some(tx));
            return;
        }
        // At connect, a full activity queue (a reconnect storm after a restart, every claim's
        // name to settle) is waited for too, within the same bound.
        let seen = crate::waiting::Activity::CertSeen {
            device_id: self.identity.device_id,
            cert_der: self.identity.cert_der.clone(),
            named: Some(tx),
        };
        let activity = &self.ctx.activity;
        let _ = tokio::time::timeout(self.limits.connect_timeout, async {
            if activity.send(seen).await.is_ok() {
                let _ = rx.await;
            }
        })
        .await;
    }

    fn route(&self) -> Route {
        let id = &self.identity.device_id;
        let claim = self.ctx.cache.claim(id);
        let tenant = claim
            .as_ref()
            .and_then(|c| c.tenant_id())
            .and_then(|t| self.ctx.cache.tenant(t));
        route::decide(
            claim.as_ref(),
            tenant.as_ref().map(|t| &t.tenant),
            &self.identity.thing_name,
        )
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
