//! The moto harness of `aws_moto.rs`: a `moto_server` per test, dummy credentials, a test-side
//! IoT client, and what the tenant's account holds.
#![allow(dead_code)]

use std::process::Stdio;
use std::sync::{Arc, Once};

use parking_lot::Mutex;
use std::time::Duration;

use crate::common::{eventually, Device, RawClient, TestLobby};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_iot::types::CertificateStatus;
use lobby::mqtt::codec::{self, Packet};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/lobby-tenant";
pub const EXTERNAL_ID: &str = "ext-123";
pub const POLICY: &str = "lobby-device";
pub const POLICY_DOC: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#;

// ---- moto --------------------------------------------------------------------------------------

/// The lobby reads the standard credential chain: give it moto's dummy credentials, once,
/// before any lobby or SDK client exists.
pub fn aws_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

/// A `moto_server` child process (killed when dropped) and its request log.
pub struct Moto {
    pub _child: tokio::process::Child,
    pub url: String,
    /// moto's recording of every request, bodies included (`recorded_form_values`).
    _recording: tempfile::TempDir,
    /// The request lines moto logged (`"PUT /things/x HTTP/1.1" 200 -` …), in order.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Moto {
    /// moto on a port of its own choosing.
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// moto on `port` (0: any free port).
    pub async fn start_on(port: u16) -> Self {
        aws_env();
        let port = port.to_string();
        let recording = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port])
            .env("MOTO_ENABLE_RECORDING", "True")
            .env("MOTO_RECORDER_FILEPATH", recording.path().join("requests"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server is on PATH");
        // Werkzeug says where it listens, then logs every request on stderr: read it to the end
        // (a full pipe would stall moto), keeping the request lines.
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = tokio::sync::oneshot::channel::<u16>();
        let log_w = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut port_tx = Some(port_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("Running on http://127.0.0.1:").nth(1) {
                    if let (Some(tx), Ok(port)) = (port_tx.take(), rest.trim().parse()) {
                        let _ = tx.send(port);
                    }
                } else if line.contains(" HTTP/1.1\" ") {
                    log_w.lock().push(line);
                }
            }
        });
        let port = tokio::time::timeout(Duration::from_secs(60), port_rx)
            .await
            .expect("moto_server started within 60 s")
            .expect("moto_server printed its port");
        let url = format!("http://127.0.0.1:{port}");
        // reqwest's TLS asks for the process's rustls provider (ring is in the graph too).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{url}/moto-api/")).send().await.is_err() {
            assert!(Instant::now() < deadline, "moto at {url} does not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        http.post(format!("{url}/moto-api/recorder/start-recording"))
            .send()
            .await
            .expect("moto records requests");
        Self {
            _child: child,
            url,
            _recording: recording,
            log,
        }
    }

    /// The values of form field `key` in the requests (STS's are forms) whose `Action` is
    /// `action`, from moto's recording, in order.
    pub async fn recorded_form_values(&self, action: &str, key: &str) -> Vec<String> {
        let text = reqwest::get(format!("{}/moto-api/recorder/download-recording", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let request: Value = serde_json::from_str(line).unwrap();
            let Some(body) = request["body"].as_str() else {
                continue;
            };
            let Ok(body) = data_encoding::BASE64.decode(body.as_bytes()) else {
                continue;
            };
            let form: Vec<(String, String)> = String::from_utf8_lossy(&body)
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (percent_decode(k), percent_decode(v)))
                .collect();
            if form.iter().any(|(k, v)| k == "Action" && v == action) {
                out.extend(form.into_iter().filter(|(k, _)| k == key).map(|(_, v)| v));
            }
        }
        out
    }

    /// A test-side IoT client in `region` of moto's default account.
    pub async fn iot(&self, region: &str) -> aws_sdk_iot::Client {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.url)
            .region(Region::new(region.to_owned()))
            .load()
            .await;
        aws_sdk_iot::Client::new(&conf)
    }

    /// An IoT client in `region` where the tenant policy exists (moto's AttachPolicy needs it).
    pub async fn iot_with_policy(&self, region: &str) -> aws_sdk_iot::Client {
        let iot = self.iot(region).await;
        iot.create_policy()
            .policy_name(POLICY)
            .policy_document(POLICY_DOC)
            .send()
            .await
            .expect("create the tenant policy");
        iot
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().clone()
    }

    /// Waits until moto has seen no request for a second (the lobby's work is done; the test
    /// makes no request meanwhile). Not an assertion: a bound on waiting for quiet.
    pub async fn quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = self.log.lock().len();
        let mut still = 0;
        while still < 4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.log.lock().len();
            still = if now == seen { still + 1 } else { 0 };
            seen = now;
            assert!(Instant::now() < deadline, "moto never went quiet");
        }
    }
}

