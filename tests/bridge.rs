//! Bridge mode (SPEC §4–§5, issue 4) against a real broker as the tenant's endpoint: mosquitto
//! with mutual TLS on a free port (`upstream`), watched by a plain client of that broker.
//!
//! A claimed device of a `mode = "bridge"` tenant gets CONNACK 0 and stays; its publishes on
//! the tenant's `topics` (with `{thing_name}` and `{device_id}` filled in) are forwarded
//! verbatim, QoS 1 acknowledged only after the broker acknowledged; its subscriptions become
//! reference-counted upstream subscriptions; while the broker is down QoS 1 stays unacknowledged
//! up to the per-device bound, past which the device is disconnected; an unclaim releases its
//! upstream subscriptions and it waits as `unclaimed`.
//!
//! Device-side subscriptions are "warmed up" with probe messages (payload [`PROBE`]) until one
//! arrives, since the contract does not say whether a SUBACK waits for the upstream SUBACK;
//! the readers below skip probes.
mod common;
mod upstream;

use std::time::Duration;

use common::flows::{device_when, status};
use common::*;
use lobby::mqtt::codec::{Packet, Protocol, QoS};
use serde_json::{json, Value};
use tokio::time::Instant;
use upstream::device::*;
use upstream::{Observer, Upstream, LONG, SYS_CLIENTS, SYS_SUBSCRIPTIONS};

const TENANT: &str = "acme";
/// Un-acknowledged QoS 1 publishes a bridged device may have in flight (v5 Receive Maximum).
const INFLIGHT: u16 = 32;
/// The tenant topics of most tests.
const THINGS: &[&str] = &["things/{thing_name}/#"];

/// A broker, its observer and a lobby with the bridge tenant `acme` (`topics`, `pool_size`).
struct Setup {
    up: Upstream,
    obs: Observer,
    lobby: TestLobby,
    token: String,
}

async fn setup(topics: &[&str], pool_size: u16) -> Setup {
    setup_tenant(TENANT, topics, pool_size).await
}

