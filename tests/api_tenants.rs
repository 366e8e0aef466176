//! HTTP API, SPEC §6: authentication, tenant CRUD, health and metrics, and what the API answers
//! to malformed requests. Claims are in `api_claims.rs`, devices in `api_devices.rs`.
mod common;

use common::*;
use lobby::mqtt::codec::{Packet, Protocol};
use serde_json::{json, Value};

const NO_DEVICE: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Asserts a SPEC §6 error: `status` and `{"error": code, "message": "..."}`.
fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].is_string(), "{body}");
}

/// A request with a raw `Authorization` header (or none) and a raw body (or none).
async fn raw(
    lobby: &TestLobby,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = lobby.http.request(method, lobby.url(path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Every `/v1` route, with a body where it takes one.
fn v1_routes(dev: &str) -> Vec<(&'static str, String, Option<Value>)> {
    let tenant = json!({"name": "x", "endpoint": "x.example"});
    vec![
        ("GET", "/v1/tenants".into(), None),
        ("POST", "/v1/tenants".into(), Some(tenant.clone())),
        ("GET", "/v1/tenants/acme".into(), None),
        ("PATCH", "/v1/tenants/acme".into(), Some(json!({"port": 1}))),
        ("DELETE", "/v1/tenants/acme".into(), None),
        ("POST", "/v1/claims".into(), Some(json!({"code": "x"}))),
        ("DELETE", format!("/v1/claims/{dev}"), None),
        ("GET", "/v1/devices".into(), None),
        ("GET", format!("/v1/devices/{dev}"), None),
        (
            "POST",
            format!("/v1/devices/{dev}/migrate"),
            Some(json!({"tenant": "acme"})),
        ),
        ("POST", format!("/v1/devices/{dev}/revoke"), None),
    ]
}

#[tokio::test]
async fn every_v1_route_refuses_missing_or_bad_tokens() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let admin = lobby.admin.clone();
    let bad_headers: Vec<Option<String>> = vec![
        None,
        Some("Bearer wrong-token".into()),
        Some("Bearer ".into()),
        Some("Bearer".into()),
        Some(admin.clone()),
        Some(format!("Basic {admin}")),
        Some(format!("Token {admin}")),
        Some(format!("Bearer {admin}x")),
        Some(format!("Bearer {}", &admin[..admin.len() - 1])),
    ];
    for (method, path, body) in v1_routes(&dev.hex()) {
        for auth in &bad_headers {
            let body = body.as_ref().map(|b| serde_json::to_vec(b).unwrap());
            let (s, b) = raw(&lobby, method, &path, auth.as_deref(), body).await;
            let what = format!("{method} {path} with {auth:?}");
            assert_eq!(
                (s, b["error"].as_str()),
                (401, Some("unauthorized")),
                "{what}: {b}"
            );
            assert!(b["message"].is_string(), "{what}: {b}");
        }
    }
    // Nothing above changed anything.
    assert_eq!(
        lobby.call("GET", "/v1/tenants/acme", &admin, None).await.0,
        200
    );
    let (s, d) = lobby
        .call("GET", &format!("/v1/devices/{}", dev.hex()), &admin, None)
        .await;
    assert_eq!((s, d["state"].as_str()), (200, Some("ready")), "{d}");
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
    let admin = &lobby.admin;
    let (_, t) = lobby.call("GET", "/v1/tenants/acme", admin, None).await;
    assert_eq!(t["endpoint"], "iot.acme.example");
    assert_eq!(
        lobby.call("GET", "/v1/tenants/other", admin, None).await.0,
        200
    );
    let (_, d) = lobby
        .call("GET", &format!("/v1/devices/{hex}"), admin, None)
        .await;
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
    let (s, b) = lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(body))
        .await;
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
    let (_, one) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
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
        let (s, b) = lobby
            .call("POST", "/v1/tenants", &lobby.admin, Some(body))
            .await;
        assert_eq!(s, 201, "{b}");
        let id = b["tenant"]["id"].as_str().unwrap().to_owned();
        assert!(
            !id.is_empty()
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{id}"
        );
        let (s, one) = lobby
            .call("GET", &format!("/v1/tenants/{id}"), &lobby.admin, None)
            .await;
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
    let got = lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(body))
        .await;
    assert_error(&got, 409, "conflict");
    let (_, t) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
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
        let got = raw(
            &lobby,
            "POST",
            "/v1/tenants",
            Some(&auth),
            Some(body.to_vec()),
        )
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
        let got = lobby
            .call("POST", "/v1/tenants", &lobby.admin, Some(body))
            .await;
        assert_error(&got, 400, "invalid_request");
    }
    for (i, ep) in ["iot.acme.example", "192.0.2.7", "[2001:db8::1]"]
        .iter()
        .enumerate()
    {
        let body = json!({"id": format!("ok{i}"), "name": "x", "endpoint": ep});
        let (s, b) = lobby
            .call("POST", "/v1/tenants", &lobby.admin, Some(body))
            .await;
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
    let (s, t) = lobby
        .call("GET", "/v1/tenants/beta", &lobby.admin, None)
        .await;
    assert_eq!(
        (s, t["endpoint"].as_str()),
        (200, Some("iot.beta.example")),
        "{t}"
    );
    let got = lobby
        .call("GET", "/v1/tenants/nobody", &lobby.admin, None)
        .await;
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
    let (_, got) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    for (k, v) in [
        ("endpoint", json!("new.acme.example")),
        ("port", json!(1884)),
        ("mode", json!("redirect")),
        ("name", json!("Acme 2")),
        ("region", json!("eu-west-1")),
    ] {
        assert_eq!(got[k], v, "{k} in {got}");
    }
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V5).await;
    c.send_connect("dev-a").await;
    let Packet::ConnAck(ack) = c.expect().await else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, 0x9D);
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some("new.acme.example:1884")
    );
    // The old token still works after a PATCH.
    assert_eq!(lobby.call("GET", "/v1/devices", &token, None).await.0, 200);
}

