//! The control plane under cancelled requests and stuck locks (issue 13): two lobby nodes on
//! one PostgreSQL database, and a third session in the database that holds locks as another
//! client (a psql session, a stuck migration) would.
mod common;
#[path = "common/pg.rs"]
mod pg;

use std::time::Duration;

use common::fleet::two_nodes;
use common::*;
use serde_json::json;

/// The fleet-wide advisory lock a lobby before issue 13 took for every write (held here too,
/// so this test shows what such a lock did; today nothing takes it).
const OLD_FLEET_LOCK: i64 = 0x6c6f_6262_7977_7274;

/// Waits until every node's map holds what the store holds for `dev`; the tenant it is
/// claimed by ("" for none).
async fn maps_agree(nodes: &[&TestLobby], url: &str, dev: &Device) -> String {
    let store = lobby::store::open(url).await.unwrap();
    eventually(|| async {
        let stored = store.claim(&dev.id).await.unwrap();
        let agree = nodes.iter().all(|n| {
            n.running()
                .service()
                .cache()
                .agrees(&dev.id, stored.as_ref())
        });
        agree.then(|| {
            stored
                .and_then(|c| c.tenant.map(|t| t.to_string()))
                .unwrap_or_default()
        })
    })
    .await
}

/// A client gives up while another session holds the locks its claim waits for; once the
/// holder lets go, writes through the other node go on (no lock outlived its holder), and the
/// abandoned claim completed on every node, store and map alike.
#[tokio::test]
async fn a_client_that_gives_up_behind_a_held_lock_leaves_nothing_locked_or_half_done() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let acme = a.tenant("acme", "iot.acme.example").await;
    let (given_up, after) = (a.device("given-up"), a.device("after"));
    eventually(|| async { b.running().service().cache().tenant("acme").map(drop) }).await;

    let holder = db.client().await;
    holder
        .batch_execute(&format!(
            "SELECT pg_advisory_lock({OLD_FLEET_LOCK}); BEGIN; \
             SELECT 1 FROM tenants WHERE id = 'acme' FOR UPDATE"
        ))
        .await
        .unwrap();
    let gave_up = a
        .http
        .post(a.url("/v1/claims"))
        .bearer_auth(&acme)
        .json(&json!({"code": given_up.code}))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_timeout()),
        "the claim waits behind the held lock: {gave_up:?}"
    );
    holder
        .batch_execute("COMMIT; SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();

    let through_b = tokio::time::timeout(WAIT, b.claim(&acme, &after))
        .await
        .expect("a claim through B hangs: a lock outlived the request that took it");
    assert_eq!(through_b.0, 201, "{:?}", through_b.1);
    let through_a = tokio::time::timeout(WAIT, a.revoke(&after)).await;
    assert!(through_a.is_ok(), "a revoke through A hangs");

    // The abandoned claim ran to completion: claimed by acme in the store and on both maps.
    assert_eq!(maps_agree(&[&a, &b], &db.url, &given_up).await, "acme");
}

/// A write behind a lock held longer than `lock_timeout` is 503 `unavailable`, with a message
/// that says to retry; once the lock is gone the same request succeeds.
#[tokio::test]
async fn a_write_behind_a_lock_held_too_long_is_503_unavailable() {
    let db = pg::TestDb::create().await;
    let url = format!("{}?options=-c%20lock_timeout%3D500", db.url);
    let a = TestLobby::start_with(|c| c.store.url = url.clone()).await;
    let acme = a.tenant("acme", "iot.acme.example").await;
    let dev = a.device("patient");
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM tenants WHERE id = 'acme' FOR UPDATE")
        .await
        .unwrap();
    let got = a.claim(&acme, &dev).await;
    assert_error(&got, 503, "unavailable");
    assert!(
        got.1["message"].as_str().unwrap().contains("retry"),
        "{:?}",
        got.1
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(a.claim(&acme, &dev).await.0, 201);
    assert_eq!(maps_agree(&[&a], &url, &dev).await, "acme");
}

/// A TCP relay to PostgreSQL that can be cut: every relayed connection closes and new ones
/// are refused, as when the database host goes away.
struct Relay {
    port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = tokio_util::sync::CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    () = stop.cancelled() => return, // drops the listener: refused from now on
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Self { port, cut }
    }
}

/// A store that is down is 503 `unavailable` at once (not a 500, not a hang).
#[tokio::test]
async fn a_store_that_is_down_answers_503_unavailable_at_once() {
    let db = pg::TestDb::create().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db
        .url
        .replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port), 1);
    assert_ne!(
        url, db.url,
        "the test database is reached through the relay"
    );
    let a = TestLobby::start_with(|c| c.store.url = url.clone()).await;
    let acme = a.tenant("acme", "iot.acme.example").await;
    relay.cut.cancel();
    let dev = a.device("stranded");
    let got = tokio::time::timeout(WAIT, a.claim(&acme, &dev))
        .await
        .expect("a claim with the store down hangs");
    assert_error(&got, 503, "unavailable");
    // An anonymous health check learns that the store is down, not where it is or why.
    let ready = a.http.get(a.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let text = ready.text().await.unwrap();
    assert!(text.contains("store unreachable"), "{text}");
    for secret in ["127.0.0.1", &relay.port.to_string(), "postgres", &db.name] {
        assert!(!text.contains(secret), "/readyz tells {secret:?}: {text}");
    }
}

