//! Just enough MQTT 3.1.1 / 5.0 for the harness, written by hand so that a held connection costs
//! no more than its socket, its TLS state and a buffer that is empty while idle.
//!
//! Encoders append to a caller's `Vec`; [`parse`] reads one packet from the front of a buffer and
//! returns `Ok(None)` for a partial frame. Nothing here panics on what the server sends.

use std::fmt;

/// Largest packet the harness accepts from the server (redirect and status payloads are small).
pub const MAX_PACKET: usize = 64 * 1024;

/// Protocol level spoken on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// A packet received from the server, reduced to what the scenarios look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// CONNACK with its return code (v3.1.1) or reason code (v5).
    ConnAck(u8),
    /// PUBLISH: topic, QoS, packet id (0 for QoS 0) and payload.
    Publish {
        /// Topic name as sent.
        topic: &'a [u8],
        /// QoS 0, 1 or 2.
        qos: u8,
        /// Packet identifier, 0 for QoS 0.
        pkid: u16,
        /// Application payload.
        payload: &'a [u8],
    },
    /// PUBACK for a packet id.
    PubAck(u16),
    /// SUBACK with the first return/reason code.
    SubAck(u8),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT from the server (v5) with its reason code (0 when absent).
    Disconnect(u8),
    /// Any other packet type (the high nibble of the first byte).
    Other(u8),
}

/// A malformed packet from the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for DecodeError {}

/// v5 DISCONNECT / CONNACK reason "Server moved": the lobby's redirect.
pub const REASON_SERVER_MOVED: u8 = 0x9D;

/// PINGREQ.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// DISCONNECT, normal (identical for v3.1.1 and v5: no reason code means 0x00).
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // Client ids and topics here are far below 64 KiB; truncate rather than panic if not.
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&s[..len]);
}

/// Appends a CONNECT with a clean session, no will, no credentials.
pub fn connect(out: &mut Vec<u8>, version: Version, client_id: &str, keep_alive: u16) {
    let props = usize::from(version == Version::V5);
    let remaining = 10 + props + 2 + client_id.len();
    out.push(0x10);
    put_len(out, remaining);
    put_str(out, b"MQTT");
    out.push(if version == Version::V5 { 5 } else { 4 });
    out.push(0x02); // clean session / clean start
    out.extend_from_slice(&keep_alive.to_be_bytes());
    if version == Version::V5 {
        out.push(0); // no properties
    }
    put_str(out, client_id.as_bytes());
}

/// Appends a SUBSCRIBE for one filter at QoS 1.
pub fn subscribe(out: &mut Vec<u8>, version: Version, pkid: u16, filter: &str) {
    let props = usize::from(version == Version::V5);
    let remaining = 2 + props + 2 + filter.len() + 1;
    out.push(0x82);
    put_len(out, remaining);
    out.extend_from_slice(&pkid.to_be_bytes());
    if version == Version::V5 {
        out.push(0);
    }
    put_str(out, filter.as_bytes());
    out.push(0x01);
}

/// Appends a PUBLISH (no DUP, no RETAIN) at QoS 0 or 1; `pkid` is ignored at QoS 0.
pub fn publish(out: &mut Vec<u8>, version: Version, topic: &str, qos: u8, pkid: u16, body: &[u8]) {
    let props = usize::from(version == Version::V5);
    let id = if qos > 0 { 2 } else { 0 };
    out.push(0x30 | (qos.min(1) << 1));
    put_len(out, 2 + topic.len() + id + props + body.len());
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == Version::V5 {
        out.push(0);
    }
    out.extend_from_slice(body);
}

/// PUBACK for `pkid` (success; the same bytes are valid v3.1.1 and v5).
pub fn puback(pkid: u16) -> [u8; 4] {
    let id = pkid.to_be_bytes();
    [0x40, 0x02, id[0], id[1]]
}

/// Reads the fixed header: `Ok(Some((header_len, remaining_len)))`, `Ok(None)` if incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(DecodeError("malformed remaining length"))
}

fn u16_at(body: &[u8], at: usize) -> Result<u16, DecodeError> {
    match body.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(DecodeError("packet too short")),
    }
}

/// Length of a v5 property block (the varint itself plus its content) starting at `at`.
fn props_len(body: &[u8], at: usize) -> Result<usize, DecodeError> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *body.get(at + i).ok_or(DecodeError("packet too short"))?;
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(i + 1 + len);
        }
    }
    Err(DecodeError("malformed property length"))
}

