//! Hostile clients on the device edge (issue 7): a CONNECT announcing 256 MiB, broken
//! remaining-length varints, random garbage, packets before CONNECT, wildcard and `$` abuse, a
//! publish flood, thousands of half-open sockets, a TLS handshake that never completes and a
//! TLS record larger than TLS allows. Every test also checks that a legitimate device still
//! gets CONNACK 0. What `topic_rules.rs` and `session_limits.rs` already cover (32 bytes of 0xFF, a 4 KB CONNECT, `#`, `+/#`,
//! `$lobby/#`, another device's `…/#`, a silent TCP socket, half a CONNECT) is not repeated.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use lobby::mqtt::codec::{self, Packet, Protocol, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- local helpers -------------------------------------------------------------------------

/// Longer than `WAIT`: a lobby that waited for more bytes is not rescued by this timer before
/// the test gives up, so a close seen within `WAIT` comes from the check under test.
const NEVER: Duration = Duration::from_secs(120);

/// The largest remaining length MQTT can announce (268,435,455: 256 MiB), as a fixed header.
const HUGE_CONNECT: [u8; 5] = [0x10, 0xFF, 0xFF, 0xFF, 0x7F];
const HUGE_PUBLISH: [u8; 5] = [0x30, 0xFF, 0xFF, 0xFF, 0x7F];

/// A lobby whose connect timer cannot close anything within `WAIT`, and that lets one device
/// reconnect as often as a test needs (the reconnect limit is not what these tests are about).
async fn patient_lobby() -> TestLobby {
    TestLobby::start_with(|c| {
        c.limits.connect_timeout = NEVER;
        c.limits.reconnect_burst = 1000;
    })
    .await
}

fn subscribe(pkid: u16, filter: &str) -> Packet {
    subscribe_packet(pkid, &[filter], QoS::AtLeastOnce)
}

/// `packet` as `protocol` puts it on the wire.
fn wire(packet: &Packet, protocol: Protocol) -> BytesMut {
    let mut out = BytesMut::new();
    codec::encode(packet, protocol, &mut out).unwrap();
    out
}

/// The same packet with its remaining length spelled in five bytes (`len|0x80 80 80 80 00`):
/// a valid body behind a varint one byte longer than MQTT allows.
fn five_byte_length(packet: &[u8]) -> Vec<u8> {
    let len = packet[1];
    assert!(len < 0x80, "a one-byte remaining length expected");
    let mut out = vec![packet[0], len | 0x80, 0x80, 0x80, 0x80, 0x00];
    out.extend_from_slice(&packet[2..]);
    out
}

/// `n` random bytes from a fixed seed: the same garbage on every run and every version of
/// every crate (SplitMix64, written out here for that reason).
fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n.div_ceil(8))
        .flat_map(|_| next().to_le_bytes())
        .take(n)
        .collect()
}

/// Writes `bytes` as they are on the device's TLS stream. A write error is ignored: the lobby
/// may already have closed, which is what the caller checks next.
async fn write_raw(c: &mut RawClient, bytes: &[u8]) {
    let _ = c.stream.write_all(bytes).await;
    let _ = c.stream.flush().await;
}

/// A fresh legitimate device gets CONNACK 0 within `WAIT`, and a PINGRESP.
async fn still_serving(lobby: &TestLobby, name: &str) {
    let dev = lobby.device(name);
    let mut c = tokio::time::timeout(WAIT, connected(lobby, &dev, Protocol::V5))
        .await
        .unwrap_or_else(|_| panic!("{name}: no CONNACK within {WAIT:?}"));
    c.ping_ok().await;
}

// ---- 1. a CONNECT announcing 256 MiB -------------------------------------------------------

