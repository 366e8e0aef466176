//! Encoding of MQTT 3.1.1 / 5.0 packets.
//!
//! Every packet is written through the [`Sink`] trait twice: once into a
//! byte counter (to learn the remaining length and property lengths without
//! allocating) and once into the output buffer (see `writer`). [`encoded_len`] uses only the
//! counter, so it always agrees with [`encode`].

use bytes::BytesMut;

use super::packet::{
    kind, AckProperties, CodecError, ConnAck, Connect, Disconnect, Packet, Protocol, PubAck,
    Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe, MAX_VARINT,
};
use super::writer::{
    self as props, put_binary, put_str, put_u16, put_u8, put_varint, Counter, Sink,
};

type Result<T> = std::result::Result<T, CodecError>;

/// Encode `packet` for `protocol`, appending it to `buf`.
///
/// Fields that do not exist in 3.1.1 (properties, ack reason codes) are
/// ignored for [`Protocol::V311`]. Fails with `FieldTooLong` for a string or
/// binary field over 65535 bytes, `PacketTooLarge` for a remaining length
/// over 268435455, and `Unencodable` for [`Packet::Other`]. On error `buf`
/// is left unchanged.
pub fn encode(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) -> Result<()> {
    let mut counter = Counter::default();
    let first = write_body(packet, protocol, &mut counter)?;
    let remaining = counter.0;
    if remaining > MAX_VARINT as usize {
        return Err(CodecError::PacketTooLarge);
    }
    buf.reserve(remaining + 5);
    put_u8(buf, first);
    put_varint(buf, remaining)?;
    write_body(packet, protocol, buf)?;
    Ok(())
}

/// Size `packet` would have on the wire for `protocol`, fixed header
/// included; `usize::MAX` when it cannot be encoded at all.
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> usize {
    let mut counter = Counter::default();
    let Ok(_) = write_body(packet, protocol, &mut counter) else {
        return usize::MAX;
    };
    let remaining = counter.0;
    if remaining > MAX_VARINT as usize {
        return usize::MAX;
    }
    let len_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + remaining
}

/// Writes the body (everything after the remaining length) and returns the first byte.
fn write_body(packet: &Packet, protocol: Protocol, out: &mut impl Sink) -> Result<u8> {
    let v5 = protocol == Protocol::V5;
    let first = match packet {
        Packet::Connect(c) => {
            connect(c, protocol, out)?;
            kind::CONNECT << 4
        }
        Packet::ConnAck(c) => {
            connack(c, v5, out)?;
            kind::CONNACK << 4
        }
        Packet::Publish(p) => return publish(p, v5, out),
        Packet::PubAck(p) => {
            puback(p, v5, out)?;
            kind::PUBACK << 4
        }
        Packet::Subscribe(s) => {
            subscribe(s, v5, out)?;
            kind::SUBSCRIBE << 4 | 0b0010
        }
        Packet::SubAck(s) => {
            suback(s, v5, out)?;
            kind::SUBACK << 4
        }
        Packet::Unsubscribe(u) => {
            unsubscribe(u, v5, out)?;
            kind::UNSUBSCRIBE << 4 | 0b0010
        }
        Packet::UnsubAck(u) => {
            unsuback(u, v5, out)?;
            kind::UNSUBACK << 4
        }
        Packet::PingReq => kind::PINGREQ << 4,
        Packet::PingResp => kind::PINGRESP << 4,
        Packet::Disconnect(d) => {
            disconnect(d, v5, out)?;
            kind::DISCONNECT << 4
        }
        Packet::Other { .. } => return Err(CodecError::Unencodable),
    };
    Ok(first)
}

/// CONNECT variable header and payload.
fn connect(c: &Connect, protocol: Protocol, out: &mut impl Sink) -> Result<()> {
    let v5 = protocol == Protocol::V5;
    put_str(out, "MQTT")?;
    put_u8(out, protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3;
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    put_u8(out, flags);
    put_u16(out, c.keep_alive);
    if v5 {
        props::block(out, |o| props::connect(o, &c.properties))?;
    }
    put_str(out, &c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            props::block(out, |o| props::will(o, &w.properties))?;
        }
        put_str(out, &w.topic)?;
        put_binary(out, &w.payload)?;
    }
    if let Some(u) = &c.username {
        put_str(out, u)?;
    }
    if let Some(p) = &c.password {
        put_binary(out, p)?;
    }
    Ok(())
}

