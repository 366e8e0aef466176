//! `storm`: a reconnect storm. Every device connects and is held (as in `idle`); then every
//! connection drops at once and every device reconnects immediately:
//!
//! - without `--drop-after`, the server goes away (a script kills and restarts it): each device
//!   reconnects as soon as it sees its connection lost, retrying refused connects;
//! - with `--drop-after DUR`, the harness itself closes every connection DUR after all are held
//!   (no DISCONNECT: the sockets just close) and reconnects them; the server keeps running, so
//!   with `--resume` the reconnects can resume their TLS sessions.
//!
//! A failed attempt (refused, reset, handshake failure, timeout, non-zero CONNACK) is retried
//! after 50–200 ms (uniform jitter) until `--deadline` after the first drop. Measures: the storm
//! (first drop → last device connected again), the reconnects' phase latencies, per device its
//! drop → connected again, and with `--server-pid`/`--server-pid-file` the server's CPU per
//! reconnect.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::net::cpu_micros;
use crate::run::{dispatch, Pace};
use crate::session::{Conn, Ctx, Held};
use crate::stats::{histogram, micros, Failure, Latency, Recorder, Report};

/// Options of the `storm` scenario.
#[derive(Clone, Debug)]
pub struct StormOpts {
    /// Drop every connection this long after all are held (else: wait for the server to go).
    pub drop_after: Option<Duration>,
    /// Without `drop_after`: how long to wait, once all are held, for the server to go away.
    pub hold: Duration,
    /// Reconnect attempts stop this long after the first drop.
    pub deadline: Duration,
    /// Reconnects in flight at once during the storm (0: no limit, all at once).
    pub storm_concurrency: usize,
    /// The server's pid (fixed: for `--drop-after`).
    pub server_pid: Option<u32>,
    /// A file holding the server's pid, read before the storm and again after it (a restarted
    /// server has a new pid).
    pub server_pid_file: Option<PathBuf>,
    /// Created once every connect attempt of the first pass is done (the signal to restart).
    pub ready_file: Option<PathBuf>,
}

/// Why a reconnect attempt failed, coarsely: the tally on stderr. `refused`: nothing listens
/// (RST to the SYN); `reset`: reset during TCP connect; `handshake`: the server closed or reset
/// the connection after TCP and before CONNACK (during TLS, or right after the client's side of
/// a TLS 1.3 handshake: the server's check of the client certificate, or its handshake limit);
/// `timeout`: a phase ran past `--timeout`; `connack code`: a CONNACK refusing the device.
fn class(f: &Failure) -> &'static str {
    let d = f.detail.to_ascii_lowercase();
    if d.contains("timeout") || d.contains("timed out") {
        "timeout"
    } else if d.contains("refused") {
        "refused"
    } else if f.phase == "tcp" {
        if d.contains("reset") {
            "reset"
        } else {
            "other"
        }
    } else if f.phase == "storm" {
        "connack code"
    } else if matches!(f.phase, "tls" | "write" | "connack" | "read")
        && [
            "reset",
            "broken pipe",
            "eof",
            "closed",
            "alert",
            "close_notify",
        ]
        .iter()
        .any(|w| d.contains(w))
    {
        "handshake"
    } else {
        "other"
    }
}

/// State the device tasks share during the storm.
struct Storm {
    /// Reconnects: phase latencies, devices connected again, per-kind errors.
    rec: Recorder,
    /// Per device: its connection lost → CONNACK again, µs.
    reconnect: Mutex<Histogram<u64>>,
    /// Failed attempts by [`class`].
    attempts: Mutex<BTreeMap<&'static str, u64>>,
    /// The first and last instants: a connection lost, a device connected again.
    first_drop: Mutex<Option<Instant>>,
    last_up: Mutex<Option<Instant>>,
    /// Devices held before the storm, and those done with it (connected again or given up).
    held: AtomicU64,
    done: AtomicU64,
    /// Reconnects in flight, when limited.
    gate: Option<Arc<Semaphore>>,
    deadline: Duration,
}

impl Storm {
    /// A connection was lost at `at`; returns the instant the reconnects must finish by.
    fn dropped(&self, at: Instant) -> Instant {
        let mut first = self.first_drop.lock();
        let first = *first.get_or_insert(at);
        first + self.deadline
    }

