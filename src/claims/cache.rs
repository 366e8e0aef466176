//! The in-memory claims map: every claim and tenant, loaded from the store at start and kept in
//! step by the claims service. The connect path reads only this (one lock-free lookup).
//!
//! Why papaya: reads never take a lock (dashmap's take a shard read lock) and resizes are
//! incremental, so a claim burst never stalls connects. Keys are SHA-256 digests already, so a
//! pass-through hasher replaces SipHash ([`IdHashBuilder`]).
//!
//! Why so small an entry: papaya boxes each entry (key and value, nothing else) and glibc
//! rounds a chunk to its size + 8 up to 16, so a 32-byte key with a value of 24 bytes or less
//! is a 64-byte chunk; 10M claims then cost ~80 bytes each with the table. A claim's entry
//! ([`Slim`]) holds only what the connect path and the service's decisions on it need: state,
//! tenant (an index into [`TenantIds`]), the redirect id as its 12 raw bytes, the redirect's
//! `issued_at`, and what kind of thing name it has (none, the device's own, its id, or known
//! only to the store until the device connects). The rest of a claim (error, attempts,
//! timestamps, version) is read from the store where the API or a write needs it. The rare
//! claim that does not fit (another name, a redirect id of another shape) has its whole view
//! in a side map ([`Inner::rare`]).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use crate::device::{DeviceId, IdHashBuilder};
use crate::model::{Claim, ClaimState, Tenant};
use crate::route::{is_hex_of, ClaimView, RedirectId, ThingName};

/// A tenant as held in memory, with its token hash for authentication.
#[derive(Debug)]
pub struct TenantEntry {
    pub tenant: Tenant,
    pub token_hash: [u8; 32],
}

/// Cheap `Clone` handle over the maps.
#[derive(Clone, Default)]
pub struct ClaimsCache {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    claims: papaya::HashMap<DeviceId, Slim, IdHashBuilder>,
    /// The whole view of each claim whose entry is [`RARE`]: written before its entry, removed
    /// after it.
    rare: papaya::HashMap<DeviceId, Arc<ClaimView>, IdHashBuilder>,
    tenant_ids: TenantIds,
    tenants: papaya::HashMap<String, Arc<TenantEntry>>,
    /// token hash → tenant id
    tokens: papaya::HashMap<[u8; 32], String>,
    /// Claim writes take turns here (an entry and its rare view change together), and count
    /// claims per tenant (quota checks, tenant deletion).
    writes: parking_lot::Mutex<HashMap<Arc<str>, usize>>,
}

/// One claim in the map: 24 bytes (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slim {
    issued_at: i64,
    /// Bits 0..24 the tenant's index + 1 (0: none, [`NO_INDEX`]: see the rare view), 24..27
    /// the state, 27..30 the thing name's kind, 30 a raw redirect id, 31 [`RARE`].
    meta: u32,
    redirect: [u8; 12],
}

const _: () = assert!(std::mem::size_of::<Slim>() == 24);

const TENANT_BITS: u32 = 0x00FF_FFFF;
/// A tenant index too big for the entry (more than 16M tenants ever seen): the view is rare.
const NO_INDEX: u32 = TENANT_BITS;
const HAS_REDIRECT: u32 = 1 << 30;
/// The claim's view is in [`Inner::rare`]; the entry still holds its state and tenant index.
const RARE: u32 = 1 << 31;

const NAME_NONE: u32 = 0;
const NAME_OWN: u32 = 1;
const NAME_ID: u32 = 2;
const NAME_UNKNOWN: u32 = 3;

fn state_bits(s: ClaimState) -> u32 {
    match s {
        ClaimState::Unclaimed => 0,
        ClaimState::Registering => 1,
        ClaimState::Ready => 2,
        ClaimState::Failed => 3,
        ClaimState::Revoked => 4,
    }
}

impl Slim {
    fn state(self) -> ClaimState {
        match (self.meta >> 24) & 7 {
            0 => ClaimState::Unclaimed,
            1 => ClaimState::Registering,
            2 => ClaimState::Ready,
            3 => ClaimState::Failed,
            _ => ClaimState::Revoked,
        }
    }

