//! `bridge`: messages per second and end-to-end latency through a bridge (SPEC §5, §11).
//!
//! Creates a bridge-mode tenant and claims every device (unless `--skip-claim`, e.g. against a
//! mosquitto bridge), subscribes an [observer] to `things/#` on the upstream broker, connects
//! the devices, then lets them all publish `--messages` stamped messages to
//! `things/<CN>/telemetry` at once (QoS 1: up to `--window` in flight each). The observer
//! records send → receive latency and which messages arrived.

mod observer;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::observer::{Observed, Stamp, Upstream, STAMP_LEN};
use crate::api::{self, Api};
use crate::mqtt::{self, Packet};
use crate::pki::{self, claim_code};
use crate::run::{dispatch, Pace};
use crate::session::{Conn, Ctx, Held};
use crate::stats::{Failure, Latency, Recorder, Report};

/// Options of the `bridge` scenario.
#[derive(Args)]
pub struct BridgeArgs {
    /// Lobby API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Operator token, or @FILE to read it.
    #[arg(long, required_unless_present = "skip_claim")]
    admin_token: Option<String>,
    /// Claim key file (64 hex characters).
    #[arg(long, required_unless_present = "skip_claim")]
    claim_key: Option<PathBuf>,
    /// Create no tenant and claim nothing (the server is a plain broker chain).
    #[arg(long)]
    skip_claim: bool,
    /// Upstream broker host: the tenant's endpoint, and where the observer connects.
    #[arg(long, default_value = "localhost")]
    upstream_host: String,
    /// Upstream broker port.
    #[arg(long, default_value_t = 8883)]
    upstream_port: u16,
    /// CA of the upstream broker's server certificate (PEM).
    #[arg(long)]
    upstream_ca: PathBuf,
    /// Client certificate for the upstream broker (the lobby's and the observer's).
    #[arg(long)]
    upstream_cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    upstream_key: PathBuf,
    /// Messages each device publishes.
    #[arg(long, default_value_t = 100)]
    messages: u32,
    /// QoS of the device publishes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload bytes (at least the 20-byte stamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// QoS 1 publishes in flight per device (QoS 0: publishes per write).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=32))]
    window: u16,
    /// The tenant's upstream connections.
    #[arg(long, default_value_t = 4)]
    pool_size: u32,
    /// Claim requests in flight at once.
    #[arg(long, default_value_t = 16)]
    claim_concurrency: usize,
    /// How long to wait for more messages once no new one arrives after the last publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

impl BridgeArgs {
    fn upstream(&self) -> Upstream {
        Upstream {
            host: self.upstream_host.clone(),
            port: self.upstream_port,
            ca: self.upstream_ca.clone(),
            cert: self.upstream_cert.clone(),
            key: self.upstream_key.clone(),
        }
    }
}

/// State shared by the device tasks.
struct Shared {
    rec: Recorder,
    /// Cancelled when every device may start publishing.
    go: CancellationToken,
    /// Per device: publishes written (QoS 0) or acknowledged (QoS 1), in sequence order.
    done: Vec<AtomicU32>,
    /// Publishes written, all devices.
    sent: AtomicU64,
    epoch: Instant,
    run: u32,
    messages: u32,
    qos: u8,
    payload: usize,
    window: usize,
}

/// Runs the scenario over every device in `ctx`.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, args: BridgeArgs) -> Result<Report> {
    let devices = ctx.devices.len();
    if !args.skip_claim {
        setup_tenant(&ctx, &args).await?;
    }
    let count = u32::try_from(devices).context("too many devices")?;
    let shared = Arc::new(Shared {
        rec: Recorder::new(devices as u64, "connect"),
        go: CancellationToken::new(),
        done: (0..devices).map(|_| AtomicU32::new(0)).collect(),
        sent: AtomicU64::new(0),
        epoch: Instant::now(),
        run: rand::random(),
        messages: args.messages,
        qos: args.qos,
        payload: args.payload.max(STAMP_LEN),
        window: usize::from(args.window),
    });
    let conn = observer::connect(&args.upstream(), ctx.timeout).await?;
    eprintln!(
        "observer subscribed to things/# on {}:{}",
        args.upstream_host, args.upstream_port
    );
    let progress = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let seen = Observed::new(count, args.messages, shared.run);
    let watcher = tokio::spawn(observer::observe(
        conn,
        seen,
        shared.epoch,
        stop.clone(),
        progress.clone(),
    ));

    let mut tasks = JoinSet::new();
    let connect_started = Instant::now();
    dispatch(devices, pace, |index, permit| {
        let (ctx, shared) = (ctx.clone(), shared.clone());
        tasks.spawn(async move { device(&ctx, &shared, index, permit).await });
    })
    .await?;
    let connect_time = connect_started.elapsed();
    shared.rec.bar.finish();

