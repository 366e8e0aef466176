//! Persistence of tenants and claims behind one trait.
//!
//! The store is the source of truth; the claims map (`claims::cache`) is loaded from it at start
//! and kept in step by the claims service. Nothing on the device path touches the store.
//! `sqlite` is the embedded single-node store; a networked store implements the same trait.

pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::claims::model::{Claim, Tenant};
use crate::edge::identity::DeviceId;
use crate::provision::Registration;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key (tenant id) already exists.
    #[error("already exists")]
    Conflict,
    #[error("store backend: {0}")]
    Backend(String),
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

/// What the lobby persists. Every write is durable when the future resolves.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    async fn tenants(&self) -> Result<Vec<StoredTenant>, StoreError>;
    /// Fails with `Conflict` when the id exists.
    async fn insert_tenant(&self, t: &StoredTenant) -> Result<(), StoreError>;
    async fn update_tenant(&self, t: &Tenant) -> Result<(), StoreError>;
    async fn delete_tenant(&self, id: &str) -> Result<(), StoreError>;
    /// Every claim, for loading the map at start.
    async fn claims(&self) -> Result<Vec<Claim>, StoreError>;
    /// Inserts or replaces a claim. `cert_pem` `None` keeps a stored certificate.
    async fn put_claim(&self, c: &Claim, cert_pem: Option<&str>) -> Result<(), StoreError>;
    async fn delete_claim(&self, id: &DeviceId) -> Result<(), StoreError>;
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
    async fn delete_registration(&self, id: &DeviceId, tenant: &str) -> Result<(), StoreError>;
}

/// A parsed `store.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://<path>`
    SqliteFile(std::path::PathBuf),
    /// `sqlite::memory:` (tests)
    SqliteMemory,
}

impl StoreUrl {
    /// Parses the config value; `None` for an unsupported scheme.
    pub fn parse(url: &str) -> Option<Self> {
        if url == "sqlite::memory:" {
            return Some(Self::SqliteMemory);
        }
        let path = url.strip_prefix("sqlite://")?;
        (!path.is_empty()).then(|| Self::SqliteFile(path.into()))
    }
}

/// Opens the store named by `store.url`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    match StoreUrl::parse(url) {
        Some(u) => Ok(Arc::new(sqlite::SqliteStore::open(u).await?)),
        None => Err(StoreError::Backend(format!(
            "unsupported store.url {url:?}"
        ))),
    }
}
