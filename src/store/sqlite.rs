//! The embedded store: SQLite in WAL mode with `synchronous = FULL`, so a write has reached the
//! disk when its future resolves (a claim is durable before the API answers).
//!
//! One connection behind a mutex, used from `spawn_blocking`: writes are serialised by SQLite
//! anyway. A claim write is conditional on the version it read, like the networked store's, so
//! the claims service's tasks need no lock between them either.
//!
//! Claim writes are group-committed by one writer thread ([`writer`]): concurrent claims share
//! one fsync, and a write is answered only after the commit that made it durable. The schema
//! and its upgrades are [`schema`]'s.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use parking_lot::Mutex;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    ClaimWrite, RegistrationBody, Store, StoreError, StoredTenant, TenantDeleted, TenantPatch,
    TenantUpdated, Written,
};
use crate::config::StoreUrl;
use crate::device::DeviceId;
use crate::model::Registration;
use crate::model::{Claim, ClaimState};

mod schema;
mod writer;

use writer::{run_writer, OwnedWrite, Queued};

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The group-commit writer's queue (the writer holds the newest claim version handed out:
    /// versions only grow, deleted claims' too).
    writes: std::sync::mpsc::Sender<Queued>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

/// How long a statement waits for another connection's lock on the database (an operator's
/// `sqlite3` shell, a backup) before it gives up, answered as [`StoreError::Unavailable`].
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A failure as the store reports it: the database locked by another connection past
/// [`BUSY_TIMEOUT`] is `Unavailable` (nothing was written; retry), anything else `Backend`.
fn backend(e: impl std::fmt::Display + 'static) -> StoreError {
    let locked = (&e as &dyn std::any::Any)
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
        .is_some_and(|c| {
            matches!(
                c,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
        });
    if locked {
        return StoreError::Unavailable(format!(
            "the SQLite database is locked by another connection ({e}); retry"
        ));
    }
    StoreError::Backend(e.to_string())
}

/// Begins a transaction that takes the write lock at once, waiting for it like any statement.
/// (A deferred one that reads first cannot wait for the lock at its first write: SQLite fails
/// that write at once, to avoid a deadlock.)
fn write_transaction(c: &mut Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(backend)
}

impl SqliteStore {
    /// Opens (creating file, parent directory and schema as needed).
    pub async fn open(url: StoreUrl) -> Result<Self, StoreError> {
        let conn = tokio::task::spawn_blocking(move || -> Result<(Connection, i64), StoreError> {
            let conn = match url {
                StoreUrl::SqliteMemory => Connection::open_in_memory(),
                StoreUrl::SqliteFile(path) => {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            backend(format!("cannot create {}: {e}", dir.display()))
                        })?;
                    }
                    Connection::open(&path)
                }
                StoreUrl::Postgres(_) => return Err(backend("not a sqlite store.url")),
            }
            .map_err(backend)?;
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(backend)?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(backend)?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
            let newest = schema::migrate(&conn)?;
            Ok((conn, newest))
        })
        .await
        .map_err(backend)??;
        let (conn, newest) = conn;
        let conn = Arc::new(Mutex::new(conn));
        let version = AtomicI64::new(newest);
        let (writes, queue) = std::sync::mpsc::channel();
        let c = conn.clone();
        std::thread::Builder::new()
            .name("lobby-sqlite-writer".into())
            .spawn(move || run_writer(&c, &version, &queue))
            .map_err(|e| backend(format!("cannot start the SQLite writer: {e}")))?;
        Ok(Self { conn, writes })
    }

    /// The registrations `filter` (an SQL condition) selects.
    async fn registrations_where(
        &self,
        op: &'static str,
        filter: &'static str,
    ) -> Result<Vec<Registration>, StoreError> {
        let rows = self
            .with(op, move |c| {
                let mut stmt = c
                    .prepare(&format!("{REGISTRATION_COLUMNS} WHERE {filter}"))
                    .map_err(backend)?;
                let rows = stmt.query_map([], registration_from_row).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)
            })
            .await?;
        registrations_from(rows)
    }

    /// Runs `f` on the connection off the async runtime.
    async fn with<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let started = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(backend)?;
        crate::metrics::store_operation(op, started.elapsed());
        out
    }
}

