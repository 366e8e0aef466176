//! The MQTT decoder on hostile bytes, for an MQTT 3.1.1 session: CONNECT before the
//! protocol is known, then the session's packets (see `lobby_fuzz::session_reads`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lobby::mqtt::codec::Protocol;

fuzz_target!(|data: &[u8]| {
    lobby_fuzz::session_reads(data, Protocol::V311);
});
