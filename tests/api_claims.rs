//! HTTP API, SPEC §3 and §6: claiming devices with their codes (`POST /v1/claims`), quotas,
//! durability, and unclaiming (`DELETE /v1/claims/{device_id}`).
mod common;

use common::*;
use lobby::claims::codes::ClaimKey;
use lobby::device::DeviceId;
use lobby::mqtt::codec::Protocol;
use serde_json::{json, Value};

async fn post_claim(lobby: &TestLobby, token: &str, body: Value) -> (u16, Value) {
    lobby.call("POST", "/v1/claims", token, Some(body)).await
}

/// Claims `dev` with its code and its certificate (`cert_pem`); that must create the claim.
async fn claim_with_cert(lobby: &TestLobby, token: &str, dev: &Device) {
    let body = json!({"code": dev.code, "cert_pem": dev.cert_pem});
    let (s, b) = post_claim(lobby, token, body).await;
    assert_eq!(s, 201, "{b}");
}

/// Creates the tenant `small` with a quota of `max_devices`; returns its token.
async fn small_tenant(lobby: &TestLobby, max_devices: u32) -> String {
    let body = json!({"id": "small", "name": "Small", "endpoint": "iot.small.example", "max_devices": max_devices});
    let (s, b) = lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(body))
        .await;
    assert_eq!(s, 201, "{b}");
    b["token"].as_str().unwrap().to_owned()
}

/// Connects `dev` (v5) while it is unclaimed so the lobby has seen it, then disconnects.
async fn connect_once(lobby: &TestLobby, dev: &Device) {
    connected(lobby, dev, Protocol::V5).await;
}

#[tokio::test]
async fn claim_then_reclaim_then_other_tenant() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("dev-a");
    let want = json!({"device_id": dev.hex(), "tenant": "acme", "state": "ready"});
    assert_eq!(lobby.claim(&acme, &dev).await, (201, want.clone()));
    assert_eq!(lobby.claim(&acme, &dev).await, (200, want));
    assert_error(&lobby.claim(&beta, &dev).await, 409, "already_claimed");
    let (_, d) = lobby.device_json(&lobby.admin, &dev).await;
    assert_eq!(d["tenant"], "acme");
    assert_error(&lobby.device_json(&beta, &dev).await, 404, "not_found");
}

#[tokio::test]
async fn wrong_and_unknown_codes_look_the_same() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    connect_once(&lobby, &dev).await;
    let other_key = ClaimKey::from_bytes(&[7u8; 32]);
    let forged = other_key.code_for(&dev.id);
    let unknown = other_key.code_for(&DeviceId([0x42; 32]));
    let f = post_claim(&lobby, &acme, json!({"code": forged})).await;
    let u = post_claim(&lobby, &acme, json!({"code": unknown})).await;
    assert_error(&f, 403, "invalid_code");
    assert_eq!(
        f, u,
        "a wrong code and an unknown device must give the same answer"
    );
    // Right device, secret of another device.
    let other = lobby.device("dev-b");
    let (_, secret) = other.code.rsplit_once(':').unwrap();
    let swapped = format!("LOBBY1:{}:{secret}", dev.hex());
    assert_eq!(post_claim(&lobby, &acme, json!({"code": swapped})).await, f);
    let truncated = &dev.code[..dev.code.len() - 1];
    let long = "A".repeat(10_000);
    let v2 = dev.code.replacen("LOBBY1", "LOBBY2", 1);
    let extra = format!("{}:x", dev.code);
    for garbage in [
        "",
        " ",
        "hello",
        "LOBBY1:",
        "LOBBY1::",
        "LOBBY1:zz:AAAA",
        truncated,
        long.as_str(),
        "é".repeat(100).as_str(),
        v2.as_str(),
        extra.as_str(),
    ] {
        let got = post_claim(&lobby, &acme, json!({"code": garbage})).await;
        assert_error(&got, 403, "invalid_code");
    }
    let (_, d) = lobby.device_json(&lobby.admin, &dev).await;
    assert_eq!(d["state"], "unclaimed", "{d}");
}

#[tokio::test]
async fn codes_are_accepted_in_lowercase() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    let (s, b) = post_claim(&lobby, &acme, json!({"code": dev.code.to_lowercase()})).await;
    assert_eq!(
        (s, b["device_id"].as_str()),
        (201, Some(dev.hex().as_str())),
        "{b}"
    );
}

