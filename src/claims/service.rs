//! The claims service: every change to tenants and claims goes through here, in this order:
//! validate → write the store (durable) → update the map → wake the device's session.
//!
//! No lock spans the fleet or even the node. A claim write is conditional on the version of
//! the claim it was decided on; the store refuses it when another writer (task or node) got
//! there first, and the service decides again on what the store holds (`change_claim`). The
//! store also checks what a claim binds to in the same transaction: the tenant exists and has
//! room, the thing name is free in it. So "another tenant already claimed it", quotas and
//! unique thing names are exact across nodes while unrelated devices are written at once.
//! Within a node, one device's writes take turns on a striped lock, so the map follows the
//! store's order for each device.
//!
//! A mutation asked for by an API request runs in its own task ([`ClaimsService::detached`]):
//! a client that gives up never leaves the store written and the map not.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex};

use super::cache::{ClaimsCache, TenantEntry};
use super::codes::ClaimKeys;
use super::error::ServiceError;
use super::events::{ClaimEvent, ClaimEvents};
use super::tenant_input::TenantInput;
use crate::device::DeviceId;
use crate::model::{now_ms, Backend, Claim, ClaimState, Mode, Tenant};
use crate::store::{
    ClaimWrite, Expect, Retire, Store, StoreError, StoredTenant, TenantDeleted, TenantUpdated,
    Written,
};
use crate::waiting::{Activity, WaitingRoom};
use tenants::tenant_entry;

mod activity;
mod cluster;
mod names;
mod registrations;
mod tenants;

pub use registrations::Verdict;

/// The result of a claim request.
#[derive(Debug)]
pub struct ClaimOutcome {
    /// False when the same tenant had already claimed the device (API answers 200, not 201).
    pub created: bool,
    pub claim: Arc<Claim>,
}

/// Cheap `Clone` handle.
#[derive(Clone)]
pub struct ClaimsService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    cache: ClaimsCache,
    key: ClaimKeys,
    waiting: WaitingRoom,
    events: ClaimEvents,
    /// One device's writes on this node take turns (stripe by device id): the map then sees
    /// them in the store's order. Different devices rarely share a stripe.
    stripes: Box<[Mutex<()>]>,
    /// This node's tenant writes take turns (they are rare; the store's row lock orders the
    /// nodes).
    tenant_writes: Mutex<()>,
    /// The change-log cursor: changes before it are in the map. Held by the one catch-up
    /// running.
    applied: Mutex<i64>,
    /// Catch-ups asked for, and the number of asks the last finished one covered: a caller
    /// whose ask came before a catch-up started needs no other (`cluster::catch_up`).
    catch_ups_asked: AtomicU64,
    catch_ups_covered: AtomicU64,
}

/// Stripes of [`Inner::stripes`].
const STRIPES: usize = 256;
/// How often a claim write is decided again after another writer changed the claim first.
const MAX_ATTEMPTS: usize = 8;

/// How many of a batch's claims are in flight at once: enough to fill a group commit (and
/// PostgreSQL's pool), few enough that one batch leaves room for other callers.
const BATCH_IN_FLIGHT: usize = 64;

/// What a mutation wants stored for a claim, decided on the claim stored now.
pub(super) struct Plan {
    /// The claim after the write; `None` deletes it.
    pub claim: Option<Claim>,
    /// What binding the claim to its tenant is (the store checks the tenant exists and has
    /// room).
    pub bind: Bind,
    pub retire: Retiring,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Bind {
    /// Not a binding: the tenant is not checked.
    No,
    /// A claim: a tenant that is gone is `NotFound`.
    Claim,
    /// A migration: a tenant that is gone is `Invalid`.
    Migrate,
}

/// Which registrations of the device the write marks for removal (in its transaction).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retiring {
    Nothing,
    All,
    /// All but the written claim's tenant's.
    AllButOwn,
}

/// What `change_claim` did.
pub(super) enum Changed {
    /// Nothing to write; the claim as it stands.
    Unchanged(Option<Arc<Claim>>),
    /// Written; the claim now.
    Written(Option<Arc<Claim>>),
}