/// A port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cert_pem`'s DER (moto keeps the PEM text as given; compare certificates, not texts or ids).
pub fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// A certificate in a tenant's account.
pub struct HeldCert {
    pub arn: String,
    pub status: CertificateStatus,
    pub der: Vec<u8>,
}

impl std::fmt::Debug for HeldCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} ({} bytes)",
            self.arn,
            self.status,
            self.der.len()
        )
    }
}

/// What a tenant's account (one region of moto's account) holds.
#[derive(Debug)]
pub struct Holding {
    pub certs: Vec<HeldCert>,
    pub things: Vec<String>,
}

/// The certificates and things in the account; a certificate the lobby deletes between the
/// listing and its description counts as gone.
pub async fn holding(iot: &aws_sdk_iot::Client) -> Holding {
    let list = iot.list_certificates().send().await.unwrap();
    let mut certs = Vec::new();
    for c in list.certificates() {
        let d = match iot
            .describe_certificate()
            .certificate_id(c.certificate_id().unwrap())
            .send()
            .await
        {
            Ok(d) => d,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                continue
            }
            Err(e) => panic!("DescribeCertificate: {e:?}"),
        };
        let d = d.certificate_description().unwrap();
        certs.push(HeldCert {
            arn: d.certificate_arn().unwrap().to_owned(),
            status: d.status().unwrap().clone(),
            der: der(d.certificate_pem().unwrap()),
        });
    }
    let things = iot
        .list_things()
        .send()
        .await
        .unwrap()
        .things()
        .iter()
        .filter_map(|t| t.thing_name().map(str::to_owned))
        .collect();
    Holding { certs, things }
}

/// Asserts the account holds exactly `dev`'s certificate, ACTIVE, and the thing `thing` with
/// the certificate as principal and the tenant policy attached to the certificate.
pub async fn assert_registered(iot: &aws_sdk_iot::Client, dev: &Device, thing: &str) {
    let h = holding(iot).await;
    assert_eq!(h.certs.len(), 1, "exactly one certificate: {h:?}");
    let HeldCert {
        arn,
        status,
        der: cert_der,
    } = &h.certs[0];
    assert_eq!(*status, CertificateStatus::Active, "{h:?}");
    assert_eq!(*cert_der, der(&dev.cert_pem), "the device's certificate");
    assert_eq!(h.things, vec![thing.to_owned()], "{h:?}");
    let principals = iot
        .list_thing_principals()
        .thing_name(thing)
        .send()
        .await
        .unwrap();
    assert_eq!(
        principals.principals(),
        std::slice::from_ref(arn),
        "thing principals"
    );
    let policies = iot
        .list_attached_policies()
        .target(arn)
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = policies
        .policies()
        .iter()
        .filter_map(|p| p.policy_name())
        .collect();
    assert_eq!(names, [POLICY], "policies of the certificate");
}

/// Eventually the account holds no certificate and no thing.
pub async fn assert_emptied(iot: &aws_sdk_iot::Client) {
    eventually(|| async {
        let h = holding(iot).await;
        (h.certs.is_empty() && h.things.is_empty()).then_some(())
    })
    .await;
}

