//! MQTT over WebSockets on the MQTT listeners (`wss://host:port/mqtt`, subprotocol `mqtt`):
//! browsers and sites that allow only HTTPS out reach the lobby the way AWS IoT serves them
//! on 443. The TLS handshake (and so the device's certificate, its identity, its limits) is
//! the same as for plain MQTT; the WebSocket is chosen by ALPN `http/1.1`, or, when the client
//! offered no ALPN, by its first bytes being an HTTP `GET`. tokio-tungstenite does the upgrade
//! and the framing; [`WsBytes`] turns the binary messages into the byte stream the session
//! reads and writes (an MQTT packet may span messages, as MQTT over WebSockets allows).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The path MQTT clients open (AWS IoT's, MQTT.js's and paho's default).
pub const PATH: &str = "/mqtt";
/// The WebSocket subprotocol of MQTT (both 3.1.1 and 5).
pub const SUBPROTOCOL: &str = "mqtt";

/// Whether the stream starts with an HTTP request: `first` holds at least the first byte the
/// client sent (decrypted and buffered by `edge::record::TlsStream::fill`). An MQTT stream starts with CONNECT (0x10), never with `G`.
pub fn looks_like_http(first: &[u8]) -> bool {
    first.first() == Some(&b'G')
}

/// Accepts the WebSocket upgrade on `io`: `GET /mqtt` (a query string is allowed) offering
/// the `mqtt` subprotocol, answered with it; anything else is refused with 404 or 400.
/// `max_message`: the largest message accepted (the MQTT packet limit).
pub async fn accept<S>(io: S, max_message: usize) -> Result<WsBytes<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(io, check_upgrade, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    Ok(WsBytes {
        ws,
        read: Bytes::new(),
    })
}

/// tungstenite's upgrade callback: `GET /mqtt` offering the `mqtt` subprotocol, answered with
/// it. (The error type is tungstenite's: an HTTP response.)
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, mut res: Response) -> Result<Response, ErrorResponse> {
    let refuse = |status: StatusCode, why: &str| {
        let mut r = ErrorResponse::new(Some(why.to_owned()));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != PATH {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "MQTT over WebSockets is at /mqtt\n",
        ));
    }
    let offers_mqtt = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL));
    if !offers_mqtt {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol `mqtt` is required\n",
        ));
    }
    res.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(res)
}

/// A WebSocket as a byte stream: binary messages in, one binary message per write out.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    /// What is left of the message being read.
    read: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(buf.remaining());
                buf.put_slice(&self.read[..n]);
                self.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.read = b,
                // Pings are answered by tungstenite on the next write or flush.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    let _ = Pin::new(&mut self.ws).poll_flush(cx);
                }
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSockets is binary; a text message came",
                    )))
                }
                // A close, or the end: end of stream.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = Pin::new(&mut self.ws);
        ready!(ws.poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_mqtt_by_the_first_byte() {
        assert!(looks_like_http(b"GET /mqtt HTTP/1.1\r\n"));
        assert!(!looks_like_http(&[0x10, 0x20]));
        assert!(!looks_like_http(&[]));
    }
}
