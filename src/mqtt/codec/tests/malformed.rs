//! Malformed-input tests: a table of hand-written bad packets with their
//! expected errors, and brute-force fuzzing that must never panic.

use super::*;

const V3: Option<Protocol> = Some(Protocol::V311);
const V5: Option<Protocol> = Some(Protocol::V5);
const MAL: CodecError = CodecError::MalformedPacket;
const PROTO: CodecError = CodecError::ProtocolError;

/// (description, state, bytes, expected error)
const BAD: &[(&str, Option<Protocol>, &[u8], CodecError)] = &[
    ("publish first", None, b"\x30\x00", PROTO),
    ("pingreq first", None, b"\xc0\x00", PROTO),
    ("second connect", V5, b"\x10\x00", PROTO),
    ("reserved type 0", V5, b"\x00\x00", MAL),
    (
        "MQIsdp v3.1",
        None,
        b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01a",
        CodecError::UnsupportedProtocol(3),
    ),
    (
        "level 6",
        None,
        b"\x10\x0d\x00\x04MQTT\x06\x02\x00\x3c\x00\x01a",
        CodecError::UnsupportedProtocol(6),
    ),
    (
        "bad protocol name",
        None,
        b"\x10\x0d\x00\x04MQTX\x04\x02\x00\x3c\x00\x01a",
        CodecError::UnsupportedProtocol(4),
    ),
    (
        "connect reserved flag",
        None,
        b"\x10\x0d\x00\x04MQTT\x04\x03\x00\x3c\x00\x01a",
        MAL,
    ),
    (
        "v3 password without username",
        None,
        b"\x10\x11\x00\x04MQTT\x04\x42\x00\x3c\x00\x01a\x00\x02pw",
        MAL,
    ),
    (
        "will qos without will flag",
        None,
        b"\x10\x0d\x00\x04MQTT\x04\x0a\x00\x3c\x00\x01a",
        MAL,
    ),
    (
        "will retain without will flag",
        None,
        b"\x10\x0d\x00\x04MQTT\x04\x22\x00\x3c\x00\x01a",
        MAL,
    ),
    (
        "will qos 3",
        None,
        b"\x10\x0d\x00\x04MQTT\x04\x1e\x00\x3c\x00\x01a",
        MAL,
    ),
    (
        "connect trailing byte",
        None,
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a\xff",
        MAL,
    ),
    (
        "client id not utf-8",
        None,
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01\xff",
        MAL,
    ),
    (
        "client id with NUL",
        None,
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01\x00",
        MAL,
    ),
    (
        "v5 auth data without method",
        None,
        b"\x10\x12\x00\x04MQTT\x05\x02\x00\x3c\x04\x16\x00\x01x\x00\x01a",
        PROTO,
    ),
    (
        "v5 connect property not allowed",
        None,
        b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x02\x23\x00\x00\x01a",
        MAL,
    ),
    ("publish qos 3", V3, b"\x36\x05\x00\x01a\x00\x01", MAL),
    ("publish dup with qos 0", V3, b"\x38\x03\x00\x01a", MAL),
    (
        "publish qos 1 pkid 0",
        V3,
        b"\x32\x05\x00\x01a\x00\x00",
        PROTO,
    ),
    ("publish topic overrun", V3, b"\x30\x03\x00\x05a", MAL),
    ("publish missing pkid", V3, b"\x32\x03\x00\x01a", MAL),
    (
        "remaining length 5 bytes",
        V3,
        b"\x30\xff\xff\xff\xff\x7f",
        MAL,
    ),
    (
        "subscribe flags 0",
        V3,
        b"\x80\x06\x00\x01\x00\x01a\x00",
        MAL,
    ),
    ("subscribe no filters", V3, b"\x82\x02\x00\x01", PROTO),
    (
        "subscribe pkid 0",
        V3,
        b"\x82\x06\x00\x00\x00\x01a\x00",
        PROTO,
    ),
    (
        "v3 subscribe reserved bits",
        V3,
        b"\x82\x06\x00\x01\x00\x01a\x04",
        MAL,
    ),
    ("subscribe qos 3", V3, b"\x82\x06\x00\x01\x00\x01a\x03", MAL),
    (
        "subscribe missing options",
        V3,
        b"\x82\x05\x00\x01\x00\x01a",
        MAL,
    ),
    (
        "v5 subscribe no filters",
        V5,
        b"\x82\x03\x00\x01\x00",
        PROTO,
    ),
    (
        "v5 subscribe reserved bits",
        V5,
        b"\x82\x07\x00\x01\x00\x00\x01a\x40",
        MAL,
    ),
    (
        "v5 retain handling 3",
        V5,
        b"\x82\x07\x00\x01\x00\x00\x01a\x30",
        PROTO,
    ),
    (
        "v5 subscription id 0",
        V5,
        b"\x82\x09\x00\x01\x02\x0b\x00\x00\x01a\x00",
        PROTO,
    ),
    (
        "v5 two subscription ids in subscribe",
        V5,
        b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00",
        PROTO,
    ),
    ("unsubscribe flags 0", V3, b"\xa0\x05\x00\x01\x00\x01a", MAL),
    ("unsubscribe no filters", V3, b"\xa2\x02\x00\x01", PROTO),
    (
        "unsubscribe string overrun",
        V3,
        b"\xa2\x05\x00\x01\x00\x02a",
        MAL,
    ),
    ("pubrel flags 0", V3, b"\x60\x02\x00\x01", MAL),
    ("puback flags", V3, b"\x41\x02\x00\x01", MAL),
    ("v3 puback trailing", V3, b"\x40\x03\x00\x01\x00", MAL),
    ("puback pkid 0", V5, b"\x40\x02\x00\x00", PROTO),
    ("puback too short", V5, b"\x40\x01\x00", MAL),
    ("pingreq flags", V3, b"\xc1\x00", MAL),
    ("pingreq body", V3, b"\xc0\x01\x00", MAL),
    ("v3 disconnect body", V3, b"\xe0\x01\x00", MAL),
    ("v3 auth", V3, b"\xf0\x00", MAL),
    ("v3 connack reserved flags", V3, b"\x20\x02\x02\x00", MAL),
    ("v3 unsuback trailing", V3, b"\xb0\x03\x00\x01\x00", MAL),
    (
        "unknown property",
        V5,
        b"\x30\x06\x00\x01a\x02\x05\x00",
        MAL,
    ),
    (
        "duplicate property",
        V5,
        b"\x30\x08\x00\x01a\x04\x01\x00\x01\x01",
        PROTO,
    ),
    (
        "property not for publish",
        V5,
        b"\x30\x09\x00\x01a\x05\x11\x00\x00\x00\x01",
        MAL,
    ),
    (
        "property block overrun",
        V5,
        b"\x30\x06\x00\x01a\x05\x01\x00",
        MAL,
    ),
    (
        "property value overrun",
        V5,
        b"\x30\x06\x00\x01a\x02\x02\x00",
        MAL,
    ),
    (
        "payload format 2",
        V5,
        b"\x30\x06\x00\x01a\x02\x01\x02",
        PROTO,
    ),
    (
        "topic alias 0",
        V5,
        b"\x30\x07\x00\x01a\x03\x23\x00\x00",
        PROTO,
    ),
    (
        "publish sub id 0",
        V5,
        b"\x30\x06\x00\x01a\x02\x0b\x00",
        PROTO,
    ),
    (
        "property string not utf-8",
        V5,
        b"\x30\x08\x00\x01a\x04\x03\x00\x01\xc3",
        MAL,
    ),
    ("disconnect props overrun", V5, b"\xe0\x02\x8e\x05", MAL),
    (
        "disconnect property not allowed",
        V5,
        b"\xe0\x04\x00\x02\x01\x00",
        MAL,
    ),
    (
        "v5 ack property length 5 bytes",
        V5,
        b"\x40\x08\x00\x01\x00\xff\xff\xff\xff\x7f",
        MAL,
    ),
    (
        "v5 connack missing properties",
        V5,
        b"\x20\x02\x00\x00",
        MAL,
    ),
    (
        "v5 connack receive maximum 0",
        V5,
        b"\x20\x06\x00\x00\x03\x21\x00\x00",
        PROTO,
    ),
    (
        "v5 connack retain available 2",
        V5,
        b"\x20\x05\x00\x00\x02\x25\x02",
        PROTO,
    ),
];

