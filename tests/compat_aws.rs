//! `compat.aws_device_lobby`: firmware built for the AWS "device lobby" sample subscribes to
//! `lobby/<CN>`, publishes heartbeats to `$aws/rules/lobby`, and takes `{"iotep", "config"}`.
mod common;

use common::*;
use lobby::mqtt::codec::{Packet, Protocol, QoS};
use serde_json::Value;

async fn heartbeat(c: &mut RawClient, pkid: u16) -> Packet {
    let heartbeat = b"{\"heartbeat\":1}";
    c.send(publish(
        "$aws/rules/lobby",
        QoS::AtLeastOnce,
        pkid,
        heartbeat,
    ))
    .await;
    c.expect().await
}

#[tokio::test]
async fn sample_firmware_gets_iotep_when_claimed() {
    let lobby = TestLobby::start_with(|c| c.compat.aws_device_lobby = true).await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("sample-0001");
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
    c.send_connect("sample-0001").await;
    let Packet::ConnAck(ack) = c.expect().await else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, 0);
    assert_eq!(c.subscribe(1, "lobby/sample-0001").await, vec![1]);
    let Packet::PubAck(ack) = heartbeat(&mut c, 2).await else {
        panic!("expected PUBACK")
    };
    assert_eq!((ack.pkid, ack.reason), (2, 0));

    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let Packet::Publish(p) = c.expect().await else {
        panic!("expected the iotep publish")
    };
    assert_eq!(p.topic, "lobby/sample-0001");
    let body: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(body["iotep"], "iot.acme.example");
    assert_eq!(body["config"]["port"], 8883);
    assert_eq!(body["config"]["thing_name"], "sample-0001");
}

#[tokio::test]
async fn compat_topics_are_refused_when_off() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("sample-0002");
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
    c.send_connect("sample-0002").await;
    let _ = c.expect().await;
    assert_eq!(c.subscribe(1, "lobby/sample-0002").await, vec![0x80]);
    // A forbidden publish closes a v3.1.1 connection.
    c.send(publish("$aws/rules/lobby", QoS::AtLeastOnce, 2, b"{}"))
        .await;
    assert!(
        c.recv().await.is_none(),
        "the lobby kept the connection open"
    );
}