/// The size is refused on the fixed header: the connection closes with nothing sent back (the
/// protocol version is in the body, which never comes, so v5 gets no CONNACK 0x95) while the
/// body is missing or trickles in. The connect timer is out of reach, so a lobby that waited
/// for (or buffered) the body would fail here.
#[tokio::test]
async fn connect_announcing_256_mib_is_closed_on_its_fixed_header() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("huge-connect");

    // The fixed header, then silence.
    let mut c = RawClient::connect(&lobby, &dev, Protocol::V5).await;
    write_raw(&mut c, &HUGE_CONNECT).await;
    let got = c.expect_closed().await;
    assert!(got.is_empty(), "fixed header alone: {got:?}");

    // The fixed header and the start of a v5 CONNECT, then one byte every 50 ms.
    let tls = tls_connect(&lobby, &dev).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    wr.write_all(&HUGE_CONNECT).await.unwrap();
    wr.write_all(b"\x00\x04MQTT\x05\x02\x00\x1e").await.unwrap();
    wr.flush().await.unwrap();
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if wr.write_all(b"x").await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    expect_closed_without_bytes(&mut rd, "256 MiB CONNECT trickling its body").await;
    trickle.abort();

    // After a valid CONNECT, a PUBLISH announcing 256 MiB: v5 DISCONNECT 0x95 (packet too
    // large), v3.1.1 closed. Keep-alive (30 s × 1.5) is out of reach too.
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut c = connected(&lobby, &dev, protocol).await;
        write_raw(&mut c, &HUGE_PUBLISH).await;
        match protocol {
            Protocol::V5 => {
                c.expect_disconnect(0x95).await;
            }
            Protocol::V311 => {
                let got = c.expect_closed().await;
                assert!(got.is_empty(), "v3.1.1 huge PUBLISH: {got:?}");
            }
        }
    }
    still_serving(&lobby, "after-huge").await;
}

// ---- 2. broken remaining-length varints ----------------------------------------------------

/// A remaining length of five bytes is malformed, whatever value it spells. The second case
/// of each pair is a valid packet behind a five-byte length of its true size: a decoder
/// without the four-byte cap would accept it (CONNACK 0, PUBACK 0), so only the cap closes it.
#[tokio::test]
async fn five_byte_remaining_lengths_are_closed() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("varint");

    let connect = Packet::Connect(codec::Connect {
        protocol: Protocol::V311,
        client_id: "varint".into(),
        keep_alive: 30,
        clean_start: true,
        ..Default::default()
    });
    let connects = [
        [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F].to_vec(),
        five_byte_length(&wire(&connect, Protocol::V311)),
    ];
    for bytes in &connects {
        let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
        write_raw(&mut c, bytes).await;
        let got = c.expect_closed().await;
        assert!(got.is_empty(), "CONNECT {:02x?}: {got:?}", &bytes[..6]);
    }

    // After a valid CONNECT: v5 DISCONNECT 0x81 (malformed packet; not 0x95, the value is not
    // what is refused), v3.1.1 closed without a PUBACK.
    for protocol in [Protocol::V311, Protocol::V5] {
        let own = publish(&dev.topic("ack"), QoS::AtLeastOnce, 7, b"{}");
        let publishes = [
            [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F].to_vec(),
            five_byte_length(&wire(&own, protocol)),
        ];
        for bytes in &publishes {
            let mut c = connected(&lobby, &dev, protocol).await;
            write_raw(&mut c, bytes).await;
            match protocol {
                Protocol::V5 => {
                    c.expect_disconnect(0x81).await;
                }
                Protocol::V311 => {
                    let got = c.expect_closed().await;
                    assert!(got.is_empty(), "PUBLISH {:02x?}: {got:?}", &bytes[..6]);
                }
            }
        }
    }
    still_serving(&lobby, "after-varint").await;
}

// ---- 3. random garbage ---------------------------------------------------------------------

/// 4 KiB of random bytes (four fixed seeds), as they come and behind a well-formed fixed
/// header (CONNECT first, PUBLISH after CONNECT) so that the body parser sees them, first after
/// TLS and after a valid CONNECT. With the connect timer and keep-alive out of reach, only the
/// decoder can close these connections.
#[tokio::test]
async fn random_garbage_is_closed() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("noise");
    for seed in 1..=4u64 {
        let noise = garbage(seed, 4096);
        // A fixed header with a remaining length of 4093 (two bytes), then 4093 random bytes.
        let behind = |first: u8| [&[first, 0xFD, 0x1F][..], &noise[..4093]].concat();

        for bytes in [noise.clone(), behind(0x10)] {
            let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
            write_raw(&mut c, &bytes).await;
            let got = c.expect_closed().await;
            assert!(got.is_empty(), "seed {seed} {:02x?}…: {got:?}", &bytes[..4]);
        }
        // v5 DISCONNECT 0x81 (malformed packet), v3.1.1 closed without a byte.
        for protocol in [Protocol::V311, Protocol::V5] {
            for bytes in [noise.clone(), behind(0x30)] {
                let mut c = connected(&lobby, &dev, protocol).await;
                write_raw(&mut c, &bytes).await;
                if protocol == Protocol::V5 {
                    c.expect_disconnect(0x81).await;
                } else {
                    let got = c.expect_closed().await;
                    assert!(got.is_empty(), "seed {seed} {:02x?}…: {got:?}", &bytes[..4]);
                }
            }
        }
    }
    still_serving(&lobby, "after-noise").await;
}

