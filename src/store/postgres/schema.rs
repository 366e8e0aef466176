//! The PostgreSQL schema: its migrations, applied in order under an advisory lock, each once
//! (`lobby_schema_migrations` records them), so nodes of a fleet can start at the same time.

use std::collections::HashSet;

use super::{describe, pg, PostgresStore};
use crate::store::StoreError;

/// The advisory lock held while migrating. Fixed, so every lobby node takes the same one
/// (the bytes spell "lobbymig"); advisory locks are per database.
pub const MIGRATION_LOCK: i64 = 0x6c6f_6262_796d_6967;

/// The schema, step by step: step `i` is version `i + 1`. Append; never edit a released step.
/// `device_id` is the 64-char lowercase hex text of the SQLite schema, compared bytewise.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // Thing names are unique per tenant (migration 7 makes this index unique).
    "
CREATE INDEX claims_tenant_thing ON claims (tenant, thing_name);
",
    // No fleet write lock: claims carry a version for conditional writes, thing names are
    // unique in the index, and the change log records its writer's transaction id so a reader
    // never passes a change that commits late (`changes_after`).
    "
ALTER TABLE claims ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
DROP INDEX claims_tenant_thing;
CREATE UNIQUE INDEX claims_tenant_thing_unique ON claims (tenant, thing_name)
    WHERE tenant IS NOT NULL AND thing_name IS NOT NULL;
ALTER TABLE lobby_changes ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX lobby_changes_xid ON lobby_changes (xid);
",
    // A registration that keeps failing shows how often it was tried and when it is next.
    "
ALTER TABLE claims
    ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at BIGINT;
",
    // AWS calls paced per account and region across the fleet (`pace_slot`).
    "
CREATE TABLE lobby_pace (
    key TEXT PRIMARY KEY,
    next_at TIMESTAMPTZ NOT NULL
);
",
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
const _: () = assert!(SCHEMA_VERSION >= 1 && SCHEMA_VERSION as usize == MIGRATIONS.len());

impl PostgresStore {
    /// Applies the missing migrations; returns how many.
    pub(super) async fn migrate(&self) -> Result<usize, StoreError> {
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
}
