//! `listener.proxy_protocol = true`: behind a TCP load balancer each connection starts with a
//! PROXY v2 header; the lobby reads it, then runs the TLS handshake as usual. A connection
//! without one is refused.
mod common;

use std::net::SocketAddr;

use common::*;
use lobby::edge::proxy::{header_v2, SIGNATURE};
use lobby::mqtt::codec::{self, Packet, Protocol};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// TCP, then `prefix` as the balancer would send it, then TLS and CONNECT; the CONNACK code.
async fn connect_behind_balancer(lobby: &TestLobby, dev: &Device, prefix: &[u8]) -> Option<u8> {
    let mut tcp = TcpStream::connect(lobby.mqtt_addr()).await.unwrap();
    tcp.write_all(prefix).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = TlsConnector::from(client_tls(lobby, dev))
        .connect(name, tcp)
        .await
        .ok()?;
    let mut out = bytes::BytesMut::new();
    let connect = codec::Connect {
        protocol: Protocol::V311,
        client_id: dev.name.clone(),
        keep_alive: 30,
        clean_start: true,
        ..Default::default()
    };
    codec::encode(&Packet::Connect(connect), Protocol::V311, &mut out).unwrap();
    tls.write_all(&out).await.ok()?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    (buf[0] == 0x20).then_some(buf[3])
}

#[tokio::test]
async fn devices_behind_a_balancer_enter_with_a_proxy_header() {
    let lobby = TestLobby::start_with(|c| c.listener.proxy_protocol = true).await;
    let src: SocketAddr = "203.0.113.9:51000".parse().unwrap();
    let header = header_v2(src, lobby.mqtt_addr());
    let dev = lobby.device("behind-lb");
    assert_eq!(
        connect_behind_balancer(&lobby, &dev, &header).await,
        Some(0)
    );
    // LOCAL (the balancer's own check) carries no address and is fine too.
    let mut local = SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let dev2 = lobby.device("lb-local");
    assert_eq!(
        connect_behind_balancer(&lobby, &dev2, &local).await,
        Some(0)
    );
}

#[tokio::test]
async fn a_connection_without_the_header_is_refused() {
    let lobby = TestLobby::start_with(|c| c.listener.proxy_protocol = true).await;
    let dev = lobby.device("no-header");
    assert_eq!(connect_behind_balancer(&lobby, &dev, b"").await, None);
    // Garbage where the header should be is refused as well, and the lobby keeps serving.
    let junk = [0x47u8; 16];
    assert_eq!(connect_behind_balancer(&lobby, &dev, &junk).await, None);
    let header = header_v2("198.51.100.1:1".parse().unwrap(), lobby.mqtt_addr());
    assert_eq!(
        connect_behind_balancer(&lobby, &dev, &header).await,
        Some(0)
    );
}
