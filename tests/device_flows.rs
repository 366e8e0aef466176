//! Device flows of SPEC §4 over real TLS with real clients: an unclaimed device waits, a claim
//! sends it on (v3.1.1 by publish + close, v5 by CONNACK or DISCONNECT 0x9D with the Server
//! Reference), takeover, restart, unclaim, migrate, keep-alive, connect timeout and shutdown.
mod common;

use std::time::Duration;

use common::*;
use lobby::mqtt::codec::{self, Packet, Protocol, QoS};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::time::{timeout, Instant};

// ---- local helpers -------------------------------------------------------------------------

/// The exact `…/status` payload of SPEC §4.
fn status(dev: &Device, state: &str, tenant: Option<&str>) -> Value {
    json!({"v": 1, "device_id": dev.hex(), "state": state, "tenant": tenant})
}

/// Checks every field of a `…/redirect` payload; returns its `redirect_id`.
fn check_redirect(payload: &[u8], dev: &Device, tenant: &str, endpoint: &str, port: u16) -> String {
    let p: Value = serde_json::from_slice(payload).expect("redirect payload is JSON");
    let keys: std::collections::BTreeSet<&str> =
        p.as_object().unwrap().keys().map(String::as_str).collect();
    let want: std::collections::BTreeSet<&str> = [
        "v",
        "redirect_id",
        "device_id",
        "tenant",
        "endpoint",
        "port",
        "region",
        "thing_name",
        "issued_at",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, want, "{p}");
    assert_eq!(p["v"], 1, "{p}");
    assert_eq!(p["device_id"], dev.hex(), "{p}");
    assert_eq!(p["tenant"], tenant, "{p}");
    assert_eq!(p["endpoint"], endpoint, "{p}");
    assert_eq!(p["port"], port, "{p}");
    assert_eq!(p["region"], "eu-west-1", "{p}");
    assert_eq!(
        p["thing_name"],
        dev.name.as_str(),
        "thing_name is the cert CN: {p}"
    );
    let issued = p["issued_at"].as_str().expect("issued_at is a string");
    time::OffsetDateTime::parse(issued, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("issued_at {issued:?} is not RFC 3339: {e}"));
    let id = p["redirect_id"].as_str().expect("redirect_id is a string");
    assert!(!id.is_empty());
    id.to_owned()
}

/// A raw client that connected with CONNACK 0.
async fn connected(lobby: &TestLobby, dev: &Device, protocol: Protocol) -> RawClient {
    let mut c = RawClient::connect(lobby, dev, protocol).await;
    c.send_connect(&dev.name).await;
    match c.expect().await {
        Packet::ConnAck(a) => assert_eq!(a.code, 0, "{a:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c
}

/// The next packet, or `None` when the lobby closed the connection; panics if the connection
/// stayed open and silent for `WAIT`.
async fn next_or_close(c: &mut RawClient) -> Option<Packet> {
    let t = Instant::now();
    let p = c.recv().await;
    if p.is_none() {
        assert!(
            t.elapsed() < WAIT,
            "the connection stayed open for {WAIT:?}"
        );
    }
    p
}

/// Reads until the lobby closes the connection; returns what came before.
async fn expect_closed(c: &mut RawClient) -> Vec<Packet> {
    let mut got = Vec::new();
    while let Some(p) = next_or_close(c).await {
        got.push(p);
        assert!(got.len() < 16, "too many packets before close: {got:?}");
    }
    got
}

/// The next packet, which must be a PUBLISH.
async fn expect_publish(c: &mut RawClient) -> codec::Publish {
    match c.expect().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// The next PUBLISH must be `dev`'s status with `state`/`tenant`.
async fn expect_status(c: &mut RawClient, dev: &Device, state: &str, tenant: Option<&str>) {
    let p = expect_publish(c).await;
    assert_eq!(p.topic, dev.topic("status"));
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v, status(dev, state, tenant));
}

/// PINGREQ answered by PINGRESP: the connection is alive.
async fn ping_ok(c: &mut RawClient) {
    c.send(Packet::PingReq).await;
    match c.expect().await {
        Packet::PingResp => {}
        other => panic!("expected PINGRESP, got {other:?}"),
    }
}

async fn get_device(lobby: &TestLobby, dev: &Device) -> Value {
    let (st, body) = lobby
        .call(
            "GET",
            &format!("/v1/devices/{}", dev.hex()),
            &lobby.admin,
            None,
        )
        .await;
    assert_eq!(st, 200, "{body}");
    body
}

fn v4_options(lobby: &TestLobby, dev: &Device) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(dev.name.clone(), "localhost", lobby.mqtt_addr().port());
    o.set_keep_alive(Duration::from_secs(1));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_tls(lobby, dev)),
    ));
    o
}

