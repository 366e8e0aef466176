//! The control plane of a two-node fleet on PostgreSQL is exact under concurrency and under
//! cancelled requests. Two nodes share one database; claims, unclaims, migrations and revokes
//! race through both, and an oracle checks what came of them:
//! - every node's in-memory map ends up equal to the store, version and all, for every device;
//! - each device's history is linearizable: some order of its requests, consistent with real
//!   time (a request answered before another was sent comes first), replayed on a model of
//!   the documented semantics, gives every answer the clients got (status, error code and the
//!   body's tenant and state) and ends in what the store holds. A request whose client gave up
//!   may have happened (at any point after it was sent) or not at all.
//!
//! The model (src/claims/service.rs): a claim of a free device is 201, of one already this
//! tenant's 200, of another tenant's 409 `already_claimed`, of a revoked one 409 `conflict`.
//! An unclaim by a tenant that does not hold the device, or of a device without a claim, is
//! 404; of a revoked device it keeps the revocation and drops the tenant. A migration of a
//! device without a claim is 404, of a revoked one 409 `conflict`, to its own tenant 200 with
//! nothing changed. A revoke always succeeds and keeps the tenant.
mod common;
#[path = "common/pg.rs"]
mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fleet::two_nodes;
use common::*;
use lobby::model::{Claim, ClaimState};
use lobby::store::Store;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::{Barrier, Semaphore};

/// The two tenants of every test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Who {
    Acme,
    Globex,
}

impl Who {
    const ALL: [Who; 2] = [Who::Acme, Who::Globex];

    fn name(self) -> &'static str {
        match self {
            Who::Acme => "acme",
            Who::Globex => "globex",
        }
    }

    fn parse(name: &str) -> Who {
        *Self::ALL
            .iter()
            .find(|w| w.name() == name)
            .unwrap_or_else(|| panic!("a tenant no test made: {name:?}"))
    }
}

/// One control-plane request about one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `POST /v1/claims` with the tenant's token.
    Claim(Who),
    /// `DELETE /v1/claims/{id}` with the tenant's token (`None`: the operator's).
    Unclaim(Option<Who>),
    /// `POST /v1/devices/{id}/migrate` to the tenant (operator).
    Migrate(Who),
    /// `POST /v1/devices/{id}/revoke` (operator).
    Revoke,
}

/// What the store holds for a device, as far as the API's semantics go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Model {
    tenant: Option<Who>,
    revoked: bool,
}

impl Model {
    /// No claim at all.
    const FREE: Model = Model {
        tenant: None,
        revoked: false,
    };

    fn owned(by: Who) -> Model {
        Model {
            tenant: Some(by),
            revoked: false,
        }
    }

    fn of(claim: Option<&Claim>) -> Model {
        claim.map_or(Model::FREE, |c| Model {
            tenant: c.tenant_id().map(Who::parse),
            revoked: c.state == ClaimState::Revoked,
        })
    }

    fn has_claim(self) -> bool {
        self.tenant.is_some() || self.revoked
    }

    /// `op` applied to this state: the state after it, and the status and error code (`None`
    /// for a success) it answers.
    fn step(self, op: Op) -> (Model, u16, Option<&'static str>) {
        let refused = |status, code| (self, status, Some(code));
        match op {
            Op::Claim(_) if self.revoked => refused(409, "conflict"),
            Op::Claim(t) if self.tenant == Some(t) => (self, 200, None),
            Op::Claim(_) if self.tenant.is_some() => refused(409, "already_claimed"),
            Op::Claim(t) => (Model::owned(t), 201, None),
            Op::Unclaim(_) if !self.has_claim() => refused(404, "not_found"),
            Op::Unclaim(Some(t)) if self.tenant != Some(t) => refused(404, "not_found"),
            Op::Unclaim(_) if self.revoked => (Model::of_revoked(None), 200, None),
            Op::Unclaim(_) => (Model::FREE, 200, None),
            Op::Migrate(_) if !self.has_claim() => refused(404, "not_found"),
            Op::Migrate(_) if self.revoked => refused(409, "conflict"),
            Op::Migrate(t) => (Model::owned(t), 200, None),
            Op::Revoke => (Model::of_revoked(self.tenant), 200, None),
        }
    }

