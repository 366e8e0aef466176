//! HTTP API, SPEC §6: reading devices (`GET /v1/devices[/{id}]`), listing with filters and
//! pagination, and the operator's migrate and revoke.
mod common;

use std::collections::BTreeSet;

use common::*;
use lobby::mqtt::codec::{Packet, Protocol};
use serde_json::{json, Value};

const DEVICE_FIELDS: [&str; 10] = [
    "device_id",
    "thing_name",
    "tenant",
    "state",
    "connected",
    "protocol",
    "last_seen",
    "claimed_at",
    "redirected_at",
    "error",
];

fn assert_device_fields(d: &Value) {
    let obj = d
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {d}"));
    for k in DEVICE_FIELDS {
        assert!(obj.contains_key(k), "missing {k} in {d}");
    }
}

/// Device ids of a listing page, and its `next`.
async fn list(lobby: &TestLobby, token: &str, query: &str) -> (Vec<String>, Value) {
    let (s, b) = lobby
        .call("GET", &format!("/v1/devices{query}"), token, None)
        .await;
    assert_eq!(s, 200, "{query}: {b}");
    let devices = b["devices"].as_array().unwrap_or_else(|| panic!("{b}"));
    devices.iter().for_each(assert_device_fields);
    let ids = devices
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect();
    (ids, b["next"].clone())
}

fn sorted(ids: &[&Device]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|d| d.hex()).collect();
    v.sort();
    v
}

/// A connected, unclaimed v5 device waiting in the lobby.
async fn waiting(lobby: &TestLobby, dev: &Device) -> RawClient {
    connected(lobby, dev, Protocol::V5).await
}

/// The Server Reference a v5 device gets at CONNACK.
async fn server_reference(lobby: &TestLobby, dev: &Device) -> Option<String> {
    let (_c, ack) = connack(lobby, dev, Protocol::V5, &dev.name).await;
    assert_eq!(ack.code, 0x9D);
    ack.properties.server_reference
}

