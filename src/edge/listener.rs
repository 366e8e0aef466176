//! The MQTT/TLS accept loop and the per-connection task.
//!
//! A connection permit is taken before `accept` (`limits.max_connections`), so a full lobby
//! stops accepting instead of accepting and dropping. The TLS handshake runs in the
//! connection's own task under `limits.handshake_timeout`, never in the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout, Instant};
use tokio_rustls::rustls::HandshakeKind;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::identity::Identity;
use super::EdgeContext;
use crate::metrics;
use crate::mqtt::session;

/// Accepts device connections until `ctx.cancel` fires.
pub async fn serve(listener: TcpListener, ctx: Arc<EdgeContext>, tracker: TaskTracker) {
    let permits = ctx.permits.clone();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = ctx.cancel.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = ctx.cancel.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let trust = ctx.trust.load();
                let acceptor = TlsAcceptor::from(trust.server_config.clone());
                let generation = trust.generation;
                let span = tracing::debug_span!(
                    "conn",
                    %peer,
                    client = tracing::field::Empty,
                    device_id = tracing::field::Empty
                );
                tracker.spawn(
                    connection(tcp, peer, (acceptor, generation), ctx.clone(), permit)
                        .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    (acceptor, trust_generation): (TlsAcceptor, u64),
    ctx: Arc<EdgeContext>,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    // The connection's limits, from accept to close (a reload applies to the next ones).
    let limits = ctx.limits.load_full();
    let handshake_timeout = limits.handshake_timeout;
    let mut source = peer.ip();
    if ctx.proxy_protocol {
        // The balancer's header comes first, under the same deadline as the handshake.
        match timeout(handshake_timeout, super::proxy::read_v2(&mut tcp)).await {
            Ok(Ok(client)) => {
                if let Some(client) = client {
                    tracing::Span::current().record("client", tracing::field::display(client));
                    source = client.ip();
                }
            }
            Ok(Err(e)) => {
                metrics::handshake_failure("proxy_protocol");
                tracing::debug!(%peer, error = %e, "PROXY header refused");
                return;
            }
            Err(_) => {
                metrics::handshake_failure("timeout");
                return;
            }
        }
    }
    // Before any crypto: a flood from one address costs an accept and a close.
    if !ctx.connect_limiter.load().allow(source) {
        metrics::handshake_failure("rate_limited");
        tracing::debug!(%peer, "connection rate of this address exceeded");
        return;
    }
    let stream = match timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = super::tls::failure_reason(&e);
            metrics::handshake_failure(reason);
            tracing::debug!(%peer, reason, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::handshake_failure("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let tls_done = Instant::now();
    ::metrics::histogram!(metrics::TLS_HANDSHAKE_DURATION_SECONDS)
        .record((tls_done - started).as_secs_f64());
    // The chain as the device sent it (from the ticket, when resumed): leaf, intermediates.
    let Some(identity) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(Identity::from_chain)
    else {
        metrics::handshake_failure("no_certificate");
        return;
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    // A resumed session skipped certificate verification: check revocation (also for full
    // handshakes, in case it changed during the handshake) and the validity period again.
    if ctx.cache.is_revoked(&identity.device_id) {
        metrics::handshake_failure("revoked");
        return;
    }
    if resumed && !identity.valid_at(crate::claims::model::now_ms() / 1000) {
        metrics::handshake_failure("expired");
        return;
    }
    metrics::handshake(if resumed { "resumed" } else { "full" });
    tracing::Span::current().record("device_id", tracing::field::display(&identity.device_id));
    let accepted = session::Accepted {
        tls_done,
        trust_generation,
        limits,
    };
    let end = session::run(stream, identity, ctx, accepted).await;
    metrics::connection_outcome(end.label());
    tracing::debug!(outcome = end.label(), "connection closed");
}
