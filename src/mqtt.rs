//! Device-facing MQTT 3.1.1 and 5.0 as a protocol: the codec (decode/encode/packet), topic
//! syntax and reason codes (v5, and what 3.1.1 says instead). What the lobby does with it (one device's session, its topic rules) is
//! [`crate::session`].

pub mod codec;
pub mod reason;
pub mod topic;
