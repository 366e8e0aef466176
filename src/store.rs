//! Persistence of tenants and claims behind one trait.
//!
//! The store is the source of truth; the claims map (`claims::cache`) is loaded from it at start
//! and kept in step by the claims service. Nothing on the device path touches the store.
//! `store.url` picks the backend: `sqlite` is the embedded single-node store (`sqlite://<path>`,
//! `sqlite::memory:`), `postgres` the networked one that several lobby nodes share
//! (`postgres://…` or `postgresql://…`, SPEC §10). Both keep the same tables and columns and
//! pass the same test suite (`tests/store_suite.rs`).

mod fleet;
pub mod postgres;
pub mod sqlite;

pub use fleet::{Change, ChangeBatch, Fleet, Presence, Subject, Takeover, Watch};

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{redacted, StoreUrl, SUPPORTED_URLS};
use crate::device::DeviceId;
use crate::model::Registration;
use crate::model::{Claim, Tenant};

/// The registrations [`Store::orphaned_registrations`] selects, as an SQL condition both
/// backends use: not marked for removal, and the device has no claim with a tenant (none at
/// all, or only its revocation, kept after an unclaim).
pub(crate) const ORPHANED_REGISTRATIONS: &str = "NOT removing AND NOT EXISTS \
     (SELECT 1 FROM claims c WHERE c.device_id = registrations.device_id \
     AND c.tenant IS NOT NULL)";

/// Store failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A unique key (tenant id or token hash) already exists.
    #[error("already exists")]
    Conflict,
    #[error("store backend: {0}")]
    Backend(String),
    /// The store could not be reached, or a lock in it not taken, in time: the write did not
    /// happen and may be retried (the API answers 503 `unavailable`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A tenant with the hash of its API token (the token itself is never stored).
#[derive(Debug, Clone)]
pub struct StoredTenant {
    pub tenant: Tenant,
    /// Lowercase hex SHA-256 of the tenant's bearer token.
    pub token_hash: String,
}

impl StoredTenant {
    /// Rebuilds a stored tenant from its columns (`body`: the tenant as JSON), the same in
    /// every backend.
    pub(crate) fn decode(body: &str, token_hash: String) -> Result<Self, StoreError> {
        let tenant = serde_json::from_str(body)
            .map_err(|e| StoreError::Corrupt(format!("tenant body: {e}")))?;
        Ok(Self { tenant, token_hash })
    }
}

/// The columns a claim read selects, in the order both backends decode them.
macro_rules! claim_columns {
    () => {
        "device_id, tenant, state, thing_name, redirect_id, claimed_at, ready_at, \
         redirected_at, error, version, attempts, next_attempt_at"
    };
}
pub(crate) use claim_columns;

