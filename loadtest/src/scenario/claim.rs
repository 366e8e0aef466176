//! `claim`: devices connect and wait subscribed to their own prefix; the harness creates a
//! tenant, claims every waiting device through the API — one `POST /v1/claims` per device, or
//! `POST /v1/claims:batch` with `--claim-batch N` codes each (SPEC §12) — and measures claim
//! request → redirect per device and claims per second over the claim phase.
//!
//! With several `--api` URLs (the nodes of a fleet) the claims are dealt to them in turn, each
//! node with its own `--claim-concurrency` requests in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, MAX_BATCH};
use crate::net::cpu_micros;
use crate::pki::claim_code;
use crate::run::{dispatch, Pace};
use crate::session::{Ctx, Held};
use crate::stats::{Failure, Recorder, Report};

/// Where and how to claim.
pub struct ClaimOpts {
    /// API base URLs; the tenant is created on the first, claims go to each in turn.
    pub apis: Vec<String>,
    /// Operator token.
    pub admin_token: String,
    /// The lobby's claim key.
    pub claim_key: [u8; 32],
    /// Claim requests (batches with `claim_batch`) in flight at once, per API.
    pub claim_concurrency: usize,
    /// Codes per `POST /v1/claims:batch`; 0: one `POST /v1/claims` per device.
    pub claim_batch: usize,
    /// How long to wait for redirects after the last claim.
    pub redirect_timeout: Duration,
    /// Server processes whose CPU over the claim phase is reported.
    pub server_pids: Vec<u32>,
}

/// Per-device state shared between the device tasks and the claimer.
struct Shared {
    rec: Recorder,
    /// Subscribed and waiting: may be claimed.
    ready: Vec<AtomicBool>,
    /// When the claim request (or batch) for a device was about to be sent.
    claimed_at: Vec<OnceLock<Instant>>,
    /// Codes answered 200/201, and the rest.
    claims_ok: AtomicU64,
    claims_failed: AtomicU64,
    /// First claim request sent, last claim answer received.
    window: Mutex<Option<(Instant, Instant)>>,
    stop: CancellationToken,
}

impl Shared {
    /// Widens the claim window to cover a request sent at `sent` and answered at `answered`.
    fn answered(&self, sent: Instant, answered: Instant) {
        let mut window = self.window.lock();
        *window = Some(match *window {
            Some((first, last)) => (first.min(sent), last.max(answered)),
            None => (sent, answered),
        });
    }
}

/// CPU used over the claim phase: the harness itself, and the servers named by pid.
struct CpuWindow {
    started: Instant,
    harness: u64,
    servers: Option<u64>,
}

impl CpuWindow {
    fn start(server_pids: &[u32]) -> Result<Self> {
        Ok(Self {
            started: Instant::now(),
            harness: cpu_micros(std::process::id())?,
            servers: sum_cpu(server_pids)?,
        })
    }

    /// (harness %, servers %) of one core since `start`.
    fn finish(&self, server_pids: &[u32]) -> Result<(f64, Option<f64>)> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-6) * 1e6;
        let pct = |us: u64| (us as f64 / wall * 1000.0).round() / 10.0;
        let harness = cpu_micros(std::process::id())?.saturating_sub(self.harness);
        let servers = match (sum_cpu(server_pids)?, self.servers) {
            (Some(now), Some(before)) => Some(pct(now.saturating_sub(before))),
            _ => None,
        };
        Ok((pct(harness), servers))
    }
}

fn sum_cpu(pids: &[u32]) -> Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter()
        .map(|&pid| cpu_micros(pid))
        .sum::<Result<u64>>()
        .map(Some)
}