// ---- 4. packets before CONNECT -------------------------------------------------------------

/// Anything but CONNECT first is refused on its first byte: closed, nothing sent back (no
/// CONNACK, no SUBACK). The connect timer is out of reach, so a lobby that skipped the packet
/// and went on waiting for CONNECT would fail here.
#[tokio::test]
async fn packets_before_connect_are_closed_without_connack() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("no-connect");
    let own = dev.topic("ack");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "PUBLISH QoS 0",
            wire(&publish(&own, QoS::AtMostOnce, 0, b"{}"), Protocol::V311).to_vec(),
        ),
        (
            "PUBLISH QoS 1",
            wire(&publish(&own, QoS::AtLeastOnce, 1, b"{}"), Protocol::V311).to_vec(),
        ),
        (
            "v5 PUBLISH QoS 1",
            wire(&publish(&own, QoS::AtLeastOnce, 1, b"{}"), Protocol::V5).to_vec(),
        ),
        (
            "SUBSCRIBE",
            wire(&subscribe(1, &dev.topic("#")), Protocol::V311).to_vec(),
        ),
        (
            "v5 SUBSCRIBE",
            wire(&subscribe(1, &dev.topic("#")), Protocol::V5).to_vec(),
        ),
        ("PINGREQ", vec![0xC0, 0x00]),
        ("a PUBLISH's first byte alone", vec![0x30]),
    ];
    for (what, bytes) in &cases {
        let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
        write_raw(&mut c, bytes).await;
        let got = c.expect_closed().await;
        assert!(got.is_empty(), "{what}: {got:?}");
    }
    still_serving(&lobby, "after-no-connect").await;
}

/// An MQTT 3.1 client (protocol name `MQIsdp`, level 3) and a level the lobby does not know
/// both get the 3.1.1 CONNACK "unacceptable protocol version" (return code 1), then the close.
#[tokio::test]
async fn an_unknown_protocol_level_gets_connack_1() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("old-mqtt");
    let connect = |name: &[u8], level: u8| {
        let mut body = vec![0x00, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, 0x02, 0x00, 0x3C, 0x00, 0x01, b'a']);
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    };
    for (what, bytes) in [
        ("MQTT 3.1", connect(b"MQIsdp", 3)),
        ("level 6", connect(b"MQTT", 6)),
    ] {
        let mut c = RawClient::connect(&lobby, &dev, Protocol::V311).await;
        write_raw(&mut c, &bytes).await;
        let got = c.expect_closed().await;
        let refused =
            matches!(got.as_slice(), [Packet::ConnAck(a)] if a.code == 1 && !a.session_present);
        assert!(refused, "{what}: {got:?}");
    }
    still_serving(&lobby, "after-old-mqtt").await;
}

// ---- 5. wildcard and `$` abuse -------------------------------------------------------------

/// Filters `topic_rules.rs` does not try: `$SYS`, another device through a wildcard level,
/// shared subscriptions, the own prefix misspelt. Each is refused, v3.1.1 0x80 / v5 0x87
/// (SPEC §4), never granted; the session stays and its own `…/#` is granted.
#[tokio::test]
async fn wildcard_and_dollar_subscriptions_are_refused() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("sub-abuse");
    let other = lobby.device("sub-victim");
    let own = dev.hex();
    let filters = [
        "$SYS/#".to_owned(),
        "$SYS/+".to_owned(),
        "$lobby/devices/+/redirect".to_owned(),
        "$lobby/devices/+/#".to_owned(),
        "$lobby/devices/#".to_owned(),
        format!("$lobby/+/{own}/status"),
        format!("+/devices/{own}/#"),
        format!("$lobby/devices/{own}"),
        format!("$lobby/devices/{}/#", own.to_uppercase()),
        other.topic("redirect"),
        "$share/g/#".to_owned(),
        format!("$share/g/$lobby/devices/{}/#", other.hex()),
        "$aws/rules/lobby".to_owned(),
        format!("lobby/{}", dev.name),
    ];
    for (protocol, refused) in [(Protocol::V311, 0x80), (Protocol::V5, 0x87)] {
        let mut c = connected(&lobby, &dev, protocol).await;
        for (i, f) in filters.iter().enumerate() {
            let got = c.subscribe(i as u16 + 1, f).await;
            assert_eq!(got, vec![refused], "{protocol:?} {f}");
        }
        assert_eq!(c.subscribe(99, &dev.topic("#")).await, vec![1]);
        assert_eq!(c.expect_publish().await.topic, dev.topic("status"));
        c.ping_ok().await;
    }
    still_serving(&lobby, "after-sub-abuse").await;
}

