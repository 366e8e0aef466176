//! Scale-out (SPEC §10, issue 6): two lobby nodes in one test process sharing one PostgreSQL
//! database (a fresh one per test). A change made through either node's API reaches the
//! other node's map and the devices connected to it at once; a node whose change-log watch
//! was cut catches up when it reconnects.
mod common;
#[path = "common/pg.rs"]
mod pg;

use std::time::Instant;

use common::fleet::two_nodes;
use common::*;
use lobby::mqtt::codec::Protocol;

/// A v5 device waiting on `node` (CONNACK 0).
async fn waiting_on(node: &TestLobby, dev: &Device) -> RawClient {
    connected(node, dev, Protocol::V5).await
}

#[tokio::test]
async fn a_claim_on_a_redirects_a_device_waiting_on_b() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let token = a.tenant("acme", "iot.acme.example").await;
    let dev = a.device("fleet-1");
    let mut c = waiting_on(&b, &dev).await;
    let started = Instant::now();
    let (st, body) = a.claim(&token, &dev).await;
    assert_eq!(st, 201, "{body}");
    let d = c.expect_disconnect(0x9D).await;
    eprintln!("claim on A → redirect on B: {:?}", started.elapsed());
    assert_eq!(
        d.properties.server_reference.as_deref(),
        Some("iot.acme.example:8883")
    );
    // B's API sees the claim and the tenant (created through A) too.
    let (st, body) = b.device_json(&token, &dev).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["tenant"], "acme", "{body}");
}

#[tokio::test]
async fn a_second_tenant_claiming_through_the_other_node_gets_409() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let acme = a.tenant("acme", "iot.acme.example").await;
    let other = b.tenant("other", "iot.other.example").await;
    let dev = a.device("contested");
    assert_eq!(a.claim(&acme, &dev).await.0, 201);
    // B checks against A's committed claim under the fleet's write lock, not a stale map.
    let got = b.claim(&other, &dev).await;
    assert_error(&got, 409, "already_claimed");
}

#[tokio::test]
async fn a_revoke_on_b_cuts_off_a_device_on_a() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let dev = a.device("stolen");
    let mut c = waiting_on(&a, &dev).await;
    // B has never seen the device; the operator need not know which node holds it.
    b.revoke(&dev).await;
    assert!(
        c.expect_closed()
            .await
            .iter()
            .all(|p| matches!(p, lobby::mqtt::codec::Packet::Disconnect(d) if d.reason == 0x87)),
        "a revoked device gets DISCONNECT 0x87 or a plain close"
    );
    // And neither node lets it back in.
    for node in [&a, &b] {
        let refused = match tls_connect(node, &dev).await {
            Err(_) => true,
            Ok(_) => {
                let mut again = RawClient::connect(node, &dev, Protocol::V5).await;
                again.try_send_connect("again").await.is_err() || again.recv().await.is_none()
            }
        };
        assert!(refused);
    }
}

/// Two devices with one CN claimed into one tenant through two nodes get two thing names: the
/// check runs in the store under the fleet's write lock (README, "How thing names are derived
/// from certificate names").
#[tokio::test]
async fn one_cn_claimed_through_two_nodes_gets_two_names() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let token = a.tenant("acme", "iot.acme.example").await;
    let (first, second) = (a.device("twin"), a.device("twin"));
    for (node, dev) in [(&a, &first), (&b, &second)] {
        let body = serde_json::json!({"code": dev.code, "cert_pem": dev.cert_pem});
        let (st, got) = node.call("POST", "/v1/claims", &token, Some(body)).await;
        assert_eq!(st, 201, "{got}");
    }
    let (_, one) = a.device_json(&token, &first).await;
    let (_, two) = b.device_json(&token, &second).await;
    assert_eq!(one["thing_name"], "twin", "{one}");
    assert_eq!(two["thing_name"], second.hex(), "{two}");
}

#[tokio::test]
async fn a_watch_connection_killed_and_restored_loses_nothing() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let token = a.tenant("acme", "iot.acme.example").await;
    let dev = a.device("patient");
    let mut c = waiting_on(&b, &dev).await;
    // Cut every node's change-log watch, then claim while they are down.
    let admin = pg::admin().await;
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'lobby-listen-%'",
            &[&db.name],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 2, "one watch per node");
    let (st, body) = a.claim(&token, &dev).await;
    assert_eq!(st, 201, "{body}");
    // B's watch reconnects (with backoff) and replays the log from where it was.
    c.expect_disconnect(0x9D).await;
}

#[tokio::test]
async fn every_node_lists_where_a_device_is_connected() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let dev = a.device("roaming");
    let c = waiting_on(&b, &dev).await;
    // B knows it holds the device; A learns it from B's report (batched, within a second).
    let (_, on_b) = b.admin_device_json(&dev).await;
    assert_eq!(
        (on_b["connected"].clone(), on_b["node"].clone()),
        (true.into(), "node-b".into())
    );
    let on_a = eventually(|| async {
        let (st, d) = a.admin_device_json(&dev).await;
        (st == 200 && d["connected"] == true).then_some(d)
    })
    .await;
    assert_eq!(on_a["node"], "node-b", "{on_a}");
    assert_eq!(on_a["protocol"], "mqtt5", "{on_a}");
    assert_eq!(on_a["thing_name"], "roaming", "{on_a}");
    // A's list has the unclaimed device waiting on B.
    let (st, list) = a.call("GET", "/v1/devices", &a.admin, None).await;
    assert_eq!(st, 200, "{list}");
    let listed = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == dev.hex().as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listed["node"], "node-b", "{listed}");
    // Gone from B: every node shows it disconnected, with no node.
    drop(c);
    let gone = eventually(|| async {
        let (_, d) = a.admin_device_json(&dev).await;
        (d["connected"] == false).then_some(d)
    })
    .await;
    assert!(gone["node"].is_null(), "{gone}");
    assert!(gone["last_seen"].is_string(), "{gone}");
}

