//! Device-side helpers of the bridge tests: publish, read past the probes that warm up a
//! subscription, expect PUBACKs and messages, over the raw client of `tests/common`.
#![allow(dead_code)]

use std::time::Duration;

use lobby::mqtt::codec::{self, Packet, QoS};
use tokio::time::{timeout, timeout_at, Instant};

use super::{lossy, Observer};
use crate::common::{self, RawClient, WAIT};

/// Payload of the messages that warm up a subscription; readers skip them.
pub const PROBE: &[u8] = b"probe";

/// The device publishes `payload` on `topic` (`pkid` is ignored at QoS 0).
pub async fn send_publish(c: &mut RawClient, pkid: u16, topic: &str, qos: QoS, payload: &str) {
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    c.send(common::publish(topic, qos, pkid, payload.as_bytes()))
        .await;
}

/// Acknowledges an incoming QoS 1 publish.
pub async fn ack(c: &mut RawClient, p: &codec::Publish) {
    if p.qos == QoS::AtLeastOnce {
        c.send(Packet::PubAck(codec::PubAck {
            pkid: p.pkid,
            ..Default::default()
        }))
        .await;
    }
}

/// The next packet within `within` that is not a probe; incoming QoS 1 publishes are
/// acknowledged. Panics when the connection closes or nothing comes in time.
pub async fn next_within(c: &mut RawClient, within: Duration) -> Packet {
    let deadline = Instant::now() + within;
    loop {
        let asked = Instant::now();
        match timeout_at(deadline, c.recv()).await {
            Err(_) => panic!("no packet within {within:?}"),
            Ok(None) if asked.elapsed() < WAIT => panic!("the lobby closed the connection"),
            // `recv` gave up after `WAIT` of silence: keep waiting until `deadline`.
            Ok(None) => {}
            Ok(Some(Packet::Publish(p))) => {
                ack(c, &p).await;
                if p.payload != PROBE {
                    return Packet::Publish(p);
                }
            }
            Ok(Some(p)) => return p,
        }
    }
}

pub async fn next(c: &mut RawClient) -> Packet {
    next_within(c, WAIT).await
}

/// The next non-probe packet, which must be a PUBLISH.
pub async fn next_publish(c: &mut RawClient) -> codec::Publish {
    match next(c).await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// The next non-probe PUBLISH must be `payload` on `topic` at `qos`.
pub async fn expect_message(c: &mut RawClient, topic: &str, payload: &str, qos: QoS) {
    let p = next_publish(c).await;
    assert_eq!(
        (p.topic.as_str(), lossy(&p.payload).as_str(), p.qos),
        (topic, payload, qos),
        "{p:?}"
    );
}

/// The next non-probe packet must be the PUBACK of `pkid` with `reason`.
pub async fn expect_puback_within(c: &mut RawClient, pkid: u16, reason: u8, within: Duration) {
    match next_within(c, within).await {
        Packet::PubAck(a) => assert_eq!((a.pkid, a.reason), (pkid, reason), "{a:?}"),
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

pub async fn expect_puback(c: &mut RawClient, pkid: u16, reason: u8) {
    expect_puback_within(c, pkid, reason, WAIT).await
}

/// Nothing at all arrives for `d`, and the connection stays open.
pub async fn silent_for(c: &mut RawClient, d: Duration) {
    match timeout(d, c.recv()).await {
        Err(_) => {}
        Ok(Some(p)) => panic!("expected nothing for {d:?}, got {p:?}"),
        Ok(None) => panic!("the lobby closed the connection"),
    }
}

/// UNSUBSCRIBE `filter`; the next non-probe packet must be its UNSUBACK.
pub async fn unsubscribe(c: &mut RawClient, pkid: u16, filter: &str) {
    c.send(Packet::Unsubscribe(codec::Unsubscribe {
        pkid,
        filters: vec![filter.into()],
        properties: Default::default(),
    }))
    .await;
    match next(c).await {
        Packet::UnsubAck(a) => assert_eq!(a.pkid, pkid, "{a:?}"),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
}

/// Publishes probes on `topic` upstream until one reaches the device (subscribed to a filter
/// matching it): from then on, its upstream subscription is in place. Any other packet fails.
pub async fn warm_up(obs: &Observer, c: &mut RawClient, topic: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        obs.publish(topic, rumqttc::QoS::AtLeastOnce, PROBE).await;
        match timeout(Duration::from_millis(300), c.recv()).await {
            Err(_) => assert!(
                Instant::now() < deadline,
                "no message on {topic} reached the device in {WAIT:?}"
            ),
            Ok(Some(Packet::Publish(p))) if p.payload == PROBE => {
                ack(c, &p).await;
                if p.topic == topic {
                    return;
                }
            }
            Ok(Some(other)) => panic!("while waiting for a probe on {topic}: {other:?}"),
            Ok(None) => panic!("the lobby closed the connection"),
        }
    }
}
