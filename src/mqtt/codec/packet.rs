//! MQTT packet types shared by the decoder and the encoder.
//!
//! One set of structs serves MQTT 3.1.1 and 5.0: fields that only exist in
//! 5.0 (reason codes on acks, properties) are ignored when encoding for 3.1.1
//! and left at their defaults when decoding 3.1.1.

use bytes::Bytes;

/// MQTT protocol version, chosen by the CONNECT packet's protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Protocol {
    /// The protocol level byte carried in CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// Quality of service level of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// QoS 0: fire and forget.
    #[default]
    AtMostOnce = 0,
    /// QoS 1: acknowledged with PUBACK.
    AtLeastOnce = 1,
    /// QoS 2: four-way handshake (decoded, but not supported by Lobby).
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a two-bit wire value, `None` for the invalid value 3 (or larger).
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A decoded or to-be-encoded MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client to server).
    Connect(Connect),
    /// CONNACK (server to client).
    ConnAck(ConnAck),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK (both directions).
    PubAck(PubAck),
    /// SUBSCRIBE (client to server).
    Subscribe(Subscribe),
    /// SUBACK (server to client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client to server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server to client).
    UnsubAck(UnsubAck),
    /// PINGREQ (client to server).
    PingReq,
    /// PINGRESP (server to client).
    PingResp,
    /// DISCONNECT (both directions in 5.0, client to server in 3.1.1).
    Disconnect(Disconnect),
    /// A packet Lobby does not support: PUBREC (5), PUBREL (6), PUBCOMP (7)
    /// or, in 5.0 only, AUTH (15). Only its fixed header flags are checked;
    /// its body is skipped. It cannot be encoded.
    Other {
        /// The packet type from the fixed header (upper four bits).
        packet_type: u8,
    },
}

/// CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connect {
    /// Version from the protocol level. When encoding, the `protocol`
    /// argument of `encode` decides the wire format and level, not this field.
    pub protocol: Protocol,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// Keep alive in seconds (0 = disabled).
    pub keep_alive: u16,
    /// Clean Start (5.0) / Clean Session (3.1.1) flag.
    pub clean_start: bool,
    /// User name, if the user name flag is set.
    pub username: Option<String>,
    /// Password, if the password flag is set.
    pub password: Option<Bytes>,
    /// Will message, if the will flag is set.
    pub will: Option<Will>,
    /// CONNECT properties (5.0 only).
    pub properties: ConnectProperties,
}

/// Will message carried in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Will {
    /// Will topic (only checked to be valid UTF-8; see `topic::valid_topic_name`).
    pub topic: String,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will retain flag.
    pub retain: bool,
    /// Will properties (5.0 only).
    pub properties: WillProperties,
}

/// Will properties (MQTT 5.0 section 3.1.3.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WillProperties {
    /// Will Delay Interval (0x18), seconds.
    pub delay_interval: Option<u32>,
    /// Payload Format Indicator (0x01): 0 bytes, 1 UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (0x02), seconds.
    pub message_expiry_interval: Option<u32>,
    /// Content Type (0x03).
    pub content_type: Option<String>,
    /// Response Topic (0x08).
    pub response_topic: Option<String>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
}

/// CONNECT properties (MQTT 5.0 section 3.1.2.11).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectProperties {
    /// Session Expiry Interval (0x11), seconds.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum (0x21); never 0.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size (0x27); never 0.
    pub maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum (0x22).
    pub topic_alias_maximum: Option<u16>,
    /// Request Response Information (0x19): 0 or 1.
    pub request_response_information: Option<u8>,
    /// Request Problem Information (0x17): 0 or 1.
    pub request_problem_information: Option<u8>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
    /// Authentication Method (0x15).
    pub authentication_method: Option<String>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
}

/// CONNACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// Session Present flag.
    pub session_present: bool,
    /// 5.0 reason code, or 3.1.1 return code (0..=5).
    pub code: u8,
    /// CONNACK properties (5.0 only).
    pub properties: ConnAckProperties,
}

/// CONNACK properties (MQTT 5.0 section 3.2.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAckProperties {
    /// Session Expiry Interval (0x11), seconds.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum (0x21); never 0.
    pub receive_maximum: Option<u16>,
    /// Maximum QoS (0x24): 0 or 1.
    pub maximum_qos: Option<u8>,
    /// Retain Available (0x25).
    pub retain_available: Option<bool>,
    /// Maximum Packet Size (0x27); never 0.
    pub maximum_packet_size: Option<u32>,
    /// Assigned Client Identifier (0x12).
    pub assigned_client_identifier: Option<String>,
    /// Topic Alias Maximum (0x22).
    pub topic_alias_maximum: Option<u16>,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
    /// Wildcard Subscription Available (0x28).
    pub wildcard_subscription_available: Option<bool>,
    /// Subscription Identifiers Available (0x29).
    pub subscription_identifiers_available: Option<bool>,
    /// Shared Subscription Available (0x2A).
    pub shared_subscription_available: Option<bool>,
    /// Server Keep Alive (0x13), seconds.
    pub server_keep_alive: Option<u16>,
    /// Response Information (0x1A).
    pub response_information: Option<String>,
    /// Server Reference (0x1C).
    pub server_reference: Option<String>,
    /// Authentication Method (0x15).
    pub authentication_method: Option<String>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    /// DUP flag (always false for QoS 0).
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (only checked to be valid UTF-8; may be empty in 5.0 when a
    /// topic alias is used; see `topic::valid_topic_name`).
    pub topic: String,
    /// Packet identifier: non-zero for QoS > 0, 0 (and not on the wire) for QoS 0.
    pub pkid: u16,
    /// Application payload.
    pub payload: Bytes,
    /// PUBLISH properties (5.0 only).
    pub properties: PublishProperties,
}