    let started = Instant::now();
    shared.go.cancel();
    let total = u64::from(count) * u64::from(args.messages);
    let bar = ProgressBar::new(total).with_prefix("received");
    while tasks.join_next().await.is_some() {}
    drain(&shared, &progress, &bar, args.drain_timeout).await;
    bar.finish();
    stop.cancel();
    let (seen, error) = watcher.await.context("observer task")?;
    if let Some(f) = error {
        eprintln!("observer stopped early: {}: {}", f.phase, f.detail);
    }
    Ok(report(&shared, &seen, connect_time, started))
}

/// Waits until the observer has every message written, or none arrived for `limit`.
async fn drain(shared: &Shared, progress: &AtomicU64, bar: &ProgressBar, limit: Duration) {
    let sent = shared.sent.load(Ordering::Relaxed);
    let (mut last, mut since) = (u64::MAX, Instant::now());
    loop {
        let now = progress.load(Ordering::Relaxed);
        bar.set_position(now);
        if now >= sent || since.elapsed() >= limit {
            return;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report(shared: &Shared, seen: &Observed, connect_time: Duration, started: Instant) -> Report {
    shared.rec.print_tallies();
    let done: Vec<u32> = shared
        .done
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .collect();
    let acked: u64 = done.iter().map(|&d| u64::from(d)).sum();
    let lost: u64 = (0u32..)
        .zip(&done)
        .map(|(device, &upto)| seen.missing(device, upto))
        .sum();
    eprintln!(
        "bridge: {}",
        json!({
            "qos": shared.qos,
            "sent": shared.sent.load(Ordering::Relaxed),
            "acked": acked,
            "received": seen.distinct,
            "duplicates": seen.duplicates,
            "foreign": seen.foreign,
            "lost": lost,
        })
    );
    let stats = shared.rec.lock();
    let devices = shared.done.len() as u64;
    let mut report = Report::from_stats("bridge", devices, &stats, connect_time);
    let span = seen
        .last
        .map(|last| last.saturating_duration_since(started));
    report.messages_per_sec = span
        .map(|s| s.as_secs_f64())
        .filter(|&s| s > 0.0)
        .map(|s| (seen.distinct as f64 / s * 10.0).round() / 10.0);
    report.e2e_ms = Latency::of(&seen.e2e);
    report
}

/// Creates the bridge-mode tenant and claims every device with its token.
async fn setup_tenant(ctx: &Arc<Ctx>, args: &BridgeArgs) -> Result<()> {
    let api = Arc::new(Api::new(&args.api)?);
    let admin = api::read_token(args.admin_token.as_deref().context("--admin-token")?)?;
    let key = pki::read_claim_key(args.claim_key.as_deref().context("--claim-key")?)?;
    // The lobby reads these files itself (it runs on this host), maybe from another directory.
    let path = |p: &PathBuf| -> Result<String> {
        let full = std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?;
        Ok(full.display().to_string())
    };
    let body = json!({
        "name": format!("lt-bridge-{:08x}", rand::random::<u32>()),
        "mode": "bridge",
        "endpoint": args.upstream_host,
        "port": args.upstream_port,
        "backend": {"kind": "none"},
        "bridge": {
            "ca": path(&args.upstream_ca)?,
            "cert": path(&args.upstream_cert)?,
            "key": path(&args.upstream_key)?,
            "topics": ["things/{thing_name}/#"],
            "pool_size": args.pool_size,
        },
    });
    let (tenant, token) = api.create_tenant_from(&admin, &body).await?;
    eprintln!("created bridge tenant {tenant}");
    let token: Arc<str> = token.into();
    let bar = ProgressBar::new(ctx.devices.len() as u64).with_prefix("claim");
    let pace = Pace {
        concurrency: args.claim_concurrency,
        rate: None,
    };
    let mut requests = JoinSet::new();
    dispatch(ctx.devices.len(), pace, |index, permit| {
        let code = claim_code(&key, &ctx.devices[index].device_id);
        let (api, token, bar) = (api.clone(), token.clone(), bar.clone());
        requests.spawn(async move {
            let outcome = api.claim(&token, &code).await;
            bar.inc(1);
            drop(permit);
            outcome.err().map(|f| f.detail)
        });
    })
    .await?;
    let errors: Vec<String> = requests.join_all().await.into_iter().flatten().collect();
    bar.finish();
    if let Some(first) = errors.first() {
        eprintln!("{} claims failed (first: {first})", errors.len());
    }
    Ok(())
}

/// One device: connect, wait for the start, publish, disconnect.
async fn device(ctx: &Ctx, shared: &Shared, index: usize, permit: OwnedSemaphorePermit) {
    let rec = &shared.rec;
    let opened = ctx.open(index).await;
    drop(permit);
    let (mut conn, timings, code) = match opened {
        Ok(ok) => ok,
        Err(failure) => return rec.failed(failure, true),
    };
    rec.connected(&timings, code);
    if code != 0 {
        let detail = format!("CONNACK 0x{code:02X}, not bridged");
        return rec.error_kind(Failure::new("bridge", detail));
    }
    let keep_alive = Duration::from_secs(u64::from(ctx.keep_alive));
    match conn.hold(keep_alive, &shared.go, false).await {
        Ok(Held::Stopped) => {}
        Ok(other) => return rec.error_kind(Failure::new("wait", format!("{other:?}"))),
        Err(failure) => return rec.error_kind(Failure::new("wait", failure.detail)),
    }
    match publish_all(&mut conn, ctx, shared, index).await {
        Ok(()) => conn.close().await,
        Err(failure) => rec.error_kind(failure),
    }
}

/// Publishes the device's messages: QoS 1 keeps up to `window` unacknowledged, QoS 0 writes
/// `window` per write.
async fn publish_all(
    conn: &mut Conn,
    ctx: &Ctx,
    shared: &Shared,
    index: usize,
) -> Result<(), Failure> {
    let topic = format!("things/{}/telemetry", ctx.devices[index].name);
    let mut body = vec![0u8; shared.payload];
    let (mut out, mut window) = (Vec::new(), VecDeque::with_capacity(shared.window));
    let (mut seq, mut pkid) = (0u32, 0u16);
    let done = &shared.done[index];
    loop {
        out.clear();
        let mut batch = 0;
        while seq < shared.messages && window.len() < shared.window && batch < shared.window {
            pkid = pkid % u16::MAX + 1;
            let stamp = Stamp {
                sent_ns: u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX),
                run: shared.run,
                device: index as u32,
                seq,
            };
            stamp.write(&mut body);
            mqtt::publish(&mut out, ctx.version, &topic, shared.qos, pkid, &body);
            if shared.qos == 1 {
                window.push_back(pkid);
            }
            (seq, batch) = (seq + 1, batch + 1);
        }
        if batch > 0 {
            conn.send(&out).await?;
            shared.sent.fetch_add(batch as u64, Ordering::Relaxed);
        }
        if shared.qos == 0 {
            done.store(seq, Ordering::Relaxed);
        } else if !window.is_empty() {
            let acked = read_acks(conn, &mut window, ctx.timeout).await?;
            done.fetch_add(acked, Ordering::Relaxed);
        }
        if seq == shared.messages && window.is_empty() {
            return match shared.qos {
                0 => ping_round_trip(conn, ctx.timeout).await,
                _ => Ok(()),
            };
        }
    }
}

/// QoS 0 has no acknowledgement: a PINGREQ → PINGRESP round trip shows that the server read
/// every publish before it and did not close the connection (e.g. "server busy", which a
/// v3.1.1 client only sees as a close).
async fn ping_round_trip(conn: &mut Conn, limit: Duration) -> Result<(), Failure> {
    conn.send(&mqtt::PINGREQ).await?;
    let wait = async {
        loop {
            let (mut pong, mut disconnect) = (false, None);
            conn.read_batch(|packet| match packet {
                Packet::PingResp => pong = true,
                Packet::Disconnect(reason) => disconnect = Some(reason),
                _ => {}
            })
            .await?;
            if let Some(r) = disconnect {
                return Err(Failure::new("publish", format!("DISCONNECT 0x{r:02X}")));
            }
            if pong {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| Failure::new("pingresp", "timeout"))?
}

/// Waits (up to `limit`) for PUBACKs and takes them off `window`; returns how many.
async fn read_acks(
    conn: &mut Conn,
    window: &mut VecDeque<u16>,
    limit: Duration,
) -> Result<u32, Failure> {
    let mut acked = 0;
    let mut disconnect = None;
    let read = conn.read_batch(|packet| match packet {
        Packet::PubAck(id) => {
            if let Some(at) = window.iter().position(|&p| p == id) {
                window.remove(at);
                acked += 1;
            }
        }
        Packet::Disconnect(reason) => disconnect = Some(reason),
        _ => {}
    });
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| Failure::new("puback", "timeout"))??;
    match disconnect {
        Some(r) => Err(Failure::new("publish", format!("DISCONNECT 0x{r:02X}"))),
        None => Ok(acked),
    }
}