impl std::fmt::Debug for ClaimsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimsService")
            .field("cache", &self.inner.cache)
            .finish()
    }
}

/// Lowercase-hex-free digest of a bearer token, as kept in memory and (hex) in the store.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh redirect id: new for every claim, migration and registration that becomes ready.
fn new_redirect_id() -> String {
    format!("r-{}", random_hex(12))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl ClaimsService {
    /// Loads tenants and claims from the store into a fresh map.
    pub async fn load(
        store: Arc<dyn Store>,
        key: impl Into<ClaimKeys>,
        waiting: WaitingRoom,
        events: ClaimEvents,
    ) -> Result<Self, ServiceError> {
        let cache = ClaimsCache::default();
        // Read before loading: a change committed meanwhile is applied again, never missed.
        let applied = match store.fleet() {
            Some(fleet) => fleet.change_cursor().await?,
            None => 0,
        };
        for t in store.tenants().await? {
            cache.put_tenant(tenant_entry(t)?);
        }
        for c in store.claims().await? {
            gauge_state(c.state, 1.0);
            cache.put_claim(c);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                cache,
                key: key.into(),
                waiting,
                events,
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                tenant_writes: Mutex::new(()),
                applied: Mutex::new(applied),
                catch_ups_asked: AtomicU64::new(0),
                catch_ups_covered: AtomicU64::new(0),
            }),
        })
    }

    /// The map the device path reads.
    pub fn cache(&self) -> &ClaimsCache {
        &self.inner.cache
    }

    /// The waiting room (connected devices).
    pub fn waiting(&self) -> &WaitingRoom {
        &self.inner.waiting
    }

    /// The store behind the map.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Store liveness for `/readyz`.
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// Runs a mutation in its own task and waits for it: when the caller is dropped (an HTTP
    /// client gave up), the mutation still completes, store and map alike.
    async fn detached<T, F>(&self, work: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        tokio::spawn(work).await.unwrap_or_else(|e| {
            Err(ServiceError::Store(StoreError::Backend(format!(
                "a control-plane task failed: {e}"
            ))))
        })
    }

    /// Claims a device for `tenant_id` with its claim code (SPEC §3).
    pub async fn claim(
        &self,
        tenant_id: &str,
        code: &str,
        cert_pem: Option<&str>,
    ) -> Result<ClaimOutcome, ServiceError> {
        // Verify before anything else: a wrong code and an unknown device look the same.
        let device_id = self
            .inner
            .key
            .verify(code)
            .ok_or(ServiceError::InvalidCode)?;
        let cert_name = match cert_pem {
            Some(pem) => Some(self.cert_thing_name(&device_id, pem)?),
            None => None,
        };
        let (svc, tenant_id) = (self.clone(), tenant_id.to_owned());
        let cert_pem = cert_pem.map(str::to_owned);
        self.detached(async move {
            svc.claim_now(device_id, &tenant_id, cert_name, cert_pem.as_deref())
                .await
        })
        .await
    }

    /// Claims each of `items` (code, certificate PEM) for `tenant_id`, as a tenant claims a
    /// pallet (`POST /v1/claims:batch`): one answer per item in the order asked, each what
    /// [`Self::claim`] answers for it. Up to [`BATCH_IN_FLIGHT`] run at once so the store
    /// commits them together; the batch runs to its end even when the caller gives up.
    pub async fn claim_batch(
        &self,
        tenant_id: &str,
        items: Vec<(String, Option<String>)>,
    ) -> Result<Vec<Result<ClaimOutcome, ServiceError>>, ServiceError> {
        use futures_util::StreamExt;
        let (svc, tenant_id) = (self.clone(), tenant_id.to_owned());
        self.detached(async move {
            let claims = items.into_iter().map(|(code, pem)| {
                let (svc, tenant_id) = (svc.clone(), tenant_id.clone());
                async move { svc.claim(&tenant_id, &code, pem.as_deref()).await }
            });
            Ok(futures_util::stream::iter(claims)
                .buffered(BATCH_IN_FLIGHT)
                .collect()
                .await)
        })
        .await
    }

    async fn claim_now(
        &self,
        device_id: DeviceId,
        tenant_id: &str,
        cert_name: Option<String>,
        cert_pem: Option<&str>,
    ) -> Result<ClaimOutcome, ServiceError> {
        let entry = self
            .inner
            .cache
            .tenant(tenant_id)
            .ok_or(ServiceError::NotFound)?;
        let own = match cert_name {
            Some(n) => Some(n),
            None => self.seen_thing_name(&device_id).await?,
        };
        let changed = self
            .change_claim(&device_id, cert_pem, true, |current, name_taken| {
                if let Some(existing) = current {
                    return match existing.tenant_id() {
                        _ if existing.state == ClaimState::Revoked => {
                            Err(ServiceError::Conflict("device is revoked".into()))
                        }
                        Some(t) if t == tenant_id => Ok(None),
                        _ => Err(ServiceError::AlreadyClaimed),
                    };
                }
                // Unnamed: named when the device connects (`name_claim`).
                let thing_name = own
                    .as_deref()
                    .map(|n| self.free_thing_name(tenant_id, n, &device_id, name_taken));
                let claim = self.bound_claim(device_id, &entry.tenant, thing_name, now_ms());
                Ok(Some(Plan {
                    retire: ready_retires(&claim),
                    claim: Some(claim),
                    bind: Bind::Claim,
                }))
            })
            .await?;
        match changed {
            Changed::Unchanged(claim) => Ok(ClaimOutcome {
                created: false,
                claim: claim.ok_or(ServiceError::NotFound)?,
            }),
            Changed::Written(claim) => {
                let claim = claim.ok_or(ServiceError::NotFound)?;
                self.after_binding(&claim);
                Ok(ClaimOutcome {
                    created: true,
                    claim,
                })
            }
        }
    }

    /// Unclaims a device (`by_tenant`: the caller's tenant, `None` for the operator). Its
    /// registrations are marked for removal in the same transaction.
    pub async fn unclaim(
        &self,
        id: &DeviceId,
        by_tenant: Option<&str>,
    ) -> Result<(), ServiceError> {
        let (svc, id) = (self.clone(), *id);
        let by_tenant = by_tenant.map(str::to_owned);
        self.detached(async move {
            svc.change_claim(&id, None, true, |current, _| {
                let existing = owned(current, by_tenant.as_deref())?;
                if existing.state == ClaimState::Revoked {
                    // Revocation outlives the claim: keep refusing the device. It leaves the
                    // tenant all the same, and so does what was registered there.
                    let mut c = (**existing).clone();
                    c.tenant = None;
                    return Ok(Some(Plan {
                        claim: Some(c),
                        bind: Bind::No,
                        retire: Retiring::All,
                    }));
                }
                Ok(Some(Plan {
                    claim: None,
                    bind: Bind::No,
                    retire: Retiring::All,
                }))
            })
            .await
            .map(drop)
        })
        .await
    }

    /// Moves a claimed device to another tenant with a new redirect.
    pub async fn migrate(&self, id: &DeviceId, to: &str) -> Result<Arc<Claim>, ServiceError> {
        let (svc, id, to) = (self.clone(), *id, to.to_owned());
        self.detached(async move { svc.migrate_now(&id, &to).await })
            .await
    }

    async fn migrate_now(&self, id: &DeviceId, to: &str) -> Result<Arc<Claim>, ServiceError> {
        let entry = self
            .inner
            .cache
            .tenant(to)
            .ok_or_else(|| ServiceError::Invalid(format!("no tenant {to:?}")))?;
        let changed = self
            .change_claim(id, None, true, |current, name_taken| {
                let existing = owned(current, None)?;
                if existing.state == ClaimState::Revoked {
                    return Err(ServiceError::Conflict("device is revoked".into()));
                }
                if existing.tenant_id() == Some(to) {
                    return Ok(None);
                }
                let thing_name = existing
                    .thing_name
                    .as_deref()
                    .map(|n| self.free_thing_name(to, n, id, name_taken));
                let claim = self.bound_claim(*id, &entry.tenant, thing_name, now_ms());
                // Otherwise the old registration stays until the new one is ready
                // (`registration_done`).
                Ok(Some(Plan {
                    retire: ready_retires(&claim),
                    claim: Some(claim),
                    bind: Bind::Migrate,
                }))
            })
            .await?;
        match changed {
            Changed::Unchanged(c) => c.ok_or(ServiceError::NotFound),
            Changed::Written(c) => {
                let c = c.ok_or(ServiceError::NotFound)?;
                self.after_binding(&c);
                Ok(c)
            }
        }
    }

    /// Revokes a device: refused at the handshake from now on, its connection closed.
    pub async fn revoke(&self, id: &DeviceId) -> Result<Arc<Claim>, ServiceError> {
        let (svc, id) = (self.clone(), *id);
        self.detached(async move {
            let seen = svc.inner.waiting.seen(&id);
            // A fleet's node knows only the devices it has seen; the device may wait on another.
            let anywhere = svc.inner.store.fleet().is_some();
            let changed = svc
                .change_claim(&id, None, true, |current, _| {
                    let claim = match current {
                        Some(c) => Claim {
                            state: ClaimState::Revoked,
                            redirect_id: None,
                            next_attempt_at: None,
                            ..(**c).clone()
                        },
                        None if seen.is_none() && !anywhere => return Err(ServiceError::NotFound),
                        None => Claim {
                            thing_name: seen.as_ref().map(|s| s.thing_name.to_string()),
                            ..Claim::revoked(id)
                        },
                    };
                    Ok(Some(Plan {
                        claim: Some(claim),
                        bind: Bind::No,
                        retire: Retiring::Nothing,
                    }))
                })
                .await?;
            match changed {
                Changed::Unchanged(c) | Changed::Written(c) => c.ok_or(ServiceError::NotFound),
            }
        })
        .await
    }

    /// Decides on the claim of `id` as stored and writes the decision, again and again while
    /// another writer changes the claim first. `decide` gets the claim (`None`: unclaimed) and
    /// whether the thing name it chose last time is taken in the tenant; it answers a plan,
    /// `None` for nothing to write, or an error. With `confirm`, an answer decided on the map
    /// alone (nothing to write, or an error) is checked against the store first, so a change
    /// another node made a moment ago is never answered wrongly.
    pub(super) async fn change_claim(
        &self,
        id: &DeviceId,
        cert_pem: Option<&str>,
        confirm: bool,
        mut decide: impl FnMut(Option<&Arc<Claim>>, bool) -> Result<Option<Plan>, ServiceError>,
    ) -> Result<Changed, ServiceError> {
        let _turn = self.turn(id).lock().await;
        let mut current = self.inner.cache.claim(id);
        let (mut name_taken, mut confirmed) = (false, !confirm);
        for _ in 0..MAX_ATTEMPTS {
            let plan = match decide(current.as_ref(), name_taken) {
                Ok(Some(plan)) => plan,
                answer if !confirmed => {
                    confirmed = true;
                    let stored = self.inner.store.claim(id).await?;
                    if stored.as_ref().map(|c| c.version) == current.as_ref().map(|c| c.version) {
                        return answer.map(|_| Changed::Unchanged(current));
                    }
                    current = self.put_in_map(id, stored);
                    continue;
                }
                Ok(None) => return Ok(Changed::Unchanged(current)),
                Err(e) => return Err(e),
            };
            let tenant = plan.claim.as_ref().and_then(Claim::tenant_id);
            let w = ClaimWrite {
                id: *id,
                expect: Expect::from_current(current.as_deref()),
                claim: plan.claim.as_ref(),
                cert_pem,
                bind: plan.bind != Bind::No,
                retire: match (plan.retire, tenant) {
                    (Retiring::Nothing, _) => Retire::Nothing,
                    (Retiring::All, _) | (Retiring::AllButOwn, None) => Retire::All,
                    (Retiring::AllButOwn, Some(t)) => Retire::AllBut(t),
                },
            };
            match self.inner.store.write_claim(&w).await? {
                Written::Done { version, retiring } => {
                    let after = plan.claim.map(|c| Claim { version, ..c });
                    let after = self.put_in_map(id, after);
                    for tenant in retiring {
                        self.inner.events.emit(ClaimEvent::Retiring(*id, tenant));
                    }
                    return Ok(Changed::Written(after));
                }
                Written::Stale(stored) => {
                    confirmed = true;
                    current = self.put_in_map(id, stored);
                }
                Written::NameTaken => name_taken = true,
                Written::Full => return Err(ServiceError::QuotaExceeded),
                Written::NoTenant if plan.bind == Bind::Migrate => {
                    return Err(ServiceError::Invalid(format!(
                        "no tenant {:?}",
                        tenant.unwrap_or_default()
                    )))
                }
                Written::NoTenant => return Err(ServiceError::NotFound),
            }
        }
        Err(ServiceError::Store(StoreError::Unavailable(
            "the device's claim kept changing under this request; retry".into(),
        )))
    }

    /// The lock `id`'s writes on this node take turns on (its stripe).
    pub(super) fn turn(&self, id: &DeviceId) -> &Mutex<()> {
        &self.inner.stripes[usize::from(id.0[0]) % STRIPES]
    }

    /// Puts what the store holds for `id` in the map (with the claim gauges) and wakes the
    /// device; the claim as the map now holds it. Call on the device's stripe.
    pub(super) fn put_in_map(&self, id: &DeviceId, claim: Option<Claim>) -> Option<Arc<Claim>> {
        let cache = &self.inner.cache;
        if let Some(old) = cache.claim(id) {
            gauge_state(old.state, -1.0);
        }
        match claim {
            Some(c) => {
                gauge_state(c.state, 1.0);
                cache.put_claim(c);
            }
            None => cache.remove_claim(id),
        }
        self.inner.waiting.wake(id);
        cache.claim(id)
    }

    /// The claim of `id` as seen by `by_tenant` (`None`: operator): another tenant's is NotFound.
    pub fn owned_claim(
        &self,
        id: &DeviceId,
        by_tenant: Option<&str>,
    ) -> Result<Arc<Claim>, ServiceError> {
        owned(self.inner.cache.claim(id).as_ref(), by_tenant).cloned()
    }

    fn bound_claim(
        &self,
        id: DeviceId,
        tenant: &Tenant,
        thing_name: Option<String>,
        now: i64,
    ) -> Claim {
        // Provisioning seam: backends that register first start in `registering` and the
        // provisioner (driven by stored state) moves them on; `none` is ready at once.
        let ready = matches!(tenant.backend, Backend::None);
        Claim {
            device_id: id,
            tenant: Some(Arc::from(tenant.id.as_str())),
            state: if ready {
                ClaimState::Ready
            } else {
                ClaimState::Registering
            },
            thing_name,
            redirect_id: ready.then(new_redirect_id),
            claimed_at: Some(now),
            ready_at: ready.then_some(now),
            redirected_at: None,
            error: None,
            attempts: 0,
            next_attempt_at: None,
            version: 0,
        }
    }
}

/// Activities applied at once by [`ClaimsService::run_activity`].
const ACTIVITY_IN_FLIGHT: usize = 64;

/// `claim` as seen by `by_tenant` (`None`: operator): another tenant's is NotFound.
fn owned<'a>(
    claim: Option<&'a Arc<Claim>>,
    by_tenant: Option<&str>,
) -> Result<&'a Arc<Claim>, ServiceError> {
    let c = claim.ok_or(ServiceError::NotFound)?;
    match by_tenant {
        Some(t) if c.tenant_id() != Some(t) => Err(ServiceError::NotFound),
        _ => Ok(c),
    }
}

/// A claim ready at once retires the device's registrations with other tenants.
fn ready_retires(c: &Claim) -> Retiring {
    if c.state == ClaimState::Ready {
        Retiring::AllButOwn
    } else {
        Retiring::Nothing
    }
}

/// A tenant patch's refusal, as the store hands it back.
fn refusal(e: ServiceError) -> String {
    match e {
        ServiceError::Invalid(why) => why,
        other => other.to_string(),
    }
}

fn gauge_state(state: ClaimState, delta: f64) {
    metrics::gauge!(crate::metrics::CLAIMS, "state" => state.as_str()).increment(delta);
}