    fn attempt_failed(&self, f: Failure) {
        *self.attempts.lock().entry(class(&f)).or_default() += 1;
        self.rec.error_kind(f);
    }

    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.gate {
            Some(gate) => gate.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Reconnects device `index` (connection lost at `lost`) until it is in or `deadline`.
    async fn reconnect(&self, ctx: &Ctx, index: usize, lost: Instant) -> Option<Conn> {
        let deadline = self.dropped(lost);
        loop {
            let permit = self.permit().await;
            match timeout_at(deadline, ctx.open(index)).await {
                Ok(Ok((conn, timings, 0))) => {
                    let now = Instant::now();
                    self.rec.connected(&timings, 0);
                    self.reconnect.lock().saturating_record(micros(now - lost));
                    let mut last = self.last_up.lock();
                    *last = Some(last.map_or(now, |l| l.max(now)));
                    return Some(conn);
                }
                Ok(Ok((_, _, code))) => {
                    self.attempt_failed(Failure::new("storm", format!("connack 0x{code:02X}")))
                }
                Ok(Err(failure)) => self.attempt_failed(failure),
                Err(_) => break,
            }
            drop(permit);
            let backoff = Duration::from_millis(rand::random_range(50..=200));
            if Instant::now() + backoff >= deadline {
                break;
            }
            sleep(backoff).await;
        }
        let f = Failure::new("storm", "not connected again by the deadline");
        self.rec.failed(f, true);
        None
    }
}

/// Runs the scenario over every device in `ctx`.
pub async fn run(ctx: Arc<Ctx>, pace: Pace, opts: StormOpts) -> Result<Report> {
    let devices = ctx.devices.len();
    let initial = Arc::new(Recorder::new(devices as u64, "connect"));
    let storm = Arc::new(Storm {
        rec: Recorder::new(devices as u64, "storm"),
        reconnect: Mutex::new(histogram()),
        attempts: Mutex::new(BTreeMap::new()),
        first_drop: Mutex::new(None),
        last_up: Mutex::new(None),
        held: AtomicU64::new(0),
        done: AtomicU64::new(0),
        gate: (opts.storm_concurrency > 0)
            .then(|| Arc::new(Semaphore::new(opts.storm_concurrency))),
        deadline: opts.deadline,
    });
    let drop_now = CancellationToken::new();
    let end = CancellationToken::new();
    let mut tasks = JoinSet::new();
    dispatch(devices, pace, |index, permit| {
        let (ctx, initial, storm) = (ctx.clone(), initial.clone(), storm.clone());
        let (drop_now, end) = (drop_now.clone(), end.clone());
        tasks.spawn(async move {
            device(&ctx, index, permit, &initial, &storm, &drop_now, &end).await;
        });
    })
    .await?;
    initial.bar.finish();
    initial.print_tallies();
    let held = storm.held.load(Ordering::Relaxed);
    storm.rec.bar.set_length(held);
    eprintln!("storm: all connect attempts done, {held} of {devices} connections held");
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, format!("{held}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let outcome = trigger_and_wait(&storm, &opts, &drop_now).await;
    end.cancel();
    while tasks.join_next().await.is_some() {}
    let cpu = outcome?;
    storm.rec.bar.finish();
    Ok(report(&storm, devices, cpu))
}

/// One device: connect, hold until the drop, reconnect, hold until the end.
async fn device(
    ctx: &Ctx,
    index: usize,
    permit: OwnedSemaphorePermit,
    initial: &Recorder,
    storm: &Storm,
    drop_now: &CancellationToken,
    end: &CancellationToken,
) {
    let opened = ctx.open(index).await;
    let mut conn = match opened {
        Ok((conn, timings, 0)) => {
            initial.connected(&timings, 0);
            // Counted before the permit is back, so "all attempts done" sees every held one.
            storm.held.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            conn
        }
        Ok((_, timings, code)) => {
            initial.connected(&timings, code);
            return initial.error_kind(Failure::new("connect", format!("connack 0x{code:02X}")));
        }
        Err(failure) => return initial.failed(failure, true),
    };
    let keep_alive = Duration::from_secs(u64::from(ctx.keep_alive));
    let lost = tokio::select! {
        () = end.cancelled() => return conn.close().await,
        outcome = conn.hold(keep_alive, drop_now, false) => match outcome {
            Ok(Held::Stopped) => None, // the harness drops it: the socket just closes
            _ => Some(Instant::now()),  // the server went away
        },
    };
    // A harness drop counts from the instant it was decided (set before the cancel).
    let lost = lost
        .or(*storm.first_drop.lock())
        .unwrap_or_else(Instant::now);
    drop(conn);
    let again = tokio::select! {
        () = end.cancelled() => None,
        again = storm.reconnect(ctx, index, lost) => again,
    };
    storm.done.fetch_add(1, Ordering::Relaxed);
    if let Some(mut conn) = again {
        let _ = conn.hold(keep_alive, end, false).await;
        conn.close().await;
    }
}

/// Drops the connections (`--drop-after`) or waits for the server to go away, then waits for
/// every held device to be done; returns the server CPU (µs) over the storm, if measured.
async fn trigger_and_wait(
    storm: &Storm,
    opts: &StormOpts,
    drop_now: &CancellationToken,
) -> Result<Option<u64>> {
    let held = storm.held.load(Ordering::Relaxed);
    let pid_before = server_pid(opts)?;
    let cpu_before = match (opts.drop_after, pid_before) {
        (Some(_), Some(pid)) => Some(cpu_micros(pid)?),
        _ => None, // a restarted server's CPU is counted from its start
    };
    if let Some(after) = opts.drop_after {
        sleep(after).await;
        eprintln!("storm: dropping {held} connections");
        storm.dropped(Instant::now());
        drop_now.cancel();
    } else {
        eprintln!(
            "storm: waiting up to {:?} for the server to go away",
            opts.hold
        );
        let until = Instant::now() + opts.hold;
        while storm.first_drop.lock().is_none() {
            if Instant::now() >= until {
                bail!("the server did not go away within --hold {:?}", opts.hold);
            }
            sleep(Duration::from_millis(5)).await;
        }
    }
    // Every device gives up by the deadline; one whose connection never dropped would not.
    let until = storm.dropped(Instant::now()) + Duration::from_secs(1);
    while storm.done.load(Ordering::Relaxed) < held && Instant::now() < until {
        sleep(Duration::from_millis(20)).await;
    }
    // Let the server finish the last connects' work before reading its clock.
    sleep(Duration::from_millis(500)).await;
    let Some(pid) = server_pid(opts)? else {
        return Ok(None);
    };
    match (cpu_micros(pid), cpu_before) {
        (Ok(now), Some(before)) if Some(pid) == pid_before => Ok(Some(now.saturating_sub(before))),
        (Ok(now), _) if opts.drop_after.is_none() => {
            eprintln!("server cpu: pid {pid} since its start (startup included): {now} µs");
            Ok(Some(now))
        }
        (Ok(_), _) => {
            eprintln!("server cpu: pid changed during a --drop-after storm: not measured");
            Ok(None)
        }
        (Err(e), _) => {
            eprintln!("server cpu: {e:#} (restarted? give --server-pid-file)");
            Ok(None)
        }
    }
}

/// The server's pid now: from `--server-pid-file` when given, else `--server-pid`.
fn server_pid(opts: &StormOpts) -> Result<Option<u32>> {
    let Some(path) = &opts.server_pid_file else {
        return Ok(opts.server_pid);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pid = text
        .trim()
        .parse()
        .with_context(|| format!("{}: not a pid", path.display()))?;
    Ok(Some(pid))
}

fn report(storm: &Storm, devices: usize, cpu: Option<u64>) -> Report {
    storm.rec.print_tallies();
    let attempts = storm.attempts.lock();
    let tally: Vec<String> = attempts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    eprintln!(
        "storm: failed reconnect attempts: {}",
        if tally.is_empty() {
            "none".to_owned()
        } else {
            tally.join(", ")
        }
    );
    let first = *storm.first_drop.lock();
    let last = *storm.last_up.lock();
    let took = match (first, last) {
        (Some(f), Some(l)) => l.saturating_duration_since(f),
        _ => Duration::ZERO,
    };
    let stats = storm.rec.lock();
    let mut report = Report::from_stats("storm", devices as u64, &stats, took);
    report.failed = devices as u64 - stats.connected;
    report.storm_s = (last.is_some()).then(|| (took.as_secs_f64() * 1000.0).round() / 1000.0);
    report.reconnect_ms = Latency::of(&storm.reconnect.lock());
    report.resumed = Some(stats.resumed);
    report.server_cpu_us_per_connect = cpu
        .filter(|_| stats.connected > 0)
        .map(|us| (us as f64 / stats.connected as f64).round());
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let c = |phase, detail: &str| class(&Failure::new(phase, detail));
        assert_eq!(c("tcp", "Connection refused (os error 111)"), "refused");
        assert_eq!(c("tcp", "Connection reset by peer (os error 104)"), "reset");
        assert_eq!(
            c("tls", "Connection reset by peer (os error 104)"),
            "handshake"
        );
        assert_eq!(c("write", "Broken pipe (os error 32)"), "handshake");
        assert_eq!(c("tls", "timeout"), "timeout");
        assert_eq!(c("tls", "tls handshake eof"), "handshake");
        assert_eq!(c("connack", "closed by server"), "handshake");
        assert_eq!(c("storm", "connack 0x9F"), "connack code");
    }
}
