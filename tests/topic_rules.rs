//! Topic rules and protocol limits of SPEC §4 on the device edge: a device touches only its own
//! prefix (SUBACK 0x80 / 0x87, forbidden PUBLISH closes v3.1.1, PUBACK/DISCONNECT 0x87 on v5),
//! QoS 2, oversized packets, garbage, a second CONNECT, the v5 CONNACK properties, UNSUBSCRIBE.
mod common;

use std::time::Duration;

use common::*;
use lobby::mqtt::codec::{self, Packet, Protocol, QoS};
use tokio::io::AsyncWriteExt;

// ---- local helpers -------------------------------------------------------------------------

fn unsubscribe(pkid: u16, filters: Vec<String>) -> Packet {
    Packet::Unsubscribe(codec::Unsubscribe {
        pkid,
        filters,
        properties: Default::default(),
    })
}

fn forbidden_filters(other: &Device) -> Vec<String> {
    vec![
        "#".into(),
        "+/#".into(),
        format!("$lobby/devices/{}/#", other.hex()),
        format!("$lobby/devices/{}/status", other.hex()),
        "$lobby/devices/+/status".into(),
        "$lobby/#".into(),
    ]
}

// ---- SUBSCRIBE -----------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_outside_prefix_v3_gets_0x80() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("sub-v3");
    let other = lobby.device("someone-else");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    for (i, f) in forbidden_filters(&other).iter().enumerate() {
        assert_eq!(c.subscribe(i as u16 + 1, f).await, vec![0x80], "{f}");
    }
    // Still connected, and its own prefix works: QoS 1 granted 1, QoS 0 granted 0.
    assert_eq!(c.subscribe(50, &dev.topic("redirect")).await, vec![1]);
    assert_eq!(
        c.subscribe_qos(51, &dev.topic("+"), QoS::AtMostOnce).await,
        vec![0]
    );
    match c.expect().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic, dev.topic("status"));
            assert_eq!(p.qos, QoS::AtMostOnce, "delivered at the granted QoS 0");
        }
        other => panic!("expected the status publish, got {other:?}"),
    }
    c.ping_ok().await;
}

#[tokio::test]
async fn subscribe_outside_prefix_v5_gets_0x87() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("sub-v5");
    let other = lobby.device("someone-else");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    for (i, f) in forbidden_filters(&other).iter().enumerate() {
        assert_eq!(c.subscribe(i as u16 + 1, f).await, vec![0x87], "{f}");
    }
    assert_eq!(c.subscribe(50, &dev.topic("redirect")).await, vec![1]);
    assert_eq!(
        c.subscribe_qos(51, &dev.topic("redirect"), QoS::AtMostOnce)
            .await,
        vec![0]
    );
    c.ping_ok().await;
}

#[tokio::test]
async fn subscribe_mixed_filters_get_one_code_each() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("sub-mixed");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.send(Packet::Subscribe(codec::Subscribe {
        pkid: 9,
        filters: vec![
            codec::SubscribeFilter {
                filter: "#".into(),
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
            codec::SubscribeFilter {
                filter: dev.topic("redirect"),
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
            codec::SubscribeFilter {
                filter: "a/#/b".into(),
                qos: QoS::AtMostOnce,
                ..Default::default()
            },
        ],
        properties: Default::default(),
    }))
    .await;
    match c.expect().await {
        Packet::SubAck(a) => assert_eq!(a.codes, vec![0x87, 0x01, 0x8F]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_filter_v5_gets_0x8f() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("bad-filter");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    assert_eq!(c.subscribe(1, "a/#/b").await, vec![0x8F]);
    let own_bad = format!("{}st#", dev.topic(""));
    assert_eq!(c.subscribe(2, &own_bad).await, vec![0x8F]);
    c.ping_ok().await;

    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, "a/#/b").await, vec![0x80]);
    c.ping_ok().await;
}

#[tokio::test]
async fn unsubscribe_codes() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("unsub");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    assert_eq!(c.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    c.send(unsubscribe(
        2,
        vec![dev.topic("redirect"), dev.topic("status")],
    ))
    .await;
    match c.expect().await {
        Packet::UnsubAck(a) => {
            assert_eq!(a.pkid, 2);
            assert_eq!(a.codes, vec![0x00, 0x11]);
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }

    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("redirect")).await, vec![1]);
    c.send(unsubscribe(3, vec![dev.topic("redirect")])).await;
    match c.expect().await {
        Packet::UnsubAck(a) => assert_eq!(a.pkid, 3),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.ping_ok().await;
}

/// After UNSUBSCRIBE the device is no longer sent what the filter matched.
#[tokio::test]
async fn unsubscribed_status_is_not_sent() {
    let lobby = TestLobby::start_with(|c| c.limits.redirect_grace = Duration::from_secs(60)).await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("unsub-status");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    assert_eq!(c.subscribe(1, &dev.topic("status")).await, vec![1]);
    match c.expect().await {
        Packet::Publish(p) => assert_eq!(p.topic, dev.topic("status")),
        other => panic!("expected status, got {other:?}"),
    }
    c.send(unsubscribe(2, vec![dev.topic("status")])).await;
    assert!(matches!(c.expect().await, Packet::UnsubAck(_)));
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    // The claim is ready at once; a ping answered with nothing before it means no status came.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(Packet::PingReq).await;
    match c.expect().await {
        Packet::PingResp => {}
        other => panic!("sent after UNSUBSCRIBE: {other:?}"),
    }
}

// ---- PUBLISH -------------------------------------------------------------------------------

#[tokio::test]
async fn forbidden_publish_v3_closes() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("pub-v3");
    let other = lobby.device("victim");
    for topic in ["some/topic".to_owned(), other.topic("ack")] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let mut c = connected(&lobby, &dev, Protocol::V311).await;
            c.send(publish(&topic, qos, 1, b"{}")).await;
            let got = c.expect_closed().await;
            assert!(got.is_empty(), "{topic} {qos:?}: {got:?}");
        }
    }
    // The lobby keeps serving the device.
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    c.ping_ok().await;
}

