//! The networked store: PostgreSQL, shared by any number of lobby nodes (SPEC §10).
//!
//! A small `deadpool-postgres` pool of plain TCP connections. Every write is one transaction,
//! durable when its future resolves, given the server's default `synchronous_commit = on`.
//! Writers of a fleet never share a lock: a claim write is conditional on the version it read
//! ([`Store::write_claim`]), thing names are a unique index, and tenant rows are locked only by
//! the transactions that touch them. Every session waits at most [`LOCK_TIMEOUT`] for a lock
//! and [`STATEMENT_TIMEOUT`] for a statement (the URL's `options` may set either). TLS to PostgreSQL is not supported yet: a URL asking for it
//! (`sslmode=require`, `verify-ca`, `verify-full`) is refused at `open`, never downgraded.
//!
//! The schema is an ordered list of migrations embedded in the binary. `open` applies the
//! missing ones in one transaction holding `pg_advisory_xact_lock(MIGRATION_LOCK)`, so nodes
//! starting at once apply each step exactly once; `lobby_schema_migrations` records them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::TryStreamExt;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    ClaimWrite, Expect, Fleet, RegistrationBody, Retire, Store, StoreError, StoredTenant,
    TenantDeleted, TenantPatch, TenantUpdated, Written,
};
use crate::device::DeviceId;
use crate::model::Registration;
use crate::model::{Claim, ClaimState, Tenant};

mod fleet;
mod schema;
mod sql;
mod watch;

use fleet::Notifier;

pub use schema::{MIGRATION_LOCK, SCHEMA_VERSION};
use sql::*;

/// Connections in the pool: concurrent writes (claim bursts), API reads and the provisioning
/// worker. The server flushes the commits of concurrent transactions together.
const POOL_SIZE: usize = 16;
/// How long a statement waits for a row or advisory lock (`lock_timeout`), unless the URL's
/// `options` set it: a write behind a stuck holder fails as `unavailable` rather than waiting.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one statement may run (`statement_timeout`), unless the URL's `options` set it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the server, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a store call waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// PostgreSQL-backed [`Store`]. Cheap to clone (the pool is a handle).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the watch's own connection (not pooled: it stays in LISTEN).
    config: tokio_postgres::Config,
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

/// The error and its causes on one line (tokio-postgres says only "db error" at the top).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A unique key that already exists is `Conflict`; a lock or statement that timed out, a lost
/// connection or a server that is going away is `Unavailable`; the rest is `Backend`.
fn pg(e: tokio_postgres::Error) -> StoreError {
    let text = || format!("postgres: {}", describe(&e));
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Conflict,
        Some(c)
            if [
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::QUERY_CANCELED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
            ]
            .contains(c)
                || c.code().starts_with("08") =>
        {
            StoreError::Unavailable(text())
        }
        Some(_) => StoreError::Backend(text()),
        // No SQLSTATE: the connection failed or closed.
        None => StoreError::Unavailable(text()),
    }
}

/// Whether `e` is a violation of the thing-name index.
fn name_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .and_then(|d| d.constraint())
        .is_some_and(|c| c == THING_NAME_INDEX)
}

