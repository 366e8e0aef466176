//! One store test suite, run against every backend: each test is written once, and
//! `both_backends!` makes a `sqlite_<name>` (a file in a temp dir) and a `postgres_<name>` (a
//! fresh database, see `common/pg.rs`) test of it. Stores are opened through
//! `lobby::store::open`, as the lobby does. Last, a lobby on PostgreSQL keeps a claim made
//! through its API across a restart.

mod common;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/pg_tls.rs"]
mod pg_tls;

use std::sync::Arc;

use lobby::device::DeviceId;
use lobby::model::{AwsIotBackend, Backend, Claim, ClaimState, Tenant};
use lobby::model::{CertRef, Registration};
use lobby::store::{
    self, ClaimWrite, Expect, Fleet, Retire, Store, StoreError, StoredTenant, TenantDeleted,
    TenantUpdated, Written,
};

/// The fleet of a store several nodes share.
fn fleet(store: &Arc<dyn Store>) -> &dyn Fleet {
    store.fleet().expect("a store several nodes share")
}

/// Where a test's store lives, for as long as the test runs.
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(pg::TestDb),
    /// A server of the test's own that takes TCP only over TLS; the store connects with
    /// `verify-full`.
    PostgresTls(pg_tls::TlsServer),
}

/// A backend under test: its `store.url` and the place behind it.
struct Fixture {
    url: String,
    place: Place,
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("lobby.db").display());
        Self {
            url,
            place: Place::Sqlite(dir),
        }
    }

    async fn postgres() -> Self {
        let db = pg::TestDb::create().await;
        Self {
            url: db.url.clone(),
            place: Place::Postgres(db),
        }
    }

    async fn postgres_tls() -> Self {
        let server = pg_tls::TlsServer::start();
        server.create_db("lobby").await;
        Self {
            url: server.verified_url("lobby"),
            place: Place::PostgresTls(server),
        }
    }

    /// Opens the store (again) as the lobby does.
    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url)
            .await
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url))
    }

    /// A plain connection to the PostgreSQL database (a PostgreSQL fixture only).
    async fn pg_client(&self) -> tokio_postgres::Client {
        match &self.place {
            Place::Postgres(db) => db.client().await,
            Place::PostgresTls(server) => server.client("lobby").await,
            Place::Sqlite(_) => panic!("not a PostgreSQL fixture"),
        }
    }

    /// What opening must never change once the schema exists: PostgreSQL's migration records
    /// (version and when it was applied), SQLite's schema text.
    async fn schema(&self) -> Vec<String> {
        match &self.place {
            Place::Postgres(_) | Place::PostgresTls(_) => self
                .pg_client()
                .await
                .query(
                    "SELECT version, applied_at::text FROM lobby_schema_migrations \
                     ORDER BY version",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| format!("{} {}", r.get::<_, i32>(0), r.get::<_, String>(1)))
                .collect(),
            Place::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("lobby.db")).unwrap();
                let mut stmt = conn
                    .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY name")
                    .unwrap();
                stmt.query_map([], |r| {
                    Ok(format!(
                        "{} {} {}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?.unwrap_or_default()
                    ))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
            }
        }
    }
}

/// `store name => sqlite_name, postgres_name;` runs `name(&dyn Store)` on a fresh store of
/// each backend; `fixture name => …;` hands the test the [`Fixture`] (to reopen it).
macro_rules! both_backends {
    ($($kind:ident $test:ident => $sqlite:ident, $postgres:ident;)*) => {$(
        #[tokio::test]
        async fn $sqlite() {
            both_backends!(@run $kind $test, Fixture::sqlite().await);
        }
        #[tokio::test]
        async fn $postgres() {
            both_backends!(@run $kind $test, Fixture::postgres().await);
        }
        /// The same against PostgreSQL over TLS (`verify-full`).
        mod $test {
            #[tokio::test]
            async fn postgres_over_tls() {
                both_backends!(@run $kind super::$test, super::Fixture::postgres_tls().await);
            }
        }
    )*};
    (@run store $test:path, $fixture:expr) => {{
        let fixture = $fixture;
        $test(&*fixture.open().await).await;
    }};
    (@run fixture $test:path, $fixture:expr) => {{
        $test(&$fixture).await;
    }};
}

