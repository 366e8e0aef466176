//! The record layer against rustls' own client over real sockets: every suite the lobby
//! offers in both versions, KeyUpdate both ways, close_notify, records split across reads and
//! coalesced with the handshake, large writes, tampering, resumption, and buffers let go when
//! the connection is quiet.

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedCipherSuite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn server_config(resumption: bool) -> (Arc<ServerConfig>, Arc<RootCertStore>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.enable_secret_extraction = true;
    config.key_log = key_log();
    if resumption {
        config.ticketer = aws_lc_rs::Ticketer::new().unwrap();
        config.send_tls13_tickets = 1;
    }
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    (Arc::new(config), Arc::new(roots))
}

fn client_config(roots: &Arc<RootCertStore>, suite: SupportedCipherSuite) -> Arc<ClientConfig> {
    let provider = CryptoProvider {
        cipher_suites: vec![suite],
        ..aws_lc_rs::default_provider()
    };
    let version = suite.version();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    )
}

fn suites() -> Vec<SupportedCipherSuite> {
    use aws_lc_rs::cipher_suite::*;
    vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// A lobby-side connection and a tokio-rustls client connected to it.
async fn pair(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Established, tokio_rustls::client::TlsStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(client);
    tokio::join!(
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, server).await.unwrap()
        },
        async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(name(), tcp).await.unwrap()
        }
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The client sends `len` bytes in pieces, the lobby side reads them all and answers them back
/// in one write (several records each way).
async fn echo(
    server: &mut TlsStream,
    client: &mut tokio_rustls::client::TlsStream<TcpStream>,
    len: usize,
    seed: u8,
) {
    let sent = pattern(len, seed);
    let write = async {
        for piece in sent.chunks(7_000) {
            client.write_all(piece).await.unwrap();
        }
        client.flush().await.unwrap();
    };
    let mut got = vec![0; len];
    let read = server.read_exact(&mut got);
    let ((), n) = tokio::join!(write, read);
    n.unwrap();
    assert_eq!(got, sent);
    server.write_all(&got).await.unwrap();
    server.flush().await.unwrap();
    let mut back = vec![0; len];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(back, sent);
}

#[tokio::test]
async fn every_suite_carries_data_both_ways() {
    let (server, roots) = server_config(false);
    for suite in suites() {
        let (mut est, mut client) = pair(server.clone(), client_config(&roots, suite)).await;
        assert!(!est.resumed);
        echo(&mut est.stream, &mut client, 5, 1).await;
        echo(&mut est.stream, &mut client, 100_000, 2).await;
        // close_notify each way: the reader sees the end of the stream.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(est.stream.read_to_end(&mut rest).await.unwrap(), 0);
        est.stream.shutdown().await.unwrap();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }
}

#[tokio::test]
async fn key_updates_from_the_device_are_followed_and_answered() {
    let (server, roots) = server_config(false);
    for suite in suites().into_iter().filter(|s| s.tls13().is_some()) {
        let (mut est, mut client) = pair(server.clone(), client_config(&roots, suite)).await;
        echo(&mut est.stream, &mut client, 1_000, 3).await;
        for round in 0..3 {
            // KeyUpdate(update_requested): the lobby must follow and update its own key.
            client.get_mut().1.refresh_traffic_keys().unwrap();
            echo(&mut est.stream, &mut client, 20_000, 4 + round).await;
        }
        // Answered with an update of the lobby's key: its 2 records since the last one are
        // numbered from 0 again (7 records were sent in all).
        assert_eq!(est.stream.tx_seq(), 2);
    }
}

#[tokio::test]
async fn a_resumed_session_is_told_apart_and_works() {
    let (server, roots) = server_config(true);
    let client = client_config(&roots, aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384);
    let (mut first, mut c1) = pair(server.clone(), client.clone()).await;
    // The ticket goes out with the lobby's first write; reading it stores the session.
    echo(&mut first.stream, &mut c1, 10, 5).await;
    let (mut second, mut c2) = pair(server, client).await;
    assert!(!first.resumed);
    assert!(second.resumed);
    echo(&mut second.stream, &mut c2, 10, 6).await;
}

