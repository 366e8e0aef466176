//! The claim lifecycle (SPEC §3, §5): claim (one, or a batch), unclaim, migrate, revoke. Each
//! is decided on the stored claim and written through [`ClaimsService::change_claim`].

use std::sync::Arc;

use super::{
    new_redirect_id, Bind, Changed, ClaimOutcome, ClaimsService, Plan, Retiring, ServiceError,
};
use crate::device::DeviceId;
use crate::model::{now_ms, Backend, Claim, ClaimState, Tenant};

/// How many of a batch's claims are in flight at once: enough to fill a group commit (and
/// PostgreSQL's pool), few enough that one batch leaves room for other callers.
const BATCH_IN_FLIGHT: usize = 64;

impl ClaimsService {
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

    /// The claim of `id` as stored, as seen by `by_tenant` (`None`: operator): another
    /// tenant's is NotFound.
    pub async fn owned_claim(
        &self,
        id: &DeviceId,
        by_tenant: Option<&str>,
    ) -> Result<Arc<Claim>, ServiceError> {
        let stored = self.inner.store.claim(id).await?.map(Arc::new);
        owned(stored.as_ref(), by_tenant).cloned()
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

/// `claim` as seen by `by_tenant` (`None`: operator): another tenant's is NotFound.
pub(super) fn owned<'a>(
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
