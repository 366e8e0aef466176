//! Shared test harness: a real lobby on 127.0.0.1:0 with its own dev PKI and SQLite file in a
//! temp dir, an HTTP client for the API, device certificates, and clients over real TLS:
//! rumqttc (v4 and v5) and a raw MQTT client built on the lobby's codec, for what rumqttc
//! hides (the v5 Server Reference of a refused CONNACK or a DISCONNECT): that client and its
//! connect / close expectations are in `raw` (re-exported here); `flows` holds the SPEC §4
//! payload checks and rumqttc helpers of the device-flow tests.

#![allow(dead_code)]

pub mod fleet;
pub mod flows;
mod raw;

pub use raw::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lobby::claims::codes::ClaimKey;
use lobby::config::Config;
use lobby::device::DeviceId;
use lobby::pki::{self, Ca};
use lobby::server::Lobby;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// A device certificate and its claim code.
#[derive(Clone)]
pub struct Device {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub id: DeviceId,
    pub code: String,
}

impl Device {
    pub fn hex(&self) -> String {
        self.id.to_hex()
    }
    pub fn topic(&self, leaf: &str) -> String {
        format!("$lobby/devices/{}/{leaf}", self.hex())
    }
}

/// A running lobby and everything needed to talk to it.
pub struct TestLobby {
    pub lobby: Option<Lobby>,
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub admin: String,
    pub ca: Ca,
    pub key: ClaimKey,
    pub http: reqwest::Client,
}

impl TestLobby {
    /// A lobby with test-friendly limits.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A lobby whose config `tweak` adjusts before start.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        pki::init(&pki::InitOptions {
            dir: certs.clone(),
            devices: 2,
        })
        .unwrap();
        let mut config = Config::default();
        config.listener.mqtt = vec![lobby::config::MqttListener::at(
            "127.0.0.1:0".parse().unwrap(),
        )];
        config.listener.api = "127.0.0.1:0".parse().unwrap();
        config.tls.cert = certs.join("server.pem");
        config.tls.key = certs.join("server.key");
        config.tls.client_cas = vec![certs.join("ca.pem")];
        config.store.url = format!("sqlite://{}", dir.path().join("lobby.db").display());
        config.claims.code_key = certs.join("claim.key");
        config.api.admin_token_file = certs.join("admin.token");
        config.limits.redirect_grace = Duration::from_secs(2);
        config.shutdown.grace = Duration::from_secs(2);
        // Stops at once: the drain's spread has its own test (drain.rs).
        config.shutdown.drain = Duration::ZERO;
        tweak(&mut config);
        let lobby = Lobby::start(&config).await.unwrap();
        let admin = std::fs::read_to_string(certs.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let ca = Ca::load(&certs.join("ca.pem"), &certs.join("ca.key")).unwrap();
        let key = ClaimKey::load(&certs.join("claim.key")).unwrap();
        Self {
            lobby: Some(lobby),
            dir,
            config,
            admin,
            ca,
            key,
            http: http_client(&certs.join("ca.pem")),
        }
    }

    /// The API's scheme: `https` when `api.tls_cert` is set.
    pub fn scheme(&self) -> &'static str {
        if self.config.api.https() {
            "https"
        } else {
            "http"
        }
    }

    pub fn running(&self) -> &Lobby {
        self.lobby.as_ref().expect("lobby is running")
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.running().mqtt_addr()
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Stops the lobby and starts it again on the same files (new ports).
    pub async fn restart(&mut self) {
        if let Some(l) = self.lobby.take() {
            l.stop().await;
        }
        self.lobby = Some(Lobby::start(&self.config).await.unwrap());
    }

    /// A new device certificate from the lobby's CA, made in memory.
    pub fn device(&self, name: &str) -> Device {
        let issued = self.ca.issue_device(name).unwrap();
        self.device_from(name, issued.cert_der, issued.cert_pem, issued.key_pem)
    }

    pub fn device_from(
        &self,
        name: &str,
        der: Vec<u8>,
        cert_pem: String,
        key_pem: String,
    ) -> Device {
        let id = DeviceId::from_cert_der(&der);
        Device {
            name: name.into(),
            cert_pem,
            key_pem,
            id,
            code: self.key.code_for(&id),
        }
    }

    /// The API's URL of `path`, by name (`localhost`, as its certificate says) over HTTPS.
    pub fn url(&self, path: &str) -> String {
        let addr = self.running().api_addr();
        match self.scheme() {
            "https" => format!("https://localhost:{}{path}", addr.port()),
            _ => format!("http://{addr}{path}"),
        }
    }

    /// An API call with `token`; returns (status, JSON body or Null).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request with a raw `Authorization` header (or none) and a raw JSON body (or none).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `GET /v1/devices/{id}` of `dev` with `token`; returns (status, body).
    pub async fn device_json(&self, token: &str, dev: &Device) -> (u16, Value) {
        self.call("GET", &format!("/v1/devices/{}", dev.hex()), token, None)
            .await
    }

    /// `dev` as the operator reads it; the read must succeed (200).
    pub async fn admin_device(&self, dev: &Device) -> Value {
        let (status, body) = self.device_json(&self.admin, dev).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Creates a redirect-mode tenant; returns its token.
    pub async fn tenant(&self, id: &str, endpoint: &str) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/v1/tenants",
                &self.admin,
                Some(json!({"id": id, "name": id, "endpoint": endpoint, "port": 8883, "region": "eu-west-1"})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// `GET /v1/devices/{id}` of `dev` as the operator; returns (status, body).
    pub async fn admin_device_json(&self, dev: &Device) -> (u16, Value) {
        self.device_json(&self.admin, dev).await
    }

    /// `GET /metrics` (which must answer 200): the Prometheus text.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.text().await.unwrap()
    }

    /// The operator revokes `dev`; that must succeed.
    pub async fn revoke(&self, dev: &Device) {
        let (st, body) = self
            .call(
                "POST",
                &format!("/v1/devices/{}/revoke", dev.hex()),
                &self.admin,
                None,
            )
            .await;
        assert!(st == 200 || st == 204, "{st} {body}");
    }

    /// Claims `device` with the tenant `token`; returns (status, body).
    pub async fn claim(&self, token: &str, device: &Device) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/claims",
            token,
            Some(json!({"code": device.code})),
        )
        .await
    }
}