#[tokio::test]
async fn patch_rejects_bad_input_and_unknown_tenants() {
    let lobby = TestLobby::start().await;
    lobby.tenant("acme", "iot.acme.example").await;
    let (_, before) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
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
    let (_, after) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
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
    assert_eq!(
        lobby
            .call("GET", "/v1/tenants/acme", &lobby.admin, None)
            .await
            .0,
        200
    );
    let (s, b) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = lobby
        .call("DELETE", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    assert!((200..300).contains(&s), "{s} {b}");
    assert_error(
        &lobby
            .call("GET", "/v1/tenants/acme", &lobby.admin, None)
            .await,
        404,
        "not_found",
    );
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
    let (_, before) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    lobby.restart().await;
    let (s, after) = lobby
        .call("GET", "/v1/tenants/acme", &lobby.admin, None)
        .await;
    assert_eq!((s, &after), (200, &before));
    assert_eq!(lobby.call("GET", "/v1/devices", &token, None).await.0, 200);
    let dev = lobby.device("dev-a");
    let (s, b) = lobby.claim(&token, &dev).await;
    assert_eq!((s, b["tenant"].as_str()), (201, Some("acme")), "{b}");
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let lobby = TestLobby::start().await;
    for path in ["/healthz", "/readyz"] {
        let resp = lobby.http.get(lobby.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    for path in ["/nope", "/v1/nope", "/v1/devices/a/b/c", "/v2/tenants"] {
        let got = raw(&lobby, "GET", path, None, None).await;
        assert_error(&got, 404, "not_found");
        let auth = format!("Bearer {}", lobby.admin);
        assert_error(
            &raw(&lobby, "GET", path, Some(&auth), None).await,
            404,
            "not_found",
        );
    }
}

#[tokio::test]
async fn metrics_show_claims_and_connections() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V5).await;
    c.send_connect("dev-a").await;
    assert!(matches!(c.expect().await, Packet::ConnAck(_)));
    drop(c);
    let text = eventually(|| async {
        let resp = lobby.http.get(lobby.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().await.unwrap();
        text.contains("lobby_connections_total").then_some(text)
    })
    .await;
    assert!(text.contains("lobby_claims{"), "{text}");
    assert!(
        !text.contains(&dev.hex()),
        "metrics must not carry device ids"
    );
}

#[tokio::test]
async fn malformed_json_on_every_body_route_is_invalid_request() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    // Far past serde_json's recursion limit, within the 64 KiB body limit (see api.rs).
    let deep = "[".repeat(60_000);
    let bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"not json".to_vec(),
        b"".to_vec(),
        b"{\"tenant\":\"acme\"} trailing".to_vec(),
        b"[1,2]".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        b"{\"code\":\"\xff\"}".to_vec(),
        deep.into_bytes(),
    ];
    let auth = format!("Bearer {}", lobby.admin);
    let routes = [
        ("POST", "/v1/tenants".to_owned()),
        ("PATCH", "/v1/tenants/acme".into()),
        ("POST", "/v1/claims".into()),
        ("POST", format!("/v1/devices/{}/migrate", dev.hex())),
    ];
    for (method, path) in &routes {
        for body in &bodies {
            let got = raw(&lobby, method, path, Some(&auth), Some(body.clone())).await;
            assert_error(&got, 400, "invalid_request");
        }
    }
    // Tenants send malformed claims too.
    let tauth = format!("Bearer {token}");
    for body in &bodies {
        let got = raw(
            &lobby,
            "POST",
            "/v1/claims",
            Some(&tauth),
            Some(body.clone()),
        )
        .await;
        assert_error(&got, 400, "invalid_request");
    }
    let (_, d) = lobby
        .call(
            "GET",
            &format!("/v1/devices/{}", dev.hex()),
            &lobby.admin,
            None,
        )
        .await;
    assert_eq!(
        (d["tenant"].as_str(), d["state"].as_str()),
        (Some("acme"), Some("ready"))
    );
}

