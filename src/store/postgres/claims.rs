//! Claim rows: the conditional claim write ([`crate::store::Store::write_claim`]'s transaction: quota,
//! change-log entry, the row, retiring) and decoding a row.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::sql::*;
use super::{pg, PostgresStore};
use crate::device::DeviceId;
use crate::model::{Claim, ClaimState};
use crate::store::{ClaimWrite, Expect, Retire, StoreError, Written};

/// Whether `e` is a violation of the thing-name index.
fn name_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .and_then(|d| d.constraint())
        .is_some_and(|c| c == THING_NAME_INDEX)
}

impl PostgresStore {
    /// [`crate::store::Store::write_claim`]'s transaction. `Stale(None)` when the condition failed (the
    /// caller reads what is there); every early return rolls back.
    pub(super) async fn write_claim_tx(&self, w: &ClaimWrite<'_>) -> Result<Written, StoreError> {
        let hex = w.id.to_hex();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        if w.bind {
            let tenant = w.claim.and_then(Claim::tenant_id).ok_or_else(|| {
                StoreError::Backend("a binding claim write without a tenant".into())
            })?;
            if let Some(refused) = no_room(&tx, tenant, &hex).await? {
                return Ok(refused);
            }
        }
        let log = tx.prepare_cached(LOG_CHANGE).await.map_err(pg)?;
        let seq: i64 = tx
            .query_one(&log, &[&"claim", &hex, &&*self.origin])
            .await
            .map_err(pg)?
            .get(0);
        let changed = match w.claim {
            Some(c) => match write_row(&tx, w, c, &hex, seq).await {
                Err(e) if name_taken(&e) => return Ok(Written::NameTaken),
                other => other.map_err(pg)?,
            },
            None => delete_row(&tx, w.expect, &hex).await.map_err(pg)?,
        };
        if changed == 0 {
            return Ok(Written::Stale(None));
        }
        let retiring = retire(&tx, w.retire, &hex).await.map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(Written::Done {
            version: seq,
            retiring,
        })
    }
}

/// Whether binding a device to `tenant` is refused: the tenant does not exist, or it has
/// `max_devices` claims (counted under the tenant's quota lock, held to the commit).
async fn no_room(
    tx: &Transaction<'_>,
    tenant: &str,
    hex: &str,
) -> Result<Option<Written>, StoreError> {
    let room = tx.prepare_cached(TENANT_ROOM).await.map_err(pg)?;
    let rows = tx.query(&room, &[&tenant]).await.map_err(pg)?;
    let Some(row) = rows.first() else {
        return Ok(Some(Written::NoTenant));
    };
    let Some(max) = row.try_get::<_, Option<i64>>(0).map_err(pg)? else {
        return Ok(None);
    };
    tx.execute(TENANT_QUOTA_LOCK, &[&tenant])
        .await
        .map_err(pg)?;
    let count = tx.prepare_cached(TENANT_COUNT).await.map_err(pg)?;
    let n: i64 = tx
        .query_one(&count, &[&tenant, &hex])
        .await
        .map_err(pg)?
        .get(0);
    Ok((n >= max).then_some(Written::Full))
}

/// Inserts, upserts or updates the claim row as `w.expect` says, at version `seq`; the rows
/// changed (0: the condition failed).
async fn write_row(
    tx: &Transaction<'_>,
    w: &ClaimWrite<'_>,
    c: &Claim,
    hex: &str,
    seq: i64,
) -> Result<u64, tokio_postgres::Error> {
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
    let sql = match &w.expect {
        Expect::Absent => format!("{CLAIM_INSERT} ON CONFLICT (device_id) DO NOTHING"),
        Expect::Any => format!("{CLAIM_INSERT}{CLAIM_UPSERT_SET}"),
        Expect::Version(v) => {
            params.push(v);
            CLAIM_UPDATE.to_owned()
        }
    };
    let stmt = tx.prepare_cached(&sql).await?;
    tx.execute(&stmt, &params).await
}

/// Deletes the claim row if it is what `expect` says; 1 when the condition held (a delete of
/// nothing expected absent, or unconditional, holds too).
async fn delete_row(
    tx: &Transaction<'_>,
    expect: Expect,
    hex: &str,
) -> Result<u64, tokio_postgres::Error> {
    Ok(match expect {
        Expect::Any => tx
            .execute("DELETE FROM claims WHERE device_id = $1", &[&hex])
            .await?
            .max(1),
        Expect::Version(v) => {
            tx.execute(
                "DELETE FROM claims WHERE device_id = $1 AND version = $2",
                &[&hex, &v],
            )
            .await?
        }
        Expect::Absent => {
            let absent: bool = tx
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM claims WHERE device_id = $1)",
                    &[&hex],
                )
                .await?
                .get(0);
            u64::from(absent)
        }
    })
}

/// Marks the device's registrations `removing` as `retire` says; the tenants marked.
async fn retire(
    tx: &Transaction<'_>,
    retire: Retire<'_>,
    hex: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let keep = match retire {
        Retire::Nothing => return Ok(Vec::new()),
        Retire::All => None,
        Retire::AllBut(t) => Some(t),
    };
    let stmt = tx.prepare_cached(RETIRE).await?;
    let rows = tx.query(&stmt, &[&hex, &keep]).await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// Decodes one claims row. Tenant names repeat across many claims: `tenants` hands out one
/// shared `Arc<str>` per name.
pub(super) fn claim_from_row(
    row: &Row,
    tenants: &mut HashMap<String, Arc<str>>,
) -> Result<Claim, StoreError> {
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
