//! SPEC §5 `backend.kind = "aws-iot"` end to end against moto's server: the lobby assumes the
//! tenant's role and registers the certificate, thing, principal and policy in the tenant's
//! account (moto), looks the endpoint up when the tenant has none, and removes what it created
//! on unclaim and migrate.
//!
//! Each test runs its own `moto_server` (port 0, read back from its log) and its own lobby, so
//! tests stay independent; moto keeps its state in memory and dies with the test.

mod common;
mod moto;

use common::*;
use moto::*;

use std::time::Duration;

use lobby::mqtt::codec::Protocol;
use serde_json::json;
use tokio::time::Instant;
// ---- tests ---------------------------------------------------------------------------------------

/// Claim with `cert_pem` on a tenant without `endpoint`: certificate, thing (the CN), principal
/// and policy land in the tenant's account, the endpoint is looked up and stored, and a v5
/// device is sent there.
#[tokio::test(flavor = "multi_thread")]
async fn claim_with_cert_registers_in_tenant_account() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let token = aws_tenant(&lobby, "acme", "eu-west-1", json!({})).await;
    let dev = lobby.device("dev-aws-1");

    let started = Instant::now();
    claim_with_cert(&lobby, &token, &dev).await;
    let d = device_in(&lobby, &dev, "ready").await;
    eprintln!("claim → ready against moto: {:?}", started.elapsed());
    assert_eq!(d["tenant"], "acme", "{d}");
    assert_eq!(d["thing_name"], "dev-aws-1", "{d}");
    assert!(d["error"].is_null(), "{d}");

    assert_registered(&iot, &dev, "dev-aws-1").await;

    let endpoint = tenant_json(&lobby, "acme").await["endpoint"]
        .as_str()
        .expect("the looked-up endpoint is stored on the tenant")
        .to_owned();
    assert_ats_endpoint(&endpoint, "eu-west-1");

    let (_c, ack) = common::connack(&lobby, &dev, Protocol::V5, "dev-aws-1").await;
    assert_eq!(ack.code, 0x9D, "{ack:?}");
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some(format!("{endpoint}:8883").as_str()),
        "{ack:?}"
    );
}

/// A tenant created without `external_id` gets one the lobby makes (in the record it returns),
/// and the lobby's AssumeRole into the tenant's role carries exactly that one (moto's
/// recording of the STS requests).
#[tokio::test(flavor = "multi_thread")]
async fn a_made_external_id_is_what_assume_role_carries() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let body = tenant_without_external_id(&lobby, json!({"region": "eu-west-1"})).await;
    let made = body["tenant"]["backend"]["external_id"]
        .as_str()
        .expect("the made external id is in the record")
        .to_owned();
    assert!(made.starts_with("lobby-") && made.len() == 46, "{made}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        tenant_json(&lobby, "acme").await["backend"]["external_id"],
        made
    );

    let dev = lobby.device("dev-ext-1");
    claim_with_cert(&lobby, &token, &dev).await;
    device_in(&lobby, &dev, "ready").await;
    assert_registered(&iot, &dev, "dev-ext-1").await;
    let ids = moto.recorded_form_values("AssumeRole", "ExternalId").await;
    assert!(!ids.is_empty(), "the lobby assumed the tenant's role");
    assert!(ids.iter().all(|id| *id == made), "{ids:?}, made {made}");
    let roles = moto.recorded_form_values("AssumeRole", "RoleArn").await;
    assert!(roles.iter().all(|r| r == ROLE_ARN), "{roles:?}");
}

