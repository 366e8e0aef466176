//! Configuration: the TOML file of SPEC §8, every key with a default.
//!
//! `Config::load(path)` reads and parses, then `validate()` checks what serde cannot (addresses,
//! positive limits, readable paths are checked where they are opened). A bad file is an error
//! naming the key, never a panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod store_url;
mod validate;
pub use store_url::{redacted, StoreUrl, SUPPORTED_URLS};

/// Errors from loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    pub tls: TlsConfig,
    pub store: StoreConfig,
    pub claims: ClaimsConfig,
    pub api: ApiConfig,
    pub aws: AwsConfig,
    pub limits: LimitsConfig,
    pub shutdown: ShutdownConfig,
    pub dev: DevConfig,
    pub compat: CompatConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
}

/// `[listener]`: where the lobby listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Device-facing MQTT over TLS: `mqtt = "host:port"` (one listener), or one
    /// `[[listener.mqtt]]` table per listener (8883 and 443 served by one process). Default
    /// `0.0.0.0:8883`, the IANA MQTT-over-TLS port.
    #[serde(deserialize_with = "mqtt_listeners")]
    pub mqtt: Vec<MqttListener>,
    /// HTTP API, metrics and health. Default `127.0.0.1:8080`: operators expose it deliberately.
    pub api: SocketAddr,
    /// Expect a PROXY protocol v2 header from a TCP load balancer, on every MQTT listener that
    /// does not say otherwise. Default false.
    pub proxy_protocol: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            mqtt: vec![MqttListener::at(SocketAddr::from(([0, 0, 0, 0], 8883)))],
            api: SocketAddr::from(([127, 0, 0, 1], 8080)),
            proxy_protocol: false,
        }
    }
}

impl ListenerConfig {
    /// Whether `l` expects a PROXY v2 header (its own `proxy_protocol`, else the listener-wide
    /// one).
    pub fn proxy_protocol_of(&self, l: &MqttListener) -> bool {
        l.proxy_protocol.unwrap_or(self.proxy_protocol)
    }
}

/// One `[[listener.mqtt]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttListener {
    pub address: SocketAddr,
    /// Expect a PROXY v2 header here; unset: `listener.proxy_protocol`.
    #[serde(default)]
    pub proxy_protocol: Option<bool>,
}

impl MqttListener {
    /// A listener on `address` with the listener-wide PROXY setting.
    pub fn at(address: SocketAddr) -> Self {
        Self {
            address,
            proxy_protocol: None,
        }
    }
}

/// `listener.mqtt`: the SPEC's single string, or an array of `[[listener.mqtt]]` tables.
fn mqtt_listeners<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<MqttListener>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(SocketAddr),
        Many(Vec<MqttListener>),
    }
    match Form::deserialize(d)? {
        Form::One(address) => Ok(vec![MqttListener::at(address)]),
        Form::Many(v) => Ok(v),
    }
}

/// `[tls]`: the server certificate and the manufacturing CAs devices must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM). Default `certs/dev/server.pem`.
    pub cert: PathBuf,
    /// Server private key (PEM). Default `certs/dev/server.key`.
    pub key: PathBuf,
    /// Every trusted manufacturing CA (PEM files). Default `["certs/dev/ca.pem"]`.
    pub client_cas: Vec<PathBuf>,
    /// Optional directory of CRLs (PEM or DER). Default empty: no CRLs.
    pub crl_dir: PathBuf,
    /// TLS session resumption for reconnecting devices (stateless tickets, an extension of
    /// SPEC §8). Default true. A resumed session is re-checked against revocation and the
    /// certificate's validity; tickets issued before a trust reload are not accepted.
    pub resumption: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: "certs/dev/server.pem".into(),
            key: "certs/dev/server.key".into(),
            client_cas: vec!["certs/dev/ca.pem".into()],
            crl_dir: PathBuf::new(),
            resumption: true,
        }
    }
}

/// `[store]`: where tenants and claims persist.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://<path>` (default `sqlite://data/lobby.db`), `sqlite::memory:` for tests, or
    /// `postgres://user@host/db` for a fleet of nodes sharing one PostgreSQL.
    pub url: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/lobby.db".into(),
        }
    }
}

