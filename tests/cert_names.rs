//! Certificate names are attacker input (issue 12): any trusted factory CA can sign any
//! subject, so a device's CN may be `+`, `#`, `a/b`, `$SYS`, hold NUL or right-to-left
//! characters, be 10 KB long, or equal another device's CN. Each such device is named by its
//! device id (README, "How thing names are derived from certificate names"), reaches only its
//! own topics, and can be claimed on SQLite and PostgreSQL alike (201, never a 500); two devices
//! with one CN in one tenant get two names. Bridge-mode and AWS checks are in `tests/bridge.rs`
//! and `tests/provision_fake.rs` (beside their brokers and fake account).
mod common;
#[path = "common/pg.rs"]
mod pg;

use common::*;
use lobby::mqtt::codec::Protocol;
use serde_json::{json, Value};

/// CNs no thing name may be made of, with a label for messages.
fn hostile_cns() -> Vec<(&'static str, String)> {
    vec![
        ("nul", "dev\0ice".into()),
        ("plus", "+".into()),
        ("hash", "#".into()),
        ("slash", "a/b".into()),
        ("dollar", "$SYS".into()),
        ("10 KB", "a".repeat(10 * 1024)),
        ("right-to-left", "\u{202e}lave".into()),
        ("non-ASCII", "gerät-ü".into()),
    ]
}

async fn claim_body(lobby: &TestLobby, token: &str, body: Value) -> (u16, Value) {
    lobby.call("POST", "/v1/claims", token, Some(body)).await
}

/// The device's `thing_name` in its device JSON (as `token` sees it).
async fn thing_name(lobby: &TestLobby, token: &str, dev: &Device) -> Value {
    let (st, d) = lobby.device_json(token, dev).await;
    assert_eq!(st, 200, "{d}");
    d["thing_name"].clone()
}

/// `dev` connected over v3.1.1 with CONNACK 0. The client id is plain: a CN may hold NUL, which
/// no MQTT string may.
async fn waiting(lobby: &TestLobby, dev: &Device) -> RawClient {
    let (c, ack) = connack(lobby, dev, Protocol::V311, "hostile").await;
    assert_eq!(ack.code, 0, "{ack:?}");
    c
}

/// A device whose CN is hostile subscribes only under its own prefix: wildcards, other
/// devices' prefixes and a compat topic built from its CN are refused; the compat topic is
/// `lobby/<device_id>`.
#[tokio::test]
async fn hostile_cns_reach_only_their_own_topics() {
    let lobby = TestLobby::start_with(|c| c.compat.aws_device_lobby = true).await;
    let other = lobby.device("bystander");
    for (what, cn) in hostile_cns() {
        let dev = lobby.device(&cn);
        let mut c = waiting(&lobby, &dev).await;
        let own_compat = format!("lobby/{}", dev.hex());
        let mut filters = vec![
            "#".to_owned(),
            "+/#".to_owned(),
            "lobby/+".to_owned(),
            "lobby/#".to_owned(),
            other.topic("#"),
            "$lobby/devices/+/status".to_owned(),
        ];
        // A filter holding NUL is a malformed packet (MQTT 1.5.4): the lobby closes, rightly.
        if !cn.contains('\0') {
            filters.push(format!("lobby/{cn}"));
        }
        for (i, f) in filters.iter().enumerate() {
            let got = c.subscribe(i as u16 + 1, f).await;
            assert_eq!(got, vec![0x80], "{what}: {f:?} must be refused");
        }
        assert_eq!(c.subscribe(20, &own_compat).await, vec![1], "{what}");
        assert_eq!(c.subscribe(21, &dev.topic("#")).await, vec![1], "{what}");
        assert_eq!(
            c.expect_publish().await.topic,
            dev.topic("status"),
            "{what}"
        );
    }
}

/// Claims of hostile-CN devices, with `cert_pem` and by having connected first: 201, the
/// device id as thing name, and the same after a restart (read back from the store).
async fn hostile_cns_are_claimed_by_device_id(mut lobby: TestLobby) {
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let mut devices = Vec::new();
    for (i, (what, cn)) in hostile_cns().into_iter().enumerate() {
        let dev = lobby.device(&cn);
        let got = if i % 2 == 0 {
            claim_body(
                &lobby,
                &token,
                json!({"code": dev.code, "cert_pem": dev.cert_pem}),
            )
            .await
        } else {
            // Seen first: the claim takes the name from the connection.
            let mut c = waiting(&lobby, &dev).await;
            c.ping_ok().await;
            let got = lobby.claim(&token, &dev).await;
            drop(c);
            got
        };
        assert_eq!(got.0, 201, "{what}: {}", got.1);
        assert_eq!(thing_name(&lobby, &token, &dev).await, dev.hex(), "{what}");
        devices.push((what, dev));
    }
    // Claimed before it ever connected, without its certificate: named at its first connect.
    let late = lobby.device("\0late");
    assert_eq!(lobby.claim(&token, &late).await.0, 201);
    let (_c, ack) = connack(&lobby, &late, Protocol::V5, "late").await;
    assert_eq!(ack.code, 0x9D, "{ack:?}");
    let props = &ack.properties.user_properties;
    assert!(
        props.contains(&("thing_name".to_owned(), late.hex())),
        "{props:?}"
    );
    devices.push(("late", late));
    lobby.restart().await;
    for (what, dev) in &devices {
        assert_eq!(thing_name(&lobby, &token, dev).await, dev.hex(), "{what}");
    }
}