/// [`setup`] with the tenant id `tenant`.
async fn setup_tenant(tenant: &str, topics: &[&str], pool_size: u16) -> Setup {
    let up = Upstream::start().await;
    let obs = up.observer().await;
    let lobby = TestLobby::start().await;
    let (status, body) = lobby
        .call(
            "POST",
            "/v1/tenants",
            &lobby.admin,
            Some(json!({
                "id": tenant,
                "name": "Acme",
                "mode": "bridge",
                "endpoint": "localhost",
                "port": up.port(),
                "backend": {"kind": "none"},
                "bridge": up.bridge(topics, pool_size),
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["tenant"]["mode"], "bridge", "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    Setup {
        up,
        obs,
        lobby,
        token,
    }
}

impl Setup {
    /// A new device named `name` (its CN, so its `thing_name`), claimed by `acme` (`ready`),
    /// connected with `protocol`: CONNACK 0, no redirect; on v5 Receive Maximum = the bound.
    async fn bridged(&self, name: &str, protocol: Protocol) -> (Device, RawClient) {
        let dev = self.lobby.device(name);
        let (st, body) = self.lobby.claim(&self.token, &dev).await;
        assert_eq!(st, 201, "{body}");
        device_when(&self.lobby, &dev, |d| d["state"] == "ready").await;
        let (c, ack) = connack(&self.lobby, &dev, protocol, name).await;
        assert_eq!(ack.code, 0, "a bridged device is not redirected: {ack:?}");
        assert_eq!(ack.properties.server_reference, None, "{ack:?}");
        if protocol == Protocol::V5 {
            assert_eq!(ack.properties.receive_maximum, Some(INFLIGHT), "{ack:?}");
        }
        (dev, c)
    }
}

/// `…/status` of `dev`, read (skipping probes) as the next PUBLISH.
async fn expect_status(c: &mut RawClient, dev: &Device, state: &str, tenant: Option<&str>) {
    let p = next_publish(c).await;
    assert_eq!(p.topic, dev.topic("status"), "{p:?}");
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v, status(dev, state, tenant));
}

/// `lobby_bridge_upstream_connected` of `tenant` (summed over any other labels), if shown.
async fn upstream_connected(lobby: &TestLobby, tenant: &str) -> Option<f64> {
    let text = lobby.metrics().await;
    let label = format!("tenant=\"{tenant}\"");
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("lobby_bridge_upstream_connected{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

// ---- 1. round trip, both ways, QoS 0 and 1 ------------------------------------------------

async fn round_trip(protocol: Protocol, name: &str) {
    let s = setup(THINGS, 2).await;
    let (dev, mut c) = s.bridged(name, protocol).await;
    let telemetry = format!("things/{name}/telemetry");

    // Device → tenant.
    send_publish(&mut c, 0, &telemetry, QoS::AtMostOnce, "q0-up").await;
    send_publish(&mut c, 1, &telemetry, QoS::AtLeastOnce, "q1-up").await;
    expect_puback(&mut c, 1, 0).await;
    let m1 = s.obs.wait_for(&telemetry, b"q1-up", WAIT).await;
    assert_eq!(m1.qos, 1, "forwarded at its QoS: {m1:?}");
    let m0 = s.obs.wait_for(&telemetry, b"q0-up", WAIT).await;
    assert_eq!(m0.qos, 0, "forwarded at its QoS: {m0:?}");

    // Tenant → device.
    let filter = format!("things/{name}/cmd/#");
    assert_eq!(c.subscribe(2, &filter).await, vec![1]);
    warm_up(&s.obs, &mut c, &format!("things/{name}/cmd/probe")).await;
    let cmd = format!("things/{name}/cmd/x");
    s.obs
        .publish(&cmd, rumqttc::QoS::AtLeastOnce, "q1-down")
        .await;
    expect_message(&mut c, &cmd, "q1-down", QoS::AtLeastOnce).await;
    s.obs
        .publish(&cmd, rumqttc::QoS::AtMostOnce, "q0-down")
        .await;
    expect_message(&mut c, &cmd, "q0-down", QoS::AtMostOnce).await;

    // Its own prefix is still the lobby's: the status says ready with the tenant.
    assert_eq!(c.subscribe(3, &dev.topic("status")).await, vec![1]);
    expect_status(&mut c, &dev, "ready", Some(TENANT)).await;
    c.ping_ok().await;
    let d = s.lobby.admin_device(&dev).await;
    assert_eq!(d["connected"], true, "{d}");
    assert_eq!(d["tenant"], TENANT, "{d}");
}

#[tokio::test]
async fn round_trip_v311() {
    round_trip(Protocol::V311, "rt-v311").await;
}

#[tokio::test]
async fn round_trip_v5() {
    round_trip(Protocol::V5, "rt-v5").await;
}

// ---- 1b. certificate names are attacker input (issue 12) ------------------------------------

/// Devices whose CN is `+`, `#`, `a/b`, `$SYS`, or the victim's own CN, in a tenant with
/// `things/{thing_name}/#`: each is bridged on `things/<its device_id>/#` and nothing else. It
/// cannot subscribe to the victim's topics or publish on them, gets none of the victim's
/// messages, and its own topics work both ways.
#[tokio::test]
async fn hostile_cns_reach_only_their_own_bridged_topics() {
    let s = setup(THINGS, 2).await;
    let (victim, mut v) = s.bridged("victim", Protocol::V5).await;
    assert_eq!(v.subscribe(1, "things/victim/#").await, vec![1]);
    warm_up(&s.obs, &mut v, "things/victim/probe").await;
    for (i, cn) in ["+", "#", "a/b", "$SYS", "victim"].into_iter().enumerate() {
        let dev = s.lobby.device(cn);
        let (st, body) = s.lobby.claim(&s.token, &dev).await;
        assert_eq!(st, 201, "{body}");
        let (mut c, ack) = connack(&s.lobby, &dev, Protocol::V5, "attacker").await;
        assert_eq!(ack.code, 0, "{cn:?}: {ack:?}");
        let own = format!("things/{}", dev.hex());
        // Tenant → device: only its own topics.
        for (n, f) in ["things/victim/#", "things/+/#", "things/#", "#"]
            .into_iter()
            .enumerate()
        {
            let got = c.subscribe(n as u16 + 1, f).await;
            assert_eq!(got, vec![0x87], "{cn:?} subscribing {f}");
        }
        assert_eq!(
            c.subscribe(10, &format!("{own}/cmd/#")).await,
            vec![1],
            "{cn:?}"
        );
        warm_up(&s.obs, &mut c, &format!("{own}/cmd/probe")).await;
        // Device → tenant: the victim's topic is refused, its own goes through.
        let forged = format!("forged-{i}");
        send_publish(&mut c, 11, "things/victim/cmd", QoS::AtLeastOnce, &forged).await;
        expect_puback(&mut c, 11, 0x87).await;
        send_publish(&mut c, 12, &format!("{own}/up"), QoS::AtLeastOnce, "mine").await;
        expect_puback(&mut c, 12, 0).await;
        s.obs.wait_for(&format!("{own}/up"), b"mine", WAIT).await;
        // The victim's message reaches the victim only: the next thing this device gets is
        // its own message, sent after the victim's.
        let for_victim = format!("for-victim-{i}");
        s.obs
            .publish(
                "things/victim/cmd",
                rumqttc::QoS::AtLeastOnce,
                for_victim.clone(),
            )
            .await;
        expect_message(&mut v, "things/victim/cmd", &for_victim, QoS::AtLeastOnce).await;
        s.obs
            .publish(&format!("{own}/cmd/x"), rumqttc::QoS::AtLeastOnce, "for-me")
            .await;
        expect_message(&mut c, &format!("{own}/cmd/x"), "for-me", QoS::AtLeastOnce).await;
        assert!(
            s.obs
                .on("things/victim/cmd")
                .iter()
                .all(|m| m.payload != forged.as_bytes()),
            "{cn:?}: a forged publish reached the tenant"
        );
    }
    // The device with the victim's CN was named apart.
    let d = s.lobby.admin_device(&victim).await;
    assert_eq!(d["thing_name"], "victim", "{d}");
}

// ---- 2. QoS 1 acknowledged only after the broker acknowledged -------------------------------

async fn outage_keeps_qos1_unacked(protocol: Protocol, name: &str) {
    let mut s = setup(THINGS, 2).await;
    let (_dev, mut c) = s.bridged(name, protocol).await;
    let topic = format!("things/{name}/telemetry");
    // The bridge works before the outage.
    send_publish(&mut c, 1, &topic, QoS::AtLeastOnce, "before").await;
    expect_puback(&mut c, 1, 0).await;
    s.obs.wait_for(&topic, b"before", WAIT).await;

    s.up.stop().await;
    let pkids: Vec<u16> = (10..15).collect();
    for (i, pkid) in pkids.iter().enumerate() {
        send_publish(&mut c, *pkid, &topic, QoS::AtLeastOnce, &format!("m{i}")).await;
    }
    // Nothing may be acknowledged that the broker did not acknowledge.
    silent_for(&mut c, Duration::from_secs(1)).await;

    s.up.restart().await;
    let mut acked = std::collections::BTreeSet::new();
    let deadline = Instant::now() + LONG;
    while acked.len() < pkids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_within(&mut c, left).await {
            Packet::PubAck(a) => {
                assert_eq!(a.reason, 0, "{a:?}");
                assert!(pkids.contains(&a.pkid), "{a:?}");
                acked.insert(a.pkid);
            }
            other => panic!("expected the PUBACKs, got {other:?}"),
        }
    }
    // Zero loss: every acknowledged message reached the broker (duplicates allowed).
    for i in 0..pkids.len() {
        let payload = format!("m{i}");
        let m = s.obs.wait_for(&topic, payload.as_bytes(), LONG).await;
        assert_eq!(m.qos, 1, "{m:?}");
    }
    // And the bridge carries new traffic after the outage.
    send_publish(&mut c, 20, &topic, QoS::AtLeastOnce, "after").await;
    expect_puback(&mut c, 20, 0).await;
    s.obs.wait_for(&topic, b"after", WAIT).await;
}

#[tokio::test]
async fn qos1_acked_only_after_upstream_ack_across_restart_v311() {
    outage_keeps_qos1_unacked(Protocol::V311, "outage-v311").await;
}

#[tokio::test]
async fn qos1_acked_only_after_upstream_ack_across_restart_v5() {
    outage_keeps_qos1_unacked(Protocol::V5, "outage-v5").await;
}

// ---- 3. subscription reference counting ---------------------------------------------------

#[tokio::test]
async fn upstream_subscriptions_are_reference_counted() {
    let s = setup(&["fleet/#", "things/{thing_name}/#"], 2).await;
    let (_a, mut ca) = s.bridged("fleet-a", Protocol::V311).await;
    let (_b, mut cb) = s.bridged("fleet-b", Protocol::V5).await;
    // A marker channel for A, to show what A did not get.
    assert_eq!(ca.subscribe(1, "things/fleet-a/cmd/#").await, vec![1]);
    warm_up(&s.obs, &mut ca, "things/fleet-a/cmd/probe").await;
    let base = s.obs.settled_sys(SYS_SUBSCRIPTIONS).await;

    // Two devices, one filter: one upstream subscription.
    assert_eq!(ca.subscribe(2, "fleet/all").await, vec![1]);
    assert_eq!(
        cb.subscribe_qos(2, "fleet/all", QoS::AtMostOnce).await,
        vec![0]
    );
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base + 1).await;
    warm_up(&s.obs, &mut ca, "fleet/all").await;
    warm_up(&s.obs, &mut cb, "fleet/all").await;
    s.obs
        .publish("fleet/all", rumqttc::QoS::AtLeastOnce, "one")
        .await;
    expect_message(&mut ca, "fleet/all", "one", QoS::AtLeastOnce).await;
    // At the QoS granted to B.
    expect_message(&mut cb, "fleet/all", "one", QoS::AtMostOnce).await;

    // A leaves: B still gets the filter's messages, A does not.
    unsubscribe(&mut ca, 3, "fleet/all").await;
    s.obs
        .publish("fleet/all", rumqttc::QoS::AtLeastOnce, "two")
        .await;
    expect_message(&mut cb, "fleet/all", "two", QoS::AtMostOnce).await;
    s.obs
        .publish("things/fleet-a/cmd/m", rumqttc::QoS::AtLeastOnce, "marker")
        .await;
    expect_message(&mut ca, "things/fleet-a/cmd/m", "marker", QoS::AtLeastOnce).await;
    assert_eq!(s.obs.sys(SYS_SUBSCRIPTIONS), Some(base + 1));

    // B leaves too: the upstream subscription goes.
    unsubscribe(&mut cb, 3, "fleet/all").await;
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base).await;
    s.obs
        .publish("fleet/all", rumqttc::QoS::AtLeastOnce, "three")
        .await;
    s.obs
        .publish("things/fleet-a/cmd/m", rumqttc::QoS::AtLeastOnce, "marker2")
        .await;
    expect_message(&mut ca, "things/fleet-a/cmd/m", "marker2", QoS::AtLeastOnce).await;
    cb.ping_ok().await;

    // And it can be made again.
    assert_eq!(cb.subscribe(4, "fleet/all").await, vec![1]);
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base + 1).await;
    warm_up(&s.obs, &mut cb, "fleet/all").await;
    s.obs
        .publish("fleet/all", rumqttc::QoS::AtLeastOnce, "four")
        .await;
    expect_message(&mut cb, "fleet/all", "four", QoS::AtLeastOnce).await;
}