both_backends! {
    store orphaned_registrations_are_those_without_a_claim =>
        sqlite_orphaned_registrations_are_those_without_a_claim, postgres_orphaned_registrations_are_those_without_a_claim;
    fixture concurrent_claim_writes_each_stand_alone =>
        sqlite_concurrent_claim_writes_each_stand_alone, postgres_concurrent_claim_writes_each_stand_alone;
    store tenants_insert_conflict_update_delete =>
        sqlite_tenants_insert_conflict_update_delete, postgres_tenants_insert_conflict_update_delete;
    store claims_put_replace_delete_round_trip =>
        sqlite_claims_put_replace_delete_round_trip, postgres_claims_put_replace_delete_round_trip;
    store cert_pem_is_kept_replaced_and_set =>
        sqlite_cert_pem_is_kept_replaced_and_set, postgres_cert_pem_is_kept_replaced_and_set;
    store registrations_put_replace_removing_delete =>
        sqlite_registrations_put_replace_removing_delete, postgres_registrations_put_replace_removing_delete;
    fixture data_survives_reopen =>
        sqlite_data_survives_reopen, postgres_data_survives_reopen;
    fixture reopen_applies_nothing_twice =>
        sqlite_reopen_applies_nothing_twice, postgres_reopen_applies_nothing_twice;
    store one_claim_and_one_tenant_read_back =>
        sqlite_one_claim_and_one_tenant_read_back, postgres_one_claim_and_one_tenant_read_back;
    store claim_writes_are_conditional =>
        sqlite_claim_writes_are_conditional, postgres_claim_writes_are_conditional;
    store claim_writes_check_their_tenant =>
        sqlite_claim_writes_check_their_tenant, postgres_claim_writes_check_their_tenant;
}

/// A claim write happens only on the claim it expects, and says what is there instead.
async fn claim_writes_are_conditional(store: &dyn Store) {
    let c = full_claim(1, "acme");
    let write = |expect, claim| ClaimWrite::new(device(1), expect, claim);
    let Written::Done { version: v1, .. } = store
        .write_claim(&write(Expect::Absent, Some(&c)))
        .await
        .unwrap()
    else {
        panic!("an absent claim is written")
    };
    let stored = Claim {
        version: v1,
        ..c.clone()
    };
    assert_eq!(
        store
            .write_claim(&write(Expect::Absent, Some(&c)))
            .await
            .unwrap(),
        Written::Stale(Some(stored.clone())),
        "a second insert finds the first"
    );
    let moved = Claim {
        tenant: Some("bolt".into()),
        ..c.clone()
    };
    assert_eq!(
        store
            .write_claim(&write(Expect::Version(v1 + 1000), Some(&moved)))
            .await
            .unwrap(),
        Written::Stale(Some(stored.clone()))
    );
    let Written::Done { version: v2, .. } = store
        .write_claim(&write(Expect::Version(v1), Some(&moved)))
        .await
        .unwrap()
    else {
        panic!("the expected version is replaced")
    };
    assert!(v2 > v1, "versions grow");
    assert_eq!(
        store
            .write_claim(&write(Expect::Version(v1), None))
            .await
            .unwrap(),
        Written::Stale(Some(Claim {
            version: v2,
            ..moved.clone()
        })),
        "a delete of an old version is refused"
    );

    // Thing names are unique per tenant; another tenant may use the same one.
    let twin = Claim {
        device_id: device(2),
        ..moved.clone()
    };
    let twin_write = ClaimWrite::new(device(2), Expect::Absent, Some(&twin));
    assert_eq!(
        store.write_claim(&twin_write).await.unwrap(),
        Written::NameTaken
    );
    let elsewhere = Claim {
        tenant: Some("acme".into()),
        ..twin.clone()
    };
    assert!(matches!(
        store
            .write_claim(&ClaimWrite::new(
                device(2),
                Expect::Absent,
                Some(&elsewhere)
            ))
            .await
            .unwrap(),
        Written::Done { .. }
    ));

    // Unclaim with its registrations retired, in the same write.
    for t in ["acme", "bolt"] {
        store
            .put_registration(&registration(1, t, true, false))
            .await
            .unwrap();
    }
    let retire_all = ClaimWrite {
        retire: Retire::All,
        ..write(Expect::Version(v2), None)
    };
    let Written::Done { mut retiring, .. } = store.write_claim(&retire_all).await.unwrap() else {
        panic!("the delete is written")
    };
    retiring.sort();
    assert_eq!(retiring, ["acme", "bolt"]);
    assert_eq!(
        removing(store).await,
        [(device(1), "acme".into()), (device(1), "bolt".into())]
    );
    assert_eq!(store.claim(&device(1)).await.unwrap(), None);
}

