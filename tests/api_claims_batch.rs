//! HTTP API, SPEC §12: a tenant claims a pallet at once (`POST /v1/claims:batch`). Each entry
//! answers what `POST /v1/claims` would for it, in request order; the batch as a whole is
//! checked like any body; what it claimed is durable and reaches waiting devices.
mod common;

use common::flows::{check_acme_redirect, expect_status};

use common::*;
use lobby::claims::codes::ClaimKey;
use lobby::mqtt::codec::Protocol;
use serde_json::{json, Value};

async fn batch(lobby: &TestLobby, token: &str, body: Value) -> (u16, Value) {
    lobby
        .call("POST", "/v1/claims:batch", token, Some(body))
        .await
}

/// The batch `{"claims":[{"code"},…]}` of `devs`' codes.
fn codes(devs: &[&Device]) -> Value {
    let claims: Vec<Value> = devs.iter().map(|d| json!({"code": d.code})).collect();
    json!({ "claims": claims })
}

/// The `results` of a batch that must be answered 200.
async fn results(lobby: &TestLobby, token: &str, body: Value) -> Vec<Value> {
    let (status, body) = batch(lobby, token, body).await;
    assert_eq!(status, 200, "{body}");
    body["results"].as_array().unwrap().clone()
}

/// One entry's error: its `status` and `error` code, with a message.
fn assert_entry_error(entry: &Value, status: u16, code: &str) {
    assert_eq!(
        (entry["status"].as_u64(), entry["error"].as_str()),
        (Some(u64::from(status)), Some(code)),
        "{entry}"
    );
    assert!(entry["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn each_entry_answers_as_a_single_claim_would_in_request_order() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let (new, own, theirs, named) = (
        lobby.device("new"),
        lobby.device("own"),
        lobby.device("theirs"),
        lobby.device("named"),
    );
    assert_eq!(lobby.claim(&acme, &own).await.0, 201);
    assert_eq!(lobby.claim(&beta, &theirs).await.0, 201);
    let forged = ClaimKey::from_bytes(&[7u8; 32]).code_for(&new.id);
    let body = json!({"claims": [
        {"code": new.code},
        {"code": forged},
        {"code": own.code},
        {"code": theirs.code},
        {"code": named.code, "cert_pem": new.cert_pem},
        {"code": named.code, "cert_pem": named.cert_pem},
    ]});
    let got = results(&lobby, &acme, body).await;
    assert_eq!(got.len(), 6, "{got:?}");
    let ready = |d: &Device, status: u16| json!({"status": status, "device_id": d.hex(), "tenant": "acme", "state": "ready"});
    assert_eq!(got[0], ready(&new, 201));
    assert_entry_error(&got[1], 403, "invalid_code");
    assert_eq!(got[2], ready(&own, 200));
    assert_entry_error(&got[3], 409, "already_claimed");
    assert_entry_error(&got[4], 400, "invalid_request");
    assert_eq!(got[5], ready(&named, 201));

    // What the entries said is what the API now holds.
    let (_, d) = lobby.device_json(&acme, &new).await;
    assert_eq!(d["tenant"], "acme", "{d}");
    let (_, d) = lobby.device_json(&acme, &named).await;
    assert_eq!(
        d["thing_name"], "named",
        "the entry's certificate named it: {d}"
    );
    let (_, d) = lobby.admin_device_json(&theirs).await;
    assert_eq!(d["tenant"], "beta", "{d}");
}

#[tokio::test]
async fn a_batch_respects_the_quota_exactly() {
    let lobby = TestLobby::start().await;
    let body =
        json!({"id": "small", "name": "Small", "endpoint": "iot.small.example", "max_devices": 3});
    let (s, b) = lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(body))
        .await;
    assert_eq!(s, 201, "{b}");
    let small = b["token"].as_str().unwrap().to_owned();
    let devs: Vec<Device> = (0..10).map(|i| lobby.device(&format!("q{i}"))).collect();
    let got = results(&lobby, &small, codes(&devs.iter().collect::<Vec<_>>())).await;
    let created = got.iter().filter(|e| e["status"] == 201).count();
    assert_eq!(created, 3, "{got:?}");
    for e in got.iter().filter(|e| e["status"] != 201) {
        assert_entry_error(e, 429, "quota_exceeded");
    }
}

