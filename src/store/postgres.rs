//! The networked store: PostgreSQL, shared by any number of lobby nodes (SPEC §10).
//!
//! A small `deadpool-postgres` pool of plain TCP connections. Every write is one autocommitted
//! statement, so it is durable when its future resolves, given the server's default
//! `synchronous_commit = on`. TLS to PostgreSQL is not supported yet: a URL asking for it
//! (`sslmode=require`, `verify-ca`, `verify-full`) is refused at `open`, never downgraded.
//!
//! The schema is an ordered list of migrations embedded in the binary. `open` applies the
//! missing ones in one transaction holding `pg_advisory_xact_lock(MIGRATION_LOCK)`, so nodes
//! starting at once apply each step exactly once; `lobby_schema_migrations` records them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::TryStreamExt;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tokio_util::sync::CancellationToken;

use super::{
    Change, Presence, RegistrationBody, Store, StoreError, StoredTenant, Subject, Watch, WriteLock,
};
use crate::claims::model::{Claim, ClaimState, Tenant};
use crate::edge::identity::DeviceId;
use crate::provision::Registration;

mod watch;

/// Connections in the pool. Writes are serialised by the claims service; the rest are API reads
/// and the provisioning worker, which a handful of connections serve.
const POOL_SIZE: usize = 8;
/// Connecting to the server, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a store call waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The advisory lock held while migrating. Fixed, so every lobby node takes the same one
/// (the bytes spell "lobbymig"); advisory locks are per database.
pub const MIGRATION_LOCK: i64 = 0x6c6f_6262_796d_6967;

/// The schema, step by step: step `i` is version `i + 1`. Append; never edit a released step.
/// `device_id` is the 64-char lowercase hex text of the SQLite schema, compared bytewise.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE
);
CREATE TABLE claims (
    device_id TEXT COLLATE \"C\" PRIMARY KEY CHECK (device_id ~ '^[0-9a-f]{64}$'),
    tenant TEXT,
    state TEXT NOT NULL,
    thing_name TEXT,
    redirect_id TEXT,
    claimed_at BIGINT,
    ready_at BIGINT,
    redirected_at BIGINT,
    error TEXT,
    cert_pem TEXT
);
CREATE INDEX claims_tenant ON claims (tenant);
CREATE TABLE registrations (
    device_id TEXT COLLATE \"C\" NOT NULL,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    removing BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (device_id, tenant)
);
CREATE INDEX registrations_removing ON registrations (removing) WHERE removing;
",
    "
CREATE TABLE lobby_changes (
    seq BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('claim', 'tenant')),
    key TEXT NOT NULL,
    origin TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
",
    "
CREATE TABLE lobby_jobs (
    key TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    until TIMESTAMPTZ NOT NULL
);
",
    "
CREATE TABLE lobby_presence (
    device_id TEXT COLLATE \"C\" PRIMARY KEY,
    node TEXT NOT NULL,
    thing_name TEXT NOT NULL,
    protocol TEXT NOT NULL,
    connected BOOLEAN NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE TABLE lobby_nodes (
    name TEXT PRIMARY KEY,
    heartbeat TIMESTAMPTZ NOT NULL
);
",
    // Which of two connects of a device on two nodes is the newer (takeover across nodes).
    "
ALTER TABLE lobby_presence
    ADD COLUMN stamp BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN origin TEXT COLLATE \"C\" NOT NULL DEFAULT '';
",
    // Thing names are unique per tenant (`thing_name_holder`, asked on every claim).
    "
CREATE INDEX claims_tenant_thing ON claims (tenant, thing_name);
",
];

/// A node that has not reported for this long is taken for gone: its devices show as not
/// connected. Nodes report at least every [`crate::presence::HEARTBEAT`].
const NODE_GONE_AFTER_SECS: f64 = 15.0;

/// The advisory lock every node holds while it changes tenants or claims (the bytes spell
/// "lobbywrt"). Holding it makes the change log's order the commit order, and lets a node
/// check a claim against every other node's committed changes before it writes.
pub const WRITE_LOCK: i64 = 0x6c6f_6262_7977_7274;
/// The notification channel of the change log.
const CHANNEL: &str = "lobby_changes";
/// Appends to the change log and notifies, inside the writing transaction (NOTIFY is sent
/// at commit).
const LOG_CHANGE: &str = "WITH ch AS (INSERT INTO lobby_changes (kind, key, origin) \
     VALUES ($1, $2, $3) RETURNING seq) SELECT pg_notify('lobby_changes', seq::text) FROM ch";

