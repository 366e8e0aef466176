//! Properties of everything that parses hostile bytes, over generated inputs: the MQTT codec
//! (round trips of every packet on 3.1.1 and 5.0, partial frames, arbitrary and mutated
//! bytes), claim codes and PROXY v2 headers. The fuzz targets in `fuzz/` search the same
//! ground without a grammar; these run with the ordinary test suite.
//!
//! `PROPTEST_CASES` overrides the case count (256 here, to keep the suite fast).

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use lobby::claims::codes::ClaimKey;
use lobby::config::LimitsConfig;
use lobby::device::DeviceId;
use lobby::edge::proxy::{header_v2, read_v2};
use lobby::mqtt::codec::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

/// Largest variable byte integer (subscription identifiers).
const MAX_VARINT: u32 = 268_435_455;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    }
}

// ---- Strategies: every valid packet (5.0 field ranges; `for_protocol` narrows to 3.1.1) ----

/// A UTF-8 string the codec accepts: anything but U+0000.
fn text() -> impl Strategy<Value = String> {
    "[^\\x00]{0,12}"
}

fn bin() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn users() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pkid() -> impl Strategy<Value = u16> {
    1u16..
}

fn zero_or_one() -> impl Strategy<Value = Option<u8>> {
    of(0u8..=1)
}

fn ack_props() -> impl Strategy<Value = AckProperties> {
    (of(text()), users()).prop_map(|(reason_string, user_properties)| AckProperties {
        reason_string,
        user_properties,
    })
}

fn will() -> impl Strategy<Value = Will> {
    let props = (
        of(any::<u32>()),
        zero_or_one(),
        of(any::<u32>()),
        of(text()),
        of(text()),
        of(bin()),
        users(),
    )
        .prop_map(|(d, pfi, exp, ct, rt, cd, up)| WillProperties {
            delay_interval: d,
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        });
    (text(), bin(), qos(), any::<bool>(), props).prop_map(
        |(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        },
    )
}

fn connect() -> impl Strategy<Value = Connect> {
    let props = (
        of(any::<u32>()),
        of(1u16..),
        of(1u32..),
        of(any::<u16>()),
        zero_or_one(),
        zero_or_one(),
        users(),
        // Authentication Data only with an Authentication Method.
        of((text(), of(bin()))),
    )
        .prop_map(|(sei, rm, mps, tam, rri, rpi, up, auth)| {
            let (method, data) = auth.map_or((None, None), |(m, d)| (Some(m), d));
            ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: up,
                authentication_method: method,
                authentication_data: data,
            }
        });
    let login = (of(text()), of(bin()));
    (
        text(),
        any::<u16>(),
        any::<bool>(),
        login,
        of(will()),
        props,
    )
        .prop_map(
            |(client_id, keep_alive, clean_start, (username, password), will, properties)| {
                Connect {
                    protocol: Protocol::V5,
                    client_id,
                    keep_alive,
                    clean_start,
                    username,
                    password,
                    will,
                    properties,
                }
            },
        )
}

fn connack() -> impl Strategy<Value = ConnAck> {
    let limits = (
        of(any::<u32>()),
        of(1u16..),
        zero_or_one(),
        of(any::<bool>()),
        of(1u32..),
        of(any::<u16>()),
        of(any::<bool>()),
        of(any::<bool>()),
        of(any::<bool>()),
        of(any::<u16>()),
    );
    let strings = (
        of(text()),
        of(text()),
        users(),
        of(text()),
        of(text()),
        of(text()),
        of(bin()),
    );
    let props = (limits, strings).prop_map(
        |((sei, rm, mq, ra, mps, tam, wsa, sia, ssa, ska), (aci, rs, up, ri, sr, am, ad))| {
            ConnAckProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_qos: mq,
                retain_available: ra,
                maximum_packet_size: mps,
                assigned_client_identifier: aci,
                topic_alias_maximum: tam,
                reason_string: rs,
                user_properties: up,
                wildcard_subscription_available: wsa,
                subscription_identifiers_available: sia,
                shared_subscription_available: ssa,
                server_keep_alive: ska,
                response_information: ri,
                server_reference: sr,
                authentication_method: am,
                authentication_data: ad,
            }
        },
    );
    (any::<bool>(), any::<u8>(), props).prop_map(|(session_present, code, properties)| ConnAck {
        session_present,
        code,
        properties,
    })
}

