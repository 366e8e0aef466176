//! Persistence of tenants and claims behind one trait.
//!
//! The store is the source of truth; the claims map (`claims::cache`) is loaded from it at start
//! and kept in step by the claims service. Nothing on the device path touches the store.
//! `store.url` picks the backend: `sqlite` is the embedded single-node store (`sqlite://<path>`,
//! `sqlite::memory:`), `postgres` the networked one that several lobby nodes share
//! (`postgres://…` or `postgresql://…`, SPEC §10). Both keep the same tables and columns and
//! pass the same test suite (`tests/store_suite.rs`).

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::claims::model::{Claim, Tenant};
use crate::edge::identity::DeviceId;
use crate::provision::Registration;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key (tenant id or token hash) already exists.
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
    /// Fails with `Conflict` when the id or the token hash exists.
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

    /// A device other than `except` whose claim with `tenant` holds `thing_name`, if any: the
    /// claims service keeps thing names unique per tenant (asked under its write lock).
    async fn thing_name_holder(
        &self,
        tenant: &str,
        thing_name: &str,
        except: &DeviceId,
    ) -> Result<Option<DeviceId>, StoreError>;

    /// One claim, as stored (a node applying another node's change reads it here).
    async fn claim(&self, id: &DeviceId) -> Result<Option<Claim>, StoreError>;
    /// One tenant with its token hash, as stored.
    async fn tenant(&self, id: &str) -> Result<Option<StoredTenant>, StoreError>;

    // Scale-out (SPEC §10). A store that several nodes share records every change of a tenant
    // or claim in a change log, tells the other nodes, and serialises writers. The embedded
    // store has one node: no lock, no log, nothing to watch.

    /// Whether other nodes may share this store (and so the claims, jobs and change log).
    fn shared(&self) -> bool {
        false
    }
    /// Takes (or renews) this node's lease on the job named `key` for `lease`: true when this
    /// node holds it now, false when another node's lease on it is still running. A node
    /// alone on its store always holds every job.
    async fn take_job(&self, _key: &str, _lease: std::time::Duration) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// Gives up this node's lease on `key` (the job is done).
    async fn finish_job(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records where devices are connected (`batch`, from node `node`) and that `node` is alive,
    /// and announces each connect in `batch` to the other nodes ([`Takeover`]). Of two
    /// connects of a device on two nodes the newer (by `stamp`) is kept. A store that one node
    /// uses alone has nothing to share: the node's own waiting room says it all.
    async fn put_presence(&self, _node: &str, _batch: &[Presence]) -> Result<(), StoreError> {
        Ok(())
    }
    /// What every node reported of `id` (of every device: `None`). A device whose node stopped
    /// reporting it is alive shows as not connected.
    async fn presence(&self, _id: Option<&DeviceId>) -> Result<Vec<Presence>, StoreError> {
        Ok(Vec::new())
    }
    /// Takes the cluster-wide write lock, held until the returned value drops. `None`: the
    /// store serves one node, whose own lock is enough.
    async fn lock_writes(&self) -> Result<Option<Box<dyn WriteLock>>, StoreError> {
        Ok(None)
    }
    /// The sequence number of the newest change (0: none).
    async fn last_change(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
    /// Every change after `seq`, oldest first.
    async fn changes_since(&self, _seq: i64) -> Result<Vec<Change>, StoreError> {
        Ok(Vec::new())
    }
    /// Starts watching for other nodes' changes until `cancel`: `changes` gets a poke after
    /// each change notification and after every (re)connect of the watch, so a node that lost
    /// its notifications catches up from the change log; `takeovers` gets the connects other
    /// nodes announced with their presence. `None`: nothing to watch.
    fn watch(&self, _cancel: CancellationToken) -> Option<Watch> {
        None
    }
}

/// What a node hears from the other nodes of its fleet ([`Store::watch`]).
#[derive(Debug)]
pub struct Watch {
    /// A poke: apply the change log.
    pub changes: mpsc::Receiver<()>,
    /// Devices that connected on another node.
    pub takeovers: mpsc::Receiver<Takeover>,
}

/// Another node's announcement that a device connected there (written with its presence):
/// this node closes its own connection of that device if it is older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub device_id: DeviceId,
    /// The connect stamp (`SessionHandle::stamp`).
    pub stamp: i64,
    /// At an equal stamp the announcing node's connection is the newer (a fixed order of the
    /// nodes, the same seen from each).
    pub wins_tie: bool,
}

