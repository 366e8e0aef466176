//! The PROXY protocol v2 reader on hostile bytes: `read_v2` never panics, never reads
//! past the header it parses, and gives the same answer however the bytes arrive.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lobby::edge::proxy::read_v2;
use tokio::io::BufReader;
use tokio::runtime::{Builder, Runtime};

/// One current-thread runtime for the whole run.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let mut rest = data;
    let whole = rt.block_on(read_v2(&mut rest));
    if whole.is_ok() {
        // Exactly the header: 16 bytes and the length they announce.
        let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
        assert_eq!(data.len() - rest.len(), 16 + len, "read past the header");
    }
    // The same bytes one at a time (a reader that returns short reads).
    let mut trickle = BufReader::with_capacity(1, data);
    assert_eq!(rt.block_on(read_v2(&mut trickle)), whole);
});
