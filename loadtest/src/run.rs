//! Pacing: starts one task per device, at most `--concurrency` connects in flight (a semaphore
//! permit each) and at most `--rate` starts per second (a token bucket).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Instant};

/// Concurrency and rate limits of the connect phase.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Connect starts per second, if capped.
    pub rate: Option<f64>,
}

/// Token bucket allowing a burst of 50 ms worth of starts.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            burst: (rate / 20.0).max(1.0),
            tokens: 1.0,
            last: Instant::now(),
        }
    }

    async fn take(&mut self) {
        loop {
            let now = Instant::now();
            let refill = (now - self.last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            sleep(Duration::from_secs_f64((1.0 - self.tokens) / self.rate)).await;
        }
    }
}

/// Calls `start(index, permit)` for every index in `0..count`, paced; the started task drops
/// the permit when its connect phase is over. Returns once every permit is back, i.e. every
/// connect attempt has finished (held connections may still be open).
pub async fn dispatch<F>(count: usize, pace: Pace, mut start: F) -> Result<()>
where
    F: FnMut(usize, OwnedSemaphorePermit),
{
    let concurrency = pace.concurrency.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut bucket = pace.rate.filter(|r| *r > 0.0).map(TokenBucket::new);
    for index in 0..count {
        if let Some(bucket) = bucket.as_mut() {
            bucket.take().await;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .context("semaphore closed")?;
        start(index, permit);
    }
    let all = u32::try_from(concurrency).context("--concurrency too large")?;
    let _done = permits
        .acquire_many(all)
        .await
        .context("semaphore closed")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_is_respected() {
        let started = Instant::now();
        let pace = Pace {
            concurrency: 10,
            rate: Some(100.0),
        };
        dispatch(201, pace, |_, permit| drop(permit)).await.unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(took <= Duration::from_millis(2100), "{took:?}");
    }
}