fn v5_options(lobby: &TestLobby, dev: &Device) -> rumqttc::v5::MqttOptions {
    let mut o =
        rumqttc::v5::MqttOptions::new(dev.name.clone(), "localhost", lobby.mqtt_addr().port());
    // rumqttc v5 refuses keep-alives under 5 s.
    o.set_keep_alive(Duration::from_secs(5));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_tls(lobby, dev)),
    ));
    o
}

async fn poll_v4(el: &mut rumqttc::EventLoop) -> Result<rumqttc::Event, rumqttc::ConnectionError> {
    timeout(WAIT, el.poll())
        .await
        .expect("rumqttc v4: no event in time")
}

async fn poll_v5(
    el: &mut rumqttc::v5::EventLoop,
) -> Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError> {
    timeout(WAIT, el.poll())
        .await
        .expect("rumqttc v5: no event in time")
}

/// The next incoming PUBLISH on a rumqttc v4 event loop.
async fn v4_publish(el: &mut rumqttc::EventLoop) -> rumqttc::Publish {
    loop {
        match poll_v4(el).await.expect("v4 connection failed") {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => return p,
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success)
            }
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) => {
                assert_eq!(
                    a.return_codes,
                    vec![rumqttc::SubscribeReasonCode::Success(
                        rumqttc::QoS::AtLeastOnce
                    )]
                )
            }
            _ => {}
        }
    }
}

/// The next incoming PUBLISH on a rumqttc v5 event loop.
async fn v5_publish(el: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::mqttbytes::v5::Publish {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet as P5, SubscribeReasonCode};
    loop {
        match poll_v5(el).await.expect("v5 connection failed") {
            rumqttc::v5::Event::Incoming(P5::Publish(p)) => return p,
            rumqttc::v5::Event::Incoming(P5::ConnAck(a)) => {
                assert_eq!(a.code, ConnectReturnCode::Success)
            }
            rumqttc::v5::Event::Incoming(P5::SubAck(a)) => {
                assert_eq!(
                    a.return_codes,
                    vec![SubscribeReasonCode::Success(
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                    )]
                )
            }
            _ => {}
        }
    }
}

async fn redirect_tenant(lobby: &TestLobby) -> String {
    lobby.tenant("acme", "iot.acme.example").await
}

// ---- unclaimed devices wait ----------------------------------------------------------------

#[tokio::test]
async fn unclaimed_v4_client_gets_status_and_stays() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("wait-v4");
    let (client, mut el) = rumqttc::AsyncClient::new(v4_options(&lobby, &dev), 10);
    client
        .subscribe(dev.topic("#"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let p = v4_publish(&mut el).await;
    assert_eq!(p.topic, dev.topic("status"));
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v, status(&dev, "unclaimed", None));
    // Keep-alive 1 s: three answered pings means it stayed well past 1.5 × keep-alive.
    let mut pongs = 0;
    while pongs < 3 {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PingResp) = poll_v4(&mut el)
            .await
            .expect("the lobby dropped a waiting device")
        {
            pongs += 1;
        }
    }
    let d = get_device(&lobby, &dev).await;
    assert_eq!(d["connected"], true, "{d}");
    assert_eq!(d["state"], "unclaimed", "{d}");
}

