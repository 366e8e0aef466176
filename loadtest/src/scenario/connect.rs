//! `connect`: per device TCP, TLS, CONNECT → CONNACK, DISCONNECT, close — as fast as the pace
//! allows. Measures the connect rate and per-phase latencies.

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::run::{dispatch, Pace};
use crate::session::Ctx;
use crate::stats::{Recorder, Report};

/// Runs the scenario over every device in `ctx`, `repeat` times each.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, repeat: usize) -> Result<Report> {
    let devices = ctx.devices.len();
    let attempts = devices * repeat.max(1);
    let rec = Arc::new(Recorder::new(attempts as u64, "connect"));
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
    rec.print_tallies();
    let stats = rec.lock();
    Ok(Report::from_stats("connect", attempts as u64, &stats, took))
}
