//! Registration failure paths with a trait-level fake AWS account (the worker sees only
//! `IotApi`): throttling retried, a permanent error ends in `failed` with the AWS code, and a
//! crash between steps resumes at the next start without duplicating anything; and with two
//! nodes on one PostgreSQL store, a registration runs on one node only, and a node killed
//! mid-registration has it finished by the other.
mod common;
#[path = "common/pg.rs"]
mod pg;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use lobby::model::AwsIotBackend;
use lobby::model::CertRef;
use lobby::provision::{IotApi, IotApiFactory, IotError};
use lobby::server::Lobby;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// What a fake AWS account holds, and every call made to it.
#[derive(Default)]
struct Account {
    calls: Mutex<Vec<String>>,
    /// When each call was made, in order.
    times: Mutex<Vec<std::time::Instant>>,
    certs: Mutex<HashMap<String, CertRef>>,
    things: Mutex<HashSet<String>>,
    principals: Mutex<HashSet<(String, String)>>,
    policies: Mutex<HashSet<(String, String)>>,
    /// Errors to answer, per operation, before answering normally.
    failures: Mutex<HashMap<&'static str, VecDeque<IotError>>>,
    /// When set, this operation never answers (a lobby that dies mid-registration).
    hang_on: Mutex<Option<&'static str>>,
    /// When set, this operation answers only after the delay (a registration in flight).
    slow_on: Mutex<Option<(&'static str, Duration)>>,
    /// Operations in flight, and each registration step that ran during a clean-up step of
    /// the same account or the other way round.
    busy: Mutex<Vec<&'static str>>,
    overlaps: Mutex<Vec<String>>,
}

/// The steps of a clean-up (the rest register).
const REMOVE_STEPS: [&str; 5] = [
    "deactivate_certificate",
    "detach_thing_principal",
    "detach_policy",
    "delete_certificate",
    "delete_thing",
];

impl Account {
    fn fail(&self, op: &'static str, errors: Vec<IotError>) {
        self.failures.lock().insert(op, errors.into());
    }

    fn count(&self, op: &str) -> usize {
        self.calls.lock().iter().filter(|c| *c == op).count()
    }

    async fn call(&self, op: &'static str) -> Result<(), IotError> {
        self.calls.lock().push(op.to_owned());
        self.times.lock().push(std::time::Instant::now());
        {
            let mut busy = self.busy.lock();
            let removing = REMOVE_STEPS.contains(&op);
            if let Some(other) = busy.iter().find(|b| REMOVE_STEPS.contains(b) != removing) {
                self.overlaps.lock().push(format!("{op} during {other}"));
            }
            busy.push(op);
        }
        let result = self.answer(op).await;
        let mut busy = self.busy.lock();
        if let Some(at) = busy.iter().position(|b| *b == op) {
            busy.remove(at);
        }
        result
    }

    /// Checks that the calls kept to `rate` a second with a burst of `rate`: between any two
    /// calls `t` seconds apart there were at most `rate · t + rate` calls (one of slack for the
    /// timer); the worst pair otherwise.
    fn paced_at(&self, rate: f64) -> Result<(), String> {
        let times = self.times.lock().clone();
        for (i, a) in times.iter().enumerate() {
            for (j, b) in times.iter().enumerate().skip(i + 1) {
                let span = b.duration_since(*a).as_secs_f64();
                let calls = (j - i + 1) as f64;
                if calls > rate * span + rate + 1.0 {
                    return Err(format!(
                        "{calls} calls in {span:.3} s at {rate}/s ({} calls in all)",
                        times.len()
                    ));
                }
            }
        }
        Ok(())
    }