#[tokio::test]
async fn unclaimed_v5_client_gets_status_and_stays() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let lobby = TestLobby::start().await;
    let dev = lobby.device("wait-v5");
    let (client, mut el) = rumqttc::v5::AsyncClient::new(v5_options(&lobby, &dev), 10);
    client
        .subscribe(dev.topic("#"), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let p = v5_publish(&mut el).await;
    assert_eq!(p.topic, dev.topic("status").as_bytes());
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v, status(&dev, "unclaimed", None));
    // Keep-alive 5 s: one answered ping means it stayed past a keep-alive period.
    let mut pongs = 0;
    while pongs < 1 {
        if let rumqttc::v5::Event::Incoming(P5::PingResp(_)) = poll_v5(&mut el)
            .await
            .expect("the lobby dropped a waiting device")
        {
            pongs += 1;
        }
    }
    let d = get_device(&lobby, &dev).await;
    assert_eq!(d["connected"], true, "{d}");
}

// ---- live claim → redirect -----------------------------------------------------------------

#[tokio::test]
async fn live_claim_redirects_v4_client_and_closes_after_puback() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("live-v4");
    let (client, mut el) = rumqttc::AsyncClient::new(v4_options(&lobby, &dev), 10);
    client
        .subscribe(dev.topic("#"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let p = v4_publish(&mut el).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        status(&dev, "unclaimed", None)
    );
    let (st, body) = lobby.claim(&token, &dev).await;
    assert_eq!(st, 201, "{body}");
    let p = v4_publish(&mut el).await;
    assert_eq!(p.topic, dev.topic("status"));
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        status(&dev, "ready", Some("acme"))
    );
    let p = v4_publish(&mut el).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    // rumqttc acknowledges the publish; the lobby then closes the connection.
    let mut acked = false;
    loop {
        match poll_v4(&mut el).await {
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::PubAck(_))) => acked = true,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                panic!("unexpected publish after the redirect: {p:?}")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(acked, "closed before the client acknowledged");
    let d = eventually(|| async {
        let d = get_device(&lobby, &dev).await;
        (d["redirected_at"].is_string() && d["connected"] == false).then_some(d)
    })
    .await;
    assert_eq!(d["protocol"], "mqtt3.1.1", "{d}");
    assert_eq!(d["state"], "ready", "{d}");
    assert_eq!(d["tenant"], "acme", "{d}");
}

