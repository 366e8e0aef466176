//! Decoding of MQTT 3.1.1 / 5.0 packets from a receive buffer.
//!
//! Framing (fixed header, remaining length, maximum packet size) is checked
//! before the body is awaited; the body is then parsed by a bounds-checked
//! [`Reader`] limited to exactly the remaining length, so a packet can never
//! read into the next one.

use bytes::{Bytes, BytesMut};

use super::packet::{
    kind, CodecError, ConnAck, Connect, Disconnect, Packet, Protocol, PubAck, Publish, QoS, SubAck,
    Subscribe, SubscribeFilter, UnsubAck, Unsubscribe, Will,
};
use super::reader::{self, Reader};

type Result<T> = std::result::Result<T, CodecError>;

/// Decode one packet from the front of `buf`, consuming its bytes on success.
///
/// `protocol` is `None` before CONNECT: only CONNECT is legal then (any
/// other packet type is `ProtocolError`), and the CONNECT's protocol level
/// picks the version (4 = 3.1.1, 5 = 5.0, anything else `UnsupportedProtocol`).
/// A CONNECT when `protocol` is `Some` is a `ProtocolError`.
///
/// Returns `Ok(None)` when the frame is incomplete. The whole packet size is
/// checked against `max_packet_size` as soon as the fixed header is complete.
/// On `Ok(None)` and on `Err`, `buf` is left exactly as it was.
///
/// Client-to-server and server-to-client packets are both decoded; rejecting
/// a packet that a client must not send (CONNACK, SUBACK, ...) is up to the
/// caller, as are topic name / filter rules (see the `topic` module).
pub fn decode(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_packet_size: usize,
) -> Result<Option<Packet>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first, protocol)?;
    let Some((header_len, remaining)) = remaining_length(buf)? else {
        return Ok(None);
    };
    let total = header_len.saturating_add(remaining);
    if total > max_packet_size {
        return Err(CodecError::PacketTooLarge);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    match parse_body(first, frame.slice(header_len..), protocol) {
        Ok(packet) => Ok(Some(packet)),
        Err(e) => {
            // Put the frame back so that the buffer is unchanged on error.
            let mut restored = BytesMut::with_capacity(frame.len() + buf.len());
            restored.extend_from_slice(&frame);
            restored.extend_from_slice(buf);
            *buf = restored;
            Err(e)
        }
    }
}

/// Checks the packet type and its fixed header flag bits.
fn check_first_byte(first: u8, protocol: Option<Protocol>) -> Result<()> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    match (protocol, packet_type) {
        (_, 0) => return Err(CodecError::MalformedPacket),
        (None, kind::CONNECT) => {}
        (None, _) | (Some(_), kind::CONNECT) => return Err(CodecError::ProtocolError),
        (Some(Protocol::V311), kind::AUTH) => return Err(CodecError::MalformedPacket),
        _ => {}
    }
    let ok = match packet_type {
        kind::PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            let dup = flags & 0b1000 != 0;
            qos != 3 && !(qos == 0 && dup)
        }
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => flags == 0b0010,
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(CodecError::MalformedPacket)
    }
}

/// Parses the remaining length: `Some((fixed header length, remaining length))`,
/// or `None` if more bytes are needed. More than four length bytes is malformed.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut value: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, value)));
        }
    }
    Err(CodecError::MalformedPacket)
}

/// Parses the body of a complete frame.
fn parse_body(first: u8, body: Bytes, protocol: Option<Protocol>) -> Result<Packet> {
    let mut r = Reader::new(body);
    let v5 = protocol == Some(Protocol::V5);
    let packet = match first >> 4 {
        kind::CONNECT => Packet::Connect(connect(&mut r)?),
        kind::CONNACK => Packet::ConnAck(connack(&mut r, v5)?),
        kind::PUBLISH => Packet::Publish(publish(&mut r, first, v5)?),
        kind::PUBACK => Packet::PubAck(puback(&mut r, v5)?),
        kind::SUBSCRIBE => Packet::Subscribe(subscribe(&mut r, v5)?),
        kind::SUBACK => Packet::SubAck(suback(&mut r, v5)?),
        kind::UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        kind::UNSUBACK => Packet::UnsubAck(unsuback(&mut r, v5)?),
        kind::PINGREQ => Packet::PingReq,
        kind::PINGRESP => Packet::PingResp,
        kind::DISCONNECT => Packet::Disconnect(disconnect(&mut r, v5)?),
        packet_type @ (kind::PUBREC | kind::PUBREL | kind::PUBCOMP | kind::AUTH) => {
            // Unsupported by Lobby: the body is skipped.
            r.rest();
            return Ok(Packet::Other { packet_type });
        }
        _ => return Err(CodecError::MalformedPacket),
    };
    r.finish()?;
    Ok(packet)
}

/// A non-zero packet identifier.
fn pkid(r: &mut Reader) -> Result<u16> {
    match r.u16()? {
        0 => Err(CodecError::ProtocolError),
        id => Ok(id),
    }
}

/// The CONNECT flags byte, validated.
struct ConnectFlags {
    clean_start: bool,
    will: Option<(QoS, bool)>,
    username: bool,
    password: bool,
}

