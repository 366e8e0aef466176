//! Device flows of SPEC §4 over real TLS with real clients: an unclaimed device waits and keeps
//! waiting after an unclaim, and a second connection of a device takes over the first. The
//! claim → redirect flows are in `redirect_flows.rs`, the timers and shutdown in
//! `session_limits.rs`.
mod common;

use std::time::Duration;

use common::flows::*;
use common::*;
use lobby::mqtt::codec::{Packet, Protocol};
use serde_json::Value;

/// `DELETE /v1/claims/{id}` of `dev` with `token`; it must succeed.
async fn unclaim(lobby: &TestLobby, token: &str, dev: &Device) {
    let (st, body) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), token, None)
        .await;
    assert!(st == 200 || st == 204, "{st} {body}");
}

// ---- unclaimed devices wait ----------------------------------------------------------------

#[tokio::test]
async fn unclaimed_v4_client_gets_status_and_stays() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("wait-v4");
    let (_client, mut el) = v4_subscribed(&lobby, &dev, "#").await;
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
    let d = lobby.admin_device(&dev).await;
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
    let d = lobby.admin_device(&dev).await;
    assert_eq!(d["connected"], true, "{d}");
}

// ---- unclaim -------------------------------------------------------------------------------

#[tokio::test]
async fn unclaim_while_connected_sends_unclaimed_status() {
    // A long grace keeps the claimed v3.1.1 device (not following …/redirect) connected.
    let lobby = TestLobby::start_with(|c| c.limits.redirect_grace = Duration::from_secs(60)).await;
    let token = redirect_tenant(&lobby).await;
    let dev = lobby.device("unclaim");
    let mut c = claimed_while_subscribed(&lobby, &token, &dev, Protocol::V311, "status").await;
    unclaim(&lobby, &token, &dev).await;
    expect_status(&mut c, &dev, "unclaimed", None).await;
    c.ping_ok().await;
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
    let mut c = claimed_while_subscribed(&lobby, &token, &dev, Protocol::V311, "status").await;
    unclaim(&lobby, &token, &dev).await;
    expect_status(&mut c, &dev, "unclaimed", None).await;
    // Let the withdrawn redirect's grace pass (keep-alive is 30 s, so that is not at play).
    tokio::time::sleep(grace * 4).await;
    c.send(Packet::PingReq).await;
    match c.next_or_close().await {
        Some(Packet::PingResp) => {}
        other => panic!("unclaimed device was dropped after the redirect grace: {other:?}"),
    }
}

// ---- takeover ------------------------------------------------------------------------------

#[tokio::test]
async fn takeover_v5_first_gets_0x8e() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("twice-v5");
    let mut first = connected(&lobby, &dev, Protocol::V5).await;
    let mut second = connected(&lobby, &dev, Protocol::V5).await;
    first.expect_disconnect(0x8E).await;
    second.ping_ok().await;
    assert_eq!(second.subscribe(1, &dev.topic("status")).await, vec![1]);
    expect_status(&mut second, &dev, "unclaimed", None).await;
    let d = lobby.admin_device(&dev).await;
    assert_eq!(d["connected"], true, "{d}");
}

#[tokio::test]
async fn takeover_v3_first_is_closed() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("twice-v3");
    let mut first = connected(&lobby, &dev, Protocol::V311).await;
    let mut second = connected(&lobby, &dev, Protocol::V311).await;
    assert!(first.expect_closed().await.is_empty());
    second.ping_ok().await;
    // A claim now reaches the second connection.
    let token = redirect_tenant(&lobby).await;
    assert_eq!(second.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let p = second.expect_publish().await;
    check_acme_redirect(&p, &dev);
}