#[tokio::test]
async fn a_disconnecting_device_releases_its_upstream_subscriptions() {
    let s = setup(THINGS, 2).await;
    let (_dev, mut c) = s.bridged("leaver", Protocol::V5).await;
    let base = s.obs.settled_sys(SYS_SUBSCRIPTIONS).await;
    assert_eq!(c.subscribe(1, "things/leaver/cmd/#").await, vec![1]);
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base + 1).await;
    drop(c);
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base).await;
}

// ---- 4. topic rules -----------------------------------------------------------------------

#[tokio::test]
async fn topic_rules_v5() {
    let s = setup(&["things/{thing_name}/#", "ids/{device_id}/up"], 2).await;
    let (dev, mut c) = s.bridged("rules-v5", Protocol::V5).await;
    let other = s.lobby.device("someone-else");
    let up = format!("ids/{}/up", dev.hex());

    for (i, refused) in [
        "things/other/cmd/#".to_owned(),
        "things/#".to_owned(),
        "things/+/cmd".to_owned(),
        "#".to_owned(),
        format!("ids/{}/up", other.hex()),
        other.topic("status"),
    ]
    .iter()
    .enumerate()
    {
        let codes = c.subscribe(10 + i as u16, refused).await;
        assert_eq!(codes, vec![0x87], "SUBSCRIBE {refused}");
    }
    assert_eq!(c.subscribe(20, "things/rules-v5/cmd/#").await, vec![1]);

    send_publish(&mut c, 30, "things/other/telemetry", QoS::AtLeastOnce, "no").await;
    expect_puback(&mut c, 30, 0x87).await;
    send_publish(
        &mut c,
        31,
        &format!("ids/{}/down", dev.hex()),
        QoS::AtLeastOnce,
        "no",
    )
    .await;
    expect_puback(&mut c, 31, 0x87).await;
    // `{device_id}` is filled in.
    send_publish(&mut c, 32, &up, QoS::AtLeastOnce, "yes").await;
    expect_puback(&mut c, 32, 0).await;
    s.obs.wait_for(&up, b"yes", WAIT).await;
    send_publish(
        &mut c,
        33,
        "things/rules-v5/telemetry",
        QoS::AtLeastOnce,
        "yes",
    )
    .await;
    expect_puback(&mut c, 33, 0).await;
    s.obs
        .wait_for("things/rules-v5/telemetry", b"yes", WAIT)
        .await;
    let leaked: Vec<_> = s
        .obs
        .messages()
        .into_iter()
        .filter(|m| m.payload == b"no")
        .collect();
    assert!(
        leaked.is_empty(),
        "refused publishes went upstream: {leaked:?}"
    );
    // Subscribed only now: the broker would echo the publish above back to it.
    assert_eq!(c.subscribe(21, &up).await, vec![1]);
    c.ping_ok().await;

    // A refused QoS 0 publish ends the session.
    send_publish(&mut c, 0, "things/other/telemetry", QoS::AtMostOnce, "no").await;
    c.expect_disconnect(0x87).await;
}