#[tokio::test]
async fn forbidden_publish_v5_qos1_gets_puback_0x87_and_stays() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("pub-v5-q1");
    let other = lobby.device("victim");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.send(publish(&other.topic("ack"), QoS::AtLeastOnce, 11, b"{}"))
        .await;
    match c.expect().await {
        Packet::PubAck(a) => {
            assert_eq!(a.pkid, 11);
            assert_eq!(a.reason, 0x87);
        }
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    c.ping_ok().await;
    // Its own topic is accepted: PUBACK 0.
    c.send(publish(&dev.topic("ack"), QoS::AtLeastOnce, 12, b"{}"))
        .await;
    match c.expect().await {
        Packet::PubAck(a) => {
            assert_eq!(a.pkid, 12);
            assert_eq!(a.reason, 0x00);
        }
        other => panic!("expected PUBACK 0, got {other:?}"),
    }
}

#[tokio::test]
async fn forbidden_publish_v5_qos0_gets_disconnect_0x87() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("pub-v5-q0");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.send(publish("some/topic", QoS::AtMostOnce, 0, b"{}"))
        .await;
    c.expect_disconnect(0x87).await;
}

#[tokio::test]
async fn own_publish_v3_is_acked() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("pub-own-v3");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    c.send(publish(
        &dev.topic("ack"),
        QoS::AtLeastOnce,
        5,
        b"{\"redirect_id\":\"x\"}",
    ))
    .await;
    match c.expect().await {
        Packet::PubAck(a) => assert_eq!(a.pkid, 5),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    c.ping_ok().await;
}

#[tokio::test]
async fn qos2_publish_v5_gets_0x9b() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("qos2");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.send(publish(&dev.topic("ack"), QoS::ExactlyOnce, 3, b"{}"))
        .await;
    c.expect_disconnect(0x9B).await;
}

#[tokio::test]
async fn qos2_publish_v3_closes() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("qos2-v3");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    c.send(publish(&dev.topic("ack"), QoS::ExactlyOnce, 3, b"{}"))
        .await;
    assert!(c.expect_closed().await.is_empty());
}

// ---- limits and malformed input ------------------------------------------------------------

#[tokio::test]
async fn oversized_packet_v5_gets_0x95() {
    let lobby = TestLobby::start_with(|c| c.limits.max_packet_size = 1024).await;
    let dev = lobby.device("big-v5");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.send(publish(
        &dev.topic("ack"),
        QoS::AtLeastOnce,
        1,
        &[b'x'; 4096],
    ))
    .await;
    c.expect_disconnect(0x95).await;
}

#[tokio::test]
async fn oversized_packet_v3_closes() {
    let lobby = TestLobby::start_with(|c| c.limits.max_packet_size = 1024).await;
    let dev = lobby.device("big-v3");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    c.send(publish(
        &dev.topic("ack"),
        QoS::AtLeastOnce,
        1,
        &[b'x'; 4096],
    ))
    .await;
    assert!(c.expect_closed().await.is_empty());
}

#[tokio::test]
async fn oversized_connect_closes() {
    let lobby = TestLobby::start_with(|c| c.limits.max_packet_size = 1024).await;
    let dev = lobby.device("big-connect");
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V5).await;
    c.send(Packet::Connect(codec::Connect {
        protocol: Protocol::V5,
        client_id: "x".repeat(4000),
        keep_alive: 30,
        clean_start: true,
        ..Default::default()
    }))
    .await;
    let got = c.expect_closed().await;
    assert!(
        got.iter()
            .all(|p| !matches!(p, Packet::ConnAck(a) if a.code == 0)),
        "{got:?}"
    );
}