#[tokio::test]
async fn claim_body_must_be_well_formed() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    for bad in [
        json!({}),
        json!({"code": 5}),
        json!({"code": null}),
        json!({"code": dev.code, "color": "red"}),
        json!({"code": dev.code, "cert_pem": 1}),
        json!([dev.code]),
    ] {
        assert_error(
            &post_claim(&lobby, &acme, bad).await,
            400,
            "invalid_request",
        );
    }
}

#[tokio::test]
async fn operator_claims_name_an_existing_tenant() {
    let lobby = TestLobby::start().await;
    lobby.tenant("acme", "iot.acme.example").await;
    let (admin, dev) = (lobby.admin.clone(), lobby.device("dev-a"));
    let got = post_claim(&lobby, &admin, json!({"code": dev.code})).await;
    assert_error(&got, 400, "invalid_request");
    let got = post_claim(
        &lobby,
        &admin,
        json!({"code": dev.code, "tenant": "nobody"}),
    )
    .await;
    assert_error(&got, 400, "invalid_request");
    let (s, b) = post_claim(&lobby, &admin, json!({"code": dev.code, "tenant": "acme"})).await;
    assert_eq!(
        (s, b),
        (
            201,
            json!({"device_id": dev.hex(), "tenant": "acme", "state": "ready"})
        )
    );
}

#[tokio::test]
async fn a_tenant_claims_only_for_itself() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("dev-a");
    let got = post_claim(&lobby, &acme, json!({"code": dev.code, "tenant": "beta"})).await;
    assert_error(&got, 400, "invalid_request");
    let (_, list) = lobby.call("GET", "/v1/devices", &lobby.admin, None).await;
    assert_eq!(list["devices"], json!([]), "{list}");
    let (s, b) = post_claim(&lobby, &acme, json!({"code": dev.code, "tenant": "acme"})).await;
    assert_eq!((s, b["tenant"].as_str()), (201, Some("acme")), "{b}");
}

#[tokio::test]
async fn cert_pem_must_be_the_device_of_the_code() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let (dev, other) = (lobby.device("sensor-7"), lobby.device("sensor-8"));
    for pem in [other.cert_pem.as_str(), "not a pem", ""] {
        let got = post_claim(&lobby, &acme, json!({"code": dev.code, "cert_pem": pem})).await;
        assert_error(&got, 400, "invalid_request");
    }
    claim_with_cert(&lobby, &acme, &dev).await;
    let (s, d) = lobby.device_json(&acme, &dev).await;
    assert_eq!(
        (s, d["thing_name"].as_str()),
        (200, Some("sensor-7")),
        "{d}"
    );
}

#[tokio::test]
async fn quota_limits_claims_per_tenant() {
    let lobby = TestLobby::start().await;
    let token = small_tenant(&lobby, 1).await;
    let (a, b2) = (lobby.device("dev-a"), lobby.device("dev-b"));
    assert_eq!(lobby.claim(&token, &a).await.0, 201);
    assert_error(&lobby.claim(&token, &b2).await, 429, "quota_exceeded");
    assert_eq!(
        lobby.claim(&token, &a).await.0,
        200,
        "re-claiming its own device is no new device"
    );
    let got = post_claim(
        &lobby,
        &lobby.admin,
        json!({"code": b2.code, "tenant": "small"}),
    )
    .await;
    assert_error(&got, 429, "quota_exceeded");
    let path = format!("/v1/claims/{}", a.hex());
    assert_eq!(lobby.call("DELETE", &path, &token, None).await.0, 200);
    assert_eq!(lobby.claim(&token, &b2).await.0, 201);
}

#[tokio::test]
async fn a_claim_survives_a_restart() {
    let mut lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("dev-a");
    claim_with_cert(&lobby, &acme, &dev).await;
    let (_, before) = lobby.device_json(&acme, &dev).await;
    lobby.restart().await;
    let (s, d) = lobby.device_json(&acme, &dev).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (d["state"].as_str(), d["tenant"].as_str()),
        (Some("ready"), Some("acme"))
    );
    for k in ["thing_name", "claimed_at"] {
        assert_eq!(d[k], before[k], "{k}");
    }
    assert_eq!(lobby.claim(&acme, &dev).await.0, 200);
    assert_error(&lobby.claim(&beta, &dev).await, 409, "already_claimed");
}

