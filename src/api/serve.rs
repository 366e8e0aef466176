//! Serving the API's router over HTTP/1.1 with the limits an exposed endpoint needs: the
//! API shares the process's file descriptors with the MQTT listener, so a slow or idle client
//! must not hold one for long, nor may many of them take them all.
//!
//! - `api.max_connections`: at most this many connections at once; past it the listener stops
//!   accepting (newcomers wait in the kernel's backlog, holding no descriptor of ours) until
//!   one closes.
//! - `api.header_timeout`: a request's head must have arrived this long after the connection
//!   became ready for it (hyper's header read timeout; also bounds an idle keep-alive).
//! - `api.idle_timeout`: a connection that moved no byte either way for this long is closed
//!   (a body trickled in, a response not read).
//! - `api.tls_cert`/`api.tls_key`: HTTPS, the TLS handshake bounded by `api.header_timeout`;
//!   the certificate is swapped on reload ([`ApiTls`]) for the connections after it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::ApiConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The `[api]` limits this server enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// The API's HTTPS configuration, swapped whole on reload.
pub type ApiTls = Arc<ArcSwap<ServerConfig>>;

/// `api.tls_cert`/`api.tls_key` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("api.tls_cert / api.tls_key: {0}")]
pub struct ApiTlsError(String);

/// The HTTPS configuration of `api` (`None`: plain HTTP): its certificate chain and key,
/// HTTP/1.1 by ALPN, no client certificate.
pub fn tls_config(api: &ApiConfig) -> Result<Option<Arc<ServerConfig>>, ApiTlsError> {
    if !api.https() {
        return Ok(None);
    }
    let err = |e: &dyn std::fmt::Display| ApiTlsError(e.to_string());
    let chain = crate::pem::certs(&api.tls_cert).map_err(|e| err(&e))?;
    let key = crate::pem::private_key(&api.tls_key).map_err(|e| err(&e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(&format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Serves `app` on `listener` (over TLS with `tls`) until `cancel` fires; then stops
/// accepting and lets each open connection finish the request it is on.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<ApiTls>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (app, cancel) = (app.clone(), cancel.clone());
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.load_full()));
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match acceptor {
                None => connection(stream, peer, app, limits, cancel).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => connection(tls, peer, app, limits, cancel).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
        });
    }
}

/// One connection: HTTP/1.1 with keep-alive, closed when idle past the limit.
async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let idle_for = activity.idle_for();
        if idle_for >= limits.idle_timeout {
            tracing::debug!(%peer, "API connection idle too long; closed");
            return;
        }
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "API connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(limits.idle_timeout - idle_for) => {}
            _ = cancel.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.opened
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A socket that records each read or write that moved bytes.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
