//! The group-commit writer: claim writes queue for one thread, which takes everything queued,
//! runs each write in its own savepoint of one transaction and commits once, then answers
//! each. Concurrent claims share one fsync; a write is answered only after the commit that
//! made it durable.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use rusqlite::{params, Connection, OptionalExtension};

use super::{backend, write_transaction};
use crate::device::DeviceId;
use crate::model::Claim;
use crate::store::{ClaimWrite, Expect, Retire, StoreError, Written};

/// A claim write waiting for the writer, with where its answer goes.
pub(super) type Queued = (
    OwnedWrite,
    tokio::sync::oneshot::Sender<Result<Written, StoreError>>,
);

/// The most writes one commit takes (the rest wait for the next; a bound on how long the
/// connection is held from readers).
const GROUP_MAX: usize = 1024;

/// A [`ClaimWrite`] that can cross into `spawn_blocking`.
pub(super) struct OwnedWrite {
    id: DeviceId,
    expect: Expect,
    claim: Option<Claim>,
    cert_pem: Option<String>,
    bind: bool,
    /// `None`: retire nothing; `Some(None)`: all; `Some(Some(t))`: all but `t`'s.
    retire: Option<Option<String>>,
}

impl From<&ClaimWrite<'_>> for OwnedWrite {
    fn from(w: &ClaimWrite<'_>) -> Self {
        Self {
            id: w.id,
            expect: w.expect,
            claim: w.claim.cloned(),
            cert_pem: w.cert_pem.map(str::to_owned),
            bind: w.bind,
            retire: match w.retire {
                Retire::Nothing => None,
                Retire::All => Some(None),
                Retire::AllBut(t) => Some(Some(t.to_owned())),
            },
        }
    }
}

/// Writes a whole claim row (`?10`, the certificate, only when given).
const CLAIM_UPSERT: &str = "INSERT INTO claims (device_id, tenant, state, thing_name, \
     redirect_id, claimed_at, ready_at, redirected_at, error, cert_pem, version, attempts, \
     next_attempt_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT(device_id) DO UPDATE SET tenant = ?2, state = ?3, thing_name = ?4, \
     redirect_id = ?5, claimed_at = ?6, ready_at = ?7, redirected_at = ?8, error = ?9, \
     cert_pem = COALESCE(?10, cert_pem), version = ?11, attempts = ?12, next_attempt_at = ?13";

