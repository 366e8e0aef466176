//! Bounds-checked reading of MQTT data types from a packet body, and
//! decoding of MQTT 5.0 property blocks into the property structs.
//!
//! Every read is checked against the end of the body; running out of bytes
//! is a malformed packet. Nothing here can panic on any input.

use bytes::Bytes;

use super::packet::{
    prop, AckProperties, CodecError, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};

type Result<T> = std::result::Result<T, CodecError>;

/// A cursor over one packet body (or one property block).
pub(super) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// A reader over the whole of `buf`.
    pub(super) fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// True when every byte has been read.
    pub(super) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// Fails with `MalformedPacket` unless every byte has been read.
    pub(super) fn finish(&self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(CodecError::MalformedPacket)
        }
    }

    /// The next `n` bytes, zero-copy.
    pub(super) fn take(&mut self, n: usize) -> Result<Bytes> {
        if n > self.remaining() {
            return Err(CodecError::MalformedPacket);
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// Everything not read yet, zero-copy.
    pub(super) fn rest(&mut self) -> Bytes {
        let n = self.remaining();
        self.take(n).unwrap_or_default()
    }

    /// One byte.
    pub(super) fn u8(&mut self) -> Result<u8> {
        let b = *self.buf.get(self.pos).ok_or(CodecError::MalformedPacket)?;
        self.pos += 1;
        Ok(b)
    }

    /// Two-byte big-endian integer.
    pub(super) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    /// Four-byte big-endian integer.
    pub(super) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }

    /// Variable byte integer, at most four bytes.
    pub(super) fn varint(&mut self) -> Result<u32> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::MalformedPacket)
    }

    /// Two-byte length-prefixed binary data.
    pub(super) fn binary(&mut self) -> Result<Bytes> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// Two-byte length-prefixed UTF-8 string without U+0000.
    pub(super) fn string(&mut self) -> Result<String> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw).map_err(|_| CodecError::MalformedPacket)?;
        if s.contains('\0') {
            return Err(CodecError::MalformedPacket);
        }
        Ok(s.to_owned())
    }

    /// A property block's length prefix, returning a reader limited to the block.
    fn property_block(&mut self) -> Result<Reader> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| CodecError::MalformedPacket)?;
        Ok(Reader::new(self.take(len)?))
    }
}

/// One decoded property value, typed by its identifier.
enum Value {
    Byte(u8),
    Two(u16),
    Four(u32),
    Var(u32),
    Str(String),
    Bin(Bytes),
    Pair(String, String),
}

/// Reads the value of property `id`; unknown identifiers are malformed.
fn read_value(r: &mut Reader, id: u8) -> Result<Value> {
    use prop::*;
    Ok(match id {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIERS_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Value::Byte(r.u8()?),
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
            Value::Two(r.u16()?)
        }
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Value::Four(r.u32()?),
        SUBSCRIPTION_IDENTIFIER => Value::Var(r.varint()?),
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Value::Str(r.string()?),
        CORRELATION_DATA | AUTHENTICATION_DATA => Value::Bin(r.binary()?),
        USER_PROPERTY => Value::Pair(r.string()?, r.string()?),
        _ => return Err(CodecError::MalformedPacket),
    })
}

/// Reads a length-prefixed property block, calling `apply` for each property.
///
/// Enforces the generic rules: known identifier, no overrun, and at most one
/// occurrence of each property except User Property (and Subscription
/// Identifier when `multi_sub_id`). `apply` rejects identifiers that are not
/// valid for the packet (malformed) and bad values (protocol error).
fn read_props(
    r: &mut Reader,
    multi_sub_id: bool,
    mut apply: impl FnMut(u8, Value) -> Result<()>,
) -> Result<()> {
    let mut block = r.property_block()?;
    let mut seen: u64 = 0;
    while !block.is_empty() {
        let id = block.u8()?;
        let value = read_value(&mut block, id)?;
        let repeatable =
            id == prop::USER_PROPERTY || (id == prop::SUBSCRIPTION_IDENTIFIER && multi_sub_id);
        if !repeatable {
            // Known identifiers are all below 64.
            let bit = 1u64 << (id & 0x3F);
            if seen & bit != 0 {
                return Err(CodecError::ProtocolError);
            }
            seen |= bit;
        }
        apply(id, value)?;
    }
    Ok(())
}