/// A binding write checks its tenant in the same transaction: it exists, and has room.
async fn claim_writes_check_their_tenant(store: &dyn Store) {
    let c = full_claim(1, "acme");
    let binding = |claim| ClaimWrite {
        bind: true,
        ..ClaimWrite::new(claim_id(claim), Expect::Absent, Some(claim))
    };
    assert_eq!(
        store.write_claim(&binding(&c)).await.unwrap(),
        Written::NoTenant
    );
    let mut acme = tenant("acme", &"a".repeat(64));
    acme.tenant.max_devices = Some(1);
    store.insert_tenant(&acme).await.unwrap();
    assert!(matches!(
        store.write_claim(&binding(&c)).await.unwrap(),
        Written::Done { .. }
    ));
    let second = full_claim(2, "acme");
    assert_eq!(
        store.write_claim(&binding(&second)).await.unwrap(),
        Written::Full
    );
    assert_eq!(store.claim(&device(2)).await.unwrap(), None);
}

/// Many claim writes at once (the SQLite store commits them in groups): each is answered as
/// if it ran alone, a refused one takes none of the others with it, and what was answered done
/// is what a reopened store holds, with the versions answered.
async fn concurrent_claim_writes_each_stand_alone(fixture: &Fixture) {
    let store = fixture.open().await;
    for n in 1..=20 {
        let c = full_claim(n, "acme");
        let w = ClaimWrite::new(device(n), Expect::Absent, Some(&c));
        assert!(matches!(
            store.write_claim(&w).await.unwrap(),
            Written::Done { .. }
        ));
    }
    let before = store.claims().await.unwrap();
    let mut writes = Vec::new();
    for n in 1..=120u8 {
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            let mut c = full_claim(n, "acme");
            if n > 100 {
                c.thing_name = Some("device-0001".into());
            }
            let w = ClaimWrite::new(device(n), Expect::Absent, Some(&c));
            (n, store.write_claim(&w).await.unwrap())
        }));
    }
    let mut done = std::collections::BTreeMap::new();
    for w in writes {
        match w.await.unwrap() {
            (n @ 1..=20, Written::Stale(Some(c))) => {
                assert_eq!(Some(&c), before.iter().find(|b| b.device_id == device(n)))
            }
            (21..=100, Written::Done { version, .. }) => {
                assert!(done.insert(version, ()).is_none(), "versions are unique");
            }
            (101.., Written::NameTaken) => {}
            (n, other) => panic!("write {n}: {other:?}"),
        }
    }
    let reopened = fixture.open().await;
    let mut held = reopened.claims().await.unwrap();
    held.sort_by_key(|c| c.device_id.0);
    let ids: Vec<u8> = held.iter().map(|c| c.device_id.0[0]).collect();
    assert_eq!(ids, (1..=100).collect::<Vec<u8>>());
    let versions: Vec<i64> = held[20..].iter().map(|c| c.version).collect();
    let answered: Vec<i64> = done.keys().copied().collect();
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, answered,
        "the stored versions are the ones answered"
    );
}

fn claim_id(c: &Claim) -> DeviceId {
    c.device_id
}

fn tenant(id: &str, token_hash: &str) -> StoredTenant {
    StoredTenant {
        tenant: serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("Tenant {id}"), "endpoint": format!("iot.{id}.example"),
            "port": 8883, "region": "eu-west-1",
        }))
        .unwrap(),
        token_hash: token_hash.into(),
    }
}

fn summary(tenants: &[StoredTenant]) -> Vec<(Tenant, String)> {
    tenants
        .iter()
        .map(|t| (t.tenant.clone(), t.token_hash.clone()))
        .collect()
}

fn device(n: u8) -> DeviceId {
    DeviceId([n; 32])
}

/// A claim with every optional field set.
fn full_claim(n: u8, tenant: &str) -> Claim {
    Claim {
        device_id: device(n),
        tenant: Some(tenant.into()),
        state: ClaimState::Ready,
        thing_name: Some(format!("device-{n:04}")),
        redirect_id: Some(format!("r-{n:024x}")),
        claimed_at: Some(1_700_000_000_000 + i64::from(n)),
        ready_at: Some(1_700_000_000_500),
        redirected_at: Some(i64::MAX),
        error: None,
        attempts: 0,
        next_attempt_at: None,
        version: 0,
    }
}

