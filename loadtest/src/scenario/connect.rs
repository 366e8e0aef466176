//! `connect`: per device TCP, TLS, CONNECT → CONNACK, DISCONNECT, close — as fast as the pace
//! allows. Measures the connect rate and per-phase latencies, and with `--server-pid` the
//! server's CPU time per connect.
//!
//! With `--resume`, a warm-up pass first gives every device one full handshake (and so a
//! session ticket); the measured pass then reconnects devices that can resume.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::net::cpu_micros;
use crate::run::{dispatch, Pace};
use crate::session::Ctx;
use crate::stats::{Recorder, Report};

/// Options of the `connect` scenario.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOpts {
    /// Connects per device in the measured pass.
    pub repeat: usize,
    /// The server's pid: report its CPU time per connect.
    pub server_pid: Option<u32>,
}

/// Runs the scenario over every device in `ctx`.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, opts: ConnectOpts) -> Result<Report> {
    let resume = ctx.tls.resumes();
    if resume {
        let (warm, _) = pass(&ctx, pace, 1, "warm-up").await?;
        let s = warm.lock();
        eprintln!(
            "warm-up: {} devices connected, {} failed",
            s.connected, s.failed
        );
    }
    let cpu_before = opts.server_pid.map(cpu_micros).transpose()?;
    let (rec, took) = pass(&ctx, pace, opts.repeat.max(1), "connect").await?;
    rec.print_tallies();
    let attempts = (ctx.devices.len() * opts.repeat.max(1)) as u64;
    let (mut report, connected) = {
        let stats = rec.lock();
        let mut report = Report::from_stats("connect", attempts, &stats, took);
        report.resumed = resume.then_some(stats.resumed);
        (report, stats.connected)
    };
    if let (Some(pid), Some(before)) = (opts.server_pid, cpu_before) {
        // Let the server finish the last closes before reading its clock.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used = cpu_micros(pid)?.saturating_sub(before);
        report.server_cpu_us_per_connect =
            (connected > 0).then(|| (used as f64 / connected as f64).round());
    }
    Ok(report)
}

/// One pass: every device connects `repeat` times. Returns the recorder and the time the
/// pass took.
async fn pass(
    ctx: &Arc<Ctx>,
    pace: Pace,
    repeat: usize,
    label: &str,
) -> Result<(Arc<Recorder>, Duration)> {
    let devices = ctx.devices.len();
    let attempts = devices * repeat;
    let rec = Arc::new(Recorder::new(attempts as u64, label));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    dispatch(attempts, pace, |attempt, permit| {
        let (ctx, rec) = (ctx.clone(), rec.clone());
        tasks.spawn(async move {
            match ctx.open(attempt % devices).await {
                Ok((conn, timings, code)) => {
                    rec.connected(&timings, code);
                    if code == 0 {
                        conn.close().await;
                    }
                }
                Err(failure) => rec.failed(failure, true),
            }
            drop(permit);
        });
    })
    .await?;
    let took = started.elapsed();
    while tasks.join_next().await.is_some() {}
    rec.bar.finish();
    Ok((rec, took))
}