/// The connection settings of `url`, refusing what this store cannot honour.
fn pg_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if key == "sslmode" && !matches!(value, "disable" | "prefer") {
            return Err(StoreError::Backend(format!(
                "store.url asks for sslmode={value}, but TLS to PostgreSQL is not supported \
                 yet; use sslmode=disable (or leave it out) on a trusted network"
            )));
        }
    }
    let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        StoreError::Backend(format!(
            "store.url {:?} is not a PostgreSQL URL: {}",
            crate::config::redacted(url),
            describe(&e)
        ))
    })?;
    config.ssl_mode(SslMode::Disable);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("lobby");
    }
    // Bound every wait on a lock or statement, unless the URL chose its own.
    let mut options = config.get_options().unwrap_or("").to_owned();
    for (key, value) in [
        ("lock_timeout", LOCK_TIMEOUT),
        ("statement_timeout", STATEMENT_TIMEOUT),
        ("idle_in_transaction_session_timeout", STATEMENT_TIMEOUT),
    ] {
        if !options.contains(key) {
            options.push_str(&format!(" -c {key}={}", value.as_millis()));
        }
    }
    config.options(options.trim());
    Ok(config)
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…` or `postgresql://…`) and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let config = pg_config(url)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))?;
        let mut origin = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut origin);
        let store = Self {
            notifier: Notifier::start(pool.clone()),
            pool,
            config,
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

    /// [`Store::write_claim`]'s transaction. `Stale(None)` when the condition failed (the
    /// caller reads what is there); every early return rolls back.
    async fn write_claim_tx(&self, w: &ClaimWrite<'_>) -> Result<Written, StoreError> {
        let hex = w.id.to_hex();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        if w.bind {
            let tenant = w.claim.and_then(Claim::tenant_id).ok_or_else(|| {
                StoreError::Backend("a binding claim write without a tenant".into())
            })?;
            let room = tx.prepare_cached(TENANT_ROOM).await.map_err(pg)?;
            let rows = tx.query(&room, &[&tenant]).await.map_err(pg)?;
            let Some(row) = rows.first() else {
                return Ok(Written::NoTenant);
            };
            if let Some(max) = row.try_get::<_, Option<i64>>(0).map_err(pg)? {
                tx.execute(TENANT_QUOTA_LOCK, &[&tenant])
                    .await
                    .map_err(pg)?;
                let count = tx.prepare_cached(TENANT_COUNT).await.map_err(pg)?;
                let n: i64 = tx
                    .query_one(&count, &[&tenant, &hex])
                    .await
                    .map_err(pg)?
                    .get(0);
                if n >= max {
                    return Ok(Written::Full);
                }
            }
        }
        let log = tx.prepare_cached(LOG_CHANGE).await.map_err(pg)?;
        let seq: i64 = tx
            .query_one(&log, &[&"claim", &hex, &&*self.origin])
            .await
            .map_err(pg)?
            .get(0);
        let changed = match (w.claim, w.expect) {
            (Some(c), expect) => {
                let (state, tenant) = (c.state.as_str(), c.tenant_id());
                let attempts = i64::from(c.attempts);
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                    &hex,
                    &tenant,
                    &state,
                    &c.thing_name,
                    &c.redirect_id,
                    &c.claimed_at,
                    &c.ready_at,
                    &c.redirected_at,
                    &c.error,
                    &w.cert_pem,
                    &attempts,
                    &c.next_attempt_at,
                    &seq,
                ];
                let sql = match &expect {
                    Expect::Absent => format!("{CLAIM_INSERT} ON CONFLICT (device_id) DO NOTHING"),
                    Expect::Any => format!("{CLAIM_INSERT}{CLAIM_UPSERT_SET}"),
                    Expect::Version(v) => {
                        params.push(v);
                        CLAIM_UPDATE.to_owned()
                    }
                };
                let stmt = tx.prepare_cached(&sql).await.map_err(pg)?;
                match tx.execute(&stmt, &params).await {
                    Err(e) if name_taken(&e) => return Ok(Written::NameTaken),
                    other => other.map_err(pg)?,
                }
            }
            (None, Expect::Any) => tx
                .execute("DELETE FROM claims WHERE device_id = $1", &[&hex])
                .await
                .map_err(pg)?
                .max(1),
            (None, Expect::Version(v)) => tx
                .execute(
                    "DELETE FROM claims WHERE device_id = $1 AND version = $2",
                    &[&hex, &v],
                )
                .await
                .map_err(pg)?,
            (None, Expect::Absent) => {
                let absent: bool = tx
                    .query_one(
                        "SELECT NOT EXISTS (SELECT 1 FROM claims WHERE device_id = $1)",
                        &[&hex],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                u64::from(absent)
            }
        };
        if changed == 0 {
            return Ok(Written::Stale(None));
        }
        let keep = match w.retire {
            Retire::Nothing => None,
            Retire::All => Some(None),
            Retire::AllBut(t) => Some(Some(t)),
        };
        let mut retiring = Vec::new();
        if let Some(keep) = keep {
            let retire = tx.prepare_cached(RETIRE).await.map_err(pg)?;
            for r in tx.query(&retire, &[&hex, &keep]).await.map_err(pg)? {
                retiring.push(r.try_get(0).map_err(pg)?);
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(Written::Done {
            version: seq,
            retiring,
        })
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

/// Decodes one claims row. Tenant names repeat across many claims: `tenants` hands out one
/// shared `Arc<str>` per name.
fn claim_from_row(row: &Row, tenants: &mut HashMap<String, Arc<str>>) -> Result<Claim, StoreError> {
    let id: &str = row.try_get(0).map_err(pg)?;
    let device_id =
        DeviceId::parse_hex(id).ok_or_else(|| StoreError::Corrupt(format!("device_id {id:?}")))?;
    let tenant = row
        .try_get::<_, Option<&str>>(1)
        .map_err(pg)?
        .map(|t| match tenants.get(t) {
            Some(shared) => shared.clone(),
            None => tenants
                .entry(t.to_owned())
                .or_insert_with(|| t.into())
                .clone(),
        });
    let state: &str = row.try_get(2).map_err(pg)?;
    Ok(Claim {
        device_id,
        tenant,
        // As the SQLite store: an unknown state loads as failed rather than stopping the lobby.
        state: ClaimState::parse(state).unwrap_or(ClaimState::Failed),
        thing_name: row.try_get(3).map_err(pg)?,
        redirect_id: row.try_get(4).map_err(pg)?,
        claimed_at: row.try_get(5).map_err(pg)?,
        ready_at: row.try_get(6).map_err(pg)?,
        redirected_at: row.try_get(7).map_err(pg)?,
        error: row.try_get(8).map_err(pg)?,
        version: row.try_get(9).map_err(pg)?,
        attempts: u32::try_from(row.try_get::<_, i64>(10).map_err(pg)?).unwrap_or(u32::MAX),
        next_attempt_at: row.try_get(11).map_err(pg)?,
    })
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

    /// Streams the rows (a portal, decoded as they arrive): a million claims never sit in the
    /// client twice.
    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        self.timed("load_claims", async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(CLAIM_COLUMNS).await.map_err(pg)?;
            let no_params: [&(dyn ToSql + Sync); 0] = [];
            let rows = client.query_raw(&stmt, no_params).await.map_err(pg)?;
            let mut rows = std::pin::pin!(rows);
            let mut tenants = HashMap::new();
            let mut out = Vec::new();
            while let Some(row) = rows.try_next().await.map_err(pg)? {
                out.push(claim_from_row(&row, &mut tenants)?);
            }
            Ok(out)
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
    let body: &str = r.try_get(0).map_err(pg)?;
    let tenant: Tenant =
        serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("tenant body: {e}")))?;
    Ok(StoredTenant {
        tenant,
        token_hash: r.try_get(1).map_err(pg)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_urls_are_refused_not_downgraded() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = format!("postgres://u@127.0.0.1/db?application_name=x&sslmode={mode}");
            let err = pg_config(&url).unwrap_err().to_string();
            assert!(
                err.contains("TLS to PostgreSQL is not supported yet"),
                "{err}"
            );
        }
        for url in [
            "postgres://u@127.0.0.1/db",
            "postgresql://u@127.0.0.1:5433/db?sslmode=disable",
            "postgres://u@127.0.0.1/db?sslmode=prefer",
        ] {
            let config = pg_config(url).unwrap();
            assert_eq!(config.get_ssl_mode(), SslMode::Disable, "{url}");
        }
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let err = pg_config("postgres://u:hunter2@127.0.0.1:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a PostgreSQL URL") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