/// A client driven by hand (rustls' buffered connection over a raw socket), to control the
/// bytes on the wire: its handshake done, it returns the socket and connection.
async fn raw_client(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    with_finished: &[u8],
) -> (TcpStream, ClientConnection) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut conn = ClientConnection::new(config, name()).unwrap();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if !conn.is_handshaking() {
            // The client's Finished and the first application data leave together.
            conn.writer().write_all(with_finished).unwrap();
        }
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        tcp.write_all(&out).await.unwrap();
        if !conn.is_handshaking() {
            return (tcp, conn);
        }
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "server closed during the handshake");
        conn.read_tls(&mut &buf[..n]).unwrap();
        conn.process_new_packets().unwrap();
    }
}

use std::io::Write as _;

/// The raw client's next records for `data`, as bytes for the wire.
fn records(conn: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    conn.writer().write_all(data).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

async fn raw_pair(
    suite: SupportedCipherSuite,
    with_finished: &[u8],
) -> (Established, TcpStream, ClientConnection) {
    let (server, roots) = server_config(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (est, (tcp, conn)) = tokio::join!(
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, server).await.unwrap()
        },
        raw_client(addr, client_config(&roots, suite), with_finished)
    );
    (est, tcp, conn)
}

#[tokio::test]
async fn data_behind_the_finished_and_records_split_byte_by_byte_arrive() {
    for suite in [
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ] {
        let (mut est, mut tcp, mut conn) = raw_pair(suite, b"CONNECT").await;
        let mut got = [0u8; 7];
        est.stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNECT");
        let wire = records(&mut conn, b"one byte at a time");
        let dribble = async {
            for b in &wire {
                tcp.write_all(std::slice::from_ref(b)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let mut got = [0u8; 18];
        let ((), read) = tokio::join!(dribble, est.stream.read_exact(&mut got));
        read.unwrap();
        assert_eq!(&got, b"one byte at a time");
    }
}

#[tokio::test]
async fn a_tampered_record_ends_the_stream_with_an_error() {
    for suite in suites() {
        let (mut est, mut tcp, mut conn) = raw_pair(suite, b"").await;
        let mut wire = records(&mut conn, b"PUBLISH");
        *wire.last_mut().unwrap() ^= 1;
        tcp.write_all(&wire).await.unwrap();
        let mut got = [0u8; 7];
        assert!(est.stream.read_exact(&mut got).await.is_err());
    }
}

#[tokio::test]
async fn bytes_that_are_not_records_and_oversized_records_are_refused() {
    let suite = aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    for wire in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[23, 3, 3, 0xff, 0xff][..]] {
        let (mut est, mut tcp, _conn) = raw_pair(suite, b"").await;
        tcp.write_all(wire).await.unwrap();
        let mut got = [0u8; 1];
        let e = est.stream.read_exact(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}

#[tokio::test]
async fn a_quiet_connection_holds_no_buffer_and_no_aead_context() {
    let (server, roots) = server_config(true);
    let suite = aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let (mut est, mut client) = pair(server, client_config(&roots, suite)).await;
    echo(&mut est.stream, &mut client, 50_000, 7).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(50), est.stream.read(&mut buf));
    assert!(read.await.is_err(), "nothing was sent");
    assert!(est.stream.is_quiet());
    // …and it wakes up again.
    echo(&mut est.stream, &mut client, 10, 8).await;
}

#[tokio::test]
async fn a_handshake_cancelled_midway_leaves_nothing_in_the_key_log() {
    let (server, roots) = server_config(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = client_config(&roots, aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256);
    let mut conn = ClientConnection::new(client, name()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let random: [u8; 32] = hello[11..43].try_into().unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    // The ClientHello is answered; the client never sends its Finished.
    let mut handshake = Box::pin(accept(accepted, server));
    let waited = tokio::time::timeout(Duration::from_millis(200), &mut handshake).await;
    assert!(waited.is_err(), "the handshake cannot finish");
    assert!(
        update::is_registered(&random),
        "registered while in progress"
    );
    drop(handshake);
    assert!(!update::is_registered(&random), "cancelled: gone");
}
