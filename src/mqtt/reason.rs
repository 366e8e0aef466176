//! The reason codes the lobby sends, as MQTT 5.0 names them, and what a 3.1.1 client reads
//! instead. Everything in the session speaks v5 codes; the mapping to 3.1.1 is here, once.

use super::codec::Protocol;

pub const SUCCESS: u8 = 0x00;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const UNSPECIFIED: u8 = 0x80;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
pub const BAD_AUTH_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
pub const SERVER_MOVED: u8 = 0x9D;
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;

/// MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
pub mod v3 {
    pub const ACCEPTED: u8 = 0x00;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    pub const NOT_AUTHORIZED: u8 = 0x05;
    /// SUBACK's one failure code.
    pub const SUBACK_FAILURE: u8 = 0x80;
}

/// The CONNACK code `protocol` sends for the v5 `code`. 3.1.1 has six: a refusal because of
/// the server (busy, unavailable, a client reconnecting too fast) is "server unavailable", an
/// unknown protocol level is itself, and every other refusal (not authorised, a bad
/// authentication method, a moved server 3.1.1 cannot name) is "not authorised".
pub fn connack(protocol: Protocol, code: u8) -> u8 {
    match (protocol, code) {
        (Protocol::V5, c) => c,
        (Protocol::V311, SUCCESS) => v3::ACCEPTED,
        (Protocol::V311, UNSUPPORTED_PROTOCOL_VERSION) => v3::UNACCEPTABLE_PROTOCOL_VERSION,
        (Protocol::V311, SERVER_UNAVAILABLE | SERVER_BUSY | CONNECTION_RATE_EXCEEDED) => {
            v3::SERVER_UNAVAILABLE
        }
        (Protocol::V311, _) => v3::NOT_AUTHORIZED,
    }
}

/// The SUBACK code `protocol` sends for a v5 `code`: a granted QoS as it is; 3.1.1 has one
/// failure code for every refusal.
pub fn suback(protocol: Protocol, code: u8) -> u8 {
    match protocol {
        Protocol::V5 => code,
        Protocol::V311 if code < UNSPECIFIED => code,
        Protocol::V311 => v3::SUBACK_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_reads_one_of_its_own_codes() {
        let v3 = |c| connack(Protocol::V311, c);
        assert_eq!(v3(SUCCESS), 0);
        assert_eq!(v3(UNSUPPORTED_PROTOCOL_VERSION), 1);
        assert_eq!(v3(CONNECTION_RATE_EXCEEDED), 3);
        assert_eq!(v3(SERVER_BUSY), 3);
        for refused in [NOT_AUTHORIZED, BAD_AUTH_METHOD, SERVER_MOVED, UNSPECIFIED] {
            assert_eq!(v3(refused), 5, "{refused:#x}");
        }
        assert_eq!(connack(Protocol::V5, SERVER_MOVED), SERVER_MOVED);
        assert_eq!(suback(Protocol::V311, 1), 1);
        assert_eq!(suback(Protocol::V311, QUOTA_EXCEEDED), 0x80);
        assert_eq!(suback(Protocol::V5, QUOTA_EXCEEDED), QUOTA_EXCEEDED);
    }
}
