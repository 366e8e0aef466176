//! Trust (SPEC §2): only certificates that chain to a manufacturing CA, are in their validity
//! period and are not revoked get past the TLS handshake; the lobby keeps serving after a
//! refusal; revocation applies to live connections; failures show in `/metrics`.
mod common;

use std::sync::Arc;

use common::*;
use lobby::mqtt::codec::{Packet, Protocol};
use lobby::pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;

/// Connects with `cfg` and asserts the lobby refuses at the TLS layer: either the handshake
/// fails, or (TLS 1.3, where the client finishes before the server has judged its certificate)
/// the first read after sending CONNECT fails or hits EOF without a single MQTT byte.
async fn assert_refused(lobby: &TestLobby, cfg: Arc<rustls::ClientConfig>) {
    let connector = TlsConnector::from(cfg);
    let connecting = RawClient::with_connector(lobby, &connector, Protocol::V5);
    let mut c = match timeout(WAIT, connecting).await.expect("handshake hung") {
        Err(_) => return,
        Ok(c) => c,
    };
    // The write itself may already fail on the alert.
    if c.try_send_connect("intruder").await.is_err() {
        return;
    }
    expect_closed_without_bytes(&mut c.stream, "the lobby answered an untrusted client").await;
}

/// A trusted device still connects: CONNACK 0.
async fn assert_trusted_connects(lobby: &TestLobby, name: &str) {
    connected(lobby, &lobby.device(name), Protocol::V5).await;
}

/// A raw client of `dev` that connected (client id `r`, CONNACK 0), and then `dev` revoked.
async fn connected_then_revoked(lobby: &TestLobby, dev: &Device, protocol: Protocol) -> RawClient {
    let (c, ack) = connack(lobby, dev, protocol, "r").await;
    assert_eq!(ack.code, 0);
    lobby.revoke(dev).await;
    c
}

/// A client config (trusting the lobby) with a certificate `device` from a throwaway CA `ca`
/// that the lobby does not trust.
fn rogue_client_tls(lobby: &TestLobby, ca: &str, device: &str) -> Arc<rustls::ClientConfig> {
    let rogue = pki::throwaway_ca(ca).unwrap();
    let issued = rogue.issue_device(device).unwrap();
    client_tls_with(
        &lobby.certs_dir().join("ca.pem"),
        &issued.cert_pem,
        &issued.key_pem,
    )
}

fn device_with_validity(
    lobby: &TestLobby,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Device {
    let issued = lobby
        .ca
        .issue_device_with_validity(name, not_before, not_after)
        .unwrap();
    lobby.device_from(name, issued.cert_der, issued.cert_pem, issued.key_pem)
}

#[tokio::test]
async fn untrusted_ca_is_refused_at_handshake() {
    let lobby = TestLobby::start().await;
    let cfg = rogue_client_tls(&lobby, "Rogue Manufacturing CA", "rogue-device");
    assert_refused(&lobby, cfg).await;
    assert_trusted_connects(&lobby, "after-rogue").await;
}

#[tokio::test]
async fn expired_certificate_is_refused_at_handshake() {
    let lobby = TestLobby::start().await;
    let now = OffsetDateTime::now_utc();
    let dev = device_with_validity(
        &lobby,
        "expired",
        now - TimeDuration::days(30),
        now - TimeDuration::days(1),
    );
    assert_refused(&lobby, client_tls(&lobby, &dev)).await;
    assert_trusted_connects(&lobby, "after-expired").await;
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused_at_handshake() {
    let lobby = TestLobby::start().await;
    let now = OffsetDateTime::now_utc();
    let dev = device_with_validity(
        &lobby,
        "future",
        now + TimeDuration::days(1),
        now + TimeDuration::days(30),
    );
    assert_refused(&lobby, client_tls(&lobby, &dev)).await;
    assert_trusted_connects(&lobby, "after-future").await;
}

#[tokio::test]
async fn client_without_certificate_is_refused_at_handshake() {
    let lobby = TestLobby::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(lobby.certs_dir().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert_refused(&lobby, Arc::new(cfg)).await;
    assert_trusted_connects(&lobby, "after-anonymous").await;
}

#[tokio::test]
async fn handshake_failures_show_in_metrics() {
    let lobby = TestLobby::start().await;
    let cfg = rogue_client_tls(&lobby, "Rogue CA 2", "rogue-2");
    assert_refused(&lobby, cfg).await;
    let text = eventually(|| async {
        let text = lobby.metrics().await;
        text.lines()
            .any(|l| l.starts_with("lobby_tls_handshake_failures_total{"))
            .then_some(text)
    })
    .await;
    let line = text
        .lines()
        .find(|l| l.starts_with("lobby_tls_handshake_failures_total{"))
        .unwrap();
    assert!(line.contains("reason=\""), "{line}");
    assert!(!line.contains(&lobby.device("x").hex()));
}

/// Revoking a connected v5 device: DISCONNECT 0x87 (or a close), then the handshake fails.
#[tokio::test]
async fn revoke_connected_v5_device() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("to-revoke");
    let mut c = connected_then_revoked(&lobby, &dev, Protocol::V5).await;
    let t = Instant::now();
    match c.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason, 0x87);
            let t = Instant::now();
            assert!(c.recv().await.is_none() && t.elapsed() < WAIT, "not closed");
        }
        None => assert!(t.elapsed() < WAIT, "a revoked device stayed connected"),
        Some(other) => panic!("expected DISCONNECT 0x87 or a close, got {other:?}"),
    }
    // A new connection fails at the TLS handshake.
    assert_refused(&lobby, client_tls(&lobby, &dev)).await;
    let d = lobby.admin_device(&dev).await;
    assert_eq!(d["state"], "revoked", "{d}");
    assert_eq!(d["connected"], false, "{d}");
    // Claiming a revoked device is a conflict.
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let (st, body) = lobby.claim(&token, &dev).await;
    assert_eq!(st, 409, "{body}");
    assert!(
        body["error"] == "conflict" || body["error"] == "already_claimed",
        "{body}"
    );
    // The lobby still serves everyone else.
    assert_trusted_connects(&lobby, "after-revoke").await;
}