/// `GET /v1/tenants/{id}/aws-trust-policy`: the policy names the lobby's principal (moto's
/// GetCallerIdentity) and the tenant's external id; the tenant reads its own, never another's;
/// a tenant without an aws-iot backend has none.
#[tokio::test(flavor = "multi_thread")]
async fn the_trust_policy_names_the_lobby_and_the_external_id() {
    let moto = Moto::start().await;
    let lobby = lobby_on(&moto).await;
    let token = aws_tenant(&lobby, "acme", "eu-west-1", json!({})).await;
    let other = aws_tenant(&lobby, "other", "eu-west-1", json!({})).await;
    let path = "/v1/tenants/acme/aws-trust-policy";
    for caller in [&lobby.admin, &token] {
        let (status, policy) = lobby.call("GET", path, caller, None).await;
        assert_eq!(status, 200, "{policy}");
        let statement = &policy["Statement"][0];
        assert_eq!(policy["Version"], "2012-10-17");
        assert_eq!(statement["Effect"], "Allow");
        assert_eq!(statement["Action"], "sts:AssumeRole");
        assert_eq!(
            statement["Principal"]["AWS"], "arn:aws:iam::123456789012:user/moto",
            "{policy}"
        );
        assert_eq!(
            statement["Condition"]["StringEquals"]["sts:ExternalId"], EXTERNAL_ID,
            "{policy}"
        );
    }
    let (status, _) = lobby.call("GET", path, &other, None).await;
    assert_eq!(status, 404, "another tenant's policy is not found");
    let (status, body) = lobby
        .call(
            "POST",
            "/v1/tenants",
            &lobby.admin,
            Some(json!({"id": "plain", "name": "Plain", "endpoint": "iot.example.com"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = lobby
        .call(
            "GET",
            "/v1/tenants/plain/aws-trust-policy",
            &lobby.admin,
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = lobby
        .call(
            "GET",
            "/v1/tenants/nope/aws-trust-policy",
            &lobby.admin,
            None,
        )
        .await;
    assert_eq!(status, 404);
}

/// Without AWS (its STS unreachable), the trust policy is 503 `unavailable`, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn the_trust_policy_without_aws_is_unavailable() {
    let lobby = lobby_at("http://127.0.0.1:9".into()).await;
    tenant_without_external_id(&lobby, json!({"endpoint": "iot.example.com"})).await;
    let (status, body) = lobby
        .call(
            "GET",
            "/v1/tenants/acme/aws-trust-policy",
            &lobby.admin,
            None,
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("AWS identity"),
        "{body}"
    );
}

/// Creates the aws-iot tenant `acme` without an `external_id` (`extra`: more tenant fields);
/// the 201 body.
async fn tenant_without_external_id(
    lobby: &TestLobby,
    extra: serde_json::Value,
) -> serde_json::Value {
    let backend = json!({
        "kind": "aws-iot", "region": "eu-west-1", "role_arn": ROLE_ARN, "policy_name": POLICY,
    });
    let mut tenant = json!({"id": "acme", "name": "Acme", "backend": backend});
    for (k, v) in extra.as_object().unwrap() {
        tenant[k] = v.clone();
    }
    let (status, body) = lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(tenant))
        .await;
    assert_eq!(status, 201, "{body}");
    body
}

/// A `role_arn` that is not an IAM role's ARN is refused before anything is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_arn_that_is_not_an_iam_role_is_refused() {
    let lobby = TestLobby::start_with(|_| {}).await;
    for bad in [
        "lobby-role",
        "arn:aws:iam::123456789012:user/lobby",
        "arn:aws:sts::123456789012:assumed-role/lobby/s",
        "arn:aws:iam::12345:role/lobby",
    ] {
        let backend = json!({
            "kind": "aws-iot", "region": "eu-west-1", "role_arn": bad, "policy_name": POLICY,
        });
        let (status, body) = lobby
            .call(
                "POST",
                "/v1/tenants",
                &lobby.admin,
                Some(json!({"id": "t", "name": "T", "backend": backend})),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("role_arn"),
            "{body}"
        );
    }
    let (status, _) = lobby.call("GET", "/v1/tenants/t", &lobby.admin, None).await;
    assert_eq!(status, 404, "nothing was stored");
}

/// The tenant's `thing_name` template names the thing (and the device's thing name).
#[tokio::test(flavor = "multi_thread")]
async fn thing_name_template_names_the_thing() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let token = aws_tenant(
        &lobby,
        "acme",
        "eu-west-1",
        json!({"thing_name": "acme-{cn}"}),
    )
    .await;
    let dev = lobby.device("dev-aws-2");

    claim_with_cert(&lobby, &token, &dev).await;
    let d = device_in(&lobby, &dev, "ready").await;
    assert_eq!(d["thing_name"], "acme-dev-aws-2", "{d}");
    assert_registered(&iot, &dev, "acme-dev-aws-2").await;
}

/// Claimed without `cert_pem` while away: the registration waits; when the device connects its
/// handshake certificate is registered and the waiting v3.1.1 device is redirected.
#[tokio::test(flavor = "multi_thread")]
async fn claim_without_cert_registers_when_device_connects() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let token = aws_tenant(&lobby, "acme", "eu-west-1", json!({})).await;
    let dev = lobby.device("dev-aws-3");

    let (status, body) = lobby.claim(&token, &dev).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["state"], "registering", "{body}");
    // Nothing to register yet: the state holds and moto stays empty.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let d = lobby.admin_device(&dev).await;
        assert_eq!(d["state"], "registering", "{d}");
    }
    let h = holding(&iot).await;
    assert!(h.certs.is_empty() && h.things.is_empty(), "{h:?}");

    let mut c = common::connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("#")).await, vec![1]);
    let (states, redirect) = statuses_until_redirect(&mut c, &dev).await;
    assert_eq!(
        states.first().map(String::as_str),
        Some("registering"),
        "{states:?}"
    );
    assert!(states.iter().any(|s| s == "ready"), "{states:?}");

    let endpoint = tenant_json(&lobby, "acme").await["endpoint"]
        .as_str()
        .expect("the looked-up endpoint is stored on the tenant")
        .to_owned();
    assert_ats_endpoint(&endpoint, "eu-west-1");
    assert_eq!(redirect["endpoint"], endpoint.as_str(), "{redirect}");
    assert_eq!(redirect["port"], 8883, "{redirect}");
    assert_eq!(redirect["tenant"], "acme", "{redirect}");
    assert_eq!(redirect["region"], "eu-west-1", "{redirect}");
    assert_eq!(redirect["thing_name"], "dev-aws-3", "{redirect}");
    assert_eq!(redirect["device_id"], dev.hex(), "{redirect}");

    assert_eq!(lobby.admin_device(&dev).await["state"], "ready");
    assert_registered(&iot, &dev, "dev-aws-3").await;
}

