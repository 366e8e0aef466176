//! Server-side MQTT 3.1.1 / 5.0 packet codec.
//!
//! [`decode`] frames and validates one packet from a receive buffer,
//! [`encode`] appends one packet to a send buffer and [`encoded_len`] tells
//! its wire size. PUBREC, PUBREL, PUBCOMP and AUTH are decoded as
//! [`Packet::Other`] (Lobby supports QoS 0 and 1 only) and cannot be encoded.

mod decode;
mod encode;
mod packet;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use decode::decode;
pub use encode::{encode, encoded_len};
pub use packet::{
    AckProperties, CodecError, ConnAck, ConnAckProperties, Connect, ConnectProperties, Disconnect,
    DisconnectProperties, Packet, Protocol, PubAck, Publish, PublishProperties, QoS, SubAck,
    Subscribe, SubscribeFilter, SubscribeProperties, UnsubAck, Unsubscribe, UnsubscribeProperties,
    Will, WillProperties,
};
