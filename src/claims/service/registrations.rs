//! The claims service's side of provisioning: queueing registrations, retiring registrations
//! with tenants a device left, and taking the provisioner's verdicts.

use super::{new_redirect_id, now_ms, ClaimState, ClaimsService, ServiceError, TenantEntry};
use crate::claims::model::Claim;
use crate::edge::identity::{self, DeviceId};
use crate::provision::Job;

impl ClaimsService {
    /// After a claim or migration: queue its registration, or (ready at once) retire the
    /// registrations with other tenants.
    pub(super) async fn after_binding(&self, claim: &Claim) -> Result<(), ServiceError> {
        match (claim.state, claim.tenant_id()) {
            (ClaimState::Registering, _) => {
                self.inner
                    .provisioner
                    .enqueue(Job::Register(claim.device_id));
                Ok(())
            }
            (ClaimState::Ready, Some(t)) => {
                self.retire_registrations(&claim.device_id, Some(t)).await
            }
            _ => Ok(()),
        }
    }

    /// Marks the device's registrations with every tenant but `keep` for removal and queues
    /// the clean-up (stored first, so a restart resumes it).
    pub(super) async fn retire_registrations(
        &self,
        id: &DeviceId,
        keep: Option<&str>,
    ) -> Result<(), ServiceError> {
        for mut reg in self.inner.store.registrations(id).await? {
            if Some(reg.tenant.as_str()) == keep {
                continue;
            }
            if !reg.removing {
                reg.removing = true;
                self.inner.store.put_registration(&reg).await?;
            }
            self.inner.provisioner.enqueue(Job::Remove(*id, reg.tenant));
        }
        Ok(())
    }

    /// The provisioner's verdict on a registration with `tenant`: `Ok(thing_name)` makes the
    /// claim ready (and retires other tenants' registrations), `Err(reason)` failed. Ignored
    /// when the claim moved on meanwhile.
    pub async fn registration_done(
        &self,
        id: &DeviceId,
        tenant: &str,
        outcome: Result<Option<String>, String>,
    ) -> Result<(), ServiceError> {
        let _w = self.write().await?;
        let current = self.inner.cache.claim(id);
        let Some(c) =
            current.filter(|c| c.state == ClaimState::Registering && c.tenant_id() == Some(tenant))
        else {
            // Unclaimed or moved on while the registration ran: what it created (perhaps
            // stored after the unclaim queued the clean-up) must not outlive it.
            let keep = self.inner.cache.claim(id).and_then(|c| c.tenant.clone());
            return self.retire_registrations(id, keep.as_deref()).await;
        };
        let mut c = (*c).clone();
        match outcome {
            Ok(thing_name) => {
                let now = now_ms();
                c.state = ClaimState::Ready;
                c.thing_name = thing_name.or(c.thing_name);
                c.redirect_id = Some(new_redirect_id());
                c.ready_at = Some(now);
                c.error = None;
                self.commit(c, None).await?;
                self.retire_registrations(id, Some(tenant)).await
            }
            Err(reason) => {
                c.state = ClaimState::Failed;
                c.error = Some(reason);
                self.commit(c, None).await.map(drop)
            }
        }
    }

    /// Stores the endpoint DescribeEndpoint found for a tenant that had none.
    pub async fn set_tenant_endpoint(&self, id: &str, endpoint: &str) -> Result<(), ServiceError> {
        let _w = self.write().await?;
        let entry = self.inner.cache.tenant(id).ok_or(ServiceError::NotFound)?;
        if entry.tenant.endpoint.is_some() {
            return Ok(());
        }
        let mut tenant = entry.tenant.clone();
        tenant.endpoint = Some(endpoint.to_owned());
        self.inner.store.update_tenant(&tenant).await?;
        self.inner.cache.put_tenant(TenantEntry {
            tenant,
            token_hash: entry.token_hash,
        });
        Ok(())
    }

    /// A registering device connected: keep its certificate (registration needs the PEM) and
    /// nudge the provisioner.
    pub(super) async fn cert_seen(&self, id: &DeviceId, der: &[u8]) -> Result<(), ServiceError> {
        let registering = self
            .inner
            .cache
            .claim(id)
            .is_some_and(|c| c.state == ClaimState::Registering);
        if !registering {
            return Ok(());
        }
        if self.inner.store.cert_pem(id).await?.is_none() {
            self.inner
                .store
                .set_cert_pem(id, &identity::der_to_pem(der))
                .await?;
        }
        self.inner.provisioner.enqueue(Job::Register(*id));
        Ok(())
    }
}
