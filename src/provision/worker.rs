//! The provisioning worker: drains the registration and clean-up queues (stored state), one
//! task per job, with a call rate per AWS account and region, exponential backoff with jitter
//! for retryable failures, and `failed` with the AWS error code for permanent ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{IotApiFactory, IotError, Job};
use crate::claims::error::ServiceError;
use crate::claims::events::ClaimEvent;
use crate::claims::service::ClaimsService;
use crate::device::DeviceId;
use crate::model::{AwsIotBackend, Backend, ClaimState};
use crate::store::{Store, StoreError};

mod retire;
mod steps;

/// Jobs running at once (each is paced by its tenant's rate anyway).
const MAX_JOBS: usize = 64;

/// Retry pacing for retryable failures.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// How long a job is retried before it fails with its last error (`aws.retry_give_up`).
    pub give_up: Duration,
}

impl Backoff {
    /// The delay before attempt `n` (0-based): exponential, capped, with jitter in [½, 1].
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(20));
        let cap = exp.min(self.max);
        cap.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// Paces calls per AWS account and region (AWS's limits are per account and region, whichever
/// tenant calls): a token bucket of `rate` tokens refilled at `rate` per second, so a lone
/// registration runs at once and a burst is held to `rate` calls per second. This is the
/// bucket of a node alone on its store; a fleet shares one in the store (`Fleet::pace_slot`).
#[derive(Default)]
struct Pacer {
    next: Mutex<HashMap<String, Instant>>,
}

/// The pacing bucket of a backend: its role's account and its region (the role ARN when it
/// names no account).
fn pace_key(backend: &AwsIotBackend) -> String {
    let account = super::arn_account(&backend.role_arn);
    let account = if account.is_empty() {
        &backend.role_arn
    } else {
        account
    };
    format!("{account}/{}", backend.region)
}

impl Pacer {
    async fn wait(&self, key: &str, rate: u32) {
        let interval = Duration::from_secs(1) / rate.max(1);
        let slot = {
            let mut next = self.next.lock();
            let now = Instant::now();
            // Unused capacity of the last second (at most `rate` calls) may be spent now.
            let earliest = now
                .checked_sub(Duration::from_secs(1).saturating_sub(interval))
                .unwrap_or(now);
            let slot = next.get(key).copied().unwrap_or(earliest).max(earliest);
            next.insert(key.to_owned(), slot + interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// Drains provisioning jobs. Cheap `Clone`.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    service: ClaimsService,
    store: Arc<dyn Store>,
    factory: Arc<dyn IotApiFactory>,
    backoff: Backoff,
    pacer: Pacer,
    /// Devices with a job running → their jobs waiting behind it.
    running: Mutex<HashMap<DeviceId, VecDeque<Job>>>,
    /// With a shared store: how long this node's claim on a job lasts unrenewed.
    lease: Duration,
    cancel: CancellationToken,
}

fn store_err(e: StoreError) -> IotError {
    IotError::Retryable {
        code: super::STORE_FAILED.into(),
        message: e.to_string(),
    }
}

/// A claims-service failure during a job, by kind: the store's are retried like an AWS
/// throttle; a refusal is not (a retry meets the same answer).
fn service_err(e: ServiceError) -> IotError {
    match e {
        ServiceError::Store(e) => store_err(e),
        other => IotError::Permanent {
            code: super::LOBBY_REFUSED.into(),
            message: other.to_string(),
        },
    }
}

impl Worker {
    pub fn new(
        service: ClaimsService,
        store: Arc<dyn Store>,
        factory: Arc<dyn IotApiFactory>,
        backoff: Backoff,
        lease: Duration,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                service,
                store,
                factory,
                backoff,
                pacer: Pacer::default(),
                running: Mutex::new(HashMap::new()),
                lease,
                cancel,
            }),
        }
    }