/// What the lobby persists. Every write is durable when the future resolves.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    async fn tenants(&self) -> Result<Vec<StoredTenant>, StoreError>;
    /// Fails with `Conflict` when the id or the token hash exists.
    async fn insert_tenant(&self, t: &StoredTenant) -> Result<(), StoreError>;
    /// Applies `patch` to the stored tenant `id` under its row lock, so two nodes patching one
    /// tenant both count.
    async fn update_tenant(
        &self,
        id: &str,
        patch: TenantPatch<'_>,
    ) -> Result<TenantUpdated, StoreError>;
    /// Deletes the tenant when no claim names it (checked in the same transaction, so a claim
    /// committing meanwhile on another node keeps it).
    async fn delete_tenant(&self, id: &str) -> Result<TenantDeleted, StoreError>;
    /// Every claim, for loading the map at start.
    async fn claims(&self) -> Result<Vec<Claim>, StoreError>;
    /// Calls `f` with every claim as it is read (loading the map: the rows never sit in memory
    /// all at once).
    async fn for_each_claim(&self, f: &mut (dyn FnMut(Claim) + Send)) -> Result<(), StoreError> {
        for c in self.claims().await? {
            f(c);
        }
        Ok(())
    }
    async fn write_claim(&self, w: &ClaimWrite<'_>) -> Result<Written, StoreError>;
    /// Inserts or replaces a claim whatever is stored (loading, tests); its new version.
    async fn put_claim(&self, c: &Claim, cert_pem: Option<&str>) -> Result<i64, StoreError> {
        let w = ClaimWrite {
            cert_pem,
            ..ClaimWrite::new(c.device_id, Expect::Any, Some(c))
        };
        match self.write_claim(&w).await? {
            Written::Done { version, .. } => Ok(version),
            other => Err(StoreError::Backend(format!(
                "unconditional write: {other:?}"
            ))),
        }
    }
    /// Deletes a claim whatever is stored.
    async fn delete_claim(&self, id: &DeviceId) -> Result<(), StoreError> {
        match self
            .write_claim(&ClaimWrite::new(*id, Expect::Any, None))
            .await?
        {
            Written::Done { .. } => Ok(()),
            other => Err(StoreError::Backend(format!(
                "unconditional delete: {other:?}"
            ))),
        }
    }
    /// The device certificate captured for a claim, if any.
    async fn cert_pem(&self, id: &DeviceId) -> Result<Option<String>, StoreError>;
    /// Stores the certificate of a claimed device (captured at its handshake).
    async fn set_cert_pem(&self, id: &DeviceId, pem: &str) -> Result<(), StoreError>;
    /// Inserts or replaces what was registered for (device, tenant).
    async fn put_registration(&self, r: &Registration) -> Result<(), StoreError>;
    /// Every registration of a device (one per tenant it is or was registered with).
    async fn registrations(&self, id: &DeviceId) -> Result<Vec<Registration>, StoreError>;
    /// The clean-up queue: registrations marked `removing`.
    async fn removing_registrations(&self) -> Result<Vec<Registration>, StoreError>;
    /// Registrations not marked `removing` of devices that have no claim at all (left by a
    /// lobby that lost the clean-up; today an unclaim marks them in its own transaction).
    async fn orphaned_registrations(&self) -> Result<Vec<Registration>, StoreError>;
    async fn delete_registration(&self, id: &DeviceId, tenant: &str) -> Result<(), StoreError>;

    /// One claim, as stored (a node applying another node's change reads it here).
    async fn claim(&self, id: &DeviceId) -> Result<Option<Claim>, StoreError>;
    /// The stored claims of `ids` (those that have one), in no order: a page of a listing.
    async fn claims_of(&self, ids: &[DeviceId]) -> Result<Vec<Claim>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(self.claim(id).await?);
        }
        Ok(found)
    }
    /// One tenant with its token hash, as stored.
    async fn tenant(&self, id: &str) -> Result<Option<StoredTenant>, StoreError>;

    /// The fleet this store coordinates (SPEC §10): `Some` when other nodes may share it, and
    /// so the claims, jobs, call pacing and change log; `None` for a store one node uses alone.
    fn fleet(&self) -> Option<&dyn Fleet> {
        None
    }
}

/// What a conditional claim write expects to find stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (unconditional).
    Any,
    /// No claim.
    Absent,
    /// The claim at this version.
    Version(i64),
}

impl Expect {
    /// What a writer that read `current` expects.
    pub fn from_current(current: Option<&Claim>) -> Self {
        current.map_or(Self::Absent, |c| Self::Version(c.version))
    }
}

/// One conditional claim write ([`Store::write_claim`]).
#[derive(Debug, Clone)]
pub struct ClaimWrite<'a> {
    pub id: DeviceId,
    pub expect: Expect,
    /// The claim after the write; `None` deletes it.
    pub claim: Option<&'a Claim>,
    /// Stored with the claim; `None` keeps a stored certificate.
    pub cert_pem: Option<&'a str>,
    /// Binding the device to the claim's tenant (claim, migrate): the tenant must exist and,
    /// with `max_devices`, have room for it.
    pub bind: bool,
    /// Marks the device's registrations for removal in the same transaction.
    pub retire: Retire<'a>,
}