    async fn answer(&self, op: &'static str) -> Result<(), IotError> {
        if *self.hang_on.lock() == Some(op) {
            Notify::new().notified().await; // never
        }
        let slow = *self.slow_on.lock();
        if let Some((_, delay)) = slow.filter(|(o, _)| *o == op) {
            tokio::time::sleep(delay).await;
        }
        let next = self
            .failures
            .lock()
            .get_mut(op)
            .and_then(VecDeque::pop_front);
        match next {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct FakeIot(Arc<Account>);

#[async_trait]
impl IotApi for FakeIot {
    async fn register_certificate(&self, cert_pem: &str) -> Result<CertRef, IotError> {
        self.0.call("register_certificate").await?;
        let mut certs = self.0.certs.lock();
        if let Some(c) = certs.get(cert_pem) {
            return Err(IotError::AlreadyExists {
                id: Some(c.id.clone()),
                arn: Some(c.arn.clone()),
            });
        }
        let id = format!("cert-{}", certs.len() + 1);
        let c = CertRef {
            arn: format!("arn:aws:iot:eu-west-1:111122223333:cert/{id}"),
            id,
        };
        certs.insert(cert_pem.to_owned(), c.clone());
        Ok(c)
    }
    async fn activate_certificate(&self, _cert_id: &str) -> Result<(), IotError> {
        self.0.call("activate_certificate").await
    }
    async fn create_thing(&self, thing_name: &str) -> Result<(), IotError> {
        self.0.call("create_thing").await?;
        self.0.things.lock().insert(thing_name.to_owned());
        Ok(())
    }
    async fn attach_thing_principal(&self, thing: &str, arn: &str) -> Result<(), IotError> {
        self.0.call("attach_thing_principal").await?;
        self.0.principals.lock().insert((thing.into(), arn.into()));
        Ok(())
    }
    async fn attach_policy(&self, policy: &str, arn: &str) -> Result<(), IotError> {
        self.0.call("attach_policy").await?;
        self.0.policies.lock().insert((policy.into(), arn.into()));
        Ok(())
    }
    async fn describe_endpoint(&self) -> Result<String, IotError> {
        self.0.call("describe_endpoint").await?;
        Ok("fake-ats.iot.eu-west-1.amazonaws.com".into())
    }
    async fn deactivate_certificate(&self, _cert_id: &str) -> Result<(), IotError> {
        self.0.call("deactivate_certificate").await
    }
    async fn detach_thing_principal(&self, thing: &str, arn: &str) -> Result<(), IotError> {
        self.0.call("detach_thing_principal").await?;
        self.0.principals.lock().remove(&(thing.into(), arn.into()));
        Ok(())
    }
    async fn detach_policy(&self, policy: &str, arn: &str) -> Result<(), IotError> {
        self.0.call("detach_policy").await?;
        self.0.policies.lock().remove(&(policy.into(), arn.into()));
        Ok(())
    }
    async fn delete_certificate(&self, cert_id: &str) -> Result<(), IotError> {
        self.0.call("delete_certificate").await?;
        self.0.certs.lock().retain(|_, c| c.id != cert_id);
        Ok(())
    }
    async fn delete_thing(&self, thing: &str) -> Result<(), IotError> {
        self.0.call("delete_thing").await?;
        self.0.things.lock().remove(thing);
        Ok(())
    }
}

struct FakeFactory(Arc<Account>);

#[async_trait]
impl IotApiFactory for FakeFactory {
    async fn client(&self, _t: &str, _b: &AwsIotBackend) -> Result<Arc<dyn IotApi>, IotError> {
        // Counted, and slowed like any call (`slow_on`), but not an AWS IoT step.
        self.0.calls.lock().push("assume_role".into());
        self.0.answer("assume_role").await?;
        Ok(Arc::new(FakeIot(self.0.clone())))
    }
}

/// A test lobby whose AWS backend is `account`.
async fn lobby_with(account: &Arc<Account>) -> TestLobby {
    lobby_tweaked(account, |c| {
        c.aws.retry_base = Duration::from_millis(10);
        c.aws.retry_max = Duration::from_millis(50);
    })
    .await
}

/// A test lobby whose AWS backend is `account`, its config adjusted by `tweak`.
async fn lobby_tweaked(
    account: &Arc<Account>,
    tweak: impl FnOnce(&mut lobby::config::Config),
) -> TestLobby {
    let mut t = TestLobby::start_with(tweak).await;
    restart_with(&mut t, account).await;
    t
}

async fn restart_with(t: &mut TestLobby, account: &Arc<Account>) {
    if let Some(l) = t.lobby.take() {
        l.stop().await;
    }
    let factory = Arc::new(FakeFactory(account.clone()));
    t.lobby = Some(Lobby::start_with(&t.config, factory).await.unwrap());
}

/// An aws-iot tenant (no endpoint: DescribeEndpoint supplies it); returns its token.
async fn aws_tenant(t: &TestLobby) -> String {
    let body = json!({
        "id": "acme", "name": "Acme",
        "backend": {"kind": "aws-iot", "region": "eu-west-1",
            "role_arn": "arn:aws:iam::111122223333:role/lobby", "external_id": "x-1",
            "policy_name": "device-policy", "rate_limit": 100}
    });
    let (st, b) = t.call("POST", "/v1/tenants", &t.admin, Some(body)).await;
    assert_eq!(st, 201, "{b}");
    b["token"].as_str().unwrap().to_owned()
}

async fn claim_with_cert(t: &TestLobby, token: &str, dev: &Device) {
    let body = json!({"code": dev.code, "cert_pem": dev.cert_pem});
    let (st, b) = t.call("POST", "/v1/claims", token, Some(body)).await;
    assert_eq!(st, 201, "{b}");
}

/// What AWS answers a caller past its rate.
fn throttled() -> IotError {
    IotError::Retryable {
        code: "ThrottlingException".into(),
        message: "Rate exceeded".into(),
    }
}

/// An account whose first AttachPolicy is refused with AccessDeniedException and `message`.
fn denied_once(message: &str) -> Arc<Account> {
    let account = Arc::new(Account::default());
    account.fail(
        "attach_policy",
        vec![IotError::Permanent {
            code: "AccessDeniedException".into(),
            message: message.into(),
        }],
    );
    account
}

/// Waits until the account holds no certificate and no thing.
async fn emptied(account: &Account) {
    eventually(|| async {
        let empty = account.certs.lock().is_empty() && account.things.lock().is_empty();
        empty.then_some(())
    })
    .await;
}

/// Waits until the device's state is `state`; returns the device JSON.
async fn wait_state(t: &TestLobby, dev: &Device, state: &str) -> Value {
    eventually(|| async {
        let (_, d) = t
            .call("GET", &format!("/v1/devices/{}", dev.hex()), &t.admin, None)
            .await;
        (d["state"] == state).then_some(d)
    })
    .await
}

#[tokio::test]
async fn throttled_twice_then_registered() {
    let account = Arc::new(Account::default());
    account.fail("create_thing", vec![throttled(), throttled()]);
    let t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-throttled");
    claim_with_cert(&t, &token, &dev).await;
    let d = wait_state(&t, &dev, "ready").await;
    assert_eq!(d["thing_name"], "dev-throttled");
    assert!(d["error"].is_null(), "{d}");
    assert_eq!(account.count("create_thing"), 3);
    // Retries redo the idempotent steps, never the certificate already recorded.
    assert_eq!(account.count("register_certificate"), 1);
    assert_eq!(account.certs.lock().len(), 1);
    // The endpoint was looked up once and stored on the tenant.
    let (_, tenant) = t.call("GET", "/v1/tenants/acme", &t.admin, None).await;
    assert_eq!(tenant["endpoint"], "fake-ats.iot.eu-west-1.amazonaws.com");
}

/// A registration that keeps failing for a retryable reason shows why (the last error), how
/// often it was tried (`attempts`) and when it is tried next (`next_attempt_at`) while it is
/// `registering`, to the tenant; once it succeeds the error and the next time are gone.
#[tokio::test]
async fn a_retrying_registration_shows_its_error_attempts_and_next_attempt() {
    let account = Arc::new(Account::default());
    account.fail("create_thing", vec![throttled(), throttled(), throttled()]);
    let t = lobby_tweaked(&account, |c| {
        c.aws.retry_base = Duration::from_millis(300);
        c.aws.retry_max = Duration::from_millis(300);
    })
    .await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-retrying");
    claim_with_cert(&t, &token, &dev).await;
    let d = eventually(|| async {
        let (_, d) = t.device_json(&token, &dev).await;
        (d["attempts"].as_u64() >= Some(1)).then_some(d)
    })
    .await;
    assert_eq!(d["state"], "registering", "{d}");
    assert_eq!(d["error"], "ThrottlingException: Rate exceeded", "{d}");
    let next = d["next_attempt_at"].as_str().expect("a next attempt time");
    let claimed = d["claimed_at"].as_str().unwrap();
    assert!(next > claimed, "next {next} after the claim at {claimed}");

    let d = wait_state(&t, &dev, "ready").await;
    assert_eq!(d["attempts"], 4, "three throttled, then one through: {d}");
    assert_eq!(d["next_attempt_at"], Value::Null, "{d}");
    assert_eq!(d["error"], Value::Null, "{d}");
}

/// An aws-iot tenant `id` whose role is in account 111122223333, calling at `rate` a second;
/// returns its token.
async fn paced_tenant(t: &TestLobby, id: &str, rate: u32) -> String {
    let body = json!({
        "id": id, "name": id, "endpoint": "x-ats.iot.eu-west-1.amazonaws.com",
        "backend": {"kind": "aws-iot", "region": "eu-west-1",
            "role_arn": format!("arn:aws:iam::111122223333:role/{id}"), "external_id": "x-1",
            "policy_name": "device-policy", "rate_limit": rate}
    });
    let (st, b) = t.call("POST", "/v1/tenants", &t.admin, Some(body)).await;
    assert_eq!(st, 201, "{b}");
    b["token"].as_str().unwrap().to_owned()
}

/// AWS's limits are per account and region, whichever tenant calls: two tenants whose roles
/// are in one account share its rate.
#[tokio::test]
async fn tenants_in_one_account_share_its_call_rate() {
    let account = Arc::new(Account::default());
    let t = lobby_with(&account).await;
    let tokens = [
        paced_tenant(&t, "east", 20).await,
        paced_tenant(&t, "west", 20).await,
    ];
    let devices: Vec<_> = (0..16).map(|i| t.device(&format!("dev-{i}"))).collect();
    for (i, dev) in devices.iter().enumerate() {
        claim_with_cert(&t, &tokens[i % 2], dev).await;
    }
    for dev in &devices {
        wait_state(&t, dev, "ready").await;
    }
    account.paced_at(20.0).unwrap();
}

/// Two nodes on one store share an account's rate too: the bucket is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_of_a_fleet_share_an_accounts_call_rate() {
    let db = pg::TestDb::create().await;
    let account = Arc::new(Account::default());
    let (mut a, mut b) = common::fleet::two_nodes(&db.url).await;
    restart_with(&mut a, &account).await;
    restart_with(&mut b, &account).await;
    let token = paced_tenant(&a, "acme", 20).await;
    eventually(|| async { b.running().service().cache().tenant("acme").map(drop) }).await;
    let devices: Vec<_> = (0..16).map(|i| a.device(&format!("dev-{i}"))).collect();
    for (i, dev) in devices.iter().enumerate() {
        claim_with_cert([&a, &b][i % 2], &token, dev).await;
    }
    for dev in &devices {
        wait_state(&a, dev, "ready").await;
    }
    account.paced_at(20.0).unwrap();
}

/// 1 to 128 characters of `[a-zA-Z0-9:_-]`: what AWS IoT accepts as a thing name.
fn valid_thing_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// Certificate names are attacker input (issue 12): devices whose CN is `+`, `a/b`, NUL,
/// 10 KB, right-to-left text, or the CN of another device of the tenant, become valid and
/// distinct AWS things (with the default name and with a `{cn}` template), each with only its
/// own certificate attached.
#[tokio::test]
async fn hostile_and_duplicate_cns_make_valid_distinct_things() {
    let account = Arc::new(Account::default());
    let t = lobby_with(&account).await;
    let acme = aws_tenant(&t).await;
    let body = json!({
        "id": "beta", "name": "Beta",
        "backend": {"kind": "aws-iot", "region": "eu-west-1",
            "role_arn": "arn:aws:iam::111122223333:role/lobby", "external_id": "x-2",
            "policy_name": "device-policy", "rate_limit": 100, "thing_name": "beta-{cn}"}
    });
    let (st, b) = t.call("POST", "/v1/tenants", &t.admin, Some(body)).await;
    assert_eq!(st, 201, "{b}");
    let beta = b["token"].as_str().unwrap().to_owned();
    let ten_kb = "a".repeat(10 * 1024);
    let cns = [
        "+",
        "a/b",
        "dev\0ice",
        &ten_kb,
        "\u{202e}lave",
        "twin",
        "twin",
    ];
    let mut named = Vec::new();
    for token in [&acme, &beta] {
        let devices: Vec<Device> = cns.iter().map(|cn| t.device(cn)).collect();
        for d in &devices {
            claim_with_cert(&t, token, d).await;
        }
        let mut names = HashSet::new();
        for (cn, d) in cns.iter().zip(&devices) {
            let j = wait_state(&t, d, "ready").await;
            let name = j["thing_name"].as_str().unwrap_or_default().to_owned();
            let shown: String = cn.chars().take(20).collect();
            assert!(valid_thing_name(&name), "{shown:?} named {name:?}");
            assert!(
                names.insert(name.clone()),
                "{shown:?}: {name:?} given twice"
            );
            named.push((name, d.clone()));
        }
    }
    // Each thing exists and holds exactly one certificate: its own device's.
    let things = account.things.lock().clone();
    let principals = account.principals.lock().clone();
    for (name, _) in &named {
        assert!(things.contains(name), "{name} was not created");
        let certs = principals.iter().filter(|(thing, _)| thing == name).count();
        assert_eq!(certs, 1, "{name} holds {certs} certificates");
    }
    assert!(
        things.contains("twin") && things.contains("beta-twin"),
        "{things:?}"
    );
}

#[tokio::test]
async fn access_denied_ends_in_failed_with_the_aws_code() {
    let account = denied_once("not allowed to iot:AttachPolicy");
    let t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-denied");
    claim_with_cert(&t, &token, &dev).await;
    let d = wait_state(&t, &dev, "failed").await;
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("AccessDeniedException"),
        "{d}"
    );
    assert_eq!(
        account.count("attach_policy"),
        1,
        "permanent errors are not retried"
    );
    // The device hears it on its status topic too.
    let mut c = RawClient::connect(&t, &dev, lobby::mqtt::codec::Protocol::V311).await;
    c.send_connect("d").await;
    let _ = c.expect().await;
    c.subscribe(1, &dev.topic("status")).await;
    let lobby::mqtt::codec::Packet::Publish(p) = c.expect().await else {
        panic!("expected the status publish")
    };
    let status: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(status["state"], "failed");
}

/// Retryable errors are retried for `aws.retry_give_up`, then the device is `failed` with the
/// last error (and can be retried on request).
#[tokio::test]
async fn retryable_errors_past_retry_give_up_end_in_failed() {
    let account = Arc::new(Account::default());
    account.fail("create_thing", (0..1000).map(|_| throttled()).collect());
    let t = lobby_tweaked(&account, |c| {
        c.aws.retry_base = Duration::from_millis(10);
        c.aws.retry_max = Duration::from_millis(20);
        c.aws.retry_give_up = Duration::from_millis(400);
    })
    .await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-throttled");
    claim_with_cert(&t, &token, &dev).await;
    let d = wait_state(&t, &dev, "failed").await;
    let error = d["error"].as_str().unwrap();
    assert!(
        error.starts_with("ThrottlingException: Rate exceeded (still failing after 400ms"),
        "{error}"
    );
    assert!(account.count("create_thing") > 3, "it was retried first");
    assert!(d["attempts"].as_u64() > Some(3), "{d}");
    assert_eq!(d["next_attempt_at"], Value::Null, "{d}");
}

/// An AWS error shown to the tenant keeps AWS's code and message and the tenant's own ARNs,
/// never the lobby's principal (AccessDenied names the caller).
#[tokio::test]
async fn a_tenant_reads_the_aws_error_without_the_lobbys_principal() {
    let account = denied_once(
        "User: arn:aws:sts::999988887777:assumed-role/lobby-prod/i-0abc is not authorized to \
         perform: iot:AttachPolicy on resource: \
         arn:aws:iot:eu-west-1:111122223333:policy/device-policy",
    );
    let t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-denied");
    claim_with_cert(&t, &token, &dev).await;
    wait_state(&t, &dev, "failed").await;
    let (_, d) = t.device_json(&token, &dev).await;
    let error = d["error"].as_str().unwrap();
    assert!(
        error.starts_with("AccessDeniedException: User: ")
            && error.contains("arn:aws:iot:eu-west-1:111122223333:policy/device-policy"),
        "{error}"
    );
    for secret in ["999988887777", "lobby-prod", "i-0abc"] {
        assert!(
            !error.contains(secret),
            "the tenant reads {secret:?}: {error}"
        );
    }
}

/// A `failed` registration has a way back: `POST /v1/devices/{id}/retry` queues it again
/// (the owner or the operator; 202 registering), and it goes on to `ready` once the account
/// lets it. A device in any other state is 409 `conflict`; another tenant's is 404.
#[tokio::test]
async fn a_failed_registration_is_retried_on_request() {
    let account = denied_once("not allowed to iot:AttachPolicy");
    let t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let other = t.tenant("beta", "iot.beta.example").await;
    let dev = t.device("dev-retried");
    let retry = format!("/v1/devices/{}/retry", dev.hex());
    assert_error(
        &t.call("POST", &retry, &t.admin, None).await,
        404,
        "not_found",
    );
    claim_with_cert(&t, &token, &dev).await;
    wait_state(&t, &dev, "failed").await;

    assert_error(
        &t.call("POST", &retry, &other, None).await,
        404,
        "not_found",
    );
    let (st, body) = t.call("POST", &retry, &token, None).await;
    assert_eq!(
        (st, body),
        (
            202,
            json!({"device_id": dev.hex(), "tenant": "acme", "state": "registering"})
        )
    );
    let d = wait_state(&t, &dev, "ready").await;
    assert_eq!(d["error"], Value::Null, "{d}");
    assert_eq!(d["attempts"], 1, "the retry counts afresh: {d}");
    assert_eq!(
        account.count("attach_policy"),
        2,
        "the retry ran the step again"
    );
    assert_error(&t.call("POST", &retry, &token, None).await, 409, "conflict");
    assert_error(
        &t.call("POST", &retry, &t.admin, None).await,
        409,
        "conflict",
    );
}

#[tokio::test]
async fn crash_between_steps_resumes_without_duplicates() {
    let account = Arc::new(Account::default());
    *account.hang_on.lock() = Some("attach_thing_principal");
    let mut t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-crash");
    claim_with_cert(&t, &token, &dev).await;
    eventually(|| async { (account.count("attach_thing_principal") == 1).then_some(()) }).await;
    // The lobby dies mid-registration; the next one resumes from the store.
    *account.hang_on.lock() = None;
    restart_with(&mut t, &account).await;
    wait_state(&t, &dev, "ready").await;
    assert_eq!(account.certs.lock().len(), 1);
    assert_eq!(account.things.lock().len(), 1);
    assert_eq!(account.count("register_certificate"), 1);
    assert_eq!(account.principals.lock().len(), 1);
    assert_eq!(account.policies.lock().len(), 1);
}

#[tokio::test]
async fn a_stop_lets_a_registration_in_flight_finish() {
    let account = Arc::new(Account::default());
    *account.slow_on.lock() = Some(("create_thing", Duration::from_millis(800)));
    let mut t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-draining");
    claim_with_cert(&t, &token, &dev).await;
    eventually(|| async { (account.count("create_thing") == 1).then_some(()) }).await;
    // Stop while CreateThing is in flight (the test lobby's grace is 2 s).
    t.lobby.take().unwrap().stop().await;
    *account.slow_on.lock() = None;
    // The registration finished before the lobby stopped: the next one finds it ready and
    // calls AWS for nothing.
    restart_with(&mut t, &account).await;
    assert_eq!(t.admin_device_json(&dev).await.1["state"], "ready");
    for op in ["register_certificate", "create_thing", "attach_policy"] {
        assert_eq!(account.count(op), 1, "{op}");
    }
}

/// A registration whose claim is gone without its clean-up being queued (a lobby from before
/// the unclaim marked it in the same transaction, or a claim deleted under the lobby) is
/// found by the start-up sweep and removed from the account.
#[tokio::test]
async fn the_start_up_sweep_retires_registrations_whose_claim_is_gone() {
    let account = Arc::new(Account::default());
    let mut t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-orphan");
    claim_with_cert(&t, &token, &dev).await;
    wait_state(&t, &dev, "ready").await;
    t.lobby.take().unwrap().stop().await;
    let store = lobby::store::open(&t.config.store.url).await.unwrap();
    store.delete_claim(&dev.id).await.unwrap();
    drop(store);
    assert_eq!(account.things.lock().len(), 1);

    restart_with(&mut t, &account).await;
    emptied(&account).await;
    assert_eq!(account.count("delete_thing"), 1);
}

/// A revoked device stays revoked when its tenant unclaims it, but it leaves that tenant: what
/// the lobby registered in the tenant's account is removed like any unclaim's. A registration
/// such a device left behind before (a store from an older lobby) goes at the next start.
#[tokio::test]
async fn unclaiming_a_revoked_device_removes_its_registration() {
    let account = Arc::new(Account::default());
    let mut t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-revoked");
    claim_with_cert(&t, &token, &dev).await;
    wait_state(&t, &dev, "ready").await;
    t.revoke(&dev).await;
    let (st, b) = t
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(st, 200, "{b}");
    emptied(&account).await;
    assert_eq!(t.admin_device(&dev).await["state"], "revoked");

    // The same leak left by an older lobby: a revoked claim with no tenant beside a live
    // registration.
    let other = t.device("dev-revoked-before");
    claim_with_cert(&t, &token, &other).await;
    wait_state(&t, &other, "ready").await;
    t.lobby.take().unwrap().stop().await;
    let store = lobby::store::open(&t.config.store.url).await.unwrap();
    store
        .put_claim(&lobby::model::Claim::revoked(other.id), None)
        .await
        .unwrap();
    drop(store);
    assert_eq!(account.things.lock().len(), 1);
    restart_with(&mut t, &account).await;
    emptied(&account).await;
}

#[tokio::test]
async fn unclaim_removes_the_registration() {
    let account = Arc::new(Account::default());
    let t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-gone");
    claim_with_cert(&t, &token, &dev).await;
    wait_state(&t, &dev, "ready").await;
    let (st, b) = t
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(st, 200, "{b}");
    emptied(&account).await;
    for op in [
        "deactivate_certificate",
        "detach_thing_principal",
        "detach_policy",
        "delete_certificate",
        "delete_thing",
    ] {
        assert_eq!(account.count(op), 1, "{op}");
    }
    assert!(account.principals.lock().is_empty());
    assert!(account.policies.lock().is_empty());
}

/// Unclaimed after the registration reserved its thing name but before it stored anything:
/// the unclaim's write finds no registration to retire, the registration then creates the
/// certificate and thing, and finds the claim gone; provisioning retires what it made.
#[tokio::test]
async fn what_a_registration_makes_after_an_unclaim_is_removed() {
    let account = Arc::new(Account::default());
    *account.slow_on.lock() = Some(("assume_role", Duration::from_millis(1500)));
    let t = lobby_with(&account).await;
    let token = aws_tenant(&t).await;
    let dev = t.device("dev-late");
    claim_with_cert(&t, &token, &dev).await;
    // Past the name's reservation: taking the tenant's role.
    eventually(|| async { (account.count("assume_role") == 1).then_some(()) }).await;
    let (st, b) = t
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(account.count("register_certificate"), 0, "unclaimed before");
    eventually(|| async { (account.count("create_thing") == 1).then_some(()) }).await;
    emptied(&account).await;
    assert_eq!(account.count("delete_thing"), 1);
}

/// A lobby node on its own runtime and thread, for a test to kill without any shutdown:
/// `kill` drops every task of it at once (its store connections close, its leases stay).
struct DoomedNode {
    api: std::net::SocketAddr,
    kill: std::sync::mpsc::Sender<()>,
}

fn doomed_node(config: lobby::config::Config, account: Arc<Account>) -> DoomedNode {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (kill, kill_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let factory = Arc::new(FakeFactory(account));
        let lobby = rt.block_on(Lobby::start_with(&config, factory)).unwrap();
        addr_tx.send(lobby.api_addr()).unwrap();
        let _ = kill_rx.recv();
        // No `stop`: a crash does not say goodbye.
        std::mem::forget(lobby);
        rt.shutdown_background();
    });
    DoomedNode {
        api: addr_rx.recv().unwrap(),
        kill,
    }
}

/// A device unclaimed through node B while node A is registering it: the clean-up waits for
/// the registration (the lease is the device's, not the job kind's), so the two never run at
/// once, and nothing is left in the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_and_remove_of_one_device_never_overlap_across_nodes() {
    let db = pg::TestDb::create().await;
    let account = Arc::new(Account::default());
    *account.slow_on.lock() = Some(("create_thing", Duration::from_millis(1500)));
    let (mut a, mut b) = common::fleet::two_nodes(&db.url).await;
    restart_with(&mut a, &account).await;
    restart_with(&mut b, &account).await;
    let token = aws_tenant(&a).await;
    eventually(|| async { b.running().service().cache().tenant("acme").map(drop) }).await;
    let dev = a.device("dev-both");
    claim_with_cert(&a, &token, &dev).await;
    eventually(|| async { (account.count("create_thing") == 1).then_some(()) }).await;
    let (st, body) = b
        .call("DELETE", &format!("/v1/claims/{}", dev.hex()), &token, None)
        .await;
    assert_eq!(st, 200, "{body}");
    emptied(&account).await;
    let overlaps = account.overlaps.lock().clone();
    assert!(overlaps.is_empty(), "{overlaps:?}");
}

