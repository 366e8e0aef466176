//! Harness smoke test: a claimed v5 device gets CONNACK 0x9D with the Server Reference.
mod common;

use common::*;
use lobby::mqtt::codec::Protocol;

#[tokio::test]
async fn claimed_v5_device_is_sent_on_at_connack() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("dev-a");
    assert_eq!(lobby.claim(&token, &dev).await.0, 201);
    let (_c, ack) = connack(&lobby, &dev, Protocol::V5, "anything").await;
    assert_sent_on(&ack, "iot.acme.example:8883");
}