    fn of_revoked(tenant: Option<Who>) -> Model {
        Model {
            tenant,
            revoked: true,
        }
    }

    /// Whether `answer` is what `op` answers on this state, `after` being the state it leaves.
    fn answers(self, op: Op, answer: &(u16, Value)) -> Option<Model> {
        let (after, status, code) = self.step(op);
        let (got, body) = answer;
        if *got != status {
            return None;
        }
        let body_ok = match (code, op) {
            (Some(code), _) => body["error"] == code,
            // The unclaim's answer reads the map after the write: a revoke just after it may
            // show; its tenant is always null.
            (None, Op::Unclaim(_)) => body["tenant"].is_null(),
            (None, _) => {
                let state = if after.revoked { "revoked" } else { "ready" };
                body["tenant"] == json!(after.tenant.map(Who::name)) && body["state"] == state
            }
        };
        body_ok.then_some(after)
    }
}

/// A lobby node as the requests see it: its API address and an HTTP client.
#[derive(Clone)]
struct Node {
    base: String,
    http: reqwest::Client,
}

/// What every request needs, shared by the tasks that send them.
struct Ctx {
    nodes: [Node; 2],
    admin: String,
    /// The tenants' tokens, by `Who as usize`.
    tokens: [String; 2],
    devices: Vec<Device>,
    /// The test's start: times in failure messages are milliseconds since.
    epoch: Instant,
}

/// One request of a history: what, about which device, through which node, given up after
/// `timeout` (none: waits for the answer).
#[derive(Clone, Copy, Debug)]
struct Call {
    dev: usize,
    op: Op,
    node: usize,
    timeout: Option<Duration>,
}

/// What a request got: its answer (`None`: the client gave up first), and when it was sent and
/// answered.
#[derive(Clone, Debug)]
struct Outcome {
    call: Call,
    start: Instant,
    end: Option<Instant>,
    answer: Option<(u16, Value)>,
}

impl Outcome {
    fn status(&self) -> u16 {
        self.answer.as_ref().expect("an answer").0
    }

    fn error(&self) -> &str {
        self.answer.as_ref().expect("an answer").1["error"]
            .as_str()
            .unwrap_or("")
    }

    fn ok(&self) -> bool {
        self.answer
            .as_ref()
            .is_some_and(|a| (200..300).contains(&a.0))
    }
}

impl Ctx {
    fn token(&self, who: Who) -> &str {
        &self.tokens[who as usize]
    }