/// `[claims]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimsConfig {
    /// The claim-code HMAC key file (hex). Default `certs/dev/claim.key`.
    pub code_key: PathBuf,
    /// Retired claim-key files whose printed labels are still accepted (an extension): to
    /// rotate the key, move the old file's path here and put a new key in `code_key`.
    /// Default empty.
    pub previous_code_keys: Vec<PathBuf>,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        Self {
            code_key: "certs/dev/claim.key".into(),
            previous_code_keys: Vec::new(),
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// File holding the operator token. Default `certs/dev/admin.token`.
    pub admin_token_file: PathBuf,
    /// `/v1/` requests per second per client address, with bursts of `rate_burst`; past it,
    /// 429 `rate_limited` (an extension). Default 0: off, since an operator's scripts, a load
    /// test and a tenant's backend may all share one address; set it on an exposed API.
    pub rate_limit: f64,
    /// Requests one address may make at once before `rate_limit` paces it. Default 100.
    pub rate_burst: u32,
    /// A request's head must have arrived this long after its connection was ready for it;
    /// also how long an idle keep-alive connection stays open. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection that moved no byte either way for this long is closed (a trickled body,
    /// an unread response). Default 60s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// API connections at once; past it new ones wait in the listen backlog. Default 1024
    /// (the API shares the process's open-files limit with the devices).
    pub max_connections: usize,
    /// With `tls_key`: the API and console over HTTPS (PEM chain, leaf first). Reloaded with
    /// `[tls]` (SIGHUP, `POST /v1/admin/reload`). Default empty: plain HTTP, meant for
    /// loopback (a console's camera needs HTTPS anywhere else).
    pub tls_cert: PathBuf,
    /// The private key of `tls_cert` (PEM). Default empty.
    pub tls_key: PathBuf,
}

impl ApiConfig {
    /// Whether the API is served over HTTPS.
    pub fn https(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            admin_token_file: "certs/dev/admin.token".into(),
            rate_limit: 0.0,
            rate_burst: 100,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
        }
    }
}