#[tokio::test]
async fn live_claim_v3_without_ack_is_closed_after_grace() {
    let lobby =
        TestLobby::start_with(|c| c.limits.redirect_grace = Duration::from_millis(500)).await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("noack-v3");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("#")).await, vec![1]);
    expect_status(&mut c, &dev, "unclaimed", None).await;
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    expect_status(&mut c, &dev, "ready", Some("acme")).await;
    let p = expect_publish(&mut c).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    assert_eq!(p.qos, QoS::AtLeastOnce);
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    // No PUBACK, no …/ack: closed once redirect_grace runs out.
    let rest = expect_closed(&mut c).await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn live_claim_v3_ack_topic_closes() {
    let lobby = TestLobby::start_with(|c| c.limits.redirect_grace = Duration::from_secs(60)).await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("acktopic-v3");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let p = expect_publish(&mut c).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    let redirect_id = check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    // An ack naming another redirect does not count.
    c.send(Packet::Publish(codec::Publish {
        qos: QoS::AtLeastOnce,
        topic: dev.topic("ack"),
        pkid: 7,
        payload: json!({"redirect_id": "not-this-one"}).to_string().into(),
        ..Default::default()
    }))
    .await;
    match c.expect().await {
        Packet::PubAck(a) => assert_eq!(a.pkid, 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    ping_ok(&mut c).await;
    c.send(Packet::Publish(codec::Publish {
        qos: QoS::AtMostOnce,
        topic: dev.topic("ack"),
        payload: json!({ "redirect_id": redirect_id }).to_string().into(),
        ..Default::default()
    }))
    .await;
    let rest = expect_closed(&mut c).await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn live_claim_v5_subscribed_gets_publish_then_disconnect_0x9d() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("live-v5");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    assert_eq!(c.subscribe(1, &dev.topic("#")).await, vec![1]);
    expect_status(&mut c, &dev, "unclaimed", None).await;
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    expect_status(&mut c, &dev, "ready", Some("acme")).await;
    let p = expect_publish(&mut c).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    match c.expect().await {
        Packet::Disconnect(d) => {
            assert_eq!(d.reason, 0x9D);
            assert_eq!(
                d.properties.server_reference.as_deref(),
                Some("iot.acme.example:8883")
            );
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(expect_closed(&mut c).await.is_empty());
    let d = eventually(|| async {
        let d = get_device(&lobby, &dev).await;
        (d["redirected_at"].is_string() && d["connected"] == false).then_some(d)
    })
    .await;
    assert_eq!(d["protocol"], "mqtt5", "{d}");
}

#[tokio::test]
async fn live_claim_v5_unsubscribed_gets_only_disconnect_0x9d() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("quiet-v5");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    ping_ok(&mut c).await;
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    match c.expect().await {
        Packet::Disconnect(d) => {
            assert_eq!(d.reason, 0x9D);
            assert_eq!(
                d.properties.server_reference.as_deref(),
                Some("iot.acme.example:8883")
            );
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(expect_closed(&mut c).await.is_empty());
    eventually(|| async {
        get_device(&lobby, &dev).await["redirected_at"]
            .is_string()
            .then_some(())
    })
    .await;
}

// ---- already claimed at connect ------------------------------------------------------------

#[tokio::test]
async fn claimed_v5_connack_carries_reference_and_user_properties() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("claimed-v5");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V5).await;
    c.send_connect("free text id").await;
    let Packet::ConnAck(ack) = c.expect().await else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, 0x9D);
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some("iot.acme.example:8883")
    );
    let props = &ack.properties.user_properties;
    let get = |k: &str| {
        props
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("user property {k} missing: {props:?}"))
    };
    assert_eq!(get("tenant"), "acme");
    assert_eq!(get("thing_name"), "claimed-v5");
    assert!(!get("redirect_id").is_empty());
    assert!(expect_closed(&mut c).await.is_empty());
    let d = eventually(|| async {
        let d = get_device(&lobby, &dev).await;
        d["redirected_at"].is_string().then_some(d)
    })
    .await;
    assert_eq!(d["protocol"], "mqtt5", "{d}");
    assert_eq!(d["thing_name"], "claimed-v5", "{d}");
}

#[tokio::test]
async fn claimed_v3_gets_connack_0_then_redirect_on_subscribe() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("claimed-v3");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    // Subscribed to …/redirect only.
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    ping_ok(&mut c).await;
    assert_eq!(c.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    let p = expect_publish(&mut c).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    assert_eq!(p.qos, QoS::AtLeastOnce);
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    c.send(Packet::PubAck(codec::PubAck {
        pkid: p.pkid,
        ..Default::default()
    }))
    .await;
    assert!(expect_closed(&mut c).await.is_empty());

    // Subscribed to …/#: status (ready) and the redirect.
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("#")).await, vec![1]);
    expect_status(&mut c, &dev, "ready", Some("acme")).await;
    let p = expect_publish(&mut c).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    c.send(Packet::PubAck(codec::PubAck {
        pkid: p.pkid,
        ..Default::default()
    }))
    .await;
    assert!(expect_closed(&mut c).await.is_empty());
    let d = eventually(|| async {
        let d = get_device(&lobby, &dev).await;
        (d["redirected_at"].is_string() && d["connected"] == false).then_some(d)
    })
    .await;
    assert_eq!(d["protocol"], "mqtt3.1.1", "{d}");
}

