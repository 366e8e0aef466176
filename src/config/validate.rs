//! The checks of a configuration that its types alone do not make ([`Config::validate`]).

use std::time::Duration;

use super::{Config, ConfigError, StoreUrl, MAX_DURATION, MAX_PERMITS, SUPPORTED_URLS};

fn invalid(key: &'static str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// `Err` naming `key` unless `ok`.
fn check(ok: bool, key: &'static str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(invalid(key, message))
    }
}

impl Config {
    /// Checks what the types alone do not; the error names the first key that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sizes()?;
        self.validate_durations()?;
        self.validate_rates()?;
        self.validate_names()
    }

    /// Connection counts, packet size, per-device caps.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        let permits = format!("must be between 1 and {MAX_PERMITS}");
        let l = &self.limits;
        check(
            (1..=MAX_PERMITS).contains(&l.max_connections),
            "limits.max_connections",
            &permits,
        )?;
        check(
            (1..=MAX_PERMITS).contains(&self.api.max_connections),
            "api.max_connections",
            &permits,
        )?;
        check(
            l.max_handshakes > 0,
            "limits.max_handshakes",
            "must be at least 1",
        )?;
        check(
            !self.listener.mqtt.is_empty(),
            "listener.mqtt",
            "at least one MQTT listener is required",
        )?;
        check(
            (128..=268_435_460).contains(&l.max_packet_size),
            "limits.max_packet_size",
            "must be between 128 and 268435460 bytes",
        )?;
        check(
            l.reconnect_burst > 0,
            "limits.reconnect_burst",
            "must be at least 1 (0 would refuse every reconnect)",
        )?;
        check(
            l.max_subscriptions > 0,
            "limits.max_subscriptions",
            "must be at least 1",
        )?;
        check(
            l.max_inflight > 0,
            "limits.max_inflight",
            "must be at least 1",
        )?;
        check(
            l.bridge_max_redeliveries > 0,
            "limits.bridge_max_redeliveries",
            "must be at least 1",
        )
    }

    /// Timeouts that must run, and every duration bounded.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        for (key, d) in [
            ("limits.handshake_timeout", self.limits.handshake_timeout),
            ("limits.connect_timeout", self.limits.connect_timeout),
            ("cluster.job_lease", self.cluster.job_lease),
            ("api.header_timeout", self.api.header_timeout),
            ("api.idle_timeout", self.api.idle_timeout),
            ("aws.retry_give_up", self.aws.retry_give_up),
        ] {
            check(!d.is_zero(), key, "must be longer than 0s")?;
        }
        // Every duration is added to a clock somewhere: bound them all, so no value overflows
        // an instant (a panic in the connection path) or a millisecond count.
        for (key, d) in self.durations() {
            check(d <= MAX_DURATION, key, "must be at most 365d")?;
        }
        check(
            !self.aws.retry_base.is_zero() && self.aws.retry_max >= self.aws.retry_base,
            "aws.retry_base",
            "must be above 0 and at most aws.retry_max",
        )
    }

    /// Every duration key with its value, for the bounds every duration shares.
    fn durations(&self) -> Vec<(&'static str, Duration)> {
        vec![
            ("limits.handshake_timeout", self.limits.handshake_timeout),
            ("limits.connect_timeout", self.limits.connect_timeout),
            ("limits.redirect_grace", self.limits.redirect_grace),
            ("limits.reconnect_interval", self.limits.reconnect_interval),
            ("limits.max_idle", self.limits.max_idle),
            ("shutdown.grace", self.shutdown.grace),
            ("shutdown.drain", self.shutdown.drain),
            ("cluster.job_lease", self.cluster.job_lease),
            ("aws.retry_base", self.aws.retry_base),
            ("aws.retry_max", self.aws.retry_max),
            ("aws.retry_give_up", self.aws.retry_give_up),
            ("api.header_timeout", self.api.header_timeout),
            ("api.idle_timeout", self.api.idle_timeout),
        ]
    }

    /// Rates are 0 (off) or positive, and a rate that is on has a burst.
    fn validate_rates(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (key, rate, burst) in [
            (
                "limits.connect_burst_per_address",
                l.connect_rate_per_address,
                l.connect_burst_per_address,
            ),
            ("api.rate_burst", self.api.rate_limit, self.api.rate_burst),
        ] {
            check(
                !(rate > 0.0 && burst == 0),
                key,
                "must be at least 1 when its rate is on (0 would refuse everyone)",
            )?;
        }
        for (key, rate) in [
            (
                "limits.connect_rate_per_address",
                l.connect_rate_per_address,
            ),
            ("api.rate_limit", self.api.rate_limit),
            ("limits.publish_rate", l.publish_rate),
            ("limits.publish_bytes_rate", l.publish_bytes_rate),
        ] {
            check(
                rate.is_finite() && rate >= 0.0,
                key,
                "must be 0 (off) or a positive rate per second",
            )?;
        }
        Ok(())
    }

    /// Names, URLs and choices.
    fn validate_names(&self) -> Result<(), ConfigError> {
        check(
            !self.cluster.node_name.is_empty(),
            "cluster.node_name",
            "must not be empty",
        )?;
        check(
            self.api.tls_cert.as_os_str().is_empty() == self.api.tls_key.as_os_str().is_empty(),
            "api.tls_cert",
            "api.tls_cert and api.tls_key go together (both for HTTPS, neither for HTTP)",
        )?;
        check(
            !self.tls.client_cas.is_empty(),
            "tls.client_cas",
            "at least one CA is required",
        )?;
        check(
            StoreUrl::parse(&self.store.url).is_some(),
            "store.url",
            &format!("expected {SUPPORTED_URLS}"),
        )?;
        let session = &self.aws.session_name;
        check(
            (2..=64).contains(&session.len())
                && session
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"+=,.@_-".contains(&c)),
            "aws.session_name",
            "2-64 characters of letters, digits and +=,.@_-",
        )?;
        check(
            matches!(self.log.format.as_str(), "human" | "json"),
            "log.format",
            "expected \"human\" or \"json\"",
        )
    }
}