/// Runs the scenario over every device in `ctx`.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, opts: ClaimOpts) -> Result<Report> {
    if opts.claim_batch > MAX_BATCH {
        bail!(
            "--claim-batch {} is above the API's limit of {MAX_BATCH}",
            opts.claim_batch
        );
    }
    let apis = opts
        .apis
        .iter()
        .map(|url| Api::new(url).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = apis.first() else {
        bail!("--api is required");
    };
    // Fail fast on API problems, before thousands of devices connect.
    let (tenant, token) = first.create_tenant(&opts.admin_token).await?;
    eprintln!("created tenant {tenant}");
    let devices = ctx.devices.len();
    let shared = Arc::new(Shared {
        rec: Recorder::new(devices as u64, "connect+subscribe"),
        ready: (0..devices).map(|_| AtomicBool::new(false)).collect(),
        claimed_at: (0..devices).map(|_| OnceLock::new()).collect(),
        claims_ok: AtomicU64::new(0),
        claims_failed: AtomicU64::new(0),
        window: Mutex::new(None),
        stop: CancellationToken::new(),
    });
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    dispatch(devices, pace, |index, permit| {
        let (ctx, shared) = (ctx.clone(), shared.clone());
        tasks.spawn(async move { device(&ctx, &shared, index, permit).await });
    })
    .await?;
    let connect_time = started.elapsed();
    shared.rec.bar.finish();

    let cpu = CpuWindow::start(&opts.server_pids)?;
    claim_all(&apis, &token, &shared, &opts, &ctx).await?;
    // Wait until every device is done, or every accepted claim has its redirect (the devices
    // whose claim failed would otherwise hold the run for the whole timeout), or the timeout.
    let deadline = tokio::time::sleep(opts.redirect_timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let accepted = shared.claims_ok.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            next = tasks.join_next() => if next.is_none() { break },
            _ = tick.tick() => if shared.rec.lock().claim.len() >= accepted { break },
        }
    }
    let (harness_cpu, server_cpu) = cpu.finish(&opts.server_pids)?;
    let waiting = tasks.len();
    shared.stop.cancel();
    while tasks.join_next().await.is_some() {}
    shared.rec.print_tallies();
    let stats = shared.rec.lock();
    eprintln!(
        "redirects received: {}, still waiting after {:?}: {waiting}",
        stats.claim.len(),
        opts.redirect_timeout
    );
    let mut report = Report::from_stats("claim", devices as u64, &stats, connect_time);
    let ok = shared.claims_ok.load(Ordering::Relaxed);
    let window = *shared.window.lock();
    report.claims_per_sec = window
        .map(|(first, last)| last.saturating_duration_since(first).as_secs_f64())
        .filter(|secs| *secs > 0.0)
        .map(|secs| (ok as f64 / secs * 10.0).round() / 10.0);
    report.claims_ok = Some(ok);
    report.claims_failed = Some(shared.claims_failed.load(Ordering::Relaxed));
    report.redirects = Some(stats.claim.len());
    report.harness_cpu_pct = Some(harness_cpu);
    report.server_cpu_pct = server_cpu;
    Ok(report)
}

/// One device: connect, subscribe to its prefix, wait for the redirect.
async fn device(
    ctx: &Ctx,
    shared: &Shared,
    index: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let rec = &shared.rec;
    let (mut conn, timings, code) = match ctx.open(index).await {
        Ok(ok) => ok,
        Err(failure) => return rec.failed(failure, true),
    };
    rec.connected(&timings, code);
    if code != 0 {
        return rec.error_kind(Failure::new(
            "claim",
            format!("CONNACK 0x{code:02X} before claim"),
        ));
    }
    let filter = format!("$lobby/devices/{}/#", ctx.devices[index].id_hex());
    match conn.subscribe(&filter, ctx.timeout).await {
        Ok(code) if code < 0x80 => {}
        Ok(code) => {
            return rec.error_kind(Failure::new("subscribe", format!("SUBACK 0x{code:02X}")))
        }
        Err(failure) => return rec.error_kind(failure),
    }
    shared.ready[index].store(true, Ordering::Release);
    drop(permit);
    let keep_alive = Duration::from_secs(u64::from(ctx.keep_alive));
    match conn.hold(keep_alive, &shared.stop, true).await {
        Ok(Held::Redirect(at)) => match shared.claimed_at[index].get() {
            Some(start) => rec.claimed(at.saturating_duration_since(*start)),
            None => rec.error_kind(Failure::new("claim", "redirect before the claim request")),
        },
        Ok(Held::Stopped) => rec.error_kind(Failure::new("claim", "no redirect in time")),
        Ok(Held::Disconnected(r)) => rec.error_kind(Failure::new(
            "claim",
            format!("DISCONNECT 0x{r:02X} while waiting"),
        )),
        Err(failure) => rec.error_kind(Failure::new("claim", failure.detail)),
    }
}