#[tokio::test]
async fn claimed_v4_rumqttc_gets_redirect_on_subscribe() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("claimed-rumqttc");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let (client, mut el) = rumqttc::AsyncClient::new(v4_options(&lobby, &dev), 10);
    client
        .subscribe(dev.topic("redirect"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let p = v4_publish(&mut el).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    loop {
        if poll_v4(&mut el).await.is_err() {
            break;
        }
    }
}

// ---- takeover ------------------------------------------------------------------------------

#[tokio::test]
async fn takeover_v5_first_gets_0x8e() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("twice-v5");
    let mut first = connected(&lobby, &dev, Protocol::V5).await;
    let mut second = connected(&lobby, &dev, Protocol::V5).await;
    match first.expect().await {
        Packet::Disconnect(d) => assert_eq!(d.reason, 0x8E),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(expect_closed(&mut first).await.is_empty());
    ping_ok(&mut second).await;
    assert_eq!(second.subscribe(1, &dev.topic("status")).await, vec![1]);
    expect_status(&mut second, &dev, "unclaimed", None).await;
    let d = get_device(&lobby, &dev).await;
    assert_eq!(d["connected"], true, "{d}");
}

#[tokio::test]
async fn takeover_v3_first_is_closed() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("twice-v3");
    let mut first = connected(&lobby, &dev, Protocol::V311).await;
    let mut second = connected(&lobby, &dev, Protocol::V311).await;
    assert!(expect_closed(&mut first).await.is_empty());
    ping_ok(&mut second).await;
    // A claim now reaches the second connection.
    let token = redirect_tenant(&lobby).await;
    assert_eq!(second.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let p = expect_publish(&mut second).await;
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
}

// ---- persistence, unclaim, migrate ---------------------------------------------------------

#[tokio::test]
async fn claims_survive_restart() {
    let mut lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("restart");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    lobby.restart().await;
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V5).await;
    c.send_connect("x").await;
    let Packet::ConnAck(ack) = c.expect().await else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, 0x9D);
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some("iot.acme.example:8883")
    );
}

#[tokio::test]
async fn unclaim_while_connected_sends_unclaimed_status() {
    // A long grace keeps the claimed v3.1.1 device (not following …/redirect) connected.
    let lobby = TestLobby::start_with(|c| c.limits.redirect_grace = Duration::from_secs(60)).await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("unclaim");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("status")).await, vec![1]);
    expect_status(&mut c, &dev, "unclaimed", None).await;
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    expect_status(&mut c, &dev, "ready", Some("acme")).await;
    let (st, body) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert!(st == 200 || st == 204, "{st} {body}");
    expect_status(&mut c, &dev, "unclaimed", None).await;
    ping_ok(&mut c).await;
}

/// SPEC §4: "An unclaimed device may wait connected as long as it keeps alive." A v3.1.1 device
/// claimed and then unclaimed before it left must not be closed by the redirect grace that the
/// (withdrawn) redirect armed.
#[tokio::test]
async fn unclaimed_again_v3_is_not_closed_by_redirect_grace() {
    let grace = Duration::from_millis(500);
    let lobby = TestLobby::start_with(|c| c.limits.redirect_grace = grace).await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("unclaim-grace");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("status")).await, vec![1]);
    expect_status(&mut c, &dev, "unclaimed", None).await;
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    expect_status(&mut c, &dev, "ready", Some("acme")).await;
    let (st, _) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert!(st == 200 || st == 204);
    expect_status(&mut c, &dev, "unclaimed", None).await;
    // Let the withdrawn redirect's grace pass (keep-alive is 30 s, so that is not at play).
    tokio::time::sleep(grace * 4).await;
    c.send(Packet::PingReq).await;
    match next_or_close(&mut c).await {
        Some(Packet::PingResp) => {}
        other => panic!("unclaimed device was dropped after the redirect grace: {other:?}"),
    }
}