    /// The tenant's index + 1 (0: none).
    fn tenant(self) -> u32 {
        self.meta & TENANT_BITS
    }

    /// `v` as an entry, `tenant` its tenant's index + 1; rare when it does not fit.
    fn encode(v: &ClaimView, tenant: u32) -> Self {
        let mut meta = (state_bits(v.state) << 24) | tenant;
        let name = match v.thing_name {
            ThingName::None => Some(NAME_NONE),
            ThingName::Own => Some(NAME_OWN),
            ThingName::DeviceId => Some(NAME_ID),
            ThingName::Unknown => Some(NAME_UNKNOWN),
            ThingName::Text(_) => None,
        };
        let redirect = match &v.redirect_id {
            None => Some([0; 12]),
            Some(RedirectId::Raw(raw)) => {
                meta |= HAS_REDIRECT;
                Some(*raw)
            }
            Some(RedirectId::Text(_)) => None,
        };
        match (name, redirect) {
            (Some(name), Some(redirect)) if tenant != NO_INDEX => Slim {
                issued_at: v.issued_at,
                meta: meta | (name << 27),
                redirect,
            },
            _ => Slim {
                issued_at: 0,
                meta: (meta & !HAS_REDIRECT) | RARE,
                redirect: [0; 12],
            },
        }
    }
}

/// Tenant ids by index, for entries: set once, never reused (an entry read a moment before
/// its claim changed must never name another tenant), read without a lock.
struct TenantIds {
    by_name: parking_lot::Mutex<HashMap<Arc<str>, u32>>,
    chunks: Box<[OnceLock<Chunk>]>,
}

/// [`CHUNK`] tenant ids, each set once.
type Chunk = Box<[OnceLock<Arc<str>>]>;

const CHUNK: usize = 1024;

impl Default for TenantIds {
    fn default() -> Self {
        let chunks = (TENANT_BITS as usize).div_ceil(CHUNK);
        Self {
            by_name: Default::default(),
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl TenantIds {
    /// The index + 1 of `tenant` (0 for none, [`NO_INDEX`] when all are taken).
    fn index(&self, tenant: Option<&Arc<str>>) -> u32 {
        let Some(tenant) = tenant else { return 0 };
        let mut by_name = self.by_name.lock();
        if let Some(i) = by_name.get(tenant) {
            return *i;
        }
        let i = u32::try_from(by_name.len() + 1).unwrap_or(NO_INDEX);
        if i >= NO_INDEX {
            return NO_INDEX;
        }
        let slot = i as usize - 1;
        let chunk =
            self.chunks[slot / CHUNK].get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
        let _ = chunk[slot % CHUNK].set(tenant.clone());
        by_name.insert(tenant.clone(), i);
        i
    }

    /// The tenant of index + 1 `i`.
    fn get(&self, i: u32) -> Option<&Arc<str>> {
        let slot = (i as usize).checked_sub(1)?;
        self.chunks.get(slot / CHUNK)?.get()?[slot % CHUNK].get()
    }
}

/// `lobby_claims{state}`: the claims this map holds, by state.
fn gauge_state(state: ClaimState, delta: f64) {
    metrics::gauge!(crate::metrics::CLAIMS, "state" => state.as_str()).increment(delta);
}

impl std::fmt::Debug for ClaimsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimsCache")
            .field("claims", &self.inner.claims.len())
            .field("tenants", &self.inner.tenants.len())
            .finish()
    }
}

/// `c` as the map holds it; `own`, when known, the device's own thing name (else a name that
/// is not the device id is [`ThingName::Unknown`]).
pub fn view_of(c: &Claim, own: Option<&str>) -> ClaimView {
    let thing_name = match c.thing_name.as_deref() {
        None => ThingName::None,
        Some(n) if is_hex_of(n, &c.device_id) => ThingName::DeviceId,
        Some(n) if own == Some(n) => ThingName::Own,
        Some(n) if own.is_some() => ThingName::Text(Arc::from(n)),
        Some(_) => ThingName::Unknown,
    };
    ClaimView {
        device_id: c.device_id,
        state: c.state,
        tenant: c.tenant.clone(),
        thing_name,
        redirect_id: c.redirect_id.as_deref().map(RedirectId::of),
        issued_at: c.ready_at.or(c.claimed_at).unwrap_or(0),
    }
}

impl ClaimsCache {
    /// The claim of a device as the map holds it, if any. The connect path's one lookup.
    pub fn claim(&self, id: &DeviceId) -> Option<ClaimView> {
        let claims = self.inner.claims.pin();
        let mut slim = *claims.get(id)?;
        // A rare view is written before its entry and removed after it: an entry that says
        // rare without one was replaced meanwhile, so read it again.
        for _ in 0..16 {
            if slim.meta & RARE == 0 {
                return Some(self.decode(id, slim));
            }
            if let Some(v) = self.inner.rare.pin().get(id) {
                return Some((**v).clone());
            }
            slim = *claims.get(id)?;
        }
        // Writes keep overtaking this read: the state stands, the name waits for the next
        // wake-up (a write wakes the device).
        Some(ClaimView {
            thing_name: ThingName::Unknown,
            redirect_id: None,
            ..self.decode(
                id,
                Slim {
                    meta: slim.meta & !RARE,
                    ..slim
                },
            )
        })
    }