    /// Resumes what the store says is pending, then runs jobs until cancelled. With a shared
    /// store it also sweeps the stored queues every lease period, so work a lost node held
    /// (its lease ran out) is taken over; the lease decides which node runs a job.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<ClaimEvent>, tracker: TaskTracker) {
        let permits = Arc::new(Semaphore::new(MAX_JOBS));
        self.retire_orphans().await;
        let pending = self.pending().await;
        if !pending.is_empty() {
            tracing::info!(jobs = pending.len(), "resuming provisioning work");
        }
        for job in pending {
            self.start(job, &permits, &tracker);
        }
        let shared = self.inner.store.fleet().is_some();
        let mut sweep = tokio::time::interval(self.inner.lease);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.tick().await;
        loop {
            tokio::select! {
                j = rx.recv() => match j {
                    Some(event) => self.start(Job::from(event), &permits, &tracker),
                    None => return,
                },
                _ = sweep.tick(), if shared => {
                    for job in self.pending().await {
                        self.start(job, &permits, &tracker);
                    }
                }
                () = self.inner.cancel.cancelled() => return,
            }
        }
    }

    /// The stored queues: claims `registering`, registrations `removing`.
    async fn pending(&self) -> Vec<Job> {
        let mut pending = Vec::new();
        self.inner.service.cache().for_each_claim(|id, state, _| {
            if state == ClaimState::Registering {
                pending.push(Job::Register(*id));
            }
        });
        match self.inner.store.removing_registrations().await {
            Ok(regs) => {
                pending.extend(regs.into_iter().map(|r| Job::Remove(r.device_id, r.tenant)))
            }
            Err(e) => tracing::error!(error = %e, "cannot read the clean-up queue"),
        }
        pending
    }

    /// Runs `job` if this node holds (or takes) its lease, renewing the lease while it runs;
    /// gives the lease up when done. A lease lost meanwhile (this node stalled past it and
    /// another took the job over) stops the work here.
    async fn run_leased(&self, job: &Job) {
        let Some(fleet) = self.inner.store.fleet() else {
            // A node alone on its store holds every job.
            return self.run_job(job).await;
        };
        let (lease, key) = (self.inner.lease, job.key());
        match fleet.take_job(&key, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(?job, "another node runs this job");
                return;
            }
            Err(e) => {
                tracing::warn!(?job, error = %e, "cannot take the job's lease; retried later");
                return;
            }
        }
        let renew = async {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    // Stopping: let the job finish within the grace, but stop claiming it, so
                    // another node takes it over if this one does not get to the end.
                    () = self.inner.cancel.cancelled() => std::future::pending::<()>().await,
                }
                match fleet.take_job(&key, lease).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(?job, error = %e, "renewing the job's lease failed"),
                }
            }
        };
        tokio::select! {
            () = self.run_job(job) => {
                if let Err(e) = fleet.finish_job(&key).await {
                    tracing::warn!(?job, error = %e, "releasing the job's lease failed");
                }
            }
            () = renew => tracing::warn!(?job, "another node took this job over"),
        }
    }

    /// Runs `job`, after any job of the same device already running: a device's jobs run one
    /// at a time, in order, so a clean-up and a new registration in the same account (migrated
    /// away and straight back) never interleave. A job asked for again while queued runs once.
    fn start(&self, job: Job, permits: &Arc<Semaphore>, tracker: &TaskTracker) {
        let device = job.device();
        {
            let mut running = self.inner.running.lock();
            if let Some(queue) = running.get_mut(&device) {
                if !queue.contains(&job) {
                    queue.push_back(job);
                }
                return;
            }
            running.insert(device, VecDeque::new());
        }
        let this = self.clone();
        let permits = permits.clone();
        tracker.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let mut job = job;
            loop {
                this.run_leased(&job).await;
                let mut running = this.inner.running.lock();
                match running.get_mut(&device).and_then(VecDeque::pop_front) {
                    Some(next) => job = next,
                    None => {
                        running.remove(&device);
                        return;
                    }
                }
            }
        });
    }

    /// One job, retried with backoff until it succeeds, fails for good (a permanent error, or
    /// retryable ones for longer than `aws.retry_give_up`), or the lobby stops.
    async fn run_job(&self, job: &Job) {
        let started = Instant::now();
        // Backoff goes on from the attempts the claim shows (another node's, before a restart).
        let mut attempt = match job {
            // The map holds no attempt counts: the store's (none when it cannot be read).
            Job::Register(id) => match self.inner.store.claim(id).await {
                Ok(c) => c.map_or(0, |c| c.attempts),
                Err(e) => {
                    tracing::warn!(device = %id, error = %e, "cannot read a claim's attempts");
                    0
                }
            },
            Job::Remove(..) => 0,
        };
        loop {
            let result = match job {
                Job::Register(id) => self.register(id).await,
                Job::Remove(id, tenant) => self.remove(id, tenant).await,
            };
            match result {
                Ok(()) => return,
                Err(IotError::Retryable { code, message })
                    if started.elapsed() >= self.inner.backoff.give_up =>
                {
                    let given =
                        humantime_serde::re::humantime::format_duration(self.inner.backoff.give_up);
                    let e = IotError::Permanent {
                        message: format!("{message} (still failing after {given} of retries)"),
                        code,
                    };
                    self.give_up(job, e, started).await;
                    return;
                }
                Err(IotError::Retryable { code, message }) => {
                    let delay = self.inner.backoff.delay(attempt);
                    tracing::debug!(?job, code, message, ?delay, "retrying");
                    attempt += 1;
                    if let Job::Register(id) = job {
                        let e = IotError::Retryable { code, message };
                        self.show_retrying(id, &e, delay).await;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.inner.cancel.cancelled() => return,
                    }
                }
                Err(e) => {
                    self.give_up(job, e, started).await;
                    return;
                }
            }
        }
    }

    async fn give_up(&self, job: &Job, e: IotError, started: Instant) {
        match job {
            Job::Register(id) => {
                let tenant = self
                    .inner
                    .service
                    .cache()
                    .claim(id)
                    .and_then(|c| c.tenant.clone());
                if let Some(tenant) = tenant {
                    registration_metric("failed", started);
                    tracing::warn!(device = %id, tenant = &*tenant, error = %e, "registration failed");
                    let account = self.tenant_account(&tenant);
                    let shown = e.tenant_facing(account.as_deref());
                    if let Err(e) = self.verdict(id, &tenant, Err(shown)).await {
                        tracing::warn!(device = %id, error = %e, "cannot record a failed registration");
                    }
                }
            }
            Job::Remove(_, tenant) => {
                // The tenant's role or account changed under us: an operator must look.
                tracing::error!(tenant, error = %e, "removing a device registration failed; it stays queued until the next start");
            }
        }
    }

    /// Shows a registration's retryable failure on its claim (`error`, `attempts`,
    /// `next_attempt_at`), so a tenant sees why its device is still `registering`.
    async fn show_retrying(&self, id: &DeviceId, e: &IotError, delay: Duration) {
        let service = &self.inner.service;
        let Some(tenant) = service.cache().claim(id).and_then(|c| c.tenant.clone()) else {
            return;
        };
        let shown = e.tenant_facing(self.tenant_account(&tenant).as_deref());
        let next_at = crate::model::now_ms()
            .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        if let Err(err) = service
            .registration_retrying(id, &tenant, &shown, next_at)
            .await
        {
            tracing::warn!(device = %id, error = %err, "cannot show a registration's retry");
        }
    }

    /// The AWS account of `tenant`'s role (`arn:aws:iam::<account>:role/…`), if it has one.
    fn tenant_account(&self, tenant: &str) -> Option<String> {
        let entry = self.inner.service.cache().tenant(tenant)?;
        match &entry.tenant.backend {
            Backend::AwsIot(b) => Some(super::arn_account(&b.role_arn).to_owned()),
            _ => None,
        }
    }

    /// Waits for the next call slot of `backend`'s account and region: the fleet's, in a
    /// shared store (this node's own when the store cannot be reached, so a call still waits
    /// its turn here), else this node's.
    async fn pace(&self, backend: &AwsIotBackend) {
        let (key, rate) = (pace_key(backend), backend.rate());
        let Some(fleet) = self.inner.store.fleet() else {
            return self.inner.pacer.wait(&key, rate).await; // a node alone on its store
        };
        match fleet.pace_slot(&key, rate).await {
            Ok(wait) => return tokio::time::sleep(wait).await,
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot take a call slot from the store; pacing on this node")
            }
        }
        self.inner.pacer.wait(&key, rate).await;
    }
}

