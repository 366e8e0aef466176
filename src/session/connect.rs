//! The CONNECT phase of a session: reading CONNECT under the connect timeout, refusing it, and
//! answering it (CONNACK, or CONNACK 0x9D for a v5 device with a due redirect).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};

use super::acl::{Acl, Subscriptions};
use super::{status_key, Accepted, End, Session, Step};
use crate::config::LimitsConfig;
use crate::device::Identity;
use crate::edge::EdgeContext;
use crate::mqtt::codec::{self, CodecError, Connect, Packet, Protocol};
use crate::mqtt::reason;
use crate::ratelimit::Pace;
use crate::route::{self, Route};
use crate::waiting::SessionHandle;

/// What the session keeps of CONNECT: no byte field of the packet (see [`run`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectInfo {
    pub(super) protocol: Protocol,
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
pub(super) async fn read_connect<S>(
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

/// Refuses a CONNECT with `v5_code` (3.1.1: its own code for it), then the caller closes.
pub(super) async fn refuse_connect<S: AsyncWrite + Unpin>(
    io: &mut S,
    protocol: Protocol,
    v5_code: u8,
) {
    let connack = Packet::ConnAck(codec::ConnAck {
        session_present: false,
        code: reason::connack(protocol, v5_code),
        properties: Default::default(),
    });
    let mut out = BytesMut::new();
    if codec::encode(&connack, protocol, &mut out).is_ok() {
        let _ = io.write_all(&out).await;
        let _ = io.flush().await;
    }
}

/// Answers an unusable CONNECT: a 3.1.1 CONNACK "unacceptable protocol version" for an unknown
/// protocol level (the one refusal every version understands), nothing otherwise (the
/// connection just closes).
async fn connect_refused<S: AsyncWrite + Unpin>(io: &mut S, e: CodecError) {
    if let CodecError::UnsupportedProtocol(_) = e {
        refuse_connect(io, Protocol::V311, reason::UNSUPPORTED_PROTOCOL_VERSION).await;
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The session of a device whose CONNECT was read, before it is answered.
    pub(super) fn new(
        io: S,
        rbuf: BytesMut,
        identity: Identity,
        ctx: Arc<EdgeContext>,
        accepted: &Accepted,
        handle: SessionHandle,
        connect: &ConnectInfo,
    ) -> Self {
        let (limits, protocol) = (accepted.limits.clone(), connect.protocol);
        let compat_topic = ctx
            .compat_aws_device_lobby
            .then(|| format!("lobby/{}", identity.thing_name));
        let max_idle = (!limits.max_idle.is_zero()).then_some(limits.max_idle);
        let (publish_pace, publish_bytes_pace) = (
            Pace::new(limits.publish_rate),
            Pace::new(limits.publish_bytes_rate),
        );
        Session {
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
        }
    }

    /// Answers CONNECT: a v5 device with a due redirect gets CONNACK 0x9D and leaves.
    pub(super) async fn start(&mut self, connect: ConnectInfo, tls_done: Instant) -> Step {
        if self.protocol == Protocol::V5 && connect.has_auth_method {
            self.send_connack(reason::BAD_AUTH_METHOD, None, None);
            self.flush().await?;
            return Err(End::ProtocolError);
        }
        self.name_claim_if_unnamed(true).await;
        let route = self.route();
        match (&route, self.protocol) {
            (Route::Refuse, _) => {
                self.send_connack(reason::NOT_AUTHORIZED, None, None);
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
}
