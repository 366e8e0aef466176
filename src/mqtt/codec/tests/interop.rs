//! Interoperability with rumqttc's codecs: each case is a pair of equivalent
//! packets (ours, rumqttc's); ours must decode what rumqttc encodes and
//! rumqttc must decode what we encode, both to the paired value.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{v4, QoS as Q4};
use rumqttc::v5::mqttbytes::{v5, QoS as Q5};

use super::*;

fn check_v4(ours: Packet, theirs: v4::Packet) {
    let state = state_for(&ours, Protocol::V311);
    let mut buf = BytesMut::new();
    theirs.write(&mut buf, MAX).expect("rumqttc encodes");
    assert_eq!(dec(&buf, state), Ok(Some(ours.clone())), "rumqttc -> ours");
    let mut buf = enc(&ours, Protocol::V311);
    assert_eq!(
        v4::Packet::read(&mut buf, MAX).ok(),
        Some(theirs),
        "ours -> rumqttc"
    );
    assert!(buf.is_empty());
}

fn check_v5(ours: Packet, theirs: v5::Packet) {
    let state = state_for(&ours, Protocol::V5);
    let mut buf = BytesMut::new();
    theirs.write(&mut buf, None).expect("rumqttc encodes");
    assert_eq!(dec(&buf, state), Ok(Some(ours.clone())), "rumqttc -> ours");
    let mut buf = enc(&ours, Protocol::V5);
    assert_eq!(
        v5::Packet::read(&mut buf, None).ok(),
        Some(theirs),
        "ours -> rumqttc"
    );
    assert!(buf.is_empty());
}

fn their_user() -> Vec<(String, String)> {
    user()
}

#[test]
fn v4_connect() {
    let ours = connect(Protocol::V311);
    let theirs = v4::Connect {
        protocol: rumqttc::mqttbytes::Protocol::V4,
        keep_alive: 30,
        client_id: "device-1".into(),
        clean_session: true,
        last_will: Some(v4::LastWill::new("will/t", "bye", Q4::AtLeastOnce, true)),
        login: Some(v4::Login::new("user", "pw")),
    };
    let ours = Connect {
        password: b(b"pw"),
        ..ours
    };
    check_v4(Packet::Connect(ours), v4::Packet::Connect(theirs));
}

#[test]
fn v4_publish_subscribe_connack() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let ours = publish(Protocol::V311, qos);
        let mut theirs = v4::Publish::new(
            "a/b",
            [Q4::AtMostOnce, Q4::AtLeastOnce][qos as usize],
            vec![7u8; 300],
        );
        theirs.dup = ours.dup;
        theirs.retain = true;
        theirs.pkid = ours.pkid;
        check_v4(Packet::Publish(ours), v4::Packet::Publish(theirs));
    }
    let ours = Subscribe {
        pkid: 9,
        filters: vec![SubscribeFilter {
            filter: "a/+".into(),
            qos: QoS::AtLeastOnce,
            ..Default::default()
        }],
        properties: Default::default(),
    };
    let mut theirs = v4::Subscribe::new("a/+", Q4::AtLeastOnce);
    theirs.pkid = 9;
    check_v4(Packet::Subscribe(ours), v4::Packet::Subscribe(theirs));
    let ours = ConnAck {
        session_present: true,
        code: 0,
        properties: Default::default(),
    };
    let theirs = v4::ConnAck::new(v4::ConnectReturnCode::Success, true);
    check_v4(Packet::ConnAck(ours), v4::Packet::ConnAck(theirs));
}

#[test]
fn v5_connect() {
    let ours = Connect {
        password: b(b"pw"),
        ..connect(Protocol::V5)
    };
    let p = ours.properties.clone();
    let wp = ours.will.clone().unwrap_or_default().properties;
    let props = v5::ConnectProperties {
        session_expiry_interval: p.session_expiry_interval,
        receive_maximum: p.receive_maximum,
        max_packet_size: p.maximum_packet_size,
        topic_alias_max: p.topic_alias_maximum,
        request_response_info: p.request_response_information,
        request_problem_info: p.request_problem_information,
        user_properties: their_user(),
        authentication_method: p.authentication_method,
        authentication_data: p.authentication_data,
    };
    let will_props = v5::LastWillProperties {
        delay_interval: wp.delay_interval,
        payload_format_indicator: wp.payload_format_indicator,
        message_expiry_interval: wp.message_expiry_interval,
        content_type: wp.content_type,
        response_topic: wp.response_topic,
        correlation_data: wp.correlation_data,
        user_properties: their_user(),
    };
    let theirs = v5::Packet::Connect(
        v5::Connect {
            keep_alive: 30,
            client_id: "device-1".into(),
            clean_start: true,
            properties: Some(props),
        },
        Some(v5::LastWill::new(
            "will/t",
            "bye",
            Q5::AtLeastOnce,
            true,
            Some(will_props),
        )),
        Some(v5::Login::new("user", "pw")),
    );
    check_v5(Packet::Connect(ours), theirs);
}