#[tokio::test]
async fn the_operator_claims_a_batch_for_a_named_tenant() {
    let lobby = TestLobby::start().await;
    lobby.tenant("acme", "iot.acme.example").await;
    let devs: Vec<Device> = (0..5).map(|i| lobby.device(&format!("op{i}"))).collect();
    let mut body = codes(&devs.iter().collect::<Vec<_>>());
    body["tenant"] = json!("acme");
    let got = results(&lobby, &lobby.admin, body).await;
    for (e, d) in got.iter().zip(&devs) {
        assert_eq!(
            (&e["status"], &e["device_id"]),
            (&json!(201), &json!(d.hex()))
        );
        assert_eq!(e["tenant"], "acme");
    }
}

#[tokio::test]
async fn batch_bodies_are_checked_as_a_whole() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    lobby.tenant("beta", "iot.beta.example").await;
    let dev = lobby.device("d");
    let one = codes(&[&dev]);
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"code": dev.code})).collect();
    for (token, body) in [
        (&acme, json!({ "claims": too_many })),
        (
            &acme,
            json!({"claims": [{"code": dev.code, "colour": "red"}]}),
        ),
        (&acme, json!({"codes": [dev.code]})),
        (
            &acme,
            json!({"claims": [{"code": dev.code}], "tenant": "beta"}),
        ),
        (&lobby.admin, one.clone()),
        (
            &lobby.admin,
            json!({"claims": [{"code": dev.code}], "tenant": "nobody"}),
        ),
    ] {
        assert_error(&batch(&lobby, token, body).await, 400, "invalid_request");
    }
    assert_error(&batch(&lobby, "wrong", one).await, 401, "unauthorized");
    let (_, d) = lobby.admin_device_json(&dev).await;
    assert_eq!(
        d["tenant"],
        Value::Null,
        "no refused batch claimed anything: {d}"
    );
}

/// A full batch with a certificate-sized field per entry is far over the single-request body
/// limit; it is accepted and answered entry by entry.
#[tokio::test]
async fn a_full_batch_of_a_thousand_is_answered_entry_by_entry() {
    let lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let key = ClaimKey::from_bytes(&[9u8; 32]);
    let pem = format!("-----BEGIN CERTIFICATE-----\n{}\n", "A".repeat(1200));
    let claims: Vec<Value> = (0..1000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let code = key.code_for(&lobby::device::DeviceId(id));
            json!({"code": code, "cert_pem": pem})
        })
        .collect();
    let got = results(&lobby, &acme, json!({ "claims": claims })).await;
    assert_eq!(got.len(), 1000);
    for e in &got {
        assert_entry_error(e, 403, "invalid_code");
    }
}

/// What a batch answered 201 is durable (it outlives a restart), and a device waiting in the
/// lobby is sent on by it like by a single claim.
#[tokio::test]
async fn batch_claims_are_durable_and_send_waiting_devices_on() {
    let mut lobby = TestLobby::start().await;
    let acme = common::flows::redirect_tenant(&lobby).await;
    let waiting = lobby.device("waiting");
    let mut c = connected(&lobby, &waiting, Protocol::V5).await;
    assert_eq!(c.subscribe(1, &waiting.topic("redirect")).await, vec![1]);
    assert_eq!(c.subscribe(1, &waiting.topic("status")).await, vec![1]);
    expect_status(&mut c, &waiting, "unclaimed", None).await;
    let devs: Vec<Device> = (0..40).map(|i| lobby.device(&format!("p{i}"))).collect();
    let mut all: Vec<&Device> = devs.iter().collect();
    all.push(&waiting);
    let got = results(&lobby, &acme, codes(&all)).await;
    assert!(got.iter().all(|e| e["status"] == 201), "{got:?}");
    let (first, second) = (c.expect_publish().await, c.expect_publish().await);
    let redirect = [first, second]
        .into_iter()
        .find(|p| p.topic == waiting.topic("redirect"))
        .expect("a redirect");
    check_acme_redirect(&redirect, &waiting);

    lobby.restart().await;
    for d in &devs {
        let (s, body) = lobby.device_json(&acme, d).await;
        assert_eq!((s, body["tenant"].as_str()), (200, Some("acme")), "{body}");
    }
    let again = results(&lobby, &acme, codes(&all)).await;
    assert!(again.iter().all(|e| e["status"] == 200), "{again:?}");
}