#[test]
fn bad_packets_table() {
    for (what, state, bytes, want) in BAD {
        assert_eq!(dec(bytes, *state), Err(*want), "{what}");
    }
}

#[test]
fn accepted_edge_cases() {
    // 5.0 allows a password without a user name.
    let got = dec(
        b"\x10\x12\x00\x04MQTT\x05\x42\x00\x3c\x00\x00\x01a\x00\x02pw",
        None,
    );
    let Ok(Some(Packet::Connect(c))) = got else {
        panic!("{got:?}")
    };
    assert_eq!((c.username, c.password), (None, b(b"pw")));
    // Unsupported QoS 2 flow packets and AUTH decode as Other.
    let cases: [(Option<Protocol>, &[u8], u8); 5] = [
        (V3, b"\x50\x02\x00\x01", 5),
        (V3, b"\x62\x02\x00\x01", 6),
        (V5, b"\x70\x03\x00\x01\x00", 7),
        (V5, b"\xf0\x00", 15),
        (V5, b"\xf0\x02\x18\x00", 15),
    ];
    for (state, bytes, packet_type) in cases {
        assert_eq!(dec(bytes, state), Ok(Some(Packet::Other { packet_type })));
    }
    // The remaining length may use non-minimal encoding; four bytes max.
    assert_eq!(dec(b"\xc0\x80\x00", V3), Ok(Some(Packet::PingReq)));
}