#[tokio::test]
async fn topic_rules_v311() {
    let s = setup(THINGS, 2).await;
    let (_dev, mut c) = s.bridged("rules-v311", Protocol::V311).await;
    assert_eq!(c.subscribe(1, "things/other/cmd/#").await, vec![0x80]);
    assert_eq!(c.subscribe(2, "things/#").await, vec![0x80]);
    assert_eq!(c.subscribe(3, "things/rules-v311/cmd/#").await, vec![1]);
    send_publish(&mut c, 4, "things/rules-v311/t", QoS::AtLeastOnce, "yes").await;
    expect_puback(&mut c, 4, 0).await;
    s.obs.wait_for("things/rules-v311/t", b"yes", WAIT).await;
    // A refused publish closes a v3.1.1 connection, without an acknowledgement.
    send_publish(&mut c, 5, "things/other/t", QoS::AtLeastOnce, "no").await;
    let before_close = c.expect_closed().await;
    assert!(
        !before_close
            .iter()
            .any(|p| matches!(p, Packet::PubAck(a) if a.pkid == 5)),
        "{before_close:?}"
    );
}

// ---- 5. many devices, one small pool ------------------------------------------------------

#[tokio::test]
async fn many_devices_share_a_small_pool() {
    const N: usize = 20;
    const POOL: u16 = 2;
    let s = setup(THINGS, POOL).await;
    let mut devices = Vec::new();
    for i in 0..N {
        let protocol = if i % 2 == 0 {
            Protocol::V311
        } else {
            Protocol::V5
        };
        let name = format!("many-{i:02}");
        let (_dev, c) = s.bridged(&name, protocol).await;
        devices.push((name, c));
    }
    // All publish at once, then each gets its PUBACK.
    for (name, c) in &mut devices {
        send_publish(c, 1, &format!("things/{name}/up"), QoS::AtLeastOnce, name).await;
    }
    for (_, c) in &mut devices {
        expect_puback(c, 1, 0).await;
    }
    for (name, _) in &devices {
        let m = s
            .obs
            .wait_for(&format!("things/{name}/up"), name.as_bytes(), WAIT)
            .await;
        assert_eq!(m.qos, 1, "{m:?}");
    }
    // Each gets its own command, and only its own.
    for (name, c) in &mut devices {
        assert_eq!(
            c.subscribe(2, &format!("things/{name}/cmd/#")).await,
            vec![1]
        );
        warm_up(&s.obs, c, &format!("things/{name}/cmd/probe")).await;
    }
    for (name, _) in &devices {
        let topic = format!("things/{name}/cmd/go");
        s.obs
            .publish(&topic, rumqttc::QoS::AtLeastOnce, name.clone())
            .await;
    }
    for (name, c) in &mut devices {
        expect_message(c, &format!("things/{name}/cmd/go"), name, QoS::AtLeastOnce).await;
    }
    // The broker sees the observer and at most `pool_size` lobby connections.
    let clients = s.obs.settled_sys(SYS_CLIENTS).await;
    assert!(
        (2..=1 + u64::from(POOL)).contains(&clients),
        "connected clients on the broker: {clients}"
    );
}