/// Beats for a node (`$1`).
const NODE_BEAT: &str = "INSERT INTO lobby_nodes (name, heartbeat) VALUES ($1, now()) \
     ON CONFLICT (name) DO UPDATE SET heartbeat = EXCLUDED.heartbeat";
/// Writes a presence batch from node `$6` (origin `$8`). A disconnect reported by one node
/// never hides a connection on another, and a connect from another node replaces the row only
/// when it is newer (stamp, then origin): the connection that the takeover keeps, even when
/// written late.
const PRESENCE_UPSERT: &str = "INSERT INTO lobby_presence \
     (device_id, node, thing_name, protocol, connected, last_seen, stamp, origin) \
     SELECT u.d, $6, u.t, u.p, u.c, u.l, u.s, $8 FROM UNNEST($1::text[], $2::text[], \
     $3::text[], $4::bool[], $5::bigint[], $7::bigint[]) AS u(d, t, p, c, l, s) \
     ON CONFLICT (device_id) DO UPDATE SET node = EXCLUDED.node, \
     thing_name = EXCLUDED.thing_name, protocol = EXCLUDED.protocol, \
     connected = EXCLUDED.connected, last_seen = EXCLUDED.last_seen, \
     stamp = EXCLUDED.stamp, origin = EXCLUDED.origin \
     WHERE lobby_presence.node = EXCLUDED.node \
     OR NOT (EXCLUDED.connected OR lobby_presence.connected) \
     OR (EXCLUDED.connected AND (EXCLUDED.stamp > lobby_presence.stamp \
     OR (EXCLUDED.stamp = lobby_presence.stamp AND EXCLUDED.origin > lobby_presence.origin)))";
/// Announces connects (`<device_id> <stamp> <origin>` each) to every node's watch, at commit.
const ANNOUNCE: &str = "SELECT pg_notify('lobby_takeover', a) FROM UNNEST($1::text[]) AS a";

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
const _: () = assert!(SCHEMA_VERSION >= 1 && SCHEMA_VERSION as usize == MIGRATIONS.len());

const CLAIM_COLUMNS: &str = "SELECT device_id, tenant, state, thing_name, redirect_id, \
     claimed_at, ready_at, redirected_at, error FROM claims";
const REGISTRATION_COLUMNS: &str = "SELECT device_id, tenant, body, removing FROM registrations";

/// PostgreSQL-backed [`Store`]. Cheap to clone (the pool is a handle).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the watch's own connection (not pooled: it stays in LISTEN).
    config: tokio_postgres::Config,
    /// This process's name in the change log (random per start).
    origin: Arc<str>,
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

