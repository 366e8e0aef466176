//! Hot reload (SIGHUP, or `POST /v1/admin/reload`): the config file is read again and what
//! can change without a restart is applied — `[tls]` (server certificate and key, CAs, CRLs),
//! `[limits]` and the API's rate limit. Existing connections stay, keeping the limits they
//! started with; new connections get the new config (`limits.max_handshakes` applies to the
//! next handshake: the budget is a count, not a semaphore; `max_idle` and the publish rates to
//! sessions that start after). A file that does not load or validate changes nothing. Other keys (listeners, store, claim key) need a restart.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::claims::cache::ClaimsCache;
use crate::config::{Config, ConfigError, LimitsConfig};
use crate::edge::tls::TlsError;
use crate::edge::{self, EdgeContext};
use crate::ratelimit::AddressLimiter;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the lobby was started without a config file: nothing to reload")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    ApiTls(#[from] crate::api::serve::ApiTlsError),
    #[error("api.tls_cert: switching the API between HTTP and HTTPS needs a restart")]
    ApiSchemeChanged,
}

/// Applies a new config to a running lobby. Shared by the lobby and its API.
#[derive(Debug)]
pub struct Reloader {
    /// The file `lobby serve` was started from (none: started from a `Config` in code).
    path: Mutex<Option<PathBuf>>,
    edge: Arc<EdgeContext>,
    cache: ClaimsCache,
    /// The lobby's tasks: a reload's own (taking permits back) joins them, so a stop waits.
    tracker: TaskTracker,
    /// The API's requests-per-address limiter (`api.rate_limit`).
    pub api_limiter: ArcSwap<AddressLimiter>,
    /// The API's HTTPS configuration, when it serves HTTPS.
    api_tls: Option<crate::api::serve::ApiTls>,
}

impl Reloader {
    pub fn new(
        edge: Arc<EdgeContext>,
        cache: ClaimsCache,
        config: &Config,
        tracker: TaskTracker,
        api_tls: Option<crate::api::serve::ApiTls>,
    ) -> Self {
        Self {
            path: Mutex::new(None),
            edge,
            cache,
            tracker,
            api_tls,
            api_limiter: ArcSwap::from_pointee(AddressLimiter::new(
                config.api.rate_limit,
                config.api.rate_burst,
            )),
        }
    }

    /// Names the file later reloads read.
    pub fn set_path(&self, path: PathBuf) {
        *self.path.lock() = Some(path);
    }

    /// Reads the config file again and applies it; returns the new trust generation.
    pub fn reload_file(&self) -> Result<u64, ReloadError> {
        let path = self.path.lock().clone().ok_or(ReloadError::NoConfigFile)?;
        let config = Config::load(&path)?;
        self.apply(&config)
    }

    /// Applies `config`'s reloadable parts; all or nothing. Returns the new trust generation.
    pub fn apply(&self, config: &Config) -> Result<u64, ReloadError> {
        config.validate()?;
        // Everything that can fail first: then nothing changes on an error.
        if config.api.https() != self.api_tls.is_some() {
            return Err(ReloadError::ApiSchemeChanged);
        }
        let api_tls = crate::api::serve::tls_config(&config.api)?;
        let generation = self.reload_tls(config)?;
        if let (Some(swap), Some(new)) = (&self.api_tls, api_tls) {
            swap.store(new);
        }
        self.reload_limits(&config.limits);
        self.api_limiter.store(Arc::new(AddressLimiter::new(
            config.api.rate_limit,
            config.api.rate_burst,
        )));
        tracing::info!(generation, "config reloaded");
        Ok(generation)
    }

    /// Applies `[tls]` only: new connections get it at once; every live device is re-checked
    /// against it, and those no longer trusted are disconnected. On error the old trust stays.
    pub fn reload_tls(&self, config: &Config) -> Result<u64, ReloadError> {
        let generation = self.edge.trust.load().generation + 1;
        let trust = edge::tls::trust(&config.tls, self.cache.clone(), generation)?;
        self.edge.trust.store(Arc::new(trust));
        self.edge.waiting.wake_all();
        tracing::info!(generation, "TLS trust reloaded");
        Ok(generation)
    }

    fn reload_limits(&self, new: &LimitsConfig) {
        let old = self.edge.limits.load_full();
        let permits = &self.edge.permits;
        if new.max_connections > old.max_connections {
            permits.add_permits(new.max_connections - old.max_connections);
        } else if new.max_connections < old.max_connections {
            // Fewer permits: take the difference as connections end (none is dropped).
            let fewer =
                u32::try_from(old.max_connections - new.max_connections).unwrap_or(u32::MAX);
            let (permits, cancel) = (permits.clone(), self.edge.cancel.clone());
            self.tracker.spawn(async move {
                tokio::select! {
                    Ok(p) = permits.acquire_many_owned(fewer) => p.forget(),
                    () = cancel.cancelled() => {}
                }
            });
        }
        self.edge.limits.store(Arc::new(new.clone()));
        self.edge
            .connect_limiter
            .store(Arc::new(AddressLimiter::new(
                new.connect_rate_per_address,
                new.connect_burst_per_address,
            )));
    }
}

impl crate::api::ReloadHandle for Reloader {
    fn reload_file(&self) -> Result<u64, String> {
        Reloader::reload_file(self).map_err(|e| e.to_string())
    }

    fn api_limiter(&self) -> Arc<AddressLimiter> {
        self.api_limiter.load_full()
    }
}