    async fn send(&self, call: &Call) -> reqwest::Result<(u16, Value)> {
        let dev = &self.devices[call.dev];
        let hex = dev.hex();
        let (method, path, token, body) = match call.op {
            Op::Claim(t) => (
                Method::POST,
                "/v1/claims".to_owned(),
                self.token(t),
                Some(json!({"code": dev.code})),
            ),
            Op::Unclaim(by) => (
                Method::DELETE,
                format!("/v1/claims/{hex}"),
                by.map_or(self.admin.as_str(), |t| self.token(t)),
                None,
            ),
            Op::Migrate(to) => (
                Method::POST,
                format!("/v1/devices/{hex}/migrate"),
                self.admin.as_str(),
                Some(json!({"tenant": to.name()})),
            ),
            Op::Revoke => (
                Method::POST,
                format!("/v1/devices/{hex}/revoke"),
                self.admin.as_str(),
                None,
            ),
        };
        let node = &self.nodes[call.node];
        let mut req = node
            .http
            .request(method, format!("{}{path}", node.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(t) = call.timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Sends `call` and records what came of it. Only a client with a timeout may give up.
    async fn run(&self, call: Call) -> Outcome {
        let start = Instant::now();
        match self.send(&call).await {
            Ok(answer) => Outcome {
                call,
                start,
                end: Some(Instant::now()),
                answer: Some(answer),
            },
            Err(e) => {
                assert!(
                    call.timeout.is_some() && e.is_timeout(),
                    "{call:?} failed: {e}"
                );
                Outcome {
                    call,
                    start,
                    end: None,
                    answer: None,
                }
            }
        }
    }

    fn ms(&self, t: Instant) -> f64 {
        t.duration_since(self.epoch).as_secs_f64() * 1000.0
    }

    /// One device's history, in the order the requests were sent, for failure messages.
    fn history(&self, ops: &[&Outcome]) -> String {
        let mut ops = ops.to_vec();
        ops.sort_by_key(|o| o.start);
        ops.iter()
            .map(|o| {
                let end = o
                    .end
                    .map_or("gave up".into(), |e| format!("{:.1}", self.ms(e)));
                let answer = o
                    .answer
                    .as_ref()
                    .map_or(String::new(), |(s, b)| format!("{s} {b}"));
                format!(
                    "\n  {:?} via node {} [{:.1} ms .. {end}] -> {answer}",
                    o.call.op,
                    ["A", "B"][o.call.node],
                    self.ms(o.start)
                )
            })
            .collect()
    }
}

/// Two nodes on a fresh database, tenants acme and globex known to both, `devices` devices.
struct Fleet {
    a: TestLobby,
    b: TestLobby,
    store: Arc<dyn Store>,
    ctx: Arc<Ctx>,
    db: pg::TestDb,
}

impl Fleet {
    async fn start(devices: usize) -> Self {
        let db = pg::TestDb::create().await;
        let (a, b) = two_nodes(&db.url).await;
        let tokens = [
            a.tenant("acme", "iot.acme.example").await,
            a.tenant("globex", "iot.globex.example").await,
        ];
        // Migrations through B name the tenants, which B must know first.
        eventually(|| async {
            let cache = b.running().service().cache();
            Who::ALL
                .iter()
                .all(|w| cache.tenant(w.name()).is_some())
                .then_some(())
        })
        .await;
        let node = |l: &TestLobby| Node {
            base: l.url(""),
            http: l.http.clone(),
        };
        let ctx = Arc::new(Ctx {
            nodes: [node(&a), node(&b)],
            admin: a.admin.clone(),
            tokens,
            devices: (0..devices).map(|i| a.device(&format!("d{i}"))).collect(),
            epoch: Instant::now(),
        });
        let store = lobby::store::open(&db.url).await.unwrap();
        Self {
            a,
            b,
            store,
            ctx,
            db,
        }
    }

    fn nodes(&self) -> [&TestLobby; 2] {
        [&self.a, &self.b]
    }

    /// Every device claimed by acme through node A, and both maps holding it.
    async fn all_claimed_by_acme(&self) {
        let calls = (0..self.ctx.devices.len())
            .map(|dev| call(dev, Op::Claim(Who::Acme), 0))
            .collect();
        for o in run_all(&self.ctx, calls, 8).await {
            assert_eq!(o.status(), 201, "{o:?}");
        }
        self.settled().await;
    }

    /// Waits until every node's map equals the store for every device; what the store holds.
    /// Fails naming the devices whose maps never agreed, with what each held.
    async fn settled(&self) -> Vec<Option<Claim>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut stored = Vec::new();
            let mut off = Vec::new();
            for dev in &self.ctx.devices {
                let s = self.store.claim(&dev.id).await.unwrap();
                let caches = self.nodes().map(|n| n.running().service().cache().clone());
                let maps = caches.each_ref().map(|c| c.claim(&dev.id));
                if caches.iter().any(|c| !c.agrees(&dev.id, s.as_ref())) {
                    off.push(format!(
                        "\n{} ({}): store {s:?}\n  map A {:?}\n  map B {:?}",
                        dev.name,
                        dev.hex(),
                        maps[0],
                        maps[1]
                    ));
                }
                stored.push(s);
            }
            if off.is_empty() {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "{} device(s) whose maps never agreed with the store in {WAIT:?}:{}",
                off.len(),
                off.concat()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the change log has not grown for half a second (the work of requests whose
    /// clients gave up has ended); its last entry.
    async fn quiet(&self) -> i64 {
        let client = self.db.client().await;
        let mut last = -1;
        loop {
            let now: i64 = client
                .query_one("SELECT coalesce(max(seq), 0) FROM lobby_changes", &[])
                .await
                .unwrap()
                .get(0);
            if now == last {
                return now;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn call(dev: usize, op: Op, node: usize) -> Call {
    Call {
        dev,
        op,
        node,
        timeout: None,
    }
}

/// Sends `calls` at the same moment (each from its own task, released together), each after
/// its delay.
async fn race(ctx: &Arc<Ctx>, calls: [Call; 2], delays: [Duration; 2]) -> [Outcome; 2] {
    let gate = Arc::new(Barrier::new(calls.len()));
    let [a, b] = [0, 1].map(|i| {
        let (ctx, gate, c, delay) = (ctx.clone(), gate.clone(), calls[i], delays[i]);
        tokio::spawn(async move {
            gate.wait().await;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            ctx.run(c).await
        })
    });
    let (a, b) = tokio::join!(a, b);
    [a.unwrap(), b.unwrap()]
}

/// Races `calls(dev)` for every device, one device after another; the outcomes by device.
/// Every other device's two requests go at the very same moment; the others' go a few
/// milliseconds apart, one way or the other (-6 to +6 ms), so that each interleaving of the
/// two comes up: the second decided on a map that has not heard of the first yet, or on one
/// that has.
async fn race_each(fleet: &Fleet, calls: impl Fn(usize) -> [Call; 2]) -> Vec<[Outcome; 2]> {
    let mut out = Vec::new();
    for dev in 0..fleet.ctx.devices.len() {
        let offset = if dev % 2 == 0 {
            0
        } else {
            (dev / 2 % 13) as i64 - 6
        };
        let ms = |d: i64| Duration::from_millis(d.max(0).unsigned_abs());
        out.push(race(&fleet.ctx, calls(dev), [ms(offset), ms(-offset)]).await);
    }
    out
}

/// Sends `calls` in order, `in_flight` at a time, each from its own task.
async fn run_all(ctx: &Arc<Ctx>, calls: Vec<Call>, in_flight: usize) -> Vec<Outcome> {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    for c in calls {
        let slot = slots.clone().acquire_owned().await.unwrap();
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let o = ctx.run(c).await;
            drop(slot);
            o
        });
    }
    tasks.join_all().await
}

/// Whether `ops` (one device's requests), started from `from`, can be put in an order that
/// keeps real time (a request answered before another was sent goes first), gives every
/// answer that was got, and ends in `to`. A request without an answer may also never have
/// happened. Depth-first over the set of requests left, remembering dead ends.
fn linearizable(ops: &[&Outcome], from: Model, to: Model) -> bool {
    fn go(
        ops: &[&Outcome],
        left: u64,
        m: Model,
        to: Model,
        dead: &mut HashSet<(u64, Model)>,
    ) -> bool {
        let bits = || (0..ops.len()).filter(move |&i| left & (1 << i) != 0);
        if m == to && bits().all(|i| ops[i].answer.is_none()) {
            return true;
        }
        if !dead.insert((left, m)) {
            return false;
        }
        for i in bits() {
            let x = ops[i];
            let after_another = bits().any(|j| ops[j].end.is_some_and(|e| e < x.start));
            if after_another {
                continue;
            }
            let next = match &x.answer {
                Some(answer) => m.answers(x.call.op, answer),
                None => Some(m.step(x.call.op).0),
            };
            if next.is_some_and(|n| go(ops, left & !(1 << i), n, to, dead)) {
                return true;
            }
        }
        false
    }
    assert!(ops.len() < 64, "{} requests for one device", ops.len());
    go(ops, (1u64 << ops.len()) - 1, from, to, &mut HashSet::new())
}

/// Every device's history (in `outcomes`) is linearizable from `from` to what is stored.
fn assert_linearizable(ctx: &Ctx, outcomes: &[Outcome], from: Model, stored: &[Option<Claim>]) {
    for (dev, claim) in stored.iter().enumerate() {
        let ops: Vec<&Outcome> = outcomes.iter().filter(|o| o.call.dev == dev).collect();
        let to = Model::of(claim.as_ref());
        assert!(
            linearizable(&ops, from, to),
            "{} ({}): no order of its requests from {from:?} gives their answers and ends in \
             the stored {claim:?}:{}",
            ctx.devices[dev].name,
            ctx.devices[dev].hex(),
            ctx.history(&ops)
        );
    }
}

/// What holds of any stored claim: revoked, or ready with a tenant (no backend registers).
fn assert_well_formed(ctx: &Ctx, stored: &[Option<Claim>]) {
    for (dev, c) in stored.iter().enumerate() {
        if let Some(c) = c {
            assert!(
                c.state == ClaimState::Revoked
                    || (c.state == ClaimState::Ready && c.tenant.is_some()),
                "{}: {c:?}",
                ctx.devices[dev].name
            );
        }
    }
}

/// No answer was a 5xx.
fn assert_no_5xx(ctx: &Ctx, outcomes: &[Outcome]) {
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.answer.as_ref().is_some_and(|a| a.0 >= 500))
        .collect();
    assert!(failed.is_empty(), "5xx answers:{}", ctx.history(&failed));
}

/// A random mix of requests over both nodes: each device gets 4–9, in bursts of 1–4 sent one
/// after another (so a device's requests are in flight together), the bursts shuffled. Each
/// client gives up after 1–29 ms with probability `give_up`.
fn random_calls(rng: &mut StdRng, devices: usize, give_up: f64) -> Vec<Call> {
    const OPS: [(Op, u32); 8] = [
        (Op::Claim(Who::Acme), 3),
        (Op::Claim(Who::Globex), 3),
        (Op::Unclaim(Some(Who::Acme)), 2),
        (Op::Unclaim(Some(Who::Globex)), 2),
        (Op::Unclaim(None), 1),
        (Op::Migrate(Who::Acme), 2),
        (Op::Migrate(Who::Globex), 2),
        (Op::Revoke, 1),
    ];
    let total: u32 = OPS.iter().map(|(_, w)| w).sum();
    let pick = |rng: &mut StdRng| {
        let mut n = rng.random_range(0..total);
        OPS.iter()
            .find(|(_, w)| {
                let hit = n < *w;
                n = n.saturating_sub(*w);
                hit
            })
            .map(|(op, _)| *op)
            .unwrap()
    };
    let mut bursts = Vec::new();
    for dev in 0..devices {
        let mut left = rng.random_range(4..=9);
        while left > 0 {
            let n = rng.random_range(1..=4).min(left);
            left -= n;
            let burst: Vec<Call> = (0..n)
                .map(|_| Call {
                    dev,
                    op: pick(rng),
                    node: rng.random_range(0..2),
                    timeout: rng
                        .random_bool(give_up)
                        .then(|| Duration::from_millis(rng.random_range(1..30))),
                })
                .collect();
            bursts.push(burst);
        }
    }
    bursts.shuffle(rng);
    bursts.concat()
}

/// The seed of the random tests: `LOBBY_ORACLE_SEED`, else a fixed one (printed either way).
fn seeded() -> StdRng {
    let seed = std::env::var("LOBBY_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x10bb_7e57);
    eprintln!("seed {seed} (set LOBBY_ORACLE_SEED to change it)");
    StdRng::seed_from_u64(seed)
}

/// How many answers had each status, and how many clients gave up.
fn tally(outcomes: &[Outcome]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for o in outcomes {
        let key = o
            .answer
            .as_ref()
            .map_or("gave up".into(), |a| a.0.to_string());
        *counts.entry(key).or_insert(0) += 1;
    }
    format!("{counts:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_of_one_device_through_two_nodes_have_exactly_one_winner() {
    let fleet = Fleet::start(40).await;
    let raced = race_each(&fleet, |dev| {
        [
            call(dev, Op::Claim(Who::Acme), 0),
            call(dev, Op::Claim(Who::Globex), 1),
        ]
    })
    .await;
    let stored = fleet.settled().await;
    let mut wins = [0; 2];
    for (dev, [by_a, by_b]) in raced.iter().enumerate() {
        let (winner, loser) = match (by_a.status(), by_b.status()) {
            (201, 409) => (Who::Acme, by_b),
            (409, 201) => (Who::Globex, by_a),
            other => panic!("d{dev}: one 201 and one 409, got {other:?}: {by_a:?} {by_b:?}"),
        };
        assert_eq!(loser.error(), "already_claimed", "{loser:?}");
        assert_eq!(
            Model::of(stored[dev].as_ref()),
            Model::owned(winner),
            "d{dev}"
        );
        wins[winner as usize] += 1;
    }
    eprintln!("wins (acme through A, globex through B): {wins:?}");
    assert_linearizable(&fleet.ctx, &raced.concat(), Model::FREE, &stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unclaim_by_owner_races_migrate() {
    let fleet = Fleet::start(24).await;
    fleet.all_claimed_by_acme().await;
    let raced = race_each(&fleet, |dev| {
        [
            call(dev, Op::Unclaim(Some(Who::Acme)), 0),
            call(dev, Op::Migrate(Who::Globex), 1),
        ]
    })
    .await;
    let stored = fleet.settled().await;
    let mut unclaims_won = 0;
    for (dev, [unclaim, migrate]) in raced.iter().enumerate() {
        // The loser finds the device gone (migrate) or no longer acme's (unclaim): 404 both.
        let (loser, after) = match (unclaim.ok(), migrate.ok()) {
            (true, false) => (migrate, Model::FREE),
            (false, true) => (unclaim, Model::owned(Who::Globex)),
            _ => panic!("d{dev}: exactly one succeeds: {unclaim:?} {migrate:?}"),
        };
        assert_eq!(
            (loser.status(), loser.error()),
            (404, "not_found"),
            "{loser:?}"
        );
        assert_eq!(Model::of(stored[dev].as_ref()), after, "d{dev}");
        unclaims_won += usize::from(unclaim.ok());
    }
    eprintln!("unclaims won {unclaims_won} of {}", raced.len());
    assert_linearizable(
        &fleet.ctx,
        &raced.concat(),
        Model::owned(Who::Acme),
        &stored,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_races_migrate() {
    let fleet = Fleet::start(24).await;
    fleet.all_claimed_by_acme().await;
    let raced = race_each(&fleet, |dev| {
        [
            call(dev, Op::Revoke, 0),
            call(dev, Op::Migrate(Who::Globex), 1),
        ]
    })
    .await;
    let stored = fleet.settled().await;
    let mut migrated = 0;
    for (dev, [revoke, migrate]) in raced.iter().enumerate() {
        assert_eq!(revoke.status(), 200, "{revoke:?}");
        // A revoke keeps the tenant; a migration of a revoked device is refused.
        let tenant = if migrate.ok() {
            Who::Globex
        } else {
            assert_eq!(
                (migrate.status(), migrate.error()),
                (409, "conflict"),
                "{migrate:?}"
            );
            Who::Acme
        };
        assert_eq!(
            Model::of(stored[dev].as_ref()),
            Model::of_revoked(Some(tenant)),
            "d{dev}"
        );
        let body = &revoke.answer.as_ref().unwrap().1;
        assert_eq!(body["tenant"], tenant.name(), "{revoke:?}");
        migrated += usize::from(migrate.ok());
    }
    eprintln!("migrations before the revoke {migrated} of {}", raced.len());
    assert_linearizable(
        &fleet.ctx,
        &raced.concat(),
        Model::owned(Who::Acme),
        &stored,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_by_other_races_unclaim() {
    let fleet = Fleet::start(24).await;
    fleet.all_claimed_by_acme().await;
    let raced = race_each(&fleet, |dev| {
        [
            call(dev, Op::Unclaim(Some(Who::Acme)), 0),
            call(dev, Op::Claim(Who::Globex), 1),
        ]
    })
    .await;
    let stored = fleet.settled().await;
    let mut claimed = 0;
    for (dev, [unclaim, claim]) in raced.iter().enumerate() {
        assert_eq!(
            unclaim.status(),
            200,
            "the owner's unclaim always goes: {unclaim:?}"
        );
        let after = if claim.status() == 201 {
            Model::owned(Who::Globex)
        } else {
            assert_eq!(
                (claim.status(), claim.error()),
                (409, "already_claimed"),
                "{claim:?}"
            );
            Model::FREE
        };
        assert_eq!(Model::of(stored[dev].as_ref()), after, "d{dev}");
        claimed += usize::from(claim.ok());
    }
    eprintln!("claims after the unclaim {claimed} of {}", raced.len());
    assert_linearizable(
        &fleet.ctx,
        &raced.concat(),
        Model::owned(Who::Acme),
        &stored,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_writers_on_two_nodes_leave_maps_equal_to_the_store() {
    let fleet = Fleet::start(60).await;
    let calls = random_calls(&mut seeded(), fleet.ctx.devices.len(), 0.0);
    let outcomes = run_all(&fleet.ctx, calls, 24).await;
    eprintln!("{} requests: {}", outcomes.len(), tally(&outcomes));
    assert_no_5xx(&fleet.ctx, &outcomes);
    let stored = fleet.settled().await;
    assert_well_formed(&fleet.ctx, &stored);
    for (dev, d) in fleet.ctx.devices.iter().enumerate() {
        let owners: HashSet<_> = fleet
            .nodes()
            .iter()
            .filter_map(|n| n.running().service().cache().claim(&d.id))
            .filter_map(|c| c.tenant.clone())
            .collect();
        assert!(owners.len() <= 1, "{}: owned by {owners:?}", d.name);
        // Revocation is for good: a device revoked once stays so, whatever followed.
        let revoked = outcomes
            .iter()
            .any(|o| o.call.dev == dev && o.call.op == Op::Revoke && o.ok());
        assert_eq!(
            Model::of(stored[dev].as_ref()).revoked,
            revoked,
            "{}",
            d.name
        );
    }
    assert_linearizable(&fleet.ctx, &outcomes, Model::FREE, &stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_killed_mid_request_leave_every_map_equal_to_the_store() {
    let fleet = Fleet::start(48).await;
    // Most clients give up; the answers of those that wait must fit what the others did.
    let calls = random_calls(&mut seeded(), fleet.ctx.devices.len(), 0.75);
    let outcomes = run_all(&fleet.ctx, calls, 24).await;
    eprintln!("{} requests: {}", outcomes.len(), tally(&outcomes));
    assert_no_5xx(&fleet.ctx, &outcomes);
    let quiet = fleet.quiet().await;
    let answered = outcomes.iter().filter(|o| o.answer.is_some()).count();
    eprintln!("{quiet} entries in the change log ({answered} requests answered)");
    let stored = fleet.settled().await;
    assert_well_formed(&fleet.ctx, &stored);
    // What each node answers of each device now is what the store holds.
    for (dev, claim) in fleet.ctx.devices.iter().zip(&stored) {
        for (node, name) in fleet.nodes().into_iter().zip(["A", "B"]) {
            let (status, body) = node.admin_device_json(dev).await;
            let got = (status, body["tenant"].clone(), body["state"].clone());
            let want = match claim {
                Some(c) => (200, json!(c.tenant_id()), json!(c.state.as_str())),
                None => (404, Value::Null, Value::Null),
            };
            assert_eq!(got, want, "{} through {name}: {body}", dev.name);
        }
    }
    assert_eq!(
        fleet.quiet().await,
        quiet,
        "the store changed while it was checked"
    );
    assert_linearizable(&fleet.ctx, &outcomes, Model::FREE, &stored);
}
