//! HTTP API, SPEC §6: tenant CRUD (create, read, list, patch, delete), what a tenant token may
//! not do, durability, and metrics. Authentication and malformed requests on every route are in
//! `api_errors.rs`, claims in `api_claims.rs`, devices in `api_devices.rs`.
mod common;

use common::*;
use lobby::mqtt::codec::Protocol;
use serde_json::{json, Value};

/// `GET /v1/tenants/{id}` as the operator; returns (status, body).
async fn get_tenant(lobby: &TestLobby, id: &str) -> (u16, Value) {
    lobby
        .call("GET", &format!("/v1/tenants/{id}"), &lobby.admin, None)
        .await
}

/// `POST /v1/tenants` of `body` as the operator; returns (status, body).
async fn post_tenant(lobby: &TestLobby, body: Value) -> (u16, Value) {
    lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(body))
        .await
}

#[tokio::test]
async fn tenant_token_cannot_use_operator_routes() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    lobby.tenant("other", "iot.other.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let hex = dev.hex();
    let operator_only = [
        ("GET", "/v1/tenants".to_owned(), None),
        (
            "POST",
            "/v1/tenants".into(),
            Some(json!({"name": "x", "endpoint": "x.example"})),
        ),
        ("GET", "/v1/tenants/acme".into(), None),
        (
            "PATCH",
            "/v1/tenants/acme".into(),
            Some(json!({"endpoint": "evil.example"})),
        ),
        ("DELETE", "/v1/tenants/other".into(), None),
        (
            "POST",
            format!("/v1/devices/{hex}/migrate"),
            Some(json!({"tenant": "other"})),
        ),
        ("POST", format!("/v1/devices/{hex}/revoke"), None),
    ];
    for (method, path, body) in operator_only {
        let (s, b) = lobby.call(method, &path, &token, body).await;
        assert!(
            !(200..300).contains(&s) && s != 403,
            "{method} {path}: {s} {b}"
        );
        assert!(b["error"].is_string(), "{method} {path}: {b}");
        assert_eq!(s, 401, "{method} {path}: {b}");
    }
    let (_, t) = get_tenant(&lobby, "acme").await;
    assert_eq!(t["endpoint"], "iot.acme.example");
    assert_eq!(get_tenant(&lobby, "other").await.0, 200);
    let (_, d) = lobby.device_json(&lobby.admin, &dev).await;
    assert_eq!(
        (d["tenant"].as_str(), d["state"].as_str()),
        (Some("acme"), Some("ready"))
    );
}

#[tokio::test]
async fn create_tenant_returns_the_tenant_and_a_working_token() {
    let lobby = TestLobby::start().await;
    let body = json!({"id": "acme", "name": "Acme Corp", "endpoint": "iot.acme.example",
        "port": 8884, "region": "eu-west-1", "max_devices": 10});
    let (s, b) = post_tenant(&lobby, body).await;
    assert_eq!(s, 201, "{b}");
    let t = &b["tenant"];
    let keys: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "id",
        "name",
        "mode",
        "endpoint",
        "port",
        "region",
        "backend",
        "bridge",
        "max_devices",
    ] {
        assert!(keys.contains(&k), "missing {k} in {t}");
    }
    assert_eq!(t["id"], "acme");
    assert_eq!(t["name"], "Acme Corp");
    assert_eq!(t["mode"], "redirect");
    assert_eq!(t["endpoint"], "iot.acme.example");
    assert_eq!(t["port"], 8884);
    assert_eq!(t["region"], "eu-west-1");
    assert_eq!(t["backend"]["kind"], "none");
    assert_eq!(t["max_devices"], 10);
    let token = b["token"].as_str().unwrap();
    assert!(token.len() >= 32, "{token}");
    assert_eq!(lobby.call("GET", "/v1/devices", token, None).await.0, 200);
    // The token is shown once: never in a read.
    let (_, one) = get_tenant(&lobby, "acme").await;
    assert_eq!(&one, t);
    let (_, list) = lobby.call("GET", "/v1/tenants", &lobby.admin, None).await;
    let text = list.to_string() + &one.to_string();
    assert!(!text.contains(token) && !text.contains("token"), "{text}");
}

