//! Low-level MQTT data type writers and MQTT 5.0 property block encoding.
//!
//! Everything writes through [`Sink`], implemented by `BytesMut` (real
//! output) and [`Counter`] (length only), so lengths and bytes never disagree.

use bytes::{BufMut, BytesMut};

use super::packet::{
    prop, AckProperties, CodecError, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, WillProperties, MAX_VARINT,
};

type Result<T> = std::result::Result<T, CodecError>;

/// Destination of encoded bytes: a real buffer or a length counter.
pub(super) trait Sink {
    /// Appends raw bytes.
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.put_slice(bytes);
    }
}

/// A sink that only counts bytes.
#[derive(Default)]
pub(super) struct Counter(pub(super) usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
}

/// Writes one byte.
pub(super) fn put_u8(out: &mut (impl Sink + ?Sized), v: u8) {
    out.put(&[v]);
}

/// Writes a two-byte big-endian integer.
pub(super) fn put_u16(out: &mut (impl Sink + ?Sized), v: u16) {
    out.put(&v.to_be_bytes());
}

/// Writes a variable byte integer; values above 268435455 cannot be encoded.
pub(super) fn put_varint(out: &mut (impl Sink + ?Sized), v: usize) -> Result<()> {
    let mut v = u32::try_from(v).map_err(|_| CodecError::FieldTooLong)?;
    if v > MAX_VARINT {
        return Err(CodecError::FieldTooLong);
    }
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            put_u8(out, byte);
            return Ok(());
        }
        put_u8(out, byte | 0x80);
    }
}

/// Writes two-byte length-prefixed binary data.
pub(super) fn put_binary(out: &mut (impl Sink + ?Sized), data: &[u8]) -> Result<()> {
    let len = u16::try_from(data.len()).map_err(|_| CodecError::FieldTooLong)?;
    put_u16(out, len);
    out.put(data);
    Ok(())
}

/// Writes a two-byte length-prefixed UTF-8 string.
pub(super) fn put_str(out: &mut (impl Sink + ?Sized), s: &str) -> Result<()> {
    put_binary(out, s.as_bytes())
}

/// Writes a property block: its variable-byte length, then the properties
/// written by `props` (called twice: once to count, once to write).
pub(super) fn block<S: Sink>(
    out: &mut S,
    props: impl Fn(&mut dyn Sink) -> Result<()>,
) -> Result<()> {
    let mut counter = Counter::default();
    props(&mut counter)?;
    put_varint(out, counter.0)?;
    props(out)
}

/// A one-byte property, if set.
fn byte(out: &mut dyn Sink, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        out.put(&[id, v]);
    }
}

/// A boolean (0/1 byte) property, if set.
fn boolean(out: &mut dyn Sink, id: u8, v: Option<bool>) {
    byte(out, id, v.map(u8::from));
}

/// A two-byte integer property, if set.
fn two(out: &mut dyn Sink, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        out.put(&[id]);
        out.put(&v.to_be_bytes());
    }
}

/// A four-byte integer property, if set.
fn four(out: &mut dyn Sink, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        out.put(&[id]);
        out.put(&v.to_be_bytes());
    }
}

/// A variable byte integer property.
fn var(out: &mut dyn Sink, id: u8, v: u32) -> Result<()> {
    out.put(&[id]);
    put_varint(out, v as usize)
}

/// A UTF-8 string property, if set.
fn string(out: &mut dyn Sink, id: u8, v: &Option<String>) -> Result<()> {
    if let Some(v) = v {
        out.put(&[id]);
        put_str(out, v)?;
    }
    Ok(())
}

/// A binary data property, if set.
fn binary(out: &mut dyn Sink, id: u8, v: &Option<bytes::Bytes>) -> Result<()> {
    if let Some(v) = v {
        out.put(&[id]);
        put_binary(out, v)?;
    }
    Ok(())
}

/// User properties, in order.
pub(super) fn user(out: &mut dyn Sink, pairs: &[(String, String)]) -> Result<()> {
    for (k, v) in pairs {
        out.put(&[prop::USER_PROPERTY]);
        put_str(out, k)?;
        put_str(out, v)?;
    }
    Ok(())
}

