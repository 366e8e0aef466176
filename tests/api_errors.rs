//! HTTP API, SPEC §6: what the API answers to requests it refuses: missing or bad tokens on
//! every `/v1` route, malformed JSON bodies, bad query parameters, undecodable path segments,
//! oversized bodies, wrong methods and unknown paths. Always a JSON error, never a change.
mod common;

use common::*;
use serde_json::{json, Value};

const NO_DEVICE: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
        (
            "POST",
            "/v1/claims:batch".into(),
            Some(json!({"claims": [{"code": "x"}]})),
        ),
        ("DELETE", format!("/v1/claims/{dev}"), None),
        ("GET", "/v1/devices".into(), None),
        ("GET", format!("/v1/devices/{dev}"), None),
        (
            "POST",
            format!("/v1/devices/{dev}/migrate"),
            Some(json!({"tenant": "acme"})),
        ),
        ("POST", format!("/v1/devices/{dev}/revoke"), None),
        ("POST", format!("/v1/devices/{dev}/retry"), None),
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
            let (s, b) = lobby.raw(method, &path, auth.as_deref(), body).await;
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
    let (s, d) = lobby.device_json(&admin, &dev).await;
    assert_eq!((s, d["state"].as_str()), (200, Some("ready")), "{d}");
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let lobby = TestLobby::start().await;
    for path in ["/healthz", "/readyz"] {
        let resp = lobby.http.get(lobby.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    for path in ["/nope", "/v1/nope", "/v1/devices/a/b/c", "/v2/tenants"] {
        let got = lobby.raw("GET", path, None, None).await;
        assert_error(&got, 404, "not_found");
        let auth = format!("Bearer {}", lobby.admin);
        assert_error(
            &lobby.raw("GET", path, Some(&auth), None).await,
            404,
            "not_found",
        );
    }
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
            let got = lobby
                .raw(method, path, Some(&auth), Some(body.clone()))
                .await;
            assert_error(&got, 400, "invalid_request");
        }
    }
    // Tenants send malformed claims too.
    let tauth = format!("Bearer {token}");
    for body in &bodies {
        let got = lobby
            .raw("POST", "/v1/claims", Some(&tauth), Some(body.clone()))
            .await;
        assert_error(&got, 400, "invalid_request");
    }
    let d = lobby.admin_device(&dev).await;
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
        let got = lobby.raw(method, path, Some(&auth), None).await;
        assert_json_error(&got, &[400, 404], path);
    }
}

#[tokio::test]
async fn oversized_bodies_are_json_errors() {
    let lobby = TestLobby::start().await;
    let auth = format!("Bearer {}", lobby.admin);
    let code = "A".repeat(4 << 20);
    let body = serde_json::to_vec(&json!({"code": code, "tenant": "acme"})).unwrap();
    for path in ["/v1/claims", "/v1/tenants"] {
        let got = lobby
            .raw("POST", path, Some(&auth), Some(body.clone()))
            .await;
        assert_json_error(&got, &[400, 413], path);
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
        let got = lobby.raw(method, path, Some(&auth), None).await;
        assert_json_error(&got, &[405], &format!("{method} {path}"));
    }
}
