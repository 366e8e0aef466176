//! The API under abuse (issue 13): clients that trickle their request, idle on a keep-alive
//! connection or open more connections than the API allows do not hold its descriptors,
//! which the MQTT listener shares; the API and the devices keep working meanwhile.
mod common;

use std::time::{Duration, Instant};

use common::*;
use lobby::mqtt::codec::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A lobby whose API closes a request head after `header`, an idle connection after `idle`,
/// and holds at most `max` connections.
async fn guarded(header: Duration, idle: Duration, max: usize) -> TestLobby {
    TestLobby::start_with(|c| {
        c.api.header_timeout = header;
        c.api.idle_timeout = idle;
        c.api.max_connections = max;
    })
    .await
}

/// Opens a connection to the API and sends `bytes`.
async fn open(lobby: &TestLobby, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(lobby.running().api_addr())
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// How long until the server closes `s` (reads what it sends until end of stream or a
/// reset), at most `limit`; `None` if it is still open then.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// The start of a request head that never ends.
const TRICKLE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: lobby\r\n";

#[tokio::test]
async fn slowloris_clients_are_cut_off_while_the_api_and_devices_keep_working() {
    let lobby = guarded(Duration::from_millis(500), Duration::from_secs(5), 32).await;
    let mut slow = Vec::new();
    for _ in 0..150 {
        slow.push(open(&lobby, TRICKLE).await);
    }
    // Each keeps trickling a header line, as slowloris does, so only the head's deadline
    // can end it.
    let trickling = tokio::spawn(async move {
        let mut closed = 0;
        for round in 0..40 {
            for s in &mut slow {
                let line = format!("X-{round}: 1\r\n");
                let _ = s.write_all(line.as_bytes()).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waits: Vec<_> = slow
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move { closed_within(&mut s, Duration::from_secs(5)).await })
            })
            .collect();
        for w in waits {
            if w.await.unwrap().is_some() {
                closed += 1;
            }
        }
        closed
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("sensor");
    connected(&lobby, &dev, Protocol::V5).await;
    assert_eq!(lobby.claim(&acme, &dev).await.0, 201);
    let (status, _) = lobby.admin_device_json(&dev).await;
    assert_eq!(status, 200);
    assert_eq!(
        trickling.await.unwrap(),
        150,
        "every slow client was cut off"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_and_a_trickled_body_are_closed() {
    let lobby = guarded(Duration::from_millis(400), Duration::from_millis(800), 64).await;
    let mut idle = open(&lobby, b"GET /healthz HTTP/1.1\r\nHost: lobby\r\n\r\n").await;
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let took = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(took.is_some(), "an idle keep-alive connection stays open");

    let head = format!(
        "POST /v1/claims HTTP/1.1\r\nHost: lobby\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"code\":",
        lobby.admin
    );
    let mut body = open(&lobby, head.as_bytes()).await;
    let took = closed_within(&mut body, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "a body that stopped coming keeps its connection"
    );
    assert!(
        took.unwrap() >= Duration::from_millis(700),
        "closed for idling, not at once: {took:?}"
    );
}

#[tokio::test]
async fn past_max_connections_newcomers_wait_until_one_closes() {
    let lobby = guarded(Duration::from_secs(30), Duration::from_secs(30), 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open(&lobby, TRICKLE).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = lobby.http.get(lobby.url("/healthz")).send();
    tokio::pin!(request);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut request)
            .await
            .is_err(),
        "a fifth connection was served while four were held"
    );
    drop(held.pop());
    let answered = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(answered.status().as_u16(), 200);
}