/// One claim write inside the transaction (or savepoint) `tx`; the caller commits on `Done`.
/// `Stale(None)` when the stored claim is not the expected one.
fn write_claim_in(
    tx: &Connection,
    w: &OwnedWrite,
    version: &AtomicI64,
) -> Result<Written, StoreError> {
    let hex = w.id.to_hex();
    if w.bind {
        let tenant = w
            .claim
            .as_ref()
            .and_then(Claim::tenant_id)
            .ok_or_else(|| backend("a binding claim write without a tenant"))?;
        if let Some(refused) = no_room(tx, tenant, &hex)? {
            return Ok(refused);
        }
    }
    let stored: Option<i64> = tx
        .prepare_cached("SELECT version FROM claims WHERE device_id = ?1")
        .and_then(|mut s| s.query_row(params![hex], |r| r.get(0)).optional())
        .map_err(backend)?;
    let as_expected = match w.expect {
        Expect::Any => true,
        Expect::Absent => stored.is_none(),
        Expect::Version(v) => stored == Some(v),
    };
    if !as_expected {
        return Ok(Written::Stale(None));
    }
    let next = version.fetch_add(1, Ordering::Relaxed) + 1;
    match &w.claim {
        Some(cl) => match put_row(tx, &hex, cl, w.cert_pem.as_deref(), next) {
            Err(rusqlite::Error::SqliteFailure(e, Some(msg)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation
                    && msg.contains("thing_name") =>
            {
                return Ok(Written::NameTaken)
            }
            other => other.map_err(backend)?,
        },
        None => tx
            .prepare_cached("DELETE FROM claims WHERE device_id = ?1")
            .and_then(|mut s| s.execute(params![hex]))
            .map_err(backend)?,
    };
    let retiring = match &w.retire {
        Some(keep) => retire(tx, &hex, keep.as_deref()).map_err(backend)?,
        None => Vec::new(),
    };
    Ok(Written::Done {
        version: next,
        retiring,
    })
}

/// Whether binding a device to `tenant` is refused: the tenant does not exist, or it has
/// `max_devices` claims.
fn no_room(tx: &Connection, tenant: &str, hex: &str) -> Result<Option<Written>, StoreError> {
    let room: Option<Option<i64>> = tx
        .prepare_cached(
            "SELECT CAST(json_extract(body, '$.max_devices') AS INTEGER) FROM tenants WHERE id = ?1",
        )
        .and_then(|mut s| s.query_row(params![tenant], |r| r.get(0)).optional())
        .map_err(backend)?;
    let Some(max) = room else {
        return Ok(Some(Written::NoTenant));
    };
    let Some(max) = max.map(|m| u64::try_from(m).unwrap_or(0)) else {
        return Ok(None);
    };
    let n: i64 = tx
        .prepare_cached("SELECT count(*) FROM claims WHERE tenant = ?1 AND device_id <> ?2")
        .and_then(|mut s| s.query_row(params![tenant, hex], |r| r.get(0)))
        .map_err(backend)?;
    Ok((u64::try_from(n).unwrap_or(0) >= max).then_some(Written::Full))
}

/// Writes the whole claim row at `version`.
fn put_row(
    tx: &Connection,
    hex: &str,
    cl: &Claim,
    cert_pem: Option<&str>,
    version: i64,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(CLAIM_UPSERT).and_then(|mut s| {
        s.execute(params![
            hex,
            cl.tenant.as_deref(),
            cl.state.as_str(),
            cl.thing_name,
            cl.redirect_id,
            cl.claimed_at,
            cl.ready_at,
            cl.redirected_at,
            cl.error,
            cert_pem,
            version,
            cl.attempts,
            cl.next_attempt_at,
        ])
    })
}

/// Marks the device's registrations with every tenant but `keep` `removing`; the tenants.
fn retire(tx: &Connection, hex: &str, keep: Option<&str>) -> rusqlite::Result<Vec<String>> {
    let mut stmt = tx.prepare_cached(
        "UPDATE registrations SET removing = 1 WHERE device_id = ?1 \
         AND (?2 IS NULL OR tenant <> ?2) RETURNING tenant",
    )?;
    let rows = stmt.query_map(params![hex, keep], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// The group-commit writer: until every sender is gone, takes what is queued (at least one
/// write, at most [`GROUP_MAX`]), writes each in a savepoint of one transaction (a write that
/// is refused or fails leaves nothing behind, the others stand), commits, answers.
pub(super) fn run_writer(
    conn: &Mutex<Connection>,
    version: &AtomicI64,
    queue: &std::sync::mpsc::Receiver<Queued>,
) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(q) => group.push(q),
                Err(_) => break,
            }
        }
        let answers = write_group(&mut conn.lock(), version, &group);
        match answers {
            Ok(answers) => {
                for ((_, to), answer) in group.into_iter().zip(answers) {
                    let _ = to.send(answer);
                }
            }
            Err(e) => {
                for (_, to) in group {
                    let _ = to.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One transaction for `group`, one answer per write; `Err` when the commit itself failed
/// (then nothing of the group was written).
fn write_group(
    c: &mut Connection,
    version: &AtomicI64,
    group: &[Queued],
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let tx = write_transaction(c)?;
    // Every statement of the writer is prepared once and cached, the savepoint's too: parsing
    // SQL was a fifth of the writer's time when each write parsed its own.
    let run = |sql: &str| {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(backend)
    };
    let mut answers = Vec::with_capacity(group.len());
    for (w, _) in group {
        run("SAVEPOINT claim_write")?;
        let answer = write_claim_in(&tx, w, version);
        if !matches!(answer, Ok(Written::Done { .. })) {
            // Refused or failed: nothing of this write stays.
            run("ROLLBACK TO claim_write")?;
        }
        run("RELEASE claim_write")?;
        answers.push(answer);
    }
    tx.commit().map_err(backend)?;
    Ok(answers)
}
