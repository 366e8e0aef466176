//! The claims service's tenants: create, change, delete, each written to the store first and
//! then to the map, and the checks a tenant's settings get before it is stored.

use super::*;

impl ClaimsService {
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
        let svc = self.clone();
        self.detached(async move {
            let hash = token_hash(&token);
            let _t = svc.inner.tenant_writes.lock().await;
            let stored = StoredTenant {
                tenant: tenant.clone(),
                token_hash: hex::encode(hash),
            };
            match svc.inner.store.insert_tenant(&stored).await {
                Err(StoreError::Conflict) => {
                    return Err(ServiceError::Conflict(format!(
                        "tenant {:?} exists",
                        tenant.id
                    )))
                }
                other => other?,
            }
            svc.inner.cache.put_tenant(TenantEntry {
                tenant: tenant.clone(),
                token_hash: hash,
            });
            Ok((tenant, token))
        })
        .await
    }

    /// Applies a PATCH to a tenant (to the stored one, under its lock in the store). Devices
    /// see the change when they next connect or are woken.
    pub async fn update_tenant(
        &self,
        id: &str,
        patch: TenantInput,
    ) -> Result<Tenant, ServiceError> {
        let (svc, id) = (self.clone(), id.to_owned());
        self.detached(async move {
            let apply = move |t: Tenant| {
                let t = patch.clone().apply_to(t).map_err(refusal)?;
                check_supported(&t).map_err(refusal)?;
                Ok(t)
            };
            svc.patch_tenant(&id, &apply)
                .await?
                .ok_or(ServiceError::NotFound)
        })
        .await
    }

    /// Stores `patch` of tenant `id` and puts the result in the map; `None`: no such tenant.
    pub(super) async fn patch_tenant(
        &self,
        id: &str,
        patch: crate::store::TenantPatch<'_>,
    ) -> Result<Option<Tenant>, ServiceError> {
        let _t = self.inner.tenant_writes.lock().await;
        let tenant = match self.inner.store.update_tenant(id, patch).await? {
            TenantUpdated::Updated(t) => *t,
            TenantUpdated::NotFound => {
                self.inner.cache.remove_tenant(id);
                return Ok(None);
            }
            TenantUpdated::Refused(why) => return Err(ServiceError::Invalid(why)),
        };
        match self.inner.cache.tenant(id) {
            Some(entry) => self.inner.cache.put_tenant(TenantEntry {
                tenant: tenant.clone(),
                token_hash: entry.token_hash,
            }),
            // Created on another node a moment ago: the store has its token hash.
            None => self.apply_tenant(id).await?,
        }
        // Ready devices waiting on this tenant may now have somewhere to go.
        self.wake_tenant(id);
        Ok(Some(tenant))
    }

    /// Deletes a tenant that no claim names (the store checks, in the same transaction).
    pub async fn delete_tenant(&self, id: &str) -> Result<(), ServiceError> {
        let (svc, id) = (self.clone(), id.to_owned());
        self.detached(async move {
            let _t = svc.inner.tenant_writes.lock().await;
            // The store decides: a tenant another node created a moment ago is deleted too,
            // and one already gone leaves the map as well.
            match svc.inner.store.delete_tenant(&id).await? {
                TenantDeleted::Deleted => {
                    svc.inner.cache.remove_tenant(&id);
                    Ok(())
                }
                TenantDeleted::NotFound => {
                    svc.inner.cache.remove_tenant(&id);
                    Err(ServiceError::NotFound)
                }
                TenantDeleted::HasClaims => Err(ServiceError::Conflict(format!(
                    "tenant {id:?} still has devices"
                ))),
            }
        })
        .await
    }

    pub(super) fn wake_tenant(&self, tenant: &str) {
        self.inner.cache.for_each_claim(|id, _, t| {
            if t == Some(tenant) {
                self.inner.waiting.wake(id);
            }
        });
    }
}

/// A stored tenant as the map holds it (its token hash decoded).
pub(super) fn tenant_entry(t: StoredTenant) -> Result<TenantEntry, StoreError> {
    let mut token_hash = [0u8; 32];
    hex::decode_to_slice(&t.token_hash, &mut token_hash)
        .map_err(|_| StoreError::Corrupt(format!("token hash of {}", t.tenant.id)))?;
    Ok(TenantEntry {
        tenant: t.tenant,
        token_hash,
    })
}

/// Rejects what this build cannot serve yet, rather than accepting a tenant whose devices would
/// wait forever.
fn check_supported(t: &Tenant) -> Result<(), ServiceError> {
    if let (Mode::Bridge, Some(b)) = (t.mode, &t.bridge) {
        // Load the upstream TLS files now, so a typo is a 400 rather than devices that wait.
        let path = std::path::Path::new;
        crate::pem::client_config(path(&b.ca), path(&b.cert), path(&b.key))
            .map_err(|e| ServiceError::Invalid(format!("bridge.{e}")))?;
    }
    Ok(())
}