/// Unclaim removes the certificate and the thing from the tenant's account (not its policy).
#[tokio::test(flavor = "multi_thread")]
async fn unclaim_removes_registration() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let token = aws_tenant(&lobby, "acme", "eu-west-1", json!({})).await;
    let dev = lobby.device("dev-aws-4");

    claim_with_cert(&lobby, &token, &dev).await;
    device_in(&lobby, &dev, "ready").await;
    assert_registered(&iot, &dev, "dev-aws-4").await;

    let (status, body) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "unclaimed", "{body}");

    assert_emptied(&iot).await;
    iot.get_policy()
        .policy_name(POLICY)
        .send()
        .await
        .expect("the tenant's own policy stays");
}

/// Migrating between aws-iot tenants in two regions registers with the new tenant, then
/// removes everything from the old one.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_moves_registration_between_accounts() {
    let moto = Moto::start().await;
    let eu = moto.iot_with_policy("eu-west-1").await;
    let us = moto.iot_with_policy("us-east-1").await;
    let lobby = lobby_on(&moto).await;
    let old = aws_tenant(&lobby, "old", "eu-west-1", json!({})).await;
    aws_tenant(&lobby, "new", "us-east-1", json!({})).await;
    let dev = lobby.device("dev-aws-5");

    claim_with_cert(&lobby, &old, &dev).await;
    device_in(&lobby, &dev, "ready").await;
    assert_registered(&eu, &dev, "dev-aws-5").await;

    let (status, body) = lobby
        .call(
            "POST",
            &format!("/v1/devices/{}/migrate", dev.hex()),
            &lobby.admin,
            Some(json!({"tenant": "new"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tenant"], "new", "{body}");

    let d = eventually(|| async {
        let d = lobby.admin_device(&dev).await;
        assert_ne!(d["state"], "failed", "{d}");
        (d["state"] == "ready" && d["tenant"] == "new").then_some(d)
    })
    .await;
    assert_eq!(d["thing_name"], "dev-aws-5", "{d}");
    assert_registered(&us, &dev, "dev-aws-5").await;
    assert_emptied(&eu).await;
    // The new account's registration outlives the old one's clean-up.
    assert_registered(&us, &dev, "dev-aws-5").await;
    assert_ats_endpoint(
        tenant_json(&lobby, "new").await["endpoint"]
            .as_str()
            .unwrap(),
        "us-east-1",
    );
}

/// Migrating away and straight back: whatever the old tenant's clean-up was doing when the
/// device came back, the device ends `ready` with that tenant and its account holds the whole
/// registration again (ACTIVE), while the other account ends empty.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_back_while_old_registration_is_removed() {
    let moto = Moto::start().await;
    let eu = moto.iot_with_policy("eu-west-1").await;
    let us = moto.iot_with_policy("us-east-1").await;
    let lobby = lobby_on(&moto).await;
    let a = aws_tenant(&lobby, "a", "eu-west-1", json!({})).await;
    aws_tenant(&lobby, "b", "us-east-1", json!({})).await;
    let dev = lobby.device("dev-aws-7");
    claim_with_cert(&lobby, &a, &dev).await;
    device_in(&lobby, &dev, "ready").await;

    let migrate = |to: &'static str| {
        let lobby = &lobby;
        let path = format!("/v1/devices/{}/migrate", dev.hex());
        async move {
            let (status, body) = lobby
                .call("POST", &path, &lobby.admin, Some(json!({ "tenant": to })))
                .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    let ready_with = |t: &'static str| {
        let lobby = &lobby;
        let dev = &dev;
        async move {
            eventually(|| async {
                let d = lobby.admin_device(dev).await;
                assert_ne!(d["state"], "failed", "{d}");
                (d["state"] == "ready" && d["tenant"] == t).then_some(d)
            })
            .await
        }
    };
    migrate("b").await;
    ready_with("b").await;
    // b is ready: the clean-up of a's registration starts now; come back at once.
    migrate("a").await;
    ready_with("a").await;
    moto.quiet().await;

    let d = lobby.admin_device(&dev).await;
    assert_eq!(
        (&d["state"], &d["tenant"]),
        (&json!("ready"), &json!("a")),
        "{d}"
    );
    assert_registered(&eu, &dev, "dev-aws-7").await;
    let h = holding(&us).await;
    assert!(h.certs.is_empty() && h.things.is_empty(), "{h:?}");
}

/// AWS unreachable (nothing listening yet): the registration is retried, stays
/// `registering`, and completes once the service answers.
#[tokio::test(flavor = "multi_thread")]
async fn registration_retries_until_aws_answers() {
    aws_env();
    let port = free_port();
    let lobby = lobby_at(format!("http://127.0.0.1:{port}")).await;
    let token = aws_tenant(&lobby, "acme", "eu-west-1", json!({})).await;
    let dev = lobby.device("dev-aws-8");
    claim_with_cert(&lobby, &token, &dev).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let d = lobby.admin_device(&dev).await;
        assert_eq!(d["state"], "registering", "{d}");
    }

    let moto = Moto::start_on(port).await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    device_in(&lobby, &dev, "ready").await;
    assert_registered(&iot, &dev, "dev-aws-8").await;
}

/// A tenant policy that does not exist: AttachPolicy fails for good, the claim is `failed`
/// with an error that names the problem; unclaiming then removes what was created before.
#[tokio::test(flavor = "multi_thread")]
async fn missing_policy_fails_registration() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let token = aws_tenant(
        &lobby,
        "acme",
        "eu-west-1",
        json!({"policy_name": "no-such-policy"}),
    )
    .await;
    let dev = lobby.device("dev-aws-6");

    claim_with_cert(&lobby, &token, &dev).await;
    let d = device_in(&lobby, &dev, "failed").await;
    eprintln!("missing policy: device view {d}");
    let error = d["error"].as_str().expect("a failed claim has an error");
    assert!(!error.is_empty(), "{d}");
    let h = holding(&iot).await;
    eprintln!("missing policy: left in the account {h:?}");

    // Partial work is not left behind once the device is unclaimed.
    let (status, body) = lobby
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_emptied(&iot).await;

    // The worker documents "`failed` with the AWS error code"; an operator must be able to tell
    // what to fix from the error.
    assert!(
        error.contains("ResourceNotFoundException") || error.contains("no-such-policy"),
        "the error names neither the AWS error code nor the missing policy: {error:?}"
    );
}