/// PUBLISH properties (MQTT 5.0 section 3.3.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishProperties {
    /// Payload Format Indicator (0x01): 0 bytes, 1 UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (0x02), seconds.
    pub message_expiry_interval: Option<u32>,
    /// Topic Alias (0x23); never 0.
    pub topic_alias: Option<u16>,
    /// Response Topic (0x08).
    pub response_topic: Option<String>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
    /// Subscription Identifiers (0x0B), each 1..=268435455. Only legal
    /// server-to-client; the decoder accepts them in both directions.
    pub subscription_identifiers: Vec<u32>,
    /// Content Type (0x03).
    pub content_type: Option<String>,
}

/// PUBACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PubAck {
    /// Packet identifier being acknowledged.
    pub pkid: u16,
    /// Reason code (5.0; always 0 for 3.1.1).
    pub reason: u8,
    /// Properties (5.0 only).
    pub properties: AckProperties,
}

/// Properties of PUBACK, SUBACK and UNSUBACK (5.0 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckProperties {
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
}

impl AckProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

/// SUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub pkid: u16,
    /// At least one filter (an empty list is rejected when decoding).
    pub filters: Vec<SubscribeFilter>,
    /// SUBSCRIBE properties (5.0 only).
    pub properties: SubscribeProperties,
}

/// One topic filter and its subscription options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeFilter {
    /// Topic filter (only checked to be valid UTF-8; see `topic::valid_topic_filter`).
    pub filter: String,
    /// Maximum QoS requested.
    pub qos: QoS,
    /// No Local option (5.0 only).
    pub no_local: bool,
    /// Retain As Published option (5.0 only).
    pub retain_as_published: bool,
    /// Retain Handling option (5.0 only): 0, 1 or 2.
    pub retain_handling: u8,
}

/// SUBSCRIBE properties (MQTT 5.0 section 3.8.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeProperties {
    /// Subscription Identifier (0x0B), 1..=268435455.
    pub subscription_identifier: Option<u32>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
}

/// SUBACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub pkid: u16,
    /// One code per filter: granted QoS, or 0x80 (3.1.1) / a 5.0 reason code.
    pub codes: Vec<u8>,
    /// Properties (5.0 only).
    pub properties: AckProperties,
}

/// UNSUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub pkid: u16,
    /// At least one filter (an empty list is rejected when decoding).
    pub filters: Vec<String>,
    /// UNSUBSCRIBE properties (5.0 only).
    pub properties: UnsubscribeProperties,
}

/// UNSUBSCRIBE properties (MQTT 5.0 section 3.10.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubscribeProperties {
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
}

/// UNSUBACK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub pkid: u16,
    /// One reason code per filter (5.0 only; empty for 3.1.1).
    pub codes: Vec<u8>,
    /// Properties (5.0 only).
    pub properties: AckProperties,
}

/// DISCONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Reason code (5.0; always 0 for 3.1.1).
    pub reason: u8,
    /// DISCONNECT properties (5.0 only).
    pub properties: DisconnectProperties,
}

/// DISCONNECT properties (MQTT 5.0 section 3.14.2.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DisconnectProperties {
    /// Session Expiry Interval (0x11), seconds.
    pub session_expiry_interval: Option<u32>,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Properties (0x26), in wire order.
    pub user_properties: Vec<(String, String)>,
    /// Server Reference (0x1C).
    pub server_reference: Option<String>,
}

impl DisconnectProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.session_expiry_interval.is_none()
            && self.reason_string.is_none()
            && self.user_properties.is_empty()
            && self.server_reference.is_none()
    }
}

/// Why a packet could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes do not form a valid packet (bad length, flags, UTF-8, property, trailing bytes...).
    #[error("malformed packet")]
    MalformedPacket,
    /// The packet is well-formed but breaks a protocol rule (e.g. packet
    /// before CONNECT, second CONNECT, packet identifier 0, duplicate property).
    #[error("protocol error")]
    ProtocolError,
    /// The packet is larger than the allowed maximum packet size (decode), or
    /// than 268435455 bytes of remaining length (encode).
    #[error("packet too large")]
    PacketTooLarge,
    /// CONNECT with an unsupported protocol level (or a protocol name other than "MQTT").
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    /// Encode only: a string or binary field is longer than 65535 bytes, or a
    /// variable byte integer (subscription identifier) exceeds 268435455.
    #[error("field too long to encode")]
    FieldTooLong,
    /// Encode only: `Packet::Other` cannot be encoded.
    #[error("packet type cannot be encoded")]
    Unencodable,
}

impl CodecError {
    /// The MQTT 5.0 reason code to put in a DISCONNECT or CONNACK for this error.
    pub fn reason_code(self) -> u8 {
        match self {
            CodecError::MalformedPacket => 0x81,
            CodecError::ProtocolError => 0x82,
            CodecError::FieldTooLong | CodecError::Unencodable => 0x83,
            CodecError::UnsupportedProtocol(_) => 0x84,
            CodecError::PacketTooLarge => 0x95,
        }
    }
}

/// MQTT 5.0 property identifiers (section 2.2.2.2).
pub(super) mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIERS_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// MQTT control packet type numbers (upper four bits of the first byte).
pub(super) mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// Largest value of a variable byte integer (and of a remaining length).
pub(super) const MAX_VARINT: u32 = 268_435_455;
