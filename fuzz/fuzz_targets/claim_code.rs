//! Claim-code verification on hostile text: `ClaimKey::verify` never panics, and accepts
//! only the device's own code (up to surrounding whitespace and ASCII case).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lobby::claims::codes::ClaimKey;

fuzz_target!(|data: &[u8]| {
    // The key of the unit tests in src/claims/codes.rs; the seed corpus is made with it.
    let key = ClaimKey::from_bytes(&(0u8..32).collect::<Vec<_>>());
    let text = String::from_utf8_lossy(data);
    if let Some(id) = key.verify(&text) {
        let code = key.code_for(&id);
        assert!(
            code.eq_ignore_ascii_case(text.trim()),
            "accepted {text:?} for {code}"
        );
    }
});
