//! The claims map at fleet sizes: lookups (hit and miss) among 1M and 10M claims, the connect
//! path's one read, and writes (insert of a new claim, update of a held one).
//!
//! `cargo bench --bench claims_map`; figures and method in PERFORMANCE.md. Memory per claim and
//! build time: `cargo run --release --example claims_mem`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use lobby::claims::cache::ClaimsCache;
use lobby::device::DeviceId;
use lobby::model::{Claim, ClaimState};

/// Ids are SHA-256 digests: uniform bits, which the pass-through hasher relies on.
fn id(i: u64) -> DeviceId {
    DeviceId::from_cert_der(&i.to_le_bytes())
}

fn claim(i: u64, tenants: &[Arc<str>]) -> Claim {
    Claim {
        device_id: id(i),
        tenant: Some(tenants[(i % tenants.len() as u64) as usize].clone()),
        state: ClaimState::Ready,
        thing_name: Some(format!("sensor-{i:08}")),
        redirect_id: Some(format!("r-{:024x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15)),
        claimed_at: Some(1_760_000_000_000),
        ready_at: Some(1_760_000_000_005),
        redirected_at: None,
        error: None,
        attempts: 0,
        next_attempt_at: None,
        version: i as i64 + 1,
    }
}

/// As a node that saw the device puts it: its own name known.
fn put(cache: &ClaimsCache, c: Claim) {
    let own = c.thing_name.clone();
    cache.put_claim(&c, own.as_deref());
}

/// The connect path's read: the claim's view, decoded.
fn lookup(cache: &ClaimsCache, id: &DeviceId) -> bool {
    cache.claim(id).is_some()
}

fn map_benches(c: &mut Criterion) {
    let tenants: Vec<Arc<str>> = (0..50)
        .map(|t| Arc::from(format!("tenant-{t:03}")))
        .collect();
    for n in [1_000_000u64, 10_000_000] {
        let cache = ClaimsCache::default();
        for i in 0..n {
            put(&cache, claim(i, &tenants));
        }
        let label = format!("{}M", n / 1_000_000);
        let mut g = c.benchmark_group(format!("claims map {label}"));
        g.sample_size(20).measurement_time(Duration::from_secs(3));
        // Ids hashed beforehand (SHA-256 is not the map's cost), spread over the whole map so
        // most lookups miss the CPU caches as a connect storm's do.
        const PROBES: u64 = 1 << 20;
        let hits: Vec<DeviceId> = (0..PROBES).map(|p| id(p * 7_919 % n)).collect();
        let misses: Vec<DeviceId> = (0..PROBES).map(|p| id(n + p)).collect();
        for (name, probes) in [("lookup hit", &hits), ("lookup miss", &misses)] {
            let mut i = 0;
            g.bench_function(name, |b| {
                b.iter(|| {
                    i = (i + 1) % probes.len();
                    black_box(lookup(&cache, &probes[i]))
                })
            });
        }
        let mut k = 0u64;
        g.bench_function("update", |b| {
            b.iter_batched(
                || {
                    k = (k + 7_919) % n;
                    claim(k, &tenants)
                },
                |c| put(&cache, c),
                BatchSize::SmallInput,
            )
        });
        let mut m = 0u64;
        g.bench_function("insert", |b| {
            b.iter_batched(
                || {
                    m += 1;
                    claim(2 * n + m, &tenants)
                },
                |c| put(&cache, c),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, map_benches);
criterion_main!(benches);
