//! Connecting to PostgreSQL: the URL's settings (and what this store refuses of them), the
//! pool, and how the server's errors map onto [`StoreError`].

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

use super::tls::{self, RustlsConnect};
use crate::store::StoreError;

/// Connections in the pool: concurrent writes (claim bursts), API reads and the provisioning
/// worker. The server flushes the commits of concurrent transactions together.
const POOL_SIZE: usize = 16;
/// How long a statement waits for a row or advisory lock (`lock_timeout`), unless the URL's
/// `options` set it: a write behind a stuck holder fails as `unavailable` rather than waiting.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one statement may run (`statement_timeout`), unless the URL's `options` set it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the server, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a store call waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The error and its causes on one line (tokio-postgres says only "db error" at the top).
pub(super) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A unique key that already exists is `Conflict`; a lock or statement that timed out, a lost
/// connection or a server that is going away is `Unavailable`; the rest is `Backend`.
pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    let text = || format!("postgres: {}", describe(&e));
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Conflict,
        Some(c)
            if [
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::QUERY_CANCELED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
            ]
            .contains(c)
                || c.code().starts_with("08") =>
        {
            StoreError::Unavailable(text())
        }
        Some(_) => StoreError::Backend(text()),
        // No SQLSTATE: the connection failed or closed.
        None => StoreError::Unavailable(text()),
    }
}

/// The connection settings of `url` and the TLS connector its `sslmode` asks for
/// ([`super::tls`]).
pub(super) fn pg_config(url: &str) -> Result<(tokio_postgres::Config, RustlsConnect), StoreError> {
    let ask = tls::split_url(url)?;
    let tls = tls::connector(&ask)?;
    let mut config: tokio_postgres::Config =
        ask.url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Backend(format!(
                "store.url {:?} is not a PostgreSQL URL: {}",
                crate::config::redacted(url),
                describe(&e)
            ))
        })?;
    config.ssl_mode(ask.mode.ssl_mode());
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("lobby");
    }
    // Bound every wait on a lock or statement, unless the URL chose its own.
    let mut options = config.get_options().unwrap_or("").to_owned();
    for (key, value) in [
        ("lock_timeout", LOCK_TIMEOUT),
        ("statement_timeout", STATEMENT_TIMEOUT),
        ("idle_in_transaction_session_timeout", STATEMENT_TIMEOUT),
    ] {
        if !options.contains(key) {
            options.push_str(&format!(" -c {key}={}", value.as_millis()));
        }
    }
    config.options(options.trim());
    Ok((config, tls))
}

/// The pool of connections to `config`'s server.
pub(super) fn pool(
    config: &tokio_postgres::Config,
    tls: RustlsConnect,
) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config.clone(),
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_picks_what_tokio_postgres_is_told() {
        use tokio_postgres::config::SslMode;
        for (query, mode) in [
            ("", SslMode::Prefer),
            ("?sslmode=disable", SslMode::Disable),
            ("?sslmode=prefer", SslMode::Prefer),
            ("?application_name=x&sslmode=require", SslMode::Require),
        ] {
            let url = format!("postgres://u@127.0.0.1:5433/db{query}");
            let (config, _) = pg_config(&url).unwrap();
            assert_eq!(config.get_ssl_mode(), mode, "{url}");
        }
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let err = pg_config("postgres://u:hunter2@127.0.0.1:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a PostgreSQL URL") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
