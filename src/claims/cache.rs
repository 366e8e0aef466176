//! The in-memory claims map: every claim and tenant, loaded from the store at start and kept in
//! step by the claims service. The connect path reads only this (one lock-free lookup).
//!
//! Why papaya: reads never take a lock (dashmap's take a shard read lock) and resizes are
//! incremental, so a claim burst never stalls connects. Keys are SHA-256 digests already, so a
//! pass-through hasher replaces SipHash ([`IdHashBuilder`]).

use std::sync::Arc;

use crate::device::{DeviceId, IdHashBuilder};
use crate::model::{Claim, ClaimState, Tenant};

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
    claims: papaya::HashMap<DeviceId, Arc<Claim>, IdHashBuilder>,
    tenants: papaya::HashMap<String, Arc<TenantEntry>>,
    /// token hash → tenant id
    tokens: papaya::HashMap<[u8; 32], String>,
    /// Claims per tenant (quota checks, tenant deletion), kept in step by put/remove.
    per_tenant: parking_lot::Mutex<std::collections::HashMap<Arc<str>, usize>>,
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

impl ClaimsCache {
    /// The claim of a device, if any. The connect path's one lookup.
    pub fn claim(&self, id: &DeviceId) -> Option<Arc<Claim>> {
        self.inner.claims.pin().get(id).cloned()
    }

    /// True when the device is revoked (checked during the TLS handshake).
    pub fn is_revoked(&self, id: &DeviceId) -> bool {
        self.inner
            .claims
            .pin()
            .get(id)
            .is_some_and(|c| c.state == ClaimState::Revoked)
    }

    /// Inserts or replaces a claim (and counts it in `lobby_claims`).
    pub fn put_claim(&self, claim: Claim) {
        let (new_tenant, new_state) = (claim.tenant.clone(), claim.state);
        let claims = self.inner.claims.pin();
        let old = claims.insert(claim.device_id, Arc::new(claim));
        gauge_state(new_state, 1.0);
        if let Some(old) = old {
            gauge_state(old.state, -1.0);
        }
        self.count(old.and_then(|o| o.tenant.clone()), new_tenant);
    }

    /// Removes a claim.
    pub fn remove_claim(&self, id: &DeviceId) {
        let claims = self.inner.claims.pin();
        let old = claims.remove(id);
        if let Some(old) = old {
            gauge_state(old.state, -1.0);
        }
        self.count(old.and_then(|o| o.tenant.clone()), None);
    }

    /// Claims (in any state) held by a tenant.
    pub fn tenant_claim_count(&self, tenant: &str) -> usize {
        let counts = self.inner.per_tenant.lock();
        counts.get(tenant).copied().unwrap_or(0)
    }

    fn count(&self, old: Option<Arc<str>>, new: Option<Arc<str>>) {
        if old == new {
            return;
        }
        let mut counts = self.inner.per_tenant.lock();
        if let Some(old) = old {
            if let Some(n) = counts.get_mut(&old) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(new) = new {
            *counts.entry(new).or_default() += 1;
        }
    }

    /// Number of claims held.
    pub fn claim_count(&self) -> usize {
        self.inner.claims.len()
    }

    /// Calls `f` for every claim (API listings; O(n)).
    pub fn for_each_claim(&self, mut f: impl FnMut(&Arc<Claim>)) {
        for (_, c) in self.inner.claims.pin().iter() {
            f(c);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_remove_and_revoked() {
        let cache = ClaimsCache::default();
        let id = DeviceId([9; 32]);
        assert!(cache.claim(&id).is_none());
        cache.put_claim(Claim::revoked(id));
        assert!(cache.is_revoked(&id));
        cache.remove_claim(&id);
        assert!(!cache.is_revoked(&id));
    }
}