// ---- 6. in-flight bound -------------------------------------------------------------------

#[tokio::test]
async fn past_the_inflight_bound_v5_is_disconnected_0x97() {
    let mut s = setup(THINGS, 2).await;
    let (_dev, mut c) = s.bridged("bound-v5", Protocol::V5).await;
    let topic = "things/bound-v5/telemetry";
    send_publish(&mut c, 1, topic, QoS::AtLeastOnce, "before").await;
    expect_puback(&mut c, 1, 0).await;
    s.up.stop().await;
    for pkid in 100..100 + INFLIGHT {
        send_publish(&mut c, pkid, topic, QoS::AtLeastOnce, "held").await;
    }
    // Up to the bound the device is kept, and nothing is acknowledged.
    silent_for(&mut c, Duration::from_millis(500)).await;
    send_publish(&mut c, 100 + INFLIGHT, topic, QoS::AtLeastOnce, "over").await;
    c.expect_disconnect(0x97).await;
}

#[tokio::test]
async fn past_the_inflight_bound_v311_is_closed() {
    let mut s = setup(THINGS, 2).await;
    let (_dev, mut c) = s.bridged("bound-v311", Protocol::V311).await;
    let topic = "things/bound-v311/telemetry";
    send_publish(&mut c, 1, topic, QoS::AtLeastOnce, "before").await;
    expect_puback(&mut c, 1, 0).await;
    s.up.stop().await;
    for pkid in 100..100 + INFLIGHT {
        send_publish(&mut c, pkid, topic, QoS::AtLeastOnce, "held").await;
    }
    silent_for(&mut c, Duration::from_millis(500)).await;
    send_publish(&mut c, 100 + INFLIGHT, topic, QoS::AtLeastOnce, "over").await;
    let before_close = c.expect_closed().await;
    assert!(before_close.is_empty(), "{before_close:?}");
}