#[tokio::test]
async fn bad_query_parameters_are_invalid_request() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    for token in [&lobby.admin, &acme] {
        for q in [
            "state=sleeping",
            "after=xyz",
            "limit=abc",
            "limit=-1",
            "limit=1.5",
        ] {
            let (s, b) = lobby
                .call("GET", &format!("/v1/devices?{q}"), token, None)
                .await;
            assert_eq!(
                (s, b["error"].as_str()),
                (400, Some("invalid_request")),
                "{q}: {b}"
            );
            assert!(b["message"].is_string(), "{q}: {b}");
        }
    }
    let got = lobby
        .call(
            "GET",
            &format!("/v1/devices/{NO_DEVICE}"),
            &lobby.admin,
            None,
        )
        .await;
    assert_error(&got, 404, "not_found");
}

#[tokio::test]
async fn undecodable_path_segments_are_json_errors() {
    let lobby = TestLobby::start().await;
    let auth = format!("Bearer {}", lobby.admin);
    for path in ["/v1/devices/%FF", "/v1/tenants/%FF", "/v1/claims/%C3%28"] {
        let method = if path.starts_with("/v1/claims") {
            "DELETE"
        } else {
            "GET"
        };
        let (s, b) = raw(&lobby, method, path, Some(&auth), None).await;
        assert!(s == 400 || s == 404, "{path}: {s}");
        assert!(
            b["error"].is_string() && b["message"].is_string(),
            "{path}: {s} {b}"
        );
    }
}

#[tokio::test]
async fn oversized_bodies_are_json_errors() {
    let lobby = TestLobby::start().await;
    let auth = format!("Bearer {}", lobby.admin);
    let code = "A".repeat(4 << 20);
    let body = serde_json::to_vec(&json!({"code": code, "tenant": "acme"})).unwrap();
    for path in ["/v1/claims", "/v1/tenants"] {
        let (s, b) = raw(&lobby, "POST", path, Some(&auth), Some(body.clone())).await;
        assert!(s == 400 || s == 413, "{path}: {s}");
        assert!(
            b["error"].is_string() && b["message"].is_string(),
            "{path}: {s} {b}"
        );
    }
}

#[tokio::test]
async fn wrong_methods_are_json_errors() {
    let lobby = TestLobby::start().await;
    let auth = format!("Bearer {}", lobby.admin);
    for (method, path) in [
        ("PUT", "/v1/tenants"),
        ("GET", "/v1/claims"),
        ("DELETE", "/v1/devices"),
    ] {
        let (s, b) = raw(&lobby, method, path, Some(&auth), None).await;
        assert_eq!(s, 405, "{method} {path}");
        assert!(
            b["error"].is_string() && b["message"].is_string(),
            "{method} {path}: {s} {b}"
        );
    }
}