#[tokio::test]
async fn owner_reads_a_device_with_every_field() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("sensor-1");
    let body = json!({"code": dev.code, "cert_pem": dev.cert_pem});
    assert_eq!(
        lobby.call("POST", "/v1/claims", &acme, Some(body)).await.0,
        201
    );
    let (s, d) = lobby.device_json(&acme, &dev).await;
    assert_eq!(s, 200, "{d}");
    assert_device_fields(&d);
    assert_eq!(d["device_id"], dev.hex());
    assert_eq!(d["thing_name"], "sensor-1");
    assert_eq!(d["tenant"], "acme");
    assert_eq!(d["state"], "ready");
    assert_eq!(d["connected"], false);
    assert!(
        d["claimed_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{d}"
    );
    assert_eq!(
        (&d["redirected_at"], &d["error"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(lobby.device_json(&lobby.admin, &dev).await, (200, d));
    assert_error(&lobby.device_json(&beta, &dev).await, 404, "not_found");
    // Once the device has been sent on, the lobby says when and how it was last seen.
    assert_eq!(
        server_reference(&lobby, &dev).await.as_deref(),
        Some("iot.acme.example:8883")
    );
    let d = eventually(|| async {
        let (_, d) = lobby.device_json(&acme, &dev).await;
        d["redirected_at"].is_string().then_some(d)
    })
    .await;
    assert!(
        d["last_seen"].is_string() && d["protocol"].is_string(),
        "{d}"
    );
}

#[tokio::test]
async fn unknown_and_malformed_device_ids() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let never = lobby.device("never");
    for token in [&lobby.admin, &acme] {
        assert_error(&lobby.device_json(token, &never).await, 404, "not_found");
        for bad in [
            "xyz",
            "0",
            &"g".repeat(64),
            &"a".repeat(65),
            "%20",
            "..%2F..%2Fetc",
        ] {
            let got = lobby
                .call("GET", &format!("/v1/devices/{bad}"), token, None)
                .await;
            assert_json_error(&got, &[404, 400], bad);
        }
    }
}

#[tokio::test]
async fn listings_are_scoped_and_filtered() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let (a1, a2, b1, free) = (
        lobby.device("a1"),
        lobby.device("a2"),
        lobby.device("b1"),
        lobby.device("free"),
    );
    let _free_conn = waiting(&lobby, &free).await;
    for (token, dev) in [(&acme, &a1), (&acme, &a2), (&beta, &b1)] {
        assert_eq!(lobby.claim(token, dev).await.0, 201);
    }
    let (ids, next) = list(&lobby, &acme, "").await;
    assert_eq!((ids, next), (sorted(&[&a1, &a2]), Value::Null));
    // A tenant cannot widen its scope with `tenant=`.
    assert_eq!(
        list(&lobby, &acme, "?tenant=beta").await.0,
        sorted(&[&a1, &a2])
    );
    assert_eq!(list(&lobby, &beta, "").await.0, sorted(&[&b1]));
    let admin = lobby.admin.clone();
    assert_eq!(
        list(&lobby, &admin, "").await.0,
        sorted(&[&a1, &a2, &b1, &free])
    );
    assert_eq!(
        list(&lobby, &admin, "?state=ready").await.0,
        sorted(&[&a1, &a2, &b1])
    );
    assert_eq!(
        list(&lobby, &admin, "?state=unclaimed").await.0,
        sorted(&[&free])
    );
    assert_eq!(list(&lobby, &admin, "?tenant=beta").await.0, sorted(&[&b1]));
    assert_eq!(
        list(&lobby, &admin, "?tenant=acme&state=ready").await.0,
        sorted(&[&a1, &a2])
    );
    assert_eq!(
        list(&lobby, &admin, "?state=revoked").await.0,
        Vec::<String>::new()
    );
    let (_, b) = lobby
        .call("GET", "/v1/devices?state=unclaimed", &admin, None)
        .await;
    let d = &b["devices"][0];
    assert_eq!(
        (d["state"].as_str(), &d["tenant"], &d["connected"]),
        (Some("unclaimed"), &Value::Null, &json!(true))
    );
    assert_eq!(d["thing_name"], "free");
    for q in ["?state=sleeping", "?after=nope", "?after=123"] {
        for token in [&admin, &acme] {
            let got = lobby
                .call("GET", &format!("/v1/devices{q}"), token, None)
                .await;
            assert_error(&got, 400, "invalid_request");
        }
    }
}

#[tokio::test]
async fn pagination_walks_every_device_once() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let devs: Vec<Device> = (0..5).map(|i| lobby.device(&format!("d{i}"))).collect();
    for d in &devs {
        assert_eq!(lobby.claim(&acme, d).await.0, 201);
    }
    let all: Vec<&Device> = devs.iter().collect();
    for token in [lobby.admin.as_str(), acme.as_str()] {
        let (mut seen, mut pages, mut after) = (Vec::new(), 0, String::new());
        loop {
            let (ids, next) = list(&lobby, token, &format!("?limit=2&after={after}")).await;
            assert!(ids.len() <= 2 && !ids.is_empty(), "{ids:?}");
            seen.extend(ids);
            pages += 1;
            assert!(pages <= 5, "pagination does not end");
            match next.as_str() {
                Some(n) => after = n.to_owned(),
                None => break,
            }
        }
        assert_eq!(
            seen.iter().collect::<BTreeSet<_>>().len(),
            seen.len(),
            "duplicates: {seen:?}"
        );
        assert_eq!(seen, sorted(&all));
        assert_eq!(pages, 3);
    }
    // A last page that is exactly full says there is nothing more.
    let (ids, next) = list(
        &lobby,
        &acme,
        &format!("?limit=2&after={}", sorted(&all)[2]),
    )
    .await;
    assert_eq!((ids, next), (sorted(&all)[3..].to_vec(), Value::Null));
}