/// A small xorshift64 PRNG, so the fuzz test needs no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Decodes `bytes` and checks the invariants: no panic, buffer untouched on
/// `None`/`Err`, exactly one frame consumed on success, and a decoded packet
/// re-encodes to something that decodes to the same packet.
fn check(bytes: &[u8], state: Option<Protocol>) {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, state, 4096) {
        Ok(Some(p)) => {
            assert!(buf.len() < bytes.len());
            assert!(bytes.ends_with(&buf));
            let protocol = match (&p, state) {
                (Packet::Connect(c), _) => c.protocol,
                (_, Some(v)) => v,
                (_, None) => unreachable!("only CONNECT decodes before CONNECT"),
            };
            if matches!(p, Packet::Other { .. }) {
                return;
            }
            let again = enc(&p, protocol);
            assert_eq!(encoded_len(&p, protocol), again.len());
            let mut again = again;
            assert_eq!(decode(&mut again, state, MAX), Ok(Some(p)));
        }
        Ok(None) | Err(_) => assert_eq!(&buf[..], bytes),
    }
}

/// Every sample packet with its decode state, encoded.
fn encoded_samples() -> Vec<(Option<Protocol>, Vec<u8>)> {
    let mut out = Vec::new();
    for protocol in [Protocol::V311, Protocol::V5] {
        for p in samples(protocol) {
            out.push((state_for(&p, protocol), enc(&p, protocol).to_vec()));
        }
    }
    out
}

#[test]
fn fuzz_bit_flips_and_truncations() {
    for (state, bytes) in encoded_samples() {
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut m = bytes.clone();
                m[i] ^= 1 << bit;
                check(&m, state);
            }
            // Truncate the body but fix up a one-byte remaining length so the
            // inner parsers see short input.
            let mut t = bytes[..i].to_vec();
            if t.len() >= 2 && bytes[1] < 0x80 {
                t[1] = (t.len() - 2) as u8;
                check(&t, state);
            }
            check(&bytes[..i], state);
        }
    }
}

#[test]
fn fuzz_random_mutations_and_bytes() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let samples = encoded_samples();
    let states = [None, V3, V5];
    for _ in 0..200_000 {
        let (state, base) = &samples[rng.below(samples.len())];
        let mut m = base.clone();
        for _ in 0..=rng.below(4) {
            let i = rng.below(m.len());
            if let Some(byte) = m.get_mut(i) {
                *byte = rng.next() as u8;
            }
        }
        m.truncate(rng.below(m.len() + 8));
        check(&m, *state);
    }
    for _ in 0..300_000 {
        let len = rng.below(40);
        let mut m: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(first) = m.first_mut() {
            // Bias towards plausible fixed headers.
            if rng.below(2) == 0 {
                *first = (rng.below(16) as u8) << 4 | [0, 2][rng.below(2)];
            }
        }
        if m.len() > 1 && rng.below(2) == 0 {
            m[1] = (m.len() - 2) as u8 & 0x7F;
        }
        check(&m, states[rng.below(3)]);
    }
}
