//! Token buckets per source address: new device connections (`limits.connect_rate_per_address`)
//! and API requests (`api.rate_limit`). One short mutex per check. The map forgets addresses
//! whose bucket has refilled, in sweeps that run when it has doubled since the last one (so a
//! check costs O(1) amortized, never a scan per connection), and never holds more than
//! [`MAX_ADDRESSES`]: past that, a sweep also forgets an arbitrary eighth of the rest (an
//! address forgotten early gets a fresh burst, which bounds what it gains). Also the
//! per-device publish pace ([`Pace`]).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;

use tokio::time::Instant;

/// Addresses kept before the first sweep of refilled buckets.
const SWEEP_AT: usize = 4096;
/// Addresses tracked at most (about 50 bytes each: a few MB). A scan from more addresses
/// than this within a refill time (`burst / rate`) has some of them forgotten early.
pub const MAX_ADDRESSES: usize = 65_536;

/// A token bucket per address: `burst` at once, then `rate` per second. A rate of 0 is off.
#[derive(Debug)]
pub struct AddressLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    map: HashMap<IpAddr, (f64, Instant)>,
    /// The size at which the next sweep runs.
    sweep_at: usize,
}

impl AddressLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                sweep_at: SWEEP_AT,
            }),
        }
    }

    /// Whether limiting is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// May `addr` go ahead now? Spends a token when it may.
    pub fn allow(&self, addr: IpAddr) -> bool {
        if !self.enabled() {
            return true;
        }
        let now = Instant::now();
        let mut b = self.buckets.lock();
        if b.map.len() >= b.sweep_at && !b.map.contains_key(&addr) {
            self.sweep(&mut b, now);
        }
        let (tokens, at) = b.map.entry(addr).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets refilled buckets (they hold nothing a fresh one would not), then, above
    /// `MAX_ADDRESSES`, an eighth of the rest. The next sweep waits until the map doubles.
    fn sweep(&self, b: &mut Buckets, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        b.map.retain(|_, (tokens, at)| {
            *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
        });
        if b.map.len() >= MAX_ADDRESSES {
            let forget: Vec<IpAddr> = b.map.keys().take(MAX_ADDRESSES / 8).copied().collect();
            for addr in &forget {
                b.map.remove(addr);
            }
        }
        b.sweep_at = (b.map.len() * 2).clamp(SWEEP_AT, MAX_ADDRESSES);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().map.len()
    }
}

/// One device's pace (`limits.publish_rate`, `limits.publish_bytes_rate`): a token bucket of
/// one second's worth that may go into debt. The packet that empties it is still served; the
/// caller then reads nothing more until [`Pace::spend`]'s instant, when the debt is repaid.
#[derive(Debug, Clone)]
pub struct Pace {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    /// A bucket of `rate` per second, full; `None` when the rate is 0 (off).
    pub fn new(rate: f64) -> Option<Self> {
        (rate > 0.0 && rate.is_finite()).then(|| Self {
            rate,
            tokens: rate.max(1.0),
            at: Instant::now(),
        })
    }

    /// Spends `cost` now; when that leaves the bucket in debt, returns when it is repaid.
    pub fn spend(&mut self, cost: f64) -> Option<Instant> {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate.max(1.0)) - cost;
        self.at = now;
        // Saturating: a tiny configured rate must not overflow the clock (at most a day's wait).
        (self.tokens < 0.0).then(|| {
            let wait = std::time::Duration::try_from_secs_f64(-self.tokens / self.rate)
                .unwrap_or(crate::config::MAX_PACE_WAIT);
            now + wait.min(crate::config::MAX_PACE_WAIT)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tiny_rate_waits_at_most_a_day() {
        let mut p = Pace::new(1e-300).unwrap();
        let now = Instant::now();
        let until = p.spend(1e6).expect("in debt");
        assert!(until - now <= crate::config::MAX_PACE_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let l = AddressLimiter::new(2.0, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!((0..3).all(|_| l.allow(a)));
        assert!(!l.allow(a), "burst spent");
        assert!(l.allow(b), "other addresses have their own bucket");
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert!(l.allow(a), "one token back after 1/rate");
        assert!(!l.allow(a));
        let off = AddressLimiter::new(0.0, 1);
        assert!((0..100).all(|_| off.allow(a)));
    }

    fn addr(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + i))
    }

    /// A scan from many addresses keeps its buckets (none refills: rate 1/1000 s) but never
    /// more than `MAX_ADDRESSES`, and sweeps stay rare: not one per connection.
    #[tokio::test(start_paused = true)]
    async fn the_map_is_bounded_and_swept_rarely() {
        let l = AddressLimiter::new(0.001, 2);
        let mut sweeps = 0;
        let mut last = 0;
        for i in 0..(4 * MAX_ADDRESSES as u32) {
            assert!(l.allow(addr(i)));
            let now = l.tracked();
            assert!(now <= MAX_ADDRESSES, "{now} addresses tracked");
            if now < last {
                sweeps += 1;
            }
            last = now;
        }
        assert!(
            sweeps < 40,
            "{sweeps} sweeps for {} addresses",
            4 * MAX_ADDRESSES
        );
        // An address seen again is still limited (its bucket kept or, if forgotten, fresh).
        let a = addr(4 * MAX_ADDRESSES as u32 - 1);
        assert!(l.allow(a));
        assert!(!l.allow(a), "burst of 2 spent");
    }

    /// Refilled buckets are what a sweep forgets first.
    #[tokio::test(start_paused = true)]
    async fn refilled_buckets_are_forgotten() {
        let l = AddressLimiter::new(10.0, 1);
        for i in 0..SWEEP_AT as u32 {
            assert!(l.allow(addr(i)));
        }
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(l.allow(addr(1 << 20)));
        assert_eq!(l.tracked(), 1, "all refilled: swept out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pace_serves_a_second_worth_then_owes() {
        assert!(Pace::new(0.0).is_none(), "0 is off");
        let mut p = Pace::new(2.0).unwrap();
        assert_eq!(p.spend(1.0), None);
        assert_eq!(p.spend(1.0), None, "a burst of one second's worth");
        let start = Instant::now();
        let until = p.spend(1.0).expect("in debt");
        assert_eq!(until - start, std::time::Duration::from_millis(500));
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        let until = p.spend(1.0).expect("repaid, then in debt again");
        assert_eq!(
            until - Instant::now(),
            std::time::Duration::from_millis(500)
        );
        // Bytes: one packet larger than a second's worth is served, then waits its cost.
        let mut b = Pace::new(1000.0).unwrap();
        let start = Instant::now();
        let until = b.spend(3000.0).unwrap();
        assert_eq!(until - start, std::time::Duration::from_secs(2));
    }
}