/// What a claim read selects, in [`claim_from_row`]'s order.
const CLAIM_SELECT: &str = concat!("SELECT ", super::claim_columns!(), " FROM claims");

/// One claims row ([`CLAIM_SELECT`]); a device id that is not 64 hex characters is corrupt.
fn claim_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Claim, StoreError>> {
    let id: String = row.get(0)?;
    let Some(device_id) = DeviceId::parse_hex(&id) else {
        return Ok(Err(StoreError::Corrupt(format!("device_id {id:?}"))));
    };
    let tenant: Option<String> = row.get(1)?;
    let state: String = row.get(2)?;
    Ok(Ok(Claim {
        device_id,
        tenant: tenant.map(Arc::from),
        state: ClaimState::parse(&state).unwrap_or(ClaimState::Failed),
        thing_name: row.get(3)?,
        redirect_id: row.get(4)?,
        claimed_at: row.get(5)?,
        ready_at: row.get(6)?,
        redirected_at: row.get(7)?,
        error: row.get(8)?,
        version: row.get(9)?,
        attempts: row.get(10)?,
        next_attempt_at: row.get(11)?,
    }))
}

fn registration_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, String, bool)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get::<_, i64>(3)? != 0,
    ))
}

fn registrations_from(
    rows: Vec<(String, String, String, bool)>,
) -> Result<Vec<Registration>, StoreError> {
    rows.into_iter()
        .map(|(id, tenant, body, removing)| RegistrationBody::decode(&id, tenant, &body, removing))
        .collect()
}

