//! Results: HDR histograms (microseconds), counters, error kinds, the progress bar, and the JSON
//! report that is the last line on stdout (SPEC §11).

use parking_lot::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Time spent in each phase of one connect.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// TCP connect.
    pub tcp: Duration,
    /// TLS handshake.
    pub tls: Duration,
    /// CONNECT sent → CONNACK received.
    pub connack: Duration,
    /// The TLS handshake resumed a session (no certificate exchange).
    pub resumed: bool,
}

/// Why one device failed: the phase and a short, low-cardinality description.
#[derive(Debug)]
pub struct Failure {
    /// `tcp`, `tls`, `connack`, `subscribe`, `wait`, `claim`…
    pub phase: &'static str,
    /// What went wrong, e.g. `Connection refused (os error 111)` or `timeout`.
    pub detail: String,
}

impl Failure {
    /// A failure in `phase`.
    pub fn new(phase: &'static str, detail: impl ToString) -> Self {
        Self {
            phase,
            detail: detail.to_string(),
        }
    }
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; the bounds are valid constants.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// Everything measured so far.
pub struct Stats {
    /// Per-phase connect latencies.
    pub tcp: Histogram<u64>,
    /// TLS handshake latencies.
    pub tls: Histogram<u64>,
    /// CONNECT → CONNACK latencies.
    pub connack: Histogram<u64>,
    /// Claim request → redirect latencies.
    pub claim: Histogram<u64>,
    /// Devices that got a CONNACK (success, or v5 0x9D).
    pub connected: u64,
    /// Devices that failed.
    pub failed: u64,
    /// Connects whose TLS handshake resumed a session.
    pub resumed: u64,
    /// Non-zero CONNACK codes that still counted as connected (v5 0x9D redirects).
    pub redirected: BTreeMap<u8, u64>,
    /// Failure kinds → count.
    pub errors: BTreeMap<String, u64>,
}

/// Shared recorder: one lock around [`Stats`] (held for microseconds) and the progress bar.
pub struct Recorder {
    stats: Mutex<Stats>,
    /// Progress on stderr: one tick per device attempt.
    pub bar: ProgressBar,
}

impl Recorder {
    /// A recorder for `devices` attempts.
    pub fn new(devices: u64, label: &str) -> Self {
        let bar = ProgressBar::new(devices);
        let style = ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        Self {
            stats: Mutex::new(Stats {
                tcp: histogram(),
                tls: histogram(),
                connack: histogram(),
                claim: histogram(),
                connected: 0,
                failed: 0,
                resumed: 0,
                redirected: BTreeMap::new(),
                errors: BTreeMap::new(),
            }),
            bar,
        }
    }

    /// Locks the stats (a poisoned lock is still usable: counters only).
    pub fn lock(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock()
    }

    /// A device got its CONNACK with `code`.
    pub fn connected(&self, t: &Timings, code: u8) {
        let mut s = self.lock();
        s.tcp.saturating_record(micros(t.tcp));
        s.tls.saturating_record(micros(t.tls));
        s.connack.saturating_record(micros(t.connack));
        s.connected += 1;
        s.resumed += u64::from(t.resumed);
        if code != 0 {
            *s.redirected.entry(code).or_default() += 1;
        }
        drop(s);
        self.bar.inc(1);
    }

    /// A device failed to connect (`tick`: it also counts as an attempt on the bar).
    pub fn failed(&self, f: Failure, tick: bool) {
        let mut s = self.lock();
        s.failed += 1;
        *s.errors
            .entry(format!("{}: {}", f.phase, f.detail))
            .or_default() += 1;
        drop(s);
        if tick {
            self.bar.inc(1);
        }
    }

    /// Records a failure kind without counting a failed device (e.g. a later phase).
    pub fn error_kind(&self, f: Failure) {
        *self
            .lock()
            .errors
            .entry(format!("{}: {}", f.phase, f.detail))
            .or_default() += 1;
    }

    /// A claim request → redirect latency.
    pub fn claimed(&self, latency: Duration) {
        self.lock().claim.saturating_record(micros(latency));
    }