/// CONNECT properties.
pub(super) fn connect(out: &mut dyn Sink, p: &ConnectProperties) -> Result<()> {
    use prop::*;
    four(out, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    two(out, RECEIVE_MAXIMUM, p.receive_maximum);
    four(out, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    two(out, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    byte(
        out,
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    byte(
        out,
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    user(out, &p.user_properties)?;
    string(out, AUTHENTICATION_METHOD, &p.authentication_method)?;
    binary(out, AUTHENTICATION_DATA, &p.authentication_data)
}

/// Will properties.
pub(super) fn will(out: &mut dyn Sink, p: &WillProperties) -> Result<()> {
    use prop::*;
    four(out, WILL_DELAY_INTERVAL, p.delay_interval);
    byte(out, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    four(out, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    string(out, CONTENT_TYPE, &p.content_type)?;
    string(out, RESPONSE_TOPIC, &p.response_topic)?;
    binary(out, CORRELATION_DATA, &p.correlation_data)?;
    user(out, &p.user_properties)
}

/// CONNACK properties.
pub(super) fn connack(out: &mut dyn Sink, p: &ConnAckProperties) -> Result<()> {
    use prop::*;
    four(out, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    two(out, RECEIVE_MAXIMUM, p.receive_maximum);
    byte(out, MAXIMUM_QOS, p.maximum_qos);
    boolean(out, RETAIN_AVAILABLE, p.retain_available);
    four(out, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    string(
        out,
        ASSIGNED_CLIENT_IDENTIFIER,
        &p.assigned_client_identifier,
    )?;
    two(out, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    string(out, REASON_STRING, &p.reason_string)?;
    user(out, &p.user_properties)?;
    let w = p.wildcard_subscription_available;
    boolean(out, WILDCARD_SUBSCRIPTION_AVAILABLE, w);
    let s = p.subscription_identifiers_available;
    boolean(out, SUBSCRIPTION_IDENTIFIERS_AVAILABLE, s);
    boolean(
        out,
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    two(out, SERVER_KEEP_ALIVE, p.server_keep_alive);
    string(out, RESPONSE_INFORMATION, &p.response_information)?;
    string(out, SERVER_REFERENCE, &p.server_reference)?;
    string(out, AUTHENTICATION_METHOD, &p.authentication_method)?;
    binary(out, AUTHENTICATION_DATA, &p.authentication_data)
}

/// PUBLISH properties.
pub(super) fn publish(out: &mut dyn Sink, p: &PublishProperties) -> Result<()> {
    use prop::*;
    byte(out, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    four(out, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    two(out, TOPIC_ALIAS, p.topic_alias);
    string(out, RESPONSE_TOPIC, &p.response_topic)?;
    binary(out, CORRELATION_DATA, &p.correlation_data)?;
    user(out, &p.user_properties)?;
    for &id in &p.subscription_identifiers {
        var(out, SUBSCRIPTION_IDENTIFIER, id)?;
    }
    string(out, CONTENT_TYPE, &p.content_type)
}

/// PUBACK / SUBACK / UNSUBACK properties.
pub(super) fn ack(out: &mut dyn Sink, p: &AckProperties) -> Result<()> {
    string(out, prop::REASON_STRING, &p.reason_string)?;
    user(out, &p.user_properties)
}

/// SUBSCRIBE properties.
pub(super) fn subscribe(out: &mut dyn Sink, p: &SubscribeProperties) -> Result<()> {
    if let Some(id) = p.subscription_identifier {
        var(out, prop::SUBSCRIPTION_IDENTIFIER, id)?;
    }
    user(out, &p.user_properties)
}

/// DISCONNECT properties.
pub(super) fn disconnect(out: &mut dyn Sink, p: &DisconnectProperties) -> Result<()> {
    use prop::*;
    four(out, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    string(out, REASON_STRING, &p.reason_string)?;
    user(out, &p.user_properties)?;
    string(out, SERVER_REFERENCE, &p.server_reference)
}