#[tokio::test]
async fn create_tenant_generates_an_id_when_absent() {
    let lobby = TestLobby::start().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let body = json!({"name": "Anon", "endpoint": "anon.example"});
        let (s, b) = post_tenant(&lobby, body).await;
        assert_eq!(s, 201, "{b}");
        let id = b["tenant"]["id"].as_str().unwrap().to_owned();
        assert!(
            !id.is_empty()
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{id}"
        );
        let (s, one) = get_tenant(&lobby, &id).await;
        assert_eq!((s, one["id"].as_str()), (200, Some(id.as_str())));
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn duplicate_tenant_id_is_a_conflict_and_keeps_the_first() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let body = json!({"id": "acme", "name": "Impostor", "endpoint": "evil.example"});
    let got = post_tenant(&lobby, body).await;
    assert_error(&got, 409, "conflict");
    let (_, t) = get_tenant(&lobby, "acme").await;
    assert_eq!(
        (t["name"].as_str(), t["endpoint"].as_str()),
        (Some("acme"), Some("iot.acme.example"))
    );
    assert_eq!(lobby.call("GET", "/v1/devices", &token, None).await.0, 200);
}

#[tokio::test]
async fn invalid_tenant_bodies_are_invalid_request() {
    let lobby = TestLobby::start().await;
    let bodies: Vec<&[u8]> = vec![
        br#"{"id":"acme","endpoint":"iot.acme.example"}"#,
        br#"{"id":"Bad Id","name":"x","endpoint":"a.example"}"#,
        br#"{"id":"-acme","name":"x","endpoint":"a.example"}"#,
        br#"{"id":"a/b","name":"x","endpoint":"a.example"}"#,
        br#"{"id":"","name":"x","endpoint":"a.example"}"#,
        br#"{"id":"acme","name":"","endpoint":"a.example"}"#,
        br#"{"id":"acme","name":"x","endpoint":"a b"}"#,
        br#"{"id":"acme","name":"x","endpoint":""}"#,
        br#"{"id":"acme","name":"x"}"#,
        br#"{"id":"acme","nmae":"x","endpoint":"a.example"}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","extra":1}"#,
        br#"{"id":"acme","name":5,"endpoint":"a.example"}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","port":"8883"}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","port":70000}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","port":0}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","max_devices":-1}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","mode":"teleport"}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","backend":{"kind":"magic"}}"#,
        br#"{"id":"acme","name":"x","endpoint":"a.example","mode":"bridge"}"#,
        br#"{"id":7,"name":"x","endpoint":"a.example"}"#,
        br#"{"id":"acme","name":"x","#,
        b"",
        b"null",
        b"[]",
        b"\"acme\"",
        b"\xff\xfe",
    ];
    let auth = format!("Bearer {}", lobby.admin);
    for body in bodies {
        let got = lobby
            .raw("POST", "/v1/tenants", Some(&auth), Some(body.to_vec()))
            .await;
        assert_error(&got, 400, "invalid_request");
    }
    let (s, list) = lobby.call("GET", "/v1/tenants", &lobby.admin, None).await;
    assert_eq!(
        (s, list["tenants"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{list}"
    );
}

/// `endpoint` and `port` are separate fields: an endpoint that carries its own port would send
/// v5 devices to `host:1883:8883`.
#[tokio::test]
async fn endpoint_is_a_host_without_a_port() {
    let lobby = TestLobby::start().await;
    for (i, ep) in [
        "iot.acme.example:1883",
        "http://iot.acme.example",
        "iot acme",
    ]
    .iter()
    .enumerate()
    {
        let body = json!({"id": format!("t{i}"), "name": "x", "endpoint": ep});
        let got = post_tenant(&lobby, body).await;
        assert_error(&got, 400, "invalid_request");
    }
    for (i, ep) in ["iot.acme.example", "192.0.2.7", "[2001:db8::1]"]
        .iter()
        .enumerate()
    {
        let body = json!({"id": format!("ok{i}"), "name": "x", "endpoint": ep});
        let (s, b) = post_tenant(&lobby, body).await;
        assert_eq!(s, 201, "{ep}: {b}");
    }
}

#[tokio::test]
async fn tenants_can_be_listed_and_read() {
    let lobby = TestLobby::start().await;
    lobby.tenant("beta", "iot.beta.example").await;
    lobby.tenant("acme", "iot.acme.example").await;
    let (s, list) = lobby.call("GET", "/v1/tenants", &lobby.admin, None).await;
    assert_eq!(s, 200, "{list}");
    let mut ids: Vec<&str> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["acme", "beta"]);
    let (s, t) = get_tenant(&lobby, "beta").await;
    assert_eq!(
        (s, t["endpoint"].as_str()),
        (200, Some("iot.beta.example")),
        "{t}"
    );
    let got = get_tenant(&lobby, "nobody").await;
    assert_error(&got, 404, "not_found");
}

#[tokio::test]
async fn patch_changes_the_tenant_and_where_devices_are_sent() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "old.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let patch =
        json!({"endpoint": "new.acme.example", "port": 1884, "mode": "redirect", "name": "Acme 2"});
    let (s, t) = lobby
        .call("PATCH", "/v1/tenants/acme", &lobby.admin, Some(patch))
        .await;
    assert_eq!(s, 200, "{t}");
    let (_, got) = get_tenant(&lobby, "acme").await;
    for (k, v) in [
        ("endpoint", json!("new.acme.example")),
        ("port", json!(1884)),
        ("mode", json!("redirect")),
        ("name", json!("Acme 2")),
        ("region", json!("eu-west-1")),
    ] {
        assert_eq!(got[k], v, "{k} in {got}");
    }
    let (_c, ack) = connack(&lobby, &dev, Protocol::V5, "dev-a").await;
    assert_sent_on(&ack, "new.acme.example:1884");
    // The old token still works after a PATCH.
    assert_eq!(lobby.call("GET", "/v1/devices", &token, None).await.0, 200);
}