/// `c` without its version (the store sets it), for comparing contents.
fn unversioned(c: Claim) -> Claim {
    Claim { version: 0, ..c }
}

/// A device revoked while unclaimed: every optional field empty.
fn bare_claim(n: u8) -> Claim {
    Claim::revoked(device(n))
}

async fn sorted_claims(store: &dyn Store) -> Vec<Claim> {
    let mut claims: Vec<_> = store
        .claims()
        .await
        .unwrap()
        .into_iter()
        .map(unversioned)
        .collect();
    claims.sort_by_key(|c| c.device_id.0);
    claims
}

fn registration(n: u8, tenant: &str, cert: bool, removing: bool) -> Registration {
    Registration {
        device_id: device(n),
        tenant: tenant.into(),
        backend: AwsIotBackend {
            region: "eu-west-1".into(),
            role_arn: format!("arn:aws:iam::123456789012:role/lobby-{tenant}"),
            external_id: "ext-1".into(),
            policy_name: "devices".into(),
            thing_name: Some("{cn}".into()),
            rate_limit: None,
        },
        thing_name: format!("device-{n:04}"),
        cert: cert.then(|| CertRef {
            id: format!("cert-{n}"),
            arn: format!("arn:aws:iot:eu-west-1:123456789012:cert/cert-{n}"),
        }),
        removing,
    }
}

async fn sorted_registrations(store: &dyn Store, n: u8) -> Vec<Registration> {
    let mut regs = store.registrations(&device(n)).await.unwrap();
    regs.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    regs
}

async fn removing(store: &dyn Store) -> Vec<(DeviceId, String)> {
    let mut regs: Vec<_> = store
        .removing_registrations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.device_id, r.tenant))
        .collect();
    regs.sort_by(|a, b| (a.0 .0, &a.1).cmp(&(b.0 .0, &b.1)));
    regs
}

async fn one_claim_and_one_tenant_read_back(store: &dyn Store) {
    let t = tenant("acme", &"a".repeat(64));
    store.insert_tenant(&t).await.unwrap();
    let got = store.tenant("acme").await.unwrap().unwrap();
    assert_eq!((got.tenant, got.token_hash), (t.tenant, t.token_hash));
    assert!(store.tenant("nobody").await.unwrap().is_none());
    let (full, bare) = (full_claim(7, "acme"), bare_claim(8));
    store.put_claim(&full, Some("PEM")).await.unwrap();
    store.put_claim(&bare, None).await.unwrap();
    let read = |id| async move { store.claim(&id).await.unwrap().map(unversioned) };
    assert_eq!(read(full.device_id).await, Some(full));
    assert_eq!(read(bare.device_id).await, Some(bare));
    assert_eq!(store.claim(&device(99)).await.unwrap(), None);
}