/// CONNACK.
fn connack(c: &ConnAck, v5: bool, out: &mut impl Sink) -> Result<()> {
    put_u8(out, u8::from(c.session_present));
    put_u8(out, c.code);
    if v5 {
        props::block(out, |o| props::connack(o, &c.properties))?;
    }
    Ok(())
}

/// PUBLISH; returns the first byte (it carries DUP, QoS and RETAIN).
fn publish(p: &Publish, v5: bool, out: &mut impl Sink) -> Result<u8> {
    put_str(out, &p.topic)?;
    if p.qos != QoS::AtMostOnce {
        put_u16(out, p.pkid);
    }
    if v5 {
        props::block(out, |o| props::publish(o, &p.properties))?;
    }
    out.put(&p.payload);
    let mut first = kind::PUBLISH << 4 | (p.qos as u8) << 1;
    if p.dup {
        first |= 0b1000;
    }
    if p.retain {
        first |= 0b0001;
    }
    Ok(first)
}

/// PUBACK, in the shortest form that keeps all information.
fn puback(p: &PubAck, v5: bool, out: &mut impl Sink) -> Result<()> {
    put_u16(out, p.pkid);
    if v5 && (p.reason != 0 || !p.properties.is_empty()) {
        put_u8(out, p.reason);
        if !p.properties.is_empty() {
            props::block(out, |o| props::ack(o, &p.properties))?;
        }
    }
    Ok(())
}

/// SUBSCRIBE.
fn subscribe(s: &Subscribe, v5: bool, out: &mut impl Sink) -> Result<()> {
    put_u16(out, s.pkid);
    if v5 {
        props::block(out, |o| props::subscribe(o, &s.properties))?;
    }
    for f in &s.filters {
        put_str(out, &f.filter)?;
        let mut options = f.qos as u8;
        if v5 {
            options |= u8::from(f.no_local) << 2
                | u8::from(f.retain_as_published) << 3
                | (f.retain_handling & 0b11) << 4;
        }
        put_u8(out, options);
    }
    Ok(())
}

/// SUBACK.
fn suback(s: &SubAck, v5: bool, out: &mut impl Sink) -> Result<()> {
    put_u16(out, s.pkid);
    ack_props_if_v5(out, v5, &s.properties)?;
    out.put(&s.codes);
    Ok(())
}

/// UNSUBSCRIBE.
fn unsubscribe(u: &Unsubscribe, v5: bool, out: &mut impl Sink) -> Result<()> {
    put_u16(out, u.pkid);
    if v5 {
        props::block(out, |o| props::user(o, &u.properties.user_properties))?;
    }
    for f in &u.filters {
        put_str(out, f)?;
    }
    Ok(())
}

/// UNSUBACK (codes and properties only in 5.0).
fn unsuback(u: &UnsubAck, v5: bool, out: &mut impl Sink) -> Result<()> {
    put_u16(out, u.pkid);
    if v5 {
        ack_props_if_v5(out, v5, &u.properties)?;
        out.put(&u.codes);
    }
    Ok(())
}

/// The property block of SUBACK / UNSUBACK, only in 5.0.
fn ack_props_if_v5(out: &mut impl Sink, v5: bool, p: &AckProperties) -> Result<()> {
    if v5 {
        props::block(out, |o| props::ack(o, p))?;
    }
    Ok(())
}

/// DISCONNECT: empty for reason 0 without properties, otherwise the reason
/// code and a property block (even an empty one: the spec allows omitting
/// it, but rumqttc 0.25 cannot read a DISCONNECT without it).
fn disconnect(d: &Disconnect, v5: bool, out: &mut impl Sink) -> Result<()> {
    if v5 && (d.reason != 0 || !d.properties.is_empty()) {
        put_u8(out, d.reason);
        props::block(out, |o| props::disconnect(o, &d.properties))?;
    }
    Ok(())
}
