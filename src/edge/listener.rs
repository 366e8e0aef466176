//! The MQTT/TLS accept loop and the per-connection task.
//!
//! A connection permit is taken before `accept` (`limits.max_connections`), so a full lobby
//! stops accepting instead of accepting and dropping. The PROXY header and the TLS handshake
//! run in the connection's own task, never in the accept loop, under one deadline
//! (`limits.handshake_timeout` from accept) and within the handshake budget
//! (`limits.max_handshakes`, see [`super::handshakes`]). Device sockets get TCP keepalive, so a
//! peer that vanished is found even when its MQTT keep-alive is 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handshakes::{HandshakeSlot, Handshakes};
use super::record::{self, Established, TlsStream};
use super::EdgeContext;
use crate::device::Identity;
use crate::metrics;
use crate::session;

/// TCP keepalive on device sockets: the first probe after this much silence…
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(300);
/// …then one probe per interval…
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// …and the kernel closes the socket after this many unanswered probes (about 7 min in all).
/// Five minutes of silence keeps probes off a cellular device's radio in normal operation.
const TCP_KEEPALIVE_RETRIES: u32 = 4;

/// Accepts device connections on `listener` until the lobby starts to stop (`ctx.stopping`);
/// `proxy_protocol`: every connection starts with a PROXY v2 header. The MQTT listeners share
/// the connection permits and the handshake budget (`handshakes`).
pub async fn serve(
    listener: TcpListener,
    proxy_protocol: bool,
    ctx: Arc<EdgeContext>,
    handshakes: Arc<Handshakes>,
    tracker: TaskTracker,
) {
    let permits = ctx.permits.clone();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = ctx.stopping.cancelled() => return,
        };
        // A full budget of young handshakes is waited for (see `handshakes`): the storm
        // waits in the backlog instead of closing handshakes half done.
        let budget = handshake_budget(&ctx.limits.load());
        tokio::select! {
            () = handshakes.room(budget) => {}
            () = ctx.stopping.cancelled() => return,
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = ctx.stopping.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // Without a PROXY header the source is known now: a flood from one address
                // costs an accept and a close, and takes no place in the handshake budget.
                if !proxy_protocol && !ctx.connect_limiter.load().allow(peer.ip()) {
                    metrics::handshake_failure("rate_limited");
                    tracing::debug!(%peer, "connection rate of this address exceeded");
                    continue;
                }
                // The place is taken here, not in the connection's task: the next `room`
                // then counts it.
                let (slot, evicted) = handshakes.start(budget);
                for _ in 0..evicted {
                    metrics::handshake_failure("busy");
                }
                device_socket_options(&tcp);
                let trust = ctx.trust.load();
                let tls = trust.server_config.clone();
                let generation = trust.generation;
                let span = tracing::debug_span!(
                    "conn",
                    %peer,
                    client = tracing::field::Empty,
                    device_id = tracing::field::Empty
                );
                let conn = Conn {
                    peer,
                    proxy_protocol,
                    tls,
                    trust_generation: generation,
                    _permit: permit,
                };
                tracker.spawn(connection(tcp, conn, ctx.clone(), slot).instrument(span));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Handshakes allowed at once: `limits.max_handshakes`, and never more than half of
/// `limits.max_connections` (a small lobby with the default budget would otherwise let stalled
/// handshakes take every connection permit).
fn handshake_budget(limits: &crate::config::LimitsConfig) -> usize {
    limits.max_handshakes.min(limits.max_connections / 2).max(1)
}

/// Sets what every device socket gets: no Nagle delay, and TCP keepalive.
fn device_socket_options(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// An accepted connection, before its handshake.
struct Conn {
    peer: SocketAddr,
    /// Its listener expects a PROXY v2 header.
    proxy_protocol: bool,
    tls: Arc<rustls::ServerConfig>,
    trust_generation: u64,
    /// Held for the connection's life (`limits.max_connections`).
    _permit: OwnedSemaphorePermit,
}

/// Why a handshake did not finish: the `reason` label of the failure metric.
struct Refused(&'static str);

async fn connection(tcp: TcpStream, conn: Conn, ctx: Arc<EdgeContext>, slot: HandshakeSlot) {
    // The handshake and CONNECT run in a boxed future that is gone before the wait: this
    // task then holds little more than the session's box (see `session::wait`), not room for
    // everything the handshake needed.
    let end = match Box::pin(admit(tcp, &conn, ctx, slot)).await {
        None => return,
        Some(Opened::Mqtt(opened)) => session::wait(opened).await,
        Some(Opened::Ended(end)) => end,
    };
    metrics::connection_outcome(end.label());
    tracing::debug!(outcome = end.label(), "connection closed");
}

/// The PROXY header, the TLS handshake (in `slot`, its place in the handshake budget) and
/// the session's start; `None` when the handshake failed (counted by reason).
async fn admit(
    tcp: TcpStream,
    conn: &Conn,
    ctx: Arc<EdgeContext>,
    slot: HandshakeSlot,
) -> Option<Opened> {
    let started = Instant::now();
    let peer = conn.peer;
    // The connection's limits, from accept to close (a reload applies to the next ones).
    let limits = ctx.limits.load_full();
    // One deadline for the PROXY header and the TLS handshake together.
    let deadline = started + limits.handshake_timeout;
    let handshake = tokio::time::timeout_at(deadline, handshake(tcp, conn, &ctx));
    let established = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            Ok(Err(Refused(reason))) => {
                metrics::handshake_failure(reason);
                return None;
            }
            Err(_) => {
                metrics::handshake_failure("timeout");
                tracing::debug!(%peer, "handshake timed out");
                return None;
            }
        },
        // Counted by the connection that took the place.
        () = slot.evicted.cancelled() => {
            tracing::debug!(%peer, "handshake closed: handshake budget full, this the oldest");
            return None;
        }
    };
    slot.finished();
    let tls_done = Instant::now();
    ::metrics::histogram!(metrics::TLS_HANDSHAKE_DURATION_SECONDS)
        .record((tls_done - started).as_secs_f64());
    let Established {
        stream,
        peer_certificates,
        alpn,
        resumed,
    } = established;
    // The chain as the device sent it (from the ticket, when resumed): leaf, intermediates.
    let Some(identity) = Identity::from_chain(&peer_certificates) else {
        metrics::handshake_failure("no_certificate");
        return None;
    };
    drop(peer_certificates);
    // A resumed session skipped certificate verification: check revocation (also for full
    // handshakes, in case it changed during the handshake) and the validity period again.
    if ctx.cache.is_revoked(&identity.device_id) {
        metrics::handshake_failure("revoked");
        return None;
    }
    if resumed && !identity.valid_at(crate::model::now_ms() / 1000) {
        metrics::handshake_failure("expired");
        return None;
    }
    metrics::handshake(if resumed { "resumed" } else { "full" });
    tracing::Span::current().record("device_id", tracing::field::display(&identity.device_id));
    let accepted = session::Accepted {
        tls_done,
        trust_generation: conn.trust_generation,
        limits,
    };
    Some(open_session(stream, alpn, identity, ctx, accepted).await)
}

/// A connection after its handshake: an MQTT session past CONNECT, or an end (a WebSocket
/// session is run to its end here).
enum Opened {
    Mqtt(session::Opened<TlsStream>),
    Ended(session::End),
}

/// Opens the device's session over MQTT or, by ALPN `http/1.1` (or, without ALPN, a first
/// byte of an HTTP request), runs it over a WebSocket ([`super::ws`]).
async fn open_session(
    mut stream: TlsStream,
    alpn: Option<Vec<u8>>,
    identity: crate::device::Identity,
    ctx: Arc<EdgeContext>,
    accepted: session::Accepted,
) -> Opened {
    let wait = accepted.limits.connect_timeout;
    let websocket = match alpn.as_deref() {
        Some(b"http/1.1") => true,
        Some(_) => false,
        None => match tokio::time::timeout(wait, stream.fill()).await {
            Ok(Ok(true)) => super::ws::looks_like_http(stream.buffered()),
            Ok(Ok(false)) => return Opened::Ended(session::End::Closed),
            Ok(Err(_)) => return Opened::Ended(session::End::Io),
            Err(_) => return Opened::Ended(session::End::ConnectTimeout),
        },
    };
    if websocket {
        // Boxed: tungstenite's state would otherwise size every connection's future.
        let end = Box::pin(over_websocket(stream, identity, ctx, accepted)).await;
        return Opened::Ended(end);
    }
    match session::open(stream, identity, ctx, accepted).await {
        Ok(opened) => Opened::Mqtt(opened),
        Err(end) => Opened::Ended(end),
    }
}

/// The WebSocket upgrade under `limits.connect_timeout`, then the session over it.
async fn over_websocket<S>(
    io: S,
    identity: crate::device::Identity,
    ctx: Arc<EdgeContext>,
    accepted: session::Accepted,
) -> session::End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let limits = accepted.limits.clone();
    let upgrade = super::ws::accept(io, limits.max_packet_size);
    match tokio::time::timeout(limits.connect_timeout, upgrade).await {
        Ok(Ok(ws)) => session::run(ws, identity, ctx, accepted).await,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "WebSocket upgrade refused");
            session::End::ProtocolError
        }
        Err(_) => session::End::ConnectTimeout,
    }
}