/// moto's DescribeEndpoint answers a fresh random `<14 chars>-ats.iot.<region>.amazonaws.com`
/// on every call, so the endpoint the lobby stored can only be checked by its shape.
pub fn assert_ats_endpoint(endpoint: &str, region: &str) {
    let suffix = format!("-ats.iot.{region}.amazonaws.com");
    let prefix = endpoint
        .strip_suffix(&suffix)
        .unwrap_or_else(|| panic!("{endpoint:?} is not an iot:Data-ATS endpoint of {region}"));
    assert!(
        !prefix.is_empty()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{endpoint:?}"
    );
}

// ---- lobby ---------------------------------------------------------------------------------------

pub async fn lobby_on(moto: &Moto) -> TestLobby {
    lobby_at(moto.url.clone()).await
}

/// A lobby whose AWS endpoint is `url`, with quick retries.
pub async fn lobby_at(url: String) -> TestLobby {
    TestLobby::start_with(move |cfg| {
        cfg.aws.endpoint_url = url;
        cfg.aws.retry_base = Duration::from_millis(50);
        cfg.aws.retry_max = Duration::from_secs(1);
    })
    .await
}

/// Creates an aws-iot tenant without `endpoint`; `extra` adds backend fields. Returns its token.
pub async fn aws_tenant(lobby: &TestLobby, id: &str, region: &str, extra: Value) -> String {
    let mut backend = json!({
        "kind": "aws-iot",
        "region": region,
        "role_arn": ROLE_ARN,
        "external_id": EXTERNAL_ID,
        "policy_name": POLICY,
    });
    for (k, v) in extra.as_object().unwrap() {
        backend[k] = v.clone();
    }
    let (status, body) = lobby
        .call(
            "POST",
            "/v1/tenants",
            &lobby.admin,
            Some(json!({"id": id, "name": id, "region": region, "backend": backend})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// `POST /v1/claims` with the device's certificate; the claim is new (201) and registering (or
/// already ready, if the registration was that fast).
pub async fn claim_with_cert(lobby: &TestLobby, token: &str, dev: &Device) {
    let (status, body) = lobby
        .call(
            "POST",
            "/v1/claims",
            token,
            Some(json!({"code": dev.code, "cert_pem": dev.cert_pem})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        body["state"] == "registering" || body["state"] == "ready",
        "{body}"
    );
}

/// The operator's view of `dev` once its state is `state` (a `failed` on the way to another
/// state fails the test with the lobby's error).
pub async fn device_in(lobby: &TestLobby, dev: &Device, state: &str) -> Value {
    eventually(|| async {
        let d = lobby.admin_device(dev).await;
        if d["state"] == "failed" && state != "failed" {
            panic!("registration failed: {d}");
        }
        (d["state"] == state).then_some(d)
    })
    .await
}

pub async fn tenant_json(lobby: &TestLobby, id: &str) -> Value {
    let (status, body) = lobby
        .call("GET", &format!("/v1/tenants/{id}"), &lobby.admin, None)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Reads publishes (acknowledging QoS 1 statuses) until the redirect; returns the states of
/// the statuses seen before it and the redirect payload.
pub async fn statuses_until_redirect(c: &mut RawClient, dev: &Device) -> (Vec<String>, Value) {
    let mut states = Vec::new();
    loop {
        let p = c.expect_publish().await;
        let v: Value = serde_json::from_slice(&p.payload).unwrap();
        if p.topic == dev.topic("redirect") {
            return (states, v);
        }
        assert_eq!(p.topic, dev.topic("status"), "{v}");
        states.push(v["state"].as_str().unwrap().to_owned());
        assert!(states.len() < 8, "too many statuses: {states:?}");
        if p.qos != codec::QoS::AtMostOnce {
            c.send(Packet::PubAck(codec::PubAck {
                pkid: p.pkid,
                reason: 0,
                properties: Default::default(),
            }))
            .await;
        }
    }
}

/// `application/x-www-form-urlencoded` decoding of one key or value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
