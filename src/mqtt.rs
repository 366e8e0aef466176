//! Device-facing MQTT 3.1.1 and 5.0: the codec (decode/encode/packet), topic syntax, the
//! lobby's topic rules, and the session that runs one device's connection.

pub mod acl;
pub mod codec;
pub mod session;
pub mod topic;