#[tokio::test]
async fn migrate_gives_new_reference_and_redirect_id() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let (st, body) = lobby
        .call(
            "POST",
            "/v1/tenants",
            &lobby.admin,
            Some(json!({"id": "other", "name": "Other", "endpoint": "iot.other.example", "port": 9883, "region": "eu-west-1"})),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let dev = lobby.device("migrate");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let first = v5_connack(&lobby, &dev).await;
    assert_eq!(first.code, 0x9D);
    assert_eq!(
        first.properties.server_reference.as_deref(),
        Some("iot.acme.example:8883")
    );
    let first_id = user_prop(&first, "redirect_id");
    let (st, body) = lobby
        .call(
            "POST",
            &format!("/v1/devices/{}/migrate", dev.hex()),
            &lobby.admin,
            Some(json!({"tenant": "other"})),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let second = v5_connack(&lobby, &dev).await;
    assert_eq!(second.code, 0x9D);
    assert_eq!(
        second.properties.server_reference.as_deref(),
        Some("iot.other.example:9883")
    );
    assert_eq!(user_prop(&second, "tenant"), "other");
    let second_id = user_prop(&second, "redirect_id");
    assert_ne!(first_id, second_id, "a migration issues a new redirect_id");
}

async fn v5_connack(lobby: &TestLobby, dev: &Device) -> codec::ConnAck {
    let mut c = RawClient::connect(lobby, dev, Protocol::V5).await;
    c.send_connect("m").await;
    match c.expect().await {
        Packet::ConnAck(a) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn user_prop(ack: &codec::ConnAck, key: &str) -> String {
    ack.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no user property {key}: {ack:?}"))
}

// ---- timers --------------------------------------------------------------------------------

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
    match c.expect().await {
        Packet::ConnAck(a) => assert_eq!(a.code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c
}

#[tokio::test]
async fn keep_alive_timeout_v5_gets_0x8d() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("silent-v5");
    let mut c = silent_client(&lobby, &dev, Protocol::V5).await;
    let got = expect_closed(&mut c).await;
    match got.as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason, 0x8D),
        other => panic!("expected DISCONNECT 0x8D then close, got {other:?}"),
    }
}

#[tokio::test]
async fn keep_alive_timeout_v3_closes() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("silent-v3");
    let mut c = silent_client(&lobby, &dev, Protocol::V311).await;
    assert!(expect_closed(&mut c).await.is_empty());
}

#[tokio::test]
async fn connect_timeout_closes_tls_without_connect() {
    let lobby =
        TestLobby::start_with(|c| c.limits.connect_timeout = Duration::from_millis(500)).await;
    let dev = lobby.device("mute");
    let mut s = tls_connect(&lobby, &dev).await.unwrap();
    let mut buf = [0u8; 64];
    match timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {n} bytes before CONNECT"),
        Err(_) => panic!("connection without CONNECT stayed open past connect_timeout"),
    }
}

// ---- shutdown ------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_sends_v5_disconnect_0x8b() {
    let mut lobby = TestLobby::start().await;
    let dev = lobby.device("bye");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    let l = lobby.lobby.take().unwrap();
    let (_, got) = tokio::join!(l.stop(), expect_closed(&mut c));
    match got.as_slice() {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason, 0x8B);
            assert_eq!(d.properties.server_reference, None);
        }
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_with_server_reference_sends_0x9c() {
    let mut lobby =
        TestLobby::start_with(|c| c.shutdown.server_reference = "other:8883".into()).await;
    let dev = lobby.device("bye-ref");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    let l = lobby.lobby.take().unwrap();
    let (_, got) = tokio::join!(l.stop(), expect_closed(&mut c));
    match got.as_slice() {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason, 0x9C);
            assert_eq!(d.properties.server_reference.as_deref(), Some("other:8883"));
        }
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
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
    use tokio::io::AsyncWriteExt;
    s.write_all(&out[..4]).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = [0u8; 64];
    match timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {n} bytes for half a CONNECT"),
        Err(_) => panic!("half a CONNECT kept the connection open past connect_timeout"),
    }
}

#[tokio::test]
async fn handshake_timeout_closes_silent_tcp() {
    let lobby =
        TestLobby::start_with(|c| c.limits.handshake_timeout = Duration::from_millis(500)).await;
    let mut tcp = tokio::net::TcpStream::connect(lobby.mqtt_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    match timeout(WAIT, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {n} bytes without a ClientHello"),
        Err(_) => panic!("silent TCP connection stayed open past handshake_timeout"),
    }
    // Still serving.
    let dev = lobby.device("after-silent-tcp");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    ping_ok(&mut c).await;
}