impl ConnectFlags {
    /// Checks the reserved bit, will consistency and (3.1.1) password-needs-username.
    fn parse(flags: u8, protocol: Protocol) -> Result<Self> {
        let will_flag = flags & 0x04 != 0;
        let will_qos = QoS::from_u8((flags >> 3) & 0b11).ok_or(CodecError::MalformedPacket)?;
        let will_retain = flags & 0x20 != 0;
        let password = flags & 0x40 != 0;
        let username = flags & 0x80 != 0;
        let bad_will = !will_flag && (will_qos != QoS::AtMostOnce || will_retain);
        let bad_login = protocol == Protocol::V311 && password && !username;
        if flags & 0x01 != 0 || bad_will || bad_login {
            return Err(CodecError::MalformedPacket);
        }
        Ok(ConnectFlags {
            clean_start: flags & 0x02 != 0,
            will: will_flag.then_some((will_qos, will_retain)),
            username,
            password,
        })
    }
}

/// CONNECT protocol name and level.
fn connect_protocol(r: &mut Reader) -> Result<Protocol> {
    let name = r.binary()?;
    let level = r.u8()?;
    if &name[..] != b"MQTT" {
        // "MQIsdp" is MQTT 3.1; any other name is not a protocol we speak.
        return Err(CodecError::UnsupportedProtocol(level));
    }
    match level {
        4 => Ok(Protocol::V311),
        5 => Ok(Protocol::V5),
        other => Err(CodecError::UnsupportedProtocol(other)),
    }
}

/// CONNECT variable header and payload.
fn connect(r: &mut Reader) -> Result<Connect> {
    let protocol = connect_protocol(r)?;
    let flags = ConnectFlags::parse(r.u8()?, protocol)?;
    let keep_alive = r.u16()?;
    let v5 = protocol == Protocol::V5;
    let properties = if v5 {
        reader::connect_props(r)?
    } else {
        Default::default()
    };
    let client_id = r.string()?;
    let will = match flags.will {
        Some((qos, retain)) => {
            let properties = if v5 {
                reader::will_props(r)?
            } else {
                Default::default()
            };
            Some(Will {
                properties,
                topic: r.string()?,
                payload: r.binary()?,
                qos,
                retain,
            })
        }
        None => None,
    };
    let username = if flags.username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags.password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        client_id,
        keep_alive,
        clean_start: flags.clean_start,
        username,
        password,
        will,
        properties,
    })
}

/// CONNACK.
fn connack(r: &mut Reader, v5: bool) -> Result<ConnAck> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(CodecError::MalformedPacket);
    }
    let code = r.u8()?;
    let properties = if v5 {
        reader::connack_props(r)?
    } else {
        Default::default()
    };
    Ok(ConnAck {
        session_present: flags == 1,
        code,
        properties,
    })
}

/// PUBLISH; `first` carries DUP, QoS and RETAIN (already validated).
fn publish(r: &mut Reader, first: u8, v5: bool) -> Result<Publish> {
    let qos = QoS::from_u8((first >> 1) & 0b11).ok_or(CodecError::MalformedPacket)?;
    let topic = r.string()?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid(r)? };
    let properties = if v5 {
        reader::publish_props(r)?
    } else {
        Default::default()
    };
    Ok(Publish {
        dup: first & 0b1000 != 0,
        qos,
        retain: first & 0b0001 != 0,
        topic,
        pkid,
        payload: r.rest(),
        properties,
    })
}

/// PUBACK; in 5.0 the reason code and properties may be omitted.
fn puback(r: &mut Reader, v5: bool) -> Result<PubAck> {
    let mut ack = PubAck {
        pkid: pkid(r)?,
        ..Default::default()
    };
    if v5 && !r.is_empty() {
        ack.reason = r.u8()?;
        if !r.is_empty() {
            ack.properties = reader::ack_props(r)?;
        }
    }
    Ok(ack)
}

/// SUBSCRIBE with at least one filter.
fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe> {
    let pkid = pkid(r)?;
    let properties = if v5 {
        reader::subscribe_props(r)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if options & reserved != 0 {
            return Err(CodecError::MalformedPacket);
        }
        let qos = QoS::from_u8(options & 0b11).ok_or(CodecError::MalformedPacket)?;
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(CodecError::ProtocolError);
        }
        filters.push(SubscribeFilter {
            filter,
            qos,
            no_local: options & 0x04 != 0,
            retain_as_published: options & 0x08 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(CodecError::ProtocolError);
    }
    Ok(Subscribe {
        pkid,
        filters,
        properties,
    })
}

/// SUBACK.
fn suback(r: &mut Reader, v5: bool) -> Result<SubAck> {
    let pkid = pkid(r)?;
    let properties = if v5 {
        reader::ack_props(r)?
    } else {
        Default::default()
    };
    Ok(SubAck {
        pkid,
        codes: r.rest().to_vec(),
        properties,
    })
}

/// UNSUBSCRIBE with at least one filter.
fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe> {
    let pkid = pkid(r)?;
    let properties = if v5 {
        reader::unsubscribe_props(r)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(CodecError::ProtocolError);
    }
    Ok(Unsubscribe {
        pkid,
        filters,
        properties,
    })
}

/// UNSUBACK; reason codes and properties only in 5.0.
fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck> {
    let pkid = pkid(r)?;
    if !v5 {
        return Ok(UnsubAck {
            pkid,
            ..Default::default()
        });
    }
    let properties = reader::ack_props(r)?;
    Ok(UnsubAck {
        pkid,
        codes: r.rest().to_vec(),
        properties,
    })
}

/// DISCONNECT; in 5.0 the reason code and properties may be omitted.
fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect> {
    let mut d = Disconnect::default();
    if v5 && !r.is_empty() {
        d.reason = r.u8()?;
        if !r.is_empty() {
            d.properties = reader::disconnect_props(r)?;
        }
    }
    Ok(d)
}
