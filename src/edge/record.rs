//! TLS for device connections, with an idle connection holding almost nothing.
//!
//! rustls makes the handshake (its unbuffered API, over buffers this module owns), then hands
//! over the traffic keys (`dangerous_into_kernel_connection`, the API rustls offers for kTLS;
//! the key updates it would keep state for are done in `update`, from the key log)
//! and [`TlsStream`] protects the records itself. Held through tokio-rustls, a connection keeps
//! rustls' 4 KiB receive buffer, two AEAD contexts (~1.2 KB) and its send and plaintext queues
//! for its whole life; here a quiet connection keeps its raw keys (tens of bytes) and no buffer:
//! buffers and AEAD contexts exist while bytes move and are dropped when the socket goes quiet.
//!
//! Records: TLS 1.3 (RFC 8446 §5.2) and TLS 1.2 with AES-GCM (RFC 5288) or
//! ChaCha20-Poly1305 (RFC 7905), the suites the lobby offers. A TLS 1.3 KeyUpdate from the
//! device is followed (rustls derives the next secret, and a requested update of the lobby's
//! own key is answered); the lobby updates its own key before the suite's confidentiality
//! limit (TLS 1.2: closes the connection there). After the handshake a device may send only
//! application data, alerts and (TLS 1.3) KeyUpdate; anything else ends the connection.
//!
//! The session ticket of a TLS 1.3 full handshake is not written on its own: it goes out in
//! the same write as the session's first bytes (the CONNACK), one syscall and one segment
//! instead of two.

mod keys;
mod stream;
#[cfg(test)]
mod tests;
mod update;

pub use stream::TlsStream;
pub use update::key_log;

use std::io;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Record header: content type, legacy version, length.
const HEADER: usize = 5;
/// Largest plaintext in one record (2^14).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest record body accepted: 2^14 + 2048 (TLS 1.2's bound; TLS 1.3's is 2^14 + 256).
const MAX_BODY: usize = MAX_PLAINTEXT + 2048;
/// The receive buffer may grow to this during the handshake (rustls caps handshake messages
/// at 64 KiB).
const MAX_HANDSHAKE_BUFFER: usize = 0x1_0000 + HEADER + MAX_BODY;
/// AEAD tag length of every suite here.
const TAG: usize = 16;
/// TLS 1.2 AES-GCM: the explicit part of the nonce, sent in each record.
const EXPLICIT_NONCE: usize = 8;
/// Encrypted bytes buffered before a write waits for the socket.
const WRITE_BUFFER: usize = 64 * 1024;
/// Bytes asked of the socket at least per read (a quiet device's records are tens of bytes).
const READ_CHUNK: usize = 1024;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;

/// What a finished handshake established.
pub struct Established {
    pub stream: TlsStream,
    /// The chain the device sent (from its ticket, when resumed): leaf first.
    pub peer_certificates: Vec<CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    pub resumed: bool,
}

/// Makes the TLS handshake of an accepted device connection. Errors are `io::Error`s; a TLS
/// failure carries its `rustls::Error` inside (see `edge::tls::failure_reason`). The caller
/// bounds it in time.
pub async fn accept(mut tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Established> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut incoming = Vec::with_capacity(READ_CHUNK * 4);
    let mut outgoing = Vec::new();
    // Application data that came with the handshake's last flight (often the CONNECT).
    let mut plaintext = Vec::new();
    // The handshake's place in the key log (TLS 1.3 key updates), from its ClientHello on.
    let mut registration = None;
    loop {
        if registration.is_none() {
            registration = update::Registration::from_client_hello(&incoming);
        }
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming);
        let (mut read, mut transmit, mut done) = (false, false, false);
        match state {
            Err(e) => {
                incoming.drain(..discard);
                send_alert(&mut conn, &mut outgoing, &mut tcp).await;
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => encode(&mut enc, &mut outgoing)?,
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                transmit = true;
            }
            Ok(ConnectionState::BlockedHandshake) => read = true,
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(record) = r.next_record() {
                    plaintext.extend_from_slice(record.map_err(tls_error)?.payload);
                }
            }
            // The lobby accepts no early data (`max_early_data_size` is 0).
            Ok(ConnectionState::ReadEarlyData(mut r)) => {
                while let Some(record) = r.next_record() {
                    record.map_err(tls_error)?;
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => done = true,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(other) => {
                return Err(tls_error(rustls::Error::General(format!(
                    "unexpected TLS state {other:?}"
                ))))
            }
        }
        incoming.drain(..discard);
        // The ticket that follows a TLS 1.3 handshake waits for the session's first write;
        // everything else (every flight of TLS 1.2, whose client waits for the server's
        // Finished) goes now.
        let deferred =
            !conn.is_handshaking() && conn.protocol_version() == Some(ProtocolVersion::TLSv1_3);
        if transmit && !deferred && !outgoing.is_empty() {
            tcp.write_all(&outgoing).await?;
            outgoing = Vec::new();
        }
        if done {
            break;
        }
        if read {
            if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                return Err(tls_error(rustls::Error::General(
                    "handshake message too large".into(),
                )));
            }
            incoming.reserve(READ_CHUNK * 4);
            if tcp.read_buf(&mut incoming).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
    let peer_certificates = conn
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or_else(|| tls_error(rustls::Error::HandshakeNotComplete))?;
    let traffic_secrets = suite
        .tls13()
        .zip(registration.as_ref())
        .and_then(|(s, r)| r.take(s.common.hash_provider.algorithm()));
    drop(registration);
    // rustls' kernel connection would keep the peer's chain and ~1.3 KB more for the
    // connection's life; the key updates it is there for are done in `update` instead.
    let (secrets, _kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    let stream = TlsStream::new(
        tcp,
        suite,
        secrets,
        traffic_secrets,
        incoming,
        plaintext,
        outgoing,
    )?;
    Ok(Established {
        stream,
        peer_certificates,
        alpn,
        resumed,
    })
}

/// An empty buffer gives its memory back; a full one keeps just what it holds.
fn shrink(mut v: Vec<u8>) -> Vec<u8> {
    if v.is_empty() {
        return Vec::new();
    }
    v.shrink_to_fit();
    v
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn record_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS record: {what}"))
}

/// Appends what rustls has to send to `outgoing`.
fn encode(
    enc: &mut EncodeTlsData<'_, ServerConnectionData>,
    outgoing: &mut Vec<u8>,
) -> io::Result<()> {
    let start = outgoing.len();
    let mut room = 1024;
    loop {
        outgoing.resize(start + room, 0);
        match enc.encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(e) => {
                outgoing.truncate(start);
                return Err(tls_error(rustls::Error::General(e.to_string())));
            }
        }
    }
}

/// After a failed handshake: the alert rustls queued, sent if the socket takes it.
async fn send_alert(
    conn: &mut UnbufferedServerConnection,
    outgoing: &mut Vec<u8>,
    tcp: &mut TcpStream,
) {
    for _ in 0..4 {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                if encode(&mut enc, outgoing).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    if !outgoing.is_empty() {
        let _ = tcp.write_all(outgoing).await;
    }
}