/// Where a device is connected, or was last seen, as a node of a fleet reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub device_id: DeviceId,
    /// `cluster.node_name` of the node that saw it.
    pub node: String,
    pub thing_name: String,
    pub protocol: String,
    pub connected: bool,
    /// Unix ms of the connect or disconnect.
    pub last_seen: i64,
    /// The connect stamp of the connection this is about (`SessionHandle::stamp`).
    pub stamp: i64,
}

/// The cluster-wide write lock; dropping it releases the lock.
pub trait WriteLock: Send + Sync {}

/// What a change is about: a claim (by device) or a tenant (by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Claim(DeviceId),
    Tenant(String),
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    pub subject: Subject,
    /// Made by this process (already in its map).
    pub own: bool,
}

/// The stored form of a [`Registration`] beside its key columns (device id, tenant) and its
/// `removing` flag: JSON text, the same in every backend.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RegistrationBody {
    backend: crate::claims::model::AwsIotBackend,
    thing_name: String,
    cert: Option<crate::provision::CertRef>,
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

/// The `store.url` forms, for messages.
pub const SUPPORTED_URLS: &str =
    "sqlite://<path>, sqlite::memory:, postgres://user@host/db or postgresql://user@host/db";

/// A parsed `store.url`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://<path>`
    SqliteFile(std::path::PathBuf),
    /// `sqlite::memory:` (tests)
    SqliteMemory,
    /// `postgres://…` or `postgresql://…`: the whole URL, as libpq reads it (it may carry a
    /// password, so `Debug` hides it).
    Postgres(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SqliteFile(p) => f.debug_tuple("SqliteFile").field(p).finish(),
            Self::SqliteMemory => f.write_str("SqliteMemory"),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(&redacted(url)).finish(),
        }
    }
}

impl StoreUrl {
    /// Parses the config value; `None` for an unsupported scheme. A PostgreSQL URL's options
    /// are checked when it is opened.
    pub fn parse(url: &str) -> Option<Self> {
        if url == "sqlite::memory:" {
            return Some(Self::SqliteMemory);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Some(Self::Postgres(url.to_owned()));
        }
        let path = url.strip_prefix("sqlite://")?;
        (!path.is_empty()).then(|| Self::SqliteFile(path.into()))
    }
}

/// `url` with the password of its `user:password@` part replaced, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
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

    #[test]
    fn urls_parse_by_scheme() {
        assert_eq!(
            StoreUrl::parse("sqlite::memory:"),
            Some(StoreUrl::SqliteMemory)
        );
        assert_eq!(
            StoreUrl::parse("sqlite://data/lobby.db"),
            Some(StoreUrl::SqliteFile("data/lobby.db".into()))
        );
        for url in [
            "postgres://u@h/db",
            "postgresql://u@h:5433/db?sslmode=disable",
        ] {
            assert_eq!(StoreUrl::parse(url), Some(StoreUrl::Postgres(url.into())));
        }
        for url in ["sqlite://", "mysql://u@h/db", "postgres:/h/db", ""] {
            assert_eq!(StoreUrl::parse(url), None, "{url}");
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        let url = "postgres://lobby:s3cret@db.example:5432/lobby?sslmode=disable";
        assert_eq!(
            redacted(url),
            "postgres://lobby:***@db.example:5432/lobby?sslmode=disable"
        );
        assert!(!format!("{:?}", StoreUrl::parse(url).unwrap()).contains("s3cret"));
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }

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