/// A 0/1 byte as a bool; other values are a protocol error.
fn flag(b: u8) -> Result<bool> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(CodecError::ProtocolError),
    }
}

/// A 0/1 byte kept as a byte; other values are a protocol error.
fn zero_or_one(b: u8) -> Result<Option<u8>> {
    flag(b).map(|_| Some(b))
}

/// A value that must not be zero (Receive Maximum, Topic Alias, ...).
fn non_zero<T: Default + PartialEq>(v: T) -> Result<Option<T>> {
    if v == T::default() {
        Err(CodecError::ProtocolError)
    } else {
        Ok(Some(v))
    }
}

/// The error for an identifier that is valid MQTT but not for this packet.
fn not_allowed() -> Result<()> {
    Err(CodecError::MalformedPacket)
}

/// CONNECT properties.
pub(super) fn connect_props(r: &mut Reader) -> Result<ConnectProperties> {
    use prop::*;
    let mut p = ConnectProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (SESSION_EXPIRY_INTERVAL, Value::Four(x)) => p.session_expiry_interval = Some(x),
            (RECEIVE_MAXIMUM, Value::Two(x)) => p.receive_maximum = non_zero(x)?,
            (MAXIMUM_PACKET_SIZE, Value::Four(x)) => p.maximum_packet_size = non_zero(x)?,
            (TOPIC_ALIAS_MAXIMUM, Value::Two(x)) => p.topic_alias_maximum = Some(x),
            (REQUEST_RESPONSE_INFORMATION, Value::Byte(x)) => {
                p.request_response_information = zero_or_one(x)?
            }
            (REQUEST_PROBLEM_INFORMATION, Value::Byte(x)) => {
                p.request_problem_information = zero_or_one(x)?
            }
            (USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            (AUTHENTICATION_METHOD, Value::Str(x)) => p.authentication_method = Some(x),
            (AUTHENTICATION_DATA, Value::Bin(x)) => p.authentication_data = Some(x),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    // Authentication Data without an Authentication Method is a protocol error.
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(CodecError::ProtocolError);
    }
    Ok(p)
}