    fn decode(&self, id: &DeviceId, slim: Slim) -> ClaimView {
        ClaimView {
            device_id: *id,
            state: slim.state(),
            tenant: self.inner.tenant_ids.get(slim.tenant()).cloned(),
            thing_name: match (slim.meta >> 27) & 7 {
                NAME_NONE => ThingName::None,
                NAME_OWN => ThingName::Own,
                NAME_ID => ThingName::DeviceId,
                _ => ThingName::Unknown,
            },
            redirect_id: (slim.meta & HAS_REDIRECT != 0).then_some(RedirectId::Raw(slim.redirect)),
            issued_at: slim.issued_at,
        }
    }

    /// True when the map holds a claim of the device.
    pub fn contains(&self, id: &DeviceId) -> bool {
        self.inner.claims.pin().contains_key(id)
    }

    /// The state of the device's claim, if any.
    pub fn state(&self, id: &DeviceId) -> Option<ClaimState> {
        self.inner.claims.pin().get(id).map(|s| s.state())
    }

    /// True when the device is revoked (checked during the TLS handshake).
    pub fn is_revoked(&self, id: &DeviceId) -> bool {
        self.state(id) == Some(ClaimState::Revoked)
    }

    /// Inserts or replaces a claim (and counts it in `lobby_claims`). `own`: the device's own
    /// thing name when known (it connected to this node, or its certificate came with the
    /// claim), so a claim named so holds no string.
    pub fn put_claim(&self, claim: &Claim, own: Option<&str>) {
        self.put_view(view_of(claim, own));
    }

    /// Inserts or replaces a claim's view.
    pub fn put_view(&self, view: ClaimView) {
        let id = view.device_id;
        let mut counts = self.inner.writes.lock();
        let tenant = self.inner.tenant_ids.index(view.tenant.as_ref());
        let slim = Slim::encode(&view, tenant);
        let (claims, rare) = (self.inner.claims.pin(), self.inner.rare.pin());
        let old = claims.get(&id).map(|s| self.old_view(&id, *s));
        gauge_state(view.state, 1.0);
        if let Some((state, _)) = &old {
            gauge_state(*state, -1.0);
        }
        let new_tenant = view.tenant.clone();
        if slim.meta & RARE != 0 {
            rare.insert(id, Arc::new(view));
            claims.insert(id, slim);
        } else {
            claims.insert(id, slim);
            rare.remove(&id);
        }
        count(&mut counts, old.and_then(|o| o.1), new_tenant);
    }

    /// The state and tenant of an entry about to be replaced.
    fn old_view(&self, id: &DeviceId, slim: Slim) -> (ClaimState, Option<Arc<str>>) {
        let tenant = match slim.tenant() {
            NO_INDEX => self.inner.rare.pin().get(id).and_then(|v| v.tenant.clone()),
            i => self.inner.tenant_ids.get(i).cloned(),
        };
        (slim.state(), tenant)
    }

