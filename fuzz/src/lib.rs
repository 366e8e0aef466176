//! What the MQTT fuzz targets share: the session's read loop over one input, with the
//! decoder's contract checked on every step.
//!
//! The contract (see `lobby::mqtt::codec::decode`): no panic on any bytes; a decoded
//! packet is never larger than the maximum packet size; on `Ok(None)` and on `Err` the
//! buffer is left exactly as it was; and a decoded packet, encoded again, decodes to
//! itself (the encoder and the decoder agree on every packet the decoder accepts).

use bytes::BytesMut;
use lobby::config::LimitsConfig;
use lobby::mqtt::codec::{self, Packet, Protocol};

/// The lobby's default `limits.max_packet_size` (128 KiB), which the session passes to
/// `decode`.
pub fn max_packet_size() -> usize {
    LimitsConfig::default().max_packet_size
}

/// Feeds `data` to the decoder as the session would: first the read of CONNECT, before
/// the protocol is known; then whatever follows (the whole input if no CONNECT came out
/// of it) as the packets of an established `protocol` session, until the decoder wants
/// more bytes or fails.
pub fn session_reads(data: &[u8], protocol: Protocol) {
    let max = max_packet_size();
    let mut buf = BytesMut::from(data);
    step(&mut buf, None, max);
    while step(&mut buf, Some(protocol), max) {}
}

/// One `decode` call with its contract checked; true if a packet came out.
fn step(buf: &mut BytesMut, protocol: Option<Protocol>, max: usize) -> bool {
    let before = buf.clone();
    match codec::decode(buf, protocol, max) {
        Ok(Some(packet)) => {
            let consumed = before.len() - buf.len();
            assert!(
                consumed > 0 && consumed <= max,
                "{consumed} bytes for one packet"
            );
            assert_eq!(
                &before[consumed..],
                &buf[..],
                "bytes after the packet touched"
            );
            re_encode(&packet, protocol);
            true
        }
        Ok(None) | Err(_) => {
            assert_eq!(before, *buf, "buffer changed without a packet");
            false
        }
    }
}

/// Encodes a decoded packet again and checks it decodes to the same packet.
fn re_encode(packet: &Packet, protocol: Option<Protocol>) {
    if let Packet::Other { .. } = packet {
        return; // skipped by the decoder, cannot be encoded
    }
    let wire = match (packet, protocol) {
        (Packet::Connect(c), _) => c.protocol,
        (_, Some(p)) => p,
        (_, None) => unreachable!("only CONNECT decodes before the protocol is known"),
    };
    let mut out = BytesMut::new();
    codec::encode(packet, wire, &mut out).expect("a decoded packet encodes");
    // The canonical form can be a byte longer than the input (a v5 DISCONNECT's empty
    // property block), so the limit here is not the session's.
    let again = codec::decode(&mut out, protocol, usize::MAX)
        .expect("a re-encoded packet decodes")
        .expect("a re-encoded packet is complete");
    assert_eq!(&again, packet, "decode(encode(p)) != p");
    assert!(out.is_empty(), "re-encoded packet left bytes behind");
}
