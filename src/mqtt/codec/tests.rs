//! Codec tests: round trips, framing, malformed input and fuzzing.
//! Interoperability with rumqttc lives in `tests/interop.rs`.

use bytes::{Bytes, BytesMut};

use super::*;

mod interop;

const MAX: usize = 1 << 20;

fn user() -> Vec<(String, String)> {
    vec![("k".into(), "v".into()), ("k".into(), "ü2".into())]
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn b(v: &[u8]) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(v))
}

/// A CONNECT with will, login and (for 5.0) every property.
fn connect(protocol: Protocol) -> Connect {
    let v5 = protocol == Protocol::V5;
    let will = Will {
        topic: "will/t".into(),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: if v5 {
            WillProperties {
                delay_interval: Some(5),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: s("text/plain"),
                response_topic: s("resp"),
                correlation_data: b(b"\x00\x01"),
                user_properties: user(),
            }
        } else {
            Default::default()
        },
    };
    let properties = if v5 {
        ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(10),
            maximum_packet_size: Some(4096),
            topic_alias_maximum: Some(5),
            request_response_information: Some(1),
            request_problem_information: Some(0),
            user_properties: user(),
            authentication_method: s("token"),
            authentication_data: b(b"secret"),
        }
    } else {
        Default::default()
    };
    Connect {
        protocol,
        client_id: "device-1".into(),
        keep_alive: 30,
        clean_start: true,
        username: s("user"),
        password: b(b"pw\xff"),
        will: Some(will),
        properties,
    }
}

fn connack_v5(code: u8) -> ConnAck {
    ConnAck {
        session_present: code == 0,
        code,
        properties: ConnAckProperties {
            session_expiry_interval: Some(7),
            receive_maximum: Some(100),
            maximum_qos: Some(1),
            retain_available: Some(true),
            maximum_packet_size: Some(65536),
            assigned_client_identifier: s("auto-1"),
            topic_alias_maximum: Some(0),
            reason_string: s("go away"),
            user_properties: user(),
            wildcard_subscription_available: Some(true),
            subscription_identifiers_available: Some(false),
            shared_subscription_available: Some(false),
            server_keep_alive: Some(60),
            response_information: s("ri"),
            server_reference: s("other.example:1883"),
            authentication_method: s("token"),
            authentication_data: b(b"x"),
        },
    }
}

fn publish(protocol: Protocol, qos: QoS) -> Publish {
    let properties = if protocol == Protocol::V5 {
        PublishProperties {
            payload_format_indicator: Some(0),
            message_expiry_interval: Some(9),
            topic_alias: Some(3),
            response_topic: s("r/t"),
            correlation_data: b(b"c"),
            user_properties: user(),
            subscription_identifiers: vec![1, 268_435_455, 128],
            content_type: s("json"),
        }
    } else {
        Default::default()
    };
    Publish {
        dup: qos != QoS::AtMostOnce,
        qos,
        retain: true,
        topic: "a/b".into(),
        pkid: if qos == QoS::AtMostOnce { 0 } else { 42 },
        payload: Bytes::from(vec![7u8; 300]),
        properties,
    }
}

fn ack_props(v5: bool) -> AckProperties {
    if v5 {
        AckProperties {
            reason_string: s("why"),
            user_properties: user(),
        }
    } else {
        Default::default()
    }
}

/// A SUBSCRIBE with two filters (options and properties only for 5.0).
fn subscribe(v5: bool) -> Subscribe {
    Subscribe {
        pkid: 9,
        filters: vec![
            SubscribeFilter {
                filter: "a/+".into(),
                qos: QoS::AtLeastOnce,
                no_local: v5,
                retain_as_published: v5,
                retain_handling: if v5 { 2 } else { 0 },
            },
            SubscribeFilter {
                filter: "#".into(),
                ..Default::default()
            },
        ],
        properties: if v5 {
            SubscribeProperties {
                subscription_identifier: Some(77),
                user_properties: user(),
            }
        } else {
            Default::default()
        },
    }
}

