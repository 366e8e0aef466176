//! SPEC §4 device-flow helpers shared by the device-flow test files: the exact `…/status` and
//! `…/redirect` payloads, and rumqttc (v4 and v5) clients over the lobby's TLS.

use std::collections::BTreeSet;
use std::time::Duration;

use lobby::mqtt::codec::{self, Protocol};
use serde_json::{json, Value};
use tokio::time::timeout;

use super::{client_tls, connected, Device, RawClient, TestLobby, WAIT};

/// The exact `…/status` payload of SPEC §4.
pub fn status(dev: &Device, state: &str, tenant: Option<&str>) -> Value {
    json!({"v": 1, "device_id": dev.hex(), "state": state, "tenant": tenant})
}

/// Checks every field of a `…/redirect` payload; returns its `redirect_id`.
pub fn check_redirect(
    payload: &[u8],
    dev: &Device,
    tenant: &str,
    endpoint: &str,
    port: u16,
) -> String {
    let p: Value = serde_json::from_slice(payload).expect("redirect payload is JSON");
    let keys: BTreeSet<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = [
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

/// The tenant the device-flow tests claim into: `acme`, redirecting to `iot.acme.example:8883`.
pub async fn redirect_tenant(lobby: &TestLobby) -> String {
    lobby.tenant("acme", "iot.acme.example").await
}

/// Checks a `…/redirect` to `acme` (see [`redirect_tenant`]); returns its `redirect_id`.
pub fn check_acme_redirect(p: &codec::Publish, dev: &Device) -> String {
    assert_eq!(p.topic, dev.topic("redirect"));
    check_redirect(&p.payload, dev, "acme", "iot.acme.example", 8883)
}

/// The next PUBLISH must be `dev`'s status with `state`/`tenant`.
pub async fn expect_status(c: &mut RawClient, dev: &Device, state: &str, tenant: Option<&str>) {
    let p = c.expect_publish().await;
    assert_eq!(p.topic, dev.topic("status"));
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v, status(dev, state, tenant));
}

/// A raw client of `dev` subscribed to `…/{leaf}` that saw its unclaimed status, then the
/// ready status of its claim by `token` (the `acme` tenant).
pub async fn claimed_while_subscribed(
    lobby: &TestLobby,
    token: &str,
    dev: &Device,
    protocol: Protocol,
    leaf: &str,
) -> RawClient {
    let mut c = connected(lobby, dev, protocol).await;
    assert_eq!(c.subscribe(1, &dev.topic(leaf)).await, vec![1]);
    expect_status(&mut c, dev, "unclaimed", None).await;
    assert_eq!(lobby.claim(token, dev).await.0, 201);
    expect_status(&mut c, dev, "ready", Some("acme")).await;
    c
}

/// Polls the operator's view of `dev` (each read must succeed) until `done` holds; returns it.
pub async fn device_when(lobby: &TestLobby, dev: &Device, done: impl Fn(&Value) -> bool) -> Value {
    super::eventually(|| async {
        let d = lobby.admin_device(dev).await;
        done(&d).then_some(d)
    })
    .await
}

/// The operator's view of `dev` once it was redirected and is no longer connected.
pub async fn redirected_and_gone(lobby: &TestLobby, dev: &Device) -> Value {
    device_when(lobby, dev, |d| {
        d["redirected_at"].is_string() && d["connected"] == false
    })
    .await
}

// ---- rumqttc -------------------------------------------------------------------------------

pub fn v4_options(lobby: &TestLobby, dev: &Device) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(dev.name.clone(), "localhost", lobby.mqtt_addr().port());
    o.set_keep_alive(Duration::from_secs(1));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_tls(lobby, dev)),
    ));
    o
}

pub fn v5_options(lobby: &TestLobby, dev: &Device) -> rumqttc::v5::MqttOptions {
    let mut o =
        rumqttc::v5::MqttOptions::new(dev.name.clone(), "localhost", lobby.mqtt_addr().port());
    // rumqttc v5 refuses keep-alives under 5 s.
    o.set_keep_alive(Duration::from_secs(5));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_tls(lobby, dev)),
    ));
    o
}

/// A rumqttc v4 client of `dev` that asked to subscribe to `…/{leaf}` at QoS 1 (the SUBSCRIBE
/// goes out once the event loop is polled). Keep the client: dropping it ends the event loop.
pub async fn v4_subscribed(
    lobby: &TestLobby,
    dev: &Device,
    leaf: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, el) = rumqttc::AsyncClient::new(v4_options(lobby, dev), 10);
    client
        .subscribe(dev.topic(leaf), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    (client, el)
}

pub async fn poll_v4(
    el: &mut rumqttc::EventLoop,
) -> Result<rumqttc::Event, rumqttc::ConnectionError> {
    timeout(WAIT, el.poll())
        .await
        .expect("rumqttc v4: no event in time")
}

pub async fn poll_v5(
    el: &mut rumqttc::v5::EventLoop,
) -> Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError> {
    timeout(WAIT, el.poll())
        .await
        .expect("rumqttc v5: no event in time")
}

/// The next incoming PUBLISH on a rumqttc v4 event loop.
pub async fn v4_publish(el: &mut rumqttc::EventLoop) -> rumqttc::Publish {
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
pub async fn v5_publish(el: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::mqttbytes::v5::Publish {
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
