//! The networked store: PostgreSQL, shared by any number of lobby nodes (SPEC §10).
//!
//! A small `deadpool-postgres` pool of connections. Every write is one transaction,
//! durable when its future resolves, given the server's default `synchronous_commit = on`.
//! Writers of a fleet never share a lock: a claim write is conditional on the version it read
//! ([`Store::write_claim`]), thing names are a unique index, and tenant rows are locked only by
//! the transactions that touch them. Every session waits at most [`LOCK_TIMEOUT`] for a lock
//! and [`STATEMENT_TIMEOUT`] for a statement (the URL's `options` may set either). TLS follows
//! the URL's `sslmode` and `sslrootcert` as libpq does ([`tls`]: rustls, `verify-full` checks
//! the server's name).
//!
//! The schema is an ordered list of migrations embedded in the binary. `open` applies the
//! missing ones in one transaction holding `pg_advisory_xact_lock(MIGRATION_LOCK)`, so nodes
//! starting at once apply each step exactly once; `lobby_schema_migrations` records them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{
    ClaimWrite, Fleet, RegistrationBody, Store, StoreError, StoredTenant, TenantDeleted,
    TenantPatch, TenantUpdated, Written,
};
use crate::device::DeviceId;
use crate::model::Registration;
use crate::model::{Claim, Tenant};

mod claims;
mod connect;
mod fleet;
mod schema;
mod sql;
mod tls;
mod watch;

use claims::claim_from_row;
use connect::{describe, pg, pg_config};
use fleet::Notifier;

pub use connect::{LOCK_TIMEOUT, STATEMENT_TIMEOUT};

pub use schema::{MIGRATION_LOCK, SCHEMA_VERSION};
use sql::*;