fn registration_metric(outcome: &'static str, started: Instant) {
    metrics::counter!(crate::metrics::REGISTRATIONS_TOTAL, "backend" => "aws-iot", "outcome" => outcome)
        .increment(1);
    metrics::histogram!(crate::metrics::REGISTRATION_DURATION_SECONDS, "backend" => "aws-iot")
        .record(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store outage is retried; a refusal of the control plane ends the job (before, every
    /// service error became a retryable store error, retried until `aws.retry_give_up`).
    #[test]
    fn service_errors_keep_their_kind() {
        let down = service_err(ServiceError::Store(StoreError::Unavailable("gone".into())));
        assert!(
            matches!(&down, IotError::Retryable { code, .. } if code == crate::provision::STORE_FAILED),
            "{down:?}"
        );
        let refused = service_err(ServiceError::NotFound);
        assert!(
            matches!(&refused, IotError::Permanent { code, .. } if code == crate::provision::LOBBY_REFUSED),
            "{refused:?}"
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            give_up: Duration::from_secs(3600),
        };
        for attempt in 0..30 {
            let d = b.delay(attempt);
            let cap = (Duration::from_millis(100) * 2u32.pow(attempt.min(20))).min(b.max);
            assert!(d <= cap && d >= cap / 2, "{attempt}: {d:?} vs {cap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_calls_per_bucket() {
        // Let the paused clock run past the process start, so "a second ago" exists.
        tokio::time::advance(Duration::from_secs(5)).await;
        let p = Pacer::default();
        let start = Instant::now();
        for _ in 0..10 {
            p.wait("1/eu-west-1", 10).await;
        }
        // A full bucket: ten calls at 10/s go at once.
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..5 {
            p.wait("1/eu-west-1", 10).await;
        }
        // Then one every 100 ms; another account (or region) has its own bucket.
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        p.wait("1/us-east-1", 10).await;
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