#[tokio::test]
async fn patch_rejects_bad_input_and_unknown_tenants() {
    let lobby = TestLobby::start().await;
    lobby.tenant("acme", "iot.acme.example").await;
    let (_, before) = get_tenant(&lobby, "acme").await;
    let got = lobby
        .call(
            "PATCH",
            "/v1/tenants/nobody",
            &lobby.admin,
            Some(json!({"port": 1})),
        )
        .await;
    assert_error(&got, 404, "not_found");
    for bad in [
        json!({"endpoint": "a b"}),
        json!({"id": "other"}),
        json!({"port": 0}),
        json!({"port": "1"}),
        json!({"mode": "teleport"}),
        json!({"name": ""}),
        json!({"unknown": true}),
        json!({"mode": "bridge"}),
    ] {
        let got = lobby
            .call("PATCH", "/v1/tenants/acme", &lobby.admin, Some(bad))
            .await;
        assert_error(&got, 400, "invalid_request");
    }
    let (_, after) = get_tenant(&lobby, "acme").await;
    assert_eq!(before, after);
}

#[tokio::test]
async fn delete_tenant_only_when_it_has_no_devices() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let got = lobby
        .call("DELETE", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    assert_error(&got, 409, "conflict");
    assert_eq!(get_tenant(&lobby, "acme").await.0, 200);
    let (s, b) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = lobby
        .call("DELETE", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    assert!((200..300).contains(&s), "{s} {b}");
    assert_error(&get_tenant(&lobby, "acme").await, 404, "not_found");
    assert_error(
        &lobby
            .call("DELETE", "/v1/tenants/acme", &lobby.admin, None)
            .await,
        404,
        "not_found",
    );
    // The deleted tenant's token is dead, also for a new tenant of the same id.
    assert_error(
        &lobby.call("GET", "/v1/devices", &token, None).await,
        401,
        "unauthorized",
    );
    lobby.tenant("acme", "iot.acme.example").await;
    assert_error(
        &lobby.call("GET", "/v1/devices", &token, None).await,
        401,
        "unauthorized",
    );
}

#[tokio::test]
async fn tenants_and_tokens_survive_a_restart() {
    let mut lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let patch = json!({"port": 1884, "max_devices": 5});
    assert_eq!(
        lobby
            .call("PATCH", "/v1/tenants/acme", &lobby.admin, Some(patch))
            .await
            .0,
        200
    );
    let (_, before) = get_tenant(&lobby, "acme").await;
    lobby.restart().await;
    let (s, after) = get_tenant(&lobby, "acme").await;
    assert_eq!((s, &after), (200, &before));
    assert_eq!(lobby.call("GET", "/v1/devices", &token, None).await.0, 200);
    let dev = lobby.device("dev-a");
    let (s, b) = lobby.claim(&token, &dev).await;
    assert_eq!((s, b["tenant"].as_str()), (201, Some("acme")), "{b}");
}

#[tokio::test]
async fn metrics_show_claims_and_connections() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    // Connects and (dropping the client) disconnects.
    connack(&lobby, &dev, Protocol::V5, "dev-a").await;
    let text = eventually(|| async {
        let text = lobby.metrics().await;
        text.contains("lobby_connections_total").then_some(text)
    })
    .await;
    assert!(text.contains("lobby_claims{"), "{text}");
    assert!(
        !text.contains(&dev.hex()),
        "metrics must not carry device ids"
    );
}