#[tokio::test]
async fn a_node_killed_mid_registration_has_it_finished_by_another() {
    let db = pg::TestDb::create().await;
    let account = Arc::new(Account::default());
    *account.hang_on.lock() = Some("attach_thing_principal");
    let url = db.url.clone();
    let b = lobby_tweaked(&account, |c| {
        c.store.url = url.clone();
        c.cluster.job_lease = Duration::from_secs(1);
        c.aws.retry_base = Duration::from_millis(10);
        c.aws.retry_max = Duration::from_millis(50);
    })
    .await;
    let a = doomed_node(b.config.clone(), account.clone());
    let token = aws_tenant(&b).await;
    let dev = b.device("dev-orphan");

    // Claimed through node A, which starts the registration and hangs in it.
    let resp = b
        .http
        .post(format!("http://{}/v1/claims", a.api))
        .bearer_auth(&token)
        .json(&json!({"code": dev.code, "cert_pem": dev.cert_pem}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    eventually(|| async { (account.count("attach_thing_principal") == 1).then_some(()) }).await;
    // While A lives and renews its lease, B leaves the job alone (three lease periods).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(account.count("register_certificate"), 1);
    assert_eq!(account.count("attach_thing_principal"), 1);
    assert_eq!(
        wait_state(&b, &dev, "registering").await["state"],
        "registering"
    );

    *account.hang_on.lock() = None;
    a.kill.send(()).unwrap();
    let killed = std::time::Instant::now();
    wait_state(&b, &dev, "ready").await;
    eprintln!(
        "node killed → registration finished by the other: {:?}",
        killed.elapsed()
    );
    // B went on from the stored registration: one certificate, one thing, nothing twice.
    assert_eq!(account.count("register_certificate"), 1);
    assert_eq!(account.certs.lock().len(), 1);
    assert_eq!(account.things.lock().len(), 1);
    assert_eq!(account.principals.lock().len(), 1);
    assert_eq!(account.policies.lock().len(), 1);
}
