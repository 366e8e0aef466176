//! The embedded store's tables, and bringing a store made by an older lobby up to them.

use rusqlite::Connection;

use super::backend;
use crate::store::StoreError;

/// Every table and index, created where missing.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS claims (
    device_id TEXT PRIMARY KEY,
    tenant TEXT,
    state TEXT NOT NULL,
    thing_name TEXT,
    redirect_id TEXT,
    claimed_at INTEGER,
    ready_at INTEGER,
    redirected_at INTEGER,
    error TEXT,
    cert_pem TEXT
);
CREATE INDEX IF NOT EXISTS claims_tenant ON claims(tenant);
DROP INDEX IF EXISTS claims_tenant_thing;
CREATE UNIQUE INDEX IF NOT EXISTS claims_tenant_thing_unique ON claims(tenant, thing_name)
    WHERE tenant IS NOT NULL AND thing_name IS NOT NULL;
CREATE TABLE IF NOT EXISTS registrations (
    device_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    removing INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, tenant)
);
CREATE INDEX IF NOT EXISTS registrations_removing ON registrations(removing);
";

/// `claims` columns added after the first schema, in order: (name, declaration).
const ADDED_CLAIM_COLUMNS: [(&str, &str); 3] = [
    ("version", "INTEGER NOT NULL DEFAULT 0"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("next_attempt_at", "INTEGER"),
];

/// Creates what is missing of the schema on `conn` and adds the columns a store made before
/// them lacks; the newest claim version stored (versions only grow from there).
pub(super) fn migrate(conn: &Connection) -> Result<i64, StoreError> {
    conn.execute_batch(SCHEMA).map_err(backend)?;
    // Columns added since the first release, for stores made before them.
    for (column, decl) in ADDED_CLAIM_COLUMNS {
        let has: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('claims') WHERE name = ?1",
                [column],
                |r| r.get::<_, i64>(0),
            )
            .map_err(backend)?
            > 0;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE claims ADD COLUMN {column} {decl}"))
                .map_err(backend)?;
        }
    }
    conn.query_row("SELECT COALESCE(MAX(version), 0) FROM claims", [], |r| {
        r.get(0)
    })
    .map_err(backend)
}
