//! Bytes and build time of the claims map: fills a `ClaimsCache` with N realistic claims and
//! prints the RSS slope per claim (/proc/self/statm before and after) and the build time.
//!
//! ```sh
//! cargo run --release --example claims_mem -- 1000000 10000000
//! ```
//!
//! The mix: 89% ready with a redirect id and the device's own thing name, 1% ready with another
//! name (an AWS template's), 4% ready named by the device id, 3% registering, 1% failed, 1%
//! claimed unnamed, 1% revoked while unclaimed; 50 tenants.

use std::sync::Arc;
use std::time::Instant;

use lobby::claims::cache::ClaimsCache;
use lobby::device::DeviceId;
use lobby::model::{Claim, ClaimState};
use rand::RngCore;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Claim `i` of the mix, and the device's own thing name.
fn claim(i: u64, tenants: &[Arc<str>], rng: &mut impl RngCore) -> (Claim, String) {
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    let device_id = DeviceId(id);
    let own = format!("sensor-{i:08}");
    let mut redirect = [0u8; 12];
    rng.fill_bytes(&mut redirect);
    let now = 1_760_000_000_000 + i as i64;
    let mut c = Claim {
        device_id,
        tenant: Some(tenants[(i % tenants.len() as u64) as usize].clone()),
        state: ClaimState::Ready,
        thing_name: Some(own.clone()),
        redirect_id: Some(format!("r-{}", hex::encode(redirect))),
        claimed_at: Some(now),
        ready_at: Some(now + 5),
        redirected_at: (i % 2 == 0).then_some(now + 9),
        error: None,
        attempts: 0,
        next_attempt_at: None,
        version: i as i64 + 1,
    };
    match i % 100 {
        0..=88 => {}
        // An AWS thing-name template's name: neither its own nor its id, held whole.
        89 => c.thing_name = Some(format!("acme-thing-{i}")),
        90..=93 => c.thing_name = Some(device_id.to_hex()),
        94..=96 => {
            c.state = ClaimState::Registering;
            c.redirect_id = None;
            c.ready_at = None;
        }
        97 => {
            c.state = ClaimState::Failed;
            c.redirect_id = None;
            c.ready_at = None;
            c.error = Some("AccessDenied: the role cannot be assumed".into());
            c.attempts = 3;
        }
        98 => c.thing_name = None,
        _ => c = Claim::revoked(device_id),
    }
    (c, own)
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("N: a number of claims"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000_000]
    } else {
        sizes
    };
    let tenants: Vec<Arc<str>> = (0..50)
        .map(|t| Arc::from(format!("tenant-{t:03}")))
        .collect();
    for n in sizes {
        // Generating a claim is timed alone first, and taken off the build time.
        let mut rng = rand::rng();
        let started = Instant::now();
        for i in 0..n {
            std::hint::black_box(claim(i, &tenants, &mut rng));
        }
        let generating = started.elapsed();
        let before = rss_bytes();
        let cache = ClaimsCache::default();
        let started = Instant::now();
        for i in 0..n {
            let (c, own) = claim(i, &tenants, &mut rng);
            put(&cache, c, &own);
        }
        let built = started.elapsed().saturating_sub(generating);
        let after = rss_bytes();
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        println!(
            "claims {n:>9}: {per:6.1} bytes/claim (RSS slope), build {built:.2?} ({:.0} ns/claim), {} held",
            built.as_nanos() as f64 / n as f64,
            cache.claim_count()
        );
        drop(cache);
    }
}

/// Half as a node that saw the device puts it (its own name known), half as loaded from the
/// store at start (not known yet).
fn put(cache: &ClaimsCache, c: Claim, own: &str) {
    let seen = c.version % 2 == 0 || c.thing_name.as_deref().is_some_and(|n| n != own);
    cache.put_claim(&c, seen.then_some(own));
}
