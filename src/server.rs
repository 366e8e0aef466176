//! Assembly: builds the store, the claims service, TLS, the MQTT edge and the API from a
//! `Config`, starts them, and shuts them down (stop accepting → drain within a grace period).
//!
//! Tests start a whole lobby with `Lobby::start` on 127.0.0.1:0 and read the bound addresses.

pub mod reload;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::claims::codes::{ClaimKey, ClaimKeys, CodeError};
use crate::claims::error::ServiceError;
use crate::claims::events::{ClaimEvent, ClaimEvents};
use crate::claims::service::{token_hash, ClaimsService};
use crate::config::{Config, ConfigError};
use crate::edge::tls::TlsError;
use crate::edge::{self, EdgeContext};
use crate::pki::{self, PkiError};
use crate::provision::aws_iot::AwsIotFactory;
use crate::provision::worker::{Backoff, Worker};
use crate::provision::IotApiFactory;
use crate::ratelimit::AddressLimiter;
use crate::store::{self, StoreError};
use crate::waiting::{Activity, WaitingRoom};
use reload::Reloader;

/// Why the lobby could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("loading claims: {0}")]
    Service(#[from] ServiceError),
    #[error("claims.code_key: {0}")]
    ClaimKey(#[from] CodeError),
    #[error("dev PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("api.admin_token_file {path}: {message}")]
    AdminToken { path: String, message: String },
    #[error(transparent)]
    Reload(#[from] reload::ReloadError),
    #[error(transparent)]
    ApiTls(#[from] api::serve::ApiTlsError),
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Queue of device activity (delivered redirects) towards the store.
const ACTIVITY_QUEUE: usize = 4096;
/// Listen backlog of the MQTT listener: connect storms arrive faster than one accept loop.
const MQTT_BACKLOG: u32 = 4096;

/// A running lobby.
#[derive(Debug)]
pub struct Lobby {
    /// The bound MQTT listeners, in `listener.mqtt`'s order.
    mqtt_addrs: Vec<SocketAddr>,
    api_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Stops the API, which outlives the rest of a shutdown (it answers `/readyz` 503 while
    /// devices are told and tasks drain).
    api_stop: CancellationToken,
    api_task: tokio::task::JoinHandle<()>,
    grace: Duration,
    /// Over how long the devices are told to leave (`shutdown.drain`, at most `grace`).
    drain: Duration,
    /// Cancelled first when stopping: no more devices accepted, `/readyz` 503.
    stopping: CancellationToken,
    service: ClaimsService,
    reloader: Arc<Reloader>,
}

impl Lobby {
    /// Starts every part from `config`; returns once both listeners are bound.
    pub async fn start(config: &Config) -> Result<Self, ServerError> {
        let aws = AwsIotFactory::new(&config.aws.endpoint_url, &config.aws.session_name);
        Self::start_with(config, Arc::new(aws)).await
    }

    /// As [`Lobby::start`], with the given AWS IoT backend (tests use a fake).
    pub async fn start_with(
        config: &Config,
        iot: Arc<dyn IotApiFactory>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let metrics = crate::metrics::install();
        let admin = read_admin_token(&config.api.admin_token_file)?;
        let (service, jobs) = load_service(config).await?;
        let trust = edge::tls::trust(&config.tls, service.cache().clone(), 0)?;
        let mqtt = bind_mqtt(config)?;
        let mqtt_addrs: Vec<SocketAddr> = mqtt.iter().map(|m| m.1).collect();
        let (api, api_addr) = bind(config.listener.api, 1024, "listener.api")?;
        let api_tls = api_tls(config)?;

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let activity = spawn_control_plane(&service, config, iot.clone(), jobs, &cancel, &tracker);
        let ctx = edge_context(config, &service, activity, trust, &cancel, &tracker);
        let stopping = ctx.stopping.clone();
        let reloader = Arc::new(Reloader::new(
            ctx.clone(),
            service.cache().clone(),
            config,
            tracker.clone(),
            api_tls.clone(),
        ));
        let listeners_up = Arc::new(AtomicBool::new(false));
        let state = ApiState {
            service: service.clone(),
            admin_token_hash: token_hash(&admin),
            metrics,
            listeners_up: listeners_up.clone(),
            stopping: stopping.clone(),
            node: config.cluster.node_name.as_str().into(),
            reloader: reloader.clone(),
            aws: iot,
        };
        let handshakes = Arc::new(edge::handshakes::Handshakes::default());
        for (socket, _, proxy) in mqtt {
            let serve = edge::listener::serve(
                socket,
                proxy,
                ctx.clone(),
                handshakes.clone(),
                tracker.clone(),
            );
            tracker.spawn(serve);
        }
        let api_stop = CancellationToken::new();
        let api_limits = api::serve::Limits {
            header_timeout: config.api.header_timeout,
            idle_timeout: config.api.idle_timeout,
            max_connections: config.api.max_connections,
        };
        let api_task = tokio::spawn(api::serve::serve(
            api,
            api::router(state),
            api_limits,
            api_tls,
            api_stop.clone(),
        ));
        listeners_up.store(true, Ordering::Release);
        tracing::info!(mqtt = ?mqtt_addrs, api = %api_addr, "lobby listening");
        Ok(Self {
            mqtt_addrs,
            api_addr,
            cancel,
            tracker,
            api_stop,
            api_task,
            grace: config.shutdown.grace,
            drain: config.shutdown.drain.min(config.shutdown.grace),
            stopping,
            service,
            reloader,
        })
    }

    /// The bound device (MQTT/TLS) address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addrs[0]
    }

    /// Every bound MQTT listener, in `listener.mqtt`'s order.
    pub fn mqtt_addrs(&self) -> &[SocketAddr] {
        &self.mqtt_addrs
    }

    /// The bound HTTP API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The claims service (tests and embedding).
    pub fn service(&self) -> &ClaimsService {
        &self.service
    }

    /// Applies `config`'s `[tls]` again (server certificate, CAs, CRLs) without a restart:
    /// new connections get it at once, and every live device is re-checked against it; those
    /// no longer trusted are disconnected. On error the old trust stays.
    pub fn reload_tls(&self, config: &Config) -> Result<(), ServerError> {
        Ok(self.reloader.reload_tls(config).map(drop)?)
    }

    /// Applies everything reloadable of `config` (`[tls]`, `[limits]`, the API rate limit);
    /// see [`Reloader`]. On error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<(), ServerError> {
        Ok(self.reloader.apply(config).map(drop)?)
    }

    /// Names the config file that SIGHUP and `POST /v1/admin/reload` read again.
    pub fn set_config_path(&self, path: &Path) {
        self.reloader.set_path(path.to_owned());
    }

    /// Stops accepting devices and answers `/readyz` 503 (a load balancer sends new devices
    /// elsewhere), then tells the devices to leave (v5 DISCONNECT 0x8B, or 0x9C with
    /// `shutdown.server_reference`) one after another over `shutdown.drain`, so the other
    /// nodes see a ramp; then ends everything else and waits for its tasks, the whole stop
    /// within `shutdown.grace`. The API stops last.
    pub async fn stop(self) {
        let started = tokio::time::Instant::now();
        self.stopping.cancel();
        let drained = self.service.waiting().drain(self.drain).await;
        tracing::info!(devices = drained, over = ?self.drain, "devices told to leave");
        self.cancel.cancel();
        self.tracker.close();
        let left = self.grace.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "shutdown grace ran out with tasks still running");
        }
        self.api_stop.cancel();
        let _ = self.api_task.await;
    }

    /// Runs until SIGTERM or SIGINT, then stops. SIGHUP re-reads `config_path` and applies
    /// what is reloadable ([`Reloader`]); a bad file is logged and the running config kept.
    pub async fn run_until_signal(self, config_path: Option<&Path>) {
        use tokio::signal::unix::{signal, SignalKind};
        if let Some(path) = config_path {
            self.set_config_path(path);
        }
        let (mut term, mut hup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(h)) => (t, h),
            _ => {
                tracing::warn!("cannot listen for SIGTERM/SIGHUP; only Ctrl-C stops the lobby");
                let _ = tokio::signal::ctrl_c().await;
                self.stop().await;
                return;
            }
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = hup.recv() => {
                    if let Err(e) = self.reloader.reload_file() {
                        tracing::error!(error = %e, "reload failed; the running config stays");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        self.stop().await;
    }
}

/// Binds every `listener.mqtt`: the socket, its address, whether it expects PROXY headers.
fn bind_mqtt(config: &Config) -> Result<Vec<(TcpListener, SocketAddr, bool)>, ServerError> {
    config
        .listener
        .mqtt
        .iter()
        .map(|l| {
            let (socket, addr) = bind(l.address, MQTT_BACKLOG, "listener.mqtt")?;
            Ok((socket, addr, config.listener.proxy_protocol_of(l)))
        })
        .collect()
}

/// The API's HTTPS configuration (`None`: plain HTTP, with a warning off loopback).
fn api_tls(config: &Config) -> Result<Option<api::serve::ApiTls>, ServerError> {
    let tls = api::serve::tls_config(&config.api)?.map(|c| Arc::new(ArcSwap::new(c)));
    if tls.is_none() && !config.listener.api.ip().is_loopback() {
        tracing::warn!(
            api = %config.listener.api,
            "the API is plain HTTP on a non-loopback address: tokens cross the network in \
             clear and the console's camera needs HTTPS; set api.tls_cert and api.tls_key"
        );
    }
    Ok(tls)
}

/// Opens the store and loads the claims service from it; the queue of its claim events.
async fn load_service(
    config: &Config,
) -> Result<(ClaimsService, mpsc::UnboundedReceiver<ClaimEvent>), ServerError> {
    let keys = ClaimKeys {
        current: ClaimKey::load(&config.claims.code_key)?,
        previous: (config.claims.previous_code_keys.iter())
            .map(|p| ClaimKey::load(p))
            .collect::<Result<_, _>>()?,
    };
    let store = store::open(&config.store.url).await?;
    let (events, jobs) = ClaimEvents::channel();
    let service = ClaimsService::load(store, keys, WaitingRoom::default(), events).await?;
    Ok((service, jobs))
}

/// Starts the control plane's background tasks in `tracker`: device activity, the fleet's
/// change feed, takeovers and presence (in a fleet), the provisioning worker. The sender the
/// device path reports activity on.
fn spawn_control_plane(
    service: &ClaimsService,
    config: &Config,
    iot: Arc<dyn IotApiFactory>,
    jobs: mpsc::UnboundedReceiver<ClaimEvent>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> mpsc::Sender<Activity> {
    let (activity_tx, activity_rx) = mpsc::channel(ACTIVITY_QUEUE);
    tracker.spawn(service.clone().run_activity(activity_rx, cancel.clone()));
    let waiting = service.waiting();
    if let Some(fleet) = service.store().fleet() {
        let watch = fleet.watch(cancel.clone());
        tracker.spawn(watch.listen);
        tracker.spawn(service.clone().run_sync(watch.changes, cancel.clone()));
        let takeovers =
            crate::presence::take_over(waiting.clone(), watch.takeovers, cancel.clone());
        tracker.spawn(takeovers);
        let (tx, rx) = mpsc::channel(crate::presence::QUEUE);
        waiting.report_presence(tx);
        let (store, node) = (service.store().clone(), config.cluster.node_name.clone());
        tracker.spawn(crate::presence::run(store, node, rx, cancel.clone()));
    }
    let worker = Worker::new(
        service.clone(),
        service.store().clone(),
        iot,
        Backoff {
            base: config.aws.retry_base,
            max: config.aws.retry_max,
            give_up: config.aws.retry_give_up,
        },
        config.cluster.job_lease,
        cancel.clone(),
    );
    tracker.spawn(worker.run(jobs, tracker.clone()));
    activity_tx
}

/// What every device connection shares (its `stopping` is a child of `cancel`).
fn edge_context(
    config: &Config,
    service: &ClaimsService,
    activity: mpsc::Sender<Activity>,
    trust: edge::tls::Trust,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Arc<EdgeContext> {
    let limits = &config.limits;
    Arc::new(EdgeContext {
        cache: service.cache().clone(),
        waiting: service.waiting().clone(),
        activity,
        limits: ArcSwap::from_pointee(limits.clone()),
        permits: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
        connect_limiter: ArcSwap::from_pointee(AddressLimiter::new(
            limits.connect_rate_per_address,
            limits.connect_burst_per_address,
        )),
        shutdown_server_reference: Some(config.shutdown.server_reference.clone())
            .filter(|s| !s.is_empty()),
        compat_aws_device_lobby: config.compat.aws_device_lobby,
        stopping: cancel.child_token(),
        cancel: cancel.clone(),
        bridge: crate::bridge::BridgeHub::new(cancel.clone(), tracker.clone()),
        trust: ArcSwap::from_pointee(trust),
    })
}

/// A listener on `addr` (`key` names it in errors), and the address it is bound to.
fn bind(
    addr: SocketAddr,
    backlog: u32,
    key: &'static str,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source| ServerError::Bind { key, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let listener = socket.listen(backlog).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Opens every file `config` names, as a start would (TLS certificate, key, CAs and CRLs; the
/// claim-code keys; the admin token), without binding or starting anything: what
/// `lobby check-config` checks beyond the keys themselves.
pub fn check_files(config: &Config) -> Result<(), ServerError> {
    config.validate()?;
    ClaimKey::load(&config.claims.code_key)?;
    for p in &config.claims.previous_code_keys {
        ClaimKey::load(p)?;
    }
    read_admin_token(&config.api.admin_token_file)?;
    let cache = crate::claims::cache::ClaimsCache::default();
    edge::tls::trust(&config.tls, cache, 0)?;
    api::serve::tls_config(&config.api)?;
    Ok(())
}

fn read_admin_token(path: &Path) -> Result<String, ServerError> {
    let err = |message: String| ServerError::AdminToken {
        path: path.display().to_string(),
        message,
    };
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.len() < 16 {
        return Err(err("the token must be at least 16 characters".into()));
    }
    Ok(token.to_owned())
}

/// With `dev.auto_init`, creates the development PKI the config points at when its CA is
/// missing (first start of a fresh clone). Returns true when it created one.
pub fn ensure_dev_pki(config: &Config) -> Result<bool, ServerError> {
    if !config.dev.auto_init {
        return Ok(false);
    }
    let Some(dir) = config.tls.cert.parent() else {
        return Ok(false);
    };
    if dir.join("ca.pem").exists() || config.tls.cert.exists() {
        return Ok(false);
    }
    pki::init(&pki::InitOptions {
        dir: dir.to_owned(),
        devices: 3,
    })?;
    tracing::info!(dir = %dir.display(), "created the development PKI (dev.auto_init)");
    Ok(true)
}