/// A topic name with a wildcard is a protocol error: v5 DISCONNECT 0x90 (topic name invalid)
/// at QoS 0 and 1, even under the own prefix; v3.1.1 closed without a byte.
#[tokio::test]
async fn publish_to_a_wildcard_topic_is_closed() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("pub-wild");
    let topics = [
        "a/+".to_owned(),
        "a/#".to_owned(),
        "#".to_owned(),
        dev.topic("+"),
        dev.topic("#"),
    ];
    for topic in &topics {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let mut c = connected(&lobby, &dev, Protocol::V5).await;
            c.send(publish(topic, qos, 1, b"{}")).await;
            c.expect_disconnect(0x90).await;

            let mut c = connected(&lobby, &dev, Protocol::V311).await;
            c.send(publish(topic, qos, 1, b"{}")).await;
            let got = c.expect_closed().await;
            assert!(got.is_empty(), "v3.1.1 {topic} {qos:?}: {got:?}");
        }
    }
    still_serving(&lobby, "after-pub-wild").await;
}

/// `$SYS`, another device's status and redirect (a forged redirect), the own prefix misspelt and
/// the AWS heartbeat topic with compat off: v5 QoS 1 PUBACK 0x87 and the session stays, v5
/// QoS 0 DISCONNECT 0x87, v3.1.1 closed without a byte.
#[tokio::test]
async fn publish_to_dollar_and_other_devices_topics_is_refused() {
    let lobby = patient_lobby().await;
    let dev = lobby.device("pub-abuse");
    let other = lobby.device("pub-victim");
    let own = dev.hex();
    let topics = [
        "$SYS/x".to_owned(),
        "$SYS/broker/clients/total".to_owned(),
        other.topic("redirect"),
        other.topic("status"),
        format!("$lobby/devices/{own}"),
        format!("$lobby/devices/{own}/"),
        format!("$lobby/devices/{}/ack", own.to_uppercase()),
        "$aws/rules/lobby".to_owned(),
    ];
    let mut v5 = connected(&lobby, &dev, Protocol::V5).await;
    for (i, topic) in topics.iter().enumerate() {
        let pkid = i as u16 + 1;
        v5.send(publish(topic, QoS::AtLeastOnce, pkid, b"{}")).await;
        match v5.expect().await {
            Packet::PubAck(a) => assert_eq!((a.pkid, a.reason), (pkid, 0x87), "{topic}"),
            other => panic!("{topic}: expected PUBACK 0x87, got {other:?}"),
        }
    }
    v5.ping_ok().await;
    drop(v5);
    for topic in &topics {
        let mut c = connected(&lobby, &dev, Protocol::V5).await;
        c.send(publish(topic, QoS::AtMostOnce, 0, b"{}")).await;
        c.expect_disconnect(0x87).await;
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let mut c = connected(&lobby, &dev, Protocol::V311).await;
            c.send(publish(topic, qos, 1, b"{}")).await;
            let got = c.expect_closed().await;
            assert!(got.is_empty(), "v3.1.1 {topic} {qos:?}: {got:?}");
        }
    }
    still_serving(&lobby, "after-pub-abuse").await;
}

// ---- 6. a publish flood --------------------------------------------------------------------