#[tokio::test]
async fn the_owner_unclaims() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("dev-a");
    connect_once(&lobby, &dev).await;
    assert_eq!(lobby.claim(&acme, &dev).await.0, 201);
    let path = format!("/v1/claims/{}", dev.hex());
    assert_error(
        &lobby.call("DELETE", &path, &beta, None).await,
        404,
        "not_found",
    );
    let (_, d) = lobby.device_json(&acme, &dev).await;
    assert_eq!(
        d["state"], "ready",
        "another tenant's unclaim changed nothing"
    );
    let (s, b) = lobby.call("DELETE", &path, &acme, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["device_id"].as_str(), b["state"].as_str()),
        (Some(dev.hex().as_str()), Some("unclaimed"))
    );
    assert_error(&lobby.device_json(&acme, &dev).await, 404, "not_found");
    let (s, d) = lobby.device_json(&lobby.admin, &dev).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (d["state"].as_str(), &d["tenant"]),
        (Some("unclaimed"), &Value::Null)
    );
    assert_error(
        &lobby.call("DELETE", &path, &acme, None).await,
        404,
        "not_found",
    );
    // Free again: another tenant may claim it now.
    assert_eq!(lobby.claim(&beta, &dev).await.0, 201);
}

#[tokio::test]
async fn the_operator_unclaims_and_unknown_devices_are_not_found() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&acme, &dev).await.0, 201);
    let (s, b) = lobby
        .call(
            "DELETE",
            &format!("/v1/claims/{}", dev.hex()),
            &lobby.admin,
            None,
        )
        .await;
    assert_eq!((s, b["state"].as_str()), (200, Some("unclaimed")), "{b}");
    assert_error(&lobby.device_json(&acme, &dev).await, 404, "not_found");
    let never = lobby.device("never-claimed");
    for token in [&lobby.admin, &acme] {
        let got = lobby
            .call(
                "DELETE",
                &format!("/v1/claims/{}", never.hex()),
                token,
                None,
            )
            .await;
        assert_error(&got, 404, "not_found");
        for bad in ["xyz", "00", &"g".repeat(64)] {
            let (s, b) = lobby
                .call("DELETE", &format!("/v1/claims/{bad}"), token, None)
                .await;
            assert!(s == 404 || s == 400, "{bad}: {s} {b}");
            assert!(b["error"].is_string(), "{bad}: {b}");
        }
    }
}

#[tokio::test]
async fn concurrent_claims_have_one_winner_and_respect_the_quota() {
    let lobby = TestLobby::start().await;
    let mut tokens = Vec::new();
    for i in 0..6 {
        tokens.push(lobby.tenant(&format!("t{i}"), "iot.example").await);
    }
    let dev = lobby.device("contested");
    let results = futures_join(tokens.iter().map(|t| lobby.claim(t, &dev))).await;
    let wins = results.iter().filter(|r| r.0 == 201).count();
    assert_eq!(wins, 1, "{results:?}");
    for r in results.iter().filter(|r| r.0 != 201) {
        assert_error(r, 409, "already_claimed");
    }
    let small = small_tenant(&lobby, 2).await;
    let devs: Vec<Device> = (0..6).map(|i| lobby.device(&format!("q{i}"))).collect();
    let results = futures_join(devs.iter().map(|d| lobby.claim(&small, d))).await;
    assert_eq!(
        results.iter().filter(|r| r.0 == 201).count(),
        2,
        "{results:?}"
    );
    for r in results.iter().filter(|r| r.0 != 201) {
        assert_error(r, 429, "quota_exceeded");
    }
}

/// Runs the futures concurrently on this task and returns their outputs in order.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in set.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// Rotating the claim key (`claims.previous_code_keys`): labels printed under the old key
/// still claim their devices; new labels use the new key; a label from a key the lobby never
/// had is refused.
#[tokio::test]
async fn labels_printed_under_a_retired_key_still_claim() {
    let dir = tempfile::tempdir().unwrap();
    let (old, stranger) = (ClaimKey::generate(), ClaimKey::generate());
    let old_path = dir.path().join("old-claim.key");
    std::fs::write(&old_path, old.to_file_text()).unwrap();
    let lobby =
        TestLobby::start_with(|c| c.claims.previous_code_keys = vec![old_path.clone()]).await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let (a, b, c) = (
        lobby.device("old-label"),
        lobby.device("new-label"),
        lobby.device("forged"),
    );
    let (s, body) = post_claim(&lobby, &token, json!({"code": old.code_for(&a.id)})).await;
    assert_eq!(s, 201, "{body}");
    // `dev.code` is made with the lobby's current key.
    assert_eq!(
        post_claim(&lobby, &token, json!({"code": b.code})).await.0,
        201
    );
    let got = post_claim(&lobby, &token, json!({"code": stranger.code_for(&c.id)})).await;
    assert_error(&got, 403, "invalid_code");
}