/// The change log of a shared store: every tenant and claim write is an entry, marked as its
/// writer's own; another node's handle sees them as foreign. A claim's version is its change's
/// number. A reader reads by cursor, and a change that commits after a younger one (a smaller
/// sequence number committed later) is still read: it is never behind the next cursor.
#[tokio::test]
async fn postgres_change_log_reads_late_commits() {
    use lobby::store::Subject;
    let f = Fixture::postgres().await;
    let (a, b) = (f.open().await, f.open().await);
    let start = fleet(&a).change_cursor().await.unwrap();
    a.insert_tenant(&tenant("acme", &"a".repeat(64)))
        .await
        .unwrap();
    let version = a.put_claim(&full_claim(1, "acme"), None).await.unwrap();
    b.delete_claim(&device(1)).await.unwrap();
    let seen_by_a = fleet(&a).changes_after(start).await.unwrap();
    let subjects: Vec<_> = seen_by_a
        .changes
        .iter()
        .map(|c| (c.subject.clone(), c.own))
        .collect();
    assert_eq!(
        subjects,
        vec![
            (Subject::Tenant("acme".into()), true),
            (Subject::Claim(device(1)), true),
            (Subject::Claim(device(1)), false),
        ]
    );
    assert_eq!(
        seen_by_a.changes[1].seq, version,
        "a claim's version is its change"
    );
    // Registrations and certificates are not map changes.
    a.set_cert_pem(&device(1), "PEM").await.unwrap();
    let after = fleet(&a).changes_after(seen_by_a.next).await.unwrap();
    assert!(
        after.changes.iter().all(|c| seen_by_a.changes.contains(c)),
        "nothing new: {after:?}"
    );

    // A writer takes a sequence number, then stalls before it commits; a younger writer
    // commits meanwhile and is read.
    let slow = f.pg_client().await;
    slow.batch_execute(
        "BEGIN; INSERT INTO lobby_changes (kind, key, origin) VALUES ('tenant', 'slow', 'x')",
    )
    .await
    .unwrap();
    a.insert_tenant(&tenant("bolt", &"b".repeat(64)))
        .await
        .unwrap();
    let first = fleet(&b).changes_after(seen_by_a.next).await.unwrap();
    let keys = |batch: &lobby::store::ChangeBatch| -> Vec<Subject> {
        batch.changes.iter().map(|c| c.subject.clone()).collect()
    };
    assert!(keys(&first).contains(&Subject::Tenant("bolt".into())));
    slow.batch_execute("COMMIT").await.unwrap();
    let second = fleet(&b).changes_after(first.next).await.unwrap();
    assert!(
        keys(&second).contains(&Subject::Tenant("slow".into())),
        "the late commit with the smaller number is read: {second:?}"
    );
    // It may come again while any older transaction runs (on the whole server: other tests'
    // too), but not for ever.
    let mut cursor = second.next;
    let passed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let next = fleet(&b).changes_after(cursor).await.unwrap();
            if !keys(&next).contains(&Subject::Tenant("slow".into())) {
                return;
            }
            cursor = next.next;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(passed.is_ok(), "the cursor never passes the late commit");
}

/// Job leases: one node at a time; renewable by the holder; free for another once expired
/// or finished.
#[tokio::test]
async fn postgres_job_leases() {
    use std::time::Duration;
    let f = Fixture::postgres().await;
    let (a, b) = (f.open().await, f.open().await);
    let lease = Duration::from_millis(600);
    assert!(fleet(&a).take_job("register:x", lease).await.unwrap());
    assert!(!fleet(&b).take_job("register:x", lease).await.unwrap());
    assert!(
        fleet(&b).take_job("register:y", lease).await.unwrap(),
        "other jobs are free"
    );
    assert!(
        fleet(&a).take_job("register:x", lease).await.unwrap(),
        "the holder renews"
    );
    fleet(&b).finish_job("register:x").await.unwrap();
    assert!(
        !fleet(&b).take_job("register:x", lease).await.unwrap(),
        "only the holder finishes"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        fleet(&b).take_job("register:x", lease).await.unwrap(),
        "an expired lease is free"
    );
    fleet(&b).finish_job("register:x").await.unwrap();
    assert!(
        fleet(&a).take_job("register:x", lease).await.unwrap(),
        "a finished job is free"
    );
}