/// At least 20,000 QoS 0 PUBLISHes to the device's own `…/ack` (the topic SPEC §4 has a device
/// publish to), written as fast as the socket takes them; the flood goes on until a second
/// device has connected, so that connect happens under it. `limits.publish_rate` is off (the
/// default; `bounds.rs` tests it on): the second device gets CONNACK 0 within `WAIT`, and the flooder is served to the end
/// (its PINGRESP comes after the whole flood, with no DISCONNECT). The test runs on one thread
/// with the lobby, so a session that read without yielding, or blocked on each publish, would
/// starve the second device.
#[tokio::test]
async fn a_publish_flood_neither_starves_others_nor_kills_the_flooder() {
    const FLOOD: usize = 20_000;
    const CHUNK: usize = 100;
    let lobby = TestLobby::start().await;
    let flooder = lobby.device("flooder");
    let mut c = connected(&lobby, &flooder, Protocol::V311).await;
    let one = wire(
        &publish(
            &flooder.topic("ack"),
            QoS::AtMostOnce,
            0,
            br#"{"redirect_id":"flood"}"#,
        ),
        Protocol::V311,
    );
    let chunk = one.repeat(CHUNK);
    let other_in = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let other_in = other_in.clone();
        async move {
            let mut sent = 0;
            while sent < FLOOD || !other_in.load(Ordering::Acquire) {
                c.stream.write_all(&chunk).await.unwrap();
                sent += CHUNK;
            }
            c.stream.flush().await.unwrap();
            c
        }
    });
    still_serving(&lobby, "beside-the-flood").await;
    other_in.store(true, Ordering::Release);
    let mut c = tokio::time::timeout(WAIT, flood)
        .await
        .expect("the flood was not taken in within WAIT")
        .unwrap();
    c.ping_ok().await;
}

// ---- 7. thousands of half-open sockets ------------------------------------------------------

/// 2,000 TCP connections that never start TLS (fewer if the soft open-files limit is low: the
/// lobby runs in this process, so each costs two descriptors; the crate forbids the unsafe
/// `setrlimit` and has no rlimit dependency). A legitimate device gets in past them within
/// `WAIT`, which it could not if handshakes ran in the accept loop; after `handshake_timeout`
/// (1 s) the lobby closes every one of them without a byte.
#[tokio::test]
async fn thousands_of_half_open_sockets_are_closed_and_do_not_block_devices() {
    let lobby =
        TestLobby::start_with(|c| c.limits.handshake_timeout = Duration::from_secs(1)).await;
    let n = 2000.min(open_files_soft_limit().saturating_sub(512) / 2);
    if n < 2000 {
        eprintln!("open files soft limit: holding {n} half-open sockets instead of 2,000");
    }
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(TcpStream::connect(lobby.mqtt_addr()).await.unwrap());
    }
    still_serving(&lobby, "past-half-open").await;
    for (i, s) in idle.iter_mut().enumerate() {
        expect_closed_without_bytes(s, &format!("half-open socket {i} of {n}")).await;
    }
    still_serving(&lobby, "after-half-open").await;
}

// ---- 8. a TLS handshake that never completes ------------------------------------------------

/// A TLS handshake record header announcing 512 bytes and the first 38 of a ClientHello, then
/// silence. The lobby waits for the rest of the record (it may come in later segments) and,
/// after `handshake_timeout`, closes without a byte (no alert); a device connects meanwhile.
/// Without the handshake timer the socket would stay open past `WAIT`.
#[tokio::test]
async fn a_tls_handshake_that_never_completes_is_closed_after_the_timeout() {
    let lobby =
        TestLobby::start_with(|c| c.limits.handshake_timeout = Duration::from_secs(1)).await;
    let mut tcp = TcpStream::connect(lobby.mqtt_addr()).await.unwrap();
    // Record: handshake (0x16), TLS 1.0 record version, length 512. Then ClientHello (0x01) of
    // length 508, legacy version TLS 1.2, and 32 bytes of "random".
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0x5A; 32]);
    tcp.write_all(&hello).await.unwrap();
    still_serving(&lobby, "beside-partial-hello").await;
    expect_closed_without_bytes(&mut tcp, "a ClientHello cut short").await;
}

/// A TLS record header announcing 65,535 bytes, more than TLS allows (16 KiB + 2,048): refused
/// on the header with a fatal alert (rustls: decode_error) and closed, before any body and with
/// the handshake timer out of reach. A lobby that buffered the announced record would not
/// answer within `WAIT`.
#[tokio::test]
async fn an_oversized_tls_record_is_refused_on_its_header() {
    let lobby = TestLobby::start_with(|c| c.limits.handshake_timeout = NEVER).await;
    let mut tcp = TcpStream::connect(lobby.mqtt_addr()).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0xFF, 0xFF, 0x01])
        .await
        .unwrap();
    // One alert record: type 0x15, version, length 2, level fatal (2), description.
    let mut alert = [0u8; 7];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut alert))
        .await
        .expect("no answer to an oversized record within WAIT")
        .unwrap();
    assert_eq!(
        (alert[0], &alert[3..6]),
        (0x15, &[0x00, 0x02, 0x02][..]),
        "{alert:02x?}"
    );
    expect_closed_without_bytes(&mut tcp, "after the alert").await;
    still_serving(&lobby, "after-oversized-record").await;
}