// ---- unclaim, health ----------------------------------------------------------------------

#[tokio::test]
async fn unclaim_releases_upstream_subscriptions_and_the_device_waits() {
    let s = setup(THINGS, 2).await;
    let (dev, mut c) = s.bridged("unclaim-me", Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("status")).await, vec![1]);
    expect_status(&mut c, &dev, "ready", Some(TENANT)).await;
    let base = s.obs.settled_sys(SYS_SUBSCRIPTIONS).await;
    assert_eq!(c.subscribe(2, "things/unclaim-me/cmd/#").await, vec![1]);
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base + 1).await;
    warm_up(&s.obs, &mut c, "things/unclaim-me/cmd/probe").await;

    let (st, body) = s
        .lobby
        .call(
            "DELETE",
            &format!("/v1/claims/{}", dev.hex()),
            &s.token,
            None,
        )
        .await;
    assert!(st == 200 || st == 204, "{st} {body}");
    expect_status(&mut c, &dev, "unclaimed", None).await;
    s.obs.wait_sys(SYS_SUBSCRIPTIONS, base).await;
    // It waits, and only its own prefix is open to it now.
    c.ping_ok().await;
    assert_eq!(c.subscribe(3, "things/unclaim-me/cmd/#").await, vec![0x80]);
    let d = device_when(&s.lobby, &dev, |d| d["state"] == "unclaimed").await;
    assert_eq!(d["connected"], true, "{d}");
}