    /// Removes a claim.
    pub fn remove_claim(&self, id: &DeviceId) {
        let mut counts = self.inner.writes.lock();
        let claims = self.inner.claims.pin();
        let old = claims.get(id).map(|s| self.old_view(id, *s));
        claims.remove(id);
        self.inner.rare.pin().remove(id);
        if let Some((state, _)) = &old {
            gauge_state(*state, -1.0);
        }
        count(&mut counts, old.and_then(|o| o.1), None);
    }

    /// Claims (in any state) held by a tenant.
    pub fn tenant_claim_count(&self, tenant: &str) -> usize {
        let counts = self.inner.writes.lock();
        counts.get(tenant).copied().unwrap_or(0)
    }

    /// Number of claims held.
    pub fn claim_count(&self) -> usize {
        self.inner.claims.len()
    }

    /// Calls `f` with every claim's device, state and tenant (API listings; O(n)).
    pub fn for_each_claim(&self, mut f: impl FnMut(&DeviceId, ClaimState, Option<&str>)) {
        let rare = self.inner.rare.pin();
        for (id, slim) in self.inner.claims.pin().iter() {
            match slim.tenant() {
                NO_INDEX => {
                    let tenant = rare.get(id).and_then(|v| v.tenant.clone());
                    f(id, slim.state(), tenant.as_deref());
                }
                i => f(id, slim.state(), self.inner.tenant_ids.get(i).map(|t| &**t)),
            }
        }
    }

    /// Whether the map holds what `stored` (the store's claim of `id`) shows a device: state,
    /// tenant, redirect and its name (a name the map holds as the device's own, or as known
    /// only to the store, agrees with any). For tests and checks, not the connect path.
    pub fn agrees(&self, id: &DeviceId, stored: Option<&Claim>) -> bool {
        match (self.claim(id), stored) {
            (None, None) => true,
            (Some(held), Some(c)) => {
                let want = ClaimView::of(c);
                let name_ok = match (&held.thing_name, &want.thing_name) {
                    (ThingName::Own | ThingName::Unknown, ThingName::Text(_)) => true,
                    (a, b) => a == b,
                };
                name_ok
                    && ClaimView {
                        thing_name: ThingName::None,
                        ..held
                    } == ClaimView {
                        thing_name: ThingName::None,
                        ..want
                    }
            }
            _ => false,
        }
    }

    /// A tenant by id.
    pub fn tenant(&self, id: &str) -> Option<Arc<TenantEntry>> {
        self.inner.tenants.pin().get(id).cloned()
    }

    /// The tenant whose token hashes to `hash`.
    pub fn tenant_by_token(&self, hash: &[u8; 32]) -> Option<Arc<TenantEntry>> {
        let id = self.inner.tokens.pin().get(hash).cloned()?;
        self.tenant(&id)
    }

    /// Inserts or replaces a tenant.
    pub fn put_tenant(&self, entry: TenantEntry) {
        self.inner
            .tokens
            .pin()
            .insert(entry.token_hash, entry.tenant.id.clone());
        self.inner
            .tenants
            .pin()
            .insert(entry.tenant.id.clone(), Arc::new(entry));
    }

    /// Removes a tenant and its token.
    pub fn remove_tenant(&self, id: &str) {
        if let Some(e) = self.inner.tenants.pin().remove(id) {
            self.inner.tokens.pin().remove(&e.token_hash);
        }
    }