/// `[aws]`. The lobby's own credentials never come from here: they come from the standard
/// AWS chain (environment, profile, container or instance metadata).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsConfig {
    /// Override for the STS and IoT endpoints (tests, private endpoints). Default empty: AWS's own.
    pub endpoint_url: String,
    /// RoleSessionName when assuming tenant roles, so tenants see who acts in their account
    /// (CloudTrail). Default `lobby` (an extension of SPEC §8).
    pub session_name: String,
    /// First retry delay after throttling, 5xx or network errors; doubles up to `retry_max`,
    /// with jitter. Default 500 ms (an extension).
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry delay. Default 5 min (an extension).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long a registration is retried on one node before it is `failed` with the last
    /// error (then `POST /v1/devices/{id}/retry` queues it again). Default 24h.
    #[serde(with = "humantime_serde")]
    pub retry_give_up: Duration,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            endpoint_url: String::new(),
            session_name: "lobby".into(),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(300),
            retry_give_up: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[limits]`: every bound the lobby enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent device connections (a permit is taken before accept). Default 100,000.
    pub max_connections: usize,
    /// TCP accept → TLS handshake done. Default 10 s: slow links, but no slowloris.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS done → CONNECT received. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted, checked on the fixed header. Default 128 KiB.
    pub max_packet_size: usize,
    /// v3.1.1: how long a redirected device may stay before the lobby closes it. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub redirect_grace: Duration,
    /// Connects one device may make at once before it is held to one per `reconnect_interval`
    /// (an extension). Default 5: a takeover or a quick retry passes, a reconnect loop does not.
    pub reconnect_burst: u32,
    /// The steady reconnect rate per device: one per interval. Default 1 s, as AWS IoT allows
    /// one CONNECT per second per client id.
    #[serde(with = "humantime_serde")]
    pub reconnect_interval: Duration,
    /// Subscriptions one device may hold; past it SUBACK says quota exceeded (v5 0x97,
    /// v3.1.1 0x80). Default 32 (an extension; a waiting device needs three).
    pub max_subscriptions: usize,
    /// QoS 1 publishes a bridged device may have in flight (announced as v5 Receive
    /// Maximum); past it, DISCONNECT 0x97. Default 32 (an extension).
    pub max_inflight: u16,
    /// New connections per second from one source address (after the PROXY header, the
    /// device's own), with bursts of `connect_burst_per_address`; past it, the socket is
    /// closed before the TLS handshake (an extension). Default 0: off, since a factory or a
    /// carrier NAT may put thousands of devices behind one address; set it on a public
    /// endpoint.
    pub connect_rate_per_address: f64,
    /// Connections one address may open at once before the rate applies. Default 100.
    pub connect_burst_per_address: u32,
    /// Bridge mode: times a device's QoS 1 publish is re-sent to a tenant broker that closed
    /// the connection on it, before it is given up on (v5 PUBACK 0x80, v3.1.1 the connection
    /// closed) so the tenant's other devices carry on (an extension). Default 3: an outage
    /// rarely ends the same connection three times on one publish, a poison message (AWS IoT
    /// on a topic its policy forbids) always does.
    pub bridge_max_redeliveries: u16,
    /// Connections that may be in their PROXY header or TLS handshake at once (SPEC §12).
    /// When all are taken, a new connection closes the oldest handshake in progress
    /// (`lobby_tls_handshake_failures_total{reason="busy"}`), so sockets that stall go first
    /// and devices that finish in milliseconds get through. Never more than half of
    /// `max_connections` is used. Default 2048: far more than honest devices have in
    /// flight, a small share of `max_connections`.
    pub max_handshakes: usize,
    /// Close a session that has sent nothing (not even PINGREQ) for this long, also when its
    /// keep-alive is 0 (v5 DISCONNECT 0x8D first). Default 0s: no cap beyond keep-alive
    /// (SPEC §12); set it above 1.5 × your devices' keep-alive.
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
    /// PUBLISH packets per second one device may send, in bursts of one second's worth;
    /// past it the lobby stops reading from that device until it is back within the rate
    /// (backpressure: nothing is dropped or refused). Default 0: off (SPEC §12).
    pub publish_rate: f64,
    /// PUBLISH bytes (topic and payload) per second one device may send, paced like
    /// `publish_rate`. Default 0: off (SPEC §12).
    pub publish_bytes_rate: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 131_072,
            redirect_grace: Duration::from_secs(10),
            reconnect_burst: 5,
            reconnect_interval: Duration::from_secs(1),
            max_subscriptions: 32,
            max_inflight: 32,
            connect_rate_per_address: 0.0,
            connect_burst_per_address: 100,
            bridge_max_redeliveries: 3,
            max_handshakes: 2048,
            max_idle: Duration::ZERO,
            publish_rate: 0.0,
            publish_bytes_rate: 0.0,
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long a stop may take in all after SIGTERM, the drain included. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Over how long the devices are told to leave, one after another, so the other nodes
    /// see a reconnect ramp rather than a spike. Default 10 s; a drain longer than `grace` is
    /// cut to it (the drain is part of the stop).
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Where v5 devices should go while this node is away (`host:port`). Default empty.
    pub server_reference: String,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            server_reference: String::new(),
        }
    }
}

/// `[cluster]` (an extension): settings that matter when several nodes share a PostgreSQL
/// store (SPEC §10).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// How long a node's claim on a registration or clean-up job lasts without renewal. The
    /// node working a job renews it every third of this; a node that dies loses it, and another
    /// node takes the job over within about twice this. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub job_lease: Duration,
    /// This node's name in the device list (`node`) and in the shared store. Default: the
    /// host name. Give each node of a fleet its own.
    pub node_name: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty());
        Self {
            job_lease: Duration::from_secs(30),
            node_name: host.unwrap_or_else(|| "lobby".into()),
        }
    }
}

/// `[dev]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevConfig {
    /// Create the development PKI (`certs/dev`) on first start when it is missing. Default false;
    /// only the shipped development config turns it on.
    pub auto_init: bool,
}

/// `[compat]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompatConfig {
    /// Serve the AWS "device lobby" sample firmware's topics. Default false.
    pub aws_device_lobby: bool,
}

/// `[log]` (an extension of SPEC §8).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info,lobby=debug`. Default `info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

/// The longest duration any key may hold (365 days): long past any sensible timeout, far
/// below what overflows a clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// The longest a device is paced for one publish (`limits.publish_rate`), whatever the rate.
pub const MAX_PACE_WAIT: Duration = Duration::from_secs(86_400);