#[tokio::test]
async fn upstream_health_shows_in_metrics() {
    // The metrics recorder is global to the test process: a tenant id of its own.
    let tenant = "health-tenant";
    let mut s = setup_tenant(tenant, THINGS, 2).await;
    let (_dev, mut c) = s.bridged("health", Protocol::V5).await;
    send_publish(&mut c, 1, "things/health/t", QoS::AtLeastOnce, "x").await;
    expect_puback(&mut c, 1, 0).await;
    let connected = |want_up: bool| {
        let lobby = &s.lobby;
        move || async move {
            upstream_connected(lobby, tenant)
                .await
                .filter(|v| (*v > 0.0) == want_up)
        }
    };
    eventually(connected(true)).await;
    s.up.stop().await;
    eventually(connected(false)).await;
    s.up.restart().await;
    upstream::eventually_within(LONG, "upstream reconnected", connected(true)).await;
}

// ---- the harness itself (passes without bridge mode) --------------------------------------

#[tokio::test]
async fn harness_broker_restart_keeps_the_observer_session() {
    let mut up = Upstream::start().await;
    let obs = up.observer().await;
    let port = up.port();
    // The observer's three filters, and nothing else.
    assert_eq!(obs.settled_sys(SYS_SUBSCRIPTIONS).await, 3);
    up.stop().await;
    up.restart().await;
    assert_eq!(up.port(), port);
    let other = up.client("harness-publisher").await;
    other
        .publish("things/x/y", rumqttc::QoS::AtLeastOnce, "while-away")
        .await;
    let m = obs.wait_for("things/x/y", b"while-away", LONG).await;
    assert_eq!(m.qos, 1, "{m:?}");
    assert!(obs.connections() >= 2, "the observer reconnected");
}

#[tokio::test]
async fn switching_the_tenant_to_redirect_and_back_moves_devices() {
    let s = setup(THINGS, 1).await;
    let (_dev, mut c) = s.bridged("switcher", Protocol::V5).await;
    let patch = |body: Value| {
        let path = format!("/v1/tenants/{TENANT}");
        let lobby = &s.lobby;
        async move { lobby.call("PATCH", &path, &lobby.admin, Some(body)).await }
    };
    // Bridge → redirect: the connected v5 device is sent to the endpoint at once.
    let (st, body) = patch(json!({"mode": "redirect"})).await;
    assert_eq!(st, 200, "{body}");
    let d = c.expect_disconnect(0x9D).await;
    assert_eq!(
        d.properties.server_reference,
        Some(format!("localhost:{}", s.up.port()))
    );
    // Redirect → bridge: a device connecting now is bridged again.
    let (st, body) = patch(json!({"mode": "bridge"})).await;
    assert_eq!(st, 200, "{body}");
    let dev = s.lobby.device("switcher-2");
    let (st, body) = s.lobby.claim(&s.token, &dev).await;
    assert_eq!(st, 201, "{body}");
    let (mut c2, ack) = connack(&s.lobby, &dev, Protocol::V5, "switcher-2").await;
    assert_eq!(ack.code, 0, "{ack:?}");
    send_publish(
        &mut c2,
        1,
        "things/switcher-2/telemetry",
        QoS::AtLeastOnce,
        "back",
    )
    .await;
    expect_puback(&mut c2, 1, 0).await;
    s.obs
        .wait_for(
            "things/switcher-2/telemetry",
            b"back",
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test]
async fn the_pool_closes_with_the_last_bridged_device_and_comes_back() {
    let s = setup(THINGS, 2).await;
    let (_dev, c) = s.bridged("only-one", Protocol::V311).await;
    // The observer and the lobby's pool of two.
    s.obs.wait_sys(SYS_CLIENTS, 3).await;
    drop(c);
    s.obs.wait_sys(SYS_CLIENTS, 1).await;
    // The next bridged device brings the pool back.
    let (_dev2, mut c2) = s.bridged("next-one", Protocol::V311).await;
    send_publish(&mut c2, 1, "things/next-one/up", QoS::AtLeastOnce, "again").await;
    expect_puback(&mut c2, 1, 0).await;
    s.obs
        .wait_for("things/next-one/up", b"again", Duration::from_secs(10))
        .await;
}
