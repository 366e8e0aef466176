//! `claim`: devices connect and wait subscribed to their own prefix; the harness creates a
//! tenant, claims every waiting device through the API and measures claim request → redirect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Result;
use indicatif::ProgressBar;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::pki::claim_code;
use crate::run::{dispatch, Pace};
use crate::session::{Ctx, Held};
use crate::stats::{Failure, Recorder, Report};

/// Where and how to claim.
pub struct ClaimOpts {
    /// API base URL.
    pub api: String,
    /// Operator token.
    pub admin_token: String,
    /// The lobby's claim key.
    pub claim_key: [u8; 32],
    /// Claim requests in flight at once.
    pub claim_concurrency: usize,
    /// How long to wait for redirects after the last claim.
    pub redirect_timeout: Duration,
}

/// Per-device state shared between the device tasks and the claimer.
struct Shared {
    rec: Recorder,
    /// Subscribed and waiting: may be claimed.
    ready: Vec<AtomicBool>,
    /// When the claim request for a device was about to be sent.
    claimed_at: Vec<OnceLock<Instant>>,
    stop: CancellationToken,
}

/// Runs the scenario over every device in `ctx`.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, opts: ClaimOpts) -> Result<Report> {
    // Fail fast on API problems, before thousands of devices connect.
    let api = Arc::new(Api::new(&opts.api)?);
    let (tenant, token) = api.create_tenant(&opts.admin_token).await?;
    eprintln!("created tenant {tenant}");
    let devices = ctx.devices.len();
    let shared = Arc::new(Shared {
        rec: Recorder::new(devices as u64, "connect+subscribe"),
        ready: (0..devices).map(|_| AtomicBool::new(false)).collect(),
        claimed_at: (0..devices).map(|_| OnceLock::new()).collect(),
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

    claim_all(&api, &token, &shared, &opts, &ctx).await?;
    let deadline = tokio::time::sleep(opts.redirect_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            next = tasks.join_next() => if next.is_none() { break },
        }
    }
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
    Ok(Report::from_stats(
        "claim",
        devices as u64,
        &stats,
        connect_time,
    ))
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

/// Claims every waiting device with the tenant token, `claim_concurrency` requests at a time.
async fn claim_all(
    api: &Arc<Api>,
    token: &str,
    shared: &Arc<Shared>,
    opts: &ClaimOpts,
    ctx: &Arc<Ctx>,
) -> Result<()> {
    let waiting: Vec<usize> = (0..shared.ready.len())
        .filter(|&i| shared.ready[i].load(Ordering::Acquire))
        .collect();
    eprintln!("claiming {} waiting devices", waiting.len());
    let bar = ProgressBar::new(waiting.len() as u64).with_prefix("claim");
    let token: Arc<str> = token.into();
    let pace = Pace {
        concurrency: opts.claim_concurrency,
        rate: None,
    };
    let mut requests = JoinSet::new();
    dispatch(waiting.len(), pace, |n, permit| {
        let index = waiting[n];
        let code = claim_code(&opts.claim_key, &ctx.devices[index].device_id);
        let (api, token, shared, bar) = (api.clone(), token.clone(), shared.clone(), bar.clone());
        requests.spawn(async move {
            let _ = shared.claimed_at[index].set(Instant::now());
            if let Err(failure) = api.claim(&token, &code).await {
                shared.rec.error_kind(failure);
            }
            bar.inc(1);
            drop(permit);
        });
    })
    .await?;
    while requests.join_next().await.is_some() {}
    bar.finish();
    Ok(())
}
