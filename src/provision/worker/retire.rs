//! Provisioning's clean-up queue: registrations marked `removing`. A claim write marks those
//! it makes obsolete in its own transaction (an unclaim, a migration, a device ready with a
//! new tenant); this file marks the rest: what a registration created while its claim moved
//! on, and, at start, registrations whose claim is gone (left by a lobby that lost its
//! clean-up).

use super::{service_err, store_err, Job, Worker};
use crate::claims::service::Verdict;
use crate::device::DeviceId;
use crate::provision::IotError;

impl Worker {
    /// Hands the claims service a registration's verdict; when the claim moved on meanwhile,
    /// retires what the registration left behind.
    pub(super) async fn verdict(
        &self,
        id: &DeviceId,
        tenant: &str,
        outcome: Result<Option<String>, String>,
    ) -> Result<(), IotError> {
        let service = &self.inner.service;
        match service
            .registration_done(id, tenant, outcome)
            .await
            .map_err(service_err)?
        {
            Verdict::Applied => Ok(()),
            Verdict::MovedOn { keep } => self.retire_all_but(id, keep.as_deref()).await,
        }
    }

    /// Marks the device's registrations with every tenant but `keep` for removal (stored first,
    /// so a restart resumes the clean-up) and queues their removal behind the running job.
    async fn retire_all_but(&self, id: &DeviceId, keep: Option<&str>) -> Result<(), IotError> {
        let store = &self.inner.store;
        for mut reg in store.registrations(id).await.map_err(store_err)? {
            if Some(reg.tenant.as_str()) == keep {
                continue;
            }
            if !reg.removing {
                reg.removing = true;
                store.put_registration(&reg).await.map_err(store_err)?;
            }
            self.queue_behind(Job::Remove(*id, reg.tenant));
        }
        Ok(())
    }

    /// Queues `job` behind the job its device is running (this is called from inside it). A
    /// device with no job running has its stored queue read by the next sweep or start.
    fn queue_behind(&self, job: Job) {
        let mut running = self.inner.running.lock();
        match running.get_mut(&job.device()) {
            Some(queue) if !queue.contains(&job) => queue.push_back(job),
            Some(_) => {}
            None => tracing::debug!(?job, "no job of the device running; the sweep finds it"),
        }
    }

    /// The start-up sweep: registrations of devices whose claim is gone are marked for
    /// removal (then [`Self::pending`] finds them), so nothing a lost clean-up left behind
    /// stays registered in a tenant's account.
    pub(super) async fn retire_orphans(&self) {
        let store = &self.inner.store;
        let orphans = match store.orphaned_registrations().await {
            Ok(o) => o,
            Err(e) => return tracing::error!(error = %e, "cannot read orphaned registrations"),
        };
        for mut reg in orphans {
            tracing::info!(device = %reg.device_id, tenant = reg.tenant, "retiring a registration whose claim is gone");
            reg.removing = true;
            if let Err(e) = store.put_registration(&reg).await {
                tracing::error!(error = %e, "cannot mark an orphaned registration for removal");
            }
        }
    }
}
