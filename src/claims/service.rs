//! The claims service: every change to tenants and claims goes through here, in this order:
//! validate → write the store (durable) → update the map → wake the device's session.
//!
//! Mutations are serialised by one async lock: they are rare control-plane events, and one
//! lock makes "second tenant claiming gets 409" and quota checks exact without store-level
//! transactions. Reads (API, device path) never take it.

use std::sync::Arc;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex};

use super::cache::{ClaimsCache, TenantEntry};
use super::codes::ClaimKeys;
use super::model::{now_ms, Backend, Claim, ClaimState, Mode, Tenant};
use super::tenant_input::TenantInput;

mod cluster;
mod names;
mod registrations;
use crate::edge::identity::DeviceId;
use crate::provision::Provisioner;
use crate::store::{Store, StoreError, StoredTenant};
use crate::waiting::WaitingRoom;

/// Why a control-plane request failed; the API maps each to a SPEC §6 error code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("not found")]
    NotFound,
    #[error("invalid claim code")]
    InvalidCode,
    #[error("device is claimed by another tenant")]
    AlreadyClaimed,
    #[error("{0}")]
    Conflict(String),
    #[error("tenant has reached max_devices")]
    QuotaExceeded,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A device activity reported by the device path, applied to the store in the background.
#[derive(Debug)]
pub enum Activity {
    /// A redirect reached the device.
    Redirected {
        device_id: DeviceId,
        redirect_id: String,
        at: i64,
    },
    /// A device whose registration waits, or whose claim has no thing name yet, connected:
    /// its certificate, from the handshake. `named` is answered once the claim is named (or
    /// needed no name); the session waits for it at connect, so it routes by the claim's name.
    CertSeen {
        device_id: DeviceId,
        cert_der: Vec<u8>,
        named: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

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
    provisioner: Provisioner,
    /// Serialises this node's mutations; with a shared store, the store's lock serialises the
    /// nodes (see `cluster`).
    write: Mutex<()>,
    /// The newest change-log entry applied to the map.
    applied: Mutex<i64>,
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
        provisioner: Provisioner,
    ) -> Result<Self, ServiceError> {
        let cache = ClaimsCache::default();
        // Read before loading: a change committed meanwhile is applied again, never missed.
        let applied = store.last_change().await?;
        for t in store.tenants().await? {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&t.token_hash, &mut hash)
                .map_err(|_| StoreError::Corrupt(format!("token hash of {}", t.tenant.id)))?;
            cache.put_tenant(TenantEntry {
                tenant: t.tenant,
                token_hash: hash,
            });
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
                provisioner,
                write: Mutex::new(()),
                applied: Mutex::new(applied),
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

    /// Creates a tenant; returns it with its token (shown once, stored hashed).
    pub async fn create_tenant(
        &self,
        input: TenantInput,
    ) -> Result<(Tenant, String), ServiceError> {
        let id = input
            .id
            .clone()
            .unwrap_or_else(|| format!("t-{}", random_hex(6)));
        let tenant = input.into_tenant(id)?;
        check_supported(&tenant)?;
        let token = format!("lobby_t_{}", random_hex(32));
        let hash = token_hash(&token);
        let _w = self.write().await?;
        let stored = StoredTenant {
            tenant: tenant.clone(),
            token_hash: hex::encode(hash),
        };
        match self.inner.store.insert_tenant(&stored).await {
            Err(StoreError::Conflict) => {
                return Err(ServiceError::Conflict(format!(
                    "tenant {:?} exists",
                    tenant.id
                )))
            }
            other => other?,
        }
        self.inner.cache.put_tenant(TenantEntry {
            tenant: tenant.clone(),
            token_hash: hash,
        });
        Ok((tenant, token))
    }

    /// Applies a PATCH to a tenant. Devices see the change when they next connect or are woken.
    pub async fn update_tenant(
        &self,
        id: &str,
        patch: TenantInput,
    ) -> Result<Tenant, ServiceError> {
        let _w = self.write().await?;
        let entry = self.inner.cache.tenant(id).ok_or(ServiceError::NotFound)?;
        let tenant = patch.apply_to(entry.tenant.clone())?;
        check_supported(&tenant)?;
        self.inner.store.update_tenant(&tenant).await?;
        self.inner.cache.put_tenant(TenantEntry {
            tenant: tenant.clone(),
            token_hash: entry.token_hash,
        });
        // Ready devices waiting on this tenant may now have somewhere to go.
        self.wake_tenant(id);
        Ok(tenant)
    }

    /// Deletes a tenant that has no devices.
    pub async fn delete_tenant(&self, id: &str) -> Result<(), ServiceError> {
        let _w = self.write().await?;
        self.inner.cache.tenant(id).ok_or(ServiceError::NotFound)?;
        if self.tenant_device_count(id) > 0 {
            return Err(ServiceError::Conflict(format!(
                "tenant {id:?} still has devices"
            )));
        }
        self.inner.store.delete_tenant(id).await?;
        self.inner.cache.remove_tenant(id);
        Ok(())
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
        let _w = self.write().await?;
        let entry = self
            .inner
            .cache
            .tenant(tenant_id)
            .ok_or(ServiceError::NotFound)?;
        if let Some(existing) = self.inner.cache.claim(&device_id) {
            match existing.tenant_id() {
                _ if existing.state == ClaimState::Revoked => {
                    return Err(ServiceError::Conflict("device is revoked".into()))
                }
                Some(t) if t == tenant_id => {
                    return Ok(ClaimOutcome {
                        created: false,
                        claim: existing,
                    })
                }
                _ => return Err(ServiceError::AlreadyClaimed),
            }
        }
        if let Some(max) = entry.tenant.max_devices {
            if self.tenant_device_count(tenant_id) as u64 >= max {
                return Err(ServiceError::QuotaExceeded);
            }
        }
        let own = match cert_name {
            Some(n) => Some(n),
            None => self.seen_thing_name(&device_id).await?,
        };
        let thing_name = match own {
            Some(n) => Some(self.unique_thing_name(tenant_id, &n, &device_id).await?),
            None => None, // named when the device connects (`name_claim`)
        };
        let claim = self.bound_claim(device_id, &entry.tenant, thing_name, now_ms());
        let claim = self.commit(claim, cert_pem).await?;
        self.after_binding(&claim).await?;
        Ok(ClaimOutcome {
            created: true,
            claim,
        })
    }

    /// Unclaims a device (`by_tenant`: the caller's tenant, `None` for the operator).
    pub async fn unclaim(
        &self,
        id: &DeviceId,
        by_tenant: Option<&str>,
    ) -> Result<(), ServiceError> {
        let _w = self.write().await?;
        let existing = self.owned_claim(id, by_tenant)?;
        if existing.state == ClaimState::Revoked {
            // Revocation outlives the claim: keep refusing the device.
            let mut c = (*existing).clone();
            c.tenant = None;
            self.commit(c, None).await?;
            return Ok(());
        }
        self.inner.store.delete_claim(id).await?;
        gauge_state(existing.state, -1.0);
        self.inner.cache.remove_claim(id);
        self.inner.waiting.wake(id);
        self.retire_registrations(id, None).await
    }

    /// Moves a claimed device to another tenant with a new redirect.
    pub async fn migrate(&self, id: &DeviceId, to: &str) -> Result<Arc<Claim>, ServiceError> {
        let _w = self.write().await?;
        let existing = self.owned_claim(id, None)?;
        if existing.state == ClaimState::Revoked {
            return Err(ServiceError::Conflict("device is revoked".into()));
        }
        let entry = self
            .inner
            .cache
            .tenant(to)
            .ok_or_else(|| ServiceError::Invalid(format!("no tenant {to:?}")))?;
        if existing.tenant_id() == Some(to) {
            return Ok(existing);
        }
        if let Some(max) = entry.tenant.max_devices {
            if self.tenant_device_count(to) as u64 >= max {
                return Err(ServiceError::QuotaExceeded);
            }
        }
        let thing_name = match &existing.thing_name {
            Some(n) => Some(self.unique_thing_name(to, n, id).await?),
            None => None,
        };
        let claim = self.bound_claim(*id, &entry.tenant, thing_name, now_ms());
        // The old registration stays until the new one is ready (see `registration_done`).
        let claim = self.commit(claim, None).await?;
        self.after_binding(&claim).await?;
        Ok(claim)
    }

    /// Revokes a device: refused at the handshake from now on, its connection closed.
    pub async fn revoke(&self, id: &DeviceId) -> Result<Arc<Claim>, ServiceError> {
        let _w = self.write().await?;
        let existing = self.inner.cache.claim(id);
        let seen = self.inner.waiting.seen(id);
        // A fleet's node knows only the devices it has seen; the device may wait on another.
        if existing.is_none() && seen.is_none() && !self.inner.store.shared() {
            return Err(ServiceError::NotFound);
        }
        let claim = match existing {
            Some(c) => Claim {
                state: ClaimState::Revoked,
                redirect_id: None,
                ..(*c).clone()
            },
            None => Claim {
                thing_name: seen.map(|s| s.thing_name.to_string()),
                ..Claim::revoked(*id)
            },
        };
        self.commit(claim, None).await
    }

    /// Applies device-path activity until the channel closes or `cancel` fires (then what is
    /// already queued).
    pub async fn run_activity(
        self,
        mut rx: mpsc::Receiver<Activity>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let activity = tokio::select! {
                a = rx.recv() => a,
                // Stopping: what is queued still gets stored, then the task ends (the edge's
                // sender lives as long as the lobby, so the channel would never close).
                () = cancel.cancelled() => rx.try_recv().ok(),
            };
            let Some(activity) = activity else {
                return;
            };
            let (device_id, redirect_id, at) = match activity {
                Activity::Redirected {
                    device_id,
                    redirect_id,
                    at,
                } => (device_id, redirect_id, at),
                Activity::CertSeen {
                    device_id,
                    cert_der,
                    named,
                } => {
                    if let Err(e) = self.name_claim(&device_id, &cert_der).await {
                        tracing::warn!(error = %e, "naming a claim failed");
                    }
                    if let Some(named) = named {
                        let _ = named.send(());
                    }
                    if let Err(e) = self.cert_seen(&device_id, &cert_der).await {
                        tracing::warn!(error = %e, "storing a device certificate failed");
                    }
                    continue;
                }
            };
            let _w = match self.write().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "recording a redirect failed");
                    continue;
                }
            };
            let Some(c) = self.inner.cache.claim(&device_id) else {
                continue;
            };
            // Superseded by a migration or unclaim meanwhile, or already recorded: a v3.1.1
            // device that reconnects before leaving is redirected again, but one store write
            // per redirect is enough.
            if c.redirect_id.as_deref() != Some(&redirect_id) || c.redirected_at.is_some() {
                continue;
            }
            let mut c = (*c).clone();
            c.redirected_at = Some(at);
            if let Err(e) = self.commit(c, None).await {
                tracing::warn!(error = %e, "recording a redirect failed");
            }
        }
    }

    /// The claim of `id` as seen by `by_tenant` (`None`: operator): another tenant's is NotFound.
    pub fn owned_claim(
        &self,
        id: &DeviceId,
        by_tenant: Option<&str>,
    ) -> Result<Arc<Claim>, ServiceError> {
        let c = self.inner.cache.claim(id).ok_or(ServiceError::NotFound)?;
        match by_tenant {
            Some(t) if c.tenant_id() != Some(t) => Err(ServiceError::NotFound),
            _ => Ok(c),
        }
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
        }
    }

    /// Store first (durable), then the map, then the device.
    async fn commit(
        &self,
        claim: Claim,
        cert_pem: Option<&str>,
    ) -> Result<Arc<Claim>, ServiceError> {
        self.inner.store.put_claim(&claim, cert_pem).await?;
        let id = claim.device_id;
        let old = self.inner.cache.claim(&id);
        if let Some(old) = &old {
            gauge_state(old.state, -1.0);
        }
        gauge_state(claim.state, 1.0);
        self.inner.cache.put_claim(claim);
        self.inner.waiting.wake(&id);
        self.inner.cache.claim(&id).ok_or(ServiceError::NotFound)
    }

    fn tenant_device_count(&self, tenant: &str) -> usize {
        self.inner.cache.tenant_claim_count(tenant)
    }

    fn wake_tenant(&self, tenant: &str) {
        self.inner.cache.for_each_claim(|c| {
            if c.tenant_id() == Some(tenant) {
                self.inner.waiting.wake(&c.device_id);
            }
        });
    }
}

/// Rejects what this build cannot serve yet, rather than accepting a tenant whose devices would
/// wait forever.
fn check_supported(t: &Tenant) -> Result<(), ServiceError> {
    if let (Mode::Bridge, Some(b)) = (t.mode, &t.bridge) {
        // Load the upstream TLS files now, so a typo is a 400 rather than devices that wait.
        crate::bridge::client_tls(b).map_err(|e| ServiceError::Invalid(e.to_string()))?;
    }
    Ok(())
}

fn gauge_state(state: ClaimState, delta: f64) {
    metrics::gauge!(crate::metrics::CLAIMS, "state" => state.as_str()).increment(delta);
}