#[tokio::test]
async fn migrate_moves_a_device_to_another_tenant() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&acme, &dev).await.0, 201);
    let path = format!("/v1/devices/{}/migrate", dev.hex());
    let (s, b) = lobby
        .call("POST", &path, &lobby.admin, Some(json!({"tenant": "beta"})))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["tenant"].as_str(), b["state"].as_str()),
        (Some("beta"), Some("ready"))
    );
    let (_, d) = lobby.device_json(&lobby.admin, &dev).await;
    assert_eq!(d["tenant"], "beta");
    assert_eq!(lobby.device_json(&beta, &dev).await.0, 200);
    assert_error(&lobby.device_json(&acme, &dev).await, 404, "not_found");
    assert_eq!(list(&lobby, &acme, "").await.0, Vec::<String>::new());
    assert_eq!(list(&lobby, &beta, "").await.0, vec![dev.hex()]);
    assert_eq!(
        server_reference(&lobby, &dev).await.as_deref(),
        Some("iot.beta.example:8883")
    );
    // The old tenant no longer holds it: it may go; the new one may not.
    assert_error(
        &lobby
            .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &acme, None)
            .await,
        404,
        "not_found",
    );
    assert_error(
        &lobby
            .call("DELETE", "/v1/tenants/beta", &lobby.admin, None)
            .await,
        409,
        "conflict",
    );
    let (s, b) = lobby
        .call("DELETE", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    assert!((200..300).contains(&s), "{s} {b}");
}

#[tokio::test]
async fn migrate_refuses_unknown_tenants_and_unclaimed_devices() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&acme, &dev).await.0, 201);
    let admin = lobby.admin.clone();
    let path = format!("/v1/devices/{}/migrate", dev.hex());
    for bad in [
        json!({"tenant": "nobody"}),
        json!({}),
        json!({"tenant": 1}),
        json!({"tenant": "acme", "x": 1}),
    ] {
        assert_error(
            &lobby.call("POST", &path, &admin, Some(bad)).await,
            400,
            "invalid_request",
        );
    }
    assert_eq!(lobby.device_json(&acme, &dev).await.0, 200);
    let free = lobby.device("free");
    let _conn = waiting(&lobby, &free).await;
    let never = lobby.device("never");
    for d in [&free, &never] {
        let p = format!("/v1/devices/{}/migrate", d.hex());
        let got = lobby
            .call("POST", &p, &admin, Some(json!({"tenant": "acme"})))
            .await;
        assert_error(&got, 404, "not_found");
    }
}

#[tokio::test]
async fn revoke_refuses_a_device_from_now_on() {
    let mut lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&acme, &dev).await.0, 201);
    let path = format!("/v1/devices/{}/revoke", dev.hex());
    let (s, b) = lobby.call("POST", &path, &lobby.admin, None).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("revoked")), "{b}");
    let (_, d) = lobby.device_json(&acme, &dev).await;
    assert_eq!(d["state"], "revoked");
    assert_eq!(
        list(&lobby, &lobby.admin, "?state=revoked").await.0,
        vec![dev.hex()]
    );
    assert!(
        !(200..300).contains(&lobby.claim(&acme, &dev).await.0),
        "a revoked device is not claimable"
    );
    let p = format!("/v1/devices/{}/migrate", dev.hex());
    lobby.tenant("beta", "iot.beta.example").await;
    let (s, b) = lobby
        .call("POST", &p, &lobby.admin, Some(json!({"tenant": "beta"})))
        .await;
    assert!(
        !(200..300).contains(&s) && b["error"].is_string(),
        "{s} {b}"
    );
    lobby.restart().await;
    let (_, d) = lobby.device_json(&lobby.admin, &dev).await;
    assert_eq!(d["state"], "revoked", "revocation is durable");
    let never = lobby.device("never");
    let got = lobby
        .call(
            "POST",
            &format!("/v1/devices/{}/revoke", never.hex()),
            &lobby.admin,
            None,
        )
        .await;
    assert_error(&got, 404, "not_found");
}

#[tokio::test]
async fn revoking_a_waiting_device_closes_its_connection() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("dev-a");
    let mut conn = waiting(&lobby, &dev).await;
    let path = format!("/v1/devices/{}/revoke", dev.hex());
    let (s, b) = lobby.call("POST", &path, &lobby.admin, None).await;
    assert_eq!(
        (s, b["state"].as_str(), &b["tenant"]),
        (200, Some("revoked"), &Value::Null),
        "{b}"
    );
    loop {
        match conn.recv().await {
            None => break,
            Some(Packet::Disconnect(_)) => {}
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    // `recv` also ends after `WAIT`: the device must really be gone.
    let d = eventually(|| async {
        let (_, d) = lobby.device_json(&lobby.admin, &dev).await;
        (d["connected"] == json!(false)).then_some(d)
    })
    .await;
    assert_eq!(d["state"], "revoked", "{d}");
}