fn publish() -> impl Strategy<Value = Publish> {
    let props = (
        zero_or_one(),
        of(any::<u32>()),
        of(1u16..),
        of(text()),
        of(bin()),
        users(),
        vec(1..=MAX_VARINT, 0..3),
        of(text()),
    )
        .prop_map(|(pfi, exp, ta, rt, cd, up, ids, ct)| PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: ids,
            content_type: ct,
        });
    let flags = (qos(), any::<bool>(), any::<bool>(), pkid());
    (flags, text(), bin(), props).prop_map(
        |((qos, dup, retain, id), topic, payload, properties)| {
            // QoS 0 has no packet identifier and no DUP flag.
            let acked = qos != QoS::AtMostOnce;
            Publish {
                dup: dup && acked,
                qos,
                retain,
                topic,
                pkid: if acked { id } else { 0 },
                payload,
                properties,
            }
        },
    )
}

fn subscribe() -> impl Strategy<Value = Subscribe> {
    let filter = (text(), qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(
        |(filter, qos, no_local, retain_as_published, retain_handling)| SubscribeFilter {
            filter,
            qos,
            no_local,
            retain_as_published,
            retain_handling,
        },
    );
    let props = (of(1..=MAX_VARINT), users()).prop_map(|(id, up)| SubscribeProperties {
        subscription_identifier: id,
        user_properties: up,
    });
    (pkid(), vec(filter, 1..4), props).prop_map(|(pkid, filters, properties)| Subscribe {
        pkid,
        filters,
        properties,
    })
}

fn packet() -> impl Strategy<Value = Packet> {
    let codes = || vec(any::<u8>(), 0..4);
    prop_oneof![
        connect().prop_map(Packet::Connect),
        connack().prop_map(Packet::ConnAck),
        publish().prop_map(Packet::Publish),
        (pkid(), any::<u8>(), ack_props()).prop_map(|(pkid, reason, properties)| Packet::PubAck(
            PubAck {
                pkid,
                reason,
                properties
            }
        )),
        subscribe().prop_map(Packet::Subscribe),
        (pkid(), codes(), ack_props()).prop_map(|(pkid, codes, properties)| {
            Packet::SubAck(SubAck {
                pkid,
                codes,
                properties,
            })
        }),
        (pkid(), vec(text(), 1..4), users()).prop_map(|(pkid, filters, up)| {
            Packet::Unsubscribe(Unsubscribe {
                pkid,
                filters,
                properties: UnsubscribeProperties {
                    user_properties: up,
                },
            })
        }),
        (pkid(), codes(), ack_props()).prop_map(|(pkid, codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                pkid,
                codes,
                properties,
            })
        }),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        (
            any::<u8>(),
            of(any::<u32>()),
            of(text()),
            users(),
            of(text())
        )
            .prop_map(|(reason, sei, rs, up, sr)| Packet::Disconnect(Disconnect {
                reason,
                properties: DisconnectProperties {
                    session_expiry_interval: sei,
                    reason_string: rs,
                    user_properties: up,
                    server_reference: sr,
                },
            })),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::V311), Just(Protocol::V5)]
}

