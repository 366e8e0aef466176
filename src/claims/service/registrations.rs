//! The claims service's side of provisioning: nudging registrations and taking the
//! provisioner's verdicts. Provisioning owns its queues: a claim write marks the registrations
//! it makes obsolete in its own transaction (and says so with a [`ClaimEvent::Retiring`]);
//! anything else about registrations is the worker's.

use std::sync::Arc;

use super::{
    new_redirect_id, now_ms, owned, Bind, Changed, ClaimState, ClaimsService, Plan, Retiring,
    ServiceError,
};
use crate::claims::events::ClaimEvent;
use crate::device::{self, DeviceId};
use crate::model::{Claim, Tenant};

/// What [`ClaimsService::registration_done`] made of a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The claim shows it.
    Applied,
    /// The claim was unclaimed or moved on while the registration ran; `keep` is the tenant
    /// it is bound to now, if any. The device's registrations with every other tenant (the
    /// one just made too, perhaps stored after the unclaim marked the others) are left over.
    MovedOn { keep: Option<Arc<str>> },
}

impl ClaimsService {
    /// After a claim or migration: queue its registration (a claim ready at once retired the
    /// other registrations in its write).
    pub(super) fn after_binding(&self, claim: &Claim) {
        if claim.state == ClaimState::Registering {
            self.inner
                .events
                .emit(ClaimEvent::Registering(claim.device_id));
        }
    }

    /// The provisioner's verdict on a registration with `tenant`: `Ok(thing_name)` makes the
    /// claim ready (and retires other tenants' registrations, in the same write), `Err(reason)`
    /// failed. Ignored when the claim moved on meanwhile, which the answer says: what the
    /// registration created must then not outlive it.
    pub async fn registration_done(
        &self,
        id: &DeviceId,
        tenant: &str,
        outcome: Result<Option<String>, String>,
    ) -> Result<Verdict, ServiceError> {
        let changed = self
            .change_claim(id, None, true, |current, taken| {
                let Some(c) = current.filter(|c| c.registering_with(tenant)) else {
                    return Ok(None);
                };
                let mut c = (**c).clone();
                c.attempts = c.attempts.saturating_add(1);
                c.next_attempt_at = None;
                let retire = match &outcome {
                    Ok(thing_name) => {
                        let now = now_ms();
                        c.state = ClaimState::Ready;
                        // The reserved name stands when the registration's is taken.
                        if !taken {
                            c.thing_name = thing_name.clone().or(c.thing_name);
                        }
                        c.redirect_id = Some(new_redirect_id());
                        c.ready_at = Some(now);
                        c.error = None;
                        Retiring::AllButOwn
                    }
                    Err(reason) => {
                        c.state = ClaimState::Failed;
                        c.error = Some(reason.clone());
                        Retiring::Nothing
                    }
                };
                Ok(Some(Plan {
                    claim: Some(c),
                    bind: Bind::No,
                    retire,
                }))
            })
            .await?;
        Ok(match changed {
            Changed::Written(_) => Verdict::Applied,
            Changed::Unchanged(current) => Verdict::MovedOn {
                keep: current.and_then(|c| c.tenant.clone()),
            },
        })
    }

    /// A registration attempt with `tenant` failed for a retryable reason: the device stays
    /// `registering` and shows `reason` (tenant-facing), one more attempt, and when the next is
    /// (`next_at`, Unix ms). Ignored when the claim moved on meanwhile.
    pub async fn registration_retrying(
        &self,
        id: &DeviceId,
        tenant: &str,
        reason: &str,
        next_at: i64,
    ) -> Result<(), ServiceError> {
        self.change_claim(id, None, false, |current, _| {
            let Some(c) = current.filter(|c| c.registering_with(tenant)) else {
                return Ok(None);
            };
            Ok(Some(Plan {
                claim: Some(Claim {
                    error: Some(reason.to_owned()),
                    attempts: c.attempts.saturating_add(1),
                    next_attempt_at: Some(next_at),
                    ..(**c).clone()
                }),
                bind: Bind::No,
                retire: Retiring::Nothing,
            }))
        })
        .await
        .map(drop)
    }

    /// Queues a `failed` registration again (`POST /v1/devices/{id}/retry`; `by_tenant`: the
    /// caller's tenant, `None` for the operator): the device is `registering` once more, its
    /// error and attempt count cleared. Any other state is a 409 `conflict`; someone else's device is 404.
    pub async fn retry(
        &self,
        id: &DeviceId,
        by_tenant: Option<&str>,
    ) -> Result<Arc<Claim>, ServiceError> {
        let (svc, id, by_tenant) = (self.clone(), *id, by_tenant.map(str::to_owned));
        self.detached(async move {
            let changed = svc
                .change_claim(&id, None, true, |current, _| {
                    let c = owned(current, by_tenant.as_deref())?;
                    if c.state != ClaimState::Failed {
                        return Err(ServiceError::Conflict(format!(
                            "the device is {}, not failed",
                            c.state.as_str()
                        )));
                    }
                    Ok(Some(Plan {
                        claim: Some(Claim {
                            state: ClaimState::Registering,
                            error: None,
                            attempts: 0,
                            next_attempt_at: None,
                            ..(**c).clone()
                        }),
                        bind: Bind::No,
                        retire: Retiring::Nothing,
                    }))
                })
                .await?;
            let claim = match changed {
                Changed::Unchanged(c) | Changed::Written(c) => c.ok_or(ServiceError::NotFound)?,
            };
            svc.after_binding(&claim);
            Ok(claim)
        })
        .await
    }

    /// Stores the endpoint DescribeEndpoint found for a tenant that had none.
    pub async fn set_tenant_endpoint(&self, id: &str, endpoint: &str) -> Result<(), ServiceError> {
        let set = |mut t: Tenant| {
            t.endpoint.get_or_insert_with(|| endpoint.to_owned());
            Ok(t)
        };
        self.patch_tenant(id, &set)
            .await?
            .map(drop)
            .ok_or(ServiceError::NotFound)
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
                .set_cert_pem(id, &device::der_to_pem(der))
                .await?;
        }
        self.inner.events.emit(ClaimEvent::Registering(*id));
        Ok(())
    }
}
