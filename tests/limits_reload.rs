//! Limits with a config key each (issue 7): subscriptions per device, connections per source
//! address, API requests per address; and hot reload through the operator API, which applies
//! new limits and trust to new connections while existing ones stay.
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use lobby::mqtt::codec::{self, Packet, Protocol, QoS};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// SUBSCRIBE to each of `filters` in one packet (QoS 1); the SUBACK codes.
async fn subscribe_all(c: &mut RawClient, filters: &[String]) -> Vec<u8> {
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    c.send(subscribe_packet(7, &filters, QoS::AtLeastOnce))
        .await;
    // Status publishes of an earlier SUBSCRIBE may come first.
    loop {
        match c.expect().await {
            Packet::SubAck(a) => return a.codes,
            Packet::Publish(_) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn subscriptions_past_the_limit_get_quota_exceeded() {
    let t = TestLobby::start_with(|c| c.limits.max_subscriptions = 2).await;
    for (protocol, refused) in [(Protocol::V5, 0x97), (Protocol::V311, 0x80)] {
        let dev = t.device(&format!("greedy-{protocol:?}"));
        let mut c = connected(&t, &dev, protocol).await;
        let filters = ["status", "redirect", "#"].map(|leaf| dev.topic(leaf));
        assert_eq!(subscribe_all(&mut c, &filters).await, vec![1, 1, refused]);
        // Replacing a held subscription is not a new one, and the session goes on.
        assert_eq!(subscribe_all(&mut c, &filters[..1]).await, vec![1]);
    }
}

/// TCP from `source` to the lobby, then TLS as `dev`: whether the handshake succeeded.
async fn tls_from(t: &TestLobby, dev: &Device, source: &str) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let tcp = socket.connect(t.mqtt_addr()).await.unwrap();
    let connector = TlsConnector::from(client_tls(t, dev));
    let Ok(mut tls) = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3 clients finish before the server has answered: prove the session works.
    let mut out = bytes::BytesMut::new();
    codec::encode(
        &Packet::Connect(codec::Connect {
            protocol: Protocol::V5,
            client_id: "rate".into(),
            keep_alive: 30,
            clean_start: true,
            ..Default::default()
        }),
        Protocol::V5,
        &mut out,
    )
    .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if tls.write_all(&out).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
}

#[tokio::test]
async fn connections_per_source_address_are_paced() {
    let t = TestLobby::start_with(|c| {
        c.limits.connect_rate_per_address = 1.0;
        c.limits.connect_burst_per_address = 3;
        // The per-device limit must not be what refuses here.
        c.limits.reconnect_burst = 100;
    })
    .await;
    let dev = t.device("behind-one-address");
    for _ in 0..3 {
        assert!(tls_from(&t, &dev, "127.0.0.1").await, "the burst passes");
    }
    assert!(
        !tls_from(&t, &dev, "127.0.0.1").await,
        "past the burst: closed before TLS"
    );
    assert!(
        tls_from(&t, &dev, "127.0.0.2").await,
        "another address has its own budget"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(tls_from(&t, &dev, "127.0.0.1").await, "one more per second");
    let metrics = t.metrics().await;
    assert!(
        metrics.contains("lobby_tls_handshake_failures_total{reason=\"rate_limited\"}"),
        "refusals are counted"
    );
}

#[tokio::test]
async fn api_requests_per_address_are_paced_but_health_is_not() {
    let t = TestLobby::start_with(|c| {
        c.api.rate_limit = 1.0;
        c.api.rate_burst = 3;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(t.call("GET", "/v1/tenants", &t.admin, None).await.0, 200);
    }
    let got = t.call("GET", "/v1/tenants", &t.admin, None).await;
    assert_error(&got, 429, "rate_limited");
    // Monitoring keeps working while the client is throttled.
    for path in ["/healthz", "/metrics"] {
        let st = t.http.get(t.url(path)).send().await.unwrap().status();
        assert_eq!(st, 200, "{path}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(t.call("GET", "/v1/tenants", &t.admin, None).await.0, 200);
}

/// A config file for the running test lobby `t`, with `extra` TOML appended.
fn write_config(t: &TestLobby, client_ca: &Path, extra: &str) -> PathBuf {
    let certs = t.certs_dir();
    let text = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_cas = [{:?}]\n\n\
         [claims]\ncode_key = {:?}\n\n[api]\nadmin_token_file = {:?}\n\n{extra}",
        certs.join("server.pem"),
        certs.join("server.key"),
        client_ca,
        certs.join("claim.key"),
        certs.join("admin.token"),
    );
    let path = t.dir.path().join("lobby.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn reload(t: &TestLobby, token: &str) -> (u16, serde_json::Value) {
    t.call("POST", "/v1/admin/reload", token, None).await
}

/// The Maximum Packet Size a new v5 connection is told.
async fn advertised_max_packet(t: &TestLobby, name: &str) -> Option<u32> {
    let (_, ack) = connack(t, &t.device(name), Protocol::V5, name).await;
    assert_eq!(ack.code, 0);
    ack.properties.maximum_packet_size
}

#[tokio::test]
async fn the_operator_reloads_limits_and_trust_through_the_api() {
    let t = TestLobby::start().await;
    // Started from a Config in code: nothing to reload yet.
    let got = reload(&t, &t.admin).await;
    assert_error(&got, 400, "invalid_request");
    assert!(
        got.1["message"].as_str().unwrap().contains("config file"),
        "{}",
        got.1
    );

    let ca = t.certs_dir().join("ca.pem");
    let path = write_config(&t, &ca, "[limits]\nmax_packet_size = 4096\n");
    t.lobby.as_ref().unwrap().set_config_path(&path);
    let mut before = connected(&t, &t.device("before"), Protocol::V5).await;
    assert_eq!(advertised_max_packet(&t, "old-limits").await, Some(131_072));

    let tenant = t.tenant("acme", "iot.acme.example").await;
    assert_error(&reload(&t, &tenant).await, 401, "unauthorized");
    let (st, body) = reload(&t, &t.admin).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["reloaded"], true);
    // New connections get the new limits; the old connection stays, on its old ones.
    assert_eq!(advertised_max_packet(&t, "new-limits").await, Some(4096));
    before.ping_ok().await;

    // A file that does not load is refused with its reason; nothing changes.
    let path = write_config(
        &t,
        Path::new("/nonexistent/ca.pem"),
        "[limits]\nmax_packet_size = 512\n",
    );
    assert_eq!(path, t.dir.path().join("lobby.toml"));
    let got = reload(&t, &t.admin).await;
    assert_error(&got, 400, "invalid_request");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/ca.pem"),
        "{}",
        got.1
    );
    assert_eq!(advertised_max_packet(&t, "kept-limits").await, Some(4096));
    before.ping_ok().await;
}

#[tokio::test]
async fn a_reload_that_drops_a_ca_cuts_its_devices_off() {
    let factory_b = lobby::pki::throwaway_ca("Factory B CA").unwrap();
    let ca_b = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_b.path(), factory_b.cert_pem()).unwrap();
    let ca_b_path = ca_b.path().to_owned();
    let t = TestLobby::start_with(|c| c.tls.client_cas = vec![ca_b_path.clone()]).await;
    let issued = factory_b.issue_device("from-b").unwrap();
    let from_b = t.device_from("from-b", issued.cert_der, issued.cert_pem, issued.key_pem);
    let mut b = connected(&t, &from_b, Protocol::V5).await;
    // The new file trusts only the lobby's own dev CA.
    let path = write_config(&t, &t.certs_dir().join("ca.pem"), "");
    t.lobby.as_ref().unwrap().set_config_path(&path);
    let (st, body) = reload(&t, &t.admin).await;
    assert_eq!(st, 200, "{body}");
    b.expect_disconnect(0x87).await;
    assert!(TcpStream::connect(t.mqtt_addr()).await.is_ok());
    let _ = connected(&t, &t.device("from-a"), Protocol::V311).await;
}

#[tokio::test]
async fn a_reload_serves_a_new_server_certificate_and_keeps_connections() {
    let t = TestLobby::start().await;
    let dev = t.device("rekeyed");
    let mut before = connected(&t, &dev, Protocol::V5).await;
    // A new server key and certificate (from another CA); device trust unchanged.
    let next = t.dir.path().join("next");
    lobby::pki::init(&lobby::pki::InitOptions {
        dir: next.clone(),
        devices: 0,
    })
    .unwrap();
    let certs = t.certs_dir();
    let path = t.dir.path().join("lobby.toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_cas = [{:?}]\n\n\
             [claims]\ncode_key = {:?}\n\n[api]\nadmin_token_file = {:?}\n",
            next.join("server.pem"),
            next.join("server.key"),
            certs.join("ca.pem"),
            certs.join("claim.key"),
            certs.join("admin.token"),
        ),
    )
    .unwrap();
    t.lobby.as_ref().unwrap().set_config_path(&path);
    let (st, body) = reload(&t, &t.admin).await;
    assert_eq!(st, 200, "{body}");
    // New connections see the new certificate: a client trusting only the old server CA
    // fails, one trusting the new CA enters.
    assert!(tls_connect(&t, &dev).await.is_err());
    // (Another device: the same one would take over the connection made before.)
    let other = t.device("rekeyed-b");
    let cfg = client_tls_with(&next.join("ca.pem"), &other.cert_pem, &other.key_pem);
    let mut c = RawClient::with_connector(&t, &TlsConnector::from(cfg), Protocol::V5)
        .await
        .unwrap();
    c.send_connect("rekeyed-b").await;
    assert_eq!(c.expect_connack().await.code, 0);
    // The connection made before the reload stays.
    before.ping_ok().await;
}
