//! Device-facing MQTT 3.1.1 and 5.0 as a protocol: the codec (decode/encode/packet) and topic
//! syntax. What the lobby does with it (one device's session, its topic rules) is
//! [`crate::session`].

pub mod codec;
pub mod topic;