/// Presence: the latest connect wins, a disconnect from another node never hides a live
/// connection, and a node that stopped beating has its devices shown disconnected.
#[tokio::test]
async fn postgres_presence_across_nodes() {
    use lobby::store::Presence;
    let f = Fixture::postgres().await;
    let store = f.open().await;
    let p = |node: &str, connected: bool, at: i64| Presence {
        device_id: device(1),
        node: node.into(),
        thing_name: "dev-1".into(),
        protocol: "mqtt5".into(),
        connected,
        last_seen: at,
        stamp: at,
    };
    let now = |store: Arc<dyn Store>| async move {
        let got = fleet(&store).presence(Some(&device(1))).await.unwrap();
        assert_eq!(got.len(), 1);
        (got[0].node.clone(), got[0].connected)
    };
    fleet(&store)
        .put_presence("n1", &[p("n1", true, 1)])
        .await
        .unwrap();
    assert_eq!(now(store.clone()).await, ("n1".into(), true));
    fleet(&store)
        .put_presence("n2", &[p("n2", false, 2)])
        .await
        .unwrap();
    assert_eq!(
        now(store.clone()).await,
        ("n1".into(), true),
        "n2's disconnect is stale news"
    );
    fleet(&store)
        .put_presence("n2", &[p("n2", true, 3)])
        .await
        .unwrap();
    fleet(&store)
        .put_presence("n1", &[p("n1", false, 4)])
        .await
        .unwrap();
    assert_eq!(
        now(store.clone()).await,
        ("n2".into(), true),
        "the device moved to n2"
    );
    // n1's connect stamped before n2's, written late: n2's (newer) connection is the one kept.
    fleet(&store)
        .put_presence("n1", &[p("n1", true, 2)])
        .await
        .unwrap();
    assert_eq!(
        now(store.clone()).await,
        ("n2".into(), true),
        "an older connect is stale news"
    );
    assert_eq!(fleet(&store).presence(None).await.unwrap().len(), 1);
    let Place::Postgres(db) = &f.place else {
        unreachable!()
    };
    db.client()
        .await
        .execute(
            "UPDATE lobby_nodes SET heartbeat = now() - interval '1 minute' WHERE name = 'n2'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(now(store.clone()).await, ("n2".into(), false), "n2 is gone");
}

/// The embedded store has no fleet: no change log, leases, pacing or presence to share.
#[tokio::test]
async fn sqlite_has_no_fleet() {
    let f = Fixture::sqlite().await;
    let store = f.open().await;
    store.put_claim(&full_claim(1, "acme"), None).await.unwrap();
    assert!(store.fleet().is_none());
}

async fn tenants_insert_conflict_update_delete(store: &dyn Store) {
    store.ping().await.unwrap();
    assert!(store.tenants().await.unwrap().is_empty());
    let (a, b) = (
        tenant("acme", &"a".repeat(64)),
        tenant("bolt", &"b".repeat(64)),
    );
    store.insert_tenant(&b).await.unwrap();
    store.insert_tenant(&a).await.unwrap();
    assert_eq!(
        summary(&store.tenants().await.unwrap()),
        summary(&[a.clone(), b.clone()]),
        "listed by id, every field kept"
    );

    let same_id = tenant("acme", &"c".repeat(64));
    assert!(matches!(
        store.insert_tenant(&same_id).await,
        Err(StoreError::Conflict)
    ));
    let same_token = tenant("cobalt", &b.token_hash);
    assert!(matches!(
        store.insert_tenant(&same_token).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.tenants().await.unwrap().len(), 2);

    let mut changed = a.tenant.clone();
    changed.name = "Acme GmbH — Zürich \"HQ\"".into();
    changed.max_devices = Some(10);
    changed.backend = Backend::AwsIot(registration(1, "acme", false, false).backend);
    let to = changed.clone();
    let updated = store.update_tenant("acme", &move |_| Ok(to.clone())).await;
    assert!(matches!(updated, Ok(TenantUpdated::Updated(t)) if *t == changed));
    let refused = store
        .update_tenant("acme", &|_| Err("no thanks".into()))
        .await
        .unwrap();
    assert!(matches!(refused, TenantUpdated::Refused(why) if why == "no thanks"));
    let missing = store.update_tenant("nobody", &|t| Ok(t)).await.unwrap();
    assert!(matches!(missing, TenantUpdated::NotFound));
    let listed = store.tenants().await.unwrap();
    assert_eq!(listed[0].tenant, changed);
    assert_eq!(listed[0].token_hash, a.token_hash, "update keeps the token");

    store.put_claim(&full_claim(1, "acme"), None).await.unwrap();
    assert_eq!(
        store.delete_tenant("acme").await.unwrap(),
        TenantDeleted::HasClaims,
        "a claim keeps its tenant"
    );
    store.delete_claim(&device(1)).await.unwrap();
    assert_eq!(
        store.delete_tenant("acme").await.unwrap(),
        TenantDeleted::Deleted
    );
    assert_eq!(
        store.delete_tenant("nobody").await.unwrap(),
        TenantDeleted::NotFound
    );
    assert_eq!(summary(&store.tenants().await.unwrap()), summary(&[b]));
}

async fn claims_put_replace_delete_round_trip(store: &dyn Store) {
    assert!(store.claims().await.unwrap().is_empty());
    let (full, bare) = (full_claim(1, "acme"), bare_claim(2));
    store.put_claim(&full, None).await.unwrap();
    store.put_claim(&bare, None).await.unwrap();
    assert_eq!(sorted_claims(store).await, vec![full.clone(), bare.clone()]);

    let replaced = Claim {
        tenant: Some("bolt".into()),
        state: ClaimState::Failed,
        thing_name: None,
        redirected_at: None,
        claimed_at: Some(0),
        error: Some("InvalidRequestException: «policy» \"devices\" not found\nline 2".into()),
        attempts: u32::MAX,
        next_attempt_at: Some(1_700_000_001_000),
        ..full.clone()
    };
    store.put_claim(&replaced, None).await.unwrap();
    assert_eq!(
        sorted_claims(store).await,
        vec![replaced.clone(), bare.clone()]
    );

    store.delete_claim(&bare.device_id).await.unwrap();
    store.delete_claim(&device(99)).await.unwrap();
    assert_eq!(sorted_claims(store).await, vec![replaced]);
}

async fn cert_pem_is_kept_replaced_and_set(store: &dyn Store) {
    let claim = full_claim(3, "acme");
    let id = claim.device_id;
    store.put_claim(&claim, Some("PEM-1")).await.unwrap();
    assert_eq!(store.cert_pem(&id).await.unwrap().as_deref(), Some("PEM-1"));
    let moved = Claim {
        tenant: Some("bolt".into()),
        ..claim.clone()
    };
    store.put_claim(&moved, None).await.unwrap();
    assert_eq!(
        store.cert_pem(&id).await.unwrap().as_deref(),
        Some("PEM-1"),
        "put_claim without a certificate keeps the stored one"
    );
    assert_eq!(sorted_claims(store).await, vec![moved.clone()]);
    store.put_claim(&moved, Some("PEM-2")).await.unwrap();
    assert_eq!(store.cert_pem(&id).await.unwrap().as_deref(), Some("PEM-2"));
    store.set_cert_pem(&id, "PEM-3").await.unwrap();
    assert_eq!(store.cert_pem(&id).await.unwrap().as_deref(), Some("PEM-3"));
    assert_eq!(
        sorted_claims(store).await,
        vec![moved],
        "the claim is untouched"
    );

    let without = bare_claim(4);
    store.put_claim(&without, None).await.unwrap();
    assert_eq!(store.cert_pem(&without.device_id).await.unwrap(), None);
    assert_eq!(store.cert_pem(&device(98)).await.unwrap(), None);
    store.set_cert_pem(&device(98), "PEM-X").await.unwrap();
    assert_eq!(
        store.claims().await.unwrap().len(),
        2,
        "set_cert_pem makes no claim"
    );

    store.delete_claim(&id).await.unwrap();
    assert_eq!(store.cert_pem(&id).await.unwrap(), None);
}

/// The start-up sweep's query: registrations not yet marked for removal of devices that
/// have no claim at all.
async fn orphaned_registrations_are_those_without_a_claim(store: &dyn Store) {
    store.put_claim(&full_claim(7, "acme"), None).await.unwrap();
    for r in [
        registration(7, "acme", true, false),
        registration(7, "bolt", true, false),
        registration(8, "acme", true, false),
        registration(9, "acme", true, true),
    ] {
        store.put_registration(&r).await.unwrap();
    }
    let orphans: Vec<(DeviceId, String)> = store
        .orphaned_registrations()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.device_id, r.tenant))
        .collect();
    assert_eq!(orphans, vec![(device(8), "acme".to_owned())]);
}