#[test]
fn v5_publish_and_subscribe() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let ours = publish(Protocol::V5, qos);
        let p = ours.properties.clone();
        let theirs = v5::Publish {
            dup: ours.dup,
            qos: [Q5::AtMostOnce, Q5::AtLeastOnce][qos as usize],
            retain: true,
            topic: Bytes::from_static(b"a/b"),
            pkid: ours.pkid,
            payload: ours.payload.clone(),
            properties: Some(v5::PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                topic_alias: p.topic_alias,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: their_user(),
                subscription_identifiers: p
                    .subscription_identifiers
                    .iter()
                    .map(|&i| i as usize)
                    .collect(),
                content_type: p.content_type,
            }),
        };
        check_v5(Packet::Publish(ours), v5::Packet::Publish(theirs));
    }
    let ours = Subscribe {
        pkid: 9,
        filters: vec![SubscribeFilter {
            filter: "a/+".into(),
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        }],
        properties: SubscribeProperties {
            subscription_identifier: Some(77),
            user_properties: user(),
        },
    };
    let theirs = v5::Subscribe {
        pkid: 9,
        filters: vec![v5::Filter {
            path: "a/+".into(),
            qos: Q5::AtLeastOnce,
            nolocal: true,
            preserve_retain: true,
            retain_forward_rule: v5::RetainForwardRule::Never,
        }],
        properties: Some(v5::SubscribeProperties {
            id: Some(77),
            user_properties: their_user(),
        }),
    };
    check_v5(Packet::Subscribe(ours), v5::Packet::Subscribe(theirs));
}

#[test]
fn v5_connack_server_moved() {
    let ours = connack_v5(0x9D);
    let p = ours.properties.clone();
    let props = v5::ConnAckProperties {
        session_expiry_interval: p.session_expiry_interval,
        receive_max: p.receive_maximum,
        max_qos: p.maximum_qos,
        retain_available: p.retain_available.map(u8::from),
        max_packet_size: p.maximum_packet_size,
        assigned_client_identifier: p.assigned_client_identifier,
        topic_alias_max: p.topic_alias_maximum,
        reason_string: p.reason_string,
        user_properties: their_user(),
        wildcard_subscription_available: p.wildcard_subscription_available.map(u8::from),
        subscription_identifiers_available: p.subscription_identifiers_available.map(u8::from),
        shared_subscription_available: p.shared_subscription_available.map(u8::from),
        server_keep_alive: p.server_keep_alive,
        response_information: p.response_information,
        server_reference: p.server_reference,
        authentication_method: p.authentication_method,
        authentication_data: p.authentication_data,
    };
    let theirs = v5::ConnAck {
        session_present: false,
        code: v5::ConnectReturnCode::ServerMoved,
        properties: Some(props),
    };
    check_v5(Packet::ConnAck(ours), v5::Packet::ConnAck(theirs));
}

#[test]
fn v5_disconnect() {
    let ours = Disconnect {
        reason: 0x9D,
        properties: DisconnectProperties {
            session_expiry_interval: None,
            reason_string: s("moved"),
            user_properties: user(),
            server_reference: s("other.example:1883"),
        },
    };
    let theirs = v5::Disconnect {
        reason_code: v5::DisconnectReasonCode::ServerMoved,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: s("moved"),
            user_properties: their_user(),
            server_reference: s("other.example:1883"),
        }),
    };
    check_v5(Packet::Disconnect(ours), v5::Packet::Disconnect(theirs));
    let ours = Disconnect {
        reason: 0x8E,
        properties: Default::default(),
    };
    let theirs = v5::Disconnect::new(v5::DisconnectReasonCode::SessionTakenOver);
    // rumqttc 0.25.1 writes a reason-only DISCONNECT as `E0 01 8E 00`: the
    // remaining length says 1 but a zero property length follows. We decode
    // the 3-byte frame and leave the stray byte in the buffer.
    let mut buf = BytesMut::new();
    v5::Packet::Disconnect(theirs.clone())
        .write(&mut buf, None)
        .expect("rumqttc encodes");
    assert_eq!(&buf[..], b"\xe0\x01\x8e\x00");
    let got = decode(&mut buf, Some(Protocol::V5), MAX);
    assert_eq!(got, Ok(Some(Packet::Disconnect(ours.clone()))));
    assert_eq!(&buf[..], b"\x00");
    let mut buf = enc(&Packet::Disconnect(ours), Protocol::V5);
    let got = v5::Packet::read(&mut buf, None).ok();
    assert_eq!(got, Some(v5::Packet::Disconnect(theirs)));
}
