//! TLS session resumption (`tls.resumption`): a reconnecting device resumes with the ticket
//! of its last full handshake and enters; a resumed session is checked again for revocation
//! and validity; a trust reload voids every ticket; with resumption off, every connect is a
//! full handshake.
mod common;

use std::sync::Arc;

use common::*;
use lobby::mqtt::codec::Protocol;
use rustls::HandshakeKind;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// TLS + CONNECT + CONNACK with `connector`; returns the handshake kind and the CONNACK code.
/// Reading the CONNACK also reads the session ticket the lobby sends after a full handshake,
/// so the connector's session cache holds it for the next connect.
async fn enter(lobby: &TestLobby, connector: &TlsConnector) -> (Option<HandshakeKind>, u8) {
    let mut c = RawClient::with_connector(lobby, connector, Protocol::V5)
        .await
        .expect("TLS handshake");
    let kind = c.stream.get_ref().1.handshake_kind();
    c.send_connect("resumer").await;
    (kind, c.expect_connack().await.code)
}

/// Whether a connect with `connector` gets past TLS into MQTT (a CONNACK), or is cut off at
/// the TLS layer (handshake error, or EOF before any MQTT byte).
async fn admitted(lobby: &TestLobby, connector: &TlsConnector) -> bool {
    let connecting = RawClient::with_connector(lobby, connector, Protocol::V5);
    let Ok(mut c) = timeout(WAIT, connecting).await.expect("handshake hung") else {
        return false;
    };
    if c.try_send_connect("resumer").await.is_err() {
        return false;
    }
    c.recv().await.is_some()
}

async fn metric_line(lobby: &TestLobby, prefix: &str) -> String {
    eventually(|| async {
        let text = lobby.metrics().await;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned)
    })
    .await
}

#[tokio::test]
async fn a_reconnecting_device_resumes_and_enters() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("resumes");
    let connector = TlsConnector::from(client_tls(&lobby, &dev));
    assert_eq!(
        enter(&lobby, &connector).await,
        (Some(HandshakeKind::Full), 0)
    );
    assert_eq!(
        enter(&lobby, &connector).await,
        (Some(HandshakeKind::Resumed), 0)
    );
    let line = metric_line(&lobby, "lobby_tls_handshakes_total{kind=\"resumed\"}").await;
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
}

#[tokio::test]
async fn a_revoked_device_cannot_resume() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("revoked-resumer");
    let connector = TlsConnector::from(client_tls(&lobby, &dev));
    enter(&lobby, &connector).await;
    assert_eq!(
        enter(&lobby, &connector).await.0,
        Some(HandshakeKind::Resumed)
    );
    lobby.revoke(&dev).await;
    // The client holds the ticket of its last session and offers it; the ticket is valid,
    // the device is not.
    assert!(!admitted(&lobby, &connector).await);
}

#[tokio::test]
async fn an_expired_certificate_cannot_resume() {
    let lobby = TestLobby::start().await;
    let now = OffsetDateTime::now_utc();
    let issued = lobby
        .ca
        .issue_device_with_validity(
            "short-lived",
            now - TimeDuration::minutes(1),
            now + TimeDuration::seconds(3),
        )
        .unwrap();
    let dev = lobby.device_from(
        "short-lived",
        issued.cert_der,
        issued.cert_pem,
        issued.key_pem,
    );
    let connector = TlsConnector::from(client_tls(&lobby, &dev));
    assert_eq!(
        enter(&lobby, &connector).await,
        (Some(HandshakeKind::Full), 0)
    );
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    // The ticket is still good; the certificate in it no longer is.
    assert!(!admitted(&lobby, &connector).await);
    metric_line(
        &lobby,
        "lobby_tls_handshake_failures_total{reason=\"expired\"}",
    )
    .await;
}

#[tokio::test]
async fn a_trust_reload_voids_every_ticket() {
    let t = TestLobby::start().await;
    let dev = t.device("after-reload");
    let connector = TlsConnector::from(client_tls(&t, &dev));
    enter(&t, &connector).await;
    t.lobby.as_ref().unwrap().reload_tls(&t.config).unwrap();
    // Same CAs, but a new ticket key: the old ticket does not decrypt, so a full handshake
    // verifies the certificate against the trust as it is now.
    assert_eq!(enter(&t, &connector).await, (Some(HandshakeKind::Full), 0));
    assert_eq!(enter(&t, &connector).await.0, Some(HandshakeKind::Resumed));
}

#[tokio::test]
async fn with_resumption_off_every_connect_is_a_full_handshake() {
    let t = TestLobby::start_with(|c| c.tls.resumption = false).await;
    let dev = t.device("always-full");
    let cfg: Arc<rustls::ClientConfig> = client_tls(&t, &dev);
    let connector = TlsConnector::from(cfg);
    for _ in 0..3 {
        assert_eq!(enter(&t, &connector).await, (Some(HandshakeKind::Full), 0));
    }
}