/// A valid packet for `protocol`: for 3.1.1, what 3.1.1 cannot carry (properties, ack
/// reason codes, UNSUBACK codes, subscription options, a password without a user name)
/// is cleared, since the decoder leaves it at its default.
fn for_protocol(mut packet: Packet, protocol: Protocol) -> Packet {
    if protocol == Protocol::V5 {
        return packet;
    }
    match &mut packet {
        Packet::Connect(c) => {
            c.protocol = Protocol::V311;
            c.properties = Default::default();
            if let Some(w) = &mut c.will {
                w.properties = Default::default();
            }
            if c.password.is_some() && c.username.is_none() {
                c.username = Some(String::new());
            }
        }
        Packet::ConnAck(c) => c.properties = Default::default(),
        Packet::Publish(p) => p.properties = Default::default(),
        Packet::PubAck(p) => {
            *p = PubAck {
                pkid: p.pkid,
                ..Default::default()
            }
        }
        Packet::Subscribe(s) => {
            s.properties = Default::default();
            for f in &mut s.filters {
                *f = SubscribeFilter {
                    filter: std::mem::take(&mut f.filter),
                    qos: f.qos,
                    ..Default::default()
                };
            }
        }
        Packet::SubAck(s) => s.properties = Default::default(),
        Packet::Unsubscribe(u) => u.properties = Default::default(),
        Packet::UnsubAck(u) => {
            *u = UnsubAck {
                pkid: u.pkid,
                ..Default::default()
            }
        }
        Packet::Disconnect(d) => *d = Disconnect::default(),
        Packet::PingReq | Packet::PingResp | Packet::Other { .. } => {}
    }
    packet
}

/// A packet with the protocol it is valid for.
fn packet_for() -> impl Strategy<Value = (Packet, Protocol)> {
    (packet(), protocol()).prop_map(|(p, v)| (for_protocol(p, v), v))
}

/// What `decode` is told about the protocol: nothing yet for CONNECT, as in the session.
fn decode_as(packet: &Packet, protocol: Protocol) -> Option<Protocol> {
    match packet {
        Packet::Connect(_) => None,
        _ => Some(protocol),
    }
}

fn encoded(packet: &Packet, protocol: Protocol) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(packet, protocol, &mut buf).expect("valid packets encode");
    assert_eq!(buf.len(), encoded_len(packet, protocol));
    buf
}

