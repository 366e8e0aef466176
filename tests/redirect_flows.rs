//! Claim → redirect flows of SPEC §4 over real TLS with real clients: a live claim sends a
//! waiting device on (v3.1.1 by publish + close, v5 by DISCONNECT 0x9D with the Server
//! Reference), a device claimed before it connects is sent on at CONNACK (v5) or on SUBSCRIBE
//! (v3.1.1), claims survive a restart, and a migration gives a new reference.
mod common;

use std::time::Duration;

use common::flows::*;
use common::*;
use lobby::mqtt::codec::{self, Packet, Protocol, QoS};
use serde_json::{json, Value};

/// The next packet is DISCONNECT 0x9D with `acme`'s Server Reference, then the close.
async fn expect_sent_on(c: &mut RawClient) {
    let d = c.expect_disconnect(0x9D).await;
    assert_eq!(
        d.properties.server_reference.as_deref(),
        Some("iot.acme.example:8883")
    );
}

/// PUBACKs the redirect `p`; the lobby must then close the connection without another packet.
async fn ack_and_expect_close(c: &mut RawClient, p: &codec::Publish) {
    c.send(Packet::PubAck(codec::PubAck {
        pkid: p.pkid,
        ..Default::default()
    }))
    .await;
    assert!(c.expect_closed().await.is_empty());
}

/// The user property `key` of a CONNACK, which must be there.
fn user_prop(ack: &codec::ConnAck, key: &str) -> String {
    ack.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no user property {key}: {ack:?}"))
}

// ---- live claim → redirect -----------------------------------------------------------------

#[tokio::test]
async fn live_claim_redirects_v4_client_and_closes_after_puback() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("live-v4");
    let (_client, mut el) = v4_subscribed(&lobby, &dev, "#").await;
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
    let d = redirected_and_gone(&lobby, &dev).await;
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
    let mut c = claimed_while_subscribed(&lobby, &token, &dev, Protocol::V311, "#").await;
    let p = c.expect_publish().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    check_acme_redirect(&p, &dev);
    // No PUBACK, no …/ack: closed once redirect_grace runs out.
    let rest = c.expect_closed().await;
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
    let p = c.expect_publish().await;
    let redirect_id = check_acme_redirect(&p, &dev);
    // An ack naming another redirect does not count.
    let other = json!({"redirect_id": "not-this-one"}).to_string();
    c.send(publish(
        &dev.topic("ack"),
        QoS::AtLeastOnce,
        7,
        other.as_bytes(),
    ))
    .await;
    match c.expect().await {
        Packet::PubAck(a) => assert_eq!(a.pkid, 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    c.ping_ok().await;
    let ack = json!({ "redirect_id": redirect_id }).to_string();
    c.send(publish(
        &dev.topic("ack"),
        QoS::AtMostOnce,
        0,
        ack.as_bytes(),
    ))
    .await;
    let rest = c.expect_closed().await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn live_claim_v5_subscribed_gets_publish_then_disconnect_0x9d() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("live-v5");
    let mut c = claimed_while_subscribed(&lobby, &token, &dev, Protocol::V5, "#").await;
    let p = c.expect_publish().await;
    check_acme_redirect(&p, &dev);
    expect_sent_on(&mut c).await;
    let d = redirected_and_gone(&lobby, &dev).await;
    assert_eq!(d["protocol"], "mqtt5", "{d}");
}

#[tokio::test]
async fn live_claim_v5_unsubscribed_gets_only_disconnect_0x9d() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("quiet-v5");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.ping_ok().await;
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    expect_sent_on(&mut c).await;
    device_when(&lobby, &dev, |d| d["redirected_at"].is_string()).await;
}

// ---- already claimed at connect ------------------------------------------------------------

#[tokio::test]
async fn claimed_v5_connack_carries_reference_and_user_properties() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("claimed-v5");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let (mut c, ack) = connack(&lobby, &dev, Protocol::V5, "free text id").await;
    assert_sent_on(&ack, "iot.acme.example:8883");
    assert_eq!(user_prop(&ack, "tenant"), "acme");
    assert_eq!(user_prop(&ack, "thing_name"), "claimed-v5");
    assert!(!user_prop(&ack, "redirect_id").is_empty());
    assert!(c.expect_closed().await.is_empty());
    let d = device_when(&lobby, &dev, |d| d["redirected_at"].is_string()).await;
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
    c.ping_ok().await;
    assert_eq!(c.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    let p = c.expect_publish().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    check_acme_redirect(&p, &dev);
    ack_and_expect_close(&mut c, &p).await;

    // Subscribed to …/#: status (ready) and the redirect.
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("#")).await, vec![1]);
    expect_status(&mut c, &dev, "ready", Some("acme")).await;
    let p = c.expect_publish().await;
    check_acme_redirect(&p, &dev);
    ack_and_expect_close(&mut c, &p).await;
    let d = redirected_and_gone(&lobby, &dev).await;
    assert_eq!(d["protocol"], "mqtt3.1.1", "{d}");
}

#[tokio::test]
async fn claimed_v4_rumqttc_gets_redirect_on_subscribe() {
    let lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("claimed-rumqttc");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let (_client, mut el) = v4_subscribed(&lobby, &dev, "redirect").await;
    let p = v4_publish(&mut el).await;
    assert_eq!(p.topic, dev.topic("redirect"));
    check_redirect(&p.payload, &dev, "acme", "iot.acme.example", 8883);
    loop {
        if poll_v4(&mut el).await.is_err() {
            break;
        }
    }
}

// ---- persistence, migrate ------------------------------------------------------------------

#[tokio::test]
async fn claims_survive_restart() {
    let mut lobby = TestLobby::start().await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("restart");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    lobby.restart().await;
    let (_c, ack) = connack(&lobby, &dev, Protocol::V5, "x").await;
    assert_sent_on(&ack, "iot.acme.example:8883");
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
    let (_, first) = connack(&lobby, &dev, Protocol::V5, "m").await;
    assert_sent_on(&first, "iot.acme.example:8883");
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
    let (_, second) = connack(&lobby, &dev, Protocol::V5, "m").await;
    assert_sent_on(&second, "iot.other.example:9883");
    assert_eq!(user_prop(&second, "tenant"), "other");
    let second_id = user_prop(&second, "redirect_id");
    assert_ne!(first_id, second_id, "a migration issues a new redirect_id");
}