const REGISTRATION_COLUMNS: &str = "SELECT device_id, tenant, body, removing FROM registrations";

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.with("ping", |c| {
            c.query_row("SELECT 1", [], |_| Ok(())).map_err(backend)
        })
        .await
    }

    async fn tenants(&self) -> Result<Vec<StoredTenant>, StoreError> {
        self.with("load_tenants", |c| {
            let mut stmt = c
                .prepare("SELECT body, token_hash FROM tenants ORDER BY id")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (body, token_hash) = row.map_err(backend)?;
                out.push(StoredTenant::decode(&body, token_hash)?);
            }
            Ok(out)
        })
        .await
    }

    async fn insert_tenant(&self, t: &StoredTenant) -> Result<(), StoreError> {
        let body = serde_json::to_string(&t.tenant).map_err(backend)?;
        let (id, hash) = (t.tenant.id.clone(), t.token_hash.clone());
        self.with("insert_tenant", move |c| {
            match c.execute(
                "INSERT INTO tenants (id, body, token_hash) VALUES (?1, ?2, ?3)",
                params![id, body, hash],
            ) {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(backend(e)),
            }
        })
        .await
    }

    async fn update_tenant(
        &self,
        id: &str,
        patch: TenantPatch<'_>,
    ) -> Result<TenantUpdated, StoreError> {
        // One node: the claims service's tenant writes take turns, so nothing writes between
        // the read and the write.
        let id = id.to_owned();
        let stored = self.tenant(&id).await?;
        let Some(stored) = stored else {
            return Ok(TenantUpdated::NotFound);
        };
        let tenant = match patch(stored.tenant) {
            Ok(t) => t,
            Err(why) => return Ok(TenantUpdated::Refused(why)),
        };
        let body = serde_json::to_string(&tenant).map_err(backend)?;
        let n = self
            .with("update_tenant", move |c| {
                c.execute(
                    "UPDATE tenants SET body = ?2 WHERE id = ?1",
                    params![id, body],
                )
                .map_err(backend)
            })
            .await?;
        Ok(if n == 0 {
            TenantUpdated::NotFound
        } else {
            TenantUpdated::Updated(Box::new(tenant))
        })
    }

    async fn delete_tenant(&self, id: &str) -> Result<TenantDeleted, StoreError> {
        let id = id.to_owned();
        self.with("delete_tenant", move |c| {
            let tx = write_transaction(c)?;
            let claimed: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM claims WHERE tenant = ?1)",
                    params![id],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            if claimed {
                return Ok(TenantDeleted::HasClaims);
            }
            let n = tx
                .execute("DELETE FROM tenants WHERE id = ?1", params![id])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(if n == 0 {
                TenantDeleted::NotFound
            } else {
                TenantDeleted::Deleted
            })
        })
        .await
    }

    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        self.with("load_claims", |c| {
            let mut stmt = c.prepare(CLAIM_SELECT).map_err(backend)?;
            let rows = stmt.query_map([], claim_from_row).map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(backend)??);
            }
            Ok(out)
        })
        .await
    }

    async fn write_claim(&self, w: &ClaimWrite<'_>) -> Result<Written, StoreError> {
        let started = std::time::Instant::now();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let stopped = || backend("the SQLite writer has stopped");
        self.writes
            .send((OwnedWrite::from(w), answer))
            .map_err(|_| stopped())?;
        let written = answered.await.map_err(|_| stopped())?;
        crate::metrics::store_operation("write_claim", started.elapsed());
        match written? {
            Written::Stale(_) => Ok(Written::Stale(self.claim(&w.id).await?)),
            other => Ok(other),
        }
    }

    async fn claim(&self, id: &DeviceId) -> Result<Option<Claim>, StoreError> {
        let hex = id.to_hex();
        self.with("claim", move |c| {
            c.query_row(
                &format!("{CLAIM_SELECT} WHERE device_id = ?1"),
                params![hex],
                claim_from_row,
            )
            .optional()
            .map_err(backend)?
            .transpose()
        })
        .await
    }

    async fn tenant(&self, id: &str) -> Result<Option<StoredTenant>, StoreError> {
        let id = id.to_owned();
        let row = self
            .with("tenant", move |c| {
                c.query_row(
                    "SELECT body, token_hash FROM tenants WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()
                .map_err(backend)
            })
            .await?;
        row.map(|(body, token_hash)| StoredTenant::decode(&body, token_hash))
            .transpose()
    }

    async fn set_cert_pem(&self, id: &DeviceId, pem: &str) -> Result<(), StoreError> {
        let (id, pem) = (id.to_hex(), pem.to_owned());
        self.with("set_cert_pem", move |c| {
            c.execute(
                "UPDATE claims SET cert_pem = ?2 WHERE device_id = ?1",
                params![id, pem],
            )
            .map_err(backend)
            .map(drop)
        })
        .await
    }

    async fn put_registration(&self, r: &Registration) -> Result<(), StoreError> {
        let body = RegistrationBody::encode(r)?;
        let (id, tenant, removing) = (r.device_id.to_hex(), r.tenant.clone(), r.removing);
        self.with("put_registration", move |c| {
            c.execute(
                "INSERT INTO registrations (device_id, tenant, body, removing) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT(device_id, tenant) \
                 DO UPDATE SET body = ?3, removing = ?4",
                params![id, tenant, body, i64::from(removing)],
            )
            .map_err(backend)
            .map(drop)
        })
        .await
    }

    async fn registrations(&self, id: &DeviceId) -> Result<Vec<Registration>, StoreError> {
        let id = id.to_hex();
        let rows = self
            .with("registrations", move |c| {
                let mut stmt = c
                    .prepare(&format!("{REGISTRATION_COLUMNS} WHERE device_id = ?1"))
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![id], registration_from_row)
                    .map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)
            })
            .await?;
        registrations_from(rows)
    }

    async fn removing_registrations(&self) -> Result<Vec<Registration>, StoreError> {
        self.registrations_where("removing_registrations", "removing = 1")
            .await
    }

    async fn orphaned_registrations(&self) -> Result<Vec<Registration>, StoreError> {
        self.registrations_where("orphaned_registrations", super::ORPHANED_REGISTRATIONS)
            .await
    }

    async fn delete_registration(&self, id: &DeviceId, tenant: &str) -> Result<(), StoreError> {
        let (id, tenant) = (id.to_hex(), tenant.to_owned());
        self.with("delete_registration", move |c| {
            c.execute(
                "DELETE FROM registrations WHERE device_id = ?1 AND tenant = ?2",
                params![id, tenant],
            )
            .map_err(backend)
            .map(drop)
        })
        .await
    }

    async fn cert_pem(&self, id: &DeviceId) -> Result<Option<String>, StoreError> {
        let id = id.to_hex();
        self.with("cert_pem", move |c| {
            c.query_row(
                "SELECT cert_pem FROM claims WHERE device_id = ?1",
                params![id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::now_ms;

    fn tenant(id: &str) -> StoredTenant {
        StoredTenant {
            tenant: serde_json::from_str(&format!(r#"{{"id":"{id}","name":"n"}}"#)).unwrap(),
            token_hash: format!("hash-{id}"),
        }
    }

    #[tokio::test]
    async fn tenants_and_claims_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let url = StoreUrl::SqliteFile(dir.path().join("sub/lobby.db"));
        let store = SqliteStore::open(url.clone()).await.unwrap();
        store.insert_tenant(&tenant("a")).await.unwrap();
        assert!(matches!(
            store.insert_tenant(&tenant("a")).await,
            Err(StoreError::Conflict)
        ));
        let claim = Claim {
            device_id: DeviceId([7; 32]),
            tenant: Some("a".into()),
            state: ClaimState::Ready,
            thing_name: Some("dev-1".into()),
            redirect_id: Some("r1".into()),
            claimed_at: Some(now_ms()),
            ready_at: Some(now_ms()),
            redirected_at: None,
            error: None,
            attempts: 0,
            next_attempt_at: None,
            version: 0,
        };
        store.put_claim(&claim, Some("PEM")).await.unwrap();
        let claim = Claim {
            version: store.put_claim(&claim, None).await.unwrap(),
            ..claim
        };
        drop(store);

        let store = SqliteStore::open(url).await.unwrap();
        assert_eq!(store.tenants().await.unwrap().len(), 1);
        assert_eq!(store.claims().await.unwrap(), vec![claim.clone()]);
        assert_eq!(
            store.cert_pem(&claim.device_id).await.unwrap().as_deref(),
            Some("PEM")
        );
        store.delete_claim(&claim.device_id).await.unwrap();
        assert!(store.claims().await.unwrap().is_empty());
        assert_eq!(
            store.delete_tenant("a").await.unwrap(),
            TenantDeleted::Deleted
        );
        assert!(store.tenants().await.unwrap().is_empty());
    }

    /// A store made before `version`, `attempts` and `next_attempt_at` opens with them added:
    /// its claims load with version 0 and no attempts, and take new writes.
    #[tokio::test]
    async fn a_store_from_before_the_added_columns_opens_and_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let hex = DeviceId([9; 32]).to_hex();
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE claims (device_id TEXT PRIMARY KEY, tenant TEXT, \
                 state TEXT NOT NULL, thing_name TEXT, redirect_id TEXT, claimed_at INTEGER, \
                 ready_at INTEGER, redirected_at INTEGER, error TEXT, cert_pem TEXT)",
            )
            .unwrap();
            old.execute(
                "INSERT INTO claims (device_id, tenant, state) VALUES (?1, 'a', 'registering')",
                params![hex],
            )
            .unwrap();
        }
        let store = SqliteStore::open(StoreUrl::SqliteFile(path)).await.unwrap();
        let loaded = store.claims().await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            (
                loaded[0].version,
                loaded[0].attempts,
                loaded[0].next_attempt_at
            ),
            (0, 0, None)
        );
        let retried = Claim {
            attempts: 3,
            next_attempt_at: Some(5),
            ..loaded[0].clone()
        };
        store.put_claim(&retried, None).await.unwrap();
        let again = store.claim(&retried.device_id).await.unwrap().unwrap();
        assert_eq!((again.attempts, again.next_attempt_at), (3, Some(5)));
    }
}