/// Every packet type, with all fields the version supports.
fn samples(protocol: Protocol) -> Vec<Packet> {
    let v5 = protocol == Protocol::V5;
    let mut out = vec![
        Packet::Connect(connect(protocol)),
        Packet::Connect(Connect {
            protocol,
            ..Default::default()
        }),
        Packet::ConnAck(ConnAck {
            session_present: true,
            ..Default::default()
        }),
        Packet::Publish(publish(protocol, QoS::AtMostOnce)),
        Packet::Publish(publish(protocol, QoS::AtLeastOnce)),
        Packet::Publish(publish(protocol, QoS::ExactlyOnce)),
        Packet::Publish(Publish {
            topic: "t".into(),
            ..Default::default()
        }),
        Packet::PubAck(PubAck {
            pkid: 1,
            ..Default::default()
        }),
        Packet::Subscribe(subscribe(v5)),
        Packet::SubAck(SubAck {
            pkid: 9,
            codes: vec![1, 0, 0x80],
            properties: ack_props(v5),
        }),
        Packet::Unsubscribe(Unsubscribe {
            pkid: 10,
            filters: vec!["a/+".into(), "b".into()],
            properties: UnsubscribeProperties {
                user_properties: if v5 { user() } else { vec![] },
            },
        }),
        Packet::UnsubAck(UnsubAck {
            pkid: 10,
            codes: if v5 { vec![0, 0x11] } else { vec![] },
            properties: ack_props(v5),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
    ];
    if v5 {
        out.extend(v5_only_samples());
    } else {
        out.push(Packet::ConnAck(ConnAck {
            code: 5,
            ..Default::default()
        }));
    }
    out
}

/// 5.0 packets exercising reason codes and the short ack forms.
fn v5_only_samples() -> Vec<Packet> {
    vec![
        Packet::ConnAck(connack_v5(0)),
        Packet::ConnAck(connack_v5(0x9D)),
        Packet::PubAck(PubAck {
            pkid: 2,
            reason: 0x10,
            properties: Default::default(),
        }),
        Packet::PubAck(PubAck {
            pkid: 3,
            reason: 0x80,
            properties: ack_props(true),
        }),
        Packet::PubAck(PubAck {
            pkid: 4,
            reason: 0,
            properties: ack_props(true),
        }),
        Packet::Disconnect(Disconnect {
            reason: 0x8E,
            properties: Default::default(),
        }),
        Packet::Disconnect(Disconnect {
            reason: 0x9D,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: s("moved"),
                user_properties: user(),
                server_reference: s("other.example:1883"),
            },
        }),
    ]
}

fn enc(p: &Packet, protocol: Protocol) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(p, protocol, &mut buf).expect("encodable");
    buf
}

/// The `protocol` argument decode needs for `p`: `None` for CONNECT.
fn state_for(p: &Packet, protocol: Protocol) -> Option<Protocol> {
    match p {
        Packet::Connect(_) => None,
        _ => Some(protocol),
    }
}

fn dec(bytes: &[u8], state: Option<Protocol>) -> Result<Option<Packet>, CodecError> {
    let mut buf = BytesMut::from(bytes);
    let before = buf.clone();
    let out = decode(&mut buf, state, MAX);
    match &out {
        Ok(Some(_)) => assert!(buf.is_empty(), "trailing bytes left"),
        _ => assert_eq!(buf, before, "buffer changed on error / none"),
    }
    out
}

#[test]
fn round_trip_all_packets() {
    for protocol in [Protocol::V311, Protocol::V5] {
        for p in samples(protocol) {
            let bytes = enc(&p, protocol);
            assert_eq!(encoded_len(&p, protocol), bytes.len(), "{p:?}");
            let back = dec(&bytes, state_for(&p, protocol));
            assert_eq!(back, Ok(Some(p.clone())), "{protocol:?}");
        }
    }
}