async fn registrations_put_replace_removing_delete(store: &dyn Store) {
    assert!(store.registrations(&device(5)).await.unwrap().is_empty());
    assert!(store.removing_registrations().await.unwrap().is_empty());
    let first = registration(5, "acme", false, false);
    let old = registration(5, "bolt", true, true);
    let other = registration(6, "acme", true, false);
    for r in [&first, &old, &other] {
        store.put_registration(r).await.unwrap();
    }
    assert_eq!(
        sorted_registrations(store, 5).await,
        vec![first.clone(), old.clone()]
    );
    assert_eq!(removing(store).await, vec![(device(5), "bolt".into())]);

    let first = Registration {
        cert: registration(5, "acme", true, false).cert,
        removing: true,
        ..first
    };
    store.put_registration(&first).await.unwrap();
    assert_eq!(
        sorted_registrations(store, 5).await,
        vec![first.clone(), old.clone()]
    );
    assert_eq!(
        removing(store).await,
        vec![(device(5), "acme".into()), (device(5), "bolt".into())]
    );

    store.delete_registration(&device(5), "bolt").await.unwrap();
    store
        .delete_registration(&device(5), "nobody")
        .await
        .unwrap();
    assert_eq!(sorted_registrations(store, 5).await, vec![first]);
    assert_eq!(removing(store).await, vec![(device(5), "acme".into())]);
    assert_eq!(sorted_registrations(store, 6).await, vec![other]);
}