/// Will properties.
pub(super) fn will_props(r: &mut Reader) -> Result<WillProperties> {
    use prop::*;
    let mut p = WillProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (WILL_DELAY_INTERVAL, Value::Four(x)) => p.delay_interval = Some(x),
            (PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => {
                p.payload_format_indicator = zero_or_one(x)?
            }
            (MESSAGE_EXPIRY_INTERVAL, Value::Four(x)) => p.message_expiry_interval = Some(x),
            (CONTENT_TYPE, Value::Str(x)) => p.content_type = Some(x),
            (RESPONSE_TOPIC, Value::Str(x)) => p.response_topic = Some(x),
            (CORRELATION_DATA, Value::Bin(x)) => p.correlation_data = Some(x),
            (USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}

/// CONNACK properties.
pub(super) fn connack_props(r: &mut Reader) -> Result<ConnAckProperties> {
    use prop::*;
    let mut p = ConnAckProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (SESSION_EXPIRY_INTERVAL, Value::Four(x)) => p.session_expiry_interval = Some(x),
            (RECEIVE_MAXIMUM, Value::Two(x)) => p.receive_maximum = non_zero(x)?,
            (MAXIMUM_QOS, Value::Byte(x)) => p.maximum_qos = zero_or_one(x)?,
            (RETAIN_AVAILABLE, Value::Byte(x)) => p.retain_available = Some(flag(x)?),
            (MAXIMUM_PACKET_SIZE, Value::Four(x)) => p.maximum_packet_size = non_zero(x)?,
            (ASSIGNED_CLIENT_IDENTIFIER, Value::Str(x)) => p.assigned_client_identifier = Some(x),
            (TOPIC_ALIAS_MAXIMUM, Value::Two(x)) => p.topic_alias_maximum = Some(x),
            (REASON_STRING, Value::Str(x)) => p.reason_string = Some(x),
            (USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            (WILDCARD_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                p.wildcard_subscription_available = Some(flag(x)?)
            }
            (SUBSCRIPTION_IDENTIFIERS_AVAILABLE, Value::Byte(x)) => {
                p.subscription_identifiers_available = Some(flag(x)?)
            }
            (SHARED_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                p.shared_subscription_available = Some(flag(x)?)
            }
            (SERVER_KEEP_ALIVE, Value::Two(x)) => p.server_keep_alive = Some(x),
            (RESPONSE_INFORMATION, Value::Str(x)) => p.response_information = Some(x),
            (SERVER_REFERENCE, Value::Str(x)) => p.server_reference = Some(x),
            (AUTHENTICATION_METHOD, Value::Str(x)) => p.authentication_method = Some(x),
            (AUTHENTICATION_DATA, Value::Bin(x)) => p.authentication_data = Some(x),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}

/// PUBLISH properties.
pub(super) fn publish_props(r: &mut Reader) -> Result<PublishProperties> {
    use prop::*;
    let mut p = PublishProperties::default();
    read_props(r, true, |id, v| {
        match (id, v) {
            (PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => {
                p.payload_format_indicator = zero_or_one(x)?
            }
            (MESSAGE_EXPIRY_INTERVAL, Value::Four(x)) => p.message_expiry_interval = Some(x),
            (TOPIC_ALIAS, Value::Two(x)) => p.topic_alias = non_zero(x)?,
            (RESPONSE_TOPIC, Value::Str(x)) => p.response_topic = Some(x),
            (CORRELATION_DATA, Value::Bin(x)) => p.correlation_data = Some(x),
            (USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            (SUBSCRIPTION_IDENTIFIER, Value::Var(x)) => {
                p.subscription_identifiers.extend(non_zero(x)?)
            }
            (CONTENT_TYPE, Value::Str(x)) => p.content_type = Some(x),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}

/// PUBACK / SUBACK / UNSUBACK properties.
pub(super) fn ack_props(r: &mut Reader) -> Result<AckProperties> {
    let mut p = AckProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (prop::REASON_STRING, Value::Str(x)) => p.reason_string = Some(x),
            (prop::USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}

/// SUBSCRIBE properties.
pub(super) fn subscribe_props(r: &mut Reader) -> Result<SubscribeProperties> {
    let mut p = SubscribeProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (prop::SUBSCRIPTION_IDENTIFIER, Value::Var(x)) => {
                p.subscription_identifier = non_zero(x)?
            }
            (prop::USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}

/// UNSUBSCRIBE properties.
pub(super) fn unsubscribe_props(r: &mut Reader) -> Result<UnsubscribeProperties> {
    let mut p = UnsubscribeProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (prop::USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}

/// DISCONNECT properties.
pub(super) fn disconnect_props(r: &mut Reader) -> Result<DisconnectProperties> {
    use prop::*;
    let mut p = DisconnectProperties::default();
    read_props(r, false, |id, v| {
        match (id, v) {
            (SESSION_EXPIRY_INTERVAL, Value::Four(x)) => p.session_expiry_interval = Some(x),
            (REASON_STRING, Value::Str(x)) => p.reason_string = Some(x),
            (USER_PROPERTY, Value::Pair(k, v)) => p.user_properties.push((k, v)),
            (SERVER_REFERENCE, Value::Str(x)) => p.server_reference = Some(x),
            _ => return not_allowed(),
        }
        Ok(())
    })?;
    Ok(p)
}