#[test]
fn v5_short_forms() {
    let ack = Packet::PubAck(PubAck {
        pkid: 1,
        ..Default::default()
    });
    assert_eq!(&enc(&ack, Protocol::V5)[..], b"\x40\x02\x00\x01");
    let d = Packet::Disconnect(Disconnect::default());
    assert_eq!(&enc(&d, Protocol::V5)[..], b"\xe0\x00");
    let d = Packet::Disconnect(Disconnect {
        reason: 0x8E,
        ..Default::default()
    });
    assert_eq!(&enc(&d, Protocol::V5)[..], b"\xe0\x02\x8e\x00");
    // The spec also allows omitting the property length.
    assert_eq!(dec(b"\xe0\x01\x8e", Some(Protocol::V5)), Ok(Some(d)));
    // PUBACK with reason code and a zero-length property block.
    let got = dec(b"\x40\x04\x00\x01\x10\x00", Some(Protocol::V5));
    assert!(matches!(
        got,
        Ok(Some(Packet::PubAck(PubAck { reason: 0x10, .. })))
    ));
}

#[test]
fn back_to_back_packets_do_not_bleed() {
    let protocol = Protocol::V5;
    let mut buf = BytesMut::new();
    let list: Vec<Packet> = samples(protocol)
        .into_iter()
        .filter(|p| !matches!(p, Packet::Connect(_)))
        .collect();
    for p in &list {
        encode(p, protocol, &mut buf).unwrap();
    }
    for p in &list {
        assert_eq!(decode(&mut buf, Some(protocol), MAX), Ok(Some(p.clone())));
    }
    assert_eq!(decode(&mut buf, Some(protocol), MAX), Ok(None));
}

#[test]
fn every_prefix_is_incomplete() {
    for protocol in [Protocol::V311, Protocol::V5] {
        for p in samples(protocol) {
            let bytes = enc(&p, protocol);
            for n in 0..bytes.len() {
                let got = dec(&bytes[..n], state_for(&p, protocol));
                assert_eq!(got, Ok(None), "{p:?} prefix {n}");
            }
        }
    }
}

#[test]
fn too_large_is_rejected_from_the_header() {
    // PUBLISH announcing 200 MB, only the fixed header buffered.
    let header = [0x30, 0x80, 0x80, 0xE4, 0x5F];
    let got = dec(&header, Some(Protocol::V311));
    assert_eq!(got, Err(CodecError::PacketTooLarge));
    // Exactly at the limit is fine; one byte over is not.
    let p = Packet::PingReq;
    let bytes = enc(&p, Protocol::V5);
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(decode(&mut buf, Some(Protocol::V5), 2), Ok(Some(p)));
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode(&mut buf, Some(Protocol::V5), 1),
        Err(CodecError::PacketTooLarge)
    );
}

#[test]
fn encode_limits() {
    let long = "x".repeat(65_536);
    let p = Packet::Publish(Publish {
        topic: long,
        ..Default::default()
    });
    let mut buf = BytesMut::new();
    assert_eq!(
        encode(&p, Protocol::V311, &mut buf),
        Err(CodecError::FieldTooLong)
    );
    assert!(buf.is_empty());
    assert_eq!(encoded_len(&p, Protocol::V311), usize::MAX);
    let other = Packet::Other { packet_type: 5 };
    assert_eq!(
        encode(&other, Protocol::V5, &mut buf),
        Err(CodecError::Unencodable)
    );
    let mut props = PublishProperties::default();
    props.subscription_identifiers.push(268_435_456);
    let p = Packet::Publish(Publish {
        topic: "t".into(),
        properties: props,
        ..Default::default()
    });
    assert_eq!(
        encode(&p, Protocol::V5, &mut buf),
        Err(CodecError::FieldTooLong)
    );
}

#[test]
fn reason_codes() {
    assert_eq!(CodecError::MalformedPacket.reason_code(), 0x81);
    assert_eq!(CodecError::ProtocolError.reason_code(), 0x82);
    assert_eq!(CodecError::UnsupportedProtocol(3).reason_code(), 0x84);
    assert_eq!(CodecError::PacketTooLarge.reason_code(), 0x95);
}

mod malformed;