/// The most permits a connection semaphore holds (tokio's limit); `max_connections` above it
/// would panic at start.
pub const MAX_PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.max_packet_size, 131_072);
        assert_eq!(c.listener.mqtt.len(), 1);
        assert_eq!(c.listener.mqtt[0].address.port(), 8883);
    }

    #[test]
    fn mqtt_listeners_in_both_forms() {
        let one: Config = toml::from_str("[listener]\nmqtt = \"127.0.0.1:8883\"\n").unwrap();
        assert_eq!(
            one.listener.mqtt,
            vec![MqttListener::at("127.0.0.1:8883".parse().unwrap())]
        );
        let many: Config = toml::from_str(
            "[listener]\nproxy_protocol = true\n\
             [[listener.mqtt]]\naddress = \"0.0.0.0:8883\"\n\
             [[listener.mqtt]]\naddress = \"0.0.0.0:443\"\nproxy_protocol = false\n",
        )
        .unwrap();
        many.validate().unwrap();
        let l = &many.listener;
        assert_eq!(l.mqtt.len(), 2);
        assert_eq!(l.mqtt[1].address.port(), 443);
        assert!(l.proxy_protocol_of(&l.mqtt[0]), "the listener-wide setting");
        assert!(!l.proxy_protocol_of(&l.mqtt[1]), "its own");
        let err = toml::from_str::<Config>("[[listener.mqtt]]\naddress = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener"), "{err}");
        let none: Config = toml::from_str("[listener]\nmqtt = []\n").unwrap();
        assert!(none
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listener.mqtt"));
    }

    #[test]
    fn durations_and_unknown_keys() {
        let c: Config = toml::from_str("[limits]\nredirect_grace = \"250ms\"\n").unwrap();
        assert_eq!(c.limits.redirect_grace, Duration::from_millis(250));
        let err = toml::from_str::<Config>("[limits]\nmax_conections = 1\n").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn the_shipped_config_loads() {
        let c = Config::load(Path::new("config/lobby.toml")).unwrap();
        assert!(c.dev.auto_init);
        assert_eq!(c.limits.reconnect_burst, 5);
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = Config::default();
        c.limits.max_connections = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.max_connections"), "{e}");
        let mut c = Config::default();
        c.limits.max_handshakes = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.max_handshakes"), "{e}");
        let mut c = Config::default();
        c.limits.publish_bytes_rate = -1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.publish_bytes_rate"), "{e}");
        let mut c = Config::default();
        c.store.url = "mysql://x".into();
        assert!(c.validate().unwrap_err().to_string().contains("store.url"));
        let mut c = Config::default();
        c.limits.bridge_max_redeliveries = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.bridge_max_redeliveries"), "{e}");
    }

    /// Values that would overflow a clock or a semaphore, or lock every device out, are
    /// refused by name rather than panicking later in the connection path.
    #[test]
    fn values_that_overflow_or_lock_out_are_refused() {
        type Tweak = fn(&mut Config);
        let cases: Vec<(&str, Tweak)> = vec![
            ("limits.redirect_grace", |c| {
                c.limits.redirect_grace = Duration::from_secs(u64::MAX / 4)
            }),
            ("limits.handshake_timeout", |c| {
                c.limits.handshake_timeout = Duration::MAX
            }),
            ("shutdown.grace", |c| {
                c.shutdown.grace = Duration::from_secs(366 * 86_400)
            }),
            ("cluster.job_lease", |c| c.cluster.job_lease = Duration::MAX),
            ("limits.max_connections", |c| {
                c.limits.max_connections = usize::MAX
            }),
            ("limits.reconnect_burst", |c| c.limits.reconnect_burst = 0),
            ("limits.connect_burst_per_address", |c| {
                c.limits.connect_rate_per_address = 10.0;
                c.limits.connect_burst_per_address = 0;
            }),
            ("api.rate_burst", |c| {
                c.api.rate_limit = 5.0;
                c.api.rate_burst = 0;
            }),
        ];
        for (key, tweak) in cases {
            let mut c = Config::default();
            tweak(&mut c);
            let e = c.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        // At the bounds themselves: accepted.
        let mut c = Config::default();
        c.limits.redirect_grace = MAX_DURATION;
        c.limits.max_connections = MAX_PERMITS;
        c.limits.reconnect_burst = 1;
        c.validate().unwrap();
        // A zero burst with its rate off is harmless.
        let mut c = Config::default();
        c.limits.connect_burst_per_address = 0;
        c.validate().unwrap();
    }
}
