//! Token buckets per source address: new device connections (`limits.connect_rate_per_address`)
//! and API requests (`api.rate_limit`). One short mutex per check; the map forgets addresses
//! whose bucket has refilled, so a scan from many addresses does not grow it for long.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

/// Addresses kept before full buckets are swept out.
const SWEEP_AT: usize = 4096;

/// A token bucket per address: `burst` at once, then `rate` per second. A rate of 0 is off.
#[derive(Debug)]
pub struct AddressLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl AddressLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
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
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= SWEEP_AT {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(addr).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