/// Claims every waiting device with the tenant token. The devices are cut into requests (one
/// device each, or `claim_batch`), dealt to the APIs in turn; each API gets its own lane of
/// `claim_concurrency` requests in flight, so a slower node does not take the faster's share.
async fn claim_all(
    apis: &[Arc<Api>],
    token: &str,
    shared: &Arc<Shared>,
    opts: &ClaimOpts,
    ctx: &Arc<Ctx>,
) -> Result<()> {
    let waiting: Vec<usize> = (0..shared.ready.len())
        .filter(|&i| shared.ready[i].load(Ordering::Acquire))
        .collect();
    eprintln!(
        "claiming {} waiting devices through {} API(s){}",
        waiting.len(),
        apis.len(),
        match opts.claim_batch {
            0 => String::new(),
            n => format!(", {n} per batch"),
        }
    );
    let bar = ProgressBar::new(waiting.len() as u64).with_prefix("claim");
    let token: Arc<str> = token.into();
    let requests: Vec<Vec<usize>> = waiting
        .chunks(opts.claim_batch.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    let mut lanes: Vec<Vec<Vec<usize>>> = apis.iter().map(|_| Vec::new()).collect();
    for (n, request) in requests.into_iter().enumerate() {
        lanes[n % apis.len()].push(request);
    }
    let mut running = JoinSet::new();
    for (api, requests) in apis.iter().zip(lanes) {
        let lane = Lane {
            api: api.clone(),
            token: token.clone(),
            shared: shared.clone(),
            ctx: ctx.clone(),
            bar: bar.clone(),
            claim_key: opts.claim_key,
            batch: opts.claim_batch > 0,
        };
        let concurrency = opts.claim_concurrency;
        running.spawn(async move { lane.run(requests, concurrency).await });
    }
    for outcome in running.join_all().await {
        outcome?;
    }
    bar.finish();
    Ok(())
}

/// The claim requests going to one API.
#[derive(Clone)]
struct Lane {
    api: Arc<Api>,
    token: Arc<str>,
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
    bar: ProgressBar,
    claim_key: [u8; 32],
    /// `POST /v1/claims:batch` (else one `POST /v1/claims` per request of one device).
    batch: bool,
}

impl Lane {
    /// Sends `requests` (device indices each), `concurrency` at a time.
    async fn run(self, requests: Vec<Vec<usize>>, concurrency: usize) -> Result<()> {
        let pace = Pace {
            concurrency,
            rate: None,
        };
        let mut inflight = JoinSet::new();
        let mut requests = requests.into_iter();
        dispatch(requests.len(), pace, |_, permit| {
            let (lane, devices) = (self.clone(), requests.next().unwrap_or_default());
            inflight.spawn(async move {
                lane.send(&devices).await;
                drop(permit);
            });
        })
        .await?;
        while inflight.join_next().await.is_some() {}
        Ok(())
    }

    /// One request for `devices`; records each device's outcome.
    async fn send(&self, devices: &[usize]) {
        let shared = &self.shared;
        let codes: Vec<String> = devices
            .iter()
            .map(|&i| claim_code(&self.claim_key, &self.ctx.devices[i].device_id))
            .collect();
        let sent = Instant::now();
        for &i in devices {
            let _ = shared.claimed_at[i].set(sent);
        }
        let outcomes = if self.batch {
            self.api.claim_batch(&self.token, &codes).await
        } else {
            let mut outcomes = Vec::with_capacity(codes.len()); // one code per request here
            for code in &codes {
                outcomes.push(self.api.claim(&self.token, code).await);
            }
            outcomes
        };
        shared.answered(sent, Instant::now());
        for outcome in outcomes {
            match outcome {
                Ok(()) => shared.claims_ok.fetch_add(1, Ordering::Relaxed),
                Err(failure) => {
                    shared.rec.error_kind(failure);
                    shared.claims_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        self.bar.inc(devices.len() as u64);
    }
}