#[tokio::test]
async fn hostile_cns_are_claimed_by_device_id_on_sqlite() {
    hostile_cns_are_claimed_by_device_id(TestLobby::start().await).await;
}

#[tokio::test]
async fn hostile_cns_are_claimed_by_device_id_on_postgres() {
    let db = pg::TestDb::create().await;
    let url = db.url.clone();
    let lobby = TestLobby::start_with(|c| c.store.url = url).await;
    hostile_cns_are_claimed_by_device_id(lobby).await;
}

/// Two devices with one CN in one tenant: the first claimed keeps the name, the second is named
/// by its device id (also when it is claimed before it connects); another tenant may use the
/// name again. The v5 redirect says each device's own name.
async fn one_cn_two_devices(lobby: TestLobby) {
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let beta = lobby.tenant("beta", "iot.beta.example").await;
    let (first, second, third) = (
        lobby.device("twin"),
        lobby.device("twin"),
        lobby.device("twin"),
    );
    assert_ne!(first.id, second.id);
    let with_cert = |d: &Device| json!({"code": d.code, "cert_pem": d.cert_pem});
    assert_eq!(claim_body(&lobby, &acme, with_cert(&first)).await.0, 201);
    assert_eq!(claim_body(&lobby, &acme, with_cert(&second)).await.0, 201);
    assert_eq!(lobby.claim(&acme, &third).await.0, 201); // named when it connects
    assert_eq!(thing_name(&lobby, &acme, &first).await, "twin");
    assert_eq!(thing_name(&lobby, &acme, &second).await, second.hex());
    for (dev, name) in [
        (&first, "twin".to_owned()),
        (&second, second.hex()),
        (&third, third.hex()),
    ] {
        let (_c, ack) = connack(&lobby, dev, Protocol::V5, "twin").await;
        assert_eq!(ack.code, 0x9D, "{ack:?}");
        let props = &ack.properties.user_properties;
        assert!(
            props.contains(&("thing_name".to_owned(), name.clone())),
            "{name}: {props:?}"
        );
    }
    let fourth = lobby.device("twin");
    assert_eq!(claim_body(&lobby, &beta, with_cert(&fourth)).await.0, 201);
    assert_eq!(thing_name(&lobby, &beta, &fourth).await, "twin");
    // A CN spelling another device's id does not take that device's fallback name.
    let impostor = lobby.device(&second.hex());
    assert_eq!(claim_body(&lobby, &acme, with_cert(&impostor)).await.0, 201);
    assert_eq!(thing_name(&lobby, &acme, &impostor).await, impostor.hex());
}

#[tokio::test]
async fn one_cn_two_devices_on_sqlite() {
    one_cn_two_devices(TestLobby::start().await).await;
}

#[tokio::test]
async fn one_cn_two_devices_on_postgres() {
    let db = pg::TestDb::create().await;
    let url = db.url.clone();
    one_cn_two_devices(TestLobby::start_with(|c| c.store.url = url).await).await;
}

/// The map loaded at start knows a claim's name only from the store, not whether it is the
/// device's own (issue 16: it holds no string for either): at its first connect the device's
/// certificate settles it, and the v5 redirect still says the claim's name, its CN's or its id.
#[tokio::test]
async fn names_loaded_at_start_reach_the_redirect() {
    let mut lobby = TestLobby::start().await;
    let acme = lobby.tenant("acme", "iot.acme.example").await;
    let (first, second) = (lobby.device("sensor-7"), lobby.device("sensor-7"));
    for d in [&first, &second] {
        let body = json!({"code": d.code, "cert_pem": d.cert_pem});
        assert_eq!(claim_body(&lobby, &acme, body).await.0, 201);
    }
    lobby.restart().await;
    for (dev, name) in [(&first, "sensor-7".to_owned()), (&second, second.hex())] {
        for round in ["first connect", "again"] {
            let (_c, ack) = connack(&lobby, dev, Protocol::V5, "sensor-7").await;
            assert_eq!(ack.code, 0x9D, "{round}: {ack:?}");
            let props = &ack.properties.user_properties;
            assert!(
                props.contains(&("thing_name".to_owned(), name.clone())),
                "{round}: {name}: {props:?}"
            );
        }
        assert_eq!(thing_name(&lobby, &acme, dev).await, name.as_str());
    }
}

/// Tenant templates cannot smuggle in wildcards or names that name every device alike.
#[tokio::test]
async fn tenant_templates_are_checked() {
    let lobby = TestLobby::start().await;
    let aws = |template: &str| {
        json!({"id": "aws", "name": "Aws", "backend": {"kind": "aws-iot", "region": "eu-west-1",
            "role_arn": "arn:aws:iam::111122223333:role/lobby", "external_id": "x1",
            "policy_name": "p", "thing_name": template}})
    };
    for bad in ["fixed", "a/{cn}", "{cn}+", "{nope}"] {
        let got = lobby
            .call("POST", "/v1/tenants", &lobby.admin, Some(aws(bad)))
            .await;
        assert_error(&got, 400, "invalid_request");
    }
    let got = lobby
        .call("POST", "/v1/tenants", &lobby.admin, Some(aws("acme-{cn}")))
        .await;
    assert_eq!(got.0, 201, "{}", got.1);
}
