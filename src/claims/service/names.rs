//! Thing names of claimed devices: unique per tenant, derived from certificate names that are
//! attacker text.
//!
//! A device's own name is [`device::thing_name_for`] of its CN (the CN when it is a usable
//! AWS IoT thing name, else the device id). A claim stores the name it is known by in its
//! tenant (bridge topics, redirects, the AWS thing), and that name is held by one device of the
//! tenant at most: a claim whose name another device of the tenant holds gets its device id
//! instead. Device ids never collide (a CN spelling another device's id is not usable), and the
//! store's unique index decides between writers on any node: a write whose name is taken comes
//! back `NameTaken` and is decided again with the device id.

use super::{Bind, Changed, ClaimsService, Plan, Retiring, ServiceError};
use crate::device::{self, DeviceId};
use crate::model::Claim;
use crate::route::{ClaimView, ThingName};

impl ClaimsService {
    /// The thing name a claim's `cert_pem` gives its device ([`device::thing_name_for`]).
    pub(super) fn cert_thing_name(&self, id: &DeviceId, pem: &str) -> Result<String, ServiceError> {
        let der = device::cert_pem_to_der(pem)
            .map_err(|e| ServiceError::Invalid(format!("cert_pem: {e}")))?;
        if DeviceId::from_cert_der(&der) != *id {
            return Err(ServiceError::Invalid(
                "cert_pem is not the certificate of the device in the code".into(),
            ));
        }
        Ok(device::thing_name_for(
            device::common_name(&der).as_deref(),
            id,
        ))
    }

    /// `wanted` when it is usable for `id` and was not found taken in `tenant` (`taken`), else
    /// the device id.
    pub(super) fn free_thing_name(
        &self,
        tenant: &str,
        wanted: &str,
        id: &DeviceId,
        taken: bool,
    ) -> String {
        if !device::usable_thing_name(wanted, id) {
            return id.to_hex();
        }
        if taken {
            tracing::info!(device_id = %id, tenant, thing_name = wanted, "thing name taken in the tenant; the device id stands in");
            return id.to_hex();
        }
        wanted.to_owned()
    }

    /// The device's own name as far as this node knows it without its certificate: from its
    /// connection here, or (in a fleet) from the node that saw it. Re-derived, so a name another
    /// node stored raw never passes.
    pub(super) async fn seen_thing_name(
        &self,
        id: &DeviceId,
    ) -> Result<Option<String>, ServiceError> {
        if let Some(seen) = self.inner.waiting.seen(id) {
            return Ok(Some(device::thing_name_for(Some(&*seen.thing_name), id)));
        }
        let Some(fleet) = self.inner.store.fleet() else {
            return Ok(None);
        };
        let presence = fleet.presence(Some(id)).await?;
        Ok(presence
            .first()
            .map(|p| device::thing_name_for(Some(&p.thing_name), id)))
    }

    /// A claimed device without a thing name (claimed before it was ever seen, without its
    /// certificate) connected: name the claim from the certificate it presented.
    pub(super) async fn name_claim(&self, id: &DeviceId, der: &[u8]) -> Result<(), ServiceError> {
        if !self.inner.cache.claim(id).is_some_and(|c| c.unnamed()) {
            return Ok(());
        }
        let own = device::thing_name_for(device::common_name(der).as_deref(), id);
        self.change_claim(id, None, false, |current, taken| {
            let Some(c) = current.filter(|c| c.unnamed()) else {
                return Ok(None);
            };
            let Some(tenant) = c.tenant_id() else {
                return Ok(None);
            };
            Ok(Some(named(
                c,
                self.free_thing_name(tenant, &own, id, taken),
            )))
        })
        .await
        .map(drop)
    }

    /// A claim whose name only the store knows (loaded before its device was seen) and whose
    /// device connected: the map learns whether the name is the device's own (the usual) or
    /// else holds it whole, and the device is woken to be routed with it.
    pub(super) async fn settle_name(&self, id: &DeviceId, der: &[u8]) -> Result<(), ServiceError> {
        let unknown = |c: Option<ClaimView>| c.is_some_and(|c| c.thing_name == ThingName::Unknown);
        if !unknown(self.inner.cache.claim(id)) {
            return Ok(());
        }
        let own = device::thing_name_for(device::common_name(der).as_deref(), id);
        let _turn = self.turn(id).lock().await;
        if unknown(self.inner.cache.claim(id)) {
            let stored = self.inner.store.claim(id).await?;
            self.put_in_map_named(id, stored, Some(&own));
        }
        Ok(())
    }

    /// The provisioner's AWS thing name for a `registering` device of `tenant`: `candidate` (the
    /// tenant's template filled in) when no other device of the tenant holds it, else the device
    /// id; stored on the claim before anything is created, so two registrations never share a
    /// thing. `None`: the claim moved on meanwhile.
    pub async fn reserve_thing_name(
        &self,
        id: &DeviceId,
        tenant: &str,
        candidate: &str,
    ) -> Result<Option<String>, ServiceError> {
        let registering = |c: &Claim| c.registering_with(tenant);
        let changed = self
            .change_claim(id, None, true, |current, taken| {
                let Some(c) = current.filter(|c| registering(c)) else {
                    return Ok(None);
                };
                if c.thing_name.as_deref() == Some(candidate) {
                    return Ok(None);
                }
                let name = self.free_thing_name(tenant, candidate, id, taken);
                if c.thing_name.as_deref() == Some(name.as_str()) {
                    return Ok(None);
                }
                Ok(Some(named(c, name)))
            })
            .await?;
        let (Changed::Unchanged(c) | Changed::Written(c)) = changed;
        Ok(c.filter(|c| registering(c))
            .and_then(|c| c.thing_name.clone()))
    }
}

/// `c` with `thing_name`.
fn named(c: &Claim, thing_name: String) -> Plan {
    Plan {
        claim: Some(Claim {
            thing_name: Some(thing_name),
            ..c.clone()
        }),
        bind: Bind::No,
        retire: Retiring::Nothing,
    }
}