/// A v3.1.1 device revoked while connected is closed.
#[tokio::test]
async fn revoke_connected_v3_device_closes_it() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("to-revoke-v3");
    let mut c = connected_then_revoked(&lobby, &dev, Protocol::V311).await;
    let t = Instant::now();
    let got = c.recv().await;
    assert!(got.is_none(), "expected a close, got {got:?}");
    assert!(t.elapsed() < WAIT, "a revoked device stayed connected");
    assert_refused(&lobby, client_tls(&lobby, &dev)).await;
}

/// A claimed device revoked: state revoked over the API, refused at the handshake.
#[tokio::test]
async fn revoke_claimed_device() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("claimed-revoked");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    lobby.revoke(&dev).await;
    assert_refused(&lobby, client_tls(&lobby, &dev)).await;
    let (st, d) = lobby.device_json(&token, &dev).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["state"], "revoked", "{d}");
    // Claiming it again (same tenant) must not bring it back.
    let (st, body) = lobby.claim(&token, &dev).await;
    assert_eq!(st, 409, "{body}");
}

/// TLS + CONNECT + CONNACK (of any code) with `connector` (its session cache gets the server's
/// tickets).
async fn connect_and_connack(lobby: &TestLobby, connector: &TlsConnector) {
    let mut c = RawClient::with_connector(lobby, connector, Protocol::V5)
        .await
        .unwrap();
    c.send_connect("resumer").await;
    c.expect_connack().await;
}

/// A client config for `dev` that offers only `version`.
fn client_tls_version(
    lobby: &TestLobby,
    dev: &Device,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(lobby.certs_dir().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = vec![CertificateDer::from_pem_slice(dev.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(dev.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

#[tokio::test]
async fn tls_1_2_and_1_3_clients_both_enter() {
    let lobby = TestLobby::start().await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let dev = lobby.device(&format!("dev-{expected:?}"));
        let connector = TlsConnector::from(client_tls_version(&lobby, &dev, version));
        let c = RawClient::with_connector(&lobby, &connector, Protocol::V5)
            .await
            .unwrap();
        assert_eq!(c.stream.get_ref().1.protocol_version(), Some(expected));
        drop(c);
        connect_and_connack(&lobby, &connector).await;
    }
    // An untrusted device is refused on TLS 1.2 too, where the client learns it in the handshake.
    let stranger = pki::throwaway_ca("Stranger CA").unwrap();
    let issued = stranger.issue_device("stranger").unwrap();
    let dev = lobby.device_from("stranger", issued.cert_der, issued.cert_pem, issued.key_pem);
    let connector = TlsConnector::from(client_tls_version(&lobby, &dev, &rustls::version::TLS12));
    let handshake = RawClient::with_connector(&lobby, &connector, Protocol::V5).await;
    assert!(
        handshake.is_err(),
        "TLS 1.2 handshake with an untrusted cert succeeded"
    );
}