    /// Prints the error and redirect tallies to stderr.
    pub fn print_tallies(&self) {
        let s = self.lock();
        for (code, n) in &s.redirected {
            eprintln!("connack code 0x{code:02X} (counted as connected): {n}");
        }
        for (kind, n) in &s.errors {
            eprintln!("error {kind}: {n}");
        }
    }
}

/// Microseconds, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Percentiles of one latency in milliseconds.
#[derive(Serialize, Debug)]
pub struct Latency {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    /// From a histogram of microseconds; `None` when empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        let ms = |us: u64| us as f64 / 1000.0; // whole µs: exactly 3 decimals
        (!h.is_empty()).then(|| Self {
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        })
    }
}

/// Connect-phase latencies.
#[derive(Serialize, Debug)]
pub struct PhaseLatency {
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connack: Option<Latency>,
}

/// The result line (SPEC §11); fields that do not apply are left out.
#[derive(Serialize, Debug)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Devices attempted.
    pub devices: u64,
    /// Devices that got a CONNACK.
    pub connected: u64,
    /// Devices that failed.
    pub failed: u64,
    /// Successful connects per second over the connect phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_sec: Option<f64>,
    /// Connect-phase latencies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<PhaseLatency>,
    /// Claim request → redirect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_to_redirect_ms: Option<Latency>,
    /// Bridge throughput: messages the observer received per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_sec: Option<f64>,
    /// Bridge end-to-end latency, device send → observer receive (extension of SPEC §11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e_ms: Option<Latency>,
    /// Server RSS growth per held connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_per_conn_bytes: Option<u64>,
    /// Kernel memory (socket buffers and socket slab objects) per held connection, server
    /// side only (SPEC §12; see `kernel.rs` for how it is attributed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_kernel_sock_bytes_per_conn: Option<u64>,
    /// Connects whose TLS handshake resumed a session (with `--resume`; an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<u64>,
    /// The server's CPU time (utime + stime) per connect over the measured phase (with
    /// `--server-pid`; an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_connect: Option<f64>,
    /// Claims answered 200/201 per second, from the first claim request sent to the last claim
    /// answer (SPEC §12).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims_per_sec: Option<f64>,
    /// Claims answered 200/201 (per code with `--claim-batch`; an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims_ok: Option<u64>,
    /// Claims that failed: transport error or any other status (an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims_failed: Option<u64>,
    /// Devices that received their redirect (an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirects: Option<u64>,
    /// The harness's own CPU (utime + stime) over the claim phase, in % of one core: near
    /// 100 × cores, the harness rather than the server sets the pace (an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub harness_cpu_pct: Option<f64>,
    /// The CPU of the `--server-pid` processes over the claim phase, summed, in % of one core
    /// (an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_pct: Option<f64>,
    /// Storm: first connection lost → last device connected again, in seconds (an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm_s: Option<f64>,
    /// Storm: per device, its connection lost → connected again (an extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_ms: Option<Latency>,
}

impl Report {
    /// The common part: counts, connect rate over `connect_time`, latencies.
    pub fn from_stats(
        scenario: &'static str,
        devices: u64,
        s: &Stats,
        connect_time: Duration,
    ) -> Self {
        let secs = connect_time.as_secs_f64();
        let rate = (secs > 0.0).then(|| (s.connected as f64 / secs * 10.0).round() / 10.0);
        let latency = PhaseLatency {
            tcp: Latency::of(&s.tcp),
            tls: Latency::of(&s.tls),
            connack: Latency::of(&s.connack),
        };
        Self {
            scenario,
            devices,
            connected: s.connected,
            failed: s.failed,
            connects_per_sec: rate,
            latency_ms: (s.connected > 0).then_some(latency),
            claim_to_redirect_ms: Latency::of(&s.claim),
            messages_per_sec: None,
            e2e_ms: None,
            server_rss_per_conn_bytes: None,
            server_kernel_sock_bytes_per_conn: None,
            resumed: None,
            server_cpu_us_per_connect: None,
            claims_per_sec: None,
            claims_ok: None,
            claims_failed: None,
            redirects: None,
            harness_cpu_pct: None,
            server_cpu_pct: None,
            storm_s: None,
            reconnect_ms: None,
        }
    }
}