/// A unique key that already exists is `Conflict` (only `insert_tenant` can hit one: the other
/// writes are upserts); the rest is `Backend`.
fn pg(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return StoreError::Conflict;
    }
    StoreError::Backend(format!("postgres: {}", describe(&e)))
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
            super::redacted(url),
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

    /// Applies the missing migrations; returns how many.
    async fn migrate(&self) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS lobby_schema_migrations (
                version INT PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(pg)?;
        let done: HashSet<i32> = tx
            .query("SELECT version FROM lobby_schema_migrations", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(newer) = done.iter().copied().filter(|v| *v > SCHEMA_VERSION).max() {
            tracing::warn!(
                database = newer,
                known = SCHEMA_VERSION,
                "store schema is newer than this lobby knows; a newer lobby migrated it"
            );
        }
        let mut applied = 0;
        for (version, sql) in (1..).zip(MIGRATIONS) {
            if done.contains(&version) {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| {
                StoreError::Backend(format!("migration {version}: {}", describe(&e)))
            })?;
            tx.execute(
                "INSERT INTO lobby_schema_migrations (version, applied_at) VALUES ($1, now())",
                &[&version],
            )
            .await
            .map_err(pg)?;
            applied += 1;
        }
        tx.commit().await.map_err(pg)?;
        Ok(applied)
    }

    /// A pooled connection.
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Backend(format!("postgres connection: {}", describe(&e))))
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
            tx.execute(&log, &[&subject.0, &subject.1, &&*self.origin])
                .await
                .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
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

    async fn update_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        let body = serde_json::to_string(t).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.execute_logged(
            "update_tenant",
            "UPDATE tenants SET body = $2 WHERE id = $1",
            &[&t.id, &body],
            ("tenant", &t.id),
        )
        .await
        .map(drop)
    }

    async fn delete_tenant(&self, id: &str) -> Result<(), StoreError> {
        self.execute_logged(
            "delete_tenant",
            "DELETE FROM tenants WHERE id = $1",
            &[&id],
            ("tenant", id),
        )
        .await
        .map(drop)
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

    async fn put_claim(&self, c: &Claim, cert_pem: Option<&str>) -> Result<(), StoreError> {
        let hex = c.device_id.to_hex();
        self.execute_logged(
            "put_claim",
            "INSERT INTO claims (device_id, tenant, state, thing_name, redirect_id, \
             claimed_at, ready_at, redirected_at, error, cert_pem) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (device_id) DO UPDATE SET tenant = EXCLUDED.tenant, \
             state = EXCLUDED.state, thing_name = EXCLUDED.thing_name, \
             redirect_id = EXCLUDED.redirect_id, claimed_at = EXCLUDED.claimed_at, \
             ready_at = EXCLUDED.ready_at, redirected_at = EXCLUDED.redirected_at, \
             error = EXCLUDED.error, cert_pem = COALESCE(EXCLUDED.cert_pem, claims.cert_pem)",
            &[
                &hex,
                &c.tenant.as_deref(),
                &c.state.as_str(),
                &c.thing_name,
                &c.redirect_id,
                &c.claimed_at,
                &c.ready_at,
                &c.redirected_at,
                &c.error,
                &cert_pem,
            ],
            ("claim", &hex),
        )
        .await
        .map(drop)
    }

    async fn delete_claim(&self, id: &DeviceId) -> Result<(), StoreError> {
        let hex = id.to_hex();
        self.execute_logged(
            "delete_claim",
            "DELETE FROM claims WHERE device_id = $1",
            &[&hex],
            ("claim", &hex),
        )
        .await
        .map(drop)
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

    async fn thing_name_holder(
        &self,
        tenant: &str,
        thing_name: &str,
        except: &DeviceId,
    ) -> Result<Option<DeviceId>, StoreError> {
        let rows = self
            .query(
                "thing_name_holder",
                "SELECT device_id FROM claims WHERE tenant = $1 AND thing_name = $2 \
                 AND device_id <> $3 LIMIT 1",
                &[&tenant, &thing_name, &except.to_hex()],
            )
            .await?;
        rows.first()
            .map(|r| {
                let hex: String = r.get(0);
                DeviceId::parse_hex(&hex)
                    .ok_or_else(|| StoreError::Corrupt(format!("device_id {hex:?}")))
            })
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

    async fn lock_writes(&self) -> Result<Option<Box<dyn WriteLock>>, StoreError> {
        self.timed("lock_writes", async {
            let conn = self.client().await?;
            conn.execute("SELECT pg_advisory_lock($1)", &[&WRITE_LOCK])
                .await
                .map_err(pg)?;
            Ok(Some(
                Box::new(PgWriteLock { conn: Some(conn) }) as Box<dyn WriteLock>
            ))
        })
        .await
    }

    async fn last_change(&self) -> Result<i64, StoreError> {
        let rows = self
            .query(
                "last_change",
                "SELECT COALESCE(MAX(seq), 0) FROM lobby_changes",
                &[],
            )
            .await?;
        rows.first()
            .map_or(Ok(0), |r| r.try_get::<_, i64>(0).map_err(pg))
    }

    async fn changes_since(&self, seq: i64) -> Result<Vec<Change>, StoreError> {
        let rows = self
            .query(
                "changes_since",
                "SELECT seq, kind, key, origin FROM lobby_changes WHERE seq > $1 ORDER BY seq",
                &[&seq],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let (kind, key): (&str, &str) =
                    (r.try_get(1).map_err(pg)?, r.try_get(2).map_err(pg)?);
                let subject =
                    match kind {
                        "claim" => Subject::Claim(DeviceId::parse_hex(key).ok_or_else(|| {
                            StoreError::Corrupt(format!("change of claim {key:?}"))
                        })?),
                        "tenant" => Subject::Tenant(key.to_owned()),
                        other => return Err(StoreError::Corrupt(format!("change kind {other:?}"))),
                    };
                Ok(Change {
                    seq: r.try_get(0).map_err(pg)?,
                    subject,
                    own: r.try_get::<_, &str>(3).map_err(pg)? == &*self.origin,
                })
            })
            .collect()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn put_presence(&self, node: &str, batch: &[Presence]) -> Result<(), StoreError> {
        let ids: Vec<String> = batch.iter().map(|p| p.device_id.to_hex()).collect();
        let things: Vec<&str> = batch.iter().map(|p| p.thing_name.as_str()).collect();
        let protocols: Vec<&str> = batch.iter().map(|p| p.protocol.as_str()).collect();
        let connected: Vec<bool> = batch.iter().map(|p| p.connected).collect();
        let at: Vec<i64> = batch.iter().map(|p| p.last_seen).collect();
        let stamps: Vec<i64> = batch.iter().map(|p| p.stamp).collect();
        let announced: Vec<String> = batch
            .iter()
            .filter(|p| p.connected)
            .map(|p| format!("{} {} {}", p.device_id.to_hex(), p.stamp, self.origin))
            .collect();
        self.timed("put_presence", async {
            let mut client = self.client().await?;
            let beat = client.prepare_cached(NODE_BEAT).await.map_err(pg)?;
            let upsert = client.prepare_cached(PRESENCE_UPSERT).await.map_err(pg)?;
            let announce = client.prepare_cached(ANNOUNCE).await.map_err(pg)?;
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(&beat, &[&node]).await.map_err(pg)?;
            if !batch.is_empty() {
                tx.execute(
                    &upsert,
                    &[
                        &ids,
                        &things,
                        &protocols,
                        &connected,
                        &at,
                        &node,
                        &stamps,
                        &&*self.origin,
                    ],
                )
                .await
                .map_err(pg)?;
            }
            if !announced.is_empty() {
                // Delivered at commit, with the presence it announces.
                tx.execute(&announce, &[&announced]).await.map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
        .await
    }

    async fn presence(&self, id: Option<&DeviceId>) -> Result<Vec<Presence>, StoreError> {
        let select = format!(
            "SELECT p.device_id, p.node, p.thing_name, p.protocol, \
             p.connected AND COALESCE(n.heartbeat > now() - \
             make_interval(secs => {NODE_GONE_AFTER_SECS}), false), p.last_seen, p.stamp \
             FROM lobby_presence p LEFT JOIN lobby_nodes n ON n.name = p.node"
        );
        let rows = match id {
            Some(id) => {
                let sql = format!("{select} WHERE p.device_id = $1");
                self.query("presence", &sql, &[&id.to_hex()]).await?
            }
            None => self.query("presence", &select, &[]).await?,
        };
        rows.iter()
            .map(|r| {
                let id: &str = r.try_get(0).map_err(pg)?;
                Ok(Presence {
                    device_id: DeviceId::parse_hex(id)
                        .ok_or_else(|| StoreError::Corrupt(format!("presence of {id:?}")))?,
                    node: r.try_get(1).map_err(pg)?,
                    thing_name: r.try_get(2).map_err(pg)?,
                    protocol: r.try_get(3).map_err(pg)?,
                    connected: r.try_get(4).map_err(pg)?,
                    last_seen: r.try_get(5).map_err(pg)?,
                    stamp: r.try_get(6).map_err(pg)?,
                })
            })
            .collect()
    }

    /// The row lock of the upsert decides between nodes racing for the same job.
    async fn take_job(&self, key: &str, lease: Duration) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "take_job",
                "INSERT INTO lobby_jobs (key, node, until) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (key) DO UPDATE SET node = EXCLUDED.node, until = EXCLUDED.until \
                 WHERE lobby_jobs.until < now() OR lobby_jobs.node = EXCLUDED.node \
                 RETURNING key",
                &[&key, &&*self.origin, &lease.as_secs_f64()],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn finish_job(&self, key: &str) -> Result<(), StoreError> {
        self.execute(
            "finish_job",
            "DELETE FROM lobby_jobs WHERE key = $1 AND node = $2",
            &[&key, &&*self.origin],
        )
        .await
        .map(drop)
    }

    fn watch(&self, cancel: CancellationToken) -> Option<Watch> {
        let (changes, rx) = mpsc::channel(1);
        let (takeovers, takeover_rx) = mpsc::channel(watch::TAKEOVER_QUEUE);
        let to = watch::Listeners {
            changes,
            takeovers,
            store: self.clone(),
        };
        tokio::spawn(watch::listen(to, cancel));
        Some(Watch {
            changes: rx,
            takeovers: takeover_rx,
        })
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

/// Holds [`WRITE_LOCK`] on one pooled connection. Dropping it unlocks in the background; if
/// that fails, the connection leaves the pool and closes, which releases the lock too.
struct PgWriteLock {
    conn: Option<Object>,
}

impl WriteLock for PgWriteLock {}

impl Drop for PgWriteLock {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (shutdown): closing the connection releases the lock.
            drop(Object::take(conn));
            return;
        };
        rt.spawn(async move {
            let unlocked = conn
                .query_one("SELECT pg_advisory_unlock($1)", &[&WRITE_LOCK])
                .await
                .is_ok_and(|r| r.get::<_, bool>(0));
            if !unlocked {
                drop(Object::take(conn));
            }
        });
    }
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