/// Asserts a SPEC §6 error: `status` and `{"error": code, "message": "..."}`.
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].is_string(), "{body}");
}

/// Asserts an API error whose status is one of `statuses` and whose body carries the `error`
/// and `message` strings; `what` names the request in the messages.
pub fn assert_json_error(got: &(u16, Value), statuses: &[u16], what: &str) {
    let (s, b) = got;
    assert!(statuses.contains(s), "{what}: {s}");
    assert!(
        b["error"].is_string() && b["message"].is_string(),
        "{what}: {s} {b}"
    );
}

/// A rustls client config presenting `device`'s certificate and trusting the lobby's CA.
/// Makes aws-lc-rs the process's rustls provider (once): reqwest's own TLS setup asks for a
/// default, and with ring also in the test graph none is picked by itself.
pub fn crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A plain HTTP client (with the process's rustls provider set, so it may also do HTTPS).
pub fn http() -> reqwest::Client {
    crypto();
    reqwest::Client::new()
}

/// An HTTP client for the API that trusts the lobby's dev CA (HTTPS with `api.tls_cert`).
pub fn http_client(ca: &std::path::Path) -> reqwest::Client {
    crypto();
    let mut roots = rustls::RootCertStore::empty();
    for c in lobby::pem::certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}

pub fn client_tls(lobby: &TestLobby, device: &Device) -> Arc<rustls::ClientConfig> {
    client_tls_with(
        &lobby.certs_dir().join("ca.pem"),
        &device.cert_pem,
        &device.key_pem,
    )
}

pub fn client_tls_with(
    server_ca: &std::path::Path,
    cert_pem: &str,
    key_pem: &str,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(server_ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    // Every certificate of `cert_pem`, in order: a device of a factory with an intermediate CA
    // sends its leaf, then the intermediate.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// A TLS connection to the lobby as `device`.
pub async fn tls_connect(
    lobby: &TestLobby,
    device: &Device,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(lobby.mqtt_addr()).await?;
    let connector = TlsConnector::from(client_tls(lobby, device));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The soft open-files limit from /proc (1024 when it cannot be read).
pub fn open_files_soft_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// Polls `f` until it returns `Some`, for up to `WAIT`.
pub async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