/// A node that starts shutting down answers `/readyz` 503 at once, while it still serves the
/// API and drains its tasks, so a load balancer sends devices elsewhere first.
#[tokio::test]
async fn readyz_is_503_as_soon_as_a_shutdown_starts() {
    let mut a = TestLobby::start_with(|c| {
        c.limits.handshake_timeout = Duration::from_secs(3);
        c.shutdown.grace = Duration::from_secs(5);
    })
    .await;
    let ready = a.http.get(a.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    // A device stuck before its TLS handshake keeps the shutdown draining for a while.
    let _stuck = tokio::net::TcpStream::connect(a.mqtt_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (url, http) = (a.url("/readyz"), a.http.clone());
    let stopping = tokio::spawn(a.lobby.take().unwrap().stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopping.is_finished(),
        "the shutdown drains the stuck handshake"
    );
    let got = http.get(&url).send().await.expect("the API still answers");
    assert_eq!(got.status().as_u16(), 503);
    let text = got.text().await.unwrap();
    assert!(text.contains("shutting down"), "{text}");
    stopping.await.unwrap();
}

/// A tenant this node has not heard of yet (written by another node whose change it has not
/// applied; here written under the lobby, with no change-log entry) is still deleted, and
/// the answer says so: the store decides, not the map.
#[tokio::test]
async fn a_tenant_the_node_has_not_applied_yet_is_deleted_and_answered_204() {
    let db = pg::TestDb::create().await;
    let a = TestLobby::start_with(|c| c.store.url = db.url.clone()).await;
    db.client()
        .await
        .execute(
            "INSERT INTO tenants (id, body, token_hash) VALUES ('ghost', $1, $2)",
            &[
                &json!({"id": "ghost", "name": "ghost", "endpoint": "iot.ghost.example",
                    "port": 8883, "region": "eu-west-1"})
                .to_string(),
                &"0".repeat(64),
            ],
        )
        .await
        .unwrap();
    let (st, body) = a.call("DELETE", "/v1/tenants/ghost", &a.admin, None).await;
    assert_eq!(st, 204, "{body}");
    let left: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM tenants WHERE id = 'ghost'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let (st, _) = a.call("DELETE", "/v1/tenants/ghost", &a.admin, None).await;
    assert_eq!(st, 404, "deleted once");
}

/// The rows of `lobby_presence` the database has read so far. A server process reports its
/// statistics when it exits, so the lobby's sessions are ended first (its pool opens new
/// ones when it needs them) and the count is read once they are gone.
async fn presence_rows_read(db: &pg::TestDb) -> i64 {
    let client = db.client().await;
    let ended: Vec<i32> = client
        .query(
            "WITH lobby AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) \
             SELECT pid FROM lobby WHERE pg_terminate_backend(pid)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    eventually(|| async {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&ended],
            )
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    client
        .query_one(
            "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) \
             FROM pg_stat_user_tables WHERE relname = 'lobby_presence'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// In a fleet, one page of `GET /v1/devices` reads about a page of what the nodes reported,
/// not the whole presence table; paging still lists every device once, in order.
#[tokio::test]
async fn a_device_list_page_reads_a_page_of_the_fleets_presence() {
    let db = pg::TestDb::create().await;
    let a = TestLobby::start_with(|c| c.store.url = db.url.clone()).await;
    const REPORTED: usize = 3000;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO lobby_nodes (name, heartbeat) VALUES ('node-x', now()); \
             INSERT INTO lobby_presence (device_id, node, thing_name, protocol, connected, \
             last_seen) SELECT lpad(to_hex(i), 64, '0'), 'node-x', 'thing-' || i, 'mqtt5', \
             true, 0 FROM generate_series(1, {REPORTED}) i"
        ))
        .await
        .unwrap();
    let before = presence_rows_read(&db).await;
    let (st, page) = a.call("GET", "/v1/devices?limit=10", &a.admin, None).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["devices"].as_array().unwrap().len(), 10, "{page}");
    assert_eq!(page["devices"][0]["connected"], true, "{page}");
    let read = presence_rows_read(&db).await - before;
    assert!(
        read < 200,
        "a page of 10 read {read} presence rows of {REPORTED}"
    );

    let mut seen = Vec::new();
    let mut path = "/v1/devices?limit=700".to_owned();
    loop {
        let (st, page) = a.call("GET", &path, &a.admin, None).await;
        assert_eq!(st, 200, "{page}");
        for d in page["devices"].as_array().unwrap() {
            seen.push(d["device_id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/devices?limit=700&after={next}"),
            None => break,
        }
    }
    let want: Vec<String> = (1..=REPORTED).map(|i| format!("{i:064x}")).collect();
    assert_eq!(seen, want);
}

/// How many times this node has read the change log (its store-operation histogram's count).
async fn change_log_reads(lobby: &TestLobby) -> u64 {
    store_operations(lobby, "changes_after").await
}

/// How many store operations `op` the lobby has made.
async fn store_operations(lobby: &TestLobby, op: &str) -> u64 {
    let text = lobby.metrics().await;
    let label = format!("op=\"{op}\"");
    text.lines()
        .find(|l| {
            l.starts_with("lobby_store_operation_duration_seconds_count") && l.contains(&label)
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A session left idle in a transaction (an operator's `psql` after `BEGIN`) holds every
/// node's change-log cursor back, so the entries after it come again on every read. A node
/// must not read each of those claims from the store again each time: one already in its map
/// (at that version or newer) is skipped.
#[tokio::test]
async fn changes_held_back_by_an_idle_transaction_are_not_read_again_each_round() {
    let db = pg::TestDb::create().await;
    let (a, b) = two_nodes(&db.url).await;
    let acme = a.tenant("acme", "iot.acme.example").await;
    eventually(|| async { b.running().service().cache().tenant("acme").map(drop) }).await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    const CLAIMS: u64 = 40;
    let devices: Vec<_> = (0..CLAIMS)
        .map(|i| a.device(&format!("held-{i}")))
        .collect();
    for d in &devices {
        assert_eq!(a.claim(&acme, d).await.0, 201);
    }
    let service = b.running().service();
    eventually(|| async {
        devices
            .iter()
            .all(|d| service.cache().claim(&d.id).is_some())
            .then_some(())
    })
    .await;
    let before = store_operations(&b, "claim").await;
    for _ in 0..5 {
        service.catch_up().await.unwrap();
    }
    let reads = store_operations(&b, "claim").await - before;
    assert!(
        reads < CLAIMS,
        "five rounds behind an idle transaction read {reads} claims again"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}

/// A flood of unknown tokens makes a node read the change log once per round, not once per
/// request (each asks whether the tenant was just made on another node), and claims keep
/// going meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_tokens_shares_its_catch_ups() {
    let db = pg::TestDb::create().await;
    let a = TestLobby::start_with(|c| c.store.url = db.url.clone()).await;
    let acme = a.tenant("acme", "iot.acme.example").await;
    const FLOOD: usize = 400;
    let before = change_log_reads(&a).await;
    let flood = (0..FLOOD).map(|i| {
        let (http, url) = (a.http.clone(), a.url("/v1/devices"));
        tokio::spawn(async move {
            let resp = http
                .get(url)
                .bearer_auth(format!("stranger-{i}"))
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        })
    });
    let flood: Vec<_> = flood.collect();
    let dev = a.device("during");
    assert_eq!(a.claim(&acme, &dev).await.0, 201);
    for f in flood {
        assert_eq!(f.await.unwrap(), 401);
    }
    let reads = change_log_reads(&a).await - before;
    assert!(
        reads < FLOOD as u64 / 4,
        "{FLOOD} unknown tokens read the change log {reads} times"
    );
}

/// An `sqlite3` shell on the lobby's own database file, holding its write lock (an operator's
/// `BEGIN IMMEDIATE`, a long `.backup`) until dropped.
struct SqliteLockHolder(std::process::Child);

impl SqliteLockHolder {
    fn hold(db: &std::path::Path) -> Self {
        use std::io::{BufRead, Write};
        let mut shell = std::process::Command::new("sqlite3")
            .arg(db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sqlite3 (apt-get install sqlite3)");
        let stdin = shell.stdin.as_mut().unwrap();
        writeln!(stdin, "BEGIN IMMEDIATE; SELECT 'locked';").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(shell.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        Self(shell)
    }
}

impl Drop for SqliteLockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Concurrent claims while another process holds the SQLite database's write lock: each is
/// answered 503 `unavailable` after one wait for the lock (not one wait per claim of a commit
/// group, one after the other), nothing of them is in the map, and once the lock is released
/// the same claims succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_behind_a_locked_sqlite_database_are_503_and_leave_nothing_behind() {
    let t = TestLobby::start().await;
    let acme = t.tenant("acme", "iot.acme.example").await;
    let devices: Vec<_> = (0..20).map(|i| t.device(&format!("locked-{i}"))).collect();
    let holder = SqliteLockHolder::hold(&t.dir.path().join("lobby.db"));
    let claims = devices.iter().map(|d| t.claim(&acme, d));
    // The lobby waits 5 s for a lock (busy_timeout); one wait per claim would be 100 s.
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(claims),
    )
    .await
    .expect("claims behind a locked database hang");
    for got in &answers {
        assert_error(got, 503, "unavailable");
    }
    for d in &devices {
        assert!(t.running().service().cache().claim(&d.id).is_none());
    }
    drop(holder);
    for d in &devices {
        assert_eq!(t.claim(&acme, d).await.0, 201);
    }
}
