//! Bridge mode under change (issue 12): a PATCH of a bridge tenant's `topics` or endpoint
//! reaches devices already connected, and one publish the tenant's broker will never take
//! (AWS IoT closes the connection on a topic its policy forbids) does not stall the others.
//!
//! Tenant brokers: mosquitto (`upstream::Upstream`) for the settings changes, and
//! `upstream::strict::Strict` for the poison message, which closes the connection like AWS IoT.
mod common;
mod upstream;

use std::collections::BTreeSet;
use std::time::Duration;

use common::flows::device_when;
use common::*;
use lobby::mqtt::codec::{Packet, Protocol, QoS};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};
use upstream::device::*;
use upstream::strict::Strict;
use upstream::{Upstream, LONG, SYS_SUBSCRIPTIONS};

const THINGS: &[&str] = &["things/{thing_name}/#"];
/// The default `limits.bridge_max_redeliveries`.
const REDELIVERIES: u64 = 3;

/// Creates the bridge tenant `id` for a broker on `port` with `bridge` settings; its token.
async fn bridge_tenant(lobby: &TestLobby, id: &str, port: u16, bridge: Value) -> String {
    let (st, body) = lobby
        .call(
            "POST",
            "/v1/tenants",
            &lobby.admin,
            Some(json!({
                "id": id,
                "name": id,
                "mode": "bridge",
                "endpoint": "localhost",
                "port": port,
                "backend": {"kind": "none"},
                "bridge": bridge,
            })),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

async fn patch(lobby: &TestLobby, id: &str, body: Value) {
    let path = format!("/v1/tenants/{id}");
    let (st, body) = lobby.call("PATCH", &path, &lobby.admin, Some(body)).await;
    assert_eq!(st, 200, "{body}");
}

/// A new device `name` claimed by the tenant of `token`, connected over `protocol`, CONNACK 0.
async fn bridged(
    lobby: &TestLobby,
    token: &str,
    name: &str,
    protocol: Protocol,
) -> (Device, RawClient) {
    let dev = lobby.device(name);
    let (st, body) = lobby.claim(token, &dev).await;
    assert_eq!(st, 201, "{body}");
    device_when(lobby, &dev, |d| d["state"] == "ready").await;
    let (c, ack) = connack(lobby, &dev, protocol, name).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    (dev, c)
}

/// The value of `name{tenant="<tenant>"}` on /metrics (0 when not shown yet).
async fn counter(lobby: &TestLobby, name: &str, tenant: &str) -> f64 {
    let label = format!("tenant=\"{tenant}\"");
    lobby
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- topics narrowed under a live session -------------------------------------------------

#[tokio::test]
async fn narrowed_topics_apply_to_live_sessions_at_once() {
    let up = Upstream::start().await;
    let obs = up.observer().await;
    let lobby = TestLobby::start().await;
    let id = "narrow";
    let wide = ["things/{thing_name}/#", "fleet/#"];
    let token = bridge_tenant(&lobby, id, up.port(), up.bridge(&wide, 2)).await;
    let (_, mut c) = bridged(&lobby, &token, "narrow-v5", Protocol::V5).await;
    let (_, mut c3) = bridged(&lobby, &token, "narrow-v311", Protocol::V311).await;
    assert_eq!(c.subscribe(1, "fleet/all").await, vec![1]);
    assert_eq!(c.subscribe(2, "things/narrow-v5/cmd/#").await, vec![1]);
    warm_up(&obs, &mut c, "fleet/all").await;
    warm_up(&obs, &mut c, "things/narrow-v5/cmd/probe").await;
    let base = obs.settled_sys(SYS_SUBSCRIPTIONS).await;

    patch(&lobby, id, json!({"bridge": up.bridge(THINGS, 2)})).await;
    // The subscription outside the new topics is released upstream...
    obs.wait_sys(SYS_SUBSCRIPTIONS, base - 1).await;
    // ...and what the tenant sends there no longer reaches the device (the marker after it
    // comes first), while its other subscription still works.
    obs.publish("fleet/all", rumqttc::QoS::AtLeastOnce, "gone")
        .await;
    obs.publish(
        "things/narrow-v5/cmd/m",
        rumqttc::QoS::AtLeastOnce,
        "marker",
    )
    .await;
    match next_within(&mut c, WAIT).await {
        Packet::Publish(p) => assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("things/narrow-v5/cmd/m", &b"marker"[..]),
            "{p:?}"
        ),
        other => panic!("expected the marker, got {other:?}"),
    }
    // Publishing there is refused (v5: PUBACK 0x87, the session stays)...
    send_publish(&mut c, 3, "fleet/x", QoS::AtLeastOnce, "refused").await;
    expect_puback(&mut c, 3, 0x87).await;
    send_publish(&mut c, 4, "things/narrow-v5/t", QoS::AtLeastOnce, "kept").await;
    expect_puback(&mut c, 4, 0).await;
    obs.wait_for("things/narrow-v5/t", b"kept", WAIT).await;
    // ...and a new subscription there too.
    assert_eq!(c.subscribe(5, "fleet/all").await, vec![0x87]);
    // v3.1.1: a refused publish closes the connection, without an acknowledgement.
    send_publish(&mut c3, 1, "fleet/x", QoS::AtLeastOnce, "refused").await;
    let before_close = c3.expect_closed().await;
    assert!(
        !before_close
            .iter()
            .any(|p| matches!(p, Packet::PubAck(a) if a.pkid == 1)),
        "{before_close:?}"
    );
    assert!(obs.on("fleet/x").is_empty(), "{:?}", obs.on("fleet/x"));
}

// ---- endpoint moved under a live session --------------------------------------------------

async fn endpoint_change_moves_the_session(protocol: Protocol, name: &str) {
    let mut up1 = Upstream::start().await;
    let obs1 = up1.observer().await;
    let up2 = Upstream::start().await;
    let obs2 = up2.observer().await;
    let lobby = TestLobby::start().await;
    let id = format!("move-{name}");
    let token = bridge_tenant(&lobby, &id, up1.port(), up1.bridge(THINGS, 2)).await;
    let (dev, mut c) = bridged(&lobby, &token, name, protocol).await;
    let topic = format!("things/{name}/telemetry");
    let cmd = format!("things/{name}/cmd/#");
    assert_eq!(c.subscribe(1, &cmd).await, vec![1]);
    warm_up(&obs1, &mut c, &format!("things/{name}/cmd/probe")).await;
    send_publish(&mut c, 2, &topic, QoS::AtLeastOnce, "before").await;
    expect_puback(&mut c, 2, 0).await;
    obs1.wait_for(&topic, b"before", WAIT).await;

    // The old broker goes away with publishes in flight, then the tenant moves.
    up1.stop().await;
    let pkids: Vec<u16> = (10..15).collect();
    for (i, pkid) in pkids.iter().enumerate() {
        send_publish(&mut c, *pkid, &topic, QoS::AtLeastOnce, &format!("m{i}")).await;
    }
    assert!(
        timeout(Duration::from_millis(500), c.recv()).await.is_err(),
        "nothing may be acknowledged that no broker acknowledged"
    );
    patch(
        &lobby,
        &id,
        json!({"port": up2.port(), "bridge": up2.bridge(THINGS, 2)}),
    )
    .await;

    // The session stays, and what was in flight is acknowledged once the new broker has it.
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + LONG;
    while acked.len() < pkids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_within(&mut c, left).await {
            Packet::PubAck(a) if a.reason == 0 && pkids.contains(&a.pkid) => {
                acked.insert(a.pkid);
            }
            other => panic!("expected the held PUBACKs, got {other:?}"),
        }
    }
    for i in 0..pkids.len() {
        let m = obs2
            .wait_for(&topic, format!("m{i}").as_bytes(), WAIT)
            .await;
        assert_eq!(m.qos, 1, "{m:?}");
    }
    // New traffic goes to the new broker, both ways.
    send_publish(&mut c, 20, &topic, QoS::AtLeastOnce, "after").await;
    expect_puback(&mut c, 20, 0).await;
    obs2.wait_for(&topic, b"after", WAIT).await;
    warm_up(&obs2, &mut c, &format!("things/{name}/cmd/probe")).await;
    c.ping_ok().await;
    assert_eq!(lobby.admin_device(&dev).await["connected"], true);
}

#[tokio::test]
async fn an_endpoint_change_moves_live_sessions_without_loss_v5() {
    endpoint_change_moves_the_session(Protocol::V5, "move-v5").await;
}

#[tokio::test]
async fn an_endpoint_change_moves_live_sessions_without_loss_v311() {
    endpoint_change_moves_the_session(Protocol::V311, "move-v311").await;
}

// ---- a poison message ---------------------------------------------------------------------

async fn poison_fails_alone(protocol: Protocol, name: &str) {
    let strict = Strict::start("things/+/forbidden").await;
    let lobby = TestLobby::start().await;
    // The metrics recorder is global to the test process: a tenant id of its own.
    let id = format!("poison-{name}");
    // One upstream connection: every device of the tenant rides the poisoned one.
    let token = bridge_tenant(&lobby, &id, strict.port(), strict.bridge(THINGS, 1)).await;
    let (_, mut bad) = bridged(&lobby, &token, name, protocol).await;
    let good_name = format!("{name}-good");
    let (_, mut good) = bridged(&lobby, &token, &good_name, Protocol::V5).await;
    let good_topic = format!("things/{good_name}/t");
    send_publish(&mut good, 1, &good_topic, QoS::AtLeastOnce, "first").await;
    expect_puback(&mut good, 1, 0).await;
    let before = counter(&lobby, "lobby_bridge_poison_total", &id).await;

    send_publish(
        &mut bad,
        1,
        &format!("things/{name}/forbidden"),
        QoS::AtLeastOnce,
        "poison",
    )
    .await;
    send_publish(&mut good, 2, &good_topic, QoS::AtLeastOnce, "during").await;
    match protocol {
        // v5: a negative acknowledgement, and the device stays.
        Protocol::V5 => {
            expect_puback_within(&mut bad, 1, 0x80, LONG).await;
            bad.ping_ok().await;
        }
        // v3.1.1 has no negative PUBACK: the connection is closed without one.
        Protocol::V311 => {
            let before_close = bad.expect_closed().await;
            assert!(before_close.is_empty(), "{before_close:?}");
        }
    }
    // The other device's publish, queued behind the poison on the same connection, goes.
    expect_puback_within(&mut good, 2, 0, LONG).await;
    send_publish(&mut good, 3, &good_topic, QoS::AtLeastOnce, "after").await;
    expect_puback(&mut good, 3, 0).await;
    let accepted: Vec<Vec<u8>> = strict
        .accepted()
        .into_iter()
        .filter(|m| m.topic == good_topic)
        .map(|m| m.payload)
        .collect();
    for want in [&b"first"[..], b"during", b"after"] {
        assert!(accepted.iter().any(|p| p == want), "{accepted:?}");
    }
    // Sent once, then redelivered up to the cap, each time closing the connection.
    assert_eq!(strict.kicked(), 1 + REDELIVERIES);
    let after = eventually(|| async {
        let v = counter(&lobby, "lobby_bridge_poison_total", &id).await;
        (v > before).then_some(v)
    })
    .await;
    assert_eq!(after - before, 1.0);
}

#[tokio::test]
async fn a_poison_message_fails_alone_v5() {
    poison_fails_alone(Protocol::V5, "poison-v5").await;
}

#[tokio::test]
async fn a_poison_message_fails_alone_v311() {
    poison_fails_alone(Protocol::V311, "poison-v311").await;
}