/// Decodes every packet in `buf` and checks the decoder's contract on each call: nothing
/// larger than `max` comes out, and the buffer is untouched when nothing does.
fn check_contract(buf: &mut BytesMut, protocol: Option<Protocol>, max: usize) {
    loop {
        let before = buf.clone();
        match decode(buf, protocol, max) {
            Ok(Some(_)) => {
                let used = before.len() - buf.len();
                assert!(used > 0 && used <= max, "{used}-byte packet, max {max}");
            }
            Ok(None) | Err(_) => {
                assert_eq!(*buf, before, "buffer changed without a packet");
                return;
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// encode → decode is the identity and uses exactly the encoded bytes, with the
    /// maximum packet size at exactly the packet's size; one byte less is too large.
    #[test]
    fn mqtt_round_trip((packet, protocol) in packet_for(), tail in vec(any::<u8>(), 0..8)) {
        let wire = encoded(&packet, protocol);
        let len = wire.len();
        let mut buf = wire.clone();
        buf.extend_from_slice(&tail);
        let as_ = decode_as(&packet, protocol);
        prop_assert_eq!(decode(&mut buf, as_, len), Ok(Some(packet.clone())));
        prop_assert_eq!(&buf[..], &tail[..], "consumed other than the packet");
        let mut buf = wire;
        prop_assert_eq!(decode(&mut buf, as_, len - 1), Err(CodecError::PacketTooLarge));
        prop_assert_eq!(buf.len(), len, "buffer changed on error");
    }

    /// Every strict prefix of a valid encoding is a partial frame: `Ok(None)`, buffer as it was.
    #[test]
    fn mqtt_prefix_wants_more((packet, protocol) in packet_for()) {
        let wire = encoded(&packet, protocol);
        let as_ = decode_as(&packet, protocol);
        for n in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..n]);
            prop_assert_eq!(decode(&mut buf, as_, wire.len()), Ok(None), "prefix of {} bytes", n);
            prop_assert_eq!(&buf[..], &wire[..n]);
        }
    }

    /// Arbitrary bytes, before CONNECT and in either session: no panic, no packet over the
    /// limit, the buffer untouched on a partial frame or an error.
    #[test]
    fn mqtt_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..512),
        protocol in of(protocol()),
        max in 2usize..600,
    ) {
        check_contract(&mut BytesMut::from(&bytes[..]), protocol, max);
    }

    /// A valid encoding with one byte changed (near-misses reach deeper than random bytes).
    #[test]
    fn mqtt_mutated_packet(
        (packet, protocol) in packet_for(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut wire = encoded(&packet, protocol);
        let i = at.index(wire.len());
        wire[i] = byte;
        let max = LimitsConfig::default().max_packet_size;
        check_contract(&mut wire, decode_as(&packet, protocol), max);
    }

    /// A device's claim code verifies to that device, under any key.
    #[test]
    fn claim_code_round_trip(key in vec(any::<u8>(), 16..64), id in any::<[u8; 32]>()) {
        let key = ClaimKey::from_bytes(&key);
        let id = DeviceId(id);
        prop_assert_eq!(key.verify(&key.code_for(&id)), Some(id));
    }

    /// Any single-character change to a code is rejected, except a change of ASCII case
    /// (codes are typed by hand, so case is ignored).
    #[test]
    fn claim_code_one_change_rejected(
        id in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        to in prop_oneof![
            proptest::char::range(' ', '~'),
            Just('\t'), Just('\n'), Just('é'), Just('\u{0}'), Just('🦀'),
        ],
    ) {
        let key = ClaimKey::from_bytes(&[0x5A; 32]);
        let code = key.code_for(&DeviceId(id));
        let i = at.index(code.len()); // the code is ASCII, so every index is a character
        let from = char::from(code.as_bytes()[i]);
        prop_assume!(!from.eq_ignore_ascii_case(&to));
        let mut changed = code.clone();
        changed.replace_range(i..=i, to.encode_utf8(&mut [0; 4]));
        prop_assert_eq!(key.verify(&changed), None, "accepted {:?} (from {:?})", changed, code);
    }

    /// `header_v2` → `read_v2` gives the source address back (an IPv4 source in an IPv6
    /// header as its mapped form) and reads nothing past the header.
    #[test]
    fn proxy_v2_round_trip(src in any::<SocketAddr>(), dst in any::<SocketAddr>()) {
        let mut bytes = header_v2(src, dst);
        let header_len = bytes.len();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let mut rest = &bytes[..];
        let got = RUNTIME.block_on(read_v2(&mut rest));
        // The header carries neither IPv6 flow info nor scope id.
        let expected = match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V6(_)) => IpAddr::V6(s.ip().to_ipv6_mapped()),
            _ => src.ip(),
        };
        let expected = SocketAddr::new(expected, src.port());
        prop_assert_eq!(got, Ok(Some(expected)));
        prop_assert_eq!(rest, &bytes[header_len..]);
    }
}

/// `read_v2` is async; the properties drive it on one current-thread runtime.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

/// Writes the MQTT seed corpora of the fuzz targets (`fuzz/corpus/mqtt_decode_v{4,5}/`) with
/// the lobby's encoder: one file per packet type, and one session (CONNECT then the rest).
/// Run by hand: `cargo test --test codec_props -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes files; run by hand to regenerate the fuzz seeds"]
fn write_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (protocol, dir) in [
        (Protocol::V311, "mqtt_decode_v4"),
        (Protocol::V5, "mqtt_decode_v5"),
    ] {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A fixed seed, so regenerating gives the same files.
        let rng = TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &[7; 32]);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let mut session = BytesMut::new();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 11 {
            let p = packet().new_tree(&mut runner).unwrap().current();
            let p = for_protocol(p, protocol);
            let name = format!("{p:?}")
                .split(['(', ' '])
                .next()
                .unwrap()
                .to_lowercase();
            if !seen.insert(name.clone()) {
                continue;
            }
            let wire = encoded(&p, protocol);
            std::fs::write(dir.join(&name), &wire).unwrap();
            if name == "connect" {
                let mut rest = std::mem::take(&mut session);
                session.extend_from_slice(&wire);
                session.unsplit(std::mem::take(&mut rest));
            } else {
                session.extend_from_slice(&wire);
            }
        }
        std::fs::write(dir.join("session"), &session).unwrap();
    }
}