/// The PROXY header (when configured), the address rate limit behind a balancer, then TLS.
async fn handshake(
    mut tcp: TcpStream,
    conn: &Conn,
    ctx: &EdgeContext,
) -> Result<Established, Refused> {
    let peer = conn.peer;
    if conn.proxy_protocol {
        let mut source = peer.ip();
        match super::proxy::read_v2(&mut tcp).await {
            Ok(client) => {
                if let Some(client) = client {
                    tracing::Span::current().record("client", tracing::field::display(client));
                    source = client.ip();
                }
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "PROXY header refused");
                return Err(Refused("proxy_protocol"));
            }
        }
        // Before any crypto: a flood from one address costs a header and a close.
        if !ctx.connect_limiter.load().allow(source) {
            tracing::debug!(%peer, "connection rate of this address exceeded");
            return Err(Refused("rate_limited"));
        }
    }
    record::accept(tcp, conn.tls.clone()).await.map_err(|e| {
        let reason = super::tls::failure_reason(&e);
        tracing::debug!(%peer, reason, error = %e, "TLS handshake failed");
        Refused(reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_take_at_most_half_the_connections() {
        let mut l = crate::config::LimitsConfig::default();
        assert_eq!(handshake_budget(&l), 2048);
        l.max_connections = 1000;
        assert_eq!(handshake_budget(&l), 500);
        l.max_connections = 1;
        assert_eq!(handshake_budget(&l), 1);
    }

    #[tokio::test]
    async fn device_sockets_get_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (tcp, _) = accepted.unwrap();
        device_socket_options(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE_IDLE);
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE_RETRIES);
        assert!(tcp.nodelay().unwrap());
    }
}