/// PostgreSQL-backed [`Store`]. Cheap to clone (the pool is a handle).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the watch's own connection (not pooled: it stays in LISTEN).
    config: tokio_postgres::Config,
    /// The TLS connector `sslmode` asks for (the watch's connection uses it too).
    tls: tls::RustlsConnect,
    /// This process's name in the change log (random per start).
    origin: Arc<str>,
    /// Tells the other nodes after a commit.
    notifier: Arc<Notifier>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…` or `postgresql://…`) and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let (config, tls) = pg_config(url)?;
        let pool = connect::pool(&config, tls.clone())?;
        let mut origin = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut origin);
        let store = Self {
            notifier: Notifier::start(pool.clone()),
            pool,
            config,
            tls,
            origin: hex::encode(origin).into(),
        };
        let applied = store.timed("migrate", store.migrate()).await?;
        if applied > 0 {
            tracing::info!(applied, version = SCHEMA_VERSION, "store schema migrated");
        }
        Ok(store)
    }

    /// A pooled connection.
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("postgres connection: {}", describe(&e))))
    }

    /// Runs `work`, recording its duration under `op` like every store backend.
    async fn timed<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let out = work.await;
        crate::metrics::store_operation(op, started.elapsed());
        out
    }

    /// One statement (prepared once per connection); the number of rows it changed.
    async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.timed(op, async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            client.execute(&stmt, params).await.map_err(pg)
        })
        .await
    }

    /// One statement and its change-log entry, in one transaction.
    async fn execute_logged(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        subject: (&str, &str),
    ) -> Result<u64, StoreError> {
        self.timed(op, async {
            let mut client = self.client().await?;
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            let log = client.prepare_cached(LOG_CHANGE).await.map_err(pg)?;
            let tx = client.transaction().await.map_err(pg)?;
            let n = tx.execute(&stmt, params).await.map_err(pg)?;
            tx.query_one(&log, &[&subject.0, &subject.1, &&*self.origin])
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            self.notifier.poke();
            Ok(n)
        })
        .await
    }

    /// One query (prepared once per connection), all its rows. For small results only.
    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.timed(op, async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(sql).await.map_err(pg)?;
            client.query(&stmt, params).await.map_err(pg)
        })
        .await
    }

    async fn registrations_where(
        &self,
        op: &'static str,
        filter: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Registration>, StoreError> {
        let sql = format!("{REGISTRATION_COLUMNS} WHERE {filter}");
        self.query(op, &sql, params)
            .await?
            .iter()
            .map(|r| {
                RegistrationBody::decode(
                    r.try_get(0).map_err(pg)?,
                    r.try_get(1).map_err(pg)?,
                    r.try_get(2).map_err(pg)?,
                    r.try_get(3).map_err(pg)?,
                )
            })
            .collect()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", async {
            self.client()
                .await?
                .simple_query("SELECT 1")
                .await
                .map_err(pg)
                .map(drop)
        })
        .await
    }

    async fn tenants(&self) -> Result<Vec<StoredTenant>, StoreError> {
        let rows = self
            .query(
                "load_tenants",
                "SELECT body, token_hash FROM tenants ORDER BY id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let body: &str = r.try_get(0).map_err(pg)?;
                let tenant: Tenant = serde_json::from_str(body)
                    .map_err(|e| StoreError::Corrupt(format!("tenant body: {e}")))?;
                Ok(StoredTenant {
                    tenant,
                    token_hash: r.try_get(1).map_err(pg)?,
                })
            })
            .collect()
    }

    async fn insert_tenant(&self, t: &StoredTenant) -> Result<(), StoreError> {
        let body =
            serde_json::to_string(&t.tenant).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.execute_logged(
            "insert_tenant",
            "INSERT INTO tenants (id, body, token_hash) VALUES ($1, $2, $3)",
            &[&t.tenant.id, &body, &t.token_hash],
            ("tenant", &t.tenant.id),
        )
        .await
        .map(drop)
    }

    async fn update_tenant(
        &self,
        id: &str,
        patch: TenantPatch<'_>,
    ) -> Result<TenantUpdated, StoreError> {
        let updated = self
            .timed("update_tenant", async {
                let mut client = self.client().await?;
                let tx = client.transaction().await.map_err(pg)?;
                let rows = tx
                    .query(
                        "SELECT body FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
                        &[&id],
                    )
                    .await
                    .map_err(pg)?;
                let Some(row) = rows.first() else {
                    return Ok(TenantUpdated::NotFound);
                };
                let stored: Tenant = serde_json::from_str(row.try_get(0).map_err(pg)?)
                    .map_err(|e| StoreError::Corrupt(format!("tenant body: {e}")))?;
                let tenant = match patch(stored) {
                    Ok(t) => t,
                    Err(why) => return Ok(TenantUpdated::Refused(why)),
                };
                let body = serde_json::to_string(&tenant)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                tx.execute("UPDATE tenants SET body = $2 WHERE id = $1", &[&id, &body])
                    .await
                    .map_err(pg)?;
                tx.query_one(LOG_CHANGE, &[&"tenant", &id, &&*self.origin])
                    .await
                    .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
                Ok(TenantUpdated::Updated(Box::new(tenant)))
            })
            .await?;
        if matches!(updated, TenantUpdated::Updated(_)) {
            self.notifier.poke();
        }
        Ok(updated)
    }

    /// Locks the tenant row first: a claim binding to it holds `FOR KEY SHARE` until it
    /// commits, so the count after the lock sees it.
    async fn delete_tenant(&self, id: &str) -> Result<TenantDeleted, StoreError> {
        let deleted = self
            .timed("delete_tenant", async {
                let mut client = self.client().await?;
                let tx = client.transaction().await.map_err(pg)?;
                let found = tx
                    .query("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", &[&id])
                    .await
                    .map_err(pg)?;
                if found.is_empty() {
                    return Ok(TenantDeleted::NotFound);
                }
                let claimed: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM claims WHERE tenant = $1)",
                        &[&id],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                if claimed {
                    return Ok(TenantDeleted::HasClaims);
                }
                tx.execute("DELETE FROM tenants WHERE id = $1", &[&id])
                    .await
                    .map_err(pg)?;
                tx.query_one(LOG_CHANGE, &[&"tenant", &id, &&*self.origin])
                    .await
                    .map_err(pg)?;
                tx.commit().await.map_err(pg)?;
                Ok(TenantDeleted::Deleted)
            })
            .await?;
        if deleted == TenantDeleted::Deleted {
            self.notifier.poke();
        }
        Ok(deleted)
    }

    /// Every claim, collected from [`Self::for_each_claim`]'s stream.
    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        let mut out = Vec::new();
        self.for_each_claim(&mut |c| out.push(c)).await?;
        Ok(out)
    }

    /// Streams the rows (a portal, decoded as they arrive): a million claims never sit in the
    /// client at once.
    async fn for_each_claim(&self, f: &mut (dyn FnMut(Claim) + Send)) -> Result<(), StoreError> {
        self.timed("load_claims", async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(CLAIM_COLUMNS).await.map_err(pg)?;
            let no_params: [&(dyn ToSql + Sync); 0] = [];
            let rows = client.query_raw(&stmt, no_params).await.map_err(pg)?;
            let mut rows = std::pin::pin!(rows);
            let mut tenants = HashMap::new();
            while let Some(row) = rows.try_next().await.map_err(pg)? {
                f(claim_from_row(&row, &mut tenants)?);
            }
            Ok(())
        })
        .await
    }

    async fn write_claim(&self, w: &ClaimWrite<'_>) -> Result<Written, StoreError> {
        let written = self.timed("write_claim", self.write_claim_tx(w)).await?;
        match written {
            // Rolled back; what is there instead, read after the other writer committed.
            Written::Stale(_) => Ok(Written::Stale(self.claim(&w.id).await?)),
            Written::Done { .. } => {
                self.notifier.poke();
                Ok(written)
            }
            other => Ok(other),
        }
    }

    async fn cert_pem(&self, id: &DeviceId) -> Result<Option<String>, StoreError> {
        let rows = self
            .query(
                "cert_pem",
                "SELECT cert_pem FROM claims WHERE device_id = $1",
                &[&id.to_hex()],
            )
            .await?;
        match rows.first() {
            Some(r) => r.try_get(0).map_err(pg),
            None => Ok(None),
        }
    }

    async fn set_cert_pem(&self, id: &DeviceId, pem: &str) -> Result<(), StoreError> {
        self.execute(
            "set_cert_pem",
            "UPDATE claims SET cert_pem = $2 WHERE device_id = $1",
            &[&id.to_hex(), &pem],
        )
        .await
        .map(drop)
    }

    async fn put_registration(&self, r: &Registration) -> Result<(), StoreError> {
        let body = RegistrationBody::encode(r)?;
        self.execute(
            "put_registration",
            "INSERT INTO registrations (device_id, tenant, body, removing) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (device_id, tenant) \
             DO UPDATE SET body = EXCLUDED.body, removing = EXCLUDED.removing",
            &[&r.device_id.to_hex(), &r.tenant, &body, &r.removing],
        )
        .await
        .map(drop)
    }

    async fn registrations(&self, id: &DeviceId) -> Result<Vec<Registration>, StoreError> {
        self.registrations_where("registrations", "device_id = $1", &[&id.to_hex()])
            .await
    }

    async fn removing_registrations(&self) -> Result<Vec<Registration>, StoreError> {
        self.registrations_where("removing_registrations", "removing", &[])
            .await
    }

    async fn orphaned_registrations(&self) -> Result<Vec<Registration>, StoreError> {
        self.registrations_where("orphaned_registrations", super::ORPHANED_REGISTRATIONS, &[])
            .await
    }

    async fn delete_registration(&self, id: &DeviceId, tenant: &str) -> Result<(), StoreError> {
        self.execute(
            "delete_registration",
            "DELETE FROM registrations WHERE device_id = $1 AND tenant = $2",
            &[&id.to_hex(), &tenant],
        )
        .await
        .map(drop)
    }

    async fn claim(&self, id: &DeviceId) -> Result<Option<Claim>, StoreError> {
        let sql = format!("{CLAIM_COLUMNS} WHERE device_id = $1");
        let rows = self.query("claim", &sql, &[&id.to_hex()]).await?;
        rows.first()
            .map(|r| claim_from_row(r, &mut HashMap::new()))
            .transpose()
    }

    async fn claims_of(&self, ids: &[DeviceId]) -> Result<Vec<Claim>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!("{CLAIM_COLUMNS} WHERE device_id = ANY($1)");
        let hex: Vec<String> = ids.iter().map(DeviceId::to_hex).collect();
        let rows = self.query("claims_of", &sql, &[&hex]).await?;
        let mut tenants = HashMap::new();
        rows.iter()
            .map(|r| claim_from_row(r, &mut tenants))
            .collect()
    }

    async fn tenant(&self, id: &str) -> Result<Option<StoredTenant>, StoreError> {
        let rows = self
            .query(
                "tenant",
                "SELECT body, token_hash FROM tenants WHERE id = $1",
                &[&id],
            )
            .await?;
        rows.first().map(tenant_from_row).transpose()
    }

    fn fleet(&self) -> Option<&dyn Fleet> {
        Some(self)
    }
}

fn tenant_from_row(r: &Row) -> Result<StoredTenant, StoreError> {
    StoredTenant::decode(r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?)
}