#[tokio::test]
async fn garbage_after_tls_closes_and_lobby_keeps_serving() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("garbage");
    // Garbage instead of CONNECT.
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
    c.stream.write_all(&[0xFF; 32]).await.unwrap();
    c.stream.flush().await.unwrap();
    let got = c.expect_closed().await;
    assert!(
        got.iter().all(|p| !matches!(p, Packet::ConnAck(_))),
        "{got:?}"
    );
    // Garbage after CONNECT.
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut c = connected(&lobby, &dev, protocol).await;
        c.stream.write_all(&[0xFF; 32]).await.unwrap();
        c.stream.flush().await.unwrap();
        let got = c.expect_closed().await;
        assert!(
            got.iter().all(|p| matches!(p, Packet::Disconnect(_))),
            "{got:?}"
        );
    }
    // A fresh device still gets in.
    let fresh = lobby.device("after-garbage");
    let mut c = connected(&lobby, &fresh, Protocol::V5).await;
    c.ping_ok().await;
}

#[tokio::test]
async fn plain_mqtt_without_tls_is_refused_and_lobby_keeps_serving() {
    let lobby = TestLobby::start().await;
    let mut tcp = tokio::net::TcpStream::connect(lobby.mqtt_addr())
        .await
        .unwrap();
    let mut out = bytes::BytesMut::new();
    codec::encode(
        &Packet::Connect(codec::Connect {
            protocol: Protocol::V311,
            client_id: "plain".into(),
            keep_alive: 30,
            clean_start: true,
            ..Default::default()
        }),
        Protocol::V311,
        &mut out,
    )
    .unwrap();
    tcp.write_all(&out).await.unwrap();
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
        // Either closed, or a TLS alert; never a CONNACK (0x20).
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) => assert_ne!(buf[0], 0x20, "plain MQTT got a CONNACK"),
        Err(_) => panic!("plain TCP connection stayed open"),
    }
    let dev = lobby.device("after-plain");
    let mut c = connected(&lobby, &dev, Protocol::V311).await;
    c.ping_ok().await;
}

#[tokio::test]
async fn second_connect_closes() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("connect-twice");
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut c = connected(&lobby, &dev, protocol).await;
        c.send_connect("again").await;
        let got = c.expect_closed().await;
        match (protocol, got.as_slice()) {
            (Protocol::V311, []) => {}
            (Protocol::V5, []) => {}
            (Protocol::V5, [Packet::Disconnect(d)]) => assert_eq!(d.reason, 0x82, "{d:?}"),
            (_, other) => panic!("{protocol:?}: unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn v5_connack_properties() {
    let lobby = TestLobby::start_with(|c| c.limits.max_packet_size = 4096).await;
    let dev = lobby.device("props");
    let (_c, ack) = connack(&lobby, &dev, Protocol::V5, "props").await;
    assert_eq!(ack.code, 0);
    assert!(!ack.session_present);
    assert_eq!(ack.properties.maximum_qos, Some(1));
    assert_eq!(ack.properties.retain_available, Some(false));
    assert_eq!(ack.properties.maximum_packet_size, Some(4096));
    assert_eq!(ack.properties.server_reference, None);
    // An empty client id is given one.
    let (_c, ack) = connack(&lobby, &dev, Protocol::V5, "").await;
    assert_eq!(ack.code, 0);
    assert!(ack
        .properties
        .assigned_client_identifier
        .is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn v3_connack_is_plain() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("props-v3");
    let (_c, ack) = connack(&lobby, &dev, Protocol::V311, "").await;
    assert_eq!(ack.code, 0);
    assert!(!ack.session_present);
}

#[tokio::test]
async fn subscribe_qos2_is_granted_qos1() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("sub-qos2");
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut c = connected(&lobby, &dev, protocol).await;
        assert_eq!(
            c.subscribe_qos(1, &dev.topic("redirect"), QoS::ExactlyOnce)
                .await,
            vec![1],
            "{protocol:?}: CONNACK says maximum QoS 1"
        );
        c.ping_ok().await;
    }
}

/// CONNACK announces no topic aliases (Topic Alias Maximum 0): using one is 0x94.
#[tokio::test]
async fn topic_alias_v5_gets_0x94() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("alias");
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    let mut p = codec::Publish {
        qos: QoS::AtMostOnce,
        topic: dev.topic("ack"),
        payload: bytes::Bytes::from_static(b"{}"),
        ..Default::default()
    };
    p.properties.topic_alias = Some(1);
    c.send(Packet::Publish(p)).await;
    c.expect_disconnect(0x94).await;
}