#[tokio::test]
async fn a_tenant_token_works_on_every_node_at_once() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    // No waiting for B's notification: B applies the change log itself when a token is new
    // to it.
    for i in 0..10 {
        let token = a.tenant(&format!("t{i}"), "iot.t.example").await;
        let (st, body) = b.call("GET", "/v1/devices", &token, None).await;
        assert_eq!(st, 200, "{body}");
    }
    let (st, _) = b
        .call("GET", "/v1/devices", "lobby_t_not_a_token", None)
        .await;
    assert_eq!(st, 401);
}

/// SPEC §2 across nodes: `dev` connects to `first`, then to `second` (as a load balancer
/// would send a clone or a reconnect). The older connection gets DISCONNECT 0x8E (v3.1.1: a
/// plain close), the newer one stays, and both nodes' device JSON say `second_name` holds it.
async fn takes_over(
    first: &TestLobby,
    second: &TestLobby,
    second_name: &str,
    dev: &Device,
    protocol: Protocol,
) {
    let mut old = connected(first, dev, protocol).await;
    let mut new = connected(second, dev, protocol).await;
    let started = Instant::now();
    match protocol {
        Protocol::V5 => drop(old.expect_disconnect(0x8E).await),
        Protocol::V311 => assert!(old.expect_closed().await.is_empty(), "v3.1.1: closed only"),
    }
    eprintln!(
        "{protocol:?}: connect on {second_name} → older connection closed: {:?}",
        started.elapsed()
    );
    for node in [first, second] {
        let d = eventually(|| async {
            let (st, d) = node.admin_device_json(dev).await;
            (st == 200 && d["connected"] == true && d["node"] == second_name).then_some(d)
        })
        .await;
        assert_eq!(d["thing_name"], dev.name.as_str(), "{d}");
    }
    // Long enough for the older node's own (older) connect notice to have reached the newer
    // node: it must not close the newer connection.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    new.ping_ok().await;
}

#[tokio::test]
async fn a_connection_on_b_takes_over_from_a_and_back() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    takes_over(&a, &b, "node-b", &a.device("clone-v5"), Protocol::V5).await;
    takes_over(&a, &b, "node-b", &a.device("clone-v3"), Protocol::V311).await;
    takes_over(&b, &a, "node-a", &a.device("clone-back"), Protocol::V5).await;
    let metrics = a.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lobby_connections_total{outcome=\"taken_over\"}")),
        "{metrics}"
    );
}

/// Two connections of one device reaching two nodes at the same moment: exactly one stays,
/// whichever it is (never both closed, never both kept).
#[tokio::test]
async fn simultaneous_connects_on_two_nodes_leave_exactly_one() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    for round in 0..3 {
        let dev = a.device(&format!("twin-{round}"));
        let (mut on_a, mut on_b) = tokio::join!(
            connected(&a, &dev, Protocol::V5),
            connected(&b, &dev, Protocol::V5)
        );
        let (closed_on, first) = tokio::select! {
            p = on_a.recv() => ("node-a", p),
            p = on_b.recv() => ("node-b", p),
        };
        assert!(
            matches!(&first, Some(lobby::mqtt::codec::Packet::Disconnect(d)) if d.reason == 0x8E),
            "round {round}: {closed_on} sent {first:?}"
        );
        let (survivor, node) = if closed_on == "node-a" {
            (&mut on_b, "node-b")
        } else {
            (&mut on_a, "node-a")
        };
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        survivor.ping_ok().await;
        let d = eventually(|| async {
            let (_, d) = a.admin_device_json(&dev).await;
            (d["connected"] == true && d["node"] == node).then_some(d)
        })
        .await;
        assert_eq!(d["node"], node, "round {round}");
    }
}

/// A connect announced while a node's watch is down is not lost: when the watch is back,
/// the node looks up the connects recorded meanwhile and closes its older connection.
#[tokio::test]
async fn a_takeover_announced_while_the_watch_is_down_still_closes_the_older() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let dev = a.device("unheard");
    let mut old = connected(&a, &dev, Protocol::V5).await;
    let admin = pg::admin().await;
    let cut = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
               WHERE datname = $1 AND application_name LIKE 'lobby-listen-%'";
    admin.query(cut, &[&db.name]).await.unwrap();
    // Every watch stays cut (each reconnect at once) while B records and announces the connect.
    let mut new = connected(&b, &dev, Protocol::V5).await;
    let until = Instant::now() + std::time::Duration::from_secs(2);
    while Instant::now() < until {
        admin.query(cut, &[&db.name]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    old.expect_disconnect(0x8E).await;
    eprintln!(
        "watch back → older connection closed: {:?}",
        started.elapsed()
    );
    new.ping_ok().await;
}