impl<'a> ClaimWrite<'a> {
    /// A write without checks or retiring.
    pub fn new(id: DeviceId, expect: Expect, claim: Option<&'a Claim>) -> Self {
        Self {
            id,
            expect,
            claim,
            cert_pem: None,
            bind: false,
            retire: Retire::Nothing,
        }
    }
}

/// Which registrations of the device a claim write marks `removing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire<'a> {
    Nothing,
    /// Every one (unclaim).
    All,
    /// Every one but this tenant's (the device is ready there).
    AllBut(&'a str),
}

/// The outcome of a [`ClaimWrite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written at `version` (a delete's version is its change's); `retiring` names the tenants
    /// whose registration of the device is now marked `removing`.
    Done { version: i64, retiring: Vec<String> },
    /// The claim is not what `expect` said; this is what is stored.
    Stale(Option<Claim>),
    /// `bind`: the tenant does not exist.
    NoTenant,
    /// `bind`: the tenant has `max_devices` claims.
    Full,
    /// Another claim of the tenant holds the thing name.
    NameTaken,
}

/// A change to a tenant, applied to the stored one under its lock; `Err` refuses it.
pub type TenantPatch<'a> = &'a (dyn Fn(Tenant) -> Result<Tenant, String> + Send + Sync);

/// The outcome of [`Store::update_tenant`].
#[derive(Debug, Clone)]
pub enum TenantUpdated {
    Updated(Box<Tenant>),
    NotFound,
    /// The patch refused the stored tenant (its message).
    Refused(String),
}

/// The outcome of [`Store::delete_tenant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantDeleted {
    Deleted,
    NotFound,
    /// Claims (revoked ones too) still name it.
    HasClaims,
}

/// The stored form of a [`Registration`] beside its key columns (device id, tenant) and its
/// `removing` flag: JSON text, the same in every backend.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RegistrationBody {
    backend: crate::model::AwsIotBackend,
    thing_name: String,
    cert: Option<crate::model::CertRef>,
}

impl RegistrationBody {
    /// The JSON text stored for `r`.
    pub(crate) fn encode(r: &Registration) -> Result<String, StoreError> {
        serde_json::to_string(&Self {
            backend: r.backend.clone(),
            thing_name: r.thing_name.clone(),
            cert: r.cert.clone(),
        })
        .map_err(|e| StoreError::Backend(format!("registration body: {e}")))
    }

    /// Rebuilds a registration from its stored columns.
    pub(crate) fn decode(
        id: &str,
        tenant: String,
        body: &str,
        removing: bool,
    ) -> Result<Registration, StoreError> {
        let device_id = DeviceId::parse_hex(id)
            .ok_or_else(|| StoreError::Corrupt(format!("registration device_id {id:?}")))?;
        let b: Self = serde_json::from_str(body)
            .map_err(|e| StoreError::Corrupt(format!("registration body: {e}")))?;
        Ok(Registration {
            device_id,
            tenant,
            backend: b.backend,
            thing_name: b.thing_name,
            cert: b.cert,
            removing,
        })
    }
}

/// Opens the store named by `store.url`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    match StoreUrl::parse(url) {
        Some(StoreUrl::Postgres(u)) => Ok(Arc::new(postgres::PostgresStore::open(&u).await?)),
        Some(u) => Ok(Arc::new(sqlite::SqliteStore::open(u).await?)),
        None => Err(StoreError::Backend(format!(
            "unsupported store.url {:?}; expected {SUPPORTED_URLS}",
            redacted(url)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_lists_the_supported_ones() {
        let err = open("mysql://u:pw@h/db").await.err().unwrap().to_string();
        assert!(
            err.contains("postgres://") && err.contains("sqlite://"),
            "{err}"
        );
        assert!(!err.contains("pw@"), "{err}");
    }
}
