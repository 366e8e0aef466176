//! Times the lobby's start-up load from a big store: (a) `Store::claims()` and (b) the whole
//! `ClaimsService::load` (tenants, claims, every claim into the claims map), as `Lobby::start`
//! runs it.
//!
//! ```sh
//! cargo run --release --example store_load -- \
//!     --url postgres://postgres@127.0.0.1:5432/lobby_load --claims 1000000
//! cargo run --release --example store_load -- --url sqlite:///tmp/lobby_load.db --claims 1000000
//! ```
//!
//! The PostgreSQL database (or SQLite file) is created when missing. An empty store is filled
//! with `--claims` rows (PostgreSQL: one binary `COPY … FROM STDIN`; SQLite: one transaction):
//! random device ids, a third claimed by one of `--tenants` tenants with thing name, redirect
//! id and timestamps (a few `registering` or `failed` with an error text), the rest revoked
//! while unclaimed, the only claim without a tenant. A store that already holds claims is timed
//! as it is; `--refill` empties and refills it.

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use lobby::claims::codes::ClaimKey;
use lobby::claims::events::ClaimEvents;
use lobby::claims::service::ClaimsService;
use lobby::config::StoreUrl;
use lobby::device::DeviceId;
use lobby::model::{Claim, ClaimState};
use lobby::store::{self, StoreError, StoredTenant};
use lobby::waiting::WaitingRoom;
use rand::{Rng, RngCore};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;

#[derive(Parser)]
struct Args {
    /// `store.url`: `postgres://…/<db>` or `sqlite://<path>`.
    #[arg(long)]
    url: String,
    /// Claims to fill an empty store with.
    #[arg(long, default_value_t = 1_000_000)]
    claims: usize,
    /// Tenants the claimed third is spread over.
    #[arg(long, default_value_t = 50)]
    tenants: usize,
    /// Empty the claims table and fill it again.
    #[arg(long)]
    refill: bool,
}

const CLAIM_COLUMNS: &str =
    "device_id, tenant, state, thing_name, redirect_id, claimed_at, ready_at, redirected_at, error";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = StoreUrl::parse(&args.url).context("--url: expected postgres://… or sqlite://…")?;
    if let StoreUrl::Postgres(u) = &url {
        create_database(u).await?;
    }
    let store = store::open(&args.url).await?;
    for t in 0..args.tenants {
        match store.insert_tenant(&tenant(t)).await {
            Ok(()) | Err(StoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut rows = count(&url).await?;
    if rows > 0 && args.refill {
        empty(&url).await?;
        rows = 0;
    }
    if rows == 0 {
        let started = Instant::now();
        match &url {
            StoreUrl::Postgres(u) => fill_postgres(u, args.claims, args.tenants).await?,
            StoreUrl::SqliteFile(path) => fill_sqlite(path, args.claims, args.tenants)?,
            StoreUrl::SqliteMemory => bail!("an in-memory store is gone before it can be timed"),
        }
        rows = count(&url).await?;
        println!("filled {rows} claims in {:.2?}", started.elapsed());
    } else {
        println!("timing the {rows} claims already stored");
    }
    drop(store);

    let started = Instant::now();
    let store = store::open(&args.url).await?;
    let opened = started.elapsed();
    let started = Instant::now();
    let claims = store.claims().await?;
    let loaded = started.elapsed();
    let claimed = claims.iter().filter(|c| c.tenant.is_some()).count();
    drop(claims);
    let rss_before_map = rss_kib("VmRSS");

    let started = Instant::now();
    let (events, _jobs) = ClaimEvents::channel();
    let service =
        ClaimsService::load(store, ClaimKey::generate(), WaitingRoom::default(), events).await?;
    let mapped = started.elapsed();
    let rss_after_map = rss_kib("VmRSS");
    println!("store: {}", lobby::config::redacted(&args.url));
    println!("{:<30}{opened:>10.2?}", "open (schema check)");
    println!(
        "{:<30}{loaded:>10.2?}  {rows} rows, {claimed} with a tenant",
        "(a) store.claims()"
    );
    println!(
        "{:<30}{mapped:>10.2?}  {:?}",
        "(b) ClaimsService::load",
        service.cache()
    );
    println!(
        "{:<30}{:>10.2?}",
        "    map inserts, (b) - (a)",
        mapped.saturating_sub(loaded)
    );
    println!(
        "RSS: {rss_before_map} KiB before the map, {rss_after_map} KiB with it, peak {} KiB",
        rss_kib("VmHWM")
    );
    Ok(())
}

/// A line of /proc/self/status, in KiB (0 where there is none).
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(str::to_owned))
        })
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn tenant(n: usize) -> StoredTenant {
    let id = format!("tenant-{n:03}");
    StoredTenant {
        tenant: serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "endpoint": format!("{id}.iot.eu-west-1.example"),
            "port": 8883, "region": "eu-west-1",
        }))
        .unwrap(),
        token_hash: hex::encode(rand::rng().random::<[u8; 32]>()),
    }
}

