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
use crate::model::{now_ms, Claim, ClaimState, Mode, Tenant};
use crate::store::{
    ClaimWrite, Expect, Retire, Store, StoreError, StoredTenant, TenantDeleted, TenantUpdated,
    Written,
};
use crate::waiting::{Activity, WaitingRoom};
use tenants::tenant_entry;

mod activity;
mod claims;
mod cluster;
mod names;
mod registrations;
mod tenants;

use claims::owned;
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
    /// In a fleet, the version of each claim this node put in its map lately (the map holds
    /// no versions): a change-log entry it already holds is skipped without reading the store
    /// (`cluster::map_has`). Forgotten after [`cluster::VERSIONS_KEPT`]; an entry found
    /// forgotten is applied again, which is only a read.
    versions: parking_lot::Mutex<std::collections::HashMap<DeviceId, (i64, std::time::Instant)>>,
}

/// Stripes of [`Inner::stripes`].
const STRIPES: usize = 256;
/// How often a claim write is decided again after another writer changed the claim first.
const MAX_ATTEMPTS: usize = 8;

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
        fill(&store, &cache).await?;
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
                versions: Default::default(),
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
        // The map holds no more than a claim's view: a claim it holds is read from the store
        // (which then confirms it); one it holds none of is decided on as absent, and the
        // write expects it so.
        let (mut current, mut confirmed) = match self.inner.cache.contains(id) {
            true => (self.refresh(id).await?, true),
            false => (None, !confirm),
        };
        let mut name_taken = false;
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

    /// Puts what the store holds for `id` in the map and wakes the
    /// device; the claim as stored. Call on the device's stripe.
    pub(super) fn put_in_map(&self, id: &DeviceId, claim: Option<Claim>) -> Option<Arc<Claim>> {
        self.put_in_map_named(id, claim, None)
    }

    /// [`Self::put_in_map`], `own` the device's own thing name when the caller knows it (else
    /// the waiting room's, when the device was seen here).
    pub(super) fn put_in_map_named(
        &self,
        id: &DeviceId,
        claim: Option<Claim>,
        own: Option<&str>,
    ) -> Option<Arc<Claim>> {
        let cache = &self.inner.cache;
        match &claim {
            Some(c) => cache.put_view(self.view_in_map(c, own)),
            None => cache.remove_claim(id),
        }
        self.note_version(id, claim.as_ref());
        self.inner.waiting.wake(id);
        claim.map(Arc::new)
    }

    /// The stored claim of `id`, put in the map when the map's view of it is not the store's
    /// (another node's write not applied yet). Call on the device's stripe.
    async fn refresh(&self, id: &DeviceId) -> Result<Option<Arc<Claim>>, ServiceError> {
        let stored = self.inner.store.claim(id).await?;
        if self.inner.cache.claim(id) == stored.as_ref().map(|c| self.view_in_map(c, None)) {
            self.note_version(id, stored.as_ref());
            return Ok(stored.map(Arc::new));
        }
        Ok(self.put_in_map(id, stored))
    }

    /// `c` as the map holds it: `own`, or else the name the device connected here with, is its
    /// own thing name.
    fn view_in_map(&self, c: &Claim, own: Option<&str>) -> crate::route::ClaimView {
        let seen = self.inner.waiting.seen(&c.device_id);
        let own = own.or(seen.as_ref().map(|s| &*s.thing_name));
        super::cache::view_of(c, own)
    }

    /// Remembers the version of `id` the map now holds (in a fleet: `cluster::map_has`).
    fn note_version(&self, id: &DeviceId, claim: Option<&Claim>) {
        if self.inner.store.fleet().is_none() {
            return;
        }
        let mut versions = self.inner.versions.lock();
        match claim {
            Some(c) => versions.insert(*id, (c.version, std::time::Instant::now())),
            None => versions.remove(id),
        };
    }
}

/// Fills `cache` with the stored claims as they are read (never all of them in memory at once).
/// Nothing is seen yet: a claim's name that is not the device id is the store's until the
/// device connects (`settle_name`).
async fn fill(store: &Arc<dyn Store>, cache: &ClaimsCache) -> Result<(), ServiceError> {
    Ok(store
        .for_each_claim(&mut |c| cache.put_claim(&c, None))
        .await?)
}

/// Activities applied at once by [`ClaimsService::run_activity`].
const ACTIVITY_IN_FLIGHT: usize = 64;

/// A tenant patch's refusal, as the store hands it back.
fn refusal(e: ServiceError) -> String {
    match e {
        ServiceError::Invalid(why) => why,
        other => other.to_string(),
    }
}