/// Parses the packet at the front of `buf`: `Ok(Some((packet, bytes used)))`, `Ok(None)` when
/// more bytes are needed.
pub fn parse(buf: &[u8], version: Version) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((header, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    if remaining > MAX_PACKET {
        return Err(DecodeError("packet larger than limit"));
    }
    let Some(body) = buf.get(header..header + remaining) else {
        return Ok(None);
    };
    let packet = match first >> 4 {
        2 => Packet::ConnAck(*body.get(1).ok_or(DecodeError("short CONNACK"))?),
        3 => parse_publish(first, body, version)?,
        4 => Packet::PubAck(u16_at(body, 0)?),
        9 => Packet::SubAck(suback_code(body, version)?),
        13 => Packet::PingResp,
        14 => Packet::Disconnect(body.first().copied().unwrap_or(0)),
        other => Packet::Other(other),
    };
    Ok(Some((packet, header + remaining)))
}

fn parse_publish(first: u8, body: &[u8], version: Version) -> Result<Packet<'_>, DecodeError> {
    let qos = (first >> 1) & 0x03;
    let topic_len = usize::from(u16_at(body, 0)?);
    let topic = body
        .get(2..2 + topic_len)
        .ok_or(DecodeError("short PUBLISH topic"))?;
    let mut at = 2 + topic_len;
    let pkid = if qos > 0 {
        at += 2;
        u16_at(body, at - 2)?
    } else {
        0
    };
    if version == Version::V5 {
        at += props_len(body, at)?;
        if at > body.len() {
            return Err(DecodeError("short PUBLISH properties"));
        }
    }
    let payload = body.get(at..).ok_or(DecodeError("short PUBLISH"))?;
    Ok(Packet::Publish {
        topic,
        qos,
        pkid,
        payload,
    })
}

fn suback_code(body: &[u8], version: Version) -> Result<u8, DecodeError> {
    let mut at = 2;
    if version == Version::V5 {
        at += props_len(body, at)?;
    }
    body.get(at)
        .copied()
        .ok_or(DecodeError("SUBACK without codes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_v4_layout() {
        let mut out = Vec::new();
        connect(&mut out, Version::V4, "lt-1", 60);
        assert_eq!(
            out,
            b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04lt-1".to_vec()
        );
    }

    #[test]
    fn partial_frames_are_none() {
        let full = [0x20, 0x03, 0x00, 0x9D, 0x00];
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut], Version::V5), Ok(None));
        }
        assert_eq!(
            parse(&full, Version::V5),
            Ok(Some((Packet::ConnAck(0x9D), 5)))
        );
    }

    #[test]
    fn publish_v5_with_properties() {
        let mut p = vec![0x32, 0];
        put_str(&mut p, b"a/redirect");
        p.extend_from_slice(&[0x00, 0x07, 0x02, 0x01, 0x01, b'{', b'}']);
        p[1] = (p.len() - 2) as u8;
        let (pkt, used) = parse(&p, Version::V5).unwrap().unwrap();
        assert_eq!(used, p.len());
        assert_eq!(
            pkt,
            Packet::Publish {
                topic: b"a/redirect",
                qos: 1,
                pkid: 7,
                payload: b"{}",
            }
        );
    }

    #[test]
    fn publish_round_trip() {
        for version in [Version::V4, Version::V5] {
            for qos in [0, 1] {
                let mut out = Vec::new();
                publish(&mut out, version, "things/a/t", qos, 9, b"xyz");
                let (pkt, used) = parse(&out, version).unwrap().unwrap();
                assert_eq!(used, out.len());
                let pkid = if qos == 1 { 9 } else { 0 };
                let payload = b"xyz";
                assert_eq!(
                    pkt,
                    Packet::Publish {
                        topic: b"things/a/t",
                        qos,
                        pkid,
                        payload
                    }
                );
            }
        }
        assert_eq!(
            parse(&puback(300), Version::V4),
            Ok(Some((Packet::PubAck(300), 4)))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], Version::V4).is_err());
        assert!(parse(&[0x32, 0x01, 0x00], Version::V4).is_err());
        assert!(parse(&[0x90, 0x02, 0x00, 0x01], Version::V4).is_err());
    }
}