async fn data_survives_reopen(f: &Fixture) {
    let t = tenant("acme", &"a".repeat(64));
    let (claim, revoked) = (full_claim(7, "acme"), bare_claim(8));
    let reg = registration(7, "acme", true, true);
    {
        let store = f.open().await;
        store.insert_tenant(&t).await.unwrap();
        store.put_claim(&claim, Some("PEM")).await.unwrap();
        store.put_claim(&revoked, None).await.unwrap();
        store.put_registration(&reg).await.unwrap();
        // A second store on the same data (another node, or the next start) sees every write.
        let second = f.open().await;
        assert_eq!(
            sorted_claims(&*second).await,
            vec![claim.clone(), revoked.clone()]
        );
    }
    let store = f.open().await;
    assert_eq!(summary(&store.tenants().await.unwrap()), summary(&[t]));
    assert_eq!(sorted_claims(&*store).await, vec![claim.clone(), revoked]);
    assert_eq!(
        store.cert_pem(&claim.device_id).await.unwrap().as_deref(),
        Some("PEM")
    );
    assert_eq!(store.registrations(&device(7)).await.unwrap(), vec![reg]);
    assert_eq!(removing(&*store).await, vec![(device(7), "acme".into())]);
}

async fn reopen_applies_nothing_twice(f: &Fixture) {
    let store = f.open().await;
    store.put_claim(&full_claim(9, "acme"), None).await.unwrap();
    let schema = f.schema().await;
    assert!(!schema.is_empty());
    if !matches!(f.place, Place::Sqlite(_)) {
        let versions: Vec<String> = schema
            .iter()
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (1..=store::postgres::SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect();
        assert_eq!(versions, expected, "every migration recorded once");
    }
    drop(store);
    for _ in 0..2 {
        let store = f.open().await;
        assert_eq!(f.schema().await, schema, "a reopen changed the schema");
        assert_eq!(sorted_claims(&*store).await, vec![full_claim(9, "acme")]);
    }
}

#[tokio::test]
async fn postgres_nodes_starting_at_once_migrate_once() {
    let f = Fixture::postgres().await;
    let (a, b, c, d) = tokio::join!(f.open(), f.open(), f.open(), f.open());
    a.put_claim(&full_claim(1, "acme"), None).await.unwrap();
    for other in [&b, &c, &d] {
        assert_eq!(other.claims().await.unwrap().len(), 1);
    }
    let versions = f.schema().await.len();
    assert_eq!(versions, store::postgres::SCHEMA_VERSION as usize);
}

#[tokio::test]
async fn postgres_unreachable_server_is_a_clear_error() {
    let err = store::open("postgres://postgres@127.0.0.1:1/lobby?connect_timeout=2")
        .await
        .err()
        .expect("nothing listens on port 1")
        .to_string();
    assert!(err.contains("postgres connection"), "{err}");
    let err = store::open("postgres://postgres@127.0.0.1/lobby?sslmode=verify-full")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs sslrootcert"), "{err}");
}

#[tokio::test]
async fn postgres_lobby_keeps_a_claim_across_restart() {
    let db = pg::TestDb::create().await;
    let url = db.url.clone();
    let mut lobby = common::TestLobby::start_with(|c| c.store.url = url).await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device("device-0001");
    let (status, body) = lobby.claim(&token, &dev).await;
    assert_eq!(status, 201, "{body}");

    lobby.restart().await;
    let running = lobby.lobby.as_ref().unwrap();
    let claim = running
        .service()
        .cache()
        .claim(&dev.id)
        .expect("the claim is in the second lobby's map");
    assert_eq!(claim.tenant.as_deref(), Some("acme"));
    assert_eq!(claim.state, ClaimState::Ready);
    let body = lobby.admin_device(&dev).await;
    assert_eq!(body["tenant"], "acme", "{body}");
    assert_eq!(body["state"], "ready", "{body}");
    let (status, body) = lobby.device_json(&token, &dev).await;
    assert_eq!(
        status, 200,
        "the tenant's token survives the restart too: {body}"
    );

    if let Some(l) = lobby.lobby.take() {
        l.stop().await;
    }
    drop(db);
}
