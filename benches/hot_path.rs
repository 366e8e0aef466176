//! The connect path's CPU work outside TLS: decode CONNECT, device_id from the certificate,
//! one claims-map lookup among 1M claims, the route decision, and encoding the answer.
//!
//! `cargo bench --bench hot_path`; figures and method in PERFORMANCE.md.

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use lobby::claims::cache::ClaimsCache;
use lobby::device::{common_name, DeviceId};
use lobby::model::{Claim, ClaimState, Tenant};
use lobby::mqtt::codec::{self, Connect, Packet, Protocol};
use lobby::route;

fn connect_bytes(protocol: Protocol) -> BytesMut {
    let mut buf = BytesMut::new();
    let c = Connect {
        protocol,
        client_id: "device-0001".into(),
        keep_alive: 60,
        clean_start: true,
        ..Default::default()
    };
    codec::encode(&Packet::Connect(c), protocol, &mut buf).unwrap();
    buf
}

fn claim(i: u64, tenant: &Arc<str>) -> Claim {
    // Real ids are SHA-256 digests: uniform bits, which the pass-through hasher relies on.
    Claim {
        device_id: DeviceId::from_cert_der(&i.to_le_bytes()),
        tenant: Some(tenant.clone()),
        state: ClaimState::Ready,
        thing_name: Some(format!("device-{i}")),
        redirect_id: Some(format!("r-{i:024x}")),
        claimed_at: Some(1),
        ready_at: Some(2),
        redirected_at: None,
        error: None,
        attempts: 0,
        next_attempt_at: None,
        version: 0,
    }
}

fn codec_benches(c: &mut Criterion) {
    for (name, protocol) in [("v4", Protocol::V311), ("v5", Protocol::V5)] {
        let bytes = connect_bytes(protocol);
        c.bench_function(&format!("decode CONNECT {name}"), |b| {
            b.iter(|| {
                let mut buf = bytes.clone();
                black_box(codec::decode(&mut buf, None, 131_072).unwrap())
            })
        });
    }
}

fn identity_benches(c: &mut Criterion) {
    let ca = lobby::pki::throwaway_ca("bench CA").unwrap();
    let der = ca.issue_device("device-0001").unwrap().cert_der;
    c.bench_function("device_id from DER (SHA-256)", |b| {
        b.iter(|| black_box(DeviceId::from_cert_der(black_box(&der))))
    });
    c.bench_function("thing_name from DER (x509 parse)", |b| {
        b.iter(|| black_box(common_name(black_box(&der))))
    });
}

fn lookup_and_route_benches(c: &mut Criterion) {
    let cache = ClaimsCache::default();
    let tenant_id: Arc<str> = Arc::from("acme");
    let n = 1_000_000u64;
    for i in 0..n {
        cache.put_claim(&claim(i, &tenant_id), Some(&format!("device-{i}")));
    }
    let tenant: Tenant = serde_json::from_str(
        r#"{"id":"acme","name":"Acme","endpoint":"iot.acme.example","region":"eu-west-1"}"#,
    )
    .unwrap();
    let probe = claim(n / 2, &tenant_id).device_id;
    let miss = DeviceId::from_cert_der(b"never claimed");
    c.bench_function("claims map lookup, same key (1M claims)", |b| {
        b.iter(|| black_box(cache.claim(black_box(&probe))))
    });
    // Cycling through 100k claimed ids defeats the CPU cache, as a connect storm does.
    let probes: Vec<DeviceId> = (0..100_000u64)
        .map(|i| claim(i * 7 % n, &tenant_id).device_id)
        .collect();
    c.bench_function("claims map lookup, random hit (1M claims)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % probes.len();
            black_box(cache.claim(black_box(&probes[i])))
        })
    });
    c.bench_function("claims map lookup, miss (1M claims)", |b| {
        b.iter(|| black_box(cache.claim(black_box(&miss))))
    });
    let found = cache.claim(&probe).unwrap();
    c.bench_function("route decision (redirect)", |b| {
        b.iter(|| black_box(route::decide(Some(&found), Some(&tenant), "device-0001")))
    });
    let route::Route::Redirect(r) = route::decide(Some(&found), Some(&tenant), "device-0001")
    else {
        panic!("expected a redirect")
    };
    let connack = Packet::ConnAck(codec::ConnAck {
        session_present: false,
        code: 0x9D,
        properties: codec::ConnAckProperties {
            server_reference: Some(r.server_reference()),
            user_properties: vec![
                ("tenant".into(), r.tenant.to_string()),
                ("thing_name".into(), r.thing_name.clone()),
                ("redirect_id".into(), r.redirect_id.clone()),
            ],
            ..Default::default()
        },
    });
    c.bench_function("encode CONNACK 0x9D + Server Reference (v5)", |b| {
        let mut buf = BytesMut::with_capacity(256);
        b.iter(|| {
            buf.clear();
            codec::encode(black_box(&connack), Protocol::V5, &mut buf).unwrap();
            black_box(buf.len())
        })
    });
    c.bench_function("redirect payload (JSON)", |b| {
        b.iter(|| black_box(route::redirect_payload(&probe, &r)))
    });
}

/// Resident memory of this process, from /proc (Linux), in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// 10M claims: lookup cost at that size, and memory per claim (printed; RSS delta / claims).
fn ten_million_benches(c: &mut Criterion) {
    let n = 10_000_000u64;
    let tenant_id: Arc<str> = Arc::from("acme");
    let before = rss();
    let cache = ClaimsCache::default();
    let started = std::time::Instant::now();
    for i in 0..n {
        cache.put_claim(&claim(i, &tenant_id), Some(&format!("device-{i}")));
    }
    let took = started.elapsed();
    let per_claim = (rss().saturating_sub(before)) / n;
    eprintln!("10M claims: inserted in {took:?}, {per_claim} bytes of RSS per claim");
    let probes: Vec<DeviceId> = (0..100_000u64)
        .map(|i| claim(i * 97 % n, &tenant_id).device_id)
        .collect();
    c.bench_function("claims map lookup, random hit (10M claims)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % probes.len();
            black_box(cache.claim(black_box(&probes[i])))
        })
    });
}

criterion_group!(
    benches,
    codec_benches,
    identity_benches,
    lookup_and_route_benches,
    ten_million_benches
);
criterion_main!(benches);