/// Measurements (no timing assertions): claim → ready against moto, with the default tenant
/// call rate (10/s) and with a high `rate_limit`, and the AWS requests one registration makes.
#[tokio::test(flavor = "multi_thread")]
async fn measure_registration_against_moto() {
    let moto = Moto::start().await;
    let iot = moto.iot_with_policy("eu-west-1").await;
    let lobby = lobby_on(&moto).await;
    let paced = aws_tenant(&lobby, "paced", "eu-west-1", json!({})).await;
    let fast = aws_tenant(&lobby, "fast", "eu-west-1", json!({"rate_limit": 1000})).await;

    for (tenant, token, names) in [
        ("paced", &paced, ["dev-m-1", "dev-m-2"]),
        ("fast", &fast, ["dev-m-3", "dev-m-4"]),
    ] {
        for name in names {
            let dev = lobby.device(name);
            let before = moto.requests().len();
            let started = Instant::now();
            claim_with_cert(&lobby, token, &dev).await;
            device_in(&lobby, &dev, "ready").await;
            let took = started.elapsed();
            let calls = moto.requests()[before..].to_vec();
            eprintln!(
                "tenant {tenant} device {name}: claim → ready {took:?}, {} AWS requests:",
                calls.len()
            );
            for c in &calls {
                eprintln!("    {c}");
            }
        }
    }
    assert_eq!(holding(&iot).await.certs.len(), 4);
}