    /// Every tenant, sorted by id.
    pub fn tenants(&self) -> Vec<Arc<TenantEntry>> {
        let mut v: Vec<_> = self.inner.tenants.pin().values().cloned().collect();
        v.sort_by(|a, b| a.tenant.id.cmp(&b.tenant.id));
        v
    }
}

fn count(counts: &mut HashMap<Arc<str>, usize>, old: Option<Arc<str>>, new: Option<Arc<str>>) {
    if old == new {
        return;
    }
    if let Some(old) = old {
        if let Some(n) = counts.get_mut(&old) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&old);
            }
        }
    }
    if let Some(new) = new {
        *counts.entry(new).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(id: u8, tenant: &str, name: Option<&str>) -> Claim {
        Claim {
            device_id: DeviceId([id; 32]),
            tenant: Some(Arc::from(tenant)),
            state: ClaimState::Ready,
            thing_name: name.map(str::to_owned),
            redirect_id: Some("r-00112233445566778899aabb".into()),
            claimed_at: Some(1_000),
            ready_at: Some(2_000),
            redirected_at: Some(3_000),
            error: None,
            attempts: 2,
            next_attempt_at: None,
            version: 7,
        }
    }

    #[test]
    fn put_get_remove_and_revoked() {
        let cache = ClaimsCache::default();
        let id = DeviceId([9; 32]);
        assert!(cache.claim(&id).is_none());
        cache.put_claim(&Claim::revoked(id), None);
        assert!(cache.is_revoked(&id));
        assert_eq!(cache.claim(&id).unwrap().tenant, None);
        cache.remove_claim(&id);
        assert!(!cache.is_revoked(&id));
        assert!(!cache.contains(&id));
        assert_eq!(cache.claim_count(), 0);
    }

    #[test]
    fn put_replace_and_the_view_held() {
        let cache = ClaimsCache::default();
        let c = ready(1, "acme", Some("sensor-1"));
        cache.put_claim(&c, Some("sensor-1"));
        let v = cache.claim(&c.device_id).unwrap();
        assert_eq!(v.state, ClaimState::Ready);
        assert_eq!(v.tenant_id(), Some("acme"));
        assert_eq!(v.thing_name, ThingName::Own);
        assert_eq!(v.issued_at, 2_000);
        assert_eq!(
            v.redirect_id.map(|r| r.to_string()).as_deref(),
            Some("r-00112233445566778899aabb")
        );
        assert!(cache.agrees(&c.device_id, Some(&c)));
        // Replaced: registering with another tenant, named by its id, no redirect.
        let next = Claim {
            tenant: Some("globex".into()),
            state: ClaimState::Registering,
            thing_name: Some(c.device_id.to_hex()),
            redirect_id: None,
            ready_at: None,
            ..c.clone()
        };
        cache.put_claim(&next, None);
        let v = cache.claim(&c.device_id).unwrap();
        assert_eq!(v.thing_name, ThingName::DeviceId);
        assert_eq!(
            (v.state, v.tenant_id()),
            (ClaimState::Registering, Some("globex"))
        );
        assert_eq!((v.redirect_id, v.issued_at), (None, 1_000));
        assert!(cache.agrees(&c.device_id, Some(&next)));
        assert!(!cache.agrees(&c.device_id, Some(&c)));
        assert_eq!(cache.claim_count(), 1);
        // A name that is not the device's own, when that is unknown, waits for the device.
        cache.put_claim(&c, None);
        assert_eq!(
            cache.claim(&c.device_id).unwrap().thing_name,
            ThingName::Unknown
        );
        // Unnamed claims stay unnamed.
        let unnamed = Claim {
            thing_name: None,
            ..c.clone()
        };
        cache.put_claim(&unnamed, Some("sensor-1"));
        assert!(cache.claim(&c.device_id).unwrap().unnamed());
    }

    #[test]
    fn rare_names_and_redirect_ids_are_held_whole() {
        let cache = ClaimsCache::default();
        let c = ready(2, "acme", Some("acme-thing-2"));
        cache.put_claim(&c, Some("sensor-2"));
        let v = cache.claim(&c.device_id).unwrap();
        assert_eq!(v.thing_name, ThingName::Text("acme-thing-2".into()));
        assert_eq!(cache.inner.rare.len(), 1);
        assert!(cache.agrees(&c.device_id, Some(&c)));
        let odd = Claim {
            redirect_id: Some("r-legacy".into()),
            thing_name: None,
            ..c.clone()
        };
        cache.put_claim(&odd, None);
        let v = cache.claim(&c.device_id).unwrap();
        assert_eq!(v.redirect_id.unwrap().to_string(), "r-legacy");
        assert_eq!(cache.state(&c.device_id), Some(ClaimState::Ready));
        assert_eq!(cache.tenant_claim_count("acme"), 1);
        // Back to an entry of its own: the rare view goes.
        cache.put_claim(&c, Some("acme-thing-2"));
        assert_eq!(
            cache.claim(&c.device_id).unwrap().thing_name,
            ThingName::Own
        );
        assert_eq!(cache.inner.rare.len(), 0);
        cache.put_claim(&odd, None);
        cache.remove_claim(&c.device_id);
        assert_eq!(cache.inner.rare.len(), 0);
        assert!(cache.claim(&c.device_id).is_none());
    }

    #[test]
    fn tenant_indexes_and_counts() {
        let cache = ClaimsCache::default();
        for i in 0..10u8 {
            let t = if i % 2 == 0 { "acme" } else { "globex" };
            cache.put_claim(&ready(i, t, None), None);
        }
        assert_eq!(cache.tenant_claim_count("acme"), 5);
        assert_eq!(cache.tenant_claim_count("globex"), 5);
        // One index per tenant, kept for it.
        assert_eq!(cache.inner.tenant_ids.by_name.lock().len(), 2);
        let acme = cache.inner.tenant_ids.index(Some(&Arc::from("acme")));
        assert_eq!(cache.inner.tenant_ids.get(acme).map(|t| &**t), Some("acme"));
        // Moving and removing claims moves the counts; an emptied tenant counts none.
        cache.put_claim(&ready(0, "globex", None), None);
        assert_eq!(cache.tenant_claim_count("acme"), 4);
        assert_eq!(cache.tenant_claim_count("globex"), 6);
        for i in (0..10u8).step_by(2) {
            cache.remove_claim(&DeviceId([i; 32]));
        }
        assert_eq!(cache.tenant_claim_count("acme"), 0);
        assert_eq!(cache.tenant_claim_count("globex"), 5);
        // A tenant seen again gets its index back; a new one a new index, never a reused one.
        cache.put_claim(&ready(0, "acme", None), None);
        assert_eq!(cache.inner.tenant_ids.index(Some(&Arc::from("acme"))), acme);
        let initech = cache.inner.tenant_ids.index(Some(&Arc::from("initech")));
        assert_eq!(initech, 3);
        let mut seen = 0;
        cache.for_each_claim(|_, state, tenant| {
            assert_eq!(state, ClaimState::Ready);
            assert!(matches!(tenant, Some("acme" | "globex")));
            seen += 1;
        });
        assert_eq!(seen, 6);
    }

    #[test]
    fn redirect_ids_round_trip() {
        let cache = ClaimsCache::default();
        for i in 0..50u8 {
            let mut raw = [0u8; 12];
            raw.iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = i.wrapping_mul(31) ^ k as u8);
            let rid = format!("r-{}", hex::encode(raw));
            let c = Claim {
                redirect_id: Some(rid.clone()),
                ..ready(i, "acme", None)
            };
            cache.put_claim(&c, None);
            let held = cache.claim(&c.device_id).unwrap().redirect_id.unwrap();
            assert_eq!(held, RedirectId::Raw(raw));
            assert_eq!(held.to_string(), rid);
        }
        assert_eq!(cache.inner.rare.len(), 0);
    }

    #[test]
    fn readers_see_whole_claims_while_it_changes() {
        let cache = ClaimsCache::default();
        let id = DeviceId([3; 32]);
        let a = ready(3, "acme", Some("acme-thing"));
        let b = Claim {
            tenant: Some("globex".into()),
            thing_name: Some("sensor-3".into()),
            ..a.clone()
        };
        cache.put_claim(&a, Some("sensor-3"));
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 1000 {
                        let v = cache.claim(&id).expect("never missing while replaced");
                        // Either claim, never a mix of the two.
                        match (v.tenant_id(), &v.thing_name) {
                            (Some("acme"), ThingName::Text(t)) => assert_eq!(&**t, "acme-thing"),
                            (Some("globex"), ThingName::Own) => {}
                            other => panic!("a mixed view: {other:?}"),
                        }
                        reads += 1;
                    }
                });
            }
            for i in 0..20_000 {
                let c = if i % 2 == 0 { &b } else { &a };
                cache.put_claim(c, Some("sensor-3"));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(
            cache.tenant_claim_count("acme") + cache.tenant_claim_count("globex"),
            1
        );
    }
}
