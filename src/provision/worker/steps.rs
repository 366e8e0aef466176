//! The AWS steps of a job: registering a device in its tenant's account (certificate, thing,
//! principal, policy, endpoint) and removing what the lobby created there. Each step is
//! idempotent, so a job retried or taken over after a crash never duplicates anything; the
//! scheduling around them (leases, backoff, pacing) is the worker's.

use tokio::time::Instant;

use super::{registration_metric, service_err, store_err, Worker};
use crate::device::{self, DeviceId};
use crate::model::{AwsIotBackend, Backend, CertRef, ClaimState, Registration};
use crate::provision::{thing_name, IotApi, IotError};

impl Worker {
    /// Registers a `registering` device in its tenant's account; each step is idempotent.
    pub(super) async fn register(&self, id: &DeviceId) -> Result<(), IotError> {
        let service = &self.inner.service;
        let Some(claim) = service.cache().claim(id) else {
            return Ok(());
        };
        let (ClaimState::Registering, Some(tenant_id)) = (claim.state, claim.tenant.clone()) else {
            return Ok(());
        };
        let Some(tenant) = service.cache().tenant(&tenant_id) else {
            return Ok(());
        };
        let Backend::AwsIot(backend) = &tenant.tenant.backend else {
            // The tenant switched to a backend with nothing to register.
            return self.verdict(id, &tenant_id, Ok(None)).await;
        };
        let Some(pem) = self.inner.store.cert_pem(id).await.map_err(store_err)? else {
            tracing::debug!(device_id = %id, "registration waits for the device's certificate");
            return Ok(());
        };
        let started = Instant::now();
        let cn = device::cert_pem_to_der(&pem)
            .ok()
            .and_then(|der| device::common_name(&der));
        let own = device::thing_name_for(cn.as_deref(), id);
        let candidate = thing_name(backend.thing_name.as_deref(), &own, id);
        // Reserved on the claim before anything is created: two devices never share a thing.
        let Some(thing) = service
            .reserve_thing_name(id, &tenant_id, &candidate)
            .await
            .map_err(service_err)?
        else {
            return Ok(()); // the claim moved on
        };
        self.pace(backend).await;
        let api = self.inner.factory.client(&tenant_id, backend).await?;
        let (mut reg, revived) = self.registration(id, &tenant_id, backend, &thing).await?;
        let cert = self
            .ensure_certificate(api.as_ref(), &mut reg, revived, &pem)
            .await?;
        self.pace(backend).await;
        api.create_thing(&thing).await?;
        self.pace(backend).await;
        api.attach_thing_principal(&thing, &cert.arn).await?;
        self.pace(backend).await;
        api.attach_policy(&backend.policy_name, &cert.arn).await?;
        if tenant.tenant.endpoint.is_none() {
            self.pace(backend).await;
            let endpoint = api.describe_endpoint().await?;
            service
                .set_tenant_endpoint(&tenant_id, &endpoint)
                .await
                .map_err(service_err)?;
        }
        registration_metric("ready", started);
        self.verdict(id, &tenant_id, Ok(Some(thing))).await
    }

    /// The certificate registered and ACTIVE: the stored one (re-activated when the
    /// registration was being removed), or a new registration (an existing one re-activated:
    /// it may be left over from a clean-up that stopped half-way).
    async fn ensure_certificate(
        &self,
        api: &dyn IotApi,
        reg: &mut Registration,
        revived: bool,
        pem: &str,
    ) -> Result<CertRef, IotError> {
        let backend = reg.backend.clone();
        if let Some(c) = reg.cert.clone() {
            if !revived {
                return Ok(c);
            }
            self.pace(&backend).await;
            match api.activate_certificate(&c.id).await {
                Ok(()) => return Ok(c),
                Err(IotError::NotFound { .. }) => {} // deleted meanwhile: register again
                Err(e) => return Err(e),
            }
        }
        self.pace(&backend).await;
        let cert = match api.register_certificate(pem).await {
            Ok(c) => c,
            Err(IotError::AlreadyExists {
                id: Some(id),
                arn: Some(arn),
            }) => {
                self.pace(&backend).await;
                api.activate_certificate(&id).await?;
                CertRef { id, arn }
            }
            Err(IotError::AlreadyExists { .. }) => {
                return Err(IotError::Permanent {
                    code: "ResourceAlreadyExistsException".into(),
                    message: "certificate exists but its id was not returned".into(),
                })
            }
            Err(e) => return Err(e),
        };
        reg.cert = Some(cert.clone());
        self.inner
            .store
            .put_registration(reg)
            .await
            .map_err(store_err)?;
        Ok(cert)
    }

    /// The stored registration for (device, tenant), created (and stored) before the first call;
    /// `true` when it was queued for removal (a device migrated away and straight back).
    async fn registration(
        &self,
        id: &DeviceId,
        tenant: &str,
        backend: &AwsIotBackend,
        thing: &str,
    ) -> Result<(Registration, bool), IotError> {
        let existing = self
            .inner
            .store
            .registrations(id)
            .await
            .map_err(store_err)?;
        let mut reg = existing
            .into_iter()
            .find(|r| {
                r.tenant == tenant
                    && r.backend.role_arn == backend.role_arn
                    && r.backend.region == backend.region
            })
            .unwrap_or_else(|| Registration {
                device_id: *id,
                tenant: tenant.to_owned(),
                backend: backend.clone(),
                thing_name: thing.to_owned(),
                cert: None,
                removing: false,
            });
        let revived = reg.removing;
        reg.backend = backend.clone();
        reg.thing_name = thing.to_owned();
        reg.removing = false;
        self.inner
            .store
            .put_registration(&reg)
            .await
            .map_err(store_err)?;
        Ok((reg, revived))
    }

    /// Removes what the lobby created for (device, tenant): deactivate and detach the
    /// certificate, delete it, delete the thing. Anything already gone counts as removed.
    pub(super) async fn remove(&self, id: &DeviceId, tenant: &str) -> Result<(), IotError> {
        let regs = self
            .inner
            .store
            .registrations(id)
            .await
            .map_err(store_err)?;
        let Some(reg) = regs.into_iter().find(|r| r.tenant == tenant && r.removing) else {
            return Ok(());
        };
        let b = &reg.backend;
        self.pace(b).await;
        let api = self.inner.factory.client(tenant, b).await?;
        if let Some(cert) = &reg.cert {
            self.pace(b).await;
            api.deactivate_certificate(&cert.id).await?;
            self.pace(b).await;
            api.detach_thing_principal(&reg.thing_name, &cert.arn)
                .await?;
            self.pace(b).await;
            api.detach_policy(&b.policy_name, &cert.arn).await?;
            self.pace(b).await;
            api.delete_certificate(&cert.id).await?;
        }
        self.pace(b).await;
        api.delete_thing(&reg.thing_name).await?;
        self.inner
            .store
            .delete_registration(id, tenant)
            .await
            .map_err(store_err)?;
        metrics::counter!(crate::metrics::REGISTRATIONS_TOTAL, "backend" => "aws-iot", "outcome" => "removed")
            .increment(1);
        Ok(())
    }
}
