//! `idle`: open N connections, keep them alive for `--hold`, and (with `--server-pid`) report
//! how much the server's RSS grew per held connection and, apart from it, the kernel memory of
//! the server's ends of the held sockets ([`crate::kernel`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kernel;
use crate::net::rss_bytes;
use crate::run::{dispatch, Pace};
use crate::session::{Ctx, Held};
use crate::stats::{Failure, Recorder, Report};

/// What to hold and what to watch.
#[derive(Clone, Copy, Debug)]
pub struct IdleOpts {
    /// How long to hold all connections once they are open.
    pub hold: Duration,
    /// The server's pid, to read its RSS.
    pub server_pid: Option<u32>,
}

/// Runs the scenario over every device in `ctx`.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, opts: IdleOpts) -> Result<Report> {
    let rss_before = opts.server_pid.map(rss_bytes).transpose()?;
    let kernel_before = match opts.server_pid {
        Some(_) => Some(kernel::snapshot(&ctx.servers)?),
        None => None,
    };
    let devices = ctx.devices.len();
    let rec = Arc::new(Recorder::new(devices as u64, "idle"));
    let held = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    dispatch(devices, pace, |index, permit| {
        let (ctx, rec, held, stop) = (ctx.clone(), rec.clone(), held.clone(), stop.clone());
        tasks.spawn(async move {
            let opened = ctx.open(index).await;
            let (mut conn, timings, code) = match opened {
                Ok(ok) => ok,
                Err(failure) => return rec.failed(failure, true),
            };
            rec.connected(&timings, code);
            if code != 0 {
                return;
            }
            // Counted before the permit is back: the hold starts with every one counted.
            held.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            let keep_alive = Duration::from_secs(u64::from(ctx.keep_alive));
            let outcome = conn.hold(keep_alive, &stop, false).await;
            held.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Ok(Held::Stopped) => conn.close().await,
                Ok(other) => rec.error_kind(Failure::new("hold", format!("{other:?}"))),
                Err(failure) => rec.error_kind(Failure::new("hold", failure.detail)),
            }
        });
    })
    .await?;
    let took = started.elapsed();
    rec.bar.finish();
    let rss_held = hold_and_sample(&held, opts, &ctx).await?;
    let still_held = held.load(Ordering::Relaxed);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    rec.print_tallies();
    let stats = rec.lock();
    let mut report = Report::from_stats("idle", devices as u64, &stats, took);
    if let (Some(before), Some(sample)) = (rss_before, rss_held) {
        let (after, count) = (sample.rss, sample.held);
        eprintln!("server rss: before {before} B, held {after} B over {count} connections");
        report.server_rss_per_conn_bytes =
            (count > 0).then(|| after.saturating_sub(before) / count);
        if let Some(k_before) = &kernel_before {
            report.server_kernel_sock_bytes_per_conn =
                kernel::per_conn(k_before, &sample.kernel, &ctx.servers, count);
        }
    }
    eprintln!("connections still held at the end of the hold: {still_held}");
    Ok(report)
}

/// What was read while holding.
struct Sample {
    /// The server's RSS.
    rss: u64,
    /// `/proc/net/sockstat` and `/proc/slabinfo`.
    kernel: kernel::Snapshot,
    /// Connections held at that moment.
    held: u64,
}

/// Holds for `opts.hold`, sampling the server's RSS and the kernel's socket memory once the
/// connections have settled (after a third of the hold, at most 10 s).
async fn hold_and_sample(held: &AtomicU64, opts: IdleOpts, ctx: &Ctx) -> Result<Option<Sample>> {
    let settle = (opts.hold / 3).min(Duration::from_secs(10));
    eprintln!(
        "holding {} connections for {:?}",
        held.load(Ordering::Relaxed),
        opts.hold
    );
    tokio::time::sleep(settle).await;
    let sample = match opts.server_pid {
        Some(pid) => Some(Sample {
            rss: rss_bytes(pid)?,
            kernel: kernel::snapshot(&ctx.servers)?,
            held: held.load(Ordering::Relaxed),
        }),
        None => None,
    };
    tokio::time::sleep(opts.hold.saturating_sub(settle)).await;
    Ok(sample)
}