/// Row `i` of the generated data.
fn claim(i: usize, tenants: usize, rng: &mut impl RngCore) -> Claim {
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    let device_id = DeviceId(id);
    if i % 3 != 0 || tenants == 0 {
        return Claim::revoked(device_id);
    }
    let claimed_at = 1_750_000_000_000 + (rng.next_u64() % 10_000_000_000) as i64;
    let (state, ready_at, redirected_at, error) = match i % 300 {
        3 => (ClaimState::Registering, None, None, None),
        6 => (
            ClaimState::Failed,
            None,
            None,
            Some("ResourceNotFoundException: policy \"devices\" does not exist".to_owned()),
        ),
        n => {
            let ready = claimed_at + 400 + (n as i64) * 7;
            (
                ClaimState::Ready,
                Some(ready),
                (n % 5 != 0).then_some(ready + 120),
                None,
            )
        }
    };
    let mut redirect = [0u8; 12];
    rng.fill_bytes(&mut redirect);
    Claim {
        device_id,
        tenant: Some(format!("tenant-{:03}", (i / 3) % tenants).into()),
        state,
        thing_name: Some(format!("device-{i:07}")),
        redirect_id: Some(format!("r-{}", hex::encode(redirect))),
        claimed_at: Some(claimed_at),
        ready_at,
        redirected_at,
        error,
        attempts: 0,
        next_attempt_at: None,
        version: 0,
    }
}

async fn pg_connect(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    Ok(client)
}

/// Creates the URL's database through the `postgres` database when it is missing.
async fn create_database(url: &str) -> anyhow::Result<()> {
    let mut config: tokio_postgres::Config = url.parse()?;
    let db = config
        .get_dbname()
        .context("--url names no database")?
        .to_owned();
    let admin = pg_connect(config.dbname("postgres")).await?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", db.replace('"', "\"\""));
        admin
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await?;
        println!("created database {db}");
    }
    Ok(())
}

async fn count(url: &StoreUrl) -> anyhow::Result<i64> {
    Ok(match url {
        StoreUrl::Postgres(u) => pg_connect(&u.parse()?)
            .await?
            .query_one("SELECT count(*) FROM claims", &[])
            .await?
            .get(0),
        StoreUrl::SqliteFile(path) => {
            rusqlite::Connection::open(path)?
                .query_row("SELECT count(*) FROM claims", [], |r| r.get(0))?
        }
        StoreUrl::SqliteMemory => 0,
    })
}

async fn empty(url: &StoreUrl) -> anyhow::Result<()> {
    match url {
        StoreUrl::Postgres(u) => {
            pg_connect(&u.parse()?)
                .await?
                .batch_execute("TRUNCATE claims")
                .await?
        }
        StoreUrl::SqliteFile(path) => {
            rusqlite::Connection::open(path)?.execute_batch("DELETE FROM claims; VACUUM")?
        }
        StoreUrl::SqliteMemory => {}
    }
    Ok(())
}

async fn fill_postgres(url: &str, n: usize, tenants: usize) -> anyhow::Result<()> {
    let client = pg_connect(&url.parse()?).await?;
    let sink = client
        .copy_in(&format!(
            "COPY claims ({CLAIM_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let text = Type::TEXT;
    let types = [
        text.clone(),
        text.clone(),
        text.clone(),
        text.clone(),
        text.clone(),
        Type::INT8,
        Type::INT8,
        Type::INT8,
        text,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    let mut rng = rand::rng();
    for i in 0..n {
        let c = claim(i, tenants, &mut rng);
        let row: [&(dyn ToSql + Sync); 9] = [
            &c.device_id.to_hex(),
            &c.tenant.as_deref(),
            &c.state.as_str(),
            &c.thing_name,
            &c.redirect_id,
            &c.claimed_at,
            &c.ready_at,
            &c.redirected_at,
            &c.error,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    // As a long-lived table would be: hint bits set and statistics known.
    client.batch_execute("VACUUM (ANALYZE) claims").await?;
    Ok(())
}

fn fill_sqlite(path: &std::path::Path, n: usize, tenants: usize) -> anyhow::Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(&format!(
            "INSERT INTO claims ({CLAIM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))?;
        let mut rng = rand::rng();
        for i in 0..n {
            let c = claim(i, tenants, &mut rng);
            insert.execute(rusqlite::params![
                c.device_id.to_hex(),
                c.tenant.as_deref(),
                c.state.as_str(),
                c.thing_name,
                c.redirect_id,
                c.claimed_at,
                c.ready_at,
                c.redirected_at,
                c.error,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}
