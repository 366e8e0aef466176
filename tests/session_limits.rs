//! Session limits of SPEC §4 on the device edge: keep-alive, the connect and handshake timeouts
//! (also for a half-sent CONNECT), and shutdown with DISCONNECT 0x8B or 0x9C with a Server
//! Reference.
mod common;

use std::time::Duration;

use common::*;
use lobby::mqtt::codec::{self, Packet, Protocol};
use tokio::io::AsyncWriteExt;

// ---- timers --------------------------------------------------------------------------------

/// A raw client with keep-alive 1 s (CONNACK 0) that then stays silent.
async fn silent_client(lobby: &TestLobby, dev: &Device, protocol: Protocol) -> RawClient {
    let mut c = RawClient::connect(lobby, dev, protocol).await;
    c.send(Packet::Connect(codec::Connect {
        protocol,
        client_id: dev.name.clone(),
        keep_alive: 1,
        clean_start: true,
        ..Default::default()
    }))
    .await;
    assert_eq!(c.expect_connack().await.code, 0);
    c
}

#[tokio::test]
async fn keep_alive_timeout_v5_gets_0x8d() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("silent-v5");
    let mut c = silent_client(&lobby, &dev, Protocol::V5).await;
    c.expect_disconnect(0x8D).await;
}

#[tokio::test]
async fn keep_alive_timeout_v3_closes() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("silent-v3");
    let mut c = silent_client(&lobby, &dev, Protocol::V311).await;
    assert!(c.expect_closed().await.is_empty());
}

#[tokio::test]
async fn connect_timeout_closes_tls_without_connect() {
    let lobby =
        TestLobby::start_with(|c| c.limits.connect_timeout = Duration::from_millis(500)).await;
    let dev = lobby.device("mute");
    let mut s = tls_connect(&lobby, &dev).await.unwrap();
    expect_closed_without_bytes(&mut s, "TLS without CONNECT, past connect_timeout").await;
}

#[tokio::test]
async fn partial_connect_is_closed_after_connect_timeout() {
    let lobby =
        TestLobby::start_with(|c| c.limits.connect_timeout = Duration::from_millis(500)).await;
    let dev = lobby.device("slowloris");
    let mut s = tls_connect(&lobby, &dev).await.unwrap();
    let mut out = bytes::BytesMut::new();
    let connect = codec::Connect {
        protocol: Protocol::V311,
        client_id: "slow".into(),
        keep_alive: 30,
        clean_start: true,
        ..Default::default()
    };
    codec::encode(&Packet::Connect(connect), Protocol::V311, &mut out).unwrap();
    s.write_all(&out[..4]).await.unwrap();
    s.flush().await.unwrap();
    expect_closed_without_bytes(&mut s, "half a CONNECT, past connect_timeout").await;
}

#[tokio::test]
async fn handshake_timeout_closes_silent_tcp() {
    let lobby =
        TestLobby::start_with(|c| c.limits.handshake_timeout = Duration::from_millis(500)).await;
    let mut tcp = tokio::net::TcpStream::connect(lobby.mqtt_addr())
        .await
        .unwrap();
    expect_closed_without_bytes(
        &mut tcp,
        "TCP without a ClientHello, past handshake_timeout",
    )
    .await;
    // Still serving.
    let dev = lobby.device("after-silent-tcp");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.ping_ok().await;
}

// ---- shutdown ------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_sends_v5_disconnect_0x8b() {
    let mut lobby = TestLobby::start().await;
    let dev = lobby.device("bye");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    let l = lobby.lobby.take().unwrap();
    let (_, d) = tokio::join!(l.stop(), c.expect_disconnect(0x8B));
    assert_eq!(d.properties.server_reference, None);
}

#[tokio::test]
async fn shutdown_with_server_reference_sends_0x9c() {
    let mut lobby =
        TestLobby::start_with(|c| c.shutdown.server_reference = "other:8883".into()).await;
    let dev = lobby.device("bye-ref");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    let l = lobby.lobby.take().unwrap();
    let (_, d) = tokio::join!(l.stop(), c.expect_disconnect(0x9C));
    assert_eq!(d.properties.server_reference.as_deref(), Some("other:8883"));
}

// ---- connection limit ------------------------------------------------------------------------

#[tokio::test]
async fn max_connections_holds_the_next_device_until_one_leaves() {
    let lobby = TestLobby::start_with(|c| c.limits.max_connections = 2).await;
    let first = connected(&lobby, &lobby.device("limit-1"), Protocol::V311).await;
    let _second = connected(&lobby, &lobby.device("limit-2"), Protocol::V311).await;
    // The third is not accepted (its TCP connection waits in the backlog), so its handshake
    // cannot finish while two devices hold both permits.
    let third = lobby.device("limit-3");
    let waiting = tokio::spawn({
        let cfg = client_tls(&lobby, &third);
        let addr = lobby.mqtt_addr();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection got past a limit of two"
    );
    // One leaves: its permit goes to the waiting device, which then gets through.
    drop(first);
    let tls = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting device was never accepted")
        .unwrap();
    assert!(tls.is_ok(), "{:?}", tls.err());
}

// ---- reconnect rate ------------------------------------------------------------------------

#[tokio::test]
async fn a_reconnect_loop_is_refused_past_the_burst_and_others_are_not() {
    let lobby = TestLobby::start_with(|c| {
        c.limits.reconnect_burst = 3;
        c.limits.reconnect_interval = Duration::from_secs(60);
    })
    .await;
    let looping = lobby.device("looping");
    for _ in 0..3 {
        let (c, ack) = connack(&lobby, &looping, Protocol::V5, "looping").await;
        assert_eq!(ack.code, 0, "{ack:?}");
        drop(c);
    }
    // The fourth within the interval: v5 CONNACK 0x9F (connection rate exceeded), then close.
    let (mut c, ack) = connack(&lobby, &looping, Protocol::V5, "looping").await;
    assert_eq!(ack.code, 0x9F, "{ack:?}");
    assert!(c.recv().await.is_none());
    // v3.1.1 gets return code 3 (server unavailable).
    let (_, ack) = connack(&lobby, &looping, Protocol::V311, "looping").await;
    assert_eq!(ack.code, 3, "{ack:?}");
    // Another device is not held back.
    let _ = connected(&lobby, &lobby.device("calm"), Protocol::V5).await;
}
